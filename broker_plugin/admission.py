"""Admission control in front of the CA: a bounded request queue and a per-device rate limit.

A storm must degrade to "later", never to timeouts: a request that does not fit gets an immediate
refusal with a retry-after instead of waiting. :meth:`AdmissionQueue.offer` decides at once
(``None`` = queued, else a :class:`Refusal` with ``BUSY`` or ``RATE_LIMITED`` and a retry-after in
whole seconds); worker tasks take batches with :meth:`AdmissionQueue.take`. The clock and the
random source are parameters, so the decisions are testable with a fake clock.

This module knows nothing of MQTT, certificates or the CA.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import random
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from protocol.codes import ErrorCode

__all__ = ["AdmissionQueue", "RateLimiter", "Refusal"]

T = TypeVar("T")

_DRAIN_WINDOW = 10.0  # seconds of take() history that must show work before the estimate is trusted
_MIN_DRAINED = 50  # requests taken in that window before the estimate is trusted (a held worker is not a rate)
_CAPACITY_WINDOW = 60.0  # seconds over which the best drain rate is remembered
_CAPACITY_SPAN = 2  # the drain rate is measured over this many whole seconds (one big batch is not a rate)


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was not queued, and after how many whole seconds to retry (>= 1)."""

    code: ErrorCode
    retry_after: int
    text: str


class RateLimiter:
    """Token buckets per key: ``rate`` requests per second on average, bursts of ``burst``.

    ``rate == 0`` disables the limit. At most ``max_keys`` buckets are kept: past that, full
    buckets (keys idle long enough to have refilled) are forgotten, which changes no decision.
    """

    def __init__(self, *, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 100_000) -> None:
        if rate < 0 or not math.isfinite(rate):
            raise ValueError("rate must be a finite number >= 0")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError("burst must be an int >= 1")
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self._rate = float(rate)
        self._burst = burst
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, key: Hashable, now: float) -> float:
        tokens, at = self._buckets.get(key, (float(self._burst), now))
        return min(float(self._burst), tokens + max(0.0, now - at) * self._rate)

    def take(self, key: Hashable) -> float:
        """Spend one token of ``key``: 0.0 if there was one, else the seconds until there is."""
        if self._rate == 0:
            return 0.0
        now = self._clock()
        tokens = self._tokens(key, now)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self._rate
        if key not in self._buckets and len(self._buckets) >= self._max_keys:
            self._prune(now)
        self._buckets[key] = (tokens - 1.0, now)
        return 0.0

    def _prune(self, now: float) -> None:
        full = [k for k in self._buckets if self._tokens(k, now) >= self._burst]
        for k in full:
            del self._buckets[k]


