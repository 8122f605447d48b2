"""Shared set-up for the CA service tests (tests/ca/test_service*.py): real tenant CAs, a service
over the parametrised ``registry`` fixture (SQLite and PostgreSQL), and request/reply helpers."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker_plugin.ca.authority import create_tenant_ca
from broker_plugin.ca.claims import ClaimPolicy
from broker_plugin.ca.policy import TenantPolicy
from broker_plugin.ca.service import CAService, Identity, Outcome
from broker_plugin.ca.signing import InlineSigner, TenantAuthority
from broker_plugin.store.base import CertificateKind, Registry
from protocol.codec import decode, encode
from protocol.codes import Profile
from protocol.messages import CertificateRequest, Message, ProvisioningParameters
from protocol.topics import device_request_topic, operator_request_topic, provisioning_request_topic

# Close to the real time: openssl checks certificates and CRLs against its own clock.
START = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=5)
CRL_BASE = "http://crl.example/certmq"
DAY = dt.timedelta(days=1)


class Clock:
    """A settable clock for the service: no sleeping in tests."""

    def __init__(self, now: dt.datetime = START) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, delta: dt.timedelta) -> None:
        self.now += delta


def tenant_policy(name: str, **overrides: Any) -> TenantPolicy:
    data: dict[str, Any] = {
        "name": name,
        "default_region": "eu",
        "crl_url": CRL_BASE,
        "status_list_capacity": 64,
        "profiles": {
            "identity": {"lifetime": "30d", "expired_recovery": "7d"},
            "encryption": {"lifetime": "30d", "allow_key_reuse": True, "max_key_age": "50d"},
            "ota-signing": {"lifetime": "30d"},
        },
    }
    data.update(overrides)
    return TenantPolicy.model_validate(data)


def make_authority(name: str, **policy: Any) -> TenantAuthority:
    root_key = ec.generate_private_key(ec.SECP256R1())
    issuing_key = ec.generate_private_key(ec.SECP256R1())
    ca = create_tenant_ca(tenant=name, root_key=root_key, issuing_key=issuing_key, now=START - DAY)
    return TenantAuthority(name=name, policy=tenant_policy(name, **policy), root=ca.root, issuing=ca.issuing,
                           key=issuing_key)


def make_csr(common_name: str | None = None, key: Any = None) -> tuple[Any, bytes]:
    key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
    names = [] if common_name is None else [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    algorithm = hashes.SHA256() if isinstance(key, ec.EllipticCurvePrivateKey) else None
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names)).sign(key, algorithm)
    return key, csr.public_bytes(serialization.Encoding.DER)


def rid() -> bytes:
    return os.urandom(16)


def replies(outcome: Outcome) -> list[tuple[str, Message]]:
    return [(o.topic, decode(o.payload)) for o in outcome.replies]


def only_reply(outcome: Outcome) -> tuple[str, Message]:
    got = replies(outcome)
    assert len(got) == 1, got
    return got[0]


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("openssl")
    assert exe, "the openssl CLI is required for these tests (apt-get install openssl)"
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, check=False)


def pem(obj: Any) -> bytes:
    return obj.public_bytes(serialization.Encoding.PEM)  # type: ignore[no-any-return]


class Kit:
    """Two tenants (``acme``, ``globex``) served by one :class:`CAService` over ``registry``."""

    def __init__(self, registry: Registry, authorities: dict[str, TenantAuthority] | None = None,
                 clock: Clock | None = None) -> None:
        self.registry = registry
        self.authorities = authorities or {"acme": make_authority("acme"), "globex": make_authority("globex")}
        self.clock = clock or Clock()
        self.signer = InlineSigner(self.authorities)
        self.service = CAService(registry=registry, authorities=self.authorities, signer=self.signer,
                                 clock=self.clock)

    def reopened(self, registry: Registry) -> Kit:
        return Kit(registry, self.authorities, self.clock)

    async def mint(self, tenant: str, name: str, kind: CertificateKind = CertificateKind.OPERATIONAL,
                   profile: Profile = Profile.IDENTITY, region: str | None = None) -> tuple[Identity, Any, x509.Certificate]:
        """Issue a certificate directly (as the factory / an operator would) and identify with it."""
        key, csr = make_csr(name)
        record = await self.service.issue_direct(tenant=tenant, device_id=name, profile=profile, csr_der=csr,
                                                 kind=kind, region=region, actor="test-operator")
        cert = x509.load_der_x509_certificate(record.der)
        return await self.service.identify(cert), key, cert

    async def claim_credential(self, tenant: str, claim_id: str, **policy: Any) -> Identity:
        policy.setdefault("max_uses", 5)
        policy.setdefault("not_after", self.clock.now + 30 * DAY)
        if "device_ids" not in policy:
            policy.setdefault("pattern", "sensor-*")
        await self.service.register_claim(tenant=tenant, claim_id=claim_id, policy=ClaimPolicy(**policy),
                                          actor="test-operator")
        identity, _, _ = await self.mint(tenant, claim_id, CertificateKind.BOOTSTRAP)
        return identity

    async def provision(self, claim: Identity, device_id: str, *, request_id: bytes | None = None,
                        csr: bytes | None = None, region: str | None = None,
                        profile: Profile = Profile.IDENTITY) -> Outcome:
        csr = csr if csr is not None else make_csr(device_id)[1]
        message = CertificateRequest(
            request_id=request_id or rid(), profile=profile, csr=csr,
            provisioning=ProvisioningParameters(device_id=device_id, region=region),
        )
        return await self.service.handle(claim, provisioning_request_topic(claim.tenant, device_id), encode(message))

    async def dev(self, identity: Identity, message: Message, *, device_id: str | None = None,
                  tenant: str | None = None) -> Outcome:
        topic = device_request_topic(tenant or identity.tenant, device_id or identity.name)
        return await self.service.handle(identity, topic, encode(message))

    async def ops(self, identity: Identity, message: Message) -> Outcome:
        return await self.service.handle(identity, operator_request_topic(identity.tenant, identity.name),
                                         encode(message))

    async def refusals(self) -> list[dict[str, Any]]:
        return [dict(e.details) | {"actor": e.actor, "tenant": e.tenant}
                async for e in self.registry.audit_entries() if e.kind == "refuse"]

    async def audit_ok(self) -> None:
        result = await self.registry.verify_audit()
        assert result.ok, result


def write_chain(directory: Path, authority: TenantAuthority) -> tuple[Path, Path, Path]:
    """root.pem, issuing.pem, chain.pem (issuing then root) of ``authority``."""
    root, issuing, chain = directory / "root.pem", directory / "issuing.pem", directory / "chain.pem"
    root.write_bytes(pem(authority.root))
    issuing.write_bytes(pem(authority.issuing))
    chain.write_bytes(pem(authority.issuing) + pem(authority.root))
    return root, issuing, chain


def write_all(directory: Path, name: str, objects: Iterable[Any]) -> Path:
    path = directory / name
    path.write_bytes(b"".join(pem(o) for o in objects))
    return path
