"""deploy/local/heartbeat.py: the one-time build never goes quiet (make install-demo)."""

import subprocess
import sys


def heartbeat(*argv):
  return subprocess.run([sys.executable, "-m", "tierflow_local.heartbeat", *argv],
                        capture_output=True, text=True, timeout=60)


def test_a_quiet_command_gets_a_line_every_interval_and_its_exit_code_passes_through():
  done = heartbeat("--every", "0.5", "--label", "build", "--show", "^STEP", "--", sys.executable,
                   "-c", "import time; print('noise'); print('STEP 1', flush=True); "
                         "time.sleep(2.2); print('STEP 2')")
  lines = done.stdout.splitlines()
  assert done.returncode == 0
  assert "STEP 1" in lines and "STEP 2" in lines and "noise" not in lines
  beats = [l for l in lines if l.startswith("... build: still running after")]
  assert len(beats) >= 3 and all("last: STEP 1" in b for b in beats)
  assert lines[-1].startswith("build: done in")


def test_a_failure_shows_the_command_s_last_lines():
  done = heartbeat("--show", "^NEVER", "--", sys.executable, "-c",
                   "import sys; print('cc: error: no such file'); sys.exit(3)")
  assert done.returncode == 3
  assert "failed with exit code 3" in done.stdout and "cc: error: no such file" in done.stdout
