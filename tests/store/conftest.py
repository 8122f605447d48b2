"""Helpers for the registry tests, handed out as the ``h`` fixture (record/event factories, raw SQL).

Raw SQL goes around the registry on purpose: tamper tests edit the database the way an attacker
with file or database access would.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
import sqlite3
import types
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from broker_plugin.store.audit import AuditEvent
from broker_plugin.store.base import CertificateRecord, RequestKey
from broker_plugin.store.sqlite import sqlite_path

NOW = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
_serials = itertools.count(1)


def new_serial() -> int:
    """A fresh serial above 2**150: wider than any SQL integer type."""
    return (1 << 150) + next(_serials) * 7919


def make_cert(
    *, tenant: str = "acme", device_id: str = "dev-1", profile: str = "identity", region: str = "eu",
    slot: tuple[int, int] | None = None, days: int = 30, serial: int | None = None, **kw: Any,
) -> CertificateRecord:
    return CertificateRecord(
        tenant=tenant, serial=serial if serial is not None else new_serial(), device_id=device_id, profile=profile,
        region=region, not_before=NOW, not_after=NOW + dt.timedelta(days=days), der=b"\x30\x03der" + device_id.encode(),
        spki_sha256=bytes(range(32)), issued_at=NOW,
        status_list_id=None if slot is None else slot[0], status_index=None if slot is None else slot[1], **kw,
    )


def event(kind: str = "issue", subject: str = "dev-1", tenant: str | None = "acme", **details: Any) -> AuditEvent:
    return AuditEvent(kind=kind, actor="ca-test", subject=subject, time=NOW, tenant=tenant, details=details)


def key(request_id: bytes = b"R" * 16, fingerprint: bytes = b"fp-1", identity: str = "dev-1") -> RequestKey:
    return RequestKey(identity=identity, request_id=request_id, fingerprint=fingerprint)


async def raw(url: str, sql: str, *args: Any) -> list[Any]:
    """Run SQL straight against the database behind ``url`` (outside the registry), committed."""
    if url.startswith("sqlite:"):
        conn = sqlite3.connect(sqlite_path(url))
        try:
            with conn:
                return conn.execute(re.sub(r"\$(\d+)", r"?\1", sql), args).fetchall()
        finally:
            conn.close()
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


@pytest.fixture
def raw_sql(registry_url: str) -> Callable[..., Any]:
    async def run(sql: str, *args: Any) -> list[Any]:
        return await raw(registry_url, sql, *args)

    return run


@pytest.fixture
def h() -> types.SimpleNamespace:
    """The helpers above as one namespace: ``h.make_cert(...)``, ``h.event(...)``, ``h.raw(url, sql)``."""
    return types.SimpleNamespace(
        NOW=NOW, new_serial=new_serial, make_cert=make_cert, event=event, key=key, raw=raw
    )
