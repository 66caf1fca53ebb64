"""docs/library.md's "Use tierflow's transforms in your own pipeline" example runs as written."""

import os
import pathlib
import re
import tempfile

import pyarrow.parquet as pq

README = pathlib.Path(__file__).resolve().parents[1] / "docs" / "library.md"


def test_the_readme_composition_example_runs_without_a_broker(monkeypatch, tmp_path):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its mkdtemp() lands in tmp_path
  text = README.read_text(encoding="utf-8")
  section = text.split("# Use tierflow's transforms in your own pipeline", 1)[1]
  [code] = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
  scope: dict = {}
  exec(compile(code, "docs/library.md", "exec"), scope)  # noqa: S102 - the documented example
  out = scope["out_dir"]
  assert out.startswith(str(tmp_path))
  files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.endswith(".parquet")]
  rows = [r for f in files for r in pq.read_table(f).to_pylist()]
  assert sorted(r["ticket_id"] for r in rows) == ["T1", "T2"]
  assert all(r["status"] == "ok" and r["cost_usd"] > 0 for r in rows)
  assert {r["label"] for r in rows} == {"billing", "shipping"}
  assert all(isinstance(r["extraction"], dict) for r in rows)
