"""The CA registry: its values, its errors, and the one interface both backends implement.

:class:`Registry` holds every operation once, written against a tiny transaction interface
(:class:`Tx`: ``execute`` / ``fetch`` / ``fetchrow`` with ``$1`` placeholders); the SQLite and
PostgreSQL modules only open connections, run migrations and adapt that interface. Each
operation that must keep an invariant is exactly one transaction, and every mutation appends its
audit entry inside that same transaction, so registry, status lists and audit trail never
disagree after a crash.

This module knows SQL but no driver: it must not import sqlite3 or asyncpg.
"""

from __future__ import annotations

import abc
import datetime as dt
import functools
import enum
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol, TypeVar
from urllib.parse import urlsplit

from protocol.codes import ErrorCode, RevocationReason
from protocol.errors import CertmqError

from . import audit as _audit
from .audit import AuditEntry, AuditEvent

__all__ = [
    "CertificateKind",
    "CertificateRecord",
    "CertificateStatus",
    "ClaimRecord",
    "ClaimRefused",
    "ClaimSpend",
    "ClaimUse",
    "CrlBase",
    "DuplicateSerial",
    "FeedList",
    "IssuanceItem",
    "RegistryError",
    "Registry",
    "RequestIdReused",
    "RequestKey",
    "RevocationOutcome",
    "RevokedEntry",
    "RevokedInRegion",
    "SchemaTooNew",
    "SessionRecord",
    "SessionUpdate",
    "StoredHealthReport",
    "serial_hex",
    "StatusDelta",
    "StatusListSnapshot",
    "TenantRecord",
    "Tx",
    "UnknownCertificate",
    "UnknownClaim",
    "from_epoch",
    "open_registry",
    "to_epoch",
]

SERIAL_BITS = 160  #: RFC 5280: at most 20 octets
_MAX_PARAMS = 900  # per multi-row statement: below every SQLite build's variable limit (999 before 3.32)

T = TypeVar("T")


# ---------------------------------------------------------------- errors


class RegistryError(CertmqError):
    """Base of the registry's own errors. ``code`` is the wire code a service would reply with."""

    code: ErrorCode = ErrorCode.INTERNAL


class RequestIdReused(RegistryError):
    """The request key is already bound to a *different* request (other fingerprint)."""

    code = ErrorCode.REQUEST_ID_REUSED


class DuplicateSerial(RegistryError):
    """A certificate with this (tenant, serial) is already stored."""


class UnknownCertificate(RegistryError):
    """No certificate with that serial in that tenant."""

    code = ErrorCode.UNKNOWN_CERTIFICATE


class UnknownClaim(RegistryError):
    """No claim credential with that id in that tenant."""

    code = ErrorCode.CLAIM_REFUSED


class ClaimRefused(RegistryError):
    """The claim credential has no uses left."""

    code = ErrorCode.CLAIM_REFUSED


class SchemaTooNew(RegistryError):
    """The database was written by a newer certmq (higher schema version than this code knows)."""


# ---------------------------------------------------------------- values


class CertificateStatus(enum.StrEnum):
    """A stored certificate's state; revocation is final."""

    ACTIVE = "active"
    REVOKED = "revoked"


class CertificateKind(enum.StrEnum):
    """What a certificate is for: the device's working identity, a claim credential, or a factory one."""

    OPERATIONAL = "operational"
    BOOTSTRAP = "bootstrap"
    FACTORY = "factory"
    OPERATOR = "operator"  #: an operator's client certificate (schema v3 and later)


def _aware(value: dt.datetime | None, name: str, *, optional: bool = False) -> dt.datetime | None:
    if type(value) is dt.datetime and value.tzinfo is dt.UTC:  # the common case: already what is stored
        return value
    if value is None and optional:
        return None
    if not isinstance(value, dt.datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be an aware datetime, got {value!r}")
    return value.astimezone(dt.UTC)


def to_epoch(value: dt.datetime) -> int:
    """Aware datetime -> integer epoch seconds (the stored form)."""
    checked = _aware(value, "time")
    assert checked is not None
    return int(checked.timestamp())


def from_epoch(value: int | None) -> dt.datetime | None:
    """Stored epoch seconds -> aware UTC datetime (None stays None)."""
    return None if value is None else dt.datetime.fromtimestamp(int(value), dt.UTC)


def serial_hex(serial: int) -> str:
    """Stored form of a serial: fixed-width lowercase hex, so text order is numeric order."""
    if isinstance(serial, bool) or not isinstance(serial, int) or not 0 < serial < 1 << SERIAL_BITS:
        raise ValueError(f"serial must be an int in 1..2**{SERIAL_BITS}-1, got {serial!r}")
    return f"{serial:0{SERIAL_BITS // 4}x}"


@dataclass(frozen=True, kw_only=True)
class CertificateRecord:
    """A certificate as the registry keeps it. Times are aware UTC datetimes (stored to the second)."""

    tenant: str
    serial: int
    device_id: str
    profile: str
    region: str
    not_before: dt.datetime
    not_after: dt.datetime
    der: bytes
    spki_sha256: bytes
    issued_at: dt.datetime
    status_list_id: int | None = None
    status_index: int | None = None
    kind: CertificateKind = CertificateKind.OPERATIONAL
    replaced_serial: int | None = None
    status: CertificateStatus = CertificateStatus.ACTIVE
    revoked_at: dt.datetime | None = None
    revocation_reason: int | None = None

    def __post_init__(self) -> None:
        serial_hex(self.serial)
        if self.replaced_serial is not None:
            serial_hex(self.replaced_serial)
        for name in ("tenant", "device_id", "profile", "region"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string")
        for name in ("not_before", "not_after", "issued_at"):
            object.__setattr__(self, name, _aware(getattr(self, name), name))
        object.__setattr__(self, "revoked_at", _aware(self.revoked_at, "revoked_at", optional=True))
        if self.not_after < self.not_before:
            raise ValueError("not_after is before not_before")
        if not isinstance(self.der, bytes) or not self.der:
            raise ValueError("der must be non-empty bytes")
        if not isinstance(self.spki_sha256, bytes) or len(self.spki_sha256) != 32:
            raise ValueError("spki_sha256 must be 32 bytes")
        if (self.status_list_id is None) != (self.status_index is None):
            raise ValueError("status_list_id and status_index go together")
        if self.status_index is not None and (self.status_index < 0 or self.status_list_id < 0):  # type: ignore[operator]
            raise ValueError("status list id and index must be >= 0")
        if type(self.kind) is not CertificateKind:
            object.__setattr__(self, "kind", CertificateKind(self.kind))
        if type(self.status) is not CertificateStatus:
            object.__setattr__(self, "status", CertificateStatus(self.status))
        if self.revocation_reason is not None:
            RevocationReason(self.revocation_reason)


@dataclass(frozen=True, kw_only=True)
class RequestKey:
    """Idempotency key of an issuance: (tenant of the record, identity, 16-byte request id).

    ``fingerprint`` identifies the request's content (e.g. a hash of the CSR and parameters).
    """

    identity: str
    request_id: bytes
    fingerprint: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, bytes) or len(self.request_id) != 16:
            raise ValueError("request_id must be 16 bytes")
        if not isinstance(self.fingerprint, bytes) or not self.fingerprint:
            raise ValueError("fingerprint must be non-empty bytes")
        if not isinstance(self.identity, str) or not self.identity:
            raise ValueError("identity must be a non-empty string")


@dataclass(frozen=True, kw_only=True)
class ClaimSpend:
    """Spend one use of a claim credential as part of :meth:`Registry.commit_issuance`."""

    claim_id: str
    max_uses: int


@dataclass(frozen=True, kw_only=True)
class IssuanceItem:
    """One certificate for :meth:`Registry.commit_issuances`: the arguments of one
    :meth:`Registry.commit_issuance` call (record, request key, audit event, claim spend)."""

    record: CertificateRecord
    request: RequestKey | None
    audit: AuditEvent
    claim: ClaimSpend | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.record, CertificateRecord):
            raise TypeError("record must be a CertificateRecord")
        if self.record.status is not CertificateStatus.ACTIVE:
            raise ValueError("a newly issued certificate must be active")
        if self.request is not None and not isinstance(self.request, RequestKey):
            raise TypeError("request must be a RequestKey or None")
        if not isinstance(self.audit, AuditEvent):
            raise TypeError("audit must be an AuditEvent")
        if self.claim is not None:
            if not isinstance(self.claim, ClaimSpend):
                raise TypeError("claim must be a ClaimSpend or None")
            uses = self.claim.max_uses
            if isinstance(uses, bool) or not isinstance(uses, int) or uses < 0:
                raise ValueError("max_uses must be an int >= 0")


