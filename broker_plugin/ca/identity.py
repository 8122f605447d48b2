"""What the CA service speaks in: authenticated identities and the outcomes of their requests.

An adapter turns a peer's client certificate into an :class:`Identity`
(:meth:`~.service.CAService.identify`), hands it with each publish to the service, and sends
the :class:`Outgoing` publishes of the :class:`Outcome` it gets back. These are plain values: no
I/O, no registry, no signing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum

from protocol.codes import ErrorCode
from protocol.errors import CertmqError

from ..store.base import CertificateKind, CertificateRecord, StatusDelta

__all__ = [
    "KIND_OF_RECORD",
    "NO_REGION",
    "Identity",
    "IdentityKind",
    "NotAuthorized",
    "Outcome",
    "Outgoing",
    "UnknownStatusList",
]

#: Registry region of certificates issued without any region (they carry no region extension).
NO_REGION = "-"


class IdentityKind(enum.StrEnum):
    """What an authenticated peer is: a device, a claim credential, or an operator."""

    DEVICE = "device"
    BOOTSTRAP = "bootstrap"
    OPERATOR = "operator"


KIND_OF_RECORD = {
    CertificateKind.OPERATIONAL: IdentityKind.DEVICE,
    CertificateKind.FACTORY: IdentityKind.DEVICE,
    CertificateKind.BOOTSTRAP: IdentityKind.BOOTSTRAP,
    CertificateKind.OPERATOR: IdentityKind.OPERATOR,
}
"""Which identity a certificate of each registry kind gives (factory certificates are devices')."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Identity:
    """An authenticated peer, as :meth:`CAService.identify` found it in the registry.

    ``name`` is the device id, the claim id (bootstrap) or the operator id: the certificate's CN.
    """

    tenant: str
    kind: IdentityKind
    name: str
    serial: int
    spki_sha256: bytes
    not_before: dt.datetime
    not_after: dt.datetime

    @property
    def key(self) -> str:
        """The identity as idempotency keys and the audit trail name it: ``device:sensor-1``."""
        return f"{self.kind}:{self.name}"


@dataclasses.dataclass(frozen=True)
class Outgoing:
    """One publish the adapter must send."""

    topic: str
    payload: bytes


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What handling one request decided: replies to publish, and what a revocation took away."""

    replies: tuple[Outgoing, ...]
    revoked: tuple[CertificateRecord, ...] = ()
    deltas: tuple[StatusDelta, ...] = ()


class NotAuthorized(CertmqError):
    """A certificate that may not act (unknown CA or serial, revoked, expired, not yet valid)."""

    def __init__(self, code: ErrorCode, text: str) -> None:
        super().__init__(f"{code.name}: {text}")
        self.code = code
        self.text = text


class UnknownStatusList(CertmqError, LookupError):
    """No status list with that id in that tenant's region."""

    code = ErrorCode.UNKNOWN_CERTIFICATE
