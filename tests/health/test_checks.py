"""Every fleet-health check over a real registry (SQLite and PostgreSQL), with certificates really
signed by a test CA and a fixed clock."""

from __future__ import annotations

import datetime as dt

import pytest

from broker_plugin.health import (
    Check,
    HealthSettings,
    LiveSession,
    Severity,
    assess,
    assess_registry,
    expiry_buckets,
)
from broker_plugin.store.base import CertificateKind, SessionUpdate
from protocol.renewal import RenewalPolicy, renewal_time

from .kit import DAY, NOW, certificate, make_ca, policy, revoke, rsa_key, secp256k1_key, store


def of(report, check):
    return [f for f in report.findings if f.check is check]


def moment(record):
    return renewal_time(record.device_id, not_before=record.not_before, not_after=record.not_after,
                        policy=RenewalPolicy(start=0.6, end=0.8))


async def test_states_expiry_buckets_and_forecast(registry):
    ca = make_ca()
    young = certificate(ca, "young", not_before=NOW - 10 * DAY)           # expires in 20 d, renews in 8..14 d
    due = certificate(ca, "due", not_before=NOW - 25 * DAY)               # expires in 5 d, past its moment
    gone = certificate(ca, "gone", not_before=NOW - 40 * DAY)             # expired 10 d ago
    revoked = certificate(ca, "revoked", not_before=NOW - 5 * DAY)
    old = certificate(ca, "renewed", not_before=NOW - 20 * DAY)           # superseded by `new`
    new = certificate(ca, "renewed", not_before=NOW - 2 * DAY)
    year = certificate(ca, "year", not_before=NOW - DAY, days=365)
    await store(registry, young, due, gone, revoked, old, new, year)
    await revoke(registry, revoked, NOW - DAY)
    pol = policy(profiles={"identity": {"lifetime": "365d", "renewal_window": [0.6, 0.8]}})
    report = await assess_registry(registry, tenant="acme", policy=pol, now=NOW,
                                   settings=HealthSettings(forecast_days=400))

    assert report.counts == {"active": 5, "expired": 1, "revoked": 1}
    # the superseded certificate is not "expiring": its device already has a newer one
    assert report.expiring == {7: 1, 30: 3, 90: 3}
    assert report.overdue == 1
    forecast = dict(report.forecast)
    assert len(forecast) == 400 and min(forecast) == NOW.date()
    expected: dict[dt.date, int] = {}
    for record in (young, new, year):
        expected[moment(record).date()] = expected.get(moment(record).date(), 0) + 1
    assert {day: n for day, n in forecast.items() if n} == expected
    assert NOW + 8 * DAY <= moment(young) <= NOW + 14 * DAY


async def test_device_expiring_and_no_recent_renewal(registry):
    ca = make_ca()
    late = certificate(ca, "late", not_before=NOW - 25 * DAY)         # past its moment, 5 days left
    fine = certificate(ca, "fine", not_before=NOW - 5 * DAY)          # before its moment
    dead = certificate(ca, "dead", not_before=NOW - 40 * DAY)         # expired 10 days ago
    replaced = certificate(ca, "moved-on", not_before=NOW - 26 * DAY)
    successor = certificate(ca, "moved-on", not_before=NOW - 6 * DAY)
    operator = certificate(ca, "ops-1", not_before=NOW - 20 * DAY, kind=CertificateKind.OPERATOR)
    claim = certificate(ca, "claim-1", not_before=NOW - 29 * DAY, kind=CertificateKind.BOOTSTRAP)
    await store(registry, late, fine, dead, replaced, successor, operator, claim)

    report = await assess_registry(registry, tenant="acme", policy=policy(), now=NOW)
    expiring = {f.subject: f for f in of(report, Check.DEVICE_CERTIFICATE_EXPIRING)}
    assert set(expiring) == {f"acme/late/{late.serial:x}", f"acme/ops-1/{operator.serial:x}"}
    assert expiring[f"acme/late/{late.serial:x}"].severity is Severity.HIGH
    assert expiring[f"acme/ops-1/{operator.serial:x}"].severity is Severity.MEDIUM
    stale = of(report, Check.NO_RECENT_RENEWAL)
    assert [f.subject for f in stale] == [f"acme/dead/{dead.serial:x}"]
    assert stale[0].severity is Severity.HIGH and stale[0].details["expired"] is True

    # a tighter threshold also catches the device that is late but not yet expired
    strict = await assess_registry(registry, tenant="acme", policy=policy(), now=NOW,
                                   settings=HealthSettings(days_without_renewal=20))
    subjects = {f.subject: f.severity for f in of(strict, Check.NO_RECENT_RENEWAL)}
    assert subjects == {f"acme/dead/{dead.serial:x}": Severity.HIGH, f"acme/late/{late.serial:x}": Severity.MEDIUM}
    # findings come most severe first
    ranks = [list(Severity).index(f.severity) for f in strict.findings]
    assert ranks == sorted(ranks)

    # once revoked, a decommissioned device stops being reported
    await revoke(registry, dead, NOW - DAY)
    after = await assess_registry(registry, tenant="acme", policy=policy(), now=NOW)
    assert of(after, Check.NO_RECENT_RENEWAL) == []


