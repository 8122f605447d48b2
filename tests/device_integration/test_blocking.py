"""The blocking facade over the real broker: an integrator without asyncio enrolls with a bootstrap
certificate, renews and reads the status; the facade's own event loop runs in its thread (here the
calls are made from a worker thread, while the test's loop serves the broker)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from device_client import BlockingDeviceClient, BootstrapCredentials
from protocol.codes import Profile

from .conftest import RECOVERY, TENANT, BrokerHandle, Ca, live_serials, make_device


async def test_blocking_enroll_renew_status(broker: BrokerHandle, ca: Ca, tmp_path: Path) -> None:
    """enroll() then renew() then status(), all blocking: two certificates in the registry, the
    renewed one current, live on the broker and reported by status(); the bootstrap files gone."""
    claim = await ca.claim("line-b", device_ids=["sensor-b1"], max_uses=1)
    device = make_device(tmp_path, "sensor-b1", ca)
    boot = BootstrapCredentials(cert_path=claim.cert_path, key_path=claim.key_path)

    dc = await asyncio.to_thread(
        BlockingDeviceClient, transport_factory=broker.transport, device_id="sensor-b1", tenant=TENANT,
        store=device.store, ca_bundle=ca.chain, bootstrap=boot, reply_timeout=10.0, recovery_window=RECOVERY,
        timeout=30)

    def integrator() -> tuple[int, int, float | None]:
        dc.__enter__()
        first = dc.enroll()
        second = dc.renew()
        status = dc.status()[Profile.IDENTITY]
        assert status.serial == second.serial
        return first.serial, second.serial, status.days_to_expiry

    first, second, days = await asyncio.to_thread(integrator)
    live = live_serials(broker, "sensor-b1")  # read on the broker's loop, not from the thread
    await asyncio.to_thread(dc.close)
    assert first != second and live == [second]
    assert days is not None and 29 < days <= 30
    assert await ca.serials("sensor-b1") == {first, second}
    assert not boot.cert_path.exists() and not boot.key_path.exists()
    await asyncio.sleep(0.2)
    assert live_serials(broker, "sensor-b1") == []  # close() disconnected
