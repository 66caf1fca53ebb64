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
import functools
import hashlib
import importlib
import logging
import math
import os
import random
import re
import socket
import sys
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

from tierflow.connectors.circuit_breaker import CircuitBreaker, CircuitOpen
from tierflow.connectors.kafka_ledger import USE_WITHIN_S
from tierflow.connectors.providers import ByProvider
from tierflow.prices import Usage

if TYPE_CHECKING:
  from tierflow.config import ModelConfig
  from tierflow.connectors.kafka_ledger import LedgerConfig

__all__ = ["TokenInfo", "ModelReply", "ModelCallError", "ModelClient", "OpenAIChat",
           "AnthropicMessages", "RateLimiter",
           "SharedRateLimiter", "TierUnavailable", "client_for", "systemic",
           "estimate_tokens", "kind_of_status"]

_LOGGER = logging.getLogger(__name__)


def estimate_tokens(text: str) -> int:
  """A deliberately generous token estimate (UTF-8 bytes / 3), for limits and budgets."""
  return math.ceil(len(text.encode("utf-8")) / 3) + 4


class TokenInfo(NamedTuple):
  """One answer token: its text, logprob and alternatives (a tuple: an answer has
  hundreds, built per request)."""
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
  # Earlier attempts of this request that failed in a way the provider may still have
  # billed (a timeout, a dropped connection, an unreadable answer).
  uncertain_attempts: int = 0

  @property
  def truncated(self) -> bool:
    return self.finish_reason in ("length", "max_tokens")


class ModelCallError(Exception):
  """A request that failed after retries. ``kind``: rate_limit, server_error,
  timeout, connection, auth, bad_request, malformed."""

  def __init__(self, kind: str, message: str, status: Optional[int] = None):
    super().__init__(f"{kind}: {message}")
    self.kind = kind
    self.message = message
    self.status = status
    self.uncertain_attempts = 0  # attempts the provider may have billed (see ModelReply)


class TierUnavailable(RuntimeError):
  """A tier failed records for a cause that is not theirs (a refused key or parameter, an
  endpoint down or timing out, an open circuit). Raised instead of writing those records
  as failed, so nothing past them is written or committed and a re-run retries them."""


# Failures no record causes: auth, a parameter the model refuses, the model missing, the
# endpoint down, slow or refusing work after every retry, or a circuit open because of it.
_SYSTEMIC = frozenset({"auth", "bad_request", "not_found", "circuit_open", "connection",
                       "timeout", "server_error", "rate_limit"})
_RECORDS_OWN_400 = ("context length", "context window", "too long", "too many tokens",
                    "maximum context", "prompt is too long", "max_tokens")


def systemic(error: Optional[str]) -> bool:
  """Whether a stage's error (``TierOutcome.error``: ``"kind: message"``) came from the
  tier, not from the record: then every record would fail the same way."""
  if not error:
    return False
  kind, _, message = error.partition(":")
  if kind == "bad_request" and any(w in message.lower() for w in _RECORDS_OWN_400):
    return False  # this record is too long for the model
  return kind in _SYSTEMIC


class _AdaptiveShare:
  """The share of its rpm/tpm limits a limiter uses (``factor``), adapting to the provider:
  a 429 halves it (``throttled``), each answered request raises it by one request per
  minute (``answered``) back up to the whole: additive increase, multiplicative decrease.
  A subclass sets ``rpm`` and ``_lock``."""

  min_factor = 1 / 16
  rpm: Optional[int]
  factor = 1.0

  def throttled(self) -> None:
    """The provider answered 429: halve the limits in force."""
    with self._lock:
      self.factor = max(self.min_factor, self.factor / 2)

  def answered(self) -> None:
    """A request was answered: one more request per minute, up to the configured share."""
    if self.rpm and self.factor < 1:
      with self._lock:
        self.factor = min(1.0, self.factor + 1 / self.rpm)


