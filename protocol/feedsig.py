"""Signed revocation feeds: COSE_Sign1 (RFC 9052) around an encoded snapshot or delta.

A validator must be able to trust a feed message wherever it got it (a
retained copy, a bridge, a cache), so the tenant CA signs every snapshot and
delta. The wire form is an *untagged* COSE_Sign1 array::

    [ protected: bstr .cbor {1: alg, 4: kid}, unprotected: {}, payload: bstr, signature: bstr ]

``payload`` is the certmq message exactly as :func:`protocol.codec.encode`
gives it (a RevocationSnapshot or RevocationDelta); the signature is over the
RFC 9052 ``Sig_structure`` ``["Signature1", protected, h'', payload]``.
``kid`` is :func:`key_id` of the signing CA's public key, so validators holding
several tenant CAs (or a CA mid-rotation) pick the right key without trying all.

Algorithms (COSE numbers): ES256 (-7, P-256 + SHA-256), ES384 (-35, P-384 +
SHA-384), EdDSA (-8, Ed25519), ML-DSA-44 (-48) and ML-DSA-65 (-49). ECDSA
signatures are the fixed-length ``r || s`` COSE uses, not DER.

Sans-I/O: this module builds the bytes to sign and verifies signatures (both
deterministic); *making* a signature needs entropy and a key, so the caller
signs :func:`to_be_signed` output with its key (file, HSM or ML-DSA) and hands
the result to :func:`encode_signed`. :func:`signature_from_der` converts the
DER ECDSA signature a cryptography or HSM key returns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from . import codec
from .codes import ErrorCode
from .errors import DecodeError, LocalProtocolError, RemoteProtocolError
from .messages import RevocationDelta, RevocationSnapshot

__all__ = [
    "ALG_ES256",
    "ALG_ES384",
    "ALG_EDDSA",
    "ALG_ML_DSA_44",
    "ALG_ML_DSA_65",
    "FeedSignatureError",
    "SignedFeed",
    "alg_for_key",
    "decode_signed",
    "encode_signed",
    "key_id",
    "open_feed",
    "signature_from_der",
    "to_be_signed",
    "verify_signed",
]

ALG_ES256: Final = -7
ALG_ES384: Final = -35
ALG_EDDSA: Final = -8
ALG_ML_DSA_44: Final = -48
ALG_ML_DSA_65: Final = -49
KID_SIZE: Final = 16

_EC_SIZES: Final = {ALG_ES256: 32, ALG_ES384: 48}
_HASHES: Final = {ALG_ES256: hashes.SHA256, ALG_ES384: hashes.SHA384}
#: RFC 9052 section 4.4: the context string of a COSE_Sign1 signature.
_CONTEXT: Final = "Signature1"


class FeedSignatureError(RemoteProtocolError):
    """A feed message whose signature is missing, malformed, unknown-keyed or wrong."""


@dataclass(frozen=True, kw_only=True)
class SignedFeed:
    """A decoded COSE_Sign1 feed message (signature not yet checked)."""

    alg: int
    kid: bytes
    protected: bytes
    payload: bytes
    signature: bytes


def key_id(public_key: object) -> bytes:
    """First 16 bytes of SHA-256 over the key's DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()[:KID_SIZE]


def alg_for_key(public_key: object) -> int:
    """The COSE algorithm certmq uses for a CA public key; LocalProtocolError for others."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if isinstance(public_key.curve, ec.SECP256R1):
            return ALG_ES256
        if isinstance(public_key.curve, ec.SECP384R1):
            return ALG_ES384
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return ALG_EDDSA
    if isinstance(public_key, mldsa.MLDSA44PublicKey):
        return ALG_ML_DSA_44
    if isinstance(public_key, mldsa.MLDSA65PublicKey):
        return ALG_ML_DSA_65
    raise LocalProtocolError(f"no feed signature algorithm for {type(public_key).__name__}")


def _protected(alg: int, kid: bytes) -> bytes:
    return bytes(cbor2.dumps({1: alg, 4: kid}, canonical=True))


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    return bytes(cbor2.dumps([_CONTEXT, protected, b"", payload], canonical=True))


def to_be_signed(*, alg: int, kid: bytes, payload: bytes) -> tuple[bytes, bytes]:
    """``(protected, tbs)``: sign ``tbs`` with the CA key, then call :func:`encode_signed`."""
    if alg not in (ALG_ES256, ALG_ES384, ALG_EDDSA, ALG_ML_DSA_44, ALG_ML_DSA_65):
        raise LocalProtocolError(f"unsupported feed signature algorithm {alg}")
    if len(kid) != KID_SIZE:
        raise LocalProtocolError(f"kid must be {KID_SIZE} bytes")
    protected = _protected(alg, kid)
    return protected, _sig_structure(protected, payload)


def signature_from_der(alg: int, signature: bytes) -> bytes:
    """COSE signature bytes from what a key's ``sign()`` returned (DER for ECDSA, raw otherwise)."""
    size = _EC_SIZES.get(alg)
    if size is None:
        return signature
    r, s = decode_dss_signature(signature)
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def encode_signed(*, protected: bytes, payload: bytes, signature: bytes) -> bytes:
    """The untagged COSE_Sign1 array."""
    return bytes(cbor2.dumps([protected, {}, payload, signature], canonical=True))


