"""Broadcast fan-out for the hardened broker: one encoded PUBLISH, written to every subscriber now.

amqtt sends each subscriber's copy of a broadcast in a task of its own; for a revocation delta
with 1,000 subscribers that is ~0.3 ms of event-loop time per copy. :class:`Fanout` encodes the
PUBLISH once per QoS and writes the copies without tasks or awaits, keeping amqtt's QoS 1
bookkeeping (``inflight_out``, PUBACK waiters, the PUBACK timeout).

This module knows amqtt's packet and session classes; nothing about certmq.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from asyncio import sslproto
from functools import partial
from typing import Any

from amqtt.adapters import StreamWriterAdapter
from amqtt.errors import AMQTTError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import OutgoingApplicationMessage, Session

__all__ = ["PUBACK_TIMEOUT", "Fanout"]

_log = logging.getLogger(__name__)

PUBACK_TIMEOUT = 5.0  # amqtt's own wait for a QoS 1 PUBACK; on expiry the message leaves the session


class Fanout:
    """One broadcast's delivery to many sessions: the PUBLISH is encoded once, written without awaits.

    amqtt sends each subscriber's copy in a task of its own that builds and encodes a
    ``PublishPacket``, awaits the write lock and the drain and, at QoS 1, waits for the PUBACK:
    about 0.3 ms of loop time per subscriber, so the thousandth copy of a revocation delta left
    ~300 ms after the first. Here the bytes are built once per QoS; a QoS 1 copy only gets its
    session's packet id patched in. The QoS 1 bookkeeping is amqtt's: the message sits in the
    session's ``inflight_out`` (retried, DUP set, when a persistent session resumes) and the
    handler's PUBACK waiter until the PUBACK, the connection's end (waiters cancelled) or
    ``PUBACK_TIMEOUT``, whichever is first; one timer per broadcast instead of one per copy.
    A copy for a TLS connection that keeps up is encrypted straight into the socket transport
    (see ``_direct``); any other goes through the TLS transport's ``write``.
    """

    __slots__ = ("_data", "_frames", "_loop", "_packets", "_pending", "_pid_at", "_topic", "_watched")

    def __init__(self, topic: str, data: bytes | bytearray, *, watched: bool) -> None:
        self._topic = topic
        self._watched = watched  # a plugin wants every sent packet: amqtt's path fires the event
        self._loop = asyncio.get_running_loop()
        self._data = data
        self._frames: dict[int, bytes] = {}
        self._packets: dict[int, PublishPacket] = {}
        self._pid_at = 0
        self._pending: list[asyncio.Future[Any]] = []

    def _frame(self, qos: int) -> bytes:
        frame = self._frames.get(qos)
        if frame is None:
            packet = PublishPacket.build(self._topic, bytes(self._data), 0 if qos else None, False, qos, False)
            self._packets[qos] = packet
            frame = self._frames[qos] = bytes(packet.to_bytes())
            if qos == 1:
                # packet id: after the fixed header (1 byte + remaining-length varint) and the topic
                header = 1
                while frame[header] & 0x80:
                    header += 1
                self._pid_at = header + 1 + 2 + len(self._topic.encode("utf-8"))
        return frame

    def send(self, handler: BrokerProtocolHandler, session: Session, qos: int) -> bool:
        """Write this message to ``handler``'s connection now; ``False``: use amqtt's path instead."""
        writer = handler.writer
        if qos not in (0, 1) or type(writer) is not StreamWriterAdapter or writer.is_closed:
            return False
        transport = writer._writer.transport  # noqa: SLF001 - the adapter hides its stream
        if self._watched or getattr(handler, "slow_sends", 0):
            # copies queued on amqtt's path write later: this one must not overtake them
            return False
        direct = _direct(transport)
        # Over the high-water mark (TLS records the paused socket below has not taken): the
        # client is not reading; amqtt's path awaits the drain, so it gets backpressure. (A
        # direct write needs the socket unpaused, so the TLS buffer is empty then.)
        if direct is None and (transport.is_closing()
                               or transport.get_write_buffer_size() >= transport.get_write_buffer_limits()[1]):
            return False
        frame = self._frame(qos)
        if qos == 1:
            try:
                packet_id = session.next_packet_id
            except AMQTTError:  # 65,535 in flight: amqtt's path fails for this subscriber only
                return False
            message = OutgoingApplicationMessage(packet_id, self._topic, 1, self._data, False)
            # publish_packet set means "sent once": a resume retries it with DUP set, rebuilt from
            # the message (its packet id included). amqtt reads nothing else from it on the way
            # out, so the copies share one packet object instead of allocating four per subscriber.
            message.publish_packet = self._packets[1]
            waiter: asyncio.Future[Any] = self._loop.create_future()
            session.inflight_out[packet_id] = message
            handler._puback_waiters[packet_id] = waiter  # noqa: SLF001 - handle_puback resolves it
            waiter.add_done_callback(partial(_settle, handler, session, message))
            self._pending.append(waiter)
            at = self._pid_at
            frame = frame[:at] + packet_id.to_bytes(2, "big") + frame[at + 2 :]
        if direct is None:
            transport.write(frame)
        else:
            _write_direct(transport, direct, frame)
        return True

    def arm_timeout(self) -> None:
        """Give up on the PUBACKs still missing after ``PUBACK_TIMEOUT``, as amqtt does."""
        if self._pending:
            self._loop.call_later(PUBACK_TIMEOUT, _expire, self._pending, self._topic)


# asyncio's TLS transport (CPython 3.11+ sslproto) passes a write through five Python frames and two
# buffer checks before the TLS record reaches the socket: ~2-3 us of a ~29 us copy (1,000
# subscribers, loop-thread CPU per copy; the socket's send is ~12 of the rest). With its
# write backlog empty and the socket below its high-water mark (the state of every subscriber that
# keeps up), encrypting into the protocol's BIO and handing the record to the socket transport is
# what those frames do. Anything else -- a handshake or shutdown under way, a paused socket, an
# event loop whose TLS transport is not sslproto's -- takes the transport's own ``write``.
_WRAPPED = getattr(getattr(sslproto, "SSLProtocolState", None), "WRAPPED", None)


def _direct(transport: asyncio.BaseTransport) -> tuple[Any, ...] | None:
    """sslproto's (protocol, TLS object, outgoing BIO, socket transport) when a direct write is safe."""
    tls = getattr(transport, "_ssl_protocol", None)
    if tls is None or _WRAPPED is None:
        return None
    try:
        if (tls._state is not _WRAPPED or tls._write_backlog or tls._ssl_writing_paused
                or tls._app_writing_paused):
            return None
        return tls, tls._sslobj, tls._outgoing, tls._transport
    except AttributeError:  # another sslproto: its own write path
        return None


