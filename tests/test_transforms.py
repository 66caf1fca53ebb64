"""tierflow's transforms alone, in TestPipelines (no broker): RouteThroughTiers, RouteBatches."""

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from tierflow import schemas
from tierflow import transforms as tf
from tierflow.connectors.decode import decode_batch
from tierflow_local.provider_server import LocalProviderServer
from tierflow_local.standin_model import KeywordStandIn

T0_MS = 1_767_225_600_000
TICKET = schemas.load("ticket")


@pytest.fixture
def server():
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier")) as s:
    yield s


def config_for(server):
  return (tf.load_config("tickets")
          .with_model("small", model="small", base_url=server.openai_base_url, api_key_env=None,
                      price_as="gpt-5-nano", batch_size=4)
          .with_model("frontier", provider="anthropic", model="frontier", api_key_env=None,
                      base_url=server.anthropic_base_url, price_as="claude-sonnet-4-6"))


def rows(n):
  decode = tf.DecodeRecords(tf.make_codec("json", TICKET))
  codec = tf.make_codec("json", TICKET)
  batch = tf.KafkaBatch("tickets", 0, 0, n, 0, list(range(n)), [T0_MS] * n, [None] * n, [
      codec.encode({"ticket_id": f"T{i}", "created_at": T0_MS + i, "subject": "help",
                    "body": f"I was charged twice on invoice {i}, refund please"})
      for i in range(n)])
  return decode_batch(batch, codec, schemas.to_arrow(decode.row_schema)).rows.to_pylist()


def test_route_through_tiers_keeps_timestamps_and_fills_the_result_schema(server):
  route = tf.RouteThroughTiers(config_for(server))
  schema = route.result_schema(tf.DecodeRecords(tf.make_codec("json", TICKET)).row_schema)
  arrow = schemas.to_arrow(schema)

  def check(rows_out):
    pa.Table.from_pylist(rows_out, schema=arrow).validate(full=True)  # fits its schema
    assert all(r["status"] == "ok" and r["label"] == "billing" for r in rows_out)

  with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
    stamped = p | beam.Create(rows(6)) | beam.Map(
        lambda r: TimestampedValue(r, r["kafka_offset"] * 10.0))
    routed = stamped | route
    assert_that(routed.results, check, label="schema")
    assert_that(routed.results | beam.Map(lambda r, t=beam.DoFn.TimestampParam:
                                          (r["kafka_offset"], float(t))),
                equal_to([(i, i * 10.0) for i in range(6)]), label="timestamps")
    assert_that(routed.failed, equal_to([]), label="failed")


def test_route_through_tiers_sends_records_no_tier_answers_to_failed(server):
  server.faults.add("server_error", count=-1)
  config = config_for(server).with_model("small", max_retries=0).with_model(
      "frontier", max_retries=0)
  with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
    routed = p | beam.Create(rows(3)) | tf.RouteThroughTiers(config)
    assert_that(routed.failed | beam.Map(lambda r: (r["ticket_id"], r["status"])),
                equal_to([(f"T{i}", "failed") for i in range(3)]), label="failed")
    assert_that(routed.results | beam.Map(lambda r: "server_error" in r["error"]),
                equal_to([True] * 3), label="results")


def test_route_batches_answers_every_row_and_dead_letters_failures(server):
  decode = tf.DecodeRecords(tf.make_codec("json", TICKET))
  codec = tf.make_codec("json", TICKET)
  values = [codec.encode({"ticket_id": f"T{i}", "created_at": T0_MS, "subject": "s",
                          "body": "parcel late"}) for i in range(5)] + [b"garbage"]
  batch = tf.KafkaBatch("tickets", 2, 100, 106, 100, list(range(100, 106)), [T0_MS] * 6,
                        [None] * 6, values)
  decoded = decode_batch(batch, codec, schemas.to_arrow(decode.row_schema))
  route = tf.RouteBatches(config_for(server), input_row_schema=decode.row_schema,
                          budget=tf.Budget(usd=10.0, per_process=True))
  with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
    out = p | beam.Create([decoded]) | route
    assert_that(out | beam.Map(lambda b: (b.rows.num_rows, b.dead_letters.num_rows,
                                          set(b.rows.column("status").to_pylist()))),
                equal_to([(5, 1, {"ok"})]))


@pytest.mark.parametrize("budget, error, match", [
    (5, TypeError, "budget must be a tierflow Budget .*got int 5"),
    (tf.Budget(usd=5.0), ValueError, "shared by every worker process through the ledger"),
])
def test_a_budget_that_is_not_one_is_refused_when_constructed(server, budget, error, match):
  """A number where a Budget goes, or a cap that would apply per process unnoticed: the
  transform refuses it when built, before any record is routed."""
  with pytest.raises(error, match=match):
    tf.RouteThroughTiers(config_for(server), budget=budget)
