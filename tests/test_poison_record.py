"""A record never stops a run: the poison records, through every pipeline, on every runner.

Two poisons: a JSON record with invalid UTF-8 in a string (it used to reach a results
file, which DuckDB then refused, and to crash the routing step for good, exit 2 on every
re-run), and a record on which routing itself raises (here a prompt that cannot be
built). Each run, on FnApiRunner, Flink (embedded, parallelism 2) and Prism: the poison
ends in the dead letters with its reason, every other record is written, the exit code
is 0 (passthrough) or 3 (a model pipeline with a failed record), never 2; and the same
command run again reads past them and exits 0: the partition is not stuck.
"""

import json
import os

import duckdb
import pytest
from local_config import pipeline_config

from tierflow import cli
from tierflow_local.engines import flink_job_server_jar, prism_binary
from tierflow_local.provider_server import LocalProviderServer
from tierflow_local.standin_model import KeywordStandIn

pytestmark = [pytest.mark.slow, pytest.mark.engines]
T0_MS = 1_704_067_200_000
BAD_UTF8 = (b'{"ticket_id": "\xff\xfe", "created_at": 1704067200000, "subject": "s", '
            b'"body": "b", "doc_id": "\xff\xfe", "title": "t", "text": "x"}')
PILL = "POISON-PILL"


def runner_flags(runner):
  if runner == "flink":
    return ["--runner", "FlinkRunner", f"--flink_job_server_jar={flink_job_server_jar()}",
            "--flink_master=[local]", "--flink_version=1.19", "--environment_type=LOOPBACK",
            "--parallelism=2"]
  if runner == "prism":
    return ["--runner", "PrismRunner", f"--prism_location={prism_binary()}"]
  return []


def record(pipeline, i, body):
  if pipeline == "documents":
    return {"doc_id": f"D{i}", "created_at": T0_MS + i, "title": f"title {i}", "text": body}
  return {"ticket_id": f"T{i}", "created_at": T0_MS + i, "subject": f"subject {i}",
          "body": body}


@pytest.fixture(scope="module")
def endpoints():
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier")) as server:
    yield server




@pytest.mark.parametrize("runner", ["fnapi", "flink", "prism"])
@pytest.mark.parametrize("pipeline", ["passthrough", "tickets", "documents"])
def test_the_poison_records_never_stop_a_run(pipeline, runner, kafka_broker, endpoints,
                                             tmp_path, monkeypatch, capsys):
  from tierflow.pipelines import routing
  render = routing.render_text

  def render_or_raise(template, row):  # a prompt that cannot be built, for one record
    text = render(template, row)
    if PILL in text:
      raise ValueError(f"cannot build the prompt for {row.get('record_id')}")
    return text

  monkeypatch.setattr(routing, "render_text", render_or_raise)
  name = f"poison-{pipeline}-{runner}-{os.getpid()}"
  kafka_broker.create_topic(name, 2)
  values = [json.dumps(record(pipeline, i, f"my parcel {i} is late")).encode()
            for i in range(12)]
  values.insert(3, BAD_UTF8)
  if pipeline != "passthrough":
    values.insert(8, json.dumps(record(pipeline, 99, f"{PILL} my invoice")).encode())
  from confluent_kafka import Producer
  import logging
  producer = Producer({"bootstrap.servers": kafka_broker.bootstrap_servers,
                       "logger": logging.getLogger("test.producer")})
  for i, v in enumerate(values):
    producer.produce(name, v, partition=i % 2, timestamp=T0_MS + i)
  producer.flush(30)
  out = str(tmp_path / "out")
  argv = ["run", pipeline, "--bootstrap-servers", kafka_broker.bootstrap_servers, "--topic",
          name, "--output", out, "--rows-per-file", "5", *runner_flags(runner)]
  if pipeline != "passthrough":
    argv += ["--config", pipeline_config(tmp_path, endpoints, pipeline)]
  code = cli.main(argv)
  printed = capsys.readouterr()
  assert code == (0 if pipeline == "passthrough" else 3), printed.err[-3000:]
  dead = duckdb.sql(f"SELECT error_type, reason, raw_value FROM read_parquet("
                    f"'{out}/dead_letter/**/*.parquet')").fetchall()
  reasons = {t: r for t, r, _ in dead}
  assert "invalid_utf8" in reasons
  if pipeline != "passthrough":
    assert "cannot build the prompt" in reasons["model_failure"]
  [(results,)] = duckdb.sql(f"SELECT count(*) FROM read_parquet("
                            f"'{out}/results/**/*.parquet')").fetchall()
  assert results == len(values) - 1  # all but the undecodable one (a failed record too)
  again = cli.main(argv)
  capsys.readouterr()
  assert again == 0  # nothing left to read: the partition moved on
