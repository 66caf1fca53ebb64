"""Several samples per record on the small tier (``samples``): the answer the samples agree
on is kept, with the share that agree as its confidence, and every sample is billed."""

import copy
import math
import pathlib

import pytest
import yaml
from pydantic import ValidationError

from tierflow import launcher
from tierflow.config import ModelConfig, StageConfig, load_config
from tierflow.connectors.llm_clients import ModelClient
from tierflow.pipelines.agreement import combine
from tierflow.pipelines.ledger import TierOutcome
from tierflow.pipelines.prompts import render_text
from tierflow.prices import Usage, load_price_book
from local_config import local_config
from tierflow_local.loader import publish, sample_tickets
from tierflow_local.provider_server import LocalProviderServer
from tierflow_local.standin_model import KeywordStandIn

ROOT = pathlib.Path(__file__).parents[1]
BUNDLED = yaml.safe_load((ROOT / "tierflow/data/tickets.yaml").read_text())
_DEFAULTS = load_config(str(ROOT / "tierflow/data/tickets.yaml"))
SMALL, FRONTIER = _DEFAULTS.small.model, _DEFAULTS.frontier.model  # gpt-5-nano, claude-...

CLASSIFY = StageConfig(name="c", kind="classify", labels=["billing", "shipping", "other"])
EXTRACT = StageConfig(name="e", kind="extract",
                      fields={"order_id": {}, "amount": {"type": "number"}})
SUMMARISE = StageConfig(name="s", kind="summarise")


def _o(value=None, confidence=None, error=None, tokens=(10, 2), cost=0.001, signal="verbalised"):
  return TierOutcome("small", "m", value, confidence, signal, (), error, Usage(*tokens), cost)


# --- combining samples -----------------------------------------------------------------
def test_the_majority_answer_is_kept_at_the_share_that_agree_times_their_confidence():
  out = combine(CLASSIFY.kind_impl, [_o("shipping", 0.9), _o("billing", 0.8),
                                     _o("billing", 0.6)])
  assert out.value == "billing" and out.signal == "agreement"
  assert out.confidence == pytest.approx(2 / 3 * 0.7)
  assert out.notes[0] == "2 of 3 samples give this answer"
  # Every sample is billed; one answer's tokens stay apart for the frontier-only estimate.
  assert out.usage == Usage(30, 6) and out.cost_usd == pytest.approx(0.003)
  assert out.sample_usage == Usage(10, 2)


def test_a_failed_sample_agrees_with_nothing_and_a_tie_keeps_the_first():
  out = combine(CLASSIFY.kind_impl, [_o(error="server_error: HTTP 500", tokens=(0, 0), cost=0),
                                     _o("other", 0.9), _o("billing", 0.9)])
  assert out.value == "other" and out.confidence == pytest.approx(0.9 / 3)
  assert out.notes[0] == "1 of 3 samples give this answer, 1 failed"
  failed = combine(CLASSIFY.kind_impl, [_o(error="timeout", tokens=(0, 0), cost=0)] * 2)
  assert failed.error == "timeout" and failed.notes[0] == "all 2 samples failed"


def test_agreement_is_a_signal_where_the_model_gives_none():
  out = combine(CLASSIFY.kind_impl, [_o("other", None, signal=""), _o("other", None, signal="")])
  assert out.confidence == 1.0 and out.signal == "agreement"


def test_extraction_samples_agree_field_by_field():
  def ex(order, amount, p=0.9):
    return _o({"fields": {"order_id": order, "amount": amount},
               "field_confidence": {"order_id": p, "amount": p}}, p, signal="logprob")
  out = combine(EXTRACT.kind_impl, [ex("NW-12345", 20.0), ex("NW-12345", 25.0),
                                    ex("NW-12345", 20.0)])
  assert out.value["fields"] == {"order_id": "NW-12345", "amount": 20.0}
  assert out.value["field_confidence"] == pytest.approx({"order_id": 0.9, "amount": 0.6})
  # The record: the least field, and at most its own confidence times the share that agree
  # (1 + 1/2 + 1) / 3 of the fields.
  assert out.confidence == pytest.approx(min(0.6, 0.9 * 2.5 / 3))


def test_summaries_agree_by_their_words():
  kind = SUMMARISE.kind_impl
  a, b, c = ("Customer wants a refund for a broken lamp.",
             "The customer wants a refund for the broken lamp.",
             "Asks where the parcel is.")
  assert kind.agreement(a, b) > 0.7 and kind.agreement(a, c) == 0.0
  out = combine(kind, [_o(c, 0.9, signal="checks"), _o(a, 0.8, signal="checks"),
                       _o(b, 0.8, signal="checks")])
  assert out.value == a  # the medoid, not the first
  assert out.confidence == pytest.approx(0.8 * (1 + kind.agreement(a, b)) / 3)


