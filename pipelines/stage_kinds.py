"""Stage kinds: what a classify, extract or summarise stage asks, how it reads answers,
how sure it is, and what it writes. Adding a kind means adding a class here.

Each kind owns:

* its instructions and answer formats (``task``), and the output allowance per
  record (``output_tokens_per_record``);
* reading one record's answer (``parse``; bare single answers in ``parse_single``)
  and its uncertainty (``confidence`` in [0, 1], ``signal`` says which):

  - classify, ``logprob``: the probability of the label the model produced =
    exp(sum of the logprobs of the tokens spelling it); ``verbalised`` when the
    endpoint has no logprobs: the model's own stated confidence (known to be
    overconfident; calibrate before trusting it).
  - extract: per field, the geometric-mean token probability of its value
    (``logprob``) times a grounding factor (1 if a free-text string value
    occurs in the text, or its digits do; 0.5 if not; enum values are not
    checked); the record's confidence is the minimum over fields; a value that
    violates the field's type, enum or pattern is nulled and the record's
    confidence is 0. Without logprobs the signal is ``checks``: grounding and
    validity only.
  - summarise: an invalid answer if empty or over ``max_words``; else grounding (share of the
    summary's content words found in the text, saturating at 60%) times the
    geometric-mean token probability when logprobs exist.

* its output columns (``output_fields``, Avro) and their values (``outputs``),
  the text of an answer for the ledger (``answer_text``), and whether an answer
  matches a label (``matches``, for calibration and the report), which label columns
  an answer gives when it is the reference (``reference_columns``, calibrating against
  the frontier), or why it cannot be scored (``unscored_reason``); and whether a learned
  router is fitted for it (``learned_router``).

Whatever a model says, the output schema is fixed by the config: a label
outside the label set, an extraction field not configured, or a summary over
its word limit is a failure or dropped, never written as given.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from typing import Any, ClassVar, Mapping, Optional, Sequence

from tierflow.connectors.llm_clients import ModelReply, TokenInfo
from tierflow.pipelines.answers import (WORD, Answer, gm_prob, grounded, grounded_number,
                                        json_objects, seq_prob, span_tokens, value_span,
                                        verbalised)

__all__ = ["Classify", "Extract", "KINDS", "StageKind", "Summarise", "as_object", "kind_of",
           "normalised", "output_columns"]

_STOP = frozenset(
    "the a an and or of to in on for with is are was were be been it this that at by from as "
    "i we you my our your me us they their he she his her not no yes but so if".split())
_AVRO_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FIELD_TYPES = {"string": "string", "number": "double", "integer": "long", "boolean": "boolean"}


def _content_words(text: str) -> list[str]:
  """A summary's words that carry content: not stop words, longer than two letters."""
  return [w for w in WORD.findall(text.casefold()) if w not in _STOP and len(w) > 2]


