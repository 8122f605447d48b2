"""SnapshotRequest over the real broker: the reply is the requested list's SIGNED snapshot (the
very bytes retained on rev/{region}/snapshot/{list_id}), sent on the requester's res topic only,
for the requester's region; one reply per list without a list id; an unknown list gets one Error
with the request id; the admission queue's rate limit applies; a signature-checking validator
recovers from a gap with it (no re-subscribe)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiomqtt

from broker_plugin.plugin import CertmqPlugin
from device_client.revcache import RevocationStatus
from protocol import codec, feedsig
from protocol.codes import ErrorCode, RevocationReason
from protocol.messages import Error, RevocationSnapshot, SnapshotRequest
from protocol.topics import device_request_topic, device_response_topic, list_snapshot_topic

from .conftest import Ca, Creds, Feed, cache, client, verifier

FEED = "certmq/v1/acme/rev/eu/#"


async def ask(c: aiomqtt.Client, creds: Creds, list_id: int | None) -> bytes:
    request_id = os.urandom(16)
    await c.publish(device_request_topic(creds.tenant, creds.name),
                    codec.encode(SnapshotRequest(request_id=request_id, list_id=list_id)), qos=1)
    return request_id


def res(got: list[tuple[str, bytes]], creds: Creds) -> list[bytes]:
    return [p for t, p in got if t == device_response_topic(creds.tenant, creds.name)]


def snapshot_of(payload: bytes) -> RevocationSnapshot:
    inner = codec.decode(feedsig.decode_signed(payload).payload)
    assert isinstance(inner, RevocationSnapshot)
    return inner


async def test_reply_is_the_retained_signed_snapshot_on_the_requesters_res_topic_only(
        make_broker: Any, ca: Ca, tmp_path: Path) -> None:
    """Nine eu certificates (lists 1 and 2). The requester gets, for list 1, a COSE_Sign1 that
    verifies against the tenant CA and is byte-identical to the retained copy; without a list id,
    one signed reply per list of its region; an unknown list: exactly one Error carrying the
    request id (UNKNOWN_CERTIFICATE). Another device connected meanwhile, subscribed to its own
    res topic and the feed, receives none of these replies."""
    devs = [await ca.mint("acme", f"sensor-{i}") for i in range(9)]
    assert {d.region for d in devs} == {"eu"}
    asker, other = devs[0], devs[1]
    broker = await make_broker()
    async with client(broker, asker) as a, client(broker, other) as b:
        fa, fb = Feed(a), Feed(b)
        await a.subscribe(device_response_topic("acme", asker.name), qos=1)
        await a.subscribe(list_snapshot_topic("acme", "eu", 1), qos=1)
        await b.subscribe(device_response_topic("acme", other.name), qos=1)
        await b.subscribe(FEED, qos=1)
        await fa.wait_for(lambda got: any(t == list_snapshot_topic("acme", "eu", 1) for t, _ in got))
        retained = next(p for t, p in fa.got if t == list_snapshot_topic("acme", "eu", 1))
        await fb.wait_for(lambda got: len(got) >= 3)  # its retained snapshots: newest, lists 1 and 2

        await ask(a, asker, 1)
        await fa.wait_for(lambda got: len(res(got, asker)) == 1)
        reply = res(fa.got, asker)[0]
        assert reply[:1] == b"\x84" and reply == retained
        opened = verifier(ca).open(reply)
        assert isinstance(opened, RevocationSnapshot) and opened.list_id == 1

        await ask(a, asker, None)
        await fa.wait_for(lambda got: len(res(got, asker)) == 3)
        assert sorted(snapshot_of(p).list_id for p in res(fa.got, asker)[1:]) == [1, 2]
        for p in res(fa.got, asker)[1:]:
            verifier(ca).open(p)

        request_id = await ask(a, asker, 77)
        await fa.wait_for(lambda got: len(res(got, asker)) == 4)
        error = codec.decode(res(fa.got, asker)[3])
        assert isinstance(error, Error)
        assert error.request_id == request_id and error.code == ErrorCode.UNKNOWN_CERTIFICATE
        await asyncio.sleep(0.3)  # nothing else comes: one reply per request
        assert len(res(fa.got, asker)) == 4
        await fa.close()
        await fb.close()
    # The other device got its feed, and never a reply (none on any res topic, none of those bytes
    # outside the retained ones it was sent when subscribing).
    assert fb.got and all(t.startswith("certmq/v1/acme/rev/eu/") for t, _ in fb.got)
    assert not [t for t, _ in fb.got if t.endswith("/res")]


async def test_reply_is_for_the_requesters_region(make_broker: Any, ca: Ca, tmp_path: Path) -> None:
    """A device of region "us" asking without a list id gets the one list of "us" (no revocation),
    not eu's list (one revocation): the region is the requester's."""
    eu = await ca.mint("acme", "sensor-eu")
    us = await ca.mint("acme", "sensor-us", region="us")
    await ca.service.revoke(tenant="acme", reason=RevocationReason.KEY_COMPROMISE, actor="t", serial=eu.serial)
    broker = await make_broker()
    async with client(broker, us) as c:
        feed = Feed(c)
        await c.subscribe(device_response_topic("acme", us.name), qos=1)
        await ask(c, us, None)
        await feed.wait_for(lambda got: len(res(got, us)) >= 1)
        await asyncio.sleep(0.2)
        await feed.close()
    replies = res(feed.got, us)
    assert len(replies) == 1  # "us" has one list
    rc = cache(tmp_path, ca, region="us")
    assert rc.handle_snapshot_reply(replies[0])
    assert rc.status(us.certificate) is RevocationStatus.GOOD
    assert [sl.revoked_count() for sl in rc.lists.values()] == [0]
    eu_list = await ca.registry.list_state("acme", "eu", snapshot_of(replies[0]).list_id)
    assert eu_list is not None and any(eu_list.bits)  # what a wrong region would have sent


async def test_snapshot_requests_are_rate_limited(make_broker: Any, ca: Ca) -> None:
    """SnapshotRequests go through the admission queue: past the per-client burst, RATE_LIMITED
    (with a retry-after and the request id) instead of a snapshot."""
    dev = await ca.mint("acme", "sensor-rl")
    broker = await make_broker(rate=0.2, burst=2)
    async with client(broker, dev) as c:
        feed = Feed(c)
        await c.subscribe(device_response_topic("acme", dev.name), qos=1)
        ids = [await ask(c, dev, 1) for _ in range(4)]
        await feed.wait_for(lambda got: len(res(got, dev)) == 4)
        await feed.close()
    replies = res(feed.got, dev)
    signed = [p for p in replies if p[:1] == b"\x84"]
    errors = [codec.decode(p) for p in replies if p[:1] != b"\x84"]
    assert len(signed) == 2
    assert [e.code for e in errors] == [ErrorCode.RATE_LIMITED] * 2  # type: ignore[union-attr]
    assert {e.request_id for e in errors} == set(ids[2:])  # type: ignore[union-attr]
    assert all(e.retry_after for e in errors)  # type: ignore[union-attr]


async def test_validator_recovers_from_a_gap_with_a_snapshot_request(make_broker: Any, ca: Ca, tmp_path: Path) -> None:
    """A signature-checking validator misses a delta; the next one is a gap (list stale); it sends
    a SnapshotRequest on the same connection (no re-subscribe), verifies the signed reply and is
    current: both revocations REVOKED, the list no longer stale."""
    devs = [await ca.mint("acme", f"sensor-{i}") for i in range(3)]
    broker = await make_broker()
    plugin = CertmqPlugin.of(broker)
    asked: list[int] = []
    rc = cache(tmp_path, ca, requested=asked)
    validator = devs[2]
    async with client(broker, validator) as c:
        feed = Feed(c)
        await c.subscribe(device_response_topic("acme", validator.name), qos=1)
        await c.subscribe(FEED, qos=1)
        await feed.wait_for(lambda got: len(got) >= 2)
        for topic, payload in feed.got:
            rc.handle(topic, payload)
        n = len(feed.got)
        await plugin.revoke(tenant="acme", reason=RevocationReason.KEY_COMPROMISE, actor="t", serial=devs[0].serial)
        await feed.wait_for(lambda got: any(t.endswith("/delta") for t, _ in got[n:]))
        m = len(feed.got)  # everything before m is "lost"
        await plugin.revoke(tenant="acme", reason=RevocationReason.KEY_COMPROMISE, actor="t", serial=devs[1].serial)
        await feed.wait_for(lambda got: any(t.endswith("/delta") for t, _ in got[m:]))
        for topic, payload in feed.got[m:]:
            if topic.endswith("/delta"):
                assert rc.handle(topic, payload) is False
        assert asked == [1] and rc.status(devs[1].certificate) is RevocationStatus.STALE
        k = len(feed.got)
        await ask(c, validator, asked[0])
        await feed.wait_for(lambda got: len(res(got[k:], validator)) == 1, timeout=5)
        assert rc.handle_snapshot_reply(res(feed.got[k:], validator)[0])
        await feed.close()
    assert rc.stale == {}
    assert [rc.status(d.certificate) for d in devs] == [RevocationStatus.REVOKED] * 2 + [RevocationStatus.GOOD]
