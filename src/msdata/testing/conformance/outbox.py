"""The outbox store conformance suite: every outbox store must pass it.

Subclass :class:`OutboxStoreConformance` once per backend and fill in the hooks; the same
tests then run on memory, SQLite, PostgreSQL, or your own adapter. What the backend can do
comes from the store's own ``features`` (:class:`msdata.outbox.OutboxStoreFeatures`)::

    class MyOutboxHooks(OutboxStoreHooks):
        @asynccontextmanager
        async def make_store(self, *, clock: Clock = SYSTEM_CLOCK) -> AsyncIterator[Any]:
            store = MyOutboxStore(..., table_prefix=f"t{uuid.uuid4().hex[:8]}_", clock=clock)
            await store.create_schema()
            try:
                yield store
            finally:
                await store.close()          # and drop the tables

        async def begin(self, store: Any) -> Any:         # a business transaction
            return await my_pool.connection_in_transaction()

        async def add(self, store: Any, tx: Any, rows: Sequence[OutboxRow]) -> None:
            await store.append_async(tx, rows)            # or store.append(tx, rows)

        async def commit(self, tx: Any) -> None: ...
        async def rollback(self, tx: Any) -> None: ...

    class TestMyOutboxStore(MyOutboxHooks, OutboxStoreConformance): ...
    class TestMyOutboxRelay(MyOutboxHooks, OutboxRelayConformance): ...   # .relay

Hooks (names are stable):

``make_store(clock=SYSTEM_CLOCK)``
    async context manager yielding a fresh, empty outbox store with its schema created
    (its own tables, e.g. a unique table prefix), reading time from ``clock`` (a store
    whose ``features.reads_clock`` is False ignores it); closes it and drops them on exit.
``open_again(store)``
    async context manager yielding another store over the *same* tables, as a second
    relay process would open it (its own connections). Default: yields ``store``.
``begin(store)``, ``commit(tx)``, ``rollback(tx)``
    open, commit and roll back a business transaction on the backend; ``begin`` returns
    a handle ``tx`` that the other hooks take (a connection, or a wrapper around one).
    Two transactions from ``begin`` may be open at once.
``add(store, tx, rows)``
    write ``rows`` through the store's write side (``append``/``append_async``) on
    ``tx``'s connection.
``lease_seconds``
    the short lease used by the expiry tests (default 0.4 s; with a fake clock it is
    only a number).

Fault injection (optional; a test whose hook is not implemented is skipped):

``make_store_without_schema()``
    async context manager yielding a store whose tables were never created.
``failing_claims(store)``
    async context manager inside which the claim half of ``mark_sent_and_claim`` fails
    with a driver error after its mark half ran (so the test can check that neither took
    effect); the store works again after it.
``write_raw_row(store, columns)``
    write one committed outbox row as another writer would (a hand-written INSERT, a
    migration, a service in another language), bypassing the store's write side, and
    return its ``seq``; ``None`` when the database or its driver refuses a value (a
    column type it enforces: such a value can never be stored). ``columns`` maps the
    port's field names (``message_id``, ``topic``, ``type``, ``payload``,
    ``partition_key``, ``headers`` as JSON text, ``created_at``) to values: a ``str``,
    ``bytes``, ``int``, ``float`` or ``None`` is bound as the driver binds it (so
    ``bytes`` is a BLOB/bytea), a :class:`RawText` is text of exactly those bytes (their
    encoding unchecked), an :class:`SqlLiteral` is written into the statement as is. A
    column not given gets what the store's own write would give it (``created_at``: now;
    ``headers``: none). Used by the cases on rows the relay cannot read; a store that can
    hold no row its own write side did not make (memory) leaves it unimplemented, and
    those cases are skipped.

Needs pytest and pytest-asyncio (``asyncio_mode = "auto"``).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest

from msdata.clock import SYSTEM_CLOCK, Clock
from msdata.errors import ConfigurationError, SchemaError, StoreError
from msdata.outbox.store import (
    OutboxBatch,
    OutboxRecord,
    OutboxRow,
    OutboxStore,
    OutboxStoreFeatures,
)
from msdata.testing.conformance.hooks import StoreUrlCases, TransactionHooks
from msdata.testing.fakes import FakeClock
from msdata.transport import TransportMessage

__all__ = [
    "MALFORMED_ROWS",
    "OutboxStoreConformance",
    "OutboxStoreFeatures",
    "OutboxStoreHooks",
    "RawText",
    "SqlLiteral",
    "StoreTime",
    "make_row",
    "make_rows",
]


class SqlLiteral(str):
    """A column value for ``write_raw_row``: an SQL expression written into the INSERT as
    is, e.g. ``SqlLiteral("'infinity'")`` (a timestamp on PostgreSQL, text on SQLite)."""

    __slots__ = ()


class RawText(bytes):
    """A column value for ``write_raw_row``: text made of exactly these bytes, their
    encoding unchecked (SQLite stores them so; a database that checks encodings refuses)."""

    __slots__ = ()


#: Rows another writer may leave in the outbox table, that no claim may fail on: (what is
#: wrong, the columns that differ from a good row's). Each is parked alone, with a reason
#: naming the column; a store whose schema refuses a value never holds that row.
MALFORMED_ROWS: list[tuple[str, dict[str, object]]] = [
    ("headers", {"headers": "[1,2]"}),
    ("headers", {"headers": "null"}),
    ("headers", {"headers": '"s"'}),
    ("headers", {"headers": '{"a": 1}'}),
    ("headers", {"headers": "{not json"}),
    ("headers", {"headers": RawText(b'{"a": "\xff"}')}),
    ("payload", {"payload": '{"specversion": "1.0"}'}),
    ("payload", {"payload": 1.5}),
    ("payload", {"payload": 2**62}),
    ("created_at", {"created_at": "yesterday"}),
    ("created_at", {"created_at": 1e20}),
    ("created_at", {"created_at": float("inf")}),
    ("created_at", {"created_at": SqlLiteral("'200000-01-01 00:00:00+00'")}),
    ("created_at", {"created_at": SqlLiteral("'infinity'")}),
    ("created_at", {"created_at": SqlLiteral("'-infinity'")}),
    ("message_id", {"message_id": RawText(b"\xffid")}),
    ("message_id", {"message_id": b"an-id-as-a-blob"}),
    ("topic", {"topic": RawText(b"orders\xff")}),
    ("topic", {"topic": b"orders"}),
    ("type", {"type": b"test.Numbered"}),
]


def make_row(
    *, key: str | None = None, topic: str = "orders", n: int = 0, payload: bytes | None = None
) -> OutboxRow:
    """An outbox row with a small valid CloudEvents payload (unless ``payload`` is given)."""
    mid = str(uuid.uuid4())
    if payload is None:
        payload = json.dumps(
            {
                "specversion": "1.0",
                "id": mid,
                "source": "conformance",
                "type": "test.Numbered",
                "time": datetime.now(UTC).isoformat(),
                "datacontenttype": "application/json",
                "data": {"n": n, "key": key},
            },
            separators=(",", ":"),
        ).encode()
    return OutboxRow(
        message_id=mid,
        topic=topic,
        type="test.Numbered",
        payload=payload,
        partition_key=key,
        aggregate_type=topic,
        headers={"x-n": str(n)},
    )


def make_rows(
    n: int, *, keys: Sequence[str | None] = (None,), topic: str = "orders"
) -> list[OutboxRow]:
    """``n`` rows, keys taken round-robin from ``keys``."""
    return [make_row(key=keys[i % len(keys)], topic=topic, n=i) for i in range(n)]


async def leave(store: Any, relay_id: str) -> None:
    """A relay stops cleanly: with ``features.partitioned`` its partitions go back at once
    (``store.leave``); other stores need nothing."""
    if store.features.partitioned:
        await store.leave(relay_id)


class StoreTime:
    """Time as a store sees it in a test: a :class:`FakeClock` the test moves when the
    store reads its clock (``features.reads_clock``), else the real clock, waited out."""

    def __init__(self, clock: FakeClock | None) -> None:
        self.clock = clock

    @property
    def fake(self) -> bool:
        return self.clock is not None

    def now(self) -> datetime:
        return self.clock.now() if self.clock is not None else datetime.now(UTC)

    def relay_clock(self) -> dict[str, Any]:
        """Options for a relay that reads the store's clock: ``{"clock": ...}``, or none."""
        return {} if self.clock is None else {"clock": self.clock}

    async def pass_(self, seconds: float) -> None:
        """Let ``seconds`` pass for the store."""
        if self.clock is not None:
            self.clock.advance(seconds)
            await asyncio.sleep(0)
        else:
            await asyncio.sleep(seconds)


