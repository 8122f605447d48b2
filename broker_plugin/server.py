"""``certmq broker``: run the hardened amqtt broker with the certmq plugin over a data directory.

What it does, in order: find (or, on a first run, create and loudly announce) the data directory's
tenants; make sure the broker's own TLS server certificate exists (issued by the first tenant's
CA, kept in ``DATA/broker/``); build a TLS context that requires a client certificate from any
tenant; start :class:`~broker_plugin.broker.HardenedBroker` with
:class:`~broker_plugin.plugin.CertmqPlugin` loaded by its dotted path (the same way a plain amqtt
config would); print ``listening on HOST:PORT`` and write ``DATA/broker/ready.json``; stop cleanly
on SIGINT/SIGTERM.

:func:`broker_config` and :func:`tls_context` are the building blocks for embedding the broker
(and for benchmarks). This module knows files, TLS and the CLI; decisions are the plugin's and
the service's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import secrets
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .ca import datadir as dd
from .ca.issuer import signature_hash
from .ca.policy import load_tenant_policy
from .ca.signers import SignerError, resolve_passphrase
from .tlsconf import server_context

__all__ = [
    "DEV_PASSPHRASE_FILE",
    "DEV_TENANT",
    "broker_config",
    "configure",
    "ensure_dev_tenant",
    "ensure_server_certificate",
    "run",
    "serve",
    "tls_context",
]

#: Tenant created on a first run with an empty data directory.
DEV_TENANT = "dev"
#: Where that development CA's generated passphrase is kept (relative to the data directory).
DEV_PASSPHRASE_FILE = "dev-ca-passphrase"
PLUGIN_PATH = "broker_plugin.plugin.CertmqPlugin"
_SERVER_LIFETIME = dt.timedelta(days=365)
_RENEW_BEFORE = dt.timedelta(days=14)
#: OpenSSL's X509_V_FLAG_NO_CHECK_TIME: the identity hook checks validity (expired-certificate recovery).
_NO_CHECK_TIME = 0x200000

_DEV_POLICY = """# certmq development tenant policy (made by `certmq broker` on a first run)
name = "dev"
[profiles.identity]
lifetime = "30d"
renewal_window = [0.6, 0.8]
capabilities = ["telemetry", "cmd"]
allow_key_reuse = true
expired_recovery = "7d"
"""


def _say(text: str = "") -> None:
    print(text, flush=True)


def _box(lines: Sequence[str]) -> str:
    width = max(len(line) for line in lines)
    bar = "!" * (width + 6)
    body = [f"!! {line.ljust(width)} !!" for line in lines]
    return "\n".join([bar, *body, bar])


def ensure_dev_tenant(datadir: Path, *, passphrase: bytes | None) -> bytes | None:
    """If ``datadir`` has no tenant, create the development tenant :data:`DEV_TENANT` and warn loudly.

    Without a passphrase a random one is generated and kept in ``DATA/dev-ca-passphrase`` (0600).
    Returns the passphrase to use (``passphrase``, or the development one when a previous first run
    made it and none was given).
    """
    datadir = Path(datadir)
    secret_path = datadir / DEV_PASSPHRASE_FILE
    if (datadir / "tenants").is_dir() and dd.list_tenants(datadir):
        if passphrase is None and secret_path.exists():
            _say(f"certmq broker: using the DEVELOPMENT CA passphrase in {secret_path} (not for production)")
            return resolve_passphrase(file=secret_path)
        return passphrase
    datadir.mkdir(parents=True, exist_ok=True)
    generated = passphrase is None
    if generated:
        passphrase = secrets.token_urlsafe(32).encode()
        fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(passphrase + b"\n")
    policy_path = datadir / ".dev-policy.toml"
    policy_path.write_text(_DEV_POLICY)
    try:
        info = asyncio.run(dd.init_tenant(datadir, DEV_TENANT, algorithm="p256", passphrase=passphrase,
                                          policy=policy_path, now=dt.datetime.now(dt.UTC).replace(microsecond=0),
                                          actor="certmq broker (first run)"))
    finally:
        policy_path.unlink(missing_ok=True)
    where = str(secret_path) if generated else "the passphrase source you gave"
    print(_box([
        "WARNING: DEVELOPMENT CA CREATED",
        f"No tenant was found in {datadir}, so a development tenant {DEV_TENANT!r} and its CA were made.",
        f"CA key passphrase: {where}",
        f"Root fingerprint (SHA-256): {info.root_fingerprint}",
        f"Chain for clients: {info.chain_path}",
        "This CA is NOT FOR PRODUCTION: create real tenants with `certmq ca init`.",
    ]), file=sys.stderr, flush=True)
    return passphrase


def _server_names(names: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in ["127.0.0.1", "localhost", *names]:
        try:
            general: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            general = x509.DNSName(name)
        if general not in out:
            out.append(general)
    return out


def _cert_ok(path: Path, names: list[x509.GeneralName], chains: dict[str, bytes], now: dt.datetime) -> bool:
    try:
        cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, IndexError, x509.ExtensionNotFound):
        return False
    issuers = [c for pem in chains.values() for c in x509.load_pem_x509_certificates(pem)]
    if not any(cert.issuer == i.subject for i in issuers):
        return False
    return all(n in san for n in names) and cert.not_valid_after_utc - now > _RENEW_BEFORE


def ensure_server_certificate(datadir: Path, *, names: Sequence[str] = (), passphrase: bytes | None,
                              tenant: str | None = None) -> tuple[Path, Path]:
    """``(certificate chain file, key file)`` of the broker, in ``DATA/broker/``.

    Kept while it covers 127.0.0.1, localhost and ``names`` and is valid for two more weeks;
    otherwise (re)issued with serverAuth by ``tenant``'s issuing CA (default: the first tenant),
    which needs the CA passphrase. The server key is stored unencrypted, mode 0600.
    """
    datadir = Path(datadir)
    folder = datadir / "broker"
    cert_path, key_path = folder / "server.pem", folder / "server.key.pem"
    wanted = _server_names(names)
    tenants = [t.name for t in dd.list_tenants(datadir)]
    chains = {t: (dd.tenant_dir(datadir, t) / "chain.pem").read_bytes() for t in tenants}
    now = dt.datetime.now(dt.UTC)
    if key_path.exists() and _cert_ok(cert_path, wanted, chains, now):
        return cert_path, key_path
    if not tenants:
        raise dd.DataDirError(f"no tenant in {datadir} to issue the broker's server certificate")
    tenant = tenant or tenants[0]
    authority = dd.load_authorities(datadir, passphrase=passphrase, only=tenant)[tenant]
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = min(now + _SERVER_LIFETIME, authority.issuing.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "certmq broker")]))
        .issuer_name(authority.issuing.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(wanted), critical=False)
    )
    cert = builder.sign(authority.key, signature_hash(authority.key))  # type: ignore[arg-type]
    folder.mkdir(parents=True, exist_ok=True)
    key_tmp = folder / ".server.key.tmp"
    fd = os.open(key_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    cert_tmp = folder / ".server.pem.tmp"
    cert_tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + chains[tenant])
    os.replace(key_tmp, key_path)
    os.replace(cert_tmp, cert_path)
    _say(f"certmq broker: issued the broker's server certificate ({', '.join(str(n.value) for n in wanted)}) "
         f"with tenant {tenant}'s CA: {cert_path}")
    return cert_path, key_path


def tls_context(datadir: Path, *, certfile: Path, keyfile: Path) -> ssl.SSLContext:
    """The listener's TLS context: client certificate REQUIRED, chaining to any tenant's CA.

    When a tenant's profile allows expired-certificate recovery, OpenSSL's validity-time check is
    off: the identity hook checks validity itself (admitting an expired certificate only inside its
    recovery window, for renewal only); the chain and the handshake signature are still verified.
    """
    tenants = dd.list_tenants(datadir)
    chains = [t.chain_path.read_bytes() for t in tenants]
    context = server_context(certfile=certfile, keyfile=keyfile, client_ca_pems=chains)
    policies = [load_tenant_policy(m.policy) for m in dd.authority_material(datadir, passphrase=None)]
    if any(profile.expired_recovery for policy in policies for profile in policy.profiles.values()):
        context.verify_flags |= _NO_CHECK_TIME
    return context


def broker_config(*, host: str = "127.0.0.1", port: int = 8883, plugin: dict[str, Any] | None = None) -> dict[str, Any]:
    """An amqtt config for :class:`HardenedBroker`: one TLS listener, the certmq plugin by dotted path."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "ssl": True}},
        "plugins": {PLUGIN_PATH: dict(plugin or {})},
    }


