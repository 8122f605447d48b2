"""FeedPublisher against a real SQLite registry, its publish callable recording messages:
coalescing window and reason rule, per-list chains, snapshot at start and after batches (and
not sooner than the cost bound), resynchronising after a missed delta, signing off the event
loop with every supported key type, and the registry methods it relies on."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa

from broker_plugin.feeds_publisher import FeedPublisher, FeedSigner, list_snapshot_topic
from protocol import feedsig
from protocol.codes import RevocationReason
from protocol.messages import RevocationDelta, RevocationSnapshot
from protocol.statuslist import StatusList
from protocol.topics import delta_topic, snapshot_topic

from .conftest import CAPACITY, Ca, now


class Recorder:
    """The publish callable: keeps (topic, opened message, retain)."""

    def __init__(self, keys: dict[bytes, Any]) -> None:
        self.keys = keys
        self.sent: list[tuple[str, RevocationSnapshot | RevocationDelta, bool]] = []

    async def __call__(self, topic: str, payload: bytes, retain: bool) -> None:
        self.sent.append((topic, feedsig.open_feed(payload, self.keys), retain))

    def deltas(self) -> list[RevocationDelta]:
        return [m for _, m, _ in self.sent if isinstance(m, RevocationDelta)]

    def snapshots(self, topic: str) -> list[RevocationSnapshot]:
        return [m for t, m, _ in self.sent if t == topic and isinstance(m, RevocationSnapshot)]


def publisher(ca: Ca, **kw: Any) -> tuple[FeedPublisher, Recorder]:
    keys: dict[str, Any] = {t: a.key for t, a in ca.service._authorities.items()}  # noqa: SLF001
    rec = Recorder({feedsig.key_id(k.public_key()): k.public_key() for k in keys.values()})
    kw.setdefault("snapshot_min_interval", 0.0)
    return FeedPublisher(registry=ca.registry, keys=keys, publish=rec, clock=now, **kw), rec


async def eventually(pred: Any, timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


async def revoke(ca: Ca, serial: int, reason: RevocationReason = RevocationReason.KEY_COMPROMISE) -> Any:
    return (await ca.service.revoke(tenant="acme", reason=reason, actor="t", serial=serial)).deltas


async def test_registry_enumerates_feed_lists_with_their_own_sequences(ca: Ca) -> None:
    devs = [await ca.mint("acme", f"d{i}") for i in range(CAPACITY + 1)]
    await ca.mint("acme", "u0", region="us")
    assert await ca.registry.feed_lists("globex") == []
    await revoke(ca, devs[CAPACITY].serial)  # list 2 of eu: feed 0 -> 1
    lists = await ca.registry.feed_lists("acme")
    assert [(fl.region, fl.list_id, fl.capacity, fl.sequence, fl.feed_sequence) for fl in lists] == [
        ("eu", 1, CAPACITY, 0, 1), ("eu", 2, CAPACITY, 1, 1), ("us", 1, CAPACITY, 0, 0)]
    assert [fl.list_id for fl in await ca.registry.feed_lists("acme", "us")] == [1]
    one, two = await ca.registry.list_state("acme", "eu", 1), await ca.registry.list_state("acme", "eu", 2)
    assert one is not None and two is not None
    assert (one.sequence, two.sequence) == (0, 1)  # list 1 did not change: it keeps its own sequence
    assert StatusList(list_id=2, size=two.size, bits=two.bits).is_revoked(0)
    assert await ca.registry.list_state("acme", "eu", 3) is None


async def test_start_snapshots_every_list_retained(ca: Ca) -> None:
    for i in range(CAPACITY + 1):
        await ca.mint("acme", f"d{i}")
    await ca.mint("globex", "g0", region="us")
    pub, rec = publisher(ca)
    await pub.start()
    await pub.close()
    assert {(t, retain) for t, _, retain in rec.sent} == {
        (list_snapshot_topic("acme", "eu", 1), True), (list_snapshot_topic("acme", "eu", 2), True),
        (snapshot_topic("acme", "eu"), True), (list_snapshot_topic("globex", "us", 1), True),
        (snapshot_topic("globex", "us"), True)}
    assert rec.snapshots(snapshot_topic("acme", "eu"))[0].list_id == 2  # the plain topic: the newest list


async def test_burst_within_the_window_is_one_delta_per_list(ca: Ca) -> None:
    devs = [await ca.mint("acme", f"d{i}") for i in range(CAPACITY + 2)]
    pub, rec = publisher(ca, window=0.05)
    await pub.start()
    pending = []
    for dev, reason in zip(devs[:3], (RevocationReason.KEY_COMPROMISE, RevocationReason.KEY_COMPROMISE,
                                      RevocationReason.SUPERSEDED)):
        pending.extend(await revoke(ca, dev.serial, reason))
    pending.extend(await revoke(ca, devs[CAPACITY].serial))
    for d in pending:  # handed in one at a time, as the plugin does
        pub.on_deltas([d])
    assert rec.deltas() == []  # published by a task, never inside on_deltas
    await pub.flush()
    got = rec.deltas()
    assert [(d.list_id, d.from_sequence, d.to_sequence, d.indices, d.reason) for d in got] == [
        (1, 0, 3, tuple(devs_index(devs[:3])), RevocationReason.UNSPECIFIED),  # mixed reasons
        (2, 0, 4, (0,), RevocationReason.KEY_COMPROMISE)]
    assert got[0].time == max(d.at for d in pending[:3]).replace(microsecond=0)
    # Refreshed after the batch (once the cost bound allows), consistent with the delta's to.
    await eventually(lambda: rec.snapshots(list_snapshot_topic("acme", "eu", 1))[-1].sequence == 3)
    # Leading edge then window: right after a publish, the next deltas wait out the window together.
    start = asyncio.get_running_loop().time()
    pub.on_deltas(await revoke(ca, devs[3].serial))
    pub.on_deltas(await revoke(ca, devs[CAPACITY + 1].serial))
    await pub.flush()
    assert asyncio.get_running_loop().time() - start < 0.5
    assert [(d.list_id, d.from_sequence, d.to_sequence) for d in rec.deltas()[2:]] == [(1, 3, 5), (2, 4, 6)]
    await pub.close()


async def test_a_lone_revocation_is_not_held_for_the_window(ca: Ca) -> None:
    dev = await ca.mint("acme", "d0")
    pub, rec = publisher(ca, window=0.05)
    await pub.start()
    await asyncio.sleep(0.06)
    loop = asyncio.get_running_loop()
    pub.on_deltas(await revoke(ca, dev.serial))
    start = loop.time()
    await pub.flush()
    assert len(rec.deltas()) == 1 and loop.time() - start < 0.04
    await pub.close()


def devs_index(devs: list[Any]) -> list[int]:
    from protocol import extensions
    from cryptography import x509

    out = []
    for d in devs:
        ext = d.certificate.extensions.get_extension_for_oid(x509.ObjectIdentifier(extensions.STATUS_POSITION_OID))
        out.append(extensions.decode_status_position(ext.value.value)[1])
    return sorted(out)


async def test_snapshot_refresh_waits_for_the_cost_bound(ca: Ca) -> None:
    devs = [await ca.mint("acme", f"d{i}") for i in range(2)]
    pub, rec = publisher(ca, window=0.0, snapshot_min_interval=0.4)
    await pub.start()
    topic = list_snapshot_topic("acme", "eu", 1)
    pub.on_deltas(await revoke(ca, devs[0].serial))
    await pub.flush()
    assert len(rec.deltas()) == 1
    await asyncio.sleep(0.15)
    assert len(rec.snapshots(topic)) == 1  # only the start one: too soon after it
    await asyncio.sleep(0.5)
    assert [s.sequence for s in rec.snapshots(topic)] == [0, 1]
    await pub.close()


async def test_a_missed_delta_resynchronises_from_the_registry(ca: Ca) -> None:
    devs = [await ca.mint("acme", f"d{i}") for i in range(3)]
    pub, rec = publisher(ca, window=0.0)
    await pub.start()
    await revoke(ca, devs[0].serial)  # committed, but never handed to the publisher
    pub.on_deltas(await revoke(ca, devs[1].serial))
    await pub.flush()
    assert pub.stats["resyncs"] == 1 and rec.deltas() == []  # no delta with a hole in it
    snap = rec.snapshots(list_snapshot_topic("acme", "eu", 1))[-1]
    held = StatusList.from_snapshot(snap)
    assert snap.sequence == 2 and held.revoked_count() == 2
    pub.on_deltas(await revoke(ca, devs[2].serial))
    await pub.flush()
    [delta] = rec.deltas()
    assert held.apply_delta(delta) and held.revoked_count() == 3
    await pub.close()


class ThreadKey:
    """A key object like an HSM's: sign() and public_key(); records the signing thread."""

    def __init__(self, key: Any) -> None:
        self.key = key
        self.threads: set[int] = set()

    def public_key(self) -> Any:
        return self.key.public_key()

    def sign(self, data: bytes, *args: Any) -> bytes:
        self.threads.add(threading.get_ident())
        return self.key.sign(data, *args)  # type: ignore[no-any-return]


