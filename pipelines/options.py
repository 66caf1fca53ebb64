"""Pipeline options (Beam ``PipelineOptions`` conventions) and the typed config built from them.

tierflow's ``PipelineOptions`` are all prefixed, ``--tierflow_topic``,
``--tierflow_output`` and so on (hyphens or underscores), so that in a user's own
pipeline that composes tierflow's transforms, the user's ``--output`` can never
set tierflow's. ``tierflow run`` and the launcher (Dataflow Flex Template, Flink
submit) take the short spellings (``--topic``, ``--output``, ``--bootstrap_servers``)
and translate them (``translate_flags``). ``--streaming`` is Beam's own flag: it
makes the Kafka read unbounded; without it the read is bounded (``--bounded``,
the default).
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from typing import Any, Mapping, Optional

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from tierflow import schemas
from tierflow.connectors.codecs import FORMATS, Codec, make_codec
from tierflow.connectors.kafka_read_config import DEFAULT_OFFSETS_PER_BATCH, KafkaReadConfig
from tierflow.connectors.parquet_dataset import check_topic

__all__ = ["KafkaSourceOptions", "ParquetSinkOptions", "RunLimitsOptions", "SourceSinkConfig",
           "parse_time_ms", "translate_flags", "PREFIX"]

PREFIX = "tierflow_"
# Short spellings the CLI and launcher accept, e.g. "--topic" -> "--tierflow_topic".
_SHORT: dict[str, str] = {}


def _add(parser, name: str, *aliases: str, **kwargs) -> None:
  """Registers ``--tierflow_<name>`` (and its hyphenated form); records the short
  spellings ``--<name>``, ``--<name_with_underscores>`` and ``aliases`` for the CLI."""
  under = name.replace("-", "_")
  flag = f"--{PREFIX}{under}"
  parser.add_argument(flag, f"--{PREFIX.replace('_', '-')}{name}", dest=f"{PREFIX}{under}",
                      **kwargs)
  for short in (f"--{name}", f"--{under}", *aliases):
    _SHORT[short] = flag


def _register_all() -> None:
  """Fills the short-spelling table from every loaded tierflow options class."""
  import argparse
  stack = [PipelineOptions]
  while stack:
    cls = stack.pop()
    stack.extend(cls.__subclasses__())
    if cls.__module__.startswith("tierflow.") and "_add_argparse_args" in cls.__dict__:
      cls._add_argparse_args(argparse.ArgumentParser(add_help=False))


def translate_flags(argv: list[str]) -> list[str]:
  """argv with tierflow's short flags (``--output``) spelt as its options (``--tierflow_output``)."""
  _register_all()
  out = []
  for arg in argv:
    name, sep, value = arg.partition("=")
    if name in _SHORT:
      arg = _SHORT[name] + sep + value
    out.append(arg)
  return out


def parse_time_ms(value: str | int | None) -> Optional[int]:
  """Epoch millis from an int, digits, or ISO-8601 (``2026-11-20``, ``2026-11-20T06:00Z``)."""
  if value is None or value == "":
    return None
  if isinstance(value, int):
    return value
  text = str(value).strip()
  if text.lstrip("-").isdigit():
    return int(text)
  try:
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
  except ValueError as e:
    raise ValueError(f"{value!r} is neither epoch millis nor an ISO-8601 time") from e
  if parsed.tzinfo is None:
    parsed = parsed.replace(tzinfo=timezone.utc)
  return int(parsed.timestamp() * 1000)


def _key_values(pairs: list[str] | None) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for pair in pairs or []:
    key, sep, value = pair.partition("=")
    if not sep:
      raise ValueError(f"--kafka-consumer-config takes KEY=VALUE, got {pair!r}")
    try:
      out[key.strip()] = json.loads(value)
    except json.JSONDecodeError:
      out[key.strip()] = value
  return out


