"""Turns command-line flags into a running Beam pipeline (the launcher, as in Flex Templates).

``launch(name, argv)`` parses Beam-style flags (unknown flags are an error, so a
typo such as ``--end-ofset`` never silently reads the whole topic), builds the
typed config, calls the pipeline's pure ``build_pipeline(p, config)`` and runs
it. Without ``--runner`` it runs locally on Beam's FnApiRunner, which supports
splittable DoFns and bundle finalization (offset commits).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
from typing import Callable, Optional, Sequence

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from tierflow.pipelines.options import SourceSinkConfig

_LOGGER = logging.getLogger(__name__)

# name -> module under tierflow.pipelines exposing NAME, build_pipeline and
# optionally config_from_options(options) (else SourceSinkConfig.from_options).
PIPELINES = {
    "passthrough": "tierflow.pipelines.passthrough",
    "tickets": "tierflow.pipelines.tickets",
    "documents": "tierflow.pipelines.documents",
}


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
  parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False,
                                   conflict_handler="resolve")
  for cls in _all_option_classes():
    own = cls.__module__.startswith("tierflow.")
    if pipeline_options is None or not own or cls in pipeline_options:
      cls._add_argparse_args(parser)
  _, unknown = parser.parse_known_args(list(argv))
  flags = [u for u in unknown if u.startswith("--")]
  if flags:
    raise ValueError(f"unknown flag(s): {' '.join(flags)}")


def pipeline_module(name: str):
  if name not in PIPELINES:
    raise ValueError(f"unknown pipeline {name!r}; choose one of {', '.join(sorted(PIPELINES))}")
  return importlib.import_module(PIPELINES[name])


def make_options(argv: Sequence[str],
                 pipeline_options: Optional[Sequence[type]] = None) -> PipelineOptions:
  check_flags(argv, pipeline_options)
  options = PipelineOptions(list(argv))
  standard = options.view_as(StandardOptions)
  if not standard.runner:
    standard.runner = "FnApiRunner"
  return options


def build(name: str, argv: Sequence[str]) -> tuple[beam.Pipeline, object]:
  """The constructed (not yet run) pipeline and its config."""
  module = pipeline_module(name)
  options = make_options(argv, getattr(module, "OPTIONS", None))
  make_config: Callable = getattr(module, "config_from_options", None) or (
      lambda o: SourceSinkConfig.from_options(o, pipeline=name))
  config = make_config(options)
  p = beam.Pipeline(options=options)
  module.build_pipeline(p, config)
  return p, config


def _counter(result, name: str, step: Optional[str] = None) -> int:
  try:
    f = MetricsFilter().with_name(name)
    if step:
      f = f.with_step(step)
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


def launch(name: str, argv: Sequence[str], *, wait: bool = True) -> RunSummary:
  p, config = build(name, argv)
  result = p.run()
  if not wait:
    return RunSummary(name, config.output, str(result.state), -1, -1, -1, {})
  result.wait_until_finish()
  return RunSummary(
      pipeline=name,
      output=config.output,
      state=str(result.state),
      rows_written=_counter(result, "rows_written"),
      dead_letters=_counter(result, "dead_letters_written"),
      files_written=_counter(result, "files_written"),
      metrics=metrics_dict(result),
      committed_offsets=_committed(config),
  )


def _committed(config) -> Optional[dict]:
  """The group's offsets after a run that commits (None when it does not, or on error)."""
  io = getattr(config, "io", config)
  source = getattr(io, "source", None)
  if source is None or not source.commit_offsets:
    return None
  from tierflow.connectors.kafka_source import committed_offsets
  try:
    return committed_offsets(source)
  except Exception as e:  # noqa: BLE001 - reporting only; the run itself succeeded
    _LOGGER.warning("could not read the committed offsets of %s: %s", source.group_id, e)
    return None
