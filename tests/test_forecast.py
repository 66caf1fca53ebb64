"""The forecast's intervals cover what a run of records like the sample costs: simulated
over many samples and ranges of a skewed cost distribution (most records cheap, the
escalated ones expensive), as in a routed run."""

from __future__ import annotations

import numpy as np
import pytest

from tierflow.forecast import forecast


def _block(cost: np.ndarray, escalated: np.ndarray) -> dict:
  def ms(x):
    return [float(np.mean(x)), float(np.std(x, ddof=1))]
  return {"records": len(cost), "stages": {}, "cost_usd": ms(cost),
          "frontier_usd": ms(cost * escalated), "escalated": ms(escalated.astype(float)),
          "frontier_only_usd": ms(cost + 0.002)}


def _population(rng, size: int) -> tuple[np.ndarray, np.ndarray]:
  escalated = rng.random(size) < 0.3
  cost = np.where(escalated, rng.lognormal(np.log(2e-3), 0.6, size),
                  rng.uniform(1e-5, 5e-5, size))
  return cost, escalated


@pytest.mark.parametrize("n,records", [(160, 240), (500, 20_000), (100, 100)])
def test_intervals_cover_the_runs_total_at_their_level(n, records):
  rng = np.random.default_rng(7)
  draws, held = 2000, {"cost_usd": 0, "escalated_share": 0}
  for _ in range(draws):
    cost, esc = _population(rng, n)
    f = forecast(_block(cost, esc), records)
    run_cost, run_esc = _population(rng, records)
    held["cost_usd"] += f["cost_usd"]["lo"] <= run_cost.sum() <= f["cost_usd"]["hi"]
    share = run_esc.mean()
    held["escalated_share"] += f["escalated_share"]["lo"] <= share <= f["escalated_share"]["hi"]
  # 95% intervals: at least 93% of the draws (normal approximation, skewed costs).
  assert held["cost_usd"] / draws >= 0.93, held
  assert held["escalated_share"] / draws >= 0.92, held


def test_a_range_must_hold_records():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="records"):
    forecast(_block(*_population(rng, 50)), 0)