class KafkaSourceOptions(PipelineOptions):
  """Where to read from and how to decode."""

  @classmethod
  def _add_argparse_args(cls, parser):
    _add(parser, "bootstrap-servers", "--kafka-bootstrap-servers", "--kafka_bootstrap_servers",
         default=None, help="Kafka bootstrap servers, host:port[,host:port]")
    _add(parser, "topic", help="Kafka topic to read")
    _add(parser, "format", default="json", choices=FORMATS, help="message value format")
    _add(parser, "schema", default=None,
         help="reader schema: a bundled name (ticket, document) or a path to an .avsc")
    _add(parser, "schema-registry-auth", default=None,
         help="the schema registry's basic-auth user:password, by reference only: env:VAR or "
              "file:PATH (read on the worker)")
    _add(parser, "schema-registry-url", default=None,
         help="Confluent schema registry, for --format confluent-avro")
    _add(parser, "schema-id", type=int, default=1,
         help="schema id of the bundled schema when no registry is given")
    _add(parser, "bounded", action="store_true", default=False,
         help="read from the committed (else earliest) offsets up to the high-watermark "
              "seen at start, then finish (the default unless --streaming)")
    _add(parser, "start-offset", default=None,
         help="first offset to read: N for every partition, or P:N,P:N")
    _add(parser, "end-offset", default=None,
         help="offset to stop before (exclusive): N or P:N,P:N")
    _add(parser, "start-time", default=None,
         help="read from the first record at or after this time (epoch ms or ISO-8601)")
    _add(parser, "end-time", default=None,
         help="stop before the first record at or after this time (epoch ms or ISO-8601)")
    _add(parser, "group-id", default=None,
         help="consumer group for committed offsets (default tierflow.<pipeline>.<topic>)")
    _add(parser, "commit-offsets", default="auto", choices=("auto", "always", "never"),
         help="commit the group's offsets past written output; auto = not for explicit "
              "offset/time ranges, so a backfill never moves the group's position")
    _add(parser, "kafka-consumer-config", action="append", default=None,
         help="extra Kafka client setting KEY=VALUE (repeatable), librdkafka or kafka-python "
              "names, e.g. security.protocol=SASL_SSL; secrets only by reference: "
              "sasl.password=env:VAR or =file:PATH (read on the worker)")
    _add(parser, "allow-deleted-offsets", action="store_true", default=False,
         help="skip offsets the broker deleted (retention) before they were read, counting "
              "them in the summary, instead of failing the run")
    _add(parser, "max-record-bytes", type=int, default=1024 * 1024,
         help="records larger than this go to the dead-letter output")
    _add(parser, "max-read-seconds", type=float, default=None,
         help="stop a streaming read after this long (for tests, demos and bounded soaks)")
    _add(parser, "max-out-of-orderness-seconds", type=float, default=5.0,
         help="how far the streaming watermark trails the newest record timestamp")


class RunLimitsOptions(PipelineOptions):
  """When a finished run counts as failed (see the README's exit codes), and checks
  before it starts."""

  @classmethod
  def _add_argparse_args(cls, parser):
    _add(parser, "max-failed-fraction", type=float, default=0.0,
         help="model pipelines: exit 3 when more than this fraction of records failed in "
              "the model stages (default 0: any failure)")
    _add(parser, "max-unverified-fraction", type=float, default=0.0,
         help="model pipelines: exit 3 when more than this fraction of records kept a small "
              "answer below its threshold because the frontier failed on it (status "
              "unverified; default 0). Records kept for the budget cap are reported, not "
              "counted here")
    _add(parser, "max-small-failed-fraction", type=float, default=0.5,
         help="model pipelines: exit 3 when the small tier failed more than this fraction of "
              "its stage answers (they escalate, at the frontier's price; default 0.5)")
    _add(parser, "max-dead-letter-fraction", type=float, default=None,
         help="exit 4 when more than this fraction of the records read were dead-lettered "
              "as undecodable (default: no limit; bad input is data to route aside)")
    _add(parser, "preflight", default="auto", choices=("auto", "never"),
         help="before building the pipeline, check that the brokers answer, the topic "
              "exists and the output is writable (auto), or not (never)")


class ParquetSinkOptions(PipelineOptions):
  """Where and how to write."""

  @classmethod
  def _add_argparse_args(cls, parser):
    _add(parser, "output", help="output directory (local path, gs://, s3://)")
    _add(parser, "rows-per-file", type=int, default=None,
         help="files are cut at offsets that are multiples of this (per partition and day), "
              "so a re-run of a range rewrites the same files; default 25000 for "
              "passthrough, 10000 for the model pipelines")
    _add(parser, "flush-seconds", type=float, default=10.0,
         help="streaming: a partition's file is cut after this long even if not full")


def direct_workers(options: PipelineOptions) -> tuple[str, int]:
  """FnApiRunner's ``direct_running_mode`` and ``direct_num_workers``; ("", 1) on any
  other runner."""
  from apache_beam.options.pipeline_options import DirectOptions
  runner = options.view_as(StandardOptions).runner  # the two classes' flags only, not the
  direct = options.view_as(DirectOptions)  # parser of every options class (~50 ms)
  runner = runner if isinstance(runner, str) else type(runner).__name__ if runner else ""
  if runner and runner.rsplit(".", 1)[-1] not in ("DirectRunner", "FnApiRunner",
                                                  "SwitchingDirectRunner"):
    return "", 1
  try:
    workers = int(direct.direct_num_workers or 1)
  except (TypeError, ValueError):
    workers = 1
  return direct.direct_running_mode or "in_memory", workers


