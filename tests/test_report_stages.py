"""Every stage of a kind is scored by its own output column: two classify stages (category,
written to column ``category``, and urgency, to column ``urgency``) routed through real
endpoints whose tiers disagree, written to Parquet, then ``tierflow report`` against gold
labels and the frontier's answers taken as a labels file."""

from __future__ import annotations

import dataclasses
import json
import math

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline

from tierflow import report, schemas
from tierflow import transforms as tf
from tierflow.frontier_reference import write_frontier_labels
from tierflow_local.provider_server import LocalProviderServer
from two_tiers import TwoTiers

T0_MS = 1_767_225_600_000
TICKET = schemas.load("ticket")
CATEGORIES = ("billing", "shipping", "returns", "account", "product_defect", "other")
# (body, gold category, gold urgency): the small tier knows only the first three keywords of
# each category (tests/two_tiers.py), so it misfiles some; the gold urgency is not always
# what the words say.
TICKETS = [
    ("Urgent: I was charged twice, refund the payment now", "billing", "urgent"),
    ("A routine question about my invoice and the fee", "billing", "routine"),
    ("Where is my parcel? Urgent, the delivery is late", "shipping", "urgent"),
    ("Routine: the courier left the package at the wrong address", "shipping", "routine"),
    ("I want to return this and get a swap, urgent", "returns", "routine"),
    ("Routine exchange: wrong size, send back label please", "returns", "routine"),
    ("Urgent: my account is locked, I cannot log in", "account", "urgent"),
    ("Routine: reset my password and username", "account", "urgent"),
    ("The kettle is broken and stopped working, urgent", "product_defect", "urgent"),
    ("Routine report: the lid arrived cracked and damaged", "product_defect", "routine"),
    ("Thank you, great service, just feedback (routine)", "other", "routine"),
    ("A wholesale partnership question, urgent please", "other", "routine"),
]


def _config(server, category: float, urgency: float) -> tf.RunConfig:
  """The two stages, with these thresholds."""
  base = (tf.load_config("tickets")
          .with_model("small", model="small", base_url=server.openai_base_url,
                      api_key_env=None, price_as="gpt-5-nano", batch_size=4)
          .with_model("frontier", provider="anthropic", model="frontier", api_key_env=None,
                      base_url=server.anthropic_base_url, price_as="claude-sonnet-4-6"))
  return dataclasses.replace(base, stages=(
      tf.StageConfig(name="category", kind="classify", labels=CATEGORIES, output="category",
                     threshold=category),
      tf.StageConfig(name="urgency", kind="classify", labels=("urgent", "routine"),
                     threshold=urgency)))


def _run(config: tf.RunConfig, out: str) -> None:
  add = tf.AddSourceFields("tickets", id_field="ticket_id", time_field="created_at")
  route = tf.RouteThroughTiers(config)
  schema = route.result_schema(add.row_schema(TICKET))
  rows = [{"ticket_id": f"T-{i:02d}", "created_at": T0_MS + i, "subject": "help",
           "body": body, "channel": "email", "customer_id": None}
          for i, (body, _, _) in enumerate(TICKETS)]
  with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
    _ = p | beam.Create(rows) | add | route | tf.WriteParquetDataset(out, schema)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("two_classify")
  out = {"routed": str(tmp / "routed"), "all": str(tmp / "escalate_all"),
         "gold": str(tmp / "gold.jsonl"), "category_only": str(tmp / "category_only.jsonl")}
  with LocalProviderServer(TwoTiers(), models=("small", "frontier")) as server:
    # category: the small tier's confident answers kept, the others escalated (where the
    # tiers' answers differ); urgency: every small answer kept
    _run(_config(server, 0.9, 0.5), out["routed"])
    _run(_config(server, math.inf, math.inf), out["all"])  # every stage on the frontier
  gold = [{"ticket_id": f"T-{i:02d}", "category": c, "urgency": u}
          for i, (_, c, u) in enumerate(TICKETS)]
  with open(out["gold"], "w", encoding="utf-8") as f:
    f.writelines(json.dumps(g) + "\n" for g in gold)
  with open(out["category_only"], "w", encoding="utf-8") as f:
    f.writelines(json.dumps({"ticket_id": g["ticket_id"], "category": g["category"]}) + "\n"
                 for g in gold)
  out["gold_rows"] = {g["ticket_id"]: g for g in gold}
  return out


