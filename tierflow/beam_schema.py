"""Beam schemas for tierflow's Avro records: schema'd rows for ``beam.dataframe`` and SQL.

``beam_row_type(avro_schema)`` is the Beam row type (``RowTypeConstraint``) of an
Avro record schema (``DecodeRecords.row_schema``, ``RouteThroughTiers.result_schema``),
with the Python types of Beam's schema mapping (``apache_beam.typehints.schemas``):

====================================  ==========================================
Avro                                  Beam (Python)
====================================  ==========================================
boolean, int, long, float, double     bool, np.int32, np.int64, np.float32, np.float64
string, enum / bytes, fixed           str / bytes
timestamp-millis, timestamp-micros    ``apache_beam.utils.timestamp.Timestamp``
date / decimal                        datetime.date / decimal.Decimal
record / array / map                  a nested row type / Sequence[T] / Mapping[str, T]
["null", T]                           Optional[T]
====================================  ==========================================

``ToRows(avro_schema)`` turns dict rows into ``beam.Row``s of that type (an int in a
timestamp field is epoch millis, or micros for timestamp-micros; a datetime without a
zone is UTC); ``as_dict(row)`` turns a schema'd row back into plain Python (nested rows
into dicts, ``Timestamp``s into UTC datetimes), which is what tierflow's sink, the
router and pyarrow take.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
from typing import Any, Callable, Mapping, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.typehints.row_type import RowTypeConstraint
from apache_beam.utils.timestamp import Timestamp

__all__ = ["ToRows", "as_dict", "beam_row_type", "fields_of", "is_row", "joined", "plain",
           "row_converter", "row_type_of"]

_PRIMITIVES = {
    "boolean": bool, "int": np.int32, "long": np.int64, "float": np.float32,
    "double": np.float64, "bytes": bytes, "string": str,
}
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_EPOCH_DAY = datetime.date(1970, 1, 1)

Convert = Callable[[Any], Any]


def _same(value: Any) -> Any:
  return value


def _floating(value: Any) -> Any:
  return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _timestamp(unit_micros: int) -> Convert:
  def convert(value: Any) -> Timestamp:
    if isinstance(value, Timestamp):
      return value
    if isinstance(value, datetime.datetime):
      if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
      delta = value - _EPOCH
      return Timestamp(seconds=delta.days * 86400 + delta.seconds, micros=delta.microseconds)
    if isinstance(value, int) and not isinstance(value, bool):
      return Timestamp(micros=value * unit_micros)
    raise ValueError(f"{type(value).__name__} {value!r:.80} is not a timestamp (epoch "
                     "millis, a datetime or a Beam Timestamp)")
  return convert


def _date(value: Any) -> datetime.date:
  if isinstance(value, int) and not isinstance(value, bool):
    return _EPOCH_DAY + datetime.timedelta(days=value)
  return value


def _walk(avro_type: Any, named: dict) -> tuple[Any, Convert, bool]:
  """(Beam type, a converter of Python values to it, nullable) of an Avro type."""
  if isinstance(avro_type, str):
    if avro_type in _PRIMITIVES:
      return _PRIMITIVES[avro_type], _floating if avro_type in ("float", "double") else _same, \
          False
    found = named.get(avro_type) or named.get(avro_type.split(".")[-1])
    if found is None:
      raise ValueError(f"Avro type {avro_type!r} has no Beam schema type")
    return found[0], found[1], False
  if isinstance(avro_type, list):
    branches = [b for b in avro_type if b != "null"]
    if len(branches) != 1:
      raise ValueError(f"only [null, T] unions have a Beam schema type, got {avro_type!r}")
    beam_type, convert, _ = _walk(branches[0], named)
    if "null" not in avro_type:
      return beam_type, convert, False
    return Optional[beam_type], convert, True
  kind, logical = avro_type["type"], avro_type.get("logicalType")
  if kind == "long" and logical in ("timestamp-millis", "timestamp-micros"):
    return Timestamp, _timestamp(1000 if logical == "timestamp-millis" else 1), False
  if kind == "int" and logical == "date":
    return datetime.date, _date, False
  if kind == "bytes" and logical == "decimal":
    return decimal.Decimal, _same, False
  if logical in ("time-millis", "time-micros"):
    raise ValueError(f"Avro {logical} has no Beam schema type")
  if kind == "record":
    fields = [(f["name"], *_walk(f["type"], named)) for f in avro_type["fields"]]
    row_type = RowTypeConstraint.from_fields(
        [(name, beam_type) for name, beam_type, _, _ in fields],
        field_descriptions={f["name"]: f["doc"] for f in avro_type["fields"] if f.get("doc")})
    convert = _row_converter(avro_type["name"], [(n, c, nul) for n, _, c, nul in fields])
    named[avro_type["name"]] = (row_type, convert)
    return row_type, convert, False
  if kind in ("enum", "fixed"):
    beam_type = str if kind == "enum" else bytes
    named[avro_type["name"]] = (beam_type, _same)
    return beam_type, _same, False
  if kind == "array":
    item_type, item, item_nullable = _walk(avro_type["items"], named)
    return Sequence[item_type], _each(item, item_nullable), False
  if kind == "map":
    value_type, value, value_nullable = _walk(avro_type["values"], named)
    each = _each(value, value_nullable)
    return Mapping[str, value_type], lambda m: dict(zip(m.keys(), each(m.values()))), False
  if kind in _PRIMITIVES:
    return _walk(kind, named)
  raise ValueError(f"Avro type {avro_type!r} has no Beam schema type")


def _each(convert: Convert, nullable: bool) -> Convert:
  if convert is _same:
    return list
  if nullable:
    return lambda values: [None if v is None else convert(v) for v in values]
  return lambda values: [convert(v) for v in values]


def _row_converter(name: str, fields: list[tuple[str, Convert, bool]]) -> Convert:
  names = frozenset(n for n, _, _ in fields)

  def convert(value: Any) -> beam.Row:
    values = value if isinstance(value, Mapping) else as_dict(value, deep=False)
    unknown = [k for k in values if k not in names]
    if unknown:
      raise ValueError(f"{name} has no field {', '.join(map(str, sorted(unknown)))}")
    out = {}
    for field, convert_field, nullable in fields:
      v = values.get(field)
      if v is None:
        if not nullable:
          raise ValueError(f"{name}: required field {field!r} is missing or null")
        out[field] = None
      else:
        out[field] = convert_field(v)
    return beam.Row(**out)
  return convert


def row_converter(avro_schema: Mapping[str, Any]) -> tuple[RowTypeConstraint, Convert]:
  """(``beam_row_type(avro_schema)``, a function from a dict row to a ``beam.Row`` of it)."""
  if not isinstance(avro_schema, Mapping) or avro_schema.get("type") != "record":
    raise ValueError("takes an Avro record schema")
  row_type, convert, _ = _walk(dict(avro_schema), {})
  return row_type, convert


def beam_row_type(avro_schema: Mapping[str, Any]) -> RowTypeConstraint:
  """The Beam row type of an Avro record schema (see the module docstring); ValueError
  for a type Beam's schemas do not have (a union of two types, time-of-day)."""
  return row_converter(avro_schema)[0]


