"""The cost/quality report over a run's Parquet output: its numbers (``build_report``).

``tierflow.report_render`` draws them (HTML and PNG), ``tierflow.report_command`` is the
``tierflow report`` command.

Reads ``OUTPUT/results/dt=*/*.parquet`` (and counts ``OUTPUT/dead_letter``),
keeps one row per ``record_id``, and writes to ``--out``:

* ``report.json``: every number, with a ``notes`` list naming each estimate
  and assumption;
* ``report.html``: one self-contained page (charts embedded as base64);
* ``cost_quality.png``, ``escalation_by_stage.png``, ``cost_breakdown.png``.

Without labels the report is cost-only. With labels (JSONL or Parquet keyed by
``ticket_id``/``doc_id``/``record_id``) classify and extract stages are scored
by exact match of the final answer against the reference, and, where the
ledger carries the small tier's own answer (``stages[].small_answer``), the
report adds small-only quality, the oracle cascade (reference notes §6), the
cost-quality curve over thresholds and its AIQ (RouterBench: area under the
non-decreasing convex hull of (cost, quality) divided by the maximum cost).
Bootstrap CIs resample records (seeded).

    tierflow report OUTPUT_DIR [--labels FILE] [--label-field STAGE=COL[,COL]]
                               [--id-field COL] [--out DIR]
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import math
import os
from typing import Any, Callable, Mapping, Optional

import numpy as np

from tierflow.labels import (LabelFields, StageScores, pick_id_field, read_labels,
                             reference_rows, resolve_label_fields, score_stage)
from tierflow.pipelines.ledger import SMALL_SKIPPED_PREFIX
from tierflow.pipelines.stage_kinds import KINDS
from tierflow.results import ID_FIELDS, RunData, StageData, is_null, mode, read_dead_letters, \
    read_run

__all__ = ["build_report", "REPORT_VERSION", "CHARTS", "aiq", "bootstrap", "nondecreasing_hull"]

REPORT_VERSION = 1
CHARTS = ("cost_quality.png", "escalation_by_stage.png", "cost_breakdown.png")
REASON_CLASSES = ("low_confidence", "no_confidence_signal", "small_failure", "small_skipped",
                  "other")
_MAX_CURVE_POINTS = 500


# ----------------------------------------------------------------------------- metrics


def _per_1k(usd: float, records: int) -> Optional[float]:
  return 1000.0 * usd / records if records else None


def _ratio(num: float, den: float) -> Optional[float]:
  return float(num) / float(den) if den else None


def _reason_class(reason: Optional[str]) -> Optional[str]:
  if not reason:
    return None
  if reason.startswith("confidence"):
    return "low_confidence"
  if reason.startswith("no confidence"):
    return "no_confidence_signal"
  if reason.startswith("small tier failed"):
    return "small_failure"
  if reason.startswith(SMALL_SKIPPED_PREFIX):
    return "small_skipped"
  return "other"




def _escalation(stage: StageData) -> dict:
  p = stage.present
  n = int(p.sum())
  reasons = np.array([_reason_class(r) for r in stage.col("escalation_reason")], dtype=object)
  esc = stage.col("escalated") & p
  skipped = stage.col("budget_skipped") & p
  requested = np.array([r is not None for r in reasons]) & p
  by_reason = {c: int((esc & (reasons == c)).sum()) for c in REASON_CLASSES}
  by_reason["budget_skipped"] = int(skipped.sum())
  frontier_failed = esc & ~is_null(stage.col("frontier_error"))
  return {
      "records": n,
      "escalated": int(esc.sum()),
      "escalation_rate": _ratio(esc.sum(), n),
      "requested": int(requested.sum()),
      "requested_rate": _ratio(requested.sum(), n),
      "by_reason": by_reason,
      "by_reason_rate": {k: _ratio(v, n) for k, v in by_reason.items()},
      "frontier_failed": int(frontier_failed.sum()),
  }


def _stage_cost(stage: StageData) -> dict:
  p = stage.present
  n = int(p.sum())
  small = float(np.nansum(stage.col("small_cost_usd")[p]))
  frontier = float(np.nansum(stage.col("frontier_cost_usd")[p]))
  routed = float(np.nansum(stage.col("cost_usd")[p]))
  only = float(np.nansum(stage.col("frontier_only_cost_usd")[p]))
  return {
      "routed_usd": routed, "small_tier_usd": small, "frontier_tier_usd": frontier,
      "frontier_only_usd": only, "savings_usd": only - routed,
      "savings_pct": _pct(1 - routed / only) if only else None,
      "routed_per_1k": _per_1k(routed, n), "small_tier_per_1k": _per_1k(small, n),
      "frontier_tier_per_1k": _per_1k(frontier, n), "frontier_only_per_1k": _per_1k(only, n),
  }


def _pct(x: float) -> float:
  return 100.0 * x


def _run_cost(run: RunData) -> dict:
  r = run.records
  n = run.n
  routed = float(np.nansum(r["cost_usd"]))
  small = float(np.nansum(r["small_cost_usd"]))
  frontier = float(np.nansum(r["frontier_cost_usd"]))
  only = float(np.nansum(r["frontier_only_cost_usd"]))
  return {
      "routed_usd": routed, "routed_per_1k": _per_1k(routed, n),
      "small_tier_usd": small, "frontier_tier_usd": frontier,
      "small_only_usd": small, "small_only_per_1k": _per_1k(small, n),
      "frontier_only_usd": only, "frontier_only_per_1k": _per_1k(only, n),
      "savings_usd": only - routed,
      "savings_pct": _pct(1 - routed / only) if only else None,
      "premium_over_small_only_usd": routed - small,
      "by_stage": {s.name: _stage_cost(s) for s in run.stages},
  }


def _stage_quality(stage: StageData, sc: StageScores) -> dict:
  lab = sc.labelled
  n = int(lab.sum())
  kept = lab & np.array([r is None for r in stage.col("escalation_reason")])
  f_obs = lab & ~np.isnan(sc.frontier)
  out = {
      "label_fields": sc.fields, "labelled_records": n,
      "routed_accuracy": _ratio(np.nansum(sc.final[lab]), n),
      "small_only_accuracy": None if sc.small is None else _ratio(np.nansum(sc.small[lab]), n),
      "escalated_record_frontier_accuracy": _ratio(np.nansum(sc.frontier[f_obs]), f_obs.sum()),
      "escalated_records_with_frontier_answer": int(f_obs.sum()),
      "non_escalated_records": int(kept.sum()),
      "error_non_escalated": _ratio((1 - sc.final[kept]).sum(), kept.sum()),
      "coverage": _ratio(kept.sum(), n),
  }
  if sc.small is not None:
    esc = lab & stage.col("escalated")
    out["small_accuracy_on_escalated"] = _ratio(np.nansum(sc.small[esc]), esc.sum())
  return out


def _oracle(stage: StageData, sc: StageScores) -> Optional[dict]:
  """Hindsight cascade: the small tier everywhere, the frontier exactly where it helps."""
  if sc.small is None:
    return None
  lab = sc.labelled
  n = int(lab.sum())
  small_ok = sc.small[lab] == 1
  f = sc.frontier[lab]
  f_cost = stage.col("frontier_only_cost_usd")[lab]
  small_cost = float(np.nansum(stage.col("small_cost_usd")[lab]))
  esc = ~small_ok & ~(f == 0)
  cost = small_cost + float(np.nansum(f_cost[esc]))
  cost_all_wrong = small_cost + float(np.nansum(f_cost[~small_ok]))
  return {
      "records": n, "escalated": int(esc.sum()), "escalation_rate": _ratio(esc.sum(), n),
      "cost_usd": cost, "cost_per_1k": _per_1k(cost, n),
      "accuracy": _ratio(small_ok.sum() + esc.sum(), n),
      "frontier_assumed_correct": int((esc & np.isnan(f)).sum()),
      "small_wrong_frontier_wrong": int((~small_ok & (f == 0)).sum()),
      "escalate_all_small_wrong_cost_usd": cost_all_wrong,
      "escalate_all_small_wrong_cost_per_1k": _per_1k(cost_all_wrong, n),
  }


def _upper_hull(points: np.ndarray) -> np.ndarray:
  """Upper convex hull of (x, y) points, left to right (monotone chain)."""
  pts = sorted({(float(x), float(y)) for x, y in points})
  best: dict[float, float] = {}
  for x, y in pts:
    best[x] = max(y, best.get(x, -math.inf))
  pts = sorted(best.items())
  hull: list[tuple[float, float]] = []
  for p in pts:
    while len(hull) >= 2:
      (x1, y1), (x2, y2) = hull[-2], hull[-1]
      if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:
        hull.pop()
      else:
        break
    hull.append(p)
  return np.array(hull, dtype=float)


def nondecreasing_hull(points: np.ndarray) -> np.ndarray:
  """RouterBench's non-decreasing convex hull, extended flat to the maximum cost."""
  hull = _upper_hull(points)
  top = int(np.argmax(hull[:, 1]))
  hull = hull[:top + 1]
  max_x = float(np.max(points[:, 0]))
  if hull[-1, 0] < max_x:
    hull = np.vstack([hull, [max_x, hull[-1, 1]]])
  return hull


