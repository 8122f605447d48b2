"""Test doubles for device_client: a real CA (broker_plugin's issuer) answering on a MemoryBroker, and a virtual clock.

The fake CA speaks the wire protocol with real certificates: it decodes requests,
issues with ``broker_plugin.ca.issuer.Issuer`` and remembers each request id's reply
(the same id never yields two certificates, as docs/wire-format.md requires).
Failure modes are counters: ``busy`` (Error BUSY with retry_after), ``silent`` (no
reply), ``refuse_serials`` (the broker refuses those certificates at connect).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker_plugin.ca.authority import TenantCA, create_tenant_ca
from broker_plugin.ca.issuer import Issuer, random_serial
from broker_plugin.ca.policy import ProfilePolicy, TenantPolicy
from device_client.certstore import CertStore
from device_client.client import BootstrapCredentials, DeviceClient
from device_client.keystore import FileKeyStore
from device_client.transport import ClientCredentials, ConnectionRefused, MemoryBroker, MemoryTransport
from protocol import codec, topics
from protocol.codes import ErrorCode, Profile
from protocol.messages import CertificateIssued, CertificateRequest, Error, RenewalRequest
from protocol.renewal import RenewalWindow

TENANT = "acme"
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


class VirtualClock:
    """``now()`` and an async ``sleep`` that advances virtual time instead of waiting."""

    def __init__(self, start: datetime = T0) -> None:
        self.time = start
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        return self.time

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.time += timedelta(seconds=max(seconds, 0))
        await asyncio.sleep(0)

    def advance(self, delta: timedelta) -> None:
        self.time += delta


@dataclass
class FakeCA:
    ca: TenantCA
    issuer: Issuer
    clock: VirtualClock
    bootstrap_ca: TenantCA
    bootstrap_issuer: Issuer
    suggest: RenewalWindow | None = None
    busy: int = 0
    busy_retry_after: int = 40
    silent: int = 0
    refuse_serials: set[int] = field(default_factory=set)
    revoked_bootstrap: set[int] = field(default_factory=set)
    replies: dict[bytes, bytes] = field(default_factory=dict)
    issued: list[x509.Certificate] = field(default_factory=list)
    requests: list[object] = field(default_factory=list)
    next_index: int = 0

    @property
    def trust(self) -> list[x509.Certificate]:
        return [self.ca.issuing, self.ca.root]

    def issue(self, device_id: str, profile: Profile, public_key: object, *, not_before: datetime | None = None) -> x509.Certificate:
        self.next_index += 1
        cert = self.issuer.issue(
            device_id=device_id, profile=profile, public_key=public_key, serial=random_serial(os.urandom),
            not_before=(not_before or self.clock.now()).replace(microsecond=0),
            status_position=(1, self.next_index), region=None, capabilities=None,
        )
        self.issued.append(cert)
        return cert

    def bootstrap_cert(self, name: str, *, not_before: datetime, key: object) -> x509.Certificate:
        return self.bootstrap_issuer.issue(
            device_id=name, profile=Profile.IDENTITY, public_key=key.public_key(), serial=random_serial(os.urandom),  # type: ignore[attr-defined]
            not_before=not_before, status_position=None, region=None, capabilities=None,
        )

    # -- broker side ------------------------------------------------------------------

    def authenticate(self, creds: ClientCredentials) -> None:
        leaf = creds.leaf()
        if leaf is None:
            raise ConnectionRefused("no client certificate")
        now = self.clock.now()
        for anchor in (self.ca.issuing, self.bootstrap_ca.issuing):
            if leaf.issuer == anchor.subject:
                leaf.verify_directly_issued_by(anchor)
                break
        else:
            raise ConnectionRefused("certificate from an unknown CA")
        if leaf.serial_number in self.refuse_serials or leaf.serial_number in self.revoked_bootstrap:
            raise ConnectionRefused("certificate revoked")
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc + timedelta(days=30):
            raise ConnectionRefused("certificate expired")

    def handle(self, broker: MemoryBroker, creds: ClientCredentials, topic: str, payload: bytes) -> None:
        parsed = topics.parse_topic(topic)
        if not parsed.kind.is_request:
            broker.deliver(topic, payload)
            return
        response = topics.response_topic_for(parsed)
        message = codec.decode(payload)
        self.requests.append(message)
        assert isinstance(message, (CertificateRequest, RenewalRequest))
        if message.request_id in self.replies:
            broker.deliver(response, self.replies[message.request_id])
            return
        if self.silent > 0:
            self.silent -= 1
            return
        if self.busy > 0:
            self.busy -= 1
            broker.deliver(response, codec.encode(Error(code=ErrorCode.BUSY, text="queue full",
                                                        request_id=message.request_id, retry_after=self.busy_retry_after)))
            return
        device_id = parsed.device_id
        assert device_id is not None
        if isinstance(message, RenewalRequest) and message.reuse_key:
            public_key = creds.leaf().public_key()  # type: ignore[union-attr]
        else:
            assert message.csr is not None
            public_key = x509.load_der_x509_csr(message.csr).public_key()
        cert = self.issue(device_id, message.profile, public_key)
        reply = codec.encode(CertificateIssued(
            request_id=message.request_id, certificate=cert.public_bytes(serialization.Encoding.DER),
            chain=(self.ca.issuing.public_bytes(serialization.Encoding.DER),), renewal_window=self.suggest,
        ))
        self.replies[message.request_id] = reply
        broker.deliver(response, reply)

    def broker(self) -> MemoryBroker:
        return MemoryBroker(authenticate=self.authenticate, handler=self.handle)


def make_ca(clock: VirtualClock, *, lifetime: timedelta = timedelta(days=90), recovery: timedelta = timedelta(0)) -> FakeCA:
    start = clock.now() - timedelta(days=1)
    ca = create_tenant_ca(tenant=TENANT, root_key=ec.generate_private_key(ec.SECP256R1()),
                          issuing_key=(issuing_key := ec.generate_private_key(ec.SECP256R1())), now=start)
    profiles = {p: ProfilePolicy(lifetime=lifetime, expired_recovery=recovery, allow_key_reuse=True) for p in Profile}
    issuer = Issuer(ca_certificate=ca.issuing, ca_key=issuing_key, tenant_policy=TenantPolicy(name=TENANT, profiles=profiles))
    boot = create_tenant_ca(tenant="factory", root_key=ec.generate_private_key(ec.SECP256R1()),
                            issuing_key=(boot_key := ec.generate_private_key(ec.SECP256R1())), now=start - timedelta(days=300))
    boot_issuer = Issuer(ca_certificate=boot.issuing, ca_key=boot_key,
                         tenant_policy=TenantPolicy(name="factory", profiles={Profile.IDENTITY: ProfilePolicy(lifetime=timedelta(days=365))}))
    return FakeCA(ca=ca, issuer=issuer, clock=clock, bootstrap_ca=boot, bootstrap_issuer=boot_issuer)


def write_bootstrap(fake: FakeCA, directory: Path, *, not_before: datetime) -> tuple[Path, Path, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = fake.bootstrap_cert("claim-batch-7", not_before=not_before, key=key)
    cert_path, key_path = directory / "bootstrap.crt", directory / "bootstrap.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path, cert


def make_client(fake: FakeCA, broker: MemoryBroker, clock: VirtualClock, directory: Path, **kwargs: object) -> DeviceClient:
    keystore = FileKeyStore(directory=directory / "keys")
    store = CertStore(directory=directory, keystore=keystore, trust=fake.trust, device_id="sensor-0042")
    if "bootstrap" not in kwargs and (directory / "bootstrap.crt").exists():
        kwargs["bootstrap"] = BootstrapCredentials(cert_path=directory / "bootstrap.crt", key_path=directory / "bootstrap.key")
    return DeviceClient(device_id="sensor-0042", tenant="acme", transport=MemoryTransport(broker=broker),
                        store=store, keystore=keystore, ca_bundle=fake.trust, clock=clock.now, sleep=clock.sleep,
                        reply_timeout=0.05, **kwargs)  # type: ignore[arg-type]
