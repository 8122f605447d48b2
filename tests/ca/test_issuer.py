"""broker_plugin.ca.issuer and .authority: CSR checks, certificates, chains checked by the real openssl CLI.

OpenSSL 3.0 (the system's) cannot parse ML-DSA keys, so certificates with an
ML-DSA subject key or issued by an ML-DSA CA are verified with cryptography
(``verify_directly_issued_by``) instead; everything else goes through
``openssl verify -x509_strict``.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, mldsa, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import broker_plugin.ca.authority as authority_module
import broker_plugin.ca.issuer as issuer_module
from broker_plugin.ca.authority import TenantCA, create_tenant_ca
from broker_plugin.ca.issuer import (
    MAX_CSR_BYTES,
    Issuer,
    check_csr_identity,
    device_urn,
    load_csr,
    random_serial,
    verify_csr,
)
from broker_plugin.ca.policy import KeyPolicy, PolicyRefusal, ProfilePolicy, TenantPolicy
from protocol import extensions
from protocol.codes import ErrorCode, Profile
from protocol.errors import InvalidIdentifier
from protocol.topics import validate_identifier

NOW = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=5)

SUBJECT_KEYS = {
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "rsa": lambda: rsa.generate_private_key(65537, 2048),
    "ml-dsa-44": mldsa.MLDSA44PrivateKey.generate,
    "ml-dsa-65": mldsa.MLDSA65PrivateKey.generate,
}
CA_KEYS = {
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "ml-dsa-44": mldsa.MLDSA44PrivateKey.generate,
    "ml-dsa-65": mldsa.MLDSA65PrivateKey.generate,
}
SIGN_ONLY = {"ed25519", "ml-dsa-44", "ml-dsa-65"}


# -- helpers ------------------------------------------------------------------------------


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("openssl")
    assert exe, "the openssl CLI is required for these tests (apt-get install openssl)"
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, check=False)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_chain(directory: Path, ca: TenantCA) -> tuple[Path, Path]:
    root, issuing = directory / "root.pem", directory / "issuing.pem"
    root.write_bytes(pem(ca.root))
    issuing.write_bytes(pem(ca.issuing))
    return root, issuing


def openssl_verify(directory: Path, cert: x509.Certificate, *extra: str) -> subprocess.CompletedProcess[str]:
    leaf = directory / f"leaf-{cert.serial_number:x}.pem"
    leaf.write_bytes(pem(cert))
    return openssl(
        "verify", "-x509_strict", *extra, "-CAfile", directory / "root.pem", "-untrusted", directory / "issuing.pem", leaf
    )


def ext_value(cert: x509.Certificate, oid: str) -> bytes:
    value = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value
    assert isinstance(value, x509.UnrecognizedExtension)
    return value.value


def make_csr(key: object, *, cn: str | None = None, san: list[x509.GeneralName] | None = None) -> bytes:
    names = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn is not None else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(key, issuer_module.signature_hash(key)).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ec_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[TenantCA, object, Path]:
    """P-384 root, P-256 issuing CA, chain written for openssl."""
    directory = tmp_path_factory.mktemp("ec-ca")
    issuing_key = ec.generate_private_key(ec.SECP256R1())
    ca = create_tenant_ca(
        tenant="acme", root_key=ec.generate_private_key(ec.SECP384R1()), issuing_key=issuing_key, now=NOW
    )
    write_chain(directory, ca)
    return ca, issuing_key, directory


@pytest.fixture(scope="module")
def subject_keys() -> dict[str, object]:
    return {name: make() for name, make in SUBJECT_KEYS.items()}


def make_issuer(ec_ca: tuple[TenantCA, object, Path], policy: TenantPolicy | None = None, **kw: object) -> Issuer:
    ca, key, _ = ec_ca
    return Issuer(
        ca_certificate=ca.issuing, ca_key=key, tenant_policy=policy or TenantPolicy(name="acme"), **kw  # type: ignore[arg-type]
    )


def issue(issuer: Issuer, public_key: object, profile: Profile = Profile.IDENTITY, **kw: object) -> x509.Certificate:
    args: dict[str, object] = dict(
        device_id="sensor-17",
        profile=profile,
        public_key=public_key,
        serial=random_serial(os.urandom),
        not_before=NOW,
        status_position=(3, 1234),
        region="eu-west",
        capabilities=("telemetry", "cmd"),
    )
    args.update(kw)
    return issuer.issue(**args)  # type: ignore[arg-type]


def test_all_is_complete() -> None:
    for module in (issuer_module, authority_module):
        defined = {
            n
            for n, v in vars(module).items()
            if not n.startswith("_") and getattr(v, "__module__", module.__name__) == module.__name__
            and not isinstance(v, type(os))
        }
        defined -= {"annotations"}
        assert defined <= set(module.__all__), defined - set(module.__all__)
        assert all(hasattr(module, n) for n in module.__all__)


# -- the profile x key-type matrix --------------------------------------------------------

PURPOSE = {Profile.IDENTITY: "sslclient", Profile.OTA_SIGNING: "any"}


@pytest.mark.parametrize("profile", list(Profile), ids=lambda p: p.label)
@pytest.mark.parametrize("key_type", list(SUBJECT_KEYS))
def test_issued_certificate_verifies(ec_ca, subject_keys, key_type: str, profile: Profile) -> None:  # type: ignore[no-untyped-def]
    ca, _, directory = ec_ca
    issuer = make_issuer(ec_ca)
    public_key = subject_keys[key_type].public_key()

    if profile is Profile.ENCRYPTION and key_type in SIGN_ONLY:
        with pytest.raises(PolicyRefusal) as refused:
            issue(issuer, public_key, profile)
        assert refused.value.code is ErrorCode.KEY_REJECTED
        assert "encryption" in refused.value.text
        return

    cert = issue(issuer, public_key, profile)
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    if profile is Profile.ENCRYPTION:
        assert ku.value.key_encipherment == (key_type == "rsa")
        assert ku.value.key_agreement == (key_type != "rsa")
        assert not ku.value.digital_signature
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    else:
        assert ku.value.digital_signature and not ku.value.key_encipherment
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        expected = ExtendedKeyUsageOID.CLIENT_AUTH if profile is Profile.IDENTITY else ExtendedKeyUsageOID.CODE_SIGNING
        assert list(eku) == [expected]

    if key_type.startswith("ml-dsa"):
        # openssl 3.0 cannot decode ML-DSA public keys: verify the chain with cryptography.
        cert.verify_directly_issued_by(ca.issuing)
        ca.issuing.verify_directly_issued_by(ca.root)
        return
    if profile is Profile.ENCRYPTION:
        purpose = "smimeencrypt" if key_type == "rsa" else "any"  # smimeencrypt wants keyEncipherment
    else:
        purpose = PURPOSE[profile]
    result = openssl_verify(directory, cert, "-purpose", purpose)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")


def test_identity_certificate_is_not_a_code_signing_certificate(ec_ca, subject_keys) -> None:  # type: ignore[no-untyped-def]
    """openssl's sslclient purpose is really checked: an OTA certificate fails it."""
    _, _, directory = ec_ca
    cert = issue(make_issuer(ec_ca), subject_keys["p256"].public_key(), Profile.OTA_SIGNING)
    result = openssl_verify(directory, cert, "-purpose", "sslclient")
    assert result.returncode != 0
    assert "unsuitable certificate purpose" in result.stdout + result.stderr


