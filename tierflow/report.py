"""``tierflow report``: the cost/quality report over a run's Parquet output.

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

import argparse
import base64
import collections
import dataclasses
import datetime
import html
import json
import math
import os
import sys
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = ["build_report", "main", "REPORT_VERSION", "CHARTS"]

REPORT_VERSION = 1
CHARTS = ("cost_quality.png", "escalation_by_stage.png", "cost_breakdown.png")
ID_FIELDS = ("ticket_id", "doc_id", "record_id")
REASON_CLASSES = ("low_confidence", "no_confidence_signal", "small_failure", "other")
_OUTPUT_COLUMN = {"classify": "label", "extract": "extraction", "summarise": "summary"}
_RECORD_COLUMNS = ("record_id", "status", "label", "extraction", "summary", "escalated",
                   "budget_skipped", "cost_usd", "small_cost_usd", "frontier_cost_usd",
                   "frontier_only_cost_usd", "price_book_version", "calibration_version")
_STAGE_FIELDS = ("stage", "kind", "final_tier", "final_model", "confidence", "threshold",
                 "escalated", "escalation_reason", "budget_skipped", "small_model",
                 "small_cost_usd", "small_answer", "small_error", "frontier_model",
                 "frontier_cost_usd", "frontier_error", "cost_usd", "frontier_only_cost_usd")
_MAX_CURVE_POINTS = 500

LabelFields = Mapping[str, Union[str, Sequence[str]]]


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass
class StageData:
  """One stage's ledger as arrays aligned with the deduplicated records."""
  name: str
  kind: str
  present: np.ndarray
  cols: dict[str, np.ndarray]
  small_answer_known: np.ndarray

  def col(self, name: str) -> np.ndarray:
    return self.cols[name]


@dataclasses.dataclass
class RunData:
  files: list[str]
  rows_read: int
  records: dict[str, np.ndarray]
  stages: list[StageData]

  @property
  def n(self) -> int:
    return len(self.records["record_id"])


def _parquet_files(directory: str) -> list[str]:
  out = []
  for root, dirs, files in os.walk(directory):
    dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
    out += [os.path.join(root, f) for f in files
            if f.endswith(".parquet") and not f.startswith((".", "_"))]
  return sorted(out)


def _dt_of(path: str) -> Optional[str]:
  for part in path.split(os.sep):
    if part.startswith("dt="):
      return part[3:]
  return None


def _column(table: pa.Table, name: str, length: int) -> list:
  return table.column(name).to_pylist() if name in table.column_names else [None] * length


def _read_file(path: str, id_candidates: Sequence[str]) -> tuple[dict, dict]:
  """(record columns, flat stage columns with ``_row``) of one results file."""
  table = pq.read_table(path)
  n = table.num_rows
  if "stages" not in table.column_names or "record_id" not in table.column_names:
    raise ValueError(f"{path} is not a tierflow results file (no stages/record_id)")
  rec = {c: _column(table, c, n) for c in _RECORD_COLUMNS}
  for c in id_candidates:
    if c in table.column_names:
      rec["_id:" + c] = [None if v is None else str(v) for v in table.column(c).to_pylist()]
  rec["_dt"] = [_dt_of(path)] * n
  stages = table.column("stages").combine_chunks()
  flat = pc.list_flatten(stages)
  names = {flat.type.field(i).name for i in range(flat.type.num_fields)}
  st = {f: (pc.struct_field(flat, f).to_pylist() if f in names else [None] * len(flat))
        for f in _STAGE_FIELDS}
  st["_row"] = pc.list_parent_indices(stages).to_numpy().tolist()
  st["_has_small_answer"] = [("small_answer" in names)] * len(flat)
  return rec, st


def _dedupe_order(record_ids: list, status: list) -> list[int]:
  """Row index kept per record_id: an ``ok`` row if any, else the last; sorted by id."""
  keep: dict[str, int] = {}
  for i, (rid, s) in enumerate(zip(record_ids, status)):
    j = keep.get(rid)
    if j is None or s == "ok" or status[j] != "ok":
      keep[rid] = i
  return [keep[r] for r in sorted(keep)]


def _is_null(values: np.ndarray) -> np.ndarray:
  return np.array([v is None for v in values], dtype=bool)


def _as_float(values: list) -> np.ndarray:
  return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def _as_bool(values: list) -> np.ndarray:
  return np.array([bool(v) for v in values], dtype=bool)


_FLOATS = {"confidence", "threshold", "small_cost_usd", "frontier_cost_usd", "cost_usd",
           "frontier_only_cost_usd"}
_BOOLS = {"escalated", "budget_skipped"}


def _typed(name: str, values: list) -> np.ndarray:
  if name in _FLOATS or name.endswith("_usd"):
    return _as_float(values)
  if name in _BOOLS:
    return _as_bool(values)
  return np.array(values, dtype=object)


