"""Committing consumer-group offsets only past output that is durable.

``CommitOffsets`` follows the sink (``WriteBatches``): it receives a
``WrittenBatch`` only once all of that batch's files (results and dead
letters) are renamed into place, and commits, per partition, the end of the
contiguous written prefix: the highest offset below which every offset from
the group's position on is written. A batch covers every offset of its range,
gaps such as transaction markers included.

What is written comes from the output itself when the transform is given it:
the ``_progress`` index (``written_ranges``) holds every range any attempt,
process or earlier run made durable, so batches a replay cut differently after
a failure (overlapping ranges) and batches another worker wrote both count, and
nothing in memory grows with the number of batches. Without an output, the
ranges this worker wrote are kept as merged intervals.

The chain starts at the group's committed offset, or, for a first commit, where
this run's read of the partition began. The group's position therefore never
passes a batch that was not written, whatever order a runner delivers batches
in, and it never moves back. It is an ordinary DoFn, not bundle finalization, so
it works the same on every runner (Flink batch does not support bundle
finalization, Beam #19526). A commit that fails raises, so the bundle fails
instead of the run ending as if its progress were saved.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from typing import NamedTuple, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from tierflow.connectors.kafka_client import committed, retrying
from tierflow.connectors.kafka_offsets import consumer
from tierflow.connectors.kafka_read_config import KafkaReadConfig
from tierflow.connectors.written_ranges import WrittenRanges, contiguous_end, merge

__all__ = ["CommitOffsets", "Committed"]

_LOGGER = logging.getLogger(__name__)
METRICS_NAMESPACE = "tierflow.kafka"


class Committed(NamedTuple):
  """The group's offset for a partition after a commit (the next offset to read)."""
  topic: str
  partition: int
  offset: int


@dataclasses.dataclass
class _PartitionState:
  lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
  head: Optional[int] = None  # the group's offset as last committed or read back
  own: Optional[int] = None  # what this run last committed
  written: list = dataclasses.field(default_factory=list)  # merged ranges (no output given)


# Per process, per run and partition: DoFn instances on several threads of one
# worker share it.
_STATES: dict = {}
_STATES_LOCK = threading.Lock()


def _state(run_id: str, topic: str, partition: int) -> _PartitionState:
  with _STATES_LOCK:
    return _STATES.setdefault((run_id, topic, partition), _PartitionState())


class _CommitFn(beam.DoFn):
  def __init__(self, config: KafkaReadConfig, run_id: str, output: Optional[str] = None,
               timeout_s: float = 60.0):
    self._config = config
    self._run_id = run_id
    self._output = output
    self._timeout_s = timeout_s
    self._commits = Metrics.counter(METRICS_NAMESPACE, "offset_commits")
    self._waiting = Metrics.counter(METRICS_NAMESPACE, "batches_waiting_for_predecessor")

  def setup(self):
    self._consumer = None
    self._index = WrittenRanges(self._output) if self._output else None

  def teardown(self):
    if self._consumer is not None:
      self._consumer.close()
      self._consumer = None

  def _group(self):
    if self._consumer is None:
      self._consumer = consumer(self._config, group=True)
    return self._consumer

  def _read_committed(self, topic: str, partition: int) -> Optional[int]:
    from confluent_kafka import TopicPartition
    [found] = committed(self._group(), [TopicPartition(topic, partition)])
    return found.offset if found.offset >= 0 else None

  def _commit(self, topic: str, partition: int, offset: int) -> None:
    """Commits, riding out retriable errors (a broker restarting, a coordinator moving) for
    up to a minute; anything else, or longer, raises."""
    from confluent_kafka import TopicPartition

    def commit():
      result = self._group().commit(offsets=[TopicPartition(topic, partition, offset)],
                                    asynchronous=False)
      errors = [tp.error for tp in result or () if tp.error is not None]
      if errors:
        from confluent_kafka import KafkaException
        raise KafkaException(errors[0])

    try:
      retrying(commit, f"committing {topic}-{partition} at {offset}", self._timeout_s)
    except Exception as e:  # noqa: BLE001 - one clear error
      raise RuntimeError(
          f"committing {topic}-{partition} at {offset} for group {self._config.group_id} "
          f"failed: {type(e).__name__}: {e}; the written files stay, and the next run "
          "re-reads from the last commit") from e

  def _written(self, state: _PartitionState, ref) -> list:
    """The partition's written ranges: the output's index, else this worker's own."""
    if self._index is not None:
      return WrittenRanges.done(self._index.entries(ref.topic, ref.partition))
    state.written = merge([*state.written, (ref.start, ref.end)])
    return state.written

  def process(self, written):
    ref = written.ref
    state = _state(self._run_id, ref.topic, ref.partition)
    with state.lock:
      ranges = self._written(state, ref)
      if state.own is None and ref.start == ref.range_start:
        # This run's first batch of the partition: the chain starts where the run began
        # (the group's offset, or an explicit range's start under --commit-offsets always).
        start = ref.range_start
      else:
        start = state.head
        if start is None or contiguous_end(ranges, start) == start:
          start = state.head = self._read_committed(ref.topic, ref.partition)
        if start is None:  # nothing committed yet: the chain starts where this run began
          start = ref.range_start
      end = contiguous_end(ranges, start)
      if end <= start:
        self._waiting.inc()
        _LOGGER.debug("batch %s waits for its predecessor before it is committed", ref.name)
        return
      self._commit(ref.topic, ref.partition, end)
      state.head = state.own = end
      # Ranges wholly behind the group's position are no longer needed here.
      state.written = [(s, e) for s, e in state.written if e > end]
      self._commits.inc()
    yield Committed(ref.topic, ref.partition, end)


class CommitOffsets(beam.PTransform):
  """Commits consumer-group offsets past written batches (see the module docstring).

  Input: ``WrittenBatch``es (or anything with a ``ref`` ``BatchRef``).
  Output: a ``Committed`` per commit.

  Args:
    config: the read's ``KafkaReadConfig`` (brokers, group id, client settings).
    output: the output ``WriteBatches`` writes to; its ``_progress`` index is what is
      durable (default: the read's ``skip_written``). Without one, the ranges this
      worker wrote are what counts.
  """

  def __init__(self, config: KafkaReadConfig, output: Optional[str] = None):
    super().__init__()
    if not isinstance(config, KafkaReadConfig):
      raise TypeError("CommitOffsets takes the read's KafkaReadConfig")
    if not config.group_id:
      raise ValueError("committing offsets needs a group id")
    self._config = config
    self._output = output or config.skip_written
    self._run_id = uuid.uuid4().hex

  def expand(self, written):
    return written | "Commit" >> beam.ParDo(_CommitFn(self._config, self._run_id,
                                                      self._output))

  def display_data(self):
    return {"group_id": self._config.group_id, "topic": self._config.topic}
