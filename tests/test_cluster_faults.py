"""Failures where users run tierflow: a Flink session cluster losing machines mid-stream.

The cluster is Flink 1.19 with two TaskManagers (two slots each), jobs run at parallelism
2 with Python workers from an external worker pool (as ``deploy/flink`` runs them on
Kubernetes), submitted by ``deploy/flink/submit.sh``, against Apache Kafka 4.4. Each test
breaks something mid-run (a TaskManager SIGKILLed, the worker pool SIGKILLed, the job
cancelled and resubmitted, the broker restarted) and then checks, by ``(partition,
offset)``: no record lost, none stored twice, the group's commits at the end of what was
sent and still moving after more records, and the frontier spend within the cap.
"""

import collections
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import duckdb
import pytest
import yaml

from tierflow_local.broker import free_port
from tierflow_local.engines import FlinkSessionCluster, flink_job_server_jar
from tierflow_local.loader import sample_tickets
from tierflow_local.provider_server import LocalProviderServer
from tierflow_local.standin_model import KeywordStandIn

pytestmark = [pytest.mark.slow, pytest.mark.engines]
logging.getLogger("test.producer").setLevel(logging.CRITICAL)  # a restarted broker is noisy

SUBMIT_SH = os.path.join(os.path.dirname(__file__), os.pardir, "deploy", "flink", "submit.sh")
PARTITIONS = 4
_SEQ = iter(range(10_000))


# --- the cluster and its workers ------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
  with FlinkSessionCluster(taskmanagers=2, slots=2) as c:
    yield c


class WorkerPool:
  """Beam's Python worker pool (``worker_pool_main``), as a TaskManager's sidecar runs it;
  ``kill()`` SIGKILLs it with every SDK worker it started, ``start()`` brings it back on
  the same port."""

  def __init__(self):
    self.port = free_port()
    self._proc = None

  @property
  def address(self) -> str:
    return f"localhost:{self.port}"

  def start(self) -> "WorkerPool":
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    self._proc = subprocess.Popen(
        [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
         f"--service_port={self.port}"], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    import socket
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
      with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", self.port)) == 0:
          return self
      time.sleep(0.2)
    raise RuntimeError("the worker pool did not listen within 60 s")

  def kill(self) -> None:
    """The pool and its SDK workers (one process group) die at once."""
    if self._proc is not None and self._proc.poll() is None:
      os.killpg(self._proc.pid, signal.SIGKILL)
      self._proc.wait()

  def stop(self) -> None:
    if self._proc is not None and self._proc.poll() is None:
      os.killpg(self._proc.pid, signal.SIGTERM)
      try:
        self._proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.kill()


@pytest.fixture(scope="module")
def pool():
  p = WorkerPool().start()
  yield p
  p.stop()


@pytest.fixture(scope="module")
def endpoints():
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier"),
                           max_logged_requests=1_000_000) as server:
    yield server


def billed_at_the_endpoint(server, since: float, model="frontier",
                           price_as="claude-sonnet-4-6") -> float:
  """What the frontier endpoint billed since ``since`` (its answers' usage at list price):
  the money really spent, including work a failure threw away before it was written."""
  from tierflow.prices import Usage, load_price_book
  price = load_price_book().price(price_as)
  return sum(price.cost(Usage(input_tokens=q.usage.get("input_tokens", 0),
                              output_tokens=q.usage.get("output_tokens", 0),
                              cache_read_tokens=q.usage.get("cache_read_input_tokens", 0),
                              cache_write_tokens=q.usage.get("cache_creation_input_tokens", 0)))
             for q in server.requests
             if q.model == model and q.status == 200 and q.usage and q.received_at >= since)


# --- Kafka -------------------------------------------------------------------------------------


def new_topic(kafka, prefix):
  name = f"{prefix}-{next(_SEQ)}-{os.getpid()}"
  kafka.create_topic(name, PARTITIONS)
  return name


