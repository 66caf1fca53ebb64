"""Reading Kafka with confluent-kafka (librdkafka) from Python, so it runs on every Beam
runner without a Java expansion service.

``ReadKafkaBatches`` expands to::

    Impulse -> _ResolveRangesFn -> Reshuffle -> _ReadPartitionFn (splittable DoFn)

``_ResolveRangesFn`` lists the topic's partitions once and resolves each to an
offset range: the start from an explicit offset, a time
(``offsets_for_times``, refined by scanning), the group's committed offset or
the earliest offset; in bounded mode the stop is the fetch high-watermark seen
at that moment (``ListOffsets(latest)`` can under-report on some brokers).

The splittable DoFn reads one partition per element with ``assign()`` (never a
consumer-group join) and emits **batches**: the records of one partition
between two offsets, in offset order, as one element (``KafkaBatch``). A
bounded read cuts batches at fixed offset boundaries (multiples of
``offsets_per_batch``, and the range's own start and stop), so the same range
always gives the same batches; that is what lets the Parquet sink name files
after them and a re-run replace exactly its own files. A streaming read cuts a
batch at the same boundaries or after ``flush_seconds``, whichever comes first.
A batch covers its offsets *including gaps* (offsets with no record, such as
transaction markers or compacted records), so everything downstream can
account for every offset of the range.

Offsets are not committed here: ``tierflow.connectors.kafka_commit`` commits a
batch's end only after its output is durable. The tracker allows checkpoints
but no dynamic splits, so a partition is read by one reader at a time, in
order.

Unbounded reads report an event-time watermark from record timestamps (less a
configurable out-of-orderness), advance it on idle partitions, and stamp a
batch no earlier than the watermark, counting records that arrived behind it,
so no downstream window ever drops them as late.

Beam's own ``apache_beam.io.kafka.ReadFromKafka`` (Java, cross-language) is the
alternative on Dataflow/Flink when a Java expansion service is available.
"""

from __future__ import annotations

import dataclasses
import logging
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

from tierflow import progress
from tierflow.connectors.batch_coder import BatchCoder
from tierflow.connectors.kafka_client import (check_secret_settings, client_settings, committed,
                                              new_consumer)

__all__ = [
    "KafkaBatch",
    "KafkaReadConfig",
    "KafkaRecord",
    "PartitionRange",
    "ReadKafkaBatches",
    "batch_name",
    "check_broker",
    "committed_offsets",
    "resolve_ranges",
]

_LOGGER = logging.getLogger(__name__)
METRICS_NAMESPACE = "tierflow.kafka"
UNBOUNDED = sys.maxsize
DEFAULT_OFFSETS_PER_BATCH = 25_000


class KafkaRecord(NamedTuple):
  """One Kafka record as read, before decoding."""
  topic: str
  partition: int
  offset: int
  timestamp_ms: int
  key: Optional[bytes]
  value: Optional[bytes]

  @property
  def record_id(self) -> str:
    return f"{self.topic}-{self.partition}-{self.offset}"


@dataclasses.dataclass(frozen=True)
class KafkaBatch:
  """The records of one partition in offsets ``[start, end)``, in offset order.

  Offsets in the range that hold no record (transaction markers, compacted
  records) are gaps: the batch still accounts for them.

  Attributes:
    topic, partition: where the records come from.
    start, end: the offsets the batch covers, end exclusive.
    range_start: where this run's read of the partition began; the commit
      step uses it to know that the first batch follows the group's offset.
    offsets, timestamps, keys, values: one entry per record.
    run_offsets: how many offsets the whole run covers, all partitions (0 for a
      streaming read); a batch's share of the run is ``(end - start) / run_offsets``.
  """
  topic: str
  partition: int
  start: int
  end: int
  range_start: int
  offsets: list
  timestamps: list
  keys: list
  values: list
  run_offsets: int = 0

  def __len__(self) -> int:
    return len(self.offsets)

  @property
  def name(self) -> str:
    """``<topic>-<partition>-<start>-<last>``: what files holding the batch are named after."""
    return batch_name(self.topic, self.partition, self.start, self.end)

  def records(self) -> Iterator[KafkaRecord]:
    for o, t, k, v in zip(self.offsets, self.timestamps, self.keys, self.values):
      yield KafkaRecord(self.topic, self.partition, o, t, k, v)


