"""The hardened amqtt broker: mutual TLS, certificate-bound identity, ACL on every path, kicks.

:class:`HardenedBroker` subclasses amqtt 0.12.1's ``Broker`` and replaces the
connection lifecycle so that:

- the TLS listener requires a client certificate (``ssl.CERT_REQUIRED``);
- identity is computed from *this* connection's certificate on every CONNECT,
  including a persistent-session resume (stock amqtt keeps the old
  connection's ``ssl_object``, upstream issue #389); a session is only ever
  resumed or taken over by the identity that created it;
- the client id is bound to the identity (``client_id_hook``), refusal is
  CONNACK 5 (not authorized);
- retained messages pass the ACL (``receive``) on delivery, on subscribe and
  on connect;
- keep-alive is enforced: a client silent for 1.5 x its keep-alive is dropped
  and its will published;
- a second connection with the same client id closes the first;
- a PUBLISH to a ``$`` topic is dropped, the client stays connected;
- a malformed packet (a PUBLISH whose topic name holds ``+`` or ``#``, a remaining length
  over four bytes) closes the connection once the packets before it are handled; stock amqtt
  reads on from inside the rejected packet and takes its payload for the next packets;
- subscriptions are indexed in a :class:`~broker_plugin.topictrie.TopicTrie`;
- :meth:`HardenedBroker.kick` closes live sessions, :meth:`HardenedBroker.deliver_to`
  sends a message to one session only.

The hooks are plain attributes, so a plugin loaded from the ``plugins:``
section can install its own: ``HardenedBroker.of(self.context).acl_hook = ...``.

This module knows amqtt and TLS; nothing about certmq's messages or CA.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from typing import Any, Literal

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.broker import AMQTT_MAGIC_VALUE_RET_SUBSCRIBED, Broker, BrokerContext, Server
from amqtt.contexts import Action, BrokerConfig, ListenerConfig, ListenerType
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError
from amqtt.events import BrokerEvents, MQTTEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.packet import (
    CONNACK,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    RESERVED_0,
    RESERVED_15,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    MQTTFixedHeader,
)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import IncomingApplicationMessage, Session
from amqtt.utils import gen_client_id
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from .fanout import Fanout
from .topictrie import TopicTrie, filter_matches, validate_filter

__all__ = [
    "AclAction",
    "ConnectionInfo",
    "HardenedBroker",
    "PeerIdentity",
    "allow_all",
    "cn_is_client_id",
    "default_identity",
]

_log = logging.getLogger(__name__)

# Broadcasts the broadcast loop handles per turn when they are already queued: amortises amqtt's
# ~3 loop iterations per turn, bounded so a backlog holds the loop for a few ms at most.
_DRAIN_AT_ONCE = 32

# How long the packets a client sent before a malformed one may take to finish (their delivery
# and PUBACK) before its connection is closed.
_VIOLATION_GRACE = 2.0

# The handler method for each packet type the reader loop hands to a task (CONNECT is awaited).
_PACKET_HANDLERS: dict[int, str] = {
    CONNACK: "handle_connack",
    SUBSCRIBE: "handle_subscribe",
    UNSUBSCRIBE: "handle_unsubscribe",
    SUBACK: "handle_suback",
    UNSUBACK: "handle_unsuback",
    PUBACK: "handle_puback",
    PUBREC: "handle_pubrec",
    PUBREL: "handle_pubrel",
    PUBCOMP: "handle_pubcomp",
    PINGREQ: "handle_pingreq",
    PINGRESP: "handle_pingresp",
    PUBLISH: "handle_publish",
    DISCONNECT: "handle_disconnect",
}

AclAction = Literal["publish", "subscribe", "receive"]
IdentityHook = Callable[[x509.Certificate], Any]
ClientIdHook = Callable[[Any, str], "bool | Awaitable[bool]"]
AclHook = Callable[[Any, AclAction, str], "bool | Awaitable[bool]"]

_ACTIONS: dict[Action, AclAction] = {
    Action.PUBLISH: "publish",
    Action.SUBSCRIBE: "subscribe",
    Action.RECEIVE: "receive",
}


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """What the default identity hook extracts from a client certificate."""

    name: str
    serial: int
    fingerprint: bytes
    certificate: x509.Certificate = field(compare=False, repr=False)

    @property
    def principal(self) -> str:
        """Who owns sessions: the device (CN), so a renewed certificate resumes its own session."""
        return self.name


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """A live connection, as seen by :meth:`HardenedBroker.kick` predicates."""

    client_id: str
    identity: Any
    remote: tuple[str, int]
    connected_at: datetime


def _principal(identity: Any) -> Any:
    return getattr(identity, "principal", identity)


def _names(identity: Any, client_id: str) -> bool:
    """True when ``identity``'s own name is ``client_id`` (it is that client id's rightful owner)."""
    return getattr(identity, "name", None) == client_id


def default_identity(certificate: x509.Certificate) -> PeerIdentity | None:
    """Identity = the certificate's (single) commonName; ``None`` (refuse) without one."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str) or not names[0].value:
        return None
    return PeerIdentity(
        name=names[0].value,
        serial=certificate.serial_number,
        fingerprint=certificate.fingerprint(hashes.SHA256()),
        certificate=certificate,
    )


