"""PKCS#11 CA keys against a real SoftHSM2 token, checked with the real ``openssl`` CLI."""

from __future__ import annotations

import copy
import datetime as dt
import pickle
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pkcs11
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import broker_plugin.ca.pkcs11 as hsm
from broker_plugin.ca.pkcs11 import HsmEcPrivateKey, HsmError, HsmSession, find_key, find_module, generate_ec_key
from broker_plugin.ca.signers import SignerError, open_signer, signature_hash
from fixtures_hsm import SoftHsmToken

pytestmark = pytest.mark.softhsm

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
HASH_FOR = {"p256": hashes.SHA256, "p384": hashes.SHA384}
CURVE_FOR = {"p256": ec.SECP256R1, "p384": ec.SECP384R1}


@pytest.fixture
def session(softhsm_token: SoftHsmToken) -> Iterator[HsmSession]:
    with HsmSession.open(module=softhsm_token.module, token_label=softhsm_token.label, pin=softhsm_token.user_pin) as s:
        yield s


def _label() -> str:
    return f"ca-{uuid.uuid4().hex[:12]}"


def _openssl() -> str:
    exe = shutil.which("openssl")
    if exe is None:
        pytest.fail("openssl CLI not on PATH; install openssl: the test command does this", pytrace=False)
    return exe


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _root(key: ec.EllipticCurvePrivateKey, cn: str = "certmq HSM root") -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=5))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, signature_hash(key))
    )


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, device: str) -> x509.Certificate:
    device_key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(_name(device))
        .issuer_name(ca.subject)
        .public_key(device_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=5))
        .not_valid_after(NOW + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, signature_hash(ca_key))
    )


def _write(path: Path, obj: x509.Certificate | x509.CertificateRevocationList) -> Path:
    path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    return path


def _openssl_verify(ca_file: Path, cert_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_openssl(), "verify", "-no-CApath", "-CAfile", str(ca_file), str(cert_file)], capture_output=True, text=True
    )


@pytest.mark.parametrize("curve", ["p256", "p384"])
def test_generated_key_stays_on_the_token(session: HsmSession, curve: str) -> None:
    key = generate_ec_key(session, _label(), curve)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, CURVE_FOR[curve])
    assert key.key_size == CURVE_FOR[curve]().key_size
    assert isinstance(signature_hash(key), HASH_FOR[curve])

    with session.lock:
        raw = session.raw.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label=key.label)
        assert raw[pkcs11.Attribute.EXTRACTABLE] is False
        assert raw[pkcs11.Attribute.SENSITIVE] is True
        assert raw[pkcs11.Attribute.NEVER_EXTRACTABLE] is True
        assert raw[pkcs11.Attribute.ALWAYS_SENSITIVE] is True
        assert raw[pkcs11.Attribute.TOKEN] is True
        with pytest.raises(pkcs11.AttributeSensitive):
            raw[pkcs11.Attribute.VALUE]

    with pytest.raises(HsmError, match="not possible with an HSM key"):
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(HsmError, match="not possible with an HSM key"):
        key.private_numbers()
    with pytest.raises(HsmError, match="not possible with an HSM key"):
        key.exchange(ec.ECDH(), ec.generate_private_key(key.curve).public_key())
    with pytest.raises(HsmError, match="cannot be pickled"):
        pickle.dumps(key)
    assert copy.copy(key) is key and copy.deepcopy(key) is key


