"""The pipelines on real engines, against Apache Kafka.

* Apache Flink, through Beam's Flink job server (Beam 2.62.0, Flink 1.19, embedded
  ``[local]`` cluster, parallelism 2, LOOPBACK workers): passthrough, tickets and
  documents, bounded. Every record exactly once in the results or dead letters, the
  group's offsets at the end of the range (committed by a DoFn after the writes: Flink
  batch has no bundle finalization), the budget and ledger right.
* A Flink 1.19 session cluster (JobManager and TaskManager JVMs from PyPI's
  apache-flink-libraries), submitted to by ``deploy/flink/submit.sh`` as in production:
  the uber jar through Flink's REST API, Python workers from an external worker pool.
  A time-range backfill, and a streaming job with checkpoints that commits behind its files.
* Beam's Prism runner, streaming: files appear while the stream runs, out-of-order and
  old records land in their day, commits never pass durable output, and an idle
  partition does not hold back the watermark of a user's windowed pipeline.
"""

import collections
import json
import os
import subprocess
import sys
import threading
import time

import duckdb
import pytest
from local_config import pipeline_config

from tierflow import launcher
from tierflow_local.broker import free_port
from tierflow_local.engines import FlinkSessionCluster, flink_job_server_jar, prism_binary
from tierflow_local.loader import publish, sample_tickets
from tierflow_local.provider_server import LocalProviderServer
from tierflow_local.standin_model import KeywordStandIn

pytestmark = pytest.mark.slow
T0_MS = 1_704_067_200_000
DAY_MS = 86_400_000


def flink_flags():
  return ["--runner", "FlinkRunner", f"--flink_job_server_jar={flink_job_server_jar()}",
          "--flink_master=[local]", "--flink_version=1.19", "--environment_type=LOOPBACK",
          "--parallelism=2"]


def prism_flags():
  return ["--runner", "PrismRunner", f"--prism_location={prism_binary()}"]


_SEQ = iter(range(10_000))


def new_topic(kafka, partitions, prefix="engines"):
  name = f"{prefix}-{next(_SEQ)}-{os.getpid()}"
  kafka.create_topic(name, partitions)
  return name


def produce(kafka, topic, records):
  """records: (partition, value bytes, timestamp ms); returns {partition: end offset}."""
  import logging
  from confluent_kafka import Producer
  p = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 5,
                "logger": logging.getLogger("test.producer")})
  ends = collections.Counter()
  for partition, value, ts in records:
    p.produce(topic, value, partition=partition, timestamp=ts)
    ends[partition] += 1
  p.flush()
  return dict(ends)


def stored(out, sub):
  glob = f"{out}/{sub}/**/*.parquet"
  if not any(f.endswith(".parquet") for _, _, fs in os.walk(f"{out}/{sub}") for f in fs):
    return []
  return duckdb.sql(f"SELECT * FROM read_parquet('{glob}', hive_partitioning=true, "
                    "hive_types={'dt': VARCHAR})").fetchdf().to_dict("records")


def ticket(i, ts=T0_MS):
  return json.dumps({"ticket_id": f"T{i:06d}", "created_at": ts, "subject": f"s{i}",
                     "body": f"body {i}"}).encode()


@pytest.fixture
def endpoints():
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier")) as server:
    yield server




# --- Flink --------------------------------------------------------------------------------


def test_passthrough_on_flink_writes_every_record_once_and_commits(kafka_broker, tmp_path):
  name = new_topic(kafka_broker, 4)
  n = 20_000
  ends = produce(kafka_broker, name, [(i % 4, b"not json" if i % 97 == 0 else ticket(i),
                                       T0_MS + i) for i in range(n)])
  out = str(tmp_path / "out")
  summary = launcher.launch("passthrough", ["--bootstrap-servers", kafka_broker.bootstrap_servers,
                                            "--topic", name, "--output", out,
                                            "--rows-per-file", "2000", *flink_flags()])
  assert summary.state == "DONE" and summary.exit_code == 0
  results, dead = stored(out, "results"), stored(out, "dead_letter")
  keys = collections.Counter((r["kafka_partition"], r["kafka_offset"]) for r in results + dead)
  assert set(keys.values()) == {1}
  assert set(keys) == {(p, o) for p, e in ends.items() for o in range(e)}
  assert len(dead) == len([i for i in range(n) if i % 97 == 0])
  assert {d["error_type"] for d in dead} == {"invalid_json"}
  assert summary.committed_offsets == ends
  assert (summary.rows_written, summary.dead_letters) == (len(results), len(dead))