def test_certificate_contents(ec_ca, subject_keys) -> None:  # type: ignore[no-untyped-def]
    ca, _, _ = ec_ca
    policy = TenantPolicy(name="acme", crl_url="http://crl.example/certmq")
    key = subject_keys["p256"].public_key()
    serial = random_serial(os.urandom)
    cert = issue(make_issuer(ec_ca, policy), key, serial=serial)

    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "sensor-17"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "acme"
    assert cert.issuer == ca.issuing.subject
    assert cert.serial_number == serial
    assert cert.not_valid_before_utc == NOW
    assert cert.not_valid_after_utc == NOW + timedelta(days=90)
    assert cert.signature_hash_algorithm is not None and cert.signature_hash_algorithm.name == "sha256"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:certmq:acme:sensor-17"]
    cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [n.value for n in cdp[0].full_name or []] == ["http://crl.example/certmq/acme/eu-west.crl"]

    assert extensions.decode_status_position(ext_value(cert, extensions.STATUS_POSITION_OID)) == (3, 1234)
    assert extensions.decode_capabilities(ext_value(cert, extensions.CAPABILITIES_OID)) == ("telemetry", "cmd")
    assert extensions.decode_region(ext_value(cert, extensions.REGION_OID)) == "eu-west"
    for oid in (extensions.STATUS_POSITION_OID, extensions.CAPABILITIES_OID, extensions.REGION_OID):
        assert not cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).critical


