"""Provider batch APIs: OpenAI's Batch API and Anthropic's Message Batches.

Both bill half the synchronous price for work finished within 24 h: a nightly backfill.
``ProviderBatch.run(requests)`` submits ``(custom_id, request body)`` pairs as one batch,
polls until it ends (or ``max_wait_s`` passes: then it is cancelled), and returns a reply
or a ``ModelCallError`` per custom id. Request bodies are the synchronous ones
(``ModelClient.request_body``), answers are read by the same parser.

A state file (on any Beam filesystem: local, ``gs://``, ``s3://``) records the batch id
right after submission, keyed by a hash of the requests, so a run killed while the batch
was processing, re-run, polls that batch instead of submitting and paying twice. Before
submitting, the file records the intent (the hash, no id yet). A run killed between the
provider accepting the batch and the id being recorded leaves that intent: the re-run
finds the OpenAI batch by the hash it carries in its ``metadata`` and polls it. Anthropic
batches carry no metadata to find them by, so there (one HTTP round trip's window) the
batch is submitted again, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Callable, Optional, Sequence, Union

from tierflow.connectors.llm_clients import (ModelCallError, ModelClient, ModelReply,
                                             kind_of_status)
from tierflow.files import read_text, rename_over

__all__ = ["ProviderBatch", "BatchResult"]

_LOGGER = logging.getLogger(__name__)

BatchResult = Union[ModelReply, ModelCallError]

_OPENAI_ENDED = frozenset({"completed", "expired", "cancelled", "failed"})


def _metadata(digest: str) -> dict:
  """What an OpenAI batch carries to be found again by its requests' hash."""
  return {"tierflow_requests": digest[:32]}


