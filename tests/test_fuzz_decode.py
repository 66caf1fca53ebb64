"""Seeded fuzzing of the decode path: hostile values never crash a run, and every record
ends in the results or the dead letters, exactly once."""

import collections
import os

import pyarrow as pa
import pytest

from tierflow import schemas
from tierflow.connectors.codecs import make_codec
from tierflow.connectors.decode import decode_batch, row_schema
from tierflow.connectors.kafka_source import KafkaBatch

from fuzz_payloads import MAX_RECORD_BYTES, T0_MS, TICKET, records

FORMATS = ["json", "avro", "confluent-avro"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_value_decodes_or_is_dead_lettered_exactly_once(fmt, seed):
  recs = records(fmt, seed, hostile=1000, good=300)
  n = len(recs)
  batch = KafkaBatch("fuzz", 0, 0, n, 0, list(range(n)),
                     [T0_MS if i % 5 else -1 for i in range(n)],  # some without a timestamp
                     [r["key"] for r in recs], [r["value"] for r in recs])
  out = decode_batch(batch, make_codec(fmt, TICKET), schemas.to_arrow(row_schema(TICKET)),
                     event_time_field="created_at", max_record_bytes=MAX_RECORD_BYTES)
  out.rows.validate(full=True)
  out.dead_letters.validate(full=True)
  ok = out.rows.column("kafka_offset").to_pylist()
  dead = out.dead_letters.column("kafka_offset").to_pylist()
  assert sorted(ok + dead) == list(range(n))  # each record exactly once
  for i in ok:  # what decoded is a valid ticket within the supported time range
    assert recs[i]["value"] is not None
  good = {i for i, r in enumerate(recs) if r["kind"] == "good"}
  assert good <= set(ok)
  kinds = collections.Counter(out.dead_letters.column("error_type").to_pylist())
  assert sum(kinds.values()) >= 300, kinds  # most hostile values are dead letters
  for letter in out.dead_letters.to_pylist():
    assert letter["reason"] and letter["stage"] == "decode"
    v = recs[letter["kafka_offset"]]["value"]
    assert letter["raw_value"] == (v if v is None or len(v) <= MAX_RECORD_BYTES
                                   else v[:MAX_RECORD_BYTES])
  # Rows convert back to Python (datetimes in range), as the model pipelines need.
  out.rows.to_pylist()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_run_over_hostile_records_exits_0_with_every_offset_accounted(
    fmt, broker, topic, produce, output_dir, read_duckdb, schema_registry):
  name = topic(partitions=3)
  recs = records(fmt, seed=11, hostile=1000, good=200)
  # (A producer refuses a record with neither key nor value; such a value gets a key.)
  positions = produce(name, [{"value": r["value"], "partition": i % 3,
                              "key": r["key"] if r["value"] is not None else b"k"}
                             for i, r in enumerate(recs)], batch_size=500)
  from tierflow import cli
  code = cli.main(["-q", "run", "passthrough", "--bootstrap-servers", broker.bootstrap_servers,
                   "--topic", name, "--output", output_dir, "--format", fmt,
                   "--max-record-bytes", str(MAX_RECORD_BYTES), "--rows-per-file", "400"])
  assert code == 0
  got = collections.Counter()
  for sub in ("results", "dead_letter"):
    if os.path.isdir(f"{output_dir}/{sub}"):
      for r in read_duckdb(f"{output_dir}/{sub}",
                           "SELECT kafka_partition p, kafka_offset o FROM t"):
        got[(r["p"], r["o"])] += 1
  assert set(got) == set(positions) and set(got.values()) == {1}
  good_ids = {f"T{i:06d}" for i in range(200)}
  written = {r["ticket_id"] for r in read_duckdb(f"{output_dir}/results",
                                                  "SELECT ticket_id FROM t")}
  assert good_ids <= written


def _decoding_one_by_one(codec, values) -> list:
  """The indices of the values the codec decodes on their own."""
  from tierflow.connectors.codecs import DecodeError
  ok = []
  for i, v in enumerate(values):
    try:
      codec.decode(v)
      ok.append(i)
    except DecodeError:
      pass
  return ok


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_column_wise_checks_decide_as_the_value_by_value_path(seed):
  """A batch with no tombstone, every record within the size limit and timestamps in range
  is checked over whole columns (``decode._all_fit``, the JSON codec's joined-values
  check); values that are JSON but not one object per line (``null``, ``{}``, a number, two
  objects on a line, a leading space) decode exactly as value by value."""
  import json
  import random

  rng = random.Random(seed)
  good = [r["value"] for r in records("json", seed, hostile=0, good=200)]
  odd = [b"null", b"{}", b"5", b"[1]", b'"s"', b"true", b" " + good[0], good[1] + b" " + good[2],
         good[3][:-1] + b"\n}", json.dumps({"body": "a {\n{ b"}).encode()]
  values = good + odd * 3
  rng.shuffle(values)
  n = len(values)
  codec = make_codec("json", TICKET)
  batch = KafkaBatch("fuzz", 0, 0, n, 0, list(range(n)), [T0_MS] * n, [None] * n, values)
  out = decode_batch(batch, codec, schemas.to_arrow(row_schema(TICKET)),
                     event_time_field="created_at", max_record_bytes=MAX_RECORD_BYTES)
  expected_ok = _decoding_one_by_one(codec, values)
  ok = out.rows.column("kafka_offset").to_pylist()
  assert ok == expected_ok
  assert sorted(ok + out.dead_letters.column("kafka_offset").to_pylist()) == list(range(n))
  assert out.rows.column("record_id").to_pylist() == [f"fuzz-0-{i}" for i in ok]


def test_a_json_null_is_not_a_row_of_nulls_where_every_field_may_be_null():
  """pyarrow's JSON reader reads a ``null`` line as a row of nulls: with every field
  nullable nothing else would refuse it, so the column-wise path must not hand it over."""
  loose = {"type": "record", "name": "Loose", "fields": [
      {"name": "a", "type": ["null", "long"], "default": None},
      {"name": "body", "type": ["null", "string"], "default": None}]}
  values = [b'{"a": 1}', b"null", b"{}", b'{"a": 2, "body": "x"}'] * 50
  n = len(values)
  codec = make_codec("json", loose)
  batch = KafkaBatch("loose", 0, 0, n, 0, list(range(n)), [T0_MS] * n, [None] * n, values)
  out = decode_batch(batch, codec, schemas.to_arrow(row_schema(loose)))
  expected_ok = _decoding_one_by_one(codec, values)
  assert len(expected_ok) == 150
  assert out.rows.column("kafka_offset").to_pylist() == expected_ok
