"""The idempotency conformance suite on Redis (each test its own key prefix, deleted after)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as aioredis

from msdata.adapters.redis.idempotency import RedisIdempotencyStore
from msdata.idempotency import IdempotencyStore
from msdata.testing.conformance.idempotency import IdempotencyStoreConformance

pytestmark = pytest.mark.redis


class TestRedisIdempotencyStore(IdempotencyStoreConformance):
    @pytest.fixture(autouse=True)
    def _url(self, redis_url: str) -> None:
        self.url = redis_url

    @asynccontextmanager
    async def make_store(self) -> AsyncIterator[IdempotencyStore]:
        prefix = f"test:idem:{uuid.uuid4().hex[:10]}:"
        client = aioredis.Redis.from_url(self.url, decode_responses=False)
        store = RedisIdempotencyStore(client, key_prefix=prefix)
        try:
            yield store
        finally:
            keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()
