"""A run's cost summary, read back from its Parquet output (through ``tierflow.results``)."""

from __future__ import annotations

import numpy as np

from tierflow.results import is_null, read_run


def cost_summary(output_dir: str) -> dict:
  """Records, escalation rate per stage, total cost, frontier-only cost and saving.

  Rows are deduplicated by ``record_id`` as every reader of results does (an ok row if
  any, else the last).
  """
  run = read_run(output_dir)
  n = run.n
  total = float(np.nansum(run.records["cost_usd"]))
  frontier_only = float(np.nansum(run.records["frontier_only_cost_usd"]))
  per_stage: dict = {}
  for s in run.stages:
    p = s.present
    per_stage[s.name] = {
        "escalated": int((s.col("escalated") & p).sum()),
        "budget_skipped": int((s.col("budget_skipped") & p).sum()),
        "small_failed": int((p & ~is_null(s.col("small_error"))).sum()),
        "cost_usd": float(np.nansum(s.col("cost_usd")[p])),
    }
    per_stage[s.name]["escalation_rate"] = per_stage[s.name]["escalated"] / n if n else 0.0
  failed = int(sum(1 for v in run.records["status"] if v == "failed"))
  unverified = int(sum(1 for v in run.records["status"] if v == "unverified"))
  return {
      "records": n, "failed": failed, "unverified": unverified,
      "escalated_records": int(run.records["escalated"].sum()),
      "cost_usd": total, "frontier_only_cost_usd": frontier_only,
      "saving_usd": frontier_only - total,
      "saving_pct": 100.0 * (frontier_only - total) / frontier_only if frontier_only else 0.0,
      "stages": per_stage,
  }


def format_summary(s: dict) -> str:
  lines = [f"records {s['records']}  (failed {s['failed']}, unverified {s['unverified']}, "
           f"escalated {s['escalated_records']})"]
  for name, d in s["stages"].items():
    lines.append(f"  {name:<10} escalated {d['escalation_rate']:6.1%}  "
                 f"(small failed {d['small_failed']}, budget-skipped {d['budget_skipped']})  "
                 f"cost ${d['cost_usd']:.6f}")
  lines.append(f"total cost          ${s['cost_usd']:.6f}")
  lines.append(f"frontier-only cost  ${s['frontier_only_cost_usd']:.6f}  (estimated from the same tokens)")
  lines.append(f"saving              ${s['saving_usd']:.6f}  ({s['saving_pct']:.1f}%)")
  return "\n".join(lines)
