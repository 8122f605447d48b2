"""How long a fleet health report takes, and how long it holds the event loop, at 10k-100k certificates.

Run: ``.venv/bin/python bench/health_report.py [--counts 10000,50000,100000] [--mode both|thread|child]
[--gc-freeze 5]``.

* A fresh SQLite registry per size gets ``count`` certificate records straight through
  ``commit_issuances`` (one really signed certificate's DER, a distinct key hash each, so every
  key is parsed once, as in a real fleet), issued over the last 35 days with 30-day lifetimes
  (some expired, some overdue, many findings), plus a session row for every ``--sessions-every``-th
  device (1, the default: a fleet whose devices all connect). The child mode reads them with
  ``Registry.session_pages``, a page at a time (``--sessions-every 5`` shows what they cost).
* While a report runs, the loop carries two probes: a ticker (``sleep(0.01)`` in a loop; the
  lag is how late it wakes) and an echo round trip over a loopback TCP connection every 5 ms
  (a loop doing syscalls, as a broker does: the case where a computing thread hurt most, the
  loop re-taking the GIL after every syscall).
* As the broker does by default (``gc_freeze`` = 5 s, plugin.py ``_gc_policy``), the heap is
  frozen every ``--gc-freeze`` seconds, so a full collection walks only what is new; ``0`` leaves
  CPython's default collector, whose full collections walk everything the bench has kept (earlier
  reports, the key cache) and show up as loop lag of their own (the ``full gc`` column).
* ``thread`` is the previous way (records read with the default page, ``assess`` in
  ``asyncio.to_thread``), ``child`` is :class:`FleetMonitor` as it is now. Each runs twice: the
  first run parses every key, the second finds them in the key cache.

Prints one line per (size, mode, run): report seconds, max and p99 loop lag, max echo round
trip, and the broker process's RSS growth. Exit 1 if a child-mode report lagged the loop by
100 ms or more, or if the two modes disagree on the report.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from broker_plugin.health import MAX_PUBLISHED_PER_CHECK, FleetHealth, FleetMonitor, assess  # noqa: E402
from broker_plugin.store.base import SessionUpdate, open_registry  # noqa: E402
from health.kit import DAY, NOW, insert_fleet, make_ca, policy  # noqa: E402

from _broker_kit import percentile, rss_kib  # noqa: E402  (bench/ is this script's own folder)


def _rss_mib() -> float:
    return rss_kib(os.getpid()) / 1024


async def populate(registry: Any, ca: Any, count: int, sessions_every: int = 1) -> None:
    """``count`` certificates of tenant ``acme`` and a session row for every ``sessions_every``-th device."""
    await insert_fleet(registry, ca, count, actor="bench")
    await registry.record_sessions([
        SessionUpdate(tenant="acme", device_id=f"dev-{i:06d}", serial=(1 << 100) + i, kind="device",
                      client_id=f"dev-{i:06d}", node="bench", last_seen=NOW - dt.timedelta(minutes=i % 600),
                      connects=1, connected_at=NOW - DAY)
        for i in range(0, count, sessions_every)])


async def old_report(registry: Any, ca: Any, keys: dict[bytes, tuple[str, int]]) -> FleetHealth:
    """The report as FleetMonitor.run built it before: every record read, then assess in a thread."""
    certificates = [c async for c in registry.certificates("acme")]
    sessions = await registry.sessions("acme")
    report = await asyncio.to_thread(assess, tenant="acme", now=NOW, policy=policy(), certificates=certificates,
                                     sessions=sessions, live=[], ca_certificates=ca.cas(), key_cache=keys)
    document = report.to_json(max_findings_per_check=MAX_PUBLISHED_PER_CHECK, devices=False)
    await registry.put_health_report("acme", "bench", NOW, document)
    return report


class Probes:
    """A 10 ms ticker and a 5 ms loopback echo, both on the loop under test."""

    def __init__(self, gc_freeze: float) -> None:
        self.gc_freeze = gc_freeze
        self.lags: list[float] = []
        self.rtts: list[float] = []
        self.gc_pauses: list[float] = []  # full collections: they stall the loop too, whoever allocated
        self._stop = False
        self._gc_started = 0.0

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif info["generation"] == 2:
            self.gc_pauses.append(time.perf_counter() - self._gc_started)

    async def _ticker(self) -> None:
        while not self._stop:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            self.lags.append(time.perf_counter() - before - 0.01)

    async def _freezer(self) -> None:
        while self.gc_freeze > 0 and not self._stop:
            gc.freeze()
            await asyncio.sleep(self.gc_freeze)

    async def _echo(self, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while not self._stop:
            before = time.perf_counter()
            writer.write(b"x")
            await reader.readexactly(1)
            self.rtts.append(time.perf_counter() - before)
            await asyncio.sleep(0.005)
        writer.close()

    async def run(self, work: Any) -> Any:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(64):
                writer.write(data)
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        tasks = [asyncio.create_task(self._ticker()), asyncio.create_task(self._echo(port)),
                 asyncio.create_task(self._freezer())]
        await asyncio.sleep(0.05)
        self.lags.clear()
        self.rtts.clear()
        gc.callbacks.append(self._on_gc)
        try:
            return await work
        finally:
            gc.callbacks.remove(self._on_gc)
            self._stop = True
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            gc.unfreeze()
            server.close()


async def _main(args: argparse.Namespace) -> int:
    failures = 0
    ca = make_ca()
    for count in args.counts:
        with tempfile.TemporaryDirectory() as tmp:
            registry = await open_registry(f"sqlite:///{tmp}/registry.db")
            try:
                started = time.perf_counter()
                await populate(registry, ca, count, args.sessions_every)
                print(f"{count:,} certificates inserted in {time.perf_counter() - started:.1f} s", flush=True)
                monitor = FleetMonitor(registry=registry, policies={"acme": policy()},
                                       ca_certificates={"acme": ca.cas()}, node="bench", clock=lambda: NOW,
                                       live=lambda: [], interval=0)
                keys: dict[bytes, tuple[str, int]] = {}
                reports: dict[str, FleetHealth] = {}
                for mode in ("thread", "child") if args.mode == "both" else (args.mode,):
                    for run in (1, 2):
                        probes = Probes(args.gc_freeze)
                        rss = _rss_mib()
                        started = time.perf_counter()
                        if mode == "thread":
                            report = await probes.run(old_report(registry, ca, keys))
                        else:
                            [report] = await probes.run(monitor.run())
                        took = time.perf_counter() - started
                        reports[mode] = report
                        lag = max(probes.lags, default=0.0)
                        print(f"{count:>7,} {mode:<6} run {run}: report {took:5.2f} s, loop lag max {lag * 1000:6.1f} ms "
                              f"p99 {percentile(probes.lags, 99) * 1000:6.1f} ms, echo rtt max {max(probes.rtts) * 1000:6.1f} ms "
                              f"({len(probes.rtts)} round trips), full gc max {max(probes.gc_pauses, default=0) * 1000:5.1f} ms, rss +{_rss_mib() - rss:5.1f} MiB, "
                              f"{len(report.findings):,} findings", flush=True)
                        if mode == "child" and lag >= 0.1:
                            failures += 1
                if len(reports) == 2 and reports["thread"] != reports["child"]:
                    print(f"{count:,}: the two modes disagree on the report")
                    failures += 1
            finally:
                await registry.close()
    print("load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the bench."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="10000,50000,100000",
                        type=lambda text: [int(n) for n in text.split(",")])
    parser.add_argument("--mode", choices=("both", "thread", "child"), default="both")
    parser.add_argument("--sessions-every", type=int, default=1, help="a session row for every n-th device")
    parser.add_argument("--gc-freeze", type=float, default=5.0, help="seconds between gc.freeze() (0: none)")
    return asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
