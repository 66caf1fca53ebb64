"""Decoding Kafka batches into Arrow rows, with dead letters for what does not decode.

``DecodeBatches`` turns each ``KafkaBatch`` into a ``DecodedBatch``: an Arrow
table of rows (the source metadata of ``schemas/source_metadata.avsc``:
record_id, topic, partition, offset, Kafka timestamp, ``dt``, then the decoded
payload fields) and a table of dead letters (``schemas/dead_letter.avsc``) with
the raw bytes and the reason. Every record of the batch ends in exactly one of
the two; nothing in a record's bytes can make the transform raise.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, NamedTuple, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics

from tierflow import schemas
from tierflow.beam_schema import ToRows
from tierflow.connectors.batch_coder import BatchCoder
from tierflow.connectors.codecs import MAX_MILLIS, MIN_MILLIS, Codec
from tierflow.connectors.kafka_source import KafkaBatch, KafkaRecord, batch_name
from tierflow.failures import Failure

__all__ = ["BatchRef", "DecodeBatches", "DecodeRecords", "DecodedBatch", "DecodedRecords",
           "dead_letter", "dead_letter_table", "decode_batch", "dt_of", "row_schema",
           "DEAD_LETTER_SCHEMA"]

_LOGGER = logging.getLogger(__name__)
DEFAULT_MAX_RECORD_BYTES = 1024 * 1024
METRICS_NAMESPACE = "tierflow.decode"
_DAY_MS = 86_400_000


class BatchRef(NamedTuple):
  """What a batch covers: offsets [start, end) of one partition, and its record offsets.

  ``range_start`` is where this run's read of the partition began (see
  ``kafka_commit``).
  """
  topic: str
  partition: int
  start: int
  end: int
  range_start: int
  offsets: tuple = ()
  run_offsets: int = 0

  @property
  def name(self) -> str:
    return batch_name(self.topic, self.partition, self.start, self.end)


@dataclasses.dataclass(frozen=True)
class DecodedBatch:
  """A batch after decoding (or after any later step that keeps it whole).

  Attributes:
    ref: the offsets the batch covers.
    rows: one row per record that decoded, ordered by offset.
    dead_letters: one row per record that did not, with the reason.
  """
  ref: BatchRef
  rows: pa.Table
  dead_letters: pa.Table

  def replace(self, **changes) -> "DecodedBatch":
    return dataclasses.replace(self, **changes)


beam.coders.registry.register_coder(DecodedBatch, BatchCoder)  # sized without pickling


def row_schema(input_schema: Mapping[str, Any]) -> dict:
  """The Avro schema of decoded rows: source metadata, then the input record's fields."""
  return schemas.compose(f"{input_schema['name']}Row", schemas.load("source_metadata"),
                         input_schema)


DEAD_LETTER_SCHEMA = schemas.load("dead_letter")


@functools.lru_cache(maxsize=None)
def _dead_letter_arrow() -> pa.Schema:
  return schemas.to_arrow(DEAD_LETTER_SCHEMA)


@functools.lru_cache(maxsize=1 << 16)
def dt_of(epoch_millis: int) -> str:
  """The ``YYYY-MM-DD`` (UTC) Hive partition value of an epoch-millis time."""
  return datetime.fromtimestamp(epoch_millis / 1000.0, tz=timezone.utc).strftime("%Y-%m-%d")


def _dt_column(event_ms: np.ndarray) -> pa.Array:
  """dt strings for in-range epoch millis, computed once per distinct day."""
  days = np.floor_divide(event_ms, _DAY_MS)
  unique, inverse = np.unique(days, return_inverse=True)
  names = pa.array([dt_of(int(d) * _DAY_MS) for d in unique], pa.string())
  return names.take(pa.array(inverse.reshape(-1)))


def dead_letter(meta: Mapping[str, Any], stage: str, error_type: str, reason: str,
                key: Optional[bytes] = None, value: Optional[bytes] = None,
                failed_at: Optional[int] = None) -> dict:
  """A dead-letter row for a record, from its source metadata."""
  return {
      "record_id": meta["record_id"],
      "kafka_topic": meta["kafka_topic"],
      "kafka_partition": meta["kafka_partition"],
      "kafka_offset": meta["kafka_offset"],
      "kafka_timestamp": meta["kafka_timestamp"],
      "dt": meta["dt"],
      "stage": stage,
      "error_type": error_type,
      # A reason may quote the bad text itself: kept readable, never invalid UTF-8.
      "reason": reason[:4000].encode("utf-8", "backslashreplace").decode("utf-8"),
      "raw_key": key,
      "raw_value": value,
      "failed_at": int(time.time() * 1000) if failed_at is None else failed_at,
  }


