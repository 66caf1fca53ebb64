"""One tier of a run config as a Beam ``RemoteModelHandler``, for ``RunInference``.

For pipelines that want a model's answers to one stage, without the cascade::

    handler = TierModelHandler(load_config("tickets"), stage="classify")   # the small tier
    predictions = rows | RunInference(handler)                            # PredictionResult

Each ``PredictionResult.inference`` is a ``TierOutcome``: the answer (``value``), its
``confidence``, billed ``usage`` and ``cost_usd``, or ``error`` when the model's answer for
that record could not be read. A request the endpoint fails raises (``ModelCallError``),
as ``RunInference`` expects: the pipeline fails, or with
``RunInference(handler).with_exception_handling()`` the batch goes to
``failed_inferences``. Attempts per request: ``1 + max_retries`` of the tier's model config
(tierflow's client retries, honouring ``retry-after``; Beam's own retry is off, so the two
never multiply). Rows are packed ``batch_size`` to a request, ``concurrency`` requests in
flight, under the model's rpm/tpm limits.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

from apache_beam.ml.inference.base import PredictionResult, RemoteModelHandler

from tierflow.beam_schema import plain
from tierflow.config import RunConfig
from tierflow.pipelines.prompts import render_text
from tierflow.pipelines.routing import METRICS_NAMESPACE, Router
from tierflow.prices import PriceBook, load_price_book

__all__ = ["TierModelHandler"]


class TierModelHandler(RemoteModelHandler):
  """The ``tier`` ("small" or "frontier") of ``config`` answering stage ``stage`` for rows,
  dicts or schema'd rows (``beam.Row``: ``DecodeRecords``' rows), rendered with the
  config's ``text`` template; each ``PredictionResult.example`` is the row as given."""

  def __init__(self, config: RunConfig, stage: str, tier: str = "small",
               price_book: Optional[PriceBook] = None):
    if not isinstance(config, RunConfig):
      raise TypeError(f"TierModelHandler takes a tierflow RunConfig, got "
                      f"{type(config).__name__}")
    stages = [s.name for s in config.stages]
    if stage not in stages:
      raise ValueError(f"stage {stage!r} is not in the config (stages: {stages})")
    if tier not in ("small", "frontier"):
      raise ValueError(f"tier must be 'small' or 'frontier', got {tier!r}")
    self._config, self._stage, self._tier = config, stage, tier
    self._book = price_book or load_price_book(config.price_book)
    Router(config, self._book)  # prices checked now, not on a worker
    super().__init__(namespace=METRICS_NAMESPACE, num_retries=0)

  def create_client(self) -> Router:
    return Router(self._config, self._book).open()

  def request(self, batch: Sequence[Mapping[str, Any]], model: Router,
              inference_args: Optional[dict] = None) -> Iterable[PredictionResult]:
    texts = [render_text(self._config.text, plain(row)) for row in batch]
    outcomes = model.answer(self._tier, self._stage, texts)
    name = getattr(self._config, self._tier).model
    return [PredictionResult(row, outcome, name) for row, outcome in zip(batch, outcomes)]

  def batch_elements_kwargs(self) -> Mapping[str, Any]:
    model = getattr(self._config, self._tier)
    return {"min_batch_size": 1, "max_batch_size": model.batch_size * model.concurrency}

  def get_metrics_namespace(self) -> str:
    return METRICS_NAMESPACE
