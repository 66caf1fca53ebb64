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
                                        RunLimitsOptions, SourceSinkConfig, _add, _Unprefixed)
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
    _add(parser, "workers-hint", type=int, default=1,
         help="streaming runs: how many worker processes share the budget (each gets "
              "budget / workers-hint per period)")


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
    run = run.with_thresholds({name: sc.threshold for name, sc in calibration.stages.items()})
    calibration_version = f"{calibration.created_at}/{calibration.data_hash[:12]}"
  if m.budget_usd is not None:
    if m.budget_usd < 0:
      raise ValueError("--budget-usd must be >= 0")
    run = dataclasses.replace(run, budget_usd=m.budget_usd)
  if m.workers_hint < 1:
    raise ValueError("--workers-hint must be >= 1")
  io = SourceSinkConfig.from_options(options, pipeline=pipeline, default_schema=run.schema,
                                     default_rows_per_file=MODEL_ROWS_PER_FILE)
  if io.schema.get("name") != schemas.load(run.schema).get("name"):
    raise ValueError(f"--schema {io.schema.get('name')} does not match the config's "
                     f"input schema {run.schema}")
  budget = Budget(run.budget_usd, None if m.budget_period == "none" else m.budget_period,
                  m.workers_hint)
  return ModelPipelineConfig(io, run, load_price_book(run.price_book), calibration_version,
                             budget)


def build_pipeline(p: beam.Pipeline, config: ModelPipelineConfig) -> None:
  """Adds the routed model pipeline to ``p``; no I/O happens until ``p`` runs."""
  read = ReadAndDecode(config.io)
  route = RouteBatches(config.run, config.price_book, input_row_schema=read.row_schema,
                       budget=config.budget, calibration_version=config.calibration_version)
  _ = (p
       | "Read" >> read
       | "Route" >> route
       | "Write" >> WriteAndCommit(config.io, route.result_schema))
