"""Hive-partitioned, idempotent Parquet datasets.

Layout::

  <output>/results/dt=YYYY-MM-DD/<topic>-<partition:04d>-<first:020d>-<last:020d>.parquet
  <output>/dead_letter/dt=YYYY-MM-DD/<same name>.parquet

readable with ``pyarrow.dataset``, DuckDB ``read_parquet('<output>/results/**/*.parquet',
hive_partitioning=true)``, Spark and BigQuery external tables with Hive
partitioning.

``WriteBatches`` writes whole batches (``DecodedBatch``): a batch covers an
offset range of one partition (``kafka_source``), and each of its files is
named after that range. Every file is written under a hidden temporary name
in its directory and renamed into place; a crash leaves at most a hidden
``.<name>.<hex>.inprogress`` file, which the next write of the same batch
removes. The output records each batch's range in its ``_progress`` index
(``written_ranges``): offsets an earlier write made durable are never written
again, whatever cut a replay makes after a failure, and a write a crash left
half done is replaced or rolled back. Once every file of a batch is in place
the transform emits a ``WrittenBatch``: the commit step (``kafka_commit``)
moves the consumer group only past output that is durable.

``WriteParquetDataset`` writes rows one by one (a library user's own PCollection of
dicts or schema'd rows: ``beam.Row``s, written as ``beam_schema.as_dict`` gives them,
so the files are the same either way), one file per (dt, topic, partition) and bundle,
named after the first and last offset it holds plus a digest of its offsets.

The partition column (``dt``) lives only in the directory name: BigQuery
refuses Hive keys that overlap file columns, and Spark and DuckDB would
otherwise see one column from two sources. pyarrow's ``"hive"`` partitioning
infers it as ``string`` (or use ``hive_partitioning()``); DuckDB casts
``YYYY-MM-DD`` to ``DATE`` unless given ``hive_types={'dt': VARCHAR}``.
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
import json
import logging
import re
import time
import uuid
from typing import Any, Callable, Mapping, NamedTuple, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
from apache_beam import pvalue
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.display import DisplayDataItem

from tierflow import progress, schemas
from tierflow.beam_schema import plain
from tierflow.connectors.decode import DEAD_LETTER_SCHEMA, BatchRef, DecodedBatch
from tierflow.connectors.kafka_source import batch_name
from tierflow.connectors.written_ranges import COMPACT_ABOVE, WrittenRanges, subtract
from tierflow.failures import Failure, failure_of_row
from tierflow.files import rename_over

__all__ = [
    "COMPRESSIONS",
    "DEAD_LETTER_DIR",
    "METRICS_NAMESPACE",
    "RESULTS_DIR",
    "ParquetWriteResult",
    "WriteBatches",
    "WriteParquetDataset",
    "WrittenBatch",
    "file_schema",
    "hive_partitioning",
    "to_dead_letter",
    "write_file",
]

_LOGGER = logging.getLogger(__name__)

METRICS_NAMESPACE = "tierflow.parquet"
RESULTS_DIR = "results"
DEAD_LETTER_DIR = "dead_letter"
COMPRESSIONS = ("zstd", "snappy", "gzip", "brotli", "lz4", "none")
_ROUTING_FIELDS = ("record_id", "kafka_topic", "kafka_partition", "kafka_offset")
# Kafka topic names are [a-zA-Z0-9._-]; a leading "." or "_" would hide the file.
_TOPIC_RE = re.compile(r"[A-Za-z0-9-][A-Za-z0-9._-]{0,248}")
_PARTITION_VALUE_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_MAX_PARTITION_VALUE_LEN = 255
_INPROGRESS = ".inprogress"


def hive_partitioning(partition_field: str = "dt") -> pds.Partitioning:
  """pyarrow Hive partitioning that reads ``partition_field`` as a string."""
  return pds.partitioning(pa.schema([(partition_field, pa.string())]), flavor="hive")


def check_topic(topic: str) -> None:
  """Raises ValueError for a topic whose files would be hidden or unsafe in a path."""
  if not _TOPIC_RE.fullmatch(topic or ""):
    raise ValueError(
        f"topic {topic!r} cannot name visible files ([A-Za-z0-9._-], not starting with "
        "'.' or '_', which readers treat as hidden)")


def file_schema(avro_schema: Mapping[str, Any], partition_field: str = "dt") -> pa.Schema:
  """The Parquet schema of a dataset's files: the rows' schema without the partition field."""
  full = schemas.to_arrow(avro_schema)
  metadata = dict(full.metadata or {})
  metadata[b"tierflow.partition_field"] = partition_field.encode()
  return pa.schema([f for f in full if f.name != partition_field], metadata=metadata)


def _delete_quietly(paths: list[str]) -> None:
  for path in paths:
    try:
      if FileSystems.exists(path):
        FileSystems.delete([path])
    except Exception:  # noqa: BLE001 - best effort; a leftover is hidden
      _LOGGER.warning("could not delete temporary file %s", path, exc_info=True)


def _leftovers(directory: str, name: str) -> list[str]:
  """Hidden temporary files a crashed earlier write of ``name`` left in ``directory``."""
  pattern = FileSystems.join(directory, f".{name}.*{_INPROGRESS}")
  try:
    return [m.path for r in FileSystems.match([pattern]) for m in r.metadata_list]
  except BeamIOError:
    return []


def write_file(directory: str, name: str, table: pa.Table, compression: str = "zstd") -> str:
  """Writes ``table`` to ``directory/name`` atomically (hidden temporary file, then rename)
  and removes what earlier crashed writes of the same name left behind; returns the path."""
  path = FileSystems.join(directory, name)
  stale = _leftovers(directory, name)
  temp = FileSystems.join(directory, f".{name}.{uuid.uuid4().hex}{_INPROGRESS}")
  try:
    with FileSystems.create(temp, compression_type=CompressionTypes.UNCOMPRESSED) as f:
      pq.write_table(table, f, compression=compression)
    rename_over(temp, path)
  except BaseException:
    _delete_quietly([temp])
    raise
  if stale:
    _delete_quietly(stale)
  return path


def _split_by(table: pa.Table, field: str) -> list[tuple[str, pa.Table]]:
  """(value, rows with it, without the column) for each distinct value of ``field``."""
  column = table.column(field)
  rest = table.drop_columns([field])
  values = column.unique().to_pylist()
  if len(values) == 1:
    return [(values[0], rest)]
  return [(v, rest.filter(pc.equal(column, v))) for v in sorted(values)]


def _check_partition_value(field: str, value: Any) -> None:
  if not (isinstance(value, str) and len(value) <= _MAX_PARTITION_VALUE_LEN
          and _PARTITION_VALUE_RE.fullmatch(value)):
    raise ValueError(f"{field} {value!r} is not a safe Hive partition value")


class WrittenBatch(NamedTuple):
  """A batch whose files are all in place.

  Attributes:
    ref: the offsets the batch covers.
    files: paths written (results and dead letters).
    rows: result rows written.
    dead_letters: dead-letter rows written.
    already_written: offsets of the batch that an earlier write had made durable (a
      replay cut differently after a failure): not written again.
  """
  ref: BatchRef
  files: tuple
  rows: int
  dead_letters: int
  already_written: int = 0


def check_accounted(ref: BatchRef, rows: pa.Table, dead_letters: pa.Table) -> None:
  """Raises RuntimeError unless every record offset of the batch is in the rows or the
  dead letters (and nothing else is): the invariant a commit relies on."""
  expected = np.asarray(ref.offsets, dtype=np.int64)
  got = np.union1d(rows.column("kafka_offset").to_numpy(zero_copy_only=False),
                   dead_letters.column("kafka_offset").to_numpy(zero_copy_only=False))
  if got.shape != expected.shape or not np.array_equal(got, np.sort(expected)):
    missing = np.setdiff1d(expected, got)[:5].tolist()
    extra = np.setdiff1d(got, expected)[:5].tolist()
    raise RuntimeError(
        f"batch {ref.name}: output does not account for its records (missing offsets "
        f"{missing}, unexpected {extra}); refusing to write it and move the group past it")


def _offsets_in(table: pa.Table, start: int, end: int) -> pa.Table:
  offsets = table.column("kafka_offset")
  return table.filter(pc.and_(pc.greater_equal(offsets, start), pc.less(offsets, end)))


class _WriteBatchFn(beam.DoFn):
  def __init__(self, output: str, results_schema: pa.Schema, results_dir: str,
               dead_letter_dir: str, partition_field: str, compression: str):
    self._output = output
    self._results_schema = results_schema
    self._results_dir = results_dir
    self._dead_letter_dir = dead_letter_dir
    self._partition_field = partition_field
    self._compression = compression
    self._rows = Metrics.counter(METRICS_NAMESPACE, "rows_written")
    self._dead = Metrics.counter(METRICS_NAMESPACE, "dead_letters_written")
    self._files = Metrics.counter(METRICS_NAMESPACE, "files_written")
    self._already = Metrics.counter(METRICS_NAMESPACE, "offsets_already_written")
    self._rolled_back = Metrics.counter(METRICS_NAMESPACE, "stale_writes_rolled_back")

  def setup(self):
    self._dead_schema = file_schema(DEAD_LETTER_SCHEMA, self._partition_field)
    self._index = WrittenRanges(self._output)

  def _plan(self, subdir: str, table: pa.Table, schema: pa.Schema, name: str
            ) -> list[tuple[str, str, pa.Table]]:
    """(directory, file name, rows) of each file the table is written to, one per day."""
    out = []
    for value, part in _split_by(table, self._partition_field):
      _check_partition_value(self._partition_field, value)
      directory = FileSystems.join(self._output, subdir, f"{self._partition_field}={value}")
      out.append((directory, f"{name}.parquet", part.cast(schema)))
    return out

  def _write_range(self, ref: BatchRef, start: int, end: int, rows: pa.Table,
                   dead_letters: pa.Table) -> list[str]:
    """Writes the rows of offsets [start, end) under files named after that range, with
    its ``.writing`` marker before and ``.done`` after (``written_ranges``)."""
    name = batch_name(ref.topic, ref.partition, start, end)
    plan = []
    if rows.num_rows:
      plan += self._plan(self._results_dir, rows, self._results_schema, name)
    if dead_letters.num_rows:
      plan += self._plan(self._dead_letter_dir, dead_letters, self._dead_schema, name)
    paths = [FileSystems.join(d, n) for d, n, _ in plan]
    self._index.begin(ref.topic, ref.partition, start, end, paths)
    for directory, file_name, table in plan:
      write_file(directory, file_name, table, self._compression)
    self._index.finish(ref.topic, ref.partition, start, end)
    return paths

  def process(self, batch: DecodedBatch):
    ref = batch.ref
    check_accounted(ref, batch.rows, batch.dead_letters)
    entries = self._index.entries(ref.topic, ref.partition)
    done = WrittenRanges.done(entries)
    pieces = subtract(ref.start, ref.end, done)
    for entry in entries:  # what a failed attempt left half-written over this batch
      if (entry.state == "writing" and entry.start < ref.end and ref.start < entry.end
          and (entry.start, entry.end) not in pieces):
        if subtract(entry.start, entry.end, done):
          gone = self._index.roll_back(entry)
          self._rolled_back.inc()
          _LOGGER.warning("batch %s: rolled back an unfinished earlier write of offsets "
                          "[%d, %d) (%d files) before writing it again", ref.name,
                          entry.start, entry.end, len(gone))
        else:
          self._index.forget(entry)  # its range is done: only the marker was left
    files, rows, dead = [], 0, 0
    for start, end in pieces:
      whole = (start, end) == (ref.start, ref.end)
      part_rows = batch.rows if whole else _offsets_in(batch.rows, start, end)
      part_dead = batch.dead_letters if whole else _offsets_in(batch.dead_letters, start, end)
      files += self._write_range(ref, start, end, part_rows, part_dead)
      rows += part_rows.num_rows
      dead += part_dead.num_rows
    already = (ref.end - ref.start) - sum(e - s for s, e in pieces)
    if already:
      self._already.inc(already)
      _LOGGER.info("batch %s: %d of its offsets were already written; not written again",
                   ref.name, already)
    if pieces and sum(e.state == "done" for e in entries) + len(pieces) > COMPACT_ABOVE:
      self._index.compact(ref.topic, ref.partition)
    self._rows.inc(rows)
    self._dead.inc(dead)
    self._files.inc(len(files))
    progress.add(written=rows, dead_letters=dead)
    yield WrittenBatch(ref, tuple(files), rows, dead, already)


class WriteBatches(beam.PTransform):
  """Writes ``DecodedBatch``es: rows to ``<output>/results``, dead letters to
  ``<output>/dead_letter``, Hive-partitioned by ``dt``; emits a ``WrittenBatch``
  once all of a batch's files are in place (see the module docstring).

  A batch whose rows and dead letters do not account for exactly its records
  fails loudly instead of being written: that would be a bug upstream, and a
  commit past it could lose records. I/O errors raise, so the runner retries
  the bundle; nothing is committed for a batch that was not written.

  Args:
    output: dataset root on any Beam filesystem (local, gs://, s3://).
    row_schema: Avro record schema of the rows (``decode.row_schema``, or a
      model pipeline's result schema); the files hold it without ``dt``.
    compression: Parquet codec (zstd, snappy, gzip, brotli, lz4, none).
  """

  def __init__(self, output: str, row_schema: Mapping[str, Any], *,
               results_dir: str = RESULTS_DIR, dead_letter_dir: str = DEAD_LETTER_DIR,
               partition_field: str = "dt", compression: str = "zstd"):
    super().__init__()
    if not isinstance(output, str) or not output:
      raise ValueError(f"output must be a non-empty path, got {output!r}")
    if compression not in COMPRESSIONS:
      raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    arrow = schemas.to_arrow(row_schema)
    missing = [f for f in (*_ROUTING_FIELDS, partition_field) if f not in arrow.names]
    if missing:
      raise ValueError(f"row_schema lacks required fields {missing}")
    self._output = output.rstrip("/")
    self._row_schema = row_schema
    self._results_dir = results_dir
    self._dead_letter_dir = dead_letter_dir
    self._partition_field = partition_field
    self._compression = compression

  def expand(self, batches):
    return batches | "WriteFiles" >> beam.ParDo(_WriteBatchFn(
        self._output, file_schema(self._row_schema, self._partition_field),
        self._results_dir, self._dead_letter_dir, self._partition_field, self._compression))

  def display_data(self):
    return {
        "output": DisplayDataItem(self._output, label="Output directory"),
        "schema": DisplayDataItem(self._row_schema.get("name", ""), label="Row schema"),
        "compression": DisplayDataItem(self._compression, label="Parquet codec"),
    }


# --- rows one by one: dicts or schema'd rows -----------------------------------------


class ParquetWriteResult(NamedTuple):
  """Outputs of ``WriteParquetDataset(...).with_exception_handling()``.

  Attributes:
    files: paths (str) of the files written.
    failures: a ``tierflow.failures.Failure`` (step ``write``) per row that could not
      be written, the row as JSON in ``payload``; see ``to_dead_letter``.
  """
  files: pvalue.PCollection
  failures: pvalue.PCollection


def to_dead_letter(failure: Failure, *, failed_at_millis: Optional[int] = None) -> dict:
  """A ``dead_letter.avsc`` record for a ``Failure`` (of any step).

  Source fields come from the payload when it is a JSON row that has them, else
  placeholders ("", -1, 0; ``dt`` from ``failed_at``); the payload is kept in
  ``raw_value``.
  """
  try:
    row = json.loads(failure.payload) if failure.payload else None
  except ValueError:
    row = None
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
      "record_id": failure.record_id or _str(get("record_id")),
      "kafka_topic": _str(get("kafka_topic")),
      "kafka_partition": _int(get("kafka_partition"), 0, 2**31, -1),
      "kafka_offset": _int(get("kafka_offset"), 0, 2**63, -1),
      "kafka_timestamp": _int(get("kafka_timestamp"), -2**63, 2**63, 0),
      "dt": dt,
      "stage": failure.step,
      "error_type": failure.error_type,
      "reason": failure.reason,
      "raw_key": None,
      "raw_value": failure.payload,
      "failed_at": failed_at_millis,
  }


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
    return lambda v: _is_int(v) or (isinstance(v, datetime.datetime) and v.tzinfo is not None)
  if pa.types.is_date(arrow_type):
    return lambda v: _is_int(v) or (
        isinstance(v, datetime.date) and not isinstance(v, datetime.datetime))
  if pa.types.is_decimal(arrow_type):
    return lambda v: isinstance(v, decimal.Decimal)
  return None


def _short_repr(value: Any, limit: int = 80) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


class _RowValidator:
  """Checks a row (a dict) against the Arrow schema before it is routed to a file."""

  def __init__(self, arrow_schema: pa.Schema, partition_field: str):
    self._partition_field = partition_field
    self._fields = [(f.name, f.type, f.nullable, _type_check(f.type)) for f in arrow_schema]
    self._names = frozenset(f.name for f in arrow_schema)

  def error(self, row: Any) -> Optional[tuple[str, str]]:
    """(error_type, reason) for a row that cannot be written, else None."""
    if not isinstance(row, Mapping):
      return "invalid_type", f"row is a {type(row).__name__}, not a dict or a beam.Row"
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
        return "invalid_type", (f"field {name!r}: {type(value).__name__} "
                                f"{_short_repr(value)} does not fit {arrow_type}")
    if not _TOPIC_RE.fullmatch(row["kafka_topic"]):
      return "invalid_type", (f"kafka_topic {row['kafka_topic']!r} is not a Kafka topic name "
                              "that can start a visible file name")
    if row["kafka_partition"] < 0 or row["kafka_offset"] < 0:
      return "invalid_type", "kafka_partition and kafka_offset must be >= 0"
    value = row[self._partition_field]
    if len(value) > _MAX_PARTITION_VALUE_LEN or not _PARTITION_VALUE_RE.fullmatch(value):
      return "invalid_partition", (f"{self._partition_field} {_short_repr(value)} is not a "
                                   "safe Hive partition value ([A-Za-z0-9._-], no leading dot)")
    return None


def _rows_file_name(topic: str, partition: int, offsets: list[int]) -> str:
  digest = hashlib.sha256(np.asarray(offsets, dtype=np.int64).tobytes()).hexdigest()[:12]
  return (f"{topic}-{partition:04d}-{offsets[0]:020d}-{offsets[-1]:020d}-{digest}.parquet")


class _WriteRowsFn(beam.DoFn):
  """Collects a bundle's valid rows per (dt, topic, partition) and writes them at its end."""

  def __init__(self, output: str, avro_schema: Mapping[str, Any], partition_field: str,
               compression: str, handle_errors: bool):
    self._handle_errors = handle_errors
    self._output = output
    self._avro_schema = avro_schema
    self._partition_field = partition_field
    self._compression = compression
    self._rows = Metrics.counter(METRICS_NAMESPACE, "rows_written")
    self._files = Metrics.counter(METRICS_NAMESPACE, "files_written")
    self._failed = Metrics.counter(METRICS_NAMESPACE, "rows_failed")

  def setup(self):
    self._validator = _RowValidator(schemas.to_arrow(self._avro_schema), self._partition_field)
    self._schema = file_schema(self._avro_schema, self._partition_field)

  def start_bundle(self):
    self._groups: dict = {}

  def process(self, row, window=beam.DoFn.WindowParam):
    row = plain(row)
    error = self._validator.error(row)
    if error is not None:
      yield pvalue.TaggedOutput("failures", self._failure(row, *error))
      return
    key = (window, row[self._partition_field], row["kafka_topic"], row["kafka_partition"])
    self._groups.setdefault(key, []).append(row)

  def finish_bundle(self):
    from apache_beam.utils.windowed_value import WindowedValue
    groups, self._groups = self._groups, {}
    for (window, value, topic, partition), rows in groups.items():
      rows.sort(key=lambda r: r["kafka_offset"])
      directory = FileSystems.join(self._output, f"{self._partition_field}={value}")
      good, failures = self._arrow(rows)
      for failure in failures:
        yield pvalue.TaggedOutput("failures", WindowedValue(failure, window.max_timestamp(),
                                                            [window]))
      if good is None:
        continue
      table, offsets = good
      path = write_file(directory, _rows_file_name(topic, partition, offsets), table,
                        self._compression)
      self._rows.inc(table.num_rows)
      self._files.inc()
      yield WindowedValue(path, window.max_timestamp(), [window])

  def _arrow(self, rows: list) -> tuple[Optional[tuple[pa.Table, list]], list]:
    """((table, offsets) of the rows Arrow takes, or None; failures for the rest)."""
    plain = [{k: v for k, v in r.items() if k != self._partition_field} for r in rows]
    try:
      return (pa.Table.from_pylist(plain, schema=self._schema),
              [r["kafka_offset"] for r in rows]), []
    except Exception:  # noqa: BLE001 - isolate the rows pyarrow refuses
      pass
    good, offsets, failures = [], [], []
    for row, p in zip(rows, plain):
      try:
        good.append(pa.Table.from_pylist([p], schema=self._schema))
        offsets.append(row["kafka_offset"])
      except Exception as e:  # noqa: BLE001
        failures.append(self._failure(row, "invalid_type", f"{type(e).__name__}: {e}"))
    return ((pa.concat_tables(good), offsets) if good else None), failures

  def _failure(self, row: Any, error_type: str, reason: str) -> Failure:
    """A row that cannot be written: a ``Failure``, or with errors not handled, raised."""
    if not self._handle_errors:
      raise ValueError(f"a row cannot be written ({error_type}): {reason} (call "
                       ".with_exception_handling() to have such rows as failures)")
    self._failed.inc()
    return failure_of_row("write", error_type, reason, row)


class WriteParquetDataset(beam.PTransform):
  """Writes rows carrying Kafka source metadata to a Hive-partitioned Parquet dataset.

  For a library user's own PCollection of rows, dicts or schema'd rows (``beam.Row``:
  ``DecodeRecords`` and ``RouteThroughTiers`` over schema'd input give them), written
  alike (``beam_schema.as_dict``). Rows from Kafka (``DecodeRecords``) carry the source
  fields it needs; give other rows theirs with
  ``tierflow.connectors.source_fields.AddSourceFields``. Each bundle writes one file
  per (window, partition value, topic, Kafka partition), named after the first and
  last offset it holds and a digest of its offsets, so a retried bundle replaces its
  own file. The output is the PCollection of the paths written.

  A row that does not fit the schema (wrong type, missing required field, unknown
  field, unsafe partition value) raises, and the pipeline fails, unless
  ``.with_exception_handling()`` was called: then the output is
  ``ParquetWriteResult(files, failures)``, a ``tierflow.failures.Failure`` per such
  row. I/O errors raise either way (the runner retries the bundle).
  """

  def __init__(self, output: str, avro_schema: Mapping[str, Any], *,
               partition_field: str = "dt", compression: str = "zstd"):
    super().__init__()
    if not isinstance(output, str) or not output:
      raise ValueError(f"output must be a non-empty path, got {output!r}")
    if not isinstance(avro_schema, Mapping) or avro_schema.get("type") != "record":
      raise ValueError("avro_schema must be an Avro record schema")
    arrow = schemas.to_arrow(avro_schema)
    missing = [f for f in (*_ROUTING_FIELDS, partition_field) if f not in arrow.names]
    if missing:
      raise ValueError(f"avro_schema lacks required fields {missing}")
    field = arrow.field(partition_field)
    if field.nullable or not pa.types.is_string(field.type):
      raise ValueError(f"partition_field {partition_field!r} must be a non-null string field")
    if compression not in COMPRESSIONS:
      raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    self._output = output.rstrip("/")
    self._avro_schema = json.loads(json.dumps(dict(avro_schema)))
    self._partition_field = partition_field
    self._compression = compression
    self._handle_errors = False

  def with_exception_handling(self) -> "WriteParquetDataset":
    """Outputs ``ParquetWriteResult(files, failures)`` instead of raising on a row that
    cannot be written."""
    self._handle_errors = True
    return self

  def expand(self, rows):
    out = rows | "WriteRows" >> beam.ParDo(_WriteRowsFn(
        self._output, self._avro_schema, self._partition_field, self._compression,
        self._handle_errors)).with_outputs("failures", main="files")
    if not self._handle_errors:
      return out.files
    return ParquetWriteResult(out.files, out.failures | "Failures" >> beam.Map(
        lambda f: f).with_output_types(Failure))

  def display_data(self):
    return {"output": DisplayDataItem(self._output, label="Output directory"),
            "schema": DisplayDataItem(self._avro_schema.get("name", ""), label="Row schema")}
