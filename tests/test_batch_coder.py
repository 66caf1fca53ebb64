"""Whole batches between steps: Beam sizes the elements each step outputs by sampling;
a batch is sized from its buffers, never by pickling it whole (it was, for every batch)."""

from __future__ import annotations

import json
import pickle

import pytest

from tierflow.connectors.batch_coder import BatchCoder, estimated_bytes
from tierflow.connectors.decode import DecodedBatch
from tierflow.connectors.kafka_source import KafkaBatch


def test_a_passthrough_pickles_no_batch(broker, topic, produce, make_tickets, tmp_path,
                                        passthrough, monkeypatch):
  name = topic(partitions=2)
  produce(name, [{"value": json.dumps(t).encode()} for t in make_tickets(400)])
  pickled = []
  real = pickle.dumps

  def watching(obj, *a, **kw):
    if isinstance(obj, (KafkaBatch, DecodedBatch)):
      pickled.append(type(obj).__name__)
    return real(obj, *a, **kw)

  monkeypatch.setattr(pickle, "dumps", watching)
  summary = passthrough(name, str(tmp_path / "out"), "--start-offset", "0",
                        "--rows-per-file", "50")
  assert summary.rows_written == 400
  assert pickled == []


def test_the_estimate_is_near_the_encoded_size(make_tickets):
  from tierflow.connectors.kafka_source import KafkaBatch
  values = [json.dumps(t).encode() for t in make_tickets(2000)]
  batch = KafkaBatch("t", 0, 0, 2000, 0, list(range(2000)), [0] * 2000, [None] * 2000, values)
  coder = BatchCoder()
  encoded = len(coder.encode(batch))
  assert 0.5 * encoded < estimated_bytes(batch) < 2 * encoded
  assert coder.decode(coder.encode(batch)) == batch


@pytest.mark.parametrize("cls", [KafkaBatch, DecodedBatch])
def test_beam_gives_batches_the_coder(cls):
  import apache_beam as beam
  assert isinstance(beam.coders.registry.get_coder(cls), BatchCoder)