@pytest.mark.parametrize(("issuing_left", "severity"), [(200, None), (60, Severity.HIGH), (10, Severity.CRITICAL),
                                                         (-1, Severity.CRITICAL)])
def test_ca_certificate_expiring(issuing_left, severity):
    start = NOW - 300 * DAY
    ca = make_ca(start=start, issuing_days=300 + issuing_left)
    report = assess(tenant="acme", now=NOW, policy=policy(), certificates=[], ca_certificates=ca.cas())
    found = of(report, Check.CA_CERTIFICATE_EXPIRING)
    if severity is None:
        assert found == []
    else:
        assert [(f.subject, f.severity) for f in found] == [("acme/ca/issuing", severity)]
        assert ("EXPIRED" in found[0].text) is (issuing_left < 0)
    # the root outlives the 90-day horizon; a horizon of 10000 days reaches it too
    wide = assess(tenant="acme", now=NOW, policy=policy(), certificates=[], ca_certificates=ca.cas(),
                  settings=HealthSettings(ca_expiry_days=10000))
    assert "acme/ca/root" in {f.subject for f in of(wide, Check.CA_CERTIFICATE_EXPIRING)}


async def test_weak_keys(registry):
    ca = make_ca()
    start = NOW - 3 * DAY
    rsa1024 = certificate(ca, "tiny", not_before=start, key=rsa_key(1024))
    rsa2048 = certificate(ca, "mid", not_before=start, key=rsa_key(2048))
    k1 = certificate(ca, "k1", not_before=start, key=secp256k1_key())
    p256 = certificate(ca, "good", not_before=start)
    gone = certificate(ca, "gone", not_before=start, key=rsa_key(1024))
    await store(registry, rsa1024, rsa2048, k1, p256, gone)
    await revoke(registry, gone, NOW - DAY)

    report = await assess_registry(registry, tenant="acme", policy=policy(), now=NOW)
    weak = {f.subject.split("/")[1]: f for f in of(report, Check.WEAK_KEY)}
    assert set(weak) == {"tiny", "k1"}  # revoked certificates are not reported
    assert weak["tiny"].severity is Severity.HIGH and weak["tiny"].details["rsa_bits"] == 1024
    assert weak["k1"].details["key_type"] == "ec:secp256k1"

    # a policy change: RSA now needs 3072 bits, P-256 is no longer allowed
    changed = policy(key_policy={"allowed": ["p384", "rsa"], "rsa_min_bits": 3072})
    cache: dict[bytes, tuple[str, int]] = {}
    again = await assess_registry(registry, tenant="acme", policy=changed, now=NOW, key_cache=cache)
    weak = {f.subject.split("/")[1]: f.severity for f in of(again, Check.WEAK_KEY)}
    assert weak == {"tiny": Severity.HIGH, "mid": Severity.MEDIUM, "k1": Severity.HIGH, "good": Severity.MEDIUM}
    assert cache[rsa2048.spki_sha256] == ("rsa", 2048)