def test_defaults_for_region_and_capabilities(ec_ca, subject_keys) -> None:  # type: ignore[no-untyped-def]
    policy = TenantPolicy(
        name="acme",
        default_region="us-east",
        profiles={"identity": ProfilePolicy(capabilities=("telemetry",))},  # type: ignore[dict-item]
    )
    cert = issue(make_issuer(ec_ca, policy), subject_keys["p256"].public_key(), region=None, capabilities=None,
                 status_position=None)
    assert extensions.decode_region(ext_value(cert, extensions.REGION_OID)) == "us-east"
    assert extensions.decode_capabilities(ext_value(cert, extensions.CAPABILITIES_OID)) == ("telemetry",)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(extensions.STATUS_POSITION_OID))
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.CRLDistributionPoints)

    bare = issue(make_issuer(ec_ca), subject_keys["p256"].public_key(), region=None, capabilities=None)
    for oid in (extensions.REGION_OID, extensions.CAPABILITIES_OID):
        with pytest.raises(x509.ExtensionNotFound):
            bare.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid))


def test_validity_is_clamped_to_the_ca(subject_keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    issuing_key = ec.generate_private_key(ec.SECP256R1())
    ca = create_tenant_ca(
        tenant="acme", root_key=ec.generate_private_key(ec.SECP256R1()), issuing_key=issuing_key, now=NOW,
        issuing_lifetime=timedelta(days=10),
    )
    write_chain(tmp_path, ca)
    issuer = Issuer(ca_certificate=ca.issuing, ca_key=issuing_key, tenant_policy=TenantPolicy(name="acme"))
    cert = issue(issuer, subject_keys["p256"].public_key())
    assert cert.not_valid_after_utc == ca.issuing.not_valid_after_utc == NOW + timedelta(days=10)
    assert openssl_verify(tmp_path, cert, "-purpose", "sslclient").returncode == 0
    with pytest.raises(ValueError, match="expires"):
        issue(issuer, subject_keys["p256"].public_key(), not_before=NOW + timedelta(days=11))


# -- CA key types ---------------------------------------------------------------------------


@pytest.mark.parametrize("ca_type", list(CA_KEYS))
def test_tenant_ca_for_each_ca_key_type(ca_type: str, subject_keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root_key, issuing_key = CA_KEYS[ca_type](), CA_KEYS[ca_type]()
    ca = create_tenant_ca(tenant="acme", root_key=root_key, issuing_key=issuing_key, now=NOW)

    for cert, path_len in ((ca.root, 1), (ca.issuing, 0)):
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and bc.value.ca and bc.value.path_length == path_len
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    assert ca.root.subject == ca.root.issuer and ca.issuing.issuer == ca.root.subject
    assert ca.root.not_valid_after_utc - ca.root.not_valid_before_utc == authority_module.DEFAULT_ROOT_LIFETIME
    assert ca.chain_pem() == pem(ca.issuing) + pem(ca.root)

    expected_hash = {"p256": "sha256", "p384": "sha384"}.get(ca_type)
    assert (ca.issuing.signature_hash_algorithm.name if ca.issuing.signature_hash_algorithm else None) == expected_hash

    issuer = Issuer(ca_certificate=ca.issuing, ca_key=issuing_key, tenant_policy=TenantPolicy(name="acme"))
    cert = issue(issuer, subject_keys["p256"].public_key())
    if ca_type.startswith("ml-dsa"):
        # openssl 3.0 has no ML-DSA: cryptography checks each signature of the chain.
        ca.root.verify_directly_issued_by(ca.root)
        ca.issuing.verify_directly_issued_by(ca.root)
        cert.verify_directly_issued_by(ca.issuing)
        with pytest.raises(Exception):  # and the check can fail: not signed by the root
            cert.verify_directly_issued_by(ca.root)
    else:
        write_chain(tmp_path, ca)
        result = openssl_verify(tmp_path, cert, "-purpose", "sslclient")
        assert result.returncode == 0, result.stdout + result.stderr
        # The CA certificates themselves pass strict checks as a chain on their own.
        check = openssl("verify", "-x509_strict", "-CAfile", tmp_path / "root.pem", tmp_path / "issuing.pem")
        assert check.returncode == 0, check.stdout + check.stderr


def test_chain_of_another_tenant_does_not_verify(ec_ca, subject_keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = create_tenant_ca(tenant="acme", root_key=ec.generate_private_key(ec.SECP256R1()), issuing_key=other_key, now=NOW)
    write_chain(tmp_path, other)
    cert = issue(make_issuer(ec_ca), subject_keys["p256"].public_key())
    assert openssl_verify(tmp_path, cert).returncode != 0


def test_create_tenant_ca_refuses_bad_input() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ValueError, match="aware"):
        create_tenant_ca(tenant="acme", root_key=key, issuing_key=key, now=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="longer than zero"):
        create_tenant_ca(tenant="acme", root_key=key, issuing_key=key, now=NOW, issuing_lifetime=timedelta(0))
    with pytest.raises(InvalidIdentifier):
        create_tenant_ca(tenant="a/b", root_key=key, issuing_key=key, now=NOW)


# -- key policy at issuance ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_key", "why"),
    [
        (lambda: rsa.generate_private_key(65537, 1024), "1024 bits"),
        (lambda: rsa.generate_private_key(3, 2048), "exponent 3"),
        (lambda: ec.generate_private_key(ec.SECP192R1()), "secp192r1"),
        (lambda: ec.generate_private_key(ec.SECP256K1()), "secp256k1"),
        (lambda: ec.generate_private_key(ec.SECP521R1()), "secp521r1"),
        (ed448.Ed448PrivateKey.generate, "Ed448"),
        (mldsa.MLDSA87PrivateKey.generate, "ml-dsa-87"),
    ],
    ids=["rsa-1024", "rsa-e3", "p192", "secp256k1", "p521", "ed448", "ml-dsa-87"],
)
def test_weak_or_unsupported_keys_refused(ec_ca, make_key, why: str) -> None:  # type: ignore[no-untyped-def]
    issuer = make_issuer(ec_ca)
    key = make_key()
    with pytest.raises(PolicyRefusal) as refused:
        issue(issuer, key.public_key())
    assert refused.value.code is ErrorCode.KEY_REJECTED
    assert why in refused.value.text
    with pytest.raises(PolicyRefusal):
        issuer.check_request(profile=Profile.IDENTITY, public_key=key.public_key())


def test_key_type_not_in_tenant_policy_refused(ec_ca, subject_keys) -> None:  # type: ignore[no-untyped-def]
    policy = TenantPolicy(name="acme", key_policy=KeyPolicy(allowed=("p256",)))
    issuer = make_issuer(ec_ca, policy)
    issue(issuer, subject_keys["p256"].public_key())
    with pytest.raises(PolicyRefusal) as refused:
        issue(issuer, subject_keys["rsa"].public_key())
    assert refused.value.code is ErrorCode.KEY_REJECTED and "rsa keys are not allowed" in refused.value.text


def test_profile_not_offered_refused(ec_ca, subject_keys) -> None:  # type: ignore[no-untyped-def]
    policy = TenantPolicy(name="acme", profiles={"identity": ProfilePolicy()})  # type: ignore[dict-item]
    with pytest.raises(PolicyRefusal) as refused:
        issue(make_issuer(ec_ca, policy), subject_keys["p256"].public_key(), Profile.OTA_SIGNING)
    assert refused.value.code is ErrorCode.UNKNOWN_PROFILE


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"device_id": "a/b"}, InvalidIdentifier),
        ({"device_id": "x" * 65}, ValueError),
        ({"serial": 0}, ValueError),
        ({"serial": 2**159}, ValueError),
        ({"not_before": datetime(2026, 1, 1)}, ValueError),
        ({"region": "eu#1"}, InvalidIdentifier),
        ({"capabilities": ("a", "a")}, ValueError),
        ({"status_position": (1, 10**9)}, ValueError),
    ],
)
def test_caller_mistakes_raise(ec_ca, subject_keys, change: dict[str, object], error: type[Exception]) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error):
        issue(make_issuer(ec_ca), subject_keys["p256"].public_key(), **change)


