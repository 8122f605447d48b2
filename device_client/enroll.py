"""Enrollment checks: the bootstrap certificate, CSRs, and validating what the CA sent back.

Everything here is a pure function of certificates, keys and ``now``: the
client, the factory CLI and the certificate store all use the same rules, so
a certificate imported from a file is held to exactly what one received over
MQTT is held to.

Validation of an issued certificate (:func:`validate_certificate`):

* it chains to one of the configured trust anchors (the tenant's CA
  certificates), through the chain that came with it and the configured
  bundle; every issuer on the path is a CA (basicConstraints CA:TRUE,
  keyCertSign) and valid at ``now``, every signature verifies;
* its public key is the one we asked for (same SubjectPublicKeyInfo);
* ``not_before <= now + skew`` and ``now < not_after``;
* its subject CN is the device id (when given);
* it carries the profile's extended key usage (clientAuth for identity,
  codeSigning for ota-signing; nothing required for encryption).

This module knows nothing of MQTT, files or the renewal schedule.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.codes import Profile
from protocol.errors import CertmqError

__all__ = [
    "DEFAULT_BOOTSTRAP_MARGIN",
    "DEFAULT_SKEW",
    "PROFILE_EKU",
    "BootstrapExpiring",
    "InvalidCertificate",
    "build_csr",
    "check_bootstrap",
    "load_certificates",
    "same_public_key",
    "signature_hash",
    "validate_certificate",
    "verify_chain",
]

#: Refuse to provision with a bootstrap certificate expiring within this (``openssl x509 -checkend``).
DEFAULT_BOOTSTRAP_MARGIN = timedelta(days=1)
#: Clock skew tolerated on ``not_before``: device clocks are rarely exact before NTP syncs.
DEFAULT_SKEW = timedelta(minutes=5)

#: EKU an issued certificate must carry, per profile (None: no requirement).
PROFILE_EKU: Mapping[Profile, x509.ObjectIdentifier | None] = {
    Profile.IDENTITY: ExtendedKeyUsageOID.CLIENT_AUTH,
    Profile.ENCRYPTION: None,
    Profile.OTA_SIGNING: ExtendedKeyUsageOID.CODE_SIGNING,
}


class InvalidCertificate(CertmqError, ValueError):
    """A certificate (issued, imported or stored) failed validation; the message says which rule."""


class BootstrapExpiring(CertmqError):
    """The bootstrap certificate expires within the margin (or already has): provisioning refused."""

    def __init__(self, msg: str, *, not_after: datetime) -> None:
        super().__init__(msg)
        self.not_after = not_after


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be an aware UTC datetime")
    return now.astimezone(timezone.utc)


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Certificates from PEM (any number) or one DER certificate; ``InvalidCertificate`` otherwise."""
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise InvalidCertificate(f"not a PEM or DER certificate: {exc}") from None
    return certs


def check_bootstrap(certificate: x509.Certificate, *, now: datetime, margin: timedelta = DEFAULT_BOOTSTRAP_MARGIN) -> None:
    """Raise :class:`BootstrapExpiring` when ``certificate`` is not valid for at least ``margin`` more.

    The same test as ``openssl x509 -checkend <margin seconds>``: the
    certificate must still be valid at ``now + margin``. A certificate not yet
    valid is refused too.
    """
    now = _utc(now)
    not_after = certificate.not_valid_after_utc
    if not_after <= now + margin:
        raise BootstrapExpiring(
            f"the bootstrap certificate expires at {not_after.isoformat()}, within {margin} of "
            f"{now.isoformat()}: get a fresh one before provisioning",
            not_after=not_after,
        )
    if certificate.not_valid_before_utc > now + DEFAULT_SKEW:
        raise BootstrapExpiring(
            f"the bootstrap certificate is not valid before {certificate.not_valid_before_utc.isoformat()}",
            not_after=not_after,
        )


def signature_hash(private_key: Any) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512 | None:
    """Hash to sign with: SHA-256 (P-256, RSA), SHA-384 (P-384), SHA-512 (P-521), None (Ed25519)."""
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        size = private_key.curve.key_size
        return hashes.SHA256() if size <= 256 else hashes.SHA384() if size <= 384 else hashes.SHA512()
    if isinstance(private_key, rsa.RSAPrivateKey):
        return hashes.SHA256()
    return None


