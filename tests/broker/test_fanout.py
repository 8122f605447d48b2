"""Broadcast fan-out (``broker_plugin.fanout.Fanout``): one encoded PUBLISH per QoS, per-session packet ids, amqtt's QoS 1
bookkeeping (inflight until PUBACK, timeout, connection end) and the ``receive`` ACL per subscriber,
over real TLS connections."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from amqtt.mqtt.publish import PublishPacket
from amqtt.plugins.base import BasePlugin

from broker_plugin import fanout as fanout_module
from broker_plugin.broker import HardenedBroker

from conftest import Pki
from mqttraw import PUBLISH, Packet, RawClient, close_tracked, connect_tracked

TOPIC = "feeds/acme/eu/delta"


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    await close_tracked()


async def _client(pki: Pki, port: int, name: str, qos: int | None = None) -> RawClient:
    client = await connect_tracked(port, pki.client_context(name), name)
    if qos is not None:
        assert await client.subscribe(TOPIC, qos) == qos
    return client


async def _read_raw(client: RawClient, timeout: float = 2.0) -> Packet | None:
    """The next packet, *without* the automatic PUBACK of ``RawClient.read_packet``."""
    try:
        first = await asyncio.wait_for(client.reader.readexactly(1), timeout)
        length, shift = 0, 0
        while True:
            (byte,) = await asyncio.wait_for(client.reader.readexactly(1), timeout)
            length += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        body = await asyncio.wait_for(client.reader.readexactly(length), timeout)
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        return None
    return Packet(first[0] >> 4, first[0] & 0x0F, body)


def _packet_id(packet: Packet) -> int:
    (n,) = struct.unpack("!H", packet.body[:2])
    return int(struct.unpack("!H", packet.body[2 + n : 4 + n])[0])


async def _settled(broker: HardenedBroker, within: float = 2.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if all(not s.inflight_out and not h._puback_waiters for s, h in broker._sessions.values()):  # noqa: SLF001
            return True
        await asyncio.sleep(0.01)
    return False


async def test_every_subscriber_gets_one_exact_copy_at_its_qos(pki: Pki, hardened: HardenedBroker) -> None:
    port = hardened.listen_port()
    qos1 = [await _client(pki, port, f"q1-{i}", qos=1) for i in range(12)]
    qos0 = [await _client(pki, port, f"q0-{i}", qos=0) for i in range(4)]
    publisher = await _client(pki, port, "pub")
    payload = bytes(range(256)) * 3  # 768 bytes: a two-byte remaining length
    await publisher.publish(TOPIC, payload, qos=0)
    for client in qos1:
        got = await client.messages(within=0.5)  # acknowledges each QoS 1 PUBLISH
        assert [(p.topic, p.payload, (p.flags >> 1) & 3, p.retain) for p in got] == [(TOPIC, payload, 1, False)]
    for client in qos0:
        got = await client.messages(within=0.3)
        assert [(p.topic, p.payload, p.flags) for p in got] == [(TOPIC, payload, 0)]
    assert await _settled(hardened), "acknowledged QoS 1 copies must leave inflight_out and the PUBACK waiters"


async def test_qos1_copies_carry_each_sessions_own_packet_id(pki: Pki, hardened: HardenedBroker) -> None:
    port = hardened.listen_port()
    a, b = await _client(pki, port, "a", qos=1), await _client(pki, port, "b", qos=1)
    # "a" has used a packet id before, so its ids differ from "b"'s
    hardened._sessions["a"][0].next_packet_id  # noqa: B018, SLF001 - advances a's counter only
    publisher = await _client(pki, port, "pub")
    ids: dict[str, list[int]] = {"a": [], "b": []}
    for n in range(3):
        await publisher.publish(TOPIC, b"m%d" % n, qos=0)
        for name, client in (("a", a), ("b", b)):
            packet = await _read_raw(client)
            assert packet is not None and packet.kind == PUBLISH and packet.payload == b"m%d" % n
            pid = _packet_id(packet)
            session = hardened._sessions[name][0]  # noqa: SLF001
            assert session.inflight_out[pid].data == b"m%d" % n, "the id on the wire is the one in flight"
            ids[name].append(pid)
            client.writer.write(bytes([0x40, 2]) + struct.pack("!H", pid))  # PUBACK
    assert len(set(ids["a"])) == 3 and len(set(ids["b"])) == 3
    assert ids["a"] != ids["b"]
    assert await _settled(hardened)


async def test_unacknowledged_copy_stays_in_flight_then_expires(
    pki: Pki, hardened: HardenedBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fanout_module, "PUBACK_TIMEOUT", 0.4)
    port = hardened.listen_port()
    silent = await _client(pki, port, "silent", qos=1)
    acking = await _client(pki, port, "acking", qos=1)
    publisher = await _client(pki, port, "pub")
    await publisher.publish(TOPIC, b"delta", qos=0)
    assert (await _read_raw(silent)) is not None
    assert [p.payload for p in await acking.messages(within=0.2)] == [b"delta"]
    session, handler = hardened._sessions["silent"]  # noqa: SLF001
    assert [m.data for m in session.inflight_out.values()] == [b"delta"]
    assert len(handler._puback_waiters) == 1  # noqa: SLF001
    assert not hardened._sessions["acking"][0].inflight_out  # noqa: SLF001
    await asyncio.sleep(0.6)
    assert not session.inflight_out and not handler._puback_waiters, "amqtt drops it after the PUBACK timeout"


async def test_connection_end_releases_in_flight_copies(pki: Pki, hardened: HardenedBroker) -> None:
    port = hardened.listen_port()
    silent = await _client(pki, port, "gone", qos=1)
    publisher = await _client(pki, port, "pub")
    await publisher.publish(TOPIC, b"delta", qos=0)
    assert (await _read_raw(silent)) is not None
    session = hardened._sessions["gone"][0]  # noqa: SLF001
    assert len(session.inflight_out) == 1
    await silent.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2
    while session.inflight_out and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert not session.inflight_out


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_receive_acl_is_checked_for_each_subscriber(
    pki: Pki, make_hardened: Any, asynchronous: bool
) -> None:
    asked: list[tuple[str, str, str]] = []

    def decide(identity: Any, action: str, topic: str) -> bool:
        asked.append((identity.name, action, topic))
        return not (action == "receive" and identity.name.startswith("denied"))

    async def decide_async(identity: Any, action: str, topic: str) -> bool:
        await asyncio.sleep(0)
        return decide(identity, action, topic)

    broker = await make_hardened(acl_hook=decide_async if asynchronous else decide)
    port = broker.listen_port()
    allowed = [await _client(pki, port, f"ok-{i}", qos=1) for i in range(3)]
    denied = [await _client(pki, port, f"denied-{i}", qos=1) for i in range(2)]
    publisher = await _client(pki, port, "pub")
    await publisher.publish(TOPIC, b"delta", qos=1)
    for client in allowed:
        assert [p.payload for p in await client.messages(within=0.4)] == [b"delta"]
    for client in denied:
        assert await client.messages(within=0.2) == []
    receives = sorted(name for name, action, topic in asked if action == "receive" and topic == TOPIC)
    assert receives == sorted([f"ok-{i}" for i in range(3)] + [f"denied-{i}" for i in range(2)])


async def test_failing_acl_hook_denies_delivery(pki: Pki, make_hardened: Any) -> None:
    def explode(identity: Any, action: str, topic: str) -> bool:
        if action == "receive":
            raise RuntimeError("acl store down")
        return True

    broker = await make_hardened(acl_hook=explode)
    port = broker.listen_port()
    sub = await _client(pki, port, "sub", qos=1)
    publisher = await _client(pki, port, "pub")
    await publisher.publish(TOPIC, b"delta", qos=0)
    assert await sub.messages(within=0.3) == []


async def test_subscriber_not_reading_gets_backpressure_and_every_copy_in_order(
    pki: Pki, hardened: HardenedBroker
) -> None:
    port = hardened.listen_port()
    slow = await _client(pki, port, "slow", qos=0)
    handler = hardened._sessions["slow"][1]  # noqa: SLF001
    transport = handler.writer._writer.transport  # type: ignore[union-attr]  # noqa: SLF001
    high = transport.get_write_buffer_limits()[1]
    chunk = 64 * 1024
    count = 300  # ~20 MB: more than loopback's socket buffers, so the broker's own buffer fills
    for n in range(count):
        await hardened._broadcast_message(None, TOPIC, n.to_bytes(4, "big") + bytes(chunk))  # noqa: SLF001
    biggest = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not hardened._broadcast_queue.empty() and loop.time() < deadline:  # noqa: SLF001
        biggest = max(biggest, transport.get_write_buffer_size())
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)
    biggest = max(biggest, transport.get_write_buffer_size())
    assert biggest > high, "the test must fill the broker's buffer to exercise the fallback"
    # amqtt's path writes one copy, then awaits the drain: the buffer stays near the mark
    assert biggest <= high + 3 * (chunk + 64)
    assert await slow.numbered(count) == list(range(count))
    assert handler.slow_sends == 0


class _WatchingPlugin(BasePlugin[Any]):
    """A plugin that wants every packet the broker sends (amqtt's ``mqtt_packet_sent`` event)."""

    sent: list[tuple[str | None, int]] = []

    async def on_mqtt_packet_sent(self, *, packet: Any, session: Any = None) -> None:
        if isinstance(packet, PublishPacket):
            type(self).sent.append((getattr(session, "client_id", None), packet.qos))


async def test_plugin_watching_sent_packets_still_sees_every_broadcast_copy(pki: Pki) -> None:
    _WatchingPlugin.sent.clear()
    broker = HardenedBroker(
        {
            "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0", "ssl": True}},
            "plugins": {"test_fanout._WatchingPlugin": {}},
        },
        ssl_context=pki.server_context(),
    )
    await broker.start()
    try:
        port = broker.listen_port()
        subs = [await _client(pki, port, f"w{i}", qos=1) for i in range(3)]
        publisher = await _client(pki, port, "pub")
        await publisher.publish(TOPIC, b"delta", qos=0)
        for client in subs:
            assert [p.payload for p in await client.messages(within=0.3)] == [b"delta"]
        assert sorted(_WatchingPlugin.sent) == [("w0", 1), ("w1", 1), ("w2", 1)]
    finally:
        await close_tracked()
        await broker.shutdown()


