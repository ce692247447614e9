"""The in-memory inbox store: (consumer, message id) pairs recorded in a
:class:`MemoryTransaction`, visible at its commit."""

from __future__ import annotations

from datetime import datetime

from msdata.adapters.memory._db import MemoryDatabase, MemoryTransaction, transaction_of
from msdata.clock import SYSTEM_CLOCK, Clock
from msdata.errors import StoreError
from msdata.inbox.store import InboxStoreFeatures
from msdata.storage import Connection

__all__ = ["MemoryInboxStore"]


class MemoryInboxStore(MemoryDatabase):
    """The in-memory :class:`msdata.inbox.InboxStore`.

    A concurrent duplicate (the same pair recorded by another transaction that is still
    open) raises :class:`msdata.errors.StoreError`: the caller nacks, and the redelivery
    finds the pair committed (skip) or gone (the first transaction rolled back: apply).
    """

    features = InboxStoreFeatures(reads_clock=True)

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(clock=clock)
        self._done: dict[tuple[str, str], datetime] = {}
        self._open: dict[tuple[str, str], MemoryTransaction] = {}

    def record(self, conn: Connection, consumer: str, message_id: str) -> bool:
        tx = transaction_of(conn)
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
            self._done[pair] = self.clock.now()

        def end() -> None:
            self._open.pop(pair, None)

        tx.on_commit(commit)
        tx.on_end(end)
        return True

    async def record_async(self, conn: Connection, consumer: str, message_id: str) -> bool:
        return self.record(conn, consumer, message_id)

    async def purge(self, older_than: datetime) -> int:
        gone = [p for p, at in self._done.items() if at < older_than]
        for p in gone:
            del self._done[p]
        return len(gone)
