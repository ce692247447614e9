from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from msdata.adapters.memory import MemoryTransport
from msdata.testing.transport import TransportConformance
from msdata.transport import Transport


class TestMemoryTransport(TransportConformance):
    arrival_timeout = 2.0
    quiet_period = 0.05

    @asynccontextmanager
    async def make_transport(self) -> AsyncIterator[Transport]:
        transport = MemoryTransport()
        try:
            yield transport
        finally:
            await transport.close()
