"""End to end: the passthrough pipeline through ``launcher.launch`` against the embedded broker."""

import datetime
import json
import os
import struct

import pyarrow as pa
import pytest

from tierflow import cli, launcher, schemas
from tierflow.connectors import codecs
from tierflow_local.loader import publish


@pytest.fixture(params=["tansu", "apache-kafka"])
def broker(request):
  """Every test here runs against the embedded broker and against Apache Kafka."""
  from conftest import both_brokers
  return both_brokers(request)

TICKET = schemas.load("ticket")
T0_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
DAY_MS = 86_400_000

RESULT_COLUMNS = [
    ("record_id", pa.string()),
    ("kafka_topic", pa.string()),
    ("kafka_partition", pa.int32()),
    ("kafka_offset", pa.int64()),
    ("kafka_timestamp", pa.timestamp("ms", tz="UTC")),
    ("ticket_id", pa.string()),
    ("created_at", pa.timestamp("ms", tz="UTC")),
    ("subject", pa.string()),
    ("body", pa.string()),
    ("channel", pa.string()),
    ("customer_id", pa.string()),
    ("dt", pa.string()),
]


def dt(millis: int) -> str:
  return datetime.datetime.fromtimestamp(millis / 1000, datetime.timezone.utc).strftime("%Y-%m-%d")


def utc(millis: int) -> datetime.datetime:
  return datetime.datetime.fromtimestamp(millis / 1000, datetime.timezone.utc)


def with_extra_field():
  """Ticket as a newer producer writes it: one more field (schema evolution)."""
  schema = json.loads(json.dumps(TICKET))
  schema["fields"].append({"name": "priority", "type": "int", "default": 0})
  return schema


def assert_results_match(table, read_duckdb, output, topic, tickets):
  """The results dataset holds exactly ``tickets``, with source metadata, in both readers."""
  assert [(f.name, f.type) for f in table.schema] == RESULT_COLUMNS
  assert not table.schema.field("record_id").nullable
  assert table.schema.field("customer_id").nullable
  rows = read_duckdb(f"{output}/results")
  assert len(rows) == len(tickets)
  by_id = {t["ticket_id"]: t for t in tickets}
  for r in rows:
    t = by_id.pop(r["ticket_id"])
    assert r["record_id"] == f"{topic}-{r['kafka_partition']}-{r['kafka_offset']}"
    assert r["kafka_topic"] == topic
    assert r["created_at"] == utc(t["created_at"])
    assert r["kafka_timestamp"] == utc(t["created_at"])  # the loader stamps created_at
    assert r["dt"] == dt(t["created_at"])
    for field in ("subject", "body", "channel", "customer_id"):
      assert r[field] == t[field], field
  assert not by_id
  assert len({r["record_id"] for r in rows}) == len(rows)


@pytest.mark.parametrize("fmt", ["json", "avro", "confluent-avro", "confluent-avro+registry"])
def test_formats_decode_into_results(broker, topic, passthrough, output_dir, read_duckdb,
                                     read_arrow, make_tickets, fmt, request):
  name = topic(partitions=3)
  tickets = make_tickets(300, start_ms=T0_MS, step_ms=600_000)  # ~2 days, 3 dt partitions
  flags = ["--bounded", "--format", fmt.split("+")[0]]
  if fmt == "confluent-avro+registry":
    registry = request.getfixturevalue("schema_registry")  # Apicurio, Confluent's API
    client = codecs.SchemaRegistryClient(registry.url)
    client.register(f"{name}-unrelated-value", schemas.load("document"))
    # Half written with the bundled schema, half by a newer producer with an extra field.
    publish(broker.bootstrap_servers, name, tickets[:150], fmt="confluent-avro",
            schema_registry_url=registry.url)
    extra = with_extra_field()
    publish(broker.bootstrap_servers, name,
            [{**t, "priority": i} for i, t in enumerate(tickets[150:])],
            fmt="confluent-avro", schema=extra, schema_registry_url=registry.url)
    ids = {client.register(f"{name}-value", TICKET), client.register(f"{name}-value", extra)}
    assert len(ids) == 2  # two writer schemas, both resolved through the registry
    summary = passthrough(name, output_dir, *flags, "--schema-registry-url", registry.url)
  else:
    publish(broker.bootstrap_servers, name, tickets, fmt=fmt.split("+")[0])
    summary = passthrough(name, output_dir, *flags)
  assert summary.state == "DONE"
  assert (summary.rows_written, summary.dead_letters) == (300, 0)
  assert_results_match(read_arrow(f"{output_dir}/results"), read_duckdb, output_dir, name,
                       tickets)
  assert sorted({r["dt"] for r in read_duckdb(f"{output_dir}/results")}) == [
      "2024-01-01", "2024-01-02", "2024-01-03"]


