"""docs/library.md's three examples run as written (each asserts its own outputs with
assert_that, Example 2 a beam.dataframe count too); what they write is checked here."""

import os
import pathlib
import re
import tempfile

import pyarrow.parquet as pq
import pytest

GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "library.md"


def example(n: int) -> str:
  section = GUIDE.read_text(encoding="utf-8").split(f"\n## Example {n}:", 1)[1]
  [code] = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
  return code


def run(n: int, monkeypatch, tmp_path) -> dict:
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its mkdtemp() lands in tmp_path
  scope: dict = {"__name__": f"library_guide_example_{n}"}
  exec(compile(example(n), f"docs/library.md example {n}", "exec"), scope)  # noqa: S102
  return scope


def parquet_rows(out: str) -> list[dict]:
  files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.endswith(".parquet")]
  return [{**r, "dir": os.path.basename(os.path.dirname(f))}
          for f in files for r in pq.read_table(f).to_pylist()]


def test_example_1_rows_from_create_through_one_classify_stage_to_the_sink(monkeypatch,
                                                                           tmp_path):
  scope = run(1, monkeypatch, tmp_path)
  rows = parquet_rows(scope["out_dir"])
  assert scope["out_dir"].startswith(str(tmp_path))
  assert sorted((r["ticket_id"], r["label"], r["dir"]) for r in rows) == [
      ("T1", "billing", "dt=2026-01-01"), ("T2", "shipping", "dt=2026-01-02")]
  assert all(r["status"] == "ok" and r["cost_usd"] > 0 and "extraction" not in r for r in rows)
  # Beam's WriteToParquet wrote the same rows, dt a column there (a directory in tierflow's)
  [flat] = [os.path.join(scope["flat_dir"], f) for f in os.listdir(scope["flat_dir"])]
  table = pq.read_table(flat)
  assert flat.endswith(".parquet") and "dt" in table.column_names
  assert sorted(table.to_pylist(), key=lambda r: r["record_id"]) == sorted(
      ({**{k: v for k, v in r.items() if k != "dir"}, "dt": r["dir"].removeprefix("dt=")}
       for r in rows), key=lambda r: r["record_id"])


def test_example_2_kafka_records_through_decode_a_user_map_route_and_write(monkeypatch,
                                                                           tmp_path):
  rows = parquet_rows(run(2, monkeypatch, tmp_path)["out_dir"])
  assert sorted(r["ticket_id"] for r in rows) == ["T1", "T2"]
  assert all(r["status"] == "ok" and isinstance(r["extraction"], dict) for r in rows)
  assert [r["body"] for r in rows if r["ticket_id"] == "T1"] == [
      "I was charged twice for my invoice, please refund the payment."]  # the user's Map ran


def test_example_3_a_bug_raises_by_default_and_is_a_failure_when_handled(monkeypatch,
                                                                         tmp_path):
  scope = run(3, monkeypatch, tmp_path)
  assert "routed" in scope  # the handled pipeline ran, after the default one raised


def test_there_are_three_examples_each_a_complete_program():
  """Each imports what it uses: none leans on another's names."""
  for n in (1, 2, 3):
    assert "from tierflow import transforms as tf" in example(n)
  with pytest.raises(IndexError):
    example(4)

