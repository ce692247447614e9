"""In-memory saga store: for tests, demos and the benchmark. Nothing survives the process.

A save with ``also`` runs it on a fresh :class:`MemoryTransaction` (pass that to
``outbox.add`` with a :class:`MemoryOutboxStore`): the outbox rows become visible only if the
version check passes and the state is written."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from datetime import datetime

from msdata.adapters.memory.outbox import MemoryTransaction
from msdata.errors import ConcurrencyError, SagaNotFound
from msdata.saga.store import (
    ACTIVE_STATUSES,
    AlsoInTransaction,
    SagaRecord,
    SagaStatus,
    SagaStoreFeatures,
)

__all__ = ["MemorySagaStore"]


class MemorySagaStore:
    """A :class:`msdata.saga.SagaStore` in a dict; serves one event loop."""

    features = SagaStoreFeatures(async_connection=False, durable=False)

    def __init__(self) -> None:
        self._records: dict[str, SagaRecord] = {}

    @classmethod
    def from_url(cls, url: str = "memory://") -> MemorySagaStore:
        return cls()

    async def save(self, record: SagaRecord, *, also: AlsoInTransaction | None = None) -> None:
        if also is None:
            self._check(record)
            self._records[record.saga_id] = record.copy()
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
        self._records[record.saga_id] = record.copy()
        tx.commit()

    def _check(self, record: SagaRecord) -> None:
        current = self._records.get(record.saga_id)
        actual = 0 if current is None else current.version
        if actual != record.version - 1:
            raise ConcurrencyError(f"saga {record.saga_id}", record.version - 1, actual)

    async def get(self, saga_id: str) -> SagaRecord:
        try:
            return self._records[saga_id].copy()
        except KeyError:
            raise SagaNotFound(f"no saga instance {saga_id!r}") from None

    async def claim(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[SagaRecord]:
        out: list[SagaRecord] = []
        for rec in self._claimable(now):
            if len(out) >= limit:
                break
            rec.lease_owner = owner
            rec.lease_until = lease_until
            rec.version += 1
            out.append(rec.copy())
        return out

    def _claimable(self, now: datetime) -> list[SagaRecord]:
        found = [
            r
            for r in self._records.values()
            if r.status in ACTIVE_STATUSES
            and (r.lease_until is None or r.lease_until <= now)
            and (r.wake_at is None or r.wake_at <= now)
        ]
        found.sort(key=lambda r: r.updated_at)
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
            r
            for r in pool
            if (saga_type is None or r.saga_type == saga_type)
            and (statuses is None or r.status in statuses)
        ]
        out.sort(key=lambda r: r.updated_at)
        return [r.copy() for r in out[:limit]]

    def schema_sql(self) -> str:
        return ""

    async def create_schema(self) -> None:
        return None

    async def close(self) -> None:
        return None