def _write_direct(transport: asyncio.WriteTransport, direct: tuple[Any, ...], data: bytes) -> None:
    tls, sslobj, outgoing, sock_transport = direct
    try:
        count = sslobj.write(data)
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        # The TLS layer cannot take data now (a renegotiation, say): sslproto keeps it in its
        # backlog until it can, as for any other write in that state.
        transport.write(data)
        return
    except Exception as exc:  # noqa: BLE001 - what sslproto's own write does with it
        tls._fatal_error(exc, "Fatal error on SSL protocol")
        return
    sock_transport.write(outgoing.read())
    if count < len(data):  # not with a memory BIO; the rest queues behind on the stock path
        transport.write(data[count:])


def _settle(handler: BrokerProtocolHandler, session: Session, message: OutgoingApplicationMessage, waiter: asyncio.Future[Any]) -> None:
    packet_id = message.packet_id
    if not waiter.cancelled():
        message.puback_packet = waiter.result()
    if handler._puback_waiters.get(packet_id) is waiter:  # noqa: SLF001
        del handler._puback_waiters[packet_id]  # noqa: SLF001
    if session.inflight_out.get(packet_id) is message:
        del session.inflight_out[packet_id]


def _expire(waiters: list[asyncio.Future[Any]], topic: str) -> None:
    late = [w for w in waiters if not w.done()]
    for waiter in late:
        waiter.cancel()
    if late:
        _log.warning("%d subscribers did not acknowledge a message on %s within %ss", len(late), topic, PUBACK_TIMEOUT)
