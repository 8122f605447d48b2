"""certmq's wire messages as typed, frozen, keyword-only values.

Each class validates its fields on construction, so an instance that exists
is one the codec can put on the wire. Building an invalid message raises
:class:`~protocol.errors.LocalProtocolError`; the codec turns the same
failures on decode into :class:`~protocol.errors.DecodeError`.

What this module must not know: how messages are encoded (that is
:mod:`protocol.codec`), topics, clocks, or transports.

Python values are the natural ones (aware UTC ``datetime``, ``int`` serials,
:class:`~protocol.codes.Profile`); the wire form is in ``docs/wire-format.md``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import re
from collections.abc import Mapping
from functools import cached_property
from typing import ClassVar, Union

from cryptography import x509

from . import extensions
from .codes import ErrorCode, MessageType, Profile, RevocationReason
from .errors import LocalProtocolError
from .renewal import RenewalWindow
from .statuslist import MAX_LIST_SIZE

__all__ = [
    "CertificateIssued",
    "CertificateRequest",
    "Error",
    "Message",
    "ProvisioningParameters",
    "RenewalRequest",
    "RevocationDelta",
    "RevocationRequest",
    "RevocationResult",
    "RevocationSnapshot",
    "SnapshotRequest",
    "StatusPosition",
    "REQUEST_ID_SIZE",
    "MAX_SERIAL_BYTES",
    "MAX_TEXT_BYTES",
    "MAX_ERROR_TEXT_BYTES",
    "MAX_CHAIN_LENGTH",
    "MAX_INDICES",
    "MAX_DER_BYTES",
    "MESSAGE_CLASSES",
]

REQUEST_ID_SIZE = 16  #: bytes; random, chosen by the requester
MAX_SERIAL_BYTES = 20  #: RFC 5280 section 4.1.2.2
MAX_TEXT_BYTES = 64  #: device ids, regions (UTF-8 bytes)
MAX_ERROR_TEXT_BYTES = 256
MAX_CHAIN_LENGTH = 4
MAX_INDICES = 65_536  #: indices in one revocation delta
MAX_DER_BYTES = 16_384  #: one CSR or certificate (ML-DSA-65 certificates are ~5.5 KB)
MAX_UINT = 2**63 - 1


def _fail(msg: str) -> LocalProtocolError:
    return LocalProtocolError(msg)


def _check_uint(name: str, value: object, *, maximum: int = MAX_UINT) -> None:
    if type(value) is not int or not 0 <= value <= maximum:
        raise _fail(f"{name} must be an integer in 0..{maximum}, got {value!r}")


def _check_request_id(value: object) -> None:
    if type(value) is not bytes or len(value) != REQUEST_ID_SIZE:
        raise _fail(f"request_id must be exactly {REQUEST_ID_SIZE} bytes, got {value!r}")


def _check_serial(name: str, value: object) -> None:
    if type(value) is not int or value <= 0 or value.bit_length() > 8 * MAX_SERIAL_BYTES:
        raise _fail(f"{name} must be a positive integer of at most {MAX_SERIAL_BYTES} bytes")


def _check_der(name: str, value: object) -> None:
    if type(value) is not bytes or not value:
        raise _fail(f"{name} must be non-empty DER bytes")
    if len(value) > MAX_DER_BYTES:
        raise _fail(f"{name} is {len(value)} bytes, over the {MAX_DER_BYTES}-byte limit")


# C0 controls, DEL and C1 controls, lone surrogates: one regex search instead of a loop per character.
_CONTROL_OR_SURROGATE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _check_text(name: str, value: object, *, limit: int = MAX_TEXT_BYTES) -> None:
    if type(value) is not str or not value:
        raise _fail(f"{name} must be a non-empty string")
    if len(value.encode("utf-8", "surrogatepass")) > limit:
        raise _fail(f"{name} is longer than {limit} UTF-8 bytes")
    if _CONTROL_OR_SURROGATE.search(value) is not None:
        raise _fail(f"{name} contains a control character or lone surrogate: {value[:40]!r}")


def _check_time(name: str, value: object) -> None:
    if not isinstance(value, _dt.datetime) or value.utcoffset() != _dt.timedelta(0):
        raise _fail(f"{name} must be an aware UTC datetime, got {value!r}")
    if value.microsecond:
        raise _fail(f"{name} must be whole seconds (the wire carries epoch seconds)")
    if value < _EPOCH:
        raise _fail(f"{name} is before 1970")


def _check_enum(name: str, value: object, enum: type[Profile] | type[RevocationReason]) -> None:
    if not isinstance(value, enum):
        raise _fail(f"{name} must be a {enum.__name__}, got {value!r}")


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


def _der_head(der: bytes, pos: int) -> tuple[int, int, int] | None:
    """(tag, content start, content length) of the DER element at ``pos``, or None if unreadable."""
    if pos + 2 > len(der):
        return None
    tag, first, pos = der[pos], der[pos + 1], pos + 2
    if first < 0x80:
        return tag, pos, first
    size = first & 0x7F
    if not 0 < size <= 4 or pos + size > len(der):
        return None
    return tag, pos + size, int.from_bytes(der[pos:pos + size], "big")


def _serial_not_positive(der: bytes) -> bool:
    """True when the certificate's serialNumber is readable and zero or negative; False otherwise
    (a certificate that is unreadable here is left to the real parser to refuse)."""
    cert = _der_head(der, 0)
    tbs = _der_head(der, cert[1]) if cert is not None and cert[0] == 0x30 else None
    if tbs is None or tbs[0] != 0x30:
        return False
    head = _der_head(der, tbs[1])
    if head is not None and head[0] == 0xA0:  # [0] version
        head = _der_head(der, head[1] + head[2])
    if head is None or head[0] != 0x02 or head[2] == 0 or head[1] + head[2] > len(der):
        return False
    content = der[head[1]:head[1] + head[2]]
    return bool(content[0] & 0x80) or not any(content)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StatusPosition:
    """Where a certificate's revocation bit lives: status list ``list_id``, bit ``index``."""

    list_id: int
    index: int

    def __post_init__(self) -> None:
        _check_uint("list_id", self.list_id, maximum=2**32 - 1)
        _check_uint("index", self.index, maximum=2**32 - 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProvisioningParameters:
    """What a bootstrap (claim) certificate asks for when provisioning a device.

    ``device_id`` is the identity to claim (the bootstrap policy decides if it
    may); ``region`` places the certificate in a regional revocation feed.
    """

    device_id: str | None = None
    region: str | None = None

    def __post_init__(self) -> None:
        if self.device_id is not None:
            _check_text("device_id", self.device_id)
        if self.region is not None:
            _check_text("region", self.region)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CertificateRequest:
    """A device (or bootstrap identity) asks for a new certificate for ``profile``."""

    TYPE: ClassVar[MessageType] = MessageType.CERTIFICATE_REQUEST
    request_id: bytes
    profile: Profile
    csr: bytes
    provisioning: ProvisioningParameters | None = None

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_enum("profile", self.profile, Profile)
        _check_der("csr", self.csr)
        if self.provisioning is not None and not isinstance(self.provisioning, ProvisioningParameters):
            raise _fail("provisioning must be ProvisioningParameters or None")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RenewalRequest:
    """Renew the certificate ``current_serial``: with a new key (``csr``) or the same one (``reuse_key``)."""

    TYPE: ClassVar[MessageType] = MessageType.RENEWAL_REQUEST
    request_id: bytes
    profile: Profile
    current_serial: int
    csr: bytes | None = None
    reuse_key: bool = False

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_enum("profile", self.profile, Profile)
        _check_serial("current_serial", self.current_serial)
        if type(self.reuse_key) is not bool:
            raise _fail("reuse_key must be a bool")
        if self.csr is not None:
            _check_der("csr", self.csr)
        if (self.csr is None) == (not self.reuse_key):
            raise _fail("a renewal request carries exactly one of csr and reuse_key=True")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CertificateIssued:
    """The CA's answer to a certificate or renewal request.

    Serial, validity and status-list position are read from ``certificate``
    itself rather than carried twice on the wire: the copy could disagree
    with the certificate, and it would cost ~45 bytes per reply.
    """

    TYPE: ClassVar[MessageType] = MessageType.CERTIFICATE_ISSUED
    request_id: bytes
    certificate: bytes
    chain: tuple[bytes, ...] = ()
    renewal_window: RenewalWindow | None = None

    def __post_init__(self) -> None:
        self._check_fields()
        # Parse now: an instance that exists has a readable certificate.
        _ = self.x509

    @classmethod
    def of_own_certificate(
        cls,
        *,
        request_id: bytes,
        certificate: bytes,
        chain: tuple[bytes, ...] = (),
        renewal_window: RenewalWindow | None = None,
    ) -> CertificateIssued:
        """The reply of a CA about a certificate it has just signed itself: every check of the
        constructor but parsing ``certificate``, which waits for the first use of :attr:`x509`
        (or of the serial, validity, position read from it). Equal to, and encoded exactly as,
        the constructor's instance. Messages decoded from the wire always go through the
        constructor, which refuses an unreadable certificate."""
        message = object.__new__(cls)
        message.__dict__.update(request_id=request_id, certificate=certificate, chain=chain,
                                renewal_window=renewal_window)
        message._check_fields()
        return message

    def _check_fields(self) -> None:
        _check_request_id(self.request_id)
        _check_der("certificate", self.certificate)
        if type(self.chain) is not tuple or len(self.chain) > MAX_CHAIN_LENGTH:
            raise _fail(f"chain must be a tuple of at most {MAX_CHAIN_LENGTH} DER certificates")
        for der in self.chain:
            _check_der("chain entry", der)
        if self.renewal_window is not None:
            if not isinstance(self.renewal_window, RenewalWindow):
                raise _fail("renewal_window must be a RenewalWindow or None")
            _check_time("renewal_window.start", self.renewal_window.start)
            _check_time("renewal_window.end", self.renewal_window.end)

    @cached_property
    def x509(self) -> x509.Certificate:
        """The issued certificate as a :class:`cryptography.x509.Certificate`."""
        if _serial_not_positive(self.certificate):
            # RFC 5280 4.1.2.2; cryptography only warns (and will refuse in a future release): a
            # warning is no answer for a decoder, which must refuse or accept.
            raise _fail("certificate serial number is not a positive integer (RFC 5280)")
        try:
            return x509.load_der_x509_certificate(self.certificate)
        except (ValueError, x509.InvalidVersion) as exc:
            raise _fail(f"certificate is not a DER X.509 certificate: {exc}") from None

    @property
    def serial(self) -> int:
        return self.x509.serial_number

    @property
    def not_before(self) -> _dt.datetime:
        return self.x509.not_valid_before_utc

    @property
    def not_after(self) -> _dt.datetime:
        return self.x509.not_valid_after_utc

    @property
    def status_position(self) -> StatusPosition | None:
        """The certificate's status-list position extension, if it has one."""
        try:
            ext = self.x509.extensions.get_extension_for_oid(
                x509.ObjectIdentifier(extensions.STATUS_POSITION_OID)
            )
        except x509.ExtensionNotFound:
            return None
        value = ext.value
        assert isinstance(value, x509.UnrecognizedExtension)
        list_id, index = extensions.decode_status_position(value.value)
        return StatusPosition(list_id=list_id, index=index)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RevocationRequest:
    """An operator revokes one certificate (``serial``) or a device's certificates (``device_id``,
    optionally only those of ``profile``). Authorised by the operator's identity, never a device's."""

    TYPE: ClassVar[MessageType] = MessageType.REVOCATION_REQUEST
    request_id: bytes
    reason: RevocationReason
    serial: int | None = None
    device_id: str | None = None
    profile: Profile | None = None

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_enum("reason", self.reason, RevocationReason)
        if (self.serial is None) == (self.device_id is None):
            raise _fail("a revocation request names exactly one of serial and device_id")
        if self.serial is not None:
            _check_serial("serial", self.serial)
            if self.profile is not None:
                raise _fail("profile narrows a device_id revocation; a serial is already exact")
        if self.device_id is not None:
            _check_text("device_id", self.device_id)
        if self.profile is not None:
            _check_enum("profile", self.profile, Profile)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RevocationResult:
    """Reply to a :class:`RevocationRequest`: the serials this request newly revoked."""

    TYPE: ClassVar[MessageType] = MessageType.REVOCATION_RESULT
    request_id: bytes
    serials: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        if type(self.serials) is not tuple or len(self.serials) > MAX_INDICES:
            raise _fail(f"serials must be a tuple of at most {MAX_INDICES} serials")
        for serial in self.serials:
            _check_serial("serial", serial)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RevocationSnapshot:
    """A whole status list at ``sequence``: ``bits`` is the compressed bitstring
    (:func:`protocol.statuslist.compress`) of ``size`` bits."""

    TYPE: ClassVar[MessageType] = MessageType.REVOCATION_SNAPSHOT
    list_id: int
    sequence: int
    size: int
    bits: bytes
    time: _dt.datetime

    def __post_init__(self) -> None:
        _check_uint("list_id", self.list_id, maximum=2**32 - 1)
        _check_uint("sequence", self.sequence)
        _check_uint("size", self.size, maximum=MAX_LIST_SIZE)
        if type(self.bits) is not bytes:
            raise _fail("bits must be bytes")
        _check_time("time", self.time)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RevocationDelta:
    """Indices newly revoked in list ``list_id``, taking it from ``from_sequence`` to ``to_sequence``."""

    TYPE: ClassVar[MessageType] = MessageType.REVOCATION_DELTA
    list_id: int
    from_sequence: int
    to_sequence: int
    indices: tuple[int, ...]
    reason: RevocationReason
    time: _dt.datetime

    def __post_init__(self) -> None:
        _check_uint("list_id", self.list_id, maximum=2**32 - 1)
        _check_uint("from_sequence", self.from_sequence)
        _check_uint("to_sequence", self.to_sequence)
        if self.to_sequence <= self.from_sequence:
            raise _fail("to_sequence must be greater than from_sequence")
        if type(self.indices) is not tuple or len(self.indices) > MAX_INDICES:
            raise _fail(f"indices must be a tuple of at most {MAX_INDICES} integers")
        previous = -1
        for index in self.indices:
            _check_uint("index", index, maximum=2**32 - 1)
            if index <= previous:
                raise _fail("indices must be strictly increasing")
            previous = index
        _check_enum("reason", self.reason, RevocationReason)
        _check_time("time", self.time)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SnapshotRequest:
    """A subscriber that saw a gap asks for the current snapshot (of ``list_id``, or all lists)."""

    TYPE: ClassVar[MessageType] = MessageType.SNAPSHOT_REQUEST
    request_id: bytes
    list_id: int | None = None

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        if self.list_id is not None:
            _check_uint("list_id", self.list_id, maximum=2**32 - 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Error:
    """The one failure reply. ``request_id`` is absent when the request could not be read.

    ``code`` is an :class:`~protocol.codes.ErrorCode`, or a plain ``int`` for a
    code this implementation does not know (a newer peer's).
    """

    TYPE: ClassVar[MessageType] = MessageType.ERROR
    code: ErrorCode | int
    text: str
    request_id: bytes | None = None
    retry_after: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.code, int) or isinstance(self.code, bool) or not 0 <= self.code <= 65_535:
            raise _fail(f"code must be an integer in 0..65535, got {self.code!r}")
        if type(self.text) is not str or len(self.text.encode("utf-8", "surrogatepass")) > MAX_ERROR_TEXT_BYTES:
            raise _fail(f"text must be a string of at most {MAX_ERROR_TEXT_BYTES} UTF-8 bytes")
        if self.request_id is not None:
            _check_request_id(self.request_id)
        if self.retry_after is not None:
            _check_uint("retry_after", self.retry_after, maximum=2**32 - 1)

    @property
    def transient(self) -> bool:
        """True when the same request may succeed later."""
        return isinstance(self.code, ErrorCode) and self.code.transient

    @classmethod
    def for_exception(cls, exc: BaseException, *, request_id: bytes | None = None) -> Error:
        """The reply for a decode failure or other protocol error."""
        code = getattr(exc, "code", ErrorCode.INTERNAL)
        text = str(exc).encode("utf-8", "replace")[:MAX_ERROR_TEXT_BYTES].decode("utf-8", "ignore")
        return cls(code=code, text=text, request_id=request_id)


Message = Union[
    CertificateRequest,
    RenewalRequest,
    CertificateIssued,
    RevocationRequest,
    RevocationResult,
    RevocationSnapshot,
    RevocationDelta,
    SnapshotRequest,
    Error,
]

MESSAGE_CLASSES: Mapping[MessageType, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        CertificateRequest,
        RenewalRequest,
        CertificateIssued,
        RevocationRequest,
        RevocationResult,
        RevocationSnapshot,
        RevocationDelta,
        SnapshotRequest,
        Error,
    )
}
