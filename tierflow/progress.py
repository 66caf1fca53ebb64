"""A run's progress while it runs: records read and written, dead letters, escalations, spend.

The pipeline's steps add to per-process counts here (cheap, thread-safe). A
reporter thread shows them: ``tierflow run`` starts one that redraws a line on a
terminal (or logs a line every 30 s otherwise), and a worker process that has
none (Dataflow, Flink, a multi-process local run) starts one that logs every
60 s, so a long run is never silent.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Optional, TextIO

__all__ = ["add", "snapshot", "expect_stages", "stage_done", "start", "stop", "ensure_worker_reporter", "line"]

_LOGGER = logging.getLogger("tierflow.progress")
_LOCK = threading.Lock()
_COUNTS = {"read": 0, "written": 0, "dead_letters": 0, "routed": 0, "escalated": 0,
           "cost_usd": 0.0, "frontier_usd": 0.0}
_STAGES: dict = {}  # stage -> small-tier answers done (records), as requests come back
_FIRST_ANSWER: list = []  # when the first stage answer came back (monotonic)
_REPORTER: Optional["_Reporter"] = None


def add(**counts) -> None:
  with _LOCK:
    for key, value in counts.items():
      _COUNTS[key] += value


def expect_stages(stages) -> None:
  """The stages whose answers are coming: counted (from 0) in the lines and the estimate."""
  with _LOCK:
    for stage in stages:
      _STAGES.setdefault(stage, 0)


def stage_done(stage: str, records: int) -> None:
  """A stage's small-tier answers for ``records`` records came back."""
  with _LOCK:
    if not _FIRST_ANSWER:
      _FIRST_ANSWER.append(time.monotonic())
    _STAGES[stage] = _STAGES.get(stage, 0) + records


def snapshot() -> dict:
  with _LOCK:
    return {**_COUNTS, "stages": dict(_STAGES),
            "answering_s": time.monotonic() - _FIRST_ANSWER[0] if _FIRST_ANSWER else 0.0}


def reset() -> None:
  with _LOCK:
    for key in _COUNTS:
      _COUNTS[key] = 0
    _STAGES.clear()
    _FIRST_ANSWER.clear()


def _minutes(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  return f"{m} min {s:02d} s" if m else f"{s} s"


def line(counts: dict, elapsed: float) -> str:
  parts = [f"read {counts['read']:,}", f"written {counts['written']:,}",
           f"dead letters {counts['dead_letters']:,}"]
  stages = counts.get("stages") or {}
  if stages and counts["read"]:
    # Per stage, the small tier's answers so far, of the records read: a model pipeline
    # between two batches' writes is not idle.
    parts.append(" ".join(f"{name} {n:,}/{counts['read']:,}" for name, n in stages.items()))
    done, total = sum(stages.values()), counts["read"] * len(stages)
    if 0 < done < total and counts.get("answering_s", 0) >= 2:
      left = counts["answering_s"] * (total - done) / done
      parts.append(f"small tier ~{_minutes(left)} left")
  if counts["routed"]:
    share = counts["escalated"] / counts["routed"]
    parts += [f"escalated {counts['escalated']:,} ({share:.0%})",
              f"spent ${counts['cost_usd']:.4f} (frontier ${counts['frontier_usd']:.4f})"]
  rate = counts["read"] / elapsed if elapsed > 0 else 0.0
  parts.append(f"{rate:,.0f} records/s, {_minutes(elapsed)}")
  return " · ".join(parts)


class _Reporter(threading.Thread):
  def __init__(self, stream: Optional[TextIO], interval: float, redraw: bool):
    super().__init__(name="tierflow-progress", daemon=True)
    self._stream, self._interval, self._redraw = stream, interval, redraw
    self._stop = threading.Event()
    self._start = time.monotonic()
    self._last = None

  def run(self):
    while not self._stop.wait(self._interval):
      self.emit()

  def emit(self, final: bool = False) -> None:
    counts = snapshot()
    if self._redraw and counts == self._last and not final:
      return  # a redrawn line that would not change; a logged line is never skipped
    self._last = counts
    text = line(counts, time.monotonic() - self._start)
    if self._stream is None:
      _LOGGER.info("progress: %s", text)
    elif self._redraw:
      self._stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
      self._stream.flush()
    else:
      self._stream.write(f"progress: {text}\n")
      self._stream.flush()

  def stop(self) -> None:
    self._stop.set()
    if self._stream is not None and any(v for k, v in snapshot().items()
                                        if k in _COUNTS):
      self.emit(final=True)


def start(stream: TextIO = sys.stderr, interval: Optional[float] = None) -> None:
  """Starts this process's reporter for the CLI: a redrawn line on a terminal, else a line
  every 30 s."""
  global _REPORTER
  reset()
  with _LOCK:
    if _REPORTER is not None:
      return
    redraw = stream.isatty()
    _REPORTER = _Reporter(stream, interval or (1.0 if redraw else 30.0), redraw)
  _REPORTER.start()


def ensure_worker_reporter(interval: float = 60.0) -> None:
  """In a worker process with no reporter yet, logs progress every ``interval`` seconds."""
  global _REPORTER
  with _LOCK:
    if _REPORTER is not None:
      return
    _REPORTER = _Reporter(None, interval, False)
  _REPORTER.start()


def stop() -> None:
  global _REPORTER
  with _LOCK:
    reporter, _REPORTER = _REPORTER, None
  if reporter is not None:
    reporter.stop()
