"""End to end over real TLS: provisioning with a claim certificate, renewal, expired recovery,
and a broker restart over the same data directory (SQLite registry)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from broker_plugin.plugin import CertmqPlugin
from protocol.codec import encode
from protocol.codes import Profile
from protocol.messages import CertificateIssued, CertificateRequest, RenewalRequest

from .conftest import NOW, Ca, client, make_csr, next_message, start_broker, write_creds


def _verify_chain(issued: CertificateIssued) -> x509.Certificate:
    cert = x509.load_der_x509_certificate(issued.certificate)
    issuing, root = (x509.load_der_x509_certificate(d) for d in issued.chain)
    cert.verify_directly_issued_by(issuing)
    issuing.verify_directly_issued_by(root)
    root.verify_directly_issued_by(root)
    return cert


async def _provision(broker, ca: Ca, device_id: str, tmp: Path):  # type: ignore[no-untyped-def]
    claim = await ca.claim("acme", "line-3")
    async with client(broker, claim) as c:
        await c.subscribe(f"certmq/v1/acme/prov/{device_id}/res", qos=1)
        key, csr = make_csr(device_id)
        rid = os.urandom(16)
        await c.publish(f"certmq/v1/acme/prov/{device_id}/req",
                        encode(CertificateRequest(request_id=rid, profile=Profile.IDENTITY, csr=csr)), qos=1)
        topic, reply = await next_message(c)
    assert topic == f"certmq/v1/acme/prov/{device_id}/res"
    assert isinstance(reply, CertificateIssued), reply
    assert reply.request_id == rid
    return write_creds(tmp, "acme", device_id, reply.certificate, key, ca.chain("acme")), reply


async def test_provision_then_connect_and_renew_over_mqtt(make_broker, ca: Ca, tmp_path: Path) -> None:
    """A claim certificate gets an operational certificate on the provisioning topic; the chain
    verifies; the device reconnects with it and renews on its own request topic."""
    broker = await make_broker()
    device, issued = await _provision(broker, ca, "sensor-1", tmp_path)
    cert = _verify_chain(issued)
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == ["sensor-1"]
    async with client(broker, device) as c:
        key, csr = make_csr("sensor-1")
        rid = os.urandom(16)
        await c.publish("certmq/v1/acme/dev/sensor-1/req", encode(RenewalRequest(
            request_id=rid, profile=Profile.IDENTITY, current_serial=device.serial, csr=csr)), qos=1)
        topic, reply = await next_message(c)
    assert topic == "certmq/v1/acme/dev/sensor-1/res"
    assert isinstance(reply, CertificateIssued) and reply.request_id == rid
    renewed = _verify_chain(reply)
    assert renewed.serial_number != device.serial
    assert renewed.public_key() == key.public_key()
    assert CertmqPlugin.of(broker).stats["batches"] >= 2


async def test_broker_restart_keeps_state(datadir: Path, ca: Ca, tmp_path: Path) -> None:
    """The registry is the SQLite file of the data directory: a certificate issued through one broker
    process works with the next one, and a claim spent there stays spent."""
    first = await start_broker(datadir)
    try:
        device, _ = await _provision(first, ca, "sensor-7", tmp_path)
    finally:
        await first.shutdown()
    second = await start_broker(datadir)
    try:
        async with client(second, device) as c:
            await c.publish("certmq/v1/acme/dev/sensor-7/req", encode(RenewalRequest(
                request_id=os.urandom(16), profile=Profile.IDENTITY, current_serial=device.serial, reuse_key=True)),
                qos=1)
            _, reply = await next_message(c)
        assert isinstance(reply, CertificateIssued)
        records = await ca.registry.certificates_for_device("acme", "sensor-7")
        assert {r.serial for r in records} >= {device.serial, x509.load_der_x509_certificate(reply.certificate).serial_number}
    finally:
        await second.shutdown()


async def test_expired_certificate_may_only_renew(make_broker, ca: Ca) -> None:
    """An expired certificate inside its profile's 7-day recovery window connects (the TLS time check
    is off; the identity hook checks validity), but its session reaches only its own req/res topics:
    the app topic its capability grants is refused, and the renewal works."""
    broker = await make_broker()
    old = await ca.mint("acme", "sensor-old", clock=lambda: NOW() - dt.timedelta(days=32))
    assert x509.load_der_x509_certificate(old.der).not_valid_after_utc < NOW()
    async with client(broker, old) as c:
        result = await c.subscribe("certmq/v1/acme/dev/sensor-old/app/telemetry", qos=1)
        assert result[0].value == 0x80
        result = await c.subscribe("certmq/v1/acme/rev/#", qos=1)
        assert result[0].value == 0x80
        await c.publish("certmq/v1/acme/dev/sensor-old/req", encode(RenewalRequest(
            request_id=os.urandom(16), profile=Profile.IDENTITY, current_serial=old.serial, reuse_key=True)), qos=1)
        _, reply = await next_message(c)
    assert isinstance(reply, CertificateIssued), reply


async def test_expired_beyond_recovery_is_refused(make_broker, ca: Ca) -> None:
    """Past the recovery window the identity hook refuses the certificate at CONNECT."""
    broker = await make_broker()
    old = await ca.mint("acme", "sensor-dead", clock=lambda: NOW() - dt.timedelta(days=40))
    with pytest.raises(aiomqtt.MqttError):
        async with client(broker, old):
            pass


async def test_echo_mode_answers_through_deliver_to(make_broker, ca: Ca) -> None:
    """The benchmark baseline answers every request with the fixed reply on the requester's res topic."""
    broker = await make_broker(echo=True, echo_reply_bytes=100, rate=0.0)
    dev = await ca.mint("acme", "sensor-e")
    async with client(broker, dev) as c:
        for _ in range(5):
            await c.publish("certmq/v1/acme/dev/sensor-e/req", b"anything", qos=1)
        got = []
        async for m in c.messages:
            got.append((str(m.topic), bytes(m.payload)))  # type: ignore[arg-type]
            if len(got) == 5:
                break
    assert got == [("certmq/v1/acme/dev/sensor-e/res", bytes(100))] * 5
    # A QoS 1 reply is counted once the client's PUBACK is back, which can trail the message.
    stats = CertmqPlugin.of(broker).stats
    for _ in range(100):
        if stats["replies"] == 5:
            break
        await asyncio.sleep(0.01)
    assert stats["replies"] == 5


async def test_unknown_certificate_is_refused(make_broker, ca: Ca, tmp_path: Path) -> None:
    """A certificate signed by the tenant's CA key but never recorded in the registry is refused:
    identify() demands the registry's exact DER."""
    broker = await make_broker()
    authority = ca.service._authorities["acme"]  # noqa: SLF001
    key, _ = make_csr("ghost")
    now = NOW()
    der = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ghost")]))
           .issuer_name(authority.issuing.subject).public_key(key.public_key())
           .serial_number(x509.random_serial_number())
           .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
           .sign(authority.key, hashes.SHA256())).public_bytes(serialization.Encoding.DER)
    ghost = write_creds(tmp_path / "g", "acme", "ghost", der, key, ca.chain("acme"))
    with pytest.raises(aiomqtt.MqttError):
        async with client(broker, ghost):
            pass
