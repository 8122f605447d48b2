"""The ``certmq`` command as a user runs it (a real subprocess of the installed script)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CERTMQ = shutil.which("certmq", path=str(Path(sys.executable).parent))


def certmq(*args: str) -> subprocess.CompletedProcess[str]:
    assert CERTMQ, "the certmq console script is not installed in this environment (pip install -e .)"
    return subprocess.run([CERTMQ, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "usage"),
        (("bogus",), "invalid choice"),
        (("demo", "--devices", "0"), "1..100000"),
        (("demo", "--devices", "many"), "invalid"),
    ],
)
def test_bad_arguments_give_a_clear_error_and_status_2(args: tuple[str, ...], message: str) -> None:
    result = certmq(*args)
    assert result.returncode == 2
    assert message in (result.stderr + result.stdout).lower()


def test_help_exits_zero() -> None:
    result = certmq("--help")
    assert result.returncode == 0 and "demo" in result.stdout
