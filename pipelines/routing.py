"""Small tier first, frontier for the uncertain: the model stages as Beam transforms.

``RouteThroughTiers`` composes, per record (a dict row)::

    small stage 1 .. n  (RunInference + StageModelHandler, batched and packed)
      -> decide escalations (confidence < threshold, or the small call failed)
      -> budget gate (one stateful key: reserves a worst-case frontier cost per
         escalation and skips, marked, once the run's budget would be exceeded)
      -> frontier stages (RunInference again, only for the escalated stages)
      -> ledger (outputs, tokens and cost per stage and tier, frontier-only cost)

Each stage handler is a Beam ``RemoteModelHandler``: RunInference supplies
``BatchElements`` batching, client lifecycle, throttling and metrics; the
handler packs ``batch_size`` records per request, keeps ``concurrency``
requests in flight, and turns every per-request or per-record failure into a
per-record outcome rather than failing the batch. On the frontier tier, a
record that fails inside a packed answer (its line missing, malformed or cut
off) is retried once in a request of its own before it counts as failed; its
ledger adds the tokens and cost of both attempts.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
from typing import Any, Iterable, Mapping, Optional, Sequence

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.coders import FloatCoder
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import PredictionResult, RemoteModelHandler, RunInference
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from tierflow.config import ModelConfig, RunConfig, StageConfig
from tierflow.connectors.llm_clients import ModelCallError, ModelClient, estimate_tokens
from tierflow.pipelines.stages import (STATE_KEY, build_prompt, parse_reply, render_text,
                                       split_usage)
from tierflow.prices import PriceBook, Usage

__all__ = ["RouteThroughTiers", "StageModelHandler", "render_text", "STATE_KEY"]

_LOGGER = logging.getLogger(__name__)

FAILED = "failed"


def _state(row: dict) -> dict:
  return row.setdefault(STATE_KEY, {"stages": {}})


def _stage_state(row: dict, name: str) -> dict:
  return _state(row)["stages"].setdefault(name, {})


class StageModelHandler(RemoteModelHandler):
  """Runs one stage on one tier over a batch of rows.

  ``tier="frontier"`` handles only rows whose stage was escalated and approved
  by the budget gate; other rows pass through with no outcome.
  """

  def __init__(self, stage: StageConfig, model: ModelConfig, tier: str, text_template: str,
               price_book: PriceBook, *, streaming: bool = False):
    super().__init__(namespace=f"tierflow.{tier}.{stage.name}", num_retries=0,
                     throttle_delay_secs=1)
    self._stage, self._model, self._tier = stage, model, tier
    self._text_template = text_template
    self._price = price_book.price(model.price_key)
    self._streaming = streaming

  def create_client(self) -> ModelClient:
    return ModelClient(self._model)

  def batch_elements_kwargs(self) -> Mapping[str, Any]:
    # Batches within a bundle, streaming too: RunInference's stateful batching
    # (max_batch_duration_secs) flushes on processing-time timers, which Beam's
    # local FnApiRunner leaves pending at the end of a run ("time-pending
    # bundles did not execute"). Batches are stamped at the end of the window;
    # _MergeOutcome puts each row back at its own event time.
    return {"min_batch_size": 1,
            "max_batch_size": self._model.batch_size * self._model.concurrency}

  def _wanted(self, row: Mapping[str, Any]) -> bool:
    if self._tier == "small":
      return True
    st = row.get(STATE_KEY, {}).get("stages", {}).get(self._stage.name, {})
    return bool(st.get("approved"))

  def request(self, batch: Sequence[dict], client: ModelClient,
              inference_args: Optional[dict] = None) -> list:
    wanted = [i for i, row in enumerate(batch) if self._wanted(row)]
    outcomes: list = [None] * len(batch)
    size = self._model.batch_size
    packs = [wanted[i:i + size] for i in range(0, len(wanted), size)]
    if not packs:
      return [PredictionResult(row, None) for row in batch]
    with concurrent.futures.ThreadPoolExecutor(
        max_workers=min(self._model.concurrency, len(packs))) as pool:
      for pack, results in zip(packs, pool.map(
          lambda p: self._call(client, [batch[i] for i in p]), packs)):
        for i, outcome in zip(pack, results):
          outcomes[i] = outcome
    retried = sum(1 for o in outcomes if o and o.get("retried_alone"))
    if retried:  # counted here: metrics updated in the pool's threads are lost
      Metrics.counter(self.get_metrics_namespace(), "records_retried_alone").inc(retried)
    return [PredictionResult(row, outcome) for row, outcome in zip(batch, outcomes)]

  def _call(self, client: ModelClient, rows: Sequence[dict]) -> list[dict]:
    """One request for ``rows``. On the frontier tier, a record that fails inside a
    packed answer (missing, malformed, cut off) is retried once in a request of
    its own; its ledger carries both attempts."""
    outcomes, answered = self._request(client, rows)
    if self._tier != "frontier" or len(rows) < 2 or not answered:
      return outcomes
    return [self._retry_alone(client, row, first) if first.get("error") else first
            for row, first in zip(rows, outcomes)]

  def _retry_alone(self, client: ModelClient, row: dict, first: dict) -> dict:
    [second], _ = self._request(client, [row])
    usage = _usage(first["usage"]) + _usage(second["usage"])
    merged = {**second, "usage": _usage_dict(usage),
              "cost_usd": first["cost_usd"] + second["cost_usd"], "retried_alone": True}
    if second.get("error"):
      merged["error"] = f"{first['error']}; retried alone: {second['error']}"
    else:
      merged["notes"] = [f"retried alone after: {first['error'][:160]}",
                         *second.get("notes", ())]
    return merged

  def _request(self, client: ModelClient, rows: Sequence[dict]) -> tuple[list[dict], bool]:
    """(one outcome per row, whether the endpoint answered at all)."""
    texts = [render_text(self._text_template, r) for r in rows]
    system, user = build_prompt(self._stage, texts, verbalise=not self._model.logprobs)
    max_tokens = self._stage.output_tokens_per_record() * len(rows) + 16
    base = {"tier": self._tier, "model": self._model.model}
    try:
      # Only classify reads alternatives (the first token's, when an answer strays
      # from the label set); the other stages need just the chosen tokens' logprobs,
      # which llama.cpp only returns with top_logprobs >= 1 (it defaults to 20).
      reply = client.complete(system, user, max_tokens,
                              top_logprobs=None if self._stage.kind == "classify" else 1)
    except ModelCallError as e:
      return [{**base, "error": str(e), "usage": _usage_dict(Usage()), "cost_usd": 0.0}
              for _ in rows], False
    answers = parse_reply(self._stage, reply, texts)
    framing = max(0, len(reply.text) - sum(a.answer_chars for a in answers))
    shares = split_usage(reply.usage, [len(t) for t in texts], len(system) + len(user) - sum(
        len(t) for t in texts), [a.answer_chars for a in answers], framing)
    out = []
    for answer, share in zip(answers, shares):
      out.append({
          **base, "model": reply.model or self._model.model,
          "value": answer.value, "confidence": answer.confidence, "signal": answer.signal,
          "notes": list(answer.notes), "error": answer.error,
          "usage": _usage_dict(share), "cost_usd": self._price.cost(share),
      })
    return out, True

  def get_metrics_namespace(self) -> str:
    return f"tierflow.{self._tier}.{self._stage.name}"


def _usage_dict(u: Usage) -> dict:
  return {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
          "cache_read_tokens": u.cache_read_tokens, "cache_write_tokens": u.cache_write_tokens}


def _usage(d: Optional[Mapping[str, int]]) -> Usage:
  return Usage(**d) if d else Usage()


class _KeepEventTime(beam.DoFn):
  """Notes each row's event time, which batching for the model calls loses."""

  def process(self, row, ts=beam.DoFn.TimestampParam):
    row = dict(row)
    row[STATE_KEY] = {"stages": {}, "ts_micros": Timestamp.of(ts).micros}
    yield row


