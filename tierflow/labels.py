"""Reference labels: reading them, joining them to a run's records, scoring the answers.

Labels are JSONL or Parquet keyed by ``ticket_id``/``doc_id``/``record_id``. Which
label columns a stage is scored against, and what counts as a match, belong to
the stage's kind (``tierflow.pipelines.stage_kinds``): a classify stage compares
its label with a column named like the stage, ``category`` or ``label``; an
extract stage every configured field with the column of the same name; a
summarise stage is not scored (exact match does not apply to free text). Each
stage's final answers are read from its own output column (``RunData.answers``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from tierflow.pipelines.stage_kinds import KINDS
from tierflow.results import ID_FIELDS, RunData, StageData, dataset_files, is_null, read_table

__all__ = ["LabelFields", "StageScores", "parse_label_fields", "pick_id_field", "read_labels",
           "reference_rows", "resolve_label_fields", "score_stage", "why_unscored"]

LabelFields = Mapping[str, Union[str, Sequence[str]]]


def read_labels(path: str) -> list[dict]:
  """Label rows from JSONL or Parquet (a file or a directory of files, any Beam filesystem)."""
  from apache_beam.io.filesystems import FileSystems
  if path.endswith((".parquet", ".pq")):
    return read_table(path).to_pylist()
  if not path.endswith((".jsonl", ".json", ".ndjson")):
    files = dataset_files(path)
    if files:
      return [row for f in files for row in read_table(f).to_pylist()]
  try:
    with FileSystems.open(path) as f:
      text = f.read().decode("utf-8")
  except Exception as e:  # noqa: BLE001 - each filesystem has its own errors
    raise ValueError(f"cannot read labels {path}: {e}") from None
  rows = []
  for n, line in enumerate(text.splitlines(), 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not JSON: {e}") from None
  return rows


def pick_id_field(run: RunData, label_rows: list[dict], id_field: Optional[str]) -> str:
  label_cols = set().union(*(r.keys() for r in label_rows)) if label_rows else set()
  candidates = [id_field] if id_field else list(ID_FIELDS)
  for c in candidates:
    in_results = c == "record_id" or "_id:" + c in run.records
    if c in label_cols and in_results:
      return c
  raise ValueError(f"no id field shared by the results and the labels (tried "
                   f"{', '.join(candidates)}); set --id-field")


def result_ids(run: RunData, id_field: str) -> np.ndarray:
  return run.records["record_id" if id_field == "record_id" else "_id:" + id_field]


def parse_label_fields(specs: Iterable[str]) -> dict[str, list[str]]:
  out = {}
  for spec in specs:
    stage, sep, cols = spec.partition("=")
    if not sep or not stage or not cols:
      raise ValueError(f"--label-field wants STAGE=COLUMN[,COLUMN...], got {spec!r}")
    out[stage.strip()] = [c.strip() for c in cols.split(",") if c.strip()]
  return out


def _kind(stage: StageData):
  return KINDS.get(stage.kind)


def why_unscored(stage: StageData) -> str:
  """Why a stage is not scored: its kind's reason (or that the kind is unknown)."""
  kind = _kind(stage)
  return kind.unscored_reason if kind is not None else f"unknown kind {stage.kind!r}"


def resolve_label_fields(run: RunData, label_rows: list[dict],
                         label_fields: Optional[LabelFields]) -> tuple[dict, list[str]]:
  """({stage: label columns} to score, notes on the stages left unscored)."""
  label_cols = set().union(*(r.keys() for r in label_rows)) if label_rows else set()
  given = {k: [v] if isinstance(v, str) else list(v) for k, v in (label_fields or {}).items()}
  by_name = {s.name: s for s in run.stages}
  for name, cols in given.items():
    if name not in by_name:
      raise ValueError(f"--label-field names stage {name!r}; the run has {sorted(by_name)}")
    kind = _kind(by_name[name])
    if kind is None or not kind.scored:
      raise ValueError(f"stage {name} is a {by_name[name].kind} stage; exact-match scoring "
                       f"does not apply to it ({why_unscored(by_name[name])}; score it with a "
                       f"judge instead)")
    missing = [c for c in cols if c not in label_cols]
    if missing:
      raise ValueError(f"label column(s) {missing} for stage {name} are not in the labels")
  notes, found = [], {}
  for s in run.stages:
    kind = _kind(s)
    if kind is None or not kind.scored:
      notes.append(f"stage {s.name} ({s.kind}) is not scored: {why_unscored(s)}")
      continue
    final = run.answers(s)
    if final is None:
      notes.append(f"stage {s.name} is not scored: the results have no column {s.output} "
                   f"(its output)")
      continue
    answers = [a for a in (*final, *s.col("small_answer")) if a][:1000]
    found[s.name] = given.get(s.name) or kind.default_label_fields(s.name, label_cols, answers)
  # A label column several stages would score is a default only for the stage named like it.
  claimed = collections.Counter(c for cols in found.values() for c in cols)
  out = {}
  for name, cols in found.items():
    shared = [c for c in cols if claimed[c] > 1 and c != name]
    if name in given:
      out[name] = given[name]
    elif shared:
      notes.append(f"stage {name} is not scored: label column(s) {', '.join(shared)} would "
                   f"score other stages too (name its columns with --label-field)")
    elif not cols:
      notes.append(f"stage {name} is not scored: no label column for it (use --label-field)")
    else:
      out[name] = cols
  return out, notes


def reference_rows(run: RunData, label_rows: list[dict], id_field: str
                   ) -> tuple[list[Optional[dict]], dict]:
  """(the label row of each record or None, counts of the join)."""
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
  ids = result_ids(run, id_field)
  refs = [by_id.get(str(i)) if i is not None else None for i in ids]
  matched = sum(r is not None for r in refs)
  return refs, {"label_rows": len(label_rows), "duplicate_label_ids": dupes,
                "records_with_labels": matched,
                "labels_without_results": len(by_id) - len({str(i) for i in ids if i} & set(by_id))}


@dataclasses.dataclass
class StageScores:
  """Per-record correctness of one stage (NaN where unknown or unlabelled)."""
  fields: list[str]
  labelled: np.ndarray
  final: np.ndarray
  small: Optional[np.ndarray]
  frontier: np.ndarray


def score_stage(stage: StageData, run: RunData, refs: list[Optional[dict]],
                fields: list[str]) -> StageScores:
  """Scores the final, small-tier and frontier answers of a stage against the labels."""
  kind = _kind(stage)
  n = run.n
  labelled = stage.present & np.array([kind.labelled(r, fields) for r in refs])
  final_col = run.answers(stage)
  tier = stage.col("final_tier")
  final, small, frontier = (np.full(n, np.nan) for _ in range(3))
  small_known = stage.small_answer_known | (tier == "small") | ~is_null(stage.col("small_error"))
  for i in np.flatnonzero(labelled):
    final[i] = kind.matches(final_col[i], refs[i], fields)
    if tier[i] == "frontier":
      frontier[i] = final[i]
    if small_known[i]:
      answer = final_col[i] if (tier[i] == "small" and not stage.small_answer_known[i]) \
          else stage.col("small_answer")[i]
      small[i] = kind.matches(answer, refs[i], fields)
  complete = bool(labelled.any()) and bool(small_known[labelled].all())
  return StageScores(fields, labelled, final, small if complete else None, frontier)