class StageKind:
  """Base of the stage kinds; ``stage`` is the stage's ``StageConfig``."""

  kind: ClassVar[str] = ""
  # the column holding the answer of the first stage of this kind (``StageConfig.output``)
  default_output: ClassVar[str] = ""
  # How many alternatives per token to ask for (None: the model's configured number).
  alternatives: ClassVar[Optional[int]] = 1

  def __init__(self, stage):
    self.stage = stage

  # --- config -----------------------------------------------------------------
  @classmethod
  def check(cls, stage) -> None:
    """Raises ValueError for a stage config this kind cannot run."""

  def refuse_injected(self, answer: Answer, instruction: str, rest: str) -> Answer:
    """The answer, or a refusal when it repeats ``instruction`` (text in the record
    addressed to a model) instead of ``rest`` (the record without it); see
    ``injection``. Labels are kept: the label set bounds them."""
    return answer

  def output_tokens_per_record(self) -> int:
    raise NotImplementedError

  # --- prompting ----------------------------------------------------------------
  def task(self, verbalise: bool) -> tuple[str, str, str]:
    """(task description, single-record answer format, packed answer format)."""
    raise NotImplementedError

  def example_problem(self, answer: Any) -> Optional[str]:
    """What is wrong with a configured example's answer, or None."""
    return None

  def answer_schema(self, verbalise: bool) -> Optional[dict]:
    """The JSON schema of a single record's answer, for endpoints with structured output
    (``response_format: json_schema``; llama.cpp and vLLM turn it into a grammar), or
    None where the answer is free text or read bare."""
    return None

  # --- reading answers -----------------------------------------------------------
  def parse(self, obj: Any, span: tuple[int, int], reply: ModelReply, offsets,
            source: str, bare: bool) -> Answer:
    """One record's answer from its parsed JSON object (or, ``bare``, the raw text span)."""
    raise NotImplementedError

  def parse_single(self, reply: ModelReply, offsets, source: str, truncated: str) -> Answer:
    """The answer of a request that carried one record (answered bare or as JSON)."""
    text = reply.text
    a, b = len(text) - len(text.lstrip()), len(text.rstrip())
    obj = None
    if text.lstrip().startswith("{"):
      objects = json_objects(text)
      if objects and isinstance(objects[0][2], Mapping) and self._is_answer_object(
          objects[0][2]):
        a, b, obj = objects[0]
    return self.parse(obj if obj is not None else {}, (a, b), reply, offsets, source,
                      bare=obj is None)

  def _is_answer_object(self, obj: Mapping) -> bool:
    return True

  # --- writing ---------------------------------------------------------------------
  @property
  def output(self) -> str:
    """The column holding this stage's answer (its confidence: ``<output>_confidence``)."""
    return self.stage.output or self.default_output

  def output_fields(self) -> list[dict]:
    """Avro fields of this stage's output columns (nullable: a failed stage writes null)."""
    return [
        {"name": self.output, "type": ["null", self.output_type()], "default": None,
         "doc": f"{self.stage.name} stage output"},
        {"name": f"{self.output}_confidence", "type": ["null", "double"], "default": None,
         "doc": "the small tier's confidence, where its answer was kept"},
    ]

  def output_type(self) -> Any:
    return "string"

  def outputs(self, value: Any, confidence: Optional[float]) -> dict:
    return {self.output: self.column_value(value), f"{self.output}_confidence": confidence}

  def column_value(self, value: Any) -> Any:
    return value

  def answer_text(self, value: Any) -> Optional[str]:
    """An answer as text for the ledger (``small_answer``)."""
    return None if value is None else str(value)

  def field_confidence_text(self, value: Any) -> Optional[str]:
    """Per-field confidences as JSON for the ledger (``small_field_confidence``), or None."""
    return None

  # --- self-consistency (several samples of one record: ``pipelines/agreement``) ------
  def agreement(self, a: Any, b: Any) -> float:
    """How far two answers to one record agree, 0..1 (1: the same answer)."""
    return 1.0 if self.answer_text(a) == self.answer_text(b) else 0.0

  def consistent(self, kept: Any, confidence: float, share: float,
                 values: Sequence[Any], k: int) -> tuple[Any, float]:
    """The kept answer and its confidence, given ``share`` (the ``k`` samples' agreement
    with it, 0..1) and the valid samples' ``values`` (``kept`` among them)."""
    return kept, confidence * share

  # --- scoring against labels (calibration and the report) ---------------------------
  scored: ClassVar[bool] = True  # exact-match scoring applies to this kind
  # why it does not (a stage of this kind is then neither scored nor calibrated)
  unscored_reason: ClassVar[str] = ""
  # a learned router (``tierflow.learned_router``: features of the answer) is fitted for
  # this kind's stages by ``tierflow calibrate --router logistic``
  learned_router: ClassVar[bool] = False

  @classmethod
  def default_label_fields(cls, stage_name: str, label_columns: set, answers) -> list[str]:
    """The label columns a stage is scored against when none are given."""
    return []

  @classmethod
  def labelled(cls, reference: Optional[Mapping], fields: list) -> bool:
    """Whether a reference row labels this stage."""
    return reference is not None

  @classmethod
  def matches(cls, answer: Any, reference: Mapping, fields: list) -> bool:
    """Exact match (whitespace/case-normalised) of one answer against its reference."""
    raise NotImplementedError

  @classmethod
  def reference_columns(cls, stage_name: str, answer: Any) -> dict:
    """The label columns an answer (its output column's value) gives when it is the
    reference (``tierflow calibrate --reference frontier``); what ``default_label_fields``
    and ``matches`` read back."""
    raise NotImplementedError