def test_issuer_refuses_a_key_that_is_not_the_cas(ec_ca) -> None:  # type: ignore[no-untyped-def]
    ca, _, _ = ec_ca
    with pytest.raises(ValueError, match="does not belong"):
        Issuer(ca_certificate=ca.issuing, ca_key=ec.generate_private_key(ec.SECP256R1()), tenant_policy=TenantPolicy(name="acme"))


def test_issuer_refuses_a_non_ca_certificate(ec_ca, subject_keys) -> None:  # type: ignore[no-untyped-def]
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = issue(make_issuer(ec_ca), leaf_key.public_key())
    with pytest.raises(ValueError, match="not a CA"):
        Issuer(ca_certificate=leaf, ca_key=leaf_key, tenant_policy=TenantPolicy(name="acme"))


# -- CSRs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", list(SUBJECT_KEYS))
def test_csr_proof_of_possession(subject_keys, key_type: str) -> None:  # type: ignore[no-untyped-def]
    csr = load_csr(make_csr(subject_keys[key_type], cn="sensor-17"))
    verify_csr(csr)
    check_csr_identity(csr, "sensor-17")


def test_forged_csr_refused(subject_keys) -> None:  # type: ignore[no-untyped-def]
    """Someone else's public key with a signature made by the attacker's key: no proof of possession."""
    victim = ec.generate_private_key(ec.SECP256R1())
    attacker = ec.generate_private_key(ec.SECP256R1())
    genuine = x509.load_der_x509_csr(make_csr(victim, cn="sensor-17"))
    forged_sig = attacker.sign(genuine.tbs_certrequest_bytes, ec.ECDSA(hashes.SHA256()))
    alg = bytes.fromhex("300a06082a8648ce3d040302")  # ecdsa-with-SHA256
    bitstring = extensions.der_tlv(0x03, b"\x00" + forged_sig)
    forged = extensions.der_tlv(0x30, genuine.tbs_certrequest_bytes + alg + bitstring)

    csr = load_csr(forged)  # well-formed...
    assert csr.public_key() == victim.public_key()
    with pytest.raises(PolicyRefusal) as refused:  # ...but not signed by its key
        verify_csr(csr)
    assert refused.value.code is ErrorCode.BAD_CSR
    assert "proof of possession" in refused.value.text


