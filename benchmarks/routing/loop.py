"""The routing benchmark: calibrate on one split, run on another, report; real data, real models.

    python -m benchmarks.routing                      # both datasets, default alphas
    python -m benchmarks.routing --dataset bbc --alpha 0.02 --alpha 0.05 --splits 500

Per dataset (``benchmarks/routing/datasets.py``) it trains the two tiers
(``benchmarks/routing/tiers.py``: a cheap classifier on a small labelled set,
a stronger one on a larger set), serves them behind the local OpenAI
(small) and Anthropic (upper) wire-format endpoints, and drives tierflow's own
commands over the embedded Kafka broker:

1. ``tierflow calibrate --run documents --records POOL --labels CALIB``: the small
   tier runs over the whole evaluation pool (escalation off) and the thresholds
   are certified on the calibration half only.
2. ``tierflow run documents`` over the pool with every record escalated: the
   upper tier's answer and cost on every pool record (frontier-only baseline).
3. ``tierflow run documents --calibration FILE`` over the test half (its own
   topic): the routed run.
4. ``tierflow report`` over the routed run, with the test labels.

Then, from the two pool ledgers (the answers do not depend on the split: both
tiers are deterministic), ``--splits`` random calibration/test splits of the
pool: how often the realised error on the non-escalated test records stayed
within alpha (the guarantee says at least 1 - delta of the time), routed vs
frontier-only cost and accuracy, and cost vs the oracle cascade. Split 0 is the
one the pipeline ran; its routed figures are computed both ways and must agree.

Prices: the small tier is priced as ``--small-price-as`` and the upper tier as
``--upper-price-as`` from the bundled price book, on the token counts the local
endpoints report (their tokenizer, not the real models'): they stand in for
those models' prices, not for their quality. The models behind every accuracy
figure are the two classifiers, described in the output.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE.parent / "results"
ROOT = HERE.parent.parent

# One alpha grid for every dataset, fixed before any result was seen.
ALPHAS = (0.02, 0.05, 0.10)
# Test records per dataset when --test-records is not given (None: the source's test split
# or 500); reuters8's 2,172-record test split is sampled down to keep the run short.
DEFAULT_TEST_RECORDS = {"reuters8": 1000}
INSTRUCTIONS = {
    "bbc": "You file BBC news articles by topic.",
    "finefood": ("You read Amazon fine-food reviews and say whether the reviewer rates the "
                 "product great (5 stars) or not (other)."),
    "reuters8": "You file Reuters newswire stories by topic.",
}
SMALL_MODEL, UPPER_MODEL = "small-classifier", "upper-classifier"


# ----------------------------------------------------------------------------- pipeline


def _write_jsonl(path: str, rows: Sequence[dict]) -> str:
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  return path


@dataclasses.dataclass(frozen=True)
class Endpoint:
  """Where a tier is served: the local classifier server by default, or any real endpoint."""
  provider: str
  base_url: str
  model: str
  api_key_env: str = ""

  @property
  def external(self) -> bool:
    return self.model not in (SMALL_MODEL, UPPER_MODEL)


def write_config(path: str, name: str, stage: Mapping[str, Any], small: Mapping[str, Any],
                 frontier: Mapping[str, Any]) -> str:
  """The bundled documents config with ``stage`` as its only stage and its tiers updated
  with ``small`` and ``frontier`` (no budget; two requests in flight and two retries unless
  given), written to ``path``. Every routing benchmark builds its configs here."""
  config = yaml.safe_load((ROOT / "tierflow/data/documents.yaml").read_text())
  config["name"] = name
  config["budget_usd"] = None
  for tier, given in (("small", small), ("frontier", frontier)):
    config["models"][tier].update({"concurrency": 2, "max_retries": 2, **given})
  config["stages"] = [dict(stage)]
  with open(path, "w", encoding="utf-8") as f:
    yaml.safe_dump(config, f, sort_keys=False)
  return path


def bench_config(ds, small: Endpoint, upper: Endpoint, path: str, *, small_price: str,
                 upper_price: str, threshold: float = 0.5, batch_size: int = 8) -> str:
  """The documents config with one classify stage over the dataset's labels."""
  return write_config(
      path, f"routing-{ds.name}",
      {"name": "classify", "kind": "classify",
       "instructions": INSTRUCTIONS.get(ds.name, "You classify documents."),
       "labels": list(ds.labels), "threshold": threshold},
      small=dict(provider=small.provider, base_url=small.base_url, model=small.model,
                 api_key_env=small.api_key_env, price_as=small_price, batch_size=batch_size,
                 logprobs=small.provider == "openai", top_logprobs=min(10, len(ds.labels))),
      frontier=dict(provider=upper.provider, base_url=upper.base_url, model=upper.model,
                    api_key_env=upper.api_key_env, price_as=upper_price,
                    batch_size=batch_size))


def _launch(pipeline: str, argv: Sequence[str]) -> float:
  from tierflow import launcher
  t0 = time.perf_counter()
  summary = launcher.launch(pipeline, list(argv))
  if summary.dead_letters:
    raise RuntimeError(f"{pipeline} wrote {summary.dead_letters} dead letters; see the output")
  return time.perf_counter() - t0


