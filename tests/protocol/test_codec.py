"""protocol.codec: round trips, strictness, limits, and "decode raises DecodeError and nothing else"."""

from __future__ import annotations

import datetime as dt
import os
import random
from functools import lru_cache

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import codec
from protocol import messages as m
from protocol.codes import ErrorCode, MessageType, Profile, RevocationReason
from protocol.errors import DecodeError, LocalProtocolError, UnknownMessageType
from protocol.renewal import RenewalWindow
from vectors import example_certificate, example_csr, vectors

UTC = dt.timezone.utc


def busy(**extra: object) -> dict[int, object]:
    base: dict[int, object] = {0: 1, 1: 9, 2: bytes(16), 3: 30, 4: "full", 5: 7}
    base.update({int(k[1:]): v for k, v in extra.items()})
    return base


# --- round trips ------------------------------------------------------------------------

request_ids = st.binary(min_size=16, max_size=16)
ders = st.binary(min_size=1, max_size=600)
profiles = st.sampled_from(list(Profile))
reasons = st.sampled_from(list(RevocationReason))
serials = st.integers(min_value=1, max_value=2**160 - 1)
uint32 = st.integers(min_value=0, max_value=2**32 - 1)
times = st.integers(min_value=0, max_value=253402300799).map(
    lambda s: dt.datetime(1970, 1, 1, tzinfo=UTC) + dt.timedelta(seconds=s)
)
identifiers = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=16
)


