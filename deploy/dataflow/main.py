"""Dataflow Flex Template entry point (FLEX_TEMPLATE_PYTHON_PY_FILE).

The template launcher runs ``python main.py --runner=DataflowRunner --project=...
--<parameter>=<value> ...``: Beam's own options plus one ``--name=value`` per
template parameter of ``metadata.json``. This file only adapts those
arguments to ``tierflow.launcher`` and submits the job:

* ``--pipeline`` picks the pipeline (default ``passthrough``) and is removed;
* boolean parameters arrive as ``--streaming=true``/``false``; Beam's flags are
  ``store_true``, so they become ``--streaming`` or nothing;
* ``--kafka_consumer_config=k=v;k=v`` becomes one ``--kafka-consumer-config``
  per pair (the flag is repeatable on the command line, a parameter is not);
* optional parameters left empty (``--start_offset=``) are dropped.

Everything else goes to ``tierflow.launcher.launch(pipeline, argv, wait=False)``
unchanged, so unknown flags fail the launch with the launcher's own error.
The launcher must not wait: Flex Templates require the program to exit after
``run()`` (https://cloud.google.com/dataflow/docs/guides/templates/configuring-flex-templates).
"""

from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence

DEFAULT_PIPELINE = "passthrough"
BOOLEAN_PARAMETERS = ("streaming", "bounded")
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no", "")


def _key(flag: str) -> str:
  return flag.lstrip("-").replace("-", "_")


def to_launcher_args(argv: Sequence[str]) -> tuple[str, list[str]]:
  """Splits template arguments into (pipeline name, launcher argv)."""
  pipeline = DEFAULT_PIPELINE
  out: list[str] = []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    i += 1
    if not arg.startswith("--"):
      out.append(arg)
      continue
    flag, sep, value = arg.partition("=")
    key = _key(flag)
    if key == "pipeline":
      if not sep:
        if i >= len(args):
          raise ValueError("--pipeline needs a value")
        value = args[i]
        i += 1
      pipeline = value.strip() or DEFAULT_PIPELINE
      continue
    if key in BOOLEAN_PARAMETERS and sep:
      if value.strip().lower() in _TRUE:
        out.append(f"--{key}")
      elif value.strip().lower() not in _FALSE:
        raise ValueError(f"--{key} takes true or false, got {value!r}")
      continue
    if key == "kafka_consumer_config" and sep:
      for pair in value.split(";"):
        if pair.strip():
          out.append(f"--kafka-consumer-config={pair.strip()}")
      continue
    if sep and value == "":
      continue  # an optional template parameter left empty
    out.append(arg)
  return pipeline, out


def main(argv: Optional[Sequence[str]] = None) -> int:
  logging.getLogger().setLevel(logging.INFO)
  from tierflow import launcher
  pipeline, args = to_launcher_args(sys.argv[1:] if argv is None else argv)
  logging.info("tierflow: submitting pipeline %r", pipeline)
  summary = launcher.launch(pipeline, args, wait=False)
  logging.info("tierflow: submitted %s (state %s), output %s",
               summary.pipeline, summary.state, summary.output)
  return 0


if __name__ == "__main__":
  sys.exit(main())
