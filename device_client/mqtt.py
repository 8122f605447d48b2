"""The production transport: aiomqtt over TLS with the device's client certificate.

:func:`build_ssl_context` makes the TLS context (TLS 1.2+, the broker's
certificate verified against the tenant CA bundle, the client certificate and
key). ``ssl`` loads client credentials only from files, so credentials given
as objects are written to a private temporary directory, loaded, and removed
at once. Keys that live on a PKCS#11 token cannot be loaded by Python's
``ssl`` module at all: with a token, connect through an OpenSSL provider or a
TLS-terminating helper (not done here).

aiomqtt / paho errors are mapped once, here: a TLS handshake failure or a
CONNACK "not authorised / bad credentials" becomes
:class:`~device_client.transport.ConnectionRefused`; everything else
:class:`~device_client.transport.TransportError`.

Integration tests against the real broker come with the broker issue.
"""

from __future__ import annotations

import contextlib
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
        import aiomqtt

        await self.disconnect()
        ctx = build_ssl_context(credentials)
        ctx.check_hostname = self.server_hostname_check
        client = aiomqtt.Client(self.hostname, self.port, identifier=credentials.client_id, tls_context=ctx,
                                clean_session=self.clean_session, keepalive=self.keepalive, timeout=self.timeout)
        stack = contextlib.AsyncExitStack()
        try:
            await stack.enter_async_context(client)
        except aiomqtt.MqttCodeError as exc:
            await stack.aclose()
            if getattr(exc, "rc", None) in _REFUSED_CODES:
                raise ConnectionRefused(f"broker refused the credentials (CONNACK {exc.rc})") from exc
            raise TransportError(f"MQTT connect failed: {exc}") from exc
        except aiomqtt.MqttError as exc:
            await stack.aclose()
            if isinstance(exc.__cause__ or exc.__context__, ssl.SSLError):
                raise ConnectionRefused(f"TLS handshake refused: {exc.__cause__ or exc.__context__}") from exc
            raise TransportError(f"MQTT connect failed: {exc}") from exc
        except ssl.SSLError as exc:
            await stack.aclose()
            raise ConnectionRefused(f"TLS handshake refused: {exc}") from exc
        except OSError as exc:
            await stack.aclose()
            raise TransportError(f"cannot reach {self.hostname}:{self.port}: {exc}") from exc
        self._client, self._stack = client, stack

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