def aiq(points: np.ndarray) -> Optional[float]:
  """Area under the non-decreasing convex hull of (cost, quality) / max cost."""
  if len(points) == 0 or float(np.max(points[:, 0])) <= 0:
    return None
  hull = nondecreasing_hull(points)
  x, y = hull[:, 0], hull[:, 1]
  return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / np.max(points[:, 0]))


def _threshold_curve(stage: StageData, sc: Optional[StageScores]) -> dict:
  """Cost (and quality) if records with small confidence (or, where a learned router
  decided, its score) < t were escalated, per t."""
  pop = sc.labelled if sc is not None and sc.small is not None else stage.present
  n = int(pop.sum())
  conf = stage.col("confidence")[pop]
  routed = stage.col("route_score")[pop]  # a learned router's score decided, where set
  conf = np.where(np.isnan(routed), conf, routed)
  forced = np.isnan(conf) | ~is_null(stage.col("small_error")[pop])
  key = np.where(forced, -np.inf, conf)
  order = np.argsort(key, kind="stable")
  skey = key[order]
  f_cost = np.nan_to_num(stage.col("frontier_only_cost_usd")[pop])[order]
  small_total = float(np.nansum(stage.col("small_cost_usd")[pop]))
  finite = conf[~forced]
  top = float(finite.max()) if len(finite) else 0.0
  chosen = mode(stage.col("threshold")[stage.present])
  cands = np.unique(np.concatenate([[0.0], finite, [np.nextafter(max(top, 1.0), np.inf)],
                                    [] if chosen is None else [chosen]]))
  k = np.searchsorted(skey, cands, side="left")
  cum_f = np.concatenate([[0.0], np.cumsum(f_cost)])
  cost = small_total + cum_f[k]
  curve = {"records": n, "thresholds": cands, "escalated": k, "cost_usd": cost,
           "chosen_threshold": chosen, "quality": None, "p_frontier_estimate": None}
  if sc is not None and sc.small is not None:
    curve.update(_curve_quality(sc, pop, order, k, n))
  return curve


