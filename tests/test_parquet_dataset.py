"""tierflow.connectors.parquet_dataset: real Beam runs, read back with pyarrow and DuckDB."""

import datetime
import json
import os

import apache_beam as beam
import duckdb
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that, equal_to

from tierflow import schemas
from tierflow.connectors import parquet_dataset
from tierflow.connectors.codecs import JsonCodec
from tierflow.connectors.decode import DecodedBatch, decode_batch, row_schema
from tierflow.connectors.kafka_source import KafkaBatch, batch_name
from tierflow.connectors.parquet_dataset import (WriteBatches, WriteParquetDataset,
                                                 check_accounted, write_file)

TICKET = schemas.load("ticket")
ROW_SCHEMA = row_schema(TICKET)
ROW_ARROW = schemas.to_arrow(ROW_SCHEMA)
T0_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
DAY_MS = 86_400_000


def ticket_value(i: int, created_at: int) -> bytes:
  return JsonCodec(TICKET).encode({"ticket_id": f"T{i}", "created_at": created_at,
                                   "subject": "s", "body": f"body {i}", "channel": "chat",
                                   "customer_id": None})


def kafka_batch(partition: int, start: int, end: int, *, bad=(), gaps=(), topic="tickets",
                days=2) -> KafkaBatch:
  """A batch of tickets over [start, end): bad offsets hold garbage, gap offsets hold none;
  created_at spreads the records over ``days`` days."""
  offsets = [o for o in range(start, end) if o not in gaps]
  values = [b"\xffgarbage" if o in bad else
            ticket_value(o, T0_MS + (o % days) * DAY_MS) for o in offsets]
  return KafkaBatch(topic, partition, start, end, start, offsets, [T0_MS] * len(offsets),
                    [None] * len(offsets), values)


def decoded(batch: KafkaBatch) -> DecodedBatch:
  return decode_batch(batch, JsonCodec(TICKET), ROW_ARROW, event_time_field="created_at")


def visible_files(root: str) -> list[str]:
  out = []
  for d, _, files in os.walk(root):
    out += [os.path.relpath(os.path.join(d, f), root) for f in files if not f.startswith(".")]
  return sorted(out)


def hidden_files(root: str) -> list[str]:
  return sorted(f for _, _, files in os.walk(root) for f in files if f.startswith("."))


def write(batches, out, **kwargs):
  with beam.Pipeline(runner="FnApiRunner") as p:
    written = p | beam.Create(batches) | WriteBatches(out, ROW_SCHEMA, **kwargs)
    assert_that(written | beam.Map(lambda w: (w.ref.name, w.rows, w.dead_letters)),
                equal_to([(b.ref.name, b.rows.num_rows, b.dead_letters.num_rows)
                          for b in batches]))


def test_batches_land_in_day_partitions_named_after_their_offset_range(tmp_path):
  out = str(tmp_path / "out")
  batches = [decoded(kafka_batch(0, 0, 50, bad={7})), decoded(kafka_batch(0, 50, 100)),
             decoded(kafka_batch(3, 1000, 1010, gaps={1004, 1009}))]
  write(batches, out)
  names = [batch_name("tickets", 0, 0, 50), batch_name("tickets", 0, 50, 100),
           batch_name("tickets", 3, 1000, 1010)]
  assert names[0] == "tickets-0000-00000000000000000000-00000000000000000049"
  assert visible_files(out) == sorted(
      [f"results/dt=2024-01-0{d}/{n}.parquet" for d in (1, 2) for n in names]
      + [f"dead_letter/dt=2024-01-01/{names[0]}.parquet"]
      # the output's record of what is durable (connectors/written_ranges.py)
      + [f"_progress/tickets/0/{0:020d}-{50:020d}.done",
         f"_progress/tickets/0/{50:020d}-{100:020d}.done",
         f"_progress/tickets/3/{1000:020d}-{1010:020d}.done"])
  assert hidden_files(out) == []
  # Types and values survive; dt comes back from the path; gaps and the bad record are
  # accounted for (the bad one in the dead letters), nothing else is missing.
  table = pds.dataset(f"{out}/results", format="parquet",
                      partitioning=parquet_dataset.hive_partitioning()).to_table()
  assert table.num_rows == 49 + 50 + 8
  assert table.schema.field("created_at").type == pa.timestamp("ms", tz="UTC")
  assert table.schema.field("kafka_partition").type == pa.int32()
  rows = {r["record_id"]: r for r in table.to_pylist()}
  assert "tickets-0-7" not in rows and "tickets-3-1004" not in rows
  r = rows["tickets-0-51"]
  assert r["dt"] == "2024-01-02" and r["ticket_id"] == "T51" and r["body"] == "body 51"
  assert r["created_at"] == datetime.datetime(2024, 1, 2, tzinfo=datetime.timezone.utc)
  [dead] = pq.read_table(f"{out}/dead_letter/dt=2024-01-01/{names[0]}.parquet").to_pylist()
  assert (dead["kafka_offset"], dead["error_type"], dead["raw_value"]) == (
      7, "invalid_utf8", b"\xffgarbage")
  # DuckDB reads the same dataset.
  con = duckdb.connect()
  n, days = con.execute(
      f"SELECT count(*), count(DISTINCT dt) FROM read_parquet('{out}/results/**/*.parquet', "
      "hive_partitioning=true)").fetchone()
  assert (n, days) == (107, 2)


