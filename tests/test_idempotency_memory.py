"""The idempotency conformance suite on the memory store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from msdata.adapters.memory import MemoryTransaction
from msdata.adapters.memory.idempotency import MemoryIdempotencyStore
from msdata.idempotency import IdempotencyStore
from msdata.testing.conformance.idempotency import IdempotencyStoreConformance


class TestMemoryIdempotencyStore(IdempotencyStoreConformance):
    @asynccontextmanager
    async def make_store(self) -> AsyncIterator[IdempotencyStore]:
        yield MemoryIdempotencyStore()

    def store_url(self) -> str:
        return "memory://"

    async def begin(self, store: Any) -> Any:
        return MemoryTransaction()

    async def commit(self, conn: Any) -> None:
        conn.commit()

    async def rollback(self, conn: Any) -> None:
        conn.rollback()
