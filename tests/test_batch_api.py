"""``ProviderBatch`` against the local batch endpoints, through the real SDKs over HTTP.

The endpoints enforce the providers' limits, ``custom_id`` pattern, states, per-request
expiry and partial cancels (``deploy/local/batch_endpoints.py``), so what a provider would
refuse or cut short is refused or cut short here.
"""

from __future__ import annotations

import collections
import json
import threading
import time

import pytest

from tierflow.config import ModelConfig
from tierflow.connectors.batch_api import BatchLimits, ProviderBatch, custom_id
from tierflow.connectors.llm_clients import ModelCallError, ModelClient, ModelReply
from tierflow_local.provider_server import LocalProviderServer
from tierflow_local.standin_model import KeywordStandIn

TEXT = "My card was charged twice for the same order, please refund one of them."


@pytest.fixture
def server():
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier")) as s:
    s.batches.complete_seconds = 0.3
    yield s


def _client(server, provider: str) -> ModelClient:
  if provider == "openai":
    return ModelClient(ModelConfig(provider="openai", model="small",
                                   base_url=server.openai_base_url))
  return ModelClient(ModelConfig(provider="anthropic", model="frontier",
                                 base_url=server.anthropic_base_url))


def _requests(client: ModelClient, n: int, stage: str = "intent") -> list[tuple[str, dict]]:
  return [(custom_id(stage, i), client.request_body("Classify the ticket.", f"{TEXT} #{i}",
                                                    40)) for i in range(n)]


def _kinds(results: dict) -> collections.Counter:
  return collections.Counter("reply" if isinstance(r, ModelReply) else r.kind
                             for r in results.values())


def _created(server, provider: str) -> list[dict]:
  prefix = "batch_" if provider == "openai" else "msgbatch_"
  return [server.batches._batches[b] for b in server.batches.created if b.startswith(prefix)]