class OutboxStoreHooks(TransactionHooks):
    """The hooks the outbox suites call (see the module docstring), and their helpers."""

    lease_seconds: ClassVar[float] = 0.4

    # -- hooks -----------------------------------------------------------------------------

    def make_store(self, *, clock: Clock = SYSTEM_CLOCK) -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    @asynccontextmanager
    async def open_again(self, store: Any) -> AsyncIterator[Any]:
        yield store

    async def add(self, store: Any, tx: Any, rows: Sequence[OutboxRow]) -> None:
        raise NotImplementedError

    def make_store_without_schema(self) -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    def failing_claims(self, store: Any) -> AbstractAsyncContextManager[None]:
        raise NotImplementedError

    async def write_raw_row(self, store: Any, columns: Mapping[str, object]) -> int | None:
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------

    @asynccontextmanager
    async def timed_store(self) -> AsyncIterator[tuple[Any, StoreTime]]:
        """A store on a fake clock (starting now) and the time it reads."""
        clock = FakeClock(datetime.now(UTC))
        async with self.make_store(clock=clock) as store:
            yield store, StoreTime(clock if store.features.reads_clock else None)

    async def add_committed(self, store: Any, rows: Sequence[OutboxRow]) -> None:
        tx = await self.begin(store)
        try:
            await self.add(store, tx, rows)
        except BaseException:
            await self.rollback(tx)
            raise
        await self.commit(tx)

    async def commit_out_of_order(self, store: Any) -> tuple[OutboxRow, OutboxRow, Any]:
        """The long-transaction hazard: ``first`` is added, then ``second`` is added and
        committed while ``first``'s transaction (returned, to commit later) is still open.
        Skips the test on a backend that serialises writers."""
        if not store.features.concurrent_writers:
            pytest.skip("this backend serialises writers: a later transaction cannot commit")
        first, second = make_row(n=1), make_row(n=2)
        t1 = await self.begin(store)
        await self.add(store, t1, [first])
        t2 = await self.begin(store)
        await self.add(store, t2, [second])
        await self.commit(t2)
        return first, second, t1

    @staticmethod
    def relay_id() -> str:
        return f"relay-{uuid.uuid4().hex[:8]}"

    async def write_malformed_rows(
        self, store: Any, key_of: Callable[[int], str | None]
    ) -> list[tuple[int, str, str | None]]:
        """Write every row of :data:`MALFORMED_ROWS` the store can hold (row ``i`` under
        key ``key_of(i)``); return (seq, the column that is wrong, key) of each. Skips the
        test when the store holds none (no ``write_raw_row``)."""
        written: list[tuple[int, str, str | None]] = []
        for i, (column, columns) in enumerate(MALFORMED_ROWS):
            good = make_row(key=key_of(i), n=i)
            try:
                seq = await self.write_raw_row(store, {**raw_columns(good), **columns})
            except NotImplementedError:
                pytest.skip("this store holds no row its write side did not make")
            if seq is not None:
                written.append((seq, column, key_of(i)))
        assert written, "the store refused every malformed row"
        return written


