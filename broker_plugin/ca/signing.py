"""The signing seam: what the CA service hands to whoever verifies CSRs and signs.

The service (``broker_plugin.ca.service``) decides *what* to issue -- identity,
idempotency, claims, status slot, serial -- and then hands a batch of
:class:`SignJob` values to a :class:`SigningBackend`, which does the CPU work
(load CSR, proof of possession, identity and key-policy checks, build, sign) and
returns one :class:`SignResult` per job. :class:`InlineSigner` does it in the
calling process; ``broker_plugin.ca.pool`` does it in worker processes, in
batches, so the broker's event loop never verifies or signs.

Jobs and results are plain picklable values (DER bytes, ints, strings): they
cross process boundaries. :func:`run_job` is the one function every backend
runs per job, so all backends refuse and issue exactly alike.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections.abc import Mapping, Sequence
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from protocol.codes import ErrorCode, Profile

from .issuer import Issuer, check_csr_identity, load_csr, plainly_names, verified_public_key
from .policy import PolicyRefusal, TenantPolicy

__all__ = [
    "InlineSigner",
    "SignJob",
    "SignResult",
    "SigningBackend",
    "TenantAuthority",
    "run_job",
    "spki_sha256",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TenantAuthority:
    """One tenant's CA as the service needs it: policy, certificates, and the issuing key.

    ``key`` is any cryptography private-key object (file, PKCS#11 subclass, ML-DSA).
    """

    name: str
    policy: TenantPolicy
    root: x509.Certificate
    issuing: x509.Certificate
    key: object

    def issuer(self) -> Issuer:
        """An :class:`~.issuer.Issuer` for this tenant's issuing CA."""
        return Issuer(ca_certificate=self.issuing, ca_key=self.key, tenant_policy=self.policy)

    def chain_der(self) -> tuple[bytes, ...]:
        """Issuing CA then root, DER: the chain sent with issued certificates."""
        return tuple(c.public_bytes(serialization.Encoding.DER) for c in (self.issuing, self.root))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SignJob:
    """One certificate to verify and sign.

    Exactly one of ``csr_der`` (a new key: proof of possession, identity and
    policy are checked) and ``public_key_der`` (a key already proven, e.g. key
    reuse on renewal: only the policy is checked) is given.
    """

    tenant: str
    device_id: str
    profile: Profile
    serial: int
    not_before: dt.datetime
    csr_der: bytes | None = None
    public_key_der: bytes | None = None
    status_position: tuple[int, int] | None = None
    region: str | None = None
    capabilities: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if (self.csr_der is None) == (self.public_key_der is None):
            raise ValueError("a SignJob carries exactly one of csr_der and public_key_der")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SignResult:
    """The outcome of one :class:`SignJob`: a certificate, or a refusal with its wire code.

    ``not_before`` / ``not_after`` are the certificate's validity in epoch seconds, as signed
    (:func:`run_job` fills them in), so the service need not parse the certificate to store it;
    ints, not datetimes, because results are pickled back from worker processes.
    """

    der: bytes | None = None
    spki_sha256: bytes | None = None
    refusal_code: ErrorCode | None = None
    refusal_text: str = ""
    not_before: int | None = None
    not_after: int | None = None

    @property
    def ok(self) -> bool:
        return self.der is not None


def spki_sha256(public_key: object) -> bytes:
    """SHA-256 of the DER SubjectPublicKeyInfo: how the registry remembers a device's key."""
    der = public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def run_job(issuer: Issuer, job: SignJob) -> SignResult:
    """Verify and sign one job with ``issuer``. Policy refusals become results, not exceptions."""
    try:
        if job.csr_der is not None:
            csr = load_csr(job.csr_der)
            public_key = verified_public_key(csr)
            if not plainly_names(csr, job.device_id):
                check_csr_identity(csr, job.device_id, tenant=job.tenant)
        else:
            assert job.public_key_der is not None
            try:
                public_key = serialization.load_der_public_key(job.public_key_der)
            except ValueError as exc:
                raise PolicyRefusal(ErrorCode.KEY_REJECTED, f"unreadable public key: {exc}") from None
        signed = issuer.issue_der(
            device_id=job.device_id,
            profile=job.profile,
            public_key=public_key,
            serial=job.serial,
            not_before=job.not_before,
            status_position=job.status_position,
            region=job.region,
            capabilities=job.capabilities,
        )
    except PolicyRefusal as refusal:
        return SignResult(refusal_code=refusal.code, refusal_text=refusal.text)
    return SignResult(der=signed.der, spki_sha256=hashlib.sha256(signed.spki).digest(),
                      not_before=_epoch(signed.not_before), not_after=_epoch(signed.not_after))


def _epoch(when: dt.datetime) -> int:
    # X.509 times are whole seconds: exact.
    return int(when.timestamp())


class SigningBackend(Protocol):
    """Whoever runs :func:`run_job` for the service: in-process, or a pool of worker processes."""

    async def sign(self, jobs: Sequence[SignJob]) -> list[SignResult]:
        """One result per job, in order. Raises only for a broken backend, never for a refusal."""
        ...

    async def close(self) -> None:
        """Release workers and keys."""
        ...


class InlineSigner:
    """Runs jobs in the calling thread: for the CLI, tests, and as the benchmark's one-process path."""

    def __init__(self, authorities: Mapping[str, TenantAuthority]) -> None:
        self._issuers = {name: a.issuer() for name, a in authorities.items()}

    async def sign(self, jobs: Sequence[SignJob]) -> list[SignResult]:
        """Sign every job here and now."""
        results = []
        for job in jobs:
            issuer = self._issuers.get(job.tenant)
            if issuer is None:
                results.append(SignResult(refusal_code=ErrorCode.NOT_AUTHORIZED, refusal_text=f"no tenant {job.tenant!r}"))
            else:
                results.append(run_job(issuer, job))
        return results

    async def close(self) -> None:
        """Nothing to release."""
