"""The transport seam: what the device client needs from an MQTT connection, and an in-memory one.

Like httpx's transports: the client takes ``transport=`` and never sees the
MQTT library. Production uses :class:`device_client.mqtt.AiomqttTransport`;
unit tests use :class:`MemoryTransport` connected to a :class:`MemoryBroker`
whose behaviour is a handler function (httpx's ``MockTransport`` idea).

Every backend error is mapped, in the transport, to this small tree::

    TransportError ............ the connection failed or was lost (retry later)
     ├── ConnectionRefused .... the broker refused *these credentials* (.reason)
     └── NotConnected ......... used before connect() or after disconnect()

This module knows nothing of certificates beyond carrying them, or of certmq messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography import x509

from protocol.errors import CertmqError

__all__ = [
    "ClientCredentials",
    "ConnectionRefused",
    "IncomingMessage",
    "MemoryBroker",
    "MemoryTransport",
    "NotConnected",
    "Transport",
    "TransportError",
    "topic_matches",
]


class TransportError(CertmqError):
    """The connection could not be made or was lost. Retrying later may work."""


class ConnectionRefused(TransportError):
    """The broker refused these credentials (TLS alert, CONNACK not authorised). ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"connection refused: {reason}")
        self.reason = reason


class NotConnected(TransportError):
    """The transport is not connected."""


@dataclass(frozen=True, kw_only=True)
class ClientCredentials:
    """Who connects: the MQTT client id and the TLS client certificate.

    Give either objects (``certificate`` + ``private_key``, with optional
    ``chain``) or files (``cert_path`` PEM, leaf first + chain; ``key_path``).
    ``ca_certificates`` / ``ca_path`` are the anchors the *broker's* server
    certificate must chain to.
    """

    client_id: str
    certificate: x509.Certificate | None = None
    chain: tuple[x509.Certificate, ...] = ()
    private_key: Any = None
    cert_path: Path | None = None
    key_path: Path | None = None
    ca_certificates: tuple[x509.Certificate, ...] = ()
    ca_path: Path | None = None
    #: ``None``: the transport's own setting. Bootstrap connections ask for a clean session so
    #: that nothing of the claim credential's session outlives provisioning under the device's id.
    clean_session: bool | None = None

    def leaf(self) -> x509.Certificate | None:
        """The client certificate, loading it from ``cert_path`` when only the path was given."""
        if self.certificate is not None:
            return self.certificate
        if self.cert_path is not None:
            return x509.load_pem_x509_certificates(Path(self.cert_path).read_bytes())[0]
        return None


@dataclass(frozen=True)
class IncomingMessage:
    """One received publish."""

    topic: str
    payload: bytes
    retain: bool = False


@runtime_checkable
class Transport(Protocol):
    """An MQTT connection as the device client uses it (QoS 1, persistent session)."""

    async def connect(self, credentials: ClientCredentials) -> None:
        """Connect (or reconnect) with ``credentials``; raise ``ConnectionRefused`` / ``TransportError``."""
        ...

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Publish ``payload`` to ``topic``."""
        ...

    async def subscribe(self, topic: str) -> None:
        """Subscribe to a topic filter."""
        ...

    def messages(self) -> AsyncIterator[IncomingMessage]:
        """Received messages; ends with ``TransportError`` when the connection drops."""
        ...

    async def disconnect(self) -> None:
        """Close the connection (no error if not connected)."""
        ...


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` the rest; ``$`` topics not matched by wildcards)."""
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    if topic.startswith("$") and f_parts[0] in ("+", "#"):
        return False
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts) or (part != "+" and part != t_parts[i]):
            return False
    return len(f_parts) == len(t_parts)


Authenticator = Callable[[ClientCredentials], None]
"""Raises ``ConnectionRefused`` to refuse a connection (the broker's TLS and ACL check)."""
Handler = Callable[["MemoryBroker", ClientCredentials, str, bytes], Awaitable[None] | None]
"""Called for every publish a client makes: the fake CA (or anything) lives here."""


