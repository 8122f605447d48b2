"""Creating a tenant's CA hierarchy: a self-signed root and one issuing CA under it.

Root: ``O=<tenant>, CN=<tenant> certmq root CA``, basicConstraints CA:TRUE
pathLen 1; issuing CA: ``O=<tenant>, CN=<tenant> certmq issuing CA``, CA:TRUE
pathLen 0 (it signs end entities only). Both carry keyUsage keyCertSign +
cRLSign (critical), SKI, and AKI (the root's AKI is its own SKI). The issuing
CA's validity is clamped to the root's.

Keys come from the caller (files, PKCS#11, ML-DSA: any cryptography private
key object); this module never stores anything.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from protocol.topics import validate_identifier

from .issuer import random_serial
from .signers import signature_hash

__all__ = ["DEFAULT_ISSUING_LIFETIME", "DEFAULT_ROOT_LIFETIME", "TenantCA", "create_tenant_ca"]

#: 20 years (with leap days).
DEFAULT_ROOT_LIFETIME = timedelta(days=20 * 365 + 5)
#: 5 years (with leap days).
DEFAULT_ISSUING_LIFETIME = timedelta(days=5 * 365 + 1)

_CA_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


@dataclass(frozen=True, slots=True)
class TenantCA:
    """A tenant's root and issuing CA certificates (no keys)."""

    root: x509.Certificate
    issuing: x509.Certificate

    def chain_pem(self) -> bytes:
        """Issuing then root certificate, PEM: what a device's trust store and a TLS server need."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.issuing, self.root))


def _name(tenant: str, role: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, tenant),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{tenant} certmq {role} CA"),
        ]
    )


def create_tenant_ca(
    *,
    tenant: str,
    root_key: object,
    issuing_key: object,
    now: datetime,
    root_lifetime: timedelta = DEFAULT_ROOT_LIFETIME,
    issuing_lifetime: timedelta = DEFAULT_ISSUING_LIFETIME,
    rng_bytes: Callable[[int], bytes] = os.urandom,
) -> TenantCA:
    """Make ``tenant``'s self-signed root and the issuing CA it signs, both valid from ``now``.

    ``rng_bytes`` draws the serials (:func:`.issuer.random_serial`). Raises
    ``ValueError`` for a naive ``now``, a non-positive lifetime, or a tenant id
    unusable in topics and names.
    """
    validate_identifier(tenant, what="tenant")
    if len(f"{tenant} certmq issuing CA") > 64:
        raise ValueError(f"tenant id {tenant!r} is too long for a CA commonName")
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be an aware datetime (UTC)")
    if root_lifetime <= timedelta(0) or issuing_lifetime <= timedelta(0):
        raise ValueError("CA lifetimes must be longer than zero")
    start = now.astimezone(timezone.utc).replace(microsecond=0)
    root_end = start + root_lifetime
    issuing_end = min(start + issuing_lifetime, root_end)

    root_public = root_key.public_key()  # type: ignore[attr-defined]
    issuing_public = issuing_key.public_key()  # type: ignore[attr-defined]
    root_ski = x509.SubjectKeyIdentifier.from_public_key(root_public)
    root_name = _name(tenant, "root")

    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_public)
        .serial_number(random_serial(rng_bytes))
        .not_valid_before(start)
        .not_valid_after(root_end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(root_ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski), critical=False)
        .sign(root_key, signature_hash(root_key))  # type: ignore[arg-type]
    )
    issuing = (
        x509.CertificateBuilder()
        .subject_name(_name(tenant, "issuing"))
        .issuer_name(root_name)
        .public_key(issuing_public)
        .serial_number(random_serial(rng_bytes))
        .not_valid_before(start)
        .not_valid_after(issuing_end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(issuing_public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski), critical=False)
        .sign(root_key, signature_hash(root_key))  # type: ignore[arg-type]
    )
    return TenantCA(root=root, issuing=issuing)
