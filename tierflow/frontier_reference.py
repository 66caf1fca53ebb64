"""Calibrating without labels: a random sample of the records, both tiers run on it, and the
frontier tier's answers taken as the reference the small tier is certified against.

``tierflow calibrate --reference frontier`` uses it (``tierflow.calibrate_command``): the
sample comes from a JSONL file or a Kafka topic's offset range, goes through the pipeline's
own decoding and routing in-process with every stage escalated, and its output holds, per
record and stage, the small tier's answer and confidence and the frontier's answer and
billed cost. The frontier's answers, read from each stage's own output column, become a
labels file (its kind's ``reference_columns``; classify: a column named like the stage
holding the label; extract: each field); a summarise stage has no exact reference and is
not certified.
"""

from __future__ import annotations

import json
import math
import os
import random
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from tierflow import results as results_lib
from tierflow.labels import why_unscored
from tierflow.pipelines.stage_kinds import KINDS

__all__ = ["ESCALATE_ALL", "sample_file", "sample_topic", "run_tiers", "write_frontier_labels"]

ESCALATE_ALL = math.inf  # every stage goes to the frontier


def _draw(n_total: int, n: Optional[int], seed: int) -> list[int]:
  """Positions of a uniform random sample of ``n`` of ``n_total`` (all when ``n`` is None
  or not smaller), in order."""
  if n is not None and n < 1:
    raise ValueError(f"--sample wants a positive number of records, got {n}")
  if n is None or n >= n_total:
    return list(range(n_total))
  return sorted(random.Random(seed).sample(range(n_total), n))


def sample_file(path: str, n: Optional[int], seed: int) -> list[bytes]:
  """A random sample of the records of a JSONL file, as message values (one line each)."""
  from tierflow.files import read_text
  lines = [line for line in read_text(path).splitlines() if line.strip()]
  if not lines:
    raise ValueError(f"{path}: no records")
  return [lines[i].encode("utf-8") for i in _draw(len(lines), n, seed)]


def sample_topic(bootstrap_servers: str, topic: str, n: Optional[int], seed: int, *,
                 start_offset: Optional[str] = None, end_offset: Optional[str] = None,
                 consumer_config: Optional[Mapping[str, Any]] = None) -> list[bytes]:
  """A random sample of the message values of a topic's offset range (default: all of it):
  offsets are drawn uniformly over the range's partitions, then only those are kept."""
  from confluent_kafka import KafkaError, TopicPartition

  from tierflow.connectors.kafka_client import new_consumer
  from tierflow.connectors.kafka_offsets import resolve_ranges
  from tierflow.connectors.kafka_read_config import KafkaReadConfig
  ranges = [r for r in resolve_ranges(KafkaReadConfig(
      bootstrap_servers=bootstrap_servers, topic=topic, bounded=True,
      start_offset=start_offset, end_offset=end_offset,
      consumer_config=dict(consumer_config or {}))) if r.stop > r.start]
  slots = [(r.partition, o) for r in ranges for o in range(r.start, r.stop)]
  if not slots:
    raise ValueError(f"topic {topic}: no records in the range to sample")
  wanted = {slots[i] for i in _draw(len(slots), n, seed)}
  out: dict[tuple[int, int], bytes] = {}
  consumer = new_consumer(bootstrap_servers, consumer_config or {})
  try:
    for r in ranges:
      need = {o for p, o in wanted if p == r.partition}
      if not need:
        continue
      consumer.assign([TopicPartition(topic, r.partition, min(need))])
      last = max(need)
      while True:
        msg = consumer.poll(10.0)
        if msg is None:
          raise ValueError(f"topic {topic} partition {r.partition}: no record at offsets "
                           f"{min(need)}..{last} within 10 s")
        if msg.error():
          if msg.error().code() == KafkaError._PARTITION_EOF:
            break
          raise ValueError(f"topic {topic}: {msg.error().str()}")
        if msg.offset() in need:
          out[(r.partition, msg.offset())] = msg.value() or b""
        if msg.offset() >= last:
          break
  finally:
    consumer.close()
  return [out[k] for k in sorted(out)]