def test_json_defaults_reach_the_output(broker, topic, passthrough, output_dir, read_duckdb,
                                        produce):
  name = topic()
  produce(name, [{"value": json.dumps({"ticket_id": "d1", "created_at": "2024-03-05T10:00:00Z",
                                       "subject": "s", "body": "b"}).encode()}])
  passthrough(name, output_dir, "--bounded")
  [row] = read_duckdb(f"{output_dir}/results")
  assert (row["channel"], row["customer_id"], row["dt"]) == ("email", None, "2024-03-05")


def _wire(schema_id, body, magic=0):
  return struct.pack(">bI", magic, schema_id) + body


def _bad_json_records(good):
  """(value, error_type) pairs for a JSON topic."""
  g = good[0]
  missing = json.dumps({k: v for k, v in g.items() if k != "body"}).encode()
  wrong_type = json.dumps({**g, "subject": 42}).encode()
  return [
      (b"\x00\x01garbage\xff", "invalid_utf8"),
      (b"not json at all", "invalid_json"),
      (missing, "missing_field"),
      (wrong_type, "schema_violation"),
      (b'{"ticket_id": "\xff\xfe", "created_at": 1}', "invalid_utf8"),
      (json.dumps({**g, "body": "x" * 5000}).encode(), "oversized"),
      (b"[1, 2, 3]", "schema_violation"),
  ]


def _bad_avro_records(good, registry_client, ticket_id, name):
  """(value, error_type) pairs for a Confluent Avro topic read with the registry."""
  avro = codecs.AvroCodec(TICKET)
  body = avro.encode(good[0])
  assert b"subject" in body
  no_body = json.loads(json.dumps(TICKET))
  no_body["fields"] = [f for f in no_body["fields"] if f["name"] != "body"]
  no_body_id = registry_client.register(f"{name}-bad-writer-value", no_body)
  t = ticket_id
  return [
      (_wire(t, b"\xff\xfe\xfd\xfc garbage"), "invalid_avro"),
      (_wire(424242, body), "unknown_schema_id"),
      (_wire(t, body, magic=3), "invalid_wire_format"),
      (b"\x00\x00", "invalid_wire_format"),
      (_wire(t, body.replace(b"subject", b"subj\xffct")), "invalid_utf8"),
      (_wire(t, body + b"\x00\x00"), "invalid_avro"),
      (_wire(no_body_id, codecs.AvroCodec(no_body).encode(
          {k: v for k, v in good[0].items() if k != "body"})), "invalid_avro"),
      (_wire(t, avro.encode({**good[0], "body": "x" * 5000})), "oversized"),
  ]


