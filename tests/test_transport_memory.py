from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from msdata.adapters.memory import MemoryTransport
from msdata.testing.conformance.transport import TransportConformance
from msdata.transport import Transport
from transport_factories import with_test_hooks


class TestMemoryTransport(TransportConformance):
    arrival_timeout = 2.0
    quiet_period = 0.05

    def transport_url(self) -> str:
        return "memory://"

    @asynccontextmanager
    async def make_transport(self) -> AsyncIterator[Transport]:
        transport = with_test_hooks("memory", MemoryTransport())
        try:
            yield transport
        finally:
            await transport.close()

    @asynccontextmanager
    async def make_transport_with(self, **options: Any) -> AsyncIterator[Transport]:
        transport = with_test_hooks("memory", MemoryTransport(**options))
        try:
            yield transport
        finally:
            await transport.close()

    @asynccontextmanager
    async def make_transport_in(self, namespace: str) -> AsyncIterator[Transport]:
        transport = MemoryTransport(namespace=namespace)
        try:
            yield transport
        finally:
            await transport.close()


async def test_receive_with_full_prefetch_waits_for_room_instead_of_spinning() -> None:
    import asyncio
    import time

    from msdata.testing.conformance.transport import collect, make_messages

    t = MemoryTransport()
    async with t.subscribe("t", "g", prefetch=1) as sub:
        await t.publish("t", make_messages(2))
        (held,) = await collect(sub, 1, timeout=1, ack=False)
        started = time.monotonic()
        assert await sub.receive(10, timeout=0.2) == []
        assert time.monotonic() - started >= 0.15
        waiter = asyncio.create_task(sub.receive(10, timeout=5))
        await asyncio.sleep(0.05)
        await held.ack()  # frees the room: the waiting receive gets the next message
        (nxt,) = await asyncio.wait_for(waiter, 1)
        assert nxt.message.id != held.message.id
    await t.close()


def test_size_options_come_from_the_url_too() -> None:
    from msdata.urls import transport_from_url

    t = transport_from_url("memory://?max_message_bytes=100&max_held_bytes=1000")
    assert isinstance(t, MemoryTransport)
    assert (t.max_message_bytes, t.max_held_bytes) == (100, 1000)
    assert MemoryTransport.from_url("memory://").max_message_bytes is None
