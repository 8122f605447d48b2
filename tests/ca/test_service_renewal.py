"""CAService renewal: key rotation and reuse, the certificate being renewed, expired-certificate
recovery windows (fixed clocks, no sleeping), on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509

from broker_plugin.ca.service import NotAuthorized
from protocol.codes import ErrorCode, Profile, RevocationReason
from protocol.messages import CertificateIssued, CertificateRequest, Error, RenewalRequest, SnapshotRequest
from service_kit import DAY, Kit, make_csr, only_reply, rid


@pytest.fixture
def kit(registry) -> Kit:  # type: ignore[no-untyped-def]
    return Kit(registry)


async def test_renewal_with_a_new_key(kit: Kit) -> None:
    device, _, cert = await kit.mint("acme", "sensor-1", region="west")
    kit.clock.advance(20 * DAY)
    request_id = rid()
    new_key, csr = make_csr("sensor-1")
    renewal = RenewalRequest(request_id=request_id, profile=Profile.IDENTITY, current_serial=cert.serial_number,
                             csr=csr)
    topic, reply = only_reply(await kit.dev(device, renewal))
    assert topic == "certmq/v1/acme/dev/sensor-1/res"
    assert isinstance(reply, CertificateIssued) and reply.request_id == request_id
    assert reply.x509.public_key() == new_key.public_key()
    assert reply.not_before == kit.clock.now
    record = await kit.registry.get_certificate("acme", reply.serial)
    assert record is not None and record.replaced_serial == cert.serial_number and record.region == "west"
    # The next suggested window lies in the new certificate's lifetime.
    assert reply.renewal_window is not None
    assert record.not_before < reply.renewal_window.start < reply.renewal_window.end < record.not_after
    # Retrying after success (the old certificate is no longer the newest) returns the same one.
    _, again = only_reply(await kit.dev(device, renewal))
    assert isinstance(again, CertificateIssued) and again.certificate == reply.certificate
    entries = [e async for e in kit.registry.audit_entries() if e.kind == "renew"]
    assert len(entries) == 1 and entries[0].details["replaced_serial"] == f"{cert.serial_number:x}"
    await kit.audit_ok()


async def test_key_reuse_follows_the_profile(kit: Kit) -> None:
    device, _, cert = await kit.mint("acme", "sensor-1")
    # identity: key reuse not allowed, neither by flag nor by sending the current key in a CSR.
    _, reply = only_reply(await kit.dev(device, RenewalRequest(
        request_id=rid(), profile=Profile.IDENTITY, current_serial=cert.serial_number, reuse_key=True)))
    assert isinstance(reply, Error) and reply.code == ErrorCode.KEY_REJECTED
    assert "does not allow key reuse" in reply.text and "new key" in reply.text
    old_key = (await kit.mint("acme", "sensor-2"))[1]
    device2 = (await kit.registry.certificates_for_device("acme", "sensor-2"))[0]
    identity2 = await kit.service.identify(x509.load_der_x509_certificate(device2.der))
    _, same_key_csr = make_csr("sensor-2", key=old_key)
    _, reply = only_reply(await kit.dev(identity2, RenewalRequest(
        request_id=rid(), profile=Profile.IDENTITY, current_serial=device2.serial, csr=same_key_csr)))
    assert isinstance(reply, Error) and reply.code == ErrorCode.KEY_REJECTED and "current key" in reply.text
    assert len(await kit.registry.certificates_for_device("acme", "sensor-2")) == 1
    # encryption: reuse allowed until max_key_age (50 days) since the key was first certified.
    key, csr = make_csr("sensor-1")
    _, enc = only_reply(await kit.dev(device, CertificateRequest(request_id=rid(), profile=Profile.ENCRYPTION, csr=csr)))
    assert isinstance(enc, CertificateIssued)
    kit.clock.advance(25 * DAY)
    _, reused = only_reply(await kit.dev(device, RenewalRequest(
        request_id=rid(), profile=Profile.ENCRYPTION, current_serial=enc.serial, reuse_key=True)))
    assert isinstance(reused, CertificateIssued) and reused.x509.public_key() == key.public_key()
    assert reused.serial != enc.serial


async def test_key_too_old_must_rotate(kit: Kit) -> None:
    device, _, _ = await kit.mint("acme", "sensor-1")
    key, csr = make_csr("sensor-1")
    _, enc = only_reply(await kit.dev(device, CertificateRequest(request_id=rid(), profile=Profile.ENCRYPTION, csr=csr)))
    assert isinstance(enc, CertificateIssued)
    kit.clock.advance(20 * DAY)
    # Keep the device's identity fresh (renew it with a new key) so only the key age matters.
    _, ident = only_reply(await kit.dev(device, RenewalRequest(
        request_id=rid(), profile=Profile.IDENTITY, current_serial=device.serial, csr=make_csr("sensor-1")[1])))
    assert isinstance(ident, CertificateIssued)
    device = await kit.service.identify(ident.x509)
    _, reused = only_reply(await kit.dev(device, RenewalRequest(
        request_id=rid(), profile=Profile.ENCRYPTION, current_serial=enc.serial, reuse_key=True)))
    assert isinstance(reused, CertificateIssued)
    kit.clock.advance(25 * DAY)  # day 45: the key is 45 days old, reuse is still allowed
    _, ident = only_reply(await kit.dev(device, RenewalRequest(
        request_id=rid(), profile=Profile.IDENTITY, current_serial=device.serial, csr=make_csr("sensor-1")[1])))
    assert isinstance(ident, CertificateIssued)
    device = await kit.service.identify(ident.x509)
    _, reused = only_reply(await kit.dev(device, RenewalRequest(
        request_id=rid(), profile=Profile.ENCRYPTION, current_serial=reused.serial, reuse_key=True)))
    assert isinstance(reused, CertificateIssued) and reused.x509.public_key() == key.public_key()
    kit.clock.advance(6 * DAY)  # day 51: older than max_key_age (50 days) since first certified
    _, refused = only_reply(await kit.dev(device, RenewalRequest(
        request_id=rid(), profile=Profile.ENCRYPTION, current_serial=reused.serial, reuse_key=True)))
    assert isinstance(refused, Error) and refused.code == ErrorCode.KEY_REJECTED and "max_key_age" in refused.text
    _, same_key = only_reply(await kit.dev(device, RenewalRequest(
        request_id=rid(), profile=Profile.ENCRYPTION, current_serial=reused.serial, csr=make_csr("sensor-1", key)[1])))
    assert isinstance(same_key, Error) and same_key.code == ErrorCode.KEY_REJECTED
    _, rotated = only_reply(await kit.dev(device, RenewalRequest(
        request_id=rid(), profile=Profile.ENCRYPTION, current_serial=reused.serial, csr=make_csr("sensor-1")[1])))
    assert isinstance(rotated, CertificateIssued) and rotated.x509.public_key() != key.public_key()


async def test_renewing_what_is_not_yours_or_not_active(kit: Kit) -> None:
    device, _, cert = await kit.mint("acme", "sensor-1")
    _, _, other = await kit.mint("acme", "sensor-2")
    _, enc = only_reply(await kit.dev(device, CertificateRequest(
        request_id=rid(), profile=Profile.ENCRYPTION, csr=make_csr("sensor-1")[1])))
    assert isinstance(enc, CertificateIssued)
    cases = [
        (other.serial_number, Profile.IDENTITY, ErrorCode.UNKNOWN_CERTIFICATE),  # another device's
        (cert.serial_number + 12345, Profile.IDENTITY, ErrorCode.UNKNOWN_CERTIFICATE),  # no such serial
        (cert.serial_number, Profile.ENCRYPTION, ErrorCode.UNKNOWN_CERTIFICATE),  # profile does not match
    ]
    for serial, profile, code in cases:
        _, reply = only_reply(await kit.dev(device, RenewalRequest(
            request_id=rid(), profile=profile, current_serial=serial, csr=make_csr("sensor-1")[1])))
        assert isinstance(reply, Error) and reply.code == code, (serial, profile)
    await kit.service.revoke(tenant="acme", serial=enc.serial, reason=RevocationReason.KEY_COMPROMISE, actor="op")
    _, reply = only_reply(await kit.dev(device, RenewalRequest(
        request_id=rid(), profile=Profile.ENCRYPTION, current_serial=enc.serial, csr=make_csr("sensor-1")[1])))
    assert isinstance(reply, Error) and reply.code == ErrorCode.CERTIFICATE_REVOKED
    assert len(await kit.registry.certificates_for_device("acme", "sensor-1")) == 2


async def test_expired_certificate_recovery_window(kit: Kit) -> None:
    _, _, cert = await kit.mint("acme", "sensor-1")
    expiry = cert.not_valid_after_utc
    kit.clock.now = expiry + 6 * DAY  # identity profile: 7 days of recovery
    with pytest.raises(NotAuthorized):
        await kit.service.identify(cert)
    device = await kit.service.identify(cert, allow_expired=True)
    # Nothing but a renewal of this very certificate.
    _, reply = only_reply(await kit.dev(device, CertificateRequest(
        request_id=rid(), profile=Profile.OTA_SIGNING, csr=make_csr("sensor-1")[1])))
    assert isinstance(reply, Error) and reply.code == ErrorCode.NOT_AUTHORIZED and "expired" in reply.text
    _, reply = only_reply(await kit.dev(device, SnapshotRequest(request_id=rid())))
    assert isinstance(reply, Error) and reply.code == ErrorCode.NOT_AUTHORIZED
    # The TLS handshake proved the registered key; the CSR proves the new one.
    new_key, csr = make_csr("sensor-1")
    _, renewed = only_reply(await kit.dev(device, RenewalRequest(
        request_id=rid(), profile=Profile.IDENTITY, current_serial=cert.serial_number, csr=csr)))
    assert isinstance(renewed, CertificateIssued) and renewed.x509.public_key() == new_key.public_key()
    assert renewed.not_after > kit.clock.now

    # A second device past the window gets a clear error.
    _, _, late_cert = await kit.mint("acme", "sensor-2")
    kit.clock.now = late_cert.not_valid_after_utc + 7 * DAY + dt.timedelta(seconds=1)
    late = await kit.service.identify(late_cert, allow_expired=True)
    _, reply = only_reply(await kit.dev(late, RenewalRequest(
        request_id=rid(), profile=Profile.IDENTITY, current_serial=late_cert.serial_number,
        csr=make_csr("sensor-2")[1])))
    assert isinstance(reply, Error) and reply.code == ErrorCode.RECOVERY_WINDOW_PASSED
    assert "re-provision" in reply.text and "expired at" in reply.text
    assert len(await kit.registry.certificates_for_device("acme", "sensor-2")) == 1
    refusals = await kit.refusals()
    assert refusals[-1]["code"] == ErrorCode.RECOVERY_WINDOW_PASSED
    await kit.audit_ok()


async def test_no_recovery_where_the_profile_has_none(kit: Kit) -> None:
    device, _, _ = await kit.mint("acme", "sensor-1")
    _, ota = only_reply(await kit.dev(device, CertificateRequest(
        request_id=rid(), profile=Profile.OTA_SIGNING, csr=make_csr("sensor-1")[1])))
    assert isinstance(ota, CertificateIssued)
    kit.clock.now = ota.not_after + dt.timedelta(seconds=1)
    expired = await kit.service.identify(ota.x509, allow_expired=True)
    _, reply = only_reply(await kit.dev(expired, RenewalRequest(
        request_id=rid(), profile=Profile.OTA_SIGNING, current_serial=ota.serial, csr=make_csr("sensor-1")[1])))
    assert isinstance(reply, Error) and reply.code == ErrorCode.RECOVERY_WINDOW_PASSED
    assert "no recovery after expiry" in reply.text
