"""``tierflow forecast``: what a bounded run will cost before it starts.

From a calibration file written by ``tierflow calibrate --reference frontier`` (its
``forecast`` block: the sample's per-record cost at the run's thresholds) and a range
(a Kafka topic's offsets, or a number of records): the expected cost, escalation share and
frontier spend, with intervals (``tierflow.forecast``).

    tierflow forecast --calibration FILE (--records N | --bootstrap-servers B --topic T
                      [--start-offset N --end-offset M]) [--budget-usd X] [--json FILE]
"""

from __future__ import annotations

import argparse
import json

from tierflow.calibration import Calibration
from tierflow.forecast import LEVEL, count_records, forecast, format_forecast

__all__ = ["add_arguments", "run_from_args"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--calibration", required=True,
                      help="a calibration file from tierflow calibrate --reference frontier")
  parser.add_argument("--records", type=int, help="forecast this many records")
  parser.add_argument("--bootstrap-servers", help="Kafka bootstrap servers")
  parser.add_argument("--topic", help="the topic the run will read")
  parser.add_argument("--start-offset", help="first offset of the range: N or P:N,P:N "
                      "(default: the topic's beginning; give the run's own range)")
  parser.add_argument("--end-offset", help="offset to stop before: N or P:N,P:N")
  parser.add_argument("--budget-usd", type=float, help="the run's budget cap, to compare")
  parser.add_argument("--level", type=float, default=LEVEL, help="interval level (0.95)")
  parser.add_argument("--json", metavar="FILE", help="also write the forecast as JSON")


def run_from_args(args: argparse.Namespace) -> int:
  cal = Calibration.load(args.calibration)
  if not cal.forecast:
    raise ValueError(f"{args.calibration} has no forecast block: write it with tierflow "
                     f"calibrate --reference frontier (both tiers must run on the sample)")
  if (args.records is None) == (args.topic is None):
    raise ValueError("give one of --records N or --topic T (with --bootstrap-servers)")
  if args.topic and not args.bootstrap_servers:
    raise ValueError("--topic needs --bootstrap-servers")
  if not 0 < args.level < 1:
    raise ValueError(f"--level wants a number between 0 and 1, got {args.level}")
  n = args.records if args.records is not None else count_records(
      args.bootstrap_servers, args.topic, start_offset=args.start_offset,
      end_offset=args.end_offset)
  result = forecast(cal.forecast, n, args.level)
  for line in format_forecast(result, args.budget_usd):
    print(line)
  print(f"assumes: records like the calibration sample, the same config and price book "
        f"({', '.join(cal.forecast.get('price_book_versions') or ['?'])}); the budget cap "
        f"and retries are not modelled")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
      f.write("\n")
  return 0
