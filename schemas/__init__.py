"""Avro schemas, the one source of truth for records, and what is derived from them.

The ``*.avsc`` files beside this module define every record tierflow reads or
writes. Output tables are Avro records composed from them (``compose``) and
their Arrow/Parquet schemas are derived (``to_arrow``), never written by hand.
"""

from __future__ import annotations

import copy
import functools
import json
from importlib import resources
from typing import Any, Mapping

import fastavro
import pyarrow as pa

__all__ = [
    "load",
    "names",
    "compose",
    "to_arrow",
    "field_names",
    "parse",
]

_NAMESPACE = "tierflow"


def names() -> list[str]:
  """Names of the bundled schemas (``ticket``, ``document``, ...)."""
  return sorted(
      p.name[:-len(".avsc")] for p in resources.files(__name__).iterdir()
      if p.name.endswith(".avsc"))


@functools.lru_cache(maxsize=None)
def _load_json(name: str) -> str:
  path = resources.files(__name__).joinpath(f"{name}.avsc")
  if not path.is_file():
    raise ValueError(f"unknown schema {name!r}; bundled schemas: {names()}")
  return path.read_text(encoding="utf-8")


def load(name_or_path: str) -> dict:
  """Returns a bundled schema by name, or a schema from an ``.avsc`` path, as JSON."""
  if name_or_path.endswith(".avsc"):
    with open(name_or_path, encoding="utf-8") as f:
      return json.load(f)
  return json.loads(_load_json(name_or_path))


def parse(schema: Mapping[str, Any]) -> dict:
  """Parses (and so validates) an Avro schema with fastavro."""
  return fastavro.parse_schema(copy.deepcopy(dict(schema)))


def compose(name: str, *parts: Mapping[str, Any], doc: str = "") -> dict:
  """A record schema whose fields are the fields of ``parts``, in order.

  Raises ValueError when two parts define the same field name: an output
  column has exactly one meaning.
  """
  fields: list[dict] = []
  seen: dict[str, str] = {}
  for part in parts:
    for field in part["fields"]:
      if field["name"] in seen:
        raise ValueError(
            f"field {field['name']!r} of {part.get('name')} clashes with "
            f"{seen[field['name']]}")
      seen[field["name"]] = part.get("name", "?")
      fields.append(copy.deepcopy(field))
  schema = {"type": "record", "name": name, "namespace": _NAMESPACE,
            "fields": fields}
  if doc:
    schema["doc"] = doc
  parse(schema)
  return schema


def field_names(schema: Mapping[str, Any]) -> list[str]:
  return [f["name"] for f in schema["fields"]]


_PRIMITIVES = {
    "null": pa.null(),
    "boolean": pa.bool_(),
    "int": pa.int32(),
    "long": pa.int64(),
    "float": pa.float32(),
    "double": pa.float64(),
    "bytes": pa.binary(),
    "string": pa.string(),
}

_LOGICAL = {
    ("long", "timestamp-millis"): pa.timestamp("ms", tz="UTC"),
    ("long", "timestamp-micros"): pa.timestamp("us", tz="UTC"),
    ("int", "date"): pa.date32(),
    ("int", "time-millis"): pa.time32("ms"),
    ("long", "time-micros"): pa.time64("us"),
}


def _arrow_type(avro_type: Any, named: dict[str, pa.DataType]) -> tuple[pa.DataType, bool]:
  """(arrow type, nullable) for an Avro type."""
  if isinstance(avro_type, str):
    if avro_type in _PRIMITIVES:
      return _PRIMITIVES[avro_type], avro_type == "null"
    short = avro_type.split(".")[-1]
    if avro_type in named or short in named:
      return named.get(avro_type, named.get(short)), False
    raise ValueError(f"unsupported Avro type {avro_type!r}")
  if isinstance(avro_type, list):
    branches = [b for b in avro_type if b != "null"]
    if len(branches) != 1:
      raise ValueError(
          f"only [null, T] unions map to Arrow columns, got {avro_type!r}")
    arrow, _ = _arrow_type(branches[0], named)
    return arrow, "null" in avro_type
  kind = avro_type["type"]
  logical = avro_type.get("logicalType")
  if (kind, logical) in _LOGICAL:
    return _LOGICAL[(kind, logical)], False
  if kind == "bytes" and logical == "decimal":
    return pa.decimal128(avro_type["precision"], avro_type.get("scale", 0)), False
  if kind in _PRIMITIVES:
    return _PRIMITIVES[kind], kind == "null"
  if kind == "record":
    struct = pa.struct([_arrow_field(f, named) for f in avro_type["fields"]])
    named[avro_type["name"]] = struct
    return struct, False
  if kind == "enum":
    named[avro_type["name"]] = pa.string()
    return pa.string(), False
  if kind == "fixed":
    named[avro_type["name"]] = pa.binary(avro_type["size"])
    return pa.binary(avro_type["size"]), False
  if kind == "array":
    item, item_nullable = _arrow_type(avro_type["items"], named)
    return pa.list_(pa.field("element", item, nullable=item_nullable)), False
  if kind == "map":
    value, _ = _arrow_type(avro_type["values"], named)
    return pa.map_(pa.string(), value), False
  raise ValueError(f"unsupported Avro type {avro_type!r}")


def _arrow_field(field: Mapping[str, Any], named: dict[str, pa.DataType]) -> pa.Field:
  arrow, nullable = _arrow_type(field["type"], named)
  metadata = {"doc": field["doc"]} if field.get("doc") else None
  return pa.field(field["name"], arrow, nullable=nullable, metadata=metadata)


def to_arrow(schema: Mapping[str, Any]) -> pa.Schema:
  """The Arrow (and so Parquet) schema of an Avro record schema.

  timestamp-millis becomes ``timestamp[ms, tz=UTC]``; ``["null", T]`` a
  nullable T; records structs; arrays lists; maps ``map<string, T>``.
  """
  if schema.get("type") != "record":
    raise ValueError("to_arrow takes an Avro record schema")
  named: dict[str, pa.DataType] = {}
  fields = [_arrow_field(f, named) for f in schema["fields"]]
  metadata = {"avro.schema": json.dumps(schema, sort_keys=True)}
  return pa.schema(fields, metadata=metadata)
