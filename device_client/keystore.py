"""Where a device's private keys live: files (mode 0600) or a PKCS#11 token.

Both stores hand out cryptography private-key objects, so CSRs and TLS use
them the same way. Keys are named by a *label* chosen by the caller (the
certificate store uses ``<profile>-<random hex>``).

* :class:`FileKeyStore` writes unencrypted PKCS#8 PEM with mode 0600 through
  :func:`device_client.files.atomic_write`; deleting overwrites then unlinks.
* :class:`Pkcs11KeyStore` generates EC keys on the token, sensitive and
  non-extractable; :class:`TokenEcKey` hashes on the host, asks the token for
  a raw ``CKM_ECDSA`` signature and DER-encodes ``r || s``, so
  ``CertificateSigningRequestBuilder().sign(key, SHA256())`` signs inside the
  token. python-pkcs11 is imported only when this store is used.

This module knows nothing of certificates, MQTT or the CA.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any, NoReturn, Protocol, runtime_checkable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, utils
from cryptography.utils import Buffer

from protocol.errors import CertmqError

from .files import atomic_write, destroy_file

__all__ = [
    "KEY_TYPES",
    "FileKeyStore",
    "KeyStore",
    "KeyStoreError",
    "Pkcs11KeyStore",
    "TokenEcKey",
    "generate_private_key",
]

#: Key types a device can generate: what the default tenant policy accepts and a token can hold.
KEY_TYPES = ("p256", "p384", "ed25519")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class KeyStoreError(CertmqError):
    """A key could not be generated, found, loaded or destroyed."""


def _check_label(label: str) -> str:
    if not isinstance(label, str) or not _LABEL.match(label):
        raise KeyStoreError(f"key label must be 1-64 of [A-Za-z0-9._-] starting alphanumeric, got {label!r}")
    return label


def generate_private_key(key_type: str = "p256") -> Any:
    """A fresh in-memory private key of ``key_type`` (one of :data:`KEY_TYPES`)."""
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise KeyStoreError(f"unknown key type {key_type!r} (known: {', '.join(KEY_TYPES)})")


@runtime_checkable
class KeyStore(Protocol):
    """What the certificate store and the client need from a key store."""

    kind: str

    def generate(self, label: str, key_type: str = "p256") -> Any:
        """Create and persist a new key called ``label``; refuse an existing label."""
        ...

    def load(self, label: str) -> Any:
        """The private key called ``label`` (``KeyStoreError`` if there is none)."""
        ...

    def exists(self, label: str) -> bool:
        """Whether a key called ``label`` is stored."""
        ...

    def delete(self, label: str) -> bool:
        """Destroy the key called ``label``; ``False`` if there was none."""
        ...

    def labels(self) -> list[str]:
        """Every stored key label."""
        ...


class FileKeyStore:
    """Private keys as ``<directory>/<label>.key.pem`` (PKCS#8, unencrypted, mode 0600)."""

    kind = "file"

    def __init__(self, *, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, label: str) -> Path:
        """Where the key called ``label`` is (or would be) stored."""
        return self.directory / f"{_check_label(label)}.key.pem"

    def generate(self, label: str, key_type: str = "p256") -> Any:
        path = self.path(label)
        if path.exists():
            raise KeyStoreError(f"a key labelled {label!r} already exists in {self.directory}")
        key = generate_private_key(key_type)
        self.save(label, key)
        return key

    def save(self, label: str, key: Any) -> None:
        """Store an existing private key (e.g. one generated elsewhere) as ``label``."""
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        atomic_write(self.path(label), pem, mode=0o600)

    def load(self, label: str) -> Any:
        path = self.path(label)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyStoreError(f"no key labelled {label!r} in {self.directory}") from None
        try:
            return serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyStoreError(f"key file {path} is not an unencrypted PEM private key: {exc}") from None

    def exists(self, label: str) -> bool:
        return self.path(label).exists()

    def delete(self, label: str) -> bool:
        return destroy_file(self.path(label))

    def labels(self) -> list[str]:
        return sorted(p.name[: -len(".key.pem")] for p in self.directory.glob("*.key.pem"))


class TokenEcKey(ec.EllipticCurvePrivateKey):
    """An EC private key on a PKCS#11 token: signs there, can never be exported."""

    def __init__(self, *, store: Pkcs11KeyStore, handle: Any, public: ec.EllipticCurvePublicKey, label: str) -> None:
        self._store = store
        self._handle = handle
        self._public = public
        self.label = label

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """Hash on the host, raw ECDSA on the token (``CKM_ECDSA``), DER ``SEQUENCE {r, s}`` out."""
        if not isinstance(signature_algorithm, ec.ECDSA) or signature_algorithm.deterministic_signing:
            raise KeyStoreError("token EC keys sign with (randomised) ECDSA only")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, utils.Prehashed):
            digest = bytes(data)
        else:
            h = hashes.Hash(algorithm)
            h.update(data)
            digest = h.finalize()
        pkcs11 = self._store._pkcs11
        with self._store._lock:
            try:
                raw = self._handle.sign(digest, mechanism=pkcs11.Mechanism.ECDSA)
            except pkcs11.PKCS11Error as exc:
                raise KeyStoreError(f"token refused to sign with key {self.label!r}: {type(exc).__name__}") from exc
        coord = (self.key_size + 7) // 8
        if len(raw) != 2 * coord:
            raise KeyStoreError(f"token returned a {len(raw)}-byte ECDSA signature, expected {2 * coord}")
        return utils.encode_dss_signature(int.from_bytes(raw[:coord], "big"), int.from_bytes(raw[coord:], "big"))

    def _never(self, what: str) -> NoReturn:
        raise KeyStoreError(f"{what} is impossible: key {self.label!r} never leaves the token")

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        self._never("ECDH on the host")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        self._never("reading the private numbers")

    def private_bytes(self, encoding: Any, format: Any, encryption_algorithm: Any) -> bytes:
        self._never("exporting the private key")

    def __copy__(self) -> TokenEcKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> TokenEcKey:
        return self

    def __repr__(self) -> str:
        return f"<TokenEcKey {self.curve.name} label={self.label!r}>"


