"""The idempotency conformance suite on PostgreSQL: the store's own pool, and the caller's
transaction through asyncpg and through sync psycopg. Each test gets its own table."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import psycopg
import pytest

from msdata.adapters.postgres.idempotency import PostgresIdempotencyStore
from msdata.errors import StoreError
from msdata.idempotency import IdempotencyKeys, IdempotencyStore
from msdata.testing import FakeClock
from msdata.testing.conformance.idempotency import IdempotencyStoreConformance
from store_helpers import opened, table_prefix

pytestmark = pytest.mark.postgres


class _PostgresStore:
    url: str

    @pytest.fixture(autouse=True)
    def _url(self, postgres_url: str) -> None:
        self.url = postgres_url
        self.txs: dict[int, Any] = {}

    def store_url(self) -> str:
        return self.url

    @asynccontextmanager
    async def make_store(self) -> AsyncIterator[IdempotencyStore]:
        async with opened(
            PostgresIdempotencyStore(self.url, table_prefix=table_prefix()), drop=True
        ) as store:
            yield store


class TestPostgresIdempotencyStore(_PostgresStore, IdempotencyStoreConformance):
    """The caller's transaction on asyncpg."""

    async def begin(self, store: Any) -> Any:
        conn = await asyncpg.connect(self.url)
        tx = conn.transaction()
        await tx.start()
        self.txs[id(conn)] = tx
        return conn

    async def commit(self, conn: Any) -> None:
        await self.txs.pop(id(conn)).commit()
        await conn.close()

    async def rollback(self, conn: Any) -> None:
        await self.txs.pop(id(conn)).rollback()
        await conn.close()

    async def idle_connection(self, store: Any) -> Any:
        return await asyncpg.connect(self.url)

    async def close_connection(self, conn: Any) -> None:
        await conn.close()

    async def test_a_duplicate_waits_for_the_first_transaction_then_replays(self) -> None:
        """Joined mode: the effect and the COMPLETED record commit together; a concurrent
        duplicate blocks on the row lock and then replays what committed."""
        async with self.make_store() as store:
            keys = IdempotencyKeys(store, clock=FakeClock())
            first = await self.begin(store)
            claim = await keys.claim("k", scope="s", conn=first)
            assert not claim.replayed
            second = await self.begin(store)
            try:
                waiting = asyncio.ensure_future(keys.claim("k", scope="s", conn=second))
                await asyncio.sleep(0.2)
                assert not waiting.done()  # blocked on the row lock
                await claim.complete(b'"paid"')
                await self.commit(first)
                again = await waiting
                assert again.replayed and again.response() == b'"paid"'
            finally:
                await self.rollback(second)


class TestPostgresIdempotencyStoreSyncPsycopg(_PostgresStore, IdempotencyStoreConformance):
    """The caller's transaction on a sync psycopg connection."""

    sync_connections = True

    async def begin(self, store: Any) -> Any:
        return await asyncio.to_thread(psycopg.connect, self.url)

    async def commit(self, conn: Any) -> None:
        await asyncio.to_thread(conn.commit)
        await asyncio.to_thread(conn.close)

    async def rollback(self, conn: Any) -> None:
        await asyncio.to_thread(conn.rollback)
        await asyncio.to_thread(conn.close)

    async def idle_connection(self, store: Any) -> Any:
        return await asyncio.to_thread(psycopg.connect, self.url, autocommit=True)

    async def close_connection(self, conn: Any) -> None:
        await asyncio.to_thread(conn.close)


class TestPostgresIdempotencyStoreAsyncPsycopg(_PostgresStore, IdempotencyStoreConformance):
    """The caller's transaction on an async psycopg connection."""

    async def begin(self, store: Any) -> Any:
        return await psycopg.AsyncConnection.connect(self.url)

    async def commit(self, conn: Any) -> None:
        await conn.commit()
        await conn.close()

    async def rollback(self, conn: Any) -> None:
        await conn.rollback()
        await conn.close()

    async def idle_connection(self, store: Any) -> Any:
        return await psycopg.AsyncConnection.connect(self.url, autocommit=True)

    async def close_connection(self, conn: Any) -> None:
        await conn.close()


