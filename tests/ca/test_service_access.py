"""CAService: who may do what where -- identify(), topic rules, tenant isolation (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from broker_plugin.ca.service import IdentityKind, NotAuthorized
from broker_plugin.store.base import CertificateKind, CertificateStatus
from protocol.codec import encode
from protocol.codes import ErrorCode, Profile, RevocationReason
from protocol.messages import (
    CertificateIssued,
    CertificateRequest,
    Error,
    RenewalRequest,
    RevocationRequest,
    RevocationResult,
    RevocationSnapshot,
    SnapshotRequest,
)
from service_kit import DAY, Kit, make_csr, only_reply, rid


@pytest.fixture
def kit(registry) -> Kit:  # type: ignore[no-untyped-def]
    return Kit(registry)


def _resign(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, *, serial: int | None = None) -> x509.Certificate:
    """The same certificate content signed by another key (a forgery under the real issuer name)."""
    builder = (
        x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer).public_key(cert.public_key())  # type: ignore[arg-type]
        .serial_number(serial or cert.serial_number).not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for ext in cert.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    return builder.sign(key, hashes.SHA256())


# -- identify


async def test_identify_maps_kind_and_tenant_by_signature(kit: Kit) -> None:
    device, _, _ = await kit.mint("acme", "sensor-1")
    claim, _, _ = await kit.mint("acme", "claim-1", CertificateKind.BOOTSTRAP)
    operator, _, _ = await kit.mint("globex", "alice", CertificateKind.OPERATOR)
    assert (device.tenant, device.kind, device.name) == ("acme", IdentityKind.DEVICE, "sensor-1")
    assert (claim.tenant, claim.kind, claim.name) == ("acme", IdentityKind.BOOTSTRAP, "claim-1")
    assert (operator.tenant, operator.kind, operator.name) == ("globex", IdentityKind.OPERATOR, "alice")
    assert device.key == "device:sensor-1"


async def test_identify_refuses_forgeries_unknown_revoked_and_out_of_validity(kit: Kit) -> None:
    _, _, cert = await kit.mint("acme", "sensor-1")
    # Signed by tenant globex's issuing key under acme's issuer name: not acme's, not globex's.
    forged = _resign(cert, kit.authorities["globex"].key)
    with pytest.raises(NotAuthorized) as caught:
        await kit.service.identify(forged)
    assert caught.value.code == ErrorCode.NOT_AUTHORIZED and "not issued by" in caught.value.text
    with pytest.raises(NotAuthorized, match="not issued by"):
        await kit.service.identify(_resign(cert, ec.generate_private_key(ec.SECP256R1())))
    # Really signed by acme's CA, but never registered.
    stray = _resign(cert, kit.authorities["acme"].key, serial=cert.serial_number + 1)
    with pytest.raises(NotAuthorized, match="registry") as caught:
        await kit.service.identify(stray)
    assert caught.value.code == ErrorCode.NOT_AUTHORIZED
    # Not yet valid, then expired (and admitted for recovery only with allow_expired).
    kit.clock.now = cert.not_valid_before_utc - dt.timedelta(seconds=10)
    with pytest.raises(NotAuthorized, match="not valid before"):
        await kit.service.identify(cert)
    kit.clock.now = cert.not_valid_after_utc + DAY
    with pytest.raises(NotAuthorized, match="expired"):
        await kit.service.identify(cert)
    recovering = await kit.service.identify(cert, allow_expired=True)
    assert recovering.not_after < kit.clock.now
    await kit.service.revoke(tenant="acme", serial=cert.serial_number, reason=RevocationReason.KEY_COMPROMISE,
                             actor="op")
    with pytest.raises(NotAuthorized) as caught:
        await kit.service.identify(cert, allow_expired=True)
    assert caught.value.code == ErrorCode.CERTIFICATE_REVOKED
    refusals = await kit.refusals()
    assert [r["stage"] for r in refusals] == ["identify"] * 4
    await kit.audit_ok()


# -- topics


async def test_device_only_on_its_own_dev_topic(kit: Kit) -> None:
    device, _, _ = await kit.mint("acme", "sensor-1")
    await kit.mint("acme", "sensor-2")
    own_res = "certmq/v1/acme/dev/sensor-1/res"
    message = CertificateRequest(request_id=rid(), profile=Profile.ENCRYPTION, csr=make_csr("sensor-1")[1])
    for topic in (
        "certmq/v1/acme/dev/sensor-2/req",  # another device's topic
        "certmq/v1/acme/prov/sensor-1/req",  # provisioning is for claim credentials
        "certmq/v1/acme/ops/sensor-1/req",  # operator namespace
        "certmq/v1/globex/dev/sensor-1/req",  # another tenant, same device id
        "certmq/v1/acme/dev/sensor-1/res",  # not a request topic
        "elsewhere/sensor-1",  # not a certmq topic
    ):
        reply_topic, reply = only_reply(await kit.service.handle(device, topic, encode(message)))
        # The refusal goes to the asker's own response topic, never into someone else's.
        assert reply_topic == own_res, topic
        assert isinstance(reply, Error) and reply.code == ErrorCode.NOT_AUTHORIZED, topic
        assert reply.request_id == message.request_id
    assert await kit.registry.certificates_for_device("acme", "sensor-1", profile="encryption") == []
    assert await kit.registry.certificates_for_device("globex", "sensor-1") == []
    refusals = await kit.refusals()
    assert len(refusals) == 6 and all(r["code"] == ErrorCode.NOT_AUTHORIZED and r["reason"] for r in refusals)
    await kit.audit_ok()
    # On its own topic the same request succeeds.
    _, reply = only_reply(await kit.dev(device, message))
    assert isinstance(reply, CertificateIssued)


async def test_device_asks_for_another_profile(kit: Kit) -> None:
    device, _, _ = await kit.mint("acme", "sensor-1", region="west")
    _, reply = only_reply(await kit.dev(device, CertificateRequest(
        request_id=rid(), profile=Profile.OTA_SIGNING, csr=make_csr("sensor-1")[1])))
    assert isinstance(reply, CertificateIssued)
    record = await kit.registry.get_certificate("acme", reply.serial)
    assert record is not None and record.profile == "ota-signing" and record.region == "west"


async def test_claim_credential_only_on_provisioning_topics(kit: Kit) -> None:
    claim = await kit.claim_credential("acme", "claim-1")
    message = CertificateRequest(request_id=rid(), profile=Profile.IDENTITY, csr=make_csr("sensor-1")[1])
    for topic in ("certmq/v1/acme/dev/sensor-1/req", "certmq/v1/acme/ops/claim-1/req",
                  "certmq/v1/globex/prov/sensor-1/req"):
        outcome = await kit.service.handle(claim, topic, encode(message))
        assert outcome.replies == ()  # a claim credential has no topic of its own to be told on
    renewal = RenewalRequest(request_id=rid(), profile=Profile.IDENTITY, current_serial=claim.serial, reuse_key=True)
    _, reply = only_reply(await kit.service.handle(claim, "certmq/v1/acme/prov/sensor-1/req", encode(renewal)))
    assert isinstance(reply, Error) and reply.code == ErrorCode.NOT_AUTHORIZED
    refusals = await kit.refusals()
    assert len(refusals) == 4 and {r["actor"] for r in refusals} == {"bootstrap:claim-1"}
    assert (await kit.registry.count_by_status("acme"))["active"] == 1
    assert await kit.registry.certificates_for_device("globex", "sensor-1") == []


async def test_operator_only_on_its_own_ops_topic(kit: Kit) -> None:
    operator, _, _ = await kit.mint("acme", "alice", CertificateKind.OPERATOR)
    _, _, victim = await kit.mint("acme", "sensor-1")
    message = RevocationRequest(request_id=rid(), reason=RevocationReason.KEY_COMPROMISE, serial=victim.serial_number)
    for topic in ("certmq/v1/acme/ops/bob/req", "certmq/v1/acme/dev/alice/req"):
        reply_topic, reply = only_reply(await kit.service.handle(operator, topic, encode(message)))
        assert reply_topic == "certmq/v1/acme/ops/alice/res"
        assert isinstance(reply, Error) and reply.code == ErrorCode.NOT_AUTHORIZED
    # Operators revoke; they do not get certificates over MQTT.
    _, reply = only_reply(await kit.ops(operator, CertificateRequest(
        request_id=rid(), profile=Profile.IDENTITY, csr=make_csr("alice")[1])))
    assert isinstance(reply, Error) and reply.code == ErrorCode.NOT_AUTHORIZED
    assert (await kit.registry.get_certificate("acme", victim.serial_number)).status is CertificateStatus.ACTIVE  # type: ignore[union-attr]


async def test_devices_and_claims_cannot_revoke(kit: Kit) -> None:
    device, _, cert = await kit.mint("acme", "sensor-1")
    claim = await kit.claim_credential("acme", "claim-1")
    message = RevocationRequest(request_id=rid(), reason=RevocationReason.KEY_COMPROMISE, serial=cert.serial_number)
    _, reply = only_reply(await kit.dev(device, message))
    assert isinstance(reply, Error) and reply.code == ErrorCode.NOT_AUTHORIZED
    _, reply = only_reply(await kit.service.handle(claim, "certmq/v1/acme/prov/sensor-1/req", encode(message)))
    assert isinstance(reply, Error) and reply.code == ErrorCode.NOT_AUTHORIZED
    assert (await kit.registry.get_certificate("acme", cert.serial_number)).status is CertificateStatus.ACTIVE  # type: ignore[union-attr]


# -- tenants


async def test_tenant_isolation(kit: Kit) -> None:
    acme_device, _, acme_cert = await kit.mint("acme", "sensor-1")
    globex_device, _, _ = await kit.mint("globex", "sensor-1")  # same device id, other tenant
    globex_operator, _, _ = await kit.mint("globex", "alice", CertificateKind.OPERATOR)
    # Get a certificate from the other tenant: refused, nothing issued there.
    request = CertificateRequest(request_id=rid(), profile=Profile.ENCRYPTION, csr=make_csr("sensor-1")[1])
    _, reply = only_reply(await kit.dev(globex_device, request, tenant="acme"))
    assert isinstance(reply, Error) and reply.code == ErrorCode.NOT_AUTHORIZED
    assert await kit.registry.certificates_for_device("acme", "sensor-1", profile="encryption") == []
    # Renew the other tenant's certificate through one's own topic: not this tenant's certificate.
    renewal = RenewalRequest(request_id=rid(), profile=Profile.IDENTITY, current_serial=acme_cert.serial_number,
                             csr=make_csr("sensor-1")[1])
    _, reply = only_reply(await kit.dev(globex_device, renewal))
    assert isinstance(reply, Error) and reply.code == ErrorCode.UNKNOWN_CERTIFICATE
    # Read the other tenant's revocation list.
    _, reply = only_reply(await kit.dev(globex_device, SnapshotRequest(request_id=rid()), tenant="acme"))
    assert isinstance(reply, Error) and reply.code == ErrorCode.NOT_AUTHORIZED
    _, own = only_reply(await kit.dev(acme_device, SnapshotRequest(request_id=rid())))
    assert isinstance(own, RevocationSnapshot)
    # Revoke in the other tenant: on its own ops topic the serial is unknown; on acme's topic refused.
    revocation = RevocationRequest(request_id=rid(), reason=RevocationReason.KEY_COMPROMISE,
                                   serial=acme_cert.serial_number)
    _, reply = only_reply(await kit.ops(globex_operator, revocation))
    assert isinstance(reply, Error) and reply.code == ErrorCode.UNKNOWN_CERTIFICATE
    _, reply = only_reply(await kit.service.handle(globex_operator, "certmq/v1/acme/ops/alice/req",
                                                   encode(revocation)))
    assert isinstance(reply, Error) and reply.code == ErrorCode.NOT_AUTHORIZED
    by_device = RevocationRequest(request_id=rid(), reason=RevocationReason.KEY_COMPROMISE, device_id="sensor-1")
    _, reply = only_reply(await kit.ops(globex_operator, by_device))
    assert isinstance(reply, RevocationResult) and len(reply.serials) == 1  # globex's own sensor-1 only
    assert (await kit.registry.get_certificate("acme", acme_cert.serial_number)).status is CertificateStatus.ACTIVE  # type: ignore[union-attr]
    assert (await kit.service.identify(acme_cert)).tenant == "acme"
    await kit.audit_ok()
