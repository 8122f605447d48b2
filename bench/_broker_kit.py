"""Shared parts of the broker benchmarks (``bench/broker_e2e.py``, ``bench/broker_storm.py``).

- a throw-away data directory with one tenant (``bench``), device / claim certificates minted into
  its registry, and real P-256 CSRs made in a process pool before any timing starts;
- the broker in a child process: the same steps as ``certmq broker`` (server certificate,
  :func:`broker_plugin.server.tls_context`, :class:`~broker_plugin.broker.HardenedBroker` loading
  the certmq plugin by dotted path from :func:`broker_plugin.server.broker_config`), but with any
  plugin setting (``echo_reply_bytes``, ``batch_size``...), which the CLI does not expose;
  ``python bench/_broker_kit.py serve CONFIG.json`` is that child;
- a small raw MQTT 3.1.1 client over TLS (CONNECT, SUBSCRIBE, PUBLISH QoS 0/1, PUBACK): paho and
  aiomqtt cost several times more CPU per message than the broker does, and on 2 cores the
  clients share the machine with the broker;
- CPU and RSS readings from ``/proc``.

Not a public API: benchmark plumbing only.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import multiprocessing as mp
import os
import signal
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

__all__ = [
    "PASS_ENV",
    "TENANT",
    "BrokerChild",
    "Creds",
    "Minter",
    "MqttConn",
    "cpu_seconds",
    "make_csrs",
    "make_datadir",
    "percentile",
    "rss_kib",
]

TENANT = "bench"
PASS_ENV = "CERTMQ_BENCH_PASS"
PASSPHRASE = b"certmq bench passphrase"
os.environ[PASS_ENV] = PASSPHRASE.decode()

_POLICY = """
[profiles.identity]
lifetime = "30d"
capabilities = ["telemetry"]
allow_key_reuse = true
"""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- data directory, certificates, CSRs -----------------------------------------------------------


async def make_datadir(root: Path) -> Path:
    """A data directory with tenant :data:`TENANT` (P-256, 30-day identity certificates, capability
    ``telemetry``) and the broker's server certificate."""
    from broker_plugin.ca import datadir as dd
    from broker_plugin.server import ensure_server_certificate

    datadir = root / "data"
    policy = root / "policy.toml"
    policy.write_text(_POLICY)
    await dd.init_tenant(datadir, TENANT, algorithm="p256", passphrase=PASSPHRASE, policy=policy,
                         now=_now().replace(microsecond=0) - dt.timedelta(hours=1))
    ensure_server_certificate(datadir, passphrase=PASSPHRASE)
    return datadir


@dataclass(frozen=True)
class Creds:
    """A client certificate and key in files."""

    name: str
    serial: int
    cert: Path
    key: Path
    chain: Path

    def context(self) -> ssl.SSLContext:
        """A client TLS context presenting this certificate, trusting the tenant chain."""
        context = ssl.create_default_context(cafile=str(self.chain))
        context.load_cert_chain(str(self.cert), str(self.key))
        return context


def _csr(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.DER)


def make_csrs(names: list[str], processes: int = 2) -> list[bytes]:
    """One real P-256 CSR (fresh key, CN = name) per name, made in ``processes`` processes."""
    if len(names) < 2000 or processes < 2:
        return [_csr(n) for n in names]
    with mp.get_context("fork").Pool(processes) as pool:
        return pool.map(_csr, names, chunksize=500)


