"""The embedded broker's own lifecycle: what it leaves behind on the machine."""

import os
import signal

import pytest

from tierflow_local.broker import EmbeddedBroker


def test_a_clean_stop_leaves_no_log_behind():
  broker = EmbeddedBroker().start()
  log = broker.log_path
  assert os.path.exists(log)
  broker.stop()
  assert not os.path.exists(log)


def test_a_broker_that_died_keeps_its_log_and_says_where(caplog):
  broker = EmbeddedBroker().start()
  log = broker.log_path
  os.kill(broker._proc.pid, signal.SIGKILL)
  broker._proc.wait()
  with caplog.at_level("WARNING", logger="tierflow_local.processes"):
    broker.stop()
  try:
    assert os.path.exists(log)
    assert log in caplog.text
  finally:
    os.unlink(log)


def test_a_port_already_taken_is_a_clear_error_not_the_other_broker():
  """The readiness check must not take the listener already there for the new broker."""
  taken = EmbeddedBroker().start()
  try:
    clash = EmbeddedBroker(port=taken.port)
    with pytest.raises(RuntimeError, match=f"cannot start the embedded broker on "
                                           f"127.0.0.1:{taken.port}: address already in use"):
      clash.start()
    assert clash.log_path is None
  finally:
    taken.stop()


def test_tierflow_broker_on_a_taken_port_says_so_in_one_line(capsys):
  from tierflow import cli
  taken = EmbeddedBroker().start()
  try:
    code = cli.main(["broker", "--port", str(taken.port)])
  finally:
    taken.stop()
  err = capsys.readouterr().err.strip()
  assert code != 0 and len(err.splitlines()) == 1
  assert f"127.0.0.1:{taken.port}: address already in use" in err


def test_a_broker_not_ready_in_time_keeps_its_log_and_the_error_names_it():
  broker = EmbeddedBroker(startup_timeout=0)
  with pytest.raises(RuntimeError, match="did not become ready") as failure:
    broker.start()
  log = broker.log_path
  try:
    assert str(failure.value).endswith(f"see {log}") and os.path.exists(log)
  finally:
    os.unlink(log)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_tierflow_broker_stops_its_broker_on_sigterm_and_sighup(sig):
  """`tierflow broker` on a free port (printed), stopped by a signal as a service manager
  stops it: the Tansu process goes with it and the port is free again."""
  import re
  import socket
  import subprocess
  import sys
  import time
  proc = subprocess.Popen([sys.executable, "-m", "tierflow.cli", "broker"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()
    port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                              text=True).stdout.split()
    assert children, "no broker process under tierflow broker"
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{c}") for c in children):
      time.sleep(0.1)
    assert not [c for c in children if os.path.exists(f"/proc/{c}")], "the broker was orphaned"
    with socket.socket() as s:
      assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens there any more
  finally:
    if proc.poll() is None:
      proc.kill()
