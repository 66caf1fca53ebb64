"""The output's own record of how far the data got: offset ranges written, per partition.

As in Kafka Connect's HDFS sink, the output, not the engine's checkpoint, says
what is durable. Next to the Parquet files, under ``<output>/_progress``, one
small marker per written batch names its offset range::

    <output>/_progress/<topic>/<partition>/<start:020d>-<end:020d>.writing   (a write began)
    <output>/_progress/<topic>/<partition>/<start:020d>-<end:020d>.done      (all its files are in place)

A batch's write (``WriteBatches``) creates its ``.writing`` marker, holding the
paths of the files it is about to rename into place, then renames them, then
turns the marker into ``.done``. So after any crash:

* offsets inside a ``.done`` range are durable: the reader skips them, the
  writer never writes them again (whatever cut a replay makes), and the commit
  step moves the group to the end of the contiguous ``.done`` prefix;
* a ``.writing`` range may be partly in place: the reader reads exactly that
  range again, so its files are replaced under the same names; a writer whose
  batch covers it differently first deletes the files the marker lists.

Markers only ever add coverage: ``compact`` merges contiguous ``.done`` ranges into
one (the merged marker is written before its parts are deleted), so a partition
holds a handful of markers however many batches it has had. Nothing here grows in
memory with the number of batches.

The protocol assumes one live writer per partition, which is what a runner gives
a splittable read after a failover (the failed attempt's tasks are gone before
the restored ones run).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Iterable, NamedTuple, Optional, Sequence

from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems

from tierflow.files import rename_over

__all__ = ["PROGRESS_DIR", "Entry", "WrittenRanges", "contiguous_end", "merge", "subtract"]

_LOGGER = logging.getLogger(__name__)
PROGRESS_DIR = "_progress"
_NAME = re.compile(r"(\d{20})-(\d{20})\.(writing|done)$")
# Merge a partition's contiguous .done markers once it holds more than this many.
COMPACT_ABOVE = 16


class Entry(NamedTuple):
  """One marker: offsets ``[start, end)`` of a partition, ``writing`` or ``done``."""
  start: int
  end: int
  state: str
  path: str


def merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
  """Sorted, disjoint ranges covering the same offsets (overlapping or touching ones joined)."""
  out: list[list[int]] = []
  for start, end in sorted(r for r in ranges if r[1] > r[0]):
    if out and start <= out[-1][1]:
      out[-1][1] = max(out[-1][1], end)
    else:
      out.append([start, end])
  return [(s, e) for s, e in out]


def contiguous_end(ranges: Iterable[tuple[int, int]], start: int) -> int:
  """How far offsets from ``start`` on are covered without a gap (``start`` if not at all)."""
  end = start
  for s, e in merge(ranges):
    if s <= end < e:
      end = e
    elif s > end:
      break
  return end


def subtract(start: int, end: int, ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
  """The parts of ``[start, end)`` that ``ranges`` do not cover, in order."""
  pieces, at = [], start
  for s, e in merge(ranges):
    if e <= at or s >= end:
      continue
    if s > at:
      pieces.append((at, s))
    at = max(at, e)
  if at < end:
    pieces.append((at, end))
  return pieces


class WrittenRanges:
  """The ``_progress`` index of an output directory (any Beam filesystem)."""

  def __init__(self, output: str):
    if not output:
      raise ValueError("WrittenRanges needs an output directory")
    self.output = output.rstrip("/")

  def directory(self, topic: str, partition: int) -> str:
    return FileSystems.join(self.output, PROGRESS_DIR, topic, str(partition))

  def _marker(self, topic: str, partition: int, start: int, end: int, state: str) -> str:
    return FileSystems.join(self.directory(topic, partition), f"{start:020d}-{end:020d}.{state}")

  def entries(self, topic: str, partition: int) -> list[Entry]:
    """The partition's markers, sorted by range."""
    pattern = FileSystems.join(self.directory(topic, partition), "*")
    try:
      found = [m.path for r in FileSystems.match([pattern]) for m in r.metadata_list]
    except BeamIOError:
      return []
    out = []
    for path in found:
      m = _NAME.search(path)
      if m:
        out.append(Entry(int(m.group(1)), int(m.group(2)), m.group(3), path))
    return sorted(out)

  @staticmethod
  def done(entries: Sequence[Entry]) -> list[tuple[int, int]]:
    """The offsets the ``.done`` markers cover, merged."""
    return merge((e.start, e.end) for e in entries if e.state == "done")

  def begin(self, topic: str, partition: int, start: int, end: int,
            files: Sequence[str]) -> str:
    """Records that the files for ``[start, end)`` are about to be renamed into place."""
    path = self._marker(topic, partition, start, end, "writing")
    with FileSystems.create(path) as f:
      f.write(json.dumps({"files": list(files)}).encode())
    return path

  def finish(self, topic: str, partition: int, start: int, end: int) -> None:
    """Marks ``[start, end)`` durable (after every file of it is in place)."""
    writing = self._marker(topic, partition, start, end, "writing")
    rename_over(writing, self._marker(topic, partition, start, end, "done"))

  def roll_back(self, entry: Entry) -> list[str]:
    """Deletes the files a stale ``.writing`` marker lists (those in place), then the
    marker; returns the files deleted. Only for a marker no live writer holds."""
    try:
      with FileSystems.open(entry.path) as f:
        files = json.loads(f.read().decode()).get("files", [])
    except Exception:  # noqa: BLE001 - an unreadable marker: its write never began
      files = []
    there = [p for p in files if FileSystems.exists(p)]
    if there:
      FileSystems.delete(there)
    self.forget(entry)
    return there

  def forget(self, entry: Entry) -> None:
    """Deletes a marker (never the files it names)."""
    try:
      FileSystems.delete([entry.path])
    except BeamIOError:
      if FileSystems.exists(entry.path):
        raise

  def compact(self, topic: str, partition: int,
              entries: Optional[Sequence[Entry]] = None) -> None:
    """Merges contiguous ``.done`` markers into one when there are many. The merged
    marker is created before its parts go, so coverage never shrinks."""
    entries = self.entries(topic, partition) if entries is None else entries
    done = [e for e in entries if e.state == "done"]
    if len(done) <= COMPACT_ABOVE:
      return
    for start, end in merge((e.start, e.end) for e in done):
      parts = [e for e in done if start <= e.start and e.end <= end]
      if len(parts) < 2:
        continue
      merged = self._marker(topic, partition, start, end, "done")
      if not any(e.path == merged for e in parts):
        with FileSystems.create(merged) as f:
          f.write(b"{}")
      for e in parts:
        if e.path != merged:
          self.forget(e)
