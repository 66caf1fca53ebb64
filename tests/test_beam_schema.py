"""tierflow.beam_schema: Avro record schemas as Beam row types, and rows both ways."""

import datetime
import decimal
from typing import Mapping, Optional, Sequence

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.coders import RowCoder
from apache_beam.typehints import schemas as beam_schemas
from apache_beam.utils.timestamp import Timestamp

from tierflow import schemas
from tierflow import transforms as tf

UTC = datetime.timezone.utc
EVERY_KIND = {
    "type": "record", "name": "Every", "namespace": "t", "fields": [
        {"name": "flag", "type": "boolean", "doc": "a flag"},
        {"name": "small", "type": "int"},
        {"name": "big", "type": "long"},
        {"name": "single", "type": "float"},
        {"name": "ratio", "type": "double"},
        {"name": "text", "type": ["null", "string"]},
        {"name": "raw", "type": "bytes"},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "at_us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9,
                                    "scale": 2}},
        {"name": "colour", "type": {"type": "enum", "name": "Colour", "symbols": ["RED"]}},
        {"name": "hash", "type": {"type": "fixed", "name": "Hash", "size": 2}},
        {"name": "tags", "type": {"type": "array", "items": ["null", "string"]}},
        {"name": "counts", "type": {"type": "map", "values": "long"}},
        {"name": "inner", "type": ["null", {"type": "record", "name": "Inner", "fields": [
            {"name": "x", "type": "double"}]}]},
        {"name": "inners", "type": {"type": "array", "items": "Inner"}},
        {"name": "again", "type": "Colour"},
    ]}


def test_every_avro_kind_has_the_python_type_of_beams_schema_mapping():
  row_type = tf.beam_row_type(EVERY_KIND)
  types = dict(row_type._fields)
  assert {k: v for k, v in types.items() if k not in ("inner", "inners")} == {
      "flag": bool, "small": np.int32, "big": np.int64, "single": np.float32,
      "ratio": np.float64, "text": Optional[str], "raw": bytes, "at": Timestamp,
      "at_us": Timestamp, "day": datetime.date, "amount": decimal.Decimal, "colour": str,
      "hash": bytes, "tags": Sequence[Optional[str]], "counts": Mapping[str, np.int64],
      "again": str}
  inner = tf.beam_row_type(EVERY_KIND["fields"][15]["type"][1])
  assert types["inner"] == Optional[inner] and types["inners"] == Sequence[inner]
  assert row_type._field_descriptions == {"flag": "a flag"}
  # Beam's schema machinery takes it and gives the same types back (a round trip).
  schema = beam_schemas.schema_from_element_type(row_type)
  back = dict(beam_schemas.named_fields_from_schema(schema))
  assert back["at"] is Timestamp and back["tags"] == Sequence[Optional[str]]
  assert back["inner"].__args__[0]._fields == inner._fields


@pytest.mark.parametrize("avro_type, match", [
    (["null", "string", "long"], "only .null, T. unions"),
    ({"type": "int", "logicalType": "time-millis"}, "time-millis has no Beam schema type"),
])
def test_avro_types_beam_schemas_do_not_have_are_refused(avro_type, match):
  with pytest.raises(ValueError, match=match):
    tf.beam_row_type({"type": "record", "name": "R", "fields": [{"name": "f", "type": avro_type}]})


def test_dict_rows_become_beam_rows_that_a_row_coder_keeps_and_as_dict_gives_back():
  convert = tf.ToRows(EVERY_KIND)._convert
  row = convert({
      "flag": True, "small": 3, "big": 2**40, "single": 1, "ratio": 0.5, "text": None,
      "raw": b"\x00", "at": 1767225600123, "at_us": 1767225600123456, "day": 20454,
      "amount": decimal.Decimal("1.25"), "colour": "RED", "hash": b"ab", "tags": ["a", None],
      "counts": {"k": 1}, "inner": {"x": 1.5}, "inners": [beam.Row(x=2.0)], "again": "RED"})
  assert isinstance(row, beam.Row) and isinstance(row.inner, beam.Row)
  assert row.at == Timestamp(micros=1767225600123000) and row.day == datetime.date(2026, 1, 1)
  assert row.single == 1.0 and isinstance(row.single, float)  # an int in a float field
  coder = RowCoder.from_type_hint(tf.beam_row_type(EVERY_KIND), None)
  decoded = coder.decode(coder.encode(row))
  plain = tf.as_dict(decoded)
  assert plain == {
      "flag": True, "small": 3, "big": 2**40, "single": 1.0, "ratio": 0.5, "text": None,
      "raw": b"\x00", "at": datetime.datetime(2026, 1, 1, 0, 0, 0, 123000, tzinfo=UTC),
      "at_us": datetime.datetime(2026, 1, 1, 0, 0, 0, 123456, tzinfo=UTC),
      "day": datetime.date(2026, 1, 1), "amount": decimal.Decimal("1.25"), "colour": "RED",
      "hash": b"ab", "tags": ["a", None], "counts": {"k": 1}, "inner": {"x": 1.5},
      "inners": [{"x": 2.0}], "again": "RED"}
  assert plain == tf.as_dict(row)  # the same from the row before and after the coder
  # a datetime (naive: UTC) and a Beam Timestamp are timestamps too
  again = convert({**plain, "at": datetime.datetime(2026, 1, 1, 0, 0, 0, 123000),
                   "at_us": Timestamp(micros=1767225600123456)})
  assert tf.as_dict(again) == plain


@pytest.mark.parametrize("row, match", [
    ({"text": None}, "required field 'flag' is missing"),
    ({"flag": True, "nope": 1}, "Every has no field nope"),
    ({"flag": True, "small": 1, "big": 1, "single": 1.0, "ratio": 1.0, "raw": b"",
      "at": "yesterday"}, "str 'yesterday' is not a timestamp"),
])
def test_a_dict_that_does_not_fit_the_schema_is_refused(row, match):
  with pytest.raises(ValueError, match=match):
    tf.ToRows(EVERY_KIND)._convert(row)


def test_the_result_schema_of_the_bundled_config_has_a_row_type():
  """Every bundled schema and the tickets result schema (nested stage ledgers, the extract
  stage's record) map; the Failure type has its own (a NamedTuple), with its fields'
  types."""
  for name in schemas.names():
    tf.beam_row_type(schemas.load(name))
  decode = tf.DecodeRecords(tf.make_codec("json", schemas.load("ticket")))
  route = tf.RouteThroughTiers(tf.load_config("tickets"))
  types = dict(tf.beam_row_type(route.result_schema(decode.row_schema))._fields)
  assert dict(types["extraction"].__args__[0]._fields)["order_id"] == Optional[str]
  assert dict(types["stages"].__args__[0]._fields)["confidence"] == Optional[np.float64]
  assert beam_schemas.named_fields_from_element_type(tf.Failure) == [
      ("step", str), ("error_type", str), ("reason", str), ("record_id", Optional[str]),
      ("payload", Optional[bytes])]
