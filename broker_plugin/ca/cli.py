"""``certmq ca ...`` and ``certmq audit ...``: the operator's commands for the CA.

Every command works on a data directory (:mod:`.datadir`), prints what it did, and on bad
input prints one clear reason to stderr, exits non-zero and changes nothing. Commands that
issue or revoke go through the CA service core (``broker_plugin.ca.service``), so the CLI
records, audits and refuses exactly like the broker does.

This module parses arguments and formats output; decisions live in the service and the
data directory code.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protocol.codes import Profile, RevocationReason
from protocol.errors import CertmqError

from . import datadir as dd
from .signers import KeyAlgorithm, SignerError, resolve_passphrase

__all__ = ["AUDIT_COMMAND", "CA_COMMAND", "configure", "configure_audit", "run", "run_audit"]

#: ``certmq ca`` and ``certmq audit`` dispatch through these names in :data:`broker_plugin.cli.COMMANDS`.
CA_COMMAND = "ca"
AUDIT_COMMAND = "audit"

_PROGRESS_EVERY = 100


class UsageError(CertmqError):
    """Arguments that parse but make no sense together (exit status 2)."""


def _reason_names() -> dict[str, RevocationReason]:
    # RFC 5280 spells them keyCompromise, cessationOfOperation, ...
    names = {}
    for reason in RevocationReason:
        head, *rest = reason.name.lower().split("_")
        names[head + "".join(w.title() for w in rest)] = reason
    names["cACompromise"] = RevocationReason.CA_COMPROMISE
    names["aACompromise"] = RevocationReason.AA_COMPROMISE
    return names


REASONS = _reason_names()


# -- argument parsing ---------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, *, keys: bool) -> None:
    p.add_argument("--data", metavar="DIR", help="data directory (default: $CERTMQ_DATA or ./certmq-data)")
    if keys:
        src = p.add_mutually_exclusive_group()
        src.add_argument("--passphrase-env", metavar="VAR", help="environment variable holding the CA key passphrase (HSM: user PIN)")
        src.add_argument("--passphrase-file", metavar="FILE", help="file (mode 0600) holding the CA key passphrase (HSM: user PIN)")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``certmq ca`` (or, when ``parser.prog`` ends in ``audit``, ``certmq audit``) sub-commands.

    One module serves both entries of :data:`broker_plugin.cli.COMMANDS`; the parser's prog says which.
    """
    if parser.prog.split()[-1] == AUDIT_COMMAND:
        configure_audit(parser)
        return
    parser.set_defaults(_certmq_command=CA_COMMAND)
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = sub.add_parser("init", help="create a tenant's root and issuing CA")
    p.add_argument("--tenant", required=True)
    p.add_argument("--algorithm", default="p256", choices=[a.value for a in KeyAlgorithm])
    p.add_argument("--pkcs11-uri", metavar="URI", help="keep the CA keys on a PKCS#11 token (pkcs11:token=...;object=...)")
    p.add_argument("--policy", metavar="FILE", type=Path, help="tenant policy (.toml or .json)")
    _common(p, keys=True)

    p = sub.add_parser("list", help="list the tenants of the data directory")
    _common(p, keys=False)

    p = sub.add_parser("policy", help="change a tenant's policy")
    psub = p.add_subparsers(dest="policy_action", required=True, metavar="ACTION")
    ps = psub.add_parser("set", help="replace a tenant's policy (validated, audited)")
    ps.add_argument("--tenant", required=True)
    ps.add_argument("--file", required=True, type=Path)
    _common(ps, keys=False)

    p = sub.add_parser("claim", help="claim (bootstrap) credentials")
    csub = p.add_subparsers(dest="claim_action", required=True, metavar="ACTION")
    ca = csub.add_parser("add", help="register a claim credential and mint its bootstrap key and certificate")
    ca.add_argument("--tenant", required=True)
    ca.add_argument("--claim-id", required=True)
    sel = ca.add_mutually_exclusive_group(required=True)
    sel.add_argument("--devices", metavar="ID,ID,...", help="device ids the claim may provision")
    sel.add_argument("--pattern", metavar="GLOB", help="shell-style pattern the device ids must match, e.g. 'sensor-*'")
    ca.add_argument("--max-uses", type=int, required=True)
    ca.add_argument("--until", required=True, metavar="DATE", help="YYYY-MM-DD (end of that day, UTC) or an ISO time")
    ca.add_argument("--region")
    ca.add_argument("--out", required=True, type=Path, metavar="DIR", help="where the bootstrap key and certificate go")
    _common(ca, keys=True)

    p = sub.add_parser("sign-batch", help="sign a directory or manifest of CSRs offline (factory)")
    p.add_argument("--tenant", required=True)
    p.add_argument("--profile", default="identity", choices=[pr.label for pr in Profile])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dir", type=Path, metavar="CSR_DIR", help="<device_id>.csr files, PEM or DER")
    src.add_argument("--manifest", type=Path, metavar="FILE.json", help='[{"device_id": ..., "csr_path": ...}, ...]')
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.add_argument("--workers", type=int, default=1, help="signing processes (default 1: sign in this process)")
    _common(p, keys=True)

    p = sub.add_parser("revoke", help="revoke by serial, or a device's certificates")
    p.add_argument("--tenant", required=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", metavar="HEX")
    which.add_argument("--device", metavar="ID")
    p.add_argument("--profile", choices=[pr.label for pr in Profile], help="with --device: only this profile")
    p.add_argument("--reason", required=True, choices=sorted(REASONS), metavar="REASON",
                   help="RFC 5280 reason: " + ", ".join(sorted(REASONS)))
    _common(p, keys=True)

    p = sub.add_parser("crl", help="write a tenant's CRL (DER)")
    p.add_argument("--tenant", required=True)
    p.add_argument("--region")
    p.add_argument("--delta", action="store_true", help="a delta CRL")
    p.add_argument("--out", required=True, type=Path)
    _common(p, keys=True)


def configure_audit(parser: argparse.ArgumentParser) -> None:
    """Add the ``certmq audit`` sub-commands to ``parser``."""
    parser.set_defaults(_certmq_command=AUDIT_COMMAND)
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("verify", help="check the hash chain; exit 1 and name the first bad entry")
    _common(p, keys=False)
    p = sub.add_parser("export", help="write the audit trail as JSON lines")
    p.add_argument("--out", type=Path, help="file (default: standard output)")
    _common(p, keys=False)


# -- helpers ------------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _passphrase(args: argparse.Namespace) -> bytes | None:
    if getattr(args, "passphrase_env", None):
        return resolve_passphrase(env=args.passphrase_env)
    if getattr(args, "passphrase_file", None):
        return resolve_passphrase(file=args.passphrase_file)
    return None


def _datadir(args: argparse.Namespace) -> Path:
    return dd.resolve_datadir(args.data)


def _out(text: str = "") -> None:
    print(text, flush=True)


def _fail(prog: str, exc: BaseException, status: int = 1) -> int:
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return status


def _write_new(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), mode)
        fh.write(data)


