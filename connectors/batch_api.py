"""Provider batch APIs: OpenAI's Batch API and Anthropic's Message Batches, as they run.

Both bill half the synchronous price for work finished within 24 h: a nightly backfill.
``ProviderBatch.run(requests)`` submits ``(custom_id, request body)`` pairs, split into as
many batches as the provider's limits need (OpenAI: 50,000 requests and 200 MB per input
file, and the organisation's enqueued tokens per model if given; Anthropic: 100,000
requests or 256 MB), polls them together with backoff and jitter, and returns a reply or a
``ModelCallError`` per custom id. Request bodies are the synchronous ones
(``ModelClient.request_body``), answers are read by the same parser, errors are classed as
the synchronous path classes them (``kind_of_status``).

The deadline (``max_wait_s``) counts from the first submission, which the state file
keeps, so a resumed run does not restart it. At the deadline the batches still running are
cancelled, and, as after the provider's own 24 h expiry, every result that came back is
read once the batch is final (cancelled, expired or ended): succeeded requests are
answers (billed), the others fail with ``batch_canceled``, ``batch_expired`` or their
error class, and the caller sends them synchronously or fails them. A batch that never
becomes final within ``settle_s`` after the cancel fails its requests with
``batch_unsettled``: they may still be billed, so they are not sent again.

A state file (on any Beam filesystem: local, ``gs://``, ``s3://``) records each batch id
right after submission, keyed by a hash of its requests, so a run killed while a batch
was processing, re-run, polls that batch instead of submitting and paying twice. Before
submitting, the file records the intent (the hash, no id yet). A run killed between the
provider accepting a batch and the id being recorded leaves that intent: the re-run finds
the OpenAI batch by the hash it carries in its ``metadata`` (and an uploaded input file by
its name) and polls it. Anthropic batches carry no metadata to find them by, so there the
window is the one HTTP round trip of the create call: that batch is submitted again, with
a warning. Uploaded input files are deleted once their batch is final, and expire after
7 days in any case; output files expire after 30 days.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import re
import time
from typing import Callable, Optional, Sequence, Union

from tierflow.connectors.llm_clients import (ModelCallError, ModelClient, ModelReply,
                                             estimate_tokens, kind_of_status)
from tierflow.connectors.providers import ByProvider
from tierflow.files import read_text, rename_over

__all__ = ["ProviderBatch", "OpenAIBatches", "AnthropicBatches", "BatchResult", "BatchLimits", "custom_id"]

_LOGGER = logging.getLogger(__name__)

BatchResult = Union[ModelReply, ModelCallError]


@dataclasses.dataclass(frozen=True)
class BatchLimits:
  """What one batch may hold: requests, bytes (OpenAI: of the input file; Anthropic: of
  the create request), and enqueued prompt tokens (OpenAI, per model and organisation;
  None: not limited here)."""
  requests: int
  bytes: int
  enqueued_tokens: Optional[int] = None


_OPENAI_FINAL = frozenset({"completed", "expired", "cancelled", "failed"})
# Anthropic's error types in an errored result, as the HTTP statuses they stand for.
_ANTHROPIC_STATUS = {"invalid_request_error": 400, "authentication_error": 401,
                     "billing_error": 402, "permission_error": 403, "not_found_error": 404,
                     "request_too_large": 413, "rate_limit_error": 429, "api_error": 500,
                     "overloaded_error": 529}
_INPUT_EXPIRES_S, _OUTPUT_EXPIRES_S = 7 * 86_400, 30 * 86_400
# Anthropic's pattern, which OpenAI also accepts.
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def custom_id(stage: str, n: int) -> str:
  """A custom id valid for both providers (``^[a-zA-Z0-9_-]{1,64}$``) whatever the stage
  name; unique by ``n``."""
  return f"{_ID_UNSAFE.sub('_', stage)[:48]}-{n}"


def _metadata(digest: str) -> dict:
  """What an OpenAI batch carries to be found again by its requests' hash."""
  return {"tierflow_requests": digest[:32]}


def _digest(requests: Sequence[tuple[str, dict]]) -> str:
  return hashlib.sha256(json.dumps(list(requests), sort_keys=True).encode()).hexdigest()


def _prompt_tokens(body: dict) -> int:
  """A generous estimate of the prompt tokens a request enqueues."""
  return estimate_tokens(json.dumps([body.get("system"), body.get("messages")],
                                    ensure_ascii=False))


