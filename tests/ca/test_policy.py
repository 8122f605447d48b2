"""broker_plugin.ca.policy: loading tenant policies, readable errors, key and profile decisions."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, mldsa, rsa, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID
from pydantic import ValidationError

import broker_plugin.ca.policy as policy_module
from broker_plugin.ca.policy import (
    KEY_TYPES,
    KeyPolicy,
    PolicyError,
    PolicyRefusal,
    ProfilePolicy,
    TenantPolicy,
    format_validation_error,
    key_type_of,
    load_tenant_policy,
    parse_duration,
)
from protocol.codes import ErrorCode, Profile

GOOD_TOML = """
name = "acme"
default_region = "eu-west"
crl_url = "https://crl.acme.example/certmq/"
status_list_capacity = 65536

[key_policy]
allowed = ["p256", "ed25519", "rsa"]
rsa_min_bits = 3072

[profiles.identity]
lifetime = "30d"
renewal_window = [0.5, 0.75]
capabilities = ["telemetry", "cmd"]
allow_key_reuse = true
max_key_age = "180d"
expired_recovery = "7d"

[profiles.ota-signing]
lifetime = 31536000
extended_key_usage = ["codeSigning", "1.3.6.1.4.1.99999.1"]
"""


def test_all_is_complete() -> None:
    assert all(hasattr(policy_module, n) for n in policy_module.__all__)
    for name, value in vars(policy_module).items():
        if not name.startswith("_") and getattr(value, "__module__", None) == policy_module.__name__:
            assert name in policy_module.__all__, name


def test_defaults_are_documented_ones() -> None:
    policy = TenantPolicy(name="acme")
    assert policy.key_policy.allowed == KEY_TYPES
    assert policy.key_policy.rsa_min_bits == 2048
    assert set(policy.profiles) == set(Profile)
    assert policy.profiles[Profile.IDENTITY].lifetime == timedelta(days=90)
    assert policy.profiles[Profile.ENCRYPTION].lifetime == timedelta(days=365)
    assert policy.profiles[Profile.OTA_SIGNING].lifetime == timedelta(days=365)
    for profile in policy.profiles.values():
        assert profile.renewal_window == (0.6, 0.8)
        assert not profile.allow_key_reuse and profile.expired_recovery == timedelta(0)
    assert policy.crl_url is None and policy.crl_url_for("eu") is None


def test_load_toml(tmp_path: Path) -> None:
    path = tmp_path / "acme.toml"
    path.write_text(GOOD_TOML)
    policy = load_tenant_policy(path)
    assert policy.name == "acme"
    assert policy.key_policy.allowed == ("p256", "ed25519", "rsa")
    assert policy.key_policy.rsa_min_bits == 3072
    # Listing profiles offers exactly those listed.
    assert set(policy.profiles) == {Profile.IDENTITY, Profile.OTA_SIGNING}
    identity = policy.profile(Profile.IDENTITY)
    assert identity.lifetime == timedelta(days=30)
    assert identity.renewal_window == (0.5, 0.75)
    assert identity.capabilities == ("telemetry", "cmd")
    assert identity.max_key_age == timedelta(days=180)
    assert identity.expired_recovery == timedelta(days=7)
    ota = policy.profile(Profile.OTA_SIGNING)
    assert ota.lifetime == timedelta(days=365)
    assert ota.extended_key_usages(Profile.OTA_SIGNING) == (
        ExtendedKeyUsageOID.CODE_SIGNING,
        x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"),
    )
    assert policy.crl_url == "https://crl.acme.example/certmq"
    assert policy.crl_url_for("eu-west") == "https://crl.acme.example/certmq/acme/eu-west.crl"
    assert policy.crl_url_for(None) == "https://crl.acme.example/certmq/acme.crl"
    with pytest.raises(PolicyRefusal) as refused:
        policy.profile(Profile.ENCRYPTION)
    assert refused.value.code is ErrorCode.UNKNOWN_PROFILE
    assert "identity" in refused.value.text and "ota-signing" in refused.value.text


def test_json_and_dict_load_the_same(tmp_path: Path) -> None:
    import tomllib

    data = tomllib.loads(GOOD_TOML)
    path = tmp_path / "acme.json"
    path.write_text(json.dumps(data))
    assert load_tenant_policy(path) == load_tenant_policy(data) == load_tenant_policy(tmp_path / "acme.json")


def test_policy_is_frozen() -> None:
    policy = TenantPolicy(name="acme")
    with pytest.raises(ValidationError):
        policy.name = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        policy.key_policy.rsa_min_bits = 1024  # type: ignore[misc]


# Each bad field must come back as a line naming it.
BAD_FIELDS = [
    ({"name": "a/b"}, "name:"),
    ({"name": "ac me"}, "name:"),
    ({"nmae": "x"}, "nmae: unknown field"),
    ({"key_policy": {"allowed": ["p256", "p521"]}}, "key_policy.allowed.1:"),
    ({"key_policy": {"allowed": []}}, "key_policy.allowed: at least one"),
    ({"key_policy": {"allowed": ["p256", "p256"]}}, "key_policy.allowed: lists a key type twice"),
    ({"key_policy": {"rsa_min_bits": 1024}}, "key_policy.rsa_min_bits: Input should be greater than or equal to 2048"),
    ({"profiles": {"ota-sign": {}}}, "profiles.ota-sign: unknown profile 'ota-sign'"),
    ({"profiles": {}}, "profiles: at least one profile"),
    ({"profiles": {"identity": {"lifetime": 0}}}, "profiles.identity.lifetime: must be longer than zero"),
    ({"profiles": {"identity": {"lifetime": "-3d"}}}, "profiles.identity.lifetime: '-3d' is not a duration"),
    ({"profiles": {"identity": {"lifetime": "5y"}}}, "profiles.identity.lifetime: '5y' is not a duration"),
    ({"profiles": {"identity": {"lifetime": "4000d"}}}, "profiles.identity.lifetime: must be at most"),
    ({"profiles": {"identity": {"lifetime": True}}}, "profiles.identity.lifetime:"),
    ({"profiles": {"identity": {"renewal_window": [0.8, 0.6]}}}, "profiles.identity.renewal_window: must satisfy"),
    ({"profiles": {"identity": {"renewal_window": [0.0, 0.6]}}}, "profiles.identity.renewal_window: must satisfy"),
    ({"profiles": {"identity": {"renewal_window": [0.5]}}}, "profiles.identity.renewal_window"),
    ({"profiles": {"identity": {"extended_key_usage": ["clientauth"]}}}, "profiles.identity.extended_key_usage:"),
    ({"profiles": {"identity": {"capabilities": ["a/b"]}}}, "profiles.identity.capabilities:"),
    ({"profiles": {"identity": {"capabilities": ["a", "a"]}}}, "profiles.identity.capabilities: lists a capability twice"),
    ({"profiles": {"identity": {"expired_recovery": -5}}}, "profiles.identity.expired_recovery: must not be negative"),
    ({"profiles": {"identity": {"max_key_age": "30d"}}}, "profiles.identity: max_key_age only applies"),
    ({"profiles": {"identity": {"colour": "red"}}}, "profiles.identity.colour: unknown field"),
    ({"default_region": "eu#west"}, "default_region:"),
    ({"crl_url": "ftp://crl.example"}, "crl_url:"),
    ({"crl_url": "https://crl.example/?x=1"}, "crl_url:"),
    ({"status_list_capacity": 100}, "status_list_capacity: must be a multiple of 8"),
    ({"status_list_capacity": 0}, "status_list_capacity:"),
]


@pytest.mark.parametrize(("change", "expected"), BAD_FIELDS, ids=[e for _, e in BAD_FIELDS])
def test_bad_field_is_named(change: dict[str, object], expected: str) -> None:
    data = {"name": "acme", **change}
    with pytest.raises(PolicyError) as error:
        load_tenant_policy(data)
    message = str(error.value)
    assert expected in message, message
    # format_validation_error gives the same lines for the raw ValidationError.
    with pytest.raises(ValidationError) as raw:
        TenantPolicy.model_validate(data)
    assert expected in format_validation_error(raw.value)


def test_all_problems_are_listed_at_once() -> None:
    with pytest.raises(PolicyError) as error:
        load_tenant_policy({"name": "", "crl_url": "x", "key_policy": {"rsa_min_bits": 1}})
    lines = str(error.value).splitlines()
    assert lines[0] == "policy: invalid tenant policy:"
    assert {line.split(":")[0] for line in lines[1:]} == {"name", "crl_url", "key_policy.rsa_min_bits"}


def test_missing_name_is_named() -> None:
    with pytest.raises(PolicyError, match="name: Field required"):
        load_tenant_policy({})


@pytest.mark.parametrize(
    ("filename", "content", "expected"),
    [
        ("p.toml", "name = ", "not valid TOML"),
        ("p.json", "{", "not valid JSON"),
        ("p.json", "[1]", "top level must be"),
        ("p.yaml", "name: acme", "unknown format .yaml"),
        ("p.toml", b"\xff\xfe", "not valid TOML"),
    ],
)
def test_bad_files(tmp_path: Path, filename: str, content: str | bytes, expected: str) -> None:
    path = tmp_path / filename
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(PolicyError) as error:
        load_tenant_policy(path)
    assert str(path) in str(error.value) and expected in str(error.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_tenant_policy(tmp_path / "absent.toml")


def test_field_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "acme.toml"
    path.write_text('name = "acme"\n[key_policy]\nrsa_min_bits = 1024\n')
    with pytest.raises(PolicyError) as error:
        load_tenant_policy(path)
    assert str(error.value).startswith(f"{path}: invalid tenant policy:\nkey_policy.rsa_min_bits:")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(90, 90), ("90", None), ("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000), ("2w", 1209600), (" 3d ", 259200)],
)
def test_parse_duration(text: object, seconds: int | None) -> None:
    if seconds is None:
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(text)
    else:
        assert parse_duration(text) == timedelta(seconds=seconds)


# -- keys ---------------------------------------------------------------------------------

KEYS = {
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "rsa": lambda: rsa.generate_private_key(65537, 2048),
    "ml-dsa-44": mldsa.MLDSA44PrivateKey.generate,
    "ml-dsa-65": mldsa.MLDSA65PrivateKey.generate,
}


@pytest.mark.parametrize("kind", list(KEYS))
def test_each_key_type_is_recognised_and_allowed_by_default(kind: str) -> None:
    public = KEYS[kind]().public_key()
    assert key_type_of(public) == kind
    KeyPolicy().check(public)
    others = tuple(k for k in KEY_TYPES if k != kind)
    with pytest.raises(PolicyRefusal) as refused:
        KeyPolicy(allowed=others).check(public)
    assert refused.value.code is ErrorCode.KEY_REJECTED and f"{kind} keys are not allowed" in refused.value.text


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: ec.generate_private_key(ec.SECP192R1()), "unsupported key type ec:secp192r1"),
        (lambda: ec.generate_private_key(ec.SECP256K1()), "unsupported key type ec:secp256k1"),
        (ed448.Ed448PrivateKey.generate, "unsupported key type"),
        (x25519.X25519PrivateKey.generate, "unsupported key type"),
        (mldsa.MLDSA87PrivateKey.generate, "unsupported key type ml-dsa-87"),
        (lambda: rsa.generate_private_key(65537, 1024), "1024 bits is below the minimum of 2048"),
        (lambda: rsa.generate_private_key(3, 2048), "exponent 3 is not 65537"),
    ],
)
def test_bad_keys_refused(make, why: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PolicyRefusal) as refused:
        KeyPolicy().check(make().public_key())
    assert refused.value.code is ErrorCode.KEY_REJECTED
    assert why in refused.value.text
    assert refused.value.text in str(refused.value)


def test_rsa_minimum_is_configurable_upwards() -> None:
    key = rsa.generate_private_key(65537, 2048).public_key()
    KeyPolicy(rsa_min_bits=2048).check(key)
    with pytest.raises(PolicyRefusal, match="below the minimum of 3072"):
        KeyPolicy(rsa_min_bits=3072).check(key)


# -- profiles -----------------------------------------------------------------------------


def test_key_usage_by_profile_and_key() -> None:
    profile = ProfilePolicy()
    rsa_key = KEYS["rsa"]().public_key()
    ec_key = KEYS["p256"]().public_key()
    for key in (rsa_key, ec_key, KEYS["ed25519"]().public_key(), KEYS["ml-dsa-44"]().public_key()):
        for kind in (Profile.IDENTITY, Profile.OTA_SIGNING):
            usage = profile.key_usage(kind, key)
            assert usage.digital_signature and not usage.key_encipherment and not usage.key_agreement
    enc_rsa = profile.key_usage(Profile.ENCRYPTION, rsa_key)
    assert enc_rsa.key_encipherment and not enc_rsa.key_agreement and not enc_rsa.digital_signature
    enc_ec = profile.key_usage(Profile.ENCRYPTION, ec_key)
    assert enc_ec.key_agreement and not enc_ec.key_encipherment and not enc_ec.digital_signature
    for sign_only in ("ed25519", "ml-dsa-65"):
        with pytest.raises(PolicyRefusal) as refused:
            profile.key_usage(Profile.ENCRYPTION, KEYS[sign_only]().public_key())
        assert refused.value.code is ErrorCode.KEY_REJECTED


def test_default_ekus_and_overrides() -> None:
    default = ProfilePolicy()
    assert default.extended_key_usages(Profile.IDENTITY) == (ExtendedKeyUsageOID.CLIENT_AUTH,)
    assert default.extended_key_usages(Profile.ENCRYPTION) == ()
    assert default.extended_key_usages(Profile.OTA_SIGNING) == (ExtendedKeyUsageOID.CODE_SIGNING,)
    both = ProfilePolicy(extended_key_usage=("clientAuth", "serverAuth"))
    assert both.extended_key_usages(Profile.IDENTITY) == (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH)
    assert ProfilePolicy(extended_key_usage=()).extended_key_usages(Profile.IDENTITY) == ()


def test_must_rotate() -> None:
    now = datetime(2026, 6, 1, tzinfo=timezone.utc)
    first = now - timedelta(days=100)
    assert ProfilePolicy().must_rotate(key_first_certified=now, now=now)
    assert not ProfilePolicy(allow_key_reuse=True).must_rotate(key_first_certified=first, now=now)
    aged = ProfilePolicy(allow_key_reuse=True, max_key_age=timedelta(days=90))
    assert aged.must_rotate(key_first_certified=first, now=now)
    assert not aged.must_rotate(key_first_certified=now - timedelta(days=89), now=now)


def test_profile_labels_use_protocol_codes() -> None:
    policy = load_tenant_policy({"name": "acme", "profiles": {label: {} for label in ("identity", "encryption", "ota-signing")}})
    assert set(policy.profiles) == {Profile.from_label(p.label) for p in Profile}
