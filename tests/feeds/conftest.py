"""Fixtures for the revocation-feed tests: a real data directory (tenants ``acme`` and ``globex``,
default region ``eu``, tiny status lists so roll-over happens), a test-side CA service minting
into it, a HardenedBroker with the certmq plugin, aiomqtt subscribers over real TLS, and
revocation caches checking signatures against the tenant CA certificate."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from broker_plugin.broker import HardenedBroker
from broker_plugin.plugin import CertmqPlugin
from device_client.feedverify import SignedFeedVerifier
from device_client.revcache import RevocationCache
from plugin import conftest as base
from plugin.conftest import PASS_ENV, PASSPHRASE, Ca, Creds, ca, client, make_broker  # noqa: F401 (fixtures)

__all__ = ["CAPACITY", "PASSPHRASE", "PASS_ENV", "Ca", "Creds", "Feed", "cache", "client", "now", "verifier"]

CAPACITY = 8  #: status list size (the policy minimum): the ninth certificate of a region rolls over

POLICY = f"""
default_region = "eu"
crl_url = "http://crl.example/certmq"
status_list_capacity = {CAPACITY}

[profiles.identity]
lifetime = "30d"
allow_key_reuse = true
"""


def now() -> dt.datetime:
    """Wall-clock UTC (openssl and TLS check against the real clock)."""
    return dt.datetime.now(dt.UTC)


@pytest.fixture
async def datadir(tmp_path: Path) -> Path:
    return await base.make_datadir(tmp_path, POLICY)


async def start_broker(datadir: Path, **plugin: Any) -> HardenedBroker:
    """:func:`plugin.conftest.start_broker` with signed feeds tuned for tests (fast revocation poll,
    refreshed snapshots at once)."""
    broker = await base.start_broker(datadir, **{"revocation_poll": 0.1, **plugin})
    loaded = CertmqPlugin.of(broker)
    assert loaded.feeds is not None
    loaded.feeds.snapshot_min_interval = 0.05  # tests want the refreshed snapshot soon
    loaded.feeds.snapshot_cost_factor = 0.0
    return broker


@pytest.fixture
def broker_starter() -> Callable[..., Awaitable[HardenedBroker]]:
    return start_broker


def verifier(ca: Ca, tenant: str = "acme") -> SignedFeedVerifier:
    return SignedFeedVerifier.from_pem_file(ca.chain(tenant))


def cache(tmp: Path, ca: Ca, *, region: str = "eu", tenant: str = "acme", name: str = "rev.json",
          requested: list[int] | None = None) -> RevocationCache:
    return RevocationCache(tenant=tenant, region=region, path=tmp / name, verifier=verifier(ca, tenant),
                           request_snapshot=None if requested is None else requested.append)


class Feed:
    """A subscriber's feed messages: raw ``(topic, payload)`` pairs in arrival order."""

    def __init__(self, c: aiomqtt.Client) -> None:
        self.client = c
        self.got: list[tuple[str, bytes]] = []
        self._task = asyncio.ensure_future(self._read())
        self._event = asyncio.Event()

    async def _read(self) -> None:
        async for m in self.client.messages:
            self.got.append((str(m.topic), bytes(m.payload)))
            self._event.set()

    async def wait_for(self, pred: Callable[[list[tuple[str, bytes]]], bool], timeout: float = 5.0) -> None:
        async def loop() -> None:
            while not pred(self.got):
                self._event.clear()
                await self._event.wait()

        await asyncio.wait_for(loop(), timeout)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await self._task
