"""A minimal MQTT 3.1.1 client over real TLS, for tests that need exact control of the wire.

aiomqtt/paho send PINGREQs and reconnect on their own; proving that a silent
client is dropped, or watching a taken-over connection close, needs a client
that does only what the test says.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from dataclasses import dataclass

__all__ = ["Packet", "RawClient", "close_tracked", "connect", "connect_tracked", "port_of"]

CONNACK, PUBLISH, PUBACK, SUBACK, PINGRESP = 2, 3, 4, 9, 13


def _str(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([first]) + bytes(encoded) + body


@dataclass(frozen=True)
class Packet:
    """One received packet: type, flags and body."""

    kind: int
    flags: int
    body: bytes

    @property
    def topic(self) -> str:
        """Topic of a PUBLISH."""
        (n,) = struct.unpack("!H", self.body[:2])
        return self.body[2 : 2 + n].decode()

    @property
    def payload(self) -> bytes:
        """Payload of a PUBLISH."""
        (n,) = struct.unpack("!H", self.body[:2])
        start = 2 + n + (2 if (self.flags >> 1) & 3 else 0)
        return self.body[start:]

    @property
    def retain(self) -> bool:
        """Retain flag of a PUBLISH."""
        return bool(self.flags & 1)


class RawClient:
    """An open TLS connection speaking hand-built MQTT packets."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._next_id = 1

    async def read_packet(self, timeout: float = 2.0) -> Packet | None:
        """The next packet, or ``None`` at EOF / connection reset."""
        try:
            first = await asyncio.wait_for(self.reader.readexactly(1), timeout)
            length, shift = 0, 0
            while True:
                (byte,) = await asyncio.wait_for(self.reader.readexactly(1), timeout)
                length += (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            body = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            return None
        packet = Packet(first[0] >> 4, first[0] & 0x0F, body)
        if packet.kind == PUBLISH and (packet.flags >> 1) & 3 == 1:
            (n,) = struct.unpack("!H", body[:2])
            self.writer.write(_packet(0x40, body[2 + n : 4 + n]))  # PUBACK
        return packet

    async def is_closed(self, within: float) -> bool:
        """Whether the server closes the connection within ``within`` seconds (other packets skipped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while (left := deadline - loop.time()) > 0:
            try:
                packet = await self.read_packet(timeout=left)
            except asyncio.TimeoutError:
                return False
            if packet is None:
                return True
        return False

    async def subscribe(self, topic_filter: str, qos: int = 0) -> int:
        """SUBSCRIBE one filter; returns the SUBACK return code (PUBLISHes before it are skipped)."""
        pid = self._pid()
        self.writer.write(_packet(0x82, struct.pack("!H", pid) + _str(topic_filter) + bytes([qos])))
        await self.writer.drain()
        while True:
            packet = await self.read_packet()
            if packet is None:
                raise ConnectionError("closed while waiting for SUBACK")
            if packet.kind == SUBACK:
                return packet.body[2]

    async def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        """PUBLISH (QoS 0 or 1; for QoS 1 the PUBACK is not awaited)."""
        header = _str(topic) + (struct.pack("!H", self._pid()) if qos else b"")
        self.writer.write(_packet(0x30 | (qos << 1) | int(retain), header + payload))
        await self.writer.drain()

    async def ping(self) -> bool:
        """PINGREQ; True when the PINGRESP arrives (other packets skipped)."""
        self.writer.write(b"\xc0\x00")
        await self.writer.drain()
        while True:
            packet = await self.read_packet()
            if packet is None:
                return False
            if packet.kind == PINGRESP:
                return True

    async def messages(self, within: float) -> list[Packet]:
        """Every PUBLISH received within ``within`` seconds."""
        loop = asyncio.get_running_loop()
        deadline, found = loop.time() + within, []
        while (left := deadline - loop.time()) > 0:
            try:
                packet = await self.read_packet(timeout=left)
            except asyncio.TimeoutError:
                break
            if packet is None:
                break
            if packet.kind == PUBLISH:
                found.append(packet)
        return found

    async def numbered(self, count: int) -> list[int]:
        """The first 4 bytes (big-endian) of the next ``count`` PUBLISH payloads, in arrival order:
        how tests number the messages they send to check order and completeness."""
        seen: list[int] = []
        while len(seen) < count:
            packet = await self.read_packet(timeout=5)
            assert packet is not None, f"connection ended after {len(seen)} of {count}"
            if packet.kind == PUBLISH:
                seen.append(int.from_bytes(packet.payload[:4], "big"))
        return seen

    async def close(self) -> None:
        """Drop the connection without DISCONNECT."""
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass

    async def disconnect(self) -> None:
        """Send DISCONNECT and close."""
        try:
            self.writer.write(b"\xe0\x00")
            await self.writer.drain()
        except ConnectionError:
            pass
        await self.close()

    def _pid(self) -> int:
        pid, self._next_id = self._next_id, self._next_id % 65535 + 1
        return pid


async def connect(
    port: int,
    ssl_context: ssl.SSLContext,
    client_id: str,
    *,
    clean: bool = True,
    keepalive: int = 60,
    will: tuple[str, bytes] | None = None,
) -> tuple[RawClient, int | None]:
    """Open TLS, send CONNECT; returns the client and the CONNACK return code (``None`` if closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_context, server_hostname="localhost")
    flags = (0x02 if clean else 0) | (0x04 if will else 0)
    body = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + _str(client_id)
    if will:
        body += _str(will[0]) + _str(will[1])
    client = RawClient(reader, writer)
    writer.write(_packet(0x10, body))
    await writer.drain()
    packet = await client.read_packet()
    if packet is None or packet.kind != CONNACK:
        return client, None
    return client, packet.body[1]


def port_of(broker: object) -> int:
    """The port an amqtt broker's default listener is bound to (``bind: 127.0.0.1:0``)."""
    server = broker._servers["default"].instance  # type: ignore[attr-defined]  # noqa: SLF001
    return int(server.sockets[0].getsockname()[1])


_TRACKED: list[RawClient] = []


async def connect_tracked(port: int, ssl_context: ssl.SSLContext, client_id: str) -> RawClient:
    """:func:`connect` (clean session), asserting the CONNACK accepts; :func:`close_tracked` closes it."""
    client, code = await connect(port, ssl_context, client_id)
    _TRACKED.append(client)
    assert code == 0, f"{client_id}: CONNACK {code}"
    return client


async def close_tracked() -> None:
    """Close every client :func:`connect_tracked` opened (a test module's autouse fixture calls it)."""
    while _TRACKED:
        await _TRACKED.pop().close()