def _curve_quality(sc: StageScores, pop: np.ndarray, order: np.ndarray, k: np.ndarray,
                   n: int) -> dict:
  small = sc.small[pop][order]
  f = sc.frontier[pop][order]
  observed = ~np.isnan(f)
  if not observed.any():
    return {"quality": None, "estimated_points": None}
  p_hat = float(f[observed].mean())
  fq = np.where(observed, f, p_hat)
  cum_s = np.concatenate([[0.0], np.cumsum(small)])
  cum_fq = np.concatenate([[0.0], np.cumsum(fq)])
  cum_unobs = np.concatenate([[0], np.cumsum(~observed)])
  quality = (cum_s[-1] - cum_s[k] + cum_fq[k]) / n
  return {"quality": quality, "p_frontier_estimate": p_hat,
          "estimated_points": cum_unobs[k] > 0}


def _curve_json(curve: dict, routed: Optional[dict]) -> dict:
  """The curve for report.json: points (downsampled past 500), chosen point, hull, AIQ."""
  n = curve["records"]
  t, k, cost = curve["thresholds"], curve["escalated"], curve["cost_usd"]
  q = curve["quality"]
  idx = np.arange(len(t))
  if len(idx) > _MAX_CURVE_POINTS:
    keep = set(np.linspace(0, len(t) - 1, _MAX_CURVE_POINTS).round().astype(int))
    if curve["chosen_threshold"] is not None:
      keep.add(int(np.searchsorted(t, curve["chosen_threshold"])))
    idx = np.array(sorted(keep))
  points = []
  for i in idx:
    p = {"threshold": float(t[i]), "escalated": int(k[i]),
         "escalation_rate": _ratio(k[i], n), "cost_usd": float(cost[i]),
         "cost_per_1k": _per_1k(cost[i], n)}
    if q is not None:
      p["accuracy"] = float(q[i])
      p["estimated"] = bool(curve["estimated_points"][i])
    points.append(p)
  est = curve.get("estimated_points")
  out = {"records": n, "chosen_threshold": curve["chosen_threshold"], "points": points,
         "p_frontier_estimate": curve["p_frontier_estimate"], "aiq": None, "hull": None,
         "chosen_point": None,
         # of every threshold swept (not only the points kept): how many used the estimate
         "thresholds_swept": int(len(t)),
         "estimated_thresholds": None if est is None else int(np.sum(est))}
  if curve["chosen_threshold"] is not None:
    i = int(np.searchsorted(t, curve["chosen_threshold"]))
    out["chosen_point"] = {"threshold": float(t[i]), "escalated": int(k[i]),
                           "cost_per_1k": _per_1k(cost[i], n),
                           "accuracy": None if q is None else float(q[i])}
  if q is not None and n:
    pts = np.column_stack([1000.0 * cost / n, q])
    out["aiq"] = aiq(pts)
    out["hull"] = [{"cost_per_1k": float(x), "accuracy": float(y)}
                   for x, y in nondecreasing_hull(pts)]
  if routed is not None:
    out["routed_point"] = routed
  return out


# ----------------------------------------------------------------------------- bootstrap


def bootstrap(vectors: Mapping[str, np.ndarray],
              metrics: Mapping[str, Callable[[Mapping[str, np.ndarray]], np.ndarray]],
              n: int, *, resamples: int = 1000, seed: int = 0, level: float = 0.95
              ) -> dict[str, tuple[float, float]]:
  """Percentile CIs of metrics that are functions of per-record sums, resampling records."""
  if n == 0 or not metrics:
    return {}
  rng = np.random.default_rng(seed)
  names = list(vectors)
  mat = np.column_stack([np.nan_to_num(vectors[k]) for k in names])
  s = np.empty((resamples, len(names)))
  for b in range(resamples):
    s[b] = np.bincount(rng.integers(0, n, n), minlength=n) @ mat
  by_name = {k: s[:, j] for j, k in enumerate(names)}
  lo, hi = 50 * (1 - level), 100 - 50 * (1 - level)
  out = {}
  with np.errstate(divide="ignore", invalid="ignore"):
    for name, fn in metrics.items():
      vals = np.asarray(fn(by_name), dtype=float)
      vals = vals[np.isfinite(vals)]
      if len(vals):
        a, b = np.percentile(vals, [lo, hi])
        out[name] = (float(a), float(b))
  return out


