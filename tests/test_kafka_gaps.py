"""Offsets with no record in them, and a broker that restarts mid-run (Apache Kafka).

A transaction's commit/abort markers and the records an abort threw away, and the records
compaction removed, leave offsets that hold nothing a reader sees. tierflow's batches cover
them all, so the group's offset still reaches the end of the range, and the files hold
exactly the records there are.
"""

import collections
import json
import logging
import os
import signal
import subprocess
import sys
import time

import duckdb
import pytest

from tierflow import launcher

pytestmark = pytest.mark.slow
T0_MS = 1_704_067_200_000


def value(i, note=""):
  return json.dumps({"ticket_id": f"T{i}{note}", "created_at": T0_MS + i, "subject": "s",
                     "body": f"body {i}"}).encode()


def stored_offsets(out):
  glob = f"{out}/results/**/*.parquet"
  return sorted(duckdb.sql(f"SELECT kafka_partition, kafka_offset FROM read_parquet('{glob}')")
                .fetchall())


def run(kafka, topic, out, *flags):
  return launcher.launch("passthrough", ["--bootstrap-servers", kafka.bootstrap_servers,
                                         "--topic", topic, "--output", out, *flags])


def test_transaction_markers_and_aborted_records_are_gaps_the_group_passes(kafka_broker,
                                                                            tmp_path):
  from confluent_kafka import Producer
  kafka_broker.create_topic("tx-gaps", 1)
  producer = Producer({"bootstrap.servers": kafka_broker.bootstrap_servers,
                       "transactional.id": "tierflow-test", "logger": logging.getLogger("t")})
  producer.init_transactions(30)
  expected = []
  i = 0
  for outcome in ("commit", "abort", "commit", "commit", "abort", "commit"):
    producer.begin_transaction()
    for _ in range(3):
      producer.produce("tx-gaps", value(i, outcome), partition=0)
      i += 1
    producer.flush()  # the records reach the log (an abort purges what is still unsent)
    if outcome == "commit":
      producer.commit_transaction(30)
      expected += ["commit"] * 3
    else:
      producer.abort_transaction(30)
  # Offsets: 3 records then a marker per transaction: 24 in all, 12 records committed
  # (the aborted ones are in the log but not read: librdkafka reads read_committed).
  out = str(tmp_path / "out")
  summary = run(kafka_broker, "tx-gaps", out, "--rows-per-file", "5")  # batches split at gaps
  got = [o for _, o in stored_offsets(out)]
  assert len(got) == 12 and summary.rows_written == 12
  assert got == [0, 1, 2, 8, 9, 10, 12, 13, 14, 20, 21, 22]
  assert summary.committed_offsets == {0: 24}  # past the last marker: nothing to re-read
  summary = run(kafka_broker, "tx-gaps", str(tmp_path / "again"))
  assert summary.rows_written == 0 and summary.committed_offsets == {0: 24}


def test_compacted_away_records_are_gaps_the_group_passes(kafka_broker, tmp_path):
  from confluent_kafka import Consumer, Producer, TopicPartition
  kafka_broker.create_topic("compacted", 1, {
      "cleanup.policy": "compact", "segment.ms": "100", "min.cleanable.dirty.ratio": "0.01",
      "delete.retention.ms": "100", "min.compaction.lag.ms": "0"})
  producer = Producer({"bootstrap.servers": kafka_broker.bootstrap_servers,
                       "logger": logging.getLogger("t")})
  total = 0
  for round_ in range(6):
    for k in range(10):
      producer.produce("compacted", value(round_ * 10 + k), key=b"same" if k % 2 else f"k{round_}{k}".encode())
      total += 1
    producer.flush()
    time.sleep(0.3)  # rolls the segment, so earlier ones can be cleaned
  producer.produce("compacted", value(999), key=b"last")
  producer.flush()
  total += 1
  consumer = Consumer({"bootstrap.servers": kafka_broker.bootstrap_servers, "group.id": "peek",
                       "enable.partition.eof": True, "logger": logging.getLogger("t")})
  deadline = time.monotonic() + 60
  while True:  # wait until the cleaner has removed some records
    consumer.assign([TopicPartition("compacted", 0, 0)])
    seen, done = 0, False
    while not done:
      for m in consumer.consume(100, timeout=1):
        if m.error():
          done = True
        else:
          seen += 1
    if seen < total or time.monotonic() > deadline:
      break
    time.sleep(1)
  consumer.close()
  assert seen < total, "compaction never removed anything"
  out = str(tmp_path / "out")
  summary = run(kafka_broker, "compacted", out, "--rows-per-file", "7")
  # The cleaner may remove more between the peek and the run: what the run read is stored,
  # and the group passes every gap to the end of the log.
  stored = len(stored_offsets(out))
  assert stored == summary.rows_written == summary.records_read <= seen < total
  assert summary.committed_offsets == {0: total}
  assert run(kafka_broker, "compacted", str(tmp_path / "again")).rows_written == 0


