"""The one exception tree of certmq's protocol layer.

::

    CertmqError
     ├── ProtocolError ............... a message broke the wire format (carries .code)
     │    ├── LocalProtocolError ..... *we* tried to build or send something invalid
     │    │    └── InvalidIdentifier . device id / tenant / region unusable in a topic
     │    └── RemoteProtocolError .... the *peer* sent something invalid
     │         ├── DecodeError ....... bytes that are not a valid certmq message
     │         │    └── UnknownMessageType  (well-formed, but a type we do not know)
     │         └── TopicError ........ a topic that is not one of ours
     ├── SequenceGap ................. a revocation delta that does not follow the held sequence
     └── RequestRejected ............. the peer answered with an Error message (.code, .retry_after)

As in h11, *local* means "the bug is on this side", *remote* means "the other
side did it". Conversion from backend exceptions (cbor2, cryptography) happens
in one place each, so callers only ever see this tree.
"""

from __future__ import annotations

from .codes import ErrorCode

__all__ = [
    "CertmqError",
    "DecodeError",
    "InvalidIdentifier",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "RequestRejected",
    "SequenceGap",
    "TopicError",
    "UnknownMessageType",
]


class CertmqError(Exception):
    """Base of every exception certmq raises on purpose."""


class ProtocolError(CertmqError):
    """A message or topic violates the wire format. ``code`` is the wire code to reply with."""

    code: ErrorCode = ErrorCode.MALFORMED

    def __init__(self, msg: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(msg)
        if code is not None:
            self.code = code


class LocalProtocolError(ProtocolError, ValueError):
    """We were about to build or send something the wire format forbids."""


class InvalidIdentifier(LocalProtocolError):
    """A device id, tenant or region that cannot be used as a topic level."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the wire format forbids."""


class DecodeError(RemoteProtocolError):
    """Bytes that do not decode to a valid certmq message. Nothing else escapes ``decode``."""


class UnknownMessageType(DecodeError):
    """A well-formed message whose type number this implementation does not know."""

    code = ErrorCode.UNKNOWN_MESSAGE_TYPE

    def __init__(self, msg: str, *, message_type: int) -> None:
        super().__init__(msg)
        self.message_type = message_type


class TopicError(RemoteProtocolError):
    """A topic that does not parse as one of certmq's topics."""


class SequenceGap(CertmqError):
    """A revocation delta does not start at the sequence number held: refuse it and resync."""

    def __init__(self, msg: str, *, held: int, got_from: int) -> None:
        super().__init__(msg)
        self.held = held
        self.got_from = got_from


class RequestRejected(CertmqError):
    """The peer answered a request with an :class:`~protocol.messages.Error`."""

    def __init__(self, code: int, text: str, *, retry_after: int | None = None) -> None:
        try:
            code = ErrorCode(code)
        except ValueError:
            pass  # a newer peer's code: keep the integer
        super().__init__(f"{code!s}: {text}" if not isinstance(code, ErrorCode) else f"{code.name}: {text}")
        self.code = code
        self.text = text
        self.retry_after = retry_after
