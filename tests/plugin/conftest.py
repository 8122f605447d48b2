"""Fixtures for the certmq plugin tests: a real data directory (two tenants, SQLite registry), a
test-side CA service minting certificates into it, a HardenedBroker loading the plugin by its
dotted path, and aiomqtt clients over real TLS. tests/feeds builds on the same pieces (its own
policy, signed feeds tuned for tests)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
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
from broker_plugin.ca.claims import ClaimPolicy
from broker_plugin.ca.service import CAService
from broker_plugin.ca.signing import InlineSigner
from broker_plugin.plugin import CertmqPlugin
from broker_plugin.server import broker_config, ensure_server_certificate, tls_context
from broker_plugin.store.base import CertificateKind
from protocol import feedsig
from protocol.codec import decode
from protocol.codes import Profile
from protocol.messages import Message

PASS_ENV = "CERTMQ_PLUGIN_TEST_PASS"
PASSPHRASE = b"plugin test passphrase"
os.environ[PASS_ENV] = PASSPHRASE.decode()

POLICY = """
[profiles.identity]
lifetime = "30d"
capabilities = ["telemetry"]
allow_key_reuse = true
expired_recovery = "7d"
"""
NOW = lambda: dt.datetime.now(dt.UTC)  # noqa: E731


def make_csr(cn: str, key: Any = None) -> tuple[Any, bytes]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))
    return key, csr.public_bytes(serialization.Encoding.DER)


@dataclass
class Creds:
    """A client certificate in files, with what the tests need to know about it."""

    tenant: str
    name: str
    serial: int
    cert: Path
    key: Path
    chain: Path
    der: bytes
    region: str | None = None

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.der)


def write_creds(folder: Path, tenant: str, name: str, der: bytes, key: Any, chain: Path,
                region: str | None = None) -> Creds:
    folder.mkdir(parents=True, exist_ok=True)
    cert = x509.load_der_x509_certificate(der)
    stem = f"{tenant}-{name}-{cert.serial_number:x}"
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return Creds(tenant, name, cert.serial_number, cert_path, key_path, chain, der, region)


class Ca:
    """A CA service of the test process over the same data directory as the broker."""

    def __init__(self, datadir: Path, service: CAService, registry: Any) -> None:
        self.datadir = datadir
        self.service = service
        self.registry = registry
        self.folder = datadir.parent / "creds"

    def chain(self, tenant: str) -> Path:
        return dd.tenant_dir(self.datadir, tenant) / "chain.pem"

    async def mint(self, tenant: str, name: str, kind: CertificateKind = CertificateKind.OPERATIONAL,
                   *, region: str | None = None, clock: Callable[[], dt.datetime] | None = None) -> Creds:
        service = self.service
        if clock is not None:
            service = CAService(registry=self.registry, authorities=service._authorities,  # noqa: SLF001
                                signer=service._signer, clock=clock)  # noqa: SLF001
        key, csr = make_csr(name)
        record = await service.issue_direct(tenant=tenant, device_id=name, profile=Profile.IDENTITY, csr_der=csr,
                                            kind=kind, region=region, actor="plugin-tests")
        return write_creds(self.folder, tenant, name, record.der, key, self.chain(tenant), record.region)

    async def claim(self, tenant: str, claim_id: str, **policy: Any) -> Creds:
        policy.setdefault("max_uses", 5)
        policy.setdefault("not_after", NOW() + dt.timedelta(days=30))
        if "device_ids" not in policy:
            policy.setdefault("pattern", "sensor-*")
        await self.service.register_claim(tenant=tenant, claim_id=claim_id, policy=ClaimPolicy(**policy),
                                          actor="plugin-tests")
        return await self.mint(tenant, claim_id, CertificateKind.BOOTSTRAP)


async def make_datadir(root: Path, policy_text: str = POLICY) -> Path:
    """Tenants ``acme`` and ``globex`` under ``root/data`` with ``policy_text`` (TOML)."""
    datadir = root / "data"
    policy = root / "policy.toml"
    policy.write_text(policy_text)
    for tenant in ("acme", "globex"):
        await dd.init_tenant(datadir, tenant, algorithm="p256", passphrase=PASSPHRASE, policy=policy,
                             now=NOW().replace(microsecond=0) - dt.timedelta(hours=1))
    return datadir


@pytest.fixture
async def datadir(tmp_path: Path) -> Path:
    return await make_datadir(tmp_path)


@pytest.fixture
async def ca(datadir: Path) -> AsyncIterator[Ca]:
    authorities = dd.load_authorities(datadir, passphrase=PASSPHRASE)
    registry = await dd.open_datadir_registry(datadir)
    service = CAService(registry=registry, authorities=authorities, signer=InlineSigner(authorities), clock=NOW)
    yield Ca(datadir, service, registry)
    await registry.close()


async def start_broker(datadir: Path, **plugin: Any) -> HardenedBroker:
    """A HardenedBroker on 127.0.0.1:<free port> loading the plugin by dotted path from an amqtt config."""
    certfile, keyfile = ensure_server_certificate(datadir, passphrase=PASSPHRASE)
    cfg = {"data_dir": str(datadir), "passphrase_env": PASS_ENV, "workers": 1, **plugin}
    broker = HardenedBroker(broker_config(host="127.0.0.1", port=0, plugin=cfg),
                            ssl_context=tls_context(datadir, certfile=certfile, keyfile=keyfile))
    await broker.start()
    plugin_obj = CertmqPlugin.of(broker)
    assert plugin_obj.startup_error is None, plugin_obj.startup_error
    return broker


@pytest.fixture
def broker_starter() -> Callable[..., Awaitable[HardenedBroker]]:
    """What ``make_broker`` starts a broker with (tests/feeds tunes the feeds on top)."""
    return start_broker


@pytest.fixture
async def make_broker(datadir: Path, broker_starter: Callable[..., Awaitable[HardenedBroker]],
                      ) -> AsyncIterator[Callable[..., Any]]:
    started: list[HardenedBroker] = []

    async def make(**plugin: Any) -> HardenedBroker:
        broker = await broker_starter(datadir, **plugin)
        started.append(broker)
        return broker

    yield make
    for broker in started:
        with contextlib.suppress(Exception):
            await broker.shutdown()


def tls(creds: Creds, *, trust: Path | None = None) -> ssl.SSLContext:
    """A client context: trusts the broker's issuing tenant, presents ``creds``."""
    context = ssl.create_default_context(cafile=str(trust or creds.chain))
    context.load_cert_chain(str(creds.cert), str(creds.key))
    return context


