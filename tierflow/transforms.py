"""tierflow's transforms, for your own Beam pipelines: the same ones ``tierflow run`` composes.

Each is a ``PTransform`` that checks its arguments when constructed and builds
in ``expand``, and says what schema its rows have. As with Beam's ``RunInference``,
the transforms with a failure path (adding source fields, decode, route, write) raise on
a record they cannot handle unless ``.with_exception_handling()`` was called: then they
return a NamedTuple of outputs whose ``failures`` hold ``Failure`` rows, one type for all
four. Provider failures (timeouts, 5xx after retries, the budget cap) are not
exceptions: routed records carry them as status ``failed`` or ``unverified``.

Whole offset batches (what the tierflow pipelines use; memory holds the batches
in flight, and the consumer group's offsets move only past written output)::

    batches = p | ReadKafkaBatches(KafkaReadConfig(servers, topic, group_id=...))
    decode = DecodeBatches(make_codec("json", schemas.load("ticket")))
    route = RouteBatches(load_config("tickets"), input_row_schema=decode.row_schema)
    written = batches | decode | route | WriteBatches(out, route.result_schema)
    written | CommitOffsets(config)

Record by record, to mix with steps of your own (see docs/library.md)::

    decode = DecodeRecords(codec).with_exception_handling()   # -> (rows, failures)
    route = RouteThroughTiers(run_config).with_exception_handling()  # -> (results, failures)
    results | WriteParquetDataset(out, route.result_schema(decode.row_schema))

Their rows have Beam schemas: ``DecodeRecords`` gives ``beam.Row``s, ``ToRows(avro_schema)``
makes them of dicts, and ``AddSourceFields`` and ``RouteThroughTiers`` keep a schema'd
input schema'd (of dicts, they give dicts), so ``beam.dataframe`` works on the results;
``beam_row_type`` is an Avro schema's Beam row type, ``as_dict`` a row as a dict.

One tier's answers to one stage, no cascade, in Beam's own ``RunInference``::

    rows | RunInference(TierModelHandler(run_config, stage="classify"))
"""

from tierflow import schemas
from tierflow.beam_schema import ToRows, as_dict, beam_row_type
from tierflow.config import ModelConfig, RunConfig, StageConfig, load_config
from tierflow.connectors.codecs import Codec, make_codec
from tierflow.connectors.decode import (DecodeBatches, DecodedBatch, DecodedRecords,
                                        DecodeRecords, row_schema)
from tierflow.connectors.kafka_commit import CommitOffsets, Committed
from tierflow.connectors.kafka_source import (KafkaBatch, KafkaReadConfig, KafkaRecord,
                                              ReadKafkaBatches)
from tierflow.failures import Failure
from tierflow.connectors.source_fields import AddSourceFields, SourceFieldsResult
from tierflow.connectors.parquet_dataset import (ParquetWriteResult, WriteBatches,
                                                 WriteParquetDataset, WrittenBatch,
                                                 to_dead_letter)
from tierflow.pipelines.budget import Budget
from tierflow.pipelines.route_rows import RoutedOutputs, RouteThroughTiers
from tierflow.pipelines.routing import RouteBatches
from tierflow.pipelines.tier_handler import TierModelHandler

__all__ = [
    "AddSourceFields", "as_dict", "beam_row_type", "Budget", "Codec", "CommitOffsets",
    "Committed", "DecodeBatches", "DecodedBatch", "DecodedRecords", "DecodeRecords", "Failure",
    "KafkaBatch", "KafkaReadConfig", "KafkaRecord", "load_config", "make_codec", "ModelConfig",
    "ParquetWriteResult", "ReadKafkaBatches", "RouteBatches", "RoutedOutputs",
    "RouteThroughTiers", "row_schema", "RunConfig", "schemas", "SourceFieldsResult",
    "StageConfig", "TierModelHandler", "to_dead_letter", "ToRows", "WriteBatches",
    "WriteParquetDataset",
    "WrittenBatch",
]
