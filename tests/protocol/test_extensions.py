"""protocol.extensions: exact DER, round trips, strict refusal, and openssl agreeing."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

import protocol.extensions as ext
from protocol.errors import DecodeError, LocalProtocolError

OPENSSL = shutil.which("openssl")


def asn1parse(der: bytes) -> str:
    assert OPENSSL, "the openssl CLI is required (apt-get install openssl)"
    proc = subprocess.run(
        [OPENSSL, "asn1parse", "-inform", "DER"], input=der, capture_output=True, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def test_all_is_complete() -> None:
    public = {n for n in vars(ext) if not n.startswith("_") and n not in {"annotations"}}
    public -= {"DecodeError", "LocalProtocolError"}
    assert set(ext.__all__) == public


def test_oids_hang_under_the_uuid_arc() -> None:
    import uuid

    arc_uuid = uuid.UUID("567fff58-ea42-4d34-b820-3c3da52a6bf5")
    assert ext.CERTMQ_ARC == f"2.25.{arc_uuid.int}"
    assert ext.STATUS_POSITION_OID == ext.CERTMQ_ARC + ".1"
    assert ext.CAPABILITIES_OID == ext.CERTMQ_ARC + ".2"
    assert ext.REGION_OID == ext.CERTMQ_ARC + ".3"


# Hand-assembled from X.690: tag, length, content.
EXACT = [
    (lambda: ext.encode_status_position(7, 300), "30 07 02 01 07 02 02 01 2c"),
    # 128 needs a leading zero so it is not read as negative.
    (lambda: ext.encode_status_position(0, 128), "30 07 02 01 00 02 02 00 80"),
    (lambda: ext.encode_capabilities(("telemetry", "ota")), "30 10 0c 09" + b"telemetry".hex() + "0c 03" + b"ota".hex()),
    (lambda: ext.encode_capabilities(()), "30 00"),
    (lambda: ext.encode_region("eu-west"), "0c 07" + b"eu-west".hex()),
    (lambda: ext.encode_region("zürich"), "0c 07" + "7a c3 bc 72 69 63 68"),
]


@pytest.mark.parametrize(("encode", "hex_"), EXACT)
def test_exact_der(encode, hex_) -> None:  # type: ignore[no-untyped-def]
    assert encode() == bytes.fromhex(hex_.replace(" ", ""))


def test_long_form_length_for_a_long_sequence() -> None:
    caps = tuple(f"segment-{i:02d}-" + "x" * 20 for i in range(6))  # 6 * (2 + 31) = 198 bytes
    der = ext.encode_capabilities(caps)
    assert der[:3] == bytes((0x30, 0x81, 198))
    assert ext.decode_capabilities(der) == caps


segment = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Cn", "Zs", "Zl", "Zp"), blacklist_characters="/+#$\ufffe\uffff"),
    min_size=1,
    max_size=16,
)


@given(st.integers(0, ext.MAX_INTEGER), st.integers(0, ext.MAX_INTEGER))
def test_status_position_round_trip(list_id: int, index: int) -> None:
    assert ext.decode_status_position(ext.encode_status_position(list_id, index)) == (list_id, index)


@given(st.lists(segment, max_size=ext.MAX_CAPABILITIES, unique=True).map(tuple))
def test_capabilities_round_trip(caps: tuple[str, ...]) -> None:
    assert ext.decode_capabilities(ext.encode_capabilities(caps)) == caps


@given(segment)
def test_region_round_trip(region: str) -> None:
    assert ext.decode_region(ext.encode_region(region)) == region


def test_openssl_parses_the_encodings() -> None:
    out = asn1parse(ext.encode_status_position(3, 2**40 + 5))
    assert "SEQUENCE" in out
    integers = [int(line.rsplit(":", 1)[1], 16) for line in out.splitlines() if "INTEGER" in line]
    assert integers == [3, 2**40 + 5]

    out = asn1parse(ext.encode_capabilities(("telemetry", "cmd")))
    assert "SEQUENCE" in out
    assert "UTF8STRING        :telemetry" in out
    assert "UTF8STRING        :cmd" in out

    out = asn1parse(ext.encode_region("eu-west"))
    assert "UTF8STRING        :eu-west" in out


BAD_DER = {
    "status": [
        ("", "truncated"),
        ("30 06 02 01 07 02 01 08 00", "trailing"),  # length claims 6 but content is 7
        ("30 06 02 01 07 02 01 08 ff", "trailing"),
        ("30 07 02 01 07 02 02 00 05", "minimally"),  # 0x0005 is not minimal
        ("30 06 02 01 07 02 01 ff", "negative"),
        ("30 05 02 00 02 01 01", "empty INTEGER"),
        ("30 80 02 01 07 02 01 08 00 00", "indefinite"),
        ("30 81 06 02 01 07 02 01 08", "minimally"),  # long form for a short length
        ("31 06 02 01 07 02 01 08", "tag"),  # SET, not SEQUENCE
        ("30 03 02 01 07", "truncated"),  # index missing
        ("30 09 02 01 07 02 01 08 02 01 09", "trailing"),  # a third INTEGER
        ("30 0e 02 01 07 02 09 01 00 00 00 00 00 00 00 00", "2**64"),
        ("30 08 02 01 07 02 01 08", "past the end"),
        ("30 84 00 00 00 06 02 01 07 02 01 08", "too long"),
    ],
    "caps": [
        ("30 03 0c 01", "past the end"),
        ("30 05 0c 03 61 2f 62", "'/'"),
        ("30 02 0c 00", "empty"),
        ("30 04 0c 02 c3 28", "UTF-8"),
        ("30 06 0c 01 61 0c 01 61", "duplicate"),
        ("30 03 13 01 61", "tag"),  # PrintableString
        ("30 00 00", "trailing"),
    ],
    "region": [
        ("0c 00", "empty"),
        ("0c 01 23", "'#'"),
        ("0c 02 65 75 00", "trailing"),
        ("0c 03 ed a0 80", "UTF-8"),  # an encoded surrogate
        ("0c 01 00", "control"),
        ("0c 02 c2 85", "control"),  # U+0085, a C1 control
        ("0c 04 24 53 59 53", "'$'"),
        ("0c 02 20 61", "whitespace"),
        ("0c 03 ef bf bf", "non-character"),  # U+FFFF
    ],
}
DECODERS = {
    "status": ext.decode_status_position,
    "caps": ext.decode_capabilities,
    "region": ext.decode_region,
}


@pytest.mark.parametrize(
    ("kind", "hex_", "why"),
    [(kind, h, why) for kind, cases in BAD_DER.items() for h, why in cases],
)
def test_strict_decoding_refuses(kind: str, hex_: str, why: str) -> None:
    with pytest.raises(DecodeError, match=re.escape(why)):
        DECODERS[kind](bytes.fromhex(hex_.replace(" ", "")))


def test_over_long_input_refused_before_parsing() -> None:
    huge = b"\x0c\x82\x10\x00" + b"a" * 0x1000
    with pytest.raises(DecodeError, match="more than"):
        ext.decode_region(huge)


def test_too_many_capabilities_refused_when_decoding() -> None:
    body = b"".join(b"\x0c\x02" + f"{i:02d}".encode() for i in range(ext.MAX_CAPABILITIES + 1))
    der = b"\x30\x81" + bytes((len(body),)) + body
    with pytest.raises(DecodeError, match="more than"):
        ext.decode_capabilities(der)


def test_over_long_string_refused_when_decoding() -> None:
    text = b"a" * (ext.MAX_STRING_BYTES + 1)
    with pytest.raises(DecodeError, match="more than"):
        ext.decode_region(b"\x0c" + bytes((len(text),)) + text)


def test_non_bytes_refused() -> None:
    with pytest.raises(DecodeError):
        ext.decode_region("0c0161")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("call", "why"),
    [
        (lambda: ext.encode_status_position(-1, 0), "0..2"),
        (lambda: ext.encode_status_position(0, 2**64), "0..2"),
        (lambda: ext.encode_status_position(True, 0), "int"),
        (lambda: ext.encode_capabilities(("a", "a")), "duplicate"),
        (lambda: ext.encode_capabilities(["a"]), "tuple"),
        (lambda: ext.encode_capabilities(("a/b",)), "'/'"),
        (lambda: ext.encode_capabilities(tuple(str(i) for i in range(ext.MAX_CAPABILITIES + 1))), "at most"),
        (lambda: ext.encode_region(""), "empty"),
        (lambda: ext.encode_region("+"), "'+'"),
        (lambda: ext.encode_region("x" * (ext.MAX_STRING_BYTES + 1)), "more than"),
        (lambda: ext.encode_region("\ud800"), "Unicode"),
    ],
)
def test_encoding_refuses_unrepresentable_values(call, why) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LocalProtocolError, match=re.escape(why)):
        call()


@pytest.mark.parametrize("size", [0, 1, 127, 128, 255, 256, 65_535, 65_536])
def test_der_tlv_uses_the_shortest_definite_length(size: int) -> None:
    """X.690 8.1.3: short form below 128, else 0x80 | n followed by the n-octet length, no leading zero octet."""
    content = bytes(size)
    tlv = ext.der_tlv(0x04, content)
    assert tlv[0] == 0x04 and tlv.endswith(content)
    header = tlv[1 : len(tlv) - size]
    if size < 128:
        assert header == bytes([size])
    else:
        octets = header[1:]
        assert header[0] == 0x80 | len(octets) and octets[0] != 0 and int.from_bytes(octets, "big") == size
