"""Registry behaviour, the same tests on SQLite and on a real PostgreSQL server (``registry`` fixture)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from broker_plugin.store import schema
from broker_plugin.store.base import (
    CertificateKind,
    CertificateStatus,
    ClaimRefused,
    ClaimSpend,
    DuplicateSerial,
    RegistryError,
    RequestIdReused,
    SchemaTooNew,
    UnknownCertificate,
    UnknownClaim,
    open_registry,
    serial_hex,
)
from broker_plugin.store.postgres import PostgresRegistry
from broker_plugin.store.sqlite import SqliteRegistry
from protocol.codes import ErrorCode


async def _audit_kinds(reg):
    return [e.kind for e in [e async for e in reg.audit_entries()]]


async def _state(reg, tenant="acme", region="eu"):
    """Everything a failed operation must leave untouched."""
    lists = [await reg.status_list(tenant, region, i) for i in (1, 2)]
    certs = await reg.revoked_for_crl(tenant)
    return (await reg.count_by_status(tenant), await reg.audit_head(), lists, certs,
            await reg.deltas_since(tenant, region, 0))


# ---------------------------------------------------------------- issuance and idempotency


async def test_commit_and_read_back(registry, h):
    slot = await registry.allocate_status_index("acme", "eu", 64)
    rec = h.make_cert(slot=slot, kind="bootstrap", replaced_serial=h.new_serial())
    assert await registry.commit_issuance(rec, request=h.key(), audit=h.event()) == rec
    got = await registry.get_certificate("acme", rec.serial)
    assert got == rec and got.kind is CertificateKind.BOOTSTRAP and got.serial > 2**150
    assert await registry.get_certificate("other-tenant", rec.serial) is None
    assert await registry.certificates_for_device("acme", "dev-1") == [rec]
    assert await registry.certificates_for_device("acme", "dev-1", profile="encryption") == []
    assert await registry.expiring("acme", h.NOW + dt.timedelta(days=31)) == [rec]
    assert await registry.expiring("acme", h.NOW + dt.timedelta(days=29)) == []
    assert await registry.count_by_status("acme") == {"active": 1, "revoked": 0}
    fp, found = await registry.find_request("acme", "dev-1", b"R" * 16)
    assert (fp, found) == (b"fp-1", rec)
    assert await registry.find_request("acme", "dev-2", b"R" * 16) is None
    assert await _audit_kinds(registry) == ["issue"]


async def test_same_request_key_returns_existing_certificate_and_writes_nothing(registry, h):
    first = h.make_cert()
    await registry.commit_issuance(first, request=h.key(), audit=h.event())
    again = h.make_cert()  # a second signing of the same request: must never be stored or sent
    result = await registry.commit_issuance(again, request=h.key(), audit=h.event())
    assert result == first and result.serial != again.serial
    assert await registry.get_certificate("acme", again.serial) is None
    assert await registry.count_by_status("acme") == {"active": 1, "revoked": 0}
    assert await _audit_kinds(registry) == ["issue"]


async def test_idempotency_survives_restart(registry_url, h):
    rec = h.make_cert()
    reg = await open_registry(registry_url)
    await reg.commit_issuance(rec, request=h.key(), audit=h.event())
    await reg.close()
    reg = await open_registry(registry_url)
    try:
        assert await reg.find_request("acme", "dev-1", b"R" * 16) == (b"fp-1", rec)
        assert await reg.commit_issuance(h.make_cert(), request=h.key(), audit=h.event()) == rec
        assert (await reg.verify_audit()).ok
    finally:
        await reg.close()


async def test_request_id_reused_with_other_fingerprint_is_refused(registry, h):
    await registry.commit_issuance(h.make_cert(), request=h.key(), audit=h.event())
    before = await _state(registry)
    other = h.make_cert()
    with pytest.raises(RequestIdReused) as err:
        await registry.commit_issuance(other, request=h.key(fingerprint=b"fp-2"), audit=h.event())
    assert err.value.code == ErrorCode.REQUEST_ID_REUSED
    assert await registry.get_certificate("acme", other.serial) is None
    assert await _state(registry) == before


async def test_same_request_id_for_another_identity_is_independent(registry, h):
    a = await registry.commit_issuance(h.make_cert(), request=h.key(), audit=h.event())
    b = await registry.commit_issuance(h.make_cert(device_id="dev-2"), request=h.key(identity="dev-2"), audit=h.event())
    assert a.serial != b.serial


async def test_concurrent_commits_with_one_request_key_store_one_certificate(registry_url, h):
    # Two registries = two connections (two pools on PostgreSQL): real contention, not one lock.
    regs = [await open_registry(registry_url) for _ in range(2)]
    try:
        candidates = [h.make_cert() for _ in range(8)]
        results = await asyncio.gather(*(
            regs[i % 2].commit_issuance(c, request=h.key(), audit=h.event()) for i, c in enumerate(candidates)
        ))
        assert len({r.serial for r in results}) == 1
        assert results[0].serial in {c.serial for c in candidates}
        assert await regs[0].count_by_status("acme") == {"active": 1, "revoked": 0}
        assert await _audit_kinds(regs[1]) == ["issue"]
        assert (await regs[0].verify_audit()).ok
    finally:
        for r in regs:
            await r.close()


async def test_duplicate_serial_or_status_slot_is_refused(registry, h):
    rec = h.make_cert(slot=(1, 0))
    await registry.commit_issuance(rec, request=None, audit=h.event())
    before = await _state(registry)
    with pytest.raises(DuplicateSerial):
        await registry.commit_issuance(h.make_cert(serial=rec.serial), request=h.key(), audit=h.event())
    with pytest.raises(DuplicateSerial):
        await registry.commit_issuance(h.make_cert(slot=(1, 0)), request=h.key(), audit=h.event())
    assert await _state(registry) == before
    assert await registry.find_request("acme", "dev-1", b"R" * 16) is None


def test_bad_values_are_refused_on_construction(h):
    with pytest.raises(ValueError):
        h.make_cert(serial=0)
    with pytest.raises(ValueError):
        h.make_cert(serial=1 << 160)
    with pytest.raises(ValueError):
        dataclasses.replace(h.make_cert(), status_list_id=3)
    with pytest.raises(ValueError):
        h.key(request_id=b"short")
    with pytest.raises(ValueError):
        h.make_cert(kind="golden")
    naive = dt.datetime(2026, 1, 1)
    with pytest.raises(ValueError, match="aware"):
        dataclasses.replace(h.make_cert(), issued_at=naive)
    with pytest.raises(ValueError, match="aware"):
        dataclasses.replace(h.event(), time=naive)


# ---------------------------------------------------------------- crash consistency


class _Unserialisable:
    pass


async def test_failure_mid_transaction_leaves_no_partial_rows(registry, h):
    rec = h.make_cert(slot=await registry.allocate_status_index("acme", "eu", 8))
    before = await _state(registry)
    # The audit append is the last step: the certificate and request rows are already written.
    with pytest.raises(TypeError):
        await registry.commit_issuance(rec, request=h.key(), audit=h.event(bad=_Unserialisable()))
    assert await registry.get_certificate("acme", rec.serial) is None
    assert await registry.find_request("acme", "dev-1", b"R" * 16) is None
    assert await _state(registry) == before
    assert await registry.commit_issuance(rec, request=h.key(), audit=h.event()) == rec


async def test_sqlite_process_killed_mid_transaction_leaves_no_partial_rows(tmp_path, h):
    url = f"sqlite://{tmp_path}/registry.db"
    reg = await open_registry(url)
    await reg.commit_issuance(h.make_cert(), request=None, audit=h.event())
    await reg.close()
    victim = h.new_serial()
    script = textwrap.dedent(f"""
        import asyncio, os, datetime as dt
        from broker_plugin.store.base import open_registry, CertificateRecord, RequestKey
        from broker_plugin.store.audit import AuditEvent
        from broker_plugin.store.sqlite import SqliteRegistry

        async def die(self, tx, event):
            await tx.execute("SELECT 1")  # certificate and request rows are written, not committed
            os._exit(17)

        async def main():
            reg = await open_registry({url!r})
            SqliteRegistry._append_audit = die
            now = dt.datetime.now(dt.UTC)
            rec = CertificateRecord(tenant="acme", serial={victim}, device_id="dev-9", profile="identity",
                                    region="eu", not_before=now, not_after=now, der=b"x", spki_sha256=bytes(32),
                                    issued_at=now)
            await reg.commit_issuance(rec, request=RequestKey(identity="dev-9", request_id=b"K" * 16,
                                      fingerprint=b"f"), audit=AuditEvent(kind="issue", actor="a", subject="s",
                                      time=now))
        asyncio.run(main())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 17, proc.stderr
    reg = await open_registry(url)
    try:
        assert await reg.get_certificate("acme", victim) is None
        assert await reg.find_request("acme", "dev-9", b"K" * 16) is None
        assert await reg.count_by_status("acme") == {"active": 1, "revoked": 0}
        assert (await reg.verify_audit()).ok and (await reg.audit_head())[0] == 1
    finally:
        await reg.close()