PROVIDERS = ["openai", "anthropic"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("limit", ["requests", "bytes", "enqueued_tokens"])
def test_a_batch_over_a_limit_is_split_and_answered_in_full(server, provider, limit):
  if limit == "enqueued_tokens" and provider == "anthropic":
    pytest.skip("Anthropic has no enqueued-token limit per batch")
  client = _client(server, provider)
  requests = _requests(client, 30)
  one = len(ProviderBatch(client)._line(*requests[0])) + 1
  limits = {"requests": BatchLimits(7, 10**9),
            "bytes": BatchLimits(10**6, 8 * one + 100),
            "enqueued_tokens": BatchLimits(10**6, 10**9, 400)}[limit]
  b = server.batches
  b.openai_max_requests = b.anthropic_max_requests = limits.requests
  b.openai_max_bytes = b.anthropic_max_bytes = limits.bytes
  b.enqueued_tokens = limits.enqueued_tokens
  batch = ProviderBatch(client, poll_s=0.05, limits=limits)
  results = batch.run(requests)
  assert _kinds(results) == {"reply": 30}
  created = _created(server, provider)
  assert len(batch.batch_ids) == len(created) >= 3
  assert all(len(c["requests"]) <= limits.requests for c in created)
  assert sorted(cid for c in created for cid, _ in c["requests"]) == sorted(
      cid for cid, _ in requests)  # each request in exactly one batch
  assert all(r.usage.input_tokens > 0 for r in results.values())


@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_endpoints_refuse_a_batch_over_a_limit_and_the_error_is_kept(server, provider):
  """Without the split (limits above the endpoint's), the whole batch fails, and the
  provider's reason is in every request's error."""
  client = _client(server, provider)
  server.batches.openai_max_requests = server.batches.anthropic_max_requests = 5
  results = ProviderBatch(client, poll_s=0.05, limits=BatchLimits(50, 10**9)).run(
      _requests(client, 6))
  [kind] = _kinds(results)
  error = next(iter(results.values()))
  if provider == "openai":  # refused at validation: the batch fails with its errors
    assert kind == "batch_failed" and "too_many_requests" in str(error) and "at most 5" in str(
        error)
  else:  # refused at creation (HTTP 400)
    assert kind == "bad_request" and "at most 5" in str(error)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_stage_name_the_pattern_refuses_still_makes_valid_custom_ids(server, provider):
  client = _client(server, provider)
  requests = _requests(client, 4, stage="intent.v2 (beta)/éé" + "x" * 80)
  assert all(len(cid) <= 64 for cid, _ in requests)
  assert _kinds(ProviderBatch(client, poll_s=0.05).run(requests)) == {"reply": 4}
  raw = [(f"intent.v2-{i}", body) for i, (_, body) in enumerate(requests)]
  refused = ProviderBatch(client, poll_s=0.05).run(raw)
  if provider == "anthropic":  # what the old ids got: the whole batch refused
    assert _kinds(refused) == {"bad_request": 4} and "custom_id" in str(refused["intent.v2-0"])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_cancel_at_the_deadline_keeps_what_was_answered(server, provider):
  server.batches.complete_seconds = 5.0  # 10 requests, one answered every 0.5 s
  client = _client(server, provider)
  batch = ProviderBatch(client, poll_s=0.05, max_wait_s=1.5)
  started = time.monotonic()
  results = batch.run(_requests(client, 10))
  kinds = _kinds(results)
  assert set(kinds) == {"reply", "batch_canceled"} and 2 <= kinds["reply"] <= 6, kinds
  assert time.monotonic() - started < 4.0, "it waited for the batch's end, not the cancel"
  # Each answered request was answered once at the endpoint, and each is a reply here.
  assert server.batches.answered == kinds["reply"]
  [created] = _created(server, provider)
  assert created["final"] == "cancelled"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_requests_past_the_expiry_expire_and_the_answered_are_kept(server, provider):
  server.batches.complete_seconds, server.batches.expire_seconds = 2.0, 1.0
  client = _client(server, provider)
  kinds = _kinds(ProviderBatch(client, poll_s=0.05).run(_requests(client, 10)))
  assert set(kinds) == {"reply", "batch_expired"} and 3 <= kinds["reply"] <= 7, kinds
  assert server.batches.answered == kinds["reply"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_deadline_counts_from_submission_across_a_resume(server, provider, tmp_path):
  server.batches.complete_seconds = 3600
  client = _client(server, provider)
  state = str(tmp_path / "state.json")
  requests = _requests(client, 3)

  def killed(_):
    raise KeyboardInterrupt  # a kill while polling

  with pytest.raises(KeyboardInterrupt):
    ProviderBatch(client, state, poll_s=0.05, max_wait_s=1.5, sleep=killed).run(requests)
  time.sleep(1.6)  # the run is down past its deadline
  started = time.monotonic()
  again = ProviderBatch(client, state, poll_s=0.5, max_wait_s=1.5)
  assert _kinds(again.run(requests)) == {"batch_canceled": 3}
  assert again.resumed and len(_created(server, provider)) == 1
  assert time.monotonic() - started < 1.4, "the resumed run waited a deadline of its own"
  submitted = json.loads(open(state).read())["chunks"][0]["submitted_at"]
  assert submitted < time.time() - 1.6  # kept from the killed run


def test_polls_back_off_with_jitter(server):
  server.batches.complete_seconds = 3.0
  client = _client(server, "openai")
  waits = []

  def sleep(s):
    waits.append(s)
    time.sleep(s)

  batch = ProviderBatch(client, poll_s=0.1, sleep=sleep)
  assert _kinds(batch.run(_requests(client, 2))) == {"reply": 2}
  assert len(waits) >= 5 and batch.polls == len(waits) + 1
  bases = [0.1 * 1.5 ** k for k in range(len(waits))]
  assert all(0.8 * min(b, 3.2) <= w <= 1.2 * min(b, 3.2) for w, b in zip(waits, bases))
  ratios = [w / min(b, 3.2) for w, b in zip(waits, bases)]
  assert max(ratios) - min(ratios) > 0.02, "no jitter"


def test_a_batch_refused_for_enqueued_tokens_is_submitted_again(server):
  """Another worker's batch holds the organisation's enqueued tokens: ours fails with
  token_limit_exceeded, and is submitted again once that one has ended."""
  client = _client(server, "openai")
  server.batches.enqueued_tokens, server.batches.complete_seconds = 300, 1.0
  limits = BatchLimits(100, 10**9, 300)
  other = threading.Thread(target=ProviderBatch(client, poll_s=0.05, limits=limits).run,
                           args=(_requests(client, 5, stage="other"),))
  other.start()
  while not server.batches.created:
    time.sleep(0.01)
  batch = ProviderBatch(client, poll_s=0.05, limits=limits)
  results = batch.run(_requests(client, 5))
  other.join()
  assert _kinds(results) == {"reply": 5}
  assert batch.resubmitted >= 1
  codes = [e.get("code") for b in _created(server, "openai") for e in b["errors"] or []]
  assert "token_limit_exceeded" in codes


def test_errored_requests_are_classed_as_the_sync_path_classes_them(server):
  server.set_faults([{"kind": "rate_limit", "count": 2, "flavour": "anthropic"},
                     {"kind": "overloaded", "count": 1, "flavour": "anthropic"}])
  client = _client(server, "anthropic")
  results = ProviderBatch(client, poll_s=0.05).run(_requests(client, 6))
  assert _kinds(results) == {"reply": 3, "rate_limit": 2, "server_error": 1}
  assert all(r.status in (429, 529) for r in results.values()
             if isinstance(r, ModelCallError))


def test_uploaded_input_files_are_deleted_once_their_batch_is_final(server):
  client = _client(server, "openai")
  ProviderBatch(client, poll_s=0.05, limits=BatchLimits(2, 10**9)).run(_requests(client, 5))
  assert len(_created(server, "openai")) == 3
  assert server.batches.files("batch") == []
  assert server.batches.files("batch_output"), "the results are the provider's to expire"


def test_a_batch_over_the_token_limit_on_its_own_fails_once(server):
  """Submitting it again could never succeed: it fails with the provider's reason."""
  client = _client(server, "openai")
  server.batches.enqueued_tokens = 100
  batch = ProviderBatch(client, poll_s=0.05, limits=BatchLimits(100, 10**9, 10**6))
  results = batch.run(_requests(client, 5))
  assert _kinds(results) == {"batch_failed": 5} and batch.resubmitted == 0
  assert "token_limit_exceeded" in str(next(iter(results.values())))


def test_an_input_file_uploaded_by_a_killed_run_is_used_not_uploaded_again(server, tmp_path):
  client = _client(server, "openai")
  state = str(tmp_path / "state.json")
  requests = _requests(client, 3)
  created = client.sdk_client.batches.create

  def killed(**_):
    raise KeyboardInterrupt  # a kill after the upload, before the batch was created

  client.sdk_client.batches.create = killed
  with pytest.raises(KeyboardInterrupt):
    ProviderBatch(client, state, poll_s=0.05).run(requests)
  client.sdk_client.batches.create = created
  assert len(server.batches.files("batch")) == 1
  assert _kinds(ProviderBatch(client, state, poll_s=0.05).run(requests)) == {"reply": 3}
  [batch] = _created(server, "openai")
  assert batch["input_file_id"] not in {f["id"] for f in server.batches.files()}  # deleted
  assert server.batches.files("batch") == []