beam.coders.registry.register_coder(KafkaBatch, BatchCoder)  # sized without pickling


def batch_name(topic: str, partition: int, start: int, end: int) -> str:
  """The name of the batch covering offsets [start, end) of a partition (sorts by offset)."""
  return f"{topic}-{partition:04d}-{start:020d}-{end - 1:020d}"


class PartitionRange(NamedTuple):
  """A resolved read of one partition: offsets [start, stop)."""
  topic: str
  partition: int
  start: int
  stop: int
  read_until_ms: int = 0  # stop an unbounded read at this wall-clock time; 0 = never
  run_offsets: int = 0  # offsets of the whole run, all partitions (0: unbounded)

  @property
  def bounded(self) -> bool:
    return self.stop != UNBOUNDED


def _parse_offsets(value: int | str | Mapping[int, int] | None) -> int | dict[int, int] | None:
  """An offset for every partition (``100``) or per partition (``"0:100,1:250"``)."""
  if value is None:
    return None
  if isinstance(value, bool):
    raise ValueError(f"offset {value!r} is not a number")
  if isinstance(value, int):
    out: int | dict[int, int] = value
  elif isinstance(value, Mapping):
    out = {int(k): int(v) for k, v in value.items()}
  else:
    text = str(value).strip()
    try:
      if ":" not in text:
        out = int(text)
      else:
        out = {}
        for part in text.split(","):
          p, _, off = part.partition(":")
          out[int(p)] = int(off)
    except ValueError:
      raise ValueError(f"offset {value!r} is not N or P:N,P:N") from None
  values = out.values() if isinstance(out, dict) else [out]
  keys = out.keys() if isinstance(out, dict) else []
  if any(v < 0 for v in values) or any(k < 0 for k in keys):
    raise ValueError(f"offsets and partitions must be >= 0, got {value!r}")
  return out


def _offset_pairs(start, end) -> list[tuple[str, int, int]]:
  """(partition label, start, end) wherever both bounds name the same partitions."""
  if start is None or end is None:
    return []
  if isinstance(start, int) and isinstance(end, int):
    return [("every partition", start, end)]
  s = start if isinstance(start, dict) else None
  e = end if isinstance(end, dict) else None
  parts = set(s or ()) | set(e or ())
  return [(f"partition {p}", (s or {}).get(p, start if s is None else None),
           (e or {}).get(p, end if e is None else None)) for p in sorted(parts)]


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
    group_id: consumer group whose committed offsets are the default start.
    commit_offsets: whether the pipeline commits (see ``kafka_commit``).
    consumer_config: extra Kafka client settings (TLS, SASL, ...) in librdkafka or
      kafka-python spelling (``kafka_client.client_settings``).
    offsets_per_batch: batch (and so file) boundaries fall on multiples of it.
    flush_seconds: a streaming batch is emitted after this long even if not full.
    max_out_of_orderness_s: how far behind the newest record timestamp the
      watermark stays in streaming reads.
    idle_advance: advance the watermark to now minus the out-of-orderness when
      a partition is caught up, so idle partitions do not hold it back.
    stall_timeout_s: a bounded read that gets no data for this long fails
      (broker gone) instead of waiting forever.
    allow_deleted_offsets: offsets the broker deleted (retention, DeleteRecords)
      before they were read fail the read with ``OffsetsDeleted`` (default), or are
      skipped and counted (``offsets_deleted``) when True.
    skip_written: an output directory: offsets its ``_progress`` index holds as written
      are skipped (counted as ``offsets_already_written``), and a range a failed write
      left unfinished is read again exactly as it was cut.
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
  offsets_per_batch: int = DEFAULT_OFFSETS_PER_BATCH
  flush_seconds: float = 10.0
  poll_timeout_ms: int = 500
  max_poll_records: int = 10_000
  max_out_of_orderness_s: float = 5.0
  idle_advance: bool = True
  resume_delay_s: float = 1.0
  max_read_seconds: Optional[float] = None
  stall_timeout_s: float = 120.0
  allow_deleted_offsets: bool = False
  # The output whose ``_progress`` index (``written_ranges``) says what is already
  # durable: offsets written there are skipped, so a replay or re-run after a failure
  # neither writes nor routes (and pays for) them again. None reads everything.
  skip_written: Optional[str] = None
  # A bounded read hands the rest of its range back to the runner after each batch (a
  # checkpoint). FnApiRunner with several workers drops such deferred work
  # (apache/beam#19842): there the launcher sets this False and a partition's range is
  # read in one call, batch after batch.
  checkpoint_between_batches: bool = True

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
    for where, start, end in _offset_pairs(self.start_offset, self.end_offset):
      if start is not None and end is not None and start > end:
        raise ValueError(f"start offset {start} is after end offset {end} ({where})")
    if (self.start_time_ms is not None and self.end_time_ms is not None
        and self.end_time_ms < self.start_time_ms):
      raise ValueError("end time is before start time")
    if self.max_read_seconds is not None and self.max_read_seconds <= 0:
      raise ValueError("max_read_seconds must be positive")
    if not (isinstance(self.offsets_per_batch, int) and self.offsets_per_batch >= 1):
      raise ValueError(f"offsets_per_batch must be >= 1, got {self.offsets_per_batch!r}")
    if not self.flush_seconds > 0:
      raise ValueError("flush_seconds must be positive")
    if self.commit_offsets and not self.group_id:
      object.__setattr__(self, "commit_offsets", False)
    check_secret_settings(self.consumer_config)
    client_settings(self.consumer_config)  # unknown or reserved names fail here


