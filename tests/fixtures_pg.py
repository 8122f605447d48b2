"""PostgreSQL server fixture (started by the tests on 127.0.0.1, free port) and registry fixtures.

One real server per test session (initdb + pg_ctl, fsync off, in a temp dir); each test that asks
for ``pg_registry_url`` gets a fresh, empty database. initdb refuses to run as root, so as root the
server runs as the ``postgres`` OS user (from the Debian ``postgresql`` package). Missing binaries
FAIL the tests that need them, with a message saying what to install: nothing is skipped.

``registry`` / ``registry_url`` are parametrised over both backends, so any test using them runs
against SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["PgServer", "pg_registry_url", "postgres_server", "postgres_url", "registry", "registry_url"]

_INSTALL_HINT = "install the Debian package 'postgresql' (apt-get install -y postgresql)"


def _find_bindir() -> Path:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    for d in candidates:
        if os.access(Path(d, "initdb"), os.X_OK) and os.access(Path(d, "pg_ctl"), os.X_OK):
            return Path(d)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(os.path.realpath(initdb)).parent
    pytest.fail(f"PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin or PATH: {_INSTALL_HINT}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, kw_only=True)
class PgServer:
    """A running test server: ``url(db)`` builds a connection URL, ``sql(...)`` runs psql as superuser."""

    bindir: Path
    directory: Path
    port: int
    user: str = "postgres"

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, *, database: str = "postgres") -> str:
        psql = self.bindir / "psql"
        if not psql.exists():
            psql = Path(shutil.which("psql") or "psql")
        proc = subprocess.run(
            [str(psql), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(self.port),
             "-U", self.user, "-d", database, "-c", statement],
            capture_output=True, text=True, timeout=60,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"psql failed ({statement!r}): {proc.stderr.strip()}")
        return proc.stdout


def _as_server_user(cmd: list[str], *, as_root: bool) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if as_root else cmd


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PgServer]:
    """Start one PostgreSQL server for the session; stop it and remove its files at the end."""
    bindir = _find_bindir()
    as_root = os.geteuid() == 0
    if as_root:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail(f"running as root but there is no 'postgres' OS user to run the server: {_INSTALL_HINT}")
        if shutil.which("runuser") is None:
            pytest.fail("running as root and 'runuser' (util-linux) is missing: cannot drop privileges for initdb")
    directory = Path(tempfile.mkdtemp(prefix="certmq-pg-"))
    data = directory / "data"
    log = directory / "server.log"
    if as_root:
        os.chown(directory, owner.pw_uid, owner.pw_gid)
    started = False
    try:
        run = subprocess.run(
            _as_server_user([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                             "--encoding=UTF8", "--no-locale", "--no-sync"], as_root=as_root),
            capture_output=True, text=True, timeout=120,
        )
        if run.returncode != 0:
            pytest.fail(f"initdb failed:\n{run.stdout}\n{run.stderr}")
        port = _free_port()
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {directory} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200 -c shared_buffers=32MB"
        )
        run = subprocess.run(
            _as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                             "-o", options, "start"], as_root=as_root),
            capture_output=True, text=True, timeout=120,
        )
        started = True
        if run.returncode != 0:
            text = log.read_text(errors="replace") if log.exists() else ""
            pytest.fail(f"pg_ctl start failed:\n{run.stdout}\n{run.stderr}\n{text}")
        yield PgServer(bindir=bindir, directory=directory, port=port)
    finally:
        if started:
            subprocess.run(
                _as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                                as_root=as_root),
                capture_output=True, timeout=60,
            )
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PgServer) -> str:
    """URL of a database ``certmq`` on the session's server (shared by the whole session)."""
    postgres_server.sql("CREATE DATABASE certmq")
    return postgres_server.url("certmq")


@pytest.fixture
def pg_registry_url(postgres_server: PgServer) -> Iterator[str]:
    """A fresh, empty database for one test (dropped afterwards)."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    postgres_server.sql(f"CREATE DATABASE {name} TEMPLATE template0")
    yield postgres_server.url(name)
    postgres_server.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL for an empty registry, once per backend."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/data/registry.db"
    return str(request.getfixturevalue("pg_registry_url"))


@pytest.fixture
async def registry(registry_url: str) -> AsyncIterator[object]:
    """An open registry on each backend, closed after the test."""
    from broker_plugin.store.base import open_registry

    reg = await open_registry(registry_url)
    try:
        yield reg
    finally:
        await reg.close()
