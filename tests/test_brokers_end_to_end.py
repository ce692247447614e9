"""The outbox, the relay, the event bus and the inbox end to end, over every transport.

One set of tests, parametrised over the transports (memory, Redis, RabbitMQ, NATS; see
tests/transport_factories.py) and, for the outbox test, over the databases on both sides
(PostgreSQL, SQLite):

- orders written with their outbox messages in business transactions (some rolled back)
  are published by relays that crash between publish and mark, consumed through the event
  bus with the inbox, and applied once each, in order per key where the transport keeps it;
- what a foreign producer puts on the broker that cannot be decoded goes to the dead-letter
  topic with the reason, and the consumer handles the good message after it.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, Protocol

import pytest

from msdata.events import EventBus
from msdata.messages import Envelope, Event, MessageRegistry, message_type
from msdata.outbox import Inbox, Outbox, OutboxRelay, OutboxStore, TransactionFactory
from msdata.testing import eventually
from msdata.testing.conformance.transport import collect
from msdata.transport import (
    DEAD_LETTER_REASON,
    DEAD_LETTER_TOPIC,
    Transport,
    TransportMessage,
    dead_letter_topic,
)
from services import require
from transport_factories import TRANSPORTS, open_transport

registry = MessageRegistry()


@message_type("e2e.OrderStep", registry=registry)
class OrderStep(Event):
    """Step 0, 1, 2 of an order (placed, paid, shipped): their order matters."""

    order_id: str
    step: int


ORDERS = 200
STEPS = 3
BATCH = 100  # the relays' batch size
GROUP = "billing"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# -- the two databases: the producer's (orders + outbox) and the consumer's (inbox + effects) --


class Databases(Protocol):
    @property
    def outbox_store(self) -> OutboxStore: ...
    @property
    def inbox(self) -> Inbox: ...

    def relay_store(self) -> OutboxStore:
        """A store of its own for one more relay (as another process would have)."""
        ...

    async def write(
        self, outbox: Outbox, topic: str, steps: Sequence[tuple[str, int]], *, commit: bool
    ) -> list[Envelope[Any]]:
        """One business transaction: set each order's step and add its event to the outbox."""
        ...

    def transaction(self) -> TransactionFactory: ...

    async def apply(self, conn: Any, event: OrderStep) -> None:
        """The consumer's effect, on the inbox transaction's connection."""
        ...

    async def effects(self) -> list[tuple[str, int]]:
        """Every effect applied, in the order applied."""
        ...


class PostgresDatabases:
    """Both sides on the shared PostgreSQL, under one fresh table prefix, dropped at the end."""

    def __init__(self, url: str) -> None:
        from msdata.adapters.postgres import PostgresInboxStore, PostgresOutboxStore

        self.url = url
        self.prefix = f"e2e{uuid.uuid4().hex[:10]}_"
        self._store_type = PostgresOutboxStore
        self.outbox_store = PostgresOutboxStore(url, table_prefix=self.prefix, max_size=2)
        self.inbox_store = PostgresInboxStore(url, table_prefix=self.prefix, max_size=1)
        self.inbox = Inbox(self.inbox_store)
        self._stores: list[Any] = [self.outbox_store]
        self._pool: Any = None

    async def open(self) -> None:
        import asyncpg

        await self.outbox_store.create_schema()
        await self.inbox_store.create_schema()
        self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=2)
        p = self.prefix
        await self._pool.execute(
            f"CREATE TABLE {p}orders (order_id text PRIMARY KEY, step int NOT NULL);"
            f"CREATE TABLE {p}effects (n bigserial PRIMARY KEY, order_id text, step int)"
        )

    async def close(self) -> None:
        try:
            for store in self._stores[1:]:
                await store.close()
            if self._pool is not None:
                p = self.prefix
                await self._pool.execute(f"DROP TABLE IF EXISTS {p}orders, {p}effects")
                await self._pool.close()
            await self.outbox_store.drop_schema()
            await self.inbox_store.drop_schema()
        finally:
            await self.outbox_store.close()
            await self.inbox_store.close()

    def relay_store(self) -> OutboxStore:
        store = self._store_type(self.url, table_prefix=self.prefix, max_size=2)
        self._stores.append(store)
        return store

    async def write(
        self, outbox: Outbox, topic: str, steps: Sequence[tuple[str, int]], *, commit: bool
    ) -> list[Envelope[Any]]:
        envelopes: list[Envelope[Any]] = []
        async with self._pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                for order_id, step in steps:
                    await conn.execute(
                        f"INSERT INTO {self.prefix}orders VALUES ($1, $2) "
                        "ON CONFLICT (order_id) DO UPDATE SET step = excluded.step",
                        order_id,
                        step,
                    )
                    envelopes += await outbox.add_async(
                        conn, OrderStep(order_id=order_id, step=step), key=order_id, topic=topic
                    )
            except BaseException:
                await tx.rollback()
                raise
            await (tx.commit() if commit else tx.rollback())
        return envelopes

    def transaction(self) -> TransactionFactory:
        pool = self._pool

        @asynccontextmanager
        async def begin() -> AsyncIterator[Any]:
            async with pool.acquire() as conn, conn.transaction():
                yield conn

        return begin

    async def apply(self, conn: Any, event: OrderStep) -> None:
        await conn.execute(
            f"INSERT INTO {self.prefix}effects (order_id, step) VALUES ($1, $2)",
            event.order_id,
            event.step,
        )

    async def effects(self) -> list[tuple[str, int]]:
        rows = await self._pool.fetch(f"SELECT order_id, step FROM {self.prefix}effects ORDER BY n")
        return [(r["order_id"], r["step"]) for r in rows]


