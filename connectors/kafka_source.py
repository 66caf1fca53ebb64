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
import operator
import time
from typing import Iterator, NamedTuple, Optional

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Duration, Timestamp

from tierflow import progress
from tierflow.connectors.batch_coder import BatchCoder
from tierflow.connectors.kafka_offsets import consumer, resolve_ranges, topic_partition
from tierflow.connectors.kafka_read_config import UNBOUNDED, KafkaReadConfig, PartitionRange

__all__ = [
    "KafkaBatch",
    "KafkaReadConfig",
    "KafkaRecord",
    "OffsetsDeleted",
    "PartitionRange",
    "ReadKafkaBatches",
    "batch_name",
]

_LOGGER = logging.getLogger(__name__)
METRICS_NAMESPACE = "tierflow.kafka"
# A consumed message's parts, called over a whole chunk in C (``map``), not per message
# in Python: the read path's per-record cost.
_ERROR, _OFFSET, _TIMESTAMP, _KEY, _VALUE = map(operator.methodcaller, (
    "error", "offset", "timestamp", "key", "value"))
_SECOND = operator.itemgetter(1)  # ``timestamp()`` is (type, milliseconds)


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
    value_bytes: the values' bytes in all (-1: not counted yet; ``batch_coder`` sizes the
      batch by it).
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
  value_bytes: int = -1

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


class OffsetsDeleted(RuntimeError):
  """Offsets to be read were deleted by the broker first: their records are lost."""

  def __init__(self, topic: str, partition: int, start: int, log_start: int):
    super().__init__(
        f"{topic}-{partition}: offsets [{start}, {log_start}) were deleted by the broker "
        f"(retention or DeleteRecords) before they were read; the log now starts at "
        f"{log_start}. Their records are lost to this run: --allow-deleted-offsets skips "
        "them (counted in the run's summary)")
    self.topic, self.partition, self.start, self.log_start = topic, partition, start, log_start


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
    entry[0].assign([topic_partition(topic, partition, offset)])
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
      consumed = c.consume(min(boundary - position, cfg.max_poll_records),
                           timeout=cfg.poll_timeout_ms / 1000.0)
      if consumed and _OFFSET(consumed[-1]) < boundary and not any(map(_ERROR, consumed)):
        chunk = consumed  # the usual case, checked in C: records only, all in the batch
        position = _OFFSET(consumed[-1]) + 1
        consumed = ()
      for m in consumed:
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
        first, last = _OFFSET(chunk[0]), _OFFSET(chunk[-1])
        offsets += (range(first, last + 1) if last - first + 1 == len(chunk)  # no gap
                    else map(_OFFSET, chunk))
        stamps += map(_SECOND, map(_TIMESTAMP, chunk))
        keys += map(_KEY, chunk)
        values += map(_VALUE, chunk)
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
      value_bytes = sum(map(len, filter(None, values)))
      self._emit_counts(offsets, value_bytes, end - start, deleted)
      out = KafkaBatch(topic, partition, start, end, element.start,
                       offsets, stamps, keys, values, element.run_offsets, value_bytes)
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
    log_start, _ = c.get_watermark_offsets(topic_partition(topic, partition), timeout=10)
    if log_start <= position:  # not deleted after all (a truncated leader?): retry there
      c.assign([topic_partition(topic, partition, position)])
      return position
    if not self._config.allow_deleted_offsets:
      raise OffsetsDeleted(topic, partition, position, log_start)
    skipped_to = min(log_start, boundary)
    _LOGGER.warning("%s-%d: offsets [%d, %d) were deleted by the broker before they were "
                    "read; skipped (--allow-deleted-offsets)", topic, partition, position,
                    skipped_to)
    if skipped_to < boundary:
      c.assign([topic_partition(topic, partition, skipped_to)])
    return skipped_to

  def _emit_counts(self, offsets, value_bytes, covered, deleted):
    progress.add(read=len(offsets))
    self._covered.inc(covered)
    self._batches.inc()
    self._records.inc(len(offsets))
    self._bytes.inc(value_bytes)
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