class Minter:
    """Issues certificates straight into the data directory's registry (test-side CA service)."""

    def __init__(self, datadir: Path) -> None:
        self.datadir = datadir
        self.folder = datadir.parent / "creds"
        self.folder.mkdir(exist_ok=True)
        self._service: Any = None
        self._registry: Any = None

    async def __aenter__(self) -> Minter:
        from broker_plugin.ca import datadir as dd
        from broker_plugin.ca.service import CAService
        from broker_plugin.ca.signing import InlineSigner

        authorities = dd.load_authorities(self.datadir, passphrase=PASSPHRASE)
        self._registry = await dd.open_datadir_registry(self.datadir)
        self._service = CAService(registry=self._registry, authorities=authorities,
                                  signer=InlineSigner(authorities), clock=_now)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._registry.close()

    @property
    def chain(self) -> Path:
        """The tenant's chain (clients trust the broker's server certificate through it)."""
        from broker_plugin.ca import datadir as dd

        return dd.tenant_dir(self.datadir, TENANT) / "chain.pem"

    async def mint(self, name: str, *, kind: Any = None) -> Creds:
        """A certificate for ``name`` (``kind``: a ``CertificateKind``, default operational), written to files."""
        from broker_plugin.store.base import CertificateKind
        from protocol.codes import Profile

        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .sign(key, hashes.SHA256())).public_bytes(serialization.Encoding.DER)
        kind = CertificateKind.OPERATIONAL if kind is None else kind
        record = await self._service.issue_direct(tenant=TENANT, device_id=name, profile=Profile.IDENTITY,
                                                  csr_der=csr, kind=kind, actor="bench")
        cert = x509.load_der_x509_certificate(record.der)
        cert_path, key_path = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return Creds(name, cert.serial_number, cert_path, key_path, self.chain)

    async def claim(self, claim_id: str, *, pattern: str, max_uses: int) -> Creds:
        """Register a claim policy (glob ``pattern``, ``max_uses``) and mint its bootstrap certificate."""
        from broker_plugin.ca.claims import ClaimPolicy
        from broker_plugin.store.base import CertificateKind

        policy = ClaimPolicy(pattern=pattern, max_uses=max_uses, not_after=_now() + dt.timedelta(days=1))
        await self._service.register_claim(tenant=TENANT, claim_id=claim_id, policy=policy, actor="bench")
        return await self.mint(claim_id, kind=CertificateKind.BOOTSTRAP)


# -- the broker child process ---------------------------------------------------------------------


def _time_stages(service: Any, totals: dict[str, float]) -> None:
    """Add the wall time of each stage of ``CAService.handle_many`` batches to ``totals``."""

    def wrap(owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await inner(*args, **kwargs)
            finally:
                totals[label] = totals.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)

    wrap(service, "handle_many", "handle_many")
    wrap(service, "_reserve", "reserve status slots")
    wrap(service._signer, "sign", "sign (worker round trip)")  # noqa: SLF001
    wrap(service, "_finish", "finish (commit + replies)")



