"""X.509 CRLs (RFC 5280 section 5) for a tenant's issuing CA: full, delta and sharded.

Every CRL carries the CA's AKI and a cRLNumber. A delta CRL adds the critical
deltaCRLIndicator naming the base CRL's number. Entries carry a reasonCode
unless the reason is ``unspecified`` (RFC 5280 5.3.1: SHOULD be absent then).

Shards: a CRL that covers one tenant's region (``shard``) carries a critical
issuingDistributionPoint with ``onlyContainsUserCerts`` and, as its name,
the ``crl_url`` the region's certificates carry in their CRL distribution
point. OpenSSL accepts such a CRL for a certificate only when the two URLs
match (and never for a certificate without that distribution point), which
is why a shard needs ``crl_url``.

OpenSSL uses a delta CRL only when the certificate or the base CRL has a
freshestCRL extension (``delta_url`` on the base CRL); a delta and its base
must carry the same AKI and issuingDistributionPoint.

This module does not know where revocations are stored or how CRLs are
published; the caller passes the list and the numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone

from cryptography import x509

from protocol.codes import RevocationReason

from .signers import signature_hash

__all__ = ["MAX_CRL_NUMBER", "build_crl", "reason_flag"]

#: cRLNumber is at most 20 octets (RFC 5280 5.2.3): keep it below 2**159.
MAX_CRL_NUMBER = 2**159 - 1

_REASONS: dict[RevocationReason, x509.ReasonFlags] = {
    RevocationReason.UNSPECIFIED: x509.ReasonFlags.unspecified,
    RevocationReason.KEY_COMPROMISE: x509.ReasonFlags.key_compromise,
    RevocationReason.CA_COMPROMISE: x509.ReasonFlags.ca_compromise,
    RevocationReason.AFFILIATION_CHANGED: x509.ReasonFlags.affiliation_changed,
    RevocationReason.SUPERSEDED: x509.ReasonFlags.superseded,
    RevocationReason.CESSATION_OF_OPERATION: x509.ReasonFlags.cessation_of_operation,
    RevocationReason.CERTIFICATE_HOLD: x509.ReasonFlags.certificate_hold,
    RevocationReason.REMOVE_FROM_CRL: x509.ReasonFlags.remove_from_crl,
    RevocationReason.PRIVILEGE_WITHDRAWN: x509.ReasonFlags.privilege_withdrawn,
    RevocationReason.AA_COMPROMISE: x509.ReasonFlags.aa_compromise,
}


def reason_flag(reason: RevocationReason) -> x509.ReasonFlags:
    """cryptography's ``ReasonFlags`` for a wire :class:`RevocationReason`."""
    return _REASONS[RevocationReason(reason)]


def _utc(when: datetime, what: str) -> datetime:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{what} must be an aware datetime (UTC)")
    return when.astimezone(timezone.utc)


def _uri_point(url: str) -> x509.DistributionPoint:
    return x509.DistributionPoint(
        full_name=[x509.UniformResourceIdentifier(url)], relative_name=None, reasons=None, crl_issuer=None
    )


def build_crl(
    *,
    issuer_cert: x509.Certificate,
    issuer_key: object,
    revoked: Iterable[tuple[int, datetime, RevocationReason]],
    crl_number: int,
    this_update: datetime,
    next_update: datetime,
    delta_of: int | None = None,
    shard: str | None = None,
    crl_url: str | None = None,
    delta_url: str | None = None,
) -> x509.CertificateRevocationList:
    """Sign a CRL listing ``revoked`` as ``(serial, revoked_at, reason)``.

    ``delta_of``: make a delta CRL against the base CRL with that number
    (must be below ``crl_number``). ``shard``: the CRL covers one region's
    end-entity certificates, published at ``crl_url`` (required then).
    ``delta_url``: where the delta CRLs for this base CRL are published
    (freshestCRL; not allowed on a delta).

    Raises ``ValueError`` for inconsistent input (duplicate serials, naive or
    misordered times, ``removeFromCRL`` outside a delta, numbers out of range),
    and signs nothing then.
    """
    if isinstance(crl_number, bool) or not 0 <= crl_number <= MAX_CRL_NUMBER:
        raise ValueError(f"crl_number must be in 0..2**159-1, got {crl_number!r}")
    if delta_of is not None and (isinstance(delta_of, bool) or not 0 <= delta_of < crl_number):
        raise ValueError(f"delta_of must be a base CRL number below crl_number {crl_number}, got {delta_of!r}")
    if delta_of is not None and delta_url is not None:
        raise ValueError("a delta CRL cannot point to further deltas (delta_url is for base CRLs)")
    if shard is not None and crl_url is None:
        raise ValueError("a shard CRL needs crl_url: it names the shard in the issuingDistributionPoint")
    start = _utc(this_update, "this_update")
    end = _utc(next_update, "next_update")
    if end <= start:
        raise ValueError("next_update must be after this_update")

    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer_cert.subject)
        .last_update(start)
        .next_update(end)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
    )
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key())  # type: ignore[arg-type]
    builder = builder.add_extension(aki, critical=False)
    if delta_of is not None:
        builder = builder.add_extension(x509.DeltaCRLIndicator(delta_of), critical=True)
    if shard is not None:
        assert crl_url is not None
        idp = x509.IssuingDistributionPoint(
            full_name=[x509.UniformResourceIdentifier(crl_url)],
            relative_name=None,
            only_contains_user_certs=True,
            only_contains_ca_certs=False,
            only_some_reasons=None,
            indirect_crl=False,
            only_contains_attribute_certs=False,
        )
        builder = builder.add_extension(idp, critical=True)
    if delta_url is not None:
        builder = builder.add_extension(x509.FreshestCRL([_uri_point(delta_url)]), critical=False)

    seen: set[int] = set()
    for serial, revoked_at, reason in revoked:
        if isinstance(serial, bool) or not isinstance(serial, int) or serial <= 0:
            raise ValueError(f"serial must be a positive int, got {serial!r}")
        if serial in seen:
            raise ValueError(f"serial {serial:#x} listed twice")
        seen.add(serial)
        reason = RevocationReason(reason)
        if reason is RevocationReason.REMOVE_FROM_CRL and delta_of is None:
            raise ValueError("removeFromCRL only appears in delta CRLs (RFC 5280 5.3.1)")
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(_utc(revoked_at, f"revoked_at of serial {serial:#x}"))
        )
        if reason is not RevocationReason.UNSPECIFIED:
            entry = entry.add_extension(x509.CRLReason(reason_flag(reason)), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(issuer_key, signature_hash(issuer_key))  # type: ignore[arg-type]
