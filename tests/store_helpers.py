"""How the store tests set up stores and callers' transactions, shared by the SQLite and
PostgreSQL test files of the outbox, inbox, event store, checkpoints, sagas and idempotency
keys."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
import pytest

T = TypeVar("T")
S = TypeVar("S")


def table_prefix() -> str:
    """A table prefix of this test's own (PostgreSQL tables are shared by every test)."""
    return f"t{uuid.uuid4().hex[:10]}_"


@asynccontextmanager
async def opened(store: S, *, drop: bool = False) -> AsyncIterator[S]:
    """``store`` with its schema created; closed at the end (its tables dropped first with
    ``drop``: PostgreSQL, where the tables outlive the test)."""
    s: Any = store
    await s.create_schema()
    try:
        yield store
    finally:
        if drop:
            await s.drop_schema()
        await s.close()


class PgTx:
    """A caller's transaction on its own asyncpg connection."""

    def __init__(self, conn: Any, tx: Any) -> None:
        self.conn, self.tx = conn, tx

    @classmethod
    async def open(cls, url: str) -> PgTx:
        conn = await asyncpg.connect(url)
        tx = conn.transaction()
        await tx.start()
        return cls(conn, tx)

    async def end(self, commit: bool) -> None:
        if self.conn.is_closed():
            return
        try:
            await (self.tx.commit() if commit else self.tx.rollback())
        finally:
            await self.conn.close()


class PostgresHooks:
    """The conformance suites' begin/commit/rollback on :class:`PgTx`; ``self.url`` is the
    test server's."""

    url: str

    @pytest.fixture(autouse=True)
    def _url(self, postgres_url: str) -> None:
        self.url = postgres_url

    async def begin(self, store: Any) -> PgTx:
        return await PgTx.open(self.url)

    async def commit(self, tx: PgTx) -> None:
        await tx.end(True)

    async def rollback(self, tx: PgTx) -> None:
        await tx.end(False)


class ThreadTx:
    """A caller's transaction on its own sqlite3 connection, in its own thread, so one
    waiting for SQLite's write lock does not stop the event loop."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._ex = ThreadPoolExecutor(1)
        self.conn: sqlite3.Connection

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._ex, fn, *args)

    async def open(self) -> ThreadTx:
        def connect() -> None:
            self.conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)

        await self.run(connect)
        return self

    async def end(self, commit: bool) -> None:
        def finish() -> None:
            if commit:
                self.conn.commit()
            else:
                self.conn.rollback()
            self.conn.close()

        try:
            await self.run(finish)
        except sqlite3.ProgrammingError:  # already closed
            pass
        finally:
            self._ex.shutdown(wait=False)


class SqliteHooks:
    """The conformance suites' begin/commit/rollback on :class:`ThreadTx` (on the store's
    file)."""

    async def begin(self, store: Any) -> ThreadTx:
        return await ThreadTx(store.path).open()

    async def commit(self, tx: ThreadTx) -> None:
        await tx.end(True)

    async def rollback(self, tx: ThreadTx) -> None:
        await tx.end(False)
