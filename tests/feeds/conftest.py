"""Fixtures for the revocation-feed tests: a real data directory (tenants ``acme`` and ``globex``,
default region ``eu``, tiny status lists so roll-over happens), a test-side CA service minting
into it, a HardenedBroker with the certmq plugin, aiomqtt subscribers over real TLS, and
revocation caches checking signatures against the tenant CA certificate."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker_plugin.broker import HardenedBroker
from broker_plugin.ca import datadir as dd
from broker_plugin.ca.service import CAService
from broker_plugin.ca.signing import InlineSigner
from broker_plugin.plugin import CertmqPlugin
from broker_plugin.server import broker_config, ensure_server_certificate, tls_context
from broker_plugin.store.base import CertificateKind, CertificateRecord
from device_client.feedverify import SignedFeedVerifier
from device_client.revcache import RevocationCache
from protocol.codes import Profile

PASS_ENV = "CERTMQ_FEEDS_TEST_PASS"
PASSPHRASE = b"feeds test passphrase"
os.environ[PASS_ENV] = PASSPHRASE.decode()
CAPACITY = 8  #: status list size (the policy minimum): the ninth certificate of a region rolls over

POLICY = f"""
default_region = "eu"
crl_url = "http://crl.example/certmq"
status_list_capacity = {CAPACITY}

[profiles.identity]
lifetime = "30d"
allow_key_reuse = true
"""


def now() -> dt.datetime:
    """Wall-clock UTC (openssl and TLS check against the real clock)."""
    return dt.datetime.now(dt.UTC)


@dataclass
class Creds:
    """A client certificate in files."""

    tenant: str
    name: str
    serial: int
    region: str
    cert: Path
    key: Path
    chain: Path
    certificate: x509.Certificate


class Ca:
    """The test process's CA service over the broker's data directory (same SQLite registry)."""

    def __init__(self, datadir: Path, service: CAService, registry: Any) -> None:
        self.datadir = datadir
        self.service = service
        self.registry = registry
        self.folder = datadir.parent / "creds"
        self.folder.mkdir(exist_ok=True)

    def chain(self, tenant: str) -> Path:
        return dd.tenant_dir(self.datadir, tenant) / "chain.pem"

    async def mint(self, tenant: str, name: str, *, region: str | None = None) -> Creds:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
        record: CertificateRecord = await self.service.issue_direct(
            tenant=tenant, device_id=name, profile=Profile.IDENTITY, csr_der=csr,
            kind=CertificateKind.OPERATIONAL, region=region, actor="feeds-tests")
        cert = x509.load_der_x509_certificate(record.der)
        stem = f"{tenant}-{name}-{cert.serial_number:x}"
        cert_path, key_path = self.folder / f"{stem}.pem", self.folder / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return Creds(tenant, name, cert.serial_number, record.region, cert_path, key_path, self.chain(tenant), cert)


async def make_datadir(root: Path) -> Path:
    datadir = root / "data"
    policy = root / "policy.toml"
    policy.write_text(POLICY)
    for tenant in ("acme", "globex"):
        await dd.init_tenant(datadir, tenant, algorithm="p256", passphrase=PASSPHRASE, policy=policy,
                             now=now().replace(microsecond=0) - dt.timedelta(hours=1))
    return datadir


@pytest.fixture
async def datadir(tmp_path: Path) -> Path:
    return await make_datadir(tmp_path)


@pytest.fixture
async def ca(datadir: Path) -> AsyncIterator[Ca]:
    authorities = dd.load_authorities(datadir, passphrase=PASSPHRASE)
    registry = await dd.open_datadir_registry(datadir)
    service = CAService(registry=registry, authorities=authorities, signer=InlineSigner(authorities), clock=now)
    yield Ca(datadir, service, registry)
    await registry.close()


async def start_broker(datadir: Path, **plugin: Any) -> HardenedBroker:
    """A HardenedBroker on 127.0.0.1:<free port> with the certmq plugin (signed feeds on)."""
    certfile, keyfile = ensure_server_certificate(datadir, passphrase=PASSPHRASE)
    cfg = {"data_dir": str(datadir), "passphrase_env": PASS_ENV, "workers": 1, "revocation_poll": 0.1, **plugin}
    broker = HardenedBroker(broker_config(host="127.0.0.1", port=0, plugin=cfg),
                            ssl_context=tls_context(datadir, certfile=certfile, keyfile=keyfile))
    await broker.start()
    loaded = CertmqPlugin.of(broker)
    assert loaded.startup_error is None, loaded.startup_error
    assert loaded.feeds is not None
    loaded.feeds.snapshot_min_interval = 0.05  # tests want the refreshed snapshot soon
    loaded.feeds.snapshot_cost_factor = 0.0
    return broker


@pytest.fixture
async def make_broker(datadir: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[HardenedBroker] = []

    async def make(**plugin: Any) -> HardenedBroker:
        broker = await start_broker(datadir, **plugin)
        started.append(broker)
        return broker

    yield make
    for broker in started:
        with contextlib.suppress(Exception):
            await broker.shutdown()


def client(broker: HardenedBroker, creds: Creds) -> aiomqtt.Client:
    """An aiomqtt client over TLS for ``creds`` (client id = its name)."""
    context = ssl.create_default_context(cafile=str(creds.chain))
    context.load_cert_chain(str(creds.cert), str(creds.key))
    return aiomqtt.Client("127.0.0.1", broker.listen_port(), identifier=creds.name, tls_context=context,
                          keepalive=30, timeout=5)


def verifier(ca: Ca, tenant: str = "acme") -> SignedFeedVerifier:
    return SignedFeedVerifier.from_pem_file(ca.chain(tenant))


def cache(tmp: Path, ca: Ca, *, region: str = "eu", tenant: str = "acme", name: str = "rev.json",
          requested: list[int] | None = None) -> RevocationCache:
    return RevocationCache(tenant=tenant, region=region, path=tmp / name, verifier=verifier(ca, tenant),
                           request_snapshot=None if requested is None else requested.append)


class Feed:
    """A subscriber's feed messages: raw ``(topic, payload)`` pairs in arrival order."""

    def __init__(self, c: aiomqtt.Client) -> None:
        self.client = c
        self.got: list[tuple[str, bytes]] = []
        self._task = asyncio.ensure_future(self._read())
        self._event = asyncio.Event()

    async def _read(self) -> None:
        async for m in self.client.messages:
            self.got.append((str(m.topic), bytes(m.payload)))
            self._event.set()

    async def wait_for(self, pred: Callable[[list[tuple[str, bytes]]], bool], timeout: float = 5.0) -> None:
        async def loop() -> None:
            while not pred(self.got):
                self._event.clear()
                await self._event.wait()

        await asyncio.wait_for(loop(), timeout)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await self._task