def decode_signed(data: object) -> SignedFeed:
    """Parse a COSE_Sign1 feed message; DecodeError for anything that is not one."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > codec.MAX_FEED_BYTES + 8192:
        raise DecodeError("signed feed message over the size limit", code=ErrorCode.TOO_LARGE)
    codec._scan(data)  # the same bounded, strict walk as every certmq message
    try:
        outer = cbor2.loads(data)
    except Exception as exc:
        raise DecodeError(f"invalid CBOR: {exc}") from None
    if type(outer) is not list or len(outer) != 4:
        raise DecodeError("a signed feed message is a 4-element COSE_Sign1 array")
    protected, unprotected, payload, signature = outer
    if type(protected) is not bytes or type(unprotected) is not dict or type(payload) is not bytes:
        raise DecodeError("COSE_Sign1 fields have the wrong types")
    if type(signature) is not bytes:
        raise DecodeError("COSE_Sign1 signature must be a byte string")
    try:
        header = cbor2.loads(protected)
    except Exception as exc:
        raise DecodeError(f"protected header is not CBOR: {exc}") from None
    if type(header) is not dict or set(header) != {1, 4}:
        raise DecodeError("protected header must hold exactly alg (1) and kid (4)")
    alg, kid = header[1], header[4]
    if type(alg) is not int or type(kid) is not bytes or len(kid) != KID_SIZE:
        raise DecodeError("protected header: alg must be an integer, kid 16 bytes")
    if protected != _protected(alg, kid):
        raise DecodeError("protected header is not deterministically encoded")
    return SignedFeed(alg=alg, kid=kid, protected=protected, payload=payload, signature=signature)


def verify_signed(feed: SignedFeed, public_key: object) -> None:
    """Check ``feed``'s signature with ``public_key``; FeedSignatureError when it does not verify."""
    expected = alg_for_key(public_key)
    if feed.alg != expected:
        raise FeedSignatureError(f"feed signed with algorithm {feed.alg}, key needs {expected}")
    if feed.kid != key_id(public_key):
        raise FeedSignatureError("feed kid does not name this key")
    tbs = _sig_structure(feed.protected, feed.payload)
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            size = _EC_SIZES[feed.alg]
            if len(feed.signature) != 2 * size:
                raise FeedSignatureError("ECDSA signature has the wrong length")
            r = int.from_bytes(feed.signature[:size], "big")
            s = int.from_bytes(feed.signature[size:], "big")
            public_key.verify(encode_dss_signature(r, s), tbs, ec.ECDSA(_HASHES[feed.alg]()))
        else:
            public_key.verify(feed.signature, tbs)  # type: ignore[attr-defined]
    except (InvalidSignature, ValueError):
        raise FeedSignatureError("feed signature does not verify") from None


def open_feed(data: object, keys: Mapping[bytes, object]) -> RevocationSnapshot | RevocationDelta:
    """Decode, verify against ``keys`` (kid -> public key) and decode the inner snapshot or delta.

    Raises DecodeError for malformed input and FeedSignatureError for an
    unknown key or a bad signature; never returns unsigned or foreign-signed data.
    """
    feed = decode_signed(data)
    key = keys.get(feed.kid)
    if key is None:
        raise FeedSignatureError(f"feed signed by an unknown key {feed.kid.hex()}")
    verify_signed(feed, key)
    message = codec.decode(feed.payload)
    if not isinstance(message, (RevocationSnapshot, RevocationDelta)):
        raise DecodeError(f"a signed feed carries a snapshot or delta, not {type(message).__name__}")
    return message
