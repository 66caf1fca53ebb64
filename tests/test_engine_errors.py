"""A run that fails on an engine says why in one line and where the whole error is
(tierflow/engine_errors.py); the real thing is tested on a Flink session cluster in
tests/test_cluster_faults.py."""

import os

from tierflow.engine_errors import describe

FRAMES = "\n".join(f"\tat org.apache.flink.runtime.Foo.bar{i}(Foo.java:{i})" for i in range(40))


def _check(failure, *words):
  line = str(failure)
  assert "\n" not in line and "\tat " not in line
  for word in words:
    assert word in line, line
  assert failure.log_path and os.path.exists(failure.log_path)
  assert line.endswith(f"(full error: {failure.log_path})")
  with open(failure.log_path) as f:
    assert "Foo.bar39" in f.read()  # the whole error is kept
  os.unlink(failure.log_path)


def test_a_lost_taskmanager_and_no_slot_left_are_said_in_words():
  text = ("Pipeline job-1 failed in state FAILED: java.util.concurrent.CompletionException: "
          "org.apache.flink.runtime.jobmanager.scheduler.NoResourceAvailableException: Slot "
          f"request bulk is not fulfillable!\n{FRAMES}\nCaused by: java.util.concurrent."
          "TimeoutException: Timeout has occurred: 15000 ms\n\t... 30 more")
  _check(describe(RuntimeError(text), job_name="tierflow-tickets-1"), "no free task slot")


def test_a_python_error_in_a_worker_is_its_own_line_not_a_stack_frame():
  text = ("java.lang.RuntimeException: Error received from SDK harness for instruction 7: "
          "Traceback (most recent call last):\n  File \"apache_beam/runners/worker/"
          "bundle_processor.py\", line 1, in process\nValueError: 'utf-8' codec can't decode "
          f"byte 0xff [while running 'Route/Route']\n{FRAMES}\n\t... 12 more")
  _check(describe(RuntimeError(text)), "ValueError: 'utf-8' codec can't decode byte 0xff",
         "[while running 'Route/Route']")


def test_otherwise_the_innermost_cause_that_is_not_a_frame():
  text = (f"java.lang.IllegalStateException: outer\n{FRAMES}\nCaused by: "
          "java.io.IOException: disk quota exceeded on /data\n\t... 3 more")
  _check(describe(RuntimeError(text)), "java.io.IOException: disk quota exceeded on /data")
