from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from msdata.adapters.sqlite import SqliteInboxStore, SqliteOutboxStore, schema_sql
from msdata.clock import SYSTEM_CLOCK, Clock
from msdata.errors import ConfigurationError, StoreError
from msdata.outbox import InboxStore, OutboxRow, OutboxStore
from msdata.testing.conformance.inbox import InboxStoreConformance
from msdata.testing.conformance.outbox import (
    OutboxStoreConformance,
    OutboxStoreHooks,
    RawText,
    SqlLiteral,
    make_rows,
)
from msdata.testing.conformance.relay import OutboxRelayConformance
from store_helpers import SqliteHooks, ThreadTx, opened, table_prefix


class SqliteCallerHooks(SqliteHooks):
    @asynccontextmanager
    async def connections_without_transaction(
        self, store: Any
    ) -> AsyncIterator[list[tuple[str, Any, bool]]]:
        from sqlalchemy import create_engine
        from sqlalchemy.orm import Session

        legacy = sqlite3.connect(store.path, isolation_level=None)
        engine = create_engine(f"sqlite:///{store.path}", isolation_level="AUTOCOMMIT")
        session = Session(engine)
        forms: list[tuple[str, Any, bool]] = [
            ("sqlite3 isolation_level=None", legacy, False),
            ("SQLAlchemy Session", session, False),
        ]
        try:
            yield forms
        finally:
            session.close()
            engine.dispose()
            legacy.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "outbox.db")


class SqliteOutboxHooks(SqliteCallerHooks, OutboxStoreHooks):
    lease_seconds = 0.3
    inline: bool | None = None  # the store's default: inline under synchronous NORMAL

    @pytest.fixture(autouse=True)
    def _path(self, db_path: str) -> None:
        self.path = db_path
        self.prefix = table_prefix()

    def store_url(self) -> str:
        return f"sqlite:///{self.path}"

    @asynccontextmanager
    async def make_store(self, *, clock: Clock = SYSTEM_CLOCK) -> AsyncIterator[OutboxStore]:
        async with opened(
            SqliteOutboxStore(
                self.path,
                table_prefix=self.prefix,
                poll_interval=0.01,
                inline=self.inline,
                clock=clock,
            )
        ) as store:
            yield store

    @asynccontextmanager
    async def make_store_without_schema(self) -> AsyncIterator[OutboxStore]:
        store = SqliteOutboxStore(self.path, table_prefix="nothere_", inline=self.inline)
        try:
            yield store
        finally:
            await store.close()

    @asynccontextmanager
    async def failing_claims(self, store: Any) -> AsyncIterator[None]:
        def broken_claim(*args: Any) -> Any:
            raise sqlite3.OperationalError("disk I/O error (injected after the mark)")

        store._claim_tx = broken_claim  # the claim half of mark_sent_and_claim
        try:
            yield
        finally:
            del store._claim_tx

    @asynccontextmanager
    async def open_again(self, store: Any) -> AsyncIterator[OutboxStore]:
        other = SqliteOutboxStore(store.path, table_prefix=store.table_prefix, poll_interval=0.01)
        try:
            yield other
        finally:
            await other.close()

    async def add(self, store: Any, tx: ThreadTx, rows: Sequence[OutboxRow]) -> None:
        await tx.run(store.append, tx.conn, rows)

    async def write_raw_row(self, store: Any, columns: Mapping[str, object]) -> int | None:
        """A hand-written INSERT on a connection of its own, values bound as given."""
        names, marks, args = [], [], []
        for name, value in columns.items():
            names.append(name)
            if isinstance(value, SqlLiteral):
                marks.append(str(value))
            elif isinstance(value, RawText):
                marks.append("CAST(? AS TEXT)")
                args.append(bytes(value))
            else:
                marks.append("?")
                args.append(value)
        if "created_at" not in columns:
            names.append("created_at")
            marks.append("(julianday('now') - 2440587.5) * 86400.0")
        sql = (
            f"INSERT INTO {store.table_prefix}outbox ({', '.join(names)}) "
            f"VALUES ({', '.join(marks)})"
        )
        conn = sqlite3.connect(store.path, timeout=30.0)
        try:
            with conn:
                seq = conn.execute(sql, args).lastrowid
        except (sqlite3.IntegrityError, OverflowError, UnicodeEncodeError):
            return None  # NOT NULL, an integer over 64 bits, a lone surrogate
        finally:
            conn.close()
        return seq


