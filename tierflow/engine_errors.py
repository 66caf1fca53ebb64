"""A failed run on an engine in one line: what went wrong, in words, and where the rest is.

A job that fails on Flink (or any portable runner) comes back as the text of a
Java exception: hundreds of lines whose last is a stack frame. ``describe`` finds
the cause in it (a lost TaskManager, no free task slot, restarts used up, the
Python worker pool gone, a Python error in a worker), adds what Flink's REST API
says about the job's failures when the JobManager is reachable, writes the whole
text to a file, and returns one line that names that file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import urllib.request
from typing import Optional

__all__ = ["EngineFailure", "describe", "flink_rest_address"]

# (pattern, words): the first that matches a failure's text says what it was.
_CAUSES = [
    (re.compile(r"TaskManager with id (\S+) is no longer reachable|Heartbeat of TaskManager "
                r"with id (\S+) timed out|TaskManager (\S+) (?:was lost|disconnected)"),
     "a TaskManager was lost ({})"),
    (re.compile(r"NoResourceAvailableException"),
     "no free task slot for the job (TaskManagers lost, or fewer slots than --parallelism)"),
    (re.compile(r"(?:UNAVAILABLE|Connection refused).{0,200}(?:worker|pool|environment)",
                re.I | re.S),
     "the Python SDK worker pool did not answer (--environment_config)"),
    (re.compile(r"java\.lang\.OutOfMemoryError: ([^\n]+)"), "a JVM ran out of memory ({})"),
]
_RESTARTS = re.compile(r"maxNumberRestartAttempts=(\d+)")
_PYTHON_ERROR = re.compile(r"^(?!java\.|org\.|io\.|scala\.|com\.)([A-Za-z_][\w.]*"
                           r"(?:Error|Exception|Exit)): (.+)$", re.M)


class EngineFailure(RuntimeError):
  """A run that failed on its engine: ``str()`` is one line; ``log_path`` holds the rest."""

  def __init__(self, line: str, log_path: Optional[str]):
    super().__init__(line + (f" (full error: {log_path})" if log_path else ""))
    self.line = line
    self.log_path = log_path


def flink_rest_address(options) -> Optional[str]:
  """The JobManager's REST address of a Flink run on a session cluster, else None."""
  opts = options.get_all_options(retain_unknown_options=True)
  runner = opts.get("runner") or ""
  runner = runner if isinstance(runner, str) else type(runner).__name__
  master = opts.get("flink_master") or ""
  if "Flink" not in runner or not master or master.startswith("["):
    return None
  return master if "://" in master else f"http://{master}"


def _rest(address: str, path: str) -> Optional[dict]:
  try:
    with urllib.request.urlopen(f"{address}{path}", timeout=5) as response:
      return json.loads(response.read() or b"{}")
  except (OSError, ValueError):
    return None


def _flink_history(address: str, job_name: str) -> tuple[list[str], Optional[int]]:
  """(the failures Flink recorded for the job, oldest first, as exception texts; how many
  restarts its strategy allowed, when it gave up)."""
  jobs = (_rest(address, "/jobs/overview") or {}).get("jobs", [])
  mine = sorted((j for j in jobs if j.get("name") == job_name),
                key=lambda j: j.get("start-time", 0))
  if not mine:
    return [], None
  found = _rest(address, f"/jobs/{mine[-1]['jid']}/exceptions") or {}
  entries = (found.get("exceptionHistory") or {}).get("entries") or []
  texts = [" ".join(filter(None, [e.get("stacktrace") or e.get("exceptionName") or "",
                                  f"[task {e['taskName']}]" if e.get("taskName") else ""]))
           for e in reversed(entries)]
  root = found.get("root-exception") or ""
  m = _RESTARTS.search(root) or next(filter(None, map(_RESTARTS.search, texts)), None)
  return texts, int(m.group(1)) if m else None


def _cause(text: str) -> Optional[str]:
  for pattern, words in _CAUSES:
    m = pattern.search(text)
    if m:
      detail = next((g for g in m.groups() if g), "") if m.groups() else ""
      return words.format(detail) if "{}" in words else words
  return None


def _headline(text: str) -> str:
  """The most telling line of an error text: a Python error raised in a worker, else the
  innermost cause that is not a stack frame, else the first line."""
  python = _PYTHON_ERROR.findall(text)
  if python:
    name, message = python[-1]
    return f"{name}: {message.strip()}"
  lines = [l.strip() for l in text.splitlines()
           if l.strip() and not l.strip().startswith(("at ", "...", "Traceback"))]
  causes = [l[len("Caused by: "):] for l in lines if l.startswith("Caused by: ")]
  return (causes[-1] if causes else lines[0] if lines else text.strip())[:300]


def describe(error: BaseException, address: Optional[str] = None,
             job_name: Optional[str] = None) -> EngineFailure:
  """One line for a run that failed on its engine, with the whole error written to a file.

  ``address``: a Flink JobManager's REST address (``flink_rest_address``, read before the
  run: the runner rewrites its options), whose record of the job's failures is added."""
  text = str(error)
  history, restarts = [], None
  if address and job_name:
    history, restarts = _flink_history(address, job_name)
  causes = []
  for t in (*history, text):
    cause = _cause(t)
    if cause and cause not in causes:
      causes.append(cause)
  parts = []
  if causes:
    parts.append("; ".join(causes))
  if restarts is not None:
    parts.append(f"the Flink job failed after {restarts} restarts")
  if not causes:
    parts.append(_headline(text))
  log_path = None
  try:
    fd, log_path = tempfile.mkstemp(prefix=f"{job_name or 'tierflow-run'}-failure-",
                                    suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {job_name or ''}\n")
      f.write(text)
      for n, entry in enumerate(history, 1):
        f.write(f"\n\n--- Flink failure {n} of {len(history)} ---\n{entry}")
  except OSError:
    log_path = None
  return EngineFailure("; ".join(parts), log_path)