@lru_cache(maxsize=None)
def p256_certificate(n: int) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"device-{n}")])
    now = dt.datetime(2026, 1, 1, tzinfo=UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


certificates = st.sampled_from([0, 1, 2]).map(p256_certificate) | st.just(example_certificate())


@st.composite
def windows(draw: st.DrawFn) -> RenewalWindow:
    a, b = sorted(draw(st.lists(times, min_size=2, max_size=2, unique=True)))
    return RenewalWindow(start=a, end=b)


@st.composite
def deltas(draw: st.DrawFn) -> m.RevocationDelta:
    start = draw(st.integers(min_value=0, max_value=2**40))
    return m.RevocationDelta(
        list_id=draw(uint32),
        from_sequence=start,
        to_sequence=start + draw(st.integers(min_value=1, max_value=1000)),
        indices=tuple(sorted(draw(st.sets(uint32, max_size=50)))),
        reason=draw(reasons),
        time=draw(times),
    )


@st.composite
def revocation_requests(draw: st.DrawFn) -> m.RevocationRequest:
    if draw(st.booleans()):
        return m.RevocationRequest(request_id=draw(request_ids), reason=draw(reasons), serial=draw(serials))
    return m.RevocationRequest(
        request_id=draw(request_ids),
        reason=draw(reasons),
        device_id=draw(identifiers),
        profile=draw(st.none() | profiles),
    )


@st.composite
def renewal_requests(draw: st.DrawFn) -> m.RenewalRequest:
    reuse = draw(st.booleans())
    return m.RenewalRequest(
        request_id=draw(request_ids),
        profile=draw(profiles),
        current_serial=draw(serials),
        csr=None if reuse else draw(ders),
        reuse_key=reuse,
    )


MESSAGES = {
    m.CertificateRequest: st.builds(
        m.CertificateRequest,
        request_id=request_ids,
        profile=profiles,
        csr=ders,
        provisioning=st.none()
        | st.builds(m.ProvisioningParameters, device_id=st.none() | identifiers, region=st.none() | identifiers),
    ),
    m.RenewalRequest: renewal_requests(),
    m.CertificateIssued: st.builds(
        m.CertificateIssued,
        request_id=request_ids,
        certificate=certificates,
        chain=st.lists(certificates, max_size=m.MAX_CHAIN_LENGTH).map(tuple),
        renewal_window=st.none() | windows(),
    ),
    m.RevocationRequest: revocation_requests(),
    m.RevocationResult: st.builds(
        m.RevocationResult, request_id=request_ids, serials=st.lists(serials, max_size=20).map(tuple)
    ),
    m.RevocationSnapshot: st.builds(
        m.RevocationSnapshot,
        list_id=uint32,
        sequence=st.integers(min_value=0, max_value=2**63 - 1),
        size=st.integers(min_value=0, max_value=2**24),
        bits=st.binary(max_size=200),
        time=times,
    ),
    m.RevocationDelta: deltas(),
    m.SnapshotRequest: st.builds(m.SnapshotRequest, request_id=request_ids, list_id=st.none() | uint32),
    m.Error: st.builds(
        m.Error,
        code=st.sampled_from(list(ErrorCode)) | st.integers(min_value=100, max_value=65535),
        text=st.text(max_size=60),
        request_id=st.none() | request_ids,
        retry_after=st.none() | uint32,
    ),
}


def test_a_strategy_for_every_message_type() -> None:
    assert set(MESSAGES) == set(m.MESSAGE_CLASSES.values())


@pytest.mark.parametrize("cls", list(MESSAGES), ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip(cls: type, data: st.DataObject) -> None:
    message = data.draw(MESSAGES[cls])
    encoded = codec.encode(message)
    assert codec.decode(encoded) == message
    # Deterministic: re-encoding the decoded form gives the same bytes, and cbor2's canonical
    # encoder agrees with ours about what those bytes are.
    assert codec.encode(codec.decode(encoded)) == encoded
    assert cbor2.dumps(cbor2.loads(encoded), canonical=True) == encoded


def test_unknown_error_code_is_carried_not_crashed_on() -> None:
    decoded = codec.decode(cbor2.dumps(busy(_3=777), canonical=True))
    assert isinstance(decoded, m.Error) and decoded.code == 777 and not decoded.transient


def test_certificate_issued_reads_serial_validity_and_position_from_the_certificate() -> None:
    issued = vectors()["certificate-issued"]
    assert isinstance(issued, m.CertificateIssued)
    cert = x509.load_der_x509_certificate(issued.certificate)
    assert issued.serial == cert.serial_number == 0x5E1A1_C0FFEE_0123456789ABCDEF
    assert issued.not_before == dt.datetime(2026, 1, 15, tzinfo=UTC)
    assert issued.not_after == dt.datetime(2028, 1, 15, tzinfo=UTC)
    assert issued.status_position == m.StatusPosition(list_id=3, index=1042)


# --- sizes (the numbers; bench/sizes.py prints them against JSON+base64) --------


def test_request_with_a_p256_csr_is_at_most_300_bytes() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sensor-000000000042")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    message = m.CertificateRequest(
        request_id=os.urandom(16),
        profile=Profile.IDENTITY,
        csr=csr,
        provisioning=m.ProvisioningParameters(device_id="sensor-000000000042", region="eu-west-1"),
    )
    assert len(codec.encode(message)) <= 300


def test_issued_reply_costs_at_most_51_bytes_over_the_certificate() -> None:
    # 549-byte certificate + 51 = the 600-byte budget, with a renewal window.
    cert = p256_certificate(0)
    message = m.CertificateIssued(
        request_id=os.urandom(16),
        certificate=cert,
        renewal_window=RenewalWindow(
            start=dt.datetime(2027, 1, 1, tzinfo=UTC), end=dt.datetime(2027, 3, 1, tzinfo=UTC)
        ),
    )
    assert len(codec.encode(message)) - len(cert) <= 51


def test_delta_indices_cost_at_most_8_bytes_each() -> None:
    rng = random.Random(7)
    indices = tuple(sorted(rng.sample(range(10_000_000), 1000)))
    delta = m.RevocationDelta(
        list_id=1,
        from_sequence=41,
        to_sequence=42,
        indices=indices,
        reason=RevocationReason.KEY_COMPROMISE,
        time=dt.datetime(2026, 11, 27, tzinfo=UTC),
    )
    assert len(codec.encode(delta)) / len(indices) <= 8


# --- strictness -----------------------------------------------------------------------


# X.509 version 6 does not exist: cryptography raises InvalidVersion, not ValueError.
BAD_VERSION_CERT = example_certificate().replace(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x05", 1)


def enc(obj: object) -> bytes:
    return cbor2.dumps(obj, canonical=True)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "truncated"),
        (b"\xa0", "version"),
        (bytes.fromhex("a6010900011818"), "ascending order"),  # keys out of order
        (bytes.fromhex("a2000101 1809"), "shortest form"),  # type 9 as a 1-byte uint
        (bytes.fromhex("bf0001ff"), "indefinite"),
        (enc({0: 1, 1: 9, 3: 1, 4: "x"})[:-1], "truncated"),
        (enc({0: 1, 1: 9, 3: 1, 4: "x"}) + b"\x00", "trailing"),
        (bytes.fromhex("a300010109") + bytes.fromhex("03c11a00000001"), "tags"),
        (bytes.fromhex("a400010109") + bytes.fromhex("03f93c00") + bytes.fromhex("6178"), "floats"),
        (bytes.fromhex("a300010109") + bytes.fromhex("02f6"), "null"),
        (bytes.fromhex("a3000101090318"), "truncated"),
        (bytes.fromhex("a200010109").replace(b"\xa2", b"\xa3", 1) + bytes.fromhex("1818 00"), "below 24"),
        (bytes.fromhex("a30001010903") + b"\x9b" + (2**40).to_bytes(8, "big"), "over the limit"),
        (bytes.fromhex("a30001010904") + b"\x7a" + (2**31).to_bytes(4, "big"), "longer than"),
        (bytes.fromhex("a4000101090301046280ff"), "UTF-8"),
        (bytes.fromhex("a3000101090281818181818181818100"), "deeply"),
        (bytes.fromhex("a200010109"), "missing"),
        (enc([1, 9]), "map"),
        (enc({0: 2, 1: 9, 3: 1, 4: "x"}), "version"),
        (enc({0: 1, 1: "9"}), "type"),
        (enc(busy(_2=b"x" * 15)), "request_id"),
        (enc(busy(_5=-1)), "unsigned"),
        (enc({0: 1, 1: 1, 2: bytes(16), 3: 9, 4: b"csr"}), "Profile"),
        (enc({0: 1, 1: 2, 2: bytes(16), 3: 1, 4: b"\x00\x01"}), "leading zero"),
        (enc({0: 1, 1: 2, 2: bytes(16), 3: 1, 4: b"\x01", 5: b"csr", 6: True}), "exactly one"),
        (enc({0: 1, 1: 2, 2: bytes(16), 3: 1, 4: b"\x01", 6: False}), "flag"),
        (enc({0: 1, 1: 7, 2: 1, 3: 5, 4: 6, 5: [3, 2], 6: 1, 7: 0}), "strictly increasing"),
        (enc({0: 1, 1: 7, 2: 1, 3: 5, 4: 5, 5: [], 6: 1, 7: 0}), "greater"),
        (enc({0: 1, 1: 3, 2: bytes(16), 3: b"not a certificate"}), "X.509"),
        (enc({0: 1, 1: 3, 2: bytes(16), 3: BAD_VERSION_CERT}), "X.509"),
        (enc({0: 1, 1: 3, 2: bytes(16), 3: example_certificate(), 4: []}), "empty chain"),
        (enc({0: 1, 1: 3, 2: bytes(16), 3: example_certificate(), 5: [10, 5]}), "start"),
        (enc({0: 1, 1: 4, 2: bytes(16), 3: 7, 4: b"\x01"}), "RevocationReason"),
        (enc({0: 1, 1: 4, 2: bytes(16), 3: 1}), "exactly one"),
        (enc({0: 1, 1: 6, 2: 1, 3: 1, 4: 8, 5: b"", 6: 2**40}), "9999"),
    ],
)
def test_rejected_with_a_clear_decode_error(data: bytes, why: str) -> None:
    with pytest.raises(DecodeError) as info:
        codec.decode(data)
    assert why.lower() in str(info.value).lower()


