from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from msdata.adapters.memory.outbox import MemoryOutboxStore
from msdata.adapters.memory.saga import MemorySagaStore
from msdata.outbox.store import OutboxStore
from msdata.saga import SagaStore
from msdata.testing.conformance.saga import SagaStoreConformance


class TestMemorySagaStore(SagaStoreConformance):
    @asynccontextmanager
    async def make_store(self) -> AsyncIterator[SagaStore]:
        store = MemorySagaStore()
        self._outbox = MemoryOutboxStore()
        yield store

    def outbox_for(self, store: SagaStore) -> OutboxStore | None:
        return self._outbox
