"""``tierflow report``: the cost/quality report over a run's Parquet output.

Reads ``OUTPUT/results/dt=*/*.parquet`` (and counts ``OUTPUT/dead_letter``),
keeps one row per ``record_id``, and writes to ``--out``: ``report.json`` (every
number, with notes naming each estimate), a self-contained ``report.html``, and
three PNGs. Without labels the report is cost-only.

    tierflow report OUTPUT_DIR [--labels FILE] [--label-field STAGE=COL[,COL]]
                               [--id-field COL] [--out DIR] [--frontier-only DIR]
                               [--calibration FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from tierflow.labels import parse_label_fields
from tierflow.report import build_report
from tierflow.report_render import _fmt

__all__ = ["add_arguments", "main", "run_from_args"]


def main(argv: Optional[Sequence[str]] = None) -> int:
  """``tierflow report OUTPUT_DIR [--labels FILE] [--out DIR] ...``"""
  parser = argparse.ArgumentParser(prog="tierflow report", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_arguments(parser)
  args = parser.parse_args(argv)
  try:
    return run_from_args(args)
  except ValueError as e:
    print(f"tierflow report: error: {e}", file=sys.stderr)
    return 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The report's flags, for the ``tierflow report`` subcommand."""
  parser.add_argument("output_dir", help="a run's output directory (with results/)")
  parser.add_argument("--labels", help="reference answers, JSONL or Parquet")
  parser.add_argument("--label-field", action="append", default=[], metavar="STAGE=COL[,COL]",
                      help="label column(s) of a stage (repeatable)")
  parser.add_argument("--id-field", help="id column shared by results and labels")
  parser.add_argument("--out", help="report directory (default: OUTPUT_DIR/report)")
  parser.add_argument("--frontier-only", metavar="DIR",
                      help="output of a frontier-only run over the same records: the measured "
                           "frontier-only baseline (else its quality is unknown)")
  parser.add_argument("--calibration", metavar="FILE",
                      help="the calibration file the run used: alpha, delta, n and whether "
                           "each stage was certified, with a banner where not")
  parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
  parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")


def run_from_args(args: argparse.Namespace) -> int:
  out = args.out or os.path.join(args.output_dir, "report")
  report = build_report(args.output_dir, args.labels, parse_label_fields(args.label_field),
                        out, id_field=args.id_field, resamples=args.resamples, seed=args.seed,
                        frontier_only=args.frontier_only, calibration=args.calibration)
  for banner in report["banners"]:
    print(f"WARNING: {banner}")
  c = report["cost"]
  print(f"records {report['run']['records']}  routed {_fmt(c['routed_per_1k'], 'usd')}/1k  "
        f"frontier-only ({c['frontier_only_source']}) "
        f"{_fmt(c['frontier_only_per_1k'], 'usd')}/1k  "
        f"savings {_fmt(c['savings_pct'], 'pct')} ({c['savings_quality']})")
  for line in report["guarantee"]:
    print(f"guarantee: {line}")
  if report["quality"]:
    print(f"routed accuracy {_fmt(report['quality']['routed_accuracy'], 'rate')}")
  print(f"report: {os.path.join(out, 'report.html')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