def test_unknown_type_is_reported_as_such() -> None:
    with pytest.raises(UnknownMessageType) as info:
        codec.decode(enc({0: 1, 1: 23, 2: b"whatever"}))
    assert info.value.message_type == 23
    assert info.value.code == ErrorCode.UNKNOWN_MESSAGE_TYPE


def test_unknown_version_gets_its_own_code() -> None:
    with pytest.raises(DecodeError) as info:
        codec.decode(enc({0: 2, 1: 9}))
    assert info.value.code == ErrorCode.UNSUPPORTED_VERSION


def test_unknown_profile_gets_its_own_code() -> None:
    with pytest.raises(DecodeError) as info:
        codec.decode(enc({0: 1, 1: 1, 2: bytes(16), 3: 9, 4: b"csr"}))
    assert info.value.code == ErrorCode.UNKNOWN_PROFILE


def test_unknown_keys_are_ignored_at_every_level() -> None:
    request = vectors()["certificate-request"]
    raw = cbor2.loads(codec.encode(request))
    raw[23] = {1: [1, 2, b"x"]}
    raw[5][9] = "future provisioning field"
    assert codec.decode(enc(raw)) == request


def test_size_limits_by_type() -> None:
    big_text = enc(busy(_9=b"x" * codec.MAX_MESSAGE_BYTES))
    with pytest.raises(DecodeError) as info:
        codec.decode(big_text)
    assert info.value.code == ErrorCode.TOO_LARGE
    # Feeds may be larger: a 1 MiB snapshot is fine.
    snapshot = m.RevocationSnapshot(
        list_id=1, sequence=0, size=8 * 2**20, bits=b"\x01" * 2**20, time=dt.datetime(2026, 1, 1, tzinfo=UTC)
    )
    assert codec.decode(codec.encode(snapshot)) == snapshot
    with pytest.raises(DecodeError) as info:
        codec.decode(b"\xa0" + bytes(codec.MAX_FEED_BYTES))
    assert info.value.code == ErrorCode.TOO_LARGE


