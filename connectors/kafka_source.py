"""Reading Kafka in pure Python (kafka-python), so it runs on every Beam runner.

``ReadFromKafka`` expands to::

    Impulse -> _ResolveRangesFn -> Reshuffle -> _ReadPartitionFn (splittable DoFn)

``_ResolveRangesFn`` lists the topic's partitions once and resolves each to an
offset range: the start from an explicit offset, a time
(``offsets_for_times``, refined by scanning), the group's committed offset or
the earliest offset; in bounded mode the stop is the fetch high-watermark seen
at that moment (``ListOffsets(latest)`` can under-report on some brokers).
The splittable DoFn reads one partition per element with ``assign()`` (never a
consumer-group join), claims offsets through an ``OffsetRestrictionTracker``
that allows checkpoints but no dynamic splits (so each partition is read, and
committed, in order), and commits ``OffsetAndMetadata(next, "", -1)`` under
the configured group id only when the runner finalizes the bundle, i.e. after
its records are durable downstream (at-least-once; the ``record_id``
topic-partition-offset makes downstream dedupe trivial).

Unbounded reads report an event-time watermark from record timestamps (less a
configurable out-of-orderness), advance it on idle partitions, and stamp a
record that arrives behind the watermark at the watermark, counting it, so no
downstream window ever drops it as late.

Beam's own ``apache_beam.io.kafka.ReadFromKafka`` (Java, cross-language) is the
alternative on Dataflow/Flink when a Java expansion service is available; see
``pipelines.options``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import Any, Iterator, Mapping, NamedTuple, Optional

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Duration, Timestamp

__all__ = ["KafkaRecord", "KafkaReadConfig", "PartitionRange", "ReadFromKafka"]

_LOGGER = logging.getLogger(__name__)
_METRICS_NAMESPACE = "tierflow.kafka"
UNBOUNDED = sys.maxsize


class KafkaRecord(NamedTuple):
  """One Kafka record as read, before decoding."""
  topic: str
  partition: int
  offset: int
  timestamp_ms: int
  key: Optional[bytes]
  value: Optional[bytes]
  headers: tuple = ()

  @property
  def record_id(self) -> str:
    return f"{self.topic}-{self.partition}-{self.offset}"


class PartitionRange(NamedTuple):
  """A resolved read of one partition: offsets [start, stop)."""
  topic: str
  partition: int
  start: int
  stop: int
  read_until_ms: int = 0  # stop an unbounded read at this wall-clock time; 0 = never

  @property
  def bounded(self) -> bool:
    return self.stop != UNBOUNDED


def _parse_offsets(value: int | str | Mapping[int, int] | None) -> int | dict[int, int] | None:
  """An offset for every partition (``100``) or per partition (``"0:100,1:250"``)."""
  if value is None or isinstance(value, int):
    return value
  if isinstance(value, Mapping):
    return {int(k): int(v) for k, v in value.items()}
  text = str(value).strip()
  if ":" not in text:
    return int(text)
  out = {}
  for part in text.split(","):
    p, _, off = part.partition(":")
    out[int(p)] = int(off)
  return out


@dataclasses.dataclass(frozen=True)
class KafkaReadConfig:
  """What to read. Offsets are per-partition positions; ``end_*`` bounds are exclusive.

  Attributes:
    bootstrap_servers: ``host:port[,host:port]``.
    topic: topic to read.
    bounded: read up to a stop and finish (backfill) instead of streaming.
    start_offset / end_offset: an int for every partition or ``"P:OFF,..."``.
    start_time_ms / end_time_ms: epoch millis; resolved like Kafka's
      ``offsetsForTimes`` (first offset whose timestamp is >= the time).
    group_id: consumer group whose committed offsets are the default start and
      under which offsets are committed on bundle finalization.
    commit_offsets: commit on finalization (needs ``group_id``).
    consumer_config: extra kafka-python ``KafkaConsumer`` settings (TLS, SASL, ...).
    max_out_of_orderness_s: how far behind the newest record timestamp the
      watermark stays in streaming reads.
    idle_advance: advance the watermark to now minus the out-of-orderness when
      a partition is caught up, so idle partitions do not hold it back.
  """
  bootstrap_servers: str
  topic: str
  bounded: bool = True
  start_offset: Any = None
  end_offset: Any = None
  start_time_ms: Optional[int] = None
  end_time_ms: Optional[int] = None
  group_id: Optional[str] = None
  commit_offsets: bool = True
  consumer_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  poll_timeout_ms: int = 500
  max_poll_records: int = 2000
  max_records_per_bundle: int = 20_000
  max_bundle_seconds: float = 10.0
  max_out_of_orderness_s: float = 5.0
  idle_advance: bool = True
  resume_delay_s: float = 1.0
  max_read_seconds: Optional[float] = None

  def __post_init__(self):
    if not self.bootstrap_servers:
      raise ValueError("bootstrap_servers is required")
    if not self.topic:
      raise ValueError("topic is required")
    object.__setattr__(self, "start_offset", _parse_offsets(self.start_offset))
    object.__setattr__(self, "end_offset", _parse_offsets(self.end_offset))
    if self.start_offset is not None and self.start_time_ms is not None:
      raise ValueError("give a start offset or a start time, not both")
    if self.end_offset is not None and self.end_time_ms is not None:
      raise ValueError("give an end offset or an end time, not both")
    if not self.bounded and (self.end_offset is not None or self.end_time_ms is not None):
      raise ValueError("an end offset/time makes a bounded read; drop --streaming")
    if (self.start_time_ms is not None and self.end_time_ms is not None
        and self.end_time_ms < self.start_time_ms):
      raise ValueError("end time is before start time")
    if self.max_read_seconds is not None and self.max_read_seconds <= 0:
      raise ValueError("max_read_seconds must be positive")
    if self.commit_offsets and not self.group_id:
      object.__setattr__(self, "commit_offsets", False)
    check_secret_settings(self.consumer_config)


# kafka-python settings that hold secrets: given only as ``env:VAR`` or
# ``file:PATH`` and resolved on the worker, so the secret itself never sits in
# pipeline options, job graphs, display data or logs.
SECRET_SETTINGS = frozenset({"sasl_plain_password", "ssl_password"})
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


def _consumer(config: KafkaReadConfig, group: bool = False):
  from kafka import KafkaConsumer
  settings = {
      "bootstrap_servers": config.bootstrap_servers.split(","),
      "enable_auto_commit": False,
      "auto_offset_reset": "earliest",
      "client_id": "tierflow",
      **resolve_secret_settings(config.consumer_config),
  }
  settings["group_id"] = config.group_id if group else None
  return KafkaConsumer(**settings)


def committed_offsets(config: KafkaReadConfig) -> dict[int, Optional[int]]:
  """The group's committed offset per partition of the topic (None where nothing is committed).

  What a run left behind for the next one: ``RunSummary.committed_offsets`` reports it,
  because commits happen in bundle finalization, where Beam's metrics are not collected.
  """
  from kafka import TopicPartition
  consumer = _consumer(config, group=True)
  try:
    partitions = sorted(consumer.partitions_for_topic(config.topic) or ())
    return {p: consumer.committed(TopicPartition(config.topic, p)) for p in partitions}
  finally:
    consumer.close()


def fetch_highwater(consumer, tp, timeout_s: float = 10.0) -> int:
  """The partition's high-watermark as reported by a fetch response.

  ``ListOffsets(latest)`` (``end_offsets``) is only a hint: some brokers
  (Tansu) under-report it. Fetching near that hint returns the true
  high-watermark with the response.
  """
  consumer.assign([tp])
  begin = consumer.beginning_offsets([tp])[tp]
  hint = consumer.end_offsets([tp])[tp]
  consumer.seek(tp, max(begin, hint - 1))
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    consumer.poll(timeout_ms=200, max_records=1)
    hw = consumer.highwater(tp)
    if hw is not None:
      return max(hw, hint)
  raise TimeoutError(f"no fetch response for {tp.topic}-{tp.partition} within {timeout_s}s")


def offset_for_time(consumer, tp, time_ms: int, highwater: int) -> int:
  """First offset whose timestamp is >= ``time_ms`` (``highwater`` if none).

  ``offsets_for_times`` gives a start no later than the answer on any broker
  (exact on Apache Kafka; at batch granularity on Tansu); a forward scan from
  there makes it exact.
  """
  found = consumer.offsets_for_times({tp: time_ms}).get(tp)
  if found is None:
    return highwater
  consumer.assign([tp])
  consumer.seek(tp, found.offset)
  while consumer.position(tp) < highwater:
    batch = consumer.poll(timeout_ms=1000, max_records=500).get(tp, [])
    for rec in batch:
      if rec.timestamp >= time_ms:
        return rec.offset
  return highwater


def resolve_ranges(config: KafkaReadConfig) -> list[PartitionRange]:
  """Resolves every partition of the topic to the offset range to read."""
  from kafka import TopicPartition
  consumer = _consumer(config, group=config.group_id is not None)
  try:
    partitions = consumer.partitions_for_topic(config.topic)
    if not partitions:
      raise ValueError(f"topic {config.topic!r} does not exist on {config.bootstrap_servers}")
    ranges = []
    read_until = (int((time.time() + config.max_read_seconds) * 1000)
                  if config.max_read_seconds else 0)
    for p in sorted(partitions):
      tp = TopicPartition(config.topic, p)
      begin = consumer.beginning_offsets([tp])[tp]
      hw = fetch_highwater(consumer, tp)
      start = _pick(config.start_offset, p)
      if start is None and config.start_time_ms is not None:
        start = offset_for_time(consumer, tp, config.start_time_ms, hw)
      if start is None and config.group_id is not None:
        committed = consumer.committed(tp)
        start = committed if committed is not None else None
      start = min(max(begin if start is None else start, begin), hw)
      if config.bounded:
        stop = _pick(config.end_offset, p)
        if stop is None and config.end_time_ms is not None:
          stop = offset_for_time(consumer, tp, config.end_time_ms, hw)
        stop = hw if stop is None else min(stop, hw)
        stop = max(stop, start)
      else:
        stop = UNBOUNDED
      ranges.append(PartitionRange(config.topic, p, start, stop, read_until))
    return ranges
  finally:
    consumer.close()


def _pick(value, partition: int):
  if isinstance(value, dict):
    return value.get(partition)
  return value


class _ResolveRangesFn(beam.DoFn):
  def __init__(self, config: KafkaReadConfig):
    self._config = config

  def process(self, unused_impulse) -> Iterator[PartitionRange]:
    for r in resolve_ranges(self._config):
      _LOGGER.info("kafka read %s-%d offsets [%d, %s)", r.topic, r.partition, r.start,
                   r.stop if r.bounded else "unbounded")
      yield r


class _InOrderOffsetTracker(OffsetRestrictionTracker):
  """Allows checkpoints (residual = the unread tail) but no dynamic splits.

  A partition is then read by one reader at a time, in offset order, so its
  committed offset only ever moves forward over records already durable.
  """

  def try_split(self, fraction_of_remainder):
    if fraction_of_remainder > 0:
      return None
    return super().try_split(fraction_of_remainder)


class _PartitionRestrictionProvider(RestrictionProvider):
  def initial_restriction(self, element: PartitionRange) -> OffsetRange:
    return OffsetRange(element.start, element.stop)

  def create_tracker(self, restriction: OffsetRange) -> _InOrderOffsetTracker:
    return _InOrderOffsetTracker(restriction)

  def split(self, element, restriction):
    yield restriction

  def restriction_size(self, element: PartitionRange, restriction: OffsetRange) -> int:
    if restriction.stop == UNBOUNDED:
      return 1
    return restriction.size()

  def truncate(self, element, restriction):
    # On drain an unbounded read stops; a bounded one still finishes its range.
    if restriction.stop == UNBOUNDED:
      return None
    return restriction


def _set_if_greater(estimator: ManualWatermarkEstimator, ts: Timestamp) -> None:
  current = estimator.current_watermark()
  if current is None or ts > current:
    estimator.set_watermark(ts)


_PROVIDER = _PartitionRestrictionProvider()


class _ReadPartitionFn(beam.DoFn):
  """Reads one partition's offset range (a splittable DoFn, bounded form)."""

  def __init__(self, config: KafkaReadConfig):
    self._config = config
    self._records = Metrics.counter(_METRICS_NAMESPACE, "records_read")
    self._bytes = Metrics.counter(_METRICS_NAMESPACE, "bytes_read")
    self._behind = Metrics.counter(_METRICS_NAMESPACE, "records_behind_watermark")
    self._commits = Metrics.counter(_METRICS_NAMESPACE, "offset_commits")

  def setup(self):
    self._consumers: dict = {}
    self._committer = None

  def teardown(self):
    for c in list(getattr(self, "_consumers", {}).values()):
      c.close()
    self._consumers = {}
    if getattr(self, "_committer", None) is not None:
      self._committer.close()
      self._committer = None

  def _consumer_at(self, tp, offset: int):
    consumer = self._consumers.get(tp)
    if consumer is None:
      consumer = _consumer(self._config)
      consumer.assign([tp])
      self._consumers[tp] = consumer
      consumer.seek(tp, offset)
    elif consumer.position(tp) != offset:
      consumer.seek(tp, offset)
    return consumer

  def _commit(self, tp, next_offset: int) -> None:
    from kafka.structs import OffsetAndMetadata
    if self._committer is None:
      self._committer = _consumer(self._config, group=True)
    self._committer.commit({tp: OffsetAndMetadata(next_offset, "", -1)})
    self._commits.inc()
    _LOGGER.debug("committed %s-%d at %d for group %s", tp.topic, tp.partition,
                  next_offset, self._config.group_id)

  def _read(self, element: PartitionRange, tracker, watermark, finalizer):
    from kafka import TopicPartition
    cfg = self._config
    tp = TopicPartition(element.topic, element.partition)
    restriction = tracker.current_restriction()
    consumer = self._consumer_at(tp, restriction.start)
    lag_ms = int(cfg.max_out_of_orderness_s * 1000)
    deadline = time.monotonic() + cfg.max_bundle_seconds
    emitted = 0
    last_offset = None
    finished = False
    caught_up = False
    while emitted < cfg.max_records_per_bundle and time.monotonic() < deadline:
      if element.read_until_ms and time.time() * 1000 >= element.read_until_ms:
        tracker.try_claim(UNBOUNDED)  # ends the restriction: nothing more to read
        finished = True
        break
      batch = consumer.poll(timeout_ms=cfg.poll_timeout_ms,
                            max_records=cfg.max_poll_records).get(tp, [])
      for rec in batch:
        if not tracker.try_claim(rec.offset):
          finished = True
          break
        event = Timestamp.of(rec.timestamp / 1000.0)
        wm = watermark.current_watermark() if watermark is not None else None
        if wm is not None and event < wm:  # behind the watermark: would be late
          self._behind.inc()
          event = wm
        yield TimestampedValue(
            KafkaRecord(rec.topic, rec.partition, rec.offset, rec.timestamp, rec.key,
                        rec.value, tuple(rec.headers or ())), event)
        if watermark is not None:
          _set_if_greater(watermark, Timestamp.of((rec.timestamp - lag_ms) / 1000.0))
        last_offset = rec.offset
        emitted += 1
        self._bytes.inc(len(rec.value or b""))
      self._records.inc(len(batch))
      if finished:
        break
      position = consumer.position(tp)
      if position >= restriction.stop:
        # Past the end of a bounded range with nothing left to claim (the
        # offsets in between, if any, are control records or compacted away).
        tracker.try_claim(restriction.stop)
        finished = True
        break
      if not batch:
        hw = consumer.highwater(tp)
        caught_up = hw is not None and position >= hw
        if not restriction.stop == UNBOUNDED:
          continue
        break
    if last_offset is not None and cfg.commit_offsets:
      next_offset = last_offset + 1
      finalizer.register(lambda: self._commit(tp, next_offset))
    if finished:
      return
    if watermark is not None and caught_up and cfg.idle_advance:
      _set_if_greater(watermark, Timestamp.now() - Duration(seconds=cfg.max_out_of_orderness_s))
    tracker.defer_remainder(
        Duration(seconds=cfg.resume_delay_s if (caught_up or emitted == 0) else 0))

  def process(self, element: PartitionRange,
              finalizer=beam.DoFn.BundleFinalizerParam,
              tracker=beam.DoFn.RestrictionParam(_PROVIDER)):
    yield from self._read(element, tracker, None, finalizer)


