"""The certmq amqtt plugin: the CA service behind a :class:`~broker_plugin.broker.HardenedBroker`.

Load it from an amqtt config (``plugins: {broker_plugin.plugin.CertmqPlugin: {...}}``, fields of
:class:`CertmqPlugin.Config`) on a ``HardenedBroker``, or let ``certmq broker``
(:mod:`broker_plugin.server`) do it. It

* installs the broker hooks: identity = :meth:`CAService.identify` of the connection's certificate
  (expired ones only inside their profile's ``expired_recovery`` window, and then renewal only),
  client id = the identity's name, ACL = :func:`broker_plugin.acl.allowed`;
* takes every permitted publish on a request topic into the bounded :class:`AdmissionQueue`
  (``BUSY`` / ``RATE_LIMITED`` answered at once, with a retry-after), drains it in batches of up
  to ``batch_size`` into one ``CAService.handle_many`` call each (signing in worker processes:
  :class:`~broker_plugin.ca.pool.ProcessPoolSigner`), and sends each reply with
  ``broker.deliver_to`` to the requesting session only — never through the topic tree;
* kicks every live session of a revoked certificate: revoked by a message through this broker,
  by :meth:`CertmqPlugin.revoke`, or by another process on the same registry (polled every
  ``revocation_poll`` seconds);
* answers a SnapshotRequest (admitted through the same queue and rate limits) from the
  :class:`~broker_plugin.feeds_publisher.FeedPublisher`, not the service: the signed snapshot of
  the asked list of the requester's region (every list of it when no list id is given), the same
  bytes retained on ``rev/{region}/snapshot/{list_id}``, sent to the requesting session only;
* hands revocation deltas to :meth:`CertmqPlugin.on_deltas` callbacks and (``publish_feeds``)
  to a :class:`~broker_plugin.feeds_publisher.FeedPublisher`: signed (tenant CA, COSE_Sign1),
  coalesced deltas on ``rev/{region}/delta`` and retained signed snapshots per status list
  (``docs/revocation-feeds.md``).

Fleet health (:mod:`broker_plugin.health`): connects, disconnects and second sessions of one
certificate are recorded (batched) in the registry's ``sessions`` table; every ``health_interval``
seconds each tenant is assessed and the report published retained on
``certmq/v1/{tenant}/ops/findings`` (:meth:`CertmqPlugin.run_health_checks` on demand). With
``metrics_port`` >= 0, Prometheus metrics (:mod:`broker_plugin.metrics`) are served on
``metrics_host:metrics_port``.

``echo: true`` replaces the CA by a fixed reply of ``echo_reply_bytes`` bytes per request, sent
through the same queue, batches and ``deliver_to``: the bare request/response baseline for the
benchmarks. This module knows amqtt's plugin interface and the service's public API; decisions
about certificates stay in the service.
"""

from __future__ import annotations

import asyncio
import gc
import contextlib
import dataclasses
import datetime as dt
import inspect
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from amqtt.broker import BrokerContext
from amqtt.plugins.base import BasePlugin
from cryptography import x509

from protocol.codec import decode, encode
from protocol.codes import ErrorCode, Profile, RevocationReason
from protocol.errors import CertmqError, DecodeError, TopicError
from protocol.extensions import CAPABILITIES_OID, REGION_OID, decode_capabilities, decode_region
from protocol.messages import Error, SnapshotRequest
from protocol.topics import PREFIX, ParsedTopic, TopicKind, parse_topic, response_topic_for
from protocol.topics import findings_topic

from . import acl
from .admission import AdmissionQueue
from .broker import ConnectionInfo, HardenedBroker
from .feeds_publisher import FeedPublisher, UnknownFeedList
from .health import FleetMonitor, HealthSettings, LiveSession
from .metrics import BrokerMetrics
from .ca import datadir as dd
from .ca.claims import load_claim_policy
from .ca.identity import NO_REGION, IdentityKind, NotAuthorized, Outcome, Outgoing
from .ca.signers import resolve_passphrase
from .store.base import CertificateRecord, StatusDelta

__all__ = ["CertmqPlugin", "DeltaCallback"]

log = logging.getLogger(__name__)

DeltaCallback = Callable[[Sequence[StatusDelta]], "Awaitable[None] | None"]
"""Receives every batch of revocation deltas (local and polled), in feed order per region."""

_SEEN_MARGIN = dt.timedelta(seconds=2)  # re-read this far back: another process's commit may lag its stamp
_POLL_SLICE = 1000  # revocations a poll handles between yields to the event loop
# A batch lingers for company only if the previous batch was taken this recently (requests flowing)
_LINGER_ONLY_WITHIN = 0.05
_HEALTH_STORM_RATE = 50.0  # requests/s taken by the CA above which a health report waits (a storm)
_HEALTH_DEFER_MAX = 600.0  # seconds a health report waits for a storm to end, at most
_HEALTH_QUIET = 30.0  # seconds below that rate before a held report runs


