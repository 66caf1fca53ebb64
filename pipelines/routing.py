"""Small tier first, frontier for the uncertain: routing records through a run's stages.

``Router`` routes a list of records (no Beam in it):

    small tier, every stage at once   (packed requests, ``concurrency`` in flight;
                                       ``samples: k`` asks each pack k times and keeps
                                       the answer they agree on: ``agreement``)
      -> decide escalations           (confidence < threshold, or a calibrated learned
                                       router's score < threshold, or the small call failed)
      -> frontier tier, in priority order while the budget pool can reserve them
      -> ``RoutedRecord``s            (typed outcomes; ``ledger.ledger_row`` makes rows)

The stages of one record are independent, so the small tier's requests for all
stages go out together; a frontier request is submitted once the budget pool
(``budget``) can reserve its strict cost, and its reservation is settled with the
billed cost when it returns. On the frontier tier a record that fails inside a
packed answer (its line missing, malformed or cut off) is retried once in a
request of its own, which reserves its own budget; its ledger adds the tokens and
cost of both attempts. A request that fails (after the client's retries) fails
its records for that stage and tier, never the batch.

Two Beam transforms use it:

* ``RouteBatches`` routes whole offset batches (``DecodedBatch``) in place: what
  the tierflow pipelines use, one element per batch, so nothing shuffles, at most
  ``ROUTED_AHEAD`` batches of a bundle are held, and the budget is earned per batch.
* ``RouteThroughTiers`` (``route_rows``) routes a PCollection of dict rows for a
  user's own pipeline.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import time
import uuid
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from tierflow import progress, schemas
from tierflow.config import RunConfig
from tierflow.connectors.decode import DecodedBatch, dead_letter, dead_letter_table
from tierflow.connectors.llm_clients import (ModelCallError, ModelClient, TierUnavailable,
                                             client_for, systemic)
from tierflow.pipelines.agreement import combine
from tierflow.pipelines.injection import guard, suspected
from tierflow.connectors.kafka_ledger import LedgerConfig
from tierflow.pipelines.budget import Budget, BudgetPool, budget_for, check_budget, strict_cost
from tierflow.pipelines.ledger import (SMALL_SKIPPED, RoutedRecord, StageOutcome, TierOutcome,
                                       ledger_row, result_schema, row_json)
from tierflow.pipelines.prompts import build_prompt, parse_reply, render_text, split_usage
from tierflow.prices import PriceBook, load_price_book

__all__ = ["METRICS_NAMESPACE", "RouteBatches", "Router", "RoutingCounters"]

_LOGGER = logging.getLogger(__name__)
METRICS_NAMESPACE = "tierflow.routing"
ROUTED_AHEAD = 4  # batches of a bundle in flight at most (``_RouteBatchFn``)


def _packs(indexes: Sequence[int], size: int) -> list[list[int]]:
  return [list(indexes[i:i + size]) for i in range(0, len(indexes), size)]


class Router:
  """Routes records through a run config's stages and tiers.

  ``open()`` creates one model client and one thread pool per tier (call it
  once per worker); ``route(rows, pool)`` is thread-safe.
  """

  def __init__(self, config: RunConfig, price_book: PriceBook,
               batch_state_dir: Optional[str] = None, ledger: Optional[LedgerConfig] = None):
    for model in (config.small, config.frontier):
      price_book.price(model.price_key)  # fail at construction, not on a worker
    self.config = config
    self._batch_state_dir = batch_state_dir
    self._ledger = ledger
    self._book = price_book
    self._models = {"small": config.small, "frontier": config.frontier}
    self._prices = {t: price_book.price(m.price_key) for t, m in self._models.items()}
    self._kinds = {s.name: s.kind_impl for s in config.stages}
    self._clients: dict = {}
    self._executors: dict = {}

  def open(self) -> "Router":
    for tier, model in self._models.items():
      self._executors[tier] = concurrent.futures.ThreadPoolExecutor(
          max_workers=model.concurrency, thread_name_prefix=f"tierflow-{tier}")
    return self

  def close(self) -> None:
    for ex in self._executors.values():
      ex.shutdown(wait=False, cancel_futures=True)
    self._executors = {}
    self._clients = {}

  def _client(self, tier: str) -> ModelClient:
    """The tier's client: the process's one for its endpoint (``client_for``)."""
    client = self._clients.get(tier)
    if client is None:
      client = self._clients[tier] = client_for(self._models[tier], self._ledger)
    return client

  # --- one request ------------------------------------------------------------------
  def _prompt(self, tier: str, stage: str, texts: Sequence[str]) -> tuple[str, str, int]:
    kind = self._kinds[stage]
    system, user = build_prompt(kind, texts, verbalise=not self._models[tier].uses_logprobs)
    max_tokens = kind.stage.output_tokens_per_record() * len(texts) + 16
    return system, user, max_tokens

  def reservation(self, stage: str, texts: Sequence[str], billing: str = "sync") -> float:
    """The strict cost bound of the frontier request for these texts (see ``budget``),
    at the batch API's discount for ``billing="batch"``."""
    system, user, max_tokens = self._prompt("frontier", stage, texts)
    size = len(system.encode("utf-8")) + len(user.encode("utf-8"))
    max_tokens += self._models["frontier"].reasoning_allowance  # billed as output if used
    price = self._prices["frontier"]
    cost = strict_cost(size, 2, max_tokens, price)
    return cost * (1 - price.batch_discount) if billing == "batch" else cost

  def answer(self, tier: str, stage: str, texts: Sequence[str]) -> list[TierOutcome]:
    """One tier's answers to one stage for ``texts`` (packs of the tier's ``batch_size``,
    ``concurrency`` in flight): no escalation, no budget. A record whose answer could not
    be read has ``error`` set; a request the endpoint failed (after the client's retries)
    raises ``ModelCallError``."""
    if tier not in self._models or stage not in self._kinds:
      raise ValueError(f"no tier {tier!r} or stage {stage!r} in this config")
    packs = _packs(range(len(texts)), self._models[tier].batch_size)
    futures = [self._executors[tier].submit(self._call, tier, stage, [texts[i] for i in p])
               for p in packs]
    out: list = [None] * len(texts)
    for pack, future in zip(packs, futures):
      outcomes, answered, _ = future.result()
      if not answered:
        kind, _, message = (outcomes[0].error or "malformed: no answer").partition(": ")
        for other in futures:
          other.cancel()
        raise ModelCallError(kind, message)
      for i, outcome in zip(pack, outcomes):
        out[i] = outcome
    return out

  def _request(self, tier: str, stage: str, texts: Sequence[str]
               ) -> tuple[list[TierOutcome], bool]:
    """(one outcome per text, whether the endpoint answered at all)."""
    outcomes, answered, _ = self._call(tier, stage, texts)
    return outcomes, answered

  def _call(self, tier: str, stage: str, texts: Sequence[str],
            before_uncertain_retry=None) -> tuple[list[TierOutcome], bool, int]:
    """``_request``, and how many of its attempts may have been billed unseen (timed out,
    connection lost, unreadable answer; see ``ModelClient.complete``)."""
    kind = self._kinds[stage]
    model = self._models[tier]
    system, user, max_tokens = self._prompt(tier, stage, texts)
    try:
      reply = self._client(tier).complete(system, user, max_tokens,
                                          top_logprobs=kind.alternatives,
                                          answer_schema=self._schema(tier, stage, texts),
                                          before_uncertain_retry=before_uncertain_retry)
    except ModelCallError as e:
      return ([TierOutcome(tier, model.model, error=str(e)) for _ in texts], False,
              e.uncertain_attempts)
    outcomes = self._outcomes(tier, stage, texts, reply, system, user, "sync")
    return outcomes, True, reply.uncertain_attempts

  def _frontier_call(self, stage: str, texts: Sequence[str], pool: Optional[BudgetPool],
                     reserved: float) -> tuple[list[TierOutcome], bool, float, float]:
    """A synchronous frontier request under the budget: (outcomes, answered, what to
    charge, what was reserved). Each attempt that may have been billed unseen is charged
    at its strict cost, and one is retried only once the pool has reserved it again."""
    extra = [0.0]

    def reserve_again() -> bool:
      if pool is None:
        return True
      if pool.try_reserve(reserved):
        extra[0] += reserved
        return True
      return False

    outcomes, answered, uncertain = self._call("frontier", stage, texts, reserve_again)
    if uncertain:
      for o in outcomes:
        o.notes = (*o.notes, f"{uncertain} attempt(s) timed out or were lost after sending; "
                   "charged to the budget at their strict cost")
    charge = sum(o.cost_usd for o in outcomes) + uncertain * reserved
    return outcomes, answered, charge, reserved + extra[0]

  def _schema(self, tier: str, stage: str, texts: Sequence[str]) -> Optional[dict]:
    """The answer's JSON schema for structured output: single-record requests only (a
    packed answer is one JSON line per record, which one schema cannot say)."""
    if len(texts) != 1:
      return None
    return self._kinds[stage].answer_schema(not self._models[tier].uses_logprobs)

  def _outcomes(self, tier: str, stage: str, texts: Sequence[str], reply, system: str,
                user: str, billing: str) -> list[TierOutcome]:
    """One outcome per text from a reply, each with its share of the billed usage."""
    kind = self._kinds[stage]
    answers = [guard(kind, a, t) for a, t in zip(parse_reply(kind, reply, texts), texts)]
    framing = max(0, len(reply.text) - sum(a.answer_chars for a in answers))
    shared = len(system) + len(user) - sum(len(t) for t in texts)
    shares = split_usage(reply.usage, [len(t) for t in texts], shared,
                         [a.answer_chars for a in answers], framing)
    price = self._prices[tier]
    name = reply.model or self._models[tier].model
    return [TierOutcome(tier, name, a.value, a.confidence, a.signal, tuple(a.notes), a.error,
                        share, price.cost(share, batch_api=billing == "batch"),
                        billing=billing)
            for a, share in zip(answers, shares)]

  def _batched(self, tier: str, jobs: Sequence[tuple[str, Sequence[str]]],
               key: Optional[str], before_sync: Optional[Callable[[int], Optional[str]]] = None
               ) -> list[tuple[list[TierOutcome], bool]]:
    """``_request`` for many (stage, texts) jobs at once, through the provider's batch
    API; what the batches did not answer goes synchronously or fails (``batch_fallback``).
    ``before_sync(n)``: None to send job ``n`` synchronously, or why not."""
    from tierflow.connectors.batch_api import ProviderBatch, custom_id
    model, client = self._models[tier], self._client(tier)
    requests, prompts = [], []
    for n, (stage, texts) in enumerate(jobs):
      system, user, max_tokens = self._prompt(tier, stage, texts)
      requests.append((custom_id(stage, n), client.request_body(
          system, user, max_tokens, top_logprobs=self._kinds[stage].alternatives,
          answer_schema=self._schema(tier, stage, texts))))
      prompts.append((system, user))
    state = (f"{self._batch_state_dir}/{key}.{tier}.json"
             if self._batch_state_dir and key else None)
    batch = ProviderBatch(client, state, poll_s=model.batch_poll_s,
                          max_wait_s=model.batch_max_wait_s, limits=model.batch_limits)
    results = batch.run(requests)
    Metrics.counter(METRICS_NAMESPACE, f"{tier}_batches").inc(len(batch.batch_ids))
    Metrics.counter(METRICS_NAMESPACE, f"{tier}_batch_polls").inc(batch.polls)
    out: list = [None] * len(jobs)
    fallbacks = {}
    for n, ((cid, _), (stage, texts), (system, user)) in enumerate(zip(requests, jobs, prompts)):
      result = results[cid]
      if not isinstance(result, ModelCallError):
        out[n] = (self._outcomes(tier, stage, texts, result, system, user, "batch"), True)
        continue
      why_not = ("batch_fallback: fail" if model.batch_fallback == "fail"
                 else "it may be billed" if result.kind == "batch_unsettled"
                 else before_sync(n) if before_sync is not None else None)
      if why_not is None:
        fallbacks[n] = (str(result), self._executors[tier].submit(
            self._request, tier, stage, texts))
      else:
        error = str(result) if model.batch_fallback == "fail" else \
            f"{result}; not sent synchronously: {why_not}"
        out[n] = ([TierOutcome(tier, model.model, error=error, billing="batch")
                   for _ in texts], False)
    for n, (why, future) in fallbacks.items():
      outcomes, answered = future.result()
      for o in outcomes:
        o.notes = (f"sent synchronously after the batch: {why[:120]}", *o.notes)
      out[n] = (outcomes, answered)
    return out

  def _frontier_request(self, stage: str, texts: Sequence[str], pool: Optional[BudgetPool],
                        first: Optional[tuple[list[TierOutcome], bool]] = None,
                        reserved: float = 0.0) -> tuple[list[TierOutcome], float, float]:
    """(outcomes, what to charge the packed request, what it reserved in all) of a
    frontier request that reserved ``reserved`` (``first``: its answer, already had from
    a batch); records that fail inside a packed answer are retried alone, synchronously,
    each retry reserving and settling its own budget."""
    if first is not None:
      outcomes, answered = first
      packed_cost, reserved_all = sum(o.cost_usd for o in outcomes), reserved
    else:
      outcomes, answered, packed_cost, reserved_all = self._frontier_call(
          stage, texts, pool, reserved)
    if len(texts) < 2 or not answered:
      return outcomes, packed_cost, reserved_all
    out = []
    for text, first in zip(texts, outcomes):
      if first.ok:
        out.append(first)
        continue
      reserved = self.reservation(stage, [text]) if pool is not None else 0.0
      if pool is not None and not pool.try_reserve(reserved):
        first.notes = (*first.notes, "not retried alone: budget cap reached")
        out.append(first)
        continue
      [second], _, charge, reserved_alone = self._frontier_call(stage, [text], pool, reserved)
      if pool is not None:
        pool.settle(reserved_alone, charge)
      merged = TierOutcome(
          "frontier", second.model, second.value, second.confidence, second.signal,
          second.notes, second.error, first.usage + second.usage,
          first.cost_usd + second.cost_usd, retried_alone=True)
      if second.error:
        merged.error = f"{first.error}; retried alone: {second.error}"
      else:
        merged.notes = (f"retried alone after: {first.error[:160]}", *second.notes)
      out.append(merged)
    return out, packed_cost, reserved_all

  # --- a list of records ----------------------------------------------------------
  def route(self, rows: Sequence[Mapping[str, Any]], pool: Optional[BudgetPool] = None,
            batch_key: Optional[str] = None) -> list[RoutedRecord]:
    """Routes ``rows``; ``pool`` caps frontier spend (None: no cap). ``batch_key`` names
    these rows (e.g. their offset range) for a batch-mode tier's state file."""
    texts = [render_text(self.config.text, r) for r in rows]
    outcomes = [{s.name: StageOutcome() for s in self.config.stages} for _ in rows]
    suspects = [suspected(t) for t in texts]
    if rows:
      self._small(texts, outcomes, batch_key)
      self._decide(outcomes, suspects)
      if self._models["frontier"].mode == "batch":
        self._frontier_batched(texts, outcomes, pool, batch_key)
      else:
        self._frontier(texts, outcomes, pool)
    return [RoutedRecord(dict(r), o, s) for r, o, s in zip(rows, outcomes, suspects)]

  def _small(self, texts: list[str], outcomes: list[dict], batch_key: Optional[str] = None
             ) -> None:
    """Every stage's packs on the small tier, at once: one provider batch (``mode:
    batch``) or concurrent requests; none for the stages in ``config.small_skipped``."""
    model = self._models["small"]
    skipped = self.config.small_skipped
    asked = [stage.name for stage in self.config.stages if stage.name not in skipped]
    where = [(name, pack) for name in asked
             for pack in _packs(range(len(texts)), model.batch_size)]
    # ``samples: k`` asks every pack k times; answers[s * len(where) + j] is sample s of j.
    jobs = [(name, [texts[i] for i in pack]) for name, pack in where] * model.samples
    if not jobs:
      return
    if model.mode == "batch":
      answers = self._batched("small", jobs, batch_key)
    else:
      ex = self._executors["small"]
      progress.expect_stages(asked)
      futures = [ex.submit(self._request, "small", name, pack_texts)
                 for name, pack_texts in jobs]
      for future, (name, pack_texts) in zip(futures, jobs[:len(where)]):  # one sample's
        future.add_done_callback(
            lambda _, name=name, n=len(pack_texts): progress.stage_done(name, n))
      answers = [future.result() for future in futures]
    for j, (name, pack) in enumerate(where):
      samples = [answers[s * len(where) + j][0] for s in range(model.samples)]
      for r, i in enumerate(pack):
        outcomes[i][name].small = combine(self._kinds[name], [results[r] for results in samples])

  def _decide(self, outcomes: list[dict], suspects: Sequence[bool]) -> None:
    skipped = self.config.small_skipped  # a property: computed once, not per record
    for record, suspect in zip(outcomes, suspects):
      for stage in self.config.stages:
        st = record[stage.name]
        small = st.small
        if stage.name in skipped:
          st.reason = SMALL_SKIPPED
        elif suspect:
          st.reason = ("the record holds instructions addressed to a model (possible "
                       "prompt injection)")
        elif not small.ok:
          st.reason = f"small tier failed ({small.error[:120]})"
        elif small.confidence is None:
          st.reason = "no confidence signal"
        else:
          router = self.config.routers.get(stage.name)
          if router is not None:
            st.score = router.score(small.confidence, small.value)
          score = small.confidence if router is None else st.score
          if score < stage.threshold:
            said = "" if router is None else f", learned router score {score:.3f}"
            st.reason = f"confidence {small.confidence:.3f}{said} < {stage.threshold:.3f}"

  def _frontier(self, texts: list[str], outcomes: list[dict],
                pool: Optional[BudgetPool]) -> None:
    queues = self._escalation_queues(outcomes)
    if not queues:
      return
    ex = self._executors["frontier"]
    model = self._models["frontier"]
    in_flight: dict = {}

    while queues or in_flight:
      while queues and len(in_flight) < model.concurrency:
        stage = self._next_stage(queues, outcomes)
        queue = queues[stage]
        taken = self._reserve_pack(stage, queue, texts, pool)
        if taken is None and in_flight:
          break  # wait: settled requests give back what they did not spend
        pack, reserved = self._take(queues, stage, outcomes, taken)
        if not pack:
          continue
        future = ex.submit(self._frontier_request, stage, [texts[i] for i in pack], pool,
                           None, reserved)
        in_flight[future] = (stage, pack, reserved)
      if not in_flight:
        continue
      done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
      for future in done:
        stage, pack, _ = in_flight.pop(future)
        results, packed_cost, reserved_all = future.result()
        for i, outcome in zip(pack, results):
          outcomes[i][stage].frontier = outcome
        if pool is not None:  # retries settled their own reservations
          pool.settle(reserved_all, packed_cost)

  def _escalation_queues(self, outcomes: list[dict]) -> dict:
    """Per stage, its escalations with the least trustworthy small answers first."""
    queues = {}
    for stage in self.config.stages:
      wanted = [i for i, rec in enumerate(outcomes) if rec[stage.name].reason]
      wanted.sort(key=lambda i, s=stage.name: outcomes[i][s].priority())
      if wanted:
        queues[stage.name] = collections.deque(wanted)
    return queues

  @staticmethod
  def _next_stage(queues: dict, outcomes: list[dict]) -> str:
    """The stage whose next escalation is the least trustworthy, over all stages."""
    return min(queues, key=lambda s: outcomes[queues[s][0]][s].priority())

  def _reserve_pack(self, stage: str, queue, texts: list[str], pool: Optional[BudgetPool],
                    billing: str = "sync") -> Optional[tuple[list[int], float]]:
    """The next pack off the front of ``queue`` and the budget it reserved: a full pack
    if the pool can reserve its strict cost, else its first record alone, else None."""
    pack = [queue[j] for j in range(min(self._models["frontier"].batch_size, len(queue)))]
    if pool is None:
      return pack, 0.0
    for candidate in (pack, pack[:1]):
      reserved = self.reservation(stage, [texts[i] for i in candidate], billing)
      if pool.try_reserve(reserved):
        return candidate, reserved
    return None

  @staticmethod
  def _take(queues: dict, stage: str, outcomes: list[dict],
            taken: Optional[tuple[list[int], float]]) -> tuple[list[int], float]:
    """Takes a reserved pack off its queue and approves it; with nothing reserved, the
    first record is skipped for the budget. Returns (approved pack, reserved)."""
    queue = queues[stage]
    if taken is None:
      outcomes[queue.popleft()][stage].budget_skipped = True
      pack, reserved = [], 0.0
    else:
      pack, reserved = taken
      for i in pack:
        queue.popleft()
        outcomes[i][stage].approved = True
    if not queue:
      del queues[stage]
    return pack, reserved

  def _frontier_batched(self, texts: list[str], outcomes: list[dict],
                          pool: Optional[BudgetPool], batch_key: Optional[str]) -> None:
    """The frontier tier through the batch API: packs are approved up front (each
    reserving its strict cost at the batch discount, least trustworthy answers first,
    interleaved over stages), submitted as batches, and settled with what they were
    billed. A pack the batches did not answer reserves the rest of its undiscounted
    strict cost before it is sent synchronously, or is not sent."""
    queues = self._escalation_queues(outcomes)
    jobs, approved = [], []
    while queues:
      stage = self._next_stage(queues, outcomes)
      queue = queues[stage]
      pack, reserved = self._take(queues, stage, outcomes,
                                  self._reserve_pack(stage, queue, texts, pool, "batch"))
      if not pack:
        continue
      jobs.append((stage, [texts[i] for i in pack]))
      approved.append((stage, pack, reserved))
    if not jobs:
      return

    def top_up(n: int) -> Optional[str]:
      if pool is None:
        return None
      stage, pack, reserved = approved[n]
      extra = self.reservation(stage, jobs[n][1]) - reserved
      if not pool.try_reserve(extra):
        return "budget cap reached"
      approved[n] = (stage, pack, reserved + extra)
      return None

    answers = self._batched("frontier", jobs, batch_key, top_up)
    for (stage, pack, reserved), first in zip(approved, answers):
      results, packed_cost, reserved_all = self._frontier_request(
          stage, [texts[i] for i in pack], pool, first=first, reserved=reserved)
      for i, outcome in zip(pack, results):
        outcomes[i][stage].frontier = outcome
      if pool is not None:
        pool.settle(reserved_all, packed_cost)


