"""Local provider endpoints: OpenAI Chat Completions and Anthropic Messages over real HTTP.

Tests and the offline demo point the real `openai` and `anthropic` SDKs at this server
instead of the hosted APIs, which are not reachable from here:

  with LocalProviderServer(EchoResponder()) as server:
    small = openai.OpenAI(base_url=server.openai_base_url, api_key="local")
    frontier = anthropic.Anthropic(base_url=server.anthropic_base_url, api_key="local")

Served routes: `POST /v1/chat/completions`, `POST /v1/messages`, `GET /v1/models[/ID]`
(OpenAI- or Anthropic-shaped, chosen by the `anthropic-version` request header) and the
control routes `GET|POST|DELETE /_control/faults`, `GET|DELETE /_control/stats`,
`GET|POST /_control/config`.

The answers come from a pluggable `Responder`. Faults (429/500/503/529, slow answers,
truncated or malformed bodies, a model that obeys instructions injected into the records:
`injection`), fixed latency, per-model RPM/TPM limits and prompt
caching are simulated so that the SDKs' retry and accounting paths run for real.
Token counts use an approximate regex tokenizer (`tokenize`), not a real BPE vocabulary.
Only the standard library is used.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import hmac
import json
import logging
import math
import os
import random
import re
import signal
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, Union
from urllib.parse import urlsplit

from tierflow_local.batch_endpoints import BatchEndpoints, BatchRefused
from tierflow_local.provider_rules import ModelRules, RequestRejected, rules_for

__all__ = [
  "ANTHROPIC",
  "Completion",
  "EchoResponder",
  "FAULT_KINDS",
  "Fault",
  "FaultSet",
  "LocalProviderServer",
  "OPENAI",
  "ProviderRequest",
  "RateLimit",
  "RequestRecord",
  "Responder",
  "ScriptedResponder",
  "TokenLogprob",
  "count_tokens",
  "main",
  "synthetic_logprobs",
  "tokenize",
]

log = logging.getLogger(__name__)

OPENAI = "openai"
ANTHROPIC = "anthropic"
FLAVOURS = (OPENAI, ANTHROPIC)
DEFAULT_MODELS = ("local-small", "local-frontier")

WINDOW_SECONDS = 60.0
DEFAULT_CACHE_TTL = 300.0
MAX_BODY_BYTES = 32 * 1024 * 1024
_SENSITIVE_HEADERS = frozenset(
  {"authorization", "x-api-key", "api-key", "proxy-authorization", "cookie", "set-cookie"})

# ---------------------------------------------------------------------------
# Tokenizer (approximate, deterministic).

_TOKEN_RE = re.compile(r"\s?\w+|\s?[^\w\s]+|\s+")


def tokenize(text: str) -> list[str]:
  """Splits text into GPT-BPE-like tokens (a space sticks to the following word).

  Approximate: real vocabularies split long or rare words further. The pieces always
  concatenate back to `text`.
  """
  return _TOKEN_RE.findall(text)


def count_tokens(text: str) -> int:
  """Number of `tokenize` tokens in text."""
  return len(tokenize(text))


# ---------------------------------------------------------------------------
# What a responder sees and returns.

@dataclasses.dataclass(frozen=True)
class TokenLogprob:
  """One generated token, its logprob and the most likely alternatives at that position."""
  token: str
  logprob: float
  top: Sequence[tuple[str, float]] = ()


@dataclasses.dataclass
class Completion:
  """A responder's answer; `token_logprobs` tokens should concatenate to `text`."""
  text: str
  token_logprobs: list[TokenLogprob] | None = None


@dataclasses.dataclass
class ProviderRequest:
  """A parsed chat request, provider-neutral."""
  flavour: str
  model: str
  system: str
  messages: list[dict[str, str]]  # {"role", "content"} with content flattened to text
  max_tokens: int | None
  logprobs: bool
  top_logprobs: int
  stop: list[str]
  prompt_tokens: int
  body: dict[str, Any]
  # The `injection` fault: the model obeys instructions written into the records.
  follow_injections: bool = False

  @property
  def last_user_text(self) -> str:
    for message in reversed(self.messages):
      if message["role"] == "user":
        return message["content"]
    return ""


class Responder(Protocol):
  """The model behind the endpoints: any callable from request to completion."""

  def __call__(self, request: ProviderRequest) -> Completion:
    ...


class EchoResponder:
  """Answers with the last user message."""

  def __call__(self, request: ProviderRequest) -> Completion:
    return Completion(request.last_user_text)


ScriptItem = Union[Completion, str]


class ScriptedResponder:
  """Answers from a queue of completions (or strings), or from a function of the request.

  Once the queue is empty it defers to `fallback`; without one it raises, which the
  server reports as a 500 `api_error`. Every request seen is kept in `.requests`.
  """

  def __init__(
      self,
      script: Iterable[ScriptItem] | Callable[[ProviderRequest], ScriptItem] = (),
      fallback: Responder | None = None):
    self._fn = script if callable(script) else None
    self._queue: collections.deque[ScriptItem] = collections.deque(
      () if callable(script) else script)
    self._fallback = fallback
    self._lock = threading.Lock()
    self.requests: list[ProviderRequest] = []

  def push(self, *items: ScriptItem) -> None:
    with self._lock:
      self._queue.extend(items)

  def __call__(self, request: ProviderRequest) -> Completion:
    with self._lock:
      self.requests.append(request)
      item = self._queue.popleft() if self._queue else None
    if item is None and self._fn is not None:
      item = self._fn(request)
    if item is None:
      if self._fallback is None:
        raise LookupError("ScriptedResponder has no completion left")
      return self._fallback(request)
    return Completion(item) if isinstance(item, str) else item


# Alternatives used to fill `top_logprobs` when a responder gives fewer than asked.
_ALTERNATIVES = (
  " the", " a", " and", " of", " to", " is", " in", " it", ",", ".", " not", " yes",
  " no", " maybe", " this", " that", " for", " on", " with", " as", " be", " at")
_CHOSEN_LOGPROB = -0.01


def synthetic_logprobs(text: str) -> list[TokenLogprob]:
  """Deterministic logprobs for text: every token at -0.01 (p~0.99)."""
  return [TokenLogprob(t, _CHOSEN_LOGPROB, ((t, _CHOSEN_LOGPROB),)) for t in tokenize(text)]


def _top_k(item: TokenLogprob, k: int) -> list[tuple[str, float]]:
  """The k best alternatives, padded deterministically below the lowest one given."""
  top = list(item.top)[:k]
  seen = {token for token, _ in top}
  floor = min([lp for _, lp in top] + [item.logprob])
  fillers = (t for t in _ALTERNATIVES if t not in seen and t != item.token)
  while len(top) < k:
    top.append((next(fillers), floor - 6.0 - len(top)))
  return top


# ---------------------------------------------------------------------------
# Faults.

FAULT_KINDS = (
  "rate_limit", "server_error", "unavailable", "overloaded", "timeout", "truncated",
  "malformed", "empty_choices", "injection")
_ERROR_FAULTS = {"rate_limit": 429, "server_error": 500, "unavailable": 503, "overloaded": 529}
_FAULT_MESSAGES = {
  "rate_limit": "Rate limit reached for requests (local fault injection).",
  "server_error": "The server had an error while processing your request.",
  "unavailable": "The service is temporarily unavailable.",
  "overloaded": "Overloaded",
}


