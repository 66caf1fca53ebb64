"""The coder of whole batches (``KafkaBatch``, ``DecodedBatch``) between steps.

Encoded as Beam's default coder encodes an unknown type (pickle), but sized from the
batch's buffers. Beam samples the size of the elements each step outputs, the first
ten always and then a few more: with batches of 25,000 records every one of them was
sampled, and Beam's default sizes an element by pickling it whole (9-12% of a
passthrough's CPU past 300k records, in py-spy, in a step that writes nothing).
"""

from __future__ import annotations

import pickle
from typing import Any

import apache_beam as beam

__all__ = ["BatchCoder", "estimated_bytes"]


def estimated_bytes(batch: Any) -> int:
  """About what a batch holds in bytes: its Arrow tables' buffers (``DecodedBatch``), or
  its keys and values plus 16 bytes a record (``KafkaBatch``, its values counted once, as
  read)."""
  rows = getattr(batch, "rows", None)
  if rows is not None:
    return rows.nbytes + batch.dead_letters.nbytes
  values, keys = batch.values, batch.keys
  value_bytes = getattr(batch, "value_bytes", -1)
  if value_bytes < 0:
    value_bytes = sum(map(len, filter(None, values)))
  return value_bytes + sum(map(len, filter(None, keys))) + 16 * len(values)


class BatchCoder(beam.coders.Coder):
  """Pickles a batch; estimates its size without encoding it."""

  def __init__(self, batch_type: Any = Any):
    self._type = batch_type

  @classmethod
  def from_type_hint(cls, typehint: Any, registry: Any) -> "BatchCoder":
    return cls(typehint)

  def to_type_hint(self) -> Any:
    return self._type

  def encode(self, value: Any) -> bytes:
    return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)

  def decode(self, encoded: bytes) -> Any:
    return pickle.loads(encoded)

  def estimate_size(self, value: Any) -> int:
    return estimated_bytes(value)

  def is_deterministic(self) -> bool:
    return False

  def __eq__(self, other: object) -> bool:
    return type(self) is type(other) and self._type == other._type

  def __hash__(self) -> int:
    return hash((type(self), self._type))
