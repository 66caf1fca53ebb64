"""Several worker processes: the budget scales out, rate limits are shared.

Runs on FnApiRunner with ``--direct_running_mode=multi_processing``: each worker is its
own Python process with its own clients, limiter and budget pool, as on Dataflow or
Flink. What the endpoint saw is the measure (``x-tierflow-worker`` names the process).
"""

import collections
import copy
import math
import pathlib
import time

import pytest
import yaml

from tierflow import launcher
from tierflow.connectors.llm_clients import RateLimiter
from local_config import local_config
from tierflow.config import RunConfig
from tierflow_local.loader import publish, sample_tickets
from tierflow_local.provider_server import LocalProviderServer, RateLimit
from tierflow_local.standin_model import KeywordStandIn

ROOT = pathlib.Path(__file__).parents[1]
CONFIG = yaml.safe_load((ROOT / "tierflow/data/tickets.yaml").read_text())


def test_aimd_halves_on_429_and_grows_back():
  now = [0.0]
  waits = []

  def sleep(seconds):
    waits.append(seconds)
    now[0] += seconds

  lim = RateLimiter(rpm=8, tpm=None, clock=lambda: now[0], sleep=sleep)
  lim.throttled()
  assert lim._limits()[0] == 4
  lim.throttled(); lim.throttled(); lim.throttled(); lim.throttled()
  assert lim._limits()[0] == 1  # never below one request a minute
  for _ in range(200):
    lim.answered()
  assert lim.factor == 1.0 and lim._limits()[0] == 8
  lim.throttled()
  for _ in range(4):
    lim.acquire(10)
  assert not waits
  lim.acquire(10)  # the fifth request of the minute waits for the window
  assert waits and waits[0] == pytest.approx(RateLimiter.window_s)


def _config(tmp_path, server, budget=None, small_rpm=None):
  return local_config(tmp_path / "tickets.yaml", server, budget=budget,
                      small=dict(batch_size=4, concurrency=2, max_retries=2, rpm=small_rpm),
                      frontier=dict(batch_size=2, max_retries=2))


