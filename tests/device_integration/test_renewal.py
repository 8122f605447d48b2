"""Renewal over the real broker and real TLS: renew() rotates the key and proves the new certificate
with a real connection before it becomes current; rollback when the broker refuses the new
certificate; the renewal agent across a broker restart re-sends the same request id (one new
certificate in the registry); expired-certificate recovery (reuse_key) inside the profile's
expired_recovery window."""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from device_client import RenewalAgent, RotationRejected
from device_client.certstore import KEY_PREFIX
from device_client.mqtt import AiomqttTransport
from device_client.transport import ClientCredentials, IncomingMessage
from protocol import codec
from protocol.codes import Profile, RevocationReason
from protocol.messages import CertificateIssued, RenewalRequest

from .conftest import TENANT, WarpClock, BrokerHandle, Ca, device_client, enrolled, live_serials, make_device, now


async def test_renew_rotates_the_key_and_proves_the_certificate(broker: BrokerHandle, ca: Ca, tmp_path: Path) -> None:
    """renew(): a new key and certificate; the broker's live connection for the device is
    authenticated with the new serial (the proof) and the old one is kept as previous; the
    registry holds both. Before the proof the new certificate was only staged: the connection the
    request travelled on was the old certificate's."""
    device = await enrolled(tmp_path, broker, ca, "sensor-n1")
    old = device.store.current()
    assert old is not None
    seen_at_connect: list[tuple[int, int | None]] = []
    async with device_client(device, broker, ca) as dc:
        assert live_serials(broker, "sensor-n1") == [old.serial]
        real_connect = dc.transport.connect

        async def watch(credentials: ClientCredentials) -> None:
            cur = device.store.current()
            seen_at_connect.append((credentials.leaf().serial_number, None if cur is None else cur.serial))
            await real_connect(credentials)

        dc.transport.connect = watch  # type: ignore[method-assign]
        new = await dc.renew()
        assert live_serials(broker, "sensor-n1") == [new.serial]
    assert new.serial != old.serial
    assert new.certificate.public_key() != old.certificate.public_key()
    assert new.key_label != old.key_label
    # the proving connection used the new certificate while the old one was still current
    assert seen_at_connect == [(new.serial, old.serial)]
    assert device.store.previous() is not None and device.store.previous().serial == old.serial
    assert await ca.serials("sensor-n1") == {old.serial, new.serial}


async def test_rollback_when_the_broker_refuses_the_new_certificate(
        broker: BrokerHandle, ca: Ca, tmp_path: Path) -> None:
    """The new certificate is revoked between issuance and its first connection: the broker refuses
    it at CONNACK, renew() raises RotationRejected, next is discarded, the device is connected
    again with its current certificate (live on the broker), and a later renewal works."""
    device = await enrolled(tmp_path, broker, ca, "sensor-n2")
    old = device.store.current()
    assert old is not None
    async with device_client(device, broker, ca) as dc:
        real_connect = dc.transport.connect

        async def revoke_new_then_connect(credentials: ClientCredentials) -> None:
            serial = credentials.leaf().serial_number
            if serial != old.serial and serial not in revoked:
                revoked.append(serial)
                await broker.plugin.revoke(tenant=TENANT, reason=RevocationReason.KEY_COMPROMISE, actor="test",
                                           serial=serial)
            await real_connect(credentials)

        revoked: list[int] = []
        dc.transport.connect = revoke_new_then_connect  # type: ignore[method-assign]
        with pytest.raises(RotationRejected) as info:
            await dc.renew()
        assert "CONNACK" in info.value.reason
        assert device.store.current().serial == old.serial and device.store.next() is None
        assert dc.connected_as == Profile.IDENTITY.label
        assert live_serials(broker, "sensor-n2") == [old.serial]
        assert "rejected" in device.kinds()
        dc.transport.connect = real_connect  # type: ignore[method-assign]
        again = await dc.renew()
        assert live_serials(broker, "sensor-n2") == [again.serial]
    assert len(revoked) == 1 and again.serial not in (old.serial, revoked[0])


class LossyTransport(AiomqttTransport):
    """The production transport, except that the first certificate reply is lost on the way in."""

    lost: list[bytes]

    def messages(self) -> AsyncIterator[IncomingMessage]:
        inner = super().messages()

        async def filtered() -> AsyncIterator[IncomingMessage]:
            async for m in inner:
                if not self.lost and m.topic.endswith("/res"):
                    reply = codec.decode(m.payload)
                    if isinstance(reply, CertificateIssued):
                        self.lost.append(reply.request_id)
                        continue
                yield m

        return filtered()


