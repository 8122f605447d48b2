"""The broker benchmarks run end to end with tiny parameters and report no hard failure.

Numbers are not asserted (they depend on the machine); what is asserted is that each bench runs
its whole path -- data directory, broker child process, real TLS clients, CA and echo rounds, the
storm's retries, pinger and registry check -- and that every request got its right reply."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, timeout: float = 60, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=None if env is None else {**os.environ, **env})
    return proc.returncode, proc.stdout + proc.stderr


def test_broker_e2e_bench_runs_with_no_hard_failure() -> None:
    """CA and echo rounds both complete; the ratio line is printed; every CA reply was checked."""
    rc, out = _run("broker_e2e.py", "--devices", "4", "--requests", "40", "--warmup", "4", "--repeat", "1",
                   "--workers", "1")
    assert rc == 0, out
    assert "hard failures: 0" in out, out
    rates = re.search(r"end-to-end issuance ([\d,]+)/s, echo baseline ([\d,]+)/s .*ratio (\d+\.\d+)", out)
    assert rates is not None, out
    assert all(float(g.replace(",", "")) > 0 for g in rates.groups()), out


def test_broker_storm_bench_issues_every_device_exactly_once() -> None:
    """A small storm (a tight queue forces BUSY and resends): every device issued, the registry
    holds exactly one certificate per device, no hard failure. RSS and ping figures are printed
    but not judged here (the exit status also covers the ping p99, a number)."""
    rc, out = _run("broker_storm.py", "--devices", "300", "--connections", "6", "--spread", "0.05", "--queue", "10",
                   "--workers", "1", "--ping-lost-after", "0.5", "--reply-timeout", "30")
    assert rc in (0, 1), out
    assert "issued: 300 / 300 (100.0 %)" in out, out
    assert "'certificates': 300, 'devices': 300, 'devices_twice': 0, 'mismatch': 0" in out, out
    assert "hard failures: 0" in out, out
    assert re.search(r"requests sent: [\d,]+ \(BUSY [1-9]", out), out  # the retry path was exercised
    assert re.search(r"broker RSS: \d+ MiB before, peak \d+ MiB", out), out


def test_feeds_latency_bench_delivers_every_signed_delta() -> None:
    """20 subscribers, 3 timed rounds and the warm-up: every subscriber gets every delta, each
    verifies against the tenant CA and names the revoked certificate's index (the bench exits
    non-zero otherwise); the percentiles and the per-round arrivals are printed. With two CPUs or
    more the broker and the subscribers run on CPUs of their own; the broker's stage diagnosis
    (CERTMQ_BENCH_REVOKE_STAGES) reports every stage for each revocation."""
    rc, out = _run("feeds_latency.py", "--subscribers", "20", "--rounds", "3", "--settle", "0.2",
                   env={"CERTMQ_BENCH_REVOKE_STAGES": "1"})
    assert rc == 0, out
    assert "n=60 " in out and "missing 0; bad (unsigned, wrong index) 0 of 80" in out, out
    assert re.search(r"last arrival by round: \[\d+, \d+, \d+\]", out), out
    assert re.search(r"warm-up rounds .*last arrival \[\d+\] ms", out), out
    assert ("cpus: broker [" in out) == (len(os.sched_getaffinity(0)) >= 2), out
    assert re.search(r"0 request reached the plugin, ms after the bench's PUBLISH: p50 \d", out), out
    for stage in ("2 service answered", "4 signed delta published", "6 last copy written",
                  "7 fan-out CPU (loop thread), us per copy", "8 fan-out waiting for a CPU (run queue), ms"):
        assert re.search(re.escape(stage) + r": p50 \d+(\.\d+)?, max \d", out), (stage, out)
    # one wall / CPU / run-queue triple per revocation, the warm-up's included
    fan_outs = re.search(r"fan-out per revocation, wall / loop-thread CPU / waiting for a CPU, ms: (.*)", out)
    assert fan_outs is not None and len(fan_outs.group(1).split()) == 4, out


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_busy_retry_after_stretches_to_what_the_queue_drains() -> None:
    """The storm fix the benches led to (admission.py): while the queue drains 10 requests a second (100 in the last 10 s)
    and 300 requests were refused within the retry cycle, BUSY asks for about 300 / 10 = 30 s
    (jittered up to 2x), not the configured 4 s; with nothing refused it is back to 4 s; never above
    busy_retry_max."""
    from broker_plugin.admission import AdmissionQueue
    from protocol.codes import ErrorCode

    clock = _Clock()
    queue: AdmissionQueue[int] = AdmissionQueue(capacity=10, busy_retry=4.0, rate=0, clock=clock, rng=lambda: 0.0,
                                                busy_retry_max=60.0)
    for i in range(10):
        assert queue.offer("k", i) is None
    first = queue.offer("k", 99)
    assert first is not None and first.code == ErrorCode.BUSY and first.retry_after == 4  # no drain measured yet

    async def drain_for(seconds: int) -> None:
        for _ in range(seconds):  # 10 taken per second, refilled at once
            assert len(await queue.take(10)) == 10
            for i in range(10):
                assert queue.offer("k", i) is None
            clock.now += 1

    asyncio.run(drain_for(10))
    refusals = [queue.offer("k", n) for n in range(300)]
    assert all(r is not None and r.code == ErrorCode.BUSY for r in refusals)
    assert 28 <= refusals[-1].retry_after <= 33  # type: ignore[union-attr]  # (300 + 10 queued) / 10 per s
    assert [r.retry_after for r in refusals] == sorted(r.retry_after for r in refusals)  # type: ignore[union-attr]
    clock.now += 1000  # the refused cycle is over, nothing drained lately: the configured wait again
    calm = queue.offer("k", 1)
    assert calm is not None and calm.retry_after == 4
    asyncio.run(drain_for(5))
    capped = [queue.offer("k", n) for n in range(5000)][-1]
    assert capped is not None and capped.retry_after == 60
