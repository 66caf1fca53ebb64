"""``tierflow demo``: the whole loop on the embedded default, calibrate -> run -> report.

The 240 bundled support tickets (with gold labels) are split once, before anything was
measured on them:

* tickets 1-60: the demo's run (``--records`` takes the first N of them, 30 by default);
* tickets 61-160: the calibration sample (``--calibrate-on`` takes the first N, 60 by
  default: a CPU model answers a few requests a second at best);
* tickets 161-240: kept out of the demo; 12 of 201-240 (the first two of each category)
  are the classify stage's worked examples, the rest chose the demo's small model
  (``benchmarks/demo_small_models.py``).

The small tier is a real local model behind llama.cpp's OpenAI-compatible server; the
frontier tier is a keyword-rule stand-in behind the Anthropic Messages API (no frontier
model is reachable offline). The demo calibrates the classify and extract stages on the
calibration sample against the gold labels (alpha :data:`ALPHA`, delta :data:`DELTA`),
runs the tickets pipeline with that calibration, and writes the report with the run's
gold labels, so what is kept, what is escalated and how often the kept answers are
right are measured, not assumed.

A stage the calibration could not certify is not sent to the small tier in the run
(``--skip-small-when-uncertified``: its answer could not be kept). A second demo with the
same model file, llama.cpp, sample, prompts, alpha and delta reuses the stored calibration
(``tierflow.demo_calibrations``) and says so; ``--recalibrate`` calibrates afresh.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
from typing import Optional, Sequence

RUN_TICKETS = (0, 60)  # [start, end) indexes into the bundled tickets
CALIBRATION_TICKETS = (60, 160)
EXAMPLE_TICKETS = (200, 240)
# The bundled tickets config's stage the worked examples are for: its labels are the
# tickets' gold categories (a stage name, not a kind).
EXAMPLES_STAGE = "classify"
ALPHA = 0.2  # target error on the answers the small tier keeps: a 135M-270M model is weak
# (fixed before any model was tried on the tickets)
DELTA = 0.1
SMALL_PRICE_AS = "fireworks/llama-v3p1-8b-instruct"
FRONTIER_PRICE_AS = "claude-sonnet-4-6"

__all__ = ["add_arguments", "run_from_args", "demo_config", "worked_examples",
           "calibrate_small_tier", "calibrated_stages"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--output", default=None, help="output directory (default: a temp dir)")
  parser.add_argument("--records", type=int, default=30,
                      help="how many of tickets 1-60 to run (default 30)")
  parser.add_argument("--calibrate-on", type=int, default=60,
                      help="how many of tickets 61-160 to calibrate on (default 60)")
  parser.add_argument("--recalibrate", action="store_true",
                      help="calibrate afresh even when a calibration of the same model file, "
                           "sample, prompts, alpha and delta is stored from an earlier demo")


@functools.lru_cache(maxsize=None)  # asked at each step of a demo; the bundled config is fixed
def calibrated_stages() -> tuple[str, ...]:
  """The stages the demo calibrates: the bundled tickets config's stages whose kind is
  scored against labels (a summary has no exact reference)."""
  from tierflow.config import load_config
  return tuple(s.name for s in load_config("tickets").stages if s.kind_impl.scored)


def worked_examples(tickets: Sequence[dict], labels: dict, per_label: int = 2) -> list[dict]:
  """The few-shot examples of the classify stage (``EXAMPLES_STAGE``): the first
  ``per_label`` tickets of each category among tickets 201-240, in ticket order."""
  from tierflow.config import load_config
  from tierflow.pipelines.prompts import render_text
  config = load_config("tickets")
  stage = next(s for s in config.stages if s.name == EXAMPLES_STAGE)
  template = config.text
  taken: dict = {label: [] for label in stage.labels}
  for ticket in tickets[EXAMPLE_TICKETS[0]:EXAMPLE_TICKETS[1]]:
    label = labels[ticket["ticket_id"]]["category"]
    if len(taken[label]) < per_label:
      taken[label].append({"text": render_text(template, ticket), "answer": label})
  return [e for label in stage.labels for e in taken[label]]


def demo_config(path: str, small_url: str, small_model: str, frontier_url: str,
                examples: Sequence[dict], stages: Optional[Sequence[str]] = None) -> str:
  """The bundled tickets config pointed at the local endpoints, written to ``path``.

  ``stages`` keeps only those stages (the calibration run needs only the calibrated ones).
  """
  import yaml
  config = demo_config_dict(small_url, small_model, frontier_url, examples, stages)
  with open(path, "w", encoding="utf-8") as f:
    yaml.safe_dump(config, f, sort_keys=False)
  return path


def demo_config_dict(small_url: str, small_model: str, frontier_url: str,
                     examples: Sequence[dict], stages: Optional[Sequence[str]] = None) -> dict:
  """What ``demo_config`` writes."""
  import yaml
  from importlib import resources
  config = yaml.safe_load(resources.files("tierflow").joinpath("data", "tickets.yaml").read_text())
  config["models"]["small"].update(
      base_url=small_url, model=small_model, api_key_env=None, batch_size=1,
      # Two requests at once on two cores, the worked examples' prefix cached by the server;
      # a CPU model on a busy machine may take minutes for one.
      concurrency=2, timeout_s=300,
      price_as=SMALL_PRICE_AS)  # priced as the small model it stands in for, stated
  config["models"]["frontier"].update(
      provider="anthropic", base_url=frontier_url, model="standin-frontier", api_key_env=None,
      price_as=FRONTIER_PRICE_AS)
  for stage in config["stages"]:
    if stage["name"] == EXAMPLES_STAGE:
      stage["examples"] = list(examples)
  if stages is not None:
    config["stages"] = [s for s in config["stages"] if s["name"] in stages]
  return config


def _write_jsonl(path: str, rows: Sequence[dict]) -> str:
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  return path


def calibrate_small_tier(sample: Sequence[dict], work: str, small_url: str, small_model: str,
                         frontier_url: str, examples: Sequence[dict], gold: str):
  """The small tier's answers on ``sample`` (in ``work``) and the demo's calibration of the
  classify and extract stages against ``gold``: (output dir, calibration, notes)."""
  from tierflow.calibrate_command import calibrate_output, run_small_tier
  config = demo_config(os.path.join(work, "calibrate.yaml"), small_url, small_model,
                       frontier_url, examples, stages=calibrated_stages())
  out = run_small_tier("tickets", _write_jsonl(os.path.join(work, "sample.jsonl"), sample),
                       os.path.join(work, "calibration-run"), config=config)
  calibration, notes = calibrate_output(out, gold, alpha=ALPHA, delta=DELTA,
                                        stages=list(calibrated_stages()))
  return out, calibration, notes


def _calibration_key(llama, model, sample: Sequence[dict], labels: dict,
                     examples: Sequence[dict]) -> str:
  """The key of the demo's calibration in ``demo_calibrations`` (what it depends on)."""
  from tierflow import demo_calibrations
  stages = calibrated_stages()
  config = demo_config_dict("", model.name, "", examples, stages=stages)
  for tier in config["models"].values():
    tier.pop("base_url")
  return demo_calibrations.calibration_key(
      model_sha256=demo_calibrations.file_sha256(model.path()), server=llama.settings(),
      sample=sample, labels={t["ticket_id"]: labels[t["ticket_id"]] for t in sample},
      config=config, stages=stages, alpha=ALPHA, delta=DELTA)