def _bootstrap_intervals(run: RunData, scores: Mapping[str, StageScores], point: dict,
                         resamples: int, seed: int) -> dict:
  r = run.records
  vec = {"cost": r["cost_usd"], "fo": r["frontier_only_cost_usd"],
         "one": np.ones(run.n)}
  metrics: dict[str, Callable] = {
      "routed_cost_per_1k": lambda s: 1000 * s["cost"] / s["one"],
      "savings_pct": lambda s: 100 * (1 - s["cost"] / s["fo"]),
  }
  if scores:
    vec["q_num"] = sum(np.nan_to_num(sc.final) * sc.labelled for sc in scores.values())
    vec["q_den"] = sum(sc.labelled.astype(float) for sc in scores.values())
    metrics["routed_accuracy"] = lambda s: s["q_num"] / s["q_den"]
  for name, sc in scores.items():
    stage = next(s for s in run.stages if s.name == name)
    kept = sc.labelled & np.array([x is None for x in stage.col("escalation_reason")])
    vec[f"{name}:ok"] = np.nan_to_num(sc.final) * sc.labelled
    vec[f"{name}:lab"] = sc.labelled.astype(float)
    vec[f"{name}:kept_err"] = (1 - np.nan_to_num(sc.final)) * kept
    vec[f"{name}:kept"] = kept.astype(float)
    metrics[f"stages.{name}.routed_accuracy"] = \
        lambda s, m=name: s[f"{m}:ok"] / s[f"{m}:lab"]
    metrics[f"stages.{name}.error_non_escalated"] = \
        lambda s, m=name: s[f"{m}:kept_err"] / s[f"{m}:kept"]
  cis = bootstrap(vec, metrics, run.n, resamples=resamples, seed=seed)
  return {k: {"estimate": point.get(k), "lo": v[0], "hi": v[1]}
          for k, v in cis.items() if point.get(k) is not None}


# ----------------------------------------------------------------------------- report


def _is_local(endpoint: Optional[str]) -> bool:
  """True for a loopback host (``127.0.0.1:8000``, ``localhost``, ``[::1]:80``)."""
  from urllib.parse import urlparse
  host = urlparse("//" + endpoint).hostname or "" if endpoint else ""
  return host in ("localhost", "::1", "0.0.0.0") or host.startswith("127.")


def _tiers(run: RunData, tier: str) -> list[dict]:
  """Each (model, endpoint host) a tier answered as, most frequent first: the response's
  ``model`` and the host the request went to (None in ledgers written before it)."""
  seen: collections.Counter = collections.Counter()
  for s in run.stages:
    models, hosts = s.col(f"{tier}_model"), s.col(f"{tier}_endpoint")
    seen.update((m, h) for m, h, p in zip(models, hosts, s.present) if p and m)
  return [{"model": m, "endpoint": h, "local": _is_local(h)} for (m, h), _ in seen.most_common()]


def tier_name(t: Mapping[str, Any]) -> str:
  """How the report names a tier: the model its endpoint answered as, where, and whether
  that endpoint is on this machine (a stand-in is never presented as the provider's model)."""
  if not t.get("endpoint"):
    return f"{t['model']} (endpoint not recorded)"
  where = " — a local endpoint, not the provider's" if t.get("local") else ""
  return f"{t['model']} at {t['endpoint']}{where}"


def _models(run: RunData) -> dict:
  small, frontier = _tiers(run, "small"), _tiers(run, "frontier")
  return {"small": list(dict.fromkeys(t["model"] for t in small)),
          "frontier": list(dict.fromkeys(t["model"] for t in frontier)),
          "small_tiers": small, "frontier_tiers": frontier}


def _run_summary(run: RunData) -> dict:
  r = run.records
  dts = sorted({d for d in r["_dt"] if d})
  return {
      "records": run.n,
      "failed": int((r["status"] == "failed").sum()),
      # kept a small answer below its threshold: the frontier failed, or the budget cap
      "unverified": int((r["status"] == "unverified").sum()),
      "injection_suspected": int(sum(1 for v in r["injection_suspected"] if v)),
      "escalated": int(r["escalated"].sum()),
      "escalation_rate": _ratio(r["escalated"].sum(), run.n),
      "budget_skipped": int(r["budget_skipped"].sum()),
      "stages": [s.name for s in run.stages],
      "models": _models(run),
      "price_book_versions": sorted({v for v in r["price_book_version"] if v}),
      "calibration_versions": sorted({v for v in r["calibration_version"] if v}),
      "dt_min": dts[0] if dts else None, "dt_max": dts[-1] if dts else None,
  }


def _ledger_notes(run: RunData) -> list[str]:
  notes = []
  total_stage = sum(float(np.nansum(s.col("cost_usd")[s.present])) for s in run.stages)
  total = float(np.nansum(run.records["cost_usd"]))
  if abs(total_stage - total) > 1e-9 * max(1.0, total) + 1e-12:
    notes.append(f"per-stage costs sum to {total_stage:.6f} USD but record costs to "
                 f"{total:.6f} USD; run-level figures use the record costs")
  for s in run.stages:
    thresholds = {v for v in s.col("threshold")[s.present] if not math.isnan(v)}
    if len(thresholds) > 1:
      notes.append(f"stage {s.name} ran with several thresholds {sorted(thresholds)}; the "
                   f"most common one is taken as the chosen threshold")
  return notes




