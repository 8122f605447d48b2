"""PKCS#11 CA keys (HSMs; SoftHSM2 in tests) as cryptography private-key objects.

The CA key is generated on the token as non-extractable and sensitive, and never leaves
it. :class:`HsmEcPrivateKey` subclasses cryptography's ``EllipticCurvePrivateKey``, so
``x509.CertificateBuilder().sign(hsm_key, hashes.SHA256())`` and the CRL builder's
``sign`` just work: cryptography's Rust x509 code recognises the key type through the
Python ABC (``isinstance``) and then calls the object's own ``sign(data, ECDSA(hash))``
method, which hashes on the host, asks the token for a raw ``CKM_ECDSA`` signature (SoftHSM
2.6 has no ``CKM_ECDSA_SHA256``) and DER-encodes ``r || s``.

Sessions and threads. PKCS#11 login state belongs to the *application* (the process),
not to a session: a second ``C_Login`` fails with ``USER_ALREADY_LOGGED_IN`` and one
``C_Logout`` logs every session out. So this module keeps one logged-in session per
(module, token) per process, shared by reference count between :class:`HsmSession`
handles, and serialises every call on it with one lock (python-pkcs11 >= 0.8 locks a single
sign operation, but object searches and attribute reads are several C calls each). One
token session therefore signs one thing at a time; HSM throughput comes from several
processes. Sessions do not survive ``fork()``: open the signer *in* each worker process
(pass the ``pkcs11:`` URI, not the key object, which refuses to be pickled).

This module knows nothing of certificates, policy or MQTT; python-pkcs11 is imported
here only, so the rest of the CA runs without it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pkcs11
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.utils import Buffer
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from .signers import SignerError

__all__ = [
    "MODULE_ENV",
    "MODULE_CANDIDATES",
    "HsmError",
    "HsmEcPrivateKey",
    "HsmSession",
    "find_key",
    "find_module",
    "generate_ec_key",
]

MODULE_ENV = "CERTMQ_PKCS11_MODULE"
"""Environment variable naming the PKCS#11 module when none is configured."""

MODULE_CANDIDATES: tuple[str, ...] = (
    "/usr/lib/softhsm/libsofthsm2.so",  # Debian, Ubuntu
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",  # Fedora, RHEL
    "/usr/lib/pkcs11/libsofthsm2.so",  # Arch, Alpine
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",  # source builds, FreeBSD
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",  # macOS
)
"""Where :func:`find_module` looks when neither a path nor :data:`MODULE_ENV` is given."""

_CURVES: dict[str, tuple[ec.EllipticCurve, str]] = {
    "p256": (ec.SECP256R1(), "secp256r1"),
    "p384": (ec.SECP384R1(), "secp384r1"),
}


class HsmError(SignerError):
    """A PKCS#11 module, token, login, key or signature problem, with the token named."""


def find_module(path: str | Path | None = None) -> Path:
    """The PKCS#11 module to load: ``path`` if given, else ``$CERTMQ_PKCS11_MODULE``, else the
    first of :data:`MODULE_CANDIDATES` that exists."""
    chosen = path if path is not None else os.environ.get(MODULE_ENV) or None
    if chosen is not None:
        module = Path(chosen)
        if not module.is_file():
            raise HsmError(f"PKCS#11 module {module} does not exist")
        return module
    for candidate in MODULE_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    raise HsmError(
        f"no PKCS#11 module found (looked in {', '.join(MODULE_CANDIDATES)}); "
        f"install softhsm2 or your HSM's module, or set module-path / {MODULE_ENV}"
    )


@dataclass(eq=False)
class _SharedLogin:
    session: Any  # pkcs11.Session
    pin_digest: bytes
    pid: int
    token_label: str
    lock: threading.RLock = field(default_factory=threading.RLock)
    refs: int = 0


_registry: dict[tuple[str, str, int], _SharedLogin] = {}
_registry_lock = threading.Lock()


def _pin_digest(module: Path, token_serial: str, pin: bytes) -> bytes:
    # only to compare a later caller's PIN with the one that logged in; never stored elsewhere
    return hashlib.sha256(b"certmq-pin\0" + os.fsencode(module) + b"\0" + token_serial.encode() + b"\0" + pin).digest()


