"""The frontier budget: one cap on frontier spend, whatever the number of workers and failures.

A capped budget lives in the ledger (``connectors/kafka_ledger.py``), an account
every worker process of the run claims from: a worker asks for a lease of the cap
when it needs budget, spends it on strict reservations, and at the end of each
batch releases what it did not spend, charged with what it did. Because leases
are recorded in the ledger before anything is spent, a bundle the runner retries,
a worker lost and restarted, a Flink failover or a re-run all draw on the same
account: none earns the cap again. A lease a lost worker held stays charged in
full; that (at most one lease per lost process) is the only budget a run cannot
use, and the spend can never pass the cap.

The account is ``Budget.account`` and, for a periodic budget, the period (``day`` or
``hour`` of processing time, UTC). A bounded run with a range size is paced: it
may hold at most ``cap * offsets read / offsets in its range``, so a backfill
does not spend its whole cap on its first batches.

Escalations are approved with a *strict* reservation: the request's prompt bytes
as input tokens (a byte-level BPE token is at least a byte) at the higher of the
input and cache-write prices, plus its whole output allowance (``max_tokens``,
which the provider never bills beyond) at the output price. After the call the
reservation is settled with the billed cost and the difference is reused.

``Budget(usd, per_process=True)`` keeps the earlier, local behaviour instead: each
worker process has its own pool (a bounded run's batch covering ``k`` of ``N``
offsets adds ``cap * k / N``; a streaming run gives each process the cap per
period). It is for a single process or for tests; with several processes it
multiplies the cap, so it must be asked for by name. ``RouteThroughTiers`` given
``Budget(usd)`` and ``expected_records`` but no ledger uses the paced form, which
keeps the run within the cap in any number of processes (``route_rows``).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Optional

__all__ = ["Budget", "BudgetPool", "LedgerBudget", "account_of", "budget_for", "check_budget",
           "strict_cost"]

_PERIODS = {"day": 86_400, "hour": 3_600}


@dataclasses.dataclass(frozen=True)
class Budget:
  """A frontier spend cap.

  Attributes:
    usd: the cap; None = no cap.
    period: ``day`` or ``hour``: the cap applies per period (processing time, UTC);
      None = once, for the account.
    account: the account in the ledger, shared by every run that names it (the
      pipelines use the consumer group, and for an explicit range the range).
    per_process: each worker process caps itself (no ledger; see the module doc).
  """
  usd: Optional[float] = None
  period: Optional[str] = None
  account: Optional[str] = None
  per_process: bool = False

  def __post_init__(self):
    if self.usd is not None and self.usd < 0:
      raise ValueError("the budget must be >= 0")
    if self.period is not None and self.period not in _PERIODS:
      raise ValueError(f"budget period must be one of {', '.join(_PERIODS)} or none")

  @property
  def capped(self) -> bool:
    return self.usd is not None


def account_of(budget: Budget, now: Optional[float] = None) -> str:
  """The ledger account a spend at ``now`` is charged to."""
  if budget.period is None:
    return f"budget/{budget.account}"
  index = int((time.time() if now is None else now) // _PERIODS[budget.period])
  return f"budget/{budget.account}/{budget.period}-{index}"


class LedgerBudget:
  """A batch's view of a budget account in the ledger. Thread-safe; ``close()`` at the
  end of the batch releases what its leases did not spend."""

  # A lease is this share of the cap (at least what the reservation needs).
  LEASE_SHARE = 1 / 64

  def __init__(self, ledger, budget: Budget, run: str, offsets: int, run_offsets: int):
    self._ledger = ledger
    self._budget = budget
    self._run = run
    self._run_offsets = run_offsets
    self._acct = account_of(budget)
    self._lock = threading.Lock()
    self._claims: list = []  # (claim id, granted)
    self.balance = 0.0
    self.spent = 0.0
    self.granted = 0.0
    if run_offsets:
      ledger.progress(self._acct, run, offsets, run_offsets)

  def try_reserve(self, usd: float) -> bool:
    with self._lock:
      if usd <= self.balance + 1e-12:
        self.balance -= usd
        return True
      need = usd - self.balance
      want = max(need, self._budget.usd * self.LEASE_SHARE)
      try:
        cid, grant = self._ledger.claim_budget(self._acct, want, need, self._budget.usd,
                                               self._run, self._run_offsets)
      except Exception as e:  # noqa: BLE001 - no ledger, no spend: the budget holds
        import logging
        logging.getLogger(__name__).warning("budget claim failed (escalation skipped): %s", e)
        return False
      if grant <= 0:
        return False
      self._claims.append((cid, grant))
      self.granted += grant
      self.balance += grant - usd
      return True

  def settle(self, reserved: float, actual: float) -> None:
    with self._lock:
      self.balance += reserved - actual
      self.spent += actual

  def close(self) -> None:
    """Charges each lease its share of the spend (in order) and releases the rest."""
    with self._lock:
      claims, self._claims = self._claims, []
      left = self.spent
      for cid, grant in claims:
        charge = min(grant, left) if cid != claims[-1][0] else left
        left -= charge
        self._ledger.release(self._acct, cid, charge)
      self.balance = 0.0


class BudgetPool:
  """One worker process's own share of a ``per_process`` budget. Thread-safe."""

  def __init__(self, budget: Budget):
    self._budget = budget
    self._lock = threading.Lock()
    self.balance = 0.0
    self.earned = 0.0
    self.spent = 0.0
    self._period_key = None

  def earn(self, usd: float) -> None:
    with self._lock:
      self.balance += usd
      self.earned += usd

  def ensure_period(self, now: Optional[float] = None) -> None:
    """For periodic budgets: start this worker's share of a new period."""
    b = self._budget
    if b.usd is None:
      return
    length = _PERIODS.get(b.period) if b.period else None
    key = int((time.time() if now is None else now) // length) if length else 0
    with self._lock:
      if key != self._period_key:
        self._period_key = key
        self.balance = b.usd
        self.earned += self.balance

  def for_batch(self, offsets: int, run_offsets: int) -> "BudgetPool":
    if run_offsets:
      self.earn(self._budget.usd * offsets / run_offsets)
    else:
      self.ensure_period()
    return self

  def try_reserve(self, usd: float) -> bool:
    with self._lock:
      if usd <= self.balance + 1e-12:
        self.balance -= usd
        return True
      return False

  def settle(self, reserved: float, actual: float) -> None:
    """Returns what a reservation did not spend (the billed cost never exceeds a strict
    reservation; if it ever did, the pool goes below zero and approves nothing until
    it has earned the difference back)."""
    with self._lock:
      self.balance += reserved - actual
      self.spent += actual

  def close(self) -> None:
    pass


# Per process, per run: every thread of a worker shares its per-process pool.
_POOLS: dict = {}
_POOLS_LOCK = threading.Lock()


def budget_for(run_id: str, budget: Budget, ledger_config, offsets: int, run_offsets: int):
  """The budget a batch of ``offsets`` (of a run of ``run_offsets``; 0 = unbounded)
  reserves from: a ``LedgerBudget`` (close it after the batch), or this process's
  ``BudgetPool`` in per-process mode; None when uncapped."""
  if not budget.capped:
    return None
  if budget.per_process:
    with _POOLS_LOCK:
      pool = _POOLS.get(run_id)
      if pool is None:
        pool = _POOLS[run_id] = BudgetPool(budget)
    return pool.for_batch(offsets, run_offsets)
  if ledger_config is None:
    raise ValueError("a shared budget needs the ledger (see Budget)")
  from tierflow.connectors.kafka_ledger import ledger_for
  return LedgerBudget(ledger_for(ledger_config), budget, run_id, offsets, run_offsets)


def check_budget(budget: Budget, ledger_config) -> None:
  """Raises ValueError for a cap that would silently apply per worker process, TypeError
  for a budget that is not a ``Budget``."""
  if not isinstance(budget, Budget):
    raise TypeError(f"budget must be a tierflow Budget (Budget(usd, account=NAME) or "
                    f"Budget(usd, per_process=True)), got {type(budget).__name__} {budget!r}")
  if budget.capped and not budget.per_process and ledger_config is None:
    raise ValueError(
        f"Budget(usd={budget.usd}) is shared by every worker process through the ledger: "
        "pass ledger=LedgerConfig(bootstrap_servers) and Budget(usd, account=NAME), or "
        "Budget(usd, per_process=True) to cap each worker process on its own")
  if budget.capped and not budget.per_process and not budget.account:
    raise ValueError("a shared budget needs account= (the name every run sharing it uses)")


def strict_cost(prompt_bytes: int, messages: int, max_tokens: int, price) -> float:
  """An upper bound on what a request can be billed (see the module docstring)."""
  input_price = max(price.input, price.cache_write or 0.0)
  input_tokens = prompt_bytes + 16 * messages  # framing tokens per message
  return (input_tokens * input_price + max_tokens * price.output) / 1e6
