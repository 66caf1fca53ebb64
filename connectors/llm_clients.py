"""Model clients over the real SDKs: ``openai`` (Chat Completions, any compatible
endpoint) and ``anthropic`` (Messages).

A ``ModelClient`` sends one prompt and returns a ``ModelReply`` (text, token
logprobs when the endpoint gives them, billed ``Usage``), or raises
``ModelCallError`` once the SDK's own retries (which honour ``retry-after``)
are spent. A per-process ``RateLimiter`` keeps requests and tokens per minute
under the configured limits. Keys are read from the environment variable the
config names, on the worker, and never logged or written.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Optional

from tierflow.prices import Usage

if TYPE_CHECKING:
  from tierflow.config import ModelConfig

__all__ = ["TokenInfo", "ModelReply", "ModelCallError", "ModelClient", "RateLimiter",
           "estimate_tokens"]

_LOGGER = logging.getLogger(__name__)


def estimate_tokens(text: str) -> int:
  """A deliberately generous token estimate (UTF-8 bytes / 3), for limits and budgets."""
  return math.ceil(len(text.encode("utf-8")) / 3) + 4


@dataclasses.dataclass(frozen=True)
class TokenInfo:
  token: str
  logprob: float
  top: tuple = ()  # ((token, logprob), ...)


@dataclasses.dataclass(frozen=True)
class ModelReply:
  text: str
  tokens: Optional[tuple]  # of TokenInfo, None when the endpoint gave no logprobs
  usage: Usage
  model: str
  finish_reason: str
  latency_s: float = 0.0

  @property
  def truncated(self) -> bool:
    return self.finish_reason in ("length", "max_tokens")


class ModelCallError(Exception):
  """A request that failed after retries. ``kind``: rate_limit, server_error,
  timeout, connection, auth, bad_request, malformed."""

  def __init__(self, kind: str, message: str, status: Optional[int] = None):
    super().__init__(f"{kind}: {message}")
    self.kind = kind
    self.status = status


class RateLimiter:
  """Requests- and tokens-per-minute limits over a sliding 60 s window (thread-safe)."""

  def __init__(self, rpm: Optional[int], tpm: Optional[int], clock=time.monotonic,
               sleep=time.sleep):
    self.rpm, self.tpm = rpm, tpm
    self._clock, self._sleep = clock, sleep
    self._events: deque = deque()  # (time, tokens)
    self._lock = threading.Lock()

  def _wait_for(self, now: float, tokens: int) -> float:
    while self._events and self._events[0][0] <= now - 60:
      self._events.popleft()
    wait = 0.0
    if self.rpm and len(self._events) >= self.rpm:
      wait = max(wait, self._events[len(self._events) - self.rpm][0] + 60 - now)
    if self.tpm:
      used = sum(t for _, t in self._events)
      if used + tokens > self.tpm and self._events:
        freed = 0
        for ts, t in self._events:
          freed += t
          if used - freed + tokens <= self.tpm:
            wait = max(wait, ts + 60 - now)
            break
    return wait

  def acquire(self, tokens: int) -> float:
    """Blocks until a request of ``tokens`` fits; returns seconds waited."""
    if not self.rpm and not self.tpm:
      return 0.0
    if self.tpm:
      tokens = min(tokens, self.tpm)
    waited = 0.0
    while True:
      with self._lock:
        now = self._clock()
        wait = self._wait_for(now, tokens)
        if wait <= 0:
          self._events.append((now, tokens))
          return waited
      self._sleep(wait)
      waited += wait


_LIMITERS: dict = {}
_LIMITERS_LOCK = threading.Lock()


def _limiter_for(cfg: "ModelConfig") -> RateLimiter:
  key = (cfg.provider, cfg.base_url, cfg.model, cfg.rpm, cfg.tpm)
  with _LIMITERS_LOCK:
    if key not in _LIMITERS:
      _LIMITERS[key] = RateLimiter(cfg.rpm, cfg.tpm)
    return _LIMITERS[key]


def _api_key(cfg: "ModelConfig") -> str:
  if cfg.api_key_env:
    key = os.environ.get(cfg.api_key_env)
    if not key:
      raise ModelCallError("auth", f"environment variable {cfg.api_key_env} is not set")
    return key
  # A local endpoint needs no key, but the SDKs insist on one.
  return "unused-local-key"


_RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})


def retry_after_seconds(headers) -> Optional[float]:
  """Seconds the server asked to wait (``retry-after-ms``, then ``retry-after``), if any."""
  if headers is None:
    return None
  for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
    value = headers.get(name)
    if value is None:
      continue
    try:
      seconds = float(value) / scale
    except ValueError:
      continue  # an HTTP date: fall back to backoff
    if seconds >= 0:
      return seconds
  return None


class ModelClient:
  """One model endpoint. Thread-safe; create once per worker (RunInference does).

  Retries are tierflow's, not the SDKs' (those are set to 0), so both providers
  behave alike: 408/409/429/5xx/529, timeouts and connection errors are retried
  up to ``max_retries`` times, waiting what ``retry-after-ms``/``retry-after``
  asks (capped at ``max_retry_wait_s``, so a huge value cannot park a worker)
  or else exponential backoff with jitter.
  """

  max_retry_wait_s = 60.0

  def __init__(self, cfg: "ModelConfig", sleep=time.sleep):
    self.cfg = cfg
    self.limiter = _limiter_for(cfg)
    self._sleep = sleep
    key = _api_key(cfg)
    if cfg.provider == "openai":
      import openai
      self._sdk = openai
      self._client = openai.OpenAI(api_key=key, base_url=cfg.base_url, max_retries=0,
                                   timeout=cfg.timeout_s)
    else:
      import anthropic
      self._sdk = anthropic
      self._client = anthropic.Anthropic(api_key=key, base_url=cfg.base_url, max_retries=0,
                                         timeout=cfg.timeout_s)
    self.retries = 0  # retries made over this client's life (for metrics and tests)

  def _wait_before_retry(self, e: Exception, attempt: int) -> Optional[float]:
    """Seconds to wait before retrying ``e``, or None if it is not retryable."""
    sdk = self._sdk
    if isinstance(e, (sdk.APITimeoutError, sdk.APIConnectionError)):
      pass
    elif isinstance(e, sdk.APIStatusError):
      if e.status_code not in _RETRY_STATUSES:
        return None
      asked = retry_after_seconds(getattr(e.response, "headers", None))
      if asked is not None:
        return min(asked, self.max_retry_wait_s)
    else:
      return None
    return min(self.max_retry_wait_s, 0.5 * 2 ** attempt) * (0.75 + 0.5 * random.random())

  def __repr__(self) -> str:  # never the key
    return f"ModelClient({self.cfg.provider}:{self.cfg.model})"

  def complete(self, system: str, user: str, max_tokens: int, *,
               top_logprobs: Optional[int] = None) -> ModelReply:
    """One chat completion; ``top_logprobs`` overrides the model's (0: chosen tokens only)."""
    self.limiter.acquire(estimate_tokens(system) + estimate_tokens(user) + max_tokens)
    start = time.monotonic()
    attempt = 0
    top = self.cfg.top_logprobs if top_logprobs is None else top_logprobs
    while True:
      try:
        if self.cfg.provider == "openai":
          reply = self._openai(system, user, max_tokens, top)
        else:
          reply = self._anthropic(system, user, max_tokens)
        return dataclasses.replace(reply, latency_s=time.monotonic() - start)
      except ModelCallError:
        raise
      except Exception as e:  # noqa: BLE001 - mapped to a per-request failure
        wait = self._wait_before_retry(e, attempt) if attempt < self.cfg.max_retries else None
        if wait is None:
          raise self._classify(e) from e
        attempt += 1
        self.retries += 1
        _LOGGER.info("%s: %s, retry %d in %.2fs", self, type(e).__name__, attempt, wait)
        self._sleep(wait)

  def _classify(self, e: Exception) -> ModelCallError:
    sdk = self._sdk
    status = getattr(e, "status_code", None)
    if isinstance(e, sdk.APITimeoutError):
      return ModelCallError("timeout", f"no answer within {self.cfg.timeout_s}s")
    if isinstance(e, sdk.APIConnectionError):
      return ModelCallError("connection", type(e).__name__)
    if isinstance(e, sdk.RateLimitError):
      return ModelCallError("rate_limit", "429 after retries", status)
    if isinstance(e, (sdk.AuthenticationError, sdk.PermissionDeniedError)):
      return ModelCallError("auth", f"{status} {type(e).__name__}", status)
    if isinstance(e, sdk.APIStatusError):
      kind = "server_error" if (status or 0) >= 500 else "bad_request"
      return ModelCallError(kind, f"HTTP {status}", status)
    return ModelCallError("malformed", f"{type(e).__name__}: {str(e)[:200]}")

  def _openai(self, system: str, user: str, max_tokens: int, top_logprobs: int) -> ModelReply:
    kwargs = dict(model=self.cfg.model, temperature=self.cfg.temperature,
                  messages=[{"role": "system", "content": system},
                            {"role": "user", "content": user}])
    # api.openai.com's newer models take max_completion_tokens; compatible
    # servers (vLLM, llama.cpp, Ollama, Fireworks, Together) take max_tokens.
    official = self.cfg.base_url is None or "api.openai.com" in self.cfg.base_url
    kwargs["max_completion_tokens" if official else "max_tokens"] = max_tokens
    if self.cfg.logprobs:
      kwargs["logprobs"] = True
      if top_logprobs:
        kwargs["top_logprobs"] = top_logprobs
    # The raw response, read as JSON: building the SDK's pydantic models for an answer
    # with logprobs cost more CPU than everything else about the request.
    raw = self._client.chat.completions.with_raw_response.create(**kwargs)
    body = _json_body(raw)
    choices = body.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
      raise ModelCallError("malformed", "answer has no choices")
    choice = choices[0]
    text = (choice.get("message") or {}).get("content") or ""
    tokens = None
    content = (choice.get("logprobs") or {}).get("content")
    if content:
      tokens = tuple(TokenInfo(t["token"], t["logprob"],
                               tuple((a["token"], a["logprob"])
                                     for a in (t.get("top_logprobs") or ())))
                     for t in content)
    u = body.get("usage")
    if not isinstance(u, dict):
      raise ModelCallError("malformed", "answer has no usage; refusing to guess its cost")
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    usage = Usage(input_tokens=max(0, (u.get("prompt_tokens") or 0) - cached),
                  output_tokens=u.get("completion_tokens") or 0, cache_read_tokens=cached)
    return ModelReply(text, tokens, usage, body.get("model") or self.cfg.model,
                      choice.get("finish_reason") or "stop")

  def _anthropic(self, system: str, user: str, max_tokens: int) -> ModelReply:
    raw = self._client.messages.with_raw_response.create(
        model=self.cfg.model, max_tokens=max_tokens,
        system=[{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": user}])
    body = _json_body(raw)
    blocks = body.get("content")
    if not isinstance(blocks, list):
      raise ModelCallError("malformed", "answer has no content")
    text = "".join(b.get("text", "") for b in blocks
                   if isinstance(b, dict) and b.get("type") == "text")
    u = body.get("usage")
    if not isinstance(u, dict):
      raise ModelCallError("malformed", "answer has no usage; refusing to guess its cost")
    usage = Usage(input_tokens=u.get("input_tokens") or 0,
                  output_tokens=u.get("output_tokens") or 0,
                  cache_read_tokens=u.get("cache_read_input_tokens") or 0,
                  cache_write_tokens=u.get("cache_creation_input_tokens") or 0)
    return ModelReply(text, None, usage, body.get("model") or self.cfg.model,
                      body.get("stop_reason") or "end_turn")


def _json_body(raw) -> dict:
  """The JSON object of a raw SDK response (``ModelCallError`` if it is not one)."""
  import json
  try:
    body = json.loads(raw.http_response.content)
  except (ValueError, UnicodeDecodeError) as e:
    raise ModelCallError("malformed", f"answer is not JSON: {e}") from None
  if not isinstance(body, dict):
    raise ModelCallError("malformed", "answer is not a JSON object")
  return body
