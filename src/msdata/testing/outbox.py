"""Conformance suites for the outbox and inbox store ports, run on every backend.

Subclass once per backend and fill in the hooks; the same tests then run on memory, SQLite,
PostgreSQL, or your own adapter::

    class TestMyOutboxStore(OutboxStoreConformance):
        @asynccontextmanager
        async def make_store(self) -> AsyncIterator[OutboxStore]:
            store = MyOutboxStore(..., table_prefix=f"t{uuid.uuid4().hex[:8]}_")
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

Hooks (names are stable):

``OutboxStoreConformance``
    ``make_store()``
        async context manager yielding a fresh, empty outbox store with its schema created
        (its own tables, e.g. a unique table prefix); closes it and drops them on exit.
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
    ``features``
        an :class:`OutboxStoreFeatures`: what the backend can show (e.g. whether two
        writers can be open at once, which the out-of-order commit hazard needs).
    ``lease_seconds``
        the short lease used by the expiry tests (default 0.4 s).

``InboxStoreConformance``
    ``make_inbox_store()``
        async context manager yielding a fresh, empty inbox store with its schema created.
    ``begin(store)``, ``commit(tx)``, ``rollback(tx)``
        as above (one backend class can inherit both suites and share them).
    ``record(store, tx, consumer, message_id)``
        ``store.record``/``record_async`` on ``tx``'s connection; returns its result. It may
        block until a concurrent transaction ends (run a sync driver in a thread so the
        event loop goes on), or raise.

The relay-level tests run :class:`msdata.outbox.OutboxRelay` over the store with a
:class:`RecordingPublisher` (the in-memory transport, recording what was published).
Needs pytest and pytest-asyncio (``asyncio_mode = "auto"``).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest

from msdata.adapters.memory.transport import MemoryTransport
from msdata.errors import ConfigurationError, MsdataError, PublishError
from msdata.outbox.relay import OutboxRelay
from msdata.outbox.store import InboxStore, OutboxRow, OutboxStore
from msdata.transport import TransportMessage

__all__ = [
    "InboxStoreConformance",
    "OutboxStoreConformance",
    "OutboxStoreFeatures",
    "RecordingPublisher",
    "make_row",
    "make_rows",
    "wait_until",
]


@dataclass(frozen=True)
class OutboxStoreFeatures:
    #: two write transactions can be open at once, and the later can commit first
    #: (PostgreSQL, memory); SQLite serialises writers, so the hazard cannot arise there
    concurrent_writers: bool = True
    #: one relay at a time holds the store's lease and claims; the others get nothing
    #: until it releases everything or its lease runs out (SQLite). False: relays share
    #: the work, each claiming rows of keys no other relay holds (PostgreSQL, memory)
    one_relay_at_a_time: bool = False


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


async def wait_until(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01
) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return predicate()
        await asyncio.sleep(interval)
    return True


class RecordingPublisher(MemoryTransport):
    """The in-memory transport, recording every accepted message in publish order.

    ``fail_next``: how many coming ``publish`` calls raise :class:`PublishError`.
    ``gate``: when set to an unset :class:`asyncio.Event`, ``publish`` waits for it
    (``entered`` is set when a publish is waiting), to hold a relay mid-batch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.published: list[tuple[str, TransportMessage]] = []
        self.calls = 0
        self.fail_next = 0
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def publish(self, topic: str, messages: Sequence[TransportMessage]) -> None:
        self.calls += 1
        await asyncio.sleep(0.001)  # a broker round trip: other tasks run meanwhile
        if self.gate is not None:
            self.entered.set()
            await self.gate.wait()
        if self.fail_next > 0:
            self.fail_next -= 1
            raise PublishError(f"injected failure publishing {len(messages)} to {topic}")
        await super().publish(topic, messages)
        self.published.extend((topic, m) for m in messages)

    @property
    def ids(self) -> list[str]:
        return [m.id for _, m in self.published]


def _first_order(published: Sequence[tuple[str, TransportMessage]]) -> dict[str | None, list[str]]:
    """Per key, message ids in order of first publication."""
    seen: set[str] = set()
    out: dict[str | None, list[str]] = {}
    for _, m in published:
        if m.id not in seen:
            seen.add(m.id)
            out.setdefault(m.key, []).append(m.id)
    return out