def _empty_out_dir(path: Path, what: str) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"{what} {path} exists and is not an empty directory; nothing written")


async def _service(datadir: Path, passphrase: bytes | None, tenant: str, *, workers: int = 1) -> tuple[Any, Any, Any]:
    """(service, registry, signer) for ``tenant``; the caller closes signer and registry."""
    from .service import CAService  # the service core: imported only by the commands that need it
    from .signing import InlineSigner

    authorities = dd.load_authorities(datadir, passphrase=passphrase, only=tenant)
    if workers > 1:
        from .pool import ProcessPoolSigner

        signer: Any = ProcessPoolSigner(dd.authority_material(datadir, passphrase=passphrase, only=tenant), workers=workers)
    else:
        signer = InlineSigner(authorities)
    registry = await dd.open_datadir_registry(datadir)
    service = CAService(registry=registry, authorities=authorities, signer=signer,
                        clock=lambda: dt.datetime.now(dt.UTC), rng_bytes=os.urandom)
    return service, registry, signer


async def _close(registry: Any, signer: Any) -> None:
    try:
        await signer.close()
    finally:
        await registry.close()


# -- ca commands --------------------------------------------------------------------------


async def _init(args: argparse.Namespace) -> int:
    data = _datadir(args)
    passphrase = _passphrase(args)
    info = await dd.init_tenant(data, args.tenant, algorithm=args.algorithm, passphrase=passphrase,
                                key_uri=args.pkcs11_uri, policy=args.policy, now=_now())
    _out(f"created tenant {info.name} ({info.algorithm}) in {info.directory}")
    for name in sorted(p.name for p in info.directory.iterdir()):
        _out(f"  {info.directory / name}")
    _out(f"issuing CA key: {info.key_location}")
    _out(f"root fingerprint (SHA-256): {info.root_fingerprint}")
    _out(f"chain (issuing + root) for devices and servers: {info.chain_path}")
    _out(f"registry: {dd.registry_url(data)}")
    return 0