def test_a_write_a_crash_left_unfinished_is_replaced_and_its_leftovers_cleared(tmp_path):
  out = str(tmp_path / "out")
  batch = decoded(kafka_batch(1, 200, 260))
  write([batch], out)
  first = visible_files(out)
  # As if killed before the write finished: the marker still says writing, and a hidden
  # temporary file of the batch is left next to its file.
  done = os.path.join(out, "_progress", "tickets", "1", f"{200:020d}-{260:020d}.done")
  os.rename(done, done[:-len(".done")] + ".writing")
  leftover = os.path.join(out, "results", "dt=2024-01-01",
                          f".{batch.ref.name}.parquet.0123abcd.inprogress")
  with open(leftover, "wb") as f:
    f.write(b"partial")
  write([batch], out)
  assert visible_files(out) == first
  assert hidden_files(out) == []
  total = sum(pq.read_metadata(os.path.join(out, f)).num_rows for f in first
              if f.endswith(".parquet"))
  assert total == 60


def write_expecting(batches, out, expected):
  """Writes the batches; their WrittenBatches must be ``expected``: (name, rows + dead
  letters written, offsets already written)."""
  with beam.Pipeline(runner="FnApiRunner") as p:
    written = p | beam.Create(batches) | WriteBatches(out, ROW_SCHEMA)
    assert_that(written | beam.Map(lambda w: (w.ref.name, w.rows + w.dead_letters,
                                              w.already_written)), equal_to(expected))


def stored_offsets(out):
  globs = [f"'{out}/{sub}/**/*.parquet'" for sub in ("results", "dead_letter")
           if os.path.isdir(f"{out}/{sub}")]
  return duckdb.sql(f"SELECT kafka_offset FROM read_parquet([{', '.join(globs)}], "
                    "hive_partitioning=true) ORDER BY 1").fetchall()


def test_a_replay_cut_differently_writes_only_what_is_not_durable(tmp_path):
  """After a failure a streaming read replays from its checkpoint and cuts batches by
  time, elsewhere than before: [0, 50) is durable, the replay brings [0, 80). Only
  [50, 80) is written, under its own name; no offset is stored twice."""
  out = str(tmp_path / "out")
  write([decoded(kafka_batch(0, 0, 50, bad={7}))], out)
  replay = decoded(kafka_batch(0, 0, 80, bad={7}))
  write_expecting([replay], out, [(replay.ref.name, 30, 50)])
  assert [o for (o,) in stored_offsets(out)] == list(range(80))
  assert sorted(f for f in visible_files(out) if f.startswith("results/dt=2024-01-01")) == [
      f"results/dt=2024-01-01/{batch_name('tickets', 0, 0, 50)}.parquet",
      f"results/dt=2024-01-01/{batch_name('tickets', 0, 50, 80)}.parquet"]
  # A replay wholly inside what is durable writes nothing at all.
  before = visible_files(out)
  inside = decoded(kafka_batch(0, 10, 40))
  write_expecting([inside], out, [(inside.ref.name, 0, 30)])
  assert visible_files(out) == before


def test_an_unfinished_write_cut_otherwise_is_rolled_back_before_the_replay(tmp_path):
  """A failed attempt renamed some files of [0, 60) into place and died: its marker still
  says writing. The replay, cut at 50, deletes what that write put in place (the files
  its marker lists) before writing [0, 50): no offset stored twice, none lost."""
  out = str(tmp_path / "out")
  write([decoded(kafka_batch(0, 0, 60))], out)
  done = os.path.join(out, "_progress", "tickets", "0", f"{0:020d}-{60:020d}.done")
  os.rename(done, done[:-len(".done")] + ".writing")
  write([decoded(kafka_batch(0, 0, 50)), decoded(kafka_batch(0, 50, 60))], out)
  assert [o for (o,) in stored_offsets(out)] == list(range(60))
  assert sorted(os.listdir(os.path.dirname(done))) == [
      f"{0:020d}-{50:020d}.done", f"{50:020d}-{60:020d}.done"]


def test_the_progress_index_stays_small_and_never_loses_coverage(tmp_path):
  from tierflow.connectors.written_ranges import COMPACT_ABOVE, WrittenRanges
  out = str(tmp_path / "out")
  batches = [decoded(kafka_batch(2, i * 5, i * 5 + 5)) for i in range(60)]
  for chunk in range(0, 60, 10):  # ten bundles' worth at a time
    write(batches[chunk:chunk + 10], out)
    entries = WrittenRanges(out).entries("tickets", 2)
    assert len(entries) <= COMPACT_ABOVE + 10
    assert WrittenRanges.done(entries) == [(0, chunk * 5 + 50)]


