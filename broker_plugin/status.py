"""``certmq status``: fleet health of a data directory's tenants, for people (or ``--json``).

It reads the registry -- certificates, the session rows the running broker writes (batched,
about once a second), the last report each broker node published -- and the tenants' policies
and CA certificates from the data directory, then prints :func:`broker_plugin.health.assess`'s
view: certificates by state, expiring in 7 / 30 / 90 days, the renewal forecast per day, last
seen per device, and the audit findings. It needs no CA passphrase and changes nothing but the
registry's schema version (opening a registry migrates it).

"Live" here means what the registry says: sessions a broker recorded as open and has not
recorded as closed. The broker's own findings (from its live connections) are shown beside,
with their age, as ``broker reports``.

This module parses arguments and formats output; the checks live in :mod:`broker_plugin.health`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from collections.abc import Sequence
from typing import Any

from cryptography import x509

from protocol.errors import CertmqError

from .ca import datadir as dd
from .ca.policy import load_tenant_policy
from .health import FleetHealth, HealthSettings, Severity, assess_registry

__all__ = ["configure", "run"]

_PROG = "certmq status"
_BAR = 40


def configure(parser: argparse.ArgumentParser) -> None:
    """``certmq status`` options."""
    parser.add_argument("--data", metavar="DIR", help="data directory (default: $CERTMQ_DATA or ./certmq-data)")
    parser.add_argument("--tenant", metavar="T", help="only this tenant (default: every tenant)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--days-without-renewal", type=int, default=30, metavar="N",
                        help="flag devices past their renewal moment whose last issuance is older than N days "
                             "(default 30)")
    parser.add_argument("--forecast-days", type=int, default=30, metavar="N",
                        help="renewal forecast horizon in days (default 30)")
    parser.add_argument("--devices", type=int, default=10, metavar="N",
                        help="text output: list the N devices seen longest ago (default 10; JSON lists all)")


def _usage(text: str) -> int:
    print(f"{_PROG}: error: {text}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """``certmq status``: the exit status (0; 1 for a missing or broken data directory; 2 for bad options)."""
    if args.days_without_renewal < 0:
        return _usage("--days-without-renewal must be >= 0")
    if not 1 <= args.forecast_days <= 3660:
        return _usage("--forecast-days must be between 1 and 3660")
    if args.devices < 0:
        return _usage("--devices must be >= 0")
    datadir = dd.resolve_datadir(args.data)
    if not datadir.is_dir():
        print(f"{_PROG}: error: data directory {datadir} does not exist", file=sys.stderr)
        return 1
    try:
        materials = dd.authority_material(datadir, passphrase=None)
    except (CertmqError, OSError, ValueError) as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 1
    names = [m.name for m in materials]
    if args.tenant is not None and args.tenant not in names:
        return _usage(f"no tenant {args.tenant!r} in {datadir} (tenants: {', '.join(names) or 'none'})")
    chosen = [m for m in materials if args.tenant in (None, m.name)]
    settings = HealthSettings(days_without_renewal=args.days_without_renewal, forecast_days=args.forecast_days)
    try:
        results = asyncio.run(_gather(datadir, chosen, settings))
    except (CertmqError, OSError, ValueError) as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 1
    now = dt.datetime.now(dt.UTC)
    if args.json:
        document = {
            "generated_at": _iso(now),
            "data_dir": str(datadir),
            "tenants": [{**report.to_json(), "broker_reports": reports} for report, reports in results],
        }
        json.dump(document, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        for report, reports in results:
            print(_text(report, reports, now, args.devices))
    return 0


async def _gather(datadir: Any, materials: Sequence[Any],
                  settings: HealthSettings) -> list[tuple[FleetHealth, list[dict[str, Any]]]]:
    registry = await dd.open_datadir_registry(datadir)
    try:
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        out = []
        for material in materials:
            cas = {"issuing": x509.load_pem_x509_certificate(material.issuing_pem),
                   "root": x509.load_pem_x509_certificate(material.root_pem)}
            report = await assess_registry(registry, tenant=material.name, policy=load_tenant_policy(material.policy),
                                           now=now, ca_certificates=cas, settings=settings)
            stored = await registry.health_reports(material.name)
            out.append((report, [{"node": r.node, "generated_at": _iso(r.generated_at),
                                  "age_seconds": int((now - r.generated_at).total_seconds()),
                                  "finding_counts": r.report.get("finding_counts", {}),
                                  "findings": r.report.get("findings", [])} for r in stored]))
        return out
    finally:
        await registry.close()


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _ago(now: dt.datetime, then: dt.datetime) -> str:
    seconds = max(0, int((now - then).total_seconds()))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} days ago"


def _text(report: FleetHealth, reports: list[dict[str, Any]], now: dt.datetime, stalest: int) -> str:
    c = report.counts
    e = report.expiring
    lines = [
        f"tenant {report.tenant}  ({_iso(report.generated_at)})",
        f"  certificates   {c['active']} active, {c['expired']} expired, {c['revoked']} revoked",
        f"  expiring       within 7 days: {e[7]}   30 days: {e[30]}   90 days: {e[90]}   "
        f"(renewal overdue: {report.overdue})",
    ]
    counts = [n for _, n in report.forecast]
    peak = max(counts, default=0)
    total = sum(counts)
    mean = total / len(counts) if counts else 0.0
    lines.append(f"  renewals       next {len(counts)} days: {total} in all, mean {mean:.1f}/day, peak {peak}/day")
    for day, n in report.forecast:
        bar = "#" * (round(n / peak * _BAR) if peak else 0)
        lines.append(f"    {day.isoformat()}  {n:6d} {bar}")
    devices = report.devices
    live = sum(1 for d in devices if d.live)
    never = sum(1 for d in devices if d.last_seen is None)
    recent = sum(1 for d in devices if d.last_seen is not None and now - d.last_seen <= dt.timedelta(days=1))
    lines.append(f"  devices        {len(devices)} with a current certificate: {live} live now, "
                 f"{recent} seen in the last 24 h, {never} never seen")
    for d in devices[:stalest]:
        seen = "never seen" if d.last_seen is None else f"last seen {_iso(d.last_seen)} ({_ago(now, d.last_seen)})"
        lines.append(f"    {d.device_id:<32} {seen}{'  [live]' if d.live else ''}")
    by_severity = {s: sum(1 for f in report.findings if f.severity is s) for s in Severity}
    summary = ", ".join(f"{n} {s}" for s, n in by_severity.items() if n) or "none"
    lines.append(f"  findings       {len(report.findings)} ({summary})")
    for finding in report.findings:
        lines.append(f"    {finding.severity.upper():<8} {finding.check}  {finding.subject}")
        lines.append(f"             {finding.text}")
    if not reports:
        lines.append("  broker reports none stored (is a broker running with health checks on?)")
    for stored in reports:
        n = sum(stored["finding_counts"].values()) if stored["finding_counts"] else len(stored["findings"])
        at = dt.datetime.fromisoformat(stored["generated_at"].replace("Z", "+00:00"))
        lines.append(f"  broker report  node {stored['node']}: {n} finding(s) at {stored['generated_at']} "
                     f"({_ago(now, at)})")
        for item in stored["findings"]:
            lines.append(f"    {str(item.get('severity', '')).upper():<8} {item.get('check')}  {item.get('subject')}")
    return "\n".join(lines) + "\n"
