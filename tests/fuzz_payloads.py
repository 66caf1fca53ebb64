"""Seeded hostile Kafka values for the decoders, per format (used by test_fuzz_decode.py)."""

from __future__ import annotations

import json
import random
import struct

from tierflow import schemas
from tierflow.connectors.codecs import make_codec

TICKET = schemas.load("ticket")
T0_MS = 1_704_067_200_000
MAX_RECORD_BYTES = 4096


def good_ticket(i: int) -> dict:
  return {"ticket_id": f"T{i:06d}", "created_at": T0_MS + i * 1000, "subject": f"s{i}",
          "body": f"body {i} ✓", "channel": "chat", "customer_id": None if i % 2 else f"C{i}"}


def _flip(rng: random.Random, data: bytes, flips: int = 3) -> bytes:
  b = bytearray(data)
  for _ in range(flips):
    if b:
      i = rng.randrange(len(b))
      b[i] ^= 1 << rng.randrange(8)
  return bytes(b)


def _json_text(obj) -> bytes:
  return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def hostile_json(rng: random.Random, i: int) -> bytes | None:
  t = good_ticket(i)
  choices = [
      lambda: rng.randbytes(rng.randrange(1, 200)),
      lambda: _json_text(t)[:rng.randrange(1, 40)],
      lambda: _flip(rng, _json_text(t)),
      lambda: b'{"ticket_id": "x", "deep": ' + b"[" * 1000 + b"]" * 1000 + b"}",
      lambda: b"[" * 100_000 + b"]" * 100_000,
      lambda: b'{"ticket_id": ' + b"{\"a\":" * 1000 + b"1" + b"}" * 1000 + b"}",
      lambda: _json_text({**t, "created_at": rng.choice(
          [253_402_300_800_000, -62_135_596_800_001, 2 ** 63 - 1, -2 ** 63, 10 ** 30])}),
      lambda: _json_text({**t, "created_at": "9999-12-31T23:59:60Z"}),
      lambda: _json_text({**t, "created_at": rng.choice([1.5e300, 0.5])}),
      lambda: json.dumps({**t, "body": "\ud800"}).encode("ascii"),  # a lone surrogate
      lambda: json.dumps({**t, "subject": "a\udfffb"}).encode("ascii"),
      lambda: b'{"ticket_id": "x", "created_at": NaN, "subject": "s", "body": "b"}',
      lambda: b'{"ticket_id": "x", "created_at": Infinity, "subject": "s", "body": "b"}',
      lambda: b'{"ticket_id": "x", "created_at": -Infinity, "subject": "s", "body": "b"}',
      lambda: _json_text({**t, "ticket_id": rng.choice([5, 1.5, True, ["a"], {"a": 1}])}),
      lambda: _json_text({**t, "body": rng.choice([None, 3, [1], {"x": "y"}])}),
      lambda: _json_text({k: v for k, v in t.items() if k != rng.choice(["ticket_id", "body"])}),
      lambda: _json_text({**t, "extra": rng.random(), "nested": {"a": [1, 2, {"b": None}]}}),
      lambda: b"",
      lambda: None,
      lambda: b"   \t ",
      lambda: b"\xef\xbb\xbf" + _json_text(t),  # a byte-order mark
      lambda: json.dumps(t, indent=2).encode(),  # pretty-printed: valid, with newlines
      lambda: _json_text(t) + b"\n" + _json_text(t),
      lambda: _json_text(t) + _json_text(t),
      lambda: b"null", lambda: b"123", lambda: b'"a string"', lambda: b"[]",
      lambda: _json_text({**t, "body": "x" * (MAX_RECORD_BYTES + 10)}),
      lambda: _json_text({**t, "body": "\x00\x01\x1f control"}),
      lambda: b'{"ticket_id": "a\x00b", "created_at": 1, "subject": "s", "body": "b"}',
      lambda: b'{"ticket_id": "dup", "ticket_id": "dup2", "created_at": 1, "subject": "s",'
              b' "body": "b"}',
      lambda: _json_text({**t, "channel": None}),
      lambda: _json_text({**t, "customer_id": 7}),
      lambda: b'{"ticket_id": "\xff\xfe", "created_at": 1, "subject": "s", "body": "b"}',
      lambda: _json_text({**t, "created_at": "2024-02-30T00:00:00Z"}),
      lambda: b'{"ticket_id": "x", "created_at": 1e400, "subject": "s", "body": "b"}',
      lambda: b'{"ticket_id": "x", "created_at": 00012, "subject": "s", "body": "b"}',
  ]
  return rng.choice(choices)()


def _avro_codec(fmt: str):
  return make_codec(fmt, TICKET)


def hostile_avro(rng: random.Random, i: int, fmt: str) -> bytes | None:
  codec = _avro_codec(fmt)
  good = codec.encode(good_ticket(i))
  header = good[:5] if fmt == "confluent-avro" else b""
  body = good[len(header):]
  choices = [
      lambda: rng.randbytes(rng.randrange(1, 120)),
      lambda: good[:rng.randrange(0, len(good))],
      lambda: _flip(rng, good, rng.randrange(1, 6)),
      lambda: good + rng.randbytes(rng.randrange(1, 10)),  # trailing bytes
      lambda: header + b"\xff" * rng.randrange(1, 30),  # varints that never end
      lambda: header + b"\xfe\xff\xff\xff\xff\xff\xff\xff\x7f" + body,  # a huge length
      lambda: header + b"\x01" + body,  # a negative length
      lambda: b"",
      lambda: None,
      lambda: header + codec.encode({**good_ticket(i), "body": "x" * (MAX_RECORD_BYTES + 10)})[
          len(header):],
      lambda: header + body.replace(b"body", b"\xff\xfe\xfd\xfc", 1),  # invalid UTF-8
      lambda: header + struct.pack(">q", 1),
  ]
  if fmt == "confluent-avro":
    choices += [
        lambda: b"\x01" + good[1:],  # wrong magic byte
        lambda: b"\x00" + struct.pack(">I", rng.randrange(2, 2 ** 32)) + body,  # unknown id
        lambda: good[:rng.randrange(0, 5)],  # shorter than the header
    ]
  return rng.choice(choices)()


def records(fmt: str, seed: int, hostile: int = 1000, good: int = 500) -> list[dict]:
  """``hostile`` hostile and ``good`` valid values, shuffled; each a dict with value, key,
  kind ('good' or 'hostile')."""
  rng = random.Random(seed)
  out = []
  codec = make_codec(fmt, TICKET)
  for i in range(good):
    out.append({"value": codec.encode(good_ticket(i)), "kind": "good",
                "key": None if i % 3 else f"k{i}".encode()})
  for i in range(hostile):
    value = hostile_json(rng, i) if fmt == "json" else hostile_avro(rng, i, fmt)
    out.append({"value": value, "kind": "hostile",
                "key": rng.choice([None, b"", rng.randbytes(8)])})
  rng.shuffle(out)
  return out
