"""The listener's TLS context and the small TLS read buffer, which applies to our contexts only."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ssl
from typing import Any

import pytest

from broker_plugin.tlsconf import SMALL_TLS_BUFFER, server_context


def test_server_context_requires_client_certificates(pki: Any) -> None:
    context = pki.server_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_server_context_needs_a_ca(pki: Any) -> None:
    with pytest.raises(ValueError):
        server_context(certfile=pki.server_cert, keyfile=pki.server_key, client_ca_pems=[])


async def test_small_buffer_only_for_registered_contexts(pki: Any) -> None:
    ours = pki.server_context()
    other = ssl.create_default_context()
    loop = asyncio.get_running_loop()
    proto = asyncio.Protocol()
    small = asyncio.sslproto.SSLProtocol(loop, proto, ours, None, server_side=True)
    default = asyncio.sslproto.SSLProtocol(loop, proto, other, None)
    assert len(small._ssl_buffer) == SMALL_TLS_BUFFER  # noqa: SLF001
    assert len(default._ssl_buffer) == 256 * 1024  # noqa: SLF001 - asyncio's default, untouched
    for protocol in (small, default):  # never connected: mark closed so no ResourceWarning fires
        protocol._app_transport._closed = True  # noqa: SLF001
