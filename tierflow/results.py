"""Reading a run's output back: the one reader of results and dead letters.

``tierflow report``, ``tierflow calibrate`` and the run summary all read through
here, so they agree on what a run produced. Files are found and opened with
Beam's ``FileSystems``, so an output on ``gs://``, ``s3://`` or any filesystem
Beam knows reads like a local one. Rows are deduplicated by ``record_id`` (one
rule: an ``ok`` row if any, else the last row read, files in name order), since
overlapping runs can store a record twice. Each stage's answers are read from its own
output column, which the ledger names (``stages[].output``; for outputs written before it
did, the column its config gave by default: ``StageConfig.output``).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import types
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = ["ID_FIELDS", "RunData", "StageData", "dataset_files", "read_dead_letters",
           "read_run", "read_table"]

ID_FIELDS = ("ticket_id", "doc_id", "record_id")
RECORD_COLUMNS = ("record_id", "status", "escalated", "budget_skipped", "injection_suspected",
                  "cost_usd", "small_cost_usd", "frontier_cost_usd", "frontier_only_cost_usd",
                  "price_book_version", "calibration_version")
STAGE_FIELDS = ("stage", "kind", "output", "final_tier", "final_model", "confidence",
                "confidence_signal", "threshold", "route_score", "escalated",
                "escalation_reason", "budget_skipped", "small_model", "small_endpoint",
                "small_cost_usd", "small_answer", "small_field_confidence", "small_error",
                "frontier_model", "frontier_endpoint", "frontier_cost_usd", "frontier_error",
                "cost_usd", "frontier_only_cost_usd")
_FLOATS = {"confidence", "threshold", "route_score", "small_cost_usd", "frontier_cost_usd",
           "cost_usd", "frontier_only_cost_usd"}
_BOOLS = {"escalated", "budget_skipped"}


@dataclasses.dataclass
class StageData:
  """One stage's ledger as arrays aligned with the deduplicated records; ``output``: the
  record column holding its answer (``RunData.answers``)."""
  name: str
  kind: str
  output: str
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

  def answers(self, stage: StageData) -> Optional[np.ndarray]:
    """The final answer of ``stage`` per record (its output column), or None when the
    results have no such column."""
    return self.records.get(stage.output)


def _join(*parts: str) -> str:
  from apache_beam.io.filesystems import FileSystems
  return FileSystems.join(*parts)


def dataset_files(root: str) -> list[str]:
  """Visible Parquet files of a Hive-partitioned dataset (``root/dt=*/*.parquet``) or a flat
  directory of them, on any Beam filesystem, sorted by path."""
  from apache_beam.io.filesystems import FileSystems
  out = set()
  for pattern in (_join(root, "*", "*.parquet"), _join(root, "*.parquet")):
    try:
      for match in FileSystems.match([pattern]):
        out.update(m.path for m in match.metadata_list)
    except Exception:  # noqa: BLE001 - a pattern that matches nothing
      continue
  return sorted(p for p in out if not _hidden(p))


def _hidden(path: str) -> bool:
  parts = path.rstrip("/").split("/")
  return any(part.startswith((".", "_")) for part in parts[-2:])


def read_table(path: str) -> pa.Table:
  """One Parquet file from any Beam filesystem."""
  from apache_beam.io.filesystems import FileSystems
  with FileSystems.open(path) as f:
    return pq.read_table(pa.BufferReader(f.read()))


def dt_of(path: str) -> Optional[str]:
  for part in path.split("/"):
    if part.startswith("dt="):
      return part[3:]
  return None


def column(table: pa.Table, name: str, length: int) -> list:
  return table.column(name).to_pylist() if name in table.column_names else [None] * length


def _read_file(path: str, id_candidates: Sequence[str]) -> tuple[dict, dict]:
  """(record columns, flat stage columns with ``_row``) of one results file."""
  table = read_table(path)
  n = table.num_rows
  if "stages" not in table.column_names or "record_id" not in table.column_names:
    raise ValueError(f"{path} is not a tierflow results file (no stages/record_id)")
  rec = {c: column(table, c, n) for c in RECORD_COLUMNS}
  for c in id_candidates:
    if c in table.column_names:
      rec["_id:" + c] = [None if v is None else str(v) for v in table.column(c).to_pylist()]
  rec["_dt"] = [dt_of(path)] * n
  stages = table.column("stages").combine_chunks()
  flat = pc.list_flatten(stages)
  names = {flat.type.field(i).name for i in range(flat.type.num_fields)}
  st = {f: (pc.struct_field(flat, f).to_pylist() if f in names else [None] * len(flat))
        for f in STAGE_FIELDS}
  st["output"] = _stage_outputs(st)
  for c in dict.fromkeys(st["output"]):
    if c in table.column_names and c not in rec:
      rec[c] = column(table, c, n)
  st["_row"] = pc.list_parent_indices(stages).to_numpy().tolist()
  st["_has_small_answer"] = [("small_answer" in names)] * len(flat)
  return rec, st


def _stage_outputs(st: dict[str, list]) -> list[str]:
  """Per ledger entry of a file, its stage's output column: as the ledger names it, else
  (written before it did) the column the stage's config gave by default."""
  from tierflow.pipelines.stage_kinds import output_columns
  first: dict[str, dict] = {}
  for name, kind, output in zip(st["stage"], st["kind"], st["output"]):
    seen = first.setdefault(name, {"name": name, "kind": kind, "output": output})
    seen["output"] = seen["output"] or output
  stages = [types.SimpleNamespace(**s) for s in first.values()]
  column = dict(zip(first, output_columns(stages)))
  return [column[name] for name in st["stage"]]


def dedupe_order(record_ids: list, status: list) -> list[int]:
  """Row index kept per record_id: an ``ok`` row if any, else the last; sorted by id."""
  keep: dict[str, int] = {}
  for i, (rid, s) in enumerate(zip(record_ids, status)):
    j = keep.get(rid)
    if j is None or s == "ok" or status[j] != "ok":
      keep[rid] = i
  return [keep[r] for r in sorted(keep)]


def is_null(values: np.ndarray) -> np.ndarray:
  return np.array([v is None for v in values], dtype=bool)


def _typed(name: str, values: list) -> np.ndarray:
  if name in _FLOATS or name.endswith("_usd"):
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)
  if name in _BOOLS:
    return np.array([bool(v) for v in values], dtype=bool)
  return np.array(values, dtype=object)


def mode(values: np.ndarray) -> Optional[Any]:
  vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
  return collections.Counter(vals).most_common(1)[0][0] if vals else None


def _results_root(output_dir: str) -> str:
  root = _join(output_dir, "results")
  return root if dataset_files(root) else output_dir


def read_run(output_dir: str, id_candidates: Sequence[str] = ID_FIELDS) -> RunData:
  """Results rows, deduplicated by ``record_id``, with per-stage arrays."""
  files = dataset_files(_results_root(output_dir))
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
  keep = dedupe_order(rec["record_id"], rec["status"])
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
    for f in STAGE_FIELDS:
      full = np.full(n, None, dtype=object)
      full[where] = np.array(st[f], dtype=object)[mask]
      cols[f] = _typed(f, list(full))
    present = np.zeros(n, dtype=bool)
    present[where] = True
    known = np.zeros(n, dtype=bool)
    known[where] = has_answer[mask]
    kind = mode(cols["kind"][present]) or "?"
    output = mode(cols["output"][present]) or name
    out.append(StageData(name, kind, output, present, cols, known))
  return out


def read_dead_letters(output_dir: str) -> dict:
  """Counts of the dead-letter dataset (distinct record_id and stage)."""
  files = dataset_files(_join(output_dir, "dead_letter"))
  seen, by_type, by_stage = set(), collections.Counter(), collections.Counter()
  for path in files:
    t = read_table(path)
    cols = [column(t, c, t.num_rows) for c in ("record_id", "stage", "error_type")]
    for rid, stage, etype in zip(*cols):
      if (rid, stage) in seen:
        continue
      seen.add((rid, stage))
      by_type[etype] += 1
      by_stage[stage] += 1
  return {"rows": len(seen), "record_ids": sorted({r for r, _ in seen}),
          "by_error_type": dict(by_type), "by_stage": dict(by_stage), "files": len(files)}