def _expected(results: str, gold: dict, stage: str) -> dict:
  """A stage's figures from the Parquet rows and the labels, counted here: the final answer
  is the stage's own column (named like the stage), the small one its ledger entry's."""
  rows = pq.read_table(results).to_pylist()
  final = small = kept = kept_right = 0
  for r in rows:
    truth = gold[r["ticket_id"]][stage]
    ledger = next(s for s in r["stages"] if s["stage"] == stage)
    final += r[stage] == truth
    small += ledger["small_answer"] == truth
    if ledger["escalation_reason"] is None:
      kept += 1
      kept_right += r[stage] == truth
  n = len(rows)
  return {"labelled_records": n, "routed_accuracy": final / n, "small_only_accuracy": small / n,
          "non_escalated_records": kept,
          "error_non_escalated": (kept - kept_right) / kept if kept else None}


def test_the_report_scores_both_classify_stages_each_by_its_own_column(runs):
  rep = report.build_report(runs["routed"], runs["gold"], resamples=20, charts=False)
  assert rep["inputs"]["label_fields"] == {"category": ["category"], "urgency": ["urgency"]}
  assert not [n for n in rep["notes"] if "not scored" in n], rep["notes"]
  figures = {}
  for stage in ("category", "urgency"):
    want = _expected(runs["routed"], runs["gold_rows"], stage)
    got = rep["stages"][stage]["quality"]
    assert {k: got[k] for k in want} == pytest.approx(want), stage
    figures[stage] = want
  # The two stages' figures are their own: neither is the other's, nor all right.
  assert figures["category"]["routed_accuracy"] != figures["urgency"]["routed_accuracy"]
  assert figures["category"]["small_only_accuracy"] < figures["category"]["routed_accuracy"]
  assert 0 < figures["urgency"]["routed_accuracy"] < 1
  assert 0 < figures["category"]["non_escalated_records"] < len(TICKETS)
  assert figures["urgency"]["error_non_escalated"] > 0
  quality = rep["quality"]
  assert quality["scored_stages"] == ["category", "urgency"]
  assert quality["routed_accuracy"] == pytest.approx(
      sum(figures[s]["routed_accuracy"] for s in figures) / 2)


def test_a_label_column_two_stages_would_default_to_scores_only_the_stage_named_like_it(runs):
  """Labels with only ``category``: the urgency stage would fall back to it (a classify
  stage's default columns are its name, ``category``, ``label``); it is left unscored,
  and says why, instead of being scored against the categories."""
  rep = report.build_report(runs["routed"], runs["category_only"], resamples=20, charts=False)
  assert rep["inputs"]["label_fields"] == {"category": ["category"]}
  assert rep["stages"]["urgency"]["quality"] is None
  assert any(n.startswith("stage urgency is not scored: label column(s) category would score "
                          "other stages too") for n in rep["notes"]), rep["notes"]
  want = _expected(runs["routed"], runs["gold_rows"], "category")
  assert rep["stages"]["category"]["quality"]["routed_accuracy"] == pytest.approx(
      want["routed_accuracy"])


def test_the_frontier_reference_holds_both_stages_answers(runs, tmp_path):
  labels = str(tmp_path / "frontier_labels.jsonl")
  fields, answered, notes = write_frontier_labels(runs["all"], labels)
  assert fields == {"category": ["category"], "urgency": ["urgency"]}, notes
  assert answered["model"] == ["frontier"]
  got = {r["ticket_id"]: r for r in map(json.loads, open(labels, encoding="utf-8"))}
  rows = pq.read_table(runs["all"]).to_pylist()
  assert len(got) == len(rows) == len(TICKETS)
  for r in rows:
    assert all(s["final_tier"] == "frontier" for s in r["stages"])
    assert got[r["ticket_id"]] == {"ticket_id": r["ticket_id"], "category": r["category"],
                                   "urgency": r["urgency"]}
  # The reference scores each stage of the escalate-all run as always right.
  rep = report.build_report(runs["all"], labels, label_fields=fields, resamples=20,
                            charts=False)
  for stage in ("category", "urgency"):
    assert rep["stages"][stage]["quality"]["routed_accuracy"] == 1.0
