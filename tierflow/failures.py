"""``Failure``: the one shape of a record tierflow's transforms could not handle.

Adding source fields, decode, route and write each raise by default, as Beam's
``RunInference`` does; after ``.with_exception_handling()`` they return a NamedTuple
whose ``failures`` output holds ``Failure`` rows instead, the same type from all four, with a Beam
schema (``RowCoder``), so they can be flattened, written or queried together.
"""

# No ``from __future__ import annotations``: Beam reads the field types of ``Failure``
# from its annotations, which must be types, not strings, for its schema to have them.
import json
from typing import Any, NamedTuple, Optional

import apache_beam as beam

from tierflow.beam_schema import plain

__all__ = ["Failure", "failure_of_row"]

STEPS = ("source_fields", "decode", "route", "write")


class Failure(NamedTuple):
  """A record a step could not handle, and why.

  Attributes:
    step: ``source_fields`` (``AddSourceFields``), ``decode``, ``route`` or ``write``.
    error_type: a short kind (``invalid_json``, ``missing_field``, ``model_failure``,
      ``invalid_type``, or the exception's class name for an error in code).
    reason: what went wrong, readable.
    record_id: the record's id where known, else None.
    payload: the record as it reached the step: its raw bytes (decode), or the row as
      UTF-8 JSON (route: the result row, with its ledger, where routing produced one;
      source_fields and write: the row given).
  """
  step: str
  error_type: str
  reason: str
  record_id: Optional[str]
  payload: Optional[bytes]


beam.coders.registry.register_coder(Failure, beam.coders.RowCoder)


def failure_of_row(step: str, error_type: str, reason: str, row: Any) -> Failure:
  """A ``Failure`` for a row, a dict or a schema'd row (its ``record_id`` where it has one)."""
  row = plain(row)
  record_id = row.get("record_id") if isinstance(row, dict) else None
  payload = json.dumps(row, default=repr, sort_keys=True, ensure_ascii=False).encode(
      "utf-8", "backslashreplace")
  return Failure(step, error_type, reason[:4000],
                 record_id if isinstance(record_id, str) else None, payload)
