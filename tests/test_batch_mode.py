"""Backfills through the providers' batch APIs: half price, the same answers, never paid twice.

The local endpoints implement OpenAI's Batch API (files + batches) and Anthropic's Message
Batches, answered after ``complete_seconds``; the real SDKs drive them over HTTP.
"""

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from tierflow import launcher
from local_config import local_config
from tierflow_local.loader import publish, sample_tickets
from tierflow_local.provider_server import LocalProviderServer
from tierflow_local.standin_model import KeywordStandIn

KEY = "sk-batch-test-DO-NOT-LEAK"


@pytest.fixture
def server(monkeypatch):
  monkeypatch.setenv("TIERFLOW_BATCH_TEST_KEY", KEY)
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier"),
                           openai_api_key=KEY, anthropic_api_key=KEY) as s:
    s.batches.complete_seconds = 0.3
    yield s


def _config(tmp_path, server, **small):
  return local_config(
      tmp_path / f"tickets-{len(list(tmp_path.iterdir()))}.yaml", server,
      small=dict(api_key_env="TIERFLOW_BATCH_TEST_KEY", batch_size=4, concurrency=2,
                 max_retries=1, **small),
      frontier=dict(api_key_env="TIERFLOW_BATCH_TEST_KEY", batch_size=2, max_retries=1))


def _argv(broker, name, out, config, *extra):
  return ["--bootstrap-servers", broker.bootstrap_servers, "--topic", name, "--output", out,
          "--config", config, "--rows-per-file", "20", "--batch-poll-seconds", "0.1", *extra]


def _stages(read_duckdb, out):
  return read_duckdb(f"{out}/results", """
      SELECT r.ticket_id, s.* FROM (SELECT ticket_id, unnest(stages) AS s FROM t) r
      ORDER BY ticket_id, s.stage""")


def _small_batched(broker, name, out, config):
  """A run with the small tier through the batch API, committing nothing."""
  return launcher.launch("tickets", _argv(broker, name, out, config, "--commit-offsets",
                                          "never", "--batch-tiers", "small"))


def _posts(server, path):
  return [r for r in server.requests if r.method == "POST" and r.path == path]


def test_batch_run_gives_the_same_answers_at_half_the_price(broker, topic, server, tmp_path,
                                                            read_duckdb):
  name = topic(partitions=2)
  publish(broker.bootstrap_servers, name, sample_tickets()[:40])
  config = _config(tmp_path, server)
  sync_out, batch_out = str(tmp_path / "sync"), str(tmp_path / "batch")
  sync = launcher.launch("tickets", _argv(broker, name, sync_out, config,
                                          "--commit-offsets", "never"))
  server.reset_stats()
  batch = launcher.launch("tickets", _argv(broker, name, batch_out, config,
                                           "--commit-offsets", "never",
                                           "--batch-tiers", "small,frontier"))
  assert sync.exit_code == batch.exit_code == 0 and batch.rows_written == 40
  # Nothing went synchronously: one small batch and one frontier batch per offset batch.
  answered = _posts(server, "/v1/chat/completions") + _posts(server, "/v1/messages")
  assert answered and all("x-local-batch" in r.headers for r in answered)
  offset_batches = batch.metrics["tierflow.kafka.batches_read"]
  assert len(_posts(server, "/v1/batches")) == offset_batches
  assert 1 <= len(_posts(server, "/v1/messages/batches")) <= offset_batches
  a, b = _stages(read_duckdb, sync_out), _stages(read_duckdb, batch_out)
  assert [(r["ticket_id"], r["stage"], r["small_answer"], r["final_tier"]) for r in a] == \
         [(r["ticket_id"], r["stage"], r["small_answer"], r["final_tier"]) for r in b]
  assert {r["small_billing_mode"] for r in b} == {"batch"}
  assert {r["frontier_billing_mode"] for r in b if r["escalated"]} == {"batch"}
  assert {r["small_billing_mode"] for r in a} == {"sync"}
  cost = lambda rows: sum(r["cost_usd"] for r in rows)  # noqa: E731
  # The price book's 50% discount; cache reads and writes fall a little differently when
  # a batch's requests are answered back to back.
  assert 0.45 * cost(a) <= cost(b) <= 0.5 * cost(a)
  assert list((pathlib.Path(batch_out) / "_batches").rglob("*.json")), "no state kept"


