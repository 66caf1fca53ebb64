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
from datetime import datetime, timezone
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import fastavro
import fastavro.validation
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from tierflow import schemas

__all__ = [
    "DecodeError",
    "DecodedValues",
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
# Timestamps tierflow accepts: years 1 to 9999 (what every reader of the
# Parquet, and Python's datetime, can represent), as epoch milliseconds.
MIN_MILLIS = -62_135_596_800_000  # 0001-01-01T00:00:00Z
MAX_MILLIS = 253_402_300_800_000  # 10000-01-01T00:00:00Z (exclusive)
# Values that fail a columnar decode are retried in groups of this many, then alone.
_RETRY_GROUP = 512


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


def check_millis(value: int, field: str) -> int:
  if not MIN_MILLIS <= value < MAX_MILLIS:
    raise DecodeError("invalid_timestamp",
                      f"field {field!r}: {value} ms is outside years 1-9999")
  return value


def _to_millis(value: Any, field: str) -> Any:
  if value is None or isinstance(value, bool):
    return value
  if isinstance(value, int):
    return check_millis(value, field)
  if isinstance(value, datetime):
    if value.tzinfo is None:
      value = value.replace(tzinfo=timezone.utc)
    return check_millis(int(value.timestamp() * 1000), field)
  if isinstance(value, str):
    try:
      parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as e:
      raise DecodeError("schema_violation",
                        f"field {field!r}: {value!r} is not epoch millis or ISO-8601") from e
    return _to_millis(parsed, field)
  if isinstance(value, float) and value.is_integer():
    return check_millis(int(value), field)
  raise DecodeError("schema_violation",
                    f"field {field!r}: {value!r} is not a timestamp")


class DecodedValues(NamedTuple):
  """What a codec made of a batch of message values.

  Attributes:
    table: the decoded records, one row per value in ``ok``, with the Arrow
      schema of the reader schema (``schemas.to_arrow``).
    ok: indexes (into the values) of the rows of ``table``, ascending.
    failed: ``(index, error_type, reason)`` for every other value.
  """
  table: pa.Table
  ok: list
  failed: list


def _strip_timestamp_types(schema: Any) -> Any:
  """A copy of an Avro schema with timestamp logical types removed, so fastavro reads
  them as plain longs (epoch units) instead of building datetimes."""
  if isinstance(schema, list):
    return [_strip_timestamp_types(s) for s in schema]
  if not isinstance(schema, dict):
    return schema
  if schema.get("logicalType") in ("timestamp-millis", "timestamp-micros"):
    return schema["type"]
  out = {}
  for k, v in schema.items():
    if k == "fields":
      out[k] = [{**f, "type": _strip_timestamp_types(f["type"])} for f in v]
    elif k in ("type", "items", "values"):
      out[k] = _strip_timestamp_types(v)
    else:
      out[k] = v
  return out


def _field_nullable(field: Mapping[str, Any]) -> bool:
  t = field["type"]
  return t == "null" or (isinstance(t, list) and "null" in t)


class Codec:
  """Decodes and encodes message values against a reader schema.

  ``decode`` handles one value; ``decode_batch`` a batch (the pipelines' path):
  a codec may decode a batch column-wise and falls back to ``decode`` for the
  values a column-wise decode rejects, so each bad value still gets its own
  reason. Neither ever raises for bad data in a batch.

  Null and absent fields: an absent field takes its schema default (an error
  if it has none); a null in a field that is not nullable but has a default
  also takes the default ("null means absent"); otherwise a null there is an
  error.
  """

  name = ""

  def __init__(self, schema: Mapping[str, Any]):
    self.schema = dict(schema)
    self._parsed = schemas.parse(schema)
    self._millis = _millis_fields(schema)
    self._fields = schema["fields"]
    self.arrow_schema = schemas.to_arrow(schema)

  def decode(self, value: bytes | None) -> dict:
    raise NotImplementedError

  def encode(self, record: Mapping[str, Any]) -> bytes:
    raise NotImplementedError

  def decode_batch(self, values: Sequence[Optional[bytes]]) -> DecodedValues:
    """Decodes a batch of values (the default: one by one)."""
    return self._decode_each(range(len(values)), values)

  def _decode_each(self, indices, values, decode=None) -> DecodedValues:
    """Decodes the values at ``indices`` one by one (with ``decode``, default ``self.decode``);
    every failure, whatever it raises, is that value's own."""
    decode = decode or self.decode
    rows, ok, failed = [], [], []
    for i in indices:
      try:
        rows.append(decode(values[i]))
        ok.append(i)
      except DecodeError as e:
        failed.append((i, e.error_type, e.reason))
      except Exception as e:  # noqa: BLE001 - hostile input must not crash a run
        failed.append((i, "undecodable", f"{type(e).__name__}: {e}"[:1000]))
    table, kept, refused = self._to_table(rows, ok)
    return DecodedValues(table, kept, failed + refused)

  def _to_table(self, rows: list, ok: list) -> tuple[pa.Table, list, list]:
    """(rows as Arrow, their indexes, failures); a row Arrow refuses fails alone."""
    try:
      return pa.Table.from_pylist(rows, schema=self.arrow_schema), ok, []
    except Exception:  # noqa: BLE001 - find the culprits one by one
      pass
    tables, kept, failed = [], [], []
    for row, i in zip(rows, ok):
      try:
        tables.append(pa.Table.from_pylist([row], schema=self.arrow_schema))
        kept.append(i)
      except Exception as e:  # noqa: BLE001
        failed.append((i, "schema_violation", f"{type(e).__name__}: {e}"[:1000]))
    table = pa.concat_tables(tables) if tables else self.arrow_schema.empty_table()
    return table, kept, failed

  def _conform(self, record: Any) -> dict:
    """Applies defaults, normalises timestamps and validates against the schema."""
    if not isinstance(record, dict):
      raise DecodeError("schema_violation",
                        f"expected a JSON object, got {type(record).__name__}")
    row = {}
    missing = []
    for field in self._fields:
      name = field["name"]
      value = record.get(name)
      if value is None and (name not in record or not _field_nullable(field)):
        if "default" in field:
          value = field["default"]
        elif name not in record:
          missing.append(name)
          continue
      row[name] = _to_millis(value, name) if name in self._millis else value
    if missing:
      raise DecodeError("missing_field", f"required field(s) missing: {', '.join(missing)}")
    for name, value in row.items():
      _check_text(value, name)
    try:
      fastavro.validation.validate(row, self._parsed, raise_errors=True)
    except fastavro.validation.ValidationError as e:
      raise DecodeError("schema_violation", "; ".join(str(x) for x in e.errors) or str(e)) from e
    return row

  def _check_millis(self, row: dict) -> dict:
    for name in self._millis:
      value = row.get(name)
      if isinstance(value, int):
        check_millis(value, name)
    return row


_FAST_JSON_TYPES = (pa.types.is_string, pa.types.is_boolean, pa.types.is_integer,
                    pa.types.is_floating, pa.types.is_timestamp)


def _json_parse_schema(arrow_schema: pa.Schema) -> Optional[pa.Schema]:
  """The schema pyarrow's JSON reader parses with (timestamps as epoch-unit longs), or
  None when the schema has a type the column-wise path does not check exactly."""
  fields = []
  for f in arrow_schema:
    if not any(check(f.type) for check in _FAST_JSON_TYPES):
      return None
    fields.append(pa.field(f.name, pa.int64() if pa.types.is_timestamp(f.type) else f.type))
  return pa.schema(fields)


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

  def __init__(self, schema: Mapping[str, Any]):
    super().__init__(schema)
    self._parse_schema = _json_parse_schema(self.arrow_schema)
    self._defaults = {
        f["name"]: f["default"] for f in self._fields
        if "default" in f and f["default"] is not None and not _field_nullable(f)}

  def decode_batch(self, values: Sequence[Optional[bytes]]) -> DecodedValues:
    """Column-wise with pyarrow's JSON reader; values it cannot take, one by one.

    Only values that are one line starting with ``{`` go column-wise, so the
    reader's row count equals the value count exactly when every value holds one
    object; any parse error, count mismatch or row that fails the checks sends
    those values to ``decode`` for a reason of their own.
    """
    if self._parse_schema is None:
      return super().decode_batch(values)
    columnar, single = [], []
    joined = _joined_if_each_one_object_line(values)
    if joined is not None:  # the usual case, checked over the joined bytes
      columnar = list(range(len(values)))
    else:
      for i, v in enumerate(values):
        if v and v.lstrip()[:1] == b"{" and b"\n" not in v and b"\r" not in v:
          columnar.append(i)
        else:
          single.append(i)
    tables, ok = [], []
    self._columnar(columnar, values, tables, ok, single, retry=True, joined=joined)
    slow = self._decode_each(sorted(single), values)
    if slow.ok:
      tables.append(slow.table)
      ok.extend(slow.ok)
    if not tables:
      return DecodedValues(self.arrow_schema.empty_table(), [], slow.failed)
    table = pa.concat_tables(tables)
    if slow.ok and len(tables) > 1:
      order = sorted(range(len(ok)), key=ok.__getitem__)
      table, ok = table.take(order), [ok[i] for i in order]
    return DecodedValues(table, ok, slow.failed)

  def _columnar(self, indices: list, values, tables: list, ok: list, single: list,
                retry: bool, joined: Optional[bytes] = None) -> None:
    """Reads ``values[indices]`` with pyarrow's JSON reader (``joined``: those values
    already joined by newlines); what fails goes to ``single``."""
    if not indices:
      return
    try:
      parsed = pa_json.read_json(
          io.BytesIO(joined if joined is not None else b"\n".join(values[i] for i in indices)),
          parse_options=pa_json.ParseOptions(explicit_schema=self._parse_schema,
                                             unexpected_field_behavior="ignore"))
      if parsed.num_rows != len(indices):
        raise ValueError("row count differs from value count")
      _check_utf8(parsed)  # pyarrow's reader copies string bytes unchecked
    except Exception:  # noqa: BLE001 - a bad value somewhere: narrow it down
      if retry and len(indices) > _RETRY_GROUP:
        for k in range(0, len(indices), _RETRY_GROUP):
          self._columnar(indices[k:k + _RETRY_GROUP], values, tables, ok, single, retry=False)
      else:
        single.extend(indices)
      return
    table, bad = self._checked(parsed)
    if bad is not None:
      single.extend(i for i, b in zip(indices, bad) if b)
      indices = [i for i, b in zip(indices, bad) if not b]
    if indices:
      tables.append(table)
      ok.extend(indices)

  def _checked(self, parsed: pa.Table) -> tuple[pa.Table, Optional[list]]:
    """(the rows that pass, cast to the output schema; a per-row 'fails' list or None)."""
    columns, bad = [], None
    for field, column in zip(self.arrow_schema, parsed.columns):
      if field.name in self._defaults:
        column = pc.fill_null(column, pa.scalar(self._defaults[field.name], column.type))
      check = None
      if not field.nullable and column.null_count:
        check = pc.is_null(column)
      if pa.types.is_timestamp(field.type):
        out_of_range = pc.or_(pc.less(column, MIN_MILLIS), pc.greater_equal(column, MAX_MILLIS))
        if pc.any(out_of_range).as_py():
          check = out_of_range if check is None else pc.or_(check, out_of_range)
      if check is not None:
        check = pc.fill_null(check, False)
        bad = check if bad is None else pc.or_(bad, check)
      columns.append(column)
    table = pa.Table.from_arrays(columns, schema=self._parse_schema)
    if bad is not None:
      table = table.filter(pc.invert(bad))
      bad = bad.to_pylist()
    return (pa.Table.from_arrays([c.cast(f.type) for c, f in zip(table.columns, self.arrow_schema)],
                                 schema=self.arrow_schema), bad)


def _joined_if_each_one_object_line(values: Sequence[Optional[bytes]]) -> Optional[bytes]:
  """The values joined by newlines if each is one line that starts with ``{`` (what the
  value-by-value test in ``JsonCodec.decode_batch`` lets through), checked with numpy over
  the joined bytes instead of value by value; else None."""
  if not values or not all(values):
    return None
  joined = b"\n".join(values)
  if b"\r" in joined:
    return None
  buf = np.frombuffer(joined, np.uint8)
  newlines = np.flatnonzero(buf == 0x0A)
  if len(newlines) != len(values) - 1:  # a newline inside a value
    return None  # else the joining newlines are all there are: each follows a value
  return joined if buf[0] == 0x7B and bool((buf[newlines + 1] == 0x7B).all()) else None


def _check_utf8(table: pa.Table) -> None:
  """Raises ValueError if a string column holds bytes that are not UTF-8 (Parquet
  readers such as DuckDB then refuse the whole file)."""
  for column in table.columns:
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
      for chunk in column.chunks:
        chunk.validate(full=True)


def _check_text(value: Any, field: str) -> None:
  """Raises DecodeError for a string no UTF-8 file can hold: a lone surrogate (JSON's
  ``\\ud800`` escapes decode to one), at any depth of the value."""
  if isinstance(value, str):
    try:
      value.encode("utf-8")
    except UnicodeEncodeError as e:
      raise DecodeError("invalid_unicode", f"field {field!r} holds a lone surrogate "
                        f"(U+{ord(value[e.start]):04X}), which UTF-8 cannot encode") from None
  elif isinstance(value, dict):
    for k, v in value.items():
      _check_text(k, field)
      _check_text(v, field)
  elif isinstance(value, (list, tuple)):
    for v in value:
      _check_text(v, field)


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

  def __init__(self, schema: Mapping[str, Any]):
    super().__init__(schema)
    self._fast = schemas.parse(_strip_timestamp_types(self.schema))

  def _writer_for(self, value: bytes) -> tuple[Any, bytes]:
    """(fast writer schema, Avro body) of a value; raises DecodeError."""
    if not value:
      raise DecodeError("empty_value", "message has no value")
    return self._fast, value

  def decode_batch(self, values: Sequence[Optional[bytes]]) -> DecodedValues:
    """Decodes each value with fastavro, reading timestamps as plain longs (decoding
    with the schema is the validation), then builds the Arrow table at once."""
    return self._decode_each(range(len(values)), values, self._decode_fast)

  def _decode_fast(self, value: Optional[bytes]) -> dict:
    writer, body = self._writer_for(value)
    return self._check_millis(_avro_read(body, writer, self._fast))


class SchemaRegistryClient:
  """Writer schemas by id from a Confluent-compatible schema registry, through
  confluent-kafka's ``SchemaRegistryClient`` (Confluent's, Apicurio's ccompat API, ...).

  Lookups are cached per process. A schema id the registry does not know (404) is a
  per-record error (``unknown_schema_id``); anything else (registry down, 401) raises, so
  the runner retries the bundle instead of dead-lettering good records. ``auth`` is
  HTTP basic auth ``user:password`` given only by reference, ``env:VAR`` or
  ``file:PATH``, read where the client is used (the worker), never in clear.
  """

  def __init__(self, url: str, timeout: float = 10.0, auth: Optional[str] = None):
    if auth is not None and not (isinstance(auth, str) and auth.startswith(("env:", "file:"))):
      raise ValueError("the schema registry's credentials go by reference: env:VAR or "
                       "file:PATH (holding user:password), never in clear")
    self.url = url.rstrip("/")
    self.timeout = timeout
    self.auth = auth
    self._client = None
    self._cache: dict[int, dict] = {}
    self._raw: dict[int, dict] = {}
    self._missing: set[int] = set()
    self._lock = threading.Lock()

  def __getstate__(self):
    return {"url": self.url, "timeout": self.timeout, "auth": self.auth}

  def __setstate__(self, state):
    self.__init__(state["url"], state["timeout"], state["auth"])

  def _registry(self):
    if self._client is None:
      from confluent_kafka.schema_registry import SchemaRegistryClient as Client
      conf = {"url": self.url, "timeout": self.timeout}
      if self.auth:
        from tierflow.connectors.kafka_client import resolve_secret_settings
        conf["basic.auth.user.info"] = resolve_secret_settings(
            {"sasl.password": self.auth})["sasl.password"]
      self._client = Client(conf)
    return self._client

  def get_raw(self, schema_id: int) -> dict | None:
    """The schema with the id as registered (JSON), or None if the registry has none."""
    from confluent_kafka.schema_registry.error import SchemaRegistryError
    with self._lock:
      if schema_id in self._raw:
        return self._raw[schema_id]
      if schema_id in self._missing:
        return None
    try:
      found = self._registry().get_schema(schema_id)
    except SchemaRegistryError as e:
      if e.http_status_code == 404:
        with self._lock:
          self._missing.add(schema_id)
        return None
      raise
    raw = json.loads(found.schema_str)
    with self._lock:
      self._raw[schema_id] = raw
    return raw

  def get(self, schema_id: int) -> dict | None:
    """The parsed writer schema with the id, or None if the registry has none."""
    with self._lock:
      if schema_id in self._cache:
        return self._cache[schema_id]
    raw = self.get_raw(schema_id)
    if raw is None:
      return None
    parsed = schemas.parse(raw)
    with self._lock:
      self._cache[schema_id] = parsed
    return parsed

  def register(self, subject: str, schema: Mapping[str, Any]) -> int:
    """Registers an Avro schema under a subject and returns its id."""
    from confluent_kafka.schema_registry import Schema
    return self._registry().register_schema(subject, Schema(json.dumps(dict(schema)), "AVRO"))


class ConfluentAvroCodec(AvroCodec):
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
    self._fast_writers: dict[int, Any] = {}

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_fast_writers"] = {}
    return state

  def _schema_id(self, value: bytes | None) -> int:
    if not value or len(value) < _CONFLUENT_HEADER.size:
      raise DecodeError("invalid_wire_format",
                        f"{len(value or b'')} bytes is too short for the Confluent header")
    magic, schema_id = _CONFLUENT_HEADER.unpack_from(value)
    if magic != _CONFLUENT_MAGIC:
      raise DecodeError("invalid_wire_format", f"magic byte is {magic}, expected 0")
    if self.registry is None and schema_id != self.schema_id:
      raise DecodeError(
          "unknown_schema_id",
          f"schema id {schema_id} is not the bundled schema's id {self.schema_id} "
          "(pass a schema registry URL to resolve other ids)")
    return schema_id

  def _unknown(self, schema_id: int) -> DecodeError:
    return DecodeError("unknown_schema_id",
                       f"schema id {schema_id} is not in the registry at {self.registry.url}")

  def decode(self, value: bytes | None) -> dict:
    schema_id = self._schema_id(value)
    if self.registry is not None:
      writer = self.registry.get(schema_id)
      if writer is None:
        raise self._unknown(schema_id)
    else:
      writer = self._parsed
    return self._conform(_avro_read(value[_CONFLUENT_HEADER.size:], writer, self._parsed))

  def _writer_for(self, value: bytes) -> tuple[Any, bytes]:
    schema_id = self._schema_id(value)
    body = value[_CONFLUENT_HEADER.size:]
    if self.registry is None:
      return self._fast, body
    writer = self._fast_writers.get(schema_id)
    if writer is None:
      raw = self.registry.get_raw(schema_id)
      if raw is None:
        raise self._unknown(schema_id)
      writer = self._fast_writers[schema_id] = schemas.parse(_strip_timestamp_types(raw))
    return writer, body

  def encode(self, record: Mapping[str, Any], schema_id: int | None = None) -> bytes:
    buf = io.BytesIO()
    buf.write(_CONFLUENT_HEADER.pack(_CONFLUENT_MAGIC,
                                     self.schema_id if schema_id is None else schema_id))
    fastavro.schemaless_writer(buf, self._parsed, dict(record))
    return buf.getvalue()


def make_codec(fmt: str, schema: Mapping[str, Any], *, schema_registry_url: str | None = None,
               schema_id: int = 1, schema_registry_auth: str | None = None) -> Codec:
  """The codec for a ``--format`` value."""
  if fmt == "json":
    return JsonCodec(schema)
  if fmt == "avro":
    return AvroCodec(schema)
  if fmt == "confluent-avro":
    registry = (SchemaRegistryClient(schema_registry_url, auth=schema_registry_auth)
                if schema_registry_url else None)
    return ConfluentAvroCodec(schema, schema_id=schema_id, registry=registry)
  raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
