"""The learned router: cross-fitted scores, the file, the guarantee by simulation, and the
pipeline deciding by its score."""

import json
import math
import pathlib

import numpy as np
import pytest

from tierflow import cli, launcher
from tierflow.calibration import Calibration, StageCalibration, calibrate_threshold
from tierflow.learned_router import LearnedRouter, fit_cross, half_of

LABELS = ("sport", "business", "tech")


def _world(rng, n):
  """Confidence means different things per label: 'business' answers are 15 points less
  reliable than 'sport' ones at the same confidence; 'tech' in between."""
  answers = rng.choice(LABELS, size=n, p=[0.4, 0.35, 0.25])
  c = 0.5 + 0.5 * rng.random(n)
  extra = np.select([answers == "business", answers == "tech"], [0.15, 0.06], 0.0)
  wrong = rng.random(n) < np.clip(0.4 * (1 - c) + extra, 0, 1)
  return c, answers, ~wrong


def _auroc(score, ok):
  order = np.argsort(score, kind="stable")
  ranks = np.empty(len(score))
  ranks[order] = np.arange(1, len(score) + 1)
  pos = ok.sum()
  return (ranks[ok].sum() - pos * (pos + 1) / 2) / (pos * (len(ok) - pos))


def test_half_of_is_a_fixed_balanced_function_of_the_features():
  assert half_of(0.91, "sport") == half_of(np.float64(0.91), "sport")
  halves = [half_of(c, a) for c in np.linspace(0, 1, 2000) for a in LABELS]
  assert 0.45 < np.mean(halves) < 0.55


def test_cross_fitted_scores_rank_errors_better_than_the_confidence():
  rng = np.random.default_rng(0)
  c, answers, ok = _world(rng, 1000)
  router, scores = fit_cross(c, answers, ok)
  assert router.labels == tuple(sorted(LABELS))
  # every record was scored by the model fitted on the other half
  for i in range(0, 1000, 97):
    assert scores[i] == pytest.approx(router.score(c[i], answers[i]))
  c2, a2, ok2 = _world(rng, 20000)
  assert _auroc(router.scores(c2, a2), ok2) > _auroc(c2, ok2) + 0.03


def _extraction_world(rng, n):
  """Extractions whose null destination makes an answer 25 points less reliable at the
  same confidence (the small tier missed it more often than the text lacked it)."""
  c = 0.5 + 0.5 * rng.random(n)
  null_to = rng.random(n) < 0.3
  null_day = rng.random(n) < 0.5
  wrong = rng.random(n) < np.clip(0.3 * (1 - c) + 0.25 * null_to, 0, 1)
  values = [{"fields": {"to_city": None if t else "denver", "day": None if d else "monday"},
             "field_confidence": {"to_city": 0.9, "day": 0.9}}
            for t, d in zip(null_to, null_day)]
  return c, values, ~wrong


def test_an_extraction_router_reads_the_null_fields_the_same_from_the_value_and_the_ledger():
  from tierflow.learned_router import answer_key
  value = {"fields": {"to_city": None, "day": "monday", "from_city": None},
           "field_confidence": {"to_city": 1.0, "day": 0.8, "from_city": 1.0}}
  ledger_text = json.dumps(value["fields"], sort_keys=True)  # Extract.answer_text
  assert answer_key(value) == answer_key(ledger_text) == ("from_city=null", "to_city=null")
  assert answer_key("sport") == ("sport",) and answer_key(None) == ()
  assert half_of(0.7, value) == half_of(0.7, ledger_text)
  rng = np.random.default_rng(3)
  c, values, ok = _extraction_world(rng, 1200)
  texts = [json.dumps(v["fields"], sort_keys=True) for v in values]
  router, scores = fit_cross(c, texts, ok)  # fitted on the ledger's text
  assert router.labels == ("day=null", "to_city=null")
  for i in range(0, 1200, 101):  # applied to the pipeline's values, the same score
    assert router.score(c[i], values[i]) == pytest.approx(scores[i])
  c2, v2, ok2 = _extraction_world(rng, 20000)
  assert _auroc(router.scores(c2, v2), ok2) > _auroc(c2, ok2) + 0.05


