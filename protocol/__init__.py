"""certmq's wire protocol, sans-I/O: bytes in, messages and decisions out.

Nothing here touches a socket, a clock, a random source, a database or an event
loop; callers pass ``now`` and ``rng``. This package is what a C or MicroPython
implementer ports, with ``docs/wire-format.md`` as the normative text.

Modules:

- :mod:`protocol.codes` -- wire integers: message types, profiles, error codes, RFC 5280 reasons
- :mod:`protocol.errors` -- the exception tree
- :mod:`protocol.messages` -- typed, frozen messages
- :mod:`protocol.codec` -- :func:`encode` / :func:`decode` (deterministic CBOR)
- :mod:`protocol.topics` -- topic builders and parser
- :mod:`protocol.renewal` -- renewal windows, hash staggering, backoff
- :mod:`protocol.statuslist` -- revocation status lists, snapshots, deltas
- :mod:`protocol.extensions` -- certmq's X.509 extensions (DER)
"""

from __future__ import annotations

from .codec import decode, encode
from .codes import ErrorCode, MessageType, Profile, RevocationReason
from .errors import (
    CertmqError,
    DecodeError,
    InvalidIdentifier,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    RequestRejected,
    SequenceGap,
    TopicError,
    UnknownMessageType,
)
from .messages import (
    CertificateIssued,
    CertificateRequest,
    Error,
    Message,
    ProvisioningParameters,
    RenewalRequest,
    RevocationDelta,
    RevocationRequest,
    RevocationResult,
    RevocationSnapshot,
    SnapshotRequest,
    StatusPosition,
)
from .renewal import RenewalPolicy, RenewalWindow

__all__ = [
    "CertificateIssued",
    "CertificateRequest",
    "CertmqError",
    "DecodeError",
    "Error",
    "ErrorCode",
    "InvalidIdentifier",
    "LocalProtocolError",
    "Message",
    "MessageType",
    "Profile",
    "ProtocolError",
    "ProvisioningParameters",
    "RemoteProtocolError",
    "RenewalPolicy",
    "RenewalRequest",
    "RenewalWindow",
    "RequestRejected",
    "RevocationDelta",
    "RevocationReason",
    "RevocationRequest",
    "RevocationResult",
    "RevocationSnapshot",
    "SequenceGap",
    "SnapshotRequest",
    "StatusPosition",
    "TopicError",
    "UnknownMessageType",
    "decode",
    "encode",
]
