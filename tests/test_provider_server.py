"""The local provider endpoints, driven only through the real SDKs over real HTTP."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import anthropic
import httpx2
import openai
import pytest

from tierflow_local.provider_server import (
  Completion,
  LocalProviderServer,
  RateLimit,
  ScriptedResponder,
  TokenLogprob,
  count_tokens,
  tokenize,
)

SMALL = "local-small"
FRONTIER = "local-frontier"
USER = [{"role": "user", "content": "Is this review positive?"}]


class FakeClock:
  """Monotonic clock the tests move by hand (rate windows, cache TTLs)."""

  def __init__(self) -> None:
    self.now = 1000.0

  def __call__(self) -> float:
    return self.now

  def advance(self, seconds: float) -> None:
    self.now += seconds


@pytest.fixture
def server():
  with LocalProviderServer() as srv:
    yield srv


def oai(srv: LocalProviderServer, **kwargs) -> openai.OpenAI:
  kwargs.setdefault("api_key", "local")
  kwargs.setdefault("max_retries", 0)
  kwargs.setdefault("timeout", 10)
  return openai.OpenAI(base_url=srv.openai_base_url, **kwargs)


def ant(srv: LocalProviderServer, **kwargs) -> anthropic.Anthropic:
  kwargs.setdefault("api_key", "local")
  kwargs.setdefault("max_retries", 0)
  kwargs.setdefault("timeout", 10)
  return anthropic.Anthropic(base_url=srv.anthropic_base_url, **kwargs)


def chat(client: openai.OpenAI, model: str = SMALL, messages=USER, **kwargs):
  return client.chat.completions.create(model=model, messages=messages, **kwargs)


def message(client: anthropic.Anthropic, model: str = FRONTIER, max_tokens: int = 64, **kwargs):
  kwargs.setdefault("messages", USER)
  return client.messages.create(model=model, max_tokens=max_tokens, **kwargs)


def statuses(srv: LocalProviderServer) -> list[int | None]:
  return [r.status for r in srv.requests]


def retry_gap(srv: LocalProviderServer) -> float:
  first, second = srv.requests[:2]
  return second.received_at - first.received_at


# -- tokenizer ---------------------------------------------------------------

def test_tokenizer_is_lossless_and_attaches_spaces_to_words():
  text = "Hello,  world! It's 42."
  assert tokenize(text) == ["Hello", ",", "  ", "world", "!", " It", "'", "s", " 42", "."]
  assert "".join(tokenize(text)) == text
  assert count_tokens(text) == 10


# -- normal answers ----------------------------------------------------------

def test_openai_completion_parses_with_usage_and_logprobs(server):
  resp = chat(oai(server), logprobs=True, top_logprobs=3)
  choice = resp.choices[0]
  assert isinstance(resp, openai.types.chat.ChatCompletion)
  assert resp.object == "chat.completion" and resp.model == SMALL
  assert resp.id.startswith("chatcmpl-")
  assert choice.message.role == "assistant"
  assert choice.message.content == USER[0]["content"]  # EchoResponder
  assert choice.finish_reason == "stop"
  tokens = choice.logprobs.content
  assert [t.token for t in tokens] == tokenize(USER[0]["content"])
  first = tokens[0]
  assert first.logprob == pytest.approx(-0.01)
  assert first.bytes == list(first.token.encode())
  assert len(first.top_logprobs) == 3
  assert first.top_logprobs[0].token == first.token
  assert [t.logprob for t in first.top_logprobs] == sorted(
    (t.logprob for t in first.top_logprobs), reverse=True)
  n = count_tokens(USER[0]["content"])
  assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (
    n, n, 2 * n)
  assert resp.usage.prompt_tokens_details.cached_tokens == 0


def test_logprobs_are_absent_unless_asked(server):
  assert chat(oai(server)).choices[0].logprobs is None


def test_scripted_logprobs_pass_through_and_pad_to_top_k():
  scripted = ScriptedResponder([
    Completion("positive", [
      TokenLogprob("positive", -0.2, [("positive", -0.2), ("negative", -1.8)])]),
    "second answer",
  ])
  with LocalProviderServer(scripted) as srv:
    client = oai(srv)
    top = chat(client, logprobs=True, top_logprobs=3).choices[0].logprobs.content[0].top_logprobs
    assert [(t.token, t.logprob) for t in top[:2]] == [("positive", -0.2), ("negative", -1.8)]
    assert len(top) == 3 and top[2].logprob < -1.8
    assert chat(client).choices[0].message.content == "second answer"
    with pytest.raises(openai.InternalServerError):  # script used up, no fallback
      chat(client)
  assert scripted.requests[0].logprobs and scripted.requests[0].top_logprobs == 3


def test_script_function_sees_the_parsed_request_and_failures_become_500():
  def answer(request):
    if request.last_user_text == "boom":
      raise RuntimeError("model crashed")
    return f"{request.flavour}:{request.model}:{request.system}"

  with LocalProviderServer(ScriptedResponder(answer)) as srv:
    msg = message(ant(srv), system="Be brief.")
    assert msg.content[0].text == f"anthropic:{FRONTIER}:Be brief."
    with pytest.raises(openai.InternalServerError) as err:
      chat(oai(srv), messages=[{"role": "user", "content": "boom"}])
    assert err.value.body["type"] == "server_error"


def test_anthropic_message_shape(server):
  msg = message(ant(server))
  assert isinstance(msg, anthropic.types.Message)
  assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
  assert msg.content[0].type == "text" and msg.content[0].text == USER[0]["content"]
  assert msg.stop_reason == "end_turn"
  n = count_tokens(USER[0]["content"])
  assert (msg.usage.input_tokens, msg.usage.output_tokens) == (n, n)
  assert msg.usage.cache_creation_input_tokens == msg.usage.cache_read_input_tokens == 0


def test_max_tokens_and_stop_sequences_cut_the_answer(server):
  text = USER[0]["content"]
  resp = chat(oai(server), max_completion_tokens=2)
  assert resp.choices[0].finish_reason == "length"
  assert resp.choices[0].message.content == "".join(tokenize(text)[:2])
  assert resp.usage.completion_tokens == 2
  msg = message(ant(server), max_tokens=3)
  assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 3
  resp = chat(oai(server), stop=[" review"])
  assert (resp.choices[0].message.content, resp.choices[0].finish_reason) == ("Is this", "stop")
  msg = message(ant(server), stop_sequences=[" review"])
  assert (msg.content[0].text, msg.stop_reason, msg.stop_sequence) == (
    "Is this", "stop_sequence", " review")


def test_truncated_fault_cuts_mid_way(server):
  server.faults.add("truncated", count=2)
  resp = chat(oai(server), logprobs=True)
  assert resp.choices[0].finish_reason == "length"
  full = tokenize(USER[0]["content"])
  assert resp.choices[0].message.content == "".join(full[:len(full) // 2])
  assert len(resp.choices[0].logprobs.content) == len(full) // 2
  assert message(ant(server)).stop_reason == "max_tokens"
  assert chat(oai(server)).choices[0].finish_reason == "stop"  # used up


def test_empty_choices_fault(server):
  server.faults.add("empty_choices", count=2)
  assert chat(oai(server)).choices == []
  assert message(ant(server)).content == []


def test_models_are_listed_for_both_flavours(server):
  assert [m.id for m in oai(server).models.list()] == [SMALL, FRONTIER]
  assert [m.id for m in ant(server).models.list()] == [SMALL, FRONTIER]
  assert oai(server).models.retrieve(SMALL).id == SMALL


def test_invalid_requests_get_provider_shaped_400(server):
  with pytest.raises(openai.BadRequestError) as err:
    chat(oai(server), stream=True)
  assert err.value.body["param"] == "stream"
  with pytest.raises(anthropic.BadRequestError) as err:
    ant(server).messages.create(model=FRONTIER, max_tokens=0, messages=USER)
  assert err.value.body["error"]["type"] == "invalid_request_error"


# -- prompt caching ----------------------------------------------------------

def cached_system(text: str, **control) -> list[dict]:
  return [{"type": "text", "text": "Shared rules. "},
          {"type": "text", "text": text, "cache_control": {"type": "ephemeral", **control}}]


def test_anthropic_cache_creation_then_read():
  clock = FakeClock()
  with LocalProviderServer(clock=clock) as srv:
    client = ant(srv)
    system = cached_system("Label every record as positive or negative. " * 20)
    prefix = sum(count_tokens(b["text"]) for b in system)
    total = prefix + count_tokens(USER[0]["content"])

    first = message(client, system=system).usage
    assert (first.cache_creation_input_tokens, first.cache_read_input_tokens) == (prefix, 0)
    assert first.input_tokens == total - prefix  # cached tokens are not in input_tokens
    assert first.cache_creation.ephemeral_5m_input_tokens == prefix

    second = message(client, system=system).usage
    assert (second.cache_creation_input_tokens, second.cache_read_input_tokens) == (0, prefix)
    assert second.input_tokens == total - prefix

    assert message(client, model=SMALL, system=system).usage.cache_creation_input_tokens == prefix
    clock.advance(301)  # past the 5 minute TTL
    assert message(client, system=system).usage.cache_creation_input_tokens == prefix
    plain = message(client, system="No cache control here.").usage
    assert plain.cache_creation_input_tokens == plain.cache_read_input_tokens == 0


def test_anthropic_one_hour_cache_ttl():
  clock = FakeClock()
  with LocalProviderServer(clock=clock) as srv:
    system = cached_system("Long lived rules. " * 10, ttl="1h")
    assert message(ant(srv), system=system).usage.cache_creation.ephemeral_1h_input_tokens > 0
    clock.advance(1800)
    assert message(ant(srv), system=system).usage.cache_read_input_tokens > 0


def test_openai_automatic_prefix_cache_counts_inside_prompt_tokens():
  with LocalProviderServer(openai_cache_min_tokens=20) as srv:
    client = oai(srv)
    system = "You label product reviews as positive or negative. " * 5
    messages = [{"role": "system", "content": system}, *USER]
    first = chat(client, messages=messages).usage
    second = chat(client, messages=messages).usage
    assert first.prompt_tokens_details.cached_tokens == 0
    assert second.prompt_tokens_details.cached_tokens == count_tokens(system)
    assert second.prompt_tokens == first.prompt_tokens == count_tokens(system) + count_tokens(
      USER[0]["content"])
    short = [{"role": "system", "content": "Too short to cache."}, *USER]
    chat(client, messages=short)
    assert chat(client, messages=short).usage.prompt_tokens_details.cached_tokens == 0


# -- faults and the SDKs' retries --------------------------------------------

def test_openai_retries_429_after_retry_after_ms(server):
  server.faults.add("rate_limit", count=1, retry_after=0.3)
  resp = chat(oai(server, max_retries=2))
  assert resp.choices[0].message.content == USER[0]["content"]
  assert statuses(server) == [429, 200]
  assert retry_gap(server) >= 0.3
  assert server.requests[1].headers["x-stainless-retry-count"] == "1"


def test_openai_429_headers(server):
  server.faults.add("rate_limit", count=1, retry_after=0.3)
  raw = httpx2.post(f"{server.openai_base_url}/chat/completions",
                    json={"model": SMALL, "messages": USER})
  assert raw.status_code == 429
  assert raw.headers["retry-after"] == "0.3" and raw.headers["retry-after-ms"] == "300"
  assert raw.headers["x-ratelimit-remaining-requests"] == "0"
  assert raw.json()["error"]["code"] == "rate_limit_exceeded"


def test_anthropic_retries_429_after_retry_after(server):
  server.faults.add("rate_limit", count=1, retry_after=0.3)
  assert message(ant(server, max_retries=2)).content[0].text == USER[0]["content"]
  assert statuses(server) == [429, 200]
  assert retry_gap(server) >= 0.3


def test_anthropic_429_headers(server):
  server.faults.add("rate_limit", count=1, retry_after=2)
  raw = httpx2.post(f"{server.anthropic_base_url}/v1/messages",
                    headers={"anthropic-version": "2023-06-01"},
                    json={"model": FRONTIER, "max_tokens": 5, "messages": USER})
  assert raw.status_code == 429
  assert raw.headers["retry-after"] == "2" and "retry-after-ms" not in raw.headers
  assert raw.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
  assert raw.json()["error"]["type"] == "rate_limit_error"
  assert raw.headers["request-id"] == raw.json()["request_id"]


def test_server_errors_are_retried_then_succeed(server):
  server.faults.add("server_error", count=1, retry_after=0.05, flavour="openai")
  server.faults.add("unavailable", count=1, retry_after=0.05, flavour="openai")
  server.faults.add("overloaded", count=2, retry_after=0.05, path="/v1/messages")
  assert chat(oai(server, max_retries=2)).choices[0].finish_reason == "stop"
  assert message(ant(server, max_retries=2)).stop_reason == "end_turn"
  assert statuses(server) == [500, 503, 200, 529, 529, 200]
  assert server.stats()["by_fault"] == {"server_error": 1, "unavailable": 1, "overloaded": 2}


def test_persistent_faults_exhaust_sdk_retries(server):
  server.faults.add("rate_limit", count=-1, retry_after=0.05, flavour="openai")
  server.faults.add("overloaded", count=-1, retry_after=0.05, flavour="anthropic")
  with pytest.raises(openai.RateLimitError) as oerr:
    chat(oai(server, max_retries=2))
  assert oerr.value.status_code == 429 and oerr.value.code == "rate_limit_exceeded"
  with pytest.raises(anthropic.InternalServerError) as aerr:
    message(ant(server, max_retries=2))
  assert isinstance(aerr.value, anthropic.OverloadedError)
  assert aerr.value.status_code == 529
  assert aerr.value.body["error"]["type"] == "overloaded_error"
  assert statuses(server) == [429] * 3 + [529] * 3


def test_x_should_retry_false_stops_sdk_retries(server):
  server.faults.add("server_error", count=-1, should_retry=False)
  with pytest.raises(openai.InternalServerError):
    chat(oai(server, max_retries=3))
  with pytest.raises(anthropic.InternalServerError):
    message(ant(server, max_retries=3))
  assert statuses(server) == [500, 500]


def test_timeout_fault_makes_the_client_time_out(server):
  server.faults.add("timeout", count=-1, seconds=5)
  started = time.monotonic()
  with pytest.raises(openai.APITimeoutError):
    chat(oai(server, timeout=0.3))
  with pytest.raises(anthropic.APITimeoutError):
    message(ant(server, timeout=0.3))
  assert time.monotonic() - started < 2


def test_malformed_body_raises_json_decode_error_without_retry(server):
  # Both SDKs let the decoder's error escape: it is not an openai/anthropic exception class.
  server.faults.add("malformed", count=-1)
  with pytest.raises(json.JSONDecodeError):
    chat(oai(server, max_retries=2))
  with pytest.raises(json.JSONDecodeError):
    message(ant(server, max_retries=2))
  assert statuses(server) == [200, 200]


def test_fault_filters_and_seeded_probability(server):
  server.faults.add("server_error", count=-1, model=FRONTIER)
  assert chat(oai(server)).choices  # other model unaffected
  with pytest.raises(openai.InternalServerError):
    chat(oai(server), model=FRONTIER)

  client = oai(server)

  def pattern() -> list[int]:
    server.set_faults([{"kind": "server_error", "count": -1, "probability": 0.5, "seed": 7}])
    server.reset_stats()
    for _ in range(12):
      try:
        chat(client)
      except openai.InternalServerError:
        pass
    return statuses(server)

  first = pattern()
  assert 0 < first.count(500) < 12
  assert pattern() == first


# -- rate limits -------------------------------------------------------------

def test_rpm_limit_sliding_window():
  clock = FakeClock()
  with LocalProviderServer(rate_limits={SMALL: RateLimit(rpm=2)}, clock=clock) as srv:
    client = oai(srv)
    raw = client.chat.completions.with_raw_response.create(model=SMALL, messages=USER)
    assert raw.headers["x-ratelimit-limit-requests"] == "2"
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    assert raw.headers["x-ratelimit-reset-requests"] == "1m0s"
    clock.advance(10)
    chat(client)
    with pytest.raises(openai.RateLimitError) as err:
      chat(client)
    headers = err.value.response.headers
    assert headers["retry-after"] == "50" and headers["retry-after-ms"] == "50000"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    chat(client, model=FRONTIER)  # other models are not limited
    clock.advance(50)  # the first request leaves the window
    chat(client)
    assert statuses(srv) == [200, 200, 429, 200, 200]


def test_anthropic_rate_limit_headers_on_every_response():
  with LocalProviderServer(rate_limits={"*": RateLimit(rpm=1, tpm=10_000)}) as srv:
    raw = ant(srv).messages.with_raw_response.create(model=FRONTIER, max_tokens=8, messages=USER)
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "1"
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert raw.headers["anthropic-ratelimit-tokens-limit"] == "10000"
    used = 2 * count_tokens(USER[0]["content"])
    assert raw.headers["anthropic-ratelimit-tokens-remaining"] == str(10_000 - used)
    with pytest.raises(anthropic.RateLimitError) as err:
      message(ant(srv))
    assert err.value.response.headers["retry-after"] == "60"
    assert err.value.body["error"]["type"] == "rate_limit_error"


def test_tpm_limit_counts_prompt_and_completion_tokens():
  clock = FakeClock()
  n = count_tokens(USER[0]["content"])
  with LocalProviderServer(rate_limits={SMALL: RateLimit(tpm=3 * n)}, clock=clock) as srv:
    client = oai(srv, max_retries=2)
    chat(client)  # 2n used (prompt + echoed answer)
    clock.advance(5)
    chat(client)  # admitted: 2n + n prompt <= 3n, then 4n used
    with pytest.raises(openai.RateLimitError):
      chat(oai(srv))
    huge = [{"role": "user", "content": "word " * (3 * n + 1)}]
    with pytest.raises(openai.RateLimitError) as err:
      chat(client, messages=huge)  # can never fit: x-should-retry false, so no retries
    assert err.value.response.headers["x-should-retry"] == "false"
    assert statuses(srv) == [200, 200, 429, 429]


# -- authentication and secrecy ----------------------------------------------

def test_wrong_key_is_rejected_and_keys_never_logged(caplog, capsys):
  caplog.set_level(logging.DEBUG, logger="tierflow_local.provider_server")
  openai_key, anthropic_key, wrong = "sk-oa-SECRET-1111", "sk-ant-SECRET-2222", "sk-WRONG-3333"
  with LocalProviderServer(openai_api_key=openai_key, anthropic_api_key=anthropic_key) as srv:
    with pytest.raises(openai.AuthenticationError) as oerr:
      chat(oai(srv, api_key=wrong, max_retries=2))
    assert oerr.value.code == "invalid_api_key"
    with pytest.raises(anthropic.AuthenticationError) as aerr:
      message(ant(srv, api_key=wrong, max_retries=2))
    assert aerr.value.body["error"]["type"] == "authentication_error"
    assert chat(oai(srv, api_key=openai_key)).choices
    assert message(ant(srv, api_key=anthropic_key)).content  # SDK 2.x sends a Bearer token
    raw = httpx2.post(f"{srv.url}/v1/messages",
                      headers={"x-api-key": anthropic_key, "anthropic-version": "2023-06-01"},
                      json={"model": FRONTIER, "max_tokens": 5, "messages": USER})
    assert raw.status_code == 200
    missing = httpx2.get(f"{srv.openai_base_url}/models")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    logged = json.dumps(srv.stats())
  assert statuses_of(logged) == [401, 401, 200, 200, 200, 401]
  assert "/v1/chat/completions" in caplog.text  # the server did log these requests
  out = capsys.readouterr()
  for secret in (openai_key, anthropic_key, wrong):
    for text in (logged, caplog.text, out.out, out.err):
      assert secret not in text


def statuses_of(stats_json: str) -> list[int]:
  return [r["status"] for r in json.loads(stats_json)["requests"]]


# -- control API, latency, CLI -----------------------------------------------

def test_control_endpoints_over_http(server):
  control = f"{server.url}/_control"
  posted = httpx2.post(f"{control}/faults", json=[
    {"kind": "server_error", "count": 1, "model": FRONTIER},
    "rate_limit:1,retry_after=0.05,flavour=anthropic",
  ])
  assert [f["kind"] for f in posted.json()["faults"]] == ["server_error", "rate_limit"]
  assert httpx2.post(f"{control}/faults", json={"kind": "nope"}).status_code == 400
  with pytest.raises(openai.InternalServerError):
    chat(oai(server), model=FRONTIER)
  assert message(ant(server, max_retries=1)).content
  stats = httpx2.get(f"{control}/stats").json()
  assert stats["total"] == 3
  assert stats["by_status"] == {"500": 1, "429": 1, "200": 1}
  assert stats["by_path"] == {"/v1/chat/completions": 1, "/v1/messages": 2}
  assert stats["requests"][0]["body"]["model"] == FRONTIER
  assert "authorization" not in stats["requests"][0]["headers"]
  assert httpx2.delete(f"{control}/faults").json() == {"faults": []}
  assert httpx2.delete(f"{control}/stats").json()["total"] == 0
  config = httpx2.post(f"{control}/config", json={
    "latency_seconds": 0.01, "rate_limits": {SMALL: {"rpm": 100}}}).json()
  assert config["latency_seconds"] == 0.01 and config["rate_limits"][SMALL]["rpm"] == 100
  assert oai(server).chat.completions.with_raw_response.create(
    model=SMALL, messages=USER).headers["x-ratelimit-remaining-requests"] == "99"


def test_latency_is_served_concurrently():
  with LocalProviderServer(latency_seconds=0.3) as srv:
    client = oai(srv)
    started = time.monotonic()
    threads = [threading.Thread(target=chat, args=(client,)) for _ in range(8)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    elapsed = time.monotonic() - started
  assert 0.3 <= elapsed < 1.2
  assert statuses(srv) == [200] * 8


def test_cli_serves_until_interrupted(tmp_path):
  # PYTHONFAULTHANDLER: if it ever hangs on Ctrl-C, SIGABRT dumps every thread's stack.
  env = {**os.environ, "TF_LOCAL_KEY": "sk-cli-SECRET", "PYTHONFAULTHANDLER": "1"}
  proc = subprocess.Popen(
    [sys.executable, "-m", "tierflow_local.provider_server", "--require-key-env", "TF_LOCAL_KEY",
     "--fault", "server_error:1", "--rpm", f"{SMALL}=5", "--latency", "0"],
    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  try:
    urls = {}
    while not {"OPENAI_BASE_URL", "ANTHROPIC_BASE_URL"} <= set(urls):  # its exports
      line = proc.stdout.readline().strip()
      if line.startswith("export "):
        urls.update([line[len("export "):].split("=", 1)])
    # With a required key it prints none of its own: the user holds the key.
    assert "OPENAI_API_KEY" not in urls and urls["TIERFLOW_SMALL_BASE_URL"] == \
        urls["OPENAI_BASE_URL"]
    client = openai.OpenAI(base_url=urls["OPENAI_BASE_URL"], api_key="sk-cli-SECRET",
                           max_retries=0, timeout=5)
    with pytest.raises(openai.InternalServerError):
      chat(client)
    raw = client.chat.completions.with_raw_response.create(model=SMALL, messages=USER)
    assert raw.headers["x-ratelimit-remaining-requests"] == "3"
    assert anthropic.Anthropic(base_url=urls["ANTHROPIC_BASE_URL"], api_key="sk-cli-SECRET",
                               max_retries=0).messages.create(
      model=FRONTIER, max_tokens=5, messages=USER).content
  finally:
    proc.send_signal(signal.SIGINT)
    try:
      out, err = proc.communicate(timeout=30)  # generous: shared 2-core machines
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGABRT)
      _, err = proc.communicate(timeout=10)
      pytest.fail(f"serve-local ignored Ctrl-C for 30 s; its threads:\n{err[-8000:]}")
  assert proc.returncode == 0
  assert "sk-cli-SECRET" not in out + err
