"""``tierflow calibrate`` end to end: small-tier answers in, a certified calibration file out,
and ``tierflow run --calibration`` applying it."""

import json
import math
import os
import pathlib
import re
import shutil

import numpy as np
import pytest

from tierflow import cli, launcher
from tierflow.calibration import Calibration, calibrate_threshold
from tierflow_local.loader import publish, sample_tickets
from local_config import local_config
from tierflow_local.provider_server import LocalProviderServer
from tierflow_local.standin_model import KeywordStandIn

DATA = pathlib.Path(__file__).parents[1] / "deploy/local/data"
LABELS = DATA / "sample_tickets_labels.jsonl"
ROOT = pathlib.Path(__file__).parents[1]


@pytest.fixture(scope="module")
def endpoints():
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier")) as s:
    yield s


@pytest.fixture
def config_file(endpoints, tmp_path):
  return local_config(tmp_path / "tickets.yaml", endpoints,
                      small=dict(batch_size=8, concurrency=2, max_retries=1),
                      frontier=dict(batch_size=8, max_retries=1))


def _records_file(tmp_path, n):
  path = tmp_path / "records.jsonl"
  path.write_text("".join(json.dumps(t) + "\n" for t in sample_tickets()[:n]))
  return str(path)


def _frontier_requests(endpoints):
  return [r for r in endpoints.requests if r.model == "frontier"]


def _independent_classify_data(read_duckdb, work):
  """(confidence, correct) of the classify stage, computed with DuckDB from the Parquet."""
  rows = read_duckdb(f"{work}/results", f"""
      SELECT t.ticket_id, s.confidence, s.small_answer, l.category
      FROM (SELECT ticket_id, unnest(stages) AS s FROM t) t
      JOIN read_json_auto('{LABELS}') l USING (ticket_id)
      WHERE s.stage = 'classify' ORDER BY t.ticket_id""")
  conf = np.array([0.0 if r["confidence"] is None else r["confidence"] for r in rows])
  correct = np.array([r["confidence"] is not None and r["small_answer"] == r["category"]
                      for r in rows])
  return conf, correct


def test_run_mode_certifies_thresholds_that_match_an_independent_computation(
    endpoints, config_file, tmp_path, read_duckdb, capsys):
  before = len(_frontier_requests(endpoints))
  work, out = tmp_path / "work", tmp_path / "calibration.json"
  code = cli.main(["calibrate", "--run", "tickets", "--records", _records_file(tmp_path, 120),
                   "--config", config_file, "--labels", str(LABELS), "--work-dir", str(work),
                   "--alpha", "0.2", "--alpha", "extract=0.3", "--delta", "0.1",
                   "--out", str(out)])
  printed = capsys.readouterr().out
  assert code == 0
  assert len(_frontier_requests(endpoints)) == before, "calibration must not call the frontier"
  cal = Calibration.load(out)
  assert set(cal.stages) == {"classify", "extract"}  # summaries cannot be exact-matched
  assert "summarise" in printed and "not scored" in printed
  c = cal.stages["classify"]
  assert (c.alpha, c.delta, c.n) == (0.2, 0.1, 120)
  conf, correct = _independent_classify_data(read_duckdb, work)
  expected = calibrate_threshold(conf, correct, 0.2, 0.1)
  assert c.certified and c.threshold == expected.threshold
  assert c.coverage == pytest.approx(float((conf >= c.threshold).mean()))
  kept = conf >= c.threshold
  assert c.empirical_risk == pytest.approx(float((~correct[kept]).mean()))
  assert cal.stages["extract"].alpha == 0.3
  assert c.expected_cost_per_1k > 0
  assert "small model(s)=small" in cal.source
  # The threshold holds for the signal it was calibrated on: the file says which.
  assert cal.source.endswith("; confidence signal(s)=logprob")
  assert f"threshold {c.threshold:g}" in printed


def test_from_output_reads_a_previous_runs_ledger(broker, topic, output_dir, config_file,
                                                 tmp_path, read_duckdb):
  name = topic(partitions=2)
  publish(broker.bootstrap_servers, name, sample_tickets()[:80])
  launcher.launch("tickets", ["--bootstrap-servers", broker.bootstrap_servers, "--topic", name,
                              "--output", output_dir, "--config", config_file])
  out = tmp_path / "cal.json"
  assert cli.main(["calibrate", "--from-output", output_dir, "--labels", str(LABELS),
                   "--stage", "classify", "--alpha", "0.25", "--out", str(out)]) == 0
  cal = Calibration.load(out)
  assert set(cal.stages) == {"classify"}
  # Escalated records carry the small tier's own answer, so all 80 are calibration data.
  conf, correct = _independent_classify_data(read_duckdb, output_dir)
  assert cal.stages["classify"].n == 80 == len(conf)
  assert cal.matches_data({"classify": (conf, correct)})
  assert cal.stages["classify"].threshold == calibrate_threshold(conf, correct, 0.25, 0.1).threshold
  assert cal.stages["classify"].signals == ("logprob",)
  # A threshold on this scale does not hold for another signal: refused before any request.
  other = config_file.replace(".yaml", "-samples.yaml")
  with open(config_file) as f, open(other, "w") as g:
    g.write(f.read().replace("top_logprobs: 10", "top_logprobs: 10\n    samples: 3"))
  with pytest.raises(ValueError, match="classify was calibrated on logprob confidences, but "
                     "the small tier asks 3 sample"):
    launcher.launch("tickets", ["--bootstrap-servers", "127.0.0.1:1", "--topic", "x",
                                "--output", str(tmp_path / "o"), "--config", other,
                                "--calibration", str(out)])