def test_a_broker_restart_mid_run_loses_nothing(kafka_broker, tmp_path):
  """The broker stops (cleanly) while a run reads and comes back on the same port: the run
  either rides it out or fails with one clear line; re-run, every record is there once."""
  from confluent_kafka import Producer
  kafka_broker.create_topic("restart", 4)
  producer = Producer({"bootstrap.servers": kafka_broker.bootstrap_servers, "linger.ms": 20,
                       "logger": logging.getLogger("t")})
  n = 60_000
  for i in range(n):
    producer.produce("restart", value(i), partition=i % 4)
    if i % 10_000 == 0:
      producer.flush()
  producer.flush()
  out = str(tmp_path / "out")
  argv = [sys.executable, "-m", "tierflow.cli", "-q", "run", "passthrough",
          "--bootstrap-servers", kafka_broker.bootstrap_servers, "--topic", "restart",
          "--output", out, "--rows-per-file", "500"]
  proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline and not any(
      f.endswith(".parquet") for _, _, fs in os.walk(out) for f in fs):
    time.sleep(0.02)
  kafka_broker.stop()
  time.sleep(2)
  kafka_broker.start()
  stdout, stderr = proc.communicate(timeout=600)
  if proc.returncode != 0:
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert proc.returncode == 1 and lines[-1].startswith("tierflow: the run failed"), stderr
    again = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
  counts = collections.Counter(stored_offsets(out))
  assert len(counts) == n and set(counts.values()) == {1}


def _delete_before(kafka, topic, partition, offset):
  """DeleteRecords: what retention does, at a chosen offset."""
  from confluent_kafka import TopicPartition
  from confluent_kafka.admin import AdminClient
  admin = AdminClient({"bootstrap.servers": kafka.bootstrap_servers,
                       "logger": logging.getLogger("t")})
  for future in admin.delete_records([TopicPartition(topic, partition, offset)]).values():
    future.result(timeout=30)


def _produce(kafka, topic, n):
  from confluent_kafka import Producer
  producer = Producer({"bootstrap.servers": kafka.bootstrap_servers,
                       "logger": logging.getLogger("t")})
  for i in range(n):
    producer.produce(topic, value(i), partition=0)
  producer.flush()


@pytest.mark.parametrize("start", ["group", "explicit"])
def test_offsets_deleted_before_they_were_read_fail_the_run_unless_allowed(
    start, kafka_broker, tmp_path):
  """Retention deleted offsets 0-39 while the group was at 10 (or the run asks for 0): the
  run fails naming them; with --allow-deleted-offsets it reads 40-99 and reports 30 (or
  40) offsets skipped. Never a silent jump."""
  from confluent_kafka import Consumer, TopicPartition
  topic = f"deleted-{start}"
  kafka_broker.create_topic(topic, 1)
  _produce(kafka_broker, topic, 100)
  group = f"g-{topic}"
  if start == "group":
    c = Consumer({"bootstrap.servers": kafka_broker.bootstrap_servers, "group.id": group,
                  "logger": logging.getLogger("t")})
    c.commit(offsets=[TopicPartition(topic, 0, 10)], asynchronous=False)
    c.close()
    flags, lost = ["--group-id", group], 30
  else:
    flags, lost = ["--start-offset", "0", "--end-offset", "100"], 40
  _delete_before(kafka_broker, topic, 0, 40)
  out = str(tmp_path / "out")
  with pytest.raises(Exception, match=rf"offsets \[{40 - lost}, 40\) were deleted by the broker"):
    run(kafka_broker, topic, out, *flags)
  assert not os.path.exists(f"{out}/results")
  summary = run(kafka_broker, topic, out, *flags, "--allow-deleted-offsets")
  assert summary.exit_code == 0 and summary.offsets_deleted == lost
  assert any("deleted by the broker" in p for p in summary.problems)
  assert stored_offsets(out) == [(0, o) for o in range(40, 100)]
  if start == "group":
    assert summary.committed_offsets == {0: 100}


def test_offsets_deleted_between_resolving_and_reading_are_not_passed_as_gaps(
    kafka_broker, tmp_path):
  """The race the first run on a session cluster hit: the range is resolved, then
  retention deletes its head before the reader gets there."""
  import apache_beam as beam
  from apache_beam.testing.test_pipeline import TestPipeline
  from tierflow.connectors.kafka_offsets import resolve_ranges
  from tierflow.connectors.kafka_source import KafkaReadConfig, _ReadPartitionFn
  topic = "deleted-race"
  kafka_broker.create_topic(topic, 1)
  _produce(kafka_broker, topic, 100)
  config = KafkaReadConfig(kafka_broker.bootstrap_servers, topic)
  ranges = resolve_ranges(config)
  assert [(r.start, r.stop) for r in ranges] == [(0, 100)]
  _delete_before(kafka_broker, topic, 0, 60)

  def read(cfg):
    with TestPipeline() as p:
      _ = (p | beam.Create(ranges) | beam.ParDo(_ReadPartitionFn(cfg))
           | beam.Map(lambda b, seen=os.path.join(tmp_path, "seen"): open(seen, "a").write(
               f"{b.start} {b.end} {len(b.offsets)}\n")))

  with pytest.raises(Exception, match=r"offsets \[0, 60\) were deleted"):
    read(config)
  import dataclasses
  if os.path.exists(tmp_path / "seen"):
    os.remove(tmp_path / "seen")
  read(dataclasses.replace(config, allow_deleted_offsets=True))
  batches = [tuple(map(int, l.split())) for l in open(tmp_path / "seen")]
  assert sorted(batches)[0][0] == 0 and max(b[1] for b in batches) == 100
  assert sum(b[2] for b in batches) == 40  # 60..99 read; 0..59 skipped, not passed as gaps