def _quality_notes(scores: Mapping[str, StageScores], run: RunData) -> list[str]:
  notes = [
      "correct = the final answer equals the reference after trimming whitespace and "
      "case-folding (extract: every scored field equal; numbers to 9 decimals); a missing "
      "answer (failed stage) counts as wrong",
      "'escalated_record_frontier_accuracy' is the frontier tier's accuracy on the escalated "
      "records only (harder than average): not frontier-only quality, which only a "
      "frontier-only run measures (--frontier-only)",
      "error_non_escalated is the realised error of the final (small) answers on records whose "
      "stage did not ask for escalation (confidence >= threshold): the calibration target",
  ]
  if any(sc.small is None for sc in scores.values()):
    missing = [k for k, sc in scores.items() if sc.small is None]
    notes.append(f"stages {missing}: the ledger lacks the small tier's own answer "
                 f"(stages[].small_answer) on escalated records, so small-only quality, the "
                 f"oracle and the quality curve cannot be computed; cost figures only")
  if any(sc.small is not None for sc in scores.values()):
    notes += [
        "oracle cascade (reference §6): the small tier on every record, the frontier only "
        "where the small answer is wrong and the frontier's is not known to be wrong; a "
        "record's frontier cost is its stage frontier_only_cost_usd (actual frontier cost when "
        "it was escalated, else the small tier's tokens at frontier prices)",
        "oracle: where the frontier answer is unknown (record not escalated in the run, or the "
        "frontier call failed) the oracle's frontier is assumed right "
        "(see frontier_assumed_correct); escalate_all_small_wrong_cost_usd also escalates "
        "records where both tiers were observed wrong",
        "threshold curve: at threshold t the stage escalates records with small confidence "
        "(or, where a learned router decided, its score) < t plus, at every t, small-tier "
        "failures and records without a confidence (as the "
        "pipeline does); the budget cap is ignored; cost = small cost of all + "
        "frontier_only_cost_usd of escalated; the frontier's correctness on a record is "
        "measured where the routed run escalated it or a frontier-only run answered it "
        "(--frontier-only); elsewhere it is unknown and set to the measured frontier "
        "accuracy (p_frontier_estimate), and the points that use it say estimated=true",
        "the curve's chosen point can differ from the routed point: the run also had budget "
        "skips and frontier failures, and the curve uses estimates",
        "AIQ (RouterBench evaluation/AIQ.py): trapezoid area under the non-decreasing convex "
        "hull of (cost per 1k, accuracy) from the cheapest point, extended flat to the maximum "
        "cost, divided by the maximum cost",
        "curve, oracle and per-stage quality use only labelled records; costs there are per "
        "1k labelled records and for that stage alone",
    ]
  return notes


def build_report(output_dir: str, labels: Optional[str] = None,
                 label_fields: Optional[LabelFields] = None, out_dir: Optional[str] = None,
                 *, id_field: Optional[str] = None, resamples: int = 1000, seed: int = 0,
                 charts: bool = True, frontier_only: Optional[str] = None,
                 calibration: Optional[str] = None) -> dict:
  """Builds the report dict and, with ``out_dir``, writes JSON, HTML and PNGs there.

  Args:
    output_dir: a run's output directory (with ``results/`` and ``dead_letter/``).
    labels: JSONL or Parquet reference answers; None gives a cost-only report.
    label_fields: stage name -> label column(s), overriding the default for that
      stage: classify stages use a column named like the stage, ``category`` or
      ``label``; extract stages the label columns named like extraction fields;
      summarise stages are not scored.
    out_dir: where to write ``report.json``, ``report.html`` and the charts.
    id_field: the id column shared by results and labels (default: ticket_id,
      doc_id or record_id, whichever exists in both).
    resamples, seed: the bootstrap.
    frontier_only: the output directory of a frontier-only run over the same records
      (every stage escalated, e.g. thresholds of 1.1): its measured quality and frontier
      cost are the frontier-only baseline. Without it frontier-only quality is unknown.
    calibration: the calibration file the run used: its alpha, delta, n and whether it
      certified each stage go in the report, with a banner for a stage it did not.
  """
  ids = (*ID_FIELDS, id_field) if id_field else ID_FIELDS
  run = read_run(output_dir, ids)
  fo_run = read_run(frontier_only, ids) if frontier_only else None
  fo_idx, fo_key = frontier_only_join(run, fo_run) if fo_run else (None, None)
  measured_records = _use_measured_frontier_only(run, fo_run, fo_idx) if fo_run else 0
  notes = [
      f"{run.rows_read} result rows read from {len(run.files)} files; "
      f"{run.rows_read - run.n} duplicate rows dropped (one row per record_id, an ok row "
      f"preferred)",
      "small-only cost = the small tier's cost in this run (it ran on every stage of every "
      "record); frontier-only cost = " + (
          f"the frontier-only run's billed frontier cost for the {measured_records} of "
          f"{run.n} records it holds" + (", the ledger's estimate for the others"
                                         if measured_records < run.n else "")
          if fo_run else "sum of frontier_only_cost_usd, the ledger's estimate (actual "
          "frontier cost where escalated, else the small tier's tokens at frontier prices)"),
      "escalation_rate counts stages actually sent to the frontier; requested_rate adds "
      "escalations the budget cap skipped; failed records are included in every count",
  ] + _ledger_notes(run)
  report: dict[str, Any] = {
      "report_version": REPORT_VERSION,
      "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "inputs": {"output_dir": os.path.abspath(output_dir), "files": len(run.files),
                 "rows_read": run.rows_read, "duplicate_rows_dropped": run.rows_read - run.n,
                 "labels": os.path.abspath(labels) if labels else None},
      "run": _run_summary(run),
      "cost": _run_cost(run),
      "dead_letter": None,
  }
  dl = read_dead_letters(output_dir)
  in_results = set(run.records["record_id"])
  report["dead_letter"] = {k: v for k, v in dl.items() if k != "record_ids"}
  report["dead_letter"]["records_not_in_results"] = len(set(dl["record_ids"]) - in_results)
  if dl["rows"]:
    notes.append("dead letters not in the results (decode/validation failures) are not in "
                 "the record counts; model failures appear in both")
  scores: dict[str, StageScores] = {}
  label_rows, idf = None, None
  if labels:
    label_rows = read_labels(labels)
    idf = pick_id_field(run, label_rows, id_field)
    refs, join = reference_rows(run, label_rows, idf)
    fields, fnotes = resolve_label_fields(run, label_rows, label_fields)
    notes += fnotes
    by_name = {s.name: s for s in run.stages}
    scores = {name: score_stage(by_name[name], run, refs, cols) for name, cols in fields.items()}
    report["inputs"].update({"id_field": idf, "label_fields": fields, **join})
    if join["records_with_labels"] < run.n:
      notes.append(f"{run.n - join['records_with_labels']} of {run.n} records have no label; "
                   f"quality figures cover labelled records only")
    notes += _quality_notes(scores, run)
  else:
    notes.append("cost-only report: no labels given, so no quality, oracle or AIQ; the "
                 "threshold curve shows cost only")
  measured, fo_correct = {}, {}
  report["cost"]["frontier_only_source"] = "estimate"
  if frontier_only:
    run_cost, measured, fo_correct = _measured_frontier_only(
        frontier_only, fo_run, run, fo_idx, label_rows, idf, scores)
    report["inputs"]["frontier_only"] = os.path.abspath(frontier_only)
    report["inputs"]["frontier_only_joined_on"] = fo_key
    report["cost"].update(run_cost)
    report["cost"]["frontier_only_source"] = ("measured" if measured_records == run.n
                                              else "partly measured")
    notes.append("frontier only: measured by the frontier-only run "
                 f"({os.path.abspath(frontier_only)}), joined on {fo_key}: its final answers' "
                 "accuracy and its frontier tier's billed cost, over the records both runs "
                 "hold; the threshold curve takes the frontier's correctness from it wherever "
                 "the routed run did not escalate the record")
  elif scores:
    notes.append("frontier-only quality is unknown: no frontier-only run was given "
                 "(--frontier-only DIR); the frontier tier's accuracy on the escalated "
                 "records is shown as that, not as frontier-only quality")
  report["mode"] = "cost_and_quality" if scores else "cost_only"
  report["stages"] = _stages_json(run, scores, measured, fo_correct)
  report["calibration"] = _calibration_json(calibration) if calibration else None
  report["banners"] = _banners(report)
  report["quality"] = _run_quality(scores) if scores else None
  report["guarantee"] = _guarantee(report)
  report["cost"]["savings_quality"] = _savings_quality(report)
  for name, st in report["stages"].items():
    if st["oracle"] is not None and st["threshold_curve"]["aiq"] is None:
      notes.append(f"stage {name}: no frontier answer was observed on labelled records, so "
                   f"the quality curve and AIQ cannot be estimated")
  point = _point_estimates(report)
  report["bootstrap"] = {"resamples": resamples, "seed": seed, "level": 0.95,
                         "method": "percentile, resampling records",
                         "intervals": _bootstrap_intervals(run, scores, point, resamples, seed)}
  report["notes"] = notes
  report["charts"] = list(CHARTS) if charts else []
  if out_dir:
    from tierflow.report_render import write_outputs
    write_outputs(report, out_dir, charts=charts)
  return report


