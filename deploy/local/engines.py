"""The real engines the tests run on, installed by ``deploy/local/engines/install.sh``
(``make engines``): Beam's Flink job server, a Flink session cluster's jars, Beam's Prism
runner, Apache Kafka and Apicurio Registry. This module finds them and starts the servers
on loopback.

``ApacheKafka`` is a single-node KRaft broker (broker and controller in one JVM) on free
ports, with its log directory in a temporary directory, so it survives a restart;
``ApicurioRegistry`` serves the Confluent-compatible API at ``/apis/ccompat/v7``;
``FlinkSessionCluster`` is a standalone Flink 1.19 session cluster (a JobManager and one or
more TaskManagers, each its own JVM, any of which a test can SIGKILL and restart) from the
jars PyPI's ``apache-flink-libraries`` ships.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from tierflow_local.broker import free_port
from tierflow_local.processes import stop as _stop

__all__ = ["ApacheKafka", "ApicurioRegistry", "EnginesMissing", "FlinkSessionCluster",
           "engines_dir", "flink_job_server_jar", "prism_binary"]

KAFKA_VERSION = "4.4.0"
FLINK_JOB_SERVER = "Beam 2.62.0 Flink 1.19 job server"
FLINK_VERSION = "1.19.3"
_TEMURIN_25 = Path("/usr/lib/jvm/temurin-25-jdk-amd64/bin/java")


class EnginesMissing(RuntimeError):
  """An engine is not installed: ``make engines`` (deploy/local/engines/install.sh) installs it."""


def engines_dir() -> Path:
  """``$TIERFLOW_ENGINES``, else ``.engines`` at the repository root."""
  env = os.environ.get("TIERFLOW_ENGINES")
  if env:
    return Path(env)
  return Path(__file__).resolve().parents[2] / ".engines"


def _need(path: Path, what: str) -> Path:
  if not path.exists():
    raise EnginesMissing(f"{what} is not installed at {path}: run `make engines` "
                         "(deploy/local/engines/install.sh)")
  return path


def flink_job_server_jar() -> Path:
  return _need(engines_dir() / "flink" / "beam-flink-job-server.jar", FLINK_JOB_SERVER)


def prism_binary(beam_version: Optional[str] = None) -> Path:
  if beam_version is None:
    import apache_beam
    beam_version = apache_beam.__version__
  return _need(engines_dir() / "prism" / f"v{beam_version}" / "prism",
               f"Prism v{beam_version}")


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"the server exited with {proc.returncode}: "
                         f"{log.read_text(errors='replace')[-2000:]}")
    with socket.socket() as s:
      s.settimeout(0.2)
      if s.connect_ex(("127.0.0.1", port)) == 0:
        return
    time.sleep(0.1)
  raise RuntimeError(f"nothing listened on port {port} within {timeout}s; see {log}")


class ApacheKafka:
  """A single-node Apache Kafka (KRaft) on loopback; use as a context manager.

  ``stop()``/``start()`` restart it on the same ports and log directory (the data
  survives); ``kill()`` is an unclean stop (SIGKILL).
  """

  def __init__(self, startup_timeout: float = 120.0):
    self.home = _need(engines_dir() / "kafka", f"Apache Kafka {KAFKA_VERSION}")
    self.port = free_port()
    self.controller_port = free_port()
    self.dir = Path(tempfile.mkdtemp(prefix="apache-kafka-"))
    self.startup_timeout = startup_timeout
    self._proc: Optional[subprocess.Popen] = None

  @property
  def bootstrap_servers(self) -> str:
    return f"127.0.0.1:{self.port}"

  @property
  def log_path(self) -> Path:
    return self.dir / "kafka.log"

  def _properties(self) -> Path:
    path = self.dir / "server.properties"
    path.write_text("\n".join([
        "process.roles=broker,controller", "node.id=1",
        f"controller.quorum.bootstrap.servers=127.0.0.1:{self.controller_port}",
        f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
        f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
        "controller.listener.names=CONTROLLER", "inter.broker.listener.name=PLAINTEXT",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        f"log.dirs={self.dir / 'logs'}", "num.partitions=1", "default.replication.factor=1",
        "offsets.topic.replication.factor=1", "offsets.topic.num.partitions=4",
        "transaction.state.log.replication.factor=1", "transaction.state.log.min.isr=1",
        "transaction.state.log.num.partitions=4",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1", "group.initial.rebalance.delay.ms=0",
        "auto.create.topics.enable=false", "log.cleaner.backoff.ms=500",
        # Tests write records with 2024 timestamps: the default 7-day retention would
        # delete them mid-suite (tests delete records on purpose with DeleteRecords).
        "log.retention.ms=-1",
        "num.network.threads=2", "num.io.threads=2", "num.recovery.threads.per.data.dir=1",
        "background.threads=2", "broker.session.timeout.ms=3000",
        "broker.heartbeat.interval.ms=500", ""]))
    return path

  def _java(self, *args: str, heap: str = "-Xmx512m") -> list[str]:
    return [shutil.which("java") or "java", "-Xms64m", heap, "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1", "-Xss512k", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.dir}", "-cp", f"{self.home / 'lib'}/*", *args]

  def start(self) -> "ApacheKafka":
    if self._proc is not None and self._proc.poll() is None:
      return self
    props = self._properties()
    if not (self.dir / "logs" / "meta.properties").exists():
      # A cluster id may start with "-": passed as --cluster-id=ID, never "-t ID".
      cluster = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
      subprocess.run(self._java("kafka.tools.StorageTool", "format", "--standalone",
                                f"--cluster-id={cluster}", "-c", str(props), heap="-Xmx256m"),
                     check=True, capture_output=True, timeout=120)
    log = open(self.log_path, "ab")
    self._proc = subprocess.Popen(self._java("kafka.Kafka", str(props)), stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    _wait_for_port(self.port, self._proc, self.log_path, self.startup_timeout)
    self._wait_ready()
    return self

  def _wait_ready(self) -> None:
    import logging
    from confluent_kafka.admin import AdminClient
    admin = AdminClient({"bootstrap.servers": self.bootstrap_servers,
                         "logger": logging.getLogger("tierflow.kafka.librdkafka")})
    deadline = time.monotonic() + self.startup_timeout
    while time.monotonic() < deadline:
      try:
        admin.list_topics(timeout=2)
        return
      except Exception:  # noqa: BLE001 - not up yet
        time.sleep(0.2)
    raise RuntimeError(f"Apache Kafka did not answer within {self.startup_timeout}s")

  def create_topic(self, name: str, partitions: int = 1, config: Optional[dict] = None) -> None:
    import logging
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": self.bootstrap_servers,
                         "logger": logging.getLogger("tierflow.kafka.librdkafka")})
    futures = admin.create_topics([NewTopic(name, partitions, 1, config=dict(config or {}))])
    futures[name].result(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
      topic = admin.list_topics(name, timeout=5).topics.get(name)
      if topic is not None and topic.error is None and len(topic.partitions) == partitions:
        return
      time.sleep(0.1)
    raise RuntimeError(f"topic {name} did not appear with {partitions} partitions")

  def stop(self) -> None:
    _stop(self._proc)

  def kill(self) -> None:
    _stop(self._proc, signal.SIGKILL)

  def close(self) -> None:
    self.stop()
    shutil.rmtree(self.dir, ignore_errors=True)

  def __enter__(self) -> "ApacheKafka":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.close()


class ApicurioRegistry:
  """Apicurio Registry (in-memory storage) on loopback; ``url`` is its Confluent-compatible
  API. ``basic_auth=(user, password)`` requires HTTP basic auth. Needs Java 21+ (Temurin 25
  where the machine has it)."""

  def __init__(self, basic_auth: Optional[tuple[str, str]] = None,
               startup_timeout: float = 180.0):
    self.app = _need(engines_dir() / "apicurio" / "app" / "quarkus-run.jar",
                     "Apicurio Registry 3.3.3")
    self.java = os.environ.get("TIERFLOW_JAVA21") or (
        str(_TEMURIN_25) if _TEMURIN_25.exists() else shutil.which("java") or "java")
    self.port = free_port()
    self.management_port = free_port()
    self.basic_auth = basic_auth
    self.dir = Path(tempfile.mkdtemp(prefix="apicurio-"))
    self.startup_timeout = startup_timeout
    self._proc: Optional[subprocess.Popen] = None

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.port}/apis/ccompat/v7"

  def start(self) -> "ApicurioRegistry":
    options = [
        "-Xms64m", "-Xmx384m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xss512k",
        "-Dquarkus.http.host=127.0.0.1", f"-Dquarkus.http.port={self.port}",
        "-Dquarkus.management.host=127.0.0.1",
        f"-Dquarkus.management.port={self.management_port}",
        "-Dquarkus.log.level=WARN", "-Dquarkus.http.access-log.enabled=false",
        "-Dquarkus.banner.enabled=false",
        # Confluent's default compatibility (Apicurio's own default is NONE).
        "-Dapicurio.rules.global.compatibility=BACKWARD",
        "-Dapicurio.datasource.jdbc.initial-size=2", "-Dapicurio.datasource.jdbc.min-size=2",
        f"-Djava.io.tmpdir={self.dir}"]
    if self.basic_auth:
      user, password = self.basic_auth
      options += ["-Dquarkus.http.auth.basic=true", "-Dapicurio.authn.mechanism.priority=basic",
                  "-Dquarkus.security.users.embedded.enabled=true",
                  "-Dquarkus.security.users.embedded.plain-text=true",
                  f"-Dquarkus.security.users.embedded.users.{user}={password}",
                  f"-Dquarkus.security.users.embedded.roles.{user}=sr-admin"]
    log = open(self.dir / "apicurio.log", "ab")
    self._proc = subprocess.Popen([self.java, *options, "-jar", str(self.app)], cwd=self.dir,
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + self.startup_timeout
    while time.monotonic() < deadline:
      if self._proc.poll() is not None:
        raise RuntimeError(f"Apicurio exited: {(self.dir / 'apicurio.log').read_text()[-2000:]}")
      try:
        urllib.request.urlopen(f"{self.url}/subjects", timeout=1).close()
        return self
      except urllib.error.HTTPError as e:
        if e.code == 401:
          return self
      except OSError:
        pass
      time.sleep(0.2)
    raise RuntimeError(f"Apicurio did not answer within {self.startup_timeout}s")

  def stop(self) -> None:
    _stop(self._proc)
    shutil.rmtree(self.dir, ignore_errors=True)

  def __enter__(self) -> "ApicurioRegistry":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


# Flink 1.19's env.java.opts.all default: what its runtime needs opened on JDK 17.
_FLINK_JAVA_OPENS = [
    "--add-exports=java.base/sun.net.util=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports=java.security.jgss/sun.security.krb5=ALL-UNNAMED",
    *(f"--add-opens=java.base/{pkg}=ALL-UNNAMED" for pkg in (
        "java.lang", "java.net", "java.io", "java.nio", "sun.nio.ch", "java.lang.reflect",
        "java.text", "java.time", "java.util", "java.util.concurrent",
        "java.util.concurrent.atomic", "java.util.concurrent.locks"))]


class FlinkSessionCluster:
  """A standalone Flink session cluster on loopback: one JobManager and ``taskmanagers``
  TaskManagers with ``slots`` task slots each, each its own JVM (what
  ``start-cluster.sh`` starts; the PyPI package has the jars but not the scripts).
  ``rest_address`` is what Beam's ``--flink_master`` takes.

  For fault tests: ``kill_taskmanager(i)`` SIGKILLs one TaskManager and
  ``start_taskmanager(i)`` starts it again. The cluster notices a lost TaskManager
  within ``heartbeat_timeout_ms`` and restarts the job's tasks (fixed delay, 1 s)
  from its last checkpoint on the slots left, spread evenly over TaskManagers.
  """

  def __init__(self, slots: int = 2, startup_timeout: float = 120.0, taskmanagers: int = 1,
               heartbeat_timeout_ms: int = 6000, restart_attempts: int = 1000):
    self.home = _need(engines_dir() / "flink-dist" / "deps" / "lib" / f"flink-dist-{FLINK_VERSION}.jar",
                      f"Flink {FLINK_VERSION} (PyPI apache-flink-libraries)").parents[1]
    self.slots = slots
    self.taskmanagers = taskmanagers
    self.heartbeat_timeout_ms = heartbeat_timeout_ms
    self.restart_attempts = restart_attempts
    self.rest_port = free_port()
    self.rpc_port = free_port()
    self.dir = Path(tempfile.mkdtemp(prefix="flink-session-"))
    self.startup_timeout = startup_timeout
    self._jobmanager: Optional[subprocess.Popen] = None
    self._taskmanagers: dict[int, subprocess.Popen] = {}
    self._conf: Optional[Path] = None

  @property
  def rest_address(self) -> str:
    return f"localhost:{self.rest_port}"

  @property
  def log_dir(self) -> Path:
    """Where the JobManager's and TaskManagers' logs are."""
    return self.dir

  def _configure(self) -> Path:
    conf = self.dir / "conf"
    conf.mkdir(exist_ok=True)
    (conf / "config.yaml").write_text("\n".join([
        "jobmanager.rpc.address: localhost", f"jobmanager.rpc.port: {self.rpc_port}",
        "jobmanager.bind-host: localhost", "jobmanager.memory.process.size: 1024m",
        "taskmanager.bind-host: localhost", "taskmanager.host: localhost",
        f"taskmanager.numberOfTaskSlots: {self.slots}",
        "taskmanager.memory.process.size: 1728m", f"parallelism.default: {self.slots}",
        "rest.address: localhost", "rest.bind-address: localhost",
        f"rest.port: {self.rest_port}", f"io.tmp.dirs: {self.dir / 'tmp'}",
        "blob.server.port: 0",
        # A lost TaskManager is noticed within seconds (Flink's default is 50 s) and the
        # job restarts from its last checkpoint on the slots left.
        "heartbeat.interval: 1000", f"heartbeat.timeout: {self.heartbeat_timeout_ms}",
        "restart-strategy.type: fixed-delay",
        f"restart-strategy.fixed-delay.attempts: {self.restart_attempts}",
        # A restart that finds no free slot fails within seconds (Flink's default: 5 min).
        "slot.request.timeout: 15000",
        "restart-strategy.fixed-delay.delay: 1 s", "cluster.evenly-spread-out-slots: true",
        ""]))
    (conf / "log4j.properties").write_text("\n".join([
        "rootLogger.level = INFO", "rootLogger.appenderRef.file.ref = MainAppender",
        "appender.main.name = MainAppender", "appender.main.type = File",
        "appender.main.fileName = ${sys:log.file}", "appender.main.layout.type = PatternLayout",
        "appender.main.layout.pattern = %d{HH:mm:ss,SSS} %-5p %c - %m%n", ""]))
    (self.dir / "tmp").mkdir(exist_ok=True)
    return conf

  def _resource_params(self, conf: Path, which: str) -> tuple[list[str], list[str]]:
    """Flink's BashJavaUtils: the JVM memory flags and the dynamic properties that
    start-cluster.sh passes (computed from the memory settings)."""
    out = subprocess.run(
        ["java", "-cp", f"{self.home / 'bin' / 'bash-java-utils.jar'}:{self.home / 'lib'}/*",
         "org.apache.flink.runtime.util.bash.BashJavaUtils", which, "--configDir", str(conf)],
        capture_output=True, text=True, timeout=120, check=True).stdout
    lines = [line.split("BASH_JAVA_UTILS_EXEC_RESULT:", 1)[1]
             for line in out.splitlines() if "BASH_JAVA_UTILS_EXEC_RESULT:" in line]
    return lines[0].split(), lines[1].split()

  def _start(self, role: str, main: str, params: str) -> subprocess.Popen:
    jvm, dynamic = self._resource_params(self._conf, params)
    log = open(self.dir / f"{role}.out", "ab")
    return subprocess.Popen(
        ["java", *jvm, *_FLINK_JAVA_OPENS, "-XX:TieredStopAtLevel=1",
         f"-Dlog.file={self.dir / f'{role}.log'}",
         f"-Dlog4j.configurationFile=file:{self._conf / 'log4j.properties'}",
         "-cp", f"{self.home / 'lib'}/*", main, "--configDir", str(self._conf), *dynamic],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

  def start_taskmanager(self, index: int = 0) -> None:
    """Starts TaskManager ``index`` (again) and waits until its slots are offered."""
    proc = self._taskmanagers.get(index)
    if proc is not None and proc.poll() is None:
      return
    self._taskmanagers[index] = self._start(
        f"taskmanager-{index}", "org.apache.flink.runtime.taskexecutor.TaskManagerRunner",
        "GET_TM_RESOURCE_PARAMS")
    self._wait_for_slots(self.slots * self.live_taskmanagers())

  def kill_taskmanager(self, index: int = 0) -> None:
    """SIGKILLs TaskManager ``index`` (a lost machine: no clean shutdown)."""
    _stop(self._taskmanagers.get(index), signal.SIGKILL)

  def live_taskmanagers(self) -> int:
    return sum(1 for p in self._taskmanagers.values() if p.poll() is None)

  def _wait_for_slots(self, slots: int) -> None:
    deadline = time.monotonic() + self.startup_timeout
    while time.monotonic() < deadline:
      if self._jobmanager.poll() is not None:
        raise RuntimeError(f"the JobManager exited with {self._jobmanager.returncode}; "
                           f"see {self.dir}")
      overview = self.rest("/overview")
      if overview and overview.get("slots-total") == slots:
        return
      time.sleep(0.5)
    raise RuntimeError(f"the Flink cluster did not offer {slots} slots within "
                       f"{self.startup_timeout}s; see {self.dir}")

  def start(self) -> "FlinkSessionCluster":
    self._conf = self._configure()
    self._jobmanager = self._start(
        "jobmanager", "org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint",
        "GET_JM_RESOURCE_PARAMS")
    for index in range(self.taskmanagers):
      self.start_taskmanager(index)
    return self

  def rest(self, path: str, method: str = "GET") -> Optional[dict]:
    """A call to Flink's REST API; None while it does not answer."""
    import json
    request = urllib.request.Request(f"http://{self.rest_address}{path}", method=method)
    try:
      with urllib.request.urlopen(request, timeout=5) as response:
        body = response.read()
        return json.loads(body) if body else {}
    except (OSError, ValueError):
      return None

  def jobs(self) -> list[dict]:
    """The cluster's jobs: [{"id", "status"}, ...]."""
    return (self.rest("/jobs") or {}).get("jobs", [])

  def cancel(self, job_id: str) -> None:
    self.rest(f"/jobs/{job_id}?mode=cancel", method="PATCH")

  def stop(self) -> None:
    for proc in self._taskmanagers.values():
      _stop(proc)
    _stop(self._jobmanager)
    self._taskmanagers.clear()
    shutil.rmtree(self.dir, ignore_errors=True)

  def __enter__(self) -> "FlinkSessionCluster":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()
