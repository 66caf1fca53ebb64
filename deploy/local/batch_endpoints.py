"""The providers' batch APIs on the local endpoints, accelerated.

OpenAI: ``POST /v1/files`` (multipart, ``purpose=batch``), ``GET /v1/files/{id}/content``,
``POST /v1/batches``, ``GET /v1/batches`` (newest first), ``GET /v1/batches/{id}``,
``POST /v1/batches/{id}/cancel``.
Anthropic: ``POST /v1/messages/batches``, ``GET /v1/messages/batches/{id}``,
``GET /v1/messages/batches/{id}/results``, ``POST /v1/messages/batches/{id}/cancel``.

A batch is answered ``complete_seconds`` after it was created (the real ones take up to
24 h): each of its requests goes through the same path as a synchronous one (model rules,
responder, usage, faults) without the rate limits, which batches do not share. Knobs for
tests: ``fail_every`` (every n-th request of a batch fails with a 500 in the results),
``expire`` (batches expire instead of completing: OpenAI ``expired`` with every request
in the error file as ``batch_expired``, Anthropic ``expired`` results).
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import time
import uuid
from typing import Any, Callable, Optional

__all__ = ["BatchEndpoints"]


class BatchEndpoints:
  """Batch state and routes for one ``LocalProviderServer``."""

  def __init__(self, answer: Callable[[str, dict, dict], tuple[int, Any]],
               complete_seconds: float = 1.0, clock: Callable[[], float] = time.time):
    self._answer = answer  # (flavour, body, headers) -> (status, json payload)
    self.complete_seconds = complete_seconds
    self.fail_every: Optional[int] = None
    self.expire = False
    self._clock = clock
    self._lock = threading.Lock()
    self._files: dict[str, dict] = {}
    self._batches: dict[str, dict] = {}
    self.created: list[str] = []  # ids of the batches created, in order

  # -- routing ---------------------------------------------------------------------------
  def route(self, method: str, path: str, headers: dict, raw: bytes, base_url: str
            ) -> Optional[tuple[int, Any, str]]:
    """(status, payload, content type) for a batch route, or None if ``path`` is not one.
    ``payload`` is JSON-able, or bytes for file contents and results."""
    parts = path.strip("/").split("/")
    if parts[:2] == ["v1", "files"]:
      if method == "POST" and len(parts) == 2:
        return 200, self._upload(headers, raw), "json"
      if method == "GET" and len(parts) == 4 and parts[3] == "content":
        return 200, self._file(parts[2])["content"], "bytes"
      if method == "GET" and len(parts) == 3:
        return 200, self._file_object(self._file(parts[2])), "json"
    if parts[:2] == ["v1", "batches"]:
      if method == "POST" and len(parts) == 2:
        return 200, self._openai_create(json.loads(raw or b"{}"), headers), "json"
      if method == "GET" and len(parts) == 3:
        return 200, self._openai_view(self._batch(parts[2])), "json"
      if method == "GET" and len(parts) == 2:
        return 200, self._openai_list(), "json"
      if method == "POST" and len(parts) == 4 and parts[3] == "cancel":
        return 200, self._openai_view(self._cancel(parts[2])), "json"
    if parts[:3] == ["v1", "messages", "batches"]:
      if method == "POST" and len(parts) == 3:
        return 200, self._anthropic_create(json.loads(raw or b"{}"), headers), "json"
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
            "created_at": int(self._clock()), "purpose": "batch"}
    with self._lock:
      self._files[file["id"]] = file
    return self._file_object(file)

  def _file(self, file_id: str) -> dict:
    with self._lock:
      file = self._files.get(file_id)
    if file is None:
      raise KeyError(f"No such File object: {file_id}")
    return file

  @staticmethod
  def _file_object(file: dict) -> dict:
    return {"id": file["id"], "object": "file", "bytes": len(file["content"]),
            "created_at": file["created_at"], "filename": file["filename"],
            "purpose": file["purpose"], "status": "processed"}

  def _new_file(self, lines: list[dict], name: str) -> Optional[str]:
    if not lines:
      return None
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    file = {"id": f"file-{uuid.uuid4().hex[:24]}", "content": content, "filename": name,
            "created_at": int(self._clock()), "purpose": "batch_output"}
    self._files[file["id"]] = file
    return file["id"]

  # -- batches ---------------------------------------------------------------------------
  def _new_batch(self, flavour: str, requests: list[tuple[str, dict]], headers: dict,
                 extra: dict) -> dict:
    ids = [cid for cid, _ in requests]
    if len(set(ids)) != len(ids):
      raise ValueError("custom_id values must be unique within a batch")
    batch = {"id": (f"batch_{uuid.uuid4().hex[:24]}" if flavour == "openai"
                    else f"msgbatch_{uuid.uuid4().hex[:24]}"),
             "flavour": flavour, "requests": requests, "created_at": self._clock(),
             "status": "in_progress", "results": None, "headers": headers, **extra}
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

  def _cancel(self, batch_id: str) -> dict:
    batch = self._batch(batch_id)
    with self._lock:
      if batch["status"] == "in_progress":
        batch["status"], batch["results"] = "cancelled", []
    return batch

  def _advance(self, batch: dict) -> None:
    """Answers a batch once its time has come (outside the lock: requests take time)."""
    with self._lock:
      due = (batch["status"] == "in_progress" and not batch.get("working")
             and self._clock() - batch["created_at"] >= self.complete_seconds)
      if due:
        batch["working"] = True
    if not due:
      return
    results = []
    if not self.expire:
      for i, (cid, body) in enumerate(batch["requests"], 1):
        if self.fail_every and i % self.fail_every == 0:
          results.append((cid, 500, {"error": {"type": "server_error",
                                               "message": "The server had an error."}}))
          continue
        status, payload = self._answer(batch["flavour"], body, batch["headers"])
        results.append((cid, status, payload))
    with self._lock:
      batch["results"] = results
      batch["status"] = "expired" if self.expire else "ended"
      batch["ended_at"] = self._clock()
      if batch["flavour"] == "openai":
        self._openai_files(batch)

  # -- OpenAI shapes ---------------------------------------------------------------------
  def _openai_create(self, body: dict, headers: dict) -> dict:
    if body.get("endpoint") != "/v1/chat/completions":
      raise ValueError(f"endpoint {body.get('endpoint')!r} is not supported here")
    if body.get("completion_window") != "24h":
      raise ValueError("completion_window must be 24h")
    file = self._file(body.get("input_file_id") or "")
    requests = []
    for n, line in enumerate(file["content"].decode().splitlines(), 1):
      if not line.strip():
        continue
      item = json.loads(line)
      if item.get("method") != "POST" or item.get("url") != "/v1/chat/completions":
        raise ValueError(f"line {n}: method/url must be POST /v1/chat/completions")
      requests.append((item["custom_id"], item["body"]))
    return self._openai_view(self._new_batch(
        "openai", requests, headers, {"input_file_id": file["id"],
                                      "metadata": body.get("metadata")}))

  def _openai_files(self, batch: dict) -> None:
    out, errors = [], []
    for cid, status, payload in batch["results"]:
      line = {"id": f"batch_req_{uuid.uuid4().hex[:20]}", "custom_id": cid,
              "response": {"status_code": status, "request_id": uuid.uuid4().hex,
                           "body": payload}, "error": None}
      (out if status == 200 else errors).append(line)
    if batch["status"] == "expired":
      errors = [{"id": f"batch_req_{uuid.uuid4().hex[:20]}", "custom_id": cid,
                 "response": None, "error": {"code": "batch_expired", "message":
                                             "This request could not be executed before the "
                                             "completion window expired."}}
                for cid, _ in batch["requests"]]
    batch["output_file_id"] = self._new_file(out, "output.jsonl")
    batch["error_file_id"] = self._new_file(errors, "errors.jsonl")

  def _openai_view(self, batch: dict) -> dict:
    status = {"in_progress": "in_progress", "ended": "completed", "expired": "expired",
              "cancelled": "cancelled"}[batch["status"]]
    results = batch["results"] or []
    failed = sum(1 for _, s, _ in results if s != 200)
    created = int(batch["created_at"])
    return {"id": batch["id"], "object": "batch", "endpoint": "/v1/chat/completions",
            "errors": None, "input_file_id": batch["input_file_id"],
            "completion_window": "24h", "status": status,
            "output_file_id": batch.get("output_file_id"),
            "error_file_id": batch.get("error_file_id"), "created_at": created,
            "in_progress_at": created, "expires_at": created + 86_400,
            "completed_at": int(batch["ended_at"]) if status == "completed" else None,
            "expired_at": int(batch["ended_at"]) if status == "expired" else None,
            "cancelled_at": int(self._clock()) if status == "cancelled" else None,
            "request_counts": {"total": len(batch["requests"]),
                               "completed": len(results) - failed, "failed": failed},
            "metadata": batch.get("metadata")}

  def _openai_list(self) -> dict:
    """Every OpenAI batch, newest first, on one page."""
    with self._lock:
      mine = [b for b in self._batches.values() if b["flavour"] == "openai"]
    views = [self._openai_view(b) for b in sorted(mine, key=lambda b: -b["created_at"])]
    return {"object": "list", "data": views, "has_more": False,
            "first_id": views[0]["id"] if views else None,
            "last_id": views[-1]["id"] if views else None}

  # -- Anthropic shapes ------------------------------------------------------------------
  def _anthropic_create(self, body: dict, headers: dict) -> dict:
    requests = body.get("requests")
    if not isinstance(requests, list) or not requests:
      raise ValueError("requests: a non-empty list is required")
    pairs = [(r["custom_id"], r["params"]) for r in requests]
    return self._anthropic_view(self._new_batch("anthropic", pairs, headers, {}), "")

  def _anthropic_view(self, batch: dict, base_url: str) -> dict:
    results = batch["results"]
    ended = batch["status"] != "in_progress"
    counts = {"processing": 0 if ended else len(batch["requests"]), "succeeded": 0,
              "errored": 0, "canceled": 0, "expired": 0}
    if batch["status"] == "expired":
      counts["expired"] = len(batch["requests"])
    elif batch["status"] == "cancelled":
      counts["canceled"] = len(batch["requests"])
    elif ended:
      counts["succeeded"] = sum(1 for _, s, _ in results if s == 200)
      counts["errored"] = len(results) - counts["succeeded"]
    iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))  # noqa: E731
    return {"id": batch["id"], "type": "message_batch",
            "processing_status": "ended" if ended else "in_progress",
            "request_counts": counts, "created_at": iso(batch["created_at"]),
            "expires_at": iso(batch["created_at"] + 86_400),
            "ended_at": iso(batch["ended_at"]) if ended and "ended_at" in batch else None,
            "cancel_initiated_at": None, "archived_at": None,
            "results_url": (f"{base_url}/v1/messages/batches/{batch['id']}/results"
                            if ended else None)}

  def _anthropic_results(self, batch: dict) -> bytes:
    if batch["status"] == "in_progress":
      raise ValueError("the batch has not ended")
    lines = []
    if batch["status"] in ("expired", "cancelled"):
      kind = "expired" if batch["status"] == "expired" else "canceled"
      lines = [{"custom_id": cid, "result": {"type": kind}} for cid, _ in batch["requests"]]
    else:
      for cid, status, payload in batch["results"]:
        if status == 200:
          lines.append({"custom_id": cid, "result": {"type": "succeeded", "message": payload}})
        else:
          lines.append({"custom_id": cid, "result": {"type": "errored", "error": {
              "type": "error", "error": payload.get("error", payload)}}})
    return "".join(json.dumps(line) + "\n" for line in lines).encode()