def _with_measured_frontier(sc: Optional[StageScores],
                            fo_correct: Optional[np.ndarray]) -> Optional[StageScores]:
  """``sc`` with the frontier's correctness filled in from a frontier-only run where the
  routed run did not observe it (its own frontier answers take precedence)."""
  if sc is None or fo_correct is None:
    return sc
  frontier = np.where(np.isnan(sc.frontier), fo_correct, sc.frontier)
  return dataclasses.replace(sc, frontier=np.where(sc.labelled, frontier, np.nan))


def _stages_json(run: RunData, scores: Mapping[str, StageScores],
                 measured: Optional[Mapping[str, dict]] = None,
                 fo_correct: Optional[Mapping[str, np.ndarray]] = None) -> dict:
  out = {}
  measured = measured or {}
  for s in run.stages:
    sc = scores.get(s.name)
    known = _with_measured_frontier(sc, (fo_correct or {}).get(s.name))
    entry = {"kind": s.kind, "threshold": mode(s.col("threshold")[s.present]),
             "small_model": mode(s.col("small_model")[s.present]),
             "frontier_model": mode(s.col("frontier_model")[s.present]),
             # what escalation was decided on (logprob, verbalised, checks, agreement)
             "signals": sorted({str(g) for g in s.col("confidence_signal")[s.present] if g}),
             "failed": int((s.present & is_null(s.col("final_tier"))).sum()),
             "escalation": _escalation(s), "cost": _stage_cost(s),
             "quality": None, "oracle": None}
    routed = None
    if sc is not None:
      entry["quality"] = _stage_quality(s, sc)
      entry["oracle"] = _oracle(s, known)
      if sc.small is not None:
        lab = sc.labelled
        routed = {"cost_per_1k": _per_1k(float(np.nansum(s.col("cost_usd")[lab])), lab.sum()),
                  "accuracy": entry["quality"]["routed_accuracy"]}
        entry["small_only_point"] = {
            "cost_per_1k": _per_1k(float(np.nansum(s.col("small_cost_usd")[lab])), lab.sum()),
            "accuracy": entry["quality"]["small_only_accuracy"]}
        entry["frontier_only_point"] = {
            "cost_per_1k": _per_1k(float(np.nansum(s.col("frontier_only_cost_usd")[lab])),
                                   lab.sum()),
            "accuracy": None, "source": "unknown (no frontier-only run given)"}
    if s.name in measured:
      entry["frontier_only_point"] = measured[s.name]
      if entry["quality"] is not None:
        entry["quality"]["frontier_only_accuracy"] = measured[s.name]["accuracy"]
    entry["threshold_curve"] = _curve_json(_threshold_curve(s, known), routed)
    out[s.name] = entry
  return out


