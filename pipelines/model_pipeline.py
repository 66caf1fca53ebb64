"""What ``tickets`` and ``documents`` share: Kafka -> small tier -> escalation -> ledger -> Parquet.

Every offset batch is read, decoded, routed and written as one element, so the
pipeline holds at most the batches in flight (``--rows-per-file`` offsets each,
10,000 by default here), and the group's offsets move only past batches whose
results and dead letters are written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from tierflow import schemas
from tierflow.config import RunConfig, load_config
from tierflow.connectors.kafka_ledger import DEFAULT_TOPIC, LedgerConfig
from tierflow.pipelines.budget import Budget
from tierflow.pipelines.options import (KafkaSourceOptions, ParquetSinkOptions,
                                        RunLimitsOptions, SourceSinkConfig, _add, _Unprefixed)
from tierflow.pipelines.routing import RouteBatches
from tierflow.pipelines.kafka_to_parquet import ReadAndDecode, WriteAndCommit
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
    _add(parser, "skip-small-when-uncertified", action="store_true", default=False,
         help="with --calibration: a stage the calibration could not certify (threshold "
              "inf: every record escalates) is not sent to the small tier, whose answer "
              "could not be kept; its ledger says so (escalation_reason 'small tier "
              "skipped'). Saves the small tier's time and cost, but the run's output then "
              "holds no small answers for those stages to calibrate or forecast from, and a "
              "record the budget cap keeps from the frontier fails instead of keeping an "
              "unverified small answer")
    _add(parser, "budget-usd", type=float, default=None,
         help="override the config's budget cap for frontier escalations: per "
              "--budget-period of processing time, one account for every worker process "
              "and every run that shares --budget-account")
    _add(parser, "budget-period", default="auto", choices=("auto", "day", "hour", "none"),
         help="the budget applies per UTC day or hour, or once (none); auto: per day for "
              "runs from the group's offsets (streaming or bounded), once for an explicit "
              "offset or time range")
    _add(parser, "budget-account", default=None,
         help="the budget's account in the ledger (default: the consumer group, and for an "
              "explicit range the group and the range)")
    _add(parser, "ledger-topic", default=None,
         help="the Kafka topic (one partition, created when missing) where every worker "
              "process keeps the budget's account and the models' rate-limit windows "
              "(default: tierflow-ledger)")
    _add(parser, "batch-tiers", default=None,
         help="tiers sent through the providers' batch APIs at their batch discount "
              "(bounded runs): small, frontier, small,frontier or none; default: each "
              "model's mode in the config")
    _add(parser, "max-batch-wait", type=float, default=None,
         help="seconds a provider batch may take before it is cancelled and its requests "
              "go synchronously (or fail: batch_fallback); default: the config's (24 h)")
    _add(parser, "batch-poll-seconds", type=float, default=None,
         help="seconds between checks of a submitted batch (default: the config's, 30)")


@dataclasses.dataclass(frozen=True)
class ModelPipelineConfig:
  io: SourceSinkConfig
  run: RunConfig
  price_book: PriceBook
  calibration_version: Optional[str] = None
  budget: Budget = Budget()
  ledger: Optional[LedgerConfig] = None

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


def _budget(run: RunConfig, io: SourceSinkConfig, m) -> Budget:
  """The run's budget: its account (the group, and an explicit range's bounds) and period."""
  src = io.source
  explicit = any(v is not None for v in (src.start_offset, src.end_offset, src.start_time_ms,
                                         src.end_time_ms))
  account = m.budget_account
  if not account:
    account = src.group_id or f"tierflow.{src.topic}"
    if explicit:
      bounds = [src.start_offset, src.start_time_ms, src.end_offset, src.end_time_ms]
      account += "@" + ",".join("" if b is None else json.dumps(b, sort_keys=True)
                                for b in bounds)
  period = m.budget_period
  if period == "auto":
    period = "none" if explicit else "day"
  return Budget(run.budget_usd, None if period == "none" else period, account)


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
    run = dataclasses.replace(run, skip_small_when_uncertified=m.skip_small_when_uncertified)
  elif m.skip_small_when_uncertified:
    raise ValueError("--skip-small-when-uncertified needs --calibration (the stages it skips "
                     "are those the calibration could not certify)")
  if m.budget_usd is not None:
    if m.budget_usd < 0:
      raise ValueError("--budget-usd must be >= 0")
    run = dataclasses.replace(run, budget_usd=m.budget_usd)
  run = _with_batch_settings(run, m)
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
  ledger = LedgerConfig(io.source.bootstrap_servers, m.ledger_topic or DEFAULT_TOPIC,
                        io.source.consumer_config)
  return ModelPipelineConfig(io, run, load_price_book(run.price_book), calibration_version,
                             _budget(run, io, m), ledger)


def build_pipeline(p: beam.Pipeline, config: ModelPipelineConfig) -> None:
  """Adds the routed model pipeline to ``p``; no I/O happens until ``p`` runs."""
  read = ReadAndDecode(config.io)
  route = RouteBatches(config.run, config.price_book, input_row_schema=read.row_schema,
                       budget=config.budget, calibration_version=config.calibration_version,
                       batch_state_dir=f"{config.output}/_batches", ledger=config.ledger
                       ).with_exception_handling()  # a record a bug hits is written failed
  _ = (p
       | "Read" >> read
       | "Route" >> route
       | "Write" >> WriteAndCommit(config.io, route.result_schema))