def test_too_small_sample_refuses_and_the_run_escalates_that_stage_everywhere(
    broker, topic, output_dir, config_file, tmp_path, read_duckdb, capsys):
  out = tmp_path / "cal.json"
  code = cli.main(["calibrate", "--run", "tickets", "--records", _records_file(tmp_path, 12),
                   "--config", config_file, "--labels", str(LABELS), "--stage", "classify",
                   "--alpha", "0.05", "--out", str(out), "--strict"])
  printed = capsys.readouterr().out
  # Without --work-dir the small tier's output goes to a temp dir that is kept and named.
  work = re.search(r"\(no escalation\) -> (\S+)", printed).group(1)
  assert os.path.isdir(f"{work}/results")
  shutil.rmtree(work)
  assert code == 3
  assert "NOT CERTIFIED" in printed and "too small" in printed
  cal = Calibration.load(out)
  assert not cal.stages["classify"].certified and cal.threshold("classify") == math.inf

  name = topic(partitions=1)
  publish(broker.bootstrap_servers, name, sample_tickets()[:10])
  launcher.launch("tickets", ["--bootstrap-servers", broker.bootstrap_servers, "--topic", name,
                              "--output", output_dir, "--config", config_file,
                              "--calibration", str(out)])
  rows = read_duckdb(f"{output_dir}/results", """
      SELECT calibration_version, s.threshold, s.escalated, s.final_tier
      FROM (SELECT calibration_version, unnest(stages) AS s FROM t) WHERE s.stage = 'classify'""")
  assert len(rows) == 10
  assert {r["calibration_version"] for r in rows} == {
      f"{cal.created_at}/{cal.data_hash[:12]}"}
  assert all(r["threshold"] == math.inf and r["escalated"] and r["final_tier"] == "frontier"
             for r in rows)


def _small_prompts(endpoints, since):
  """The system prompts of the small model's requests after the first ``since``."""
  return [json.dumps(r.body) for r in endpoints.requests[since:] if r.model == "small"]


def test_skip_small_when_uncertified_asks_the_small_tier_nothing_it_could_not_keep(
    broker, topic, output_dir, endpoints, config_file, tmp_path, read_duckdb, capsys):
  from tierflow.pipelines.ledger import SMALL_SKIPPED
  from tierflow.report import build_report

  cal = tmp_path / "cal.json"
  assert cli.main(["calibrate", "--run", "tickets", "--records", _records_file(tmp_path, 12),
                   "--config", config_file, "--labels", str(LABELS), "--stage", "classify",
                   "--alpha", "0.05", "--out", str(cal)]) == 0
  assert Calibration.load(cal).threshold("classify") == math.inf  # 12 records: too few
  name = topic(partitions=1)
  publish(broker.bootstrap_servers, name, sample_tickets()[:10])
  with pytest.raises(ValueError, match="needs --calibration"):
    launcher.launch("tickets", ["--bootstrap-servers", broker.bootstrap_servers, "--topic",
                                name, "--output", output_dir, "--config", config_file,
                                "--skip-small-when-uncertified"])
  since = len(endpoints.requests)
  summary = launcher.launch("tickets", [
      "--bootstrap-servers", broker.bootstrap_servers, "--topic", name, "--output", output_dir,
      "--config", config_file, "--calibration", str(cal), "--skip-small-when-uncertified"])
  assert summary.exit_code == 0 and summary.rows_written == 10
  small = _small_prompts(endpoints, since)
  assert small and not [p for p in small if "You triage customer support tickets" in p]
  assert [p for p in small if "You extract structured fields" in p]  # extract: asked
  rows = read_duckdb(f"{output_dir}/results", """
      SELECT status, s.stage, s.escalation_reason, s.escalated, s.final_tier, s.confidence,
             s.small_answer, s.small_cost_usd, s.frontier_cost_usd, s.cost_usd
      FROM (SELECT status, unnest(stages) AS s FROM t)""")
  classify = [r for r in rows if r["stage"] == "classify"]
  assert len(classify) == 10 and {r["status"] for r in rows} == {"ok"}
  for r in classify:  # said per stage, and the frontier's answer billed as before
    assert r["escalation_reason"] == SMALL_SKIPPED and r["escalated"]
    assert r["final_tier"] == "frontier" and r["confidence"] is None
    assert r["small_answer"] is None and r["small_cost_usd"] == 0
    assert r["frontier_cost_usd"] > 0 and r["cost_usd"] == r["frontier_cost_usd"]
  assert any(r["small_answer"] is not None for r in rows if r["stage"] == "extract")
  report = build_report(output_dir, str(LABELS), out_dir=str(tmp_path / "report"),
                        calibration=str(cal))
  esc = report["stages"]["classify"]["escalation"]
  assert esc["by_reason"]["small_skipped"] == 10 and esc["escalation_rate"] == 1.0
  assert report["stages"]["extract"]["escalation"]["by_reason"]["small_skipped"] == 0
  # Such an output holds no small answers for that stage: calibrating from it is refused.
  capsys.readouterr()
  assert cli.main(["calibrate", "--from-output", output_dir, "--labels", str(LABELS),
                   "--stage", "classify", "--out", str(tmp_path / "again.json")]) == 2
  assert "small tier was not asked on 10 labelled record(s)" in capsys.readouterr().err
  assert not (tmp_path / "again.json").exists()


