"""The report's frontier-only baseline is measured, never guessed from escalated records; an
uncertified calibration and a stage that escalated everything get banners."""

import math
import pathlib

import pytest

from tierflow import launcher, report_command
from tierflow.calibration import Calibration
from tierflow.report import build_report
from local_config import local_config
from tierflow_local.loader import publish, sample_tickets
from tierflow_local.provider_server import LocalProviderServer
from tierflow_local.standin_model import KeywordStandIn

ROOT = pathlib.Path(__file__).parents[1]
LABELS = ROOT / "deploy/local/data/sample_tickets_labels.jsonl"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tansu_broker):
  """A routed run and a frontier-only run (every threshold above any confidence) of the
  same 40 tickets."""
  tmp = tmp_path_factory.mktemp("fo")
  broker = tansu_broker
  name = f"report-fo-{tmp.name}"
  broker.create_topic(name, 2)
  publish(broker.bootstrap_servers, name, sample_tickets()[:40])
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier")) as server:
    out = {}
    for label, threshold in (("routed", None), ("frontier_only", 1.1)):

      def above_any_confidence(config, threshold=threshold):
        for stage in config["stages"]:
          stage["threshold"] = threshold if threshold is not None else stage["threshold"]
      path = local_config(tmp / f"{label}.yaml", server, small=dict(batch_size=4),
                          frontier=dict(batch_size=4), edit=above_any_confidence)
      out[label] = str(tmp / label)
      summary = launcher.launch("tickets", [
          "--bootstrap-servers", broker.bootstrap_servers, "--topic", name, "--output",
          out[label], "--config", path, "--commit-offsets", "never"])
      assert summary.exit_code == 0 and summary.rows_written == 40
  return out


def test_frontier_only_numbers_equal_the_measured_run(runs, read_duckdb):
  rep = build_report(runs["routed"], str(LABELS), frontier_only=runs["frontier_only"],
                     resamples=50, charts=False)
  point = rep["stages"]["classify"]["frontier_only_point"]
  # Independently: the frontier-only run's classify labels against the labels, with DuckDB.
  rows = read_duckdb(f"{runs['frontier_only']}/results", f"""
      SELECT t.label = l.category AS correct, s.frontier_cost_usd AS cost, s.final_tier
      FROM (SELECT ticket_id, label, unnest(stages) AS s FROM t) t
      JOIN read_json_auto('{LABELS}') l USING (ticket_id) WHERE s.stage = 'classify'""")
  assert {r["final_tier"] for r in rows} == {"frontier"}
  assert point["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
  assert point["cost_per_1k"] == pytest.approx(1000 * sum(r["cost"] for r in rows) / len(rows))
  assert point["source"].startswith("measured")
  assert rep["stages"]["classify"]["quality"]["frontier_only_accuracy"] == point["accuracy"]
  total = read_duckdb(f"{runs['frontier_only']}/results",
                      "SELECT sum(frontier_cost_usd) AS usd FROM t")[0]["usd"]
  assert rep["cost"]["frontier_only_measured_usd"] == pytest.approx(total)
  # Savings (and their interval) are against that measured cost, not the ledger's estimate.
  assert rep["cost"]["frontier_only_usd"] == pytest.approx(total)
  routed = read_duckdb(f"{runs['routed']}/results", "SELECT sum(cost_usd) AS usd FROM t")[0]["usd"]
  assert rep["cost"]["savings_pct"] == pytest.approx(100 * (1 - routed / total))
  ci = rep["bootstrap"]["intervals"]["savings_pct"]
  assert ci["lo"] <= rep["cost"]["savings_pct"] <= ci["hi"]
  by_stage = read_duckdb(f"{runs['frontier_only']}/results", """
      SELECT s.stage, sum(s.frontier_cost_usd) AS usd FROM (SELECT unnest(stages) AS s FROM t)
      GROUP BY 1""")
  for row in by_stage:
    assert rep["stages"][row["stage"]]["cost"]["frontier_only_usd"] == pytest.approx(row["usd"])
  assert any("frontier-only run's billed frontier cost for the 40 of 40" in n
             for n in rep["notes"])


def test_without_a_frontier_only_run_its_quality_is_unknown(runs):
  rep = build_report(runs["routed"], str(LABELS), resamples=50, charts=False)
  assert rep["stages"]["classify"]["frontier_only_point"]["accuracy"] is None
  assert any("frontier-only quality is unknown" in n for n in rep["notes"])


def test_uncertified_calibration_and_full_escalation_get_banners(runs, tmp_path, capsys):
  cal = tmp_path / "cal.json"
  from tierflow import calibrate_command
  code = calibrate_command.main(["--labels", str(LABELS), "--from-output", runs["routed"],
                                 "--alpha", "0.001", "--out", str(cal)])
  assert code in (0, 3)
  calibration = Calibration.load(str(cal))
  assert not all(sc.certified for sc in calibration.stages.values())
  out = str(tmp_path / "rep")
  assert report_command.main([runs["frontier_only"], "--labels", str(LABELS), "--out", out,
                              "--calibration", str(cal), "--resamples", "50"]) == 0
  printed = capsys.readouterr().out
  assert "did not certify" in printed and "every record was escalated" in printed
  page = (pathlib.Path(out) / "report.html").read_text()
  assert 'class="banner"' in page and "NOT certified" in page
  rep = build_report(runs["frontier_only"], str(LABELS), calibration=str(cal), resamples=50,
                     charts=False)
  stage = next(n for n, sc in calibration.stages.items() if not sc.certified)
  c = rep["calibration"]["stages"][stage]
  assert (c["alpha"], c["certified"]) == (0.001, False) and math.isinf(c["threshold"])
