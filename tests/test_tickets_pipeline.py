"""The tickets pipeline end to end: real broker, real SDKs over HTTP, Parquet read by DuckDB."""

import logging
import os
import pathlib

import pytest
import yaml

from tierflow import launcher, schemas
from tierflow.local.loader import publish, sample_tickets
from tierflow.local.provider_server import LocalProviderServer
from tierflow.local.standin_model import KeywordStandIn

SECRET = "sk-test-DO-NOT-LEAK-4f2a9c"


@pytest.fixture
def endpoints():
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier"),
                           openai_api_key=SECRET, anthropic_api_key=SECRET) as s:
    yield s


@pytest.fixture
def run_tickets(broker, topic, output_dir, endpoints, tmp_path, monkeypatch):
  monkeypatch.setenv("TIERFLOW_TEST_KEY", SECRET)

  def run(n=40, budget=None, small_batch=4, extra=()):
    name = topic(partitions=2)
    publish(broker.bootstrap_servers, name, sample_tickets()[:n])
    config = yaml.safe_load(
        (pathlib.Path(__file__).parents[1] / "tierflow/data/tickets.yaml").read_text())
    config["budget_usd"] = budget
    config["models"]["small"].update(
        base_url=endpoints.openai_base_url, model="small", api_key_env="TIERFLOW_TEST_KEY",
        price_as="gpt-5-nano", batch_size=small_batch, concurrency=2, max_retries=1)
    config["models"]["frontier"].update(
        provider="anthropic", base_url=endpoints.anthropic_base_url, model="frontier",
        api_key_env="TIERFLOW_TEST_KEY", price_as="claude-sonnet-4-6", batch_size=4,
        max_retries=1)
    path = tmp_path / "tickets.yaml"
    path.write_text(yaml.safe_dump(config))
    summary = launcher.launch("tickets", [
        "--bootstrap-servers", broker.bootstrap_servers, "--topic", name,
        "--output", output_dir, "--config", str(path), *extra])
    return summary, output_dir

  return run


def test_every_record_is_answered_with_a_full_ledger(run_tickets, read_duckdb):
  summary, out = run_tickets(n=40)
  rows = read_duckdb(f"{out}/results")
  assert len(rows) == 40 and {r["status"] for r in rows} == {"ok"}
  expected = set(schemas.field_names(schemas.load("result")))
  assert expected <= set(rows[0])
  labels = {"billing", "shipping", "returns", "account", "product_defect", "other"}
  for r in rows:
    assert r["label"] in labels and r["summary"]
    assert r["cost_usd"] == pytest.approx(sum(s["cost_usd"] for s in r["stages"]))
    assert r["cost_usd"] == pytest.approx(r["small_cost_usd"] + r["frontier_cost_usd"])
    for s in r["stages"]:
      assert s["small_input_tokens"] > 0 and s["small_cost_usd"] > 0
      if s["escalated"]:
        assert s["frontier_input_tokens"] + s["frontier_cache_read_tokens"] \
            + s["frontier_cache_write_tokens"] > 0
        assert s["final_tier"] == "frontier" and s["escalation_reason"]
      elif s["escalation_reason"] is None:
        assert s["confidence"] >= s["threshold"] and s["final_tier"] == "small"
  assert any(r["escalated"] for r in rows) and not all(r["escalated"] for r in rows)
  savings = read_duckdb(f"{out}/results", "SELECT sum(frontier_only_cost_usd) - sum(cost_usd) "
                        "AS saved FROM t")
  assert savings[0]["saved"] > 0
  assert summary.rows_written == 40 and summary.dead_letters == 0


def test_small_tier_down_sends_everything_to_the_frontier(run_tickets, endpoints, read_duckdb):
  endpoints.faults.add("server_error", count=-1, model="small")
  _, out = run_tickets(n=12)
  rows = read_duckdb(f"{out}/results")
  assert len(rows) == 12 and {r["status"] for r in rows} == {"ok"}
  for r in rows:
    assert all(s["final_tier"] == "frontier" for s in r["stages"])
    assert all("small tier failed" in reason for reason in r["escalation_reasons"])


def test_both_tiers_down_ends_in_the_dead_letters(run_tickets, endpoints, read_duckdb):
  endpoints.faults.add("server_error", count=-1)
  summary, out = run_tickets(n=10)
  rows = read_duckdb(f"{out}/results")
  dead = read_duckdb(f"{out}/dead_letter")
  assert {r["status"] for r in rows} == {"failed"}
  assert sorted(d["record_id"] for d in dead) == sorted(r["record_id"] for r in rows)
  assert len(dead) == 10
  assert all(d["error_type"] == "model_failure" and "server_error" in d["reason"] for d in dead)


def test_malformed_small_answers_escalate_per_record(run_tickets, endpoints, read_duckdb):
  endpoints.faults.add("truncated", count=-1, model="small")
  _, out = run_tickets(n=8)
  rows = read_duckdb(f"{out}/results")
  assert len(rows) == 8 and {r["status"] for r in rows} == {"ok"}
  # Lines cut off by the truncation fail on their own and escalate; complete
  # lines before the cut are valid answers and need not.
  cut = [s for r in rows for s in r["stages"] if s["small_error"]]
  assert cut and all(s["escalated"] and s["final_tier"] == "frontier" for s in cut)


def test_budget_cap_holds(run_tickets, read_duckdb):
  budget = 0.004
  _, out = run_tickets(n=60, budget=budget)
  rows = read_duckdb(f"{out}/results")
  spent = sum(r["frontier_cost_usd"] for r in rows)
  assert 0 < spent <= budget
  skipped = [r for r in rows if r["budget_skipped"]]
  assert skipped and all("budget cap reached" in " ".join(r["escalation_reasons"])
                         for r in skipped)
  assert {r["status"] for r in skipped} == {"ok"}  # the small answer is kept, marked


def test_no_api_key_in_logs_or_output(run_tickets, endpoints, caplog, capfd):
  caplog.set_level(logging.DEBUG)
  endpoints.faults.add("rate_limit", count=2, retry_after=0.05)
  _, out = run_tickets(n=6)
  assert SECRET not in caplog.text
  captured = capfd.readouterr()
  assert SECRET not in captured.out + captured.err
  for root, _, files in os.walk(out):
    for f in files:
      assert SECRET.encode() not in pathlib.Path(root, f).read_bytes()


def test_wrong_key_fails_records_not_the_pipeline(run_tickets, monkeypatch, read_duckdb):
  monkeypatch.setenv("TIERFLOW_TEST_KEY", "sk-wrong")
  summary, out = run_tickets(n=4)
  rows = read_duckdb(f"{out}/results")
  assert len(rows) == 4 and {r["status"] for r in rows} == {"failed"}
  assert all("auth" in r["error"] for r in rows)
  assert summary.dead_letters == 4
