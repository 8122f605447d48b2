"""Publish fan-out rate with many per-device subscriptions: hardened broker vs stock amqtt 0.12.1.

Run: ``./dev bench broker_subscriptions`` (or ``.venv/bin/python bench/broker_subscriptions.py
[--subs 10 10000] [--connections 20] [--messages 2000]``).

For each broker (stock amqtt 0.12.1, then the hardened broker) and each
subscription count N, the broker runs alone in a child process (one core), with
the same TLS listener and client certificates from a throw-away tenant CA. In
this process, ``--connections`` subscriber connections split N exact per-device
filters (``devices/<i>/in``) between them (10,000 TLS connections would measure
the client side, not the matcher); one publisher sends QoS 0 messages
round-robin over the subscribed topics, at most ``--window`` in flight, and the
rate is messages delivered per second, first publish to last delivery. Each
message matches exactly one subscription, as a per-device reply does.

Goal: hardened rate at 10,000 subscriptions >= 0.8 x its rate at 10. Exits 1
when missed. Shared helpers (PKI, raw MQTT packets, broker child process) are
reused by ``bench/broker_memory.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import ssl
import struct
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from _broker_kit import _str, packet, read_raw  # noqa: E402 - bench/ is on sys.path when run as a script
from broker_plugin.ca.authority import create_tenant_ca

__all__ = ["BrokerProcess", "make_pki", "open_client", "packet"]


# -- PKI ---------------------------------------------------------------------------------------


def _pem(obj: Any) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _leaf(cn: str, issuer: x509.Certificate, issuer_key: Any, *, server: bool) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    return _pem(builder.sign(issuer_key, hashes.SHA256())), _pem(key)


def make_pki(root: Path, client_names: list[str]) -> None:
    """Write chain.pem, server.pem/.key and <name>.pem/.key for each client into ``root``."""
    root_key, issuing_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = create_tenant_ca(tenant="bench", root_key=root_key, issuing_key=issuing_key, now=datetime.now(timezone.utc))
    (root / "chain.pem").write_bytes(ca.chain_pem())
    cert, key = _leaf("localhost", ca.issuing, issuing_key, server=True)
    (root / "server.pem").write_bytes(cert + ca.chain_pem())
    (root / "server.key").write_bytes(key)
    for name in client_names:
        cert, key = _leaf(name, ca.issuing, issuing_key, server=False)
        (root / f"{name}.pem").write_bytes(cert)
        (root / f"{name}.key").write_bytes(key)


def client_context(root: Path, name: str) -> ssl.SSLContext:
    """A client TLS context holding ``name``'s certificate."""
    context = ssl.create_default_context(cafile=str(root / "chain.pem"))
    context.load_cert_chain(str(root / f"{name}.pem"), str(root / f"{name}.key"))
    return context


# -- broker child process ----------------------------------------------------------------------


def _serve(kind: str, root: str, ports: Any, stop: Any) -> None:
    async def main() -> None:
        listener = {"type": "tcp", "bind": "127.0.0.1:0", "ssl": True}
        if kind == "stock":
            from amqtt.broker import Broker

            listener |= {"certfile": f"{root}/server.pem", "keyfile": f"{root}/server.key", "cafile": f"{root}/chain.pem"}
            broker: Any = Broker(
                {
                    "listeners": {"default": listener},
                    "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
                }
            )
        else:  # "hardened", or "hardened-bigbuf" (asyncio's 256 KiB TLS buffer kept, for comparison)
            from broker_plugin.broker import HardenedBroker
            from broker_plugin.tlsconf import server_context

            context = server_context(
                certfile=f"{root}/server.pem",
                keyfile=f"{root}/server.key",
                client_ca_pems=[Path(root, "chain.pem").read_bytes()],
                small_buffers=kind != "hardened-bigbuf",
            )
            broker = HardenedBroker({"listeners": {"default": listener}}, ssl_context=context)
        await broker.start()
        ports.put(broker._servers["default"].instance.sockets[0].getsockname()[1])  # noqa: SLF001
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await broker.shutdown()

    import logging

    logging.disable(logging.WARNING)
    asyncio.run(main())


