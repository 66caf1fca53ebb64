"""``span_tokens`` by bisection returns exactly the tokens overlapping a span, as the
definition (every token whose characters overlap it) does, on random token streams."""

from __future__ import annotations

import random

from tierflow.connectors.llm_clients import ModelReply, TokenInfo
from tierflow.pipelines.answers import span_tokens, token_offsets
from tierflow.prices import Usage


def _overlapping(reply, offsets, start, end):
  if end <= start:
    return []
  return [t for t, o in zip(reply.tokens, offsets) if o < end and o + len(t.token) > start]


def test_bisection_finds_the_tokens_the_definition_finds():
  rng = random.Random(24)
  for _ in range(300):
    tokens = tuple(TokenInfo("".join(rng.choice("ab{}\" ") for _ in range(rng.randint(0, 4))),
                             -rng.random()) for _ in range(rng.randint(1, 40)))
    text = "".join(t.token for t in tokens)
    reply = ModelReply(text, tokens, Usage(1, 1), "m", "stop")
    offsets = token_offsets(reply)
    for _ in range(20):
      start = rng.randint(-2, len(text) + 2)
      end = rng.randint(start - 1, len(text) + 3)
      got = span_tokens(reply, offsets, start, end)
      assert [id(t) for t in got] == [id(t) for t in _overlapping(reply, offsets, start, end)]


def test_a_text_inside_the_tokens_keeps_its_spans():
  """Tokens before the text (a stripped fence) have negative offsets; spans still match."""
  tokens = tuple(TokenInfo(t, -0.1) for t in ("```", "json\n", "{\"a\"", ": 1}", "\n```"))
  reply = ModelReply("{\"a\": 1}", tokens, Usage(1, 1), "m", "stop")
  offsets = token_offsets(reply)
  assert offsets[0] < 0
  assert [t.token for t in span_tokens(reply, offsets, 0, 4)] == ["{\"a\""]
  assert [t.token for t in span_tokens(reply, offsets, 3, 7)] == ["{\"a\"", ": 1}"]
