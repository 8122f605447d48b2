"""PostgreSQL backend of the registry (asyncpg), for CA workers sharing one database.

Writing transactions run at READ COMMITTED and take row locks (``SELECT ... FOR UPDATE``) on what
they change: the audit head row serialises the audit chain, the feed row a region's status lists,
the claim row a claim's uses; concurrent commits of one request key meet at the key's primary key.
Reads run as read-only REPEATABLE READ so a multi-statement read is one snapshot. Migrations run
under a transaction-scoped advisory lock so workers starting together migrate once.

All SQL and all business rules live in :mod:`.base`; this module only adapts the driver.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]

from . import schema
from .base import Registry, RegistryError

__all__ = ["PostgresRegistry"]

# Arbitrary constant naming certmq's migration lock among the database's advisory locks.
_MIGRATION_LOCK = 0x63657274_6D71


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


class _Tx:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> None:
        await self._conn.execute(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        return list(await self._conn.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> Any | None:
        return await self._conn.fetchrow(sql, *args)


async def _migrate(conn: asyncpg.Connection, where: str, target: int | None) -> int:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        if await conn.fetchval("SELECT to_regclass('schema_version')") is None:
            await conn.execute(schema.VERSION_TABLE)
        current = int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))
        schema.check_version(current, where=where)
        for step in schema.pending("postgresql", current, target=target):
            for statement in step.statements:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_version (version, description, applied_at) VALUES ($1, $2, $3)",
                step.version, step.description, int(time.time()),
            )
            current = step.version
    return current


class PostgresRegistry(Registry):
    """Registry in a PostgreSQL database. Use :func:`~.base.open_registry` or :meth:`open`."""

    dialect = "postgresql"

    def __init__(self, *, pool: asyncpg.Pool, version: int) -> None:
        self._pool: asyncpg.Pool | None = pool
        self.schema_version = version

    @classmethod
    async def open(
        cls, url: str, *, migrate_to: int | None = None, min_size: int = 1, max_size: int = 10
    ) -> PostgresRegistry:
        """Connect a pool to ``url`` and apply missing migrations (up to ``migrate_to``, default all)."""
        try:
            pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise RegistryError(f"cannot connect to the registry database at {_redacted(url)}: {exc}") from exc
        try:
            async with pool.acquire() as conn:
                where = f"database {urlsplit(url).path.lstrip('/')!r}"
                version = await _migrate(conn, where, migrate_to)
        except BaseException:
            await pool.close()
            raise
        return cls(pool=pool, version=version)

    @asynccontextmanager
    async def _transaction(self, *, write: bool) -> AsyncIterator[_Tx]:
        if self._pool is None:
            raise RegistryError("registry is closed")
        try:
            async with self._pool.acquire() as conn:
                if write:
                    tx = conn.transaction(isolation="read_committed")
                else:
                    tx = conn.transaction(isolation="repeatable_read", readonly=True)
                async with tx:
                    yield _Tx(conn)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # Driver errors stop here: callers see the registry's error tree only.
            raise RegistryError(f"PostgreSQL: {exc}") from exc

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
