"""tierflow's transforms alone, in TestPipelines (no broker): RouteThroughTiers, RouteBatches,
and the failures of decode, route and write."""

import dataclasses
import json
import math

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from tierflow import schemas
from tierflow import transforms as tf
from tierflow.connectors.decode import decode_batch
from tierflow.failures import Failure
from tierflow.pipelines import routing
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
    assert_that(routed, check, label="schema")
    assert_that(routed | beam.Map(lambda r, t=beam.DoFn.TimestampParam:
                                          (r["kafka_offset"], float(t))),
                equal_to([(i, i * 10.0) for i in range(6)]), label="timestamps")


def test_provider_failures_are_results_with_status_failed_unless_errors_are_handled(server):
  """A record no tier answers (5xx after retries) is data: a result row with status
  failed by default; with exception handling it is a Failure carrying that row."""
  server.faults.add("server_error", count=-1)
  config = config_for(server).with_model("small", max_retries=0).with_model(
      "frontier", max_retries=0)
  with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
    given = p | beam.Create(rows(3))
    plain = given | "Plain" >> tf.RouteThroughTiers(config)
    handled = given | "Handled" >> tf.RouteThroughTiers(config).with_exception_handling()
    assert_that(plain | beam.Map(lambda r: (r["ticket_id"], r["status"],
                                            "server_error" in r["error"])),
                equal_to([(f"T{i}", "failed", True) for i in range(3)]), label="plain")
    assert_that(handled.results, equal_to([]), label="results")
    assert_that(handled.failures | beam.Map(lambda f: (
        type(f).__name__, f.step, f.error_type, f.record_id, "server_error" in f.reason,
        json.loads(f.payload)["status"])),
        equal_to([("Failure", "route", "model_failure", f"tickets-0-{i}", True, "failed")
                  for i in range(3)]), label="failures")


def _broken_route(self, rows, pool=None, batch_key=None):
  raise AttributeError("'NoneType' object has no attribute 'stages'")


def test_a_bug_in_routing_fails_the_pipeline_by_default(server, monkeypatch):
  monkeypatch.setattr(routing.Router, "route", _broken_route)
  with pytest.raises(Exception, match="no attribute 'stages'"):
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
      _ = p | beam.Create(rows(2)) | tf.RouteThroughTiers(config_for(server))


def test_with_exception_handling_a_bug_in_routing_is_a_failure_per_row(server, monkeypatch):
  monkeypatch.setattr(routing.Router, "route", _broken_route)
  with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
    routed = (p | beam.Create(rows(2))
              | tf.RouteThroughTiers(config_for(server)).with_exception_handling())
    assert_that(routed.results, equal_to([]), label="results")
    assert_that(routed.failures | beam.Map(lambda f: (f.step, f.error_type, f.record_id)),
                equal_to([("route", "AttributeError", f"tickets-0-{i}") for i in range(2)]),
                label="failures")


def test_a_row_without_a_field_the_template_names_is_not_answered(server):
  """The bundled template is {subject}/{body}: a row with no body raises by default and
  is a missing_field failure with handling, never an ok answer over an empty text."""
  row = {k: v for k, v in rows(1)[0].items() if k != "body"}
  with pytest.raises(Exception, match="the row has no field body"):
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
      _ = p | beam.Create([row]) | tf.RouteThroughTiers(config_for(server))
  with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
    routed = (p | beam.Create([row, rows(1)[0]])
              | tf.RouteThroughTiers(config_for(server)).with_exception_handling())
    assert_that(routed.results | beam.Map(lambda r: r["status"]), equal_to(["ok"]),
                label="results")
    assert_that(routed.failures | beam.Map(lambda f: (f.error_type, "body" in f.reason)),
                equal_to([("missing_field", True)]), label="failures")


