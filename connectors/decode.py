"""Decoding Kafka records into schema rows, with a dead-letter output.

``DecodeRecords`` turns each ``KafkaRecord`` into a row: the source metadata
(``schemas/source_metadata.avsc``: record_id, topic, partition, offset, Kafka
timestamp, ``dt``) followed by the decoded payload fields. A record that is
oversized, undecodable or invalid for its schema becomes a dead-letter row
(``schemas/dead_letter.avsc``) with the raw bytes and the reason; the pipeline
goes on.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Mapping, NamedTuple, Optional

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from tierflow.connectors.codecs import Codec, DecodeError
from tierflow.connectors.kafka_source import KafkaRecord

__all__ = ["DecodeRecords", "DecodeResult", "dead_letter", "dt_of"]

ROWS = "rows"
DEAD_LETTER = "dead_letter"
DEFAULT_MAX_RECORD_BYTES = 1024 * 1024


def dt_of(epoch_millis: int) -> str:
  """The ``YYYY-MM-DD`` (UTC) Hive partition value of an epoch-millis time."""
  return datetime.fromtimestamp(epoch_millis / 1000.0, tz=timezone.utc).strftime("%Y-%m-%d")


def source_metadata(rec: KafkaRecord, event_ms: Optional[int] = None) -> dict:
  return {
      "record_id": rec.record_id,
      "kafka_topic": rec.topic,
      "kafka_partition": rec.partition,
      "kafka_offset": rec.offset,
      "kafka_timestamp": rec.timestamp_ms,
      "dt": dt_of(rec.timestamp_ms if event_ms is None else event_ms),
  }


def dead_letter(meta: Mapping[str, Any], stage: str, error_type: str, reason: str,
                key: Optional[bytes] = None, value: Optional[bytes] = None) -> dict:
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
      "reason": reason[:4000],
      "raw_key": key,
      "raw_value": value,
      "failed_at": int(time.time() * 1000),
  }


class _DecodeFn(beam.DoFn):
  def __init__(self, codec: Codec, event_time_field: Optional[str], max_record_bytes: int):
    self._codec = codec
    self._event_time_field = event_time_field
    self._max_record_bytes = max_record_bytes
    self._decoded = Metrics.counter("tierflow.decode", "records_decoded")
    self._failed = Metrics.counter("tierflow.decode", "records_dead_lettered")

  def process(self, rec: KafkaRecord):
    size = len(rec.value or b"") + len(rec.key or b"")
    try:
      if size > self._max_record_bytes:
        raise DecodeError("oversized",
                          f"record is {size} bytes, over the {self._max_record_bytes}-byte limit")
      payload = self._codec.decode(rec.value)
    except DecodeError as e:
      self._failed.inc()
      meta = source_metadata(rec)
      # Oversized payloads are kept only up to the limit in the dead letter.
      value = rec.value if size <= self._max_record_bytes else (rec.value or b"")[
          :self._max_record_bytes]
      yield pvalue.TaggedOutput(
          DEAD_LETTER, dead_letter(meta, "decode", e.error_type, e.reason, rec.key, value))
      return
    event = payload.get(self._event_time_field) if self._event_time_field else None
    self._decoded.inc()
    yield {**source_metadata(rec, event if isinstance(event, int) else None), **payload}


class DecodeResult(NamedTuple):
  rows: beam.PCollection
  dead_letter: beam.PCollection


class DecodeRecords(beam.PTransform):
  """Decodes ``KafkaRecord``s with a codec into (rows, dead letters).

  Args:
    codec: a ``tierflow.connectors.codecs.Codec`` for the topic's format.
    event_time_field: a timestamp-millis payload field giving the record's
      event time for its ``dt`` partition; the Kafka timestamp when None.
    max_record_bytes: larger records (key + value) are dead-lettered.
  """

  def __init__(self, codec: Codec, *, event_time_field: Optional[str] = "created_at",
               max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES):
    super().__init__()
    if max_record_bytes <= 0:
      raise ValueError("max_record_bytes must be positive")
    names = {f["name"] for f in codec.schema["fields"]}
    if event_time_field is not None and event_time_field not in names:
      event_time_field = None
    self._codec = codec
    self._event_time_field = event_time_field
    self._max_record_bytes = max_record_bytes

  def expand(self, records) -> DecodeResult:
    out = records | "Decode" >> beam.ParDo(
        _DecodeFn(self._codec, self._event_time_field, self._max_record_bytes)
    ).with_outputs(DEAD_LETTER, main=ROWS)
    return DecodeResult(out[ROWS], out[DEAD_LETTER])

  def display_data(self):
    return {"format": self._codec.name, "schema": self._codec.schema.get("name", ""),
            "max_record_bytes": self._max_record_bytes}
