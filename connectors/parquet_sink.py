"""Hive-partitioned, idempotent Parquet output.

``WriteToHiveParquet`` writes dict rows carrying Kafka source metadata
(``record_id``, ``kafka_topic``, ``kafka_partition``, ``kafka_offset``, and a
partition value such as ``dt``) to::

  <output_dir>/dt=YYYY-MM-DD/<topic>-<partition:04d>-<first:020d>-<last:020d>.parquet

readable with ``pyarrow.dataset.dataset(output_dir, partitioning="hive")``,
DuckDB ``read_parquet('<output_dir>/**/*.parquet', hive_partitioning=true)``,
Spark, and BigQuery external tables with Hive partitioning.

Idempotence: rows are grouped by (partition value, topic, Kafka partition,
``kafka_offset // max_rows_per_file``) and each file is named after the first
and last offset it holds, with rows sorted by offset. It is written to a
hidden temporary name in the same directory and renamed over any file of the
same name, so a retried bundle, or a re-run over the same offset range,
replaces its own output rather than adding to it. Two *different* but
overlapping offset ranges give files with different names, so the overlap is
stored twice; ``record_id`` is deterministic, so readers deduplicate with
``DISTINCT ON (record_id)`` / ``QUALIFY ROW_NUMBER() OVER (PARTITION BY
record_id ...) = 1``. A crashed write can leave a ``.<name>.<hex>.inprogress``
file behind; the leading dot hides it from pyarrow, DuckDB globs on
``*.parquet``, Spark and BigQuery.

The partition column (``dt``) lives only in the directory name, not in the
files: BigQuery refuses Hive keys that overlap file columns, and Spark and
DuckDB would otherwise see one column from two sources. Readers get it back
from the path: pyarrow's ``"hive"`` partitioning infers ``string`` (or use
``hive_partitioning()``); DuckDB casts ``YYYY-MM-DD`` to ``DATE`` unless given
``hive_types={'dt': VARCHAR}``.
"""

from __future__ import annotations

import datetime
import decimal
import json
import logging
import re
import time
import uuid
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
from apache_beam import pvalue
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger
from apache_beam.transforms import window
from apache_beam.transforms.display import DisplayDataItem
from apache_beam.utils.timestamp import Duration

from tierflow import schemas

__all__ = [
    "WriteToHiveParquet",
    "ParquetWriteResult",
    "FILES_TAG",
    "FAILED_TAG",
    "METRICS_NAMESPACE",
    "file_name",
    "hive_partitioning",
    "to_dead_letter",
]

_LOGGER = logging.getLogger(__name__)

FILES_TAG = "files"
FAILED_TAG = "failed"
METRICS_NAMESPACE = "tierflow.parquet"

# Fields every row needs: they route the row to its directory and file.
_ROUTING_FIELDS = ("record_id", "kafka_topic", "kafka_partition", "kafka_offset")
_COMPRESSIONS = ("zstd", "snappy", "gzip", "brotli", "lz4", "none")
# Kafka topic names are [a-zA-Z0-9._-]; partition values are restricted to the
# same characters (no leading dot) so they are safe as a path segment.
_TOPIC_RE = re.compile(r"[A-Za-z0-9._-]{1,249}")
_PARTITION_VALUE_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_MAX_PARTITION_VALUE_LEN = 255

# Errors pyarrow raises for values that do not fit the schema.
_DATA_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError,
                ValueError)


class ParquetWriteResult(NamedTuple):
  """Outputs of ``WriteToHiveParquet``.

  Attributes:
    files: paths (str) of the files written, one element per file write.
    failed: rows that could not be written, as dicts ``{"row": <the input
      row>, "error_type": str, "reason": str}``; see ``to_dead_letter``.
  """
  files: pvalue.PCollection
  failed: pvalue.PCollection


def file_name(topic: str, partition: int, first_offset: int, last_offset: int) -> str:
  """The name of the file holding offsets [first_offset, last_offset] of a partition."""
  return f"{topic}-{partition:04d}-{first_offset:020d}-{last_offset:020d}.parquet"


