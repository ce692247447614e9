from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from msdata.adapters.postgres import PostgresOutboxStore
from msdata.adapters.postgres.saga import PostgresSagaStore
from msdata.outbox.store import OutboxStore
from msdata.saga import SagaStore
from msdata.testing.conformance.saga import SagaStoreConformance
from store_helpers import opened, table_prefix

pytestmark = pytest.mark.postgres


class TestPostgresSagaStore(SagaStoreConformance):
    @pytest.fixture(autouse=True)
    def _url(self, postgres_url: str) -> None:
        self.url = postgres_url
        self.prefix = table_prefix()

    @asynccontextmanager
    async def make_store(self) -> AsyncIterator[SagaStore]:
        async with (
            opened(PostgresSagaStore(self.url, table_prefix=self.prefix), drop=True) as store,
            opened(PostgresOutboxStore(self.url, table_prefix=self.prefix), drop=True) as outbox,
        ):
            self._outbox = outbox
            yield store

    @asynccontextmanager
    async def open_again(self, store: SagaStore) -> AsyncIterator[SagaStore]:
        other = PostgresSagaStore(self.url, table_prefix=self.prefix)
        try:
            yield other
        finally:
            await other.close()

    def outbox_for(self, store: SagaStore) -> OutboxStore | None:
        return self._outbox
