"""The machinery behind ``certmq demo``: a data directory, a broker process and a simulated fleet.

Everything here is the production code path, only many of it in one process:

* :func:`prepare_datadir` makes (or reuses) the ``demo`` tenant with short-lived identity
  certificates, registers one claim per "production line" and mints its bootstrap certificate,
  and mints an operator certificate -- through :class:`~broker_plugin.ca.service.CAService`,
  exactly what ``certmq ca claim add`` does;
* :class:`BrokerProcess` runs ``certmq broker --port 0`` as a child process (its own event loop
  on the second core; its signing workers are processes anyway) and always stops it;
* :class:`FleetDevice` is a real :class:`~device_client.DeviceClient` over
  :class:`~device_client.mqtt.AiomqttTransport` (TLS, client certificates) with its own
  :class:`~device_client.CertStore` and a :class:`~device_client.RenewalAgent`;
* :class:`Validator` is a gateway device feeding a :class:`~device_client.RevocationCache`
  (signed feeds checked by :class:`~device_client.feedverify.SignedFeedVerifier`);
* :class:`Operator` sends RevocationRequests over MQTT, as an operator console would.

This module knows nothing of progress bars, tables or plots (``broker_plugin.demo`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_client import (
    BootstrapCredentials,
    CertStore,
    ConnectionRefused,
    DeviceClient,
    Event,
    FeedRejected,
    FileKeyStore,
    RenewalAgent,
    RevocationCache,
    RevocationStatus,
    TransportError,
)
from device_client.feedverify import SignedFeedVerifier
from device_client.mqtt import AiomqttTransport, build_ssl_context
from device_client.transport import ClientCredentials, IncomingMessage
from protocol import codec, topics
from protocol.codes import Profile, RevocationReason
from protocol.messages import Error, RevocationRequest, RevocationResult

__all__ = [
    "PASSPHRASE_FILE",
    "REGION",
    "TENANT",
    "BrokerProcess",
    "DemoSetup",
    "FleetDevice",
    "Operator",
    "RevocationTrace",
    "Validator",
    "prepare_datadir",
]

#: The demo's tenant and region (a named data directory may hold other tenants too).
TENANT = "demo"
REGION = "eu-west"
#: The same file ``certmq broker`` uses for a development CA, so a later ``certmq broker --data DIR`` finds it.
PASSPHRASE_FILE = "dev-ca-passphrase"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _policy_toml(lifetime: dt.timedelta, window: tuple[float, float]) -> str:
    return (
        "# certmq demo tenant: short-lived identity certificates so that renewals happen within the demo\n"
        f'name = "{TENANT}"\n'
        f'default_region = "{REGION}"\n'
        "status_list_capacity = 8192\n"
        "[profiles.identity]\n"
        f'lifetime = "{int(lifetime.total_seconds())}s"\n'
        f"renewal_window = [{window[0]}, {window[1]}]\n"
        'capabilities = ["telemetry"]\n'
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


@dataclass(frozen=True, kw_only=True)
class Credentials:
    """A minted certificate and its key, as PEM files."""

    name: str
    serial: int
    cert_path: Path
    key_path: Path


@dataclass(frozen=True, kw_only=True)
class DemoSetup:
    """What :func:`prepare_datadir` made: the passphrase file, the CA chain, claims and the operator."""

    datadir: Path
    passphrase_file: Path
    chain_path: Path
    chain: tuple[x509.Certificate, ...]
    lines: tuple[tuple[Credentials, tuple[str, ...]], ...]  #: (claim, the device ids it may provision)
    gateway_claim: Credentials
    gateway_ids: tuple[str, ...]
    operator: Credentials
    created_tenant: bool


async def prepare_datadir(datadir: Path, *, run_id: str, device_ids: list[str], lines: int, validators: int,
                          lifetime: dt.timedelta, window: tuple[float, float], work: Path) -> DemoSetup:
    """Make or reuse the demo tenant in ``datadir`` and mint the run's claims and operator (see module doc).

    Raises :class:`~broker_plugin.ca.datadir.DataDirError` when ``datadir`` holds tenants whose CA
    passphrase the demo does not know (a production data directory is not the demo's to touch).
    """
    from .ca import datadir as dd
    from .ca.claims import ClaimPolicy
    from .ca.service import CAService
    from .ca.signers import resolve_passphrase
    from .ca.signing import InlineSigner
    from .store.base import CertificateKind

    datadir.mkdir(parents=True, exist_ok=True)
    secret = datadir / PASSPHRASE_FILE
    tenants = [t.name for t in dd.list_tenants(datadir)] if (datadir / "tenants").is_dir() else []
    if tenants and not secret.exists():
        raise dd.DataDirError(f"{datadir} holds tenants ({', '.join(tenants)}) but no development passphrase "
                              f"file {PASSPHRASE_FILE}: use an empty directory (or none) for the demo")
    if not secret.exists():
        _write_private(secret, secrets.token_urlsafe(32).encode() + b"\n")
    passphrase = resolve_passphrase(file=secret)
    # Claim and operator certificates are minted under a week-long identity lifetime (as an operator
    # would have made them well before); the short-lived policy applies from the broker's start on.
    minting, policy_file = work / "minting-policy.toml", work / "demo-policy.toml"
    minting.write_text(_policy_toml(dt.timedelta(days=7), (0.6, 0.8)))
    policy_file.write_text(_policy_toml(lifetime, window))
    now = _now().replace(microsecond=0)
    created = TENANT not in tenants
    if created:
        await dd.init_tenant(datadir, TENANT, algorithm="p256", passphrase=passphrase, policy=minting,
                             now=now - dt.timedelta(minutes=5), actor="certmq demo")
    else:  # a named data directory from an earlier run
        await dd.set_policy(datadir, TENANT, minting, now=now)

    authorities = dd.load_authorities(datadir, passphrase=passphrase, only=TENANT)
    registry = await dd.open_datadir_registry(datadir)
    service = CAService(registry=registry, authorities=authorities, signer=InlineSigner(authorities), clock=_now)
    creds_dir = work / "credentials"
    creds_dir.mkdir(parents=True, exist_ok=True)

    async def mint(name: str, kind: CertificateKind) -> Credentials:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
        record = await service.issue_direct(tenant=TENANT, device_id=name, profile=Profile.IDENTITY, csr_der=csr,
                                            kind=kind, region=REGION, actor="certmq demo")
        cert_path, key_path = creds_dir / f"{name}.pem", creds_dir / f"{name}.key.pem"
        cert_path.write_bytes(x509.load_der_x509_certificate(record.der).public_bytes(serialization.Encoding.PEM))
        _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
        return Credentials(name=name, serial=record.serial, cert_path=cert_path, key_path=key_path)

    async def claim(claim_id: str, ids: list[str]) -> Credentials:
        policy = ClaimPolicy(device_ids=ids, max_uses=len(ids), not_after=now + dt.timedelta(days=7), region=REGION)
        await service.register_claim(tenant=TENANT, claim_id=claim_id, policy=policy, actor="certmq demo")
        return await mint(claim_id, CertificateKind.BOOTSTRAP)

    try:
        made = []
        for k in range(lines):
            ids = device_ids[k::lines]
            if ids:
                made.append((await claim(f"line-{run_id}-{k + 1:02d}", ids), tuple(ids)))
        gateway_ids = [f"gateway-{run_id}-{k + 1}" for k in range(validators)]
        gateway_claim = await claim(f"gateways-{run_id}", gateway_ids)
        operator = await mint(f"console-{run_id}", CertificateKind.OPERATOR)
    finally:
        await registry.close()
    await dd.set_policy(datadir, TENANT, policy_file, now=_now().replace(microsecond=0))
    chain_path = dd.tenant_dir(datadir, TENANT) / "chain.pem"
    return DemoSetup(datadir=datadir, passphrase_file=secret, chain_path=chain_path,
                     chain=tuple(x509.load_pem_x509_certificates(chain_path.read_bytes())), lines=tuple(made),
                     gateway_claim=gateway_claim, gateway_ids=tuple(gateway_ids), operator=operator,
                     created_tenant=created)


# -- the broker ------------------------------------------------------------------------


class BrokerProcess:
    """``certmq broker --port 0`` as a child process; :meth:`stop` always leaves nothing running.

    The child asks the kernel for SIGTERM when the demo process dies (``PR_SET_PDEATHSIG``), so
    even a ``kill -9`` of the demo leaves no broker behind. It stays in the demo's process group:
    a Ctrl-C in the terminal reaches both, and both shut down cleanly.
    """

    def __init__(self, *, datadir: Path, passphrase_file: Path, log_path: Path, workers: int = 1) -> None:
        self.datadir = datadir
        self.passphrase_file = passphrase_file
        self.log_path = log_path
        self.workers = workers
        self.ready_file = log_path.with_name("broker-ready.json")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.pid: int | None = None

    def start(self, timeout: float = 60.0) -> int:
        """Start the broker and wait for its ready file; returns the port. ``RuntimeError`` (with its log) if it fails."""
        self.ready_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "broker_plugin.cli", "broker", "--data", str(self.datadir), "--port", "0",
               "--passphrase-file", str(self.passphrase_file), "--workers", str(self.workers),
               "--health-interval", "0", "--burst", "8", "--ready-file", str(self.ready_file)]
        log = self.log_path.open("wb")
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the broker exited with status {self.proc.returncode} before it was ready:\n"
                                   + self.log_tail())
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the broker was not ready within {timeout:.0f} s:\n" + self.log_tail())
            time.sleep(0.05)
        ready = json.loads(self.ready_file.read_text())
        self.port, self.pid = int(ready["port"]), int(ready["pid"])
        return self.port

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the broker's output."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no broker log)"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait (the broker drains and closes its registry), SIGKILL if it must. Its exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# -- devices ---------------------------------------------------------------------------


class _TimedAgent(RenewalAgent):
    """A RenewalAgent that reports how long each successful renewal took."""

    def __init__(self, *, on_renewed: Callable[[float], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._on_renewed = on_renewed

    async def attempt(self, profile: Profile) -> bool:
        start = time.monotonic()
        ok = await super().attempt(profile)
        if ok:
            self._on_renewed(time.monotonic() - start)
        return ok


@dataclass
class FleetDevice:
    """One simulated device: its DeviceClient, agent task and what happened to it."""

    device_id: str
    client: DeviceClient
    events: list[Event] = field(default_factory=list)
    provisioned_at: float | None = None  #: monotonic time the identity certificate became current
    provision_latency: float | None = None
    renewals: list[tuple[float, float]] = field(default_factory=list)  #: (monotonic time, seconds taken)
    error: str | None = None
    agent: _TimedAgent | None = None
    task: asyncio.Task[None] | None = None

    @classmethod
    def make(cls, *, device_id: str, root: Path, setup: DemoSetup, port: int, bootstrap: Credentials,
             reply_timeout: float) -> FleetDevice:
        folder = root / device_id
        keys = FileKeyStore(directory=folder / "keys")
        store = CertStore(directory=folder, keystore=keys, trust=setup.chain, device_id=device_id)
        device = cls(device_id=device_id, client=None)  # type: ignore[arg-type]
        device.client = DeviceClient(
            device_id=device_id, tenant=TENANT, transport=AiomqttTransport(hostname="127.0.0.1", port=port, timeout=20),
            store=store, ca_bundle=setup.chain, region=REGION, reply_timeout=reply_timeout, max_attempts=8,
            # the claim certificate serves a whole production line: keep it for the next device
            bootstrap=BootstrapCredentials(cert_path=bootstrap.cert_path, key_path=bootstrap.key_path),
            destroy_bootstrap=False, on_event=device.events.append,
        )
        return device

    async def provision(self) -> bool:
        """Enroll from the line's claim certificate; False (with :attr:`error`) when it did not work."""
        start = time.monotonic()
        for attempt in range(3):
            try:
                await self.client.enroll()
            except ConnectionRefused as exc:
                # the broker may not have processed the previous session of this client id yet
                self.error = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            except Exception as exc:  # noqa: BLE001 -- a demo device reports, it does not crash the fleet
                self.error = f"{type(exc).__name__}: {exc}"
                return False
            self.error = None
            self.provisioned_at = time.monotonic()
            self.provision_latency = self.provisioned_at - start
            return True
        return False

    def start_agent(self) -> None:
        """Run the renewal agent in the background (until :meth:`stop_agent`)."""
        self.agent = _TimedAgent(client=self.client, reconnect_base=dt.timedelta(seconds=1),
                                 reconnect_cap=dt.timedelta(seconds=10), max_sleep=dt.timedelta(seconds=30),
                                 on_renewed=lambda took: self.renewals.append((time.monotonic(), took)))
        self.task = asyncio.get_running_loop().create_task(self.agent.run(), name=f"agent {self.device_id}")

    async def stop_agent(self) -> None:
        """Cancel the agent task and wait for it."""
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def renewing(self) -> bool:
        """A renewal is under way (an unanswered request, or a certificate staged but not yet proven)."""
        store = self.client.store
        return store.pending(Profile.IDENTITY) is not None or store.next(Profile.IDENTITY) is not None

    async def close(self) -> None:
        """Stop the agent and disconnect."""
        await self.stop_agent()
        with contextlib.suppress(Exception):
            await self.client.close()


class Validator:
    """A gateway: a provisioned device whose messages from ``rev/{region}/#`` feed a signed RevocationCache."""

    def __init__(self, *, device: FleetDevice, setup: DemoSetup, path: Path) -> None:
        self.device = device
        self.rejected = 0
        self.applied = 0
        self.cache = RevocationCache(tenant=TENANT, region=REGION, path=path,
                                     verifier=SignedFeedVerifier(certificates=setup.chain),
                                     request_snapshot=self._resubscribe)
        device.client.on_message = self._message

    def _message(self, incoming: IncomingMessage) -> None:
        try:
            if self.cache.handle(incoming.topic, incoming.payload):
                self.applied += 1
        except FeedRejected:
            self.rejected += 1

    def _resubscribe(self, list_id: int) -> None:
        # a gap: the list's retained signed snapshot ends it
        topic = self.cache.list_snapshot_topic(list_id)
        asyncio.get_running_loop().create_task(self.device.client.subscribe(topic))

    async def subscribe(self) -> None:
        """Subscribe to the region's feed (retained snapshots first, then deltas)."""
        await self.device.client.subscribe(f"{self.cache.snapshot_topic}/#")
        await self.device.client.subscribe(self.cache.delta_topic)

    def status(self, certificate: x509.Certificate) -> RevocationStatus:
        return self.cache.status(certificate)


@dataclass(frozen=True, kw_only=True)
class RevocationTrace:
    """One revocation as the demo watched it (seconds from the operator's request; None: did not happen)."""

    device_id: str
    serial: int
    result_s: float | None  #: RevocationResult back at the operator
    kicked_s: float | None  #: the device's live session closed by the broker
    validators_s: tuple[float | None, ...]  #: each validator's cache answering REVOKED
    reconnect_refused: bool
    reconnect_detail: str
    error: str = ""  #: the operator's Error reply, if the revocation was refused


class Operator:
    """An operator console over MQTT (operator certificate): sends RevocationRequests, gets results."""

    def __init__(self, *, creds: Credentials, setup: DemoSetup, port: int) -> None:
        self.creds = creds
        self.setup = setup
        self.port = port
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[bytes, asyncio.Future[object]] = {}

    async def __aenter__(self) -> Operator:
        import aiomqtt

        context: ssl.SSLContext = build_ssl_context(ClientCredentials(
            client_id=self.creds.name, cert_path=self.creds.cert_path, key_path=self.creds.key_path,
            ca_certificates=self.setup.chain))
        self._stack = contextlib.AsyncExitStack()
        self._client = await self._stack.enter_async_context(
            aiomqtt.Client("127.0.0.1", self.port, identifier=self.creds.name, tls_context=context, timeout=20))
        await self._client.subscribe(topics.operator_response_topic(TENANT, self.creds.name), qos=1)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._stack is not None:
            with contextlib.suppress(Exception):
                await self._stack.aclose()

    async def _read(self) -> None:
        import aiomqtt

        with contextlib.suppress(aiomqtt.MqttError):
            async for message in self._client.messages:
                with contextlib.suppress(Exception):
                    reply = codec.decode(bytes(message.payload))
                    fut = self._waiters.get(getattr(reply, "request_id", b""))
                    if fut is not None and not fut.done():
                        fut.set_result(reply)

    async def send_revocation(self, serial: int) -> asyncio.Future[object]:
        """Publish a RevocationRequest (key compromise); the future gets the RevocationResult or Error."""
        request_id = os.urandom(16)
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = fut
        await self._client.publish(topics.operator_request_topic(TENANT, self.creds.name), codec.encode(
            RevocationRequest(request_id=request_id, reason=RevocationReason.KEY_COMPROMISE, serial=serial)), qos=1)
        return fut


async def revoke_and_watch(operator: Operator, device: FleetDevice, validators: list[Validator],
                           timeout: float = 5.0) -> RevocationTrace:
    """Revoke ``device``'s current certificate through ``operator`` and time what follows (see RevocationTrace)."""
    await device.stop_agent()
    current = device.client.store.current(Profile.IDENTITY)
    assert current is not None
    cert = current.certificate
    start = time.monotonic()
    fut = await operator.send_revocation(current.serial)
    result_s = kicked_s = None
    error = ""
    seen: list[float | None] = [None] * len(validators)
    deadline = start + timeout
    while time.monotonic() < deadline:
        now = time.monotonic() - start
        if result_s is None and fut.done():
            reply = fut.result()
            if isinstance(reply, Error) and reply.retry_after is not None and reply.retry_after <= timeout:
                # BUSY / RATE_LIMITED: the operator waits as told and asks again; the clock restarts
                await asyncio.sleep(reply.retry_after)
                start = time.monotonic()
                deadline = start + timeout
                fut = await operator.send_revocation(current.serial)
                continue
            if isinstance(reply, Error):
                error = f"{reply.code!r}: {reply.text}"
                break
            result_s = now
        if kicked_s is None and device.client.connected_as is None:
            kicked_s = now
        for i, v in enumerate(validators):
            if seen[i] is None and v.status(cert) is RevocationStatus.REVOKED:
                seen[i] = now
        if result_s is not None and kicked_s is not None and all(s is not None for s in seen):
            break
        await asyncio.sleep(0.002)
    refused, detail = False, "not tried"
    try:
        await device.client.ensure_connected()
        detail = "the broker accepted the revoked certificate"
    except ConnectionRefused as exc:
        refused, detail = True, str(exc)
    except TransportError as exc:
        detail = f"{type(exc).__name__}: {exc}"
    with contextlib.suppress(Exception):
        await device.client.close()
    return RevocationTrace(device_id=device.device_id, serial=current.serial, result_s=result_s, kicked_s=kicked_s,
                           validators_s=tuple(seen), reconnect_refused=refused, reconnect_detail=detail,
                           error=error)