class ProviderBatch(ByProvider):
  """The batches of one tier's requests to one model endpoint.

  ``ProviderBatch(client, ...)`` is the batch API of the client's provider:
  ``OpenAIBatches`` (files + batches) or ``AnthropicBatches`` (Message Batches), each one
  subclass registered by ``provider=``; what is common (splitting, state, polling,
  deadlines, results to replies) is here.

  Args:
    client: the tier's ``ModelClient`` (its SDK client, config and answer parser).
    state_path: where the batch ids are kept (None: not kept; a kill loses the batches).
    poll_s: seconds before the first status check; later checks back off (x1.5 each, to
      at most 32x, at most 300 s) with +-20% jitter.
    max_wait_s: from the first submission; then the running batches are cancelled.
    limits: per-batch limits (default: the provider's, its class's ``limits``).
    settle_s: how long a cancelled batch may take to become final.
  """

  # The provider's documented limits per batch (bytes in decimal megabytes: a little under
  # either reading).
  limits: BatchLimits
  _PROVIDERS: dict = {}
  _what = "batch API"

  @classmethod
  def _provider_of(cls, client: ModelClient, *args, **kwargs) -> str:
    return client.cfg.provider

  def __init__(self, client: ModelClient, state_path: Optional[str] = None, *,
               poll_s: float = 30.0, max_wait_s: float = 86_400.0,
               limits: Optional[BatchLimits] = None, settle_s: float = 3_600.0,
               sleep: Callable[[float], None] = time.sleep,
               clock: Callable[[], float] = time.time,
               jitter: Callable[[], float] = random.random):
    self._client = client
    self._sdk = client.sdk_client
    self._state_path = state_path
    self._poll_s, self._max_wait_s, self._settle_s = poll_s, max_wait_s, settle_s
    self._limits = limits or self.limits
    self._sleep, self._clock, self._jitter = sleep, clock, jitter
    self._state: dict = {}
    self.batch_ids: list[str] = []
    self.resumed = False
    self.polls = 0  # status checks made
    self.resubmitted = 0  # batches submitted again after the enqueued-token limit

  @property
  def batch_id(self) -> Optional[str]:
    return self.batch_ids[0] if self.batch_ids else None

  # -- the one call ----------------------------------------------------------------------
  def run(self, requests: Sequence[tuple[str, dict]]) -> dict[str, BatchResult]:
    if not requests:
      return {}
    chunks = self.split(requests)
    digest = _digest(requests)
    state = self._load_state()
    if state and state.get("requests_sha256") != digest:
      _LOGGER.warning("%s holds batches for other requests (the config changed?); "
                      "submitting anew", self._state_path)
      state = None
    if state is None or len(state.get("chunks", ())) != len(chunks):
      state = {"provider": self._client.cfg.provider, "model": self._client.cfg.model,
               "requests": len(requests), "requests_sha256": digest,
               "chunks": [{"sha256": _digest(c), "requests": len(c)} for c in chunks]}
    self._state = state
    failed: dict[int, ModelCallError] = {}
    queued = []  # not yet submitted: submitted as the enqueued-token limit allows
    for i, chunk in enumerate(chunks):
      if state["chunks"][i].get("batch_id") or state["chunks"][i].get("submitting_since"):
        error = self._ensure_submitted(i, chunk)  # resumed, found, or submitted again
        if error is not None:
          failed[i] = error
      else:
        queued.append(i)
    final = self._wait(chunks, failed, queued)
    self.batch_ids = [c["batch_id"] for c in state["chunks"] if c.get("batch_id")]
    out: dict[str, BatchResult] = {}
    for i, chunk in enumerate(chunks):
      if i in failed:
        out.update({cid: failed[i] for cid, _ in chunk})
      else:
        out.update(self._collect(i, chunk, final[i]))
    return out

  def split(self, requests: Sequence[tuple[str, dict]]) -> list[list[tuple[str, dict]]]:
    """``requests`` in order, cut into batches within the limits (a request over a limit
    alone goes alone: the provider's refusal names it)."""
    limits, chunks, chunk = self._limits, [], []
    size = tokens = 0
    for cid, body in requests:
      line = len(self._line(cid, body)) + 1
      need = _prompt_tokens(body) if limits.enqueued_tokens is not None else 0
      if chunk and (len(chunk) + 1 > limits.requests or size + line + 64 > limits.bytes
                    or (limits.enqueued_tokens is not None
                        and tokens + need > limits.enqueued_tokens)):
        chunks.append(chunk)
        chunk, size, tokens = [], 0, 0
      chunk.append((cid, body))
      size, tokens = size + line, tokens + need
    return [*chunks, chunk] if chunk else chunks

  # -- what each provider's subclass says ----------------------------------------------------
  def _line(self, cid: str, body: dict) -> bytes:
    """A request as the batch carries it (what the size limit counts)."""
    raise NotImplementedError

  def _create(self, i: int, chunk: Sequence[tuple[str, dict]], digest: str, look: bool):
    """Submits batch ``i`` (``look``: a killed run may have uploaded its input); the
    provider's batch object."""
    raise NotImplementedError

  def _find_submitted(self, digest: str, since: float) -> Optional[str]:
    """The batch a killed run submitted for these requests but never recorded, if the
    provider can tell (None otherwise)."""
    raise NotImplementedError

  def _get(self, batch_id: str):
    """The provider's batch object."""
    raise NotImplementedError

  def _final(self, batch) -> Optional[str]:
    """The final status of a batch object, or None while it runs (or cancels)."""
    raise NotImplementedError

  def _cancel_batch(self, batch_id: str) -> None:
    raise NotImplementedError

  def _delete_input(self, i: int) -> None:
    """What the batch left to clean up once final (an input file); nothing by default."""

  def _results(self, batch) -> dict[str, BatchResult]:
    """Every answered or failed request of a final batch, by custom id."""
    raise NotImplementedError

  # -- the same for every provider ---------------------------------------------------------

  # -- state -----------------------------------------------------------------------------
  def _load_state(self) -> Optional[dict]:
    from apache_beam.io.filesystems import FileSystems
    if not self._state_path or not FileSystems.exists(self._state_path):
      return None
    try:
      state = json.loads(read_text(self._state_path))
    except ValueError:
      return None
    if "chunks" not in state and state.get("requests_sha256"):  # one batch, before splits
      state["chunks"] = [{k: state[k] for k in ("batch_id", "submitting_since", "submitted_at")
                          if k in state} | {"sha256": state["requests_sha256"]}]
    return state

  def _save_state(self, state: dict) -> None:
    """Written beside its final name, then renamed over it: never half a file."""
    if not self._state_path:
      return
    from apache_beam.io.filesystems import FileSystems
    tmp = f"{self._state_path}.tmp-{time.time_ns()}"
    parent = self._state_path.rsplit("/", 1)[0]
    if not FileSystems.exists(parent):
      FileSystems.mkdirs(parent)
    with FileSystems.create(tmp) as f:
      f.write(json.dumps(state, indent=1).encode())
    rename_over(tmp, self._state_path)

  def _chunk_state(self, i: int, **changes) -> dict:
    chunk = self._state["chunks"][i]
    if changes:
      chunk.update({k: v for k, v in changes.items() if v is not None})
      for k in [k for k, v in changes.items() if v is None]:
        chunk.pop(k, None)
      self._save_state(self._state)
    return chunk

  def deadline(self) -> float:
    """When the running batches are cancelled: ``max_wait_s`` after the first submission."""
    times = [c["submitted_at"] for c in self._state.get("chunks", ()) if "submitted_at" in c]
    return (min(times) if times else self._clock()) + self._max_wait_s

  # -- submitting ------------------------------------------------------------------------
  def _ensure_submitted(self, i: int, chunk: Sequence[tuple[str, dict]]
                        ) -> Optional[ModelCallError]:
    """Submits batch ``i`` unless the state holds it (or it is found); None, or the error
    every request of the batch fails with."""
    state = self._chunk_state(i)
    found = None
    if not state.get("batch_id") and state.get("submitting_since"):  # killed in between
      found = self._find_submitted(state["sha256"], float(state["submitting_since"]))
      if found:
        self._chunk_state(i, batch_id=found, submitted_at=state["submitting_since"])
    if state.get("batch_id"):
      self.resumed = True
      _LOGGER.info("resuming %s batch %s (%d requests)", self._client, state["batch_id"],
                   len(chunk))
      return None
    if self._clock() >= self.deadline():
      return ModelCallError("batch_deadline", f"not submitted: past the batch deadline "
                            f"({self._max_wait_s:.0f}s after the first submission)")
    return self._submit(i, chunk, look=bool(state.get("submitting_since")))

  def _submit(self, i: int, chunk: Sequence[tuple[str, dict]], look: bool = False
              ) -> Optional[ModelCallError]:
    """Submits batch ``i``; ``look``: a killed run may have uploaded its input file."""
    state = self._chunk_state(i)
    self._chunk_state(i, submitting_since=self._clock(), batch_id=None)
    try:
      batch = self._create(i, chunk, state["sha256"], look)
    except Exception as e:  # noqa: BLE001 - every request fails with the reason
      error = self._client._classify(e)
      return ModelCallError(error.kind, f"submitting batch {i + 1} failed: {error.message}",
                            error.status)
    state = self._chunk_state(i, batch_id=batch.id)
    state.setdefault("submitted_at", self._clock())
    self._save_state(self._state)
    _LOGGER.info("submitted %s batch %s (%d requests)", self._client, batch.id, len(chunk))
    return None

  # -- waiting ---------------------------------------------------------------------------
  def _retrieve(self, batch_id: str):
    self.polls += 1
    return self._get(batch_id)

  def _submit_queued(self, chunks, queued: list[int], pending: set[int],
                     failed: dict[int, ModelCallError]) -> None:
    """Submits queued batches while this run's unfinished ones leave room under the
    enqueued-token limit (all at once without one)."""
    limit = self._limits.enqueued_tokens
    tokens = lambda i: sum(_prompt_tokens(b) for _, b in chunks[i])  # noqa: E731
    held = sum(tokens(i) for i in pending) if limit is not None else 0
    while queued:
      need = tokens(queued[0]) if limit is not None else 0
      if limit is not None and pending and held + need > limit:
        return
      i = queued.pop(0)
      error = self._ensure_submitted(i, chunks[i])
      if error is not None:
        failed[i] = error
      else:
        pending.add(i)
        held += need

  def _wait(self, chunks, failed: dict[int, ModelCallError], queued: list[int]
            ) -> dict[int, object]:
    """Polls every submitted batch until it is final (the batch object), submitting the
    queued ones as room frees; past the deadline, cancels the running ones; resubmits a
    batch refused for the enqueued-token limit. Fills ``failed`` for batches that end
    without results."""
    pending = {i for i in range(len(chunks)) if i not in failed and i not in queued}
    final: dict[int, object] = {}
    cancelled: dict[int, float] = {}
    interval, cap = self._poll_s, max(self._poll_s, min(300.0, 32 * self._poll_s))
    while pending or queued:
      self._submit_queued(chunks, queued, pending, failed)
      now = self._clock()
      for i in sorted(pending):
        batch_id = self._chunk_state(i)["batch_id"]
        try:
          batch = self._retrieve(batch_id)
        except Exception as e:  # noqa: BLE001 - a status check failing is not the batch failing
          _LOGGER.warning("checking batch %s failed (%s); trying again", batch_id, e)
          continue
        status = self._final(batch)
        if (status == "failed" and self._token_limited(batch) and now < self.deadline()
            and self._fits(chunks[i], batch)):
          _LOGGER.info("batch %s refused for the enqueued-token limit; submitting again "
                       "after the next wait", batch_id)
          self.resubmitted += 1
          error = self._submit(i, chunks[i])
          if error is not None:
            failed[i] = error
            pending.discard(i)
          continue
        if status is not None:
          final[i] = batch
          pending.discard(i)
          self._delete_input(i)
        elif i in cancelled and now >= cancelled[i] + self._settle_s:
          failed[i] = ModelCallError("batch_unsettled", f"batch {batch_id} cancelled at the "
                                     f"deadline but not final {self._settle_s:.0f}s later; "
                                     "its requests may be billed, so not sent again")
          pending.discard(i)
        elif i not in cancelled and now >= self.deadline():
          self._cancel(batch_id)
          cancelled[i] = now
      if not pending and queued:
        continue  # room freed: submit at once
      if not pending:
        break
      self._sleep(interval * (0.8 + 0.4 * self._jitter()))
      interval = min(interval * 1.5, cap)
    return final

  def _fits(self, chunk, batch) -> bool:
    """Whether a batch alone fits the enqueued-token limit (the one configured, or the
    one the provider's refusal names); else submitting it again is futile."""
    limits = [self._limits.enqueued_tokens]
    for e in getattr(getattr(batch, "errors", None), "data", None) or []:
      said = re.search(r"Limit: ([\d,]+) enqueued tokens", getattr(e, "message", "") or "")
      if said:
        limits.append(int(said.group(1).replace(",", "")))
    limit = min((n for n in limits if n is not None), default=None)
    return limit is None or sum(_prompt_tokens(b) for _, b in chunk) <= limit

  @staticmethod
  def _token_limited(batch) -> bool:
    errors = getattr(getattr(batch, "errors", None), "data", None) or []
    return any(getattr(e, "code", None) == "token_limit_exceeded" for e in errors)

  def _cancel(self, batch_id: str) -> None:
    _LOGGER.warning("batch %s not done %.0fs after submission (--max-batch-wait): "
                    "cancelling; its answered requests are kept", batch_id, self._max_wait_s)
    try:
      self._cancel_batch(batch_id)
    except Exception as e:  # noqa: BLE001 - e.g. it ended meanwhile: the polls will tell
      _LOGGER.warning("cancelling batch %s failed: %s", batch_id, e)

  # -- results ---------------------------------------------------------------------------
  def _collect(self, i: int, chunk, batch) -> dict[str, BatchResult]:
    """Every request's result of a final batch: its answer, or why there is none."""
    batch_id = batch.id
    status = self._final(batch)
    if status == "failed":
      errors = getattr(getattr(batch, "errors", None), "data", None) or []
      said = "; ".join(f"{getattr(e, 'code', None)}: {getattr(e, 'message', '')}"
                       + (f" (line {e.line})" if getattr(e, "line", None) else "")
                       for e in errors[:3]) or "no reason given"
      error = ModelCallError("batch_failed", f"batch {batch_id} failed: {said[:300]}")
      return {cid: error for cid, _ in chunk}
    try:
      results = self._results(batch)
    except Exception as e:  # noqa: BLE001 - e.g. the output files are gone: fall back
      _LOGGER.warning("reading the results of batch %s failed: %s", batch_id, e)
      results, status = {}, f"unreadable ({type(e).__name__})"
    kind = {"expired": "batch_expired", "cancelled": "batch_canceled"}.get(status,
                                                                           "batch_failed")
    missing = ModelCallError(kind, f"batch {batch_id} {status}: no result for the request")
    return {cid: results.get(cid, missing) for cid, _ in chunk}

  def _reply(self, body) -> BatchResult:
    try:
      return self._client.reply_from_body(body)
    except ModelCallError as e:
      return e


