"""The CA service core: given an authenticated identity, a topic and a payload, decide the replies
and side effects.

Adapters (the amqtt plugin, the MQTT 5 workers, the CLI) authenticate a peer, turn its client
certificate into an :class:`Identity` with :meth:`CAService.identify`, and feed every publish to
:meth:`CAService.handle` (or a batch of them to :meth:`CAService.handle_many`). What comes back is
an :class:`Outcome`: the publishes to send, and the certificates a revocation took away (for
session kicks and revocation feeds). The service never touches a socket, never reads the clock or
a random source other than the ones it was given, and never signs: every CSR check and signature
goes through ``signer.sign(jobs)``, one call per batch, so a process-pool backend keeps that work
off the event loop.

Rules (docs/wire-format.md section 7): every request gets exactly one reply on the response topic
of its request topic, carrying its request id; an undecodable payload gets an Error without one;
every refusal is appended to the audit trail with its reason; a certificate is committed to the
registry before it is returned, and the same request id from the same identity never yields a
second certificate.

Decisions worth knowing:

* **Whose topic a reply goes to.** A reply goes to the response topic of the request topic only
  when that topic is the identity's own (its tenant; its device id or operator id; any ``prov``
  topic for a claim credential). A request on somebody else's topic is refused and the Error goes
  to the identity's *own* response topic (a claim credential has none: then only the audit trail
  records it), so a misbehaving client can never make the CA publish into another device's or
  tenant's topics.
* **Possession of the registered key.** :meth:`CAService.identify` must be given the certificate
  the peer authenticated with (TLS CertificateVerify proves possession of its key). That is also
  what makes expired-certificate recovery safe: the handshake with the expired certificate proves
  the device holds the registered key, so a recovery renewal may keep that key (``reuse_key``,
  when the profile allows reuse) or rotate to a new one (a CSR, which proves its own key).
* **Renewal keys.** ``reuse_key`` needs the profile's ``allow_key_reuse`` and a key younger than
  ``max_key_age``. A CSR that carries the *current* key counts as key reuse and follows the same
  rule (checked on the signer's result, so the event loop never parses a CSR).
* **Claims.** A claim credential may not provision a device id that already has an active
  operational (or factory) certificate: otherwise a leaked claim could clone a live device.
* **Batches.** A :meth:`CAService.handle_many` batch takes its status slots from the service's
  slot blocks and commits its certificates with one ``commit_issuances`` call (one transaction;
  each item keeps the outcome it would have had alone). With ``coalesce`` set, concurrent
  :meth:`CAService.handle` calls are gathered into such batches (group commit) -- the adapter
  that drives the service chooses.
* **Status slots come in blocks.** A certificate's status-list position is inside the signed
  certificate, so it must be reserved before signing. Rather than a write transaction (and a
  disk sync) per batch for that, the service reserves a block per (tenant, region) -- the slots
  a batch needs plus up to ``status_block`` spare ones from the same list, in one registry
  transaction -- and hands the spare slots out from memory to later batches. So most batches
  cost one write transaction, the issuance commit. Every reservation is a registry transaction
  of its own, so services in other processes (stateless workers on one PostgreSQL) get disjoint
  blocks, and the registry's unique (tenant, region, list, index) key backs that up. Spare slots
  left in memory when the process stops or crashes are never used: a status list then has
  some bits that no certificate owns, always 0 -- harmless (revocation sets only the bits of
  revoked certificates), at most ``status_block`` slots per (tenant, region) per service
  instance. Spare slots never open a new list: a block stops at the end of the list its needed
  slots end in.
* **Regions.** A certificate joins the region named in the provisioning parameters, else the
  claim policy's region, else (for devices) the region of the certificate it authenticated with,
  else the tenant's ``default_region``; with none of these it carries no region extension and is
  filed under :data:`NO_REGION`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import hashlib
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from protocol.codec import decode, encode
from protocol.codes import ErrorCode, Profile, RevocationReason
from protocol.errors import DecodeError, LocalProtocolError, TopicError
from protocol.messages import (
    MAX_ERROR_TEXT_BYTES,
    CertificateIssued,
    CertificateRequest,
    Error,
    Message,
    RenewalRequest,
    RevocationRequest,
    RevocationResult,
    RevocationSnapshot,
    SnapshotRequest,
)
from protocol.renewal import RenewalPolicy, RenewalWindow, renewal_window
from protocol.topics import (
    RESERVED_OPERATOR_IDS,
    ParsedTopic,
    TopicKind,
    device_response_topic,
    operator_response_topic,
    parse_topic,
    response_topic_for,
    validate_identifier,
)

from ..store.audit import AuditEvent, AuditKind
from ..store.base import (
    CertificateKind,
    CertificateRecord,
    CertificateStatus,
    ClaimRefused,
    ClaimSpend,
    DuplicateSerial,
    IssuanceItem,
    Registry,
    RegistryError,
    RequestIdReused,
    RequestKey,
    UnknownCertificate,
    UnknownClaim,
)
from .claims import ClaimPolicy, load_claim_policy
from .identity import KIND_OF_RECORD, NO_REGION, Identity, IdentityKind, NotAuthorized, Outcome, Outgoing, UnknownStatusList
from .feeds import registry_crl, registry_snapshot
from .issuer import random_serial
from .policy import PolicyError, PolicyRefusal, ProfilePolicy
from .signing import SigningBackend, SignJob, SignResult, TenantAuthority

__all__ = [
    "NO_REGION",
    "CAService",
    "Identity",
    "IdentityKind",
    "NotAuthorized",
    "Outcome",
    "Outgoing",
    "UnknownStatusList",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

_ASCII_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]*")
# Device and provisioning request topics whose identifiers are plain ASCII, which every
# identifier rule of protocol.topics accepts: the common case, taken apart without
# parse_topic's per-character Unicode checks. Anything else goes through parse_topic.
_PLAIN = r"[A-Za-z0-9][A-Za-z0-9._~-]{0,63}"
_PLAIN_REQUEST_TOPIC = re.compile(rf"certmq/v1/({_PLAIN})/(dev|prov)/({_PLAIN})/req")
_REQUEST_KINDS = {"dev": TopicKind.DEVICE_REQUEST, "prov": TopicKind.PROVISIONING_REQUEST}
_DEVICE_KINDS = (CertificateKind.OPERATIONAL, CertificateKind.FACTORY)


@dataclasses.dataclass(kw_only=True)
class _Pending:
    """A request that passed every check the service makes itself and now needs a signature."""

    identity: Identity
    reply_topic: str | None
    topic: str
    request_id: bytes | None
    job: SignJob
    kind: CertificateKind
    region: str
    request: RequestKey | None
    claim: ClaimSpend | None = None
    replaced_serial: int | None = None
    same_key_refusal: tuple[bytes, str] | None = None  # (spki, text): refuse a CSR carrying this key
    audit_kind: str = AuditKind.ISSUE
    actor: str = ""


def _parse_topic(topic: str) -> ParsedTopic:
    """:func:`protocol.topics.parse_topic`, with a fast path for plain device / provisioning
    request topics (the same ParsedTopic; the regex already proved what its checks check)."""
    match = _PLAIN_REQUEST_TOPIC.fullmatch(topic) if type(topic) is str else None
    if match is None:
        return parse_topic(topic)
    parsed = object.__new__(ParsedTopic)
    for name, value in (("kind", _REQUEST_KINDS[match[2]]), ("tenant", match[1]), ("device_id", match[3]),
                        ("region", None), ("operator_id", None)):
        object.__setattr__(parsed, name, value)
    return parsed


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ClaimDraft:
    """A claim request checked as far as it can be without the registry."""

    identity: Identity
    message: CertificateRequest
    reply_topic: str | None
    topic: str
    device_id: str
    region_asked: str | None
    fingerprint: bytes


def _retrieve(future: asyncio.Future[Any]) -> None:
    # Mark a shared lookup's exception as seen: its users got it, or did not need it.
    if not future.cancelled():
        future.exception()


def _whole_seconds(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("the service clock must return aware datetimes")
    return value.astimezone(dt.UTC).replace(microsecond=0)


def _fingerprint(*parts: object) -> bytes:
    # Canonical CBOR of the request's meaningful fields: the same request always hashes the same.
    return hashlib.sha256(b"certmq-request-v1\0" + cbor2.dumps(list(parts), canonical=True)).digest()


def _text(value: str) -> str:
    return value.encode("utf-8", "replace")[:MAX_ERROR_TEXT_BYTES].decode("utf-8", "ignore")


def _check_region(region: str) -> str:
    try:
        validate_identifier(region, what="region")
    except LocalProtocolError as exc:
        raise PolicyRefusal(ErrorCode.MALFORMED, str(exc)) from None
    if not _ASCII_ID.fullmatch(region):
        raise PolicyRefusal(
            ErrorCode.MALFORMED, f"region {region!r} may use only ASCII letters, digits and . _ ~ - (starting alnum)"
        )
    return region


class CAService:
    """The CA's decisions for any number of tenants, over one registry and one signing backend.

    ``clock`` returns aware UTC datetimes (truncated to whole seconds here); ``rng_bytes`` draws
    serials. ``crl_lifetime`` is the time from a CRL's thisUpdate to its nextUpdate.
    ``coalesce`` > 1 gathers concurrent :meth:`handle` calls into :meth:`handle_many` batches of
    at most that many requests (up to ``coalesce_in_flight`` batches at once; a batch waits at
    most ``coalesce_linger`` seconds for company, and only while another batch is in flight).
    ``status_block`` is the most spare status slots reserved ahead per (tenant, region), capped
    at 1/64 of the tenant's ``status_list_capacity`` (0: every batch reserves its own slots).
    """

    def __init__(
        self,
        *,
        registry: Registry,
        authorities: Mapping[str, TenantAuthority],
        signer: SigningBackend,
        clock: Callable[[], dt.datetime],
        rng_bytes: Callable[[int], bytes] = os.urandom,
        crl_lifetime: dt.timedelta = dt.timedelta(days=1),
        coalesce: int = 0,
        coalesce_linger: float = 0.002,
        coalesce_in_flight: int = 2,
        status_block: int = 256,
    ) -> None:
        for name, authority in authorities.items():
            if authority.name != name or authority.policy.name != name:
                raise ValueError(f"authority registered as {name!r} is for tenant {authority.name!r}")
        if crl_lifetime <= dt.timedelta(0):
            raise ValueError("crl_lifetime must be positive")
        self._registry = registry
        self._authorities = dict(authorities)
        self._signer = signer
        self._clock = clock
        self._rng = rng_bytes
        self._crl_lifetime = crl_lifetime
        if isinstance(coalesce, bool) or not isinstance(coalesce, int) or coalesce < 0:
            raise ValueError("coalesce must be an int >= 0 (0: no gathering of handle() calls)")
        if not 0 <= coalesce_linger <= 1:
            raise ValueError("coalesce_linger must be between 0 and 1 second")
        if isinstance(coalesce_in_flight, bool) or not isinstance(coalesce_in_flight, int) or coalesce_in_flight < 1:
            raise ValueError("coalesce_in_flight must be an int >= 1")
        if isinstance(status_block, bool) or not isinstance(status_block, int) or status_block < 0:
            raise ValueError("status_block must be an int >= 0 (0: no spare status slots)")
        self._status_block = status_block
        # Reserved status slots not yet in a certificate, per (tenant, region); and how many
        # reservations of each are under way (one at a time asks for spare slots).
        self._spare_slots: dict[tuple[str, str], collections.deque[tuple[int, int]]] = {}
        self._reserving: collections.Counter[tuple[str, str]] = collections.Counter()
        self._coalesce = coalesce
        self._linger = coalesce_linger
        self._max_in_flight = coalesce_in_flight
        self._queue: collections.deque[tuple[tuple[Identity, str, bytes], asyncio.Future[Outcome]]] = (
            collections.deque()
        )
        self._collector: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._reply_parts: dict[tuple[str, str, dt.datetime, dt.datetime],
                                tuple[tuple[bytes, ...], RenewalWindow | None]] = {}

    def _now(self) -> dt.datetime:
        return _whole_seconds(self._clock())

    def _authority(self, tenant: str) -> TenantAuthority:
        try:
            return self._authorities[tenant]
        except KeyError:
            raise ValueError(f"unknown tenant {tenant!r} (known: {', '.join(sorted(self._authorities))})") from None

    # ------------------------------------------------------------------ identification

    async def identify(self, certificate: x509.Certificate, *, allow_expired: bool = False) -> Identity:
        """The :class:`Identity` of a peer that authenticated with ``certificate``.

        The tenant is the one whose issuing CA *signed* the certificate (names are not trusted);
        the registry must hold exactly this certificate, active and within its validity.
        ``allow_expired`` admits an expired certificate (the recovery path: :meth:`handle` then
        allows nothing but a renewal within the profile's recovery window). Raises
        :class:`NotAuthorized` (code ``NOT_AUTHORIZED`` or ``CERTIFICATE_REVOKED``); refusals of a
        certificate of a known tenant are audited.
        """
        tenant = None
        for name, authority in self._authorities.items():
            try:
                certificate.verify_directly_issued_by(authority.issuing)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                continue
            tenant = name
            break
        if tenant is None:
            raise NotAuthorized(ErrorCode.NOT_AUTHORIZED, "certificate was not issued by any tenant's issuing CA")
        now = self._now()
        serial = certificate.serial_number
        record = await self._registry.get_certificate(tenant, serial) if serial > 0 else None
        der = certificate.public_bytes(serialization.Encoding.DER)
        problem: tuple[ErrorCode, str] | None = None
        if record is None or record.der != der:
            problem = ErrorCode.NOT_AUTHORIZED, f"certificate {serial:x} is not in tenant {tenant!r}'s registry"
        elif record.status is CertificateStatus.REVOKED:
            problem = ErrorCode.CERTIFICATE_REVOKED, f"certificate {serial:x} is revoked"
        elif now < record.not_before:
            problem = ErrorCode.NOT_AUTHORIZED, f"certificate {serial:x} is not valid before {record.not_before.isoformat()}"
        elif now > record.not_after and not allow_expired:
            problem = ErrorCode.NOT_AUTHORIZED, f"certificate {serial:x} expired at {record.not_after.isoformat()}"
        if problem is not None:
            code, text = problem
            await self._audit_refusal(tenant, "certificate", f"{serial:x}", code, text, now, {"stage": "identify"})
            raise NotAuthorized(code, text)
        assert record is not None
        return Identity(
            tenant=tenant,
            kind=KIND_OF_RECORD[record.kind],
            name=record.device_id,
            serial=record.serial,
            spki_sha256=record.spki_sha256,
            not_before=record.not_before,
            not_after=record.not_after,
        )

    # ------------------------------------------------------------------ requests

    async def handle(self, identity: Identity, topic: str, payload: bytes) -> Outcome:
        """Handle one publish of ``identity`` on ``topic``; exactly one reply unless none can be addressed.

        Without ``coalesce`` this is ``handle_many([(identity, topic, payload)])[0]``; with it,
        concurrent calls are gathered into :meth:`handle_many` batches (same outcomes). A caller
        cancelled while waiting does not withdraw its request: its batch still runs.
        """
        item = (identity, topic, payload)
        if self._coalesce <= 1:
            return (await self.handle_many([item]))[0]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        self._queue.append((item, future))
        if self._collector is None or self._collector.done() or self._collector.get_loop() is not loop:
            self._collector = asyncio.create_task(self._collect(), name="certmq-ca-collector")
        return await future

    async def _collect(self) -> None:
        # Group commit: a batch leaves as soon as a slot is free; while batches are in flight,
        # new calls pile up (at most coalesce_linger) and leave together.
        while self._queue:
            await asyncio.sleep(0)  # callers ready in this turn of the loop join the batch
            if self._in_flight and len(self._queue) < self._coalesce:
                deadline = asyncio.get_running_loop().time() + self._linger
                while len(self._queue) < self._coalesce and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(self._linger / 4)
            while len(self._in_flight) >= self._max_in_flight:
                await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
            batch = [self._queue.popleft() for _ in range(min(self._coalesce, len(self._queue)))]
            if batch:
                task = asyncio.create_task(self._run_batch(batch), name="certmq-ca-batch")
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)

    async def _run_batch(self, batch: list[tuple[tuple[Identity, str, bytes], asyncio.Future[Outcome]]]) -> None:
        try:
            outcomes = await self.handle_many([item for item, _ in batch])
        except BaseException as exc:  # handle_many answers every request itself; this is a bug
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("batch cancelled"))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), outcome in zip(batch, outcomes):
            if not future.done():
                future.set_result(outcome)

    async def handle_many(self, items: Sequence[tuple[Identity, str, bytes]]) -> list[Outcome]:
        """Handle a batch; every signature of the batch goes to one ``signer.sign`` call, the
        batch's status slots come from one reservation per (tenant, region), and its certificates
        are committed in one registry transaction.

        Outcomes come back in the order of ``items``.
        """
        now = self._now()
        claims: dict[tuple[str, str], asyncio.Future[tuple[ClaimPolicy | None, int]]] = {}
        # Claim requests that pass every check made before the registry is asked (a provisioning
        # storm: nearly all of them) share one registry read and need no task each; the rest are
        # prepared one coroutine each, side by side.
        plain: list[int] = []
        drafts: list[_ClaimDraft] = []
        others: list[int] = []
        for index, (ident, topic, payload) in enumerate(items):
            draft = self._plain_claim(ident, topic, payload, now)
            if draft is None:
                others.append(index)
            else:
                plain.append(index)
                drafts.append(draft)
        prepared: list[Outcome | _Pending] = [None] * len(items)  # type: ignore[list-item]

        async def prepare_plain() -> None:
            if drafts:
                for index, done in zip(plain, await self._plain_claims(drafts, now, claims)):
                    prepared[index] = done

        async def prepare_others() -> None:
            if others:
                done = await asyncio.gather(*(self._prepare(*items[i], now, claims) for i in others))
                for index, outcome in zip(others, done):
                    prepared[index] = outcome

        await asyncio.gather(prepare_plain(), prepare_others())
        pending = [p for p in prepared if isinstance(p, _Pending)]
        finished: dict[int, Outcome] = {}
        if pending:
            finished = await self._reserve(pending, now)
            pending = [p for p in pending if id(p) not in finished]
        results: list[SignResult] | None = None
        if pending:
            try:
                results = await self._signer.sign([p.job for p in pending])
                if len(results) != len(pending):
                    raise RuntimeError(f"signer returned {len(results)} results for {len(pending)} jobs")
            except Exception:  # a broken backend: every request of the batch gets a transient error
                log.exception("signing backend failed for a batch of %d jobs", len(pending))
                results = None
        if pending:
            if results is None:
                outs = await asyncio.gather(*(
                    self._refuse(p.identity, p.reply_topic, p.request_id, ErrorCode.INTERNAL,
                                 "signing backend unavailable; retry later", p.topic, now)
                    for p in pending
                ))
            else:
                outs = await self._finish(pending, results, now)
            finished.update({id(p): o for p, o in zip(pending, outs)})
        return [finished[id(p)] if isinstance(p, _Pending) else p for p in prepared]

    async def _take_slots(self, tenant: str, region: str, count: int) -> list[tuple[int, int]]:
        """``count`` status slots of ``tenant``'s ``region`` for certificates about to be signed:
        spare ones first, the rest from one registry reservation (which also refills the spare
        slots). Slots taken here are never handed out twice by this service, and the registry
        never hands a slot to two reservations."""
        key = (tenant, region)
        spare = self._spare_slots.setdefault(key, collections.deque())
        # Taken before any await: a concurrent batch cannot take the same spare slots.
        taken = [spare.popleft() for _ in range(min(count, len(spare)))]
        missing = count - len(taken)
        if not missing:
            return taken
        try:
            capacity = self._authority(tenant).policy.status_list_capacity
            # Only one reservation at a time asks for spare slots: concurrent ones would each
            # leave a block in memory, and a restart would waste all of them.
            extra = 0 if self._reserving[key] else min(self._status_block, capacity // 64)
            self._reserving[key] += 1
            try:
                fresh = await self._registry.allocate_status_indices(tenant, region, capacity, missing, spare=extra)
            finally:
                self._reserving[key] -= 1
            if len(fresh) < missing:
                raise RegistryError(f"the registry reserved {len(fresh)} status slots of {tenant}/{region}, "
                                    f"not {missing}")
        except BaseException:
            spare.extendleft(reversed(taken))  # still reserved and unused: kept for later batches
            raise
        spare.extend(fresh[missing:])
        return taken + fresh[:missing]

    async def _reserve(self, pending: list[_Pending], now: dt.datetime) -> dict[int, Outcome]:
        """Give each job its status slot (:meth:`_take_slots`, once per (tenant, region)); the
        refusals of requests that got none, by ``id`` of their pending entry."""
        groups: dict[tuple[str, str], list[_Pending]] = {}
        for p in pending:
            groups.setdefault((p.job.tenant, p.region), []).append(p)
        refused: dict[int, Outcome] = {}
        for (tenant, region), members in groups.items():
            try:
                slots = await self._take_slots(tenant, region, len(members))
            except Exception:
                log.exception("reserving %d status slots of %s/%s failed", len(members), tenant, region)
                for p in members:
                    refused[id(p)] = await self._refuse(p.identity, p.reply_topic, p.request_id, ErrorCode.INTERNAL,
                                                        "internal error; retry later", p.topic, now)
                continue
            for p, slot in zip(members, slots):
                job = p.job  # spelled out: dataclasses.replace walks the fields every time
                p.job = SignJob(tenant=job.tenant, device_id=job.device_id, profile=job.profile, serial=job.serial,
                                not_before=job.not_before, csr_der=job.csr_der, public_key_der=job.public_key_der,
                                status_position=slot, region=job.region, capabilities=job.capabilities)
        return refused

    def _reply_topic(self, identity: Identity, parsed: ParsedTopic | None) -> str | None:
        if parsed is not None and parsed.tenant == identity.tenant:
            own = (
                (identity.kind is IdentityKind.DEVICE and parsed.kind is TopicKind.DEVICE_REQUEST
                 and parsed.device_id == identity.name)
                or (identity.kind is IdentityKind.OPERATOR and parsed.kind is TopicKind.OPERATOR_REQUEST
                    and parsed.operator_id == identity.name)
                or (identity.kind is IdentityKind.BOOTSTRAP and parsed.kind is TopicKind.PROVISIONING_REQUEST)
            )
            if own:
                return response_topic_for(parsed)
        try:
            if identity.kind is IdentityKind.DEVICE:
                return device_response_topic(identity.tenant, identity.name)
            if identity.kind is IdentityKind.OPERATOR:
                return operator_response_topic(identity.tenant, identity.name)
        except LocalProtocolError:
            return None
        return None  # a claim credential has no topic of its own

    async def _prepare(
        self, identity: Identity, topic: str, payload: bytes, now: dt.datetime,
        claims: dict[tuple[str, str], asyncio.Future[tuple[ClaimPolicy | None, int]]],
    ) -> Outcome | _Pending:
        try:
            parsed: ParsedTopic | None = _parse_topic(topic)
        except TopicError:
            parsed = None
        reply_topic = self._reply_topic(identity, parsed)
        try:
            message = decode(payload)
        except DecodeError as exc:
            return await self._refuse(identity, reply_topic, None, exc.code, f"undecodable payload: {exc}", topic, now)
        request_id: bytes | None = getattr(message, "request_id", None)
        try:
            self._authorize(identity, parsed, message, now)
            assert parsed is not None
            if isinstance(message, CertificateRequest) and identity.kind is IdentityKind.BOOTSTRAP:
                return await self._claim(identity, parsed, message, reply_topic, topic, now, claims)
            if isinstance(message, CertificateRequest):
                return await self._new_profile(identity, message, reply_topic, topic, now)
            if isinstance(message, RenewalRequest):
                return await self._renewal(identity, message, reply_topic, topic, now)
            if isinstance(message, RevocationRequest):
                return await self._revocation(identity, message, reply_topic, now)
            assert isinstance(message, SnapshotRequest)
            return await self._snapshot_request(identity, message, reply_topic)
        except PolicyRefusal as refusal:
            return await self._refuse(identity, reply_topic, request_id, refusal.code, refusal.text, topic, now)
        except Exception:  # a registry or programming fault: a transient error, never silence
            log.exception("request of %s on %s failed", identity.key, topic)
            return await self._refuse(identity, reply_topic, request_id, ErrorCode.INTERNAL,
                                      "internal error; retry later", topic, now)

    def _authorize(self, identity: Identity, parsed: ParsedTopic | None, message: Message, now: dt.datetime) -> None:
        def refuse(text: str) -> PolicyRefusal:
            return PolicyRefusal(ErrorCode.NOT_AUTHORIZED, text)

        if parsed is None:
            raise refuse("not a certmq request topic")
        if parsed.tenant != identity.tenant:
            raise refuse(f"an identity of tenant {identity.tenant!r} may not use tenant {parsed.tenant!r}'s topics")
        if identity.tenant not in self._authorities:
            raise refuse(f"tenant {identity.tenant!r} is not served here")
        kind, name = identity.kind, identity.name
        if kind is IdentityKind.DEVICE:
            if parsed.kind is not TopicKind.DEVICE_REQUEST or parsed.device_id != name:
                raise refuse(f"device {name!r} may only publish requests on its own dev/{name}/req topic")
            allowed: tuple[type, ...] = (CertificateRequest, RenewalRequest, SnapshotRequest)
        elif kind is IdentityKind.BOOTSTRAP:
            if parsed.kind is not TopicKind.PROVISIONING_REQUEST:
                raise refuse("a claim credential may only publish on provisioning (prov/{device_id}/req) topics")
            allowed = (CertificateRequest,)
        else:
            if parsed.kind is not TopicKind.OPERATOR_REQUEST or parsed.operator_id != name:
                raise refuse(f"operator {name!r} may only publish requests on its own ops/{name}/req topic")
            allowed = (RevocationRequest, SnapshotRequest)
        if not isinstance(message, allowed):
            raise refuse(f"a {kind} identity may not send {type(message).__name__}")
        if now < identity.not_before:
            raise refuse("the authenticating certificate is not valid yet")
        if now > identity.not_after and not isinstance(message, RenewalRequest):
            raise refuse("the authenticating certificate has expired: only a renewal (recovery) is possible")

    async def _refuse(
        self, identity: Identity, reply_topic: str | None, request_id: bytes | None, code: ErrorCode | int,
        text: str, topic: str, now: dt.datetime,
    ) -> Outcome:
        details = {"code": int(code), "request_id": request_id, "topic": topic[:200]}
        try:
            await self._audit_refusal(identity.tenant, identity.key, identity.name, code, text, now, details)
        except Exception:  # the reply still goes out: the device must not hang on our audit trouble
            log.exception("could not audit a refusal of %s", identity.key)
        if reply_topic is None:
            return Outcome(replies=())
        payload = encode(Error(code=code, text=_text(text), request_id=request_id))
        return Outcome(replies=(Outgoing(reply_topic, payload),))

    async def _audit_refusal(
        self, tenant: str, actor: str, subject: str, code: ErrorCode | int, text: str, now: dt.datetime,
        details: Mapping[str, Any],
    ) -> None:
        name = code.name if isinstance(code, ErrorCode) else str(int(code))
        await self._registry.audit_refusal(AuditEvent(
            kind=AuditKind.REFUSE, actor=actor, subject=subject, time=now, tenant=tenant,
            details={**details, "code": int(code), "code_name": name, "reason": text},
        ))

    async def _replay(self, identity: Identity, request_id: bytes, fingerprint: bytes) -> CertificateRecord | None:
        return self._replayed(await self._registry.find_request(identity.tenant, identity.key, request_id),
                              request_id, fingerprint)

    @staticmethod
    def _replayed(
        found: tuple[bytes, CertificateRecord] | None, request_id: bytes, fingerprint: bytes
    ) -> CertificateRecord | None:
        if found is None:
            return None
        if found[0] != fingerprint:
            raise PolicyRefusal(ErrorCode.REQUEST_ID_REUSED,
                                f"request id {request_id.hex()} was already used for a different request")
        return found[1]

    def _issued(self, record: CertificateRecord, request_id: bytes, reply_topic: str | None) -> Outcome:
        if reply_topic is None:
            return Outcome(replies=())
        # A batch's certificates share tenant, profile and validity: chain and window repeat.
        key = (record.tenant, record.profile, record.not_before, record.not_after)
        cached = self._reply_parts.get(key)
        if cached is None:
            authority = self._authority(record.tenant)
            try:
                profile_policy = authority.policy.profile(Profile.from_label(record.profile))
            except (PolicyRefusal, ValueError):
                profile_policy = None
            if len(self._reply_parts) >= 256:
                self._reply_parts.clear()
            cached = self._reply_parts[key] = (authority.chain_der(), _suggested_window(record, profile_policy))
        chain, window = cached
        # The certificate is one this CA signed (just now, or for the request being replayed): no
        # need to parse it again to prove it readable.
        message = CertificateIssued.of_own_certificate(request_id=request_id, certificate=record.der, chain=chain,
                                                       renewal_window=window)
        return Outcome(replies=(Outgoing(reply_topic, encode(message)),))

    async def _slot(self, tenant: str, region: str) -> tuple[int, int]:
        [slot] = await self._take_slots(tenant, region, 1)
        return slot

    def _region(self, tenant: str, *choices: str | None) -> str:
        for choice in choices:
            if choice is not None:
                return _check_region(choice)
        default = self._authority(tenant).policy.default_region
        return NO_REGION if default is None else default

    def _job(
        self, tenant: str, device_id: str, profile: Profile, region: str, slot: tuple[int, int] | None,
        now: dt.datetime,
        *, csr: bytes | None = None, public_key_der: bytes | None = None,
    ) -> SignJob:
        return SignJob(
            tenant=tenant, device_id=device_id, profile=profile, serial=random_serial(self._rng), not_before=now,
            csr_der=csr, public_key_der=public_key_der, status_position=slot,
            region=None if region == NO_REGION else region,
        )

    # -- the three issuance flows

    async def _claim(
        self, identity: Identity, parsed: ParsedTopic, message: CertificateRequest, reply_topic: str | None,
        topic: str, now: dt.datetime,
        claims: dict[tuple[str, str], asyncio.Future[tuple[ClaimPolicy | None, int]]],
    ) -> Outcome | _Pending:
        draft = self._claim_draft(identity, parsed, message, reply_topic, topic)
        found, live = await self._registry.find_request_or_live(
            identity.tenant, identity.key, message.request_id, draft.device_id
        )
        done = self._replayed(found, message.request_id, draft.fingerprint)
        if done is not None:
            return self._issued(done, message.request_id, reply_topic)
        policy, uses = await self._claim_lookup(identity, claims)
        return self._claim_decide(draft, policy, uses, live, now)

    @staticmethod
    def _claim_draft(
        identity: Identity, parsed: ParsedTopic, message: CertificateRequest, reply_topic: str | None, topic: str,
    ) -> _ClaimDraft:
        """What a claim request asks for, checked as far as it can be without the registry."""
        device_id = parsed.device_id
        assert device_id is not None
        prov = message.provisioning
        if prov is not None and prov.device_id is not None and prov.device_id != device_id:
            raise PolicyRefusal(ErrorCode.IDENTITY_MISMATCH,
                                f"provisioning names device {prov.device_id!r} on the topic of {device_id!r}")
        region_asked = prov.region if prov is not None else None
        fingerprint = _fingerprint(int(message.TYPE), int(message.profile), message.csr, device_id, region_asked)
        return _ClaimDraft(identity=identity, message=message, reply_topic=reply_topic, topic=topic,
                           device_id=device_id, region_asked=region_asked, fingerprint=fingerprint)

    def _claim_lookup(
        self, identity: Identity, claims: dict[tuple[str, str], asyncio.Future[tuple[ClaimPolicy | None, int]]],
    ) -> asyncio.Future[tuple[ClaimPolicy | None, int]]:
        # A batch's requests through one claim credential read (and validate) its policy once:
        # they would all have read it in the same snapshot anyway; the commit still counts uses.
        key = (identity.tenant, identity.name)
        lookup = claims.get(key)
        if lookup is None:
            lookup = claims[key] = asyncio.ensure_future(self._claim_policy(identity.tenant, identity.name))
        return lookup

    def _claim_decide(
        self, draft: _ClaimDraft, policy: ClaimPolicy | None, uses: int, live: Sequence[CertificateRecord],
        now: dt.datetime,
    ) -> _Pending:
        """The rest of a claim once its registry lookups are in (no replay): refuse or issue."""
        identity, message, device_id = draft.identity, draft.message, draft.device_id
        if policy is None:
            raise PolicyRefusal(ErrorCode.CLAIM_REFUSED, f"no claim policy is registered for {identity.name!r}")
        if policy.expired(now):
            raise PolicyRefusal(ErrorCode.CLAIM_REFUSED,
                                f"claim {identity.name!r} expired at {policy.not_after.isoformat()}")
        if not policy.allows(device_id):
            raise PolicyRefusal(ErrorCode.CLAIM_REFUSED, f"claim {identity.name!r} may not claim device {device_id!r}")
        if uses >= policy.max_uses:
            raise PolicyRefusal(ErrorCode.CLAIM_REFUSED,
                                f"claim {identity.name!r} has used all {policy.max_uses} of its uses")
        if any(r.kind in _DEVICE_KINDS for r in live):
            raise PolicyRefusal(ErrorCode.CLAIM_REFUSED,
                                f"device {device_id!r} is already provisioned; revoke its certificates first")
        region = self._region(identity.tenant, draft.region_asked, policy.region)
        return _Pending(
            identity=identity, reply_topic=draft.reply_topic, topic=draft.topic, request_id=message.request_id,
            job=self._job(identity.tenant, device_id, message.profile, region, None, now, csr=message.csr),
            kind=CertificateKind.OPERATIONAL, region=region,
            request=RequestKey(identity=identity.key, request_id=message.request_id, fingerprint=draft.fingerprint),
            claim=ClaimSpend(claim_id=identity.name, max_uses=policy.max_uses),
            audit_kind=AuditKind.CLAIM, actor=identity.key,
        )

    def _plain_claim(self, identity: Identity, topic: str, payload: bytes, now: dt.datetime) -> _ClaimDraft | None:
        """The draft of a claim request that passes every check made before the registry is asked,
        else None: anything unusual (refusals included) goes the ordinary way, :meth:`_prepare`,
        which repeats these checks and answers it. Nothing here has side effects."""
        if identity.kind is not IdentityKind.BOOTSTRAP:
            return None
        try:
            parsed = _parse_topic(topic)
            message = decode(payload)
            if not isinstance(message, CertificateRequest):
                return None
            self._authorize(identity, parsed, message, now)
            return self._claim_draft(identity, parsed, message, self._reply_topic(identity, parsed), topic)
        except Exception:
            return None

    async def _plain_claims(
        self, drafts: list[_ClaimDraft], now: dt.datetime,
        claims: dict[tuple[str, str], asyncio.Future[tuple[ClaimPolicy | None, int]]],
    ) -> list[Outcome | _Pending]:
        """:meth:`_claim` for many requests at once: their request-key and live-certificate lookups
        in one registry read, and no task per request. Outcomes as :meth:`_prepare` gives them."""
        lookups = [(d.identity.tenant, d.identity.key, d.message.request_id, d.device_id) for d in drafts]
        policies = [self._claim_lookup(d.identity, claims) for d in drafts]
        failure: Exception | None = None
        try:
            reads = await self._registry.find_requests_or_live(lookups)
        except Exception as exc:  # every request of the read gets what _prepare gives a registry fault
            failure = exc
        out: list[Outcome | _Pending | None] = []
        refusals: dict[int, Any] = {}
        for index, (draft, policy_lookup) in enumerate(zip(drafts, policies)):
            identity, request_id = draft.identity, draft.message.request_id
            try:
                if failure is not None:
                    raise failure
                found, live = reads[index]
                done = self._replayed(found, request_id, draft.fingerprint)
                if done is not None:
                    out.append(self._issued(done, request_id, draft.reply_topic))
                    continue
                policy, uses = await policy_lookup
                out.append(self._claim_decide(draft, policy, uses, live, now))
                continue
            except PolicyRefusal as refusal:
                refusals[index] = self._refuse(identity, draft.reply_topic, request_id, refusal.code, refusal.text,
                                               draft.topic, now)
            except Exception:
                log.exception("request of %s on %s failed", identity.key, draft.topic)
                refusals[index] = self._refuse(identity, draft.reply_topic, request_id, ErrorCode.INTERNAL,
                                               "internal error; retry later", draft.topic, now)
            out.append(None)
        for lookup in set(policies):  # not awaited when every request was a replay or the read failed
            lookup.add_done_callback(_retrieve)
        for index, outcome in zip(refusals, await asyncio.gather(*refusals.values())):
            out[index] = outcome
        return out  # type: ignore[return-value]

    async def _claim_policy(self, tenant: str, claim_id: str) -> tuple[ClaimPolicy | None, int]:
        """The stored policy of a claim credential (None if there is none) and its uses so far;
        ``PolicyRefusal(CLAIM_REFUSED)`` for a stored policy that no longer validates."""
        stored = await self._registry.get_claim(tenant, claim_id)
        if stored is None:
            return None, 0
        try:
            return load_claim_policy(stored.policy), stored.uses
        except PolicyError as exc:
            raise PolicyRefusal(ErrorCode.CLAIM_REFUSED, f"the stored claim policy is unusable: {exc}") from None

    async def _new_profile(
        self, identity: Identity, message: CertificateRequest, reply_topic: str | None, topic: str,
        now: dt.datetime,
    ) -> Outcome | _Pending:
        prov = message.provisioning
        if prov is not None and prov.device_id is not None and prov.device_id != identity.name:
            raise PolicyRefusal(ErrorCode.IDENTITY_MISMATCH,
                                f"device {identity.name!r} asked for a certificate of {prov.device_id!r}")
        region_asked = prov.region if prov is not None else None
        fingerprint = _fingerprint(int(message.TYPE), int(message.profile), message.csr, identity.name, region_asked)
        done = await self._replay(identity, message.request_id, fingerprint)
        if done is not None:
            return self._issued(done, message.request_id, reply_topic)
        self._authority(identity.tenant).policy.profile(message.profile)  # UNKNOWN_PROFILE before a slot
        own = await self._registry.get_certificate(identity.tenant, identity.serial)
        own_region = None if own is None or own.region == NO_REGION else own.region
        region = self._region(identity.tenant, region_asked, own_region)
        return _Pending(
            identity=identity, reply_topic=reply_topic, topic=topic, request_id=message.request_id,
            job=self._job(identity.tenant, identity.name, message.profile, region, None, now, csr=message.csr),
            kind=CertificateKind.OPERATIONAL, region=region,
            request=RequestKey(identity=identity.key, request_id=message.request_id, fingerprint=fingerprint),
            actor=identity.key,
        )

    async def _renewal(
        self, identity: Identity, message: RenewalRequest, reply_topic: str | None, topic: str, now: dt.datetime,
    ) -> Outcome | _Pending:
        fingerprint = _fingerprint(int(message.TYPE), int(message.profile), message.current_serial,
                                   message.csr, message.reuse_key)
        done = await self._replay(identity, message.request_id, fingerprint)
        if done is not None:
            return self._issued(done, message.request_id, reply_topic)
        tenant, serial = identity.tenant, message.current_serial
        record = await self._registry.get_certificate(tenant, serial)
        if record is None or record.device_id != identity.name or record.kind not in _DEVICE_KINDS:
            raise PolicyRefusal(ErrorCode.UNKNOWN_CERTIFICATE, f"device {identity.name!r} has no certificate {serial:x}")
        if record.profile != message.profile.label:
            raise PolicyRefusal(ErrorCode.UNKNOWN_CERTIFICATE,
                                f"certificate {serial:x} is a {record.profile} certificate, not {message.profile.label}")
        if record.status is CertificateStatus.REVOKED:
            raise PolicyRefusal(ErrorCode.CERTIFICATE_REVOKED, f"certificate {serial:x} is revoked")
        profile_policy = self._authority(tenant).policy.profile(message.profile)
        if now > identity.not_after and identity.serial != serial:
            raise PolicyRefusal(ErrorCode.NOT_AUTHORIZED,
                                "an expired certificate may only renew itself (recovery), not another certificate")
        if now > record.not_after:
            limit = record.not_after + profile_policy.expired_recovery
            if now > limit:
                allowed = (f"only {profile_policy.expired_recovery} after expiry (until {limit.isoformat()})"
                           if profile_policy.expired_recovery else "no recovery after expiry")
                raise PolicyRefusal(
                    ErrorCode.RECOVERY_WINDOW_PASSED,
                    f"certificate {serial:x} expired at {record.not_after.isoformat()}; the "
                    f"{message.profile.label} profile allows {allowed}: re-provision with a claim credential",
                )
        history = await self._registry.certificates_for_device(tenant, identity.name, profile=record.profile)
        first = min((r.issued_at for r in history if r.spki_sha256 == record.spki_sha256), default=record.issued_at)
        rotate = profile_policy.must_rotate(key_first_certified=first, now=now)
        why = (f"the {message.profile.label} profile does not allow key reuse on renewal"
               if not profile_policy.allow_key_reuse else
               f"the current key was first certified at {first.isoformat()}, longer ago than max_key_age "
               f"{profile_policy.max_key_age}")
        slot_region = record.region
        if message.reuse_key:
            if rotate:
                raise PolicyRefusal(ErrorCode.KEY_REJECTED, f"{why}: send a CSR for a new key")
            public_key_der = x509.load_der_x509_certificate(record.der).public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            job = self._job(tenant, identity.name, message.profile, slot_region, None, now,
                            public_key_der=public_key_der)
        else:
            job = self._job(tenant, identity.name, message.profile, slot_region, None, now, csr=message.csr)
        return _Pending(
            identity=identity, reply_topic=reply_topic, topic=topic, request_id=message.request_id, job=job,
            kind=CertificateKind.OPERATIONAL, region=slot_region,
            request=RequestKey(identity=identity.key, request_id=message.request_id, fingerprint=fingerprint),
            replaced_serial=serial, audit_kind=AuditKind.RENEW, actor=identity.key,
            same_key_refusal=(record.spki_sha256, f"the CSR carries the current key; {why}") if rotate else None,
        )

    async def _finish(self, pending: list[_Pending], results: list[SignResult], now: dt.datetime) -> list[Outcome]:
        """Commit the batch's certificates in one registry call; outcomes in ``pending`` order."""
        refusals: dict[int, tuple[ErrorCode | int, str]] = {}
        items: list[IssuanceItem] = []
        owners: list[_Pending] = []
        for p, result in zip(pending, results):
            try:
                if not result.ok:
                    raise PolicyRefusal(ErrorCode(result.refusal_code or ErrorCode.INTERNAL), result.refusal_text)
                assert result.der is not None and result.spki_sha256 is not None
                if p.same_key_refusal is not None and result.spki_sha256 == p.same_key_refusal[0]:
                    raise PolicyRefusal(ErrorCode.KEY_REJECTED, p.same_key_refusal[1])
                record = _record(p, result)
                # Values of the service's own making (now: aware UTC, from _now): no checks again.
                audit = _trusted(AuditEvent, dict(kind=p.audit_kind, actor=p.actor, subject=record.device_id,
                                                  time=now, tenant=record.tenant, details=_issue_details(record, p)))
                items.append(_trusted(IssuanceItem, dict(record=record, request=p.request, audit=audit,
                                                         claim=p.claim)))
                owners.append(p)
            except PolicyRefusal as refusal:
                refusals[id(p)] = refusal.code, refusal.text
            except Exception:
                log.exception("preparing the commit of a certificate for %s failed", p.identity.key)
                refusals[id(p)] = ErrorCode.INTERNAL, "internal error; retry later"
        stored_all: list[CertificateRecord | RegistryError | None] = [None] * len(items)
        if items:
            try:
                stored_all = list(await self._registry.commit_issuances(items))
            except Exception:
                log.exception("committing a batch of %d certificates failed", len(items))
        issued: dict[int, Outcome] = {}
        for p, stored in zip(owners, stored_all):
            if isinstance(stored, CertificateRecord):
                assert p.request_id is not None
                issued[id(p)] = self._issued(stored, p.request_id, p.reply_topic)
            elif isinstance(stored, RequestIdReused):
                refusals[id(p)] = ErrorCode.REQUEST_ID_REUSED, str(stored)
            elif isinstance(stored, (ClaimRefused, UnknownClaim)):
                refusals[id(p)] = ErrorCode.CLAIM_REFUSED, str(stored)
            elif isinstance(stored, DuplicateSerial):
                refusals[id(p)] = ErrorCode.INTERNAL, f"retry: {stored}"
            else:
                if stored is not None:
                    log.error("committing a certificate for %s failed: %s", p.identity.key, stored)
                refusals[id(p)] = ErrorCode.INTERNAL, "internal error; retry later"
        refused = [p for p in pending if id(p) in refusals]
        outs = await asyncio.gather(*(
            self._refuse(p.identity, p.reply_topic, p.request_id, *refusals[id(p)], p.topic, now) for p in refused
        ))
        issued.update({id(p): o for p, o in zip(refused, outs)})
        return [issued[id(p)] for p in pending]

    # -- operators and feeds

    async def _revocation(
        self, identity: Identity, message: RevocationRequest, reply_topic: str | None, now: dt.datetime
    ) -> Outcome:
        outcome = await self._revoke(
            tenant=identity.tenant, reason=message.reason, actor=identity.key, serial=message.serial,
            device_id=message.device_id, profile=message.profile, now=now,
            details={"request_id": message.request_id},
        )
        reply = RevocationResult(request_id=message.request_id, serials=tuple(r.serial for r in outcome.revoked))
        replies = () if reply_topic is None else (Outgoing(reply_topic, encode(reply)),)
        return Outcome(replies=replies, revoked=outcome.revoked, deltas=outcome.deltas)

    async def _snapshot_request(
        self, identity: Identity, message: SnapshotRequest, reply_topic: str | None
    ) -> Outcome:
        own = await self._registry.get_certificate(identity.tenant, identity.serial)
        if own is None:
            raise PolicyRefusal(ErrorCode.UNKNOWN_CERTIFICATE, "the authenticating certificate is not registered")
        list_id = message.list_id if message.list_id is not None else own.status_list_id
        if list_id is None:
            raise PolicyRefusal(ErrorCode.UNKNOWN_CERTIFICATE, "this certificate has no status list: name a list id")
        try:
            snap = await self.snapshot(tenant=identity.tenant, region=own.region, list_id=list_id)
        except UnknownStatusList as exc:
            raise PolicyRefusal(ErrorCode.UNKNOWN_CERTIFICATE, str(exc)) from None
        return Outcome(replies=() if reply_topic is None else (Outgoing(reply_topic, encode(snap)),))

    # ------------------------------------------------------------------ operator API

    async def issue_direct(
        self, *, tenant: str, device_id: str, profile: Profile, csr_der: bytes, kind: CertificateKind,
        region: str | None = None, actor: str,
    ) -> CertificateRecord:
        """Issue and commit one certificate without a device request: factory batch signing,
        claim (``bootstrap``: ``device_id`` is the claim id) and operator certificates.

        The CSR is checked like any other (proof of possession, identity, key policy). Raises
        :class:`~.policy.PolicyRefusal` (with its wire code) when refused, ``ValueError`` for an
        unknown tenant or an unusable id. Audited as an ``issue`` by ``actor``.
        """
        kind = CertificateKind(kind)
        authority = self._authority(tenant)
        what = {CertificateKind.BOOTSTRAP: "claim id", CertificateKind.OPERATOR: "operator id"}.get(kind, "device id")
        reserved = RESERVED_OPERATOR_IDS if kind is CertificateKind.OPERATOR else frozenset()
        validate_identifier(device_id, what=what, reserved=reserved)
        if not isinstance(actor, str) or not actor:
            raise ValueError("actor must name who issues the certificate")
        now = self._now()
        try:
            authority.policy.profile(Profile(profile))
            chosen = self._region(tenant, region)
            slot = await self._slot(tenant, chosen)
            job = self._job(tenant, device_id, Profile(profile), chosen, slot, now, csr=csr_der)
            [result] = await self._signer.sign([job])
            if not result.ok:
                raise PolicyRefusal(ErrorCode(result.refusal_code or ErrorCode.INTERNAL), result.refusal_text)
        except PolicyRefusal as refusal:
            # Refused like a device request: the audit trail records who asked for what, and why.
            await self._audit_refusal(tenant, actor, device_id, refusal.code, refusal.text, now,
                                      {"stage": "issue_direct", "kind": str(kind), "profile": int(profile)})
            raise
        pending = _Pending(
            identity=Identity(tenant=tenant, kind=IdentityKind.OPERATOR, name=actor, serial=1,
                              spki_sha256=bytes(32), not_before=now, not_after=now),
            reply_topic=None, topic="", request_id=None, job=job, kind=kind, region=chosen, request=None,
            actor=actor,
        )
        record = _record(pending, result)
        audit = AuditEvent(kind=AuditKind.ISSUE, actor=actor, subject=device_id, time=now, tenant=tenant,
                           details=_issue_details(record, pending))
        return await self._registry.commit_issuance(record, request=None, audit=audit)

    async def register_claim(
        self, *, tenant: str, claim_id: str, policy: ClaimPolicy | Mapping[str, Any], actor: str
    ) -> None:
        """Store (or replace) the policy of claim credential ``claim_id``; audited as a policy change.

        ``policy`` may be a mapping: :class:`~.policy.PolicyError` lists every bad field.
        """
        self._authority(tenant)
        validate_identifier(claim_id, what="claim id")
        checked = load_claim_policy(policy)
        now = self._now()
        data = checked.model_dump(mode="json")
        await self._registry.put_claim(tenant, claim_id, data, audit=AuditEvent(
            kind=AuditKind.POLICY, actor=actor, subject=claim_id, time=now, tenant=tenant,
            details={"claim_policy": data},
        ))

    async def revoke(
        self, *, tenant: str, reason: RevocationReason, actor: str, serial: int | None = None,
        device_id: str | None = None, profile: Profile | None = None,
    ) -> Outcome:
        """Revoke by ``serial``, by ``device_id`` (optionally narrowed to ``profile``), or every
        certificate of ``profile`` in the tenant. The Outcome has no replies; ``revoked`` and
        ``deltas`` feed kicks and revocation feeds. An unknown serial raises
        :class:`~.policy.PolicyRefusal` with code ``UNKNOWN_CERTIFICATE``.
        """
        self._authority(tenant)
        return await self._revoke(tenant=tenant, reason=reason, actor=actor, serial=serial, device_id=device_id,
                                  profile=profile, now=self._now(), details={})

    async def _revoke(
        self, *, tenant: str, reason: RevocationReason, actor: str, serial: int | None, device_id: str | None,
        profile: Profile | None, now: dt.datetime, details: Mapping[str, Any],
    ) -> Outcome:
        reason = RevocationReason(reason)
        subject = f"serial:{serial:x}" if serial is not None else f"device:{device_id}" if device_id else "profile"
        try:
            done = await self._registry.revoke_selected(
                tenant, serial=serial, device_id=device_id, profile=None if profile is None else Profile(profile).label,
                reason=int(reason), at=now,
                audit=AuditEvent(kind=AuditKind.REVOKE, actor=actor, subject=subject, time=now, tenant=tenant,
                                 details={**details, "reason": int(reason)}),
            )
        except UnknownCertificate as exc:
            raise PolicyRefusal(ErrorCode.UNKNOWN_CERTIFICATE, str(exc)) from None
        return Outcome(replies=(), revoked=done.revoked, deltas=done.deltas)

    async def crl(
        self, *, tenant: str, region: str | None = None, delta: bool = False
    ) -> x509.CertificateRevocationList:
        """A full or delta CRL of ``tenant`` (or of its ``region`` shard), signed by its issuing key.

        CRL numbers of a shard increase across full and delta CRLs. A delta lists what was revoked
        since the shard's last full CRL, from the second of its thisUpdate on (inclusive: an entry
        revoked in that same second may be in both, never in neither), and names that CRL's
        number; a full CRL carries
        freshestCRL pointing at ``<crl url>.delta`` when the tenant has a ``crl_url``. A shard CRL
        needs the tenant's ``crl_url`` (its issuingDistributionPoint). ``ValueError`` when a delta
        is asked before any full CRL, or for an unusable region.
        """
        authority = self._authority(tenant)
        if region is not None:
            try:
                _check_region(region)
            except PolicyRefusal as exc:
                raise ValueError(exc.text) from None
        return await registry_crl(self._registry, authority, region=region, delta=delta, now=self._now(),
                                  lifetime=self._crl_lifetime)

    async def snapshot(self, *, tenant: str, region: str, list_id: int) -> RevocationSnapshot:
        """The status list ``list_id`` of ``tenant``'s ``region`` feed as a wire snapshot.

        Raises :class:`UnknownStatusList` when there is no such list.
        """
        self._authority(tenant)
        return await registry_snapshot(self._registry, tenant=tenant, region=region, list_id=list_id,
                                       now=self._now())


def _record(pending: _Pending, result: SignResult) -> CertificateRecord:
    assert result.der is not None and result.spki_sha256 is not None
    if result.not_before is not None and result.not_after is not None:  # as signed: no need to parse
        not_before = dt.datetime.fromtimestamp(result.not_before, dt.UTC)
        not_after = dt.datetime.fromtimestamp(result.not_after, dt.UTC)
    else:
        cert = x509.load_der_x509_certificate(result.der)
        not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    job = pending.job
    list_id, index = job.status_position if job.status_position is not None else (None, None)
    fields = dict(
        tenant=job.tenant, serial=job.serial, device_id=job.device_id, profile=job.profile.label,
        region=pending.region, not_before=not_before, not_after=not_after,
        der=result.der, spki_sha256=result.spki_sha256, issued_at=job.not_before, status_list_id=list_id,
        status_index=index, kind=pending.kind, replaced_serial=pending.replaced_serial,
    )
    if (type(result.der) is not bytes or not result.der or type(result.spki_sha256) is not bytes
            or len(result.spki_sha256) != 32 or not_after < not_before or type(pending.kind) is not CertificateKind):
        return CertificateRecord(**fields)  # the checks: a bad signer result raises, an odd one is normalised
    # Every other field is the service's own, made valid where it was made (serial from
    # random_serial, ids validated with the request, times aware UTC from the clock or the
    # signed epochs): the record needs none of the constructor's checks again.
    return _trusted(CertificateRecord, fields, status=CertificateStatus.ACTIVE, revoked_at=None,
                    revocation_reason=None)


def _trusted(cls: type[_T], fields: dict[str, Any], **rest: Any) -> _T:
    """A frozen dataclass value of ``cls`` from values the service made itself and knows valid,
    without ``__post_init__`` (every field given; tests check it equals the checked constructor's)."""
    value = object.__new__(cls)
    value.__dict__.update(fields, **rest)
    return value


def _issue_details(record: CertificateRecord, pending: _Pending) -> dict[str, Any]:
    details: dict[str, Any] = {
        "serial": f"{record.serial:x}", "profile": record.profile, "kind": str(record.kind),
        "region": record.region, "spki_sha256": record.spki_sha256, "not_after": record.not_after,
    }
    if pending.request_id is not None:
        details["request_id"] = pending.request_id
    if pending.replaced_serial is not None:
        details["replaced_serial"] = f"{pending.replaced_serial:x}"
    if pending.claim is not None:
        details["claim_id"] = pending.claim.claim_id
    return details


def _suggested_window(record: CertificateRecord, profile_policy: ProfilePolicy | None) -> RenewalWindow | None:
    """The profile's renewal window over the certificate's lifetime, in whole seconds (the wire's unit)."""
    if profile_policy is None:
        return None
    start_fraction, end_fraction = profile_policy.renewal_window
    try:
        window = renewal_window(not_before=record.not_before, not_after=record.not_after,
                                policy=RenewalPolicy(start=start_fraction, end=end_fraction))
    except ValueError:
        return None
    start = window.start.replace(microsecond=0)
    if start < window.start:
        start += dt.timedelta(seconds=1)
    end = window.end.replace(microsecond=0)
    return RenewalWindow(start=start, end=end) if start < end else None
