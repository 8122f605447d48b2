"""Revoke -> signed delta received at 1,000 TLS subscribers on the embedded broker: p50 / p99.

Run: ``.venv/bin/python bench/feeds_latency.py [--subscribers 1000] [--rounds 30]``.

The broker (``certmq broker`` equivalent, signed feeds on) runs in a child process
(:mod:`bench._broker_kit`). This process holds ``--subscribers`` raw MQTT-over-TLS connections,
each with its own device certificate, subscribed at QoS 1 to the tenant's delta topic, and one
operator connection. Each round the operator publishes a RevocationRequest for a fresh
certificate; the clock starts just before that PUBLISH is written and stops, per subscriber,
when the signed delta naming that certificate's status index arrives (signatures are checked
after the round, off the clock: every received delta must verify against the tenant CA).
So the latency covers the request through the admission queue, the registry commit, the kick
scan, the feed publisher (sign in a thread) and the fan-out to every subscriber. Rounds are
``--gap`` apart (beyond the 50 ms coalescing window: one delta per revocation).
The rounds start ``--settle`` s (6) after the last subscription, and ``--warmup`` revocations (1)
go first, untimed but checked like the others (their last arrival is printed): the first
revocation of a freshly started broker pays one-time costs (the feed signer's thread, first
statements, each session's ACL cache). This process stands in for 1,000 devices on the broker's
2 cores, so it keeps its own costs off the clock: its garbage collector is off while a round's
copies arrive, its PUBACKs go out 50 ms after a copy (the broker waits up to 5 s for them), and
(unless ``--no-pin``) it runs on the last CPU and the broker on the others, so the kernel cannot
put the two on one core mid-fan-out.
Goal: p99 < 50 ms. Exits non-zero if a subscriber misses a delta or a signature fails.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import os
import ssl
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _broker_kit import (  # noqa: E402
    TENANT, BrokerChild, Minter, MqttConn, _str, make_datadir, packet, percentile, print_probe, rss_kib,
)

from broker_plugin.store.base import CertificateKind  # noqa: E402
from device_client.feedverify import SignedFeedVerifier  # noqa: E402
from protocol import codec  # noqa: E402
from protocol.codes import RevocationReason  # noqa: E402
from protocol.messages import RevocationDelta, RevocationRequest  # noqa: E402
from protocol.topics import delta_topic, operator_request_topic, operator_response_topic  # noqa: E402

REGION = "-"  # the bench tenant has no default region
# The subscribers' PUBACKs go out this long after the copy arrived (the broker waits up to 5 s):
# written at once, this one process's 1,000 acknowledgements compete with its reading of the
# copies still arriving, which 1,000 devices with a CPU each would not.
ACK_DELAY = 0.05


class Subscriber(asyncio.Protocol):
    """A subscriber that reads with a protocol callback: every packet already received on the
    connection is handled in one call, QoS 1 PUBLISHes acknowledged with one write.

    The 1,000 subscribers share this one process and the broker's 2 cores; with a stream reader
    and a task per connection (``MqttConn``, ``--stream-clients``) reading a copy costs this process
    about as much as writing it costs the broker, so the last arrivals of a round measured the
    bench's own reading as much as the broker. A real subscriber is a device of its own. For the
    same reason the PUBACKs of the copies read in one loop iteration are written after all of them.
    """

    def __init__(self, client_id: str, on_message: Callable[[str, bytes], None]) -> None:
        self.client_id = client_id
        self.on_message = on_message
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[bytes] | None = None
        self._pid = 0

    @classmethod
    async def open(cls, client_id: str, on_message: Callable[[str, bytes], None], port: int,
                   context: ssl.SSLContext) -> Subscriber:
        """TLS + CONNECT (clean session, keep-alive 0); ``RuntimeError`` unless accepted."""
        loop = asyncio.get_running_loop()
        _, self = await loop.create_connection(lambda: cls(client_id, on_message), "127.0.0.1", port,
                                               ssl=context, server_hostname="localhost")
        body = await self._request(packet(0x10, _str("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 0)
                                          + _str(client_id)))
        if body[1:2] != b"\x00":
            raise RuntimeError(f"{client_id}: CONNECT refused ({body!r})")
        return self

    async def subscribe(self, topic_filter: str, qos: int) -> None:
        """SUBSCRIBE one filter; ``RuntimeError`` if refused."""
        self._pid += 1
        body = await self._request(packet(0x82, struct.pack("!H", self._pid) + _str(topic_filter) + bytes([qos])))
        if body[2:3] == b"\x80":
            raise RuntimeError(f"{self.client_id}: SUBSCRIBE {topic_filter} refused")

    async def _request(self, data: bytes) -> bytes:
        assert self._transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(data)
        return await asyncio.wait_for(self._waiter, 30)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # noqa: D102
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:  # noqa: D102
        buf = self._buffer
        buf += data
        acks = []
        pos = 0
        while True:
            length, shift, at = 0, 0, pos + 1
            while at < len(buf):
                byte = buf[at]
                length += (byte & 0x7F) << shift
                shift += 7
                at += 1
                if not byte & 0x80:
                    break
            else:
                break
            if at + length > len(buf):
                break
            first, body = buf[pos], bytes(buf[at:at + length])
            pos = at + length
            if first >> 4 == 3:
                tlen = int.from_bytes(body[:2], "big")
                off = 2 + tlen
                if (first >> 1) & 3:
                    acks.append(b"\x40\x02" + body[off:off + 2])
                    off += 2
                self.on_message(body[2:2 + tlen].decode(), body[off:])
            elif self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(body)  # CONNACK, SUBACK
        del buf[:pos]
        if acks and self._transport is not None:
            # Acknowledged after every connection ready in this loop iteration has been read (and
            # its arrival stamped): the PUBACKs' TLS writes would otherwise delay the stamps of the
            # copies already waiting in the other 999 sockets. The broker handles PUBACKs after
            # its fan-out anyway.
            if not Subscriber._unacked:
                asyncio.get_running_loop().call_later(ACK_DELAY, Subscriber._ack_all)
            Subscriber._unacked.append((self._transport, b"".join(acks)))

    _unacked: list[tuple[asyncio.Transport, bytes]] = []

    @staticmethod
    def _ack_all() -> None:
        pending, Subscriber._unacked = Subscriber._unacked, []
        for transport, acks in pending:
            if not transport.is_closing():
                transport.write(acks)

    async def close(self) -> None:
        """DISCONNECT and close (async like ``MqttConn.close``, so both close alike)."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"\xe0\x00")
            self._transport.close()