def test_decode_route_and_write_fail_with_one_failure_type(server, tmp_path):
  """Bad bytes, an unanswerable record and an unwritable row: each raises by default
  (decode and write shown here) and with handling is the same Failure type."""
  codec = tf.make_codec("json", TICKET)
  good = codec.encode({"ticket_id": "T1", "created_at": T0_MS, "subject": "s",
                       "body": "charged twice, refund"})
  records = [tf.KafkaRecord("tickets", 0, 0, T0_MS, None, good),
             tf.KafkaRecord("tickets", 0, 1, T0_MS, None, b"not json")]
  with pytest.raises(Exception, match="does not decode .invalid_json"):
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
      _ = p | beam.Create(records) | tf.DecodeRecords(codec)
  decode = tf.DecodeRecords(codec)
  route = tf.RouteThroughTiers(config_for(server))
  schema = route.result_schema(decode.row_schema)
  with pytest.raises(Exception, match="a row cannot be written .unexpected_field"):
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
      _ = (p | beam.Create([{"kafka_topic": "t", "extra": 1}])
           | tf.WriteParquetDataset(str(tmp_path / "a"), schema))
  with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
    decoded = p | beam.Create(records) | decode.with_exception_handling()
    routed = decoded.rows | route.with_exception_handling()
    bad = routed.results | beam.Map(lambda r: {**tf.as_dict(r), "extra": 1})
    written = ((routed.results, bad) | beam.Flatten()
               | tf.WriteParquetDataset(str(tmp_path / "b"), schema).with_exception_handling())
    failures = (decoded.failures, routed.failures, written.failures) | "All" >> beam.Flatten()
    assert failures.element_type.__name__ == "Failure"  # one schema'd type
    assert_that(failures | beam.Map(lambda f: (type(f), f.step, f.error_type, f.record_id)),
                equal_to([(Failure, "decode", "invalid_json", "tickets-0-1"),
                          (Failure, "write", "unexpected_field", "tickets-0-0")]))
    assert_that(written.files | beam.Map(lambda f: f.endswith(".parquet")), equal_to([True]),
                label="files")


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


@pytest.mark.parametrize("kwargs, error, match", [
    ({"budget": 5}, TypeError, "budget must be a tierflow Budget .*got int 5"),
    ({"budget": tf.Budget(usd=5.0)}, ValueError, "give expected_records=N"),
    ({"expected_records": "3"}, TypeError, "expected_records must be an int"),
    ({"price_book": {"gpt": 1}}, TypeError, "price_book must be a tierflow PriceBook"),
    ({"calibration_version": 3}, TypeError, "calibration_version must be a str"),
])
def test_arguments_that_are_not_what_they_say_are_refused_when_constructed(
    server, kwargs, error, match):
  """A number where a Budget goes, a cap that would apply per process unnoticed, a wrong
  type: the transform refuses it when built, before any record is routed."""
  with pytest.raises(error, match=match):
    tf.RouteThroughTiers(config_for(server), **kwargs)
  with pytest.raises(TypeError, match="takes a tierflow RunConfig .*got dict"):
    tf.RouteThroughTiers({"stages": []})


def test_a_budget_with_expected_records_caps_the_run_without_a_ledger(server):
  """Budget(usd) paced over expected_records: a cap too small for any escalation keeps
  every uncertain answer unverified ("budget cap reached"), spending nothing on the
  frontier."""
  config = config_for(server).with_thresholds({"classify": math.inf})
  route = tf.RouteThroughTiers(config, budget=tf.Budget(usd=1e-9), expected_records=3)
  with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
    out = p | beam.Create(rows(3)) | route
    assert_that(out | beam.Map(lambda r: (r["status"], r["frontier_cost_usd"],
                                          "budget cap reached" in r["error"])),
                equal_to([("unverified", 0.0, True)] * 3))


def test_two_classify_stages_write_their_answers_to_their_own_columns(server, tmp_path):
  """category (output: category) and urgency (a second classify stage: its name) in one
  pipeline, routed through the stand-in endpoints and written to Parquet."""
  tickets = config_for(server)
  config = dataclasses.replace(tickets, stages=(
      tf.StageConfig(name="category", kind="classify", labels=("billing", "shipping"),
                     output="category", threshold=0.0),
      tf.StageConfig(name="urgency", kind="classify", labels=("urgent", "routine"),
                     threshold=0.0)))
  decode = tf.DecodeRecords(tf.make_codec("json", TICKET))
  route = tf.RouteThroughTiers(config)
  schema = route.result_schema(decode.row_schema)
  out = str(tmp_path / "out")
  given = rows(2)
  given[0]["body"] = "Urgent: I was charged twice on my invoice, refund the payment now"
  given[1]["body"] = "A routine question: where is my parcel? The delivery is late"
  with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
    _ = p | beam.Create(given) | route | tf.WriteParquetDataset(out, schema)
  table = pq.read_table(out)
  assert "label" not in table.column_names
  got = sorted((r["ticket_id"], r["category"], r["urgency"], r["status"])
               for r in table.to_pylist())
  assert got == [("T0", "billing", "urgent", "ok"), ("T1", "shipping", "routine", "ok")]
  with pytest.raises(ValueError, match="both write column 'category'"):
    dataclasses.replace(config, stages=(*config.stages, tf.StageConfig(
        name="again", kind="classify", labels=("a", "b"), output="category")))