# --- configuration ---------------------------------------------------------------------
def test_samples_need_sampling_and_belong_to_the_small_tier(tmp_path):
  with pytest.raises(ValidationError, match="temperature 0 gives the same answer"):
    ModelConfig(provider="openai", model="gpt-4.1-nano", samples=3, temperature=0)
  body = lambda **kw: ModelClient(ModelConfig(provider="openai", model="gpt-4.1-nano",
                                              api_key_env=None, **kw)).request_openai(
      "s", "u", 10, top_logprobs=0)
  assert body()["temperature"] == 0.0
  assert "temperature" not in body(samples=3)  # the model's own default: it samples
  assert body(samples=3, temperature=0.7)["temperature"] == 0.7
  config = copy.deepcopy(BUNDLED)
  config["models"]["frontier"]["samples"] = 2
  path = tmp_path / "c.yaml"
  path.write_text(yaml.safe_dump(config))
  with pytest.raises(ValueError, match="samples apply to the small tier"):
    load_config(str(path))


# --- through the pipeline, against the strict emulated gpt-5-nano ---------------------
def _run(broker, topic, output_dir, server, tmp_path, n=24, **small):
  """The bundled tickets pipeline over ``n`` tickets, its small tier (gpt-5-nano unless
  ``small`` says otherwise) and frontier on ``server``."""
  config = local_config(
      tmp_path / f"tickets-{len(list(tmp_path.iterdir()))}.yaml", server,
      small={"model": SMALL, "batch_size": 4, "concurrency": 2, "max_retries": 0,
             "breaker_failures": 0, **small},
      frontier=dict(model=FRONTIER, batch_size=4, max_retries=1))
  name = topic(partitions=1)
  publish(broker.bootstrap_servers, name, sample_tickets()[:n])
  return launcher.launch("tickets", ["--bootstrap-servers", broker.bootstrap_servers,
                                     "--topic", name, "--output", output_dir,
                                     "--config", config])


_STAGES = "SELECT ticket_id, s.* FROM (SELECT ticket_id, unnest(stages) AS s FROM t)"


def test_samples_through_strict_endpoints_bill_every_request(broker, topic, output_dir,
                                                             tmp_path, read_duckdb):
  with LocalProviderServer(KeywordStandIn(sampling=True, seed=7), models=(SMALL, FRONTIER),
                           emulate=("*",)) as s:
    one = _run(broker, topic, str(tmp_path / "one"), s, tmp_path, samples=1)
    small_one = sum(r.model == SMALL for r in s.requests)
    three = _run(broker, topic, output_dir, s, tmp_path, samples=3)
    small_three = sum(r.model == SMALL for r in s.requests) - small_one
    statuses = {r.status for r in s.requests}
  assert statuses == {200}, "a request the real provider would refuse"
  assert one.exit_code == three.exit_code == 0 and three.rejected == (0, 0)
  assert small_one == 3 * 6 and small_three == 3 * small_one  # 3 stages x 6 packs, x3
  a = {(r["ticket_id"], r["stage"]): r for r in read_duckdb(f"{tmp_path}/one/results", _STAGES)}
  b = {(r["ticket_id"], r["stage"]): r for r in read_duckdb(f"{output_dir}/results", _STAGES)}
  assert a.keys() == b.keys() and len(b) == 24 * 3
  book = load_price_book()
  small, frontier = book.price("gpt-5-nano"), book.price("claude-sonnet-4-6")
  for key, row in b.items():
    assert row["confidence_signal"] == "agreement" and row["small_error"] is None
    # Three identical prompts: exactly three times the input tokens, all billed.
    assert row["small_input_tokens"] == 3 * a[key]["small_input_tokens"]
    summed = Usage(row["small_input_tokens"], row["small_output_tokens"],
                   row["small_cache_read_tokens"], row["small_cache_write_tokens"],
                   row["small_reasoning_tokens"])
    assert row["small_cost_usd"] == pytest.approx(small.cost(summed))
    if not row["escalated"]:  # frontier-only estimate: one answer's tokens, not three
      assert (frontier.cost(Usage(a[key]["small_input_tokens"], 0))
              <= row["frontier_only_cost_usd"] < 0.6 * frontier.cost(summed))
  # The stand-in draws each label from a distribution it also states (2 decimals), so a
  # kept label's confidence is that stated probability times 1/3, 2/3 or 3/3 of the samples.
  standin, labels = KeywordStandIn(), BUNDLED["stages"][0]["labels"]
  texts = {t["ticket_id"]: render_text(BUNDLED["input"]["text"], t) for t in sample_tickets()}
  shares = []
  for (ticket, st), row in b.items():
    if st == "classify":
      stated = dict(standin.classify(labels, texts[ticket])[1])[row["small_answer"]]
      shares.append(row["confidence"] / round(math.exp(stated), 2))
  assert all(min(abs(x - f) for f in (1 / 3, 2 / 3, 1)) < 1e-6 for x in shares), shares
  assert any(x < 0.99 for x in shares), "the samples never disagreed"
  assert any(r["final_tier"] == "small" for (_, st), r in b.items() if st == "classify")
  # The report says what escalation was decided on.
  from tierflow.report import build_report
  report = build_report(output_dir, out_dir=str(tmp_path / "report"), charts=False)
  assert {n: s["signals"] for n, s in report["stages"].items()} == {
      "classify": ["agreement"], "extract": ["agreement"], "summarise": ["agreement"]}
  assert "<td>agreement</td>" in (tmp_path / "report" / "report.html").read_text()


