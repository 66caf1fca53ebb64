"""Local child processes (broker, model server, engines): stopping them, and their logs."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import tempfile
from typing import Optional

_LOGGER = logging.getLogger(__name__)


def stop(proc: Optional[subprocess.Popen], sig: int = signal.SIGTERM,
         timeout: float = 30) -> None:
  """Sends ``sig`` to ``proc`` unless it has exited, and waits; SIGKILL after ``timeout`` s."""
  if proc is None or proc.poll() is not None:
    return
  proc.send_signal(sig)
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()


class ProcessLog:
  """A temp file a child process writes its output to. ``stop`` deletes it when the process
  stopped cleanly; when it failed (exited on its own, or ``failed()`` was called because it
  never became ready) the file is kept and a warning names it, as the error did."""

  def __init__(self, prefix: str):
    self._file = tempfile.NamedTemporaryFile(prefix=prefix, suffix=".log", delete=False)
    self.path = self._file.name
    self._failed = False

  def fileno(self) -> int:
    return self._file.fileno()

  def failed(self) -> None:
    self._failed = True

  def stop(self, proc: Optional[subprocess.Popen], what: str) -> None:
    """Stops ``proc`` (SIGTERM, then SIGKILL after 10 s), then closes the log."""
    if proc is not None and proc.poll() is not None:
      self._failed = True
    stop(proc, timeout=10)
    self._file.close()
    if self._failed:
      _LOGGER.warning("%s failed; its log is kept at %s", what, self.path)
    elif os.path.exists(self.path):
      os.unlink(self.path)
