"""``tierflow calibrate``: per-stage thresholds with an error guarantee, from a labelled sample.

Input: reference answers (``--labels``, JSONL or Parquet keyed by ``ticket_id``,
``doc_id`` or ``record_id``; gold labels or a frontier model's outputs) and the
small tier's own answers and confidences on the same records, either

* read from a previous tierflow run (``--from-output DIR``): the ledger keeps
  every stage's ``small_answer`` and ``confidence``, escalated or not; or
* produced now (``--run PIPELINE --records FILE``): the pipeline's small tier
  runs over the records (JSONL in the topic's JSON format) in-process, with
  escalation switched off (budget 0), and its output is kept in ``--work-dir``.

Each scorable stage (classify: the label; extract: every labelled field; see
``tierflow report``) is calibrated with :func:`tierflow.calibration.calibrate_threshold`
(Learn-then-Test): the non-escalated records' error stays <= alpha with
probability >= 1 - delta. A stage whose sample cannot certify alpha gets
``threshold = inf``: it escalates everything, and the command says why.
Records the small tier failed on, or answered without a confidence, always
escalate in the pipeline; here they count as confidence 0 and wrong, which can
only make the certified threshold stricter.

    tierflow calibrate --labels FILE (--from-output DIR | --run PIPELINE --records FILE)
                       [--alpha A | --alpha STAGE=A ...] [--delta D] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Mapping, Optional, Sequence

import numpy as np

from tierflow import labels as labels_lib
from tierflow import results as results_lib
from tierflow.calibration import METHODS, Calibration, StageCalibration, calibrate_threshold

ROUTED_KINDS = ("classify", "extract")  # the stage kinds a learned router is fitted for

__all__ = ["StageSample", "stage_samples", "calibrate_output", "run_small_tier",
           "add_arguments", "run_from_args"]


@dataclasses.dataclass(frozen=True)
class StageSample:
  """One stage's calibration data: the small tier's confidence and correctness per record."""
  stage: str
  kind: str
  confidence: np.ndarray
  correct: np.ndarray
  small_cost: np.ndarray
  frontier_cost: np.ndarray
  small_models: tuple
  no_confidence: int
  answers: tuple = ()  # per record, a learned router's input (``ledger_answer``)
  signals: tuple = ()  # the confidence signals seen (logprob, verbalised, agreement, ...)

  @property
  def n(self) -> int:
    return len(self.confidence)


def stage_samples(output_dir: str, labels: str, *,
                  label_fields: Optional[labels_lib.LabelFields] = None,
                  id_field: Optional[str] = None) -> tuple[dict[str, StageSample], list[str]]:
  """Per scorable stage, the labelled records' small-tier confidence and correctness.

  Returns the samples and notes on what was left out (unscorable stages,
  unlabelled records). Raises ValueError when the output lacks the small
  tier's own answers.
  """
  run = results_lib.read_run(output_dir, (*results_lib.ID_FIELDS, id_field)
                             if id_field else results_lib.ID_FIELDS)
  rows = labels_lib.read_labels(labels)
  if not rows:
    raise ValueError(f"{labels}: no label rows")
  idf = labels_lib.pick_id_field(run, rows, id_field)
  refs, join = labels_lib.reference_rows(run, rows, idf)
  fields, notes = labels_lib.resolve_label_fields(run, rows, label_fields)
  if join["records_with_labels"] < run.n:
    notes.append(f"{run.n - join['records_with_labels']} of {run.n} records in the output have "
                 f"no label and are not used")
  if join["labels_without_results"]:
    notes.append(f"{join['labels_without_results']} labelled records are not in the output")
  by_name = {s.name: s for s in run.stages}
  out = {}
  for name, cols in fields.items():
    stage = by_name[name]
    scores = labels_lib.score_stage(stage, run, refs, cols)
    if scores.small is None:
      raise ValueError(
          f"stage {name}: the output does not carry the small tier's own answer on every "
          f"labelled record (stages[].small_answer); calibrate from a tierflow output written "
          f"by this version, or use --run")
    use = scores.labelled
    conf = stage.col("confidence")[use]
    correct = scores.small[use] == 1.0
    missing = np.isnan(conf)
    conf = np.where(missing, 0.0, np.clip(conf, 0.0, 1.0))
    correct = correct & ~missing
    small_cost = np.nan_to_num(stage.col("small_cost_usd")[use])
    frontier_cost = np.nan_to_num(stage.col("frontier_only_cost_usd")[use])
    models = tuple(sorted({str(m) for m in stage.col("small_model")[use] if m}))
    # Of the records with a confidence (a failed or unscored answer has no scale).
    signals = tuple(sorted({str(g) for g, m in zip(stage.col("confidence_signal")[use],
                                                   missing) if g and not m}))
    from tierflow.learned_router import ledger_answer
    answers = tuple(ledger_answer(None if a is None else str(a), f)
                    for a, f in zip(stage.col("small_answer")[use],
                                    stage.col("small_field_confidence")[use]))
    out[name] = StageSample(name, stage.kind, conf, correct, small_cost, frontier_cost, models,
                            int(missing.sum()), answers, signals)
    if missing.any():
      notes.append(f"stage {name}: {int(missing.sum())} records have no small-tier confidence "
                   f"(failed or no signal); counted as confidence 0 and wrong (they always "
                   f"escalate)")
  if not out:
    raise ValueError("no stage can be scored against these labels: "
                     + "; ".join(notes[-3:]))
  return out, notes


def _alpha_for(stage: str, alphas: Mapping[str, float], default: Optional[float]) -> float:
  if stage in alphas:
    return alphas[stage]
  if default is None:
    raise ValueError(f"no --alpha for stage {stage} (give --alpha A or --alpha {stage}=A)")
  return default


def calibrate_output(output_dir: str, labels: str, *, alpha: Optional[float] = None,
                     alphas: Optional[Mapping[str, float]] = None, delta: float = 0.1,
                     method: str = "ltt-binomial", stages: Optional[Sequence[str]] = None,
                     label_fields: Optional[labels_lib.LabelFields] = None,
                     id_field: Optional[str] = None, fallback_coverage: Optional[float] = 0.1,
                     router: Optional[str] = None,
                     source: Optional[str] = None) -> tuple[Calibration, list[str]]:
  """Calibrates every scorable stage (or ``stages``) of a run's output against labels.

  ``router="logistic"``: classify and extract stages get a cross-fitted learned router
  (``tierflow.learned_router``) and the threshold is certified on its scores; a stage
  whose labels are too few for it keeps the plain confidence, with a note.
  """
  samples, notes = stage_samples(output_dir, labels, label_fields=label_fields,
                                 id_field=id_field)
  alphas = dict(alphas or {})
  unknown = set(alphas) - set(samples)
  if unknown:
    raise ValueError(f"--alpha names stage(s) {sorted(unknown)} that cannot be calibrated "
                     f"here; scorable: {sorted(samples)}")
  if stages:
    missing = set(stages) - set(samples)
    if missing:
      raise ValueError(f"stage(s) {sorted(missing)} cannot be calibrated here; scorable: "
                       f"{sorted(samples)}")
    samples = {k: v for k, v in samples.items() if k in stages}
  if router not in (None, "none", "logistic"):
    raise ValueError(f"--router wants none or logistic, got {router!r}")
  results, data = {}, {}
  for name, s in samples.items():
    score, fitted = s.confidence, None
    if router == "logistic" and s.kind in ROUTED_KINDS:
      from tierflow.learned_router import fit_cross
      try:
        fitted, score = fit_cross(s.confidence, s.answers, s.correct)
      except ValueError as err:
        notes.append(f"stage {name}: no learned router ({err}); the threshold applies to the "
                     f"confidence")
    elif router == "logistic":
      notes.append(f"stage {name}: a learned router is fitted for {' and '.join(ROUTED_KINDS)} "
                   f"stages only; the threshold applies to the confidence")
    sc = calibrate_threshold(
        score, s.correct, _alpha_for(name, alphas, alpha), delta, method=method,
        small_cost=s.small_cost, frontier_cost=s.frontier_cost,
        fallback_coverage=fallback_coverage, stage=name)
    sc = dataclasses.replace(sc, signals=s.signals or None)
    if fitted is not None:
      sc = dataclasses.replace(sc, router=fitted.to_dict(),
                               reason=sc.reason + "; on the learned router's cross-fitted score")
    results[name] = sc
    data[name] = (s.confidence, s.correct)
  models = sorted({m for s in samples.values() for m in s.small_models})
  src = source or (f"labels={os.path.abspath(labels)}; small-tier outputs="
                   f"{os.path.abspath(output_dir)}")
  signals = sorted({g for s in samples.values() for g in s.signals})
  # A threshold holds for the signal it was calibrated on: run with the same small tier
  # settings (model, logprobs, samples).
  src += (f"; small model(s)={','.join(models) or '?'}; "
          f"confidence signal(s)={','.join(signals) or '?'}")
  return Calibration.create(results, data, source=src), notes


# ----------------------------------------------------------------------------- --run


def _record_rows(path: str) -> list[dict]:
  rows = labels_lib.read_labels(path)
  if not rows:
    raise ValueError(f"{path}: no records")
  return rows


def run_small_tier(pipeline: str, records: str, work_dir: str, *,
                   config: Optional[str] = None, runner: str = "FnApiRunner") -> str:
  """Runs ``pipeline``'s small tier over ``records`` (no escalation); returns the output dir.

  The records go through the same JSON decoding as the topic would (invalid
  ones land in ``WORK_DIR/dead_letter`` with the reason) and the same
  ``RouteBatches`` transform with every threshold 0 and a budget of 0, so
  no frontier request is made: records that would need one are marked
  ``budget_skipped`` and keep their small answer.
  """
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions

  from tierflow import schemas
  from tierflow.config import load_config
  from tierflow.connectors.codecs import JsonCodec
  from tierflow.connectors.decode import DecodeBatches
  from tierflow.connectors.kafka_source import KafkaBatch
  from tierflow.connectors.parquet_dataset import WriteBatches
  from tierflow.launcher import PIPELINES
  from tierflow.pipelines.budget import Budget
  from tierflow.pipelines.routing import RouteBatches
  from tierflow.prices import load_price_book

  if pipeline not in PIPELINES or pipeline == "passthrough":
    raise ValueError(f"--run wants a model pipeline ({', '.join(sorted(set(PIPELINES) - {'passthrough'}))}), "
                     f"got {pipeline!r}")
  run = load_config(config or pipeline)
  run = run.with_thresholds({s.name: 0.0 for s in run.stages})
  schema = schemas.load(run.schema)
  names = schemas.field_names(schema)
  now = int(time.time() * 1000)
  values = [json.dumps({k: row.get(k) for k in names if k in row}).encode("utf-8")
            for row in _record_rows(records)]
  from tierflow import progress
  progress.add(read=len(values))  # progress lines count the small tier's answers of these
  batch = KafkaBatch("calibration-sample", 0, 0, len(values), 0, list(range(len(values))),
                     [now] * len(values), [None] * len(values), values)
  book = load_price_book(run.price_book)
  os.makedirs(work_dir, exist_ok=True)
  decode = DecodeBatches(JsonCodec(schema))
  # A budget of 0: records that would escalate (a failed small answer) are marked
  # budget_skipped and keep what the small tier said; no frontier request is made.
  route = RouteBatches(run, book, input_row_schema=decode.row_schema,
                       budget=Budget(0.0, per_process=True))
  with beam.Pipeline(runner=runner, options=PipelineOptions([])) as p:
    _ = (p | "Records" >> beam.Create([batch])
         | "Decode" >> decode
         | "SmallTier" >> route
         | "Write" >> WriteBatches(work_dir, route.result_schema))
  return work_dir


# ----------------------------------------------------------------------------- CLI


def _parse_alphas(values: Sequence[str]) -> tuple[Optional[float], dict[str, float]]:
  default, per_stage = None, {}
  for v in values:
    stage, sep, num = v.rpartition("=")
    try:
      x = float(num)
    except ValueError:
      raise ValueError(f"--alpha wants A or STAGE=A, got {v!r}") from None
    if sep:
      per_stage[stage] = x
    else:
      default = x
  return default, per_stage


def add_arguments(parser: argparse.ArgumentParser) -> None:
  src = parser.add_argument_group("where the small tier's answers come from (one of)")
  src.add_argument("--from-output", metavar="DIR",
                   help="a previous tierflow run's output directory (its ledger)")
  src.add_argument("--run", metavar="PIPELINE",
                   help="run this pipeline's small tier now over --records (no escalation)")
  parser.add_argument("--labels", required=True,
                      help="reference answers, JSONL or Parquet (gold or frontier outputs)")
  parser.add_argument("--records", help="with --run: the records, JSONL in the topic's JSON "
                      "format (may be the labels file itself)")
  parser.add_argument("--config", help="with --run: the run config (default: the bundled one)")
  parser.add_argument("--work-dir", help="with --run: where its output goes (default: a temp dir)")
  parser.add_argument("--alpha", action="append", default=[], metavar="A|STAGE=A",
                      help="target error on non-escalated records, for all stages or one "
                           "(repeatable; default 0.05)")
  parser.add_argument("--delta", type=float, default=0.1,
                      help="allowed probability that the guarantee fails (default 0.1)")
  parser.add_argument("--method", choices=METHODS, default="ltt-binomial",
                      help="ltt-binomial (default) or ltt-hb: P(error on kept <= alpha) >= "
                           "1 - delta; crc: the weaker expected-risk mode, E[share of all "
                           "records kept with a wrong answer] <= alpha (delta unused)")
  parser.add_argument("--stage", action="append", default=[],
                      help="calibrate only this stage (repeatable; default all scorable)")
  parser.add_argument("--label-field", action="append", default=[], metavar="STAGE=COL[,COL]",
                      help="label column(s) of a stage (repeatable)")
  parser.add_argument("--id-field", help="id column shared by the records and the labels")
  parser.add_argument("--out", default="calibration.json", help="calibration file to write")
  parser.add_argument("--router", choices=("none", "logistic"), default="none",
                      help="logistic: fit a learned router per classify and extract stage "
                           "(the confidence and the answer: its label, or the fields left null; "
                           "cross-fitted on the labels) and certify the threshold on its score "
                           "instead of the raw confidence")
  parser.add_argument("--strict", action="store_true",
                      help="exit 3 when a stage cannot be certified (it is still written, "
                           "escalating everything)")


def format_stage(sc: StageCalibration) -> str:
  cost = "" if sc.expected_cost_per_1k is None else f", ${sc.expected_cost_per_1k:.4f}/1k records"
  if not sc.certified:
    return (f"  {sc.stage}: NOT CERTIFIED -> escalates every record (threshold inf)\n"
            f"      {sc.reason}{cost}")
  scored = " (learned router score)" if sc.router else ""
  if sc.method == "crc":
    return (f"  {sc.stage}: threshold {sc.threshold:g}{scored}  coverage {sc.coverage:.1%} "
            f"(escalates {sc.escalation_rate:.1%})  EXPECTED share of records kept wrong "
            f"<= {sc.risk_upper_bound:.2%} <= alpha {sc.alpha:g} (conformal risk control: "
            f"no 1-delta guarantee), n={sc.n}{cost}")
  return (f"  {sc.stage}: threshold {sc.threshold:g}{scored}  coverage {sc.coverage:.1%} "
          f"(escalates {sc.escalation_rate:.1%})  error on kept {sc.empirical_risk:.2%} "
          f"<= bound {sc.risk_upper_bound:.2%} <= alpha {sc.alpha:g} at delta {sc.delta:g}, "
          f"n={sc.n}{cost}")


def run_from_args(args: argparse.Namespace) -> int:
  if bool(args.from_output) == bool(args.run):
    raise ValueError("give exactly one of --from-output DIR or --run PIPELINE")
  if args.run and not args.records:
    raise ValueError("--run needs --records FILE (the records to run the small tier on)")
  if args.from_output and (args.records or args.config or args.work_dir):
    raise ValueError("--records/--config/--work-dir only go with --run")
  default, per_stage = _parse_alphas(args.alpha)
  if default is None and not per_stage:
    default = 0.05
  output = args.from_output
  if args.run:
    work = args.work_dir or tempfile.mkdtemp(prefix="tierflow-calibrate-")
    print(f"running the {args.run} small tier over {args.records} (no escalation) -> {work}")
    output = run_small_tier(args.run, args.records, work, config=args.config)
  calibration, notes = calibrate_output(
      output, args.labels, alpha=default, alphas=per_stage, delta=args.delta,
      method=args.method, stages=args.stage or None,
      label_fields=labels_lib.parse_label_fields(args.label_field), id_field=args.id_field,
      router=args.router)
  calibration.save(args.out)
  for note in notes:
    print(f"note: {note}")
  print(f"calibration {calibration.created_at} data {calibration.data_hash[:12]} -> {args.out}")
  for sc in calibration.stages.values():
    print(format_stage(sc))
  print(f"use it:  tierflow run PIPELINE ... --calibration {args.out}")
  uncertified = [s for s, sc in calibration.stages.items() if not sc.certified]
  return 3 if uncertified and args.strict else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="tierflow calibrate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_arguments(parser)
  return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
  sys.exit(main())