_CURVE_NAMES = {"p256": ("secp256r1", ec.SECP256R1()), "p384": ("secp384r1", ec.SECP384R1())}


class Pkcs11KeyStore:
    """EC keys on a PKCS#11 token (a secure element, TPM2 via tpm2-pkcs11, SoftHSM2 in tests).

    Opens one read-write session logged in as user. If this process is already
    logged in to the token (PKCS#11 login state is per application), the new
    session shares that login.
    """

    kind = "pkcs11"

    def __init__(self, *, module: str | os.PathLike[str], token_label: str, pin: str) -> None:
        try:
            import pkcs11
            from pkcs11.util.ec import encode_named_curve_parameters
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise KeyStoreError("the PKCS#11 key store needs python-pkcs11 (pip install 'certmq[device-pkcs11]')") from exc
        self._pkcs11 = pkcs11
        self._encode_curve = encode_named_curve_parameters
        self._lock = threading.RLock()
        self.token_label = token_label
        if not Path(module).is_file():
            raise KeyStoreError(f"PKCS#11 module {module} does not exist")
        try:
            # resolved: python-pkcs11 caches libraries by path string, and a second C_Initialize fails
            token = pkcs11.lib(os.fspath(Path(module).resolve())).get_token(token_label=token_label)
        except pkcs11.NoSuchToken:
            raise KeyStoreError(f"no PKCS#11 token labelled {token_label!r} in {module}") from None
        try:
            self._session = token.open(rw=True, user_pin=pin)
        except pkcs11.UserAlreadyLoggedIn:
            self._session = token.open(rw=True)
        except pkcs11.PinIncorrect:
            raise KeyStoreError(f"wrong user PIN for PKCS#11 token {token_label!r}") from None
        except pkcs11.PKCS11Error as exc:
            raise KeyStoreError(f"cannot open token {token_label!r}: {type(exc).__name__} {exc}") from exc

    def close(self) -> None:
        """Close the session (the keys stay on the token)."""
        with self._lock:
            self._session.close()

    def _find(self, object_class: Any, label: str) -> Any:
        p = self._pkcs11
        try:
            return self._session.get_key(object_class=object_class, key_type=p.KeyType.EC, label=label)
        except p.NoSuchKey:
            return None

    def generate(self, label: str, key_type: str = "p256") -> TokenEcKey:
        _check_label(label)
        if key_type not in _CURVE_NAMES:
            raise KeyStoreError(f"a token key must be p256 or p384, not {key_type!r}")
        p = self._pkcs11
        curve_name, _ = _CURVE_NAMES[key_type]
        with self._lock:
            if self._find(p.ObjectClass.PRIVATE_KEY, label) is not None:
                raise KeyStoreError(f"a key labelled {label!r} already exists on token {self.token_label!r}")
            try:
                params = self._session.create_domain_parameters(
                    p.KeyType.EC, {p.Attribute.EC_PARAMS: self._encode_curve(curve_name)}, local=True
                )
                public, private = params.generate_keypair(
                    store=True,
                    label=label,
                    id=os.urandom(16),
                    public_template={p.Attribute.VERIFY: True, p.Attribute.TOKEN: True},
                    private_template={
                        p.Attribute.TOKEN: True,
                        p.Attribute.PRIVATE: True,
                        p.Attribute.SENSITIVE: True,
                        p.Attribute.EXTRACTABLE: False,
                        p.Attribute.SIGN: True,
                        p.Attribute.DERIVE: False,
                    },
                )
            except p.PKCS11Error as exc:
                raise KeyStoreError(f"generating key {label!r} on the token failed: {type(exc).__name__}") from exc
            if private[p.Attribute.EXTRACTABLE] or not private[p.Attribute.SENSITIVE]:
                private.destroy()
                public.destroy()
                raise KeyStoreError("the token did not honour SENSITIVE / non-EXTRACTABLE; key destroyed")
        return self.load(label)

    def load(self, label: str) -> TokenEcKey:
        p = self._pkcs11
        with self._lock:
            private = self._find(p.ObjectClass.PRIVATE_KEY, _check_label(label))
            public = self._find(p.ObjectClass.PUBLIC_KEY, label)
            if private is None or public is None:
                raise KeyStoreError(f"no EC key pair labelled {label!r} on token {self.token_label!r}")
            params = private[p.Attribute.EC_PARAMS]
            point = public[p.Attribute.EC_POINT]
        for name, curve in _CURVE_NAMES.values():
            if params == self._encode_curve(name):
                break
        else:
            raise KeyStoreError(f"key {label!r} is on a curve other than P-256 / P-384")
        return TokenEcKey(store=self, handle=private, public=_decode_point(point, curve), label=label)

    def exists(self, label: str) -> bool:
        with self._lock:
            return self._find(self._pkcs11.ObjectClass.PRIVATE_KEY, _check_label(label)) is not None

    def delete(self, label: str) -> bool:
        """Destroy the private and public key objects called ``label``."""
        p = self._pkcs11
        found = False
        with self._lock:
            for cls in (p.ObjectClass.PRIVATE_KEY, p.ObjectClass.PUBLIC_KEY):
                obj = self._find(cls, _check_label(label))
                if obj is not None:
                    obj.destroy()
                    found = True
        return found

    def labels(self) -> list[str]:
        p = self._pkcs11
        with self._lock:
            objs = self._session.get_objects({p.Attribute.CLASS: p.ObjectClass.PRIVATE_KEY})
            found: set[str] = set()
            for obj in objs:
                label = getattr(obj, "label", None)  # python-pkcs11 types objects as plain Object
                if isinstance(label, str) and _LABEL.match(label):
                    found.add(label)
            return sorted(found)


def _decode_point(raw: bytes, curve: ec.EllipticCurve) -> ec.EllipticCurvePublicKey:
    # CKA_EC_POINT is a DER OCTET STRING around the X9.62 point; some modules give it bare.
    coord = (curve.key_size + 7) // 8
    point = raw
    if not (len(raw) == 1 + 2 * coord and raw[0] == 0x04):
        if len(raw) < 2 or raw[0] != 0x04:
            raise KeyStoreError("token returned an unreadable CKA_EC_POINT")
        length, offset = raw[1], 2
        if length & 0x80:
            n = length & 0x7F
            length, offset = int.from_bytes(raw[2 : 2 + n], "big"), 2 + n
        point = raw[offset:]
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
    except ValueError as exc:
        raise KeyStoreError(f"token returned an invalid EC point: {exc}") from exc