def raw_columns(row: OutboxRow) -> dict[str, object]:
    """``row`` as the columns ``write_raw_row`` takes (headers as JSON text)."""
    return {
        "message_id": row.message_id,
        "topic": row.topic,
        "type": row.type,
        "payload": row.payload,
        "partition_key": row.partition_key,
        "headers": json.dumps(dict(row.headers)) if row.headers else None,
    }


def _hook(cm_factory: Any, *args: Any) -> Any:
    """The fault-injection hook's context manager, or skip the test when the backend has
    none."""
    try:
        return cm_factory(*args)
    except NotImplementedError:
        pytest.skip("no fault injection for this store")


class NoTransactionHook:
    """The hook the write-side suites share for the caller's-transaction rule
    (:mod:`msdata.storage`): a write on a connection with no open transaction is refused."""

    def connections_without_transaction(
        self, store: Any
    ) -> AbstractAsyncContextManager[Sequence[tuple[str, Any, bool]]]:
        """Yield ``(form, connection, is_async)`` for every driver form of caller connection
        the store's write side accepts, each connected to the store's database in autocommit
        mode with no open transaction (as a user who forgot to open one would hold it), and
        close them afterwards. Nothing (the default) skips the case: a store whose
        connections are always transactions (memory)."""
        return _no_connections()


@asynccontextmanager
async def _no_connections() -> Any:
    yield ()


async def each_refused(
    hook: NoTransactionHook,
    store: Any,
    write: Callable[[Any, bool], Awaitable[Any]],
) -> None:
    """Try ``write(conn, is_async)`` on every connection of the hook; each must raise
    :class:`ConfigurationError` about the transaction."""
    async with hook.connections_without_transaction(store) as forms:
        if not forms:
            pytest.skip("this store has no caller connection without a transaction")
        accepted: list[str] = []
        for form, conn, is_async in forms:
            try:
                await write(conn, is_async)
            except ConfigurationError as e:
                assert "transaction" in str(e), f"{form}: {e}"
            else:
                accepted.append(form)
        assert not accepted, f"written with no open transaction on: {accepted}"


