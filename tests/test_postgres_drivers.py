"""The outbox and inbox write side on every caller driver the PostgreSQL stores serve:
psycopg (sync, async), asyncpg, SQLAlchemy Session / Connection / AsyncSession /
AsyncConnection. One test, parametrised over the drivers: a rolled-back transaction leaves
nothing (no business row, no outbox message, no inbox record), a committed one leaves
exactly its own."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from msdata.adapters.postgres import PostgresInboxStore, PostgresOutboxStore
from msdata.messages import Event, MessageRegistry, message_type
from msdata.outbox import Inbox, Outbox

pytestmark = pytest.mark.postgres

registry = MessageRegistry()


@message_type("test.pg.OrderPlaced", registry=registry)
class OrderPlaced(Event):
    order_id: str


class Tx:
    """One business transaction on one driver; ``outbox_first`` orders the calls so the
    message is the transaction's first statement (the lazy-BEGIN trap of some drivers)."""

    def __init__(self, conn: Any, orders: str) -> None:
        self.conn, self.orders = conn, orders

    async def insert_order(self, order_id: str) -> None:
        raise NotImplementedError

    async def add(self, outbox: Outbox, messages: list[OrderPlaced], key: str) -> None:
        raise NotImplementedError

    async def record(self, inbox: Inbox, consumer: str, message_id: str) -> bool:
        raise NotImplementedError

    async def end(self, commit: bool) -> None:
        raise NotImplementedError


class SyncTx(Tx):
    """psycopg Connection, SQLAlchemy Session or Connection: the sync calls."""

    def __init__(self, conn: Any, orders: str, finish: Callable[[bool], None]) -> None:
        super().__init__(conn, orders)
        self._finish = finish

    async def insert_order(self, order_id: str) -> None:
        if isinstance(self.conn, psycopg.Connection):
            self.conn.execute(f"INSERT INTO {self.orders} (id) VALUES (%s)", (order_id,))
        else:
            self.conn.execute(
                text(f"INSERT INTO {self.orders} (id) VALUES (:id)"), {"id": order_id}
            )

    async def add(self, outbox: Outbox, messages: list[OrderPlaced], key: str) -> None:
        outbox.add(self.conn, messages, key=key)

    async def record(self, inbox: Inbox, consumer: str, message_id: str) -> bool:
        return inbox.first_time(self.conn, consumer, message_id)

    async def end(self, commit: bool) -> None:
        self._finish(commit)


class AsyncTx(Tx):
    """asyncpg, psycopg AsyncConnection, SQLAlchemy AsyncSession or AsyncConnection."""

    def __init__(self, conn: Any, orders: str, finish: Callable[[bool], Any]) -> None:
        super().__init__(conn, orders)
        self._finish = finish

    async def insert_order(self, order_id: str) -> None:
        if isinstance(self.conn, asyncpg.Connection):
            await self.conn.execute(f"INSERT INTO {self.orders} (id) VALUES ($1)", order_id)
        elif isinstance(self.conn, psycopg.AsyncConnection):
            await self.conn.execute(f"INSERT INTO {self.orders} (id) VALUES (%s)", (order_id,))
        else:
            await self.conn.execute(
                text(f"INSERT INTO {self.orders} (id) VALUES (:id)"), {"id": order_id}
            )

    async def add(self, outbox: Outbox, messages: list[OrderPlaced], key: str) -> None:
        await outbox.add_async(self.conn, messages, key=key)

    async def record(self, inbox: Inbox, consumer: str, message_id: str) -> bool:
        return await inbox.first_time_async(self.conn, consumer, message_id)

    async def end(self, commit: bool) -> None:
        await self._finish(commit)


def _sa_url(url: str, driver: str) -> str:
    return url.replace("postgresql://", f"postgresql+{driver}://", 1)


@asynccontextmanager
async def psycopg_sync(url: str, orders: str) -> AsyncIterator[Callable[[], Any]]:
    async def begin() -> Tx:
        conn = psycopg.connect(url)  # not autocommit: the first statement opens a transaction

        def finish(commit: bool) -> None:
            conn.commit() if commit else conn.rollback()
            conn.close()

        return SyncTx(conn, orders, finish)

    yield begin


@asynccontextmanager
async def psycopg_async(url: str, orders: str) -> AsyncIterator[Callable[[], Any]]:
    async def begin() -> Tx:
        conn = await psycopg.AsyncConnection.connect(url)

        async def finish(commit: bool) -> None:
            await (conn.commit() if commit else conn.rollback())
            await conn.close()

        return AsyncTx(conn, orders, finish)

    yield begin


@asynccontextmanager
async def asyncpg_conn(url: str, orders: str) -> AsyncIterator[Callable[[], Any]]:
    async def begin() -> Tx:
        conn = await asyncpg.connect(url)
        tx = conn.transaction()
        await tx.start()

        async def finish(commit: bool) -> None:
            await (tx.commit() if commit else tx.rollback())
            await conn.close()

        return AsyncTx(conn, orders, finish)

    yield begin