@pytest.mark.parametrize("pipeline", ["tickets", "documents"])
def test_model_pipelines_on_flink_answer_every_record_within_the_budget(
    pipeline, kafka_broker, endpoints, tmp_path):
  name = new_topic(kafka_broker, 3, prefix=pipeline)
  if pipeline == "tickets":
    records = sample_tickets()[:90]
  else:
    records = [{"doc_id": f"D{i}", "created_at": T0_MS + i, "title": f"Match report {i}",
                "text": "The team won the league match after a late goal." if i % 2 else
                "The central bank raised interest rates; shares fell on the market."}
               for i in range(60)]
  publish(kafka_broker.bootstrap_servers, name, records,
          schema="ticket" if pipeline == "tickets" else "document")
  out = str(tmp_path / "out")
  budget = 0.02
  summary = launcher.launch(pipeline, [
      "--bootstrap-servers", kafka_broker.bootstrap_servers, "--topic", name, "--output", out,
      "--config", pipeline_config(tmp_path, endpoints, pipeline, budget), "--rows-per-file", "16",
      *flink_flags()])
  assert summary.state == "DONE" and summary.exit_code == 0, summary.problems
  rows = stored(out, "results")
  assert len(rows) == len(records) == len({r["record_id"] for r in rows})
  # The cap binds: records it left on their small answer are unverified, and say why.
  assert {r["status"] for r in rows} <= {"ok", "unverified"}
  assert all(r["budget_skipped"] and "budget cap reached" in r["error"]
             for r in rows if r["status"] == "unverified")
  assert stored(out, "dead_letter") == []
  stages = 3 if pipeline == "tickets" else 2
  assert all(len(r["stages"]) == stages for r in rows)
  for r in rows:  # the ledger adds up
    assert r["cost_usd"] == pytest.approx(sum(s["cost_usd"] for s in r["stages"]))
    assert r["cost_usd"] == pytest.approx(r["small_cost_usd"] + r["frontier_cost_usd"])
  assert sum(r["frontier_cost_usd"] for r in rows) <= budget
  assert sum(summary.committed_offsets.values()) == len(records)


# --- A Flink session cluster, submitted to by deploy/flink/submit.sh -----------------------

SUBMIT_SH = os.path.join(os.path.dirname(__file__), os.pardir, "deploy", "flink", "submit.sh")


@pytest.fixture(scope="module")
def flink_cluster():
  with FlinkSessionCluster() as cluster:
    yield cluster


