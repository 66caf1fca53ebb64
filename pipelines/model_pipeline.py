"""What ``tickets`` and ``documents`` share: Kafka -> small tier -> escalation -> ledger -> Parquet.

Every offset batch is read, decoded, routed and written as one element, so the
pipeline holds at most the batches in flight (``--rows-per-file`` offsets each,
10,000 by default here), and the group's offsets move only past batches whose
results and dead letters are written.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from tierflow import schemas
from tierflow.config import RunConfig, load_config
from tierflow.pipelines.budget import Budget
from tierflow.pipelines.options import (KafkaSourceOptions, ParquetSinkOptions,
                                        RunLimitsOptions, SourceSinkConfig, _add, _Unprefixed,
                                        direct_workers)
from tierflow.pipelines.routing import RouteBatches
from tierflow.pipelines.transforms import ReadAndDecode, WriteAndCommit
from tierflow.prices import PriceBook, load_price_book

MODEL_ROWS_PER_FILE = 10_000

_LOGGER = logging.getLogger(__name__)

__all__ = ["ModelOptions", "ModelPipelineConfig", "config_from_options", "build_pipeline"]


class ModelOptions(PipelineOptions):
  @classmethod
  def _add_argparse_args(cls, parser):
    _add(parser, "config", default=None,
         help="run config YAML (models, stages, thresholds, budget); default: the bundled "
              "config named after the pipeline")
    _add(parser, "calibration", default=None,
         help="calibration file from `tierflow calibrate`: its thresholds replace the config's")
    _add(parser, "budget-usd", type=float, default=None,
         help="override the config's budget cap for frontier escalations (per run; per "
              "--budget-period for streaming runs)")
    _add(parser, "budget-period", default="day", choices=("day", "hour", "none"),
         help="streaming runs: the budget applies per period of processing time (UTC)")
    _add(parser, "batch-tiers", default=None,
         help="tiers sent through the providers' batch APIs at their batch discount "
              "(bounded runs): small, frontier, small,frontier or none; default: each "
              "model's mode in the config")
    _add(parser, "max-batch-wait", type=float, default=None,
         help="seconds a provider batch may take before it is cancelled and its requests "
              "go synchronously (or fail: batch_fallback); default: the config's (24 h)")
    _add(parser, "batch-poll-seconds", type=float, default=None,
         help="seconds between checks of a submitted batch (default: the config's, 30)")
    _add(parser, "workers-hint", type=int, default=None,
         help="how many worker processes share the models' rpm/tpm limits (each takes "
              "limit / workers) and a streaming run's budget (each gets budget / workers "
              "per period); default: --direct_num_workers (multi_processing), --parallelism "
              "(Flink) or --max_num_workers/--num_workers (Dataflow), else 1")


@dataclasses.dataclass(frozen=True)
class ModelPipelineConfig:
  io: SourceSinkConfig
  run: RunConfig
  price_book: PriceBook
  calibration_version: Optional[str] = None
  budget: Budget = Budget()

  @property
  def output(self) -> str:
    return self.io.output


# The option classes a model pipeline reads (the launcher rejects other tierflow flags).
OPTIONS = (KafkaSourceOptions, ParquetSinkOptions, ModelOptions, RunLimitsOptions)


def _with_batch_settings(run: RunConfig, m) -> RunConfig:
  if m.batch_tiers is not None:
    tiers = {t.strip() for t in m.batch_tiers.split(",") if t.strip()} - {"none"}
    unknown = tiers - {"small", "frontier"}
    if unknown:
      raise ValueError(f"--batch-tiers: {sorted(unknown)} are not tiers (small, frontier, "
                       "none)")
    for tier in ("small", "frontier"):
      run = run.with_model(tier, mode="batch" if tier in tiers else "sync")
  for flag, name, value in (("--max-batch-wait", "batch_max_wait_s", m.max_batch_wait),
                            ("--batch-poll-seconds", "batch_poll_s", m.batch_poll_seconds)):
    if value is not None:
      if value <= 0:
        raise ValueError(f"{flag} must be positive")
      for tier in ("small", "frontier"):
        run = run.with_model(tier, **{name: value})
  return run


def workers_of(options: PipelineOptions, hint: Optional[int] = None) -> int:
  """How many worker processes share the limits: ``hint`` if given, else what the runner's
  own options say (on Dataflow, VMs: with several SDK processes per VM pass the hint)."""
  if hint is not None:
    if hint < 1:
      raise ValueError("--workers-hint must be >= 1")
    return hint
  mode, direct = direct_workers(options)
  if mode == "multi_processing":
    return max(1, direct)
  opts = options.get_all_options(retain_unknown_options=True)
  for name in ("parallelism", "max_num_workers", "num_workers"):
    try:
      value = int(opts.get(name) or 0)
    except (TypeError, ValueError):
      continue
    if value > 0:
      return value
  return 1


def config_from_options(options: PipelineOptions, pipeline: str) -> ModelPipelineConfig:
  m = _Unprefixed(options.view_as(ModelOptions))
  run = load_config(m.config or pipeline)
  calibration_version = None
  if m.calibration:
    from tierflow.calibration import Calibration
    calibration = Calibration.load(m.calibration)
    stage_names = {s.name for s in run.stages}
    unknown = sorted(set(calibration.stages) - stage_names)
    if unknown:
      raise ValueError(f"--calibration {m.calibration} calibrates stage(s) {unknown} that the "
                       f"config does not have ({sorted(stage_names)}): wrong file?")
    kept = sorted(stage_names - set(calibration.stages))
    if kept:
      _LOGGER.warning("--calibration %s has no thresholds for stage(s) %s; they keep the "
                      "config's thresholds", m.calibration, kept)
    from tierflow.calibration import signal_problem
    for name, sc in calibration.stages.items():
      why = signal_problem(sc.signals, run.small.samples, run.small.uses_logprobs)
      if why:
        raise ValueError(f"--calibration {m.calibration}: stage {name} was {why}: its "
                         "threshold does not hold here; calibrate with the small tier as you "
                         "run it")
    run = run.with_thresholds({name: sc.threshold for name, sc in calibration.stages.items()})
    from tierflow.learned_router import LearnedRouter
    run = run.with_routers({name: LearnedRouter.from_dict(sc.router)
                            for name, sc in calibration.stages.items() if sc.router})
    calibration_version = f"{calibration.created_at}/{calibration.data_hash[:12]}"
  if m.budget_usd is not None:
    if m.budget_usd < 0:
      raise ValueError("--budget-usd must be >= 0")
    run = dataclasses.replace(run, budget_usd=m.budget_usd)
  run = _with_batch_settings(run, m)
  workers = workers_of(options, m.workers_hint)
  run = run.with_limits_shared_by(workers)
  io = SourceSinkConfig.from_options(options, pipeline=pipeline, default_schema=run.schema,
                                     default_rows_per_file=MODEL_ROWS_PER_FILE)
  if io.schema.get("name") != schemas.load(run.schema).get("name"):
    raise ValueError(f"--schema {io.schema.get('name')} does not match the config's "
                     f"input schema {run.schema}")
  batched = [t for t in ("small", "frontier") if getattr(run, t).mode == "batch"]
  if batched and not io.source.bounded:
    raise ValueError(f"batch mode ({', '.join(batched)} tier) is for bounded runs: a "
                     "streaming run cannot wait hours for its answers; use --bounded, or "
                     "--batch-tiers none")
  budget = Budget(run.budget_usd, None if m.budget_period == "none" else m.budget_period,
                  workers)
  return ModelPipelineConfig(io, run, load_price_book(run.price_book), calibration_version,
                             budget)


def build_pipeline(p: beam.Pipeline, config: ModelPipelineConfig) -> None:
  """Adds the routed model pipeline to ``p``; no I/O happens until ``p`` runs."""
  read = ReadAndDecode(config.io)
  route = RouteBatches(config.run, config.price_book, input_row_schema=read.row_schema,
                       budget=config.budget, calibration_version=config.calibration_version,
                       batch_state_dir=f"{config.output}/_batches")
  _ = (p
       | "Read" >> read
       | "Route" >> route
       | "Write" >> WriteAndCommit(config.io, route.result_schema))
