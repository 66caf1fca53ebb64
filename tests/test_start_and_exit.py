"""A short run's exit: the CLI process ends at once after its summary, and no garbage
collection walks the heap the imports built (what made the exit take 0.5-1.7 s)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.slow


def test_a_ten_record_run_exits_at_once_after_its_summary(broker, topic, produce,
                                                          make_tickets, tmp_path):
  name = topic(partitions=2)
  produce(name, [{"value": json.dumps(t).encode()} for t in make_tickets(10)])
  cmd = [sys.executable, "-m", "tierflow.cli", "run", "passthrough", "--bootstrap-servers",
         broker.bootstrap_servers, "--topic", name, "--output", str(tmp_path / "out"),
         "--start-offset", "0"]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  printed, last = [], None
  for line in proc.stdout:
    printed.append(line)
    last = time.monotonic()
  proc.wait(timeout=60)
  exited_after = time.monotonic() - last
  assert proc.returncode == 0, proc.stderr.read()[-2000:]
  assert any("(10 rows)" in line for line in printed), printed
  # Measured here: 0.8-1.0 s before (collections walking the imports' heap), 0.04 s after.
  assert exited_after < 0.4, f"the process took {exited_after:.2f}s to exit"


def test_collections_after_a_run_leave_the_imported_heap_alone(broker, topic, produce,
                                                               make_tickets, tmp_path):
  """In a fresh process: after ``launch``, a full collection walks a small fraction of
  the objects it walked before (the imports' are in the permanent generation), and the
  run's own garbage is still collected."""
  name = topic(partitions=1)
  produce(name, [{"value": json.dumps(t).encode()} for t in make_tickets(10)])
  script = textwrap.dedent(f"""
      import gc, json, sys
      from tierflow import launcher
      summary = launcher.launch("passthrough", ["--bootstrap-servers",
          {broker.bootstrap_servers!r}, "--topic", {name!r}, "--output",
          {str(tmp_path / "out")!r}, "--start-offset", "0"])
      walked = sum(len(gc.get_objects(g)) for g in range(3))
      class Cycle:
        pass
      c = Cycle(); c.me = c; del c
      print(json.dumps({{"rows": summary.rows_written, "walked": walked,
                        "frozen": gc.get_freeze_count(), "collected": gc.collect()}}))
      """)
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  assert out["rows"] == 10
  assert out["walked"] * 5 < out["frozen"], out
  assert out["collected"] >= 1, out
