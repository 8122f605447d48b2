"""Revocation cache for gateways and validators: status lists from a region's feed, answered in O(1).

Feed (``docs/wire-format.md`` section 7): a retained RevocationSnapshot per
status list on ``certmq/v1/{tenant}/rev/{region}/snapshot`` and sequenced
RevocationDeltas on ``.../delta``. :meth:`RevocationCache.handle` takes each
``(topic, payload)``; a delta that does not follow the held sequence is a
gap (:class:`protocol.errors.SequenceGap`): it is not applied, the list is
marked *stale*, and the ``request_snapshot`` callback (if any) is asked for a
fresh snapshot; the next snapshot clears the mark.

Answers (:meth:`RevocationCache.status`) come from the certificate's
status-position extension (:mod:`protocol.extensions`): one bit lookup.
``UNKNOWN`` means "no list held for that position" or "no position in the
certificate"; ``STALE`` means "bit clear, but the list is behind a gap" --
revocation only ever sets bits, so a set bit is REVOKED even while stale.
:meth:`RevocationCache.is_revoked` raises :class:`StatusUnknown` for UNKNOWN
and, with ``strict=True`` (the default), for STALE.

Feed authenticity: every payload goes through ``verifier(topic, payload)``
first. **There is no default**. Feeds are signed by the tenant CA
(COSE_Sign1, ``docs/wire-format.md`` section 9): pass
:class:`device_client.feedverify.SignedFeedVerifier` (from the tenant CA
certificate), which returns the verified inner message bytes and refuses
unsigned and foreign-signed data. A verifier returning ``True`` accepts the
payload itself as an unsigned message: only :func:`trust_broker_acl` does that
(authenticity from the broker's ACL and TLS alone), an explicit, greppable
choice for legacy unsigned feeds, not a silent one.

Snapshots arrive on ``.../snapshot`` (the region's newest list) and
``.../snapshot/{list_id}`` (every list, retained). Gap recovery: the
``request_snapshot(list_id)`` callback should send a SnapshotRequest and give
the reply to :meth:`RevocationCache.handle_snapshot_reply` -- the broker answers
with the list's signed snapshot (a COSE_Sign1, the same bytes it retains), which
goes through the verifier like any feed message -- or re-subscribe to the list's
retained snapshot topic (:meth:`RevocationCache.list_snapshot_topic`). A cache
with a signature-checking verifier refuses an unsigned (decoded) reply.

State persists in one file (atomic replace) after every applied change, so a
restart answers at once and resumes the feed from the held sequence.
This module knows no MQTT library.
"""

from __future__ import annotations

import enum
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from protocol import codec, extensions, topics
from protocol.errors import CertmqError, DecodeError, RemoteProtocolError, SequenceGap
from protocol.messages import RevocationDelta, RevocationSnapshot
from protocol.statuslist import StatusList, compress, decompress

from .files import atomic_write

__all__ = ["FeedRejected", "FeedVerifier", "RevocationCache", "RevocationStatus", "StatusUnknown", "trust_broker_acl"]

log = logging.getLogger("certmq.revocation")

FeedVerifier = Callable[[str, bytes], "bool | bytes"]
"""``verifier(topic, payload)``: verified inner message bytes, ``True`` (accept ``payload`` unsigned), or ``False``."""


def trust_broker_acl(topic: str, payload: bytes) -> bool:
    """Accept every feed message: authenticity rests on the broker's ACL and TLS alone (a deliberate choice)."""
    return True


class RevocationStatus(enum.Enum):
    """The answer for one certificate."""

    GOOD = "good"
    REVOKED = "revoked"
    STALE = "stale"  #: bit clear, but the list missed deltas and awaits a snapshot
    UNKNOWN = "unknown"  #: no position in the certificate, or its list is not held


class StatusUnknown(CertmqError):
    """:meth:`RevocationCache.is_revoked` cannot answer (see :class:`RevocationStatus`)."""

    def __init__(self, msg: str, *, status: RevocationStatus) -> None:
        super().__init__(msg)
        self.status = status


class FeedRejected(CertmqError):
    """A feed message failed the verifier, or was for another tenant/region, or was malformed."""