def cn_is_client_id(identity: Any, client_id: str) -> bool:
    """Default client-id binding: the client id must equal the identity's ``name``."""
    return isinstance(identity, PeerIdentity) and client_id == identity.name


def allow_all(identity: Any, action: AclAction, topic: str) -> bool:
    """Default ACL: everything allowed (the certmq plugin installs the real one)."""
    return True


async def _call(hook: Callable[..., Any], *args: Any) -> Any:
    result = hook(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


class _HardenedHandler(BrokerProtocolHandler):
    """Broker protocol handler: drops a client whose keep-alive timer expired, delivers inline.

    ``inline`` (set by the broker once the session is attached) takes a received QoS 0/1
    PUBLISH straight from the packet's handler task to the broker's delivery code. Stock amqtt
    queues it for the connection's message loop (``delivered_message_queue``), which costs ~4
    event-loop iterations per message before the broadcast queue and its task add ~2 more;
    under a storm each iteration takes tens of ms, so an unrelated device's message waited
    hundreds of ms to seconds. A connection's messages stay in order: one handler task at a
    time delivers, the others append to its inbox and return.
    """

    keepalive_expired = False
    slow_sends = 0  # broadcast copies queued on amqtt's per-task path, not yet written
    inline: Callable[[IncomingApplicationMessage], Awaitable[bool]] | None = None
    _inbox: deque[IncomingApplicationMessage] | None = None
    _delivering = False

    async def _reader_loop(self) -> None:
        """amqtt's reader loop, except that a malformed packet closes the connection.

        Stock amqtt catches the ``MQTTError`` a packet's decoder raises ("Message discarded")
        and reads on. A PUBLISH whose topic name holds a wildcard raises once its topic and
        packet id are read, before its payload: the loop then takes the payload for the next
        packets, and whatever it decodes there (a PUBLISH hidden in the payload is delivered as
        if the client had sent it) swallows the client's real packets that follow. The stream
        cannot be trusted past such a packet, and MQTT 3.1.1 (§4.8, MQTT-3.3.2-2) says to close
        the connection: the packets before it still finish (delivered, acknowledged) within
        ``_VIOLATION_GRACE``, then the connection closes as abnormal (the will is published).
        Everything else is amqtt's loop: one task per packet, CONNECT awaited, the keep-alive
        as the read timeout.
        """
        if self.session is None or self._reader_ready is None:
            raise AMQTTError("the reader loop needs a session and a started handler")
        client_id = self.session.client_id
        running: deque[asyncio.Task[None]] = deque()
        timeout: float | None = self.session.keep_alive if self.session.keep_alive > 0 else None
        violation: str | None = None
        while True:
            try:
                self._reader_ready.set()
                while running and running[0].done():
                    running.popleft()
                if self.reader is None:
                    break
                fixed_header = await asyncio.wait_for(MQTTFixedHeader.from_stream(self.reader), timeout=timeout)
                if not fixed_header:
                    break  # EOF
                if fixed_header.packet_type in (RESERVED_0, RESERVED_15):
                    violation = f"reserved packet type {fixed_header.packet_type}"
                    break
                packet = await packet_class(fixed_header).from_stream(self.reader, fixed_header=fixed_header)
                await self.plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=packet, session=self.session)
                kind = packet.fixed_header.packet_type if packet.fixed_header is not None else -1
                if kind == CONNECT:
                    # awaited, as amqtt does: nothing else of this connection runs before it
                    await self.handle_connect(packet)
                    continue
                name = _PACKET_HANDLERS.get(kind)
                if name is None:
                    _log.warning("%s: unhandled packet type %s", client_id, kind)
                    continue
                running.append(asyncio.create_task(getattr(self, name)(packet)))
            except MQTTError as exc:
                violation = str(exc)
                break
            except asyncio.CancelledError:
                break
            except asyncio.TimeoutError:
                self.handle_read_timeout()
            except NoDataError:
                pass  # a truncated packet: the next read sees the EOF
            except Exception as exc:  # noqa: BLE001 - a packet amqtt cannot decode or handle
                violation = repr(exc)
                break
        if violation is not None:
            _log.warning("%s: protocol violation (%s): closing the connection", client_id, violation)
            pending = [task for task in running if not task.done()]
            if pending:
                try:
                    await asyncio.wait(pending, timeout=_VIOLATION_GRACE)
                except asyncio.CancelledError:
                    pass  # the broker is stopping this handler: close now, as below
        while running:
            running.popleft().cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    def handle_read_timeout(self) -> None:
        # Stock amqtt logs and keeps reading forever; EOF ends the reader loop,
        # which reports an abnormal close, so the will gets published.
        self.keepalive_expired = True
        if self.reader is not None:
            self.reader.feed_eof()

    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        deliver = self.inline
        topic = publish_packet.topic_name
        qos = publish_packet.qos
        if (deliver is None or qos not in (0, 1) or not topic or "#" in topic or "+" in topic
                or publish_packet.data is None or self.session is None):
            # QoS 2 (its PUBREC/PUBREL flow) and protocol violations keep amqtt's handling
            await super().handle_publish(publish_packet)
            return
        packet_id = publish_packet.variable_header.packet_id if publish_packet.variable_header else None
        message = IncomingApplicationMessage(packet_id, topic, qos, publish_packet.data, publish_packet.retain_flag)
        message.publish_packet = publish_packet
        if self._inbox is None:
            self._inbox = deque()
        self._inbox.append(message)
        if self._delivering:
            return  # the task delivering now takes it next, so messages keep their order
        self._delivering = True
        try:
            while self._inbox:
                message = self._inbox.popleft()
                if not await deliver(message):
                    await self.handle_connection_closed()
                    return
                if message.qos == 1:
                    # acknowledged once handled, as amqtt does once queued
                    puback = PubackPacket.build(message.packet_id)
                    await self._send_packet(puback)
                    message.puback_packet = puback
        finally:
            self._delivering = False