class HsmSession:
    """A logged-in handle on one token. Open with :meth:`HsmSession.open`; ``close()`` when done.

    Handles on the same token in one process share one PKCS#11 session (see the module doc);
    :attr:`lock` serialises all use of it.
    """

    def __init__(self, *, _shared: _SharedLogin, _key: tuple[str, str, int], module: Path) -> None:
        self._shared = _shared
        self._key = _key
        self.module = module
        self._closed = False

    @classmethod
    def open(cls, *, module: str | Path | None, token_label: str, pin: bytes | str) -> HsmSession:
        """Load ``module`` (see :func:`find_module`), find the token labelled ``token_label`` and log
        in as user with ``pin``."""
        module_path = find_module(module).resolve()
        pin_bytes = pin.encode() if isinstance(pin, str) else bytes(pin)
        if not pin_bytes:
            raise HsmError(f"empty user PIN for PKCS#11 token {token_label!r}")
        try:
            pin_text = pin_bytes.decode("utf-8")  # python-pkcs11 takes a str and encodes it
        except UnicodeDecodeError:
            raise HsmError(f"the user PIN for token {token_label!r} is not UTF-8") from None
        try:
            lib = pkcs11.lib(str(module_path))
        except pkcs11.PKCS11Error as exc:
            raise HsmError(f"cannot load PKCS#11 module {module_path}: {type(exc).__name__} {exc}") from exc
        except OSError as exc:
            raise HsmError(f"cannot load PKCS#11 module {module_path}: {exc}") from exc
        try:
            token = lib.get_token(token_label=token_label)
        except pkcs11.NoSuchToken:
            labels = sorted(t.label for t in lib.get_tokens())
            raise HsmError(
                f"no token labelled {token_label!r} in {module_path} (tokens present: {labels or 'none'})"
            ) from None
        except pkcs11.MultipleTokensReturned:
            raise HsmError(f"several tokens are labelled {token_label!r} in {module_path}; labels must be unique") from None
        serial = token.serial.decode(errors="replace") if isinstance(token.serial, bytes) else str(token.serial)
        key = (str(module_path), serial, os.getpid())
        digest = _pin_digest(module_path, serial, pin_bytes)
        with _registry_lock:
            shared = _registry.get(key)
            if shared is not None:
                if not hmac.compare_digest(shared.pin_digest, digest):
                    raise HsmError(f"wrong user PIN for PKCS#11 token {token_label!r} (this process is logged in with another)")
            else:
                session = _login(token, token_label, pin_text)
                shared = _SharedLogin(session=session, pin_digest=digest, pid=os.getpid(), token_label=token_label)
                _registry[key] = shared
            shared.refs += 1
        return cls(_shared=shared, _key=key, module=module_path)

    @property
    def token_label(self) -> str:
        """The label of the token this session is logged in to."""
        return self._shared.token_label

    @property
    def lock(self) -> threading.RLock:
        """Hold this around any direct use of :attr:`raw` (this module's own calls already do)."""
        return self._shared.lock

    @property
    def raw(self) -> Any:
        """The underlying ``pkcs11.Session`` (shared; use under :attr:`lock`)."""
        self._check_usable()
        return self._shared.session

    def _check_usable(self) -> None:
        if self._closed:
            raise HsmError(f"the session on token {self.token_label!r} is closed")
        if self._shared.pid != os.getpid():
            raise HsmError("PKCS#11 sessions do not survive fork(): open the signer in this process")

    def close(self) -> None:
        """Release this handle; the last one on a token logs out and closes the session."""
        if self._closed:
            return
        self._closed = True
        with _registry_lock:
            self._shared.refs -= 1
            if self._shared.refs > 0 or self._shared.pid != os.getpid():
                return
            _registry.pop(self._key, None)
        with self._shared.lock:
            try:
                self._shared.session.close()
            except pkcs11.PKCS11Error as exc:
                raise HsmError(f"closing the session on token {self.token_label!r} failed: {type(exc).__name__}") from exc

    def __enter__(self) -> HsmSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<HsmSession token={self.token_label!r} module={str(self.module)!r} {state}>"