def read_ledger(output_dir: str, stage_name: str = "classify",
                output: str = "label") -> dict[str, dict[str, Any]]:
  """doc_id -> a stage's small answer (and per-field confidences, as the ledger's text),
  confidence and costs, and the record's final answer (column ``output``) and tier."""
  from tierflow.results import read_run
  run = read_run(output_dir)
  stage = next(s for s in run.stages if s.name == stage_name)
  ids = run.records["_id:doc_id"]
  out = {}
  for i, doc_id in enumerate(ids):
    out[str(doc_id)] = {
        "small_answer": stage.col("small_answer")[i],
        "small_field_confidence": stage.col("small_field_confidence")[i],
        "confidence": float(stage.col("confidence")[i]),
        "small_cost": float(np.nan_to_num(stage.col("small_cost_usd")[i])),
        "frontier_cost": float(np.nan_to_num(stage.col("frontier_cost_usd")[i])),
        "frontier_only_cost": float(np.nan_to_num(stage.col("frontier_only_cost_usd")[i])),
        "final": run.records[output][i],
        "final_tier": stage.col("final_tier")[i],
        "status": run.records["status"][i],
    }
  return out


# ----------------------------------------------------------------------------- evaluation


def _scores(conf: np.ndarray, small_ok: np.ndarray, calib: np.ndarray,
            answers: Optional[np.ndarray]) -> tuple[np.ndarray, Any]:
  """The calibration records' scores (and the router, or None): the confidence, or with
  ``answers`` a learned router cross-fitted on them (``tierflow calibrate --router``)."""
  c_cal = np.nan_to_num(conf[calib], nan=0.0)
  if answers is None:
    return c_cal, None
  from tierflow.learned_router import fit_cross
  ok_cal = small_ok[calib] & ~np.isnan(conf[calib])
  try:
    router, scores = fit_cross(c_cal, answers[calib], ok_cal)
  except ValueError:  # too few errors to fit: the confidence, as calibrate falls back
    return c_cal, None
  return scores, router


def _apply(conf: np.ndarray, idx: np.ndarray, answers: Optional[np.ndarray], router,
           halves: Optional[np.ndarray] = None) -> np.ndarray:
  c = conf[idx]
  if router is None:
    return c
  s = router.scores(np.nan_to_num(c, nan=0.0), answers[idx],
                    None if halves is None else halves[idx])
  return np.where(np.isnan(c), np.nan, s)  # no confidence: escalated, as in the pipeline


def evaluate_split(conf: np.ndarray, small_ok: np.ndarray, upper_ok: np.ndarray,
                   small_cost: np.ndarray, upper_cost: np.ndarray, calib: np.ndarray,
                   test: np.ndarray, alpha: float, delta: float,
                   answers: Optional[np.ndarray] = None,
                   fields: Optional[tuple[np.ndarray, np.ndarray]] = None) -> dict:
  """Calibrate on ``calib``, apply on ``test``: error on kept vs alpha, accuracy, cost.
  With ``answers`` (the small tier's labels) the threshold is on a learned router's score;
  with ``fields`` (each tier's per-record, per-field hits) the routed field accuracy too."""
  from tierflow.calibration import calibrate_threshold
  score_cal, router = _scores(conf, small_ok, calib, answers)
  ok_cal = small_ok[calib] & ~np.isnan(conf[calib])
  sc = calibrate_threshold(score_cal, ok_cal, alpha, delta, small_cost=small_cost[calib],
                           frontier_cost=upper_cost[calib])
  c = _apply(conf, test, answers, router)
  kept = c >= sc.threshold  # NaN and inf escalate, as in the pipeline
  esc = ~kept
  s_ok, u_ok = small_ok[test], upper_ok[test]
  routed_ok = np.where(kept, s_ok, u_ok)
  routed_cost = small_cost[test].sum() + upper_cost[test][esc].sum()
  frontier_cost = upper_cost[test].sum()
  oracle_esc = ~s_ok
  oracle_cost = small_cost[test].sum() + upper_cost[test][oracle_esc].sum()
  # The oracle at matched accuracy: it escalates only records the small tier gets wrong
  # and the upper tier right, the cheapest first, until it is as accurate as the routed run.
  fixable = np.sort(upper_cost[test][~s_ok & u_ok])
  need = max(0, int(np.ceil(routed_ok.sum() - s_ok.sum() - 1e-9)))
  matched_cost = small_cost[test].sum() + fixable[:need].sum()
  extra = {}
  if fields is not None:
    extra["routed_field_accuracy"] = float(np.where(
        kept[:, None], fields[0][test], fields[1][test]).mean())
  return {
      **extra,
      "threshold": sc.threshold, "certified": sc.certified, "n_calib": int(len(calib)),
      "n_test": int(len(test)),
      "escalation_rate": float(esc.mean()),
      "error_kept": float((~s_ok[kept]).mean()) if kept.any() else None,
      "routed_accuracy": float(routed_ok.mean()),
      "small_accuracy": float(s_ok.mean()),
      "frontier_accuracy": float(u_ok.mean()),
      "oracle_accuracy": float((s_ok | u_ok).mean()),
      "routed_cost": float(routed_cost), "frontier_only_cost": float(frontier_cost),
      "small_only_cost": float(small_cost[test].sum()), "oracle_cost": float(oracle_cost),
      "oracle_matched_cost": float(matched_cost),
  }


