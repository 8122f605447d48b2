"""A PUBLISH whose topic NAME holds a wildcard, followed by valid packets in the same write.

MQTT 3.1.1 forbids ``+`` and ``#`` in topic names (MQTT-3.3.2-2). amqtt 0.12.1's decoder raises
once it has read such a packet's topic and packet id, before its payload; its reader loop logs
"Message discarded" and reads on -- from the first byte of the rejected packet's payload. The
payload is then decoded as MQTT packets: a JSON payload swallows the client's next PUBLISH, and a
payload that is itself a PUBLISH is delivered as if the client had sent it. The hardened broker
closes the connection (§4.8: a protocol violation closes the network connection), after the
packets sent before the bad one are handled; the will is published, as for any abnormal close.

``test_stock_hole_*`` assert the bad behaviour on an unmodified amqtt broker (they fail the day
upstream fixes it); ``test_hardened_*`` run the same bytes against
:class:`broker_plugin.broker.HardenedBroker`. All connections are real TLS.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any

import pytest

from broker_plugin.broker import HardenedBroker
from mqttraw import PUBACK, Packet, RawClient, _packet, _str, connect, port_of

# A device's telemetry, published by mistake to a filter instead of its own topic. Its first
# bytes read as a PUBREL with a 34-byte remaining length: the next packet is eaten.
JSON_PAYLOAD = b'{"temp": 21.5, "unit": "C"}'
SMUGGLED = _packet(0x30, _str("t/smuggled") + b"not sent as a message")


def _publish(topic: str, payload: bytes, *, qos: int = 0, packet_id: int = 0) -> bytes:
    """One PUBLISH packet's bytes, the topic not checked (the point is to send bad ones)."""
    return _packet(0x30 | (qos << 1), _str(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload)


async def _pair(broker: Any, pki: Any, *, will: tuple[str, bytes] | None = None) -> tuple[RawClient, RawClient]:
    """A subscriber to ``t/#`` and a publisher ``dev1``."""
    port = port_of(broker)
    subscriber, _ = await connect(port, pki.client_context("sub"), "sub")
    assert await subscriber.subscribe("t/#", qos=1) == 1
    publisher, rc = await connect(port, pki.client_context("dev1"), "dev1", will=will)
    assert rc == 0
    return subscriber, publisher


async def _send(client: RawClient, *packets: bytes) -> None:
    """All ``packets`` in one write, so they reach the broker together."""
    client.writer.write(b"".join(packets))
    await client.writer.drain()


async def _pubacks(client: RawClient, within: float) -> tuple[list[int], bool]:
    """Packet ids acknowledged within ``within`` seconds, and whether the connection closed."""
    loop = asyncio.get_running_loop()
    deadline, ids = loop.time() + within, []
    while (left := deadline - loop.time()) > 0:
        try:
            packet = await client.read_packet(timeout=left)
        except asyncio.TimeoutError:
            return ids, False
        if packet is None:
            return ids, True
        if packet.kind == PUBACK:
            ids.append(struct.unpack("!H", packet.body[:2])[0])
    return ids, False


def _topics(messages: list[Packet]) -> list[str]:
    return [m.topic for m in messages]


# -- stock amqtt ---------------------------------------------------------------------------------


async def test_stock_hole_wildcard_publish_swallows_the_next_publish(stock: Any, pki: Any) -> None:
    """STOCK HOLE: the valid PUBLISH right behind a wildcard one is never delivered nor acknowledged,
    and the client is not told (its connection stays open)."""
    subscriber, publisher = await _pair(stock, pki)
    await _send(
        publisher,
        _publish("t/before", b"1", qos=1, packet_id=1),
        _publish("t/+/temp", JSON_PAYLOAD, qos=1, packet_id=2),
        _publish("t/after", b"3", qos=1, packet_id=3),
    )
    assert _topics(await subscriber.messages(1.0)) == ["t/before"]
    acked, closed = await _pubacks(publisher, 0.3)
    assert acked == [1]
    assert not closed
    await publisher.close()
    await subscriber.disconnect()


async def test_stock_hole_wildcard_publish_payload_read_as_packets(stock: Any, pki: Any) -> None:
    """STOCK HOLE: the payload of the rejected PUBLISH is decoded as the client's next packets."""
    subscriber, publisher = await _pair(stock, pki)
    await _send(publisher, _publish("t/#", SMUGGLED))
    received = await subscriber.messages(1.0)
    assert [(m.topic, m.payload) for m in received] == [("t/smuggled", b"not sent as a message")]
    await publisher.close()
    await subscriber.disconnect()


# -- hardened ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "payload"),
    [("t/+/temp", JSON_PAYLOAD), ("t/#", SMUGGLED), ("t/+", b"")],
    ids=["json-payload", "packet-in-payload", "empty-payload"],
)
async def test_hardened_wildcard_publish_closes_the_connection(
    hardened: HardenedBroker, pki: Any, caplog: pytest.LogCaptureFixture, topic: str, payload: bytes
) -> None:
    subscriber, publisher = await _pair(hardened, pki, will=("t/will", b"dev1 gone"))
    caplog.set_level(logging.WARNING, logger="broker_plugin.broker")
    await _send(
        publisher,
        _publish("t/before", b"1", qos=1, packet_id=1),
        _publish(topic, payload, qos=1, packet_id=2),
        _publish("t/after", b"3", qos=1, packet_id=3),
    )
    acked, closed = await _pubacks(publisher, 2.0)
    assert acked == [1]  # what came before is accepted; the client learns the rest was not
    assert closed
    received = await subscriber.messages(0.5)
    # nothing decoded from the bad packet's payload, nothing after it; the will (abnormal close)
    assert [(m.topic, m.payload) for m in received] == [("t/before", b"1"), ("t/will", b"dev1 gone")]
    assert any(
        "dev1: protocol violation" in r.getMessage() and "MQTT-3.3.2-2" in r.getMessage() for r in caplog.records
    )
    assert [c.client_id for c in hardened.connections()] == ["sub"]
    await subscriber.disconnect()


