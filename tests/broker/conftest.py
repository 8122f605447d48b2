"""Fixtures for the broker tests: a test tenant CA, client certificates, a hardened broker and a
stock amqtt broker, both on 127.0.0.1 with a free port and real TLS."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from amqtt.broker import Broker
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker_plugin.broker import HardenedBroker
from broker_plugin.ca.authority import create_tenant_ca
from broker_plugin.tlsconf import server_context

NOW = datetime.now(timezone.utc)


def _pem(obj: Any) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass
class Pki:
    """A tenant CA on disk, and a maker of client TLS contexts holding certificates it issued."""

    root: Path
    chain_pem: bytes
    issuing_cert: x509.Certificate
    issuing_key: ec.EllipticCurvePrivateKey
    server_cert: Path
    server_key: Path
    _n: int = field(default=0)

    def issue(self, cn: str, *, issuer_key: Any = None, issuer: x509.Certificate | None = None) -> tuple[Path, Path, int]:
        """A client certificate and key for ``cn`` (files), and its serial."""
        self._n += 1
        key = ec.generate_private_key(ec.SECP256R1())
        serial = x509.random_serial_number()
        issuer = issuer or self.issuing_cert
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(issuer.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(NOW - timedelta(minutes=5))
            .not_valid_after(NOW + timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(issuer_key or self.issuing_key, hashes.SHA256())
        )
        cert_path, key_path = self.root / f"c{self._n}.pem", self.root / f"c{self._n}.key"
        cert_path.write_bytes(_pem(cert))
        key_path.write_bytes(_pem(key))
        return cert_path, key_path, serial

    def client_context(self, cn: str | None) -> ssl.SSLContext:
        """A client context trusting the tenant CA, with a fresh certificate for ``cn`` (None: no certificate)."""
        context = ssl.create_default_context(cafile=str(self.root / "chain.pem"))
        if cn is not None:
            cert, key, _ = self.issue(cn)
            context.load_cert_chain(str(cert), str(key))
        return context

    def client_context_with_serial(self, cn: str) -> tuple[ssl.SSLContext, int]:
        """Like :meth:`client_context`, also returning the certificate's serial."""
        context = ssl.create_default_context(cafile=str(self.root / "chain.pem"))
        cert, key, serial = self.issue(cn)
        context.load_cert_chain(str(cert), str(key))
        return context, serial

    def server_context(self) -> ssl.SSLContext:
        """The hardened broker's TLS context (client certificates required)."""
        return server_context(certfile=self.server_cert, keyfile=self.server_key, client_ca_pems=[self.chain_pem])


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    root_key, issuing_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = create_tenant_ca(tenant="acme", root_key=root_key, issuing_key=issuing_key, now=NOW - timedelta(hours=1))
    (root / "chain.pem").write_bytes(ca.chain_pem())
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.issuing.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(minutes=5))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(issuing_key, hashes.SHA256())
    )
    (root / "server.pem").write_bytes(_pem(server) + ca.chain_pem())
    (root / "server.key").write_bytes(_pem(server_key))
    return Pki(
        root=root,
        chain_pem=ca.chain_pem(),
        issuing_cert=ca.issuing,
        issuing_key=issuing_key,
        server_cert=root / "server.pem",
        server_key=root / "server.key",
    )


LISTENER = {"default": {"type": "tcp", "bind": "127.0.0.1:0", "ssl": True}}


@pytest.fixture
async def make_hardened(pki: Pki) -> AsyncIterator[Callable[..., Any]]:
    """Factory: ``await make_hardened(**hooks)`` starts a hardened broker (stopped at teardown)."""
    started: list[HardenedBroker] = []

    async def make(**kwargs: Any) -> HardenedBroker:
        broker = HardenedBroker({"listeners": LISTENER}, ssl_context=pki.server_context(), **kwargs)
        await broker.start()
        started.append(broker)
        return broker

    yield make
    for broker in started:
        await broker.shutdown()


@pytest.fixture
async def hardened(make_hardened: Callable[..., Any]) -> HardenedBroker:
    """A running hardened broker with default hooks (CN identity, client id = CN, allow-all ACL)."""
    return await make_hardened()


ANONYMOUS = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}


@pytest.fixture
async def make_stock(pki: Pki) -> AsyncIterator[Callable[..., Any]]:
    """Factory: ``await make_stock(plugins)`` starts a STOCK amqtt 0.12.1 broker with amqtt's own TLS
    listener configuration (cafile = the tenant CA), stopped at teardown."""
    started: list[Broker] = []

    async def make(plugins: dict[str, Any] | None = None) -> Broker:
        config = {
            "listeners": {
                "default": {
                    "type": "tcp",
                    "bind": "127.0.0.1:0",
                    "ssl": True,
                    "certfile": str(pki.server_cert),
                    "keyfile": str(pki.server_key),
                    "cafile": str(pki.root / "chain.pem"),
                }
            },
            "plugins": {**ANONYMOUS, **(plugins or {})},
        }
        broker = Broker(config)
        await broker.start()
        started.append(broker)
        return broker

    yield make
    for broker in started:
        await broker.shutdown()


@pytest.fixture
async def stock(make_stock: Callable[..., Any]) -> Broker:
    """A STOCK amqtt 0.12.1 broker allowing anonymous clients (amqtt's default auth)."""
    return await make_stock()
