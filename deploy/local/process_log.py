"""The log file of a local child process (broker, model server): kept only when it helps."""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile

_LOGGER = logging.getLogger(__name__)


class ProcessLog:
  """A temp file a child process writes its output to. ``close`` deletes it when the process
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

  def stop(self, proc: subprocess.Popen | None, what: str) -> None:
    """Stops ``proc`` (SIGTERM, then SIGKILL after 10 s), then closes the log."""
    if proc is not None:
      if proc.poll() is not None:
        self._failed = True
      proc.terminate()
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    self._file.close()
    if self._failed:
      _LOGGER.warning("%s failed; its log is kept at %s", what, self.path)
    elif os.path.exists(self.path):
      os.unlink(self.path)
