"""Forecasting a bounded run before it starts: its cost, escalation share and frontier spend,
with intervals, from a calibration sample on which both tiers ran.

``sample_block`` reads an escalate-all run of the sample (``tierflow calibrate --reference
frontier`` makes one) and keeps, per record, what routing at the run's thresholds would
have cost: the small tier on every stage, the frontier's billed cost on the stages that
would escalate (confidence below the threshold, no confidence, a failed small answer, or
a record holding instructions to a model). Only the means and standard deviations are
kept, in the calibration file (``forecast``). ``forecast`` scales them to a range of N
records with a predictive interval that covers both the sample's uncertainty about the
mean and the N records' own spread: total ~ N·m ± z·s·sqrt(N + N²/n).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Mapping, Optional

import numpy as np

from tierflow.results import is_null, read_run

__all__ = ["LEVEL", "sample_block", "forecast", "count_records", "format_forecast"]

LEVEL = 0.95
_PER_RECORD = ("cost_usd", "frontier_usd", "escalated", "frontier_only_usd")


def _mean_sd(x: np.ndarray) -> list[float]:
  return [float(np.mean(x)), float(np.std(x, ddof=1)) if len(x) > 1 else 0.0]


def sample_block(output_dir: str, thresholds: Mapping[str, float]) -> dict:
  """Per-record cost of routing the sample at ``thresholds`` (stage -> threshold; a stage
  not named escalates everything), from an output where every stage went to the frontier."""
  run = read_run(output_dir)
  n = run.n
  if n < 2:
    raise ValueError("a forecast needs at least 2 sampled records")
  cost, frontier, only = np.zeros(n), np.zeros(n), np.zeros(n)
  escalated = np.zeros(n, dtype=bool)
  injected = np.array([bool(v) for v in run.records["injection_suspected"]])
  stages = {}
  for s in run.stages:
    p = s.present
    conf = s.col("confidence")
    t = float(thresholds.get(s.name, math.inf))
    forced = np.isnan(conf) | ~is_null(s.col("small_error")) | injected
    esc = p & (forced | ~(np.nan_to_num(conf, nan=-1.0) >= t))
    small = np.nan_to_num(s.col("small_cost_usd"))
    billed = np.nan_to_num(s.col("frontier_cost_usd"))
    cost += np.where(p, small + np.where(esc, billed, 0.0), 0.0)
    frontier += np.where(esc, billed, 0.0)
    only += np.where(p, billed, 0.0)
    escalated |= esc
    stages[s.name] = {"threshold": "inf" if math.isinf(t) else t,
                      "escalation_rate": float(esc[p].mean()) if p.any() else None}
  return {"records": int(n), "stages": stages,
          "cost_usd": _mean_sd(cost), "frontier_usd": _mean_sd(frontier),
          "escalated": _mean_sd(escalated.astype(float)),
          "frontier_only_usd": _mean_sd(only),
          "price_book_versions": sorted({str(v) for v in run.records["price_book_version"]
                                         if v})}


def forecast(block: Mapping[str, Any], records: int, level: float = LEVEL) -> dict:
  """Expected totals for ``records`` records like the sample's, with ``level`` predictive
  intervals (normal approximation)."""
  if records < 1:
    raise ValueError(f"a forecast needs a range with records, got {records}")
  n = int(block["records"])
  z = NormalDist().inv_cdf(0.5 + level / 2)
  out: dict[str, Any] = {"records": int(records), "sample_records": n, "level": level,
                         "stages": dict(block["stages"])}
  for key in ("cost_usd", "frontier_usd", "frontier_only_usd"):
    m, s = block[key]
    half = z * s * math.sqrt(records + records * records / n)
    out[key] = {"expected": records * m, "lo": max(0.0, records * m - half),
                "hi": records * m + half}
  m, s = block["escalated"]
  half = z * s * math.sqrt(1 / records + 1 / n)
  out["escalated_share"] = {"expected": m, "lo": max(0.0, m - half), "hi": min(1.0, m + half)}
  only = out["frontier_only_usd"]["expected"]
  out["savings_pct"] = 100 * (1 - out["cost_usd"]["expected"] / only) if only else None
  return out


def count_records(bootstrap_servers: str, topic: str, *, start_offset: Optional[str] = None,
                  end_offset: Optional[str] = None,
                  consumer_config: Optional[Mapping[str, Any]] = None) -> int:
  """Offsets in a topic's bounded range (what a backfill over it would read)."""
  from tierflow.connectors.kafka_offsets import resolve_ranges
  from tierflow.connectors.kafka_read_config import KafkaReadConfig
  ranges = resolve_ranges(KafkaReadConfig(
      bootstrap_servers=bootstrap_servers, topic=topic, bounded=True,
      start_offset=start_offset, end_offset=end_offset,
      consumer_config=dict(consumer_config or {})))
  return sum(r.stop - r.start for r in ranges)


def format_forecast(f: Mapping[str, Any], budget_usd: Optional[float] = None) -> list[str]:
  """The forecast in plain lines, as printed before a run."""
  pct = f"{f['level']:.0%}"

  def usd(d):
    return f"${d['expected']:.4f} ({pct} interval ${d['lo']:.4f} to ${d['hi']:.4f})"
  e = f["escalated_share"]
  lines = [
      f"forecast for {f['records']} records (from a sample of {f['sample_records']}):",
      f"  cost            {usd(f['cost_usd'])}",
      f"  frontier spend  {usd(f['frontier_usd'])}",
      f"  escalated       {e['expected']:.1%} of records ({pct} interval {e['lo']:.1%} to "
      f"{e['hi']:.1%})",
      f"  frontier only   ${f['frontier_only_usd']['expected']:.4f}"
      + (f" (the routed run saves about {f['savings_pct']:.0f}%)"
         if f.get("savings_pct") is not None else ""),
  ]
  for name, st in f["stages"].items():
    rate = st["escalation_rate"]
    lines.append(f"  stage {name}: threshold {st['threshold']}, escalates "
                 + ("?" if rate is None else f"{rate:.1%}") + " of the sample")
  if budget_usd is not None:
    hi = f["frontier_usd"]["hi"]
    lines.append(f"  budget cap ${budget_usd:.4f}: " + (
        "covers the frontier spend's upper bound" if hi <= budget_usd else
        "may bind (the frontier spend's upper bound is above it): records past the cap "
        "keep their small answer, status unverified"))
  return lines
