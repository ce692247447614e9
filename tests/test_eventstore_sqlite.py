"""The event-store and checkpoint-store conformance suites on SQLite, and a projection on a
SQLite read model (checkpoint in the read model's transaction, rebuild behind a view)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from msdata.adapters.sqlite import SqliteCheckpointStore, SqliteEventStore
from msdata.errors import ConfigurationError
from msdata.eventstore import EventLog, EventStore, NewEvent
from msdata.messages import Event, MessageRegistry
from msdata.projections import (
    CheckpointStore,
    Projection,
    ProjectionContext,
    ProjectionRunner,
    handles,
)
from msdata.testing import eventually
from msdata.testing.conformance.checkpoints import CheckpointStoreConformance
from msdata.testing.conformance.eventstore import (
    EventStoreConformance,
    EventStoreFeatures,
    make_events,
)

T = TypeVar("T")


class ThreadTx:
    """A transaction on its own sqlite3 connection, in its own thread, so one waiting for
    SQLite's write lock does not stop the event loop."""

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
    tmp: Path

    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path: Path) -> None:
        self.tmp = tmp_path

    async def begin(self, store: Any) -> ThreadTx:
        return await ThreadTx(store.path).open()

    async def commit(self, tx: ThreadTx) -> None:
        await tx.end(True)

    async def rollback(self, tx: ThreadTx) -> None:
        await tx.end(False)


class TestSqliteEventStore(SqliteHooks, EventStoreConformance):
    features = EventStoreFeatures(concurrent_writers=False)

    @asynccontextmanager
    async def make_store(self) -> AsyncIterator[EventStore]:
        store = SqliteEventStore(self.tmp / "events.db", poll_interval=0.02)
        await store.create_schema()
        try:
            yield store
        finally:
            await store.close()

    async def append(
        self, store: Any, tx: ThreadTx, stream_id: str, expected: int, events: Sequence[NewEvent]
    ) -> int:
        version: int = await tx.run(store.append, tx.conn, stream_id, expected, events)
        return version


class TestSqliteCheckpointStore(SqliteHooks, CheckpointStoreConformance):
    @asynccontextmanager
    async def make_checkpoint_store(self) -> AsyncIterator[CheckpointStore]:
        store = SqliteCheckpointStore(self.tmp / "model.db")
        await store.create_schema()
        try:
            yield store
        finally:
            await store.close()

    async def save(self, store: Any, tx: ThreadTx, name: str, position: int, expected: int) -> None:
        await tx.run(store.save, tx.conn, name, position, expected)

    async def activate(self, store: Any, tx: ThreadTx, projection: str, generation: int) -> None:
        await tx.run(store.activate, tx.conn, projection, generation)


# -- SQLite specifics -----------------------------------------------------------------------


async def test_another_process_connection_wakes_a_waiter_by_data_version(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "e.db", poll_interval=0.02)
    await store.create_schema()
    try:
        waiter = asyncio.ensure_future(store.wait_for_events(0, 30.0))
        await asyncio.sleep(0.05)
        other = SqliteEventStore(tmp_path / "e.db")
        with sqlite3.connect(tmp_path / "e.db") as conn:
            other.append(conn, "a", 0, make_events(1))
        await other.close()
        await eventually(waiter.done, what="woken")
    finally:
        await store.close()


async def test_autocommit_connection_without_a_transaction_is_refused(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "e.db")
    await store.create_schema()
    try:
        conn = sqlite3.connect(tmp_path / "e.db", isolation_level=None)
        with pytest.raises(ConfigurationError):
            store.append(conn, "a", 0, make_events(1))
        conn.close()
    finally:
        await store.close()


async def test_a_default_mode_connection_is_a_transaction_the_caller_commits(
    tmp_path: Path,
) -> None:
    """The documented rule: sqlite3's default mode opens a transaction itself before the
    first INSERT, so ``in_transaction`` False there is accepted; nothing commits until the
    caller does (a rollback, or closing the connection, drops the events)."""
    store = SqliteEventStore(tmp_path / "e.db")
    await store.create_schema()
    try:
        conn = sqlite3.connect(tmp_path / "e.db")
        assert not conn.in_transaction
        store.append(conn, "a", 0, make_events(1))
        assert conn.in_transaction  # sqlite3 opened it; msdata did not commit
        conn.rollback()
        assert await store.stream_version("a") == 0
        store.append(conn, "a", 0, make_events(1))
        conn.close()  # closing without commit rolls back too
        assert await store.stream_version("a") == 0
    finally:
        await store.close()


registry = MessageRegistry()


class Counted(Event):
    key: str


registry.register(Counted, "test.Counted")


class Counts(Projection):
    """A read model in SQLite: one table per generation, readers use the view ``counts``."""

    name = "counts"

    def setup(self, conn: Any, generation: int) -> None:
        conn.execute(f"DROP TABLE IF EXISTS counts_{generation}")
        conn.execute(f"CREATE TABLE counts_{generation} (key TEXT PRIMARY KEY, n INTEGER)")

    def activate(self, conn: Any, generation: int) -> None:
        conn.execute("DROP VIEW IF EXISTS counts")
        conn.execute(f"CREATE VIEW counts AS SELECT * FROM counts_{generation}")

    def drop(self, conn: Any, generation: int) -> None:
        conn.execute(f"DROP TABLE IF EXISTS counts_{generation}")

    @handles(Counted)
    def counted(self, ctx: ProjectionContext, event: Counted) -> None:
        ctx.conn.execute(
            f"INSERT INTO counts_{ctx.generation} VALUES (?, 1) "
            "ON CONFLICT (key) DO UPDATE SET n = n + 1",
            (event.key,),
        )


async def test_projection_on_a_sqlite_read_model_with_rebuild_behind_a_view(
    tmp_path: Path,
) -> None:
    events_db, model_db = tmp_path / "events.db", tmp_path / "model.db"
    store = SqliteEventStore(events_db)
    checkpoints = SqliteCheckpointStore(model_db)
    await store.create_schema()
    await checkpoints.create_schema()
    log = EventLog(store, registry=registry)

    def transaction() -> sqlite3.Connection:
        return sqlite3.connect(model_db)  # a context manager: commits on exit

    runner = ProjectionRunner(Counts(), log, checkpoints, transaction, batch_size=4)
    try:
        with sqlite3.connect(events_db) as conn:
            for i in range(10):
                log.append(conn, f"s{i}", 0, [Counted(key="ab"[i % 2])])
        assert await runner.catch_up() == 10
        reader = sqlite3.connect(model_db)
        assert dict(reader.execute("SELECT key, n FROM counts")) == {"a": 5, "b": 5}
        assert await checkpoints.load("counts@1") == 10
        assert await runner.rebuild(drop_old=True) == 2
        assert dict(reader.execute("SELECT key, n FROM counts")) == {"a": 5, "b": 5}
        tables = {r[0] for r in reader.execute("SELECT name FROM sqlite_master")}
        assert "counts_1" not in tables and "counts_2" in tables
        reader.close()
    finally:
        await store.close()
        await checkpoints.close()
