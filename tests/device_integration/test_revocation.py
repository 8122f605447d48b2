"""The revocation cache fed by the real broker's feed topics through a DeviceClient over real TLS
(device_client.feed.follow_feed): the retained snapshot, deltas from `certmq ca revoke` in another
process and from plugin.revoke, a gap (one delta lost) resynced by a SnapshotRequest over MQTT
answered by the CA on the device's reply topic, and persistence across a restart.

Verifier: SignedFeedVerifier over the tenant chain -- the broker now publishes COSE_Sign1-signed
feeds (broker_plugin.feeds_publisher). The CA's reply to a SnapshotRequest is NOT signed, so a
signing cache resyncs from the retained per-list snapshot; SnapshotRequest over MQTT is tested on
its own (the reply arrives, unsigned, and a signing cache refuses it)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from device_client import FeedRejected, RevocationCache, RevocationStatus, trust_broker_acl
from device_client.feedverify import SignedFeedVerifier
from device_client.feed import follow_feed
from device_client.transport import IncomingMessage
from protocol.codes import RevocationReason
from protocol.messages import RevocationDelta

from .conftest import PASS_ENV, TENANT, BrokerHandle, Ca, device_client, enrolled, wait_for

REGION = "-"  # certificates without a region are on the tenant's default feed


async def test_cache_follows_the_feed_and_resyncs_after_a_gap(
        broker: BrokerHandle, ca: Ca, datadir: Path, tmp_path: Path) -> None:
    """GOOD from the retained snapshot; REVOKED after `certmq ca revoke` (delta via the broker's
    registry poller) and after plugin.revoke (delta at once); with one delta lost, the next one is
    a gap: the cache asks for a snapshot, the follower re-subscribes to the list's retained signed
    snapshot, it is applied, the list is no longer stale and both revocations are seen; every feed
    message passed the signature check; a new cache on the same file answers at once."""
    gateway = await enrolled(tmp_path, broker, ca, "gateway-1")
    a, b, c, d = [await ca.mint(f"sensor-v{i}") for i in range(4)]
    verifier = SignedFeedVerifier(certificates=ca.chain)
    cache = RevocationCache(tenant=TENANT, region=REGION, path=tmp_path / "rev.json", verifier=verifier)
    drop_next_delta = False
    dropped: list[RevocationDelta] = []
    async with device_client(gateway, broker, ca) as dc:
        feed = await follow_feed(dc, cache)
        route = dc.on_message
        assert route is not None

        def lossy(m: IncomingMessage) -> None:
            nonlocal drop_next_delta
            if drop_next_delta and m.topic == cache.delta_topic:
                drop_next_delta = False
                dropped.append(verifier.open(m.payload))  # type: ignore[arg-type]
                return
            route(m)

        dc.on_message = lossy
        await wait_for(lambda: cache.status(a.certificate) is RevocationStatus.GOOD, what="the retained snapshot")
        assert {cache.status(x.certificate) for x in (b, c, d)} == {RevocationStatus.GOOD}

        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "broker_plugin.cli", "ca", "revoke", "--data", str(datadir), "--tenant", TENANT,
            "--serial", f"{a.serial:x}", "--reason", "keyCompromise", "--passphrase-env", PASS_ENV,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        await wait_for(lambda: cache.status(a.certificate) is RevocationStatus.REVOKED, what="the CLI revocation")
        assert cache.is_revoked(a.certificate) and not cache.is_revoked(b.certificate)

        await broker.plugin.revoke(tenant=TENANT, reason=RevocationReason.SUPERSEDED, actor="test", serial=b.serial)
        await wait_for(lambda: cache.status(b.certificate) is RevocationStatus.REVOKED, what="the API revocation")

        drop_next_delta = True
        await broker.plugin.revoke(tenant=TENANT, reason=RevocationReason.SUPERSEDED, actor="test", serial=c.serial)
        await wait_for(lambda: bool(dropped), what="the lost delta")
        assert cache.status(c.certificate) is RevocationStatus.GOOD  # it never arrived
        await broker.plugin.revoke(tenant=TENANT, reason=RevocationReason.SUPERSEDED, actor="test", serial=d.serial)
        await wait_for(lambda: feed.gaps >= 1, what="the gap")
        # healed by the re-delivered retained snapshot, or by the fresher one the publisher sends
        # after a delta batch (whichever is newer first): the list is no longer stale
        await wait_for(lambda: not cache.stale and cache.status(c.certificate) is RevocationStatus.REVOKED,
                       timeout=10, what="the resync")
        assert feed.resyncs >= 1 and feed.failed_resyncs == 0 and feed.rejected == 0
        assert cache.status(d.certificate) is RevocationStatus.REVOKED
        assert cache.status(gateway.store.current().certificate) is RevocationStatus.GOOD  # type: ignore[union-attr]

    reopened = RevocationCache(tenant=TENANT, region=REGION, path=tmp_path / "rev.json", verifier=verifier)
    assert [reopened.status(x.certificate) for x in (a, b, c, d)] == [RevocationStatus.REVOKED] * 4


async def test_snapshot_request_over_mqtt(broker: BrokerHandle, ca: Ca, tmp_path: Path) -> None:
    """DeviceClient.request_snapshot: a SnapshotRequest on dev/{id}/req is answered by the CA with a
    RevocationSnapshot on dev/{id}/res (the device's own list, showing a revocation); a cache with
    trust_broker_acl applies it, a cache with SignedFeedVerifier refuses it (the reply is unsigned).
    A list id that does not exist: an Error (UNKNOWN_CERTIFICATE) -> RequestRejected, not a timeout."""
    from protocol.codes import ErrorCode
    from protocol.errors import RequestRejected

    gateway = await enrolled(tmp_path, broker, ca, "gateway-2")
    async with device_client(gateway, broker, ca, reply_timeout=5.0) as dc:
        victim = await ca.mint("sensor-w1")
        await broker.plugin.revoke(tenant=TENANT, reason=RevocationReason.SUPERSEDED, actor="test",
                                   serial=victim.serial)
        own = await dc.request_snapshot()  # its own list
        assert own.size > 0
        plain = RevocationCache(tenant=TENANT, region=REGION, path=tmp_path / "plain.json", verifier=trust_broker_acl)
        assert plain.handle_snapshot_reply(own)
        assert plain.status(victim.certificate) is RevocationStatus.REVOKED
        assert plain.status(gateway.store.current().certificate) is RevocationStatus.GOOD  # type: ignore[union-attr]
        signing = RevocationCache(tenant=TENANT, region=REGION, path=tmp_path / "signed.json",
                                  verifier=SignedFeedVerifier(certificates=ca.chain))
        with pytest.raises(FeedRejected):
            signing.handle_snapshot_reply(own)
        try:
            await dc.request_snapshot(own.list_id + 1000)
        except RequestRejected as exc:
            assert exc.code == ErrorCode.UNKNOWN_CERTIFICATE
        else:
            raise AssertionError("a snapshot of a list that does not exist")