class _RevocationStages:
    """Diagnosis (``CERTMQ_BENCH_REVOKE_STAGES=1``): where a revocation's time goes in the broker.

    Per revocation request (a PUBLISH on an operator request topic), milliseconds from its
    arrival at the plugin to: its batch going to the service, the service's answer, the deltas
    handed to the feed publisher, the signed delta published, the fan-out's first and last copy.
    """

    def __init__(self, plugin: Any, broker: Any) -> None:
        from broker_plugin import fanout as fo

        self.rounds: list[dict[str, float]] = []
        self.fan_out_ms: list[tuple[float, float, float]] = []  # per revocation: fan-out wall, loop-thread CPU, run queue
        current: dict[str, float] = {}
        self._current = current

        def mark(name: str) -> None:
            if current and name not in current:
                current[name] = (time.perf_counter() - current["t0"]) * 1000

        submit = plugin.submit

        def on_submit(client_id: str, identity: Any, parsed: Any, payload: bytes) -> None:
            if "/ops/" in parsed.topic:
                if current:
                    self.rounds.append(dict(current))
                current.clear()
                current["t0"] = time.perf_counter()
            submit(client_id, identity, parsed, payload)

        plugin.submit = on_submit
        handle = plugin._handle  # noqa: SLF001

        async def on_handle(batch: Any) -> Any:
            mark("1 batch to service")
            out = await handle(batch)
            mark("2 service answered")
            return out

        plugin._handle = on_handle  # noqa: SLF001
        if plugin.feeds is not None:
            on_deltas = plugin.feeds.on_deltas

            def deltas(ds: Any) -> None:
                mark("3 deltas to feed publisher")
                on_deltas(ds)

            plugin.feeds.on_deltas = deltas
            publish = plugin.feeds.publish

            async def published(topic: str, payload: bytes, retain: bool) -> None:
                mark("4 signed delta published")
                await publish(topic, payload, retain)

            plugin.feeds.publish = published
        send = fo.Fanout.send
        fan_out = broker._fan_out  # noqa: SLF001

        def on_send(fan: Any, handler: Any, session: Any, qos: int) -> bool:
            mark("5 first copy written")
            return send(fan, handler, session, qos)

        schedstat = f"/proc/self/task/{threading.get_native_id()}/schedstat"

        def runqueue_wait() -> float:  # seconds this thread was runnable but not running (Linux)
            try:
                with open(schedstat) as f:
                    return int(f.read().split()[1]) / 1e9
            except (OSError, IndexError, ValueError):
                return float("nan")

        async def on_fan_out(broadcast: Any, running_tasks: Any) -> None:
            cpu, wall, queued = time.thread_time(), time.perf_counter(), runqueue_wait()
            await fan_out(broadcast, running_tasks)
            if "/rev/" in broadcast["topic"] and current:
                mark("6 last copy written")
                cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
                queued = runqueue_wait() - queued
                current["8 fan-out waiting for a CPU (run queue), ms"] = queued * 1000
                current["7 fan-out CPU (loop thread), us per copy"] = (
                    cpu * 1e6 / max(1, len(broker._subscriptions.get(broadcast["topic"], ()))))  # noqa: SLF001
                # wall well above CPU: the loop thread waited (for a CPU: stage 8; else the GIL); both up: slower work
                self.fan_out_ms.append((round(wall * 1000, 1), round(cpu * 1000, 1), round(queued * 1000, 1)))

        fo.Fanout.send = on_send  # type: ignore[method-assign]
        broker._fan_out = on_fan_out  # noqa: SLF001

    def report(self) -> dict[str, Any]:
        """Median and max of each stage over the revocations seen."""
        rounds = self.rounds + ([dict(self._current)] if self._current else [])
        names = sorted({k for r in rounds for k in r if k != "t0"})
        out: dict[str, Any] = {"arrivals": [r["t0"] for r in rounds], "fan_out_ms": self.fan_out_ms}
        return out | {name: {"p50": round(percentile([r[name] for r in rounds if name in r], 50), 2),
                       "max": round(max(r[name] for r in rounds if name in r), 2)} for name in names}


def print_probe(probe: dict[str, Any] | None) -> None:
    """Print the broker child's ``CERTMQ_BENCH_PROBE`` report (``stats["probe"]``), if there is one."""
    if probe is None:
        return
    print("broker probe (CERTMQ_BENCH_PROBE):")
    for key, value in probe.items():
        if isinstance(value, list):
            print(f"  {key}:", *(f"    {item}" for item in value), sep="\n")
        else:
            print(f"  {key}: {value}")