def test_failed_and_expired_batch_requests_fall_back_or_fail(broker, topic, server, tmp_path,
                                                             read_duckdb):
  name = topic(partitions=1)
  publish(broker.bootstrap_servers, name, sample_tickets()[:12])
  server.batches.fail_every = 3
  out = str(tmp_path / "partial")
  summary = _small_batched(broker, name, out, _config(tmp_path, server))
  assert summary.exit_code == 0 and summary.rows_written == 12
  rows = _stages(read_duckdb, out)
  modes = {r["small_billing_mode"] for r in rows}
  assert modes == {"batch", "sync"}, "every third request failed in the batch"
  assert all(r["small_error"] is None for r in rows)

  server.batches.fail_every, server.batches.expire = None, True
  out = str(tmp_path / "expired")
  summary = _small_batched(broker, name, out, _config(tmp_path, server, batch_fallback="fail"))
  rows = _stages(read_duckdb, out)
  assert {r["small_billing_mode"] for r in rows} == {"batch"}
  assert all(r["small_error"].startswith("batch_expired") for r in rows)
  assert all(r["small_cost_usd"] == 0 for r in rows)  # an expired request is not billed
  # batch_fallback: fail fails the small tier; the records escalated and were answered.
  assert {r["final_tier"] for r in rows} == {"frontier"}
  assert summary.rows_written == 12 and summary.records_failed == 0


def test_streaming_refuses_batch_mode(broker, topic, server, tmp_path):
  name = topic(partitions=1)
  with pytest.raises(ValueError, match="batch mode .* is for bounded runs"):
    launcher.build("tickets", _argv(broker, name, str(tmp_path / "o"),
                                    _config(tmp_path, server), "--streaming",
                                    "--batch-tiers", "small"))


@pytest.mark.slow
def test_kill_while_polling_then_rerun_submits_nothing_twice(broker, topic, server, tmp_path,
                                                             read_duckdb):
  name = topic(partitions=2)
  publish(broker.bootstrap_servers, name, sample_tickets()[:40])
  out = str(tmp_path / "out")
  config = _config(tmp_path, server)
  argv = [sys.executable, "-m", "tierflow.cli", "run", "tickets",
          *_argv(broker, name, out, config, "--batch-tiers", "small,frontier")]
  env = {**os.environ, "TIERFLOW_BATCH_TEST_KEY": KEY}
  server.batches.complete_seconds = 3600  # nothing ends while the first run lives
  proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
      # The runner routes one offset batch at a time: the first one's small batch is
      # submitted and polled; the second is not reached before the kill.
      if list(pathlib.Path(out).glob("_batches/**/*.small.json")):
        break
      assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
      time.sleep(0.05)
    else:
      raise AssertionError("the run never submitted its batches")
    time.sleep(0.5)  # polling
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
  submitted = [b for b in server.batches.created if b.startswith("batch_")]
  assert len(submitted) == 1
  assert not list(pathlib.Path(out).glob("results/**/*.parquet")), "killed before any write"

  server.batches.complete_seconds = 0.2
  rerun_started = time.time()
  rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  # The endpoint's log: two batch submissions in both runs together, and the killed
  # run's batch was polled by the re-run.
  assert len(_posts(server, "/v1/batches")) == 2
  assert any(r.method == "GET" and r.path == f"/v1/batches/{submitted[0]}"
             and r.received_at > rerun_started for r in server.requests)
  # Two offset batches, two small batches in all: the killed one was resumed.
  assert len([b for b in server.batches.created if b.startswith("batch_")]) == 2
  rows = read_duckdb(f"{out}/results")
  assert sorted(r["ticket_id"] for r in rows) == sorted(
      t["ticket_id"] for t in sample_tickets()[:40])
  assert KEY not in rerun.stderr


def test_unreadable_results_fall_back_to_sync(broker, topic, server, tmp_path, read_duckdb,
                                              monkeypatch):
  """A batch whose output can no longer be read (files deleted at the provider) is not a
  crash: its requests go synchronously."""
  from tierflow.connectors import batch_api

  def gone(self):
    raise RuntimeError("No such File object")
  monkeypatch.setattr(batch_api.OpenAIBatches, "_results", gone)  # the small tier's provider
  name = topic(partitions=1)
  publish(broker.bootstrap_servers, name, sample_tickets()[:8])
  out = str(tmp_path / "gone")
  summary = _small_batched(broker, name, out, _config(tmp_path, server))
  assert summary.exit_code == 0 and summary.rows_written == 8
  rows = _stages(read_duckdb, out)
  assert {r["small_billing_mode"] for r in rows} == {"sync"}
  assert all(r["small_error"] is None for r in rows)