def configure(parser: argparse.ArgumentParser) -> None:
    """``certmq broker`` options."""
    parser.add_argument("--data", metavar="DIR", help="data directory (default: $CERTMQ_DATA or ./certmq-data)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8883, help="TLS port (default 8883; 0 = any free port, printed)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--passphrase-env", metavar="VAR", help="environment variable holding the CA key passphrase")
    src.add_argument("--passphrase-file", metavar="FILE", help="file (mode 0600) holding the CA key passphrase")
    parser.add_argument("--workers", type=int, default=1, help="signing worker processes (default 1)")
    parser.add_argument("--server-name", action="append", default=[], metavar="NAME",
                        help="extra DNS name or IP for the broker's certificate (repeatable)")
    parser.add_argument("--queue", type=int, default=2000, help="admission queue capacity (default 2000)")
    parser.add_argument("--rate", type=float, default=0.2, help="per-client requests per second (0: no limit)")
    parser.add_argument("--burst", type=int, default=3, help="per-client burst (default 3)")
    parser.add_argument("--ready-file", type=Path, help="also write the ready JSON here")
    parser.add_argument("--echo", action="store_true", help="benchmark baseline: answer requests with a fixed reply")
    parser.add_argument("--metrics-port", type=int, default=-1, metavar="N",
                        help="serve Prometheus metrics on 127.0.0.1:N/metrics (0 = any free port; default off)")
    parser.add_argument("--health-interval", type=float, default=60.0, metavar="S",
                        help="seconds between health checks published on ops/findings (0 = off; default 60)")


async def serve(args: argparse.Namespace, passphrase: bytes | None, datadir: Path,
                stop: asyncio.Event | None = None) -> int:
    """Run the broker until ``stop`` is set (or SIGINT/SIGTERM); the exit status."""
    from amqtt.errors import PluginInitError, PluginLoadError

    from .broker import HardenedBroker
    from .plugin import CertmqPlugin

    certfile, keyfile = ensure_server_certificate(datadir, names=args.server_name, passphrase=passphrase)
    context = tls_context(datadir, certfile=certfile, keyfile=keyfile)
    plugin_cfg: dict[str, Any] = {
        "data_dir": str(datadir), "workers": args.workers, "queue_capacity": args.queue,
        "rate": args.rate, "burst": args.burst, "echo": bool(args.echo),
        "metrics_port": args.metrics_port, "health_interval": args.health_interval,
    }
    if args.passphrase_env:
        plugin_cfg["passphrase_env"] = args.passphrase_env
    elif args.passphrase_file:
        plugin_cfg["passphrase_file"] = str(args.passphrase_file)
    elif passphrase is not None:  # the development CA's generated passphrase
        plugin_cfg["passphrase_file"] = str(datadir / DEV_PASSPHRASE_FILE)
    try:
        broker = HardenedBroker(broker_config(host=args.host, port=args.port, plugin=plugin_cfg), ssl_context=context)
    except (PluginInitError, PluginLoadError) as exc:
        cause = exc.__cause__ or exc
        print(f"certmq broker: error: the CA plugin could not load: {cause}", file=sys.stderr)
        return 1
    plugin = CertmqPlugin.of(broker)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    ready_paths = [datadir / "broker" / "ready.json"] + ([args.ready_file] if args.ready_file else [])
    await broker.start()
    try:
        if plugin.startup_error is not None:
            print(f"certmq broker: error: the CA plugin did not start: {plugin.startup_error}", file=sys.stderr)
            return 1
        port = broker.listen_port()
        ready = {"host": args.host, "port": port, "pid": os.getpid(), "certfile": str(certfile),
                 "tenants": [t.name for t in dd.list_tenants(datadir)], "echo": bool(args.echo),
                 "metrics_port": plugin.metrics.port if plugin.metrics is not None else None}
        for path in ready_paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(ready) + "\n")
            os.replace(tmp, path)
        _say(f"certmq broker: listening on {args.host}:{port} (MQTT over TLS, client certificates required; "
             f"tenants: {', '.join(ready['tenants'])}; workers: {args.workers}{'; ECHO MODE' if args.echo else ''})")
        if plugin.metrics is not None:
            _say(f"certmq broker: metrics on http://127.0.0.1:{plugin.metrics.port}/metrics")
        await stop.wait()
        _say("certmq broker: shutting down")
    finally:
        for path in ready_paths:
            path.unlink(missing_ok=True)
        await broker.shutdown()
    _say("certmq broker: stopped")
    return 0


def run(args: argparse.Namespace) -> int:
    """``certmq broker``: the exit status."""
    prog = "certmq broker"
    if not 0 <= args.port <= 65535 or args.workers < 1 or args.queue < 1 or args.rate < 0 or args.burst < 1:
        print(f"{prog}: error: --port 0..65535, --workers >= 1, --queue >= 1, --rate >= 0, --burst >= 1",
              file=sys.stderr)
        return 2
    if not -1 <= args.metrics_port <= 65535 or args.health_interval < 0:
        print(f"{prog}: error: --metrics-port -1 (off) or 0..65535, --health-interval >= 0", file=sys.stderr)
        return 2
    datadir = dd.resolve_datadir(args.data)
    try:
        passphrase = None
        if args.passphrase_env:
            passphrase = resolve_passphrase(env=args.passphrase_env)
        elif args.passphrase_file:
            passphrase = resolve_passphrase(file=args.passphrase_file)
        passphrase = ensure_dev_tenant(datadir, passphrase=passphrase)
        return asyncio.run(serve(args, passphrase, datadir))
    except (dd.DataDirError, SignerError, ValueError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
