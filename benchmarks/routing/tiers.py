"""The two tiers of the routing benchmark: real trained classifiers, and a responder serving them.

* small tier: TF-IDF word unigrams + logistic regression, trained on a SMALL labelled set
  (default 100 BBC articles / 500 reviews). Cheap to train and run.
* upper tier: TF-IDF word 1-2 grams + char_wb 2-5 grams + linear SVM with 5-fold sigmoid
  calibration, trained on a much larger labelled set (the rest of the training pool).

Honest framing: the upper tier is stronger for two reasons at once, richer features and
7-12x more training data (default splits); measured, each gives roughly half the gap
(BBC) or the data gives more (fine foods). Neither tier is a language model and the upper
one is not a bigger model in the LLM sense: a gap made by training-set size is not a
model-size gap. ``python -m benchmarks.routing.tiers`` also reports the upper
architecture trained on the small set, to separate the two.

Both tiers see exactly the text the pipeline prompt carries: ``Dataset.texts`` renders
records with the documents template ``"{title}\\n\\n{text}"``, which is what
``build_prompt`` JSON-encodes and ``KeywordStandIn._records`` decodes again.

``ClassifierResponder`` answers tierflow's classify prompts on ``LocalProviderServer``
with these models (label + ranked log-probabilities), packed or not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import threading
import time
from typing import Any, Mapping, Optional, Protocol, Sequence

import numpy as np

from tierflow_local.provider_server import Completion, ProviderRequest
from tierflow_local.standin_model import KeywordStandIn

from benchmarks.routing.datasets import (DEFAULT_SMALL_TRAIN, DEFAULT_UPPER_TRAIN, Dataset,
                                         load_dataset, make_splits)

__all__ = ["Tier", "TextClassifier", "Tiers", "ClassifierResponder", "train_tiers",
           "train_small", "train_upper", "small_estimator", "upper_estimator", "ranked_logprobs",
           "default_sizes", "check_responder", "small_tier_on_pool"]

SMALL_C = 10.0  # LR on ~100 texts: the default C=1 gives near-uniform probabilities
UPPER_C = 0.5
_LOGPROB_FLOOR = 1e-12


class Tier(Protocol):
  """What the benchmark needs from a model tier."""
  name: str
  description: str
  labels: tuple

  def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
    ...


@dataclasses.dataclass
class TextClassifier:
  """A trained scikit-learn text classifier as a tier.

  Attributes:
    name: the model name the provider server answers to (``request.model``).
    description: what it is: features, classifier, training-set size.
    labels: the dataset's label order; ``predict_proba`` columns follow it.
    estimator: fitted scikit-learn pipeline (raw text in).
    train_size: labelled records it was trained on.
    train_seconds: wall time of ``fit``.
  """
  name: str
  description: str
  labels: tuple
  estimator: object
  train_size: int
  train_seconds: float

  def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
    """(n, len(labels)) probabilities in ``labels`` order; labels unseen in training get 0."""
    if len(texts) == 0:
      return np.zeros((0, len(self.labels)))
    proba = self.estimator.predict_proba(list(texts))
    out = np.zeros((len(texts), len(self.labels)))
    col = {label: j for j, label in enumerate(self.labels)}
    for k, cls in enumerate(self.estimator.classes_):
      out[:, col[cls]] = proba[:, k]
    return out

  def predict(self, texts: Sequence[str]) -> list[str]:
    return [self.labels[j] for j in self.predict_proba(texts).argmax(axis=1)]


@dataclasses.dataclass
class Tiers:
  small: TextClassifier
  upper: TextClassifier

  @property
  def models(self) -> dict[str, TextClassifier]:
    return {self.small.name: self.small, self.upper.name: self.upper}

  def responder(self) -> "ClassifierResponder":
    return ClassifierResponder(self.models)


def default_sizes(dataset: Dataset) -> tuple[int, int]:
  """(small, upper) training-set sizes: 100 / 1,200 for bbc, 500 / 3,000 for finefood."""
  return (DEFAULT_SMALL_TRAIN.get(dataset.name, 100),
          DEFAULT_UPPER_TRAIN.get(dataset.name, len(dataset) // 2))


def small_estimator(seed: int = 0, C: float = SMALL_C):
  """TF-IDF (word unigrams, sublinear tf) + logistic regression."""
  from sklearn.feature_extraction.text import TfidfVectorizer
  from sklearn.linear_model import LogisticRegression
  from sklearn.pipeline import make_pipeline
  return make_pipeline(TfidfVectorizer(sublinear_tf=True),
                       LogisticRegression(C=C, max_iter=2000, random_state=seed))


def upper_estimator(seed: int = 0, C: float = UPPER_C, cv: int = 5):
  """TF-IDF word 1-2 grams + char_wb 2-5 grams (min_df 2) + linear SVM, sigmoid-calibrated."""
  from sklearn.calibration import CalibratedClassifierCV
  from sklearn.feature_extraction.text import TfidfVectorizer
  from sklearn.pipeline import make_pipeline, make_union
  from sklearn.svm import LinearSVC
  features = make_union(
      TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2),
      TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2))
  return make_pipeline(features, CalibratedClassifierCV(LinearSVC(C=C, random_state=seed),
                                                        cv=cv, method="sigmoid"))


def _fit(estimator, dataset: Dataset, idx: Sequence[int]) -> tuple[object, float]:
  idx = np.asarray(idx, dtype=int)
  if len(idx) == 0:
    raise ValueError("empty training set")
  start = time.perf_counter()
  estimator.fit(dataset.texts(idx), dataset.gold_at(idx))
  return estimator, time.perf_counter() - start


def _n_features(estimator) -> int:
  first = estimator.steps[0][1]
  parts = [t for _, t in first.transformer_list] if hasattr(first, "transformer_list") else [first]
  return sum(len(p.vocabulary_) for p in parts)


def train_small(dataset: Dataset, idx: Sequence[int], seed: int = 0, *, C: float = SMALL_C,
                name: Optional[str] = None) -> TextClassifier:
  """The small tier on ``dataset`` records ``idx``."""
  est, secs = _fit(small_estimator(seed, C), dataset, idx)
  desc = (f"small tier: TF-IDF word unigrams (sublinear tf, {_n_features(est):,} terms) + "
          f"logistic regression (C={C:g}), trained on {len(idx):,} labelled {dataset.name} records")
  return TextClassifier(name or f"{dataset.name}-small-tfidf-lr", desc, dataset.labels, est,
                        len(idx), secs)


def train_upper(dataset: Dataset, idx: Sequence[int], seed: int = 0, *, C: float = UPPER_C,
                name: Optional[str] = None, small_size: Optional[int] = None) -> TextClassifier:
  """The upper tier on ``dataset`` records ``idx``."""
  counts = dataset.label_counts(idx)
  cv = max(2, min(5, min(c for c in counts.values() if c > 0)))
  est, secs = _fit(upper_estimator(seed, C, cv), dataset, idx)
  ratio = (f" ({len(idx) / small_size:.0f}x the small tier's; part of the gap between the tiers "
           f"is this training data, not model size)" if small_size else "")
  desc = (f"upper tier: TF-IDF word 1-2 grams + char_wb 2-5 grams (min_df 2, "
          f"{_n_features(est):,} features) + linear SVM (C={C:g}) with {cv}-fold sigmoid "
          f"calibration, trained on {len(idx):,} labelled {dataset.name} records{ratio}")
  return TextClassifier(name or f"{dataset.name}-upper-tfidf-svm", desc, dataset.labels, est,
                        len(idx), secs)


def train_tiers(dataset: Dataset, small_idx: Sequence[int], upper_idx: Sequence[int],
                seed: int = 0, *, names: Optional[tuple[str, str]] = None) -> Tiers:
  """Trains both tiers; ``names`` = (small, upper) model names, default ``<dataset>-small-...``."""
  small_name, upper_name = names or (None, None)
  small = train_small(dataset, small_idx, seed, name=small_name)
  upper = train_upper(dataset, upper_idx, seed, name=upper_name, small_size=len(small_idx))
  if small.name == upper.name:
    raise ValueError("the two tiers need different model names")
  return Tiers(small, upper)


def small_tier_on_pool(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The routing benchmark's evaluation pool of dataset ``name`` (default splits, ``seed``)
  through its small tier, offline: (label probabilities, text lengths, answer right)."""
  ds = load_dataset(name, dedupe=True)
  parts = make_splits(ds, small_n=None, calib_n=500, test_n=None, seed=seed)
  idx = np.sort(np.concatenate([parts.calib, parts.test]))
  texts = ds.texts(idx)
  proba = train_small(ds, parts.small_train, seed).predict_proba(texts)
  ok = np.array(ds.labels)[proba.argmax(axis=1)] == np.array(ds.gold_at(idx))
  return proba, np.array([len(t) for t in texts]), ok


