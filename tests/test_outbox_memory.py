from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from msdata.adapters.memory.outbox import MemoryInboxStore, MemoryOutboxStore, MemoryTransaction
from msdata.outbox import InboxStore, OutboxRow, OutboxStore
from msdata.testing.outbox import InboxStoreConformance, OutboxStoreConformance


class MemoryHooks:
    async def begin(self, store: Any) -> MemoryTransaction:
        return store.begin()  # type: ignore[no-any-return]

    async def commit(self, tx: MemoryTransaction) -> None:
        tx.commit()

    async def rollback(self, tx: MemoryTransaction) -> None:
        tx.rollback()


class TestMemoryOutboxStore(MemoryHooks, OutboxStoreConformance):
    lease_seconds = 0.2

    @asynccontextmanager
    async def make_store(self) -> AsyncIterator[OutboxStore]:
        store = MemoryOutboxStore()
        try:
            yield store
        finally:
            await store.close()

    async def add(self, store: Any, tx: Any, rows: Sequence[OutboxRow]) -> None:
        store.append(tx, rows)


class TestMemoryInboxStore(MemoryHooks, InboxStoreConformance):
    @asynccontextmanager
    async def make_inbox_store(self) -> AsyncIterator[InboxStore]:
        yield MemoryInboxStore()

    async def record(self, store: Any, tx: Any, consumer: str, message_id: str) -> bool:
        return store.record(tx, consumer, message_id)  # type: ignore[no-any-return]
