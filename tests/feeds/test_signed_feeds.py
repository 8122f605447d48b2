"""Signed revocation feeds over the real broker: real TLS subscribers feed RevocationCaches that
check the tenant CA's signature. Per-list sequences across a roll-over, coalesced bursts,
forged and unsigned messages refused, gap recovery from the retained snapshot, broker restart,
kick + delta at a validator."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from broker_plugin.ca import datadir as dd
from broker_plugin.feeds_publisher import FeedSigner, list_snapshot_topic
from broker_plugin.plugin import CertmqPlugin
from device_client.revcache import FeedRejected, RevocationCache, RevocationStatus
from protocol import codec, feedsig
from protocol.codes import RevocationReason
from protocol.errors import DecodeError
from protocol.messages import RevocationDelta, RevocationSnapshot
from protocol.topics import delta_topic, snapshot_topic

from .conftest import PASSPHRASE, Ca, Creds, Feed, cache, client, now

FEED = "certmq/v1/acme/rev/eu/#"
DELTA = delta_topic("acme", "eu")


def deltas(got: list[tuple[str, bytes]]) -> list[RevocationDelta]:
    """The deltas among raw feed messages (their signatures are checked by the caches)."""
    out = []
    for topic, payload in got:
        if topic == DELTA:
            inner = codec.decode(feedsig.decode_signed(payload).payload)
            assert isinstance(inner, RevocationDelta)
            out.append(inner)
    return out


def feed_all(rc: RevocationCache, got: list[tuple[str, bytes]]) -> None:
    for topic, payload in got:
        rc.handle(topic, payload)


async def revoke(plugin: CertmqPlugin, creds: Creds, reason: RevocationReason = RevocationReason.KEY_COMPROMISE) -> None:
    await plugin.revoke(tenant="acme", reason=reason, actor="feeds-tests", serial=creds.serial)


async def test_signed_per_list_deltas_across_a_roll_over(make_broker: Any, ca: Ca, tmp_path: Path) -> None:
    """Ten eu certificates fill list 1 (8 slots) and roll over to list 2. Revocations alternate
    between the lists; each list's deltas chain on their own (from = the list's previous to) so a
    validator applies all of them with no gap, and every message is a COSE_Sign1 (never bare)."""
    devs = [await ca.mint("acme", f"sensor-{i}") for i in range(10)]
    assert [d.region for d in devs] == ["eu"] * 10
    broker = await make_broker()
    plugin = CertmqPlugin.of(broker)
    rc = cache(tmp_path, ca)
    async with client(broker, devs[8]) as c:
        feed = Feed(c)
        await c.subscribe(FEED, qos=1)
        topics = {snapshot_topic("acme", "eu"), list_snapshot_topic("acme", "eu", 1), list_snapshot_topic("acme", "eu", 2)}
        await feed.wait_for(lambda got: topics <= {t for t, _ in got})
        for topic, payload in feed.got:
            with pytest.raises(DecodeError):
                codec.decode(payload)  # a signed feed message is not a bare certmq message
        for victim in (devs[1], devs[9], devs[2]):  # list 1, list 2, list 1
            await revoke(plugin, victim)
            await asyncio.sleep(0.1)  # beyond the coalescing window: one delta each
        await feed.wait_for(lambda got: len(deltas(got)) == 3)
        feed_all(rc, feed.got)
        await feed.close()
    got = [(d.list_id, d.from_sequence, d.to_sequence) for d in deltas(feed.got)]
    assert got == [(1, 0, 1), (2, 0, 2), (1, 1, 3)]
    assert rc.stale == {}
    assert {lid: sl.sequence for lid, sl in rc.lists.items()} == {1: 3, 2: 2}
    status = [rc.status(d.certificate) for d in devs]
    revoked = {1, 2, 9}
    assert status == [RevocationStatus.REVOKED if i in revoked else RevocationStatus.GOOD for i in range(10)]


async def test_bursts_are_coalesced_with_the_reason_rule(make_broker: Any, ca: Ca, tmp_path: Path) -> None:
    """Concurrent revocations become fewer deltas than revocations (one per list per <= 50 ms
    window); same reasons keep theirs, mixed reasons say unspecified. The retained snapshot is
    refreshed afterwards, so a late validator learns everything from it alone."""
    devs = [await ca.mint("acme", f"sensor-{i}") for i in range(11)]  # list 1: 0-7, list 2: 8-10
    broker = await make_broker()
    plugin = CertmqPlugin.of(broker)
    async with client(broker, devs[10]) as c:
        feed = Feed(c)
        await c.subscribe(DELTA, qos=1)
        await asyncio.gather(*(revoke(plugin, d) for d in devs[:3]))
        await feed.wait_for(lambda got: sum(len(d.indices) for d in deltas(got)) == 3)
        first = deltas(feed.got)
        await asyncio.gather(revoke(plugin, devs[8], RevocationReason.KEY_COMPROMISE),
                             revoke(plugin, devs[9], RevocationReason.SUPERSEDED))
        await feed.wait_for(lambda got: sum(len(d.indices) for d in deltas(got)) == 5)
        await feed.close()
    assert len(first) < 3
    assert all(d.reason is RevocationReason.KEY_COMPROMISE for d in first)
    second = deltas(feed.got)[len(first):]
    assert sum(len(d.indices) for d in second) == 2
    if len(second) == 1:  # both in one window: the mixed reasons merge to unspecified
        assert second[0].reason is RevocationReason.UNSPECIFIED and second[0].indices == (0, 1)
    assert plugin.feeds is not None
    await plugin.feeds.flush()
    await asyncio.sleep(0.3)  # the snapshot refresh after the batch (min interval 0.05 s in tests)
    late = cache(tmp_path, ca, name="late.json")
    async with client(broker, devs[10]) as c:
        feed = Feed(c)
        await c.subscribe("certmq/v1/acme/rev/eu/snapshot/+", qos=1)
        await feed.wait_for(lambda got: len(got) >= 2)
        feed_all(late, feed.got)
        await feed.close()
    revoked = {0, 1, 2, 8, 9}
    assert [late.status(d.certificate) for d in devs[:10]] == [
        RevocationStatus.REVOKED if i in revoked else RevocationStatus.GOOD for i in range(10)]


async def test_forged_and_unsigned_feed_messages_are_refused(make_broker: Any, ca: Ca, tmp_path: Path) -> None:
    """An in-process broadcast (past the ACL) of an unsigned delta, a delta signed by another
    tenant's CA, one signed by a random key, and a forged all-revoked snapshot: the validator
    receives each and refuses each; its lists and its state file do not change."""
    devs = [await ca.mint("acme", f"sensor-{i}") for i in range(2)]
    broker = await make_broker()
    plugin = CertmqPlugin.of(broker)
    rc = cache(tmp_path, ca)
    globex_key = dd.load_authorities(ca.datadir, passphrase=PASSPHRASE)["globex"].key
    forged = RevocationDelta(list_id=1, from_sequence=0, to_sequence=1, indices=(0, 1),
                             reason=RevocationReason.KEY_COMPROMISE, time=now().replace(microsecond=0))
    bad_snap = RevocationSnapshot(list_id=1, sequence=9, size=8, bits=b"\x40\xff", time=now().replace(microsecond=0))
    attacks = [
        (DELTA, codec.encode(forged)),
        (DELTA, FeedSigner(key=globex_key).sign(codec.encode(forged))),
        (DELTA, FeedSigner(key=ec.generate_private_key(ec.SECP256R1())).sign(codec.encode(forged))),
        (list_snapshot_topic("acme", "eu", 1), FeedSigner(key=globex_key).sign(codec.encode(bad_snap))),
    ]
    async with client(broker, devs[1]) as c:
        feed = Feed(c)
        await c.subscribe(FEED, qos=1)
        retained = {snapshot_topic("acme", "eu"), list_snapshot_topic("acme", "eu", 1)}
        await feed.wait_for(lambda got: retained <= {t for t, _ in got})
        feed_all(rc, feed.got)
        held, state = rc.lists[1].bits, rc.path.read_bytes()
        before = len(feed.got)
        for topic, payload in attacks:
            await plugin.context.broadcast_message(topic, payload, qos=1)
        await feed.wait_for(lambda got: len(got) >= before + len(attacks))
        await feed.close()
    received = feed.got[before:]
    assert received == attacks  # the broker delivered them: the validator is the last line
    for topic, payload in received:
        with pytest.raises(FeedRejected):
            rc.handle(topic, payload)
    assert rc.lists[1].bits == held and rc.lists[1].sequence == 0 and rc.path.read_bytes() == state
    assert [rc.status(d.certificate) for d in devs] == [RevocationStatus.GOOD] * 2
    # A SnapshotRequest reply arrives decoded and unsigned: a signature-checking cache refuses it.
    with pytest.raises(FeedRejected):
        rc.handle_snapshot_reply(bad_snap)
    assert rc.lists[1].bits == held


async def test_gap_recovers_from_the_retained_snapshot(make_broker: Any, ca: Ca, tmp_path: Path) -> None:
    """A validator that misses a delta sees the gap on the next one, marks the list stale, asks
    for a snapshot; re-subscribing to the list's retained snapshot brings it back, current."""
    devs = [await ca.mint("acme", f"sensor-{i}") for i in range(3)]
    broker = await make_broker()
    plugin = CertmqPlugin.of(broker)
    asked: list[int] = []
    rc = cache(tmp_path, ca, requested=asked)
    async with client(broker, devs[2]) as c:
        feed = Feed(c)
        await c.subscribe(FEED, qos=1)
        await feed.wait_for(lambda got: len(got) >= 2)
        feed_all(rc, feed.got)
        n = len(feed.got)
        await revoke(plugin, devs[0])
        await feed.wait_for(lambda got: len(deltas(got[n:])) == 1)
        m = len(feed.got)  # the delta of devs[0] (and anything before m) is "lost"
        await asyncio.sleep(0.1)
        await revoke(plugin, devs[1])
        await feed.wait_for(lambda got: len(deltas(got[m:])) == 1)
        for topic, payload in feed.got[m:]:
            if topic == DELTA:
                assert rc.handle(topic, payload) is False
        assert asked == [1] and 1 in rc.stale
        assert rc.status(devs[1].certificate) is RevocationStatus.STALE
        await feed.close()
    assert plugin.feeds is not None
    await plugin.feeds.flush()
    await asyncio.sleep(0.3)
    async with client(broker, devs[2]) as c:  # the request_snapshot answer: the retained copy
        feed = Feed(c)
        await c.subscribe(rc.list_snapshot_topic(asked[0]), qos=1)
        await feed.wait_for(lambda got: len(got) >= 1)
        feed_all(rc, feed.got)
        await feed.close()
    assert rc.stale == {}
    assert [rc.status(d.certificate) for d in devs[:2]] == [RevocationStatus.REVOKED] * 2