class OffsetsDeleted(RuntimeError):
  """Offsets to be read were deleted by the broker first: their records are lost."""

  def __init__(self, topic: str, partition: int, start: int, log_start: int):
    super().__init__(
        f"{topic}-{partition}: offsets [{start}, {log_start}) were deleted by the broker "
        f"(retention or DeleteRecords) before they were read; the log now starts at "
        f"{log_start}. Their records are lost to this run: --allow-deleted-offsets skips "
        "them (counted in the run's summary)")
    self.topic, self.partition, self.start, self.log_start = topic, partition, start, log_start


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


def _tp(topic: str, partition: int, offset: int = -1001):
  from confluent_kafka import TopicPartition
  return TopicPartition(topic, partition, offset)


def committed_offsets(config: KafkaReadConfig) -> dict[int, Optional[int]]:
  """The group's committed offset per partition of the topic (None where nothing is committed)."""
  c = consumer(config, group=True)
  try:
    partitions = sorted(c.list_topics(config.topic, timeout=10).topics[config.topic].partitions)
    found = committed(c, [_tp(config.topic, p) for p in partitions])
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
      [_tp(topic, p, OFFSET_BEGINNING) for p in partitions], timeout=timeout_s)}
  hints = {tp.partition: tp.offset for tp in c.offsets_for_times(
      [_tp(topic, p, OFFSET_END) for p in partitions], timeout=timeout_s)}
  c.assign([_tp(topic, p, max(begins[p], hints[p] - 1)) for p in partitions])
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
    _, hw = c.get_watermark_offsets(_tp(topic, p), cached=True)
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
  [found] = c.offsets_for_times([_tp(topic, partition, time_ms)], timeout=10)
  if found.offset < 0:
    return highwater
  c.assign([_tp(topic, partition, found.offset)])
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
          c, [_tp(config.topic, p) for p in partitions]) if tp.offset >= 0}
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


class _ResolveRangesFn(beam.DoFn):
  def __init__(self, config: KafkaReadConfig):
    self._config = config

  def process(self, unused_impulse) -> Iterator[PartitionRange]:
    ranges = resolve_ranges(self._config)
    if self._config.bounded:  # what the run must cover (the launcher checks it did)
      Metrics.counter(METRICS_NAMESPACE, "offsets_in_range").inc(
          sum(r.stop - r.start for r in ranges))
    for r in ranges:
      _LOGGER.info("kafka read %s-%d offsets [%d, %s)", r.topic, r.partition, r.start,
                   r.stop if r.bounded else "unbounded")
      yield r


