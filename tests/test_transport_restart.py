"""The transport conformance suite's broker-restart case on Redis, NATS (both modes) and
RabbitMQ, each on a private server that tests/private_servers.py starts for the test class
and that the transport's ``features.restart`` hook kills and stops (the shared servers are
never touched)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from msdata.testing.conformance.transport import TransportRestartConformance
from msdata.transport import Transport
from private_servers import PrivateServer, open_private
from transport_factories import with_test_hooks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _with_restart(transport: Transport, server: PrivateServer, backend: str) -> None:
    """The restart hook, and the suite's other hooks (``abandon`` for the crash case)."""
    with_test_hooks(backend, transport)
    transport.features = dataclasses.replace(transport.features, restart=server.restart)


class _OnPrivateServer(TransportRestartConformance):
    kind = ""
    server: PrivateServer

    @pytest.fixture(autouse=True)
    def _server(self, tmp_path: Path) -> Iterator[None]:
        server = open_private(self.kind, tmp_path)
        try:
            self.server = server
            yield
        finally:
            server.close()


@pytest.mark.redis
class TestRedisRestart(_OnPrivateServer):
    kind = "redis"

    @asynccontextmanager
    async def make_transport(self) -> AsyncIterator[Transport]:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff

        from msdata.adapters.redis import RedisTransport

        client = aioredis.Redis.from_url(
            self.server.url,
            socket_timeout=2,
            socket_connect_timeout=0.5,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 2),
        )
        transport = RedisTransport(client, key_prefix="restart", claim_idle=0.5)
        _with_restart(transport, self.server, self.kind)
        try:
            yield transport
        finally:
            await transport.close()
            await client.aclose()


@pytest.mark.nats
class TestNatsRestart(_OnPrivateServer):
    kind = "nats"
    ordered = False

    @asynccontextmanager
    async def make_transport(self) -> AsyncIterator[Transport]:
        from msdata.adapters.nats import NatsTransport

        transport = NatsTransport.from_url(
            self.server.url, ack_wait=2.0, publish_timeout=2.0, ordered=self.ordered
        )
        _with_restart(transport, self.server, self.kind)
        try:
            yield transport
        finally:
            await transport.close()

    def assert_outage_seen(self, transport: Transport, publish_failures: int) -> None:
        # nats-py buffers publishes through a short outage: they may all be confirmed
        client = transport.client  # type: ignore[attr-defined]
        assert client is not None and client.stats["reconnects"] >= 2


class TestNatsRestartOrdered(TestNatsRestart):
    """``ordered=True``: a consumer per key partition, each pulling again after a restart."""

    ordered = True


@pytest.mark.rabbitmq
class TestRabbitMQRestart(_OnPrivateServer):
    kind = "rabbitmq"

    @asynccontextmanager
    async def make_transport(self) -> AsyncIterator[Transport]:
        import aio_pika

        from msdata.adapters.rabbitmq import RabbitMQTransport

        conn = await aio_pika.connect_robust(self.server.url, reconnect_interval=0.5)
        self.reconnects: list[object] = []
        conn.reconnect_callbacks.add(lambda *_: self.reconnects.append(1))
        transport = RabbitMQTransport(conn, publish_timeout=5.0)
        _with_restart(transport, self.server, self.kind)
        try:
            yield transport
        finally:
            await transport.close()
            await conn.close()

    def assert_outage_seen(self, transport: Transport, publish_failures: int) -> None:
        # a publish waits out a reopening channel up to publish_timeout and sends again: a
        # short restart may fail none, but the connection must have come back twice
        assert publish_failures > 0 or len(self.reconnects) >= 2, (
            f"the outage was not observed: {publish_failures} publishes failed, "
            f"{len(self.reconnects)} reconnects"
        )