def population_check(conf: np.ndarray, small_ok: np.ndarray, n_calib: int, alpha: float,
                     delta: float, rng: np.random.Generator,
                     answers: Optional[np.ndarray] = None,
                     halves: Optional[np.ndarray] = None) -> dict:
  """The guarantee's own setting: calibrate on ``n_calib`` i.i.d. draws (with replacement)
  from the pool, then take the exact selective risk over the whole pool (the population).

  Splitting a finite pool into halves is not that setting: the two halves share the pool's
  errors, so a calibration half with few errors leaves the test half more, and the test
  half's realised error also carries its own sampling noise.
  """
  from tierflow.calibration import calibrate_threshold
  draw = rng.integers(0, len(conf), size=n_calib)
  score, router = _scores(conf, small_ok, draw, answers)
  sc = calibrate_threshold(score, small_ok[draw] & ~np.isnan(conf[draw]), alpha, delta)
  kept = _apply(conf, np.arange(len(conf)), answers, router, halves) >= sc.threshold
  risk = float((~small_ok[kept]).mean()) if kept.any() else 0.0
  return {"certified": sc.certified, "population_risk": risk, "held": risk <= alpha,
          "population_coverage": float(kept.mean())}


def hindsight_keep(score: np.ndarray, ok: np.ndarray, alpha: float) -> np.ndarray:
  """Which records the one threshold keeping the most of them at error <= alpha keeps,
  chosen on these very records (hindsight). NaN scores are never kept; ties are kept or
  escalated together, as a threshold does."""
  c = np.nan_to_num(score, nan=-1.0)
  order = np.argsort(-c, kind="stable")
  right = ok[order] & (c[order] >= 0)
  rate = np.cumsum(~right) / np.arange(1, len(c) + 1)
  cut = np.append(c[order][1:] != c[order][:-1], True)  # only between distinct scores
  good = np.nonzero((rate <= alpha) & cut)[0]
  keep = np.zeros(len(c), bool)
  if len(good):
    keep[order[:good[-1] + 1]] = True
  return keep


def best_in_hindsight(conf: np.ndarray, small_ok: np.ndarray, small_cost: np.ndarray,
                      upper_cost: np.ndarray, alpha: float) -> dict:
  """``hindsight_keep`` over the pool: what any calibration could at best reach with this
  confidence signal, as coverage and as cost relative to the oracle cascade."""
  keep = hindsight_keep(conf, small_ok, alpha)
  cost = small_cost.sum() + upper_cost[~keep].sum()
  oracle = small_cost.sum() + upper_cost[~small_ok].sum()
  return {"coverage": float(keep.mean()), "cost_to_oracle": float(cost / oracle)}


def evaluate_alphas(conf: np.ndarray, small_ok: np.ndarray, upper_ok: np.ndarray,
                    small_cost: np.ndarray, upper_cost: np.ndarray, calib0: np.ndarray,
                    test0: np.ndarray, *, alphas: Sequence[float], delta: float, splits: int,
                    seed: int, pipeline_split0: Mapping[float, dict],
                    answers: Optional[np.ndarray] = None, halves: Optional[np.ndarray] = None,
                    fields: Optional[tuple[np.ndarray, np.ndarray]] = None) -> dict:
  """Per alpha, from the pool's per-record arrays: split 0 (the split the pipeline ran,
  checked against its report's figures), ``splits - 1`` more random splits, ``splits``
  i.i.d. draws for the guarantee, and the best threshold in hindsight."""
  n_pool, n_cal = len(conf), len(calib0)
  results = {}
  for alpha in alphas:
    def split(calib, test):
      return evaluate_split(conf, small_ok, upper_ok, small_cost, upper_cost, calib, test,
                            alpha, delta, answers, fields)
    split0 = split(calib0, test0)
    p0 = pipeline_split0[alpha]
    agree = (abs(split0["routed_accuracy"] - p0["routed_accuracy"]) < 1e-12
             and abs(split0["escalation_rate"] - p0["escalation_rate"]) < 1e-12
             and split0["threshold"] == p0["threshold"])
    rows = [split0]
    rng_s = np.random.default_rng(seed + 2)
    for _ in range(splits - 1):
      perm = rng_s.permutation(n_pool)
      rows.append(split(perm[:n_cal], perm[n_cal:]))
    rng_p = np.random.default_rng(seed + 3)
    population = [population_check(conf, small_ok, n_cal, alpha, delta, rng_p, answers, halves)
                  for _ in range(splits)]
    results[f"{alpha:g}"] = {"summary": summarise_splits(rows, alpha, delta, population),
                             "pool_hindsight": best_in_hindsight(conf, small_ok, small_cost,
                                                                 upper_cost, alpha),
                             "split0_offline": split0, "split0_pipeline": p0,
                             "split0_pipeline_matches_offline": bool(agree)}
  return results