class _InOrderOffsetTracker(OffsetRestrictionTracker):
  """Allows checkpoints (residual = the unread tail) but no dynamic splits.

  A partition is then read by one reader at a time, in offset order, so batch
  boundaries stay deterministic and commits only ever follow durable output.
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
# What the consumer of the partition being read prefetches: enough to keep it busy
# (librdkafka's defaults are 100,000 messages or 64 MiB).
_READ_QUEUE = {"queued.min.messages": 50_000, "queued.max.messages.kbytes": 32 * 1024,
               "max.partition.fetch.bytes": 8 * 1024 * 1024}


def next_boundary(offset: int, offsets_per_batch: int) -> int:
  """The first batch boundary after ``offset``."""
  return (offset // offsets_per_batch + 1) * offsets_per_batch


class _ReadPartitionFn(beam.DoFn):
  """Reads one partition's offset range as batches (a splittable DoFn, bounded form)."""

  def __init__(self, config: KafkaReadConfig):
    self._config = config
    self._records = Metrics.counter(METRICS_NAMESPACE, "records_read")
    self._bytes = Metrics.counter(METRICS_NAMESPACE, "bytes_read")
    self._batches = Metrics.counter(METRICS_NAMESPACE, "batches_read")
    self._gaps = Metrics.counter(METRICS_NAMESPACE, "offset_gaps")
    self._behind = Metrics.counter(METRICS_NAMESPACE, "records_behind_watermark")
    self._errors = Metrics.counter(METRICS_NAMESPACE, "fetch_errors")
    self._deleted = Metrics.counter(METRICS_NAMESPACE, "offsets_deleted")
    self._covered = Metrics.counter(METRICS_NAMESPACE, "offsets_covered")
    self._already = Metrics.counter(METRICS_NAMESPACE, "offsets_already_written")

  def setup(self):
    self._consumers: dict = {}  # (topic, partition) -> [consumer, next offset it will return]
    progress.ensure_worker_reporter()

  def teardown(self):
    for c, _ in list(getattr(self, "_consumers", {}).values()):
      c.close()
    self._consumers = {}

  def _consumer_at(self, topic: str, partition: int, offset: int):
    """The partition's consumer, assigned at ``offset``. Between calls a partition is
    unassigned, so librdkafka holds no prefetched records for partitions not being read."""
    entry = self._consumers.get((topic, partition))
    if entry is None:
      entry = self._consumers[(topic, partition)] = [
          consumer(self._config, **_READ_QUEUE, **{"auto.offset.reset": "error"}), None]
    entry[0].assign([_tp(topic, partition, offset)])
    entry[1] = offset
    return entry

  def _read(self, element: PartitionRange, tracker, watermark):
    start = tracker.current_restriction().start
    written = self._written(element)
    while True:
      start = self._past_written(element, tracker, start, written)
      if start is None:
        return
      start = yield from self._read_batch(element, tracker, watermark, start, written)
      if start is None:
        return
      if self._config.checkpoint_between_batches or not element.bounded:
        tracker.defer_remainder(Duration(seconds=0))
        return

  def _written(self, element: PartitionRange) -> list:
    """The output's markers for the partition (``written_ranges``); [] when not skipping."""
    if not self._config.skip_written:
      return []
    from tierflow.connectors.written_ranges import WrittenRanges
    return WrittenRanges(self._config.skip_written).entries(element.topic, element.partition)

  def _past_written(self, element: PartitionRange, tracker, start: int, written: list
                    ) -> Optional[int]:
    """Claims the offsets from ``start`` on that the output already holds; returns where
    reading goes on (None: nothing left, or the runner took the rest)."""
    from tierflow.connectors.written_ranges import WrittenRanges, contiguous_end
    stop = tracker.current_restriction().stop
    end = min(contiguous_end(WrittenRanges.done(written), start), stop)
    if end > start:
      if not tracker.try_claim(end - 1):
        return None
      self._covered.inc(end - start)
      self._already.inc(end - start)
      _LOGGER.info("%s-%d: offsets [%d, %d) are already in the output; skipped",
                   element.topic, element.partition, start, end)
    return end if end < stop else None

  def _read_batch(self, element: PartitionRange, tracker, watermark, start: int,
                  written: list = ()):
    """Reads and yields one batch from ``start``; returns where the next batch starts
    when the rest of the range is to be read now, else None (done, split, or deferred).

    The batch ends before the next range the output has a marker for; a range a failed
    write left unfinished (``.writing``) is read again as exactly that range, whatever
    the time, so its files are replaced under the same names."""
    from confluent_kafka import KafkaError
    cfg = self._config
    topic, partition = element.topic, element.partition
    restriction = tracker.current_restriction()
    if start >= restriction.stop:
      return None
    bounded = restriction.stop != UNBOUNDED
    boundary = min(restriction.stop, next_boundary(start, cfg.offsets_per_batch))
    exact = False  # re-reading an unfinished write's range: cut exactly where it was
    for marker in written:
      if marker.start == start and marker.state == "writing":
        boundary, exact = min(restriction.stop, marker.end), True
        break
      if marker.start > start:
        boundary = min(boundary, marker.start)
        break
    entry = self._consumer_at(topic, partition, start)
    c = entry[0]
    offsets, stamps, keys, values = [], [], [], []
    lag_ms = int(cfg.max_out_of_orderness_s * 1000)
    flush_at = stalled_since = time.monotonic()
    flush_at += cfg.flush_seconds
    position = start  # the next offset to read; everything before it is in this batch
    split = False  # the runner took the rest of the restriction (a checkpoint)
    idle = False  # streaming: caught up with nothing read in this call
    expired = False
    caught_up = False
    deleted = 0  # offsets skipped because the broker deleted them (allow_deleted_offsets)
    while position < boundary:
      if element.read_until_ms and time.time() * 1000 >= element.read_until_ms:
        expired = True
        break
      got = 0
      chunk = []  # this consume's records of the batch, claimed together after it
      for m in c.consume(min(boundary - position, cfg.max_poll_records),
                         timeout=cfg.poll_timeout_ms / 1000.0):
        error = m.error()
        if error is not None:
          if error.code() == KafkaError._PARTITION_EOF:
            caught_up = True
            # Past the last record there may only be gaps (e.g. a transaction marker).
            position = max(position, min(m.offset(), boundary))
          elif error.code() == KafkaError._AUTO_OFFSET_RESET:
            # The position is out of range: deleted below the log's start.
            skipped_to = self._skip_deleted(c, topic, partition, position, boundary)
            deleted += skipped_to - position
            position = skipped_to
            break
          else:
            self._errors.inc()
            _LOGGER.warning("%s-%d: fetch error %s", topic, partition, error.str())
          continue
        offset = m.offset()
        if offset >= boundary:  # past a gap: belongs to the next batch
          position = boundary
          break
        chunk.append(m)
        position = offset + 1
      if chunk:
        last = chunk[-1].offset()
        if not tracker.try_claim(last):
          # The runner split the restriction below ``last``: what is before its new stop
          # is still this element's (a claim fails only at or past the stop), the rest not.
          split = True
          stop = tracker.current_restriction().stop
          chunk = [m for m in chunk if m.offset() < stop]
        caught_up = False
        offsets += [m.offset() for m in chunk]
        stamps += [m.timestamp()[1] for m in chunk]
        keys += [m.key() for m in chunk]
        values += [m.value() for m in chunk]
        got = len(chunk)
      if split:
        break
      if got:
        stalled_since = time.monotonic()
      if bounded or exact:
        if not got and position < boundary and (
            time.monotonic() - stalled_since > cfg.stall_timeout_s):
          raise RuntimeError(
              f"{topic}-{partition}: no data for {cfg.stall_timeout_s:.0f}s at offset "
              f"{position} before the range's stop {restriction.stop} (broker down or "
              f"unreachable, or the log truncated?)")
        continue
      if time.monotonic() >= flush_at:
        break
      if caught_up and not offsets:
        idle = True
        break
    c.unassign()  # frees the prefetched records until this partition is read again
    # The batch covers [start, end): every offset read, gaps included.
    end = (tracker.current_restriction().stop if split else position)
    if not split and end - 1 > (offsets[-1] if offsets else start - 1):
      if not tracker.try_claim(end - 1):  # the tail of the batch was gaps
        end = offsets[-1] + 1 if offsets else start
    if end > start:
      self._emit_counts(offsets, values, end - start, deleted)
      out = KafkaBatch(topic, partition, start, end, element.start,
                       offsets, stamps, keys, values, element.run_offsets)
      yield out if watermark is None else self._stamped(out, watermark, lag_ms)
    if expired:
      tracker.try_claim(UNBOUNDED)  # ends the restriction: nothing more to read
      return None
    if split or end >= restriction.stop:
      return None
    if watermark is not None and idle and cfg.idle_advance:
      _set_if_greater(watermark, Timestamp.now() - Duration(seconds=cfg.max_out_of_orderness_s))
    if idle:
      tracker.defer_remainder(Duration(seconds=cfg.resume_delay_s))
      return None
    return end

  def _skip_deleted(self, c, topic: str, partition: int, position: int, boundary: int) -> int:
    """Offsets from ``position`` were deleted: raises ``OffsetsDeleted``, or (allowed)
    counts them and goes on at the log's start; returns the new position."""
    log_start, _ = c.get_watermark_offsets(_tp(topic, partition), timeout=10)
    if log_start <= position:  # not deleted after all (a truncated leader?): retry there
      c.assign([_tp(topic, partition, position)])
      return position
    if not self._config.allow_deleted_offsets:
      raise OffsetsDeleted(topic, partition, position, log_start)
    skipped_to = min(log_start, boundary)
    _LOGGER.warning("%s-%d: offsets [%d, %d) were deleted by the broker before they were "
                    "read; skipped (--allow-deleted-offsets)", topic, partition, position,
                    skipped_to)
    if skipped_to < boundary:
      c.assign([_tp(topic, partition, skipped_to)])
    return skipped_to

  def _emit_counts(self, offsets, values, covered, deleted):
    progress.add(read=len(offsets))
    self._covered.inc(covered)
    self._batches.inc()
    self._records.inc(len(offsets))
    self._bytes.inc(sum(len(v) for v in values if v))
    if deleted:
      self._deleted.inc(deleted)
    if covered > len(offsets) + deleted:
      self._gaps.inc(covered - len(offsets) - deleted)

  def _stamped(self, batch: KafkaBatch, watermark, lag_ms: int):
    """The batch stamped at its earliest record time, never behind the watermark."""
    wm = watermark.current_watermark()
    earliest = Timestamp.of(min(batch.timestamps) / 1000.0) if batch.timestamps else None
    ts = earliest if earliest is not None else (wm or Timestamp.now())
    if wm is not None and ts < wm:
      self._behind.inc(sum(1 for t in batch.timestamps if Timestamp.of(t / 1000.0) < wm))
      ts = wm
    if batch.timestamps:
      _set_if_greater(watermark, Timestamp.of((max(batch.timestamps) - lag_ms) / 1000.0))
    return TimestampedValue(batch, ts)

  def process(self, element: PartitionRange,
              tracker=beam.DoFn.RestrictionParam(_PROVIDER)):
    yield from self._read(element, tracker, None)


