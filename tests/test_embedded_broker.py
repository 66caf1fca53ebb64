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
