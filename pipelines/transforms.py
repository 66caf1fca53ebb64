"""The composite transforms every tierflow pipeline is built from: read + decode, write."""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import apache_beam as beam
from apache_beam.transforms import window

from tierflow import schemas
from tierflow.connectors.decode import DecodeRecords
from tierflow.connectors.kafka_source import ReadFromKafka
from tierflow.connectors.parquet_sink import WriteToHiveParquet, to_dead_letter
from tierflow.pipelines.options import SourceSinkConfig

__all__ = ["ReadRecords", "WriteOutputs", "row_schema", "RESULTS_DIR", "DEAD_LETTER_DIR"]

RESULTS_DIR = "results"
DEAD_LETTER_DIR = "dead_letter"


def row_schema(config: SourceSinkConfig, *extra: Mapping[str, Any], name: str = "") -> dict:
  """Output schema: source metadata, then the input record's fields, then ``extra`` parts."""
  return schemas.compose(
      name or f"{config.schema['name']}Row", schemas.load("source_metadata"), config.schema,
      *extra)


class Records(NamedTuple):
  rows: beam.PCollection
  dead_letter: beam.PCollection


class ReadRecords(beam.PTransform):
  """Kafka -> decoded rows (metadata + payload), and dead letters for what fails."""

  def __init__(self, config: SourceSinkConfig):
    super().__init__()
    self._config = config

  def expand(self, pbegin) -> Records:
    c = self._config
    decoded = (pbegin
               | "ReadFromKafka" >> ReadFromKafka(c.source)
               | "DecodeRecords" >> DecodeRecords(c.codec(), max_record_bytes=c.max_record_bytes))
    return Records(decoded.rows, decoded.dead_letter)


class WriteOutputs(beam.PTransform):
  """Writes result rows and dead letters as Hive-partitioned Parquet under ``output``.

  Result rows that do not fit the schema join the dead letters, so nothing is
  dropped; a dead letter that cannot be written fails the bundle (the runner
  retries) rather than vanishing.
  """

  def __init__(self, config: SourceSinkConfig, schema: Mapping[str, Any]):
    super().__init__()
    self._config = config
    self._schema = schema

  def _sink(self, subdir: str, schema: Mapping[str, Any]) -> WriteToHiveParquet:
    c = self._config
    return WriteToHiveParquet(
        f"{c.output}/{subdir}", schema, max_rows_per_file=c.rows_per_file,
        window_seconds=c.window_seconds, allowed_lateness_seconds=c.allowed_lateness_seconds)

  def expand(self, outputs: Records):
    rows, dead = outputs
    written = rows | "WriteResults" >> self._sink(RESULTS_DIR, self._schema)
    unwritable = (written.failed
                  | "UnwritableToDeadLetter" >> beam.Map(to_dead_letter)
                  | "BackToGlobalWindow" >> beam.WindowInto(window.GlobalWindows()))
    dead_written = ((dead, unwritable)
                    | "AllDeadLetters" >> beam.Flatten()
                    | "WriteDeadLetters" >> self._sink(DEAD_LETTER_DIR,
                                                       schemas.load("dead_letter")))
    _ = dead_written.failed | "DeadLetterMustBeWritable" >> beam.Map(_raise_unwritable)
    return written.files, dead_written.files


def _raise_unwritable(failure: Mapping[str, Any]) -> None:
  raise RuntimeError(
      f"a dead letter could not be written ({failure.get('error_type')}: "
      f"{failure.get('reason')}); refusing to drop it")
