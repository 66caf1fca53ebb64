"""Tests for tierflow.connectors.parquet_sink: real Beam runs, read back with pyarrow and DuckDB."""

import collections
import datetime
import os
import uuid

import apache_beam as beam
import duckdb
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_stream
from apache_beam.testing.util import assert_that
from apache_beam.testing.util import equal_to
from apache_beam.transforms.display import DisplayData
from apache_beam.transforms.window import TimestampedValue

from tierflow import schemas
from tierflow.connectors import parquet_sink
from tierflow.connectors.parquet_sink import WriteToHiveParquet

SCHEMA = schemas.compose(
    "TicketRow", schemas.load("source_metadata"), schemas.load("ticket"))
ARROW = schemas.to_arrow(SCHEMA)
# 2024-01-01T00:00:00Z, a multiple of 60 s so windows line up with it.
T0 = 1_704_067_200
# (topic, partition) pairs written by the batch tests.
PARTITIONS = [("tickets", 0), ("tickets", 1), ("tickets-eu", 3)]
MAX_ROWS = 100


def make_row(topic, partition, offset, ts_millis=None, dt=None):
  if ts_millis is None:
    # Offsets below 120 fall on 2024-01-01, the rest on 2024-01-02.
    ts_millis = (T0 + (offset >= 120) * 86_400 + offset) * 1000
  if dt is None:
    dt = datetime.datetime.fromtimestamp(
        ts_millis / 1000, tz=datetime.timezone.utc).strftime("%Y-%m-%d")
  row = {
      "record_id": f"{topic}-{partition}-{offset}",
      "kafka_topic": topic,
      "kafka_partition": partition,
      "kafka_offset": offset,
      "kafka_timestamp": ts_millis,
      "dt": dt,
      "ticket_id": f"T{partition}{offset}",
      "created_at": ts_millis - 5000,
      "subject": "printer on fire",
      "body": "x" * (offset % 7),
      "channel": "email",
  }
  # customer_id: nullable; present, explicit None, or absent.
  if offset % 3 == 0:
    row["customer_id"] = f"C{offset}"
  elif offset % 3 == 1:
    row["customer_id"] = None
  return row


def make_rows(offsets):
  return [make_row(t, p, o) for t, p in PARTITIONS for o in offsets]


# Outputs collected by the in-process FnApiRunner, keyed by run. The runner
# unpickles DoFns, so closures over local lists would append to copies; this
# module-level registry is pickled by reference.
_COLLECTED = collections.defaultdict(list)


def _collect(element, key):
  _COLLECTED[key].append(element)


def run_batch(rows, output_dir, **kwargs):
  """Runs the sink on FnApiRunner; returns (files, failed, metrics)."""
  kwargs.setdefault("max_rows_per_file", MAX_ROWS)
  key = uuid.uuid4().hex
  p = beam.Pipeline(runner="FnApiRunner")
  result = (
      p
      | beam.Create(rows, reshuffle=False)
      | WriteToHiveParquet(output_dir, SCHEMA, **kwargs))
  _ = result.files | "CollectFiles" >> beam.Map(_collect, key + "files")
  _ = result.failed | "CollectFailed" >> beam.Map(_collect, key + "failed")
  run = p.run()
  run.wait_until_finish()
  files = _COLLECTED.pop(key + "files", [])
  failed = _COLLECTED.pop(key + "failed", [])
  counters = {
      c.key.metric.name: c.committed
      for c in run.metrics().query(
          MetricsFilter().with_namespace(parquet_sink.METRICS_NAMESPACE))["counters"]
  }
  return files, failed, counters


def list_files(output_dir):
  """All files under output_dir, relative, including hidden ones."""
  found = []
  for root, _, names in os.walk(output_dir):
    found += [os.path.relpath(os.path.join(root, n), output_dir) for n in names]
  return sorted(found)


def read_bytes(path):
  with open(path, "rb") as f:
    return f.read()


def read_duckdb(output_dir, query=None):
  """Rows of query over view t of output_dir, or the relation of t."""
  con = duckdb.connect()
  con.execute(
      f"CREATE VIEW t AS SELECT * FROM read_parquet('{output_dir}/**/*.parquet', "
      "hive_partitioning = true, hive_types = {'dt': VARCHAR})")
  if query is None:
    return con.sql("SELECT * FROM t")
  return con.execute(query).fetchall()


