"""``certmq device``: factory provisioning and inspection of a device's certificate store.

::

    certmq device keygen --dir D --device-id ID [--profile identity] [--key-type p256]
    certmq device csr    --dir D --device-id ID [--profile identity] [--out FILE]
    certmq device import --dir D --ca-bundle CA.pem --cert CERT.pem [--chain CHAIN.pem] [--profile identity]
    certmq device status --dir D --ca-bundle CA.pem [--json]

``keygen`` and ``csr`` are the same step (a key is only ever made together with
its CSR); both print the CSR path. Keys go to ``D/keys`` (mode 0600).
Exit status 0 on success, 1 when the input is refused (the message says why), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from protocol.codes import Profile
from protocol.errors import CertmqError

from .certstore import CertStore
from .enroll import load_certificates
from .factory import import_certificate, make_csr
from .keystore import KEY_TYPES, FileKeyStore

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``device`` subcommands to ``parser``."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (("keygen", "generate a key and its CSR (factory provisioning)"),
                       ("csr", "write the pending CSR (generating the key if needed)"),
                       ("import", "validate an issued certificate and stage it"),
                       ("status", "show the store's certificates")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--dir", required=True, type=Path, help="the device's certificate store directory")
        p.add_argument("--profile", default="identity", type=Profile.from_label, help="identity, encryption or ota-signing")
        p.add_argument("--ca-bundle", type=Path, help="PEM file of the tenant CA certificates")
        if name in ("keygen", "csr"):
            p.add_argument("--device-id", required=True)
            p.add_argument("--key-type", default="p256", choices=KEY_TYPES)
            p.add_argument("--out", type=Path, help="CSR file (default DIR/<profile>.csr.pem)")
        if name == "import":
            p.add_argument("--cert", required=True, type=Path)
            p.add_argument("--chain", type=Path)
        if name == "status":
            p.add_argument("--json", action="store_true")


def _store(args: argparse.Namespace, device_id: str | None = None) -> CertStore:
    trust = load_certificates(args.ca_bundle.read_bytes()) if args.ca_bundle else []
    return CertStore(directory=args.dir, keystore=FileKeyStore(directory=args.dir / "keys"), trust=trust,
                     device_id=device_id)


def run(args: argparse.Namespace) -> int:
    """Run one ``certmq device`` action; returns the exit status."""
    now = datetime.now(timezone.utc)
    try:
        if args.action in ("keygen", "csr"):
            path = make_csr(_store(args, args.device_id), device_id=args.device_id, profile=args.profile, now=now,
                            key_type=args.key_type, out=args.out)
            print(path)
            return 0
        if args.ca_bundle is None:
            print(f"certmq device {args.action}: --ca-bundle is required", file=sys.stderr)
            return 2
        store = _store(args)
        if args.action == "import":
            chain = args.chain.read_bytes() if args.chain else None
            slot = import_certificate(store, profile=args.profile, certificate=args.cert.read_bytes(), now=now, chain=chain)
            print(f"staged {args.profile.label} certificate serial {slot.serial:x}, valid until "
                  f"{slot.not_after.isoformat()}; the first connection makes it current")
            return 0
        rows = []
        for profile in store.profiles():
            for which in ("current", "next", "previous"):
                slot = getattr(store, which)(profile)
                if slot is not None:
                    rows.append({"profile": profile.label, "slot": which, "serial": f"{slot.serial:x}",
                                 "not_after": slot.not_after.isoformat(),
                                 "days_to_expiry": round((slot.not_after - now).total_seconds() / 86400, 1)})
            pending = store.pending(profile)
            if pending is not None:
                rows.append({"profile": profile.label, "slot": "pending", "kind": pending.kind,
                             "request_id": pending.request_id.hex()})
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            for row in rows:
                print("  ".join(f"{k}={v}" for k, v in row.items()))
        return 0
    except (CertmqError, OSError, ValueError) as exc:
        print(f"certmq device {args.action}: {exc}", file=sys.stderr)
        return 1