@dataclasses.dataclass
class Fault:
  """A switchable failure for matching requests.

  kind: one of FAULT_KINDS. count: how many more matching requests it hits (-1 = all).
  model / path / flavour: optional filters (path like "/v1/messages"; flavour "openai" or
  "anthropic"). probability + seed: hit only a reproducible fraction of matches.
  retry_after: seconds sent as `retry-after` (default 1 for rate_limit, none otherwise).
  seconds: how long `timeout` stalls before answering. should_retry: sends
  `x-should-retry: true|false`, which both SDKs obey before any status rule.
  """
  kind: str
  count: int = 1
  model: str | None = None
  path: str | None = None
  flavour: str | None = None
  probability: float = 1.0
  seed: int | None = None
  retry_after: float | None = None
  seconds: float = 5.0
  should_retry: bool | None = None
  fired: int = 0

  def __post_init__(self) -> None:
    if self.kind not in FAULT_KINDS:
      raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")
    if not isinstance(self.count, int) or self.count < -1:
      raise ValueError("fault count must be an integer >= -1")
    if not 0.0 <= self.probability <= 1.0:
      raise ValueError("fault probability must be within [0, 1]")
    if self.flavour not in (None, *FLAVOURS):
      raise ValueError(f"fault flavour must be one of {FLAVOURS}")
    self._rng = random.Random(self.seed)

  def matches(self, flavour: str, path: str, model: str | None) -> bool:
    return (self.count != 0
            and self.model in (None, model)
            and self.path in (None, path)
            and self.flavour in (None, flavour))

  def roll(self) -> bool:
    return self.probability >= 1.0 or self._rng.random() < self.probability

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_spec(cls, spec: FaultSpec) -> Fault:
    """Builds a fault from a Fault, a mapping, or "KIND[:COUNT][,key=value...]"."""
    if isinstance(spec, Fault):
      return spec
    if isinstance(spec, str):
      return cls(**_parse_fault_string(spec))
    if isinstance(spec, Mapping):
      unknown = set(spec) - _FAULT_FIELDS.keys() - {"fired"}
      if unknown:
        raise ValueError(f"unknown fault option(s): {sorted(unknown)}")
      return cls(**{k: _coerce(k, v) for k, v in spec.items() if k != "fired"})
    raise TypeError(f"cannot build a fault from {type(spec).__name__}")


FaultSpec = Union[Fault, Mapping[str, Any], str]
_FAULT_FIELDS = {
  "kind": str, "count": int, "model": str, "path": str, "flavour": str,
  "probability": float, "seed": int, "retry_after": float, "seconds": float,
  "should_retry": bool,
}


def _coerce(name: str, value: Any) -> Any:
  kind = _FAULT_FIELDS[name]
  if value is None or (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
    return value
  if kind is bool:
    if str(value).lower() in ("1", "true", "yes"):
      return True
    if str(value).lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"fault option {name} needs true/false, got {value!r}")
  return kind(value)


def _parse_fault_string(text: str) -> dict[str, Any]:
  head, *options = [part.strip() for part in text.split(",") if part.strip()]
  kind, _, count = head.partition(":")
  spec: dict[str, Any] = {"kind": kind.strip()}
  if count:
    spec["count"] = int(count)
  for option in options:
    key, sep, value = option.partition("=")
    if not sep or key.strip() not in _FAULT_FIELDS:
      raise ValueError(f"bad fault option {option!r} in {text!r}")
    spec[key.strip()] = _coerce(key.strip(), value.strip())
  return spec


class FaultSet:
  """The server's active faults, checked in insertion order; thread-safe."""

  def __init__(self, specs: Iterable[FaultSpec] = ()):
    self._lock = threading.Lock()
    self._faults: list[Fault] = [Fault.from_spec(s) for s in specs]

  def add(self, kind: FaultSpec, count: int = 1, **options: Any) -> Fault:
    """Adds a fault: `add("rate_limit", 2, retry_after=0.3)` or `add(Fault(...))`."""
    if isinstance(kind, str) and ":" not in kind and "," not in kind:
      fault = Fault.from_spec({"kind": kind, "count": count, **options})
    else:
      fault = Fault.from_spec(kind)
    with self._lock:
      self._faults.append(fault)
    return fault

  def extend(self, specs: Iterable[FaultSpec]) -> list[Fault]:
    faults = [Fault.from_spec(s) for s in specs]
    with self._lock:
      self._faults.extend(faults)
    return faults

  def replace(self, specs: Iterable[FaultSpec]) -> list[Fault]:
    faults = [Fault.from_spec(s) for s in specs]
    with self._lock:
      self._faults = faults
    return faults

  def clear(self) -> None:
    with self._lock:
      self._faults = []

  def take(self, flavour: str, path: str, model: str | None) -> Fault | None:
    """Returns the first matching fault that fires for this request, using it up."""
    with self._lock:
      for fault in self._faults:
        if fault.matches(flavour, path, model) and fault.roll():
          fault.fired += 1
          if fault.count > 0:
            fault.count -= 1
          return fault
    return None

  def to_list(self) -> list[dict[str, Any]]:
    with self._lock:
      return [f.to_dict() for f in self._faults]

  def __iter__(self):
    with self._lock:
      return iter(list(self._faults))

  def __len__(self) -> int:
    with self._lock:
      return len(self._faults)


# ---------------------------------------------------------------------------
# Rate limits (sliding 60 s window per model).

@dataclasses.dataclass
class RateLimit:
  """Requests and tokens (prompt + completion) per minute; None = unlimited."""
  rpm: int | None = None
  tpm: int | None = None


@dataclasses.dataclass
class _WindowState:
  limit: RateLimit
  requests: int
  tokens: int
  reset_requests: float
  reset_tokens: float


class _Window:
  """Admitted requests of one model in the last 60 s, as mutable [time, tokens] entries."""

  def __init__(self, limit: RateLimit):
    self.limit = limit
    self.events: collections.deque[list[float]] = collections.deque()

  def _prune(self, now: float) -> None:
    while self.events and self.events[0][0] <= now - WINDOW_SECONDS:
      self.events.popleft()

  def admit(self, now: float, tokens: int) -> tuple[list[float] | None, float]:
    """Records the request and returns its entry, or (None, seconds to wait)."""
    self._prune(now)
    wait = max(self._request_wait(now), self._token_wait(now, tokens))
    if wait > 0:
      return None, wait
    entry = [now, float(tokens)]
    self.events.append(entry)
    return entry, 0.0

  def _request_wait(self, now: float) -> float:
    rpm = self.limit.rpm
    if rpm is None or len(self.events) < rpm:
      return 0.0
    if rpm <= 0:
      return WINDOW_SECONDS
    return self.events[len(self.events) - rpm][0] + WINDOW_SECONDS - now

  def _token_wait(self, now: float, tokens: int) -> float:
    tpm = self.limit.tpm
    used = sum(e[1] for e in self.events)
    if tpm is None or used + tokens <= tpm:
      return 0.0
    need, freed = used + tokens - tpm, 0.0
    for at, spent in self.events:
      freed += spent
      if freed >= need:
        return at + WINDOW_SECONDS - now
    return WINDOW_SECONDS

  def state(self, now: float) -> _WindowState:
    self._prune(now)
    last_spend = [e[0] for e in self.events if e[1] > 0]
    return _WindowState(
      limit=self.limit,
      requests=len(self.events),
      tokens=int(sum(e[1] for e in self.events)),
      reset_requests=self.events[-1][0] + WINDOW_SECONDS - now if self.events else 0.0,
      reset_tokens=last_spend[-1] + WINDOW_SECONDS - now if last_spend else 0.0)