class NoTransactionHook:
    """The hook both suites share for the caller's-transaction rule (:mod:`msdata.storage`):
    a write on a connection with no open transaction is refused."""

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


async def _each_refused(
    hook: NoTransactionHook,
    store: Any,
    write: Callable[[Any, bool], Awaitable[Any]],
) -> None:
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


class OutboxStoreConformance(NoTransactionHook):
    """Every test here must pass on every outbox store."""

    features: ClassVar[OutboxStoreFeatures] = OutboxStoreFeatures()
    lease_seconds: ClassVar[float] = 0.4

    # -- hooks -----------------------------------------------------------------------------

    def make_store(self) -> AbstractAsyncContextManager[OutboxStore]:
        raise NotImplementedError

    @asynccontextmanager
    async def open_again(self, store: Any) -> Any:
        yield store

    async def begin(self, store: Any) -> Any:
        raise NotImplementedError

    async def add(self, store: Any, tx: Any, rows: Sequence[OutboxRow]) -> None:
        raise NotImplementedError

    async def commit(self, tx: Any) -> None:
        raise NotImplementedError

    async def rollback(self, tx: Any) -> None:
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------------------

    async def add_committed(self, store: Any, rows: Sequence[OutboxRow]) -> None:
        tx = await self.begin(store)
        try:
            await self.add(store, tx, rows)
        except BaseException:
            await self.rollback(tx)
            raise
        await self.commit(tx)

    @staticmethod
    def relay_id() -> str:
        return f"relay-{uuid.uuid4().hex[:8]}"

    def relay(self, store: Any, publisher: Any, **options: Any) -> OutboxRelay:
        options.setdefault("relay_id", self.relay_id())
        options.setdefault("poll_interval", 0.05)
        options.setdefault("lease_seconds", 30.0)
        return OutboxRelay(store, publisher, **options)

    async def drain(self, relay: OutboxRelay, rounds: int = 100) -> int:
        total = 0
        for _ in range(rounds):
            n = await relay.run_once()
            if n == 0:
                break
            total += n
        return total

    # -- write side and claim ------------------------------------------------------------------

    async def test_a_connection_with_no_open_transaction_is_refused(self) -> None:
        async with self.make_store() as store:
            rows = make_rows(1)

            async def write(conn: Any, is_async: bool) -> None:
                if is_async:
                    await store.append_async(conn, rows)
                else:
                    store.append(conn, rows)

            await _each_refused(self, store, write)
            assert (await store.status()).pending == 0, "a refused row was committed"

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
            try:
                assert await store.claim(self.relay_id(), 100, 30.0) == []
            finally:
                await self.commit(tx)
            got = await store.claim(self.relay_id(), 100, 30.0)
            assert sorted(r.message_id for r in got) == sorted(r.message_id for r in rows)

    async def test_claim_respects_limit_and_leases_rows_to_one_relay(self) -> None:
        async with self.make_store() as store:
            await self.add_committed(store, make_rows(10))
            a = await store.claim("relay-a", 4, 30.0)
            if self.features.one_relay_at_a_time:
                assert await store.claim("relay-b", 100, 30.0) == []
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
            if self.features.one_relay_at_a_time:
                assert await store.claim("relay-b", 100, 30.0) == []
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
        async with self.make_store() as store:
            rows = make_rows(3, keys=["k"])
            await self.add_committed(store, rows)
            a = await store.claim("relay-a", 100, self.lease_seconds)
            assert len(a) == 3
            assert await store.claim("relay-b", 100, 30.0) == []
            await asyncio.sleep(self.lease_seconds + 0.2)
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
            b = await store.claim("relay-b", 100, 30.0)
            assert [r.seq for r in b] == [r.seq for r in a]

    async def test_release_by_a_relay_that_lost_the_lease_changes_nothing(self) -> None:
        async with self.make_store() as store:
            await self.add_committed(store, make_rows(2, keys=["k"]))
            a = await store.claim("relay-a", 100, self.lease_seconds)
            await asyncio.sleep(self.lease_seconds + 0.2)
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

    async def test_kept_sent_rows_are_purged_after_retention(self) -> None:
        async with self.make_store() as store:
            await self.add_committed(store, make_rows(3))
            a = await store.claim("relay-a", 100, 30.0)
            await store.mark_sent("relay-a", [r.seq for r in a], keep=True)
            assert (await store.status()).pending == 0
            assert await store.claim("relay-a", 100, 30.0) == []
            # kept, not yet older than the cut-off
            assert await store.purge_sent(datetime.now(UTC) - timedelta(hours=1)) == 0
            assert await store.purge_sent(datetime.now(UTC) + timedelta(seconds=5)) == 3
            assert await store.purge_sent(datetime.now(UTC) + timedelta(seconds=5)) == 0

    # -- mark_sent_and_claim: optional; the relay falls back to mark_sent + claim ----------

    @staticmethod
    def both(store: Any) -> Any:
        """The store's ``mark_sent_and_claim``, or skip the test (the method is optional)."""
        both = getattr(store, "mark_sent_and_claim", None)
        if not callable(both):
            pytest.skip("the store has no mark_sent_and_claim (optional)")
        return both

    async def test_mark_sent_and_claim_marks_then_claims_the_next_rows(self) -> None:
        async with self.make_store() as store:
            both = self.both(store)
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

    async def test_mark_sent_and_claim_never_returns_a_key_another_relay_holds(self) -> None:
        async with self.make_store() as store:
            both = self.both(store)
            rows = [
                make_row(key="k1", n=0),
                make_row(key="k1", n=1),
                make_row(key="k2", n=2),
                make_row(key="k2", n=3),
            ]
            await self.add_committed(store, rows)
            a = await store.claim("relay-a", 1, 30.0)
            assert [r.message_id for r in a] == [rows[0].message_id]
            if self.features.one_relay_at_a_time:
                # relay-a holds the store: relay-b claims nothing, but its mark counts
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
        async with self.make_store() as store:
            both = self.both(store)
            rows = make_rows(3, keys=["k"])
            await self.add_committed(store, rows)
            a = await store.claim("relay-a", 1, 30.0)
            b = await both("relay-a", [a[0].seq], 100, 30.0, keep=True)
            assert [r.message_id for r in b] == [r.message_id for r in rows[1:]]
            assert await both("relay-a", [r.seq for r in b], 100, 30.0, keep=True) == []
            assert (await store.status()).pending == 0
            assert await store.purge_sent(datetime.now(UTC) + timedelta(seconds=5)) == 3

    async def test_mark_sent_and_claim_after_a_lost_lease_still_marks(self) -> None:
        async with self.make_store() as store:
            both = self.both(store)
            await self.add_committed(store, make_rows(2, keys=["k"]))
            a = await store.claim("relay-a", 1, self.lease_seconds)
            await asyncio.sleep(self.lease_seconds + 0.2)
            b = await store.claim("relay-b", 100, 30.0)
            assert len(b) == 2 and b[0].seq == a[0].seq  # relay-b took the key over
            # relay-a's late call: its mark counts (published either way), and it claims
            # nothing of the key relay-b holds
            assert await both("relay-a", [a[0].seq], 100, 30.0) == []
            assert (await store.status()).pending == 1

    async def test_retry_later_counts_an_attempt_and_blocks_the_key_until_then(self) -> None:
        async with self.make_store() as store:
            rows = [make_row(key="k1", n=0), make_row(key="k1", n=1), make_row(key="k2", n=2)]
            await self.add_committed(store, rows)
            a = await store.claim("relay-a", 1, 30.0)
            retry_at = datetime.now(UTC) + timedelta(seconds=self.lease_seconds)
            await store.retry_later("relay-a", [a[0].seq], "broker down", retry_at)
            b = await store.claim("relay-a", 100, 30.0)
            assert [r.message_id for r in b] == [rows[2].message_id]
            await store.mark_sent("relay-a", [b[0].seq])
            await asyncio.sleep(self.lease_seconds + 0.2)
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
            assert c[0].attempts == 0

    async def test_status_reports_pending_and_the_age_of_the_oldest(self) -> None:
        async with self.make_store() as store:
            st = await store.status()
            assert (st.pending, st.oldest_pending_age, st.parked) == (0, None, 0)
            await self.add_committed(store, make_rows(3))
            await asyncio.sleep(0.3)
            st = await store.status()
            assert st.pending == 3 and st.parked == 0
            assert st.oldest_pending_age is not None and 0.2 <= st.oldest_pending_age < 60

    async def test_rows_without_a_key_are_claimed_freely(self) -> None:
        async with self.make_store() as store:
            await self.add_committed(store, make_rows(4))
            a = await store.claim("relay-a", 2, 30.0)
            other = "relay-a" if self.features.one_relay_at_a_time else "relay-b"
            b = await store.claim(other, 2, 30.0)
            assert len(a) == 2 and len(b) == 2
            assert not {r.seq for r in a} & {r.seq for r in b}

    async def test_out_of_order_commits_are_all_claimed(self) -> None:
        if not self.features.concurrent_writers:
            pytest.skip("this backend serialises writers: a later transaction cannot commit first")
        async with self.make_store() as store:
            first, second = make_row(n=1), make_row(n=2)
            t1 = await self.begin(store)
            await self.add(store, t1, [first])
            t2 = await self.begin(store)
            await self.add(store, t2, [second])
            await self.commit(t2)
            got = await store.claim("relay-a", 100, 30.0)
            assert [r.message_id for r in got] == [second.message_id]
            await store.mark_sent("relay-a", [r.seq for r in got])
            await self.commit(t1)
            got = await store.claim("relay-a", 100, 30.0)
            assert [r.message_id for r in got] == [first.message_id]

    async def test_wait_for_rows_returns_within_its_timeout(self) -> None:
        async with self.make_store() as store:
            started = time.monotonic()
            await store.wait_for_rows(0.2)
            assert time.monotonic() - started < 5.0

    # -- the relay over this store ---------------------------------------------------------------

    async def test_relay_publishes_committed_messages_only(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            kept = make_rows(5, keys=["a", "b"])
            gone = make_rows(5, keys=["a", "b"])
            tx = await self.begin(store)
            await self.add(store, tx, gone)
            await self.rollback(tx)
            await self.add_committed(store, kept)
            relay = self.relay(store, pub)
            assert await self.drain(relay) == 5
            assert sorted(pub.ids) == sorted(r.message_id for r in kept)
            for topic, m in pub.published:
                want = next(r for r in kept if r.message_id == m.id)
                assert (
                    topic == want.topic and m.body == want.payload and m.key == want.partition_key
                )
            assert (await relay.status()).pending == 0

    async def test_relay_publishes_out_of_order_commits(self) -> None:
        if not self.features.concurrent_writers:
            pytest.skip("this backend serialises writers: a later transaction cannot commit first")
        async with self.make_store() as store:
            pub = RecordingPublisher()
            relay = self.relay(store, pub)
            first, second = make_row(n=1), make_row(n=2)
            t1 = await self.begin(store)
            await self.add(store, t1, [first])
            t2 = await self.begin(store)
            await self.add(store, t2, [second])
            await self.commit(t2)
            assert await relay.run_once() == 1
            await self.commit(t1)
            assert await relay.run_once() == 1
            assert pub.ids == [second.message_id, first.message_id]

    async def test_relay_publishes_one_batch_per_topic(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            rows = make_rows(6, keys=["a", "b"], topic="t1") + make_rows(4, topic="t2")
            await self.add_committed(store, rows)
            relay = self.relay(store, pub)
            assert await relay.run_once() == 10
            assert pub.calls == 2

    @pytest.mark.parametrize("relays", [2, 4])
    async def test_several_relays_publish_everything_once_in_key_order(self, relays: int) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            keys = [f"key-{i}" for i in range(7)] + [None]
            committed: list[OutboxRow] = []

            async def writer() -> None:
                for i in range(12):
                    rows = make_rows(20, keys=keys[i % 3 :])
                    tx = await self.begin(store)
                    await self.add(store, tx, rows)
                    if i % 4 == 3:
                        await self.rollback(tx)
                    else:
                        await self.commit(tx)
                        committed.extend(rows)
                    await asyncio.sleep(0.005)

            async with _open_many(self, store, relays) as stores:
                workers = [self.relay(s, pub, batch_size=15, poll_interval=0.02) for s in stores]
                for w in workers:
                    await w.start()
                try:
                    await writer()
                    ok = await wait_until(lambda: len(pub.published) >= len(committed), 30.0)
                    assert ok, f"published {len(pub.published)} of {len(committed)}"
                    await asyncio.sleep(0.1)
                finally:
                    for w in workers:
                        await w.stop()
            ids = pub.ids
            assert len(ids) == len(set(ids)), "a message was published twice"
            assert sorted(ids) == sorted(r.message_id for r in committed)
            order = _first_order(pub.published)
            for key in keys:
                if key is not None:
                    want = [r.message_id for r in committed if r.partition_key == key]
                    assert order.get(key, []) == want, f"order of {key} broken"

    async def test_relay_parks_a_bad_payload_and_goes_on(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            good1 = make_row(key="k1", n=1)
            bad = make_row(key="k1", n=2, payload=b"\x00garbage, not a CloudEvent")
            after_bad = make_row(key="k1", n=3)
            other = make_row(key="k2", n=4)
            await self.add_committed(store, [good1, bad, after_bad, other])
            relay = self.relay(store, pub)
            await self.drain(relay)
            assert pub.ids == [good1.message_id, other.message_id]
            parked = await relay.parked()
            assert [p.message_id for p in parked] == [bad.message_id]
            assert parked[0].last_error and "payload" in parked[0].last_error
            st = await relay.status()
            assert st.parked == 1 and st.pending == 1

    async def test_relay_retries_a_failed_publish_then_parks_it(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            row = make_row(key="k", n=1)
            await self.add_committed(store, [row])
            relay = self.relay(store, pub, max_attempts=3, backoff=lambda n: 0.0)
            pub.fail_next = 1
            assert await relay.run_once() == 0
            assert await relay.run_once() == 1
            assert pub.ids == [row.message_id]

            row2 = make_row(key="k", n=2)
            later = make_row(key="k", n=3)
            other = make_row(key="k-other", n=4)
            await self.add_committed(store, [row2])
            pub.fail_next = 100
            for _ in range(3):
                assert await relay.run_once() == 0
            await self.add_committed(store, [later, other])
            parked = await relay.parked()
            assert [p.message_id for p in parked] == [row2.message_id]
            assert parked[0].last_error and "PublishError" in parked[0].last_error
            pub.fail_next = 0
            # `later` waits behind its parked key; `other` goes
            assert await self.drain(relay) == 1
            assert pub.ids[-1] == other.message_id
            assert await relay.requeue() == 1
            assert await self.drain(relay) == 2
            pub.published = [p for p in pub.published if p[1].id != other.message_id]
            assert pub.ids == [row.message_id, row2.message_id, later.message_id]

    async def test_failed_publish_waits_out_its_backoff(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            await self.add_committed(store, [make_row(key="k")])
            relay = self.relay(store, pub, backoff=lambda n: 60.0)
            pub.fail_next = 1
            assert await relay.run_once() == 0
            assert await relay.run_once() == 0
            assert pub.calls == 1

    async def test_running_relay_keeps_key_order_through_a_failed_publish(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            rows = make_rows(8, keys=["k"])
            await self.add_committed(store, rows)
            pub.fail_next = 1  # the first batch fails after the next may have been claimed
            relay = self.relay(store, pub, batch_size=2, backoff=lambda n: 0.05)
            async with relay:
                assert await wait_until(lambda: len(set(pub.ids)) == 8, 20.0)
            assert _first_order(pub.published)["k"] == [r.message_id for r in rows]
            assert (await store.status()).pending == 0

    async def test_graceful_stop_releases_the_claimed_batch(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            pub.gate = asyncio.Event()
            rows = make_rows(3, keys=["k"])
            await self.add_committed(store, rows)
            relay = self.relay(store, pub, lease_seconds=300.0)
            await relay.start()
            await asyncio.wait_for(pub.entered.wait(), 10.0)
            await relay.stop(timeout=0.1)
            assert not relay.running
            # released, not left leased for 300 s
            got = await store.claim("relay-next", 100, 30.0)
            assert [r.message_id for r in got] == [r.message_id for r in rows]

    async def test_cancelling_the_relay_releases_its_rows_and_reraises(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            pub.gate = asyncio.Event()
            await self.add_committed(store, make_rows(2, keys=["k"]))
            relay = self.relay(store, pub, lease_seconds=300.0)
            task = asyncio.create_task(relay.run_once())
            await asyncio.wait_for(pub.entered.wait(), 10.0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert len(await store.claim("relay-next", 100, 30.0)) == 2

    async def test_stop_finishes_the_batch_in_hand(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            pub.gate = asyncio.Event()
            rows = make_rows(3, keys=["k"])
            await self.add_committed(store, rows)
            relay = self.relay(store, pub)
            await relay.start()
            await asyncio.wait_for(pub.entered.wait(), 10.0)
            stopping = asyncio.create_task(relay.stop(timeout=10.0))
            await asyncio.sleep(0.05)
            pub.gate.set()
            await stopping
            assert pub.ids == [r.message_id for r in rows]
            assert (await store.status()).pending == 0

    async def test_running_relay_publishes_what_is_committed_later(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            async with self.relay(store, pub, poll_interval=0.05):
                await asyncio.sleep(0.1)
                rows = make_rows(5, keys=["a"])
                await self.add_committed(store, rows)
                assert await wait_until(lambda: len(pub.published) == 5, 10.0)
            assert pub.ids == [r.message_id for r in rows]

    async def test_relay_keeps_sent_rows_for_retention_then_purges(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            await self.add_committed(store, make_rows(3))
            relay = self.relay(store, pub, retention=timedelta(seconds=0.3))
            assert await relay.run_once() == 3
            assert (await relay.status()).pending == 0
            assert await relay.purge() == 0
            await asyncio.sleep(0.5)
            assert await relay.purge() == 3
            assert await store.claim("relay-x", 100, 30.0) == []

    async def test_relay_after_a_crash_publishes_again(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            rows = make_rows(3, keys=["k"])
            await self.add_committed(store, rows)
            # a relay that published and died before marking: its lease runs out
            dead = await store.claim("relay-dead", 100, self.lease_seconds)
            await pub.publish(
                "orders", [TransportMessage(r.message_id, r.payload, r.partition_key) for r in dead]
            )
            relay = self.relay(store, pub)
            assert await relay.run_once() == 0
            await asyncio.sleep(self.lease_seconds + 0.2)
            assert await relay.run_once() == 3
            assert pub.ids == [r.message_id for r in rows] * 2


@asynccontextmanager
async def _open_many(suite: OutboxStoreConformance, store: Any, n: int) -> Any:
    """``store`` plus n-1 more instances over the same tables."""
    stores = [store]
    managers: list[AbstractAsyncContextManager[Any]] = []
    try:
        for _ in range(n - 1):
            cm = suite.open_again(store)
            stores.append(await cm.__aenter__())
            managers.append(cm)
        yield stores
    finally:
        for cm in reversed(managers):
            await cm.__aexit__(None, None, None)


class InboxStoreConformance(NoTransactionHook):
    """Every test here must pass on every inbox store."""

    # -- hooks -----------------------------------------------------------------------------

    def make_inbox_store(self) -> AbstractAsyncContextManager[InboxStore]:
        raise NotImplementedError

    async def begin(self, store: Any) -> Any:
        raise NotImplementedError

    async def commit(self, tx: Any) -> None:
        raise NotImplementedError

    async def rollback(self, tx: Any) -> None:
        raise NotImplementedError

    async def record(self, store: Any, tx: Any, consumer: str, message_id: str) -> bool:
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------

    async def apply_once(
        self,
        store: Any,
        consumer: str,
        message_id: str,
        applied: list[str],
        effect: Callable[[], Awaitable[None]] | None = None,
    ) -> bool:
        """One delivery: record and, the first time, 'apply' (appended at commit)."""
        tx = await self.begin(store)
        try:
            first = await self.record(store, tx, consumer, message_id)
            if first and effect is not None:
                await effect()
        except BaseException:
            await self.rollback(tx)
            raise
        await self.commit(tx)
        if first:
            applied.append(message_id)
        return first

    # -- tests -----------------------------------------------------------------------------

    async def test_inbox_create_schema_is_idempotent(self) -> None:
        async with self.make_inbox_store() as store:
            await store.create_schema()
            await store.create_schema()

    async def test_a_connection_with_no_open_transaction_is_refused(self) -> None:
        async with self.make_inbox_store() as store:
            mid = str(uuid.uuid4())

            async def write(conn: Any, is_async: bool) -> None:
                if is_async:
                    await store.record_async(conn, "billing", mid)
                else:
                    store.record(conn, "billing", mid)

            await _each_refused(self, store, write)
            # nothing was recorded: the first real delivery is applied
            assert await self.apply_once(store, "billing", mid, []) is True

    async def test_duplicate_is_applied_once(self) -> None:
        async with self.make_inbox_store() as store:
            applied: list[str] = []
            mid = str(uuid.uuid4())
            assert await self.apply_once(store, "billing", mid, applied) is True
            assert await self.apply_once(store, "billing", mid, applied) is False
            assert await self.apply_once(store, "billing", mid, applied) is False
            assert applied == [mid]

    async def test_consumers_are_independent(self) -> None:
        async with self.make_inbox_store() as store:
            applied: list[str] = []
            mid = str(uuid.uuid4())
            assert await self.apply_once(store, "billing", mid, applied)
            assert await self.apply_once(store, "shipping", mid, applied)
            assert await self.apply_once(store, "billing", str(uuid.uuid4()), applied)

    async def test_rolled_back_record_is_forgotten(self) -> None:
        async with self.make_inbox_store() as store:
            mid = str(uuid.uuid4())
            tx = await self.begin(store)
            assert await self.record(store, tx, "billing", mid) is True
            await self.rollback(tx)
            applied: list[str] = []
            assert await self.apply_once(store, "billing", mid, applied) is True

    @pytest.mark.parametrize("first_ends", ["commit", "rollback"])
    async def test_concurrent_duplicate_is_never_applied_twice(self, first_ends: str) -> None:
        async with self.make_inbox_store() as store:
            mid = str(uuid.uuid4())
            committed_true = 0
            t1 = await self.begin(store)
            assert await self.record(store, t1, "billing", mid) is True
            t2 = await self.begin(store)
            second = asyncio.create_task(self.record(store, t2, "billing", mid))
            await asyncio.sleep(0.2)
            if first_ends == "commit":
                await self.commit(t1)
                committed_true += 1
            else:
                await self.rollback(t1)
            try:
                r2: bool | None = await asyncio.wait_for(second, 30.0)
            except MsdataError:
                r2 = None  # the store refused the concurrent duplicate: the bus nacks it
            if r2:
                await self.commit(t2)
                committed_true += 1
            else:
                await self.rollback(t2)
            # after a refusal (r2 is None), the redelivery
            if r2 is None and await self.apply_once(store, "billing", mid, []):
                committed_true += 1
            if first_ends == "commit":
                assert committed_true == 1 and r2 is not True
            else:
                assert committed_true == 1

    async def test_purge_forgets_old_records_only(self) -> None:
        async with self.make_inbox_store() as store:
            old, new = str(uuid.uuid4()), str(uuid.uuid4())
            await self.apply_once(store, "billing", old, [])
            await asyncio.sleep(0.3)
            cut = datetime.now(UTC)
            await asyncio.sleep(0.05)
            await self.apply_once(store, "billing", new, [])
            assert await store.purge(cut - timedelta(hours=1)) == 0
            assert await store.purge(cut) == 1
            assert await self.apply_once(store, "billing", old, []) is True
            assert await self.apply_once(store, "billing", new, []) is False