def build_csr(private_key: Any, *, device_id: str) -> bytes:
    """A DER PKCS#10 CSR with subject ``CN=<device_id>``, signed by ``private_key`` (on a token if it is one).

    The CA takes only the public key and the proof of possession from it; the
    subject is there so a human reading a CSR file knows whose it is.
    """
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(private_key, signature_hash(private_key))
    )
    return csr.public_bytes(serialization.Encoding.DER)


def _spki(public_key: Any) -> bytes:
    return bytes(public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def same_public_key(a: Any, b: Any) -> bool:
    """Whether two public keys (or a private key's public half) are the same key."""
    if hasattr(a, "public_key") and not hasattr(a, "public_bytes"):
        a = a.public_key()
    if hasattr(b, "public_key") and not hasattr(b, "public_bytes"):
        b = b.public_key()
    return _spki(a) == _spki(b)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        signs = ku.key_cert_sign
    except x509.ExtensionNotFound:
        signs = True  # RFC 5280: no keyUsage means no restriction
    return bool(bc.ca) and signs


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    if child.issuer != parent.subject:
        return False
    try:
        child.verify_directly_issued_by(parent)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def verify_chain(
    leaf: x509.Certificate,
    *,
    intermediates: Sequence[x509.Certificate] = (),
    trust: Sequence[x509.Certificate],
    now: datetime,
) -> list[x509.Certificate]:
    """The path from ``leaf`` to a trust anchor, or :class:`InvalidCertificate`.

    Issuers are looked up among ``intermediates`` and ``trust``; the path ends
    at the first certificate that is in ``trust`` (an issuing CA in the bundle
    is an anchor too). Every issuer must be a CA valid at ``now``. At most 5
    certificates deep.
    """
    now = _utc(now)
    if not trust:
        raise InvalidCertificate("no trust anchors configured (ca_bundle is empty)")
    anchors = {c.fingerprint(hashes.SHA256()) for c in trust}
    pool = list(intermediates) + list(trust)
    path = [leaf]
    current = leaf
    for _ in range(5):
        parent = next((c for c in pool if _issued_by(current, c)), None)
        if parent is None:
            raise InvalidCertificate(
                f"certificate {current.subject.rfc4514_string()!r} was not issued by any configured CA "
                "(issuer unknown or signature does not verify)"
            )
        if not _is_ca(parent):
            raise InvalidCertificate(f"issuer {parent.subject.rfc4514_string()!r} is not a CA")
        if not parent.not_valid_before_utc <= now <= parent.not_valid_after_utc:
            raise InvalidCertificate(f"issuing CA {parent.subject.rfc4514_string()!r} is not valid at {now.isoformat()}")
        path.append(parent)
        if parent.fingerprint(hashes.SHA256()) in anchors:
            return path
        current = parent
    raise InvalidCertificate("certificate path longer than 5 without reaching a trust anchor")


def validate_certificate(
    certificate: x509.Certificate,
    *,
    chain: Iterable[x509.Certificate] = (),
    trust: Sequence[x509.Certificate],
    public_key: Any,
    profile: Profile,
    now: datetime,
    device_id: str | None = None,
    skew: timedelta = DEFAULT_SKEW,
    allow_expired: bool = False,
) -> None:
    """Check an issued certificate by every rule in the module docstring; raise :class:`InvalidCertificate`.

    ``allow_expired`` skips the ``not_after`` rule (only for inspecting a store, never for new certificates).
    """
    now = _utc(now)
    if not same_public_key(certificate.public_key(), public_key):
        raise InvalidCertificate("the certificate's public key is not the key we asked a certificate for")
    if certificate.not_valid_before_utc > now + skew:
        raise InvalidCertificate(
            f"the certificate is not valid before {certificate.not_valid_before_utc.isoformat()} "
            f"(now {now.isoformat()}, skew allowed {skew})"
        )
    if not allow_expired and certificate.not_valid_after_utc <= now:
        raise InvalidCertificate(f"the certificate expired at {certificate.not_valid_after_utc.isoformat()}")
    if device_id is not None:
        cns = [str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if cns != [device_id]:
            raise InvalidCertificate(f"the certificate names {cns!r}, not device {device_id!r}")
    wanted = PROFILE_EKU.get(profile)
    if wanted is not None:
        try:
            ekus = list(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        except x509.ExtensionNotFound:
            ekus = []
        if wanted not in ekus:
            raise InvalidCertificate(f"the certificate lacks the {profile.label} profile's extended key usage {wanted._name}")
    # an expired leaf is still checked against CAs valid now: the CA may have rolled since
    verify_chain(certificate, intermediates=list(chain), trust=trust, now=now)