def read_run(output_dir: str, id_candidates: Sequence[str] = ID_FIELDS) -> RunData:
  """Results rows, deduplicated by ``record_id``, with per-stage arrays."""
  results = os.path.join(output_dir, "results")
  files = _parquet_files(results if os.path.isdir(results) else output_dir)
  if not files:
    raise ValueError(f"no results Parquet files under {output_dir}")
  rec: dict[str, list] = collections.defaultdict(list)
  st: dict[str, list] = collections.defaultdict(list)
  offset = 0
  for path in files:
    r, s = _read_file(path, id_candidates)
    n = len(r["record_id"])
    for k in set(rec) | set(r):
      if k not in rec:
        rec[k] = [None] * offset
      rec[k] += r.get(k, [None] * n)
    for k, v in s.items():
      st[k] += [x + offset for x in v] if k == "_row" else v
    offset += n
  keep = _dedupe_order(rec["record_id"], rec["status"])
  records = {k: _typed(k, [v[i] for i in keep]) for k, v in rec.items()}
  position = np.full(offset, -1)
  position[keep] = np.arange(len(keep))
  return RunData(files, offset, records, _stage_arrays(st, position, len(keep)))


def _stage_arrays(st: dict[str, list], position: np.ndarray, n: int) -> list[StageData]:
  rows = np.array(st["_row"], dtype=int)
  target = position[rows] if len(rows) else rows
  names = np.array(st["stage"], dtype=object)
  has_answer = np.array(st["_has_small_answer"], dtype=bool)
  out = []
  for name in dict.fromkeys(st["stage"]):
    mask = (names == name) & (target >= 0)
    where = target[mask]
    cols = {}
    for f in _STAGE_FIELDS:
      full = np.full(n, None, dtype=object)
      full[where] = np.array(st[f], dtype=object)[mask]
      cols[f] = _typed(f, list(full))
    present = np.zeros(n, dtype=bool)
    present[where] = True
    known = np.zeros(n, dtype=bool)
    known[where] = has_answer[mask]
    kind = _mode(cols["kind"][present]) or "?"
    out.append(StageData(name, kind, present, cols, known))
  return out


def read_dead_letters(output_dir: str) -> dict:
  """Counts of the dead-letter dataset (distinct record_id and stage)."""
  files = _parquet_files(os.path.join(output_dir, "dead_letter"))
  seen, by_type, by_stage = set(), collections.Counter(), collections.Counter()
  for path in files:
    t = pq.read_table(path)
    cols = [_column(t, c, t.num_rows) for c in ("record_id", "stage", "error_type")]
    for rid, stage, etype in zip(*cols):
      if (rid, stage) in seen:
        continue
      seen.add((rid, stage))
      by_type[etype] += 1
      by_stage[stage] += 1
  return {"rows": len(seen), "record_ids": sorted({r for r, _ in seen}),
          "by_error_type": dict(by_type), "by_stage": dict(by_stage), "files": len(files)}


# ----------------------------------------------------------------------------- labels


def read_labels(path: str) -> list[dict]:
  """Label rows from JSONL or Parquet (a file or a directory of files)."""
  if os.path.isdir(path) or path.endswith((".parquet", ".pq")):
    files = _parquet_files(path) if os.path.isdir(path) else [path]
    return [row for f in files for row in pq.read_table(f).to_pylist()]
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n}: not JSON: {e}") from None
  return rows


def _pick_id_field(run: RunData, label_rows: list[dict], id_field: Optional[str]) -> str:
  label_cols = set().union(*(r.keys() for r in label_rows)) if label_rows else set()
  candidates = [id_field] if id_field else list(ID_FIELDS)
  for c in candidates:
    in_results = c == "record_id" or "_id:" + c in run.records
    if c in label_cols and in_results:
      return c
  raise ValueError(f"no id field shared by the results and the labels (tried "
                   f"{', '.join(candidates)}); set --id-field")


def _result_ids(run: RunData, id_field: str) -> np.ndarray:
  key = "record_id" if id_field == "record_id" else "_id:" + id_field
  return run.records[key]


def _default_label_fields(stage: StageData, run: RunData, label_cols: set) -> list[str]:
  if stage.kind == "classify":
    return [c for c in (stage.name, "category", "label") if c in label_cols][:1]
  if stage.kind == "extract":
    keys: set = set()
    texts = [t for t in (*run.records["extraction"], *stage.col("small_answer")) if t]
    for text in texts[:1000]:
      keys |= set(_json_obj(text) or {})
    return sorted(k for k in keys if k in label_cols)
  return []


def _parse_label_fields(specs: Iterable[str]) -> dict[str, list[str]]:
  out = {}
  for spec in specs:
    stage, sep, cols = spec.partition("=")
    if not sep or not stage or not cols:
      raise ValueError(f"--label-field wants STAGE=COLUMN[,COLUMN...], got {spec!r}")
    out[stage.strip()] = [c.strip() for c in cols.split(",") if c.strip()]
  return out


# ----------------------------------------------------------------------------- scoring


def _json_obj(text: Any) -> Optional[dict]:
  """An extraction as a dict: a struct column value, or a JSON string (the ledger)."""
  if isinstance(text, dict):
    return text
  if not isinstance(text, str):
    return None
  try:
    obj = json.loads(text)
  except json.JSONDecodeError:
    return None
  return obj if isinstance(obj, dict) else None


def _norm(value: Any) -> Any:
  if isinstance(value, bool) or value is None:
    return value
  if isinstance(value, (int, float)):
    return round(float(value), 9)
  if isinstance(value, str):
    return " ".join(value.split()).casefold()
  return json.dumps(value, sort_keys=True)


