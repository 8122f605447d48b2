"""CA signing keys: generation, the encrypted file backend, passphrase sources, signer URIs.

Real cryptography and the real ``openssl`` CLI. OpenSSL 3.0 (Debian 12) cannot read ML-DSA
keys, so ML-DSA files and signatures are checked with cryptography only.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, rsa
from cryptography.x509.oid import NameOID

import broker_plugin.ca.signers as signers
from broker_plugin.ca.signers import (
    KeyAlgorithm,
    SignerError,
    generate_private_key,
    key_algorithm,
    load_encrypted_key,
    open_signer,
    resolve_passphrase,
    save_encrypted_key,
    signature_hash,
)
from protocol.errors import CertmqError

PASS = b"correct horse battery staple"
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
OPENSSL_ALGS = [KeyAlgorithm.P256, KeyAlgorithm.P384, KeyAlgorithm.ED25519]
MLDSA_ALGS = [KeyAlgorithm.ML_DSA_44, KeyAlgorithm.ML_DSA_65]


def _openssl() -> str:
    exe = shutil.which("openssl")
    if exe is None:
        pytest.fail("openssl CLI not on PATH; install openssl: the test command does this", pytrace=False)
    return exe


def _self_signed(key: signers.CaPrivateKey, cn: str = "certmq test CA") -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, signature_hash(key))
    )


def _crl(key: signers.CaPrivateKey, issuer: x509.Certificate) -> x509.CertificateRevocationList:
    revoked = (
        x509.RevokedCertificateBuilder().serial_number(12345).revocation_date(NOW + dt.timedelta(hours=1)).build()
    )
    return (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(NOW + dt.timedelta(hours=2))
        .next_update(NOW + dt.timedelta(days=7))
        .add_revoked_certificate(revoked)
        .sign(key, signature_hash(key))
    )


def _pub(key: signers.CaPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_all_is_complete_and_resolvable() -> None:
    public = {n for n in vars(signers) if not n.startswith("_") and getattr(getattr(signers, n), "__module__", None) == signers.__name__}
    assert public <= set(signers.__all__)
    for name in signers.__all__:
        assert hasattr(signers, name), name


def test_signer_error_is_a_certmq_error() -> None:
    assert issubclass(SignerError, CertmqError)


@pytest.mark.parametrize("alg", list(KeyAlgorithm))
def test_file_round_trip_signs_a_verifiable_certificate(alg: KeyAlgorithm, tmp_path: Path) -> None:
    key = generate_private_key(alg)
    assert key_algorithm(key) is alg
    path = tmp_path / "ca.pem"
    save_encrypted_key(path, key, PASS)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_bytes()
    assert text.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert b"BEGIN PRIVATE KEY-----" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.pem"]  # no temp file left behind

    loaded = load_encrypted_key(path, PASS)
    assert key_algorithm(loaded) is alg
    assert _pub(loaded) == _pub(key)
    cert = _self_signed(loaded)
    cert.verify_directly_issued_by(cert)
    with pytest.raises(InvalidSignature):  # and not by an unrelated CA with the same name
        cert.verify_directly_issued_by(_self_signed(generate_private_key(alg)))
    # the certificate's key is the original key, so the loaded key really is the same key
    assert cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == (
        key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


@pytest.mark.parametrize("alg", OPENSSL_ALGS)
def test_openssl_needs_the_right_passphrase(alg: KeyAlgorithm, tmp_path: Path) -> None:
    key = generate_private_key(alg)
    path = tmp_path / "ca.pem"
    save_encrypted_key(path, key, PASS)
    openssl = _openssl()

    wrong = subprocess.run([openssl, "pkey", "-in", str(path), "-passin", "pass:wrong", "-pubout"], capture_output=True)
    assert wrong.returncode != 0
    assert b"PUBLIC KEY" not in wrong.stdout

    right = subprocess.run(
        [openssl, "pkey", "-in", str(path), "-passin", f"pass:{PASS.decode()}", "-pubout"], capture_output=True
    )
    assert right.returncode == 0, right.stderr
    assert right.stdout == _pub(key)


@pytest.mark.parametrize("alg", OPENSSL_ALGS)
def test_openssl_verifies_a_file_key_certificate(alg: KeyAlgorithm, tmp_path: Path) -> None:
    key = load_encrypted_key(_saved(tmp_path, alg), PASS)
    root = tmp_path / "root.pem"
    root.write_bytes(_self_signed(key).public_bytes(serialization.Encoding.PEM))
    proc = subprocess.run(
        [_openssl(), "verify", "-no-CApath", "-attime", str(int((NOW + dt.timedelta(days=1)).timestamp())), "-CAfile", str(root), str(root)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("OK")


def _saved(tmp_path: Path, alg: KeyAlgorithm) -> Path:
    path = tmp_path / f"{alg.value}.pem"
    save_encrypted_key(path, generate_private_key(alg), PASS)
    return path


@pytest.mark.parametrize("alg", MLDSA_ALGS)
def test_ml_dsa_ca_signs_certificate_and_crl(alg: KeyAlgorithm, tmp_path: Path) -> None:
    key = load_encrypted_key(_saved(tmp_path, alg), PASS)
    assert signature_hash(key) is None
    cert = _self_signed(key)
    cert.verify_directly_issued_by(cert)
    assert cert.signature_algorithm_oid.dotted_string == {
        KeyAlgorithm.ML_DSA_44: "2.16.840.1.101.3.4.3.17",
        KeyAlgorithm.ML_DSA_65: "2.16.840.1.101.3.4.3.18",
    }[alg]
    crl = _crl(key, cert)
    assert crl.is_signature_valid(key.public_key())
    assert crl.get_revoked_certificate_by_serial_number(12345) is not None
    # and a CRL signed by another ML-DSA key does not verify under this CA
    assert not _crl(generate_private_key(alg), cert).is_signature_valid(key.public_key())


def test_ed25519_and_ec_crls_verify() -> None:
    for alg in (KeyAlgorithm.P256, KeyAlgorithm.P384, KeyAlgorithm.ED25519):
        key = generate_private_key(alg)
        cert = _self_signed(key)
        assert _crl(key, cert).is_signature_valid(key.public_key())


def test_signature_hash_per_key_type() -> None:
    assert isinstance(signature_hash(generate_private_key("p256")), hashes.SHA256)
    assert isinstance(signature_hash(generate_private_key("p384")), hashes.SHA384)
    assert signature_hash(generate_private_key("ed25519")) is None
    assert signature_hash(mldsa.MLDSA44PrivateKey.generate()) is None
    assert signature_hash(mldsa.MLDSA65PrivateKey.generate()) is None
    assert isinstance(signature_hash(rsa.generate_private_key(public_exponent=65537, key_size=2048)), hashes.SHA256)
    with pytest.raises(SignerError, match="cannot sign"):
        signature_hash(object())


def test_unknown_algorithm_and_curve_are_refused() -> None:
    with pytest.raises(SignerError, match="unknown CA key algorithm 'rsa2048'.*p256"):
        generate_private_key("rsa2048")
    with pytest.raises(SignerError, match="secp521r1 is not allowed"):
        key_algorithm(ec.generate_private_key(ec.SECP521R1()))


def test_wrong_passphrase_is_a_clear_error(tmp_path: Path) -> None:
    path = _saved(tmp_path, KeyAlgorithm.P256)
    before = path.read_bytes()
    with pytest.raises(SignerError, match="wrong passphrase"):
        load_encrypted_key(path, b"not the passphrase")
    assert path.read_bytes() == before


def test_plaintext_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.pem"
    path.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(SignerError, match="UNENCRYPTED"):
        load_encrypted_key(path, PASS)


def test_missing_and_non_key_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SignerError, match="does not exist"):
        load_encrypted_key(tmp_path / "nope.pem", PASS)
    (tmp_path / "junk.pem").write_bytes(b"hello")
    with pytest.raises(SignerError, match="not a PEM file"):
        load_encrypted_key(tmp_path / "junk.pem", PASS)
    with pytest.raises(SignerError, match="passphrase is empty"):
        load_encrypted_key(tmp_path / "junk.pem", b"")


def test_empty_passphrase_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(SignerError, match="passphrase is empty"):
        save_encrypted_key(tmp_path / "ca.pem", generate_private_key("p256"), b"")
    assert list(tmp_path.iterdir()) == []


def test_existing_key_is_not_overwritten_unless_asked(tmp_path: Path) -> None:
    path = _saved(tmp_path, KeyAlgorithm.P256)
    before = path.read_bytes()
    other = generate_private_key("p256")
    with pytest.raises(SignerError, match="refusing to overwrite"):
        save_encrypted_key(path, other, PASS)
    assert path.read_bytes() == before
    assert len(list(tmp_path.iterdir())) == 1

    save_encrypted_key(path, other, PASS, overwrite=True)
    assert _pub(load_encrypted_key(path, PASS)) == _pub(other)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_save_into_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SignerError, match="does not exist"):
        save_encrypted_key(tmp_path / "no" / "ca.pem", generate_private_key("p256"), PASS)


def test_saved_mode_ignores_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = _saved(tmp_path, KeyAlgorithm.ED25519)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# --- passphrase sources ----------------------------------------------------------------


def _secret_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "pass"
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_passphrase_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERTMQ_TEST_PASS", "s3cret")
    assert resolve_passphrase(env="CERTMQ_TEST_PASS") == b"s3cret"
    monkeypatch.setenv("CERTMQ_TEST_PASS", "")
    with pytest.raises(SignerError, match="CERTMQ_TEST_PASS is empty"):
        resolve_passphrase(env="CERTMQ_TEST_PASS")
    monkeypatch.delenv("CERTMQ_TEST_PASS")
    with pytest.raises(SignerError, match="CERTMQ_TEST_PASS is not set"):
        resolve_passphrase(env="CERTMQ_TEST_PASS")


def test_passphrase_file_strips_exactly_one_newline(tmp_path: Path) -> None:
    assert resolve_passphrase(file=_secret_file(tmp_path, b"s3cret\n")) == b"s3cret"
    assert resolve_passphrase(file=_secret_file(tmp_path, b"s3cret\r\n")) == b"s3cret"
    assert resolve_passphrase(file=_secret_file(tmp_path, b"s3cret\n\n")) == b"s3cret\n"
    assert resolve_passphrase(file=_secret_file(tmp_path, b" s3cret ")) == b" s3cret "


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_passphrase_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = _secret_file(tmp_path, b"s3cret\n", mode)
    with pytest.raises(SignerError, match=rf"passphrase file .*pass is accessible by group or others \(mode 0{mode:o}\).*chmod 600"):
        resolve_passphrase(file=path)


def test_passphrase_file_errors(tmp_path: Path) -> None:
    with pytest.raises(SignerError, match="passphrase file .* is empty"):
        resolve_passphrase(file=_secret_file(tmp_path, b"\n"))
    with pytest.raises(SignerError, match="passphrase file .* does not exist"):
        resolve_passphrase(file=tmp_path / "missing")
    with pytest.raises(SignerError, match="not a regular file"):
        resolve_passphrase(file=tmp_path)
    with pytest.raises(SignerError, match="exactly one"):
        resolve_passphrase()
    with pytest.raises(SignerError, match="exactly one"):
        resolve_passphrase(env="X", file=tmp_path / "pass")


# --- open_signer -----------------------------------------------------------------------


def test_open_signer_file_uri_forms(tmp_path: Path) -> None:
    path = _saved(tmp_path, KeyAlgorithm.P384)
    expected = _pub(load_encrypted_key(path, PASS))
    assert _pub(open_signer(f"file:{path}", passphrase=PASS)) == expected
    assert _pub(open_signer(f"file://{path}", passphrase=PASS)) == expected
    assert _pub(open_signer(f"file://localhost{path}", passphrase=PASS)) == expected
    with pytest.raises(SignerError, match="remote host"):
        open_signer(f"file://elsewhere{path}", passphrase=PASS)
    with pytest.raises(SignerError, match="no passphrase"):
        open_signer(f"file:{path}", passphrase=None)
    with pytest.raises(SignerError, match="wrong passphrase"):
        open_signer(f"file:{path}", passphrase=b"nope")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "empty signer URI"),
        ("vault:ca", "unsupported signer URI"),
        ("pkcs11:token=t", "must name both token"),
        ("pkcs11:token=t;object=k?pin-value=1234", "pin-value .* refused"),
        ("pkcs11:token=t;object=k;serial=42", "unsupported PKCS#11 URI path attribute"),
        ("pkcs11:token=t;object=k?module-name=softhsm2", "unsupported PKCS#11 URI query attribute"),
        ("pkcs11:token=t;object=k;type=public", "needs type=private"),
        ("pkcs11:token=t;token=u;object=k", "given twice"),
        ("pkcs11:token=t;object", "malformed PKCS#11 URI attribute"),
        ("pkcs11:token=t;object=k", "no user PIN"),
        ("pkcs11:token=t;object=k?pin-source=https://x/pin", "unsupported pin-source"),
    ],
)
def test_bad_signer_uris_are_refused_before_touching_a_token(uri: str, message: str) -> None:
    with pytest.raises(SignerError, match=message):
        open_signer(uri, passphrase=None)
