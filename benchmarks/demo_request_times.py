"""How long the demo's small tier takes per request, under llama-server settings.

    python -m benchmarks.demo_request_times [--tickets 12] [--settings t1p1,t2p1,t1p2,...]

Each setting starts llama-server on the demo's model (``tierflow_local.llama_server``) with
``tN`` threads, ``pN`` slots (default: llama.cpp's, 4), and ``nc`` to turn the server's
prompt cache off (e.g. ``t2-p2``, ``t1-nc``), and sends the
demo's own requests (the demo's config and worked examples, tierflow's router and client,
the demo's concurrency) for each stage over the first ``--tickets`` of the tickets that
chose the demo's model (161-240 without the worked examples): the small tier's answers only,
as the demo's calibration and run ask them. Prints per stage the median seconds per request
and the prompt tokens the server read from its cache, and the wall time of the whole set.
The load average is printed before and after each setting (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time


def _setting(name: str) -> dict:
  s = {"threads": 1, "parallel": None, "cache_prompt": True}  # the demo's before 2026-12-07
  for part in name.split("-"):
    if part == "nc":
      s["cache_prompt"] = False
    elif part[:1] == "t":
      s["threads"] = int(part[1:])
    elif part[:1] == "p":
      s["parallel"] = int(part[1:])
  return s


def measure(setting: dict, tickets: list[dict], stages: list[str], work: str) -> dict:
  from tierflow import demo_command as demo
  from tierflow.config import load_config
  from tierflow.pipelines.ledger import StageOutcome
  from tierflow.pipelines.prompts import render_text
  from tierflow.pipelines.routing import Router
  from tierflow.prices import load_price_book
  from tierflow_local.llama_server import DEMO_MODEL, LlamaServer
  from tierflow_local.loader import sample_ticket_labels, sample_tickets
  examples = demo.worked_examples(sample_tickets(), sample_ticket_labels())
  times: dict = {s: [] for s in stages}
  cached: dict = {s: [] for s in stages}
  lock = threading.Lock()
  with LlamaServer(DEMO_MODEL, **setting) as llama:
    path = demo.demo_config(os.path.join(work, "t.yaml"), llama.base_url, DEMO_MODEL.name,
                            "http://127.0.0.1:9", examples, stages=stages)
    config = load_config(path)
    router = Router(config, load_price_book(config.price_book)).open()
    request = router._request

    def timed(tier, stage, texts):
      started = time.monotonic()
      outcomes, answered = request(tier, stage, texts)
      with lock:
        times[stage].append(time.monotonic() - started)
        cached[stage].append(sum(o.usage.cache_read_tokens for o in outcomes))
      return outcomes, answered

    router._request = timed
    texts = [render_text(config.text, t) for t in tickets]
    outcomes = [{s: StageOutcome() for s in stages} for _ in texts]
    started = time.monotonic()
    router._small(texts, outcomes)
    wall = time.monotonic() - started
    router.close()
  return {"wall_s": round(wall, 1),
          "stages": {s: {"median_s": round(statistics.median(times[s]), 2),
                         "mean_s": round(statistics.mean(times[s]), 2),
                         "median_cached_tokens": statistics.median(cached[s])}
                     for s in stages}}


def main(argv=None) -> int:
  from benchmarks.demo_small_models import selection_tickets
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tickets", type=int, default=12)
  parser.add_argument("--stages", default="classify,extract,summarise")
  parser.add_argument("--settings", default="t1,t1-nc,t2,t1-p2,t2-p2")
  args = parser.parse_args(argv)
  tickets = selection_tickets()[:args.tickets]
  stages = args.stages.split(",")
  print(f"{len(tickets)} tickets x {stages}, the demo's concurrency", flush=True)
  for name in args.settings.split(","):
    before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="demo-times-") as work:
      r = measure(_setting(name), tickets, stages, work)
    per = "; ".join(f"{s} {v['median_s']} s/request (mean {v['mean_s']}, "
                    f"{v['median_cached_tokens']:g} prompt tokens cached)"
                    for s, v in r["stages"].items())
    print(f"{name}: {r['wall_s']} s in all; {per}; load {before:.2f} -> "
          f"{os.getloadavg()[0]:.2f}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