# remaining length = 2 + 19 (topic) + size (+ 2 packet id at QoS 1): at 105, 106, 16361 and 16362
# bytes the QoS 1 copy needs one more length byte than the QoS 0 copy
@pytest.mark.parametrize("size", [104, 105, 106, 107, 16_360, 16_361, 16_362, 16_363])
async def test_mixed_qos_copies_around_remaining_length_boundaries(
    pki: Pki, hardened: HardenedBroker, size: int
) -> None:
    # QoS 1, QoS 0, QoS 1 subscribers: the QoS 0 copy encoded between them must not move
    # where the later QoS 1 copies get their packet id
    port = hardened.listen_port()
    first = await _client(pki, port, "q1-first", qos=1)
    q0 = await _client(pki, port, "q0", qos=0)
    last = await _client(pki, port, "q1-last", qos=1)
    payload = bytes([7]) * size
    await hardened._broadcast_message(None, TOPIC, payload)  # noqa: SLF001
    p0 = await _read_raw(q0)
    assert p0 is not None and (p0.topic, p0.payload, p0.flags) == (TOPIC, payload, 0)
    for name, client in (("q1-first", first), ("q1-last", last)):
        p1 = await _read_raw(client)
        assert p1 is not None and (p1.topic, p1.payload, p1.flags) == (TOPIC, payload, 2)
        assert _packet_id(p1) in hardened._sessions[name][0].inflight_out  # noqa: SLF001


