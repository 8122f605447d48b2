"""The production transport: aiomqtt over TLS with the device's client certificate.

:func:`build_ssl_context` makes the TLS context (TLS 1.2+, the broker's
certificate verified against the tenant CA bundle, the client certificate and
key). ``ssl`` loads client credentials only from files, so credentials given
as objects are written to a private temporary directory, loaded, and removed
at once. Keys that live on a PKCS#11 token cannot be loaded by Python's
``ssl`` module at all: with a token, connect through an OpenSSL provider or a
TLS-terminating helper (not done here).

aiomqtt / paho errors are mapped once, here:

* CONNACK "not authorised / bad credentials" (the broker's identity hook said no)
  -> :class:`~device_client.transport.ConnectionRefused` naming the code;
* a TLS alert from the broker, or the broker's certificate failing verification
  -> ``ConnectionRefused``;
* the broker closing the connection right after a completed TLS handshake,
  before CONNACK, twice in a row -> ``ConnectionRefused``: with TLS 1.3 the
  server checks the client certificate after the client's side of the
  handshake is over, and amqtt's asyncio TLS server aborts without sending
  the alert, so that is all the client sees of a refused certificate. Once
  could be a broker restarting, so it is retried once after 0.3 s;
* everything else (nothing listening, timeouts, resets, EOF mid-handshake)
  -> :class:`~device_client.transport.TransportError`: try again later.

The difference matters: ``CertStore.promote`` discards a new certificate on
``ConnectionRefused`` and keeps it staged on ``TransportError``.
Tested against the real broker in ``tests/device_integration/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from .transport import ClientCredentials, ConnectionRefused, IncomingMessage, NotConnected, TransportError

__all__ = ["AiomqttTransport", "build_ssl_context"]

# CONNACK codes meaning "these credentials are refused" (MQTT 3.1.1: 4, 5; MQTT 5: 0x86, 0x87, 0x8A)
_REFUSED_CODES = {4, 5, 0x86, 0x87, 0x8A}
_paho_log = logging.getLogger("certmq.device.mqtt")


def _code(rc: Any) -> int | None:
    # paho 2 hands CONNACK codes over as ReasonCode objects (unhashable; MQTT 3.1.1's 5 becomes 0x87)
    value = getattr(rc, "value", rc)
    return value if isinstance(value, int) else None


class _ClosedEarly(TransportError):
    """The broker closed the connection after the TLS handshake, before CONNACK.

    Python's asyncio TLS server (amqtt) aborts a connection whose client certificate it refuses
    without flushing the TLS alert, and with TLS 1.3 the client's side of the handshake is already
    complete then: the client sees only the connection closing. Raised once, it is retried; twice
    in a row, :meth:`AiomqttTransport.connect` maps it to ``ConnectionRefused``.
    """


_EARLY_CLOSE_RETRY = 0.3
_CLIENT_CLASS: Any = None


def _client_class() -> Any:
    """aiomqtt.Client that reports a disconnect before CONNACK (aiomqtt itself ignores it)."""
    global _CLIENT_CLASS
    if _CLIENT_CLASS is None:
        import aiomqtt

        class _Client(aiomqtt.Client):
            certmq_early: asyncio.Future[BaseException] | None = None

            def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                               properties: Any = None) -> None:
                early = self.certmq_early
                if early is not None and not early.done():
                    early.set_result(_ClosedEarly(f"disconnected before CONNACK: {reason_code}"))
                super()._on_disconnect(client, userdata, flags, reason_code, properties)

        _CLIENT_CLASS = _Client
    return _CLIENT_CLASS


def _is_refusal(exc: object) -> bool:
    """A TLS alert from the peer or a failed verification of the peer: *these credentials* are refused.

    Not an EOF or a reset in the middle of the handshake: that is a network problem, and treating
    it as a refusal would make the device discard a good new certificate.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return True
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "ALERT" in str(getattr(exc, "reason", "") or "").upper()
    return False