def _login(token: Any, token_label: str, pin: str) -> Any:
    try:
        try:
            return token.open(rw=True, user_pin=pin)
        except pkcs11.TokenWriteProtected:
            return token.open(rw=False, user_pin=pin)  # a read-only token can still sign
    except pkcs11.PinIncorrect:
        raise HsmError(f"wrong user PIN for PKCS#11 token {token_label!r}") from None
    except pkcs11.PinLocked:
        raise HsmError(f"the user PIN of PKCS#11 token {token_label!r} is locked (too many wrong PINs)") from None
    except (pkcs11.PinLenRange, pkcs11.PinInvalid):
        raise HsmError(f"the user PIN for PKCS#11 token {token_label!r} has an invalid length or characters") from None
    except pkcs11.UserPinNotInitialized:
        raise HsmError(f"PKCS#11 token {token_label!r} has no user PIN set (initialise it first)") from None
    except pkcs11.PKCS11Error as exc:
        raise HsmError(f"cannot log in to PKCS#11 token {token_label!r}: {type(exc).__name__} {exc}") from exc


def _decode_ec_point(raw: bytes, curve: ec.EllipticCurve) -> ec.EllipticCurvePublicKey:
    """CKA_EC_POINT is a DER OCTET STRING around the X9.62 point (PKCS#11 2.40); a few modules
    return the bare point, so accept both."""
    coord = (curve.key_size + 7) // 8
    bare_len = 1 + 2 * coord
    point = raw
    if not (len(raw) == bare_len and raw[0] == 0x04):
        if len(raw) < 2 or raw[0] != 0x04:
            raise HsmError("token returned an unreadable CKA_EC_POINT")
        length, offset = raw[1], 2
        if length & 0x80:
            n = length & 0x7F
            length, offset = int.from_bytes(raw[2 : 2 + n], "big"), 2 + n
        point = raw[offset:]
        if len(point) != length:
            raise HsmError("token returned a CKA_EC_POINT with a bad DER length")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
    except ValueError as exc:
        raise HsmError(f"token returned an invalid EC point: {exc}") from exc


def _curve_of(params: bytes) -> ec.EllipticCurve:
    for curve, name in _CURVES.values():
        if params == encode_named_curve_parameters(name):
            return curve
    raise HsmError("the token key is on a curve certmq does not use (only P-256 and P-384)")


class HsmEcPrivateKey(ec.EllipticCurvePrivateKey):
    """An EC private key that lives on a PKCS#11 token. Signs; cannot be exported or used for ECDH.

    Get one from :func:`find_key`, :func:`generate_ec_key` or ``open_signer("pkcs11:...")``.
    """

    def __init__(self, *, session: HsmSession, handle: Any, public: ec.EllipticCurvePublicKey, label: str) -> None:
        self._session = session
        self._handle = handle
        self._public = public
        self.label = label
        #: set by ``open_signer``: :meth:`close` then also releases the session it opened
        self.owns_session = False

    @property
    def session(self) -> HsmSession:
        """The token session this key signs through."""
        return self._session

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """ECDSA-sign ``data``: hash here, raw ECDSA on the token, DER ``SEQUENCE {r, s}`` out."""
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise HsmError(f"HSM EC keys sign with ECDSA only, not {type(signature_algorithm).__name__}")
        if signature_algorithm.deterministic_signing:
            raise HsmError("deterministic ECDSA (RFC 6979) is not available from a PKCS#11 token")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, utils.Prehashed):
            digest = bytes(data)
            if len(digest) != algorithm.digest_size:
                raise HsmError(f"prehashed data is {len(digest)} bytes, expected {algorithm.digest_size}")
        else:
            h = hashes.Hash(algorithm)
            h.update(data)
            digest = h.finalize()
        with self._session.lock:
            self._session._check_usable()
            try:
                raw = self._handle.sign(digest, mechanism=Mechanism.ECDSA)
            except pkcs11.PKCS11Error as exc:
                raise HsmError(
                    f"token {self._session.token_label!r} refused to sign with key {self.label!r}: {type(exc).__name__} {exc}"
                ) from exc
        coord = (self.key_size + 7) // 8
        if len(raw) != 2 * coord:
            raise HsmError(f"token returned a {len(raw)}-byte ECDSA signature, expected {2 * coord}")
        return utils.encode_dss_signature(int.from_bytes(raw[:coord], "big"), int.from_bytes(raw[coord:], "big"))

    def _impossible(self, what: str) -> NoReturn:
        raise HsmError(f"{what} is not possible with an HSM key: key {self.label!r} never leaves token {self._session.token_label!r}")

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        self._impossible("ECDH key exchange")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        self._impossible("reading the private numbers")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        self._impossible("exporting the private key")

    def __copy__(self) -> HsmEcPrivateKey:
        return self  # a handle: copies would share the token object anyway

    def __deepcopy__(self, memo: dict[int, object]) -> HsmEcPrivateKey:
        return self

    def __reduce__(self) -> NoReturn:
        raise HsmError("an HSM key cannot be pickled to another process: pass its pkcs11: URI and open it there")

    def close(self) -> None:
        """Release the session if this key was opened by ``open_signer`` (otherwise a no-op)."""
        if self.owns_session:
            self._session.close()

    def __repr__(self) -> str:
        return f"<HsmEcPrivateKey {self.curve.name} label={self.label!r} token={self._session.token_label!r}>"


