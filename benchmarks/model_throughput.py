"""Model pipelines against local endpoints: CPU per record, and throughput against the bound.

    python -m benchmarks.model_throughput                    # both parts
    python -m benchmarks.model_throughput --part a --records 4000
    python -m benchmarks.model_throughput --part b --latency 0.5 --grid 4x8

The endpoints are ``tierflow serve-local`` (the keyword stand-in behind the real
OpenAI and Anthropic wire formats) in **a process of its own**, so its CPU is not
counted; the pipeline is a child process talking to it over HTTP with the real
``openai`` and ``anthropic`` SDKs. Stand-in answers: throughput figures only,
nothing about answer quality.

**Part A, CPU per record.** ``tickets`` (classify -> extract -> summarise, the
bundled config's batching and thresholds, so some stages escalate) over N tickets
with the endpoints answering at once. The marginal CPU per record is the
difference of the child processes' CPU (user + system, all threads, start-up and
exit included) between N and N/10 records, over the difference in records: what
one more record costs, start-up left out. Also the CPU from the launch to its end
over N (start-up partly in). ``passthrough`` over the N records, for reference.
The three run in interleaved rounds, each in a fresh process (``fresh_runs``).
**The SDKs alone**, the tight path under them: the endpoints count every request of
each N-record run and log the last 1,000; a fresh process sends those logged bodies
again, one after another, with the bare ``openai`` and ``anthropic`` SDKs (no
retries) and reads each answer without parsing it. Its CPU per request, times the
run's requests per record, is what any client of the SDKs pays for the same
requests; tierflow's own cost per record is the marginal CPU less that.

**Part B, throughput against the bound.** The endpoints answer after a fixed
latency L. A one-stage config (classify, threshold 0, over the sample's tickets less
the few holding instructions addressed to a model, which always escalate: nothing
escalates, and a run where something did is an error) runs at
each (batch_size x concurrency) point of ``--grid``; nothing can beat
``concurrency * batch_size / L`` records/s. Reported: the model stage's rate (N
over the time spent routing, ``tierflow.routing.route_millis``: the time any batch was
routing, counted once where batches overlap) and the whole pipeline's (N over the
child process's whole life, as ``fresh_runs`` times it: the interpreter's start, the
imports as ``tierflow run`` makes them, the preflight, the run and the exit), each as a
fraction of the bound,
as the median of ``--repeats`` runs. Every part prints the load average its runs
ended under.

Writes ``benchmarks/results/model-throughput-<date>.json`` and prints Markdown.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):
  sys.path.insert(0, str(HERE.parent))
from benchmarks.fresh_runs import interleaved, loads_seen, median, run_fresh  # noqa: E402

RESULTS_DIR = HERE / "results"
DEFAULT_GRID = "1x1,4x1,1x4,4x4,8x4,4x8"


class Endpoints:
  """``tierflow serve-local`` in its own process."""

  def __init__(self, latency: float):
    self.latency = latency

  def __enter__(self):
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "tierflow_local.provider_server", "--log-level", "WARNING",
         "--latency", str(self.latency)], stdout=subprocess.PIPE, text=True, cwd=HERE.parent)
    urls: dict = {}
    while not {"OPENAI_BASE_URL", "ANTHROPIC_BASE_URL"} <= urls.keys():
      line = self.proc.stdout.readline()
      if not line:
        raise RuntimeError("tierflow serve-local exited before printing its base URLs")
      if line.startswith("export "):  # export NAME=value
        name, _, value = line[len("export "):].strip().partition("=")
        urls[name] = value
    self.openai, self.anthropic = urls["OPENAI_BASE_URL"], urls["ANTHROPIC_BASE_URL"]
    return self

  def __exit__(self, *exc):
    self.proc.terminate()
    self.proc.wait(timeout=30)


def config(endpoints: Endpoints, *, batch: int = 8, concurrency: int = 4,
           classify_only: bool = False) -> dict:
  import yaml
  from importlib import resources
  cfg = yaml.safe_load(resources.files("tierflow").joinpath("data", "tickets.yaml").read_text())
  cfg["budget_usd"] = None
  cfg["models"]["small"].update(base_url=endpoints.openai, model="small", api_key_env=None,
                                price_as="gpt-5-nano", batch_size=batch,
                                concurrency=concurrency)
  cfg["models"]["frontier"].update(provider="anthropic", base_url=endpoints.anthropic,
                                   model="frontier", api_key_env=None,
                                   price_as="claude-sonnet-4-6")
  if classify_only:
    cfg["stages"] = [{**cfg["stages"][0], "threshold": 0.0}]
  return copy.deepcopy(cfg)


def child(pipeline: str, argv: list[str]) -> dict:
  from tierflow import cli  # noqa: F401 - imports as `tierflow run` does (_lean_imports)
  from tierflow import launcher
  r0 = resource.getrusage(resource.RUSAGE_SELF)
  t0 = time.perf_counter()
  summary = launcher.launch(pipeline, argv)
  wall = time.perf_counter() - t0
  r1 = resource.getrusage(resource.RUSAGE_SELF)
  return {"records": summary.rows_written, "failed": summary.records_failed,
          "dead_letters": summary.dead_letters, "wall_seconds": wall,
          "launch_cpu_seconds": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
          "route_seconds": summary.metrics.get("tierflow.routing.route_millis", 0) / 1000,
          "escalated": summary.metrics.get("tierflow.routing.records_escalated", 0)}


def child_sdk_floor(log_path: str, openai_url: str, anthropic_url: str) -> dict:
  """The tight path under the model stages: the request bodies a tickets run sent (from
  the endpoints' log), sent again one after another with the bare SDKs (``post`` of the
  body as it is, no retries), each answer read but not parsed: the least any client of
  these SDKs pays for those requests. CPU per request, per tier; nothing of tierflow's."""
  import anthropic
  import openai
  import orjson
  from tierflow.connectors.llm_clients import _httpx_of

  def httpx_of(client):
    return _httpx_of(sys.modules[type(client).__module__.partition(".")[0]])

  logged = json.loads(Path(log_path).read_text())
  clients = {"/v1/chat/completions": (openai.OpenAI(base_url=openai_url, api_key="local",
                                                    max_retries=0), "/chat/completions"),
             "/v1/messages": (anthropic.Anthropic(base_url=anthropic_url, api_key="local",
                                                  max_retries=0), "/v1/messages")}
  out = {}
  for path, (client, route) in clients.items():
    bodies = [orjson.dumps(r["body"]) for r in logged if r["path"] == path]  # as tierflow
    if not bodies:
      continue
    response_type = httpx_of(client).Response  # the raw response, as tierflow asks
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for body in bodies:
      client.post(route, content=body, cast_to=response_type).content
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    out["small" if "chat" in path else "frontier"] = {
        "requests": len(bodies), "cpu_ms_per_request": cpu * 1000 / len(bodies)}
  return out


