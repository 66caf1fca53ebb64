"""The providers' batch APIs on the local endpoints, accelerated, with the providers' rules.

OpenAI: ``POST /v1/files`` (multipart, ``purpose=batch``), ``GET /v1/files`` (newest first),
``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``, ``DELETE /v1/files/{id}``,
``POST /v1/batches``, ``GET /v1/batches`` (newest first), ``GET /v1/batches/{id}``,
``POST /v1/batches/{id}/cancel``.
Anthropic: ``POST /v1/messages/batches``, ``GET /v1/messages/batches`` (newest first),
``GET /v1/messages/batches/{id}``, ``GET /v1/messages/batches/{id}/results``,
``POST /v1/messages/batches/{id}/cancel``.

What the providers enforce is enforced here, so a batch they would reject fails in tests:

* limits: OpenAI at most ``openai_max_requests`` (50,000) requests and ``openai_max_bytes``
  (200 MB) per input file, and ``enqueued_tokens`` (None: unlimited) prompt tokens of one
  model in unfinished batches (a batch over it ``failed``, ``token_limit_exceeded``);
  Anthropic at most ``anthropic_max_requests`` (100,000) requests or ``anthropic_max_bytes``
  (256 MB) per batch (HTTP 413), ``custom_id`` matching ``^[a-zA-Z0-9_-]{1,64}$`` (HTTP 400),
  unique in both;
* states: OpenAI ``validating``, ``in_progress``, ``finalizing``, ``completed``, ``failed``,
  ``expired``, ``cancelling``, ``cancelled``; Anthropic ``in_progress``, ``canceling``,
  ``ended``, each request ``succeeded``, ``errored``, ``canceled`` or ``expired``;
* time: the requests of a batch are answered one after another over ``complete_seconds``
  (read when the batch is looked at, so a test can shorten it; the real ones take up to
  24 h); a batch expires ``expire_seconds`` after creation (24 h
  at the providers), its unanswered requests ``expired``; a cancel takes ``step_seconds``
  (``cancelling``), then the answered requests are results and the rest ``canceled``
  (OpenAI: in the error file with ``batch_cancelled``, expired ones with ``batch_expired``).

Each request goes through the synchronous path (model rules, responder, usage, faults)
without the rate limits, which batches do not share. Knobs for tests: ``fail_every``
(every n-th request of a batch fails with a 500), ``expire`` (every request expires),
``stall_after`` (a batch answers its first n requests, then none until it is cancelled or
expires: a deterministic partial answer).
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import math
import re
import threading
import time
import uuid
from typing import Any, Callable, Optional

__all__ = ["BatchEndpoints", "BatchRefused"]

_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_MB = 1 << 20
_ENDED = ("completed", "failed", "expired", "cancelled")


class BatchRefused(ValueError):
  """A batch request the provider refuses with ``status`` (400, 413)."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


def _tokens(body: dict) -> int:
  """The prompt tokens a request enqueues, as a tokenizer might count them (bytes / 4)."""
  text = json.dumps([body.get("system"), body.get("messages")], ensure_ascii=False)
  return math.ceil(len(text.encode("utf-8")) / 4)