def test_batch_layout_types_and_readback(tmp_path):
  out = str(tmp_path / "out")
  rows = make_rows(range(250))
  files, failed, counters = run_batch(rows, out)

  assert failed == []
  # Per partition: dt=2024-01-01 holds offsets 0-99 and 100-119,
  # dt=2024-01-02 holds 120-199 and 200-249 (chunks of 100 offsets).
  expected = sorted(
      f"dt={dt}/{parquet_sink.file_name(t, p, first, last)}"
      for t, p in PARTITIONS
      for dt, first, last in [("2024-01-01", 0, 99), ("2024-01-01", 100, 119),
                              ("2024-01-02", 120, 199), ("2024-01-02", 200, 249)])
  assert list_files(out) == expected  # no temporary files left behind
  assert sorted(os.path.relpath(f, out) for f in files) == expected
  assert counters == {"rows_written": 750, "files_written": 12}

  # Each file: rows sorted by offset, no dt column, schema from Avro.
  one = pq.read_table(os.path.join(out, expected[0]))
  assert "dt" not in one.column_names
  assert one.column("kafka_offset").to_pylist() == list(range(100))
  assert one.schema.metadata[b"tierflow.partition_field"] == b"dt"

  # pyarrow.dataset with plain "hive" partitioning.
  table = pds.dataset(out, format="parquet", partitioning="hive").to_table()
  assert table.num_rows == 750
  ids = table.column("record_id").to_pylist()
  assert sorted(ids) == sorted(r["record_id"] for r in rows)
  for field in ARROW:
    assert table.schema.field(field.name).type == field.type, field.name
  assert table.schema.field("kafka_timestamp").type == pa.timestamp("ms", tz="UTC")
  assert table.schema.field("customer_id").nullable
  assert table.schema.field("dt").type == pa.string()
  by_id = {r["record_id"]: r for r in table.to_pylist()}
  for row in rows:
    got = by_id[row["record_id"]]
    assert got["dt"] == row["dt"]
    assert got["customer_id"] == row.get("customer_id")
    assert int(got["kafka_timestamp"].timestamp() * 1000) == row["kafka_timestamp"]
  # ... and with the explicit helper, filtering on the partition.
  dset = pds.dataset(
      out, format="parquet", partitioning=parquet_sink.hive_partitioning())
  assert dset.to_table(filter=pds.field("dt") == "2024-01-01").num_rows == 360

  # DuckDB, dt as VARCHAR.
  rel = read_duckdb(out)
  types = dict(zip(rel.columns, map(str, rel.types)))
  assert types["kafka_timestamp"] == "TIMESTAMP WITH TIME ZONE"
  assert types["created_at"] == "TIMESTAMP WITH TIME ZONE"
  assert types["customer_id"] == "VARCHAR"
  assert types["kafka_partition"] == "INTEGER"
  assert types["kafka_offset"] == "BIGINT"
  assert types["dt"] == "VARCHAR"
  assert read_duckdb(
      out, "SELECT count(*), count(DISTINCT record_id), count(customer_id) FROM t"
  ) == [(750, 750, 252)]
  assert read_duckdb(out, "SELECT dt, count(*) FROM t GROUP BY dt ORDER BY dt") == [
      ("2024-01-01", 360), ("2024-01-02", 390)]
  # DuckDB's default autocast reads the partition as DATE, still cleanly.
  rel = duckdb.sql(
      f"SELECT dt, count(*) FROM read_parquet('{out}/**/*.parquet', "
      "hive_partitioning = true) GROUP BY dt ORDER BY dt")
  assert rel.fetchall() == [
      (datetime.date(2024, 1, 1), 360), (datetime.date(2024, 1, 2), 390)]


def test_rerun_same_range_is_idempotent(tmp_path):
  out = str(tmp_path / "out")
  rows = make_rows(range(250))
  run_batch(rows, out)
  before = list_files(out)
  inodes = {f: os.stat(os.path.join(out, f)).st_ino for f in before}
  contents = {f: read_bytes(os.path.join(out, f)) for f in before}
  # Input order differs; names and contents must not.
  files, failed, _ = run_batch(list(reversed(rows)), out)
  assert failed == []
  assert list_files(out) == before
  assert len(files) == len(before)
  # Every file was replaced (renamed over), byte for byte the same.
  assert all(os.stat(os.path.join(out, f)).st_ino != inodes[f] for f in before)
  assert {f: read_bytes(os.path.join(out, f)) for f in before} == contents
  assert read_duckdb(
      out, "SELECT count(*), count(DISTINCT record_id) FROM t") == [(750, 750)]


