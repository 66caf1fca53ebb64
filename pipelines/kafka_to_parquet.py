"""The two ends of every tierflow pipeline: Kafka read + decode, Parquet write + commit."""

from __future__ import annotations

from typing import Any, Mapping

import apache_beam as beam

from tierflow.connectors.decode import DecodeBatches
from tierflow.connectors.kafka_commit import CommitOffsets
from tierflow.connectors.kafka_source import ReadKafkaBatches
from tierflow.connectors.parquet_dataset import WriteBatches
from tierflow.pipelines.options import SourceSinkConfig

__all__ = ["ReadAndDecode", "WriteAndCommit"]


class ReadAndDecode(beam.PTransform):
  """Kafka -> ``DecodedBatch``es (rows and dead letters per offset batch)."""

  def __init__(self, config: SourceSinkConfig):
    super().__init__()
    self._config = config
    self._decode = DecodeBatches(config.codec(), event_time_field=config.event_time_field,
                                 max_record_bytes=config.max_record_bytes
                                 ).with_exception_handling()  # a bug dead-letters its batch

  @property
  def row_schema(self) -> dict:
    return self._decode.row_schema

  def expand(self, pbegin):
    return (pbegin
            | "ReadKafka" >> ReadKafkaBatches(self._config.source)
            | "Decode" >> self._decode)


class WriteAndCommit(beam.PTransform):
  """``DecodedBatch``es -> Parquet (results and dead letters), then the group's offsets
  past what is written (when the read commits)."""

  def __init__(self, config: SourceSinkConfig, row_schema: Mapping[str, Any]):
    super().__init__()
    self._config = config
    self._row_schema = row_schema

  def expand(self, batches):
    written = batches | "WriteParquet" >> WriteBatches(self._config.output, self._row_schema)
    if self._config.source.commit_offsets:
      _ = written | "CommitOffsets" >> CommitOffsets(self._config.source)
    return written