class SqliteDatabases:
    """Two SQLite files: the orders service's (orders + outbox), the consumer's (inbox +
    effects), each written through the stdlib sqlite3 connection the application would use."""

    def __init__(self, directory: Path) -> None:
        from msdata.adapters.sqlite import SqliteInboxStore, SqliteOutboxStore

        self.orders_db = directory / "orders.db"
        self.billing_db = directory / "billing.db"
        self._store_type = SqliteOutboxStore
        self.outbox_store = SqliteOutboxStore(self.orders_db, poll_interval=0.02)
        self.inbox_store = SqliteInboxStore(self.billing_db)
        self.inbox = Inbox(self.inbox_store)
        self._stores: list[Any] = [self.outbox_store, self.inbox_store]
        self._writer: sqlite3.Connection | None = None
        self._consumer: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self.outbox_store.create_schema()
        await self.inbox_store.create_schema()
        self._writer = sqlite3.connect(self.orders_db)
        self._writer.execute("CREATE TABLE orders (order_id TEXT PRIMARY KEY, step INT)")
        self._consumer = sqlite3.connect(self.billing_db)
        self._consumer.execute(
            "CREATE TABLE effects (n INTEGER PRIMARY KEY, order_id TEXT, step INT)"
        )

    async def close(self) -> None:
        for store in self._stores:
            await store.close()
        for conn in (self._writer, self._consumer):
            if conn is not None:
                conn.close()

    def relay_store(self) -> OutboxStore:
        store = self._store_type(self.orders_db, poll_interval=0.02)
        self._stores.append(store)
        return store

    async def write(
        self, outbox: Outbox, topic: str, steps: Sequence[tuple[str, int]], *, commit: bool
    ) -> list[Envelope[Any]]:
        conn = self._writer
        assert conn is not None
        envelopes: list[Envelope[Any]] = []
        try:
            with conn:  # commits on exit, rolls back on an exception
                for order_id, step in steps:
                    conn.execute(
                        "INSERT INTO orders VALUES (?, ?) "
                        "ON CONFLICT (order_id) DO UPDATE SET step = excluded.step",
                        (order_id, step),
                    )
                    envelopes += outbox.add(
                        conn, OrderStep(order_id=order_id, step=step), key=order_id, topic=topic
                    )
                if not commit:
                    raise _RollBack
        except _RollBack:
            pass
        return envelopes

    def transaction(self) -> TransactionFactory:
        conn = self._consumer
        assert conn is not None

        @contextmanager
        def begin() -> Iterator[sqlite3.Connection]:
            with conn:
                yield conn

        return begin

    async def apply(self, conn: Any, event: OrderStep) -> None:
        conn.execute(
            "INSERT INTO effects (order_id, step) VALUES (?, ?)", (event.order_id, event.step)
        )

    async def effects(self) -> list[tuple[str, int]]:
        assert self._consumer is not None
        rows = self._consumer.execute("SELECT order_id, step FROM effects ORDER BY n").fetchall()
        return [(r[0], r[1]) for r in rows]