def _go_duration(seconds: float) -> str:
  """OpenAI-style reset durations: "12ms", "6s", "1m30s"."""
  seconds = max(0.0, seconds)
  if seconds < 1:
    return f"{math.ceil(seconds * 1000)}ms"
  if seconds < 60:
    return f"{round(seconds, 3):g}s"
  minutes, rest = divmod(seconds, 60)
  return f"{int(minutes)}m{round(rest, 3):g}s"


def _rfc3339_in(seconds: float) -> str:
  at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)
  return at.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _seconds_text(seconds: float) -> str:
  """Whole seconds as an integer, else a short decimal (both SDKs parse floats)."""
  return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:.6g}"


def _rate_headers(flavour: str, state: _WindowState) -> dict[str, str]:
  headers: dict[str, str] = {}
  for unit, cap, used, reset in (
      ("requests", state.limit.rpm, state.requests, state.reset_requests),
      ("tokens", state.limit.tpm, state.tokens, state.reset_tokens)):
    if cap is None:
      continue
    remaining = str(max(0, cap - used))
    if flavour == OPENAI:
      headers[f"x-ratelimit-limit-{unit}"] = str(cap)
      headers[f"x-ratelimit-remaining-{unit}"] = remaining
      headers[f"x-ratelimit-reset-{unit}"] = _go_duration(reset)
    else:
      headers[f"anthropic-ratelimit-{unit}-limit"] = str(cap)
      headers[f"anthropic-ratelimit-{unit}-remaining"] = remaining
      headers[f"anthropic-ratelimit-{unit}-reset"] = _rfc3339_in(reset)
  return headers


def _retry_headers(flavour: str, seconds: float) -> dict[str, str]:
  """`retry-after` (+ `retry-after-ms` for OpenAI, which both SDKs prefer when present)."""
  headers = {"retry-after": _seconds_text(seconds)}
  if flavour == OPENAI:
    headers["retry-after-ms"] = str(math.ceil(seconds * 1000))
  return headers


# ---------------------------------------------------------------------------
# Errors in each provider's shape.

_OPENAI_ERROR_TYPES = {
  400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
  405: "invalid_request_error", 413: "invalid_request_error", 429: "requests"}
_ANTHROPIC_ERROR_TYPES = {
  400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
  404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
  429: "rate_limit_error", 529: "overloaded_error"}
_REASONS = {529: "Overloaded"}


class _ApiError(Exception):
  """An error answer; rendered in the requesting provider's JSON shape."""

  def __init__(
      self, status: int, message: str, *, code: str | None = None, param: str | None = None,
      openai_type: str | None = None, headers: Mapping[str, str] | None = None):
    super().__init__(message)
    self.status = status
    self.message = message
    self.code = code
    self.param = param
    self.openai_type = openai_type
    self.headers = dict(headers or {})

  def body(self, flavour: str, request_id: str) -> dict[str, Any]:
    if flavour == ANTHROPIC:
      kind = _ANTHROPIC_ERROR_TYPES.get(self.status, "api_error")
      return {"type": "error", "error": {"type": kind, "message": self.message},
              "request_id": request_id}
    kind = self.openai_type or _OPENAI_ERROR_TYPES.get(self.status, "server_error")
    return {"error": {"message": self.message, "type": kind, "param": self.param,
                      "code": self.code}}


def _invalid(message: str, param: str | None = None) -> _ApiError:
  return _ApiError(400, message, param=param)


class _Aborted(Exception):
  """The server is stopping while a request waits."""


# ---------------------------------------------------------------------------
# Request parsing.

@dataclasses.dataclass
class _CacheCandidate:
  key: tuple[str, ...]
  tokens: int
  ttl: float | None  # None: the server's default TTL
  long_ttl: bool = False


@dataclasses.dataclass
class _Parsed:
  request: ProviderRequest
  cache: _CacheCandidate | None


def _content_text(content: Any) -> str:
  """Flattens a string or a list of content parts/blocks to its text."""
  if content is None:
    return ""
  if isinstance(content, str):
    return content
  if isinstance(content, list):
    return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
  raise _invalid("message content must be a string or an array of content parts")


def _positive_int(body: Mapping[str, Any], name: str, required: bool = False) -> int | None:
  value = body.get(name)
  if value is None:
    if required:
      raise _invalid(f"{name}: Field required", param=name)
    return None
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise _invalid(f"'{name}' must be a positive integer", param=name)
  return value


def _require_model(body: Mapping[str, Any]) -> str:
  model = body.get("model")
  if not isinstance(model, str) or not model:
    raise _invalid("you must provide a model parameter", param="model")
  return model


def _require_messages(body: Mapping[str, Any]) -> list[Any]:
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise _invalid("'messages' must be a non-empty array", param="messages")
  if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
    raise _invalid("each message needs a 'role'", param="messages")
  return messages


def _reject_streaming(body: Mapping[str, Any]) -> None:
  if body.get("stream"):
    raise _invalid("stream=true is not supported by the local provider server", param="stream")


def _stop_list(value: Any) -> list[str]:
  if value is None:
    return []
  if isinstance(value, str):
    return [value]
  if isinstance(value, list) and all(isinstance(v, str) for v in value):
    return value
  raise _invalid("stop sequences must be a string or an array of strings", param="stop")


def _parse_openai(body: dict[str, Any]) -> _Parsed:
  model = _require_model(body)
  messages = _require_messages(body)
  _reject_streaming(body)
  if body.get("n") not in (None, 1):
    raise _invalid("only n=1 is supported by the local provider server", param="n")
  logprobs = bool(body.get("logprobs"))
  top = body.get("top_logprobs")
  if top is not None:
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
      raise _invalid("'top_logprobs' must be an integer between 0 and 20", param="top_logprobs")
    if not logprobs:
      raise _invalid("'logprobs' must be true when 'top_logprobs' is set", param="logprobs")
  max_tokens = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
  system: list[str] = []
  turns: list[dict[str, str]] = []
  for message in messages:
    text = _content_text(message.get("content"))
    if message["role"] in ("system", "developer"):
      system.append(text)
    else:
      turns.append({"role": message["role"], "content": text})
  cache = None
  if messages[0]["role"] in ("system", "developer"):
    cache = _CacheCandidate((OPENAI, model, system[0]), count_tokens(system[0]), None)
  prompt = sum(map(count_tokens, system)) + sum(count_tokens(t["content"]) for t in turns)
  request = ProviderRequest(
    OPENAI, model, "\n\n".join(system), turns, max_tokens, logprobs, top or 0,
    _stop_list(body.get("stop")), prompt, body)
  return _Parsed(request, cache)