async def _list(args: argparse.Namespace) -> int:
    tenants = dd.list_tenants(_datadir(args))
    if not tenants:
        _out("no tenants")
    for t in tenants:
        _out(f"{t.name}\t{t.algorithm}\tissuing CA until {t.issuing_not_after:%Y-%m-%d}\t{t.key_location}")
        _out(f"\troot SHA-256 {t.root_fingerprint}")
    return 0


async def _policy_set(args: argparse.Namespace) -> int:
    policy = await dd.set_policy(_datadir(args), args.tenant, args.file, now=_now())
    offered = ", ".join(p.label for p in policy.profiles)
    _out(f"policy of tenant {args.tenant} replaced from {args.file} (profiles: {offered}; "
         f"keys: {', '.join(policy.key_policy.allowed)}); audited")
    return 0


def _until(text: str) -> dt.datetime:
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            day = dt.date.fromisoformat(text)
            return dt.datetime.combine(day, dt.time(23, 59, 59), dt.UTC)
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--until {text!r} is not a date (YYYY-MM-DD) or ISO time") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


async def _claim_add(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from broker_plugin.store.base import CertificateKind

    from .claims import ClaimPolicy
    from .policy import format_validation_error

    until = _until(args.until)
    if until <= _now():
        raise UsageError(f"--until {args.until} is in the past")
    try:
        policy = ClaimPolicy(
            device_ids=[d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None,
            pattern=args.pattern, max_uses=args.max_uses, not_after=until, region=args.region,
        )
    except ValidationError as exc:
        raise UsageError("bad claim policy:\n" + format_validation_error(exc)) from None
    _empty_out_dir(args.out, "--out")
    data = _datadir(args)
    service, registry, signer = await _service(data, _passphrase(args), args.tenant)
    try:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, args.claim_id)]))
               .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
        actor = "certmq ca claim add"
        await service.register_claim(tenant=args.tenant, claim_id=args.claim_id, policy=policy, actor=actor)
        record = await service.issue_direct(tenant=args.tenant, device_id=args.claim_id, profile=Profile.IDENTITY,
                                            csr_der=csr, kind=CertificateKind.BOOTSTRAP, region=args.region, actor=actor)
    finally:
        await _close(registry, signer)
    args.out.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = args.out / f"{args.claim_id}.key.pem", args.out / f"{args.claim_id}.pem"
    _write_new(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()), 0o600)
    _write_new(cert_path, x509.load_der_x509_certificate(record.der).public_bytes(serialization.Encoding.PEM))
    _write_new(args.out / "chain.pem", (dd.tenant_dir(data, args.tenant) / "chain.pem").read_bytes())
    scope = f"device ids {', '.join(policy.device_ids)}" if policy.device_ids else f"device ids matching {policy.pattern!r}"
    _out(f"claim {args.claim_id} registered for tenant {args.tenant}: {scope}, at most {policy.max_uses} use(s), "
         f"until {until:%Y-%m-%dT%H:%M:%SZ}")
    _out(f"bootstrap certificate serial {record.serial:x}, valid until {record.not_after:%Y-%m-%dT%H:%M:%SZ}")
    _out(f"  key (mode 0600): {key_path}\n  certificate:     {cert_path}\n  CA chain:        {args.out / 'chain.pem'}")
    return 0


def _read_csr(path: Path) -> bytes:
    raw = path.read_bytes()
    if b"-----BEGIN" in raw:
        try:
            return x509.load_pem_x509_csr(raw).public_bytes(serialization.Encoding.DER)
        except ValueError as exc:
            raise ValueError(f"{path.name}: not a PEM CSR: {exc}") from None
    return raw  # DER: the service checks it like any other CSR