def hive_partitioning(partition_field: str = "dt") -> pds.Partitioning:
  """pyarrow Hive partitioning that reads ``partition_field`` as a string."""
  return pds.partitioning(pa.schema([(partition_field, pa.string())]), flavor="hive")


def to_dead_letter(
    failure: Mapping[str, Any],
    *,
    stage: str = "write_parquet",
    failed_at_millis: Optional[int] = None) -> dict:
  """A ``dead_letter.avsc`` record for an element of ``ParquetWriteResult.failed``.

  Source fields that are missing or of the wrong type get placeholders ("",
  -1, 0; ``dt`` from ``failed_at``); the whole row is kept as JSON in
  ``raw_value``.
  """
  row = failure.get("row")
  get = row.get if isinstance(row, Mapping) else (lambda _: None)
  if failed_at_millis is None:
    failed_at_millis = int(time.time() * 1000)

  def _int(value, low, high, default):
    ok = isinstance(value, int) and not isinstance(value, bool)
    return value if ok and low <= value < high else default

  def _str(value):
    return value if isinstance(value, str) else ""

  dt = get("dt")
  if not (isinstance(dt, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", dt)):
    dt = datetime.datetime.fromtimestamp(
        failed_at_millis / 1000, tz=datetime.timezone.utc).strftime("%Y-%m-%d")
  return {
      "record_id": _str(get("record_id")),
      "kafka_topic": _str(get("kafka_topic")),
      "kafka_partition": _int(get("kafka_partition"), 0, 2**31, -1),
      "kafka_offset": _int(get("kafka_offset"), 0, 2**63, -1),
      "kafka_timestamp": _int(get("kafka_timestamp"), -2**63, 2**63, 0),
      "dt": dt,
      "stage": stage,
      "error_type": str(failure.get("error_type", "unknown")),
      "reason": str(failure.get("reason", "")),
      "raw_key": None,
      "raw_value": json.dumps(
          row, default=repr, sort_keys=True, ensure_ascii=False).encode("utf-8"),
      "failed_at": failed_at_millis,
  }


def _failure(row: Any, error_type: str, reason: str) -> dict:
  return {"row": row, "error_type": error_type, "reason": reason}


def _type_check(arrow_type: pa.DataType) -> Optional[Callable[[Any], bool]]:
  """A strict check of a top-level value for ``arrow_type``, or None.

  pyarrow alone is lenient (it truncates 1.5 into an int64 column and encodes
  str into binary), so simple types are checked against their Avro meaning;
  nested types are left to pyarrow.
  """
  def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)

  if pa.types.is_integer(arrow_type):
    bits = arrow_type.bit_width
    if pa.types.is_signed_integer(arrow_type):
      low, high = -2**(bits - 1), 2**(bits - 1)
    else:
      low, high = 0, 2**bits
    return lambda v: _is_int(v) and low <= v < high
  if pa.types.is_floating(arrow_type):
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  if pa.types.is_boolean(arrow_type):
    return lambda v: isinstance(v, bool)
  if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
    return lambda v: isinstance(v, str)
  if (pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type) or
      pa.types.is_fixed_size_binary(arrow_type)):
    return lambda v: isinstance(v, (bytes, bytearray))
  if pa.types.is_timestamp(arrow_type):
    # Epoch ints in the column's unit, or timezone-aware datetimes.
    return lambda v: _is_int(v) or (
        isinstance(v, datetime.datetime) and v.tzinfo is not None)
  if pa.types.is_date(arrow_type):
    return lambda v: _is_int(v) or (
        isinstance(v, datetime.date) and not isinstance(v, datetime.datetime))
  if pa.types.is_decimal(arrow_type):
    return lambda v: isinstance(v, decimal.Decimal)
  return None