def dead_letter_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
  return pa.Table.from_pylist(list(rows), schema=_dead_letter_arrow())


def _safe_millis(ts: int) -> int:
  return ts if MIN_MILLIS <= ts < MAX_MILLIS else 0


def _record_dead_letter(rec: KafkaRecord, error_type: str, reason: str, now_ms: int,
                        max_record_bytes: int) -> dict:
  """A dead letter for a raw record (its ``dt`` from the Kafka timestamp when usable,
  else from the time it failed)."""
  ts = rec.timestamp_ms if MIN_MILLIS <= rec.timestamp_ms < MAX_MILLIS else now_ms
  meta = {"record_id": rec.record_id, "kafka_topic": rec.topic,
          "kafka_partition": rec.partition, "kafka_offset": rec.offset,
          "kafka_timestamp": _safe_millis(rec.timestamp_ms), "dt": dt_of(ts)}
  value = rec.value if rec.value is None or len(rec.value) <= max_record_bytes else \
      rec.value[:max_record_bytes]
  key = rec.key if rec.key is None or len(rec.key) <= max_record_bytes else \
      rec.key[:max_record_bytes]
  return dead_letter(meta, "decode", error_type, reason, key, value, failed_at=now_ms)


def _all_fit(batch: KafkaBatch, max_record_bytes: int) -> bool:
  """Whether no record is over the size limit and every Kafka timestamp is in range,
  checked over whole columns (C loops), not record by record."""
  values, keys = batch.values, batch.keys
  if None in values:
    return False  # tombstones: the record-by-record path says why each one fails
  sizes = np.fromiter(map(len, values), np.int64, len(values))
  if None not in keys:
    sizes += np.fromiter(map(len, keys), np.int64, len(keys))
  elif any(keys):
    sizes += np.fromiter((len(k) if k else 0 for k in keys), np.int64, len(keys))
  stamps = np.asarray(batch.timestamps, dtype=np.int64)
  return bool((sizes <= max_record_bytes).all() and (stamps >= MIN_MILLIS).all()
              and (stamps < MAX_MILLIS).all())


