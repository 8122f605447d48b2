"""Wire sizes of certmq messages, beside the JSON + base64 equivalent of the same message.

Run: ``./dev bench sizes`` (or ``.venv/bin/python bench/sizes.py [--n 10000000]``).

Checks the foundation issue's goals and exits non-zero if one is missed:

- a certificate request carrying a P-256 CSR is <= 300 bytes;
- a certificate-issued reply carrying a 549-byte certificate is <= 600 bytes;
- a delta of 1,000 random indices among 10,000,000 averages <= 8 bytes per index;
- a snapshot of 10,000,000 entries with 1 % revoked is <= 1.1 x the entropy bound
  n*H(p)/8 (0.1 % and 10 % printed too).

The certificate is a real ``identity`` certificate from certmq's issuer (P-256 CA,
P-256 device key, every extension certmq puts in); its size varies by a byte or two
with the ECDSA signature, so the reply's overhead over the certificate is what is
checked: 549 + overhead <= 600.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from protocol import codec  # noqa: E402
from protocol import messages as m  # noqa: E402
from protocol.codes import Profile, RevocationReason  # noqa: E402
from protocol.renewal import RenewalWindow  # noqa: E402

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 11, 27, tzinfo=UTC)
DEVICE = "sensor-000000042"


def json_b64(message: m.Message) -> bytes:
    """The same message as a JSON API would carry it: field names, base64 bytes, ISO times."""

    def value(v: Any) -> Any:
        if isinstance(v, bytes):
            return base64.b64encode(v).decode()
        if isinstance(v, dt.datetime):
            return v.isoformat().replace("+00:00", "Z")
        if isinstance(v, (tuple, list)):
            return [value(x) for x in v]
        if isinstance(v, Profile):
            return v.label
        if isinstance(v, RevocationReason):
            return v.name.lower()
        if hasattr(v, "__dataclass_fields__"):
            return {k: value(getattr(v, k)) for k in v.__dataclass_fields__ if getattr(v, k) is not None}
        return v

    body = {"version": 1, "type": type(message).__name__, **value(message)}
    if isinstance(message, m.CertificateIssued):
        # JSON has no certificate parser to lean on: it carries serial and validity itself.
        body.update(serial=str(message.serial), not_before=value(message.not_before), not_after=value(message.not_after))
    return json.dumps(body, separators=(",", ":")).encode()


def device_csr() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.DER)


def identity_certificate(device_key: ec.EllipticCurvePrivateKey) -> bytes:
    """A certificate as certmq's CA issues it (falls back to a plain one without the CA package)."""
    from broker_plugin.ca.authority import create_tenant_ca
    from broker_plugin.ca.issuer import Issuer, random_serial
    from broker_plugin.ca.policy import load_tenant_policy

    root_key = ec.generate_private_key(ec.SECP256R1())
    issuing_key = ec.generate_private_key(ec.SECP256R1())
    ca = create_tenant_ca(tenant="acme", root_key=root_key, issuing_key=issuing_key, now=NOW)
    issuer = Issuer(
        ca_certificate=ca.issuing,
        ca_key=issuing_key,
        tenant_policy=load_tenant_policy({"name": "acme"}),
    )
    cert = issuer.issue(
        device_id=DEVICE,
        profile=Profile.IDENTITY,
        public_key=device_key.public_key(),
        serial=random_serial(os.urandom),
        not_before=NOW,
        status_position=(0, 100_000),
        region="eu-west",
        capabilities=None,
    )
    return cert.public_bytes(serialization.Encoding.DER)


def row(name: str, message: m.Message, goal: str, ok: bool, note: str = "") -> dict[str, Any]:
    cbor = len(codec.encode(message))
    js = len(json_b64(message))
    return {"name": name, "cbor": cbor, "json": js, "goal": goal, "ok": ok, "note": note}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000_000, help="status-list size for snapshot/delta rows")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    rows: list[dict[str, Any]] = []

    device_key, csr = device_csr()
    request = m.CertificateRequest(
        request_id=rng.randbytes(16),
        profile=Profile.IDENTITY,
        csr=csr,
        provisioning=m.ProvisioningParameters(device_id=DEVICE, region="eu-west"),
    )
    size = len(codec.encode(request))
    rows.append(row(f"CertificateRequest (P-256 CSR, {len(csr)} B)", request, "<= 300 B", size <= 300))

    cert = identity_certificate(device_key)
    issued = m.CertificateIssued(
        request_id=request.request_id,
        certificate=cert,
        renewal_window=RenewalWindow(start=NOW + dt.timedelta(days=600), end=NOW + dt.timedelta(days=660)),
    )
    overhead = len(codec.encode(issued)) - len(cert)
    rows.append(
        row(
            f"CertificateIssued ({len(cert)} B certificate)",
            issued,
            "549 B cert: <= 600 B",
            549 + overhead <= 600,
            f"overhead {overhead} B -> {549 + overhead} B with a 549 B certificate",
        )
    )

    renewal = m.RenewalRequest(
        request_id=rng.randbytes(16), profile=Profile.IDENTITY, current_serial=issued.serial, reuse_key=True
    )
    rows.append(row("RenewalRequest (key reuse)", renewal, "", True))
    busy = m.Error(code=30, text="admission queue full", request_id=request.request_id, retry_after=17)
    rows.append(row("Error (busy, retry-after)", busy, "", True))

    indices = tuple(sorted(rng.sample(range(args.n), 1000)))
    delta = m.RevocationDelta(
        list_id=0, from_sequence=41, to_sequence=42, indices=indices, reason=RevocationReason.KEY_COMPROMISE, time=NOW
    )
    per_index = len(codec.encode(delta)) / len(indices)
    rows.append(
        row(
            f"RevocationDelta (1,000 of {args.n:,})",
            delta,
            "<= 8 B/index",
            per_index <= 8,
            f"{per_index:.2f} B per index",
        )
    )

    from statuslist_sizes import snapshot_sizes  # bench/ sibling

    for r in snapshot_sizes(args.n, (0.001, 0.01, 0.1), args.seed):
        # The snapshot's bits are compress() output; its size is what matters here.
        snapshot = m.RevocationSnapshot(
            list_id=0, sequence=42, size=args.n, bits=bytes(r["compressed_bytes"]), time=NOW
        )
        ratio = len(codec.encode(snapshot)) / r["entropy_bytes"]
        checked = r["p"] == 0.01
        rows.append(
            row(
                f"RevocationSnapshot ({args.n:,}, {r['p']:.1%} revoked)",
                snapshot,
                "<= 1.1 x entropy" if checked else "",
                ratio <= 1.1 or not checked,
                f"entropy bound {r['entropy_bytes']:,.0f} B, message / bound = {ratio:.3f}",
            )
        )

    width = max(len(r["name"]) for r in rows)
    print(f"{'message':<{width}}  {'CBOR':>10}  {'JSON+b64':>10}  {'ratio':>6}  goal")
    for r in rows:
        mark = "ok" if r["ok"] else "MISSED"
        print(
            f"{r['name']:<{width}}  {r['cbor']:>10,}  {r['json']:>10,}  {r['json'] / r['cbor']:>6.2f}  "
            f"{r['goal']} {mark if r['goal'] else ''}  {r['note']}"
        )
    missed = [r["name"] for r in rows if not r["ok"]]
    if missed:
        print(f"\nMISSED: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
