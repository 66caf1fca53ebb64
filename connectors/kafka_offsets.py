"""What the broker says about a topic: its partitions, the group's committed offsets, the
high-watermarks, the offset of a time, and from them each partition's range to read.

The reader (``kafka_source``) asks these once per run (``resolve_ranges``) and the
launcher before it starts (``check_broker``, ``committed_offsets``); the committer
(``kafka_commit``) uses ``consumer`` for its own commits. Every query goes through a
consumer that only ever ``assign``s partitions (never joins the group).
"""

from __future__ import annotations

import logging
import time
from typing import Optional

from tierflow.connectors.kafka_client import committed, new_consumer
from tierflow.connectors.kafka_read_config import UNBOUNDED, KafkaReadConfig, PartitionRange

__all__ = ["check_broker", "committed_offsets", "consumer", "fetch_highwaters",
           "offset_for_time", "resolve_ranges", "topic_partition"]

_LOGGER = logging.getLogger(__name__)


def consumer(config: KafkaReadConfig, group: bool = False, **overrides):
  """A confluent-kafka consumer for the config (committing under its group id when
  ``group``); it only ever ``assign``s partitions, never joins the group."""
  return new_consumer(config.bootstrap_servers, config.consumer_config,
                      group_id=config.group_id if group else None, **overrides)


def check_broker(config: KafkaReadConfig, timeout_s: float = 10.0) -> None:
  """Raises ValueError, within about ``timeout_s``, when the brokers cannot be reached
  or the topic does not exist: a one-line reason a scheduler log can show."""
  from confluent_kafka import KafkaException
  c = consumer(config, **{"socket.connection.setup.timeout.ms": int(timeout_s * 1000)})
  try:
    metadata = c.list_topics(config.topic, timeout=timeout_s)
  except KafkaException as e:
    raise ValueError(f"cannot reach Kafka at {config.bootstrap_servers} within "
                     f"{timeout_s:.0f}s ({e.args[0].str()}): wrong --bootstrap-servers, "
                     "broker down, or not resolvable") from None
  finally:
    c.close()
  topic = metadata.topics.get(config.topic)
  if topic is None or topic.error is not None or not topic.partitions:
    raise ValueError(f"topic {config.topic!r} does not exist on {config.bootstrap_servers}")


def topic_partition(topic: str, partition: int, offset: int = -1001):
  """A confluent-kafka ``TopicPartition`` (offset -1001: none)."""
  from confluent_kafka import TopicPartition
  return TopicPartition(topic, partition, offset)


def committed_offsets(config: KafkaReadConfig) -> dict[int, Optional[int]]:
  """The group's committed offset per partition of the topic (None where nothing is committed)."""
  c = consumer(config, group=True)
  try:
    partitions = sorted(c.list_topics(config.topic, timeout=10).topics[config.topic].partitions)
    found = committed(c, [topic_partition(config.topic, p) for p in partitions])
    return {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in found}
  finally:
    c.close()


def fetch_highwaters(c, topic: str, partitions: list[int],
                     timeout_s: float = 10.0) -> dict[int, tuple[int, int]]:
  """{partition: (beginning, high-watermark)}, the latter as a fetch reports it.

  ``ListOffsets(latest)`` is only a hint: some brokers (Tansu) under-report it.
  Fetching near that hint returns the true high-watermark with the response.
  All partitions are asked at once.
  """
  from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaError
  begins = {tp.partition: tp.offset for tp in c.offsets_for_times(
      [topic_partition(topic, p, OFFSET_BEGINNING) for p in partitions], timeout=timeout_s)}
  hints = {tp.partition: tp.offset for tp in c.offsets_for_times(
      [topic_partition(topic, p, OFFSET_END) for p in partitions], timeout=timeout_s)}
  c.assign([topic_partition(topic, p, max(begins[p], hints[p] - 1)) for p in partitions])
  waiting = set(partitions)
  ends: dict[int, int] = {}
  deadline = time.monotonic() + timeout_s
  while waiting:
    if time.monotonic() > deadline:
      raise TimeoutError(f"no fetch response for {topic} partitions {sorted(waiting)} "
                         f"within {timeout_s}s")
    for m in c.consume(len(partitions), timeout=0.2):
      if m.error() is not None and m.error().code() == KafkaError._PARTITION_EOF:
        ends[m.partition()] = m.offset()
      elif m.error() is not None:
        continue
      waiting.discard(m.partition())
  out = {}
  for p in partitions:
    _, hw = c.get_watermark_offsets(topic_partition(topic, p), cached=True)
    out[p] = (begins[p], max(hints[p], hw, ends.get(p, 0)))
  c.unassign()
  return out


def offset_for_time(c, topic: str, partition: int, time_ms: int, highwater: int) -> int:
  """First offset whose timestamp is >= ``time_ms`` (``highwater`` if none).

  ``offsets_for_times`` gives a start no later than the answer on any broker
  (exact on Apache Kafka; at batch granularity on Tansu); a forward scan from
  there makes it exact.
  """
  from confluent_kafka import KafkaError
  [found] = c.offsets_for_times([topic_partition(topic, partition, time_ms)], timeout=10)
  if found.offset < 0:
    return highwater
  c.assign([topic_partition(topic, partition, found.offset)])
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline:
    for m in c.consume(500, timeout=1.0):
      if m.error() is not None:
        if m.error().code() == KafkaError._PARTITION_EOF:
          return highwater
        continue
      if m.timestamp()[1] >= time_ms:
        return m.offset()
      if m.offset() >= highwater - 1:
        return highwater
  raise TimeoutError(f"{topic}-{partition}: could not scan for time {time_ms} within 60s")


def resolve_ranges(config: KafkaReadConfig) -> list[PartitionRange]:
  """Resolves every partition of the topic to the offset range to read."""
  c = consumer(config, group=config.group_id is not None)
  try:
    topic = c.list_topics(config.topic, timeout=10).topics.get(config.topic)
    if topic is None or topic.error is not None or not topic.partitions:
      raise ValueError(f"topic {config.topic!r} does not exist on {config.bootstrap_servers}")
    partitions = sorted(topic.partitions)
    group_offsets = {}
    if config.group_id is not None:
      group_offsets = {tp.partition: tp.offset for tp in committed(
          c, [topic_partition(config.topic, p) for p in partitions]) if tp.offset >= 0}
    ranges = []
    read_until = (int((time.time() + config.max_read_seconds) * 1000)
                  if config.max_read_seconds else 0)
    marks = fetch_highwaters(c, config.topic, partitions)
    for p in partitions:
      begin, hw = marks[p]
      start = _pick(config.start_offset, p)
      if start is None and config.start_time_ms is not None:
        start = offset_for_time(c, config.topic, p, config.start_time_ms, hw)
      if start is None:
        start = group_offsets.get(p)
      # A start below the log's start stays: those offsets were deleted, and the
      # reader fails or skips them (allow_deleted_offsets), never silently.
      start = min(begin if start is None else start, hw)
      if config.bounded:
        stop = _pick(config.end_offset, p)
        if stop is None and config.end_time_ms is not None:
          stop = offset_for_time(c, config.topic, p, config.end_time_ms, hw)
        stop = hw if stop is None else min(stop, hw)
        stop = max(stop, start)
      else:
        stop = UNBOUNDED
      ranges.append(PartitionRange(config.topic, p, start, stop, read_until))
    if config.bounded:
      total = sum(r.stop - r.start for r in ranges)
      ranges = [r._replace(run_offsets=total) for r in ranges]
    return ranges
  finally:
    c.close()


def _pick(value, partition: int):
  if isinstance(value, dict):
    return value.get(partition)
  return value