def test_huge_declared_lengths_fail_fast_without_allocating() -> None:
    # An array header claiming 2**64-1 items, a byte string claiming 4 GiB: refused by the scan.
    for data in (b"\x9b" + b"\xff" * 8, b"\x5b" + (2**32).to_bytes(8, "big"), b"\xbb" + b"\xff" * 8):
        with pytest.raises(DecodeError):
            codec.decode(data)


def test_decode_accepts_any_bytes_like_and_nothing_else() -> None:
    data = codec.encode(vectors()["error-busy"])
    assert codec.decode(bytearray(data)) == codec.decode(memoryview(data))
    for junk in (None, "text", 42, [data]):
        with pytest.raises(DecodeError):
            codec.decode(junk)


# --- building invalid messages is a local error ------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: m.CertificateRequest(request_id=b"short", profile=Profile.IDENTITY, csr=b"x"),
        lambda: m.CertificateRequest(request_id=bytes(16), profile=1, csr=b"x"),  # type: ignore[arg-type]
        lambda: m.CertificateRequest(request_id=bytes(16), profile=Profile.IDENTITY, csr=b""),
        lambda: m.CertificateRequest(
            request_id=bytes(16), profile=Profile.IDENTITY, csr=b"x" * (m.MAX_DER_BYTES + 1)
        ),
        lambda: m.ProvisioningParameters(device_id="a\x00b"),
        lambda: m.ProvisioningParameters(region="r" * 65),
        lambda: m.RenewalRequest(request_id=bytes(16), profile=Profile.IDENTITY, current_serial=0, reuse_key=True),
        lambda: m.RenewalRequest(request_id=bytes(16), profile=Profile.IDENTITY, current_serial=2**160, reuse_key=True),
        lambda: m.RenewalRequest(request_id=bytes(16), profile=Profile.IDENTITY, current_serial=5),
        lambda: m.CertificateIssued(request_id=bytes(16), certificate=b"junk"),
        lambda: m.CertificateIssued(request_id=bytes(16), certificate=example_certificate(), chain=[b"x"]),  # type: ignore[arg-type]
        lambda: m.RevocationRequest(request_id=bytes(16), reason=RevocationReason.UNSPECIFIED),
        lambda: m.RevocationRequest(
            request_id=bytes(16), reason=RevocationReason.UNSPECIFIED, serial=5, profile=Profile.IDENTITY
        ),
        lambda: m.RevocationDelta(
            list_id=1, from_sequence=1, to_sequence=2, indices=(2, 1), reason=RevocationReason.UNSPECIFIED,
            time=dt.datetime(2026, 1, 1, tzinfo=UTC),
        ),
        lambda: m.RevocationSnapshot(list_id=1, sequence=1, size=8, bits=b"", time=dt.datetime(2026, 1, 1)),
        lambda: m.RevocationSnapshot(
            list_id=1, sequence=1, size=8, bits=b"", time=dt.datetime(2026, 1, 1, 0, 0, 0, 5, tzinfo=UTC)
        ),
        lambda: m.Error(code=-1, text="x"),
        lambda: m.Error(code=ErrorCode.BUSY, text="x" * 300),
    ],
)
def test_invalid_messages_cannot_be_built(build) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LocalProtocolError):
        build()


def test_messages_are_frozen_and_keyword_only() -> None:
    error = m.Error(code=ErrorCode.BUSY, text="x")
    with pytest.raises(AttributeError):
        error.text = "y"  # type: ignore[misc]
    with pytest.raises(TypeError):
        m.Error(ErrorCode.BUSY, "x")  # type: ignore[misc]


def test_encode_refuses_what_is_not_a_message() -> None:
    with pytest.raises(LocalProtocolError):
        codec.encode("hello")  # type: ignore[arg-type]


def test_error_for_exception_carries_the_code() -> None:
    with pytest.raises(DecodeError) as info:
        codec.decode(b"\xff")
    reply = m.Error.for_exception(info.value)
    assert reply.code == ErrorCode.MALFORMED and reply.request_id is None
    assert codec.decode(codec.encode(reply)) == reply


def test_every_type_number_maps_to_its_class() -> None:
    for number, cls in m.MESSAGE_CLASSES.items():
        assert cls.TYPE == number
    assert set(m.MESSAGE_CLASSES) == set(MessageType)


# --- decode never raises anything but DecodeError -----------------------------------------

SEEDS = [codec.encode(msg) for msg in vectors().values()]


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        if op == 0 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 1 and buf:
            del buf[rng.randrange(len(buf)) :]
        elif op == 2:
            pos = rng.randrange(len(buf) + 1)
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
        elif buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf)


