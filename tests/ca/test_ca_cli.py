"""``certmq ca ...`` and ``certmq audit ...`` as an operator runs them: the installed script in a
subprocess, on a temporary data directory, outputs checked with the real openssl."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from broker_plugin.store.audit import AuditEntry, verify_chain
from fixtures_hsm import SoftHsmToken

CERTMQ = shutil.which("certmq", path=str(Path(sys.executable).parent))
PASS = "cli-test-passphrase"


def certmq(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert CERTMQ, "the certmq console script is not installed in this environment (pip install -e .)"
    full_env = {**os.environ, "CERTMQ_CA_PASS": PASS, **(env or {})}
    return subprocess.run([CERTMQ, *map(str, args)], capture_output=True, text=True, timeout=180, env=full_env)


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("openssl")
    if exe is None:
        pytest.fail("openssl CLI not on PATH; the test command installs it (apt-get install openssl)", pytrace=False)
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=60)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result.stdout


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def acme(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory with tenant acme (P-256 file keys), made by `certmq ca init`."""
    data = tmp_path_factory.mktemp("cli") / "data"
    ok(certmq("ca", "init", "--tenant", "acme", "--passphrase-env", "CERTMQ_CA_PASS", "--data", data))
    return data


def test_init_prints_the_fingerprint_and_chain_that_openssl_sees(tmp_path: Path) -> None:
    data = tmp_path / "data"
    out = ok(certmq("ca", "init", "--tenant", "beta", "--algorithm", "p384", "--passphrase-env", "CERTMQ_CA_PASS",
                    "--data", data))
    tdir = data / "tenants" / "beta"
    fp = openssl("x509", "-in", tdir / "root.pem", "-noout", "-fingerprint", "-sha256").stdout.strip().split("=", 1)[1]
    assert f"root fingerprint (SHA-256): {fp}" in out
    assert str(tdir / "chain.pem") in out and str(tdir / "issuing.key.pem") in out
    assert "OK" in ok(openssl("verify", "-x509_strict", "-CAfile", tdir / "root.pem", tdir / "issuing.pem"))
    for key in ("root.key.pem", "issuing.key.pem"):
        assert (tdir / key).read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY")
        assert openssl("pkey", "-in", tdir / key, "-passin", "pass:wrong", "-noout").returncode != 0
        assert ok(openssl("pkey", "-in", tdir / key, "-passin", f"pass:{PASS}", "-noout")) == ""
    listing = ok(certmq("ca", "list", "--data", data))
    assert listing.startswith("beta\tp384") and fp in listing


def test_init_ml_dsa_and_passphrase_file(tmp_path: Path) -> None:
    secret = tmp_path / "pass"
    secret.write_text(PASS + "\n")
    secret.chmod(0o600)
    ok(certmq("ca", "init", "--tenant", "pq", "--algorithm", "ml-dsa-44", "--passphrase-file", secret, "--data", tmp_path / "d"))
    root = x509.load_pem_x509_certificate((tmp_path / "d/tenants/pq/root.pem").read_bytes())
    assert root.signature_algorithm_oid.dotted_string == "2.16.840.1.101.3.4.3.17"  # id-ml-dsa-44
    secret.chmod(0o644)
    bad = certmq("ca", "init", "--tenant", "pq2", "--passphrase-file", secret, "--data", tmp_path / "d")
    assert bad.returncode == 1 and "chmod 600" in bad.stderr
    assert not (tmp_path / "d/tenants/pq2").exists()


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (("ca", "init", "--tenant", "acme", "--passphrase-env", "CERTMQ_CA_PASS"), 1, "already exists"),
        (("ca", "init", "--tenant", "new", "--passphrase-env", "NOT_SET_ANYWHERE"), 1, "NOT_SET_ANYWHERE is not set"),
        (("ca", "init", "--tenant", "new"), 1, "passphrase is needed"),
        (("ca", "init", "--tenant", "new", "--algorithm", "rsa"), 2, "invalid choice"),
        (("ca", "init", "--tenant", "bad/name", "--passphrase-env", "CERTMQ_CA_PASS"), 1, "bad tenant name"),
        (("ca", "policy", "set", "--tenant", "ghost", "--file", "/dev/null"), 1, "no tenant 'ghost'"),
        (("ca", "revoke", "--tenant", "acme", "--serial", "zz", "--reason", "keyCompromise"), 2, "not hexadecimal"),
        (("ca", "revoke", "--tenant", "acme", "--serial", "01", "--reason", "becauseISaidSo"), 2, "invalid choice"),
        (("ca", "sign-batch", "--tenant", "acme", "--dir", "/nonexistent", "--out", "/tmp/x"), 2, "not a directory"),
        (("ca", "claim", "add", "--tenant", "acme", "--claim-id", "c", "--pattern", "s-*", "--max-uses", "1",
          "--until", "someday", "--out", "/tmp/x"), 2, "not a date"),
        (("ca", "claim", "add", "--tenant", "acme", "--claim-id", "c", "--pattern", "s-*", "--max-uses", "1",
          "--until", "2001-01-01", "--out", "/tmp/x"), 2, "in the past"),
    ],
)
def test_bad_input_is_refused_clearly_and_changes_nothing(acme: Path, args: tuple[str, ...], status: int, message: str) -> None:
    before = snapshot(acme)
    result = certmq(*args, "--data", acme)
    assert result.returncode == status, result.stdout + result.stderr
    assert message in result.stderr
    assert snapshot(acme) == before


