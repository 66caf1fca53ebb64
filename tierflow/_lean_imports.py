"""How the ``tierflow`` command imports Beam: without collections, and without pandas.

Two costs of a command's start that a run does not need (measured here: 0.05 s and
0.12 s of the ~0.6 s that importing Beam, pyarrow and confluent-kafka takes):

* **Garbage collection while importing.** The imports build about a million objects
  that live as long as the process, and each collection during the import walks them.
  ``lean_imports`` turns the collector off for the import, and moves what it built to
  the permanent generation (``gc.freeze``) before turning it back on: else the first
  collection after would walk it all once more (58 ms here).
* **pandas.** Beam imports pandas when it is installed only to register its DataFrame
  batch converters (``apache_beam.typehints.pandas_type_compatibility``) and the
  pandas-backed ``ReadFromCsv``/``WriteToCsv``/``ReadFromJson``/``WriteToJson``.
  tierflow's pipelines use none of them. While ``lean_imports`` is active,
  ``import pandas`` fails as if pandas were not installed, which Beam's own guards
  handle. The first ``import pandas`` after it, by anything, imports pandas and then
  Beam's converters, as Beam would have. The four CSV/JSON transforms stay Beam's
  stand-ins for a process without pandas (they raise ``ImportError``): ``tierflow``
  commands never use them.

Only the command does this, and only when neither Beam nor pandas is imported yet: a
program that imports ``tierflow`` as a library imports Beam as Beam does.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import sys

_DEFERRED = "pandas"


class _NoPandas(importlib.abc.MetaPathFinder):
  """``import pandas`` fails while Beam is being imported."""

  def find_spec(self, name, path=None, target=None):
    if name == _DEFERRED:
      raise ModuleNotFoundError(f"No module named {name!r} (deferred while tierflow "
                                "imports Beam)", name=name)
    return None


class _BeamPandasSupportAfterPandas(importlib.abc.MetaPathFinder):
  """On the first ``import pandas`` after Beam's import: pandas, then Beam's support of it
  (``apache_beam.typehints.pandas_type_compatibility``, whose import registers it)."""

  def find_spec(self, name, path=None, target=None):
    if name != _DEFERRED:
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
      return spec
    loader = spec.loader
    exec_module = loader.exec_module

    def exec_then_beam_support(module):
      exec_module(module)
      if "apache_beam.typehints" in sys.modules:
        importlib.import_module("apache_beam.typehints.pandas_type_compatibility")

    loader.exec_module = exec_then_beam_support
    return spec


@contextlib.contextmanager
def lean_imports():
  """Imports inside run with the collector off and, if Beam is not imported yet, pandas
  deferred (see the module's docstring)."""
  from tierflow._imported_heap import no_collections
  defer = "apache_beam" not in sys.modules and _DEFERRED not in sys.modules
  blocker = _NoPandas()
  if defer:
    sys.meta_path.insert(0, blocker)
  try:
    with no_collections(freeze=True):  # the first collection after would walk it all
      yield
  finally:
    if defer:
      sys.meta_path.remove(blocker)
      if _DEFERRED not in sys.modules:
        sys.meta_path.insert(0, _BeamPandasSupportAfterPandas())
