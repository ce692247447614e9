"""In-memory outbox and inbox stores, with a transaction object standing in for a connection.

They implement the ordering and lease contract of :mod:`msdata.outbox.store` faithfully
(sequence numbers given at append time, visible only at commit, so the out-of-order commit
hazard can be reproduced), and serve one event loop in one thread::

    store = MemoryOutboxStore()
    tx = store.begin()              # or: with store.begin() as tx: ...
    outbox.add(tx, OrderPlaced(...))
    tx.commit()                     # or tx.rollback(): nothing was ever visible

One :class:`MemoryTransaction` can carry work for several memory stores (an inbox record and
outbox rows together), and ``tx.on_commit(fn)`` lets a test or a demo make its own
"business effects" commit or roll back with them.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType, TracebackType
from typing import Any, Self

from msdata.errors import ConfigurationError, StoreError
from msdata.outbox.store import OutboxRecord, OutboxRow, OutboxStatus
from msdata.urls import redact_url

__all__ = ["MemoryInboxStore", "MemoryOutboxStore", "MemoryTransaction"]

_PENDING, _PARKED, _SENT = 0, 1, 2
_NO_HEADERS: MappingProxyType[str, str] = MappingProxyType({})


class MemoryTransaction:
    """A unit of work for the memory stores: its changes become visible at :meth:`commit`
    and vanish at :meth:`rollback`. As a context manager it commits on normal exit and rolls
    back on an exception (like a database transaction factory does)."""

    __slots__ = ("_on_commit", "_on_end", "_state")

    def __init__(self) -> None:
        self._on_commit: list[Callable[[], None]] = []
        self._on_end: list[Callable[[], None]] = []
        self._state = "open"

    @property
    def is_open(self) -> bool:
        return self._state == "open"

    def on_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when (and only if) this transaction commits."""
        self._check_open()
        self._on_commit.append(fn)

    def on_end(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` after commit or rollback (after the commit callbacks)."""
        self._check_open()
        self._on_end.append(fn)

    def commit(self) -> None:
        self._check_open()
        self._state = "committed"
        for fn in self._on_commit:
            fn()
        self._finish()

    def rollback(self) -> None:
        if self._state != "open":
            return
        self._state = "rolled back"
        self._finish()

    def _finish(self) -> None:
        ends, self._on_end, self._on_commit = self._on_end, [], []
        for fn in ends:
            fn()

    def _check_open(self) -> None:
        if self._state != "open":
            raise StoreError(f"the transaction is already {self._state}")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()


def _tx(conn: Any) -> MemoryTransaction:
    if not isinstance(conn, MemoryTransaction):
        raise ConfigurationError(
            f"the memory stores take a MemoryTransaction (store.begin()), got {type(conn)!r}"
        )
    conn._check_open()
    return conn


@dataclass(slots=True)
class _Row:
    seq: int
    row: OutboxRow
    created_at: datetime
    state: int = _PENDING
    lease_owner: str | None = None
    lease_until: float = 0.0
    retry_at: datetime | None = None
    attempts: int = 0
    last_error: str | None = None
    sent_at: datetime | None = None

    def record(self) -> OutboxRecord:
        r = self.row
        return OutboxRecord(
            self.seq,
            r.message_id,
            r.topic,
            r.type,
            r.payload,
            r.partition_key,
            MappingProxyType(dict(r.headers)) if r.headers else _NO_HEADERS,
            self.created_at,
            self.attempts,
            self.last_error,
        )


def _now() -> datetime:
    return datetime.now(UTC)


class MemoryOutboxStore:
    """The in-memory :class:`msdata.outbox.store.OutboxStore`."""

    #: a relay's claim returns later rows of the keys it holds: it may claim ahead
    prefetch_claims = True

    def __init__(self) -> None:
        self._rows: dict[int, _Row] = {}
        self._seq = itertools.count(1)
        self._max_seq = 0
        self._wake = asyncio.Event()
        self._closed = False

    @classmethod
    def from_url(cls, url: str = "memory://") -> MemoryOutboxStore:
        if not url.startswith("memory:"):
            raise ConfigurationError(f"not a memory:// URL: {redact_url(url)!r}")
        return cls()

    def begin(self) -> MemoryTransaction:
        """A new transaction to add messages in (stands in for a database connection)."""
        return MemoryTransaction()

    # -- write side ----------------------------------------------------------------------

    def append(self, conn: Any, rows: Sequence[OutboxRow]) -> None:
        tx = _tx(conn)
        if not rows:
            return
        # seq is taken now, visibility comes at commit: the long-transaction hazard is real
        staged = [_Row(next(self._seq), r, _now()) for r in rows]
        tx.on_commit(lambda: self._commit(staged))

    async def append_async(self, conn: Any, rows: Sequence[OutboxRow]) -> None:
        self.append(conn, rows)

    def _commit(self, staged: list[_Row]) -> None:
        out_of_order = staged[0].seq < self._max_seq
        for r in staged:
            self._rows[r.seq] = r
        self._max_seq = max(self._max_seq, staged[-1].seq)
        if out_of_order:
            self._rows = dict(sorted(self._rows.items()))
        self._wake.set()

    # -- relay side ----------------------------------------------------------------------

    async def create_schema(self) -> None:
        return None

    async def claim(self, relay_id: str, limit: int, lease_seconds: float) -> list[OutboxRecord]:
        self._check()
        mono, now = time.monotonic(), _now()
        unsent = [r for r in self._rows.values() if r.state != _SENT]
        # keys another relay holds a live lease on are out; later rows of keys this relay
        # holds may come back (it publishes them after the rows it holds)
        leased = {
            r.row.partition_key
            for r in unsent
            if r.lease_owner not in (None, relay_id)
            and r.lease_until > mono
            and r.row.partition_key is not None
        }
        blocked: set[str] = set()
        out: list[_Row] = []
        for r in unsent:
            if len(out) >= limit:
                break
            key = r.row.partition_key
            if key is not None and (key in leased or key in blocked):
                continue
            if r.lease_owner == relay_id and r.lease_until > mono:
                continue
            waiting = r.retry_at is not None and r.retry_at > now
            live = r.lease_owner is not None and r.lease_until > mono
            if r.state == _PARKED or waiting or live:
                if key is not None:
                    blocked.add(key)
                continue
            out.append(r)
        until = mono + lease_seconds
        for r in out:
            r.lease_owner, r.lease_until = relay_id, until
        return [r.record() for r in out]

    async def mark_sent(self, relay_id: str, seqs: Sequence[int], *, keep: bool = False) -> None:
        self._check()
        now = _now()
        for seq in seqs:
            r = self._rows.get(seq)
            if r is None or r.state == _SENT:
                continue
            if keep:
                r.state, r.sent_at, r.lease_owner = _SENT, now, None
            else:
                del self._rows[seq]

    async def mark_sent_and_claim(
        self,
        relay_id: str,
        sent_seqs: Sequence[int],
        limit: int,
        lease_seconds: float,
        *,
        keep: bool = False,
    ) -> list[OutboxRecord]:
        """``mark_sent`` then ``claim``: one step of the event loop, so one transaction."""
        self._check()
        await self.mark_sent(relay_id, sent_seqs, keep=keep)  # never suspends
        return await self.claim(relay_id, limit, lease_seconds)

    def _owned(self, relay_id: str, seqs: Sequence[int]) -> list[_Row]:
        rows = (self._rows.get(s) for s in seqs)
        return [
            r for r in rows if r is not None and r.state == _PENDING and r.lease_owner == relay_id
        ]

    async def release(self, relay_id: str, seqs: Sequence[int]) -> None:
        self._check()
        for r in self._owned(relay_id, seqs):
            r.lease_owner = None
        self._wake.set()

    async def retry_later(
        self, relay_id: str, seqs: Sequence[int], reason: str, retry_at: datetime
    ) -> None:
        self._check()
        for r in self._owned(relay_id, seqs):
            r.attempts += 1
            r.last_error, r.retry_at, r.lease_owner = reason, retry_at, None

    async def park(self, relay_id: str, seqs: Sequence[int], reason: str) -> None:
        self._check()
        for r in self._owned(relay_id, seqs):
            r.state, r.last_error, r.lease_owner = _PARKED, reason, None

    async def parked(self, limit: int = 100) -> list[OutboxRecord]:
        self._check()
        return [r.record() for r in self._rows.values() if r.state == _PARKED][:limit]

    async def requeue(self, seqs: Sequence[int]) -> int:
        self._check()
        n = 0
        for seq in seqs:
            r = self._rows.get(seq)
            if r is not None and r.state == _PARKED:
                r.state, r.attempts, r.retry_at, r.lease_owner = _PENDING, 0, None, None
                n += 1
        if n:
            self._wake.set()
        return n

    async def status(self) -> OutboxStatus:
        self._check()
        pending = [r for r in self._rows.values() if r.state == _PENDING]
        parked = sum(1 for r in self._rows.values() if r.state == _PARKED)
        oldest = min((r.created_at for r in pending), default=None)
        age = None if oldest is None else max(0.0, (_now() - oldest).total_seconds())
        return OutboxStatus(pending=len(pending), oldest_pending_age=age, parked=parked)

    async def purge_sent(self, older_than: datetime) -> int:
        self._check()
        gone = [
            s
            for s, r in self._rows.items()
            if r.state == _SENT and r.sent_at is not None and r.sent_at < older_than
        ]
        for s in gone:
            del self._rows[s]
        return len(gone)

    async def wait_for_rows(self, timeout: float) -> None:
        self._check()
        if not self._wake.is_set():
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                return
        self._wake.clear()

    async def close(self) -> None:
        self._closed = True

    def _check(self) -> None:
        if self._closed:
            raise StoreError("the outbox store is closed")


class MemoryInboxStore:
    """The in-memory :class:`msdata.outbox.store.InboxStore`.

    A concurrent duplicate (the same pair recorded by another transaction that is still
    open) raises :class:`msdata.errors.StoreError`: the caller nacks, and the redelivery
    finds the pair committed (skip) or gone (the first transaction rolled back: apply).
    """

    def __init__(self) -> None:
        self._done: dict[tuple[str, str], datetime] = {}
        self._open: dict[tuple[str, str], MemoryTransaction] = {}

    @classmethod
    def from_url(cls, url: str = "memory://") -> MemoryInboxStore:
        if not url.startswith("memory:"):
            raise ConfigurationError(f"not a memory:// URL: {redact_url(url)!r}")
        return cls()

    def begin(self) -> MemoryTransaction:
        return MemoryTransaction()

    def record(self, conn: Any, consumer: str, message_id: str) -> bool:
        tx = _tx(conn)
        pair = (consumer, message_id)
        if pair in self._done:
            return False
        holder = self._open.get(pair)
        if holder is tx:
            return False
        if holder is not None:
            raise StoreError(
                f"message {message_id} is being recorded for {consumer!r} by another open "
                "transaction; retry after it ends"
            )
        self._open[pair] = tx

        def commit() -> None:
            self._done[pair] = _now()

        def end() -> None:
            self._open.pop(pair, None)

        tx.on_commit(commit)
        tx.on_end(end)
        return True

    async def record_async(self, conn: Any, consumer: str, message_id: str) -> bool:
        return self.record(conn, consumer, message_id)

    async def create_schema(self) -> None:
        return None

    async def purge(self, older_than: datetime) -> int:
        gone = [p for p, at in self._done.items() if at < older_than]
        for p in gone:
            del self._done[p]
        return len(gone)

    async def close(self) -> None:
        return None