class BatchEndpoints:
  """Batch state and routes for one ``LocalProviderServer``."""

  def __init__(self, answer: Callable[[str, dict, dict], tuple[int, Any]],
               complete_seconds: float = 1.0, clock: Callable[[], float] = time.time):
    self._answer = answer  # (flavour, body, headers) -> (status, json payload)
    self.complete_seconds = complete_seconds
    self.expire_seconds = 86_400.0
    self.step_seconds = 0.05  # validating, finalizing, cancelling
    self.fail_every: Optional[int] = None
    self.expire = False
    self.stall_after: Optional[int] = None
    self.openai_max_requests, self.openai_max_bytes = 50_000, 200 * _MB
    self.anthropic_max_requests, self.anthropic_max_bytes = 100_000, 256 * _MB
    self.enqueued_tokens: Optional[int] = None
    self._clock = clock
    self._lock = threading.Lock()
    self._files: dict[str, dict] = {}
    self._batches: dict[str, dict] = {}
    self.created: list[str] = []  # ids of the batches created, in order
    self.answered = 0  # requests answered in batches, in all

  # -- routing ---------------------------------------------------------------------------
  def route(self, method: str, path: str, headers: dict, raw: bytes, base_url: str
            ) -> Optional[tuple[int, Any, str]]:
    """(status, payload, content type) for a batch route, or None if ``path`` is not one.
    ``payload`` is JSON-able, or bytes for file contents and results."""
    parts = path.split("?")[0].strip("/").split("/")
    if parts[:2] == ["v1", "files"]:
      if method == "POST" and len(parts) == 2:
        return 200, self._upload(headers, raw), "json"
      if method == "GET" and len(parts) == 2:
        return 200, self._file_list(), "json"
      if method == "GET" and len(parts) == 4 and parts[3] == "content":
        return 200, self._file(parts[2])["content"], "bytes"
      if method == "GET" and len(parts) == 3:
        return 200, self._file_object(self._file(parts[2])), "json"
      if method == "DELETE" and len(parts) == 3:
        return 200, self._delete_file(parts[2]), "json"
    if parts[:2] == ["v1", "batches"]:
      if method == "POST" and len(parts) == 2:
        return 200, self._openai_create(json.loads(raw or b"{}"), headers), "json"
      if method == "GET" and len(parts) == 3:
        return 200, self._openai_view(self._batch(parts[2])), "json"
      if method == "GET" and len(parts) == 2:
        return 200, self._list("openai", self._openai_view), "json"
      if method == "POST" and len(parts) == 4 and parts[3] == "cancel":
        return 200, self._openai_view(self._cancel(parts[2])), "json"
    if parts[:3] == ["v1", "messages", "batches"]:
      if method == "POST" and len(parts) == 3:
        return 200, self._anthropic_create(raw, headers), "json"
      if method == "GET" and len(parts) == 3:
        return 200, self._list("anthropic",
                               lambda b: self._anthropic_view(b, base_url)), "json"
      if method == "GET" and len(parts) == 4:
        return 200, self._anthropic_view(self._batch(parts[3]), base_url), "json"
      if method == "GET" and len(parts) == 5 and parts[4] == "results":
        return 200, self._anthropic_results(self._batch(parts[3])), "bytes"
      if method == "POST" and len(parts) == 5 and parts[4] == "cancel":
        return 200, self._anthropic_view(self._cancel(parts[3]), base_url), "json"
    return None

  # -- files -----------------------------------------------------------------------------
  def _upload(self, headers: dict, raw: bytes) -> dict:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + headers.get("content-type", "").encode() + b"\r\n\r\n" + raw)
    fields, content, name = {}, None, "upload.jsonl"
    for part in message.iter_parts():
      field = part.get_param("name", header="content-disposition")
      if field == "file":
        content = part.get_payload(decode=True)
        name = part.get_filename() or name
      else:
        fields[field] = part.get_payload(decode=True).decode()
    if content is None:
      raise ValueError("no file in the upload")
    if fields.get("purpose") != "batch":
      raise ValueError(f"purpose must be batch, not {fields.get('purpose')!r}")
    file = {"id": f"file-{uuid.uuid4().hex[:24]}", "content": content, "filename": name,
            "created_at": self._clock(), "purpose": "batch"}
    with self._lock:
      self._files[file["id"]] = file
    return self._file_object(file)

  def _file(self, file_id: str) -> dict:
    with self._lock:
      file = self._files.get(file_id)
    if file is None:
      raise KeyError(f"No such File object: {file_id}")
    return file

  def _delete_file(self, file_id: str) -> dict:
    with self._lock:
      if self._files.pop(file_id, None) is None:
        raise KeyError(f"No such File object: {file_id}")
    return {"id": file_id, "object": "file", "deleted": True}

  def files(self, purpose: Optional[str] = None) -> list[dict]:
    """The files kept (for tests: uploads not deleted)."""
    with self._lock:
      return [f for f in self._files.values() if purpose in (None, f["purpose"])]

  def _file_list(self) -> dict:
    with self._lock:
      files = sorted(self._files.values(), key=lambda f: -f["created_at"])
    return {"object": "list", "data": [self._file_object(f) for f in files],
            "has_more": False}

  @staticmethod
  def _file_object(file: dict) -> dict:
    return {"id": file["id"], "object": "file", "bytes": len(file["content"]),
            "created_at": int(file["created_at"]), "filename": file["filename"],
            "purpose": file["purpose"], "status": "processed"}

  def _new_file(self, lines: list[dict], name: str) -> Optional[str]:
    if not lines:
      return None
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    file = {"id": f"file-{uuid.uuid4().hex[:24]}", "content": content, "filename": name,
            "created_at": self._clock(), "purpose": "batch_output"}
    self._files[file["id"]] = file
    return file["id"]

  # -- batches ---------------------------------------------------------------------------
  def _new_batch(self, flavour: str, requests: list[tuple[str, dict]], headers: dict,
                 extra: dict, errors: Optional[list[dict]] = None) -> dict:
    now = self._clock()
    batch = {"id": (f"batch_{uuid.uuid4().hex[:24]}" if flavour == "openai"
                    else f"msgbatch_{uuid.uuid4().hex[:24]}"),
             "flavour": flavour, "requests": requests, "created_at": now,
             "start_at": now + (self.step_seconds if flavour == "openai" else 0.0),
             "expires_at": now + (0.0 if self.expire else self.expire_seconds),
             "fail_every": self.fail_every, "stall_after": self.stall_after,
             "results": {}, "cancel_at": None, "ended_at": None, "errors": errors,
             "final": "failed" if errors else None,
             "headers": headers, "lock": threading.Lock(), **extra}
    if errors:
      batch["ended_at"] = now
    with self._lock:
      self._batches[batch["id"]] = batch
      self.created.append(batch["id"])
    return batch

  def _batch(self, batch_id: str) -> dict:
    with self._lock:
      batch = self._batches.get(batch_id)
    if batch is None:
      raise KeyError(f"No such batch: {batch_id}")
    self._advance(batch)
    return batch

  def _due(self, batch: dict, i: int) -> float:
    n = len(batch["requests"])
    return batch["start_at"] + self.complete_seconds * (i + 1) / n

  def _status(self, batch: dict, now: float) -> str:
    """The OpenAI status at ``now`` (Anthropic's is read from it)."""
    if batch["errors"]:
      return "failed"
    n, answered = len(batch["requests"]), len(batch["results"])
    if batch["cancel_at"] is not None:
      return "cancelled" if now >= batch["cancel_at"] + self.step_seconds else "cancelling"
    if answered == n:
      return "completed" if now >= self._due(batch, n - 1) + self.step_seconds \
          else "finalizing"
    if now >= batch["expires_at"]:
      return "expired"
    return "validating" if now < batch["start_at"] else "in_progress"

  def _advance(self, batch: dict) -> None:
    """Answers the requests whose time has come (before a cancel or the expiry), and
    ends the batch once its status is final. One thread per batch at a time."""
    with batch["lock"]:
      if batch["ended_at"] is not None:
        return
      now = self._clock()
      cutoff = min(now, batch["expires_at"],
                   math.inf if batch["cancel_at"] is None else batch["cancel_at"])
      for i, (cid, body) in enumerate(batch["requests"]):
        if cid in batch["results"] or self._due(batch, i) > cutoff:
          continue
        if batch["stall_after"] is not None and i >= batch["stall_after"]:
          break
        every = batch["fail_every"]
        if every and (i + 1) % every == 0:
          batch["results"][cid] = (500, {"error": {
              "type": "server_error", "message": "The server had an error."}})
        else:
          batch["results"][cid] = self._answer(batch["flavour"], body, batch["headers"])
        self.answered += 1
      status = self._status(batch, self._clock())
      if status in _ENDED:
        batch["ended_at"], batch["final"] = self._clock(), status
        if batch["flavour"] == "openai":
          self._openai_files(batch, status)

  def _final_or_current(self, batch: dict) -> str:
    if batch["final"] is None and self._status(batch, self._clock()) in _ENDED:
      self._advance(batch)
    return batch["final"] or self._status(batch, self._clock())

  def _cancel(self, batch_id: str) -> dict:
    batch = self._batch(batch_id)
    with batch["lock"]:
      status = self._status(batch, self._clock())
      if status in _ENDED or status == "cancelling":
        raise ValueError(f"Cannot cancel a batch with status {status}.")
      batch["cancel_at"] = self._clock()
    return batch

  def _list(self, flavour: str, view: Callable[[dict], dict]) -> dict:
    """Every batch of a flavour, newest first, on one page."""
    with self._lock:
      mine = [b for b in self._batches.values() if b["flavour"] == flavour]
    for b in mine:
      self._advance(b)
    views = [view(b) for b in sorted(mine, key=lambda b: -b["created_at"])]
    return {"object": "list", "data": views, "has_more": False,
            "first_id": views[0]["id"] if views else None,
            "last_id": views[-1]["id"] if views else None}

  def _enqueued(self, model: str) -> int:
    """Prompt tokens of ``model`` in OpenAI batches not ended."""
    with self._lock:
      batches = [b for b in self._batches.values()
                 if b["flavour"] == "openai" and b.get("model") == model]
    for b in batches:
      self._advance(b)
    return sum(b["tokens"] for b in batches if b["ended_at"] is None)

  # -- OpenAI shapes ---------------------------------------------------------------------
  def _openai_create(self, body: dict, headers: dict) -> dict:
    if body.get("endpoint") != "/v1/chat/completions":
      raise ValueError(f"endpoint {body.get('endpoint')!r} is not supported here")
    if body.get("completion_window") != "24h":
      raise ValueError("completion_window must be 24h")
    file = self._file(body.get("input_file_id") or "")
    requests, errors = [], []
    for n, line in enumerate(file["content"].decode().splitlines(), 1):
      if not line.strip():
        continue
      item = json.loads(line)
      if item.get("method") != "POST" or item.get("url") != "/v1/chat/completions":
        errors.append({"code": "invalid_request", "line": n, "param": "url", "message":
                       "method/url must be POST /v1/chat/completions"})
      requests.append((item.get("custom_id"), item.get("body") or {}))
    ids = [cid for cid, _ in requests]
    if len(set(ids)) != len(ids):
      errors.append({"code": "duplicate_custom_id", "line": None, "param": "custom_id",
                     "message": "custom_id values must be unique within a batch"})
    if len(requests) > self.openai_max_requests:
      errors.append({"code": "too_many_requests", "line": None, "param": None, "message":
                     f"The input file has {len(requests):,} requests; a batch takes at "
                     f"most {self.openai_max_requests:,}."})
    if len(file["content"]) > self.openai_max_bytes:
      errors.append({"code": "file_too_large", "line": None, "param": None, "message":
                     f"The input file is {len(file['content']):,} bytes; a batch takes at "
                     f"most {self.openai_max_bytes:,}."})
    models = {b.get("model") for _, b in requests}
    model = models.pop() if len(models) == 1 else None
    tokens = sum(_tokens(b) for _, b in requests)
    if not errors and self.enqueued_tokens is not None:
      enqueued = self._enqueued(model)
      if enqueued + tokens > self.enqueued_tokens:
        errors.append({"code": "token_limit_exceeded", "line": None, "param": None, "message":
                       f"Enqueued token limit reached for {model} in organization "
                       f"org-local. Limit: {self.enqueued_tokens:,} enqueued tokens. Please "
                       "try again once some in_progress batches have been completed."})
    return self._openai_view(self._new_batch(
        "openai", requests, headers, {"input_file_id": file["id"], "model": model,
                                      "tokens": tokens, "metadata": body.get("metadata")},
        errors))

  def _openai_files(self, batch: dict, status: str) -> None:
    out, errors = [], []
    for cid, _ in batch["requests"]:
      line = {"id": f"batch_req_{uuid.uuid4().hex[:20]}", "custom_id": cid}
      if cid in batch["results"]:
        code, payload = batch["results"][cid]
        line.update(response={"status_code": code, "request_id": uuid.uuid4().hex,
                              "body": payload}, error=None)
        (out if code == 200 else errors).append(line)
      elif status in ("expired", "cancelled"):
        line.update(response=None, error={
            "code": f"batch_{status}",
            "message": ("This request could not be executed before the completion window "
                        "expired." if status == "expired" else
                        "This request was not executed: the batch was cancelled.")})
        errors.append(line)
    batch["output_file_id"] = self._new_file(out, "output.jsonl")
    batch["error_file_id"] = self._new_file(errors, "errors.jsonl")

  def _openai_view(self, batch: dict) -> dict:
    status = self._final_or_current(batch)
    codes = [code for code, _ in batch["results"].values()]
    failed = sum(1 for c in codes if c != 200)
    if status in ("expired", "cancelled"):
      failed += len(batch["requests"]) - len(codes)
    at = lambda s: int(batch["ended_at"]) if status == s else None  # noqa: E731
    created = int(batch["created_at"])
    return {"id": batch["id"], "object": "batch", "endpoint": "/v1/chat/completions",
            "errors": ({"object": "list", "data": batch["errors"]} if batch["errors"]
                       else None),
            "input_file_id": batch["input_file_id"], "completion_window": "24h",
            "status": status, "output_file_id": batch.get("output_file_id"),
            "error_file_id": batch.get("error_file_id"), "created_at": created,
            "in_progress_at": None if status in ("validating", "failed") else created,
            "expires_at": int(batch["expires_at"]),
            "cancelling_at": (int(batch["cancel_at"]) if batch["cancel_at"] is not None
                              else None),
            "completed_at": at("completed"), "expired_at": at("expired"),
            "cancelled_at": at("cancelled"), "failed_at": at("failed"),
            "request_counts": {"total": len(batch["requests"]),
                               "completed": len(codes) - sum(1 for c in codes if c != 200),
                               "failed": failed},
            "metadata": batch.get("metadata")}

  # -- Anthropic shapes ------------------------------------------------------------------
  def _anthropic_create(self, raw: bytes, headers: dict) -> dict:
    if len(raw) > self.anthropic_max_bytes:
      raise BatchRefused(413, f"Request exceeds the maximum size of "
                              f"{self.anthropic_max_bytes:,} bytes for a message batch.")
    requests = json.loads(raw or b"{}").get("requests")
    if not isinstance(requests, list) or not requests:
      raise ValueError("requests: a non-empty list is required")
    if len(requests) > self.anthropic_max_requests:
      raise ValueError(f"requests: at most {self.anthropic_max_requests:,} items, "
                       f"got {len(requests):,}")
    pairs = []
    for n, r in enumerate(requests):
      cid = r.get("custom_id")
      if not isinstance(cid, str) or not _CUSTOM_ID.match(cid):
        raise ValueError(f"requests.{n}.custom_id: String should match pattern "
                         f"'^[a-zA-Z0-9_-]{{1,64}}$' (got {cid!r})")
      pairs.append((cid, r.get("params") or {}))
    if len({cid for cid, _ in pairs}) != len(pairs):
      raise ValueError("requests: custom_id values must be unique within a batch")
    return self._anthropic_view(self._new_batch("anthropic", pairs, headers, {}), "")

  def _anthropic_view(self, batch: dict, base_url: str) -> dict:
    status = self._final_or_current(batch)
    ended = status in _ENDED
    codes = [code for code, _ in batch["results"].values()]
    rest = len(batch["requests"]) - len(codes)
    counts = {"processing": 0 if ended else rest,
              "succeeded": sum(1 for c in codes if c == 200),
              "errored": sum(1 for c in codes if c != 200),
              "canceled": rest if ended and status == "cancelled" else 0,
              "expired": rest if ended and status == "expired" else 0}
    iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))  # noqa: E731
    return {"id": batch["id"], "type": "message_batch",
            "processing_status": ("ended" if ended else
                                  "canceling" if status == "cancelling" else "in_progress"),
            "request_counts": counts, "created_at": iso(batch["created_at"]),
            "expires_at": iso(batch["expires_at"]),
            "ended_at": iso(batch["ended_at"]) if ended else None,
            "cancel_initiated_at": (iso(batch["cancel_at"]) if batch["cancel_at"] is not None
                                    else None),
            "archived_at": None,
            "results_url": (f"{base_url}/v1/messages/batches/{batch['id']}/results"
                            if ended else None)}

  def _anthropic_results(self, batch: dict) -> bytes:
    if batch["ended_at"] is None:
      raise ValueError("the batch has not ended")
    kind = "expired" if batch["final"] == "expired" else "canceled"
    lines = []
    for cid, _ in batch["requests"]:
      if cid not in batch["results"]:
        lines.append({"custom_id": cid, "result": {"type": kind}})
        continue
      status, payload = batch["results"][cid]
      if status == 200:
        lines.append({"custom_id": cid, "result": {"type": "succeeded", "message": payload}})
      else:
        lines.append({"custom_id": cid, "result": {"type": "errored", "error": {
            "type": "error", "error": payload.get("error", payload)}}})
    return "".join(json.dumps(line) + "\n" for line in lines).encode()