class _KilledHere(Exception):
  """Stands for a kill -9 at this point: what is on disk and at the provider stays."""


@pytest.mark.parametrize("tier", ["small", "frontier"], ids=["openai", "anthropic"])
def test_killed_between_the_provider_accepting_and_the_id_recorded(
    broker, topic, server, tmp_path, read_duckdb, monkeypatch, caplog, tier):
  """The one round trip the state file did not cover: the batch was accepted, its id never
  recorded. The re-run finds the OpenAI batch by the hash in its metadata and polls it;
  Anthropic batches carry no metadata, so that one is submitted again, with a warning."""
  from tierflow.connectors import batch_api
  save = batch_api.ProviderBatch._save_state

  def killed_after_submit(self, state):
    if any(c.get("batch_id") for c in state["chunks"]):
      raise _KilledHere("killed after the provider accepted the batch")
    save(self, state)

  name = topic(partitions=1)
  publish(broker.bootstrap_servers, name, sample_tickets()[:6])
  out = str(tmp_path / "out")
  config = _config(tmp_path, server)
  if tier == "frontier":  # every stage escalates: the frontier gets a batch for sure
    import yaml
    doc = yaml.safe_load(pathlib.Path(config).read_text())
    for stage in doc["stages"]:
      stage["threshold"] = math.inf
    pathlib.Path(config).write_text(yaml.safe_dump(doc))
  argv = _argv(broker, name, out, config, "--commit-offsets", "never", "--batch-tiers", tier)
  created = lambda: [b for b in server.batches.created  # noqa: E731
                     if b.startswith("batch_" if tier == "small" else "msgbatch_")]
  monkeypatch.setattr(batch_api.ProviderBatch, "_save_state", killed_after_submit)
  with pytest.raises(Exception, match="killed after the provider accepted"):
    launcher.launch("tickets", argv)  # the run fails: nothing of the batch is written
  assert len(created()) == 1
  [state] = pathlib.Path(out).glob("_batches/**/*.json")
  assert "batch_id" not in state.read_text() and "submitting_since" in state.read_text()

  monkeypatch.setattr(batch_api.ProviderBatch, "_save_state", save)
  summary = launcher.launch("tickets", argv)
  assert summary.exit_code == 0 and summary.rows_written == 6
  if tier == "small":
    assert len(created()) == 1, "the re-run must poll the batch the killed run submitted"
    assert created()[0] in state.read_text()
    assert any("found batch" in r.getMessage() for r in caplog.records)
  else:
    assert len(created()) == 2
    assert any("no metadata to find it by" in r.getMessage() for r in caplog.records)
  rows = _stages(read_duckdb, out)
  assert {r[f"{tier}_billing_mode"] for r in rows} == {"batch"}


@pytest.mark.slow
def test_batch_mode_with_several_worker_processes(broker, topic, server, tmp_path, read_duckdb):
  """Two FnApiRunner worker processes, each submitting its offset batches' requests as
  provider batches: every record answered in batch mode, each batch submitted once and
  recorded under its own range."""
  name = topic(partitions=2)
  publish(broker.bootstrap_servers, name, sample_tickets()[:40])
  out = str(tmp_path / "out")
  summary = launcher.launch("tickets", _argv(
      broker, name, out, _config(tmp_path, server), "--batch-tiers", "small",
      "--rows-per-file", "10", "--direct_running_mode=multi_processing",
      "--direct_num_workers=2"))
  assert summary.exit_code == 0 and summary.rows_written == 40
  assert summary.offsets_covered == summary.offsets_in_range == 40
  states = sorted(pathlib.Path(out).glob("_batches/**/*.small.json"))
  created = [b for b in server.batches.created if b.startswith("batch_")]
  recorded = [c["batch_id"] for p in states for c in json.loads(p.read_text())["chunks"]]
  assert len(states) >= 2 and sorted(recorded) == sorted(created)  # once each, none lost
  rows = _stages(read_duckdb, out)
  assert len(rows) == 120 and {r["small_billing_mode"] for r in rows} == {"batch"}
  senders = {r.headers.get("x-tierflow-worker") for r in _posts(server, "/v1/batches")}
  print("batches", len(created), "from workers", senders)


