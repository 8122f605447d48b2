"""Revocation kicks live sessions within 1 s and the certificate cannot come back; deltas reach the
feed hook and the feed topic."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import aiomqtt
import pytest

from broker_plugin.plugin import CertmqPlugin
from broker_plugin.store.base import CertificateKind
from protocol.codec import encode
from protocol.codes import RevocationReason
from protocol.messages import RevocationDelta, RevocationRequest, RevocationResult, RevocationSnapshot

from .conftest import PASS_ENV, Ca, client, feed_keys, next_message


async def _closed_within(c: aiomqtt.Client, limit: float) -> float:
    """Seconds until ``c``'s connection is closed by the broker (fails past ``limit``)."""
    start = time.monotonic()

    async def drained() -> None:
        with pytest.raises(aiomqtt.MqttError):
            async for _ in c.messages:
                pass

    await asyncio.wait_for(drained(), limit)
    return time.monotonic() - start


async def _refused(broker, creds) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(aiomqtt.MqttError):
        async with client(broker, creds):
            pass


async def test_operator_revocation_over_mqtt_kicks_and_feeds(make_broker, ca: Ca) -> None:
    """An operator's RevocationRequest through the broker: RevocationResult to the operator, the
    device's session closed within 1 s (Outcome.revoked -> kick), its reconnection refused (identify
    sees the revocation), the delta given to on_deltas callbacks and published on rev/-/delta;
    the operator also got the retained snapshot on subscribing. Feed messages are checked against
    the tenant CA's signature."""
    broker = await make_broker()
    keys = feed_keys(ca, "acme")
    plugin = CertmqPlugin.of(broker)
    seen: list[object] = []
    plugin.on_deltas(seen.extend)
    dev, op = await ca.mint("acme", "sensor-k"), await ca.mint("acme", "op1", CertificateKind.OPERATOR)
    async with client(broker, op) as o:
        await o.subscribe("certmq/v1/acme/rev/#", qos=1)
        topic, snap = await next_message(o, feed_keys=keys)
        assert topic.startswith("certmq/v1/acme/rev/-/snapshot") and isinstance(snap, RevocationSnapshot)
        async with client(broker, dev) as d:
            rid = os.urandom(16)
            await o.publish("certmq/v1/acme/ops/op1/req", encode(RevocationRequest(
                request_id=rid, reason=RevocationReason.KEY_COMPROMISE, serial=dev.serial)), qos=1)
            took = await _closed_within(d, 1.5)
        assert took < 1.0
        got: dict[type, tuple[str, object]] = {}
        while len(got) < 2:
            t, m = await next_message(o, feed_keys=keys)
            if not isinstance(m, RevocationSnapshot):  # a second copy (retained + live) may come
                got[type(m)] = (t, m)
    result = got[RevocationResult][1]
    assert result.request_id == rid and result.serials == (dev.serial,)  # type: ignore[attr-defined]
    delta_topic, delta = got[RevocationDelta]
    assert delta_topic == "certmq/v1/acme/rev/-/delta"
    assert delta.from_sequence == snap.sequence and delta.to_sequence == snap.sequence + 1  # type: ignore[attr-defined]
    record = await ca.registry.get_certificate("acme", dev.serial)
    assert delta.indices == (record.status_index,)  # type: ignore[attr-defined]
    assert [d.to_seq for d in seen] == [delta.to_sequence]  # type: ignore[attr-defined]
    await _refused(broker, dev)


async def test_api_revocation_kicks(make_broker, ca: Ca) -> None:
    """plugin.revoke() (the in-process API) closes every session of the certificate within 1 s."""
    broker = await make_broker()
    dev = await ca.mint("acme", "sensor-api")
    async with client(broker, dev) as d:
        closing = asyncio.ensure_future(_closed_within(d, 1.5))
        await asyncio.sleep(0.05)
        await CertmqPlugin.of(broker).revoke(tenant="acme", reason=RevocationReason.SUPERSEDED, actor="test",
                                             serial=dev.serial)
        assert await closing < 1.0
    await _refused(broker, dev)


async def test_cli_revocation_in_another_process_kicks_within_one_second(make_broker, ca: Ca, datadir: Path) -> None:
    """`certmq ca revoke` in a separate process commits to the same SQLite registry; the broker's
    poller (every 250 ms) finds it and kicks: measured from the CLI's exit to the session's close.
    Also published on the feed as a delta."""
    broker = await make_broker()
    dev, other = await ca.mint("acme", "sensor-cli"), await ca.mint("acme", "sensor-ok")
    async with client(broker, other) as watcher, client(broker, dev) as d:
        await watcher.subscribe("certmq/v1/acme/rev/-/delta", qos=1)
        closing = asyncio.ensure_future(_closed_within(d, 30))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "broker_plugin.cli", "ca", "revoke", "--data", str(datadir), "--tenant", "acme",
            "--serial", f"{dev.serial:x}", "--reason", "keyCompromise", "--passphrase-env", PASS_ENV,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        _, err = await proc.communicate()
        exited = time.monotonic()
        assert proc.returncode == 0, err.decode()
        await closing
        lag = time.monotonic() - exited
        assert lag < 1.0, f"kicked {lag:.3f} s after the CLI exited"
        _, delta = await next_message(watcher, 3, feed_keys=feed_keys(ca, "acme"))
        assert isinstance(delta, RevocationDelta)
    await _refused(broker, dev)
    async with client(broker, other):
        pass  # the unrevoked device is untouched

