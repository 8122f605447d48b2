"""SQLite backend of the registry: the embedded default (one file under the data dir, WAL mode).

The stdlib ``sqlite3`` connection lives on ONE dedicated worker thread and is only ever touched
there, so the event loop never waits on disk. Transactions are serialised by an asyncio lock (one
connection, one transaction at a time) and opened with ``BEGIN IMMEDIATE``, which also excludes
writers in other processes for the transaction's whole life — that is what SQLite gives in place
of row locks. Statements of a cancelled transaction still run in order on the thread, followed by
its rollback. Registry operations on the hot path (:meth:`~.base.Registry._run`) run their whole
transaction as one function on that thread: one hop per transaction, not one per statement.

All SQL and all business rules live in :mod:`.base`; this module only adapts the driver.
"""

from __future__ import annotations

import asyncio
import functools
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from . import schema
from .base import Registry, RegistryError

__all__ = ["SqliteRegistry", "sqlite_path"]

T = TypeVar("T")


@functools.lru_cache(maxsize=512)
@functools.lru_cache(maxsize=1024)
def _translate(sql: str) -> str:
    # Shared SQL uses $n placeholders and FOR UPDATE; SQLite spells the first ?n and needs no
    # row locks because BEGIN IMMEDIATE already holds the database's write lock. Cached: the
    # statements are a small fixed set, and a batch's multi-row INSERT has ~900 placeholders,
    # whose substitution used to cost more than executing the statement.
    return re.sub(r"\$(\d+)", r"?\1", sql).replace(" FOR UPDATE", "")


def sqlite_path(url: str) -> Path:
    """File path of a ``sqlite://`` URL: ``sqlite:///abs/x.db`` -> ``/abs/x.db``, ``sqlite://rel/x.db`` -> ``rel/x.db``."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ValueError(f"not a sqlite URL: {url!r}")
    raw = parts.netloc + parts.path
    if not raw or raw == "/":
        raise ValueError(f"sqlite URL {url!r} names no file")
    return Path(raw)


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: we issue BEGIN/COMMIT ourselves. timeout = busy wait for other processes.
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    try:
        conn.row_factory = sqlite3.Row
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RegistryError(f"could not put {path} into WAL mode (got {mode!r})")
        # FULL: a certificate is sent only after its commit, so the commit must survive power loss.
        conn.execute("PRAGMA synchronous=FULL")
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection, where: str, target: int | None) -> int:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(schema.VERSION_TABLE)
        current = int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])
        schema.check_version(current, where=where)
        for step in schema.pending("sqlite", current, target=target):
            for statement in step.statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                (step.version, step.description, int(time.time())),
            )
            current = step.version
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return current


class _ThreadTx:
    """The transaction interface for a body run whole on the database thread: every call
    completes at once, so the body's coroutine never suspends (see :func:`_drive`)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> None:
        self._conn.execute(_translate(sql), args)

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        return self._conn.execute(_translate(sql), args).fetchall()

    async def fetchrow(self, sql: str, *args: Any) -> Any | None:
        return self._conn.execute(_translate(sql), args).fetchone()


def _drive(awaitable: Awaitable[T]) -> T:
    # Run a coroutine that never suspends to its end, synchronously, on the calling thread.
    if not isinstance(awaitable, Coroutine):
        raise TypeError("a registry transaction body must be a coroutine function")
    coro: Coroutine[Any, Any, T] = awaitable
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a registry transaction body awaited something other than its transaction")


class _Tx:
    def __init__(self, registry: SqliteRegistry) -> None:
        self._r = registry

    async def execute(self, sql: str, *args: Any) -> None:
        await self._r._call(self._r._execute, _translate(sql), args)

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        return await self._r._call(self._r._fetch, _translate(sql), args)

    async def fetchrow(self, sql: str, *args: Any) -> Any | None:
        rows = await self._r._call(self._r._fetch, _translate(sql), args)
        return rows[0] if rows else None


