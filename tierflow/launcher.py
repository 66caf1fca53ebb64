"""Turns command-line flags into a running Beam pipeline (the launcher, as in Flex Templates).

``launch(name, argv)`` translates tierflow's short flags (``--output``) into its
prefixed options (``--tierflow_output``), rejects unknown flags (so a typo such
as ``--end-ofset`` never silently reads the whole topic), builds the typed
config, checks before reading that the brokers answer, the topic exists and
the output is writable, calls the pipeline's pure ``build_pipeline(p, config)``
and runs it. Without ``--runner`` it runs locally on Beam's FnApiRunner.

Exit codes (``RunSummary.exit_code``, what ``tierflow run`` returns):

* 0: the run finished within its limits;
* 1: the run failed (an error while running, or a bounded run that did not cover its
  whole range; nothing past it was committed);
* 2: rejected before reading (bad flags or config, unreachable brokers, missing
  topic, unwritable output);
* 3: more records failed in the model stages than ``--max-failed-fraction``, or a
  provider refused requests (4xx other than 429): records still escalated or failed as
  configured, but the setup is wrong;
* 4: more records were dead-lettered as undecodable than
  ``--max-dead-letter-fraction``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import uuid
from typing import Callable, Optional, Sequence

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from tierflow.pipelines.options import (RunLimitsOptions, SourceSinkConfig, _Unprefixed,
                                        translate_flags)

_LOGGER = logging.getLogger(__name__)

# name -> module under tierflow.pipelines exposing NAME, OPTIONS, build_pipeline and
# optionally config_from_options(options) (else SourceSinkConfig.from_options).
PIPELINES = {
    "passthrough": "tierflow.pipelines.passthrough",
    "tickets": "tierflow.pipelines.tickets",
    "documents": "tierflow.pipelines.documents",
}

EXIT_OK, EXIT_FAILED, EXIT_REJECTED, EXIT_MODEL_FAILURES, EXIT_DEAD_LETTERS = 0, 1, 2, 3, 4


class RunFailed(RuntimeError):
  """The run failed while running (its cause is ``__cause__``), as opposed to a
  ``ValueError`` raised before reading (a rejection, exit 2)."""


@dataclasses.dataclass
class RunSummary:
  pipeline: str
  output: str
  state: str
  rows_written: int
  dead_letters: int
  files_written: int
  metrics: dict
  committed_offsets: Optional[dict] = None
  records_read: int = -1
  decode_dead_letters: int = -1
  records_failed: int = -1
  records_routed: int = -1
  offsets_deleted: int = 0
  rejected: tuple = (0, 0)  # (small, frontier) stage answers the provider refused
  offsets_in_range: int = -1  # a bounded run: the offsets its range holds (-1: unknown)
  offsets_covered: int = -1  # the offsets its batches covered (records, gaps, deleted)
  offsets_already_written: int = 0  # offsets the output held already: skipped, not redone
  records_unverified: int = 0  # kept a small answer below threshold: the frontier failed
  records_kept_for_budget: int = 0  # kept a small answer below threshold: the budget cap
  small_answers: int = 0  # stage answers asked of the small tier
  small_failed: int = 0  # of them, failed (then escalated)
  small_failures: tuple = ()  # (kind, count), most frequent first
  records_injection_suspected: int = 0  # texts with instructions addressed to a model
  exit_code: int = EXIT_OK
  problems: tuple = ()


def _all_option_classes() -> list[type]:
  seen, stack = [], [PipelineOptions]
  while stack:
    cls = stack.pop()
    for sub in cls.__subclasses__():
      if sub not in seen:
        seen.append(sub)
        stack.append(sub)
  return seen


def check_flags(argv: Sequence[str], pipeline_options: Optional[Sequence[type]] = None) -> None:
  """Raises ValueError on flags no PipelineOptions class defines.

  ``pipeline_options``: tierflow's own option classes the pipeline reads (its
  module's ``OPTIONS``); flags of other tierflow classes (``--config`` for
  passthrough, say) are errors too. None accepts every loaded class.
  """
  argv = translate_flags(list(argv))
  parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False,
                                   conflict_handler="resolve")
  for cls in _all_option_classes():
    own = cls.__module__.startswith("tierflow.")
    if pipeline_options is None or not own or cls in pipeline_options:
      cls._add_argparse_args(parser)
  _, unknown = parser.parse_known_args(list(argv))
  flags = [u.replace("--tierflow_", "--").replace("--tierflow-", "--")
           for u in unknown if u.startswith("--")]
  if flags:
    raise ValueError(f"unknown flag(s): {' '.join(flags)}")


def pipeline_module(name: str):
  if name not in PIPELINES:
    raise ValueError(f"unknown pipeline {name!r}; choose one of {', '.join(sorted(PIPELINES))}")
  return importlib.import_module(PIPELINES[name])


def make_options(argv: Sequence[str],
                 pipeline_options: Optional[Sequence[type]] = None) -> PipelineOptions:
  argv = translate_flags(list(argv))
  check_flags(argv, pipeline_options)
  options = PipelineOptions(argv)
  standard = options.view_as(StandardOptions)
  if not standard.runner:
    standard.runner = "FnApiRunner"
  return options


def pipeline_help(name: str) -> str:
  """The flags a pipeline reads, as ``tierflow run NAME --help`` prints them."""
  module = pipeline_module(name)
  parser = argparse.ArgumentParser(
      prog=f"tierflow run {name}", add_help=False,
      usage=f"tierflow run {name} --bootstrap-servers HOST:PORT --topic T --output DIR "
            "[flags] [Beam flags]",
      description=(module.__doc__ or "").strip(),
      epilog="Flags also take underscores (--bootstrap_servers). Beam's own flags (--runner, "
             "--streaming, --project, --flink_master, ...) are passed through to Beam.",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  for cls in module.OPTIONS:
    title = (cls.__doc__ or cls.__name__).strip().splitlines()[0].rstrip(".")
    group = parser.add_argument_group(title)
    inner = argparse.ArgumentParser(add_help=False)
    cls._add_argparse_args(inner)
    for action in inner._actions:
      flag = "--" + action.dest[len("tierflow_"):].replace("_", "-")
      if isinstance(action, argparse._StoreTrueAction):
        group.add_argument(flag, action="store_true", help=action.help)
        continue
      kwargs = {"help": action.help + (f" (default: {action.default})"
                                       if action.default not in (None, False) else "")}
      if action.choices:
        kwargs["choices"] = action.choices
      group.add_argument(flag, metavar=flag[2:].replace("-", "_").upper(), **kwargs)
  return parser.format_help()


def build(name: str, argv: Sequence[str]) -> tuple[beam.Pipeline, object]:
  """The constructed (not yet run) pipeline and its config."""
  module = pipeline_module(name)
  options = make_options(argv, getattr(module, "OPTIONS", None))
  make_config: Callable = getattr(module, "config_from_options", None) or (
      lambda o: SourceSinkConfig.from_options(o, pipeline=name))
  config = make_config(options)
  if _Unprefixed(options.view_as(RunLimitsOptions)).preflight == "auto":
    preflight(config, options)
  p = beam.Pipeline(options=options)
  module.build_pipeline(p, config)
  return p, config


def _io(config) -> SourceSinkConfig:
  return getattr(config, "io", config)


def check_output(output: str) -> None:
  """Raises ValueError unless ``output`` is (or can be made) a writable directory: a probe
  file is created in it and deleted, on whatever filesystem it is."""
  from apache_beam.io.filesystems import FileSystems
  if _is_file(output):
    raise ValueError(f"--output {output} is a file, not a directory")
  import os
  local = None if "://" in output and not output.startswith("file://") else \
      output.removeprefix("file://")
  made = []  # local directories the probe creates: removed again (a rejected run leaves
  if local is not None:  # nothing behind; the run itself creates what it writes)
    parent = os.path.abspath(local)
    while parent and not os.path.exists(parent):
      made.append(parent)
      parent = os.path.dirname(parent)
  probe = FileSystems.join(output, f".tierflow-write-check-{uuid.uuid4().hex}")
  try:
    with FileSystems.create(probe) as f:
      f.write(b"")
    FileSystems.delete([probe])
  except Exception as e:  # noqa: BLE001 - each filesystem has its own errors
    cause = e.__cause__ or e
    reason = getattr(cause, "strerror", None) or str(cause).splitlines()[0][:200]
    raise ValueError(f"--output {output} is not writable: {reason}") from None
  finally:
    for directory in made:
      try:
        os.rmdir(directory)
      except OSError:
        pass


def _is_file(path: str) -> bool:
  import os
  if "://" in path and not path.startswith("file://"):
    return False
  return os.path.isfile(path.removeprefix("file://"))


def check_tiers(run, keys_here: bool = True) -> None:
  """Raises ValueError, naming the tier, when a model's key variable is not set or its
  endpoint cannot be reached or refuses the key (one unbilled call: its models list,
  ``check_endpoint``, which imports no SDK).
  ``keys_here``: the run executes here; on an engine the key may live only on the
  workers, so a key missing here is a warning, not an error."""
  import os
  from tierflow.connectors.llm_clients import ModelCallError, check_endpoint
  for tier in ("small", "frontier"):
    model = getattr(run, tier)
    name = f"{tier} tier ({model.model} at {model.endpoint_host})"
    if model.api_key_env and not os.environ.get(model.api_key_env):
      if keys_here:
        raise ValueError(f"{name}: {model.api_key_env} is not set (the config's api_key_env)")
      _LOGGER.warning("%s: %s is not set here; it must be on the workers", name,
                      model.api_key_env)
      continue
    try:
      check_endpoint(model)
    except ModelCallError as e:
      raise ValueError(f"{name}: {e}") from None


def preflight(config, options=None) -> None:
  """Checks before reading: the output is writable, the brokers answer (within about
  10 s), the topic exists, and for a model pipeline that each tier's key is set and its
  endpoint answers and accepts it, and that the ledger topic exists or can be created.
  Raises ValueError with a one-line reason."""
  from tierflow.connectors.kafka_offsets import check_broker
  io = _io(config)
  check_output(io.output)
  check_broker(io.source)
  run = getattr(config, "run", None)
  if run is not None:
    check_tiers(run, keys_here=not _on_an_engine(options) if options is not None else True)
  ledger = getattr(config, "ledger", None)
  if ledger is not None:
    from tierflow.connectors.kafka_ledger import Ledger, LedgerUnavailable
    try:
      Ledger(ledger).ensure_topic()
    except LedgerUnavailable as e:
      raise ValueError(str(e)) from None


def _counter(result, name: str, namespace: Optional[str] = None) -> int:
  try:
    f = MetricsFilter().with_name(name)
    if namespace:
      f = f.with_namespace(namespace)
    counters = result.metrics().query(f)["counters"]
  except Exception:  # noqa: BLE001 - some runners do not report metrics
    return -1
  return sum(c.committed if c.committed is not None else c.attempted for c in counters)


def metrics_dict(result) -> dict:
  try:
    counters = result.metrics().query()["counters"]
  except Exception:  # noqa: BLE001
    return {}
  out: dict = {}
  for c in counters:
    key = f"{c.key.metric.namespace}.{c.key.metric.name}"
    value = c.committed if c.committed is not None else c.attempted
    out[key] = out.get(key, 0) + (value or 0)
  return out


@dataclasses.dataclass(frozen=True)
class Limits:
  """When a finished run counts as failed (``RunLimitsOptions``; the README's exit codes)."""
  max_failed: float = 0.0
  max_dead: Optional[float] = None
  max_unverified: float = 0.0
  max_small_failed: float = 0.5


def limits_of(options: PipelineOptions) -> Limits:
  limits = _Unprefixed(options.view_as(RunLimitsOptions))
  out = Limits(limits.max_failed_fraction, limits.max_dead_letter_fraction,
               limits.max_unverified_fraction, limits.max_small_failed_fraction)
  for name, value in (("--max-failed-fraction", out.max_failed),
                      ("--max-dead-letter-fraction", out.max_dead),
                      ("--max-unverified-fraction", out.max_unverified),
                      ("--max-small-failed-fraction", out.max_small_failed)):
    if value is not None and not 0 <= value <= 1:
      raise ValueError(f"{name} must be between 0 and 1")
  return out


def _small_failures(result) -> tuple:
  """(kind, count) of the small tier's failed answers, most frequent first."""
  found = [(k.split(".small_failed.", 1)[1], v) for k, v in metrics_dict(result).items()
           if ".small_failed." in k and v]
  return tuple(sorted(found, key=lambda kv: -kv[1]))


def judge(summary: RunSummary, limits: Limits) -> RunSummary:
  """Sets the summary's exit code and problems from its counts and the limits."""
  problems, code = [], EXIT_OK
  max_failed, max_dead = limits.max_failed, limits.max_dead
  routed = summary.records_routed
  if routed > 0 and summary.records_failed > max_failed * routed:
    problems.append(f"{summary.records_failed} of {routed} records failed in "
                    f"the model stages (limit {max_failed:.2%}, --max-failed-fraction)")
    code = EXIT_MODEL_FAILURES
  if routed > 0 and summary.records_unverified > limits.max_unverified * routed:
    problems.append(f"{summary.records_unverified} of {routed} records kept a small answer "
                    "below its threshold because the frontier failed on it (status "
                    f"unverified; limit {limits.max_unverified:.2%}, --max-unverified-fraction)")
    code = code or EXIT_MODEL_FAILURES
  if (summary.small_answers > 0
      and summary.small_failed > limits.max_small_failed * summary.small_answers):
    kinds = ", ".join(f"{k} {n}" for k, n in summary.small_failures[:4])
    problems.append(f"the small tier failed {summary.small_failed} of {summary.small_answers} "
                    f"stage answers ({kinds}); they escalated to the frontier, at its price "
                    f"(limit {limits.max_small_failed:.0%}, --max-small-failed-fraction; "
                    "see small_error in the results)")
    code = code or EXIT_MODEL_FAILURES
  if (max_dead is not None and summary.records_read > 0
      and summary.decode_dead_letters > max_dead * summary.records_read):
    problems.append(f"{summary.decode_dead_letters} of {summary.records_read} records were "
                    f"undecodable (limit {max_dead:.2%}, --max-dead-letter-fraction)")
    code = code or EXIT_DEAD_LETTERS
  if 0 <= summary.offsets_covered < summary.offsets_in_range:
    problems.append(f"the run covered {summary.offsets_covered} of the "
                    f"{summary.offsets_in_range} offsets of its range: the runner dropped "
                    "part of the read; offsets past what was written were not committed, "
                    "so a re-run reads them")
    code = EXIT_FAILED
  for tier, n in zip(("small", "frontier"), summary.rejected):
    if n > 0:
      problems.append(f"{n} {tier}-tier stage answers were refused by the provider (HTTP 4xx "
                      "other than 429: a parameter the model does not take, a bad key); see "
                      f"{tier}_error in the results")
      code = code or EXIT_MODEL_FAILURES
  if summary.offsets_deleted > 0:
    problems.append(f"{summary.offsets_deleted} offsets were deleted by the broker before "
                    "they were read; skipped (--allow-deleted-offsets)")
  if summary.records_read < 0:
    problems.append("the runner reported no metrics: the run's limits were not checked")
  return dataclasses.replace(summary, exit_code=code, problems=tuple(problems))


def _on_an_engine(options: PipelineOptions) -> bool:
  """Whether the run goes to an engine (Flink, Prism, Dataflow), not Beam's local runners."""
  from tierflow.pipelines.options import direct_workers
  return direct_workers(options)[0] == ""


def _name_the_job(options: PipelineOptions, pipeline: str) -> str:
  """The job's name (``--job_name``), set to a unique one if not given, so its failures can
  be looked up on the engine."""
  from apache_beam.options.pipeline_options import GoogleCloudOptions
  cloud = options.view_as(GoogleCloudOptions)
  if not cloud.job_name:
    cloud.job_name = f"tierflow-{pipeline}-{uuid.uuid4().hex[:8]}"
  return cloud.job_name


def launch(name: str, argv: Sequence[str], *, wait: bool = True) -> RunSummary:
  from tierflow._memory import limit_malloc_arenas
  limit_malloc_arenas()  # before the runner and the Kafka clients start their threads
  from tierflow._imported_heap import freeze_imported_heap, no_collections
  with no_collections():  # building imports the pipeline, its runner and their libraries
    p, config = build(name, argv)
    limits = limits_of(p.options)
    engine = _on_an_engine(p.options)
    job_name = _name_the_job(p.options, name) if engine else None
    from tierflow.engine_errors import describe, flink_rest_address
    rest = flink_rest_address(p.options) if engine else None  # before the runner rewrites it
    freeze_imported_heap()  # what the imports built, never garbage: no collection walks it
  try:
    result = p.run()
    if not wait:
      return RunSummary(name, _io(config).output, str(result.state), -1, -1, -1, {})
    result.wait_until_finish()
  except Exception as e:  # noqa: BLE001 - an engine's error, in one line
    if engine:
      raise describe(e, rest, job_name) from None
    # Whatever it raised, the run had started: not a rejection before reading (exit 2).
    raise RunFailed(f"{type(e).__name__}: {e}") from e
  summary = RunSummary(
      pipeline=name,
      output=_io(config).output,
      state=str(result.state),
      rows_written=_counter(result, "rows_written", "tierflow.parquet"),
      dead_letters=_counter(result, "dead_letters_written", "tierflow.parquet"),
      files_written=_counter(result, "files_written", "tierflow.parquet"),
      metrics=metrics_dict(result),
      committed_offsets=_committed(config),
      records_read=_counter(result, "records_read", "tierflow.kafka"),
      decode_dead_letters=_counter(result, "records_dead_lettered", "tierflow.decode"),
      records_failed=_counter(result, "records_failed", "tierflow.routing"),
      records_routed=_counter(result, "records", "tierflow.routing"),
      offsets_deleted=max(0, _counter(result, "offsets_deleted", "tierflow.kafka")),
      rejected=tuple(max(0, _counter(result, f"{tier}_rejected", "tierflow.routing"))
                     for tier in ("small", "frontier")),
      offsets_in_range=_counter(result, "offsets_in_range", "tierflow.kafka"),
      offsets_covered=_counter(result, "offsets_covered", "tierflow.kafka"),
      offsets_already_written=max(0, _counter(result, "offsets_already_written",
                                              "tierflow.kafka"))
      + max(0, _counter(result, "offsets_already_written", "tierflow.parquet")),
      records_unverified=max(0, _counter(result, "records_unverified", "tierflow.routing")),
      records_kept_for_budget=max(0, _counter(result, "records_kept_for_budget",
                                              "tierflow.routing")),
      small_answers=max(0, _counter(result, "small_answers", "tierflow.routing")),
      small_failed=max(0, _counter(result, "small_failed", "tierflow.routing")),
      small_failures=_small_failures(result),
      records_injection_suspected=max(0, _counter(result, "records_injection_suspected",
                                                  "tierflow.routing")),
  )
  return judge(summary, limits)


def _committed(config) -> Optional[dict]:
  """The group's offsets after a run that commits (None when it does not, or on error)."""
  source = _io(config).source
  if not source.commit_offsets:
    return None
  from tierflow.connectors.kafka_offsets import committed_offsets
  try:
    return committed_offsets(source)
  except Exception as e:  # noqa: BLE001 - reporting only; the run itself succeeded
    _LOGGER.warning("could not read the committed offsets of %s: %s", source.group_id, e)
    return None
