"""protocol.feedsig: signed revocation feeds (COSE_Sign1) -- never accept unsigned or foreign-signed data."""

from __future__ import annotations

import datetime as dt
import random

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa

from protocol import codec, feedsig
from protocol.codes import RevocationReason
from protocol.errors import DecodeError, LocalProtocolError
from protocol.messages import Error, RevocationDelta
from vectors import vectors

UTC = dt.timezone.utc
DELTA = vectors()["revocation-delta"]
SNAPSHOT = vectors()["revocation-snapshot"]

KEYS = {
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "ml-dsa-44": mldsa.MLDSA44PrivateKey.generate,
    "ml-dsa-65": mldsa.MLDSA65PrivateKey.generate,
}


def sign(key: object, payload: bytes) -> bytes:
    """What the CA side does: to_be_signed, sign with its key, encode."""
    public = key.public_key()  # type: ignore[attr-defined]
    alg = feedsig.alg_for_key(public)
    protected, tbs = feedsig.to_be_signed(alg=alg, kid=feedsig.key_id(public), payload=payload)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        h = hashes.SHA256() if alg == feedsig.ALG_ES256 else hashes.SHA384()
        der = key.sign(tbs, ec.ECDSA(h))
    else:
        der = key.sign(tbs)  # type: ignore[attr-defined]
    return feedsig.encode_signed(protected=protected, payload=payload, signature=feedsig.signature_from_der(alg, der))


@pytest.fixture(scope="module", params=sorted(KEYS))
def key(request: pytest.FixtureRequest) -> object:
    return KEYS[request.param]()


def keyring(*keys: object) -> dict[bytes, object]:
    return {feedsig.key_id(k.public_key()): k.public_key() for k in keys}  # type: ignore[attr-defined]


def test_signed_delta_and_snapshot_open_with_the_ca_key(key: object) -> None:
    for message in (DELTA, SNAPSHOT):
        data = sign(key, codec.encode(message))
        assert feedsig.open_feed(data, keyring(key)) == message


def test_ecdsa_signature_is_fixed_length_r_s() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    feed = feedsig.decode_signed(sign(key, codec.encode(DELTA)))
    assert feed.alg == feedsig.ALG_ES256 and len(feed.signature) == 64


def test_foreign_signed_data_is_refused(key: object) -> None:
    other = KEYS["p256"]()
    data = sign(other, codec.encode(DELTA))
    with pytest.raises(feedsig.FeedSignatureError, match="unknown key"):
        feedsig.open_feed(data, keyring(key))


def test_a_forged_kid_does_not_help() -> None:
    # The attacker signs with its own key but claims the CA's kid.
    ca, attacker = KEYS["p256"](), KEYS["p256"]()
    payload = codec.encode(DELTA)
    protected, tbs = feedsig.to_be_signed(alg=feedsig.ALG_ES256, kid=feedsig.key_id(ca.public_key()), payload=payload)
    sig = feedsig.signature_from_der(feedsig.ALG_ES256, attacker.sign(tbs, ec.ECDSA(hashes.SHA256())))
    forged = feedsig.encode_signed(protected=protected, payload=payload, signature=sig)
    with pytest.raises(feedsig.FeedSignatureError, match="does not verify"):
        feedsig.open_feed(forged, keyring(ca))


def test_unsigned_messages_are_refused() -> None:
    with pytest.raises(DecodeError):
        feedsig.open_feed(codec.encode(DELTA), {})


@pytest.mark.parametrize("part", ["payload", "signature", "protected"])
def test_any_tampering_is_detected(key: object, part: str) -> None:
    outer = cbor2.loads(sign(key, codec.encode(DELTA)))
    if part == "payload":
        inner = cbor2.loads(outer[2])
        inner[5] = [1]  # "un-revoke" indices
        outer[2] = cbor2.dumps(inner, canonical=True)
    elif part == "signature":
        outer[3] = bytes([outer[3][0] ^ 1]) + outer[3][1:]
    else:
        outer[0] = cbor2.dumps({1: feedsig.alg_for_key(key.public_key()), 4: bytes(16)}, canonical=True)  # type: ignore[attr-defined]
    with pytest.raises((feedsig.FeedSignatureError, DecodeError)):
        feedsig.open_feed(cbor2.dumps(outer, canonical=True), keyring(key))


def test_signed_non_feed_message_is_refused() -> None:
    key = KEYS["ed25519"]()
    data = sign(key, codec.encode(Error(code=1, text="x")))
    with pytest.raises(DecodeError, match="snapshot or delta"):
        feedsig.open_feed(data, keyring(key))


def test_building_with_bad_parameters_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        feedsig.to_be_signed(alg=-999, kid=bytes(16), payload=b"")
    with pytest.raises(LocalProtocolError):
        feedsig.to_be_signed(alg=feedsig.ALG_ES256, kid=b"short", payload=b"")
    with pytest.raises(LocalProtocolError):
        feedsig.alg_for_key(ec.generate_private_key(ec.SECP521R1()).public_key())


def test_mutations_raise_only_decode_or_signature_errors() -> None:
    key = KEYS["ed25519"]()
    ring = keyring(key)
    seed = sign(key, codec.encode(RevocationDelta(
        list_id=1, from_sequence=1, to_sequence=2, indices=(5, 9), reason=RevocationReason.SUPERSEDED,
        time=dt.datetime(2026, 11, 27, tzinfo=UTC),
    )))
    rng = random.Random(5)
    for _ in range(3000):
        buf = bytearray(seed)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(buf))
            buf[i] = rng.randrange(256)
        if rng.random() < 0.2:
            del buf[rng.randrange(len(buf)):]
        try:
            feedsig.open_feed(bytes(buf), ring)
        except (DecodeError, feedsig.FeedSignatureError):
            pass


def test_documented_signed_feed_vector() -> None:
    # docs/wire-format.md section 9 shows this exact signed delta (Ed25519 is deterministic).
    import re

    from vectors import DOC, _key

    block = re.search(r"```hex feed-vector=signed-revocation-delta\n(.*?)```", DOC.read_text(), re.S)
    assert block, "the signed feed vector is missing from docs/wire-format.md"
    documented = bytes.fromhex(block.group(1).replace("\n", " "))
    ca = _key("example issuing CA")
    assert sign(ca, codec.encode(DELTA)) == documented
    assert feedsig.open_feed(documented, keyring(ca)) == DELTA