def _batch_of(n: int, bad: int = 0):
  codec = tf.make_codec("json", TICKET)
  values = [codec.encode({"ticket_id": f"T{i}", "created_at": T0_MS, "subject": "s",
                          "body": "charged twice, refund"}) for i in range(n)] + [b"x"] * bad
  return tf.KafkaBatch("tickets", 1, 0, n + bad, 0, list(range(n + bad)), [T0_MS] * (n + bad),
                       [None] * (n + bad), values)


def test_the_batch_transforms_raise_on_a_bug_unless_handled_as_the_cli_does(server, monkeypatch):
  """DecodeBatches and RouteBatches: an error in code fails the bundle by default; with
  .with_exception_handling() (what tierflow run uses) its records are dead-lettered."""
  from tierflow.connectors import decode as decode_module
  codec = tf.make_codec("json", TICKET)
  decode = tf.DecodeBatches(codec)

  def broken(*args, **kwargs):
    raise AttributeError("no attribute 'rows'")

  monkeypatch.setattr(decode_module, "decode_batch", broken)
  with pytest.raises(Exception, match="no attribute 'rows'"):
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
      _ = p | beam.Create([_batch_of(2)]) | tf.DecodeBatches(codec)
  with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
    out = p | beam.Create([_batch_of(2)]) | tf.DecodeBatches(codec).with_exception_handling()
    assert_that(out | beam.Map(lambda b: (b.rows.num_rows, b.dead_letters.column(
        "error_type").to_pylist())), equal_to([(0, ["internal_error"] * 2)]))
  monkeypatch.undo()

  decoded = decode_batch(_batch_of(3), codec, schemas.to_arrow(decode.row_schema))
  real_route = routing.Router.route

  def broken_on_t1(self, rows, pool=None, batch_key=None):
    if any(r["ticket_id"] == "T1" for r in rows):
      _broken_route(self, rows)
    return real_route(self, rows, pool, batch_key)

  monkeypatch.setattr(routing.Router, "route", broken_on_t1)

  def route():
    return tf.RouteBatches(config_for(server), input_row_schema=decode.row_schema)

  with pytest.raises(Exception, match="no attribute 'stages'"):
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
      _ = p | beam.Create([decoded]) | route()
  with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
    out = p | beam.Create([decoded]) | route().with_exception_handling()
    assert_that(out | beam.Map(lambda b: (b.rows.column("status").to_pylist(),
                                          b.dead_letters.column("reason").to_pylist())),
                equal_to([(["ok", "failed", "ok"], [
                    "classify: routing failed on this record: AttributeError: 'NoneType' object "
                    "has no attribute 'stages'; extract: routing failed on this record: "
                    "AttributeError: 'NoneType' object has no attribute 'stages'; summarise: "
                    "routing failed on this record: AttributeError: 'NoneType' object has no "
                    "attribute 'stages'"])]))


def test_to_dead_letter_keeps_the_source_fields_of_a_failure_of_any_step():
  row = {"record_id": "tickets-0-7", "kafka_topic": "tickets", "kafka_partition": 0,
         "kafka_offset": 7, "kafka_timestamp": T0_MS, "dt": "2026-01-01", "body": "x"}
  from tierflow.failures import failure_of_row
  letter = tf.to_dead_letter(failure_of_row("route", "model_failure", "timeout", row),
                             failed_at_millis=T0_MS)
  assert (letter["record_id"], letter["kafka_offset"], letter["dt"], letter["stage"],
          letter["error_type"], json.loads(letter["raw_value"])) == (
      "tickets-0-7", 7, "2026-01-01", "route", "model_failure", row)
  raw = tf.to_dead_letter(Failure("decode", "invalid_json", "bad", "t-0-1", b"\xff"),
                          failed_at_millis=T0_MS)
  assert (raw["record_id"], raw["kafka_offset"], raw["raw_value"], raw["dt"]) == (
      "t-0-1", -1, b"\xff", "2026-01-01")
  pa.Table.from_pylist([letter, raw], schema=schemas.to_arrow(schemas.load("dead_letter")))