class _Probe:
    """Diagnosis (``CERTMQ_BENCH_PROBE=1``): where an unrelated message waits in the broker child.

    - a loop-lag probe: a task asking to wake every 10 ms records how late it wakes and how many
      callbacks sat in the loop's ready queue then (an iteration runs all of them first);
    - a watchdog thread: while the probe is overdue by > 30 ms, it samples the loop thread's stack
      every 5 ms, so code that holds the loop shows up by line;
    - per-stage timestamps of the pinger's messages (topic ``.../telemetry/ping``) inside the broker:
      handler task, delivery loop, broadcast queue, broadcast task, write.
    """

    def __init__(self) -> None:

        self.lags: list[tuple[float, float, int]] = []  # (t, lag, ready callbacks)
        self.stalls: dict[str, int] = {}
        self.stages: dict[int, dict[str, float]] = {}
        self.gc_pauses: list[tuple[float, float, int, int]] = []  # (end, seconds, generation, collected)
        self._tick = time.perf_counter()
        self._stop = threading.Event()
        self._thread_id = threading.get_ident()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="probe-watchdog")

    def start(self) -> None:
        """Install the ping-stage hooks, start the lag task and the watchdog."""

        from broker_plugin import broker as hb
        from broker_plugin import fanout as fo

        stages = self.stages

        def mark(topic: Any, data: Any, stage: str) -> None:
            if topic and str(topic).endswith("/telemetry/ping") and data and len(data) >= 8:
                (seq,) = struct.unpack("!Q", bytes(data[:8]))
                stages.setdefault(seq, {}).setdefault(stage, time.perf_counter())

        feed_data = asyncio.StreamReader.feed_data
        marker = b"/telemetry/ping"

        def on_feed(reader: Any, data: bytes) -> None:
            at = data.find(marker)
            if at >= 0 and len(data) >= at + len(marker) + 8:
                mark("x/telemetry/ping", data[at + len(marker):], "0 bytes in")
            feed_data(reader, data)

        asyncio.StreamReader.feed_data = on_feed  # type: ignore[method-assign]
        handle_publish = hb._HardenedHandler.handle_publish  # noqa: SLF001

        async def on_publish(handler: Any, packet: Any) -> None:
            mark(packet.topic_name, packet.data, "1 handler task")
            await handle_publish(handler, packet)

        hb._HardenedHandler.handle_publish = on_publish  # type: ignore[method-assign]  # noqa: SLF001
        delivery = hb.HardenedBroker._handle_message_delivery  # noqa: SLF001

        async def on_delivery(broker: Any, session: Any, handler: Any, wait_deliver: Any) -> Any:
            message = wait_deliver.result()
            mark(getattr(message, "topic", None), getattr(message, "data", None), "2 delivery loop")
            return await delivery(broker, session, handler, wait_deliver)

        hb.HardenedBroker._handle_message_delivery = on_delivery  # type: ignore[method-assign]  # noqa: SLF001
        broadcast = hb.HardenedBroker._broadcast_message  # noqa: SLF001

        async def on_broadcast(broker: Any, session: Any, topic: Any, data: Any, force_qos: Any = None) -> None:
            mark(topic, data, "3 broadcast queued")
            await broadcast(broker, session, topic, data, force_qos)

        hb.HardenedBroker._broadcast_message = on_broadcast  # type: ignore[method-assign]  # noqa: SLF001
        send = fo.Fanout.send

        def on_send(fan: Any, handler: Any, session: Any, qos: int) -> bool:
            mark(fan._topic, fan._data, "4 written")  # noqa: SLF001
            return send(fan, handler, session, qos)

        fo.Fanout.send = on_send  # type: ignore[method-assign]
        import gc

        gc_started: list[float] = []

        def on_gc(phase: str, info: dict[str, Any]) -> None:
            if phase == "start":
                gc_started[:] = [time.perf_counter()]
            elif gc_started:
                self.gc_pauses.append((time.perf_counter(), time.perf_counter() - gc_started[0],
                                       int(info.get("generation", -1)), int(info.get("collected", 0))))

        gc.callbacks.append(on_gc)
        asyncio.get_running_loop().create_task(self._lag())
        self._thread.start()

    async def _lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            want = time.perf_counter() + 0.010
            await asyncio.sleep(0.010)
            now = time.perf_counter()
            self._tick = now
            self.lags.append((now, now - want, len(loop._ready)))  # type: ignore[attr-defined]  # noqa: SLF001

    def _watch(self) -> None:
        import traceback

        while not self._stop.wait(0.005):
            if time.perf_counter() - self._tick < 0.040:
                continue
            frame = sys._current_frames().get(self._thread_id)  # noqa: SLF001
            if frame is None:
                continue
            stack = traceback.extract_stack(frame)[-6:]
            key = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(stack))
            self.stalls[key] = self.stalls.get(key, 0) + 1

    def report(self) -> dict[str, Any]:
        """Lag percentiles, the worst lags, the most sampled stall stacks, ping stage delays."""
        self._stop.set()
        lags = sorted(lag for _, lag, _ in self.lags)
        worst = sorted(self.lags, key=lambda x: -x[1])[:15]
        t0 = self.lags[0][0] if self.lags else 0.0
        names = sorted({k for st in self.stages.values() for k in st})
        hops: dict[str, list[float]] = {}
        for st in self.stages.values():
            for a, b in zip(names, names[1:]):
                if a in st and b in st:
                    hops.setdefault(f"{a} -> {b}", []).append(st[b] - st[a])
        return {
            "lag_ms": {f"p{p}": round(1000 * percentile(lags, p), 1) for p in (50, 90, 99, 99.9)}
            | {"max": round(1000 * max(lags, default=0), 1), "n": len(lags)},
            "worst_lags": [(round(t - t0, 2), round(1000 * lag, 1), ready) for t, lag, ready in worst],
            "ready_p99": percentile(sorted(r for _, _, r in self.lags), 99),
            "gc_longest": [(round(t - t0, 2), round(1000 * d, 1), g, n)
                           for t, d, g, n in sorted(self.gc_pauses, key=lambda x: -x[1])[:6]],
            "gc_gen2_count": sum(1 for *_, g, _n in self.gc_pauses if g == 2),
            "stalls": sorted(self.stalls.items(), key=lambda kv: -kv[1])[:12],
            "ping_hops_ms": {k: {f"p{p}": round(1000 * percentile(sorted(v), p), 1) for p in (50, 99)}
                             | {"max": round(1000 * max(v), 1)} for k, v in hops.items()},
        }