@pytest.mark.parametrize("make", [
    lambda: ec.generate_private_key(ec.SECP256R1()), lambda: ec.generate_private_key(ec.SECP384R1()),
    ed25519.Ed25519PrivateKey.generate, mldsa.MLDSA44PrivateKey.generate,
], ids=["p256", "p384", "ed25519", "ml-dsa-44"])
async def test_signing_is_off_the_event_loop_for_every_key_type(ca: Ca, make: Any) -> None:
    await ca.mint("acme", "d0")
    key = ThreadKey(make())
    rec = Recorder({feedsig.key_id(key.public_key()): key.public_key()})
    pub = FeedPublisher(registry=ca.registry, keys={"acme": key}, publish=rec, clock=now)
    await pub.start()
    await pub.close()
    assert rec.snapshots(list_snapshot_topic("acme", "eu", 1))  # opened with the public key
    assert key.threads and threading.get_ident() not in key.threads
    with pytest.raises(feedsig.FeedSignatureError):
        other = FeedSigner(key=make()).sign(b"\xa0")
        feedsig.open_feed(other, rec.keys)


def test_bad_settings_are_refused(ca: Ca) -> None:
    for bad in ({"window": 0.2}, {"window": -1}, {"snapshot_period": 0}, {"discover_period": 0}):
        with pytest.raises(ValueError):
            publisher(ca, **bad)