def client(broker: HardenedBroker, creds: Creds, *, client_id: str | None = None,
           trust: Path | None = None) -> aiomqtt.Client:
    """An aiomqtt client (not yet connected) for ``creds`` (client id = its name unless given)."""
    return aiomqtt.Client("127.0.0.1", broker.listen_port(), identifier=client_id or creds.name,
                          tls_context=tls(creds, trust=trust), keepalive=30, timeout=5)


def feed_keys(ca: "Ca", tenant: str) -> dict[bytes, Any]:
    """kid -> public key of ``tenant``'s issuing CA: what a validator trusts for signed feeds."""
    issuing = x509.load_pem_x509_certificates(ca.chain(tenant).read_bytes())[0]
    return {feedsig.key_id(issuing.public_key()): issuing.public_key()}


async def next_message(c: aiomqtt.Client, timeout: float = 10.0, *,
                       feed_keys: Mapping[bytes, Any] | None = None) -> tuple[str, Message]:
    """The next message ``c`` receives, decoded (``TimeoutError`` if none comes).

    Revocation feeds (``.../rev/...``) are signed COSE_Sign1: with ``feed_keys`` the signature is
    verified (``protocol.feedsig.open_feed``); without, only unwrapped (the feeds tests verify)."""
    async def first() -> tuple[str, Message]:
        async for m in c.messages:
            topic, payload = str(m.topic), bytes(m.payload)  # type: ignore[arg-type]
            if "/rev/" in topic:
                if feed_keys is not None:
                    return topic, feedsig.open_feed(payload, feed_keys)
                return topic, decode(feedsig.decode_signed(payload).payload)
            return topic, decode(payload)
        raise AssertionError("message stream ended")

    return await asyncio.wait_for(first(), timeout)


async def no_message(c: aiomqtt.Client, wait: float = 1.0) -> None:
    """Assert that ``c`` receives nothing for ``wait`` seconds."""
    with pytest.raises(TimeoutError):
        got = await next_message(c, wait)
        raise AssertionError(f"unexpected message {got}")


def wait_ready(path: Path, proc: subprocess.Popen[str], limit: float = 30) -> dict[str, Any]:
    """The ready file a ``certmq broker`` process writes, once it is there (the process's stderr if it exits first)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())  # type: ignore[no-any-return]
        if proc.poll() is not None:
            raise AssertionError(f"broker exited {proc.returncode}: {proc.stderr.read()}")  # type: ignore[union-attr]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("broker not ready in time")

