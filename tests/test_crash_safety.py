"""kill -9 a committing run at many points, re-run it, and check that nothing was lost.

Each kill point is an event seen from outside the process (a hidden temporary
file, the first visible file, the first commit, half the range committed, ...);
the run is a `tierflow run` subprocess killed with SIGKILL the moment the event is
seen. After each kill: no visible file is partial. After the re-run (same output,
same group): every offset of the range is in the results or the dead letters,
no record is stored twice, and the group sits at the end of the range.
"""

import collections
import copy
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml

from tierflow_local.loader import sample_tickets
from tierflow_local.provider_server import LocalProviderServer
from tierflow_local.standin_model import KeywordStandIn

pytestmark = pytest.mark.slow  # whole runs killed and re-run, tens of seconds each


@pytest.fixture(scope="module")
def broker(tansu_broker):
  """The embedded broker: what is killed here is tierflow, not Kafka (see test_kafka_gaps
  for a broker restart on Apache Kafka)."""
  return tansu_broker

TIERFLOW = [sys.executable, "-m", "tierflow.cli"]
T0_MS = 1_704_067_200_000
PARTITIONS = 4


def _files(out: str) -> tuple[list[str], list[str]]:
  """(visible .parquet files, hidden temporary files) under out."""
  visible, hidden = [], []
  for d, _, files in os.walk(out):
    for f in files:
      (hidden if f.startswith(".") else visible).append(os.path.join(d, f))
  return [f for f in visible if f.endswith(".parquet")], hidden


class Watch:
  """What a run has done so far, as seen from outside."""

  def __init__(self, out: str, group: str, topic: str, bootstrap: str, total: int):
    from confluent_kafka import Consumer
    import logging
    self.out, self.topic, self.total = out, topic, total
    self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                               "logger": logging.getLogger("test.watch")})

  def committed(self) -> int:
    from confluent_kafka import TopicPartition
    found = self._consumer.committed([TopicPartition(self.topic, p)
                                      for p in range(PARTITIONS)], timeout=10)
    return sum(max(tp.offset, 0) for tp in found)

  def state(self) -> dict:
    visible, hidden = _files(self.out)
    return {"visible": len(visible), "hidden": len(hidden),
            "dead_letter_files": sum("/dead_letter/" in f for f in visible),
            "committed": self.committed()}

  def close(self):
    self._consumer.close()


def run_until(argv, env, watch: Watch, when, timeout: float = 120):
  """Starts the run; kills it with SIGKILL once ``when(state)`` holds. Returns the state at
  the kill (the run must still have been running)."""
  proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.monotonic() + timeout
  try:
    while time.monotonic() < deadline:
      state = watch.state()
      if when(state):
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the run ended before the kill point"
        return state
      if proc.poll() is not None:
        raise AssertionError(f"the run ended (exit {proc.returncode}) before the kill point: "
                             f"{proc.stderr.read().decode()[-2000:]}")
      time.sleep(0.005)
    raise AssertionError("the kill point never came")
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def check_no_partial_files(out: str) -> None:
  visible, _ = _files(out)
  for f in visible:
    pq.read_metadata(f)  # a partial Parquet file has no footer and fails here


def stored(out: str) -> collections.Counter:
  """(partition, offset) -> how many rows hold it, results and dead letters together."""
  import duckdb
  seen = collections.Counter()
  for sub in ("results", "dead_letter"):
    if os.path.isdir(os.path.join(out, sub)) and _files(os.path.join(out, sub))[0]:
      rows = duckdb.sql(f"SELECT kafka_partition, kafka_offset FROM read_parquet("
                        f"'{out}/{sub}/**/*.parquet', hive_partitioning=true)").fetchall()
      seen.update(map(tuple, rows))
  return seen


def check_complete(out: str, highwater: dict, watch: Watch) -> int:
  """Every offset in results or dead letters; returns how many are stored twice."""
  seen = stored(out)
  want = {(p, o) for p, hw in highwater.items() for o in range(hw)}
  missing = want - set(seen)
  assert not missing, f"{len(missing)} records lost, e.g. {sorted(missing)[:5]}"
  assert set(seen) <= want
  assert watch.committed() == sum(highwater.values())
  return sum(n - 1 for n in seen.values() if n > 1)


# --- passthrough, 50k records --------------------------------------------------------------

N = 50_000
PASSTHROUGH_POINTS = {
    "before any file": lambda s: s["hidden"] == 0 and s["visible"] == 0,
    "at the first temporary file": lambda s: s["hidden"] > 0,
    "at the first file": lambda s: s["visible"] > 0,
    "at the first commit": lambda s: s["committed"] > 0,
    "at the first dead-letter file": lambda s: s["dead_letter_files"] > 0,
    "mid-write after several files": lambda s: s["hidden"] > 0 and s["visible"] >= 20,
    "after 40 files": lambda s: s["visible"] >= 40,
    "with a quarter committed": lambda s: s["committed"] >= N // 4,
    "with half committed": lambda s: s["committed"] >= N // 2,
    "with 80% committed": lambda s: s["committed"] >= N * 8 // 10,
    "after 150 files": lambda s: s["visible"] >= 150,
}


@pytest.fixture(scope="module")
def big_topic(broker):
  from confluent_kafka import Producer
  import logging
  name = f"crash-{os.getpid()}-{int(time.time())}"
  broker.create_topic(name, PARTITIONS)
  p = Producer({"bootstrap.servers": broker.bootstrap_servers, "linger.ms": 20,
                "logger": logging.getLogger("test.producer")})
  hw = collections.Counter()
  for i in range(N):
    part = i % PARTITIONS
    value = b"\x00not json" if i % 997 == 0 else json.dumps({
        "ticket_id": f"T{i:06d}", "created_at": T0_MS + i * 60_000, "subject": f"s{i}",
        "body": f"body of ticket {i}"}).encode()
    p.produce(name, value, partition=part)
    hw[part] += 1
    if i % 5000 == 0:
      p.flush()
  p.flush()
  return name, dict(hw)


