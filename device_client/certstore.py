"""The dual-slot certificate store: per profile a *current*, a *next* and a *previous* slot.

A slot is a certificate, its chain and the label of its private key in a
:class:`~device_client.keystore.KeyStore`. A new certificate goes to *next*
(:meth:`CertStore.stage`, after the same validation as
:func:`device_client.enroll.validate_certificate`); it becomes *current* only
once a real connection with it worked (:meth:`CertStore.promote` with a
``prove`` callback). If the broker refuses it, *next* is discarded and
*current* is untouched. The old current is kept as *previous*.

On disk (``directory``)::

    state.json             which slot is current / next / previous per profile,
                           the pending request per profile, the server's window
    slots/<slot id>/       cert.pem (leaf), chain.pem, key.json (key label)
    keys/                  the FileKeyStore's keys, when that store is used

Crash safety: a slot directory is written complete under a temp name, fsynced
and renamed *before* ``state.json`` names it; ``state.json`` is replaced
atomically (:func:`device_client.files.atomic_write`). So after a crash at any
step the state file names only complete slots, and whatever it does not name
(half-written slots, keys generated for a request never recorded, the
discarded old *previous*) is garbage, removed when the store is next opened.
Only keys whose label starts with :data:`KEY_PREFIX` are ever collected, so a
bootstrap key or another application's key on a shared token is never touched.

This module knows nothing of MQTT; it does not read the clock (callers pass ``now``).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from protocol.codes import Profile
from protocol.errors import CertmqError
from protocol.renewal import RenewalWindow

from . import faults
from .enroll import DEFAULT_SKEW, InvalidCertificate, load_certificates, same_public_key, validate_certificate, verify_chain
from .files import atomic_write, fsync_directory
from .keystore import KeyStore

__all__ = [
    "KEY_PREFIX",
    "STATE_VERSION",
    "CertStore",
    "CertStoreError",
    "PendingRequest",
    "RotationRejected",
    "Slot",
]

STATE_VERSION = 1
#: Labels of keys this store generates (and may garbage-collect).
KEY_PREFIX = "certmq-"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class CertStoreError(CertmqError):
    """The store's directory is unusable, or an operation is not possible in its state."""


class RotationRejected(CertStoreError):
    """The broker refused the *next* certificate; it was discarded and *current* kept."""

    def __init__(self, msg: str, *, reason: str) -> None:
        super().__init__(msg)
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class Slot:
    """One stored certificate with its chain and key label."""

    slot_id: str
    profile: Profile
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key_label: str
    directory: Path

    @property
    def serial(self) -> int:
        """The certificate's serial number."""
        return self.certificate.serial_number

    @property
    def not_before(self) -> datetime:
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    @property
    def cert_path(self) -> Path:
        """PEM file of the leaf certificate (for TLS stacks that want paths)."""
        return self.directory / "cert.pem"

    @property
    def chain_path(self) -> Path:
        """PEM file of leaf + chain, leaf first (``load_cert_chain``'s certfile)."""
        return self.directory / "fullchain.pem"


@dataclass(frozen=True, kw_only=True)
class PendingRequest:
    """A request sent (or about to be) and not yet answered: retried with the same id after a restart.

    ``kind`` is ``"request"`` (CertificateRequest), ``"renewal"`` (RenewalRequest) or
    ``"factory"`` (a CSR written to a file, the certificate to be imported later).
    """

    request_id: bytes
    kind: str
    key_label: str
    csr: bytes | None = None
    current_serial: int | None = None
    reuse_key: bool = False
    created: datetime = field(default=_EPOCH)

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id.hex(),
            "kind": self.kind,
            "key_label": self.key_label,
            "csr": None if self.csr is None else base64.b64encode(self.csr).decode(),
            "current_serial": self.current_serial,
            "reuse_key": self.reuse_key,
            "created": int(self.created.timestamp()),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PendingRequest:
        return cls(
            request_id=bytes.fromhex(raw["request_id"]),
            kind=raw["kind"],
            key_label=raw["key_label"],
            csr=None if raw.get("csr") is None else base64.b64decode(raw["csr"]),
            current_serial=raw.get("current_serial"),
            reuse_key=bool(raw.get("reuse_key", False)),
            created=datetime.fromtimestamp(raw.get("created", 0), timezone.utc),
        )