@dataclasses.dataclass(frozen=True, slots=True)
class _Request:
    client_id: str
    identity: acl.SessionIdentity
    parsed: ParsedTopic
    topic: str
    payload: bytes
    admitted: float = 0.0  # time.monotonic() at admission: the latency metric's start


def _request_id(payload: bytes) -> bytes | None:
    # Fast path for refusals under load: in the deterministic encoding every request starts
    # {0: 1, 1: type, 2: h'<16 bytes>' ...}, so the request id sits at a fixed offset.
    if len(payload) >= 23 and 0xA3 <= payload[0] <= 0xB7 and payload[1:4] == b"\x00\x01\x01" \
            and payload[4] in (1, 2, 4, 8) and payload[5:7] == b"\x02\x50":
        return bytes(payload[7:23])
    try:
        return getattr(decode(payload), "request_id", None)
    except (DecodeError, CertmqError, ValueError):
        return None


def _revocation_key(identity: Any) -> tuple[str, int] | None:
    """What a revocation names a session's certificate by: (tenant, serial)."""
    return (identity.tenant, identity.serial) if isinstance(identity, acl.SessionIdentity) else None


def _extensions(certificate: x509.Certificate) -> tuple[tuple[str, ...], str | None]:
    caps: tuple[str, ...] = ()
    region = None
    for ext in certificate.extensions:
        value = ext.value
        if not isinstance(value, x509.UnrecognizedExtension):
            continue
        try:
            if ext.oid.dotted_string == CAPABILITIES_OID:
                caps = decode_capabilities(value.value)
            elif ext.oid.dotted_string == REGION_OID:
                region = decode_region(value.value)
        except (DecodeError, CertmqError, ValueError):
            log.warning("certificate %x: unreadable certmq extension %s ignored", certificate.serial_number,
                        ext.oid.dotted_string)
    return caps, region


