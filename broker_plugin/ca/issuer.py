"""CSR checks and end-entity certificate building for one tenant's issuing CA.

The CA decides every name and extension itself: nothing is copied from a CSR
but its public key. A CSR only has to prove possession of that key, stay
small, and not claim to be another device.

What a certificate looks like (all profiles):

* subject ``O=<tenant>, CN=<device id>`` (the broker's ACL keys on CN; O keeps
  certificates of equal device ids in different tenants apart for people
  reading them); issuer = the CA's subject;
* validity ``not_before .. not_before + profile lifetime``, clamped to the CA's
  own ``not_valid_after`` (a certificate outliving its issuer cannot be
  validated anyway; the renewal timing sees the shorter lifetime);
* basicConstraints ``CA:FALSE`` (critical), keyUsage (critical) and
  extendedKeyUsage from the profile (:mod:`.policy`), SKI, AKI (the CA's SKI),
  subjectAltName ``URI:urn:certmq:<tenant>:<device id>`` (non-critical: the
  subject is not empty), CRL distribution point when a CRL URL is known, and
  certmq's status-position / capabilities / region extensions
  (:mod:`protocol.extensions`).

This module does not draw serials or status positions, talk to the registry,
or read the clock: the caller passes them in.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from protocol import extensions
from protocol.codes import ErrorCode, Profile
from protocol.topics import validate_identifier

from .policy import PolicyRefusal, TenantPolicy

__all__ = [
    "MAX_CSR_BYTES",
    "SERIAL_BITS",
    "Issuer",
    "check_csr_identity",
    "device_urn",
    "load_csr",
    "random_serial",
    "signature_hash",
    "verify_csr",
]

#: Largest CSR accepted (an ML-DSA-87 CSR is about 7.5 KiB).
MAX_CSR_BYTES = 16 * 1024
#: Serials are exactly this many bits: positive, 20 octets of DER, 158 random bits.
SERIAL_BITS = 159


def signature_hash(private_key: object) -> hashes.HashAlgorithm | None:
    """Hash for signing with ``private_key``: SHA-256 (P-256, RSA), SHA-384 (P-384),
    SHA-512 (P-521), None for Ed25519 / Ed448 / ML-DSA, which hash internally.

    Works for any subclass of cryptography's key classes (PKCS#11 keys included).
    """
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        size = private_key.curve.key_size
        if size <= 256:
            return hashes.SHA256()
        if size <= 384:
            return hashes.SHA384()
        return hashes.SHA512()
    if isinstance(private_key, rsa.RSAPrivateKey):
        return hashes.SHA256()
    return None


def random_serial(rng_bytes: Callable[[int], bytes]) -> int:
    """A positive :data:`SERIAL_BITS`-bit serial from 20 random bytes (158 of their bits).

    The top bit is fixed so every serial has the same DER length (20 octets,
    the RFC 5280 maximum) and is never zero or negative.
    """
    raw = rng_bytes(20)
    if len(raw) != 20:
        raise ValueError(f"rng_bytes(20) returned {len(raw)} bytes")
    return (int.from_bytes(raw, "big") >> (160 - SERIAL_BITS + 1)) | (1 << (SERIAL_BITS - 1))


def device_urn(tenant: str, device_id: str) -> str:
    """``urn:certmq:<tenant>:<device id>`` with the device id percent-encoded where URIs need it."""
    return f"urn:certmq:{quote(tenant, safe='')}:{quote(device_id, safe='-._~:@')}"


# -- CSRs -------------------------------------------------------------------------------


def load_csr(der: bytes) -> x509.CertificateSigningRequest:
    """Parse a DER CSR; ``PolicyRefusal(BAD_CSR)`` if it is too large or not a CSR."""
    if not isinstance(der, (bytes, bytearray)):
        raise PolicyRefusal(ErrorCode.BAD_CSR, f"CSR must be DER bytes, not {type(der).__name__}")
    if len(der) > MAX_CSR_BYTES:
        raise PolicyRefusal(ErrorCode.BAD_CSR, f"CSR of {len(der)} bytes is larger than {MAX_CSR_BYTES}")
    try:
        csr = x509.load_der_x509_csr(bytes(der))
    except ValueError as exc:
        raise PolicyRefusal(ErrorCode.BAD_CSR, f"not a DER PKCS#10 CSR: {exc}") from None
    return csr


def verify_csr(csr: x509.CertificateSigningRequest) -> None:
    """Proof of possession: the CSR's signature verifies with its own public key.

    Raises ``PolicyRefusal(BAD_CSR)`` otherwise, and ``PolicyRefusal(KEY_REJECTED)``
    for a key cryptography cannot even load.
    """
    try:
        csr.public_key()
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise PolicyRefusal(ErrorCode.KEY_REJECTED, f"unsupported public key in CSR: {exc}") from None
    try:
        valid = csr.is_signature_valid
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise PolicyRefusal(ErrorCode.BAD_CSR, f"CSR signature cannot be checked: {exc}") from None
    if not valid:
        raise PolicyRefusal(ErrorCode.BAD_CSR, "CSR signature does not verify with its public key (no proof of possession)")


def check_csr_identity(csr: x509.CertificateSigningRequest, device_id: str, *, tenant: str | None = None) -> None:
    """Refuse (``IDENTITY_MISMATCH``) a CSR that names a device other than ``device_id``.

    Looked at: subject commonNames, and in a subjectAltName the dNSNames, URIs
    and directoryName commonNames. Each must be ``device_id`` (a URI must be
    :func:`device_urn` of it, for ``tenant`` if given). An empty subject and no
    SAN is fine. Other name forms (IP, e-mail, otherName) cannot name a certmq
    device and are ignored: none of them is ever copied into a certificate.
    """
    try:
        names = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            san = None
    except ValueError as exc:  # malformed extensions or names surface lazily
        raise PolicyRefusal(ErrorCode.BAD_CSR, f"CSR has unreadable names or extensions: {exc}") from None
    if san is not None:
        names += san.get_values_for_type(x509.DNSName)
        for directory in san.get_values_for_type(x509.DirectoryName):
            names += [str(a.value) for a in directory.get_attributes_for_oid(NameOID.COMMON_NAME)]
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if not _urn_names(uri, device_id, tenant):
                raise PolicyRefusal(ErrorCode.IDENTITY_MISMATCH, f"CSR names {uri!r}, not device {device_id!r}")
    for name in names:
        if name != device_id:
            raise PolicyRefusal(ErrorCode.IDENTITY_MISMATCH, f"CSR names {name!r}, not device {device_id!r}")


def _urn_names(uri: str, device_id: str, tenant: str | None) -> bool:
    if tenant is not None:
        return uri == device_urn(tenant, device_id)
    prefix, _, rest = uri.partition("urn:certmq:")
    _tenant, sep, device = rest.partition(":")
    return prefix == "" and sep == ":" and device == quote(device_id, safe="-._~:@")


# -- issuing ----------------------------------------------------------------------------


def _as_utc(when: datetime, what: str) -> datetime:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{what} must be an aware datetime (UTC)")
    return when.astimezone(timezone.utc)


def _same_key(a: object, b: object) -> bool:
    def spki(key: object) -> bytes:
        return key.public_bytes(  # type: ignore[attr-defined,no-any-return]
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    return spki(a) == spki(b)


class Issuer:
    """Builds and signs end-entity certificates for one tenant with one issuing CA.

    ``ca_key`` is any cryptography private key object matching
    ``ca_certificate`` (file, PKCS#11 subclass, ML-DSA). ``crl_url``, if
    given, is put in every certificate's CRL distribution point; otherwise the
    tenant policy's :meth:`~.policy.TenantPolicy.crl_url_for` the certificate's
    region is used (none if the tenant has no ``crl_url``).
    """

    def __init__(
        self,
        *,
        ca_certificate: x509.Certificate,
        ca_key: object,
        tenant_policy: TenantPolicy,
        crl_url: str | None = None,
    ) -> None:
        try:
            constraints = ca_certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
            usage = ca_certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound as exc:
            raise ValueError(f"the CA certificate lacks {exc.oid._name}") from None
        if not constraints.ca or not usage.key_cert_sign:
            raise ValueError("the CA certificate is not a CA (basicConstraints CA:TRUE and keyCertSign needed)")
        if not _same_key(ca_key.public_key(), ca_certificate.public_key()):  # type: ignore[attr-defined]
            raise ValueError("ca_key does not belong to ca_certificate")
        self._ca_certificate = ca_certificate
        self._ca_key = ca_key
        self._hash = signature_hash(ca_key)
        self._policy = tenant_policy
        self._crl_url = crl_url
        try:
            ski = ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_certificate.public_key())  # type: ignore[arg-type]

    @property
    def ca_certificate(self) -> x509.Certificate:
        """The issuing CA's certificate."""
        return self._ca_certificate

    @property
    def tenant_policy(self) -> TenantPolicy:
        """The policy this issuer enforces."""
        return self._policy

    def check_request(self, *, profile: Profile, public_key: object) -> None:
        """Refuse (``PolicyRefusal``) what :meth:`issue` would refuse, without signing anything."""
        profile_policy = self._policy.profile(profile)
        self._policy.key_policy.check(public_key)
        profile_policy.key_usage(profile, public_key)

    def issue(
        self,
        *,
        device_id: str,
        profile: Profile,
        public_key: object,
        serial: int,
        not_before: datetime,
        status_position: tuple[int, int] | None,
        region: str | None,
        capabilities: tuple[str, ...] | None,
    ) -> x509.Certificate:
        """Sign a certificate for ``device_id`` over ``public_key``.

        ``region`` None means the tenant's default region (no region extension
        if there is none); ``capabilities`` None means the profile's default
        capabilities; an empty result leaves the capabilities extension out.

        Raises ``PolicyRefusal`` (``UNKNOWN_PROFILE``, ``KEY_REJECTED``) for
        what the tenant's policy refuses, ``ValueError`` /
        ``protocol.errors.InvalidIdentifier`` for caller mistakes (bad serial,
        naive datetime, an identifier unusable in a topic, an expired CA).
        """
        profile_policy = self._policy.profile(profile)
        self._policy.key_policy.check(public_key)
        key_usage = profile_policy.key_usage(profile, public_key)
        validate_identifier(device_id, what="device id")
        if len(device_id) > 64:  # ub-common-name (RFC 5280 appendix A)
            raise ValueError(f"device id of {len(device_id)} characters is longer than a commonName may be (64)")
        if isinstance(serial, bool) or not isinstance(serial, int) or not 0 < serial < 2**159:
            raise ValueError("serial must be a positive int of at most 159 bits (see random_serial)")

        start = _as_utc(not_before, "not_before")
        ca_end = self._ca_certificate.not_valid_after_utc
        end = min(start + profile_policy.lifetime, ca_end)
        if end <= start:
            raise ValueError(f"the issuing CA expires at {ca_end.isoformat()}, not after not_before")

        if region is None:
            region = self._policy.default_region
        if capabilities is None:
            capabilities = profile_policy.capabilities
        crl_url = self._crl_url if self._crl_url is not None else self._policy.crl_url_for(region)

        tenant = self._policy.name
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, tenant),
                x509.NameAttribute(NameOID.COMMON_NAME, device_id),
            ]
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._ca_certificate.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)  # type: ignore[arg-type]
            .add_extension(self._aki, critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(device_urn(tenant, device_id))]),
                critical=False,
            )
        )
        ekus = profile_policy.extended_key_usages(profile)
        if ekus:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
        if crl_url is not None:
            point = x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(crl_url)], relative_name=None, reasons=None, crl_issuer=None
            )
            builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
        if status_position is not None:
            list_id, index = status_position
            if index >= self._policy.status_list_capacity:
                raise ValueError(
                    f"status index {index} is outside the list capacity {self._policy.status_list_capacity}"
                )
            builder = builder.add_extension(
                _custom(extensions.STATUS_POSITION_OID, extensions.encode_status_position(list_id, index)),
                critical=False,
            )
        if capabilities:
            builder = builder.add_extension(
                _custom(extensions.CAPABILITIES_OID, extensions.encode_capabilities(tuple(capabilities))),
                critical=False,
            )
        if region is not None:
            validate_identifier(region, what="region")
            builder = builder.add_extension(
                _custom(extensions.REGION_OID, extensions.encode_region(region)), critical=False
            )
        return builder.sign(self._ca_key, self._hash)  # type: ignore[arg-type]


def _custom(oid: str, der: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), der)