class TestSqliteOutboxStore(SqliteOutboxHooks, OutboxStoreConformance):
    pass


class TestSqliteOutboxRelay(SqliteOutboxHooks, OutboxRelayConformance):
    pass


class TestSqliteOutboxStoreInThread(TestSqliteOutboxStore):
    """The same suite with every call in the store's thread (as under synchronous FULL)."""

    inline = False


class TestSqliteOutboxRelayInThread(TestSqliteOutboxRelay):
    inline = False


class TestSqliteInboxStore(SqliteCallerHooks, InboxStoreConformance):
    @pytest.fixture(autouse=True)
    def _path(self, db_path: str) -> None:
        self.path = db_path

    @asynccontextmanager
    async def make_inbox_store(self, *, clock: Clock = SYSTEM_CLOCK) -> AsyncIterator[InboxStore]:
        async with opened(
            SqliteInboxStore(self.path, table_prefix=table_prefix(), clock=clock)
        ) as store:
            yield store

    async def record(self, store: Any, tx: ThreadTx, consumer: str, message_id: str) -> bool:
        return await tx.run(store.record, tx.conn, consumer, message_id)

    @asynccontextmanager
    async def make_inbox_store_without_schema(self) -> AsyncIterator[InboxStore]:
        store = SqliteInboxStore(self.path, table_prefix="nothere_")
        try:
            yield store
        finally:
            await store.close()


# -- SQLite specifics -------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["Bad", "x; DROP TABLE y", "a-b", "1x", "x" * 41, "a.b"])
def test_table_prefix_is_validated(db_path: str, prefix: str) -> None:
    with pytest.raises(ConfigurationError):
        SqliteOutboxStore(db_path, table_prefix=prefix)
    with pytest.raises(ConfigurationError):
        SqliteInboxStore(db_path, table_prefix=prefix)
    with pytest.raises(ConfigurationError):
        schema_sql(prefix)


def test_from_url_and_schema_sql(tmp_path: Path) -> None:
    store = SqliteOutboxStore.from_url(f"sqlite:///{tmp_path}/o.db", table_prefix="app_")
    assert store.path == f"{tmp_path}/o.db"
    assert "CREATE TABLE IF NOT EXISTS app_outbox (" in store.schema_sql()
    for bad in ("postgresql://x/y", "sqlite:///:memory:", "sqlite:///"):
        with pytest.raises(ConfigurationError):
            SqliteOutboxStore.from_url(bad)
    # the documented DDL is what create_schema runs, and applies cleanly by hand
    conn = sqlite3.connect(str(tmp_path / "manual.db"))
    conn.executescript(schema_sql("m_"))
    conn.executescript(schema_sql("m_"))
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"m_outbox", "m_outbox_sent", "m_inbox"} <= tables


async def test_a_closed_connection_is_a_store_error(db_path: str) -> None:
    store = SqliteOutboxStore(db_path)
    await store.create_schema()
    conn = sqlite3.connect(db_path)
    conn.close()
    try:
        with pytest.raises(StoreError, match="closed"):
            store.append(conn, make_rows(1))
        assert (await store.status()).pending == 0
    finally:
        await store.close()