# --- schema'd rows: beam.Row in, beam.Row out; dicts in, dicts out ------------------------

def one_classify_stage(server, **frontier):
  """Example 1's config: one classify stage (threshold 0.5); a vague text escalates."""
  return dataclasses.replace(
      config_for(server).with_model("frontier", **frontier),
      stages=(tf.StageConfig(name="category", kind="classify",
                             labels=("billing", "shipping", "account"), threshold=0.5),))


def kafka_records(*bodies):
  codec = tf.make_codec("json", TICKET)
  return [tf.KafkaRecord("tickets", 0, i, T0_MS, None, codec.encode(
      {"ticket_id": f"T{i}", "created_at": T0_MS + i, "subject": "help", "body": body}))
      for i, body in enumerate(bodies)]


BODIES = ("I was charged twice on my invoice, refund the payment",
          "My parcel never arrived, where is the delivery?",
          "Hello, I have a question")  # no keyword: escalates, and the frontier fails


def test_decoded_and_routed_rows_have_beam_schemas_that_dataframes_group_by_status(server):
  """DecodeRecords gives beam.Rows of its row type; RouteThroughTiers over them gives
  beam.Rows of the result schema's row type, which beam.dataframe groups by status."""
  from apache_beam.dataframe.convert import to_dataframe, to_pcollection
  from apache_beam.dataframe.transforms import DataframeTransform
  server.faults.add("server_error", count=-1, flavour="anthropic")
  decode = tf.DecodeRecords(tf.make_codec("json", TICKET))
  route = tf.RouteThroughTiers(one_classify_stage(server, max_retries=0))
  with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
    decoded = p | beam.Create(kafka_records(*BODIES)) | decode
    results = decoded | route
    assert decoded.element_type == tf.beam_row_type(decode.row_schema)
    assert results.element_type == tf.beam_row_type(route.result_schema(decode.row_schema))
    assert_that(results | beam.Map(lambda r: (r.ticket_id, r.label, r.created_at.micros)),
                equal_to([("T0", "billing", T0_MS * 1000), ("T1", "shipping", (T0_MS + 1) * 1000),
                          ("T2", "billing", (T0_MS + 2) * 1000)]), label="rows")
    counts = results | DataframeTransform(
        lambda df: df.groupby("status").record_id.count().to_frame("n"), include_indexes=True)
    assert_that(counts | beam.Map(lambda r: (r.status, r.n)),
                equal_to([("ok", 2), ("unverified", 1)]), label="counts")
    df = to_dataframe(results)
    escalated = to_pcollection(df[df.escalated][["ticket_id", "error"]])
    assert_that(escalated | beam.Map(lambda r: (r.ticket_id, r.error.startswith("unverified"))),
                equal_to([("T2", True)]), label="escalated")


def parquet_files(root) -> dict:
  """{path under root: its table} of the .parquet files under root."""
  return {str(path.relative_to(root)): pq.read_table(path)
          for path in sorted(root.rglob("*.parquet"))}


