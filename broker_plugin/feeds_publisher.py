"""Signed revocation feeds: per (tenant, region), retained snapshots and coalesced deltas, COSE-signed.

The plugin hands every committed revocation delta of the registry (``StatusDelta``, local or
polled, in feed order per region) to :meth:`FeedPublisher.on_deltas`. The publisher

* publishes a region's first delta at once and coalesces the deltas arriving within the next
  ``window`` seconds (default 50 ms; leading edge, then at most one publish per window) into
  **one delta per status list** (:func:`protocol.statuslist.merge_deltas`); when the merged
  revocations had different reasons the merged delta says ``UNSPECIFIED`` (the CRL and the
  registry keep each certificate's own reason), its time is the latest revocation's;
* signs it (COSE_Sign1 by the tenant's issuing CA key, :mod:`protocol.feedsig`; an HSM key signs
  through its key object's ``sign()``) in a worker thread, never on the event loop, and
  publishes it on ``certmq/v1/{tenant}/rev/{region}/delta``;
* keeps a **retained** signed snapshot per status list on ``.../rev/{region}/snapshot/{list_id}``
  and the region's newest list also retained on ``.../rev/{region}/snapshot`` (one retained
  message per topic): at :meth:`start` for every list of every tenant, for a list first seen,
  after coalesced delta batches (at most once per ``snapshot_min_interval`` and never more often
  than ``snapshot_cost_factor`` times the time the previous one took, so a 16M-entry list cannot
  eat the CPU), and every ``snapshot_period`` seconds.

**SnapshotRequest replies** (:meth:`FeedPublisher.signed_snapshots`): the signed snapshot of a
list -- the very bytes retained on its ``snapshot/{list_id}`` topic -- once that snapshot is current
(no delta published since; otherwise the reply waits for the refresh the deltas scheduled, so it
never costs an extra snapshot build), for the plugin to send on the requester's ``res`` topic.

A merged delta with more than ``MAX_INDICES`` (65,536) indices is not sent: the list's signed
snapshot is published (retained and live) in its place, at the sequence the delta would have
reached; subscribers on the snapshot topics apply it like any newer snapshot.

Sequences are **per list** (``docs/wire-format.md`` section 7): the registry numbers deltas per
region feed, so the publisher chains each list's deltas itself, ``from`` = the list's previous
``to`` (its own sequence, :meth:`Registry.list_state`). If the region's feed ever skips (a delta
this process did not see), the region's lists are re-read and re-snapshotted before going on.

The publisher only publishes what the registry has committed; it never decides revocations.
It knows the registry interface, the tenant authorities and a ``publish(topic, payload, retain)``
coroutine; not amqtt.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from protocol import codec, feedsig, statuslist
from protocol.codes import RevocationReason
from protocol.messages import MAX_INDICES, RevocationDelta, RevocationSnapshot
from protocol.topics import delta_topic, list_snapshot_topic, snapshot_topic

from .store.base import Registry, StatusDelta

__all__ = ["FeedPublisher", "FeedSigner", "Publish", "UnknownFeedList", "list_snapshot_topic"]

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes, bool], Awaitable[None]]
"""``publish(topic, payload, retain)``: put one message on the broker (retained when asked)."""

_HASH = {feedsig.ALG_ES256: hashes.SHA256, feedsig.ALG_ES384: hashes.SHA384}


class UnknownFeedList(LookupError):
    """The feed has no such status list (or the region no list at all, or the tenant no signer)."""


class FeedSigner:
    """Signs feed messages with one CA private key (file, PKCS#11 or ML-DSA key object)."""

    def __init__(self, *, key: Any) -> None:
        public = key.public_key()
        self.alg = feedsig.alg_for_key(public)
        self.kid = feedsig.key_id(public)
        self._key = key

    def sign(self, payload: bytes) -> bytes:
        """The COSE_Sign1 feed message around ``payload`` (blocking: run it in a thread)."""
        protected, tbs = feedsig.to_be_signed(alg=self.alg, kid=self.kid, payload=payload)
        if self.alg in _HASH:
            raw = self._key.sign(tbs, ec.ECDSA(_HASH[self.alg]()))
        else:
            raw = self._key.sign(tbs)
        return feedsig.encode_signed(protected=protected, payload=payload,
                                     signature=feedsig.signature_from_der(self.alg, raw))


@dataclass
class _List:
    size: int
    sequence: int  #: the list's own sequence as last published
    last_snapshot: float = 0.0  #: monotonic time of the last snapshot publish
    snapshot_cost: float = 0.0  #: seconds the last snapshot took to build and sign
    dirty: bool = False  #: deltas published since the last snapshot
    payload: bytes | None = None  #: the signed snapshot last published (the retained copy)
    published: asyncio.Future[None] | None = None  #: resolved at the next snapshot publish (waiters only)


@dataclass
class _Region:
    feed_sequence: int
    lists: dict[int, _List] = field(default_factory=dict)
    pending: list[StatusDelta] = field(default_factory=list)
    flush: asyncio.Task[None] | None = None
    last_flush: float = float("-inf")  #: monotonic time of the last flush


class FeedPublisher:
    """Publishes signed snapshots and coalesced signed deltas of every (tenant, region) feed."""

    def __init__(
        self,
        *,
        registry: Registry,
        keys: Mapping[str, Any],
        publish: Publish,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        window: float = 0.05,
        snapshot_period: float = 300.0,
        snapshot_min_interval: float = 1.0,
        snapshot_cost_factor: float = 20.0,
        discover_period: float = 5.0,
    ) -> None:
        if not 0 <= window <= 0.05:
            raise ValueError("window must be within 0..0.05 seconds")
        if snapshot_period <= 0 or discover_period <= 0 or snapshot_min_interval < 0 or snapshot_cost_factor < 0:
            raise ValueError("snapshot_period must be > 0, the other snapshot bounds >= 0")
        self.registry = registry
        self.signers = {tenant: FeedSigner(key=key) for tenant, key in keys.items()}
        self.publish = publish
        self.clock = clock
        self.window = window
        self.snapshot_period = snapshot_period
        self.snapshot_min_interval = snapshot_min_interval
        self.snapshot_cost_factor = snapshot_cost_factor
        self.discover_period = discover_period
        self.stats = {"deltas_in": 0, "deltas_out": 0, "snapshots": 0, "resyncs": 0, "oversized": 0}
        self._regions: dict[tuple[str, str], _Region] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._periodic: list[asyncio.Task[None]] = []

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Publish a retained signed snapshot of every list of every tenant; start the periodic refresh."""
        async with self._lock:
            for tenant in self.signers:
                regions = {fl.region for fl in await self.registry.feed_lists(tenant)}
                for region in sorted(regions):
                    await self._load_region(tenant, region)
        if not self._periodic:
            self._periodic = [asyncio.create_task(self._refresh_periodically(), name="certmq-feed-snapshots"),
                              asyncio.create_task(self._discover_periodically(), name="certmq-feed-discover")]

    async def close(self) -> None:
        """Flush what is pending, then stop the periodic refresh."""
        for reg in list(self._regions.values()):
            if reg.flush is not None and not reg.flush.done():
                with contextlib.suppress(Exception):
                    await reg.flush
        for task in self._periodic:
            task.cancel()
        await asyncio.gather(*self._periodic, return_exceptions=True)
        self._periodic = []
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def ensure(self, tenant: str, region: str) -> None:
        """Make sure the region's lists have retained snapshots (call when a list may have been created)."""
        if tenant not in self.signers:
            return
        async with self._lock:
            known = self._regions.get((tenant, region))
            lists = await self.registry.feed_lists(tenant, region)
            if known is None or any(fl.list_id not in known.lists for fl in lists):
                await self._load_region(tenant, region)

    # -- deltas --------------------------------------------------------------------------

    def on_deltas(self, deltas: Sequence[StatusDelta]) -> None:
        """Take committed deltas (feed order per region); they go out within ``window`` seconds."""
        for d in deltas:
            if d.tenant not in self.signers:
                continue
            self.stats["deltas_in"] += 1
            reg = self._regions.get((d.tenant, d.region))
            if reg is None:
                reg = self._regions[(d.tenant, d.region)] = _Region(feed_sequence=-1)
            reg.pending.append(d)
            if reg.flush is None or reg.flush.done():
                # Leading edge: a lone revocation goes out at once; a burst waits out the window.
                delay = max(0.0, reg.last_flush + self.window - time.monotonic())
                reg.flush = asyncio.create_task(self._flush_later(d.tenant, d.region, delay))

    async def flush(self) -> None:
        """Wait until every delta handed in so far is published."""
        while True:
            tasks = [r.flush for r in self._regions.values() if r.flush is not None and not r.flush.done()]
            if not tasks:
                return
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _flush_later(self, tenant: str, region: str, delay: float) -> None:
        await asyncio.sleep(delay)
        self._regions[(tenant, region)].last_flush = time.monotonic()
        try:
            async with self._lock:
                await self._flush(tenant, region)
        except Exception:
            log.exception("publishing the revocation deltas of %s/%s failed", tenant, region)

    async def _flush(self, tenant: str, region: str) -> None:
        reg = self._regions[(tenant, region)]
        batch, reg.pending = reg.pending, []
        if not batch:
            return
        batch.sort(key=lambda d: d.from_seq)
        if reg.feed_sequence < 0 or batch[0].from_seq != reg.feed_sequence or any(
            a.to_seq != b.from_seq for a, b in zip(batch, batch[1:])
        ):
            # Started mid-feed or missed a delta: the registry's lists hold everything committed.
            if reg.feed_sequence >= 0 and batch[-1].to_seq <= reg.feed_sequence:
                return  # all of it already published
            log.info("feed %s/%s: resynchronising from the registry", tenant, region)
            self.stats["resyncs"] += 1
            await self._load_region(tenant, region, keep_pending=True)
            return
        per_list: dict[int, list[StatusDelta]] = {}
        for d in batch:
            per_list.setdefault(d.list_id, []).append(d)
        for list_id, ds in per_list.items():
            lst = reg.lists.get(list_id)
            if lst is None:  # a list created since: its snapshot holds these deltas
                await self._load_list(tenant, region, reg, list_id)
                continue
            ds = [d for d in ds if d.to_seq > lst.sequence]
            if not ds:
                continue
            # Merging, encoding and signing a mass revocation's 100k indices is real work: off the loop.
            payload = await asyncio.to_thread(self._signed_delta, tenant, list_id, lst.sequence, ds)
            if payload is None:  # more indices than a delta may carry: the snapshot says it all
                self.stats["oversized"] += 1
                await self._load_list(tenant, region, reg, list_id)
                continue
            await self.publish(delta_topic(tenant, region), payload, False)
            self.stats["deltas_out"] += 1
            lst.sequence = ds[-1].to_seq
            lst.dirty = True
        reg.feed_sequence = batch[-1].to_seq
        for list_id in per_list:
            self._maybe_snapshot(tenant, region, list_id)

    def _signed_delta(self, tenant: str, list_id: int, held: int, ds: list[StatusDelta]) -> bytes | None:
        chain, prev = [], held
        for d in ds:  # the list's own chain: each from the previous one's to
            chain.append(statuslist.MergedDelta(list_id=list_id, from_sequence=prev, to_sequence=d.to_seq,
                                                indices=tuple(sorted(set(d.indices)))))
            prev = d.to_seq
        merged = statuslist.merge_deltas(chain)
        if len(merged.indices) > MAX_INDICES:
            return None
        reasons = {d.reason for d in ds}
        reason = RevocationReason(reasons.pop()) if len(reasons) == 1 else RevocationReason.UNSPECIFIED
        message = RevocationDelta(list_id=list_id, from_sequence=held, to_sequence=merged.to_sequence,
                                  indices=merged.indices, reason=reason, time=max(d.at for d in ds))
        return self.signers[tenant].sign(codec.encode(message))

    # -- snapshots -----------------------------------------------------------------------

    async def _load_region(self, tenant: str, region: str, *, keep_pending: bool = False) -> None:
        reg = self._regions.get((tenant, region))
        if reg is None:
            reg = self._regions[(tenant, region)] = _Region(feed_sequence=-1)
        lists = await self.registry.feed_lists(tenant, region)
        for fl in lists:  # all known first: only the newest list goes on the plain snapshot topic
            reg.lists.setdefault(fl.list_id, _List(size=fl.capacity, sequence=fl.sequence))
        for fl in lists:
            await self._load_list(tenant, region, reg, fl.list_id)
        if lists:
            reg.feed_sequence = max(fl.feed_sequence for fl in lists)
        if keep_pending:
            # Deltas committed before the lists were read are in the snapshots just published.
            reg.pending = [d for d in reg.pending if d.to_seq > reg.feed_sequence]

    async def _load_list(self, tenant: str, region: str, reg: _Region, list_id: int) -> None:
        state = await self.registry.list_state(tenant, region, list_id)
        if state is None:
            return
        lst = reg.lists.get(list_id)
        if lst is None:
            lst = reg.lists[list_id] = _List(size=state.size, sequence=state.sequence)
        lst.sequence = max(lst.sequence, state.sequence)
        await self._publish_snapshot(tenant, region, list_id, lst, state)

    async def _publish_snapshot(self, tenant: str, region: str, list_id: int, lst: _List, state: Any) -> None:
        started = time.monotonic()

        def build() -> bytes:
            snap = RevocationSnapshot(list_id=list_id, sequence=state.sequence, size=state.size,
                                      bits=statuslist.compress(state.bits, state.size),
                                      time=self.clock().replace(microsecond=0))
            return self.signers[tenant].sign(codec.encode(snap))

        payload = await asyncio.to_thread(build)
        await self.publish(list_snapshot_topic(tenant, region, list_id), payload, True)
        reg = self._regions[(tenant, region)]
        if list_id == max(reg.lists):
            await self.publish(snapshot_topic(tenant, region), payload, True)
        lst.last_snapshot = time.monotonic()
        lst.snapshot_cost = lst.last_snapshot - started
        lst.dirty = lst.sequence > state.sequence
        lst.payload = payload
        self.stats["snapshots"] += 1
        if lst.published is not None:
            if not lst.published.done():
                lst.published.set_result(None)
            lst.published = None

    # -- SnapshotRequest replies ---------------------------------------------------------

    async def signed_snapshots(self, tenant: str, region: str, list_id: int | None = None) -> list[bytes]:
        """The signed snapshot of ``list_id`` (``None``: of every list of the region, by list id).

        Each is the payload retained on ``snapshot/{list_id}``, current up to every delta handed to
        :meth:`on_deltas` before the call (a pending coalesced flush is waited for first): when
        deltas went out since the list's last snapshot, this waits for the
        refresh they scheduled (at most ``snapshot_min_interval`` or ``snapshot_cost_factor`` x the
        last build) and builds one itself only if none came. Raises :class:`UnknownFeedList`.
        """
        if tenant not in self.signers:
            raise UnknownFeedList(f"tenant {tenant!r} has no signed feed here")
        reg = self._regions.get((tenant, region))
        if reg is None or not reg.lists or (list_id is not None and list_id not in reg.lists):
            await self.ensure(tenant, region)  # a list (or region) created since the last look
            reg = self._regions.get((tenant, region))
        if reg is None or not reg.lists:
            raise UnknownFeedList(f"region {region!r} has no status list")
        if list_id is not None and list_id not in reg.lists:
            raise UnknownFeedList(f"region {region!r} has no status list {list_id}")
        if reg.flush is not None and not reg.flush.done():
            # Deltas handed in but still in their coalescing window: publish them first, so the
            # reply holds every revocation committed before the request.
            with contextlib.suppress(Exception):
                await asyncio.shield(reg.flush)
        ids = sorted(reg.lists) if list_id is None else [list_id]
        return [await self._current_snapshot(tenant, region, reg, i) for i in ids]

    async def _current_snapshot(self, tenant: str, region: str, reg: _Region, list_id: int) -> bytes:
        lst = reg.lists[list_id]
        wait = max(self.snapshot_min_interval, self.snapshot_cost_factor * lst.snapshot_cost) + 1.0
        deadline = time.monotonic() + wait
        while lst.dirty or lst.payload is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if lst.published is None:
                lst.published = asyncio.get_running_loop().create_future()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(lst.published), remaining)
        if lst.dirty or lst.payload is None:
            # No refresh came (it failed, or the list was never snapshotted): build one now.
            async with self._lock:
                if lst.dirty or lst.payload is None:
                    await self._load_list(tenant, region, reg, list_id)
        if lst.payload is None:
            raise UnknownFeedList(f"status list {list_id} of region {region!r} has no snapshot")
        return lst.payload

    def _maybe_snapshot(self, tenant: str, region: str, list_id: int) -> None:
        lst = self._regions[(tenant, region)].lists[list_id]
        gap = max(self.snapshot_min_interval, self.snapshot_cost_factor * lst.snapshot_cost)
        delay = max(0.0, lst.last_snapshot + gap - time.monotonic())
        task = asyncio.create_task(self._snapshot_later(tenant, region, list_id, delay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _snapshot_later(self, tenant: str, region: str, list_id: int, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            async with self._lock:
                reg = self._regions[(tenant, region)]
                lst = reg.lists[list_id]
                if not lst.dirty:
                    return  # another refresh already covered it
                state = await self.registry.list_state(tenant, region, list_id)
                if state is None:
                    return
                if state.sequence > lst.sequence:
                    return  # deltas not published yet: their flush will snapshot again
                await self._publish_snapshot(tenant, region, list_id, lst, state)
        except Exception:
            log.exception("snapshot of %s/%s list %d failed", tenant, region, list_id)

    async def _discover_periodically(self) -> None:
        # Lists created by issuance (a new region, a roll-over) get their first snapshot here.
        while True:
            await asyncio.sleep(self.discover_period)
            try:
                await self.discover()
            except Exception:
                log.exception("looking for new status lists failed")

    async def discover(self) -> int:
        """Publish snapshots of lists created since the last look; returns how many were new."""
        found = 0
        for tenant in self.signers:
            lists = await self.registry.feed_lists(tenant)
            async with self._lock:
                for fl in lists:
                    reg = self._regions.get((tenant, fl.region))
                    if reg is None or fl.list_id not in reg.lists:
                        found += 1
                        if reg is None or reg.feed_sequence < 0:
                            await self._load_region(tenant, fl.region, keep_pending=True)
                        else:
                            await self._load_list(tenant, fl.region, reg, fl.list_id)
        return found

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.snapshot_period)
            for (tenant, region), reg in list(self._regions.items()):
                try:
                    async with self._lock:
                        for list_id in list(reg.lists):
                            state = await self.registry.list_state(tenant, region, list_id)
                            lst = reg.lists[list_id]
                            if state is not None and state.sequence <= lst.sequence:
                                await self._publish_snapshot(tenant, region, list_id, lst, state)
                except Exception:
                    log.exception("periodic snapshot of %s/%s failed", tenant, region)
