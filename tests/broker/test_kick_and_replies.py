"""The in-process API the certmq plugin builds on: kick, refusal of revoked identities,
replies to one session only, and reaching the broker from a plugin loaded by dotted path."""

from __future__ import annotations

import asyncio
import ssl
from datetime import datetime, timezone
from typing import Any

import pytest
from amqtt.broker import Broker
from amqtt.plugins.base import BasePlugin

from broker_plugin.broker import ConnectionInfo, HardenedBroker, PeerIdentity, default_identity
from mqttraw import connect, port_of


async def test_kick_by_serial_closes_within_a_second_and_revoked_cannot_return(make_hardened: Any, pki: Any) -> None:
    revoked: set[int] = set()

    def identity_hook(cert: Any) -> PeerIdentity | None:
        return None if cert.serial_number in revoked else default_identity(cert)

    broker = await make_hardened(identity_hook=identity_hook)
    port = port_of(broker)
    watcher, _ = await connect(port, pki.client_context("watcher"), "watcher")
    assert await watcher.subscribe("wills/#") == 0
    ctx1, serial1 = pki.client_context_with_serial("dev1")
    dev1, _ = await connect(port, ctx1, "dev1", will=("wills/dev1", b"gone"))
    dev2, _ = await connect(port, pki.client_context("dev2"), "dev2")

    revoked.add(serial1)
    loop = asyncio.get_running_loop()
    start = loop.time()
    kicked = await broker.kick(lambda info: info.identity.serial == serial1, "certificate revoked")
    assert loop.time() - start < 1.0
    assert kicked == ["dev1"]
    assert await dev1.is_closed(1.0)
    assert await dev2.ping()
    assert [c.client_id for c in broker.connections() if c.client_id.startswith("dev")] == ["dev2"]
    assert await watcher.messages(0.5) == []  # a kicked client's will is not published

    again, rc = await connect(port, ctx1, "dev1")
    assert rc == 5
    assert await again.is_closed(1.0)
    for client in (dev2, watcher):
        await client.disconnect()


async def test_kick_with_keys_looks_only_at_connections_indexed_under_them(make_hardened: Any, pki: Any) -> None:
    """With ``kick_key`` (the plugin's: tenant and serial), ``kick(..., keys=)`` asks the predicate about
    the connections indexed under those keys only; a connection leaves the index when it ends."""
    broker = await make_hardened(kick_key=lambda identity: identity.serial)
    port = port_of(broker)
    ctx1, serial1 = pki.client_context_with_serial("dev1")
    ctx2, serial2 = pki.client_context_with_serial("dev2")
    dev1, _ = await connect(port, ctx1, "dev1")
    dev2, _ = await connect(port, ctx2, "dev2")
    asked: list[str] = []

    def everyone(info: ConnectionInfo) -> bool:
        asked.append(info.client_id)
        return True

    assert await broker.kick(everyone, "revoked", keys={serial1, 12345}) == ["dev1"]
    assert asked == ["dev1"]  # dev2 was never looked at, though the predicate says yes to anyone
    assert await dev1.is_closed(1.0)
    assert await dev2.ping()
    assert serial1 not in broker._live_by_key and set(broker._live_by_key) == {serial2}  # noqa: SLF001
    # the predicate still decides among the indexed ones
    assert await broker.kick(lambda info: False, "no", keys=[serial2]) == []
    assert await dev2.ping()
    await dev2.disconnect()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2
    while broker._live_by_key and loop.time() < deadline:  # noqa: SLF001
        await asyncio.sleep(0.01)
    assert broker._live_by_key == {}  # noqa: SLF001


async def test_kick_keys_without_a_kick_key_ask_every_connection(hardened: HardenedBroker, pki: Any) -> None:
    dev1, _ = await connect(port_of(hardened), pki.client_context("dev1"), "dev1")
    dev2, _ = await connect(port_of(hardened), pki.client_context("dev2"), "dev2")
    assert sorted(await hardened.kick(lambda info: True, "all", keys=["anything"])) == ["dev1", "dev2"]
    assert await dev1.is_closed(1.0) and await dev2.is_closed(1.0)


async def test_a_failing_kick_key_leaves_the_connection_unindexed_but_kickable(make_hardened: Any, pki: Any) -> None:
    def broken(identity: Any) -> Any:
        raise RuntimeError("no key")

    broker = await make_hardened(kick_key=broken)
    dev1, _ = await connect(port_of(broker), pki.client_context("dev1"), "dev1")
    assert await dev1.ping()
    assert broker._live_by_key == {}  # noqa: SLF001
    assert await broker.kick("dev1", "by id") == ["dev1"]


async def test_kick_by_client_id_and_unknown(hardened: HardenedBroker, pki: Any) -> None:
    dev1, _ = await connect(port_of(hardened), pki.client_context("dev1"), "dev1")
    assert await hardened.kick("nobody", "test") == []
    assert await hardened.kick("dev1", "test") == ["dev1"]
    assert await dev1.is_closed(1.0)
    assert hardened.connections() == []