class _ReadPartitionUnboundedFn(_ReadPartitionFn):
  """The streaming form: unbounded per element, with an event-time watermark."""

  @beam.DoFn.unbounded_per_element()
  def process(self, element: PartitionRange,
              tracker=beam.DoFn.RestrictionParam(_PROVIDER),
              watermark=beam.DoFn.WatermarkEstimatorParam(
                  ManualWatermarkEstimator.default_provider())):
    yield from self._read(element, tracker, watermark)


class ReadKafkaBatches(beam.PTransform):
  """Reads a Kafka topic as ``KafkaBatch``es, bounded (backfill) or unbounded.

  Named so it does not shadow Beam's own ``apache_beam.io.kafka.ReadFromKafka``.

  Args:
    config: a ``KafkaReadConfig``; validated here, resolved against the
      broker only when the pipeline runs.
  """

  def __init__(self, config: KafkaReadConfig, label: Optional[str] = None):
    super().__init__(label)
    if not isinstance(config, KafkaReadConfig):
      raise TypeError("ReadKafkaBatches takes a KafkaReadConfig")
    self._config = config

  def expand(self, pbegin):
    fn = _ReadPartitionFn if self._config.bounded else _ReadPartitionUnboundedFn
    return (pbegin
            | "Impulse" >> beam.Impulse()
            | "ResolveOffsetRanges" >> beam.ParDo(_ResolveRangesFn(self._config))
            | "SpreadPartitions" >> beam.Reshuffle()
            | "ReadPartitions" >> beam.ParDo(fn(self._config)).with_output_types(KafkaBatch))

  def display_data(self):
    c = self._config
    return {
        "bootstrap_servers": c.bootstrap_servers,
        "topic": c.topic,
        "bounded": c.bounded,
        "group_id": c.group_id or "",
        "offsets_per_batch": c.offsets_per_batch,
        "start": str(c.start_offset if c.start_offset is not None else c.start_time_ms),
        "end": str(c.end_offset if c.end_offset is not None else c.end_time_ms),
    }
