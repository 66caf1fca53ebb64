"""The demo's stored calibrations: a second ``tierflow demo`` reuses the first one's.

A calibration is stored under a key that hashes everything its thresholds depend on: the
model file's bytes (sha256), the llama.cpp server's version and the chat template it is
served with, the calibration sample's records and their gold labels, the calibration run's
config (instructions, worked examples, the model settings; not the endpoints' ports), the
stages, alpha and delta. Anything changed gives another key, so a stale calibration is
never found; ``tierflow demo --recalibrate`` ignores a stored one and replaces it.
Stored in ``$XDG_CACHE_HOME/tierflow/demo-calibrations`` (default ``~/.cache``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

__all__ = ["calibration_key", "file_sha256", "load", "store", "store_dir"]


def store_dir() -> Path:
  cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
  return cache / "tierflow" / "demo-calibrations"


def file_sha256(path: os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def calibration_key(*, model_sha256: str, server: Mapping[str, Any], sample: Sequence[dict],
                    labels: Mapping[str, Any], config: Mapping[str, Any],
                    stages: Sequence[str], alpha: float, delta: float) -> str:
  """The sha256 of what a calibration's thresholds depend on (see the module docstring).
  ``config``: the calibration run's config with the models' ``base_url`` left out."""
  doc = {"model_sha256": model_sha256, "server": dict(server), "sample": list(sample),
         "labels": dict(labels), "config": dict(config), "stages": list(stages),
         "alpha": alpha, "delta": delta}
  blob = json.dumps(doc, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
  return hashlib.sha256(blob).hexdigest()


def load(key: str):
  """(calibration, notes, when it was stored) for ``key``, or None when none is stored or
  the stored one does not read."""
  from tierflow.calibration import Calibration
  base = store_dir() / key
  try:
    calibration = Calibration.load(base / "calibration.json")
    notes = json.loads((base / "notes.json").read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return None
  return calibration, list(notes), calibration.created_at


def store(key: str, calibration, notes: Sequence[str]) -> Optional[Path]:
  """Stores a calibration under ``key``; its directory, or None when it cannot be written
  (the demo goes on: the next one calibrates again)."""
  base = store_dir() / key
  try:
    base.mkdir(parents=True, exist_ok=True)
    (base / "notes.json").write_text(json.dumps(list(notes)), encoding="utf-8")
    calibration.save(base / "calibration.json")  # last: a stored calibration has its notes
  except OSError:
    return None
  return base