# ---------------------------------------------------------------- status lists


async def test_status_index_allocation_rolls_over(registry):
    got = [await registry.allocate_status_index("acme", "eu", 3) for _ in range(7)]
    assert got == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0)]
    assert await registry.allocate_status_index("acme", "us", 3) == (1, 0)
    assert await registry.allocate_status_index("beta", "eu", 3) == (1, 0)
    snap = await registry.status_list("acme", "eu", 2)
    assert snap.size == 3 and snap.sequence == 0 and snap.bits == b"\x00"
    assert await registry.status_list("acme", "eu", 9) is None
    with pytest.raises(ValueError):
        await registry.allocate_status_index("acme", "eu", 0)


async def test_concurrent_allocations_are_unique(registry_url):
    regs = [await open_registry(registry_url) for _ in range(2)]
    try:
        got = await asyncio.gather(*(regs[i % 2].allocate_status_index("acme", "eu", 5) for i in range(20)))
        assert sorted(got) == [(lid, i) for lid in range(1, 5) for i in range(5)]
    finally:
        for r in regs:
            await r.close()


async def _issue_many(reg, h, specs):
    out = []
    for device, profile, region in specs:
        slot = await reg.allocate_status_index("acme", region, 4)
        rec = h.make_cert(device_id=device, profile=profile, region=region, slot=slot)
        out.append(await reg.commit_issuance(rec, request=None, audit=h.event(subject=device)))
    return out