class BrokerProcess:
    """A stock or hardened broker in a child process; ``port`` once started; ``pid`` for RSS."""

    def __init__(self, kind: str, root: Path) -> None:
        ctx = mp.get_context("fork")
        self._ports: Any = ctx.Queue()
        self._stop = ctx.Event()
        self._proc = ctx.Process(target=_serve, args=(kind, str(root), self._ports, self._stop), daemon=True)
        self._proc.start()
        self.port: int = self._ports.get(timeout=30)
        self.pid: int = self._proc.pid  # type: ignore[assignment]

    def close(self) -> None:
        """Stop the broker and wait for the child."""
        self._stop.set()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()


# -- raw MQTT ----------------------------------------------------------------------------------


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(packet type, body)."""
    first, body = await read_raw(reader)
    return first >> 4, body


async def open_client(port: int, context: ssl.SSLContext, client_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """TLS + CONNECT (clean session, keep-alive 0) + CONNACK accepted."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    writer.write(packet(0x10, _str("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 0) + _str(client_id)))
    kind, body = await read_packet(reader)
    if kind != 2 or body[1] != 0:
        raise RuntimeError(f"CONNECT refused: {kind} {body!r}")
    return reader, writer


async def subscribe_many(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, filters: list[str]) -> None:
    """SUBSCRIBE in packets of 500 filters, waiting for each SUBACK."""
    for pid, start in enumerate(range(0, len(filters), 500), start=1):
        chunk = filters[start : start + 500]
        writer.write(packet(0x82, struct.pack("!H", pid) + b"".join(_str(f) + b"\x00" for f in chunk)))
        kind, body = await read_packet(reader)
        if kind != 9 or any(code == 0x80 for code in body[2:]):
            raise RuntimeError("SUBSCRIBE refused")


# -- the bench ---------------------------------------------------------------------------------


async def _measure(port: int, root: Path, n_subs: int, n_conns: int, n_messages: int, window: int) -> float:
    conns = [await open_client(port, client_context(root, f"sub{k}"), f"sub{k}") for k in range(n_conns)]
    topics = [f"devices/{i}/in" for i in range(n_subs)]
    for k, (reader, writer) in enumerate(conns):
        await subscribe_many(reader, writer, topics[k::n_conns])
    received = 0
    done = asyncio.Event()
    credit = asyncio.Semaphore(window)

    async def drain(reader: asyncio.StreamReader) -> None:
        nonlocal received
        while True:
            kind, _ = await read_packet(reader)
            if kind == 3:
                received += 1
                credit.release()
                if received == n_messages:
                    done.set()

    readers = [asyncio.ensure_future(drain(r)) for r, _ in conns]
    _, pub = await open_client(port, client_context(root, "pub"), "pub")
    start = time.perf_counter()
    for i in range(n_messages):
        await credit.acquire()
        pub.write(packet(0x30, _str(topics[(i * 7919) % n_subs]) + b"x" * 64))
        if i % 50 == 0:
            await pub.drain()
    await asyncio.wait_for(done.wait(), 600)
    elapsed = time.perf_counter() - start
    for task in readers:
        task.cancel()
    for _, writer in [*conns, (None, pub)]:
        writer.close()  # type: ignore[union-attr]
    return n_messages / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subs", type=int, nargs="+", default=[10, 10_000])
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--stock-messages", type=int, default=600, help="fewer for stock: it is slow at 10,000")
    parser.add_argument("--window", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_pki(root, [f"sub{k}" for k in range(args.connections)] + ["pub"])
        rates: dict[tuple[str, int], float] = {}
        for kind in ("stock", "hardened"):
            for n in args.subs:
                proc = BrokerProcess(kind, root)
                try:
                    count = args.stock_messages if kind == "stock" else args.messages
                    rates[kind, n] = asyncio.run(
                        _measure(proc.port, root, n, min(args.connections, n), count, args.window)
                    )
                finally:
                    proc.close()
                print(f"{kind:8} {n:>7,} subscriptions: {rates[kind, n]:>9,.0f} msg/s", flush=True)
    low, high = min(args.subs), max(args.subs)
    ratio = {kind: rates[kind, high] / rates[kind, low] for kind in ("stock", "hardened")}
    for kind in ("stock", "hardened"):
        print(f"{kind:8} rate at {high:,} / rate at {low:,}: {ratio[kind]:.2f}")
    print(f"hardened / stock at {high:,}: {rates['hardened', high] / rates['stock', high]:.1f}x")
    ok = ratio["hardened"] >= 0.8
    print(f"goal hardened ratio >= 0.8: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
