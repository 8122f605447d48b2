"""Integer codes that travel on the wire.

Wire codes are ``IntEnum``s; Python exceptions are separate and carry them
(see :mod:`protocol.errors`). Numbers are part of the normative wire format
(``docs/wire-format.md``): never renumber, only add.
"""

from __future__ import annotations

import enum

__all__ = ["ErrorCode", "MessageType", "Profile", "RevocationReason"]


class MessageType(enum.IntEnum):
    """Value of key 1 (``type``) of every message."""

    CERTIFICATE_REQUEST = 1
    RENEWAL_REQUEST = 2
    CERTIFICATE_ISSUED = 3
    REVOCATION_REQUEST = 4
    REVOCATION_RESULT = 5
    REVOCATION_SNAPSHOT = 6
    REVOCATION_DELTA = 7
    SNAPSHOT_REQUEST = 8
    ERROR = 9


class Profile(enum.IntEnum):
    """Certificate profiles a device may ask for."""

    IDENTITY = 1  #: TLS client authentication (clientAuth)
    ENCRYPTION = 2  #: data encryption (keyEncipherment / keyAgreement)
    OTA_SIGNING = 3  #: firmware / update signing (codeSigning)

    @property
    def label(self) -> str:
        """The profile's name as used in configuration and topics: ``ota-signing``."""
        return self.name.lower().replace("_", "-")

    @classmethod
    def from_label(cls, label: str) -> Profile:
        try:
            return cls[label.upper().replace("-", "_")]
        except KeyError:
            names = ", ".join(p.label for p in cls)
            raise ValueError(f"unknown profile {label!r} (known: {names})") from None


class RevocationReason(enum.IntEnum):
    """CRLReason, RFC 5280 section 5.3.1 (value 7 is unused there)."""

    UNSPECIFIED = 0
    KEY_COMPROMISE = 1
    CA_COMPROMISE = 2
    AFFILIATION_CHANGED = 3
    SUPERSEDED = 4
    CESSATION_OF_OPERATION = 5
    CERTIFICATE_HOLD = 6
    REMOVE_FROM_CRL = 8
    PRIVILEGE_WITHDRAWN = 9
    AA_COMPROMISE = 10


class ErrorCode(enum.IntEnum):
    """Codes carried by :class:`protocol.messages.Error`.

    Ranges: 1-9 the message itself is bad; 10-29 refused by policy (retrying
    the same request will fail again); 30-39 transient (retry, honouring
    ``retry_after``); 40-49 server fault.
    """

    MALFORMED = 1  #: not a valid certmq message (CBOR, limits, fields)
    UNSUPPORTED_VERSION = 2
    UNKNOWN_MESSAGE_TYPE = 3
    TOO_LARGE = 4
    NOT_AUTHORIZED = 10  #: this identity may not do this on this topic
    IDENTITY_MISMATCH = 11  #: the CSR or request names another device
    BAD_CSR = 12  #: CSR unreadable or its signature (proof of possession) fails
    KEY_REJECTED = 13  #: key algorithm or size not allowed by the tenant's policy
    UNKNOWN_PROFILE = 14
    CLAIM_REFUSED = 15  #: bootstrap credential may not claim this device (any more)
    RECOVERY_WINDOW_PASSED = 16  #: expired too long ago to renew; re-provision
    UNKNOWN_CERTIFICATE = 17
    CERTIFICATE_REVOKED = 18
    REQUEST_ID_REUSED = 19  #: same request id, different request
    BUSY = 30  #: admission queue full: retry after ``retry_after`` seconds
    RATE_LIMITED = 31
    INTERNAL = 40

    @property
    def transient(self) -> bool:
        """True when retrying the same request later may succeed."""
        return 30 <= self < 40 or self == ErrorCode.INTERNAL