def _system_blocks(system: Any) -> list[dict[str, Any]]:
  if system is None:
    return []
  if isinstance(system, str):
    return [{"type": "text", "text": system}]
  if isinstance(system, list) and all(
      isinstance(b, dict) and isinstance(b.get("text"), str) for b in system):
    return system
  raise _invalid("system: must be a string or an array of text blocks", param="system")


def _anthropic_cache(model: str, blocks: list[dict[str, Any]]) -> _CacheCandidate | None:
  """The system prefix up to the last block carrying `cache_control`."""
  marked = [i for i, b in enumerate(blocks) if b.get("cache_control")]
  if not marked:
    return None
  prefix = [b["text"] for b in blocks[:marked[-1] + 1]]
  control = blocks[marked[-1]]["cache_control"]
  long_ttl = isinstance(control, dict) and control.get("ttl") == "1h"
  return _CacheCandidate(
    (ANTHROPIC, model, *prefix), sum(map(count_tokens, prefix)),
    3600.0 if long_ttl else None, long_ttl)


def _parse_anthropic(body: dict[str, Any]) -> _Parsed:
  model = _require_model(body)
  max_tokens = _positive_int(body, "max_tokens", required=True)
  messages = _require_messages(body)
  _reject_streaming(body)
  blocks = _system_blocks(body.get("system"))
  turns = [{"role": m["role"], "content": _content_text(m.get("content"))} for m in messages]
  prompt = (sum(count_tokens(b["text"]) for b in blocks)
            + sum(count_tokens(t["content"]) for t in turns))
  request = ProviderRequest(
    ANTHROPIC, model, "\n\n".join(b["text"] for b in blocks), turns, max_tokens, False, 0,
    _stop_list(body.get("stop_sequences")), prompt, body)
  return _Parsed(request, _anthropic_cache(model, blocks))


# ---------------------------------------------------------------------------
# Shaping the answer.

@dataclasses.dataclass
class _Result:
  text: str
  tokens: list[TokenLogprob]
  stop: str  # "end", "stop_sequence" or "max_tokens"
  stop_sequence: str | None = None


def _first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
  hits = [(text.find(s), s) for s in stops if s and s in text]
  return min(hits) if hits else None


def _tokens_before(tokens: list[TokenLogprob], end: int) -> list[TokenLogprob]:
  kept, position = [], 0
  for item in tokens:
    position += len(item.token)
    if position > end:
      break
    kept.append(item)
  return kept


def _finish(request: ProviderRequest, completion: Completion, truncate: bool) -> _Result:
  """Applies stop sequences, max_tokens and the `truncated` fault to a completion."""
  given = completion.token_logprobs
  tokens = list(given) if given is not None else synthetic_logprobs(completion.text)
  result = _Result(completion.text, tokens, "end")
  stop = _first_stop(result.text, request.stop)
  if stop:
    result = _Result(result.text[:stop[0]], _tokens_before(tokens, stop[0]), "stop_sequence",
                     stop[1])
  keep = len(result.tokens)
  if truncate:
    keep = max(min(1, keep), keep // 2)
  if request.max_tokens is not None:
    keep = min(keep, request.max_tokens)
  if truncate or keep < len(result.tokens):
    kept = result.tokens[:keep]
    result = _Result("".join(t.token for t in kept), kept, "max_tokens")
  return result


_OPENAI_FINISH = {"end": "stop", "stop_sequence": "stop", "max_tokens": "length"}
_ANTHROPIC_STOP = {"end": "end_turn", "stop_sequence": "stop_sequence", "max_tokens": "max_tokens"}


def _logprob_entry(token: str, logprob: float) -> dict[str, Any]:
  return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _openai_logprobs(tokens: list[TokenLogprob], k: int) -> dict[str, Any]:
  content = []
  for item in tokens:
    entry = _logprob_entry(item.token, item.logprob)
    entry["top_logprobs"] = [_logprob_entry(t, lp) for t, lp in _top_k(item, k)]
    content.append(entry)
  return {"content": content, "refusal": None}


def _openai_body(request: ProviderRequest, result: _Result, cached: int, empty: bool,
                 reasoning: int = 0) -> dict[str, Any]:
  completion_tokens = len(result.tokens) + reasoning
  choice = {
    "index": 0,
    "message": {"role": "assistant", "content": result.text, "refusal": None,
                "annotations": []},
    "logprobs": _openai_logprobs(result.tokens, request.top_logprobs)
    if request.logprobs else None,
    "finish_reason": _OPENAI_FINISH[result.stop],
  }
  return {
    "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
    "object": "chat.completion",
    "created": int(time.time()),
    "model": request.model,
    "choices": [] if empty else [choice],
    "usage": {
      "prompt_tokens": request.prompt_tokens,
      "completion_tokens": completion_tokens,
      "total_tokens": request.prompt_tokens + completion_tokens,
      "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
      "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
                                    "accepted_prediction_tokens": 0,
                                    "rejected_prediction_tokens": 0},
    },
    "service_tier": "default",
    "system_fingerprint": "fp_tierflow_local",
  }


def _anthropic_body(
    request: ProviderRequest, result: _Result, created: int, read: int, long_ttl: bool,
    empty: bool) -> dict[str, Any]:
  return {
    "id": f"msg_{uuid.uuid4().hex[:24]}",
    "type": "message",
    "role": "assistant",
    "model": request.model,
    "content": [] if empty else [{"type": "text", "text": result.text}],
    "stop_reason": _ANTHROPIC_STOP[result.stop],
    "stop_sequence": result.stop_sequence,
    "usage": {
      "input_tokens": request.prompt_tokens - created - read,
      "output_tokens": len(result.tokens),
      "cache_creation_input_tokens": created,
      "cache_read_input_tokens": read,
      "cache_creation": {"ephemeral_5m_input_tokens": 0 if long_ttl else created,
                         "ephemeral_1h_input_tokens": created if long_ttl else 0},
      "service_tier": "standard",
    },
  }


# Looks like the start of a chat completion, then stops: not valid JSON.
_MALFORMED_BODY = b'{"id": "chatcmpl-malformed", "object": "chat.completion", "choices": [{"ind'


# ---------------------------------------------------------------------------
# Request log.

@dataclasses.dataclass
class RequestRecord:
  """One API request as the server saw it (credentials removed from headers)."""
  method: str
  path: str
  flavour: str
  headers: dict[str, str]
  received_at: float
  model: str | None = None
  body: Any = None
  status: int | None = None
  fault: str | None = None
  duration_s: float | None = None
  usage: dict | None = None  # what the answer billed (its "usage" object)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _redact(headers: Mapping[str, str]) -> dict[str, str]:
  return {k: v for k, v in headers.items() if k.lower() not in _SENSITIVE_HEADERS}


# ---------------------------------------------------------------------------
# The server.

@dataclasses.dataclass
class _Incoming:
  method: str
  target: str
  headers: dict[str, str]  # lower-cased names
  body: bytes


@dataclasses.dataclass
class _Outgoing:
  status: int
  body: bytes
  headers: dict[str, str] = dataclasses.field(default_factory=dict)