# --------------------------------------------------------------------------
# Serving them over the provider wire formats


def ranked_logprobs(model_labels: Sequence[str], proba: np.ndarray, labels: Sequence[str]
                    ) -> list[tuple[str, float]]:
  """(label, logprob) for the prompt's ``labels``, best first; the model's distribution is
  restricted to them and renormalised. Every prompt label must be one the model knows."""
  col = {label: j for j, label in enumerate(model_labels)}
  unknown = [label for label in labels if label not in col]
  if unknown:
    raise ValueError(f"prompt label(s) {unknown} unknown to the model (knows {list(model_labels)})")
  p = np.maximum(np.array([proba[col[label]] for label in labels], dtype=float), _LOGPROB_FLOOR)
  p /= p.sum()
  order = sorted(range(len(labels)), key=lambda j: (-p[j], j))
  return [(labels[j], math.log(p[j])) for j in order]


class PerModelStandIn(KeywordStandIn):
  """The keyword stand-in, with a benchmark tier answering for each model name in
  ``models``: a subclass overrides the kind of answer its tiers give and reads the tier of
  the request being answered as ``self.tier`` (None: the keyword stand-in answers)."""

  def __init__(self, models: Mapping[str, Any], **kwargs):
    super().__init__(**kwargs)
    self.models = dict(models)
    self._local = threading.local()  # the server answers on several threads

  @property
  def tier(self) -> Any:
    return getattr(self._local, "model", None)

  def __call__(self, request: ProviderRequest) -> Completion:
    self._local.model = self.models.get(request.model)
    try:
      return super().__call__(request)
    finally:
      self._local.model = None