@dataclasses.dataclass
class PipelineRuns:
  """Where ``pipeline_runs`` left its outputs."""
  small_out: str  # the small tier over the pool (escalation off)
  upper_out: str  # the frontier tier over the pool (everything escalated)
  calibrations: dict  # alpha -> calibration file, certified on the calibration labels
  routed: dict  # alpha -> (output dir of the routed run over the test split, seconds)
  timings: dict


def pipeline_runs(work: str, broker, pool: Sequence[dict], test: Sequence[dict], *,
                  config: str, frontier_only_config: str, calib_labels: str,
                  alphas: Sequence[float], delta: float,
                  router: Optional[str] = None) -> PipelineRuns:
  """tierflow's own commands over the embedded broker, for the ``documents`` pipeline:

  1. ``tierflow calibrate --run documents`` over the pool (the small tier, no escalation),
     certifying each alpha on ``calib_labels`` only;
  2. a frontier-only run over the pool (topic ``pool``);
  3. per alpha, the routed run over the test split (topic ``test0``) with its calibration.
  """
  from tierflow import cli
  from tierflow_local.loader import publish
  for topic, records in (("pool", pool), ("test0", test)):
    broker.create_topic(topic, partitions=2)
    publish(broker.bootstrap_servers, topic, list(records), schema="document")
  pool_jsonl = _write_jsonl(os.path.join(work, "pool.jsonl"), pool)
  small_out, cal_files, timings = os.path.join(work, "pool_small"), {}, {}
  t0 = time.perf_counter()
  for k, alpha in enumerate(alphas):
    cal_path = os.path.join(work, f"calibration_alpha{alpha:g}.json")
    argv = ["calibrate", "--labels", calib_labels, "--alpha", str(alpha), "--delta",
            str(delta), "--out", cal_path, "--router", router or "none"]
    argv += (["--run", "documents", "--records", pool_jsonl, "--config", config,
              "--work-dir", small_out] if k == 0 else ["--from-output", small_out])
    if cli.main(argv) != 0:
      raise RuntimeError(f"tierflow calibrate failed for alpha={alpha}")
    cal_files[alpha] = cal_path
  timings["small_tier_over_pool_and_calibrate_s"] = time.perf_counter() - t0
  common = ["--bootstrap-servers", broker.bootstrap_servers, "--start-offset", "0"]
  upper_out = os.path.join(work, "pool_frontier_only")
  timings["frontier_only_over_pool_s"] = _launch("documents", [
      *common, "--topic", "pool", "--output", upper_out, "--config", frontier_only_config])
  routed = {}
  for alpha in alphas:
    out = os.path.join(work, f"routed_alpha{alpha:g}")
    routed[alpha] = (out, _launch("documents", [
        *common, "--topic", "test0", "--output", out, "--config", config,
        "--calibration", cal_files[alpha]]))
  return PipelineRuns(small_out, upper_out, cal_files, routed, timings)


def summarise_splits(rows: list[dict], alpha: float, delta: float,
                     population: Sequence[dict] = ()) -> dict:
  """Across splits: how often the guarantee held, and the mean figures."""
  held = [r["error_kept"] is None or r["error_kept"] <= alpha for r in rows]
  certified = [r["certified"] for r in rows]

  def mean(key):
    return float(np.mean([r[key] for r in rows]))

  ratio = [r["routed_cost"] / r["frontier_only_cost"] for r in rows]
  vs_oracle = [r["routed_cost"] / r["oracle_cost"] for r in rows]
  vs_matched = [r["routed_cost"] / r["oracle_matched_cost"] for r in rows]
  gap = [100 * (r["frontier_accuracy"] - r["routed_accuracy"]) for r in rows]
  errs = [r["error_kept"] for r in rows if r["error_kept"] is not None]
  pop = {}
  if population:
    pop = {"population_draws": len(population),
           "population_certified_share": float(np.mean([p["certified"] for p in population])),
           "population_guarantee_held_share": float(np.mean([p["held"] for p in population])),
           "population_violations": int(sum(not p["held"] for p in population)),
           "population_risk_mean": float(np.mean([p["population_risk"] for p in population])),
           "population_coverage_mean": float(np.mean([p["population_coverage"]
                                                      for p in population]))}
  return {
      "alpha": alpha, "delta": delta, "splits": len(rows),
      "certified_share": float(np.mean(certified)),
      "test_half_error_within_alpha_share": float(np.mean(held)),
      "test_half_error_above_alpha": int(len(held) - sum(held)),
      "allowed_violation_share": delta,
      **pop,
      "error_kept_mean": float(np.mean(errs)) if errs else None,
      "error_kept_p90": float(np.quantile(errs, 0.9)) if errs else None,
      "escalation_rate_mean": mean("escalation_rate"),
      "routed_accuracy_mean": mean("routed_accuracy"),
      "frontier_accuracy_mean": mean("frontier_accuracy"),
      "small_accuracy_mean": mean("small_accuracy"),
      "oracle_accuracy_mean": mean("oracle_accuracy"),
      "quality_gap_points_mean": float(np.mean(gap)),
      "quality_gap_points_p10_p90": [float(np.quantile(gap, 0.1)), float(np.quantile(gap, 0.9))],
      "cost_ratio_routed_to_frontier_only_mean": float(np.mean(ratio)),
      "cost_ratio_routed_to_frontier_only_p10_p90": [float(np.quantile(ratio, 0.1)),
                                                      float(np.quantile(ratio, 0.9))],
      "cost_ratio_routed_to_oracle_mean": float(np.mean(vs_oracle)),
      "cost_ratio_routed_to_oracle_at_matched_accuracy_mean": float(np.mean(vs_matched)),
      "routed_cost_per_1k_mean": float(np.mean([1000 * r["routed_cost"] / r["n_test"]
                                                for r in rows])),
      "frontier_only_cost_per_1k_mean": float(np.mean(
          [1000 * r["frontier_only_cost"] / r["n_test"] for r in rows])),
      **({"routed_field_accuracy_mean": mean("routed_field_accuracy")}
         if "routed_field_accuracy" in rows[0] else {}),
  }