def _json_out(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> _Outgoing:
  out = _Outgoing(status, json.dumps(payload).encode("utf-8"), dict(headers or {}))
  out.headers["content-type"] = "application/json"
  return out


def _flavour_for(path: str, headers: Mapping[str, str]) -> str:
  if path == "/v1/chat/completions":
    return OPENAI
  if path == "/v1/messages" or "anthropic-version" in headers:
    return ANTHROPIC
  return OPENAI


def _presented_key(flavour: str, headers: Mapping[str, str]) -> str | None:
  """The API key a client sent (Anthropic: `x-api-key`, or Bearer as SDK 2.x sends it)."""
  if flavour == ANTHROPIC and "x-api-key" in headers:
    return headers["x-api-key"]
  scheme, _, token = headers.get("authorization", "").partition(" ")
  return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class LocalProviderServer:
  """OpenAI- and Anthropic-compatible HTTP endpoints backed by a local `Responder`.

  Binds `host:port` (port 0 = a free port) on `start()`; use as a context manager.
  models: listed by GET /v1/models; with strict_models, other models get a 404.
  *_api_key: when set, requests must present that key (else 401 in the provider's shape).
  latency_seconds: added to every completion answer. rate_limits: {model or "*": RateLimit}.
  openai_cache_min_tokens: a leading system message at least this long is cached
  automatically (approximates OpenAI's >= 1024-token prefix caching).
  anthropic_cache_min_tokens: below this, `cache_control` prefixes are not cached.
  clock: monotonic time source for rate windows and cache TTLs (tests pass a fake one).
  emulate: model names whose requests must follow that real model's rules
  (`provider_rules`: a GPT-5 request with a temperature gets the 400 api.openai.com
  gives, and its reasoning tokens eat into max_completion_tokens); "*" (the default) =
  every model the rules know; () = none.
  """

  def __init__(
      self,
      responder: Responder | None = None,
      *,
      host: str = "127.0.0.1",
      port: int = 0,
      models: Sequence[str] = DEFAULT_MODELS,
      strict_models: bool = False,
      openai_api_key: str | None = None,
      anthropic_api_key: str | None = None,
      latency_seconds: float = 0.0,
      rate_limits: Mapping[str, RateLimit] | None = None,
      faults: Iterable[FaultSpec] = (),
      openai_cache_min_tokens: int = 1024,
      anthropic_cache_min_tokens: int = 0,
      cache_ttl_seconds: float = DEFAULT_CACHE_TTL,
      max_logged_requests: int = 1000,
      emulate: Sequence[str] = ("*",),
      clock: Callable[[], float] = time.monotonic):
    self.responder: Responder = responder or EchoResponder()
    self.host = host
    self.models = list(models)
    self.strict_models = strict_models
    self.openai_api_key = openai_api_key
    self.anthropic_api_key = anthropic_api_key
    self.latency_seconds = latency_seconds
    self.faults = FaultSet(faults)
    self.batches = BatchEndpoints(self._answer_batched)
    self.openai_cache_min_tokens = openai_cache_min_tokens
    self.anthropic_cache_min_tokens = anthropic_cache_min_tokens
    self.cache_ttl_seconds = cache_ttl_seconds
    self.emulate = tuple(emulate)
    self._requested_port = port
    self._clock = clock
    self._lock = threading.Lock()
    self._limits: dict[str, RateLimit] = dict(rate_limits or {})
    self._windows: dict[str, _Window] = {}
    self._cache: dict[tuple[str, ...], float] = {}
    self._log: collections.deque[RequestRecord] = collections.deque(maxlen=max_logged_requests)
    self._counts: collections.Counter[tuple[str, str, str | None, int | None]] = \
      collections.Counter()
    self._fault_counts: collections.Counter[str] = collections.Counter()
    self._stopping = threading.Event()
    self._httpd: _HTTPServer | None = None
    self._thread: threading.Thread | None = None
    self._created = int(time.time())

  # -- lifecycle ------------------------------------------------------------

  def start(self) -> LocalProviderServer:
    if self._httpd is not None:
      return self
    self._stopping = threading.Event()
    self._httpd = _HTTPServer((self.host, self._requested_port), self)
    self._thread = threading.Thread(
      target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
      name=f"provider-server-{self.port}", daemon=True)
    self._thread.start()
    log.info("local providers listening on %s", self.url)
    return self

  def stop(self) -> None:
    httpd, self._httpd = self._httpd, None
    if httpd is None:
      return
    self._stopping.set()  # wakes requests sleeping on latency/timeout faults
    httpd.stopped = True  # kept-alive connections are closed instead of answered
    httpd.shutdown()
    httpd.server_close()
    if self._thread is not None:
      self._thread.join(timeout=5)
    log.info("local providers stopped")

  def __enter__(self) -> LocalProviderServer:
    return self.start()

  def __exit__(self, *exc_info: Any) -> None:
    self.stop()

  @property
  def port(self) -> int:
    if self._httpd is None:
      raise RuntimeError("server is not running; call start() first")
    return self._httpd.server_address[1]

  @property
  def url(self) -> str:
    host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
    return f"http://{host}:{self.port}"

  @property
  def openai_base_url(self) -> str:
    return f"{self.url}/v1"

  @property
  def anthropic_base_url(self) -> str:
    return self.url

  # -- configuration --------------------------------------------------------

  def set_faults(self, specs: Iterable[FaultSpec]) -> list[Fault]:
    """Replaces all faults."""
    return self.faults.replace(specs)

  def set_rate_limit(self, model: str, rpm: int | None = None, tpm: int | None = None) -> None:
    """Per-model limits ("*" = every model without its own entry); both None removes them."""
    with self._lock:
      self._windows = {m: w for m, w in self._windows.items() if m != model}
      if rpm is None and tpm is None:
        self._limits.pop(model, None)
      else:
        self._limits[model] = RateLimit(rpm, tpm)

  def config(self) -> dict[str, Any]:
    with self._lock:
      limits = {m: dataclasses.asdict(limit) for m, limit in self._limits.items()}
    return {"latency_seconds": self.latency_seconds, "rate_limits": limits,
            "models": self.models}

  # -- observation ----------------------------------------------------------

  @property
  def requests(self) -> list[RequestRecord]:
    """Recent API requests, oldest first (control requests are not logged)."""
    with self._lock:
      return list(self._log)

  def stats(self) -> dict[str, Any]:
    """Request counts by path, model, status and fault, plus the recent request log."""
    with self._lock:
      counts = dict(self._counts)
      faults = dict(self._fault_counts)
      recent = [r.to_dict() for r in self._log]
    return {
      "total": sum(counts.values()),
      "by_path": _tally(counts, 1), "by_model": _tally(counts, 2),
      "by_status": _tally(counts, 3), "by_fault": faults,
      "counts": [{"method": k[0], "path": k[1], "model": k[2], "status": k[3], "count": n}
                 for k, n in counts.items()],
      "requests": recent,
    }

  def reset_stats(self) -> None:
    with self._lock:
      self._log.clear()
      self._counts.clear()
      self._fault_counts.clear()

  # -- request handling -----------------------------------------------------

  def _handle(self, incoming: _Incoming) -> _Outgoing:
    path = urlsplit(incoming.target).path.rstrip("/") or "/"
    if path.startswith("/_control"):
      return self._control(incoming.method, path, incoming.body)
    flavour = _flavour_for(path, incoming.headers)
    record = RequestRecord(incoming.method, path, flavour, _redact(incoming.headers), time.time())
    request_id = f"req_{uuid.uuid4().hex[:24]}"
    try:
      out = self._route(incoming, path, flavour, record)
    except _ApiError as err:
      out = _json_out(err.status, err.body(flavour, request_id), err.headers)
    except _Aborted:
      raise
    except Exception as err:  # a bug or a failing responder: answer like the API would
      log.exception("local provider failed on %s %s", incoming.method, path)
      error = _ApiError(500, f"local provider error: {type(err).__name__}: {err}")
      out = _json_out(500, error.body(flavour, request_id))
    out.headers["x-request-id" if flavour == OPENAI else "request-id"] = request_id
    if record.model:
      out.headers = {**self._limit_headers(flavour, record.model), **out.headers}
    self._finish_record(record, out.status)
    return out

  def _route(self, incoming: _Incoming, path: str, flavour: str,
             record: RequestRecord) -> _Outgoing:
    method = incoming.method
    if method == "POST" and path in ("/v1/chat/completions", "/v1/messages"):
      return self._complete(incoming, path, flavour, record)
    if method == "GET" and (path == "/v1/models" or path.startswith("/v1/models/")):
      self._authenticate(flavour, incoming.headers)
      return self._models(flavour, path)
    if path.startswith(("/v1/files", "/v1/batches", "/v1/messages/batches")):
      self._authenticate(flavour, incoming.headers)
      try:
        routed = self.batches.route(method, path, incoming.headers, incoming.body, self.url)
      except KeyError as e:
        raise _ApiError(404, str(e.args[0]), code="not_found") from None
      except BatchRefused as e:
        raise _ApiError(e.status, str(e), code="invalid_request") from None
      except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise _ApiError(400, str(e), code="invalid_request") from None
      if routed is not None:
        status, payload, kind = routed
        if kind == "bytes":
          return _Outgoing(status, payload, {"content-type": "application/binary"})
        return _json_out(status, payload)
    raise _ApiError(404, f"Invalid URL ({method} {path})", code="unknown_url")

  def _answer_batched(self, flavour: str, body: dict, headers: dict) -> tuple[int, Any]:
    """One request of a batch, through the synchronous path (rules, responder, usage,
    faults) but not the rate limits: (status, JSON payload)."""
    path = "/v1/chat/completions" if flavour == OPENAI else "/v1/messages"
    out = self._handle(_Incoming("POST", path, {**headers, "x-local-batch": "1",
                                                "content-type": "application/json"},
                                 json.dumps(body).encode()))
    return out.status, json.loads(out.body or b"{}")

  def _finish_record(self, record: RequestRecord, status: int) -> None:
    record.status = status
    record.duration_s = round(time.time() - record.received_at, 6)
    with self._lock:
      self._log.append(record)
      self._counts[(record.method, record.path, record.model, status)] += 1
      if record.fault:
        self._fault_counts[record.fault] += 1
    log.debug("%s %s model=%s status=%s fault=%s headers=%s", record.method, record.path,
              record.model, status, record.fault, record.headers)

  def _authenticate(self, flavour: str, headers: Mapping[str, str]) -> None:
    expected = self.openai_api_key if flavour == OPENAI else self.anthropic_api_key
    if expected is None:
      return
    given = _presented_key(flavour, headers)
    if given is None:
      message = ("You didn't provide an API key." if flavour == OPENAI
                 else "x-api-key header is required")
      raise _ApiError(401, message, code="missing_api_key")
    if not hmac.compare_digest(given.encode(), expected.encode()):
      message = "Incorrect API key provided." if flavour == OPENAI else "invalid x-api-key"
      raise _ApiError(401, message, code="invalid_api_key")

  def _models(self, flavour: str, path: str) -> _Outgoing:
    wanted = path[len("/v1/models/"):] if path.startswith("/v1/models/") else None
    if wanted is not None and wanted not in self.models:
      raise _ApiError(404, f"The model '{wanted}' does not exist", code="model_not_found")
    names = [wanted] if wanted is not None else self.models
    if flavour == OPENAI:
      items = [{"id": m, "object": "model", "created": self._created, "owned_by": "tierflow-local"}
               for m in names]
      return _json_out(200, items[0] if wanted else {"object": "list", "data": items})
    created = datetime.datetime.fromtimestamp(self._created, datetime.timezone.utc)
    items = [{"type": "model", "id": m, "display_name": m,
              "created_at": created.isoformat().replace("+00:00", "Z")} for m in names]
    if wanted:
      return _json_out(200, items[0])
    return _json_out(200, {"data": items, "has_more": False,
                           "first_id": names[0] if names else None,
                           "last_id": names[-1] if names else None})

  def _complete(self, incoming: _Incoming, path: str, flavour: str,
                record: RequestRecord) -> _Outgoing:
    body = _parse_body(incoming.body)
    record.body = body
    record.model = body.get("model") if isinstance(body.get("model"), str) else None
    self._authenticate(flavour, incoming.headers)
    rules = self._rules(record.model)
    if rules is not None:
      try:
        rules.check(body)
      except RequestRejected as e:
        raise _ApiError(400, e.message, param=e.param, code=e.code) from None
    parsed = (_parse_openai if flavour == OPENAI else _parse_anthropic)(body)
    request = parsed.request
    if self.strict_models and request.model not in self.models:
      raise _ApiError(404, f"The model '{request.model}' does not exist",
                      param="model", code="model_not_found")
    batched = "x-local-batch" in incoming.headers  # batches have their own limits
    if not batched:
      self._sleep(self.latency_seconds)
    entry = None if batched else self._admit(flavour, request)
    fault = self.faults.take(flavour, path, request.model)
    record.fault = fault.kind if fault else None
    if fault and fault.kind in _ERROR_FAULTS:
      raise _fault_error(fault, flavour)
    if fault and fault.kind == "timeout":
      self._sleep(fault.seconds)
    truncate = bool(fault and fault.kind == "truncated")
    if fault and fault.kind == "injection":  # a model that follows injected instructions
      request = dataclasses.replace(request, follow_injections=True)
    reasoning = rules.reasoning_tokens(body) if rules is not None else 0
    limit = rules.token_limit(body) if rules is not None else None
    if reasoning and limit is not None and reasoning >= limit:
      reasoning = limit  # the whole allowance went on reasoning: an empty answer
      result = _Result("", [], "max_tokens")
    else:
      if reasoning and limit is not None:
        request = dataclasses.replace(request, max_tokens=limit - reasoning)
      result = _finish(request, self._respond(request), truncate)
    self._charge(entry, len(result.tokens) + reasoning)
    if fault and fault.kind == "malformed":
      return _Outgoing(200, _MALFORMED_BODY, {"content-type": "application/json"})
    empty = bool(fault and fault.kind == "empty_choices")
    hit = self._cache_hit(flavour, parsed.cache, rules)
    if flavour == OPENAI:
      cached = parsed.cache.tokens if hit and parsed.cache else 0
      payload = _openai_body(request, result, cached, empty, reasoning)
    else:
      created = parsed.cache.tokens if parsed.cache and hit is False else 0
      read = parsed.cache.tokens if parsed.cache and hit else 0
      long_ttl = bool(parsed.cache and parsed.cache.long_ttl)
      payload = _anthropic_body(request, result, created, read, long_ttl, empty)
    record.usage = payload["usage"]
    return _json_out(200, payload)

  def _rules(self, model: str | None) -> ModelRules | None:
    if model is None or not self.emulate:
      return None
    if "*" in self.emulate or model in self.emulate:
      return rules_for(model)
    return None

  def _respond(self, request: ProviderRequest) -> Completion:
    completion = self.responder(request)
    if isinstance(completion, str):
      return Completion(completion)
    return completion

  def _sleep(self, seconds: float) -> None:
    if seconds > 0 and self._stopping.wait(seconds):
      raise _Aborted()

  # -- caching --------------------------------------------------------------

  def _cache_hit(self, flavour: str, candidate: _CacheCandidate | None,
                 rules: ModelRules | None = None) -> bool | None:
    """True: prefix read from cache; False: written now; None: not cacheable. An
    emulated model caches from its real minimum (``provider_rules``)."""
    minimum = self.openai_cache_min_tokens if flavour == OPENAI else self.anthropic_cache_min_tokens
    if rules is not None:
      minimum = rules.cache_min_tokens
    if candidate is None or candidate.tokens == 0 or candidate.tokens < minimum:
      return None
    now = self._clock()
    ttl = candidate.ttl or self.cache_ttl_seconds
    with self._lock:
      if len(self._cache) > 10_000:
        self._cache = {k: t for k, t in self._cache.items() if t > now}
      hit = self._cache.get(candidate.key, -math.inf) > now
      self._cache[candidate.key] = now + ttl  # a read refreshes the TTL, like the real APIs
    return hit

  # -- rate limits ----------------------------------------------------------

  def _window(self, model: str) -> _Window | None:
    limit = self._limits.get(model) or self._limits.get("*")
    if limit is None:
      return None
    window = self._windows.get(model)
    if window is None or window.limit is not limit:
      window = self._windows[model] = _Window(limit)
    return window

  def _admit(self, flavour: str, request: ProviderRequest) -> list[float] | None:
    with self._lock:
      window = self._window(request.model)
      if window is None:
        return None
      entry, wait = window.admit(self._clock(), request.prompt_tokens)
      tpm = window.limit.tpm
    if entry is not None:
      return entry
    headers = {"retry-after": str(max(1, math.ceil(wait)))}  # whole seconds, like the APIs
    if flavour == OPENAI:
      headers["retry-after-ms"] = str(math.ceil(wait * 1000))
    if tpm is not None and request.prompt_tokens > tpm:
      headers["x-should-retry"] = "false"  # it will never fit; retrying cannot help
      raise _ApiError(429, f"Request too large for {request.model}: limit {tpm} tokens per "
                      f"minute, requested {request.prompt_tokens}.", code="rate_limit_exceeded",
                      openai_type="tokens", headers=headers)
    raise _ApiError(429, f"Rate limit reached for {request.model}. Please try again in "
                    f"{wait:.3f}s.", code="rate_limit_exceeded", headers=headers)

  def _charge(self, entry: list[float] | None, completion_tokens: int) -> None:
    if entry is not None:
      with self._lock:
        entry[1] += completion_tokens

  def _limit_headers(self, flavour: str, model: str) -> dict[str, str]:
    with self._lock:
      window = self._window(model)
      state = window.state(self._clock()) if window else None
    return _rate_headers(flavour, state) if state else {}

  # -- control API ----------------------------------------------------------

  def _control(self, method: str, path: str, raw: bytes) -> _Outgoing:
    try:
      return self._control_route(method, path, raw)
    except (ValueError, TypeError, _ApiError) as err:
      return _json_out(400, {"error": str(err)})

  def _control_route(self, method: str, path: str, raw: bytes) -> _Outgoing:
    if path == "/_control/faults":
      if method == "POST":
        self._apply_fault_post(_parse_body(raw, allow_list=True))
      elif method == "DELETE":
        self.faults.clear()
      return _json_out(200, {"faults": self.faults.to_list()})
    if path == "/_control/stats":
      if method == "DELETE":
        self.reset_stats()
      return _json_out(200, self.stats())
    if path == "/_control/config":
      if method == "POST":
        self._apply_config(_parse_body(raw))
      return _json_out(200, self.config())
    return _json_out(404, {"error": f"unknown control route {method} {path}"})

  def _apply_fault_post(self, payload: Any) -> None:
    """Accepts one fault, a list of faults, or {"faults": [...], "replace": bool}."""
    if isinstance(payload, dict) and "faults" in payload:
      specs, replace = payload["faults"], bool(payload.get("replace"))
    else:
      specs, replace = (payload if isinstance(payload, list) else [payload]), False
    (self.faults.replace if replace else self.faults.extend)(specs)

  def _apply_config(self, payload: dict[str, Any]) -> None:
    if "latency_seconds" in payload:
      self.latency_seconds = float(payload["latency_seconds"])
    for model, limit in (payload.get("rate_limits") or {}).items():
      limit = limit or {}
      self.set_rate_limit(model, limit.get("rpm"), limit.get("tpm"))


def _tally(counts: Mapping[tuple[Any, ...], int], index: int) -> dict[str, int]:
  totals: collections.Counter[str] = collections.Counter()
  for key, n in counts.items():
    totals[str(key[index])] += n
  return dict(totals)


def _parse_body(raw: bytes, allow_list: bool = False) -> Any:
  if not raw:
    raise _invalid("We could not parse the JSON body of your request: the body is empty.")
  try:
    body = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError):
    raise _invalid("We could not parse the JSON body of your request.") from None
  if not isinstance(body, dict) and not (allow_list and isinstance(body, list)):
    raise _invalid("The request body must be a JSON object.")
  return body