def test_samples_go_in_the_same_batch_and_are_all_billed(broker, topic, server, tmp_path,
                                                         read_duckdb):
  name = topic(partitions=1)
  publish(broker.bootstrap_servers, name, sample_tickets()[:12])
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  assert _small_batched(broker, name, one, _config(tmp_path, server)).exit_code == 0
  server.reset_stats()
  summary = _small_batched(broker, name, two, _config(tmp_path, server, samples=2))
  assert summary.exit_code == 0 and summary.rows_written == 12
  # One small batch per offset batch, carrying both samples of every pack.
  assert len(_posts(server, "/v1/batches")) == summary.metrics["tierflow.kafka.batches_read"]
  a, b = _stages(read_duckdb, one), _stages(read_duckdb, two)
  assert [(r["ticket_id"], r["stage"]) for r in a] == [(r["ticket_id"], r["stage"]) for r in b]
  for x, y in zip(a, b):
    assert y["small_billing_mode"] == "batch" and y["confidence_signal"] == "agreement"
    assert y["small_input_tokens"] == 2 * x["small_input_tokens"]
    assert y["small_cost_usd"] == pytest.approx(2 * x["small_cost_usd"])
    assert y["small_answer"] == x["small_answer"]  # the stand-in answers alike


def _escalate_all(doc: dict) -> None:
  for stage in doc["stages"]:
    stage["threshold"] = math.inf


def test_a_stage_named_intent_v2_goes_through_both_batch_apis(broker, topic, server, tmp_path,
                                                              read_duckdb):
  """Anthropic refuses custom ids outside ``^[a-zA-Z0-9_-]{1,64}$``; ``intent.v2-0`` got
  the whole batch refused (and every request sent synchronously at full price)."""
  def rename(doc):
    _escalate_all(doc)
    doc["stages"][0]["name"] = "intent.v2"
  config = local_config(tmp_path / "renamed.yaml", server, edit=rename,
                        small=dict(api_key_env="TIERFLOW_BATCH_TEST_KEY", batch_size=4),
                        frontier=dict(api_key_env="TIERFLOW_BATCH_TEST_KEY", batch_size=2))
  name = topic(partitions=1)
  publish(broker.bootstrap_servers, name, sample_tickets()[:8])
  out = str(tmp_path / "out")
  summary = launcher.launch("tickets", _argv(broker, name, out, config, "--commit-offsets",
                                             "never", "--batch-tiers", "small,frontier"))
  assert summary.exit_code == 0 and summary.rows_written == 8
  rows = _stages(read_duckdb, out)
  assert {r["stage"] for r in rows} == {"intent.v2", "extract", "summarise"}
  assert {r["small_billing_mode"] for r in rows} == {"batch"}
  assert {r["frontier_billing_mode"] for r in rows} == {"batch"}
  answered = _posts(server, "/v1/chat/completions") + _posts(server, "/v1/messages")
  assert answered and all("x-local-batch" in r.headers for r in answered), "all in batches"


def test_batches_split_by_the_limits_are_billed_at_half(broker, topic, server, tmp_path,
                                                        read_duckdb):
  """Every offset batch's requests are more than one batch holds: split, all answered,
  half the synchronous bill, the same answers."""
  name = topic(partitions=1)
  publish(broker.bootstrap_servers, name, sample_tickets()[:20])
  server.batches.openai_max_requests = server.batches.anthropic_max_requests = 4
  config = local_config(tmp_path / "split.yaml", server, edit=_escalate_all,
                        small=dict(api_key_env="TIERFLOW_BATCH_TEST_KEY", batch_size=2,
                                   batch_max_requests=4),
                        frontier=dict(api_key_env="TIERFLOW_BATCH_TEST_KEY", batch_size=2,
                                      batch_max_requests=4))
  sync_out, batch_out = str(tmp_path / "sync"), str(tmp_path / "batch")
  assert launcher.launch("tickets", _argv(broker, name, sync_out, config, "--commit-offsets",
                                          "never")).exit_code == 0
  batch = launcher.launch("tickets", _argv(broker, name, batch_out, config, "--commit-offsets",
                                           "never", "--batch-tiers", "small,frontier"))
  assert batch.exit_code == 0 and batch.rows_written == 20
  # 20 records, 3 stages, packs of 2: 30 requests a tier, at most 4 a batch.
  assert len(_posts(server, "/v1/batches")) >= 8
  assert len(_posts(server, "/v1/messages/batches")) >= 8
  assert batch.metrics["tierflow.routing.small_batches"] >= 8
  a, b = _stages(read_duckdb, sync_out), _stages(read_duckdb, batch_out)
  assert {r["small_billing_mode"] for r in b} == {"batch"}
  assert {r["frontier_billing_mode"] for r in b} == {"batch"}
  assert [(r["ticket_id"], r["stage"], r["small_answer"], r["final_tier"]) for r in a] == \
         [(r["ticket_id"], r["stage"], r["small_answer"], r["final_tier"]) for r in b]
  cost = lambda rows: sum(r["cost_usd"] for r in rows)  # noqa: E731
  assert 0.45 * cost(a) <= cost(b) <= 0.5 * cost(a)


