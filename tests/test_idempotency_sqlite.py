"""The idempotency conformance suite on the SQLite store."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from msdata.adapters.sqlite.idempotency import SqliteIdempotencyStore
from msdata.idempotency import IdempotencyStore
from msdata.testing.conformance.idempotency import IdempotencyStoreConformance
from store_helpers import opened


class TestSqliteIdempotencyStore(IdempotencyStoreConformance):
    sync_connections = True

    @pytest.fixture(autouse=True)
    def _dir(self, tmp_path: Path) -> None:
        self.path = tmp_path / "idem.db"

    def store_url(self) -> str:
        return f"sqlite:///{self.path}"

    @asynccontextmanager
    async def make_store(self) -> AsyncIterator[IdempotencyStore]:
        async with opened(SqliteIdempotencyStore(self.path)) as store:
            yield store

    async def begin(self, store: Any) -> Any:
        conn = sqlite3.connect(self.path, check_same_thread=False)
        conn.execute("SELECT 1")
        return conn

    async def commit(self, conn: Any) -> None:
        conn.commit()
        conn.close()

    async def rollback(self, conn: Any) -> None:
        conn.rollback()
        conn.close()

    async def idle_connection(self, store: Any) -> Any:
        return sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)

    async def close_connection(self, conn: Any) -> None:
        conn.close()


class TestSqliteIdempotencyStoreInThread(TestSqliteIdempotencyStore):
    """The same with the store's calls in its own thread (synchronous FULL)."""

    @asynccontextmanager
    async def make_store(self) -> AsyncIterator[IdempotencyStore]:
        async with opened(SqliteIdempotencyStore(self.path, synchronous="FULL")) as store:
            yield store


async def test_claims_from_many_connections_have_one_winner(tmp_path: Path) -> None:
    """Five stores (five connections, as five processes would have) race for one key,
    ten claims each, in their own threads: exactly one claim wins."""
    import asyncio
    import itertools

    path = tmp_path / "race.db"
    stores = [SqliteIdempotencyStore(path, synchronous="FULL") for _ in range(5)]
    await stores[0].create_schema()
    now = 1_893_456_000_000_000  # 2030-01-01, Unix microseconds
    n = itertools.count()
    try:
        results = await asyncio.gather(
            *(
                s.claim_async(None, "u", "k", "", now, now + 9_000_000, lambda: f"t{next(n)}")
                for s in stores
                for _ in range(10)
            )
        )
        assert sum(isinstance(r, str) for r in results) == 1
    finally:
        for s in stores:
            await s.close()