class _ReadPartitionUnboundedFn(_ReadPartitionFn):
  """The streaming form: unbounded per element, with an event-time watermark."""

  @beam.DoFn.unbounded_per_element()
  def process(self, element: PartitionRange,
              finalizer=beam.DoFn.BundleFinalizerParam,
              tracker=beam.DoFn.RestrictionParam(_PROVIDER),
              watermark=beam.DoFn.WatermarkEstimatorParam(
                  ManualWatermarkEstimator.default_provider())):
    yield from self._read(element, tracker, watermark, finalizer)


class ReadFromKafka(beam.PTransform):
  """Reads a Kafka topic as ``KafkaRecord``s, bounded (backfill) or unbounded.

  Args:
    config: a ``KafkaReadConfig``; validated here, resolved against the
      broker only when the pipeline runs.
  """

  def __init__(self, config: KafkaReadConfig, label: Optional[str] = None):
    super().__init__(label)
    if not isinstance(config, KafkaReadConfig):
      raise TypeError("ReadFromKafka takes a KafkaReadConfig")
    self._config = config

  def expand(self, pbegin):
    fn = _ReadPartitionFn if self._config.bounded else _ReadPartitionUnboundedFn
    return (pbegin
            | "Impulse" >> beam.Impulse()
            | "ResolveOffsetRanges" >> beam.ParDo(_ResolveRangesFn(self._config))
            | "SpreadPartitions" >> beam.Reshuffle()
            | "ReadPartitions" >> beam.ParDo(fn(self._config)))

  def display_data(self):
    c = self._config
    return {
        "bootstrap_servers": c.bootstrap_servers,
        "topic": c.topic,
        "bounded": c.bounded,
        "group_id": c.group_id or "",
        "start": str(c.start_offset if c.start_offset is not None else c.start_time_ms),
        "end": str(c.end_offset if c.end_offset is not None else c.end_time_ms),
    }
