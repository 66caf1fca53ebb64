"""Batches of one bundle share the small tier's request slots: with partitions of unequal
size, the run takes as many rounds of requests as its packs need in all, not a partly
filled last round per partition (``routing._RouteBatchFn``, ``ROUTED_AHEAD``). Seen at
the endpoint, over real HTTP, on Beam's local runner."""

from __future__ import annotations

import copy
import json
import math
import pathlib
import threading
import time

import pytest
import yaml
from tierflow_local.provider_server import LocalProviderServer
from tierflow_local.standin_model import KeywordStandIn

from tierflow import launcher

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZES = (9, 3, 7, 5)  # records per partition
BATCH, SLOTS, LATENCY = 2, 4, 0.4


def _rounds(requests, latency: float) -> int:
  """Waves of requests: a request received more than half a latency after the first of
  the current wave starts the next one."""
  starts = sorted(r.received_at for r in requests)
  rounds, first = 0, None
  for t in starts:
    if first is None or t > first + latency / 2:
      rounds, first = rounds + 1, t
  return rounds


def _topic(topic, produce, make_tickets) -> str:
  name = topic(partitions=len(SIZES))
  tickets = iter(make_tickets(sum(SIZES)))
  produce(name, [{"value": json.dumps(next(tickets)).encode(), "partition": p}
                 for p, n in enumerate(SIZES) for _ in range(n)])
  return name


def _config(server, tmp_path, **small) -> str:
  config = copy.deepcopy(yaml.safe_load((ROOT / "tierflow/data/tickets.yaml").read_text()))
  config["budget_usd"] = None
  config["stages"] = [{**config["stages"][0], "threshold": 0.0}]  # nothing escalates
  config["models"]["small"].update(model="small", base_url=server.openai_base_url,
                                   api_key_env=None, price_as="gpt-5-nano",
                                   batch_size=BATCH, concurrency=SLOTS, **small)
  config["models"]["frontier"].update(model="frontier", base_url=server.anthropic_base_url,
                                      api_key_env=None, price_as="claude-sonnet-4-6")
  path = tmp_path / "tickets.yaml"
  path.write_text(yaml.safe_dump(config))
  return str(path)


def _launch(broker, name: str, output_dir: str, config: str):
  return launcher.launch("tickets", ["--bootstrap-servers", broker.bootstrap_servers,
                                     "--topic", name, "--output", output_dir,
                                     "--start-offset", "0", "--config", config])


@pytest.mark.slow
def test_partitions_of_unequal_size_fill_every_round(broker, topic, produce, make_tickets,
                                                     output_dir, tmp_path, read_duckdb):
  name = _topic(topic, produce, make_tickets)
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier"),
                           latency_seconds=LATENCY) as server:
    summary = _launch(broker, name, output_dir, _config(server, tmp_path))
    asked = [r for r in server.requests if r.path == "/v1/chat/completions"]
  assert summary.exit_code == 0 and summary.rows_written == sum(SIZES), summary
  assert read_duckdb(output_dir + "/results", "SELECT count(*) AS n FROM t WHERE status = "
                     "'ok'")[0]["n"] == sum(SIZES)
  packs = [math.ceil(n / BATCH) for n in SIZES]
  assert len(asked) == sum(packs)
  one_batch_at_a_time = sum(math.ceil(p / SLOTS) for p in packs)  # 2 + 1 + 1 + 1
  shared = math.ceil(sum(packs) / SLOTS)  # 14 packs over 4 slots: 4 rounds
  assert shared < one_batch_at_a_time
  assert _rounds(asked, LATENCY) == shared, sorted(r.received_at for r in asked)


@pytest.mark.slow
def test_tiers_lost_with_batches_in_flight_fail_the_run_and_a_rerun_writes_each_once(
    broker, topic, produce, make_tickets, output_dir, tmp_path, read_duckdb):
  """Both tiers start failing (5xx on every request) once the first round of requests is
  answered, while later batches are in flight: the run fails in one line, nothing is
  written as failed for a cause that is not the records', and a second run, the tiers
  back, writes every record once, none twice."""
  name = _topic(topic, produce, make_tickets)
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier"),
                           latency_seconds=LATENCY) as server:
    config = _config(server, tmp_path, max_retries=1, breaker_failures=0)
    stop = threading.Event()

    def fail_after_the_first_round():
      while not stop.is_set() and sum(1 for r in server.requests
                                      if r.status == 200 and r.path.endswith("completions")) < 5:
        time.sleep(0.01)
      server.faults.add("server_error", count=-1, retry_after=0.01)  # both tiers

    watcher = threading.Thread(target=fail_after_the_first_round, daemon=True)
    watcher.start()
    try:
      with pytest.raises(launcher.RunFailed, match="not the records'"):
        _launch(broker, name, output_dir, config)
    finally:
      stop.set()
      watcher.join()
    first = read_duckdb(output_dir + "/results", "SELECT ticket_id, status FROM t") \
        if list(pathlib.Path(output_dir).glob("results/**/*.parquet")) else []
    assert all(r["status"] == "ok" for r in first), first
    assert len(first) < sum(SIZES)
    server.faults.clear()
    summary = _launch(broker, name, output_dir, config)
  assert summary.exit_code == 0, summary.problems
  rows = read_duckdb(output_dir + "/results",
                     "SELECT ticket_id, count(*) AS n, min(status) AS s FROM t GROUP BY 1")
  assert len(rows) == sum(SIZES) and {(r["n"], r["s"]) for r in rows} == {(1, "ok")}, rows
