"""Drops two warnings Beam 2.77 logs on the root logger that say nothing about a run.

* "Resource module is not available ...": RunInference logs it on every batch when its
  optional ``ModelManager`` import fails, because both imports share one ``try`` and
  ``resource`` is then set to None although the module exists.
* "apitools not found, and bigquery client libraries are not available ...": logged on
  import when the GCP extra is absent; tierflow does not use BigQuery clients (a Dataflow
  launch installs the extra and never sees it).
"""

from __future__ import annotations

import logging

_SPURIOUS = ("Resource module is not available", "apitools not found, and bigquery client")


class _DropSpurious(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_SPURIOUS)


def install() -> None:
  root = logging.getLogger()
  if not any(isinstance(f, _DropSpurious) for f in root.filters):
    root.addFilter(_DropSpurious())
