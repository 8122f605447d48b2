"""device_client runs on a device install: cbor2, cryptography, aiomqtt/paho (python-pkcs11 optional) -- never
broker_plugin, amqtt, pydantic or database drivers. Checked from the source and at runtime."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import device_client

PKG = Path(__file__).resolve().parents[2] / "device_client"
MODULES = sorted(PKG.glob("*.py"))
FORBIDDEN = {"broker_plugin", "amqtt", "pydantic", "asyncpg", "psycopg", "psycopg2", "sqlite3"}


def imported(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_modules_exist() -> None:
    assert {"keystore.py", "certstore.py", "transport.py", "agent.py", "enroll.py", "revcache.py", "faults.py",
            "mqtt.py", "cli.py"} <= {p.name for p in MODULES}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_broker_side_imports(path: Path) -> None:
    bad = imported(path) & FORBIDDEN
    assert not bad, f"device_client/{path.name} imports {sorted(bad)}"


def test_importing_everything_loads_no_broker_side_module() -> None:
    code = (
        "import sys, device_client, device_client.cli, device_client.mqtt, device_client.agent, device_client.revcache;"
        f"print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_all_is_complete_and_documented() -> None:
    for name in device_client.__all__:
        obj = getattr(device_client, name)
        assert getattr(obj, "__doc__", None), name