@asynccontextmanager
async def sa_session(url: str, orders: str) -> AsyncIterator[Callable[[], Any]]:
    engine = create_engine(_sa_url(url, "psycopg"))

    async def begin() -> Tx:
        session = Session(engine)
        session.begin()

        def finish(commit: bool) -> None:
            session.commit() if commit else session.rollback()
            session.close()

        return SyncTx(session, orders, finish)

    try:
        yield begin
    finally:
        engine.dispose()


@asynccontextmanager
async def sa_connection(url: str, orders: str) -> AsyncIterator[Callable[[], Any]]:
    engine = create_engine(_sa_url(url, "psycopg"))

    async def begin() -> Tx:
        conn = engine.connect()
        tx = conn.begin()

        def finish(commit: bool) -> None:
            tx.commit() if commit else tx.rollback()
            conn.close()

        return SyncTx(conn, orders, finish)

    try:
        yield begin
    finally:
        engine.dispose()


@asynccontextmanager
async def sa_async_session(url: str, orders: str) -> AsyncIterator[Callable[[], Any]]:
    engine = create_async_engine(_sa_url(url, "asyncpg"))

    async def begin() -> Tx:
        session = AsyncSession(engine)
        await session.begin()

        async def finish(commit: bool) -> None:
            await (session.commit() if commit else session.rollback())
            await session.close()

        return AsyncTx(session, orders, finish)

    try:
        yield begin
    finally:
        await engine.dispose()


@asynccontextmanager
async def sa_async_connection(url: str, orders: str) -> AsyncIterator[Callable[[], Any]]:
    engine = create_async_engine(_sa_url(url, "asyncpg"))

    async def begin() -> Tx:
        conn = await engine.connect()
        tx = await conn.begin()

        async def finish(commit: bool) -> None:
            await (tx.commit() if commit else tx.rollback())
            await conn.close()

        return AsyncTx(conn, orders, finish)

    try:
        yield begin
    finally:
        await engine.dispose()


DRIVERS = {
    "psycopg": psycopg_sync,
    "psycopg-async": psycopg_async,
    "asyncpg": asyncpg_conn,
    "sqlalchemy-session": sa_session,
    "sqlalchemy-connection": sa_connection,
    "sqlalchemy-asyncsession": sa_async_session,
    "sqlalchemy-asyncconnection": sa_async_connection,
}


