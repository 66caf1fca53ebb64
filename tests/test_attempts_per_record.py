"""How many requests one record's stage can cause, as docs/routing.md states it ("Attempts
per record"): on the small tier at most ``samples x (1 + max_retries)``, on the frontier at
most ``2 x (1 + max_retries)`` (its pack's attempts, then its own alone when the packed
answer lost it). Counted at the endpoints, over real HTTP, per record."""

import json
import math

import pytest
from tierflow_local.provider_server import LocalProviderServer
from tierflow_local.standin_model import KeywordStandIn

from tierflow.config import ModelConfig, RunConfig, StageConfig
from tierflow.pipelines.routing import Router
from tierflow.prices import load_price_book

RETRIES = 2
BODIES = ["double charge on my card", "parcel never arrived", "return label please",
          "refund the payment", "charged twice this month", "where is my parcel",
          "send a return label", "invoice shows the wrong amount"]


@pytest.fixture
def server():
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier")) as s:
    yield s


def _route(server, threshold: float) -> list:
  tier = dict(batch_size=4, concurrency=2, max_retries=RETRIES, breaker_failures=0)
  config = RunConfig(
      name="t", schema="ticket", text="{body}",
      small=ModelConfig(provider="openai", model="small", base_url=server.openai_base_url,
                        price_as="gpt-5-nano", **tier),
      frontier=ModelConfig(provider="anthropic", model="frontier",
                           base_url=server.anthropic_base_url, price_as="claude-sonnet-4-6",
                           **tier),
      stages=(StageConfig(name="classify", kind="classify",
                          labels=("billing", "shipping", "returns"), threshold=threshold),))
  router = Router(config, load_price_book()).open()
  try:
    return router.route([{"body": b} for b in BODIES])
  finally:
    router.close()


def _attempts(server, model: str) -> dict:
  """Per record text, the requests to ``model`` that carried it."""
  bodies = [json.dumps(r.body) for r in server.requests if r.model == model]
  return {b: sum(json.dumps(b)[1:-1] in sent for sent in bodies) for b in BODIES}


def test_a_small_tier_failing_every_attempt_is_asked_1_plus_max_retries_times(server):
  server.faults.add("server_error", count=-1, model="small", retry_after=0.01)
  routed = _route(server, threshold=0.0)
  assert _attempts(server, "small") == {b: 1 + RETRIES for b in BODIES}
  assert _attempts(server, "frontier") == {b: 1 for b in BODIES}  # escalated, answered
  assert all(rec.stages["classify"].final.tier == "frontier" for rec in routed)


def test_a_frontier_failing_every_attempt_is_asked_1_plus_max_retries_times(server):
  server.faults.add("server_error", count=-1, model="frontier", retry_after=0.01)
  routed = _route(server, threshold=math.inf)
  assert _attempts(server, "frontier") == {b: 1 + RETRIES for b in BODIES}
  assert all(not rec.stages["classify"].frontier.ok for rec in routed)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_under_mixed_faults_no_record_exceeds_the_stated_bound(server, seed):
  """5xx on half the requests and cut-off answers on a third of the rest, both tiers: each
  record's attempts stay within the bound, and a record the packed answer lost is retried
  alone (so the frontier's bound is reached by more than the pack's attempts)."""
  for model in ("small", "frontier"):
    server.faults.add("server_error", count=-1, model=model, probability=0.5, seed=seed,
                      retry_after=0.01)
    server.faults.add("truncated", count=-1, model=model, probability=0.34, seed=seed + 10)
  routed = _route(server, threshold=math.inf)
  small, frontier = _attempts(server, "small"), _attempts(server, "frontier")
  assert all(1 <= n <= 1 + RETRIES for n in small.values()), small
  assert all(1 <= n <= 2 * (1 + RETRIES) for n in frontier.values()), frontier
  for body, rec in zip(BODIES, routed):
    outcome = rec.stages["classify"].frontier
    if outcome.retried_alone:
      assert frontier[body] >= 2