class OpenAIBatches(ProviderBatch, provider="openai"):
  """OpenAI's Batch API: a JSONL input file, a batch over it, output and error files."""

  limits = BatchLimits(50_000, 200_000_000)  # openai 3.63 ``batch_create_params``

  def _line(self, cid: str, body: dict) -> bytes:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": body}).encode()

  def _create(self, i: int, chunk: Sequence[tuple[str, dict]], digest: str, look: bool):
    file_id = self._chunk_state(i).get("file_id") or self._upload(digest, chunk, look)
    self._chunk_state(i, file_id=file_id)
    return self._sdk.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata=_metadata(digest),
        output_expires_after={"anchor": "created_at", "seconds": _OUTPUT_EXPIRES_S})

  def _upload(self, digest: str, chunk: Sequence[tuple[str, dict]], look: bool) -> str:
    """The input file: with ``look``, one found by its name (uploaded by a run killed
    before recording it), else uploaded now."""
    name = f"tierflow-{digest[:32]}.jsonl"
    try:
      for file in self._sdk.files.list(purpose="batch") if look else ():
        if file.filename == name:
          return file.id
    except Exception as e:  # noqa: BLE001 - cannot look: upload
      _LOGGER.debug("listing files failed: %s", e)
    lines = b"".join(self._line(cid, body) + b"\n" for cid, body in chunk)
    return self._sdk.files.create(
        file=(name, lines), purpose="batch",
        expires_after={"anchor": "created_at", "seconds": _INPUT_EXPIRES_S}).id

  def _find_submitted(self, digest: str, since: float) -> Optional[str]:
    """The batch a killed run submitted for these requests but never recorded: OpenAI's
    carries the requests' hash in its metadata. None if there is none (or no way to tell)."""
    try:
      for batch in self._sdk.batches.list(limit=100):  # newest first; pages as needed
        if batch.created_at < since - 300:
          break
        if (_metadata(digest).items() <= (batch.metadata or {}).items()
            and batch.status not in ("failed", "cancelled", "cancelling", "expired")):
          _LOGGER.warning("found batch %s, submitted by a run killed before recording it",
                          batch.id)
          return batch.id
    except Exception as e:  # noqa: BLE001 - cannot look: submit (the pre-existing gap)
      _LOGGER.warning("listing batches to find an unrecorded one failed (%s); submitting", e)
    return None

  def _get(self, batch_id: str):
    return self._sdk.batches.retrieve(batch_id)

  def _final(self, batch) -> Optional[str]:
    return batch.status if batch.status in _OPENAI_FINAL else None

  def _cancel_batch(self, batch_id: str) -> None:
    self._sdk.batches.cancel(batch_id)

  def _delete_input(self, i: int) -> None:
    """The uploaded input file, once its batch is final (it expires anyway)."""
    file_id = self._state["chunks"][i].get("file_id")
    if not file_id:
      return
    try:
      self._sdk.files.delete(file_id)
    except Exception as e:  # noqa: BLE001 - already gone, or it expires by itself
      _LOGGER.debug("deleting input file %s: %s", file_id, e)
    self._chunk_state(i, file_id=None)

  def _results(self, batch) -> dict[str, BatchResult]:
    out: dict[str, BatchResult] = {}
    for file_id in (batch.output_file_id, batch.error_file_id):
      if not file_id:
        continue
      for line in self._sdk.files.content(file_id).content.decode().splitlines():
        if not line.strip():
          continue
        item = json.loads(line)
        response, error = item.get("response") or {}, item.get("error") or {}
        status = response.get("status_code")
        if status == 200:
          out[item["custom_id"]] = self._reply(response.get("body"))
        elif error.get("code") in ("batch_expired", "batch_cancelled"):
          kind = "batch_expired" if error["code"] == "batch_expired" else "batch_canceled"
          out[item["custom_id"]] = ModelCallError(kind, error.get("message", "")[:200])
        else:
          body = response.get("body") or {}
          message = ((body.get("error") or {}).get("message") if isinstance(body, dict)
                     else None) or error.get("message") or ""
          out[item["custom_id"]] = ModelCallError(kind_of_status(status),
                                                  f"HTTP {status} {message[:200]}", status)
    return out


