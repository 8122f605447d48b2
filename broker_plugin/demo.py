"""``certmq demo``: a simulated fleet gets, renews and loses real certificates through a real broker.

What runs, in order (``docs/quickstart.md`` describes it for users):

1. a data directory (temporary, or ``--data DIR``) with the development tenant ``demo``, whose
   identity certificates live minutes; one claim per production line and an operator certificate;
2. ``certmq broker --port 0`` as a child process on 127.0.0.1 (TLS, client certificates required);
3. two gateways (validators) provisioned first, each feeding a signed RevocationCache from the
   region's feed; then every device of the fleet -- a real ``DeviceClient`` over TLS --
   provisioned just in time from its line's claim certificate, its renewal agent started at once;
4. renewals, each at the device's hash-placed moment of the window, until every device has
   renewed once;
5. a few revocations by the operator over MQTT: the session kicked, the reconnection refused, the
   signed delta reaching both validators -- each timed;
6. everything stopped (the broker too, also on Ctrl-C), a summary table, and ``--report DIR``:
   ``report.json`` and PNG plots. The exit status is 0 only when nothing failed.

This module is the presentation (progress bars, table, report); the fleet is ``demo_fleet``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["DemoConfig", "DemoRun", "configure", "run"]

#: Default and ``--quick`` shapes: certificate lifetime, renewal window, production lines, revocations.
_DEFAULT = {"devices": 500, "lifetime": 240, "window": (0.05, 0.2), "lines": 16, "revoke": 5}
_QUICK = {"devices": 20, "lifetime": 40, "window": (0.1, 0.3), "lines": 4, "revoke": 2}
_VALIDATORS = 2


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """One run's shape (from the command line)."""

    devices: int
    lifetime_s: int
    window: tuple[float, float]
    lines: int
    revoke: int
    validators: int
    quick: bool
    data: str | None
    report: str


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options."""
    parser.add_argument("--devices", type=_bounded(1, 100_000, "devices"), default=None,
                        help=f"simulated devices (default {_DEFAULT['devices']}; --quick: {_QUICK['devices']})")
    parser.add_argument("--quick", action="store_true",
                        help=f"short certificates ({_QUICK['lifetime']} s) for tests: done in well under a minute")
    parser.add_argument("--revoke", type=_bounded(1, 50, "revocations"), default=None,
                        help=f"certificates to revoke (default {_DEFAULT['revoke']}; --quick: {_QUICK['revoke']})")
    parser.add_argument("--lines", type=_bounded(1, 64, "production lines"), default=None,
                        help="production lines: claims provisioning in parallel (default 16; --quick: 4)")
    parser.add_argument("--data", metavar="DIR", help="data directory to keep (default: a temporary one)")
    parser.add_argument("--report", metavar="DIR", default="certmq-demo-report",
                        help="where report.json and the PNG plots go (default ./certmq-demo-report)")


def _bounded(low: int, high: int, what: str):  # type: ignore[no-untyped-def]
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number of {what}: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"give {low}..{high} {what}")
        return value

    return parse


def _config(args: argparse.Namespace) -> DemoConfig:
    shape = _QUICK if args.quick else _DEFAULT
    devices = args.devices or shape["devices"]
    revoke = args.revoke or shape["revoke"]
    if revoke >= devices:
        raise ValueError(f"--revoke {revoke} needs more than {revoke} devices")
    return DemoConfig(devices=devices, lifetime_s=int(shape["lifetime"]), window=tuple(shape["window"]),  # type: ignore[arg-type]
                      lines=min(args.lines or shape["lines"], devices), revoke=revoke, validators=_VALIDATORS,
                      quick=bool(args.quick), data=args.data, report=args.report)


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when every step worked, 1 (saying what failed) otherwise, 130 on Ctrl-C."""
    try:
        config = _config(args)
    except ValueError as exc:
        print(f"certmq demo: error: {exc}", file=sys.stderr)
        return 2
    report_dir = Path(config.report)
    if report_dir.exists() and not report_dir.is_dir():
        print(f"certmq demo: error: --report {report_dir} exists and is not a directory", file=sys.stderr)
        return 2
    demo = DemoRun(config)
    # Ctrl-C and SIGTERM cancel the run; its finally blocks stop the fleet and the broker.
    try:
        return asyncio.run(_main(demo))
    except KeyboardInterrupt:
        demo.out.print("[bold red]interrupted[/]: fleet and broker stopped")
        return 130


