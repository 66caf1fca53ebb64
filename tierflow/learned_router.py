"""A learned escalation score for a classify or extract stage, fitted on labelled data.

The small tier's confidence is one number per answer, and how far it can be trusted
often depends on the answer itself (a model sure of "sport" is right more often than
one sure of "business"; an extraction that left the destination null is wrong more often
than one that found it). ``LearnedRouter`` turns (confidence, answer) into an estimated
probability that the answer is right: a logistic regression over ``confidence``,
``log(1 - confidence)``, the answer's categories (``answer_key``: a classify answer's
label; an extraction's null fields) and, for an extraction, ``log(1 - confidence)`` of each
field (the ledger's ``small_field_confidence``), fitted with L2 regularisation by Newton's
method (numpy only). The calibrated threshold then applies to this score instead of the
confidence (``tierflow calibrate --router logistic``).

Cross-fitting keeps every score out of sample: the labelled records are split in two
halves by a hash of their features, a model is fitted on each half, and each record is
scored by the model fitted on the other half; the threshold is certified on those 500
(say) out-of-sample scores, and a new record is scored by the model of its own half.
Neither model ever scores a record it was fitted on. The certification then tests scores
whose function depends on the calibration labels through the other half, which
Learn-then-Test's exact argument does not cover: the guarantee is checked by simulation
(``tests/test_learned_router.py``) and by the routing benchmark's i.i.d. draws, not
proven.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

__all__ = ["KINDS", "LearnedRouter", "answer_key", "fit_cross", "half_of", "ledger_answer"]

KINDS = ("logistic",)
MIN_EACH = 10  # right and wrong answers each half needs for a fit worth having


_VALUE_KEYS = {"fields", "field_confidence"}  # an extraction's answer value


def ledger_answer(small_answer: Optional[str], field_confidence: Optional[str]) -> Optional[str]:
  """A router's input from a ledger row: the answer text, with an extraction's per-field
  confidences (``small_field_confidence``) when the ledger holds them."""
  if small_answer is None or field_confidence is None:
    return small_answer
  return json.dumps({"fields": json.loads(small_answer),
                     "field_confidence": json.loads(field_confidence)}, sort_keys=True)


def _value(answer: Any) -> Any:
  if isinstance(answer, str) and answer.startswith("{"):
    try:
      return json.loads(answer)
    except json.JSONDecodeError:
      return None
  return answer


def _fields(answer: Any) -> Optional[Mapping]:
  """An extraction's fields: from the pipeline's answer value ({"fields": ...}), the
  ledger's answer text (the fields as JSON) or ``ledger_answer``; None for any other."""
  answer = _value(answer)
  if not isinstance(answer, Mapping):
    return None
  fields = answer.get("fields") if set(answer) <= _VALUE_KEYS and answer else answer
  return fields if isinstance(fields, Mapping) else None


def _field_confidence(answer: Any) -> Mapping:
  """An extraction's per-field confidences, where the answer carries them ({} if not)."""
  answer = _value(answer)
  if isinstance(answer, Mapping) and set(answer) <= _VALUE_KEYS:
    fc = answer.get("field_confidence")
    if isinstance(fc, Mapping):
      return fc
  return {}


def answer_key(answer: Any) -> tuple:
  """The categories of an answer the router has a weight for: a classify answer's label,
  or an extraction's null fields (``"field=null"``), the same from the pipeline's value and
  from the ledger's text."""
  if answer is None:
    return ()
  fields = _fields(answer)
  if fields is None:
    return (str(answer),)
  return tuple(sorted(f"{name}=null" for name, value in fields.items() if value is None))


def half_of(confidence: float, answer: Any) -> int:
  """0 or 1, a fixed function of a record's features (which model scores it)."""
  key = f"{float(confidence)!r}|{'|'.join(answer_key(answer))}".encode("utf-8")
  return hashlib.blake2b(key, digest_size=8).digest()[0] & 1


def _features(confidence: np.ndarray, answers: Sequence[Any], labels: Sequence[str],
              fields: Sequence[str] = ()) -> np.ndarray:
  """confidence, log(1 - confidence), the answer's categories one-hot and, per field of an
  extraction, log(1 - its confidence) (a field the answer has no confidence for counts as
  certain)."""
  c = np.clip(np.asarray(confidence, dtype=float), 0.0, 1.0)
  col = {label: j for j, label in enumerate(labels)}
  onehot = np.zeros((len(c), len(labels)))
  per_field = np.full((len(c), len(fields)), np.log(1e-6))
  for i, a in enumerate(answers):
    a = _value(a)  # the ledger's JSON text parsed once for both reads below
    for category in answer_key(a):
      j = col.get(category)
      if j is not None:
        onehot[i, j] = 1.0
    fc = _field_confidence(a) if fields else {}
    for j, name in enumerate(fields):
      p = fc.get(name)
      if isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p):
        per_field[i, j] = np.log(max(1.0 - min(max(float(p), 0.0), 1.0), 1e-6))
  return np.column_stack([c, np.log(np.maximum(1.0 - c, 1e-6)), onehot, per_field])


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float) -> dict:
  """L2-regularised logistic regression (intercept unpenalised) on standardised columns."""
  mean = x.mean(axis=0)
  scale = x.std(axis=0)
  scale[scale == 0] = 1.0
  z = np.column_stack([np.ones(len(x)), (x - mean) / scale])
  w = np.zeros(z.shape[1])
  penalty = np.full(z.shape[1], l2)
  penalty[0] = 1e-6
  for _ in range(100):
    p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -30, 30)))
    grad = z.T @ (p - y) + penalty * w
    hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty)
    step = np.linalg.solve(hess, grad)
    w -= step
    if np.max(np.abs(step)) < 1e-10:
      break
  return {"intercept": float(w[0]), "coef": [float(v) for v in w[1:]],
          "mean": [float(v) for v in mean], "scale": [float(v) for v in scale]}