def test_calibration_for_other_stages_is_refused(tmp_path, config_file):
  from tierflow.calibration import StageCalibration
  sc = calibrate_threshold([0.9] * 50, [True] * 50, 0.1, 0.1, stage="triage")
  cal = Calibration.create({"triage": sc}, {"triage": ([0.9] * 50, [True] * 50)}, source="t")
  path = tmp_path / "other.json"
  cal.save(path)
  with pytest.raises(ValueError, match="triage.*wrong file"):
    launcher.launch("tickets", ["--bootstrap-servers", "127.0.0.1:1", "--topic", "x",
                                "--output", str(tmp_path / "o"), "--config", config_file,
                                "--calibration", str(path)])
  assert isinstance(sc, StageCalibration)


@pytest.mark.parametrize("argv, message", [
    (["--labels", "x.jsonl"], "exactly one of"),
    (["--labels", "x.jsonl", "--run", "tickets"], "--records"),
    (["--labels", "x.jsonl", "--from-output", "d", "--records", "r"], "only go with --run"),
    (["--labels", "x.jsonl", "--from-output", "d", "--alpha", "a=b"], "STAGE=A"),
])
def test_bad_invocations_say_what_is_wrong(argv, message, capsys):
  assert cli.main(["calibrate", *argv]) == 2
  assert message in capsys.readouterr().err


def test_config_and_calibration_load_from_filesystem_urls(tmp_path, config_file):
  """Dataflow/Flink jobs point --config/--calibration at object storage through Beam's
  FileSystems (gs://, s3://); file:// URLs and plain paths are read directly."""
  from tierflow.config import load_config
  sc = calibrate_threshold([0.9] * 50, [True] * 50, 0.1, 0.1)
  cal = Calibration.create({"classify": sc}, {"classify": ([0.9] * 50, [True] * 50)}, source="t")
  cal.save(tmp_path / "cal.json")
  assert Calibration.load(f"file://{tmp_path}/cal.json").threshold("classify") == sc.threshold
  assert load_config(f"file://{config_file}") == load_config(config_file)
  with pytest.raises(ValueError, match="cannot read .*missing.json: No such file"):
    Calibration.load(f"file://{tmp_path}/missing.json")
  # Other schemes go through Beam's FileSystems (gs:// needs apache-beam[gcp] on the launcher).
  with pytest.raises(ValueError, match="cannot read nosuchfs://bucket/cal.json"):
    Calibration.load("nosuchfs://bucket/cal.json")


def test_the_expected_risk_mode_says_what_it_promises():
  from tierflow.calibrate_command import format_stage
  from tierflow.report import _banners
  rng = np.random.default_rng(3)
  c = rng.random(400)
  ok = rng.random(400) >= 0.3 * (1 - c)
  sc = calibrate_threshold(c, ok, 0.05, 0.1, method="crc", stage="classify")
  line = format_stage(sc)
  assert "EXPECTED share of records kept wrong" in line and "no 1-delta guarantee" in line
  report = {"stages": {}, "calibration": {"stages": {"classify": {
      "alpha": 0.05, "delta": 0.1, "n": 400, "certified": True, "method": "crc",
      "labels_to_certify": None}}}}
  [banner] = _banners(report)
  assert "expected-risk mode" in banner and "no 90%-confidence guarantee" in banner
