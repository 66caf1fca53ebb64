"""``tickets``: support tickets from Kafka -> classify, extract, summarise on the small tier
-> the uncertain stages on the frontier tier -> results with a cost ledger in Parquet."""

from tierflow.pipelines.model_pipeline import OPTIONS, build_pipeline
from tierflow.pipelines.model_pipeline import config_from_options as _config

NAME = "tickets"


def config_from_options(options):
  return _config(options, NAME)


__all__ = ["NAME", "OPTIONS", "build_pipeline", "config_from_options"]