class _RollBack(Exception):
    pass


@pytest.fixture(
    params=[
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("sqlite"),
    ]
)
async def databases(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Databases]:
    db: PostgresDatabases | SqliteDatabases
    if request.param == "postgres":
        db = PostgresDatabases(require("postgres"))
    else:
        db = SqliteDatabases(tmp_path)
    try:
        await db.open()
        yield db
    finally:
        await db.close()


# -- relays that die between publishing and marking ------------------------------------------


class CountingPublisher:
    """Publishes through the transport and counts how often each message id went out.
    ``freeze=True``: after its first confirmed batch it stops dead, as a relay process that
    hangs (or is killed) after the broker confirmed and before it marked the rows sent."""

    def __init__(self, transport: Transport, sent: Counter[str], *, freeze: bool = False) -> None:
        self.transport = transport
        self.sent = sent
        self.freeze = freeze
        self.published = asyncio.Event()

    async def publish(self, topic: str, messages: Sequence[TransportMessage]) -> None:
        await self.transport.publish(topic, messages)
        self.sent.update(m.id for m in messages)
        self.published.set()
        if self.freeze:
            await asyncio.Event().wait()  # until cancelled


async def published(publisher: CountingPublisher, which: str) -> None:
    await eventually(
        publisher.published.is_set,
        15.0,
        what=f"{which} to publish (see the relay's log)",
    )


@pytest.mark.parametrize("backend", TRANSPORTS)
async def test_relay_publishes_every_committed_order_and_the_inbox_applies_each_once(
    backend: str, databases: Databases
) -> None:
    db = databases
    topic = unique("e2e.orders")
    outbox = Outbox(db.outbox_store, registry=registry, source="orders")
    seen: Counter[str] = Counter()  # deliveries reaching the consumer, by message id
    sent: Counter[str] = Counter()  # messages published by the relays, by message id
    to_fail: set[str] = set()
    failed: set[str] = set()

    async def consumer_dies_after_commit(envelope: Envelope[Any], call_next: Any) -> Any:
        # outside the inbox: its transaction has committed, the ack never happens, so the
        # broker delivers the message again and the inbox must skip it
        seen[envelope.id] += 1
        result = await call_next(envelope)
        if envelope.id in to_fail and envelope.id not in failed:
            failed.add(envelope.id)
            raise RuntimeError("consumer died after its commit, before the ack")
        return result

    async def apply(event: OrderStep) -> None:
        await db.apply(db.inbox.connection(), event)

    async with open_transport(backend, ordered=True) as transport:
        bus = EventBus(
            transport, registry=registry, max_attempts=50, backoff=lambda _: 0.05, prefetch=50
        )
        bus.subscribe(
            OrderStep,
            apply,
            group=GROUP,
            topic=topic,
            middleware=[consumer_dies_after_commit, db.inbox.middleware(GROUP, db.transaction())],
        )
        relays: list[OutboxRelay] = []
        async with bus:  # the group exists before anything is published
            committed: list[Envelope[Any]] = []
            orders = [f"order-{i:03d}" for i in range(ORDERS)]
            for step in range(STEPS):
                for start in range(0, ORDERS, 20):
                    chunk = [(o, step) for o in orders[start : start + 20]]
                    committed += await db.write(outbox, topic, chunk, commit=True)
                if step == 1:
                    ghosts = [(f"ghost-{i}", 0) for i in range(10)]
                    rolled_back = await db.write(outbox, topic, ghosts, commit=False)
            assert len(rolled_back) == 10
            to_fail.update(e.id for e in committed[5::7])

            def relay(publisher: CountingPublisher, lease: float) -> OutboxRelay:
                r = OutboxRelay(
                    db.relay_store(),
                    publisher,
                    batch_size=BATCH,
                    lease_seconds=lease,
                    poll_interval=0.05,
                    backoff=lambda _: 0.05,
                )
                relays.append(r)
                return r

            cancelled = CountingPublisher(transport, sent, freeze=True)
            frozen = CountingPublisher(transport, sent, freeze=True)
            try:
                # 1. publishes a batch, then is cancelled before marking: rows released
                first = relay(cancelled, 30.0)
                await first.start()
                await published(cancelled, "the relay to be cancelled")
                await first.stop(timeout=0)
                # 2. publishes a batch and hangs past its lease, never marking it
                second = relay(frozen, 0.5)
                await second.start()
                await published(frozen, "the relay to freeze")
                # 3. two healthy relays at once; they take over the frozen one's rows when
                # its lease expires
                for _ in range(2):
                    await relay(CountingPublisher(transport, sent), 10.0).start()

                async def done() -> bool:
                    return (
                        len(await db.effects()) >= len(committed)
                        and (await db.outbox_store.status()).pending == 0
                        and failed == to_fail
                        and all(seen[i] >= 2 for i in to_fail)
                    )

                await eventually(
                    done,
                    40.0,
                    interval=0.05,
                    what=lambda: (
                        f"{len(seen)} of {len(committed)} delivered, "
                        f"{len(failed)} of {len(to_fail)} forced redeliveries"
                    ),
                )
                await asyncio.sleep(0.5)  # a late duplicate would be applied now
            finally:
                for r in relays:
                    await r.stop(timeout=0 if r.publisher in (cancelled, frozen) else 5)

        effects = await db.effects()
        status = await db.outbox_store.status()

    want = Counter((e.message.order_id, e.message.step) for e in committed)
    assert len(want) == ORDERS * STEPS
    # every committed order step applied exactly once, nothing of the rolled-back transaction
    assert Counter(effects) == want
    assert status.pending == 0 and status.parked == 0
    # the duplicates really happened, on both sides
    published_again = [i for i, n in sent.items() if n > 1]
    assert len(published_again) >= BATCH
    assert not {e.id for e in rolled_back} & set(sent)
    assert sum(seen.values()) >= len(committed) + len(to_fail)
    if transport.features.ordered_per_key:
        by_order: dict[str, list[int]] = defaultdict(list)
        for order_id, step in effects:
            by_order[order_id].append(step)
        out_of_order = {o: s for o, s in by_order.items() if s != list(range(STEPS))}
        assert out_of_order == {}


