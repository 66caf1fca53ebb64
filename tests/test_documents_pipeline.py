"""The documents pipeline end to end: real broker, real SDKs over HTTP, Parquet read by DuckDB."""

import pathlib
import re

import pytest
import yaml

from tierflow import launcher, schemas
from tierflow_local.loader import publish
from tierflow_local.provider_server import LocalProviderServer
from tierflow_local.standin_model import KeywordStandIn

KEY = "sk-test-documents-7c1e"
T0_MS = 1_717_200_000_000  # 2024-06-01T00:00:00Z
LABELS = {"business", "entertainment", "politics", "sport", "tech"}
MAX_WORDS = 12  # below the first sentence of most articles: the limit must reach the model

# (doc_id, topic, title, text). The stand-in scores topics by keywords: articles
# with one keyword are uncertain on the small tier (p ~ 0.53 < 0.6) and escalate;
# the last one opens with a sentence that has no content words, so its summary
# scores 0 and escalates too.
ARTICLES = [
    ("news-001", "business", "Bank profit beats forecasts",
     "The bank reported a record profit as sales rose across the region. Shares climbed."),
    ("news-002", "business", "Retail sales slow",
     "Retail sales fell for a third month, the firm said, as the economy cooled. Its shares dipped."),
    ("news-003", "business", "Quiet day for traders",
     "Traders were cautious ahead of the holiday and the market closed slightly higher."),
    ("news-004", "entertainment", "Film wins top award",
     "The film took the top award at the festival, and its lead actor thanked the cast."),
    ("news-005", "entertainment", "Band returns with album",
     "The band released its first album in ten years, and fans queued for the music."),
    ("news-006", "politics", "Minister resigns",
     "The minister resigned after a row inside the government over the budget vote."),
    ("news-007", "politics", "Election date set",
     "The party confirmed the election will be held in May, the government said."),
    ("news-008", "sport", "Late goal seals cup tie",
     "The team won the cup match with a late goal, and the coach praised every player."),
    ("news-009", "sport", "Coach extends contract",
     "He signed a new deal through 2027, keeping him at the club."),
    ("news-010", "tech", "New phone software update",
     "The software update gives mobile users faster internet on older handsets."),
    ("news-011", "tech", "Digital ID scheme",
     "A digital identity scheme will let users prove their age online."),
    ("news-012", "tech", "It is as it is",
     "It is as it is. The software glitch behind the outage is fixed."),
]
UNCERTAIN_TOPIC = {"news-003", "news-009", "news-012"}


def _words(text):
  return set(re.findall(r"\w+", text.casefold()))


def _documents():
  return [{"doc_id": d, "created_at": T0_MS + i * 60_000, "title": title, "text": text,
           "source": None if i % 3 == 0 else f"wire-{i % 2}"}
          for i, (d, _, title, text) in enumerate(ARTICLES)]


@pytest.fixture
def endpoints():
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier"),
                           openai_api_key=KEY, anthropic_api_key=KEY) as s:
    yield s


@pytest.fixture
def run_documents(broker, topic, output_dir, endpoints, tmp_path, monkeypatch):
  monkeypatch.setenv("TIERFLOW_TEST_KEY", KEY)

  def run(fmt="json"):
    name = topic(partitions=2)
    docs = _documents()
    publish(broker.bootstrap_servers, name, docs, fmt=fmt, schema="document")
    config = yaml.safe_load(
        (pathlib.Path(__file__).parents[1] / "tierflow/data/documents.yaml").read_text())
    config["budget_usd"] = None
    config["models"]["small"].update(
        base_url=endpoints.openai_base_url, model="small", api_key_env="TIERFLOW_TEST_KEY",
        price_as="gpt-5-nano", batch_size=4, concurrency=2, max_retries=1)
    config["models"]["frontier"].update(
        provider="anthropic", base_url=endpoints.anthropic_base_url, model="frontier",
        api_key_env="TIERFLOW_TEST_KEY", price_as="claude-sonnet-4-6", batch_size=3,
        max_retries=1)
    [summarise] = [s for s in config["stages"] if s["kind"] == "summarise"]
    summarise["max_words"] = MAX_WORDS
    path = tmp_path / "documents.yaml"
    path.write_text(yaml.safe_dump(config))
    summary = launcher.launch("documents", [
        "--bootstrap-servers", broker.bootstrap_servers, "--topic", name, "--format", fmt,
        "--output", output_dir, "--config", str(path)])
    return summary, name, docs

  return run


