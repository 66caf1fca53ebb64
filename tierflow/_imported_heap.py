"""Keeping the garbage collector off what the imports built.

A run imports Beam, pyarrow, the SDKs and their types: well over a million objects
that live as long as the process. Every full collection walks all of them: a few
during the run, and several in a row while the interpreter shuts down, where they
took 0.5-1.7 s of CPU after a 10-record run had finished (``perf``: gc_collect_main
and its visits, no system call). ``freeze_imported_heap`` moves what exists once the
pipeline is built into the collector's permanent generation (``gc.freeze``), once per
process: the collector no longer walks it, objects made later are collected as
before.
"""

from __future__ import annotations

import contextlib
import gc
import threading

_lock = threading.Lock()
_frozen = False


def freeze_imported_heap() -> bool:
  """Freezes the heap as it is now, the first time it is called; True if it did."""
  global _frozen
  with _lock:
    if _frozen:
      return False
    gc.freeze()
    _frozen = True
    return True


@contextlib.contextmanager
def no_collections(freeze: bool = False):
  """No garbage collection inside (imports build objects by the hundred thousand, and
  each collection walks all of them); ``freeze``: what exists at the end goes to the
  permanent generation before collections resume, so the first one after does not walk
  it either. Collections resume as they were."""
  collecting = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if freeze:
      gc.freeze()
    if collecting:
      gc.enable()
