"""The in-memory event store: streams and the global order in a list, appends staged on a
:class:`MemoryTransaction` and made visible when it commits.

Positions are given at commit, so the global order is the commit order and a reader never
has to wait for a late transaction. A stream that another open transaction is appending to
cannot wait for it (there is no blocking in one event loop): ``append`` raises
:class:`msdata.errors.ConcurrencyError` at once, as a database would after the first
transaction commits.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_right
from collections.abc import Collection, Sequence
from typing import Any

from msdata.adapters.memory._db import MemoryDatabase, MemoryTransaction, transaction_of
from msdata.clock import SYSTEM_CLOCK, Clock
from msdata.errors import ConcurrencyError, StoreError
from msdata.eventstore.store import (
    Backlog,
    NewEvent,
    RecordedEvent,
    as_types,
    check_expected_version,
    check_read,
    check_stream_id,
)

__all__ = ["MemoryEventStore"]


class MemoryEventStore(MemoryDatabase):
    """The in-memory :class:`msdata.eventstore.store.EventStore` (one event loop)."""

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(clock=clock)
        self._events: list[RecordedEvent] = []
        self._positions: list[int] = []  # parallel to _events, for bisect
        self._streams: dict[str, list[RecordedEvent]] = {}
        self._holders: dict[str, tuple[MemoryTransaction, int]] = {}
        self._next = 1
        self._waiters: set[asyncio.Future[None]] = set()

    # -- write side ----------------------------------------------------------------------

    def append(
        self, conn: Any, stream_id: str, expected_version: int, events: Sequence[NewEvent]
    ) -> int:
        self._check()
        tx = transaction_of(conn)
        check_stream_id(stream_id)
        check_expected_version(expected_version)
        committed = len(self._streams.get(stream_id, ()))
        holder = self._holders.get(stream_id)
        if holder is not None and holder[0] is not tx:
            raise ConcurrencyError(
                f"stream {stream_id} (another open transaction is appending to it)",
                expected_version,
                None,
            )
        current = holder[1] if holder is not None else committed
        if current != expected_version:
            raise ConcurrencyError(f"stream {stream_id}", expected_version, current)
        if not events:
            return current
        new_version = current + len(events)
        staged = list(events)
        first = holder is None
        self._holders[stream_id] = (tx, new_version)
        tx.on_commit(lambda: self._commit(stream_id, current, staged))
        if first:
            tx.on_end(lambda: self._release(stream_id))
        return new_version

    async def append_async(
        self, conn: Any, stream_id: str, expected_version: int, events: Sequence[NewEvent]
    ) -> int:
        return self.append(conn, stream_id, expected_version, events)

    def _commit(self, stream_id: str, version: int, events: list[NewEvent]) -> None:
        now = self.clock.now()
        stream = self._streams.setdefault(stream_id, [])
        for i, e in enumerate(events, version + 1):
            r = RecordedEvent(
                self._next, stream_id, i, e.event_id, e.type, e.schema_version, e.payload, now
            )
            self._next += 1
            self._events.append(r)
            self._positions.append(r.position)
            stream.append(r)
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    # -- reads ---------------------------------------------------------------------------

    async def read_stream(
        self, stream_id: str, from_version: int = 1, limit: int | None = None
    ) -> list[RecordedEvent]:
        self._check()
        check_stream_id(stream_id)
        stream = self._streams.get(stream_id, [])
        start = max(from_version, 1) - 1
        return stream[start:] if limit is None else stream[start : start + limit]

    async def stream_version(self, stream_id: str) -> int:
        self._check()
        check_stream_id(stream_id)
        return len(self._streams.get(stream_id, ()))

    async def read_all(
        self, after: int = 0, limit: int = 1000, types: Collection[str] | None = None
    ) -> list[RecordedEvent]:
        self._check()
        check_read(after, limit)
        wanted = as_types(types)
        i = bisect_right(self._positions, after)
        if wanted is None:
            return self._events[i : i + limit]
        out: list[RecordedEvent] = []
        for r in self._events[i:]:
            if r.type in wanted:
                out.append(r)
                if len(out) >= limit:
                    break
        return out

    async def head(self) -> int:
        self._check()
        return self._positions[-1] if self._positions else 0

    async def backlog(self, after: int) -> Backlog:
        self._check()
        i = bisect_right(self._positions, after)
        n = len(self._events) - i
        return Backlog(n, self._events[i].recorded_at if n else None)

    async def wait_for_events(self, after: int, timeout: float) -> None:
        self._check()
        if self._positions and self._positions[-1] > after:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                await fut
        except TimeoutError:
            return
        finally:
            self._waiters.discard(fut)

    # -- lifecycle -----------------------------------------------------------------------

    def _release(self, name: str) -> None:
        self._holders.pop(name, None)

    async def close(self) -> None:
        await super().close()
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)

    def _check(self) -> None:
        if self.closed:
            raise StoreError("the event store is closed")
