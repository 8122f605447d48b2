"""Admission queue and rate limiter with a fake clock and a fixed random source."""

from __future__ import annotations

import asyncio

import pytest

from broker_plugin.admission import AdmissionQueue, RateLimiter
from protocol.codes import ErrorCode


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_burst_then_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=0.2, burst=3, clock=clock)
    assert [limiter.take("d") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("d") == pytest.approx(5.0)
    clock.now += 2.5
    assert limiter.take("d") == pytest.approx(2.5)
    clock.now += 2.5
    assert limiter.take("d") == 0.0
    assert limiter.take("other") == 0.0
    clock.now += 1000
    assert [limiter.take("d") for _ in range(4)][-1] > 0  # refills to the burst, not beyond


def test_rate_zero_means_no_limit() -> None:
    limiter = RateLimiter(rate=0, burst=1, clock=FakeClock())
    assert all(limiter.take("d") == 0.0 for _ in range(100))


def test_idle_buckets_are_forgotten_past_max_keys() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=1, clock=clock, max_keys=10)
    for i in range(10):
        limiter.take(i)
    clock.now += 5  # all refilled
    limiter.take("new")
    assert len(limiter) == 1


def test_full_queue_is_busy_with_jitter_and_spends_no_token() -> None:
    clock = FakeClock()
    draws = iter([0.0, 0.5, 0.999])
    queue: AdmissionQueue[int] = AdmissionQueue(capacity=2, busy_retry=4.0, rate=0.2, burst=3, clock=clock,
                                                rng=lambda: next(draws))
    assert queue.offer("a", 1) is None and queue.offer("b", 2) is None
    refusals = [queue.offer("c", n) for n in range(3)]
    assert [r.code for r in refusals] == [ErrorCode.BUSY] * 3  # type: ignore[union-attr]
    assert [r.retry_after for r in refusals] == [4, 6, 8]  # type: ignore[union-attr]
    assert len(queue) == 2 and queue.refused_busy == 3
    assert queue.limiter.take("c") == 0.0  # c's burst is intact


def test_rate_limited_retry_after_is_time_to_next_token() -> None:
    clock = FakeClock()
    queue: AdmissionQueue[int] = AdmissionQueue(capacity=100, rate=0.2, burst=3, clock=clock)
    assert [queue.offer("d", i) for i in range(3)] == [None, None, None]
    refusal = queue.offer("d", 3)
    assert refusal is not None and refusal.code == ErrorCode.RATE_LIMITED and refusal.retry_after == 5
    clock.now += 4.2
    refusal = queue.offer("d", 4)
    assert refusal is not None and refusal.retry_after == 1
    assert len(queue) == 3


async def test_take_waits_and_returns_batches_in_order() -> None:
    queue: AdmissionQueue[int] = AdmissionQueue(capacity=1000, rate=0)
    waiter = asyncio.ensure_future(queue.take(64))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    for i in range(100):
        queue.offer("k", i)
    assert await waiter == list(range(64))
    assert await queue.take(64) == list(range(64, 100))
    assert len(queue) == 0


async def test_take_nowait_tops_up_a_batch_without_waiting() -> None:
    queue: AdmissionQueue[int] = AdmissionQueue(capacity=1000, rate=0)
    assert queue.take_nowait(10) == []
    for i in range(5):
        queue.offer("k", i)
    assert queue.take_nowait(3) == [0, 1, 2]
    assert queue.take_nowait(10) == [3, 4]
    # emptied by take_nowait: a later take waits for the next offer instead of spinning
    waiter = asyncio.ensure_future(queue.take(10))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    queue.offer("k", 99)
    assert await waiter == [99]


@pytest.mark.parametrize("kwargs", [{"capacity": 0}, {"busy_retry": 0}, {"rate": -1}, {"burst": 0}])
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AdmissionQueue(**kwargs)  # type: ignore[arg-type]


def _flooded(clock: FakeClock, *, busy_retry: float = 1.0, busy_retry_max: float = 600.0) -> AdmissionQueue[int]:
    """A queue whose capacity (10) is full, with the jitter draw fixed at 0 (retry_after = ceil(period))."""
    queue: AdmissionQueue[int] = AdmissionQueue(capacity=10, busy_retry=busy_retry, busy_retry_max=busy_retry_max,
                                                rate=0, clock=clock, rng=lambda: 0.0)
    for i in range(10):
        queue.offer("k", i)
    return queue


def _drain(queue: AdmissionQueue[int], clock: FakeClock, *, per_second: int, seconds: int) -> None:
    """``per_second`` requests taken each second for ``seconds`` seconds, the queue topped up again."""
    for _ in range(seconds):
        for _ in range(per_second // 10):
            queue.take_nowait(10)
            for i in range(10):
                assert queue.offer("k", i) is None
        clock.now += 1.0


def test_busy_retry_after_follows_the_best_drain_rate_not_the_latest() -> None:
    # Saturated workers drained 1,000/s; then, the devices having been sent away, only 100/s
    # arrived and were drained. Sized by the recent rate, 20,000 refused devices would wait
    # ~200 s while the workers idle; by the best rate they come back over ~20 s.
    clock = FakeClock()
    queue = _flooded(clock)
    _drain(queue, clock, per_second=1000, seconds=3)
    _drain(queue, clock, per_second=100, seconds=20)
    refusals = [queue.offer("d", n) for n in range(20_000)]
    assert all(r is not None and r.code == ErrorCode.BUSY for r in refusals)
    assert 19 <= refusals[-1].retry_after <= 21  # type: ignore[union-attr]
    assert queue.drain_capacity() == pytest.approx(1000.0)


def test_best_drain_rate_is_forgotten_after_a_minute() -> None:
    clock = FakeClock()
    queue = _flooded(clock)
    _drain(queue, clock, per_second=1000, seconds=3)
    _drain(queue, clock, per_second=100, seconds=70)
    assert queue.drain_capacity() == pytest.approx(100.0)
    refusals = [queue.offer("d", n) for n in range(2_000)]
    assert 19 <= refusals[-1].retry_after <= 21  # type: ignore[union-attr]


def test_one_big_batch_is_not_a_drain_rate() -> None:
    # 500 taken at once, nothing more: spread over the two-second span it is 250/s, not 500/s
    clock = FakeClock()
    queue: AdmissionQueue[int] = AdmissionQueue(capacity=1000, rate=0, clock=clock)
    for i in range(500):
        queue.offer("k", i)
    assert len(queue.take_nowait(500)) == 500
    assert queue.drain_capacity() == 0.0  # the second under way is not counted yet
    clock.now += 1.0
    assert queue.drain_capacity() == pytest.approx(250.0)


def test_busy_retry_after_stays_within_its_bounds_with_jitter() -> None:
    clock = FakeClock()
    draws = iter([0.0, 0.999] * 10_002)
    queue: AdmissionQueue[int] = AdmissionQueue(capacity=10, busy_retry=5.0, busy_retry_max=60.0, rate=0,
                                                clock=clock, rng=lambda: next(draws))
    for i in range(10):
        queue.offer("k", i)
    _drain(queue, clock, per_second=100, seconds=5)
    few = [queue.offer("d", n).retry_after for n in range(2)]  # type: ignore[union-attr]
    assert few == [5, 10]  # little waiting: the configured base, jittered in [T, 2T)
    many = [queue.offer("d", n).retry_after for n in range(20_000)]  # type: ignore[union-attr]
    assert many[-2:] == [60, 120]  # 20,000 at 100/s would be 200 s: capped at busy_retry_max