def _matches(kind: str, answer: Any, reference: Mapping[str, Any], fields: Sequence[str]) -> bool:
  """Exact match (whitespace/case-normalised) of one answer against its reference."""
  if answer is None:
    return False
  if kind == "classify":
    return _norm(answer) == _norm(reference.get(fields[0]))
  obj = _json_obj(answer)
  if obj is None:
    return False
  return all(_norm(obj.get(f)) == _norm(reference.get(f)) for f in fields)


@dataclasses.dataclass
class StageScores:
  """Per-record correctness of one stage (NaN where unknown or unlabelled)."""
  fields: list[str]
  labelled: np.ndarray
  final: np.ndarray
  small: Optional[np.ndarray]
  frontier: np.ndarray


def _score_stage(stage: StageData, run: RunData, refs: list[Optional[dict]],
                 fields: list[str]) -> StageScores:
  n = run.n
  labelled = stage.present & np.array([
      r is not None and (stage.kind != "classify" or r.get(fields[0]) is not None)
      for r in refs])
  final_col = run.records[_OUTPUT_COLUMN[stage.kind]]
  tier = stage.col("final_tier")
  final, small, frontier = (np.full(n, np.nan) for _ in range(3))
  small_known = stage.small_answer_known | (tier == "small") | ~_is_null(stage.col("small_error"))
  for i in np.flatnonzero(labelled):
    final[i] = _matches(stage.kind, final_col[i], refs[i], fields)
    if tier[i] == "frontier":
      frontier[i] = final[i]
    if small_known[i]:
      answer = final_col[i] if (tier[i] == "small" and not stage.small_answer_known[i]) \
          else stage.col("small_answer")[i]
      small[i] = _matches(stage.kind, answer, refs[i], fields)
  complete = bool(labelled.any()) and bool(small_known[labelled].all())
  return StageScores(fields, labelled, final, small if complete else None, frontier)


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
  return "other"


def _mode(values: np.ndarray) -> Optional[Any]:
  vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
  return collections.Counter(vals).most_common(1)[0][0] if vals else None


def _escalation(stage: StageData) -> dict:
  p = stage.present
  n = int(p.sum())
  reasons = np.array([_reason_class(r) for r in stage.col("escalation_reason")], dtype=object)
  esc = stage.col("escalated") & p
  skipped = stage.col("budget_skipped") & p
  requested = np.array([r is not None for r in reasons]) & p
  by_reason = {c: int((esc & (reasons == c)).sum()) for c in REASON_CLASSES}
  by_reason["budget_skipped"] = int(skipped.sum())
  frontier_failed = esc & ~_is_null(stage.col("frontier_error"))
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
  """Cost (and quality) if records with small confidence < t were escalated, per t."""
  pop = sc.labelled if sc is not None and sc.small is not None else stage.present
  n = int(pop.sum())
  conf = stage.col("confidence")[pop]
  forced = np.isnan(conf) | ~_is_null(stage.col("small_error")[pop])
  key = np.where(forced, -np.inf, conf)
  order = np.argsort(key, kind="stable")
  skey = key[order]
  f_cost = np.nan_to_num(stage.col("frontier_only_cost_usd")[pop])[order]
  small_total = float(np.nansum(stage.col("small_cost_usd")[pop]))
  finite = conf[~forced]
  top = float(finite.max()) if len(finite) else 0.0
  chosen = _mode(stage.col("threshold")[stage.present])
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
  out = {"records": n, "chosen_threshold": curve["chosen_threshold"], "points": points,
         "p_frontier_estimate": curve["p_frontier_estimate"], "aiq": None, "hull": None,
         "chosen_point": None}
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


def _models(run: RunData) -> dict:
  small, frontier = collections.Counter(), collections.Counter()
  for s in run.stages:
    small.update(m for m in s.col("small_model")[s.present] if m)
    frontier.update(m for m in s.col("frontier_model")[s.present] if m)
  return {"small": [m for m, _ in small.most_common()],
          "frontier": [m for m, _ in frontier.most_common()]}