async def test_validator_survives_a_broker_restart(make_broker: Any, ca: Ca, tmp_path: Path) -> None:
    """The cache persists; while the broker is down a revocation is committed by another process;
    the restarted broker publishes fresh signed snapshots at start, and the next delta chains on."""
    devs = [await ca.mint("acme", f"sensor-{i}") for i in range(3)]
    broker = await make_broker()
    rc = cache(tmp_path, ca)
    async with client(broker, devs[2]) as c:
        feed = Feed(c)
        await c.subscribe(FEED, qos=1)
        await feed.wait_for(lambda got: len(got) >= 2)
        feed_all(rc, feed.got)
        await feed.close()
    await broker.shutdown()
    await ca.service.revoke(tenant="acme", reason=RevocationReason.KEY_COMPROMISE, actor="ops", serial=devs[0].serial)
    broker = await make_broker()
    plugin = CertmqPlugin.of(broker)
    rc = RevocationCache(tenant="acme", region="eu", path=rc.path, verifier=rc.verifier)  # a restarted validator
    assert rc.status(devs[0].certificate) is RevocationStatus.GOOD  # what it knew before
    async with client(broker, devs[2]) as c:
        feed = Feed(c)
        await c.subscribe(FEED, qos=1)
        await feed.wait_for(lambda got: len(got) >= 2)
        await revoke(plugin, devs[1])
        await feed.wait_for(lambda got: len(deltas(got)) == 1)
        feed_all(rc, feed.got)
        await feed.close()
    assert rc.stale == {}
    assert [rc.status(d.certificate) for d in devs[:2]] == [RevocationStatus.REVOKED] * 2
    assert rc.lists[1].sequence == 2


