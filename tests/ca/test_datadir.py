"""The CA data directory: tenants on disk, keys never in plaintext, policies audited in the registry."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, mldsa

from broker_plugin.ca.datadir import (
    DataDirError,
    init_tenant,
    list_tenants,
    load_authorities,
    load_policy_file,
    open_datadir_registry,
    registry_url,
    resolve_datadir,
    set_policy,
)
from broker_plugin.ca.policy import PolicyError
from broker_plugin.ca.signers import SignerError
from protocol.codes import Profile

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
PASS = b"correct horse battery staple"
DOC = Path(__file__).resolve().parents[2] / "docs" / "operating-the-ca.md"


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and "registry.db" not in p.name}


async def _audit(datadir: Path) -> list[object]:
    reg = await open_datadir_registry(datadir)
    try:
        return [e async for e in reg.audit_entries()]
    finally:
        await reg.close()


async def test_init_creates_the_tenant_with_encrypted_keys_and_an_audited_policy(tmp_path: Path) -> None:
    data = tmp_path / "data"
    info = await init_tenant(data, "acme", algorithm="p256", passphrase=PASS, now=NOW)
    t = data / "tenants" / "acme"
    assert {p.name for p in t.iterdir()} == {"tenant.toml", "policy.toml", "root.pem", "issuing.pem", "chain.pem",
                                             "root.key.pem", "issuing.key.pem"}
    for key_file in ("root.key.pem", "issuing.key.pem"):
        text = (t / key_file).read_bytes()
        assert text.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        assert stat.S_IMODE((t / key_file).stat().st_mode) == 0o600
    root = x509.load_pem_x509_certificate((t / "root.pem").read_bytes())
    assert info.root_fingerprint.replace(":", "").lower() == root.fingerprint(__import__("cryptography").hazmat.primitives.hashes.SHA256()).hex()
    assert info.chain_path == t / "chain.pem"
    assert registry_url(data) == f"sqlite:///{(data / 'registry.db').resolve()}"

    authorities = load_authorities(data, passphrase=PASS)
    acme = authorities["acme"]
    assert isinstance(acme.key, ec.EllipticCurvePrivateKey)
    cert = acme.issuer().issue(device_id="d1", profile=Profile.IDENTITY, public_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
                               serial=(1 << 158) | 5, not_before=NOW, status_position=None, region=None, capabilities=None)
    cert.verify_directly_issued_by(acme.issuing)

    reg = await open_datadir_registry(data)
    try:
        assert (await reg.get_tenant("acme")).config == {"name": "acme"}  # type: ignore[union-attr]
        assert await reg.verify_audit()
        (entry,) = [e async for e in reg.audit_entries()]
    finally:
        await reg.close()
    assert (entry.kind, entry.subject, entry.details["action"]) == ("policy", "acme", "init")


async def test_ml_dsa_tenant(tmp_path: Path) -> None:
    await init_tenant(tmp_path / "d", "pq", algorithm="ml-dsa-44", passphrase=PASS, now=NOW)
    pq = load_authorities(tmp_path / "d", passphrase=PASS)["pq"]
    assert isinstance(pq.key, mldsa.MLDSA44PrivateKey)
    assert list_tenants(tmp_path / "d")[0].algorithm == "ml-dsa-44"


async def test_wrong_passphrase_is_named(tmp_path: Path) -> None:
    await init_tenant(tmp_path / "d", "acme", algorithm="p256", passphrase=PASS, now=NOW)
    with pytest.raises(SignerError, match="wrong passphrase"):
        load_authorities(tmp_path / "d", passphrase=b"nope")


async def test_existing_tenant_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    data = tmp_path / "d"
    await init_tenant(data, "acme", algorithm="p256", passphrase=PASS, now=NOW)
    before, audit_before = _snapshot(data), len(await _audit(data))
    with pytest.raises(DataDirError, match="already exists"):
        await init_tenant(data, "acme", algorithm="p384", passphrase=PASS, now=NOW)
    assert _snapshot(data) == before and len(await _audit(data)) == audit_before


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ('[key_policy]\nallowed = ["p521"]\n', ".toml", r"key_policy\.allowed\.0:"),
        ('[profiles.identity]\nlifetime = "forever"\n', ".toml", r"profiles\.identity\.lifetime: 'forever' is not a duration"),
        ('name = "other"\n', ".toml", "but the tenant is 'acme'"),
        ("name = ", ".toml", "not valid TOML"),
        ("{}", ".yaml", "unknown format"),
    ],
)
async def test_bad_policy_file_is_explained_and_nothing_is_created(tmp_path: Path, content: str, suffix: str, message: str) -> None:
    policy = tmp_path / f"p{suffix}"
    policy.write_text(content)
    data = tmp_path / "d"
    with pytest.raises(PolicyError, match=message) as info:
        await init_tenant(data, "acme", algorithm="p256", passphrase=PASS, policy=policy, now=NOW)
    assert str(policy) in str(info.value)
    assert not (data / "tenants" / "acme").exists()


async def test_bad_tenant_name_and_algorithm(tmp_path: Path) -> None:
    with pytest.raises(DataDirError, match="bad tenant name"):
        await init_tenant(tmp_path / "d", "a/b", algorithm="p256", passphrase=PASS, now=NOW)
    with pytest.raises(DataDirError, match="unknown CA key algorithm 'rsa'"):
        await init_tenant(tmp_path / "d", "acme", algorithm="rsa", passphrase=PASS, now=NOW)
    with pytest.raises(DataDirError, match="passphrase is needed"):
        await init_tenant(tmp_path / "d", "acme", algorithm="p256", passphrase=None, now=NOW)
    assert not (tmp_path / "d" / "tenants" / "acme").exists()


async def test_set_policy_is_audited_and_a_bad_one_changes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "d"
    await init_tenant(data, "acme", algorithm="p256", passphrase=PASS, now=NOW)
    good = tmp_path / "new.json"
    good.write_text('{"key_policy": {"allowed": ["p384"]}}')
    await set_policy(data, "acme", good, now=NOW)
    assert load_authorities(data, passphrase=PASS)["acme"].policy.key_policy.allowed == ("p384",)
    assert not (data / "tenants" / "acme" / "policy.toml").exists()
    entries = await _audit(data)
    assert [e.details["action"] for e in entries] == ["init", "set"]  # type: ignore[attr-defined]

    bad = tmp_path / "bad.toml"
    bad.write_text('[key_policy]\nrsa_min_bits = 512\n')
    before = _snapshot(data)
    with pytest.raises(PolicyError, match=r"key_policy\.rsa_min_bits"):
        await set_policy(data, "acme", bad, now=NOW)
    assert _snapshot(data) == before and len(await _audit(data)) == 2
    with pytest.raises(DataDirError, match="no tenant 'ghost'"):
        await set_policy(data, "ghost", good, now=NOW)


def test_missing_data_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataDirError, match="does not exist: run `certmq ca init"):
        load_authorities(tmp_path / "absent", passphrase=PASS)
    with pytest.raises(DataDirError, match="does not exist"):
        asyncio.run(open_datadir_registry(tmp_path / "absent"))
    assert not (tmp_path / "absent").exists()


def test_resolve_datadir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CERTMQ_DATA", raising=False)
    assert resolve_datadir(None) == Path("certmq-data")
    monkeypatch.setenv("CERTMQ_DATA", str(tmp_path))
    assert resolve_datadir(None) == tmp_path
    assert resolve_datadir("x") == Path("x")


@pytest.mark.postgres
async def test_registry_url_in_certmq_toml_moves_the_registry_to_postgres(tmp_path: Path, pg_registry_url: str) -> None:
    data = tmp_path / "d"
    data.mkdir()
    (data / "certmq.toml").write_text(f'registry_url = "{pg_registry_url}"\n')
    await init_tenant(data, "acme", algorithm="p256", passphrase=PASS, now=NOW)
    assert not (data / "registry.db").exists()
    reg = await open_datadir_registry(data)
    try:
        assert reg.dialect == "postgresql"
        assert (await reg.get_tenant("acme")) is not None
    finally:
        await reg.close()


def test_unknown_setting_in_certmq_toml(tmp_path: Path) -> None:
    (tmp_path / "certmq.toml").write_text('registry = "x"\n')
    with pytest.raises(DataDirError, match="unknown setting"):
        registry_url(tmp_path)


def test_the_policy_example_in_the_docs_loads(tmp_path: Path) -> None:
    text = DOC.read_text()
    match = re.search(r"<!-- policy-example -->\s*```toml\n(.*?)```", text, re.S)
    assert match, f"{DOC} lost its policy example"
    path = tmp_path / "policy.toml"
    path.write_text(match.group(1))
    policy, raw = load_policy_file(path, "acme")
    assert raw["name"] == "acme"
    assert Profile.IDENTITY in policy.profiles
    assert policy.profiles[Profile.IDENTITY].lifetime < dt.timedelta(days=90)  # the example shortens it
