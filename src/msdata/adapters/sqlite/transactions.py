"""A service's transactions on its SQLite file (see :class:`msdata.service.Service`)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

from msdata.adapters.sqlite._db import path_from_url

__all__ = ["SqliteTransactions"]


class SqliteTransactions:
    """One connection to the service's SQLite file, one transaction at a time in this
    process (an asyncio lock): SQLite has one writer anyway, and a second sync ``BEGIN`` on
    the event loop's thread while the first transaction awaits would block the loop until
    the busy timeout. ``BEGIN IMMEDIATE`` takes the write lock at the start, so a
    transaction never fails half way on a lock upgrade."""

    def __init__(self, path: str, *, busy_timeout: float = 30.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SqliteTransactions:
        """``sqlite:///relative.db`` or ``sqlite:////absolute.db``."""
        return cls(path_from_url(url), **options)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._conn = conn
        return self._conn

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[sqlite3.Connection]:
        async with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    async def close(self) -> None:
        if self._conn is not None:
            async with self._lock:
                self._conn.close()
                self._conn = None
