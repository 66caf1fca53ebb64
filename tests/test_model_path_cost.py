"""The model path's per-request costs, against the local endpoints over real HTTP: one
client per endpoint per process (built once, under a lock), one TLS context per process,
request bodies sent as they are (no SDK transform), answers parsed by orjson or, for Chat
Completions, decoded by msgspec into the parts tierflow reads."""

from __future__ import annotations

import ssl
import threading

import pytest
from tierflow_local.provider_server import LocalProviderServer, ScriptedResponder
from tierflow_local.standin_model import KeywordStandIn

from tierflow.config import ModelConfig
from tierflow.connectors import llm_clients
from tierflow.connectors.llm_clients import ModelCallError, ModelClient, client_for

KEY = "sk-local-model-path-0000"


@pytest.fixture(scope="module")
def server():
  recorder = ScriptedResponder([], fallback=KeywordStandIn())
  with LocalProviderServer(recorder, models=("small", "frontier", "m0", "m1", "m2"),
                           openai_api_key=KEY, anthropic_api_key=KEY) as srv:
    srv.recorder = recorder
    yield srv


@pytest.fixture
def key(monkeypatch):
  monkeypatch.setenv("TIERFLOW_MODEL_PATH_KEY", KEY)
  return "TIERFLOW_MODEL_PATH_KEY"


def _openai(server, key, model="small", **kw) -> ModelConfig:
  return ModelConfig(provider="openai", model=model, base_url=server.openai_base_url,
                     api_key_env=key, price_as="gpt-5-nano", **kw)


def _anthropic(server, key) -> ModelConfig:
  return ModelConfig(provider="anthropic", model="frontier", base_url=server.anthropic_base_url,
                     api_key_env=key, price_as="claude-sonnet-4-6")