async def test_revoke_kicks_within_a_second_and_the_validator_knows(make_broker: Any, ca: Ca, tmp_path: Path) -> None:
    """Revoke: the device's live session closes in < 1 s, the validator holds the signed delta in
    < 1 s, and the device cannot reconnect."""
    dev, gw = await ca.mint("acme", "sensor-kick"), await ca.mint("acme", "gateway-1")
    broker = await make_broker()
    plugin = CertmqPlugin.of(broker)
    rc = cache(tmp_path, ca)
    async with client(broker, gw) as g, client(broker, dev) as d:
        feed = Feed(g)
        await g.subscribe(FEED, qos=1)
        await feed.wait_for(lambda got: len(got) >= 2)
        feed_all(rc, feed.got)
        n = len(feed.got)

        async def closed() -> float:
            with pytest.raises(aiomqtt.MqttError):
                async for _ in d.messages:
                    pass
            return time.monotonic()

        watching = asyncio.ensure_future(asyncio.wait_for(closed(), 5))
        await asyncio.sleep(0.05)
        start = time.monotonic()
        await revoke(plugin, dev)
        await feed.wait_for(lambda got: len(deltas(got[n:])) == 1, timeout=1.0)
        delta_at = time.monotonic()
        closed_at = await watching
        feed_all(rc, feed.got[n:])
        await feed.close()
    assert closed_at - start < 1.0 and delta_at - start < 1.0
    assert rc.status(dev.certificate) is RevocationStatus.REVOKED
    with pytest.raises(aiomqtt.MqttError):
        async with client(broker, dev):
            pass
