"""The ``tierflow`` command imports Beam without pandas, and a later ``import pandas``
gives Beam's pandas support back; a program importing tierflow as a library is not
touched (``tierflow/_lean_imports.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def _run(script: str) -> dict:
  done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


CONVERTS = """
    def converts():
      import pandas as pd
      from apache_beam.typehints.batch import BatchConverter
      try:
        BatchConverter.from_typehints(element_type=int, batch_type=pd.Series)
        return True
      except TypeError:
        return False
    """


def test_the_command_imports_beam_without_pandas_and_a_later_import_restores_beam_support():
  out = _run(CONVERTS + """
    import gc, json, sys
    import tierflow.cli
    before = "pandas" in sys.modules
    support_before = "apache_beam.typehints.pandas_type_compatibility" in sys.modules
    ok = converts()
    print(json.dumps({"pandas_before": before, "support_before": support_before,
                      "converts_after_import": ok, "gc_on": gc.isenabled()}))
    """)
  assert out == {"pandas_before": False, "support_before": False,
                 "converts_after_import": True, "gc_on": True}


def test_a_library_program_imports_beam_as_beam_does():
  out = _run(CONVERTS + """
    import json, sys
    import tierflow.transforms
    import apache_beam
    print(json.dumps({"pandas": "pandas" in sys.modules, "converts": converts()}))
    """)
  assert out == {"pandas": True, "converts": True}


def test_with_pandas_imported_first_the_command_defers_nothing():
  out = _run(CONVERTS + """
    import json, sys
    import pandas
    import tierflow.cli
    print(json.dumps({"support": "apache_beam.typehints.pandas_type_compatibility"
                                 in sys.modules, "converts": converts()}))
    """)
  assert out == {"support": True, "converts": True}
