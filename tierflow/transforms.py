"""tierflow's transforms, for your own Beam pipelines: the same ones ``tierflow run`` composes.

Each is a ``PTransform`` that checks its arguments when constructed and builds
in ``expand``; transforms with a failure path return a NamedTuple of outputs, as
``RunInference(...).with_exception_handling()`` does, and say what schema their
rows have.

Whole offset batches (what the tierflow pipelines use; memory holds the batches
in flight, and the consumer group's offsets move only past written output)::

    batches = p | ReadKafkaBatches(KafkaReadConfig(servers, topic, group_id=...))
    decode = DecodeBatches(make_codec("json", schemas.load("ticket")))
    route = RouteBatches(load_config("tickets"), input_row_schema=decode.row_schema)
    written = batches | decode | route | WriteBatches(out, route.result_schema)
    written | CommitOffsets(config)

Record by record, to mix with steps of your own (see the README)::

    decode = DecodeRecords(codec)                    # KafkaRecords -> (rows, dead_letters)
    route = RouteThroughTiers(run_config)            # rows -> (results, failed)
    results | WriteParquetDataset(out, route.result_schema(decode.row_schema))

One tier's answers to one stage, no cascade, in Beam's own ``RunInference``::

    rows | RunInference(TierModelHandler(run_config, stage="classify"))
"""

from tierflow import schemas
from tierflow.config import ModelConfig, RunConfig, StageConfig, load_config
from tierflow.connectors.codecs import Codec, make_codec
from tierflow.connectors.decode import (DecodeBatches, DecodedBatch, DecodedRecords,
                                        DecodeRecords, row_schema)
from tierflow.connectors.kafka_commit import CommitOffsets, Committed
from tierflow.connectors.kafka_source import (KafkaBatch, KafkaReadConfig, KafkaRecord,
                                              ReadKafkaBatches)
from tierflow.connectors.parquet_dataset import (ParquetWriteResult, WriteBatches,
                                                 WriteParquetDataset, WrittenBatch,
                                                 to_dead_letter)
from tierflow.pipelines.budget import Budget
from tierflow.pipelines.routing import RouteBatches, RoutedOutputs, RouteThroughTiers
from tierflow.pipelines.tier_handler import TierModelHandler

__all__ = [
    "Budget", "Codec", "CommitOffsets", "Committed", "DecodeBatches", "DecodeRecords",
    "DecodedBatch", "DecodedRecords", "KafkaBatch", "KafkaReadConfig", "KafkaRecord",
    "ModelConfig", "ParquetWriteResult", "ReadKafkaBatches", "RouteBatches",
    "RouteThroughTiers", "RoutedOutputs", "RunConfig", "StageConfig", "TierModelHandler",
    "WriteBatches",
    "WriteParquetDataset", "WrittenBatch", "load_config", "make_codec", "row_schema",
    "schemas", "to_dead_letter",
]