def test_a_failed_sample_lowers_confidence_and_nothing_is_dropped(broker, topic, output_dir,
                                                                 tmp_path, read_duckdb):
  """The stand-in answers alike every time, so a classify confidence is what one sample
  says, times 1 (both answered) or 1/2 (one failed); with both failed the record escalates."""
  with LocalProviderServer(KeywordStandIn(), models=(SMALL, FRONTIER), emulate=("*",)) as s:
    _run(broker, topic, str(tmp_path / "one"), s, tmp_path, samples=1)
    s.faults.add("server_error", count=-1, model=SMALL, probability=0.3, seed=3)
    summary = _run(broker, topic, output_dir, s, tmp_path, samples=2)
    failed = sum(r.status == 500 for r in s.requests)
  assert failed > 0 and summary.rows_written == 24
  said = {r["ticket_id"]: r["confidence"]
          for r in read_duckdb(f"{tmp_path}/one/results", _STAGES) if r["stage"] == "classify"}
  rows = read_duckdb(f"{output_dir}/results", _STAGES)
  assert len(rows) == 24 * 3
  halved = 0
  for row in rows:
    if row["small_error"] is not None:  # both samples failed: escalated, nothing billed
      assert row["escalated"] and row["small_cost_usd"] == 0
    elif row["stage"] == "classify":
      c = said[row["ticket_id"]]
      assert row["confidence"] in (pytest.approx(c), pytest.approx(c / 2))
      halved += row["confidence"] == pytest.approx(c / 2)
  assert halved, "no record lost a sample to the fault"


def test_serve_local_sampling_draws_labels_at_the_requests_temperature():
  import openai
  from tierflow_local import provider_server
  parser = provider_server._parser()
  server = provider_server._server_from_args(
      parser.parse_args(["--sampling", "--model", "gpt-4.1-nano"]), parser)
  messages = [{"role": "system", "content": "Classify the record into exactly one of these "
                                            "labels: billing, shipping."},
              {"role": "user", "content": 'Record:\n"refund the invoice for my late parcel"'
                                          "\n\nAnswer with the label only."}]
  with server:
    client = openai.OpenAI(api_key="k", base_url=server.openai_base_url, max_retries=0)
    def labels(**kw):
      return {client.chat.completions.create(model="gpt-4.1-nano", messages=messages,
                                             max_completion_tokens=5, **kw
                                             ).choices[0].message.content for _ in range(30)}
    assert labels() == {"billing", "shipping"}
    assert len(labels(temperature=0)) == 1


def test_samples_on_a_claude_small_tier_send_nothing_claude_refuses(broker, topic, output_dir,
                                                                   tmp_path, read_duckdb):
  """Claude takes no temperature and gives no logprobs: its samples are plain repeats, read
  at its own default temperature, and its stated confidence times their agreement."""
  haiku = "claude-haiku-4-5"
  with LocalProviderServer(KeywordStandIn(sampling=True, seed=2), models=(haiku, FRONTIER),
                           emulate=("*",)) as s:
    summary = _run(broker, topic, output_dir, s, tmp_path, n=12, provider="anthropic",
                   model=haiku, base_url=s.anthropic_base_url, price_as=haiku, samples=2)
    small = [r for r in s.requests if r.model == haiku]
    statuses = {r.status for r in s.requests}
  assert statuses == {200} and summary.exit_code == 0 and summary.rejected == (0, 0)
  assert len(small) == 2 * 3 * 3  # 2 samples x 3 stages x 3 packs
  assert not any("temperature" in r.body for r in small)
  rows = read_duckdb(f"{output_dir}/results", _STAGES)
  assert len(rows) == 36 and {r["confidence_signal"] for r in rows} == {"agreement"}
