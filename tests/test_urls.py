from __future__ import annotations

import pytest

from msdata.adapters.memory import MemoryTransport
from msdata.errors import ConfigurationError
from msdata.urls import redact_url, transport_from_url


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


SECRET = "s3cr3t-pw"


def _entry_points() -> dict[str, object]:
    from msdata.adapters.memory import MemoryInboxStore, MemoryOutboxStore
    from msdata.adapters.nats import NatsTransport
    from msdata.adapters.postgres import PostgresOutboxStore
    from msdata.adapters.postgres._common import normalize_url
    from msdata.adapters.rabbitmq import RabbitMQTransport
    from msdata.adapters.redis import RedisTransport
    from msdata.adapters.sqlite import SqliteOutboxStore

    return {
        "transport_from_url": transport_from_url,
        "RedisTransport.from_url": RedisTransport.from_url,
        "RabbitMQTransport.from_url": RabbitMQTransport.from_url,
        "NatsTransport.from_url": NatsTransport.from_url,
        "PostgresOutboxStore.from_url": PostgresOutboxStore.from_url,
        "postgres DSN": normalize_url,
        "SqliteOutboxStore.from_url": SqliteOutboxStore.from_url,
        "MemoryTransport.from_url": MemoryTransport.from_url,
        "MemoryOutboxStore.from_url": MemoryOutboxStore.from_url,
        "MemoryInboxStore.from_url": MemoryInboxStore.from_url,
    }


@pytest.mark.parametrize(
    "entry",
    [
        "transport_from_url",
        "RedisTransport.from_url",
        "RabbitMQTransport.from_url",
        "NatsTransport.from_url",
        "PostgresOutboxStore.from_url",
        "postgres DSN",
        "SqliteOutboxStore.from_url",
        "MemoryTransport.from_url",
        "MemoryOutboxStore.from_url",
        "MemoryInboxStore.from_url",
    ],
)
@pytest.mark.parametrize(
    "url",
    [
        f"reddis://app:{SECRET}@db.internal:6379/0",
        f"amqps//app:{SECRET}@mq.internal/",  # the "//" mistyped as well
        f"natss://{SECRET}@n1:4222,natss://{SECRET}@n2:4222",  # a token as the userinfo
        f"postgress://app@db.internal/orders?sslmode=require&password={SECRET}",
    ],
)
def test_an_error_about_a_url_never_shows_its_password(entry: str, url: str) -> None:
    build = _entry_points()[entry]
    assert callable(build)
    with pytest.raises(ConfigurationError) as info:
        build(url)
    text = str(info.value)
    assert SECRET not in text
    assert "***" in text
    assert "internal" in text or "n1" in text  # the rest stays, so the error helps


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("amqp://guest:p@ss@h/", "amqp://guest:***@h/"),
        ("nats://tok@h:4222", "nats://***@h:4222"),
        ("nats://a:b@h1,nats://c:d@h2", "nats://a:***@h1,nats://c:***@h2"),
        (
            "postgresql://u@h/db?sslpassword=x&sslmode=require",
            "postgresql://***@h/db?sslpassword=***&sslmode=require",
        ),
        ("host=h user=u password='a b' dbname=d", "host=h user=u password=*** dbname=d"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("memory://", "memory://"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted
