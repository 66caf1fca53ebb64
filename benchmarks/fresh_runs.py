"""Runs measured the same way in every benchmark: each in a fresh process, sides
interleaved, medians reported with the load average they ran under.

The machines are shared (2 cores, other people's tests): wall time moves with the
load, so each run also reports its process's CPU time (user + system, all threads,
from ``wait4``), the steadier figure.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import threading
import time
from typing import Callable, Mapping, Sequence


def load_average() -> list[float]:
  """The 1, 5 and 15 minute load averages, rounded."""
  return [round(x, 2) for x in os.getloadavg()]


def run_fresh(cmd: Sequence[str], cwd: str | None = None) -> dict:
  """Runs ``cmd`` and returns the JSON object of the last line it printed that starts
  with ``{``, with ``wall_seconds``, ``cpu_seconds`` (the process's own), ``load`` and
  ``exit_seconds`` (from that line to the process's end: the interpreter's exit)."""
  start = time.perf_counter()
  proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=cwd)
  err: list[str] = []
  reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
  reader.start()
  found, found_at = None, None
  for line in proc.stdout:
    if line.startswith("{"):
      found, found_at = line, time.perf_counter()
  _, status, usage = os.wait4(proc.pid, 0)
  end = time.perf_counter()
  proc.returncode = os.waitstatus_to_exitcode(status)
  reader.join()
  if proc.returncode != 0 or found is None:
    raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}):\n{''.join(err)[-4000:]}")
  detail = json.loads(found)
  detail.update(wall_seconds=end - start, cpu_seconds=usage.ru_utime + usage.ru_stime,
                exit_seconds=end - found_at, load=load_average())
  return detail


def interleaved(sides: Mapping[str, Callable[[], dict]], repeats: int,
                say: Callable[[str], None] = print) -> dict[str, list[dict]]:
  """Each side once per round, in turn, ``repeats`` rounds: every side sees the same
  spread of load."""
  runs: dict[str, list[dict]] = {name: [] for name in sides}
  for r in range(repeats):
    for name, run in sides.items():
      runs[name].append(run())
    say(f"round {r + 1}/{repeats}: " + ", ".join(
        f"{n} {v[-1]['wall_seconds']:.2f}s wall {v[-1]['cpu_seconds']:.2f}s CPU"
        for n, v in runs.items()) + f"; load {load_average()}")
  return runs


def median(runs: Sequence[dict], key: str) -> float:
  return statistics.median(r[key] for r in runs)


def loads_seen(*groups: Sequence[dict]) -> dict:
  """The 1-minute load averages the runs ended under: lowest, median, highest."""
  ones = sorted(r["load"][0] for runs in groups for r in runs)
  return {"min": ones[0], "median": statistics.median(ones), "max": ones[-1]}
