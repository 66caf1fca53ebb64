"""Tests for tierflow.connectors.codecs and the bundled schemas (no broker)."""

import io
import json
import pickle
import struct

import fastavro
import pyarrow as pa
import pytest

from tierflow import schemas
from tierflow.connectors import codecs
from tierflow.connectors.codecs import DecodeError

TICKET = schemas.load("ticket")
FULL = {
    "ticket_id": "T-1",
    "created_at": 1_700_000_000_123,
    "subject": "Refund",
    "body": "Ünïcode body ✓",
    "channel": "chat",
    "customer_id": "C-9",
}
MINIMAL = {"ticket_id": "T-2", "created_at": 1_700_000_000_000, "subject": "s", "body": "b"}


def confluent(schema_id: int, avro_body: bytes, magic: int = 0) -> bytes:
  return struct.pack(">bI", magic, schema_id) + avro_body


def avro_bytes(schema: dict, record: dict) -> bytes:
  buf = io.BytesIO()
  fastavro.schemaless_writer(buf, schemas.parse(schema), record)
  return buf.getvalue()


def evolved(extra_fields=(), drop=()):
  """The Ticket schema with fields added or removed (a different writer schema)."""
  out = json.loads(json.dumps(TICKET))
  out["fields"] = [f for f in out["fields"] if f["name"] not in drop] + list(extra_fields)
  return out


def error_of(codec, value) -> DecodeError:
  with pytest.raises(DecodeError) as info:
    codec.decode(value)
  assert info.value.reason
  return info.value


@pytest.fixture
def registry(schema_registry):
  """Apicurio Registry's Confluent-compatible API (session-wide)."""
  return schema_registry


def subject(name):
  """A subject no other test uses (the registry lives for the whole session)."""
  return f"{name}-{next(_SUBJECTS)}-value"


_SUBJECTS = __import__("itertools").count()


# --- the bundled schemas -------------------------------------------------------


def test_ticket_schema_is_as_specified():
  assert TICKET["type"] == "record"
  assert TICKET["name"] == "Ticket"
  assert TICKET["namespace"] == "tierflow"
  fields = {f["name"]: f for f in TICKET["fields"]}
  assert list(fields) == ["ticket_id", "created_at", "subject", "body", "channel", "customer_id"]
  assert fields["ticket_id"]["type"] == "string"
  assert fields["created_at"]["type"] == {"type": "long", "logicalType": "timestamp-millis"}
  assert fields["subject"]["type"] == "string"
  assert fields["body"]["type"] == "string"
  assert fields["channel"]["type"] == "string"
  assert fields["channel"]["default"] == "email"
  assert fields["customer_id"]["type"] == ["null", "string"]
  assert fields["customer_id"]["default"] is None
  for name in ("ticket_id", "created_at", "subject", "body"):
    assert "default" not in fields[name]
  schemas.parse(TICKET)  # a valid Avro schema


def test_ticket_arrow_schema():
  arrow = schemas.to_arrow(TICKET)
  expected = [
      ("ticket_id", pa.string(), False),
      ("created_at", pa.timestamp("ms", tz="UTC"), False),
      ("subject", pa.string(), False),
      ("body", pa.string(), False),
      ("channel", pa.string(), False),
      ("customer_id", pa.string(), True),
  ]
  assert [(f.name, f.type, f.nullable) for f in arrow] == expected
  assert json.loads(arrow.metadata[b"avro.schema"]) == TICKET


def test_bundled_schemas_all_parse_and_convert():
  assert {"ticket", "document", "dead_letter", "source_metadata"} <= set(schemas.names())
  for name in schemas.names():
    schemas.to_arrow(schemas.load(name))


# --- round trips ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", codecs.FORMATS)
def test_round_trip(fmt):
  codec = codecs.make_codec(fmt, TICKET)
  assert codec.decode(codec.encode(FULL)) == FULL


@pytest.mark.parametrize("fmt", codecs.FORMATS)
def test_defaults_applied(fmt):
  codec = codecs.make_codec(fmt, TICKET)
  if fmt == "json":
    value = json.dumps(MINIMAL).encode()
  else:  # Avro writes every field; encoding fills the defaults in
    value = codec.encode({**MINIMAL, "channel": "email", "customer_id": None})
  assert codec.decode(value) == {**MINIMAL, "channel": "email", "customer_id": None}


def test_json_defaults_and_unknown_fields_ignored():
  row = codecs.JsonCodec(TICKET).decode(json.dumps({**MINIMAL, "priority": 3}).encode())
  assert row == {**MINIMAL, "channel": "email", "customer_id": None}


@pytest.mark.parametrize("text, millis", [
    ("2024-01-01T00:00:00Z", 1_704_067_200_000),
    ("2024-01-01T00:00:00.250+00:00", 1_704_067_200_250),
    ("2024-01-01T01:00:00+01:00", 1_704_067_200_000),
    ("2024-01-01T00:00:00", 1_704_067_200_000),  # naive means UTC
])
def test_json_iso8601_timestamps(text, millis):
  row = codecs.JsonCodec(TICKET).decode(json.dumps({**MINIMAL, "created_at": text}).encode())
  assert row["created_at"] == millis


