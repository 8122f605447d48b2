"""Storm: tens of thousands of devices asking for their first certificate within ~10 s.

Run: ``./dev bench broker_storm`` (or ``.venv/bin/python bench/broker_storm.py [--devices 50000]
[--connections 250] [--spread 10] [--workers 2]``).

How the load is shaped (one connection per device is beyond one 2-core box, so devices share
connections the way a factory provisioning line does):

- ``--connections`` claim (bootstrap) credentials ``claim-000`` ... are registered, each with the
  claim policy ``pattern = "sNNN-*"``, ``max_uses`` = its share of the devices; each holds one TLS
  connection (client id = the claim id, as the ACL demands). Under the certmq ACL a claim
  connection may publish on ``prov/{d}/req`` for every device id ``d`` its pattern allows, and the
  plugin sends each reply with ``deliver_to`` to the requesting session only, so no subscription is
  needed. Device ``sNNN-MMMMM`` is served by connection ``NNN``;
- every device gets a real P-256 CSR (fresh key, CN = device id) made before timing, and sends one
  ``CertificateRequest`` (QoS 1) at its moment, the devices spread evenly over ``--spread``
  seconds, interleaved across connections;
- a device answered ``BUSY`` or ``RATE_LIMITED`` sends the very same request (same request id)
  again after ``retry_after`` seconds; ``CertificateIssued`` ends it; any other reply, or no reply
  within ``--reply-timeout`` seconds of a send, is a hard failure;
- meanwhile an unrelated device (``pinger``, capability ``telemetry``), in a process of its own,
  publishes every 50 ms on its own ``dev/pinger/app/telemetry/ping`` topic, to which it is
  subscribed, and records each round trip (a ping not back within 5 s counts as lost, and as an
  infinite latency in the percentiles);
- the broker (child process, built as ``certmq broker`` builds it, default plugin settings: queue
  2000, BUSY retry from 5-10 s (stretched by the admission queue while a storm waits), rate
  0.2/s burst 3 per claimed device, batches of 64, ``--workers``
  signing processes) has its VmRSS sampled every 250 ms.

Afterwards the registry is read: exactly one certificate per device, the serial each device
received. ``CERTMQ_BENCH_PROBE=1`` also prints, from inside the broker child, the event loop's
lag, the stacks it was stalled in and the delay of each stage of the pinger's messages
(``bench/_broker_kit.py`` ``_Probe``; it costs the broker a little, so report runs without it). Requirements (exit 1 if any fails): 100 % issued, 0 hard failures (timeouts, lost or
unexpected replies, duplicate certificates), peak broker RSS < 1 GiB, ping p99 < 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sqlite3
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _broker_kit import (  # noqa: E402
    TENANT,
    BrokerChild,
    Creds,
    Minter,
    MqttConn,
    children,
    cpu_seconds,
    make_csrs,
    make_datadir,
    percentile,
    print_probe,
    rss_kib,
)
from cryptography import x509  # noqa: E402

from protocol.codec import decode, encode  # noqa: E402
from protocol.codes import ErrorCode, Profile  # noqa: E402
from protocol.messages import CertificateIssued, CertificateRequest, Error  # noqa: E402
from protocol.topics import provisioning_request_topic  # noqa: E402

__all__ = ["Storm", "main"]

RSS_LIMIT_KIB = 1024 * 1024
PING_P99_LIMIT = 0.100
PING_LOST_AFTER = 5.0


# -- the pinger (own process, own event loop) -------------------------------------------------------


def _pinger(port: int, creds: Creds, interval: float, lost_after: float, go: Any, stop: Any, out: Any) -> None:
    async def run() -> None:
        sent: dict[int, float] = {}
        rtts: list[tuple[float, float]] = []  # (sent, seconds after go), round trip

        def on_message(topic: str, payload: bytes) -> None:
            (seq,) = struct.unpack("!Q", payload[:8])
            at = sent.pop(seq, None)
            if at is not None:
                rtts.append((at - began, time.perf_counter() - at))

        topic = f"certmq/v1/{TENANT}/dev/{creds.name}/app/telemetry/ping"
        conn = MqttConn(creds.name, on_message)
        await conn.connect(port, creds.context())
        await conn.subscribe(topic)
        out.put("ready")
        while not go.is_set():
            await asyncio.sleep(0.01)
        seq = 0
        began = next_at = time.perf_counter()
        while not stop.is_set():
            seq += 1
            sent[seq] = time.perf_counter()
            conn.publish(topic, struct.pack("!Q", seq) + bytes(24))
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        await asyncio.sleep(lost_after)
        await conn.close()
        lost = len(sent)
        out.put((rtts, lost, seq))

    asyncio.run(run())


# -- the storm ---------------------------------------------------------------------------------------


@dataclass
class _Device:
    name: str
    conn: int
    rid: bytes
    payload: bytes
    sent_at: float = 0.0
    sends: int = 0
    issued_at: float = 0.0
    serial: int | None = None
    der: bytes = b""


@dataclass
class Storm:
    """What one storm run saw."""

    devices: int
    issued: int = 0
    sends: int = 0
    busy: int = 0
    rate_limited: int = 0
    failures: list[str] = field(default_factory=list)
    duplicates: int = 0
    seconds: float = 0.0
    first_send_window: float = 0.0
    latencies: list[float] = field(default_factory=list)
    rss_peak_kib: int = 0
    rss_start_kib: int = 0
    workers_rss_peak_kib: int = 0
    pings: list[tuple[float, float]] = field(default_factory=list)
    pings_lost: int = 0
    pings_sent: int = 0
    registry: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)


async def _storm(args: argparse.Namespace, broker: BrokerChild, claims: list[Creds], devices: list[_Device],
                 pinger: Creds) -> Storm:
    result = Storm(devices=len(devices))
    by_name = {d.name: d for d in devices}
    loop = asyncio.get_running_loop()
    remaining = len(devices)
    all_done = asyncio.Event()
    conns: list[MqttConn] = []

    def send(dev: _Device) -> None:
        if dev.serial is not None:
            return
        dev.sent_at = time.perf_counter()
        dev.sends += 1
        result.sends += 1
        conns[dev.conn].publish(provisioning_request_topic(TENANT, dev.name), dev.payload, qos=1)

    def on_message(topic: str, payload: bytes) -> None:
        nonlocal remaining
        name = topic.split("/")[4]
        dev = by_name.get(name)
        if dev is None:
            result.failures.append(f"reply on unexpected topic {topic}")
            return
        try:
            msg = decode(payload)
        except Exception as exc:  # noqa: BLE001 - a hard failure, reported
            result.failures.append(f"{name}: undecodable reply ({exc})")
            return
        if getattr(msg, "request_id", None) != dev.rid:
            result.failures.append(f"{name}: reply for another request id: {msg!r:.120}")
            return
        if isinstance(msg, CertificateIssued):
            serial = x509.load_der_x509_certificate(msg.certificate).serial_number
            if dev.serial is not None:
                result.duplicates += 1
                if serial != dev.serial:
                    result.failures.append(f"{name}: a second, different certificate {serial:x}")
                return
            dev.serial, dev.der, dev.issued_at = serial, msg.certificate, time.perf_counter()
            remaining -= 1
            if remaining == 0:
                all_done.set()
        elif isinstance(msg, Error) and msg.code in (ErrorCode.BUSY, ErrorCode.RATE_LIMITED):
            if msg.code == ErrorCode.BUSY:
                result.busy += 1
            else:
                result.rate_limited += 1
            dev.sent_at = 0.0  # answered: the reply timeout starts again at the resend
            loop.call_later(float(msg.retry_after or 1), send, dev)
        else:
            result.failures.append(f"{name}: unexpected reply {msg!r:.160}")

    started = time.perf_counter()
    for index, claim in enumerate(claims):
        conn = MqttConn(claim.name, on_message)
        conns.append(conn)
    # Connect in waves of 50: a few hundred simultaneous TLS handshakes would only measure the handshakes.
    for start in range(0, len(conns), 50):
        await asyncio.gather(*(c.connect(broker.port, claims[start + i].context())
                               for i, c in enumerate(conns[start:start + 50])))
    print(f"  {len(conns)} claim connections up in {time.perf_counter() - started:.1f} s", flush=True)

    ctx = mp.get_context("fork")
    go, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    ping_proc = ctx.Process(target=_pinger, daemon=True,
                            args=(broker.port, pinger, args.ping_interval, args.ping_lost_after, go, stop, out))
    ping_proc.start()
    if out.get(timeout=30) != "ready":
        raise RuntimeError("pinger did not start")

    rss_samples: list[int] = []
    workers_rss: list[int] = []

    async def sample_rss() -> None:
        while True:
            rss_samples.append(rss_kib(broker.pid))
            workers_rss.append(sum(rss_kib(p) for p in children(broker.pid)))
            await asyncio.sleep(0.25)

    async def sweep() -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.perf_counter()
            for dev in devices:
                if dev.serial is None and dev.sent_at and now - dev.sent_at > args.reply_timeout:
                    result.failures.append(f"{dev.name}: no reply within {args.reply_timeout:.0f} s")
                    dev.sent_at = 0.0
            for conn in conns:
                if conn.closed.is_set():
                    result.failures.append(f"connection {conn.client_id} closed by the broker")
                    conn.closed.clear()

    for pid in children(broker.pid) if args.worker_nice else ():
        os.setpriority(os.PRIO_PROCESS, pid, args.worker_nice)
    if args.client_nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.client_nice)  # after the pinger forked: it keeps 0
    result.rss_start_kib = rss_kib(broker.pid)
    sampler, sweeper = asyncio.create_task(sample_rss()), asyncio.create_task(sweep())

    def cpu_now() -> dict[str, float]:
        return {"broker": cpu_seconds(broker.pid), "loop": cpu_seconds(broker.pid, broker.pid),
                "workers": sum(cpu_seconds(p) for p in children(broker.pid)), "clients": cpu_seconds(os.getpid())}

    cpu_start = cpu_now()
    go.set()
    t0 = time.perf_counter()
    step = args.spread / len(devices)
    for i, dev in enumerate(devices):
        delay = t0 + i * step - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        send(dev)
        if i % 200 == 0:
            await asyncio.gather(*(c.drain() for c in conns))
    result.first_send_window = time.perf_counter() - t0
    print(f"  {len(devices):,} first requests sent in {result.first_send_window:.1f} s", flush=True)
    try:
        last = time.perf_counter()
        while not all_done.is_set() and time.perf_counter() - t0 < args.deadline:
            with_timeout = asyncio.wait_for(all_done.wait(), 10)
            try:
                await with_timeout
            except TimeoutError:
                pass
            if time.perf_counter() - last >= 10:
                last = time.perf_counter()
                print(f"  t={last - t0:.0f} s: {len(devices) - remaining:,} issued, {result.busy:,} BUSY, "
                      f"{result.rate_limited:,} RATE_LIMITED, broker RSS {rss_samples[-1] / 1024:.0f} MiB", flush=True)
        result.seconds = time.perf_counter() - t0
        result.cpu = {k: (v - cpu_start[k]) / result.seconds for k, v in cpu_now().items()}
    finally:
        stop.set()
        sampler.cancel()
        sweeper.cancel()
    if not all_done.is_set():
        result.failures.append(f"{remaining:,} devices not issued after {args.deadline:.0f} s")
    rtts, lost, pings = out.get(timeout=args.ping_lost_after + 30)
    ping_proc.join(10)
    result.pings, result.pings_lost, result.pings_sent = rtts, lost, pings
    for conn in conns:
        await conn.close()
    result.issued = len(devices) - remaining
    result.latencies = [d.issued_at - (t0 + i * step) for i, d in enumerate(devices) if d.serial is not None]
    result.rss_peak_kib = max(rss_samples, default=0)
    result.workers_rss_peak_kib = max(workers_rss, default=0)
    return result


def _check_registry(datadir: Path, devices: list[_Device], result: Storm) -> None:
    """Exactly one certificate per storm device, the one it received."""
    db = sqlite3.connect(f"file:{datadir / 'registry.db'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT device_id, serial FROM certificates WHERE tenant = ? AND kind = 'operational' "
                          "AND device_id GLOB 's[0-9][0-9][0-9]-*'", (TENANT,)).fetchall()
    except sqlite3.OperationalError:  # older schema without a kind column
        rows = db.execute("SELECT device_id, serial FROM certificates WHERE tenant = ? "
                          "AND device_id GLOB 's[0-9][0-9][0-9]-*'", (TENANT,)).fetchall()
    finally:
        db.close()
    per_device: dict[str, list[int]] = {}
    for device_id, serial in rows:
        per_device.setdefault(device_id, []).append(int(serial, 16))
    twice = [d for d, s in per_device.items() if len(s) > 1]
    wrong = [d.name for d in devices if d.serial is not None and per_device.get(d.name) != [d.serial]]
    result.registry = {"certificates": len(rows), "devices": len(per_device), "devices_twice": len(twice),
                       "mismatch": len(wrong)}
    if len(rows) != len(devices):
        result.failures.append(f"registry holds {len(rows):,} storm certificates, expected {len(devices):,}")
    if twice:
        result.failures.append(f"{len(twice)} devices have more than one certificate, e.g. {twice[:3]}")
    if wrong:
        result.failures.append(f"{len(wrong)} devices' registry certificate differs from the one received, "
                               f"e.g. {wrong[:3]}")


def _report(args: argparse.Namespace, r: Storm, stats: dict[str, Any]) -> bool:
    ping_all = [rtt for _, rtt in r.pings] + [float("inf")] * r.pings_lost
    in_wave = [rtt for at, rtt in r.pings if at <= r.first_send_window]
    after = [rtt for at, rtt in r.pings if at > r.first_send_window]
    p99 = percentile(ping_all, 99)
    rss_ok = r.rss_peak_kib < RSS_LIMIT_KIB
    ping_ok = p99 < PING_P99_LIMIT
    issued_ok = r.issued == r.devices
    hard = len(r.failures)
    print(f"devices: {r.devices:,} over {args.connections} claim connections; first requests sent within "
          f"{r.first_send_window:.1f} s")
    print(f"issued: {r.issued:,} / {r.devices:,} ({100 * r.issued / r.devices:.1f} %) in {r.seconds:.1f} s "
          f"= {r.issued / r.seconds:,.0f}/s overall; time to certificate p50 {percentile(r.latencies, 50):.1f} s, "
          f"p99 {percentile(r.latencies, 99):.1f} s, max {max(r.latencies, default=0):.1f} s")
    print(f"requests sent: {r.sends:,} (BUSY {r.busy:,}, RATE_LIMITED {r.rate_limited:,}; resends use the same "
          f"request id); duplicate replies: {r.duplicates}")
    print(f"registry: {r.registry}")
    print(f"broker RSS: {r.rss_start_kib / 1024:.0f} MiB before, peak {r.rss_peak_kib / 1024:.0f} MiB "
          f"(limit 1024: {'met' if rss_ok else 'MISSED'}); signing workers peak {r.workers_rss_peak_kib / 1024:.0f} MiB")
    print(f"ping (publish -> own subscription, every {args.ping_interval * 1000:.0f} ms): {r.pings_sent} sent, "
          f"{r.pings_lost} lost; p50 {percentile(ping_all, 50) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max "
          f"{max(ping_all, default=0) * 1000:.1f} ms (p99 limit 100 ms: {'met' if ping_ok else 'MISSED'}); p99 while the "
          f"first requests go out {percentile(in_wave, 99) * 1000:.1f} ms, after {percentile(after, 99) * 1000:.1f} ms")
    cpu = r.cpu
    if cpu:
        print(f"CPU, cores on average over the storm: broker process {cpu['broker']:.2f} (event-loop thread "
              f"{cpu['loop']:.2f}), signing workers {cpu['workers']:.2f}, device clients {cpu['clients']:.2f}")
    print(f"plugin counters: {stats}")
    print(f"hard failures: {hard}")
    for line in r.failures[:20]:
        print("  " + line)
    ok = issued_ok and hard == 0 and rss_ok and ping_ok
    print(f"requirements: {'all met' if ok else 'NOT MET'}")
    return ok


async def _main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="certmq-storm-") as tmp:
        root = Path(tmp)
        datadir = await make_datadir(root)
        per_conn = -(-args.devices // args.connections)
        names = [f"s{i % args.connections:03d}-{i // args.connections:05d}" for i in range(args.devices)]
        async with Minter(datadir) as minter:
            claims = []
            for k in range(args.connections):
                claims.append(await minter.claim(f"claim-{k:03d}", pattern=f"s{k:03d}-*", max_uses=per_conn))
            pinger = await minter.mint("pinger")
        started = time.perf_counter()
        csrs = make_csrs(names)
        print(f"broker_storm: {args.devices:,} devices, {args.connections} claim connections x up to {per_conn}; "
              f"{args.devices:,} CSRs made in {time.perf_counter() - started:.1f} s (before timing)", flush=True)
        devices = []
        for i, (name, csr) in enumerate(zip(names, csrs)):
            rid = os.urandom(16)
            devices.append(_Device(name, i % args.connections, rid,
                                   encode(CertificateRequest(request_id=rid, profile=Profile.IDENTITY, csr=csr))))
        plugin = {"workers": args.workers, "queue_capacity": args.queue}
        if args.health_interval is not None:
            plugin["health_interval"] = args.health_interval
        broker = BrokerChild(datadir, plugin=plugin, tag="storm")
        try:
            result = await _storm(args, broker, claims, devices, pinger)
        finally:
            stats = broker.stop()
        sizes = stats.pop("batch_sizes", None) or []
        stats.pop("batch_seconds", None)
        if sizes:
            stats["batch_mean"] = round(sum(sizes) / len(sizes), 1)
        print_probe(stats.pop("probe", None))
        errors = broker.errors()
        result.failures += [f"broker log: {e}" for e in errors[:5]]
        _check_registry(datadir, devices, result)
    return 0 if _report(args, result, stats) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=50_000, help="simulated devices (default 50,000)")
    parser.add_argument("--connections", type=int, default=250, help="claim connections (default 250, at most 1000)")
    parser.add_argument("--spread", type=float, default=10.0, help="seconds over which first requests go out (10)")
    parser.add_argument("--workers", type=int, default=2, help="signing worker processes (default 2)")
    parser.add_argument("--queue", type=int, default=2000, help="admission queue capacity (default 2000)")
    parser.add_argument("--reply-timeout", type=float, default=60.0,
                        help="a send without any reply for this long is a hard failure (default 60 s)")
    parser.add_argument("--deadline", type=float, default=540.0, help="give up after this many seconds (540)")
    parser.add_argument("--worker-nice", type=int, default=0,
                        help="nice value for the signing worker processes (default 0)")
    parser.add_argument("--client-nice", type=int, default=0,
                        help="nice value for the storm's device clients (default 0; the pinger keeps 0)")
    parser.add_argument("--health-interval", type=float, default=None,
                        help="the plugin's health_interval (default: the plugin's own, 60 s; 0: no health checks)")
    parser.add_argument("--ping-interval", type=float, default=0.05, help="pinger period (default 0.05 s)")
    parser.add_argument("--ping-lost-after", type=float, default=PING_LOST_AFTER,
                        help="a ping not back after this many seconds is lost (default 5)")
    args = parser.parse_args(argv)
    if not 1 <= args.connections <= 1000 or args.devices < args.connections:
        parser.error("--connections must be 1..1000 and at most --devices")
    if (args.workers < 1 or args.queue < 1 or args.spread < 0 or args.reply_timeout <= 0 or args.ping_interval <= 0
            or args.ping_lost_after <= 0):
        parser.error("--workers, --queue >= 1; --spread >= 0; --reply-timeout, --ping-interval > 0")
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