async def test_one_row_appends_with_and_without_headers(db_path: str) -> None:
    # a one-row append takes its own statement (headers NULL written as a constant when
    # there are none); several rows take executemany: both store the same columns
    store = SqliteOutboxStore(db_path)
    await store.create_schema()
    conn = sqlite3.connect(db_path)
    plain = OutboxRow("m-1", "orders", "shop.OrderPlaced", b'{"specversion":"1.0"}', None, "Order")
    rows = [plain, make_rows(1)[0], plain._replace(message_id="m-2", partition_key="k")]
    try:
        for row in rows:
            store.append(conn, [row])
        store.append(conn, rows[1:])
        conn.commit()
        stored = conn.execute(
            "SELECT message_id, topic, type, payload, partition_key, aggregate_type, headers "
            "FROM msdata_outbox ORDER BY seq"
        ).fetchall()
        assert [r[6] for r in stored] == [None, '{"x-n": "0"}', None, '{"x-n": "0"}', None]
        assert [r[:6] for r in stored] == [tuple(r[:6]) for r in rows + rows[1:]]
        got = await store.claim("r", 10, 30.0)
        assert [dict(r.headers) for r in got] == [{}, {"x-n": "0"}, {}, {"x-n": "0"}, {}]
        with pytest.raises(StoreError, match="outbox append"):
            store.append(conn, [plain._replace(topic=None)])  # type: ignore[arg-type]
        conn.rollback()
    finally:
        conn.close()
        await store.close()


async def test_relay_start_names_a_missing_lease_table(db_path: str) -> None:
    from msdata.adapters.memory import MemoryTransport
    from msdata.errors import SchemaError
    from msdata.outbox import OutboxRelay

    store = SqliteOutboxStore(db_path)
    await store.create_schema()
    try:
        relay = OutboxRelay(store, MemoryTransport(), relay_id="r")
        conn = sqlite3.connect(db_path)
        conn.execute("DROP TABLE msdata_outbox_relay")
        conn.close()
        with pytest.raises(SchemaError, match=r"msdata_outbox_relay.*create_schema"):
            await relay.start()
        assert not relay.running
    finally:
        await store.close()


async def test_autocommit_connection_without_transaction_is_refused(db_path: str) -> None:
    store = SqliteOutboxStore(db_path)
    await store.create_schema()
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        with pytest.raises(ConfigurationError, match="autocommit"):
            store.append(conn, make_rows(1))
        conn.execute("BEGIN")
        store.append(conn, make_rows(2))
        conn.execute("COMMIT")
        assert (await store.status()).pending == 2
    finally:
        conn.close()
        await store.close()


@pytest.mark.parametrize("kind", ["session", "connection"])
async def test_sqlalchemy_write_side_commits_and_rolls_back(db_path: str, kind: str) -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from sqlalchemy.orm import Session

    store = SqliteOutboxStore(db_path)
    inbox = SqliteInboxStore(db_path)
    await store.create_schema()
    await inbox.create_schema()
    engine = sqlalchemy.create_engine(f"sqlite:///{db_path}")
    with engine.begin() as c:
        c.execute(sqlalchemy.text("CREATE TABLE orders (id TEXT PRIMARY KEY)"))
    kept, gone = make_rows(2), make_rows(3)
    try:
        for rows, commit in ((gone, False), (kept, True)):
            if kind == "session":
                with Session(engine) as s:
                    s.execute(
                        sqlalchemy.text("INSERT INTO orders VALUES (:i)"), {"i": rows[0].message_id}
                    )
                    store.append(s, rows)
                    assert inbox.record(s, "c", rows[0].message_id) is True
                    s.commit() if commit else s.rollback()
            else:
                with engine.connect() as c:
                    c.execute(
                        sqlalchemy.text("INSERT INTO orders VALUES (:i)"), {"i": rows[0].message_id}
                    )
                    store.append(c, rows)
                    assert inbox.record(c, "c", rows[0].message_id) is True
                    c.commit() if commit else c.rollback()
        got = await store.claim("r", 100, 30.0)
        assert [r.message_id for r in got] == [r.message_id for r in kept]
        with engine.connect() as c:
            orders = [r[0] for r in c.execute(sqlalchemy.text("SELECT id FROM orders"))]
            assert orders == [kept[0].message_id]
            assert inbox.record(c, "c", kept[0].message_id) is False
            assert inbox.record(c, "c", gone[0].message_id) is True
            c.rollback()
    finally:
        engine.dispose()
        await store.close()
        await inbox.close()