@pytest.mark.parametrize("driver", list(DRIVERS))
async def test_messages_and_records_commit_and_roll_back_with_the_business_data(
    driver: str, postgres_url: str
) -> None:
    prefix = f"d{uuid.uuid4().hex[:10]}_"
    orders = f'"{prefix}orders"'
    store = PostgresOutboxStore(postgres_url, table_prefix=prefix)
    inbox_store = PostgresInboxStore(postgres_url, table_prefix=prefix)
    outbox, inbox = Outbox(store, registry=registry), Inbox(inbox_store)
    admin = await asyncpg.connect(postgres_url)
    try:
        await store.create_schema()
        await inbox_store.create_schema()
        await admin.execute(f"CREATE TABLE {orders} (id text PRIMARY KEY)")
        seen = str(uuid.uuid4())
        async with DRIVERS[driver](postgres_url, orders) as begin:
            # rolled back: the message is the transaction's first statement
            tx = await begin()
            await tx.add(outbox, [OrderPlaced(order_id="lost")], key="lost")
            await tx.insert_order("lost")
            assert await tx.record(inbox, "billing", seen) is True
            await tx.end(commit=False)
            assert await admin.fetchval(f"SELECT count(*) FROM {orders}") == 0
            assert (await store.status()).pending == 0
            assert await store.claim("r", 100, 30.0) == []

            # committed: one multi-row add, one single-row add, one inbox record
            tx = await begin()
            assert await tx.record(inbox, "billing", seen) is True
            assert await tx.record(inbox, "billing", seen) is False
            await tx.insert_order("o1")
            batch = [OrderPlaced(order_id=f"o1-{i}") for i in range(3)]
            await tx.add(outbox, batch, key="o1")
            await tx.add(outbox, [OrderPlaced(order_id="o1-last")], key="o1")
            await tx.end(commit=True)

            assert await admin.fetchval(f"SELECT count(*) FROM {orders}") == 1
            got = await store.claim("r", 100, 30.0)
            want = ["o1-0", "o1-1", "o1-2", "o1-last"]
            decoded = [outbox.codec.decode(r.payload).message for r in got]
            assert [m.order_id for m in decoded] == want
            assert {r.partition_key for r in got} == {"o1"}

            # the committed record is seen by the next delivery
            tx = await begin()
            assert await tx.record(inbox, "billing", seen) is False
            await tx.end(commit=False)
    finally:
        await admin.execute(f"DROP TABLE IF EXISTS {orders}")
        await admin.close()
        await store.drop_schema()
        await inbox_store.drop_schema()
        await store.close()
        await inbox_store.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_psycopg_pipeline_mode_queues_the_message_and_keeps_the_callers_errors(
    mode: str, postgres_url: str
) -> None:
    """In psycopg pipeline mode the outbox INSERT is queued with the business statements
    (no round trip of its own) and commits with them; an error of the caller's statement
    that psycopg reports while queuing ours stays the caller's, not an outbox SchemaError."""
    prefix = f"d{uuid.uuid4().hex[:10]}_"
    orders = f'"{prefix}orders"'
    store = PostgresOutboxStore(postgres_url, table_prefix=prefix)
    outbox = Outbox(store, registry=registry)
    admin = await asyncpg.connect(postgres_url)
    try:
        await store.create_schema()
        await admin.execute(f"CREATE TABLE {orders} (id text PRIMARY KEY)")
        missing = f'"{prefix}no_such_table"'

        def sync_pipelines() -> None:
            with psycopg.connect(postgres_url, autocommit=True) as conn:
                with conn.pipeline():
                    conn.execute("BEGIN")
                    conn.execute(f"INSERT INTO {orders} VALUES ('p1')")
                    outbox.add(conn, OrderPlaced(order_id="p1"), key="p1")
                    conn.execute("COMMIT")
                with pytest.raises(psycopg.errors.UndefinedTable), conn.pipeline():
                    conn.execute("BEGIN")
                    conn.execute(f"INSERT INTO {missing} VALUES ('p2')")
                    conn.pgconn.flush()
                    time.sleep(0.05)  # the error has arrived when the add is queued
                    outbox.add(conn, OrderPlaced(order_id="p2"), key="p2")
                    conn.execute("COMMIT")

        if mode == "sync":
            sync_pipelines()
        else:
            aconn = await psycopg.AsyncConnection.connect(postgres_url, autocommit=True)
            async with aconn:
                async with aconn.pipeline():
                    await aconn.execute("BEGIN")
                    await aconn.execute(f"INSERT INTO {orders} VALUES ('p1')")
                    await outbox.add_async(aconn, OrderPlaced(order_id="p1"), key="p1")
                    await aconn.execute("COMMIT")
                with pytest.raises(psycopg.errors.UndefinedTable):
                    async with aconn.pipeline():
                        await aconn.execute("BEGIN")
                        await aconn.execute(f"INSERT INTO {missing} VALUES ('p2')")
                        aconn.pgconn.flush()
                        await asyncio.sleep(0.05)
                        await outbox.add_async(aconn, OrderPlaced(order_id="p2"), key="p2")
                        await aconn.execute("COMMIT")
        assert await admin.fetchval(f"SELECT count(*) FROM {orders}") == 1
        got = await store.claim("r", 100, 30.0)
        assert [outbox.codec.decode(r.payload).message.order_id for r in got] == ["p1"]
    finally:
        await admin.execute(f"DROP TABLE IF EXISTS {orders}")
        await admin.close()
        await store.drop_schema()
        await store.close()


async def test_a_connection_with_no_open_transaction_is_refused(postgres_url: str) -> None:
    from msdata.errors import ConfigurationError
    from msdata.testing.conformance.outbox import make_rows

    prefix = f"t{uuid.uuid4().hex[:10]}_"
    store = PostgresOutboxStore(postgres_url, table_prefix=prefix)
    inbox = PostgresInboxStore(postgres_url, table_prefix=prefix)
    await store.create_schema()
    await inbox.create_schema()
    try:
        conn = await asyncpg.connect(postgres_url)
        try:
            with pytest.raises(ConfigurationError, match="no open transaction"):
                await store.append_async(conn, make_rows(1))
            with pytest.raises(ConfigurationError, match="no open transaction"):
                await inbox.record_async(conn, "billing", "m-1")
            async with conn.transaction():
                await store.append_async(conn, make_rows(1))
        finally:
            await conn.close()
        with psycopg.connect(postgres_url, autocommit=True) as pconn:
            with pytest.raises(ConfigurationError, match="no open transaction"):
                store.append(pconn, make_rows(1))
            with pconn.transaction():
                store.append(pconn, make_rows(1))
        with psycopg.connect(postgres_url) as pconn:  # not autocommit: psycopg begins itself
            store.append(pconn, make_rows(1))
        async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as aconn:
            with pytest.raises(ConfigurationError, match="no open transaction"):
                await store.append_async(aconn, make_rows(1))
        # nothing refused reached the table; the three writes in a transaction did
        assert (await store.status()).pending == 3
    finally:
        await store.drop_schema()
        await inbox.drop_schema()
        await store.close()
        await inbox.close()