def _control(base_url: str, method: str) -> dict:
  """The local endpoints' request statistics (``/_control/stats``; DELETE resets them)."""
  import urllib.request
  from urllib.parse import urlsplit
  parts = urlsplit(base_url)
  req = urllib.request.Request(f"{parts.scheme}://{parts.netloc}/_control/stats", method=method)
  with urllib.request.urlopen(req, timeout=30) as resp:
    return json.loads(resp.read())


PROFILE_DIR = os.environ.get("TIERFLOW_BENCH_PROFILE")  # py-spy flame graphs of each child


def run_child(pipeline: str, argv: list[str]) -> dict:
  cmd = [sys.executable, str(Path(__file__).resolve()), "--child", pipeline, *argv]
  if PROFILE_DIR:
    out = Path(PROFILE_DIR) / f"{pipeline}-{time.time_ns()}.txt"
    cmd = ["py-spy", "record", "--gil", "-r", "200", "-f", "raw", "-o", str(out), "--", *cmd]
  return run_fresh(cmd, cwd=str(HERE.parent))


def _topic(broker, name: str, n: int, plain: bool = False) -> str:
  """A topic of ``n`` tickets, the bundled sample repeated; ``plain``: without the sample's
  tickets that hold instructions addressed to a model, which always escalate."""
  from tierflow_local.loader import publish, sample_tickets
  from tierflow.config import load_config
  from tierflow.pipelines.injection import suspected
  from tierflow.pipelines.prompts import render_text
  template = load_config("tickets").text
  base = [t for t in sample_tickets() if not (plain and suspected(render_text(template, t)))]
  broker.create_topic(name, 4)
  publish(broker.bootstrap_servers, name,
          [{**base[i % len(base)], "ticket_id": f"T-{i:07d}"} for i in range(n)])
  return name


