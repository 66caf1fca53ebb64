"""Requests real providers accept: parameters follow the model, never the base URL.

The local endpoints enforce the real rules (``--emulate``, ``provider_rules``), written
apart from tierflow's own capability table, so a request tierflow builds wrongly fails
here as it would on api.openai.com or api.anthropic.com.
"""

import copy
import pathlib
import time

import anthropic
import openai
import pytest
import yaml
from pydantic import ValidationError

from tierflow import launcher
from tierflow.config import ModelConfig, load_config
from tierflow.connectors.circuit_breaker import CircuitBreaker, CircuitOpen
from tierflow.connectors.llm_clients import ModelCallError, ModelClient
from tierflow.connectors.model_capabilities import capabilities
from tierflow_local.broker import free_port
from tierflow_local.loader import publish, sample_tickets
from tierflow_local.provider_server import LocalProviderServer
from tierflow_local.standin_model import KeywordStandIn

ROOT = pathlib.Path(__file__).parents[1]
BUNDLED = yaml.safe_load((ROOT / "tierflow/data/tickets.yaml").read_text())
_DEFAULTS = load_config(str(ROOT / "tierflow/data/tickets.yaml"))
SMALL, FRONTIER = _DEFAULTS.small.model, _DEFAULTS.frontier.model  # gpt-5-nano, claude-...


# --- what each model takes -------------------------------------------------------------
@pytest.mark.parametrize("provider, model, logprobs, temperature, limit, effort", [
    ("openai", "gpt-5-nano", False, False, "max_completion_tokens", "minimal"),
    ("openai", "gpt-5-mini-2025-08-07", False, False, "max_completion_tokens", "minimal"),
    ("openai", "gpt-5.1", False, False, "max_completion_tokens", "none"),
    ("openai", "o4-mini", False, False, "max_completion_tokens", "low"),
    ("openai", "gpt-4.1-nano", True, True, "max_completion_tokens", None),
    ("openai", "openai/gpt-5-nano", False, False, "max_completion_tokens", "minimal"),
    ("openai", "Qwen2.5-0.5B-Instruct", True, True, "max_tokens", None),
    ("anthropic", "claude-sonnet-4-6", False, False, "max_tokens", None),
    ("anthropic", "claude-haiku-4-5", False, False, "max_tokens", None),
])
def test_capabilities_by_model_name(provider, model, logprobs, temperature, limit, effort):
  caps = capabilities(provider, model)
  assert (caps.logprobs, caps.temperature, caps.token_limit, caps.cheapest_effort) == (
      logprobs, temperature, limit, effort)


@pytest.mark.parametrize("spec, message", [
    (dict(provider="openai", model="gpt-5-nano", logprobs=True), "returns no logprobs"),
    (dict(provider="openai", model="gpt-5-nano", temperature=0), "only its default temperature"),
    (dict(provider="openai", model="gpt-5-nano", reasoning_effort="none"), "not 'none'"),
    (dict(provider="openai", model="gpt-4.1-nano", reasoning_effort="low"), "does not reason"),
    (dict(provider="anthropic", model="claude-sonnet-4-6", logprobs=True), "no logprobs"),
    (dict(provider="anthropic", model="claude-opus-4-7", temperature=0.2), "temperature"),
    (dict(provider="openai", model="my-azure-deployment", behaves_as="gpt-5-nano",
          temperature=0), "only its default temperature"),
])
def test_settings_the_model_does_not_take_are_config_errors(spec, message):
  with pytest.raises(ValidationError, match=message):
    ModelConfig(**spec)


def _body(**spec) -> dict:
  return ModelClient(ModelConfig(**spec)).request_openai("sys", "user", 40, 5)


def test_request_shape_follows_the_model_not_the_url():
  for url in (None, "https://my-gateway.example/v1", "http://127.0.0.1:9/v1"):
    body = _body(provider="openai", model="gpt-5-nano", base_url=url)
    assert not {"temperature", "top_p", "logprobs", "top_logprobs", "max_tokens"} & set(body)
    assert body["reasoning_effort"] == "minimal" and body["max_completion_tokens"] > 40
  alias = _body(provider="openai", model="nano-prod", behaves_as="gpt-5-nano",
                base_url="https://x.openai.azure.com/openai/v1")
  assert "temperature" not in alias and alias["reasoning_effort"] == "minimal"
  local = _body(provider="openai", model="Qwen2.5-0.5B-Instruct", base_url=None)
  assert local["temperature"] == 0.0 and local["logprobs"] and local["top_logprobs"] == 5
  assert local["max_tokens"] == 40 and "reasoning_effort" not in local
  gpt41 = _body(provider="openai", model="gpt-4.1-nano")
  assert gpt41["logprobs"] and gpt41["max_completion_tokens"] == 40