class RoutingCounters:
  """Beam metrics for routed records (updated on the bundle's thread)."""

  def __init__(self):
    c = lambda name: Metrics.counter(METRICS_NAMESPACE, name)  # noqa: E731
    self.records, self.escalated, self.approved = c("records"), c("records_escalated"), \
        c("escalations_approved")
    self.skipped, self.failed, self.retried = c("escalations_budget_skipped"), \
        c("records_failed"), c("records_retried_alone")
    self.micro_usd, self.frontier_micro_usd = c("cost_micro_usd"), c("frontier_cost_micro_usd")
    self.route_millis = c("route_millis")  # time spent routing (the model stage's span)
    # stage answers whose request the provider refused (4xx other than 429)
    self.rejected = {"small": c("small_rejected"), "frontier": c("frontier_rejected")}
    self.unverified = c("records_unverified")  # a small answer kept: the frontier failed
    self.injection = c("records_injection_suspected")
    self.budget_kept = c("records_kept_for_budget")  # a small answer kept: budget reached
    self.small_answers, self.small_failed = c("small_answers"), c("small_failed")
    self._c = c

  def count(self, routed: list[RoutedRecord], rows: list[dict]) -> None:
    self.records.inc(len(routed))
    progress.add(routed=len(routed),
                 escalated=sum(1 for r in routed if any(st.approved for st in r.stages.values())),
                 cost_usd=sum(row["cost_usd"] for row in rows),
                 frontier_usd=sum(row["frontier_cost_usd"] for row in rows))
    for rec, row in zip(routed, rows):
      sts = rec.stages.values()
      if any(st.approved for st in sts):
        self.escalated.inc()
      self.approved.inc(sum(st.approved for st in sts))
      self.skipped.inc(sum(st.budget_skipped for st in sts))
      self.retried.inc(sum(1 for st in sts if st.frontier and st.frontier.retried_alone))
      for tier, counter in self.rejected.items():
        n = sum(1 for st in sts if getattr(st, tier) is not None and getattr(st, tier).rejected)
        if n:
          counter.inc(n)
      if row["status"] == "failed":
        self.failed.inc()
      if rec.injection_suspected:
        self.injection.inc()
      why = [l["unverified_reason"] for l in row["stages"] if l["unverified_reason"]]
      if any(w != "budget cap reached" for w in why):
        self.unverified.inc()
      elif why:
        self.budget_kept.inc()
      smalls = [st.small for st in sts if st.small is not None]
      self.small_answers.inc(len(smalls))
      for small in smalls:
        if not small.ok:
          self.small_failed.inc()
          kind = small.error.partition(":")[0]
          if kind.isidentifier() and len(kind) < 32:  # a ModelCallError kind, not text
            self._c(f"small_failed.{kind}").inc()
      self.micro_usd.inc(int(round(row["cost_usd"] * 1e6)))
      self.frontier_micro_usd.inc(int(round(row["frontier_cost_usd"] * 1e6)))