class RateLimiter(_AdaptiveShare):
  """Requests- and tokens-per-minute limits over a sliding 60 s window (thread-safe).

  The limits are this process's own (``SharedRateLimiter`` shares them between processes
  through the ledger) and adapt to the provider: a 429 halves them (``throttled``), each
  answered request raises them by one request (and its tokens) per minute (``answered``)
  back up to the share: additive increase, multiplicative decrease.
  """

  # The window this side keeps: a little over the provider's 60 s, so a request sent just
  # as its predecessor of a minute ago leaves the window here is not counted in the
  # provider's window still (its clock starts when the request arrives, not when sent).
  window_s = 61.0

  def __init__(self, rpm: Optional[int], tpm: Optional[int], clock=time.monotonic,
               sleep=time.sleep):
    self.rpm, self.tpm = rpm, tpm
    self._clock, self._sleep = clock, sleep
    self._events: deque = deque()  # (time, tokens)
    self._lock = threading.Lock()

  def _limits(self) -> tuple[int, int]:
    rpm = max(1, int(self.rpm * self.factor)) if self.rpm else 0
    tpm = max(1, int(self.tpm * self.factor)) if self.tpm else 0
    return rpm, tpm

  def _wait_for(self, now: float, tokens: int) -> float:
    window = self.window_s
    while self._events and self._events[0][0] <= now - window:
      self._events.popleft()
    rpm, tpm = self._limits()
    wait = 0.0
    if rpm and len(self._events) >= rpm:
      wait = max(wait, self._events[len(self._events) - rpm][0] + window - now)
    if tpm:
      tokens = min(tokens, tpm)
      used = sum(t for _, t in self._events)
      if used + tokens > tpm and self._events:
        freed = 0
        for ts, t in self._events:
          freed += t
          if used - freed + tokens <= tpm:
            wait = max(wait, ts + window - now)
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