def _apply(model: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
  z = (x - np.asarray(model["mean"])) / np.asarray(model["scale"])
  return 1.0 / (1.0 + np.exp(-np.clip(model["intercept"] + z @ np.asarray(model["coef"]),
                                      -30, 30)))


@dataclasses.dataclass(frozen=True)
class LearnedRouter:
  """Two cross-fitted models; ``models[h]`` scores the records of half ``h``."""
  labels: tuple  # the answer categories with a weight (``answer_key``: labels, "field=null")
  models: tuple
  n_fit: tuple
  kind: str = "logistic"
  l2: float = 1.0
  fields: tuple = ()  # extraction fields whose own confidence is a feature

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown router kind {self.kind!r}; expected one of {KINDS}")
    if len(self.models) != 2 or len(self.n_fit) != 2:
      raise ValueError("a learned router holds exactly two cross-fitted models")
    width = 2 + len(self.labels) + len(self.fields)
    for m in self.models:
      if not isinstance(m, Mapping) or set(m) != {"intercept", "coef", "mean", "scale"}:
        raise ValueError("each router model needs intercept, coef, mean and scale")
      if not (len(m["coef"]) == len(m["mean"]) == len(m["scale"]) == width):
        raise ValueError(f"router model width {len(m['coef'])} does not match its "
                         f"{len(self.labels)} labels and {len(self.fields)} fields "
                         f"(expected {width})")
      values = [m["intercept"], *m["coef"], *m["mean"], *m["scale"]]
      if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                 for v in values):
        raise ValueError("router model parameters must be finite numbers")

  def score(self, confidence: float, answer: Any) -> float:
    """Estimated probability that this small-tier answer is right."""
    return float(self.scores([confidence], [answer])[0])

  def scores(self, confidence: Sequence[float], answers: Sequence[Any],
             halves: Optional[np.ndarray] = None) -> np.ndarray:
    """``score`` for many records; ``halves`` (their ``half_of``) may be given when known."""
    c = np.asarray(confidence, dtype=float)
    x = _features(c, answers, self.labels, self.fields)
    half = (np.asarray(halves, dtype=int) if halves is not None else
            np.array([half_of(ci, a) for ci, a in zip(c, answers)], dtype=int))
    return np.where(half == 0, _apply(self.models[0], x), _apply(self.models[1], x))

  def to_dict(self) -> dict:
    d = {"kind": self.kind, "labels": list(self.labels), "l2": self.l2,
         "n_fit": list(self.n_fit), "models": [dict(m) for m in self.models]}
    if self.fields:
      d["fields"] = list(self.fields)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LearnedRouter":
    if not isinstance(d, Mapping):
      raise ValueError(f"a router must be an object, got {type(d).__name__}")
    expected = {"kind", "labels", "l2", "n_fit", "models"}
    if not expected <= set(d) <= expected | {"fields"}:
      raise ValueError(f"bad router fields: missing {sorted(expected - set(d))}, unknown "
                       f"{sorted(set(d) - expected - {'fields'})}")
    fields = d.get("fields", [])
    if not isinstance(fields, list) or not all(isinstance(x, str) for x in fields):
      raise ValueError("router fields must be a list of strings")
    if not isinstance(d["labels"], list) or not all(isinstance(x, str) for x in d["labels"]):
      raise ValueError("router labels must be a list of strings")
    if not isinstance(d["models"], list) or not isinstance(d["n_fit"], list):
      raise ValueError("router models and n_fit must be lists")
    return cls(labels=tuple(d["labels"]), models=tuple(dict(m) for m in d["models"]),
               n_fit=tuple(d["n_fit"]), kind=d["kind"], l2=float(d["l2"]),
               fields=tuple(fields))


def fit_cross(confidence: Sequence[float], answers: Sequence[Any], correct: Sequence[bool], *,
              l2: float = 1.0, min_each: int = MIN_EACH) -> tuple[LearnedRouter, np.ndarray]:
  """Fits the two halves' models; returns the router and every record's out-of-sample
  score (by the model fitted on the other half). ValueError when a half has fewer than
  ``min_each`` right or wrong answers."""
  c = np.clip(np.asarray(confidence, dtype=float), 0.0, 1.0)
  ok = np.asarray(correct, dtype=bool)
  answers = list(answers)
  if not (len(c) == len(ok) == len(answers)):
    raise ValueError("confidence, answers and correct differ in length")
  labels = tuple(sorted({k for a in answers for k in answer_key(a)}))
  fields = tuple(sorted({f for a in answers for f in _field_confidence(a)}))
  x = _features(c, answers, labels, fields)
  half = np.array([half_of(ci, a) for ci, a in zip(c, answers)], dtype=int)
  fitted = []
  for h in (0, 1):
    on = half == h
    right, wrong = int(ok[on].sum()), int((~ok[on]).sum())
    if min(right, wrong) < min_each:
      raise ValueError(f"a learned router needs >= {min_each} right and >= {min_each} wrong "
                       f"small-tier answers in each half of the labels; half {h} has {right} "
                       f"right and {wrong} wrong")
    fitted.append(_fit_logistic(x[on], ok[on].astype(float), l2))
  # models[h] scores half h: the model fitted on the other half.
  router = LearnedRouter(labels=labels, models=(fitted[1], fitted[0]),
                         n_fit=(int((half == 1).sum()), int((half == 0).sum())), l2=l2,
                         fields=fields)
  return router, router.scores(c, answers)
