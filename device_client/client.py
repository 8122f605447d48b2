"""The device client: enrollment from a bootstrap certificate, renewal, status.

::

    async with DeviceClient(device_id="sensor-0042", tenant="acme", transport=t,
                            store=store, keystore=keys, ca_bundle=ca_certs,
                            bootstrap=BootstrapCredentials(cert_path=..., key_path=...)) as dc:
        await dc.enroll()
        await dc.renew(Profile.IDENTITY)
        print(dc.status())

Requests follow ``docs/wire-format.md`` section 7: a request is recorded in
the store (:class:`~device_client.certstore.PendingRequest`) *before* it is
sent, and every retry -- after a timeout, a transient Error, a lost
connection or a restart of the process -- re-sends the same request id and
the same CSR, so the CA never issues twice. Transient errors wait
``retry_after`` (when given) plus full jitter (:func:`protocol.renewal.next_attempt`).

Only identity certificates authenticate the MQTT connection, so only they are
*proven* by reconnecting before they become current; certificates of the other
profiles are committed once validated.

Clock, sleep, randomness and request ids are injectable, so tests run in
virtual time. This module knows no MQTT library: it talks to a
:class:`~device_client.transport.Transport`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography import x509

from protocol import codec, extensions, feedsig, topics
from protocol.codes import ErrorCode, Profile
from protocol.errors import CertmqError, DecodeError, RequestRejected
from protocol.messages import (
    CertificateIssued,
    CertificateRequest,
    Error,
    Message,
    ProvisioningParameters,
    RenewalRequest,
    RevocationSnapshot,
    SnapshotRequest,
)
from protocol.renewal import DEFAULT_POLICY, RandomSource, RenewalPolicy, next_attempt, renewal_time

from .certstore import CertStore, PendingRequest, RotationRejected, Slot
from .enroll import DEFAULT_BOOTSTRAP_MARGIN, build_csr, check_bootstrap, load_certificates
from .files import destroy_file
from .keystore import KeyStore
from .transport import ClientCredentials, ConnectionRefused, IncomingMessage, NotConnected, Transport, TransportError

__all__ = [
    "BootstrapCredentials",
    "DeviceClient",
    "Event",
    "NoReply",
    "NotEnrolled",
    "ProfileStatus",
    "RecoveryWindowPassed",
]

log = logging.getLogger("certmq.device")


class NoReply(TransportError):
    """No reply to a request within the reply timeout (the request may still be answered later)."""


class NotEnrolled(CertmqError):
    """The operation needs a current certificate the store does not have."""


class RecoveryWindowPassed(CertmqError):
    """The certificate expired longer ago than the recovery window allows: provision again."""


@dataclass(frozen=True, kw_only=True)
class BootstrapCredentials:
    """The claim certificate used once, to provision: a PEM file plus its key in a file or the key store."""

    cert_path: Path
    key_path: Path | None = None
    key_label: str | None = None

    def __post_init__(self) -> None:
        if (self.key_path is None) == (self.key_label is None):
            raise ValueError("give exactly one of key_path (a PEM file) and key_label (in the key store)")


@dataclass(frozen=True, kw_only=True)
class Event:
    """Something the client or agent did: ``kind`` is e.g. ``issued``, ``promoted``, ``rejected``, ``retry``."""

    kind: str
    profile: Profile | None
    time: datetime
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class ProfileStatus:
    """Where one profile stands."""

    profile: Profile
    serial: int | None
    not_after: datetime | None
    days_to_expiry: float | None
    renew_at: datetime | None
    next_attempt: datetime | None
    last_error: str | None
    failures: int
    pending_request_id: str | None
    staged: bool


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class DeviceClient:
    """A device's certmq session over a :class:`~device_client.transport.Transport` (see module doc).

    ``ca_bundle``: the tenant CA certificates issued certificates must chain to
    (objects, or a PEM file path). ``recovery_window``: how long after expiry the
    device still asks for a renewal (keeping its key); match the tenant
    policy's ``expired_recovery``. ``policies``: the renewal window per profile
    (the server's suggestion overrides it).
    """

    def __init__(
        self,
        *,
        device_id: str,
        tenant: str,
        transport: Transport,
        store: CertStore,
        keystore: KeyStore | None = None,
        ca_bundle: Sequence[x509.Certificate] | str | os.PathLike[str] | None = None,
        bootstrap: BootstrapCredentials | None = None,
        region: str | None = None,
        key_type: str = "p256",
        bootstrap_margin: timedelta = DEFAULT_BOOTSTRAP_MARGIN,
        destroy_bootstrap: bool = True,
        recovery_window: timedelta = timedelta(0),
        policies: dict[Profile, RenewalPolicy] | None = None,
        reply_timeout: float = 30.0,
        max_attempts: int = 5,
        connect_on_enter: bool = True,
        clock: Callable[[], datetime] = _utcnow,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: RandomSource | None = None,
        token_bytes: Callable[[int], bytes] = os.urandom,
        on_event: Callable[[Event], None] | None = None,
        on_message: Callable[[IncomingMessage], None] | None = None,
    ) -> None:
        self.device_id = topics.validate_identifier(device_id, what="device id")
        self.tenant = topics.validate_identifier(tenant, what="tenant")
        self.transport = transport
        self.store = store
        self.keystore = keystore if keystore is not None else store.keystore
        if ca_bundle is None:
            self.ca_bundle = tuple(store.trust)
        elif isinstance(ca_bundle, (str, os.PathLike)):
            self.ca_bundle = tuple(load_certificates(Path(ca_bundle).read_bytes()))
        else:
            self.ca_bundle = tuple(ca_bundle)
        if not self.ca_bundle:
            raise ValueError("ca_bundle is empty: issued certificates could not be validated")
        self.bootstrap = bootstrap
        self.region = region
        self.key_type = key_type
        self.bootstrap_margin = bootstrap_margin
        self.destroy_bootstrap = destroy_bootstrap
        self.recovery_window = recovery_window
        self.policies = dict(policies or {})
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.reply_timeout = reply_timeout
        self.max_attempts = max_attempts
        self.connect_on_enter = connect_on_enter
        self.clock = clock
        self.sleep = sleep
        self.rng: RandomSource = rng if rng is not None else random.SystemRandom()
        self.token_bytes = token_bytes
        self.on_event = on_event
        self.on_message = on_message
        self.connected_as: str | None = None  #: "bootstrap", or the profile label of the slot in use
        self._waiters: dict[bytes, asyncio.Future[Message]] = {}
        # A snapshot reply carries no request id: it is matched by list id (None: the first one)
        self._snapshot_waiters: list[tuple[int | None, asyncio.Future[bytes | Message]]] = []
        self._reader: asyncio.Task[None] | None = None
        self._generation = 0
        self._subscriptions: list[str] = []
        self.next_attempts: dict[Profile, datetime] = {}
        self.last_errors: dict[Profile, str] = {}
        self.failures: dict[Profile, int] = {}

    # -- context ---------------------------------------------------------------------

    async def __aenter__(self) -> DeviceClient:
        if self.connect_on_enter and (self.store.current(Profile.IDENTITY) or self.store.next(Profile.IDENTITY)):
            await self.ensure_connected()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Disconnect and stop reading."""
        self._generation += 1
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        await self.transport.disconnect()
        self.connected_as = None

    def emit(self, kind: str, profile: Profile | None, detail: str = "") -> None:
        """Log an event and pass it to ``on_event``."""
        event = Event(kind=kind, profile=profile, time=self.clock(), detail=detail)
        log.info("%s %s %s", kind, profile.label if profile else "-", detail)
        if self.on_event is not None:
            self.on_event(event)

    # -- connections -----------------------------------------------------------------

    def credentials_for(self, slot: Slot) -> ClientCredentials:
        """TLS credentials for connecting with ``slot``'s certificate."""
        key_path = None
        path_of = getattr(self.keystore, "path", None)
        if callable(path_of):
            key_path = path_of(slot.key_label)
        return ClientCredentials(
            client_id=self.device_id, certificate=slot.certificate, chain=slot.chain,
            private_key=self.store.key(slot), cert_path=slot.chain_path, key_path=key_path,
            ca_certificates=self.ca_bundle,
        )

    def _bootstrap_credentials(self) -> tuple[ClientCredentials, x509.Certificate]:
        assert self.bootstrap is not None
        cert = load_certificates(Path(self.bootstrap.cert_path).read_bytes())[0]
        if self.bootstrap.key_label is not None:
            key = self.keystore.load(self.bootstrap.key_label)
        else:
            from cryptography.hazmat.primitives.serialization import load_pem_private_key

            assert self.bootstrap.key_path is not None
            key = load_pem_private_key(Path(self.bootstrap.key_path).read_bytes(), password=None)
        # The broker binds the MQTT client id to the certificate; a claim certificate may also use
        # any device id its claim allows. Using our own device id keeps devices that share one claim
        # certificate on a production line from taking over each other's session.
        client_id = self.device_id
        creds = ClientCredentials(
            client_id=client_id, certificate=cert, private_key=key,
            cert_path=Path(self.bootstrap.cert_path), key_path=self.bootstrap.key_path,
            ca_certificates=self.ca_bundle, clean_session=True,
        )
        return creds, cert

    async def _connect(self, credentials: ClientCredentials, response_topic: str, as_what: str) -> None:
        self._generation += 1
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self.connected_as = None
        await self.transport.connect(credentials)
        await self.transport.subscribe(response_topic)
        for extra in self._subscriptions:
            await self.transport.subscribe(extra)
        self.connected_as = as_what
        self._reader = asyncio.get_running_loop().create_task(self._read(self._generation))

    async def subscribe(self, topic_filter: str) -> None:
        """Subscribe to an extra topic filter (kept across reconnects); messages go to ``on_message``."""
        if topic_filter not in self._subscriptions:
            self._subscriptions.append(topic_filter)
        if self.connected_as is not None:
            await self.transport.subscribe(topic_filter)

    async def _connect_slot(self, slot: Slot) -> None:
        await self._connect(self.credentials_for(slot), topics.device_response_topic(self.tenant, self.device_id),
                            slot.profile.label)

    async def ensure_connected(self) -> None:
        """Connect with the current identity certificate, proving a staged one first if there is one."""
        if self.connected_as is not None and self.connected_as != "bootstrap":
            return
        if self.store.next(Profile.IDENTITY) is not None:
            await self._promote(Profile.IDENTITY)
            return
        current = self.store.current(Profile.IDENTITY)
        if current is None:
            raise NotEnrolled(f"device {self.device_id!r} has no identity certificate: enroll first")
        await self._connect_slot(current)

    async def _read(self, generation: int) -> None:
        try:
            async for incoming in self.transport.messages():
                if generation != self._generation:
                    return
                self._dispatch(incoming)
        except TransportError as exc:
            if generation == self._generation:
                self.connected_as = None
                pending: list[asyncio.Future[Any]] = [*self._waiters.values()]
                pending += [f for _, f in self._snapshot_waiters]
                for fut in pending:
                    if not fut.done():
                        fut.set_exception(TransportError(f"connection lost while waiting for a reply: {exc}"))

    def _dispatch(self, incoming: IncomingMessage) -> None:
        parsed = None
        with contextlib.suppress(CertmqError):
            parsed = topics.parse_topic(incoming.topic)
        if parsed is not None and parsed.kind.name == "DEVICE_RESPONSE" and incoming.payload[:1] == b"\x84":
            # A COSE_Sign1 array, not a certmq message map: the signed snapshot answering a
            # SnapshotRequest (wire format section 7). Its signature is the caller's to check.
            if self._snapshot_reply(incoming.payload):
                return
        elif parsed is not None and parsed.kind.name in ("DEVICE_RESPONSE", "PROVISIONING_RESPONSE"):
            try:
                message = codec.decode(incoming.payload)
            except DecodeError as exc:
                log.warning("undecodable reply on %s: %s", incoming.topic, exc)
                return
            request_id = getattr(message, "request_id", None)
            fut = self._waiters.get(request_id) if request_id is not None else None
            if fut is not None and not fut.done() and isinstance(message, (CertificateIssued, Error)):
                fut.set_result(message)
                return
            if isinstance(message, RevocationSnapshot) and parsed.kind.name == "DEVICE_RESPONSE":
                if self._match_snapshot(message.list_id, message):
                    return
        if self.on_message is not None:
            try:
                self.on_message(incoming)
            except Exception:  # a bad feed message must not stop the reader (and with it every reply)
                log.exception("on_message failed for %s", incoming.topic)

    def _snapshot_reply(self, payload: bytes) -> bool:
        try:
            inner = codec.decode(feedsig.decode_signed(payload).payload)
        except (DecodeError, CertmqError) as exc:
            log.warning("unreadable signed reply dropped: %s", exc)
            return True
        if not isinstance(inner, RevocationSnapshot):
            log.warning("a signed %s on the reply topic dropped", type(inner).__name__)
            return True
        return self._match_snapshot(inner.list_id, payload)

    def _match_snapshot(self, list_id: int, reply: bytes | Message) -> bool:
        for wanted, fut in self._snapshot_waiters:
            if not fut.done() and wanted in (None, list_id):
                fut.set_result(reply)
                return True
        return False

    def own_status_list(self) -> int | None:
        """The status list id of the current identity certificate (its status-position extension), or None."""
        slot = self.store.current(Profile.IDENTITY)
        if slot is None:
            return None
        for ext in slot.certificate.extensions:
            if ext.oid.dotted_string == extensions.STATUS_POSITION_OID and isinstance(ext.value, x509.UnrecognizedExtension):
                with contextlib.suppress(DecodeError, CertmqError):
                    return extensions.decode_status_position(ext.value.value)[0]
        return None

    # -- one request -----------------------------------------------------------------

    async def _send_once(self, topic: str, message: CertificateRequest | RenewalRequest) -> CertificateIssued:
        """Publish once and wait for the reply; raise RequestRejected / NoReply / TransportError."""
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiters[message.request_id] = fut
        try:
            if self.connected_as is None:
                raise NotConnected("not connected")
            await self.transport.publish(topic, codec.encode(message))
            try:
                reply = await asyncio.wait_for(asyncio.shield(fut), self.reply_timeout)
            except asyncio.TimeoutError:
                raise NoReply(f"no reply within {self.reply_timeout} s") from None
        finally:
            self._waiters.pop(message.request_id, None)
        if isinstance(reply, Error):
            raise RequestRejected(reply.code, reply.text, retry_after=reply.retry_after)
        assert isinstance(reply, CertificateIssued)
        return reply

    async def request_snapshot(self, list_id: int | None = None) -> bytes | RevocationSnapshot:
        """Ask the CA for the current snapshot of status list ``list_id`` of this device's region
        (default: the list of its identity certificate's status position).

        Sends a SnapshotRequest on the device's request topic, authenticated by its identity
        certificate, and returns the reply from its reply topic: the **signed** snapshot (the
        COSE_Sign1 bytes, exactly the retained feed message; check it with the feed verifier, e.g.
        :meth:`RevocationCache.handle_snapshot_reply`), or a decoded, unsigned
        :class:`RevocationSnapshot` from a CA that does not sign its replies (only a
        ``trust_broker_acl`` cache takes that). Raises ``RequestRejected`` for an Error reply,
        ``NoReply`` after ``reply_timeout``. One attempt: the caller (e.g.
        :func:`device_client.feed.follow_feed`) decides about retrying.
        """
        if list_id is None:
            list_id = self.own_status_list()  # one list, one reply (without a list id: one per list)
        request = SnapshotRequest(request_id=self.token_bytes(16), list_id=list_id)
        await self.ensure_connected()
        loop = asyncio.get_running_loop()
        snap: asyncio.Future[bytes | Message] = loop.create_future()
        waiter = (list_id, snap)
        self._snapshot_waiters.append(waiter)
        error: asyncio.Future[bytes | Message] = loop.create_future()
        self._waiters[request.request_id] = error  # type: ignore[assignment]  # only ever set with a Message
        try:
            await self.transport.publish(topics.device_request_topic(self.tenant, self.device_id), codec.encode(request))
            done, _ = await asyncio.wait({snap, error}, timeout=self.reply_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise NoReply(f"no snapshot within {self.reply_timeout} s")
            reply = next(iter(done)).result()
        finally:
            self._waiters.pop(request.request_id, None)
            self._snapshot_waiters.remove(waiter)
            for fut in (snap, error):
                if not fut.done():
                    fut.cancel()
        if isinstance(reply, Error):
            raise RequestRejected(reply.code, reply.text, retry_after=reply.retry_after)
        assert isinstance(reply, (bytes, RevocationSnapshot))
        return reply

    async def _with_retries(self, profile: Profile, attempt: Callable[[], Awaitable[CertificateIssued]],
                            reconnect: Callable[[], Awaitable[None]]) -> CertificateIssued:
        failures = 0
        while True:
            try:
                reply = await attempt()
            except RequestRejected as exc:
                transient = isinstance(exc.code, ErrorCode) and exc.code.transient or (
                    not isinstance(exc.code, ErrorCode) and 30 <= exc.code < 50)
                if not transient:
                    self.last_errors[profile] = str(exc)
                    raise
                error: Exception = exc
            except ConnectionRefused:
                raise
            except TransportError as exc:
                error = exc
            else:
                self.failures.pop(profile, None)
                self.last_errors.pop(profile, None)
                return reply
            failures += 1
            self.failures[profile] = failures
            self.last_errors[profile] = str(error)
            if failures >= self.max_attempts:
                raise error
            retry_after = getattr(error, "retry_after", None)
            now = self.clock()
            when = next_attempt(now=now, failures=failures, rng=self.rng,
                                retry_after=None if retry_after is None else timedelta(seconds=retry_after))
            self.next_attempts[profile] = when
            self.emit("retry", profile, f"attempt {failures} failed ({error}); next at {when.isoformat()}")
            await self.sleep((when - now).total_seconds())
            if self.connected_as is None:
                with contextlib.suppress(TransportError):
                    await reconnect()

    # -- enrollment ------------------------------------------------------------------

    async def enroll(self, profile: Profile = Profile.IDENTITY) -> Slot:
        """Provision ``profile`` with the bootstrap certificate (see module doc); returns the current slot.

        For another profile of an already enrolled device the request goes on the
        device's own topic, authenticated by its identity certificate.

        Already enrolled: returns the current slot and sends nothing. Raises
        :class:`~device_client.enroll.BootstrapExpiring` before generating
        anything when the bootstrap certificate is too close to expiry.
        """
        current = self.store.current(profile)
        if current is not None:
            return current
        if self.store.next(profile) is not None:
            return await self._promote(profile)
        if profile is not Profile.IDENTITY and self.store.current(Profile.IDENTITY) is not None:
            return await self._request_profile(profile)
        if self.bootstrap is None:
            raise NotEnrolled("no bootstrap credentials configured: cannot provision")
        creds, bootstrap_cert = self._bootstrap_credentials()
        check_bootstrap(bootstrap_cert, now=self.clock(), margin=self.bootstrap_margin)
        pending = self.store.pending(profile)
        if pending is None or pending.kind != "request":
            label, key = self.store.new_key(profile, self.key_type)
            pending = PendingRequest(request_id=self.token_bytes(16), kind="request", key_label=label,
                                     csr=build_csr(key, device_id=self.device_id), created=self.clock())
            self.store.set_pending(profile, pending)
        assert pending.csr is not None
        request = CertificateRequest(
            request_id=pending.request_id, profile=profile, csr=pending.csr,
            provisioning=ProvisioningParameters(device_id=self.device_id, region=self.region),
        )
        request_topic = topics.provisioning_request_topic(self.tenant, self.device_id)
        response_topic = topics.provisioning_response_topic(self.tenant, self.device_id)

        async def reconnect() -> None:
            await self._connect(creds, response_topic, "bootstrap")

        await reconnect()
        self.emit("enrolling", profile, f"request {pending.request_id.hex()}")
        reply = await self._with_retries(profile, lambda: self._send_once(request_topic, request), reconnect)
        slot = self._stage_reply(profile, reply, pending.key_label)
        promoted = await self._promote(profile)
        if self.destroy_bootstrap:
            self.destroy_bootstrap_credentials()
        return promoted

    async def _request_profile(self, profile: Profile) -> Slot:
        # An extra profile for an enrolled device: a CertificateRequest on its own dev topic,
        # authenticated by the identity certificate.
        pending = self.store.pending(profile)
        if pending is None or pending.kind != "request":
            label, key = self.store.new_key(profile, self.key_type)
            pending = PendingRequest(request_id=self.token_bytes(16), kind="request", key_label=label,
                                     csr=build_csr(key, device_id=self.device_id), created=self.clock())
            self.store.set_pending(profile, pending)
        assert pending.csr is not None
        request = CertificateRequest(request_id=pending.request_id, profile=profile, csr=pending.csr)
        topic = topics.device_request_topic(self.tenant, self.device_id)
        with contextlib.suppress(TransportError):
            await self.ensure_connected()
        reply = await self._with_retries(profile, lambda: self._send_once(topic, request), self.ensure_connected)
        self._stage_reply(profile, reply, pending.key_label)
        return await self._promote(profile)

    def destroy_bootstrap_credentials(self) -> None:
        """Overwrite and unlink the bootstrap files, or destroy its key objects on the token."""
        if self.bootstrap is None:
            return
        if self.bootstrap.key_path is not None:
            destroy_file(self.bootstrap.key_path)
        if self.bootstrap.key_label is not None:
            self.keystore.delete(self.bootstrap.key_label)
        destroy_file(self.bootstrap.cert_path)
        self.emit("bootstrap_destroyed", None, str(self.bootstrap.cert_path))

    def _stage_reply(self, profile: Profile, reply: CertificateIssued, key_label: str) -> Slot:
        chain = [x509.load_der_x509_certificate(der) for der in reply.chain]
        slot = self.store.stage(profile, certificate=reply.x509, chain=chain, key_label=key_label,
                                now=self.clock(), suggested=reply.renewal_window)
        self.emit("issued", profile, f"serial {reply.serial:x}, valid until {reply.not_after.isoformat()}")
        return slot

    async def _promote(self, profile: Profile) -> Slot:
        if profile is not Profile.IDENTITY:
            slot = self.store.commit(profile)
            self.emit("promoted", profile, f"serial {slot.serial:x}")
            return slot
        try:
            slot = await self.store.promote(profile, self._connect_slot, now=self.clock())
        except RotationRejected as exc:
            self.emit("rejected", profile, exc.reason)
            current = self.store.current(profile)
            if current is not None:
                with contextlib.suppress(TransportError):
                    await self._connect_slot(current)
            raise
        self.emit("promoted", profile, f"serial {slot.serial:x}")
        return slot

    # -- renewal ---------------------------------------------------------------------

    def renewal_request(self, profile: Profile, *, reuse_key: bool | None = None) -> RenewalRequest:
        """The request to send for renewing ``profile``: the pending one (same id) or a new, recorded one."""
        current = self.store.current(profile)
        if current is None:
            raise NotEnrolled(f"no current {profile.label} certificate to renew")
        pending = self.store.pending(profile)
        if pending is not None and pending.kind == "renewal" and pending.current_serial == current.serial:
            return RenewalRequest(request_id=pending.request_id, profile=profile, current_serial=current.serial,
                                  csr=pending.csr, reuse_key=pending.reuse_key)
        now = self.clock()
        expired = now >= current.not_after
        if expired and now - current.not_after > self.recovery_window:
            raise RecoveryWindowPassed(
                f"the {profile.label} certificate expired at {current.not_after.isoformat()}, more than "
                f"{self.recovery_window} ago: provision the device again")
        reuse = expired if reuse_key is None else reuse_key
        if reuse:
            pending = PendingRequest(request_id=self.token_bytes(16), kind="renewal", key_label=current.key_label,
                                     current_serial=current.serial, reuse_key=True, created=now)
        else:
            label, key = self.store.new_key(profile, self.key_type)
            pending = PendingRequest(request_id=self.token_bytes(16), kind="renewal", key_label=label,
                                     csr=build_csr(key, device_id=self.device_id), current_serial=current.serial,
                                     created=now)
        self.store.set_pending(profile, pending)
        return RenewalRequest(request_id=pending.request_id, profile=profile, current_serial=current.serial,
                              csr=pending.csr, reuse_key=pending.reuse_key)

    async def renew_once(self, profile: Profile = Profile.IDENTITY, *, reuse_key: bool | None = None) -> Slot:
        """One attempt: send (or re-send) the renewal request, stage and promote the reply. No retries."""
        if self.store.next(profile) is not None:
            return await self._promote(profile)
        request = self.renewal_request(profile, reuse_key=reuse_key)
        await self.ensure_connected()
        reply = await self._send_once(topics.device_request_topic(self.tenant, self.device_id), request)
        pending = self.store.pending(profile)
        assert pending is not None
        self._stage_reply(profile, reply, pending.key_label)
        return await self._promote(profile)

    async def renew(self, profile: Profile = Profile.IDENTITY, *, reuse_key: bool | None = None) -> Slot:
        """Renew ``profile`` now, retrying transient failures up to ``max_attempts`` with the same request id."""
        if self.store.next(profile) is not None:
            return await self._promote(profile)
        request = self.renewal_request(profile, reuse_key=reuse_key)
        topic = topics.device_request_topic(self.tenant, self.device_id)
        with contextlib.suppress(TransportError):
            await self.ensure_connected()
        self.emit("renewing", profile, f"request {request.request_id.hex()}")
        reply = await self._with_retries(profile, lambda: self._send_once(topic, request), self.ensure_connected)
        pending = self.store.pending(profile)
        assert pending is not None
        self._stage_reply(profile, reply, pending.key_label)
        return await self._promote(profile)

    # -- status ----------------------------------------------------------------------

    def renew_at(self, profile: Profile) -> datetime | None:
        """When ``profile``'s current certificate is due for renewal (server window, else policy window)."""
        current = self.store.current(profile)
        if current is None:
            return None
        return renewal_time(self.device_id, not_before=current.not_before, not_after=current.not_after,
                            policy=self.policies.get(profile, DEFAULT_POLICY),
                            suggested=self.store.suggested_window(profile))

    def status(self) -> dict[Profile, ProfileStatus]:
        """Per profile: serial, expiry, days to expiry, renewal moment, next attempt, last error."""
        now = self.clock()
        result: dict[Profile, ProfileStatus] = {}
        for profile in sorted(set(self.store.profiles()) | set(self.policies)):
            current = self.store.current(profile)
            pending = self.store.pending(profile)
            result[profile] = ProfileStatus(
                profile=profile,
                serial=None if current is None else current.serial,
                not_after=None if current is None else current.not_after,
                days_to_expiry=None if current is None else (current.not_after - now).total_seconds() / 86400,
                renew_at=self.renew_at(profile),
                next_attempt=self.next_attempts.get(profile),
                last_error=self.last_errors.get(profile),
                failures=self.failures.get(profile, 0),
                pending_request_id=None if pending is None else pending.request_id.hex(),
                staged=self.store.next(profile) is not None,
            )
        return result
