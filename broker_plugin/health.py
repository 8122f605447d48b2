"""Fleet health: certificate states, expiry, renewal load forecast, last seen, and audit findings.

:func:`assess` is a pure function of values: a tenant's certificates (registry records), the
sessions the brokers recorded, the live sessions (the broker's own, or the registry rows still
marked live), the tenant policy, its CA certificates and ``now``. It returns a
:class:`FleetHealth`: the numbers ``certmq status`` prints and the :class:`Finding` list the broker
publishes on ``certmq/v1/{tenant}/ops/findings``. :func:`assess_registry` only gathers those values
from a registry and calls it.

The audit checks, in the spirit of AWS IoT Device Defender (each a finding with severity,
subject and text):

``ca-certificate-expiring``
    the tenant's issuing or root CA certificate expires within ``ca_expiry_days`` (90).
``device-certificate-expiring``
    a device's current certificate is past its renewal moment and expires within
    ``device_expiry_days`` (30); an operator certificate within that time (operators renew by hand).
``no-recent-renewal``
    a device's current certificate is past its renewal moment and was issued more than
    ``days_without_renewal`` days ago: the device has not renewed (expired ones included).
``weak-key``
    an active certificate's key is RSA below 2048 bits, RSA below the policy's minimum, or a key
    type / curve the tenant policy no longer allows (a certificate from before a policy change).
``revoked-still-connected``
    a live session authenticated with a revoked certificate (a kick must have failed).
``conflicting-sessions``
    one certificate connected from a second session while the first was live (a takeover: a
    cloned credential, or a device whose old connection the broker had not yet noticed dead),
    within the last ``duplicate_lookback``.

A device's *current* certificate is its newest (by issuance) of a kind and profile; an older one
still valid after a renewal is superseded and is not expected to renew.

:class:`FleetMonitor` is the broker side: it is told of every connect, disconnect and duplicate
session, keeps them in memory and writes them to the registry in one batch per ``flush`` period
(a connection storm costs one transaction a second), and every ``interval`` seconds (and on
demand, :meth:`FleetMonitor.run`) assesses each tenant, stores the report in the registry (what
``certmq status`` shows as the broker's view) and hands its JSON to a publish callback (the
plugin sends it retained on ``certmq/v1/{tenant}/ops/findings``).

A report must not stall the broker's event loop (every device's traffic waits behind it). A
tenant of :data:`ISOLATE_FROM` certificates or more is read a page at a time, packed into plain
tuples and assessed by :func:`assess` in a short-lived child interpreter; the result comes back
in slices. A thread was not enough: its ~25 us of Python per certificate competed for the GIL
with the loop, which stalled 1.2-1.8 s per report at ~48,000 certificates.

The checks know the registry's value types, the policy and the renewal arithmetic, nothing of
MQTT, SQL or the clock; the monitor knows asyncio and the registry interface, not amqtt.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import enum
import json
import logging
import os
import pickle
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from protocol.codes import Profile
from protocol.renewal import RenewalPolicy, renewal_time

from .ca.policy import ProfilePolicy, TenantPolicy, key_type_of
from .store.base import CertificateKind, CertificateRecord, CertificateStatus, SessionRecord, SessionUpdate

__all__ = [
    "EXPIRY_HORIZONS",
    "ISOLATE_FROM",
    "Check",
    "DeviceSeen",
    "FleetHealth",
    "Finding",
    "FleetMonitor",
    "HealthSettings",
    "KeyCache",
    "LiveSession",
    "Severity",
    "assess",
    "assess_registry",
    "expiry_buckets",
]

#: The "expiring within" horizons of the summary, in days.
EXPIRY_HORIZONS = (7, 30, 90)
_DEVICE_KINDS = (CertificateKind.OPERATIONAL, CertificateKind.FACTORY)
_DAY = dt.timedelta(days=1)
_NEVER = dt.datetime.min.replace(tzinfo=dt.UTC)
#: Findings per check in a published report (the counts stay whole): an MQTT message stays small.
MAX_PUBLISHED_PER_CHECK = 200
#: From this many certificates on, :class:`FleetMonitor` assesses a tenant in a child process.
ISOLATE_FROM = 1000
#: Records (and findings, devices) handled per turn of the event loop by :class:`FleetMonitor`.
_SLICE = 500

log = logging.getLogger(__name__)

KeyCache = MutableMapping[bytes, tuple[str, int]]
"""spki_sha256 -> (key type as the policy names it, RSA bits or 0): keys parsed once per process."""


class Severity(enum.StrEnum):
    """How urgent a finding is."""

    CRITICAL = "critical"
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"


_RANK = {Severity.CRITICAL: 0, Severity.HIGH: 1, Severity.MEDIUM: 2, Severity.LOW: 3}


class Check(enum.StrEnum):
    """The audit checks (module docstring)."""

    CA_CERTIFICATE_EXPIRING = "ca-certificate-expiring"
    DEVICE_CERTIFICATE_EXPIRING = "device-certificate-expiring"
    NO_RECENT_RENEWAL = "no-recent-renewal"
    WEAK_KEY = "weak-key"
    REVOKED_STILL_CONNECTED = "revoked-still-connected"
    CONFLICTING_SESSIONS = "conflicting-sessions"


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Finding:
    """One audit finding: which check, how bad, about what (``tenant/device/serial`` or ``tenant/ca/role``)."""

    check: Check
    severity: Severity
    subject: str
    text: str
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the published form)."""
        return {"check": str(self.check), "severity": str(self.severity), "subject": self.subject,
                "text": self.text, "details": dict(self.details)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class HealthSettings:
    """Thresholds of the checks and the forecast horizon."""

    days_without_renewal: int = 30
    forecast_days: int = 30
    device_expiry_days: int = 30
    ca_expiry_days: int = 90
    duplicate_lookback: dt.timedelta = dt.timedelta(days=1)

    def __post_init__(self) -> None:
        for name in ("days_without_renewal", "forecast_days", "device_expiry_days", "ca_expiry_days"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.forecast_days > 3660:
            raise ValueError("forecast_days must be at most 3660")
        if self.duplicate_lookback < dt.timedelta(0):
            raise ValueError("duplicate_lookback must not be negative")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LiveSession:
    """A connection open right now, authenticated with certificate ``serial``."""

    tenant: str
    device_id: str
    serial: int
    client_id: str
    kind: str = "device"
    remote: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceSeen:
    """When a device was last connected (``None``: never, as far as the registry knows)."""

    device_id: str
    last_seen: dt.datetime | None
    live: bool
    serial: int | None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"device_id": self.device_id, "last_seen": _iso(self.last_seen), "live": self.live,
                "serial": None if self.serial is None else f"{self.serial:x}"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class FleetHealth:
    """One tenant's health at ``generated_at``.

    ``counts``: certificates by state (``active`` = valid now, ``expired`` = past ``not_after`` and
    never revoked, ``revoked``); ``expiring``: current certificates expiring within 7 / 30 / 90
    days (cumulative); ``overdue``: devices past their renewal moment, not yet expired;
    ``forecast``: renewals due per UTC day from today, ``forecast_days`` days; ``buckets``: every
    unrevoked certificate (superseded ones too) by time left, :func:`expiry_buckets`.
    """

    tenant: str
    generated_at: dt.datetime
    counts: Mapping[str, int]
    expiring: Mapping[int, int]
    overdue: int
    forecast: tuple[tuple[dt.date, int], ...]
    devices: tuple[DeviceSeen, ...]
    findings: tuple[Finding, ...]
    buckets: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def finding_counts(self) -> dict[str, int]:
        """Findings per check (every check present)."""
        out = {str(c): 0 for c in Check}
        for finding in self.findings:
            out[str(finding.check)] += 1
        return out

    def to_json(self, *, max_findings_per_check: int | None = None, devices: bool = True) -> dict[str, Any]:
        """The report as JSON values; with ``max_findings_per_check``, each check's list is cut
        there (``finding_counts`` keeps the full numbers, ``truncated`` says whether anything was cut)."""
        kept: list[Finding] = []
        per: dict[Check, int] = {}
        for finding in self.findings:
            per[finding.check] = per.get(finding.check, 0) + 1
            if max_findings_per_check is None or per[finding.check] <= max_findings_per_check:
                kept.append(finding)
        out: dict[str, Any] = {
            "version": 1,
            "tenant": self.tenant,
            "generated_at": _iso(self.generated_at),
            "generated_at_epoch": int(self.generated_at.timestamp()),
            "counts": dict(self.counts),
            "expiring": {f"{days}d": n for days, n in self.expiring.items()},
            "overdue": self.overdue,
            "expiry_buckets": dict(self.buckets),
            "forecast": [{"date": day.isoformat(), "renewals": n} for day, n in self.forecast],
            "finding_counts": self.finding_counts(),
            "truncated": len(kept) < len(self.findings),
            "findings": [f.to_json() for f in kept],
        }
        if devices:
            out["devices"] = [d.to_json() for d in self.devices]
        return out


# ------------------------------------------------------------------ helpers


def expiry_buckets(not_afters: Iterable[dt.datetime], now: dt.datetime) -> dict[str, int]:
    """Count expiry times into disjoint buckets ``expired``, ``7d``, ``30d``, ``90d``, ``later``."""
    out = {"expired": 0, "7d": 0, "30d": 0, "90d": 0, "later": 0}
    for not_after in not_afters:
        left = not_after - now
        if left <= dt.timedelta(0):
            out["expired"] += 1
        elif left <= 7 * _DAY:
            out["7d"] += 1
        elif left <= 30 * _DAY:
            out["30d"] += 1
        elif left <= 90 * _DAY:
            out["90d"] += 1
        else:
            out["later"] += 1
    return out


def _key_info(record: CertificateRecord, cache: KeyCache) -> tuple[str, int]:
    known = cache.get(record.spki_sha256)
    if known is None:
        try:
            key = x509.load_der_x509_certificate(record.der).public_key()
        except ValueError:
            known = ("unparseable", 0)
        else:
            known = (key_type_of(key), key.key_size if isinstance(key, rsa.RSAPublicKey) else 0)
        cache[record.spki_sha256] = known
    return known


def _profile_policy(policy: TenantPolicy, label: str) -> ProfilePolicy | None:
    try:
        return policy.profiles.get(Profile.from_label(label))
    except ValueError:
        return None


def _renewal_moment(record: CertificateRecord, profile: ProfilePolicy | None) -> dt.datetime | None:
    if profile is None:
        return None
    start, end = profile.renewal_window
    try:
        return renewal_time(record.device_id, not_before=record.not_before, not_after=record.not_after,
                            policy=RenewalPolicy(start=start, end=end))
    except ValueError:  # a lifetime too short for a window: no moment to speak of
        return None


def _subject(record: CertificateRecord) -> str:
    return f"{record.tenant}/{record.device_id}/{record.serial:x}"


def _days(delta: dt.timedelta) -> float:
    return round(delta / _DAY, 1)


def _current(certificates: Sequence[CertificateRecord]) -> dict[int, CertificateRecord]:
    newest: dict[tuple[str, str, str], CertificateRecord] = {}
    for record in certificates:
        key = (str(record.kind), record.device_id, record.profile)
        held = newest.get(key)
        if held is None or (record.issued_at, record.serial) > (held.issued_at, held.serial):
            newest[key] = record
    return {r.serial: r for r in newest.values()}


# ------------------------------------------------------------------ the assessment


def assess(
    *,
    tenant: str,
    now: dt.datetime,
    policy: TenantPolicy,
    certificates: Sequence[CertificateRecord],
    sessions: Sequence[SessionRecord] = (),
    live: Sequence[LiveSession] | None = None,
    ca_certificates: Mapping[str, x509.Certificate] | None = None,
    settings: HealthSettings = HealthSettings(),
    key_cache: KeyCache | None = None,
) -> FleetHealth:
    """The health of ``tenant`` at ``now`` (module docstring).

    ``live`` are the connections open now; ``None`` takes the ``sessions`` rows still marked live.
    ``ca_certificates`` maps a role (``issuing``, ``root``) to the CA certificate. ``key_cache``
    keeps parsed keys between calls (the broker passes one; a key is parsed once).
    """
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    cache: KeyCache = {} if key_cache is None else key_cache
    findings: list[Finding] = []
    mine = [c for c in certificates if c.tenant == tenant]
    current = _current(mine)
    counts = {"active": 0, "expired": 0, "revoked": 0}
    expiring = dict.fromkeys(EXPIRY_HORIZONS, 0)
    today = now.astimezone(dt.UTC).date()
    forecast = dict.fromkeys((today + dt.timedelta(days=i) for i in range(settings.forecast_days)), 0)
    overdue = 0
    status_of: dict[int, CertificateStatus] = {}

    for record in mine:
        status_of[record.serial] = record.status
        if record.status is CertificateStatus.REVOKED:
            counts["revoked"] += 1
            continue
        expired = now >= record.not_after
        counts["expired" if expired else "active"] += 1
        findings.extend(_weak_key(record, policy, cache))
        if record.serial not in current or record.kind is CertificateKind.BOOTSTRAP:
            continue
        left = record.not_after - now
        if not expired:
            for days in EXPIRY_HORIZONS:
                if left <= days * _DAY:
                    expiring[days] += 1
        if record.kind is CertificateKind.OPERATOR:
            if not expired and left <= settings.device_expiry_days * _DAY:
                findings.append(Finding(
                    check=Check.DEVICE_CERTIFICATE_EXPIRING, severity=Severity.MEDIUM, subject=_subject(record),
                    text=f"operator certificate of {record.device_id!r} expires in {_days(left)} days "
                         f"({_iso(record.not_after)}): issue a new one",
                    details={"kind": str(record.kind), "not_after": _iso(record.not_after)},
                ))
            continue
        moment = _renewal_moment(record, _profile_policy(policy, record.profile))
        due = moment is None or now >= moment
        if moment is not None and not expired:
            if now >= moment:
                overdue += 1
            elif moment.date() in forecast:
                forecast[moment.date()] += 1
        if not due:
            continue
        details = {"profile": record.profile, "not_after": _iso(record.not_after),
                   "issued_at": _iso(record.issued_at), "renewal_moment": _iso(moment)}
        if not expired and left <= settings.device_expiry_days * _DAY:
            findings.append(Finding(
                check=Check.DEVICE_CERTIFICATE_EXPIRING,
                severity=Severity.HIGH if left <= 7 * _DAY else Severity.MEDIUM, subject=_subject(record),
                text=f"device {record.device_id!r}: {record.profile} certificate expires in {_days(left)} days "
                     f"({_iso(record.not_after)}) and has not been renewed"
                     + (f" (renewal was due {_iso(moment)})" if moment is not None else ""),
                details=details,
            ))
        since = now - record.issued_at
        if moment is not None and since > settings.days_without_renewal * _DAY:
            findings.append(Finding(
                check=Check.NO_RECENT_RENEWAL, severity=Severity.HIGH if expired else Severity.MEDIUM,
                subject=_subject(record),
                text=f"device {record.device_id!r}: no successful {record.profile} renewal for {_days(since)} days "
                     f"(renewal due since {_iso(moment)}"
                     + (f"; EXPIRED at {_iso(record.not_after)}" if expired else "")
                     + "); revoke the certificate if the device is decommissioned",
                details={**details, "days_since_issuance": _days(since), "expired": expired},
            ))

    findings.extend(_ca_findings(tenant, now, ca_certificates or {}, settings))
    live_now = list(live) if live is not None else [
        LiveSession(tenant=s.tenant, device_id=s.device_id, serial=s.serial, client_id=s.client_id,
                    kind=s.kind, remote=s.remote)
        for s in sessions if s.live and s.tenant == tenant
    ]
    for session in live_now:
        if session.tenant == tenant and status_of.get(session.serial) is CertificateStatus.REVOKED:
            findings.append(Finding(
                check=Check.REVOKED_STILL_CONNECTED, severity=Severity.CRITICAL,
                subject=f"{tenant}/{session.device_id}/{session.serial:x}",
                text=f"{session.kind} {session.device_id!r} is connected (client id {session.client_id!r}"
                     + (f", from {session.remote}" if session.remote else "")
                     + f") with revoked certificate {session.serial:x}: the kick failed; close it",
                details={"client_id": session.client_id, "remote": session.remote},
            ))
    since_dup = now - settings.duplicate_lookback
    for row in sessions:
        if row.tenant == tenant and row.last_duplicate_at is not None and row.last_duplicate_at >= since_dup:
            findings.append(Finding(
                check=Check.CONFLICTING_SESSIONS, severity=Severity.HIGH,
                subject=f"{tenant}/{row.device_id}/{row.serial:x}",
                text=f"{row.kind} {row.device_id!r}: certificate {row.serial:x} connected from a second session "
                     f"while one was live ({row.duplicates} time(s) in all, last at {_iso(row.last_duplicate_at)}"
                     + (f", from {row.remote}" if row.remote else "")
                     + "): a cloned credential, or a device reconnecting before its old connection timed out",
                details={"duplicates": row.duplicates, "last_duplicate_at": _iso(row.last_duplicate_at),
                         "remote": row.remote},
            ))

    findings.sort(key=lambda f: (_RANK[f.severity], str(f.check), f.subject))
    return FleetHealth(
        tenant=tenant, generated_at=now, counts=counts, expiring=expiring, overdue=overdue,
        forecast=tuple(sorted(forecast.items())), devices=_last_seen(tenant, mine, current, sessions, live_now),
        findings=tuple(findings),
        buckets=expiry_buckets((c.not_after for c in mine if c.status is CertificateStatus.ACTIVE), now),
    )


def _weak_key(record: CertificateRecord, policy: TenantPolicy, cache: KeyCache) -> list[Finding]:
    kind, bits = _key_info(record, cache)
    allowed = policy.key_policy.allowed
    problem = None
    severity = Severity.MEDIUM
    if kind == "rsa" and bits < 2048:
        problem, severity = f"RSA key of {bits} bits (below 2048)", Severity.HIGH
    elif kind == "rsa" and bits < policy.key_policy.rsa_min_bits:
        problem = f"RSA key of {bits} bits, below the policy's minimum of {policy.key_policy.rsa_min_bits}"
    elif kind not in allowed:
        problem = f"{kind} key, outside the tenant's key policy (allowed: {', '.join(allowed)})"
        if kind.startswith("ec:") or kind == "unparseable":
            severity = Severity.HIGH
    if problem is None:
        return []
    return [Finding(
        check=Check.WEAK_KEY, severity=severity, subject=_subject(record),
        text=f"{record.kind} certificate of {record.device_id!r} ({record.profile}) has a {problem}: "
             "renew it with a new key, or revoke it",
        details={"key_type": kind, "rsa_bits": bits or None, "issued_at": _iso(record.issued_at)},
    )]


def _ca_findings(tenant: str, now: dt.datetime, cas: Mapping[str, x509.Certificate],
                 settings: HealthSettings) -> list[Finding]:
    out = []
    for role, cert in sorted(cas.items()):
        not_after = cert.not_valid_after_utc
        left = not_after - now
        if left > settings.ca_expiry_days * _DAY:
            continue
        state = "EXPIRED" if left <= dt.timedelta(0) else f"expires in {_days(left)} days"
        out.append(Finding(
            check=Check.CA_CERTIFICATE_EXPIRING,
            severity=Severity.CRITICAL if left <= 30 * _DAY else Severity.HIGH, subject=f"{tenant}/ca/{role}",
            text=f"tenant {tenant!r}'s {role} CA certificate {state} ({_iso(not_after)}): every certificate "
                 "it signed stops verifying then; roll the CA over",
            details={"role": role, "not_after": _iso(not_after), "subject_dn": cert.subject.rfc4514_string()},
        ))
    return out


def _last_seen(tenant: str, certificates: Sequence[CertificateRecord], current: Mapping[int, CertificateRecord],
               sessions: Sequence[SessionRecord], live: Sequence[LiveSession]) -> tuple[DeviceSeen, ...]:
    seen: dict[str, tuple[dt.datetime | None, bool, int | None]] = {}
    for record in certificates:  # every device with a current active certificate, seen or not
        if (record.serial in current and record.kind in _DEVICE_KINDS
                and record.status is CertificateStatus.ACTIVE):
            seen.setdefault(record.device_id, (None, False, None))
    live_serials = {(s.device_id, s.serial) for s in live if s.tenant == tenant}
    for row in sessions:
        if row.tenant != tenant or row.kind != "device" or row.device_id not in seen:
            continue  # devices without an active certificate are not part of the fleet any more
        last, is_live, serial = seen[row.device_id]
        row_live = (row.device_id, row.serial) in live_serials
        if last is None or row.last_seen > last:
            last, serial = row.last_seen, row.serial
        seen[row.device_id] = (last, is_live or row_live, serial)
    ordered = sorted(seen.items(), key=lambda kv: (kv[1][0] is not None, kv[1][0] or _NEVER, kv[0]))
    return tuple(DeviceSeen(device_id=d, last_seen=v[0], live=v[1], serial=v[2]) for d, v in ordered)


async def assess_registry(
    registry: Any,
    *,
    tenant: str,
    policy: TenantPolicy,
    now: dt.datetime,
    ca_certificates: Mapping[str, x509.Certificate] | None = None,
    live: Sequence[LiveSession] | None = None,
    settings: HealthSettings = HealthSettings(),
    key_cache: KeyCache | None = None,
) -> FleetHealth:
    """Read ``tenant``'s certificates and sessions from ``registry`` and :func:`assess` them."""
    certificates = [c async for c in registry.certificates(tenant)]
    sessions = await registry.sessions(tenant)
    return assess(tenant=tenant, now=now, policy=policy, certificates=certificates, sessions=sessions, live=live,
                  ca_certificates=ca_certificates, settings=settings, key_cache=key_cache)


# ------------------------------------------------------------------ assessing in a child process
#
# A report over tens of thousands of certificates is ~25 us of Python per record (mostly the
# renewal arithmetic). In a thread of the broker it held the GIL against the event loop (the loop
# waits for the GIL after every syscall: 1.2-1.8 s stalls at ~48,000 certificates), so a large
# tenant is assessed by :func:`assess` itself in a short-lived interpreter. What crosses the pipe
# is plain tuples, pickled a page at a time on the loop and streamed as the pages are read (no
# long pickle call in the broker, no second copy of the fleet in its memory); a certificate whose
# key the broker already knows travels without its DER.
#
# The stream to the child: a header dict, then ("certificates" | "sessions" | "live", rows)
# pickles, then None. From the child: one pickled dict whose slices are pickles themselves, so
# the broker unpacks them one turn of the loop at a time.

_CERT_FIELDS = tuple(f.name for f in dataclasses.fields(CertificateRecord))
_SESSION_FIELDS = tuple(f.name for f in dataclasses.fields(SessionRecord))
_LIVE_FIELDS = tuple(f.name for f in dataclasses.fields(LiveSession))
_DER_AT = _CERT_FIELDS.index("der")
#: Stands in for the DER of a certificate whose key the child is told (it is never parsed).
_KNOWN_KEY_DER = b"\x30\x00"
_CHILD_CODE = "from broker_plugin.health import _child_main; _child_main()"
_PICKLE = pickle.HIGHEST_PROTOCOL


def _pack(kind: str, values: Sequence[Any], names: Sequence[str]) -> bytes:
    return pickle.dumps((kind, [tuple(getattr(v, n) for n in names) for v in values]), protocol=_PICKLE)


def _pack_certificates(records: Sequence[CertificateRecord], keys: KeyCache) -> bytes:
    rows = []
    for record in records:
        row = [getattr(record, n) for n in _CERT_FIELDS]
        known = keys.get(record.spki_sha256)
        if known is not None:
            row[_DER_AT] = known
        rows.append(tuple(row))
    return pickle.dumps(("certificates", rows), protocol=_PICKLE)


def _sliced(values: Sequence[Any]) -> list[bytes]:
    return [pickle.dumps(values[i:i + _SLICE], protocol=_PICKLE) for i in range(0, len(values), _SLICE)]


def _child_main() -> None:
    """Entry point of the assessment process: the job streamed on stdin, the pickled result on stdout."""
    stream = sys.stdin.buffer
    job = pickle.load(stream)
    keys: KeyCache = {}
    certificates: list[CertificateRecord] = []
    sessions: list[SessionRecord] = []
    live: list[LiveSession] = []
    while (part := pickle.load(stream)) is not None:
        kind, rows = part
        if kind == "certificates":
            for row in rows:
                values = dict(zip(_CERT_FIELDS, row))
                if isinstance(values["der"], tuple):
                    keys[values["spki_sha256"]] = values["der"]
                    values["der"] = _KNOWN_KEY_DER
                certificates.append(CertificateRecord(**values))
        elif kind == "sessions":
            sessions.extend(SessionRecord(**dict(zip(_SESSION_FIELDS, row))) for row in rows)
        else:
            live.extend(LiveSession(**dict(zip(_LIVE_FIELDS, row))) for row in rows)
    given = set(keys)
    report = assess(
        tenant=job["tenant"], now=job["now"], policy=job["policy"], certificates=certificates, sessions=sessions,
        live=live, ca_certificates={role: x509.load_der_x509_certificate(der) for role, der in job["cas"].items()},
        settings=job["settings"], key_cache=keys,
    )
    head = {f.name: getattr(report, f.name) for f in dataclasses.fields(FleetHealth)
            if f.name not in ("findings", "devices")}
    learned = [(spki, info) for spki, info in keys.items() if spki not in given]
    result = {"head": head, "findings": _sliced(report.findings), "devices": _sliced(report.devices),
              "keys": _sliced(learned)}
    pickle.dump(result, sys.stdout.buffer, protocol=_PICKLE)
    sys.stdout.buffer.flush()


class _Child:
    """One assessment process: :meth:`send` parts as they are read, then :meth:`result`."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self.gone = False  # its stdin closed: nothing more is sent, result() says why
        assert proc.stdout is not None and proc.stderr is not None
        # read both pipes from the start: a child blocked on a full stderr pipe would never finish
        self._out = asyncio.ensure_future(proc.stdout.read())
        self._err = asyncio.ensure_future(proc.stderr.read())

    @classmethod
    async def start(cls, header: Mapping[str, Any]) -> _Child:
        # A fresh interpreter on this module rather than multiprocessing's spawn, which re-imports
        # the caller's __main__ (ca/pool.py does the same); short-lived, so the memory of a report
        # goes back to the system with it.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CHILD_CODE, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        child = cls(proc)
        await child.send(pickle.dumps(dict(header), protocol=_PICKLE))
        return child

    async def send(self, blob: bytes) -> bool:
        """Write one pickled part; waits while the child is behind. ``False``: the child is gone
        (:attr:`gone`), so the caller stops reading the fleet for it; :meth:`result` says why."""
        stdin = self._proc.stdin
        assert stdin is not None
        if self.gone or stdin.is_closing():  # a write to a closed pipe only logs a warning
            self.gone = True
            return False
        try:
            stdin.write(blob)
            await stdin.drain()
        except ConnectionError:
            self.gone = True
            return False
        return True

    async def result(self) -> dict[str, Any]:
        """End the stream and wait for the child's answer."""
        assert self._proc.stdin is not None
        await self.send(pickle.dumps(None, protocol=_PICKLE))
        self._proc.stdin.close()
        out, err = await self._out, await self._err
        code = await self._proc.wait()
        if code != 0:
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"the health assessment process failed (exit {code}): {tail[0]}")
        answer: dict[str, Any] = pickle.loads(out)  # a dict of lists of bytes: the slices stay packed
        return answer

    def kill(self) -> None:
        """Stop the child (a cancelled report)."""
        self._out.cancel()
        self._err.cancel()
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()


# ------------------------------------------------------------------ the broker side


Publish = Callable[[str, bytes], Awaitable[None]]
"""``publish(tenant, json_bytes)``: send one tenant's report (the plugin: retained on ops/findings)."""


class FleetMonitor:
    """Session bookkeeping and periodic health reports of one broker node (module docstring).

    ``policies`` / ``ca_certificates`` are per tenant; ``live()`` lists the connections open now
    (the broker's own view, used for ``revoked-still-connected``); ``on_report`` gets each fresh
    :class:`FleetHealth` (metrics). ``interval`` <= 0: no periodic run (``run`` still works).
    A tenant of ``isolate_from`` certificates or more is assessed in a child process (module
    docstring), a page of records at a time; a smaller one is assessed on the loop (tens of ms).
    """

    def __init__(
        self,
        *,
        registry: Any,
        policies: Mapping[str, TenantPolicy],
        ca_certificates: Mapping[str, Mapping[str, x509.Certificate]],
        node: str,
        clock: Callable[[], dt.datetime],
        publish: Publish | None = None,
        live: Callable[[], Sequence[LiveSession]] | None = None,
        on_report: Callable[[FleetHealth], None] | None = None,
        settings: HealthSettings = HealthSettings(),
        interval: float = 60.0,
        flush: float = 1.0,
        isolate_from: int = ISOLATE_FROM,
    ) -> None:
        if not node:
            raise ValueError("node must be a non-empty name")
        if flush <= 0:
            raise ValueError("flush must be > 0 seconds")
        if isinstance(isolate_from, bool) or not isinstance(isolate_from, int) or isolate_from < 0:
            raise ValueError(f"isolate_from must be an int >= 0, got {isolate_from!r}")
        self._registry = registry
        self._policies = dict(policies)
        self._cas = {t: dict(c) for t, c in ca_certificates.items()}
        self.node = node
        self._clock = clock
        self._publish = publish
        self._live_view = live
        self._on_report = on_report
        self.settings = settings
        self.interval = interval
        self.isolate_from = isolate_from
        self._flush_every = flush
        self._pending: dict[tuple[str, str, int], SessionUpdate] = {}
        self._live: dict[str, tuple[str, str, int, str, str | None]] = {}  # client id -> tenant, device, serial, kind, remote
        self._live_serials: dict[tuple[str, int], int] = {}
        self._keys: KeyCache = {}
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.reports: dict[str, FleetHealth] = {}

    # -- events (synchronous, O(1): called from the broker's hooks)

    def _update(self, tenant: str, device_id: str, serial: int, kind: str, client_id: str, at: dt.datetime,
                **changes: Any) -> None:
        key = (tenant, device_id, serial)
        held = self._pending.get(key)
        base = held or SessionUpdate(tenant=tenant, device_id=device_id, serial=serial, kind=kind,
                                     client_id=client_id, node=self.node, last_seen=at)
        connects = base.connects + changes.pop("connects", 0)
        duplicates = base.duplicates + changes.pop("duplicates", 0)
        self._pending[key] = dataclasses.replace(base, client_id=client_id, last_seen=max(base.last_seen, at),
                                                 connects=connects, duplicates=duplicates, **changes)

    def is_live(self, tenant: str, serial: int) -> bool:
        """Is a session authenticated with this certificate open now (as far as the events told)?"""
        return self._live_serials.get((tenant, serial), 0) > 0

    def connected(self, *, tenant: str, device_id: str, serial: int, kind: str, client_id: str,
                  remote: str | None, at: dt.datetime) -> None:
        """A session opened."""
        old = self._live.pop(client_id, None)
        if old is not None:  # its disconnect never came: count it closed
            self._drop_serial(old[0], old[2])
        self._live[client_id] = (tenant, device_id, serial, kind, remote)
        self._live_serials[(tenant, serial)] = self._live_serials.get((tenant, serial), 0) + 1
        self._update(tenant, device_id, serial, kind, client_id, at, connects=1, connected_at=at,
                     disconnected_at=None, remote=remote)

    def _drop_serial(self, tenant: str, serial: int) -> None:
        left = self._live_serials.get((tenant, serial), 0) - 1
        if left > 0:
            self._live_serials[(tenant, serial)] = left
        else:
            self._live_serials.pop((tenant, serial), None)

    def disconnected(self, *, client_id: str, at: dt.datetime) -> None:
        """The session of ``client_id`` closed (unknown client ids are ignored)."""
        held = self._live.pop(client_id, None)
        if held is None:
            return
        tenant, device_id, serial, kind, _remote = held
        self._drop_serial(tenant, serial)
        self._update(tenant, device_id, serial, kind, client_id, at, disconnected_at=at)

    def duplicate(self, *, tenant: str, device_id: str, serial: int, kind: str, client_id: str,
                  at: dt.datetime) -> None:
        """A second session with the same certificate arrived while one was live."""
        log.warning("certificate %x of %s/%s connects again while a session with it is live", serial, tenant,
                    device_id)
        self._update(tenant, device_id, serial, kind, client_id, at, duplicates=1, last_duplicate_at=at)

    def live_sessions(self) -> list[LiveSession]:
        """The open sessions as the events told them."""
        return [LiveSession(tenant=t, device_id=d, serial=s, client_id=c, kind=k, remote=r)
                for c, (t, d, s, k, r) in self._live.items()]

    # -- running

    async def start(self) -> None:
        """Close the sessions this node left open (a crash), then start the flush and health loops
        (the first health run after ``min(interval, 5)`` seconds)."""
        closed = await self._registry.close_sessions(self.node, self._clock())
        if closed:
            log.info("marked %d session(s) left open by node %s as closed", closed, self.node)
        self._tasks.append(asyncio.create_task(self._every(self._flush_every, self.flush), name="certmq-sessions"))
        if self.interval > 0:
            # The first report comes soon after start (it is retained for operators), but not in
            # the broker's first seconds, when reconnecting devices keep it busiest.
            self._tasks.append(asyncio.create_task(self._every(self.interval, self.run, first=min(self.interval, 5.0)),
                                                   name="certmq-health"))

    async def _every(self, period: float, job: Callable[[], Awaitable[Any]], first: float | None = None) -> None:
        await asyncio.sleep(period if first is None else first)
        while True:
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("fleet monitor job %s failed", getattr(job, "__name__", job))
            await asyncio.sleep(period)

    async def flush(self) -> int:
        """Write the pending session updates in one registry call; rows written."""
        if not self._pending:
            return 0
        batch, self._pending = list(self._pending.values()), {}
        try:
            return int(await self._registry.record_sessions(batch))
        except Exception:
            for update in batch:  # keep them for the next period; newer events of the same key win
                key = (update.tenant, update.device_id, update.serial)
                newer = self._pending.get(key)
                self._pending[key] = update if newer is None else dataclasses.replace(
                    newer, connects=newer.connects + update.connects, duplicates=newer.duplicates + update.duplicates,
                    connected_at=newer.connected_at or update.connected_at,
                    last_duplicate_at=newer.last_duplicate_at or update.last_duplicate_at)
            raise

    async def run(self, tenant: str | None = None) -> list[FleetHealth]:
        """Assess ``tenant`` (default: every tenant) now, store and publish the reports; the reports."""
        async with self._lock:
            await self.flush()
            now = self._clock()
            live = self._live_view() if self._live_view is not None else self.live_sessions()
            out = []
            for name in sorted(self._policies) if tenant is None else [tenant]:
                report = await self._assess(name, now, [s for s in live if s.tenant == name])
                document = report.to_json(max_findings_per_check=MAX_PUBLISHED_PER_CHECK, devices=False)
                document["node"] = self.node
                await self._registry.put_health_report(name, self.node, now, document)
                self.reports[name] = report
                if self._on_report is not None:
                    self._on_report(report)
                if self._publish is not None:
                    await self._publish(name, json.dumps(document, sort_keys=True).encode())
                out.append(report)
            return out

    async def _assess(self, tenant: str, now: dt.datetime, live: Sequence[LiveSession]) -> FleetHealth:
        """:func:`assess` ``tenant`` without holding the event loop for more than a slice at a time.

        Below ``isolate_from`` certificates it runs here (less work than starting a process);
        past that, a child process starts and each page of records is packed and sent to it as
        it is read, so the broker never holds the whole fleet.
        """
        policy, cas = self._policies[tenant], self._cas.get(tenant, {})

        def start() -> Awaitable[_Child]:
            return _Child.start({"tenant": tenant, "now": now, "policy": policy, "settings": self.settings,
                                 "cas": {role: c.public_bytes(serialization.Encoding.DER) for role, c in cas.items()}})

        records: list[CertificateRecord] = []
        child: _Child | None = None
        try:
            async for record in self._registry.certificates(tenant, page=_SLICE):
                records.append(record)
                # the first send waits for isolate_from certificates (or a slice), later ones a slice
                if len(records) >= (_SLICE if child is not None else max(self.isolate_from, _SLICE)):
                    child = child or await start()
                    if not await child.send(_pack_certificates(records, self._keys)):
                        break
                    records = []
            if child is None and len(records) < self.isolate_from:
                sessions = await self._registry.sessions(tenant)
                return assess(tenant=tenant, now=now, policy=policy, certificates=records, sessions=sessions,
                              live=live, ca_certificates=cas, settings=self.settings, key_cache=self._keys)
            if child is None:  # isolate_from certificates or more, fewer than a slice of them
                child = await start()
            if records and not child.gone:
                await child.send(_pack_certificates(records, self._keys))
            records = []
            # a session row per device: read and sent a page at a time, like the certificates
            if not child.gone:
                async for rows in self._registry.session_pages(tenant, page=_SLICE):
                    if not await child.send(_pack("sessions", rows, _SESSION_FIELDS)):
                        break
            for begin in range(0, len(live), _SLICE):
                if not await child.send(_pack("live", live[begin:begin + _SLICE], _LIVE_FIELDS)):
                    break
            result = await child.result()
        except BaseException:
            if child is not None:
                child.kill()
            raise
        for blob in result["keys"]:
            self._keys.update(pickle.loads(blob))
            await asyncio.sleep(0)
        parts: dict[str, list[Any]] = {"findings": [], "devices": []}
        for key, out in parts.items():
            for blob in result[key]:
                out.extend(pickle.loads(blob))
                await asyncio.sleep(0)
        return FleetHealth(**result["head"], findings=tuple(parts["findings"]), devices=tuple(parts["devices"]))

    async def close(self) -> None:
        """Stop the loops and write what is pending (errors are logged)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        with contextlib.suppress(Exception):
            await self.flush()
