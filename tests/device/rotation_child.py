"""Helper process for the crash test: rotate certificates in many device directories and die mid-way.

``python rotation_child.py run WORKDIR DEVICES SEED`` -- create a CA and DEVICES device
stores with a current certificate, count the fault points of one rotation, then for each
device fork a child that rotates with the process killed at a fault point (every point in
turn, then random ones) or by SIGKILL at a random moment. Prints a JSON summary.

``python rotation_child.py verify WORKDIR`` -- in a fresh process, open every store, check
the current certificate is usable (key matches, chain verifies), then rotate once more
without faults and check again. Prints JSON {device: "ok" | error}.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_client import faults
from device_client.certstore import CertStore
from device_client.enroll import build_csr, load_certificates
from device_client.keystore import FileKeyStore
from protocol.codes import Profile

NOW = datetime(2026, 3, 1, tzinfo=timezone.utc)


def _issuer(workdir: Path):  # type: ignore[no-untyped-def]
    from broker_plugin.ca.authority import create_tenant_ca
    from broker_plugin.ca.issuer import Issuer
    from broker_plugin.ca.policy import TenantPolicy

    key_path = workdir / "ca.key"
    if key_path.exists():
        issuing_key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        issuing = load_certificates((workdir / "issuing.pem").read_bytes())[0]
    else:
        issuing_key = ec.generate_private_key(ec.SECP256R1())
        ca = create_tenant_ca(tenant="acme", root_key=ec.generate_private_key(ec.SECP256R1()), issuing_key=issuing_key,
                              now=NOW - timedelta(days=30))
        issuing = ca.issuing
        key_path.write_bytes(issuing_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
        (workdir / "issuing.pem").write_bytes(ca.issuing.public_bytes(serialization.Encoding.PEM))
        (workdir / "trust.pem").write_bytes(ca.chain_pem())
    return Issuer(ca_certificate=issuing, ca_key=issuing_key, tenant_policy=TenantPolicy(name="acme"))


def _open(device: Path, trust: list[x509.Certificate]) -> CertStore:
    return CertStore(directory=device, keystore=FileKeyStore(directory=device / "keys"), trust=trust,
                     device_id=device.name)


def rotate(device: Path, issuer, trust: list[x509.Certificate], now: datetime) -> None:  # type: ignore[no-untyped-def]
    from broker_plugin.ca.issuer import random_serial

    store = _open(device, trust)
    label, key = store.new_key(Profile.IDENTITY)
    csr = x509.load_der_x509_csr(build_csr(key, device_id=device.name))
    cert = issuer.issue(device_id=device.name, profile=Profile.IDENTITY, public_key=csr.public_key(),
                        serial=random_serial(os.urandom), not_before=now, status_position=None, region=None,
                        capabilities=None)
    store.stage(Profile.IDENTITY, certificate=cert, chain=[issuer.ca_certificate], key_label=label, now=now)

    async def prove(slot):  # type: ignore[no-untyped-def]
        return None

    asyncio.run(store.promote(Profile.IDENTITY, prove, now=now))


def run(workdir: Path, devices: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    issuer = _issuer(workdir)
    trust = load_certificates((workdir / "trust.pem").read_bytes())
    names = []
    for i in range(devices):
        device = workdir / f"dev-{i:03d}"
        device.mkdir()
        rotate(device, issuer, trust, NOW)
        names.append(device)
    # count the points of one rotation in a scratch copy
    scratch = workdir / "scratch"
    scratch.mkdir()
    rotate(scratch, issuer, trust, NOW)
    hit: list[str] = []
    faults.set_hook(hit.append)
    rotate(scratch, issuer, trust, NOW + timedelta(hours=1))
    faults.set_hook(None)
    point_names = list(hit)
    total = len(point_names)
    outcomes = {"fault_exits": 0, "sigkills": 0, "completed": 0, "points": total, "point_names": sorted(set(point_names))}
    killed_at: set[int] = set()

    def child(device: Path, spec: str | None, when: datetime) -> None:
        faults.arm(spec)
        try:
            rotate(device, issuer, trust, when)
        except BaseException as exc:  # noqa: BLE001 - report and die like a crash
            print(f"{device.name}: {exc!r}", file=sys.stderr)
            os._exit(3)
        os._exit(0)

    for i, device in enumerate(names):
        when = NOW + timedelta(hours=2 + i % 3)
        jobs: list[tuple[str, object]] = []
        index = i % total + 1 if i < 2 * total else rng.randint(1, total)
        jobs.append(("fault", str(index)))
        if i % 5 == 0:
            jobs.append(("sigkill", rng.uniform(0.0, 0.02)))
        for kind, arg in jobs:
            pid = os.fork()
            if pid == 0:
                child(device, str(arg) if kind == "fault" else None, when)
            if kind == "sigkill":
                time.sleep(float(arg))  # type: ignore[arg-type]
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _, status = os.waitpid(pid, 0)
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                outcomes["sigkills"] += 1  # type: ignore[operator]
            elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == faults.FAULT_EXIT_CODE:
                outcomes["fault_exits"] += 1  # type: ignore[operator]
                killed_at.add(int(arg) if kind == "fault" else -1)  # type: ignore[arg-type]
            elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                outcomes["completed"] += 1  # type: ignore[operator]
            else:
                raise SystemExit(f"child for {device.name} failed unexpectedly: status {status}")
    outcomes["indices_killed"] = sorted(killed_at)
    return outcomes


def verify(workdir: Path) -> dict[str, str]:
    issuer = _issuer(workdir)
    trust = load_certificates((workdir / "trust.pem").read_bytes())
    now = NOW + timedelta(days=1)
    result: dict[str, str] = {}
    for device in sorted(workdir.glob("dev-*")):
        try:
            store = _open(device, trust)
            store.check_usable(Profile.IDENTITY, now=now)
            # no leftovers: only the live slots and their keys remain after opening
            live = {s.slot_id for s in (store.current(), store.next(), store.previous()) if s is not None}
            assert {p.name for p in (device / "slots").iterdir()} == live, "garbage slots left"
            rotate(device, issuer, trust, now)
            _open(device, trust).check_usable(Profile.IDENTITY, now=now)
            result[device.name] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported to the test
            result[device.name] = f"{type(exc).__name__}: {exc}"
    return result


if __name__ == "__main__":
    mode, workdir = sys.argv[1], Path(sys.argv[2])
    if mode == "run":
        print(json.dumps(run(workdir, int(sys.argv[3]), int(sys.argv[4]))))
    else:
        print(json.dumps(verify(workdir)))