class CertmqPlugin(BasePlugin[BrokerContext]):
    """The certmq CA as an amqtt broker plugin (needs :class:`~broker_plugin.broker.HardenedBroker`).

    Construction (inside amqtt's ``Broker.__init__``) checks the config and opens the tenants' CA
    keys, so a wrong passphrase or data dir fails there; the registry and the signing workers
    start with the broker (``broker_pre_start``) and stop with it.
    """

    @dataclasses.dataclass
    class Config:
        """Plugin settings (amqtt ``plugins:`` section). Empty strings mean "not set"."""

        data_dir: str = ""  #: the CA data directory (default: $CERTMQ_DATA, else ./certmq-data)
        passphrase_env: str = ""  #: environment variable holding the CA key passphrase
        passphrase_file: str = ""  #: or a file (mode 0600) holding it
        workers: int = 1  #: signing worker processes
        queue_capacity: int = 2000  #: requests queued at most; beyond: BUSY
        batch_size: int = 64  #: requests per handle_many call
        batch_tasks: int = 0  #: concurrent batches (0: workers + 1)
        batch_linger: float = 0.005  #: seconds a short batch waits for more requests (0: none)
        busy_retry: float = 5.0  #: smallest BUSY retry_after base; adapts to the queue's drain time (admission.py)
        rate: float = 0.2  #: per-client requests per second (0: no limit)
        burst: int = 3  #: per-client burst
        revocation_poll: float = 0.25  #: seconds between registry checks for other processes' revocations
        publish_feeds: bool = True  #: publish signed revocation deltas and retained snapshots
        feed_window: float = 0.05  #: seconds a burst of deltas is coalesced for (<= 0.05)
        feed_snapshot_period: float = 300.0  #: seconds between periodic retained snapshot refreshes
        echo: bool = False  #: benchmark baseline: fixed reply, no CA work
        echo_reply_bytes: int = 1024
        metrics_port: int = -1  #: Prometheus exporter port (-1: off, 0: any free port)
        metrics_host: str = "127.0.0.1"  #: address the exporter listens on
        health_interval: float = 60.0  #: seconds between health checks published on ops/findings (0: none); a check due in a storm (> 50 requests/s) waits until 30 s after it, up to 10 min
        days_without_renewal: int = 30  #: the no-recent-renewal check's threshold
        session_flush: float = 1.0  #: seconds between batched writes of session rows
        node: str = ""  #: this broker's name in session rows and health reports (default: host name)
        #: seconds between gc.freeze() of the heap (0: leave the collector alone); see _gc_policy
        gc_freeze: float = 5.0
        #: seconds between full collections of the frozen heap too (bounds what a freeze keeps)
        gc_full: float = 900.0

    def __init__(self, context: BrokerContext) -> None:
        super().__init__(context)
        cfg: CertmqPlugin.Config = self.config
        problems = [
            text for bad, text in (
                (cfg.workers < 1, "workers must be >= 1"),
                (cfg.batch_size < 1, "batch_size must be >= 1"),
                (cfg.batch_tasks < 0, "batch_tasks must be >= 0"),
                (not 0 <= cfg.batch_linger <= 1, "batch_linger must be 0..1 seconds"),
                (cfg.revocation_poll <= 0, "revocation_poll must be > 0"),
                (cfg.echo_reply_bytes < 0, "echo_reply_bytes must be >= 0"),
                (not -1 <= cfg.metrics_port <= 65535, "metrics_port must be -1 (off) or 0..65535"),
                (cfg.health_interval < 0, "health_interval must be >= 0"),
                (cfg.days_without_renewal < 0, "days_without_renewal must be >= 0"),
                (cfg.session_flush <= 0, "session_flush must be > 0"),
                (cfg.gc_freeze < 0 or cfg.gc_full < 0, "gc_freeze and gc_full must be >= 0"),
                (bool(cfg.passphrase_env) and bool(cfg.passphrase_file), "give passphrase_env or passphrase_file, not both"),
            ) if bad
        ]
        if problems:
            raise ValueError("certmq plugin config: " + "; ".join(problems))
        self.broker = HardenedBroker.of(context)
        self.admission: AdmissionQueue[_Request] = AdmissionQueue(
            capacity=cfg.queue_capacity, busy_retry=cfg.busy_retry, rate=cfg.rate, burst=cfg.burst,
        )
        self.datadir = dd.resolve_datadir(cfg.data_dir or None)
        passphrase = self._passphrase(cfg)
        self._materials = dd.authority_material(self.datadir, passphrase=passphrase)
        if not self._materials:
            raise dd.DataDirError(f"no tenant in {self.datadir}: run `certmq ca init` (or `certmq broker`) first")
        self.authorities = {m.name: dd.authority_from_material(m) for m in self._materials}
        self.clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
        self.service: Any = None
        self.registry: Any = None
        self.signer: Any = None
        self.startup_error: BaseException | None = None
        self.stats = {"requests": 0, "batches": 0, "replies": 0, "kicked": 0, "deltas": 0}
        self._last_take = -1e9  # monotonic time the last batch was taken (batch_linger)
        self._echo = bytes(cfg.echo_reply_bytes)
        self._callbacks: list[DeltaCallback] = [self._publish_deltas] if cfg.publish_feeds else []
        self.feeds: FeedPublisher | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._sends: set[asyncio.Task[None]] = set()
        self._feed_lock = asyncio.Lock()
        self._feed_seq: dict[tuple[str, str], int] = {}
        self._snapshotted: set[tuple[str, str]] = set()
        self._watermark: dict[str, dt.datetime] = {}
        self._seen: dict[str, dict[int, dt.datetime]] = {t: {} for t in self.authorities}
        self.fleet: FleetMonitor | None = None
        self.metrics: BrokerMetrics | None = None
        if cfg.metrics_port >= 0:
            self.metrics = BrokerMetrics(
                queue_depth=lambda: len(self.admission), queue_capacity=lambda: self.admission.capacity,
                connections=self._connection_kinds, feed_sequences=lambda: self._feed_seq,
            )
        self.broker.identity_hook = self.identify
        self.broker.client_id_hook = self.client_id_matches
        self.broker.acl_hook = acl.allowed
        self.broker.kick_key = _revocation_key

    @staticmethod
    def _passphrase(cfg: CertmqPlugin.Config) -> bytes | None:
        if cfg.passphrase_env:
            return resolve_passphrase(env=cfg.passphrase_env)
        if cfg.passphrase_file:
            return resolve_passphrase(file=Path(cfg.passphrase_file))
        return None

    @classmethod
    def of(cls, broker: HardenedBroker) -> CertmqPlugin:
        """The certmq plugin loaded into ``broker`` (``LookupError`` if none)."""
        for plugin in broker.plugins_manager.plugins:
            if isinstance(plugin, cls):
                return plugin
        raise LookupError("no CertmqPlugin is loaded in this broker")

    # -- lifecycle ----------------------------------------------------------------------------

    async def on_broker_pre_start(self) -> None:
        """Open the registry and start the signing workers (errors: :attr:`startup_error`)."""
        try:
            from .ca.service import CAService

            self.registry = await dd.open_datadir_registry(self.datadir)
            if not self.config.echo:
                from .ca.pool import ProcessPoolSigner

                self.signer = await asyncio.to_thread(ProcessPoolSigner, self._materials, workers=self.config.workers)
            self.service = CAService(registry=self.registry, authorities=self.authorities,
                                     signer=self.signer or _NoSigner(), clock=self.clock, rng_bytes=os.urandom)
            start = self.clock().replace(microsecond=0)
            self._watermark = {t: start for t in self.authorities}
            if self.config.publish_feeds and not self.config.echo:
                self.feeds = FeedPublisher(
                    registry=self.registry, keys={t: a.key for t, a in self.authorities.items()},
                    publish=self._publish_feed, clock=self.clock, window=self.config.feed_window,
                    snapshot_period=self.config.feed_snapshot_period,
                )
            if not self.config.echo:
                self.fleet = FleetMonitor(
                    registry=self.registry, policies={t: a.policy for t, a in self.authorities.items()},
                    ca_certificates={t: {"issuing": a.issuing, "root": a.root} for t, a in self.authorities.items()},
                    node=self.config.node or socket.gethostname() or "certmq", clock=self.clock,
                    publish=self._publish_findings, live=self._live_sessions,
                    on_report=self.metrics.set_health if self.metrics is not None else None,
                    settings=HealthSettings(days_without_renewal=self.config.days_without_renewal),
                    # the plugin schedules the reports itself (_health_reports): not in a storm
                    interval=0, flush=self.config.session_flush,
                )
        except BaseException as exc:  # amqtt does not propagate plugin errors: keep it for the caller
            log.exception("certmq plugin could not start")
            self.startup_error = exc
            await self._close_backends()

    async def on_broker_post_start(self) -> None:
        """Publish the retained snapshots, start the batch workers and the revocation poller."""
        if self.service is None:
            return
        if self.feeds is not None:
            await self.feeds.start()
            for tenant, authority in self.authorities.items():
                await self._ensure_feed(tenant, authority.policy.default_region or NO_REGION)
                for region in {fl.region for fl in await self.registry.feed_lists(tenant)}:
                    await self._ensure_feed(tenant, region)
        if self.metrics is not None:
            try:
                await self.metrics.serve(self.config.metrics_host, self.config.metrics_port)
            except OSError as exc:
                log.error("metrics exporter could not listen on %s:%d: %s", self.config.metrics_host,
                          self.config.metrics_port, exc)
                self.startup_error = exc
        drains = self.config.batch_tasks or self.config.workers + 1
        self._tasks = [asyncio.create_task(self._drain(), name=f"certmq-batch-{i}") for i in range(drains)]
        self._tasks.append(asyncio.create_task(self._poll(), name="certmq-revocation-poll"))
        if self.fleet is not None:
            await self.fleet.start()
            if self.config.health_interval > 0:
                self._tasks.append(asyncio.create_task(self._health_reports(self.fleet), name="certmq-health"))
        if self.config.gc_freeze > 0:
            self._tasks.append(asyncio.create_task(self._gc_policy(), name="certmq-gc"))

    async def _health_reports(self, fleet: FleetMonitor) -> None:
        """The fleet health report every ``health_interval`` s (the first after at most 5 s), not in a storm.

        A report reads every certificate and session row of the tenant, a page at a time, and
        packs them for its assessment process on the event loop (a small tenant is assessed on
        the loop itself). Before the assessment moved out of the broker process, a report at
        ~50,000 certificates held the loop for 1-2 s during a storm, and every unrelated device's
        messages waited behind it (the storm bench's ping p99 went from ~40 ms to 0.3-1.2 s);
        the reading and packing still compete with a storm. So a report due while the CA takes
        more than ``_HEALTH_STORM_RATE``
        requests per second (10 s average: a storm, not a fleet's renewals) waits until the
        storm has been over for ``_HEALTH_QUIET`` s (its stragglers are still arriving before
        that), at most ``_HEALTH_DEFER_MAX`` s. The report's own cost is unchanged: this only
        keeps it out of the storm.
        """
        interval = self.config.health_interval
        await asyncio.sleep(min(interval, 5.0))
        while True:
            deferred = quiet = 0.0
            while quiet < _HEALTH_QUIET and deferred < _HEALTH_DEFER_MAX:
                if self.admission.taken_rate() > _HEALTH_STORM_RATE:
                    quiet = 0.0
                elif deferred == 0.0:
                    break  # no storm when the report fell due: run it now
                else:
                    quiet += 1.0
                await asyncio.sleep(1.0)
                deferred += 1.0
            try:
                await fleet.run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("fleet health report failed")
            await asyncio.sleep(interval)

    async def _gc_policy(self) -> None:
        """Keep CPython's full collections off the fan-out's critical path.

        A broker holds a large, long-lived heap (sessions, TLS connections, subscriptions): a
        full (generation 2) collection over it stalls the event loop for ~100-200 ms at 1,000
        connections, which was the p99 of revocation delivery. Every ``gc_freeze`` seconds the
        heap is moved to the permanent generation (``gc.freeze()``), so collections only walk
        what is new; every ``gc_full`` seconds it is unfrozen and collected once, so cyclic
        garbage kept alive by a freeze is bounded to one period.
        """
        gc.collect()
        gc.freeze()
        since_full = 0.0
        try:
            while True:
                await asyncio.sleep(self.config.gc_freeze)
                since_full += self.config.gc_freeze
                if self.config.gc_full and since_full >= self.config.gc_full:
                    gc.unfreeze()
                    gc.collect()
                    since_full = 0.0
                gc.freeze()
        finally:
            gc.unfreeze()

    async def on_broker_pre_shutdown(self) -> None:
        """Stop taking batches and polling."""
        await self._stop_tasks()

    async def _stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _close_backends(self) -> None:
        signer, registry = self.signer, self.registry
        self.signer = self.registry = None
        try:
            if signer is not None:
                await signer.close()
        finally:
            if registry is not None:
                await registry.close()

    async def close(self) -> None:
        """Stop the workers, wait briefly for replies in flight, close the pool and the registry."""
        await self._stop_tasks()
        if self.fleet is not None:
            await self.fleet.close()
        if self.metrics is not None:
            await self.metrics.close()
        if self.feeds is not None:
            await self.feeds.close()
        if self._sends:
            await asyncio.wait(list(self._sends), timeout=2)
        self.service = None
        await self._close_backends()

    # -- hooks --------------------------------------------------------------------------------

    async def identify(self, certificate: x509.Certificate) -> acl.SessionIdentity | None:
        """The broker's identity hook: a :class:`~broker_plugin.acl.SessionIdentity`, or ``None`` (refused)."""
        service = self.service
        if service is None:
            return None
        try:
            ident = await service.identify(certificate, allow_expired=True)
        except NotAuthorized as exc:
            log.info("connection refused: %s", exc)
            return None
        recovery = False
        if self.clock() > ident.not_after:
            if not await self._may_recover(ident):
                with contextlib.suppress(NotAuthorized):
                    await service.identify(certificate)  # raises, and audits the refusal
                return None
            recovery = True
        caps, region = _extensions(certificate)
        claim = await self._claim_scope(ident.tenant, ident.name) if ident.kind is IdentityKind.BOOTSTRAP else None
        if self.fleet is not None and self.fleet.is_live(ident.tenant, ident.serial):
            self.fleet.duplicate(tenant=ident.tenant, device_id=ident.name, serial=ident.serial,
                                 kind=str(ident.kind), client_id=ident.name, at=self.clock())
        if self.config.publish_feeds and ident.kind is not IdentityKind.BOOTSTRAP:
            key = (ident.tenant, region or NO_REGION)
            if key not in self._snapshotted:
                self._spawn(self._ensure_feed(*key))
        return acl.SessionIdentity(
            tenant=ident.tenant, kind=ident.kind, name=ident.name, serial=ident.serial, capabilities=caps,
            region=region, recovery_only=recovery, claim=claim, ca_identity=ident,
        )

    async def _may_recover(self, ident: Any) -> bool:
        if ident.kind is not IdentityKind.DEVICE:
            return False
        record = await self.registry.get_certificate(ident.tenant, ident.serial)
        try:
            window = self.authorities[ident.tenant].policy.profile(Profile.from_label(record.profile)).expired_recovery
        except (CertmqError, ValueError, KeyError, AttributeError):
            return False
        return bool(window) and self.clock() <= ident.not_after + window

    async def _claim_scope(self, tenant: str, claim_id: str) -> acl.ClaimScope | None:
        stored = await self.registry.get_claim(tenant, claim_id)
        if stored is None:
            return None
        try:
            policy = load_claim_policy(stored.policy)
        except CertmqError:
            return None
        ids = frozenset(policy.device_ids) if policy.device_ids is not None else None
        return acl.ClaimScope(device_ids=ids, pattern=policy.pattern)

    @staticmethod
    def client_id_matches(identity: Any, client_id: str) -> bool:
        """The client-id hook: the client id must be the identity's name (device, claim or operator id).

        A claim (bootstrap) credential serves a whole production line, so it may also connect under
        any device id its claim allows: devices enrolling side by side with one claim certificate
        then have sessions of their own instead of taking each other's over (and replies, which go
        to the requesting session, reach the right device). Session ownership still belongs to the
        certificate's principal, so this can never resume or take over an operational device's session.
        """
        if not isinstance(identity, acl.SessionIdentity):
            return False
        if client_id == identity.name:
            return True
        return identity.kind is IdentityKind.BOOTSTRAP and identity.claim is not None and identity.claim.allows(client_id)

    # -- requests -----------------------------------------------------------------------------

    async def on_broker_message_broadcast(self, *, client_id: str, message: Any) -> None:
        """amqtt event for a publish the ACL let through: request topics go to the admission queue."""
        topic = getattr(message, "topic", None)
        if not topic or not topic.startswith(PREFIX + "/") or self.service is None:
            return
        try:
            parsed = parse_topic(topic)
        except TopicError:
            return
        if not parsed.kind.is_request:
            return
        identity = self.broker.identity_of(client_id)
        if not isinstance(identity, acl.SessionIdentity):
            return
        self.submit(client_id, identity, parsed, bytes(message.data or b""))

    def submit(self, client_id: str, identity: acl.SessionIdentity, parsed: ParsedTopic, payload: bytes) -> None:
        """Queue one request (or answer BUSY / RATE_LIMITED at once)."""
        self.stats["requests"] += 1
        # This connection's backlog is the CA's load: it takes ingress turns, other traffic goes first.
        self.broker.mark_bulk(client_id)
        # A claim credential serves a whole production line: limit it per claimed device id.
        key = (identity.principal, parsed.device_id) if identity.kind is IdentityKind.BOOTSTRAP else identity.principal
        request = _Request(client_id, identity, parsed, parsed.topic, payload, time.monotonic())
        refusal = self.admission.offer(key, request)
        if refusal is not None:
            error = Error(code=refusal.code, text=refusal.text, request_id=_request_id(payload),
                          retry_after=refusal.retry_after)
            reply = encode(error)
            if self.metrics is not None:
                self.metrics.observe_reply(tenant=identity.tenant, request=payload, reply=reply, latency=0.0)
            # A storm's refusals must cost the event loop next to nothing, or they delay everyone
            # else's traffic: written now at QoS 0 (no task, no PUBACK wait). A refusal lost with a
            # dropped connection is harmless: the device retries with the same request id.
            topic = response_topic_for(parsed)
            sent = self.broker.deliver_now(client_id, topic, reply)
            if sent is None:
                self._send(client_id, topic, reply)
            elif sent:
                self.stats["replies"] += 1

    async def _drain(self) -> None:
        while True:
            batch = await self.admission.take(self.config.batch_size)
            now = time.monotonic()
            busy = now - self._last_take < _LINGER_ONLY_WITHIN
            self._last_take = now
            if busy and len(batch) < self.config.batch_size and self.config.batch_linger > 0:
                # Requests trickling in (retries spread by retry-after) would otherwise go one or
                # two per batch, each paying the registry's two transactions and a worker round
                # trip: wait a moment for company. Costs at most batch_linger of latency, and only
                # while requests are flowing: a lone request (an operator's revocation on a quiet
                # broker, whose delta 1,000 subscribers wait for) goes at once.
                await asyncio.sleep(self.config.batch_linger)
                batch += self.admission.take_nowait(self.config.batch_size - len(batch))
            batch = self._take_snapshot_requests(batch)
            if not batch:
                continue
            self.stats["batches"] += 1
            try:
                outcomes = await self._handle(batch)
            except Exception:  # never lose a request silently: each gets a transient error
                log.exception("a batch of %d requests failed", len(batch))
                outcomes = [self._internal_error(r) for r in batch]
            for request, outcome in zip(batch, outcomes):
                for out in outcome.replies:
                    self._send(request.client_id, out.topic, out.payload)
                if self.metrics is not None:
                    self.metrics.observe_reply(
                        tenant=request.identity.tenant, request=request.payload,
                        reply=outcome.replies[0].payload if outcome.replies else None,
                        latency=time.monotonic() - request.admitted)
                if outcome.revoked or outcome.deltas:
                    await self._revoked(outcome.revoked, outcome.deltas,
                                        f"certificate revoked by {request.identity.principal}")

    # A version-1 SnapshotRequest starts with these bytes (deterministic CBOR: map header, then
    # keys 0 and 1 in order): a cheap sniff before decoding, so other requests are decoded once.
    _SNAPSHOT_REQUEST_HEAD = bytes((0x00, 0x01, 0x01, 0x08))

    def _take_snapshot_requests(self, batch: list[_Request]) -> list[_Request]:
        """Answer the batch's SnapshotRequests from the feed publisher (each in its own task: a
        reply may wait for a snapshot refresh); the rest go to the service."""
        if self.feeds is None:
            return batch
        rest = []
        for request in batch:
            message = self._feed_snapshot_request(request)
            if message is None:
                rest.append(request)
            else:
                self._spawn(self._answer_snapshot_request(request, message))
        return rest

    def _feed_snapshot_request(self, request: _Request) -> SnapshotRequest | None:
        # Only a request the service would accept; anything else (a claim credential, another
        # tenant's topic, an expired certificate) goes to the service, which refuses and audits it.
        ident, parsed = request.identity, request.parsed
        if request.payload[1:5] != self._SNAPSHOT_REQUEST_HEAD or ident.recovery_only or parsed.tenant != ident.tenant:
            return None
        if not ((ident.kind is IdentityKind.DEVICE and parsed.kind is TopicKind.DEVICE_REQUEST
                 and parsed.device_id == ident.name)
                or (ident.kind is IdentityKind.OPERATOR and parsed.kind is TopicKind.OPERATOR_REQUEST
                    and parsed.operator_id == ident.name)):
            return None
        ca = ident.ca_identity
        if ca is not None and not ca.not_before <= self.clock() <= ca.not_after:
            return None
        try:
            message = decode(request.payload)
        except (DecodeError, CertmqError, ValueError):
            return None
        return message if isinstance(message, SnapshotRequest) else None

    async def _answer_snapshot_request(self, request: _Request, message: SnapshotRequest) -> None:
        topic = response_topic_for(request.parsed)
        try:
            replies = await self.snapshot_replies(request.identity, message.list_id)
        except UnknownFeedList as exc:
            replies = [encode(Error(code=ErrorCode.UNKNOWN_CERTIFICATE, text=str(exc)[:256],
                                    request_id=message.request_id))]
        except Exception:  # never lose a request silently
            log.exception("SnapshotRequest of %s failed", request.identity.principal)
            replies = [encode(Error(code=ErrorCode.INTERNAL, text="internal error; retry later",
                                    request_id=message.request_id, retry_after=1))]
        if self.metrics is not None:
            self.metrics.observe_reply(tenant=request.identity.tenant, request=request.payload, reply=replies[0],
                                       latency=time.monotonic() - request.admitted)
        for payload in replies:
            self._send(request.client_id, topic, payload)

    async def snapshot_replies(self, identity: acl.SessionIdentity, list_id: int | None = None) -> list[bytes]:
        """The replies to ``identity``'s SnapshotRequest: signed snapshots of its region's list
        ``list_id`` (``None``: all its region's lists). The region is the certificate's region
        extension, else the registry's record of the certificate, else the region-less feed.
        Raises :class:`~broker_plugin.feeds_publisher.UnknownFeedList` (answered UNKNOWN_CERTIFICATE)."""
        if self.feeds is None:
            raise RuntimeError("signed feeds are off (publish_feeds: false)")
        region = identity.region
        if region is None:
            record = await self.registry.get_certificate(identity.tenant, identity.serial)
            region = record.region if record is not None and record.region else NO_REGION
        return await self.feeds.signed_snapshots(identity.tenant, region, list_id)

    async def _handle(self, batch: list[_Request]) -> list[Outcome]:
        if self.config.echo:
            return [Outcome(replies=(Outgoing(response_topic_for(r.parsed), self._echo),)) for r in batch]
        return list(await self.service.handle_many([(r.identity.ca_identity, r.topic, r.payload) for r in batch]))

    @staticmethod
    def _internal_error(request: _Request) -> Outcome:
        error = Error(code=ErrorCode.INTERNAL, text="internal error; retry later",
                      request_id=_request_id(request.payload), retry_after=1)
        return Outcome(replies=(Outgoing(response_topic_for(request.parsed), encode(error)),))

    def _send(self, client_id: str, topic: str, payload: bytes) -> None:
        self._spawn(self._deliver(client_id, topic, payload), track=self._sends)

    async def _deliver(self, client_id: str, topic: str, payload: bytes) -> None:
        try:
            if await self.broker.deliver_to(client_id, topic, payload, qos=1):
                self.stats["replies"] += 1
            else:
                log.info("reply for %s dropped: not connected", client_id)
        except Exception as exc:  # a client that does not acknowledge must not hurt anyone else
            log.info("reply to %s on %s failed: %r", client_id, topic, exc)

    def _spawn(self, coro: Awaitable[None], *, track: set[asyncio.Task[None]] | None = None) -> None:
        tasks = self._sends if track is None else track
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    # -- fleet health and metrics -------------------------------------------------------------

    async def on_broker_client_connected(self, *, client_id: str, client_session: Any = None) -> None:
        """amqtt event: record the session (batched into the registry by the fleet monitor)."""
        identity = self.broker.identity_of(client_id)
        if self.fleet is None or not isinstance(identity, acl.SessionIdentity):
            return
        host, port = getattr(client_session, "remote_address", None), getattr(client_session, "remote_port", None)
        self.fleet.connected(tenant=identity.tenant, device_id=identity.name, serial=identity.serial,
                             kind=str(identity.kind), client_id=client_id,
                             remote=f"{host}:{port}" if host else None, at=self.clock())

    async def on_broker_client_disconnected(self, *, client_id: str, client_session: Any = None) -> None:
        """amqtt event: the session ended."""
        if self.fleet is not None:
            self.fleet.disconnected(client_id=client_id, at=self.clock())

    async def run_health_checks(self, tenant: str | None = None) -> list[Any]:
        """Assess ``tenant`` (default: all) now and publish the findings; the :class:`~broker_plugin.health.FleetHealth` reports."""
        if self.fleet is None:
            raise RuntimeError("fleet health is not running (plugin not started, or echo mode)")
        return await self.fleet.run(tenant)

    async def _publish_findings(self, tenant: str, payload: bytes) -> None:
        await self._publish_feed(findings_topic(tenant), payload, True)

    def _live_sessions(self) -> list[LiveSession]:
        out = []
        for conn in self.broker.connections():
            ident = conn.identity
            if isinstance(ident, acl.SessionIdentity):
                out.append(LiveSession(tenant=ident.tenant, device_id=ident.name, serial=ident.serial,
                                       client_id=conn.client_id, kind=str(ident.kind),
                                       remote=f"{conn.remote[0]}:{conn.remote[1]}"))
        return out

    def _connection_kinds(self) -> list[tuple[str, str]]:
        return [(c.identity.tenant, str(c.identity.kind)) for c in self.broker.connections()
                if isinstance(c.identity, acl.SessionIdentity)]

    # -- revocation: kicks and feeds -------------------------------------------------------

    async def revoke(self, *, tenant: str, reason: RevocationReason, actor: str, serial: int | None = None,
                     device_id: str | None = None, profile: Profile | None = None) -> Outcome:
        """Revoke through the service (:meth:`CAService.revoke`) and kick the revoked sessions at once."""
        if self.service is None:
            raise RuntimeError("the certmq plugin is not running")
        outcome = await self.service.revoke(tenant=tenant, reason=reason, actor=actor, serial=serial,
                                            device_id=device_id, profile=profile)
        await self._revoked(outcome.revoked, outcome.deltas, f"certificate revoked by {actor}")
        return outcome

    def on_deltas(self, callback: DeltaCallback) -> None:
        """Add ``callback``: it gets every batch of revocation deltas, from this process or polled."""
        self._callbacks.append(callback)

    async def _revoked(self, records: Iterable[CertificateRecord], deltas: Sequence[StatusDelta], why: str) -> None:
        records = list(records)
        for record in records:
            self._seen.setdefault(record.tenant, {})[record.serial] = record.revoked_at or self.clock()
        if self.metrics is not None:
            for record in records:
                self.metrics.observe_revoked(record.tenant, [record.profile])
        await self._kick({(r.tenant, r.serial) for r in records}, why)
        if deltas:
            async with self._feed_lock:
                fresh = []
                for delta in deltas:
                    key = (delta.tenant, delta.region)
                    if delta.to_seq > self._feed_seq.get(key, -1):
                        self._feed_seq[key] = delta.to_seq
                        fresh.append(delta)
                await self._emit(fresh)

    async def _kick(self, serials: set[tuple[str, int]], why: str) -> None:
        if not serials:
            return

        def revoked(conn: ConnectionInfo) -> bool:
            return _revocation_key(conn.identity) in serials

        kicked = await self.broker.kick(revoked, why, keys=serials)
        self.stats["kicked"] += len(kicked)
        if self.metrics is not None:
            self.metrics.observe_kicked(len(kicked))

    async def _emit(self, deltas: Sequence[StatusDelta]) -> None:
        if not deltas:
            return
        self.stats["deltas"] += len(deltas)
        for callback in list(self._callbacks):
            try:
                result = callback(deltas)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("revocation delta callback %r failed", callback)

    def _publish_deltas(self, deltas: Sequence[StatusDelta]) -> None:
        if self.feeds is not None:
            self.feeds.on_deltas(deltas)

    async def _publish_feed(self, topic: str, payload: bytes, retain: bool) -> None:
        if retain:
            await self.context.retain_message(topic, payload, qos=1)
        await self.context.broadcast_message(topic, payload, qos=1)

    async def _ensure_feed(self, tenant: str, region: str) -> None:
        """Start tracking a feed's sequence and have its lists' retained snapshots published.

        Called at start and when a session of a feed without a snapshot connects (its status list
        may have been created since).
        """
        key = (tenant, region)
        async with self._feed_lock:
            if key in self._snapshotted or self.service is None:
                return
            lists = await self.registry.feed_lists(tenant, region)
            sequence = max((fl.feed_sequence for fl in lists), default=0)
            self._feed_seq[key] = max(self._feed_seq.get(key, 0), sequence)
            if lists:
                self._snapshotted.add(key)
        if lists and self.feeds is not None:
            await self.feeds.ensure(tenant, region)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.revocation_poll)
            try:
                await self.poll_revocations()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("revocation poll failed")

    async def poll_revocations(self) -> int:
        """One registry check for revocations made elsewhere: kick, and feed their deltas. New serials found."""
        found = 0
        for tenant in self.authorities:
            seen = self._seen.setdefault(tenant, {})
            mark = self._watermark.get(tenant) or self.clock().replace(microsecond=0)
            # One read gives serials and regions (no lookup per serial: a mass revocation by another
            # process is thousands per poll); the work is done in slices so the loop keeps serving.
            entries = await self.registry.revocations_since(tenant, since=mark - _SEEN_MARGIN)
            new = []
            for i, entry in enumerate(entries):
                if entry.serial not in seen:
                    new.append(entry)
                seen[entry.serial] = entry.revoked_at
                mark = max(mark, entry.revoked_at)
                if i % _POLL_SLICE == _POLL_SLICE - 1:
                    await asyncio.sleep(0)
            self._watermark[tenant] = mark
            for serial in [s for s, at in seen.items() if at < mark - 2 * _SEEN_MARGIN]:
                del seen[serial]
            if not new:
                continue
            found += len(new)
            started = time.monotonic()
            for i in range(0, len(new), _POLL_SLICE):
                await self._kick({(tenant, e.serial) for e in new[i:i + _POLL_SLICE]}, "certificate revoked (registry)")
                await asyncio.sleep(0)
            regions = {e.region for e in new}
            for region in sorted(regions):
                await self._catch_up(tenant, region)
            log.info("%d revocation(s) of tenant %s picked up from the registry in %.3f s", len(new), tenant,
                     time.monotonic() - started)
        return found

    async def _catch_up(self, tenant: str, region: str) -> None:
        if (tenant, region) not in self._feed_seq:
            await self._ensure_feed(tenant, region)  # a fresh snapshot already holds these revocations
            return
        async with self._feed_lock:
            since = self._feed_seq[(tenant, region)]
            deltas = [d for d in await self.registry.deltas_since(tenant, region, since) if d.to_seq > since]
            if deltas:
                self._feed_seq[(tenant, region)] = max(d.to_seq for d in deltas)
                await self._emit(deltas)


class _NoSigner:
    """The echo baseline signs nothing."""

    async def sign(self, jobs: Sequence[Any]) -> list[Any]:
        """Never called: echo mode does not reach the service's request handling."""
        raise RuntimeError("echo mode: no signing backend")

    async def close(self) -> None:
        """Nothing to release."""