def _crashed(row: Mapping[str, Any], config: RunConfig, reason: str) -> RoutedRecord:
  """A record routing could not handle at all (a bug, not a model failure): every stage
  failed with the reason, so it is written as failed and dead-lettered, not lost."""
  return RoutedRecord(dict(row), {s.name: StageOutcome(small=TierOutcome(
      "small", config.small.model, error=reason[:300])) for s in config.stages})


# --- whole batches: the pipelines' path -----------------------------------------------


class _Routed(NamedTuple):
  """A batch routed: what ``_RouteBatchFn`` emits, and what it counts on the bundle's thread."""
  batch: DecodedBatch
  routed: list
  results: list
  started: float
  finished: float


class _InFlight(NamedTuple):
  batch: DecodedBatch
  timestamp: Any
  window: Any
  pane: Any
  future: concurrent.futures.Future


class _RouteBatchFn(beam.DoFn):
  """Routes each batch; with both tiers synchronous, routes the next batches of the bundle
  while earlier ones finish (``ROUTED_AHEAD``), so the tier's request slots stay full
  across batch boundaries (partitions of any size) and reading overlaps the model calls.
  Every batch is emitted, in the order it came, by the end of its bundle."""

  def __init__(self, config: RunConfig, book: PriceBook, budget: Budget, run_id: str,
               result_avro: dict, calibration_version: Optional[str],
               batch_state_dir: Optional[str] = None, ledger: Optional[LedgerConfig] = None,
               handle_errors: bool = False):
    self._batch_state_dir = batch_state_dir
    self._ledger = ledger
    self._handle_errors = handle_errors
    self._config = config
    self._book = book
    self._budget = budget
    self._run_id = run_id
    self._result_avro = result_avro
    self._calibration = calibration_version

  def setup(self):
    self._router = Router(self._config, self._book, self._batch_state_dir,
                          self._ledger).open()
    self._arrow = schemas.to_arrow(self._result_avro)
    self._counters = RoutingCounters()
    sync = "batch" not in (self._config.small.mode, self._config.frontier.mode)
    self._ahead = concurrent.futures.ThreadPoolExecutor(
        max_workers=ROUTED_AHEAD, thread_name_prefix="tierflow-batch") if sync else None
    small = self._config.small
    self._slots = small.concurrency * small.batch_size  # records that fill the small tier
    self._in_flight: collections.deque = collections.deque()
    self._busy_until = 0.0

  def teardown(self):
    if self._ahead is not None:
      self._ahead.shutdown(wait=True, cancel_futures=True)
    self._router.close()

  def process(self, batch: DecodedBatch, timestamp=beam.DoFn.TimestampParam,
              window=beam.DoFn.WindowParam, pane=beam.DoFn.PaneInfoParam):
    if self._ahead is None:  # a batch-mode tier: one batch at a time
      yield self._count(self._route_batch(batch))
      return
    self._in_flight.append(_InFlight(batch, timestamp, window, pane,
                                     self._ahead.submit(self._route_batch, batch)))
    while self._in_flight and (self._in_flight[0].future.done() or self._wait_for_first()):
      yield self._emit(self._in_flight.popleft())

  def start_bundle(self):
    self._abandon()  # what a bundle that failed downstream of this step left in flight

  def finish_bundle(self):
    while self._in_flight:
      yield self._emit(self._in_flight.popleft())

  def _wait_for_first(self) -> bool:
    """Whether to wait for the oldest batch before taking another: when the batches behind
    it hold enough records to keep every slot of the small tier busy meanwhile, or when
    ``ROUTED_AHEAD`` are in flight."""
    if len(self._in_flight) >= ROUTED_AHEAD:
      return True
    behind = sum(b.batch.rows.num_rows for b in list(self._in_flight)[1:])
    return len(self._in_flight) > 1 and behind >= self._slots

  def _emit(self, item: _InFlight) -> WindowedValue:
    try:
      done = item.future.result()
    except BaseException:
      self._abandon()
      raise
    return WindowedValue(self._count(done), item.timestamp, (item.window,), item.pane)

  def _abandon(self) -> None:
    """A batch failed and so does the bundle: the batches routed after it finish (their
    requests are under way) and are dropped with it; the runner retries them all. (Also
    what a bundle that failed after this step, while batches were in flight, left.)"""
    while self._in_flight:
      concurrent.futures.wait([self._in_flight.popleft().future])

  def _count(self, done: _Routed) -> DecodedBatch:
    """Metrics and progress for a routed batch, on the bundle's thread (Beam's metrics
    are the bundle's); the time routing was busy counts once however batches overlap."""
    self._counters.count(done.routed, done.results)
    busy = done.finished - max(done.started, self._busy_until)
    if busy > 0:
      self._counters.route_millis.inc(int(busy * 1000))
    self._busy_until = max(self._busy_until, done.finished)
    return done.batch

  def _route_batch(self, batch: DecodedBatch) -> _Routed:
    ref = batch.ref
    rows = batch.rows.to_pylist()
    started = time.monotonic()
    pool = budget_for(self._run_id, self._budget, self._ledger, ref.end - ref.start,
                      ref.run_offsets)
    try:
      routed = self._route(rows, pool, f"{ref.topic}/{ref.partition}/{ref.start}-{ref.end}")
    finally:
      if pool is not None:
        pool.close()  # what the batch's leases did not spend goes back to the account
    finished = time.monotonic()
    results, dead = [], []
    now = int(time.time() * 1000)
    for rec in routed:
      row, failed = ledger_row(rec, self._config, self._book, self._calibration)
      results.append(row)
      if failed:
        dead.append(dead_letter(row, "route", "model_failure", row["error"] or "no answer",
                                None, row_json(rec.row), failed_at=now))
    stop_if_a_tier_is_down(routed, results, self._config, ref.name)
    table = self._table(results, routed)
    if dead:
      dead_letters = pa.concat_tables([batch.dead_letters, dead_letter_table(dead)])
    else:
      dead_letters = batch.dead_letters
    return _Routed(batch.replace(rows=table, dead_letters=dead_letters), routed, results,
                   started, finished)

  def _route(self, rows: list, pool, batch_key: str) -> list[RoutedRecord]:
    """Routes the batch; an error in code raises (the bundle fails), unless errors are
    handled: then each record is routed alone, a record that still fails alone fails
    with the reason (it never stops the run), and if every one does, the error is not a
    record's and it raises (nothing is written)."""
    try:
      return self._router.route(rows, pool, batch_key=batch_key)
    except TierUnavailable:
      raise
    except Exception as e:  # noqa: BLE001 - find the record(s) at fault
      if (not self._handle_errors or len(rows) < 2
          or "batch" in (self._config.small.mode, self._config.frontier.mode)):
        raise
      _LOGGER.warning("routing batch %s failed (%s: %s); routing its records one by one",
                      batch_key, type(e).__name__, e)
      out, crashed = [], 0
      for row in rows:
        try:
          out += self._router.route([row], pool)
        except TierUnavailable:
          raise
        except Exception as alone:  # noqa: BLE001 - this record's own failure
          crashed += 1
          out.append(_crashed(row, self._config, f"routing failed on this record: "
                                                 f"{type(alone).__name__}: {alone}"))
      if crashed == len(rows):
        raise
      return out

  def _table(self, results: list[dict], routed: list[RoutedRecord]) -> pa.Table:
    """The result rows as Arrow; a row Arrow refuses raises, or with errors handled is
    written as failed, with why."""
    try:
      return pa.Table.from_pylist(results, schema=self._arrow)
    except Exception:  # noqa: BLE001 - find the row(s) at fault
      if not self._handle_errors:
        raise
    tables = []
    for row, rec in zip(results, routed):
      try:
        tables.append(pa.Table.from_pylist([row], schema=self._arrow))
      except Exception as e:  # noqa: BLE001
        bad, _ = ledger_row(_crashed(rec.row, self._config,
                                     f"result not writable: {type(e).__name__}: {e}"),
                            self._config, self._book, self._calibration)
        tables.append(pa.Table.from_pylist([bad], schema=self._arrow))
    return pa.concat_tables(tables)


