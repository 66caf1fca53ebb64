"""``tierflow run`` plus the Java-side Flink runner options (checkpointing).

    python deploy/flink/flink_run.py PIPELINE [--no-wait] [pipeline and Beam flags]

Same arguments as ``tierflow run``. Why it exists: ``--checkpointing_interval``
and the other checkpoint and bundle settings are options of Beam's *Java* Flink runner
(``FlinkPipelineOptions``); Python's ``FlinkRunnerOptions`` does not declare
them. Beam learns them at submission time from the job server, but tierflow's
launcher rejects every flag no ``PipelineOptions`` class declares (so a typo
never silently changes a run), and it checks before any job server exists:
``tierflow run ... --checkpointing_interval 60000`` fails with
``unknown flag(s): --checkpointing_interval``. Declaring them here, as a
``PipelineOptions`` subclass, makes the launcher accept them, and Beam then
sends them to the runner as ``beam:option:checkpointing_interval:v1``, the
name the Java runner reads (the portable runner skips runner options that are
already declared, so there is no conflict). On a streaming job, checkpoints with
``--finish_bundle_before_checkpointing`` are what flush the read's batches to the
writes (and so to the offset commits that follow them).

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
    parser.add_argument(
        "--finish_bundle_before_checkpointing", action="store_true", default=None,
        help="Finish the open bundles before each checkpoint. submit.sh always passes it for "
             "streaming: without it (Beam 2.62's runner, Flink 1.19) the streaming read's "
             "output was never flushed to the writes (tests/test_engines.py).")
    parser.add_argument(
        "--max_bundle_time_mills", type=int, default=None,
        help="Longest a bundle stays open (ms); Beam's default 1000 in streaming.")
    parser.add_argument(
        "--max_bundle_size", type=int, default=None,
        help="Most elements in a bundle; Beam's default 1000 in streaming.")


def main(argv=None) -> int:
  from tierflow.cli import main as tierflow_main
  return tierflow_main(["run", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
  sys.exit(main())