async def test_agent_survives_a_broker_restart_with_the_same_request_id(
        broker: BrokerHandle, ca: Ca, tmp_path: Path) -> None:
    """The agent (clock 27 days ahead: renewal due) sends a RenewalRequest; the CA commits the
    certificate but the reply is lost and the broker restarts (same port, same data directory).
    The agent reconnects with backoff and re-sends the SAME request id; the CA answers from the
    registry: exactly one new certificate for the device, and it is the one made current."""
    device = await enrolled(tmp_path, broker, ca, "sensor-n3")
    old = device.store.current()
    assert old is not None
    sent: list[bytes] = []
    transport = LossyTransport(hostname="127.0.0.1", port=broker.port, timeout=5.0)
    transport.lost = []
    stop = asyncio.Event()
    warp = WarpClock(dt.timedelta(days=27))
    dc = device_client(device, broker, ca, clock=warp.now, sleep=warp.sleep, reply_timeout=2.0)
    dc.transport = transport
    real_publish = transport.publish

    async def record(topic: str, payload: bytes, qos: int = 1) -> None:
        message = codec.decode(payload)
        if isinstance(message, RenewalRequest):
            sent.append(message.request_id)
        await real_publish(topic, payload, qos)

    transport.publish = record  # type: ignore[method-assign]

    def on_event(event) -> None:  # type: ignore[no-untyped-def]
        device.events.append(event)
        if event.kind == "promoted":
            stop.set()

    dc.on_event = on_event
    agent = RenewalAgent(client=dc, reconnect_base=dt.timedelta(seconds=0.2), reconnect_cap=dt.timedelta(seconds=1))
    async with dc:
        running = asyncio.ensure_future(agent.run(stop))
        deadline = asyncio.get_running_loop().time() + 10
        while len(await ca.serials("sensor-n3")) < 2 or not transport.lost:
            assert asyncio.get_running_loop().time() < deadline, "the renewal was never committed"
            await asyncio.sleep(0.05)
        await broker.stop()
        await asyncio.sleep(0.5)
        await broker.start()
        await asyncio.wait_for(running, 20)
        current = device.store.current()
        assert current is not None and current.serial != old.serial
        assert live_serials(broker, "sensor-n3") == [current.serial]
    assert len(sent) >= 2 and set(sent) == {transport.lost[0]}  # one request id, re-sent
    assert await ca.serials("sensor-n3") == {old.serial, current.serial}  # no duplicate certificate
    assert agent.renewals == 1
    kinds = device.kinds()
    assert "retry" in kinds or "reconnect_failed" in kinds


async def test_expired_certificate_recovers_with_the_same_key(broker: BrokerHandle, ca: Ca, tmp_path: Path) -> None:
    """A certificate that expired 2 days ago (profile expired_recovery = 7 d): the client connects
    with it (the broker admits it for renewal only), renews with reuse_key, and the new certificate
    has the same key, is proven and current; the recovered session reaches the app topic the
    expired one could not."""
    minted = await ca.mint("sensor-n4", clock=lambda: now() - dt.timedelta(days=32))
    assert minted.certificate.not_valid_after_utc < now()
    device = make_device(tmp_path, "sensor-n4", ca)
    label = f"{KEY_PREFIX}identity-{secrets.token_hex(8)}"
    device.keys.save(label, minted.key)
    device.store.stage(Profile.IDENTITY, certificate=minted.certificate, chain=ca.chain[:1], key_label=label,
                       now=minted.certificate.not_valid_before_utc + dt.timedelta(minutes=10))
    device.store.commit(Profile.IDENTITY)
    async with device_client(device, broker, ca) as dc:
        assert live_serials(broker, "sensor-n4") == [minted.serial]  # admitted while expired
        slot = await dc.renew()
        assert live_serials(broker, "sensor-n4") == [slot.serial]
        app = f"certmq/v1/{TENANT}/dev/sensor-n4/app/telemetry"
        got: list[bytes] = []
        dc.on_message = lambda m: got.append(m.payload)
        await dc.subscribe(app)  # the recovered session has the full ACL again
        await dc.transport.publish(app, b"back")
        deadline = asyncio.get_running_loop().time() + 5
        while got != [b"back"]:
            assert asyncio.get_running_loop().time() < deadline, "app topic not reachable after recovery"
            await asyncio.sleep(0.02)
    assert slot.serial != minted.serial
    assert slot.certificate.public_key() == minted.key.public_key()
    assert slot.key_label == label
    assert slot.not_after > now() + dt.timedelta(days=29)
    assert await ca.serials("sensor-n4") == {minted.serial, slot.serial}
