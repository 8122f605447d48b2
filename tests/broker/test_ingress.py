"""The hardened broker's load paths: inline delivery of a client's PUBLISH, ingress turns for bulk connections."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker_plugin import broker as broker_module
from broker_plugin.broker import HardenedBroker
from conftest import Pki
from mqttraw import RawClient, _packet, _str, close_tracked, connect_tracked

TOPIC = "fleet/telemetry"
PUBACK = 4

@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    await close_tracked()


async def _client(pki: Pki, port: int, name: str) -> RawClient:
    return await connect_tracked(port, pki.client_context(name), name)


def _publishes(count: int, qos_of: Any = lambda n: 0) -> bytes:
    """``count`` PUBLISHes in one buffer (they reach the broker behind each other); packet id = n + 1."""
    out = bytearray()
    for n in range(count):
        qos = qos_of(n)
        header = _str(TOPIC) + (struct.pack("!H", n + 1) if qos else b"")
        out += _packet(0x30 | (qos << 1), header + n.to_bytes(4, "big"))
    return bytes(out)


async def test_a_clients_messages_arrive_in_order_and_each_qos1_one_is_acknowledged(
    pki: Pki, hardened: HardenedBroker
) -> None:
    port = hardened.listen_port()
    sub = await _client(pki, port, "sub")
    assert await sub.subscribe(TOPIC, 1) == 1
    pub = await _client(pki, port, "pub")
    count = 300
    pub.writer.write(_publishes(count, qos_of=lambda n: n % 2))  # QoS 0 and 1 interleaved
    await pub.writer.drain()
    assert await sub.numbered(count) == list(range(count))
    acked: list[int] = []
    while len(acked) < count // 2:
        packet = await pub.read_packet(timeout=5)
        assert packet is not None and packet.kind == PUBACK
        acked.append(struct.unpack("!H", packet.body[:2])[0])
    assert acked == [n + 1 for n in range(count) if n % 2]


async def test_only_a_bulk_connections_backlog_takes_ingress_turns_and_nothing_is_lost(
    pki: Pki, make_hardened: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    turns = 0
    real_turn = broker_module._Ingress.turn  # noqa: SLF001

    async def counted(self: Any) -> None:
        nonlocal turns
        turns += 1
        await real_turn(self)

    monkeypatch.setattr(broker_module._Ingress, "turn", counted)  # noqa: SLF001
    broker = await make_hardened(ingress_per_round=1)
    port = broker.listen_port()
    sub = await _client(pki, port, "sub")
    assert await sub.subscribe(TOPIC, 0) == 0
    count = 200

    plain = await _client(pki, port, "plain")
    plain.writer.write(_publishes(count))
    await plain.writer.drain()
    assert await sub.numbered(count) == list(range(count))
    assert turns == 0  # an unmarked connection's backlog only yields

    bulk = await _client(pki, port, "bulk")
    broker.mark_bulk("bulk", seconds=30)
    bulk.writer.write(_publishes(count))
    await bulk.writer.drain()
    assert await sub.numbered(count) == list(range(count))
    assert turns >= count // 2  # most of its packets were buffered behind others: each took a turn


async def test_ingress_grants_its_turns_first_come_first_served_a_bounded_number_per_iteration() -> None:
    ingress = broker_module._Ingress(2)  # noqa: SLF001
    loop = asyncio.get_running_loop()
    iteration = 0

    def tick() -> None:
        nonlocal iteration
        iteration += 1
        loop.call_soon(tick)

    loop.call_soon(tick)
    done: list[tuple[int, int]] = []

    async def take(n: int) -> None:
        await ingress.turn()
        done.append((n, iteration))

    tasks = [asyncio.create_task(take(n)) for n in range(9)]
    await asyncio.sleep(0)  # every task has asked for a turn
    tasks[5].cancel()  # a connection that closed while waiting: skipped, it costs nobody a turn
    await asyncio.gather(*tasks, return_exceptions=True)
    assert [n for n, _ in done] == [0, 1, 2, 3, 4, 6, 7, 8]
    per_iteration: dict[int, int] = {}
    for _, at in done:
        per_iteration[at] = per_iteration.get(at, 0) + 1
    assert max(per_iteration.values()) <= 2
    assert len(per_iteration) >= 4