# ----------------------------------------------------------------------------- one dataset


def run_dataset(name: str, *, alphas: Sequence[float], delta: float, splits: int, seed: int,
                calib_records: int, small_train: Optional[int],
                test_records: Optional[int] = None, upper_train: Optional[int] = None,
                small_endpoint: Optional[Endpoint] = None,
                upper_endpoint: Optional[Endpoint] = None,
                small_price: str, upper_price: str, work: str, keep_reports: str,
                router: Optional[str] = None, log=print) -> dict:
  from tierflow.calibration import Calibration
  from tierflow_local.broker import EmbeddedBroker
  from tierflow_local.provider_server import LocalProviderServer
  from tierflow.report import build_report

  from benchmarks.routing.datasets import HELD_OUT, load_dataset, make_splits
  from benchmarks.routing.tiers import ClassifierResponder, train_tiers

  t_start = time.perf_counter()
  ds = load_dataset(name, dedupe=True)
  parts = make_splits(ds, small_n=small_train, calib_n=calib_records, test_n=test_records,
                      seed=seed)
  if upper_train is not None and upper_train < len(parts.upper_train):
    keep = np.random.default_rng(seed).choice(len(parts.upper_train), upper_train, replace=False)
    upper_idx = np.sort(np.union1d(parts.upper_train[keep], parts.small_train))
    parts = dataclasses.replace(parts, upper_train=upper_idx)
  small_n, upper_n = len(parts.small_train), len(parts.upper_train)
  calib0, test0 = parts.calib, parts.test
  pool = np.sort(np.concatenate([calib0, test0]))
  n_cal = len(calib0)
  log(f"[{name}] {ds.description}")
  log(f"[{name}] {len(ds.records)} distinct records: small tier trains on {small_n}, upper tier "
      f"on {upper_n}; evaluation pool {len(pool)} = calibration {n_cal} + test {len(test0)}")
  t0 = time.perf_counter()
  tiers = train_tiers(ds, parts.small_train, parts.upper_train, seed)
  train_s = time.perf_counter() - t0
  small_desc = (f"small tier: {small_endpoint.model} at {small_endpoint.base_url}"
                if small_endpoint else tiers.small.description)
  upper_desc = (f"upper tier: {upper_endpoint.model} at {upper_endpoint.base_url}"
                if upper_endpoint else tiers.upper.description)
  log(f"[{name}] {small_desc}")
  log(f"[{name}] {upper_desc}  (trained the local tiers in {train_s:.1f} s)")
  gold = np.array(ds.gold, dtype=object)

  d = os.path.join(work, name)
  os.makedirs(d, exist_ok=True)
  id_of = [r["doc_id"] for r in ds.records]

  def labels_file(fname, idx):
    return _write_jsonl(os.path.join(d, fname),
                        [{"doc_id": id_of[i], "classify": gold[i]} for i in idx])

  calib_labels = labels_file("calib0_labels.jsonl", calib0)
  test_labels = labels_file("test0_labels.jsonl", test0)
  responder = ClassifierResponder({SMALL_MODEL: tiers.small, UPPER_MODEL: tiers.upper})
  with contextlib.ExitStack() as stack:
    local = stack.enter_context(
        LocalProviderServer(responder, models=(SMALL_MODEL, UPPER_MODEL)))
    small_ep = small_endpoint or Endpoint("openai", local.openai_base_url, SMALL_MODEL)
    upper_ep = upper_endpoint or Endpoint("anthropic", local.anthropic_base_url, UPPER_MODEL)
    broker = stack.enter_context(EmbeddedBroker())
    runs = pipeline_runs(
        d, broker, [ds.records[i] for i in pool], [ds.records[i] for i in test0],
        config=bench_config(ds, small_ep, upper_ep, os.path.join(d, "config.yaml"),
                            small_price=small_price, upper_price=upper_price),
        frontier_only_config=bench_config(ds, small_ep, upper_ep,
                                          os.path.join(d, "config_frontier_only.yaml"),
                                          small_price=small_price, upper_price=upper_price,
                                          threshold=math.inf),
        calib_labels=calib_labels, alphas=alphas, delta=delta, router=router)
  timings = {"train_s": train_s, **runs.timings}

  # The routed runs' reports, with the test labels.
  pipeline_split0 = {}
  for alpha in alphas:
    out, secs = runs.routed[alpha]
    rep_dir = os.path.join(keep_reports, name, f"alpha{alpha:g}")
    # The measured frontier-only baseline (the pool's run, joined on doc_id) and the
    # calibration the run used, as `tierflow report --frontier-only --calibration` does.
    rep = build_report(out, test_labels, out_dir=rep_dir, resamples=500,
                       frontier_only=runs.upper_out, calibration=runs.calibrations[alpha])
    st = rep["stages"]["classify"]
    pipeline_split0[alpha] = {
        "seconds": secs, "report_dir": os.path.relpath(rep_dir, ROOT),
        "threshold": Calibration.load(runs.calibrations[alpha]).threshold("classify"),
        "records": rep["run"]["records"],
        "escalation_rate": rep["run"]["escalation_rate"],
        "routed_accuracy": rep["quality"]["routed_accuracy"],
        "error_non_escalated": st["quality"]["error_non_escalated"],
        "routed_cost_usd": rep["cost"]["routed_usd"],
        "frontier_only_cost_usd": rep["cost"]["frontier_only_usd"],
        "frontier_only_source": rep["cost"]["frontier_only_source"],
        "curve_estimated_thresholds": st["threshold_curve"]["estimated_thresholds"],
        "savings_pct": rep["cost"]["savings_pct"],
        "oracle": st["oracle"], "aiq": st["threshold_curve"].get("aiq"),
        "bootstrap": rep["bootstrap"]["intervals"].get("routed_accuracy"),
    }
    log(f"[{name}] alpha={alpha:g}: routed run on {rep['run']['records']} test records "
        f"escalated {rep['run']['escalation_rate']:.1%}, accuracy "
        f"{rep['quality']['routed_accuracy']:.2%}; report in {rep_dir}")

  # Per-record arrays over the pool from the two ledgers.
  small, upper = read_ledger(runs.small_out), read_ledger(runs.upper_out)
  ids = [id_of[i] for i in pool]
  missing = [i for i in ids if i not in small or i not in upper]
  if missing:
    raise RuntimeError(f"{len(missing)} pool records missing from the ledgers, e.g. {missing[:3]}")
  g = gold[pool]
  conf = np.array([small[i]["confidence"] for i in ids])
  small_ok = np.array([small[i]["small_answer"] == y for i, y in zip(ids, g)])
  upper_ok = np.array([upper[i]["final"] == y and upper[i]["final_tier"] == "frontier"
                       for i, y in zip(ids, g)])
  small_cost = np.array([small[i]["small_cost"] for i in ids])
  upper_cost = np.array([upper[i]["frontier_cost"] for i in ids])
  answers = halves = None
  if router:
    from tierflow.learned_router import half_of
    answers = np.array([small[i]["small_answer"] for i in ids], dtype=object)
    halves = np.array([half_of(0.0 if np.isnan(c) else c, a) for c, a in zip(conf, answers)])
  pos = {doc: k for k, doc in enumerate(ids)}
  c0 = np.array([pos[id_of[i]] for i in calib0])
  t0_ = np.array([pos[id_of[i]] for i in test0])

  results = evaluate_alphas(conf, small_ok, upper_ok, small_cost, upper_cost, c0, t0_,
                            alphas=alphas, delta=delta, splits=splits, seed=seed,
                            pipeline_split0=pipeline_split0, answers=answers, halves=halves)
  return {
      "dataset": name, "held_out": name in HELD_OUT, "router": router or "none",
      "description": ds.description,
      "labels": list(ds.labels),
      "records": len(ds.records), "pool": int(len(pool)), "calibration_records": n_cal,
      "test_records": int(len(pool) - n_cal),
      "small_tier": small_desc, "upper_tier": upper_desc,
      "small_train": small_n, "upper_train": upper_n, "small_train_within_upper_train": True,
      "pool_small_accuracy": float(small_ok.mean()),
      "pool_upper_accuracy": float(upper_ok.mean()),
      "prices": {"small_priced_as": small_price, "upper_priced_as": upper_price},
      "timings_s": timings, "seconds": time.perf_counter() - t_start, "by_alpha": results,
  }


