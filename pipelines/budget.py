"""The frontier budget: a cap on frontier spend that scales out and spends what it may.

No worker asks another for permission. A bounded run's budget is earned by the
offsets it reads: a batch covering ``k`` of the run's ``N`` offsets adds
``cap * k / N`` to its worker process's pool, so the pools of all workers
together never hold more than the cap. A streaming run (whose ``N`` is
unknown) gives each worker process ``cap / workers`` per period (``day`` or
``hour`` of processing time, UTC), and the pool starts over each period.

Escalations are approved against the pool with a *strict* reservation: the
request's prompt bytes as input tokens (a byte-level BPE token is at least a
byte) at the higher of the input and cache-write prices, plus its whole output
allowance (``max_tokens``, which the provider never bills beyond) at the output
price. After the call the reservation is settled with the billed cost and the
difference goes back to the pool, so unspent reservations are reused and the
realised frontier spend never exceeds the cap. What is left in a pool when its
worker ends (less than one request's reservation) is the only budget a run
cannot use.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Optional

__all__ = ["Budget", "BudgetPool", "pool_for", "strict_cost"]

_PERIODS = {"day": 86_400, "hour": 3_600}


@dataclasses.dataclass(frozen=True)
class Budget:
  """A frontier spend cap.

  Attributes:
    usd: the cap; None = no cap.
    period: for streaming runs, ``day`` or ``hour``: the cap applies per period
      (processing time, UTC); None = once for the worker's life.
    workers: how many worker processes share a streaming cap (``--workers-hint``).
  """
  usd: Optional[float] = None
  period: Optional[str] = None
  workers: int = 1

  def __post_init__(self):
    if self.usd is not None and self.usd < 0:
      raise ValueError("the budget must be >= 0")
    if self.period is not None and self.period not in _PERIODS:
      raise ValueError(f"budget period must be one of {', '.join(_PERIODS)} or none")
    if self.workers < 1:
      raise ValueError("workers must be >= 1")

  @property
  def capped(self) -> bool:
    return self.usd is not None


class BudgetPool:
  """One worker process's share of the budget. Thread-safe."""

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
    """For periodic (streaming) budgets: start this worker's share of a new period."""
    b = self._budget
    if b.usd is None:
      return
    length = _PERIODS.get(b.period) if b.period else None
    key = int((time.time() if now is None else now) // length) if length else 0
    with self._lock:
      if key != self._period_key:
        self._period_key = key
        self.balance = b.usd / b.workers
        self.earned += self.balance

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


# Per process, per run: every thread of a worker shares its pool.
_POOLS: dict = {}
_POOLS_LOCK = threading.Lock()


def pool_for(run_id: str, budget: Budget) -> BudgetPool:
  with _POOLS_LOCK:
    pool = _POOLS.get(run_id)
    if pool is None:
      pool = _POOLS[run_id] = BudgetPool(budget)
    return pool


def strict_cost(prompt_bytes: int, messages: int, max_tokens: int, price) -> float:
  """An upper bound on what a request can be billed (see the module docstring)."""
  input_price = max(price.input, price.cache_write or 0.0)
  input_tokens = prompt_bytes + 16 * messages  # framing tokens per message
  return (input_tokens * input_price + max_tokens * price.output) / 1e6
