"""Conformance suite for the event store port, run on every backend.

Subclass once per backend and fill in the hooks; the same tests then run on memory, SQLite,
PostgreSQL or your own adapter::

    class TestMyEventStore(EventStoreConformance):
        features = EventStoreFeatures(concurrent_writers=True)

        @asynccontextmanager
        async def make_store(self) -> AsyncIterator[EventStore]:
            store = MyEventStore(..., table_prefix=f"t{uuid.uuid4().hex[:8]}_")
            await store.create_schema()
            try:
                yield store
            finally:
                await store.close()                 # and drop its tables

        async def begin(self, store): ...           # a transaction on the backend
        async def append(self, store, tx, stream_id, expected, events): ...
        async def commit(self, tx): ...
        async def rollback(self, tx): ...

Hooks:

``make_store()``
    async context manager yielding a fresh, empty store with its schema created.
``begin(store)``, ``commit(tx)``, ``rollback(tx)``
    open, commit and roll back a transaction on the backend; two may be open at once.
``append(store, tx, stream_id, expected_version, events)``
    ``store.append``/``append_async`` on ``tx``'s connection, returning its result. It may
    block until a concurrent transaction ends (run a sync driver in a thread so the event
    loop goes on).
``features``
    an :class:`EventStoreFeatures`.

Needs pytest and pytest-asyncio (``asyncio_mode = "auto"``).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

import pytest

from msdata.errors import ConcurrencyError, ConfigurationError
from msdata.eventstore.store import EventStore, NewEvent, RecordedEvent
from msdata.testing.waiting import eventually

__all__ = ["EventStoreConformance", "EventStoreFeatures", "make_events"]


@dataclass(frozen=True)
class EventStoreFeatures:
    #: two write transactions can be open at once and the later can commit first
    #: (PostgreSQL, memory); SQLite has one writer at a time, so the late-commit case
    #: cannot arise there and those tests run one transaction after the other
    concurrent_writers: bool = True


def make_events(n: int, *, type: str = "test.Happened", tag: str = "") -> list[NewEvent]:
    """``n`` events with small CloudEvents payloads (``data.n`` = 0..n-1)."""
    out = []
    for i in range(n):
        eid = str(uuid.uuid4())
        payload = json.dumps(
            {
                "specversion": "1.0",
                "id": eid,
                "source": "conformance",
                "type": type,
                "data": {"n": i, "tag": tag},
            },
            separators=(",", ":"),
        ).encode()
        out.append(NewEvent(eid, type, 1, payload))
    return out


async def _count_at_least(store: Any, count: int) -> bool:
    return len(await store.read_all(0, count + 1)) >= count


def _stream() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


class EventStoreConformance:
    """Every test here must pass on every event store."""

    features: ClassVar[EventStoreFeatures] = EventStoreFeatures()

    # -- hooks -----------------------------------------------------------------------------

    def make_store(self) -> AbstractAsyncContextManager[EventStore]:
        raise NotImplementedError

    async def begin(self, store: Any) -> Any:
        raise NotImplementedError

    async def append(
        self, store: Any, tx: Any, stream_id: str, expected: int, events: Sequence[NewEvent]
    ) -> int:
        raise NotImplementedError

    async def commit(self, tx: Any) -> None:
        raise NotImplementedError

    async def rollback(self, tx: Any) -> None:
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------

    async def settled(self, store: Any, count: int) -> list[RecordedEvent]:
        """``read_all()`` once it returns ``count`` events. A store may hold committed
        events back for a while (PostgreSQL: behind any older open transaction on the
        server, e.g. another test's); that delays them, it never loses them."""
        await eventually(lambda: _count_at_least(store, count), what=f"{count} events readable")
        got: list[RecordedEvent] = await store.read_all()
        return got

    async def append_committed(
        self, store: Any, stream_id: str, expected: int, events: Sequence[NewEvent]
    ) -> int:
        tx = await self.begin(store)
        try:
            version = await self.append(store, tx, stream_id, expected, events)
        except BaseException:
            await self.rollback(tx)
            raise
        await self.commit(tx)
        return version

    # -- streams ---------------------------------------------------------------------------

    async def test_create_schema_is_idempotent(self) -> None:
        async with self.make_store() as store:
            await store.create_schema()
            await store.create_schema()
            assert await store.read_all() == []
            assert await store.head() == 0

    async def test_append_then_read_stream_in_version_order(self) -> None:
        async with self.make_store() as store:
            s = _stream()
            events = make_events(5)
            assert await self.append_committed(store, s, 0, events[:2]) == 2
            assert await self.append_committed(store, s, 2, events[2:]) == 5
            got = await store.read_stream(s)
            assert [r.event_id for r in got] == [e.event_id for e in events]
            assert [r.stream_version for r in got] == [1, 2, 3, 4, 5]
            for want, r in zip(events, got, strict=True):
                assert isinstance(r, RecordedEvent)
                assert r.stream_id == s and r.type == want.type
                assert r.schema_version == want.schema_version
                assert bytes(r.payload) == want.payload
                assert r.recorded_at.tzinfo is not None
                assert abs((datetime.now(UTC) - r.recorded_at).total_seconds()) < 60
            assert [r.stream_version for r in await store.read_stream(s, 3)] == [3, 4, 5]
            assert [r.stream_version for r in await store.read_stream(s, 2, 2)] == [2, 3]
            assert await store.read_stream(s, 6) == []
            assert await store.stream_version(s) == 5
            assert await store.read_stream("no-such-stream") == []
            assert await store.stream_version("no-such-stream") == 0

    async def test_stale_expected_version_fails_and_writes_nothing(self) -> None:
        async with self.make_store() as store:
            s = _stream()
            await self.append_committed(store, s, 0, make_events(2))
            for expected in (0, 1, 3):
                with pytest.raises(ConcurrencyError) as info:
                    await self.append_committed(store, s, expected, make_events(1))
                err = info.value
                assert s in err.name and err.expected == expected and err.actual == 2
                assert s in str(err) and str(expected) in str(err)
            assert await store.stream_version(s) == 2
            assert len(await self.settled(store, 2)) == 2

    async def test_a_new_stream_must_expect_version_zero(self) -> None:
        async with self.make_store() as store:
            with pytest.raises(ConcurrencyError) as info:
                await self.append_committed(store, _stream(), 1, make_events(1))
            assert info.value.expected == 1 and info.value.actual == 0
            assert await store.read_all() == []

    async def test_a_conflict_leaves_the_transaction_usable(self) -> None:
        """A stale append raises without poisoning the caller's transaction: the caller
        may catch it and go on (the aggregate helper's snapshot does)."""
        async with self.make_store() as store:
            a, b = _stream(), _stream()
            await self.append_committed(store, a, 0, make_events(1))
            tx = await self.begin(store)
            try:
                with pytest.raises(ConcurrencyError):
                    await self.append(store, tx, a, 0, make_events(1))
                assert await self.append(store, tx, b, 0, make_events(2)) == 2
            except BaseException:
                await self.rollback(tx)
                raise
            await self.commit(tx)
            assert await store.stream_version(a) == 1
            assert await store.stream_version(b) == 2

    async def test_two_appends_in_one_transaction_continue_the_stream(self) -> None:
        async with self.make_store() as store:
            s = _stream()
            tx = await self.begin(store)
            try:
                assert await self.append(store, tx, s, 0, make_events(2)) == 2
                assert await self.append(store, tx, s, 2, make_events(3)) == 5
            except BaseException:
                await self.rollback(tx)
                raise
            await self.commit(tx)
            got = await self.settled(store, 5)
            assert [r.stream_version for r in got] == [1, 2, 3, 4, 5]
            positions = [r.position for r in got]
            assert positions == sorted(positions) and len(set(positions)) == 5

    async def test_appending_no_events_changes_nothing(self) -> None:
        async with self.make_store() as store:
            s = _stream()
            assert await self.append_committed(store, s, 0, []) == 0
            assert await store.stream_version(s) == 0 and await store.read_all() == []

    async def test_bad_arguments_are_refused(self) -> None:
        async with self.make_store() as store:
            tx = await self.begin(store)
            try:
                with pytest.raises(ConfigurationError):
                    await self.append(store, tx, "", 0, make_events(1))
                with pytest.raises(ConfigurationError):
                    await self.append(store, tx, _stream(), -1, make_events(1))
            finally:
                await self.rollback(tx)
            with pytest.raises(ConfigurationError):
                await store.read_all(-1)
            with pytest.raises(ConfigurationError):
                await store.read_all(0, 0)
            for bad_id in ("a\x00b", "line\nbreak", "\x7f"):  # no control character
                tx = await self.begin(store)
                try:
                    with pytest.raises(ConfigurationError):
                        await self.append(store, tx, bad_id, 0, make_events(1))
                finally:
                    await self.rollback(tx)
                with pytest.raises(ConfigurationError):
                    await store.read_stream(bad_id)
                with pytest.raises(ConfigurationError):
                    await store.stream_version(bad_id)
            for bad in ("test.Happened", [object], [None]):  # names only, never one str
                with pytest.raises(ConfigurationError):
                    await store.read_all(0, 10, bad)  # type: ignore[arg-type]

    async def test_rolled_back_and_uncommitted_events_are_invisible(self) -> None:
        async with self.make_store() as store:
            s = _stream()
            tx = await self.begin(store)
            await self.append(store, tx, s, 0, make_events(2))
            assert await store.read_all() == []
            assert await store.read_stream(s) == []
            await self.rollback(tx)
            assert await store.read_all() == [] and await store.stream_version(s) == 0
            assert await self.append_committed(store, s, 0, make_events(1)) == 1

    # -- the global order ------------------------------------------------------------------

    async def test_read_all_in_position_order_with_after_limit_and_types(self) -> None:
        async with self.make_store() as store:
            a, b = _stream(), _stream()
            await self.append_committed(store, a, 0, make_events(3, type="t.A"))
            await self.append_committed(store, b, 0, make_events(2, type="t.B"))
            await self.append_committed(store, a, 3, make_events(1, type="t.B"))
            every = await self.settled(store, 6)
            assert [(r.stream_id, r.stream_version) for r in every] == [
                (a, 1), (a, 2), (a, 3), (b, 1), (b, 2), (a, 4)
            ]  # fmt: skip
            positions = [r.position for r in every]
            assert positions == sorted(positions) and len(set(positions)) == 6
            assert positions[0] > 0
            assert await store.read_all(positions[2], 2) == every[3:5]
            assert await store.read_all(positions[-1]) == []
            only_b = await store.read_all(0, 100, types=["t.B"])
            assert [r.type for r in only_b] == ["t.B"] * 3
            assert await store.read_all(positions[4], 100, types={"t.B"}) == every[5:]
            assert await store.head() == positions[-1]
            backlog = await store.backlog(positions[1])
            assert backlog.events == 4 and backlog.oldest_recorded_at == every[2].recorded_at
            assert await store.backlog(positions[-1]) == (0, None)

    async def test_concurrent_appends_to_one_stream_one_wins(self) -> None:
        async with self.make_store() as store:
            s = _stream()
            await self.append_committed(store, s, 0, make_events(1))
            first = make_events(2, tag="first")
            t1 = await self.begin(store)
            t2 = await self.begin(store)
            try:
                assert await self.append(store, t1, s, 1, first) == 3
                # the second writer may block until the first ends, or fail at once
                second = asyncio.ensure_future(self.append(store, t2, s, 1, make_events(2)))
                await asyncio.sleep(0.05)
                await self.commit(t1)
                with pytest.raises(ConcurrencyError) as info:
                    await second
                assert s in info.value.name and info.value.expected == 1
                assert info.value.actual in (None, 1, 3)
            finally:
                await self.rollback(t2)
            got = await store.read_stream(s)
            assert [r.event_id for r in got[1:]] == [e.event_id for e in first]

    async def test_a_longer_losing_append_leaves_none_of_its_events(self) -> None:
        """The loser appends more events than the winner: none of them may stay (its
        later versions do not collide with anything)."""
        async with self.make_store() as store:
            s = _stream()
            t1 = await self.begin(store)
            t2 = await self.begin(store)
            try:
                await self.append(store, t1, s, 0, make_events(1, tag="winner"))
                second = asyncio.ensure_future(self.append(store, t2, s, 0, make_events(3)))
                await asyncio.sleep(0.05)
                await self.commit(t1)
                with pytest.raises(ConcurrencyError):
                    await second
                # what the loser's transaction still commits holds none of its events
                await self.commit(t2)
            except BaseException:
                await self.rollback(t1)
                await self.rollback(t2)
                raise
            got = await store.read_stream(s)
            assert [r.stream_version for r in got] == [1]
            assert json.loads(got[0].payload)["data"]["tag"] == "winner"
            assert len(await self.settled(store, 1)) == 1

    async def test_concurrent_appends_to_different_streams_both_succeed(self) -> None:
        async with self.make_store() as store:
            a, b = _stream(), _stream()
            ea, eb = make_events(2), make_events(3)
            if not self.features.concurrent_writers:
                await self.append_committed(store, a, 0, ea)
                await self.append_committed(store, b, 0, eb)
            else:
                t1 = await self.begin(store)
                t2 = await self.begin(store)
                assert await self.append(store, t1, a, 0, ea) == 2
                assert await self.append(store, t2, b, 0, eb) == 3
                await self.commit(t2)
                await self.commit(t1)
            assert [r.event_id for r in await store.read_stream(a)] == [e.event_id for e in ea]
            assert [r.event_id for r in await store.read_stream(b)] == [e.event_id for e in eb]
            assert len(await self.settled(store, 5)) == 5

    async def test_a_subscriber_never_skips_an_event_that_commits_late(self) -> None:
        """T1 appends first, T2 appends and commits, a reader of the global order reads
        (and must not move past T1's place), then T1 commits: the subscriber sees both,
        each once, in increasing positions, and what it saw is what ``read_all`` gives."""
        if not self.features.concurrent_writers:
            pytest.skip("one writer at a time: transactions cannot commit out of order")
        async with self.make_store() as store:
            seen: list[RecordedEvent] = []
            reads = 0

            async def subscriber() -> None:
                nonlocal reads
                after = 0
                while True:
                    batch = await store.read_all(after, 100)
                    reads += 1
                    seen.extend(batch)
                    if batch:
                        after = batch[-1].position
                    await store.wait_for_events(after, 0.02)

            task = asyncio.create_task(subscriber())
            try:
                t1 = await self.begin(store)
                t2 = await self.begin(store)
                e1, e2 = make_events(2, tag="late"), make_events(2, tag="early")
                await self.append(store, t1, _stream(), 0, e1)
                await self.append(store, t2, _stream(), 0, e2)
                await self.commit(t2)
                before = reads
                await eventually(lambda: reads >= before + 3, what="subscriber read again")
                await self.commit(t1)
                want = {e.event_id for e in e1 + e2}
                await eventually(
                    lambda: {r.event_id for r in seen} >= want, what="both transactions seen"
                )
            finally:
                task.cancel()
            ids = [r.event_id for r in seen]
            assert len(ids) == len(set(ids)) == 4
            positions = [r.position for r in seen]
            assert positions == sorted(positions)
            assert [r.event_id for r in await self.settled(store, 4)] == ids

    async def test_many_concurrent_writers_and_a_subscriber_lose_nothing(self) -> None:
        async with self.make_store() as store:
            seen: list[RecordedEvent] = []

            async def subscriber() -> None:
                after = 0
                while True:
                    batch = await store.read_all(after, 50)
                    seen.extend(batch)
                    if batch:
                        after = batch[-1].position
                    if len(batch) < 50:
                        await store.wait_for_events(after, 0.05)

            async def writer(k: int) -> list[str]:
                s = f"w{k}-{uuid.uuid4().hex[:6]}"
                ids: list[str] = []
                for v in range(8):
                    events = make_events(1 + v % 3, tag=str(k))
                    tx = await self.begin(store)
                    try:
                        await self.append(store, tx, s, len(ids), events)
                        await asyncio.sleep(0.001 * ((k + v) % 3))  # commits interleave
                    except BaseException:
                        await self.rollback(tx)
                        raise
                    await self.commit(tx)
                    ids.extend(e.event_id for e in events)
                return ids

            task = asyncio.create_task(subscriber())
            try:
                written = await asyncio.gather(*(writer(k) for k in range(4)))
                want = {i for ids in written for i in ids}
                await eventually(lambda: {r.event_id for r in seen} >= want, what="all seen")
            finally:
                task.cancel()
            positions = [r.position for r in seen]
            assert positions == sorted(positions) and len(set(positions)) == len(want)

    async def test_wait_for_events_wakes_when_an_append_commits(self) -> None:
        async with self.make_store() as store:
            waiter = asyncio.ensure_future(store.wait_for_events(0, 30.0))
            await asyncio.sleep(0.05)
            await self.append_committed(store, _stream(), 0, make_events(1))
            await eventually(waiter.done, timeout=10.0, what="wait_for_events returned")
            await waiter
            # events already after the position: at once
            await asyncio.wait_for(store.wait_for_events(0, 30.0), 10.0)
