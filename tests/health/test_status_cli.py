"""`certmq status` and `certmq broker --metrics-port` as real processes: JSON parsed and compared
with the registry, text output, bad options (exit 2), a missing data directory (exit 1)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from broker_plugin.store.base import SessionUpdate
from plugin.conftest import ca, datadir, wait_ready  # noqa: F401 (fixtures)
from protocol.codes import RevocationReason

from .test_broker import scrape


def certmq(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker_plugin.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


async def test_status_json_and_text(datadir: Path, ca: Any) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    s1, s2, s3 = [await ca.mint("acme", f"s{i}") for i in (1, 2, 3)]
    await ca.registry.record_sessions([
        SessionUpdate(tenant="acme", device_id="s1", serial=s1.serial, kind="device", client_id="s1", node="n9",
                      remote="10.1.2.3:4000", last_seen=now, connected_at=now, connects=1),
        SessionUpdate(tenant="acme", device_id="s2", serial=s2.serial, kind="device", client_id="s2", node="n9",
                      last_seen=now - dt.timedelta(hours=3), connected_at=now - dt.timedelta(hours=4),
                      disconnected_at=now - dt.timedelta(hours=3), connects=1),
    ])
    await ca.service.revoke(tenant="acme", reason=RevocationReason.KEY_COMPROMISE, actor="tests", serial=s1.serial)
    await ca.registry.put_health_report("acme", "n9", now, {"finding_counts": {"weak-key": 1}, "findings": [
        {"check": "weak-key", "severity": "high", "subject": "acme/x/1", "text": "t", "details": {}}]})

    done = certmq("status", "--data", str(datadir), "--json", "--forecast-days", "40")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    tenants = {t["tenant"]: t for t in doc["tenants"]}
    assert set(tenants) == {"acme", "globex"}
    acme = tenants["acme"]
    counts = await ca.registry.count_by_status("acme")
    assert acme["counts"] == {"active": counts["active"], "expired": 0, "revoked": counts["revoked"]} \
        == {"active": 2, "expired": 0, "revoked": 1}
    assert acme["expiring"] == {"7d": 0, "30d": 2, "90d": 2}
    assert len(acme["forecast"]) == 40 and sum(d["renewals"] for d in acme["forecast"]) == 2
    devices = {d["device_id"]: d for d in acme["devices"]}
    assert set(devices) == {"s2", "s3"}  # s1's only certificate is revoked
    assert devices["s3"]["last_seen"] is None and devices["s2"]["live"] is False
    assert devices["s2"]["last_seen"] == (now - dt.timedelta(hours=3)).isoformat().replace("+00:00", "Z")
    [finding] = acme["findings"]
    assert (finding["check"], finding["severity"], finding["subject"]) == (
        "revoked-still-connected", "critical", f"acme/s1/{s1.serial:x}")
    assert "10.1.2.3:4000" in finding["text"]
    [stored] = acme["broker_reports"]
    assert stored["node"] == "n9" and stored["findings"][0]["check"] == "weak-key"
    assert tenants["globex"]["counts"] == {"active": 0, "expired": 0, "revoked": 0}

    only = json.loads(certmq("status", "--data", str(datadir), "--json", "--tenant", "globex").stdout)
    assert [t["tenant"] for t in only["tenants"]] == ["globex"]

    text = certmq("status", "--data", str(datadir), "--tenant", "acme")
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "tenant acme" in out and "2 active, 0 expired, 1 revoked" in out
    assert "CRITICAL" in out and "revoked-still-connected" in out and "node n9" in out
    assert "s3" in out and "never seen" in out


def test_status_bad_options_and_missing_data(tmp_path: Path) -> None:
    missing = certmq("status", "--data", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr and missing.stdout == ""
    (tmp_path / "empty").mkdir()
    for args, message in [
        (("--tenant", "nope"), "no tenant 'nope'"),
        (("--forecast-days", "0"), "--forecast-days"),
        (("--days-without-renewal", "-3"), "--days-without-renewal"),
        (("--days-without-renewal", "many"), "invalid int value"),
        (("--devices", "-1"), "--devices"),
    ]:
        done = certmq("status", "--data", str(tmp_path / "empty"), *args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and done.stdout == ""
    assert not (tmp_path / "empty" / "registry.db").exists()  # bad input changes nothing


async def test_broker_process_serves_metrics_and_reports(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-m", "broker_plugin.cli", "broker", "--data", str(data), "--port", "0",
                             "--metrics-port", "0", "--health-interval", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = wait_ready(data / "broker" / "ready.json", proc)
        port = int(ready["metrics_port"])
        deadline = time.monotonic() + 10
        while True:
            status, body = await scrape(port)
            assert status == 200
            values = {(s.name, tuple(sorted(s.labels.items()))): s.value
                      for f in text_string_to_metric_families(body) for s in f.samples}
            if ("certmq_health_last_run_timestamp_seconds", (("tenant", "dev"),)) in values:
                break
            assert time.monotonic() < deadline, "no health check reached the metrics"
            await asyncio.sleep(0.1)
        assert values[("certmq_admission_queue_capacity", ())] == 2000
        assert values[("certmq_certificates", (("state", "active"), ("tenant", "dev")))] == 0
        status_doc = json.loads(certmq("status", "--data", str(data), "--json").stdout)
        [dev] = status_doc["tenants"]
        assert [r["node"] for r in dev["broker_reports"]] and dev["broker_reports"][0]["age_seconds"] < 30
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"metrics on http://127.0.0.1:{port}/metrics" in out
    bad = certmq("broker", "--data", str(data), "--port", "0", "--metrics-port", "70000")
    assert bad.returncode == 2 and "--metrics-port" in bad.stderr
