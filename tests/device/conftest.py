"""Fixtures for the device library tests: a virtual clock, a fake CA on a MemoryBroker, a device."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from device_fakes import FakeCA, VirtualClock, make_ca, write_bootstrap

from device_client.transport import MemoryBroker


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def fake_ca(clock: VirtualClock) -> FakeCA:
    return make_ca(clock)


@pytest.fixture
def broker(fake_ca: FakeCA) -> MemoryBroker:
    return fake_ca.broker()


@pytest.fixture
def device_dir(tmp_path: Path) -> Path:
    d = tmp_path / "device"
    d.mkdir()
    return d


@pytest.fixture
def bootstrapped(fake_ca: FakeCA, clock: VirtualClock, device_dir: Path) -> Path:
    write_bootstrap(fake_ca, device_dir, not_before=clock.now() - timedelta(days=10))
    return device_dir
