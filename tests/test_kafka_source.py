"""Tests for tierflow.connectors.kafka_source against the embedded broker (Tansu)."""

import collections
import glob
import json
import os
import random
import threading
import time

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from kafka import KafkaConsumer, TopicPartition

from tierflow.connectors.kafka_offsets import resolve_ranges
from tierflow.connectors.kafka_source import KafkaReadConfig, ReadKafkaBatches
from tierflow_local.loader import publish


@pytest.fixture(params=["tansu", "apache-kafka"])
def broker(request):
  """Every test here runs against the embedded broker and against Apache Kafka."""
  from conftest import both_brokers
  return both_brokers(request)

T0_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z


def read_records(config: KafkaReadConfig, tmp_dir: str) -> list[tuple]:
  """Runs ReadKafkaBatches on FnApiRunner; returns (partition, offset, ts, key, value) tuples."""

  def as_line(r):
    return json.dumps([r.partition, r.offset, r.timestamp_ms,
                       None if r.key is None else r.key.decode(),
                       None if r.value is None else r.value.decode()])

  prefix = os.path.join(tmp_dir, "records")
  with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
    _ = (p | ReadKafkaBatches(config) | beam.FlatMap(lambda b: b.records())
         | beam.Map(as_line) | beam.io.WriteToText(prefix))
  out = []
  for path in glob.glob(prefix + "*"):
    with open(path, encoding="utf-8") as f:
      out.extend(tuple(json.loads(line)) for line in f)
  return out


def highwaters(positions) -> dict[int, int]:
  """{partition: next offset} from the (partition, offset) pairs a producer got back."""
  hw = collections.defaultdict(int)
  for partition, offset in positions:
    hw[partition] = max(hw[partition], offset + 1)
  return dict(hw)


def rows_by_offset(read_duckdb, output) -> list[tuple]:
  return [(r["kafka_partition"], r["kafka_offset"]) for r in read_duckdb(
      f"{output}/results", "SELECT kafka_partition, kafka_offset FROM t ORDER BY 1, 2")]


def group_of(topic: str) -> str:
  return f"tierflow.passthrough.{topic}"


def test_bounded_read_returns_every_record_exactly_once(broker, topic, produce, tmp_path):
  name = topic(partitions=4)
  records = [{"partition": i % 4, "key": None if i % 10 == 0 else f"k{i}".encode(),
              "value": None if i % 100 == 7 else f"v{i}".encode(),
              "timestamp_ms": T0_MS + i} for i in range(2000)]
  positions = produce(name, records, batch_size=50)
  hw = highwaters(positions)
  assert sorted(hw) == [0, 1, 2, 3] and sum(hw.values()) == 2000

  # Written in batches, Tansu's ListOffsets(latest) tends to under-report the
  # end (observed: 488-489 of 500 per partition); it must never over-report,
  # and the resolved ranges must reach the true end regardless.
  consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers)
  try:
    listed = consumer.end_offsets([TopicPartition(name, p) for p in range(4)])
  finally:
    consumer.close()
  assert all(off <= hw[tp.partition] for tp, off in listed.items())
  ranges = resolve_ranges(KafkaReadConfig(broker.bootstrap_servers, name))
  assert {r.partition: (r.start, r.stop) for r in ranges} == {p: (0, n) for p, n in hw.items()}

  got = read_records(KafkaReadConfig(broker.bootstrap_servers, name), str(tmp_path))
  assert len(got) == 2000
  expected = {
      (p, off): (T0_MS + i, None if i % 10 == 0 else f"k{i}", None if i % 100 == 7 else f"v{i}")
      for i, (p, off) in enumerate(positions)}
  assert {(p, off): (ts, k, v) for p, off, ts, k, v in got} == expected


def test_bounded_read_of_empty_topic_finishes(broker, topic, tmp_path):
  name = topic(partitions=1)
  assert read_records(KafkaReadConfig(broker.bootstrap_servers, name), str(tmp_path)) == []


def test_resolve_ranges_on_missing_topic(broker):
  config = KafkaReadConfig(broker.bootstrap_servers, "no-such-topic-ever")
  with pytest.raises(ValueError, match="no-such-topic-ever.*does not exist"):
    resolve_ranges(config)