# ----------------------------------------------------------------------------- output


def _pct(x: Optional[float], digits: int = 1) -> str:
  return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def markdown(result: dict) -> str:
  lines = [
      "| dataset | alpha | escalated | routed acc | upper-only acc | gap (pts) | cost routed / upper-only "
      "| cost routed / oracle (at matched acc) | error on kept (test half), mean (p90) | test-half error <= alpha "
      "| guarantee held (i.i.d. draws, exact risk) | certified (i.i.d. draws) "
      "| hindsight: most kept at error <= alpha, cost / oracle |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for d in result["datasets"]:
    for a, r in d["by_alpha"].items():
      s = r["summary"]
      lines.append(
          f"| {d['dataset']}{' (held out)' if d.get('held_out') else ''}"
          f"{' seed ' + str(d['seed']) if 'seed' in d else ''} | {a} | "
          f"{_pct(s['escalation_rate_mean'])} | "
          f"{_pct(s['routed_accuracy_mean'])} | {_pct(s['frontier_accuracy_mean'])} | "
          f"{s['quality_gap_points_mean']:+.2f} | {s['cost_ratio_routed_to_frontier_only_mean']:.3f} | "
          f"{s['cost_ratio_routed_to_oracle_mean']:.2f} "
          f"({s['cost_ratio_routed_to_oracle_at_matched_accuracy_mean']:.2f}) | "
          f"{_pct(s['error_kept_mean'], 2)} "
          f"({_pct(s['error_kept_p90'], 2)}) | {s['splits'] - s['test_half_error_above_alpha']}/"
          f"{s['splits']} | {s['population_draws'] - s['population_violations']}/"
          f"{s['population_draws']} (need >= {1 - s['delta']:.0%}) | "
          f"{_pct(s['population_certified_share'], 0)} | "
          f"{_pct(r['pool_hindsight']['coverage'], 0)}, "
          f"{r['pool_hindsight']['cost_to_oracle']:.2f} |")
  return "\n".join(lines)


# What the spread table reports per dataset and alpha: (column, summary key or function).
SPREAD = (
    ("escalated", lambda r: r["summary"]["escalation_rate_mean"]),
    ("routed acc", lambda r: r["summary"]["routed_accuracy_mean"]),
    ("upper-only acc", lambda r: r["summary"]["frontier_accuracy_mean"]),
    ("cost routed / upper-only", lambda r: r["summary"]["cost_ratio_routed_to_frontier_only_mean"]),
    ("cost / oracle", lambda r: r["summary"]["cost_ratio_routed_to_oracle_mean"]),
    ("hindsight cost / oracle", lambda r: r["pool_hindsight"]["cost_to_oracle"]),
    ("guarantee held", lambda r: 1 - r["summary"]["population_violations"]
     / r["summary"]["population_draws"]),
    ("certified", lambda r: r["summary"]["population_certified_share"]),
)


def spread(datasets: Sequence[dict]) -> list[dict]:
  """Per dataset and alpha, the mean, min and max over the seeds' runs of each SPREAD figure
  (each seed trains the tiers on another draw and splits the pool anew)."""
  by_key: dict[tuple[str, str], list[dict]] = {}
  seeds: dict[tuple[str, str], list[int]] = {}
  for d in datasets:
    for a, r in d["by_alpha"].items():
      by_key.setdefault((d["dataset"], a), []).append(r)
      seeds.setdefault((d["dataset"], a), []).append(d["seed"])
  out = []
  for (name, a), rows in by_key.items():
    figures = {}
    for col, fn in SPREAD:
      vals = [float(fn(r)) for r in rows]
      figures[col] = {"mean": float(np.mean(vals)), "min": min(vals), "max": max(vals)}
    out.append({"dataset": name, "alpha": a, "seeds": seeds[(name, a)], "figures": figures})
  return out


def markdown_spread(rows: Sequence[dict], held_out: Sequence[str] = ()) -> str:
  """The spread as a markdown table: mean (min–max) over the seeds."""
  pct = {"escalated", "routed acc", "upper-only acc", "guarantee held", "certified"}
  head = "| dataset | α | seeds | " + " | ".join(c for c, _ in SPREAD) + " |"
  lines = [head, "|---|---:|---:|" + "---:|" * len(SPREAD)]
  for r in rows:
    cells = []
    for col, _ in SPREAD:
      f = r["figures"][col]
      fmt = (lambda x: f"{100 * x:.1f}%") if col in pct else (lambda x: f"{x:.2f}")
      cells.append(f"{fmt(f['mean'])} ({fmt(f['min'])}–{fmt(f['max'])})")
    name = r["dataset"] + (" (held out)" if r["dataset"] in held_out else "")
    lines.append(f"| {name} | {r['alpha']} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.routing", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  from benchmarks.routing.datasets import DATASETS, HELD_OUT
  parser.add_argument("--dataset", action="append", choices=DATASETS,
                      help=f"any of {', '.join(DATASETS)} (default: all; held out: "
                           f"{', '.join(HELD_OUT)})")
  parser.add_argument("--alpha", action="append", type=float,
                      help="target error on non-escalated records (repeatable; default "
                           "0.02 0.05 0.10 for every dataset)")
  parser.add_argument("--delta", type=float, default=0.1)
  parser.add_argument("--splits", type=int, default=200,
                      help="random calibration/test splits of the pool (default 200)")
  parser.add_argument("--calib-records", type=int, default=500,
                      help="calibration sample size (default 500)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--seeds", type=int, default=1,
                      help="run every dataset with seeds SEED..SEED+SEEDS-1 (each trains the "
                           "tiers on another draw and splits the pool anew) and report the "
                           "mean and range over them (default 1)")
  parser.add_argument("--small-train", type=int,
                      help="training records of the small tier (default: bbc 100, finefood 500)")
  parser.add_argument("--upper-train", type=int,
                      help="cap on the upper tier's training records (default: all the rest)")
  parser.add_argument("--test-records", type=int,
                      help="test records (default: the source's test split, else 500)")
  ext = parser.add_argument_group(
      "real models instead of the local classifiers (any OpenAI-compatible small endpoint; "
      "Anthropic or OpenAI upper endpoint; keys by environment variable name)")
  ext.add_argument("--small-base-url")
  ext.add_argument("--small-model")
  ext.add_argument("--small-key-env", default="")
  ext.add_argument("--upper-provider", choices=("anthropic", "openai"), default="anthropic")
  ext.add_argument("--upper-base-url")
  ext.add_argument("--upper-model")
  ext.add_argument("--upper-key-env", default="")
  parser.add_argument("--router", choices=("none", "logistic"), default="none",
                      help="calibrate with `tierflow calibrate --router` (default none: the "
                           "small tier's confidence)")
  parser.add_argument("--small-price-as", default="gpt-5-nano")
  parser.add_argument("--upper-price-as", default="claude-sonnet-4-6")
  parser.add_argument("--output-json", help="default: benchmarks/results/routing-<date>.json")
  parser.add_argument("--reports", default=str(RESULTS_DIR / "routing-reports"),
                      help="where the tierflow reports of the routed runs go")
  parser.add_argument("--keep-work", help="keep pipeline outputs in this directory")
  args = parser.parse_args(argv)
  small_ep = upper_ep = None
  if args.small_base_url or args.small_model:
    if not (args.small_base_url and args.small_model):
      parser.error("--small-base-url and --small-model go together")
    small_ep = Endpoint("openai", args.small_base_url, args.small_model, args.small_key_env)
  if args.upper_base_url or args.upper_model:
    if not (args.upper_base_url and args.upper_model):
      parser.error("--upper-base-url and --upper-model go together")
    upper_ep = Endpoint(args.upper_provider, args.upper_base_url, args.upper_model,
                        args.upper_key_env)
  import logging
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("kafka").setLevel(logging.CRITICAL)
  logging.getLogger("root").setLevel(logging.ERROR)
  work = args.keep_work or tempfile.mkdtemp(prefix="tierflow-routing-")
  started = _dt.datetime.now(_dt.timezone.utc)
  datasets = []
  if args.seeds < 1:
    parser.error("--seeds wants at least 1")
  reports = args.reports if args.router == "none" else args.reports + "-" + args.router
  try:
    for seed, name in ((s, n) for s in range(args.seed, args.seed + args.seeds)
                       for n in args.dataset or DATASETS):
      alphas = args.alpha or ALPHAS
      datasets.append({"seed": seed, **run_dataset(
          name, alphas=alphas, delta=args.delta, splits=args.splits, seed=seed,
          calib_records=args.calib_records, small_train=args.small_train,
          test_records=args.test_records or DEFAULT_TEST_RECORDS.get(name),
          upper_train=args.upper_train,
          small_price=args.small_price_as, small_endpoint=small_ep, upper_endpoint=upper_ep,
          upper_price=args.upper_price_as, work=os.path.join(work, f"seed{seed}"),
          # the first seed's reports are kept; the others' go with the work directory
          keep_reports=reports if seed == args.seed else os.path.join(work, f"reports-{seed}"),
          router=None if args.router == "none" else args.router)})
  finally:
    if not args.keep_work:
      shutil.rmtree(work, ignore_errors=True)
  import apache_beam
  result = {
      "benchmark": "routing", "date": started.date().isoformat(),
      "started_at": started.isoformat(timespec="seconds"),
      "command": "python -m benchmarks.routing " + " ".join(argv if argv is not None
                                                              else sys.argv[1:]),
      "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                  "beam": apache_beam.__version__, "platform": platform.platform()},
      "datasets": datasets,
      "seeds": list(range(args.seed, args.seed + args.seeds)),
      "spread": spread(datasets),
  }
  tag = "" if args.router == "none" else f"-{args.router}"
  out = args.output_json or str(RESULTS_DIR / f"routing{tag}-{result['date']}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2, default=float)
    f.write("\n")
  print()
  print(markdown(result))
  if args.seeds > 1:
    print(f"\nmean (min–max) over seeds {result['seeds'][0]}..{result['seeds'][-1]}:")
    print(markdown_spread(result["spread"], HELD_OUT))
  for d in datasets:
    print(f"\n{d['dataset']}: {d['small_tier']}; {d['upper_tier']}; "
          f"pool accuracy small {_pct(d['pool_small_accuracy'])}, upper "
          f"{_pct(d['pool_upper_accuracy'])}; small priced as {d['prices']['small_priced_as']}, "
          f"upper as {d['prices']['upper_priced_as']} (price stand-ins, not the models)")
    for a, r in d["by_alpha"].items():
      print(f"  alpha {a}: split 0 through the pipeline matches the offline evaluation: "
            f"{r['split0_pipeline_matches_offline']}")
  print(f"\nwrote {out}")
  bad = [(d["dataset"], a) for d in datasets for a, r in d["by_alpha"].items()
         if not r["split0_pipeline_matches_offline"]]
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
