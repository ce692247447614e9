"""In-memory saga store: for tests, demos and the benchmark. Nothing survives the process.

A save with ``also`` runs it on a fresh :class:`MemoryTransaction` (pass that to
``outbox.add`` with a :class:`MemoryOutboxStore`): the outbox rows become visible only if the
version check passes and the state is written."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from msdata.adapters.memory._db import MemoryDatabase, MemoryTransaction
from msdata.clock import SYSTEM_CLOCK, Clock
from msdata.errors import ConcurrencyError, SagaNotFound
from msdata.saga.store import (
    ACTIVE_STATUSES,
    AlsoInTransaction,
    SagaRecord,
    SagaStatus,
    SagaStoreFeatures,
)

__all__ = ["MemorySagaStore"]


class _Kept:
    """A saved record. History and ``done`` only ever grow at their end, so the store keeps a
    reference and a length instead of a copy; everything else is copied at save."""

    __slots__ = ("done", "done_len", "history", "history_len", "record")

    def __init__(self, r: SagaRecord) -> None:
        self.history, self.history_len = r.history, len(r.history)
        self.done, self.done_len = r.done, len(r.done)
        active = r.active
        # the record's fields in order, history and done left out (a tuple builds fastest)
        self.record: tuple[Any, ...] = (
            r.saga_id,
            r.saga_type,
            r.status,
            r.data,
            r.created_at,
            r.updated_at,
            r.version,
            r.position,
            None,
            {k: v.copy() for k, v in active.items()} if active else None,
            [g.copy() for g in r.compensation] if r.compensation else None,
            r.past_pivot,
            r.error,
            r.deadline,
            r.lease_owner,
            r.lease_until,
            r.wake_at,
        )

    @property
    def version(self) -> int:
        return int(self.record[6])

    def get(self) -> SagaRecord:
        rec = SagaRecord(*self.record)
        rec.active = {k: v.copy() for k, v in rec.active.items()} if rec.active else {}
        rec.compensation = [g.copy() for g in rec.compensation] if rec.compensation else []
        rec.history = self.history[: self.history_len]
        rec.done = self.done[: self.done_len]
        return rec

    def set_lease(self, owner: str, until: datetime) -> None:
        f = list(self.record)
        f[14], f[15], f[6] = owner, until, f[6] + 1
        self.record = tuple(f)


class MemorySagaStore(MemoryDatabase):
    """A :class:`msdata.saga.SagaStore` in a dict; serves one event loop."""

    features = SagaStoreFeatures(async_connection=False, durable=False)

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(clock=clock)
        self._records: dict[str, _Kept] = {}

    async def save(self, record: SagaRecord, *, also: AlsoInTransaction | None = None) -> None:
        if also is None:
            self._check(record)
            self._records[record.saga_id] = _Kept(record)
            return
        self._check(record)
        tx = MemoryTransaction()
        try:
            result = also(tx)
            if inspect.isawaitable(result):
                await result
            self._check(record)  # again: another save may have run while ``also`` awaited
        except BaseException:
            tx.rollback()
            raise
        self._records[record.saga_id] = _Kept(record)
        tx.commit()

    def _check(self, record: SagaRecord) -> None:
        current = self._records.get(record.saga_id)
        actual = 0 if current is None else current.version
        if actual != record.version - 1:
            raise ConcurrencyError(f"saga {record.saga_id}", record.version - 1, actual)

    async def get(self, saga_id: str) -> SagaRecord:
        try:
            return self._records[saga_id].get()
        except KeyError:
            raise SagaNotFound(f"no saga instance {saga_id!r}") from None

    async def claim(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[SagaRecord]:
        out: list[SagaRecord] = []
        for kept in self._claimable(now):
            if len(out) >= limit:
                break
            kept.set_lease(owner, lease_until)
            out.append(kept.get())
        return out

    def _claimable(self, now: datetime) -> list[_Kept]:
        found = [
            k
            for k in self._records.values()
            if (r := k.record)[2] in ACTIVE_STATUSES
            and (r[15] is None or r[15] <= now)
            and (r[16] is None or r[16] <= now)
        ]
        found.sort(key=lambda k: k.record[5])
        return found

    async def find(
        self,
        *,
        saga_type: str | None = None,
        statuses: Sequence[SagaStatus] | None = None,
        stuck_at: datetime | None = None,
        limit: int = 100,
    ) -> list[SagaRecord]:
        pool = self._claimable(stuck_at) if stuck_at is not None else list(self._records.values())
        out = [
            k
            for k in pool
            if (saga_type is None or k.record[1] == saga_type)
            and (statuses is None or k.record[2] in statuses)
        ]
        out.sort(key=lambda k: k.record[5])
        return [k.get() for k in out[:limit]]
