"""Keeping a long run's native memory flat.

librdkafka's fetch buffers are freed and reallocated from several threads; with
glibc's default of up to 8 malloc arenas per core, the freed memory stays spread
over arenas and a run's resident memory keeps growing with the records it has
read (measured: 1M records peaked at 1.7x a 100k run; with 2 arenas, 1.35x).
``limit_malloc_arenas`` asks glibc for at most 2 arenas for the threads created
afterwards, like ``MALLOC_ARENA_MAX=2`` (which the worker images set). It does
nothing where glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_ARENA_MAX = -8  # glibc's mallopt parameter
_done = False


def limit_malloc_arenas(arenas: int = 2) -> bool:
  """Caps glibc's malloc arenas for threads created from now on; True if it did."""
  global _done
  if _done or os.environ.get("MALLOC_ARENA_MAX"):
    return _done
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _done = bool(libc.mallopt(_M_ARENA_MAX, arenas))
  except (OSError, AttributeError):
    _done = False
  return _done