def test_overlapping_range_duplicates_only_the_overlap(tmp_path):
  out = str(tmp_path / "out")
  run_batch(make_rows(range(0, 250)), out)
  first = set(list_files(out))
  run_batch(make_rows(range(150, 350)), out)
  added = set(list_files(out)) - first
  # 150-199, 200-299 and 300-349 are new names; nothing was replaced.
  assert first <= set(list_files(out))
  assert len(added) == 3 * len(PARTITIONS)

  dupes = read_duckdb(
      out, "SELECT kafka_topic, kafka_partition, kafka_offset, count(*) AS n FROM t "
      "GROUP BY ALL HAVING n > 1")
  assert {n for *_, n in dupes} == {2}
  assert sorted((t, p, o) for t, p, o, _ in dupes) == sorted(
      (t, p, o) for t, p in PARTITIONS for o in range(150, 250))
  assert read_duckdb(
      out, "SELECT count(*), count(DISTINCT record_id) FROM t") == [
          (3 * 350 + 3 * 100, 3 * 350)]


def test_bad_rows_go_to_failed_and_the_rest_is_written(tmp_path):
  out = str(tmp_path / "out")
  rows = [make_row("tickets", 0, o) for o in range(10)]
  rows[3]["created_at"] = "yesterday"  # string in a timestamp (long) field
  rows[4]["kafka_partition"] = "0"  # string in an int field
  rows[5]["subject"] = None  # required field null
  rows[6]["extra"] = 1  # not in the schema
  rows[7]["dt"] = "../etc"  # unsafe partition value
  rows[8]["kafka_offset"] = 1.5  # pyarrow alone would truncate this to 1
  rows.append(make_row("_internal", 0, 10))  # the file name would be hidden
  files, failed, counters = run_batch(rows, out)

  by_id = {f["row"]["record_id"]: f for f in failed}
  assert {k: v["error_type"] for k, v in by_id.items()} == {
      "tickets-0-3": "invalid_type",
      "tickets-0-4": "invalid_type",
      "tickets-0-5": "missing_field",
      "tickets-0-6": "unexpected_field",
      "tickets-0-7": "invalid_partition",
      "tickets-0-8": "invalid_type",
      "_internal-0-10": "invalid_type",
  }
  assert "created_at" in by_id["tickets-0-3"]["reason"]
  assert "kafka_partition" in by_id["tickets-0-4"]["reason"]
  assert by_id["tickets-0-3"]["row"] == rows[3]
  assert counters["rows_failed"] == 7
  assert counters["rows_written"] == 4
  table = pq.read_table(files[0])
  assert table.column("kafka_offset").to_pylist() == [0, 1, 2, 9]
  assert list_files(out) == [
      "dt=2024-01-01/" + parquet_sink.file_name("tickets", 0, 0, 9)]

  letter = parquet_sink.to_dead_letter(by_id["tickets-0-4"], failed_at_millis=T0 * 1000)
  assert letter["kafka_partition"] == -1 and letter["kafka_offset"] == 4
  assert letter["stage"] == "write_parquet" and letter["dt"] == "2024-01-01"
  dl_schema = schemas.to_arrow(schemas.load("dead_letter"))
  pa.Table.from_pylist([letter], schema=dl_schema).validate(full=True)
  assert set(letter) == set(dl_schema.names)


def test_rows_arrow_rejects_are_isolated_in_the_write_stage(tmp_path):
  out = str(tmp_path / "out")
  schema = schemas.compose("Tagged", schemas.load("source_metadata"), {
      "name": "Tags", "fields": [
          {"name": "tags", "type": {"type": "array", "items": "string"}}]})
  rows = [{k: v for k, v in make_row("tags", 0, o).items()
           if k in schemas.field_names(schema)} | {"tags": ["a", str(o)]}
          for o in range(5)]
  rows[2]["tags"] = ["a", 2]  # nested values are checked by pyarrow itself
  rows[4]["tags"] = [None, b"\xff"]
  with beam.Pipeline(runner="FnApiRunner") as p:
    result = p | beam.Create(rows) | WriteToHiveParquet(out, schema)
    assert_that(result.files | beam.Map(os.path.basename), equal_to(
        [parquet_sink.file_name("tags", 0, 0, 3)]), label="files")
    assert_that(
        result.failed | beam.Map(lambda f: (f["row"]["kafka_offset"], f["error_type"])),
        equal_to([(2, "invalid_type"), (4, "invalid_type")]), label="failed")
  table = pq.read_table(
      os.path.join(out, "dt=2024-01-01", parquet_sink.file_name("tags", 0, 0, 3)))
  assert table.column("kafka_offset").to_pylist() == [0, 1, 3]
  assert table.column("tags").to_pylist()[1] == ["a", "1"]


