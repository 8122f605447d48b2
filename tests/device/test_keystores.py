"""Key stores: file (0600, atomic, destroy) and PKCS#11 on a real SoftHSM2 token (non-extractable, CSR signed inside)."""

from __future__ import annotations

import stat
from pathlib import Path

import pkcs11
import pytest
from cryptography import x509
from device_fakes import FakeCA, VirtualClock
from fixtures_hsm import SoftHsmToken

from device_client.certstore import CertStore
from device_client.enroll import build_csr, same_public_key
from device_client.keystore import FileKeyStore, KeyStoreError, Pkcs11KeyStore
from protocol.codes import Profile


def test_file_keystore_mode_roundtrip_and_destroy(tmp_path: Path) -> None:
    ks = FileKeyStore(directory=tmp_path / "keys")
    key = ks.generate("device-a", "p384")
    path = ks.path("device-a")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert same_public_key(ks.load("device-a"), key)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    with pytest.raises(KeyStoreError):
        ks.generate("device-a")
    with pytest.raises(KeyStoreError):
        ks.generate("../escape")
    assert ks.delete("device-a") and not path.exists() and not ks.delete("device-a")


@pytest.mark.softhsm
def test_pkcs11_key_is_non_extractable_and_signs_csr_inside(softhsm_token: SoftHsmToken, tmp_path: Path,
                                                            fake_ca: FakeCA, clock: VirtualClock) -> None:
    ks = Pkcs11KeyStore(module=softhsm_token.module, token_label=softhsm_token.label, pin=softhsm_token.user_pin)
    try:
        key = ks.generate("dev-pkcs11-1")
        raw = ks._session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label="dev-pkcs11-1")
        assert raw[pkcs11.Attribute.EXTRACTABLE] is False and raw[pkcs11.Attribute.SENSITIVE] is True
        with pytest.raises(pkcs11.AttributeSensitive):
            raw[pkcs11.Attribute.VALUE]
        with pytest.raises(KeyStoreError):
            key.private_bytes(None, None, None)
        csr = x509.load_der_x509_csr(build_csr(key, device_id="sensor-hsm"))
        assert csr.is_signature_valid and same_public_key(csr.public_key(), key.public_key())
        # a certificate for the token key goes through the store like any other
        store = CertStore(directory=tmp_path / "store", keystore=ks, trust=fake_ca.trust, device_id="sensor-hsm")
        cert = fake_ca.issue("sensor-hsm", Profile.IDENTITY, csr.public_key())
        store.stage(Profile.IDENTITY, certificate=cert, chain=[fake_ca.ca.issuing], key_label="dev-pkcs11-1", now=clock.now())
        store.commit(Profile.IDENTITY)
        assert store.check_usable(Profile.IDENTITY, now=clock.now()).key_label == "dev-pkcs11-1"
        assert "dev-pkcs11-1" in ks.labels()
        assert ks.delete("dev-pkcs11-1") and not ks.exists("dev-pkcs11-1")
        with pytest.raises(KeyStoreError):
            ks.load("dev-pkcs11-1")
    finally:
        ks.close()


@pytest.mark.softhsm
def test_pkcs11_wrong_pin_is_a_clear_error(softhsm_token: SoftHsmToken) -> None:
    with pytest.raises(KeyStoreError):
        Pkcs11KeyStore(module=softhsm_token.module, token_label="no-such-token", pin=softhsm_token.user_pin)
