"""Bad strings in every string position of every format: none reaches a results file.

For JSON, Avro and Confluent-Avro, at least 1,000 records each put invalid UTF-8, lone
surrogates, NUL bytes, 4-byte characters and over-long values into every string field of
the ticket schema. A real passthrough run over them exits 0; then every file under the
output is read, one by one, by DuckDB and by pyarrow: a file a reader refuses would hide
its good rows from analysts. Records with bytes no UTF-8 file may hold are dead letters
with the reason; the rest are results, byte for byte.
"""

import collections
import io
import json
import os
import random

import duckdb
import fastavro
import pyarrow.parquet as pq
import pytest

from tierflow import cli, schemas
from tierflow.connectors.codecs import make_codec

TICKET = schemas.load("ticket")
STRING_FIELDS = ["ticket_id", "subject", "body", "channel", "customer_id"]
T0_MS = 1_704_067_200_000
MAX_RECORD_BYTES = 8192
PLACEHOLDER = "\u2603"  # replaced, in the encoded bytes, by the poison's own bytes

# (kind, raw UTF-8-ish bytes to place in a string, what must happen to the record)
POISONS = [
    ("invalid_utf8", b"\xff\xfe", "dead"),
    ("invalid_utf8_tail", b"ok\xc3", "dead"),  # a sequence cut short
    ("overlong_encoding", b"\xc0\xaf", "dead"),  # '/' encoded in two bytes
    ("lone_surrogate", b"\xed\xa0\x80", "dead"),  # U+D800 as (CESU) bytes
    ("nul", b"a\x00b", "kept"),
    ("controls", b"\x01\x1f\x7f", "kept"),
    ("astral", "🦜 ok".encode(), "kept"),
    ("long_allowed", b"x" * 3000, "kept"),
    ("oversized", b"y" * (MAX_RECORD_BYTES + 1), "dead"),
]


def _ticket(i):
  return {"ticket_id": f"T{i:06d}", "created_at": T0_MS + i, "subject": f"s{i}",
          "body": f"body {i}", "channel": "chat", "customer_id": f"C{i}"}


def _json_value(ticket, field, poison, rng):
  if poison == b"\xed\xa0\x80" and rng.random() < 0.5:  # or as a JSON escape
    return json.dumps({**ticket, field: "a\\ud800b"}).replace("\\\\ud800", "\\ud800").encode()
  try:  # valid UTF-8: as any JSON writer would put it (controls and NUL escaped)
    return json.dumps({**ticket, field: poison.decode("utf-8")}, ensure_ascii=False).encode()
  except UnicodeDecodeError:  # raw bytes where the string's UTF-8 goes
    text = json.dumps({**ticket, field: PLACEHOLDER}, ensure_ascii=False).encode()
    return text.replace(PLACEHOLDER.encode(), poison)


def _avro_value(codec, ticket, field, poison):
  """The record Avro-encoded with the poison's bytes as the field's string (its length
  prefix fixed to match)."""
  marker = "\u2603" * 3
  good = codec.encode({**ticket, field: marker})
  at = good.index(marker.encode())
  # The zig-zag varint length just before the string.
  old_len = _zigzag(len(marker.encode()))
  start = at - len(old_len)
  assert good[start:at] == old_len
  return good[:start] + _zigzag(len(poison)) + poison + good[at + len(marker.encode()):]


def _zigzag(n):
  n = (n << 1) ^ (n >> 63)
  out = bytearray()
  while n & ~0x7F:
    out.append((n & 0x7F) | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def records(fmt, count=1080, seed=7):
  """(value bytes, expected fate, poison kind, field) for ``count`` records, in blocks of
  one kind: a decoder may check a whole batch at once, and a batch holding only bytes
  that parse is where a bad string can slip through."""
  rng = random.Random(seed)
  codec = make_codec(fmt, TICKET)
  out = []
  block = count // len(POISONS) + 1
  for i in range(count):
    kind, poison, fate = POISONS[i // block]
    field = STRING_FIELDS[i % len(STRING_FIELDS)]
    ticket = _ticket(i)
    if rng.random() < 0.1:  # some records stay clean
      value, fate, kind, field = codec.encode(ticket), "kept", "clean", None
    elif fmt == "json":
      value = _json_value(ticket, field, poison, rng)
    else:
      value = _avro_value(codec, ticket, field, poison)
    out.append((value, fate, kind, field))
  return out


def read_every_file(root):
  """Rows of every Parquet file under ``root``, each read alone by DuckDB and pyarrow."""
  rows = []
  for d, _, files in os.walk(root):
    for f in sorted(files):
      if not f.endswith(".parquet") or f.startswith("."):
        continue
      path = os.path.join(d, f)
      by_duckdb = duckdb.sql(f"SELECT * FROM read_parquet('{path}')").fetchall()
      by_arrow = pq.read_table(path).to_pylist()
      assert len(by_duckdb) == len(by_arrow) > 0
      rows += by_arrow
  return rows


def test_one_bad_string_among_good_records_is_dead_lettered_alone():
  """The case that reached a results file before: one record with invalid UTF-8 in a JSON
  string among good ones, which a column-wise JSON reader takes without checking."""
  from tierflow.connectors.codecs import JsonCodec
  codec = JsonCodec(TICKET)
  values = [codec.encode(_ticket(i)) for i in range(26)]
  values.insert(13, b'{"ticket_id": "\xff\xfe", "created_at": 1704067200000, "subject": "s",'
                    b' "body": "b"}')
  out = codec.decode_batch(values)
  out.table.validate(full=True)
  assert [i for i, _, _ in out.failed] == [13] and out.failed[0][1] == "invalid_utf8"
  assert len(out.ok) == 26


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["json", "avro", "confluent-avro"])
def test_bad_strings_never_reach_a_results_file(fmt, broker, topic, produce, output_dir):
  name = topic(partitions=2)
  recs = records(fmt)
  produce(name, [{"value": v, "partition": i % 2} for i, (v, _, _, _) in enumerate(recs)],
          batch_size=500, max_request_size=1 << 20)
  code = cli.main(["-q", "run", "passthrough", "--bootstrap-servers", broker.bootstrap_servers,
                   "--topic", name, "--output", output_dir, "--format", fmt,
                   "--max-record-bytes", str(MAX_RECORD_BYTES), "--rows-per-file", "20"])
  assert code == 0
  results = read_every_file(f"{output_dir}/results")
  dead = read_every_file(f"{output_dir}/dead_letter")
  where = {}
  for r in results:
    where[(r["kafka_partition"], r["kafka_offset"])] = ("kept", r)
  for d in dead:
    key = (d["kafka_partition"], d["kafka_offset"])
    assert key not in where, f"{key} is both a result and a dead letter"
    where[key] = ("dead", d)
  assert len(where) == len(results) + len(dead) == len(recs)  # each record exactly once
  fates = collections.Counter()
  for i, (value, fate, kind, field) in enumerate(recs):
    got, row = where[(i % 2, i // 2)]
    fates[(kind, got)] += 1
    assert got == fate, (kind, field, value[:80], row.get("reason"))
    if got == "dead":
      assert row["error_type"] in ("invalid_utf8", "invalid_unicode", "oversized"), row
      assert row["raw_value"] == value[:MAX_RECORD_BYTES]
    elif kind != "clean":  # kept byte for byte
      poison = dict((k, p) for k, p, _ in POISONS)[kind]
      assert row[field].encode() == poison
  print(dict(fates))