def test_reasoning_allowance_is_configurable():
  assert _body(provider="openai", model="gpt-5-nano", reasoning_effort="low",
               reasoning_tokens=100)["max_completion_tokens"] == 140


# --- the emulated providers refuse what the real ones refuse ---------------------------
@pytest.fixture(scope="module")
def strict():
  with LocalProviderServer(KeywordStandIn(), models=(SMALL, FRONTIER, "claude-opus-4-7",
                                                     "gpt-4.1-nano"),
                           emulate=("*",)) as s:
    yield s


def _oa(strict):
  return openai.OpenAI(api_key="k", base_url=strict.openai_base_url, max_retries=0)


def _msg():
  return [{"role": "system", "content": "Classify the record into exactly one of these "
                                        "labels: billing, shipping."},
          {"role": "user", "content": 'Record:\n"please refund my invoice"\n\n'
                                      "Answer with the label only."}]


@pytest.mark.parametrize("extra, param", [
    (dict(temperature=0, max_completion_tokens=2000), "temperature"),
    (dict(logprobs=True, top_logprobs=5, max_completion_tokens=2000), None),
    (dict(max_tokens=2000), "max_tokens"),
    (dict(reasoning_effort="none", max_completion_tokens=2000), "reasoning_effort"),
    (dict(top_p=0.5, max_completion_tokens=2000), "top_p"),
])
def test_gpt5_requests_the_real_api_rejects_are_rejected(strict, extra, param):
  with pytest.raises(openai.BadRequestError) as e:
    _oa(strict).chat.completions.create(model="gpt-5-nano", messages=_msg(), **extra)
  assert e.value.status_code == 400
  if param:
    assert e.value.body["param"] == param


def test_reasoning_eats_the_token_limit(strict):
  client = _oa(strict)
  starved = client.chat.completions.create(model="gpt-5-nano", messages=_msg(),
                                           max_completion_tokens=100)  # default: medium
  assert starved.choices[0].message.content == ""
  assert starved.choices[0].finish_reason == "length"
  assert starved.usage.completion_tokens_details.reasoning_tokens == 100
  fed = client.chat.completions.create(model="gpt-5-nano", messages=_msg(),
                                       max_completion_tokens=1100, reasoning_effort="minimal")
  assert fed.choices[0].message.content and fed.choices[0].finish_reason == "stop"
  assert fed.usage.completion_tokens_details.reasoning_tokens == 16
  assert fed.usage.completion_tokens > 16
  # Models with logprobs keep them.
  ok = client.chat.completions.create(model="gpt-4.1-nano", messages=_msg(), temperature=0,
                                      logprobs=True, top_logprobs=3, max_completion_tokens=20)
  assert ok.choices[0].logprobs is not None


def test_claude_sampling_parameters(strict):
  client = anthropic.Anthropic(api_key="k", base_url=strict.anthropic_base_url, max_retries=0)
  with pytest.raises(anthropic.BadRequestError, match="deprecated"):
    client.messages.create(model="claude-opus-4-7", max_tokens=20, messages=_msg()[1:],
                           extra_body={"temperature": 0})
  with pytest.raises(anthropic.BadRequestError, match="Extra inputs"):
    client.messages.create(model=FRONTIER, max_tokens=20, messages=_msg()[1:],
                           extra_body={"logprobs": True})
  assert client.messages.create(model=FRONTIER, max_tokens=20, system=_msg()[0]["content"],
                                messages=_msg()[1:]).content


# --- the bundled config against the strict endpoints -----------------------------------
def _config(tmp_path, strict_server, **small):
  config = copy.deepcopy(BUNDLED)
  config["budget_usd"] = None
  config["models"]["small"].update(base_url=strict_server.openai_base_url, api_key_env="",
                                   batch_size=4, concurrency=2, max_retries=1, **small)
  config["models"]["frontier"].update(base_url=strict_server.anthropic_base_url,
                                      api_key_env="", batch_size=4, max_retries=1)
  path = tmp_path / "tickets.yaml"
  path.write_text(yaml.safe_dump(config))
  return str(path)