class _Contended(Exception):
    """The one-pass batch commit met something unusual (a known request key, a serial or slot clash,
    a claim short of uses): its transaction is rolled back and the batch redone item by item."""


@dataclass(frozen=True, kw_only=True)
class TenantRecord:
    """A tenant and its configuration (policy, profiles) exactly as the caller stored it."""

    name: str
    config: Mapping[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True, kw_only=True)
class ClaimRecord:
    """A bootstrap claim credential: its policy as stored and how many uses it has spent."""

    tenant: str
    claim_id: str
    policy: Mapping[str, Any]
    uses: int
    created_at: dt.datetime


@dataclass(frozen=True, kw_only=True)
class ClaimUse:
    """One spent use of a claim credential (``use_no`` counts from 1)."""

    tenant: str
    claim_id: str
    use_no: int
    device_id: str
    serial: int
    at: dt.datetime


class StatusListSnapshot(NamedTuple):
    """A status list's bits, consistent with the region feed at ``sequence``."""

    size: int
    sequence: int
    bits: bytes


@dataclass(frozen=True, kw_only=True)
class StatusDelta:
    """Indices of one status list set by one revocation: takes the region feed from ``from_seq`` to ``to_seq``."""

    tenant: str
    region: str
    list_id: int
    from_seq: int
    to_seq: int
    indices: tuple[int, ...]
    reason: int
    at: dt.datetime


class FeedList(NamedTuple):
    """One status list of a region feed: its own sequence (last change) and the feed's current one."""

    region: str
    list_id: int
    capacity: int
    sequence: int
    feed_sequence: int


class CrlBase(NamedTuple):
    """The last full CRL of a shard: delta CRLs name its number and list what was revoked since."""

    crl_number: int
    this_update: dt.datetime


@dataclass(frozen=True, kw_only=True)
class RevocationOutcome:
    """What one revocation transaction did: the newly revoked certificates and the deltas it wrote."""

    revoked: tuple[CertificateRecord, ...]
    deltas: tuple[StatusDelta, ...]


class RevokedEntry(NamedTuple):
    """One CRL entry: serial, revocation time, CRLReason."""

    serial: int
    revoked_at: dt.datetime
    reason: int


class RevokedInRegion(NamedTuple):
    """A revoked certificate's serial, revocation time and region (:meth:`Registry.revocations_since`)."""

    serial: int
    revoked_at: dt.datetime
    region: str


