"""The launcher and CLI: checks before reading, exit codes, one-line errors, options that
cannot collide with a user's, per-pipeline help, logging and progress."""

import json
import os
import time

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from tierflow import cli, launcher
from tierflow_local.broker import free_port
from tierflow_local.loader import publish
from tierflow.pipelines.options import KafkaSourceOptions, ParquetSinkOptions


def run_cli(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


@pytest.fixture
def published(broker, topic, make_tickets):
  name = topic(partitions=2)
  publish(broker.bootstrap_servers, name, make_tickets(20))
  return name


def base(broker, name, output):
  return ["run", "passthrough", "--bootstrap-servers", broker.bootstrap_servers,
          "--topic", name, "--output", output]


@pytest.mark.parametrize("flags, message", [
    (["--start-offset", "10", "--end-offset", "5"], "--start-offset 10 is after --end-offset 5"),
    (["--start-offset", "0:10", "--end-offset", "0:3"], "partition 0"),
    (["--start-offset", "-1"], "must be >= 0"),
    (["--end-offset", "1:-4"], "must be >= 0"),
    (["--start-time", "2024-01-02", "--end-time", "2024-01-01"], "--end-time is before"),
    (["--start-time", "yesterday"], "neither epoch millis nor an ISO-8601"),
    (["--rows-per-file", "0"], "--rows-per-file must be positive"),
    (["--max-failed-fraction", "2"], "between 0 and 1"),
])
def test_bad_ranges_are_rejected_before_reading(broker, published, output_dir, capsys, flags,
                                                message):
  code, out, err = run_cli(capsys, *base(broker, published, output_dir), *flags)
  assert code == launcher.EXIT_REJECTED
  assert message in err and err.count("\n") == 1 and "Traceback" not in err
  assert os.listdir(output_dir) == []


def test_an_output_that_is_a_file_or_unwritable_is_rejected(broker, published, tmp_path,
                                                            capsys):
  blocker = tmp_path / "a-file"
  blocker.write_text("x")
  code, _, err = run_cli(capsys, *base(broker, published, str(blocker)))
  assert code == 2 and "is a file, not a directory" in err
  code, _, err = run_cli(capsys, *base(broker, published, str(blocker / "below")))
  assert code == 2 and "is not writable" in err and err.count("\n") == 1


@pytest.mark.parametrize("servers, message", [
    ("127.0.0.1:{closed}", "cannot reach Kafka at 127.0.0.1:"),
    ("no-such-host.invalid:9092", "cannot reach Kafka at no-such-host.invalid:9092"),
    ("127.0.0.1:99999", "not host:port with a port from 1 to 65535"),
    ("localhost", "not host:port"),
])
@pytest.mark.slow
def test_unreachable_or_malformed_brokers_fail_fast_in_one_line(output_dir, capsys, servers,
                                                                message):
  servers = servers.format(closed=free_port())
  started = time.monotonic()
  code, _, err = run_cli(capsys, "run", "passthrough", "--bootstrap-servers", servers,
                         "--topic", "t", "--output", output_dir)
  assert time.monotonic() - started < 20
  assert code == 2 and message in err and err.count("\n") == 1


def test_a_missing_topic_is_rejected(broker, output_dir, capsys):
  code, _, err = run_cli(capsys, "run", "passthrough", "--bootstrap-servers",
                         broker.bootstrap_servers, "--topic", "never-created",
                         "--output", output_dir)
  assert code == 2 and "topic 'never-created' does not exist" in err


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("models: [unclosed", "is not valid YAML at line 1"),
    ("just a string", "is not a YAML mapping"),
    ("name: x\nmodels: {}\nstages: []\nsurprise: 1\n", "surprise: unknown key"),
])
def test_bad_configs_fail_in_one_line(broker, published, output_dir, tmp_path, capsys,
                                      content, message):
  path = tmp_path / "cfg.yaml"
  if content is not None:
    path.write_text(content)
  code, _, err = run_cli(capsys, "run", "tickets", "--bootstrap-servers",
                         broker.bootstrap_servers, "--topic", published, "--output", output_dir,
                         "--config", str(path))
  assert code == 2 and message in err and err.count("\n") == 1, err


def test_a_corrupt_calibration_file_fails_in_one_line(broker, published, output_dir, tmp_path,
                                                      capsys):
  path = tmp_path / "cal.json"
  path.write_text('{"version": 1, "stages": ')
  code, _, err = run_cli(capsys, "run", "tickets", "--bootstrap-servers",
                         broker.bootstrap_servers, "--topic", published, "--output", output_dir,
                         "--calibration", str(path))
  assert code == 2 and "cal.json" in err and err.count("\n") == 1, err


def test_too_many_dead_letters_is_its_own_exit_code(broker, topic, produce, output_dir, capsys,
                                                    make_tickets):
  name = topic(partitions=1)
  publish(broker.bootstrap_servers, name, make_tickets(90))
  produce(name, [{"value": b"not json"}] * 10)
  code, out, _ = run_cli(capsys, *base(broker, name, output_dir),
                         "--max-dead-letter-fraction", "0.05")
  assert code == launcher.EXIT_DEAD_LETTERS
  assert "10 of 100 records were undecodable (limit 5.00%" in out
  # Without a limit, bad input is data routed aside: exit 0.
  other = output_dir + "-2"
  code, out, _ = run_cli(capsys, *base(broker, name, other), "--group-id", "g2")
  assert code == 0 and "(10 rows)" in out


