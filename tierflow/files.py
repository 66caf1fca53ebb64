"""Reading small text files (configs, calibrations, price books) from paths or URLs.

Local paths are opened directly; ``gs://``, ``s3://`` and other URLs go through
Beam's ``FileSystems``, so a Dataflow or Flink job can point ``--config`` and
``--calibration`` at object storage.
"""

from __future__ import annotations

import os

__all__ = ["read_text"]


def read_text(path: str | os.PathLike) -> str:
  path = os.fspath(path)
  if path.startswith("file://"):
    path = path[len("file://"):]
  if "://" not in path:
    try:
      with open(path, encoding="utf-8") as f:
        return f.read()
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
  from apache_beam.io.filesystems import FileSystems
  try:
    with FileSystems.open(path) as f:
      return f.read().decode("utf-8")
  except Exception as e:  # noqa: BLE001 - each filesystem raises its own errors
    raise ValueError(f"cannot read {path}: {e}") from None