def test_interval_arithmetic():
  from tierflow.connectors.written_ranges import contiguous_end, merge, subtract
  assert merge([(5, 9), (0, 3), (3, 4), (8, 12), (20, 20)]) == [(0, 4), (5, 12)]
  assert contiguous_end([(0, 4), (4, 7), (9, 10)], 0) == 7
  assert contiguous_end([(0, 4), (4, 7)], 2) == 7
  assert contiguous_end([(3, 4)], 0) == 0
  assert contiguous_end([(0, 10), (2, 30)], 5) == 30  # overlaps allowed
  assert subtract(0, 100, [(10, 20), (15, 30), (90, 200)]) == [(0, 10), (30, 90)]
  assert subtract(0, 10, [(0, 10)]) == []
  assert subtract(5, 8, []) == [(5, 8)]


def test_a_batch_whose_output_does_not_account_for_its_records_is_refused(tmp_path):
  batch = decoded(kafka_batch(0, 0, 20))
  lost = batch.replace(rows=batch.rows.slice(0, 19))
  with pytest.raises(RuntimeError, match="missing offsets \\[19\\]"):
    check_accounted(lost.ref, lost.rows, lost.dead_letters)
  out = str(tmp_path / "out")
  with pytest.raises(Exception, match="does not account for its records"):
    write([lost], out)
  assert visible_files(out) == []  # nothing written, so nothing could be committed


def test_a_failed_write_leaves_no_file_visible_or_hidden(tmp_path, monkeypatch):
  out = tmp_path / "out"
  table = decoded(kafka_batch(0, 0, 10)).rows.drop_columns(["dt"])
  calls = []

  def failing_write(*args, **kwargs):
    calls.append(args)
    raise OSError("disk full")

  monkeypatch.setattr(parquet_dataset.pq, "write_table", failing_write)
  os.makedirs(out)
  with pytest.raises(OSError, match="disk full"):
    write_file(str(out), "x.parquet", table)
  assert calls and os.listdir(out) == []


def test_an_output_path_that_is_a_file_fails_the_write(tmp_path):
  blocker = tmp_path / "not-a-dir"
  blocker.write_text("")
  with pytest.raises(Exception):
    write([decoded(kafka_batch(0, 0, 5))], str(blocker))


def test_rows_writer_writes_valid_rows_and_returns_the_rest(tmp_path):
  out = str(tmp_path / "out")
  rows = decoded(kafka_batch(2, 0, 6, days=1)).rows.to_pylist()
  rows[1]["created_at"] = "yesterday"  # wrong type
  rows[2]["unknown"] = 1  # not in the schema
  rows[3]["dt"] = "../etc"  # unsafe partition value
  with pytest.raises(Exception, match=r"a row cannot be written \(invalid_type\)"):
    with beam.Pipeline(runner="FnApiRunner") as p:  # by default a bad row fails the run
      _ = p | beam.Create(rows[:2]) | WriteParquetDataset(str(tmp_path / "strict"), ROW_SCHEMA)
  with beam.Pipeline(runner="FnApiRunner") as p:
    result = p | beam.Create(rows) | WriteParquetDataset(
        out, ROW_SCHEMA).with_exception_handling()
    assert_that(result.failures | beam.Map(
        lambda f: (json.loads(f.payload)["kafka_offset"], f.step, f.error_type)),
                equal_to([(1, "write", "invalid_type"), (2, "write", "unexpected_field"),
                          (3, "write", "invalid_partition")]), label="failed")
    assert_that(result.files | beam.Map(os.path.basename),
                equal_to([parquet_dataset._rows_file_name("tickets", 2, [0, 4, 5])]),
                label="files")
  [f] = visible_files(out)
  assert f.startswith("dt=2024-01-01/tickets-0002-00000000000000000000-00000000000000000005-")
  assert pq.read_table(os.path.join(out, f)).column("kafka_offset").to_pylist() == [0, 4, 5]


def test_topic_names_that_would_hide_files_are_refused():
  for topic in ("_schemas", ".hidden", "a/b", ""):
    with pytest.raises(ValueError, match="cannot name visible files"):
      parquet_dataset.check_topic(topic)
  parquet_dataset.check_topic("tickets.v2-eu_1")


@pytest.mark.parametrize("kwargs, message", [
    ({"output": ""}, "output"),
    ({"compression": "lzma"}, "compression"),
    ({"row_schema": TICKET}, "lacks required fields"),
])
def test_invalid_arguments(kwargs, message):
  args = {"output": "/tmp/x", "row_schema": ROW_SCHEMA, **kwargs}
  with pytest.raises(ValueError, match=message):
    WriteBatches(args.pop("output"), args.pop("row_schema"), **args)