def _run(broker, topic, output_dir, config, n=24):
  name = topic(partitions=1)
  publish(broker.bootstrap_servers, name, sample_tickets()[:n])
  return launcher.launch("tickets", ["--bootstrap-servers", broker.bootstrap_servers,
                                     "--topic", name, "--output", output_dir,
                                     "--config", config])


def test_bundled_models_route_through_strict_endpoints(broker, topic, output_dir, tmp_path,
                                                       read_duckdb):
  with LocalProviderServer(KeywordStandIn(), models=(SMALL, FRONTIER), emulate=("*",)) as s:
    summary = _run(broker, topic, output_dir, _config(tmp_path, s))
    statuses = [r.status for r in s.requests]
  assert statuses and set(statuses) == {200}, "a request the real provider would refuse"
  assert summary.exit_code == 0 and summary.rejected == (0, 0)
  stages = read_duckdb(f"{output_dir}/results", """
      SELECT s.* FROM (SELECT unnest(stages) AS s FROM t)""")
  assert len(stages) == 24 * 3 and all(s["small_error"] is None for s in stages)
  classify = [s for s in stages if s["stage"] == "classify"]
  assert {s["confidence_signal"] for s in classify} == {"verbalised"}
  assert any(s["final_tier"] == "small" for s in classify), "nothing kept on the small tier"
  # Reasoning is billed: the ledger carries it and prices it as output.
  assert all(s["small_reasoning_tokens"] > 0 for s in stages)
  assert all(s["small_output_tokens"] >= s["small_reasoning_tokens"] for s in stages)


def test_a_refused_small_tier_fails_the_run_loudly(broker, topic, output_dir, tmp_path,
                                                   monkeypatch):
  """What happened before: every small request refused, all records escalated, exit 0."""
  from tierflow.connectors import model_capabilities as mc
  wrong = mc.Capabilities("wrong", logprobs=True, temperature=True, token_limit="max_tokens")
  monkeypatch.setattr(mc, "capabilities",
                      lambda provider, model: wrong if provider == "openai" else
                      mc._ANTHROPIC_UNKNOWN)
  with LocalProviderServer(KeywordStandIn(), models=(SMALL, FRONTIER), emulate=("*",)) as s:
    summary = _run(broker, topic, output_dir, _config(tmp_path, s), n=12)
    refused = [r for r in s.requests if r.status == 400]
  assert refused
  assert summary.exit_code == launcher.EXIT_MODEL_FAILURES
  assert summary.rejected[0] > 0 and summary.rejected[1] == 0
  assert any("refused by the provider" in p for p in summary.problems)


# --- a dead endpoint ends the run fast -------------------------------------------------
def test_circuit_breaker_opens_probes_and_closes():
  now = [0.0]
  b = CircuitBreaker("x", failures=3, cooldown_s=10, clock=lambda: now[0])
  for _ in range(2):
    b.before()
    b.failed("connection", "refused")
  b.failed("rate_limit", "429")  # not the endpoint's fault: the streak goes on
  b.before()
  b.failed("connection", "refused")
  assert b.is_open
  with pytest.raises(CircuitOpen, match="last: connection: refused"):
    b.before()
  now[0] = 10
  b.before()  # the probe
  with pytest.raises(CircuitOpen):
    b.before()  # only one
  b.failed("timeout", "slow")
  with pytest.raises(CircuitOpen, match="timeout"):
    b.before()
  now[0] = 20
  b.before()
  b.succeeded()
  assert not b.is_open
  b.before()


def test_dead_endpoints_end_a_run_in_seconds(broker, topic, output_dir, tmp_path):
  """Both endpoints dead: the run is refused before reading (preflight); without the
  preflight it stops at the first batch, in seconds (circuit breaker), writing and
  committing nothing (it was 569 s and 200 failed records before the breaker)."""
  dead = f"http://127.0.0.1:{free_port()}"
  config = copy.deepcopy(BUNDLED)
  config["budget_usd"] = None
  config["models"]["small"].update(base_url=dead + "/v1", api_key_env="", batch_size=4,
                                   max_retries=4)
  config["models"]["frontier"].update(base_url=dead, api_key_env="", batch_size=4,
                                      max_retries=4)
  path = tmp_path / "tickets.yaml"
  path.write_text(yaml.safe_dump(config))
  with pytest.raises(ValueError, match=r"small tier .* cannot reach"):
    _run(broker, topic, output_dir, str(path), n=200)
  name = topic(partitions=1)
  publish(broker.bootstrap_servers, name, sample_tickets()[:200])
  started = time.monotonic()
  with pytest.raises(launcher.RunFailed, match="not the records'"):
    launcher.launch("tickets", ["--bootstrap-servers", broker.bootstrap_servers, "--topic",
                                name, "--output", output_dir, "--config", str(path),
                                "--preflight", "never"])
  took = time.monotonic() - started
  assert took < 30, f"{took:.0f} s against dead endpoints"
  assert not list(pathlib.Path(output_dir).glob("results/**/*.parquet"))


