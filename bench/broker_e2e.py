"""End-to-end issuance over MQTT through the broker, against the same broker's echo baseline.

Run: ``./dev bench broker_e2e`` (or ``.venv/bin/python bench/broker_e2e.py [--devices 100]
[--requests 4000] [--workers 2] [--repeat 2]``).

In one run, on one throw-away data directory (tenant ``bench``, SQLite registry):

- ``--devices`` device certificates are minted into the registry, and for every request to be sent
  a real P-256 CSR (fresh key, CN = the device id) is made and encoded into a
  ``CertificateRequest`` payload -- all before any timing;
- **CA mode**: the broker runs in a child process exactly as ``certmq broker`` builds it (server
  certificate, TLS context requiring client certificates, ``HardenedBroker`` + ``CertmqPlugin``
  from ``broker_config``) with ``--workers`` ``ProcessPoolSigner`` processes and no per-client rate
  limit. Each device is one TLS connection from this process (raw MQTT 3.1.1 client) with one
  request outstanding: publish the next ``CertificateRequest`` on ``dev/{id}/req`` (QoS 1), wait
  for the reply (QoS 1, acknowledged), repeat. Rate = replies / seconds over ``--requests``
  requests after ``--warmup``. Every reply is checked afterwards: a ``CertificateIssued`` for that
  request id whose certificate names the device;
- **echo mode**: the same broker with ``echo: true`` (same ACL, admission queue, batches and
  ``deliver_to``, no CA) and ``echo_reply_bytes`` = the mean CA reply size just measured, the same
  clients and the same request payloads.

Prints both rates, the ratio CA / echo (goal >= 0.7), latencies, and the CPU seconds the broker
process, its signing workers and the client process used during each timed window (nothing is
pinned: the OS shares the 2 cores among them). ``--repeat`` alternates CA and echo rounds and
keeps the best of each. ``--profile DIR`` writes a cProfile of the broker's event-loop thread
per round. Exits 1 on a hard failure (a wrong or missing reply), not on a missed goal.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

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
)
from cryptography import x509  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from protocol.codec import decode, encode  # noqa: E402
from protocol.codes import Profile  # noqa: E402
from protocol.messages import CertificateIssued, CertificateRequest  # noqa: E402
from protocol.topics import device_request_topic  # noqa: E402

__all__ = ["Round", "run_round"]

GOAL = 0.7


@dataclass
class Round:
    """One timed round against one broker."""

    mode: str
    requests: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    reply_bytes: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    stats: dict[str, object] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Replies per second in the timed window."""
        return self.requests / self.seconds if self.seconds else 0.0


def _payloads(devices: list[Creds], csrs: dict[str, list[bytes]]) -> dict[str, list[tuple[bytes, bytes]]]:
    out: dict[str, list[tuple[bytes, bytes]]] = {}
    for dev in devices:
        items = []
        for csr in csrs[dev.name]:
            rid = os.urandom(16)
            items.append((rid, encode(CertificateRequest(request_id=rid, profile=Profile.IDENTITY, csr=csr))))
        out[dev.name] = items
    return out


def _cpu(broker_pid: int) -> dict[str, float]:
    return {"broker": cpu_seconds(broker_pid), "loop": cpu_seconds(broker_pid, broker_pid),
            "workers": sum(cpu_seconds(p) for p in children(broker_pid)),
            "clients": cpu_seconds(os.getpid())}


