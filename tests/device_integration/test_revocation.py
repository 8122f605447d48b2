"""The revocation cache fed by the real broker's feed topics through a DeviceClient over real TLS
(device_client.feed.follow_feed): the retained snapshot, deltas from `certmq ca revoke` in another
process and from plugin.revoke, a gap (one delta lost) resynced by a SnapshotRequest over MQTT
answered on the device's reply topic, and persistence across a restart.

Verifier: SignedFeedVerifier over the tenant chain -- the broker publishes COSE_Sign1-signed
feeds (broker_plugin.feeds_publisher), and answers a SnapshotRequest with the list's signed
snapshot (the retained feed message), which the signing cache verifies and applies."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from device_client import FeedRejected, RevocationCache, RevocationStatus
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
    a gap: the cache asks for a snapshot, the follower sends a SnapshotRequest and applies the
    signed reply (no re-subscribe), the list is no longer stale and both revocations are seen;
    every feed message passed the signature check; a new cache on the same file answers at once."""
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
        # healed by the SnapshotRequest's signed reply (or by the fresher snapshot the publisher
        # retains after a delta batch, whichever comes first): the list is no longer stale
        await wait_for(lambda: not cache.stale and cache.status(c.certificate) is RevocationStatus.REVOKED,
                       timeout=10, what="the resync")
        await wait_for(lambda: feed.resyncs >= 1, what="the SnapshotRequest reply")
        # the reply verified and applied (a refused one would fall back to a re-subscribe)
        assert feed.resubscribes == 0 and feed.failed_resyncs == 0 and feed.rejected == 0
        assert cache.status(d.certificate) is RevocationStatus.REVOKED
        assert cache.status(gateway.store.current().certificate) is RevocationStatus.GOOD  # type: ignore[union-attr]

    reopened = RevocationCache(tenant=TENANT, region=REGION, path=tmp_path / "rev.json", verifier=verifier)
    assert [reopened.status(x.certificate) for x in (a, b, c, d)] == [RevocationStatus.REVOKED] * 4


async def test_snapshot_request_over_mqtt(broker: BrokerHandle, ca: Ca, tmp_path: Path) -> None:
    """DeviceClient.request_snapshot: a SnapshotRequest on dev/{id}/req is answered on dev/{id}/res
    with the device's own list as a signed feed message (COSE_Sign1, first byte 0x84) showing a
    revocation; a SignedFeedVerifier cache verifies and applies it, and refuses it once a byte of
    the signed payload is changed. A list id that does not exist: an Error (UNKNOWN_CERTIFICATE)
    -> RequestRejected, not a timeout. Another device connected meanwhile never sees a reply."""
    from protocol.codes import ErrorCode
    from protocol.errors import RequestRejected

    gateway = await enrolled(tmp_path, broker, ca, "gateway-2")
    bystander = await enrolled(tmp_path, broker, ca, "gateway-3")
    overheard: list[IncomingMessage] = []
    async with device_client(gateway, broker, ca, reply_timeout=5.0) as dc, \
            device_client(bystander, broker, ca, on_message=overheard.append) as other:
        assert other.connected_as is not None
        victim = await ca.mint("sensor-w1")
        await broker.plugin.revoke(tenant=TENANT, reason=RevocationReason.SUPERSEDED, actor="test",
                                   serial=victim.serial)
        own = await dc.request_snapshot()  # its own list
        assert isinstance(own, bytes) and own[:1] == b"\x84"
        signing = RevocationCache(tenant=TENANT, region=REGION, path=tmp_path / "signed.json",
                                  verifier=SignedFeedVerifier(certificates=ca.chain))
        forged = bytearray(own)
        forged[-70] ^= 1  # inside the payload or the signature: verification fails
        with pytest.raises(FeedRejected):
            signing.handle_snapshot_reply(bytes(forged))
        assert signing.lists == {}
        assert signing.handle_snapshot_reply(own)
        assert signing.status(victim.certificate) is RevocationStatus.REVOKED
        assert signing.status(gateway.store.current().certificate) is RevocationStatus.GOOD  # type: ignore[union-attr]
        unknown = max(signing.lists) + 1000
        with pytest.raises(RequestRejected) as refused:
            await dc.request_snapshot(unknown)
        assert refused.value.code == ErrorCode.UNKNOWN_CERTIFICATE
        await asyncio.sleep(0.3)
    assert overheard == []  # nothing reached the other device: no reply, no stray message
