"""Typed per-record routing outcomes, and the result rows and schema built from them.

A ``RoutedRecord`` is a record with, per stage, a ``StageOutcome``: what the
small tier answered (``TierOutcome``), why the stage escalated (if it did),
whether the budget approved it, and what the frontier tier answered. The ledger
turns it into a result row: the kept answers (one column set per stage kind),
status, escalation, tokens and cost per stage and tier, and the frontier-only
cost estimate.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional

from tierflow import schemas
from tierflow.prices import PriceBook, Usage

__all__ = ["SMALL_SKIPPED", "RoutedRecord", "StageOutcome", "TierOutcome", "ledger_row", "result_schema",
           "routed_part"]

# The escalation reason of a stage the small tier was not asked (``RunConfig.small_skipped``:
# ``--skip-small-when-uncertified``); the report and calibration read its first words.
SMALL_SKIPPED = ("small tier skipped: the stage escalates every record (threshold inf: no "
                 "threshold certified)")
SMALL_SKIPPED_PREFIX = "small tier skipped"


@dataclasses.dataclass
class TierOutcome:
  """One tier's answer for one record and stage, or its failure (``error``)."""
  tier: str
  model: str
  value: Any = None
  confidence: Optional[float] = None
  signal: str = ""
  notes: tuple = ()
  error: Optional[str] = None
  usage: Usage = Usage()
  cost_usd: float = 0.0
  retried_alone: bool = False
  billing: str = "sync"  # or "batch": the provider's batch API, at its discount
  # With several ``samples`` usage and cost are their sum; this is the kept answer's own.
  sample_usage: Optional[Usage] = None

  @property
  def ok(self) -> bool:
    return self.error is None

  @property
  def rejected(self) -> bool:
    """The provider refused the request itself (4xx other than 429: a parameter the
    model does not take, a bad key): a setup problem, not a hard record."""
    return self.error is not None and self.error.startswith(
        ("bad_request:", "auth:", "not_found:"))


@dataclasses.dataclass
class StageOutcome:
  """What happened to one stage of one record."""
  small: Optional[TierOutcome] = None
  frontier: Optional[TierOutcome] = None
  reason: Optional[str] = None  # why it escalates; None: the small answer stands
  approved: bool = False  # the budget let it go to the frontier tier
  budget_skipped: bool = False
  score: Optional[float] = None  # a learned router's score, when one decided

  @property
  def final(self) -> Optional[TierOutcome]:
    """The answer kept: the frontier's when it answered, else the small tier's."""
    if self.frontier is not None and self.frontier.ok:
      return self.frontier
    if self.small is not None and self.small.ok:
      return self.small
    return None

  def priority(self) -> tuple:
    """Escalations with the least trustworthy small answer first (for the budget)."""
    small = self.small
    if small is None or not small.ok or small.confidence is None:
      return (0, 0.0)
    return (1, small.confidence if self.score is None else self.score)


@dataclasses.dataclass
class RoutedRecord:
  row: dict
  stages: dict  # stage name -> StageOutcome
  injection_suspected: bool = False  # the text holds instructions addressed to a model


def routed_part(config) -> dict:
  """The Avro record of what routing adds to a row for this run config: status, each
  stage's output columns (from its kind), then escalation, cost and the ledger."""
  base = schemas.load("result")
  head = [f for f in base["fields"] if f["name"] in ("status", "error")]
  tail = [f for f in base["fields"] if f["name"] not in ("status", "error")]
  outputs = [f for stage in config.stages for f in stage.kind_impl.output_fields()]
  fields = head + outputs + tail
  names = [f["name"] for f in fields]
  clash = sorted({n for n in names if names.count(n) > 1})
  if clash:
    raise ValueError(f"stage output column(s) {clash} clash with the result's own columns: "
                     "give the stage another output: NAME")
  return {**base, "fields": fields}


def result_schema(input_row_schema: Mapping[str, Any], config) -> dict:
  """The Avro schema of result rows: the input rows' fields, then ``routed_part``;
  ValueError when the config's input template names a field the input rows lack."""
  from tierflow.pipelines.prompts import template_fields
  unknown = sorted(template_fields(config.text) - set(schemas.field_names(input_row_schema)))
  if unknown:
    raise ValueError(f"the input template {config.text!r} names {', '.join(unknown)}, not a "
                     f"field of {input_row_schema.get('name')}")
  return schemas.compose(f"{input_row_schema['name'].removesuffix('Row')}Result",
                         input_row_schema, routed_part(config))