def _at_event_time(row: dict):
  micros = row.get(STATE_KEY, {}).get("ts_micros")
  return row if micros is None else TimestampedValue(row, Timestamp(micros=micros))


class _MergeOutcome(beam.DoFn):
  def __init__(self, stage: str, tier: str):
    self._stage, self._tier = stage, tier

  def process(self, result):
    row = dict(result.example)
    row[STATE_KEY] = json.loads(json.dumps(row.get(STATE_KEY, {"stages": {}})))
    if result.inference is not None:
      _stage_state(row, self._stage)[self._tier] = result.inference
    yield _at_event_time(row)


def _run_stage(pcoll, label: str, handler: StageModelHandler, stage: str, tier: str):
  main, dlq = pcoll | f"{label}Infer" >> RunInference(handler).with_exception_handling()
  merged = main | f"{label}Merge" >> beam.ParDo(_MergeOutcome(stage, tier))
  crashed = dlq.failed_inferences | f"{label}Crashed" >> beam.FlatMap(_crashed_rows, stage, tier)
  return (merged, crashed) | f"{label}All" >> beam.Flatten()


def _crashed_rows(failed, stage: str, tier: str) -> Iterable[dict]:
  """A handler bug (not a model failure) fails each row of the batch, loudly."""
  batch, exc = failed if isinstance(failed, tuple) else (failed.batch, failed.exception)
  _LOGGER.error("stage %s/%s crashed on a batch of %d: %r", stage, tier, len(batch), exc)
  for row in batch:
    row = dict(row)
    row[STATE_KEY] = json.loads(json.dumps(row.get(STATE_KEY, {"stages": {}})))
    _stage_state(row, stage)[tier] = {"tier": tier, "model": "", "error": f"crash: {exc!r}"[:300],
                                      "usage": _usage_dict(Usage()), "cost_usd": 0.0}
    yield _at_event_time(row)


