"""certmq's custom X.509 extensions, as DER bytes.

Three non-critical extensions live under certmq's UUID arc ``2.25.<uuid>``
(no registration needed, RFC 4122 / ITU-T X.667):

=====================  ===========================================  ==========================
OID                    value                                        meaning
=====================  ===========================================  ==========================
``CERTMQ_ARC.1``       ``SEQUENCE { listId INTEGER, index INTEGER }``  place in a revocation
                                                                    status list
``CERTMQ_ARC.2``       ``SEQUENCE OF UTF8String``                   topic segments the device
                                                                    may use (capabilities)
``CERTMQ_ARC.3``       ``UTF8String``                               the device's region
=====================  ===========================================  ==========================

Devices parse these too, so this module is pure bytes: a tiny, strict DER
encoder/decoder for exactly these three shapes, no ASN.1 library and no
cryptography import. The broker side wraps the bytes in
``x509.UnrecognizedExtension(x509.ObjectIdentifier(OID), der)``.

Strictness (DER, X.690 section 10): definite minimal lengths, minimal
two's-complement integers, no negative values, no trailing bytes, valid UTF-8,
and size limits so a hostile certificate cannot make a device allocate much.
Decoding errors raise :class:`protocol.errors.DecodeError`; encoding values
that cannot be represented raises :class:`protocol.errors.LocalProtocolError`.

Strings (capabilities, region) must be usable as one MQTT topic level, by the
same rules as ``protocol.topics`` identifiers: not empty, no ``/``, ``+``,
``#``, no control character (C0, DEL, C1), no Unicode non-character or lone
surrogate, no leading ``$``, no leading or trailing whitespace, at most
:data:`MAX_STRING_BYTES` bytes of UTF-8.
"""

from __future__ import annotations

from .errors import DecodeError, LocalProtocolError

__all__ = [
    "CAPABILITIES_OID",
    "CERTMQ_ARC",
    "MAX_CAPABILITIES",
    "MAX_EXTENSION_BYTES",
    "MAX_INTEGER",
    "MAX_STRING_BYTES",
    "REGION_OID",
    "STATUS_POSITION_OID",
    "check_topic_segment",
    "der_tlv",
    "decode_capabilities",
    "decode_region",
    "decode_status_position",
    "encode_capabilities",
    "encode_region",
    "encode_status_position",
]

#: certmq's OID arc: ``2.25.`` + UUID 567fff58-ea42-4d34-b820-3c3da52a6bf5 as an integer.
CERTMQ_ARC = "2.25.114978208397563566606777450139268836341"
#: Status-list position: ``SEQUENCE { listId INTEGER, index INTEGER }``.
STATUS_POSITION_OID = CERTMQ_ARC + ".1"
#: Capabilities: ``SEQUENCE OF UTF8String`` (topic segments).
CAPABILITIES_OID = CERTMQ_ARC + ".2"
#: Region: ``UTF8String``.
REGION_OID = CERTMQ_ARC + ".3"

#: Largest list id / index (unsigned 64-bit): what a C implementation can hold.
MAX_INTEGER = 2**64 - 1
#: Longest string (capability segment or region), in UTF-8 bytes.
MAX_STRING_BYTES = 64
#: Most capability segments in one certificate.
MAX_CAPABILITIES = 32
#: Longest extension value accepted by any decoder here.
MAX_EXTENSION_BYTES = 4096

_TAG_INTEGER = 0x02
_TAG_UTF8STRING = 0x0C
_TAG_SEQUENCE = 0x30
_FORBIDDEN_IN_SEGMENT = frozenset("/+#")


# -- encoding ---------------------------------------------------------------------------


def der_tlv(tag: int, content: bytes) -> bytes:
    """One DER tag-length-value: ``tag`` (one octet), the definite length of ``content``, ``content``."""
    size = len(content)
    if size < 0x80:  # the short form: most values, and no further work
        return bytes((tag, size)) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + content



def _encode_integer(value: int, what: str) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LocalProtocolError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value <= MAX_INTEGER:
        raise LocalProtocolError(f"{what} must be in 0..2**64-1, got {value}")
    # One extra bit for the sign: a value with its top bit set gets a leading 0x00.
    return der_tlv(_TAG_INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def check_topic_segment(value: str, what: str = "segment") -> str:
    """Return ``value`` if it is usable as one topic level, else raise ``LocalProtocolError``.

    Also used by the broker's configuration checks, so a policy cannot name a
    capability or region that could never be encoded.
    """
    if not isinstance(value, str):
        raise LocalProtocolError(f"{what} must be a str, not {type(value).__name__}")
    problem = _segment_problem(value)
    if problem is not None:
        raise LocalProtocolError(f"{what} {value!r}: {problem}")
    return value


def _segment_problem(value: str) -> str | None:
    if not value:
        return "must not be empty"
    for c in value:
        code = ord(c)
        if c in _FORBIDDEN_IN_SEGMENT or code < 0x20 or 0x7F <= code <= 0x9F:
            return "must not contain '/', '+', '#' or control characters"
        if 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFE) == 0xFFFE:
            return f"must not contain the Unicode non-character U+{code:04X}"
    if value[0] == "$":
        return "must not start with '$' (reserved for broker topics)"
    if value[0].isspace() or value[-1].isspace():
        return "must not start or end with whitespace"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates
        return "is not valid Unicode text"
    if size > MAX_STRING_BYTES:
        return f"is {size} bytes of UTF-8, more than {MAX_STRING_BYTES}"
    return None


def encode_status_position(list_id: int, index: int) -> bytes:
    """DER for ``SEQUENCE { listId INTEGER, index INTEGER }``."""
    body = _encode_integer(list_id, "list id") + _encode_integer(index, "index")
    return der_tlv(_TAG_SEQUENCE, body)


