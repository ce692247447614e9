"""In-memory saga store: for tests, demos and the benchmark. Nothing survives the process.

A save with ``also`` runs it on a fresh :class:`MemoryTransaction` (pass that to
``outbox.add`` with a :class:`MemoryOutboxStore`): the outbox rows become visible only if the
version check passes and the state is written."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from datetime import datetime
from itertools import chain
from typing import Any

from msdata.adapters.memory._db import MemoryDatabase, MemoryTransaction
from msdata.clock import SYSTEM_CLOCK, Clock
from msdata.errors import ConcurrencyError, SagaNotFound
from msdata.saga.store import (
    ACTIVE_STATUSES,
    AlsoInTransaction,
    HistoryEntry,
    SagaRecord,
    SagaStatus,
    SagaStoreFeatures,
    StepRun,
    check_data,
)

__all__ = ["MemorySagaStore"]


# A saved record is one tuple (the cheapest thing to build on every save): the record's
# fields, its active invocations as tuples, and history and ``done`` by reference and length
# (they only ever grow at their end, so the saved prefix never changes). A finished instance
# keeps its history as one flat tuple of the entries' fields and ``done`` as a tuple: the
# cyclic GC stops tracking those (tuples of times, strings and numbers), where it would go on
# traversing every history entry (a named tuple, always tracked) of every instance the store
# keeps, and each one kept would count towards the next collection.
_VERSION, _TYPE, _STATUS, _UPDATED, _LEASE_OWNER, _LEASE_UNTIL, _WAKE = 6, 1, 2, 5, 13, 14, 15
Kept = tuple[Any, ...]


_FINISHED = (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED)
_entry = tuple.__new__
_flat = chain.from_iterable
_FIELDS = len(HistoryEntry._fields)


def _keep(r: SagaRecord) -> Kept:
    history: Any = r.history
    done: Any = r.done
    status = r.status
    if status in _FINISHED:
        # concatenating is the cheaper for the few entries of most instances, not for many
        flat = sum(history, ()) if len(history) <= 16 else tuple(_flat(history))
        history, done = flat, tuple(done)
    runs = None
    active = r.active
    if active:
        runs = []
        for k, v in active.items():  # a loop, not a comprehension: no frame on 3.11
            runs.append(
                (
                    k,
                    v.purpose,
                    v.attempt,
                    v.state,
                    v.wake_at,
                    v.error,
                    v.ok,
                    v.reply,
                    v.sent,
                    v.first,
                )
            )
    compensation = r.compensation
    return (
        r.saga_id,
        r.saga_type,
        status,
        r.data,
        r.created_at,
        r.updated_at,
        r.version,
        r.position,
        runs,
        [g.copy() for g in compensation] if compensation else None,
        r.past_pivot,
        r.error,
        r.deadline,
        r.lease_owner,
        r.lease_until,
        r.wake_at,
        history,
        len(history),
        done,
        len(done),
    )


def _record(k: Kept, replies: dict[str, bytes] | None = None) -> SagaRecord:
    history, done = k[16], k[18]
    if type(history) is tuple:  # a finished instance
        history = [_entry(HistoryEntry, history[i : i + _FIELDS]) for i in range(0, k[17], _FIELDS)]
        done = list(done)
    else:
        history, done = history[: k[17]], done[: k[19]]
    return SagaRecord(
        k[0],
        k[1],
        k[2],
        k[3],
        k[4],
        k[5],
        k[6],
        k[7],
        done,
        {a[0]: StepRun(*a[1:]) for a in k[8]} if k[8] else {},
        [g.copy() for g in k[9]] if k[9] else [],
        k[10],
        k[11],
        k[12],
        k[13],
        k[14],
        k[15],
        history,
        replies.copy() if replies else {},
    )


class MemorySagaStore(MemoryDatabase):
    """A :class:`msdata.saga.SagaStore` in a dict; serves one event loop."""

    features = SagaStoreFeatures(async_connection=False, durable=False)

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(clock=clock)
        self._records: dict[str, Kept] = {}
        self._replies: dict[str, dict[str, bytes]] = {}  # saga id -> key -> reply

    async def save(self, record: SagaRecord, *, also: AlsoInTransaction | None = None) -> None:
        if record.data_checked is not record.data:  # once per data object (steps return new)
            check_data(record)  # EncodeError, as the SQL stores: NaN, a lone surrogate...
        if also is None:  # the check written out: this is the hot path of every saga
            records = self._records
            current = records.get(record.saga_id)
            if (0 if current is None else current[_VERSION]) != record.version - 1:
                self._check(record)  # raises
            records[record.saga_id] = _keep(record)
            if record.replies:
                self._applied(record)
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
        self._records[record.saga_id] = _keep(record)
        if record.replies:
            self._applied(record)
        tx.commit()

    def _applied(self, record: SagaRecord) -> None:
        pending = self._replies.get(record.saga_id)
        if pending:
            for key in record.replies:
                pending.pop(key, None)
            if not pending:
                del self._replies[record.saga_id]

    async def add_reply(self, saga_id: str, key: str, reply: bytes) -> bool:
        pending = self._replies.setdefault(saga_id, {})
        if key in pending:
            return False
        pending[key] = bytes(reply)
        return True

    def _check(self, record: SagaRecord) -> None:
        current = self._records.get(record.saga_id)
        actual = 0 if current is None else current[_VERSION]
        if actual != record.version - 1:
            raise ConcurrencyError(f"saga {record.saga_id}", record.version - 1, actual)

    async def get(self, saga_id: str) -> SagaRecord:
        return self.snapshot(saga_id)

    def snapshot(self, saga_id: str) -> SagaRecord:
        """:meth:`get` without awaiting (for tests and demos). SagaNotFound if unknown."""
        try:
            return _record(self._records[saga_id], self._replies.get(saga_id))
        except KeyError:
            raise SagaNotFound(f"no saga instance {saga_id!r}") from None

    async def claim(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[SagaRecord]:
        out: list[SagaRecord] = []
        records = self._records
        for kept in self._claimable(now):
            if len(out) >= limit:
                break
            f = list(kept)
            f[_LEASE_OWNER], f[_LEASE_UNTIL], f[_VERSION] = owner, lease_until, f[_VERSION] + 1
            records[f[0]] = claimed = tuple(f)
            out.append(_record(claimed, self._replies.get(f[0])))
        return out

    def _claimable(self, now: datetime, *, replies: bool = True) -> list[Kept]:
        pending = self._replies if replies else {}
        found = [
            k
            for k in self._records.values()
            if k[_STATUS] in ACTIVE_STATUSES
            and (k[_LEASE_UNTIL] is None or k[_LEASE_UNTIL] <= now)
            and (k[_WAKE] is None or k[_WAKE] <= now or k[0] in pending)
        ]
        found.sort(key=lambda k: k[_UPDATED])
        return found

    async def find(
        self,
        *,
        saga_type: str | None = None,
        statuses: Sequence[SagaStatus] | None = None,
        stuck_at: datetime | None = None,
        limit: int = 100,
    ) -> list[SagaRecord]:
        pool = (
            self._claimable(stuck_at, replies=False)
            if stuck_at is not None
            else list(self._records.values())
        )
        out = [
            k
            for k in pool
            if (saga_type is None or k[_TYPE] == saga_type)
            and (statuses is None or k[_STATUS] in statuses)
        ]
        out.sort(key=lambda k: k[_UPDATED])
        return [_record(k) for k in out[:limit]]