def run_tiers(pipeline: str, values: Sequence[bytes], work_dir: str, *,
              config: Optional[str] = None, frontier: bool = False,
              runner: str = "FnApiRunner") -> str:
  """Runs ``pipeline``'s stages over ``values`` (JSON message values) in-process and
  writes its output under ``work_dir``; returns ``work_dir``.

  ``frontier=False``: the small tier only (every threshold 0 and a budget of 0, so no
  frontier request is made: records that would need one are marked ``budget_skipped`` and
  keep their small answer). ``frontier=True``: every stage escalated (threshold above any
  confidence, no budget cap), so each record holds both tiers' answers and costs.
  Invalid records land in ``WORK_DIR/dead_letter`` with the reason, as from the topic.
  """
  import time

  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions

  from tierflow import schemas
  from tierflow.config import load_config
  from tierflow.connectors.codecs import JsonCodec
  from tierflow.connectors.decode import DecodeBatches
  from tierflow.connectors.kafka_source import KafkaBatch
  from tierflow.connectors.parquet_dataset import WriteBatches
  from tierflow.launcher import PIPELINES
  from tierflow.pipelines.budget import Budget
  from tierflow.pipelines.routing import RouteBatches
  from tierflow.prices import load_price_book

  models = sorted(set(PIPELINES) - {"passthrough"})
  if pipeline not in models:
    raise ValueError(f"--run wants a model pipeline ({', '.join(models)}), got {pipeline!r}")
  if not values:
    raise ValueError("no records to run the tiers on")
  run = load_config(config or pipeline)
  threshold = ESCALATE_ALL if frontier else 0.0
  run = run.with_thresholds({s.name: threshold for s in run.stages})
  schema = schemas.load(run.schema)
  now = int(time.time() * 1000)
  values = list(values)
  from tierflow import progress
  progress.add(read=len(values))  # progress lines count the small tier's answers of these
  batch = KafkaBatch("calibration-sample", 0, 0, len(values), 0, list(range(len(values))),
                     [now] * len(values), [None] * len(values), values)
  os.makedirs(work_dir, exist_ok=True)
  decode = DecodeBatches(JsonCodec(schema)).with_exception_handling()
  budget = Budget(None, per_process=True) if frontier else Budget(0.0, per_process=True)
  route = RouteBatches(run, load_price_book(run.price_book),
                       input_row_schema=decode.row_schema, budget=budget
                       ).with_exception_handling()
  with beam.Pipeline(runner=runner, options=PipelineOptions([])) as p:
    _ = (p | "Records" >> beam.Create([batch])
         | "Decode" >> decode
         | "Tiers" >> route
         | "Write" >> WriteBatches(work_dir, route.result_schema))
  return work_dir


def write_frontier_labels(output_dir: str, path: str) -> tuple[dict[str, list[str]], dict,
                                                                   list[str]]:
  """Writes the frontier's answers in an escalate-all run's output as a labels file.

  Returns (per scorable stage, its label columns; the frontier model(s) and endpoint(s)
  that answered; notes). Each row is keyed by the records' own id (``ticket_id``,
  ``doc_id``, else ``record_id``); a record whose frontier call failed has no label for
  any stage is left out of the file (with a note): an extract label row counts as labelled
  whatever its fields hold, so a partial row would score against nothing.
  """
  run = results_lib.read_run(output_dir)
  id_field = next((f for f in results_lib.ID_FIELDS
                   if f == "record_id" or "_id:" + f in run.records), "record_id")
  ids = run.records["record_id" if id_field == "record_id" else "_id:" + id_field]
  rows: list[dict] = [{id_field: None if i is None else str(i)} for i in ids]
  fields: dict[str, list[str]] = {}
  notes: list[str] = []
  answered: dict[str, set] = {"model": set(), "endpoint": set()}
  unanswered = np.zeros(run.n, dtype=bool)
  owner: dict[str, str] = {}  # label column -> the stage it is the reference of
  for stage in run.stages:
    kind = KINDS.get(stage.kind)
    if kind is None or not kind.scored:
      notes.append(f"stage {stage.name} ({stage.kind}): not certified against the frontier: "
                   f"{why_unscored(stage)} to agree with, so agreement cannot be tested; it "
                   f"keeps its configured threshold and has no guarantee")
      continue
    final = run.answers(stage)
    if final is None:
      notes.append(f"stage {stage.name}: not certified against the frontier: the sample's "
                   f"results have no column {stage.output} (its output)")
      continue
    on_frontier = stage.present & (stage.col("final_tier") == "frontier")
    given = {i: kind.reference_columns(stage.name, final[i])
             for i in np.flatnonzero(on_frontier)}
    cols = sorted({c for row in given.values() for c in row})
    taken = [c for c in cols if c in owner]
    if taken:
      notes.append(f"stage {stage.name}: not certified against the frontier: its label "
                   f"column(s) {', '.join(taken)} are stage {owner[taken[0]]}'s")
      continue
    for i, row in given.items():
      rows[i].update({c: row.get(c) for c in cols})
    owner.update(dict.fromkeys(cols, stage.name))
    unanswered |= stage.present & ~on_frontier
    if cols:
      fields[stage.name] = cols
    answered["model"].update(m for m in stage.col("frontier_model")[on_frontier] if m)
    answered["endpoint"].update(h for h in stage.col("frontier_endpoint")[on_frontier] if h)
  if unanswered.any():
    notes.append(f"the frontier did not answer (failed) on {int(unanswered.sum())} of "
                 f"{run.n} sampled records; they are left out of the calibration")
  with open(path, "w", encoding="utf-8") as f:
    for row, skip in zip(rows, unanswered):
      if not skip:
        f.write(json.dumps(row, default=str) + "\n")
  return fields, {k: sorted(v) for k, v in answered.items()}, notes