class SqliteRegistry(Registry):
    """Registry in one SQLite file. Use :func:`~.base.open_registry` or :meth:`open`."""

    dialect = "sqlite"

    def __init__(self, *, path: Path, executor: ThreadPoolExecutor, conn: sqlite3.Connection, version: int) -> None:
        self.path = path
        self.schema_version = version
        self._executor: ThreadPoolExecutor | None = executor
        self._conn = conn
        self._lock = asyncio.Lock()
        self._reads: list[tuple[Callable[[Any], Awaitable[Any]], asyncio.Future[Any]]] = []
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, url: str, *, migrate_to: int | None = None) -> SqliteRegistry:
        """Open ``url``, creating the file and applying missing migrations (up to ``migrate_to``,
        default all: a lower target exists for tests and tooling that need an old-version file)."""
        path = sqlite_path(url)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="certmq-sqlite")
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(executor, _connect, path)
            try:
                version = await loop.run_in_executor(executor, _migrate, conn, str(path), migrate_to)
            except BaseException:
                await loop.run_in_executor(executor, conn.close)
                raise
        except (sqlite3.Error, OSError) as exc:
            executor.shutdown(wait=True)
            raise RegistryError(f"cannot open the registry file {path}: {exc}") from exc
        except BaseException:
            executor.shutdown(wait=True)
            raise
        return cls(path=path, executor=executor, conn=conn, version=version)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise RegistryError("registry is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _execute(self, sql: str, args: tuple[Any, ...]) -> None:
        self._conn.execute(sql, args)

    def _fetch(self, sql: str, args: tuple[Any, ...]) -> list[sqlite3.Row]:
        return self._conn.execute(sql, args).fetchall()

    @asynccontextmanager
    async def _transaction(self, *, write: bool) -> AsyncIterator[_Tx]:
        try:
            async with self._lock:
                try:
                    await self._call(self._execute, "BEGIN IMMEDIATE" if write else "BEGIN", ())
                    yield _Tx(self)
                except BaseException:
                    await self._end_open_transaction()
                    raise
                await self._call(self._execute, "COMMIT", ())
        except sqlite3.Error as exc:
            # Driver errors stop here: callers see the registry's error tree only.
            raise RegistryError(f"SQLite ({self.path}): {exc}") from exc

    async def _end_open_transaction(self) -> None:
        """Roll back whatever transaction this connection has open, even for a cancelled caller.

        A caller cancelled while it awaits a hop (its BEGIN, a statement) stops waiting, but the
        database thread still runs that hop: the connection would stay inside the transaction and
        every later BEGIN fail ("cannot start a transaction within a transaction") -- the registry
        wedged for good. The rollback is queued behind the hop on the one database thread, so it
        runs after it whatever happens to this await, and before anyone else's BEGIN."""
        if self._executor is None:
            return
        conn = self._conn

        def rollback() -> None:
            if conn.in_transaction:
                conn.execute("ROLLBACK")

        done = asyncio.get_running_loop().run_in_executor(self._executor, rollback)
        try:
            await asyncio.shield(done)
        except (asyncio.CancelledError, sqlite3.Error):
            pass  # cancelled again: the rollback still runs first (queued); the caller's own error counts

    async def _run(self, body: Callable[[Any], Awaitable[T]], *, write: bool) -> T:
        # The whole transaction -- BEGIN, every statement, COMMIT (or ROLLBACK) -- in ONE hop to
        # the database thread: a hop costs far more than a statement, and the fsync of the
        # COMMIT is paid once for everything the body wrote.
        if not write:
            return await self._read(body)
        conn = self._conn

        def transaction() -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = _drive(body(_ThreadTx(conn)))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        try:
            async with self._lock:
                return await self._call(transaction)
        except sqlite3.Error as exc:
            raise RegistryError(f"SQLite ({self.path}): {exc}") from exc

    async def _read(self, body: Callable[[Any], Awaitable[T]]) -> T:
        # Reads issued while the connection is busy (or in the same turn of the loop: a batch's
        # requests look things up side by side) share one hop and one read snapshot. They are
        # concurrent, so any order among them -- and one snapshot for all -- is a valid one.
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._reads.append((body, future))
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._flush_reads(), name="certmq-sqlite-reads")
        return await future  # type: ignore[no-any-return]

    async def _flush_reads(self) -> None:
        conn = self._conn

        def run_all(bodies: list[Callable[[Any], Awaitable[Any]]]) -> list[tuple[bool, Any]]:
            out: list[tuple[bool, Any]] = []
            conn.execute("BEGIN")
            try:
                for body in bodies:
                    try:
                        out.append((True, _drive(body(_ThreadTx(conn)))))
                    except sqlite3.Error as exc:
                        out.append((False, RegistryError(f"SQLite ({self.path}): {exc}")))
                    except Exception as exc:
                        out.append((False, exc))
            finally:
                conn.execute("COMMIT")  # ends the read snapshot; nothing was written
            return out

        while self._reads:
            async with self._lock:
                batch, self._reads = self._reads, []
                try:
                    results = await self._call(run_all, [body for body, _ in batch])
                except BaseException as exc:
                    failure = exc if isinstance(exc, Exception) else RegistryError("registry read cancelled")
                    if isinstance(failure, sqlite3.Error):
                        failure = RegistryError(f"SQLite ({self.path}): {failure}")
                    results = [(False, failure)] * len(batch)
                    if not isinstance(exc, Exception):
                        for (_, future), (_, error) in zip(batch, results):
                            if not future.done():
                                future.set_exception(error)
                        raise
            for (_, future), (ok, value) in zip(batch, results):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        async with self._lock:
            await asyncio.get_running_loop().run_in_executor(executor, self._conn.close)
        executor.shutdown(wait=True)