def stop_if_a_tier_is_down(routed: Sequence[RoutedRecord], rows: Sequence[Mapping[str, Any]],
                           config: RunConfig, batch: str) -> None:
  """Raises ``TierUnavailable`` when records failed (or stayed unverified) because a tier
  failed for a cause that is not theirs (``llm_clients.systemic``): written as failed,
  they would be committed past and never retried."""
  hit = []
  for rec, row in zip(routed, rows):
    if row["status"] == "ok":
      continue
    for stage in config.stages:
      st = rec.stages[stage.name]
      if st.final is not None and not (st.final.tier == "small" and st.reason
                                       and not st.budget_skipped):
        continue  # this stage is answered (or kept for the budget): not what failed
      for tier in ("frontier", "small"):
        outcome = getattr(st, tier)
        if outcome is not None and systemic(outcome.error):
          hit.append((tier, outcome.error))
  if not hit:
    return
  tier, error = hit[0]
  model = getattr(config, tier)
  raise TierUnavailable(
      f"{tier} tier ({model.model} at {model.endpoint_host}) failed {len(hit)} stage answer(s) of batch "
      f"{batch} for a cause that is not the records': {error[:300]}. Nothing of the batch "
      "was written or committed; the next run retries it")


class RouteBatches(beam.PTransform):
  """Routes the rows of ``DecodedBatch``es; emits them with result rows instead, and with
  records that failed in the model stages added to their dead letters.

  Args:
    config: the run config (models, stages, thresholds).
    price_book: prices (default: the bundled book).
    input_row_schema: Avro schema of the incoming rows (``DecodeBatches.row_schema``).
    budget: the frontier spend cap (see ``tierflow.pipelines.budget``).
    calibration_version: written on every row.
    batch_state_dir: where a batch-mode tier keeps its submitted batch ids (any Beam
      filesystem; one small file per offset batch and tier), so a re-run of a killed
      run polls them instead of paying twice. Required when a tier is in batch mode.
    ledger: the ledger (``kafka_ledger.LedgerConfig``) every worker process shares: the
      budget's account and the models' rpm/tpm windows. Required for a shared budget;
      without it rate limits apply per process.

  Provider failures (timeouts, 5xx after retries, refused requests, the budget cap) are
  data: their records come out with status ``failed`` or ``unverified`` and the reason,
  and failed ones are added to the batch's dead letters. An error in code raises, and the
  bundle fails, unless ``.with_exception_handling()`` was called (the ``tierflow run``
  pipelines call it): then the records it hits are written as failed and dead-lettered
  with the reason.
  """

  def __init__(self, config: RunConfig, price_book: Optional[PriceBook] = None, *,
               input_row_schema: Mapping[str, Any], budget: Budget = Budget(),
               calibration_version: Optional[str] = None,
               batch_state_dir: Optional[str] = None, ledger: Optional[LedgerConfig] = None):
    super().__init__()
    check_budget(budget, ledger)
    self._ledger = ledger
    if batch_state_dir is None and "batch" in (config.small.mode, config.frontier.mode):
      raise ValueError("a tier in batch mode needs batch_state_dir (where batch ids are "
                       "kept, so a re-run never pays twice)")
    self._batch_state_dir = batch_state_dir
    self._book = price_book or load_price_book(config.price_book)
    Router(config, self._book)  # validates prices now
    self._config = config
    self._budget = budget
    self._calibration = calibration_version
    self._result_avro = result_schema(input_row_schema, config)
    self._run_id = uuid.uuid4().hex
    self._handle_errors = False

  def with_exception_handling(self) -> "RouteBatches":
    """Records an error in code hits are written as failed with the reason (dead-lettered)
    instead of failing the bundle; see the class docstring."""
    self._handle_errors = True
    return self

  @property
  def result_schema(self) -> dict:
    return self._result_avro

  def expand(self, batches):
    return batches | "Route" >> beam.ParDo(_RouteBatchFn(
        self._config, self._book, self._budget, self._run_id, self._result_avro,
        self._calibration, self._batch_state_dir, self._ledger,
        self._handle_errors)).with_output_types(DecodedBatch)
