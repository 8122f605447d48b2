"""Packaging promises: one console script, and a device install never pulls broker-side weight."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
# What a device must never install: the broker, database drivers, plotting, server-side config.
NEVER_ON_A_DEVICE = {"amqtt", "asyncpg", "psycopg", "psycopg2", "matplotlib", "prometheus-client", "pydantic", "rich"}


def names(requirements: list[str]) -> set[str]:
    found = set()
    for req in requirements:
        match = re.match(r"[A-Za-z0-9_.-]+", req)
        assert match, req
        found.add(match.group(0).lower())
    return found


def test_distribution_name_python_and_one_console_script() -> None:
    assert PROJECT["name"] == "certmq"
    assert PROJECT["requires-python"] == ">=3.11"
    assert PROJECT["scripts"] == {"certmq": "broker_plugin.cli:main"}


def test_base_install_is_the_wire_format_only() -> None:
    assert names(PROJECT["dependencies"]) == {"cbor2", "cryptography"}
    assert any(r.startswith("cryptography>=50") for r in PROJECT["dependencies"])


def test_device_extras_pull_only_what_a_device_needs() -> None:
    extras = PROJECT["optional-dependencies"]
    for extra in ("device", "device-pkcs11"):
        pulled = names(PROJECT["dependencies"]) | names(extras[extra])
        assert not pulled & NEVER_ON_A_DEVICE, f"certmq[{extra}] pulls {pulled & NEVER_ON_A_DEVICE}"
        assert {"aiomqtt", "paho-mqtt"} <= pulled


def test_packages_are_the_three_import_packages() -> None:
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == [
        "protocol*",
        "device_client*",
        "broker_plugin*",
    ]