async def _serve(config: dict[str, Any], ready: Path) -> None:
    from broker_plugin.broker import HardenedBroker
    from broker_plugin.plugin import CertmqPlugin
    from broker_plugin.server import broker_config, ensure_server_certificate, tls_context

    datadir = Path(config["plugin"]["data_dir"])
    certfile, keyfile = ensure_server_certificate(datadir, passphrase=None)
    broker = HardenedBroker(broker_config(host="127.0.0.1", port=0, plugin=config["plugin"]),
                            ssl_context=tls_context(datadir, certfile=certfile, keyfile=keyfile))
    plugin = CertmqPlugin.of(broker)
    handled: list[tuple[int, float]] = []  # (batch size, seconds in CertmqPlugin._handle)
    inner = plugin._handle  # noqa: SLF001 - bench instrumentation

    async def timed(batch: Any) -> Any:
        start = time.perf_counter()
        try:
            return await inner(batch)
        finally:
            handled.append((len(batch), time.perf_counter() - start))

    plugin._handle = timed  # type: ignore[method-assign]  # noqa: SLF001
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    slow = float(os.environ.get("CERTMQ_BENCH_SLOW", "0"))
    if slow:  # diagnosis: asyncio logs every callback that holds the loop longer than this
        loop.set_debug(True)
        loop.slow_callback_duration = slow
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    probe = _Probe() if os.environ.get("CERTMQ_BENCH_PROBE") else None
    if probe is not None:
        probe.start()
    await broker.start()
    if plugin.startup_error is not None:
        raise SystemExit(f"plugin did not start: {plugin.startup_error!r}")
    revocation_stages = (_RevocationStages(plugin, broker) if os.environ.get("CERTMQ_BENCH_REVOKE_STAGES")
                         else None)
    stages: dict[str, float] = {}
    if not config["plugin"].get("echo"):
        _time_stages(plugin.service, stages)
    tmp = ready.with_name(ready.name + ".tmp")
    tmp.write_text(json.dumps({"port": broker.listen_port(), "pid": os.getpid()}))
    os.replace(tmp, ready)
    await stop.wait()
    stats = {**plugin.stats, "refused_busy": plugin.admission.refused_busy,
             "refused_rate": plugin.admission.refused_rate,
             "signer_round_trips": getattr(plugin.signer, "round_trips", None),
             "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
             "batch_sizes": [n for n, _ in handled], "batch_seconds": [t for _, t in handled]}
    if probe is not None:
        stats["probe"] = probe.report()
    if revocation_stages is not None:
        stats["revocation_stages_ms"] = revocation_stages.report()
    ready.with_suffix(".stats.json").write_text(json.dumps(stats))
    await broker.shutdown()


