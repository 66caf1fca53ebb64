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
from two_tiers import TwoTiers

ROOT = pathlib.Path(__file__).parents[1]
LABELS = ROOT / "deploy/local/data/sample_tickets_labels.jsonl"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tansu_broker):
  """A routed run and a frontier-only run (every threshold above any confidence) of the
  same 40 tickets, and a frontier-only run of them from another topic (other Kafka ids)."""
  tmp = tmp_path_factory.mktemp("fo")
  broker = tansu_broker
  name = f"report-fo-{tmp.name}"
  topics = {"routed": name, "frontier_only": name, "frontier_only_elsewhere": name + "-copy"}
  for topic in (name, name + "-copy"):
    broker.create_topic(topic, 2)
    publish(broker.bootstrap_servers, topic, sample_tickets()[:40])
  with LocalProviderServer(TwoTiers(), models=("small", "frontier")) as server:
    out = {}
    for label, threshold in (("routed", None), ("frontier_only", math.inf),
                             ("frontier_only_elsewhere", math.inf)):

      def above_any_confidence(config, threshold=threshold):
        for stage in config["stages"]:
          stage["threshold"] = threshold if threshold is not None else stage["threshold"]
      path = local_config(tmp / f"{label}.yaml", server, small=dict(batch_size=4),
                          frontier=dict(batch_size=4), edit=above_any_confidence)
      out[label] = str(tmp / label)
      summary = launcher.launch("tickets", [
          "--bootstrap-servers", broker.bootstrap_servers, "--topic", topics[label], "--output",
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
  assert rep["cost"]["savings_quality"].endswith("frontier-only quality unknown (no "
                                                 "frontier-only run)")
  assert rep["guarantee"][0].startswith("No error guarantee: the run used no calibration")


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


def test_curve_is_measured_wherever_a_frontier_only_run_answered(runs, read_duckdb):
  """With --frontier-only (from another topic: joined on ticket_id), no point of the
  threshold curve is estimated, and each point's accuracy is what DuckDB computes from the
  two runs' answers: the small answer where kept, the frontier's where escalated (the
  routed run's own frontier answer, else the frontier-only run's)."""
  fo = runs["frontier_only_elsewhere"]
  rep = build_report(runs["routed"], str(LABELS), frontier_only=fo, resamples=50,
                     charts=False)
  assert rep["inputs"]["frontier_only_joined_on"] == "ticket_id"
  assert rep["cost"]["frontier_only_source"] == "measured"
  rows = read_duckdb(f"{runs['routed']}/results", f"""
      WITH r AS (SELECT ticket_id, label, unnest(stages) AS s FROM t),
           f AS (SELECT ticket_id, label AS fo_label
                 FROM read_parquet('{fo}/results/**/*.parquet'))
      SELECT r.s.confidence AS c, r.s.small_error IS NOT NULL AS failed,
             r.s.small_answer = l.category AS small_ok,
             CASE WHEN r.s.final_tier = 'frontier' THEN r.label = l.category
                  ELSE f.fo_label = l.category END AS frontier_ok
      FROM r JOIN read_json_auto('{LABELS}') l USING (ticket_id) JOIN f USING (ticket_id)
      WHERE r.s.stage = 'classify'""")
  assert len(rows) == 40 and any(r["small_ok"] != r["frontier_ok"] for r in rows)
  curve = rep["stages"]["classify"]["threshold_curve"]
  assert curve["estimated_thresholds"] == 0
  assert not any(p["estimated"] for p in curve["points"])
  for p in curve["points"]:
    esc = [r["failed"] or r["c"] is None or r["c"] < p["threshold"] for r in rows]
    right = sum(r["frontier_ok"] if e else r["small_ok"] for r, e in zip(rows, esc))
    assert p["escalated"] == sum(esc)
    assert p["accuracy"] == pytest.approx(right / len(rows)), p
  # Without the frontier-only run the same points are estimated where nothing was measured.
  alone = build_report(runs["routed"], str(LABELS), resamples=50, charts=False)
  assert alone["stages"]["classify"]["threshold_curve"]["estimated_thresholds"] > 0
  assert alone["cost"]["frontier_only_source"] == "estimate"