class _DecideEscalations(beam.DoFn):
  def __init__(self, config: RunConfig):
    self._config = config

  def process(self, row: dict):
    for stage in self._config.stages:
      st = _stage_state(row, stage.name)
      small = st.get("small") or {}
      if small.get("error"):
        st["reason"] = f"small tier failed ({small['error'][:120]})"
      elif small.get("confidence") is None:
        st["reason"] = "no confidence signal"
      elif small["confidence"] < stage.threshold:
        st["reason"] = f"confidence {small['confidence']:.3f} < {stage.threshold:.3f}"
    yield row


def needs_frontier(row: Mapping[str, Any]) -> bool:
  return any(st.get("reason") for st in row[STATE_KEY]["stages"].values())


class _BudgetGate(beam.DoFn):
  """Approves escalations while the run's reserved frontier spend stays under budget.

  A single key, so decisions are serialised. Each escalation reserves a
  worst-case cost: a generous token estimate of its prompt share (UTF-8
  bytes / 3) at the higher of the input and cache-write prices, and the full
  output allowance at the output price; when frontier requests are packed,
  plus the same for a request of its own (the retry of a record that fails
  inside a packed answer). Realised cost stays under the reservation, so the
  cap holds; unspent reservations are not reused.
  """
  RESERVED = ReadModifyWriteStateSpec("reserved_usd", FloatCoder())

  def __init__(self, config: RunConfig, price_book: PriceBook):
    self._config = config
    self._price = price_book.price(config.frontier.price_key)
    self._skipped = Metrics.counter("tierflow.budget", "escalations_skipped")
    self._approved = Metrics.counter("tierflow.budget", "escalations_approved")

  def _worst_case(self, stage: StageConfig, row: Mapping[str, Any]) -> float:
    text = render_text(self._config.text, row)
    system, user = build_prompt(stage, [text])
    batch_size = max(1, self._config.frontier.batch_size)
    in_tokens = estimate_tokens(system) // batch_size + estimate_tokens(user)
    out_tokens = stage.output_tokens_per_record() + 16
    if batch_size > 1:  # a retry alone: the whole prompt, its own output allowance
      in_tokens += estimate_tokens(system) + estimate_tokens(user)
      out_tokens += stage.output_tokens_per_record() + 16
    in_price = max(self._price.input, self._price.cache_write or 0.0)
    return (in_tokens * in_price + out_tokens * self._price.output) / 1e6

  def process(self, keyed, reserved=beam.DoFn.StateParam(RESERVED)):
    _, row = keyed
    budget = self._config.budget_usd
    spent = reserved.read() or 0.0
    for stage in self._config.stages:
      st = row[STATE_KEY]["stages"][stage.name]
      if not st.get("reason"):
        continue
      cost = self._worst_case(stage, row)
      if budget is None or spent + cost <= budget:
        spent += cost
        st["approved"] = True
        self._approved.inc()
      else:
        st["budget_skipped"] = True
        self._skipped.inc()
    reserved.write(spent)
    yield row