# -- a foreign producer's garbage ---------------------------------------------------------------


def _foreign_bodies() -> list[tuple[bytes, str]]:
    """(body, the error its dead-letter reason must name)."""
    unknown = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "legacy-billing",
        "type": "legacy.InvoiceRaised",
        "time": "2026-11-25T10:00:00Z",
        "datacontenttype": "application/json",
        "data": {"invoice": 7},
    }
    return [
        (b"\x00\xffnot json at all {", "MalformedMessage"),
        (json.dumps({"order_id": "o-1", "amount": 12}).encode(), "InvalidEnvelope"),
        (json.dumps(unknown).encode(), "UnknownMessageType"),
    ]


@pytest.mark.parametrize("backend", TRANSPORTS)
async def test_undecodable_messages_from_a_foreign_producer_are_dead_lettered_and_the_consumer_goes_on(  # noqa: E501
    backend: str,
) -> None:
    topic, group = unique("e2e.foreign"), "shipping"
    handled: list[OrderStep] = []
    second = asyncio.Event()

    async def ship(event: OrderStep) -> None:
        handled.append(event)
        if len(handled) == 2:
            second.set()

    async with open_transport(backend) as transport:
        bus = EventBus(transport, registry=registry)
        bus.subscribe(OrderStep, ship, group=group, topic=topic)
        bad = _foreign_bodies()
        async with bus:
            await transport.publish(
                topic, [TransportMessage(id=str(uuid.uuid4()), body=body) for body, _ in bad]
            )
            await bus.publish(OrderStep(order_id="o-1", step=0), key="o-1", topic=topic)
            async with transport.subscribe(dead_letter_topic(topic, group), "ops") as dlq:
                dead = await collect(dlq, len(bad), timeout=15.0)
            # the consumer is still going: a message published after the DLQ filled is handled
            await bus.publish(OrderStep(order_id="o-2", step=0), key="o-2", topic=topic)
            await eventually(second.is_set, 15.0, what="the message published after the DLQ")
            await asyncio.sleep(0.3)  # nothing else is handled

    assert [(e.order_id, e.step) for e in handled] == [("o-1", 0), ("o-2", 0)]
    by_body = {d.message.body: d.message.headers for d in dead}
    assert len(dead) == len(bad) and set(by_body) == {body for body, _ in bad}
    for body, error in bad:
        headers = by_body[body]
        assert error in headers[DEAD_LETTER_REASON], headers
        assert headers[DEAD_LETTER_TOPIC] == topic
