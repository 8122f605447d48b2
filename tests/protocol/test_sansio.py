"""protocol/ is sans-I/O: no event loop, network, database, clock or random source.

A C or MicroPython implementer ports this package; it must stay pure. These
tests read every module's imports from its source (so an import inside a
function is caught too) and look for calls that read the clock or entropy.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PROTOCOL = Path(__file__).resolve().parents[2] / "protocol"
MODULES = sorted(PROTOCOL.glob("*.py"))

FORBIDDEN_MODULES = {
    # event loops and networking
    "asyncio", "socket", "ssl", "selectors", "select", "http", "urllib", "httpx", "requests", "aiohttp",
    # MQTT stacks
    "amqtt", "aiomqtt", "paho", "asyncio_mqtt",
    # databases
    "sqlite3", "asyncpg", "psycopg", "psycopg2", "dbm", "shelve",
    # clocks, entropy, processes, files
    "time", "random", "secrets", "uuid", "os", "io", "pathlib", "subprocess", "threading", "multiprocessing",
    "tempfile", "shutil",
}  # fmt: skip
CLOCK_AND_ENTROPY_CALLS = {"now", "utcnow", "today", "urandom", "token_bytes", "getrandbits", "random_serial_number"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__":
            found.add("__import__")
    return found


def test_there_are_modules_to_check() -> None:
    assert {p.name for p in MODULES} >= {"codec.py", "messages.py", "topics.py", "renewal.py", "statuslist.py"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_imports_nothing_that_does_io(path: Path) -> None:
    bad = imported_modules(path) & (FORBIDDEN_MODULES | {"__import__"})
    assert not bad, f"protocol/{path.name} imports {sorted(bad)}: protocol/ must stay sans-I/O"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_never_reads_the_clock_or_entropy(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    calls = {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    bad = calls & CLOCK_AND_ENTROPY_CALLS
    assert not bad, f"protocol/{path.name} calls {sorted(bad)}: callers pass `now` and `rng`"


def test_the_checker_catches_a_forbidden_import(tmp_path: Path) -> None:
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("def f():\n    import asyncio.events\n    from time import monotonic\n")
    assert imported_modules(sneaky) >= {"asyncio", "time"}


def test_importing_protocol_loads_no_io_framework() -> None:
    # Runtime view of the same promise (stdlib modules that cbor2/cryptography pull in
    # themselves are not ours to police; the frameworks below must never come along).
    code = (
        "import sys, protocol, protocol.topics, protocol.statuslist, protocol.extensions;"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'asyncio','amqtt','aiomqtt','paho','sqlite3','asyncpg','pydantic','broker_plugin','device_client'})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