class _Ledger(beam.DoFn):
  """Final outputs and the cost ledger; failed records also go to the dead letters."""

  def __init__(self, config: RunConfig, price_book: PriceBook, calibration_version: Optional[str]):
    self._config = config
    self._book = price_book
    self._frontier_price = price_book.price(config.frontier.price_key)
    self._calibration = calibration_version
    self._records = Metrics.counter("tierflow.ledger", "records")
    self._escalated = Metrics.counter("tierflow.ledger", "records_escalated")
    self._failed = Metrics.counter("tierflow.ledger", "records_failed")
    self._micro_usd = Metrics.counter("tierflow.ledger", "cost_micro_usd")

  def process(self, row: dict):
    state = row.pop(STATE_KEY)
    out = dict(row)
    ledgers, reasons, errors = [], [], []
    totals = dict(cost=0.0, small=0.0, frontier=0.0, frontier_only=0.0, tin=0, tout=0)
    outputs = {"label": None, "label_confidence": None, "extraction": None,
               "extraction_confidence": None, "summary": None, "summary_confidence": None}
    for stage in self._config.stages:
      st = state["stages"].get(stage.name, {})
      small = st.get("small") or {}
      frontier = st.get("frontier") or {}
      su, fu = _usage(small.get("usage")), _usage(frontier.get("usage"))
      final = None
      if frontier and not frontier.get("error"):
        final = frontier
      elif not small.get("error") and small:
        final = small  # confident, or escalation skipped/failed: keep the small answer
      reason = st.get("reason")
      if reason:
        note = reason
        if st.get("budget_skipped"):
          note += "; skipped: budget cap reached"
        elif frontier.get("error"):
          note += f"; frontier failed ({frontier['error'][:120]})"
        reasons.append(f"{stage.name}: {note}")
      if final is None:
        errors.append(f"{stage.name}: " + (frontier.get("error") or small.get("error")
                                           or ("budget cap reached" if st.get("budget_skipped")
                                               else "no answer")))
      small_cost, frontier_cost = small.get("cost_usd", 0.0), frontier.get("cost_usd", 0.0)
      # What this stage would have cost on the frontier alone: its actual
      # frontier cost when it went there, else the small tier's tokens at
      # frontier prices.
      frontier_only = frontier_cost if frontier and not frontier.get("error") \
          else self._frontier_price.cost(su)
      stage_cost = small_cost + frontier_cost
      totals["cost"] += stage_cost
      totals["small"] += small_cost
      totals["frontier"] += frontier_cost
      totals["frontier_only"] += frontier_only
      totals["tin"] += su.prompt_tokens + fu.prompt_tokens
      totals["tout"] += su.output_tokens + fu.output_tokens
      if final is not None:
        self._set_output(outputs, stage, final, small)
      ledgers.append({
          "stage": stage.name, "kind": stage.kind,
          "final_tier": final.get("tier") if final else None,
          "final_model": final.get("model") if final else None,
          "confidence": small.get("confidence"), "confidence_signal": small.get("signal") or None,
          "threshold": float(stage.threshold), "escalated": bool(st.get("approved")),
          "escalation_reason": reason, "budget_skipped": bool(st.get("budget_skipped")),
          "small_model": small.get("model", self._config.small.model),
          "small_input_tokens": su.input_tokens, "small_output_tokens": su.output_tokens,
          "small_cache_read_tokens": su.cache_read_tokens,
          "small_cache_write_tokens": su.cache_write_tokens,
          "small_cost_usd": small_cost, "small_answer": _answer_text(stage, small),
          "small_error": small.get("error"),
          "frontier_model": frontier.get("model") if frontier else None,
          "frontier_input_tokens": fu.input_tokens, "frontier_output_tokens": fu.output_tokens,
          "frontier_cache_read_tokens": fu.cache_read_tokens,
          "frontier_cache_write_tokens": fu.cache_write_tokens,
          "frontier_cost_usd": frontier_cost, "frontier_error": frontier.get("error"),
          "cost_usd": stage_cost, "frontier_only_cost_usd": frontier_only,
      })
    escalated = any(l["escalated"] for l in ledgers)
    out.update(outputs)
    out.update({
        "status": "failed" if errors else "ok",
        "error": "; ".join(errors)[:2000] if errors else None,
        "escalated": escalated, "escalation_reasons": reasons,
        "budget_skipped": any(l["budget_skipped"] for l in ledgers),
        "cost_usd": totals["cost"], "small_cost_usd": totals["small"],
        "frontier_cost_usd": totals["frontier"],
        "frontier_only_cost_usd": totals["frontier_only"],
        "input_tokens": totals["tin"], "output_tokens": totals["tout"],
        "stages": ledgers, "price_book_version": self._book.version,
        "calibration_version": self._calibration,
    })
    self._records.inc()
    self._micro_usd.inc(int(round(totals["cost"] * 1e6)))
    if escalated:
      self._escalated.inc()
    if errors:
      self._failed.inc()
      yield pvalue.TaggedOutput(FAILED, out)
    yield out

  @staticmethod
  def _set_output(outputs: dict, stage: StageConfig, final: Mapping, small: Mapping) -> None:
    conf = final.get("confidence") if final.get("tier") == "small" else None
    if stage.kind == "classify":
      outputs["label"], outputs["label_confidence"] = final.get("value"), conf
    elif stage.kind == "extract":
      value = final.get("value") or {}
      outputs["extraction"] = json.dumps(value.get("fields"), ensure_ascii=False, sort_keys=True)
      outputs["extraction_confidence"] = conf
    else:
      outputs["summary"], outputs["summary_confidence"] = final.get("value"), conf


