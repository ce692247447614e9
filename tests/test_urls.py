from __future__ import annotations

import pytest

from msdata.adapters.memory import MemoryTransport
from msdata.errors import ConfigurationError
from msdata.urls import transport_from_url


async def test_memory_url_gives_a_memory_transport() -> None:
    t = transport_from_url("memory://")
    assert isinstance(t, MemoryTransport)
    await t.close()


@pytest.mark.parametrize(
    ("url", "module"),
    [
        ("redis://127.0.0.1:6379/0", "msdata.adapters.redis"),
        ("amqp://guest:guest@127.0.0.1:5672/", "msdata.adapters.rabbitmq"),
        ("nats://127.0.0.1:4222", "msdata.adapters.nats"),
    ],
)
async def test_broker_urls_pick_their_adapter_without_connecting(url: str, module: str) -> None:
    t = transport_from_url(url)
    assert type(t).__module__.startswith(module)
    await t.close()


@pytest.mark.parametrize("url", ["kafka://x", "orders.db", "http://x"])
def test_unknown_schemes_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError):
        transport_from_url(url)
