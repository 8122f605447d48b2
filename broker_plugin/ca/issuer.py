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

For an EC issuing key, certificates are assembled from DER made once per issuer
(issuer name, constant extensions) plus the per-certificate fields, and the
TBSCertificate signed directly: byte for byte what ``CertificateBuilder``
writes (checked once per issuer; otherwise the builder is used), at well
under half its cost.

This module does not draw serials or status positions, talk to the registry,
or read the clock: the caller passes them in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable
from datetime import datetime, timezone
from urllib.parse import quote

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from protocol import extensions
from protocol.codes import ErrorCode, Profile
from protocol.topics import validate_identifier

from .policy import PolicyRefusal, ProfilePolicy, TenantPolicy
from .signers import signature_hash

__all__ = [
    "MAX_CSR_BYTES",
    "SERIAL_BITS",
    "Issuer",
    "SignedCertificate",
    "check_csr_identity",
    "device_urn",
    "load_csr",
    "random_serial",
    "plainly_names",
    "verified_public_key",
    "verify_csr",
]

#: Largest CSR accepted (an ML-DSA-87 CSR is about 7.5 KiB).
MAX_CSR_BYTES = 16 * 1024
#: Serials are exactly this many bits: positive, 20 octets of DER, 158 random bits.
SERIAL_BITS = 159


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
    verified_public_key(csr)


def verified_public_key(csr: x509.CertificateSigningRequest) -> object:
    """:func:`verify_csr`, returning the CSR's public key (loaded once, for the caller to certify)."""
    try:
        public_key: object = csr.public_key()
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise PolicyRefusal(ErrorCode.KEY_REJECTED, f"unsupported public key in CSR: {exc}") from None
    try:
        valid = csr.is_signature_valid
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise PolicyRefusal(ErrorCode.BAD_CSR, f"CSR signature cannot be checked: {exc}") from None
    if not valid:
        raise PolicyRefusal(ErrorCode.BAD_CSR, "CSR signature does not verify with its public key (no proof of possession)")
    return public_key


# PKCS#9 extensionRequest and Microsoft's variant, DER-encoded OIDs: the attributes cryptography
# reads a CSR's extensions from. A CSR whose signed part contains neither has no subjectAltName.
_EXTENSION_REQUEST_OIDS = (bytes.fromhex("06092a864886f70d01090e"), bytes.fromhex("060a2b06010401823702010e"))


def _cn_name_der(device_id: str, string_tag: int) -> bytes | None:
    value = device_id.encode("utf-8")
    if len(value) > 64:
        return None
    atv = b"\x06\x03\x55\x04\x03" + bytes((string_tag, len(value))) + value
    rdn = b"\x30" + bytes((len(atv),)) + atv
    name = b"\x31" + bytes((len(rdn),)) + rdn
    return b"\x30" + bytes((len(name),)) + name


def plainly_names(csr: x509.CertificateSigningRequest, device_id: str) -> bool:
    """True when the CSR's subject is exactly ``CN=<device_id>`` (UTF8String or PrintableString)
    or empty, and it carries no extension request: then :func:`check_csr_identity` has nothing
    to refuse. Looks at the signed bytes only, without building name objects; False means
    "ask :func:`check_csr_identity`", never "refuse"."""
    tbs = csr.tbs_certrequest_bytes
    if len(tbs) < 5 or tbs[0] != 0x30:
        return False
    first = tbs[1]
    offset = 2 if first < 0x80 else 2 + (first & 0x7F)
    if tbs[offset:offset + 3] != b"\x02\x01\x00":  # version 1
        return False
    offset += 3
    for marker in _EXTENSION_REQUEST_OIDS:
        if marker in tbs:
            return False
    if tbs[offset:offset + 2] == b"\x30\x00":
        return True
    for tag in (0x0C, 0x13):  # UTF8String, PrintableString
        expected = _cn_name_der(device_id, tag)
        if expected is not None and tbs.startswith(expected, offset):
            return True
    return False


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