@pytest.mark.parametrize(
    ("der", "why"),
    [
        (b"", "not a DER"),
        (b"\x30\x03\x02\x01\x01", "not a DER"),
        (b"-----BEGIN CERTIFICATE REQUEST-----", "not a DER"),
        (b"\x30" * (MAX_CSR_BYTES + 1), "larger than"),
    ],
    ids=["empty", "not-a-csr", "pem", "oversize"],
)
def test_bad_csr_bytes_refused(der: bytes, why: str) -> None:
    with pytest.raises(PolicyRefusal) as refused:
        load_csr(der)
    assert refused.value.code is ErrorCode.BAD_CSR and why in refused.value.text


def test_largest_supported_csr_fits() -> None:
    key = mldsa.MLDSA65PrivateKey.generate()
    der = make_csr(key, cn="sensor-17")
    assert len(der) < MAX_CSR_BYTES
    verify_csr(load_csr(der))


@pytest.mark.parametrize(
    ("cn", "san"),
    [
        (None, None),
        ("sensor-17", None),
        (None, [x509.DNSName("sensor-17")]),
        ("sensor-17", [x509.UniformResourceIdentifier("urn:certmq:acme:sensor-17")]),
        (None, [x509.IPAddress(ipaddress.ip_address("10.0.0.1"))]),
    ],
    ids=["empty", "cn", "dns", "urn", "ip-ignored"],
)
def test_csr_naming_this_device_or_nothing_accepted(subject_keys, cn, san) -> None:  # type: ignore[no-untyped-def]
    csr = load_csr(make_csr(subject_keys["p256"], cn=cn, san=san))
    check_csr_identity(csr, "sensor-17", tenant="acme")
    check_csr_identity(csr, "sensor-17")


