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
gap signal (``request_snapshot(list_id)``):

* with a verifier that requires signatures (:class:`~device_client.feedverify.SignedFeedVerifier`):
  by subscribing to the list's retained snapshot topic again, which makes the broker re-send the
  retained signed snapshot -- the CA's reply to a SnapshotRequest is not signed, so a signing
  cache could not take it;
* otherwise (``trust_broker_acl``, unsigned legacy feeds): by sending a SnapshotRequest over MQTT
  (:meth:`DeviceClient.request_snapshot`) and applying the reply with
  :meth:`RevocationCache.handle_snapshot_reply`.

A feed message the cache refuses is logged and dropped; it never stops the client's reader.

This module knows the client and the cache, not the MQTT library or the feed's signature format
(that is the cache's verifier).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

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
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def on_message(self, incoming: IncomingMessage) -> None:
        """Route one received message: feed topics go to the cache, anything else is ignored here."""
        if incoming.topic not in (self.cache.snapshot_topic, self.cache.delta_topic):
            return
        try:
            if self.cache.handle(incoming.topic, incoming.payload):
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
            if getattr(self.cache.verifier, "requires_signature", False):
                topic = self.cache.list_snapshot_topic(list_id)
                await self.client.transport.subscribe(topic)  # re-delivers the retained signed snapshot
            else:
                snapshot = await self.client.request_snapshot(list_id)
                self.cache.handle_snapshot_reply(snapshot)
        except (CertmqError, OSError) as exc:  # the next gap asks again
            self.failed_resyncs += 1
            log.warning("snapshot request for list %d failed: %s", list_id, exc)
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