async def test_an_append_in_this_process_wakes_the_waiting_relay(db_path: str) -> None:
    # the poll is an hour: only the in-process signal can end the wait in time
    store = SqliteOutboxStore(db_path, poll_interval=3600.0)
    await store.create_schema()
    writer = SqliteOutboxStore(db_path)  # another instance on the same file
    try:
        await store.wait_for_rows(0.01)
        waiting = asyncio.create_task(store.wait_for_rows(600.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        tx = await ThreadTx(db_path).open()
        await tx.run(writer.append, tx.conn, make_rows(1))
        await asyncio.sleep(0.05)
        await tx.end(True)
        await asyncio.wait_for(waiting, 10.0)
    finally:
        await writer.close()
        await store.close()


async def test_a_commit_by_another_process_is_found_by_polling(db_path: str) -> None:
    store = SqliteOutboxStore(db_path, poll_interval=0.02)
    await store.create_schema()
    try:
        await store.wait_for_rows(0.01)
        waiting = asyncio.create_task(store.wait_for_rows(600.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        # a plain INSERT, as another process would commit it: no in-process signal
        conn = sqlite3.connect(db_path)
        conn.execute(
            "INSERT INTO msdata_outbox (message_id, topic, type, payload, created_at) "
            "VALUES ('m', 't', 'x', x'7b7d', 0)"
        )
        conn.commit()
        conn.close()
        await asyncio.wait_for(waiting, 10.0)
    finally:
        await store.close()


async def test_idle_claim_does_not_wait_for_an_open_writer(db_path: str) -> None:
    store = SqliteOutboxStore(db_path, busy_timeout=60.0)
    await store.create_schema()
    tx = await ThreadTx(db_path).open()
    try:
        await tx.run(store.append, tx.conn, make_rows(1))  # holds the write lock
        assert await asyncio.wait_for(store.claim("r", 10, 30.0), 10.0) == []
    finally:
        await tx.end(False)
        await store.close()


def test_inline_follows_the_durability(db_path: str) -> None:
    assert SqliteOutboxStore(db_path).inline  # NORMAL: commits do not wait for the disk
    assert not SqliteOutboxStore(db_path, synchronous="FULL").inline
    assert not SqliteOutboxStore(db_path, inline=False).inline


async def test_an_inline_call_waits_in_the_thread_while_another_connection_writes(
    db_path: str,
) -> None:
    """With the write lock held elsewhere, the relay's mark neither blocks the event loop
    nor fails: it waits in the store's thread and lands once the lock is free."""
    store = SqliteOutboxStore(db_path, busy_timeout=30.0)
    await store.create_schema()
    with sqlite3.connect(db_path) as conn:
        store.append(conn, make_rows(2))
    tx = await ThreadTx(db_path).open()
    try:
        claimed = await store.claim("r", 10, 30.0)
        assert len(claimed) == 2
        await tx.run(store.append, tx.conn, make_rows(1))  # holds the write lock
        mark = asyncio.ensure_future(store.mark_sent("r", [r.seq for r in claimed]))
        ticks = 0
        for _ in range(20):  # the loop keeps running while the mark waits for the lock
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 20 and not mark.done()
        # a call made meanwhile queues behind it in the thread, in call order
        status = asyncio.ensure_future(store.status())
        await tx.end(True)
        await asyncio.wait_for(mark, 10.0)
        assert (await asyncio.wait_for(status, 10.0)).pending == 1  # the mark came first
        assert [r.seq for r in await store.claim("r", 10, 30.0)] == [claimed[-1].seq + 1]
    finally:
        await store.close()


async def test_rows_handed_back_below_the_claimed_range_are_claimed_again(
    db_path: str,
) -> None:
    """A relay's next claim starts after the rows it holds; rows it hands back, retries
    or that were parked and requeued must come back all the same, in seq order."""
    store = SqliteOutboxStore(db_path)
    await store.create_schema()
    try:
        with sqlite3.connect(db_path) as conn:
            store.append(conn, make_rows(6))
        seqs = [r.seq for r in await store.claim("r", 2, 30.0)]
        seqs += [r.seq for r in await store.claim("r", 2, 30.0)]
        assert seqs == sorted(seqs) and len(set(seqs)) == 4
        await store.release("r", [seqs[2]])
        assert [r.seq for r in await store.claim("r", 10, 30.0)] == [
            seqs[2],
            seqs[3] + 1,
            seqs[3] + 2,
        ]
        await store.mark_sent("r", [seqs[0], seqs[2], seqs[3] + 1, seqs[3] + 2])
        await store.park("r", [seqs[1]], "bad")
        assert await store.claim("r", 10, 30.0) == []
        await store.mark_sent("r", [seqs[3]])
        assert await store.requeue([seqs[1]]) == 1
        assert [r.seq for r in await store.claim("r", 10, 30.0)] == [seqs[1]]
    finally:
        await store.close()


async def test_an_inline_store_checkpoints_in_its_thread(db_path: str) -> None:
    """The relay's connection does not checkpoint at commit (that would flush pages on the
    loop's thread); the store's thread checkpoints every so many commits instead."""
    from msdata.adapters.sqlite._db import CHECKPOINT_EVERY as _CHECKPOINT_EVERY

    store = SqliteOutboxStore(db_path)
    await store.create_schema()
    try:
        with sqlite3.connect(db_path) as conn:
            store.append(conn, make_rows(_CHECKPOINT_EVERY + 5))
        for _ in range(_CHECKPOINT_EVERY + 2):
            (r,) = await store.claim("r", 1, 30.0)
            await store.mark_sent("r", [r.seq])
        assert store._conn is not None
        assert store._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        task = store._checkpointing
        assert task is not None
        await task
        assert task.exception() is None and store._commits < _CHECKPOINT_EVERY
        # the calls made meanwhile went through the thread and all landed
        assert (await store.status()).pending == 3
    finally:
        await store.close()


async def test_a_cancelled_call_still_in_the_thread_keeps_the_next_ones_off_the_loop(
    db_path: str,
) -> None:
    """A call waiting for the lock in the store's thread goes on there after its caller is
    cancelled (as when a relay is stopped): calls made meanwhile must queue behind it in
    the thread, not run on the loop on the same connection and wait for the lock there."""
    store = SqliteOutboxStore(db_path, busy_timeout=30.0)
    await store.create_schema()
    with sqlite3.connect(db_path) as conn:
        store.append(conn, make_rows(3))
    tx = await ThreadTx(db_path).open()
    try:
        seqs = [r.seq for r in await store.claim("r", 10, 30.0)]
        await tx.run(store.append, tx.conn, make_rows(1))  # holds the write lock
        park = asyncio.ensure_future(store.park("r", seqs[:1], "bad"))
        await asyncio.sleep(0.1)
        park.cancel()
        await asyncio.gather(park, return_exceptions=True)
        started = time.monotonic()
        mark = asyncio.ensure_future(store.mark_sent("r", seqs[1:2]))
        await asyncio.sleep(0)
        assert time.monotonic() - started < 1.0  # the loop was not held
        assert not mark.done()
        await asyncio.sleep(0.2)
        assert not mark.done()
        await tx.end(True)
        await asyncio.wait_for(mark, 10.0)
        status = await store.status()
        assert (status.parked, status.pending) == (1, 2)  # the cancelled park still landed
    finally:
        await store.close()


from msdata.adapters.sqlite.audit import SqliteOutboxAudit  # noqa: E402
from msdata.testing.conformance.audit import OutboxAuditConformance  # noqa: E402


class TestSqliteOutboxAudit(SqliteOutboxHooks, OutboxAuditConformance):
    def make_audit(self, store: Any, name: str) -> SqliteOutboxAudit:
        return SqliteOutboxAudit(store, name=name)


def test_from_url_refuses_a_postgres_only_option_by_name(db_path: str) -> None:
    with pytest.raises(ConfigurationError, match="notify: an option of the PostgreSQL"):
        SqliteOutboxStore.from_url(f"sqlite:///{db_path}", notify=False)
    from msdata.urls import store_from_url

    with pytest.raises(ConfigurationError, match="partitioned"):
        store_from_url("outbox", f"sqlite:///{db_path}", partitioned=True)
