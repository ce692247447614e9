"""A stateful property test of outbox + relay + inbox: hypothesis interleaves adds, commits,
rollbacks, relay steps, publish failures, relay crashes (with and without publishing, then
lease expiry) and redeliveries, and checks after every step that nothing uncommitted was
published, and at the end that

- the set of published messages equals the set of committed ones,
- per partition key, messages are first published in the order they were added (for
  transactions that did not overlap; within one transaction, in add order),
- through the inbox, every committed message's effect was applied exactly once.

Runs on memory and SQLite; ``PostgresBackend`` runs it on PostgreSQL when the adapter and
server are there. To run it on another store, subclass ``Backend`` and ``OutboxMachine``.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import tempfile
import uuid
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from msdata.adapters.memory import MemoryInboxStore, MemoryOutboxStore, MemoryTransaction
from msdata.outbox import Inbox, OutboxRelay, OutboxRow
from msdata.testing.conformance.outbox import make_row
from msdata.testing.conformance.relay import RecordingPublisher
from msdata.transport import TransportMessage

LEASE = 0.02
KEYS: list[str | None] = ["a", "b", "c", None]
TOPIC = {"a": "t1", "b": "t1", "c": "t2", None: "t2"}  # a key lives in one topic


class Backend:
    """A store pair plus business transactions, driven from one event loop."""

    concurrent_writers = True
    outbox_store: Any
    inbox_store: Any

    async def setup(self) -> None: ...
    async def teardown(self) -> None: ...
    async def begin(self) -> Any: ...
    async def add(self, tx: Any, rows: list[OutboxRow]) -> None: ...
    async def commit(self, tx: Any) -> None: ...
    async def rollback(self, tx: Any) -> None: ...

    async def apply(self, consumer: str, message_id: str) -> None:
        """One delivery through the inbox: record, and the first time apply the effect."""

    async def effects(self) -> Counter[str]: ...


class MemoryBackend(Backend):
    async def setup(self) -> None:
        self.outbox_store, self.inbox_store = MemoryOutboxStore(), MemoryInboxStore()
        self.inbox = Inbox(self.inbox_store)
        self._effects: Counter[str] = Counter()

    async def begin(self) -> MemoryTransaction:
        return MemoryTransaction()

    async def add(self, tx: MemoryTransaction, rows: list[OutboxRow]) -> None:
        self.outbox_store.append(tx, rows)

    async def commit(self, tx: MemoryTransaction) -> None:
        tx.commit()

    async def rollback(self, tx: MemoryTransaction) -> None:
        tx.rollback()

    async def apply(self, consumer: str, message_id: str) -> None:
        with MemoryTransaction() as tx:
            if self.inbox.first_time(tx, consumer, message_id):
                tx.on_commit(lambda: self._effects.update([message_id]))

    async def effects(self) -> Counter[str]:
        return self._effects


class SqliteBackend(Backend):
    concurrent_writers = False  # one writer at a time: the machine never opens two

    async def setup(self) -> None:
        from msdata.adapters.sqlite import SqliteInboxStore, SqliteOutboxStore

        self.dir = tempfile.mkdtemp(prefix="msdata-prop-")
        self.path = f"{self.dir}/p.db"
        self.outbox_store = SqliteOutboxStore(self.path, poll_interval=0.01)
        self.inbox_store = SqliteInboxStore(self.path)
        await self.outbox_store.create_schema()
        await self.inbox_store.create_schema()
        self.inbox = Inbox(self.inbox_store)
        self.conn = sqlite3.connect(self.path, timeout=5.0)
        self.conn.execute("CREATE TABLE effects (message_id TEXT NOT NULL)")
        self.conn.commit()

    async def teardown(self) -> None:
        self.conn.close()
        await self.outbox_store.close()
        await self.inbox_store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    async def begin(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=5.0)

    async def add(self, tx: sqlite3.Connection, rows: list[OutboxRow]) -> None:
        self.outbox_store.append(tx, rows)

    async def commit(self, tx: sqlite3.Connection) -> None:
        tx.commit()
        tx.close()

    async def rollback(self, tx: sqlite3.Connection) -> None:
        tx.rollback()
        tx.close()

    async def apply(self, consumer: str, message_id: str) -> None:
        with self.conn:  # one transaction: the inbox record and the effect row
            if self.inbox.first_time(self.conn, consumer, message_id):
                self.conn.execute("INSERT INTO effects VALUES (?)", (message_id,))

    async def effects(self) -> Counter[str]:
        return Counter(r[0] for r in self.conn.execute("SELECT message_id FROM effects"))


class PostgresBackend(Backend):
    """PostgreSQL: psycopg connections on the write side, a private table prefix."""

    url = "postgresql://postgres@127.0.0.1:5432/test"

    async def setup(self) -> None:
        import psycopg

        from msdata.adapters.postgres import PostgresInboxStore, PostgresOutboxStore

        self.prefix = f"p{uuid.uuid4().hex[:8]}_"
        self.outbox_store = PostgresOutboxStore.from_url(self.url, table_prefix=self.prefix)
        self.inbox_store = PostgresInboxStore.from_url(self.url, table_prefix=self.prefix)
        await self.outbox_store.create_schema()
        await self.inbox_store.create_schema()
        self.inbox = Inbox(self.inbox_store)
        self.conn = psycopg.connect(self.url)
        self.conn.execute(f"CREATE TABLE {self.prefix}effects (message_id text NOT NULL)")
        self.conn.commit()

    async def teardown(self) -> None:
        self.conn.execute(f"DROP TABLE IF EXISTS {self.prefix}effects")
        self.conn.commit()
        self.conn.close()
        await self.outbox_store.drop_schema()
        await self.inbox_store.drop_schema()
        await self.outbox_store.close()
        close = getattr(self.inbox_store, "close", None)
        if close is not None:
            await close()

    async def begin(self) -> Any:
        import psycopg

        return psycopg.connect(self.url)

    async def add(self, tx: Any, rows: list[OutboxRow]) -> None:
        self.outbox_store.append(tx, rows)

    async def commit(self, tx: Any) -> None:
        tx.commit()
        tx.close()

    async def rollback(self, tx: Any) -> None:
        tx.rollback()
        tx.close()

    async def apply(self, consumer: str, message_id: str) -> None:
        with self.conn.transaction():
            if self.inbox.first_time(self.conn, consumer, message_id):
                self.conn.execute(f"INSERT INTO {self.prefix}effects VALUES (%s)", (message_id,))

    async def effects(self) -> Counter[str]:
        rows = self.conn.execute(f"SELECT message_id FROM {self.prefix}effects").fetchall()
        self.conn.commit()
        return Counter(r[0] for r in rows)


class OutboxMachine(RuleBasedStateMachine):
    backend_class: type[Backend] = MemoryBackend

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.backend = self.backend_class()
        self.run(self.backend.setup())
        self.publisher = self.run(self._publisher())
        self.relays = [
            OutboxRelay(
                self.backend.outbox_store,
                self.publisher,
                relay_id=f"relay-{i}",
                batch_size=3,
                lease_seconds=30.0,
                max_attempts=3,
                backoff=lambda n: 0.0,
            )
            for i in range(2)
        ]
        self.clock = 0
        self.open: list[tuple[Any, list[tuple[OutboxRow, int]]]] = []
        # message id -> (row, time added, time its transaction committed)
        self.committed: dict[str, tuple[OutboxRow, int, int]] = {}
        self.rolled_back: set[str] = set()
        self.delivered = 0
        self.n = 0

    async def _publisher(self) -> RecordingPublisher:
        return RecordingPublisher()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def writing(self) -> bool:
        return bool(self.open)

    # -- business transactions -----------------------------------------------------------

    @precondition(lambda self: self.backend.concurrent_writers or not self.open)
    @rule()
    def begin(self) -> None:
        self.open.append((self.run(self.backend.begin()), []))

    @precondition(lambda self: self.open)
    @rule(data=st.data(), count=st.integers(1, 3))
    def add(self, data: st.DataObject, count: int) -> None:
        i = data.draw(st.integers(0, len(self.open) - 1))
        tx, added = self.open[i]
        rows = []
        for _ in range(count):
            key = data.draw(st.sampled_from(KEYS))
            self.n += 1
            rows.append(make_row(key=key, topic=TOPIC[key], n=self.n))
        self.run(self.backend.add(tx, rows))
        added.extend((r, self.tick()) for r in rows)

    @precondition(lambda self: self.open)
    @rule(data=st.data(), commit=st.booleans())
    def end(self, data: st.DataObject, commit: bool) -> None:
        tx, added = self.open.pop(data.draw(st.integers(0, len(self.open) - 1)))
        if commit:
            self.run(self.backend.commit(tx))
            at = self.tick()
            for row, t in added:
                self.committed[row.message_id] = (row, t, at)
        else:
            self.run(self.backend.rollback(tx))
            self.rolled_back.update(r.message_id for r, _ in added)

    # -- relays ------------------------------------------------------------------------------

    @precondition(lambda self: not self.writing())
    @rule(i=st.integers(0, 1))
    def relay_step(self, i: int) -> None:
        self.run(self.relays[i].run_once())

    @precondition(lambda self: not self.writing())
    @rule()
    def publish_fails(self) -> None:
        self.publisher.fail_next += 1
        self.run(self.relays[0].run_once())
        self.publisher.fail_next = 0

    @precondition(lambda self: not self.writing())
    @rule(published=st.integers(0, 3))
    def relay_crashes(self, published: int) -> None:
        """A relay claims with a short lease, publishes a prefix, and dies."""
        store = self.backend.outbox_store
        claimed = self.run(store.claim(f"dead-{uuid.uuid4().hex[:6]}", 3, LEASE))
        prefix = claimed[:published]
        publisher = self.relays[0].publisher
        for r in prefix:
            message = TransportMessage(r.message_id, r.payload, r.partition_key, r.headers)
            self.run(publisher.publish(r.topic, [message]))

    @precondition(lambda self: not self.writing())
    @rule()
    def leases_expire(self) -> None:
        self.run(asyncio.sleep(LEASE + 0.01))

    # -- consumer ------------------------------------------------------------------------

    @precondition(lambda self: not self.writing())
    @rule(count=st.integers(1, 5))
    def deliver(self, count: int) -> None:
        for _, m in self.publisher.published[self.delivered : self.delivered + count]:
            self.run(self.backend.apply("consumer", m.id))
        self.delivered = min(len(self.publisher.published), self.delivered + count)

    @precondition(lambda self: not self.writing() and self.delivered > 0)
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, self.delivered - 1))
        self.run(self.backend.apply("consumer", self.publisher.published[i][1].id))

    @invariant()
    def nothing_uncommitted_is_published(self) -> None:
        for _, m in self.publisher.published:
            assert m.id in self.committed, f"{m.id} published but not committed"

    # -- the end -----------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            self.finish()
        finally:
            self.run(self.backend.teardown())
            self.loop.close()

    def finish(self) -> None:
        for tx, _ in self.open:
            self.run(self.backend.rollback(tx))
        self.open.clear()
        relay = self.relays[1]
        for _ in range(50):
            self.run(relay.requeue())
            for r in self.relays:  # on SQLite only the relay holding the lease claims
                while self.run(r.run_once()):
                    pass
            if self.run(relay.status()).pending == 0:
                break
            self.run(asyncio.sleep(LEASE))
        assert self.run(relay.status()).pending == 0
        published = self.publisher.published
        for _, m in published[self.delivered :]:
            self.run(self.backend.apply("consumer", m.id))

        assert {m.id for _, m in published} == set(self.committed)
        first: dict[str, int] = {}
        for i, (_, m) in enumerate(published):
            first.setdefault(m.id, i)
        for key in KEYS:
            if key is None:
                continue
            mine = [c for c in self.committed.values() if c[0].partition_key == key]
            for a_row, a_added, a_commit in mine:
                for b_row, b_added, b_commit in mine:
                    same_tx = a_commit == b_commit
                    before = a_added < b_added if same_tx else a_commit < b_added
                    if before:
                        assert first[a_row.message_id] < first[b_row.message_id], (
                            f"key {key}: {b_row.message_id} published before {a_row.message_id}"
                        )
        effects = self.run(self.backend.effects())
        assert effects == Counter(list(self.committed)), "an effect was lost or applied twice"


FAST = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class MemoryMachine(OutboxMachine):
    backend_class = MemoryBackend


class SqliteMachine(OutboxMachine):
    backend_class = SqliteBackend


class PostgresMachine(OutboxMachine):
    backend_class = PostgresBackend


TestOutboxPropertiesMemory = MemoryMachine.TestCase
TestOutboxPropertiesMemory.settings = FAST
TestOutboxPropertiesSqlite = SqliteMachine.TestCase
TestOutboxPropertiesSqlite.settings = settings(FAST, max_examples=15)


@pytest.mark.postgres
def test_outbox_properties_postgres(postgres_url: str) -> None:
    try:
        from msdata.adapters.postgres import PostgresOutboxStore  # noqa: F401
    except ImportError as e:
        pytest.skip(f"postgres adapter not built yet ({e})")
    PostgresBackend.url = postgres_url
    run = PostgresMachine.TestCase("runTest")
    run.settings = settings(FAST, max_examples=8)
    run.runTest()