def row_type_of(element_type: Any) -> Optional[RowTypeConstraint]:
  """The row type of a PCollection's ``element_type`` when it has a Beam schema (a row
  type, a NamedTuple or a dataclass), else None."""
  if isinstance(element_type, RowTypeConstraint):
    return element_type
  if isinstance(element_type, type):
    return RowTypeConstraint.from_user_type(element_type)
  return None


def joined(*parts: RowTypeConstraint) -> RowTypeConstraint:
  """One row type with the fields of ``parts`` in order; ValueError when two have a field
  of the same name (as ``schemas.compose``)."""
  fields, descriptions, seen = [], {}, set()
  for part in parts:
    for name, beam_type in part._fields:
      if name in seen:
        raise ValueError(f"field {name!r} is in the input rows and in what is added to them")
      seen.add(name)
      fields.append((name, beam_type))
    descriptions.update(getattr(part, "_field_descriptions", None) or {})
  return RowTypeConstraint.from_fields(fields, field_descriptions=descriptions)


def is_row(value: Any) -> bool:
  """A schema'd row: a ``beam.Row``, a NamedTuple (what a ``RowCoder`` decodes to) or a
  dataclass instance."""
  return (isinstance(value, beam.Row) or (isinstance(value, tuple) and hasattr(value, "_fields"))
          or (dataclasses.is_dataclass(value) and not isinstance(value, type)))


def _plain(value: Any) -> Any:
  if is_row(value):
    return as_dict(value)
  if isinstance(value, Timestamp):
    return value.to_utc_datetime(has_tz=True)
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def as_dict(row: Any, *, deep: bool = True) -> dict:
  """A schema'd row (``beam.Row``, NamedTuple, dataclass) as a dict: with ``deep``, its
  nested rows as dicts, ``Timestamp``s as UTC datetimes and numpy scalars as Python
  numbers, all the way down (what pyarrow and tierflow's sink take)."""
  if dataclasses.is_dataclass(row) and not isinstance(row, type):
    values = {f.name: getattr(row, f.name) for f in dataclasses.fields(row)}
  elif is_row(row):
    values = row._asdict()
  else:
    raise TypeError(f"as_dict takes a beam.Row, a NamedTuple or a dataclass, got "
                    f"{type(row).__name__}")
  return {k: _plain(v) for k, v in values.items()} if deep else dict(values)


def plain(row: Any) -> Any:
  """A row as the router, the sinks and pyarrow take it: a schema'd row as ``as_dict``
  gives it, anything else (a dict, or what a check then refuses) as it is."""
  return as_dict(row) if is_row(row) else row


def fields_of(row: Any) -> dict:
  """A new dict of a row's own fields, their values as they are (a schema'd row's or a
  mapping's): what a schema'd output row is built from."""
  return as_dict(row, deep=False) if is_row(row) else dict(row)


class ToRows(beam.PTransform):
  """Dict rows as ``beam.Row``s of an Avro record schema's Beam row type: a schema'd
  PCollection (``beam.dataframe``, ``SqlTransform``, schema inference), which
  tierflow's row transforms keep schema'd.

  A row with a field the schema does not have, or without a required one, raises.

  Args:
    avro_schema: an Avro record schema (``tierflow.schemas.load("ticket")``,
      ``AddSourceFields.row_schema(...)``, ``RouteThroughTiers.result_schema(...)``).
  """

  def __init__(self, avro_schema: Mapping[str, Any]):
    super().__init__()
    self._row_type, self._convert = row_converter(avro_schema)

  @property
  def row_type(self) -> RowTypeConstraint:
    return self._row_type

  def expand(self, rows):
    return rows | "ToRows" >> beam.Map(self._convert).with_output_types(self._row_type)
