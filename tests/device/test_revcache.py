"""RevocationCache: snapshot + deltas, gaps and resync, O(1) answers from real certificates, persistence, verifier."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from device_fakes import FakeCA

from device_client.revcache import FeedRejected, RevocationCache, RevocationStatus, StatusUnknown, trust_broker_acl
from protocol import codec
from protocol.codes import Profile, RevocationReason
from protocol.messages import RevocationDelta, RevocationSnapshot
from protocol.statuslist import StatusList

SNAP = "certmq/v1/acme/rev/eu-west/snapshot"
DELTA = "certmq/v1/acme/rev/eu-west/delta"
T = datetime(2026, 3, 1, tzinfo=timezone.utc)


def snap(sl: StatusList) -> bytes:
    f = sl.to_snapshot_fields()
    return codec.encode(RevocationSnapshot(list_id=f.list_id, sequence=f.sequence, size=f.size, bits=f.bits, time=T))


def delta(list_id: int, frm: int, to: int, idx: tuple[int, ...]) -> bytes:
    return codec.encode(RevocationDelta(list_id=list_id, from_sequence=frm, to_sequence=to, indices=idx,
                                        reason=RevocationReason.KEY_COMPROMISE, time=T))


def cache(tmp_path: Path, **kw: object) -> RevocationCache:
    kw.setdefault("verifier", trust_broker_acl)
    return RevocationCache(tenant="acme", region="eu-west", path=tmp_path / "rev.json", **kw)  # type: ignore[arg-type]


def certs(fake_ca: FakeCA, n: int) -> list:  # type: ignore[type-arg]
    return [fake_ca.issue(f"dev-{i}", Profile.IDENTITY, ec.generate_private_key(ec.SECP256R1()).public_key()) for i in range(n)]


def test_snapshot_then_deltas_answer_from_certificates(tmp_path: Path, fake_ca: FakeCA) -> None:
    cs = certs(fake_ca, 4)  # status positions (1, 1..4)
    ca_list = StatusList(list_id=1, size=64)
    ca_list.revoke([2])
    c = cache(tmp_path)
    assert c.status(cs[0]) is RevocationStatus.UNKNOWN
    assert c.handle(SNAP, snap(ca_list))
    assert [c.status(x) for x in cs] == [RevocationStatus.GOOD, RevocationStatus.REVOKED, RevocationStatus.GOOD, RevocationStatus.GOOD]
    d = ca_list.revoke([4])
    assert d is not None
    assert c.handle(DELTA, delta(1, d.from_sequence, d.to_sequence, d.indices))
    assert c.is_revoked(cs[3]) and not c.is_revoked(cs[0])
    assert not c.handle(DELTA, delta(1, d.from_sequence, d.to_sequence, d.indices))  # already applied


def test_gap_marks_stale_requests_snapshot_and_resyncs(tmp_path: Path, fake_ca: FakeCA) -> None:
    cs = certs(fake_ca, 6)
    asked: list[int] = []
    ca_list = StatusList(list_id=1, size=64)
    c = cache(tmp_path, request_snapshot=asked.append)
    c.handle(SNAP, snap(ca_list))
    ca_list.revoke([1])  # seq 1: this delta is lost on the way
    d2 = ca_list.revoke([5])  # seq 2
    assert d2 is not None
    assert not c.handle(DELTA, delta(1, d2.from_sequence, d2.to_sequence, d2.indices))
    assert asked == [1] and c.status(cs[4]) is RevocationStatus.STALE and c.status(cs[0]) is RevocationStatus.STALE
    with pytest.raises(StatusUnknown):
        c.is_revoked(cs[0])
    assert c.is_revoked(cs[0], strict=False) is False
    # an old snapshot does not end the gap; the fresh one does
    old = StatusList(list_id=1, size=64)
    c.handle(SNAP, snap(old))
    assert c.status(cs[0]) is RevocationStatus.STALE
    c.handle(SNAP, snap(ca_list))
    assert c.status(cs[0]) is RevocationStatus.REVOKED and c.status(cs[4]) is RevocationStatus.REVOKED
    assert c.status(cs[2]) is RevocationStatus.GOOD


def test_state_persists_across_restarts(tmp_path: Path, fake_ca: FakeCA) -> None:
    cs = certs(fake_ca, 3)
    ca_list = StatusList(list_id=1, size=1 << 16)
    ca_list.revoke([3])
    c = cache(tmp_path)
    c.handle(SNAP, snap(ca_list))
    c2 = cache(tmp_path)
    assert c2.is_revoked(cs[2]) and not c2.is_revoked(cs[0])
    d = ca_list.revoke([1])
    assert d is not None and c2.handle(DELTA, delta(1, d.from_sequence, d.to_sequence, d.indices))
    assert cache(tmp_path).lists[1].sequence == 2


def test_verifier_rejection_changes_nothing(tmp_path: Path, fake_ca: FakeCA) -> None:
    seen: list[tuple[str, bytes]] = []

    def refuse(topic: str, payload: bytes) -> bool:
        seen.append((topic, payload))
        return False

    c = cache(tmp_path, verifier=refuse)
    payload = snap(StatusList(list_id=1, size=64))
    with pytest.raises(FeedRejected):
        c.handle(SNAP, payload)
    assert seen == [(SNAP, payload)] and c.lists == {} and not (tmp_path / "rev.json").exists()


def test_no_verifier_is_refused_and_bad_input_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        RevocationCache(tenant="acme", region="eu-west", path=tmp_path / "r.json", verifier=None)  # type: ignore[arg-type]
    c = cache(tmp_path)
    with pytest.raises(FeedRejected):
        c.handle("certmq/v1/other/rev/eu-west/snapshot", snap(StatusList(list_id=1, size=64)))
    with pytest.raises(FeedRejected):
        c.handle(SNAP, b"\xa1\x00" + os.urandom(4))
    with pytest.raises(FeedRejected):
        c.handle(DELTA, snap(StatusList(list_id=1, size=64)))  # a snapshot on the delta topic
    assert c.lists == {}