@dataclass(frozen=True, kw_only=True)
class SessionUpdate:
    """What one broker saw of one certificate's sessions since its last write (:meth:`Registry.record_sessions`).

    ``connected_at`` is the last connect in the period (None: none); ``disconnected_at`` the
    disconnect after it, or None when the session was live at the end of the period.
    ``connects`` and ``duplicates`` (a second session with the same certificate while one was
    live) are added to the stored counters.
    """

    tenant: str
    device_id: str
    serial: int
    kind: str
    client_id: str
    node: str
    last_seen: dt.datetime
    remote: str | None = None
    connected_at: dt.datetime | None = None
    disconnected_at: dt.datetime | None = None
    connects: int = 0
    duplicates: int = 0
    last_duplicate_at: dt.datetime | None = None

    def __post_init__(self) -> None:
        serial_hex(self.serial)
        for name in ("tenant", "device_id", "kind", "client_id", "node"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string")
        object.__setattr__(self, "last_seen", _aware(self.last_seen, "last_seen"))
        for name in ("connected_at", "disconnected_at", "last_duplicate_at"):
            object.__setattr__(self, name, _aware(getattr(self, name), name, optional=True))
        if self.connects < 0 or self.duplicates < 0:
            raise ValueError("connects and duplicates must be >= 0")


@dataclass(frozen=True, kw_only=True)
class SessionRecord:
    """A certificate's sessions as the registry keeps them; ``live`` while ``disconnected_at`` is None."""

    tenant: str
    device_id: str
    serial: int
    kind: str
    client_id: str
    node: str
    remote: str | None
    connected_at: dt.datetime | None
    disconnected_at: dt.datetime | None
    last_seen: dt.datetime
    connects: int
    duplicates: int
    last_duplicate_at: dt.datetime | None

    @property
    def live(self) -> bool:
        """Connected when the broker last wrote (a crashed broker's rows stay live until it restarts)."""
        return self.disconnected_at is None and self.connected_at is not None


@dataclass(frozen=True, kw_only=True)
class StoredHealthReport:
    """The last health report a broker node published for a tenant (the JSON it sent)."""

    tenant: str
    node: str
    generated_at: dt.datetime
    report: Mapping[str, Any]


# ---------------------------------------------------------------- the interface


class Tx(Protocol):
    """What a backend hands the shared code: one open transaction. SQL uses ``$1`` placeholders;
    ``FOR UPDATE`` marks row locks (SQLite drops it: its write transaction already excludes others).
    Rows support ``row["column"]``."""

    async def execute(self, sql: str, *args: Any) -> None: ...

    async def fetch(self, sql: str, *args: Any) -> list[Any]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Any | None: ...


_CERT_COLS = (
    "tenant, serial, device_id, profile, region, status, not_before, not_after, der, spki_sha256, "
    "status_list_id, status_index, issued_at, revoked_at, revocation_reason, kind, replaced_serial"
)


def _cert(row: Any) -> CertificateRecord:
    return CertificateRecord(
        tenant=row["tenant"],
        serial=int(row["serial"], 16),
        device_id=row["device_id"],
        profile=row["profile"],
        region=row["region"],
        status=CertificateStatus(row["status"]),
        not_before=from_epoch(row["not_before"]),  # type: ignore[arg-type]
        not_after=from_epoch(row["not_after"]),  # type: ignore[arg-type]
        der=bytes(row["der"]),
        spki_sha256=bytes(row["spki_sha256"]),
        status_list_id=row["status_list_id"],
        status_index=row["status_index"],
        issued_at=from_epoch(row["issued_at"]),  # type: ignore[arg-type]
        revoked_at=from_epoch(row["revoked_at"]),
        revocation_reason=row["revocation_reason"],
        kind=CertificateKind(row["kind"]),
        replaced_serial=None if row["replaced_serial"] is None else int(row["replaced_serial"], 16),
    )


@functools.lru_cache(maxsize=256)
def _placeholders(first: int, count: int) -> str:
    """``$first, $first+1, ...``: ``count`` numbered parameters for an IN list."""
    return ", ".join(f"${n}" for n in range(first, first + count))


def _chunks(values: Sequence[T], size: int) -> list[Sequence[T]]:
    return [values[i:i + size] for i in range(0, len(values), size)]


@functools.lru_cache(maxsize=256)
def _values_placeholders(rows: int, width: int) -> str:
    """``($1, $2), ($3, $4)`` for a multi-row VALUES of ``rows`` x ``width`` (cached: the same few
    shapes recur batch after batch, and a full batch's text has ~900 placeholders)."""
    return ", ".join("(" + ", ".join(f"${i * width + j + 1}" for j in range(width)) + ")" for i in range(rows))


def _cert_row(record: CertificateRecord, serial: str | None = None, issued_at: int | None = None) -> tuple[Any, ...]:
    # The values of _CERT_COLS for a newly issued (active) certificate; ``serial`` and
    # ``issued_at``: their stored forms when the caller has them already.
    return (
        record.tenant, serial_hex(record.serial) if serial is None else serial, record.device_id, record.profile,
        record.region, str(record.status), to_epoch(record.not_before), to_epoch(record.not_after), record.der,
        record.spki_sha256, record.status_list_id, record.status_index,
        to_epoch(record.issued_at) if issued_at is None else issued_at, None, None,
        str(record.kind), None if record.replaced_serial is None else serial_hex(record.replaced_serial),
    )


def _entry(row: Any) -> AuditEntry:
    return AuditEntry(
        seq=int(row["seq"]),
        time=from_epoch(row["time"]),  # type: ignore[arg-type]
        tenant=row["tenant"],
        kind=row["kind"],
        actor=row["actor"],
        subject=row["subject"],
        details=json.loads(row["details"]),
        prev_hash=bytes(row["prev_hash"]),
        hash=bytes(row["hash"]),
    )


def _set_bit(bits: bytearray, index: int) -> None:
    # Status list bit order: bit i is byte i // 8, most significant bit first.
    bits[index // 8] |= 0x80 >> (index % 8)


def _json_obj(value: Mapping[str, Any], name: str) -> str:
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a mapping")
    return _audit.canonical_json(dict(value))


class Registry(abc.ABC):
    """The CA's state: certificates, idempotency keys, status lists, claims, CRL numbers, audit.

    Obtain one with :func:`open_registry`; close it with :meth:`close` (or ``async with``).
    All methods are coroutines; none blocks the event loop.
    """

    dialect: str

    # -- backend hooks

    @abc.abstractmethod
    def _transaction(self, *, write: bool) -> AbstractAsyncContextManager[Tx]:
        """One transaction: committed when the block ends normally, rolled back on any exception."""

    async def _run(self, body: Callable[[Tx], Awaitable[T]], *, write: bool) -> T:
        """Run ``body(tx)`` as one transaction and return its result (rolled back if it raises).

        ``body`` may await nothing but ``tx``'s methods: that lets a backend run it whole
        somewhere else (the SQLite backend runs it on its database thread, one hop in all).
        """
        async with self._transaction(write=write) as tx:
            return await body(tx)

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and threads. Idempotent."""

    async def __aenter__(self) -> Registry:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- audit

    async def _append_audit(self, tx: Tx, event: AuditEvent) -> AuditEntry:
        # The head row is the chain's lock: one appender at a time, and each sees the last hash.
        head = await tx.fetchrow("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
        if head is None:
            raise RegistryError("audit head row missing: database not initialised by certmq")
        entry, text = _audit.seal_with_text(event, seq=int(head["seq"]) + 1, prev_hash=bytes(head["hash"]))
        await tx.execute(
            "INSERT INTO audit_log (seq, time, tenant, kind, actor, subject, details, prev_hash, hash) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            entry.seq, to_epoch(entry.time), entry.tenant, entry.kind, entry.actor, entry.subject,
            text, entry.prev_hash, entry.hash,
        )
        await tx.execute("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1", entry.seq, entry.hash)
        return entry

    async def audit_refusal(self, event: AuditEvent) -> AuditEntry:
        """Append a refusal (or any other event that changes no state) to the audit trail."""
        return await self._run(lambda tx: self._append_audit(tx, event), write=True)

    async def audit_entries(self, since_seq: int = 0, *, page: int = 500) -> AsyncIterator[AuditEntry]:
        """Yield audit entries with ``seq > since_seq`` in ascending order (paged reads)."""
        last = since_seq
        while True:
            async with self._transaction(write=False) as tx:
                rows = await tx.fetch(
                    "SELECT * FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2", last, page
                )
            for row in rows:
                yield _entry(row)
            if len(rows) < page:
                return
            last = int(rows[-1]["seq"])

    async def audit_head(self) -> tuple[int, bytes]:
        """``(seq, hash)`` of the last audit entry (``(0, 32 zero bytes)`` when empty)."""
        async with self._transaction(write=False) as tx:
            row = await tx.fetchrow("SELECT seq, hash FROM audit_head WHERE id = 1")
        if row is None:
            raise RegistryError("audit head row missing: database not initialised by certmq")
        return int(row["seq"]), bytes(row["hash"])

    async def verify_audit(self) -> _audit.VerifyResult:
        """Verify the whole stored chain against the recorded head (catches truncation too)."""
        head = await self.audit_head()
        entries = [e async for e in self.audit_entries()]
        return _audit.verify_chain(entries, expected_head=head)

    # -- issuance

    async def find_request(
        self, tenant: str, identity: str, request_id: bytes
    ) -> tuple[bytes, CertificateRecord] | None:
        """``(fingerprint, certificate)`` already issued for this request key, or None."""
        return await self._run(lambda tx: self._find_request(tx, tenant, identity, request_id), write=False)

    async def find_request_or_live(
        self, tenant: str, identity: str, request_id: bytes, device_id: str
    ) -> tuple[tuple[bytes, CertificateRecord] | None, list[CertificateRecord]]:
        """:meth:`find_request`, and when there is no such request also the device's active
        certificates (``certificates_for_device(tenant, device_id, active_only=True)``), read in
        one snapshot: the two lookups of a claim, in one trip to the database instead of two."""
        return await self._run(lambda tx: self._request_or_live(tx, tenant, identity, request_id, device_id),
                               write=False)

    async def find_requests_or_live(
        self, lookups: Sequence[tuple[str, str, bytes, str]]
    ) -> list[tuple[tuple[bytes, CertificateRecord] | None, list[CertificateRecord]]]:
        """:meth:`find_request_or_live` for many ``(tenant, identity, request_id, device_id)`` at
        once, in one read: a batch of claims."""

        wanted = [(tenant, identity, bytes(request_id), device_id) for tenant, identity, request_id, device_id in lookups]

        async def body(tx: Tx) -> list[tuple[tuple[bytes, CertificateRecord] | None, list[CertificateRecord]]]:
            # A handful of set-wise statements instead of two per lookup (a batch of claims shares
            # tenant and identity); the same answers as _request_or_live for each lookup.
            ids: dict[tuple[str, str], set[bytes]] = {}
            for tenant, identity, request_id, _ in wanted:
                ids.setdefault((tenant, identity), set()).add(request_id)
            keys: dict[tuple[str, str, bytes], tuple[bytes, str]] = {}
            for (tenant, identity), request_ids in ids.items():
                for chunk in _chunks(sorted(request_ids), _MAX_PARAMS - 2):
                    rows = await tx.fetch(
                        "SELECT request_id, fingerprint, serial FROM requests WHERE tenant = $1 AND identity = $2 "
                        f"AND request_id IN ({_placeholders(3, len(chunk))})", tenant, identity, *chunk,
                    )
                    for row in rows:
                        keys[(tenant, identity, bytes(row["request_id"]))] = (bytes(row["fingerprint"]), row["serial"])
            certs: dict[tuple[str, str], CertificateRecord] = {}
            for tenant, serial in sorted({(t, s) for (t, _, _), (_, s) in keys.items()}):
                cert = await tx.fetchrow(
                    f"SELECT {_CERT_COLS} FROM certificates WHERE tenant = $1 AND serial = $2", tenant, serial
                )
                if cert is None:
                    raise RegistryError(f"request row points at missing certificate {serial}")
                certs[(tenant, serial)] = _cert(cert)
            devices: dict[str, set[str]] = {}
            for tenant, identity, request_id, device_id in wanted:
                if (tenant, identity, request_id) not in keys:
                    devices.setdefault(tenant, set()).add(device_id)
            live: dict[tuple[str, str], list[CertificateRecord]] = {}
            for tenant, names in devices.items():
                for chunk in _chunks(sorted(names), _MAX_PARAMS - 1):
                    rows = await tx.fetch(
                        f"SELECT {_CERT_COLS} FROM certificates WHERE tenant = $1 AND status = 'active' "
                        f"AND device_id IN ({_placeholders(2, len(chunk))}) ORDER BY issued_at, serial",
                        tenant, *chunk,
                    )
                    for row in rows:
                        live.setdefault((tenant, row["device_id"]), []).append(_cert(row))
            out: list[tuple[tuple[bytes, CertificateRecord] | None, list[CertificateRecord]]] = []
            for tenant, identity, request_id, device_id in wanted:
                key = keys.get((tenant, identity, request_id))
                if key is not None:
                    out.append(((key[0], certs[(tenant, key[1])]), []))
                else:
                    out.append((None, list(live.get((tenant, device_id), ()))))
            return out

        return await self._run(body, write=False)

    async def _request_or_live(
        self, tx: Tx, tenant: str, identity: str, request_id: bytes, device_id: str
    ) -> tuple[tuple[bytes, CertificateRecord] | None, list[CertificateRecord]]:
        found = await self._find_request(tx, tenant, identity, request_id)
        if found is not None:
            return found, []
        rows = await tx.fetch(
            f"SELECT {_CERT_COLS} FROM certificates WHERE tenant = $1 AND device_id = $2"
            " AND status = 'active' ORDER BY issued_at, serial", tenant, device_id,
        )
        return None, [_cert(r) for r in rows]

    async def _find_request(
        self, tx: Tx, tenant: str, identity: str, request_id: bytes
    ) -> tuple[bytes, CertificateRecord] | None:
        row = await tx.fetchrow(
            "SELECT fingerprint, serial FROM requests WHERE tenant = $1 AND identity = $2 AND request_id = $3",
            tenant, identity, bytes(request_id),
        )
        if row is None:
            return None
        cert = await tx.fetchrow(
            f"SELECT {_CERT_COLS} FROM certificates WHERE tenant = $1 AND serial = $2", tenant, row["serial"]
        )
        if cert is None:
            raise RegistryError(f"request row points at missing certificate {row['serial']}")
        return bytes(row["fingerprint"]), _cert(cert)

    async def commit_issuance(
        self,
        record: CertificateRecord,
        *,
        request: RequestKey | None,
        audit: AuditEvent,
        claim: ClaimSpend | None = None,
    ) -> CertificateRecord:
        """Store a signed certificate, its request key and its audit entry in one transaction.

        If ``request`` was already committed with the same fingerprint, nothing is written and the
        EXISTING certificate is returned: the caller must send that one, not the new one. A
        different fingerprint raises :class:`RequestIdReused`. With ``claim``, one use of that
        claim credential is spent in the same transaction (:class:`ClaimRefused` when none is left).
        Compare ``result.serial == record.serial`` to tell a fresh commit from a replay.
        """
        [result] = await self.commit_issuances(
            [IssuanceItem(record=record, request=request, audit=audit, claim=claim)]
        )
        if isinstance(result, RegistryError):
            raise result
        return result

    async def commit_issuances(self, items: Sequence[IssuanceItem]) -> list[CertificateRecord | RegistryError]:
        """Commit a batch of issuances in ONE transaction; one result per item, in order.

        Each item behaves exactly like its own :meth:`commit_issuance`: the stored (or, for a
        replay, the existing) certificate, or the error that call would raise —
        :class:`RequestIdReused`, :class:`DuplicateSerial`, :class:`ClaimRefused`,
        :class:`UnknownClaim` — returned in its place while the other items still commit. Audit
        entries are appended in item order. Any other failure (driver, bad audit details) rolls
        the whole batch back: nothing of it is written.
        """
        batch = list(items)
        for item in batch:
            if not isinstance(item, IssuanceItem):
                raise TypeError("commit_issuances takes IssuanceItem values")
            serial_hex(item.record.serial)
        if not batch:
            return []
        try:
            return await self._run(lambda tx: self._commit_batch(tx, batch), write=True)
        except _Contended:
            return await self._run(lambda tx: self._commit_each(tx, batch), write=True)

    async def _insert_rows(
        self, tx: Tx, table: str, columns: str, rows: Sequence[Sequence[Any]], returning: str
    ) -> list[Any]:
        # Multi-row VALUES (...), (...): one statement for many rows on both dialects.
        out: list[Any] = []
        width = len(rows[0]) if rows else 0
        step = max(1, _MAX_PARAMS // max(width, 1))
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            values = _values_placeholders(len(chunk), width)
            args = [v for row in chunk for v in row]
            out.extend(await tx.fetch(
                f"INSERT INTO {table} ({columns}) VALUES {values} ON CONFLICT DO NOTHING RETURNING {returning}",
                *args,
            ))
        return out

    async def _commit_batch(self, tx: Tx, batch: list[IssuanceItem]) -> list[CertificateRecord | RegistryError]:
        """The common case in a few statements: every key new, no clash, enough claim uses."""
        keys = [(i.record.tenant, i.request.identity, i.request.request_id) for i in batch if i.request is not None]
        serials = [(i.record.tenant, i.record.serial) for i in batch]
        slots = [(i.record.tenant, i.record.region, i.record.status_list_id, i.record.status_index)
                 for i in batch if i.record.status_index is not None]
        if len(set(keys)) != len(keys) or len(set(serials)) != len(serials) or len(set(slots)) != len(slots):
            raise _Contended
        # Stored forms of each item's serial and issuance time, made once for all its rows.
        stored_forms = {id(i): (serial_hex(i.record.serial), to_epoch(i.record.issued_at)) for i in batch}
        keyed = sorted((i for i in batch if i.request is not None),
                       key=lambda i: (i.record.tenant, i.request.identity, i.request.request_id))  # type: ignore[union-attr]
        if keyed:
            won = await self._insert_rows(
                tx, "requests", "tenant, identity, request_id, serial, fingerprint, created_at",
                [(i.record.tenant, i.request.identity, i.request.request_id, stored_forms[id(i)][0],  # type: ignore[union-attr]
                  i.request.fingerprint, stored_forms[id(i)][1]) for i in keyed],  # type: ignore[union-attr]
                "serial",
            )
            if len(won) != len(keyed):
                raise _Contended
        stored = await self._insert_rows(tx, "certificates", _CERT_COLS,
                                         [_cert_row(i.record, *stored_forms[id(i)]) for i in batch], "serial")
        if len(stored) != len(batch):
            raise _Contended
        spends: dict[tuple[str, str], list[IssuanceItem]] = {}
        for item in batch:
            if item.claim is not None:
                spends.setdefault((item.record.tenant, item.claim.claim_id), []).append(item)
        uses_rows: list[tuple[Any, ...]] = []
        for (tenant, claim_id), spenders in sorted(spends.items()):
            row = await tx.fetchrow(
                "SELECT uses FROM claims WHERE tenant = $1 AND claim_id = $2 FOR UPDATE", tenant, claim_id
            )
            if row is None:
                raise _Contended
            uses = int(row["uses"])
            for item in spenders:
                assert item.claim is not None
                if uses >= item.claim.max_uses:
                    raise _Contended
                uses += 1
                uses_rows.append((tenant, claim_id, uses, item.record.device_id, *stored_forms[id(item)]))
            await tx.execute("UPDATE claims SET uses = $3 WHERE tenant = $1 AND claim_id = $2", tenant, claim_id, uses)
        if uses_rows:
            await self._insert_rows(tx, "claim_uses", "tenant, claim_id, use_no, device_id, serial, at", uses_rows,
                                    "use_no")
        await self._append_audits(tx, [i.audit for i in batch])
        return [i.record for i in batch]

    async def _commit_each(self, tx: Tx, batch: list[IssuanceItem]) -> list[CertificateRecord | RegistryError]:
        """Item by item, each under a SAVEPOINT, so a refused item leaves no trace and the rest commit."""
        results: list[CertificateRecord | RegistryError] = []
        fresh: list[AuditEvent] = []
        for item in batch:
            await tx.execute("SAVEPOINT certmq_item")
            try:
                result = await self._commit_one(tx, item)
            except (RequestIdReused, DuplicateSerial, ClaimRefused, UnknownClaim) as exc:
                await tx.execute("ROLLBACK TO SAVEPOINT certmq_item")
                await tx.execute("RELEASE SAVEPOINT certmq_item")
                results.append(exc)
                continue
            await tx.execute("RELEASE SAVEPOINT certmq_item")
            results.append(result)
            if result is item.record:
                fresh.append(item.audit)
        # Audit last, like a single commit: the chain head is the last lock taken.
        await self._append_audits(tx, fresh)
        return results

    async def _commit_one(self, tx: Tx, item: IssuanceItem) -> CertificateRecord:
        record, request, claim = item.record, item.request, item.claim
        serial = serial_hex(record.serial)
        if request is not None:
            # Insert the key first: a concurrent commit of the same key waits here (PG) and
            # then finds the winner's row instead of issuing a second certificate.
            won = await tx.fetchrow(
                "INSERT INTO requests (tenant, identity, request_id, serial, fingerprint, created_at) "
                "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING serial",
                record.tenant, request.identity, request.request_id, serial, request.fingerprint,
                to_epoch(record.issued_at),
            )
            if won is None:
                found = await self._find_request(tx, record.tenant, request.identity, request.request_id)
                assert found is not None
                if found[0] != request.fingerprint:
                    raise RequestIdReused(
                        f"request id {request.request_id.hex()} of {request.identity!r} was already used "
                        "for a different request"
                    )
                return found[1]
        clash = await tx.fetchrow(
            "INSERT INTO certificates (" + _CERT_COLS + ") VALUES "
            "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) "
            "ON CONFLICT DO NOTHING RETURNING serial",
            *_cert_row(record),
        )
        if clash is None:
            raise DuplicateSerial(
                f"tenant {record.tenant!r} already has serial {serial} or status slot "
                f"{record.region}/{record.status_list_id}/{record.status_index}"
            )
        if claim is not None:
            await self._spend_claim(tx, record.tenant, claim.claim_id, record.device_id, serial,
                                    to_epoch(record.issued_at), claim.max_uses)
        return record

    async def _append_audits(self, tx: Tx, events: Sequence[AuditEvent]) -> list[AuditEntry]:
        """Append ``events`` in order: one head lock, one multi-row insert, one head update."""
        if len(events) <= 1:
            return [await self._append_audit(tx, e) for e in events]
        head = await tx.fetchrow("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
        if head is None:
            raise RegistryError("audit head row missing: database not initialised by certmq")
        seq, prev = int(head["seq"]), bytes(head["hash"])
        entries = []
        texts = []
        for event in events:
            entry, text = _audit.seal_with_text(event, seq=seq + 1, prev_hash=prev)
            entries.append(entry)
            texts.append(text)
            seq, prev = entry.seq, entry.hash
        await self._insert_rows(
            tx, "audit_log", "seq, time, tenant, kind, actor, subject, details, prev_hash, hash",
            [(e.seq, to_epoch(e.time), e.tenant, e.kind, e.actor, e.subject, text,
              e.prev_hash, e.hash) for e, text in zip(entries, texts)],
            "seq",
        )
        await tx.execute("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1", seq, prev)
        return entries

    async def get_certificate(self, tenant: str, serial: int) -> CertificateRecord | None:
        """The certificate with this serial in this tenant, or None."""
        serial_text = serial_hex(serial)
        row = await self._run(lambda tx: tx.fetchrow(
            f"SELECT {_CERT_COLS} FROM certificates WHERE tenant = $1 AND serial = $2", tenant, serial_text
        ), write=False)
        return None if row is None else _cert(row)

    async def certificates_for_device(
        self, tenant: str, device_id: str, *, profile: str | None = None, active_only: bool = False
    ) -> list[CertificateRecord]:
        """A device's certificates, oldest issuance first."""
        sql = f"SELECT {_CERT_COLS} FROM certificates WHERE tenant = $1 AND device_id = $2"
        args: list[Any] = [tenant, device_id]
        if profile is not None:
            args.append(profile)
            sql += f" AND profile = ${len(args)}"
        if active_only:
            sql += " AND status = 'active'"
        rows = await self._run(lambda tx: tx.fetch(sql + " ORDER BY issued_at, serial", *args), write=False)
        return [_cert(r) for r in rows]

    async def expiring(self, tenant: str, before: dt.datetime) -> list[CertificateRecord]:
        """Active certificates whose ``not_after`` is before ``before``, soonest first."""
        async with self._transaction(write=False) as tx:
            rows = await tx.fetch(
                f"SELECT {_CERT_COLS} FROM certificates WHERE tenant = $1 AND status = 'active' "
                "AND not_after < $2 ORDER BY not_after, serial", tenant, to_epoch(before),
            )
        return [_cert(r) for r in rows]

    async def count_by_status(self, tenant: str) -> dict[str, int]:
        """``{"active": n, "revoked": m}`` (both keys always present)."""
        async with self._transaction(write=False) as tx:
            rows = await tx.fetch(
                "SELECT status, COUNT(*) AS n FROM certificates WHERE tenant = $1 GROUP BY status", tenant
            )
        counts = {s.value: 0 for s in CertificateStatus}
        counts.update({r["status"]: int(r["n"]) for r in rows})
        return counts

    # -- status lists

    async def allocate_status_index(self, tenant: str, region: str, capacity: int) -> tuple[int, int]:
        """Reserve the next free ``(list_id, index)`` of the region's current status list.

        A full list rolls over to ``list_id + 1`` (created with ``capacity`` bits). Lists start
        at id 1. Not audited: a reservation changes no certificate's state.
        """
        [slot] = await self.allocate_status_indices(tenant, region, capacity, 1)
        return slot

    async def allocate_status_indices(
        self, tenant: str, region: str, capacity: int, count: int, *, spare: int = 0
    ) -> list[tuple[int, int]]:
        """Reserve ``count`` consecutive free slots in one transaction, in allocation order.

        Exactly what ``count`` calls of :meth:`allocate_status_index` would return: a list that
        fills up mid-batch rolls over to the next one (created with ``capacity`` bits).

        ``spare`` > 0 reserves up to that many more slots after them (returned after the
        ``count`` slots), but only from the list the last of the ``count`` slots came from: a
        list is never opened for spare slots alone, so fewer (or none) come back when that list
        is nearly full. A caller hands spare slots out later from memory (the CA service's slot
        blocks); a spare slot never handed out is simply never used -- its bit stays 0.
        """
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ValueError("capacity must be a positive int")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError("count must be an int >= 0")
        if isinstance(spare, bool) or not isinstance(spare, int) or spare < 0:
            raise ValueError("spare must be an int >= 0")
        if count == 0:
            return []

        async def body(tx: Tx) -> list[tuple[int, int]]:
            feed = await self._lock_feed(tx, tenant, region)
            list_id = int(feed["current_list_id"])
            lst = await tx.fetchrow(
                "SELECT capacity, next_index FROM status_lists WHERE tenant = $1 AND region = $2 AND list_id = $3 "
                "FOR UPDATE", tenant, region, list_id,
            )
            have = lst is not None
            size, nxt = (int(lst["capacity"]), int(lst["next_index"])) if lst is not None else (0, 0)
            out: list[tuple[int, int]] = []
            while len(out) < count:
                if have and nxt >= size:
                    list_id += 1
                    have = False
                    await tx.execute(
                        "UPDATE status_feeds SET current_list_id = $3 WHERE tenant = $1 AND region = $2",
                        tenant, region, list_id,
                    )
                if not have:
                    await tx.execute(
                        "INSERT INTO status_lists (tenant, region, list_id, capacity, next_index, sequence, bits) "
                        "VALUES ($1, $2, $3, $4, 0, $5, $6)",
                        tenant, region, list_id, capacity, int(feed["sequence"]), bytes((capacity + 7) // 8),
                    )
                    have, size, nxt = True, capacity, 0
                take = min(count - len(out), size - nxt)
                if len(out) + take == count:
                    take += min(spare, size - nxt - take)
                out.extend((list_id, i) for i in range(nxt, nxt + take))
                nxt += take
                await tx.execute(
                    "UPDATE status_lists SET next_index = $4 WHERE tenant = $1 AND region = $2 AND list_id = $3",
                    tenant, region, list_id, nxt,
                )
            return out

        return await self._run(body, write=True)

    async def _lock_feed(self, tx: Tx, tenant: str, region: str) -> Any:
        sql = "SELECT sequence, current_list_id FROM status_feeds WHERE tenant = $1 AND region = $2 FOR UPDATE"
        feed = await tx.fetchrow(sql, tenant, region)
        if feed is None:
            await tx.execute(
                "INSERT INTO status_feeds (tenant, region, sequence, current_list_id) VALUES ($1, $2, 0, 1) "
                "ON CONFLICT DO NOTHING", tenant, region,
            )
            feed = await tx.fetchrow(sql, tenant, region)
        return feed

    async def status_list(self, tenant: str, region: str, list_id: int) -> StatusListSnapshot | None:
        """The list's size, the region feed's sequence it is consistent with, and its bits."""
        async with self._transaction(write=False) as tx:
            row = await tx.fetchrow(
                "SELECT l.capacity, l.bits, f.sequence FROM status_lists l JOIN status_feeds f "
                "ON f.tenant = l.tenant AND f.region = l.region "
                "WHERE l.tenant = $1 AND l.region = $2 AND l.list_id = $3", tenant, region, list_id,
            )
        if row is None:
            return None
        return StatusListSnapshot(int(row["capacity"]), int(row["sequence"]), bytes(row["bits"]))

    async def deltas_since(self, tenant: str, region: str, sequence: int) -> list[StatusDelta]:
        """Deltas of the region feed with ``from_seq >= sequence``, in order."""
        async with self._transaction(write=False) as tx:
            rows = await tx.fetch(
                "SELECT * FROM status_deltas WHERE tenant = $1 AND region = $2 AND from_seq >= $3 ORDER BY from_seq",
                tenant, region, sequence,
            )
        return [
            StatusDelta(
                tenant=r["tenant"], region=r["region"], list_id=int(r["list_id"]), from_seq=int(r["from_seq"]),
                to_seq=int(r["to_seq"]), indices=tuple(json.loads(r["indices"])), reason=int(r["reason"]),
                at=from_epoch(r["at"]),  # type: ignore[arg-type]
            )
            for r in rows
        ]

    async def feed_lists(self, tenant: str, region: str | None = None) -> list[FeedList]:
        """Every status list of ``tenant`` (or of its ``region`` feed): what a feed publisher enumerates at start."""
        sql = ("SELECT l.region, l.list_id, l.capacity, l.sequence, f.sequence AS feed_sequence FROM status_lists l "
               "JOIN status_feeds f ON f.tenant = l.tenant AND f.region = l.region WHERE l.tenant = $1")
        args: list[Any] = [tenant]
        if region is not None:
            args.append(region)
            sql += " AND l.region = $2"
        async with self._transaction(write=False) as tx:
            rows = await tx.fetch(sql + " ORDER BY l.region, l.list_id", *args)
        return [FeedList(r["region"], int(r["list_id"]), int(r["capacity"]), int(r["sequence"]),
                         int(r["feed_sequence"])) for r in rows]

    async def list_state(self, tenant: str, region: str, list_id: int) -> StatusListSnapshot | None:
        """Like :meth:`status_list`, but ``sequence`` is the list's own: the feed sequence of its last change.

        Deltas of other lists of the region do not move it, so a subscriber chaining one list's
        deltas (each from the previous one's ``to``) can start from it.
        """
        async with self._transaction(write=False) as tx:
            row = await tx.fetchrow(
                "SELECT capacity, bits, sequence FROM status_lists WHERE tenant = $1 AND region = $2 AND list_id = $3",
                tenant, region, list_id,
            )
        if row is None:
            return None
        return StatusListSnapshot(int(row["capacity"]), int(row["sequence"]), bytes(row["bits"]))

    # -- revocation

    async def revoke(
        self,
        tenant: str,
        *,
        serial: int | None = None,
        device_id: str | None = None,
        profile: str | None = None,
        reason: int,
        at: dt.datetime,
        audit: AuditEvent,
    ) -> list[CertificateRecord]:
        """Revoke the active certificates picked by exactly one selector; return those newly revoked.

        Status bits, the region feed sequence (+1 per touched list), the deltas and the audit entry
        (its details gain ``revoked_serials``) are written in the same transaction. An unknown
        ``serial`` raises :class:`UnknownCertificate`; already revoked certificates are left alone.
        """
        chosen = [(n, v) for n, v in (("serial", serial), ("device_id", device_id), ("profile", profile)) if v is not None]
        if len(chosen) != 1:
            raise ValueError("revoke needs exactly one of serial, device_id, profile")
        outcome = await self.revoke_selected(
            tenant, serial=serial, device_id=device_id, profile=profile, reason=reason, at=at, audit=audit
        )
        return list(outcome.revoked)

    async def revoke_selected(
        self,
        tenant: str,
        *,
        serial: int | None = None,
        device_id: str | None = None,
        profile: str | None = None,
        reason: int,
        at: dt.datetime,
        audit: AuditEvent,
    ) -> RevocationOutcome:
        """Like :meth:`revoke`, also returning the deltas written; ``device_id`` may be narrowed by ``profile``.

        Selectors: ``serial`` alone, ``device_id`` (optionally with ``profile``), or ``profile`` alone.
        """
        if serial is not None and (device_id is not None or profile is not None):
            raise ValueError("a serial selects one certificate: no device_id or profile with it")
        if serial is None and device_id is None and profile is None:
            raise ValueError("revoke needs serial, device_id (optionally with profile), or profile")
        reason = int(RevocationReason(reason))
        epoch = to_epoch(at)
        where, values = [], []
        for column, value in (("serial", serial), ("device_id", device_id), ("profile", profile)):
            if value is not None:
                values.append(serial_hex(value) if column == "serial" else value)  # type: ignore[arg-type]
                where.append(f"{column} = ${len(values) + 1}")
        # One transaction body, run whole where the backend likes (SQLite: one hop to its
        # database thread instead of one per statement; a revocation's delta waits for it).
        async def body(tx: Tx) -> RevocationOutcome:
            deltas: list[StatusDelta] = []
            rows = await tx.fetch(
                f"SELECT {_CERT_COLS} FROM certificates WHERE tenant = $1 AND {' AND '.join(where)} "
                "AND status = 'active' ORDER BY serial FOR UPDATE", tenant, *values,
            )
            if not rows and serial is not None:
                exists = await tx.fetchrow(
                    "SELECT 1 AS x FROM certificates WHERE tenant = $1 AND serial = $2", tenant, values[0]
                )
                if exists is None:
                    raise UnknownCertificate(f"tenant {tenant!r} has no certificate {values[0]}")
            revoked = [
                replace(_cert(r), status=CertificateStatus.REVOKED, revoked_at=from_epoch(epoch), revocation_reason=reason)
                for r in rows
            ]
            for rec in revoked:
                await tx.execute(
                    "UPDATE certificates SET status = 'revoked', revoked_at = $3, revocation_reason = $4 "
                    "WHERE tenant = $1 AND serial = $2", tenant, serial_hex(rec.serial), epoch, reason,
                )
            groups: dict[str, dict[int, list[int]]] = {}
            for rec in revoked:
                if rec.status_list_id is not None:
                    groups.setdefault(rec.region, {}).setdefault(rec.status_list_id, []).append(rec.status_index)  # type: ignore[arg-type]
            for region in sorted(groups):
                seq = int((await self._lock_feed(tx, tenant, region))["sequence"])
                for list_id in sorted(groups[region]):
                    indices = sorted(groups[region][list_id])
                    lst = await tx.fetchrow(
                        "SELECT capacity, bits FROM status_lists WHERE tenant = $1 AND region = $2 AND list_id = $3 "
                        "FOR UPDATE", tenant, region, list_id,
                    )
                    if lst is None:
                        raise RegistryError(f"status list {tenant}/{region}/{list_id} does not exist")
                    bits = bytearray(lst["bits"])
                    for i in indices:
                        if not 0 <= i < int(lst["capacity"]):
                            raise RegistryError(f"status index {i} outside list {region}/{list_id}")
                        _set_bit(bits, i)
                    await tx.execute(
                        "UPDATE status_lists SET bits = $4, sequence = $5 WHERE tenant = $1 AND region = $2 "
                        "AND list_id = $3", tenant, region, list_id, bytes(bits), seq + 1,
                    )
                    await tx.execute(
                        "INSERT INTO status_deltas (tenant, region, list_id, from_seq, to_seq, indices, reason, at) "
                        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                        tenant, region, list_id, seq, seq + 1, json.dumps(indices), reason, epoch,
                    )
                    deltas.append(StatusDelta(
                        tenant=tenant, region=region, list_id=list_id, from_seq=seq, to_seq=seq + 1,
                        indices=tuple(indices), reason=reason, at=from_epoch(epoch),  # type: ignore[arg-type]
                    ))
                    seq += 1
                await tx.execute(
                    "UPDATE status_feeds SET sequence = $3 WHERE tenant = $1 AND region = $2", tenant, region, seq
                )
            details = {**audit.details, "revoked_serials": [serial_hex(r.serial) for r in revoked]}
            await self._append_audit(tx, replace(audit, details=details))
            return RevocationOutcome(revoked=tuple(revoked), deltas=tuple(deltas))

        return await self._run(body, write=True)

    async def revoked_for_crl(
        self, tenant: str, *, region: str | None = None, since: dt.datetime | None = None
    ) -> list[RevokedEntry]:
        """Revoked certificates (optionally of one region / revoked at or after ``since``), by serial."""
        sql = "SELECT serial, revoked_at, revocation_reason FROM certificates WHERE tenant = $1 AND status = 'revoked'"
        args: list[Any] = [tenant]
        if region is not None:
            args.append(region)
            sql += f" AND region = ${len(args)}"
        if since is not None:
            args.append(to_epoch(since))
            sql += f" AND revoked_at >= ${len(args)}"
        async with self._transaction(write=False) as tx:
            rows = await tx.fetch(sql + " ORDER BY serial", *args)
        return [
            RevokedEntry(int(r["serial"], 16), from_epoch(r["revoked_at"]), int(r["revocation_reason"]))  # type: ignore[arg-type]
            for r in rows
        ]

    async def revocations_since(self, tenant: str, *, since: dt.datetime) -> list[RevokedInRegion]:
        """Certificates of ``tenant`` revoked at or after ``since``, with their region, in one read.

        What a broker polling for other processes' revocations needs (serials to kick, regions
        whose feeds to catch up) without one lookup per serial.
        """
        async with self._transaction(write=False) as tx:
            rows = await tx.fetch(
                "SELECT serial, revoked_at, region FROM certificates WHERE tenant = $1 AND status = 'revoked'"
                " AND revoked_at >= $2", tenant, to_epoch(since),
            )
        # A poll re-reads the last seconds of a mass revocation (thousands of rows, a few distinct
        # seconds): convert each distinct time once.
        times: dict[int, dt.datetime] = {}
        out = []
        for r in rows:
            at = times.get(r["revoked_at"])
            if at is None:
                at = times[r["revoked_at"]] = from_epoch(r["revoked_at"])  # type: ignore[assignment]
            out.append(RevokedInRegion(int(r["serial"], 16), at, r["region"]))  # type: ignore[arg-type]
        return out

    async def next_crl_number(self, tenant: str, shard: str) -> int:
        """Allocate the next CRL number of ``(tenant, shard)``: 1, 2, 3, ... never repeated."""
        async with self._transaction(write=True) as tx:
            await tx.execute(
                "INSERT INTO crl_numbers (tenant, shard, last_number) VALUES ($1, $2, 0) ON CONFLICT DO NOTHING",
                tenant, shard,
            )
            row = await tx.fetchrow(
                "UPDATE crl_numbers SET last_number = last_number + 1 WHERE tenant = $1 AND shard = $2 "
                "RETURNING last_number", tenant, shard,
            )
        assert row is not None  # inserted just above in the same transaction
        return int(row["last_number"])

    async def record_crl_base(self, tenant: str, shard: str, crl_number: int, this_update: dt.datetime) -> None:
        """Remember the full CRL just published for ``(tenant, shard)``: later delta CRLs refer to it."""
        epoch = to_epoch(this_update)
        async with self._transaction(write=True) as tx:
            await tx.execute(
                "INSERT INTO crl_bases (tenant, shard, crl_number, this_update) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (tenant, shard) DO UPDATE SET crl_number = excluded.crl_number, "
                "this_update = excluded.this_update WHERE crl_bases.crl_number < excluded.crl_number",
                tenant, shard, crl_number, epoch,
            )

    async def last_crl_base(self, tenant: str, shard: str) -> CrlBase | None:
        """The last full CRL recorded for ``(tenant, shard)``, or None."""
        async with self._transaction(write=False) as tx:
            row = await tx.fetchrow(
                "SELECT crl_number, this_update FROM crl_bases WHERE tenant = $1 AND shard = $2", tenant, shard
            )
        if row is None:
            return None
        return CrlBase(int(row["crl_number"]), from_epoch(row["this_update"]))  # type: ignore[arg-type]

    # -- tenants

    async def put_tenant(self, name: str, config: Mapping[str, Any], *, audit: AuditEvent) -> TenantRecord:
        """Create or replace a tenant's configuration (audited in the same transaction, at ``audit.time``)."""
        if not isinstance(name, str) or not name:
            raise ValueError("tenant name must be a non-empty string")
        text = _json_obj(config, "tenant config")
        epoch = to_epoch(audit.time)
        async with self._transaction(write=True) as tx:
            await tx.execute(
                "INSERT INTO tenants (name, config, created_at, updated_at) VALUES ($1, $2, $3, $3) "
                "ON CONFLICT (name) DO UPDATE SET config = excluded.config, updated_at = excluded.updated_at",
                name, text, epoch,
            )
            row = await tx.fetchrow("SELECT * FROM tenants WHERE name = $1", name)
            await self._append_audit(tx, audit)
        return self._tenant(row)

    @staticmethod
    def _tenant(row: Any) -> TenantRecord:
        return TenantRecord(
            name=row["name"], config=json.loads(row["config"]),
            created_at=from_epoch(row["created_at"]), updated_at=from_epoch(row["updated_at"]),  # type: ignore[arg-type]
        )

    async def get_tenant(self, name: str) -> TenantRecord | None:
        """The tenant called ``name``, or None."""
        async with self._transaction(write=False) as tx:
            row = await tx.fetchrow("SELECT * FROM tenants WHERE name = $1", name)
        return None if row is None else self._tenant(row)

    async def list_tenants(self) -> list[TenantRecord]:
        """All tenants, by name."""
        async with self._transaction(write=False) as tx:
            rows = await tx.fetch("SELECT * FROM tenants ORDER BY name")
        return [self._tenant(r) for r in rows]

    # -- claims

    async def put_claim(
        self, tenant: str, claim_id: str, policy: Mapping[str, Any], *, audit: AuditEvent
    ) -> ClaimRecord:
        """Create or replace a claim credential's policy (its use count is kept)."""
        if not isinstance(claim_id, str) or not claim_id:
            raise ValueError("claim_id must be a non-empty string")
        text = _json_obj(policy, "claim policy")
        epoch = to_epoch(audit.time)
        async with self._transaction(write=True) as tx:
            await tx.execute(
                "INSERT INTO claims (tenant, claim_id, policy, uses, created_at) VALUES ($1, $2, $3, 0, $4) "
                "ON CONFLICT (tenant, claim_id) DO UPDATE SET policy = excluded.policy",
                tenant, claim_id, text, epoch,
            )
            row = await tx.fetchrow("SELECT * FROM claims WHERE tenant = $1 AND claim_id = $2", tenant, claim_id)
            await self._append_audit(tx, audit)
        return self._claim(row)

    @staticmethod
    def _claim(row: Any) -> ClaimRecord:
        return ClaimRecord(
            tenant=row["tenant"], claim_id=row["claim_id"], policy=json.loads(row["policy"]),
            uses=int(row["uses"]), created_at=from_epoch(row["created_at"]),  # type: ignore[arg-type]
        )

    async def get_claim(self, tenant: str, claim_id: str) -> ClaimRecord | None:
        """The claim credential ``claim_id`` of ``tenant``, or None."""
        row = await self._run(lambda tx: tx.fetchrow(
            "SELECT * FROM claims WHERE tenant = $1 AND claim_id = $2", tenant, claim_id
        ), write=False)
        return None if row is None else self._claim(row)

    async def claim_uses(self, tenant: str, claim_id: str) -> list[ClaimUse]:
        """The recorded uses of a claim credential, in order."""
        async with self._transaction(write=False) as tx:
            rows = await tx.fetch(
                "SELECT * FROM claim_uses WHERE tenant = $1 AND claim_id = $2 ORDER BY use_no", tenant, claim_id
            )
        return [
            ClaimUse(tenant=r["tenant"], claim_id=r["claim_id"], use_no=int(r["use_no"]), device_id=r["device_id"],
                     serial=int(r["serial"], 16), at=from_epoch(r["at"]))  # type: ignore[arg-type]
            for r in rows
        ]

    async def record_claim(
        self, tenant: str, claim_id: str, device_id: str, serial: int, at: dt.datetime, max_uses: int,
        *, audit: AuditEvent,
    ) -> ClaimUse:
        """Spend one use of a claim; :class:`ClaimRefused` (and nothing written) once ``max_uses`` are used.

        Race-safe: of concurrent callers competing for the last use exactly one succeeds.
        """
        serial_text = serial_hex(serial)
        epoch = to_epoch(at)
        async def body(tx: Tx) -> ClaimUse:
            use = await self._spend_claim(tx, tenant, claim_id, device_id, serial_text, epoch, max_uses)
            await self._append_audit(tx, audit)
            return use

        return await self._run(body, write=True)

    async def _spend_claim(
        self, tx: Tx, tenant: str, claim_id: str, device_id: str, serial_text: str, epoch: int, max_uses: int
    ) -> ClaimUse:
        if isinstance(max_uses, bool) or not isinstance(max_uses, int) or max_uses < 0:
            raise ValueError("max_uses must be an int >= 0")
        row = await tx.fetchrow(
            "SELECT uses FROM claims WHERE tenant = $1 AND claim_id = $2 FOR UPDATE", tenant, claim_id
        )
        if row is None:
            raise UnknownClaim(f"tenant {tenant!r} has no claim credential {claim_id!r}")
        uses = int(row["uses"])
        if uses >= max_uses:
            raise ClaimRefused(f"claim {claim_id!r} has used all {max_uses} of its uses")
        await tx.execute(
            "UPDATE claims SET uses = $3 WHERE tenant = $1 AND claim_id = $2", tenant, claim_id, uses + 1
        )
        await tx.execute(
            "INSERT INTO claim_uses (tenant, claim_id, use_no, device_id, serial, at) VALUES ($1, $2, $3, $4, $5, $6)",
            tenant, claim_id, uses + 1, device_id, serial_text, epoch,
        )
        return ClaimUse(tenant=tenant, claim_id=claim_id, use_no=uses + 1, device_id=device_id,
                        serial=int(serial_text, 16), at=from_epoch(epoch))  # type: ignore[arg-type]


    # -- fleet health: sessions seen by brokers, their last reports

    async def record_sessions(self, updates: Sequence[SessionUpdate]) -> int:
        """Write a period's session updates in ONE transaction (multi-row upserts); rows written.

        Brokers call this with everything they saw in the last second or so, one update per
        certificate, so a connection storm costs one transaction a second, not one per CONNECT.
        """
        batch = list(updates)
        for update in batch:
            if not isinstance(update, SessionUpdate):
                raise TypeError("record_sessions takes SessionUpdate values")
        if not batch:
            return 0
        merged: dict[tuple[str, str, int], SessionUpdate] = {}
        for update in batch:  # later updates of the same certificate win; counters add up
            key = (update.tenant, update.device_id, update.serial)
            prev = merged.get(key)
            if prev is not None:
                update = replace(update, connects=prev.connects + update.connects,
                                 duplicates=prev.duplicates + update.duplicates,
                                 connected_at=update.connected_at or prev.connected_at,
                                 remote=update.remote or prev.remote,
                                 last_duplicate_at=update.last_duplicate_at or prev.last_duplicate_at)
            merged[key] = update
        cols = ("tenant, device_id, serial, kind, client_id, node, remote, connected_at, disconnected_at, "
                "last_seen, connects, duplicates, last_duplicate_at")
        rows = [
            (u.tenant, u.device_id, serial_hex(u.serial), u.kind, u.client_id, u.node, u.remote,
             None if u.connected_at is None else to_epoch(u.connected_at),
             None if u.disconnected_at is None else to_epoch(u.disconnected_at), to_epoch(u.last_seen),
             u.connects, u.duplicates, None if u.last_duplicate_at is None else to_epoch(u.last_duplicate_at))
            for u in merged.values()
        ]
        width = len(rows[0])
        step = max(1, _MAX_PARAMS // width)

        async def body(tx: Tx) -> int:
            for start in range(0, len(rows), step):
                chunk = rows[start:start + step]
                values = ", ".join(
                    "(" + ", ".join(f"${i * width + j + 1}" for j in range(width)) + ")" for i in range(len(chunk))
                )
                await tx.execute(
                    f"INSERT INTO sessions ({cols}) VALUES {values} ON CONFLICT (tenant, device_id, serial) DO UPDATE "
                    "SET kind = excluded.kind, client_id = excluded.client_id, node = excluded.node, "
                    "remote = COALESCE(excluded.remote, sessions.remote), "
                    "connected_at = COALESCE(excluded.connected_at, sessions.connected_at), "
                    "disconnected_at = excluded.disconnected_at, "
                    "last_seen = CASE WHEN excluded.last_seen > sessions.last_seen THEN excluded.last_seen "
                    "ELSE sessions.last_seen END, "
                    "connects = sessions.connects + excluded.connects, "
                    "duplicates = sessions.duplicates + excluded.duplicates, "
                    "last_duplicate_at = COALESCE(excluded.last_duplicate_at, sessions.last_duplicate_at)",
                    *[v for row in chunk for v in row],
                )
            return len(rows)

        return await self._run(body, write=True)

    async def close_sessions(self, node: str, at: dt.datetime) -> int:
        """Mark every session ``node`` left live as disconnected at ``at`` (a broker starting after a crash)."""
        epoch = to_epoch(at)

        async def body(tx: Tx) -> int:
            rows = await tx.fetch(
                "UPDATE sessions SET disconnected_at = $2, last_seen = CASE WHEN last_seen > $2 THEN last_seen "
                "ELSE $2 END WHERE node = $1 AND disconnected_at IS NULL RETURNING serial", node, epoch,
            )
            return len(rows)

        return await self._run(body, write=True)

    @staticmethod
    def _session(row: Any) -> SessionRecord:
        return SessionRecord(
            tenant=row["tenant"], device_id=row["device_id"], serial=int(row["serial"], 16), kind=row["kind"],
            client_id=row["client_id"], node=row["node"], remote=row["remote"],
            connected_at=from_epoch(row["connected_at"]), disconnected_at=from_epoch(row["disconnected_at"]),
            last_seen=from_epoch(row["last_seen"]),  # type: ignore[arg-type]
            connects=int(row["connects"]), duplicates=int(row["duplicates"]),
            last_duplicate_at=from_epoch(row["last_duplicate_at"]),
        )

    async def sessions(self, tenant: str, *, live_only: bool = False) -> list[SessionRecord]:
        """Every certificate's session row of ``tenant`` (or only the live ones), by device and serial."""
        sql = "SELECT * FROM sessions WHERE tenant = $1"
        if live_only:
            sql += " AND disconnected_at IS NULL AND connected_at IS NOT NULL"
        rows = await self._run(lambda tx: tx.fetch(sql + " ORDER BY device_id, serial", tenant), write=False)
        return [self._session(r) for r in rows]

    async def session_pages(self, tenant: str, *, page: int = 500) -> AsyncIterator[list[SessionRecord]]:
        """Every session row of ``tenant`` in :meth:`sessions` order, ``page`` rows at a time.

        For a fleet-wide pass (the health report): each page is one short read, so the event loop
        never converts a whole fleet's rows in one go.
        """
        if page < 1:
            raise ValueError("page must be >= 1")
        after: tuple[str, str] | None = None
        while True:
            if after is None:
                rows = await self._run(lambda tx: tx.fetch(
                    "SELECT * FROM sessions WHERE tenant = $1 ORDER BY device_id, serial LIMIT $2", tenant, page,
                ), write=False)
            else:
                device, serial = after
                rows = await self._run(lambda tx: tx.fetch(
                    "SELECT * FROM sessions WHERE tenant = $1 AND (device_id > $2 OR (device_id = $2 AND serial > $3)) "
                    "ORDER BY device_id, serial LIMIT $4", tenant, device, serial, page,
                ), write=False)
            if rows:
                yield [self._session(r) for r in rows]
            if len(rows) < page:
                return
            after = (rows[-1]["device_id"], rows[-1]["serial"])

    async def certificates(
        self, tenant: str, *, status: CertificateStatus | str | None = None, page: int = 2000
    ) -> AsyncIterator[CertificateRecord]:
        """Yield every certificate of ``tenant`` (optionally of one ``status``) in serial order, read in pages."""
        if page < 1:
            raise ValueError("page must be >= 1")
        last = ""
        extra = "" if status is None else " AND status = $4"
        args: list[Any] = [] if status is None else [str(CertificateStatus(status))]
        while True:
            rows = await self._run(lambda tx: tx.fetch(
                f"SELECT {_CERT_COLS} FROM certificates WHERE tenant = $1 AND serial > $2{extra} "
                "ORDER BY serial LIMIT $3", tenant, last, page, *args,
            ), write=False)
            for row in rows:
                yield _cert(row)
            if len(rows) < page:
                return
            last = rows[-1]["serial"]

    async def put_health_report(self, tenant: str, node: str, generated_at: dt.datetime,
                                report: Mapping[str, Any]) -> None:
        """Keep ``report`` as ``node``'s latest health report for ``tenant`` (replacing the previous one)."""
        text = json.dumps(dict(report), sort_keys=True, separators=(",", ":"))
        epoch = to_epoch(generated_at)
        await self._run(lambda tx: tx.execute(
            "INSERT INTO health_reports (tenant, node, generated_at, report) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (tenant, node) DO UPDATE SET generated_at = excluded.generated_at, report = excluded.report",
            tenant, node, epoch, text,
        ), write=True)

    async def health_reports(self, tenant: str) -> list[StoredHealthReport]:
        """The latest health report of every broker node for ``tenant``, newest first."""
        rows = await self._run(lambda tx: tx.fetch(
            "SELECT * FROM health_reports WHERE tenant = $1 ORDER BY generated_at DESC, node", tenant
        ), write=False)
        return [StoredHealthReport(tenant=r["tenant"], node=r["node"], generated_at=from_epoch(r["generated_at"]),  # type: ignore[arg-type]
                                   report=json.loads(r["report"])) for r in rows]

async def open_registry(url: str) -> Registry:
    """Open (creating and migrating as needed) the registry at ``url``.

    ``sqlite:///abs/path/registry.db`` (``sqlite://rel/path.db`` is relative to the working
    directory; parent directories are created) or ``postgresql://user@host:port/db``.
    Raises :class:`SchemaTooNew` if the database comes from a newer certmq.
    """
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        from .sqlite import SqliteRegistry

        return await SqliteRegistry.open(url)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresRegistry

        return await PostgresRegistry.open(url)
    raise ValueError(f"unsupported registry URL scheme {scheme!r} (use sqlite:/// or postgresql://)")