async def _fanned_out(broker: HardenedBroker) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2
    while (not broker._broadcast_queue.empty() or broker._fanning) and loop.time() < deadline:  # noqa: SLF001
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)


def _tls_transport(broker: HardenedBroker, client_id: str) -> Any:
    handler = broker._sessions[client_id][1]  # noqa: SLF001
    return handler.writer._writer.transport  # type: ignore[union-attr]  # noqa: SLF001


async def test_copies_bypass_the_tls_transports_write_on_this_python(pki: Pki, hardened: HardenedBroker) -> None:
    # The direct write leans on asyncio's sslproto internals; on an interpreter where they
    # moved, this fails instead of the broker silently falling back to the slower path.
    port = hardened.listen_port()
    sub = await _client(pki, port, "direct", qos=1)
    transport = _tls_transport(hardened, "direct")
    assert fanout_module._direct(transport) is not None  # noqa: SLF001
    stock: list[bytes] = []
    write = transport.write
    transport.write = lambda data: (stock.append(bytes(data)), write(data))[1]
    await hardened._broadcast_message(None, TOPIC, b"delta-1")  # noqa: SLF001
    packet = await _read_raw(sub)
    assert packet is not None and (packet.topic, packet.payload, packet.flags) == (TOPIC, b"delta-1", 2)
    assert stock == [], "the copy went through the TLS transport's own write"