def _four_partitions(name, produce, per_partition=100):
  records = [{"partition": p, "value": json.dumps({"p": p, "i": i}).encode(),
              "timestamp_ms": T0_MS + i * 1000}
             for i in range(per_partition) for p in range(4)]
  return highwaters(produce(name, records, batch_size=40))


@pytest.mark.parametrize("flags, expected", [
    (["--start-offset", "10", "--end-offset", "20"],
     {p: range(10, 20) for p in range(4)}),
    (["--start-offset", "0:5,1:0,2:99,3:100", "--end-offset", "0:6,1:100,2:100,3:100"],
     {0: range(5, 6), 1: range(0, 100), 2: range(99, 100), 3: range(0, 0)}),
    # Partitions not named start at the earliest offset and stop at the end.
    (["--start-offset", "1:50", "--end-offset", "2:3"],
     {0: range(0, 100), 1: range(50, 100), 2: range(0, 3), 3: range(0, 100)}),
    # An end past the end stops at the end; start == end reads nothing.
    (["--start-offset", "95", "--end-offset", "1000"], {p: range(95, 100) for p in range(4)}),
    (["--start-offset", "40", "--end-offset", "40"], {p: range(0) for p in range(4)}),
])
def test_offset_range_flags(topic, produce, passthrough, output_dir, read_duckdb,
                            counter_schema, flags, expected):
  name = topic(partitions=4)
  assert _four_partitions(name, produce) == {p: 100 for p in range(4)}
  summary = passthrough(name, output_dir, "--bounded", "--schema", counter_schema, *flags)
  want = sorted((p, off) for p, offs in expected.items() for off in offs)
  assert rows_by_offset(read_duckdb, output_dir) == want
  assert summary.rows_written == len(want) and summary.dead_letters == 0


@pytest.fixture
def counter_schema(tmp_path):
  """An .avsc path for the {"p": int, "i": int} test payloads (a custom --schema)."""
  path = tmp_path / "counter.avsc"
  path.write_text(json.dumps({
      "type": "record", "name": "Counter", "namespace": "test",
      "fields": [{"name": "p", "type": "int"}, {"name": "i", "type": "long"}]}))
  return str(path)


@pytest.mark.slow
def test_time_range_flags_match_kafka_semantics(broker, topic, produce, passthrough,
                                                output_dir, read_duckdb, counter_schema):
  """start/end times select [first offset with ts >= start, first offset with ts >= end)."""
  name = topic(partitions=4)
  rng = random.Random(7)
  records = []
  for i in range(300):
    for p in range(4):
      # Roughly increasing timestamps with out-of-order jitter of a few seconds.
      ts = T0_MS + i * 1000 + p * 137 + rng.randint(-3000, 3000)
      records.append({"partition": p, "timestamp_ms": ts,
                      "value": json.dumps({"p": p, "i": i}).encode()})
  positions = produce(name, records, batch_size=rng.choice([17, 40, 64]))
  by_partition = collections.defaultdict(list)  # partition -> [(offset, ts)]
  for (p, off), r in zip(positions, records):
    by_partition[p].append((off, r["timestamp_ms"]))

  start_ms, end_ms = T0_MS + 100_500, T0_MS + 200_250

  def first_at_or_after(p, t):
    return next((off for off, ts in sorted(by_partition[p]) if ts >= t),
                len(by_partition[p]))

  want = sorted((p, off) for p in range(4)
                for off in range(first_at_or_after(p, start_ms), first_at_or_after(p, end_ms)))
  assert want
  passthrough(name, output_dir, "--bounded", "--schema", counter_schema,
              "--start-time", str(start_ms), "--end-time", "2024-01-01T00:03:20.250Z")
  assert rows_by_offset(read_duckdb, output_dir) == want

  # The same via resolve_ranges directly, and a start time after every record.
  ranges = resolve_ranges(KafkaReadConfig(broker.bootstrap_servers, name,
                                          start_time_ms=start_ms, end_time_ms=end_ms))
  assert [(r.start, r.stop) for r in ranges] == [
      (first_at_or_after(p, start_ms), first_at_or_after(p, end_ms)) for p in range(4)]
  late = resolve_ranges(KafkaReadConfig(broker.bootstrap_servers, name,
                                        start_time_ms=T0_MS + 10_000_000))
  assert [(r.start, r.stop) for r in late] == [(300, 300)] * 4