# Unreserved URI characters only: quote() leaves such a device id unchanged, so its URN is the
# tenant's prefix plus the id.
_PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]{0,63}")
_NOT_BEFORE_FLOOR = datetime(1950, 1, 1)


def _as_utc(when: datetime, what: str) -> datetime:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{what} must be an aware datetime (UTC)")
    return when.astimezone(timezone.utc)


def _spki_der(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _same_key(a: object, b: object) -> bool:
    return _spki_der(a) == _spki_der(b)


def _spki_and_ski(public_key: object) -> tuple[bytes, x509.SubjectKeyIdentifier]:
    """The DER SubjectPublicKeyInfo and the RFC 5280 (method 1) key identifier, as
    ``SubjectKeyIdentifier.from_public_key`` computes it, from one serialisation."""
    spki = _spki_der(public_key)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        # An EC SPKI ends with BIT STRING(0 unused bits || uncompressed point): that point is
        # exactly what from_public_key hashes (it re-serialises the key as X9.62 uncompressed).
        size = 1 + 2 * ((public_key.curve.key_size + 7) // 8)
        if len(spki) > size + 1 and spki[-size] == 0x04 and spki[-size - 1] == 0x00:
            return spki, x509.SubjectKeyIdentifier(hashlib.sha1(spki[-size:]).digest())
    return spki, x509.SubjectKeyIdentifier.from_public_key(public_key)  # type: ignore[arg-type]


def _key_class(public_key: object) -> object | None:
    """What the key policy and keyUsage of a key depend on, when that is its type alone
    (EC: type and curve); None (never cached) for RSA, whose size and exponent matter."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return ("ec", public_key.curve.name)
    if isinstance(public_key, rsa.RSAPublicKey):
        return None
    return type(public_key)


def _ext(value: x509.ExtensionType, critical: bool) -> x509.Extension[x509.ExtensionType]:
    return x509.Extension(value.oid, critical, value)


# -- DER for the template path (see Issuer._issue_from_template) ------------------------


_tlv = extensions.der_tlv


def _oid_der(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return _tlv(0x06, bytes(body))


def _ext_der(ext: x509.Extension[x509.ExtensionType]) -> bytes:
    """An Extension as DER (what CertificateBuilder writes for it)."""
    critical = b"\x01\x01\xff" if ext.critical else b""
    return _tlv(0x30, _oid_der(ext.oid.dotted_string) + critical + _tlv(0x04, ext.value.public_bytes()))


def _time_der(when: datetime) -> bytes:
    # RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050; whole seconds.
    if when.year < 2050:
        return _tlv(0x17, when.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return _tlv(0x18, f"{when.year:04d}{when.strftime('%m%d%H%M%S')}Z".encode("ascii"))


def _der_item(der: bytes, pos: int) -> tuple[int, int]:
    """(start of the content, end) of the TLV at ``pos`` of trusted DER."""
    first = der[pos + 1]
    if first < 0x80:
        return pos + 2, pos + 2 + first
    size = first & 0x7F
    start = pos + 2 + size
    return start, start + int.from_bytes(der[pos + 2:start], "big")


_Extension = x509.Extension[x509.ExtensionType]
_CN_OID = b"\x06\x03\x55\x04\x03"
_SKI_HEAD = _oid_der(x509.OID_SUBJECT_KEY_IDENTIFIER.dotted_string) + b"\x04\x16\x04\x14"
_SKI_EXT_HEAD = b"\x30" + bytes((len(_SKI_HEAD) + 20,)) + _SKI_HEAD  # then the 20-byte key id
_SAN_OID = _oid_der(x509.OID_SUBJECT_ALTERNATIVE_NAME.dotted_string)
_STATUS_OID = _oid_der(extensions.STATUS_POSITION_OID)
_VERSION_3 = b"\xa0\x03\x02\x01\x02"


@dataclasses.dataclass(frozen=True)
class SignedCertificate:
    """A certificate as :meth:`Issuer.issue_der` returns it: DER, the subject's DER
    SubjectPublicKeyInfo, and the validity exactly as signed (aware UTC, whole seconds)."""

    der: bytes
    spki: bytes
    not_before: datetime
    not_after: datetime


class Issuer:
    """Builds and signs end-entity certificates for one tenant with one issuing CA.

    ``ca_key`` is any cryptography private key object matching
    ``ca_certificate`` (file, PKCS#11 subclass, ML-DSA). ``crl_url``, if
    given, is put in every certificate's CRL distribution point; otherwise the
    tenant policy's :meth:`~.policy.TenantPolicy.crl_url_for` the certificate's
    region is used (none if the tenant has no ``crl_url``).

    Everything that is the same for every certificate of the tenant (issuer name, AKI,
    basicConstraints, the keyUsage / EKU of a profile for a kind of key, CRL distribution
    points, region extensions) is built once and reused: the policy is immutable.
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
        self._issuer_name = ca_certificate.subject
        self._ca_end = ca_certificate.not_valid_after_utc
        self._organization = x509.NameAttribute(NameOID.ORGANIZATION_NAME, tenant_policy.name)
        self._urn_prefix = f"urn:certmq:{quote(tenant_policy.name, safe='')}:"
        self._basic = _ext(x509.BasicConstraints(ca=False, path_length=None), True)
        self._aki_ext = _ext(self._aki, False)
        # (profile, key class) -> (profile policy, keyUsage ext, EKU ext or None): only accepted keys.
        self._profiles: dict[tuple[Profile, object], tuple[ProfilePolicy, x509.Extension[x509.ExtensionType],
                                                            x509.Extension[x509.ExtensionType] | None]] = {}
        # region (None: no region) -> CRL DP extension (None: no CRL); region -> region extension
        self._crl_exts: dict[str | None, x509.Extension[x509.ExtensionType] | None] = {}
        self._region_exts: dict[str, x509.Extension[x509.ExtensionType]] = {}
        self._capabilities: dict[tuple[str, ...], x509.Extension[x509.ExtensionType]] = {}
        # The template path (see _issue): certificates assembled from DER made once per issuer
        # plus the per-certificate fields, then signed, instead of CertificateBuilder (which
        # re-encodes every name and extension object each time: ~45 us of a P-256 certificate's
        # ~110). Only for EC CA keys, and only if a probe built both ways has the same
        # TBSCertificate; otherwise every certificate goes through CertificateBuilder.
        self._ecdsa = ec.ECDSA(self._hash) if isinstance(ca_key, ec.EllipticCurvePrivateKey) and self._hash else None
        self._signature_algorithm = b""
        self._issuer_der = self._issuer_name.public_bytes()
        organization = x509.Name([self._organization]).public_bytes()
        self._organization_rdn = organization[_der_item(organization, 0)[0]:]
        self._basic_der = _ext_der(self._basic)
        self._aki_der = _ext_der(self._aki_ext)
        self._validity: dict[tuple[datetime, datetime], bytes] = {}
        self._ext_der_cache: dict[int, tuple[x509.Extension[x509.ExtensionType], bytes]] = {}
        self._template_ok = self._ecdsa is not None and self._template_matches_builder()

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
        self._profile_parts(profile, public_key)

    def _profile_parts(
        self, profile: Profile, public_key: object
    ) -> tuple[ProfilePolicy, x509.Extension[x509.ExtensionType], x509.Extension[x509.ExtensionType] | None]:
        key_class = _key_class(public_key)
        if key_class is not None:
            cached = self._profiles.get((profile, key_class))
            if cached is not None:
                return cached
        profile_policy = self._policy.profile(profile)
        self._policy.key_policy.check(public_key)
        key_usage = _ext(profile_policy.key_usage(profile, public_key), True)
        ekus = profile_policy.extended_key_usages(profile)
        eku = _ext(x509.ExtendedKeyUsage(list(ekus)), False) if ekus else None
        parts = (profile_policy, key_usage, eku)
        if key_class is not None:
            self._profiles[(profile, key_class)] = parts
        return parts

    def _crl_ext(self, region: str | None) -> x509.Extension[x509.ExtensionType] | None:
        if region in self._crl_exts:
            return self._crl_exts[region]
        crl_url = self._crl_url if self._crl_url is not None else self._policy.crl_url_for(region)
        ext = None
        if crl_url is not None:
            point = x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(crl_url)], relative_name=None, reasons=None, crl_issuer=None
            )
            ext = _ext(x509.CRLDistributionPoints([point]), False)
        if len(self._crl_exts) >= 4096:  # regions are few; a caller inventing them must not grow this forever
            self._crl_exts.clear()
        self._crl_exts[region] = ext
        return ext

    def _region_ext(self, region: str) -> x509.Extension[x509.ExtensionType]:
        ext = self._region_exts.get(region)
        if ext is None:
            validate_identifier(region, what="region")
            ext = _ext(_custom(extensions.REGION_OID, extensions.encode_region(region)), False)
            if len(self._region_exts) >= 4096:
                self._region_exts.clear()
            self._region_exts[region] = ext
        return ext

    def _capabilities_ext(self, capabilities: tuple[str, ...]) -> x509.Extension[x509.ExtensionType]:
        cached = self._capabilities.get(capabilities)
        if cached is None:
            cached = _ext(_custom(extensions.CAPABILITIES_OID, extensions.encode_capabilities(capabilities)), False)
            if len(self._capabilities) >= 1024:
                self._capabilities.clear()
            self._capabilities[capabilities] = cached
        return cached

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
        return self.issue_with_spki(
            device_id=device_id, profile=profile, public_key=public_key, serial=serial, not_before=not_before,
            status_position=status_position, region=region, capabilities=capabilities,
        )[0]

    def issue_with_spki(
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
    ) -> tuple[x509.Certificate, bytes]:
        """:meth:`issue`, also returning the DER SubjectPublicKeyInfo of ``public_key`` (serialised
        once for the SKI; the registry hashes it)."""
        cert, der, spki, _, _ = self._issue(
            device_id=device_id, profile=profile, public_key=public_key, serial=serial, not_before=not_before,
            status_position=status_position, region=region, capabilities=capabilities,
        )
        if cert is None:
            cert = x509.load_der_x509_certificate(der)
        return cert, spki

    def issue_der(
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
    ) -> SignedCertificate:
        """:meth:`issue`, as DER with the subject's SubjectPublicKeyInfo and the validity as signed:
        what a signing worker sends back, without a certificate object it would only serialise."""
        cert, der, spki, start, end = self._issue(
            device_id=device_id, profile=profile, public_key=public_key, serial=serial, not_before=not_before,
            status_position=status_position, region=region, capabilities=capabilities,
        )
        return SignedCertificate(der=der, spki=spki, not_before=start, not_after=end)

    def _issue(
        self, *, device_id: str, profile: Profile, public_key: object, serial: int, not_before: datetime,
        status_position: tuple[int, int] | None, region: str | None, capabilities: tuple[str, ...] | None,
    ) -> tuple[x509.Certificate | None, bytes, bytes, datetime, datetime]:
        """(certificate object if one was built, DER, SPKI DER, not_before, not_after as signed)."""
        profile_policy, key_usage, eku = self._profile_parts(profile, public_key)
        validate_identifier(device_id, what="device id")
        if len(device_id) > 64:  # ub-common-name (RFC 5280 appendix A)
            raise ValueError(f"device id of {len(device_id)} characters is longer than a commonName may be (64)")
        if isinstance(serial, bool) or not isinstance(serial, int) or not 0 < serial < 2**159:
            raise ValueError("serial must be a positive int of at most 159 bits (see random_serial)")

        start = _as_utc(not_before, "not_before")
        end = min(start + profile_policy.lifetime, self._ca_end)
        if end <= start:
            raise ValueError(f"the issuing CA expires at {self._ca_end.isoformat()}, not after not_before")
        naive_start = start.replace(tzinfo=None)
        if naive_start < _NOT_BEFORE_FLOOR:
            raise ValueError("The not valid before date must be on or after 1950 January 1.")

        if region is None:
            region = self._policy.default_region
        if capabilities is None:
            capabilities = profile_policy.capabilities
        crl_ext = self._crl_ext(region)

        spki, ski = _spki_and_ski(public_key)
        urn = (self._urn_prefix + device_id if _PLAIN_ID.fullmatch(device_id)
               else device_urn(self._policy.name, device_id))
        status_ext = None
        if status_position is not None:
            list_id, index = status_position
            if index >= self._policy.status_list_capacity:
                raise ValueError(
                    f"status index {index} is outside the list capacity {self._policy.status_list_capacity}"
                )
            status_ext = extensions.encode_status_position(list_id, index)
        capabilities_ext = self._capabilities_ext(tuple(capabilities)) if capabilities else None
        region_ext = self._region_ext(region) if region is not None else None
        # X.509 times are whole seconds: what the certificate says, whichever way it is built.
        signed_start, signed_end = start.replace(microsecond=0), end.replace(microsecond=0)

        if self._template_ok:
            tbs = self._tbs(device_id, serial, signed_start, signed_end, spki, key_usage, ski, urn, eku, crl_ext,
                            status_ext, capabilities_ext, region_ext)
            signature = self._ca_key.sign(tbs, self._ecdsa)  # type: ignore[attr-defined]
            der = _tlv(0x30, tbs + self._signature_algorithm + _tlv(0x03, b"\x00" + signature))
            return None, der, spki, signed_start, signed_end

        exts = [self._basic, key_usage, _ext(ski, False), self._aki_ext,
                _ext(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(urn)]), False)]
        if eku is not None:
            exts.append(eku)
        if crl_ext is not None:
            exts.append(crl_ext)
        if status_ext is not None:
            exts.append(_ext(_custom(extensions.STATUS_POSITION_OID, status_ext), False))
        if capabilities_ext is not None:
            exts.append(capabilities_ext)
        if region_ext is not None:
            exts.append(region_ext)
        # The builder's setters would re-check what is checked above (and add_extension scans for
        # duplicates on every call); the constructor takes the finished parts.
        builder = x509.CertificateBuilder(
            issuer_name=self._issuer_name,
            subject_name=x509.Name([self._organization, x509.NameAttribute(NameOID.COMMON_NAME, device_id)]),
            public_key=public_key,  # type: ignore[arg-type]
            serial_number=serial,
            not_valid_before=naive_start,
            not_valid_after=end.replace(tzinfo=None),
            extensions=exts,
        )
        cert = builder.sign(self._ca_key, self._hash)  # type: ignore[arg-type]
        return cert, cert.public_bytes(serialization.Encoding.DER), spki, signed_start, signed_end

    def _tbs(
        self, device_id: str, serial: int, start: datetime, end: datetime, spki: bytes, key_usage: _Extension,
        ski: x509.SubjectKeyIdentifier, urn: str, eku: _Extension | None, crl_ext: _Extension | None,
        status_ext: bytes | None, capabilities_ext: _Extension | None, region_ext: _Extension | None,
    ) -> bytes:
        """The TBSCertificate CertificateBuilder would write for these parts, from DER made once per
        issuer (names, constant extensions) and the few per-certificate fields."""
        validity = self._validity.get((start, end))
        if validity is None:
            if len(self._validity) >= 64:  # one entry per batch's not_before: keep only recent ones
                self._validity.clear()
            validity = self._validity[(start, end)] = _tlv(0x30, _time_der(start.replace(tzinfo=None))
                                                           + _time_der(end.replace(tzinfo=None)))
        der_of = self._ext_ders
        parts = [
            self._basic_der,
            der_of(key_usage),
            _SKI_EXT_HEAD + ski.digest,  # RFC 5280 method 1: always a 20-byte SHA-1 (_spki_and_ski)
            self._aki_der,
            _tlv(0x30, _SAN_OID + _tlv(0x04, _tlv(0x30, _tlv(0x86, urn.encode("ascii"))))),
        ]
        if eku is not None:
            parts.append(der_of(eku))
        if crl_ext is not None:
            parts.append(der_of(crl_ext))
        if status_ext is not None:
            parts.append(_tlv(0x30, _STATUS_OID + _tlv(0x04, status_ext)))
        if capabilities_ext is not None:
            parts.append(der_of(capabilities_ext))
        if region_ext is not None:
            parts.append(der_of(region_ext))
        return _tlv(0x30, b"".join((
            _VERSION_3,
            _tlv(0x02, serial.to_bytes(serial.bit_length() // 8 + 1, "big")),
            self._signature_algorithm,
            self._issuer_der,
            validity,
            _tlv(0x30, self._organization_rdn
                 + _tlv(0x31, _tlv(0x30, _CN_OID + _tlv(0x0C, device_id.encode("utf-8"))))),
            spki,
            _tlv(0xA3, _tlv(0x30, b"".join(parts))),
        )))

    def _ext_ders(self, ext: x509.Extension[x509.ExtensionType]) -> bytes:
        # Keyed by id: the entry holds the extension itself, so its id cannot be reused while
        # the entry exists (hashing an extension's value would cost more than encoding it).
        entry = self._ext_der_cache.get(id(ext))
        if entry is None:
            if len(self._ext_der_cache) >= 8192:
                self._ext_der_cache.clear()
            entry = self._ext_der_cache[id(ext)] = (ext, _ext_der(ext))
        return entry[1]

    def _template_matches_builder(self) -> bool:
        """Whether :meth:`_tbs` writes, byte for byte, the TBSCertificate CertificateBuilder writes,
        for a probe certificate with every optional part (checked once per issuer, so a
        cryptography that encodes anything differently turns the template path off, not wrong).
        The probe is signed with a throwaway key of the CA's kind (never the CA key: it may be a
        token); for EC the signature algorithm depends only on the hash, so it is the CA's too."""
        throwaway = ec.generate_private_key(ec.SECP256R1())
        spki, ski = _spki_and_ski(throwaway.public_key())
        start, end = datetime(2049, 12, 31, 23, 59, 59), datetime(2050, 1, 1, 0, 0, 1)  # UTCTime, GeneralizedTime
        key_usage = _ext(x509.KeyUsage(True, False, False, False, False, False, False, False, False), True)
        eku = _ext(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        crl = _ext(x509.CRLDistributionPoints([x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier("http://crl.invalid/probe.crl")],
            relative_name=None, reasons=None, crl_issuer=None)]), False)
        status = extensions.encode_status_position(3, 70000)
        capabilities = _ext(_custom(extensions.CAPABILITIES_OID, extensions.encode_capabilities(("a", "b"))), False)
        region = _ext(_custom(extensions.REGION_OID, extensions.encode_region("probe-region")), False)
        device_id, serial = "probe-\u00e9" + "x" * 56, (1 << 158) | 0x1234
        urn = device_urn(self._policy.name, device_id)
        cert = x509.CertificateBuilder(
            issuer_name=self._issuer_name,
            subject_name=x509.Name([self._organization, x509.NameAttribute(NameOID.COMMON_NAME, device_id)]),
            public_key=throwaway.public_key(), serial_number=serial, not_valid_before=start, not_valid_after=end,
            extensions=[self._basic, key_usage, _ext(ski, False), self._aki_ext,
                        _ext(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(urn)]), False), eku, crl,
                        _ext(_custom(extensions.STATUS_POSITION_OID, status), False), capabilities, region],
        ).sign(throwaway, self._hash)
        der = cert.public_bytes(serialization.Encoding.DER)
        tbs_end = _der_item(der, _der_item(der, 0)[0])[1]
        self._signature_algorithm = der[tbs_end:_der_item(der, tbs_end)[1]]
        tbs = self._tbs(device_id, serial, start.replace(tzinfo=timezone.utc), end.replace(tzinfo=timezone.utc), spki,
                        key_usage, ski, urn, eku, crl, status, capabilities, region)
        self._validity.clear()
        self._ext_der_cache.clear()
        return tbs == cert.tbs_certificate_bytes


def _custom(oid: str, der: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), der)