def _fault_error(fault: Fault, flavour: str) -> _ApiError:
  headers: dict[str, str] = {}
  retry_after = fault.retry_after
  if fault.kind == "rate_limit":
    retry_after = 1.0 if retry_after is None else retry_after
    if flavour == OPENAI:
      headers.update({"x-ratelimit-remaining-requests": "0",
                      "x-ratelimit-reset-requests": _go_duration(retry_after)})
    else:
      headers.update({"anthropic-ratelimit-requests-remaining": "0",
                      "anthropic-ratelimit-requests-reset": _rfc3339_in(retry_after)})
  if retry_after is not None:
    headers.update(_retry_headers(flavour, retry_after))
  if fault.should_retry is not None:
    headers["x-should-retry"] = "true" if fault.should_retry else "false"
  code = {"rate_limit": "rate_limit_exceeded"}.get(fault.kind)
  return _ApiError(_ERROR_FAULTS[fault.kind], _FAULT_MESSAGES[fault.kind], code=code,
                   headers=headers)


class _Handler(BaseHTTPRequestHandler):
  """Thin HTTP adapter: reads the request, lets the provider answer, writes it back."""
  protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs' connection pools expect
  server_version = "tierflow-local-provider"
  sys_version = ""
  timeout = 120  # idle keep-alive connections are closed eventually
  # Headers and body go out in two writes; without TCP_NODELAY, Nagle + delayed ACK adds
  # ~40 ms to every keep-alive response, which would swamp latency/throughput benchmarks.
  disable_nagle_algorithm = True
  server: _HTTPServer

  def do_GET(self) -> None:
    self._dispatch()

  do_POST = do_DELETE = do_PUT = do_PATCH = do_GET

  def _dispatch(self) -> None:
    if self.server.stopped:
      self.close_connection = True
      return
    try:
      length = int(self.headers.get("content-length") or 0)
    except ValueError:
      length = -1
    if not 0 <= length <= MAX_BODY_BYTES:
      self.close_connection = True
      self._send(_json_out(413 if length > 0 else 400, {"error": "bad content-length"}))
      return
    body = self.rfile.read(length) if length else b""
    incoming = _Incoming(self.command, self.path,
                         {k.lower(): v for k, v in self.headers.items()}, body)
    try:
      out = self.server.provider._handle(incoming)
    except _Aborted:
      self.close_connection = True
      return
    self._send(out)

  def _send(self, out: _Outgoing) -> None:
    try:
      self.send_response(out.status, _REASONS.get(out.status))
      for name, value in out.headers.items():
        self.send_header(name, value)
      self.send_header("content-length", str(len(out.body)))
      self.end_headers()
      self.wfile.write(out.body)
    except (BrokenPipeError, ConnectionResetError):  # the client gave up (e.g. timed out)
      self.close_connection = True

  def log_message(self, format: str, *args: Any) -> None:  # request line only, never headers
    log.debug("%s - %s", self.address_string(), format % args)