@pytest.mark.parametrize(
    ("cn", "san"),
    [
        ("sensor-18", None),
        ("sensor-17", [x509.DNSName("sensor-18")]),
        (None, [x509.UniformResourceIdentifier("urn:certmq:acme:sensor-18")]),
        (None, [x509.UniformResourceIdentifier("https://evil.example/")]),
        (None, [x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sensor-18")]))]),
    ],
    ids=["cn", "dns", "urn", "other-uri", "dirname"],
)
def test_csr_naming_another_device_refused(subject_keys, cn, san) -> None:  # type: ignore[no-untyped-def]
    csr = load_csr(make_csr(subject_keys["p256"], cn=cn, san=san))
    verify_csr(csr)  # the signature is fine: only the name is wrong
    with pytest.raises(PolicyRefusal) as refused:
        check_csr_identity(csr, "sensor-17")
    assert refused.value.code is ErrorCode.IDENTITY_MISMATCH


def test_csr_urn_for_another_tenant_refused_when_tenant_known(subject_keys) -> None:  # type: ignore[no-untyped-def]
    csr = load_csr(make_csr(subject_keys["p256"], san=[x509.UniformResourceIdentifier(device_urn("other", "sensor-17"))]))
    check_csr_identity(csr, "sensor-17")
    with pytest.raises(PolicyRefusal):
        check_csr_identity(csr, "sensor-17", tenant="acme")


def test_subject_is_never_copied_from_the_csr(ec_ca, subject_keys) -> None:  # type: ignore[no-untyped-def]
    key = subject_keys["p256"]
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sensor-17"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "root-ca")])
    ).add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256())
    cert = issue(make_issuer(ec_ca), csr.public_key())
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "acme"
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


# -- serials ------------------------------------------------------------------------------


def test_random_serial_is_159_bits_and_uses_the_rng() -> None:
    for fill in (b"\x00", b"\xff", b"\x5a"):
        serial = random_serial(lambda n, fill=fill: fill * n)
        assert serial.bit_length() == issuer_module.SERIAL_BITS
    serials = {random_serial(os.urandom) for _ in range(200)}
    assert len(serials) == 200
    assert all(s.bit_length() == 159 for s in serials)
    assert random_serial(lambda n: b"\x00" * n) != random_serial(lambda n: b"\x00" * (n - 1) + b"\x04")
    with pytest.raises(ValueError, match="returned 19 bytes"):
        random_serial(lambda n: b"\x01" * (n - 1))


def test_random_serial_encodes_in_twenty_octets(ec_ca, subject_keys) -> None:  # type: ignore[no-untyped-def]
    cert = issue(make_issuer(ec_ca), subject_keys["p256"].public_key(), serial=random_serial(lambda n: b"\xff" * n))
    der = cert.public_bytes(serialization.Encoding.DER)
    assert b"\x02\x14\x7f\xff" in der  # INTEGER, 20 octets, top bit clear


# -- the template path: DER made once per issuer, the same bytes as CertificateBuilder's ------


def builder_only(issuer: Issuer) -> Issuer:
    """The same issuer made to build every certificate with CertificateBuilder: the reference."""
    issuer._template_ok = False
    return issuer


