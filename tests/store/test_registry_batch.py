"""Batch registry operations (``allocate_status_indices``, ``commit_issuances``) on SQLite and a real
PostgreSQL server: each batch is one transaction, and each item behaves exactly like its own
``commit_issuance`` call."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest

from broker_plugin.store.base import (
    CertificateRecord,
    ClaimRefused,
    ClaimSpend,
    DuplicateSerial,
    IssuanceItem,
    RegistryError,
    RequestIdReused,
    UnknownClaim,
    open_registry,
)


class _Unserialisable:
    pass


async def _snapshot(reg, tenant="acme"):
    """What a rolled-back batch must leave untouched."""
    certs = [c for d in ("dev-1", "dev-2", "dev-3", "dev-4", "dev-5", "dev-6", "dev-7")
             for c in await reg.certificates_for_device(tenant, d)]
    claim = await reg.get_claim(tenant, "claim-a")
    return (await reg.count_by_status(tenant), await reg.audit_head(), sorted(c.serial for c in certs),
            None if claim is None else claim.uses)


async def _claim(reg, h, tenant="acme", claim_id="claim-a"):
    await reg.put_claim(tenant, claim_id, {"max_uses": 1}, audit=h.event("policy", subject=claim_id, tenant=tenant))


def _item(h, device, *, slot=None, key=None, claim=None, serial=None, tenant="acme", **details):
    record = h.make_cert(tenant=tenant, device_id=device, slot=slot, serial=serial)
    return IssuanceItem(record=record, request=key, audit=h.event(subject=device, tenant=tenant, **details),
                        claim=claim)


# ---------------------------------------------------------------- status slots


async def test_allocate_status_indices_matches_one_by_one_and_rolls_over(registry):
    batch = await registry.allocate_status_indices("acme", "eu", 3, 7)
    singles = [await registry.allocate_status_index("acme", "us", 3) for _ in range(7)]
    assert batch == singles == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0)]
    # The next batch continues where the last left off, across the list boundary.
    assert await registry.allocate_status_indices("acme", "eu", 3, 3) == [(3, 1), (3, 2), (4, 0)]
    assert await registry.allocate_status_index("acme", "eu", 3) == (4, 1)
    assert await registry.allocate_status_indices("acme", "eu", 3, 0) == []
    snap = await registry.status_list("acme", "eu", 2)
    assert snap is not None and snap.size == 3 and snap.bits == b"\x00"
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            await registry.allocate_status_indices("acme", "eu", 3, bad)
    with pytest.raises(ValueError):
        await registry.allocate_status_indices("acme", "eu", 0, 2)
    assert await registry.allocate_status_index("acme", "eu", 3) == (4, 2)  # bad calls reserved nothing


async def test_concurrent_batches_never_share_a_slot(registry_url):
    regs = [await open_registry(registry_url) for _ in range(2)]
    try:
        got = await asyncio.gather(*(regs[i % 2].allocate_status_indices("acme", "eu", 10, 7) for i in range(8)))
        slots = [s for batch in got for s in batch]
        assert len(slots) == len(set(slots)) == 56
        assert all(0 <= index < 10 for _, index in slots)
        for batch in got:  # each batch is consecutive: one transaction, nobody in between
            flat = [list_id * 10 + index for list_id, index in batch]
            assert flat == list(range(flat[0], flat[0] + 7))
    finally:
        for r in regs:
            await r.close()


async def test_spare_slots_come_from_the_last_list_only(registry):
    # Spare slots follow the needed ones in the same list...
    assert await registry.allocate_status_indices("acme", "eu", 8, 2, spare=3) == [(1, i) for i in range(5)]
    # ...stop at the end of that list...
    assert await registry.allocate_status_indices("acme", "eu", 8, 1, spare=10) == [(1, 5), (1, 6), (1, 7)]
    # ...and never open a list by themselves: a list that the needed slots fill exactly gives none.
    assert await registry.allocate_status_indices("acme", "eu", 8, 8, spare=4) == [(2, i) for i in range(8)]
    assert [f.list_id for f in await registry.feed_lists("acme", "eu")] == [1, 2]
    # Needed slots still roll over; the spare ones come from the list they end in.
    assert await registry.allocate_status_indices("acme", "eu", 8, 1) == [(3, 0)]
    await registry.allocate_status_indices("acme", "eu", 8, 5)
    got = await registry.allocate_status_indices("acme", "eu", 8, 4, spare=3)
    assert got == [(3, 6), (3, 7), (4, 0), (4, 1), (4, 2), (4, 3), (4, 4)]
    assert await registry.allocate_status_index("acme", "eu", 8) == (4, 5)  # every returned slot was reserved
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError):
            await registry.allocate_status_indices("acme", "eu", 8, 1, spare=bad)
    assert await registry.allocate_status_index("acme", "eu", 8) == (4, 6)  # bad calls reserved nothing


async def test_concurrent_blocks_with_spares_never_share_a_slot(registry_url):
    regs = [await open_registry(registry_url) for _ in range(2)]
    try:
        got = await asyncio.gather(*(regs[i % 2].allocate_status_indices("acme", "eu", 16, 3, spare=4)
                                     for i in range(12)))
        slots = [s for block in got for s in block]
        assert len(slots) == len(set(slots))
        assert all(len(block) >= 3 for block in got) and all(0 <= index < 16 for _, index in slots)
        # Nothing left between blocks but list ends that no block could use.
        nxt = await regs[0].allocate_status_index("acme", "eu", 16)
        assert nxt not in slots and nxt[0] >= max(list_id for list_id, _ in slots)
    finally:
        for r in regs:
            await r.close()


async def test_batched_lookups_answer_like_one_lookup_each(registry, h):
    import datetime as dt

    who = "bootstrap:claim-a"
    early, late = h.NOW, h.NOW + dt.timedelta(hours=1)
    found = _item(h, "dev-4", key=h.key(request_id=b"1" * 16, fingerprint=b"fp-dev-4", identity=who))
    others = [
        _item(h, "dev-1"),
        _item(h, "dev-2"),
        _item(h, "dev-1", tenant="beta"),
    ]
    await registry.commit_issuances([found, *others])
    # A later, second live certificate of dev-1 (order: issued_at, serial), one revoked, one of dev-5.
    second = h.make_cert(device_id="dev-1", serial=h.new_serial())
    second = CertificateRecord(**{**second.__dict__, "issued_at": late, "not_before": early})
    await registry.commit_issuance(second, request=None, audit=h.event(subject="dev-1"))
    await registry.revoke("acme", serial=others[1].record.serial, reason=1, at=late, audit=h.event("revoke"))
    lookups = [
        ("acme", who, b"1" * 16, "dev-4"),     # a replay: the stored certificate, no live list
        ("acme", who, b"1" * 16, "dev-9"),     # the same key naming another device: still the replay
        ("acme", who, b"2" * 16, "dev-1"),     # new key: dev-1's two active certificates, in order
        ("acme", who, b"3" * 16, "dev-2"),     # revoked only: nothing live
        ("acme", who, b"4" * 16, "dev-3"),     # never seen
        ("acme", "dev-4", b"1" * 16, "dev-4"),  # another identity's key space
        ("beta", who, b"1" * 16, "dev-1"),     # another tenant
        ("acme", who, b"2" * 16, "dev-1"),     # a duplicate lookup
    ]
    batched = await registry.find_requests_or_live(lookups)
    singly = [await registry.find_request_or_live(*lookup) for lookup in lookups]
    assert batched == singly
    assert batched[0] == ((b"fp-dev-4", found.record), []) and batched[1] == batched[0]
    assert [c.serial for c in batched[2][1]] == [others[0].record.serial, second.serial]
    assert batched[3] == batched[4] == (None, []) and batched[5][1] == [found.record]
    assert [c.tenant for c in batched[6][1]] == ["beta"]
    assert batched[2][1] is not batched[7][1]  # each lookup gets its own list
    assert await registry.find_requests_or_live([]) == []


# ---------------------------------------------------------------- commits


async def test_fresh_batch_commits_everything_in_order(registry, h):
    slots = await registry.allocate_status_indices("acme", "eu", 64, 5)
    await _claim(registry, h)
    await registry.put_claim("acme", "claim-b", {"max_uses": 9}, audit=h.event("policy", subject="claim-b"))
    items = [
        _item(h, f"dev-{i}", slot=slot, key=h.key(request_id=bytes([i]) * 16, identity=f"dev-{i}"),
              claim=ClaimSpend(claim_id="claim-b", max_uses=9) if i % 2 else None)
        for i, slot in enumerate(slots, start=1)
    ]
    seq0, _ = await registry.audit_head()
    results = await registry.commit_issuances(items)
    assert results == [i.record for i in items]
    for item in items:
        assert await registry.get_certificate("acme", item.record.serial) == item.record
        assert await registry.find_request("acme", item.request.identity, item.request.request_id) == (
            item.request.fingerprint, item.record)
    uses = await registry.claim_uses("acme", "claim-b")
    assert [(u.use_no, u.device_id, u.serial) for u in uses] == [
        (1, "dev-1", items[0].record.serial), (2, "dev-3", items[2].record.serial),
        (3, "dev-5", items[4].record.serial)]
    assert (await registry.get_claim("acme", "claim-b")).uses == 3
    entries = [e async for e in registry.audit_entries(seq0)]
    assert [e.subject for e in entries] == [f"dev-{i}" for i in range(1, 6)]
    assert (await registry.verify_audit()).ok
    assert await registry.commit_issuances([]) == []


async def test_mixed_batch_gives_each_item_its_own_outcome(registry, h):
    """Replay, reused id, refused claim, unknown claim, duplicate serial and fresh items in ONE batch:
    the same outcomes as one commit_issuance call per item, and only the fresh ones are written."""
    await _claim(registry, h)  # one use
    old = await registry.commit_issuance(h.make_cert(device_id="dev-1"), request=h.key(b"1" * 16, b"fp-1", "dev-1"),
                                         audit=h.event(subject="dev-1"))
    await registry.commit_issuance(h.make_cert(device_id="dev-2"), request=h.key(b"2" * 16, b"fp-2", "dev-2"),
                                   audit=h.event(subject="dev-2"))
    taken = await registry.commit_issuance(h.make_cert(device_id="dev-9"), request=None, audit=h.event())
    seq0, _ = await registry.audit_head()
    spend = ClaimSpend(claim_id="claim-a", max_uses=1)
    items = [
        _item(h, "dev-3", slot=(1, 0), key=h.key(b"3" * 16, identity="dev-3"), claim=spend),  # fresh, last use
        _item(h, "dev-1", slot=(1, 1), key=h.key(b"1" * 16, b"fp-1", "dev-1")),                # replay
        _item(h, "dev-2", slot=(1, 2), key=h.key(b"2" * 16, b"other", "dev-2")),               # reused id
        _item(h, "dev-4", slot=(1, 3), key=h.key(b"4" * 16, identity="dev-4"), claim=spend),  # claim used up
        _item(h, "dev-5", slot=(1, 4), key=h.key(b"5" * 16, identity="dev-5"),
              claim=ClaimSpend(claim_id="nobody", max_uses=3)),                                 # unknown claim
        _item(h, "dev-6", slot=(1, 5), key=h.key(b"6" * 16, identity="dev-6"), serial=taken.serial),  # dup serial
        _item(h, "dev-7", slot=(1, 6), key=h.key(b"7" * 16, identity="dev-7")),                # fresh
    ]
    results = await registry.commit_issuances(items)
    assert results[0] == items[0].record and results[6] == items[6].record
    assert results[1] == old  # the EXISTING certificate, not the new one
    assert [type(r) for r in results[2:6]] == [RequestIdReused, ClaimRefused, UnknownClaim, DuplicateSerial]
    assert all(isinstance(r, RegistryError) for r in results[2:6])
    # Nothing of the refused items was written; the fresh ones were.
    for item in items[2:6]:
        assert await registry.get_certificate("acme", item.record.serial) in (None, taken)
        found = await registry.find_request("acme", item.request.identity, item.request.request_id)
        assert found is None or found[0] != item.request.fingerprint
    assert await registry.get_certificate("acme", items[1].record.serial) is None
    assert [u.device_id for u in await registry.claim_uses("acme", "claim-a")] == ["dev-3"]
    entries = [e async for e in registry.audit_entries(seq0)]
    assert [(e.kind, e.subject) for e in entries] == [("issue", "dev-3"), ("issue", "dev-7")]
    assert (await registry.verify_audit()).ok

    # The same sequence, one commit_issuance call per item in another tenant: the same outcomes.
    await _claim(registry, h, tenant="beta")
    await registry.commit_issuance(h.make_cert(tenant="beta", device_id="dev-1"),
                                   request=h.key(b"1" * 16, b"fp-1", "dev-1"), audit=h.event(tenant="beta"))
    await registry.commit_issuance(h.make_cert(tenant="beta", device_id="dev-2"),
                                   request=h.key(b"2" * 16, b"fp-2", "dev-2"), audit=h.event(tenant="beta"))
    await registry.commit_issuance(h.make_cert(tenant="beta", serial=taken.serial), request=None,
                                   audit=h.event(tenant="beta"))
    one_by_one = []
    for item in items:
        record = CertificateRecord(**{**item.record.__dict__, "tenant": "beta"})
        try:
            got = await registry.commit_issuance(record, request=item.request, audit=item.audit, claim=item.claim)
            one_by_one.append("fresh" if got.serial == record.serial else "replay")
        except RegistryError as exc:
            one_by_one.append(type(exc).__name__)
    batched = ["fresh" if isinstance(r, CertificateRecord) and r.serial == i.record.serial
               else "replay" if isinstance(r, CertificateRecord) else type(r).__name__
               for r, i in zip(results, items)]
    assert batched == one_by_one


async def test_repeated_key_inside_one_batch(registry, h):
    await _claim(registry, h)
    spend = ClaimSpend(claim_id="claim-a", max_uses=1)
    first = _item(h, "dev-1", slot=(1, 0), key=h.key(b"A" * 16, b"fp", "dev-1"))
    again = _item(h, "dev-1", slot=(1, 1), key=h.key(b"A" * 16, b"fp", "dev-1"))
    clash = _item(h, "dev-1", slot=(1, 2), key=h.key(b"A" * 16, b"other", "dev-1"))
    # A refused first use of a key frees it: the next item with that key is fresh (as one by one).
    refused = _item(h, "dev-2", slot=(1, 3), key=h.key(b"B" * 16, b"fp", "dev-2"),
                    claim=ClaimSpend(claim_id="nobody", max_uses=1))
    retried = _item(h, "dev-2", slot=(1, 4), key=h.key(b"B" * 16, b"fp", "dev-2"), claim=spend)
    results = await registry.commit_issuances([first, again, clash, refused, retried])
    assert results[0] == first.record and results[1] == first.record
    assert isinstance(results[2], RequestIdReused) and isinstance(results[3], UnknownClaim)
    assert results[4] == retried.record
    assert await registry.get_certificate("acme", again.record.serial) is None
    assert (await registry.find_request("acme", "dev-2", b"B" * 16))[1] == retried.record
    assert (await registry.count_by_status("acme"))["active"] == 2
    assert (await registry.verify_audit()).ok


async def test_concurrent_batches_with_shared_keys_store_one_certificate_per_key(registry_url, h):
    regs = [await open_registry(registry_url) for _ in range(2)]
    try:
        batches = [
            [_item(h, f"dev-{k}", key=h.key(bytes([k]) * 16, b"fp", f"dev-{k}")) for k in range(1, 6)]
            for _ in range(4)
        ]
        results = await asyncio.gather(*(regs[i % 2].commit_issuances(b) for i, b in enumerate(batches)))
        for k in range(5):
            winners = {r[k].serial for r in results}
            assert len(winners) == 1  # every batch got the same certificate for key k
        assert await regs[0].count_by_status("acme") == {"active": 5, "revoked": 0}
        assert (await regs[1].verify_audit()).ok and (await regs[1].audit_head())[0] == 5
    finally:
        for r in regs:
            await r.close()


# ---------------------------------------------------------------- bad input and crashes


async def test_bad_items_are_refused_before_anything_is_written(registry, h):
    before = await _snapshot(registry)
    with pytest.raises(TypeError):
        await registry.commit_issuances([_item(h, "dev-1"), "not an item"])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        IssuanceItem(record=h.make_cert(status="revoked"), request=None, audit=h.event())
    with pytest.raises(TypeError):
        IssuanceItem(record=h.make_cert(), request=b"key", audit=h.event())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        IssuanceItem(record=h.make_cert(), request=None, audit=h.event(), claim=ClaimSpend(claim_id="c", max_uses=-1))
    assert await _snapshot(registry) == before


@pytest.mark.parametrize("fresh", [True, False], ids=["one-pass", "item-by-item"])
async def test_failure_mid_batch_leaves_nothing(registry, h, fresh):
    await _claim(registry, h)
    await registry.commit_issuance(h.make_cert(device_id="dev-1"), request=h.key(b"1" * 16, b"fp-1", "dev-1"),
                                   audit=h.event())
    before = await _snapshot(registry)
    items = [
        _item(h, "dev-3", slot=(1, 0), key=h.key(b"3" * 16, identity="dev-3"),
              claim=ClaimSpend(claim_id="claim-a", max_uses=1)),
        _item(h, "dev-4", slot=(1, 1), key=h.key(b"4" * 16, identity="dev-4"), bad=_Unserialisable()),
        _item(h, "dev-5", slot=(1, 2), key=h.key(b"5" * 16, identity="dev-5")),
    ]
    if not fresh:  # a replay sends the batch down the SAVEPOINT path
        items.append(_item(h, "dev-1", key=h.key(b"1" * 16, b"fp-1", "dev-1")))
    with pytest.raises(TypeError):
        await registry.commit_issuances(items)
    assert await _snapshot(registry) == before
    assert await registry.find_request("acme", "dev-3", b"3" * 16) is None
    assert await registry.claim_uses("acme", "claim-a") == []
    assert (await registry.verify_audit()).ok
    # The same batch without the poison commits.
    items[1] = _item(h, "dev-4", slot=(1, 1), key=h.key(b"4" * 16, identity="dev-4"))
    results = await registry.commit_issuances(items)
    assert results[:3] == [i.record for i in items[:3]]


async def test_process_killed_mid_batch_leaves_no_partial_rows(registry_url, h):
    reg = await open_registry(registry_url)
    await reg.commit_issuance(h.make_cert(), request=None, audit=h.event())
    head = await reg.audit_head()
    await reg.close()
    serials = [h.new_serial() for _ in range(3)]
    script = textwrap.dedent(f"""
        import asyncio, os, datetime as dt
        from broker_plugin.store.base import open_registry, CertificateRecord, RequestKey, IssuanceItem, Registry
        from broker_plugin.store.audit import AuditEvent

        async def die(self, tx, events):
            await tx.fetch("SELECT 1 AS x")  # certificates and request keys written, not committed
            os._exit(17)

        async def main():
            reg = await open_registry({registry_url!r})
            Registry._append_audits = die
            now = dt.datetime.now(dt.UTC)
            items = [IssuanceItem(
                record=CertificateRecord(tenant="acme", serial=s, device_id=f"dev-{{i}}", profile="identity",
                                         region="eu", not_before=now, not_after=now, der=b"x",
                                         spki_sha256=bytes(32), issued_at=now),
                request=RequestKey(identity=f"dev-{{i}}", request_id=bytes([i]) * 16, fingerprint=b"f"),
                audit=AuditEvent(kind="issue", actor="a", subject="s", time=now))
                for i, s in enumerate({serials!r})]
            await reg.commit_issuances(items)
        asyncio.run(main())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 17, proc.stderr
    reg = await open_registry(registry_url)
    try:
        for i, serial in enumerate(serials):
            assert await reg.get_certificate("acme", serial) is None
            assert await reg.find_request("acme", f"dev-{i}", bytes([i]) * 16) is None
        assert await reg.count_by_status("acme") == {"active": 1, "revoked": 0}
        assert await reg.audit_head() == head and (await reg.verify_audit()).ok
    finally:
        await reg.close()
