"""The registry's tables and their forward migrations, per SQL dialect.

A database records every applied step in ``schema_version``; opening it applies the steps it
lacks, in order, in one transaction. A database whose version is higher than :data:`LATEST`
was written by a newer certmq and is refused (:class:`~.base.SchemaTooNew`): an older binary
must not write into tables it does not understand.

Never edit a released step: add a new one. This module holds SQL text only; the backends run it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .audit import GENESIS_HASH
from .base import SchemaTooNew

__all__ = ["DIALECTS", "LATEST", "Migration", "VERSION_TABLE", "check_version", "migrations", "pending"]

DIALECTS = ("sqlite", "postgresql")

#: Created before any step runs, so the current version can always be read.
VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    " version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at BIGINT NOT NULL)"
)

# Types and literals that differ between dialects; everything else is shared SQL.
_TYPES = {
    "sqlite": {"blob": "BLOB", "zero_hash": f"X'{GENESIS_HASH.hex()}'"},
    "postgresql": {"blob": "BYTEA", "zero_hash": f"'\\x{GENESIS_HASH.hex()}'::bytea"},
}

# Times are epoch seconds (BIGINT); serials fixed-width hex TEXT (160-bit values exceed BIGINT).
_V1 = [
    """CREATE TABLE tenants (
        name TEXT PRIMARY KEY,
        config TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL)""",
    """CREATE TABLE certificates (
        tenant TEXT NOT NULL,
        serial TEXT NOT NULL CHECK (length(serial) = 40),
        device_id TEXT NOT NULL,
        profile TEXT NOT NULL,
        region TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
        not_before BIGINT NOT NULL,
        not_after BIGINT NOT NULL,
        der {blob} NOT NULL,
        spki_sha256 {blob} NOT NULL CHECK (length(spki_sha256) = 32),
        status_list_id BIGINT,
        status_index BIGINT,
        issued_at BIGINT NOT NULL,
        revoked_at BIGINT,
        revocation_reason INTEGER,
        PRIMARY KEY (tenant, serial),
        UNIQUE (tenant, region, status_list_id, status_index))""",
    "CREATE INDEX certificates_by_device ON certificates (tenant, device_id, profile)",
    "CREATE INDEX certificates_by_expiry ON certificates (tenant, not_after)",
    "CREATE INDEX certificates_by_profile ON certificates (tenant, profile, status)",
    "CREATE INDEX certificates_by_revocation ON certificates (tenant, revoked_at) WHERE status = 'revoked'",
    """CREATE TABLE requests (
        tenant TEXT NOT NULL,
        identity TEXT NOT NULL,
        request_id {blob} NOT NULL CHECK (length(request_id) = 16),
        serial TEXT NOT NULL,
        fingerprint {blob} NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (tenant, identity, request_id))""",
    """CREATE TABLE status_feeds (
        tenant TEXT NOT NULL,
        region TEXT NOT NULL,
        sequence BIGINT NOT NULL,
        current_list_id BIGINT NOT NULL,
        PRIMARY KEY (tenant, region))""",
    """CREATE TABLE status_lists (
        tenant TEXT NOT NULL,
        region TEXT NOT NULL,
        list_id BIGINT NOT NULL,
        capacity BIGINT NOT NULL CHECK (capacity > 0),
        next_index BIGINT NOT NULL,
        sequence BIGINT NOT NULL,
        bits {blob} NOT NULL,
        PRIMARY KEY (tenant, region, list_id))""",
    """CREATE TABLE status_deltas (
        tenant TEXT NOT NULL,
        region TEXT NOT NULL,
        list_id BIGINT NOT NULL,
        from_seq BIGINT NOT NULL,
        to_seq BIGINT NOT NULL,
        indices TEXT NOT NULL,
        reason INTEGER NOT NULL,
        at BIGINT NOT NULL,
        PRIMARY KEY (tenant, region, from_seq))""",
    """CREATE TABLE audit_log (
        seq BIGINT PRIMARY KEY,
        time BIGINT NOT NULL,
        tenant TEXT,
        kind TEXT NOT NULL,
        actor TEXT NOT NULL,
        subject TEXT NOT NULL,
        details TEXT NOT NULL,
        prev_hash {blob} NOT NULL,
        hash {blob} NOT NULL)""",
    # One row: the chain's head and its writers' lock (SELECT ... FOR UPDATE in PostgreSQL).
    """CREATE TABLE audit_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq BIGINT NOT NULL,
        hash {blob} NOT NULL)""",
    "INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, {zero_hash})",
]

_V2 = [
    "ALTER TABLE certificates ADD COLUMN kind TEXT NOT NULL DEFAULT 'operational' "
    "CHECK (kind IN ('operational', 'bootstrap', 'factory'))",
    "ALTER TABLE certificates ADD COLUMN replaced_serial TEXT",
    """CREATE TABLE claims (
        tenant TEXT NOT NULL,
        claim_id TEXT NOT NULL,
        policy TEXT NOT NULL,
        uses BIGINT NOT NULL DEFAULT 0,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (tenant, claim_id))""",
    # use_no is unique per claim: a second writer that somehow skipped the row lock still fails.
    """CREATE TABLE claim_uses (
        tenant TEXT NOT NULL,
        claim_id TEXT NOT NULL,
        use_no BIGINT NOT NULL,
        device_id TEXT NOT NULL,
        serial TEXT NOT NULL,
        at BIGINT NOT NULL,
        PRIMARY KEY (tenant, claim_id, use_no))""",
    """CREATE TABLE crl_numbers (
        tenant TEXT NOT NULL,
        shard TEXT NOT NULL,
        last_number BIGINT NOT NULL,
        PRIMARY KEY (tenant, shard))""",
]


# v3: operator certificates (a certificate kind the CA service authenticates operators with) and
# the base CRL each shard's delta CRLs refer to. SQLite cannot alter a CHECK constraint, so it
# rebuilds the certificates table (the documented 12-step procedure, minus foreign keys: none).
_KINDS_V3 = "('operational', 'bootstrap', 'factory', 'operator')"
_CRL_BASES = """CREATE TABLE crl_bases (
        tenant TEXT NOT NULL,
        shard TEXT NOT NULL,
        crl_number BIGINT NOT NULL,
        this_update BIGINT NOT NULL,
        PRIMARY KEY (tenant, shard))"""
_V3: dict[str, list[str]] = {
    "postgresql": [
        "ALTER TABLE certificates DROP CONSTRAINT IF EXISTS certificates_kind_check",
        f"ALTER TABLE certificates ADD CONSTRAINT certificates_kind_check CHECK (kind IN {_KINDS_V3})",
        _CRL_BASES,
    ],
    "sqlite": [
        f"""CREATE TABLE certificates_v3 (
        tenant TEXT NOT NULL,
        serial TEXT NOT NULL CHECK (length(serial) = 40),
        device_id TEXT NOT NULL,
        profile TEXT NOT NULL,
        region TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
        not_before BIGINT NOT NULL,
        not_after BIGINT NOT NULL,
        der BLOB NOT NULL,
        spki_sha256 BLOB NOT NULL CHECK (length(spki_sha256) = 32),
        status_list_id BIGINT,
        status_index BIGINT,
        issued_at BIGINT NOT NULL,
        revoked_at BIGINT,
        revocation_reason INTEGER,
        kind TEXT NOT NULL DEFAULT 'operational' CHECK (kind IN {_KINDS_V3}),
        replaced_serial TEXT,
        PRIMARY KEY (tenant, serial),
        UNIQUE (tenant, region, status_list_id, status_index))""",
        "INSERT INTO certificates_v3 (tenant, serial, device_id, profile, region, status, not_before, not_after, "
        "der, spki_sha256, status_list_id, status_index, issued_at, revoked_at, revocation_reason, kind, "
        "replaced_serial) SELECT tenant, serial, device_id, profile, region, status, not_before, not_after, der, "
        "spki_sha256, status_list_id, status_index, issued_at, revoked_at, revocation_reason, kind, replaced_serial "
        "FROM certificates",
        "DROP TABLE certificates",
        "ALTER TABLE certificates_v3 RENAME TO certificates",
        "CREATE INDEX certificates_by_device ON certificates (tenant, device_id, profile)",
        "CREATE INDEX certificates_by_expiry ON certificates (tenant, not_after)",
        "CREATE INDEX certificates_by_profile ON certificates (tenant, profile, status)",
        "CREATE INDEX certificates_by_revocation ON certificates (tenant, revoked_at) WHERE status = 'revoked'",
        _CRL_BASES,
    ],
}


# v4: fleet health. Sessions the broker saw (one row per tenant, device and certificate serial:
# last connect / disconnect, NULL disconnected_at while live, counters) and the last findings
# report each broker node published, so `certmq status` in another process can show both.
_V4 = [
    """CREATE TABLE sessions (
        tenant TEXT NOT NULL,
        device_id TEXT NOT NULL,
        serial TEXT NOT NULL CHECK (length(serial) = 40),
        kind TEXT NOT NULL,
        client_id TEXT NOT NULL,
        node TEXT NOT NULL,
        remote TEXT,
        connected_at BIGINT,
        disconnected_at BIGINT,
        last_seen BIGINT NOT NULL,
        connects BIGINT NOT NULL DEFAULT 0,
        duplicates BIGINT NOT NULL DEFAULT 0,
        last_duplicate_at BIGINT,
        PRIMARY KEY (tenant, device_id, serial))""",
    "CREATE INDEX sessions_live ON sessions (tenant, node) WHERE disconnected_at IS NULL",
    """CREATE TABLE health_reports (
        tenant TEXT NOT NULL,
        node TEXT NOT NULL,
        generated_at BIGINT NOT NULL,
        report TEXT NOT NULL,
        PRIMARY KEY (tenant, node))""",
]


@dataclass(frozen=True, kw_only=True)
class Migration:
    """One forward step: after it the database is at ``version``."""

    version: int
    description: str
    statements: tuple[str, ...]


# A step's statements are shared SQL, or (when the dialects cannot share it) one list per dialect.
_STEPS: list[tuple[int, str, list[str] | dict[str, list[str]]]] = [
    (1, "certificates, requests, status lists, audit trail", _V1),
    (2, "claims, CRL numbers, certificate kind and renewal chain", _V2),
    (3, "operator certificates, base CRL of each shard", _V3),
    (4, "sessions seen by the broker, last health report per node", _V4),
]

LATEST = _STEPS[-1][0]


def migrations(dialect: str) -> list[Migration]:
    """Every step of ``dialect`` in order."""
    if dialect not in _TYPES:
        raise ValueError(f"unknown SQL dialect {dialect!r} (known: {', '.join(DIALECTS)})")
    types = _TYPES[dialect]
    return [
        Migration(
            version=v,
            description=d,
            statements=tuple(s.format(**types) for s in (stmts[dialect] if isinstance(stmts, dict) else stmts)),
        )
        for v, d, stmts in _STEPS
    ]


def check_version(current: int, *, where: str) -> None:
    """Refuse a database written by a newer certmq."""
    if current > LATEST:
        raise SchemaTooNew(
            f"registry {where} has schema version {current}, this certmq knows up to {LATEST}: "
            "upgrade certmq (or restore a backup) instead of opening it with an older version"
        )


def pending(dialect: str, current: int, *, target: int | None = None) -> list[Migration]:
    """The steps that take a database at ``current`` to ``target`` (default: the latest)."""
    target = LATEST if target is None else target
    return [m for m in migrations(dialect) if current < m.version <= target]