class _HTTPServer(ThreadingHTTPServer):
  allow_reuse_address = True
  daemon_threads = True
  block_on_close = False
  request_queue_size = 256  # concurrency benchmarks open many connections at once

  def __init__(self, address: tuple[str, int], provider: LocalProviderServer):
    self.provider = provider
    self.stopped = False
    super().__init__(address, _Handler)


# ---------------------------------------------------------------------------
# Command line.

def _model_number(text: str) -> tuple[str, int]:
  model, sep, number = text.rpartition("=")
  if not sep or not model:
    raise argparse.ArgumentTypeError(f"expected MODEL=N, got {text!r}")
  return model, int(number)


def _fault_arg(text: str) -> Fault:
  try:
    return Fault.from_spec(text)
  except (ValueError, TypeError) as err:
    raise argparse.ArgumentTypeError(str(err)) from None


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="tierflow serve-local",
    description="Serve local OpenAI- and Anthropic-compatible endpoints backed by the keyword "
                "STAND-IN model (deploy/local/standin_model.py): not a language model.")
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
  parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every answer")
  parser.add_argument("--require-key-env", metavar="NAME",
                      help="require the API key stored in this environment variable")
  parser.add_argument("--model", action="append", dest="models", metavar="NAME",
                      help="model to list (repeatable)")
  parser.add_argument("--fault", action="append", default=[], type=_fault_arg,
                      metavar="KIND[:COUNT][,key=value...]",
                      help=f"inject a fault (repeatable); kinds: {', '.join(FAULT_KINDS)}")
  parser.add_argument("--rpm", action="append", default=[], type=_model_number,
                      metavar="MODEL=N", help="requests per minute for a model ('*' = all)")
  parser.add_argument("--tpm", action="append", default=[], type=_model_number,
                      metavar="MODEL=N", help="tokens per minute for a model ('*' = all)")
  parser.add_argument("--emulate", action="append", default=None, metavar="MODEL",
                      help="requests for MODEL must follow that real model's rules, e.g. "
                           "gpt-5-nano (no temperature or logprobs, max_completion_tokens, "
                           "reasoning tokens) or claude-sonnet-4-6; default '*': every model "
                           "it knows (repeatable)")
  parser.add_argument("--no-emulate", action="store_true",
                      help="accept any request shape for every model")
  parser.add_argument("--sampling", action="store_true",
                      help="draw each label from the stand-in's label distribution at the "
                           "request's temperature (default 1), as a sampling model does; "
                           "for trying the small tier's samples")
  parser.add_argument("--print-env", action="store_true",
                      help="print the shell exports that point the bundled configs (and the "
                           "SDKs) at these endpoints, for `eval \"$(tierflow serve-local --port "
                           "N --print-env)\"`, and exit (needs --port)")
  parser.add_argument("--log-level", default="INFO")
  return parser


