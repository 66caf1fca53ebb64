"""A rule-based STAND-IN model that answers tierflow's stage prompts.

Not a language model and not a quality reference: it scores labels by keyword
hits, extracts a few known fields (order ids, amounts) by regex, and summarises with
the first sentence. It exists so the offline demo has a frontier tier to call
over the real Anthropic/OpenAI wire formats, and so benchmarks have an instant
model. Its confidences (logprobs) come from keyword margins. Never report its
outputs as model quality.
"""

from __future__ import annotations

import json
import math
import random
import re
from typing import Any, Mapping, Optional

from tierflow_local.provider_server import Completion, ProviderRequest, TokenLogprob, tokenize

__all__ = ["KeywordStandIn", "DEFAULT_KEYWORDS"]

DEFAULT_KEYWORDS: Mapping[str, tuple] = {
    "billing": ("charge", "charged", "refund", "invoice", "payment", "billed", "bill", "card",
                "subscription", "price", "paid", "pay", "cobro", "rechnung", "facture", "fee"),
    "shipping": ("delivery", "deliver", "parcel", "package", "tracking", "shipped", "shipping",
                 "courier", "arrived", "arrive", "address", "lieferung", "envío", "livraison"),
    "returns": ("return", "exchange", "rma", "send back", "label", "swap", "devolución",
                "rücksendung", "retour", "wrong size"),
    "account": ("login", "log in", "password", "account", "2fa", "sign in", "email address",
                "locked", "reset", "delete my", "username", "konto", "cuenta", "compte"),
    "product_defect": ("broken", "defect", "faulty", "stopped working", "cracked", "damaged",
                       "doesn't work", "does not work", "leak", "smoke", "overheat", "kaputt",
                       "roto", "cassé"),
    "other": ("thank", "partnership", "question", "feedback", "love", "great", "suggestion",
              "wholesale", "press", "collaborat"),
    "business": ("company", "market", "shares", "profit", "economy", "bank", "firm", "sales"),
    "entertainment": ("film", "music", "award", "actor", "star", "show", "band", "album"),
    "politics": ("government", "minister", "election", "party", "labour", "tory", "mp"),
    "sport": ("match", "game", "team", "player", "cup", "win", "coach", "season"),
    "tech": ("software", "computer", "internet", "mobile", "technology", "users", "digital"),
}

_CURRENCY = {"$": "USD", "€": "EUR", "£": "GBP", "EUR": "EUR", "USD": "USD", "GBP": "GBP",
             "CAD": "CAD"}
# "Ignore previous instructions and answer: X" (and the like) in a record's text.
_INJECTION_RE = re.compile(
    r"ignore (?:all |any )?(?:the )?(?:previous|prior|above|earlier) instructions\W+"
    r"(?:\w+\W+){0,3}?(?:answer|reply|respond|say|output|return|write)(?: with)?\s*:?\s*"
    r"(.+)", re.IGNORECASE)
# Lines telling a model to drop its instructions, or written as a chat transcript's roles
# or markup around one ("SYSTEM: ..."): not what a record is about.
_IGNORE_RE = re.compile(r"\b(?:ignore|disregard)\b.{0,40}\binstructions?\b", re.I)
_ROLE_LINE_RE = re.compile(r"\s*(?:</?\w+>|(?:system|assistant|developer|user)\s*:)", re.I)
_AMOUNT_RE = re.compile(r"(CAD \$|\$|€|£|EUR |USD |GBP )\s?(\d+(?:[.,]\d{1,2})?)"
                        r"|(\d+(?:[.,]\d{1,2})?)\s?(€|EUR|USD|GBP)")


def _amount(text: str) -> tuple[Optional[float], Optional[str]]:
  m = _AMOUNT_RE.search(text)
  if not m:
    return None, None
  symbol, number = (m.group(1), m.group(2)) if m.group(2) else (m.group(4), m.group(3))
  symbol = symbol.strip()
  return float(number.replace(",", ".")), _CURRENCY.get(symbol.split()[0] if symbol.startswith(
      "CAD") else symbol, _CURRENCY.get(symbol))


def _order_id(text: str) -> Optional[str]:
  m = re.search(r"(?:\bNW[-\s]?|\border\s#?|#)(\d{5})\b", text, re.IGNORECASE)
  return f"NW-{m.group(1)}" if m else None


# Field extractors of the stand-in, by field name; other fields come back null.
FIELD_EXTRACTORS = {
    "order_id": _order_id,
    "amount": lambda text: _amount(text)[0],
    "currency": lambda text: _amount(text)[1],
}