async def test_hardened_qos0_wildcard_publish_closes_the_connection(hardened: HardenedBroker, pki: Any) -> None:
    subscriber, publisher = await _pair(hardened, pki)
    await _send(publisher, _publish("t/before", b"1"), _publish("t/+", SMUGGLED), _publish("t/after", b"3"))
    assert await publisher.is_closed(2.0)
    assert _topics(await subscriber.messages(0.5)) == ["t/before"]
    await subscriber.disconnect()


async def test_hardened_packets_before_the_violation_finish(make_hardened: Any, pki: Any) -> None:
    """A message still being delivered (a slow ACL) when the bad packet arrives is delivered and
    acknowledged before the connection closes, not cancelled with it."""

    async def slow_acl(identity: Any, action: str, topic: str) -> bool:
        if action == "publish":
            await asyncio.sleep(0.3)
        return True

    broker = await make_hardened(acl_hook=slow_acl)
    subscriber, publisher = await _pair(broker, pki)
    await _send(publisher, _publish("t/before", b"1", qos=1, packet_id=1), _publish("t/+", b"x", qos=1, packet_id=2))
    acked, closed = await _pubacks(publisher, 2.0)
    assert acked == [1]
    assert closed
    assert _topics(await subscriber.messages(0.5)) == ["t/before"]
    await subscriber.disconnect()


async def test_hardened_client_reconnects_after_violation(hardened: HardenedBroker, pki: Any) -> None:
    subscriber, publisher = await _pair(hardened, pki)
    await _send(publisher, _publish("t/#", b"x"))
    assert await publisher.is_closed(2.0)
    again, rc = await connect(port_of(hardened), pki.client_context("dev1"), "dev1")
    assert rc == 0
    await again.publish("t/ok", b"fine", qos=1)
    acked, closed = await _pubacks(again, 0.5)
    assert acked == [1] and not closed
    assert _topics(await subscriber.messages(0.5)) == ["t/ok"]
    await again.disconnect()
    await subscriber.disconnect()


async def test_hardened_oversized_remaining_length_closes_the_connection(hardened: HardenedBroker, pki: Any) -> None:
    """The other decode error amqtt reads past: a remaining length longer than four bytes."""
    subscriber, publisher = await _pair(hardened, pki)
    await _send(publisher, b"\x30\xff\xff\xff\xff\x7f", _publish("t/after", b"3"))
    assert await publisher.is_closed(2.0)
    assert await subscriber.messages(0.5) == []
    await subscriber.disconnect()