async def run_round(mode: str, broker: BrokerChild, devices: list[Creds],
                    payloads: dict[str, list[tuple[bytes, bytes]]], warmup: int, timeout: float = 60) -> Round:
    """Drive every device's payloads through ``broker``; time the requests after the first ``warmup``."""
    result = Round(mode)
    total = sum(len(v) for v in payloads.values())
    done = 0
    started = asyncio.Event()
    finished = asyncio.Event()
    timed_start = 0.0
    timed_cpu: dict[str, float] = {}
    replies: list[tuple[str, bytes, bytes]] = []

    async def device(dev: Creds) -> None:
        nonlocal done, timed_start, timed_cpu
        waiter: list[asyncio.Future[bytes]] = []

        def on_message(topic: str, payload: bytes) -> None:
            if waiter and not waiter[0].done():
                waiter[0].set_result(payload)

        conn = MqttConn(dev.name, on_message)
        await conn.connect(broker.port, dev.context())
        topic = device_request_topic(TENANT, dev.name)
        loop = asyncio.get_running_loop()
        try:
            for rid, payload in payloads[dev.name]:
                fut = loop.create_future()
                waiter[:] = [fut]
                sent = time.perf_counter()
                conn.publish(topic, payload, qos=1)
                try:
                    reply = await asyncio.wait_for(fut, timeout)
                except TimeoutError:
                    result.failures.append(f"{dev.name}: no reply within {timeout} s")
                    return
                now = time.perf_counter()
                done += 1
                if done == warmup:
                    timed_cpu = _cpu(broker.pid)
                    timed_start = now
                    started.set()
                elif done > warmup:
                    result.latencies.append(now - sent)
                    result.reply_bytes.append(len(reply))
                    replies.append((dev.name, rid, reply))
                if done == total:
                    result.seconds = now - timed_start
                    after = _cpu(broker.pid)
                    result.cpu = {k: after[k] - timed_cpu.get(k, 0.0) for k in after}
                    finished.set()
        finally:
            await conn.close()

    await asyncio.gather(*(device(d) for d in devices))
    result.requests = total - warmup
    if mode == "ca":
        for name, rid, reply in replies:
            try:
                msg = decode(reply)
                ok = (isinstance(msg, CertificateIssued) and msg.request_id == rid
                      and x509.load_der_x509_certificate(msg.certificate).subject
                      .get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name)
            except Exception as exc:  # noqa: BLE001 - reported as a hard failure
                ok, msg = False, exc
            if not ok:
                result.failures.append(f"{name}: unexpected reply {msg!r:.200}")
    return result


def _show(r: Round, workers: int) -> None:
    cpu = r.cpu
    print(f"  {r.mode:4}: {r.requests:,} requests in {r.seconds:.2f} s = {r.rate:,.0f}/s; latency p50 "
          f"{percentile(r.latencies, 50) * 1000:.1f} ms, p99 {percentile(r.latencies, 99) * 1000:.1f} ms; reply "
          f"{sum(r.reply_bytes) / max(1, len(r.reply_bytes)):.0f} B", flush=True)
    if r.seconds:
        print(f"        CPU in the window: broker process {cpu['broker']:.1f} s ({cpu['broker'] / r.seconds:.2f} core; "
              f"event-loop thread {cpu['loop'] / r.seconds:.2f}, other threads "
              f"{(cpu['broker'] - cpu['loop']) / r.seconds:.2f}), "
              f"{workers} signing workers {cpu['workers']:.1f} s ({cpu['workers'] / r.seconds:.2f} core), clients "
              f"{cpu['clients']:.1f} s ({cpu['clients'] / r.seconds:.2f} core); per request: broker "
              f"{cpu['broker'] / r.requests * 1e6:.0f} us (loop {cpu['loop'] / r.requests * 1e6:.0f}), workers {cpu['workers'] / r.requests * 1e6:.0f} us, "
              f"clients {cpu['clients'] / r.requests * 1e6:.0f} us", flush=True)


def _ceilings(ca: Round, echo: Round) -> None:
    """What CPU alone allows, from the best rounds' CPU per request: the ratio no scheduling can beat.

    All processes share the machine's cores, so the CA path's rate is at most cores / (its CPU per
    request in broker + workers + clients); echo's likewise. Where the signing workers and the
    clients had cores of their own, the broker's event-loop thread would be the limit of both.
    """
    # a tiny run (the smoke test's) can read 0 clock ticks for a process or the loop thread
    if not (ca.requests and echo.requests and ca.cpu and echo.cpu
            and min(ca.cpu.get(k, 0.0) for k in ("broker", "loop", "workers")) > 0
            and min(echo.cpu.get(k, 0.0) for k in ("broker", "loop")) > 0):
        print("CPU-bound ceilings: not computed (too few CPU ticks in the timed window)")
        return
    cores = os.cpu_count() or 1

    def per(r: Round, key: str) -> float:
        return r.cpu[key] / r.requests

    ca_all = per(ca, "broker") + per(ca, "workers") + per(ca, "clients")
    echo_all = per(echo, "broker") + per(echo, "clients")
    ca_max, echo_max = cores / ca_all, cores / echo_all
    print(f"CPU-bound ceilings: all processes on these {cores} cores: CA <= {ca_max:,.0f}/s "
          f"({ca_all * 1e6:.0f} us per request), echo <= {echo_max:,.0f}/s ({echo_all * 1e6:.0f} us): "
          f"ratio <= {ca_max / echo_max:.2f} once both are CPU-bound; event-loop thread alone (workers and clients elsewhere): "
          f"CA <= {1 / per(ca, 'loop'):,.0f}/s, echo <= {1 / per(echo, 'loop'):,.0f}/s, "
          f"ratio <= {per(echo, 'loop') / per(ca, 'loop'):.2f}")