def _drops_deferred_work(options: PipelineOptions) -> bool:
  """FnApiRunner with several workers, which drops a splittable DoFn's deferred
  remainder (apache/beam#19842): a bounded read checkpointing after each batch would
  stop after its first batch per partition."""
  mode, workers = direct_workers(options)
  return mode not in ("", "in_memory") and workers != 1


@dataclasses.dataclass(frozen=True)
class SourceSinkConfig:
  """The typed configuration shared by every pipeline: Kafka in, Parquet out."""
  source: KafkaReadConfig
  format: str
  schema: Mapping[str, Any]
  output: str
  schema_registry_url: Optional[str] = None
  schema_registry_auth: Optional[str] = None
  schema_id: int = 1
  max_record_bytes: int = 1024 * 1024
  event_time_field: Optional[str] = "created_at"

  @property
  def streaming(self) -> bool:
    return not self.source.bounded

  def codec(self) -> Codec:
    return make_codec(self.format, self.schema, schema_registry_url=self.schema_registry_url,
                      schema_registry_auth=self.schema_registry_auth,
                      schema_id=self.schema_id)

  @classmethod
  def from_options(cls, options: PipelineOptions, *, pipeline: str,
                   default_schema: str = "ticket",
                   default_rows_per_file: int = DEFAULT_OFFSETS_PER_BATCH) -> "SourceSinkConfig":
    """Builds and validates the config; raises ValueError naming the flag at fault."""
    k = _Unprefixed(options.view_as(KafkaSourceOptions))
    o = _Unprefixed(options.view_as(ParquetSinkOptions))
    streaming = bool(options.view_as(StandardOptions).streaming)
    bootstrap = k.bootstrap_servers
    for flag, value in (("--bootstrap-servers", bootstrap), ("--topic", k.topic),
                        ("--output", o.output)):
      if not value:
        raise ValueError(f"{flag} is required")
    if streaming and k.bounded:
      raise ValueError("--bounded and --streaming exclude each other")
    explicit_range = any(v is not None for v in (k.start_offset, k.end_offset, k.start_time,
                                                 k.end_time))
    commit = {"always": True, "never": False, "auto": not explicit_range}[k.commit_offsets]
    if k.max_record_bytes <= 0:
      raise ValueError("--max-record-bytes must be positive")
    rows_per_file = default_rows_per_file if o.rows_per_file is None else o.rows_per_file
    if rows_per_file <= 0:
      raise ValueError("--rows-per-file must be positive")
    if o.flush_seconds <= 0:
      raise ValueError("--flush-seconds must be positive")
    check_topic(k.topic)
    check_servers(bootstrap)
    try:
      source = KafkaReadConfig(
          bootstrap_servers=bootstrap,
          topic=k.topic,
          bounded=not streaming,
          start_offset=k.start_offset,
          end_offset=k.end_offset,
          start_time_ms=parse_time_ms(k.start_time),
          end_time_ms=parse_time_ms(k.end_time),
          group_id=k.group_id or f"tierflow.{pipeline}.{k.topic}",
          commit_offsets=commit,
          consumer_config=_key_values(k.kafka_consumer_config),
          offsets_per_batch=rows_per_file,
          flush_seconds=o.flush_seconds,
          max_out_of_orderness_s=k.max_out_of_orderness_seconds,
          max_read_seconds=k.max_read_seconds,
          allow_deleted_offsets=k.allow_deleted_offsets,
          skip_written=o.output.rstrip("/"),
          checkpoint_between_batches=not _drops_deferred_work(options),
      )
    except ValueError as e:
      raise ValueError(_flag_words(str(e))) from None
    schema = schemas.load(k.schema or default_schema)
    names = {f["name"] for f in schema["fields"]}
    return cls(
        source=source,
        format=k.format,
        schema=schema,
        output=o.output.rstrip("/"),
        schema_registry_url=k.schema_registry_url,
        schema_registry_auth=k.schema_registry_auth,
        schema_id=k.schema_id,
        max_record_bytes=k.max_record_bytes,
        event_time_field="created_at" if "created_at" in names else None,
    )


class _Unprefixed:
  """Reads ``options.tierflow_<name>`` as ``.name``."""

  def __init__(self, view):
    self._view = view

  def __getattr__(self, name):
    return getattr(self._view, PREFIX + name)


def check_servers(servers: str) -> None:
  """Raises ValueError unless ``servers`` is ``host:port[,host:port]`` with valid ports."""
  for entry in servers.split(","):
    host, sep, port = entry.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(f"--bootstrap-servers: {entry.strip()!r} is not host:port with a "
                       "port from 1 to 65535")


def _flag_words(message: str) -> str:
  """A KafkaReadConfig error in terms of the flags that set it."""
  for word, flag in (("start offset", "--start-offset"), ("end offset", "--end-offset"),
                     ("end time", "--end-time"), ("start time", "--start-time")):
    message = message.replace(word, flag, 1) if flag not in message else message
  return message
