"""Kafka client settings and consumers (confluent-kafka, i.e. librdkafka).

Users give client settings as ``KEY=VALUE`` in either spelling: librdkafka's
own dotted names (``security.protocol``, ``sasl.username``) or the
kafka-python names tierflow documented first (``security_protocol``,
``sasl_plain_username``), translated here. Secrets (passwords) are accepted
only as ``env:VAR`` or ``file:PATH`` and resolved on the worker, so the secret
itself never sits in pipeline options, job graphs, display data or logs.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Mapping, TypeVar

__all__ = ["SECRET_SETTINGS", "check_secret_settings", "client_settings", "committed",
           "new_consumer", "resolve_secret_settings", "retrying"]

_LOGGER = logging.getLogger(__name__)
# librdkafka's own log lines (connection refused, ...) go here, not to stderr.
_RDKAFKA_LOGGER = logging.getLogger("tierflow.kafka.librdkafka")

# kafka-python name -> librdkafka name
_KAFKA_PYTHON_NAMES = {
    "security_protocol": "security.protocol",
    "sasl_mechanism": "sasl.mechanism",
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "sasl_kerberos_service_name": "sasl.kerberos.service.name",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
    "ssl_password": "ssl.key.password",
    "ssl_crlfile": "ssl.crl.location",
    "ssl_ciphers": "ssl.cipher.suites",
    "client_id": "client.id",
    "isolation_level": "isolation.level",
    "max_partition_fetch_bytes": "max.partition.fetch.bytes",
    "fetch_max_bytes": "fetch.max.bytes",
    "request_timeout_ms": "socket.timeout.ms",
    "connections_max_idle_ms": "connections.max.idle.ms",
    "reconnect_backoff_ms": "reconnect.backoff.ms",
}
# Settings tierflow owns: they decide what is read and committed.
_RESERVED = frozenset({"bootstrap.servers", "group.id", "enable.auto.commit",
                       "enable.auto.offset.store", "enable.partition.eof"})
SECRET_SETTINGS = frozenset({"sasl_plain_password", "ssl_password", "sasl.password",
                             "ssl.key.password", "ssl.keystore.password",
                             "sasl.oauthbearer.client.secret"})
_SECRET_REFS = ("env:", "file:")


def check_secret_settings(settings: Mapping[str, Any]) -> None:
  """Raises ValueError when a secret setting is given in clear rather than by reference."""
  for key in sorted(SECRET_SETTINGS & set(settings)):
    value = settings[key]
    if not (isinstance(value, str) and value.startswith(_SECRET_REFS)):
      raise ValueError(
          f"consumer setting {key} holds a secret: pass it as {key}=env:VAR or {key}=file:PATH "
          f"(read on the worker) so it never appears in pipeline options or logs")


def resolve_secret_settings(settings: Mapping[str, Any]) -> dict:
  """Settings with ``env:``/``file:`` references of secret settings replaced by their value."""
  out = dict(settings)
  for key in SECRET_SETTINGS & set(out):
    ref = out[key]
    if not isinstance(ref, str) or not ref.startswith(_SECRET_REFS):
      continue
    kind, _, where = ref.partition(":")
    if kind == "env":
      if where not in os.environ:
        raise ValueError(f"consumer setting {key}: environment variable {where} is not set")
      out[key] = os.environ[where]
    else:
      try:
        with open(where, encoding="utf-8") as f:
          out[key] = f.read().strip()
      except OSError as e:
        raise ValueError(f"consumer setting {key}: cannot read {where}: {e.strerror}") from None
  return out


def client_settings(settings: Mapping[str, Any]) -> dict:
  """librdkafka settings for user settings in either spelling (secrets not yet resolved).

  Raises ValueError for an unknown kafka-python name or a setting tierflow owns.
  """
  out = {}
  for key, value in settings.items():
    if "." not in key:
      if key == "ssl_check_hostname":
        key, value = "ssl.endpoint.identification.algorithm", "https" if value else "none"
      elif key in _KAFKA_PYTHON_NAMES:
        key = _KAFKA_PYTHON_NAMES[key]
      else:
        raise ValueError(
            f"unknown Kafka client setting {key!r}: use librdkafka's dotted name (see "
            f"CONFIGURATION.md of librdkafka) or one of {', '.join(sorted(_KAFKA_PYTHON_NAMES))}")
    if key in _RESERVED:
      raise ValueError(f"Kafka client setting {key} is set by tierflow and cannot be overridden")
    if isinstance(value, bool):
      value = "true" if value else "false"
    out[key] = value
  return out


def new_consumer(bootstrap_servers: str, settings: Mapping[str, Any], *,
                 group_id: str | None = None, **overrides):
  """A confluent-kafka Consumer that never auto-commits and never joins a group by itself
  (tierflow only uses ``assign``); ``group_id`` only names the group it commits under."""
  from confluent_kafka import Consumer
  config = {
      "bootstrap.servers": bootstrap_servers,
      # librdkafka wants a group id even for assign(); without one of ours it never commits.
      "group.id": group_id or "tierflow-reader",
      "enable.auto.commit": False,
      "enable.auto.offset.store": False,
      "enable.partition.eof": True,
      "auto.offset.reset": "earliest",
      "client.id": "tierflow",
      # librdkafka prefetches per consumer until either limit is reached (defaults:
      # 100,000 messages, 64 MiB); one consumer reads one partition, so a few MiB ahead
      # keeps it busy and memory flat.
      "queued.min.messages": 20_000,
      "queued.max.messages.kbytes": 8 * 1024,
      "max.partition.fetch.bytes": 2 * 1024 * 1024,
      "logger": _RDKAFKA_LOGGER,
      **resolve_secret_settings(client_settings(settings)),
      **overrides,
  }
  return Consumer(config)


T = TypeVar("T")


def retrying(call: Callable[[], T], what: str, timeout_s: float = 60.0) -> T:
  """``call()``, retried while it raises a retriable Kafka error (a group coordinator that
  is moving or still loading, a leader election), for up to ``timeout_s``."""
  from confluent_kafka import KafkaException
  deadline = time.monotonic() + timeout_s
  delay = 0.1
  while True:
    try:
      return call()
    except KafkaException as e:
      error = e.args[0] if e.args else None
      retriable = bool(error is not None and hasattr(error, "retriable") and error.retriable())
      if not retriable or time.monotonic() + delay > deadline:
        raise
      _LOGGER.info("%s: %s, retrying in %.1fs", what, error.str(), delay)
      time.sleep(delay)
      delay = min(2.0, delay * 2)


def committed(consumer, partitions: list, timeout_s: float = 30.0) -> list:
  """The group's committed offsets of ``partitions`` (TopicPartitions), retried through
  the coordinator's transient errors."""
  return retrying(lambda: consumer.committed(partitions, timeout=timeout_s),
                  "reading committed offsets")
