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

Without labels (``--reference frontier``, ``tierflow.frontier_reference``): a random
sample of ``--records`` or a topic's range, both tiers run on it, and each stage is
certified on agreement with the frontier's answers; the file records that reference and
the sample's cost at the run's thresholds, for ``tierflow forecast``.

    tierflow calibrate --labels FILE (--from-output DIR | --run PIPELINE --records FILE)
                       [--alpha A | --alpha STAGE=A ...] [--delta D] [--out FILE]
    tierflow calibrate --reference frontier --run PIPELINE (--records FILE | --topic T
                       --bootstrap-servers B [--start-offset N --end-offset M])
                       [--sample N] [--seed S] [--alpha A ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from typing import Mapping, Optional, Sequence

import numpy as np

from tierflow import labels as labels_lib
from tierflow import results as results_lib
from tierflow.calibration import METHODS, Calibration, StageCalibration, calibrate_threshold
from tierflow.pipelines.ledger import SMALL_SKIPPED_PREFIX
from tierflow.pipelines.stage_kinds import KINDS

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
    not_asked = sum(1 for r in stage.col("escalation_reason")[use]
                    if r and str(r).startswith(SMALL_SKIPPED_PREFIX))
    if not_asked:
      raise ValueError(
          f"stage {name}: the small tier was not asked on {not_asked} labelled record(s) of "
          f"this output (run with --skip-small-when-uncertified): nothing to calibrate from; "
          f"calibrate on a sample instead (--run, or --reference frontier)")
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
    if router == "logistic" and KINDS[s.kind].learned_router:
      from tierflow.learned_router import fit_cross
      try:
        fitted, score = fit_cross(s.confidence, s.answers, s.correct)
      except ValueError as err:
        notes.append(f"stage {name}: no learned router ({err}); the threshold applies to the "
                     f"confidence")
    elif router == "logistic":
      routed = [k for k, c in KINDS.items() if c.learned_router]
      notes.append(f"stage {name}: a learned router is fitted for {' and '.join(routed)} "
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
  no frontier request is made (``tierflow.frontier_reference.run_tiers``).
  """
  from tierflow import schemas
  from tierflow.config import load_config
  from tierflow.frontier_reference import run_tiers
  names = schemas.field_names(schemas.load(load_config(config or pipeline).schema))
  values = [json.dumps({k: row.get(k) for k in names if k in row}).encode("utf-8")
            for row in _record_rows(records)]
  return run_tiers(pipeline, values, work_dir, config=config, runner=runner)


def calibrate_against_frontier(args: argparse.Namespace, alpha: Optional[float],
                               alphas: Mapping[str, float]) -> tuple[Calibration, list[str],
                                                                     list[str]]:
  """``--reference frontier``: a random sample, both tiers on it, the frontier's answers as
  the reference. Returns the calibration (with the sample's forecast block), notes, and
  the lines on what the sample cost."""
  from tierflow import frontier_reference as fr
  from tierflow.config import load_config
  from tierflow.forecast import sample_block
  if args.topic:
    values = fr.sample_topic(args.bootstrap_servers, args.topic, args.sample, args.seed,
                             start_offset=args.start_offset, end_offset=args.end_offset)
    where = f"topic {args.topic}" + (f" offsets {args.start_offset or 'start'}.."
                                     f"{args.end_offset or 'end'}"
                                     if args.start_offset or args.end_offset else "")
  else:
    values = fr.sample_file(args.records, args.sample, args.seed)
    where = args.records
  work = args.work_dir or tempfile.mkdtemp(prefix="tierflow-calibrate-")
  print(f"running both tiers of {args.run} over a random sample of {len(values)} records of "
        f"{where} (seed {args.seed}; every stage escalated) -> {work}")
  fr.run_tiers(args.run, values, work, config=args.config, frontier=True)
  labels = os.path.join(work, "frontier_labels.jsonl")
  fields, answered, notes = fr.write_frontier_labels(work, labels)
  if not fields:
    scored = " and ".join(k for k, c in KINDS.items() if c.scored)
    raise ValueError("no stage of this pipeline can be certified against the frontier "
                     f"(only {scored} answers have an exact reference); " + "; ".join(notes))
  model = ", ".join(f"{m}" for m in answered["model"]) or "?"
  hosts = ", ".join(answered["endpoint"])
  calibration, more = calibrate_output(
      work, labels, alpha=alpha, alphas=alphas, delta=args.delta, method=args.method,
      stages=args.stage or None, label_fields=fields, router=args.router,
      source=f"reference: the frontier tier's answers ({model}{' at ' + hosts if hosts else ''}"
             f") on a random sample of {len(values)} records of {where}, seed {args.seed}; "
             f"both tiers' outputs={os.path.abspath(work)}")
  thresholds = {s.name: s.threshold for s in load_config(args.config or args.run).stages}
  thresholds.update({k: sc.threshold for k, sc in calibration.stages.items()})
  block = sample_block(work, thresholds)
  calibration = dataclasses.replace(
      calibration, reference="frontier",
      reference_model=model + (f" at {hosts}" if hosts else ""), forecast=block)
  n = block["records"]
  spent = float(np.nansum(results_lib.read_run(work).records["cost_usd"]))
  cost = [
      f"sample: {n} records; calibrating cost ${spent:.4f} (both tiers on every stage)",
      f"  before (frontier only, billed): ${1000 * block['frontier_only_usd'][0]:.4f} per 1k "
      f"records",
      f"  after (routed at these thresholds, from the same answers): "
      f"${1000 * block['cost_usd'][0]:.4f} per 1k records, {block['escalated'][0]:.1%} of "
      f"records escalated"
      + (f", saves {100 * (1 - block['cost_usd'][0] / block['frontier_only_usd'][0]):.1f}%"
         if block["frontier_only_usd"][0] else "")]
  return calibration, notes + more, cost


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
  parser.add_argument("--labels",
                      help="reference answers, JSONL or Parquet (gold or frontier outputs); "
                           "not with --reference frontier")
  parser.add_argument("--reference", choices=("labels", "frontier"), default="labels",
                      help="labels (default): certify against --labels; frontier: no labels: "
                           "run both tiers of --run on a random sample of --records or "
                           "--topic and certify agreement with the frontier's answers")
  parser.add_argument("--records", help="with --run: the records, JSONL in the topic's JSON "
                      "format (may be the labels file itself)")
  kafka = parser.add_argument_group("with --reference frontier: sample a topic instead of "
                                    "--records (JSON values)")
  kafka.add_argument("--bootstrap-servers", help="Kafka bootstrap servers")
  kafka.add_argument("--topic", help="topic to sample")
  kafka.add_argument("--start-offset", help="first offset of the range: N or P:N,P:N")
  kafka.add_argument("--end-offset", help="offset to stop before: N or P:N,P:N")
  parser.add_argument("--sample", type=int, default=None,
                      help="with --reference frontier: records drawn at random (default all)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the random sample")
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
  if args.reference == "frontier":
    return _run_frontier_reference(args)
  if args.topic or args.sample is not None:
    raise ValueError("--topic and --sample go with --reference frontier")
  if not args.labels:
    raise ValueError("give --labels FILE, or --reference frontier to calibrate without labels")
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
  return _finish(args, calibration, notes)


def _run_frontier_reference(args: argparse.Namespace) -> int:
  if args.labels or args.from_output:
    raise ValueError("--reference frontier takes no --labels or --from-output: the frontier's "
                     "answers on the sample are the reference")
  if not args.run:
    raise ValueError("--reference frontier needs --run PIPELINE (the tiers to run)")
  if bool(args.records) == bool(args.topic):
    raise ValueError("--reference frontier needs one of --records FILE or --topic T")
  if args.topic and not args.bootstrap_servers:
    raise ValueError("--topic needs --bootstrap-servers")
  default, per_stage = _parse_alphas(args.alpha)
  if default is None and not per_stage:
    default = 0.05
  calibration, notes, cost = calibrate_against_frontier(args, default, per_stage)
  return _finish(args, calibration, notes, cost)


def _finish(args: argparse.Namespace, calibration: Calibration, notes: Sequence[str],
            cost: Sequence[str] = ()) -> int:
  calibration.save(args.out)
  for note in notes:
    print(f"note: {note}")
  print(f"calibration {calibration.created_at} data {calibration.data_hash[:12]} -> {args.out}")
  if calibration.reference == "frontier":
    print(f"reference: the frontier's answers ({calibration.reference_model}), not gold "
          f"labels: the guarantee is on agreement with it")
  for sc in calibration.stages.values():
    print(format_stage(sc))
  for line in cost:
    print(line)
  if calibration.forecast:
    print(f"forecast a range before running it:  tierflow forecast --calibration {args.out} "
          f"--bootstrap-servers B --topic T [--start-offset N --end-offset M]")
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