@pytest.mark.parametrize("fmt", ["json", "confluent-avro"])
def test_malformed_records_are_dead_lettered(broker, topic, produce, passthrough, output_dir,
                                             read_duckdb, read_arrow, make_tickets, fmt,
                                             schema_registry):
  name = topic(partitions=3)
  good = make_tickets(600, step_ms=60_000)
  limit = 2048
  registry = schema_registry
  if True:  # (one block for both formats)
    client = codecs.SchemaRegistryClient(registry.url)
    if fmt == "json":
      codec, bad = codecs.JsonCodec(TICKET), _bad_json_records(good)
    else:
      ticket_id = client.register(f"{name}-value", TICKET)
      codec = codecs.ConfluentAvroCodec(TICKET, schema_id=ticket_id)
      bad = _bad_avro_records(good, client, ticket_id, name)
    records, expected_bad = [], {}
    for i, t in enumerate(good):
      records.append({"key": t["ticket_id"].encode(), "value": codec.encode(t),
                      "timestamp_ms": t["created_at"]})
      if i % 20 == 0:  # a bad record every 20 good ones, on every partition
        value, error_type = bad[(i // 20) % len(bad)]
        expected_bad[len(records)] = (value, error_type)
        records.append({"key": f"bad{i}".encode(), "value": value,
                        "timestamp_ms": t["created_at"]})
    positions = produce(name, records, batch_size=97, max_request_size=1 << 20)
    flags = ["--bounded", "--format", fmt, "--max-record-bytes", str(limit)]
    if fmt == "confluent-avro":
      flags += ["--schema-registry-url", registry.url]
    summary = passthrough(name, output_dir, *flags)

  assert {e for _, e in expected_bad.values()} == {e for _, e in bad}  # every kind was sent
  assert (summary.rows_written, summary.dead_letters) == (len(good), len(expected_bad))
  results = read_duckdb(f"{output_dir}/results")
  assert sorted(r["ticket_id"] for r in results) == sorted(t["ticket_id"] for t in good)

  dead_table = read_arrow(f"{output_dir}/dead_letter")
  assert dead_table.schema.field("raw_value").type == pa.binary()
  dead = {r["record_id"]: r for r in read_duckdb(f"{output_dir}/dead_letter")}
  assert len(dead) == len(expected_bad)
  assert len(results) + len(dead) == len(records)  # nothing silently dropped
  for index, (value, error_type) in expected_bad.items():
    partition, offset = positions[index]
    row = dead.pop(f"{name}-{partition}-{offset}")
    assert (row["kafka_topic"], row["kafka_partition"], row["kafka_offset"]) == (
        name, partition, offset)
    assert row["error_type"] == error_type, row["reason"]
    assert row["stage"] == "decode"
    assert row["reason"]
    assert row["raw_key"] == records[index]["key"]
    if error_type == "oversized":
      assert len(value) > limit
      assert row["raw_value"] == value[:limit]
      assert str(limit) in row["reason"]
    else:
      assert row["raw_value"] == value
    assert row["kafka_timestamp"] == utc(records[index]["timestamp_ms"])
    assert row["dt"] == dt(records[index]["timestamp_ms"])
  assert not dead


def test_record_over_the_default_limit(topic, produce, passthrough, output_dir, read_duckdb,
                                       make_tickets):
  """A value over 1 MiB (the default --max-record-bytes) is dead-lettered, truncated."""
  name = topic(config={"max.message.bytes": 4 << 20})  # Apache Kafka's default is ~1 MB
  small = make_tickets(2)
  big = json.dumps({**small[0], "ticket_id": "big", "body": "y" * (3 << 19)}).encode()
  produce(name, [{"value": json.dumps(small[0]).encode()}, {"value": big},
                 {"value": json.dumps(small[1]).encode()}], max_request_size=4 << 20)
  summary = passthrough(name, output_dir, "--bounded")
  assert (summary.rows_written, summary.dead_letters) == (2, 1)
  [row] = read_duckdb(f"{output_dir}/dead_letter")
  assert (row["error_type"], row["kafka_offset"]) == ("oversized", 1)
  assert row["raw_value"] == big[:1 << 20]


@pytest.mark.slow
def test_rerun_of_the_same_offset_range_is_idempotent(broker, topic, passthrough, output_dir,
                                                      read_duckdb, parquet_files, make_tickets):
  """A re-run of a range the output already holds reads past it: nothing is written (or
  routed, or paid for) twice, and the summary says how much was skipped."""
  name = topic(partitions=2)
  publish(broker.bootstrap_servers, name, make_tickets(500, step_ms=3_600_000))
  flags = ["--bounded", "--start-offset", "0:10,1:0", "--end-offset", "0:200,1:150",
           "--rows-per-file", "64"]
  first = passthrough(name, output_dir, *flags)
  files = parquet_files(output_dir)
  rows = read_duckdb(f"{output_dir}/results")
  assert len(rows) == first.rows_written == 190 + 150
  assert len(files) > 4  # cut by rows-per-file and by day

  second = passthrough(name, output_dir, *flags)
  assert (second.rows_written, second.records_read) == (0, 0)
  assert second.offsets_already_written == 340 and second.exit_code == 0
  assert parquet_files(output_dir) == files
  again = read_duckdb(f"{output_dir}/results")
  assert again == rows
  [(n, distinct)] = [tuple(r.values()) for r in read_duckdb(
      f"{output_dir}/results", "SELECT count(*), count(DISTINCT record_id) FROM t")]
  assert n == distinct == 340
  leftovers = [f for _, _, files in os.walk(output_dir) for f in files if f.startswith(".")]
  assert leftovers == []  # no temporary files left behind


def test_unknown_flag_fails_clearly(broker, topic, output_dir, capsys, parquet_files):
  name = topic()
  code = cli.main(["run", "passthrough", "--bootstrap-servers", broker.bootstrap_servers,
                   "--topic", name, "--output", output_dir, "--bounded", "--end-ofset", "5"])
  assert code != 0
  err = capsys.readouterr().err
  assert "--end-ofset" in err and "unknown flag" in err
  assert parquet_files(output_dir) == []
  with pytest.raises(ValueError, match="--end-ofset"):
    launcher.launch("passthrough", ["--bootstrap-servers", broker.bootstrap_servers,
                                    "--topic", name, "--output", output_dir, "--end-ofset=5"])


@pytest.mark.parametrize("flags, message", [
    (["--bounded", "--streaming"], "--bounded and --streaming exclude each other"),
    (["--streaming", "--end-offset", "5"], "drop --streaming"),
    (["--start-offset", "1", "--start-time", "2024-01-01"], "not both"),
    (["--start-time", "yesterday"], "ISO-8601"),
    (["--max-record-bytes", "0"], "--max-record-bytes"),
    (["--format", "xml"], "invalid choice"),
])
def test_bad_flag_combinations_are_rejected(broker, topic, output_dir, capsys, flags, message):
  name = topic()
  try:
    code = cli.main(["run", "passthrough", "--bootstrap-servers", broker.bootstrap_servers,
                     "--topic", name, "--output", output_dir, *flags])
  except SystemExit as e:  # argparse's own errors (invalid choice) exit with 2
    code = e.code
  assert code == 2
  assert message in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["--topic", "--output", "--bootstrap-servers"])
def test_required_flags(broker, output_dir, capsys, missing):
  flags = {"--bootstrap-servers": broker.bootstrap_servers, "--topic": "t",
           "--output": output_dir}
  argv = [x for k, v in flags.items() if k != missing for x in (k, v)]
  assert cli.main(["run", "passthrough", *argv]) == 2
  assert f"{missing} is required" in capsys.readouterr().err


def test_model_pipeline_flags_are_not_passthrough_flags(broker, topic, output_dir):
  import tierflow.pipelines.tickets  # noqa: F401 - its options are now loaded in this process
  name = topic()
  with pytest.raises(ValueError, match="unknown flag.*--config"):
    launcher.launch("passthrough", ["--bootstrap-servers", broker.bootstrap_servers,
                                    "--topic", name, "--output", output_dir, "--config", "x.yaml"])
  # Beam's own flags stay accepted.
  launcher.build("passthrough", ["--bootstrap-servers", broker.bootstrap_servers, "--topic", name,
                                 "--output", output_dir, "--direct_num_workers", "1"])
