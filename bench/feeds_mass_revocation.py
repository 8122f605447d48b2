"""Mass revocation of 100,000 certificates while an unrelated publish/subscribe pair keeps going.

Run: ``.venv/bin/python bench/feeds_mass_revocation.py [--count 100000] [--mode batches|profile]``.

* 100,000 ``ota-signing`` certificate records (1,000 devices x 100) are inserted into the data
  directory's registry directly (status slots from one reservation, ``commit_issuances`` in
  chunks): issuing them through the CA would only measure signing.
* The broker (child process, signed feeds on) starts; a validator connection subscribes to the
  tenant's feed (deltas and retained snapshots) and a ``pinger`` device (own process, from
  ``bench/broker_storm.py``) publishes every 50 ms on its own telemetry topic and times each
  round trip.
* Another process revokes them through the CA service (the way ``certmq ca revoke`` does, the
  broker learns of them by polling the shared registry): ``--mode batches`` = one revocation per
  device (1,000 transactions of 100), ``--mode profile`` = one revocation of the whole profile.
* Done when the validator's RevocationCache (signature-checked) holds all of them revoked.
  ``--no-feeds`` is the baseline: the same run with the broker publishing no feeds (kicks and
  polling only), to tell the feed publisher's share of the ping latency from the rest.

Requirements (exit 1 otherwise): every certificate revoked in the validator's cache, every feed
message verifies, ping p99 < 100 ms and no ping lost meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _broker_kit import PASSPHRASE, TENANT, BrokerChild, Minter, MqttConn, make_datadir, percentile  # noqa: E402
from broker_storm import _pinger  # noqa: E402

REGION = "-"
PER_DEVICE = 100


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def insert(datadir: Path, count: int) -> float:
    """Insert ``count`` active ota-signing records straight into the registry; seconds taken."""
    from broker_plugin.ca import datadir as dd
    from broker_plugin.store.audit import AuditEvent
    from broker_plugin.store.base import CertificateKind, CertificateRecord, IssuanceItem

    started = time.perf_counter()
    registry = await dd.open_datadir_registry(datadir)
    try:
        slots = await registry.allocate_status_indices(TENANT, REGION, 131072, count)
        now = _now().replace(microsecond=0)
        items = []
        for i, (list_id, index) in enumerate(slots):
            device = f"fleet-{i // PER_DEVICE:05d}"
            record = CertificateRecord(
                tenant=TENANT, serial=int.from_bytes(os.urandom(19), "big") | (1 << 150), device_id=device,
                profile="ota-signing", region=REGION, not_before=now, not_after=now + dt.timedelta(days=30),
                der=b"\x30\x00", spki_sha256=os.urandom(32), issued_at=now, status_list_id=list_id,
                status_index=index, kind=CertificateKind.OPERATIONAL)
            items.append(IssuanceItem(record=record, request=None, audit=AuditEvent(
                kind="issue", actor="bench", subject=device, time=now, tenant=TENANT)))
        for start in range(0, len(items), 5000):
            results = await registry.commit_issuances(items[start:start + 5000])
            failed = [r for r in results if isinstance(r, Exception)]
            if failed:
                raise SystemExit(f"insert failed: {failed[0]!r}")
    finally:
        await registry.close()
    return time.perf_counter() - started


async def _revoke(datadir: Path, mode: str, devices: int) -> None:
    from broker_plugin.ca import datadir as dd
    from broker_plugin.ca.service import CAService
    from broker_plugin.ca.signing import InlineSigner
    from protocol.codes import Profile, RevocationReason

    authorities = dd.load_authorities(datadir, passphrase=PASSPHRASE)
    registry = await dd.open_datadir_registry(datadir)
    service = CAService(registry=registry, authorities=authorities, signer=InlineSigner(authorities), clock=_now)
    started = time.perf_counter()
    revoked = 0
    try:
        if mode == "profile":
            out = await service.revoke(tenant=TENANT, reason=RevocationReason.KEY_COMPROMISE, actor="bench",
                                       profile=Profile.OTA_SIGNING)
            revoked = len(out.revoked)
        else:
            for d in range(devices):
                out = await service.revoke(tenant=TENANT, reason=RevocationReason.KEY_COMPROMISE, actor="bench",
                                           device_id=f"fleet-{d:05d}", profile=Profile.OTA_SIGNING)
                revoked += len(out.revoked)
    finally:
        await registry.close()
    print(f"revoked {revoked} in {time.perf_counter() - started:.2f} s", flush=True)


async def _main(args: argparse.Namespace) -> int:
    from device_client.feedverify import SignedFeedVerifier
    from device_client.revcache import RevocationCache
    from protocol.topics import delta_topic, snapshot_topic

    with tempfile.TemporaryDirectory(prefix="certmq-mass-revocation-") as tmp:
        datadir = await make_datadir(Path(tmp))
        async with Minter(datadir) as minter:
            pinger = await minter.mint("pinger")
            validator = await minter.mint("validator")
        took = await insert(datadir, args.count)
        print(f"inserted {args.count:,} certificate records in {took:.1f} s", flush=True)
        broker = BrokerChild(datadir, plugin={"workers": 1, "publish_feeds": not args.no_feeds})
        feed: list[tuple[str, bytes]] = []
        rc = RevocationCache(tenant=TENANT, region=REGION, path=Path(tmp) / "validator.json",
                             verifier=SignedFeedVerifier.from_pem_file(minter.chain))
        rejected = 0
        target = {snapshot_topic(TENANT, REGION), delta_topic(TENANT, REGION)}

        def on_message(topic: str, payload: bytes) -> None:
            feed.append((topic, payload))

        ctx = mp.get_context("spawn")
        go, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
        proc = ctx.Process(target=_pinger, args=(broker.port, pinger, 0.05, 5.0, go, stop, out))
        conn = MqttConn(validator.name, on_message)
        try:
            await conn.connect(broker.port, validator.context())
            await conn.subscribe(f"certmq/v1/{TENANT}/rev/{REGION}/#", qos=1)
            proc.start()
            assert out.get(timeout=60) == "ready"
            go.set()
            await asyncio.sleep(1.0)  # a baseline second of pings
            started = time.perf_counter()
            revoker = await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).resolve()), "revoke", str(datadir), args.mode,
                str(args.count // PER_DEVICE), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env={**os.environ})
            stdout, _ = await revoker.communicate()
            committed = time.perf_counter() - started
            print(stdout.decode().strip(), flush=True)
            done_at = None
            seen = 0
            deadline = time.perf_counter() + (0 if args.no_feeds else args.timeout)
            while time.perf_counter() < deadline:
                for topic, payload in feed[seen:]:
                    if topic in target or topic.startswith(snapshot_topic(TENANT, REGION) + "/"):
                        try:
                            rc.handle(topic, payload)
                        except Exception:  # noqa: BLE001 - counted: a refused feed message fails the run
                            rejected += 1
                seen = len(feed)
                held = sum(sl.revoked_count() for sl in rc.lists.values())
                if held >= args.count and not rc.stale:
                    done_at = time.perf_counter() - started
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            stop.set()
            rtts, lost, sent = out.get(timeout=30)
            proc.join(10)
        finally:
            await conn.close()
            stats = broker.stop()
        during = [rtt * 1000 for at, rtt in rtts if at >= 1.0]
        p50, p99 = percentile(during, 50), percentile(during, 99)
        held = sum(sl.revoked_count() for sl in rc.lists.values())
        deltas = sum(1 for t, _ in feed if t == delta_topic(TENANT, REGION))
        snaps = len(feed) - deltas
        print(f"# feeds_mass_revocation {dt.datetime.now(dt.UTC):%Y-%m-%d} count={args.count:,} mode={args.mode} "
              f"cpus={os.cpu_count()} python {sys.version.split()[0]}")
        print(f"revocations committed by the other process in {committed:.1f} s; validator complete "
              f"{'after %.1f s' % done_at if done_at else 'NEVER'} ({held:,} revoked held, {deltas} deltas, "
              f"{snaps} snapshots received, {rejected} refused)")
        print(f"ping during the revocation: n={len(during)} p50 {p50:.1f} ms p99 {p99:.1f} ms, lost {lost} of {sent}")
        print("broker stats:", {k: stats.get(k) for k in ("kicked", "deltas")})
        errors = broker.errors()
        if errors:
            print("broker errors:", *errors[:10], sep="\n  ")
        ok = (done_at is not None or args.no_feeds) and rejected == 0 and lost == 0 and p99 < 100
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--mode", choices=("batches", "profile"), default="batches")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--no-feeds", action="store_true", help="baseline: the broker publishes no feeds")
    return asyncio.run(_main(ap.parse_args(argv)))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "revoke":
        asyncio.run(_revoke(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
    else:
        raise SystemExit(main())