TEMPLATE_CASES = {
    "defaults": {},
    "no-status-region-capabilities": {"status_position": None, "region": None, "capabilities": ()},
    "non-ascii-id": {"device_id": "gerät-ü-7"},
    "longest-id": {"device_id": "d" * 64},
    "long-utf8-id": {"device_id": "é" * 32},  # 64 UTF-8 bytes, the limit
    "percent-in-urn": {"device_id": "dev:1@x~y"},
    "sub-second-not-before": {"not_before": NOW + timedelta(microseconds=654321)},
    "big-status-position": {"status_position": (2**31 - 1, 1)},
    "small-serial": {"serial": 1},
    "serial-top-bit-in-octet": {"serial": 0x80},
}


@pytest.mark.parametrize("case", list(TEMPLATE_CASES))
@pytest.mark.parametrize("key_type", ["p256", "p384", "rsa", "ed25519", "ml-dsa-44"])
def test_template_certificate_is_the_builders(ec_ca, subject_keys, key_type: str, case: str) -> None:  # type: ignore[no-untyped-def]
    ca, _, directory = ec_ca
    policy = TenantPolicy(name="acme", crl_url="http://crl.example/certmq", default_region="eu-north")
    fast = make_issuer(ec_ca, policy)
    assert fast._template_ok, "a P-256 issuing CA must use the template path"
    slow = builder_only(make_issuer(ec_ca, policy))
    args: dict[str, object] = dict(serial=random_serial(os.urandom))
    args.update(TEMPLATE_CASES[case])
    public_key = subject_keys[key_type].public_key()

    cert = issue(fast, public_key, **args)
    reference = issue(slow, public_key, **args)
    assert cert.tbs_certificate_bytes == reference.tbs_certificate_bytes
    assert cert.signature_algorithm_oid == reference.signature_algorithm_oid
    cert.verify_directly_issued_by(ca.issuing)
    signed = fast.issue_der(**{**dict(device_id="sensor-17", profile=Profile.IDENTITY, public_key=public_key,
                                      not_before=NOW, status_position=(3, 1234), region="eu-west",
                                      capabilities=("telemetry", "cmd")), **args})  # type: ignore[arg-type]
    again = x509.load_der_x509_certificate(signed.der)
    assert again.tbs_certificate_bytes == reference.tbs_certificate_bytes
    assert (signed.not_before, signed.not_after) == (again.not_valid_before_utc, again.not_valid_after_utc)
    assert signed.spki == public_key.public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    if not key_type.startswith("ml-dsa"):  # openssl 3.0 cannot decode ML-DSA keys
        result = openssl_verify(directory, cert, "-purpose", "sslclient")
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("profile", list(Profile), ids=lambda p: p.label)
def test_template_matches_builder_for_every_profile(ec_ca, subject_keys, profile: Profile) -> None:  # type: ignore[no-untyped-def]
    key = subject_keys["p256"].public_key()
    cert = issue(make_issuer(ec_ca), key, profile, serial=5)
    assert cert.tbs_certificate_bytes == issue(builder_only(make_issuer(ec_ca)), key, profile, serial=5).tbs_certificate_bytes