def test_found_key_is_the_generated_key(session: HsmSession) -> None:
    made = generate_ec_key(session, _label(), "p256")
    found = find_key(session, made.label)
    assert found.public_key() == made.public_key()
    signature = found.sign(b"payload", ec.ECDSA(hashes.SHA256()))
    made.public_key().verify(signature, b"payload", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        made.public_key().verify(signature, b"other payload", ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("curve", ["p256", "p384"])
def test_hsm_signed_certificates_and_crl_verify_with_openssl(session: HsmSession, curve: str, tmp_path: Path) -> None:
    key = generate_ec_key(session, _label(), curve)
    root = _root(key)
    leaf = _leaf(key, root, "device-0001")

    # cryptography agrees ...
    root.verify_directly_issued_by(root)
    leaf.verify_directly_issued_by(root)
    assert isinstance(leaf.signature_hash_algorithm, HASH_FOR[curve])

    # ... and so does OpenSSL, for the self-signed root and for a certificate it issued
    root_pem = _write(tmp_path / "root.pem", root)
    for cert_file in (root_pem, _write(tmp_path / "leaf.pem", leaf)):
        proc = _openssl_verify(root_pem, cert_file)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.strip() == f"{cert_file}: OK"

    # a CRL signed on the token verifies against the root
    revoked = x509.RevokedCertificateBuilder().serial_number(leaf.serial_number).revocation_date(NOW).build()
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(root.subject)
        .last_update(NOW)
        .next_update(NOW + dt.timedelta(days=1))
        .add_revoked_certificate(revoked)
        .sign(key, signature_hash(key))
    )
    assert crl.is_signature_valid(key.public_key())
    proc = subprocess.run(
        [_openssl(), "crl", "-in", str(_write(tmp_path / "crl.pem", crl)), "-CAfile", str(root_pem), "-noout"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verify OK" in proc.stdout + proc.stderr


def test_openssl_rejects_a_leaf_under_the_wrong_root(session: HsmSession, tmp_path: Path) -> None:
    # the same check must be able to fail: a leaf from one HSM key is not trusted under another root
    key_a = generate_ec_key(session, _label(), "p256")
    key_b = generate_ec_key(session, _label(), "p256")
    root_a, root_b = _root(key_a), _root(key_b)  # same subject name on purpose
    leaf = _leaf(key_a, root_a, "device-0002")
    proc = _openssl_verify(_write(tmp_path / "root_b.pem", root_b), _write(tmp_path / "leaf.pem", leaf))
    assert proc.returncode != 0
    with pytest.raises(InvalidSignature):
        leaf.verify_directly_issued_by(root_b)


def test_open_signer_pkcs11_uri(session: HsmSession, softhsm_token: SoftHsmToken, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = generate_ec_key(session, _label(), "p384")

    key = open_signer(softhsm_token.uri(made.label), passphrase=softhsm_token.user_pin.encode())
    assert isinstance(key, HsmEcPrivateKey)
    try:
        assert key.public_key() == made.public_key()
        cert = _root(key, "opened by uri")
        cert.verify_directly_issued_by(cert)
    finally:
        key.close()

    pin_file = tmp_path / "pin"
    pin_file.write_text(softhsm_token.user_pin + "\n")
    pin_file.chmod(0o600)
    key = open_signer(f"{softhsm_token.uri(made.label)}&pin-source=file:{pin_file}", passphrase=None)
    assert isinstance(key, HsmEcPrivateKey)
    assert key.public_key() == made.public_key()
    key.close()

    monkeypatch.setenv("CERTMQ_TEST_HSM_PIN", softhsm_token.user_pin)
    key = open_signer(f"pkcs11:token={softhsm_token.label};object={made.label}?pin-source=env:CERTMQ_TEST_HSM_PIN", passphrase=None)
    assert isinstance(key, HsmEcPrivateKey)
    assert key.public_key() == made.public_key()
    key.close()

    with pytest.raises(HsmError, match="no EC private key labelled 'no-such-key'"):
        open_signer(softhsm_token.uri("no-such-key"), passphrase=softhsm_token.user_pin.encode())


def test_wrong_pin_is_a_clear_error(softhsm_token: SoftHsmToken) -> None:
    # nobody in this process is logged in here, so the token itself judges the PIN
    assert not hsm._registry
    with pytest.raises(HsmError, match="wrong user PIN for PKCS#11 token 'certmq-test'"):
        HsmSession.open(module=softhsm_token.module, token_label=softhsm_token.label, pin="0000-wrong")
    with pytest.raises(SignerError, match="wrong user PIN"):
        open_signer(softhsm_token.uri("anything"), passphrase=b"0000-wrong")
    assert not hsm._registry


def test_wrong_pin_while_logged_in_is_still_refused(session: HsmSession, softhsm_token: SoftHsmToken) -> None:
    # PKCS#11 login is per process: a second handle must not ride on the first one's login
    with pytest.raises(HsmError, match="wrong user PIN"):
        HsmSession.open(module=softhsm_token.module, token_label=softhsm_token.label, pin="0000-wrong")


def test_unknown_token_and_module(softhsm_token: SoftHsmToken, tmp_path: Path) -> None:
    with pytest.raises(HsmError, match=r"no token labelled 'nope'.*certmq-test"):
        HsmSession.open(module=softhsm_token.module, token_label="nope", pin=softhsm_token.user_pin)
    with pytest.raises(HsmError, match="does not exist"):
        find_module(tmp_path / "libnothing.so")
    assert find_module(None).name == "libsofthsm2.so"


def test_generation_refuses_duplicates_and_bad_curves(session: HsmSession) -> None:
    label = _label()
    generate_ec_key(session, label, "p256")
    with pytest.raises(HsmError, match="already exists"):
        generate_ec_key(session, label, "p384")
    assert isinstance(find_key(session, label).curve, ec.SECP256R1)  # the original is untouched
    with pytest.raises(HsmError, match="unsupported curve 'p521'"):
        generate_ec_key(session, _label(), "p521")


def test_closing_one_handle_keeps_the_other_logged_in(session: HsmSession, softhsm_token: SoftHsmToken) -> None:
    key = generate_ec_key(session, _label(), "p256")
    second = HsmSession.open(module=softhsm_token.module, token_label=softhsm_token.label, pin=softhsm_token.user_pin)
    second.close()
    second.close()  # idempotent
    key.public_key().verify(key.sign(b"still here", ec.ECDSA(hashes.SHA256())), b"still here", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(HsmError, match="is closed"):
        find_key(second, key.label)


def test_signing_from_many_threads(session: HsmSession) -> None:
    key = generate_ec_key(session, _label(), "p256")
    results: list[tuple[bytes, bytes]] = []
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(40):
                msg = f"thread {n} message {i}".encode()
                results.append((msg, key.sign(msg, ec.ECDSA(hashes.SHA256()))))
        except BaseException as exc:  # collected and re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 8 * 40
    for msg, sig in results:
        key.public_key().verify(sig, msg, ec.ECDSA(hashes.SHA256()))


def test_non_ecdsa_and_deterministic_requests_are_refused(session: HsmSession) -> None:
    key = generate_ec_key(session, _label(), "p256")
    with pytest.raises(HsmError, match="deterministic"):
        key.sign(b"x", ec.ECDSA(hashes.SHA256(), deterministic_signing=True))


@pytest.mark.parametrize("curve", ["p256", "p384"])
def test_issuer_on_a_token_key_signs_its_template_certificates_on_the_token(
    session: HsmSession, curve: str, tmp_path: Path
) -> None:
    """An Issuer over a token EC key builds certificates from its DER template and has the token
    sign them (the same sign(data, ECDSA(hash)) call CertificateBuilder makes): the TBS is the
    builder's, and openssl verifies the result."""
    from broker_plugin.ca.authority import create_tenant_ca
    from broker_plugin.ca.issuer import Issuer
    from broker_plugin.ca.policy import TenantPolicy
    from protocol.codes import Profile

    key = generate_ec_key(session, _label(), curve)
    ca = create_tenant_ca(tenant="acme", root_key=ec.generate_private_key(ec.SECP384R1()), issuing_key=key, now=NOW)
    policy = TenantPolicy(name="acme", crl_url="http://crl.example/certmq")
    fast = Issuer(ca_certificate=ca.issuing, ca_key=key, tenant_policy=policy)
    slow = Issuer(ca_certificate=ca.issuing, ca_key=key, tenant_policy=policy)
    slow._template_ok = False
    assert fast._template_ok
    device_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    args = dict(device_id="sensor-9", profile=Profile.IDENTITY, public_key=device_key, serial=77, not_before=NOW,
                status_position=(1, 2), region="eu-west", capabilities=("telemetry",))
    signed = fast.issue_der(**args)  # type: ignore[arg-type]
    cert = x509.load_der_x509_certificate(signed.der)
    assert cert.tbs_certificate_bytes == slow.issue(**args).tbs_certificate_bytes  # type: ignore[arg-type]
    assert isinstance(cert.signature_hash_algorithm, HASH_FOR[curve])
    cert.verify_directly_issued_by(ca.issuing)
    chain = tmp_path / "chain.pem"
    chain.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (ca.issuing, ca.root)))
    proc = _openssl_verify(chain, _write(tmp_path / "leaf.pem", cert))
    assert proc.returncode == 0, proc.stdout + proc.stderr