@pytest.fixture
def worker_pool():
  """Beam's Python worker pool, as the TaskManager's sidecar runs it (boot --worker_pool)."""
  port = free_port()
  # The pool starts its workers as `python`: this interpreter first on PATH.
  env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
  proc = subprocess.Popen([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                           f"--service_port={port}"], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 60
  import socket
  while time.monotonic() < deadline:
    with socket.socket() as s:
      if s.connect_ex(("127.0.0.1", port)) == 0:
        break
    time.sleep(0.2)
  yield f"localhost:{port}"
  proc.terminate()
  proc.wait(timeout=30)


def submit(flink, pool, kafka, topic, out, *mode, **env):
  """deploy/flink/submit.sh as the Kubernetes submit Job runs it, against this cluster."""
  environment = dict(os.environ, PYTHON=sys.executable, FLINK_MASTER=flink.rest_address,
                     FLINK_JOB_SERVER_JAR=str(flink_job_server_jar()), WORKER_POOL=pool,
                     BOOTSTRAP_SERVERS=kafka.bootstrap_servers, TOPIC=topic, OUTPUT=out,
                     SDK_WORKER_PARALLELISM="1", **env)
  return subprocess.run(["bash", SUBMIT_SH, *mode], env=environment, capture_output=True,
                        text=True, timeout=600)


@pytest.mark.parametrize("mode", ["uber-jar", "job-server"])
def test_a_backfill_submitted_to_a_flink_session_cluster_reads_exactly_its_day(
    mode, kafka_broker, flink_cluster, worker_pool, tmp_path):
  name = new_topic(kafka_broker, 2, prefix="session")
  records = [(i % 2, b"{oops" if i % 50 == 7 else ticket(i, T0_MS + (i // 300) * DAY_MS),
              T0_MS + (i // 300) * DAY_MS + i) for i in range(900)]  # three days, 300 each
  produce(kafka_broker, name, records)
  out = str(tmp_path / "out")
  jobs_before = {j["id"] for j in flink_cluster.jobs()}
  day2 = T0_MS + DAY_MS
  done = submit(flink_cluster, worker_pool, kafka_broker, name, out, "backfill", str(day2),
                str(day2 + DAY_MS), SUBMIT_MODE=mode, ARTIFACTS_DIR=str(tmp_path / "staged"))
  assert done.returncode == 0, done.stderr[-3000:]
  print(done.stdout, done.stderr[-3000:])
  results, dead = stored(out, "results"), stored(out, "dead_letter")
  expected = {(p, o) for p in (0, 1) for o in range(450)
              if day2 <= T0_MS + ((2 * o + p) // 300) * DAY_MS + 2 * o + p < day2 + DAY_MS}
  keys = collections.Counter((r["kafka_partition"], r["kafka_offset"]) for r in results + dead)
  assert set(keys.values()) == {1} and set(keys) == expected
  assert len(dead) == sum(1 for i in range(300, 600) if i % 50 == 7)
  new_jobs = [j for j in flink_cluster.jobs() if j["id"] not in jobs_before]
  assert [j["status"] for j in new_jobs] == ["FINISHED"]  # it ran on the cluster


def test_a_streaming_job_on_a_flink_session_cluster_commits_behind_its_files(
    kafka_broker, flink_cluster, worker_pool, tmp_path):
  from confluent_kafka import Consumer, TopicPartition
  import logging
  from tierflow.connectors.kafka_client import committed as group_offsets
  name = new_topic(kafka_broker, 2, prefix="session-stream")
  out = str(tmp_path / "out")
  group = f"session-{name}"
  jobs_before = {j["id"] for j in flink_cluster.jobs()}
  done = submit(flink_cluster, worker_pool, kafka_broker, name, out, "streaming",
                GROUP_ID=group, CHECKPOINT_MS="2000",
                EXTRA_ARGS="--flush-seconds 1 --rows-per-file 100")
  assert done.returncode == 0, done.stderr[-3000:]  # submitted; the job runs on the cluster
  (job,) = [j for j in flink_cluster.jobs() if j["id"] not in jobs_before]
  watcher = Consumer({"bootstrap.servers": kafka_broker.bootstrap_servers, "group.id": group,
                      "logger": logging.getLogger("test.watch")})
  sent = collections.Counter()
  try:
    for round_ in range(3):
      now = int(time.time() * 1000)
      batch = [(i % 2, ticket(round_ * 1000 + i, now), now) for i in range(150)]
      produce(kafka_broker, name, batch)
      sent.update(p for p, _, _ in batch)
      deadline = time.monotonic() + 120
      while time.monotonic() < deadline:
        committed = {tp.partition: tp.offset for tp in group_offsets(
            watcher, [TopicPartition(name, p) for p in range(2)])}
        rows = stored(out, "results")  # read after the commits: a file never trails them
        in_files = collections.Counter(r["kafka_partition"] for r in rows)
        for p, offset in committed.items():  # never ahead of the files
          assert offset < 0 or offset <= in_files[p], (committed, in_files)
        if len(rows) == sum(sent.values()) and committed == dict(sent):
          break
        time.sleep(1)
      else:
        raise AssertionError(f"round {round_}: {len(rows)} rows of {sum(sent.values())}, "
                             f"committed {committed}; job {flink_cluster.jobs()}")
      assert len({r["record_id"] for r in rows}) == len(rows)
    assert {j["id"]: j["status"] for j in flink_cluster.jobs()}[job["id"]] == "RUNNING"
  finally:
    watcher.close()
    flink_cluster.cancel(job["id"])


# --- Prism, streaming ------------------------------------------------------------------------


def _visible(out):
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs
                if f.endswith(".parquet") and not f.startswith("."))


def test_streaming_on_prism_writes_files_while_running_and_commits_behind_them(
    kafka_broker, tmp_path):
  """Three partitions, one idle; records arrive for 10 s, some out of order and some days
  old. Files appear during the run; at every moment the group's committed offset of a
  partition is at most one past the highest offset already in its files."""
  from confluent_kafka import Consumer, TopicPartition
  import logging
  from tierflow.connectors.kafka_client import committed as group_offsets
  name = new_topic(kafka_broker, 3, prefix="stream")
  out = str(tmp_path / "out")
  group = f"tierflow.passthrough.{name}"
  observations = []
  sent = collections.Counter()

  def produce_and_watch():
    watcher = Consumer({"bootstrap.servers": kafka_broker.bootstrap_servers, "group.id": group,
                        "logger": logging.getLogger("test.watch")})
    try:
      for second in range(10):
        now = int(time.time() * 1000)
        batch = []
        for i in range(40):
          ts = now - (i % 7) * 1000  # out of order within seconds
          if i == 0:
            ts = now - 3 * DAY_MS  # days late
          batch.append((i % 2, ticket(second * 100 + i, ts), now))
        for p, _, _ in batch:
          sent[p] += 1
        produce(kafka_broker, name, batch)
        files = _visible(out)
        durable = collections.defaultdict(lambda: -1)
        for f in files:
          if "/results/" in f:
            _, part, _, last = os.path.basename(f)[:-len(".parquet")].rsplit("-", 3)
            durable[int(part)] = max(durable[int(part)], int(last))
        committed = {tp.partition: tp.offset for tp in group_offsets(
            watcher, [TopicPartition(name, p) for p in range(3)])}
        observations.append((second, len(files), dict(durable), committed))
        time.sleep(1)
    finally:
      watcher.close()

  side = threading.Thread(target=produce_and_watch)
  side.start()
  summary = launcher.launch("passthrough", [
      "--bootstrap-servers", kafka_broker.bootstrap_servers, "--topic", name, "--output", out,
      "--streaming", "--max-read-seconds", "14", "--flush-seconds", "2", *prism_flags()])
  side.join()
  assert summary.state == "DONE" and summary.exit_code == 0
  assert [n for _, n, _, _ in observations][-1] > 0, observations  # files during the run
  assert any(n > 0 for s, n, _, _ in observations if s <= 7), observations
  for _, _, durable, committed in observations:
    for p, offset in committed.items():
      if offset >= 0:  # a commit never passes what is durable (the files hold offsets <= last)
        assert offset <= durable.get(p, -1) + 1, (p, offset, durable)
  rows = stored(out, "results")
  assert len(rows) == sum(sent.values()) == len({r["record_id"] for r in rows})
  # Old and out-of-order records land in the day of their event time; none is dropped.
  days = collections.Counter(r["dt"] for r in rows)
  assert len(days) >= 2 and sum(days.values()) == len(rows)
  assert summary.committed_offsets[0] == sent[0] and summary.committed_offsets[1] == sent[1]
  assert summary.committed_offsets[2] is None  # the idle partition had nothing to commit


def test_an_idle_partition_does_not_hold_back_windows_on_prism(kafka_broker, tmp_path):
  """A user's windowed pipeline over ReadKafkaBatches: partition 1 stays idle, yet the
  2-second event-time windows of partition 0 fire while the stream runs."""
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions
  from apache_beam.transforms.window import FixedWindows, TimestampedValue
  from tierflow import transforms as tf
  name = new_topic(kafka_broker, 2, prefix="idle")
  marks = str(tmp_path / "fired")
  os.makedirs(marks)

  def feed():
    for second in range(8):
      now = int(time.time() * 1000)
      produce(kafka_broker, name, [(0, ticket(second * 10 + i, now), now) for i in range(10)])
      time.sleep(1)

  def mark(kv, window=beam.DoFn.WindowParam):
    with open(os.path.join(marks, f"{window.start.micros}"), "w") as f:
      f.write(f"{time.time()} {len(kv[1])}")
    return kv

  started = time.time()
  side = threading.Thread(target=feed)
  side.start()
  config = tf.KafkaReadConfig(kafka_broker.bootstrap_servers, name, bounded=False,
                              max_read_seconds=12, flush_seconds=1,
                              max_out_of_orderness_s=1, commit_offsets=False)
  options = PipelineOptions(["--streaming", *prism_flags()])
  with beam.Pipeline(options=options) as p:
    _ = (p | tf.ReadKafkaBatches(config)
         | beam.FlatMap(lambda b: [TimestampedValue(o, t / 1000.0)
                                   for o, t in zip(b.offsets, b.timestamps)])
         | beam.WindowInto(FixedWindows(2))
         | beam.Map(lambda o: ("k", o)) | beam.GroupByKey() | beam.Map(mark))
  side.join()
  ended = time.time()
  fired = [float(open(os.path.join(marks, f)).read().split()[0]) for f in os.listdir(marks)]
  assert fired, "no window fired"
  # Windows fired while the stream ran, not all at the end, although partition 1 was idle.
  assert min(fired) < ended - 4, (started, sorted(fired), ended)
