from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import nats
import pytest
from nats.aio.client import Client

from msdata.adapters.nats import NatsTransport
from msdata.testing.services import require
from msdata.testing.transport import TransportConformance
from msdata.transport import Transport

pytestmark = pytest.mark.nats


async def delete_streams(nc: Client, prefix: str) -> None:
    """Remove every stream a test created (they all start with its own prefix)."""
    js = nc.jetstream()
    for info in await js.streams_info():
        if info.config.name.startswith(prefix):
            await js.delete_stream(info.config.name)


@asynccontextmanager
async def nats_transport(**options: object) -> AsyncIterator[NatsTransport]:
    nc = await nats.connect(require("nats"))
    prefix = f"T{uuid.uuid4().hex[:12]}_"
    transport = NatsTransport(nc, stream_prefix=prefix, **options)  # type: ignore[arg-type]
    try:
        yield transport
    finally:
        await transport.close()
        await delete_streams(nc, prefix)
        await nc.close()


class TestNatsTransport(TransportConformance):
    arrival_timeout = 10.0
    quiet_period = 0.5

    def make_transport(self) -> AsyncIterator[Transport]:  # type: ignore[override]
        return nats_transport(ack_wait=3.0)  # type: ignore[return-value]
