"""``AddSourceFields``: the id and partition date tierflow's sink needs, for rows from any source.

Rows decoded from Kafka carry the source metadata of ``schemas/source_metadata.avsc``
(``record_id``, ``kafka_topic``, ``kafka_partition``, ``kafka_offset``,
``kafka_timestamp``, ``dt``), which ``WriteParquetDataset`` names its files and
partitions by. Rows from anywhere else (``beam.Create``, a file, BigQuery) get them
here:

* ``record_id``: the row's ``id_field`` as text, or else a digest of its content
  (SHA-256 of its canonical JSON), so the same row has the same id in every run;
* ``kafka_topic``: the ``source`` name; ``kafka_partition`` 0; ``kafka_offset``: a
  number derived from the id (the sink orders a file's rows and names its files by
  offsets, so a retried bundle replaces its own file);
* ``kafka_timestamp`` and ``dt``: from the row's ``time_field`` (epoch millis, a
  datetime, naive meaning UTC, or a Beam ``Timestamp``), or the given ``dt``
  (``YYYY-MM-DD``) at midnight UTC.

Rows are dicts or schema'd rows; when the input has a Beam schema, the output rows are
``beam.Row``s of the source fields' row type followed by the input's.

A row that cannot have them raises, unless ``.with_exception_handling()`` was called
(see ``AddSourceFields``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
from typing import Any, Mapping, NamedTuple, Optional

import apache_beam as beam
from apache_beam.utils.timestamp import Timestamp

from tierflow import schemas
from tierflow.beam_schema import (beam_row_type, fields_of, joined, plain, row_converter,
                                  row_type_of)
from tierflow.connectors.codecs import MAX_MILLIS, MIN_MILLIS
from tierflow.connectors.decode import dt_of, row_schema
from tierflow.failures import Failure, failure_of_row

__all__ = ["AddSourceFields", "SourceFieldsResult"]

STEP = "source_fields"  # ``Failure.step`` of its failures

SOURCE_FIELDS = tuple(schemas.field_names(schemas.load("source_metadata")))
SOURCE_TYPE = beam_row_type(schemas.load("source_metadata"))
_TOPIC = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,248}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class _RowError(ValueError):
  """A row that cannot get its source fields: ``error_type`` as in ``Failure``."""

  def __init__(self, error_type: str, reason: str, record_id: Optional[str] = None):
    super().__init__(f"{error_type}: {reason}")
    self.error_type, self.reason, self.record_id = error_type, reason, record_id


def _millis(value: Any, field: str, record_id: str) -> int:
  """Epoch millis of a time field's value (years 1-9999, as the decoders accept)."""
  if isinstance(value, datetime.datetime):
    if value.tzinfo is None:
      value = value.replace(tzinfo=datetime.timezone.utc)
    return int(value.timestamp() * 1000)
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    if math.isfinite(value) and MIN_MILLIS <= value < MAX_MILLIS:
      return int(value)
    raise _RowError("invalid_timestamp", f"time field {field!r}: {value!r} ms is outside "
                    "years 1-9999", record_id)
  if isinstance(value, Timestamp):
    return value.micros // 1000
  raise _RowError("invalid_timestamp", f"time field {field!r} is {type(value).__name__} "
                  f"{value!r:.80}, not epoch millis, a datetime or a Beam Timestamp",
                  record_id)


def _with_source_fields(row: Any, source: str, id_field: Optional[str],
                        time_field: Optional[str], dt: Optional[str]) -> dict:
  """``row`` with its source fields; _RowError when it cannot have them."""
  if not isinstance(row, Mapping):
    raise _RowError("invalid_row", f"AddSourceFields takes dicts or beam.Rows, got "
                    f"{type(row).__name__}")
  clash = [f for f in SOURCE_FIELDS if f in row]
  if clash:
    raise _RowError("source_field_clash", f"the row already has source field(s) {clash}")
  if id_field is not None:
    if row.get(id_field) is None:
      raise _RowError("missing_field", f"the row has no {id_field!r} (id_field): "
                      f"{dict(row)!r:.200}")
    record_id = str(row[id_field])
  else:
    canonical = json.dumps(row, sort_keys=True, default=str, ensure_ascii=False)
    record_id = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]
  if time_field is not None:
    if row.get(time_field) is None:
      raise _RowError("missing_field", f"the row has no {time_field!r} (time_field): "
                      f"{dict(row)!r:.200}", record_id)
    millis = _millis(row[time_field], time_field, record_id)
    dt = dt_of(millis)
  else:
    millis = int(datetime.datetime.fromisoformat(dt).replace(
        tzinfo=datetime.timezone.utc).timestamp() * 1000)
  offset = int.from_bytes(hashlib.sha256(record_id.encode("utf-8")).digest()[:8], "big") >> 1
  return {"record_id": record_id, "kafka_topic": source, "kafka_partition": 0,
          "kafka_offset": offset, "kafka_timestamp": millis, "dt": dt, **row}


