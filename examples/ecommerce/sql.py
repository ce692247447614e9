"""The few SQL helpers the services share: one statement text for SQLite (``?``) and
PostgreSQL (asyncpg, ``$1``), run on the connection of the service's open transaction."""

from __future__ import annotations

import re
import sqlite3
from typing import Any

_MARK = re.compile(r"\?")


def _pg(sql: str) -> str:
    n = 0

    def number(_: re.Match[str]) -> str:
        nonlocal n
        n += 1
        return f"${n}"

    return _MARK.sub(number, sql)


def is_sqlite(conn: Any) -> bool:
    return isinstance(conn, sqlite3.Connection)


async def execute(conn: Any, sql: str, *args: Any) -> int:
    """Run one statement; returns the number of rows it changed."""
    if is_sqlite(conn):
        return conn.execute(sql, args).rowcount
    status = await conn.execute(_pg(sql), *args)
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


async def fetch(conn: Any, sql: str, *args: Any) -> list[dict[str, Any]]:
    if is_sqlite(conn):
        cur = conn.execute(sql, args)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    return [dict(r) for r in await conn.fetch(_pg(sql), *args)]


async def fetchrow(conn: Any, sql: str, *args: Any) -> dict[str, Any] | None:
    rows = await fetch(conn, sql, *args)
    return rows[0] if rows else None


async def script(conn: Any, statements: list[str]) -> None:
    for s in statements:
        await execute(conn, s)


async def append(log: Any, conn: Any, stream: str, expected: int, events: Any) -> None:
    """Append to the service's event log on either kind of connection."""
    if is_sqlite(conn):
        log.append(conn, stream, expected, events)
    else:
        await log.append_async(conn, stream, expected, events)


async def create_tables(service: Any, statements: list[str]) -> None:
    """The service's own tables, in its schema on PostgreSQL (made here if missing)."""
    if service.schema is not None:
        async with service.transaction() as conn:
            await execute(conn, f'CREATE SCHEMA IF NOT EXISTS "{service.schema}"')
    async with service.transaction() as conn:
        await script(conn, statements)
