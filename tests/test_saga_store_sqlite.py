from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from msdata.adapters.sqlite import SqliteOutboxStore
from msdata.adapters.sqlite.saga import SqliteSagaStore
from msdata.outbox.store import OutboxStore
from msdata.saga import SagaStore
from msdata.testing.conformance.saga import SagaStoreConformance


class TestSqliteSagaStore(SagaStoreConformance):
    @pytest.fixture(autouse=True)
    def _db(self, tmp_path: Path) -> None:
        self.path = tmp_path / "sagas.db"

    @asynccontextmanager
    async def make_store(self) -> AsyncIterator[SagaStore]:
        store = SqliteSagaStore(self.path)
        await store.create_schema()
        self._outbox = SqliteOutboxStore(self.path)
        await self._outbox.create_schema()
        try:
            yield store
        finally:
            await store.close()
            await self._outbox.close()

    @asynccontextmanager
    async def open_again(self, store: SagaStore) -> AsyncIterator[SagaStore]:
        other = SqliteSagaStore(self.path)
        try:
            yield other
        finally:
            await other.close()

    def outbox_for(self, store: SagaStore) -> OutboxStore | None:
        return self._outbox
