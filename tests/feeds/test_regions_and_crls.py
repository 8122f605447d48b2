"""Regions end to end through the service (provisioning parameter, claim policy region, tenant
default, factory issuance), status lists per (tenant, region) rolled over by the service when
full, and per-region X.509 CRL shards written by ``certmq ca crl --region``, checked by openssl."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker_plugin.ca.claims import ClaimPolicy
from broker_plugin.store.base import CertificateKind
from protocol import extensions
from protocol.codec import decode, encode
from protocol.codes import Profile, RevocationReason
from protocol.messages import CertificateIssued, CertificateRequest, ProvisioningParameters
from protocol.topics import provisioning_request_topic

from .conftest import CAPACITY, PASS_ENV, Ca, Creds, now


def region_of(cert: x509.Certificate) -> str:
    ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(extensions.REGION_OID)).value
    assert isinstance(ext, x509.UnrecognizedExtension)
    return extensions.decode_region(ext.value)


def position_of(cert: x509.Certificate) -> tuple[int, int]:
    ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(extensions.STATUS_POSITION_OID)).value
    assert isinstance(ext, x509.UnrecognizedExtension)
    return extensions.decode_status_position(ext.value)


def csr(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


async def provision(ca: Ca, claim_cert: x509.Certificate, device_id: str, region: str | None) -> x509.Certificate:
    """Provision ``device_id`` with the claim credential, through the service's request path."""
    identity = await ca.service.identify(claim_cert)
    message = CertificateRequest(request_id=os.urandom(16), profile=Profile.IDENTITY, csr=csr(device_id),
                                 provisioning=ProvisioningParameters(device_id=device_id, region=region))
    outcome = await ca.service.handle(identity, provisioning_request_topic("acme", device_id), encode(message))
    [reply] = outcome.replies
    issued = decode(reply.payload)
    assert isinstance(issued, CertificateIssued), issued
    return x509.load_der_x509_certificate(issued.certificate)


async def claim(ca: Ca, claim_id: str, **policy: Any) -> x509.Certificate:
    """Register a claim and issue its bootstrap certificate."""
    await ca.service.register_claim(tenant="acme", claim_id=claim_id, actor="t", policy=ClaimPolicy(
        max_uses=5, not_after=now() + dt.timedelta(days=3), pattern="sensor-*", **policy))
    record = await ca.service.issue_direct(tenant="acme", device_id=claim_id, profile=Profile.IDENTITY,
                                           csr_der=csr(claim_id), kind=CertificateKind.BOOTSTRAP, actor="t")
    return x509.load_der_x509_certificate(record.der)


async def test_region_comes_from_parameter_then_claim_policy_then_tenant_default(ca: Ca) -> None:
    line_a, line_b = await claim(ca, "line-a", region="apac"), await claim(ca, "line-b")
    asked = await provision(ca, line_a, "sensor-1", "us")  # the parameter beats the claim's region
    from_claim = await provision(ca, line_a, "sensor-2", None)
    default = await provision(ca, line_b, "sensor-3", None)
    factory = (await ca.mint("acme", "sensor-4")).certificate
    assert [region_of(c) for c in (asked, from_claim, default, factory)] == ["us", "apac", "eu", "eu"]
    for cert, region in ((asked, "us"), (from_claim, "apac"), (default, "eu")):
        record = await ca.registry.get_certificate("acme", cert.serial_number)
        assert record.region == region
        assert (record.status_list_id, record.status_index) == position_of(cert)
        lists = await ca.registry.feed_lists("acme", region)
        assert record.status_list_id in [fl.list_id for fl in lists]  # the slot is in that region's list
    # Each region has its own lists, numbered from 1.
    assert position_of(asked) == (1, 0) and position_of(from_claim) == (1, 0)


async def test_status_lists_roll_over_through_the_service(ca: Ca) -> None:
    creds: list[Creds] = [await ca.mint("acme", f"sensor-{i}") for i in range(2 * CAPACITY + 1)]
    positions = [position_of(c.certificate) for c in creds]
    assert positions == [(1 + i // CAPACITY, i % CAPACITY) for i in range(2 * CAPACITY + 1)]
    other = await ca.mint("acme", "sensor-us", region="us")
    assert position_of(other.certificate) == (1, 0)  # another region: its own list 1
    assert [(fl.region, fl.list_id) for fl in await ca.registry.feed_lists("acme")] == [
        ("eu", 1), ("eu", 2), ("eu", 3), ("us", 1)]


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("openssl")
    assert exe, "the openssl CLI is required for these tests (apt-get install openssl)"
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, check=False)


def cli_crl(ca: Ca, region: str, out: Path) -> Path:
    done = subprocess.run(
        [sys.executable, "-m", "broker_plugin.cli", "ca", "crl", "--data", str(ca.datadir), "--tenant", "acme",
         "--region", region, "--out", str(out), "--passphrase-env", PASS_ENV],
        capture_output=True, text=True, check=False, env={**os.environ})
    assert done.returncode == 0, done.stderr
    pem_path = out.with_suffix(".pem")
    converted = openssl("crl", "-inform", "DER", "-in", out, "-out", pem_path)
    assert converted.returncode == 0, converted.stderr
    return pem_path


async def test_crl_shards_per_region_verify_with_openssl(ca: Ca, tmp_path: Path) -> None:
    eu, eu_ok, us = (await ca.mint("acme", "sensor-eu"), await ca.mint("acme", "sensor-eu2"),
                     await ca.mint("acme", "sensor-us", region="us"))
    await ca.service.revoke(tenant="acme", reason=RevocationReason.KEY_COMPROMISE, actor="t", serial=eu.serial)
    eu_crl, us_crl = cli_crl(ca, "eu", tmp_path / "eu.crl"), cli_crl(ca, "us", tmp_path / "us.crl")
    chain = ca.chain("acme")
    for crl in (eu_crl, us_crl):
        checked = openssl("crl", "-in", crl, "-CAfile", chain, "-noout")
        assert checked.returncode == 0 and "verify OK" in (checked.stdout + checked.stderr), checked.stderr
    listed = {c.serial_number for c in x509.load_pem_x509_crl(eu_crl.read_bytes())}
    assert listed == {eu.serial}
    assert len(x509.load_pem_x509_crl(us_crl.read_bytes())) == 0  # the eu revocation is not in the us shard

    def verify(creds: Creds, crl: Path) -> subprocess.CompletedProcess[str]:
        return openssl("verify", "-crl_check", "-CAfile", chain, "-CRLfile", crl, creds.cert)

    revoked = verify(eu, eu_crl)
    assert revoked.returncode != 0 and "revoked" in (revoked.stdout + revoked.stderr)
    assert verify(eu_ok, eu_crl).returncode == 0
    fine = verify(us, us_crl)
    assert fine.returncode == 0, fine.stdout + fine.stderr