class AnthropicBatches(ProviderBatch, provider="anthropic"):
  """Anthropic's Message Batches: the requests in the create call, results streamed."""

  limits = BatchLimits(100_000, 256_000_000)  # the Message Batches reference

  def _line(self, cid: str, body: dict) -> bytes:
    return json.dumps({"custom_id": cid, "params": body}).encode()

  def _create(self, i: int, chunk: Sequence[tuple[str, dict]], digest: str, look: bool):
    return self._sdk.messages.batches.create(
        requests=[{"custom_id": cid, "params": body} for cid, body in chunk])

  def _find_submitted(self, digest: str, since: float) -> Optional[str]:
    _LOGGER.warning("%s: a previous run may have submitted this batch and been killed before "
                    "recording it; Anthropic batches carry no metadata to find it by, so it "
                    "is submitted again", self._state_path)
    return None

  def _get(self, batch_id: str):
    return self._sdk.messages.batches.retrieve(batch_id)

  def _final(self, batch) -> Optional[str]:
    return "ended" if batch.processing_status == "ended" else None

  def _cancel_batch(self, batch_id: str) -> None:
    self._sdk.messages.batches.cancel(batch_id)

  def _results(self, batch) -> dict[str, BatchResult]:
    batch_id = batch.id
    out: dict[str, BatchResult] = {}
    for entry in self._sdk.messages.batches.results(batch_id):
      result = entry.result
      if result.type == "succeeded":
        out[entry.custom_id] = self._reply(result.message.model_dump(mode="json"))
      elif result.type == "errored":
        error = getattr(result.error, "error", None)
        kind = getattr(error, "type", "api_error")
        status = _ANTHROPIC_STATUS.get(kind, 500)
        out[entry.custom_id] = ModelCallError(
            kind_of_status(status), f"HTTP {status} {kind}: "
            f"{(getattr(error, 'message', '') or '')[:200]}", status)
      else:  # expired, canceled
        out[entry.custom_id] = ModelCallError(f"batch_{result.type}",
                                              f"batch {batch_id}: request {result.type}")
    return out