class ClassifierResponder(PerModelStandIn):
  """Answers classify prompts for ``request.model`` in ``models`` with that model.

  The label is the argmax of ``predict_proba`` and its first token carries the ranked
  log-probabilities, so tierflow's parsed confidence is the model's top probability.
  All records of a (packed) request are scored in one ``predict_proba`` call. Other
  models, and summarise / extract prompts, get ``KeywordStandIn``'s answers.
  """

  def __call__(self, request: ProviderRequest) -> Completion:
    self._local.records = [text for _, text in self._records(request.last_user_text)]
    self._local.proba = None
    try:
      return super().__call__(request)
    finally:
      self._local.records = self._local.proba = None

  def classify(self, labels: list[str], text: str) -> tuple[str, list[tuple[str, float]]]:
    model = self.tier
    if model is None:
      return super().classify(labels, text)
    records = getattr(self._local, "records", None) or []
    cache = getattr(self._local, "proba", None)
    if cache is None and text in records:
      cache = self._local.proba = dict(zip(records, model.predict_proba(records)))
    proba = (cache or {}).get(text)
    if proba is None:
      proba = model.predict_proba([text])[0]
    ranked = ranked_logprobs(model.labels, proba, labels)
    return ranked[0][0], ranked


# --------------------------------------------------------------------------
# Quick check: python -m benchmarks.routing.tiers --dataset bbc|finefood


def _timed_proba(tier: TextClassifier, texts: list[str]) -> tuple[np.ndarray, float]:
  start = time.perf_counter()
  p = tier.predict_proba(texts)
  return p, time.perf_counter() - start