def _run(broker, topic, output_dir, config, n, workers, partitions, extra=()):
  name = topic(partitions=partitions)
  tickets = sample_tickets()
  publish(broker.bootstrap_servers, name, (tickets * (n // len(tickets) + 1))[:n])
  return launcher.launch("tickets", [
      "--bootstrap-servers", broker.bootstrap_servers, "--topic", name,
      "--output", output_dir, "--config", config,
      "--direct_running_mode=multi_processing", f"--direct_num_workers={workers}", *extra])


@pytest.mark.slow
def test_budget_scales_out_over_worker_processes(broker, topic, output_dir, tmp_path,
                                                 read_duckdb):
  # Escalating everything would cost ~$0.18: the cap binds. Each worker may end with
  # less than one strict reservation (~$0.006) unspent; with $0.025 a worker that is
  # what keeps approvals under 100%.
  cap = 0.10
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier")) as server:
    summary = _run(broker, topic, output_dir, _config(tmp_path, server, budget=cap),
                   n=960, workers=4, partitions=4, extra=("--rows-per-file", "40"))
    frontier = [r for r in server.requests if r.model == "frontier" and r.status == 200]
  assert summary.rows_written == 960 and summary.exit_code == 0, (summary.metrics, summary.committed_offsets)
  senders = collections.Counter(r.headers.get("x-tierflow-worker") for r in frontier)
  assert len(senders) > 1, f"every frontier call came from one process: {senders}"
  stages = read_duckdb(f"{output_dir}/results", "SELECT s.* FROM (SELECT unnest(stages) AS s "
                                                "FROM t)")
  spent = sum(s["frontier_cost_usd"] for s in stages)
  approved = [s for s in stages if s["frontier_cost_usd"] > 0]
  skipped = sum(1 for s in stages if s["budget_skipped"])
  assert spent <= cap and skipped > 0, "the cap did not bind: the test proves nothing"
  # What the cap could have paid for at the realised price of an approved escalation.
  affordable = cap / (spent / len(approved))
  print(f"cap ${cap}: spent ${spent:.5f}, {len(approved)} approved, {skipped} skipped, "
        f"the cap pays for ~{affordable:.0f}, senders {dict(senders)}")
  assert len(approved) >= 0.8 * min(affordable, len(approved) + skipped), (
      f"{len(approved)} approved, {skipped} skipped, cap pays for ~{affordable:.0f}")


@pytest.mark.slow
def test_two_workers_share_a_rate_limit(broker, topic, output_dir, tmp_path):
  """An endpoint allowing R requests a minute for the small model; each of two workers
  takes R/2, so the endpoint never answers 429 (each worker alone at R would)."""
  r = 10
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier"),
                           rate_limits={"small": RateLimit(rpm=r)}) as server:
    summary = _run(broker, topic, output_dir, _config(tmp_path, server, small_rpm=r),
                   n=16, workers=2, partitions=2)  # 12 small requests: > R, ~1 min
    small = [req for req in server.requests if req.model == "small"]
  assert summary.rows_written == 16
  assert len(small) > r, "too few requests to test a shared limit"
  assert [req.status for req in small if req.status != 200] == []
  assert len({req.headers.get("x-tierflow-worker") for req in small}) == 2
  times = sorted(req.received_at for req in small)
  for i, t in enumerate(times):  # at most R in any 60 s window, measured at the endpoint
    assert sum(1 for u in times[i:] if u < t + 60) <= r
  assert math.ceil(len(small) / r) - 1 <= (times[-1] - times[0]) / 60 + 1


def _passthrough(broker, topic, output_dir, workers_argv):
  name = topic(partitions=2)
  publish(broker.bootstrap_servers, name, sample_tickets()[:60])
  return launcher.launch("passthrough", [
      "--bootstrap-servers", broker.bootstrap_servers, "--topic", name, "--output",
      output_dir, "--rows-per-file", "10", *workers_argv])


@pytest.mark.parametrize("mode", ["multi_processing", "multi_threading"])
def test_several_fnapi_workers_read_the_whole_range(broker, topic, output_dir, mode):
  summary = _passthrough(broker, topic, output_dir,
                         [f"--direct_running_mode={mode}", "--direct_num_workers=2"])
  assert summary.exit_code == 0 and summary.rows_written == 60
  assert summary.offsets_covered == summary.offsets_in_range == 60
  assert sum(summary.committed_offsets.values()) == 60


def test_a_run_that_does_not_cover_its_range_fails(broker, topic, output_dir, monkeypatch):
  """Without the workaround FnApiRunner's workers drop the read's deferred remainder
  (apache/beam#19842): the run read one batch per partition. It must not exit 0."""
  from tierflow.pipelines import options
  monkeypatch.setattr(options, "_drops_deferred_work", lambda _: False)
  summary = _passthrough(broker, topic, output_dir,
                         ["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
  assert summary.rows_written == 20  # what the runner dropped is not ours to fix
  assert summary.exit_code == launcher.EXIT_FAILED
  assert any("covered 20 of the 60 offsets" in p for p in summary.problems)
  assert sum(summary.committed_offsets.values()) == 20  # nothing past the files


@pytest.mark.slow
def test_attempts_that_time_out_but_are_billed_count_against_the_cap(tmp_path):
  """The frontier answers every request, but only after the client gave up: the provider
  bills work the client never sees. Each such attempt is charged at its strict cost, and
  retried only once the budget has reserved it again, so what the endpoint billed stays
  within the cap (charging them nothing let the same routing bill several times the cap).
  (A run stops on such a tier, test_fault_matrix.py; this is the budget's part of it.)"""
  from tierflow.pipelines.budget import Budget, BudgetPool
  from tierflow.pipelines.routing import Router
  from tierflow.prices import Usage, load_price_book
  cap = 0.02
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier"),
                           max_logged_requests=100_000) as server:
    server.faults.add("timeout", count=-1, model="frontier", seconds=0.5)
    run = RunConfig.from_dict(yaml.safe_load(pathlib.Path(local_config(
        tmp_path / "tickets.yaml", server, budget=cap,
        small=dict(batch_size=4, concurrency=2),
        frontier=dict(batch_size=2, concurrency=2, max_retries=2, timeout_s=0.2,
                      breaker_failures=0))).read_text()))
    router = Router(run, load_price_book(run.price_book)).open()
    try:
      pool = BudgetPool(Budget(cap, per_process=True)).for_batch(120, 120)
      routed = router.route(sample_tickets()[:120], pool)
    finally:
      router.close()
    time.sleep(1)  # the last stalled answers are billed after the client gave up
    price = load_price_book().price("claude-sonnet-4-6")
    billed = [price.cost(Usage(input_tokens=q.usage["input_tokens"],
                               output_tokens=q.usage["output_tokens"],
                               cache_write_tokens=q.usage.get("cache_creation_input_tokens", 0),
                               cache_read_tokens=q.usage.get("cache_read_input_tokens", 0)))
              for q in server.requests if q.model == "frontier" and q.usage]
  assert len(routed) == 120
  print(f"cap ${cap}: the endpoint billed ${sum(billed):.4f} over {len(billed)} attempts")
  assert billed, "no frontier attempt was made: the test proves nothing"
  assert sum(billed) <= cap
