"""``tierflow run`` plus the Java-side Flink runner options (checkpointing).

    python deploy/flink/flink_run.py PIPELINE [--no-wait] [pipeline and Beam flags]

Same arguments as ``tierflow run``. Why it exists: ``--checkpointing_interval``
and the other checkpoint settings are options of Beam's *Java* Flink runner
(``FlinkPipelineOptions``); Python's ``FlinkRunnerOptions`` does not declare
them. Beam learns them at submission time from the job server, but tierflow's
launcher rejects every flag no ``PipelineOptions`` class declares (so a typo
never silently changes a run), and it checks before any job server exists:
``tierflow run ... --checkpointing_interval 60000`` fails with
``unknown flag(s): --checkpointing_interval``. Declaring them here, as a
``PipelineOptions`` subclass, makes the launcher accept them, and Beam then
sends them to the runner as ``beam:option:checkpointing_interval:v1``, the
name the Java runner reads (the portable runner skips runner options that are
already declared, so there is no conflict). Without checkpoints, a streaming
job on Flink never finalizes bundles, so it never commits Kafka offsets.

If tierflow's own options ever declare these flags, this file can go and
``submit.sh`` can call ``tierflow run`` directly.
"""

from __future__ import annotations

import sys

from apache_beam.options.pipeline_options import PipelineOptions


class FlinkCheckpointOptions(PipelineOptions):
  """A subset of Beam's Java ``FlinkPipelineOptions`` (names as Python flags)."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument(
        "--checkpointing_interval", type=int, default=None,
        help="Flink checkpoint interval in ms; bundles are finalized (Kafka offsets "
             "committed) after each completed checkpoint. Streaming only.")
    parser.add_argument(
        "--checkpointing_mode", default=None, choices=("EXACTLY_ONCE", "AT_LEAST_ONCE"),
        help="Flink checkpointing mode (runner default EXACTLY_ONCE).")
    parser.add_argument(
        "--checkpoint_timeout_millis", type=int, default=None,
        help="Abort a checkpoint that takes longer than this (ms).")
    parser.add_argument(
        "--min_pause_between_checkpoints", type=int, default=None,
        help="Minimum pause between checkpoints (ms).")


def main(argv=None) -> int:
  from tierflow.cli import main as tierflow_main
  return tierflow_main(["run", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
  sys.exit(main())
