"""What every stage kind reads answers with: token spans and their probabilities, JSON
objects in free text, grounding in the record. Pure functions."""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import re
from typing import Any, Mapping, Optional, Sequence

from tierflow.connectors.llm_clients import ModelReply, TokenInfo

__all__ = ["Answer", "gm_prob", "grounded", "grounded_number", "json_objects", "seq_prob",
           "span_tokens", "token_offsets", "value_span", "verbalised", "WORD"]

WORD = re.compile(r"[^\W_]+", re.UNICODE)


@dataclasses.dataclass(frozen=True)
class Answer:
  """One record's parsed answer for a stage, or its failure (``error`` set)."""
  value: Any = None
  confidence: Optional[float] = None
  signal: str = ""
  notes: tuple = ()
  error: Optional[str] = None
  answer_chars: int = 0


def token_offsets(reply: ModelReply) -> Optional[list[int]]:
  """Start offset of every token in reply.text (negative for tokens before it), or None if
  the tokens do not spell it.

  A server may return part of what the model generated: llama.cpp's server strips the
  ```json fence its model wrote around a structured (``response_format``) answer. The text
  is then found where it occurs once in the tokens' text, so its tokens keep their
  probabilities."""
  if not reply.tokens:
    return None
  joined = "".join(t.token for t in reply.tokens)
  shift = 0
  if joined != reply.text:
    shift = joined.find(reply.text) if reply.text.strip() else -1
    if shift < 0 or joined.find(reply.text, shift + 1) >= 0:
      return None
  offsets, pos = [], -shift
  for t in reply.tokens:
    offsets.append(pos)
    pos += len(t.token)
  return offsets


def span_tokens(reply: ModelReply, offsets: Optional[list[int]], start: int, end: int
                ) -> list[TokenInfo]:
  """The tokens overlapping ``reply.text[start:end]``, found by bisection of the (sorted,
  contiguous) offsets: a packed answer asks this for every field of every record."""
  if offsets is None or end <= start:
    return []
  tokens = reply.tokens
  first = max(0, bisect.bisect_right(offsets, start) - 1)
  return [tokens[i] for i in range(first, bisect.bisect_left(offsets, end))
          if offsets[i] + len(tokens[i].token) > start]


def seq_prob(tokens: Sequence[TokenInfo]) -> Optional[float]:
  """Probability of the token sequence (product of its tokens' probabilities)."""
  if not tokens:
    return None
  return math.exp(sum(t.logprob for t in tokens))


def gm_prob(tokens: Sequence[TokenInfo]) -> Optional[float]:
  """Geometric-mean token probability."""
  if not tokens:
    return None
  return math.exp(sum(t.logprob for t in tokens) / len(tokens))


def _norm(text: str) -> str:
  return "".join(WORD.findall(text.casefold()))


_NUMBER = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])|\d+(?:[.,]\d+)?")


def numbers_in(source: str) -> set[float]:
  """Every number written in the text: 1,234.50 and 19.99 as written, 19,99 (a decimal
  comma) as 19.99 too."""
  out = set()
  for m in _NUMBER.findall(source):
    if "," in m and "." not in m and re.fullmatch(r"\d+,\d{1,2}", m):
      out.add(float(m.replace(",", ".")))
    out.add(float(m.replace(",", "")))
  return out


def grounded_number(value: float, source: str) -> bool:
  """The number is written in the source (to the cent; a sign may be only in words, as in
  "a refund of $20" read as -20)."""
  return any(abs(abs(value) - n) < 0.005 for n in numbers_in(source))


def grounded(value: str, source: str) -> bool:
  """The value occurs in the source, ignoring case, spacing and punctuation; a value
  with digits (an order number normalised as NW-12345) counts if its digits do."""
  n = _norm(value)
  if not n:
    return False
  if n in _norm(source):
    return True
  digits = re.findall(r"\d+", value)
  return bool(digits) and all(d in source for d in digits)


def verbalised(obj: Mapping[str, Any]) -> Optional[float]:
  """The model's stated confidence in an answer object, as a probability, if any."""
  c = obj.get("confidence")
  if isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c <= 1:
    return float(c)
  if isinstance(c, (int, float)) and not isinstance(c, bool) and 1 < c <= 100:
    return float(c) / 100
  return None


def json_objects(text: str) -> list[tuple[int, int, Any]]:
  """(start, end, object) for every JSON object in the text, scanning left to right."""
  decoder = json.JSONDecoder()
  found, i = [], 0
  while True:
    i = text.find("{", i)
    if i < 0:
      return found
    try:
      obj, end = decoder.raw_decode(text, i)
    except (json.JSONDecodeError, RecursionError):
      i += 1
      continue
    found.append((i, end, obj))
    i = end


def value_span(text: str, start: int, end: int, key: str, value: Any) -> tuple[int, int]:
  """Character span of ``"key": <value>`` 's value inside text[start:end] (a string
  value without its quotes: the tokens that spell it, not the JSON framing)."""
  encoded = json.dumps(value, ensure_ascii=False)
  inner = 1 if isinstance(value, str) else 0
  k = text.find(f'"{key}"', start, end)
  v = text.find(encoded, k, end) if k >= 0 else -1
  if v < 0:
    v = text.find(encoded, start, end)
  if v < 0:
    return start, end
  return v + inner, v + len(encoded) - inner
