"""``documents``: documents from Kafka -> classify by topic and summarise on the small tier
-> the uncertain stages on the frontier tier -> results with a cost ledger in Parquet."""

from tierflow.pipelines.model_pipeline import OPTIONS, build_pipeline
from tierflow.pipelines.model_pipeline import config_from_options as _config

NAME = "documents"


def config_from_options(options):
  return _config(options, NAME)


__all__ = ["NAME", "OPTIONS", "build_pipeline", "config_from_options"]
