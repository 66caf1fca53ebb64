"""A backfill through the providers' batch APIs against the same backfill synchronously,
and the budget's approval ratio with several worker processes.

    python -m benchmarks.batch_vs_sync                     # 10,000 tickets, both parts
    python -m benchmarks.batch_vs_sync --records 2000 --part batch

**Part batch.** N tickets (the bundled sample, repeated) on 4 partitions of the embedded
broker; ``tickets`` with the bundled stages and thresholds runs once synchronously and once
with ``--batch-tiers small,frontier``, both against the local endpoints (the keyword
stand-in behind the real OpenAI and Anthropic wire formats, batches answered after
``--batch-seconds``: the real ones take up to 24 h). Reported: billed cost of each (the
ledger, summed with pyarrow), their ratio, how many stage answers agree, wall time of each,
the batches submitted. Stand-in answers: cost and agreement only, nothing about quality.

**Part budget.** The same tickets with ``--budget-usd`` on FnApiRunner with 4 worker
processes: spend against the cap, escalations approved against what the cap could pay for
at the realised price of an approved escalation, and how many processes made frontier
calls (``x-tierflow-worker`` at the endpoint).

Writes ``benchmarks/results/batch-vs-sync-<date>.json`` and prints Markdown.
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime as _dt
import json
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as pds
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _config(tmp: Path, server, budget=None) -> str:
  config = yaml.safe_load((ROOT / "tierflow/data/tickets.yaml").read_text())
  config = copy.deepcopy(config)
  config["budget_usd"] = budget
  config["models"]["small"].update(base_url=server.openai_base_url, model="small",
                                   api_key_env="", price_as="gpt-5-nano", batch_size=8,
                                   concurrency=4, batch_poll_s=0.2)
  config["models"]["frontier"].update(provider="anthropic", base_url=server.anthropic_base_url,
                                      model="frontier", api_key_env="",
                                      price_as="claude-sonnet-4-6", batch_size=4,
                                      concurrency=4, batch_poll_s=0.2)
  path = tmp / f"tickets-{time.time_ns()}.yaml"
  path.write_text(yaml.safe_dump(config))
  return str(path)


def _stages(out: str) -> list[dict]:
  table = pds.dataset(f"{out}/results", format="parquet").to_table(
      columns=["record_id", "stages"])
  rows = []
  for rec, stages in zip(table.column("record_id").to_pylist(),
                         table.column("stages").to_pylist()):
    for s in stages:
      rows.append({"record_id": rec, **s})
  return rows


def _run(broker, topic: str, out: str, config: str, *extra: str) -> tuple[object, float]:
  from tierflow import launcher
  started = time.monotonic()
  summary = launcher.launch("tickets", [
      "--bootstrap-servers", broker.bootstrap_servers, "--topic", topic, "--output", out,
      "--config", config, "--commit-offsets", "never", "--rows-per-file", "2500", *extra])
  return summary, time.monotonic() - started


def part_batch(broker, topic: str, tmp: Path, n: int, batch_seconds: float) -> dict:
  from tierflow_local.provider_server import LocalProviderServer
  from tierflow_local.standin_model import KeywordStandIn
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier")) as server:
    server.batches.complete_seconds = batch_seconds
    config = _config(tmp, server)
    sync, sync_s = _run(broker, topic, str(tmp / "sync"), config)
    batch, batch_s = _run(broker, topic, str(tmp / "batch"), config,
                          "--batch-tiers", "small,frontier")
    submitted = collections.Counter(b.split("_")[0] for b in server.batches.created)
  a = {(r["record_id"], r["stage"]): r for r in _stages(str(tmp / "sync"))}
  b = {(r["record_id"], r["stage"]): r for r in _stages(str(tmp / "batch"))}
  same = sum(1 for k in a if k in b and a[k]["small_answer"] == b[k]["small_answer"]
             and a[k]["final_tier"] == b[k]["final_tier"])
  cost_a = sum(r["cost_usd"] for r in a.values())
  cost_b = sum(r["cost_usd"] for r in b.values())
  return {"records": n, "rows": [sync.rows_written, batch.rows_written],
          "exit_codes": [sync.exit_code, batch.exit_code],
          "stage_answers": len(a), "same_answers": same,
          "cost_sync_usd": cost_a, "cost_batch_usd": cost_b, "ratio": cost_b / cost_a,
          "wall_sync_s": sync_s, "wall_batch_s": batch_s, "batch_seconds": batch_seconds,
          "batches_submitted": dict(submitted),
          "batches": {t: batch.metrics.get(f"tierflow.routing.{t}_batches", 0)
                      for t in ("small", "frontier")},
          "polls": {t: batch.metrics.get(f"tierflow.routing.{t}_batch_polls", 0)
                    for t in ("small", "frontier")},
          "offset_batches": batch.metrics.get("tierflow.kafka.batches_read", 0)}


def part_budget(broker, topic: str, tmp: Path, cap: float) -> dict:
  from tierflow_local.provider_server import LocalProviderServer
  from tierflow_local.standin_model import KeywordStandIn
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier")) as server:
    out = str(tmp / "budget")
    summary, wall = _run(broker, topic, out, _config(tmp, server, budget=cap),
                         "--direct_running_mode=multi_processing", "--direct_num_workers=4")
    senders = {r.headers.get("x-tierflow-worker") for r in server.requests
               if r.model == "frontier" and r.status == 200}
  stages = _stages(out)
  spent = sum(s["frontier_cost_usd"] for s in stages)
  approved = sum(1 for s in stages if s["frontier_cost_usd"] > 0)
  skipped = sum(1 for s in stages if s["budget_skipped"])
  affordable = min(cap / (spent / approved), approved + skipped) if approved else 0
  return {"cap_usd": cap, "spent_usd": spent, "approved": approved, "skipped": skipped,
          "affordable": affordable, "approval_ratio": approved / affordable if affordable else 0,
          "frontier_processes": len(senders), "wall_s": wall, "exit_code": summary.exit_code}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--records", type=int, default=10_000)
  parser.add_argument("--part", choices=("batch", "budget", "both"), default="both")
  parser.add_argument("--batch-seconds", type=float, default=2.0,
                      help="how long the local endpoints take to answer a batch")
  parser.add_argument("--budget-usd", type=float, default=None,
                      help="part budget's cap (default: $0.10 per 1,000 records)")
  args = parser.parse_args(argv)
  from tierflow_local.broker import EmbeddedBroker
  from tierflow_local.loader import publish, sample_tickets
  tickets = sample_tickets()
  records = (tickets * (args.records // len(tickets) + 1))[:args.records]
  out = {"date": _dt.date.today().isoformat(), "records": args.records}
  with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
    broker.create_topic("bench", 4)
    publish(broker.bootstrap_servers, "bench", records)
    if args.part in ("batch", "both"):
      out["batch"] = part_batch(broker, "bench", Path(tmp), args.records, args.batch_seconds)
    if args.part in ("budget", "both"):
      cap = args.budget_usd if args.budget_usd is not None else 0.10 * args.records / 1000
      out["budget"] = part_budget(broker, "bench", Path(tmp), cap)
  (HERE / "results").mkdir(exist_ok=True)
  path = HERE / "results" / f"batch-vs-sync-{out['date']}.json"
  path.write_text(json.dumps(out, indent=1))
  if "batch" in out:
    b = out["batch"]
    print("| run | billed cost | wall time | stage answers equal |\n|---|---|---|---|")
    print(f"| sync | ${b['cost_sync_usd']:.4f} | {b['wall_sync_s']:.0f} s | |")
    print(f"| batch (both tiers) | ${b['cost_batch_usd']:.4f} ({b['ratio']:.3f}x) | "
          f"{b['wall_batch_s']:.0f} s (batches answered after {b['batch_seconds']:g} s) | "
          f"{b['same_answers']} of {b['stage_answers']} |")
    print(f"\n{b['offset_batches']} offset batches; provider batches: {b['batches']}; "
          f"status polls: {b['polls']}")
  if "budget" in out:
    g = out["budget"]
    print(f"\nbudget ${g['cap_usd']:.2f}, 4 worker processes: spent ${g['spent_usd']:.4f}, "
          f"{g['approved']} escalations approved of ~{g['affordable']:.0f} affordable "
          f"({g['approval_ratio']:.0%}), frontier calls from {g['frontier_processes']} "
          "processes")
  print(f"\n{path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