def _run_summary(run: RunData) -> dict:
  r = run.records
  dts = sorted({d for d in r["_dt"] if d})
  return {
      "records": run.n,
      "failed": int((r["status"] != "ok").sum()),
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


def _resolve_label_fields(run: RunData, label_rows: list[dict],
                          label_fields: Optional[LabelFields]) -> tuple[dict, list[str]]:
  label_cols = set().union(*(r.keys() for r in label_rows)) if label_rows else set()
  given = {k: [v] if isinstance(v, str) else list(v) for k, v in (label_fields or {}).items()}
  by_name = {s.name: s for s in run.stages}
  for name, cols in given.items():
    if name not in by_name:
      raise ValueError(f"--label-field names stage {name!r}; the run has {sorted(by_name)}")
    if by_name[name].kind == "summarise":
      raise ValueError(f"stage {name} is a summarise stage; exact-match scoring does not "
                       f"apply to free text (score summaries with a judge instead)")
    missing = [c for c in cols if c not in label_cols]
    if missing:
      raise ValueError(f"label column(s) {missing} for stage {name} are not in the labels")
  notes, out = [], {}
  kinds = collections.Counter(s.kind for s in run.stages)
  for s in run.stages:
    cols = given.get(s.name) or _default_label_fields(s, run, label_cols)
    if s.kind == "summarise":
      notes.append(f"stage {s.name} (summarise) is not scored: exact match does not apply to "
                   f"free text")
    elif kinds[s.kind] > 1:
      notes.append(f"stage {s.name} is not scored: several {s.kind} stages share one output "
                   f"column")
    elif not cols:
      notes.append(f"stage {s.name} is not scored: no label column for it (use --label-field)")
    else:
      out[s.name] = cols
  return out, notes


def _reference_rows(run: RunData, label_rows: list[dict], id_field: str
                    ) -> tuple[list[Optional[dict]], dict]:
  by_id: dict[str, dict] = {}
  dupes = 0
  for row in label_rows:
    key = row.get(id_field)
    if key is None:
      continue
    if str(key) in by_id:
      dupes += 1
      continue
    by_id[str(key)] = row
  ids = _result_ids(run, id_field)
  refs = [by_id.get(str(i)) if i is not None else None for i in ids]
  matched = sum(r is not None for r in refs)
  return refs, {"label_rows": len(label_rows), "duplicate_label_ids": dupes,
                "records_with_labels": matched,
                "labels_without_results": len(by_id) - len({str(i) for i in ids if i} & set(by_id))}


def _quality_notes(scores: Mapping[str, StageScores], run: RunData) -> list[str]:
  notes = [
      "correct = the final answer equals the reference after trimming whitespace and "
      "case-folding (extract: every scored field equal; numbers to 9 decimals); a missing "
      "answer (failed stage) counts as wrong",
      "frontier-only quality is not observable from one run: "
      "'escalated_record_frontier_accuracy' is the frontier tier's accuracy on the escalated "
      "records only (harder than average), used as its estimate",
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
        "threshold curve: at threshold t the stage escalates records with small confidence < "
        "t plus, at every t, small-tier failures and records without a confidence (as the "
        "pipeline does); the budget cap is ignored; cost = small cost of all + "
        "frontier_only_cost_usd of escalated; PARTLY ESTIMATED: for records not escalated "
        "in the run the frontier's correctness is unknown and is set to the observed "
        "escalated-record frontier accuracy (p_frontier_estimate); points with estimated=true "
        "use it",
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
                 charts: bool = True) -> dict:
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
  """
  run = read_run(output_dir, (*ID_FIELDS, id_field) if id_field else ID_FIELDS)
  notes = [
      f"{run.rows_read} result rows read from {len(run.files)} files; "
      f"{run.rows_read - run.n} duplicate rows dropped (one row per record_id, an ok row "
      f"preferred)",
      "small-only cost = the small tier's cost in this run (it ran on every stage of every "
      "record); frontier-only cost = sum of frontier_only_cost_usd, the ledger's estimate "
      "(actual frontier cost where escalated, else the small tier's tokens at frontier prices)",
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
  if labels:
    label_rows = read_labels(labels)
    idf = _pick_id_field(run, label_rows, id_field)
    refs, join = _reference_rows(run, label_rows, idf)
    fields, fnotes = _resolve_label_fields(run, label_rows, label_fields)
    notes += fnotes
    by_name = {s.name: s for s in run.stages}
    scores = {name: _score_stage(by_name[name], run, refs, cols) for name, cols in fields.items()}
    report["inputs"].update({"id_field": idf, "label_fields": fields, **join})
    if join["records_with_labels"] < run.n:
      notes.append(f"{run.n - join['records_with_labels']} of {run.n} records have no label; "
                   f"quality figures cover labelled records only")
    notes += _quality_notes(scores, run)
  else:
    notes.append("cost-only report: no labels given, so no quality, oracle or AIQ; the "
                 "threshold curve shows cost only")
  report["mode"] = "cost_and_quality" if scores else "cost_only"
  report["stages"] = _stages_json(run, scores)
  report["quality"] = _run_quality(scores) if scores else None
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
    write_outputs(report, out_dir, charts=charts)
  return report


def _stages_json(run: RunData, scores: Mapping[str, StageScores]) -> dict:
  out = {}
  for s in run.stages:
    sc = scores.get(s.name)
    entry = {"kind": s.kind, "threshold": _mode(s.col("threshold")[s.present]),
             "small_model": _mode(s.col("small_model")[s.present]),
             "frontier_model": _mode(s.col("frontier_model")[s.present]),
             "failed": int((s.present & _is_null(s.col("final_tier"))).sum()),
             "escalation": _escalation(s), "cost": _stage_cost(s),
             "quality": None, "oracle": None}
    routed = None
    if sc is not None:
      entry["quality"] = _stage_quality(s, sc)
      entry["oracle"] = _oracle(s, sc)
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
            "accuracy_estimate": entry["quality"]["escalated_record_frontier_accuracy"]}
    entry["threshold_curve"] = _curve_json(_threshold_curve(s, sc), routed)
    out[s.name] = entry
  return out


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



_COLORS = {"small": "#4C9F70", "frontier": "#3A6EA5", "frontier_only": "#B0B7C3",
           "low_confidence": "#3A6EA5", "no_confidence_signal": "#7FA7D1",
           "small_failure": "#D1603D", "other": "#9B7EBD", "budget_skipped": "#E8B04A",
           "curve": "#3A6EA5", "hull": "#3A6EA5", "routed": "#D1603D", "oracle": "#2E8B57"}
_REASON_LABELS = {"low_confidence": "low confidence",
                  "no_confidence_signal": "no confidence signal",
                  "small_failure": "small tier failed", "other": "other",
                  "budget_skipped": "wanted, skipped by budget cap"}


def _title_suffix(report: dict) -> str:
  models = report["run"]["models"]
  small = ", ".join(models["small"]) or "?"
  frontier = ", ".join(models["frontier"]) or "none called"
  books = ", ".join(report["run"]["price_book_versions"]) or "?"
  return f"small: {small}  →  frontier: {frontier}   ·   price book {books}"


def _suptitle(fig, text: str) -> None:
  """A figure title wrapped to the figure's width (long model names must not be cut off)."""
  import textwrap
  width = max(30, int(fig.get_figwidth() * 12))
  lines = [w for line in text.split("\n") for w in textwrap.wrap(line, width) or [""]]
  fig.suptitle("\n".join(lines), fontsize=10.5)


def _figure(width: float, height: float):
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
  return fig


def _style(ax) -> None:
  ax.grid(True, color="#E3E6EA", linewidth=0.8)
  ax.set_axisbelow(True)
  for side in ("top", "right"):
    ax.spines[side].set_visible(False)


def _plot_quality_curve(ax, stage: dict) -> None:
  curve = stage["threshold_curve"]
  pts = curve["points"]
  x = [p["cost_per_1k"] for p in pts]
  y = [100 * p["accuracy"] for p in pts]
  hull = curve["hull"] or []
  ymin = min(y + [100 * (stage["quality"]["small_only_accuracy"] or 0)]) - 2
  if hull:
    hx = [h["cost_per_1k"] for h in hull]
    hy = [100 * h["accuracy"] for h in hull]
    ax.fill_between(hx, hy, ymin, color=_COLORS["hull"], alpha=0.12,
                    label=f"non-decreasing hull (AIQ {curve['aiq']:.3f})")
    ax.plot(hx, hy, color=_COLORS["hull"], linewidth=1, alpha=0.5)
  ax.plot(x, y, color=_COLORS["curve"], linewidth=1.6, marker=".", markersize=3,
          label="threshold sweep (partly estimated)")
  marks = [
      (curve.get("chosen_point"), "D", "#1F3B5C", "chosen threshold {t}", "accuracy"),
      (curve.get("routed_point"), "*", _COLORS["routed"], "routed (this run)", "accuracy"),
      (stage.get("small_only_point"), "o", _COLORS["small"], "small only", "accuracy"),
      (stage.get("frontier_only_point"), "s", _COLORS["frontier"], "frontier only (est.)",
       "accuracy_estimate"),
      (stage["oracle"] and {"cost_per_1k": stage["oracle"]["cost_per_1k"],
                            "accuracy": stage["oracle"]["accuracy"]},
       "^", _COLORS["oracle"], "oracle cascade", "accuracy"),
  ]
  for point, marker, color, label, key in marks:
    if not point or point.get(key) is None or point.get("cost_per_1k") is None:
      continue
    label = label.format(t=f"{curve['chosen_threshold']:.2f}" if curve["chosen_threshold"]
                         is not None else "?")
    hollow = marker == "s"
    ax.scatter([point["cost_per_1k"]], [100 * point[key]], marker=marker,
               s=150 if marker == "*" else 60, zorder=5, label=label,
               facecolors="white" if hollow else color, edgecolors=color, linewidths=1.5)
  ax.set_ylim(bottom=ymin)
  ax.set_xlabel("cost, USD per 1k records (this stage)")
  ax.set_ylabel("accuracy, %")
  ax.legend(fontsize=7.5, loc="lower right", framealpha=0.9)


def _plot_cost_curve(ax, stage: dict) -> None:
  curve = stage["threshold_curve"]
  pts = curve["points"]
  ax.plot([p["threshold"] for p in pts], [p["cost_per_1k"] for p in pts],
          color=_COLORS["curve"], linewidth=1.6, drawstyle="steps-post",
          label="cost if escalating confidence < t")
  only = stage["cost"]["frontier_only_per_1k"]
  if only is not None:
    ax.axhline(only, color=_COLORS["frontier_only"], linestyle="--", label="frontier only")
  ax.axhline(stage["cost"]["small_tier_per_1k"] or 0, color=_COLORS["small"], linestyle=":",
             label="small only")
  routed = stage["cost"]["routed_per_1k"]
  if routed is not None and curve["chosen_threshold"] is not None:
    ax.scatter([curve["chosen_threshold"]], [routed], marker="*", s=150, zorder=6,
               color=_COLORS["routed"], label="routed (this run)")
  cp = curve.get("chosen_point")
  if cp:
    ax.scatter([cp["threshold"]], [cp["cost_per_1k"]], marker="D", color="#1F3B5C", zorder=5,
               label=f"chosen threshold {cp['threshold']:.2f} "
                     f"({100 * (cp['escalated'] / max(curve['records'], 1)):.0f}% escalated)")
  ax.set_xlim(0, 1.02)
  ax.set_xlabel("threshold on the small tier's confidence")
  ax.set_ylabel("cost, USD per 1k records (this stage)")
  ax.legend(fontsize=7.5, loc="lower right", framealpha=0.9)


def _chart_cost_quality(report: dict, path: str) -> None:
  stages = list(report["stages"].items())
  with_q = [(n, s) for n, s in stages if s["threshold_curve"]["points"]
            and "accuracy" in s["threshold_curve"]["points"][0]]
  shown = with_q or [(n, s) for n, s in stages if s["threshold_curve"]["points"]]
  cols = max(1, min(3, len(shown)))
  rows = max(1, math.ceil(len(shown) / cols))
  fig = _figure(5.2 * cols, 4.2 * rows + 0.6)
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax, (name, stage) in zip(axes, shown):
    _style(ax)
    if with_q:
      _plot_quality_curve(ax, stage)
    else:
      _plot_cost_curve(ax, stage)
    kind = "" if stage["kind"] == name else f" ({stage['kind']})"
    ax.set_title(f"{name}{kind}: {stage['small_model'] or '?'} → "
                 f"{stage['frontier_model'] or '—'}", fontsize=9.5)
  for ax in axes[len(shown):]:
    ax.set_visible(False)
  head = ("Cost vs quality over escalation thresholds" if with_q else
          "Cost over escalation thresholds (no labels: quality not computed)")
  _suptitle(fig, f"{head}\n{_title_suffix(report)}")
  fig.savefig(path)


def _chart_escalation(report: dict, path: str) -> None:
  names = list(report["stages"])
  fig = _figure(max(7.0, 1.6 * len(names) + 4.5), 4.4)
  ax = fig.subplots()
  _style(ax)
  bottom = np.zeros(len(names))
  for cls in (*REASON_CLASSES, "budget_skipped"):
    vals = np.array([100 * (report["stages"][n]["escalation"]["by_reason_rate"][cls] or 0)
                     for n in names])
    if not vals.any():
      continue
    ax.bar(names, vals, bottom=bottom, color=_COLORS[cls], label=_REASON_LABELS[cls],
           width=0.6, hatch="//" if cls == "budget_skipped" else None,
           edgecolor="white", linewidth=0.6)
    bottom += vals
  for i, n in enumerate(names):
    esc = report["stages"][n]["escalation"]
    ax.annotate(f"{100 * (esc['escalation_rate'] or 0):.1f}% sent\n({esc['escalated']}/"
                f"{esc['records']})", (i, bottom[i]), ha="center", va="bottom", fontsize=8,
                xytext=(0, 3), textcoords="offset points")
  ax.set_ylim(0, max(5.0, float(bottom.max()) * 1.25))
  ax.set_ylabel("% of records")
  ax.set_xlabel("stage")
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              title="escalation reason", title_fontsize=8, frameon=False)
  _suptitle(fig, f"Escalations to the frontier tier by stage and reason\n{_title_suffix(report)}")
  fig.savefig(path)