class RevocationCache:
    """Status lists of one tenant and region, fed by :meth:`handle`, persisted in ``path``."""

    def __init__(
        self,
        *,
        tenant: str,
        region: str,
        path: str | os.PathLike[str],
        verifier: FeedVerifier,
        request_snapshot: Callable[[int], None] | None = None,
    ) -> None:
        if not callable(verifier):
            raise TypeError("verifier must be a callable (topic, payload) -> bool; see trust_broker_acl")
        self.tenant = topics.validate_identifier(tenant, what="tenant")
        self.region = topics.validate_identifier(region, what="region")
        self.path = Path(path)
        self.verifier = verifier
        self.request_snapshot = request_snapshot
        self.lists: dict[int, StatusList] = {}
        self.stale: dict[int, int] = {}  #: list id -> sequence a snapshot must reach to end the gap
        self._load()

    @property
    def snapshot_topic(self) -> str:
        return topics.snapshot_topic(self.tenant, self.region)

    @property
    def delta_topic(self) -> str:
        return topics.delta_topic(self.tenant, self.region)

    def list_snapshot_topic(self, list_id: int) -> str:
        """``.../rev/{region}/snapshot/{list_id}``: where list ``list_id``'s signed snapshot is retained."""
        return f"{self.snapshot_topic}/{int(list_id)}"

    def is_feed_topic(self, topic: str) -> bool:
        """Whether ``topic`` is one of this cache's feed topics (delta, snapshot, per-list snapshot)."""
        return topic == self.delta_topic or self._is_snapshot_topic(topic)

    def _is_snapshot_topic(self, topic: str) -> bool:
        if topic == self.snapshot_topic:
            return True
        head, _, tail = topic.rpartition("/")
        return head == self.snapshot_topic and tail.isdigit() and tail == str(int(tail))

    def _verified(self, topic: str, payload: bytes) -> bytes:
        result = self.verifier(topic, payload)
        if result is True:
            return payload
        if isinstance(result, (bytes, bytearray)) and result:
            return bytes(result)
        raise FeedRejected(f"feed message on {topic} refused by the verifier")

    # -- persistence -----------------------------------------------------------------

    def _load(self) -> None:
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return
        except ValueError as exc:
            raise CertmqError(f"revocation cache {self.path} is not valid JSON: {exc}") from None
        for entry in raw.get("lists", []):
            size = entry["size"]
            bits = decompress(bytes.fromhex(entry["bits"]), size)
            self.lists[entry["list_id"]] = StatusList(list_id=entry["list_id"], size=size, sequence=entry["sequence"], bits=bits)
        self.stale = {int(k): v for k, v in raw.get("stale", {}).items()}

    def _save(self) -> None:
        lists = [
            {"list_id": sl.list_id, "size": sl.size, "sequence": sl.sequence, "bits": compress(sl.bits, sl.size).hex()}
            for sl in self.lists.values()
        ]
        data = json.dumps({"version": 1, "tenant": self.tenant, "region": self.region, "lists": lists,
                           "stale": {str(k): v for k, v in sorted(self.stale.items())}}).encode()
        atomic_write(self.path, data, mode=0o644)

    # -- feed ------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> bool:
        """Apply one feed message; returns whether the cache changed.

        Raises :class:`FeedRejected` (nothing changes) for an unverified,
        misaddressed or malformed message. A gap is not an error: it marks the
        list stale and asks for a snapshot.
        """
        is_snapshot = self._is_snapshot_topic(topic)
        if not is_snapshot and topic != self.delta_topic:
            raise FeedRejected(f"{topic!r} is not this cache's feed ({self.tenant}/{self.region})")
        inner = self._verified(topic, payload)
        try:
            message = codec.decode(inner)
        except DecodeError as exc:
            raise FeedRejected(f"undecodable feed message on {topic}: {exc}") from None
        try:
            if isinstance(message, RevocationSnapshot) and is_snapshot:
                if topic != self.snapshot_topic and topic != self.list_snapshot_topic(message.list_id):
                    raise FeedRejected(f"snapshot of list {message.list_id} on {topic}")
                return self._snapshot(message)
            if isinstance(message, RevocationDelta) and topic == self.delta_topic:
                return self._delta(message)
        except RemoteProtocolError as exc:
            raise FeedRejected(f"invalid feed message on {topic}: {exc}") from None
        raise FeedRejected(f"a {type(message).__name__} does not belong on {topic}")

    def handle_snapshot_reply(self, message: RevocationSnapshot | bytes) -> bool:
        """Apply a snapshot that answered a SnapshotRequest (on the requester's own reply topic).

        ``bytes`` (the signed snapshot, COSE_Sign1) go through the verifier like a feed message;
        anything but a verified snapshot is refused with :class:`FeedRejected`, nothing changes.
        A decoded (unsigned) snapshot is refused when the verifier requires signatures.
        """
        if isinstance(message, (bytes, bytearray)):
            inner = self._verified(self.snapshot_topic, bytes(message))
            try:
                message = codec.decode(inner)  # type: ignore[assignment]
            except DecodeError as exc:
                raise FeedRejected(f"undecodable snapshot reply: {exc}") from None
            if not isinstance(message, RevocationSnapshot):
                raise FeedRejected(f"a {type(message).__name__} is not a snapshot reply")
        elif getattr(self.verifier, "requires_signature", False):
            raise FeedRejected("unsigned snapshot reply refused: this cache accepts signed feed data only")
        try:
            return self._snapshot(message)
        except RemoteProtocolError as exc:
            raise FeedRejected(f"invalid snapshot reply: {exc}") from None

    def _snapshot(self, snap: RevocationSnapshot) -> bool:
        held = self.lists.get(snap.list_id)
        if held is None:
            self.lists[snap.list_id] = StatusList.from_snapshot(snap)
            changed = True
        else:
            changed = held.apply_snapshot(snap)
        if snap.list_id in self.stale and self.lists[snap.list_id].sequence >= self.stale[snap.list_id]:
            del self.stale[snap.list_id]
            changed = True
        if changed:
            self._save()
        return changed

    def _delta(self, delta: RevocationDelta) -> bool:
        held = self.lists.get(delta.list_id)
        if held is None:
            self._gap(delta.list_id, delta.to_sequence, f"delta for list {delta.list_id}, which is not held")
            return False
        try:
            applied = held.apply_delta(delta)
        except SequenceGap as exc:
            self._gap(delta.list_id, delta.to_sequence, str(exc))
            return False
        if applied:
            self._save()
        return applied

    def _gap(self, list_id: int, needed: int, why: str) -> None:
        log.warning("revocation feed gap: %s; waiting for a snapshot", why)
        if self.stale.get(list_id, -1) < needed:
            self.stale[list_id] = needed
            self._save()
        if self.request_snapshot is not None:
            self.request_snapshot(list_id)

    # -- answers ---------------------------------------------------------------------

    def status(self, certificate: x509.Certificate) -> RevocationStatus:
        """The revocation status of ``certificate`` from its status-position extension (O(1))."""
        try:
            ext = certificate.extensions.get_extension_for_oid(x509.ObjectIdentifier(extensions.STATUS_POSITION_OID))
            value = ext.value
            assert isinstance(value, x509.UnrecognizedExtension)
            list_id, index = extensions.decode_status_position(value.value)
        except (x509.ExtensionNotFound, DecodeError):
            return RevocationStatus.UNKNOWN
        held = self.lists.get(list_id)
        if held is None or index >= held.size:
            return RevocationStatus.UNKNOWN
        if held.is_revoked(index):
            return RevocationStatus.REVOKED
        return RevocationStatus.STALE if list_id in self.stale else RevocationStatus.GOOD

    def is_revoked(self, certificate: x509.Certificate, *, strict: bool = True) -> bool:
        """True when revoked; raises :class:`StatusUnknown` when the cache cannot say (STALE too if ``strict``)."""
        status = self.status(certificate)
        if status is RevocationStatus.REVOKED:
            return True
        if status is RevocationStatus.GOOD or (status is RevocationStatus.STALE and not strict):
            return False
        raise StatusUnknown(f"revocation status is {status.value}", status=status)