class AdmissionQueue(Generic[T]):
    """A bounded FIFO of requests with immediate refusals.

    ``capacity``: queued requests at most; past it :meth:`offer` answers ``BUSY`` with
    ``retry_after = ceil(period * (1 + rng()))`` (jitter in ``[period, 2 period)``, so refused
    devices do not come back together). ``period`` is ``busy_retry`` unless more requests were
    refused than the queue drains: then it is the time the workers need for the requests waiting
    (the queue plus the requests refused in the last retry cycle, each of which comes back once per
    cycle) at the best drain rate of the last minute (over two whole seconds), at most
    ``busy_retry_max``. So a storm's retries arrive about as fast as they can be served, instead
    of returning every few seconds and spending the broker on refusals. The best rate, not the
    latest: once the queue runs short, the workers drain only what arrives, and a rate measured
    then is the retry schedule's own echo (a 50,000-device storm's CA idled at ~140
    certificates/s while devices waited out a minute-long retry-after). ``rate``/``burst``: the per-key :class:`RateLimiter`
    (``RATE_LIMITED``, retry-after = time until the next token). A ``BUSY`` refusal spends no token.
    """

    def __init__(self, *, capacity: int = 2000, busy_retry: float = 5.0, rate: float = 0.2, burst: int = 3,
                 clock: Callable[[], float] = time.monotonic, rng: Callable[[], float] = random.random,
                 busy_retry_max: float = 60.0) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError("capacity must be an int >= 1")
        if not busy_retry > 0:
            raise ValueError("busy_retry must be > 0 seconds")
        if not busy_retry_max >= busy_retry or not math.isfinite(busy_retry_max):
            raise ValueError("busy_retry_max must be a finite number >= busy_retry")
        self._capacity = capacity
        self._busy_retry = float(busy_retry)
        self._busy_retry_max = float(busy_retry_max)
        self._period = float(busy_retry)
        self._clock = clock
        self._rng = rng
        self._taken: collections.deque[tuple[float, int]] = collections.deque()  # (when, how many)
        self._per_second: collections.deque[list[int]] = collections.deque()  # [whole second, taken in it]
        self._first_take: float | None = None
        self._refused_at: collections.deque[float] = collections.deque()  # BUSY refusals of the current cycle
        self.limiter = RateLimiter(rate=rate, burst=burst, clock=clock)
        self._items: collections.deque[T] = collections.deque()
        self._ready: asyncio.Event | None = None
        self.refused_busy = 0
        self.refused_rate = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def capacity(self) -> int:
        """Most requests queued at once."""
        return self._capacity

    def offer(self, key: Hashable, item: T) -> Refusal | None:
        """Queue ``item`` for ``key`` (the requester): ``None``, or why not (nothing queued then)."""
        if len(self._items) >= self._capacity:
            self.refused_busy += 1
            wait = self.busy_period() * (1.0 + self._rng())
            return Refusal(ErrorCode.BUSY, max(1, math.ceil(wait)),
                           f"server busy ({self._capacity} requests queued); retry later")
        wait = self.limiter.take(key)
        if wait > 0:
            self.refused_rate += 1
            return Refusal(ErrorCode.RATE_LIMITED, max(1, math.ceil(wait)), "too many requests from this client")
        self._items.append(item)
        if self._ready is not None:
            self._ready.set()
        return None

    def busy_period(self) -> float:
        """The base of the next BUSY retry-after (see the class docstring); records one refusal."""
        now = self._clock()
        self._refused_at.append(now)
        while self._refused_at and self._refused_at[0] < now - 1.5 * self._period:  # a cycle: [period, 2 period)
            self._refused_at.popleft()
        while self._taken and self._taken[0][0] < now - _DRAIN_WINDOW:
            self._taken.popleft()
        drained = sum(n for _, n in self._taken)
        if drained < _MIN_DRAINED or self._first_take is None:
            self._period = self._busy_retry  # no drain measured yet (or workers stalled): the configured wait
            return self._period
        span = min(_DRAIN_WINDOW, max(1.0, now - self._first_take))
        rate = max(drained / span, self.drain_capacity(now))
        waiting = len(self._refused_at) + len(self._items)
        self._period = min(self._busy_retry_max, max(self._busy_retry, waiting / rate))
        return self._period

    def drain_capacity(self, now: float | None = None) -> float:
        """The best drain rate (requests per second) over two whole seconds of the last minute; 0 if none."""
        now = self._clock() if now is None else now
        while self._per_second and self._per_second[0][0] < now - _CAPACITY_WINDOW:
            self._per_second.popleft()
        best = 0
        window: collections.deque[list[int]] = collections.deque()
        total = 0
        current = math.floor(now)
        for bucket in self._per_second:
            if bucket[0] >= current:
                break  # the second under way is not whole yet
            window.append(bucket)
            total += bucket[1]
            while window[0][0] <= bucket[0] - _CAPACITY_SPAN:
                total -= window.popleft()[1]
            best = max(best, total)
        return best / _CAPACITY_SPAN

    def taken_rate(self) -> float:
        """Requests taken per second over the last ``_DRAIN_WINDOW`` (10) seconds."""
        since = self._clock() - _DRAIN_WINDOW
        return sum(n for at, n in self._taken if at >= since) / _DRAIN_WINDOW

    def _record_take(self, now: float, n: int) -> None:
        if self._first_take is None:
            self._first_take = now
        while self._taken and self._taken[0][0] < now - _DRAIN_WINDOW:  # bounded without refusals too
            self._taken.popleft()
        self._taken.append((now, n))
        second = math.floor(now)
        if self._per_second and self._per_second[-1][0] == second:
            self._per_second[-1][1] += n
        else:
            self._per_second.append([second, n])

    def take_nowait(self, most: int) -> list[T]:
        """Remove and return up to ``most`` queued items now (possibly none), oldest first."""
        batch = [self._items.popleft() for _ in range(min(max(most, 0), len(self._items)))]
        if batch:
            self._record_take(self._clock(), len(batch))
        if not self._items and self._ready is not None:
            self._ready.clear()
        return batch

    async def take(self, most: int) -> list[T]:
        """Wait until something is queued, then remove and return up to ``most`` items, oldest first."""
        if most < 1:
            raise ValueError("most must be >= 1")
        if self._ready is None:
            self._ready = asyncio.Event()
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        batch = [self._items.popleft() for _ in range(min(most, len(self._items)))]
        now = self._clock()
        self._record_take(now, len(batch))
        if not self._items:
            self._ready.clear()
        return batch