def normalised(value: Any) -> Any:
  """A value as compared in scoring: trimmed and case-folded text, numbers to 9 decimals."""
  if isinstance(value, bool) or value is None:
    return value
  if isinstance(value, (int, float)):
    return round(float(value), 9)
  if isinstance(value, str):
    return " ".join(value.split()).casefold()
  return json.dumps(value, sort_keys=True)


def as_object(value: Any) -> Optional[dict]:
  """An extraction as a dict: a struct column value, or a JSON string (the ledger)."""
  if isinstance(value, dict):
    return value
  if not isinstance(value, str):
    return None
  try:
    obj = json.loads(value)
  except json.JSONDecodeError:
    return None
  return obj if isinstance(obj, dict) else None


class Classify(StageKind):
  """One label out of a configured set."""

  kind = "classify"
  default_output = "label"
  alternatives = None  # reads the first token's alternatives when an answer strays
  learned_router = True

  @classmethod
  def check(cls, stage) -> None:
    if len(stage.labels) < 2:
      raise ValueError(f"stage {stage.name}: a classify stage needs at least two labels")

  def output_tokens_per_record(self) -> int:
    # A packed line is {"id": "r12", "label": "..."}: ~13 tokens of framing.
    return 16 + max(len(label) for label in self.stage.labels) // 2

  def task(self, verbalise: bool) -> tuple[str, str, str]:
    conf = ', "confidence": <0..1, how sure you are>' if verbalise else ""
    labels = ", ".join(self.stage.labels)
    return (f"Classify the record into exactly one of these labels: {labels}.",
            ("Answer with the label only." if not verbalise else
             f'Answer with one JSON object: {{"label": "<label>"{conf}}}.'),
            f'{{"id": "<id>", "label": "<label>"{conf}}}')

  def _is_answer_object(self, obj: Mapping) -> bool:
    return "label" in obj

  def example_problem(self, answer: Any) -> Optional[str]:
    if answer not in self.stage.labels:
      return f"answer {answer!r} is not one of the labels"
    return None

  def _check_label(self, label: Any) -> tuple[Optional[str], Optional[str]]:
    if not isinstance(label, str):
      return None, f"label is {type(label).__name__}, not a string"
    canon = {l.casefold(): l for l in self.stage.labels}
    key = label.strip().strip("\"'`.").casefold()
    if key not in canon:
      return None, f"label {label[:40]!r} is not in the label set"
    return canon[key], None

  def _first_token_label(self, first: TokenInfo) -> tuple[Optional[str], float]:
    """(most probable label, its probability) from the first generated token's
    alternatives (top_logprobs include the chosen token): an alternative counts
    for every label that starts with it."""
    labels = self.stage.labels
    mass = {label: 0.0 for label in labels}
    for token, logprob in (first.top or ((first.token, first.logprob),)):
      t = token.strip().casefold()
      for label in labels if t else ():
        if label.casefold().startswith(t):
          mass[label] += math.exp(logprob)
    best = max(mass, key=mass.get)
    return (best, min(1.0, mass[best])) if mass[best] > 0 else (None, 0.0)

  def parse(self, obj, span, reply, offsets, source, bare) -> Answer:
    text = reply.text
    a, b = span
    if bare:
      raw = text[a:b]
      label, err = self._check_label(raw)
      found = (a + len(raw) - len(raw.lstrip()), b)
      if err:  # a bare answer may still carry the label in a sentence
        hits = [(m.start(), l) for l in self.stage.labels
                for m in [re.search(rf"\b{re.escape(l)}\b", raw, re.IGNORECASE)] if m]
        if len({l for _, l in hits}) == 1:
          pos, label = hits[0]
          err, found = None, (a + pos, a + pos + len(label))
      if err and reply.tokens:
        # The answer strays from the label set ("I think this is about ..."):
        # read the label distribution off the first token's alternatives.
        label, p = self._first_token_label(reply.tokens[0])
        if label is not None:
          return Answer(label, p, "logprob", ("label from first-token alternatives",),
                        answer_chars=b - a)
      conf_obj = {}
    else:
      label, err = self._check_label(obj.get("label"))
      found = value_span(text, a, b, "label", obj.get("label"))
      conf_obj = obj
    if err:
      return Answer(error=f"invalid_answer: {err}", answer_chars=b - a)
    p = seq_prob(span_tokens(reply, offsets, *found))
    if p is not None:
      return Answer(label, p, "logprob", answer_chars=b - a)
    return Answer(label, verbalised(conf_obj), "verbalised", answer_chars=b - a)

  @classmethod
  def default_label_fields(cls, stage_name, label_columns, answers) -> list[str]:
    return [c for c in (stage_name, "category", "label") if c in label_columns][:1]

  @classmethod
  def labelled(cls, reference, fields) -> bool:
    return reference is not None and reference.get(fields[0]) is not None

  @classmethod
  def matches(cls, answer, reference, fields) -> bool:
    return answer is not None and normalised(answer) == normalised(reference.get(fields[0]))

  @classmethod
  def reference_columns(cls, stage_name, answer) -> dict:
    return {} if answer is None else {stage_name: answer}