def _confident_halves(proba: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
  order = np.argsort(-proba.max(axis=1), kind="stable")
  half = len(order) // 2
  return float(correct[order[:half]].mean()), float(correct[order[half:]].mean())


def check_responder(tiers: Tiers, texts: Sequence[str], stage_labels: Sequence[str]
                    ) -> list[tuple[str, int, float]]:
  """Asks each tier through LocalProviderServer + the openai SDK, 1 and 4 records per request;
  returns (model, records, max |confidence - top probability|); raises on a label mismatch."""
  import openai

  from tierflow.config import StageConfig
  from tierflow.connectors.llm_clients import ModelReply, TokenInfo
  from tierflow_local.provider_server import LocalProviderServer
  from tierflow.pipelines.prompts import build_prompt, parse_reply
  from tierflow.prices import Usage

  stage = StageConfig(name="classify", kind="classify", labels=tuple(stage_labels))
  out = []
  with LocalProviderServer(tiers.responder(), models=tuple(tiers.models)) as server:
    client = openai.OpenAI(base_url=server.openai_base_url, api_key="local", max_retries=0)
    for name, tier in tiers.models.items():
      for batch in (list(texts[:1]), list(texts[:4])):
        system, user = build_prompt(stage, batch)
        resp = client.chat.completions.create(
            model=name, messages=[{"role": "system", "content": system},
                                  {"role": "user", "content": user}],
            max_tokens=stage.output_tokens_per_record() * len(batch) + 16,
            logprobs=True, top_logprobs=5, temperature=0)
        choice = resp.choices[0]
        tokens = tuple(TokenInfo(t.token, t.logprob, tuple((a.token, a.logprob)
                                                           for a in t.top_logprobs))
                       for t in choice.logprobs.content)
        reply = ModelReply(choice.message.content, tokens, Usage(0, 0), name,
                           choice.finish_reason)
        answers = parse_reply(stage, reply, batch)
        proba = tier.predict_proba(batch)
        want = [tier.labels[j] for j in proba.argmax(axis=1)]
        got = [a.value for a in answers]
        if got != want:
          raise AssertionError(f"{name}: labels {got} != predict_proba argmax {want} "
                               f"({[a.error for a in answers]})")
        diff = max(abs(a.confidence - p.max()) for a, p in zip(answers, proba))
        out.append((name, len(batch), float(diff)))
  return out


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", choices=("bbc", "finefood"), default="bbc")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--cache-dir", default=None)
  parser.add_argument("--small-n", type=int, default=None)
  parser.add_argument("--json", action="store_true", help="print the results as JSON too")
  args = parser.parse_args(argv)

  start = time.perf_counter()
  ds = load_dataset(args.dataset, args.cache_dir)
  load_s = time.perf_counter() - start
  splits = make_splits(ds, small_n=args.small_n, seed=args.seed)
  print(f"dataset: {ds.description}")
  print(f"  {len(ds):,} records, labels {ds.label_counts()}, {ds.duplicates()} exact repeats, "
        f"loaded in {load_s:.1f}s")
  print(f"  splits {splits.sizes()} (seed {args.seed})")

  tiers = train_tiers(ds, splits.small_train, splits.upper_train, args.seed)
  test_texts, gold = ds.texts(splits.test), np.array(ds.gold_at(splits.test))
  result = {"dataset": ds.name, "seed": args.seed, "splits": splits.sizes(), "tiers": {}}
  for tier in (tiers.small, tiers.upper):
    proba, secs = _timed_proba(tier, test_texts)
    pred = np.array(tier.labels)[proba.argmax(axis=1)]
    correct = pred == gold
    top, rest = _confident_halves(proba, correct)
    result["tiers"][tier.name] = row = {
        "description": tier.description, "accuracy": float(correct.mean()),
        "confident_half_accuracy": top, "other_half_accuracy": rest,
        "train_s": tier.train_seconds, "infer_s": secs, "texts_per_s": len(test_texts) / secs}
    print(f"\n{tier.name}: {tier.description}")
    print(f"  test accuracy {row['accuracy']:.3f} (n={len(gold)}); confident half {top:.3f}, "
          f"other half {rest:.3f}")
    print(f"  train {tier.train_seconds:.1f}s, inference {secs:.2f}s "
          f"({row['texts_per_s']:,.0f} texts/s)")

  # The upper architecture on the small tier's training set: the model part of the gap.
  same = train_upper(ds, splits.small_train, args.seed, name="upper-arch-on-small-set")
  same_acc = float((np.array(same.predict(test_texts)) == gold).mean())
  result["upper_arch_on_small_set_accuracy"] = same_acc
  print(f"\nupper architecture trained on the small tier's {len(splits.small_train)} records: "
        f"accuracy {same_acc:.3f} (the rest of the gap is training data)")

  # A preview of the cascade: the small tier keeps its confident half, the upper tier gets the rest.
  small_p, upper_p = tiers.small.predict_proba(test_texts), tiers.upper.predict_proba(test_texts)
  keep = small_p.max(axis=1) >= np.median(small_p.max(axis=1))
  final = np.where(keep, small_p.argmax(axis=1), upper_p.argmax(axis=1))
  cascade = float((np.array(ds.labels)[final] == gold).mean())
  result["cascade_median_split"] = {"accuracy": cascade, "escalated": float(1 - keep.mean())}
  print(f"cascade preview (escalate below the small tier's median confidence, "
        f"{1 - keep.mean():.0%} escalated): accuracy {cascade:.3f}")

  start = time.perf_counter()
  checks = check_responder(tiers, test_texts, ds.labels)
  result["responder_check"] = checks
  print(f"\nClassifierResponder via LocalProviderServer + openai SDK + parse_reply "
        f"({time.perf_counter() - start:.1f}s):")
  for name, n, diff in checks:
    print(f"  {name}, {n} record(s)/request: labels match, max |confidence - p_top| = {diff:.1e}")
  if args.json:
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