def test_confluent_encode_writes_header():
  value = codecs.ConfluentAvroCodec(TICKET, schema_id=7).encode(FULL)
  assert value[:5] == b"\x00\x00\x00\x00\x07"
  assert value[5:] == codecs.AvroCodec(TICKET).encode(FULL)


def test_make_codec_rejects_unknown_format():
  with pytest.raises(ValueError, match="unknown format"):
    codecs.make_codec("protobuf", TICKET)


# --- failures ------------------------------------------------------------------


@pytest.mark.parametrize("fmt, value, error_type", [
    ("avro", b"\xff\xfe\x00garbage bytes", "invalid_avro"),
    ("avro", b"\x02", "invalid_avro"),  # truncated
    ("json", b"garbage{", "invalid_json"),
    ("json", b"", "invalid_json"),
    ("json", b"\xff\xfe{}", "invalid_utf8"),
    ("json", None, "empty_value"),
    ("avro", None, "empty_value"),
    ("confluent-avro", b"\x00\x00", "invalid_wire_format"),
    ("confluent-avro", b"\x00\x00\x00\x00\x01\xff\xfe garbage", "invalid_avro"),
])
def test_undecodable_values(fmt, value, error_type):
  assert error_of(codecs.make_codec(fmt, TICKET), value).error_type == error_type


def test_invalid_utf8_inside_avro_string():
  good = codecs.AvroCodec(TICKET).encode(FULL)
  bad = good.replace(b"Refund", b"Re\xff\xfend")
  assert len(bad) == len(good)
  assert error_of(codecs.AvroCodec(TICKET), bad).error_type == "invalid_utf8"
  confluent_bad = confluent(1, bad)
  assert error_of(codecs.ConfluentAvroCodec(TICKET), confluent_bad).error_type == "invalid_utf8"


def test_missing_required_field():
  value = json.dumps({k: v for k, v in MINIMAL.items() if k not in ("body", "subject")}).encode()
  err = error_of(codecs.JsonCodec(TICKET), value)
  assert err.error_type == "missing_field"
  assert "subject" in err.reason and "body" in err.reason


@pytest.mark.parametrize("record", [
    {**MINIMAL, "ticket_id": 17},
    {**MINIMAL, "body": None},
    {**MINIMAL, "customer_id": 5},
    {**MINIMAL, "created_at": 1.5},
    {**MINIMAL, "created_at": "yesterday"},
])
def test_wrong_type_is_schema_violation(record):
  err = error_of(codecs.JsonCodec(TICKET), json.dumps(record).encode())
  assert err.error_type == "schema_violation"


def test_non_object_json_is_schema_violation():
  assert error_of(codecs.JsonCodec(TICKET), b"[1, 2]").error_type == "schema_violation"


def test_wrong_confluent_magic_byte():
  body = codecs.AvroCodec(TICKET).encode(FULL)
  err = error_of(codecs.ConfluentAvroCodec(TICKET), confluent(1, body, magic=1))
  assert err.error_type == "invalid_wire_format"


def test_unknown_schema_id_without_registry():
  body = codecs.AvroCodec(TICKET).encode(FULL)
  err = error_of(codecs.ConfluentAvroCodec(TICKET, schema_id=1), confluent(2, body))
  assert err.error_type == "unknown_schema_id"
  assert codecs.ConfluentAvroCodec(TICKET, schema_id=2).decode(confluent(2, body)) == FULL


def test_trailing_bytes():
  body = codecs.AvroCodec(TICKET).encode(FULL) + b"\x00\x01"
  for codec, value in ((codecs.AvroCodec(TICKET), body),
                       (codecs.ConfluentAvroCodec(TICKET), confluent(1, body))):
    err = error_of(codec, value)
    assert err.error_type == "invalid_avro"
    assert "trailing" in err.reason


# --- the schema registry -------------------------------------------------------


def test_registry_register_and_get(registry):
  client = codecs.SchemaRegistryClient(registry.url)
  name = subject("tickets")
  first = client.register(name, TICKET)
  assert client.register(name, TICKET) == first  # same schema, same id
  assert client.register(subject("other"), TICKET) == first  # ids are global
  second = client.register(name, evolved(drop=("customer_id",)))
  assert second != first
  assert client.get(first) == schemas.parse(TICKET)
  assert client.get(987654) is None


def test_the_registry_refuses_an_incompatible_evolution(registry):
  """Confluent's default (BACKWARD): a new required field without a default is refused."""
  from confluent_kafka.schema_registry.error import SchemaRegistryError
  client = codecs.SchemaRegistryClient(registry.url)
  name = subject("strict")
  client.register(name, TICKET)
  with pytest.raises(SchemaRegistryError) as info:
    client.register(name, evolved(extra_fields=[{"name": "urgency", "type": "int"}]))
  assert info.value.http_status_code == 409