def _answer_text(stage: StageConfig, outcome: Mapping) -> Optional[str]:
  if not outcome or outcome.get("error") or outcome.get("value") is None:
    return None
  value = outcome["value"]
  if stage.kind == "extract":
    return json.dumps(value.get("fields"), ensure_ascii=False, sort_keys=True)
  return str(value)


class RouteThroughTiers(beam.PTransform):
  """Rows in; (ledgered result rows, failed result rows) out. See the module docstring."""

  def __init__(self, config: RunConfig, price_book: PriceBook, *, streaming: bool = False,
               calibration_version: Optional[str] = None):
    super().__init__()
    for model in (config.small, config.frontier):
      price_book.price(model.price_key)  # fail at construction, not on a worker
    self._config = config
    self._book = price_book
    self._streaming = streaming
    self._calibration = calibration_version

  def _handler(self, stage: StageConfig, tier: str) -> StageModelHandler:
    model = self._config.small if tier == "small" else self._config.frontier
    return StageModelHandler(stage, model, tier, self._config.text, self._book,
                             streaming=self._streaming)

  def expand(self, rows):
    c = self._config
    rows = rows | "KeepEventTime" >> beam.ParDo(_KeepEventTime())
    for stage in c.stages:
      rows = _run_stage(rows, f"Small_{stage.name}_", self._handler(stage, "small"),
                        stage.name, "small")
    decided = rows | "DecideEscalations" >> beam.ParDo(_DecideEscalations(c))
    confident, uncertain = decided | "SplitByNeed" >> beam.Partition(
        lambda row, _: 1 if needs_frontier(row) else 0, 2)
    gated = (uncertain
             | "KeyForBudget" >> beam.Map(lambda row: ("budget", row))
             | "BudgetGate" >> beam.ParDo(_BudgetGate(c, self._book)))
    for stage in c.stages:
      gated = _run_stage(gated, f"Frontier_{stage.name}_", self._handler(stage, "frontier"),
                         stage.name, "frontier")
    ledgered = ((confident, gated)
                | "Rejoin" >> beam.Flatten()
                | "Ledger" >> beam.ParDo(_Ledger(c, self._book, self._calibration)
                                         ).with_outputs(FAILED, main="results"))
    return ledgered.results, ledgered[FAILED]