def test_bad_policy_file_names_the_field_and_creates_nothing(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('[profiles.identity]\nrenewal_window = [0.9, 0.2]\n')
    result = certmq("ca", "init", "--tenant", "t", "--passphrase-env", "CERTMQ_CA_PASS", "--policy", policy, "--data", tmp_path / "d")
    assert result.returncode == 1
    assert f"{policy}: invalid tenant policy" in result.stderr
    assert "profiles.identity.renewal_window: must satisfy" in result.stderr
    assert not (tmp_path / "d").exists()


def test_missing_data_directory(tmp_path: Path) -> None:
    for args in (("ca", "list"), ("audit", "verify")):
        result = certmq(*args, "--data", tmp_path / "none")
        assert result.returncode == 1 and "does not exist" in result.stderr
    assert not (tmp_path / "none").exists()


def test_policy_set_is_audited(tmp_path: Path) -> None:
    data = tmp_path / "d"
    ok(certmq("ca", "init", "--tenant", "acme", "--passphrase-env", "CERTMQ_CA_PASS", "--data", data))
    policy = tmp_path / "new.toml"
    policy.write_text('[key_policy]\nallowed = ["p256"]\n')
    assert "keys: p256" in ok(certmq("ca", "policy", "set", "--tenant", "acme", "--file", policy, "--data", data))
    assert (data / "tenants/acme/policy.toml").read_text() == policy.read_text()
    lines = ok(certmq("audit", "export", "--data", data)).splitlines()
    assert [json.loads(line)["details"]["action"] for line in lines] == ["init", "set"]


# -- the audit trail ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory with four audit entries."""
    data = tmp_path_factory.mktemp("audit") / "data"
    ok(certmq("ca", "init", "--tenant", "acme", "--passphrase-env", "CERTMQ_CA_PASS", "--data", data))
    ok(certmq("ca", "init", "--tenant", "beta", "--passphrase-env", "CERTMQ_CA_PASS", "--data", data))
    for allowed in ("p256", "p384"):
        policy = data.parent / f"{allowed}.toml"
        policy.write_text(f'[key_policy]\nallowed = ["{allowed}"]\n')
        ok(certmq("ca", "policy", "set", "--tenant", "acme", "--file", policy, "--data", data))
    return data


def test_audit_verify_and_export_of_an_intact_trail(audited: Path, tmp_path: Path) -> None:
    assert ok(certmq("audit", "verify", "--data", audited)).startswith("audit trail OK: 4 entries")
    out = tmp_path / "audit.jsonl"
    ok(certmq("audit", "export", "--out", out, "--data", audited))
    entries = [AuditEntry.from_json(json.loads(line)) for line in out.read_text().splitlines()]
    assert [e.seq for e in entries] == [1, 2, 3, 4]
    assert verify_chain(entries)  # anyone can re-check an export


TAMPERING = [
    ("edited", ["UPDATE audit_log SET details = '{\"action\":\"nothing to see\"}' WHERE seq = 3"], 3),
    ("edited", ["UPDATE audit_log SET actor = 'mallory' WHERE seq = 2"], 2),
    ("deleted", ["DELETE FROM audit_log WHERE seq = 2"], 2),
    ("reordered", ["UPDATE audit_log SET seq = -1 WHERE seq = 2", "UPDATE audit_log SET seq = 2 WHERE seq = 3",
                   "UPDATE audit_log SET seq = 3 WHERE seq = -1"], 2),
    ("truncated", ["DELETE FROM audit_log WHERE seq = 4"], 4),
]


@pytest.mark.parametrize(("problem", "statements", "seq"), TAMPERING, ids=[f"{p}-{s[0][:20]}" for p, s, _ in TAMPERING])
def test_audit_verify_pinpoints_tampering_in_the_sqlite_file(audited: Path, tmp_path: Path, problem: str,
                                                             statements: list[str], seq: int) -> None:
    data = tmp_path / "data"
    shutil.copytree(audited, data)
    conn = sqlite3.connect(data / "registry.db")
    with conn:
        for sql in statements:
            conn.execute(sql)
    conn.close()
    result = certmq("audit", "verify", "--data", data)
    assert result.returncode == 1, result.stdout
    assert f"audit trail BROKEN at seq {seq}: {problem}" in result.stderr


# -- HSM ----------------------------------------------------------------------------------


@pytest.mark.softhsm
def test_init_with_keys_on_a_softhsm_token(tmp_path: Path, softhsm_token: SoftHsmToken) -> None:
    data = tmp_path / "d"
    uri = softhsm_token.uri("cli-issuing")
    env = {"HSM_PIN": softhsm_token.user_pin, "SOFTHSM2_CONF": str(softhsm_token.conf)}
    out = ok(certmq("ca", "init", "--tenant", "hsm", "--pkcs11-uri", uri, "--passphrase-env", "HSM_PIN", "--data", data, env=env))
    assert f"issuing CA key: {uri}" in out
    tdir = data / "tenants/hsm"
    assert not list(tdir.glob("*.key.pem"))  # the keys stay on the token
    assert "OK" in ok(openssl("verify", "-x509_strict", "-CAfile", tdir / "root.pem", tdir / "issuing.pem"))
    assert "key_uri" in (tdir / "tenant.toml").read_text()
    again = certmq("ca", "init", "--tenant", "hsm2", "--algorithm", "ml-dsa-44", "--pkcs11-uri", uri,
                   "--passphrase-env", "HSM_PIN", "--data", data, env=env)
    assert again.returncode == 1 and "p256 or p384" in again.stderr
    wrong = certmq("ca", "init", "--tenant", "hsm3", "--pkcs11-uri", softhsm_token.uri("other"),
                   "--passphrase-env", "HSM_PIN", "--data", data, env={**env, "HSM_PIN": "0000"})
    assert wrong.returncode == 1 and "PIN" in wrong.stderr
    assert not (data / "tenants/hsm3").exists()


# -- issuing commands (through the CA service core) ---------------------------------------


def _csr_file(path: Path, cn: str, *, pem: bool, key: object | None = None) -> None:
    key = key or ec.generate_private_key(ec.SECP256R1())
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, algorithm))  # type: ignore[arg-type]
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM if pem else serialization.Encoding.DER))


