"""Fixtures for the device library against the real broker: a data directory with tenant ``acme``
(SQLite registry), a test-side CA service over it, a :class:`HardenedBroker` with the certmq plugin
on a fixed port (so it can be stopped and started again on the same port and data directory), and
``DeviceClient``s over ``AiomqttTransport`` with real TLS.

Nothing here is faked: the broker, the plugin, the CA, TLS and MQTT are the production ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from device_client import CertStore, DeviceClient, Event, FileKeyStore
from device_client.mqtt import AiomqttTransport
from protocol.codes import Profile

PASS_ENV = "CERTMQ_DEVICE_IT_PASS"
PASSPHRASE = b"device integration passphrase"
os.environ[PASS_ENV] = PASSPHRASE.decode()
TENANT = "acme"
RECOVERY = dt.timedelta(days=7)

POLICY = """
[profiles.identity]
lifetime = "30d"
capabilities = ["telemetry"]
allow_key_reuse = true
expired_recovery = "7d"
"""


def now() -> dt.datetime:
    """The real clock (the broker and the CA use it too)."""
    return dt.datetime.now(dt.UTC)


def free_port() -> int:
    """A TCP port nobody listens on right now (the broker binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_pem(folder: Path, stem: str, der: bytes, key: Any) -> tuple[Path, Path]:
    """``(cert.pem, key.pem)`` files for a DER certificate and its key."""
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key.pem"
    cert_path.write_bytes(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@dataclass
class Minted:
    """A certificate minted by the test CA, in files and as objects."""

    name: str
    serial: int
    certificate: x509.Certificate
    key: Any
    cert_path: Path
    key_path: Path


class Ca:
    """The CA service of the test process, over the broker's data directory (same SQLite registry)."""

    def __init__(self, datadir: Path, service: CAService, registry: Any) -> None:
        self.datadir = datadir
        self.service = service
        self.registry = registry
        self.folder = datadir.parent / "minted"

    @property
    def chain_path(self) -> Path:
        return dd.tenant_dir(self.datadir, TENANT) / "chain.pem"

    @property
    def chain(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.chain_path.read_bytes())

    async def mint(self, name: str, kind: CertificateKind = CertificateKind.OPERATIONAL, *,
                   clock: Callable[[], dt.datetime] | None = None) -> Minted:
        service = self.service
        if clock is not None:
            service = CAService(registry=self.registry, authorities=service._authorities,  # noqa: SLF001
                                signer=service._signer, clock=clock)  # noqa: SLF001
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
        record = await service.issue_direct(tenant=TENANT, device_id=name, profile=Profile.IDENTITY, csr_der=csr,
                                            kind=kind, actor="device-integration")
        cert_path, key_path = write_pem(self.folder, f"{name}-{record.serial:x}", record.der, key)
        return Minted(name, record.serial, x509.load_der_x509_certificate(record.der), key, cert_path, key_path)

    async def claim(self, claim_id: str, **policy: Any) -> Minted:
        """Register a claim (default: ``sensor-*``, 5 uses) and mint its bootstrap certificate."""
        policy.setdefault("max_uses", 5)
        policy.setdefault("not_after", now() + dt.timedelta(days=30))
        if "device_ids" not in policy:
            policy.setdefault("pattern", "sensor-*")
        await self.service.register_claim(tenant=TENANT, claim_id=claim_id, policy=ClaimPolicy(**policy),
                                          actor="device-integration")
        return await self.mint(claim_id, CertificateKind.BOOTSTRAP)

    async def serials(self, device_id: str) -> set[int]:
        """Serials of every certificate the registry holds for ``device_id``."""
        return {r.serial for r in await self.registry.certificates_for_device(TENANT, device_id)}


class BrokerHandle:
    """The real broker on one fixed port and data directory; :meth:`stop` and :meth:`start` again."""

    def __init__(self, datadir: Path, **plugin: Any) -> None:
        self.datadir = datadir
        self.port = free_port()
        self.plugin_cfg = {"data_dir": str(datadir), "passphrase_env": PASS_ENV, "workers": 1, "rate": 0.0,
                           "revocation_poll": 0.1, **plugin}
        self.broker: HardenedBroker | None = None

    async def start(self) -> HardenedBroker:
        certfile, keyfile = ensure_server_certificate(self.datadir, passphrase=PASSPHRASE)
        broker = HardenedBroker(broker_config(host="127.0.0.1", port=self.port, plugin=self.plugin_cfg),
                                ssl_context=tls_context(self.datadir, certfile=certfile, keyfile=keyfile))
        await broker.start()
        plugin = CertmqPlugin.of(broker)
        assert plugin.startup_error is None, plugin.startup_error
        self.broker = broker
        return broker

    async def stop(self) -> None:
        broker, self.broker = self.broker, None
        if broker is not None:
            await broker.shutdown()

    @property
    def plugin(self) -> CertmqPlugin:
        assert self.broker is not None, "the broker is stopped"
        return CertmqPlugin.of(self.broker)

    def transport(self, **kwargs: Any) -> AiomqttTransport:
        """A fresh production transport aimed at this broker."""
        kwargs.setdefault("timeout", 5.0)
        return AiomqttTransport(hostname="127.0.0.1", port=self.port, **kwargs)


@pytest.fixture
async def datadir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    await dd.init_tenant(data, TENANT, algorithm="p256", passphrase=PASSPHRASE, policy=policy,
                         now=now().replace(microsecond=0) - dt.timedelta(days=40))  # room for expired leaves
    return data


@pytest.fixture
async def ca(datadir: Path) -> AsyncIterator[Ca]:
    authorities = dd.load_authorities(datadir, passphrase=PASSPHRASE)
    registry = await dd.open_datadir_registry(datadir)
    service = CAService(registry=registry, authorities=authorities, signer=InlineSigner(authorities), clock=now)
    yield Ca(datadir, service, registry)
    await registry.close()


@pytest.fixture
async def broker(datadir: Path) -> AsyncIterator[BrokerHandle]:
    handle = BrokerHandle(datadir)
    await handle.start()
    yield handle
    with contextlib.suppress(Exception):
        await handle.stop()


@dataclass
class Device:
    """A device's on-disk state (store + key store) and the events its client emitted."""

    device_id: str
    root: Path
    store: CertStore
    keys: FileKeyStore
    events: list[Event]

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


def make_device(root: Path, device_id: str, ca: Ca) -> Device:
    """A fresh device directory (FileKeyStore + CertStore trusting the tenant chain)."""
    folder = root / "devices" / device_id
    keys = FileKeyStore(directory=folder / "keys")
    store = CertStore(directory=folder, keystore=keys, trust=ca.chain, device_id=device_id)
    return Device(device_id, folder, store, keys, [])


def device_client(device: Device, broker: BrokerHandle, ca: Ca, **kwargs: Any) -> DeviceClient:
    """A ``DeviceClient`` for ``device`` over a new ``AiomqttTransport`` to ``broker``."""
    kwargs.setdefault("reply_timeout", 10.0)
    kwargs.setdefault("recovery_window", RECOVERY)
    return DeviceClient(device_id=device.device_id, tenant=TENANT, transport=broker.transport(),
                        store=device.store, ca_bundle=ca.chain, on_event=device.events.append, **kwargs)


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def live_serials(handle: BrokerHandle, client_id: str) -> list[int]:
    """Serials of the certificates ``client_id``'s live connections authenticated with (broker view)."""
    assert handle.broker is not None
    return [c.identity.serial for c in handle.broker.connections() if c.client_id == client_id]


async def fast_sleep(seconds: float) -> None:
    """Backoff waits compressed to at most 0.2 s (the decisions are unchanged, only waited less)."""
    await asyncio.sleep(min(max(seconds, 0.0), 0.2))


async def enrolled(tmp_path: Path, handle: BrokerHandle, ca: Ca, device_id: str, **kwargs: Any) -> Device:
    """A device enrolled through the broker with its own one-use claim (closed client afterwards)."""
    from device_client import BootstrapCredentials

    claim = await ca.claim(f"claim-{device_id}", device_ids=[device_id], max_uses=1)
    device = make_device(tmp_path, device_id, ca)
    boot = BootstrapCredentials(cert_path=claim.cert_path, key_path=claim.key_path)
    async with device_client(device, handle, ca, bootstrap=boot, **kwargs) as dc:
        await dc.enroll()
    return device


class WarpClock:
    """A client clock ``offset`` ahead of real time whose sleeps advance it by the full amount at
    once (after a real pause of at most 0.05 s): backoffs of minutes take milliseconds, while the
    broker and CA keep real time."""

    def __init__(self, offset: dt.timedelta = dt.timedelta(0)) -> None:
        self.offset = offset

    def now(self) -> dt.datetime:
        return now() + self.offset

    async def sleep(self, seconds: float) -> None:
        self.offset += dt.timedelta(seconds=max(seconds, 0.0))
        await asyncio.sleep(min(max(seconds, 0.0), 0.05))