def decode_or_decode_error(data: bytes) -> None:
    try:
        message = codec.decode(data)
    except DecodeError:
        return
    # Whatever decodes must be a valid message that re-encodes deterministically.
    assert codec.decode(codec.encode(message)) == message


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_raise_decode_error(data: bytes) -> None:
    decode_or_decode_error(data)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(SEEDS), st.randoms(use_true_random=False))
def test_mutated_vectors_only_ever_raise_decode_error(seed: bytes, rng: random.Random) -> None:
    decode_or_decode_error(mutate(seed, rng))


def test_mutation_fuzz_short_run() -> None:
    # The long run (>= 100,000 inputs) is bench/fuzz_decode.py; this is its short version.
    rng = random.Random(2026)
    for i in range(5000):
        decode_or_decode_error(mutate(SEEDS[i % len(SEEDS)], rng))


def test_example_csr_is_a_real_csr() -> None:
    csr = x509.load_der_x509_csr(example_csr())
    assert csr.is_signature_valid


# --- the CA's own replies: CertificateIssued.of_own_certificate ----------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_id=request_ids, certificate=certificates,
       chain=st.lists(certificates, max_size=m.MAX_CHAIN_LENGTH).map(tuple), window=st.none() | windows())
def test_own_certificate_reply_is_the_constructors(request_id: bytes, certificate: bytes, chain: tuple[bytes, ...],
                                                   window: RenewalWindow | None) -> None:
    checked = m.CertificateIssued(request_id=request_id, certificate=certificate, chain=chain, renewal_window=window)
    own = m.CertificateIssued.of_own_certificate(request_id=request_id, certificate=certificate, chain=chain,
                                                 renewal_window=window)
    assert type(own) is m.CertificateIssued
    assert own == checked and hash(own) == hash(checked)
    assert codec.encode(own) == codec.encode(checked)
    assert codec.decode(codec.encode(own)) == checked
    assert (own.serial, own.not_before, own.not_after, own.status_position) == (
        checked.serial, checked.not_before, checked.not_after, checked.status_position)


@pytest.mark.parametrize(
    "fields",
    [
        {"request_id": b"short"},
        {"certificate": b""},
        {"certificate": b"x" * (m.MAX_DER_BYTES + 1)},
        {"chain": [b"x"]},
        {"chain": (b"x",) * (m.MAX_CHAIN_LENGTH + 1)},
        {"renewal_window": "soon"},
    ],
)
def test_own_certificate_reply_keeps_the_field_checks(fields: dict[str, object]) -> None:
    args: dict[str, object] = {"request_id": bytes(16), "certificate": example_certificate(), **fields}
    with pytest.raises(LocalProtocolError):
        m.CertificateIssued.of_own_certificate(**args)  # type: ignore[arg-type]


def test_own_certificate_reply_parses_only_when_asked() -> None:
    """Only the parse is skipped: an unreadable certificate still cannot be read from it, and the
    same bytes decoded from the wire are refused as before."""
    own = m.CertificateIssued.of_own_certificate(request_id=bytes(16), certificate=b"junk")
    with pytest.raises(LocalProtocolError, match="not a DER X.509 certificate"):
        _ = own.serial
    with pytest.raises(DecodeError):
        codec.decode(codec.encode(own))


def test_negative_serial_certificate_refused_from_the_wire() -> None:
    der = bytearray(example_certificate())
    # Flip the serial's first content octet's top bit: a negative INTEGER (RFC 5280 forbids it).
    def head(pos: int) -> int:  # length of the DER head at pos
        return 2 + (der[pos + 1] & 0x7F if der[pos + 1] & 0x80 else 0)

    tbs = head(0)
    tbs += head(tbs)
    serial_at = tbs + 5 if der[tbs] == 0xA0 else tbs  # after [0] version
    assert der[serial_at] == 0x02
    der[serial_at + 2] |= 0x80
    wire = codec.encode(m.CertificateIssued.of_own_certificate(request_id=bytes(16), certificate=bytes(der)))
    with pytest.raises(DecodeError, match="not a positive integer"):
        codec.decode(wire)


def test_every_spec_lists_its_keys_in_ascending_order() -> None:
    """encode relies on it to write canonical CBOR without sorting (RFC 8949 section 4.2)."""
    for cls, spec in codec._SPECS.items():
        keys = [f.key for f in spec]
        assert keys == sorted(keys) and keys[0] > 1, cls.__name__
    assert list(codec._prov_to_wire(m.ProvisioningParameters(device_id="d", region="r"))) == [1, 2]
