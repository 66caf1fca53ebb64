"""The README's step-by-step recipe runs as printed: broker, local endpoints, a run, its
report and a DuckDB query, in bash. Only what a machine decides is changed: the venv's
path (``.venv/bin/`` is where `make` puts it) and the two ports, for free ones."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from tierflow_local.broker import free_port

pytestmark = pytest.mark.slow
README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def recipe() -> str:
  text = README.read_text(encoding="utf-8")
  section = text.split("## Try it on your machine, step by step", 1)[1].split("\n## ", 1)[0]
  [script] = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
  return script


def test_the_readme_recipe_runs_as_printed(tmp_path):
  script = recipe()
  assert ".venv/bin/tierflow broker" in script and "tierflow report" in script
  bin_dir = os.path.dirname(sys.executable)
  script = (script.replace(".venv/bin/", f"{bin_dir}/")
            .replace("9092", str(free_port())).replace("8000", str(free_port())))
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("TIERFLOW_", "OPENAI_", "ANTHROPIC_"))}
  # set -e: a failing step fails the test; the trap stops what the recipe started if it
  # does not get to its own `kill` (they would hold the output pipe open).
  guard = "set -e\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
  done = subprocess.run(["bash", "-c", guard + script], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  out = done.stdout
  assert "results       out/tickets/results  (240 rows)" in out, out[-3000:]
  assert "report: out/tickets/report/report.html" in out
  assert (tmp_path / "out/tickets/report/report.html").exists()
  # the query's table: statuses and labels with their counts and cost
  assert re.search(r"│\s*status\s*│\s*label\s*│\s*n\s*│\s*usd\s*│", out), out[-2000:]
  assert re.search(r"│\s*ok\s*│\s*\w+\s*│\s*\d+\s*│", out)