@dataclass(slots=True, eq=False)
class _Connection:
    info: ConnectionInfo
    session: Session
    handler: BrokerProtocolHandler
    writer: WriterAdapter
    reader: ReaderAdapter | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    suppress_will: bool = False
    key: Hashable | None = None  # its kick_key, if indexed


class _TaskSet:
    """The list interface amqtt's ``PluginManager`` uses for its fired events, with O(1) removal."""

    def __init__(self) -> None:
        self._items: dict[Any, None] = {}

    def extend(self, items: Any) -> None:
        self._items.update(dict.fromkeys(items))

    def append(self, item: Any) -> None:
        self._items[item] = None

    def remove(self, item: Any) -> None:
        del self._items[item]  # KeyError, like list.remove's ValueError, is what amqtt suppresses

    def clear(self) -> None:
        self._items.clear()

    def __iter__(self) -> Any:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)


class _Ingress:
    """How many packets bulk connections may take from their backlog per event-loop iteration.

    A packet read from an empty buffer (a device that sends now and then, like one publishing
    telemetry every 50 ms) is never held, nor is any packet of a connection not marked bulk
    (:meth:`HardenedBroker.mark_bulk`). A bulk connection's packet already waiting behind
    others (a storm's requests piled up) takes a turn: at most ``per_round`` such turns run in
    one loop iteration, the rest wait, first come first served, for the following iterations. So
    one iteration handles a bounded amount of the storm (a few ms), the backlog waits in the
    connections' buffers and then their sockets (TCP backpressure), and an unrelated device's
    message, which crosses a few iterations on its way through amqtt, is not delayed by the
    hundreds of storm packets that would otherwise share each of them.
    """

    __slots__ = ("_per_round", "_scheduled", "_used", "_waiters")

    def __init__(self, per_round: int) -> None:
        self._per_round = per_round
        self._used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._scheduled = False

    async def turn(self) -> None:
        """Wait for a turn (at least one loop iteration, more while the budget is spent)."""
        if self._used < self._per_round and not self._waiters:
            self._used += 1
            self._schedule()
            await asyncio.sleep(0)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._schedule()
        await waiter  # a cancelled waiter (connection closed) is skipped when its turn comes

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._next_round)

    def _next_round(self) -> None:
        # call_soon runs this in the next iteration: a new round, whose turns start now
        self._scheduled = False
        self._used = 0
        while self._waiters and self._used < self._per_round:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._used += 1
        if self._used:
            self._schedule()


class _FairReader(StreamReaderAdapter):
    """Yields before each MQTT packet already buffered behind others; a bulk connection takes a turn.

    amqtt's reader loop handles every packet already buffered for a connection before it lets
    another run: a client with thousands of PUBLISHes queued (a storm) then holds the loop for
    all of them while one unrelated client's packet waits. At a packet's fixed header (its reads
    are one byte each; the body read re-arms) a reader with more data buffered yields once, so
    the connections are served in turn and the backlog stays in the socket buffers (TCP
    backpressure). A connection marked bulk (:meth:`HardenedBroker.mark_bulk`: the in-process
    CA's storm) waits for an :class:`_Ingress` turn instead, so its backlog adds a bounded
    amount of work to each loop iteration, however many such connections there are. With
    nothing buffered the read suspends anyway, so an idle or lightly loaded connection pays
    nothing.
    """

    def __init__(self, reader: asyncio.StreamReader, ingress: _Ingress) -> None:
        super().__init__(reader)
        self._armed = True
        self._ingress = ingress
        self.bulk_until = 0.0  # loop time until which this connection's backlog takes turns

    async def read(self, n: int = -1) -> bytes:
        if n != 1:
            self._armed = True
        elif self._armed:  # a packet's first byte
            self._armed = False
            if self._reader._buffer:  # noqa: SLF001 - a backlog: let others run first
                if self.bulk_until and self.bulk_until > asyncio.get_running_loop().time():
                    await self._ingress.turn()
                else:
                    await asyncio.sleep(0)
        return await super().read(n)