def ledger_row(routed: RoutedRecord, config, book: PriceBook,
               calibration_version: Optional[str]) -> tuple[dict, bool]:
  """(the result row, whether the record failed: a stage with no answer at all)."""
  frontier_price = book.price(config.frontier.price_key)
  out = dict(routed.row)
  ledgers, reasons, errors, unverified = [], [], [], []
  totals = dict(cost=0.0, small=0.0, frontier=0.0, frontier_only=0.0, tin=0, tout=0)
  for stage in config.stages:
    kind = stage.kind_impl
    st = routed.stages.get(stage.name) or StageOutcome()
    small, frontier = st.small, st.frontier
    su = small.usage if small else Usage()
    fu = frontier.usage if frontier else Usage()
    final = st.final
    if st.reason:
      note = st.reason
      if st.budget_skipped:
        note += "; skipped: budget cap reached"
      elif frontier is not None and not frontier.ok:
        note += f"; frontier failed ({frontier.error[:120]})"
      reasons.append(f"{stage.name}: {note}")
    if final is None:
      why = ((frontier.error if frontier is not None else None)
             or (small.error if small is not None else None)
             or ("budget cap reached" if st.budget_skipped else "no answer"))
      errors.append(f"{stage.name}: {why}")
    unverified_reason = None
    if final is not None and final.tier == "small" and st.reason:
      # The small answer fell short and the frontier did not check it: kept, not ok.
      unverified_reason = ("budget cap reached" if st.budget_skipped else
                           f"frontier failed ({frontier.error[:160]})"
                           if frontier is not None and not frontier.ok else "not escalated")
      unverified.append(f"{stage.name}: {unverified_reason}")
    small_cost = small.cost_usd if small else 0.0
    frontier_cost = frontier.cost_usd if frontier else 0.0
    # What this stage would have cost on the frontier alone: its actual frontier cost
    # when it went there, else the small tier's tokens at frontier prices.
    # (One answer's tokens: with several samples, the kept one's.)
    frontier_only = frontier_cost if (frontier is not None and frontier.ok) \
        else frontier_price.cost((small.sample_usage if small else None) or su,
                                 batch_api=bool(small and small.billing == "batch"))
    stage_cost = small_cost + frontier_cost
    totals["cost"] += stage_cost
    totals["small"] += small_cost
    totals["frontier"] += frontier_cost
    totals["frontier_only"] += frontier_only
    totals["tin"] += su.prompt_tokens + fu.prompt_tokens
    totals["tout"] += su.output_tokens + fu.output_tokens
    kept_conf = final.confidence if (final is not None and final.tier == "small") else None
    out.update(kind.outputs(final.value if final is not None else None, kept_conf))
    ledgers.append({
        "stage": stage.name, "kind": stage.kind, "output": kind.output,
        "final_tier": final.tier if final else None,
        "final_model": final.model if final else None,
        "confidence": small.confidence if small else None,
        "confidence_signal": (small.signal or None) if small else None,
        "threshold": float(stage.threshold), "route_score": st.score,
        "escalated": st.approved,
        "escalation_reason": st.reason, "budget_skipped": st.budget_skipped,
        "unverified_reason": unverified_reason,
        "small_model": small.model if small else config.small.model,
        "small_endpoint": config.small.endpoint_host,
        "small_input_tokens": su.input_tokens, "small_output_tokens": su.output_tokens,
        "small_cache_read_tokens": su.cache_read_tokens,
        "small_cache_write_tokens": su.cache_write_tokens,
        "small_reasoning_tokens": su.reasoning_tokens,
        "small_cost_usd": small_cost,
        "small_billing_mode": small.billing if small else None,
        "small_answer": kind.answer_text(small.value) if (small and small.ok) else None,
        "small_field_confidence": (kind.field_confidence_text(small.value)
                                   if (small and small.ok) else None),
        "small_error": small.error if small else None,
        "frontier_model": frontier.model if frontier else None,
        "frontier_endpoint": config.frontier.endpoint_host if frontier else None,
        "frontier_input_tokens": fu.input_tokens, "frontier_output_tokens": fu.output_tokens,
        "frontier_cache_read_tokens": fu.cache_read_tokens,
        "frontier_cache_write_tokens": fu.cache_write_tokens,
        "frontier_reasoning_tokens": fu.reasoning_tokens,
        "frontier_cost_usd": frontier_cost,
        "frontier_billing_mode": frontier.billing if frontier else None,
        "frontier_error": frontier.error if frontier else None,
        "cost_usd": stage_cost, "frontier_only_cost_usd": frontier_only,
    })
  status = "failed" if errors else "unverified" if unverified else "ok"
  out.update({
      "status": status,
      "error": ("; ".join(errors)[:2000] if errors else
                "unverified: " + "; ".join(unverified)[:2000] if unverified else None),
      "escalated": any(l["escalated"] for l in ledgers), "escalation_reasons": reasons,
      "budget_skipped": any(l["budget_skipped"] for l in ledgers),
      "injection_suspected": routed.injection_suspected,
      "cost_usd": totals["cost"], "small_cost_usd": totals["small"],
      "frontier_cost_usd": totals["frontier"],
      "frontier_only_cost_usd": totals["frontier_only"],
      "input_tokens": totals["tin"], "output_tokens": totals["tout"],
      "stages": ledgers, "price_book_version": book.version,
      "calibration_version": calibration_version,
  })
  return out, bool(errors)


def row_json(row: Mapping[str, Any]) -> bytes:
  """A row as JSON bytes (dead letters keep the record so it can be replayed)."""
  return json.dumps(row, default=str, sort_keys=True, ensure_ascii=False).encode(
      "utf-8", "replace")