async def _main(demo: Any) -> int:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    stopped = False

    def interrupt() -> None:
        nonlocal stopped
        stopped = True
        main.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, interrupt)
    try:
        return await demo.run()
    except asyncio.CancelledError:
        if stopped:
            raise KeyboardInterrupt from None
        raise


def _percentiles(values: list[float]) -> dict[str, float | int | None]:
    """p50 / p99 / max in milliseconds (nearest rank), and how many values."""
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]

    return {"n": len(ordered), "p50": round(rank(0.50) * 1e3, 1), "p99": round(rank(0.99) * 1e3, 1),
            "max": round(ordered[-1] * 1e3, 1)}


def _ms(stats: dict[str, Any], keys: tuple[str, str] = ("p50", "p99")) -> str:
    if not stats["n"]:
        return "-"
    return " / ".join(f"{stats[k]:,.0f} ms" for k in keys)


class DemoRun:
    """One run of the demo: the phases, their progress bars, the summary and the report."""

    def __init__(self, config: DemoConfig) -> None:
        from rich.console import Console

        self.config = config
        self.out = Console(highlight=False)
        self.problems: list[str] = []
        self.timings: dict[str, float] = {}
        self.devices: list[Any] = []
        self.validators: list[Any] = []
        self.traces: list[Any] = []
        self.broker: Any = None
        self.broker_status: int | None = None
        self.start = time.monotonic()
        self.run_id = os.urandom(3).hex()
        self.loop_noise: dict[str, int] = {}

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # Hundreds of MQTT clients being kicked, rotated and closed leave aiomqtt/paho callbacks
        # and futures nobody awaits: counted for the report, not printed over the progress bars.
        exc = context.get("exception")
        key = type(exc).__name__ if exc is not None else str(context.get("message", "?"))[:60]
        self.loop_noise[key] = self.loop_noise.get(key, 0) + 1

    # -- phases ----------------------------------------------------------------------

    async def run(self) -> int:
        """All phases; the exit status. The fleet and the broker are stopped whatever happens."""
        from . import demo_fleet as fleet

        cfg = self.config
        # 500 device stores fsync on every rotation; on tmpfs that costs nothing (a real device has one store)
        shm = Path("/dev/shm")
        work = Path(tempfile.mkdtemp(prefix="certmq-demo-", dir=shm if os.access(shm, os.W_OK) else None))
        asyncio.get_running_loop().set_exception_handler(self._loop_exception)
        datadir = Path(cfg.data) if cfg.data else work / "data"
        window = cfg.window
        self.out.rule(f"[bold]certmq demo[/]: {cfg.devices} devices, {cfg.lifetime_s} s certificates")
        self.out.print(f"every device renews at its own moment in {window[0]:.0%}-{window[1]:.0%} of the "
                       f"lifetime ({cfg.lifetime_s * window[0]:.0f}-{cfg.lifetime_s * window[1]:.0f} s after "
                       f"issuance), placed by a hash of its id")
        try:
            t = time.monotonic()
            ids = [f"sensor-{self.run_id}-{n:05d}" for n in range(cfg.devices)]
            setup = await fleet.prepare_datadir(
                datadir, run_id=self.run_id, device_ids=ids, lines=cfg.lines, validators=cfg.validators,
                lifetime=dt.timedelta(seconds=cfg.lifetime_s), window=window, work=work)
            self.timings["setup"] = time.monotonic() - t
            what = "created" if setup.created_tenant else "reused"
            self.out.print(f"[green]✓[/] development CA: tenant [bold]{fleet.TENANT}[/] {what} in {datadir} "
                           f"(P-256; NOT FOR PRODUCTION); {len(setup.lines)} claims (production lines), "
                           f"1 operator certificate")

            t = time.monotonic()
            self.broker = fleet.BrokerProcess(datadir=datadir, passphrase_file=setup.passphrase_file,
                                              log_path=work / "broker.log")
            port = await asyncio.to_thread(self.broker.start)
            self.timings["broker_start"] = time.monotonic() - t
            self.out.print(f"[green]✓[/] broker: certmq broker on 127.0.0.1:{port} (pid {self.broker.pid}; "
                           f"TLS, client certificates required) in {self.timings['broker_start']:.1f} s")

            await self._fleet(setup, port, work)
            async with fleet.Operator(creds=setup.operator, setup=setup, port=port) as operator:
                await self._revocations(operator)
            self.timings["demo"] = time.monotonic() - self.start
        except Exception as exc:  # noqa: BLE001 -- reported, then the finally block cleans up
            self.problems.append(f"the demo stopped: {type(exc).__name__}: {exc}")
        finally:
            await self._shutdown()
            if self.broker is not None and self.broker.proc is not None:
                self._keep_broker_log(work / "broker.log")
            shutil.rmtree(work, ignore_errors=True)
        return self._finish(datadir if cfg.data else None)

    async def _fleet(self, setup: Any, port: int, work: Path) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from . import demo_fleet as fleet

        cfg = self.config
        root = work / "devices"
        for gid in setup.gateway_ids:
            device = fleet.FleetDevice.make(device_id=gid, root=root, setup=setup, port=port,
                                            bootstrap=setup.gateway_claim, reply_timeout=20)
            if not await device.provision():
                raise RuntimeError(f"validator {gid} could not be provisioned: {device.error}")
            validator = fleet.Validator(device=device, setup=setup, path=work / f"{gid}-revocations.json")
            await validator.subscribe()
            device.start_agent()
            self.validators.append(validator)
        self.out.print(f"[green]✓[/] {len(self.validators)} validators (gateways) provisioned, their revocation "
                       f"caches subscribed to the signed feed certmq/v1/{fleet.TENANT}/rev/{fleet.REGION}/#")

        columns = (TextColumn("{task.description:<26}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[info]}"))
        t0 = time.monotonic()
        provisioned: list[Any] = []
        with Progress(*columns, console=self.out) as progress:
            prov = progress.add_task("provisioning (JIT, claims)", total=cfg.devices, info="")
            ren = progress.add_task("renewed at least once", total=cfg.devices, info="")

            async def line(claim: Any, ids: tuple[str, ...]) -> None:
                for device_id in ids:
                    device = fleet.FleetDevice.make(device_id=device_id, root=root, setup=setup, port=port,
                                                    bootstrap=claim, reply_timeout=20)
                    self.devices.append(device)
                    if await device.provision():
                        device.start_agent()
                        provisioned.append(device)
                    else:
                        self.problems.append(f"{device_id}: provisioning failed: {device.error}")
                    progress.advance(prov)

            def refresh() -> None:
                now = time.monotonic()
                if "provisioning" not in self.timings:
                    lat = _percentiles([d.provision_latency for d in provisioned])
                    rate = len(provisioned) / max(now - t0, 1e-3)
                    progress.update(prov, info=f"{rate:5.1f}/s  p50 {lat['p50'] or 0:.0f} ms")
                renewals = [r for d in self.devices for r in d.renewals]
                recent = sum(1 for at, _ in renewals if now - at < 5)
                progress.update(ren, completed=sum(1 for d in self.devices if d.renewals),
                                info=f"{len(renewals)} renewals, {recent / 5:4.1f}/s now")

            lines = [asyncio.create_task(line(claim, ids)) for claim, ids in setup.lines]
            while not all(task.done() for task in lines):
                refresh()
                await asyncio.sleep(0.2)
            for task in lines:
                task.result()
            self.timings["provisioning"] = time.monotonic() - t0
            # every device is due within the window's end after its issuance; retries get some slack
            deadline = time.monotonic() + cfg.lifetime_s * cfg.window[1] + 30
            waiting = [d for d in provisioned if not d.renewals]
            while waiting and time.monotonic() < deadline:
                if not self.broker.running:
                    raise RuntimeError("the broker process died:\n" + self.broker.log_tail())
                refresh()
                await asyncio.sleep(0.2)
                waiting = [d for d in provisioned if not d.renewals]
            refresh()
        self.timings["renewals"] = time.monotonic() - t0 - self.timings["provisioning"]
        if waiting:
            self.problems.append(f"{len(waiting)} devices did not renew within the window "
                                 f"(e.g. {waiting[0].device_id}: {waiting[0].client.last_errors or 'no error'})")

    async def _revocations(self, operator: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        from . import demo_fleet as fleet

        cfg = self.config
        live = [d for d in self.devices if d.provisioned_at is not None]
        step = max(1, len(live) // cfg.revoke)
        t0 = time.monotonic()
        with Progress(TextColumn("{task.description:<26}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), console=self.out) as progress:
            task = progress.add_task("revocations (operator)", total=cfg.revoke, info="")
            chosen: set[str] = set()
            for k in range(cfg.revoke):
                target = None
                for _ in range(100):  # a device between renewals: connected, nothing staged or pending
                    candidates = [d for d in live[k * step:] + live if d.device_id not in chosen
                                  and d.client.connected_as is not None and not d.renewing()]
                    if candidates:
                        target = candidates[0]
                        break
                    await asyncio.sleep(0.05)
                if target is None:
                    self.problems.append("no connected device to revoke")
                    break
                chosen.add(target.device_id)
                trace = await fleet.revoke_and_watch(operator, target, self.validators)
                self.traces.append(trace)
                kicked = "-" if trace.kicked_s is None else f"{trace.kicked_s * 1e3:.0f} ms"
                progress.update(task, advance=1, info=f"{target.device_id}: kicked in {kicked}")
        self.timings["revocations"] = time.monotonic() - t0
        for trace in self.traces:
            if trace.result_s is None:
                self.problems.append(f"{trace.device_id}: no RevocationResult for serial {trace.serial:x}"
                                     + (f" ({trace.error})" if trace.error else ""))
            if trace.kicked_s is None:
                self.problems.append(f"{trace.device_id}: its session was not closed after the revocation")
            if not trace.reconnect_refused:
                self.problems.append(f"{trace.device_id}: reconnection not refused ({trace.reconnect_detail})")
            missing = [i + 1 for i, s in enumerate(trace.validators_s) if s is None]
            if missing:
                self.problems.append(f"{trace.device_id}: the revocation did not reach validator(s) {missing}")
        for i, v in enumerate(self.validators):
            if v.rejected:
                self.problems.append(f"validator {i + 1} refused {v.rejected} feed message(s)")

    async def _shutdown(self) -> None:
        t = time.monotonic()
        everyone = self.devices + [v.device for v in self.validators]
        if everyone:
            with self.out.status(f"stopping {len(everyone)} devices and the broker"):
                for device in everyone:
                    if device.task is not None:
                        device.task.cancel()
                closing = asyncio.gather(*(d.close() for d in everyone), return_exceptions=True)
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(closing, 20)
        if self.broker is not None:
            self.broker_status = self.broker.stop()
            if self.broker_status not in (0, None):
                self.problems.append(f"the broker exited with status {self.broker_status}")
        self.timings["shutdown"] = time.monotonic() - t

    def _keep_broker_log(self, log: Path) -> None:
        report = Path(self.config.report)
        with contextlib.suppress(OSError):
            report.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, report / "broker.log")

    # -- summary and report ----------------------------------------------------------

    def _numbers(self) -> dict[str, Any]:
        fleet_devices = self.devices
        renewals = [r for d in fleet_devices for r in d.renewals]
        retries = sum(1 for d in fleet_devices for e in d.events if e.kind in ("retry", "reconnect_failed"))
        feed = [s for t in self.traces for s in t.validators_s if s is not None]
        counts = {
            "devices": self.config.devices,
            "issued": sum(1 for d in fleet_devices if d.provisioned_at is not None),
            "renewed": len(renewals),
            "devices_renewed": sum(1 for d in fleet_devices if d.renewals),
            "revoked": sum(1 for t in self.traces if t.result_s is not None),
            "kicked": sum(1 for t in self.traces if t.kicked_s is not None),
            "reconnect_refused": sum(1 for t in self.traces if t.reconnect_refused),
            "validator_updates": len(feed),
            "validators": len(self.validators),
            "retries": retries,
            "failures": len(self.problems),
        }
        latency = {
            "issuance": _percentiles([d.provision_latency for d in fleet_devices if d.provision_latency is not None]),
            "renewal": _percentiles([took for _, took in renewals]),
            "kick": _percentiles([t.kicked_s for t in self.traces if t.kicked_s is not None]),
            "feed_to_validators": _percentiles(feed),
        }
        return {"counts": counts, "latency_ms": latency}

    def _event_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for device in self.devices:
            for event in device.events:
                counts[event.kind] = counts.get(event.kind, 0) + 1
        return dict(sorted(counts.items()))

    def _finish(self, kept_data: Path | None) -> int:
        from rich.table import Table

        self.timings["total"] = time.monotonic() - self.start
        numbers = self._numbers()
        report_dir = Path(self.config.report)
        plots: list[str] = []
        try:
            report_dir.mkdir(parents=True, exist_ok=True)
            plots = self._plots(report_dir)
        except Exception as exc:  # noqa: BLE001 -- no plot is a failure to report, not a crash
            self.problems.append(f"plots not written: {type(exc).__name__}: {exc}")
        numbers["counts"]["failures"] = len(self.problems)
        c, lat = numbers["counts"], numbers["latency_ms"]

        table = Table(title="certmq demo: summary", title_style="bold")
        table.add_column("what")
        table.add_column("result", justify="right")
        table.add_row("issued (provisioned just in time)", f"{c['issued']} / {c['devices']}")
        table.add_row("renewed (devices renewed at least once)", f"{c['renewed']} ({c['devices_renewed']} / {c['issued']})")
        table.add_row("revoked", f"{c['revoked']}")
        table.add_row("kicked / reconnect refused", f"{c['kicked']} / {c['reconnect_refused']}")
        table.add_row(f"revocation reached validators ({c['validators']} each)", f"{c['validator_updates']}")
        table.add_row("failures", f"[{'red' if c['failures'] else 'green'}]{c['failures']}[/]")
        table.add_row("transient retries (BUSY, reconnects)", f"{c['retries']}")
        table.add_row("issuance latency p50 / p99", _ms(lat["issuance"]))
        table.add_row("renewal latency p50 / p99", _ms(lat["renewal"]))
        table.add_row("kicked after the operator's request p50 / max", _ms(lat["kick"], ("p50", "max")))
        table.add_row("signed delta in validator caches p50 / max", _ms(lat["feed_to_validators"], ("p50", "max")))
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items() if k not in ("total", "demo"))
        table.add_row("time", f"{self.timings['total']:.1f} s ({phases})")
        self.out.print(table)

        report = {
            "version": 1,
            "ok": not self.problems,
            "problems": self.problems,
            "config": asdict(self.config),
            "run_id": self.run_id,
            "broker": {"port": getattr(self.broker, "port", None), "pid": getattr(self.broker, "pid", None),
                       "exit_status": self.broker_status},
            **numbers,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "revocations": [{**asdict(t), "serial": f"{t.serial:x}"} for t in self.traces],
            "timeline_s": {
                "provisioned": sorted(round(d.provisioned_at - self.start, 3) for d in self.devices
                                      if d.provisioned_at is not None),
                "renewed": sorted(round(at - self.start, 3) for d in self.devices for at, _ in d.renewals),
            },
            "events": self._event_counts(),
            "event_loop_exceptions": self.loop_noise,
            "plots": plots,
            "data_dir": str(kept_data) if kept_data else None,
        }
        try:
            (report_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            self.out.print(f"report: {report_dir / 'report.json'}" + "".join(f", {report_dir / p}" for p in plots))
        except OSError as exc:
            self.problems.append(f"report not written: {exc}")
        if kept_data:
            self.out.print(f"data directory kept: {kept_data} (certmq status --data {kept_data})")
        if self.problems:
            print("certmq demo: FAILED:", file=sys.stderr)
            for problem in self.problems:
                print(f"  - {problem}", file=sys.stderr)
            return 1
        return 0

    def _plots(self, folder: Path) -> list[str]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        provisioned = [d.provisioned_at - self.start for d in self.devices if d.provisioned_at is not None]
        renewed = [at - self.start for d in self.devices for at, _ in d.renewals]
        end = max([*provisioned, *renewed, 1.0])
        width = 1.0 if end < 60 else 2.0
        bins = [i * width for i in range(int(end / width) + 2)]
        fig, ax = plt.subplots(figsize=(9, 4.5))
        ax.hist([provisioned, renewed], bins=bins, stacked=True, label=["provisioned", "renewed"],
                color=["tab:blue", "tab:orange"])
        ax.set_xlabel("seconds since the demo started")
        ax.set_ylabel(f"certificates per {width:g} s")
        ax.set_title(f"{len(provisioned)} devices: provisioning, then renewals spread by device-id hash "
                     f"(lifetime {self.config.lifetime_s} s)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "renewals_over_time.png", dpi=100)
        plt.close(fig)

        issuance = [d.provision_latency * 1e3 for d in self.devices if d.provision_latency is not None]
        renewal = [took * 1e3 for d in self.devices for _, took in d.renewals]
        fig, ax = plt.subplots(figsize=(9, 4.5))
        ax.hist([issuance, renewal], bins=40, label=["provisioning (claim connect, CSR, issue, prove)",
                                                     "renewal (CSR, issue, reconnect with the new certificate)"])
        ax.set_xlabel("latency (ms), as the device sees it")
        ax.set_ylabel("operations")
        ax.set_title("issuance latency over MQTT + TLS")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "latency_histogram.png", dpi=100)
        plt.close(fig)
        return ["renewals_over_time.png", "latency_histogram.png"]
