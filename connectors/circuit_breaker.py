"""A circuit breaker per model endpoint, so a dead or refusing endpoint ends a run fast.

After ``failures`` attempts in a row have failed (retries count: the client reports
each failed attempt) with an error that says the endpoint, not the record, is the problem — connection refused, timeouts,
5xx, a bad key, or 400s for a request shape the model does not take — the breaker
opens: requests fail at once, each with the last error, instead of every record
spending its retries (a 200-record run against two dead endpoints used to take 569 s
to fail). After ``cooldown_s`` one request is let through; its success closes the
breaker, its failure keeps it open for another cooldown. A 429 never counts: the rate
limiter and ``retry-after`` handle it.

One breaker per endpoint and process (like the rate limiter), shared by the threads of
all bundles on the worker.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

__all__ = ["CircuitBreaker", "CircuitOpen", "TRIPPING_KINDS"]

# ModelCallError kinds that say the endpoint is unusable (429 is a rate, not a fault).
TRIPPING_KINDS = frozenset({"connection", "timeout", "server_error", "auth", "bad_request",
                            "not_found"})


class CircuitOpen(Exception):
  """Raised by ``before()`` while the breaker is open."""


class CircuitBreaker:
  """Closed → (``failures`` tripping failures in a row) → open → (``cooldown_s``) →
  one probe → closed or open again. Thread-safe."""

  def __init__(self, name: str, failures: int = 5, cooldown_s: float = 30.0,
               clock: Callable[[], float] = time.monotonic):
    if failures < 1:
      raise ValueError("a circuit breaker needs failures >= 1")
    self.name, self.failures, self.cooldown_s = name, failures, cooldown_s
    self._clock = clock
    self._lock = threading.Lock()
    self._streak = 0
    self._opened_at: Optional[float] = None
    self._probing = False
    self._last_error = ""

  @property
  def is_open(self) -> bool:
    with self._lock:
      return self._opened_at is not None

  def before(self) -> None:
    """Call before a request: raises ``CircuitOpen`` (with the last error) while open,
    except for the one probe let through after each cooldown."""
    with self._lock:
      if self._opened_at is None:
        return
      if not self._probing and self._clock() - self._opened_at >= self.cooldown_s:
        self._probing = True
        return
      raise CircuitOpen(f"{self.name}: circuit open after {self.failures} failed attempts "
                        f"in a row; last: {self._last_error[:200]}")

  def succeeded(self) -> None:
    with self._lock:
      self._streak, self._opened_at, self._probing = 0, None, False

  def failed(self, kind: str, message: str) -> None:
    """Record a failed attempt (``kind`` as in ``ModelCallError``)."""
    with self._lock:
      if kind not in TRIPPING_KINDS:  # the endpoint answered (a 429, a garbled body)
        if self._probing:  # not a healthy answer either: another cooldown
          self._opened_at, self._probing = self._clock(), False
        return
      self._streak += 1
      self._last_error = f"{kind}: {message}"
      if self._probing or (self._opened_at is None and self._streak >= self.failures):
        self._opened_at = self._clock()
        self._probing = False
