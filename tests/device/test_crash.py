"""Kill a rotation at every fault point (and at random moments) in 100 device directories;
a fresh process must find a usable current certificate in every one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HELPER = Path(__file__).with_name("rotation_child.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> object:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CERTMQ_FAULT_AT", None)
    proc = subprocess.run([sys.executable, str(HELPER), *args], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_hundred_devices_survive_kills_at_every_rotation_step(tmp_path: Path) -> None:
    summary = _run("run", str(tmp_path), "100", "20260301")
    assert isinstance(summary, dict)
    points = summary["points"]
    # a rotation has many distinct steps, and the child was killed at each of them
    assert points >= 15, summary
    assert set(range(1, points + 1)) <= set(summary["indices_killed"]), summary
    assert summary["fault_exits"] + summary["sigkills"] >= 100, summary
    assert {"atomic_write.renamed", "slot.renamed", "store.staged", "store.proven", "store.committed"} <= set(summary["point_names"])
    verdict = _run("verify", str(tmp_path))
    assert isinstance(verdict, dict) and len(verdict) == 100
    bad = {k: v for k, v in verdict.items() if v != "ok"}
    assert not bad, bad
