"""One ledger for every worker process: budget accounts and rate windows on a Kafka topic.

Worker processes do not ask each other; they append to one partition of one
topic (``tierflow-ledger`` by default) and every process reads it from the
start, applying each message in log order to the same deterministic ``Fold``.
So every process reaches the same decision about every claim, and a claimer
learns its own by reading its claim back. The broker the pipeline reads from is
the only shared thing it needs: no lock service, nothing that can disagree.

* **Budget accounts.** A claim asks for up to ``want`` dollars (at least
  ``need``) of an account with a cap; it is granted what the account has left,
  and, for a bounded run, no more than the run has earned so far: ``cap *
  offsets reported / run offsets`` (``progress`` messages), which paces a
  backfill's spend over its range. A ``release`` charges a claim its real spend
  and gives back the rest. A claim never released (its process died) stays
  charged in full: what a lost process held is the only budget a run cannot use,
  and the spend can never pass the cap.
* **Rate windows.** A claim asks for ``req`` requests and ``tok`` tokens of a
  model endpoint's per-minute limits. It is granted when the grants of the last
  ``60 s + USE_WITHIN_S`` leave room; the claimer must send within
  ``USE_WITHIN_S`` of it. Grants occupy the window whether or not they are used,
  so the provider sees at most the limit in any minute, and a process that died
  or restarted leaves its recent grants in place (no fresh share).

Claims time out (``LedgerConfig.timeout_s``) when the broker does not answer: a
budget claim then gets nothing (escalations are skipped, never overspent) and a
rate claim raises.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Mapping, Optional

__all__ = ["DEFAULT_TOPIC", "Fold", "Ledger", "LedgerConfig", "LedgerUnavailable",
           "USE_WITHIN_S", "ledger_for"]

_LOGGER = logging.getLogger(__name__)
DEFAULT_TOPIC = "tierflow-ledger"
WINDOW_S = 60.0
USE_WITHIN_S = 5.0  # a rate grant must be used within this long
_RETENTION_MS = 30 * 86_400_000


@dataclasses.dataclass(frozen=True)
class LedgerConfig:
  """Where the ledger lives: a topic (one partition) on the pipeline's Kafka.

  Attributes:
    bootstrap_servers: ``host:port[,host:port]``.
    topic: the ledger topic; created (one partition, 30 days' retention) when missing.
    consumer_config: client settings (TLS, SASL), as for the source.
    timeout_s: how long a claim waits for the broker before it fails.
  """
  bootstrap_servers: str
  topic: str = DEFAULT_TOPIC
  consumer_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  timeout_s: float = 60.0

  def __post_init__(self):
    if not self.bootstrap_servers:
      raise ValueError("the ledger needs bootstrap_servers")
    if not self.topic:
      raise ValueError("the ledger needs a topic")


class LedgerUnavailable(RuntimeError):
  """The ledger's broker did not answer a claim in time."""


# --- the fold: pure, the same in every process ---------------------------------------------


class _Account:
  def __init__(self):
    self.outstanding: dict = {}  # claim id -> granted, not yet released
    self.charged = 0.0  # what released claims spent
    self.runs: dict = {}  # run id -> {"offsets", "n", "held"}

  def committed(self) -> float:
    return self.charged + sum(self.outstanding.values())

  def _run(self, run: str, n: int) -> dict:
    state = self.runs.setdefault(run, {"offsets": 0, "n": n, "held": 0.0, "claims": {}})
    state["n"] = max(state["n"], n)
    return state

  def progress(self, run: str, offsets: int, n: int) -> None:
    self._run(run, n)["offsets"] += offsets

  def claim(self, cid: str, want: float, need: float, cap: float, run: str, n: int) -> float:
    if cid in self.outstanding:
      return 0.0  # a duplicate of a message already applied
    state = self._run(run, n)
    room = cap - self.committed()
    if state["n"] > 0:  # a bounded run: paced over its range
      earned = cap * min(1.0, state["offsets"] / state["n"])
      room = min(room, earned - state["held"])
    grant = min(want, room)
    if grant + 1e-12 < need or grant <= 0:
      return 0.0
    self.outstanding[cid] = grant
    state["held"] += grant
    state["claims"][cid] = grant
    return grant

  def release(self, cid: str, spent: float) -> None:
    granted = self.outstanding.pop(cid, None)
    if granted is None:
      return
    spent = max(0.0, spent)
    self.charged += spent
    for state in self.runs.values():
      if cid in state["claims"]:
        state["held"] += spent - state["claims"].pop(cid)


class _Window:
  def __init__(self):
    self.grants: collections.deque = collections.deque()  # (ts_ms, req, tok)

  def claim(self, ts: int, req: int, tok: int, rpm: int, tpm: int) -> tuple[bool, int]:
    """(granted, when to ask again in ms since the epoch)."""
    horizon = int((WINDOW_S + USE_WITHIN_S) * 1000)
    while self.grants and self.grants[0][0] <= ts - horizon:
      self.grants.popleft()
    used_req = sum(r for _, r, _ in self.grants)
    used_tok = sum(t for _, _, t in self.grants)
    if (not rpm or used_req + req <= rpm) and (not tpm or used_tok + tok <= tpm):
      self.grants.append((ts, req, tok))
      return True, ts
    # The earliest time enough old grants leave the window.
    free_req, free_tok, retry = used_req, used_tok, ts + horizon
    for gts, r, t in self.grants:
      free_req -= r
      free_tok -= t
      if (not rpm or free_req + req <= rpm) and (not tpm or free_tok + tok <= tpm):
        retry = gts + horizon
        break
    return False, retry


class Fold:
  """The ledger's state: apply every message in log order; the same everywhere."""

  def __init__(self):
    self.accounts: dict = collections.defaultdict(_Account)
    self.windows: dict = collections.defaultdict(_Window)

  def apply(self, msg: Mapping[str, Any]) -> Any:
    """Applies one message; returns the decision on a claim (else None)."""
    op = msg.get("op")
    if op == "claim":
      return self.accounts[msg["acct"]].claim(msg["id"], float(msg["want"]), float(msg["need"]),
                                             float(msg["cap"]), msg.get("run", ""),
                                             int(msg.get("n", 0)))
    if op == "release":
      self.accounts[msg["acct"]].release(msg["id"], float(msg["spent"]))
    elif op == "progress":
      self.accounts[msg["acct"]].progress(msg.get("run", ""), int(msg["offsets"]),
                                          int(msg.get("n", 0)))
    elif op == "rate":
      return self.windows[msg["scope"]].claim(int(msg["ts"]), int(msg["req"]), int(msg["tok"]),
                                              int(msg.get("rpm") or 0), int(msg.get("tpm") or 0))
    return None


# --- a process's view of the ledger -----------------------------------------------------------


def worker_id() -> str:
  return f"{socket.gethostname()}/{os.getpid()}"


class Ledger:
  """This process's reader and writer of the ledger (``ledger_for`` gives the shared one).

  A thread reads the topic from the start and applies it to the ``Fold``; claims are
  appended and their decisions read back.
  """

  def __init__(self, config: LedgerConfig):
    self.config = config
    self.fold = Fold()
    self._lock = threading.Condition()
    self._waiting: dict = {}  # claim id -> decision (None until read back)
    self._error: Optional[str] = None
    self._producer = None
    self._thread: Optional[threading.Thread] = None
    self._stopped = threading.Event()
    self._started = False
    self._start_lock = threading.Lock()

  # -- setup
  def ensure_topic(self) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic
    from tierflow.connectors.kafka_client import client_settings, resolve_secret_settings
    admin = AdminClient({"bootstrap.servers": self.config.bootstrap_servers,
                         "logger": logging.getLogger("tierflow.kafka.librdkafka"),
                         **resolve_secret_settings(client_settings(self.config.consumer_config))})
    try:
      topics = admin.list_topics(self.config.topic, timeout=self.config.timeout_s).topics
    except Exception as e:  # noqa: BLE001 - one line
      raise LedgerUnavailable(f"cannot reach the ledger's brokers "
                              f"{self.config.bootstrap_servers}: {e}") from None
    found = topics.get(self.config.topic)
    if found is not None and found.error is None and found.partitions:
      return
    futures = admin.create_topics([NewTopic(self.config.topic, 1, 1, config={
        "retention.ms": str(_RETENTION_MS), "cleanup.policy": "delete"})])
    try:
      futures[self.config.topic].result(timeout=self.config.timeout_s)
    except Exception as e:  # noqa: BLE001 - another process created it first is fine
      if "TOPIC_ALREADY_EXISTS" not in str(e) and "already exists" not in str(e):
        raise LedgerUnavailable(
            f"cannot create the ledger topic {self.config.topic} on "
            f"{self.config.bootstrap_servers}: {e}; create it (1 partition) or name another "
            "with --ledger-topic") from None

  def start(self) -> "Ledger":
    with self._start_lock:  # every thread waits until the first has it ready
      if not self._started:
        self._start()
        self._started = True
    return self

  def _start(self) -> None:
    from confluent_kafka import Producer
    from tierflow.connectors.kafka_client import client_settings, resolve_secret_settings
    self.ensure_topic()
    settings = resolve_secret_settings(client_settings(self.config.consumer_config))
    self._producer = Producer({"bootstrap.servers": self.config.bootstrap_servers,
                               "linger.ms": 0, "acks": "all", "client.id": "tierflow-ledger",
                               "logger": logging.getLogger("tierflow.kafka.librdkafka"),
                               **settings})
    ready = threading.Event()
    self._thread = threading.Thread(target=self._read, args=(ready,), daemon=True,
                                    name="tierflow-ledger")
    self._thread.start()
    if not ready.wait(self.config.timeout_s):
      self._stopped.set()
      raise LedgerUnavailable(f"the ledger topic {self.config.topic} could not be read within "
                              f"{self.config.timeout_s:.0f}s")

  def _read(self, ready: threading.Event) -> None:
    from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition
    from tierflow.connectors.kafka_client import new_consumer
    consumer = new_consumer(self.config.bootstrap_servers, self.config.consumer_config,
                            **{"fetch.wait.max.ms": 10, "enable.partition.eof": True,
                               "client.id": "tierflow-ledger"})
    consumer.assign([TopicPartition(self.config.topic, 0, OFFSET_BEGINNING)])
    try:
      while not self._stopped.is_set():
        first = consumer.poll(0.1)  # returns as soon as a message is there
        batch = [first] + consumer.consume(10_000, timeout=0) if first is not None else []
        for m in batch:
          error = m.error()
          if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
              ready.set()
            continue
          try:
            msg = json.loads(m.value())
          except (TypeError, ValueError):
            continue  # not a ledger message
          with self._lock:
            decision = self.fold.apply(msg)
            if msg.get("id") in self._waiting and msg.get("op") in ("claim", "rate"):
              self._waiting[msg["id"]] = (decision,)
              self._lock.notify_all()
    finally:
      consumer.close()

  def close(self) -> None:
    self._stopped.set()
    if self._producer is not None:
      self._producer.flush(10)

  # -- messages
  def _send(self, msg: dict, wait: bool) -> Any:
    self.start()
    cid = msg.setdefault("id", uuid.uuid4().hex)
    msg["worker"] = worker_id()
    if wait:
      with self._lock:
        self._waiting[cid] = None
    errors = []
    self._producer.produce(self.config.topic, json.dumps(msg).encode(), partition=0,
                           key=str(msg.get("acct") or msg.get("scope")).encode(),
                           on_delivery=lambda err, _: err and errors.append(err))
    if not wait:
      self._producer.poll(0)
      return None
    deadline = time.monotonic() + self.config.timeout_s
    self._producer.flush(self.config.timeout_s)
    with self._lock:
      while self._waiting[cid] is None and not errors:
        left = deadline - time.monotonic()
        if left <= 0:
          break
        self._lock.wait(min(left, 1.0))
      decided = self._waiting.pop(cid)
    if decided is None:
      raise LedgerUnavailable(
          f"the ledger ({self.config.topic} on {self.config.bootstrap_servers}) did not "
          f"answer within {self.config.timeout_s:.0f}s"
          + (f": {errors[0]}" if errors else ""))
    return decided[0]

  def claim_budget(self, acct: str, want: float, need: float, cap: float, run: str = "",
                   run_offsets: int = 0) -> tuple[str, float]:
    """(claim id, dollars granted): 0 when the account cannot give ``need``."""
    cid = uuid.uuid4().hex
    grant = self._send({"op": "claim", "id": cid, "acct": acct, "want": want, "need": need,
                        "cap": cap, "run": run, "n": run_offsets}, wait=True)
    return cid, float(grant or 0.0)

  def release(self, acct: str, cid: str, spent: float) -> None:
    self._send({"op": "release", "acct": acct, "id": cid, "spent": spent}, wait=False)

  def progress(self, acct: str, run: str, offsets: int, run_offsets: int) -> None:
    self._send({"op": "progress", "acct": acct, "run": run, "offsets": offsets,
                "n": run_offsets}, wait=False)

  def claim_rate(self, scope: str, req: int, tok: int, rpm: Optional[int],
                 tpm: Optional[int]) -> tuple[bool, float]:
    """(granted, seconds to wait before asking again)."""
    now = int(time.time() * 1000)
    granted, retry_ms = self._send({"op": "rate", "scope": scope, "req": req, "tok": tok,
                                    "rpm": rpm or 0, "tpm": tpm or 0, "ts": now}, wait=True)
    return granted, max(0.0, (retry_ms - time.time() * 1000) / 1000.0)

  def flush(self) -> None:
    if self._producer is not None:
      self._producer.flush(self.config.timeout_s)


_LEDGERS: dict = {}
_LEDGERS_LOCK = threading.Lock()


def ledger_for(config: LedgerConfig) -> Ledger:
  """This process's ledger for the config (started on first use)."""
  key = (config.bootstrap_servers, config.topic)
  with _LEDGERS_LOCK:
    ledger = _LEDGERS.get(key)
    if ledger is None:
      if not _LEDGERS:
        import atexit
        atexit.register(_close_all)
      ledger = _LEDGERS[key] = Ledger(config)
  return ledger.start()


def _close_all() -> None:
  for ledger in list(_LEDGERS.values()):
    ledger.close()