def encode_capabilities(capabilities: tuple[str, ...]) -> bytes:
    """DER for ``SEQUENCE OF UTF8String``; order is kept, duplicates are refused."""
    if not isinstance(capabilities, tuple):
        raise LocalProtocolError("capabilities must be a tuple of str")
    if len(capabilities) > MAX_CAPABILITIES:
        raise LocalProtocolError(f"at most {MAX_CAPABILITIES} capabilities, got {len(capabilities)}")
    if len(set(capabilities)) != len(capabilities):
        raise LocalProtocolError(f"duplicate capability in {capabilities!r}")
    body = b"".join(
        der_tlv(_TAG_UTF8STRING, check_topic_segment(c, "capability").encode("utf-8"))
        for c in capabilities
    )
    return der_tlv(_TAG_SEQUENCE, body)


def encode_region(region: str) -> bytes:
    """DER for ``UTF8String``."""
    return der_tlv(_TAG_UTF8STRING, check_topic_segment(region, "region").encode("utf-8"))


# -- decoding ---------------------------------------------------------------------------


class _Reader:
    """Cursor over DER bytes; every failure is a DecodeError."""

    __slots__ = ("_data", "_pos", "_end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self._data = data
        self._pos = pos
        self._end = len(data) if end is None else end

    def at_end(self) -> bool:
        return self._pos == self._end

    def _byte(self) -> int:
        if self._pos >= self._end:
            raise DecodeError("DER value truncated")
        b = self._data[self._pos]
        self._pos += 1
        return b

    def read_tlv(self, expected_tag: int, what: str) -> _Reader:
        """Read one TLV with ``expected_tag``; return a reader over its content."""
        tag = self._byte()
        if tag != expected_tag:
            raise DecodeError(f"{what}: expected tag 0x{expected_tag:02x}, got 0x{tag:02x}")
        first = self._byte()
        if first < 0x80:
            length = first
        elif first == 0x80:
            raise DecodeError(f"{what}: indefinite length is not DER")
        else:
            count = first & 0x7F
            if count > 2:  # nothing here is anywhere near 64 KiB
                raise DecodeError(f"{what}: length field of {count} bytes is too long")
            length = 0
            for _ in range(count):
                length = (length << 8) | self._byte()
            if length < 0x80 or length.bit_length() <= 8 * (count - 1):
                raise DecodeError(f"{what}: length not minimally encoded")
        if length > self._end - self._pos:
            raise DecodeError(f"{what}: length {length} runs past the end of the value")
        inner = _Reader(self._data, self._pos, self._pos + length)
        self._pos += length
        return inner

    def rest(self) -> bytes:
        out = self._data[self._pos : self._end]
        self._pos = self._end
        return out

    def expect_end(self, what: str) -> None:
        if not self.at_end():
            raise DecodeError(f"{what}: {self._end - self._pos} trailing byte(s)")


def _check_input(der: bytes, what: str) -> None:
    if not isinstance(der, (bytes, bytearray, memoryview)):
        raise DecodeError(f"{what}: expected bytes, got {type(der).__name__}")
    if len(der) > MAX_EXTENSION_BYTES:
        raise DecodeError(f"{what}: {len(der)} bytes, more than {MAX_EXTENSION_BYTES}")


def _decode_integer(reader: _Reader, what: str) -> int:
    content = reader.read_tlv(_TAG_INTEGER, what).rest()
    if not content:
        raise DecodeError(f"{what}: empty INTEGER")
    if content[0] & 0x80:
        raise DecodeError(f"{what}: negative INTEGER")
    if len(content) > 1 and content[0] == 0 and not content[1] & 0x80:
        raise DecodeError(f"{what}: INTEGER not minimally encoded")
    value = int.from_bytes(content, "big")
    if value > MAX_INTEGER:
        raise DecodeError(f"{what}: INTEGER larger than 2**64-1")
    return value


def _decode_string(reader: _Reader, what: str) -> str:
    raw = reader.read_tlv(_TAG_UTF8STRING, what).rest()
    try:
        text = bytes(raw).decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{what}: invalid UTF-8 ({exc.reason})") from None
    problem = _segment_problem(text)
    if problem is not None:
        raise DecodeError(f"{what} {text!r}: {problem}")
    return text


def decode_status_position(der: bytes) -> tuple[int, int]:
    """Inverse of :func:`encode_status_position`: ``(list_id, index)``."""
    _check_input(der, "status position")
    outer = _Reader(bytes(der))
    seq = outer.read_tlv(_TAG_SEQUENCE, "status position")
    outer.expect_end("status position")
    list_id = _decode_integer(seq, "status position listId")
    index = _decode_integer(seq, "status position index")
    seq.expect_end("status position")
    return list_id, index


def decode_capabilities(der: bytes) -> tuple[str, ...]:
    """Inverse of :func:`encode_capabilities`."""
    _check_input(der, "capabilities")
    outer = _Reader(bytes(der))
    seq = outer.read_tlv(_TAG_SEQUENCE, "capabilities")
    outer.expect_end("capabilities")
    items: list[str] = []
    while not seq.at_end():
        if len(items) == MAX_CAPABILITIES:
            raise DecodeError(f"capabilities: more than {MAX_CAPABILITIES} entries")
        item = _decode_string(seq, "capability")
        if item in items:
            raise DecodeError(f"capabilities: duplicate entry {item!r}")
        items.append(item)
    return tuple(items)


def decode_region(der: bytes) -> str:
    """Inverse of :func:`encode_region`."""
    _check_input(der, "region")
    outer = _Reader(bytes(der))
    region = _decode_string(outer, "region")
    outer.expect_end("region")
    return region