async def _main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="certmq-feeds-latency-") as tmp:
        datadir = await make_datadir(Path(tmp))
        t0 = time.monotonic()
        async with Minter(datadir) as minter:
            subs = [await minter.mint(f"sub-{i:05d}") for i in range(args.subscribers)]
            victims = [await minter.mint(f"victim-{i:04d}") for i in range(args.warmup + args.rounds)]
            operator = await minter.mint("op-bench", kind=CertificateKind.OPERATOR)
            registry = minter._registry  # noqa: SLF001
            index = {}
            for v in victims:
                record = await registry.get_certificate(TENANT, v.serial)
                index[v.serial] = record.status_index
        print(f"minted {len(subs) + len(victims) + 1} certificates in {time.monotonic() - t0:.1f} s", flush=True)
        cpus = sorted(os.sched_getaffinity(0))
        broker_cpus = None
        if args.pin and len(cpus) >= 2:
            # The broker's cores are its own, as in service: the process standing in for 1,000
            # devices gets the last one. Unpinned, the kernel puts this process on the broker's
            # core whenever a copy wakes it (wake-affine), for milliseconds at a time, while the
            # other core idles: the broker's loop then waits for a CPU mid-fan-out (stage 8).
            broker_cpus = cpus[:-1]
            os.sched_setaffinity(0, cpus[-1:])
        broker = BrokerChild(datadir, plugin={"workers": 1, "rate": 0, "queue_capacity": 5000}, cpus=broker_cpus)
        verifier = SignedFeedVerifier.from_pem_file(minter.chain)
        topic = delta_topic(TENANT, REGION)
        # Only the arrival is recorded on the clock; decoding and verifying 1,000 copies in this
        # process would delay the later arrivals' timestamps and is done after the rounds.
        raw: list[tuple[float, bytes]] = []

        def on_message(_topic: str, payload: bytes) -> None:
            raw.append((time.perf_counter(), payload))

        conns: list[Any] = []
        try:
            t0 = time.monotonic()
            for start in range(0, len(subs), 50):
                if args.stream_clients:
                    batch: list[Any] = [MqttConn(c.name, on_message) for c in subs[start:start + 50]]
                    await asyncio.gather(*(m.connect(broker.port, c.context())
                                           for m, c in zip(batch, subs[start:start + 50])))
                else:
                    batch = list(await asyncio.gather(*(Subscriber.open(c.name, on_message, broker.port, c.context())
                                                        for c in subs[start:start + 50])))
                await asyncio.gather(*(m.subscribe(topic, qos=1) for m in batch))
                conns += batch
            print(f"{len(conns)} TLS subscribers connected and subscribed in {time.monotonic() - t0:.1f} s; "
                  f"broker RSS {rss_kib(broker.pid) / 1024:.0f} MiB", flush=True)
            replies: list[bytes] = []
            op = MqttConn(operator.name, lambda _t, p: replies.append(p))
            await op.connect(broker.port, operator.context())
            await op.subscribe(operator_response_topic(TENANT, operator.name), qos=1)
            # Rounds start once the broker has settled: 1,000 TLS sessions were just made, and until
            # its GC policy first freezes the heap (gc_freeze, every 5 s) a collection walks all of
            # them (~0.1 s). A broker in service froze its long-lived heap long ago.
            await asyncio.sleep(args.settle)
            raw.clear()
            lat: list[float] = []
            rounds: list[tuple[float, float]] = []  # per round: first and last arrival, ms
            missing = bad = 0
            warm: list[float] = []  # last arrival of each warm-up round, ms (not in the figures)
            received = 0
            starts: list[float] = []
            for n, v in enumerate(victims):
                timed = n >= args.warmup
                req = RevocationRequest(request_id=os.urandom(16), reason=RevocationReason.KEY_COMPROMISE,
                                        serial=v.serial)
                first = len(raw)
                # This process's own collector stays off while a round's copies arrive: a
                # collection over its 1,000 connections would delay the arrival stamps, and it is
                # not the broker's latency. It runs between rounds.
                gc.disable()
                start = time.perf_counter()
                starts.append(start)
                op.publish(operator_request_topic(TENANT, operator.name), codec.encode(req), qos=1)
                deadline = start + 5
                while len(raw) - first < len(conns) and time.perf_counter() < deadline:
                    await asyncio.sleep(0.002)
                gc.enable()
                got = raw[first:]
                received += len(got)
                del raw[first:]  # checked below; kept, 31,000 payloads would make every collection longer
                missing += len(conns) - len(got)
                if got and timed:
                    rounds.append(((got[0][0] - start) * 1000, (got[-1][0] - start) * 1000))
                elif got:
                    warm.append((got[-1][0] - start) * 1000)
                for at, payload in got:
                    inner = verifier(topic, payload)
                    delta = codec.decode(inner) if isinstance(inner, bytes) else None
                    if not isinstance(delta, RevocationDelta) or delta.indices != (index[v.serial],):
                        bad += 1
                    if timed:
                        lat.append((at - start) * 1000)
                await asyncio.sleep(args.gap)
            await op.close()
        finally:
            for m in conns:
                await m.close()
            stats = broker.stop()
        p50, p99, worst = percentile(lat, 50), percentile(lat, 99), max(lat) if lat else float("nan")
        print(f"# feeds_latency {dt.datetime.now(dt.UTC):%Y-%m-%d} subscribers={len(conns)} rounds={args.rounds} "
              f"cpus={os.cpu_count()} python {sys.version.split()[0]} "
              f"subscriber reader={'stream+task (MqttConn)' if args.stream_clients else 'protocol callback'} settle={args.settle:g} s warmup={args.warmup} "
              f"cpus: {f'broker {broker_cpus}, subscribers {sorted(os.sched_getaffinity(0))}' if broker_cpus else 'not pinned'}")
        print(f"revoke -> signed delta at {len(conns)} TLS subscribers: n={len(lat)} p50 {p50:.1f} ms, "
              f"p99 {p99:.1f} ms, max {worst:.1f} ms; missing {missing}; bad (unsigned, wrong index) {bad} of {received}")
        if rounds:
            # A slow tail in every round is the fan-out; a few slow rounds are pauses (GC, load).
            print(f"per round: first arrival p50 {percentile([f for f, _ in rounds], 50):.1f} ms; last arrival "
                  f"p50 {percentile([last for _, last in rounds], 50):.1f} ms, max {max(last for _, last in rounds):.1f} ms;"
                  f" last arrival by round: {[round(last) for _, last in rounds]}")
        if warm:
            print(f"warm-up rounds (not counted above; first revocation of the broker's life: thread pool, "
                  f"statements, per-session ACL caches): last arrival {[round(w) for w in warm]} ms")
        print("broker stats:", {k: stats.get(k) for k in ("requests", "kicked", "deltas")})
        if stats.get("revocation_stages_ms"):
            print("broker revocation stages, ms after the request reached the plugin (CERTMQ_BENCH_REVOKE_STAGES):")
            arrivals = stats["revocation_stages_ms"].pop("arrivals")
            if len(arrivals) == len(starts):  # perf_counter is the system's monotonic clock
                wait = [(a - s) * 1000 for a, s in zip(arrivals, starts)]
                print(f"  0 request reached the plugin, ms after the bench's PUBLISH: p50 {percentile(wait, 50):.2f}, max {max(wait):.2f}")
            fan_outs = stats["revocation_stages_ms"].pop("fan_out_ms")
            for name, value in stats["revocation_stages_ms"].items():
                print(f"  {name}: p50 {value['p50']}, max {value['max']}")
            print("  fan-out per revocation, wall / loop-thread CPU / waiting for a CPU, ms:",
                  " ".join(f"{w:g}/{c:g}/{q:g}" for w, c, q in fan_outs))
        print_probe(stats.get("probe"))
        errors = broker.errors()
        if errors:
            print("broker errors:", *errors[:10], sep="\n  ")
        ok = missing == 0 and bad == 0 and lat
        print("goal p99 < 50 ms:", "met" if p99 < 50 else "NOT met")
        return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--gap", type=float, default=0.2, help="seconds between revocations")
    ap.add_argument("--warmup", type=int, default=1, help="revocation rounds before the timed ones (default 1)")
    ap.add_argument("--settle", type=float, default=6.0,
                    help="seconds between the last subscription and the first round (default 6: past the broker's first gc freeze)")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="leave the broker and the subscribers' process to the scheduler (default: the broker on "
                         "all CPUs but the last, the subscribers on the last)")
    ap.add_argument("--stream-clients", action="store_true",
                    help="subscribers read with a stream reader and a task each (MqttConn), as before 2026-11-27 21:00")
    return asyncio.run(_main(ap.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