class _RowValidator(object):
  """Checks a row against the Arrow schema before it is routed to a file."""
  def __init__(self, arrow_schema: pa.Schema, partition_field: str):
    self._partition_field = partition_field
    self._fields = [(f.name, f.type, f.nullable, _type_check(f.type))
                    for f in arrow_schema]
    self._names = frozenset(f.name for f in arrow_schema)

  def error(self, row: Any) -> Optional[tuple[str, str]]:
    """(error_type, reason) for a row that cannot be written, else None."""
    if not isinstance(row, Mapping):
      return "invalid_type", f"row is a {type(row).__name__}, not a dict"
    unexpected = sorted(str(k) for k in row if k not in self._names)
    if unexpected:
      return "unexpected_field", f"fields not in the schema: {unexpected}"
    for name, arrow_type, nullable, check in self._fields:
      value = row.get(name)
      if value is None:
        if not nullable:
          return "missing_field", f"required field {name!r} is missing or null"
        continue
      if check is not None and not check(value):
        return "invalid_type", (
            f"field {name!r}: {type(value).__name__} {_short_repr(value)} "
            f"does not fit {arrow_type}")
    topic = row["kafka_topic"]
    if not _TOPIC_RE.fullmatch(topic) or topic[0] in "._":
      # A leading "." or "_" would hide the file from Hive-style readers.
      return "invalid_type", (
          f"kafka_topic {topic!r} is not a Kafka topic name that can start a "
          "visible file name ([A-Za-z0-9._-], no leading '.' or '_')")
    if row["kafka_partition"] < 0 or row["kafka_offset"] < 0:
      return "invalid_type", "kafka_partition and kafka_offset must be >= 0"
    value = row[self._partition_field]
    if (len(value) > _MAX_PARTITION_VALUE_LEN or
        not _PARTITION_VALUE_RE.fullmatch(value)):
      return "invalid_partition", (
          f"{self._partition_field} {_short_repr(value)} is not a safe Hive "
          "partition value ([A-Za-z0-9._-], no leading dot)")
    return None


def _short_repr(value: Any, limit: int = 80) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