def _session(record, *, at, node="n1", live=True, duplicates=0, dup_at=None, remote="10.0.0.9:5555"):
    return SessionUpdate(tenant=record.tenant, device_id=record.device_id, serial=record.serial, kind="device",
                         client_id=record.device_id, node=node, remote=remote, last_seen=at, connected_at=at,
                         disconnected_at=None if live else at, connects=1, duplicates=duplicates,
                         last_duplicate_at=dup_at)


async def test_revoked_but_still_connected(registry):
    ca = make_ca()
    bad = certificate(ca, "bad", not_before=NOW - 3 * DAY)
    ok = certificate(ca, "ok", not_before=NOW - 3 * DAY)
    await store(registry, bad, ok)
    await registry.record_sessions([_session(bad, at=NOW - DAY), _session(ok, at=NOW - DAY)])
    await revoke(registry, bad, NOW - DAY / 2)

    report = await assess_registry(registry, tenant="acme", policy=policy(), now=NOW)
    found = of(report, Check.REVOKED_STILL_CONNECTED)
    assert [(f.subject, f.severity) for f in found] == [(f"acme/bad/{bad.serial:x}", Severity.CRITICAL)]
    assert "10.0.0.9:5555" in found[0].text

    # the broker passes its own live connections: the kicked session is gone, nothing to report
    assert of(await assess_registry(registry, tenant="acme", policy=policy(), now=NOW, live=[]),
              Check.REVOKED_STILL_CONNECTED) == []
    # once the registry records the disconnect, the registry view agrees
    await registry.record_sessions([_session(bad, at=NOW - DAY / 3, live=False)])
    assert of(await assess_registry(registry, tenant="acme", policy=policy(), now=NOW),
              Check.REVOKED_STILL_CONNECTED) == []
    live = [LiveSession(tenant="acme", device_id="bad", serial=bad.serial, client_id="bad")]
    assert len(of(await assess_registry(registry, tenant="acme", policy=policy(), now=NOW, live=live),
                  Check.REVOKED_STILL_CONNECTED)) == 1


async def test_conflicting_sessions(registry):
    ca = make_ca()
    recent = certificate(ca, "twin", not_before=NOW - 3 * DAY)
    older = certificate(ca, "once", not_before=NOW - 9 * DAY)
    clean = certificate(ca, "clean", not_before=NOW - 3 * DAY)
    await store(registry, recent, older, clean)
    await registry.record_sessions([
        _session(recent, at=NOW - dt.timedelta(hours=1), duplicates=2, dup_at=NOW - dt.timedelta(hours=1)),
        _session(older, at=NOW - 3 * DAY, duplicates=1, dup_at=NOW - 3 * DAY),
        _session(clean, at=NOW - dt.timedelta(hours=1)),
    ])
    report = await assess_registry(registry, tenant="acme", policy=policy(), now=NOW)
    found = of(report, Check.CONFLICTING_SESSIONS)
    assert [(f.subject, f.severity, f.details["duplicates"]) for f in found] == [
        (f"acme/twin/{recent.serial:x}", Severity.HIGH, 2)]
    week = await assess_registry(registry, tenant="acme", policy=policy(), now=NOW,
                                 settings=HealthSettings(duplicate_lookback=7 * DAY))
    assert {f.subject.split("/")[1] for f in of(week, Check.CONFLICTING_SESSIONS)} == {"twin", "once"}


