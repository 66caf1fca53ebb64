"""``RouteThroughTiers``: the router over a PCollection of rows, for your own pipelines.

``RunInference`` batches the rows for a ``Router`` (``routing``) and each comes out
as a result row (the input fields, each stage's output column, status, cost and
ledger) at the input row's timestamp: a ``beam.Row`` of the input's row type plus
the routed columns when the input has a Beam schema, else a dict. As with
``RunInference``, an error in code raises unless ``.with_exception_handling()`` was
called; see ``RouteThroughTiers``.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, Iterable, Mapping, NamedTuple, Optional

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from tierflow.beam_schema import (beam_row_type, fields_of, joined, plain, row_converter,
                                  row_type_of)
from tierflow.config import RunConfig
from tierflow.connectors.kafka_ledger import LedgerConfig
from tierflow.failures import Failure, failure_of_row
from tierflow.pipelines.budget import Budget, budget_for, check_budget
from tierflow.pipelines.ledger import ledger_row, result_schema, routed_part
from tierflow.pipelines.prompts import missing_fields, template_fields
from tierflow.pipelines.routing import METRICS_NAMESPACE, Router, RoutingCounters
from tierflow.prices import PriceBook, load_price_book

__all__ = ["RouteThroughTiers", "RoutedOutputs"]


class RoutedOutputs(NamedTuple):
  """Outputs of ``RouteThroughTiers(...).with_exception_handling()``.

  Attributes:
    results: the result rows of records every stage answered (status ``ok``, or
      ``unverified``: a small answer kept because its escalation failed or the budget
      was reached; ``error`` says which), at the input rows' timestamps.
    failures: a ``tierflow.failures.Failure`` (step ``route``) per record that is not
      in ``results``: a stage neither tier answered (``model_failure``, the result row
      with its costs in ``payload``), a row without a field the input template names
      (``missing_field``), or an error in code (its class name).
  """
  results: pvalue.PCollection
  failures: pvalue.PCollection


class _TieredHandler(ModelHandler):
  """A RunInference handler whose 'model' is a ``Router`` over (row, timestamp, kept)."""

  def __init__(self, config: RunConfig, book: PriceBook, budget: Budget,
               expected_records: Optional[int], run_id: str,
               ledger: Optional[LedgerConfig] = None):
    super().__init__()
    self._config = config
    self._book = book
    self._budget = budget
    self._expected = expected_records
    self._run_id = run_id
    self._ledger = ledger

  def load_model(self) -> Router:
    return Router(self._config, self._book, ledger=self._ledger).open()

  def run_inference(self, batch, model: Router, inference_args=None):
    pool = budget_for(self._run_id, self._budget, self._ledger, len(batch),
                      self._expected or 0)
    rows = [row for row, *_ in batch]
    try:
      routed = model.route(rows, pool)
    finally:
      if pool is not None:
        pool.close()
    return [PredictionResult(pair, rec) for pair, rec in zip(batch, routed)]

  def batch_elements_kwargs(self):
    small = self._config.small
    return {"min_batch_size": 1, "max_batch_size": small.batch_size * small.concurrency * 4}

  def get_metrics_namespace(self) -> str:
    return METRICS_NAMESPACE


class _CheckRowsFn(beam.DoFn):
  """(the row as a dict for the router, its timestamp, and with ``keep`` the input row's
  own field values); a row that is not a dict or a schema'd row with every field the
  input template names raises, or with errors handled is a ``Failure``."""

  def __init__(self, template: str, handle_errors: bool, keep: bool):
    self._template, self._handle, self._keep = template, handle_errors, keep

  def process(self, row, ts=beam.DoFn.TimestampParam):
    given, row = row, plain(row)
    if not isinstance(row, Mapping):
      error_type, reason = "invalid_type", (
          f"a row is a dict or a beam.Row, not a {type(row).__name__}")
    else:
      missing = missing_fields(self._template, row)
      if not missing:
        kept = fields_of(given) if self._keep else None
        yield dict(row), Timestamp.of(ts).micros, kept
        return
      error_type, reason = "missing_field", (
          f"the row has no field {', '.join(missing)}, which the input template "
          f"{self._template!r} names")
    if not self._handle:
      raise ValueError(f"{reason} (call .with_exception_handling() to have such rows as "
                       "failures)")
    yield pvalue.TaggedOutput("failures", failure_of_row("route", error_type, reason, row))


class _LedgerFn(beam.DoFn):
  """Result rows from routed records (with ``schemad``, ``beam.Row``s: the input row's own
  values and the routed columns); with errors handled, failed ones are ``Failure``s."""

  def __init__(self, config: RunConfig, book: PriceBook, calibration: Optional[str],
               handle_errors: bool, schemad: bool):
    self._config, self._book, self._calibration = config, book, calibration
    self._handle, self._schemad = handle_errors, schemad

  def setup(self):
    self._counters = RoutingCounters()
    routed = routed_part(self._config)
    self._routed_names = [f["name"] for f in routed["fields"]]
    self._routed = row_converter(routed)[1]

  def process(self, result):
    (_, micros, kept), routed = result.example, result.inference
    row, failed = ledger_row(routed, self._config, self._book, self._calibration)
    self._counters.count([routed], [row])
    if failed and self._handle:
      yield pvalue.TaggedOutput("failures", failure_of_row(
          "route", "model_failure", row["error"] or "no answer", row))
      return
    if self._schemad:
      added = self._routed({name: row[name] for name in self._routed_names})
      row = beam.Row(**kept, **added._asdict())
    yield TimestampedValue(row, Timestamp(micros=micros))


def _crashed(failed) -> Iterable[Failure]:
  """A batch the handler raised on (an error in code, with errors handled): each of its
  rows is a ``Failure`` naming the exception."""
  batch, exc = failed if isinstance(failed, tuple) else (failed.batch, failed.exception)
  if isinstance(exc, tuple):  # Beam's dead letter: (class, repr, traceback lines)
    name, text = exc[0].__name__, exc[1]
  else:
    name, text = type(exc).__name__, repr(exc)
  for row, *_ in batch:
    yield failure_of_row("route", name, f"routing raised {text}", row)


def _check_type(name: str, value: Any, kind: Any, what: str) -> None:
  if value is not None and not isinstance(value, kind):
    raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")


class RouteThroughTiers(beam.PTransform):
  """Routes rows through the small tier, escalating the uncertain to the frontier.

  ``rows | RouteThroughTiers(config)`` is a PCollection of result rows, one per row
  (the row's fields, each stage's output column, ``status``, ``error``, cost and the
  per-stage ledger; ``result_schema(input_schema)`` is their Avro schema), at the
  rows' timestamps. Rows are dicts or schema'd rows (``beam.Row``); the results follow
  the input: when it has a Beam schema (``DecodeRecords``' rows, ``ToRows``), they are
  ``beam.Row``s of its row type plus the routed columns (``beam_row_type`` of the
  result schema), ready for ``beam.dataframe`` and SQL; otherwise dicts.

  Provider failures are data, not exceptions: a timeout, a 5xx after retries, a refused
  request or the budget cap gives status ``unverified`` (a small answer kept, and why)
  or ``failed`` (a stage with no answer, and why).

  An error in code (a bug in routing, say) and a row the input template cannot render
  (not a dict or a row, or without a field it names) raise, and the pipeline fails. After
  ``.with_exception_handling()`` the output is ``RoutedOutputs(results, failures)``
  instead: ``results`` holds the ``ok`` and ``unverified`` rows, ``failures`` a
  ``tierflow.failures.Failure`` for every other record, ``failed`` ones included.

  Args:
    config: the run config (``tierflow.config.RunConfig``).
    price_book: prices (default: the config's, else the bundled book).
    budget: the frontier spend cap for the run: with ``expected_records`` it is paced
      over them (at most ``usd * routed / expected_records`` spent at any time, whatever
      the number of worker processes); or one account in ``ledger`` shared by every
      worker process (``Budget(usd, account=...)``); or, by name,
      ``Budget(usd, per_process=True)``: each worker process has the cap.
    expected_records: how many rows the run will route (bounded input).
    calibration_version: written on every row.
    ledger: the ``kafka_ledger.LedgerConfig`` the budget's account and the models'
      rate windows live in, shared by every worker process.
  """

  def __init__(self, config: RunConfig, price_book: Optional[PriceBook] = None, *,
               budget: Budget = Budget(), expected_records: Optional[int] = None,
               calibration_version: Optional[str] = None,
               ledger: Optional[LedgerConfig] = None):
    super().__init__()
    if not isinstance(config, RunConfig):
      raise TypeError(f"RouteThroughTiers takes a tierflow RunConfig (tierflow.config), got "
                      f"{type(config).__name__}")
    _check_type("price_book", price_book, PriceBook, "a tierflow PriceBook (tierflow.prices)")
    _check_type("calibration_version", calibration_version, str, "a str")
    _check_type("ledger", ledger, LedgerConfig, "a kafka_ledger.LedgerConfig")
    if expected_records is not None and (not isinstance(expected_records, int)
                                         or isinstance(expected_records, bool)):
      raise TypeError(f"expected_records must be an int, got {expected_records!r}")
    if expected_records is not None and expected_records < 1:
      raise ValueError("expected_records must be >= 1")
    self._budget = _run_budget(budget, expected_records, ledger)
    self._ledger = ledger
    self._book = price_book or load_price_book(config.price_book)
    Router(config, self._book)
    self._config = config
    self._expected = expected_records
    self._calibration = calibration_version
    self._run_id = uuid.uuid4().hex
    self._handle_errors = False

  def with_exception_handling(self) -> "RouteThroughTiers":
    """Outputs ``RoutedOutputs(results, failures)`` instead of raising on an error in code
    or on a row the template cannot render (see the class docstring)."""
    self._handle_errors = True
    return self

  def result_schema(self, input_schema: Mapping[str, Any]) -> dict:
    """The Avro schema of result rows for input rows of ``input_schema``; ValueError when
    the input template names a field ``input_schema`` does not have."""
    return result_schema(input_schema, self._config)

  def _result_type(self, input_type):
    """The row type of results for input rows of ``input_type`` (schema'd input)."""
    names = {name for name, _ in input_type._fields}
    unknown = sorted(template_fields(self._config.text) - names)
    if unknown:
      raise ValueError(f"the input template {self._config.text!r} names "
                       f"{', '.join(unknown)}, not a field of the input rows' schema")
    return joined(input_type, beam_row_type(routed_part(self._config)))

  def expand(self, rows):
    handle = self._handle_errors
    input_type = row_type_of(rows.element_type)
    result_type = None if input_type is None else self._result_type(input_type)
    schemad = result_type is not None
    handler = _TieredHandler(self._config, self._book, self._budget, self._expected,
                             self._run_id, self._ledger)
    checked = rows | "CheckRows" >> beam.ParDo(
        _CheckRowsFn(self._config.text, handle, schemad)).with_outputs("failures", main="rows")
    route = RunInference(handler)
    if not handle:
      routed = checked.rows | "Route" >> route
    else:
      routed, dlq = checked.rows | "Route" >> route.with_exception_handling()
    ledger = beam.ParDo(_LedgerFn(self._config, self._book, self._calibration, handle, schemad))
    if schemad:
      ledger = ledger.with_output_types(result_type)
    ledgered = routed | "Ledger" >> ledger.with_outputs("failures", main="results")
    if not handle:
      return ledgered.results
    crashed = dlq.failed_inferences | "Crashed" >> beam.FlatMap(_crashed)
    failures = ((checked.failures, ledgered.failures, crashed)
                | "Failures" >> beam.Flatten().with_output_types(Failure))
    return RoutedOutputs(ledgered.results, failures)


def _run_budget(budget: Budget, expected_records: Optional[int],
                ledger: Optional[LedgerConfig]) -> Budget:
  """The budget as the router applies it: a cap paced over ``expected_records`` is one
  run's cap in every process (each batch earns its share), so it needs no ledger."""
  if not isinstance(budget, Budget):
    check_budget(budget, ledger)  # raises the TypeError
  if budget.capped and not budget.per_process and ledger is None:
    if expected_records is None:
      raise ValueError(
          f"Budget(usd={budget.usd}) is the run's cap: give expected_records=N (the cap is "
          "paced over the N rows, whatever the number of worker processes), or "
          "ledger=LedgerConfig(...) with Budget(usd, account=NAME) for a cap shared through "
          "the ledger; Budget(usd, per_process=True) caps each worker process on its own")
    return dataclasses.replace(budget, per_process=True)
  check_budget(budget, ledger)
  return budget