def test_threads_asking_at_once_share_one_client(server, key):
  """16 threads released together ask for the same endpoint's client: one is built."""
  cfg = _openai(server, key, model="m0", timeout_s=17.0)  # settings no other test uses
  built = []
  real_init = ModelClient.__init__

  def counting_init(self, *a, **kw):
    built.append(self)
    real_init(self, *a, **kw)

  barrier = threading.Barrier(16)
  got = []

  def ask():
    barrier.wait()
    got.append(client_for(cfg))

  ModelClient.__init__ = counting_init
  try:
    threads = [threading.Thread(target=ask) for _ in range(16)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  finally:
    ModelClient.__init__ = real_init
  assert len(built) == 1
  assert len({id(c) for c in got}) == 1
  assert client_for(cfg) is got[0]
  # Another key (rotated in the environment) gets a client of its own.
  other = _openai(server, None, model="m0", timeout_s=17.0)
  assert client_for(other) is not got[0]


def test_clients_of_other_endpoints_read_no_ca_bundle_again(server, key, monkeypatch):
  """Each new SDK client would make a TLS context (reading the CA bundle, ~60 ms of CPU);
  the process makes one and every client shares it."""
  client_for(_openai(server, key, model="m1"))  # the process's context exists by now
  made = []
  real = ssl.create_default_context

  def counting(*a, **kw):
    made.append(1)
    return real(*a, **kw)

  monkeypatch.setattr(ssl, "create_default_context", counting)
  for n, cfg in enumerate((_openai(server, key, model="m2", timeout_s=19.0),
                           _openai(server, key, model="m2", timeout_s=21.0),
                           _anthropic(server, key))):
    client = ModelClient(cfg)
    reply = client.complete("Classify.", f"ticket {n}: my invoice is wrong", 16)
    assert reply.usage.input_tokens > 0
  assert made == []


def test_request_bodies_go_as_built_without_the_sdk_transform(server, key, monkeypatch):
  """The body ``request_body`` builds is what the endpoint receives, byte for byte as
  JSON, and the SDKs' parameter transform is never run for it."""
  import anthropic.resources.messages.messages as anthropic_messages
  import openai.resources.chat.completions.completions as openai_completions

  def refuse(*a, **kw):
    raise AssertionError("the SDK's transform ran")

  monkeypatch.setattr(openai_completions, "maybe_transform", refuse)
  monkeypatch.setattr(anthropic_messages, "maybe_transform", refuse, raising=False)
  for cfg in (_openai(server, key, top_logprobs=3), _anthropic(server, key)):
    client = ModelClient(cfg)
    before = len(server.recorder.requests)
    reply = client.complete("Classify the ticket.", "refund please", 24)
    assert reply.usage.input_tokens > 0
    sent = server.recorder.requests[before:]
    assert [r.body for r in sent] == [client.request_body("Classify the ticket.",
                                                          "refund please", 24)]


@pytest.mark.parametrize("content, why", [
    (b"not json", "answer is not JSON"),
    (b"[1, 2]", "answer is not a JSON object"),
    (b'{"a": "\\ud800"', "answer is not JSON"),  # cut off
    (b"\xff\xfe{}", "answer is not JSON"),  # not UTF-8
])
def test_unreadable_bodies_are_malformed_answers(content, why):
  with pytest.raises(ModelCallError) as e:
    llm_clients._json_body(content)
  assert e.value.kind == "malformed" and why in e.value.message


def test_a_lone_surrogate_in_an_answer_is_refused(server, key):
  """JSON's \\ud800 escape is a lone surrogate, which no Parquet file can hold: refused
  whether the parser rejects it or decodes it."""
  try:
    body = llm_clients._json_body(b'{"choices": [{"message": {"content": "a\\ud800"}}], '
                                  b'"usage": {"prompt_tokens": 1, "completion_tokens": 1}}')
  except ModelCallError as e:
    assert e.kind == "malformed"
    return
  with pytest.raises(ModelCallError, match="lone surrogate"):
    ModelClient(_openai(server, key)).reply_from_body(body)


def _answer(**over) -> dict:
  body = {"id": "c1", "object": "chat.completion", "model": "small-2026", "choices": [{
      "index": 0, "message": {"role": "assistant", "content": '{"label": "billing"}'},
      "logprobs": {"content": [
          {"token": "bill", "logprob": -0.1, "bytes": [98], "top_logprobs": [
              {"token": "bill", "logprob": -0.1, "bytes": [98]},
              {"token": "bug", "logprob": -2.5, "bytes": [98]}]},
          {"token": "ing", "logprob": -0.01, "bytes": [105], "top_logprobs": []}]},
      "finish_reason": "length"}],
      "usage": {"prompt_tokens": 40, "completion_tokens": 7,
                "prompt_tokens_details": {"cached_tokens": 8},
                "completion_tokens_details": {"reasoning_tokens": 2}}}
  body.update(over)
  return body


def test_a_chat_completion_reads_the_same_from_its_bytes_and_from_its_object(server, key):
  """The sync path decodes the raw body (msgspec); a batch result gives the parsed object:
  the same reply, every field tierflow reads."""
  import orjson
  client = ModelClient(_openai(server, key))
  content = orjson.dumps(_answer())
  from_bytes = client.reply_from_content(content)
  assert from_bytes == client.reply_from_body(orjson.loads(content))
  assert from_bytes.text == '{"label": "billing"}' and from_bytes.model == "small-2026"
  assert from_bytes.truncated
  assert [tuple(t) for t in from_bytes.tokens] == [
      ("bill", -0.1, (("bill", -0.1), ("bug", -2.5))), ("ing", -0.01, ())]
  u = from_bytes.usage
  assert (u.input_tokens, u.cache_read_tokens, u.output_tokens, u.reasoning_tokens) == (
      32, 8, 7, 2)


@pytest.mark.parametrize("over, why", [
    ({"choices": ["billing"]}, "at `$.choices[0]`"),
    ({"choices": []}, "answer has no choices"),
    ({"usage": None}, "answer has no usage"),
    ({"choices": [{"logprobs": {"content": [{"token": "a", "logprob": "low"}]}}]},
     "at `$.choices[0].logprobs.content[0].logprob`"),
])
def test_a_chat_completion_of_the_wrong_shape_is_malformed_and_says_where(server, key, over,
                                                                           why):
  import orjson
  client = ModelClient(_openai(server, key))
  for read in (lambda b: client.reply_from_content(orjson.dumps(b)), client.reply_from_body):
    with pytest.raises(ModelCallError) as e:
      read(_answer(**over))
    assert e.value.kind == "malformed" and why in e.value.message
  with pytest.raises(ModelCallError, match="answer is not a JSON object"):
    client.reply_from_content(b"[1, 2]")


def test_each_provider_has_its_classes_and_an_unknown_one_is_refused(server, key):
  """ModelClient(cfg) and ProviderBatch(client) are the provider's own classes; their
  registries know nothing else."""
  from tierflow.connectors import batch_api
  for cfg, client_class, batch_class in (
      (_openai(server, key), llm_clients.OpenAIChat, batch_api.OpenAIBatches),
      (_anthropic(server, key), llm_clients.AnthropicMessages, batch_api.AnthropicBatches)):
    client = ModelClient(cfg)
    assert type(client) is client_class and client.sdk_client.__module__.startswith(
        cfg.provider)
    assert type(batch_api.ProviderBatch(client)) is batch_class
    assert cfg.batch_limits.requests == batch_class.limits.requests
  for registry, what in ((ModelClient, "client"), (batch_api.ProviderBatch, "batch API")):
    with pytest.raises(ValueError, match=f"no {what} for provider 'gemini'"):
      registry.of_provider("gemini")
