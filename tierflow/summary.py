"""A run's cost summary, read back from its Parquet output."""

from __future__ import annotations

import pyarrow.compute as pc
import pyarrow.dataset as ds

from tierflow.connectors.parquet_dataset import hive_partitioning


def cost_summary(output_dir: str) -> dict:
  """Records, escalation rate per stage, total cost, frontier-only cost and saving.

  Rows are deduplicated by ``record_id`` (overlapping re-runs store a record twice).
  """
  table = ds.dataset(f"{output_dir}/results", format="parquet",
                     partitioning=hive_partitioning()).to_table()
  seen, keep = set(), []
  for i, rid in enumerate(table.column("record_id").to_pylist()):
    if rid not in seen:
      seen.add(rid)
      keep.append(i)
  table = table.take(keep)
  n = table.num_rows
  total = pc.sum(table.column("cost_usd")).as_py() or 0.0
  frontier_only = pc.sum(table.column("frontier_only_cost_usd")).as_py() or 0.0
  per_stage: dict = {}
  for stages in table.column("stages").to_pylist():
    for s in stages:
      d = per_stage.setdefault(s["stage"], {"escalated": 0, "budget_skipped": 0,
                                            "small_failed": 0, "cost_usd": 0.0})
      d["escalated"] += bool(s["escalated"])
      d["budget_skipped"] += bool(s["budget_skipped"])
      d["small_failed"] += s["small_error"] is not None
      d["cost_usd"] += s["cost_usd"]
  for d in per_stage.values():
    d["escalation_rate"] = d["escalated"] / n if n else 0.0
  failed = sum(1 for s in table.column("status").to_pylist() if s != "ok")
  return {
      "records": n, "failed": failed,
      "escalated_records": sum(bool(x) for x in table.column("escalated").to_pylist()),
      "cost_usd": total, "frontier_only_cost_usd": frontier_only,
      "saving_usd": frontier_only - total,
      "saving_pct": 100.0 * (frontier_only - total) / frontier_only if frontier_only else 0.0,
      "stages": per_stage,
  }


def format_summary(s: dict) -> str:
  lines = [f"records {s['records']}  (failed {s['failed']}, escalated {s['escalated_records']})"]
  for name, d in s["stages"].items():
    lines.append(f"  {name:<10} escalated {d['escalation_rate']:6.1%}  "
                 f"(small failed {d['small_failed']}, budget-skipped {d['budget_skipped']})  "
                 f"cost ${d['cost_usd']:.6f}")
  lines.append(f"total cost          ${s['cost_usd']:.6f}")
  lines.append(f"frontier-only cost  ${s['frontier_only_cost_usd']:.6f}  (estimated from the same tokens)")
  lines.append(f"saving              ${s['saving_usd']:.6f}  ({s['saving_pct']:.1f}%)")
  return "\n".join(lines)
