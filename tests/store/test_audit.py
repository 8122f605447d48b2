"""Audit trail: the hash chain's definition, tamper detection in memory and in both real databases, export."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json

import pytest

from broker_plugin.store import audit
from broker_plugin.store.audit import GENESIS_HASH, AuditEntry, export_jsonl, seal, verify_chain

NOW = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)


def event(kind: str, subject: str = "dev-1", **details: object) -> audit.AuditEvent:
    return audit.AuditEvent(kind=kind, actor="ca-test", subject=subject, time=NOW, tenant="acme", details=details)


def _chain(n: int) -> list[AuditEntry]:
    out: list[AuditEntry] = []
    prev = GENESIS_HASH
    for seq in range(1, n + 1):
        e = seal(event("issue", subject=f"dev-{seq}", n=seq, blob=bytes([seq])), seq=seq, prev_hash=prev)
        out.append(e)
        prev = e.hash
    return out


# ---------------------------------------------------------------- the definition


def test_entry_hash_is_sha256_over_prev_hash_and_canonical_json():
    first = _chain(1)[0]
    assert first.prev_hash == bytes(32)
    body = {"seq": 1, "time": int(NOW.timestamp()), "tenant": "acme", "kind": "issue", "actor": "ca-test",
            "subject": "dev-1", "details": {"n": 1, "blob": "01"}}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    assert " " not in text
    assert first.hash == hashlib.sha256(bytes(32) + text.encode()).digest()
    assert first.details == {"blob": "01", "n": 1}  # stored as hashed: bytes became hex


def test_intact_chain_verifies():
    entries = _chain(6)
    result = verify_chain(entries, expected_head=(6, entries[-1].hash))
    assert result.ok and result.checked == 6 and result.bad_seq is None
    assert verify_chain([]).ok
    # A suffix verifies when anchored on the entry before it.
    assert verify_chain(entries[3:], anchor=(3, entries[2].hash)).ok
    assert not verify_chain(entries[3:]).ok


def _edit(entries, i, **changes):
    out = list(entries)
    out[i] = dataclasses.replace(out[i], **changes)
    return out


@pytest.mark.parametrize(
    ("tamper", "problem", "bad_seq"),
    [
        (lambda es: _edit(es, 2, details={"n": 999, "blob": "03"}), "edited", 3),
        (lambda es: _edit(es, 3, actor="mallory"), "edited", 4),
        (lambda es: _edit(es, 0, time=NOW.replace(year=2020)), "edited", 1),
        (lambda es: es[:2] + es[3:], "deleted", 3),
        (lambda es: es[1:], "deleted", 1),
        (lambda es: es[:1] + [es[2], es[1]] + es[3:], "reordered", 2),
        (lambda es: es[:1] + [es[4], es[2], es[3], es[1]] + es[5:], "reordered", 2),
    ],
    ids=["details", "actor", "time", "middle-deleted", "first-deleted", "adjacent-swap", "distant-swap"],
)
def test_tampering_is_detected_and_pinpointed(tamper, problem, bad_seq):
    result = verify_chain(tamper(_chain(6)))
    assert (result.ok, result.problem, result.bad_seq) == (False, problem, bad_seq), result.detail


def test_swapped_seq_values_are_reported_as_reordering():
    es = _chain(6)
    swapped = es[:1] + [dataclasses.replace(es[3], seq=2), es[2], dataclasses.replace(es[1], seq=4)] + es[4:]
    result = verify_chain(swapped)
    assert (result.problem, result.bad_seq) == ("reordered", 2)


def test_forged_insertion_is_detected():
    es = _chain(5)
    forged = seal(event("issue", subject="ghost"), seq=3, prev_hash=es[1].hash)  # a well-formed link
    renumbered = [dataclasses.replace(e, seq=e.seq + 1) for e in es[2:]]
    result = verify_chain(es[:2] + [forged] + renumbered)
    assert (result.problem, result.bad_seq) == ("inserted", 3)
    # A junk entry that does not even hash right, with the chain continuing around it.
    junk = dataclasses.replace(forged, hash=b"\x01" * 32)
    result = verify_chain(es[:2] + [junk] + es[2:])
    assert (result.problem, result.bad_seq) == ("inserted", 3)


def test_truncated_tail_is_caught_by_the_head():
    es = _chain(5)
    assert verify_chain(es[:3]).ok  # a prefix alone is a valid chain ...
    result = verify_chain(es[:3], expected_head=(5, es[-1].hash))  # ... but not the recorded one
    assert (result.problem, result.bad_seq) == ("truncated", 4)


def test_export_jsonl_round_trips_and_reverifies():
    es = _chain(4)
    buf = io.StringIO()
    assert export_jsonl(es, buf) == 4
    lines = buf.getvalue().splitlines()
    assert len(lines) == 4
    objs = [json.loads(line) for line in lines]
    assert objs[0]["prev_hash"] == "00" * 32 and bytes.fromhex(objs[0]["hash"]) == es[0].hash
    back = [AuditEntry.from_json(o) for o in objs]
    assert back == es and verify_chain(back).ok


def test_event_refuses_bad_values():
    with pytest.raises(ValueError):
        audit.AuditEvent(kind="", actor="a", subject="s", time=NOW)
    with pytest.raises(TypeError):
        seal(event("issue", x=object()), seq=1, prev_hash=GENESIS_HASH)


# ---------------------------------------------------------------- real databases


async def _fill(reg, h, n=5):
    for i in range(1, n + 1):
        await reg.audit_refusal(h.event("refuse", subject=f"dev-{i}", why="test", i=i))


async def test_every_mutation_appends_to_the_chain(registry, h):
    await registry.put_tenant("acme", {"x": 1}, audit=h.event("policy"))
    await registry.put_claim("acme", "c", {"max_uses": 1}, audit=h.event("policy"))
    rec = h.make_cert(slot=await registry.allocate_status_index("acme", "eu", 8))
    await registry.commit_issuance(rec, request=h.key(), audit=h.event("issue"))
    await registry.record_claim("acme", "c", "dev-1", rec.serial, h.NOW, 1, audit=h.event("claim"))
    await registry.revoke("acme", serial=rec.serial, reason=1, at=h.NOW, audit=h.event("revoke"))
    await registry.audit_refusal(h.event("refuse", code=12))
    entries = [e async for e in registry.audit_entries()]
    assert [e.kind for e in entries] == ["policy", "policy", "issue", "claim", "revoke", "refuse"]
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5, 6]
    assert await registry.audit_head() == (6, entries[-1].hash)
    assert verify_chain(entries).ok and (await registry.verify_audit()).ok
    assert [e.seq async for e in registry.audit_entries(since_seq=4)] == [5, 6]
    assert [e.seq async for e in registry.audit_entries(page=2)] == [1, 2, 3, 4, 5, 6]


async def test_concurrent_appends_keep_one_chain(registry_url, h):
    import asyncio

    from broker_plugin.store.base import open_registry

    regs = [await open_registry(registry_url) for _ in range(2)]
    try:
        await asyncio.gather(*(regs[i % 2].audit_refusal(h.event("refuse", i=i)) for i in range(20)))
        result = await regs[0].verify_audit()
        assert result.ok and result.checked == 20
    finally:
        for r in regs:
            await r.close()


async def _swap_seq(raw_sql, a, b):
    await raw_sql("UPDATE audit_log SET seq = -1 WHERE seq = $1", a)
    await raw_sql("UPDATE audit_log SET seq = $1 WHERE seq = $2", a, b)
    await raw_sql("UPDATE audit_log SET seq = $1 WHERE seq = -1", b)


async def _insert_forged(raw_sql, h):
    prev = (await raw_sql("SELECT hash FROM audit_log WHERE seq = 2"))[0][0]
    forged = seal(h.event("issue", subject="ghost"), seq=3, prev_hash=bytes(prev))
    await raw_sql("UPDATE audit_log SET seq = seq + 1000 WHERE seq >= 3")
    await raw_sql("UPDATE audit_log SET seq = seq - 999 WHERE seq >= 1003")
    await raw_sql(
        "INSERT INTO audit_log (seq, time, tenant, kind, actor, subject, details, prev_hash, hash) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        3, int(forged.time.timestamp()), forged.tenant, forged.kind, forged.actor, forged.subject,
        audit.canonical_json(forged.details), forged.prev_hash, forged.hash,
    )


TAMPERS = {
    "edit-details": (lambda raw_sql, h: raw_sql("UPDATE audit_log SET details = $1 WHERE seq = 3",
                                                 '{"i":3,"why":"innocent"}'), "edited", 3),
    "delete-middle": (lambda raw_sql, h: raw_sql("DELETE FROM audit_log WHERE seq = 3"), "deleted", 3),
    "swap-seq": (lambda raw_sql, h: _swap_seq(raw_sql, 2, 4), "reordered", 2),
    "insert-forged": (_insert_forged, "inserted", 3),
    "delete-last": (lambda raw_sql, h: raw_sql("DELETE FROM audit_log WHERE seq = 5"), "truncated", 5),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
async def test_tampering_in_the_database_is_detected(registry, raw_sql, h, tamper):
    await _fill(registry, h)
    assert (await registry.verify_audit()).ok
    action, problem, bad_seq = TAMPERS[tamper]
    await action(raw_sql, h)
    result = await registry.verify_audit()
    assert (result.ok, result.problem, result.bad_seq) == (False, problem, bad_seq), result.detail
    # The exported file carries the same evidence for someone without database access.
    buf = io.StringIO()
    export_jsonl([e async for e in registry.audit_entries()], buf)
    exported = [AuditEntry.from_json(json.loads(line)) for line in buf.getvalue().splitlines()]
    assert verify_chain(exported, expected_head=await registry.audit_head()).problem == problem


# ---------------------------------------------------------------- the sealing fast path

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_FLAT_VALUES = (st.text() | st.integers(min_value=-(2**80), max_value=2**80) | st.booleans() | st.none()
                | st.binary(max_size=40)
                | st.datetimes(min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(2200, 1, 1),
                               timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=-7, minutes=-30))])))


@settings(max_examples=300, deadline=None)
@given(details=st.dictionaries(st.text(), _FLAT_VALUES, max_size=8), actor=st.text(), subject=st.text(),
       tenant=st.none() | st.text(min_size=1),
       time=st.datetimes(min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(2200, 1, 1), timezones=st.just(dt.UTC)))
def test_sealing_simple_details_matches_the_definition(details, actor, subject, tenant, time) -> None:  # type: ignore[no-untyped-def]
    # The registries store the text seal_with_text returns and the entry's hash: both must be what
    # the chain's definition (canonical JSON, entry_hash) says, whichever way they were put together.
    ev = audit.AuditEvent(kind="issue", actor=actor, subject=subject, time=time, tenant=tenant, details=details)
    entry, text = audit.seal_with_text(ev, seq=7, prev_hash=bytes(range(32)))
    assert text == audit.canonical_json(details)
    assert entry.details == json.loads(text)
    assert entry.time == dt.datetime.fromtimestamp(int(time.timestamp()), dt.UTC) and entry.time.microsecond == 0
    assert entry.time.tzinfo is dt.UTC
    assert entry.hash == audit.entry_hash(entry)
    recomputed = hashlib.sha256(bytes(range(32)) + json.dumps(
        {"seq": 7, "time": int(time.timestamp()), "tenant": tenant, "kind": "issue", "actor": actor,
         "subject": subject, "details": json.loads(text)},
        sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).digest()
    assert entry.hash == recomputed


@pytest.mark.parametrize("details", [
    {1: "a", 10: "b", 2: "c"},             # non-string keys
    {"f": 1.5, "s": "x"},                  # a float
    {"nested": {"b": b"\x01", "a": [1, dt.datetime(2026, 1, 1, tzinfo=dt.UTC)]}},
    {"t": (1, 2), "set": frozenset({3, 1})},
])
def test_sealing_other_details_takes_the_encoder_and_matches_the_definition(details) -> None:  # type: ignore[no-untyped-def]
    ev = audit.AuditEvent(kind="issue", actor="a", subject="s", time=NOW, tenant="acme", details=details)
    entry, text = audit.seal_with_text(ev, seq=3, prev_hash=GENESIS_HASH)
    assert entry.details == json.loads(audit.canonical_json(details))
    assert text == audit.canonical_json(entry.details)
    assert entry.hash == audit.entry_hash(entry)


def test_sealing_refuses_what_the_encoder_refuses() -> None:
    naive = audit.AuditEvent(kind="issue", actor="a", subject="s", time=NOW, details={"when": dt.datetime(2026, 1, 1)})
    with pytest.raises(ValueError, match="aware"):
        audit.seal_with_text(naive, seq=1, prev_hash=GENESIS_HASH)
    odd = audit.AuditEvent(kind="issue", actor="a", subject="s", time=NOW, details={"x": object()})
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        audit.seal_with_text(odd, seq=1, prev_hash=GENESIS_HASH)


def test_sealing_an_event_with_microseconds_stores_whole_seconds() -> None:
    ev = audit.AuditEvent(kind="issue", actor="a", subject="s", time=NOW.replace(microsecond=999_999), details={})
    entry, _ = audit.seal_with_text(ev, seq=1, prev_hash=GENESIS_HASH)
    assert entry.time == NOW and entry.hash == audit.entry_hash(entry)