def _chart_cost(report: dict, path: str) -> None:
  groups = [(n, s["cost"]) for n, s in report["stages"].items()]
  total = report["cost"]
  groups.append(("all stages", {
      "small_tier_per_1k": _per_1k(total["small_tier_usd"], report["run"]["records"]),
      "frontier_tier_per_1k": _per_1k(total["frontier_tier_usd"], report["run"]["records"]),
      "frontier_only_per_1k": total["frontier_only_per_1k"],
      "savings_pct": total["savings_pct"]}))
  x = np.arange(len(groups))
  w = 0.36
  fig = _figure(max(6.0, 1.9 * len(groups) + 2.5), 4.6)
  ax = fig.subplots()
  _style(ax)
  small = np.array([g["small_tier_per_1k"] or 0 for _, g in groups])
  front = np.array([g["frontier_tier_per_1k"] or 0 for _, g in groups])
  only = np.array([g["frontier_only_per_1k"] or 0 for _, g in groups])
  ax.bar(x - w / 2, small, w, color=_COLORS["small"], label="routed: small tier")
  ax.bar(x - w / 2, front, w, bottom=small, color=_COLORS["frontier"],
         label="routed: frontier tier")
  ax.bar(x + w / 2, only, w, color=_COLORS["frontier_only"], label="frontier only (estimate)")
  top = float(max((small + front).max(), only.max(), 1e-12))
  for i, (_, g) in enumerate(groups):
    if g.get("savings_pct") is not None:
      ax.annotate(f"saves {g['savings_pct']:.0f}%", (x[i], max(small[i] + front[i], only[i])),
                  ha="center", va="bottom", fontsize=8, xytext=(0, 3),
                  textcoords="offset points")
  ax.set_xticks(x, [n for n, _ in groups])
  ax.set_ylim(0, top * 1.2)
  ax.set_ylabel("USD per 1k records")
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
  _suptitle(fig, f"Cost by stage and tier vs frontier only\n{_title_suffix(report)}")
  fig.savefig(path)