async def _main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="certmq-e2e-") as tmp:
        root = Path(tmp)
        datadir = await make_datadir(root)
        async with Minter(datadir) as minter:
            devices = [await minter.mint(f"e2e-{i:04d}") for i in range(args.devices)]
        per_device = -(-(args.requests + args.warmup) // args.devices)
        print(f"broker_e2e: {args.devices} device connections, {per_device} requests each "
              f"({args.warmup} warm-up), {args.workers} signing workers, batch {args.batch}; making "
              f"{per_device * args.devices * args.repeat:,} CSRs ...", flush=True)
        names = [d.name for d in devices for _ in range(per_device)]
        csr_rounds = []
        for _ in range(args.repeat):
            flat = make_csrs(names)
            by_dev: dict[str, list[bytes]] = {d.name: [] for d in devices}
            for name, csr in zip(names, flat):
                by_dev[name].append(csr)
            csr_rounds.append(by_dev)
        common = {"workers": args.workers, "batch_size": args.batch, "rate": 0.0, "queue_capacity": args.queue}
        best: dict[str, Round] = {}
        failures: list[str] = []
        reply_size = 0
        for n in range(args.repeat):
            for mode in ("ca", "echo"):
                plugin = dict(common)
                if mode == "echo":
                    plugin |= {"echo": True, "echo_reply_bytes": reply_size}
                profile = args.profile / f"broker-{mode}-{n}.prof" if args.profile else None
                broker = BrokerChild(datadir, plugin=plugin, profile=profile, tag=f"{mode}{n}")
                try:
                    r = await run_round(mode, broker, devices, _payloads(devices, csr_rounds[n]), args.warmup)
                finally:
                    stats = broker.stop()
                sizes, secs = stats.pop("batch_sizes", []), stats.pop("batch_seconds", [])
                if sizes:
                    stats["batch_mean_size"] = round(sum(sizes) / len(sizes), 1)
                    stats["batch_ms_p50_p99"] = (round(percentile(secs, 50) * 1000, 1),
                                                 round(percentile(secs, 99) * 1000, 1))
                r.stats = stats
                errors = broker.errors()
                if errors:
                    failures += [f"broker log ({mode}): {e}" for e in errors[:5]]
                if mode == "ca":
                    reply_size = round(sum(r.reply_bytes) / max(1, len(r.reply_bytes)))
                print(f"round {n + 1} {mode}:", flush=True)
                _show(r, args.workers if mode == "ca" else 0)
                print(f"        plugin counters: {r.stats}", flush=True)
                failures += r.failures
                if mode not in best or r.rate > best[mode].rate:
                    best[mode] = r
    ca, echo = best["ca"], best["echo"]
    ratio = ca.rate / echo.rate if echo.rate else 0.0
    print(f"end-to-end issuance {ca.rate:,.0f}/s, echo baseline {echo.rate:,.0f}/s (best of {args.repeat}): "
          f"ratio {ratio:.2f} (goal >= {GOAL}: {'met' if ratio >= GOAL else 'MISSED'})")
    _ceilings(ca, echo)
    if failures:
        print(f"HARD FAILURES: {len(failures)}")
        for line in failures[:20]:
            print("  " + line)
        return 1
    print("hard failures: 0")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100, help="device connections (default 100)")
    parser.add_argument("--requests", type=int, default=4000, help="timed requests per round (default 4000)")
    parser.add_argument("--warmup", type=int, default=300, help="untimed requests first (default 300)")
    parser.add_argument("--workers", type=int, default=2, help="signing worker processes (default 2)")
    parser.add_argument("--batch", type=int, default=64, help="plugin batch_size (default 64)")
    parser.add_argument("--queue", type=int, default=2000, help="admission queue capacity (default 2000)")
    parser.add_argument("--repeat", type=int, default=2, help="CA/echo round pairs; best of each kept (default 2)")
    parser.add_argument("--profile", type=Path, help="write cProfile files of the broker's event loop here")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.requests < 1 or args.warmup < 1 or args.workers < 1 or args.repeat < 1:
        parser.error("--devices, --requests, --warmup, --workers and --repeat must be >= 1")
    if args.devices > args.requests + args.warmup:
        parser.error("--devices must not exceed --requests + --warmup")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
