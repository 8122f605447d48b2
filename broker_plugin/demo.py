"""``certmq demo``: the wire format and the CA at work on a small simulated fleet, in-process.

Until the broker and device client land (issues [broker], [device]) the demo
runs without MQTT: every device makes a real P-256 key and CSR, the request is
encoded and decoded exactly as it would cross the broker, a development CA
issues a real certificate, the reply is decoded and checked on the "device"
side, and ``openssl verify`` checks one certificate. Then a few certificates
are revoked and the revocation snapshot and delta are encoded. It prints what
each step costs on the wire.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protocol import codec, renewal, statuslist
from protocol import messages as m
from protocol.codes import Profile, RevocationReason

__all__ = ["configure", "run"]

UTC = dt.timezone.utc


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options."""
    parser.add_argument("--devices", type=_positive, default=200, help="simulated devices (default 200)")
    parser.add_argument("--revoke", type=int, default=5, help="certificates to revoke at the end (default 5)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1 or value > 100_000:
        raise argparse.ArgumentTypeError("give 1..100000 devices")
    return value


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when every device got a certificate that verifies."""
    from broker_plugin.ca.authority import create_tenant_ca
    from broker_plugin.ca.issuer import Issuer, load_csr, random_serial, verify_csr
    from broker_plugin.ca.policy import load_tenant_policy

    out = _Printer()
    now = dt.datetime.now(UTC).replace(microsecond=0)
    out.title(f"certmq demo: {args.devices} devices, in-process (no broker yet)")

    root_key, issuing_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = create_tenant_ca(tenant="demo", root_key=root_key, issuing_key=issuing_key, now=now)
    policy = load_tenant_policy({"name": "demo"})
    issuer = Issuer(ca_certificate=ca.issuing, ca_key=issuing_key, tenant_policy=policy)
    capacity = policy.status_list_capacity
    out.line(f"development CA for tenant 'demo' (P-256 root + issuing CA), status lists of {capacity:,} bits")

    request_sizes, reply_sizes, latencies, renew_days = [], [], [], Counter()
    certificates: list[m.CertificateIssued] = []
    start = time.perf_counter()
    for n in range(args.devices):
        device_id = f"sensor-{n:06d}"
        t0 = time.perf_counter()
        # Device side: key, CSR, request.
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.DER)
        )
        request = m.CertificateRequest(
            request_id=os.urandom(16), profile=Profile.IDENTITY, csr=csr,
            provisioning=m.ProvisioningParameters(device_id=device_id, region="eu-west"),
        )
        wire_request = codec.encode(request)
        # CA side: decode, proof of possession, issue.
        received = codec.decode(wire_request)
        assert isinstance(received, m.CertificateRequest)
        parsed = load_csr(received.csr)
        verify_csr(parsed)
        cert = issuer.issue(
            device_id=device_id, profile=received.profile, public_key=parsed.public_key(),
            serial=random_serial(os.urandom), not_before=now, status_position=(0, n),
            region="eu-west", capabilities=None,
        )
        der = cert.public_bytes(serialization.Encoding.DER)
        window = renewal.renewal_window(not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc)
        wire_reply = codec.encode(m.CertificateIssued(request_id=received.request_id, certificate=der,
                                                      chain=(), renewal_window=window))
        # Device side again: decode, check it is ours and chains to the CA.
        reply = codec.decode(wire_reply)
        assert isinstance(reply, m.CertificateIssued) and reply.request_id == request.request_id
        reply.x509.verify_directly_issued_by(ca.issuing)
        if reply.x509.public_key() != key.public_key():
            raise SystemExit(f"{device_id}: issued certificate does not carry our key")
        latencies.append(time.perf_counter() - t0)
        request_sizes.append(len(wire_request))
        reply_sizes.append(len(wire_reply))
        when = renewal.renewal_time(device_id, not_before=reply.not_before, not_after=reply.not_after,
                                    suggested=reply.renewal_window)
        renew_days[(when - now).days] += 1
        certificates.append(reply)
        out.progress(n + 1, args.devices)
    elapsed = time.perf_counter() - start

    openssl_result = _openssl_verify(ca, certificates[0].certificate)

    list_ = statuslist.StatusList(list_id=0, size=capacity)
    revoked = sorted(c.status_position.index for c in certificates[: args.revoke] if c.status_position)
    delta = m.RevocationDelta(list_id=0, from_sequence=0, to_sequence=1, indices=tuple(revoked),
                              reason=RevocationReason.KEY_COMPROMISE, time=now)
    list_.apply_delta(delta)
    list_id, sequence, size, bits = list_.to_snapshot_fields()
    snapshot = m.RevocationSnapshot(list_id=list_id, sequence=sequence, size=size, bits=bits, time=now)

    ordered = sorted(latencies)
    out.table(
        "summary",
        [
            ("devices provisioned", f"{len(certificates)} / {args.devices}"),
            ("issuance rate (key + CSR + encode + verify + sign + decode)", f"{len(certificates) / elapsed:,.0f} /s"),
            ("latency p50 / p99", f"{ordered[len(ordered) // 2] * 1e3:.2f} ms / "
                                  f"{ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3:.2f} ms"),
            ("request size (P-256 CSR)", f"{statistics.mean(request_sizes):.0f} B"),
            ("issued reply size", f"{statistics.mean(reply_sizes):.0f} B "
                                  f"(certificate {len(certificates[0].certificate)} B)"),
            ("renewal days used / busiest day", f"{len(renew_days)} days / {max(renew_days.values())} devices"),
            ("openssl verify -x509_strict -purpose sslclient", openssl_result),
            (f"revoked {len(revoked)}: delta / snapshot", f"{len(codec.encode(delta))} B / "
                                                          f"{len(codec.encode(snapshot))} B for {capacity:,} entries"),
        ],
    )
    return 0 if len(certificates) == args.devices and openssl_result == "OK" else 1


def _openssl_verify(ca: object, der: bytes) -> str:
    if shutil.which("openssl") is None:
        return "openssl not installed"
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "root.pem").write_bytes(ca.root.public_bytes(serialization.Encoding.PEM))  # type: ignore[attr-defined]
        (d / "issuing.pem").write_bytes(ca.issuing.public_bytes(serialization.Encoding.PEM))  # type: ignore[attr-defined]
        (d / "cert.pem").write_bytes(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM))
        res = subprocess.run(
            ["openssl", "verify", "-x509_strict", "-purpose", "sslclient", "-CAfile", d / "root.pem",
             "-untrusted", d / "issuing.pem", d / "cert.pem"],
            capture_output=True, text=True,
        )
        return "OK" if res.returncode == 0 else f"FAILED: {res.stdout.strip()} {res.stderr.strip()}"


class _Printer:
    """rich output when it is installed (broker extra), plain text otherwise."""

    def __init__(self) -> None:
        try:
            from rich.console import Console
            from rich.progress import Progress
        except ImportError:
            self._console = None
            return
        self._console = Console()
        self._progress_cls = Progress
        self._progress = None

    def title(self, text: str) -> None:
        if self._console:
            self._console.rule(f"[bold]{text}")
        else:
            print(f"== {text} ==")

    def line(self, text: str) -> None:
        (self._console.print if self._console else print)(text)

    def progress(self, done: int, total: int) -> None:
        if not self._console:
            if done == total or done % max(1, total // 10) == 0:
                print(f"  provisioned {done}/{total}")
            return
        if self._progress is None:
            self._progress = self._progress_cls(console=self._console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task("provisioning devices", total=total)
        self._progress.update(self._task, completed=done)
        if done == total:
            self._progress.stop()

    def table(self, title: str, rows: list[tuple[str, str]]) -> None:
        if self._console:
            from rich.table import Table

            table = Table(title=title)
            table.add_column("what")
            table.add_column("result", justify="right")
            for k, v in rows:
                table.add_row(k, v)
            self._console.print(table)
        else:
            width = max(len(k) for k, _ in rows)
            print(f"-- {title} --")
            for k, v in rows:
                print(f"{k:<{width}}  {v}")
