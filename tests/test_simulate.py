"""``certmq simulate``: the renewal-load picture (pure renewal math, no broker)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker_plugin.simulate import simulate
from test_cli import certmq


def test_simulate_writes_a_png_and_reports_the_spread(tmp_path: Path) -> None:
    out = tmp_path / "plots" / "load.png"
    result = certmq("simulate", "--devices", "20000", "--days", "730", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["renewals"] == 20000  # 730-day certificates renew once within 730 days
    assert report["unstaggered_max_per_day"] == 20000  # the spike staggering removes
    assert report["staggered_max_over_mean"] <= 1.3
    assert report["steady_state_per_day"] == pytest.approx(20000 / 730, abs=0.1)


def test_article_numbers() -> None:
    # 50,000 sensors, 2-year certificates: ~68 operations a day once spread, not a spike.
    result = simulate(devices=50_000, days=730, lifetime=730, window=(0.75, 0.90))
    assert result["steady_state_per_day"] == pytest.approx(68.5, abs=0.1)
    assert result["staggered_max_over_mean"] <= 1.3
    per_day = result["per_day"]
    assert isinstance(per_day, list) and max(per_day) < 50_000 / 50


def test_several_generations_stay_spread() -> None:
    result = simulate(devices=5_000, days=400, lifetime=60, window=(0.5, 0.9))
    assert result["renewals"] > 5_000 * 5
    per_day = result["per_day"]
    assert isinstance(per_day, list)
    # After the first generations every day sees renewals; none sees the whole fleet.
    assert min(per_day[100:]) > 0 and max(per_day) < 5_000 / 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--devices", "0"), "between"),
        (("--devices", "lots"), "whole number"),
        (("--window", "0.9,0.5"), "start,end"),
        (("--days", "-3"), "between"),
    ],
)
def test_bad_arguments(args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    result = certmq("simulate", *args, "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2
    assert message in result.stderr.lower()
    assert not (tmp_path / "x.png").exists()
