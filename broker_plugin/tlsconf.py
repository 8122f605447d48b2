"""TLS for the hardened broker's listener: a server context that requires client certificates,
and a small-read-buffer TLS protocol for the contexts made here.

Python 3.11's ``asyncio.sslproto.SSLProtocol`` allocates a 256 KiB read buffer
per connection (``max_size``), most of an idle TLS connection's memory. Contexts
made by :func:`server_context` (or passed to :func:`use_small_buffers`) get an
``SSLProtocol`` whose buffer is :data:`SMALL_TLS_BUFFER` bytes instead; any other
TLS connection in the process keeps asyncio's default. The patch is installed
once, by replacing the module attribute asyncio looks the class up through.

This module knows ``ssl`` and ``asyncio.sslproto``; nothing about MQTT.
"""

from __future__ import annotations

import asyncio.sslproto as _sslproto
import ssl
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["SMALL_TLS_BUFFER", "server_context", "use_small_buffers"]

#: Bytes read from the socket per call on our listener. A TLS record is at most
#: ~16.7 KiB, so 16 KiB costs one extra read for a full record and nothing else.
SMALL_TLS_BUFFER = 16 * 1024

_SMALL: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()
_ORIGINAL = _sslproto.SSLProtocol


class _SmallBufferSSLProtocol(_ORIGINAL):  # type: ignore[misc, valid-type]
    """``SSLProtocol`` that uses a small read buffer for registered contexts only."""

    def __init__(self, loop: Any, app_protocol: Any, sslcontext: Any, *args: Any, **kwargs: Any) -> None:
        if sslcontext in _SMALL:
            self.max_size = SMALL_TLS_BUFFER
        super().__init__(loop, app_protocol, sslcontext, *args, **kwargs)


def use_small_buffers(context: ssl.SSLContext) -> ssl.SSLContext:
    """Make connections served with ``context`` use :data:`SMALL_TLS_BUFFER`; returns ``context``."""
    if _sslproto.SSLProtocol is _ORIGINAL:
        _sslproto.SSLProtocol = _SmallBufferSSLProtocol  # type: ignore[misc]
    _SMALL.add(context)
    return context


def server_context(
    *,
    certfile: str | Path,
    keyfile: str | Path,
    client_ca_pems: Sequence[bytes],
    small_buffers: bool = True,
) -> ssl.SSLContext:
    """A TLS 1.2+ server context that requires a client certificate chaining to ``client_ca_pems``.

    ``client_ca_pems``: one PEM bundle per tenant (root and issuing CA). Raises
    ``ValueError`` when it is empty and ``ssl.SSLError``/``OSError`` for
    unreadable key material.
    """
    if not client_ca_pems:
        raise ValueError("at least one client CA bundle is required")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    for pem in client_ca_pems:
        context.load_verify_locations(cadata=pem.decode("ascii"))
    context.load_cert_chain(str(certfile), str(keyfile))
    if small_buffers:
        use_small_buffers(context)
    return context