class Feed:
  """Produces records to a topic: ``send(n)`` now, or ``start(n, seconds)`` spread over
  time in a thread. ``sent`` counts records per partition (their end offsets)."""

  def __init__(self, kafka, topic, make_value):
    from confluent_kafka import Producer
    self.topic = topic
    self._make = make_value
    self._producer = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 5,
                               "logger": logging.getLogger("test.producer")})
    self.sent = collections.Counter()
    self._n = 0
    self._thread = None
    self._lock = threading.Lock()

  def send(self, n):
    with self._lock:
      for _ in range(n):
        partition = self._n % PARTITIONS
        now = int(time.time() * 1000)
        self._producer.produce(self.topic, self._make(self._n, now), partition=partition,
                               timestamp=now)
        self.sent[partition] += 1
        self._n += 1
      self._producer.flush(30)

  def start(self, n, seconds):
    def run():
      rounds = max(1, int(seconds * 4))
      for r in range(rounds):
        self.send(n // rounds + (1 if r < n % rounds else 0))
        time.sleep(seconds / rounds)
    self._thread = threading.Thread(target=run, daemon=True)
    self._thread.start()

  def join(self):
    if self._thread is not None:
      self._thread.join()


def ticket_value(i, now):
  t = sample_tickets()[i % 240]
  return json.dumps({**t, "ticket_id": f"{t['ticket_id']}-{i}", "created_at": now}).encode()


def committed(kafka, group, topic):
  from confluent_kafka import Consumer, TopicPartition
  c = Consumer({"bootstrap.servers": kafka.bootstrap_servers, "group.id": group,
                "logger": logging.getLogger("test.watch")})
  try:
    found = c.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)
    return {tp.partition: tp.offset for tp in found if tp.offset >= 0}
  finally:
    c.close()


# --- the output --------------------------------------------------------------------------------


def stored(out):
  """Counter of (partition, offset) over results and dead letters, and the result rows'
  frontier spend."""
  seen, spend = collections.Counter(), 0.0
  for sub in ("results", "dead_letter"):
    files = [f for d, _, fs in os.walk(f"{out}/{sub}") for f in fs
             if f.endswith(".parquet") and not f.startswith(".")]
    if not files:
      continue
    rows = duckdb.sql(f"SELECT * FROM read_parquet('{out}/{sub}/**/*.parquet', "
                      "hive_partitioning=true, union_by_name=true)").fetchdf()
    seen.update(zip(rows["kafka_partition"], rows["kafka_offset"]))
    if sub == "results" and "frontier_cost_usd" in rows:
      spend += float(rows["frontier_cost_usd"].sum())
  return seen, spend


def files_in(out):
  return sum(1 for d, _, fs in os.walk(f"{out}/results") for f in fs
             if f.endswith(".parquet") and not f.startswith("."))


# --- submitting ------------------------------------------------------------------------------