def _child_main(argv: list[str]) -> None:
    import logging

    config = json.loads(Path(argv[0]).read_text())
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # one line per refused/kicked connection is noise at bench scale; errors still show
    logging.getLogger("broker_plugin.broker").setLevel(logging.ERROR)
    logging.getLogger("amqtt").setLevel(logging.ERROR)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    if config.get("switch_interval"):
        sys.setswitchinterval(config["switch_interval"])
    if config.get("cpus"):
        os.sched_setaffinity(0, config["cpus"])  # before any thread or worker process: they inherit it
    profile = config.get("profile")
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        try:
            asyncio.run(_serve(config, Path(argv[1])))
        finally:
            prof.disable()
            prof.dump_stats(profile)
    else:
        asyncio.run(_serve(config, Path(argv[1])))


class BrokerChild:
    """``certmq broker``-equivalent in a child process (see the module docstring).

    ``plugin``: CertmqPlugin settings (``data_dir`` and ``passphrase_env`` are filled in);
    ``profile``: write a cProfile of the broker's main thread there.
    """

    def __init__(self, datadir: Path, *, plugin: dict[str, Any], profile: Path | None = None,
                 tag: str = "broker", switch_interval: float | None = None, cpus: list[int] | None = None) -> None:
        folder = datadir.parent
        self.ready = folder / f"{tag}.ready.json"
        self.ready.unlink(missing_ok=True)
        config_path = folder / f"{tag}.config.json"
        config = {"plugin": {"data_dir": str(datadir), "passphrase_env": PASS_ENV, **plugin},
                  "profile": str(profile) if profile else None,
                  "switch_interval": switch_interval or float(os.environ.get("CERTMQ_BENCH_SWITCH", "0")),
                  "cpus": cpus}
        config_path.write_text(json.dumps(config))
        # CERTMQ_BENCH_LOGDIR keeps the broker's log after the run (the data directory is temporary)
        self.log = Path(os.environ.get("CERTMQ_BENCH_LOGDIR") or folder) / f"{tag}.log"
        self._log = self.log.open("wb")
        self._proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "serve", str(config_path),
                                       str(self.ready)], stdout=self._log, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 60
        while not self.ready.exists():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._proc.kill()
                raise RuntimeError(f"the broker did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        info = json.loads(self.ready.read_text())
        self.port: int = info["port"]
        self.pid: int = info["pid"]
        self.stats: dict[str, Any] = {}

    def stop(self) -> dict[str, Any]:
        """SIGTERM, wait, and return the plugin's counters."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()
        stats_path = self.ready.with_suffix(".stats.json")
        if stats_path.exists():
            self.stats = json.loads(stats_path.read_text())
        return self.stats

    def errors(self) -> list[str]:
        """ERROR / Traceback lines of the broker's log."""
        return [line for line in self.log.read_text(errors="replace").splitlines()
                if " ERROR " in line or "Traceback" in line]


# -- /proc -----------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (0 if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid``."""
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(x) for x in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds used so far by ``pid`` (all its threads), or by its thread ``tid``."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(p / 100 * len(ordered) + 0.5)) - 1))]


# -- a raw MQTT 3.1.1 client ---------------------------------------------------------------------


def _str(value: str) -> bytes:
    data = value.encode()
    return struct.pack("!H", len(data)) + data


def packet(first: int, body: bytes) -> bytes:
    """One MQTT packet: fixed header byte, remaining length, body."""
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            return bytes([first]) + bytes(encoded) + body


async def read_raw(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One MQTT packet: (fixed-header byte, body)."""
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, await reader.readexactly(length)


class MqttConn:
    """One MQTT 3.1.1 connection over TLS: what the benches need and nothing else.

    ``on_message(topic, payload)`` is called for each PUBLISH received (QoS 1 ones are
    acknowledged first). Keep-alive 0: the broker never drops it for silence.
    """

    def __init__(self, client_id: str, on_message: Callable[[str, bytes], None]) -> None:
        self.client_id = client_id
        self.on_message = on_message
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._pid = 0
        self._suback: asyncio.Future[bytes] | None = None
        self.closed = asyncio.Event()
        self.pubacks = 0

    async def connect(self, port: int, context: ssl.SSLContext, timeout: float = 30) -> None:
        """TLS + CONNECT (clean session); ``RuntimeError`` unless the CONNACK accepts."""
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost"), timeout)
        self._writer.write(packet(0x10, _str("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 0)
                                   + _str(self.client_id)))
        first, body = await asyncio.wait_for(self._read(), timeout)
        if first >> 4 != 2 or body[1] != 0:
            raise RuntimeError(f"{self.client_id}: CONNECT refused ({first:#x}, {body!r})")
        self._task = asyncio.create_task(self._loop())

    async def _read(self) -> tuple[int, bytes]:
        assert self._reader is not None
        return await read_raw(self._reader)

    async def _loop(self) -> None:
        assert self._writer is not None
        try:
            while True:
                first, body = await self._read()
                kind = first >> 4
                if kind == 3:
                    (tlen,) = struct.unpack_from("!H", body)
                    topic = body[2:2 + tlen].decode()
                    pos = 2 + tlen
                    if (first >> 1) & 3:
                        self._writer.write(b"\x40\x02" + body[pos:pos + 2])
                        pos += 2
                    self.on_message(topic, body[pos:])
                elif kind == 4:
                    self.pubacks += 1
                elif kind == 9 and self._suback is not None and not self._suback.done():
                    self._suback.set_result(body)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self.closed.set()

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        """Queue one PUBLISH (no waiting for the PUBACK)."""
        assert self._writer is not None
        if qos:
            self._pid = self._pid % 65535 + 1
            self._writer.write(packet(0x32, _str(topic) + struct.pack("!H", self._pid) + payload))
        else:
            self._writer.write(packet(0x30, _str(topic) + payload))

    async def drain(self) -> None:
        """Wait for the transport's buffer to go below its high-water mark."""
        assert self._writer is not None
        await self._writer.drain()

    async def subscribe(self, topic_filter: str, qos: int = 0) -> None:
        """SUBSCRIBE one filter; ``RuntimeError`` if refused."""
        assert self._writer is not None
        self._suback = asyncio.get_running_loop().create_future()
        self._pid = self._pid % 65535 + 1
        self._writer.write(packet(0x82, struct.pack("!H", self._pid) + _str(topic_filter) + bytes([qos])))
        body = await asyncio.wait_for(self._suback, 10)
        if body[2:] and body[2] == 0x80:
            raise RuntimeError(f"{self.client_id}: SUBSCRIBE {topic_filter} refused")

    async def close(self) -> None:
        """DISCONNECT and close."""
        if self._writer is not None and not self._writer.is_closing():
            try:
                self._writer.write(b"\xe0\x00")
                self._writer.close()
            except (ConnectionError, RuntimeError):
                pass
        if self._task is not None:
            self._task.cancel()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        _child_main(sys.argv[2:])
    else:
        sys.exit("usage: _broker_kit.py serve CONFIG.json READY.json")