@pytest.mark.slow
def test_bounded_runs_commit_and_resume_from_the_group_offsets(
    broker, topic, make_tickets, passthrough, committed, tmp_path_factory, read_duckdb):
  name = topic(partitions=4)
  first = make_tickets(400, prefix="A")
  publish(broker.bootstrap_servers, name, first)
  out1 = str(tmp_path_factory.mktemp("run1"))
  summary1 = passthrough(name, out1, "--bounded")
  assert summary1.rows_written == 400

  ids1 = read_duckdb(f"{out1}/results", "SELECT kafka_partition p, count(*) n, "
                     "max(kafka_offset) m FROM t GROUP BY 1 ORDER BY 1")
  assert [r["p"] for r in ids1] == [0, 1, 2, 3]
  hw1 = {r["p"]: r["m"] + 1 for r in ids1}
  assert committed(name, group_of(name), 4) == hw1 == summary1.committed_offsets

  second = make_tickets(250, prefix="B", start_ms=T0_MS + 86_400_000)
  publish(broker.bootstrap_servers, name, second)
  out2 = str(tmp_path_factory.mktemp("run2"))
  assert passthrough(name, out2, "--bounded").rows_written == 250
  rows2 = read_duckdb(f"{out2}/results")
  assert sorted(r["ticket_id"] for r in rows2) == sorted(t["ticket_id"] for t in second)
  assert all(r["kafka_offset"] >= hw1[r["kafka_partition"]] for r in rows2)
  hw2 = dict(hw1)
  for r in rows2:
    hw2[r["kafka_partition"]] = max(hw2[r["kafka_partition"]], r["kafka_offset"] + 1)
  assert committed(name, group_of(name), 4) == hw2

  # Nothing new: a third run reads nothing and leaves the offsets alone.
  out3 = str(tmp_path_factory.mktemp("run3"))
  assert passthrough(name, out3, "--bounded").rows_written == 0
  assert read_duckdb(f"{out3}/results") == []
  assert committed(name, group_of(name), 4) == hw2


@pytest.mark.slow
def test_explicit_range_does_not_move_the_group(broker, topic, make_tickets, passthrough,
                                                committed, tmp_path_factory, read_duckdb):
  name = topic(partitions=2)
  publish(broker.bootstrap_servers, name, make_tickets(100, prefix="A"))
  passthrough(name, str(tmp_path_factory.mktemp("o")), "--bounded")
  before = committed(name, group_of(name), 2)
  assert sum(before.values()) == 100
  publish(broker.bootstrap_servers, name, make_tickets(60, prefix="B"))

  full = str(tmp_path_factory.mktemp("o"))
  assert passthrough(name, full, "--bounded", "--start-offset", "0").rows_written == 160
  hw = {r["p"]: r["n"] for r in read_duckdb(
      f"{full}/results", "SELECT kafka_partition p, max(kafka_offset) + 1 n FROM t GROUP BY 1")}
  summary = passthrough(name, str(tmp_path_factory.mktemp("o")), "--bounded",
                        "--start-time", str(T0_MS))
  assert summary.rows_written == 160
  assert committed(name, group_of(name), 2) == before  # --commit-offsets auto
  assert summary.committed_offsets is None  # a run that does not commit reports none

  # "always" commits an explicit range too (here moving partition 0 back to 10).
  passthrough(name, str(tmp_path_factory.mktemp("o")), "--bounded", "--start-offset", "0",
              "--end-offset", "0:10", "--commit-offsets", "always")
  assert committed(name, group_of(name), 2) == {0: 10, 1: hw[1]}
  # "never" does not commit even a default run.
  other = "never-commit-" + name
  out = str(tmp_path_factory.mktemp("o"))
  assert passthrough(name, out, "--bounded", "--group-id", other,
                     "--commit-offsets", "never").rows_written == 160
  assert committed(name, other, 2) == {0: None, 1: None}


