"""Record codecs for Kafka values: JSON, Avro binary, Confluent wire-format Avro.

A codec turns a message value into a dict that conforms to a reader schema
(an Avro record schema from ``tierflow.schemas``), or raises ``DecodeError``
with a machine-readable ``error_type`` and a human-readable reason. It also
encodes, so the loaders and tests produce exactly what the source consumes.

Decoded rows are plain Python: ``timestamp-millis`` fields are ``int`` epoch
milliseconds whatever the wire format, optional fields absent from the input
take their schema default, and fields the schema does not name are ignored.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import urllib.error
import urllib.request
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

import fastavro
import fastavro.validation

from tierflow import schemas

__all__ = [
    "DecodeError",
    "Codec",
    "JsonCodec",
    "AvroCodec",
    "ConfluentAvroCodec",
    "SchemaRegistryClient",
    "make_codec",
    "FORMATS",
]

FORMATS = ("json", "avro", "confluent-avro")
_CONFLUENT_MAGIC = 0
_CONFLUENT_HEADER = struct.Struct(">bI")


class DecodeError(ValueError):
  """A record that cannot be decoded or does not conform to its schema."""

  def __init__(self, error_type: str, reason: str):
    super().__init__(f"{error_type}: {reason}")
    self.error_type = error_type
    self.reason = reason


def _millis_fields(schema: Mapping[str, Any]) -> set[str]:
  out = set()
  for field in schema["fields"]:
    types = field["type"] if isinstance(field["type"], list) else [field["type"]]
    for t in types:
      if isinstance(t, dict) and t.get("logicalType") == "timestamp-millis":
        out.add(field["name"])
  return out


def _to_millis(value: Any, field: str) -> Any:
  if value is None or isinstance(value, bool):
    return value
  if isinstance(value, int):
    return value
  if isinstance(value, datetime):
    if value.tzinfo is None:
      value = value.replace(tzinfo=timezone.utc)
    return int(value.timestamp() * 1000)
  if isinstance(value, str):
    try:
      parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as e:
      raise DecodeError("schema_violation",
                        f"field {field!r}: {value!r} is not epoch millis or ISO-8601") from e
    return _to_millis(parsed, field)
  if isinstance(value, float) and value.is_integer():
    return int(value)
  raise DecodeError("schema_violation",
                    f"field {field!r}: {value!r} is not a timestamp")


class Codec:
  """Decodes and encodes message values against a reader schema."""

  name = ""

  def __init__(self, schema: Mapping[str, Any]):
    self.schema = dict(schema)
    self._parsed = schemas.parse(schema)
    self._millis = _millis_fields(schema)
    self._fields = schema["fields"]

  def decode(self, value: bytes | None) -> dict:
    raise NotImplementedError

  def encode(self, record: Mapping[str, Any]) -> bytes:
    raise NotImplementedError

  def _conform(self, record: Any) -> dict:
    """Applies defaults, normalises timestamps and validates against the schema."""
    if not isinstance(record, dict):
      raise DecodeError("schema_violation",
                        f"expected a JSON object, got {type(record).__name__}")
    row = {}
    missing = []
    for field in self._fields:
      name = field["name"]
      if name in record:
        value = record[name]
      elif "default" in field:
        value = field["default"]
      else:
        missing.append(name)
        continue
      row[name] = _to_millis(value, name) if name in self._millis else value
    if missing:
      raise DecodeError("missing_field", f"required field(s) missing: {', '.join(missing)}")
    try:
      fastavro.validation.validate(row, self._parsed, raise_errors=True)
    except fastavro.validation.ValidationError as e:
      raise DecodeError("schema_violation", "; ".join(str(x) for x in e.errors) or str(e)) from e
    return row


class JsonCodec(Codec):
  """UTF-8 JSON objects. Timestamps may be epoch millis or ISO-8601 strings."""

  name = "json"

  def decode(self, value: bytes | None) -> dict:
    if value is None:
      raise DecodeError("empty_value", "message has no value (tombstone)")
    try:
      text = value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DecodeError("invalid_utf8", f"value is not valid UTF-8: {e}") from e
    try:
      record = json.loads(text)
    except json.JSONDecodeError as e:
      raise DecodeError("invalid_json", f"value is not JSON: {e}") from e
    return self._conform(record)

  def encode(self, record: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(record), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _avro_read(value: bytes, writer: dict, reader: dict) -> Any:
  buf = io.BytesIO(value)
  try:
    record = fastavro.schemaless_reader(buf, writer, reader)
  except UnicodeDecodeError as e:
    raise DecodeError("invalid_utf8", f"Avro string is not valid UTF-8: {e}") from e
  except Exception as e:  # noqa: BLE001 - fastavro raises many types on garbage
    raise DecodeError("invalid_avro", f"value is not Avro for the schema: {type(e).__name__}: {e}") from e
  if buf.tell() != len(value):
    raise DecodeError(
        "invalid_avro",
        f"{len(value) - buf.tell()} trailing bytes after the Avro record (wrong schema?)")
  return record


class AvroCodec(Codec):
  """Schemaless Avro binary written with the reader schema itself."""

  name = "avro"

  def decode(self, value: bytes | None) -> dict:
    if not value:
      raise DecodeError("empty_value", "message has no value")
    return self._conform(_avro_read(value, self._parsed, self._parsed))

  def encode(self, record: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, self._parsed, dict(record))
    return buf.getvalue()


class SchemaRegistryClient:
  """Looks up writer schemas by id in a Confluent-compatible schema registry.

  Only ``GET /schemas/ids/{id}`` is used. Lookups are cached per process; a
  404 is a per-record error (``unknown_schema_id``), anything else (registry
  down) raises so the runner retries the bundle instead of dead-lettering.
  """

  def __init__(self, url: str, timeout: float = 10.0,
               opener: Callable[..., Any] = urllib.request.urlopen):
    self.url = url.rstrip("/")
    self.timeout = timeout
    self._opener = opener
    self._cache: dict[int, dict] = {}
    self._missing: set[int] = set()
    self._lock = threading.Lock()

  def __getstate__(self):
    return {"url": self.url, "timeout": self.timeout, "_opener": self._opener}

  def __setstate__(self, state):
    self.__init__(state["url"], state["timeout"], state["_opener"])

  def get(self, schema_id: int) -> dict | None:
    with self._lock:
      if schema_id in self._cache:
        return self._cache[schema_id]
      if schema_id in self._missing:
        return None
    try:
      with self._opener(f"{self.url}/schemas/ids/{schema_id}", timeout=self.timeout) as resp:
        body = json.load(resp)
    except urllib.error.HTTPError as e:
      if e.code == 404:
        with self._lock:
          self._missing.add(schema_id)
        return None
      raise
    schema = schemas.parse(json.loads(body["schema"]))
    with self._lock:
      self._cache[schema_id] = schema
    return schema

  def register(self, subject: str, schema: Mapping[str, Any]) -> int:
    """Registers a schema under a subject and returns its id."""
    data = json.dumps({"schema": json.dumps(schema)}).encode()
    req = urllib.request.Request(
        f"{self.url}/subjects/{subject}/versions", data=data, method="POST",
        headers={"Content-Type": "application/vnd.schemaregistry.v1+json"})
    with self._opener(req, timeout=self.timeout) as resp:
      return int(json.load(resp)["id"])


class ConfluentAvroCodec(Codec):
  """Confluent wire format: magic byte 0, 4-byte big-endian schema id, Avro body.

  With a schema registry the writer schema is looked up by id and resolved
  against the reader schema (Avro schema evolution). Without one, only
  ``schema_id`` is accepted and the bundled reader schema is the writer schema.
  """

  name = "confluent-avro"

  def __init__(self, schema: Mapping[str, Any], *, schema_id: int = 1,
               registry: SchemaRegistryClient | None = None):
    super().__init__(schema)
    self.schema_id = schema_id
    self.registry = registry

  def decode(self, value: bytes | None) -> dict:
    if not value or len(value) < _CONFLUENT_HEADER.size:
      raise DecodeError("invalid_wire_format",
                        f"{len(value or b'')} bytes is too short for the Confluent header")
    magic, schema_id = _CONFLUENT_HEADER.unpack_from(value)
    if magic != _CONFLUENT_MAGIC:
      raise DecodeError("invalid_wire_format", f"magic byte is {magic}, expected 0")
    if self.registry is not None:
      writer = self.registry.get(schema_id)
      if writer is None:
        raise DecodeError("unknown_schema_id",
                          f"schema id {schema_id} is not in the registry at {self.registry.url}")
    elif schema_id != self.schema_id:
      raise DecodeError(
          "unknown_schema_id",
          f"schema id {schema_id} is not the bundled schema's id {self.schema_id} "
          "(pass a schema registry URL to resolve other ids)")
    else:
      writer = self._parsed
    return self._conform(_avro_read(value[_CONFLUENT_HEADER.size:], writer, self._parsed))

  def encode(self, record: Mapping[str, Any], schema_id: int | None = None) -> bytes:
    buf = io.BytesIO()
    buf.write(_CONFLUENT_HEADER.pack(_CONFLUENT_MAGIC,
                                     self.schema_id if schema_id is None else schema_id))
    fastavro.schemaless_writer(buf, self._parsed, dict(record))
    return buf.getvalue()


def make_codec(fmt: str, schema: Mapping[str, Any], *, schema_registry_url: str | None = None,
               schema_id: int = 1) -> Codec:
  """The codec for a ``--format`` value."""
  if fmt == "json":
    return JsonCodec(schema)
  if fmt == "avro":
    return AvroCodec(schema)
  if fmt == "confluent-avro":
    registry = SchemaRegistryClient(schema_registry_url) if schema_registry_url else None
    return ConfluentAvroCodec(schema, schema_id=schema_id, registry=registry)
  raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