class SharedRateLimiter(_AdaptiveShare):
  """An endpoint's rpm/tpm limits shared by every worker process through the ledger
  (``kafka_ledger``): a process claims a few requests' worth of the window at a time
  and sends them within ``USE_WITHIN_S``; the ledger grants claims only while the last
  minute's grants, from every process, leave room. A process that died or restarted
  leaves its grants in the window. A 429 (someone else on the key) halves the limits
  this process claims under; answered requests grow them back (AIMD), as ``RateLimiter``.
  """

  def __init__(self, ledger, scope: str, rpm: Optional[int], tpm: Optional[int],
               clock=time.monotonic, sleep=time.sleep):
    self.rpm, self.tpm = rpm, tpm
    self._ledger, self._scope = ledger, scope
    self._clock, self._sleep = clock, sleep
    self._lock = threading.Lock()
    self._grants: deque = deque()  # [expires (monotonic), requests left, tokens left]

  def _take(self, tokens: int) -> bool:
    now = self._clock()
    while self._grants and (self._grants[0][0] <= now or self._grants[0][1] <= 0):
      self._grants.popleft()
    for grant in self._grants:
      if grant[1] >= 1 and grant[2] >= tokens:
        grant[1] -= 1
        grant[2] -= tokens
        return True
    return False

  def acquire(self, tokens: int) -> float:
    """Blocks until this process holds a grant for a request of ``tokens``; returns
    seconds waited."""
    if not self.rpm and not self.tpm:
      return 0.0
    waited = 0.0
    while True:
      with self._lock:
        if self._take(tokens):
          return waited
        rpm = max(1, int(self.rpm * self.factor)) if self.rpm else 0
        tpm = max(1, int(self.tpm * self.factor)) if self.tpm else 0
        tokens = min(tokens, tpm) if tpm else tokens
        chunk = max(1, min(16, rpm // 32)) if rpm else 16
        if tpm:
          chunk = max(1, min(chunk, tpm // max(1, tokens) // 8))
        asked = self._clock()
        granted, retry_s = self._ledger.claim_rate(self._scope, chunk, chunk * tokens, rpm, tpm)
        if granted:
          # Used within USE_WITHIN_S of the claim, less what the claim's round trip took.
          self._grants.append([asked + USE_WITHIN_S - 0.5, chunk, chunk * tokens])
          continue
      wait = min(max(retry_s, 0.05), 5.0)
      self._sleep(wait)
      waited += wait


_LIMITERS: dict = {}
_BREAKERS: dict = {}
_CLIENTS: dict = {}
_LIMITERS_LOCK = threading.Lock()
_CLIENTS_LOCK = threading.Lock()  # apart: a client makes its limiter under _LIMITERS_LOCK


def _per_process(registry: dict, key: tuple, make, lock: threading.Lock = _LIMITERS_LOCK):
  """The registry's object for an endpoint's settings, made once per process."""
  with lock:
    if key not in registry:
      registry[key] = make()
    return registry[key]


def _limiter_for(cfg: "ModelConfig", ledger: Optional["LedgerConfig"] = None):
  """The endpoint's limiter: shared by every worker process through the ledger when one
  is given (the pipelines'), else this process's own."""
  if ledger is not None and (cfg.rpm or cfg.tpm):
    from tierflow.connectors.kafka_ledger import ledger_for
    scope = f"rate/{cfg.provider}/{cfg.base_url or 'default'}/{cfg.model}"
    return _per_process(_LIMITERS, (scope, cfg.rpm, cfg.tpm, ledger.bootstrap_servers,
                                    ledger.topic),
                        lambda: SharedRateLimiter(ledger_for(ledger), scope, cfg.rpm, cfg.tpm))
  return _per_process(_LIMITERS, (cfg.provider, cfg.base_url, cfg.model, cfg.rpm, cfg.tpm),
                      lambda: RateLimiter(cfg.rpm, cfg.tpm))


def _breaker_for(cfg: "ModelConfig") -> Optional[CircuitBreaker]:
  if not cfg.breaker_failures:
    return None
  key = (cfg.provider, cfg.base_url, cfg.model, cfg.breaker_failures, cfg.breaker_cooldown_s)
  return _per_process(_BREAKERS, key, lambda: CircuitBreaker(
      f"{cfg.provider}:{cfg.model}", cfg.breaker_failures, cfg.breaker_cooldown_s))


def client_for(cfg: "ModelConfig", ledger: Optional["LedgerConfig"] = None) -> "ModelClient":
  """The process's ``ModelClient`` for an endpoint's settings and key, built once under a
  lock (a client costs an SDK client, its connection pool and its TLS context)."""
  key = _api_key(cfg)
  where = (ledger.bootstrap_servers, ledger.topic) if ledger is not None else None
  digest = hashlib.sha256(key.encode("utf-8")).hexdigest()  # a rotated key: a new client
  return _per_process(_CLIENTS, (cfg, where, digest), lambda: ModelClient(cfg, ledger=ledger),
                      _CLIENTS_LOCK)


def check_endpoint(cfg: "ModelConfig", timeout_s: float = 10.0) -> None:
  """Asks a tier's endpoint for its models, a call no provider bills: raises
  ``ModelCallError`` when it cannot be reached or refuses the key. An endpoint without a
  models list (404, 405) passes: it answered.

  The request is the provider's documented ``GET`` of its models list, to the URL and with
  the key header its SDK would use (``ModelClient.models_request``), sent by the standard
  library: the check imports no SDK. The anthropic SDK's import alone costs about 1 s of
  CPU, which a run pays only once a record escalates, not before it reads."""
  import http.client
  import json
  import urllib.error
  import urllib.request

  from tierflow import __version__
  cls = ModelClient.of_provider(cfg.provider)
  url, headers = cls.models_request(cfg, _api_key(cfg))
  headers = {**headers, **_worker_header(), "accept": "application/json",
             "user-agent": f"tierflow/{__version__}"}
  request = urllib.request.Request(url, headers=headers, method="GET")
  try:
    with urllib.request.urlopen(request, timeout=timeout_s, context=_check_tls_context()):
      return
  except urllib.error.HTTPError as e:
    if e.code in (404, 405):
      return
    try:
      said = _message_in(json.loads(e.read(65536) or b"null"))
    except ValueError:
      said = ""
    raise ModelCallError(kind_of_status(e.code), f"HTTP {e.code}" + (f": {said}" if said else ""),
                         e.code) from None
  except (OSError, http.client.HTTPException) as e:  # refused, unresolvable, timed out, cut off
    raise ModelCallError("connection", f"cannot reach {cfg.base_url or url} "
                         f"({type(getattr(e, 'reason', e)).__name__})") from None


@functools.lru_cache(maxsize=None)
def _check_tls_context():
  """Certificates as the SDKs' HTTP stack verifies them: ``SSL_CERT_FILE``/``SSL_CERT_DIR``
  when set, else certifi's bundle (an SDK dependency), else the system's."""
  import ssl
  cafile, capath = os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")
  if not (cafile or capath):
    try:
      import certifi
      cafile = certifi.where()
    except ImportError:
      pass
  return ssl.create_default_context(cafile=cafile, capath=capath)


def _httpx_of(sdk):
  """The httpx package the SDK is built on (``httpx``, or ``httpx2`` in later releases)."""
  base = next(c for c in sdk.DefaultHttpxClient.__mro__ if c.__name__ == "Client")
  return sys.modules[base.__module__.partition(".")[0]]


@functools.lru_cache(maxsize=None)
def _tls_context(httpx):
  """One TLS context per process, made as httpx makes its default one (each new one reads
  the CA bundle again: ~60 ms of CPU). ``lru_cache`` is thread-safe; a race makes two."""
  return httpx.create_ssl_context()


def _http_client(sdk):
  """The SDK's default HTTP client (its timeouts and pool limits), on the shared TLS
  context."""
  return sdk.DefaultHttpxClient(verify=_tls_context(_httpx_of(sdk)))


def _api_key(cfg: "ModelConfig") -> str:
  if cfg.api_key_env:
    key = os.environ.get(cfg.api_key_env)
    if not key:
      raise ModelCallError("auth", f"environment variable {cfg.api_key_env} is not set")
    return key
  # A local endpoint needs no key, but the SDKs insist on one.
  return "unused-local-key"


def kind_of_status(status: Optional[int]) -> str:
  """The ``ModelCallError`` kind of a failed HTTP status (synchronous or in a batch)."""
  if status == 429:
    return "rate_limit"
  if status in (401, 403):
    return "auth"
  if status == 404:
    return "not_found"
  return "server_error" if (status or 500) >= 500 else "bad_request"


_KEYLIKE = re.compile(r"\b(?:sk|pk|rk|key|sess)-[\w*.-]{3,}", re.I)


def _provider_message(e) -> str:
  """The provider's own one-line reason for a 4xx/5xx (``error.message`` in both APIs'
  bodies), cut to 200 characters; it names the parameter, never the key."""
  return _message_in(getattr(e, "body", None))  # the openai SDK has unwrapped "error"


def _message_in(body) -> str:
  """``error.message`` (or ``message``) of an error body, keys masked, 200 characters."""
  error = body.get("error", body) if isinstance(body, dict) else None
  message = error.get("message") if isinstance(error, dict) else None
  if not isinstance(message, str):
    return ""
  # Providers quote a refused key half-masked ("sk-proj-****abcd"): none of it is kept.
  return _KEYLIKE.sub("[key]", " ".join(message.split()))[:200]


def _worker_header() -> dict:
  """Which worker process sends (host/pid), for a proxy's or the endpoint's logs."""
  return {"x-tierflow-worker": f"{socket.gethostname()}/{os.getpid()}"}


_RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
# Failures after which the provider may have processed (and billed) the request.
_MAYBE_BILLED = frozenset({"timeout", "connection", "malformed"})


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


class ModelClient(ByProvider):
  """One model endpoint. Thread-safe; create once per worker (RunInference does).

  ``ModelClient(cfg)`` is the provider's client: ``OpenAIChat`` (Chat Completions, any
  OpenAI-compatible endpoint) or ``AnthropicMessages``; each provider is one subclass
  (its SDK, request body and answer), registered by ``provider=``.

  Retries are tierflow's, not the SDKs' (those are set to 0), so both providers
  behave alike: 408/409/429/5xx/529, timeouts and connection errors are retried
  up to ``max_retries`` times, waiting what ``retry-after-ms``/``retry-after``
  asks (capped at ``max_retry_wait_s``, so a huge value cannot park a worker)
  or else exponential backoff with jitter: a request is sent at most
  ``1 + max_retries`` times (fewer once the endpoint's circuit breaker opens).
  """

  max_retry_wait_s = 60.0
  path = ""  # the completion route, relative to the SDK client's base URL
  default_host = ""  # the provider's own API host, where its SDK sends without a base URL
  sdk_module = ""  # the SDK's package, imported when a client is first built
  sdk_client_class = ""  # its client class
  _PROVIDERS: dict = {}
  _what = "client"

  @classmethod
  def models_request(cls, cfg: "ModelConfig", key: str) -> tuple[str, dict]:
    """(URL, headers) of the provider's unbilled models list (``check_endpoint``)."""
    raise NotImplementedError

  @classmethod
  def _provider_of(cls, cfg: "ModelConfig", *args, **kwargs) -> str:
    return cfg.provider

  def __init__(self, cfg: "ModelConfig", sleep=time.sleep,
               ledger: Optional["LedgerConfig"] = None):
    self.cfg = cfg
    self.limiter = _limiter_for(cfg, ledger)
    self.breaker = _breaker_for(cfg)
    self._sleep = sleep
    self._sdk = importlib.import_module(self.sdk_module)  # when a client of it is made
    # The SDK client, with tierflow's retries (none of the SDK's), timeout and header.
    self._client = getattr(self._sdk, self.sdk_client_class)(
        api_key=_api_key(cfg), base_url=cfg.base_url, max_retries=0, timeout=cfg.timeout_s,
        default_headers=_worker_header(), http_client=_http_client(self._sdk))
    self._response_type = _httpx_of(self._sdk).Response
    self.retries = 0  # retries made over this client's life (for metrics and tests)

  # -- what each provider's subclass says --------------------------------------------------

  def request_body(self, system: str, user: str, max_tokens: int, *,
                   top_logprobs: Optional[int] = None,
                   answer_schema: Optional[dict] = None) -> dict:
    """The provider's request body for one prompt (what a batch line carries)."""
    raise NotImplementedError

  def _reply(self, body: dict) -> ModelReply:
    """A ``ModelReply`` from the provider's answer object (``ModelCallError`` if malformed)."""
    raise NotImplementedError

  # -- the same for every provider ---------------------------------------------------------
  def _wait_before_retry(self, e: Exception, attempt: int) -> Optional[float]:
    """Seconds to wait before retrying ``e``, or None if it is not retryable."""
    sdk = self._sdk
    if isinstance(e, (sdk.APITimeoutError, sdk.APIConnectionError)):
      pass
    elif isinstance(e, sdk.APIStatusError):
      headers = getattr(e.response, "headers", None)
      should = (headers.get("x-should-retry") or "").lower() if headers is not None else ""
      if should == "false" or (e.status_code not in _RETRY_STATUSES and should != "true"):
        return None
      asked = retry_after_seconds(headers)
      if asked is not None:
        return min(asked, self.max_retry_wait_s)
    else:
      return None
    return min(self.max_retry_wait_s, 0.5 * 2 ** attempt) * (0.75 + 0.5 * random.random())

  def __repr__(self) -> str:  # never the key
    return f"ModelClient({self.cfg.provider}:{self.cfg.model})"

  def complete(self, system: str, user: str, max_tokens: int, *,
               top_logprobs: Optional[int] = None,
               answer_schema: Optional[dict] = None,
               before_uncertain_retry: Optional[Callable[[], bool]] = None) -> ModelReply:
    """One chat completion; ``top_logprobs`` overrides the model's (0: chosen tokens only).

    Every failed attempt counts towards the endpoint's circuit breaker; once it is open
    the request stops retrying and fails with ``circuit_open``, as do requests after it.
    An attempt that timed out, lost its connection or came back unreadable may have been
    billed; the reply (or the error) counts them (``uncertain_attempts``), and
    ``before_uncertain_retry`` is asked before another attempt is sent after one (the
    budget reserves it): False stops retrying.
    """
    breaker = self.breaker
    if breaker is not None:
      try:
        breaker.before()
      except CircuitOpen as e:
        raise ModelCallError("circuit_open", str(e)) from None
    tokens = estimate_tokens(system) + estimate_tokens(user) + max_tokens
    import orjson
    body = orjson.dumps(self.request_body(system, user, max_tokens, top_logprobs=top_logprobs,
                                          answer_schema=answer_schema))
    start = time.monotonic()
    attempt = uncertain = 0
    while True:
      self.limiter.acquire(tokens)  # every attempt is a request the provider counts
      try:
        raw = self._post(body)
        try:
          reply = self.reply_from_content(raw.content)
        except ModelCallError as e:
          e.uncertain_attempts = uncertain + 1  # answered, so billed, but unreadable
          raise
        if breaker is not None:
          breaker.succeeded()
        self.limiter.answered()
        return dataclasses.replace(reply, latency_s=time.monotonic() - start,
                                   uncertain_attempts=uncertain)
      except ModelCallError:
        raise
      except Exception as e:  # noqa: BLE001 - mapped to a per-request failure
        error = self._classify(e)
        if error.kind in _MAYBE_BILLED:
          uncertain += 1
        error.uncertain_attempts = uncertain
        if error.kind == "rate_limit":
          self.limiter.throttled()
        wait = self._wait_before_retry(e, attempt) if attempt < self.cfg.max_retries else None
        if (wait is not None and error.kind in _MAYBE_BILLED
            and before_uncertain_retry is not None and not before_uncertain_retry()):
          stopped = ModelCallError(error.kind, f"{error.message}; not retried: the budget "
                                   "cannot cover another attempt", error.status)
          stopped.uncertain_attempts = uncertain
          raise stopped from e
        if breaker is not None:
          breaker.failed(error.kind, error.message)
          if wait is not None and breaker.is_open:
            opened = ModelCallError("circuit_open", f"{breaker.name}: circuit opened; "
                                    f"last: {error}")
            opened.uncertain_attempts = uncertain
            raise opened from e
        if wait is None:
          raise error from e
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
    if isinstance(e, sdk.APIStatusError):
      kind = kind_of_status(status)
      if kind == "rate_limit":
        return ModelCallError(kind, "429 after retries", status)
      if kind == "auth":
        said = _provider_message(e)
        return ModelCallError(kind, f"HTTP {status} {type(e).__name__}"
                              + (f": {said}" if said else ""), status)
      said = _provider_message(e)
      return ModelCallError(kind, f"HTTP {status}" + (f" {said}" if said else ""), status)
    return ModelCallError("malformed", f"{type(e).__name__}: {str(e)[:200]}")

  def reply_from_content(self, content: bytes) -> ModelReply:
    """A ``ModelReply`` from the raw response body (``ModelCallError`` if malformed)."""
    return self.reply_from_body(_json_body(content))

  def reply_from_body(self, body: dict) -> ModelReply:
    """A ``ModelReply`` from the provider's answer body (``ModelCallError`` if malformed)."""
    if not isinstance(body, dict):
      raise ModelCallError("malformed", "answer is not a JSON object")
    return self._checked(self._reply(body))

  def _checked(self, reply: ModelReply) -> ModelReply:
    """The reply, refused if its text cannot be written; its model name made printable."""
    try:  # JSON's \ud800 escapes decode to lone surrogates, which no UTF-8 file can hold
      reply.text.encode("utf-8")
    except UnicodeEncodeError:
      raise ModelCallError("malformed", "answer holds a lone surrogate (not Unicode text)") \
          from None
    model = reply.model if isinstance(reply.model, str) else self.cfg.model
    return dataclasses.replace(
        reply, model=model.encode("utf-8", "backslashreplace").decode("utf-8")[:200])

  def _post(self, body: bytes):
    """Sends a request body (the provider's valid JSON body, encoded once by orjson) with
    the SDK's own ``post`` (its auth, headers, ``Content-Type: application/json``,
    timeouts and errors), skipping ``create``'s transform of the parameters and its JSON
    encoding; the raw HTTP response, read as JSON by the caller: building the SDK's
    pydantic models for an answer with logprobs cost more CPU than everything else about
    the request."""
    return self._client.post(self.path, content=body, cast_to=self._response_type)

  @property
  def sdk_client(self):
    """The SDK client (``openai.OpenAI`` or ``anthropic.Anthropic``), for batch calls."""
    return self._client


class OpenAIChat(ModelClient, provider="openai"):
  """Chat Completions through the ``openai`` SDK, on any OpenAI-compatible endpoint."""

  path = "/chat/completions"
  default_host = "api.openai.com"
  sdk_module, sdk_client_class = "openai", "OpenAI"

  @classmethod
  def models_request(cls, cfg: "ModelConfig", key: str) -> tuple[str, dict]:
    """``GET /models`` under the base URL the SDK uses (the config's, ``OPENAI_BASE_URL``,
    or the API's), with the key as a bearer token."""
    base = cfg.base_url or os.environ.get("OPENAI_BASE_URL") or f"https://{cls.default_host}/v1"
    return f"{base.rstrip('/')}/models", {"authorization": f"Bearer {key}"}

  def request_body(self, system: str, user: str, max_tokens: int, *,
                   top_logprobs: Optional[int] = None,
                   answer_schema: Optional[dict] = None) -> dict:
    top = self.cfg.top_logprobs if top_logprobs is None else top_logprobs
    return self.request_openai(system, user, max_tokens, top, answer_schema)

  def request_openai(self, system: str, user: str, max_tokens: int,
                     top_logprobs: int, answer_schema: Optional[dict] = None) -> dict:
    """The Chat Completions request body, with only what the model takes
    (``model_capabilities``): never decided by the base URL."""
    cfg, caps = self.cfg, self.cfg.capabilities
    kwargs = dict(model=cfg.model, messages=[{"role": "system", "content": system},
                                             {"role": "user", "content": user}])
    if caps.temperature:
      if cfg.temperature is not None:
        kwargs["temperature"] = cfg.temperature
      elif cfg.samples == 1:  # several samples keep the model's own (sampling) default
        kwargs["temperature"] = 0.0
    kwargs[caps.token_limit] = max_tokens + cfg.reasoning_allowance
    if caps.reasons:
      kwargs["reasoning_effort"] = cfg.effort
    if cfg.uses_logprobs:
      kwargs["logprobs"] = True
      if top_logprobs:
        kwargs["top_logprobs"] = top_logprobs
    if answer_schema is not None and cfg.uses_structured_output:
      kwargs["response_format"] = {"type": "json_schema", "json_schema": {
          "name": "answer", "schema": answer_schema, "strict": True}}
    return kwargs

  def reply_from_content(self, content: bytes) -> ModelReply:
    """Decoded straight into the parts tierflow reads (``chat_completion_body``)."""
    return self._checked(self._reply(content))

  def _reply(self, body) -> ModelReply:
    """The reply from the raw body (bytes) or its parsed JSON object (a batch result's)."""
    from tierflow.connectors import chat_completion_body
    try:
      answer = chat_completion_body.read(body)
    except chat_completion_body.Unreadable as e:
      raise ModelCallError("malformed", str(e)) from None
    if not answer.choices:
      raise ModelCallError("malformed", "answer has no choices")
    choice = answer.choices[0]
    text = (choice.message.content if choice.message is not None else None) or ""
    tokens = None
    content = choice.logprobs.content if choice.logprobs is not None else None
    if content:
      tokens = tuple(TokenInfo(t.token, t.logprob,
                               tuple((a.token, a.logprob) for a in t.top_logprobs)
                               if t.top_logprobs else ())
                     for t in content)
    u = answer.usage
    if u is None:
      raise ModelCallError("malformed", "answer has no usage; refusing to guess its cost")
    cached = (u.prompt_tokens_details.cached_tokens
              if u.prompt_tokens_details is not None else None) or 0
    reasoning = (u.completion_tokens_details.reasoning_tokens
                 if u.completion_tokens_details is not None else None) or 0
    usage = Usage(input_tokens=max(0, (u.prompt_tokens or 0) - cached),
                  output_tokens=u.completion_tokens or 0, cache_read_tokens=cached,
                  reasoning_tokens=reasoning)
    return ModelReply(text, tokens, usage, answer.model or self.cfg.model,
                      choice.finish_reason or "stop")


class AnthropicMessages(ModelClient, provider="anthropic"):
  """Messages through the ``anthropic`` SDK."""

  path = "/v1/messages"
  default_host = "api.anthropic.com"
  sdk_module, sdk_client_class = "anthropic", "Anthropic"
  api_version = "2023-06-01"  # the API version its reference documents (preflight only)

  @classmethod
  def models_request(cls, cfg: "ModelConfig", key: str) -> tuple[str, dict]:
    """``GET /v1/models`` under the base URL the SDK uses (the config's,
    ``ANTHROPIC_BASE_URL``, or the API's), with the documented ``x-api-key`` and
    ``anthropic-version`` headers, and the headers the SDK adds from
    ``ANTHROPIC_CUSTOM_HEADERS`` (one ``Name: value`` per line, for gateways)."""
    base = cfg.base_url or os.environ.get("ANTHROPIC_BASE_URL") or f"https://{cls.default_host}"
    custom = {}
    for line in (os.environ.get("ANTHROPIC_CUSTOM_HEADERS") or "").split("\n"):
      name, colon, value = line.partition(":")
      if colon and name.strip():
        custom[name.strip().lower()] = value.strip()
    return f"{base.rstrip('/')}/v1/models", {**custom, "x-api-key": key,
                                             "anthropic-version": cls.api_version}

  def request_body(self, system: str, user: str, max_tokens: int, *,
                   top_logprobs: Optional[int] = None,
                   answer_schema: Optional[dict] = None) -> dict:
    """The Messages request body (the shared instructions marked for caching)."""
    return dict(model=self.cfg.model, max_tokens=max_tokens,
                system=[{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
                messages=[{"role": "user", "content": user}])

  def _reply(self, body: dict) -> ModelReply:
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


def _json_body(content: bytes) -> dict:
  """The JSON object of a response body, parsed by ``orjson`` (``ModelCallError`` if it
  is not one)."""
  import orjson
  try:
    body = orjson.loads(content)
  except orjson.JSONDecodeError as e:
    raise ModelCallError("malformed", f"answer is not JSON: {e}") from None
  if not isinstance(body, dict):
    raise ModelCallError("malformed", "answer is not a JSON object")
  return body
