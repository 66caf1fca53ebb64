"""A synthetic tickets run (results + dead letters + labels) for tests/test_report.py.

Rows follow the Arrow schema derived from the Avro schemas, like the pipeline
writes them: classify -> extract -> summarise stages, confidence-driven
escalations, small-tier failures, budget skips, frontier failures, failed
records, and an overlapping second file so some record_ids appear twice.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tierflow import schemas

SMALL, FRONTIER = "gpt-5-nano", "claude-sonnet-4-6"
PRICE_BOOK = "2026-11-22"
CATEGORIES = ("billing", "shipping", "returns", "account", "product_defect", "other")
THRESHOLDS = {"classify": 0.6, "extract": 0.5, "summarise": 0.5}
T0_MS = 1_795_132_800_000  # 2026-11-20T00:00:00Z


def result_schema(*, small_answer: bool = True) -> pa.Schema:
  """The results file schema: derived from the Avro schemas, without ``dt``."""
  from tierflow.config import load_config
  from tierflow.connectors.decode import row_schema
  from tierflow.pipelines.ledger import result_schema as routed_schema
  schema = schemas.to_arrow(routed_schema(row_schema(schemas.load("ticket")),
                                          load_config("tickets")))
  schema = schema.remove(schema.get_field_index("dt"))
  if small_answer:
    return schema
  i = schema.get_field_index("stages")
  item = schema.field(i).type.value_field
  struct = pa.struct([f for f in item.type if f.name != "small_answer"])
  stages = pa.field("stages", pa.list_(pa.field(item.name, struct, nullable=item.nullable)),
                    nullable=False)
  return schema.set(i, stages)


def dead_letter_schema() -> pa.Schema:
  schema = schemas.to_arrow(schemas.load("dead_letter"))
  return schema.remove(schema.get_field_index("dt"))


def _truth(i: int, rng) -> dict:
  has_order = i % 3 != 0
  return {
      "ticket_id": f"T-{i:06d}",
      "category": CATEGORIES[i % len(CATEGORIES)],
      "order_id": f"NW-{40000 + i}" if has_order else None,
      "amount": round(float(rng.integers(5, 500)) + 0.5, 2) if i % 4 == 1 else None,
      "currency": "USD" if i % 4 == 1 else None,
  }


def _wrong(kind: str, truth: dict, rng) -> str:
  if kind == "classify":
    others = [c for c in CATEGORIES if c != truth["category"]]
    return others[int(rng.integers(len(others)))]
  fields = {k: truth[k] for k in ("order_id", "amount", "currency")}
  fields["order_id"] = "NW-99999"
  return json.dumps(fields, sort_keys=True)


def _right(kind: str, truth: dict, i: int) -> str:
  if kind == "classify":
    return truth["category"]
  if kind == "extract":
    return json.dumps({k: truth[k] for k in ("order_id", "amount", "currency")}, sort_keys=True)
  return f"Customer {i} writes about {truth['category']}."


def _stage(name: str, i: int, truth: dict, rng) -> dict:
  """One stage's ledger entry and its final answer (``_final``)."""
  t = THRESHOLDS[name]
  small_failed = (i + len(name)) % 23 == 0
  conf = None if small_failed else float(np.round(rng.uniform(0.05, 1.0), 3))
  if name == "extract" and i % 41 == 2:
    conf = None  # no confidence signal
  small_right = (not small_failed) and rng.random() < 0.35 + 0.6 * (conf or 0.5)
  small_answer = None if small_failed else (
      _right(name, truth, i) if small_right else _wrong(name, truth, rng))
  reason = None
  if small_failed:
    reason = "small tier failed (timeout: read timed out)"
  elif conf is None:
    reason = "no confidence signal"
  elif conf < t:
    reason = f"confidence {conf:.3f} < {t:.3f}"
  budget_skipped = reason is not None and i % 17 == 4
  escalated = reason is not None and not budget_skipped
  frontier_failed = escalated and i % 19 == 6
  small_cost = float(rng.uniform(1e-5, 4e-5)) if not small_failed else 0.0
  small_as_frontier = small_cost * 25 if not small_failed else float(rng.uniform(4e-4, 8e-4))
  frontier_cost = float(rng.uniform(4e-4, 1.6e-3)) if escalated and not frontier_failed else 0.0
  frontier_answer = None
  if escalated and not frontier_failed:
    frontier_answer = (_right(name, truth, i) if rng.random() < 0.88
                       else _wrong(name, truth, rng)) if name != "summarise" \
        else _right(name, truth, i)
  final, tier = (frontier_answer, "frontier") if frontier_answer is not None else (
      (small_answer, "small") if small_answer is not None else (None, None))
  return {
      "stage": name, "kind": "summarise" if name == "summarise" else name,
      "final_tier": tier, "final_model": {"small": SMALL, "frontier": FRONTIER}.get(tier),
      "confidence": conf, "confidence_signal": None if conf is None else "logprob",
      "threshold": t, "escalated": escalated, "escalation_reason": reason,
      "budget_skipped": budget_skipped,
      "unverified_reason": None if not (tier == "small" and reason) else
      "budget cap reached" if budget_skipped else
      "frontier failed (server_error: 529 overloaded)" if frontier_failed else "not escalated",
      "small_model": SMALL, "small_endpoint": "api.openai.com",
      "small_input_tokens": 300, "small_output_tokens": 20, "small_cache_read_tokens": 0,
      "small_cache_write_tokens": 0, "small_reasoning_tokens": 0, "small_cost_usd": small_cost,
      "small_billing_mode": "sync", "small_answer": small_answer,
      "small_error": "timeout: read timed out" if small_failed else None,
      "frontier_model": FRONTIER if escalated else None,
      "frontier_endpoint": "api.anthropic.com" if escalated else None,
      "frontier_input_tokens": 300 if escalated else 0,
      "frontier_output_tokens": 20 if escalated else 0,
      "frontier_cache_read_tokens": 0, "frontier_cache_write_tokens": 0,
      "frontier_reasoning_tokens": 0, "frontier_billing_mode": "sync" if escalated else None,
      "frontier_cost_usd": frontier_cost,
      "frontier_error": "server_error: 529 overloaded" if frontier_failed else None,
      "cost_usd": small_cost + frontier_cost,
      "frontier_only_cost_usd": frontier_cost if frontier_answer is not None
      else small_as_frontier,
      "_final": final,
  }