class _ValidateAndKeyDoFn(beam.DoFn):
  """Keys each valid row by its file group; tags invalid rows ``failed``."""
  def __init__(self, avro_schema: dict, partition_field: str, max_rows_per_file: int):
    self._avro_schema = avro_schema
    self._partition_field = partition_field
    self._max_rows_per_file = max_rows_per_file
    self._rows_failed = Metrics.counter(METRICS_NAMESPACE, "rows_failed")

  def setup(self):
    self._validator = _RowValidator(
        schemas.to_arrow(self._avro_schema), self._partition_field)

  def process(self, row):
    error = self._validator.error(row)
    if error is not None:
      self._rows_failed.inc()
      yield pvalue.TaggedOutput(FAILED_TAG, _failure(row, *error))
      return
    yield ((row[self._partition_field], row["kafka_topic"], row["kafka_partition"],
            row["kafka_offset"] // self._max_rows_per_file), row)


class _WriteGroupDoFn(beam.DoFn):
  """Writes one group of rows to one Parquet file named after its offsets."""
  def __init__(
      self, output_dir: str, avro_schema: dict, partition_field: str, compression: str):
    self._output_dir = output_dir
    self._avro_schema = avro_schema
    self._partition_field = partition_field
    self._compression = compression
    self._rows_written = Metrics.counter(METRICS_NAMESPACE, "rows_written")
    self._files_written = Metrics.counter(METRICS_NAMESPACE, "files_written")
    self._rows_failed = Metrics.counter(METRICS_NAMESPACE, "rows_failed")

  def setup(self):
    full = schemas.to_arrow(self._avro_schema)
    metadata = dict(full.metadata or {})
    metadata[b"tierflow.partition_field"] = self._partition_field.encode()
    self._schema = pa.schema(
        [f for f in full if f.name != self._partition_field], metadata=metadata)

  def process(self, element):
    (value, topic, partition, _), rows = element
    rows = sorted(rows, key=lambda r: (r["kafka_offset"], r["record_id"]))
    directory = FileSystems.join(self._output_dir, f"{self._partition_field}={value}")
    try:
      path = self._write(directory, topic, partition, rows)
    except _DATA_ERRORS as e:
      good, failures = self._split_bad_rows(rows)
      if not failures:
        raise
      _LOGGER.warning(
          "%d of %d rows for %s/%s-%d do not fit the schema: %s",
          len(failures), len(rows), directory, topic, partition, e)
      for failure in failures:
        self._rows_failed.inc()
        yield pvalue.TaggedOutput(FAILED_TAG, failure)
      if not good:
        return
      rows = good
      path = self._write(directory, topic, partition, rows)
    self._rows_written.inc(len(rows))
    self._files_written.inc()
    yield path

  def _table(self, rows: list) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=self._schema)

  def _write(self, directory: str, topic: str, partition: int, rows: list) -> str:
    """Writes rows (sorted by offset) to their final name; returns it."""
    table = self._table(rows)
    name = file_name(
        topic, partition, rows[0]["kafka_offset"], rows[-1]["kafka_offset"])
    path = FileSystems.join(directory, name)
    temp = FileSystems.join(directory, f".{name}.{uuid.uuid4().hex}.inprogress")
    try:
      with FileSystems.create(
          temp, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        pq.write_table(table, f, compression=self._compression)
      _rename_over(temp, path)
    except BaseException:
      _delete_quietly(temp)
      raise
    return path

  def _split_bad_rows(self, rows: list) -> tuple[list, list]:
    """(rows that fit the schema, failures for those that do not), by bisection."""
    try:
      pq.write_table(self._table(rows), pa.BufferOutputStream(), compression="none")
      return rows, []
    except _DATA_ERRORS as e:
      if len(rows) == 1:
        return [], [_failure(rows[0], "invalid_type", f"{type(e).__name__}: {e}")]
    middle = len(rows) // 2
    good_1, failed_1 = self._split_bad_rows(rows[:middle])
    good_2, failed_2 = self._split_bad_rows(rows[middle:])
    return good_1 + good_2, failed_1 + failed_2


def _rename_over(source: str, destination: str) -> None:
  """Renames source to destination, replacing destination if it exists."""
  try:
    FileSystems.rename([source], [destination])
  except BeamIOError:
    # Filesystems whose rename refuses to overwrite (e.g. HDFS).
    if not FileSystems.exists(destination):
      raise
    FileSystems.delete([destination])
    FileSystems.rename([source], [destination])


def _delete_quietly(path: str) -> None:
  try:
    if FileSystems.exists(path):
      FileSystems.delete([path])
  except Exception:  # pylint: disable=broad-except
    _LOGGER.warning("could not delete temporary file %s", path, exc_info=True)


class WriteToHiveParquet(beam.PTransform):
  """Writes dict rows to Hive-partitioned Parquet files named after their offsets.

  Bounded input is written in its global window: one file per (partition
  value, topic, Kafka partition, ``kafka_offset // max_rows_per_file``).

  Unbounded input is windowed into ``FixedWindows(window_seconds)`` by event
  time, fired when the watermark passes the window end and again for each
  late element (``AfterWatermark(late=AfterCount(1))``, discarding), giving
  one file per pane and group as above. Late-data policy: the Kafka source
  re-stamps records that arrive behind its partition watermark at the
  watermark, so no row should be late here; ``allowed_lateness_seconds`` is
  a second line of defence. Rows later than that are dropped by the runner,
  as in any Beam GroupByKey, so do not shrink it below the worst delay
  between stamping and this sink.

  Rows that do not fit the schema (wrong type, missing required field, field
  not in the schema, a partition value or topic that is unsafe in a path or
  would start a hidden file name, such as ``_schemas``) are not written and
  come out on ``failed``; I/O errors raise so the runner retries the bundle.

  Returns:
    ``ParquetWriteResult(files, failed)``; see its docstring.
  """
  def __init__(
      self,
      output_dir: str,
      avro_schema: Mapping[str, Any],
      *,
      partition_field: str = "dt",
      max_rows_per_file: int = 100_000,
      window_seconds: int = 60,
      allowed_lateness_seconds: int = 3600,
      compression: str = "zstd"):
    """Initializes ``WriteToHiveParquet``.

    Args:
      output_dir: root directory on any Beam filesystem (local, gs://, s3://).
      avro_schema: Avro record schema of the rows (``tierflow.schemas``); the
        Parquet schema is ``schemas.to_arrow(avro_schema)`` without
        ``partition_field``.
      partition_field: non-null string field whose value names the Hive
        directory ``<partition_field>=<value>``.
      max_rows_per_file: offsets per file; files hold offsets
        ``[k * max_rows_per_file, (k + 1) * max_rows_per_file)`` at most.
      window_seconds: fixed event-time window for unbounded input.
      allowed_lateness_seconds: allowed lateness for unbounded input.
      compression: Parquet codec (zstd, snappy, gzip, brotli, lz4, none).
    """
    super().__init__()
    if not isinstance(output_dir, str) or not output_dir:
      raise ValueError(f"output_dir must be a non-empty path, got {output_dir!r}")
    if not isinstance(avro_schema, Mapping) or avro_schema.get("type") != "record":
      raise ValueError("avro_schema must be an Avro record schema")
    arrow_schema = schemas.to_arrow(avro_schema)
    names = set(arrow_schema.names)
    missing = [f for f in (*_ROUTING_FIELDS, partition_field) if f not in names]
    if missing:
      raise ValueError(f"avro_schema lacks required fields {missing}")
    field = arrow_schema.field(partition_field)
    if field.nullable or not pa.types.is_string(field.type):
      raise ValueError(
          f"partition_field {partition_field!r} must be a non-null string field")
    if not (isinstance(max_rows_per_file, int) and max_rows_per_file >= 1):
      raise ValueError(f"max_rows_per_file must be >= 1, got {max_rows_per_file!r}")
    if not window_seconds > 0:
      raise ValueError(f"window_seconds must be > 0, got {window_seconds!r}")
    if not allowed_lateness_seconds >= 0:
      raise ValueError(
          f"allowed_lateness_seconds must be >= 0, got {allowed_lateness_seconds!r}")
    if compression not in _COMPRESSIONS:
      raise ValueError(f"compression must be one of {_COMPRESSIONS}, got {compression!r}")
    self._output_dir = output_dir
    self._avro_schema = json.loads(json.dumps(dict(avro_schema)))
    self._partition_field = partition_field
    self._max_rows_per_file = max_rows_per_file
    self._window_seconds = window_seconds
    self._allowed_lateness_seconds = allowed_lateness_seconds
    self._compression = compression

  def expand(self, pcoll):
    if pcoll.is_bounded:
      if not isinstance(pcoll.windowing.windowfn, window.GlobalWindows):
        pcoll = pcoll | "GlobalWindow" >> beam.WindowInto(window.GlobalWindows())
    else:
      pcoll = pcoll | "Window" >> beam.WindowInto(
          window.FixedWindows(self._window_seconds),
          trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
          accumulation_mode=trigger.AccumulationMode.DISCARDING,
          allowed_lateness=Duration(seconds=self._allowed_lateness_seconds))
    keyed = pcoll | "ValidateAndKey" >> beam.ParDo(
        _ValidateAndKeyDoFn(
            self._avro_schema, self._partition_field,
            self._max_rows_per_file)).with_output_types(
                Tuple[Tuple[str, str, int, int], Dict[str, Any]]).with_outputs(
                    FAILED_TAG, main="keyed")
    written = (
        keyed.keyed
        | "GroupByFile" >> beam.GroupByKey()
        | "Write" >> beam.ParDo(
            _WriteGroupDoFn(
                self._output_dir, self._avro_schema, self._partition_field,
                self._compression)).with_output_types(str).with_outputs(
                    FAILED_TAG, main=FILES_TAG))
    failed = ((keyed[FAILED_TAG], written[FAILED_TAG])
              | "Failed" >> beam.Flatten())
    return ParquetWriteResult(files=written[FILES_TAG], failed=failed)

  def display_data(self):
    return {
        "output_dir": DisplayDataItem(self._output_dir, label="Output directory"),
        "schema": DisplayDataItem(
            self._avro_schema.get("name", ""), label="Avro record schema"),
        "partition_field": DisplayDataItem(
            self._partition_field, label="Hive partition field"),
        "max_rows_per_file": DisplayDataItem(
            self._max_rows_per_file, label="Max rows (offsets) per file"),
        "window_seconds": DisplayDataItem(
            self._window_seconds, label="Window (unbounded input)"),
        "allowed_lateness_seconds": DisplayDataItem(
            self._allowed_lateness_seconds, label="Allowed lateness (unbounded input)"),
        "compression": DisplayDataItem(self._compression, label="Parquet codec"),
    }