class Extract(StageKind):
  """Configured fields, each typed (string, number, integer, boolean), with optional
  enum and pattern; written as a struct column with those types."""

  kind = "extract"
  default_output = "extraction"
  learned_router = True

  @classmethod
  def check(cls, stage) -> None:
    if not stage.fields:
      raise ValueError(f"stage {stage.name}: an extract stage needs fields")
    for name in stage.fields:
      if not _AVRO_NAME.fullmatch(str(name)):
        raise ValueError(f"stage {stage.name}: field name {name!r} must be letters, digits "
                         "and underscores, not starting with a digit")

  def output_tokens_per_record(self) -> int:
    return 24 + 24 * len(self.stage.fields)

  def refuse_injected(self, answer: Answer, instruction: str, rest: str) -> Answer:
    """Drops string fields found only in the instruction; refuses the answer if that
    leaves no field."""
    if not isinstance(answer.value, dict):
      return answer
    fields = dict(answer.value.get("fields") or {})
    confidence = dict(answer.value.get("field_confidence") or {})
    dropped = [name for name, v in fields.items()
               if isinstance(v, str) and grounded(v, instruction) and not grounded(v, rest)]
    if not dropped:
      return answer
    for name in dropped:
      fields[name], confidence[name] = None, 0.0
    note = f"dropped {', '.join(dropped)}: found only in an instruction in the record"
    if all(v is None for v in fields.values()):
      return Answer(error=f"injected_answer: {note}", answer_chars=answer.answer_chars)
    return dataclasses.replace(
        answer, value={**answer.value, "fields": fields, "field_confidence": confidence},
        confidence=0.0, notes=(*answer.notes, note))

  _JSON_TYPES = {"string": "string", "number": "number", "integer": "integer",
                 "boolean": "boolean"}

  def example_problem(self, answer: Any) -> Optional[str]:
    if not isinstance(answer, Mapping):
      return "answer must be a mapping of field values"
    extra = sorted(set(answer) - set(self.stage.fields))
    return f"answer has fields the stage does not: {extra}" if extra else None

  def answer_schema(self, verbalise: bool) -> Optional[dict]:
    props = {}
    for name, spec in self.stage.fields.items():
      prop: dict = {"type": [self._JSON_TYPES[spec.type], "null"]}
      if spec.enum:
        prop["enum"] = [*spec.enum, None]
      props[name] = prop
    if verbalise:
      props["confidence"] = {"type": "number"}
    return {"type": "object", "properties": props, "required": list(props),
            "additionalProperties": False}

  def _field_lines(self) -> str:
    lines = []
    for name, spec in self.stage.fields.items():
      extra = []
      if spec.enum:
        extra.append("one of " + ", ".join(map(str, spec.enum)))
      if spec.description:
        extra.append(spec.description)
      lines.append(f'- "{name}" ({spec.type} or null){": " + "; ".join(extra) if extra else ""}')
    return "\n".join(lines)

  def task(self, verbalise: bool) -> tuple[str, str, str]:
    return ("Extract these fields from the record; use null when a field is not stated:\n"
            + self._field_lines(),
            f"Answer with one JSON object with exactly these keys"
            f"{' plus confidence (0..1, how sure you are)' if verbalise else ''}.",
            '{"id": "<id>", "fields": {<the keys above>}'
            + (', "confidence": <0..1, how sure you are>}' if verbalise else '}'))

  def parse_single(self, reply, offsets, source, truncated) -> Answer:
    # Extractions may come wrapped in prose: take the first JSON object anywhere.
    objects = json_objects(reply.text)
    if not objects or not isinstance(objects[0][2], Mapping):
      return Answer(error=f"invalid_answer: no JSON object in the answer{truncated}",
                    answer_chars=len(reply.text))
    a, b, obj = objects[0]
    return self.parse(obj, (a, b), reply, offsets, source, bare=False)

  def _check_fields(self, fields: Any, source: str
                    ) -> tuple[Optional[dict], list[str], dict[str, float]]:
    """Validated fields (None if not an object), notes, grounding factor per field."""
    if not isinstance(fields, Mapping):
      return None, ["extraction is not a JSON object"], {}
    out, notes, grounding = {}, [], {}
    extra = sorted(set(fields) - set(self.stage.fields) - {"id", "confidence"})
    if extra:
      notes.append(f"dropped unconfigured field(s): {', '.join(extra)[:80]}")
    for name, spec in self.stage.fields.items():
      value = fields.get(name)
      grounding[name] = 1.0
      if value is None:
        out[name] = None
        continue
      kind = spec.type
      ok = {"string": isinstance(value, str),
            "number": isinstance(value, (int, float)) and not isinstance(value, bool),
            "integer": isinstance(value, int) and not isinstance(value, bool),
            "boolean": isinstance(value, bool)}.get(kind, True)
      if ok and kind == "number" and not math.isfinite(value):
        ok = False
      if ok and kind == "string" and spec.pattern and not re.fullmatch(spec.pattern, value):
        ok = False
      if ok and spec.enum and value not in spec.enum:
        ok = False
      if not ok:
        notes.append(f"invalid {name}: {str(value)[:40]!r}")
        out[name] = None
        grounding[name] = 0.0
        continue
      out[name] = float(value) if kind == "number" else value
      if ((isinstance(value, str) and not spec.enum and not grounded(value, source))
          or (kind in ("number", "integer") and not grounded_number(float(value), source))):
        grounding[name] = 0.5
        notes.append(f"{name} not found in the text")
    return out, notes, grounding

  def parse(self, obj, span, reply, offsets, source, bare) -> Answer:
    a, b = span
    fields = obj.get("fields", obj) if isinstance(obj, Mapping) else obj
    values, notes, grounding = self._check_fields(fields, source)
    if values is None:
      return Answer(error="invalid_answer: " + "; ".join(notes), answer_chars=b - a)
    per_field = {}
    for name in values:
      g = grounding[name]
      if g == 0.0:
        per_field[name] = 0.0
        continue
      p = gm_prob(span_tokens(reply, offsets,
                              *value_span(reply.text, a, b, name, fields.get(name))))
      per_field[name] = g * (p if p is not None else 1.0)
    conf = min(per_field.values()) if per_field else 0.0
    signal = "logprob" if offsets is not None else "checks"
    said = verbalised(fields)
    if said is None and isinstance(obj, Mapping) and obj is not fields:
      said = verbalised(obj)  # packed: {"id", "fields", "confidence"}
    if signal == "checks" and said is not None:
      conf = min(conf, said)
    return Answer({"fields": values, "field_confidence": per_field}, conf, signal,
                  tuple(notes), answer_chars=b - a)

  def output_type(self) -> Any:
    return {"type": "record", "name": f"{self.stage.name.title().replace('_', '')}Fields",
            "fields": [{"name": name, "type": ["null", _FIELD_TYPES[spec.type]], "default": None}
                       for name, spec in self.stage.fields.items()]}

  def column_value(self, value: Any) -> Any:
    return None if value is None else dict(value.get("fields") or {})

  def answer_text(self, value: Any) -> Optional[str]:
    if value is None:
      return None
    return json.dumps(value.get("fields"), ensure_ascii=False, sort_keys=True)

  def field_confidence_text(self, value: Any) -> Optional[str]:
    if value is None or value.get("field_confidence") is None:
      return None
    return json.dumps(value["field_confidence"], sort_keys=True)

  def agreement(self, a: Any, b: Any) -> float:
    """The share of the configured fields on which two extractions agree."""
    fa, fb = (v.get("fields") or {} if v else {} for v in (a, b))
    names = list(self.stage.fields)
    return sum(fa.get(n) == fb.get(n) for n in names) / max(1, len(names))

  def consistent(self, kept, confidence, share, values, k):
    """Per field: its confidence times the share of samples giving the same value; the
    answer's: the least of those, and at most its own confidence times ``share``."""
    fields, per_field = kept.get("fields") or {}, kept.get("field_confidence") or {}
    agreed = {}
    for name, p in per_field.items():
      same = sum((v.get("fields") or {}).get(name) == fields.get(name) for v in values)
      agreed[name] = p * same / k
    conf = confidence * share
    if agreed:
      conf = min(conf, min(agreed.values()))
    return {**kept, "field_confidence": agreed}, conf

  @classmethod
  def default_label_fields(cls, stage_name, label_columns, answers) -> list[str]:
    keys: set = set()
    for answer in answers:
      keys |= set(as_object(answer) or {})
    return sorted(k for k in keys if k in label_columns)

  @classmethod
  def matches(cls, answer, reference, fields) -> bool:
    obj = as_object(answer)
    return obj is not None and all(
        normalised(obj.get(f)) == normalised(reference.get(f)) for f in fields)

  @classmethod
  def reference_columns(cls, stage_name, answer) -> dict:
    return dict(as_object(answer) or {})


