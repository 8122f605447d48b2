"""CBOR codec for certmq messages: :func:`encode` and :func:`decode`.

The wire form (normative text: ``docs/wire-format.md``) is one CBOR map with
small unsigned-integer keys (< 24, one byte each), key 0 the format version
and key 1 the message type. Encoding is deterministic (RFC 8949 section 4.2:
shortest-form heads, definite lengths, keys in ascending order), and
:func:`decode` accepts only that form, so every message has exactly one
encoding and the test vectors are byte-exact.

Untrusted bytes are checked by :func:`_scan`, a bounded walk over the CBOR
heads, before cbor2 builds any object from them: payload size, nesting,
array and map lengths, string lengths against the bytes actually present,
and the allowed subset (no tags, floats, null or indefinite lengths). Only
then does cbor2 decode. ``decode`` raises :class:`~protocol.errors.DecodeError`
(or its subclass :class:`~protocol.errors.UnknownMessageType`) and nothing
else, whatever it is given.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import cbor2

from . import messages as m
from .codes import ErrorCode, MessageType, Profile, RevocationReason
from .errors import DecodeError, LocalProtocolError, ProtocolError, UnknownMessageType
from .renewal import RenewalWindow

__all__ = [
    "VERSION",
    "MAX_MESSAGE_BYTES",
    "MAX_FEED_BYTES",
    "MAX_DEPTH",
    "MAX_MAP_PAIRS",
    "MAX_ARRAY_ITEMS",
    "FEED_TYPES",
    "decode",
    "encode",
]

VERSION: Final = 1
#: Requests and replies.
MAX_MESSAGE_BYTES: Final = 65_536
#: Revocation snapshots and deltas (a 10-million-entry list at 10 % revoked is ~590 KB).
MAX_FEED_BYTES: Final = 4 * 1024 * 1024
MAX_DEPTH: Final = 3
MAX_MAP_PAIRS: Final = 23
MAX_ARRAY_ITEMS: Final = m.MAX_INDICES
FEED_TYPES: Final = frozenset({MessageType.REVOCATION_SNAPSHOT, MessageType.REVOCATION_DELTA})

_EPOCH: Final = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
# By plain int: an IntEnum key hashes and compares as its int (no MessageType() call per decode).
_CLASSES: Final[Mapping[int, type[m.Message]]] = {int(t): cls for t, cls in m.MESSAGE_CLASSES.items()}
_MAX_EPOCH: Final = 253402300799  # 9999-12-31T23:59:59Z, the end of datetime


# ---------------------------------------------------------------------------
# Field kinds: how one Python attribute maps to one CBOR value.


class _Bad(Exception):
    """Raised by a field decoder; turned into DecodeError with the field's name."""


def _uint(v: object) -> int:
    if type(v) is not int or v < 0:
        raise _Bad("expected an unsigned integer")
    return v


def _bstr(v: object) -> bytes:
    if type(v) is not bytes:
        raise _Bad("expected a byte string")
    return v


def _tstr(v: object) -> str:
    if type(v) is not str:
        raise _Bad("expected a text string")
    return v


def _flag(v: object) -> bool:
    if v is not True:
        raise _Bad("a flag is sent as true or not at all")
    return True


