"""AddSourceFields: rows that did not come from Kafka get the id and date the sink needs."""

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from tierflow import transforms as tf

SCHEMA = {"type": "record", "name": "Note", "fields": [
    {"name": "note_id", "type": "string"}, {"name": "text", "type": "string"},
    {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}}]}
DAY1 = 1_767_225_600_000  # 2026-01-01T00:00Z
NOTES = [{"note_id": "n1", "text": "a", "at": DAY1 + 5},
         {"note_id": "n2", "text": "b", "at": DAY1 + 86_400_000}]


def test_rows_from_create_are_written_partitioned_by_their_time(tmp_path):
  add = tf.AddSourceFields("notes", id_field="note_id", time_field="at")
  out = str(tmp_path / "out")
  with test_pipeline.TestPipeline() as p:
    files = p | beam.Create(NOTES) | add | tf.WriteParquetDataset(
        out, add.row_schema(SCHEMA))
    assert_that(files | beam.Map(lambda f: f.split("/")[-2]),
                equal_to(["dt=2026-01-01", "dt=2026-01-02"]))
  rows = sorted(pq.read_table(out).to_pylist(), key=lambda r: r["record_id"])
  assert [(r["record_id"], r["kafka_topic"], r["text"], str(r["dt"])) for r in rows] == [
      ("n1", "notes", "a", "2026-01-01"), ("n2", "notes", "b", "2026-01-02")]


def test_without_an_id_field_the_id_is_a_digest_of_the_content():
  add = tf.AddSourceFields("notes", dt="2026-02-03")
  with test_pipeline.TestPipeline() as p:
    out = p | beam.Create([NOTES[0], dict(NOTES[0]), NOTES[1]]) | add
    assert_that(out | beam.Map(lambda r: (r["record_id"], r["dt"], r["kafka_timestamp"]))
                | beam.Distinct() | beam.combiners.Count.Globally(), equal_to([2]),
                label="same row, same id")
    assert_that(out | beam.Map(lambda r: (len(r["record_id"]), r["dt"],
                                          r["kafka_timestamp"] == 1_770_076_800_000)),
                equal_to([(32, "2026-02-03", True)] * 3), label="fields")


def test_a_row_without_its_id_raises():
  with pytest.raises(Exception, match="the row has no 'note_id'"):
    with test_pipeline.TestPipeline() as p:
      _ = p | beam.Create([{"text": "x", "at": DAY1}]) | tf.AddSourceFields(
          "notes", id_field="note_id", time_field="at")


@pytest.mark.parametrize("kwargs, match", [
    ({"source": "no/slash", "dt": "2026-01-01"}, "source must be a name"),
    ({"source": "s"}, "give time_field .* or dt"),
    ({"source": "s", "time_field": "at", "dt": "2026-01-01"}, "not both or neither"),
    ({"source": "s", "dt": "2026-13-01"}, "dt must be a date"),
])
def test_arguments_are_checked_when_constructed(kwargs, match):
  with pytest.raises(ValueError, match=match):
    tf.AddSourceFields(**kwargs)
  with pytest.raises(ValueError, match="has no field missing"):
    tf.AddSourceFields("s", time_field="missing").row_schema(SCHEMA)


def test_schemad_rows_keep_their_schema_with_the_source_fields_first(tmp_path):
  """beam.Rows of a schema give beam.Rows of row_schema(...)'s row type, the same ids and
  dates as dicts, and the same Parquet; a time or id field the schema lacks is refused
  when the pipeline is built."""
  add = tf.AddSourceFields("notes", id_field="note_id", time_field="at")
  with test_pipeline.TestPipeline() as p:
    given = p | beam.Create(NOTES)
    schemad = given | "Schemad" >> tf.ToRows(SCHEMA) | "AddToRows" >> add
    dicts = given | "AddToDicts" >> add
    assert schemad.element_type == tf.beam_row_type(add.row_schema(SCHEMA))
    assert_that(schemad | beam.Map(lambda r: (r.record_id, r.dt, r.kafka_timestamp.micros,
                                              r.at.micros)),
                equal_to([("n1", "2026-01-01", (DAY1 + 5) * 1000, (DAY1 + 5) * 1000),
                          ("n2", "2026-01-02", (DAY1 + 86_400_000) * 1000,
                           (DAY1 + 86_400_000) * 1000)]), label="rows")
    _ = schemad | "WriteRows" >> tf.WriteParquetDataset(str(tmp_path / "rows"),
                                                         add.row_schema(SCHEMA))
    _ = dicts | "WriteDicts" >> tf.WriteParquetDataset(str(tmp_path / "dicts"),
                                                        add.row_schema(SCHEMA))
  assert pq.read_table(tmp_path / "rows").equals(pq.read_table(tmp_path / "dicts"))
  p = test_pipeline.TestPipeline()
  rows = p | beam.Create(NOTES) | tf.ToRows(SCHEMA)
  with pytest.raises(ValueError, match="schema has no field when"):
    _ = rows | tf.AddSourceFields("notes", time_field="when")
