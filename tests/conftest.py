"""Shared fixtures: one embedded Kafka broker (Tansu) per session, fresh topics per test."""

import itertools
import logging
import os
import uuid

import duckdb
import pyarrow.dataset as pds
import pytest

from tierflow.connectors.parquet_dataset import hive_partitioning

# kafka-python logs every reconnect and group-less consumer at WARNING/ERROR; librdkafka
# (the ledger's clients, which live as long as the process) too, once a test's broker stops.
logging.getLogger("kafka").setLevel(logging.CRITICAL)
logging.getLogger("tierflow.kafka.librdkafka").setLevel(logging.CRITICAL)
# Beam logs its job servers (Flink, Prism) starting and stopping at WARNING, the last
# at interpreter exit, after pytest has closed its streams.
logging.getLogger("apache_beam.utils.subprocess_server").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tansu_broker():
  """The embedded broker (Tansu, in memory), shared by the whole session."""
  from tierflow_local.broker import EmbeddedBroker
  with EmbeddedBroker() as b:
    yield b


@pytest.fixture(scope="session")
def kafka_broker():
  """Apache Kafka 4.4 (KRaft, single node) from `make engines`, shared by the session.
  Not installed is an error, not a skip: CI installs it."""
  from tierflow_local.engines import ApacheKafka
  with ApacheKafka() as b:
    yield b


@pytest.fixture
def broker(tansu_broker):
  """The broker most tests use: Tansu. Modules that test Kafka behaviour override it with
  both brokers (``both_brokers``)."""
  return tansu_broker


def both_brokers(request):
  """For a module's ``broker`` override: Tansu and Apache Kafka, by ``request.param``."""
  return request.getfixturevalue("tansu_broker" if request.param == "tansu" else "kafka_broker")


_TOPIC_SEQ = itertools.count()


@pytest.fixture
def topic(broker, request):
  """Factory: ``topic(partitions=1)`` creates a uniquely named topic and returns its name."""

  def create(partitions: int = 1, prefix: str = "", config: dict | None = None) -> str:
    base = prefix or request.node.name.split("[")[0].replace("test_", "", 1)
    name = f"{base[:60]}-{next(_TOPIC_SEQ)}-{uuid.uuid4().hex[:6]}".replace("_", "-")
    broker.create_topic(name, partitions, config)
    return name

  return create


@pytest.fixture
def output_dir(tmp_path_factory):
  """A fresh, empty directory for one pipeline's output."""
  return str(tmp_path_factory.mktemp("out"))


@pytest.fixture(scope="session")
def schema_registry():
  """Apicurio Registry (Confluent-compatible API) from `make engines`, for the session."""
  from tierflow_local.engines import ApicurioRegistry
  with ApicurioRegistry() as r:
    yield r


def _parquet_files(directory: str) -> list[str]:
  """Visible Parquet files under ``directory``, relative and sorted."""
  out = []
  for root, _, files in os.walk(directory):
    for f in files:
      if f.endswith(".parquet") and not f.startswith("."):
        out.append(os.path.relpath(os.path.join(root, f), directory))
  return sorted(out)


def _read_duckdb(directory: str, query: str = "SELECT * FROM t ORDER BY record_id") -> list[dict]:
  """Rows of a Hive-partitioned dataset via DuckDB; ``t`` names the dataset in ``query``.

  ``dt`` is read as VARCHAR, as written.
  """
  if not _parquet_files(directory):
    return []
  con = duckdb.connect()
  try:
    glob = f"{directory}/**/*.parquet".replace("'", "''")
    con.execute(f"CREATE VIEW t AS SELECT * FROM read_parquet('{glob}', "
                "hive_partitioning=true, hive_types={'dt': VARCHAR})")
    cur = con.execute(query)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]
  finally:
    con.close()


def _read_arrow(directory: str):
  """The dataset as one pyarrow Table (Hive ``dt`` as string)."""
  return pds.dataset(directory, format="parquet", partitioning=hive_partitioning()).to_table()


@pytest.fixture
def parquet_files():
  """``parquet_files(dir)``: visible Parquet file paths under dir, relative and sorted."""
  return _parquet_files


@pytest.fixture
def read_duckdb():
  """``read_duckdb(dir, query=...)``: rows (dicts) of the dataset, queried as view ``t``."""
  return _read_duckdb