async def test_kick_of_client_that_does_not_read(hardened: HardenedBroker, pki: Any) -> None:
    """A client that stopped reading cannot stall the kick (grace, then abort)."""
    dev1, _ = await connect(port_of(hardened), pki.client_context("dev1"), "dev1")
    dev1.writer.transport.pause_reading()
    for _ in range(50):  # fill the socket buffers towards the client
        await hardened.deliver_to("dev1", "dev1/bulk", b"x" * 65536)
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await hardened.kick("dev1", "test") == ["dev1"]
    assert loop.time() - start < 1.2
    assert hardened.connections() == []
    await dev1.close()


async def test_deliver_to_reaches_only_that_session(hardened: HardenedBroker, pki: Any) -> None:
    port = port_of(hardened)
    dev1, _ = await connect(port, pki.client_context("dev1"), "dev1")
    snoop, _ = await connect(port, pki.client_context("snoop"), "snoop")
    assert await snoop.subscribe("#") == 0
    assert await dev1.subscribe("certmq/dev1/reply") == 0
    assert await hardened.deliver_to("dev1", "certmq/dev1/reply", b"r0", qos=0)
    acked = asyncio.ensure_future(hardened.deliver_to("dev1", "certmq/dev1/reply", b"r1", qos=1))
    got = await dev1.messages(0.5)
    assert await acked  # returns once dev1 acknowledged
    assert [(m.topic, m.payload) for m in got] == [("certmq/dev1/reply", b"r0"), ("certmq/dev1/reply", b"r1")]
    assert await snoop.messages(0.3) == []
    assert not await hardened.deliver_to("nobody", "t", b"x")
    with pytest.raises(ValueError):
        await hardened.deliver_to("dev1", "a/+", b"x")
    for client in (dev1, snoop):
        await client.disconnect()


async def test_deliver_now_writes_to_that_session_only_without_a_task(hardened: HardenedBroker, pki: Any) -> None:
    """The storm path for refusals: QoS 0, written at once, never seen by a `#` subscriber; a
    client that stops reading gets ``None`` (use deliver_to, which waits for the drain)."""
    port = port_of(hardened)
    dev1, _ = await connect(port, pki.client_context("dev1"), "dev1")
    snoop, _ = await connect(port, pki.client_context("snoop"), "snoop")
    assert await snoop.subscribe("#") == 0
    tasks_before = len(asyncio.all_tasks())
    assert hardened.deliver_now("dev1", "certmq/dev1/reply", b"busy") is True
    assert len(asyncio.all_tasks()) == tasks_before
    got = await dev1.messages(0.5)
    assert [(m.topic, m.payload, (m.flags >> 1) & 3) for m in got] == [("certmq/dev1/reply", b"busy", 0)]
    assert await snoop.messages(0.3) == []
    assert hardened.deliver_now("nobody", "t", b"x") is False
    with pytest.raises(ValueError):
        hardened.deliver_now("dev1", "a/#", b"x")
    dev1.writer.transport.pause_reading()
    results = {hardened.deliver_now("dev1", "certmq/dev1/bulk", b"x" * 65536) for _ in range(400)}
    assert None in results  # backpressure: the fast path steps aside once the buffer is full
    for client in (dev1, snoop):
        await client.close()


class _HookingPlugin(BasePlugin[Any]):
    """What the certmq plugin does: find the hardened broker, install its ACL."""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.broker = HardenedBroker.of(context)
        self.broker.acl_hook = self.acl

    def acl(self, identity: PeerIdentity, action: str, topic: str) -> bool:
        return topic.startswith(f"{identity.name}/")


async def test_plugin_loaded_by_dotted_path_installs_hooks(pki: Any) -> None:
    broker = HardenedBroker(
        {
            "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0", "ssl": True}},
            "plugins": {"test_kick_and_replies._HookingPlugin": {}},
        },
        ssl_context=pki.server_context(),
    )
    await broker.start()
    try:
        dev1, _ = await connect(port_of(broker), pki.client_context("dev1"), "dev1")
        assert await dev1.subscribe("dev2/#") == 0x80
        assert await dev1.subscribe("dev1/#") == 0
        await dev1.disconnect()
    finally:
        await broker.shutdown()


async def test_hardened_api_refuses_stock_broker_and_bad_config(pki: Any, stock: Broker) -> None:
    with pytest.raises(TypeError):
        HardenedBroker.of(stock.plugins_manager.app_context)
    with pytest.raises(ValueError, match="CERT_REQUIRED"):
        context = pki.server_context()
        context.verify_mode = ssl.CERT_OPTIONAL
        HardenedBroker({"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0", "ssl": True}}}, ssl_context=context)
    with pytest.raises(ValueError, match="ssl: true"):
        HardenedBroker({"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}}}, ssl_context=pki.server_context())


def test_connection_info_is_a_value() -> None:
    info = ConnectionInfo(client_id="a", identity=None, remote=("127.0.0.1", 1), connected_at=datetime.now(timezone.utc))
    with pytest.raises(AttributeError):
        info.client_id = "b"  # type: ignore[misc]
