"""``passthrough``: Kafka -> decode -> Parquet, no models.

The baseline every model pipeline is benchmarked against, and a plain
Kafka-to-lake backfill job in its own right.
"""

from __future__ import annotations

import apache_beam as beam

from tierflow.pipelines.options import (KafkaSourceOptions, ParquetSinkOptions, RunLimitsOptions,
                                        SourceSinkConfig)
from tierflow.pipelines.kafka_to_parquet import ReadAndDecode, WriteAndCommit

NAME = "passthrough"
OPTIONS = (KafkaSourceOptions, ParquetSinkOptions, RunLimitsOptions)


def build_pipeline(p: beam.Pipeline, config: SourceSinkConfig) -> None:
  """Adds the passthrough graph to ``p``; no I/O happens until ``p`` runs."""
  read = ReadAndDecode(config)
  _ = p | "Read" >> read | "Write" >> WriteAndCommit(config, read.row_schema)