@pytest.fixture
def read_arrow():
  """``read_arrow(dir)``: the dataset as a pyarrow Table."""
  return _read_arrow


# --- producing ------------------------------------------------------------------

T0_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z


@pytest.fixture
def produce(broker):
  """``produce(topic, records, batch_size=200, **producer_config)`` -> [(partition, offset)].

  ``records`` are dicts with ``value`` and optional ``key``, ``partition`` and
  ``timestamp_ms``. The producer flushes every ``batch_size`` records, so the
  topic is written in many separate batches.
  """
  from kafka import KafkaProducer

  def send(topic, records, batch_size=200, **producer_config):
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all",
                             linger_ms=5, **producer_config)
    try:
      futures = []
      for i, r in enumerate(records, 1):
        futures.append(producer.send(topic, value=r.get("value"), key=r.get("key"),
                                     partition=r.get("partition"),
                                     timestamp_ms=r.get("timestamp_ms")))
        if i % batch_size == 0:
          producer.flush()
      producer.flush()
      return [(m.partition, m.offset) for m in (f.get(timeout=30) for f in futures)]
    finally:
      producer.close()

  return send


def _make_tickets(n, *, prefix="T", start_ms=T0_MS, step_ms=1000):
  """``n`` valid Ticket records with distinct ids and ``created_at`` = start + i * step."""
  return [{
      "ticket_id": f"{prefix}{i:06d}",
      "created_at": start_ms + i * step_ms,
      "subject": f"subject {i}",
      "body": f"body of ticket {i} ✓",
      "channel": ("email", "chat", "phone")[i % 3],
      "customer_id": None if i % 4 == 0 else f"C{i % 97}",
  } for i in range(n)]


@pytest.fixture
def make_tickets():
  """``make_tickets(n, prefix="T", start_ms=T0_MS, step_ms=1000)`` -> valid Ticket dicts."""
  return _make_tickets


@pytest.fixture
def committed(broker):
  """``committed(topic, group_id, partitions)`` -> {partition: committed offset or None}."""
  from kafka import KafkaConsumer, TopicPartition

  def lookup(topic, group_id, partitions):
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, group_id=group_id,
                             enable_auto_commit=False)
    try:
      return {p: consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
      consumer.close()

  return lookup


@pytest.fixture
def passthrough(broker):
  """``passthrough(topic, output, *flags)``: runs the pipeline via ``launcher.launch``."""
  from tierflow import launcher

  def run(topic, output, *flags):
    return launcher.launch("passthrough", [
        "--bootstrap-servers", broker.bootstrap_servers, "--topic", topic,
        "--output", output, *flags])

  return run


def pytest_collection_modifyitems(config, items):
  """Marks the tests that need `make engines` (Apache Kafka, Apicurio, Flink, Prism) with
  ``engines``, so `make test-fast` can leave them out."""
  for item in items:
    params = getattr(getattr(item, "callspec", None), "params", {})
    needs = {"kafka_broker", "schema_registry"} & set(item.fixturenames)
    if needs or params.get("broker") == "apache-kafka" or item.path.name in (
        "test_engines.py", "test_kafka_gaps.py"):
      item.add_marker("engines")


@pytest.fixture(autouse=True)
def _no_root_handler_on_a_closed_stream():
  """The CLI (``cli.main``) sets up the root logger with a handler on the stream of the
  moment, in a test pytest's capture, which pytest closes after it. Beam's job-server log
  threads outlive tests and wrote to it ('--- Logging error --- ValueError: I/O operation
  on closed file' in CI logs). Handlers a test adds to the root logger go with it."""
  root = logging.getLogger()
  before = set(root.handlers)
  yield
  for handler in list(root.handlers):
    if handler not in before and type(handler) is logging.StreamHandler:
      root.removeHandler(handler)


@pytest.fixture(autouse=True)
def _fresh_circuit_breakers():
  """Circuit breakers live per endpoint and process; a test's dead endpoint must not
  leave an open circuit (or a client holding one) for a later test whose server got the
  same port."""
  yield
  from tierflow.connectors import llm_clients
  with llm_clients._LIMITERS_LOCK:
    llm_clients._BREAKERS.clear()
  with llm_clients._CLIENTS_LOCK:
    llm_clients._CLIENTS.clear()
