from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from msdata.adapters.postgres import PostgresOutboxStore
from msdata.adapters.postgres.saga import PostgresSagaStore
from msdata.outbox.store import OutboxStore
from msdata.saga import SagaStore
from msdata.testing.conformance.saga import SagaStoreConformance

pytestmark = pytest.mark.postgres


class TestPostgresSagaStore(SagaStoreConformance):
    @pytest.fixture(autouse=True)
    def _url(self, postgres_url: str) -> None:
        self.url = postgres_url
        self.prefix = f"t{uuid.uuid4().hex[:10]}_"

    @asynccontextmanager
    async def make_store(self) -> AsyncIterator[SagaStore]:
        store = PostgresSagaStore(self.url, table_prefix=self.prefix)
        await store.create_schema()
        self._outbox = PostgresOutboxStore(self.url, table_prefix=self.prefix)
        await self._outbox.create_schema()
        try:
            yield store
        finally:
            await store.drop_schema()
            await self._outbox.drop_schema()
            await store.close()
            await self._outbox.close()

    @asynccontextmanager
    async def open_again(self, store: SagaStore) -> AsyncIterator[SagaStore]:
        other = PostgresSagaStore(self.url, table_prefix=self.prefix)
        try:
            yield other
        finally:
            await other.close()

    def outbox_for(self, store: SagaStore) -> OutboxStore | None:
        return self._outbox