@pytest.mark.slow
def test_streaming_read_picks_up_new_records(broker, topic, make_tickets, passthrough, produce,
                                             output_dir, read_duckdb, committed):
  name = topic(partitions=2)
  now = int(time.time() * 1000)
  before = make_tickets(30, prefix="before", start_ms=now - 60_000, step_ms=100)
  after = make_tickets(40, prefix="after", start_ms=now + 3_000, step_ms=10)
  publish(broker.bootstrap_servers, name, before)

  def publish_later():
    time.sleep(3)
    publish(broker.bootstrap_servers, name,
            [{**t, "created_at": int(time.time() * 1000)} for t in after])
    produce(name, [{"value": b"not json", "partition": 1}])

  writer = threading.Thread(target=publish_later)
  writer.start()
  started = time.monotonic()
  try:
    summary = passthrough(name, output_dir, "--streaming", "--max-read-seconds", "8",
                          "--flush-seconds", "2")
  finally:
    writer.join()
  assert time.monotonic() - started >= 7  # it really did keep reading
  assert summary.state == "DONE"
  rows = read_duckdb(f"{output_dir}/results")
  assert sorted(r["ticket_id"] for r in rows) == sorted(
      t["ticket_id"] for t in before + after)
  assert len({r["record_id"] for r in rows}) == 70
  [dead] = read_duckdb(f"{output_dir}/dead_letter")
  assert (dead["error_type"], dead["raw_value"], dead["kafka_partition"]) == (
      "invalid_json", b"not json", 1)
  assert (summary.rows_written, summary.dead_letters) == (70, 1)
  # A streaming run commits what it read, too.
  assert sum(committed(name, group_of(name), 2).values()) == 71


def test_read_config_validation(broker):
  servers = broker.bootstrap_servers
  with pytest.raises(ValueError, match="not both"):
    KafkaReadConfig(servers, "t", start_offset=1, start_time_ms=5)
  with pytest.raises(ValueError, match="drop --streaming"):
    KafkaReadConfig(servers, "t", bounded=False, end_offset=5)
  with pytest.raises(ValueError, match="before start"):
    KafkaReadConfig(servers, "t", start_time_ms=10, end_time_ms=5)
  with pytest.raises(ValueError, match="topic"):
    KafkaReadConfig(servers, "")
  assert KafkaReadConfig(servers, "t", start_offset="0:5,3:7").start_offset == {0: 5, 3: 7}
  with pytest.raises(TypeError):
    ReadKafkaBatches({"topic": "t"})


def test_secret_consumer_settings_only_by_reference(broker, topic, make_tickets, passthrough,
                                                     output_dir, read_duckdb, tmp_path,
                                                     monkeypatch, caplog):
  from tierflow.connectors.kafka_client import resolve_secret_settings
  secret = "hunter2-DO-NOT-LEAK"
  with pytest.raises(ValueError, match="sasl_plain_password=env:VAR"):
    KafkaReadConfig(bootstrap_servers=broker.bootstrap_servers, topic="t",
                    consumer_config={"sasl_plain_password": secret})
  monkeypatch.setenv("TF_TEST_KAFKA_SECRET", secret)
  path = tmp_path / "secret"
  path.write_text(secret + "\n")
  assert resolve_secret_settings({"ssl_password": "env:TF_TEST_KAFKA_SECRET", "x": "env:Y"}) == {
      "ssl_password": secret, "x": "env:Y"}
  assert resolve_secret_settings({"ssl_password": f"file:{path}"})["ssl_password"] == secret
  with pytest.raises(ValueError, match="TF_TEST_MISSING is not set"):
    resolve_secret_settings({"ssl_password": "env:TF_TEST_MISSING"})
  # A run with a referenced secret reads normally and never writes the secret out.
  name = topic(partitions=1)
  publish(broker.bootstrap_servers, name, make_tickets(5))
  caplog.set_level("DEBUG")
  passthrough(name, output_dir, "--kafka-consumer-config", "ssl_password=env:TF_TEST_KAFKA_SECRET")
  assert len(read_duckdb(f"{output_dir}/results")) == 5
  assert secret not in caplog.text
  for root, _, files in os.walk(output_dir):
    for f in files:
      with open(os.path.join(root, f), "rb") as fh:
        assert secret.encode() not in fh.read()