@dataclass(eq=False)
class _Session:
    credentials: ClientCredentials
    queue: asyncio.Queue[IncomingMessage | BaseException]
    filters: set[str] = field(default_factory=set)


class MemoryBroker:
    """An in-memory broker for tests: authentication and publish handling are functions you pass.

    ``authenticate(credentials)`` raises ``ConnectionRefused`` to refuse a
    client (default: accept everyone). ``handler(broker, credentials, topic,
    payload)`` sees every publish (default: deliver to subscribers). Use
    :meth:`deliver` from a handler to send to subscribers, :meth:`restart` to
    drop every connection, ``down = True`` to refuse connecting with a
    ``TransportError``.
    """

    def __init__(self, *, authenticate: Authenticator | None = None, handler: Handler | None = None) -> None:
        self.authenticate = authenticate
        self.handler = handler
        self.down = False
        self.retained: dict[str, bytes] = {}
        self.published: list[tuple[str, str, bytes]] = []  #: (client id, topic, payload), for assertions
        self.connections: list[ClientCredentials] = []  #: every successful connect, in order
        self._sessions: list[_Session] = []

    def _attach(self, credentials: ClientCredentials) -> _Session:
        if self.down:
            raise TransportError("broker unreachable")
        if self.authenticate is not None:
            self.authenticate(credentials)
        session = _Session(credentials=credentials, queue=asyncio.Queue())
        self._sessions.append(session)
        self.connections.append(credentials)
        return session

    def _detach(self, session: _Session) -> None:
        if session in self._sessions:
            self._sessions.remove(session)

    async def _publish(self, session: _Session, topic: str, payload: bytes) -> None:
        self.published.append((session.credentials.client_id, topic, payload))
        if self.handler is None:
            self.deliver(topic, payload)
            return
        result = self.handler(self, session.credentials, topic, payload)
        if result is not None:
            await result

    def _subscribe(self, session: _Session, topic_filter: str) -> None:
        session.filters.add(topic_filter)
        for topic, payload in self.retained.items():
            if topic_matches(topic_filter, topic):
                session.queue.put_nowait(IncomingMessage(topic, payload, retain=True))

    def deliver(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Send ``payload`` on ``topic`` to every subscribed session; return how many got it."""
        if retain:
            self.retained[topic] = payload
        count = 0
        for session in self._sessions:
            if any(topic_matches(f, topic) for f in session.filters):
                session.queue.put_nowait(IncomingMessage(topic, payload))
                count += 1
        return count

    def restart(self) -> None:
        """Drop every connection, as a broker restart does (subscriptions are lost too)."""
        for session in list(self._sessions):
            session.queue.put_nowait(TransportError("connection lost: broker restarted"))
        self._sessions.clear()


class MemoryTransport:
    """A :class:`Transport` connected to a :class:`MemoryBroker`."""

    def __init__(self, *, broker: MemoryBroker) -> None:
        self.broker = broker
        self._session: _Session | None = None
        self.credentials: ClientCredentials | None = None

    def _live(self) -> _Session:
        if self._session is None or self._session not in self.broker._sessions:
            raise NotConnected("not connected")
        return self._session

    async def connect(self, credentials: ClientCredentials) -> None:
        await self.disconnect()
        self._session = self.broker._attach(credentials)
        self.credentials = credentials

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        await self.broker._publish(self._live(), topic, bytes(payload))

    async def subscribe(self, topic: str) -> None:
        self.broker._subscribe(self._live(), topic)

    async def messages(self) -> AsyncIterator[IncomingMessage]:
        session = self._live()
        while True:
            item = await session.queue.get()
            if isinstance(item, BaseException):
                if self._session is session:
                    self._session = None
                raise item
            yield item

    async def disconnect(self) -> None:
        if self._session is not None:
            self.broker._detach(self._session)
            self._session.queue.put_nowait(NotConnected("disconnected"))
            self._session = None

    @property
    def connected(self) -> bool:
        """Whether the transport holds a live session."""
        return self._session is not None and self._session in self.broker._sessions