_STAND_IN_KEY = "local-stand-in-key"  # the endpoints accept any key unless --require-key-env


def env_lines(openai_base_url: str, anthropic_base_url: str, with_keys: bool = True) -> list[str]:
  """The variables the bundled configs (TIERFLOW_*_BASE_URL, the keys they name) and the
  SDKs (OPENAI_BASE_URL, ANTHROPIC_BASE_URL) read, as shell exports."""
  lines = [f"export TIERFLOW_SMALL_BASE_URL={openai_base_url}",
           f"export TIERFLOW_FRONTIER_BASE_URL={anthropic_base_url}",
           f"export OPENAI_BASE_URL={openai_base_url}",
           f"export ANTHROPIC_BASE_URL={anthropic_base_url}"]
  if with_keys:
    lines += [f"export OPENAI_API_KEY={_STAND_IN_KEY}",
              f"export ANTHROPIC_API_KEY={_STAND_IN_KEY}"]
  return lines


def _server_from_args(
    args: argparse.Namespace, parser: argparse.ArgumentParser) -> LocalProviderServer:
  key = None
  if args.require_key_env:
    key = os.environ.get(args.require_key_env)
    if not key:
      parser.error(f"environment variable {args.require_key_env} is not set")
  limits: dict[str, RateLimit] = {}
  for model, rpm in args.rpm:
    limits.setdefault(model, RateLimit()).rpm = rpm
  for model, tpm in args.tpm:
    limits.setdefault(model, RateLimit()).tpm = tpm
  from tierflow_local.standin_model import KeywordStandIn  # answers tierflow's stage prompts
  return LocalProviderServer(
    KeywordStandIn(sampling=args.sampling),
    host=args.host, port=args.port, models=args.models or DEFAULT_MODELS,
    openai_api_key=key, anthropic_api_key=key, latency_seconds=args.latency,
    rate_limits=limits, faults=args.fault,
    emulate=() if args.no_emulate else (args.emulate or ("*",)))


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the server until Ctrl-C, printing the base URLs for the SDKs."""
  parser = _parser()
  args = parser.parse_args(argv)
  if args.print_env:
    if not args.port:
      parser.error("--print-env needs the --port the endpoints listen on")
    url = f"http://{args.host}:{args.port}"
    print("\n".join(env_lines(f"{url}/v1", url, with_keys=not args.require_key_env)))
    return 0
  logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
  server = _server_from_args(args, parser)
  stop = threading.Event()
  for sig in (signal.SIGINT, signal.SIGTERM):  # set, not raise: no half-run handler or join
    signal.signal(sig, lambda *_: stop.set())
  with server:
    print("# tierflow serve-local: the keyword STAND-IN behind the OpenAI and Anthropic wire "
          "formats (not a language model). To point tierflow's bundled configs at it:",
          flush=True)
    print("\n".join(env_lines(server.openai_base_url, server.anthropic_base_url,
                              with_keys=not args.require_key_env)), flush=True)
    while not stop.wait(0.5):
      pass
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