def test_streaming_windows_and_late_data(tmp_path):
  out = str(tmp_path / "out")

  def stamped(offset, second):
    row = make_row("tickets", 0, offset, ts_millis=(T0 + second) * 1000)
    return TimestampedValue(row, T0 + second)

  stream = (
      test_stream.TestStream()
      .advance_watermark_to(T0)
      .add_elements([stamped(o, 10 + o) for o in range(5)])  # window [0, 60)
      .advance_watermark_to(T0 + 60)  # fires [0, 60) on time
      .add_elements([stamped(5, 30)])  # late for [0, 60), within lateness
      .add_elements([stamped(o, 60 + o) for o in range(6, 10)])  # [60, 120)
      .advance_watermark_to(T0 + 121)
      .advance_watermark_to_infinity())
  options = PipelineOptions(streaming=True, runner="BundleBasedDirectRunner")
  with beam.Pipeline(options=options) as p:
    result = (
        p
        | stream
        | WriteToHiveParquet(out, SCHEMA, window_seconds=60, allowed_lateness_seconds=600))
    assert_that(result.failed, equal_to([]), label="no failures")

  names = [parquet_sink.file_name("tickets", 0, a, b) for a, b in [(0, 4), (5, 5), (6, 9)]]
  assert list_files(out) == sorted(f"dt=2024-01-01/{n}" for n in names)
  offsets = {
      n: pq.read_table(os.path.join(out, "dt=2024-01-01", n)).column(
          "kafka_offset").to_pylist() for n in names}
  assert offsets == {names[0]: [0, 1, 2, 3, 4], names[1]: [5], names[2]: [6, 7, 8, 9]}


def test_streaming_data_later_than_allowed_lateness_is_dropped(tmp_path):
  """Pins the documented limit: past allowed lateness the GroupByKey drops rows."""
  out = str(tmp_path / "out")
  rows = [make_row("tickets", 0, o, ts_millis=(T0 + o) * 1000) for o in range(2)]
  stream = (
      test_stream.TestStream()
      .advance_watermark_to(T0)
      .add_elements([TimestampedValue(rows[0], T0)])
      .advance_watermark_to(T0 + 60 + 120)  # past the window end + lateness
      .add_elements([TimestampedValue(rows[1], T0 + 1)])
      .advance_watermark_to_infinity())
  options = PipelineOptions(streaming=True, runner="BundleBasedDirectRunner")
  with beam.Pipeline(options=options) as p:
    _ = p | stream | WriteToHiveParquet(
        out, SCHEMA, window_seconds=60, allowed_lateness_seconds=60)
  assert list_files(out) == [
      "dt=2024-01-01/" + parquet_sink.file_name("tickets", 0, 0, 0)]


def test_streaming_input_is_windowed_and_batch_input_is_not():
  sink = WriteToHiveParquet("/tmp/unused", SCHEMA, window_seconds=30)
  p = beam.Pipeline(runner="FnApiRunner")
  batch = p | beam.Create([make_row("t", 0, 0)]) | "batch" >> sink
  assert batch.files.windowing.windowfn == beam.window.GlobalWindows()
  stream = (
      p
      | test_stream.TestStream().advance_watermark_to_infinity()
      | "stream" >> WriteToHiveParquet("/tmp/unused", SCHEMA, window_seconds=30))
  assert stream.files.windowing.windowfn == beam.window.FixedWindows(30)
  dd = {item.key: item.value for item in DisplayData.create_from(sink).items}
  assert dd["window_seconds"] == 30 and dd["partition_field"] == "dt"


@pytest.mark.parametrize("kwargs, message", [
    ({"output_dir": ""}, "output_dir"),
    ({"avro_schema": {"type": "record", "name": "X", "fields": [
        {"name": "dt", "type": "string"}]}}, "lacks required fields"),
    ({"partition_field": "record_id", "avro_schema": schemas.load("ticket")},
     "lacks required fields"),
    ({"partition_field": "kafka_offset"}, "non-null string"),
    ({"max_rows_per_file": 0}, "max_rows_per_file"),
    ({"window_seconds": 0}, "window_seconds"),
    ({"allowed_lateness_seconds": -1}, "allowed_lateness_seconds"),
    ({"compression": "lzo"}, "compression"),
])
def test_invalid_arguments(kwargs, message):
  args = {"output_dir": "/tmp/out", "avro_schema": SCHEMA} | kwargs
  with pytest.raises(ValueError, match=message):
    WriteToHiveParquet(args.pop("output_dir"), args.pop("avro_schema"), **args)


def test_file_name_sorts_by_offset():
  names = [parquet_sink.file_name("t", 2, a, a + 9) for a in (0, 10, 100, 2**40)]
  assert names == sorted(names)
  assert names[1] == "t-0002-00000000000000000010-00000000000000000019.parquet"
  assert collections.Counter(names).most_common(1)[0][1] == 1