class TestPostgresIdempotencyStoreSQLAlchemy(_PostgresStore, IdempotencyStoreConformance):
    """The caller's transaction in a SQLAlchemy AsyncSession (asyncpg underneath)."""

    @pytest.fixture(autouse=True)
    async def _engine(self, postgres_url: str) -> AsyncIterator[None]:
        from sqlalchemy.ext.asyncio import create_async_engine

        url = postgres_url.replace("postgresql://", "postgresql+asyncpg://")
        self.engine = create_async_engine(url)
        yield
        await self.engine.dispose()

    async def begin(self, store: Any) -> Any:
        from sqlalchemy.ext.asyncio import AsyncSession

        return AsyncSession(self.engine)

    async def commit(self, conn: Any) -> None:
        await conn.commit()
        await conn.close()

    async def rollback(self, conn: Any) -> None:
        await conn.rollback()
        await conn.close()


async def test_a_cancelled_call_leaves_the_store_usable(postgres_url: str) -> None:
    """A call cancelled mid-statement gives its connection back to the pool (which cleans
    it up); the next calls work."""
    store = PostgresIdempotencyStore(postgres_url, table_prefix=table_prefix())
    await store.create_schema()
    now = 1_893_456_000_000_000  # 2030-01-01, Unix microseconds
    try:
        for i in range(5):
            task = asyncio.ensure_future(
                store.claim_async(None, "s", f"k{i}", "", now, now + 9_000_000, lambda: "t")
            )
            for _ in range(i):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            # expires at once (expires_at <= now), so every round claims it afresh
            token = f"t{i}"
            assert await store.claim_async(None, "s", "x", "", now, now, lambda t=token: t) == token
        rec = await store.get("s", "x")
        assert rec is not None
    finally:
        await store.drop_schema()
        await store.close()


class Declined(Exception):
    pass


async def test_the_callers_error_survives_an_aborted_transaction(postgres_url: str) -> None:
    """In the caller's transaction, an operation whose SQL failed has aborted it: storing
    the failure (final) or releasing the key fails too, and the caller still gets its own
    error; the rollback leaves the key free."""
    store = PostgresIdempotencyStore(postgres_url, table_prefix=table_prefix())
    await store.create_schema()
    keys = IdempotencyKeys(store, final_errors=(Declined,), clock=FakeClock())
    conn = await asyncpg.connect(postgres_url)
    try:
        for error in (Declined, RuntimeError):

            async def op(error: type[Exception] = error) -> int:
                try:
                    await conn.execute("SELECT 1/0")
                except asyncpg.DivisionByZeroError:
                    raise error("failed") from None
                return 1

            tx = conn.transaction()
            await tx.start()
            with pytest.raises(error):
                await keys.run("k", op, scope="s", conn=conn)
            await tx.rollback()
            assert await store.get("s", "k") is None
    finally:
        await conn.close()
        await store.drop_schema()
        await store.close()


async def test_a_replay_writes_nothing_so_it_runs_in_a_read_only_transaction(
    postgres_url: str,
) -> None:
    """A live key is answered by a read alone (no write node runs, nothing is locked), so
    a replay works in a READ ONLY transaction (e.g. on a hot standby); a claim of a new
    key there is refused by the server, as any write is."""
    store = PostgresIdempotencyStore(postgres_url, table_prefix=table_prefix())
    await store.create_schema()
    keys = IdempotencyKeys(store, clock=FakeClock())
    ran: list[int] = []

    async def op() -> dict[str, int]:
        ran.append(1)
        return {"paid": 1}

    conn = await asyncpg.connect(postgres_url)
    try:
        assert await keys.run("k", op, scope="s", fingerprint="fp") == {"paid": 1}
        async with conn.transaction(readonly=True):
            assert await keys.run("k", op, scope="s", fingerprint="fp", conn=conn) == {"paid": 1}
        assert ran == [1]
        with pytest.raises(StoreError):
            async with conn.transaction(readonly=True):
                await keys.run("new", op, scope="s", conn=conn)
        assert ran == [1]
    finally:
        await conn.close()
        await store.drop_schema()
        await store.close()