class _AddFn(beam.DoFn):
  def __init__(self, source: str, id_field: Optional[str], time_field: Optional[str],
               dt: Optional[str], handle_errors: bool, schemad: bool):
    self._args = (source, id_field, time_field, dt)
    self._handle_errors = handle_errors
    self._schemad = schemad

  def setup(self):
    self._source_row = row_converter(schemas.load("source_metadata"))[1]

  def process(self, row):
    try:
      yield self._add(row)
      return
    except _RowError as e:
      if not self._handle_errors:
        raise ValueError(f"a row cannot get its source fields ({e.error_type}): {e.reason} "
                         "(call .with_exception_handling() to have such rows as "
                         "failures)") from None
      failure = failure_of_row(STEP, e.error_type, e.reason, row)
      if e.record_id is not None:
        failure = failure._replace(record_id=e.record_id)
    except Exception as e:  # noqa: BLE001 - an error in code: raised unless handled
      if not self._handle_errors:
        raise
      failure = failure_of_row(STEP, type(e).__name__, f"adding source fields raised {e!r}",
                               row)
    yield beam.pvalue.TaggedOutput("failures", failure)

  def _add(self, row):
    """A dict, or of a schema'd input a ``beam.Row``: the source fields, then the row's."""
    added = _with_source_fields(plain(row), *self._args)
    if not self._schemad:
      return added
    kept = fields_of(row)
    source = self._source_row({k: added[k] for k in SOURCE_FIELDS})
    return beam.Row(**source._asdict(), **kept)


class SourceFieldsResult(NamedTuple):
  """Outputs of ``AddSourceFields(...).with_exception_handling()``.

  Attributes:
    rows: the rows with their source fields (``AddSourceFields.row_schema``).
    failures: a ``tierflow.failures.Failure`` (step ``source_fields``) per row that could
      not have them, the row as JSON in ``payload``.
  """
  rows: beam.PCollection
  failures: beam.PCollection


class AddSourceFields(beam.PTransform):
  """Adds ``record_id``, ``kafka_*`` and ``dt`` to rows from any source, so
  ``WriteParquetDataset`` can write them (see the module docstring). Dict rows give
  dicts; rows of a schema'd PCollection give ``beam.Row``s (the source fields, then the
  input's).

  Args:
    source: names the rows' origin; it starts their file names (``kafka_topic``).
    id_field: the field that identifies a row; None: a digest of the row's content.
    time_field: the row's event time (epoch millis, a datetime or a Beam ``Timestamp``), for
      ``dt``.
    dt: the partition date (``YYYY-MM-DD``) of every row, when there is no time_field.

  A row that cannot have them raises (``ValueError`` with the reason), as does an error
  in code, unless ``.with_exception_handling()`` was called: then the output is
  ``SourceFieldsResult(rows, failures)``, one ``tierflow.failures.Failure`` (step
  ``source_fields``) per such row. A row cannot have them when it is neither a dict nor a
  ``beam.Row`` (``invalid_row``), already has a source field (``source_field_clash``),
  lacks ``id_field`` or ``time_field`` (``missing_field``), or its time is not epoch
  millis, a datetime or a Beam ``Timestamp``, or is outside years 1-9999
  (``invalid_timestamp``).
  ``row_schema(input_schema)`` is the Avro schema of the output rows.
  """

  def __init__(self, source: str, *, id_field: Optional[str] = None,
               time_field: Optional[str] = None, dt: Optional[str] = None):
    super().__init__()
    if not isinstance(source, str) or not _TOPIC.fullmatch(source):
      raise ValueError(f"source must be a name of [A-Za-z0-9._-] (it starts file names), "
                       f"got {source!r}")
    for name, value in (("id_field", id_field), ("time_field", time_field), ("dt", dt)):
      if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__} {value!r}")
    if (time_field is None) == (dt is None):
      raise ValueError("give time_field (each row's event time) or dt (one date for every "
                       "row), not both or neither")
    if dt is not None:
      try:
        ok = _DATE.fullmatch(dt) and datetime.date.fromisoformat(dt)
      except ValueError:
        ok = False
      if not ok:
        raise ValueError(f"dt must be a date YYYY-MM-DD, got {dt!r}")
    self._source, self._id, self._time, self._dt = source, id_field, time_field, dt
    self._handle_errors = False

  def with_exception_handling(self) -> "AddSourceFields":
    """Outputs ``SourceFieldsResult(rows, failures)`` instead of raising (see the class)."""
    self._handle_errors = True
    return self

  def row_schema(self, input_schema: Mapping[str, Any]) -> dict:
    """The Avro schema of the output rows: source metadata, then ``input_schema``'s
    fields (ValueError when it lacks ``id_field`` or ``time_field``)."""
    names = set(schemas.field_names(input_schema))
    missing = [f for f in (self._id, self._time) if f is not None and f not in names]
    if missing:
      raise ValueError(f"{input_schema.get('name')} has no field {', '.join(missing)}")
    return row_schema(input_schema)

  def expand(self, rows):
    input_type = row_type_of(rows.element_type)
    add = beam.ParDo(_AddFn(self._source, self._id, self._time, self._dt,
                            self._handle_errors, input_type is not None))
    if input_type is not None:
      names = {name for name, _ in input_type._fields}
      missing = [f for f in (self._id, self._time) if f is not None and f not in names]
      if missing:
        raise ValueError(f"the input rows' schema has no field {', '.join(missing)}")
      add = add.with_output_types(joined(SOURCE_TYPE, input_type))
    out = rows | "AddSourceFields" >> add.with_outputs("failures", main="rows")
    if not self._handle_errors:
      return out.rows
    return SourceFieldsResult(out.rows, out.failures | "Failures" >> beam.Map(
        lambda f: f).with_output_types(Failure))