async def test_new_lists_are_discovered_and_snapshotted(ca: Ca) -> None:
    await ca.mint("acme", "d0")
    pub, rec = publisher(ca)
    await pub.start()
    assert await pub.discover() == 0
    await ca.mint("acme", "u0", region="us")
    assert await pub.discover() == 1
    assert rec.snapshots(list_snapshot_topic("acme", "us", 1))
    await pub.close()


def test_delta_topic_is_the_regions() -> None:
    assert list_snapshot_topic("acme", "eu", 7) == snapshot_topic("acme", "eu") + "/7"
    assert delta_topic("acme", "eu").endswith("/rev/eu/delta")


async def test_an_oversized_delta_is_replaced_by_the_snapshot(ca: Ca, monkeypatch: pytest.MonkeyPatch) -> None:
    """More merged indices than a delta may carry (limit patched down to 1): the list's signed
    snapshot at the reached sequence goes out instead, and a subscriber applying it is current."""
    from broker_plugin import feeds_publisher

    monkeypatch.setattr(feeds_publisher, "MAX_INDICES", 1)
    devs = [await ca.mint("acme", f"d{i}") for i in range(3)]
    pub, rec = publisher(ca, window=0.05)
    await pub.start()
    topic = list_snapshot_topic("acme", "eu", 1)
    held = StatusList.from_snapshot(rec.snapshots(topic)[0])
    pending = [d for dev in devs[:2] for d in await revoke(ca, dev.serial)]
    pub.on_deltas(pending)  # coalesced: 2 indices > 1
    await pub.flush()
    assert rec.deltas() == [] and pub.stats["oversized"] == 1
    snap = rec.snapshots(topic)[-1]
    assert snap.sequence == 2 and held.apply_snapshot(snap) and held.revoked_count() == 2
    pub.on_deltas(await revoke(ca, devs[2].serial))  # one index: a delta again, chained on
    await pub.flush()
    [delta] = rec.deltas()
    assert held.apply_delta(delta) and held.revoked_count() == 3
    await pub.close()