def _verify_chain(data: Path, tenant: str, cert: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    tdir = data / "tenants" / tenant
    return openssl("verify", "-x509_strict", *extra, "-CAfile", tdir / "root.pem", "-untrusted", tdir / "issuing.pem", cert)


@pytest.fixture
def factory(tmp_path: Path) -> Path:
    """A fresh data directory with tenant acme whose policy refuses Ed25519 keys."""
    data = tmp_path / "data"
    policy = tmp_path / "acme.toml"
    policy.write_text('[key_policy]\nallowed = ["p256", "p384"]\n')
    ok(certmq("ca", "init", "--tenant", "acme", "--policy", policy, "--passphrase-env", "CERTMQ_CA_PASS", "--data", data))
    return data


def test_sign_batch_from_a_directory(factory: Path, tmp_path: Path) -> None:
    csrs = tmp_path / "csrs"
    csrs.mkdir()
    for i in range(6):
        _csr_file(csrs / f"sensor-{i}.csr", f"sensor-{i}", pem=bool(i % 2))
    _csr_file(csrs / "sensor-7.csr", "sensor-8", pem=True)  # names another device
    _csr_file(csrs / "sensor-9.csr", "sensor-9", pem=False, key=ed25519.Ed25519PrivateKey.generate())  # key refused
    (csrs / "sensor-10.csr").write_bytes(b"garbage")
    out = tmp_path / "certs"
    result = certmq("ca", "sign-batch", "--tenant", "acme", "--profile", "identity", "--dir", csrs, "--out", out,
                    "--passphrase-env", "CERTMQ_CA_PASS", "--data", factory)
    assert result.returncode == 1, result.stderr  # some were refused
    assert "signed 6 of 9" in result.stdout
    manifest = {e["device_id"]: e for e in json.loads((out / "manifest.json").read_text())}
    assert len(manifest) == 9
    for device in (f"sensor-{i}" for i in range(6)):
        entry = manifest[device]
        assert entry["status"] == "issued" and entry["error"] is None
        pem = out / f"{device}.pem"
        assert "OK" in ok(_verify_chain(factory, "acme", pem, "-purpose", "sslclient"))
        cert = x509.load_pem_x509_certificate(pem.read_bytes())
        assert f"{cert.serial_number:x}" == entry["serial"]
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device
        assert cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ") == entry["not_after"]
    assert "IDENTITY_MISMATCH" in manifest["sensor-7"]["error"]
    assert "KEY_REJECTED" in manifest["sensor-9"]["error"]
    assert "BAD_CSR" in manifest["sensor-10"]["error"]
    assert not any((out / f"{d}.pem").exists() for d in ("sensor-7", "sensor-9", "sensor-10"))
    assert "refused sensor-7" in result.stdout

    # recorded like any issuance: kind factory, one audit entry each, and the chain intact
    conn = sqlite3.connect(factory / "registry.db")
    kinds = conn.execute("SELECT kind, count(*) FROM certificates GROUP BY kind").fetchall()
    issues = conn.execute("SELECT count(*) FROM audit_log WHERE kind = 'issue'").fetchone()[0]
    conn.close()
    assert kinds == [("factory", 6)] and issues == 6
    assert ok(certmq("audit", "verify", "--data", factory)).startswith("audit trail OK")


def test_sign_batch_from_a_manifest_with_progress_and_workers(factory: Path, tmp_path: Path) -> None:
    csrs = tmp_path / "in"
    csrs.mkdir()
    entries = []
    for i in range(120):
        _csr_file(csrs / f"x{i}.der", f"line-{i}", pem=False)
        entries.append({"device_id": f"line-{i}", "csr_path": f"in/x{i}.der"})
    manifest = tmp_path / "batch.json"
    manifest.write_text(json.dumps(entries))
    out = tmp_path / "out"
    result = certmq("ca", "sign-batch", "--tenant", "acme", "--manifest", manifest, "--out", out, "--workers", "2",
                    "--passphrase-env", "CERTMQ_CA_PASS", "--data", factory)
    assert ok(result).startswith("signed 120 of 120")
    assert "120/120 processed" in result.stderr
    written = json.loads((out / "manifest.json").read_text())
    assert [e["device_id"] for e in written] == [e["device_id"] for e in entries]
    assert len({e["serial"] for e in written}) == 120
    assert "OK" in ok(_verify_chain(factory, "acme", out / "line-119.pem"))


@pytest.mark.parametrize(
    ("content", "message"),
    [("{}", "non-empty JSON list"), ("[{\"device_id\": 1}]", "entry 0 needs"), ("nope", "not valid JSON"),
     ('[{"device_id": "a", "csr_path": "a.csr"}, {"device_id": "a", "csr_path": "b.csr"}]', "appears twice")],
)
def test_sign_batch_bad_manifest_signs_nothing(factory: Path, tmp_path: Path, content: str, message: str) -> None:
    manifest = tmp_path / "m.json"
    manifest.write_text(content)
    before = snapshot(factory)
    result = certmq("ca", "sign-batch", "--tenant", "acme", "--manifest", manifest, "--out", tmp_path / "o",
                    "--passphrase-env", "CERTMQ_CA_PASS", "--data", factory)
    assert result.returncode == 2 and message in result.stderr
    assert snapshot(factory) == before and not (tmp_path / "o").exists()


def test_sign_batch_wrong_passphrase_signs_nothing(factory: Path, tmp_path: Path) -> None:
    csrs = tmp_path / "c"
    csrs.mkdir()
    _csr_file(csrs / "a.csr", "a", pem=True)
    before = snapshot(factory)
    result = certmq("ca", "sign-batch", "--tenant", "acme", "--dir", csrs, "--out", tmp_path / "o",
                    "--passphrase-env", "CERTMQ_CA_PASS", "--data", factory, env={"CERTMQ_CA_PASS": "wrong"})
    assert result.returncode == 1 and "wrong passphrase" in result.stderr
    assert snapshot(factory) == before and not (tmp_path / "o").exists()


def test_claim_add_registers_the_claim_and_mints_a_bootstrap_credential(factory: Path, tmp_path: Path) -> None:
    out = tmp_path / "bootstrap"
    text = ok(certmq("ca", "claim", "add", "--tenant", "acme", "--claim-id", "line-3", "--pattern", "sensor-*",
                     "--max-uses", "25", "--until", "2099-12-31", "--out", out,
                     "--passphrase-env", "CERTMQ_CA_PASS", "--data", factory))
    assert "at most 25 use(s)" in text and "until 2099-12-31T23:59:59Z" in text
    key = out / "line-3.key.pem"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert "OK" in ok(openssl("verify", "-x509_strict", "-CAfile", out / "chain.pem", out / "line-3.pem"))
    cert = x509.load_pem_x509_certificate((out / "line-3.pem").read_bytes())
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    assert cert.public_key() == private.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "line-3"
    conn = sqlite3.connect(factory / "registry.db")
    (policy,) = conn.execute("SELECT policy FROM claims WHERE claim_id = 'line-3'").fetchone()
    (kind,) = conn.execute("SELECT kind FROM certificates").fetchone()
    conn.close()
    assert json.loads(policy)["pattern"] == "sensor-*" and json.loads(policy)["max_uses"] == 25
    assert kind == "bootstrap"
    again = certmq("ca", "claim", "add", "--tenant", "acme", "--claim-id", "line-4", "--devices", "a,b", "--max-uses", "2",
                   "--until", "2099-01-01", "--out", out, "--passphrase-env", "CERTMQ_CA_PASS", "--data", factory)
    assert again.returncode == 2 and "not an empty directory" in again.stderr


def test_revoke_and_crls_checked_by_openssl(factory: Path, tmp_path: Path) -> None:
    csrs = tmp_path / "csrs"
    csrs.mkdir()
    for name in ("d1", "d2", "d3"):
        _csr_file(csrs / f"{name}.csr", name, pem=True)
    certs = tmp_path / "certs"
    ok(certmq("ca", "sign-batch", "--tenant", "acme", "--dir", csrs, "--out", certs, "--passphrase-env", "CERTMQ_CA_PASS", "--data", factory))
    serial = json.loads((certs / "manifest.json").read_text())[0]["serial"]
    key = ("--passphrase-env", "CERTMQ_CA_PASS", "--data", factory)

    full = tmp_path / "full.crl"
    ok(certmq("ca", "crl", "--tenant", "acme", "--out", full, *key))
    chain = factory / "tenants/acme/chain.pem"

    def crl_verifies(path: Path) -> bool:
        check = openssl("crl", "-in", path, "-inform", "DER", "-CAfile", chain, "-noout")
        return check.returncode == 0 and "verify ok" in (check.stdout + check.stderr).lower()

    assert crl_verifies(full)

    assert serial in ok(certmq("ca", "revoke", "--tenant", "acme", "--serial", serial, "--reason", "keyCompromise", *key))
    assert "revoked" in ok(certmq("ca", "revoke", "--tenant", "acme", "--device", "d2", "--profile", "identity", "--reason", "superseded", *key))
    nothing = certmq("ca", "revoke", "--tenant", "acme", "--device", "d2", "--reason", "superseded", *key)
    assert nothing.returncode == 1 and "nothing to revoke" in nothing.stdout
    unknown = certmq("ca", "revoke", "--tenant", "acme", "--serial", "abcdef", "--reason", "superseded", *key)
    assert unknown.returncode == 1 and "UNKNOWN_CERTIFICATE" in unknown.stderr

    delta = tmp_path / "delta.crl"
    ok(certmq("ca", "crl", "--tenant", "acme", "--delta", "--out", delta, *key))
    ok(certmq("ca", "crl", "--tenant", "acme", "--out", full, *key))
    pem = tmp_path / "full.pem"
    ok(openssl("crl", "-in", full, "-inform", "DER", "-out", pem))
    text = ok(openssl("crl", "-in", delta, "-inform", "DER", "-noout", "-text"))
    assert "Delta CRL Indicator" in text and serial.upper().lstrip("0")[:8] in text.upper().replace(":", "")
    assert crl_verifies(full) and crl_verifies(delta)
    tdir = factory / "tenants/acme"
    both = tmp_path / "trust.pem"
    both.write_bytes((tdir / "root.pem").read_bytes() + (tdir / "issuing.pem").read_bytes())
    revoked = openssl("verify", "-crl_check", "-CAfile", both, "-CRLfile", pem, certs / "d1.pem")
    assert revoked.returncode != 0 and "revoked" in (revoked.stdout + revoked.stderr).lower()
    assert "OK" in ok(openssl("verify", "-crl_check", "-CAfile", both, "-CRLfile", pem, certs / "d3.pem"))
    assert ok(certmq("audit", "verify", "--data", factory)).startswith("audit trail OK")