def _headline(report: dict, calibration) -> list[str]:
  """The report's result in plain words."""
  lines = []
  for name, sc in calibration.stages.items():
    if sc.certified:
      lines.append(f"{name}: certified to keep {sc.coverage:.0%} of the sample on the small tier "
                   f"with error <= {sc.alpha:g} (probability >= {1 - sc.delta:g}, n={sc.n})")
    else:
      lines.append(f"{name}: NOT certified at error <= {sc.alpha:g} (n={sc.n}): every record "
                   f"escalates; {sc.reason}")
  for name, st in report["stages"].items():
    q = st.get("quality") or {}
    kept, err = q.get("non_escalated_records"), q.get("error_non_escalated")
    if name in calibration.stages and kept is not None:
      right = "" if err is None else f", {1 - err:.0%} of them right against the gold labels"
      lines.append(f"{name} in the run: the small tier's answer kept for {kept} of "
                   f"{q['labelled_records']} tickets{right}; routed accuracy "
                   f"{q['routed_accuracy']:.0%}")
  c = report["cost"]
  if c.get("savings_pct") is not None:
    lines.append(f"cost: ${c['routed_per_1k']:.4f} per 1k records routed against "
                 f"${c['frontier_only_per_1k']:.4f} frontier-only (estimated from the same "
                 f"tokens): {c['savings_pct']:.1f}% saved")
  return lines


