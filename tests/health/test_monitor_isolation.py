"""FleetMonitor assesses a large tenant in a child process: the same report as :func:`assess` in
the broker's process, and the event loop keeps running meanwhile (a real SQLite registry, real
certificates for the checks, 50,000 rows inserted through the registry for the loop test)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import pytest

from broker_plugin.health import Check, FleetMonitor, LiveSession, assess
from broker_plugin.store.base import CertificateKind, SessionUpdate, open_registry

from .kit import DAY, NOW, certificate, insert_fleet, make_ca, policy, revoke, rsa_key, secp256k1_key, store


def _session(record, *, at, live=True, duplicates=0, dup_at=None):
    return SessionUpdate(tenant=record.tenant, device_id=record.device_id, serial=record.serial, kind="device",
                         client_id=record.device_id, node="n1", remote="10.0.0.9:5555", last_seen=at,
                         connected_at=at, disconnected_at=None if live else at, connects=1, duplicates=duplicates,
                         last_duplicate_at=dup_at)


def _monitor(registry, ca, *, isolate_from, live=()):
    return FleetMonitor(registry=registry, policies={"acme": policy()}, ca_certificates={"acme": ca.cas()},
                        node="n1", clock=lambda: NOW, live=lambda: list(live), interval=0,
                        isolate_from=isolate_from)


async def test_a_report_from_the_child_process_is_the_report_of_assess(registry):
    # every check fires at least once, so a value lost on the way to the child or back shows
    ca = make_ca(issuing_days=300 + 20)  # the issuing CA expires in 20 days
    weak = certificate(ca, "tiny", not_before=NOW - 3 * DAY, key=rsa_key(1024))
    odd = certificate(ca, "k1", not_before=NOW - 3 * DAY, key=secp256k1_key())
    late = certificate(ca, "late", not_before=NOW - 25 * DAY)
    dead = certificate(ca, "dead", not_before=NOW - 40 * DAY)
    bad = certificate(ca, "bad", not_before=NOW - 3 * DAY)
    twin = certificate(ca, "twin", not_before=NOW - 3 * DAY)
    old = certificate(ca, "moved-on", not_before=NOW - 26 * DAY)
    new = certificate(ca, "moved-on", not_before=NOW - 6 * DAY)
    op = certificate(ca, "op1", not_before=NOW - 25 * DAY, kind=CertificateKind.OPERATOR)
    records = [weak, odd, late, dead, bad, twin, old, new, op]
    await store(registry, *records)
    await registry.record_sessions([
        _session(bad, at=NOW - DAY), _session(late, at=NOW - 2 * DAY, live=False),
        _session(twin, at=NOW - dt.timedelta(hours=1), duplicates=2, dup_at=NOW - dt.timedelta(hours=1)),
    ])
    await revoke(registry, bad, NOW - DAY / 2)
    live = [LiveSession(tenant="acme", device_id="bad", serial=bad.serial, client_id="bad", remote="10.0.0.9:5555")]

    expected = assess(tenant="acme", now=NOW, policy=policy(), certificates=[r async for r in registry.certificates("acme")],
                      sessions=await registry.sessions("acme"), live=live, ca_certificates=ca.cas())
    assert {f.check for f in expected.findings} == set(Check)

    isolated = _monitor(registry, ca, isolate_from=0, live=live)
    [first] = await isolated.run()
    assert first == expected
    # the child told the broker every key it parsed; the next run sends keys, not DER, and agrees
    assert set(isolated._keys) == {r.spki_sha256 for r in records}
    [second] = await isolated.run()
    assert second == expected
    [inline] = await _monitor(registry, ca, isolate_from=len(records) + 1, live=live).run()
    assert inline == expected
    [stored] = await registry.health_reports("acme")
    assert stored.report["finding_counts"] == expected.finding_counts()


async def _insert(registry, ca, count: int) -> list[dt.datetime]:
    """``count`` certificates of their own devices and keys, issued over 35 days; their not_after times."""
    return [r.not_after for r in await insert_fleet(registry, ca, count)]


async def test_a_report_over_50000_certificates_keeps_the_loop_ticking(tmp_path):
    count = 50_000
    registry = await open_registry(f"sqlite:///{tmp_path}/registry.db")
    try:
        ca = make_ca()
        not_afters = await _insert(registry, ca, count)
        monitor = _monitor(registry, ca, isolate_from=1000)
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        try:
            [report] = await monitor.run()
        finally:
            done.set()
            await ticking
        # a report on the loop in one piece holds it for seconds at this size (~25 us a record)
        assert len(gaps) > 50 and max(gaps) < 0.5, (len(gaps), max(gaps))
        expired = sum(1 for t in not_afters if t <= NOW)
        assert 0 < expired < count
        assert report.counts == {"active": count - expired, "expired": expired, "revoked": 0}
        assert len(report.devices) == count  # one device per certificate, each in the report
    finally:
        await registry.close()


def test_isolate_from_is_checked():
    with pytest.raises(ValueError, match="isolate_from"):
        FleetMonitor(registry=None, policies={}, ca_certificates={}, node="n1", clock=lambda: NOW, isolate_from=-1)


async def test_a_child_that_dies_stops_the_report_early_with_its_error(registry, monkeypatch):
    """An assessment process gone at start (here: it exits 3 at once) fails the report with its exit
    status, and the broker stops reading the fleet for it: no session page is read, and the
    certificate pages stop soon after the pipe is found closed (a write to it only logs a warning)."""
    import broker_plugin.health as health

    ca = make_ca()
    await insert_fleet(registry, ca, 12 * health._SLICE)  # noqa: SLF001
    monkeypatch.setattr(health, "_CHILD_CODE", "import sys; sys.exit(3)")
    pages: list[str] = []
    certificates, session_pages = registry.certificates, registry.session_pages

    async def counted_certificates(*args, **kwargs):
        async for record in certificates(*args, **kwargs):
            pages.append("certificate")
            yield record

    async def counted_sessions(*args, **kwargs):
        async for rows in session_pages(*args, **kwargs):
            pages.append("session")
            yield rows

    monkeypatch.setattr(registry, "certificates", counted_certificates)
    monkeypatch.setattr(registry, "session_pages", counted_sessions)
    with pytest.raises(RuntimeError, match=r"exit 3"):
        await _monitor(registry, ca, isolate_from=0)._assess("acme", NOW, [])  # noqa: SLF001
    assert "session" not in pages
    assert pages.count("certificate") < 12 * health._SLICE  # noqa: SLF001
