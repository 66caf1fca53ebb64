"""Small files on any filesystem: reading configs, calibrations and price books from
paths or URLs, and renaming a finished file into place.

Local paths are opened directly; ``gs://``, ``s3://`` and other URLs go through
Beam's ``FileSystems``, so a Dataflow or Flink job can point ``--config`` and
``--calibration`` at object storage.
"""

from __future__ import annotations

import os

__all__ = ["read_text", "rename_over"]


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


def rename_over(source: str, destination: str) -> None:
  """Renames source to destination (Beam ``FileSystems``), replacing destination if it
  exists."""
  from apache_beam.io.filesystem import BeamIOError
  from apache_beam.io.filesystems import FileSystems
  try:
    FileSystems.rename([source], [destination])
  except BeamIOError:
    # Filesystems whose rename refuses to overwrite (e.g. HDFS).
    if not FileSystems.exists(destination):
      raise
    FileSystems.delete([destination])
    FileSystems.rename([source], [destination])
