"""Publishes records (the bundled sample tickets, or any JSONL) to Kafka.

Values are encoded with the same codecs the Kafka source decodes with; each
record's key is its id field and its Kafka timestamp its ``created_at``.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Iterable, Mapping

from tierflow import schemas
from tierflow.connectors.codecs import make_codec

SAMPLE_TICKETS = "sample_tickets.jsonl"
SAMPLE_TICKET_LABELS = "sample_tickets_labels.jsonl"


def read_jsonl(path_or_name: str) -> list[dict]:
  """Rows of a JSONL file: a path, or the name of a file bundled in ``data/``."""
  bundled = resources.files(__package__).joinpath("data", path_or_name)
  text = bundled.read_text(encoding="utf-8") if bundled.is_file() else open(
      path_or_name, encoding="utf-8").read()
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def sample_tickets() -> list[dict]:
  return read_jsonl(SAMPLE_TICKETS)


def bundled_path(name: str) -> str:
  """The path of a file bundled in ``data/`` (a JSONL others may read by path)."""
  return str(resources.files(__package__).joinpath("data", name))


def sample_ticket_labels() -> dict[str, dict]:
  return {row["ticket_id"]: row for row in read_jsonl(SAMPLE_TICKET_LABELS)}


def _id_field(schema: Mapping[str, Any]) -> str:
  return schema["fields"][0]["name"]


def publish(bootstrap_servers: str, topic: str, records: Iterable[Mapping[str, Any]], *,
            fmt: str = "json", schema: str | Mapping[str, Any] = "ticket",
            schema_registry_url: str | None = None, schema_id: int = 1,
            schema_registry_auth: str | None = None,
            producer_config: Mapping[str, Any] | None = None) -> int:
  """Encodes and publishes records; returns how many were acknowledged."""
  from kafka import KafkaProducer
  avro = schemas.load(schema) if isinstance(schema, str) else dict(schema)
  codec = make_codec(fmt, avro, schema_registry_url=schema_registry_url, schema_id=schema_id,
                     schema_registry_auth=schema_registry_auth)
  if fmt == "confluent-avro" and schema_registry_url:
    codec.schema_id = codec.registry.register(f"{topic}-value", avro)
  key_field = _id_field(avro)
  producer = KafkaProducer(bootstrap_servers=bootstrap_servers.split(","), acks="all",
                           linger_ms=5, **dict(producer_config or {}))
  try:
    futures = []
    for record in records:
      ts = record.get("created_at")
      futures.append(producer.send(
          topic, value=codec.encode(record),
          key=str(record[key_field]).encode("utf-8"),
          timestamp_ms=ts if isinstance(ts, int) else None))
    producer.flush()
    for f in futures:
      f.get(timeout=30)
    return len(futures)
  finally:
    producer.close()