def run_from_args(args: argparse.Namespace, rest: Sequence[str]) -> int:
  from tierflow import demo_calibrations, launcher, progress
  from tierflow.calibrate_command import format_stage
  from tierflow.report import build_report
  from tierflow_local.broker import EmbeddedBroker
  from tierflow_local.llama_server import DEMO_MODEL, LlamaServer
  from tierflow_local.loader import SAMPLE_TICKET_LABELS, bundled_path, publish, \
      sample_ticket_labels, sample_tickets
  from tierflow_local.provider_server import LocalProviderServer
  from tierflow_local.standin_model import KeywordStandIn
  from tierflow.summary import cost_summary, format_summary

  ok, why = DEMO_MODEL.available()
  if not ok:
    print(f"tierflow demo needs the local small model: {why}", file=sys.stderr)
    return 2
  if not 1 <= args.records <= RUN_TICKETS[1] - RUN_TICKETS[0]:
    raise ValueError(f"--records wants 1 to {RUN_TICKETS[1] - RUN_TICKETS[0]}")
  if not 10 <= args.calibrate_on <= CALIBRATION_TICKETS[1] - CALIBRATION_TICKETS[0]:
    raise ValueError(f"--calibrate-on wants 10 to "
                     f"{CALIBRATION_TICKETS[1] - CALIBRATION_TICKETS[0]}")
  output = args.output or tempfile.mkdtemp(prefix="tierflow-demo-")
  gold = bundled_path(SAMPLE_TICKET_LABELS)
  tickets, labels = sample_tickets(), sample_ticket_labels()
  run = tickets[RUN_TICKETS[0]:RUN_TICKETS[0] + args.records]
  sample = tickets[CALIBRATION_TICKETS[0]:CALIBRATION_TICKETS[0] + args.calibrate_on]
  topic = "tickets"
  with contextlib.ExitStack() as stack:
    work = stack.enter_context(tempfile.TemporaryDirectory(prefix="tierflow-demo-work-"))
    broker = stack.enter_context(EmbeddedBroker())
    print(f"[1/6] embedded Kafka broker (Tansu, in memory) on {broker.bootstrap_servers}")
    broker.create_topic(topic, partitions=4)
    n = publish(broker.bootstrap_servers, topic, run, fmt="json")
    print(f"[2/6] published tickets 1-{n} to topic {topic!r} (4 partitions); tickets "
          f"{CALIBRATION_TICKETS[0] + 1}-{CALIBRATION_TICKETS[0] + len(sample)} are the "
          "calibration sample")
    llama = stack.enter_context(LlamaServer(DEMO_MODEL))
    standin = stack.enter_context(
        LocalProviderServer(KeywordStandIn(), models=("standin-frontier",)))
    print(f"[3/6] small tier: {DEMO_MODEL.name} (a real model, llama.cpp server) at "
          f"{llama.base_url}; frontier tier: a STAND-IN (keyword rules behind the Anthropic "
          f"Messages API) at {standin.anthropic_base_url}: no frontier model is reachable "
          "offline")
    examples = worked_examples(tickets, labels)
    config = demo_config(os.path.join(work, "tickets.yaml"), llama.base_url, DEMO_MODEL.name,
                         standin.anthropic_base_url, examples)
    progress.start(sys.stderr)  # a line at least every 30 s (redrawn on a terminal)
    stack.callback(progress.stop)
    key = _calibration_key(llama, DEMO_MODEL, sample, labels, examples)
    stored = None if args.recalibrate else demo_calibrations.load(key)
    if stored is not None:
      calibration, notes, when = stored
      print(f"[4/6] reusing the calibration of {when} from an earlier demo (same model file, "
            f"llama.cpp, sample, prompts, alpha and delta; "
            f"{demo_calibrations.store_dir() / key}); --recalibrate calibrates afresh",
            flush=True)
    else:
      print(f"[4/6] calibrating {' and '.join(calibrated_stages())} on {len(sample)} labelled "
            f"tickets: the small tier answers them, and each stage gets the threshold that "
            f"keeps error <= {ALPHA:g} with probability >= {1 - DELTA:g}", flush=True)
      _, calibration, notes = calibrate_small_tier(sample, work, llama.base_url,
                                                   DEMO_MODEL.name, standin.anthropic_base_url,
                                                   examples, gold)
      demo_calibrations.store(key, calibration, notes)
    os.makedirs(output, exist_ok=True)
    calibration_file = os.path.join(output, "calibration.json")
    calibration.save(calibration_file)
    for note in notes:  # (the gold labels cover all 240 tickets: no note on the others)
      if "labelled records are not in the output" not in note:
        print(f"  note: {note}")
    progress.stop()
    for sc in calibration.stages.values():
      print(format_stage(sc))
    progress.start(sys.stderr)  # counts from zero for the run
    print(f"[5/6] running the tickets pipeline on tickets 1-{n} with that calibration: "
          "classify -> extract -> summarise, escalating what is below each threshold",
          flush=True)
    uncertified = [name for name, sc in calibration.stages.items() if not sc.certified]
    if uncertified:
      print(f"  {' and '.join(uncertified)}: not certified, so every record escalates and "
            "the small tier is not asked (--skip-small-when-uncertified: its answer could "
            "not be kept)", flush=True)
    # The demo's model fails most summaries (a base model writes on past the sentence):
    # each escalates, with why in small_error, and the summary line counts them. With the
    # uncertified stages not asked they can be all of the small tier's answers, over the
    # default limit of 50% that stops a production run.
    summary = launcher.launch("tickets", [
        "--bootstrap-servers", broker.bootstrap_servers, "--topic", topic,
        "--output", output, "--bounded", "--config", config,
        "--calibration", calibration_file, "--skip-small-when-uncertified",
        "--max-small-failed-fraction", "1", *rest])
  from tierflow.cli import _print_summary
  _print_summary(summary)
  print()
  print(format_summary(cost_summary(output)))
  report_dir = os.path.join(output, "report")
  print(f"[6/6] the report: gold labels of tickets 1-{n}, the calibration", flush=True)
  report = build_report(output, gold, out_dir=report_dir,
                        calibration=calibration_file)
  print()
  print("What it shows:")
  for line in _headline(report, calibration):
    print(f"  {line}")
  print(f"  report: {os.path.join(report_dir, 'report.html')}")
  print(f"\nPrices: small tier priced as {SMALL_PRICE_AS}, frontier as {FRONTIER_PRICE_AS} "
        "(price book 2026-11-22). The frontier answers come from a rule-based stand-in, so "
        "its labels are not a frontier model's quality.")
  sql = ("SELECT label, escalated, round(cost_usd, 6) AS cost_usd FROM read_parquet("
         f"'{output}/results/**/*.parquet', hive_partitioning=true) LIMIT 10")
  print(f'\nquery it:  {sys.executable} -c "import duckdb; duckdb.sql(\\"{sql}\\").show()"')
  return 0 if summary.rows_written == n and summary.exit_code == 0 else 1