def test_a_failed_run_is_one_line_and_the_traceback_comes_with_v(broker, published, output_dir,
                                                                  capsys, monkeypatch):
  from tierflow.connectors import parquet_dataset

  def broken(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(parquet_dataset, "write_file", broken)
  code, _, err = run_cli(capsys, *base(broker, published, output_dir))
  assert code == launcher.EXIT_FAILED
  assert "the run failed: OSError: [Errno 28] No space left on device" in err
  assert "Traceback" not in err
  code, _, err = run_cli(capsys, "-v", *base(broker, published, output_dir))
  assert code == launcher.EXIT_FAILED and "Traceback" in err


def test_a_users_own_output_option_does_not_set_tierflows():
  class UserOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
      parser.add_argument("--output")
      parser.add_argument("--topic")

  options = PipelineOptions(["--output", "/user/out", "--topic", "users",
                             "--tierflow_output", "/tf/out", "--tierflow-topic", "tickets"])
  assert options.view_as(UserOptions).output == "/user/out"
  assert options.view_as(ParquetSinkOptions).tierflow_output == "/tf/out"
  assert options.view_as(KafkaSourceOptions).tierflow_topic == "tickets"
  # Without tierflow's own flags, the user's --output leaves tierflow's unset.
  options = PipelineOptions(["--output", "/user/out"])
  assert options.view_as(ParquetSinkOptions).tierflow_output is None


def test_pipeline_help_lists_that_pipelines_flags(capsys):
  code, out, _ = run_cli(capsys, "run", "tickets", "--help")
  assert code == 0
  for flag in ("--bootstrap-servers", "--topic", "--output", "--config", "--calibration",
               "--budget-usd", "--max-failed-fraction", "--rows-per-file"):
    assert flag in out
  code, out, _ = run_cli(capsys, "run", "passthrough", "--help")
  assert code == 0 and "--topic" in out and "--config" not in out


def test_progress_and_verbose_logs(broker, published, output_dir, capsys):
  code, out, err = run_cli(capsys, *base(broker, published, output_dir))
  assert code == 0
  assert "progress: read 20 · written 20 · dead letters 0" in err
  assert "(20 rows)" in out
  code, out, err = run_cli(capsys, "-vv", *base(broker, published, output_dir + "-v"))
  assert code == 0 and " DEBUG " in err
  code, out, err = run_cli(capsys, "-q", *base(broker, published, output_dir + "-q"))
  assert code == 0 and "progress:" not in err


def test_a_typo_anywhere_in_the_config_names_its_path(tmp_path):
  import yaml
  from importlib import resources
  from tierflow.config import load_config
  config = yaml.safe_load(resources.files("tierflow").joinpath("data", "tickets.yaml").read_text())
  config["stages"][1]["fields"]["amount"] = {"type": "number", "enmu": ["USD"]}
  config["models"]["small"]["batchsize"] = 4
  path = tmp_path / "typo.yaml"
  path.write_text(yaml.safe_dump(config))
  with pytest.raises(ValueError) as e:
    load_config(str(path))
  assert "stages.1.fields.amount.enmu: unknown key" in str(e.value)
  assert "models.small.batchsize: unknown key" in str(e.value)
  config = yaml.safe_load(resources.files("tierflow").joinpath("data", "tickets.yaml").read_text())
  config["stages"][1]["fields"]["amount"] = {"type": "float"}
  path.write_text(yaml.safe_dump(config))
  with pytest.raises(ValueError, match="stages.1.fields.amount.type: Input should be 'string'"):
    load_config(str(path))


def test_a_typo_in_the_input_template_is_refused_when_the_config_loads(tmp_path, capsys):
  """`{subjct}` rendered as "" on every record and ran with exit 0: now the run is refused
  before reading, naming the field and the schema's fields."""
  import yaml
  from importlib import resources
  config = yaml.safe_load(resources.files("tierflow").joinpath("data", "tickets.yaml").read_text())
  config["input"]["text"] = "Subject: {subjct}\n\n{body}"
  path = tmp_path / "typo.yaml"
  path.write_text(yaml.safe_dump(config))
  code, out, err = run_cli(capsys, "run", "tickets", "--bootstrap-servers", "127.0.0.1:1",
                           "--topic", "t", "--output", str(tmp_path / "out"), "--config",
                           str(path))
  assert code == 2, err
  assert "input.text names subjct, not a field of schema 'ticket'" in err, err
  assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_model_run_says_what_each_stage_has_done_while_it_runs(broker, topic, tmp_path,
                                                                 capsys, monkeypatch):
  """A slow small tier over one batch: the records are read at once but written only at
  the end; the progress lines in between count each stage's answers and what is left, and
  come even when nothing else moved (never a silence longer than the interval)."""
  import functools
  from local_config import local_config
  from tierflow import progress
  from tierflow_local.loader import publish, sample_tickets
  from tierflow_local.provider_server import LocalProviderServer
  from tierflow_local.standin_model import KeywordStandIn
  monkeypatch.setattr(progress, "start", functools.partial(progress.start, interval=0.5))
  name = topic(partitions=1)
  publish(broker.bootstrap_servers, name, sample_tickets()[:12])
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier"),
                           latency_seconds=0.1) as server:
    config = local_config(tmp_path / "tickets.yaml", server,
                          small=dict(batch_size=1, concurrency=1))
    code, out, err = run_cli(capsys, "run", "tickets", "--bootstrap-servers",
                             broker.bootstrap_servers, "--topic", name, "--output",
                             str(tmp_path / "out"), "--config", config)
  assert code == 0, err[-2000:]
  lines = [l for l in err.splitlines() if l.startswith("progress:")]
  during = [l for l in lines if "written 0" in l and "classify" in l]
  assert during, lines  # stage counts before anything was written
  assert any("left" in l for l in during), during
  # Every stage is counted from the first line, so what is left counts the stages to come.
  assert all(f"{s} " in during[0] for s in ("classify", "extract", "summarise")), during[0]
  assert any("classify 12/12" in l for l in lines)
