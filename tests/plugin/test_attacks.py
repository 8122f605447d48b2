"""Attacks through the broker, each stopped; every docstring says by what."""

from __future__ import annotations

import os

import aiomqtt
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from protocol.codec import encode
from protocol.codes import ErrorCode, Profile
from protocol.messages import CertificateIssued, CertificateRequest, Error, RenewalRequest

from .conftest import Ca, client, make_csr, next_message, no_message


def _cert_request(cn: str) -> bytes:
    return encode(CertificateRequest(request_id=os.urandom(16), profile=Profile.IDENTITY, csr=make_csr(cn)[1]))


async def test_csr_naming_another_device_is_refused(make_broker, ca: Ca) -> None:
    """A claim certificate asks, on sensor-1's provisioning topic, for a CSR naming sensor-2.
    Stopped by the service's CSR identity check: Error IDENTITY_MISMATCH, nothing issued."""
    broker = await make_broker()
    claim = await ca.claim("acme", "line-1")
    async with client(broker, claim) as c:
        await c.publish("certmq/v1/acme/prov/sensor-1/req", _cert_request("sensor-2"), qos=1)
        topic, reply = await next_message(c)
    assert topic == "certmq/v1/acme/prov/sensor-1/res"
    assert isinstance(reply, Error) and reply.code == ErrorCode.IDENTITY_MISMATCH
    assert await ca.registry.certificates_for_device("acme", "sensor-1") == []


async def test_claim_used_up_is_refused(make_broker, ca: Ca) -> None:
    """A claim allowed once provisions a second device. Stopped by the claim's max_uses in the
    registry: Error CLAIM_REFUSED."""
    broker = await make_broker()
    claim = await ca.claim("acme", "once", max_uses=1)
    async with client(broker, claim) as c:
        await c.publish("certmq/v1/acme/prov/sensor-a/req", _cert_request("sensor-a"), qos=1)
        _, first = await next_message(c)
        await c.publish("certmq/v1/acme/prov/sensor-b/req", _cert_request("sensor-b"), qos=1)
        _, second = await next_message(c)
    assert isinstance(first, CertificateIssued)
    assert isinstance(second, Error) and second.code == ErrorCode.CLAIM_REFUSED


async def test_claim_outside_its_policy_reaches_no_topic(make_broker, ca: Ca) -> None:
    """A 'sensor-*' claim publishes on prov/camera-1/req and subscribes to it. Stopped by the ACL
    (claim scope read at CONNECT): the publish is dropped before the CA, the SUBACK is 0x80."""
    broker = await make_broker()
    claim = await ca.claim("acme", "line-2")
    async with client(broker, claim) as c:
        granted = await c.subscribe("certmq/v1/acme/prov/camera-1/res", qos=1)
        assert granted[0].value == 0x80
        await c.publish("certmq/v1/acme/prov/camera-1/req", _cert_request("camera-1"), qos=1)
        await c.publish("certmq/v1/acme/dev/sensor-1/req", _cert_request("sensor-1"), qos=1)
        await no_message(c, 1.0)
    assert await ca.registry.certificates_for_device("acme", "camera-1") == []


async def test_cross_tenant_topics_are_unreachable(make_broker, ca: Ca) -> None:
    """An acme device publishes on globex's request topic of a device with the same id and reads
    globex's feed. Stopped by the ACL (tenant = the CA that signed the certificate): nothing reaches
    the CA, SUBACK 0x80."""
    broker = await make_broker()
    dev = await ca.mint("acme", "shared-id")
    async with client(broker, dev) as c:
        granted = await c.subscribe("certmq/v1/globex/rev/#", qos=1)
        assert granted[0].value == 0x80
        await c.publish("certmq/v1/globex/dev/shared-id/req", encode(RenewalRequest(
            request_id=os.urandom(16), profile=Profile.IDENTITY, current_serial=dev.serial, reuse_key=True)), qos=1)
        await no_message(c, 1.0)
    assert await ca.registry.certificates_for_device("globex", "shared-id") == []


async def test_client_id_must_be_the_certificate_identity(make_broker, ca: Ca) -> None:
    """Device sensor-x connects with client id sensor-y. Stopped by the client-id hook: CONNACK 5."""
    broker = await make_broker()
    dev = await ca.mint("acme", "sensor-x")
    with pytest.raises(aiomqtt.MqttError):
        async with client(broker, dev, client_id="sensor-y"):
            pass