def write_charts(report: dict, out_dir: str) -> dict[str, str]:
  """The three PNGs; returns name -> path."""
  paths = {name: os.path.join(out_dir, name) for name in CHARTS}
  _chart_cost_quality(report, paths["cost_quality.png"])
  _chart_escalation(report, paths["escalation_by_stage.png"])
  _chart_cost(report, paths["cost_breakdown.png"])
  return paths


def write_outputs(report: dict, out_dir: str, *, charts: bool = True) -> dict[str, str]:
  """Writes report.json, the PNGs and a self-contained report.html into out_dir."""
  os.makedirs(out_dir, exist_ok=True)
  paths = write_charts(report, out_dir) if charts else {}
  data = _jsonable(report)
  paths["report.json"] = os.path.join(out_dir, "report.json")
  with open(paths["report.json"], "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, allow_nan=False)
    f.write("\n")
  paths["report.html"] = os.path.join(out_dir, "report.html")
  with open(paths["report.html"], "w", encoding="utf-8") as f:
    f.write(render_html(data, {k: v for k, v in paths.items() if k.endswith(".png")}))
  return paths


def _jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.bool_):
    return bool(value)
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, (float, np.floating)):
    v = float(value)
    return v if math.isfinite(v) else None
  return value


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1100px;color:#1d2733;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;
border-bottom:1px solid #e3e6ea;padding-bottom:.3rem}.sub{color:#5b6673}
.cards{display:flex;flex-wrap:wrap;gap:.8rem;margin:1rem 0}.card{border:1px solid #e3e6ea;
border-radius:8px;padding:.6rem .9rem;min-width:150px}.card b{display:block;font-size:1.3rem}
.card span{color:#5b6673;font-size:.8rem}table{border-collapse:collapse;margin:.5rem 0;
font-size:13px}th,td{padding:.3rem .7rem;border-bottom:1px solid #eef0f2;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f6f7f9}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eef0f2}
figcaption{color:#5b6673;font-size:.85rem}li{margin:.2rem 0}.est{color:#a05a00}
"""


def _fmt(value: Any, kind: str = "num") -> str:
  if value is None:
    return "—"
  if kind == "usd":
    return f"${value:,.4f}" if abs(value) < 100 else f"${value:,.2f}"
  if kind == "pct":
    return f"{value:.1f}%"
  if kind == "rate":
    return f"{100 * value:.1f}%"
  if isinstance(value, float):
    return f"{value:.4g}"
  return html.escape(str(value))


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
  head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
  body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def _ci(report: dict, key: str, kind: str) -> str:
  ci = report["bootstrap"]["intervals"].get(key)
  if not ci:
    return ""
  return f" <small>[{_fmt(ci['lo'], kind)}, {_fmt(ci['hi'], kind)}]</small>"


def _cards(report: dict) -> str:
  c, r = report["cost"], report["run"]
  items = [
      ("routed cost / 1k records", _fmt(c["routed_per_1k"], "usd") +
       _ci(report, "routed_cost_per_1k", "usd")),
      ("frontier only / 1k (est.)", _fmt(c["frontier_only_per_1k"], "usd")),
      ("small only / 1k", _fmt(c["small_only_per_1k"], "usd")),
      ("savings vs frontier only", _fmt(c["savings_pct"], "pct") + _ci(report, "savings_pct",
                                                                        "pct")),
      ("records escalated", _fmt(r["escalation_rate"], "rate")),
      ("records failed", f"{r['failed']} / {r['records']}"),
  ]
  if report["quality"]:
    items.append(("routed accuracy", _fmt(report["quality"]["routed_accuracy"], "rate") +
                  _ci(report, "routed_accuracy", "rate")))
  return '<div class="cards">' + "".join(
      f'<div class="card"><b>{v}</b><span>{html.escape(k)}</span></div>' for k, v in items
  ) + "</div>"


def _stage_tables(report: dict) -> str:
  stages = report["stages"]
  cost = _table(
      ["stage", "records", "small tier", "frontier tier", "routed", "frontier only",
       "saved", "routed / 1k", "frontier only / 1k"],
      [[html.escape(n), str(s["escalation"]["records"]), _fmt(s["cost"]["small_tier_usd"], "usd"),
        _fmt(s["cost"]["frontier_tier_usd"], "usd"), _fmt(s["cost"]["routed_usd"], "usd"),
        _fmt(s["cost"]["frontier_only_usd"], "usd"), _fmt(s["cost"]["savings_pct"], "pct"),
        _fmt(s["cost"]["routed_per_1k"], "usd"), _fmt(s["cost"]["frontier_only_per_1k"], "usd")]
       for n, s in stages.items()])
  esc = _table(
      ["stage", "threshold", "sent to frontier", "low confidence", "no signal",
       "small failed", "budget skipped", "frontier failed", "answer missing"],
      [[html.escape(n), _fmt(s["threshold"]), _fmt(s["escalation"]["escalation_rate"], "rate"),
        *(str(s["escalation"]["by_reason"][k]) for k in
          ("low_confidence", "no_confidence_signal", "small_failure", "budget_skipped")),
        str(s["escalation"]["frontier_failed"]), str(s["failed"])]
       for n, s in stages.items()])
  return f"<h2>Cost by stage and tier</h2>{cost}<h2>Escalations by stage</h2>{esc}"


def _quality_tables(report: dict) -> str:
  rows, oracle_rows = [], []
  for n, s in report["stages"].items():
    q = s["quality"]
    if not q:
      continue
    curve = s["threshold_curve"]
    rows.append([html.escape(n), str(q["labelled_records"]),
                 _fmt(q["routed_accuracy"], "rate") + _ci(report, f"stages.{n}.routed_accuracy",
                                                          "rate"),
                 _fmt(q["small_only_accuracy"], "rate"),
                 f'<span class="est">{_fmt(q["escalated_record_frontier_accuracy"], "rate")}'
                 f' (n={q["escalated_records_with_frontier_answer"]})</span>',
                 _fmt(q["error_non_escalated"], "rate") +
                 _ci(report, f"stages.{n}.error_non_escalated", "rate"),
                 _fmt(q["coverage"], "rate"), _fmt(curve["aiq"])])
    o = s["oracle"]
    if o:
      oracle_rows.append([html.escape(n), _fmt(o["accuracy"], "rate"),
                          _fmt(o["cost_per_1k"], "usd"), _fmt(o["escalation_rate"], "rate"),
                          str(o["frontier_assumed_correct"]),
                          _fmt(o["escalate_all_small_wrong_cost_per_1k"], "usd")])
  if not rows:
    return ""
  out = "<h2>Quality (labelled records)</h2>" + _table(
      ["stage", "labelled", "routed accuracy [95% CI]", "small only",
       "frontier on escalated records (est. of frontier only)",
       "error on non-escalated [95% CI]", "coverage", "AIQ"], rows)
  if oracle_rows:
    out += "<h2>Oracle cascade</h2>" + _table(
        ["stage", "accuracy", "cost / 1k labelled", "escalated", "frontier assumed right",
         "cost / 1k escalating every small error"], oracle_rows)
  return out


def render_html(report: dict, images: Mapping[str, str]) -> str:
  """One self-contained page; charts embedded as base64 (and named, files beside it)."""
  r = report["run"]
  figs = []
  captions = {"cost_quality.png": "Cost vs quality over thresholds (hull shaded; AIQ in legend)",
              "escalation_by_stage.png": "Escalations by stage and reason",
              "cost_breakdown.png": "Cost by stage and tier vs frontier only"}
  for name, path in images.items():
    with open(path, "rb") as f:
      data = base64.b64encode(f.read()).decode("ascii")
    figs.append(f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
                f'<figcaption>{html.escape(captions.get(name, name))} '
                f'(<a href="{name}">{name}</a>)</figcaption></figure>')
  notes = "".join(f"<li>{html.escape(n)}</li>" for n in report["notes"])
  mode = ("cost and quality" if report["mode"] == "cost_and_quality"
          else "cost only (no labels)")
  return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tierflow report</title>
<style>{_CSS}</style></head><body>
<h1>tierflow run report</h1>
<div class="sub">{html.escape(_title_suffix(report))}<br>
{r['records']} records · dt {_fmt(r['dt_min'])} … {_fmt(r['dt_max'])} ·
calibration {html.escape(', '.join(r['calibration_versions']) or 'none')} · {mode} ·
generated {html.escape(report['generated_at'])}</div>
{_cards(report)}
{''.join(figs)}
{_stage_tables(report)}
{_quality_tables(report)}
<h2>Notes and assumptions</h2><ul>{notes}</ul>
<p class="sub">Bootstrap: {report['bootstrap']['resamples']} resamples of records,
seed {report['bootstrap']['seed']}, {report['bootstrap']['method']}. All numbers are in
report.json.</p>
</body></html>
"""


# ----------------------------------------------------------------------------- CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
  """``tierflow report OUTPUT_DIR [--labels FILE] [--out DIR] ...``"""
  parser = argparse.ArgumentParser(prog="tierflow report", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_arguments(parser)
  args = parser.parse_args(argv)
  try:
    return run_from_args(args)
  except ValueError as e:
    print(f"tierflow report: error: {e}", file=sys.stderr)
    return 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The report's flags, for the ``tierflow report`` subcommand."""
  parser.add_argument("output_dir", help="a run's output directory (with results/)")
  parser.add_argument("--labels", help="reference answers, JSONL or Parquet")
  parser.add_argument("--label-field", action="append", default=[], metavar="STAGE=COL[,COL]",
                      help="label column(s) of a stage (repeatable)")
  parser.add_argument("--id-field", help="id column shared by results and labels")
  parser.add_argument("--out", help="report directory (default: OUTPUT_DIR/report)")
  parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
  parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")


def run_from_args(args: argparse.Namespace) -> int:
  out = args.out or os.path.join(args.output_dir, "report")
  report = build_report(args.output_dir, args.labels, _parse_label_fields(args.label_field),
                        out, id_field=args.id_field, resamples=args.resamples, seed=args.seed)
  c = report["cost"]
  print(f"records {report['run']['records']}  routed {_fmt(c['routed_per_1k'], 'usd')}/1k  "
        f"frontier-only {_fmt(c['frontier_only_per_1k'], 'usd')}/1k  "
        f"savings {_fmt(c['savings_pct'], 'pct')}")
  if report["quality"]:
    print(f"routed accuracy {_fmt(report['quality']['routed_accuracy'], 'rate')}")
  print(f"report: {os.path.join(out, 'report.html')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
