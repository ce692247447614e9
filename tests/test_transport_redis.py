from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as aioredis

from msdata.adapters.redis import RedisTransport
from msdata.testing.services import require
from msdata.testing.transport import TransportConformance
from msdata.transport import Transport

pytestmark = pytest.mark.redis


async def _delete_prefix(client: aioredis.Redis, prefix: str) -> None:
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)


@asynccontextmanager
async def redis_transport(**options: object) -> AsyncIterator[RedisTransport]:
    """A transport on the shared Redis under a fresh key prefix, deleted afterwards."""
    url = require("redis")
    prefix = f"msdata-test-{uuid.uuid4().hex[:12]}"
    client = aioredis.Redis.from_url(url)
    options.setdefault("claim_idle", 0.4)
    transport = RedisTransport(client, key_prefix=prefix, **options)  # type: ignore[arg-type]
    try:
        yield transport
    finally:
        await transport.close()
        await _delete_prefix(client, prefix)
        await client.aclose()


class TestRedisTransport(TransportConformance):
    arrival_timeout = 5.0
    quiet_period = 0.3

    def make_transport(self) -> AsyncIterator[Transport]:  # type: ignore[override]
        return redis_transport()  # type: ignore[return-value]