def _pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _write_synced(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class CertStore:
    """Per-profile current / next / previous certificate slots in ``directory`` (see module doc).

    ``trust`` are the CA certificates issued certificates must chain to.
    Opening the store collects garbage left by an interrupted operation.
    """

    def __init__(
        self,
        *,
        directory: str | os.PathLike[str],
        keystore: KeyStore,
        trust: Sequence[x509.Certificate],
        device_id: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.keystore = keystore
        self.trust = tuple(trust)
        self.device_id = device_id
        self._slots_dir = self.directory / "slots"
        self._state_path = self.directory / "state.json"
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._slots_dir.mkdir(exist_ok=True, mode=0o700)
        self._state = self._read_state()
        self._cache: dict[str, Slot] = {}
        self.collect_garbage()

    # -- state file ------------------------------------------------------------------

    def _read_state(self) -> dict[str, Any]:
        try:
            raw = self._state_path.read_bytes()
        except FileNotFoundError:
            return {"version": STATE_VERSION, "profiles": {}}
        try:
            state = json.loads(raw)
        except ValueError as exc:
            raise CertStoreError(f"{self._state_path} is not valid JSON: {exc}") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise CertStoreError(f"{self._state_path}: unknown state version {state.get('version') if isinstance(state, dict) else state!r}")
        return cast("dict[str, Any]", state)

    def _entry(self, profile: Profile) -> dict[str, Any]:
        entry: dict[str, Any] = self._state["profiles"].setdefault(profile.label, {})
        return entry

    def _commit_state(self, new_state: dict[str, Any]) -> None:
        atomic_write(self._state_path, json.dumps(new_state, sort_keys=True, indent=1).encode(), mode=0o600)
        self._state = new_state

    def _edit(self, profile: Profile, **changes: Any) -> None:
        new_state = json.loads(json.dumps(self._state))
        entry = new_state["profiles"].setdefault(profile.label, {})
        entry.update(changes)
        self._commit_state(new_state)

    # -- reading ---------------------------------------------------------------------

    def profiles(self) -> list[Profile]:
        """Profiles with any slot or pending request."""
        return sorted(Profile.from_label(label) for label, e in self._state["profiles"].items() if any(e.values()))

    def _slot(self, profile: Profile, which: str) -> Slot | None:
        slot_id = self._state["profiles"].get(profile.label, {}).get(which)
        if slot_id is None:
            return None
        if slot_id not in self._cache:
            self._cache[slot_id] = self._load_slot(profile, slot_id)
        return self._cache[slot_id]

    def _load_slot(self, profile: Profile, slot_id: str) -> Slot:
        directory = self._slots_dir / slot_id
        try:
            certs = load_certificates((directory / "cert.pem").read_bytes())
            chain_raw = (directory / "chain.pem").read_bytes()
            chain = tuple(load_certificates(chain_raw)) if chain_raw.strip() else ()
            meta = json.loads((directory / "key.json").read_bytes())
        except (OSError, ValueError, InvalidCertificate) as exc:
            raise CertStoreError(f"slot {slot_id} of {profile.label} in {self.directory} is unreadable: {exc}") from None
        return Slot(slot_id=slot_id, profile=profile, certificate=certs[0], chain=chain,
                    key_label=meta["key_label"], directory=directory)

    def current(self, profile: Profile = Profile.IDENTITY) -> Slot | None:
        """The certificate in use for ``profile``, if any."""
        return self._slot(profile, "current")

    def next(self, profile: Profile = Profile.IDENTITY) -> Slot | None:
        """A staged certificate not yet proven by a connection, if any."""
        return self._slot(profile, "next")

    def previous(self, profile: Profile = Profile.IDENTITY) -> Slot | None:
        """The certificate current before the last promotion, if kept."""
        return self._slot(profile, "previous")

    def key(self, slot: Slot) -> Any:
        """The private key of ``slot``, from the key store."""
        return self.keystore.load(slot.key_label)

    def pending(self, profile: Profile = Profile.IDENTITY) -> PendingRequest | None:
        """The unanswered request for ``profile``, if one was recorded."""
        raw = self._state["profiles"].get(profile.label, {}).get("pending")
        return None if raw is None else PendingRequest.from_json(raw)

    def suggested_window(self, profile: Profile = Profile.IDENTITY) -> RenewalWindow | None:
        """The renewal window the server suggested with the current certificate, if any."""
        raw = self._state["profiles"].get(profile.label, {}).get("suggested")
        if not raw:
            return None
        return RenewalWindow(start=datetime.fromtimestamp(raw[0], timezone.utc), end=datetime.fromtimestamp(raw[1], timezone.utc))

    def check_usable(self, profile: Profile, *, now: datetime, allow_expired: bool = False) -> Slot:
        """The current slot after checking its key matches and its chain verifies; ``CertStoreError`` otherwise."""
        slot = self.current(profile)
        if slot is None:
            raise CertStoreError(f"no current {profile.label} certificate in {self.directory}")
        key = self.key(slot)
        if not same_public_key(slot.certificate.public_key(), key.public_key()):
            raise CertStoreError(f"the current {profile.label} certificate does not match its key {slot.key_label!r}")
        if not allow_expired and slot.not_after <= now:
            raise CertStoreError(f"the current {profile.label} certificate expired at {slot.not_after.isoformat()}")
        verify_chain(slot.certificate, intermediates=slot.chain, trust=self.trust, now=now)
        return slot

    # -- writing ---------------------------------------------------------------------

    def new_key(self, profile: Profile, key_type: str = "p256") -> tuple[str, Any]:
        """Generate a key for a new certificate of ``profile``: ``(label, private key)``.

        Until a pending request or a slot names the label, the key is garbage
        (collected on the next open if the process dies now).
        """
        label = f"{KEY_PREFIX}{profile.label}-{secrets.token_hex(8)}"
        key = self.keystore.generate(label, key_type)
        faults.point("store.key_generated")
        return label, key

    def set_pending(self, profile: Profile, pending: PendingRequest) -> None:
        """Record ``pending`` durably (before it is sent, so a restart re-sends the same id)."""
        self._edit(profile, pending=pending.to_json())
        faults.point("store.pending_recorded")

    def clear_pending(self, profile: Profile) -> None:
        """Forget the pending request of ``profile`` (its key is collected unless a slot uses it)."""
        self._edit(profile, pending=None)
        self.collect_garbage()

    def stage(
        self,
        profile: Profile,
        *,
        certificate: x509.Certificate,
        chain: Sequence[x509.Certificate] = (),
        key_label: str,
        now: datetime,
        suggested: RenewalWindow | None = None,
        skew: timedelta = DEFAULT_SKEW,
    ) -> Slot:
        """Validate ``certificate`` and put it in *next* (replacing any staged one); clears the pending request.

        Raises :class:`~device_client.enroll.InvalidCertificate` (nothing changes) when
        it fails validation against ``trust``, the key ``key_label`` or ``profile``.
        """
        key = self.keystore.load(key_label)
        validate_certificate(certificate, chain=chain, trust=self.trust, public_key=key.public_key(),
                             profile=profile, now=now, device_id=self.device_id, skew=skew)
        slot_id = secrets.token_hex(8)
        tmp = self._slots_dir / f".{slot_id}.tmp"
        tmp.mkdir(mode=0o700)
        _write_synced(tmp / "cert.pem", _pem([certificate]))
        _write_synced(tmp / "chain.pem", _pem(chain))
        _write_synced(tmp / "fullchain.pem", _pem([certificate, *chain]))
        _write_synced(tmp / "key.json", json.dumps({"key_label": key_label, "keystore": self.keystore.kind}).encode())
        faults.point("slot.files_written")
        fsync_directory(tmp)
        faults.point("slot.dir_synced")
        os.rename(tmp, self._slots_dir / slot_id)
        fsync_directory(self._slots_dir)
        faults.point("slot.renamed")
        window = None if suggested is None else [int(suggested.start.timestamp()), int(suggested.end.timestamp())]
        self._edit(profile, next=slot_id, pending=None, next_suggested=window)
        faults.point("store.staged")
        self.collect_garbage()
        slot = self.next(profile)
        assert slot is not None
        return slot

    def commit(self, profile: Profile) -> Slot:
        """Make *next* current (the old current becomes *previous*). Use :meth:`promote` to prove it first."""
        entry = self._entry(profile)
        if entry.get("next") is None:
            raise CertStoreError(f"no staged {profile.label} certificate to commit")
        self._edit(profile, previous=entry.get("current"), current=entry["next"], next=None,
                   suggested=entry.get("next_suggested"), next_suggested=None)
        faults.point("store.committed")
        self.collect_garbage()
        slot = self.current(profile)
        assert slot is not None
        return slot

    def discard_next(self, profile: Profile) -> None:
        """Drop the staged certificate of ``profile``; *current* is untouched."""
        self._edit(profile, next=None, next_suggested=None)
        faults.point("store.discarded")
        self.collect_garbage()

    def restore_previous(self, profile: Profile) -> Slot:
        """Make *previous* current again (the broker stopped accepting the new one)."""
        entry = self._entry(profile)
        if entry.get("previous") is None:
            raise CertStoreError(f"no previous {profile.label} certificate to restore")
        self._edit(profile, current=entry["previous"], previous=None, suggested=None)
        self.collect_garbage()
        slot = self.current(profile)
        assert slot is not None
        return slot

    async def promote(self, profile: Profile, prove: Callable[[Slot], Awaitable[None]], *, now: datetime) -> Slot:
        """Prove *next* with ``prove(slot)`` (a real connection with it), then make it current.

        ``prove`` raising :class:`~device_client.transport.ConnectionRefused` means the broker
        rejected the certificate: *next* is discarded and :class:`RotationRejected` raised.
        Any other exception propagates and *next* stays staged for a later try.
        """
        from .transport import ConnectionRefused  # transport imports nothing from here; avoid a cycle at import

        slot = self.next(profile)
        if slot is None:
            raise CertStoreError(f"no staged {profile.label} certificate to promote")
        if slot.not_before > now + DEFAULT_SKEW:
            raise CertStoreError(f"the staged certificate is not valid before {slot.not_before.isoformat()}")
        try:
            await prove(slot)
        except ConnectionRefused as exc:
            self.discard_next(profile)
            raise RotationRejected(f"the broker refused the new {profile.label} certificate: {exc.reason}", reason=exc.reason) from exc
        faults.point("store.proven")
        return self.commit(profile)

    def collect_garbage(self) -> None:
        """Remove slot directories, temp files and ``certmq-`` keys no state entry names."""
        live_slots: set[str] = set()
        live_keys: set[str] = set()
        for entry in self._state["profiles"].values():
            for which in ("current", "next", "previous"):
                if entry.get(which):
                    live_slots.add(entry[which])
            if entry.get("pending"):
                live_keys.add(entry["pending"]["key_label"])
        for slot_id in live_slots:
            try:
                live_keys.add(json.loads((self._slots_dir / slot_id / "key.json").read_bytes())["key_label"])
            except (OSError, ValueError, KeyError):
                pass  # _load_slot reports it when the slot is used
        for path in self._slots_dir.iterdir():
            if path.name not in live_slots:
                shutil.rmtree(path, ignore_errors=True)
                self._cache.pop(path.name, None)
                faults.point("gc.slot_removed")
        for tmp in self.directory.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        key_dir = getattr(self.keystore, "directory", None)
        if isinstance(key_dir, Path):
            for tmp in key_dir.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        for label in self.keystore.labels():
            if label.startswith(KEY_PREFIX) and label not in live_keys:
                self.keystore.delete(label)
                faults.point("gc.key_removed")
