"""AddSourceFields: rows that did not come from Kafka get the id and date the sink needs."""

import json

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


# Rows that cannot have source fields: (row, error_type, the failure's record_id).
BAD_ROWS = [
    ({"text": "x", "at": DAY1}, "missing_field", None),
    ({"note_id": "n3", "text": "x"}, "missing_field", "n3"),
    ({"note_id": "n4", "text": "x", "at": "2026-01-01"}, "invalid_timestamp", "n4"),
    ({"note_id": "n5", "text": "x", "at": 10**17}, "invalid_timestamp", "n5"),
    ({"note_id": "n6", "text": "x", "at": float("nan")}, "invalid_timestamp", "n6"),
    ({"note_id": "n7", "text": "x", "at": DAY1, "record_id": "r7"}, "source_field_clash", "r7"),
    (["n8", "x", DAY1], "invalid_row", None),
]


@pytest.mark.parametrize("row, error_type, _", BAD_ROWS)
def test_a_row_that_cannot_have_source_fields_raises(row, error_type, _):
  with pytest.raises(Exception, match=rf"\({error_type}\).*with_exception_handling"):
    with test_pipeline.TestPipeline() as p:
      _ = p | beam.Create([row]) | tf.AddSourceFields(
          "notes", id_field="note_id", time_field="at")


def test_with_exception_handling_such_rows_are_failures_and_the_rest_go_on():
  add = tf.AddSourceFields("notes", id_field="note_id", time_field="at")
  with test_pipeline.TestPipeline() as p:
    out = p | beam.Create(NOTES + [row for row, _, _ in BAD_ROWS]) | (
        add.with_exception_handling())
    assert isinstance(out, tf.SourceFieldsResult)
    assert_that(out.rows | beam.Map(lambda r: (r["record_id"], r["dt"])),
                equal_to([("n1", "2026-01-01"), ("n2", "2026-01-02")]), label="rows")
    assert_that(out.failures | beam.Map(lambda f: (f.step, f.error_type, f.record_id)),
                equal_to([("source_fields", t, i) for _, t, i in BAD_ROWS]), label="failures")
    # The payload is the row as given, as JSON.
    assert_that(out.failures | beam.Filter(lambda f: f.record_id == "n4")
                | beam.Map(lambda f: json.loads(f.payload)),
                equal_to([BAD_ROWS[2][0]]), label="payload")


def test_an_error_in_code_raises_unless_handled(monkeypatch):
  from tierflow.connectors import source_fields

  def broken(millis):
    raise AttributeError("no attribute 'strftime'")

  monkeypatch.setattr(source_fields, "dt_of", broken)
  add = lambda: tf.AddSourceFields("notes", id_field="note_id", time_field="at")  # noqa: E731
  with pytest.raises(Exception, match="no attribute 'strftime'"):
    with test_pipeline.TestPipeline() as p:
      _ = p | beam.Create(NOTES) | add()
  with test_pipeline.TestPipeline() as p:
    out = p | beam.Create(NOTES) | add().with_exception_handling()
    assert_that(out.failures | beam.Map(lambda f: (f.step, f.error_type, f.record_id)),
                equal_to([("source_fields", "AttributeError", None)] * 2))
    assert_that(out.rows, equal_to([]), label="no rows")


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


def test_schemad_rows_with_exception_handling_keep_their_schema_and_fail_alone():
  """A schema'd row without its time is a Failure; the others come out as beam.Rows of
  the row type, as without exception handling."""
  nullable = {**SCHEMA, "fields": [*SCHEMA["fields"][:2], {
      "name": "at", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}]}]}
  add = tf.AddSourceFields("notes", id_field="note_id", time_field="at")
  with test_pipeline.TestPipeline() as p:
    rows = p | beam.Create(NOTES + [{"note_id": "n9", "text": "c", "at": None}]) | (
        tf.ToRows(nullable))
    out = rows | add.with_exception_handling()
    assert out.rows.element_type == tf.beam_row_type(add.row_schema(nullable))
    assert_that(out.rows | beam.Map(lambda r: (r.record_id, r.dt)),
                equal_to([("n1", "2026-01-01"), ("n2", "2026-01-02")]), label="rows")
    assert_that(out.failures | beam.Map(lambda f: (f.step, f.error_type, f.record_id)),
                equal_to([("source_fields", "missing_field", "n9")]), label="failures")
