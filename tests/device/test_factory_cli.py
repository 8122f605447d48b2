"""Factory provisioning through `certmq device` (device_client.cli), the blocking facade, and the TLS context."""

from __future__ import annotations

import argparse
import ssl
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from device_fakes import FakeCA, VirtualClock

from device_client import cli
from device_client.blocking import BlockingDeviceClient
from device_client.certstore import CertStore
from device_client.keystore import FileKeyStore
from device_client.mqtt import build_ssl_context
from device_client.transport import ClientCredentials, MemoryTransport
from protocol.codes import Profile


def certmq_device(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    return cli.run(parser.parse_args(list(argv)))


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def test_keygen_csr_import_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from datetime import datetime, timezone

    from device_fakes import make_ca

    fake_ca = make_ca(VirtualClock(datetime.now(timezone.utc).replace(microsecond=0)))  # the CLI reads the real clock
    d = tmp_path / "dev"
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(_pem(fake_ca.ca.issuing, fake_ca.ca.root))
    assert certmq_device("keygen", "--dir", str(d), "--device-id", "line-7-unit-3") == 0
    csr_path = Path(capsys.readouterr().out.strip())
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid
    # `csr` again gives the same CSR (same key), not a new one
    assert certmq_device("csr", "--dir", str(d), "--device-id", "line-7-unit-3") == 0
    assert x509.load_pem_x509_csr(Path(capsys.readouterr().out.strip()).read_bytes()).public_key() == csr.public_key()
    # a certificate for another key is refused and changes nothing
    wrong = fake_ca.issue("line-7-unit-3", Profile.IDENTITY, ec.generate_private_key(ec.SECP256R1()).public_key())
    (tmp_path / "wrong.pem").write_bytes(_pem(wrong))
    assert certmq_device("import", "--dir", str(d), "--ca-bundle", str(bundle), "--cert", str(tmp_path / "wrong.pem")) == 1
    assert "public key" in capsys.readouterr().err
    # the CA batch-signs the CSR; importing validates it and stages it in `next`
    cert = fake_ca.issue("line-7-unit-3", Profile.IDENTITY, csr.public_key())
    (tmp_path / "cert.pem").write_bytes(_pem(cert, fake_ca.ca.issuing))
    assert certmq_device("import", "--dir", str(d), "--ca-bundle", str(bundle), "--cert", str(tmp_path / "cert.pem")) == 0
    assert certmq_device("status", "--dir", str(d), "--ca-bundle", str(bundle), "--json") == 0
    out = capsys.readouterr().out
    assert f'"serial": "{cert.serial_number:x}"' in out and '"slot": "next"' in out


def test_import_without_csr_is_refused(tmp_path: Path, fake_ca: FakeCA, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(_pem(fake_ca.ca.issuing))
    (tmp_path / "c.pem").write_bytes(_pem(fake_ca.ca.issuing))
    assert certmq_device("import", "--dir", str(tmp_path / "d"), "--ca-bundle", str(bundle), "--cert", str(tmp_path / "c.pem")) == 1
    assert "no factory CSR" in capsys.readouterr().err


def test_blocking_facade_imported_certificate_is_proven_on_first_connect(tmp_path: Path, fake_ca: FakeCA,
                                                                         clock: VirtualClock) -> None:
    from device_client.factory import import_certificate, make_csr

    store = CertStore(directory=tmp_path, keystore=FileKeyStore(directory=tmp_path / "keys"), trust=fake_ca.trust,
                      device_id="sensor-0042")
    csr = x509.load_pem_x509_csr(make_csr(store, device_id="sensor-0042", profile=Profile.IDENTITY, now=clock.now()).read_bytes())
    cert = fake_ca.issue("sensor-0042", Profile.IDENTITY, csr.public_key())
    import_certificate(store, profile=Profile.IDENTITY, certificate=_pem(cert, fake_ca.ca.issuing), now=clock.now())
    assert store.current(Profile.IDENTITY) is None
    broker = fake_ca.broker()
    with BlockingDeviceClient(transport_factory=lambda: MemoryTransport(broker=broker), device_id="sensor-0042",
                              tenant="acme", store=store, clock=clock.now, reply_timeout=1.0) as dc:
        assert store.current(Profile.IDENTITY).certificate == cert  # type: ignore[union-attr]
        clock.advance(timedelta(days=70))
        new = dc.renew()
        assert new.serial != cert.serial_number
        assert dc.status()[Profile.IDENTITY].serial == new.serial


def test_tls_context_presents_client_certificate_and_pins_ca(tmp_path: Path, fake_ca: FakeCA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = fake_ca.issue("sensor-0042", Profile.IDENTITY, key.public_key())
    creds = ClientCredentials(client_id="sensor-0042", certificate=cert, chain=(fake_ca.ca.issuing,), private_key=key,
                              ca_certificates=(fake_ca.ca.root,))
    ctx = build_ssl_context(creds)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert [c["serialNumber"] for c in ctx.get_ca_certs()] == [f"{fake_ca.ca.root.serial_number:X}"]
    # a key that does not match the certificate is refused by the TLS stack itself
    other = ClientCredentials(client_id="x", certificate=cert, private_key=ec.generate_private_key(ec.SECP256R1()),
                              ca_certificates=(fake_ca.ca.root,))
    with pytest.raises(ssl.SSLError):
        build_ssl_context(other)