def _check_ledger(rows):
  for r in rows:
    assert [s["stage"] for s in r["stages"]] == ["classify", "summarise"]
    assert r["cost_usd"] == pytest.approx(sum(s["cost_usd"] for s in r["stages"]))
    assert r["cost_usd"] == pytest.approx(r["small_cost_usd"] + r["frontier_cost_usd"])
    assert r["frontier_only_cost_usd"] > 0
    assert r["escalated"] == any(s["escalated"] for s in r["stages"])
    assert len(r["escalation_reasons"]) == sum(s["escalated"] for s in r["stages"])
    for s in r["stages"]:
      assert s["small_input_tokens"] > 0 and s["small_cost_usd"] > 0
      assert s["small_error"] is None and s["frontier_error"] is None
      if s["escalated"]:
        assert s["confidence"] < s["threshold"], (r["doc_id"], s)
        assert s["final_tier"] == "frontier" and s["frontier_model"] == "frontier"
        assert s["frontier_input_tokens"] + s["frontier_cache_read_tokens"] \
            + s["frontier_cache_write_tokens"] > 0
        assert s["frontier_cost_usd"] > 0
      else:
        assert s["confidence"] >= s["threshold"], (r["doc_id"], s)
        assert s["final_tier"] == "small" and s["frontier_cost_usd"] == 0
      assert s["cost_usd"] == pytest.approx(s["small_cost_usd"] + s["frontier_cost_usd"])


@pytest.mark.parametrize("fmt", ["json", "avro"])
def test_every_document_is_labelled_and_summarised_with_a_ledger(run_documents, read_duckdb,
                                                                 fmt):
  summary, name, docs = run_documents(fmt)
  assert (summary.rows_written, summary.dead_letters) == (len(docs), 0)
  rows = read_duckdb(f"{summary.output}/results")
  assert read_duckdb(f"{summary.output}/dead_letter") == []
  assert sorted(r["doc_id"] for r in rows) == [d["doc_id"] for d in docs]
  assert len({r["record_id"] for r in rows}) == len(docs)
  assert set(schemas.field_names(schemas.load("result"))) <= set(rows[0])
  by_id = {d["doc_id"]: d for d in docs}
  topics = {d: t for d, t, _, _ in ARTICLES}
  for r in rows:
    d = by_id[r["doc_id"]]
    assert (r["title"], r["text"], r["source"]) == (d["title"], d["text"], d["source"])
    assert r["kafka_topic"] == name and r["dt"] == "2024-06-01"
    assert r["status"] == "ok" and r["error"] is None
    assert r["label"] in LABELS and r["label"] == topics[r["doc_id"]], r["doc_id"]
    assert r["summary"] and 1 <= len(r["summary"].split()) <= MAX_WORDS
    assert _words(r["summary"]) <= _words(d["title"] + " " + d["text"])  # its own summary
    [classify] = [s for s in r["stages"] if s["stage"] == "classify"]
    assert r["label_confidence"] == (None if classify["escalated"] else classify["confidence"])
  _check_ledger(rows)
  escalated = {r["doc_id"]: {s["stage"] for s in r["stages"] if s["escalated"]} for r in rows}
  assert {d for d, stages in escalated.items() if "classify" in stages} == UNCERTAIN_TOPIC
  assert escalated["news-012"] == {"classify", "summarise"}
  saved = read_duckdb(f"{summary.output}/results",
                      "SELECT sum(frontier_only_cost_usd) - sum(cost_usd) AS saved FROM t")
  assert saved[0]["saved"] > 0
