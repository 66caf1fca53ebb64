"""A tiny Confluent-Schema-Registry-compatible server, in memory, for local runs and tests.

It speaks the part of the registry REST API that producers and consumers of the
Confluent wire format use::

    POST /subjects/{subject}/versions        {"schema": "<json>"} -> {"id": N}
    GET  /schemas/ids/{id}                   -> {"schema": "<json>"}
    GET  /subjects                           -> ["subject", ...]
    GET  /subjects/{subject}/versions        -> [1, 2, ...]
    GET  /subjects/{subject}/versions/latest -> {"subject", "version", "id", "schema"}
    GET  /subjects/{subject}/versions/{n}    -> {"subject", "version", "id", "schema"}

Ids are global: the same schema (equal as JSON) registered under any subject
gets the same id, and registering it again under a subject returns its id
without adding a version. No compatibility checks, no auth, no persistence.

    with LocalSchemaRegistry() as registry:
      SchemaRegistryClient(registry.url).register("tickets-value", schema)
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import fastavro

__all__ = ["LocalSchemaRegistry", "CONTENT_TYPE"]

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"

_SCHEMA_BY_ID = re.compile(r"/schemas/ids/(\d+)")
_VERSIONS = re.compile(r"/subjects/([^/]+)/versions")
_VERSION = re.compile(r"/subjects/([^/]+)/versions/(latest|-1|\d+)")


class _Store:
  """Schemas by id and subjects' version lists; thread-safe."""

  def __init__(self):
    self._lock = threading.Lock()
    self._ids: dict[str, int] = {}  # canonical JSON -> id
    self._schemas: dict[int, str] = {}  # id -> schema text as first registered
    self._subjects: dict[str, list[int]] = {}  # subject -> ids, version i+1 at [i]

  def register(self, subject: str, text: str) -> int:
    canonical = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    with self._lock:
      schema_id = self._ids.get(canonical)
      if schema_id is None:
        schema_id = len(self._schemas) + 1
        self._ids[canonical] = schema_id
        self._schemas[schema_id] = text
      versions = self._subjects.setdefault(subject, [])
      if schema_id not in versions:
        versions.append(schema_id)
      return schema_id

  def schema(self, schema_id: int) -> str | None:
    with self._lock:
      return self._schemas.get(schema_id)

  def subjects(self) -> list[str]:
    with self._lock:
      return sorted(self._subjects)

  def versions(self, subject: str) -> list[int] | None:
    with self._lock:
      ids = self._subjects.get(subject)
      return None if ids is None else list(ids)


class _Handler(BaseHTTPRequestHandler):
  server_version = "tierflow-schema-registry/0.1"
  store: _Store  # set on the per-server subclass

  def log_message(self, fmt, *args):  # quiet: tests and demos need no access log
    pass

  def _send(self, status: int, body) -> None:
    data = json.dumps(body).encode("utf-8")
    self.send_response(status)
    self.send_header("Content-Type", CONTENT_TYPE)
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def _error(self, status: int, code: int, message: str) -> None:
    self._send(status, {"error_code": code, "message": message})

  def _path(self) -> str:
    return self.path.split("?", 1)[0].rstrip("/") or "/"

  def do_GET(self):  # noqa: N802 - http.server naming
    path = self._path()
    if path == "/subjects":
      return self._send(200, self.store.subjects())
    if path in ("/", "/config"):
      return self._send(200, {"compatibilityLevel": "NONE"})
    m = _SCHEMA_BY_ID.fullmatch(path)
    if m:
      text = self.store.schema(int(m.group(1)))
      if text is None:
        return self._error(404, 40403, "Schema not found")
      return self._send(200, {"schema": text})
    m = _VERSIONS.fullmatch(path)
    if m:
      versions = self.store.versions(unquote(m.group(1)))
      if versions is None:
        return self._error(404, 40401, "Subject not found")
      return self._send(200, list(range(1, len(versions) + 1)))
    m = _VERSION.fullmatch(path)
    if m:
      subject = unquote(m.group(1))
      versions = self.store.versions(subject)
      if versions is None:
        return self._error(404, 40401, "Subject not found")
      wanted = m.group(2)
      version = len(versions) if wanted in ("latest", "-1") else int(wanted)
      if not 1 <= version <= len(versions):
        return self._error(404, 40402, "Version not found")
      schema_id = versions[version - 1]
      return self._send(200, {"subject": subject, "version": version, "id": schema_id,
                              "schema": self.store.schema(schema_id)})
    return self._error(404, 404, f"no route for GET {path}")

  def do_POST(self):  # noqa: N802
    path = self._path()
    m = _VERSIONS.fullmatch(path)
    if not m:
      return self._error(404, 404, f"no route for POST {path}")
    length = int(self.headers.get("Content-Length") or 0)
    try:
      body = json.loads(self.rfile.read(length) or b"{}")
      text = body["schema"]
      if not isinstance(text, str):
        raise TypeError("schema must be a JSON string")
      if body.get("schemaType", "AVRO") != "AVRO":
        raise ValueError("only AVRO schemas are supported")
      fastavro.parse_schema(json.loads(text))
    except Exception as e:  # noqa: BLE001 - any bad body is the client's error
      return self._error(422, 42201, f"Invalid schema: {e}")
    return self._send(200, {"id": self.store.register(unquote(m.group(1)), text)})


class LocalSchemaRegistry:
  """The registry on 127.0.0.1 (port 0 picks a free port), in a background thread.

  Use as a context manager; ``url`` is its base URL.
  """

  def __init__(self, host: str = "127.0.0.1", port: int = 0):
    if not host.startswith("127.") and host != "localhost":
      raise ValueError("the local schema registry listens on loopback only")
    handler = type("_BoundHandler", (_Handler,), {"store": _Store()})
    self._server = ThreadingHTTPServer((host, port), handler)
    self._server.daemon_threads = True
    self._thread: threading.Thread | None = None

  @property
  def url(self) -> str:
    host, port = self._server.server_address[:2]
    return f"http://{host}:{port}"

  def start(self) -> "LocalSchemaRegistry":
    if self._thread is None:
      self._thread = threading.Thread(target=self._server.serve_forever,
                                      name="schema-registry", daemon=True)
      self._thread.start()
    return self

  def stop(self) -> None:
    if self._thread is not None:
      self._server.shutdown()
      self._thread.join()
      self._thread = None
    self._server.server_close()

  def __enter__(self) -> "LocalSchemaRegistry":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()
