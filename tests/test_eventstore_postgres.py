"""The event-store and checkpoint-store conformance suites on PostgreSQL (asyncpg as the
caller's driver), and what only PostgreSQL has: the transaction-id horizon, psycopg and
SQLAlchemy callers, LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import psycopg
import pytest

from msdata.adapters.postgres import PostgresCheckpointStore, PostgresEventStore
from msdata.errors import ConcurrencyError, ConfigurationError
from msdata.eventstore import EventStore, NewEvent
from msdata.projections import CheckpointStore
from msdata.testing import eventually
from msdata.testing.conformance.checkpoints import CheckpointStoreConformance
from msdata.testing.conformance.eventstore import EventStoreConformance, make_events

pytestmark = pytest.mark.postgres


class _Tx:
    """A transaction on its own asyncpg connection."""

    def __init__(self, conn: Any, tx: Any) -> None:
        self.conn, self.tx = conn, tx

    @classmethod
    async def open(cls, url: str) -> _Tx:
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
    url: str

    @pytest.fixture(autouse=True)
    def _url(self, postgres_url: str) -> None:
        self.url = postgres_url

    async def begin(self, store: Any) -> _Tx:
        return await _Tx.open(self.url)

    async def commit(self, tx: _Tx) -> None:
        await tx.end(True)

    async def rollback(self, tx: _Tx) -> None:
        await tx.end(False)


async def _readable(store: Any, count: int) -> bool:
    return len(await store.read_all()) >= count


def _prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}_"


@asynccontextmanager
async def event_store(url: str, **options: Any) -> AsyncIterator[PostgresEventStore]:
    store = PostgresEventStore(url, table_prefix=_prefix(), **options)
    await store.create_schema()
    try:
        yield store
    finally:
        await store.drop_schema()
        await store.close()


class TestPostgresEventStore(PostgresHooks, EventStoreConformance):
    @asynccontextmanager
    async def make_store(self) -> AsyncIterator[EventStore]:
        async with event_store(self.url) as store:
            yield store

    async def append(
        self, store: Any, tx: _Tx, stream_id: str, expected: int, events: Sequence[NewEvent]
    ) -> int:
        version: int = await store.append_async(tx.conn, stream_id, expected, events)
        return version


class TestPostgresCheckpointStore(PostgresHooks, CheckpointStoreConformance):
    @asynccontextmanager
    async def make_checkpoint_store(self) -> AsyncIterator[CheckpointStore]:
        store = PostgresCheckpointStore(self.url, table_prefix=_prefix())
        await store.create_schema()
        try:
            yield store
        finally:
            await store.drop_schema()
            await store.close()

    async def save(self, store: Any, tx: _Tx, name: str, position: int, expected: int) -> None:
        await store.save_async(tx.conn, name, position, expected)

    async def activate(self, store: Any, tx: _Tx, projection: str, generation: int) -> None:
        await store.activate_async(tx.conn, projection, generation)


# -- PostgreSQL specifics -------------------------------------------------------------------


async def test_readers_wait_behind_an_older_open_transaction(postgres_url: str) -> None:
    """T1 (the older transaction id) appends and stays open; T2 appends and commits: a
    reader does not return T2's event yet (it would have to pass T1's place), reports it
    as held back, and returns both in order once T1 commits."""
    async with event_store(postgres_url, held_poll_interval=0.01) as store:
        t1 = await _Tx.open(postgres_url)
        t2 = await _Tx.open(postgres_url)
        try:
            e1, e2 = make_events(1, tag="t1"), make_events(1, tag="t2")
            await store.append_async(t1.conn, "a", 0, e1)
            await store.append_async(t2.conn, "b", 0, e2)
            await t2.end(True)
            assert await store.read_stream("b") != []  # committed: the stream shows it
            assert await store.read_all() == [] and await store.head() == 0
            assert (await store.backlog(0)).events == 0
            waited = asyncio.ensure_future(store.wait_for_events(0, 30.0))
            await eventually(waited.done, what="a held-back event: short poll, not 30 s")
            await t1.end(True)
            await eventually(lambda: _readable(store, 2), what="both readable")
            got = await store.read_all()
            assert [r.event_id for r in got] == [e1[0].event_id, e2[0].event_id]
        finally:
            await t1.end(False)
            await t2.end(False)


async def test_an_unrelated_open_transaction_also_holds_readers_back(postgres_url: str) -> None:
    async with event_store(postgres_url) as store:
        other = await asyncpg.connect(postgres_url)
        try:
            async with other.transaction():
                await other.fetchval("SELECT pg_current_xact_id()")  # takes an id, stays open
                tx = await _Tx.open(postgres_url)
                await store.append_async(tx.conn, "a", 0, make_events(1))
                await tx.end(True)
                assert await store.read_all() == []
            await eventually(lambda: _readable(store, 1), what="readable once it ended")
        finally:
            await other.close()


async def test_subscriber_is_woken_by_notify(postgres_url: str) -> None:
    async with event_store(postgres_url, poll_interval=60.0) as store:
        await store.wait_for_events(0, 0.01)  # starts listening
        waiter = asyncio.ensure_future(store.wait_for_events(0, 60.0))
        await asyncio.sleep(0.05)
        tx = await _Tx.open(postgres_url)
        await store.append_async(tx.conn, "a", 0, make_events(1))
        await tx.end(True)
        await eventually(waiter.done, what="woken by NOTIFY")


async def test_psycopg_and_sqlalchemy_callers(postgres_url: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    async with event_store(postgres_url) as store:
        with psycopg.connect(postgres_url) as conn:  # commits on exit
            assert store.append(conn, "p", 0, make_events(2)) == 2
        with pytest.raises(ConcurrencyError), psycopg.connect(postgres_url) as conn:
            store.append(conn, "p", 1, make_events(1))
        engine = create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
        try:
            with Session(engine) as session, session.begin():
                session.execute(text("SELECT 1"))
                assert store.append(session, "p", 2, make_events(1)) == 3
        finally:
            engine.dispose()
        aconn = await psycopg.AsyncConnection.connect(postgres_url)
        try:
            async with aconn.transaction():
                assert await store.append_async(aconn, "p", 3, make_events(1)) == 4
        finally:
            await aconn.close()
        assert await store.stream_version("p") == 4
        await eventually(lambda: _readable(store, 4), what="all readable")
        assert [r.stream_version for r in await store.read_all()] == [1, 2, 3, 4]


async def test_a_connection_without_a_transaction_is_refused(postgres_url: str) -> None:
    async with event_store(postgres_url) as store:
        conn = await asyncpg.connect(postgres_url)
        try:
            with pytest.raises(ConfigurationError):
                await store.append_async(conn, "a", 0, make_events(1))
        finally:
            await conn.close()
        with (
            psycopg.connect(postgres_url, autocommit=True) as sync_conn,
            pytest.raises(ConfigurationError),
        ):
            store.append(sync_conn, "a", 0, make_events(1))
        assert await store.read_all() == []


@pytest.mark.parametrize("prefix", ["Bad", "x;drop", "1a"])
def test_table_prefix_must_be_a_plain_identifier(prefix: str) -> None:
    with pytest.raises(ConfigurationError):
        PostgresEventStore("postgresql://localhost/db", table_prefix=prefix)
    with pytest.raises(ConfigurationError):
        PostgresCheckpointStore("postgresql://localhost/db", table_prefix=prefix)


async def test_projection_on_postgres_with_an_async_transaction_and_rebuild(
    postgres_url: str,
) -> None:
    from contextlib import asynccontextmanager as acm

    from msdata.eventstore import EventLog
    from msdata.messages import Event, MessageRegistry
    from msdata.projections import Projection, ProjectionContext, ProjectionRunner, handles

    registry = MessageRegistry()

    class Counted(Event):
        key: str

    registry.register(Counted, "pgtest.Counted")
    prefix = _prefix()

    class Counts(Projection):
        name = "counts"

        async def setup(self, conn: Any, generation: int) -> None:
            await conn.execute(f"DROP TABLE IF EXISTS {prefix}counts_{generation}")
            await conn.execute(
                f"CREATE TABLE {prefix}counts_{generation} (k text PRIMARY KEY, n int)"
            )

        async def activate(self, conn: Any, generation: int) -> None:
            await conn.execute(
                f"CREATE OR REPLACE VIEW {prefix}counts AS "
                f"SELECT * FROM {prefix}counts_{generation}"
            )

        @handles(Counted)
        async def counted(self, ctx: ProjectionContext, event: Counted) -> None:
            await ctx.conn.execute(
                f"INSERT INTO {prefix}counts_{ctx.generation} VALUES ($1, 1) "
                f"ON CONFLICT (k) DO UPDATE SET n = {prefix}counts_{ctx.generation}.n + 1",
                event.key,
            )

    store = PostgresEventStore(postgres_url, table_prefix=prefix)
    checkpoints = PostgresCheckpointStore(postgres_url, table_prefix=prefix)
    await store.create_schema()
    await checkpoints.create_schema()
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=2)

    @acm
    async def transaction() -> Any:
        async with pool.acquire() as conn, conn.transaction():
            yield conn

    log = EventLog(store, registry=registry)
    runner = ProjectionRunner(Counts(), log, checkpoints, transaction, batch_size=3)
    try:
        async with pool.acquire() as conn, conn.transaction():
            for i in range(8):
                await log.append_async(conn, f"s{i}", 0, [Counted(key="ab"[i % 2])])

        async def caught_up() -> bool:
            await runner.catch_up()
            return runner.position > 0 and (await runner.lag()).events == 0

        await eventually(caught_up, what="caught up")
        view = f"SELECT k, n FROM {prefix}counts ORDER BY k"
        assert [tuple(r) for r in await pool.fetch(view)] == [("a", 4), ("b", 4)]
        assert await runner.rebuild() == 2
        assert [tuple(r) for r in await pool.fetch(view)] == [("a", 4), ("b", 4)]
        assert await checkpoints.active("counts") == 2
    finally:
        await pool.execute(
            f"DROP VIEW IF EXISTS {prefix}counts; DROP TABLE IF EXISTS {prefix}counts_1; "
            f"DROP TABLE IF EXISTS {prefix}counts_2"
        )
        await pool.close()
        await store.drop_schema()
        await checkpoints.drop_schema()
        await store.close()
        await checkpoints.close()