def test_parquet_from_schemad_rows_is_the_parquet_from_dicts(server, tmp_path):
  """The same records written as dicts and as beam.Rows, and routed as each: the same
  files, the same tables (pyarrow, with their metadata) and the same rows (DuckDB)."""
  import duckdb
  decode = tf.DecodeRecords(tf.make_codec("json", TICKET))
  route = tf.RouteThroughTiers(one_classify_stage(server))
  schema = route.result_schema(decode.row_schema)
  given = rows(3)  # dicts, as decode_batch gives them (timestamps as datetimes)
  with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
    dicts = p | beam.Create(given)
    as_rows = dicts | "Rows" >> tf.ToRows(decode.row_schema)
    _ = dicts | "WriteDicts" >> tf.WriteParquetDataset(str(tmp_path / "dicts"),
                                                        decode.row_schema)
    _ = as_rows | "WriteRows" >> tf.WriteParquetDataset(str(tmp_path / "rows"),
                                                         decode.row_schema)
    routed_dicts = dicts | "RouteDicts" >> route
    routed_rows = as_rows | "RouteRows" >> route
    assert routed_rows.element_type == tf.beam_row_type(schema)
    _ = routed_dicts | "WriteRoutedDicts" >> tf.WriteParquetDataset(
        str(tmp_path / "routed_dicts"), schema)
    _ = routed_rows | "WriteRoutedRows" >> tf.WriteParquetDataset(
        str(tmp_path / "routed_rows"), schema)
  for a, b in (("dicts", "rows"), ("routed_dicts", "routed_rows")):
    want, got = parquet_files(tmp_path / a), parquet_files(tmp_path / b)
    assert len(want) == 1 and list(got) == list(want)  # the same file names
    [(name, table)] = want.items()
    assert table.num_rows == 3 and got[name].equals(table, check_metadata=True)
    files = [str(tmp_path / d / name) for d in (a, b)]
    assert duckdb.sql(f"SELECT count(*) FROM (SELECT * FROM read_parquet('{files[0]}') "
                      f"EXCEPT ALL SELECT * FROM read_parquet('{files[1]}'))").fetchall() == [(0,)]
  routed = parquet_files(tmp_path / "routed_rows")[name].to_pylist()
  assert [(r["ticket_id"], r["created_at"].timestamp() * 1000, r["stages"][0]["stage"])
          for r in sorted(routed, key=lambda r: r["ticket_id"])] == [
      (f"T{i}", T0_MS + i, "category") for i in range(3)]


def test_route_through_tiers_takes_rows_and_dicts_and_its_failures_are_failures(server):
  """Dicts give dicts, as before; beam.Rows without a declared schema are routed as dicts;
  schema'd rows give beam.Rows, and with exception handling a record no tier answers is
  a Failure (payload: its result row) whatever the input's form."""
  server.faults.add("server_error", count=-1, flavour="anthropic")
  config = one_classify_stage(server, max_retries=0)
  decode = tf.DecodeRecords(tf.make_codec("json", TICKET))
  with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
    given = p | beam.Create(rows(2))
    plain_rows = given | "Unschemad" >> beam.Map(lambda d: beam.Row(**d))
    schemad = given | "Schemad" >> tf.ToRows(decode.row_schema)

    def form(r):
      return ("dict", r) if isinstance(r, dict) else ("row", tf.as_dict(r))

    for name, pcoll, want in (("dicts", given, "dict"), ("rows", plain_rows, "dict"),
                              ("schemad", schemad, "row")):
      out = pcoll | f"Route_{name}" >> tf.RouteThroughTiers(config)
      assert_that(out | f"Form_{name}" >> beam.Map(form) | f"Fields_{name}" >> beam.Map(
          lambda f: (f[0], f[1]["ticket_id"], f[1]["status"])),
          equal_to([(want, f"T{i}", "ok") for i in range(2)]), label=f"out_{name}")
    handled = schemad | "Handled" >> tf.RouteThroughTiers(  # every record escalates
        config.with_thresholds({"category": math.inf})).with_exception_handling()
    assert handled.failures.element_type is Failure
    assert_that(handled.results | beam.Map(lambda r: (r.ticket_id, r.status)),
                equal_to([("T0", "unverified"), ("T1", "unverified")]), label="results")
  server.faults.add("server_error", count=-1, flavour="openai")
  with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
    failed = (p | beam.Create(rows(1)) | tf.ToRows(decode.row_schema)
              | tf.RouteThroughTiers(config.with_model("small", max_retries=0))
              .with_exception_handling())
    assert_that(failed.failures | beam.Map(lambda f: (
        type(f), f.step, f.error_type, f.record_id, json.loads(f.payload)["ticket_id"])),
        equal_to([(Failure, "route", "model_failure", "tickets-0-0", "T0")]), label="failures")


def test_schemad_input_without_a_field_the_template_names_is_refused_when_built(server):
  """With a Beam schema the input's fields are known when the pipeline is built: a
  template field the rows lack is refused then, before any record is routed."""
  schema = tf.DecodeRecords(tf.make_codec("json", TICKET)).row_schema
  no_body = {**schema, "fields": [f for f in schema["fields"] if f["name"] != "body"]}
  p = test_pipeline.TestPipeline(runner="FnApiRunner")
  given = p | beam.Create([]) | tf.ToRows(no_body)
  with pytest.raises(ValueError, match="names body, not a field of the input rows' schema"):
    _ = given | tf.RouteThroughTiers(config_for(server))