async def test_forged_reply_on_a_res_topic_is_dropped(make_broker, ca: Ca) -> None:
    """Device evil publishes a fake CertificateIssued on victim's res topic and on its own, and a fake
    feed message. Stopped by the ACL: no client may publish on res, rev or findings topics."""
    broker = await make_broker()
    victim, evil = await ca.mint("acme", "victim"), await ca.mint("acme", "evil")
    fake = encode(CertificateIssued(request_id=os.urandom(16), certificate=victim.der))
    async with client(broker, victim) as v, client(broker, evil) as e:
        await v.subscribe("certmq/v1/acme/dev/victim/res", qos=1)
        await v.subscribe("certmq/v1/acme/rev/+/delta", qos=1)
        await e.subscribe("certmq/v1/acme/dev/evil/res", qos=1)
        for topic in ("certmq/v1/acme/dev/victim/res", "certmq/v1/acme/dev/evil/res",
                      "certmq/v1/acme/rev/-/delta", "certmq/v1/acme/ops/findings"):
            await e.publish(topic, fake, qos=1)
        await no_message(v, 1.0)
        await no_message(e, 0.2)


async def test_replies_reach_only_the_requesting_session(make_broker, ca: Ca) -> None:
    """Eve subscribes to '#', to alice's res topic and to alice's req topic while alice renews.
    Stopped twice: the ACL refuses those filters (SUBACK 0x80), and the reply never enters the topic
    tree anyway (deliver_to writes to alice's connection only). Alice gets exactly one reply."""
    broker = await make_broker()
    alice, eve = await ca.mint("acme", "alice"), await ca.mint("acme", "eve")
    async with client(broker, alice) as a, client(broker, eve) as e:
        for flt in ("#", "certmq/v1/acme/dev/alice/res", "certmq/v1/acme/dev/alice/req", "certmq/v1/acme/dev/+/res"):
            granted = await e.subscribe(flt, qos=1)
            assert granted[0].value == 0x80, flt
        assert (await e.subscribe("certmq/v1/acme/dev/eve/res", qos=1))[0].value == 1
        await a.publish("certmq/v1/acme/dev/alice/req", encode(RenewalRequest(
            request_id=os.urandom(16), profile=Profile.IDENTITY, current_serial=alice.serial, reuse_key=True)), qos=1)
        topic, reply = await next_message(a)
        assert topic == "certmq/v1/acme/dev/alice/res" and isinstance(reply, CertificateIssued)
        await no_message(e, 1.0)
        await no_message(a, 0.2)


async def test_devices_sharing_a_claim_enroll_side_by_side(make_broker, ca: Ca) -> None:
    """Two devices of one production line share a claim certificate and enroll at the same time,
    each under the device id it claims as MQTT client id: neither session takes over the other, and
    each reply reaches the device that asked. The claim certificate cannot use a client id its
    claim does not allow (stopped by the client-id hook: CONNACK 5), nor an operational device's
    id to take over that device's session (session ownership belongs to the certificate)."""
    broker = await make_broker()
    claim = await ca.claim("acme", "line-7")
    async with client(broker, claim, client_id="sensor-a") as a, client(broker, claim, client_id="sensor-b") as b:
        rids = {}
        for c, device in ((a, "sensor-a"), (b, "sensor-b")):
            await c.subscribe(f"certmq/v1/acme/prov/{device}/res", qos=1)
            _, csr = make_csr(device)
            rids[device] = os.urandom(16)
            await c.publish(f"certmq/v1/acme/prov/{device}/req", encode(CertificateRequest(
                request_id=rids[device], profile=Profile.IDENTITY, csr=csr)), qos=1)
        for c, device in ((a, "sensor-a"), (b, "sensor-b")):
            topic, reply = await next_message(c)
            assert topic == f"certmq/v1/acme/prov/{device}/res"
            assert isinstance(reply, CertificateIssued) and reply.request_id == rids[device]
            cn = x509.load_der_x509_certificate(reply.certificate).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            assert cn[0].value == device
    with pytest.raises(aiomqtt.MqttError):
        async with client(broker, claim, client_id="pump-1"):  # outside the claim's sensor-* pattern
            pass
    live = await ca.mint("acme", "sensor-live")
    async with client(broker, live) as owner:
        with pytest.raises(aiomqtt.MqttError):
            async with client(broker, claim, client_id="sensor-live"):
                pass
        await owner.publish("certmq/v1/acme/dev/sensor-live/app/x", b"still here", qos=0)  # not taken over


async def test_a_device_always_wins_its_own_client_id(make_broker, ca: Ca) -> None:
    """A claim session holding client id sensor-c (it provisioned sensor-c) must not lock the real
    sensor-c out: the device's own certificate, whose name *is* the client id, takes the id over
    with a fresh session and the claim session is closed. The reverse never happens (previous test)."""
    broker = await make_broker()
    claim = await ca.claim("acme", "line-8")
    device = await ca.mint("acme", "sensor-c")
    async with client(broker, claim, client_id="sensor-c") as squatter:
        async with client(broker, device) as owner:
            await owner.subscribe("certmq/v1/acme/dev/sensor-c/res", qos=1)
            with pytest.raises(aiomqtt.MqttError):
                async for _ in squatter.messages:  # closed by the broker
                    pass
        assert broker.identity_of("sensor-c") is None or broker.identity_of("sensor-c").name == "sensor-c"
