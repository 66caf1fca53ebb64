"""Committing consumer-group offsets only past output that is durable.

``CommitOffsets`` follows the sink (``WriteBatches``): it receives a
``WrittenBatch`` only once all of that batch's files (results and dead
letters) are renamed into place, and commits, per partition, the highest
offset below which every offset of the run's range is accounted for. A batch
covers every offset of its range, gaps such as transaction markers included,
so "accounted for" means: its batch and every batch before it were written.

It is an ordinary DoFn, not bundle finalization, so it works the same on
every runner (Flink batch does not support bundle finalization, Beam #19526).
A batch's end is committed when the batch starts where the group's committed
offset is, or where this run's read of the partition started; a batch that
arrives ahead of its predecessor waits (in this worker) until the predecessor
is committed. The group's position therefore never passes a batch that was
not written, whatever the order in which a runner delivers batches, and a
write that fails or is killed never commits. A commit that fails raises, so
the bundle fails instead of the run ending as if its progress were saved.
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
from tierflow.connectors.kafka_source import KafkaReadConfig, consumer

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
  pending: dict = dataclasses.field(default_factory=dict)  # written batches: start -> end


# Per process, per run and partition: DoFn instances on several threads of one
# worker share it.
_STATES: dict = {}
_STATES_LOCK = threading.Lock()


def _state(run_id: str, topic: str, partition: int) -> _PartitionState:
  with _STATES_LOCK:
    return _STATES.setdefault((run_id, topic, partition), _PartitionState())


class _CommitFn(beam.DoFn):
  def __init__(self, config: KafkaReadConfig, run_id: str, timeout_s: float = 60.0):
    self._config = config
    self._run_id = run_id
    self._timeout_s = timeout_s
    self._commits = Metrics.counter(METRICS_NAMESPACE, "offset_commits")
    self._waiting = Metrics.counter(METRICS_NAMESPACE, "batches_waiting_for_predecessor")

  def setup(self):
    self._consumer = None

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

  def process(self, written):
    ref = written.ref
    state = _state(self._run_id, ref.topic, ref.partition)
    with state.lock:
      state.pending[ref.start] = ref.end
      start = self._chain_start(state, ref)
      if start is None:
        self._waiting.inc()
        _LOGGER.debug("batch %s waits for its predecessor before it is committed", ref.name)
        return
      end = start
      while end in state.pending:
        end = state.pending.pop(end)
      self._commit(ref.topic, ref.partition, end)
      state.head = state.own = end
      self._commits.inc()
    yield Committed(ref.topic, ref.partition, end)

  def _chain_start(self, state: _PartitionState, ref) -> Optional[int]:
    """Where the run may commit from: its own start (first commit only), or the group's
    offset. Later commits never move the group back, whatever a runner re-delivers."""
    if state.own is None and ref.range_start in state.pending:
      return ref.range_start
    if state.head not in state.pending:
      state.head = self._read_committed(ref.topic, ref.partition)
    return state.head if state.head in state.pending else None


class CommitOffsets(beam.PTransform):
  """Commits consumer-group offsets past written batches (see the module docstring).

  Input: ``WrittenBatch``es (or anything with a ``ref`` ``BatchRef``).
  Output: a ``Committed`` per commit.

  Args:
    config: the read's ``KafkaReadConfig`` (brokers, group id, client settings).
  """

  def __init__(self, config: KafkaReadConfig):
    super().__init__()
    if not isinstance(config, KafkaReadConfig):
      raise TypeError("CommitOffsets takes the read's KafkaReadConfig")
    if not config.group_id:
      raise ValueError("committing offsets needs a group id")
    self._config = config
    self._run_id = uuid.uuid4().hex

  def expand(self, written):
    return written | "Commit" >> beam.ParDo(_CommitFn(self._config, self._run_id))

  def display_data(self):
    return {"group_id": self._config.group_id, "topic": self._config.topic}
