"""Which offline small model the demo uses: the one whose answers calibration lets it keep most.

    python -m benchmarks.demo_small_models

The protocol was fixed before any model was run on these tickets:

* tickets: the bundled sample tickets 161-240 without the 12 worked examples of the
  classify stage (the first two of each category among 201-240): 68 tickets, none in the
  demo's run (1-60) or calibration sample (61-160);
* each installed model of ``tierflow_local.llama_server.MODELS`` (SmolLM2-135M-Instruct;
  Gemma 3 270M, a base model, with a plain-text template so the demo's prompt with its
  worked examples is a few-shot completion) answers them as the demo's small tier, with the
  demo's config (``tierflow.demo_command.demo_config``);
* each of the demo's calibrated stages (classify, extract) is calibrated against the gold
  labels exactly as the demo does (alpha 0.2, delta 0.1, Learn-then-Test binomial);
* the model kept is the one with the most record-stages certified to stay on the small
  tier (coverage x n summed over the stages); ties go to the higher mean accuracy.

Writes ``benchmarks/results/demo-small-models-<date>.json`` and prints Markdown.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
import time

import numpy as np

SELECTION = (160, 240)


def selection_tickets() -> list[dict]:
  from tierflow.demo_command import worked_examples
  from tierflow_local.loader import sample_ticket_labels, sample_tickets
  tickets, labels = sample_tickets(), sample_ticket_labels()
  examples = {e["text"] for e in worked_examples(tickets, labels)}
  from tierflow.config import load_config
  from tierflow.pipelines.prompts import render_text
  template = load_config("tickets").text
  return [t for t in tickets[SELECTION[0]:SELECTION[1]]
          if render_text(template, t) not in examples]


def evaluate(model, tickets: list[dict], work: str) -> dict:
  """One model's answers on ``tickets``, calibrated as the demo does."""
  from tierflow import demo_command as demo
  from tierflow.calibrate_command import stage_samples
  from tierflow_local.llama_server import LlamaServer
  from tierflow_local.loader import SAMPLE_TICKET_LABELS, bundled_path, sample_ticket_labels, \
      sample_tickets
  from tierflow_local.provider_server import LocalProviderServer
  from tierflow_local.standin_model import KeywordStandIn
  examples = demo.worked_examples(sample_tickets(), sample_ticket_labels())
  gold = bundled_path(SAMPLE_TICKET_LABELS)
  started = time.monotonic()
  with LlamaServer(model) as llama, LocalProviderServer(KeywordStandIn(),
                                                       models=("standin-frontier",)) as standin:
    out, calibration, _ = demo.calibrate_small_tier(tickets, work, llama.base_url, model.name,
                                                    standin.anthropic_base_url, examples, gold)
  seconds = time.monotonic() - started
  samples, _ = stage_samples(out, gold)
  stages = {}
  for name, sc in calibration.stages.items():
    s = samples[name]
    stages[name] = {"n": sc.n, "accuracy": float(np.mean(s.correct)),
                    "certified": sc.certified,
                    "coverage": float(sc.coverage) if sc.certified else 0.0,
                    "kept": int(sc.n_accepted) if sc.certified else 0,
                    "threshold": sc.threshold if sc.certified else None,
                    "reason": sc.reason}
  return {"model": model.name, "package": model.requirement, "licence": model.licence,
          "base_model": model.base, "seconds": round(seconds, 1), "stages": stages,
          "kept": sum(s["kept"] for s in stages.values()),
          "mean_accuracy": float(np.mean([s["accuracy"] for s in stages.values()]))}


def main(argv=None) -> int:
  from tierflow import demo_command as demo
  from tierflow_local.llama_server import MODELS
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(__file__), "results",
      f"demo-small-models-{_dt.date.today().isoformat()}.json"))
  args = parser.parse_args(argv)
  tickets = selection_tickets()
  print(f"{len(tickets)} tickets (161-240 without the worked examples); alpha {demo.ALPHA}, "
        f"delta {demo.DELTA}; load average {os.getloadavg()[0]:.2f}", flush=True)
  results = []
  for model in MODELS.values():
    ok, why = model.available()
    if not ok:
      print(f"{model.name}: skipped ({why})")
      continue
    with tempfile.TemporaryDirectory(prefix="demo-models-") as work:
      r = evaluate(model, tickets, work)
    print(f"{model.name}: kept {r['kept']} record-stages in {r['seconds']} s "
          f"(load average {os.getloadavg()[0]:.2f})", flush=True)
    results.append(r)
  if not results:
    print("no model installed (make install-demo)", file=sys.stderr)
    return 2
  best = max(results, key=lambda r: (r["kept"], r["mean_accuracy"]))
  print("\n| model | stage | n | right | certified at alpha "
        f"{demo.ALPHA:g} | kept on the small tier |\n|---|---|---|---|---|---|")
  for r in results:
    for name, s in r["stages"].items():
      cert = f"yes (threshold {s['threshold']:.3g})" if s["certified"] else "no"
      print(f"| {r['model']} | {name} | {s['n']} | {s['accuracy']:.1%} | {cert} | "
            f"{s['coverage']:.1%} |")
  print(f"\nchosen: {best['model']} ({best['kept']} record-stages kept)")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump({"date": _dt.date.today().isoformat(), "tickets": len(tickets),
               "alpha": demo.ALPHA, "delta": demo.DELTA, "results": results,
               "chosen": best["model"], "load_average": os.getloadavg()[0]}, f, indent=1)
  print(f"-> {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
