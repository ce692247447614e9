"""The idempotency conformance suite on Redis (each test its own key prefix, deleted after)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from msdata.adapters.redis.idempotency import RedisIdempotencyStore
from msdata.errors import ConfigurationError, StoreError
from msdata.idempotency import IdempotencyKeys, IdempotencyStore
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


@pytest.mark.parametrize("what", ["password", "database"])
async def test_a_server_that_refuses_the_setup_is_named_never_the_password(
    redis_url: str, what: str
) -> None:
    """Wrong credentials or a database out of range: the StoreError names the server's
    address (it said only ``AuthenticationError: invalid username-password pair``), never
    the password."""
    url = urlsplit(redis_url)
    host, port = url.hostname or "127.0.0.1", url.port or 6379
    password = "s3cret-idem-pw"
    if what == "password":
        store_url = f"redis://msdata:{password}@{host}:{port}/0"
    else:
        store_url = f"redis://{host}:{port}/99"
    store = store_from_url("idempotency", store_url)
    keys = IdempotencyKeys(store, lease_seconds=30)

    @keys.idempotent(key="k", scope="s")
    async def effect(s: str, k: str) -> int:
        return 1

    try:
        with pytest.raises(StoreError) as failed:
            await effect("cust", k=f"key-{uuid.uuid4().hex}")
    finally:
        await store.close()
    text = str(failed.value)
    assert f"{host}:{port}" in text, text
    assert password not in text