def _queued_publish(handler: BrokerProtocolHandler, topic: str, data: bytes | bytearray, qos: int) -> Awaitable[Any]:
    """amqtt's ``mqtt_publish``, counted in ``slow_sends`` from now until it ends (QoS 1: acknowledged)."""
    if isinstance(handler, _HardenedHandler):
        handler.slow_sends += 1

    async def publish() -> Any:
        try:
            return await handler.mqtt_publish(topic, data, qos, retain=False)
        finally:
            if isinstance(handler, _HardenedHandler):
                handler.slow_sends -= 1

    return publish()


def _abort(writer: WriterAdapter) -> None:
    if isinstance(writer, StreamWriterAdapter):
        transport = writer._writer.transport  # noqa: SLF001 - amqtt exposes no abort
        transport.abort()


class HardenedBroker(Broker):
    """amqtt ``Broker`` with the certmq hardening (see the module docstring and docs/broker.md).

    ``config``: an amqtt broker config (dict or ``BrokerConfig``); every bound
    listener must be ``type: tcp`` with ``ssl: true`` and is served with
    ``ssl_context``, whose ``verify_mode`` must be ``CERT_REQUIRED``. Without a
    ``plugins`` key no plugin is loaded (amqtt's default set includes anonymous
    auth). Hooks may be plain or async callables:

    - ``identity_hook(certificate) -> identity | None``: ``None`` or an
      exception refuses the connection (revoked, unknown tenant, ...);
    - ``client_id_hook(identity, client_id) -> bool``;
    - ``acl_hook(identity, action, topic) -> bool`` with action ``publish``,
      ``subscribe`` (topic = the filter) or ``receive`` (every delivery,
      retained ones included). Messages published by in-process code
      (``broadcast_message``, :meth:`deliver_to`) skip the ``publish`` check.

    ``ingress_per_round``: packets that connections marked bulk (:meth:`mark_bulk`) may take
    from their backlog per event-loop iteration, all of them together.

    ``kick_key(identity) -> hashable | None`` (settable like the hooks, before the first
    connection): live connections are also indexed under their identity's key, so
    :meth:`kick` with ``keys=`` looks at those connections only instead of every one.
    """

    def __init__(
        self,
        config: BrokerConfig | dict[str, Any],
        *,
        ssl_context: ssl.SSLContext,
        identity_hook: IdentityHook = default_identity,
        client_id_hook: ClientIdHook = cn_is_client_id,
        acl_hook: AclHook = allow_all,
        kick_key: Callable[[Any], Hashable | None] | None = None,
        keepalive_factor: float = 1.5,
        connect_timeout: float = 10.0,
        kick_grace: float = 0.5,
        stream_limit: int = 16 * 1024,
        ingress_per_round: int = 32,
    ) -> None:
        if not isinstance(ssl_context, ssl.SSLContext) or ssl_context.verify_mode != ssl.CERT_REQUIRED:
            raise ValueError("ssl_context must be an ssl.SSLContext with verify_mode CERT_REQUIRED")
        if keepalive_factor < 1 or connect_timeout <= 0 or kick_grace <= 0 or stream_limit < 1024:
            raise ValueError("keepalive_factor >= 1, connect_timeout > 0, kick_grace > 0, stream_limit >= 1024")
        if ingress_per_round < 1:
            raise ValueError("ingress_per_round must be >= 1")
        if isinstance(config, dict):
            config = dict(config)
            config.setdefault("plugins", {})
            config = BrokerConfig.from_dict(config)
        for name, listener in config.listeners.items():
            if name == "default" and "bind" not in listener:
                continue
            if "bind" in listener and (listener.type != ListenerType.TCP or not listener.get("ssl", False)):
                raise ValueError(f"listener {name!r}: the hardened broker serves TCP listeners with ssl: true only")
        # Hooks first: plugins are constructed inside Broker.__init__ and may replace them.
        self.identity_hook = identity_hook
        self.client_id_hook = client_id_hook
        self.acl_hook = acl_hook
        self.kick_key = kick_key
        self._ssl_context = ssl_context
        self._keepalive_factor = keepalive_factor
        self._connect_timeout = connect_timeout
        self._kick_grace = kick_grace
        self._stream_limit = stream_limit
        self._ingress = _Ingress(ingress_per_round)
        self._trie = TopicTrie()
        self._client_filters: dict[str, dict[str, int]] = {}
        self._identities: dict[str, Any] = {}
        self._live: dict[str, _Connection] = {}
        # kick_key's index of _live: key -> the live connections whose identity has that key
        self._live_by_key: dict[Hashable, dict[str, _Connection]] = {}
        self._register_lock = asyncio.Lock()
        self._stopping = False
        self._fanning = 0  # broadcasts being fanned out now (one may be suspended in an await)
        super().__init__(config)
        # amqtt keeps the plugin-event tasks in a list and removes each finished one with
        # list.remove: quadratic once a burst leaves thousands in flight.
        self.plugins_manager._fired_events = _TaskSet()  # type: ignore[assignment]  # noqa: SLF001

    # -- public API ---------------------------------------------------------

    @classmethod
    def of(cls, context: BrokerContext) -> HardenedBroker:
        """The hardened broker behind a plugin's ``context`` (``TypeError`` on a stock broker)."""
        broker = getattr(context, "_broker_instance", None)
        if not isinstance(broker, cls):
            raise TypeError("this plugin needs broker_plugin.broker.HardenedBroker, not a stock amqtt Broker")
        return broker

    def identity_of(self, client_id: str) -> Any:
        """The identity bound to ``client_id``'s session (live or persistent), or ``None``."""
        return self._identities.get(client_id)

    def connections(self) -> list[ConnectionInfo]:
        """Every live connection."""
        return [conn.info for conn in self._live.values()]

    async def kick(self, target: str | Callable[[ConnectionInfo], bool], reason: str, *,
                   keys: Iterable[Hashable] | None = None) -> list[str]:
        """Close every live connection matching ``target`` (a client id or a predicate).

        ``keys``: only connections whose identity has one of these :attr:`kick_key` keys are
        looked at (the predicate still decides); without a ``kick_key`` every connection is.
        A revocation names its certificates, and asking each of 1,000 connections costs
        ~1.2 ms of cold-cache reads on the event loop, while the delta 1,000 subscribers
        wait for is still to be signed.

        Returns the closed client ids. Each connection gets ``kick_grace``
        seconds to close cleanly, then its transport is aborted, so this returns
        well within a second. A kicked client's will is not published. Refusing
        its reconnection is the identity hook's job.
        """
        if isinstance(target, str):
            victims = [conn for cid, conn in self._live.items() if cid == target]
        else:
            if keys is not None and self.kick_key is not None:
                index = self._live_by_key
                candidates: Iterable[_Connection] = [conn for key in set(keys) for conn in index.get(key, {}).values()]
            else:
                candidates = self._live.values()
            victims = [conn for conn in candidates if target(conn.info)]
        for conn in victims:
            _log.warning("kicking %s: %s", conn.info.client_id, reason)
        await asyncio.gather(*(self._close(conn, suppress_will=True) for conn in victims))
        return [conn.info.client_id for conn in victims]

    async def deliver_to(self, client_id: str, topic: str, data: bytes, qos: int = 0) -> bool:
        """Send one PUBLISH to ``client_id``'s live connection only; ``False`` if it is not connected.

        Nothing is broadcast, retained or seen by other subscribers, and the ACL
        is not consulted: the in-process caller decides. With QoS 1/2 this waits
        for the client's acknowledgement (amqtt raises ``TimeoutError`` after 5 s
        without one).
        """
        if qos not in (0, 1, 2):
            raise ValueError("qos must be 0, 1 or 2")
        if not topic or "+" in topic or "#" in topic:
            raise ValueError(f"invalid topic name {topic!r}")
        conn = self._live.get(client_id)
        if conn is None or conn.done.is_set():
            return False
        await conn.handler.mqtt_publish(topic, bytes(data), qos, retain=False)
        return True

    def mark_bulk(self, client_id: str, seconds: float = 1.0) -> None:
        """Treat ``client_id``'s connection as bulk traffic for the next ``seconds``.

        While it is, each packet already buffered behind others on it waits for an ingress turn
        (at most ``ingress_per_round`` such packets per event-loop iteration, broker-wide, first
        come first served) instead of being read at once. The in-process CA marks the
        connections it serves, so a storm's backlog waits in their sockets and every other
        connection's traffic goes ahead of it. Nothing is refused or reordered within a connection.
        """
        conn = self._live.get(client_id)
        if conn is not None and isinstance(conn.reader, _FairReader):
            conn.reader.bulk_until = asyncio.get_running_loop().time() + seconds

    def deliver_now(self, client_id: str, topic: str, data: bytes) -> bool | None:
        """Write one QoS 0 PUBLISH to ``client_id``'s live connection now: no task, no await.

        For cheap replies under load (a storm's BUSY refusals): ``True`` written, ``False`` not
        connected, ``None`` not possible right now (the client is not reading and its buffer is
        full, or copies are queued on amqtt's path) -- then use :meth:`deliver_to`. Like
        :meth:`deliver_to`, nothing is broadcast, retained or seen by anyone else.
        """
        if not topic or "+" in topic or "#" in topic:
            raise ValueError(f"invalid topic name {topic!r}")
        conn = self._live.get(client_id)
        if conn is None or conn.done.is_set():
            return False
        watched = bool(self.plugins_manager._event_plugin_callbacks.get(MQTTEvents.PACKET_SENT))  # noqa: SLF001
        return True if Fanout(topic, data, watched=watched).send(conn.handler, conn.session, 0) else None

    # -- listener -----------------------------------------------------------

    def _create_ssl_context(self, listener: ListenerConfig) -> ssl.SSLContext:  # type: ignore[override]
        return self._ssl_context

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,
        port: int,
        ssl_context: ssl.SSLContext | None,
    ) -> Any:
        if listener_type != ListenerType.TCP or ssl_context is None:
            raise BrokerError(f"listener {listener_name!r} must be TLS over TCP")
        return await asyncio.start_server(
            partial(self.stream_connected, listener_name=listener_name),
            address,
            port,
            reuse_address=True,
            ssl=ssl_context,
            ssl_handshake_timeout=self._connect_timeout,
            limit=self._stream_limit,
        )

    def listen_port(self, listener_name: str = "default") -> int:
        """The TCP port a listener is bound to (useful with ``bind: 127.0.0.1:0``)."""
        server = self._servers[listener_name].instance
        return int(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    # -- connection lifecycle -----------------------------------------------

    async def _client_connected(self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        server = self._servers.get(listener_name)
        if server is None:
            raise BrokerError(f"Invalid listener name '{listener_name}'")
        if type(reader) is StreamReaderAdapter:
            reader = _FairReader(reader._reader, self._ingress)  # noqa: SLF001
        await server.acquire_connection()
        try:
            await self._serve(listener_name, server, reader, writer)
        except (AMQTTError, MQTTError, NoDataError, ConnectionError) as exc:
            _log.info("connection ended: %r", exc)
        finally:
            server.release_connection()

    async def _refuse(self, writer: WriterAdapter, why: str) -> None:
        _log.warning("connection refused: %s", why)
        try:
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await asyncio.wait_for(writer.close(), self._kick_grace)
        except (OSError, asyncio.TimeoutError):
            _abort(writer)

    async def _serve(self, listener_name: str, server: Server, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        ssl_object = writer.get_ssl_info()
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        peer = writer.get_peer_info() or ("?", 0)
        if not der:  # CERT_REQUIRED makes this unreachable; kept as defence in depth
            _abort(writer)
            return
        try:
            handler, incoming = await asyncio.wait_for(
                _HardenedHandler.init_from_connect(reader, writer, self.plugins_manager), self._connect_timeout
            )
        except asyncio.TimeoutError:
            _log.info("no CONNECT from %s:%s within %ss", peer[0], peer[1], self._connect_timeout)
            _abort(writer)
            return
        try:
            identity = await _call(self.identity_hook, x509.load_der_x509_certificate(der))
        except Exception:  # noqa: BLE001 - a failing hook refuses, never crashes the listener
            _log.exception("identity hook failed")
            identity = None
        if identity is None:
            await self._refuse(writer, "certificate refused by the identity hook")
            return
        client_id = incoming.client_id or ""
        try:
            bound = bool(await _call(self.client_id_hook, identity, client_id))
        except Exception:  # noqa: BLE001
            _log.exception("client id hook failed")
            bound = False
        if not bound:
            await self._refuse(writer, f"client id {client_id!r} not bound to {identity!r}")
            return
        if not client_id:
            client_id = incoming.client_id = gen_client_id()

        async with self._register_lock:
            owner = self._identities.get(client_id)
            if owner is not None and _principal(owner) != _principal(identity):
                # A client id whose session another certificate holds. Its rightful owner (the
                # identity *named* by the client id, e.g. a device reconnecting with its new
                # certificate after a claim credential provisioned it under its id) takes it over
                # with a fresh session; nobody else ever gets it, live or not.
                if not _names(identity, client_id) or _names(owner, client_id):
                    await self._refuse(writer, f"client id {client_id!r} belongs to another identity")
                    return
                _log.warning("client id %s: %r replaces %r's session", client_id, identity, owner)
                stale = self._live.get(client_id)
                if stale is not None:
                    await self._close(stale, suppress_will=True)
                await self._delete_session(client_id)
            if not await self._authenticate(incoming, self.listeners_config[listener_name]):
                await self._refuse(writer, "refused by an authentication plugin")
                return
            old = self._live.get(client_id)
            if old is not None:
                _log.warning("client %s connected again: closing its previous connection", client_id)
                await self._close(old, suppress_will=False)
            session = await self._adopt_session(incoming, client_id)
            session.is_anonymous = False
            if session.keep_alive > 0:
                # the handler's read timeout is the keep-alive timer; float is fine for wait_for
                session.keep_alive = session.keep_alive * self._keepalive_factor  # type: ignore[assignment]
            self._identities[client_id] = identity
            session.transitions.connect()
            handler.attach(session, reader, writer)
            self._sessions[client_id] = (session, handler)
            conn = _Connection(
                info=ConnectionInfo(
                    client_id=client_id,
                    identity=identity,
                    remote=(str(peer[0]), int(peer[1])),
                    connected_at=datetime.now(timezone.utc),
                ),
                session=session,
                handler=handler,
                writer=writer,
                reader=reader,
            )
            self._live[client_id] = conn
            conn.key = self._key_of(identity)
            if conn.key is not None:
                self._live_by_key.setdefault(conn.key, {})[client_id] = conn
            if isinstance(handler, _HardenedHandler):
                handler.inline = partial(self._deliver_inline, session, handler)
            await handler.mqtt_connack_authorize(True)
        try:
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_CONNECTED, client_id=client_id, client_session=session
            )
            await handler.start()
            await self._publish_session_retained_messages(session)
            for topic_filter, qos in list(self._client_filters.get(client_id, {}).items()):
                await self._publish_retained_messages_for_subscription((topic_filter, qos), session)
            await self._client_message_loop(session, handler)
            if session.transitions.is_connected() and self._sessions.get(client_id, (None, None))[1] is handler:
                # the loop gave up on a protocol violation without closing: close now
                await self._stop_handler(handler)
                session.transitions.disconnect()
        finally:
            conn.done.set()
            if self._live.get(client_id) is conn:
                del self._live[client_id]
            indexed = self._live_by_key.get(conn.key) if conn.key is not None else None
            if indexed is not None and indexed.get(client_id) is conn:
                del indexed[client_id]
                if not indexed:
                    del self._live_by_key[conn.key]

    def _key_of(self, identity: Any) -> Hashable | None:
        if self.kick_key is None:
            return None
        try:
            return self.kick_key(identity)
        except Exception:  # noqa: BLE001 - a failing key only costs the index, never the connection
            _log.exception("kick_key failed")
            return None

    async def _adopt_session(self, incoming: Session, client_id: str) -> Session:
        if incoming.clean_session:
            await self._delete_session(client_id)
            incoming.parent = 0
            return incoming
        existing = self._sessions.get(client_id, (None, None))[0]
        if existing is None:
            incoming.parent = 0
            return incoming
        # Everything that describes the connection comes from this CONNECT,
        # the TLS object included (stock amqtt forgets ssl_object: issue #389).
        for name in (
            "will_flag", "will_message", "will_topic", "will_qos", "will_retain",
            "keep_alive", "username", "password", "ssl_object", "remote_address", "remote_port",
        ):
            setattr(existing, name, getattr(incoming, name))
        existing.clean_session = False
        existing.parent = 1
        return existing

    async def _close(self, conn: _Connection, *, suppress_will: bool) -> None:
        conn.suppress_will = conn.suppress_will or suppress_will
        if not conn.done.is_set():
            await conn.handler.handle_connection_closed()
            try:
                await asyncio.wait_for(conn.done.wait(), self._kick_grace)
            except asyncio.TimeoutError:
                _abort(conn.writer)
                try:
                    await asyncio.wait_for(conn.done.wait(), self._kick_grace)
                except asyncio.TimeoutError:
                    _log.error("connection of %s did not end after abort", conn.info.client_id)

    async def _handle_disconnect(self, client_session: Session, handler: BrokerProtocolHandler, disconnect_waiter: Any) -> None:
        conn = self._live.get(client_session.client_id or "")
        if conn is not None and conn.handler is handler and conn.suppress_will:
            client_session.will_flag = False
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    async def _authenticate(self, session: Session, listener: ListenerConfig) -> bool:
        # The certificate already authenticated the client; plugins may still veto.
        returns = await self.plugins_manager.map_plugin_auth(session=session)
        results = [r for r in (returns or {}).values() if r is not None]
        return all(results)

    async def _delete_session(self, client_id: str) -> None:
        await super()._delete_session(client_id)
        self._identities.pop(client_id, None)

    async def shutdown(self) -> None:
        """Stop the broker, closing every connection."""
        self._stopping = True
        await super().shutdown()

    async def _cleanup_session(self, client_id: str) -> None:
        entry = self._sessions.get(client_id)
        if entry is not None and entry[0].transitions.is_connected() and not self._stopping:
            # the expiry monitor listed this id while disconnected; it has reconnected since
            return
        await super()._cleanup_session(client_id)
        if client_id not in self._sessions:
            self._identities.pop(client_id, None)

    # -- ACL ----------------------------------------------------------------

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        client_id = session.client_id or ""
        if client_id not in self._identities:
            return False
        try:
            allowed = bool(await _call(self.acl_hook, self._identities[client_id], _ACTIONS[action], topic))
        except Exception:  # noqa: BLE001 - a failing ACL denies
            _log.exception("ACL hook failed")
            return False
        return allowed and await super()._topic_filtering(session, topic, action)

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        message = wait_deliver.result()
        topic = getattr(message, "topic", None)
        if topic and topic.startswith("$") and "+" not in topic and "#" not in topic:
            # '$' topics belong to the broker: drop the message, keep the client (stock disconnects).
            _log.info("%s published to reserved topic %r: dropped", client_session.client_id, topic)
            return True
        return await super()._handle_message_delivery(client_session, handler, wait_deliver)

    # -- subscriptions ------------------------------------------------------

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        topic_filter, qos = subscription
        try:
            validate_filter(topic_filter)
        except ValueError:
            return AMQTT_MAGIC_VALUE_RET_SUBSCRIBED
        if not await self._topic_filtering(session, topic_filter, Action.SUBSCRIBE):
            return AMQTT_MAGIC_VALUE_RET_SUBSCRIBED
        max_qos = self.config.get("max-qos", qos)
        qos = min(qos, max_qos) if isinstance(max_qos, int) else qos
        client_id = session.client_id or ""
        subscribers = self._subscriptions.setdefault(topic_filter, [])
        for index, (existing, _old_qos) in enumerate(subscribers):
            if existing.client_id == client_id:
                subscribers[index] = (session, qos)
                break
        else:
            subscribers.append((session, qos))
        self._trie.add(topic_filter)
        self._client_filters.setdefault(client_id, {})[topic_filter] = qos
        return qos

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        subscribers = self._subscriptions.get(a_filter)
        if not subscribers:
            return 0
        kept = [(s, q) for s, q in subscribers if s.client_id != session.client_id]
        deleted = len(subscribers) - len(kept)
        if kept:
            self._subscriptions[a_filter] = kept
        else:
            del self._subscriptions[a_filter]
            self._trie.discard(a_filter)
        filters = self._client_filters.get(session.client_id or "")
        if filters is not None:
            filters.pop(a_filter, None)
        return deleted

    async def _del_all_subscriptions(self, session: Session) -> None:
        for topic_filter in list(self._client_filters.pop(session.client_id or "", {})):
            self._del_subscription(topic_filter, session)

    # -- delivery -----------------------------------------------------------

    async def _deliver_inline(self, session: Session, handler: BrokerProtocolHandler,
                              message: IncomingApplicationMessage) -> bool:
        """A client's PUBLISH, handled in its packet's task (see :class:`_HardenedHandler`)."""
        ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        ready.set_result(message)
        return await self._handle_message_delivery(session, handler, ready)

    async def _broadcast_message(
        self, session: Session | None, topic: str | None, data: bytes | bytearray | None, force_qos: int | None = None
    ) -> None:
        # Requests to the in-process CA match no subscription. Queued anyway, a storm of them
        # sits in the one FIFO broadcast queue ahead of every message that has a subscriber.
        if topic is not None and not self._trie.match(topic):
            return
        if session is not None and topic is not None and self._broadcast_queue.empty() and not self._fanning:
            # A client's message with nothing queued or being fanned out ahead of it: sent now,
            # not one broadcast-queue hop and a task later (no message can overtake another).
            broadcast: dict[str, Any] = {"session": session, "topic": topic, "data": data}
            if force_qos is not None:
                broadcast["qos"] = force_qos
            await self._fan_out(broadcast, self._tasks_queue)
            return
        await super()._broadcast_message(session, topic, data, force_qos)

    async def _run_broadcast(self, running_tasks: Any) -> None:
        # amqtt's broadcast loop spends ~3 loop iterations per message (a task, its completion,
        # asyncio.wait); under a storm an iteration takes tens of ms, so one message at a time
        # falls behind a 20 msg/s subscriber. Everything already queued goes in this call.
        await self._fan_out(await self._broadcast_queue.get(), running_tasks)
        for _ in range(_DRAIN_AT_ONCE - 1):
            try:
                broadcast = self._broadcast_queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            await self._fan_out(broadcast, running_tasks)

    async def _fan_out(self, broadcast: dict[str, Any], running_tasks: Any) -> None:
        self._fanning += 1
        # A fan-out to thousands allocates a few objects per copy; a collection it triggers on the
        # way (tens of ms over a broker's heap) would land between the first and the last copy.
        # It runs after the fan-out instead.
        collecting = gc.isenabled()
        gc.disable()
        try:
            await self._fan_out_now(broadcast, running_tasks)
        finally:
            self._fanning -= 1
            if collecting:
                gc.enable()

    async def _fan_out_now(self, broadcast: dict[str, Any], running_tasks: Any) -> None:
        topic = broadcast["topic"]
        watched = bool(self.plugins_manager._event_plugin_callbacks.get(MQTTEvents.PACKET_SENT))  # noqa: SLF001
        fanout = Fanout(topic, broadcast["data"], watched=watched)
        # The receive ACL inline, not a coroutine per subscriber: a revocation delta goes to
        # every validator and device of a region at once.
        identities, hook = self._identities, self.acl_hook
        topic_plugins = bool(self.plugins_manager._topic_plugins and self.plugins_manager.is_topic_filtering_enabled())  # noqa: SLF001
        for topic_filter in self._trie.match(topic):
            for target_session, sub_qos in list(self._subscriptions.get(topic_filter, ())):
                qos = broadcast.get("qos", sub_qos)
                identity = identities.get(target_session.client_id or "")
                if identity is None:
                    continue
                try:
                    allowed = hook(identity, "receive", topic)
                    if allowed is not True and allowed is not False and inspect.isawaitable(allowed):
                        allowed = await allowed
                except Exception:  # noqa: BLE001 - a failing ACL denies
                    _log.exception("ACL hook failed")
                    continue
                if not allowed or (topic_plugins and not await Broker._topic_filtering(  # noqa: SLF001
                        self, target_session, topic, Action.RECEIVE)):
                    continue
                state = target_session.transitions.state
                if state != "connected":
                    if not target_session.clean_session and qos in (1, 2) and not target_session.is_anonymous:
                        await self._retain_broadcast_message(broadcast, qos, target_session)
                    continue
                handler = self._get_handler(target_session)
                if handler is None:
                    continue
                if not fanout.send(handler, target_session, qos):
                    # QoS 2, a client not reading (its transport buffer is full: the stock path
                    # awaits the drain), a closing transport, or a plugin watching sent packets.
                    running_tasks.append(asyncio.ensure_future(_queued_publish(handler, topic, broadcast["data"], qos)))
        fanout.arm_timeout()

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Session) -> None:
        topic_filter, qos = subscription
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        for topic, retained in list(self._retained_messages.items()):
            if not filter_matches(topic_filter, topic):
                continue
            if not await self._topic_filtering(session, topic, Action.RECEIVE):
                continue
            tasks.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)
                )
            )
        if tasks:
            await asyncio.wait(tasks)
