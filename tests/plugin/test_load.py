"""Admission control through the broker: a full queue answers BUSY at once, the per-device rate
limit answers RATE_LIMITED, and no request is ever left without a reply."""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest

from broker_plugin import plugin as plugin_module
from broker_plugin.plugin import CertmqPlugin
from protocol.codec import encode
from protocol.codes import ErrorCode, Profile
from protocol.messages import CertificateIssued, Error, RenewalRequest

from .conftest import Ca, client, next_message


def _renewal(serial: int) -> tuple[bytes, bytes]:
    rid = os.urandom(16)
    return rid, encode(RenewalRequest(request_id=rid, profile=Profile.IDENTITY, current_serial=serial, reuse_key=True))


async def test_full_queue_answers_busy_with_jittered_retry_after_and_loses_nothing(make_broker, ca: Ca) -> None:
    """With the batch workers held, 2 requests fill the queue (capacity 2) beside the batch in hand;
    every further request gets BUSY at once with retry_after in [busy_retry, 2 busy_retry]. Released,
    the queued ones are issued: each request id gets exactly one reply."""
    broker = await make_broker(queue_capacity=2, batch_size=1, batch_tasks=1, rate=0.0, busy_retry=3.0)
    plugin = CertmqPlugin.of(broker)
    gate = asyncio.Event()
    original = plugin._handle  # noqa: SLF001

    async def held(batch):  # type: ignore[no-untyped-def]
        await gate.wait()
        return await original(batch)

    plugin._handle = held  # type: ignore[method-assign]  # noqa: SLF001
    dev = await ca.mint("acme", "stormy")
    sent: list[bytes] = []
    async with client(broker, dev) as c:
        for _ in range(10):
            rid, payload = _renewal(dev.serial)
            sent.append(rid)
            await c.publish("certmq/v1/acme/dev/stormy/req", payload, qos=1)
        replies: dict[bytes, object] = {}
        with contextlib.suppress(TimeoutError):  # refusals come at once; the held ones do not
            while True:
                _, msg = await next_message(c, 1.0)
                replies[msg.request_id] = msg  # type: ignore[union-attr]
        busy = len(replies)
        assert busy >= 7 and busy + len(plugin.admission) + 1 == 10  # 1 held in a batch, the queue full
        assert len(plugin.admission) == plugin.admission.capacity
        assert all(isinstance(m, Error) and m.code == ErrorCode.BUSY and 3 <= (m.retry_after or 0) <= 6
                   for m in replies.values()), replies
        gate.set()
        for _ in range(10 - busy):
            _, msg = await next_message(c, 10)
            assert msg.request_id not in replies  # type: ignore[union-attr]
            replies[msg.request_id] = msg  # type: ignore[union-attr]
    assert sorted(replies) == sorted(sent)
    assert sum(isinstance(m, CertificateIssued) for m in replies.values()) == 10 - busy


async def test_per_device_rate_limit(make_broker, ca: Ca) -> None:
    """Burst 3 at 1 request per 5 s: the 4th and 5th requests of one device get RATE_LIMITED with a
    retry_after of a few seconds; another device is not affected."""
    broker = await make_broker(rate=0.2, burst=3)
    fast, calm = await ca.mint("acme", "fast"), await ca.mint("acme", "calm")
    async with client(broker, fast) as f, client(broker, calm) as c:
        for _ in range(5):
            await f.publish("certmq/v1/acme/dev/fast/req", _renewal(fast.serial)[1], qos=1)
        got = [(await next_message(f))[1] for _ in range(5)]
        await c.publish("certmq/v1/acme/dev/calm/req", _renewal(calm.serial)[1], qos=1)
        _, other = await next_message(c)
    limited = [m for m in got if isinstance(m, Error) and m.code == ErrorCode.RATE_LIMITED]
    assert len(limited) == 2 and all(1 <= (m.retry_after or 0) <= 5 for m in limited)
    assert sum(isinstance(m, CertificateIssued) for m in got) == 3
    assert isinstance(other, CertificateIssued)


async def test_batch_linger_only_while_requests_flow(make_broker, ca: Ca) -> None:
    """On a quiet broker a lone request goes to the CA at once (a revocation's delta must not wait
    for company); while batches follow each other closely, a short batch lingers batch_linger for
    more requests. Shown by batch membership: two requests 0.1 s apart share a batch only when
    the broker was busy (the linger is 0.4 s)."""
    broker = await make_broker(batch_linger=0.4, batch_tasks=1, rate=0.0)
    plugin = CertmqPlugin.of(broker)
    batches: list[int] = []
    original = plugin._handle  # noqa: SLF001

    async def counted(batch):  # type: ignore[no-untyped-def]
        batches.append(len(batch))
        return await original(batch)

    plugin._handle = counted  # type: ignore[method-assign]  # noqa: SLF001
    dev = await ca.mint("acme", "lingerer")
    async with client(broker, dev) as c:
        for busy in (False, True):
            if busy:
                plugin._last_take = asyncio.get_running_loop().time()  # noqa: SLF001 - as if a batch was just taken
            for _ in range(2):
                await c.publish("certmq/v1/acme/dev/lingerer/req", _renewal(dev.serial)[1], qos=1)
                await asyncio.sleep(0.1)
            for _ in range(2):
                _, msg = await next_message(c, 10)
                assert isinstance(msg, CertificateIssued)
    assert batches == [1, 1, 2]


async def test_health_report_waits_while_the_ca_serves_a_storm(make_broker, ca: Ca,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A report due during a storm (the CA taking > 50 requests/s) waits for its end; then it runs."""
    monkeypatch.setattr(plugin_module, "_HEALTH_QUIET", 1.0)  # 30 s in production
    broker = await make_broker(health_interval=0.2)
    plugin = CertmqPlugin.of(broker)
    storm = {"rate": 1000.0}
    monkeypatch.setattr(plugin.admission, "taken_rate", lambda *_: storm["rate"])
    runs: list[float] = []
    real_run = plugin.fleet.run

    async def counted(*args: object) -> object:
        runs.append(asyncio.get_running_loop().time())
        return await real_run(*args)

    monkeypatch.setattr(plugin.fleet, "run", counted)
    await asyncio.sleep(1.0)  # five intervals: every report is held back
    assert runs == []
    storm["rate"] = 0.0
    for _ in range(60):
        if len(runs) >= 2:
            break
        await asyncio.sleep(0.1)
    assert len(runs) >= 2  # the held report (a quiet second after the storm), then the periodic ones again


async def test_the_health_report_task_stops_with_the_plugins_other_tasks(make_broker) -> None:
    """The periodic report is one of the plugin's tasks, cancelled when the plugin stops (it used
    to be dropped from the list at start and ran on after the registry was closed)."""
    broker = await make_broker(health_interval=0.2)
    plugin = CertmqPlugin.of(broker)
    [health] = [t for t in plugin._tasks if t.get_name() == "certmq-health"]  # noqa: SLF001
    await plugin._stop_tasks()  # noqa: SLF001 - what close() does first
    assert health.cancelled()
