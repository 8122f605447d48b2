"""Fleet health and metrics from a real broker: the plugin's fixtures (tests/plugin/conftest.py:
a real data directory, a HardenedBroker over TLS, aiomqtt clients holding real certificates) drive
issuances, refusals and revocations over MQTT; the Prometheus exporter is scraped over HTTP and
parsed with prometheus_client's parser; an operator subscribed to ops/findings receives the
published findings."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
from typing import Any

import aiomqtt
from prometheus_client.parser import text_string_to_metric_families

from broker_plugin.metrics import result_label
from broker_plugin.plugin import CertmqPlugin
from broker_plugin.store.base import CertificateKind, CertificateStatus
from plugin.conftest import broker_starter, ca, client, datadir, make_broker, make_csr, next_message  # noqa: F401 (fixtures)
from protocol.codec import encode
from protocol.codes import Profile, RevocationReason
from protocol.messages import (
    CertificateIssued,
    CertificateRequest,
    Error,
    RenewalRequest,
    RevocationRequest,
    RevocationResult,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def samples(port: int) -> Samples:
    status, body = await scrape(port)
    assert status == 200
    out: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(got: Samples, name: str, **labels: str) -> float:
    return got.get((name, frozenset(labels.items())), 0.0)


def result_of(reply: Any) -> str:
    return "issued" if isinstance(reply, CertificateIssued) else result_label(reply.code)


async def eventually(check: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_metrics_scraped_over_http_match_the_traffic(make_broker, ca) -> None:
    broker = await make_broker(metrics_port=0, health_interval=0)
    plugin = CertmqPlugin.of(broker)
    assert plugin.metrics is not None and plugin.metrics.port
    port = plugin.metrics.port
    expected: dict[tuple[str, str], int] = {}  # (counter, result) -> count, from what clients received
    types: dict[str, int] = {}

    def saw(counter: str, kind: str, reply: Any) -> None:
        expected[(counter, result_of(reply))] = expected.get((counter, result_of(reply)), 0) + 1
        types[kind] = types.get(kind, 0) + 1

    # issuance: a claim good for one device; the second device is refused
    claim = await ca.claim("acme", "line-9", max_uses=1)
    async with client(broker, claim) as c:
        for device_id in ("sensor-a", "sensor-b"):
            await c.subscribe(f"certmq/v1/acme/prov/{device_id}/res", qos=1)
            _, csr = make_csr(device_id)
            await c.publish(f"certmq/v1/acme/prov/{device_id}/req", encode(CertificateRequest(
                request_id=os.urandom(16), profile=Profile.IDENTITY, csr=csr)), qos=1)
            saw("certmq_issuance_total", "certificate_request", (await next_message(c))[1])
    assert {r for (counter, r) in expected} == {"issued", "claim_refused"}

    # renewals: one good, two CSRs for another device, then past the burst of 3: rate limited
    dev = await ca.mint("acme", "sensor-r")
    op = await ca.mint("acme", "op1", CertificateKind.OPERATOR)
    async with client(broker, op) as o, client(broker, dev) as d:
        await d.subscribe("certmq/v1/acme/dev/sensor-r/res", qos=1)
        for cn in ("sensor-r", "intruder", "intruder", "sensor-r"):
            _, csr = make_csr(cn)
            await d.publish("certmq/v1/acme/dev/sensor-r/req", encode(RenewalRequest(
                request_id=os.urandom(16), profile=Profile.IDENTITY, current_serial=dev.serial, csr=csr)), qos=1)
        for _ in range(4):
            saw("certmq_renewal_total", "renewal_request", (await next_message(d))[1])
        renewal_results = {r for (counter, r) in expected if counter == "certmq_renewal_total"}
        assert "issued" in renewal_results and "rate_limited" in renewal_results and len(renewal_results) == 3

        # revocations: all of sensor-r's certificates (it is connected: kicked), then an unknown serial
        await o.subscribe("certmq/v1/acme/ops/op1/res", qos=1)
        revoked = 0
        for target in ({"device_id": "sensor-r"}, {"serial": 0x5EED}):
            await o.publish("certmq/v1/acme/ops/op1/req", encode(RevocationRequest(
                request_id=os.urandom(16), reason=RevocationReason.KEY_COMPROMISE, **target)), qos=1)
            reply = (await next_message(o))[1]
            types["revocation_request"] = types.get("revocation_request", 0) + 1
            if isinstance(reply, RevocationResult):
                revoked += len(reply.serials)
            else:
                assert isinstance(reply, Error)
                expected[("certmq_revocation_total", result_of(reply))] = 1
        assert revoked == 2  # the minted certificate and its renewal

        async def device_gone() -> bool:
            got = await samples(port)
            return value(got, "certmq_connected_clients", tenant="acme", kind="device") == 0
        await eventually(device_gone)
        got = await samples(port)
        assert value(got, "certmq_connected_clients", tenant="acme", kind="operator") == 1
    expected[("certmq_revocation_total", "revoked")] = revoked

    for (counter, result), n in expected.items():
        profile = "any" if counter == "certmq_revocation_total" and result != "revoked" else "identity"
        assert value(got, counter, tenant="acme", profile=profile, result=result) == n, (counter, result)
    total_counted = sum(v for (name, _), v in got.items() if name in (
        "certmq_issuance_total", "certmq_renewal_total", "certmq_revocation_total"))
    assert total_counted == sum(expected.values())
    for kind, n in types.items():
        assert value(got, "certmq_signing_latency_seconds_count", type=kind) == n, kind
        assert value(got, "certmq_signing_latency_seconds_sum", type=kind) > 0, kind
    assert value(got, "certmq_kicked_sessions_total") == 1
    assert value(got, "certmq_admission_queue_depth") == 0
    assert value(got, "certmq_admission_queue_capacity") == plugin.admission.capacity
    for feed in await ca.registry.feed_lists("acme"):
        assert value(got, "certmq_feed_sequence", tenant="acme", region=feed.region) == feed.feed_sequence
    assert any(name == "certmq_feed_sequence" and v >= 1 for (name, _), v in got.items())

    # registry-derived gauges appear with the health check, not per scrape
    assert value(got, "certmq_certificates", tenant="acme", state="revoked") == 0
    [report] = await plugin.run_health_checks("acme")
    got = await samples(port)
    records = [r async for r in ca.registry.certificates("acme")]
    now = report.generated_at
    active = [r for r in records if r.status is CertificateStatus.ACTIVE]
    assert value(got, "certmq_certificates", tenant="acme", state="revoked") == len(records) - len(active) == 2
    assert value(got, "certmq_certificates", tenant="acme", state="active") == len(active)
    within_30 = sum(1 for r in active if dt.timedelta(days=7) < r.not_after - now <= dt.timedelta(days=30))
    assert value(got, "certmq_certificates_by_expiry", tenant="acme", bucket="30d") == within_30 == len(active)
    assert value(got, "certmq_health_last_run_timestamp_seconds", tenant="acme") == now.timestamp()

    assert (await scrape(port, "/nope"))[0] == 404


async def _findings(c: aiomqtt.Client, timeout: float = 10.0) -> dict[str, Any]:
    async def first() -> dict[str, Any]:
        async for m in c.messages:
            assert str(m.topic) == "certmq/v1/acme/ops/findings"
            return json.loads(bytes(m.payload))  # type: ignore[arg-type]
        raise AssertionError("message stream ended")
    return await asyncio.wait_for(first(), timeout)


async def test_findings_reach_operators_and_sessions_are_recorded(make_broker, ca) -> None:
    # the revocation poller is off, so a revocation made behind the broker's back kicks no one
    broker = await make_broker(health_interval=0, session_flush=0.05, revocation_poll=3600)
    plugin = CertmqPlugin.of(broker)
    dev = await ca.mint("acme", "sensor-x")
    op = await ca.mint("acme", "op1", CertificateKind.OPERATOR)
    async with client(broker, op) as o:
        await o.subscribe("certmq/v1/acme/ops/findings", qos=1)
        first = client(broker, dev)
        await first.__aenter__()
        try:
            async with client(broker, dev) as second:  # the same certificate again: a takeover
                await ca.service.revoke(tenant="acme", reason=RevocationReason.KEY_COMPROMISE, actor="tests",
                                        serial=dev.serial)
                [report] = await plugin.run_health_checks("acme")
                doc = await _findings(o)
                await second.subscribe("certmq/v1/acme/dev/sensor-x/res", qos=1)  # still connected
        finally:
            with contextlib.suppress(Exception):
                await first.__aexit__(None, None, None)
    subject = f"acme/sensor-x/{dev.serial:x}"
    published = {(f["check"], f["subject"]): f for f in doc["findings"]}
    assert published[("conflicting-sessions", subject)]["severity"] == "high"
    assert published[("revoked-still-connected", subject)]["severity"] == "critical"
    assert doc["tenant"] == "acme" and doc["node"] == plugin.fleet.node
    assert doc["counts"] == dict(report.counts) and doc["finding_counts"]["conflicting-sessions"] == 1

    # the registry holds the same report (what `certmq status` shows) and the session row
    [stored] = await ca.registry.health_reports("acme")
    assert stored.report["findings"] == doc["findings"] and stored.node == plugin.fleet.node

    async def recorded() -> bool:
        rows = [r for r in await ca.registry.sessions("acme") if r.device_id == "sensor-x"]
        return len(rows) == 1 and not rows[0].live
    await eventually(recorded)
    [row] = [r for r in await ca.registry.sessions("acme") if r.device_id == "sensor-x"]
    assert row.connects == 2 and row.duplicates == 1 and row.last_duplicate_at is not None
    assert row.remote and row.remote.startswith("127.0.0.1:")
    [op_row] = [r for r in await ca.registry.sessions("acme") if r.device_id == "op1"]
    assert op_row.kind == "operator" and op_row.connects == 1


async def test_findings_are_published_periodically_and_retained(make_broker, ca) -> None:
    broker = await make_broker(health_interval=0.5)
    op = await ca.mint("acme", "op1", CertificateKind.OPERATOR)
    await asyncio.sleep(0.7)  # the first report (0.5 s after start) is already retained
    async with client(broker, op) as o:
        await o.subscribe("certmq/v1/acme/ops/findings", qos=1)
        reports = [await _findings(o, 5), await _findings(o, 5), await _findings(o, 5)]
    assert all(r["tenant"] == "acme" for r in reports)
    assert reports[0]["generated_at_epoch"] <= reports[-1]["generated_at_epoch"]
    # the operator certificate minted after the broker started shows up in a later report
    assert reports[-1]["counts"]["active"] == 1
    globex = await ca.mint("globex", "op2", CertificateKind.OPERATOR)
    async with client(broker, globex, trust=ca.chain("acme")) as g:  # another tenant's operator gets its own tenant's reports only
        await g.subscribe("certmq/v1/globex/ops/findings", qos=1)
        async for m in g.messages:
            assert str(m.topic) == "certmq/v1/globex/ops/findings"
            assert json.loads(bytes(m.payload))["tenant"] == "globex"  # type: ignore[arg-type]
            break