def make_rows(n: int = 240, seed: int = 7) -> tuple[list[dict], list[dict]]:
  """(result rows, label rows) for ``n`` tickets."""
  rng = np.random.default_rng(seed)
  rows, labels = [], []
  for i in range(n):
    truth = _truth(i, rng)
    stages = [_stage(name, i, truth, rng) for name in ("classify", "extract", "summarise")]
    finals = {s["stage"]: s.pop("_final") for s in stages}
    failed = [s["stage"] for s in stages if finals[s["stage"]] is None]
    reasons = [f"{s['stage']}: {s['escalation_reason']}" for s in stages
               if s["escalation_reason"]]
    rows.append({
        "record_id": f"tickets-0-{i}", "kafka_topic": "tickets", "kafka_partition": 0,
        "kafka_offset": i, "kafka_timestamp": T0_MS + 1000 * i,
        "ticket_id": truth["ticket_id"], "created_at": T0_MS + 1000 * i,
        "subject": f"subject {i}", "body": f"body {i}", "channel": "email",
        "customer_id": None,
        "status": "failed" if failed else "unverified" if any(
            s["unverified_reason"] for s in stages) else "ok",
        "error": "; ".join(f"{s}: failed" for s in failed) or None,
        "label": finals["classify"], "label_confidence": None,
        "extraction": json.loads(finals["extract"]) if finals["extract"] else None,
        "extraction_confidence": None,
        "summary": finals["summarise"], "summary_confidence": None,
        "escalated": any(s["escalated"] for s in stages), "escalation_reasons": reasons,
        "budget_skipped": any(s["budget_skipped"] for s in stages),
        "injection_suspected": False,
        "cost_usd": sum(s["cost_usd"] for s in stages),
        "small_cost_usd": sum(s["small_cost_usd"] for s in stages),
        "frontier_cost_usd": sum(s["frontier_cost_usd"] for s in stages),
        "frontier_only_cost_usd": sum(s["frontier_only_cost_usd"] for s in stages),
        "input_tokens": 900, "output_tokens": 60, "stages": stages,
        "price_book_version": PRICE_BOOK, "calibration_version": "cal-test-1",
    })
    labels.append(truth)
  return rows, labels


def _write(path: str, rows: list[dict], schema: pa.Schema) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if "stages" in schema.names and "small_answer" not in str(schema.field("stages").type):
    rows = [{**r, "stages": [{k: v for k, v in s.items() if k != "small_answer"}
                             for s in r["stages"]]} for r in rows]
  pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def write_run(root: str, *, n: int = 240, seed: int = 7, small_answer: bool = True,
              labels_path: Optional[str] = None) -> dict:
  """Writes a run under ``root``; returns paths and the rows written.

  Files: ``results/dt=2026-11-20/a.parquet`` (records 0..149),
  ``results/dt=2026-11-20/b.parquet`` (records 120..n-11, so 120..149 twice) and
  ``results/dt=2026-11-21/c.parquet`` (the last 10); dead letters for the
  failed records plus one decode failure; labels for all but three tickets,
  plus two tickets not in the run.
  """
  rows, labels = make_rows(n, seed)
  schema = result_schema(small_answer=small_answer)
  _write(os.path.join(root, "results", "dt=2026-11-20", "a.parquet"), rows[:150], schema)
  _write(os.path.join(root, "results", "dt=2026-11-20", "b.parquet"), rows[120:n - 10], schema)
  _write(os.path.join(root, "results", "dt=2026-11-21", "c.parquet"), rows[n - 10:], schema)
  dead = [{"record_id": r["record_id"], "kafka_topic": "tickets", "kafka_partition": 0,
           "kafka_offset": r["kafka_offset"], "kafka_timestamp": r["kafka_timestamp"],
           "stage": "classify", "error_type": "model_error", "reason": r["error"],
           "raw_key": None, "raw_value": None, "failed_at": T0_MS}
          for r in rows if r["status"] == "failed"]
  dead.append({"record_id": "tickets-0-99999", "kafka_topic": "tickets", "kafka_partition": 0,
               "kafka_offset": 99999, "kafka_timestamp": T0_MS, "stage": "decode",
               "error_type": "invalid_utf8", "reason": "bad bytes", "raw_key": None,
               "raw_value": b"\xff", "failed_at": T0_MS})
  _write(os.path.join(root, "dead_letter", "dt=2026-11-20", "d.parquet"), dead,
         dead_letter_schema())
  labels_path = labels_path or os.path.join(root, "labels.jsonl")
  extra = [{"ticket_id": "T-999998", "category": "other", "order_id": None, "amount": None,
            "currency": None},
           {"ticket_id": "T-999999", "category": "billing", "order_id": None, "amount": None,
            "currency": None}]
  with open(labels_path, "w", encoding="utf-8") as f:
    for row in [l for l in labels if l["ticket_id"] not in ("T-000010", "T-000011", "T-000012")
                ] + extra:
      f.write(json.dumps(row) + "\n")
  return {"root": root, "labels": labels_path, "rows": rows}