def test_single_record_extraction_is_constrained_to_the_fields_schema():
  from tierflow.config import RunConfig
  from tierflow.pipelines.routing import Router
  from tierflow.prices import load_price_book
  config = copy.deepcopy(BUNDLED)
  config["models"]["small"].update(model="SmolLM2-135M-Instruct", price_as="gpt-5-nano",
                                   api_key_env="")
  config["models"]["frontier"].update(model="claude-sonnet-4-6", api_key_env="")
  run = RunConfig.from_dict(config)
  router = Router(run, load_price_book(run.price_book))
  schema = router._schema("small", "extract", ["one record"])
  extract = next(s for s in run.stages if s.name == "extract")
  assert set(schema["properties"]) == set(extract.fields) and schema["required"]
  assert schema["additionalProperties"] is False
  assert router._schema("small", "extract", ["a", "b"]) is None  # packed: JSON lines
  assert router._schema("small", "classify", ["one"]) is None  # read bare, with logprobs
  body = ModelClient(run.small).request_openai("s", "u", 50, 0, schema)
  assert body["response_format"]["json_schema"]["schema"] == schema
  off = run.with_model("small", structured_output=False).small
  assert "response_format" not in ModelClient(off).request_openai("s", "u", 50, 0, schema)
  with pytest.raises(ValidationError, match="structured output"):
    ModelConfig(provider="anthropic", model="claude-sonnet-4-6", structured_output=True)


def _examples(n: int) -> list[dict]:
  """Worked classify examples from tickets the runs here do not read (index 200 on)."""
  import json
  labels = {}
  with open(ROOT / "deploy/local/data/sample_tickets_labels.jsonl") as f:
    for line in f:
      row = json.loads(line)
      labels[row["ticket_id"]] = row["category"]
  return [{"text": f"{t['subject']}\n\n{t['body']}", "answer": labels[t["ticket_id"]]}
          for t in sample_tickets()[200:200 + n]]


@pytest.mark.parametrize("examples, cached", [(0, False), (16, True)])
def test_prompt_caching_engages_only_past_the_providers_minimum(
    broker, topic, output_dir, tmp_path, read_duckdb, examples, cached):
  """The emulated providers cache from 1,024 tokens, as the real ones: the bundled short
  instructions are not cached; with few-shot examples the shared prefix is, and the
  ledger bills its reads at the cache-read price."""
  with LocalProviderServer(KeywordStandIn(), models=(SMALL, FRONTIER), emulate=("*",)) as s:
    path = _config(tmp_path, s)
    config = yaml.safe_load(pathlib.Path(path).read_text())
    for stage in config["stages"]:
      if stage["name"] == "classify":
        stage["examples"] = _examples(examples)
        stage["threshold"] = 0.99  # escalate most: the frontier's cache is exercised too
    pathlib.Path(path).write_text(yaml.safe_dump(config))
    summary = _run(broker, topic, output_dir, path, n=24)
  assert summary.exit_code == 0
  stages = read_duckdb(f"{output_dir}/results", "SELECT s.* FROM (SELECT unnest(stages) AS s "
                                                "FROM t) WHERE s.stage = 'classify'")
  small_reads = sum(s["small_cache_read_tokens"] for s in stages)
  frontier_reads = sum(s["frontier_cache_read_tokens"] for s in stages)
  frontier_writes = sum(s["frontier_cache_write_tokens"] for s in stages)
  if cached:
    assert small_reads > 0 and frontier_reads > 0 and frontier_writes > 0
  else:
    assert small_reads == frontier_reads == frontier_writes == 0


def test_an_example_must_be_a_valid_answer():
  from tierflow.config import RunConfig
  config = copy.deepcopy(BUNDLED)
  config["stages"][0]["examples"] = [{"text": "refund please", "answer": "refunds"}]
  with pytest.raises(ValueError, match="example 1: answer 'refunds' is not one of the labels"):
    RunConfig.from_dict(config)
