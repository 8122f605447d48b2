"""CAService: provisioning through claims, idempotency, replies and refusals (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

import broker_plugin.ca.claims as claims_module
import broker_plugin.ca.feeds as feeds_module
import broker_plugin.ca.identity as identity_module
import broker_plugin.ca.service as service_module
from broker_plugin.ca.claims import ClaimPolicy, load_claim_policy
from broker_plugin.ca.policy import PolicyError
from broker_plugin.ca.service import NO_REGION, IdentityKind
from broker_plugin.store.base import CertificateKind, open_registry
from protocol.codes import ErrorCode, Profile
from protocol.messages import CertificateIssued, CertificateRequest, Error, ProvisioningParameters
from protocol.renewal import RenewalPolicy, renewal_window
from protocol.topics import provisioning_request_topic, provisioning_response_topic
from service_kit import DAY, Kit, make_authority, make_csr, only_reply, rid


@pytest.fixture
def kit(registry) -> Kit:  # type: ignore[no-untyped-def]
    return Kit(registry)


@pytest.mark.parametrize("module", [service_module, claims_module, identity_module, feeds_module])
def test_all_is_complete(module) -> None:  # type: ignore[no-untyped-def]
    assert all(hasattr(module, n) for n in module.__all__)
    public = {n for n, v in vars(module).items()
              if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__}
    assert public <= set(module.__all__)
    assert all(getattr(module, n).__doc__ for n in public)


async def test_claim_provisions_an_operational_certificate(kit: Kit) -> None:
    claim = await kit.claim_credential("acme", "claim-1")
    assert claim.kind is IdentityKind.BOOTSTRAP and claim.name == "claim-1"
    request_id = rid()
    outcome = await kit.provision(claim, "sensor-1", request_id=request_id, region="west")
    topic, reply = only_reply(outcome)
    assert topic == provisioning_response_topic("acme", "sensor-1")
    assert isinstance(reply, CertificateIssued) and reply.request_id == request_id
    authority = kit.authorities["acme"]
    assert reply.chain == authority.chain_der()
    cert = reply.x509
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "sensor-1"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "acme"
    cert.verify_directly_issued_by(authority.issuing)
    # Committed before it was returned, as the device's operational certificate, in its region.
    record = await kit.registry.get_certificate("acme", cert.serial_number)
    assert record is not None and record.der == reply.certificate
    assert record.kind is CertificateKind.OPERATIONAL and record.region == "west"
    assert reply.status_position is not None
    assert (record.status_list_id, record.status_index) == (reply.status_position.list_id, reply.status_position.index)
    assert cert.serial_number.bit_length() >= 128
    # The server's suggested window is the profile's fractions of this certificate's lifetime.
    expected = renewal_window(not_before=record.not_before, not_after=record.not_after,
                              policy=RenewalPolicy(start=0.6, end=0.8))
    assert reply.renewal_window is not None
    assert abs((reply.renewal_window.start - expected.start).total_seconds()) < 1
    assert abs((reply.renewal_window.end - expected.end).total_seconds()) < 1
    uses = await kit.registry.claim_uses("acme", "claim-1")
    assert [(u.device_id, u.serial) for u in uses] == [("sensor-1", cert.serial_number)]
    # The new certificate works as a device identity.
    device = await kit.service.identify(cert)
    assert (device.kind, device.name, device.tenant) == (IdentityKind.DEVICE, "sensor-1", "acme")
    await kit.audit_ok()


async def test_region_falls_back_to_claim_policy_then_tenant_default(kit: Kit) -> None:
    claim = await kit.claim_credential("acme", "claim-r", region="north")
    _, first = only_reply(await kit.provision(claim, "sensor-a"))
    claim2 = await kit.claim_credential("acme", "claim-d")
    _, second = only_reply(await kit.provision(claim2, "sensor-b"))
    assert isinstance(first, CertificateIssued) and isinstance(second, CertificateIssued)
    regions = [(await kit.registry.get_certificate("acme", r.serial)).region for r in (first, second)]  # type: ignore[union-attr]
    assert regions == ["north", "eu"]
    # A tenant without a default region files region-less certificates under NO_REGION.
    bare = Kit(kit.registry, {"solo": make_authority("solo", default_region=None)}, kit.clock)
    claim3 = await bare.claim_credential("solo", "claim-s")
    _, third = only_reply(await bare.provision(claim3, "sensor-c"))
    assert isinstance(third, CertificateIssued)
    assert (await kit.registry.get_certificate("solo", third.serial)).region == NO_REGION  # type: ignore[union-attr]


async def test_same_request_id_same_certificate_also_after_restart(kit: Kit, registry_url: str) -> None:
    claim = await kit.claim_credential("acme", "claim-1")
    request_id = rid()
    _, csr = make_csr("sensor-1")
    _, first = only_reply(await kit.provision(claim, "sensor-1", request_id=request_id, csr=csr))
    _, again = only_reply(await kit.provision(claim, "sensor-1", request_id=request_id, csr=csr))
    assert isinstance(first, CertificateIssued) and isinstance(again, CertificateIssued)
    assert again.certificate == first.certificate
    await kit.registry.close()
    reopened = await open_registry(registry_url)
    try:
        restarted = kit.reopened(reopened)
        _, after = only_reply(await restarted.provision(claim, "sensor-1", request_id=request_id, csr=csr))
        assert isinstance(after, CertificateIssued) and after.certificate == first.certificate
        # A different request under the same id is refused, and nothing new is issued.
        _, reused = only_reply(await restarted.provision(claim, "sensor-1", request_id=request_id))
        assert isinstance(reused, Error) and reused.code == ErrorCode.REQUEST_ID_REUSED
        assert reused.request_id == request_id
        certs = await reopened.certificates_for_device("acme", "sensor-1")
        assert [c.serial for c in certs] == [first.serial]
        assert len(await reopened.claim_uses("acme", "claim-1")) == 1
        await restarted.audit_ok()
    finally:
        await reopened.close()


async def test_duplicate_requests_in_one_batch_yield_one_certificate(kit: Kit) -> None:
    claim = await kit.claim_credential("acme", "claim-1")
    request_id = rid()
    _, csr = make_csr("sensor-1")
    message = CertificateRequest(request_id=request_id, profile=Profile.IDENTITY, csr=csr,
                                 provisioning=ProvisioningParameters(device_id="sensor-1"))
    from protocol.codec import encode

    item = (claim, provisioning_request_topic("acme", "sensor-1"), encode(message))
    outcomes = await kit.service.handle_many([item, item])
    replies = [only_reply(o)[1] for o in outcomes]
    assert all(isinstance(r, CertificateIssued) for r in replies)
    assert replies[0].certificate == replies[1].certificate  # type: ignore[union-attr]
    assert len(await kit.registry.certificates_for_device("acme", "sensor-1")) == 1


async def test_batch_goes_to_one_sign_call(kit: Kit) -> None:
    calls: list[int] = []
    real = kit.signer.sign

    async def counting(jobs):  # type: ignore[no-untyped-def]
        calls.append(len(jobs))
        return await real(jobs)

    kit.signer.sign = counting  # type: ignore[method-assign]
    claim = await kit.claim_credential("acme", "claim-1")
    calls.clear()
    from protocol.codec import encode

    items = []
    for n in range(4):
        device = f"sensor-{n}"
        message = CertificateRequest(request_id=rid(), profile=Profile.IDENTITY, csr=make_csr(device)[1])
        items.append((claim, provisioning_request_topic("acme", device), encode(message)))
    items.append((claim, provisioning_request_topic("acme", "sensor-x"), b"\xff"))  # refused before signing
    outcomes = await kit.service.handle_many(items)
    assert calls == [4]
    kinds = [type(only_reply(o)[1]) for o in outcomes]
    assert kinds == [CertificateIssued] * 4 + [Error]


async def test_csr_naming_another_device_is_refused(kit: Kit) -> None:
    claim = await kit.claim_credential("acme", "claim-1")
    request_id = rid()
    _, reply = only_reply(await kit.provision(claim, "sensor-1", request_id=request_id, csr=make_csr("sensor-2")[1]))
    assert isinstance(reply, Error) and reply.code == ErrorCode.IDENTITY_MISMATCH and reply.request_id == request_id
    assert await kit.registry.certificates_for_device("acme", "sensor-1") == []
    assert len(await kit.registry.claim_uses("acme", "claim-1")) == 0
    refusals = await kit.refusals()
    assert refusals[-1]["code"] == ErrorCode.IDENTITY_MISMATCH and "sensor-2" in refusals[-1]["reason"]
    await kit.audit_ok()


async def test_tenant_key_policy_applies(registry) -> None:  # type: ignore[no-untyped-def]
    kit = Kit(registry, {"acme": make_authority("acme", key_policy={"allowed": ["p256"]})})
    claim = await kit.claim_credential("acme", "claim-1")
    _, csr = make_csr("sensor-1", key=ed25519.Ed25519PrivateKey.generate())
    _, reply = only_reply(await kit.provision(claim, "sensor-1", csr=csr))
    assert isinstance(reply, Error) and reply.code == ErrorCode.KEY_REJECTED and "ed25519" in reply.text
    _, reply = only_reply(await kit.provision(claim, "sensor-1", profile=Profile.OTA_SIGNING))
    assert isinstance(reply, CertificateIssued)


async def test_unknown_profile_refused(registry) -> None:  # type: ignore[no-untyped-def]
    kit = Kit(registry, {"acme": make_authority("acme", profiles={"identity": {}})})
    claim = await kit.claim_credential("acme", "claim-1")
    _, reply = only_reply(await kit.provision(claim, "sensor-1", profile=Profile.ENCRYPTION))
    assert isinstance(reply, Error) and reply.code == ErrorCode.UNKNOWN_PROFILE


async def test_undecodable_payload_gets_error_without_request_id(kit: Kit) -> None:
    device, _, _ = await kit.mint("acme", "sensor-1")
    before = await kit.registry.count_by_status("acme")
    for payload, code in ((b"\xff\x00", ErrorCode.MALFORMED), (cbor2.dumps({0: 1, 1: 1, 2: b"x" * 70_000}), ErrorCode.TOO_LARGE)):
        topic, reply = only_reply(await kit.service.handle(device, "certmq/v1/acme/dev/sensor-1/req", payload))
        assert topic == "certmq/v1/acme/dev/sensor-1/res"
        assert isinstance(reply, Error) and reply.code == code and reply.request_id is None
    assert await kit.registry.count_by_status("acme") == before
    assert [r["code"] for r in await kit.refusals()] == [ErrorCode.MALFORMED, ErrorCode.TOO_LARGE]
    await kit.audit_ok()


async def test_unknown_message_type(kit: Kit) -> None:
    device, _, _ = await kit.mint("acme", "sensor-1")
    payload = cbor2.dumps({0: 1, 1: 99, 2: rid()}, canonical=True)
    _, reply = only_reply(await kit.service.handle(device, "certmq/v1/acme/dev/sensor-1/req", payload))
    assert isinstance(reply, Error) and reply.code == ErrorCode.UNKNOWN_MESSAGE_TYPE


# -- claims


async def test_claim_refusals_are_answered_and_audited(kit: Kit) -> None:
    listed = await kit.claim_credential("acme", "claim-list", device_ids=["cam-1", "cam-2"], max_uses=5)
    expired = await kit.claim_credential("acme", "claim-old", not_after=kit.clock.now + DAY)
    once = await kit.claim_credential("acme", "claim-once", max_uses=1)
    unregistered, _, _ = await kit.mint("acme", "claim-none", CertificateKind.BOOTSTRAP)
    cases = [
        (listed, "cam-3", "may not claim"),
        (await kit.claim_credential("acme", "claim-glob", pattern="sensor-eu-*"), "sensor-us-1", "may not claim"),
        (unregistered, "sensor-1", "no claim policy"),
    ]
    _, ok = only_reply(await kit.provision(once, "sensor-7"))
    assert isinstance(ok, CertificateIssued)
    cases += [
        (once, "sensor-8", "used all 1"),
        (listed, "sensor-7", "may not claim"),
        (await kit.claim_credential("acme", "claim-more"), "sensor-7", "already provisioned"),
    ]
    for claim, device, why in cases:
        request_id = rid()
        topic, reply = only_reply(await kit.provision(claim, device, request_id=request_id))
        assert topic == provisioning_response_topic("acme", device)
        assert isinstance(reply, Error) and reply.code == ErrorCode.CLAIM_REFUSED, (claim.name, device, reply)
        assert why in reply.text and reply.request_id == request_id
    kit.clock.advance(2 * DAY)
    _, late = only_reply(await kit.provision(expired, "sensor-9"))
    assert isinstance(late, Error) and late.code == ErrorCode.CLAIM_REFUSED and "expired" in late.text
    _, fine = only_reply(await kit.provision(listed, "cam-2"))
    assert isinstance(fine, CertificateIssued)
    refusals = [r for r in await kit.refusals() if r["code"] == ErrorCode.CLAIM_REFUSED]
    assert len(refusals) == len(cases) + 1 and all(r["reason"] for r in refusals)
    await kit.audit_ok()


async def test_provisioning_params_must_match_the_topic(kit: Kit) -> None:
    claim = await kit.claim_credential("acme", "claim-1")
    message = CertificateRequest(request_id=rid(), profile=Profile.IDENTITY, csr=make_csr("sensor-2")[1],
                                 provisioning=ProvisioningParameters(device_id="sensor-2"))
    from protocol.codec import encode

    _, reply = only_reply(await kit.service.handle(claim, provisioning_request_topic("acme", "sensor-1"),
                                                   encode(message)))
    assert isinstance(reply, Error) and reply.code == ErrorCode.IDENTITY_MISMATCH


async def test_concurrent_claims_for_the_last_use_one_wins(kit: Kit) -> None:
    claim = await kit.claim_credential("acme", "claim-1", max_uses=2)
    _, first = only_reply(await kit.provision(claim, "sensor-0"))
    assert isinstance(first, CertificateIssued)
    from protocol.codec import encode

    def item(device: str):  # type: ignore[no-untyped-def]
        message = CertificateRequest(request_id=rid(), profile=Profile.IDENTITY, csr=make_csr(device)[1])
        return claim, provisioning_request_topic("acme", device), encode(message)

    # One batch: both pass the service's checks, the registry's commit decides.
    batch = await kit.service.handle_many([item("sensor-1"), item("sensor-2")])
    # Separate concurrent handlers (another claim with one use left).
    other = await kit.claim_credential("acme", "claim-2", max_uses=1)
    racing = await asyncio.gather(
        kit.provision(other, "sensor-3"), kit.provision(other, "sensor-4"), kit.provision(other, "sensor-5")
    )
    for outcomes, claim_id in ((batch, "claim-1"), (racing, "claim-2")):
        replies = [only_reply(o)[1] for o in outcomes]
        won = [r for r in replies if isinstance(r, CertificateIssued)]
        lost = [r for r in replies if isinstance(r, Error)]
        assert len(won) == 1 and len(lost) == len(replies) - 1
        assert all(r.code == ErrorCode.CLAIM_REFUSED for r in lost)
        uses = await kit.registry.claim_uses("acme", claim_id)
        assert uses[-1].serial == won[0].serial
    assert (await kit.registry.count_by_status("acme"))["active"] == 2 + 3  # 2 claim certs + 3 devices
    await kit.audit_ok()


def test_claim_policy_validation_is_readable() -> None:
    import datetime as dt

    good = load_claim_policy({"pattern": "sensor-*", "max_uses": 3, "not_after": "2030-01-01T00:00:00Z"})
    assert good.allows("sensor-17") and not good.allows("Sensor-17") and not good.allows("cam-1")
    assert good.not_after == dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    listed = ClaimPolicy(device_ids=["a-1"], max_uses=1, not_after=dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
    assert listed.allows("a-1") and not listed.allows("a-2")
    bad = [
        ({"max_uses": 1, "not_after": "2030-01-01T00:00:00Z"}, "exactly one of device_ids and pattern"),
        ({"pattern": "x*", "device_ids": ["x1"], "max_uses": 1, "not_after": "2030-01-01T00:00:00Z"}, "exactly one"),
        ({"pattern": "x*", "max_uses": 0, "not_after": "2030-01-01T00:00:00Z"}, "max_uses:"),
        ({"pattern": "x*", "max_uses": 1, "not_after": "2030-01-01T00:00:00"}, "not_after: must be an aware"),
        ({"device_ids": ["a/b"], "max_uses": 1, "not_after": "2030-01-01T00:00:00Z"}, "device_ids"),
        ({"device_ids": [], "max_uses": 1, "not_after": "2030-01-01T00:00:00Z"}, "at least one"),
        ({"pattern": "x*", "max_uses": 1, "not_after": "2030-01-01T00:00:00Z", "uses": 3}, "uses: unknown field"),
    ]
    for data, why in bad:
        with pytest.raises(PolicyError, match=why):
            load_claim_policy(data)


async def test_register_claim_is_audited_and_validated(kit: Kit) -> None:
    with pytest.raises(PolicyError, match="max_uses"):
        await kit.service.register_claim(tenant="acme", claim_id="c", policy={"pattern": "*", "max_uses": -1,
                                                                            "not_after": "2030-01-01T00:00:00Z"},
                                         actor="op")
    with pytest.raises(ValueError, match="unknown tenant"):
        await kit.service.register_claim(tenant="nobody", claim_id="c", policy={}, actor="op")
    assert await kit.registry.get_claim("acme", "c") is None
    await kit.service.register_claim(tenant="acme", claim_id="c",
                                     policy={"pattern": "*", "max_uses": 2, "not_after": "2030-01-01T00:00:00Z"},
                                     actor="op")
    stored = await kit.registry.get_claim("acme", "c")
    assert stored is not None and stored.policy["max_uses"] == 2
    entries = [e async for e in kit.registry.audit_entries()]
    assert entries[-1].kind == "policy" and entries[-1].actor == "op" and entries[-1].subject == "c"


async def test_issue_direct_checks_the_csr(kit: Kit) -> None:
    from broker_plugin.ca.policy import PolicyRefusal

    with pytest.raises(PolicyRefusal) as caught:
        await kit.service.issue_direct(tenant="acme", device_id="dev-1", profile=Profile.IDENTITY,
                                       csr_der=make_csr("dev-2")[1], kind=CertificateKind.FACTORY, actor="line-3")
    assert caught.value.code == ErrorCode.IDENTITY_MISMATCH
    with pytest.raises(ValueError):
        await kit.service.issue_direct(tenant="acme", device_id="findings", profile=Profile.IDENTITY,
                                       csr_der=make_csr()[1], kind=CertificateKind.OPERATOR, actor="line-3")
    record = await kit.service.issue_direct(tenant="acme", device_id="dev-1", profile=Profile.IDENTITY,
                                            csr_der=make_csr()[1], kind=CertificateKind.FACTORY, actor="line-3")
    assert record.kind is CertificateKind.FACTORY
    stored = await kit.registry.get_certificate("acme", record.serial)
    assert stored == record
    cert = x509.load_der_x509_certificate(record.der)
    assert (await kit.service.identify(cert)).kind is IdentityKind.DEVICE
    entries = [e async for e in kit.registry.audit_entries() if e.kind == "issue"]
    assert entries[-1].actor == "line-3" and entries[-1].details["kind"] == "factory"


async def test_broken_signer_gives_transient_errors_and_issues_nothing(kit: Kit) -> None:
    claim = await kit.claim_credential("acme", "claim-1")

    async def broken(jobs):  # type: ignore[no-untyped-def]
        raise RuntimeError("worker pool died")

    kit.signer.sign = broken  # type: ignore[method-assign]
    request_id = rid()
    _, reply = only_reply(await kit.provision(claim, "sensor-1", request_id=request_id))
    assert isinstance(reply, Error) and reply.code == ErrorCode.INTERNAL and reply.transient
    assert reply.request_id == request_id
    assert await kit.registry.certificates_for_device("acme", "sensor-1") == []
    assert await kit.registry.claim_uses("acme", "claim-1") == []
    assert (await kit.refusals())[-1]["code"] == ErrorCode.INTERNAL