class Summarise(StageKind):
  """One sentence of at most ``max_words`` words."""

  kind = "summarise"
  default_output = "summary"
  scored = False
  unscored_reason = "free text has no exact reference"

  @classmethod
  def check(cls, stage) -> None:
    if stage.max_words < 1:
      raise ValueError(f"stage {stage.name}: max_words must be >= 1")

  def output_tokens_per_record(self) -> int:
    return 16 + 2 * self.stage.max_words

  def refuse_injected(self, answer: Answer, instruction: str, rest: str) -> Answer:
    """Refuses a summary whose content words come from the instruction."""
    from tierflow.pipelines.injection import echoes
    if isinstance(answer.value, str) and echoes(answer.value, instruction, rest):
      return Answer(error="injected_answer: the summary repeats an instruction written in "
                          "the record, not what the record says",
                    answer_chars=answer.answer_chars)
    return answer

  def task(self, verbalise: bool) -> tuple[str, str, str]:
    return (f"Summarise the record in one sentence of at most {self.stage.max_words} words.",
            "Answer with the summary only.",
            '{"id": "<id>", "summary": "<summary>"}')

  def example_problem(self, answer: Any) -> Optional[str]:
    if not isinstance(answer, str) or not answer.strip():
      return "answer must be the summary text"
    if len(answer.split()) > self.stage.max_words:
      return f"answer is over max_words ({self.stage.max_words})"
    return None

  def _is_answer_object(self, obj: Mapping) -> bool:
    # A summary that quotes JSON from the record is still a summary.
    return isinstance(obj.get("summary"), str)

  def parse_single(self, reply, offsets, source, truncated) -> Answer:
    if truncated:
      return Answer(error=f"invalid_answer: summary cut off{truncated}",
                    answer_chars=len(reply.text))
    return super().parse_single(reply, offsets, source, truncated)

  def _score(self, summary: Any, source: str) -> tuple[Optional[str], float, list[str]]:
    if not isinstance(summary, str) or not summary.strip():
      return None, 0.0, ["empty summary"]
    summary = summary.strip().strip('"').strip()
    words = summary.split()
    if len(words) > self.stage.max_words:  # an invalid answer, from either tier
      return None, 0.0, [f"{len(words)} words, over the {self.stage.max_words}-word limit"]
    content = _content_words(summary)
    if not content:
      return summary, 0.0, ["summary has no content words"]
    src = set(WORD.findall(source.casefold()))
    overlap = sum(w in src for w in content) / len(content)
    return summary, min(1.0, overlap / 0.6), [f"grounding {overlap:.2f}"]

  def agreement(self, a: Any, b: Any) -> float:
    """Two summaries' overlap: F1 of their content words (ROUGE-1 without stop words)."""
    wa, wb = (collections.Counter(_content_words(v or "")) for v in (a, b))
    common = sum((wa & wb).values())
    if not common:
      return 0.0
    return 2 * common / (sum(wa.values()) + sum(wb.values()))

  def parse(self, obj, span, reply, offsets, source, bare) -> Answer:
    a, b = span
    raw = reply.text[a:b] if bare else (obj.get("summary") if isinstance(obj, Mapping)
                                        else None)
    summary, score, notes = self._score(raw, source)
    if summary is None:
      return Answer(error="invalid_answer: " + "; ".join(notes), answer_chars=b - a)
    # The summary's own tokens, not the JSON framing around it (which a model writes at
    # near-certainty and would pull a packed answer's mean towards 1).
    found = (a, b) if bare else value_span(reply.text, a, b, "summary", raw)
    p = gm_prob(span_tokens(reply, offsets, *found))
    conf = score * (p if p is not None else 1.0)
    return Answer(summary, conf, "logprob" if p is not None else "checks", tuple(notes),
                  answer_chars=b - a)


KINDS: dict[str, type[StageKind]] = {k.kind: k for k in (Classify, Extract, Summarise)}


def output_columns(stages: Sequence) -> list[str]:
  """The column each of ``stages`` (in order; each with ``name``, ``kind`` and ``output``)
  writes its answer to: its ``output`` when set, else its kind's ``default_output`` for the
  first stage of a kind and its name for the others."""
  out, seen = [], set()
  for s in stages:
    first = s.kind in KINDS and s.kind not in seen
    out.append(s.output or (KINDS[s.kind].default_output if first else s.name))
    seen.add(s.kind)
  return out


def kind_of(stage) -> StageKind:
  """The kind object for a stage config."""
  try:
    return KINDS[stage.kind](stage)
  except KeyError:
    raise ValueError(f"stage {stage.name}: kind must be one of {', '.join(KINDS)}") from None
