"""How often calibration certifies, and how much it keeps, under each walk rule.

    python -m benchmarks.calibration_power            # n 500/1000/3000, alpha 0.02/0.05/0.10
    python -m benchmarks.calibration_power --draws 50 --n 500

The simulation that chose ``tierflow.calibration``'s fallback rule, settings fixed
before any result was seen: alpha in {0.02, 0.05, 0.10}, delta 0.1, calibration
samples of n in {500, 1000, 3000} drawn with replacement from a population, 200
draws each. Populations:

* ``bbc`` / ``finefood``: the routing benchmark's evaluation pools (seed 0), with
  the small tier's confidence and correctness (``benchmarks/routing/tiers.py``);
* synthetic worlds of 200,000 records with a known error curve: ``linear``,
  ``floor`` (2% wrong even at the top), ``label-noise`` (a strong model with 0.3%
  label noise at every confidence: confident "errors" near the top) and
  ``non-monotone`` (the top band worse than the one below it).

No held-out dataset is used here. For each rule: the share of draws that
certified, the share whose threshold's error on the whole population exceeded
alpha (must stay <= delta), and the mean share of the population kept. The
rules are all ``calibrate_threshold`` with different fallback settings:

* ``single``: one fixed-sequence walk from the strictest testable threshold;
* ``coverage-10%``: the earlier rule, a second walk from 10% of n (a single walk
  when that is no more than the first walk needs, as at n = 500 and 1000 for
  alpha = 0.02);
* ``errors-3``: a second walk from where 3 errors still pass at delta / 2;
* ``default``: the second walk from the larger of the two (the shipped rule).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from benchmarks.routing.loop import hindsight_keep

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ALPHAS = (0.02, 0.05, 0.10)
SIZES = (500, 1000, 3000)
RULES = {
    "single": {"fallback_errors": None, "fallback_coverage": None},
    "coverage-10%": {"fallback_errors": None, "fallback_coverage": 0.1},
    "errors-3": {"fallback_errors": 3, "fallback_coverage": None},
    "default": {},
}


def synthetic(kind: str, rng: np.random.Generator, size: int = 200_000):
  c = rng.random(size)
  if kind == "linear":
    q = 0.6 * (1 - c)
  elif kind == "floor":
    q = 0.02 + 0.5 * (1 - c) ** 2
  elif kind == "label-noise":
    c = 1 - rng.beta(1, 12, size)
    q = 0.003 + 0.6 * (1 - c) ** 1.5
  elif kind == "non-monotone":
    q = np.where(c >= 0.97, 0.10, np.where(c >= 0.85, 0.0, 0.4))
  else:
    raise ValueError(kind)
  return c, rng.random(size) >= q


def routing_pool(name: str):
  """The small tier's top-label probability and correctness over the routing pool."""
  from benchmarks.routing.tiers import small_tier_on_pool
  proba, _, ok = small_tier_on_pool(name)
  return proba.max(axis=1), ok


def evaluate(c: np.ndarray, ok: np.ndarray, alpha: float, delta: float, n: int, draws: int,
             seed: int) -> dict:
  from tierflow.calibration import calibrate_threshold
  rng = np.random.default_rng(seed)
  samples = [rng.integers(0, len(c), n) for _ in range(draws)]
  out = {}
  for rule, kw in RULES.items():
    certified = violated = 0
    kept = []
    for idx in samples:
      sc = calibrate_threshold(c[idx], ok[idx], alpha, delta, **kw)
      keep = c >= sc.threshold
      kept.append(float(keep.mean()))
      if sc.certified:
        certified += 1
        violated += bool(keep.any() and (~ok[keep]).mean() > alpha)
    out[rule] = {"certified": certified / draws, "violated": violated / draws,
                 "kept": float(np.mean(kept))}
  return out


def markdown(result: dict) -> str:
  rules = list(RULES)
  head = "| population | n | alpha | best possible kept | " + " | ".join(
      f"{r}: certified / kept" for r in rules) + " | worst violation share |"
  lines = [head, "|---|---:|---:|---:|" + "---:|" * len(rules) + "---:|"]
  for row in result["rows"]:
    cells = " | ".join(f"{row['rules'][r]['certified']:.0%} / {row['rules'][r]['kept']:.0%}"
                       for r in rules)
    worst = max(v["violated"] for v in row["rules"].values())
    lines.append(f"| {row['population']} | {row['n']} | {row['alpha']:g} | "
                 f"{row['best_kept']:.0%} | {cells} | {worst:.1%} |")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.calibration_power",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--draws", type=int, default=200)
  parser.add_argument("--n", type=int, action="append", help="calibration sizes (default "
                      "500 1000 3000)")
  parser.add_argument("--delta", type=float, default=0.1)
  parser.add_argument("--population", action="append",
                      help="bbc, finefood, linear, floor, label-noise, non-monotone (default all)")
  parser.add_argument("--output-json")
  args = parser.parse_args(argv)
  names = args.population or ["bbc", "finefood", "linear", "floor", "label-noise",
                              "non-monotone"]
  rng = np.random.default_rng(0)
  rows = []
  for name in names:
    c, ok = routing_pool(name) if name in ("bbc", "finefood") else synthetic(name, rng)
    for n in args.n or SIZES:
      for alpha in ALPHAS:
        seed = 1000 * n + round(alpha * 100)  # fixed per cell
        row = {"population": name, "population_size": int(len(c)), "n": n, "alpha": alpha,
               "best_kept": float(hindsight_keep(c, ok, alpha).mean()),
               "rules": evaluate(c, ok, alpha, args.delta, n, args.draws, seed)}
        rows.append(row)
        print(f"{name} n={n} alpha={alpha:g}: " + ", ".join(
            f"{r} {v['certified']:.0%}/{v['kept']:.0%}" for r, v in row["rules"].items()),
            flush=True)
  started = _dt.datetime.now(_dt.timezone.utc)
  result = {"benchmark": "calibration_power", "date": started.date().isoformat(),
            "command": "python -m benchmarks.calibration_power " + " ".join(
                argv if argv is not None else sys.argv[1:]),
            "delta": args.delta, "draws": args.draws, "rules": RULES, "rows": rows}
  worst = max(v["violated"] for row in rows for v in row["rules"].values())
  result["worst_violation_share"] = worst
  out = args.output_json or str(RESULTS_DIR / f"calibration-power-{result['date']}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
  print()
  print(markdown(result))
  print(f"\nworst violation share over all cells and rules: {worst:.1%} (allowed {args.delta:g})")
  print(f"wrote {out}")
  return 0 if worst <= args.delta + 3 * math.sqrt(args.delta * (1 - args.delta) / args.draws) \
      else 1


if __name__ == "__main__":
  sys.exit(main())