def _bits_set(bits: bytes) -> list[int]:
    return [i for i in range(len(bits) * 8) if bits[i // 8] & (0x80 >> (i % 8))]


async def test_revoke_by_serial_sets_bit_bumps_sequence_records_delta_and_audit(registry, h):
    certs = await _issue_many(registry, h, [("dev-1", "identity", "eu"), ("dev-2", "identity", "eu")])
    at = h.NOW + dt.timedelta(hours=1)
    done = await registry.revoke("acme", serial=certs[1].serial, reason=1, at=at,
                                 audit=h.event("revoke", subject="dev-2"))
    assert [(r.serial, r.status, r.revoked_at, r.revocation_reason) for r in done] == [
        (certs[1].serial, CertificateStatus.REVOKED, at, 1)]
    assert await registry.get_certificate("acme", certs[1].serial) == done[0]
    snap = await registry.status_list("acme", "eu", 1)
    assert (snap.size, snap.sequence, _bits_set(snap.bits)) == (4, 1, [certs[1].status_index])
    [delta] = await registry.deltas_since("acme", "eu", 0)
    assert (delta.list_id, delta.from_seq, delta.to_seq, delta.indices, delta.reason, delta.at) == (
        1, 0, 1, (certs[1].status_index,), 1, at)
    entries = [e async for e in registry.audit_entries()]
    assert entries[-1].kind == "revoke"
    assert entries[-1].details["revoked_serials"] == [serial_hex(certs[1].serial)]
    assert await registry.revoked_for_crl("acme") == [(certs[1].serial, at, 1)]
    # Revoking again revokes nothing new and leaves bits and sequence alone.
    assert await registry.revoke("acme", serial=certs[1].serial, reason=4, at=at, audit=h.event("revoke")) == []
    assert await registry.status_list("acme", "eu", 1) == snap
    assert (await registry.get_certificate("acme", certs[1].serial)).revocation_reason == 1
    assert len(await registry.deltas_since("acme", "eu", 0)) == 1


async def test_revoke_by_device_spans_lists_and_regions(registry, h):
    specs = [("dev-1", "identity", "eu")] * 5 + [("dev-1", "encryption", "us"), ("dev-2", "identity", "eu")]
    certs = await _issue_many(registry, h, specs)
    done = await registry.revoke("acme", device_id="dev-1", reason=5, at=h.NOW, audit=h.event("revoke"))
    assert sorted(r.serial for r in done) == sorted(c.serial for c in certs[:6])
    assert await registry.count_by_status("acme") == {"active": 1, "revoked": 6}
    eu1, eu2 = await registry.status_list("acme", "eu", 1), await registry.status_list("acme", "eu", 2)
    # eu: dev-1 holds list 1 indices 0-3 and list 2 index 0; dev-2 holds list 2 index 1 (untouched).
    assert _bits_set(eu1.bits) == [0, 1, 2, 3] and _bits_set(eu2.bits) == [0]
    assert eu1.sequence == eu2.sequence == 2
    deltas = await registry.deltas_since("acme", "eu", 0)
    assert [(d.list_id, d.from_seq, d.to_seq, d.indices) for d in deltas] == [(1, 0, 1, (0, 1, 2, 3)), (2, 1, 2, (0,))]
    assert [d.from_seq for d in await registry.deltas_since("acme", "eu", 1)] == [1]
    us = await registry.status_list("acme", "us", 1)
    assert (us.sequence, _bits_set(us.bits)) == (1, [0])
    assert await registry.revoked_for_crl("acme", region="us") == [(certs[5].serial, h.NOW, 5)]


async def test_revoke_by_profile_and_crl_since(registry, h):
    certs = await _issue_many(registry, h, [("dev-1", "ota-signing", "eu"), ("dev-2", "ota-signing", "eu"),
                                            ("dev-3", "identity", "eu")])
    await registry.revoke("acme", serial=certs[2].serial, reason=0, at=h.NOW, audit=h.event("revoke"))
    later = h.NOW + dt.timedelta(days=1)
    done = await registry.revoke("acme", profile="ota-signing", reason=1, at=later, audit=h.event("revoke"))
    assert {r.serial for r in done} == {certs[0].serial, certs[1].serial}
    assert {e.serial for e in await registry.revoked_for_crl("acme", since=later)} == {c.serial for c in certs[:2]}
    assert len(await registry.revoked_for_crl("acme")) == 3
    assert await registry.certificates_for_device("acme", "dev-1", active_only=True) == []


async def test_bad_revocation_selector_changes_nothing(registry, h):
    certs = await _issue_many(registry, h, [("dev-1", "identity", "eu")])
    before = await _state(registry)
    for kwargs in ({}, {"serial": certs[0].serial, "device_id": "dev-1"}, {"device_id": "dev-1", "profile": "identity"}):
        with pytest.raises(ValueError, match="exactly one"):
            await registry.revoke("acme", reason=1, at=h.NOW, audit=h.event("revoke"), **kwargs)
    with pytest.raises(ValueError):
        await registry.revoke("acme", serial=certs[0].serial, reason=7, at=h.NOW, audit=h.event("revoke"))
    with pytest.raises(UnknownCertificate):
        await registry.revoke("acme", serial=h.new_serial(), reason=1, at=h.NOW, audit=h.event("revoke"))
    with pytest.raises(UnknownCertificate):
        await registry.revoke("beta", serial=certs[0].serial, reason=1, at=h.NOW, audit=h.event("revoke"))
    assert await _state(registry) == before


async def test_crl_numbers_count_per_shard(registry):
    assert [await registry.next_crl_number("acme", "eu-0") for _ in range(3)] == [1, 2, 3]
    assert await registry.next_crl_number("acme", "eu-1") == 1
    assert await registry.next_crl_number("beta", "eu-0") == 1


# ---------------------------------------------------------------- tenants and claims


async def test_tenants_are_stored_and_policy_changes_audited(registry, h):
    t = await registry.put_tenant("acme", {"profiles": ["identity"], "max_days": 30}, audit=h.event("policy"))
    assert t.config == {"profiles": ["identity"], "max_days": 30}
    later = h.NOW + dt.timedelta(days=1)
    await registry.put_tenant("acme", {"profiles": []}, audit=h.event("policy").__class__(
        kind="policy", actor="op", subject="acme", time=later, tenant="acme"))
    await registry.put_tenant("beta", {}, audit=h.event("policy", tenant="beta"))
    got = await registry.get_tenant("acme")
    assert got.config == {"profiles": []} and got.created_at == h.NOW and got.updated_at == later
    assert [t.name for t in await registry.list_tenants()] == ["acme", "beta"]
    assert await registry.get_tenant("nope") is None
    assert await _audit_kinds(registry) == ["policy"] * 3
    with pytest.raises(ValueError):
        await registry.put_tenant("gamma", ["not", "a", "mapping"], audit=h.event("policy"))
    assert await registry.get_tenant("gamma") is None


async def test_claim_uses_are_counted_and_refused_beyond_max(registry, h):
    policy = {"devices": ["dev-1", "dev-2"], "max_uses": 2}
    await registry.put_claim("acme", "batch-7", policy, audit=h.event("policy"))
    for n, dev in enumerate(["dev-1", "dev-2"], start=1):
        use = await registry.record_claim("acme", "batch-7", dev, h.new_serial(), h.NOW, 2, audit=h.event("claim"))
        assert (use.use_no, use.device_id) == (n, dev)
    head = await registry.audit_head()
    with pytest.raises(ClaimRefused):
        await registry.record_claim("acme", "batch-7", "dev-3", h.new_serial(), h.NOW, 2, audit=h.event("claim"))
    with pytest.raises(UnknownClaim):
        await registry.record_claim("acme", "nope", "dev-3", h.new_serial(), h.NOW, 2, audit=h.event("claim"))
    assert await registry.audit_head() == head
    claim = await registry.get_claim("acme", "batch-7")
    assert (claim.uses, claim.policy) == (2, policy)
    assert [u.device_id for u in await registry.claim_uses("acme", "batch-7")] == ["dev-1", "dev-2"]
    # Re-putting the policy keeps the count.
    await registry.put_claim("acme", "batch-7", {"max_uses": 3}, audit=h.event("policy"))
    assert (await registry.get_claim("acme", "batch-7")).uses == 2


async def test_claim_spent_atomically_with_issuance(registry, h):
    await registry.put_claim("acme", "c1", {"max_uses": 1}, audit=h.event("policy"))
    first = h.make_cert(kind="operational")
    await registry.commit_issuance(first, request=h.key(), audit=h.event(), claim=ClaimSpend(claim_id="c1", max_uses=1))
    # A replay of the same request returns the certificate instead of being refused by the claim.
    assert await registry.commit_issuance(h.make_cert(), request=h.key(), audit=h.event(),
                                          claim=ClaimSpend(claim_id="c1", max_uses=1)) == first
    second = h.make_cert(device_id="dev-2")
    before = await _state(registry)
    with pytest.raises(ClaimRefused):
        await registry.commit_issuance(second, request=h.key(identity="dev-2"), audit=h.event(),
                                       claim=ClaimSpend(claim_id="c1", max_uses=1))
    assert await registry.get_certificate("acme", second.serial) is None
    assert await registry.find_request("acme", "dev-2", b"R" * 16) is None
    assert await _state(registry) == before


async def test_claim_race_last_use_goes_to_exactly_one(registry_url, h):
    regs = [await open_registry(registry_url) for _ in range(2)]
    try:
        await regs[0].put_claim("acme", "race", {"max_uses": 3}, audit=h.event("policy"))
        for _ in range(2):
            await regs[0].record_claim("acme", "race", "dev-0", h.new_serial(), h.NOW, 3, audit=h.event("claim"))
        results = await asyncio.gather(
            *(regs[i % 2].record_claim("acme", "race", f"dev-{i}", h.new_serial(), h.NOW, 3, audit=h.event("claim"))
              for i in range(6)),
            return_exceptions=True,
        )
        wins = [r for r in results if not isinstance(r, BaseException)]
        assert len(wins) == 1 and wins[0].use_no == 3
        assert all(isinstance(r, ClaimRefused) for r in results if r is not wins[0])
        assert (await regs[1].get_claim("acme", "race")).uses == 3
        assert len(await regs[1].claim_uses("acme", "race")) == 3
        assert (await regs[0].verify_audit()).ok
    finally:
        for r in regs:
            await r.close()


# ---------------------------------------------------------------- migrations


async def _open_at(url: str, version: int):
    cls = SqliteRegistry if url.startswith("sqlite:") else PostgresRegistry
    return await cls.open(url, migrate_to=version)


async def test_old_version_database_is_migrated_forward(registry_url, h):
    old = await _open_at(registry_url, 1)
    assert old.schema_version == 1
    await old.close()
    serial = serial_hex(h.new_serial())
    await h.raw(registry_url,
                "INSERT INTO certificates (tenant, serial, device_id, profile, region, status, not_before, not_after, "
                "der, spki_sha256, issued_at) VALUES ('acme', $1, 'old-dev', 'identity', 'eu', 'active', 0, 99, $2, $3, 0)",
                serial, b"\x30\x00", bytes(32))
    reg = await open_registry(registry_url)
    try:
        assert reg.schema_version == schema.LATEST >= 2
        rec = await reg.get_certificate("acme", int(serial, 16))
        assert (rec.device_id, rec.kind, rec.replaced_serial) == ("old-dev", CertificateKind.OPERATIONAL, None)
        versions = await h.raw(registry_url, "SELECT version FROM schema_version ORDER BY version")
        assert [r[0] for r in versions] == list(range(1, schema.LATEST + 1))
        await reg.put_claim("acme", "c", {}, audit=h.event("policy"))  # a table added by step 2
    finally:
        await reg.close()
    reopened = await open_registry(registry_url)  # already latest: nothing to apply, still opens
    await reopened.close()


async def test_newer_version_database_is_refused(registry_url, h):
    reg = await open_registry(registry_url)
    await reg.close()
    await h.raw(registry_url, "INSERT INTO schema_version (version, description, applied_at) VALUES (99, 'future', 0)")
    with pytest.raises(SchemaTooNew, match=r"schema version 99.*knows up to"):
        await open_registry(registry_url)


def test_every_dialect_has_the_same_ordered_steps():
    for dialect in schema.DIALECTS:
        steps = schema.migrations(dialect)
        assert [m.version for m in steps] == list(range(1, schema.LATEST + 1))
    assert [m.version for m in schema.pending("sqlite", 1)] == list(range(2, schema.LATEST + 1))
    with pytest.raises(ValueError):
        schema.migrations("oracle")


async def test_unknown_url_scheme_is_refused():
    with pytest.raises(ValueError, match="scheme"):
        await open_registry("mysql://x/y")


async def test_closed_registry_refuses_calls(registry, h):
    await registry.close()
    with pytest.raises(Exception, match="closed"):
        await registry.get_certificate("acme", 1)


async def test_unopenable_databases_give_a_registry_error(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not an SQLite database file, not at all" * 100)
    with pytest.raises(RegistryError, match="junk.db"):
        await open_registry(f"sqlite://{junk}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        with pytest.raises(RegistryError, match="cannot connect") as err:
            await open_registry(f"postgresql://nobody:secret@127.0.0.1:{port}/x")
    assert "secret" not in str(err.value)


@pytest.mark.parametrize("module", ["base", "audit", "schema", "sqlite", "postgres"])
def test_all_lists_exactly_the_public_names(module):
    import importlib
    import inspect

    mod = importlib.import_module(f"broker_plugin.store.{module}")
    defined = {
        name for name, obj in vars(mod).items()
        if not name.startswith("_") and getattr(obj, "__module__", mod.__name__) == mod.__name__
        and (inspect.isclass(obj) or inspect.isfunction(obj))
    }
    assert defined <= set(mod.__all__), defined - set(mod.__all__)
    assert all(hasattr(mod, n) for n in mod.__all__)


async def test_a_caller_cancelled_mid_transaction_does_not_wedge_the_registry(registry, h):
    """A read or write whose caller is cancelled while a statement is on its way (a client gone, a
    shutdown) leaves no transaction open behind it: later reads and writes work. On SQLite a
    cancelled BEGIN used to leave the connection inside a transaction, and every later BEGIN then
    failed ("cannot start a transaction within a transaction")."""
    slot = await registry.allocate_status_index("acme", "eu", 64)
    rec = h.make_cert(slot=slot)
    await registry.commit_issuance(rec, request=h.key(), audit=h.event())
    for turns in range(8):  # cancel at each point of the calls' way through the database hops
        calls = [asyncio.create_task(registry.list_state("acme", "eu", slot[0])),
                 asyncio.create_task(registry.status_list("acme", "eu", slot[0])),
                 asyncio.create_task(registry.allocate_status_index("acme", "eu", 64))]
        for _ in range(turns):
            await asyncio.sleep(0)
        # The loop stands still (as under load) while the database runs what was handed over:
        # the hop is done but its caller not yet told when the cancellation comes.
        time.sleep(0.01)
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        state = await registry.list_state("acme", "eu", slot[0])
        assert state is not None and state.size == 64
    again = h.make_cert(slot=await registry.allocate_status_index("acme", "eu", 64), serial=h.new_serial())
    assert await registry.commit_issuance(again, request=h.key(b"S" * 16), audit=h.event()) == again
    assert await registry.get_certificate("acme", again.serial) == again