def submit_streaming(cluster, pool, kafka, topic, out, group, pipeline="passthrough",
                     extra=""):
  """Submits a streaming job with deploy/flink/submit.sh; returns its Flink job id."""
  before = {j["id"] for j in cluster.jobs()}
  env = dict(os.environ, PYTHON=sys.executable, FLINK_MASTER=cluster.rest_address,
             FLINK_JOB_SERVER_JAR=str(flink_job_server_jar()), WORKER_POOL=pool.address,
             BOOTSTRAP_SERVERS=kafka.bootstrap_servers, TOPIC=topic, OUTPUT=out,
             PIPELINE=pipeline, PARALLELISM="2", SDK_WORKER_PARALLELISM="1",
             GROUP_ID=group, CHECKPOINT_MS="2000",
             EXTRA_ARGS=f"--flush-seconds 1 --rows-per-file 500 {extra}".strip())
  done = subprocess.run(["bash", SUBMIT_SH, "streaming"], env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline:
    new = [j for j in cluster.jobs() if j["id"] not in before]
    if new:
      return new[0]["id"]
    time.sleep(0.5)
  raise AssertionError("the job did not appear on the cluster")


def job_status(cluster, job):
  return {j["id"]: j["status"] for j in cluster.jobs()}.get(job)


def failures(cluster, job) -> int:
  """How many failures the job's tasks went through (Flink's exception history)."""
  found = cluster.rest(f"/jobs/{job}/exceptions") or {}
  return len((found.get("exceptionHistory") or {}).get("entries") or [])


def wait_until(what, check, timeout=180, every=1.0):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    value = check()
    if value:
      return value
    time.sleep(every)
  raise AssertionError(f"timed out waiting for {what}")


def check_exactly_once(kafka, out, group, feed, cluster, job, timeout=240):
  """Waits until every record sent is stored and the group committed the end of every
  partition; then asserts no record is stored twice."""

  def caught_up():
    seen, _ = stored(out)
    done = len(seen) == sum(feed.sent.values())
    return done and committed(kafka, group, feed.topic) == dict(feed.sent)

  try:
    wait_until("every record stored and committed", caught_up, timeout=timeout, every=2)
  except AssertionError:
    seen, _ = stored(out)
    raise AssertionError(
        f"stored {len(seen)} of {sum(feed.sent.values())} records (sent {dict(feed.sent)}), "
        f"committed {committed(kafka, group, feed.topic)}, job {job_status(cluster, job)}; "
        f"logs in {cluster.log_dir}") from None
  seen, spend = stored(out)
  duplicates = {k: n for k, n in seen.items() if n > 1}
  assert not duplicates, f"{sum(n - 1 for n in duplicates.values())} duplicate rows, e.g. " \
                         f"{sorted(duplicates)[:5]}"
  want = {(p, o) for p, n in feed.sent.items() for o in range(n)}
  assert set(seen) == want
  return spend


# --- streaming passthrough, a TaskManager lost -------------------------------------------------

KILL_POINTS = {
    "at the first file": lambda out, commits: files_in(out) >= 1,
    "after the first commit": lambda out, commits: sum(commits.values()) > 0,
    "with many files written": lambda out, commits: files_in(out) >= 12,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_streaming_passthrough_survives_a_lost_taskmanager(cluster, pool, kafka_broker,
                                                           tmp_path, point):
  topic = new_topic(kafka_broker, "tm-kill")
  out, group = str(tmp_path / "out"), f"g-{topic}"
  feed = Feed(kafka_broker, topic, ticket_value)
  job = submit_streaming(cluster, pool, kafka_broker, topic, out, group)
  try:
    feed.start(4000, seconds=12)
    wait_until(point, lambda: KILL_POINTS[point](out, committed(kafka_broker, group, topic)),
               every=0.2)
    cluster.kill_taskmanager(0)
    time.sleep(3)
    cluster.start_taskmanager(0)
    feed.join()
    check_exactly_once(kafka_broker, out, group, feed, cluster, job)
    feed.send(400)  # the commits keep moving after the restart
    check_exactly_once(kafka_broker, out, group, feed, cluster, job, timeout=120)
    assert job_status(cluster, job) == "RUNNING"
    assert failures(cluster, job) >= 1  # the failure really hit the job
  finally:
    cluster.cancel(job)


# --- streaming tickets: models, a budget, a TaskManager lost -----------------------------------


def tickets_config(tmp_path, endpoints, budget):
  from local_config import local_config
  return local_config(tmp_path / "tickets.yaml", endpoints, budget=budget,
                      small=dict(batch_size=4, concurrency=2),
                      # One frontier request in flight per worker: what a lost worker had
                      # reserved (and the cap cannot use) is one request's strict cost.
                      frontier=dict(batch_size=2, concurrency=1))


def spend_and_approvals(out):
  """(frontier spend, escalations approved, escalations skipped for the budget)."""
  [(spend, approved, skipped)] = duckdb.sql(
      f"SELECT coalesce(sum(s.frontier_cost_usd), 0), count(*) FILTER (WHERE "
      f"s.frontier_cost_usd > 0), count(*) FILTER (WHERE s.budget_skipped) FROM (SELECT "
      f"unnest(stages) AS s FROM read_parquet('{out}/results/**/*.parquet', "
      "hive_partitioning=true))").fetchall()
  return spend, approved, skipped


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_streaming_tickets_survive_a_lost_taskmanager_within_the_budget(
    cluster, pool, kafka_broker, endpoints, tmp_path, point):
  cap = 0.10  # escalating every stage of these tickets would cost about twice as much
  topic = new_topic(kafka_broker, "tm-kill-tickets")
  out, group = str(tmp_path / "out"), f"g-{topic}"
  started = time.time()
  feed = Feed(kafka_broker, topic, ticket_value)
  job = submit_streaming(cluster, pool, kafka_broker, topic, out, group, pipeline="tickets",
                         extra=f"--config {tickets_config(tmp_path, endpoints, cap)} "
                               "--rows-per-file 40")
  try:
    feed.start(900, seconds=12)
    wait_until(point, lambda: KILL_POINTS[point](out, committed(kafka_broker, group, topic)),
               every=0.2)
    cluster.kill_taskmanager(0)
    time.sleep(3)
    cluster.start_taskmanager(0)
    feed.join()
    check_exactly_once(kafka_broker, out, group, feed, cluster, job)
    feed.send(60)
    check_exactly_once(kafka_broker, out, group, feed, cluster, job, timeout=120)
    assert failures(cluster, job) >= 1
    spent, approved, skipped = spend_and_approvals(out)
    billed = billed_at_the_endpoint(endpoints, started)
    print(f"cap ${cap}: billed ${billed:.4f} at the endpoint, ${spent:.4f} in the output, "
          f"{approved} escalations approved, {skipped} skipped")
    assert billed <= cap and skipped > 0  # the cap bound, and held
    assert approved >= 0.8 * cap / (spent / approved)  # and was used
  finally:
    cluster.cancel(job)


# --- a bounded tickets backfill: a TaskManager or the worker pool lost --------------------------


def submit_backfill(cluster, pool, kafka, topic, out, group, config):
  """Starts deploy/flink/submit.sh backfill over every record so far, in a thread (it waits
  for the job); returns (thread, result holder)."""
  env = dict(os.environ, PYTHON=sys.executable, FLINK_MASTER=cluster.rest_address,
             FLINK_JOB_SERVER_JAR=str(flink_job_server_jar()), WORKER_POOL=pool.address,
             BOOTSTRAP_SERVERS=kafka.bootstrap_servers, TOPIC=topic, OUTPUT=out,
             PIPELINE="tickets", PARALLELISM="2", SDK_WORKER_PARALLELISM="1",
             EXTRA_ARGS=f"--config {config} --rows-per-file 40 --group-id {group} "
                        "--commit-offsets always")
  result = {}

  def run():
    result["done"] = subprocess.run(
        ["bash", SUBMIT_SH, "backfill", "0", str(int(time.time() * 1000) + 86_400_000)],
        env=env, capture_output=True, text=True, timeout=900)

  thread = threading.Thread(target=run)
  thread.start()
  return thread, result


@pytest.mark.parametrize("lost", ["a TaskManager", "the worker pool"])
def test_a_backfill_survives_a_lost_taskmanager_or_worker_pool_within_the_budget(
    cluster, pool, kafka_broker, endpoints, tmp_path, lost):
  cap = 0.10
  topic = new_topic(kafka_broker, "backfill-kill")
  out, group = str(tmp_path / "out"), f"g-{topic}"
  feed = Feed(kafka_broker, topic, ticket_value)
  feed.send(900)
  started = time.time()
  before = {j["id"] for j in cluster.jobs()}
  thread, result = submit_backfill(cluster, pool, kafka_broker, topic, out, group,
                                   tickets_config(tmp_path, endpoints, cap))
  wait_until("the first file", lambda: files_in(out) >= 1, every=0.2, timeout=300)
  if lost == "a TaskManager":
    cluster.kill_taskmanager(1)
    time.sleep(3)
    cluster.start_taskmanager(1)
  else:
    pool.kill()
    time.sleep(3)
    pool.start()
  thread.join(900)
  done = result["done"]
  assert done.returncode == 0, done.stderr[-3000:]
  [job] = [j["id"] for j in cluster.jobs() if j["id"] not in before]
  assert job_status(cluster, job) == "FINISHED" and failures(cluster, job) >= 1
  seen, _ = stored(out)
  assert not [k for k, n in seen.items() if n > 1], "rows stored twice"
  assert set(seen) == {(p, o) for p, n in feed.sent.items() for o in range(n)}
  assert committed(kafka_broker, group, topic) == dict(feed.sent)
  spent, approved, skipped = spend_and_approvals(out)
  billed = billed_at_the_endpoint(endpoints, started)
  print(f"{lost} lost: billed ${billed:.4f}, output ${spent:.4f}, {approved} approved, "
        f"{skipped} skipped")
  assert billed <= cap and skipped > 0
  assert approved >= 0.8 * cap / (spent / approved)


# --- a job cancelled and resubmitted; the broker restarted ---------------------------------------


def test_a_streaming_job_cancelled_and_resubmitted_writes_every_record_once(
    cluster, pool, kafka_broker, tmp_path):
  topic = new_topic(kafka_broker, "resubmit")
  out, group = str(tmp_path / "out"), f"g-{topic}"
  feed = Feed(kafka_broker, topic, ticket_value)
  job = submit_streaming(cluster, pool, kafka_broker, topic, out, group)
  feed.start(3000, seconds=10)
  wait_until("several files", lambda: files_in(out) >= 6, every=0.2)
  cluster.cancel(job)  # no savepoint: the new job knows only the group and the output
  wait_until("the job cancelled", lambda: job_status(cluster, job) == "CANCELED")
  feed.join()
  feed.send(300)
  job = submit_streaming(cluster, pool, kafka_broker, topic, out, group)
  try:
    check_exactly_once(kafka_broker, out, group, feed, cluster, job)
    feed.send(300)
    check_exactly_once(kafka_broker, out, group, feed, cluster, job, timeout=120)
  finally:
    cluster.cancel(job)


def test_a_streaming_job_rides_out_a_broker_restart(cluster, pool, kafka_broker, tmp_path):
  topic = new_topic(kafka_broker, "broker-restart")
  out, group = str(tmp_path / "out"), f"g-{topic}"
  feed = Feed(kafka_broker, topic, ticket_value)
  job = submit_streaming(cluster, pool, kafka_broker, topic, out, group)
  try:
    feed.send(1000)
    wait_until("the first commit", lambda: committed(kafka_broker, group, topic), every=0.2)
    kafka_broker.stop()
    time.sleep(5)
    kafka_broker.start()
    feed.send(1000)
    check_exactly_once(kafka_broker, out, group, feed, cluster, job)
    feed.send(200)
    check_exactly_once(kafka_broker, out, group, feed, cluster, job, timeout=120)
  finally:
    cluster.cancel(job)


# --- a job that cannot recover says why in one line --------------------------------------------


def test_a_job_whose_taskmanagers_are_gone_fails_in_one_line(kafka_broker, pool, tmp_path,
                                                             capsys):
  """Both TaskManagers SIGKILLed and never back, two restarts allowed: `tierflow run`
  exits 1 with one line naming the lost TaskManager, the restarts and the file holding
  the whole error, not the last line of a Java stack trace."""
  from tierflow import cli
  topic = new_topic(kafka_broker, "unrecoverable")
  Feed(kafka_broker, topic, ticket_value).send(40_000)
  out = str(tmp_path / "out")
  with FlinkSessionCluster(taskmanagers=2, restart_attempts=2) as doomed:
    def kill_when_writing():
      wait_until("the first file", lambda: files_in(out) >= 1, every=0.2, timeout=300)
      doomed.kill_taskmanager(0)
      doomed.kill_taskmanager(1)
    killer = threading.Thread(target=kill_when_writing, daemon=True)
    killer.start()
    code = cli.main(["run", "passthrough", "--bootstrap-servers", kafka_broker.bootstrap_servers,
                     "--topic", topic, "--output", out, "--rows-per-file", "200",
                     "--runner", "FlinkRunner", "--flink_master", doomed.rest_address,
                     "--flink_version", "1.19", "--environment_type", "EXTERNAL",
                     "--environment_config", pool.address, "--parallelism", "2",
                     f"--flink_job_server_jar={flink_job_server_jar()}",
                     "--flink_submit_uber_jar"])
    killer.join()
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.startswith("tierflow:")]
  assert code == 1 and len(lines) == 1, err[-3000:]
  [line] = lines
  assert "a TaskManager was lost" in line and "failed after 2 restarts" in line, line
  assert "\tat " not in err and "java." not in line
  log = line.rsplit("(full error: ", 1)[1].rstrip(")")
  assert "NoResourceAvailableException" in open(log).read()
  os.unlink(log)