class _AlertWatch(logging.Handler):
    """Receives paho's log records of one connection; a TLS alert in one of them resolves ``alert``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, alert: asyncio.Future[BaseException]) -> None:
        super().__init__()
        self.loop = loop
        self.alert = alert

    def emit(self, record: logging.LogRecord) -> None:
        for arg in record.args if isinstance(record.args, tuple) else ():
            if isinstance(arg, ssl.SSLError) and _is_refusal(arg):
                self.loop.call_soon_threadsafe(self._set, arg)
        if _paho_log.isEnabledFor(record.levelno):
            _paho_log.handle(record)

    def _set(self, error: BaseException) -> None:
        if not self.alert.done():
            self.alert.set_result(error)


def _alert_logger(loop: asyncio.AbstractEventLoop, alert: asyncio.Future[BaseException]) -> logging.Logger:
    # An unregistered Logger per connection (logging.getLogger would keep every one forever);
    # records still reach the ``certmq.device.mqtt`` logger through the handler.
    logger = logging.Logger("certmq.device.mqtt.connection")
    logger.addHandler(_AlertWatch(loop, alert))
    return logger


def build_ssl_context(credentials: ClientCredentials) -> ssl.SSLContext:
    """A client TLS context: verify the broker against the CA bundle, present the client certificate."""
    # not create_default_context(): that would also trust every public CA of the system store
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if credentials.ca_path is not None:
        ctx.load_verify_locations(cafile=os.fspath(credentials.ca_path))
    if credentials.ca_certificates:
        pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in credentials.ca_certificates)
        ctx.load_verify_locations(cadata=pem)
    if credentials.cert_path is not None and credentials.key_path is not None:
        ctx.load_cert_chain(certfile=os.fspath(credentials.cert_path), keyfile=os.fspath(credentials.key_path))
    elif credentials.certificate is not None and credentials.private_key is not None:
        try:
            key_pem = credentials.private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        except Exception as exc:
            raise TransportError(f"the client key cannot be handed to the TLS stack ({exc}); a token key "
                                 "needs an OpenSSL provider") from exc
        chain = [credentials.certificate, *credentials.chain]
        with tempfile.TemporaryDirectory(prefix="certmq-tls-") as tmp:
            os.chmod(tmp, 0o700)
            cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            cert_file.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(key_pem)
            ctx.load_cert_chain(certfile=cert_file, keyfile=key_file)
    return ctx


class AiomqttTransport:
    """A :class:`~device_client.transport.Transport` over aiomqtt (MQTT 3.1.1 or 5, TLS, persistent session)."""

    def __init__(self, *, hostname: str, port: int = 8883, clean_session: bool = False,
                 keepalive: int = 60, timeout: float = 30.0, server_hostname_check: bool = True) -> None:
        self.hostname = hostname
        self.port = port
        self.clean_session = clean_session
        self.keepalive = keepalive
        self.timeout = timeout
        self.server_hostname_check = server_hostname_check
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None

    async def connect(self, credentials: ClientCredentials) -> None:
        await self.disconnect()
        try:
            self._client, self._stack = await self._attempt(credentials)
        except _ClosedEarly:
            # Once could be a broker restarting under us; twice in a row, right after a completed
            # handshake, is the broker refusing the certificate (see _ClosedEarly).
            await asyncio.sleep(_EARLY_CLOSE_RETRY)
            try:
                self._client, self._stack = await self._attempt(credentials)
            except _ClosedEarly as exc:
                raise ConnectionRefused(
                    "TLS handshake refused: the broker closed the connection right after the handshake, before "
                    f"CONNACK, twice ({exc}); with TLS 1.3 that is how a refused client certificate looks") from exc

    async def _attempt(self, credentials: ClientCredentials) -> tuple[Any, contextlib.AsyncExitStack]:
        import aiomqtt

        ctx = build_ssl_context(credentials)
        ctx.check_hostname = self.server_hostname_check
        loop = asyncio.get_running_loop()
        early: asyncio.Future[BaseException] = loop.create_future()
        client = _client_class()(self.hostname, self.port, identifier=credentials.client_id, tls_context=ctx,
                                 clean_session=self.clean_session if credentials.clean_session is None else credentials.clean_session,
                                 keepalive=self.keepalive, timeout=self.timeout,
                                 logger=_alert_logger(loop, early))
        client.certmq_early = early
        stack = contextlib.AsyncExitStack()
        entering = asyncio.ensure_future(stack.enter_async_context(client))
        try:
            # aiomqtt waits for a CONNACK until its timeout even when the connection is already gone
            # (it ignores disconnects before CONNACK); ``early`` ends that wait at once.
            await asyncio.wait({entering, early}, return_when=asyncio.FIRST_COMPLETED)
            if not entering.done():
                entering.cancel()
                with contextlib.suppress(BaseException):
                    await entering
                with contextlib.suppress(Exception):
                    client._client.disconnect()  # noqa: SLF001 -- drop paho's half-open socket
                reason = early.result()
                if isinstance(reason, _ClosedEarly):
                    raise reason
                raise ConnectionRefused(f"TLS handshake refused: {reason}")
            entering.result()
        except aiomqtt.MqttCodeError as exc:
            await stack.aclose()
            code = _code(exc.rc)
            if code in _REFUSED_CODES:
                raise ConnectionRefused(f"broker refused the credentials (CONNACK {code}: {exc.rc})") from exc
            raise TransportError(f"MQTT connect failed: {exc}") from exc
        except aiomqtt.MqttError as exc:
            await stack.aclose()
            cause = exc.__cause__ or exc.__context__
            if _is_refusal(cause):
                raise ConnectionRefused(f"TLS handshake refused: {cause}") from exc
            raise TransportError(f"MQTT connect to {self.hostname}:{self.port} failed: {cause or exc}") from exc
        except ssl.SSLError as exc:
            await stack.aclose()
            if _is_refusal(exc):
                raise ConnectionRefused(f"TLS handshake refused: {exc}") from exc
            raise TransportError(f"TLS connection to {self.hostname}:{self.port} failed: {exc}") from exc
        except OSError as exc:
            await stack.aclose()
            raise TransportError(f"cannot reach {self.hostname}:{self.port}: {exc}") from exc
        except BaseException:
            entering.cancel()
            raise
        return client, stack

    def _live(self) -> Any:
        if self._client is None:
            raise NotConnected("not connected")
        return self._client

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        import aiomqtt

        try:
            await self._live().publish(topic, payload, qos=qos)
        except aiomqtt.MqttError as exc:
            raise TransportError(f"publish failed: {exc}") from exc

    async def subscribe(self, topic: str) -> None:
        import aiomqtt

        try:
            await self._live().subscribe(topic, qos=1)
        except aiomqtt.MqttError as exc:
            raise TransportError(f"subscribe failed: {exc}") from exc

    async def messages(self) -> AsyncIterator[IncomingMessage]:
        import aiomqtt

        client = self._live()
        try:
            async for message in client.messages:
                payload = message.payload if isinstance(message.payload, (bytes, bytearray)) else b""
                yield IncomingMessage(str(message.topic), bytes(payload), bool(message.retain))
        except aiomqtt.MqttError as exc:
            raise TransportError(f"connection lost: {exc}") from exc

    async def disconnect(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()