def test_an_extraction_router_uses_each_fields_confidence_from_the_ledger():
  """The stage's confidence is the least field confidence; when one field's confidence says
  more about being wrong than the other's, a router that has them (the ledger's
  small_field_confidence) ranks errors better than one with the least alone, and scores the
  pipeline's value as it scored the ledger's row. Its file keeps the fields."""
  from tierflow.learned_router import ledger_answer

  def world(rng, n):
    p_to, p_day = 0.5 + 0.5 * rng.random(n), 0.5 + 0.5 * rng.random(n)
    wrong = rng.random(n) < 0.7 * (1 - p_to) + 0.02 * (1 - p_day)
    values = [{"fields": {"to_city": "denver", "day": "monday"},
               "field_confidence": {"to_city": float(a), "day": float(b)}}
              for a, b in zip(p_to, p_day)]
    return np.minimum(p_to, p_day), values, ~wrong

  rng = np.random.default_rng(5)
  c, values, ok = world(rng, 1500)
  rows = [ledger_answer(json.dumps(v["fields"], sort_keys=True),
                        json.dumps(v["field_confidence"], sort_keys=True)) for v in values]
  router, scores = fit_cross(c, rows, ok)
  assert router.fields == ("day", "to_city")
  for i in range(0, 1500, 149):
    assert router.score(c[i], values[i]) == pytest.approx(scores[i])
  plain, _ = fit_cross(c, [json.dumps(v["fields"]) for v in values], ok)  # without them
  assert plain.fields == ()
  c2, v2, ok2 = world(rng, 20000)
  assert _auroc(router.scores(c2, v2), ok2) > _auroc(plain.scores(c2, v2), ok2) + 0.05
  again = LearnedRouter.from_dict(json.loads(json.dumps(router.to_dict())))
  assert again == router and "fields" not in plain.to_dict()


def test_the_router_survives_the_calibration_file_and_bad_ones_are_refused(tmp_path):
  rng = np.random.default_rng(1)
  c, answers, ok = _world(rng, 600)
  router, scores = fit_cross(c, answers, ok)
  sc = calibrate_threshold(scores, ok, 0.2, 0.1, stage="classify")
  sc = StageCalibration(**{**sc.to_dict(), "threshold": sc.threshold,
                           "router": router.to_dict()})
  cal = Calibration.create({"classify": sc}, {"classify": (c, ok)}, source="test")
  cal.save(tmp_path / "cal.json")
  back = Calibration.load(tmp_path / "cal.json").stages["classify"]
  assert LearnedRouter.from_dict(back.router) == router
  doc = router.to_dict()
  for bad, match in [({**doc, "kind": "forest"}, "unknown router kind"),
                     ({**doc, "labels": ["a"]}, "does not match"),
                     ({k: v for k, v in doc.items() if k != "l2"}, "missing"),
                     ({**doc, "models": [doc["models"][0]]}, "exactly two")]:
    with pytest.raises(ValueError, match=match):
      StageCalibration(**{**sc.to_dict(), "threshold": sc.threshold, "router": bad})


def test_too_few_errors_in_a_half_refuses_a_router():
  c = np.linspace(0.5, 1, 200)
  ok = np.ones(200, bool)
  ok[:8] = False
  with pytest.raises(ValueError, match="needs >= 10 right and >= 10 wrong"):
    fit_cross(c, ["sport"] * 200, ok)