def _find_one(session: HsmSession, object_class: ObjectClass, label: str) -> Any:
    try:
        return session.raw.get_key(object_class=object_class, key_type=KeyType.EC, label=label)
    except pkcs11.NoSuchKey:
        return None
    except pkcs11.MultipleObjectsReturned:
        raise HsmError(f"several {object_class.name.lower()} EC objects labelled {label!r} on token {session.token_label!r}") from None


def find_key(token: HsmSession, label: str) -> HsmEcPrivateKey:
    """The EC private key labelled ``label`` on ``token`` (its public key object must be there too)."""
    with token.lock:
        private = _find_one(token, ObjectClass.PRIVATE_KEY, label)
        if private is None:
            raise HsmError(f"no EC private key labelled {label!r} on token {token.token_label!r}")
        public = _find_one(token, ObjectClass.PUBLIC_KEY, label)
        if public is None:
            raise HsmError(f"EC key {label!r} on token {token.token_label!r} has no public key object with the same label")
        try:
            curve = _curve_of(private[Attribute.EC_PARAMS])
            point = public[Attribute.EC_POINT]
        except pkcs11.PKCS11Error as exc:
            raise HsmError(f"cannot read key {label!r} on token {token.token_label!r}: {type(exc).__name__}") from exc
    return HsmEcPrivateKey(session=token, handle=private, public=_decode_ec_point(point, curve), label=label)


def generate_ec_key(token: HsmSession, label: str, curve: str = "p256") -> HsmEcPrivateKey:
    """Generate a persistent EC key pair labelled ``label`` on ``token``.

    The private key is created sensitive and non-extractable (checked after generation);
    ``curve`` is ``"p256"`` or ``"p384"``. An existing key with the label is refused.
    """
    curve_key = str(curve).lower()
    if curve_key not in _CURVES:
        raise HsmError(f"unsupported curve {curve!r} for an HSM CA key (use p256 or p384)")
    if not label:
        raise HsmError("an HSM key needs a non-empty label")
    _, curve_name = _CURVES[curve_key]
    with token.lock:
        session = token.raw
        if not session.rw:
            raise HsmError(f"token {token.token_label!r} is read-only: cannot generate keys on it")
        for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            if _find_one(token, cls, label) is not None:
                raise HsmError(f"a key labelled {label!r} already exists on token {token.token_label!r}")
        try:
            params = session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve_name)}, local=True
            )
            public, private = params.generate_keypair(
                store=True,
                label=label,
                id=secrets.token_bytes(16),  # CKA_ID pairs the two halves, as tools like pkcs11-tool expect
                public_template={Attribute.VERIFY: True, Attribute.TOKEN: True},
                private_template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.SIGN: True,
                    Attribute.DERIVE: False,
                },
            )
        except pkcs11.PKCS11Error as exc:
            raise HsmError(f"generating {curve_key} key {label!r} on token {token.token_label!r} failed: {type(exc).__name__} {exc}") from exc
        if private[Attribute.EXTRACTABLE] or not private[Attribute.SENSITIVE]:
            # a token that silently ignored the template: do not leave an exportable CA key behind
            private.destroy()
            public.destroy()
            raise HsmError(f"token {token.token_label!r} did not honour SENSITIVE/non-EXTRACTABLE; key destroyed")
        point = public[Attribute.EC_POINT]
    return HsmEcPrivateKey(session=token, handle=private, public=_decode_ec_point(point, _CURVES[curve_key][0]), label=label)
