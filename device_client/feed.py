"""Wiring a :class:`~device_client.revcache.RevocationCache` to a :class:`~device_client.client.DeviceClient`.

::

    cache = RevocationCache(tenant="acme", region="eu-west", path=..., verifier=...)
    async with DeviceClient(...) as dc:
        feed = await follow_feed(dc, cache)
        ...
        cache.status(peer_certificate)

:func:`follow_feed` subscribes the client to the region's delta topic and snapshot topics
(``.../snapshot`` and ``.../snapshot/+``, one retained signed snapshot per list; kept across
reconnects) and hands every feed message to :meth:`RevocationCache.handle`. It answers the cache's
gap signal (``request_snapshot(list_id)``) by sending a SnapshotRequest over MQTT
(:meth:`DeviceClient.request_snapshot`) and applying the reply with
:meth:`RevocationCache.handle_snapshot_reply`, which checks it with the cache's verifier: the
broker answers with the list's signed snapshot (the retained feed message) on the device's own
reply topic. Only when that fails (an Error, no reply, or a reply the cache refuses -- e.g. the
unsigned reply of an older CA) does it fall back to subscribing to the list's retained snapshot
topic again, which makes the broker re-send the retained signed snapshot.

A signed snapshot arriving on the reply topic that no request waits for (a late reply, or one of
the replies to a SnapshotRequest without list id) is handed to the cache too. A feed message the
cache refuses is logged and dropped; it never stops the client's reader.

This module knows the client and the cache, not the MQTT library or the feed's signature format
(that is the cache's verifier).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from protocol import topics
from protocol.errors import CertmqError

from .client import DeviceClient
from .revcache import FeedRejected, RevocationCache
from .transport import IncomingMessage

__all__ = ["FeedFollower", "follow_feed"]

log = logging.getLogger("certmq.revocation")


@dataclass(eq=False)
class FeedFollower:
    """What :func:`follow_feed` set up: counters for monitoring, and the snapshot fetches in flight."""

    client: DeviceClient
    cache: RevocationCache
    applied: int = 0  #: feed messages that changed the cache
    rejected: int = 0  #: feed messages the cache refused (FeedRejected)
    gaps: int = 0  #: times the cache asked for a snapshot (a gap in a list's deltas)
    resyncs: int = 0  #: snapshot fetches started and completed without error (see module doc)
    failed_resyncs: int = 0
    resubscribes: int = 0  #: fallbacks to re-subscribing to a list's retained snapshot topic
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def on_message(self, incoming: IncomingMessage) -> None:
        """Route one received message: feed topics go to the cache, anything else is ignored here."""
        reply = incoming.topic == topics.device_response_topic(self.client.tenant, self.client.device_id)
        if not reply and not self.cache.is_feed_topic(incoming.topic):
            return
        if reply and incoming.payload[:1] != b"\x84":
            return  # a certmq message (CertificateIssued, Error): not for the cache
        try:
            changed = (self.cache.handle_snapshot_reply(incoming.payload) if reply
                       else self.cache.handle(incoming.topic, incoming.payload))
            if changed:
                self.applied += 1
        except FeedRejected as exc:
            self.rejected += 1
            log.warning("feed message dropped: %s", exc)

    def request_snapshot(self, list_id: int) -> None:
        """The cache saw a gap in ``list_id``: fetch a snapshot over MQTT (in the background)."""
        self.gaps += 1
        task = asyncio.get_running_loop().create_task(self._resync(list_id))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _resync(self, list_id: int) -> None:
        try:
            reply = await self.client.request_snapshot(list_id)
            if self.cache.handle_snapshot_reply(reply):
                self.applied += 1
        except (CertmqError, OSError) as exc:
            log.warning("snapshot request for list %d failed (%s): re-subscribing to its retained snapshot",
                        list_id, exc)
            try:
                self.resubscribes += 1
                await self.client.transport.subscribe(self.cache.list_snapshot_topic(list_id))
            except (CertmqError, OSError) as again:  # the next gap asks again
                self.failed_resyncs += 1
                log.warning("re-subscribing for list %d failed: %s", list_id, again)
                return
        self.resyncs += 1


async def follow_feed(client: DeviceClient, cache: RevocationCache) -> FeedFollower:
    """Feed ``cache`` from ``client``'s connection (see module doc); returns the :class:`FeedFollower`.

    Chains any ``on_message`` the client already had (it still sees every message).
    """
    follower = FeedFollower(client=client, cache=cache)
    previous = client.on_message

    def route(incoming: IncomingMessage) -> None:
        follower.on_message(incoming)
        if previous is not None:
            previous(incoming)

    client.on_message = route
    cache.request_snapshot = follower.request_snapshot
    await client.subscribe(cache.snapshot_topic)
    await client.subscribe(f"{cache.snapshot_topic}/+")
    await client.subscribe(cache.delta_topic)
    return follower
