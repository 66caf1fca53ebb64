"""From an unlabelled topic to a certified run: ``tierflow calibrate --reference frontier``
(a random sample, both tiers, the frontier's answers as the reference) -> ``tierflow
forecast`` -> ``tierflow run`` -> ``tierflow report``; no labels file anywhere.

The tiers are real HTTP endpoints (``LocalProviderServer``) that disagree on some tickets
(``tests/two_tiers.py``).
"""

from __future__ import annotations

import json
import pathlib

import pytest

from tierflow import cli
from local_config import local_config
from tierflow_local.loader import publish, sample_tickets
from tierflow_local.provider_server import LocalProviderServer
from two_tiers import TwoTiers

ALPHA = 0.1
SAMPLE = 160


@pytest.fixture(scope="module")
def loop(tmp_path_factory, tansu_broker):
  tmp = tmp_path_factory.mktemp("loop")
  broker = tansu_broker
  topic = f"unlabelled-{tmp.name}"
  broker.create_topic(topic, 2)
  publish(broker.bootstrap_servers, topic, sample_tickets())
  bs = broker.bootstrap_servers
  out = {"tmp": tmp, "topic": topic, "cal": str(tmp / "cal.json"),
         "sample": str(tmp / "sample"), "run": str(tmp / "run"),
         "forecast": str(tmp / "forecast.json"), "report": str(tmp / "report")}
  with LocalProviderServer(TwoTiers(), models=("small", "frontier")) as server:
    config = local_config(tmp / "tickets.yaml", server)
    out["config"] = config
    out["calibrate_code"], out["calibrate_out"] = _cli(
        ["calibrate", "--reference", "frontier", "--run", "tickets", "--config", config,
         "--bootstrap-servers", bs, "--topic", topic, "--sample", str(SAMPLE), "--seed", "3",
         "--alpha", str(ALPHA), "--out", out["cal"], "--work-dir", out["sample"]])
    out["forecast_code"], out["forecast_out"] = _cli(
        ["forecast", "--calibration", out["cal"], "--bootstrap-servers", bs, "--topic", topic,
         "--json", out["forecast"]])
    out["run_code"], _ = _cli(
        ["run", "tickets", "--bootstrap-servers", bs, "--topic", topic, "--output",
         out["run"], "--config", config, "--calibration", out["cal"],
         "--commit-offsets", "never"])
  out["report_code"], out["report_out"] = _cli(
      ["report", out["run"], "--frontier-only", out["sample"], "--calibration", out["cal"],
       "--out", out["report"], "--resamples", "50"])
  return out



def _cli(argv):
  import contextlib
  import io
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    code = cli.main(["-q", *argv])
  return code, buf.getvalue()


def test_calibrate_certifies_against_the_frontier_without_labels(loop, read_duckdb):
  assert loop["calibrate_code"] == 0, loop["calibrate_out"]
  doc = json.loads(pathlib.Path(loop["cal"]).read_text())
  assert doc["reference"] == "frontier" and "frontier" in doc["reference_model"]
  assert "127.0.0.1" in doc["reference_model"]
  classify = doc["stages"]["classify"]
  assert classify["certified"] and classify["n"] == SAMPLE and classify["alpha"] == ALPHA
  assert "summarise" not in doc["stages"]  # no exact reference: not certified, and said so
  printed = loop["calibrate_out"]
  assert "summarise" in printed and "not certified against the frontier" in printed
  assert "before (frontier only, billed)" in printed and "after (routed" in printed
  # The reference is the frontier's own answer: agreement counted independently in DuckDB.
  rows = read_duckdb(f"{loop['sample']}/results", """
      SELECT s.confidence AS c, s.small_answer = t.label AS agree, s.final_tier AS tier
      FROM (SELECT label, unnest(stages) AS s FROM t) t WHERE s.stage = 'classify'""")
  assert len(rows) == SAMPLE and {r["tier"] for r in rows} == {"frontier"}
  kept = [r for r in rows if r["c"] is not None and r["c"] >= classify["threshold"]]
  assert len(kept) == classify["n_accepted"]
  assert sum(not r["agree"] for r in kept) == classify["n_errors"]
  assert 0 < sum(not r["agree"] for r in rows)  # the tiers do disagree somewhere


def test_forecast_holds_the_runs_billed_cost(loop, read_duckdb):
  assert loop["forecast_code"] == 0 and loop["run_code"] == 0
  f = json.loads(pathlib.Path(loop["forecast"]).read_text())
  assert f["records"] == len(sample_tickets()) and "cost" in loop["forecast_out"]
  billed = read_duckdb(f"{loop['run']}/results", """
      SELECT count(*) AS n, sum(cost_usd) AS cost, sum(frontier_cost_usd) AS frontier,
             avg(CASE WHEN escalated THEN 1.0 ELSE 0.0 END) AS escalated FROM t""")[0]
  assert billed["n"] == f["records"]
  assert f["cost_usd"]["lo"] <= billed["cost"] <= f["cost_usd"]["hi"], (f, billed)
  assert f["frontier_usd"]["lo"] <= billed["frontier"] <= f["frontier_usd"]["hi"]
  assert f["escalated_share"]["lo"] <= billed["escalated"] <= f["escalated_share"]["hi"]
  # An interval that says something: narrower than the gap to frontier-only.
  assert f["cost_usd"]["hi"] < f["frontier_only_usd"]["expected"]


def test_report_states_the_guarantee_and_the_tiers_as_they_answered(loop):
  assert loop["report_code"] == 0, loop["report_out"]
  rep = json.loads((pathlib.Path(loop["report"]) / "report.json").read_text())
  assert rep["calibration"]["reference"] == "frontier"
  classify = next(g for g in rep["guarantee"] if g.startswith("classify:"))
  assert "certified" in classify and "disagree with the frontier" in classify
  assert f"{ALPHA:.1%}" in classify and "not gold labels" in classify
  assert any(g.startswith("summarise: no guarantee") for g in rep["guarantee"])
  # The sample ran on another "topic": joined on the tickets' own ids.
  assert rep["inputs"]["frontier_only_joined_on"] == "ticket_id"
  assert rep["cost"]["frontier_only_measured_records"] == SAMPLE
  tiers = rep["run"]["models"]
  assert [t["endpoint"].startswith("127.0.0.1") for t in tiers["small_tiers"]] == [True]
  page = (pathlib.Path(loop["report"]) / "report.html").read_text()
  assert "a local endpoint, not the provider" in page and "What is guaranteed" in page
  assert "quality unknown" in rep["cost"]["savings_quality"]
