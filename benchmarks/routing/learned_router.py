"""Would a learned router beat the small tier's own top probability? An offline check.

    python -m benchmarks.routing.learned_router        # bbc and finefood, 40 splits

The routing benchmark's pools and small tiers (seed 0). Two questions:

1. Ranking: over 5 folds of the pool (fit on 4, score the 5th; means over the folds),
   does a router fitted on the features a run's ledger holds (the confidence, log(1 -
   confidence) and the answer; ``--full-features`` adds the margin to the second label,
   the entropy, every label's log-probability and the log text length) rank the small
   tier's errors better than the top probability (AUROC), and how much of a fold could it
   keep at error <= alpha in hindsight?
2. End to end, with the guarantee kept: the router is fitted on half of the 500
   calibration labels and the threshold certified (``calibrate_threshold``) on the other
   half, disjoint, so the finite-sample guarantee holds; the raw probability is certified on
   all 500. Escalation and error on kept records over the rest of the pool, 40 splits.

The held-out dataset is not used.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import numpy as np

from benchmarks.routing.loop import hindsight_keep
from benchmarks.routing.tiers import small_tier_on_pool

ALPHAS = (0.02, 0.05, 0.10)


def features(proba: np.ndarray, lengths: np.ndarray, full: bool) -> np.ndarray:
  """``full=False``: what a run's ledger already holds per record (the confidence and the
  answer); ``full=True`` adds the label distribution and the text length."""
  p1 = proba.max(axis=1)
  onehot = np.eye(proba.shape[1])[proba.argmax(axis=1)]
  ledger = [p1, np.log(np.clip(1 - p1, 1e-6, 1.0)), onehot]
  if not full:
    return np.column_stack(ledger)
  top2 = np.sort(proba, axis=1)[:, ::-1][:, :2]
  logp = np.log(np.clip(proba, 1e-12, 1.0))
  entropy = -(proba * logp).sum(axis=1) / np.log(proba.shape[1])
  return np.column_stack([*ledger, top2[:, 0] - top2[:, 1], entropy, logp, np.log1p(lengths)])


def routers(seed: int):
  from sklearn.ensemble import HistGradientBoostingClassifier
  from sklearn.linear_model import LogisticRegression
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  return {
      "logistic": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
      "boosting": lambda: HistGradientBoostingClassifier(max_depth=3, max_iter=100,
                                                          random_state=seed),
  }


def run(name: str, splits: int, seed: int, full: bool) -> list[str]:
  from sklearn.metrics import roc_auc_score
  from sklearn.model_selection import StratifiedKFold

  from tierflow.calibration import calibrate_threshold
  proba, lengths, ok = small_tier_on_pool(name)
  x, raw = features(proba, lengths, full), proba.max(axis=1)
  out = [f"{name}: {len(ok)} pool records, small tier {ok.mean():.1%} right; router features: "
         + ("confidence, answer, label distribution, length" if full else
            "confidence and answer (what the ledger holds)")]
  folds = list(StratifiedKFold(5, shuffle=True, random_state=seed).split(x, ok))
  makers = {"top probability": None, **{f"{k} router": v for k, v in routers(seed).items()}}
  for label, make in makers.items():
    auc, keep = [], []
    for train, held in folds:
      s = raw[held] if make is None else make().fit(x[train], ok[train]).predict_proba(
          x[held])[:, 1]
      auc.append(roc_auc_score(ok[held], s))
      keep.append([hindsight_keep(s, ok[held], a).mean() for a in ALPHAS])
    kept = ", ".join(f"{v:.0%}" for v in np.mean(keep, axis=0))
    out.append(f"  {label:18s} AUROC {np.mean(auc):.3f}; hindsight kept at alpha "
               f"{'/'.join(f'{a:g}' for a in ALPHAS)}: {kept}")
  rng = np.random.default_rng(seed)
  for alpha in ALPHAS:
    rows = {k: [] for k in ("top probability", *routers(seed),
                            *(f"{k} cross-fit" for k in routers(seed)))}
    for _ in range(splits):
      perm = rng.permutation(len(ok))
      cal, test = perm[:500], perm[500:]
      fit, certify = cal[:250], cal[250:]
      for label in rows:
        make = routers(seed).get(label.split()[0])
        if make is None:
          score_cal, score_test, on = raw[cal], raw[test], cal
        elif not label.endswith("cross-fit"):  # fit on one half, certify on the other
          model = make().fit(x[fit], ok[fit])
          score_cal, score_test, on = model.predict_proba(x[certify])[:, 1], \
              model.predict_proba(x[test])[:, 1], certify
        else:  # each half scored by the model fitted on the other; certify on all 500;
          # a new record is scored by one of the two at random (by its id in a pipeline)
          a, b = make().fit(x[fit], ok[fit]), make().fit(x[certify], ok[certify])
          score_cal = np.concatenate([b.predict_proba(x[fit])[:, 1],
                                      a.predict_proba(x[certify])[:, 1]])
          on = np.concatenate([fit, certify])
          pick = rng.random(len(test)) < 0.5
          score_test = np.where(pick, a.predict_proba(x[test])[:, 1],
                                b.predict_proba(x[test])[:, 1])
        t = calibrate_threshold(score_cal, ok[on], alpha, 0.1).threshold
        kept = score_test >= t
        err = float((~ok[test][kept]).mean()) if kept.any() else 0.0
        rows[label].append((1 - kept.mean(), err))
    out.append(f"  alpha {alpha:g}: " + "; ".join(
        f"{k} escalates {np.mean([r[0] for r in v]):.1%} (error on kept "
        f"{np.mean([r[1] for r in v]):.2%})" for k, v in rows.items()))
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.routing.learned_router",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dataset", action="append", choices=("bbc", "finefood"))
  parser.add_argument("--splits", type=int, default=40)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--full-features", action="store_true",
                      help="also the label distribution and text length (not in the ledger)")
  args = parser.parse_args(argv)
  for name in args.dataset or ("bbc", "finefood"):
    print("\n".join(run(name, args.splits, args.seed, args.full_features)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
