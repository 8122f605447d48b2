"""Memory per idle TLS connection: stock amqtt 0.12.1 vs the hardened broker.

Run: ``./dev bench broker_memory`` (or ``.venv/bin/python bench/broker_memory.py [--connections 500]``).

Each broker runs alone in a child process (see ``bench/broker_subscriptions.py``).
``--warmup`` connections are opened first (allocator and import warm-up), the
child's RSS (``/proc/<pid>/status`` VmRSS) is read, then ``--connections`` more
TLS connections each send CONNECT (clean session, keep-alive 0, a client
certificate of its own) and stay idle; after a settle pause the RSS is read
again. Per connection = growth / connections. ``--kinds hardened-bigbuf`` adds
the hardened broker with asyncio's default 256 KiB TLS read buffer; its number
swings run to run (50-130 KiB seen) with glibc's dynamic mmap threshold, so it
is not in the default run.

Goal: hardened <= 64 KiB per idle TLS connection. Exits 1 when missed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from broker_subscriptions import BrokerProcess, client_context, make_pki, open_client

__all__: list[str] = []


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def _open(port: int, root: Path, names: list[str]) -> list[object]:
    writers = []
    for name in names:
        _reader, writer = await open_client(port, client_context(root, name), name)
        writers.append((_reader, writer))
    return writers


async def _measure(proc: BrokerProcess, root: Path, warm: list[str], names: list[str], settle: float) -> float:
    keep = await _open(proc.port, root, warm)
    await asyncio.sleep(settle)
    before = rss_kib(proc.pid)
    keep += await _open(proc.port, root, names)
    await asyncio.sleep(settle)
    after = rss_kib(proc.pid)
    for _reader, writer in keep:  # type: ignore[misc]
        writer.close()
    return (after - before) / len(names)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--kinds", nargs="+", default=["stock", "hardened"])
    args = parser.parse_args()
    warm = [f"w{i}" for i in range(args.warmup)]
    names = [f"m{i}" for i in range(args.connections)]
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_pki(root, warm + names)
        print(f"PKI: {len(warm) + len(names)} client certificates in {time.perf_counter() - t0:.1f} s", flush=True)
        for kind in args.kinds:
            proc = BrokerProcess(kind, root)
            try:
                results[kind] = asyncio.run(_measure(proc, root, warm, names, args.settle))
            finally:
                proc.close()
            print(f"{kind:16} {results[kind]:7.1f} KiB RSS per idle TLS connection ({args.connections} connections)", flush=True)
    ok = results.get("hardened", 0.0) <= 64
    print(f"goal hardened <= 64 KiB: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
