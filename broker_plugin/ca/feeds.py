"""CRLs and status-list snapshots made from the registry's revocation state.

The CA service calls these for :meth:`~.service.CAService.crl` and
:meth:`~.service.CAService.snapshot`. A shard is a tenant's region (its CRL carries an
issuingDistributionPoint naming the region's CRL URL) or the whole tenant. Full and delta CRLs of
a shard share one increasing CRL number sequence; each full CRL is recorded as the base later
delta CRLs refer to. Times and the signing key come from the caller; nothing here reads a clock.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509

from protocol import statuslist
from protocol.codes import RevocationReason
from protocol.messages import RevocationSnapshot

from ..store.base import Registry
from .crl import build_crl
from .identity import UnknownStatusList
from .signing import TenantAuthority

__all__ = ["TENANT_SHARD", "registry_crl", "registry_snapshot"]

#: Shard name (in ``crl_numbers`` / ``crl_bases``) of a tenant's whole-tenant CRL; never a region.
TENANT_SHARD = "*"


async def registry_crl(
    registry: Registry, authority: TenantAuthority, *, region: str | None, delta: bool, now: dt.datetime,
    lifetime: dt.timedelta,
) -> x509.CertificateRevocationList:
    """Sign the next full or delta CRL of ``authority``'s tenant (or its ``region`` shard).

    A delta lists what was revoked from the second of the base's thisUpdate on (inclusive, so an
    entry revoked in that second may be in both, never in neither) and names the base's number; a
    full CRL points at ``<crl url>.delta`` (freshestCRL) when the tenant has a ``crl_url``.
    ``ValueError`` for a shard without ``crl_url`` or a delta before any full CRL.
    """
    tenant = authority.name
    shard = TENANT_SHARD if region is None else region
    url = authority.policy.crl_url_for(region)
    if region is not None and url is None:
        raise ValueError(f"tenant {tenant!r} has no crl_url: region shard CRLs need one")
    base = await registry.last_crl_base(tenant, shard) if delta else None
    if delta and base is None:
        raise ValueError(f"no full CRL of {tenant}/{shard} yet: a delta CRL needs a base")
    revoked = await registry.revoked_for_crl(tenant, region=region, since=None if base is None else base.this_update)
    number = await registry.next_crl_number(tenant, shard)
    crl = build_crl(
        issuer_cert=authority.issuing, issuer_key=authority.key,
        revoked=[(e.serial, e.revoked_at, RevocationReason(e.reason)) for e in revoked],
        crl_number=number, this_update=now, next_update=now + lifetime,
        delta_of=None if base is None else base.crl_number,
        shard=region, crl_url=url if region is not None else None,
        delta_url=f"{url}.delta" if url is not None and not delta else None,
    )
    if not delta:
        await registry.record_crl_base(tenant, shard, number, now)
    return crl


async def registry_snapshot(
    registry: Registry, *, tenant: str, region: str, list_id: int, now: dt.datetime
) -> RevocationSnapshot:
    """The status list ``list_id`` of ``tenant``'s ``region`` feed as a wire snapshot taken at ``now``.

    Raises :class:`~.identity.UnknownStatusList` when there is no such list.
    """
    found = await registry.status_list(tenant, region, list_id)
    if found is None:
        raise UnknownStatusList(f"tenant {tenant!r} has no status list {list_id} in region {region!r}")
    return RevocationSnapshot(
        list_id=list_id, sequence=found.sequence, size=found.size,
        bits=statuslist.compress(found.bits, found.size), time=now,
    )
