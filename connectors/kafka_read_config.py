"""What a Kafka read covers: the topic, the bounds (offsets or times), the group, the client
settings and how the range is cut into batches (``KafkaReadConfig``), and a partition's
resolved range (``PartitionRange``)."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Mapping, NamedTuple, Optional

from tierflow.connectors.kafka_client import check_secret_settings, client_settings

__all__ = ["DEFAULT_OFFSETS_PER_BATCH", "KafkaReadConfig", "PartitionRange", "UNBOUNDED"]

UNBOUNDED = sys.maxsize
DEFAULT_OFFSETS_PER_BATCH = 25_000


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