@pytest.mark.parametrize("point", list(PASSTHROUGH_POINTS))
def test_passthrough_killed_then_rerun_loses_nothing(broker, big_topic, tmp_path, point):
  name, highwater = big_topic
  out = str(tmp_path / "out")
  group = f"crash-{point.replace(' ', '-')}"
  argv = [*TIERFLOW, "-q", "run", "passthrough", "--bootstrap-servers", broker.bootstrap_servers,
          "--topic", name, "--output", out, "--group-id", group, "--rows-per-file", "500"]
  watch = Watch(out, group, name, broker.bootstrap_servers, N)
  try:
    at_kill = run_until(argv, dict(os.environ), watch, PASSTHROUGH_POINTS[point])
    assert at_kill["committed"] < N  # it really died part-way
    check_no_partial_files(out)
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    duplicates = check_complete(out, highwater, watch)
    assert duplicates == 0, f"{duplicates} records stored twice"
    check_no_partial_files(out)
  finally:
    watch.close()


def test_a_write_that_fails_never_commits(broker, big_topic, tmp_path):
  name, highwater = big_topic
  out = tmp_path / "out"
  out.mkdir()
  (out / "results").write_text("in the way")  # results cannot be a directory now
  group = "crash-unwritable"
  argv = [*TIERFLOW, "run", "passthrough", "--bootstrap-servers", broker.bootstrap_servers,
          "--topic", name, "--output", str(out), "--group-id", group]
  watch = Watch(str(out), group, name, broker.bootstrap_servers, N)
  try:
    failed = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert "the run failed" in failed.stderr
    assert watch.committed() == 0
    (out / "results").unlink()
    assert subprocess.run(argv, capture_output=True, timeout=300).returncode == 0
    assert check_complete(str(out), highwater, watch) == 0
  finally:
    watch.close()


# --- tickets, with models ------------------------------------------------------------------

TICKETS_POINTS = {
    "before any file": lambda s: s["visible"] == 0 and s["hidden"] == 0,
    "at the first file": lambda s: s["visible"] > 0,
    "at the first commit": lambda s: s["committed"] > 0,
    "after three files": lambda s: s["visible"] >= 3,
    "with half committed": lambda s: s["committed"] >= 300,
}


@pytest.fixture(scope="module")
def endpoints():
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier")) as server:
    yield server


@pytest.fixture(scope="module")
def tickets_topic(broker):
  from tierflow_local.loader import publish
  name = f"crash-tickets-{os.getpid()}-{int(time.time())}"
  broker.create_topic(name, PARTITIONS)
  tickets = [{**t, "ticket_id": f"{t['ticket_id']}-{k}"} for k in range(3)
             for t in sample_tickets()][:600]
  publish(broker.bootstrap_servers, name, tickets)  # keyed by ticket id: uneven partitions
  return name, highwaters(broker, name)


def highwaters(broker, name: str) -> dict:
  from tierflow.connectors.kafka_offsets import resolve_ranges
  from tierflow.connectors.kafka_source import KafkaReadConfig
  return {r.partition: r.stop for r in resolve_ranges(KafkaReadConfig(
      broker.bootstrap_servers, name))}


def tickets_config(tmp_path, endpoints) -> str:
  from tierflow.config import load_config  # noqa: F401 - the bundled YAML is the template
  from importlib import resources
  config = yaml.safe_load(resources.files("tierflow").joinpath("data", "tickets.yaml").read_text())
  config["budget_usd"] = None
  config["models"]["small"].update(base_url=endpoints.openai_base_url, model="small",
                                   api_key_env=None, price_as="gpt-5-nano", batch_size=4,
                                   concurrency=2)
  config["models"]["frontier"].update(provider="anthropic", base_url=endpoints.anthropic_base_url,
                                      model="frontier", api_key_env=None,
                                      price_as="claude-sonnet-4-6", batch_size=4)
  path = tmp_path / "tickets.yaml"
  path.write_text(yaml.safe_dump(copy.deepcopy(config)))
  return str(path)


@pytest.mark.parametrize("point", list(TICKETS_POINTS))
def test_tickets_killed_then_rerun_loses_nothing(broker, tickets_topic, endpoints, tmp_path,
                                                 point):
  name, highwater = tickets_topic
  out = str(tmp_path / "out")
  group = f"crash-tickets-{point.replace(' ', '-')}"
  argv = [*TIERFLOW, "-q", "run", "tickets", "--bootstrap-servers", broker.bootstrap_servers,
          "--topic", name, "--output", out, "--group-id", group, "--rows-per-file", "40",
          "--config", tickets_config(tmp_path, endpoints)]
  watch = Watch(out, group, name, broker.bootstrap_servers, 600)
  try:
    at_kill = run_until(argv, dict(os.environ), watch, TICKETS_POINTS[point])
    assert at_kill["committed"] < 600
    check_no_partial_files(out)
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert check_complete(out, highwater, watch) == 0
    import duckdb
    [(n, ledgered)] = duckdb.sql(
        f"SELECT count(*), count(*) FILTER (WHERE cost_usd > 0 AND len(stages) = 3) "
        f"FROM read_parquet('{out}/results/**/*.parquet', hive_partitioning=true)").fetchall()
    assert n == ledgered == 600  # every record answered, with its cost in the ledger
  finally:
    watch.close()
