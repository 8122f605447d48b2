"""Registry.session_pages: the session rows of a tenant a page at a time, in sessions() order, on
SQLite and PostgreSQL (keyset paging over (device_id, serial), so devices with several
certificates split across pages are neither skipped nor repeated)."""

from __future__ import annotations

import datetime as dt

import pytest

from broker_plugin.store.base import SessionUpdate

NOW = dt.datetime(2026, 11, 27, 12, tzinfo=dt.UTC)


def _row(tenant: str, device: str, serial: int) -> SessionUpdate:
    return SessionUpdate(tenant=tenant, device_id=device, serial=serial, kind="device", client_id=device,
                         node="n1", last_seen=NOW, connected_at=NOW, connects=1)


async def test_pages_are_sessions_in_order(registry) -> None:
    # three serials for d-1 (a page boundary falls inside them), one for the others; another tenant's rows
    rows = [_row("acme", "d-1", s) for s in (7, 3, 0x10 ** 30)] + [_row("acme", f"d-{i}", 100 + i) for i in range(2, 9)]
    await registry.record_sessions(rows + [_row("globex", "d-1", 5)])
    everything = await registry.sessions("acme")
    assert len(everything) == 10 and all(s.tenant == "acme" for s in everything)
    for page in (1, 2, 3, 7, 10, 11, 500):
        pages = [p async for p in registry.session_pages("acme", page=page)]
        assert all(0 < len(p) <= page for p in pages)
        assert [s for p in pages for s in p] == everything, page
    assert [p async for p in registry.session_pages("nobody")] == []


async def test_a_page_size_below_one_is_refused(registry) -> None:
    with pytest.raises(ValueError, match="page"):
        async for _ in registry.session_pages("acme", page=0):
            pass