def frontier_only_join(run: RunData, fo: RunData) -> tuple[np.ndarray, str]:
  """For each record of ``run``, its row in the frontier-only run ``fo`` (-1: absent), and
  the id joined on: the record's own id (``ticket_id``, ``doc_id``) when both runs carry it,
  so a frontier-only run over another topic holding the same records matches; else the
  Kafka ``record_id``."""
  for key in ID_FIELDS:
    col = "record_id" if key == "record_id" else "_id:" + key
    if col not in run.records or col not in fo.records:
      continue
    ids, fo_ids = run.records[col], fo.records[col]
    if any(i is None for i in ids) or any(i is None for i in fo_ids):
      continue
    where = {str(i): j for j, i in enumerate(fo_ids)}
    return np.array([where.get(str(i), -1) for i in ids], dtype=int), key
  raise ValueError("the routed and frontier-only runs share no id column")


def _use_measured_frontier_only(run: RunData, fo: RunData, idx: np.ndarray) -> int:
  """Puts the frontier-only run's billed frontier cost, per record and stage, in place of
  the routed run's ``frontier_only_cost_usd`` estimate wherever the frontier-only run holds
  the record (``idx``, from ``frontier_only_join``) and the stage, so savings, the oracle,
  the threshold curve and their intervals all use the measured baseline. Returns how many
  records it replaced."""
  held = idx >= 0
  by_name = {s.name: s for s in fo.stages}
  total = np.zeros(run.n)
  replaced = np.zeros(run.n, dtype=bool)
  for stage in run.stages:
    fs = by_name.get(stage.name)
    col = stage.col("frontier_only_cost_usd").copy()
    if fs is not None:
      j = np.where(held, idx, 0)
      cost = fs.col("frontier_cost_usd")[j]
      use = held & stage.present & fs.present[j] & ~np.isnan(cost)
      col[use] = cost[use]
      replaced |= use
    stage.cols["frontier_only_cost_usd"] = col
    total += np.where(stage.present, np.nan_to_num(col), 0.0)
  run.records["frontier_only_cost_usd"] = np.where(replaced, total,
                                                   run.records["frontier_only_cost_usd"])
  return int(replaced.sum())


def _measured_frontier_only(path: str, fo: RunData, run: RunData, idx: np.ndarray,
                            label_rows: Optional[list], idf: Optional[str],
                            scores: Mapping[str, StageScores]
                            ) -> tuple[dict, dict, dict[str, np.ndarray]]:
  """What a frontier-only run (``fo``, read from ``path``; ``idx`` maps ``run``'s records
  to its rows) measured, over the records both runs hold: (its billed frontier cost for
  the run, per stage the frontier-only point: accuracy of its final answers on the
  labelled records (with ``label_rows``, joined on ``idf``) and its frontier tier's billed
  cost per 1k of them, per stage whether its frontier answer to each of ``run``'s records
  was right (NaN where not measured))."""
  keep = np.zeros(fo.n, dtype=bool)
  keep[idx[idx >= 0]] = True
  if not keep.any():
    raise ValueError(f"--frontier-only {path}: no record in common with the routed run")
  total = sum(float(np.nansum(s.col("frontier_cost_usd")[keep & s.present]))
              for s in fo.stages)
  run_cost = {"frontier_only_measured_usd": total,
              "frontier_only_measured_per_1k": _per_1k(total, int(keep.sum())),
              "frontier_only_measured_records": int(keep.sum())}
  out: dict = {}
  correct: dict[str, np.ndarray] = {}
  by_name = {s.name: s for s in fo.stages}
  if label_rows is not None and scores:
    refs, _ = reference_rows(fo, label_rows, idf)
    for name, sc in scores.items():
      stage = by_name.get(name)
      if stage is None:
        continue
      fsc = score_stage(stage, fo, refs, sc.fields)
      lab = fsc.labelled & keep
      on_frontier = lab & (stage.col("final_tier") == "frontier")
      out[name] = {
          "cost_per_1k": _per_1k(float(np.nansum(stage.col("frontier_cost_usd")[lab])),
                                 int(lab.sum())),
          "accuracy": _ratio(np.nansum(fsc.final[lab]), lab.sum()),
          "labelled_records": int(lab.sum()),
          "answered_by_frontier": _ratio(on_frontier.sum(), lab.sum()),
          "source": f"measured ({path})"}
      # Only answers the frontier gave count as its measured correctness.
      measured = np.where(on_frontier, fsc.final, np.nan)
      correct[name] = np.where(idx >= 0, measured[np.maximum(idx, 0)], np.nan)
  return run_cost, out, correct


def _calibration_json(path: str) -> dict:
  from tierflow.calibration import Calibration
  cal = Calibration.load(path)
  return {"file": path, "created_at": cal.created_at, "data_hash": cal.data_hash,
          "reference": cal.reference, "reference_model": cal.reference_model,
          "stages": {name: {"alpha": sc.alpha, "delta": sc.delta, "n": sc.n,
                            "certified": sc.certified, "threshold": sc.threshold,
                            "method": sc.method,
                            "reason": sc.reason, "min_n_to_certify": sc.min_n_to_certify,
                            "labels_to_certify": sc.labels_to_certify}
                     for name, sc in cal.stages.items()}}