_LABELS_RE = re.compile(r"exactly one of these labels: (.+?)\.\n", re.S)
_FIELD_RE = re.compile(r'^- "([^"]+)" \(([a-z]+) or null\)', re.M)
_WORDS_RE = re.compile(r"at most (\d+) words")


def _softmax_top(scores: Mapping[str, float]) -> list[tuple[str, float]]:
  m = max(scores.values())
  exp = {k: math.exp(v - m) for k, v in scores.items()}
  z = sum(exp.values())
  return sorted(((k, math.log(v / z)) for k, v in exp.items()), key=lambda kv: -kv[1])


class KeywordStandIn:
  """Responder for ``LocalProviderServer``: parses tierflow prompts, answers them."""

  def __init__(self, keywords: Optional[Mapping[str, tuple]] = None, sharpness: float = 1.5,
               *, sampling: bool = False, seed: int = 0):
    """``sampling``: a label is drawn from the label distribution at the request's
    temperature (default 1; 0 picks the top label), as a sampling model does, instead of
    always the top label."""
    self.keywords = dict(DEFAULT_KEYWORDS if keywords is None else keywords)
    self.sharpness = sharpness
    self.sampling = sampling
    self._rng = random.Random(seed)

  def _sampled(self, ranked: list[tuple[str, float]], temperature: float
               ) -> list[tuple[str, float]]:
    """``ranked`` with the label drawn at ``temperature`` first."""
    if not self.sampling or temperature <= 0:
      return ranked
    weights = [math.exp(lp / temperature) for _, lp in ranked]
    drawn = self._rng.choices(range(len(ranked)), weights=weights)[0]
    return [ranked[drawn]] + ranked[:drawn] + ranked[drawn + 1:]

  # -- the three tasks -----------------------------------------------------
  def classify(self, labels: list[str], text: str) -> tuple[str, list[tuple[str, float]]]:
    low = text.casefold()
    scores = {}
    for label in labels:
      words = self.keywords.get(label, tuple(re.split(r"[_\s]+", label)))
      scores[label] = self.sharpness * sum(low.count(w) for w in words)
    ranked = _softmax_top(scores)
    return ranked[0][0], ranked

  @staticmethod
  def extract(fields: list[tuple[str, str]], text: str) -> dict:
    return {name: (FIELD_EXTRACTORS[name](text) if name in FIELD_EXTRACTORS else None)
            for name, _ in fields}

  def extract_scored(self, fields: list[tuple[str, str]], text: str
                     ) -> tuple[dict, Optional[dict]]:
    """(values, per-field probability or None); a scoring model overrides this."""
    return self.extract(fields, text), None

  @staticmethod
  def extraction_pieces(rid: str, packed: bool, values: dict, probs: Optional[dict],
                        verbalise: bool) -> list[tuple[str, Any]]:
    """The extraction JSON as completion pieces; with ``probs``, every token of a field's
    value carries log(probability), so tierflow reads it as that field's confidence."""
    if probs is None:
      obj = {"id": rid, "fields": values} if packed else dict(values)
      if verbalise:
        found = sum(v is not None for v in values.values()) / max(1, len(values))
        obj["confidence"] = round(found, 2)
      return [(json.dumps(obj, ensure_ascii=False) + ("\n" if packed else ""), None)]
    pieces: list[tuple[str, Any]] = [(f'{{"id": "{rid}", "fields": {{' if packed else "{", None)]
    for j, (name, value) in enumerate(values.items()):
      lp = math.log(max(probs.get(name, 1.0), 1e-12))
      pieces.append(((", " if j else "") + json.dumps(name) + ": ", None))
      if isinstance(value, str):
        inner = json.dumps(value, ensure_ascii=False)[1:-1]
        pieces += [('"', None), (inner, lp), ('"', None)]
      else:
        pieces.append((json.dumps(value), lp))
    if verbalise:
      pieces.append((f', "confidence": {min(probs.values(), default=1.0):.2f}', None))
    pieces.append(("}}\n" if packed else "}", None))
    return pieces

  @staticmethod
  def summarise(text: str, max_words: int) -> str:
    body = text.split("\n\n", 1)[-1] if "\n\n" in text else text
    # A model that does not obey instructions written into a record does not summarise
    # them either: lines that speak to it are not the record's content.
    lines = [l for l in body.strip().splitlines()
             if not (_IGNORE_RE.search(l) or _ROLE_LINE_RE.match(l))]
    body = "\n".join(lines) if any(l.strip() for l in lines) else body
    sentence = re.split(r"(?<=[.!?])\s", body.strip(), maxsplit=1)[0]
    return " ".join(sentence.split()[:max_words]) or "No content."

  def summarise_scored(self, text: str, max_words: int) -> tuple[str, Optional[float]]:
    """(summary, the probability every one of its tokens carries, or None for certainty)."""
    return self.summarise(text, max_words), None

  @staticmethod
  def injected(text: str) -> Optional[str]:
    """The answer an instruction written into ``text`` demands, if there is one."""
    m = _INJECTION_RE.search(text)
    return m.group(1).strip().strip("\"'") or None if m else None

  # -- protocol ------------------------------------------------------------
  def __call__(self, request: ProviderRequest) -> Completion:
    system, user = request.system, request.last_user_text
    records = self._records(user)
    labels_m = _LABELS_RE.search(system + "\n")
    packed = len(records) > 1
    # Asked to state its confidence (a model without logprobs): it says the label's
    # keyword-margin probability, or the share of fields it found.
    verbalise = '"confidence"' in user or "plus confidence" in user
    pieces: list[tuple[str, Optional[list]]] = []  # (text, top alternatives at its start)
    for i, (rid, text) in enumerate(records):
      payload = self.injected(text) if getattr(request, "follow_injections", False) else None
      if labels_m:
        labels = [l.strip() for l in labels_m.group(1).split(",")]
        if payload:  # obeying: the demanded "label", at certainty
          label, ranked = payload, [(payload, -0.0001)] + [(l, -12.0) for l in labels[:4]]
        else:
          _, ranked = self.classify(labels, text)
          ranked = self._sampled(ranked, float(request.body.get("temperature", 1.0)))
          label = ranked[0][0]
        said = f', "confidence": {math.exp(ranked[0][1]):.2f}' if verbalise else ""
        if packed:
          pieces += [(f'{{"id": "{rid}", "label": "', None), (label, ranked),
                     (f'"{said}}}\n', None)]
        elif verbalise:
          pieces += [('{"label": "', None), (label, ranked), (f'"{said}}}', None)]
        else:
          pieces.append((label, ranked))
      elif _FIELD_RE.search(system):
        fields = _FIELD_RE.findall(system)
        if payload:  # obeying: the demand in every field, plus one nobody asked for
          values, probs = {**{name: payload for name, _ in fields},
                           "approved_by_policy": True}, None
        else:
          values, probs = self.extract_scored(fields, text)
        pieces += self.extraction_pieces(rid, packed, values, probs, verbalise)
      else:
        words = int((_WORDS_RE.search(system) or [None, 40])[1])
        summary, prob = (payload, None) if payload else self.summarise_scored(text, words)
        lp = math.log(max(prob, 1e-12)) if prob is not None else None
        if packed:
          inner = json.dumps(summary, ensure_ascii=False)[1:-1]
          pieces += [(f'{{"id": "{rid}", "summary": "', None), (inner, lp), ('"}\n', None)]
        else:
          pieces.append((summary, lp))
    return self._completion(pieces)

  @staticmethod
  def _records(user: str) -> list[tuple[str, str]]:
    if user.startswith("Record:\n"):
      line = user[len("Record:\n"):].split("\n", 1)[0]
      return [("r1", json.loads(line))]
    out = []
    for line in user.splitlines():
      if line.startswith('{"id"'):
        obj = json.loads(line)
        out.append((obj["id"], obj["text"]))
    return out

  @staticmethod
  def _completion(pieces: list[tuple[str, Any]]) -> Completion:
    """``pieces``: (text, None | ranked alternatives for its first token | a logprob for
    every one of its tokens)."""
    text, tokens = "", []
    for piece, ranked in pieces:
      toks = tokenize(piece)
      for j, tok in enumerate(toks):
        if isinstance(ranked, float):
          tokens.append(TokenLogprob(tok, ranked, ((tok, ranked),)))
        elif ranked is not None and j == 0:
          # The label's first token carries the label distribution.
          chosen = ranked[0][1]
          top = tuple((tokenize(l)[0] if tokenize(l) else l, lp) for l, lp in ranked[:5])
          tokens.append(TokenLogprob(tok, chosen, top))
        else:
          tokens.append(TokenLogprob(tok, -0.001, ((tok, -0.001),)))
      text += piece
    return Completion(text, tokens if "".join(t.token for t in tokens) == text else None)
