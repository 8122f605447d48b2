"""``certmq demo`` as a user runs it: a real subprocess of the installed script, a real broker
process, a fleet of DeviceClients over TLS; the summary, report.json, PNG plots, exit codes, and
no broker left behind (also after Ctrl-C)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

CERTMQ = shutil.which("certmq", path=str(Path(sys.executable).parent))


def certmq(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    assert CERTMQ, "the certmq console script is not installed in this environment (pip install -e .)"
    return subprocess.run([CERTMQ, *args], capture_output=True, text=True, timeout=timeout)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = (task / "children").read_text() if (task / "children").exists() else ""
        found.extend(int(p) for p in text.split())
    return found


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert b"IEND" in data[-12:], f"{path} is truncated"
    return width, height


def test_quick_demo_runs_to_a_clean_summary(tmp_path: Path) -> None:
    """20 devices: every one provisioned from a claim over TLS, renewals happen, revocations kick the
    session, refuse the reconnection and reach both validators; exit 0; report.json agrees with the
    printed summary; the plots are PNGs; the broker process is gone."""
    report = tmp_path / "report"
    started = time.monotonic()
    result = certmq("demo", "--devices", "20", "--quick", "--report", str(report))
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr + result.stdout
    assert took < 60
    out = result.stdout
    assert "20 / 20" in out  # issued row of the summary table
    assert "failures" in out

    data = json.loads((report / "report.json").read_text())
    counts = data["counts"]
    assert data["ok"] is True and data["problems"] == []
    assert counts["issued"] == 20 and counts["devices"] == 20
    assert counts["failures"] == 0
    assert counts["renewed"] > 0 and counts["devices_renewed"] == 20
    assert counts["revoked"] >= 1
    assert counts["kicked"] == counts["revoked"] == counts["reconnect_refused"]
    assert counts["validator_updates"] == counts["revoked"] * counts["validators"] and counts["validators"] == 2
    # the timeline and the latencies are the same events the counts describe
    assert len(data["timeline_s"]["provisioned"]) == 20
    assert len(data["timeline_s"]["renewed"]) == counts["renewed"]
    assert min(data["timeline_s"]["renewed"]) > min(data["timeline_s"]["provisioned"])
    lat = data["latency_ms"]
    assert lat["issuance"]["n"] == 20 and 0 < lat["issuance"]["p50"] <= lat["issuance"]["p99"]
    assert lat["renewal"]["n"] == counts["renewed"]
    assert lat["kick"]["n"] == counts["kicked"] and lat["kick"]["max"] < 1000
    for trace in data["revocations"]:
        assert trace["reconnect_refused"] and trace["kicked_s"] is not None
        assert all(s is not None for s in trace["validators_s"])
    # the p50 shown in the table is the report's
    assert f"{lat['issuance']['p50']:,.0f} ms" in out

    assert sorted(data["plots"]) == ["latency_histogram.png", "renewals_over_time.png"]
    for name in data["plots"]:
        width, height = png_size(report / name)
        assert width > 300 and height > 200
    assert (report / "broker.log").read_text().count("listening on 127.0.0.1:") == 1
    assert data["broker"]["exit_status"] == 0
    assert not alive(data["broker"]["pid"]), "the broker process outlived the demo"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--devices", "0"), "1..100000"),
        (("--devices", "many"), "invalid"),
        (("--devices", "3", "--revoke", "3"), "needs more than 3 devices"),
        (("--revoke", "0"), "1..50"),
        (("--lines", "65"), "1..64"),
        (("--bogus",), "unrecognized"),
    ],
)
def test_bad_arguments_exit_2_and_start_nothing(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    report = tmp_path / "report"
    result = certmq("demo", *args, "--report", str(report), timeout=30)
    assert result.returncode == 2, result.stderr + result.stdout
    assert message in (result.stderr + result.stdout)
    assert not report.exists()


def test_report_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("not a directory")
    result = certmq("demo", "--quick", "--report", str(target), timeout=30)
    assert result.returncode == 2 and "not a directory" in result.stderr
    assert target.read_text() == "not a directory"


def test_ctrl_c_stops_the_fleet_and_the_broker(tmp_path: Path) -> None:
    """SIGINT to the process group (what a terminal's Ctrl-C does) while the fleet runs: exit 130,
    the broker child gone, nothing left in the group."""
    assert CERTMQ
    proc = subprocess.Popen([CERTMQ, "demo", "--quick", "--devices", "20", "--report", str(tmp_path / "r")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        broker: list[int] = []
        while time.monotonic() < deadline and not broker:
            broker = [c for c in children(proc.pid)
                      if b"broker" in Path(f"/proc/{c}/cmdline").read_bytes()]
            time.sleep(0.1)
        assert broker, "the demo never started its broker"
        time.sleep(3)  # the fleet is provisioning / renewing by now
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err + out
    assert "interrupted" in out + err
    deadline = time.monotonic() + 5
    while alive(broker[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(broker[0]), "the broker process outlived the interrupted demo"
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)