async def test_copy_written_while_the_socket_is_paused_queues_in_order(pki: Pki, hardened: HardenedBroker) -> None:
    # A paused socket (its buffer over the high-water mark) holds TLS records in sslproto's
    # buffer: a copy encrypted past it would reach the client first. It takes the stock write.
    port = hardened.listen_port()
    sub = await _client(pki, port, "paused", qos=0)
    transport = _tls_transport(hardened, "paused")
    tls = transport._ssl_protocol  # noqa: SLF001
    tls.pause_writing()  # what the socket transport calls when its buffer passes the mark
    assert fanout_module._direct(transport) is None  # noqa: SLF001
    for n in range(3):
        await hardened._broadcast_message(None, TOPIC, b"copy-%d" % n)  # noqa: SLF001
    await _fanned_out(hardened)
    assert transport.get_write_buffer_size() > 0, "the copies wait in the TLS layer"
    assert await _read_raw(sub, timeout=0.2) is None
    tls.resume_writing()
    assert fanout_module._direct(transport) is not None  # noqa: SLF001
    await hardened._broadcast_message(None, TOPIC, b"copy-3")  # noqa: SLF001
    got = [await _read_raw(sub) for _ in range(4)]
    assert [p.payload if p else None for p in got] == [b"copy-0", b"copy-1", b"copy-2", b"copy-3"]


class _WantRead:
    """An SSL object that cannot take application data now (what a renegotiation makes it say)."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def write(self, data: bytes) -> int:
        import ssl

        raise ssl.SSLWantReadError("the TLS layer wants to read first")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


async def test_a_tls_layer_that_cannot_take_data_now_keeps_the_copy_for_later(pki: Pki, hardened: HardenedBroker) -> None:
    # sslproto's own write keeps such data in its backlog; the direct write must not treat the
    # "want read" as fatal (it would drop the connection) nor lose the copy.
    port = hardened.listen_port()
    sub = await _client(pki, port, "wants", qos=0)
    transport = _tls_transport(hardened, "wants")
    tls = transport._ssl_protocol  # noqa: SLF001
    real = tls._sslobj  # noqa: SLF001
    tls._sslobj = _WantRead(real)  # noqa: SLF001
    await hardened._broadcast_message(None, TOPIC, b"held")  # noqa: SLF001
    await _fanned_out(hardened)
    assert not transport.is_closing()
    assert list(tls._write_backlog) == [bytes(PublishPacket.build(TOPIC, b"held", None, False, 0, False).to_bytes())]  # noqa: SLF001
    tls._sslobj = real  # noqa: SLF001
    tls._do_write()  # noqa: SLF001 - what sslproto runs once the TLS layer has read what it wanted
    packet = await _read_raw(sub)
    assert packet is not None and (packet.topic, packet.payload) == (TOPIC, b"held")
