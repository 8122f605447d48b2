"""Shared set-up for the fleet-health tests: a real tenant CA (P-256), certificates it really
signs (any key, any validity, including ones the policy would refuse today), stored with the
registry API, and a fixed clock."""

from __future__ import annotations

import datetime as dt
import dataclasses
import itertools
import random
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from broker_plugin.ca.authority import create_tenant_ca
from broker_plugin.ca.policy import TenantPolicy
from broker_plugin.ca.signing import spki_sha256
from broker_plugin.store.audit import AuditEvent
from broker_plugin.store.base import CertificateKind, CertificateRecord, IssuanceItem, RevocationOutcome

NOW = dt.datetime(2026, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
_serials = itertools.count(1000)


def policy(name: str = "acme", **overrides: Any) -> TenantPolicy:
    data: dict[str, Any] = {
        "name": name,
        "profiles": {"identity": {"lifetime": "30d", "renewal_window": [0.6, 0.8]}},
        "key_policy": {"allowed": ["p256", "rsa"]},
    }
    data.update(overrides)
    return TenantPolicy.model_validate(data)


@dataclass
class TestCA:
    """A tenant's root and issuing CA, with the issuing key to sign device certificates."""

    tenant: str
    root: x509.Certificate
    issuing: x509.Certificate
    key: Any

    def cas(self) -> dict[str, x509.Certificate]:
        return {"issuing": self.issuing, "root": self.root}


def make_ca(tenant: str = "acme", *, start: dt.datetime = NOW - 300 * DAY,
            issuing_days: int = 3 * 365) -> TestCA:
    root_key = ec.generate_private_key(ec.SECP256R1())
    issuing_key = ec.generate_private_key(ec.SECP256R1())
    ca = create_tenant_ca(tenant=tenant, root_key=root_key, issuing_key=issuing_key, now=start,
                          issuing_lifetime=dt.timedelta(days=issuing_days))
    return TestCA(tenant, ca.root, ca.issuing, issuing_key)


_P256 = ec.generate_private_key(ec.SECP256R1())


def certificate(ca: TestCA, device_id: str, *, not_before: dt.datetime, days: float = 30,
                key: Any = None, kind: CertificateKind = CertificateKind.OPERATIONAL,
                profile: str = "identity", serial: int | None = None) -> CertificateRecord:
    """A certificate really signed by ``ca``'s issuing key, as the registry record of it."""
    public = (key or _P256).public_key()
    serial = serial or next(_serials)
    not_after = not_before + dt.timedelta(days=days)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(ca.issuing.subject).public_key(public).serial_number(serial)
            .not_valid_before(not_before).not_valid_after(not_after)
            .sign(ca.key, hashes.SHA256()))
    return CertificateRecord(
        tenant=ca.tenant, serial=serial, device_id=device_id, profile=profile, region="eu",
        not_before=not_before, not_after=not_after, der=cert.public_bytes(serialization.Encoding.DER),
        spki_sha256=spki_sha256(public), issued_at=not_before, kind=kind,
    )


def rsa_key(bits: int) -> Any:
    # 1024-bit RSA is refused by every policy today: exactly the "issued before a policy change" case.
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def secp256k1_key() -> Any:
    return ec.generate_private_key(ec.SECP256K1())


async def store(registry: Any, *records: CertificateRecord) -> None:
    for record in records:
        await registry.commit_issuance(record, request=None, audit=AuditEvent(
            kind="issue", actor="health-tests", subject=record.device_id, time=record.issued_at,
            tenant=record.tenant))


async def revoke(registry: Any, record: CertificateRecord, at: dt.datetime) -> RevocationOutcome:
    return await registry.revoke_selected(record.tenant, serial=record.serial, reason=1, at=at, audit=AuditEvent(
        kind="revoke", actor="health-tests", subject=record.device_id, time=at, tenant=record.tenant))


async def insert_fleet(registry: Any, ca: TestCA, count: int, *, actor: str = "tests") -> list[CertificateRecord]:
    """``count`` certificates of tenant ``acme``, devices ``dev-000000`` ..., each with a key of its
    own (a random SPKI hash), issued at random over 35 days with a 30-day lifetime; committed in
    batches of 5,000 straight into the registry. Returns the records (same seed: same fleet)."""
    rng = random.Random(7)
    template = certificate(ca, "template", not_before=NOW - 10 * DAY)
    records = []
    for start in range(0, count, 5000):
        items = []
        for i in range(start, min(count, start + 5000)):
            issued = NOW - dt.timedelta(seconds=rng.randrange(35 * 86400))
            record = dataclasses.replace(
                template, serial=(1 << 100) + i, device_id=f"dev-{i:06d}", not_before=issued,
                not_after=issued + 30 * DAY, issued_at=issued, spki_sha256=rng.randbytes(32))
            records.append(record)
            items.append(IssuanceItem(record=record, request=None, audit=AuditEvent(
                kind="issue", actor=actor, subject=record.device_id, time=issued, tenant="acme")))
        failed = [r for r in await registry.commit_issuances(items) if isinstance(r, Exception)]
        if failed:
            raise RuntimeError(f"{len(failed)} certificates not committed: {failed[0]!r}")
    return records