def _argv(broker, topic: str, cfg_path: str | None) -> list[str]:
  argv = ["--bootstrap-servers", broker.bootstrap_servers, "--topic", topic,
          "--output", tempfile.mkdtemp(prefix="bench-model-"), "--start-offset", "0"]
  return argv + (["--config", cfg_path] if cfg_path else [])


def _write_config(cfg: dict) -> str:
  import yaml
  fd, path = tempfile.mkstemp(suffix=".yaml")
  with os.fdopen(fd, "w") as f:
    yaml.safe_dump(cfg, f)
  return path


def part_a(broker, records: int, repeats: int) -> dict:
  small = max(1, records // 10)
  topic = _topic(broker, "bench-model-a", records)
  small_topic = _topic(broker, "bench-model-a-small", small)
  with Endpoints(0.0) as ep:
    path = _write_config(config(ep))

    log_path = Path(tempfile.mkdtemp(prefix="bench-model-log-")) / "requests.json"

    def tickets(name: str, n: int):
      def run():
        _control(ep.openai, "DELETE")
        r = run_child("tickets", _argv(broker, name, path))
        if r["records"] != n or r["failed"]:
          raise RuntimeError(f"tickets wrote {r['records']} of {n} rows, {r['failed']} failed")
        stats = _control(ep.openai, "GET")
        r["requests"] = {tier: stats["by_model"].get(tier, 0) for tier in ("small", "frontier")}
        if n == records:  # the bodies the floor sends again (the log keeps the last 1,000)
          log_path.write_text(json.dumps(stats["requests"]))
        return r
      return run

    runs = interleaved({"tickets": tickets(topic, records),
                        "tickets_small": tickets(small_topic, small),
                        "passthrough": lambda: run_child("passthrough",
                                                         _argv(broker, topic, None))},
                       repeats, say=lambda line: print(line, file=sys.stderr, flush=True))
    floors = [run_fresh([sys.executable, str(Path(__file__).resolve()), "--child-floor",
                         str(log_path), ep.openai, ep.anthropic], cwd=str(HERE.parent))
              for _ in range(repeats)]
  big, little = median(runs["tickets"], "cpu_seconds"), median(runs["tickets_small"],
                                                               "cpu_seconds")
  per_request = {tier: statistics.median(f[tier]["cpu_ms_per_request"] for f in floors)
                 for tier in ("small", "frontier")}
  sent = {tier: statistics.median(r["requests"][tier] for r in runs["tickets"])
          for tier in ("small", "frontier")}
  floor_ms = sum(sent[t] * per_request[t] for t in sent) / records
  return {"records": records, "records_small": small, **runs,
          "load": loads_seen(*runs.values()),
          "tickets_marginal_cpu_ms_per_record": round((big - little) * 1000 / (records - small),
                                                      3),
          "tickets_process_cpu_seconds": round(big, 2),
          "tickets_small_process_cpu_seconds": round(little, 2),
          "tickets_cpu_ms_per_record": round(
              median(runs["tickets"], "launch_cpu_seconds") * 1000 / records, 3),
          "passthrough_cpu_ms_per_record": round(
              median(runs["passthrough"], "launch_cpu_seconds") * 1000 / records, 3),
          "escalated_share": round(median(runs["tickets"], "escalated") / records, 3),
          "requests_per_record": {t: round(sent[t] / records, 3) for t in sent},
          "sdk_cpu_ms_per_request": {t: round(v, 3) for t, v in per_request.items()},
          "sdk_floor_cpu_ms_per_record": round(floor_ms, 3),
          "sdk_floor_runs": floors}


def part_b(broker, grid: list[tuple[int, int]], latency: float, target_s: float,
           repeats: int) -> dict:
  points = []
  with Endpoints(latency) as ep:
    for batch, concurrency in grid:
      bound = concurrency * batch / latency
      n = max(200, int(bound * target_s))
      topic = _topic(broker, f"bench-model-b-{batch}x{concurrency}", n, plain=True)
      path = _write_config(config(ep, batch=batch, concurrency=concurrency,
                                  classify_only=True))
      runs = []
      for _ in range(repeats):
        r = run_child("tickets", _argv(broker, topic, path))
        if r["records"] != n or r["failed"] or r["escalated"]:
          raise RuntimeError(f"{batch}x{concurrency}: {r['records']} rows of {n}, "
                             f"{r['escalated']} escalated (the bound assumes none)")
        runs.append(r)
      points.append({
          "batch": batch, "concurrency": concurrency, "records": n, "bound": round(bound, 1),
          "runs": len(runs), "load": loads_seen(runs),
          "stage_share_of_bound": round(n / median(runs, "route_seconds") / bound, 3),
          "pipeline_share_of_bound": round(n / median(runs, "wall_seconds") / bound, 3),
          "wall_seconds": round(median(runs, "wall_seconds"), 2),
          "route_seconds": round(median(runs, "route_seconds"), 2)})
      print(f"{batch}x{concurrency}: stage {points[-1]['stage_share_of_bound']:.0%}, "
            f"pipeline {points[-1]['pipeline_share_of_bound']:.0%} of {bound:.0f}/s",
            file=sys.stderr)
  return {"latency_seconds": latency, "target_seconds": target_s, "points": points}


def markdown(r: dict) -> str:
  lines = []
  def load(x):
    return f"load {x['min']:.1f}-{x['max']:.1f} (median {x['median']:.1f})"

  if "a" in r:
    a = r["a"]
    lines += [f"Part A: {a['records']:,} and {a['records_small']:,} tickets, endpoints "
              f"answering at once in their own process, {a['escalated_share']:.0%} of records "
              f"escalated, median of {len(a['tickets'])} interleaved rounds, {load(a['load'])}",
              "", "| pipeline | CPU ms per record |", "|---|---:|",
              f"| tickets, marginal (CPU at {a['records']:,} less CPU at "
              f"{a['records_small']:,}, per record) | "
              f"**{a['tickets_marginal_cpu_ms_per_record']:.2f}** |",
              f"| tickets, launch to end over {a['records']:,} | "
              f"{a['tickets_cpu_ms_per_record']:.2f} |",
              f"| passthrough, launch to end over {a['records']:,} | "
              f"{a['passthrough_cpu_ms_per_record']:.3f} |",
              f"| the SDKs alone: the run's requests ({a['requests_per_record']['small']:.3f} "
              f"small, {a['requests_per_record']['frontier']:.3f} frontier per record) sent "
              f"again with the bare SDKs, answers read, not parsed "
              f"({a['sdk_cpu_ms_per_request']['small']:.2f} and "
              f"{a['sdk_cpu_ms_per_request']['frontier']:.2f} ms per request) | "
              f"{a['sdk_floor_cpu_ms_per_record']:.2f} |", ""]
  if "b" in r:
    b = r["b"]
    lines += [f"Part B: latency L = {b['latency_seconds']} s, one stage, nothing escalates",
              "", "| batch x concurrency | bound records/s | model stage | whole pipeline "
              "| runs, load |", "|---|---:|---:|---:|---|"]
    for p in b["points"]:
      lines.append(f"| {p['batch']}x{p['concurrency']} | {p['bound']:.0f} "
                   f"| {p['stage_share_of_bound']:.0%} | {p['pipeline_share_of_bound']:.0%} "
                   f"| {p['runs']}, {load(p['load'])} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--part", choices=("a", "b", "both"), default="both")
  parser.add_argument("--records", type=int, default=4000)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--latency", type=float, default=0.5)
  parser.add_argument("--grid", default=DEFAULT_GRID)
  parser.add_argument("--target-seconds", type=float, default=20.0)
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--child-floor", nargs=3, help=argparse.SUPPRESS)
  args, rest = parser.parse_known_args(argv)
  if args.child:
    print(json.dumps(child(args.child, rest)))
    return 0
  if args.child_floor:
    print(json.dumps(child_sdk_floor(*args.child_floor)))
    return 0
  from tierflow_local.broker import EmbeddedBroker
  result = {"benchmark": "model_throughput",
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
            "cpus": os.cpu_count(),
            "command": "python -m benchmarks.model_throughput " + " ".join(argv or sys.argv[1:])}
  grid = [tuple(int(x) for x in p.split("x")) for p in args.grid.split(",")]
  with EmbeddedBroker() as broker:
    if args.part in ("a", "both"):
      result["a"] = part_a(broker, args.records, args.repeats)
    if args.part in ("b", "both"):
      result["b"] = part_b(broker, grid, args.latency, args.target_seconds, args.repeats)
  result["markdown"] = markdown(result)
  part = "" if args.part == "both" else f"-{args.part}"
  path = RESULTS_DIR / f"model-throughput-{result['date']}{part}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=2) + "\n")
  print(result["markdown"])
  print(f"\nwritten to {path}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
