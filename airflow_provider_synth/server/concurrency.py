"""How many requests the gateway keeps in flight to its upstream: as many as the upstream sustains, no more.

An engine such as vLLM takes every request it is sent and queues or batches it; sent too many at once, each one
waits inside the engine, where nothing can see it, until a client timeout throws the work away and sends it again.
So the gateway keeps its requests queued on its own side and adapts its concurrency (AIMD, as TCP does):

* **slow start**: from ``initial``, the limit doubles after each round of answers (one round = as many answers
  as the limit) while nothing says the upstream is saturated; then it grows by one per round;
* **congestion** halves-ish it (x ``decrease``, at most once per round): the round's median time per token is
  more than ``tolerance`` times the best seen (requests slow down because they share the engine, or queue in it),
  the upstream's own queue is not empty (vLLM's ``num_requests_waiting``, when it publishes ``/metrics``), or it
  answered 429/503, or a request hung;
* a request is **hung** only when it has had no answer for ``max(floor, hung_factor x the slowest answer so
  far)``: measured from what the upstream actually does, never a fixed guess of how slow it may be.

Time per token is an answer's latency divided by ``1 + completion tokens``: answers of different lengths compare.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: a request with no answer for this many times the slowest answer seen so far is hung
HUNG_FACTOR = 10.0


@dataclass
class LimitChange:
    """One change of the limit, for logs and tests."""

    at: float
    limit: int
    reason: str


class AdaptiveLimit:
    """An asyncio concurrency limit that adapts to the upstream (see the module docstring).

    :param maximum: the most requests in flight (``upstream_concurrency``).
    :param floor_s: the shortest a request may go unanswered before it counts as hung (``upstream_timeout_s``).
    :param initial: the limit before anything was measured.
    :param tolerance: a round whose median time per token exceeds this multiple of the best is congested.
    :param decrease: the factor applied to the limit on congestion.
    :param clock: monotonic seconds.
    """

    def __init__(self, maximum: int, floor_s: float, *, initial: int = 2, tolerance: float = 2.0,
                 decrease: float = 0.7, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.maximum = max(1, maximum)
        self.floor_s = floor_s
        self.tolerance = tolerance
        self.decrease = decrease
        self.limit = float(min(initial, self.maximum))
        self.in_flight = 0
        self.slowest_s = 0.0
        self.best_per_token: float | None = None
        self.upstream_waiting = 0
        self.changes: list[LimitChange] = []
        self._slow_start = True
        self._round: list[float] = []
        self._congested = False
        self._decreased_in_round = False
        self._changed_at = 0.0
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def current(self) -> int:
        """Requests allowed in flight now."""
        return max(1, int(self.limit))

    def hung_after(self) -> float:
        """Seconds without an answer after which a request is hung."""
        return max(self.floor_s, HUNG_FACTOR * self.slowest_s)

    async def acquire(self) -> None:
        """Wait (on the gateway's side) until one more request may go upstream."""
        while self.in_flight >= self.current:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.in_flight += 1

    def release(self, latency_s: float | None = None, completion_tokens: int = 0, *,
                congested: bool = False) -> None:
        """One request is back: answered after ``latency_s`` (``None``: no answer to learn from), or refused for
        overload (``congested``: a 429, a 503, a hang). Synchronous, so a cancelled request still gives its slot
        back."""
        self.in_flight -= 1
        if congested:
            self._congestion("the upstream refused or hung a request")
        elif latency_s is not None:
            self._sample(latency_s, completion_tokens)
        for waiter in self._waiters:  # all of them: each checks again (one may have been cancelled meanwhile)
            if not waiter.done():
                waiter.set_result(None)

    def observe_queue(self, waiting: int) -> None:
        """The upstream's own queue (vLLM's ``num_requests_waiting``): requests it holds without running them."""
        self.upstream_waiting = waiting
        if waiting > 0:
            self._congested = True

    def _sample(self, latency_s: float, completion_tokens: int) -> None:
        if latency_s > self.slowest_s:
            log.info("slowest upstream answer so far: %.1f s (%d tokens); a request is hung after %.0f s",
                     latency_s, completion_tokens, max(self.floor_s, HUNG_FACTOR * latency_s))
        self.slowest_s = max(self.slowest_s, latency_s)
        per_token = latency_s / (1 + max(0, completion_tokens))
        if self.best_per_token is None or per_token < self.best_per_token:
            self.best_per_token = per_token
        if self.clock() - latency_s < self._changed_at:
            return  # sent under the previous limit: it says nothing about this one
        self._round.append(per_token)
        if len(self._round) >= self.current:
            self._end_round()

    def _end_round(self) -> None:
        median = statistics.median(self._round)
        slow = self.best_per_token is not None and median > self.tolerance * self.best_per_token
        if slow or self._congested or self.upstream_waiting > 0:
            reason = ("the upstream queues requests" if self.upstream_waiting > 0 or self._congested
                      else f"time per token {median:.3f} s, {median / (self.best_per_token or median):.1f}x the best")
            if not self._decreased_in_round:
                self._set(max(1.0, self.limit * self.decrease), reason)
            self._slow_start = False
        elif self.limit < self.maximum:
            grown = self.limit * 2 if self._slow_start else self.limit + 1
            self._set(min(float(self.maximum), grown), "answers keep their pace")
        self._round.clear()
        self._congested = False
        self._decreased_in_round = False

    def _congestion(self, reason: str) -> None:
        self._slow_start = False
        if not self._decreased_in_round:
            self._set(max(1.0, self.limit * self.decrease), reason)
            self._decreased_in_round = True

    def _set(self, limit: float, reason: str) -> None:
        before = self.current
        self.limit = limit
        if self.current != before:
            self._changed_at = self.clock()
            self._round.clear()
            self.changes.append(LimitChange(time.time(), self.current, reason))
            log.info("upstream concurrency %d -> %d: %s", before, self.current, reason)
