"""The ``tierflow`` command.

    tierflow run PIPELINE [pipeline and Beam flags]   run a pipeline (passthrough, ...)
    tierflow demo                                     calibrate, run, report: the embedded default
    tierflow serve-local                              local OpenAI/Anthropic endpoints
    tierflow calibrate --labels FILE --from-output DIR  thresholds with an error guarantee
    tierflow report OUTPUT_DIR [--labels FILE]        cost/quality report of a run
    tierflow forecast --calibration FILE --topic T    what a bounded run will cost, before it
    tierflow broker                                   start the embedded Kafka broker
    tierflow publish                                  publish JSONL (or the sample) to a topic
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Optional, Sequence

from tierflow import _quiet

_quiet.install()  # before Beam is imported: it logs a spurious warning on import

from tierflow._lean_imports import lean_imports  # noqa: E402

with lean_imports():  # no collections, no pandas: 0.17 s less of a run's start
  from tierflow import launcher  # noqa: E402


def _setup_logging(verbosity: int) -> None:
  """-q: errors only; default: warnings (and progress); -v: tierflow's info; -vv: debug."""
  level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
  # force: Beam installs a root handler on import, which would swallow this call.
  logging.basicConfig(level=level, force=True,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  # -v: tierflow's own info lines, not every library's.
  logging.getLogger("tierflow").setLevel(logging.INFO if verbosity == 1 else logging.NOTSET)
  if verbosity == 1:
    logging.getLogger().setLevel(logging.WARNING)
  # kafka-python (tests, the loader) and librdkafka log every reconnect; errors that
  # matter surface as exceptions in tierflow's own code.
  for name in ("kafka", "tierflow.kafka.librdkafka"):
    logging.getLogger(name).setLevel(logging.CRITICAL if verbosity < 2 else logging.DEBUG)
  # Beam logs a failing bundle's traceback several times before it raises, and a portable
  # runner's job messages (a Java stack trace) on the root logger; the CLI prints the
  # cause in one line instead (-v shows everything).
  logging.getLogger("apache_beam").setLevel(logging.CRITICAL if verbosity < 1 else logging.NOTSET)
  if verbosity < 1:
    for handler in logging.getLogger().handlers:
      handler.addFilter(_not_job_messages)
  from tierflow import _quiet
  _quiet.install()


def _not_job_messages(record: logging.LogRecord) -> bool:
  """False for the job messages Beam's portable runner logs on the root logger."""
  return not (record.name == "root" and record.pathname.endswith("portable_runner.py"))


def _print_summary(summary: launcher.RunSummary) -> None:
  print(f"pipeline      {summary.pipeline} ({summary.state})")
  if summary.records_read >= 0:
    print(f"read          {summary.records_read} records")
  if summary.offsets_already_written > 0:
    print(f"skipped       {summary.offsets_already_written} offsets already in the output "
          "(written by an earlier run or attempt; not read or paid for again)")
  print(f"results       {summary.output}/results  ({summary.rows_written} rows)")
  print(f"dead letters  {summary.output}/dead_letter  ({summary.dead_letters} rows)")
  if summary.records_routed > 0:
    print(f"model stages  {summary.records_routed} records routed, "
          f"{summary.records_failed} failed, {summary.records_unverified} unverified")
  if summary.records_injection_suspected > 0:
    print(f"injection     {summary.records_injection_suspected} records hold instructions "
          "addressed to a model: none kept its small answers, answers repeating them were "
          "refused (injection_suspected)")
  if summary.records_kept_for_budget > 0:
    print(f"budget        {summary.records_kept_for_budget} records kept a small answer below "
          "its threshold: the budget cap was reached (status unverified)")
  if summary.committed_offsets:
    offsets = " ".join(f"p{p}={o}" for p, o in sorted(summary.committed_offsets.items()))
    print(f"committed     {offsets}  (the next run resumes here)")
  for problem in summary.problems:
    print(f"problem       {problem}")


def _local():
  """The local tooling (deploy/local, the tierflow-local distribution), or a clear error."""
  try:
    import tierflow_local
  except ImportError:
    raise ValueError("this command needs tierflow's local tooling: pip install -e deploy/local "
                     "(make demo and make test install it)") from None
  return tierflow_local


def _serve_local(rest) -> int:
  _local()
  from tierflow_local import provider_server
  return provider_server.main(list(rest))


def cmd_run(args, rest: Sequence[str]) -> int:
  if "-h" in rest or "--help" in rest:
    print(launcher.pipeline_help(args.pipeline))
    return 0
  from tierflow import progress
  if args.verbosity >= 0 and not args.no_wait:
    progress.start(sys.stderr)
  try:
    summary = launcher.launch(args.pipeline, rest, wait=not args.no_wait)
  finally:
    progress.stop()
  _print_summary(summary)
  return summary.exit_code


def cmd_broker(args, rest) -> int:
  _local()
  from tierflow_local.broker import EmbeddedBroker
  from tierflow_local.loader import publish, sample_tickets
  with EmbeddedBroker(port=args.port) as broker:
    for topic in args.topic or []:
      broker.create_topic(topic, args.partitions)
      if args.sample:
        n = publish(broker.bootstrap_servers, topic, sample_tickets(), fmt=args.format)
        print(f"published {n} sample tickets to {topic}")
    print(f"embedded Kafka broker (Tansu, in memory) on {broker.bootstrap_servers}; Ctrl-C "
          "(or SIGTERM) stops it")
    sys.stdout.flush()
    try:
      while True:
        time.sleep(3600)
    except KeyboardInterrupt:
      return 0


def cmd_publish(args, rest) -> int:
  _local()
  from tierflow_local.loader import publish, read_jsonl, sample_tickets
  records = sample_tickets() if args.input == "sample" else read_jsonl(args.input)
  n = publish(args.bootstrap_servers, args.topic, records, fmt=args.format, schema=args.schema,
              schema_registry_url=args.schema_registry_url)
  print(f"published {n} records to {args.topic}")
  return 0


def cmd_demo(args, rest) -> int:
  _local()
  from tierflow import demo_command
  return demo_command.run_from_args(args, rest)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="tierflow", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("-v", "--verbose", dest="verbosity", action="count", default=0,
                      help="more logs (-v: tierflow's info lines, -vv: debug)")
  parser.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1,
                      help="errors only, no progress")
  sub = parser.add_subparsers(dest="command", required=True)

  run = sub.add_parser("run", help="run a pipeline; other flags go to the pipeline and Beam "
                       "(`tierflow run PIPELINE --help` lists them)", add_help=False)
  run.add_argument("pipeline", choices=sorted(launcher.PIPELINES))
  run.add_argument("--no-wait", action="store_true",
                   help="submit and return (Dataflow/Flink launchers)")
  run.set_defaults(func=cmd_run)

  demo = sub.add_parser("demo", help="the embedded default: calibrate, run and report on the "
                        "sample tickets with a local small model")
  from tierflow import demo_command
  demo_command.add_arguments(demo)
  demo.set_defaults(func=cmd_demo)

  broker = sub.add_parser("broker", help="start the embedded Kafka broker until Ctrl-C")
  broker.add_argument("--port", type=int, default=None,
                      help="port on 127.0.0.1 (default: a free one, printed)")
  broker.add_argument("--topic", action="append", help="create this topic (repeatable)")
  broker.add_argument("--partitions", type=int, default=4)
  broker.add_argument("--sample", action="store_true", help="publish the sample tickets")
  broker.add_argument("--format", default="json", choices=("json", "avro", "confluent-avro"))
  broker.set_defaults(func=cmd_broker)

  pub = sub.add_parser("publish", help="publish JSONL records to a topic")
  pub.add_argument("--bootstrap-servers", required=True)
  pub.add_argument("--topic", required=True)
  pub.add_argument("--input", default="sample", help="a JSONL file, or 'sample'")
  pub.add_argument("--format", default="json", choices=("json", "avro", "confluent-avro"))
  pub.add_argument("--schema", default="ticket")
  pub.add_argument("--schema-registry-url", default=None)
  pub.set_defaults(func=cmd_publish)

  rep = sub.add_parser("report", help="cost/quality report (HTML, PNG, JSON) over a run's output")
  cal_help = "escalation thresholds with an error guarantee, from a labelled sample"
  if argv is None:
    argv = sys.argv[1:]
  if {"report", "calibrate", "-h", "--help"} & set(argv):  # a run imports neither command
    from tierflow import calibrate_command as calibrate_module
    from tierflow import report_command as report_module
    report_module.add_arguments(rep)
    rep.set_defaults(func=lambda a, r: report_module.run_from_args(a))
    cal = sub.add_parser("calibrate", help=cal_help, description=calibrate_module.__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    calibrate_module.add_arguments(cal)
    cal.set_defaults(func=lambda a, r: calibrate_module.run_from_args(a))
  else:
    sub.add_parser("calibrate", help=cal_help)

  fc = sub.add_parser("forecast", help="expected cost, escalation share and frontier spend of "
                      "a bounded run, with intervals, before it starts")
  from tierflow import forecast_command
  forecast_command.add_arguments(fc)
  fc.set_defaults(func=lambda a, r: forecast_command.run_from_args(a))

  serve = sub.add_parser("serve-local", add_help=False,
                         help="local OpenAI/Anthropic wire-format endpoints (stand-in model; "
                         "faults switchable); `tierflow serve-local --help` lists its flags")
  serve.set_defaults(func=lambda a, r: _serve_local(r))

  args, rest = parser.parse_known_args(argv)
  if rest and args.command not in ("run", "demo", "serve-local"):
    parser.error(f"unrecognized arguments: {' '.join(rest)}")
  _setup_logging(args.verbosity)
  _stop_on_sigterm()
  try:
    return args.func(args, rest)
  except ValueError as e:
    if args.verbosity > 0:
      logging.getLogger("tierflow").exception("rejected")
    print(f"tierflow: error: {e}", file=sys.stderr)
    return launcher.EXIT_REJECTED
  except KeyboardInterrupt:
    print("tierflow: interrupted; nothing past the last commit was committed", file=sys.stderr)
    return 130
  except Exception as e:  # noqa: BLE001 - a failed run: one line, the traceback with -v
    from tierflow.engine_errors import EngineFailure
    if args.verbosity > 0:
      logging.getLogger("tierflow").exception("the run failed")
    down = _tier_unavailable(e)
    if down:  # a tier failed records for a cause not theirs: nothing past them committed
      print(f"tierflow: the run stopped: {down}", file=sys.stderr)
      return launcher.EXIT_MODEL_FAILURES
    if isinstance(e, EngineFailure):  # already one line, naming the file with the rest
      print(f"tierflow: the run failed: {e}", file=sys.stderr)
      return launcher.EXIT_FAILED
    print(f"tierflow: the run failed: {_root_cause(e)}"
          + ("" if args.verbosity > 0 else " (-v for the traceback)"), file=sys.stderr)
    return launcher.EXIT_FAILED
  finally:
    # Free what the command left in reference cycles (Parquet readers, pipeline objects)
    # while Arrow is still alive: left to the interpreter's teardown, Arrow's worker
    # threads could outlive it and abort the process after all the work was done
    # ("terminate called without an active exception", exit 134; apache/arrow#34314,
    # #39862). Seen here in `tierflow demo`, every time with ARROW_DEFAULT_MEMORY_POOL=system.
    import gc
    gc.collect()


def _raise_interrupt(signum, frame):
  raise KeyboardInterrupt


def _stop_on_sigterm() -> None:
  """SIGTERM and SIGHUP stop a command as Ctrl-C does, so what it started (a broker, a model
  server, a pipeline) stops with it instead of being orphaned."""
  import signal
  import threading
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGTERM, signal.SIGHUP):
      signal.signal(sig, _raise_interrupt)


def _tier_unavailable(e: BaseException) -> Optional[str]:
  """The message of a ``TierUnavailable`` behind ``e`` (raised on a worker, so perhaps
  only as text in an engine's error), else None."""
  from tierflow.connectors.llm_clients import TierUnavailable
  import re
  seen, found = e, None
  while seen is not None and found is None:
    if isinstance(seen, TierUnavailable):
      found = str(seen).splitlines()[0]
    seen = seen.__cause__ or seen.__context__
  if found is None:
    m = re.search(r"TierUnavailable: ([^\n]+)", str(e))
    found = m.group(1) if m else None
  return re.sub(r" \[while running '[^']*'\]$", "", found) if found else None


def _root_cause(e: BaseException) -> str:
  """The innermost error's last line (Beam wraps worker errors several times); a chain
  cut with ``raise ... from None`` ends where it was cut, as Python's traceback does."""
  while True:
    inner = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    if inner is None:
      break
    e = inner
  text = str(e).strip().splitlines()
  lines = [l for l in text if l.strip()]
  message = lines[-1].strip() if lines else ""
  return f"{type(e).__name__}: {message}"[:500]


if __name__ == "__main__":
  sys.exit(main())