@pytest.mark.parametrize("fallback", ["sync", "fail"])
def test_a_cancel_at_the_deadline_bills_what_came_back_once(broker, topic, server, tmp_path,
                                                            read_duckdb, fallback):
  """The small batch is cancelled at --max-batch-wait, part answered: those answers are
  kept and billed at half; the rest go synchronously (once each) or fail."""
  name = topic(partitions=1)
  publish(broker.bootstrap_servers, name, sample_tickets()[:16])
  server.batches.complete_seconds = 0.3
  server.batches.stall_after = 9  # of the batch's 12 requests: the last 3 wait for the cancel
  config = _config(tmp_path, server, batch_fallback=fallback)
  out = str(tmp_path / "out")
  summary = launcher.launch("tickets", _argv(
      broker, name, out, config, "--commit-offsets", "never", "--batch-tiers", "small",
      "--rows-per-file", "16", "--max-batch-wait", "1.5"))
  assert summary.exit_code == 0 and summary.rows_written == 16
  rows = _stages(read_duckdb, out)
  batched = [r for r in rows if r["small_billing_mode"] == "batch" and not r["small_error"]]
  rest = [r for r in rows if r not in batched]
  assert batched and rest, "part of the batch was answered before the cancel"
  assert all(r["small_cost_usd"] > 0 for r in batched)
  # 16 records in packs of 4, 3 stages: 12 small requests; each answered once in all.
  sync_small = [r for r in _posts(server, "/v1/chat/completions")
                if "x-local-batch" not in r.headers]
  if fallback == "sync":
    assert {r["small_billing_mode"] for r in rest} == {"sync"}
    assert all(r["small_error"] is None for r in rest)
    assert server.batches.answered + len(sync_small) == 12
  else:
    assert all(r["small_error"].startswith("batch_canceled") for r in rest)
    assert all(r["small_cost_usd"] == 0 for r in rest) and not sync_small
  assert len(server.batches.created) == 1 and server.batches.answered == 9
  assert len(batched) == 9 * 4


def test_the_budget_approves_at_the_batch_price(broker, topic, server, tmp_path, read_duckdb):
  """Frontier packs are approved up front at their strict cost at the batch discount: the
  approved packs' discounted reservations fill the cap (undiscounted, they filled half)."""
  from tierflow.config import load_config
  from tierflow.pipelines.prompts import render_text
  from tierflow.pipelines.routing import Router
  from tierflow.prices import load_price_book
  name = topic(partitions=1)
  tickets = sample_tickets()[:40]
  publish(broker.bootstrap_servers, name, tickets)
  cap = 0.03
  config = local_config(tmp_path / "budget.yaml", server, budget=cap, edit=_escalate_all,
                        small=dict(api_key_env="TIERFLOW_BATCH_TEST_KEY", batch_size=4),
                        frontier=dict(api_key_env="TIERFLOW_BATCH_TEST_KEY", batch_size=1))
  out = str(tmp_path / "out")
  summary = launcher.launch("tickets", _argv(
      broker, name, out, config, "--commit-offsets", "never", "--rows-per-file", "40",
      "--batch-tiers", "frontier"))
  assert summary.exit_code == 0
  rows = _stages(read_duckdb, out)
  approved = [r for r in rows if r["frontier_cost_usd"] > 0]
  assert approved and len(approved) < len(rows), "the cap bites"
  assert sum(r["frontier_cost_usd"] for r in rows) <= cap
  run = load_config(config)
  router = Router(run, load_price_book())
  text = {t["ticket_id"]: render_text(run.text, t) for t in tickets}
  discount = load_price_book().price(run.frontier.price_key).batch_discount
  assert discount == 0.5
  reserved = sum(router.reservation(r["stage"], [text[r["ticket_id"]]]) * (1 - discount)
                 for r in approved)
  assert 0.8 * cap <= reserved <= cap, (reserved, len(approved))