def _banners(report: dict) -> list[str]:
  """Warnings a reader must not miss, in plain words."""
  out = []
  cal = report.get("calibration")
  for name, c in ((cal or {}).get("stages") or {}).items():
    if c.get("method") == "crc":
      out.append(f"Stage {name} was calibrated in the weaker expected-risk mode (conformal risk "
                 f"control): on average over calibration samples at most {c['alpha']:.1%} of "
                 f"all records keep a wrong small-tier answer; there is no "
                 f"{1 - c['delta']:.0%}-confidence guarantee on the error of kept records.")
      if not c["certified"]:
        out.append(f"Stage {name}: {c['n']} labelled records are too few for that target, so "
                   f"the run escalated every {name} answer.")
      continue
    if not c["certified"]:
      need = c.get("labels_to_certify")
      out.append(f"Stage {name}: calibration did not certify error <= {c['alpha']:.1%} "
                 f"(confidence {1 - c['delta']:.0%}) on {c['n']} labelled records, so the run "
                 f"escalated every {name} answer"
                 + (f"; about {need} labelled records would certify it at the observed error "
                    "rates." if need else "; the small tier's observed error is above the "
                    "target at every threshold, so more labels alone would not help."))
  for name, st in report["stages"].items():
    rate = st["escalation"].get("escalation_rate")
    if rate is not None and rate >= 1:
      out.append(f"Stage {name}: every record was escalated, so this run cost more than "
                 "frontier-only would have (the small tier ran too).")
  return out


def _guarantee(report: dict) -> list[str]:
  """What the run's calibration guarantees, one sentence per stage, in plain words."""
  cal = report.get("calibration")
  names = list(report["stages"])
  if not cal:
    used = report["run"]["calibration_versions"]
    if used:
      return [f"Guarantee not stated: the run used calibration {', '.join(used)}, but its file "
              f"was not given (--calibration FILE), so this report cannot say what it bounds."]
    return ["No error guarantee: the run used no calibration, so nothing bounds how often the "
            "small-tier answers it kept are wrong (thresholds from the config)."]
  frontier = cal.get("reference") == "frontier"
  ref = (f"the frontier model's answers ({cal.get('reference_model') or 'frontier tier'}; "
         "agreement with it, not gold labels)" if frontier else "gold labels")
  wrong = "disagree with the frontier" if frontier else "are wrong"
  one_wrong = "disagrees with the frontier" if frontier else "is wrong"
  out = []
  for name in names:
    c = cal["stages"].get(name)
    if c is None:
      kind = KINDS.get(report["stages"][name]["kind"])
      why = (kind.unscored_reason if kind is not None else "") or "not in the calibration file"
      out.append(f"{name}: no guarantee (not calibrated: {why}); it escalates on its "
                 f"configured threshold.")
      continue
    a, d, n = c["alpha"], c["delta"], c["n"]
    if c["method"] == "crc":
      out.append(f"{name}: expected-risk mode only: on average at most {a:.1%} of all records "
                 f"keep a small-tier answer that {one_wrong}; no "
                 f"{1 - d:.0%}-confidence statement (n = {n}, reference: {ref}).")
    elif c["certified"]:
      out.append(f"{name}: certified: for records like the {n} calibration records, the "
                 f"small-tier answers the run kept (confidence >= {c['threshold']:.3f}) "
                 f"{wrong} at most {a:.1%} of the time, with {1 - d:.0%} confidence "
                 f"(alpha {a:g}, delta {d:g}, n {n}; reference: {ref}).")
    else:
      out.append(f"{name}: refused: {n} calibration records could not certify at most "
                 f"{a:.1%} kept answers that {wrong} at {1 - d:.0%} confidence "
                 f"({c['reason']}), so the run escalated every {name} answer "
                 f"(reference: {ref}).")
  return out


def _savings_quality(report: dict) -> str:
  """The quality statement that goes beside every saving."""
  q = report.get("quality")
  if not q:
    return "quality unknown (no labels)"
  stages = [st for st in report["stages"].values() if st["quality"]]
  fo = [st["quality"].get("frontier_only_accuracy") for st in stages]
  routed = f"routed accuracy {100 * q['routed_accuracy']:.1f}%"
  if all(x is not None for x in fo) and fo:
    n = [st["quality"]["labelled_records"] for st in stages]
    fo_acc = sum(x * m for x, m in zip(fo, n)) / max(sum(n), 1)
    return f"{routed} vs frontier only {100 * fo_acc:.1f}% (measured, labelled records)"
  return f"{routed}; frontier-only quality unknown (no frontier-only run)"


def _run_quality(scores: Mapping[str, StageScores]) -> dict:
  num = sum(float(np.nansum(sc.final[sc.labelled])) for sc in scores.values())
  den = sum(int(sc.labelled.sum()) for sc in scores.values())
  return {"scored_stages": list(scores), "labelled_stage_answers": den,
          "routed_accuracy": _ratio(num, den),
          "definition": "share of (record, scored stage) answers that are correct"}


def _point_estimates(report: dict) -> dict:
  c = report["cost"]
  point = {"routed_cost_per_1k": c["routed_per_1k"], "savings_pct": c["savings_pct"]}
  if report["quality"]:
    point["routed_accuracy"] = report["quality"]["routed_accuracy"]
  for name, st in report["stages"].items():
    if st["quality"]:
      point[f"stages.{name}.routed_accuracy"] = st["quality"]["routed_accuracy"]
      point[f"stages.{name}.error_non_escalated"] = st["quality"]["error_non_escalated"]
  return point


# ----------------------------------------------------------------------------- output
