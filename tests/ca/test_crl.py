"""broker_plugin.ca.crl: CRLs that the real openssl CLI verifies and uses to reject revoked certificates.

ML-DSA CRLs are checked with cryptography only: the system openssl (3.0) has no ML-DSA.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa

import broker_plugin.ca.crl as crl_module
from broker_plugin.ca.authority import TenantCA, create_tenant_ca
from broker_plugin.ca.crl import build_crl, reason_flag
from broker_plugin.ca.issuer import Issuer, random_serial
from broker_plugin.ca.policy import TenantPolicy
from protocol.codes import Profile, RevocationReason

NOW = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=5)
LATER = NOW + timedelta(days=1)
CRL_BASE = "http://crl.example/certmq"


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("openssl")
    assert exe, "the openssl CLI is required for these tests (apt-get install openssl)"
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, check=False)


class Pki:
    """A tenant CA with a few issued certificates, written out for openssl."""

    def __init__(self, directory: Path, *, ca_key_type: str = "p256") -> None:
        make = {
            "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
            "ed25519": ed25519.Ed25519PrivateKey.generate,
            "ml-dsa-44": mldsa.MLDSA44PrivateKey.generate,
        }[ca_key_type]
        self.dir = directory
        self.key = make()
        self.ca: TenantCA = create_tenant_ca(tenant="acme", root_key=make(), issuing_key=self.key, now=NOW)
        self.policy = TenantPolicy(name="acme", crl_url=CRL_BASE)
        self.issuer = Issuer(ca_certificate=self.ca.issuing, ca_key=self.key, tenant_policy=self.policy)
        (directory / "chain.pem").write_bytes(self.ca.chain_pem())
        (directory / "root.pem").write_bytes(self.ca.root.public_bytes(serialization.Encoding.PEM))
        (directory / "issuing.pem").write_bytes(self.ca.issuing.public_bytes(serialization.Encoding.PEM))

    def cert(self, device_id: str, region: str = "eu") -> tuple[x509.Certificate, Path]:
        cert = self.issuer.issue(
            device_id=device_id,
            profile=Profile.IDENTITY,
            public_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
            serial=random_serial(os.urandom),
            not_before=NOW,
            status_position=None,
            region=region,
            capabilities=None,
        )
        path = self.dir / f"{device_id}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert, path

    def crl(self, name: str, revoked, **kw) -> tuple[x509.CertificateRevocationList, Path]:  # type: ignore[no-untyped-def]
        args = dict(issuer_cert=self.ca.issuing, issuer_key=self.key, revoked=revoked, this_update=NOW, next_update=LATER)
        args.update(kw)
        crl = build_crl(**args)  # type: ignore[arg-type]
        path = self.dir / f"{name}.pem"
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        return crl, path

    def verify(self, cert_path: Path, *crl_paths: Path, deltas: bool = False) -> subprocess.CompletedProcess[str]:
        crl_args: list[str | Path] = []
        for p in crl_paths:
            crl_args += ["-CRLfile", p]
        return openssl(
            "verify", "-x509_strict", "-crl_check", *(["-use_deltas"] if deltas else []), *crl_args,
            "-CAfile", self.dir / "root.pem", "-untrusted", self.dir / "issuing.pem", cert_path,
        )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def revoked_msg(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode != 0 and "certificate revoked" in result.stdout + result.stderr


def test_all_is_complete() -> None:
    assert set(crl_module.__all__) == {"MAX_CRL_NUMBER", "build_crl", "reason_flag"}
    assert all(hasattr(crl_module, n) for n in crl_module.__all__)


def test_openssl_verifies_the_crl_signature(pki: Pki) -> None:
    cert, _ = pki.cert("dev-1")
    _, path = pki.crl("full", [(cert.serial_number, NOW, RevocationReason.KEY_COMPROMISE)], crl_number=1)
    result = openssl("crl", "-in", path, "-CAfile", pki.dir / "chain.pem", "-noout")
    assert result.returncode == 0 and "verify OK" in result.stderr + result.stdout, result.stderr


def test_openssl_rejects_a_crl_signed_by_another_key(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    other = Pki(tmp_path / "other")
    # Same issuer name ("acme ... issuing CA") but another key: the signature must not verify.
    _, path = other.crl("foreign", [], crl_number=1)
    result = openssl("crl", "-in", path, "-CAfile", pki.dir / "chain.pem", "-noout")
    assert "verify OK" not in result.stderr + result.stdout


def test_revoked_certificate_rejected_unrevoked_accepted(pki: Pki) -> None:
    revoked, revoked_path = pki.cert("dev-1")
    _, fine_path = pki.cert("dev-2")
    _, crl_path = pki.crl("full", [(revoked.serial_number, NOW, RevocationReason.KEY_COMPROMISE)], crl_number=7)

    assert revoked_msg(pki.verify(revoked_path, crl_path))
    accepted = pki.verify(fine_path, crl_path)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    # Without any CRL, -crl_check cannot succeed: the CRL is what made the difference.
    assert pki.verify(fine_path).returncode != 0


def test_crl_contents(pki: Pki) -> None:
    a, _ = pki.cert("dev-1")
    b, _ = pki.cert("dev-2")
    revoked_at = NOW - timedelta(hours=1)
    crl, path = pki.crl(
        "full",
        [(a.serial_number, revoked_at, RevocationReason.UNSPECIFIED), (b.serial_number, NOW, RevocationReason.SUPERSEDED)],
        crl_number=42,
    )
    assert crl.is_signature_valid(pki.ca.issuing.public_key())  # type: ignore[arg-type]
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 42
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = pki.ca.issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert crl.last_update_utc == NOW and crl.next_update_utc == LATER
    entry_a = crl.get_revoked_certificate_by_serial_number(a.serial_number)
    entry_b = crl.get_revoked_certificate_by_serial_number(b.serial_number)
    assert entry_a is not None and entry_b is not None
    assert entry_a.revocation_date_utc == revoked_at
    with pytest.raises(x509.ExtensionNotFound):  # unspecified: no reasonCode (RFC 5280 5.3.1)
        entry_a.extensions.get_extension_for_class(x509.CRLReason)
    assert entry_b.extensions.get_extension_for_class(x509.CRLReason).value.reason is x509.ReasonFlags.superseded
    text = openssl("crl", "-in", path, "-noout", "-text").stdout
    assert "Superseded" in text
    with pytest.raises(x509.ExtensionNotFound):
        crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)


def test_every_reason_maps() -> None:
    for reason in RevocationReason:
        assert reason_flag(reason).name.replace("_", "").lower() == reason.name.replace("_", "").lower()


def test_delta_crl(pki: Pki) -> None:
    in_base, in_base_path = pki.cert("dev-1")
    in_delta, in_delta_path = pki.cert("dev-2")
    _, fine_path = pki.cert("dev-3")
    _, base = pki.crl(
        "base", [(in_base.serial_number, NOW, RevocationReason.KEY_COMPROMISE)], crl_number=10,
        delta_url=f"{CRL_BASE}/acme/eu.delta.crl",
    )
    delta_crl, delta = pki.crl(
        "delta", [(in_delta.serial_number, NOW, RevocationReason.CESSATION_OF_OPERATION)], crl_number=11, delta_of=10
    )
    indicator = delta_crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
    assert indicator.critical and indicator.value.crl_number == 10
    text = openssl("crl", "-in", delta, "-noout", "-text")
    assert "Delta CRL Indicator" in text.stdout
    assert "verify OK" in openssl("crl", "-in", delta, "-CAfile", pki.dir / "chain.pem", "-noout").stderr

    assert revoked_msg(pki.verify(in_delta_path, base, delta, deltas=True))
    assert revoked_msg(pki.verify(in_base_path, base, delta, deltas=True))
    assert pki.verify(fine_path, base, delta, deltas=True).returncode == 0
    # Without -use_deltas only the base counts: the delta is what rejected dev-2.
    assert pki.verify(in_delta_path, base, delta).returncode == 0


def test_openssl_ignores_a_delta_without_freshest_crl(pki: Pki) -> None:
    """Why build_crl has delta_url: without freshestCRL on the base, openssl never looks at deltas."""
    in_delta, in_delta_path = pki.cert("dev-2")
    _, base = pki.crl("base", [], crl_number=10)
    _, delta = pki.crl("delta", [(in_delta.serial_number, NOW, RevocationReason.KEY_COMPROMISE)], crl_number=11, delta_of=10)
    assert pki.verify(in_delta_path, base, delta, deltas=True).returncode == 0


def test_shard_crl_with_issuing_distribution_point(pki: Pki) -> None:
    eu, eu_path = pki.cert("dev-eu", region="eu")
    _, eu_fine_path = pki.cert("dev-eu-2", region="eu")
    _, us_path = pki.cert("dev-us", region="us")
    eu_url = pki.policy.crl_url_for("eu")
    assert eu_url == f"{CRL_BASE}/acme/eu.crl"
    crl, path = pki.crl("eu", [(eu.serial_number, NOW, RevocationReason.KEY_COMPROMISE)], crl_number=3, shard="eu", crl_url=eu_url)

    idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
    assert idp.critical and idp.value.only_contains_user_certs
    assert [n.value for n in idp.value.full_name or []] == [eu_url]
    assert "Only User Certificates" in openssl("crl", "-in", path, "-noout", "-text").stdout

    assert revoked_msg(pki.verify(eu_path, path))
    assert pki.verify(eu_fine_path, path).returncode == 0
    # The EU shard says nothing about US certificates: openssl sees it is out of scope.
    us = pki.verify(us_path, path)
    assert us.returncode != 0 and "different CRL scope" in us.stdout + us.stderr


def test_shard_delta_crl(pki: Pki) -> None:
    target, target_path = pki.cert("dev-eu", region="eu")
    url = pki.policy.crl_url_for("eu")
    _, base = pki.crl("base", [], crl_number=20, shard="eu", crl_url=url, delta_url=f"{url}.delta")
    _, delta = pki.crl("delta", [(target.serial_number, NOW, RevocationReason.KEY_COMPROMISE)], crl_number=21,
                       delta_of=20, shard="eu", crl_url=url)
    assert pki.verify(target_path, base, delta).returncode == 0
    assert revoked_msg(pki.verify(target_path, base, delta, deltas=True))


def test_ed25519_ca_crl_with_openssl(tmp_path: Path) -> None:
    pki = Pki(tmp_path, ca_key_type="ed25519")
    cert, cert_path = pki.cert("dev-1")
    _, path = pki.crl("full", [(cert.serial_number, NOW, RevocationReason.KEY_COMPROMISE)], crl_number=1)
    assert "verify OK" in openssl("crl", "-in", path, "-CAfile", tmp_path / "chain.pem", "-noout").stderr
    assert revoked_msg(pki.verify(cert_path, path))


def test_ml_dsa_ca_crl_with_cryptography(tmp_path: Path) -> None:
    # openssl 3.0 cannot verify ML-DSA signatures: cryptography checks this one.
    pki = Pki(tmp_path, ca_key_type="ml-dsa-44")
    cert, _ = pki.cert("dev-1")
    crl, _ = pki.crl("full", [(cert.serial_number, NOW, RevocationReason.KEY_COMPROMISE)], crl_number=1)
    assert crl.signature_hash_algorithm is None
    assert crl.is_signature_valid(pki.ca.issuing.public_key())  # type: ignore[arg-type]
    assert not crl.is_signature_valid(pki.ca.root.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"revoked": [(5, NOW, RevocationReason.KEY_COMPROMISE)] * 2}, "twice"),
        ({"revoked": [(5, NOW, RevocationReason.REMOVE_FROM_CRL)]}, "delta"),
        ({"revoked": [(0, NOW, RevocationReason.KEY_COMPROMISE)]}, "positive"),
        ({"revoked": [(5, datetime(2026, 1, 1), RevocationReason.KEY_COMPROMISE)]}, "aware"),
        ({"this_update": datetime(2026, 1, 1)}, "aware"),
        ({"next_update": NOW}, "after"),
        ({"crl_number": -1}, "crl_number"),
        ({"crl_number": 2**159}, "crl_number"),
        ({"delta_of": 1}, "delta_of"),
        ({"delta_of": 0, "delta_url": "http://x/d.crl"}, "delta_url"),
        ({"shard": "eu"}, "crl_url"),
    ],
)
def test_bad_input_refused(pki: Pki, kw: dict[str, object], why: str) -> None:
    args: dict[str, object] = dict(
        issuer_cert=pki.ca.issuing, issuer_key=pki.key, revoked=[], crl_number=1, this_update=NOW, next_update=LATER
    )
    args.update(kw)
    with pytest.raises(ValueError, match=why):
        build_crl(**args)  # type: ignore[arg-type]


def test_remove_from_crl_allowed_in_a_delta(pki: Pki) -> None:
    crl, _ = pki.crl("delta", [(5, NOW, RevocationReason.REMOVE_FROM_CRL)], crl_number=2, delta_of=1)
    entry = crl.get_revoked_certificate_by_serial_number(5)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is x509.ReasonFlags.remove_from_crl