class OutboxStoreConformance(OutboxStoreHooks, NoTransactionHook, StoreUrlCases):
    """Every test here must pass on every outbox store."""

    port = "outbox"

    async def test_a_connection_with_no_open_transaction_is_refused(self) -> None:
        async with self.make_store() as store:
            rows = make_rows(1)

            async def write(conn: Any, is_async: bool) -> None:
                if is_async:
                    await store.append_async(conn, rows)
                else:
                    store.append(conn, rows)

            await each_refused(self, store, write)
            assert (await store.status()).pending == 0, "a refused row was committed"

    async def test_the_store_satisfies_the_port(self) -> None:
        async with self.make_store() as store:
            assert isinstance(store, OutboxStore)
            assert isinstance(store.features, OutboxStoreFeatures)
            assert isinstance(store.schema_sql(), str)

    async def test_create_schema_is_idempotent(self) -> None:
        async with self.make_store() as store:
            await store.create_schema()
            await store.create_schema()
            assert (await store.status()).pending == 0

    async def test_committed_rows_are_claimed_in_order_with_their_fields(self) -> None:
        async with self.make_store() as store:
            rows = make_rows(5, keys=["k1", None])
            await self.add_committed(store, rows)
            got = await store.claim(self.relay_id(), 100, 30.0)
            assert [r.message_id for r in got] == [r.message_id for r in rows]
            seqs = [r.seq for r in got]
            assert seqs == sorted(seqs) and len(set(seqs)) == 5
            for want, r in zip(rows, got, strict=True):
                assert r.topic == want.topic and r.type == want.type
                assert bytes(r.payload) == want.payload
                assert r.partition_key == want.partition_key
                assert dict(r.headers) == dict(want.headers)
                assert r.attempts == 0 and r.last_error is None
                assert r.created_at.tzinfo is not None
                age = (datetime.now(UTC) - r.created_at).total_seconds()
                assert -5 < age < 60

    async def test_rolled_back_transaction_leaves_nothing(self) -> None:
        async with self.make_store() as store:
            tx = await self.begin(store)
            await self.add(store, tx, make_rows(3, keys=["k"]))
            await self.rollback(tx)
            assert await store.claim(self.relay_id(), 100, 30.0) == []
            assert (await store.status()).pending == 0

    async def test_uncommitted_rows_are_not_visible_until_commit(self) -> None:
        async with self.make_store() as store:
            tx = await self.begin(store)
            rows = make_rows(2)
            await self.add(store, tx, rows)
            relay_id = self.relay_id()
            try:
                assert await store.claim(relay_id, 100, 30.0) == []
            finally:
                await self.commit(tx)
            got = await store.claim(relay_id, 100, 30.0)
            assert sorted(r.message_id for r in got) == sorted(r.message_id for r in rows)

    async def test_claim_respects_limit_and_leases_rows_to_one_relay(self) -> None:
        async with self.make_store() as store:
            await self.add_committed(store, make_rows(10))
            a = await store.claim("relay-a", 4, 30.0)
            if store.features.one_relay_at_a_time or store.features.partitioned:
                # relay-a holds the store (or every partition): relay-b gets nothing
                assert await store.claim("relay-b", 100, 30.0) == []
                await leave(store, "relay-b")
                b = await store.claim("relay-a", 100, 30.0)
                c = await store.claim("relay-a", 100, 30.0)
            else:
                b = await store.claim("relay-b", 100, 30.0)
                c = await store.claim("relay-c", 100, 30.0)
            assert len(a) == 4 and len(b) == 6 and c == []
            assert not {r.seq for r in a} & {r.seq for r in b}
            assert max(r.seq for r in a) < min(r.seq for r in b)

    async def test_a_key_is_never_leased_to_two_relays(self) -> None:
        async with self.make_store() as store:
            rows = [make_row(key="k1", n=0), make_row(key="k1", n=1), make_row(key="k2", n=2)]
            await self.add_committed(store, rows)
            a = await store.claim("relay-a", 1, 30.0)
            assert [r.message_id for r in a] == [rows[0].message_id]
            if store.features.one_relay_at_a_time or store.features.partitioned:
                assert await store.claim("relay-b", 100, 30.0) == []
                await leave(store, "relay-b")
                await store.mark_sent("relay-a", [a[0].seq])
                c = await store.claim("relay-a", 100, 30.0)
                assert [r.message_id for r in c] == [rows[1].message_id, rows[2].message_id]
                return
            b = await store.claim("relay-b", 100, 30.0)
            # k1's second row waits for relay-a's lease on the first: only k2 is free
            assert [r.message_id for r in b] == [rows[2].message_id]
            await store.mark_sent("relay-a", [a[0].seq])
            c = await store.claim("relay-c", 100, 30.0)
            assert [r.message_id for r in c] == [rows[1].message_id]

    async def test_a_relay_never_gets_the_rows_it_holds_again(self) -> None:
        async with self.make_store() as store:
            rows = [make_row(key="k1", n=0), make_row(key="k1", n=1), make_row(key="k2", n=2)]
            await self.add_committed(store, rows)
            a = await store.claim("relay-a", 1, 30.0)
            # the same relay may get the later rows of a key it holds (it publishes them
            # after the earlier batch) or not; never a row it holds, and always in seq order
            b = await store.claim("relay-a", 100, 30.0)
            got = [r.message_id for r in b]
            assert rows[0].message_id not in got
            assert got in ([rows[1].message_id, rows[2].message_id], [rows[2].message_id])
            assert [r.seq for r in b] == sorted(r.seq for r in b)
            await store.mark_sent("relay-a", [a[0].seq, *(r.seq for r in b)])
            rest = await store.claim("relay-a", 100, 30.0)
            assert len(got) + len(rest) == 2

    async def test_an_expired_lease_makes_rows_claimable_again(self) -> None:
        async with self.timed_store() as (store, time):
            rows = make_rows(3, keys=["k"])
            await self.add_committed(store, rows)
            a = await store.claim("relay-a", 100, self.lease_seconds)
            assert len(a) == 3
            assert await store.claim("relay-b", 100, 30.0) == []
            if time.fake:  # still leased a moment before the end
                await time.pass_(self.lease_seconds - 0.01)
                assert await store.claim("relay-b", 100, 30.0) == []
            await time.pass_(self.lease_seconds + 0.2)
            b = await store.claim("relay-b", 100, 30.0)
            assert [r.message_id for r in b] == [r.message_id for r in rows]
            # the dead relay's late mark still counts: the messages were published
            await store.mark_sent("relay-a", [r.seq for r in a])
            assert (await store.status()).pending == 0

    async def test_release_makes_rows_claimable_at_once(self) -> None:
        async with self.make_store() as store:
            await self.add_committed(store, make_rows(3, keys=["k"]))
            a = await store.claim("relay-a", 100, 30.0)
            await store.release("relay-a", [r.seq for r in a])
            await leave(store, "relay-a")  # partitioned: relay-a stops, relay-b takes over
            b = await store.claim("relay-b", 100, 30.0)
            assert [r.seq for r in b] == [r.seq for r in a]

    async def test_release_by_a_relay_that_lost_the_lease_changes_nothing(self) -> None:
        async with self.timed_store() as (store, time):
            await self.add_committed(store, make_rows(2, keys=["k"]))
            a = await store.claim("relay-a", 100, self.lease_seconds)
            await time.pass_(self.lease_seconds + 0.2)
            b = await store.claim("relay-b", 100, 30.0)
            assert len(b) == 2
            await store.release("relay-a", [r.seq for r in a])
            assert await store.claim("relay-c", 100, 30.0) == []

    async def test_mark_sent_removes_rows_from_pending(self) -> None:
        async with self.make_store() as store:
            await self.add_committed(store, make_rows(4))
            a = await store.claim("relay-a", 100, 30.0)
            await store.mark_sent("relay-a", [r.seq for r in a[:3]])
            st = await store.status()
            assert st.pending == 1 and st.parked == 0
            await store.release("relay-a", [a[3].seq])
            again = await store.claim("relay-a", 100, 30.0)
            assert [r.seq for r in again] == [a[3].seq]

    async def test_mark_sent_removes_exactly_the_rows_named_and_never_reuses_a_seq(self) -> None:
        async with self.make_store() as store:
            await self.add_committed(store, make_rows(6))
            s = [r.seq for r in await store.claim("relay-a", 100, 30.0)]
            await store.mark_sent("relay-a", [s[1], s[2]])  # a run of seqs
            await store.mark_sent("relay-a", [s[4], s[3]])  # out of order
            await store.release("relay-a", [s[0], s[5]])
            again = await store.claim("relay-a", 100, 30.0)
            assert [r.seq for r in again] == [s[0], s[5]]
            await store.mark_sent("relay-a", [s[5]])  # the newest row
            await store.mark_sent("relay-a", [s[0], s[1]])  # one of them sent already
            assert (await store.status()).pending == 0
            # a run that ends with the newest row, marked along with the next claim
            await self.add_committed(store, make_rows(3))
            t = [r.seq for r in await store.claim("relay-a", 100, 30.0)]
            assert min(t) > s[5]
            assert await store.mark_sent_and_claim("relay-a", t, 100, 30.0) == []
            await self.add_committed(store, make_rows(1))
            (last,) = await store.claim("relay-a", 100, 30.0)
            assert last.seq > max(t)  # never a seq given out before

    async def test_kept_sent_rows_are_purged_after_retention(self) -> None:
        async with self.timed_store() as (store, time):
            await self.add_committed(store, make_rows(3))
            a = await store.claim("relay-a", 100, 30.0)
            await store.mark_sent("relay-a", [r.seq for r in a], keep=True)
            assert (await store.status()).pending == 0
            assert await store.claim("relay-a", 100, 30.0) == []
            # kept, not yet older than the cut-off
            assert await store.purge_sent(time.now() - timedelta(hours=1)) == 0
            if time.fake:  # sent two seconds ago by the store's clock, not one
                await time.pass_(2.0)
                assert await store.purge_sent(time.now() - timedelta(seconds=3)) == 0
                cut = time.now() - timedelta(seconds=1)
            else:
                cut = time.now() + timedelta(seconds=5)
            assert await store.purge_sent(cut) == 3
            assert await store.purge_sent(time.now() + timedelta(seconds=5)) == 0

    # -- mark_sent_and_claim ----------------------------------------------------------------

    async def test_mark_sent_and_claim_marks_then_claims_the_next_rows(self) -> None:
        async with self.make_store() as store:
            both = store.mark_sent_and_claim
            rows = [make_row(key="k1", n=0), make_row(key="k1", n=1), make_row(key="k2", n=2)]
            await self.add_committed(store, rows)
            a = await store.claim("relay-a", 1, 30.0)
            assert [r.message_id for r in a] == [rows[0].message_id]
            # the claim sees the mark: k1's next row is free now, in seq order
            b = await both("relay-a", [a[0].seq], 100, 30.0)
            assert [r.message_id for r in b] == [rows[1].message_id, rows[2].message_id]
            assert [r.payload for r in b] == [rows[1].payload, rows[2].payload]
            assert (await store.status()).pending == 2
            # they are leased to relay-a: nobody else gets them, and relay-a not twice
            assert await store.claim("relay-b", 100, 30.0) == []
            assert await both("relay-a", [], 100, 30.0) == []
            assert await both("relay-a", [r.seq for r in b], 100, 30.0) == []
            assert (await store.status()).pending == 0

    async def test_mark_sent_and_claim_of_part_of_a_batch_keeps_the_rest_held(self) -> None:
        """Marking some rows of a batch (the first and last: rows far apart; then two
        neighbours) deletes those rows only: the rest stay the relay's until marked or
        released, and come back once released."""
        async with self.make_store() as store:
            both = store.mark_sent_and_claim
            rows = make_rows(8, keys=[f"k{i}" for i in range(8)])
            await self.add_committed(store, rows)
            a = [r.seq for r in await store.claim("relay-a", 6, 30.0)]
            assert len(a) == 6
            # far apart, then neighbours: the marked rows go, the others stay held
            b = await both("relay-a", [a[0], a[5]], 100, 30.0)
            assert [r.message_id for r in b] == [r.message_id for r in rows[6:]]
            assert await both("relay-a", [a[1], a[2]], 100, 30.0) == []  # the rest held
            assert (await store.status()).pending == 4
            await store.release("relay-a", [a[3], a[4]])
            c = await both("relay-a", [r.seq for r in b], 100, 30.0)
            assert [r.seq for r in c] == [a[3], a[4]]
            assert await both("relay-a", [a[3], a[4]], 100, 30.0) == []
            assert (await store.status()).pending == 0

    async def test_mark_sent_and_claim_never_returns_a_key_another_relay_holds(self) -> None:
        async with self.make_store() as store:
            both = store.mark_sent_and_claim
            rows = [
                make_row(key="k1", n=0),
                make_row(key="k1", n=1),
                make_row(key="k2", n=2),
                make_row(key="k2", n=3),
            ]
            await self.add_committed(store, rows)
            a = await store.claim("relay-a", 1, 30.0)
            assert [r.message_id for r in a] == [rows[0].message_id]
            if store.features.one_relay_at_a_time or store.features.partitioned:
                # relay-a holds the store (or every partition): relay-b claims nothing, but
                # its mark counts
                assert await both("relay-b", [a[0].seq], 100, 30.0) == []
                assert (await store.status()).pending == 3
                return
            b = await store.claim("relay-b", 1, 30.0)
            assert [r.message_id for r in b] == [rows[2].message_id]
            # k1's second row waits for relay-a's lease on the first: relay-b gets k2 only
            c = await both("relay-b", [b[0].seq], 100, 30.0)
            assert [r.message_id for r in c] == [rows[3].message_id]
            d = await both("relay-a", [a[0].seq], 100, 30.0)
            assert [r.message_id for r in d] == [rows[1].message_id]
            assert (await store.status()).pending == 2

    async def test_mark_sent_and_claim_keeps_sent_rows_when_asked(self) -> None:
        async with self.timed_store() as (store, time):
            both = store.mark_sent_and_claim
            rows = make_rows(3, keys=["k"])
            await self.add_committed(store, rows)
            a = await store.claim("relay-a", 1, 30.0)
            b = await both("relay-a", [a[0].seq], 100, 30.0, keep=True)
            assert [r.message_id for r in b] == [r.message_id for r in rows[1:]]
            assert await both("relay-a", [r.seq for r in b], 100, 30.0, keep=True) == []
            assert (await store.status()).pending == 0
            assert await store.purge_sent(time.now() + timedelta(seconds=5)) == 3

    async def test_mark_sent_and_claim_after_a_lost_lease_still_marks(self) -> None:
        async with self.timed_store() as (store, time):
            both = store.mark_sent_and_claim
            await self.add_committed(store, make_rows(2, keys=["k"]))
            a = await store.claim("relay-a", 1, self.lease_seconds)
            await time.pass_(self.lease_seconds + 0.2)
            b = await store.claim("relay-b", 100, 30.0)
            assert len(b) == 2 and b[0].seq == a[0].seq  # relay-b took the key over
            # relay-a's late call: its mark counts (published either way), and it claims
            # nothing of the key relay-b holds
            assert await both("relay-a", [a[0].seq], 100, 30.0) == []
            assert (await store.status()).pending == 1

    # -- claim_messages (optional: the relay's fast path) --------------------------------------

    @staticmethod
    def _claim_messages(store: Any) -> Any:
        fast = getattr(store, "claim_messages", None)
        if fast is None:
            pytest.skip("this store has no claim_messages (optional)")
        return fast

    @staticmethod
    def _records_of(claimed: Any) -> list[OutboxRecord]:
        """The records of what ``claim_messages`` returned, checking a batch against them:
        its seqs, topic and messages are those of the records, in the same order."""
        if isinstance(claimed, OutboxBatch):
            records = claimed.records()
            assert claimed.records() is records  # built once
            assert len(claimed) == len(records) > 0
            assert claimed.seqs == [r.seq for r in records]
            assert all(r.topic == claimed.topic for r in records)
            assert claimed.messages == [
                TransportMessage(r.message_id, r.payload, r.partition_key, r.headers)
                for r in records
            ]
            assert all(type(m.body) is bytes for m in claimed.messages)
            return records
        assert type(claimed) is list
        return claimed

    async def test_claim_messages_gives_one_topic_as_a_batch_of_messages(self) -> None:
        """One topic (with and without keys and headers): a batch whose messages are what
        the records carry, and whose records are those ``claim`` would have returned."""
        async with self.make_store() as store:
            fast = self._claim_messages(store)
            rows = make_rows(4, keys=["k1", None])
            rows.append(make_row(key="k2", n=4)._replace(headers={}))
            await self.add_committed(store, rows)
            got = await fast("relay-a", [], 100, 30.0)
            assert isinstance(got, OutboxBatch), got
            assert got.topic == "orders"
            records = self._records_of(got)
            assert [r.message_id for r in records] == [r.message_id for r in rows]
            for want, r in zip(rows, records, strict=True):
                assert r.type == want.type and r.payload == want.payload
                assert dict(r.headers) == dict(want.headers)
                assert r.attempts == 0 and r.last_error is None
                assert r.created_at.tzinfo is not None
            # leased as by claim: nobody else gets them, relay-a not twice
            assert await store.claim("relay-b", 100, 30.0) == []
            assert await fast("relay-a", [], 100, 30.0) == []
            assert (await store.status()).pending == 5

    async def test_claim_messages_marks_the_sent_rows_then_claims(self) -> None:
        async with self.timed_store() as (store, time):
            fast = self._claim_messages(store)
            rows = make_rows(5, keys=["k"])
            await self.add_committed(store, rows)
            a = self._records_of(await fast("relay-a", [], 2, 30.0))
            assert [r.message_id for r in a] == [r.message_id for r in rows[:2]]
            # the claim sees the mark: the key's next rows, in order
            b = self._records_of(await fast("relay-a", [r.seq for r in a], 2, 30.0))
            assert [r.message_id for r in b] == [r.message_id for r in rows[2:4]]
            assert (await store.status()).pending == 3
            c = self._records_of(await fast("relay-a", [r.seq for r in b], 100, 30.0, keep=True))
            assert [r.message_id for r in c] == [rows[4].message_id]
            assert await fast("relay-a", [c[0].seq], 100, 30.0, keep=True) == []
            assert (await store.status()).pending == 0
            # the last two marks kept their rows as sent (keep=True), the first did not
            assert await store.purge_sent(time.now() + timedelta(seconds=5)) == 3

    async def test_claim_messages_gives_a_retried_row_with_its_attempts(self) -> None:
        """A row back from ``retry_later``: its records carry the attempt and the error
        (the relay counts on them when the publish fails again)."""
        async with self.timed_store() as (store, time):
            fast = self._claim_messages(store)
            rows = [make_row(key="k1", n=0), make_row(key="k1", n=1)]
            await self.add_committed(store, rows)
            a = self._records_of(await fast("relay-a", [], 1, 30.0))
            retry_at = time.now() + timedelta(seconds=self.lease_seconds)
            await store.retry_later("relay-a", [a[0].seq], "broker down", retry_at)
            assert await fast("relay-a", [], 100, 30.0) == []  # the key waits
            await time.pass_(self.lease_seconds + 0.2)
            got = await fast("relay-a", [], 100, 30.0)
            b = self._records_of(got)
            assert [r.message_id for r in b] == [r.message_id for r in rows]
            assert (b[0].attempts, b[0].last_error) == (1, "broker down")
            assert (b[1].attempts, b[1].last_error) == (0, None)

    async def test_claim_messages_of_several_topics_gives_the_records(self) -> None:
        async with self.make_store() as store:
            fast = self._claim_messages(store)
            rows = [
                make_row(key="k1", n=0),
                make_row(key="k1", n=1, topic="invoices"),
                make_row(key=None, n=2),
            ]
            await self.add_committed(store, rows)
            got = await fast("relay-a", [], 100, 30.0)
            assert type(got) is list, got
            assert [r.message_id for r in got] == [r.message_id for r in rows]
            assert [r.topic for r in got] == ["orders", "invoices", "orders"]

    async def test_claim_messages_parks_unreadable_rows_as_claim_does(self) -> None:
        """The malformed rows of the claim suite, claimed by ``claim_messages``: each is
        parked with a reason naming its column, the rows behind it in its key wait, and
        every other row comes back (as a batch or as records) in order."""
        async with self.make_store() as store:
            fast = self._claim_messages(store)
            bad = await self.write_malformed_rows(store, lambda i: f"bad-{i}")
            behind = [make_row(key=key, n=100 + i) for i, (_, _, key) in enumerate(bad)]
            others = make_rows(6, keys=["good-a", "good-b", None])
            await self.add_committed(store, behind + others)
            claimed: list[OutboxRecord] = []
            sent: list[int] = []
            for _ in range(len(bad) + len(others) + 2):  # small batches: several claims
                got = self._records_of(await fast("relay-a", sent, 3, 30.0))
                if not got and not sent:
                    break
                claimed += got
                sent = [r.seq for r in got]
            assert [r.message_id for r in claimed] == [r.message_id for r in others]
            parked = await store.parked(1000)
            assert [p.seq for p in parked] == [seq for seq, _, _ in bad]
            for p, (_, column, _) in zip(parked, bad, strict=True):
                assert isinstance(p.last_error, str) and "unreadable" in p.last_error, p
                assert column in p.last_error, (column, p.last_error)
            st = await store.status()
            assert (st.parked, st.pending) == (len(bad), len(behind))

    async def test_retry_later_counts_an_attempt_and_blocks_the_key_until_then(self) -> None:
        async with self.timed_store() as (store, time):
            rows = [make_row(key="k1", n=0), make_row(key="k1", n=1), make_row(key="k2", n=2)]
            await self.add_committed(store, rows)
            a = await store.claim("relay-a", 1, 30.0)
            retry_at = time.now() + timedelta(seconds=self.lease_seconds)
            await store.retry_later("relay-a", [a[0].seq], "broker down", retry_at)
            b = await store.claim("relay-a", 100, 30.0)
            assert [r.message_id for r in b] == [rows[2].message_id]
            await store.mark_sent("relay-a", [b[0].seq])
            if time.fake:  # still waiting a moment before retry_at
                await time.pass_(self.lease_seconds - 0.01)
                assert await store.claim("relay-a", 100, 30.0) == []
            await time.pass_(self.lease_seconds + 0.2)
            c = await store.claim("relay-a", 100, 30.0)
            assert [r.message_id for r in c] == [rows[0].message_id, rows[1].message_id]
            assert c[0].attempts == 1 and c[0].last_error == "broker down"
            assert c[1].attempts == 0

    async def test_parked_row_blocks_only_its_own_key_and_can_be_requeued(self) -> None:
        async with self.make_store() as store:
            rows = [make_row(key="k1", n=0), make_row(key="k1", n=1), make_row(key="k2", n=2)]
            await self.add_committed(store, rows)
            a = await store.claim("relay-a", 1, 30.0)
            await store.park("relay-a", [a[0].seq], "poison")
            b = await store.claim("relay-a", 100, 30.0)
            assert [r.message_id for r in b] == [rows[2].message_id]
            await store.mark_sent("relay-a", [b[0].seq])
            assert await store.claim("relay-a", 100, 30.0) == []
            parked = await store.parked()
            assert [(p.message_id, p.last_error) for p in parked] == [
                (rows[0].message_id, "poison")
            ]
            st = await store.status()
            assert st.parked == 1 and st.pending == 1
            assert await store.requeue([a[0].seq]) == 1
            assert await store.requeue([a[0].seq]) == 0
            assert await store.parked() == []
            c = await store.claim("relay-a", 100, 30.0)
            assert [r.message_id for r in c] == [rows[0].message_id, rows[1].message_id]
            # attempts start again; the last error stays until the row is sent
            assert (c[0].attempts, c[0].last_error) == (0, "poison")
            assert (c[1].attempts, c[1].last_error) == (0, None)

    async def test_status_reports_pending_and_the_age_of_the_oldest(self) -> None:
        async with self.timed_store() as (store, time):
            st = await store.status()
            assert (st.pending, st.oldest_pending_age, st.parked) == (0, None, 0)
            await self.add_committed(store, make_rows(3))
            await time.pass_(0.3)
            st = await store.status()
            assert st.pending == 3 and st.parked == 0
            assert st.oldest_pending_age is not None and 0.2 <= st.oldest_pending_age < 60
            if time.fake:
                assert st.oldest_pending_age == pytest.approx(0.3, abs=1e-3)

    async def test_rows_without_a_key_are_claimed_freely(self) -> None:
        async with self.make_store() as store:
            await self.add_committed(store, make_rows(4))
            a = await store.claim("relay-a", 2, 30.0)
            f = store.features
            other = "relay-a" if f.one_relay_at_a_time or f.partitioned else "relay-b"
            b = await store.claim(other, 2, 30.0)
            assert len(a) == 2 and len(b) == 2
            assert not {r.seq for r in a} & {r.seq for r in b}

    async def test_out_of_order_commits_are_all_claimed(self) -> None:
        async with self.make_store() as store:
            first, second, t1 = await self.commit_out_of_order(store)
            got = await store.claim("relay-a", 100, 30.0)
            assert [r.message_id for r in got] == [second.message_id]
            await store.mark_sent("relay-a", [r.seq for r in got])
            await self.commit(t1)
            got = await store.claim("relay-a", 100, 30.0)
            assert [r.message_id for r in got] == [first.message_id]

    async def test_a_late_commit_comes_before_later_rows_of_its_key_while_a_relay_claims_on(
        self,
    ) -> None:
        """A row whose transaction commits after a relay has claimed past its seq (a batch
        in flight, the next claimed ahead) is claimed at the next claim after its commit,
        before a row of its key committed after it: no claim may start past a seq that a
        transaction still open may hold."""
        async with self.make_store() as store:
            if not store.features.concurrent_writers:
                pytest.skip("this backend serialises writers: a later transaction cannot commit")
            late = make_row(key="k-late", n=0)
            t1 = await self.begin(store)
            await self.add(store, t1, [late])
            await self.add_committed(store, make_rows(4, keys=["k0", "k1", "k2", "k3"]))
            rid = self.relay_id()
            a = await store.claim(rid, 1, 30.0)
            b = await store.claim(rid, 1, 30.0)  # claimed ahead while ``a`` is published
            await self.commit(t1)
            after = make_row(key="k-late", n=9)
            await self.add_committed(store, [after])
            await store.mark_sent(rid, [r.seq for r in a])
            got = [r.message_id for r in await store.claim(rid, 100, 30.0)]
            assert late.message_id in got and after.message_id in got
            assert got.index(late.message_id) < got.index(after.message_id)
            await store.mark_sent(rid, [r.seq for r in b])

    async def test_rows_handed_back_below_later_claims_are_claimed_again_in_order(self) -> None:
        """A relay claims on (batches ahead, some marked), then hands back, backs off and
        parks rows of its earliest batch: each comes again (at once, after its time, after
        a requeue), ahead of the later rows, as if nothing had been claimed past it."""
        async with self.timed_store() as (store, time):
            rows = make_rows(8, keys=[f"k{i}" for i in range(8)])
            await self.add_committed(store, rows)
            rid = self.relay_id()
            a = await store.claim(rid, 3, 30.0)
            b = await store.claim(rid, 2, 30.0)
            c = await store.claim(rid, 1, 30.0)
            assert [r.message_id for r in a + b + c] == [r.message_id for r in rows[:6]]
            await store.mark_sent(rid, [r.seq for r in b])
            retry_at = time.now() + timedelta(seconds=self.lease_seconds)
            await store.retry_later(rid, [a[1].seq], "broker down", retry_at)
            await store.park(rid, [a[2].seq], "poison")
            await store.release(rid, [a[0].seq])
            d = await store.claim(rid, 100, 30.0)
            assert [r.message_id for r in d] == [rows[i].message_id for i in (0, 6, 7)]
            await store.mark_sent(rid, [r.seq for r in c + d])
            await time.pass_(self.lease_seconds + 0.2)
            e = await store.claim(rid, 100, 30.0)
            assert [r.message_id for r in e] == [rows[1].message_id]
            await store.mark_sent(rid, [e[0].seq])
            assert await store.requeue([a[2].seq]) == 1
            f = await store.claim(rid, 100, 30.0)
            assert [r.message_id for r in f] == [rows[2].message_id]

    async def test_a_relays_own_lapsed_batch_comes_again_below_its_later_claims(self) -> None:
        """A batch whose lease ran out while its relay claimed and marked later batches is
        claimable again, by that relay too, before rows added after it (a store that
        leases itself to one relay at a time has no lease per batch)."""
        async with self.timed_store() as (store, time):
            if store.features.one_relay_at_a_time:
                pytest.skip("the relay's lease covers the whole store, renewed by each claim")
            rows = make_rows(5, keys=[f"k{i}" for i in range(5)])
            await self.add_committed(store, rows)
            rid = self.relay_id()
            a = await store.claim(rid, 1, self.lease_seconds)
            b = await store.claim(rid, 1, 30.0)
            c = await store.claim(rid, 1, 30.0)
            await store.mark_sent(rid, [r.seq for r in b + c])
            await time.pass_(self.lease_seconds + 0.2)
            d = await store.claim(rid, 100, 30.0)
            assert [r.message_id for r in d] == [rows[i].message_id for i in (0, 3, 4)]
            assert a[0].seq == d[0].seq

    # -- what every store refuses or survives ----------------------------------------------

    async def test_a_connection_of_another_kind_is_refused(self) -> None:
        async with self.make_store() as store:
            with pytest.raises(ConfigurationError):
                store.append(object(), make_rows(1))
            with pytest.raises(ConfigurationError):
                await store.append_async(object(), make_rows(1))
            assert (await store.status()).pending == 0

    async def test_missing_tables_raise_schema_error(self) -> None:
        async with _hook(self.make_store_without_schema) as store:
            with pytest.raises(SchemaError, match="create_schema") as caught:
                await store.claim("relay-a", 10, 30.0)
            assert "type cast" not in str(caught.value)  # not the server's misleading hint
            with pytest.raises(SchemaError):
                await store.status()
            tx = await self.begin(store)
            try:
                with pytest.raises(SchemaError):
                    await self.add(store, tx, make_rows(1))
            finally:
                await self.rollback(tx)

    async def test_a_claim_parks_each_unreadable_row_alone_and_returns_the_rest(self) -> None:
        """Rows another writer left with a column the store cannot read (wrong type, size or
        encoding): no claim fails; each such row is parked with a reason naming its
        column; rows behind it in its key wait; every other row is claimed."""
        async with self.make_store() as store:
            bad = await self.write_malformed_rows(store, lambda i: f"bad-{i}")
            behind = [make_row(key=key, n=100 + i) for i, (_, _, key) in enumerate(bad)]
            others = make_rows(6, keys=["good-a", "good-b", None])
            await self.add_committed(store, behind + others)
            claimed: list[Any] = []
            for _ in range(len(bad) + len(others) + 2):  # small batches: several claims
                got = await store.claim("relay-a", 3, 30.0)
                if not got:
                    break
                claimed += got
                await store.mark_sent("relay-a", [r.seq for r in got])
            assert [r.message_id for r in claimed] == [r.message_id for r in others]
            parked = await store.parked(1000)
            assert [p.seq for p in parked] == [seq for seq, _, _ in bad]
            for p, (_, column, _) in zip(parked, bad, strict=True):
                assert isinstance(p.last_error, str) and "unreadable" in p.last_error, p
                assert column in p.last_error, (column, p.last_error)
                assert isinstance(p.created_at, datetime) and isinstance(p.payload, bytes)
                assert isinstance(p.message_id, str) and isinstance(p.topic, str)
            st = await store.status()
            assert (st.parked, st.pending) == (len(bad), len(behind))
            # requeued as they are, they are parked again at the next claim
            assert await store.requeue([seq for seq, _, _ in bad]) == len(bad)
            assert await store.claim("relay-a", 100, 30.0) == []
            assert (await store.status()).parked == len(bad)

    async def test_mark_sent_and_claim_failing_inside_rolls_back_the_mark(self) -> None:
        async with self.make_store() as store:
            await self.add_committed(store, make_rows(3, keys=["k"]))
            a = await store.claim("relay-a", 1, 30.0)
            async with _hook(self.failing_claims, store):
                with pytest.raises(StoreError):
                    await store.mark_sent_and_claim("relay-a", [a[0].seq], 100, 30.0)
            assert (await store.status()).pending == 3  # the mark was rolled back with it
            # and the relay holds what it held before the failed call
            b = await store.mark_sent_and_claim("relay-a", [a[0].seq], 100, 30.0)
            assert len(b) == 2 and a[0].seq not in {r.seq for r in b}
            assert [r.seq for r in b] == sorted(r.seq for r in b) and b[0].seq > a[0].seq
            assert (await store.status()).pending == 2