def test_unknown_schema_id_with_registry(registry):
  client = codecs.SchemaRegistryClient(registry.url)
  known = client.register(subject("t"), TICKET)
  codec = codecs.ConfluentAvroCodec(TICKET, registry=client)
  body = codecs.AvroCodec(TICKET).encode(FULL)
  assert codec.decode(confluent(known, body)) == FULL
  err = error_of(codec, confluent(known + 100000, body))
  assert err.error_type == "unknown_schema_id"
  assert registry.url in err.reason


def test_registry_down_raises_instead_of_dead_lettering():
  from confluent_kafka.schema_registry.error import SchemaRegistryError
  from tierflow_local.broker import free_port
  url = f"http://127.0.0.1:{free_port()}/apis/ccompat/v7"
  codec = codecs.ConfluentAvroCodec(TICKET, registry=codecs.SchemaRegistryClient(url, timeout=2))
  with pytest.raises((SchemaRegistryError, OSError, Exception)) as info:
    codec.decode(confluent(1, codecs.AvroCodec(TICKET).encode(FULL)))
  assert not isinstance(info.value, codecs.DecodeError)  # not a dead letter: a retry


def test_a_registry_behind_basic_auth(monkeypatch):
  """Credentials go by reference (env:/file:), never in clear; wrong ones fail, not dead-letter."""
  from tierflow_local.engines import ApicurioRegistry
  with pytest.raises(ValueError, match="by reference"):
    codecs.SchemaRegistryClient("http://x", auth="svc:hunter2")
  with ApicurioRegistry(basic_auth=("svc", "s3cret-pw")) as secured:
    monkeypatch.setenv("TF_REGISTRY_AUTH", "svc:s3cret-pw")
    client = codecs.SchemaRegistryClient(secured.url, auth="env:TF_REGISTRY_AUTH")
    writer_id = client.register("auth-value", TICKET)
    codec = pickle.loads(pickle.dumps(codecs.make_codec(
        "confluent-avro", TICKET, schema_registry_url=secured.url,
        schema_registry_auth="env:TF_REGISTRY_AUTH")))
    assert codec.decode(confluent(writer_id, codecs.AvroCodec(TICKET).encode(FULL))) == FULL
    monkeypatch.setenv("TF_REGISTRY_AUTH", "svc:wrong")
    stranger = codecs.ConfluentAvroCodec(TICKET, registry=codecs.SchemaRegistryClient(
        secured.url, auth="env:TF_REGISTRY_AUTH"))
    with pytest.raises(Exception) as info:
      stranger.decode(confluent(writer_id, codecs.AvroCodec(TICKET).encode(FULL)))
    assert not isinstance(info.value, codecs.DecodeError)


def test_evolution_writer_with_extra_field(registry):
  writer = evolved(extra_fields=[{"name": "priority", "type": "int", "default": 0},
                                 {"name": "tags", "type": {"type": "array", "items": "string"},
                                  "default": []}])
  client = codecs.SchemaRegistryClient(registry.url)
  writer_id = client.register(subject("evolve"), writer)
  value = confluent(writer_id, avro_bytes(writer, {**FULL, "priority": 3, "tags": ["a", "b"]}))
  codec = codecs.make_codec("confluent-avro", TICKET, schema_registry_url=registry.url)
  assert codec.decode(value) == FULL  # the extra fields are skipped


def test_evolution_writer_missing_optional_fields(registry):
  writer = evolved(drop=("channel", "customer_id"))
  client = codecs.SchemaRegistryClient(registry.url)
  writer_id = client.register(subject("evolve"), writer)
  value = confluent(writer_id, avro_bytes(writer, MINIMAL))
  codec = codecs.make_codec("confluent-avro", TICKET, schema_registry_url=registry.url)
  assert codec.decode(value) == {**MINIMAL, "channel": "email", "customer_id": None}


def test_evolution_writer_missing_required_field_fails(registry):
  writer = evolved(drop=("body",))
  client = codecs.SchemaRegistryClient(registry.url)
  writer_id = client.register(subject("evolve"), writer)
  value = confluent(writer_id, avro_bytes(writer, {k: v for k, v in FULL.items() if k != "body"}))
  codec = codecs.make_codec("confluent-avro", TICKET, schema_registry_url=registry.url)
  assert error_of(codec, value).error_type == "invalid_avro"


def test_registry_codec_survives_pickling(registry):
  """Beam pickles DoFns with their codec; the registry client must come back working."""
  client = codecs.SchemaRegistryClient(registry.url)
  writer_id = client.register(subject("pickle"), TICKET)
  codec = pickle.loads(pickle.dumps(
      codecs.make_codec("confluent-avro", TICKET, schema_registry_url=registry.url)))
  assert codec.decode(confluent(writer_id, codecs.AvroCodec(TICKET).encode(FULL))) == FULL