def _serial_to_wire(serial: int) -> bytes:
    return serial.to_bytes((serial.bit_length() + 7) // 8, "big")


def _serial_from_wire(v: object) -> int:
    raw = _bstr(v)
    if not raw or raw[0] == 0 or len(raw) > m.MAX_SERIAL_BYTES:
        raise _Bad(f"a serial is 1..{m.MAX_SERIAL_BYTES} big-endian bytes without a leading zero")
    return int.from_bytes(raw, "big")


def _time_to_wire(t: _dt.datetime) -> int:
    return int((t - _EPOCH).total_seconds())


def _time_from_wire(v: object) -> _dt.datetime:
    seconds = _uint(v)
    if seconds > _MAX_EPOCH:
        raise _Bad("time is past the year 9999")
    return _EPOCH + _dt.timedelta(seconds=seconds)


def _enum_from_wire(enum: type[Profile] | type[RevocationReason], code: ErrorCode) -> Callable[[object], Any]:
    members = {int(member): member for member in enum}  # a dict lookup, not the enum's __call__

    def from_wire(v: object) -> Any:
        member = members.get(_uint(v))
        if member is None:
            raise _Bad(f"unknown {enum.__name__} {v}")
        return member

    from_wire.code = code  # type: ignore[attr-defined]
    return from_wire


def _code_from_wire(v: object) -> ErrorCode | int:
    code = _uint(v)
    try:
        return ErrorCode(code)
    except ValueError:
        return code  # a newer peer's code: carried, not crashed on


def _array(v: object) -> list[Any]:
    if type(v) is not list:
        raise _Bad("expected an array")
    return v


def _window_to_wire(w: RenewalWindow) -> list[int]:
    return [_time_to_wire(w.start), _time_to_wire(w.end)]


def _window_from_wire(v: object) -> RenewalWindow:
    items = _array(v)
    if len(items) != 2:
        raise _Bad("a renewal window is [start, end]")
    start, end = (_time_from_wire(x) for x in items)
    try:
        return RenewalWindow(start=start, end=end)
    except ValueError as exc:
        raise _Bad(str(exc)) from None


def _chain_from_wire(v: object) -> tuple[bytes, ...]:
    items = _array(v)
    if not items:
        raise _Bad("an empty chain is omitted, not sent")
    return tuple(_bstr(x) for x in items)


def _prov_to_wire(p: m.ProvisioningParameters) -> dict[int, str]:
    out: dict[int, str] = {}
    if p.device_id is not None:
        out[1] = p.device_id
    if p.region is not None:
        out[2] = p.region
    return out


def _prov_from_wire(v: object) -> m.ProvisioningParameters:
    if type(v) is not dict:
        raise _Bad("expected a map")
    device_id = v.get(1)
    region = v.get(2)
    return m.ProvisioningParameters(
        device_id=None if device_id is None else _tstr(device_id),
        region=None if region is None else _tstr(region),
    )


@dataclass(frozen=True)
class _Field:
    key: int
    attr: str
    to_wire: Callable[[Any], Any]
    from_wire: Callable[[object], Any]
    required: bool = True
    #: value that means "absent": not encoded, and what decode gives when the key is missing
    default: Any = None


def _ident(v: Any) -> Any:
    return v


def _F(key: int, attr: str, kind: str, *, required: bool = True, default: Any = None) -> _Field:
    to_wire, from_wire = _KINDS[kind]
    return _Field(key, attr, to_wire, from_wire, required, default)


_KINDS: Mapping[str, tuple[Callable[[Any], Any], Callable[[object], Any]]] = {
    "uint": (_ident, _uint),
    "bstr": (_ident, _bstr),
    "tstr": (_ident, _tstr),
    "flag": (_ident, _flag),
    "serial": (_serial_to_wire, _serial_from_wire),
    "serials": (lambda t: [_serial_to_wire(s) for s in t], lambda v: tuple(_serial_from_wire(x) for x in _array(v))),
    "time": (_time_to_wire, _time_from_wire),
    "profile": (int, _enum_from_wire(Profile, ErrorCode.UNKNOWN_PROFILE)),
    "reason": (int, _enum_from_wire(RevocationReason, ErrorCode.MALFORMED)),
    "code": (int, _code_from_wire),
    "window": (_window_to_wire, _window_from_wire),
    "chain": (list, _chain_from_wire),
    "indices": (list, lambda v: tuple(_uint(x) for x in _array(v))),
    "prov": (_prov_to_wire, _prov_from_wire),
}

#: Wire keys per message type. Keys 0 (version) and 1 (type) are common to all.
#: Never renumber a key; add new optional keys only (docs/wire-format.md, "Versioning").
_SPECS: Mapping[type[Any], tuple[_Field, ...]] = {
    m.CertificateRequest: (
        _F(2, "request_id", "bstr"),
        _F(3, "profile", "profile"),
        _F(4, "csr", "bstr"),
        _F(5, "provisioning", "prov", required=False),
    ),
    m.RenewalRequest: (
        _F(2, "request_id", "bstr"),
        _F(3, "profile", "profile"),
        _F(4, "current_serial", "serial"),
        _F(5, "csr", "bstr", required=False),
        _F(6, "reuse_key", "flag", required=False, default=False),
    ),
    m.CertificateIssued: (
        _F(2, "request_id", "bstr"),
        _F(3, "certificate", "bstr"),
        _F(4, "chain", "chain", required=False, default=()),
        _F(5, "renewal_window", "window", required=False),
    ),
    m.RevocationRequest: (
        _F(2, "request_id", "bstr"),
        _F(3, "reason", "reason"),
        _F(4, "serial", "serial", required=False),
        _F(5, "device_id", "tstr", required=False),
        _F(6, "profile", "profile", required=False),
    ),
    m.RevocationResult: (
        _F(2, "request_id", "bstr"),
        _F(3, "serials", "serials"),
    ),
    m.RevocationSnapshot: (
        _F(2, "list_id", "uint"),
        _F(3, "sequence", "uint"),
        _F(4, "size", "uint"),
        _F(5, "bits", "bstr"),
        _F(6, "time", "time"),
    ),
    m.RevocationDelta: (
        _F(2, "list_id", "uint"),
        _F(3, "from_sequence", "uint"),
        _F(4, "to_sequence", "uint"),
        _F(5, "indices", "indices"),
        _F(6, "reason", "reason"),
        _F(7, "time", "time"),
    ),
    m.SnapshotRequest: (
        _F(2, "request_id", "bstr"),
        _F(3, "list_id", "uint", required=False),
    ),
    m.Error: (
        _F(2, "request_id", "bstr", required=False),
        _F(3, "code", "code"),
        _F(4, "text", "tstr"),
        _F(5, "retry_after", "uint", required=False),
    ),
}


# ---------------------------------------------------------------------------
# Encoding


def encode(message: m.Message) -> bytes:
    """The deterministic CBOR encoding of ``message``.

    Raises :class:`~protocol.errors.LocalProtocolError` if the result would be
    over the size limit for its type (the message was valid but too big to send).
    """
    try:
        spec = _SPECS[type(message)]
    except KeyError:
        raise LocalProtocolError(f"not a certmq message: {type(message).__name__}") from None
    wire: dict[int, Any] = {0: VERSION, 1: int(message.TYPE)}
    for f in spec:
        value = getattr(message, f.attr)
        if value is None or (not f.required and value == f.default):
            continue
        wire[f.key] = f.to_wire(value)
    # Already canonical (RFC 8949 4.2): keys go in ascending order (every spec lists them so, and
    # the one nested map, provisioning, too), and there are only ints, strings, byte strings,
    # arrays and true, which cbor2 always writes in shortest form. canonical=True would only
    # sort again, at a third of an issuance reply's encoding cost (test_round_trip checks it).
    data: bytes = cbor2.dumps(wire)
    limit = MAX_FEED_BYTES if message.TYPE in FEED_TYPES else MAX_MESSAGE_BYTES
    if len(data) > limit:
        raise LocalProtocolError(
            f"{type(message).__name__} encodes to {len(data)} bytes, over the {limit}-byte limit",
            code=ErrorCode.TOO_LARGE,
        )
    return data


# ---------------------------------------------------------------------------
# Decoding


def decode(data: object) -> m.Message:
    """Decode one message from untrusted bytes.

    Returns a message or raises :class:`~protocol.errors.DecodeError`
    (:class:`~protocol.errors.UnknownMessageType` for a well-formed message of
    a type this version does not know). The error's ``code`` is the
    :class:`~protocol.codes.ErrorCode` to reply with.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_FEED_BYTES:
        raise DecodeError(f"payload of {len(data)} bytes is over the limit", code=ErrorCode.TOO_LARGE)
    message_type = _scan(data)
    if message_type not in FEED_TYPES and len(data) > MAX_MESSAGE_BYTES:
        raise DecodeError(
            f"payload of {len(data)} bytes is over the {MAX_MESSAGE_BYTES}-byte limit for this type",
            code=ErrorCode.TOO_LARGE,
        )
    try:
        wire = cbor2.loads(data, max_depth=MAX_DEPTH + 1, allow_indefinite=False, allow_duplicate_keys=False)
    except Exception as exc:  # the scan should have caught it; never let cbor2's errors escape
        raise DecodeError(f"invalid CBOR: {exc}") from None
    return _from_wire(wire)


def _from_wire(wire: object) -> m.Message:
    if type(wire) is not dict:
        raise DecodeError("a message is a CBOR map")
    version = wire.get(0)
    if version != VERSION:
        raise DecodeError(
            f"unsupported format version {version!r} (this implementation speaks {VERSION})",
            code=ErrorCode.UNSUPPORTED_VERSION,
        )
    type_number = wire.get(1)
    if type(type_number) is not int:
        raise DecodeError("message type (key 1) missing or not an integer")
    cls = _CLASSES.get(type_number)
    if cls is None:
        raise UnknownMessageType(f"unknown message type {type_number}", message_type=type_number)
    kwargs: dict[str, Any] = {}
    for f in _SPECS[cls]:
        if f.key not in wire:
            if f.required:
                raise DecodeError(f"{cls.__name__}: required field {f.attr} (key {f.key}) is missing")
            continue
        try:
            kwargs[f.attr] = f.from_wire(wire[f.key])
        except _Bad as exc:
            code = getattr(f.from_wire, "code", ErrorCode.MALFORMED)
            raise DecodeError(f"{cls.__name__}.{f.attr} (key {f.key}): {exc}", code=code) from None
        except ProtocolError as exc:  # a nested value's own validation (provisioning parameters)
            raise DecodeError(f"{cls.__name__}.{f.attr} (key {f.key}): {exc}", code=exc.code) from None
    # Keys we do not know are ignored: that is how the format grows (see "Versioning").
    try:
        return cls(**kwargs)
    except ProtocolError as exc:
        raise DecodeError(f"{cls.__name__}: {exc}", code=exc.code) from None
    except (ValueError, TypeError) as exc:
        raise DecodeError(f"{cls.__name__}: {exc}") from None


def _scan(data: bytes) -> int | None:
    """Walk the CBOR heads of ``data`` without building anything.

    Enforces certmq's CBOR profile and limits before any allocation; returns
    the message type number found at key 1 of the top-level map, if any.
    """
    end = len(data)
    found_type: int | None = None
    max_uint = m.MAX_UINT

    # One function per item with the head decoded inline: this runs for every request the CA
    # gets, and a call per head (plus a tuple) was most of its cost.
    def item(pos: int, depth: int) -> int:
        nonlocal found_type
        if pos >= end:
            raise DecodeError("truncated CBOR")
        ib = data[pos]
        major = ib >> 5
        arg = ib & 0x1F
        pos += 1
        if arg >= 24:
            if arg > 27:
                raise DecodeError("indefinite lengths and reserved values are not allowed")
            size = 1 << (arg - 24)
            if pos + size > end:
                raise DecodeError("truncated CBOR")
            arg = int.from_bytes(data[pos : pos + size], "big")
            if arg < (24 if size == 1 else 1 << (4 * size)):
                raise DecodeError("integer or length not in shortest form (RFC 8949 section 4.2)")
            pos += size
        if major == 2:
            if arg > end - pos:
                raise DecodeError("truncated CBOR: string longer than the bytes that remain")
            return pos + arg
        if major <= 1:
            if arg > max_uint:
                raise DecodeError("integer out of range")
            return pos
        if major == 3:
            if arg > end - pos:
                raise DecodeError("truncated CBOR: string longer than the bytes that remain")
            try:
                data[pos : pos + arg].decode("utf-8")
            except UnicodeDecodeError:
                raise DecodeError("text string is not valid UTF-8") from None
            return pos + arg
        if major == 4:
            if depth >= MAX_DEPTH:
                raise DecodeError("nested too deeply")
            if arg > MAX_ARRAY_ITEMS or arg > end - pos:
                raise DecodeError(f"array of {arg} items is over the limit")
            for _ in range(arg):
                pos = item(pos, depth + 1)
            return pos
        if major == 5:
            if depth >= MAX_DEPTH:
                raise DecodeError("nested too deeply")
            if arg > MAX_MAP_PAIRS:
                raise DecodeError(f"map of {arg} pairs is over the limit")
            previous = -1
            for _ in range(arg):
                if pos >= end:
                    raise DecodeError("truncated CBOR")
                key = data[pos]
                if key >= 24:
                    raise DecodeError("map keys are unsigned integers below 24")
                if key <= previous:
                    raise DecodeError("map keys must be unique and in ascending order (RFC 8949 section 4.2)")
                previous = key
                pos += 1
                if depth == 0 and key == 1 and pos < end and data[pos] < 24:
                    found_type = data[pos]
                pos = item(pos, depth + 1)
            return pos
        if major == 6:
            raise DecodeError("CBOR tags are not used by certmq")
        # major 7: only true and false
        if arg in (20, 21) and data[pos - 1] in (0xF4, 0xF5):
            return pos
        raise DecodeError("floats, null, undefined and simple values are not used by certmq")

    if item(0, 0) != end:
        raise DecodeError("trailing bytes after the message")
    return found_type
