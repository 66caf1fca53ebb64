"""Escalation thresholds with a finite-sample guarantee on selective risk.

A stage keeps the small model's output when its confidence ``c >= t`` and
escalates the record to the frontier model when ``c < t``. The *selective risk*
``R(t) = P(small output wrong | c >= t)`` is the error rate on the records that
are not escalated. From a labelled calibration sample of ``n`` records,
:func:`calibrate_threshold` picks the lowest threshold (fewest escalations)
``t*`` such that

    P( R(t*) <= alpha ) >= 1 - delta      (over the draw of the calibration sample)

for records that are i.i.d. (exchangeable) with production traffic.

Method: Learn-then-Test (Angelopoulos, Bates, Candes, Jordan, Lei 2021,
arXiv:2110.01052) with fixed-sequence testing, the rule Trust-or-Escalate
(Jung, Brahman, Choi 2024, arXiv:2407.18370) uses for its cascade.

1. Candidate thresholds form a grid fixed before seeing the data (default
   0.000, 0.001, ..., 1.000), ordered strictest (highest) first.
2. For a threshold ``t``, ``k`` records are accepted and ``e`` of them are wrong.
   For a *fixed* ``t`` the records are i.i.d., so given ``k`` the accepted ones
   are ``k`` i.i.d. draws from the law of a record given ``c >= t``, and
   ``e | k ~ Binomial(k, R(t))`` exactly. The p-value of ``H_t: R(t) > alpha`` is
   ``p_t = P(Binomial(k, alpha) <= e)`` (``"ltt-binomial"``), valid conditionally
   on ``k`` and hence marginally; ``"ltt-hb"`` uses the looser Hoeffding-Bentkus
   p-value of the paper instead.
3. Fixed-sequence testing: walk down the grid while ``p_t <= level``, stop at
   the first failure; ``t*`` is the last threshold rejected. Thresholds at the
   top of the grid that accept too few records to be rejected even with zero
   errors are skipped.
4. A single walk from the strictest testable threshold is fragile: it must pass
   its first tests on a few dozen to a few hundred records, where one confident
   error (a mislabelled record at confidence 0.998) already fails it, and then
   it stops however much data lies below. So two walks share delta as a
   fallback procedure (Wiens 2003; a simple case of the graphical FWER
   procedures LTT allows): walk 1 starts at the strictest testable threshold at
   level delta / 2; walk 2 starts at the first threshold accepting enough
   records that ``fallback_errors`` (default 3) errors still pass at delta / 2,
   and at least ``fallback_coverage`` (default 10%) of them, at level delta / 2,
   or at delta if walk 1 is still rejecting when it gets there. If nothing is
   rejected the stage is not certified and escalates everything (``threshold =
   inf``). The rule was chosen by simulation before
   any held-out data was looked at (``python -m benchmarks.calibration_power``:
   BBC and fine-food pools and synthetic worlds, alpha in {0.02, 0.05, 0.10},
   n in {500, 1000, 3000}, 200 draws each). Against the earlier rule (walk 2
   from 10% of n only) it kept more in 13 of 54 settings, less in 6 (by at most
   2 points of coverage) and the same in 35; with 0.3% label noise at alpha =
   0.02 and n = 1000 it certified 90% of draws instead of 70%.

Fixed-sequence testing controls the family-wise error rate at the level for any
dependence between the p-values: falsely certifying a threshold requires
rejecting the first true null met on the walk, which a valid p-value does with
probability at most the level; the fallback adds the two walks' levels. Starting
a walk at a count-defined threshold is covered by the same argument when the
records above a grid point are not worse than the band just below it (true
when the error rate does not rise with confidence); the simulations in
``tests/test_calibration.py`` check the guarantee empirically, including a case
where the top band is worse. Ties need no special care: the grid does not depend
on the data, and records with equal confidence are always on the same side.

Geifman & El-Yaniv's selection with guaranteed risk (SGR, NeurIPS 2017) bounds
the same selective risk with the same binomial tail, but over a binary search of
data-dependent thresholds with a Bonferroni split of delta.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "METHODS",
    "DEFAULT_THRESHOLDS",
    "Calibration",
    "StageCalibration",
    "binom_cdf",
    "calibrate_threshold",
    "calibration_data_hash",
    "min_accepted_to_certify",
    "selective_risk",
]

FORMAT_VERSION = 1
METHODS = ("ltt-binomial", "ltt-hb", "crc")
REFERENCES = ("labels", "frontier")  # what a calibration scored the small tier against
# 0.000 .. 1.000; i / 1000 is the correctly rounded double, so 0.95 == 0.95.
DEFAULT_THRESHOLDS: np.ndarray = np.arange(1000, -1, -1) / 1000.0
DEFAULT_THRESHOLDS.setflags(write=False)

Cost = Union[float, Sequence[float]]
StageData = Tuple[Sequence[float], Sequence[bool]]


# ---------------------------------------------------------------- binomial tails

_log_fact = np.zeros(1)


def _log_factorials(n: int) -> np.ndarray:
  """``log(i!)`` for ``i = 0..n`` (at least), cached and grown on demand."""
  global _log_fact
  if len(_log_fact) <= n:
    size = max(n + 1, 2 * len(_log_fact))
    _log_fact = np.array([math.lgamma(i + 1.0) for i in range(size)])
  return _log_fact


def _sum_pmf(i: np.ndarray, k: int, p: float) -> float:
  """``sum_i P(Binomial(k, p) = i)`` over the given ``i``, in log space."""
  lf = _log_factorials(k)
  log_pmf = lf[k] - lf[i] - lf[k - i] + i * math.log(p) + (k - i) * math.log1p(-p)
  top = float(log_pmf.max())
  return math.exp(top) * float(np.exp(log_pmf - top).sum())


def binom_cdf(e: int, k: int, p: float) -> float:
  """Exact ``P(Binomial(k, p) <= e)`` to double precision (no scipy).

  Sums the pmf in log space over the side of ``e`` away from the mode, cut
  ``40 sd + 50`` terms out, where the rest is below ``exp(-800)`` relative.
  """
  if e < 0:
    return 0.0
  if e >= k or p <= 0.0:
    return 1.0
  if p >= 1.0:
    return 0.0
  width = int(40 * math.sqrt(k * p * (1 - p))) + 50
  if e < int((k + 1) * p):  # below the mode: the lower tail itself
    return min(1.0, _sum_pmf(np.arange(max(0, e - width), e + 1), k, p))
  return max(0.0, 1.0 - _sum_pmf(np.arange(e + 1, min(k, e + width) + 1), k, p))


def _kl_bernoulli(y: float, mu: float) -> float:
  """KL(Bernoulli(y) || Bernoulli(mu)), the Hoeffding exponent ``h1(y, mu)``."""
  out = 0.0
  if y > 0.0:
    out += y * math.log(y / mu)
  if y < 1.0:
    out += (1.0 - y) * math.log((1.0 - y) / (1.0 - mu))
  return out


def _p_value(k: int, e: int, alpha: float, method: str) -> float:
  """p-value of ``H: risk > alpha`` from ``e`` errors among ``k`` accepted records."""
  if k == 0:
    return 1.0
  tail = binom_cdf(e, k, alpha)
  if method == "ltt-binomial":
    return tail
  # Hoeffding-Bentkus (LTT, Prop. 3): min(Hoeffding, e * binomial tail).
  hoeffding = math.exp(-k * _kl_bernoulli(min(e / k, alpha), alpha))
  return min(1.0, hoeffding, math.e * tail)


@lru_cache(maxsize=1 << 16)
def _critical_errors(k: int, alpha: float, delta: float, method: str) -> int:
  """Largest error count rejecting ``H: risk > alpha`` at level delta, or -1."""
  if k == 0 or _p_value(k, 0, alpha, method) > delta:
    return -1
  lo, hi = 0, k  # p(lo) <= delta < 1 = p(k); p is nondecreasing in e.
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if _p_value(k, mid, alpha, method) <= delta:
      lo = mid
    else:
      hi = mid
  return lo


def _upper_bound(k: int, e: int, delta: float, method: str) -> float:
  """Smallest level the test rejects at: a one-sided 1 - delta upper bound on risk.

  For ``"ltt-binomial"`` this is the Clopper-Pearson bound.
  """
  if k == 0 or e >= k:
    return 1.0
  lo, hi = 0.0, 1.0  # p(lo) > delta >= p(hi); p is nonincreasing in the level.
  for _ in range(100):
    mid = 0.5 * (lo + hi)
    if _p_value(k, e, mid, method) <= delta:
      hi = mid
    else:
      lo = mid
    if hi - lo < 1e-12:
      break
  return hi


def min_accepted_to_certify(alpha: float, delta: float) -> int:
  """Fewest accepted records that can certify ``alpha`` at ``delta``: zero errors,
  ``(1 - alpha)^k <= delta``. Same for both methods."""
  alpha, delta = _check_level(alpha, "alpha"), _check_level(delta, "delta")
  k = max(1, math.ceil(math.log(delta) / math.log1p(-alpha)))
  while binom_cdf(0, k, alpha) > delta:
    k += 1
  while k > 1 and binom_cdf(0, k - 1, alpha) <= delta:
    k -= 1
  return k


# ---------------------------------------------------------------- validation

def _check_level(x: Any, name: str) -> float:
  if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
    raise ValueError(f"{name} must be a number in (0, 1), got {x!r}")
  x = float(x)
  if not 0.0 < x < 1.0:
    raise ValueError(f"{name} must be in the open interval (0, 1), got {x!r}")
  return x


def _as_confidence(confidence: Sequence[float], name: str = "confidence") -> np.ndarray:
  try:
    c = np.asarray(confidence, dtype=float)
  except (TypeError, ValueError) as err:
    raise ValueError(f"{name} must be a sequence of numbers in [0, 1]: {err}") from None
  if c.ndim != 1:
    raise ValueError(f"{name} must be one-dimensional, got shape {c.shape}")
  bad = ~np.isfinite(c) | (c < 0.0) | (c > 1.0)
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(
        f"{name} must be finite and in [0, 1]; {name}[{i}] = {float(c[i])!r} "
        f"({int(bad.sum())} bad value(s))")
  return c


def _as_correct(correct: Sequence[bool]) -> np.ndarray:
  ok = np.asarray(correct)
  if ok.ndim != 1:
    raise ValueError(f"correct must be one-dimensional, got shape {ok.shape}")
  if ok.dtype == bool:
    return ok
  if ok.size == 0:
    return ok.astype(bool)
  if ok.dtype.kind not in "iuf" or not np.isin(ok, (0, 1)).all():
    raise ValueError("correct must hold booleans (or 0/1), one per record")
  return ok.astype(bool)


def _check_pair(confidence: Sequence[float],
                correct: Sequence[bool]) -> Tuple[np.ndarray, np.ndarray]:
  c, ok = _as_confidence(confidence), _as_correct(correct)
  if len(c) != len(ok):
    raise ValueError(f"confidence and correct differ in length ({len(c)} != {len(ok)})")
  return c, ok


def _as_cost(cost: Cost, n: int, name: str) -> np.ndarray:
  try:
    arr = np.asarray(cost, dtype=float)
  except (TypeError, ValueError) as err:
    raise ValueError(f"{name} must be a number or a sequence of numbers: {err}") from None
  if arr.ndim == 0:
    arr = np.full(n, float(arr))
  elif arr.shape != (n,):
    raise ValueError(
        f"{name} must be a scalar or have one entry per record ({n}), got shape {arr.shape}")
  if not np.isfinite(arr).all() or (arr < 0).any():
    raise ValueError(f"{name} must be finite and non-negative")
  return arr


def _check_thresholds(candidate_thresholds: Optional[Sequence[float]]) -> np.ndarray:
  if candidate_thresholds is None:
    return DEFAULT_THRESHOLDS
  grid = _as_confidence(candidate_thresholds, "candidate_thresholds")
  if grid.size == 0:
    raise ValueError("candidate_thresholds must not be empty")
  return np.unique(grid)[::-1]  # strictest first, no duplicates


def _first_failure(e: np.ndarray, crit: np.ndarray, start: int, stop: int) -> int:
  """First index in ``[start, stop)`` whose errors exceed the critical count, else ``stop``."""
  passed = e[start:stop] <= crit[start:stop]
  return stop if passed.all() else start + int(np.argmin(passed))


def _smallest_passing(passes: Callable[[int], bool], lo: int, hi: int,
                      limit: Optional[int] = None) -> Optional[int]:
  """The smallest ``m > lo`` with ``passes(m)``, for a ``passes`` that is false at ``lo``
  and stays true once true: ``hi`` doubles until it passes (None once it exceeds
  ``limit``), then the gap is bisected."""
  while not passes(hi):
    lo, hi = hi, 2 * hi
    if limit is not None and hi > limit:
      return None
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (lo, mid) if passes(mid) else (mid, hi)
  return hi


def min_accepted_tolerating(errors: int, alpha: float, level: float) -> int:
  """Fewest accepted records at which ``errors`` errors still reject ``risk > alpha`` at
  ``level`` (``binom_cdf(errors, k, alpha)`` falls as k grows)."""
  return _smallest_passing(lambda k: binom_cdf(errors, k, alpha) <= level, errors,
                           max(errors + 1, min_accepted_to_certify(alpha, level)))


def _labels_to_certify(k: np.ndarray, e: np.ndarray, n: int, alpha: float, delta: float,
                       method: str) -> Optional[int]:
  """Labelled records that would certify ``alpha`` if every grid point's observed
  coverage and error rate held: the fewest over the grid, tested at delta / 2 (the
  level a fallback walk gets, so it is enough for either walk). None when the
  observed error is at least alpha at every threshold that accepts enough records
  to be tested (more labels will not help), or would need over 262,144 accepted.
  """
  testable = min_accepted_to_certify(alpha, delta)  # fewer accepted: rates are noise
  points = sorted({(kk, ee) for kk, ee in zip(k.tolist(), e.tolist())
                   if kk >= testable and ee < alpha * kk})
  if len(points) > 64:  # enough for an estimate: 64 points spread over the coverage range
    points = [points[i] for i in np.linspace(0, len(points) - 1, 64).round().astype(int)]
  best = None
  for kk, ee in points:
    rate = ee / kk
    accepted = _smallest_passing(  # past 2^18: beyond any labelling budget (and slow)
        lambda m: _p_value(m, math.floor(m * rate + 1e-9), alpha, method) <= delta / 2,
        0, max(1, kk), limit=1 << 18)
    if accepted is not None:
      need = math.ceil(accepted / (kk / n))
      best = need if best is None else min(best, need)
  return best


def _walk(k: np.ndarray, e: np.ndarray, n: int, alpha: float, delta: float, method: str,
          fallback_errors: Optional[int], fallback_coverage: Optional[float]
          ) -> Tuple[Optional[int], float, list]:
  """Fixed-sequence walk(s) down the grid (see the module docstring).

  Returns the last rejected grid index (or None), the level it was rejected at,
  and the ``(index, level)`` of the tests that ended each walk without a rejection.
  """
  def crit(level: float) -> np.ndarray:
    ks, inverse = np.unique(k, return_inverse=True)
    return np.array([_critical_errors(int(x), alpha, level, method) for x in ks])[inverse]

  size = len(k)
  k1 = min_accepted_to_certify(alpha, delta / 2)
  k2 = max(0 if fallback_errors is None else
           min_accepted_tolerating(fallback_errors, alpha, delta / 2),
           0 if fallback_coverage is None else math.ceil(fallback_coverage * n))
  if k2 <= k1:  # a single walk at level delta from the first testable threshold
    k_min = min_accepted_to_certify(alpha, delta)
    if k[-1] < k_min:
      return None, delta, []
    s = int(np.argmax(k >= k_min))
    f = _first_failure(e, crit(delta), s, size)
    return (f - 1, delta, []) if f > s else (None, delta, [(s, delta)])
  if k[-1] < k1:
    return None, delta / 2, []
  half = crit(delta / 2)
  s1 = int(np.argmax(k >= k1))
  s2 = int(np.argmax(k >= k2)) if k[-1] >= k2 else size
  chosen, level, failures, alive = None, delta / 2, [], True
  if s1 < s2:  # walk 1: from the strictest testable threshold, at delta / 2
    f1 = _first_failure(e, half, s1, s2)
    if f1 > s1:
      chosen = f1 - 1
    alive = f1 == s2
    if f1 == s1:
      failures.append((s1, delta / 2))
  if s2 < size:  # walk 2: from k2 accepted records; walk 1's level if still alive
    lvl = delta if alive else delta / 2
    f2 = _first_failure(e, crit(delta) if alive else half, s2, size)
    if f2 > s2:
      chosen, level = f2 - 1, lvl
    else:
      failures.append((s2, lvl))
  return chosen, level, failures


# ---------------------------------------------------------------- results

@dataclass(frozen=True, kw_only=True)
class StageCalibration:
  """The calibrated escalation rule of one stage: escalate iff not ``confidence >= threshold``.

  ``threshold`` is ``math.inf`` (escalate everything) unless ``certified``.
  ``coverage``, ``empirical_risk``, ``n_accepted``, ``n_errors`` and the cost
  are measured on the calibration sample at ``threshold``; ``risk_upper_bound``
  is the one-sided upper confidence bound of the test that certified it, at the
  level it was tested at (delta, or delta / 2 on a fallback walk; ``<= alpha``).
  ``min_n_to_certify`` is the number of accepted, error-free
  records needed to certify ``alpha`` at ``delta`` at all. ``labels_to_certify``
  (uncertified stages only) estimates how many labelled records would certify
  ``alpha`` if the observed coverage and error rates held; None if certified, or
  if the observed error reaches ``alpha`` at every threshold. ``router``, when set
  (``tierflow.learned_router.LearnedRouter.to_dict()``), means the threshold applies
  to the learned router's score of each answer, not to its confidence. ``signals`` are
  the small tier's confidence signals on the calibration records (``logprob``,
  ``verbalised``, ``checks``, ``agreement``); a threshold holds for those only
  (``signal_problem``).
  """
  threshold: float
  alpha: float
  delta: float
  n: int
  certified: bool
  reason: str
  coverage: float
  escalation_rate: float
  empirical_risk: Optional[float]
  risk_upper_bound: Optional[float]
  n_accepted: int
  n_errors: int
  p_value: Optional[float]
  min_n_to_certify: int
  method: str
  expected_cost_per_1k: Optional[float] = None
  stage: Optional[str] = None
  labels_to_certify: Optional[int] = None
  router: Optional[dict] = None
  signals: Optional[tuple] = None

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
    if self.router is not None:
      from tierflow.learned_router import LearnedRouter
      LearnedRouter.from_dict(self.router)  # raises on a bad one
    _check_level(self.alpha, "alpha")
    _check_level(self.delta, "delta")
    if self.certified:
      if not 0.0 <= self.threshold <= 1.0:
        raise ValueError(f"a certified threshold must be in [0, 1], got {self.threshold!r}")
    elif self.threshold != math.inf:
      raise ValueError("an uncertified stage must escalate everything (threshold = inf)")
    if not 0 <= self.n_errors <= self.n_accepted <= self.n:
      raise ValueError("need 0 <= n_errors <= n_accepted <= n")
    if not 0.0 <= self.coverage <= 1.0 or abs(self.coverage + self.escalation_rate - 1.0) > 1e-9:
      raise ValueError("coverage must be in [0, 1] and escalation_rate = 1 - coverage")

  def escalate(self, confidence: float) -> bool:
    """True if a record with this confidence goes to the frontier model (NaN escalates)."""
    return not confidence >= self.threshold

  def to_dict(self) -> Dict[str, Any]:
    d = dataclasses.asdict(self)
    d["threshold"] = "inf" if self.threshold == math.inf else self.threshold
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "StageCalibration":
    if not isinstance(d, Mapping):
      raise ValueError(f"a stage calibration must be an object, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    # absent from files written before them
    optional = {"labels_to_certify", "router", "signals"}
    missing, unknown = names - set(d) - optional, set(d) - names
    if missing or unknown:
      raise ValueError(
          f"bad stage calibration fields: missing {sorted(missing)}, unknown {sorted(unknown)}")
    kw = dict(d)
    threshold = kw["threshold"]
    if threshold == "inf":
      kw["threshold"] = math.inf
    elif isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
      kw["threshold"] = float(threshold)
    else:
      raise ValueError(f"threshold must be a number or 'inf', got {threshold!r}")
    for key in ("n", "n_accepted", "n_errors", "min_n_to_certify"):
      if not isinstance(kw[key], int) or isinstance(kw[key], bool):
        raise ValueError(f"{key} must be an integer, got {kw[key]!r}")
    need = kw.get("labels_to_certify")
    if need is not None and (not isinstance(need, int) or isinstance(need, bool) or need < 1):
      raise ValueError(f"labels_to_certify must be a positive integer or null, got {need!r}")
    if not isinstance(kw["certified"], bool):
      raise ValueError(f"certified must be true or false, got {kw['certified']!r}")
    for key in ("alpha", "delta", "coverage", "escalation_rate"):
      if not isinstance(kw[key], (int, float)) or isinstance(kw[key], bool):
        raise ValueError(f"{key} must be a number, got {kw[key]!r}")
    for key in ("empirical_risk", "risk_upper_bound", "p_value", "expected_cost_per_1k"):
      value = kw[key]
      if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        raise ValueError(f"{key} must be a number or null, got {kw[key]!r}")
    for key in ("reason", "method"):
      if not isinstance(kw[key], str):
        raise ValueError(f"{key} must be a string, got {kw[key]!r}")
    if kw["stage"] is not None and not isinstance(kw["stage"], str):
      raise ValueError(f"stage must be a string or null, got {kw['stage']!r}")
    signals = kw.get("signals")
    if signals is not None:
      if not isinstance(signals, (list, tuple)) or not all(isinstance(g, str) for g in signals):
        raise ValueError(f"signals must be a list of strings or null, got {signals!r}")
      kw["signals"] = tuple(signals)
    return cls(**kw)


def signal_problem(signals: Optional[Sequence[str]], samples: int, logprobs: bool
                   ) -> Optional[str]:
  """Why a threshold calibrated on ``signals`` does not hold for a small tier asking
  ``samples`` answers per record with or without ``logprobs``, or None if it does (or the
  calibration does not say). A confidence of another kind has another scale."""
  if not signals:
    return None
  cal = set(signals)
  if ("agreement" in cal) != (samples > 1):
    return (f"calibrated on {', '.join(sorted(cal))} confidences, but the small tier asks "
            f"{samples} sample(s) per record" + (" (confidence: agreement)" if samples > 1
                                                  else ""))
  if samples == 1 and "logprob" in cal and not logprobs:
    return "calibrated on logprob confidences, but the small tier gives none (no logprobs)"
  if samples == 1 and logprobs and "verbalised" in cal and "logprob" not in cal:
    return "calibrated on stated (verbalised) confidences, but the small tier gives logprobs"
  return None


def selective_risk(confidence: Sequence[float], correct: Sequence[bool],
                   threshold: float) -> Optional[float]:
  """Empirical error rate among records with ``confidence >= threshold`` (None if none)."""
  c, ok = _check_pair(confidence, correct)
  accepted = c >= threshold
  k = int(accepted.sum())
  return None if k == 0 else float((~ok[accepted]).sum()) / k


def _expected_cost_per_1k(costs: Optional[tuple], c: np.ndarray,
                          threshold: float) -> Optional[float]:
  """Cost per 1k records of the calibration sample at ``threshold`` (every record pays the
  small tier; those below it, the frontier too), or None without ``costs``."""
  if costs is None:
    return None
  escalated = ~(c >= threshold)
  return 1000.0 * float(np.mean(costs[0] + costs[1] * escalated))


def _conformal_risk_control(c: np.ndarray, k: np.ndarray, e: np.ndarray, n: int,
                            grid: np.ndarray, alpha: float, delta: float, costs,
                            stage: Optional[str]) -> "StageCalibration":
  """``method="crc"``: the weaker, expected-risk mode (Angelopoulos et al., conformal risk
  control, ICLR 2024). The loss of a record at threshold t is 1 when it is kept (c >= t)
  and wrong: monotone in t and bounded by 1, so the lowest t with
  ``(errors kept + 1) / (n + 1) <= alpha`` gives E[share of records kept with a wrong
  answer] <= alpha, averaged over calibration samples: no 1 - delta statement, and a
  share of all records, not of the kept ones. delta is not used."""
  ok_points = np.nonzero((e + 1) / (n + 1) <= alpha)[0]
  if len(ok_points) == 0:  # even keeping nothing: 1 / (n + 1) > alpha
    need = math.ceil(1 / alpha - 1)
    threshold, k_acc, e_acc, certified = math.inf, 0, 0, False
    reason = (f"n={n} too small for conformal risk control at alpha={alpha:g}: needs "
              f"(0 + 1) / (n + 1) <= alpha, n >= {need}")
  else:
    j = int(ok_points[-1])  # e grows down the grid: the satisfying points are a prefix
    threshold, k_acc, e_acc, certified = float(grid[j]), int(k[j]), int(e[j]), True
    reason = (f"expected risk (conformal risk control; weaker than the 1-delta guarantee): "
              f"E[share of records kept with a wrong answer] <= {alpha:g} at threshold "
              f"{threshold:g} ({k_acc}/{n} kept, {e_acc} wrong; bound "
              f"({e_acc} + 1) / ({n} + 1) = {(e_acc + 1) / (n + 1):.4f})")
  return StageCalibration(
      stage=stage, threshold=threshold, alpha=alpha, delta=delta, n=n, certified=certified,
      reason=reason, coverage=k_acc / n, escalation_rate=1.0 - k_acc / n,
      empirical_risk=(e_acc / k_acc) if k_acc else None,
      risk_upper_bound=(e_acc + 1) / (n + 1) if certified else None,
      n_accepted=k_acc, n_errors=e_acc, p_value=None,
      min_n_to_certify=math.ceil(1 / alpha - 1), method="crc",
      expected_cost_per_1k=_expected_cost_per_1k(costs, c, threshold))


def calibrate_threshold(
    confidence: Sequence[float],
    correct: Sequence[bool],
    alpha: float,
    delta: float,
    *,
    method: str = "ltt-binomial",
    candidate_thresholds: Optional[Sequence[float]] = None,
    small_cost: Optional[Cost] = None,
    frontier_cost: Optional[Cost] = None,
    fallback_errors: Optional[int] = 3,
    fallback_coverage: Optional[float] = 0.1,
    stage: Optional[str] = None,
) -> StageCalibration:
  """Lowest threshold with ``P(R(t*) <= alpha) >= 1 - delta`` (see the module docstring).

  ``method="crc"`` is the weaker expected-risk mode (``_conformal_risk_control``):
  E[share of all records kept with a wrong answer] <= alpha, no 1 - delta statement.

  ``candidate_thresholds`` must be chosen without looking at the calibration
  sample (default: a 0.001 grid on [0, 1]). The second walk starts at the first
  threshold accepting at least ``k2`` records, the larger of: enough that
  ``fallback_errors`` errors still pass at delta / 2, and ``fallback_coverage * n``
  (either None to leave it out; with both None, or ``k2`` no more than walk 1
  needs, a single walk at level delta: the plain fixed-sequence test).
  ``small_cost`` / ``frontier_cost``
  (a per-record scalar or one value per record, both or neither) give
  ``expected_cost_per_1k = 1000 * mean(small + frontier * escalated)``: the
  small model always runs, escalated records also pay the frontier model.
  """
  alpha, delta = _check_level(alpha, "alpha"), _check_level(delta, "delta")
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
  c, ok = _check_pair(confidence, correct)
  n = len(c)
  if n == 0:
    raise ValueError("need at least one calibration record")
  grid = _check_thresholds(candidate_thresholds)
  if fallback_errors is not None and (
      isinstance(fallback_errors, bool) or not isinstance(fallback_errors, (int, np.integer))
      or fallback_errors < 1):
    raise ValueError(f"fallback_errors must be an integer >= 1 or None, got {fallback_errors!r}")
  if fallback_coverage is not None:
    if isinstance(fallback_coverage, bool) or not 0.0 < float(fallback_coverage) <= 1.0:
      raise ValueError(f"fallback_coverage must be in (0, 1] or None, got {fallback_coverage!r}")
    fallback_coverage = float(fallback_coverage)
  if (small_cost is None) != (frontier_cost is None):
    raise ValueError("give both small_cost and frontier_cost, or neither")
  costs = None
  if small_cost is not None:
    costs = (_as_cost(small_cost, n, "small_cost"), _as_cost(frontier_cost, n, "frontier_cost"))
  k_min = min_accepted_to_certify(alpha, delta)

  # Accepted / wrong counts at every grid point (grid descending => k nondecreasing).
  order = np.argsort(c, kind="stable")
  below = np.searchsorted(c[order], grid, side="left")  # records with c < t
  wrong_below = np.concatenate(([0], np.cumsum(~ok[order])))
  k = n - below
  e = int(wrong_below[-1]) - wrong_below[below]

  if method == "crc":
    return _conformal_risk_control(c, k, e, n, grid, alpha, delta, costs, stage)

  chosen: Optional[int] = None
  level = delta
  if n < k_min:
    reason = (f"n={n} too small to certify alpha={alpha:g} at delta={delta:g}: even with "
              f"zero errors need >= {k_min} accepted records")
  elif k[-1] < k_min:
    reason = (f"no candidate threshold accepts >= {k_min} records (the most lenient, "
              f"{grid[-1]:g}, accepts {int(k[-1])}); certifying alpha={alpha:g} at "
              f"delta={delta:g} needs that many even with zero errors")
  else:
    chosen, level, failures = _walk(k, e, n, alpha, delta, method, fallback_errors,
                                      fallback_coverage)
    if chosen is None and not failures:
      reason = (f"no candidate threshold accepts >= {min_accepted_to_certify(alpha, delta / 2)} "
                f"records, needed to start the walk at level {delta / 2:g}")
    elif chosen is None:
      fails = "; ".join(
          f"at {grid[j]:g} ({int(k[j])} accepted, {int(e[j])} wrong) "
          f"p={_p_value(int(k[j]), int(e[j]), alpha, method):.3g} > level {lvl:g}"
          for j, lvl in failures)
      reason = (f"no threshold certified: the small model's selective risk is not shown to be "
                f"<= alpha={alpha:g} at delta={delta:g} (walk ended {fails})")
    else:
      stop = ("the most lenient candidate" if chosen == len(grid) - 1 else
              f"the walk stopped at {grid[chosen + 1]:g}")
      reason = (f"certified: P(selective risk <= {alpha:g}) >= {1 - delta:g} at threshold "
                f"{grid[chosen]:g} ({int(k[chosen])}/{n} accepted, {int(e[chosen])} wrong, "
                f"tested at level {level:g}; {stop})")

  need = None
  if chosen is None:
    threshold, k_acc, e_acc = math.inf, 0, 0
    emp = ucb = p = None
    need = _labels_to_certify(k, e, n, alpha, delta, method)
    if need is None:
      reason += ("; the observed error is >= alpha (or too close to it) at every threshold, "
                 "so more labels alone would not certify it")
    elif need <= n:  # a test would pass on these rates; the walk met an error before it
      need = None
      reason += ("; the walk stopped at an error before thresholds whose observed error "
                 "would pass, so another sample of this size may certify it")
    else:
      reason += (f"; about {need} labelled records would certify it if the observed error "
                 "rates held")
  else:
    threshold, k_acc, e_acc = float(grid[chosen]), int(k[chosen]), int(e[chosen])
    emp = e_acc / k_acc
    ucb = _upper_bound(k_acc, e_acc, level, method)
    p = _p_value(k_acc, e_acc, alpha, method)
  coverage = k_acc / n
  return StageCalibration(
      stage=stage, threshold=threshold, alpha=alpha, delta=delta, n=n,
      certified=chosen is not None, reason=reason, coverage=coverage,
      escalation_rate=1.0 - coverage, empirical_risk=emp, risk_upper_bound=ucb,
      n_accepted=k_acc, n_errors=e_acc, p_value=p, min_n_to_certify=k_min,
      method=method, expected_cost_per_1k=_expected_cost_per_1k(costs, c, threshold),
      labels_to_certify=need)


# ---------------------------------------------------------------- the file

def calibration_data_hash(data: Mapping[str, StageData]) -> str:
  """sha256 of ``{stage: (confidence, correct)}`` in a canonical form.

  Canonical: stages sorted by name, each stage's ``[confidence, 0/1]`` records
  sorted, compact JSON with shortest round-trip floats. Record order does not
  matter; any changed value or label does.
  """
  canon = {}
  for name in sorted(data):
    c, ok = _check_pair(*data[name])
    canon[name] = sorted([float(x), int(y)] for x, y in zip(c, ok))
  blob = json.dumps({"tierflow_calibration_data": 1, "stages": canon},
                    sort_keys=True, separators=(",", ":"), allow_nan=False)
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()


_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, kw_only=True)
class Calibration:
  """A versioned set of per-stage thresholds, saved as JSON next to a pipeline.

  ``reference`` says what the small tier's answers were scored against: ``labels`` (gold
  answers) or ``frontier`` (the frontier tier's answers on the same sample,
  ``reference_model`` naming it: the guarantee is then on agreement with that model).
  ``forecast``, when set, is the sample's per-record cost under these thresholds
  (``tierflow.forecast``).
  """
  stages: Dict[str, StageCalibration]
  data_hash: str
  source: str
  created_at: str
  format_version: int = FORMAT_VERSION
  reference: str = "labels"
  reference_model: Optional[str] = None
  forecast: Optional[dict] = None

  def __post_init__(self):
    if self.format_version != FORMAT_VERSION:
      raise ValueError(
          f"unsupported calibration format_version {self.format_version!r}; this tierflow "
          f"reads format_version {FORMAT_VERSION}")
    if not isinstance(self.data_hash, str) or not _HASH_RE.match(self.data_hash):
      raise ValueError(
          f"data_hash must be 64 lowercase hex digits (sha256), got {self.data_hash!r}")
    if not isinstance(self.source, str):
      raise ValueError(f"source must be a string, got {self.source!r}")
    if self.reference not in REFERENCES:
      raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
    if self.reference_model is not None and not isinstance(self.reference_model, str):
      raise ValueError(f"reference_model must be a string or null, got {self.reference_model!r}")
    if self.forecast is not None and not isinstance(self.forecast, Mapping):
      raise ValueError(f"forecast must be an object or null, got {self.forecast!r}")
    try:
      datetime.fromisoformat(self.created_at)
    except (TypeError, ValueError):
      raise ValueError(
          f"created_at must be an ISO 8601 date/time, got {self.created_at!r}") from None
    if not isinstance(self.stages, Mapping):
      raise ValueError("stages must map stage names to StageCalibration")
    for name, sc in self.stages.items():
      if not isinstance(name, str) or not name:
        raise ValueError(f"stage names must be non-empty strings, got {name!r}")
      if not isinstance(sc, StageCalibration):
        raise ValueError(f"stage {name!r}: expected a StageCalibration, got {type(sc).__name__}")
      if sc.stage is not None and sc.stage != name:
        raise ValueError(f"stage {name!r} holds the calibration of stage {sc.stage!r}")
    object.__setattr__(self, "stages", dict(self.stages))

  @classmethod
  def create(cls, stages: Mapping[str, StageCalibration], data: Mapping[str, StageData], *,
             source: str, created_at: Optional[str] = None, reference: str = "labels",
             reference_model: Optional[str] = None) -> "Calibration":
    """Bundle stage results with the hash of the data they were calibrated on."""
    if set(stages) != set(data):
      raise ValueError(f"stages {sorted(stages)} and data {sorted(data)} name different stages")
    named = {}
    for name, sc in stages.items():
      if sc.n != len(data[name][0]):
        raise ValueError(
            f"stage {name!r} was calibrated on n={sc.n} records, data has {len(data[name][0])}")
      named[name] = sc if sc.stage == name else dataclasses.replace(sc, stage=sc.stage or name)
    if created_at is None:
      created_at = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    return cls(stages=named, data_hash=calibration_data_hash(data), source=source,
               created_at=created_at, reference=reference, reference_model=reference_model)

  def threshold(self, stage: str) -> float:
    """The stage's threshold: escalate iff not ``confidence >= threshold``."""
    try:
      return self.stages[stage].threshold
    except KeyError:
      raise KeyError(
          f"no calibration for stage {stage!r}; calibrated: {sorted(self.stages)}") from None

  def matches_data(self, data: Mapping[str, StageData]) -> bool:
    return calibration_data_hash(data) == self.data_hash

  def to_json(self) -> str:
    doc = {
        "format_version": self.format_version,
        "created_at": self.created_at,
        "source": self.source,
        "data_hash": self.data_hash,
        "stages": {name: sc.to_dict() for name, sc in sorted(self.stages.items())},
        "reference": self.reference,
        "reference_model": self.reference_model,
    }
    if self.forecast is not None:
      doc["forecast"] = self.forecast
    return json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"

  @classmethod
  def from_json(cls, text: str) -> "Calibration":
    try:
      doc = json.loads(text)
    except json.JSONDecodeError as err:
      raise ValueError(f"not a calibration file (invalid JSON: {err})") from None
    if not isinstance(doc, dict):
      raise ValueError("not a calibration file (top level is not an object)")
    if "format_version" not in doc:
      raise ValueError("not a calibration file (no format_version)")
    version = doc["format_version"]
    if version != FORMAT_VERSION or isinstance(version, bool):
      raise ValueError(
          f"unsupported calibration format_version {version!r}; this tierflow reads "
          f"format_version {FORMAT_VERSION}")
    expected = {"format_version", "created_at", "source", "data_hash", "stages"}
    optional = {"reference", "reference_model", "forecast"}  # absent from older files
    if not expected <= set(doc) <= expected | optional:
      raise ValueError(
          f"bad calibration file fields: missing {sorted(expected - set(doc))}, "
          f"unknown {sorted(set(doc) - expected - optional)}")
    if not isinstance(doc["stages"], dict):
      raise ValueError("stages must be an object")
    stages = {}
    for name, d in doc["stages"].items():
      try:
        stages[name] = StageCalibration.from_dict(d)
      except (TypeError, ValueError) as err:
        raise ValueError(f"stage {name!r}: {err}") from None
    return cls(stages=stages, data_hash=doc["data_hash"], source=doc["source"],
               created_at=doc["created_at"], format_version=version,
               reference=doc.get("reference", "labels"),
               reference_model=doc.get("reference_model"), forecast=doc.get("forecast"))

  def save(self, path: Union[str, os.PathLike]) -> None:
    """Write atomically (temp file in the same directory, then rename)."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(
        dir=os.path.dirname(path) or ".", prefix=".calibration-", suffix=".tmp")
    try:
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(self.to_json())
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.unlink(tmp)
      raise

  @classmethod
  def load(cls, path: Union[str, os.PathLike]) -> "Calibration":
    from tierflow.files import read_text
    text = read_text(path)
    try:
      return cls.from_json(text)
    except ValueError as err:
      raise ValueError(f"{os.fspath(path)}: {err}") from None