async def test_last_seen_per_device(registry):
    ca = make_ca()
    never = certificate(ca, "never", not_before=NOW - DAY)
    away = certificate(ca, "away", not_before=NOW - 9 * DAY)
    online = certificate(ca, "online", not_before=NOW - DAY)
    await store(registry, never, away, online)
    await registry.record_sessions([_session(away, at=NOW - 5 * DAY, live=False),
                                    _session(online, at=NOW - dt.timedelta(minutes=3))])
    report = await assess_registry(registry, tenant="acme", policy=policy(), now=NOW)
    seen = [(d.device_id, d.last_seen, d.live) for d in report.devices]
    assert seen == [("never", None, False), ("away", NOW - 5 * DAY, False),
                    ("online", NOW - dt.timedelta(minutes=3), True)]


async def test_session_rows_batch_and_counters(registry):
    ca = make_ca()
    record = certificate(ca, "d", not_before=NOW - DAY)
    t0 = NOW - dt.timedelta(hours=2)
    # one period: connect, takeover, disconnect, connect again -- merged into one row update
    written = await registry.record_sessions([
        _session(record, at=t0), _session(record, at=t0 + dt.timedelta(minutes=1), duplicates=1,
                                          dup_at=t0 + dt.timedelta(minutes=1)),
    ])
    assert written == 1
    [row] = await registry.sessions("acme")
    assert row.live and row.connects == 2 and row.duplicates == 1 and row.last_seen == t0 + dt.timedelta(minutes=1)
    await registry.record_sessions([_session(record, at=t0 + dt.timedelta(minutes=5), live=False)])
    [row] = await registry.sessions("acme")
    assert not row.live and row.connects == 3 and row.duplicates == 1
    assert row.last_duplicate_at == t0 + dt.timedelta(minutes=1)
    assert await registry.sessions("acme", live_only=True) == []

    # a storm: 3000 certificates in one call (chunked statements, one transaction)
    many = [SessionUpdate(tenant="acme", device_id=f"s{i}", serial=10_000 + i, kind="device", client_id=f"s{i}",
                          node="n2" if i % 2 else "n1", last_seen=NOW, connected_at=NOW, connects=1)
            for i in range(3000)]
    assert await registry.record_sessions(many) == 3000
    assert len(await registry.sessions("acme", live_only=True)) == 3000
    # a restarting node closes only the sessions it had left open
    assert await registry.close_sessions("n2", NOW + DAY) == 1500
    assert len(await registry.sessions("acme", live_only=True)) == 1500
    with pytest.raises(TypeError):
        await registry.record_sessions(["nope"])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        SessionUpdate(tenant="acme", device_id="", serial=1, kind="device", client_id="x", node="n", last_seen=NOW)


async def test_health_reports_round_trip(registry):
    await registry.put_health_report("acme", "n1", NOW, {"findings": [1]})
    await registry.put_health_report("acme", "n1", NOW + DAY, {"findings": [2]})
    await registry.put_health_report("acme", "n2", NOW, {"findings": []})
    reports = await registry.health_reports("acme")
    assert [(r.node, r.generated_at, r.report) for r in reports] == [
        ("n1", NOW + DAY, {"findings": [2]}), ("n2", NOW, {"findings": []})]
    assert await registry.health_reports("other") == []


def test_settings_and_json_truncation():
    for bad in ({"days_without_renewal": -1}, {"forecast_days": 5000}, {"ca_expiry_days": 1.5},
                {"duplicate_lookback": -DAY}):
        with pytest.raises(ValueError):
            HealthSettings(**bad)
    ca = make_ca()
    records = [certificate(ca, f"d{i}", not_before=NOW - 40 * DAY) for i in range(5)]
    report = assess(tenant="acme", now=NOW, policy=policy(), certificates=records)
    assert report.finding_counts()[str(Check.NO_RECENT_RENEWAL)] == 5
    cut = report.to_json(max_findings_per_check=2)
    assert cut["truncated"] is True and len(cut["findings"]) == 2
    assert cut["finding_counts"]["no-recent-renewal"] == 5
    assert report.to_json()["truncated"] is False
    assert expiry_buckets([NOW - DAY, NOW + DAY, NOW + 10 * DAY, NOW + 60 * DAY, NOW + 100 * DAY], NOW) == {
        "expired": 1, "7d": 1, "30d": 1, "90d": 1, "later": 1}
