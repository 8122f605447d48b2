"""Just-in-time provisioning end to end over the real broker: a bootstrap certificate minted by
`certmq ca claim add` (another process, the same data directory), DeviceClient.enroll() over MQTT,
the reply validated, the new certificate proven by a real connection, the bootstrap credentials
destroyed; a second device on the same claim; a used-up claim refused with the bootstrap kept."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_client import BootstrapCredentials
from protocol.codes import ErrorCode, Profile
from protocol.errors import RequestRejected

from .conftest import PASS_ENV, TENANT, BrokerHandle, Ca, device_client, fast_sleep, live_serials, make_device, now


async def _claim_add(datadir: Path, out: Path, claim_id: str, *, max_uses: int) -> tuple[Path, Path]:
    until = (now() + dt.timedelta(days=10)).strftime("%Y-%m-%d")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker_plugin.cli", "ca", "claim", "add", "--data", str(datadir), "--tenant", TENANT,
        "--claim-id", claim_id, "--pattern", "sensor-*", "--max-uses", str(max_uses), "--until", until,
        "--out", str(out), "--passphrase-env", PASS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    return out / f"{claim_id}.pem", out / f"{claim_id}.key.pem"


def _copy(cert: Path, key: Path, folder: Path) -> BootstrapCredentials:
    """Each device ships with its own copy of the claim's files (destroying one leaves the others)."""
    folder.mkdir(parents=True)
    return BootstrapCredentials(cert_path=Path(shutil.copy(cert, folder)), key_path=Path(shutil.copy(key, folder)))


async def test_enroll_with_a_cli_claim_then_second_device_then_exhausted(
        broker: BrokerHandle, ca: Ca, datadir: Path, tmp_path: Path) -> None:
    """Device 1 enrolls with a bootstrap certificate from `certmq ca claim add`: its certificate has
    CN = device id, chains to the tenant CA, clientAuth, the key the device generated, and is in the
    registry; the broker sees the device's live connection authenticated with exactly that serial
    (proven before it became current); an app publish comes back through its capability; the
    bootstrap key and certificate files are gone. Device 2 on the same claim enrolls too. Device 3,
    past max_uses=2, gets CLAIM_REFUSED: nothing current, its bootstrap files kept, no certificate
    in the registry."""
    cert, key = await _claim_add(datadir, tmp_path / "claim", "line-1", max_uses=2)
    enrolled = []
    for device_id in ("sensor-p1", "sensor-p2"):
        device = make_device(tmp_path, device_id, ca)
        boot = _copy(cert, key, tmp_path / "boot" / device_id)
        async with device_client(device, broker, ca, bootstrap=boot) as dc:
            slot = await dc.enroll()
            issued = slot.certificate
            assert issued.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id
            issuing, root = ca.chain  # checked here independently of the client's own validation
            issued.verify_directly_issued_by(issuing)
            issuing.verify_directly_issued_by(root)
            eku = issued.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
            assert issued.public_key() == device.keys.load(slot.key_label).public_key()
            assert await ca.serials(device_id) == {issued.serial_number}
            assert dc.connected_as == Profile.IDENTITY.label
            assert live_serials(broker, device_id) == [issued.serial_number]
            assert device.store.current() is not None and device.store.current().serial == issued.serial_number
            assert device.store.pending() is None and device.store.next() is None
            got: list[bytes] = []
            dc.on_message = lambda m: got.append(m.payload)
            app = f"certmq/v1/{TENANT}/dev/{device_id}/app/telemetry"
            await dc.subscribe(app)
            await dc.transport.publish(app, b"hello")
            await asyncio.wait_for(_until(lambda: got == [b"hello"]), 5)
        assert not boot.cert_path.exists() and not boot.key_path.exists()
        assert device.kinds()[-2:] == ["promoted", "bootstrap_destroyed"]
        enrolled.append(issued.serial_number)
    assert len(set(enrolled)) == 2

    device = make_device(tmp_path, "sensor-p3", ca)
    boot = _copy(cert, key, tmp_path / "boot" / "sensor-p3")
    async with device_client(device, broker, ca, bootstrap=boot) as dc:
        with pytest.raises(RequestRejected) as info:
            await dc.enroll()
    assert info.value.code == ErrorCode.CLAIM_REFUSED
    assert boot.cert_path.read_bytes() == cert.read_bytes() and boot.key_path.read_bytes() == key.read_bytes()
    assert device.store.current() is None
    assert await ca.serials("sensor-p3") == set()


async def test_enroll_survives_a_broker_restart_with_the_same_request_id(
        broker: BrokerHandle, ca: Ca, tmp_path: Path) -> None:
    """The broker restarts while the device waits for its reply (bootstrap connection lost): the
    client reconnects with the bootstrap certificate and re-sends the recorded request id; the
    registry holds one certificate for the device, and it is the one that became current.
    The claim (max_uses=1) is not spent twice: the retry is answered from the registry."""
    claim = await ca.claim("line-r", max_uses=1)
    device = make_device(tmp_path, "sensor-r1", ca)
    boot = BootstrapCredentials(cert_path=claim.cert_path, key_path=claim.key_path)
    async with device_client(device, broker, ca, bootstrap=boot, reply_timeout=1.0, max_attempts=8,
                             sleep=fast_sleep) as dc:
        real_publish = dc.transport.publish
        restarted = asyncio.Event()

        async def publish_then_restart(topic: str, payload: bytes, qos: int = 1) -> None:
            await real_publish(topic, payload, qos)
            if not restarted.is_set():  # the request is out; the broker goes down before (or after) answering
                restarted.set()
                await broker.stop()
                await broker.start()

        dc.transport.publish = publish_then_restart  # type: ignore[method-assign]
        slot = await dc.enroll()
    assert restarted.is_set()
    assert "retry" in device.kinds()
    assert await ca.serials("sensor-r1") == {slot.serial}


async def _until(predicate) -> None:  # type: ignore[no-untyped-def]
    while not predicate():
        await asyncio.sleep(0.02)