class ProviderBatch:
  """One batch of requests to one model endpoint.

  Args:
    client: the tier's ``ModelClient`` (its SDK client, config and answer parser).
    state_path: where the batch id is kept (None: not kept; a kill loses the batch).
    poll_s: seconds between status checks.
    max_wait_s: give up (cancel) after this long; the requests fail with
      ``batch_deadline``.
  """

  def __init__(self, client: ModelClient, state_path: Optional[str] = None, *,
               poll_s: float = 30.0, max_wait_s: float = 86_400.0,
               sleep: Callable[[float], None] = time.sleep,
               clock: Callable[[], float] = time.monotonic):
    self._client = client
    self._sdk = client.sdk_client
    self._openai = client.cfg.provider == "openai"
    self._state_path = state_path
    self._poll_s, self._max_wait_s = poll_s, max_wait_s
    self._sleep, self._clock = sleep, clock
    self.batch_id: Optional[str] = None
    self.resumed = False

  # -- the one call ----------------------------------------------------------------------
  def run(self, requests: Sequence[tuple[str, dict]]) -> dict[str, BatchResult]:
    if not requests:
      return {}
    digest = hashlib.sha256(json.dumps(list(requests), sort_keys=True).encode()).hexdigest()
    state = self._load_state()
    mine = bool(state) and state.get("requests_sha256") == digest
    found = None
    if mine and not state.get("batch_id"):  # killed between submitting and recording
      found = self._find_submitted(digest, float(state.get("submitting_since", 0)))
    if mine and (state.get("batch_id") or found):
      self.batch_id, self.resumed = state.get("batch_id") or found, True
      _LOGGER.info("resuming %s batch %s (%d requests)", self._client, self.batch_id,
                   len(requests))
      if found:
        self._save_state({**state, "batch_id": found})
    else:
      if state and not mine:
        _LOGGER.warning("%s holds a batch for other requests (the config changed?); "
                        "submitting anew", self._state_path)
      identity = {"provider": self._client.cfg.provider, "model": self._client.cfg.model,
                  "requests": len(requests), "requests_sha256": digest}
      self._save_state({**identity, "submitting_since": time.time()})
      try:
        self.batch_id = self._submit(requests, digest)
      except Exception as e:  # noqa: BLE001 - every request fails with the reason
        error = ModelCallError("batch_failed", f"submitting the batch failed: "
                               f"{type(e).__name__}: {str(e)[:200]}")
        return {cid: error for cid, _ in requests}
      self._save_state({**identity, "batch_id": self.batch_id,
                        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    status = self._wait()
    if status == "deadline":
      self._cancel()
      error = ModelCallError("batch_deadline", f"batch {self.batch_id} not done within "
                             f"{self._max_wait_s:.0f}s (--max-batch-wait); cancelled")
      return {cid: error for cid, _ in requests}
    try:
      results = self._results()
    except Exception as e:  # noqa: BLE001 - e.g. the output files are gone: fall back
      _LOGGER.warning("reading the results of batch %s failed: %s", self.batch_id, e)
      results, status = {}, f"unreadable ({type(e).__name__})"
    missing = ModelCallError(f"batch_{status}" if status in ("expired", "cancelled", "failed")
                             else "batch_failed", f"batch {self.batch_id} {status}: no answer")
    return {cid: results.get(cid, missing) for cid, _ in requests}

  # -- state -----------------------------------------------------------------------------
  def _load_state(self) -> Optional[dict]:
    from apache_beam.io.filesystems import FileSystems
    if not self._state_path or not FileSystems.exists(self._state_path):
      return None
    try:
      return json.loads(read_text(self._state_path))
    except ValueError:
      return None

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

  # -- provider calls --------------------------------------------------------------------
  def _submit(self, requests: Sequence[tuple[str, dict]], digest: str) -> str:
    if self._openai:
      lines = "".join(json.dumps({"custom_id": cid, "method": "POST",
                                  "url": "/v1/chat/completions", "body": body}) + "\n"
                      for cid, body in requests)
      file = self._sdk.files.create(file=("tierflow-batch.jsonl", lines.encode()),
                                    purpose="batch")
      batch = self._sdk.batches.create(input_file_id=file.id,
                                       endpoint="/v1/chat/completions",
                                       completion_window="24h",
                                       metadata=_metadata(digest))
    else:
      batch = self._sdk.messages.batches.create(
          requests=[{"custom_id": cid, "params": body} for cid, body in requests])
    _LOGGER.info("submitted %s batch %s (%d requests)", self._client, batch.id, len(requests))
    return batch.id

  def _find_submitted(self, digest: str, since: float) -> Optional[str]:
    """The batch a killed run submitted for these requests but never recorded: OpenAI's
    carries the requests' hash in its metadata. None if there is none (or no way to tell)."""
    if not self._openai:
      _LOGGER.warning("%s: a previous run may have submitted this batch and been killed before "
                      "recording it; Anthropic batches carry no metadata to find it by, so it "
                      "is submitted again", self._state_path)
      return None
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

  def _status(self) -> str:
    if self._openai:
      status = self._sdk.batches.retrieve(self.batch_id).status
      return status if status in _OPENAI_ENDED else "running"
    return "ended" if self._sdk.messages.batches.retrieve(
        self.batch_id).processing_status == "ended" else "running"

  def _wait(self) -> str:
    deadline = self._clock() + self._max_wait_s
    while True:
      try:
        status = self._status()
      except Exception as e:  # noqa: BLE001 - a status check failing is not the batch failing
        _LOGGER.warning("checking batch %s failed (%s); trying again", self.batch_id, e)
        status = "running"
      if status != "running":
        return status
      if self._clock() >= deadline:
        return "deadline"
      self._sleep(min(self._poll_s, max(0.0, deadline - self._clock())))

  def _cancel(self) -> None:
    try:
      if self._openai:
        self._sdk.batches.cancel(self.batch_id)
      else:
        self._sdk.messages.batches.cancel(self.batch_id)
    except Exception as e:  # noqa: BLE001 - best effort; the deadline stands
      _LOGGER.warning("cancelling batch %s failed: %s", self.batch_id, e)

  def _results(self) -> dict[str, BatchResult]:
    return self._openai_results() if self._openai else self._anthropic_results()

  def _reply(self, body) -> BatchResult:
    try:
      return self._client.reply_from_body(body)
    except ModelCallError as e:
      return e

  def _openai_results(self) -> dict[str, BatchResult]:
    batch = self._sdk.batches.retrieve(self.batch_id)
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
        elif error.get("code") == "batch_expired":
          out[item["custom_id"]] = ModelCallError("batch_expired", error.get("message", ""))
        else:
          body = response.get("body") or {}
          message = ((body.get("error") or {}).get("message") if isinstance(body, dict)
                     else None) or error.get("message") or ""
          out[item["custom_id"]] = ModelCallError(kind_of_status(status),
                                                  f"HTTP {status} {message[:200]}", status)
    return out

  def _anthropic_results(self) -> dict[str, BatchResult]:
    out: dict[str, BatchResult] = {}
    for entry in self._sdk.messages.batches.results(self.batch_id):
      result = entry.result
      if result.type == "succeeded":
        out[entry.custom_id] = self._reply(result.message.model_dump(mode="json"))
      elif result.type == "errored":
        error = getattr(result.error, "error", None)
        kind = getattr(error, "type", "api_error")
        out[entry.custom_id] = ModelCallError(
            "bad_request" if kind == "invalid_request_error" else "server_error",
            f"{kind}: {getattr(error, 'message', '')[:200]}")
      else:  # expired, canceled
        out[entry.custom_id] = ModelCallError(f"batch_{result.type}",
                                              f"batch {self.batch_id}: request {result.type}")
    return out
