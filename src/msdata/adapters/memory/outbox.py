"""The in-memory outbox store, with a :class:`MemoryTransaction` standing in for a connection.

It implements the ordering and lease contract of :mod:`msdata.outbox.store` faithfully
(sequence numbers given at append time, visible only at commit, so the out-of-order commit
hazard can be reproduced), and serves one event loop in one thread::

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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any, Self

from msdata.adapters.memory._db import MemoryDatabase, MemoryTransaction, transaction_of
from msdata.clock import SYSTEM_CLOCK, Clock
from msdata.errors import StoreError
from msdata.outbox.store import (
    POSTGRES_ONLY_OPTIONS,
    OutboxRecord,
    OutboxRow,
    OutboxStatus,
    OutboxStoreFeatures,
)
from msdata.storage import Connection

# MemoryTransaction is re-exported: it was imported from here before the split
__all__ = ["MemoryOutboxStore", "MemoryTransaction"]

_PENDING, _PARKED, _SENT = 0, 1, 2
_NO_HEADERS: MappingProxyType[str, str] = MappingProxyType({})


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


class MemoryOutboxStore(MemoryDatabase):
    """The in-memory :class:`msdata.outbox.OutboxStore`."""

    #: a relay's claim returns later rows of the keys it holds: it may claim ahead
    features = OutboxStoreFeatures(prefetch_claims=True)

    @classmethod
    def from_url(cls, url: str = "memory://", **options: Any) -> Self:
        """A new, empty store for ``memory://``. Besides the options every memory store
        ignores (:meth:`MemoryDatabase.from_url`), the PostgreSQL outbox store's own
        (``notify``, ``relay_synchronous_commit``, ``partitioned``, ``max_size``) are
        accepted and ignored, so a service's outbox URL can be switched to ``memory://``
        without changing its options."""
        kept = {k: v for k, v in options.items() if k not in POSTGRES_ONLY_OPTIONS}
        return super().from_url(url, **kept)

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(clock=clock)
        self._rows: dict[int, _Row] = {}
        self._seq = itertools.count(1)
        self._max_seq = 0
        self._wake = asyncio.Event()

    # -- write side ----------------------------------------------------------------------

    def append(self, conn: Connection, rows: Sequence[OutboxRow]) -> None:
        tx = transaction_of(conn)
        if not rows:
            return
        # seq is taken now, visibility comes at commit: the long-transaction hazard is real
        now = self.clock.now()
        staged = [_Row(next(self._seq), r, now) for r in rows]
        tx.on_commit(lambda: self._commit(staged))

    async def append_async(self, conn: Connection, rows: Sequence[OutboxRow]) -> None:
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

    async def claim(self, relay_id: str, limit: int, lease_seconds: float) -> list[OutboxRecord]:
        self._check()
        mono, now = self.clock.monotonic(), self.clock.now()
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
        now = self.clock.now()
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

    async def check_schema(self) -> None:
        """What a relay checks at start: the store is open (it has no tables)."""
        self._check()

    async def status(self) -> OutboxStatus:
        self._check()
        pending = [r for r in self._rows.values() if r.state == _PENDING]
        parked = sum(1 for r in self._rows.values() if r.state == _PARKED)
        oldest = min((r.created_at for r in pending), default=None)
        age = None if oldest is None else max(0.0, (self.clock.now() - oldest).total_seconds())
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

    def _check(self) -> None:
        if self.closed:
            raise StoreError("the outbox store is closed")