def test_template_writes_generalized_time_from_2050(subject_keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    start = datetime(2049, 12, 1, tzinfo=timezone.utc)
    issuing_key = ec.generate_private_key(ec.SECP384R1())
    ca = create_tenant_ca(tenant="acme", root_key=ec.generate_private_key(ec.SECP384R1()), issuing_key=issuing_key,
                          now=start - timedelta(days=1))
    fast = Issuer(ca_certificate=ca.issuing, ca_key=issuing_key, tenant_policy=TenantPolicy(name="acme"))
    slow = builder_only(Issuer(ca_certificate=ca.issuing, ca_key=issuing_key, tenant_policy=TenantPolicy(name="acme")))
    key = subject_keys["p256"].public_key()
    cert = issue(fast, key, not_before=start, serial=7)
    assert cert.not_valid_after_utc.year == 2050
    assert cert.tbs_certificate_bytes == issue(slow, key, not_before=start, serial=7).tbs_certificate_bytes
    assert cert.signature_hash_algorithm is not None and cert.signature_hash_algorithm.name == "sha384"
    write_chain(tmp_path, ca)
    result = openssl_verify(tmp_path, cert, "-attime", str(int((start + timedelta(days=60)).timestamp())))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("ca_type", ["ed25519", "ml-dsa-44"])
def test_non_ec_ca_keys_use_the_builder(ca_type: str, subject_keys) -> None:  # type: ignore[no-untyped-def]
    issuing_key = CA_KEYS[ca_type]()
    ca = create_tenant_ca(tenant="acme", root_key=CA_KEYS[ca_type](), issuing_key=issuing_key, now=NOW)
    issuer = Issuer(ca_certificate=ca.issuing, ca_key=issuing_key, tenant_policy=TenantPolicy(name="acme"))
    assert not issuer._template_ok
    cert = issue(issuer, subject_keys["p256"].public_key())
    cert.verify_directly_issued_by(ca.issuing)
    signed = issuer.issue_der(device_id="d1", profile=Profile.IDENTITY, public_key=subject_keys["p256"].public_key(),
                              serial=9, not_before=NOW, status_position=None, region=None, capabilities=None)
    x509.load_der_x509_certificate(signed.der).verify_directly_issued_by(ca.issuing)


def test_a_template_unlike_the_builders_is_not_used(ec_ca, subject_keys, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """If this cryptography encoded anything differently from the template (here: times), the
    issuer notices at construction and builds every certificate with CertificateBuilder."""
    ca, _, directory = ec_ca
    monkeypatch.setattr(issuer_module, "_time_der", lambda when: b"\x18\x0f" + when.strftime("%Y%m%d%H%M%SZ").encode())
    issuer = make_issuer(ec_ca)
    assert not issuer._template_ok
    cert = issue(issuer, subject_keys["p256"].public_key())
    assert cert.not_valid_before_utc == NOW
    assert openssl_verify(directory, cert, "-purpose", "sslclient").returncode == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    device_id=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=64),
    serial=st.integers(min_value=1, max_value=2**159 - 1),
    status=st.none() | st.tuples(st.integers(0, 2**31 - 1), st.integers(0, 2**16 - 1)),
    region=st.none() | st.sampled_from(["eu-west", "r", "région-ü", "x" * 40]),
    capabilities=st.lists(st.sampled_from(["telemetry", "cmd", "ota", "fw-é"]), unique=True, max_size=4),
    offset=st.integers(min_value=0, max_value=40 * 365 * 86400 * 10**6),
    profile=st.sampled_from(list(Profile)),
)
def test_template_equals_builder_for_any_valid_request(  # type: ignore[no-untyped-def]
    ec_ca, subject_keys, device_id, serial, status, region, capabilities, offset, profile
) -> None:
    """Differential: over random identifiers (any UTF-8 a device id may hold, up to 64 bytes),
    serials up to 159 bits (every DER length and sign-octet case), status positions, regions,
    capabilities, profiles and start times (sub-second, decades ahead), the template path's
    TBSCertificate is byte for byte CertificateBuilder's -- or both refuse the request alike."""
    try:
        validate_identifier(device_id)
    except InvalidIdentifier:
        assume(False)
    policy = TenantPolicy(name="acme", crl_url="http://crl.example/certmq", default_region="eu-north")
    fast, slow = make_issuer(ec_ca, policy), builder_only(make_issuer(ec_ca, policy))
    assert fast._template_ok
    args = dict(device_id=device_id, serial=serial, status_position=status, region=region,
                capabilities=tuple(capabilities), not_before=NOW + timedelta(microseconds=offset))
    key = subject_keys["p256"].public_key()
    outcomes = []
    for issuer in (fast, slow):
        try:
            outcomes.append(issue(issuer, key, profile, **args).tbs_certificate_bytes)
        except (ValueError, InvalidIdentifier, PolicyRefusal) as exc:
            outcomes.append(type(exc))
    assert outcomes[0] == outcomes[1]