@pytest.mark.slow
def test_the_guarantee_holds_on_cross_fitted_scores_by_simulation():
  """Calibrate on 500 labels per draw with the router, then take the exact selective risk
  over a large population scored by that router: it exceeds alpha in <= delta of draws,
  and the router keeps more than the raw confidence does."""
  rng = np.random.default_rng(2)
  pop_c, pop_a, pop_ok = _world(rng, 200_000)
  pop_half = np.array([half_of(c, a) for c, a in zip(pop_c, pop_a)])
  alpha, delta, draws = 0.1, 0.1, 300
  violations, kept_router, kept_raw = 0, [], []
  for _ in range(draws):
    c, a, ok = _world(rng, 500)
    router, scores = fit_cross(c, a, ok)
    t = calibrate_threshold(scores, ok, alpha, delta).threshold
    keep = router.scores(pop_c, pop_a, pop_half) >= t
    if keep.any() and (~pop_ok[keep]).mean() > alpha:
      violations += 1
    kept_router.append(keep.mean())
    kept_raw.append((pop_c >= calibrate_threshold(c, ok, alpha, delta).threshold).mean())
  print(violations, np.mean(kept_router), np.mean(kept_raw))
  assert violations / draws <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)
  assert np.mean(kept_router) > np.mean(kept_raw) + 0.05


DATA = pathlib.Path(__file__).parents[1] / "deploy/local/data"


@pytest.mark.slow
def test_calibrate_with_a_router_and_the_run_escalates_by_its_score(
    broker, topic, output_dir, tmp_path, read_duckdb):
  from local_config import local_config
  from tierflow_local.loader import publish, sample_tickets
  from tierflow_local.provider_server import LocalProviderServer
  from tierflow_local.standin_model import KeywordStandIn
  tickets = sample_tickets()
  records = tmp_path / "records.jsonl"
  records.write_text("".join(json.dumps(t) + "\n" for t in tickets))
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier")) as endpoints:
    config = local_config(tmp_path / "tickets.yaml", endpoints,
                          small=dict(batch_size=8, concurrency=2, max_retries=1),
                          frontier=dict(batch_size=8, max_retries=1))
    cal_path = tmp_path / "cal.json"
    assert cli.main(["calibrate", "--run", "tickets", "--records", str(records), "--config",
                     config, "--labels", str(DATA / "sample_tickets_labels.jsonl"),
                     "--work-dir", str(tmp_path / "work"), "--stage", "classify",
                     "--alpha", "0.3", "--router", "logistic", "--out", str(cal_path)]) == 0
    sc = Calibration.load(cal_path).stages["classify"]
    assert sc.router is not None and sc.certified and "learned router" in sc.reason
    router = LearnedRouter.from_dict(sc.router)
    name = topic(partitions=2)
    publish(broker.bootstrap_servers, name, tickets[:80])
    summary = launcher.launch("tickets", [
        "--bootstrap-servers", broker.bootstrap_servers, "--topic", name, "--output",
        output_dir, "--config", config, "--calibration", str(cal_path)])
    assert summary.exit_code == 0
  rows = read_duckdb(f"{output_dir}/results", """
      SELECT s.confidence, s.small_answer, s.route_score, s.threshold, s.escalated,
             s.escalation_reason, s.small_error
      FROM (SELECT unnest(stages) AS s FROM t) WHERE s.stage = 'classify'""")
  assert len(rows) == 80
  decided = [r for r in rows if r["small_error"] is None and r["confidence"] is not None]
  assert decided
  for r in decided:
    assert r["threshold"] == sc.threshold
    assert r["route_score"] == pytest.approx(router.score(r["confidence"], r["small_answer"]),
                                             abs=1e-12)
    assert r["escalated"] == (r["route_score"] < sc.threshold)
    if r["escalated"]:
      assert "learned router score" in r["escalation_reason"]
  # the router changed some decisions the raw confidence would have made
  assert any((r["confidence"] >= sc.threshold) != (r["route_score"] >= sc.threshold)
             for r in decided)
  # the report's threshold curve is over the score that decided
  from tierflow.report import build_report
  rep = build_report(output_dir, str(DATA / "sample_tickets_labels.jsonl"),
                     out_dir=str(tmp_path / "report"), resamples=50)
  chosen = rep["stages"]["classify"]["threshold_curve"]["chosen_point"]
  assert chosen["escalated"] == sum(r["escalated"] for r in rows if r["small_error"] is None
                                    and r["confidence"] is not None) + sum(
      1 for r in rows if r["small_error"] is not None or r["confidence"] is None)