def decode_batch(batch: KafkaBatch, codec: Codec, row_arrow: pa.Schema, *,
                 event_time_field: Optional[str] = None,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> DecodedBatch:
  """Decodes a batch: rows for the records that decode, dead letters for the rest."""
  now_ms = int(time.time() * 1000)
  n = len(batch)
  failed: list[tuple[int, str, str]] = []
  if _all_fit(batch, max_record_bytes):  # checked column-wise: the usual case
    candidates = range(n)
    decoded = codec.decode_batch(batch.values)
  else:
    candidates = []
    for i in range(n):
      value, key = batch.values[i], batch.keys[i]
      size = len(value or b"") + len(key or b"")
      if size > max_record_bytes:
        failed.append((i, "oversized",
                       f"record is {size} bytes, over the {max_record_bytes}-byte limit"))
      elif not MIN_MILLIS <= batch.timestamps[i] < MAX_MILLIS:
        failed.append((i, "invalid_timestamp",
                       f"Kafka timestamp {batch.timestamps[i]} ms is outside years 1-9999"))
      else:
        candidates.append(i)
    decoded = codec.decode_batch([batch.values[i] for i in candidates])
  failed.extend((candidates[j], t, r) for j, t, r in decoded.failed)
  ok = decoded.ok if isinstance(candidates, range) else [candidates[j] for j in decoded.ok]
  payload = decoded.table

  every = len(ok) == n  # ok is in offset order: then it is every record, as they came
  offsets = np.asarray(batch.offsets, dtype=np.int64)
  kafka_ts = np.asarray(batch.timestamps, dtype=np.int64)
  if not every:
    offsets, kafka_ts = offsets[ok], kafka_ts[ok]
  event_ms = kafka_ts
  if event_time_field is not None and ok:
    column = payload.column(event_time_field).cast(pa.int64())
    event_ms = np.where(pc.is_null(column).to_numpy(zero_copy_only=False), kafka_ts,
                        column.fill_null(0).to_numpy())
  prefix = f"{batch.topic}-{batch.partition}-"
  metadata = [
      pc.binary_join_element_wise(pa.scalar(prefix), pa.array(offsets).cast(pa.string()), ""),
      pa.array([batch.topic] * len(ok), pa.string()),
      pa.array(np.full(len(ok), batch.partition, dtype=np.int32), pa.int32()),
      pa.array(offsets, pa.int64()),
      pa.array(kafka_ts, pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
      _dt_column(event_ms) if ok else pa.array([], pa.string()),
  ]
  rows = pa.Table.from_arrays(metadata + list(payload.columns), schema=row_arrow)

  dead = pa.Table.from_pylist([], schema=_dead_letter_arrow())
  if failed:
    failed.sort()
    dead = dead_letter_table(
        _record_dead_letter(KafkaRecord(batch.topic, batch.partition, batch.offsets[i],
                                        batch.timestamps[i], batch.keys[i], batch.values[i]),
                            error_type, reason, now_ms, max_record_bytes)
        for i, error_type, reason in failed)
  return DecodedBatch(_ref(batch), rows, dead)


def _ref(batch: KafkaBatch) -> BatchRef:
  return BatchRef(batch.topic, batch.partition, batch.start, batch.end, batch.range_start,
                  tuple(batch.offsets), batch.run_offsets)


def _everything_dead(batch: KafkaBatch, reason: str, max_record_bytes: int,
                     row_arrow: pa.Schema) -> DecodedBatch:
  """Last resort when decoding itself fails (a bug, not bad data): every record of the
  batch becomes a dead letter with the reason, so the run goes on and nothing is lost."""
  now_ms = int(time.time() * 1000)
  dead = dead_letter_table(_record_dead_letter(r, "internal_error", reason, now_ms,
                                               max_record_bytes) for r in batch.records())
  return DecodedBatch(_ref(batch), row_arrow.empty_table(), dead)


class _DecodeFn(beam.DoFn):
  def __init__(self, codec: Codec, input_schema: Mapping[str, Any],
               event_time_field: Optional[str], max_record_bytes: int,
               handle_errors: bool = False):
    self._handle_errors = handle_errors
    self._codec = codec
    self._input_schema = input_schema
    self._event_time_field = event_time_field
    self._max_record_bytes = max_record_bytes
    self._decoded = Metrics.counter(METRICS_NAMESPACE, "records_decoded")
    self._failed = Metrics.counter(METRICS_NAMESPACE, "records_dead_lettered")

  def setup(self):
    self._row_arrow = schemas.to_arrow(row_schema(self._input_schema))

  def process(self, batch: KafkaBatch):
    try:
      out = decode_batch(batch, self._codec, self._row_arrow,
                         event_time_field=self._event_time_field,
                         max_record_bytes=self._max_record_bytes)
    except Exception as e:  # noqa: BLE001 - see _everything_dead
      if not self._handle_errors:
        raise
      _LOGGER.exception("decoding %s failed; its %d records go to the dead letters",
                        batch.name, len(batch))
      out = _everything_dead(batch, f"decoding the batch failed: {type(e).__name__}: {e}",
                             self._max_record_bytes, self._row_arrow)
    self._decoded.inc(out.rows.num_rows)
    self._failed.inc(out.dead_letters.num_rows)
    yield out


class DecodeBatches(beam.PTransform):
  """Decodes ``KafkaBatch``es with a codec into ``DecodedBatch``es (rows and dead letters).

  A record that does not decode (bad bytes, oversized, a bad timestamp) is data: it
  becomes a dead letter of its batch, with the reason. An error in the decoding code
  raises, unless ``.with_exception_handling()`` was called (the ``tierflow run``
  pipelines call it): then every record of that batch is dead-lettered with the reason.

  Args:
    codec: a ``tierflow.connectors.codecs.Codec`` for the topic's format.
    event_time_field: a timestamp-millis payload field giving the record's
      event time for its ``dt`` partition; the Kafka timestamp where it is
      null or when None. A field the schema does not have is ignored.
    max_record_bytes: larger records (key + value) are dead-lettered, their
      bytes kept up to the limit.
  """

  def __init__(self, codec: Codec, *, event_time_field: Optional[str] = "created_at",
               max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES):
    super().__init__()
    if not isinstance(codec, Codec):
      raise TypeError("DecodeBatches takes a tierflow Codec (see codecs.make_codec)")
    if not (isinstance(max_record_bytes, int) and max_record_bytes > 0):
      raise ValueError("max_record_bytes must be a positive int")
    names = {f["name"] for f in codec.schema["fields"]}
    if event_time_field is not None and event_time_field not in names:
      event_time_field = None
    if event_time_field is not None and not pa.types.is_timestamp(
        codec.arrow_schema.field(event_time_field).type):
      raise ValueError(f"event_time_field {event_time_field!r} is not a timestamp field")
    self._codec = codec
    self._event_time_field = event_time_field
    self._max_record_bytes = max_record_bytes
    self._handle_errors = False

  def with_exception_handling(self) -> "DecodeBatches":
    """Dead-letters a batch the decoding code raises on instead of failing the bundle."""
    self._handle_errors = True
    return self

  @property
  def row_schema(self) -> dict:
    """The Avro schema of the decoded rows (what ``DecodedBatch.rows`` hold)."""
    return row_schema(self._codec.schema)

  def expand(self, batches):
    return batches | "Decode" >> beam.ParDo(
        _DecodeFn(self._codec, self._codec.schema, self._event_time_field,
                  self._max_record_bytes, self._handle_errors)).with_output_types(DecodedBatch)

  def display_data(self):
    return {"format": self._codec.name, "schema": self._codec.schema.get("name", ""),
            "max_record_bytes": self._max_record_bytes}


class DecodedRecords(NamedTuple):
  """Outputs of ``DecodeRecords(...).with_exception_handling()``.

  Attributes:
    rows: the decoded rows, ``beam.Row``s of ``DecodeRecords.row_type``.
    failures: a ``tierflow.failures.Failure`` (step ``decode``) per record that did not
      decode, its raw value in ``payload``.
  """
  rows: beam.PCollection
  failures: beam.PCollection


class _DecodeRecordFn(_DecodeFn):
  def process(self, rec: KafkaRecord):
    batch = KafkaBatch(rec.topic, rec.partition, rec.offset, rec.offset + 1, rec.offset,
                       [rec.offset], [rec.timestamp_ms], [rec.key], [rec.value])
    try:
      out = decode_batch(batch, self._codec, self._row_arrow,
                         event_time_field=self._event_time_field,
                         max_record_bytes=self._max_record_bytes)
      failures = [Failure("decode", d["error_type"], d["reason"], d["record_id"],
                          d["raw_value"]) for d in out.dead_letters.to_pylist()]
    except Exception as e:  # noqa: BLE001 - an error in code: raised unless handled
      if not self._handle_errors:
        raise
      out, failures = None, [Failure("decode", type(e).__name__, f"decoding raised {e!r}",
                                     rec.record_id, rec.value)]
    if failures and not self._handle_errors:
      f = failures[0]
      raise ValueError(f"record {f.record_id} does not decode ({f.error_type}): {f.reason} "
                       "(call .with_exception_handling() to have such records as failures)")
    self._failed.inc(len(failures))
    for failure in failures:
      yield beam.pvalue.TaggedOutput("failures", failure)
    if out is not None:
      self._decoded.inc(out.rows.num_rows)
      yield from out.rows.to_pylist()


class DecodeRecords(beam.PTransform):
  """Decodes single ``KafkaRecord``s (from any source) into schema'd rows.

  The record-at-a-time form of ``DecodeBatches``, for composing into your own
  pipelines: the same codecs and checks; rows keep the input records' timestamps.
  ``row_schema`` is the Avro schema of the rows; each is a ``beam.Row`` of its Beam row
  type, ``row_type`` (``tierflow.beam_schema``: timestamps as Beam ``Timestamp``s), so the
  PCollection has a Beam schema (``beam.dataframe``, SQL); ``tierflow.beam_schema.as_dict``
  turns a row into a dict. A record that does not decode raises
  (``ValueError`` with the reason), as does an error in code, unless
  ``.with_exception_handling()`` was called: then the output is
  ``DecodedRecords(rows, failures)``, one ``tierflow.failures.Failure`` per record
  that did not decode.
  """

  def __init__(self, codec: Codec, *, event_time_field: Optional[str] = "created_at",
               max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES):
    super().__init__()
    self._batches = DecodeBatches(codec, event_time_field=event_time_field,
                                  max_record_bytes=max_record_bytes)
    self._to_rows = ToRows(self._batches.row_schema)
    self._handle_errors = False

  def with_exception_handling(self) -> "DecodeRecords":
    """Outputs ``DecodedRecords(rows, failures)`` instead of raising (see the class)."""
    self._handle_errors = True
    return self

  @property
  def row_schema(self) -> dict:
    return self._batches.row_schema

  @property
  def row_type(self):
    """The Beam row type of the rows (``beam_schema.beam_row_type(row_schema)``)."""
    return self._to_rows.row_type

  def expand(self, records):
    b = self._batches
    out = records | "Decode" >> beam.ParDo(_DecodeRecordFn(
        b._codec, b._codec.schema, b._event_time_field, b._max_record_bytes,
        self._handle_errors)).with_outputs("failures", main="rows")
    rows = out.rows | "Rows" >> self._to_rows
    if not self._handle_errors:
      return rows
    return DecodedRecords(rows, out.failures | "Failures" >> beam.Map(
        lambda f: f).with_output_types(Failure))
