"""The idempotency conformance suite on Redis (each test its own key prefix, deleted after)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as aioredis

from msdata.adapters.redis.idempotency import RedisIdempotencyStore
from msdata.errors import ConfigurationError
from msdata.idempotency import IdempotencyStore
from msdata.testing.conformance.idempotency import IdempotencyStoreConformance
from msdata.urls import store_from_url

pytestmark = pytest.mark.redis


class TestRedisIdempotencyStore(IdempotencyStoreConformance):
    @pytest.fixture(autouse=True)
    def _url(self, redis_url: str) -> None:
        self.url = redis_url

    def store_url(self) -> str:
        return self.url

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


def test_an_option_redis_py_does_not_take_is_refused_when_built(redis_url: str) -> None:
    """``?namespace=`` (the transport's, not this store's: its own is ``key_prefix``) and
    misspelt options reached redis-py, which failed every claim with a raw TypeError."""
    sep = "&" if "?" in redis_url else "?"
    with pytest.raises(ConfigurationError, match="namespace"):
        store_from_url("idempotency", f"{redis_url}{sep}namespace=shop")
    with pytest.raises(ConfigurationError, match="socket_timout"):
        store_from_url("idempotency", redis_url, socket_timout=1)
    store = store_from_url("idempotency", f"{redis_url}{sep}socket_timeout=2")
    assert isinstance(store, RedisIdempotencyStore)