def _batch_inputs(args: argparse.Namespace) -> list[tuple[str, Path]]:
    if args.dir is not None:
        if not args.dir.is_dir():
            raise UsageError(f"--dir {args.dir} is not a directory")
        items = [(p.stem, p) for p in sorted(args.dir.glob("*.csr"))]
        if not items:
            raise UsageError(f"--dir {args.dir} holds no *.csr files")
        return items
    try:
        entries = json.loads(args.manifest.read_text("utf-8"))
    except OSError as exc:
        raise UsageError(f"--manifest {args.manifest}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"--manifest {args.manifest}: not valid JSON: {exc}") from None
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"--manifest {args.manifest}: must be a non-empty JSON list of {{device_id, csr_path}}")
    items = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("device_id"), str) or not isinstance(e.get("csr_path"), str):
            raise UsageError(f"--manifest {args.manifest}: entry {i} needs string fields device_id and csr_path")
        path = Path(e["csr_path"])
        items.append((e["device_id"], path if path.is_absolute() else args.manifest.parent / path))
    return items


async def _sign_batch(args: argparse.Namespace) -> int:
    from broker_plugin.store.base import CertificateKind

    items = _batch_inputs(args)
    seen: set[str] = set()
    for device_id, _ in items:
        if device_id in seen:
            raise UsageError(f"device id {device_id!r} appears twice in the batch; nothing signed")
        seen.add(device_id)
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    _empty_out_dir(args.out, "--out")
    profile = Profile.from_label(args.profile)
    service, registry, signer = await _service(_datadir(args), _passphrase(args), args.tenant, workers=args.workers)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest: list[dict[str, Any]] = []
    total, done = len(items), 0

    async def one(device_id: str, path: Path) -> dict[str, Any]:
        entry: dict[str, Any] = {"device_id": device_id, "serial": None, "not_after": None, "status": "refused", "error": None}
        try:
            if "/" in device_id or device_id.startswith("."):
                raise ValueError(f"device id {device_id!r} cannot name a file")
            csr = _read_csr(path)
            record = await service.issue_direct(tenant=args.tenant, device_id=device_id, profile=profile, csr_der=csr,
                                                kind=CertificateKind.FACTORY, actor="certmq ca sign-batch")
        except (CertmqError, ValueError, OSError) as exc:
            entry["error"] = str(exc)
            return entry
        _write_new(args.out / f"{device_id}.pem", x509.load_der_x509_certificate(record.der).public_bytes(serialization.Encoding.PEM))
        entry.update(serial=f"{record.serial:x}", not_after=record.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"), status="issued")
        return entry

    try:
        step = max(args.workers * 32, 1)
        for start in range(0, total, step):
            chunk = items[start:start + step]
            manifest.extend(await asyncio.gather(*(one(d, p) for d, p in chunk)))
            done += len(chunk)
            if total > _PROGRESS_EVERY and (done % _PROGRESS_EVERY < step or done == total):
                print(f"  {done}/{total} processed", file=sys.stderr, flush=True)
    finally:
        await _close(registry, signer)
        if manifest:
            (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    refused = [e for e in manifest if e["status"] != "issued"]
    _out(f"signed {total - len(refused)} of {total} CSR(s) for tenant {args.tenant} ({profile.label}); "
         f"manifest: {args.out / 'manifest.json'}")
    for e in refused:
        _out(f"  refused {e['device_id']}: {e['error']}")
    return 1 if refused else 0


async def _revoke(args: argparse.Namespace) -> int:
    serial = None
    if args.serial is not None:
        try:
            serial = int(args.serial.replace(":", ""), 16)
        except ValueError:
            raise UsageError(f"--serial {args.serial!r} is not hexadecimal") from None
    if args.profile and not args.device:
        raise UsageError("--profile only goes with --device")
    service, registry, signer = await _service(_datadir(args), _passphrase(args), args.tenant)
    try:
        outcome = await service.revoke(tenant=args.tenant, reason=REASONS[args.reason], actor="certmq ca revoke",
                                       serial=serial, device_id=args.device,
                                       profile=Profile.from_label(args.profile) if args.profile else None)
    finally:
        await _close(registry, signer)
    revoked = _revoked_serials(outcome)
    if revoked is not None and not revoked:
        _out(f"nothing to revoke: no active certificate matched in tenant {args.tenant}")
        return 1
    listed = ", ".join(f"{s:x}" if isinstance(s, int) else str(s) for s in revoked or [])
    _out(f"revoked in tenant {args.tenant} ({args.reason}): {listed or outcome}")
    return 0


def _revoked_serials(outcome: Any) -> list[Any] | None:
    for name in ("revoked_serials", "serials", "revoked"):
        value = getattr(outcome, name, None)
        if value is not None:
            return [getattr(v, "serial", v) for v in value]
    if isinstance(outcome, list):
        return [getattr(v, "serial", v) for v in outcome]
    return None


async def _crl(args: argparse.Namespace) -> int:
    if args.out.exists() and args.out.is_dir():
        raise UsageError(f"--out {args.out} is a directory")
    service, registry, signer = await _service(_datadir(args), _passphrase(args), args.tenant)
    try:
        crl = await service.crl(tenant=args.tenant, region=args.region, delta=args.delta)
    finally:
        await _close(registry, signer)
    args.out.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    kind = "delta CRL" if args.delta else "CRL"
    _out(f"{kind} number {number} of tenant {args.tenant}{' region ' + args.region if args.region else ''}: "
         f"{len(crl)} revoked, next update {crl.next_update_utc:%Y-%m-%dT%H:%M:%SZ}; written to {args.out} (DER)")
    return 0


# -- audit commands -----------------------------------------------------------------------


async def _audit_verify(args: argparse.Namespace) -> int:
    registry = await dd.open_datadir_registry(_datadir(args))
    try:
        result = await registry.verify_audit()
        seq, head = await registry.audit_head()
    finally:
        await registry.close()
    if result.ok:
        _out(f"audit trail OK: {result.checked} entries, head seq {seq} hash {head.hex()}")
        return 0
    print(f"audit trail BROKEN at seq {result.bad_seq}: {result.problem} ({result.detail}); "
          f"{result.checked} entries before it verified", file=sys.stderr)
    return 1


async def _audit_export(args: argparse.Namespace) -> int:
    from broker_plugin.store.audit import export_jsonl

    registry = await dd.open_datadir_registry(_datadir(args))
    try:
        entries = [e async for e in registry.audit_entries()]
    finally:
        await registry.close()
    if args.out is None:
        export_jsonl(entries, sys.stdout)
    else:
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            n = export_jsonl(entries, fh)
        os.replace(tmp, args.out)
        print(f"exported {n} audit entries to {args.out}", file=sys.stderr)
    return 0


_CA_ACTIONS = {"init": _init, "list": _list, "sign-batch": _sign_batch, "revoke": _revoke, "crl": _crl}


def _dispatch(prog: str, coro_fn: Any, args: argparse.Namespace) -> int:
    try:
        return int(asyncio.run(coro_fn(args)))
    except UsageError as exc:
        return _fail(prog, exc, 2)
    except (CertmqError, SignerError, ValueError, OSError) as exc:
        return _fail(prog, exc)
    except ImportError as exc:
        return _fail(prog, f"this command needs {exc.name!r}, which is not available: {exc}")


def run(args: argparse.Namespace) -> int:
    """Run ``certmq ca ACTION`` (or ``certmq audit ACTION``); the exit status."""
    if getattr(args, "_certmq_command", CA_COMMAND) == AUDIT_COMMAND:
        return run_audit(args)
    if args.action == "policy":
        return _dispatch("certmq ca policy set", _policy_set, args)
    if args.action == "claim":
        return _dispatch("certmq ca claim add", _claim_add, args)
    return _dispatch(f"certmq ca {args.action}", _CA_ACTIONS[args.action], args)


def run_audit(args: argparse.Namespace) -> int:
    """Run ``certmq audit ACTION``; the exit status."""
    fn = _audit_verify if args.action == "verify" else _audit_export
    return _dispatch(f"certmq audit {args.action}", fn, args)


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - convenience for python -m
    """``python -m broker_plugin.ca.cli ...`` = ``certmq ca ...``."""
    parser = argparse.ArgumentParser(prog="certmq ca")
    configure(parser)
    return run(parser.parse_args(argv))
