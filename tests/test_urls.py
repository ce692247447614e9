from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from msdata.adapters.memory import MemoryTransport
from msdata.adapters.sqlite import SqliteInboxStore, SqliteOutboxStore
from msdata.errors import ConfigurationError, MissingDependencyError
from msdata.testing import FakeClock
from msdata.urls import STORES, redact_url, store_from_url, transport_from_url


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


# -- stores ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("port", "cls"), [("outbox", "MemoryOutboxStore"), ("inbox", "MemoryInboxStore")]
)
async def test_memory_url_gives_a_new_memory_store_per_call(port: str, cls: str) -> None:
    a, b = store_from_url(port, "memory://"), store_from_url(port, "memory://")
    assert type(a).__name__ == cls and a is not b
    await a.close()
    await b.close()


async def test_memory_store_options_reach_the_constructor() -> None:
    clock = FakeClock()
    store = store_from_url("outbox", "memory://", clock=clock)
    assert store.clock is clock


@pytest.mark.parametrize(
    ("port", "cls"), [("outbox", SqliteOutboxStore), ("inbox", SqliteInboxStore)]
)
async def test_sqlite_url_gives_a_store_on_that_file(
    tmp_path: Path, port: str, cls: type[Any]
) -> None:
    path = tmp_path / "orders.db"
    store = store_from_url(port, f"sqlite:///{path}", table_prefix="svc_")
    assert isinstance(store, cls)
    assert store.path == str(path) and store.table_prefix == "svc_"
    await store.create_schema()
    await store.close()
    with sqlite3.connect(path) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert f"svc_{port}" in names


@pytest.mark.parametrize("url", ["sqlite://:memory:", "sqlite:///:memory:", "sqlite:///"])
def test_sqlite_in_memory_databases_are_refused(url: str) -> None:
    # the store opens its own connection, which would see another, empty database
    with pytest.raises(ConfigurationError):
        store_from_url("outbox", url)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://root@127.0.0.1:5432/test",
        "postgres://root@127.0.0.1:5432/test",
        "postgresql+psycopg://root@127.0.0.1:5432/test",
    ],
)
@pytest.mark.parametrize("port", ["outbox", "inbox"])
async def test_postgres_urls_give_a_store_without_connecting(url: str, port: str) -> None:
    pytest.importorskip("asyncpg")
    store = store_from_url(port, url, schema="urls_test")
    assert type(store).__module__ == f"msdata.adapters.postgres.{port}"
    assert '"urls_test".' in store.table
    await store.close()  # nothing was opened


@pytest.mark.parametrize("url", ["kafka://x", "orders.db", "redis://127.0.0.1", "http://x"])
def test_store_urls_of_unknown_schemes_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError):
        store_from_url("outbox", url)


def test_an_unknown_port_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ConfigurationError, match="outbox"):
        store_from_url("sagas", "memory://")


@pytest.mark.parametrize(
    ("port", "url"),
    [
        ("outbox", "mysql://admin:s3cret-pw@db.internal:3306/orders"),
        ("sagas", "postgresql://admin:s3cret-pw@db.internal:5432/orders"),
    ],
)
def test_errors_never_show_the_password(port: str, url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        store_from_url(port, url)
    assert "s3cret-pw" not in str(info.value)
    assert "s3cret-pw" not in repr(info.value)


def test_every_registered_store_class_exists_and_builds_from_a_url() -> None:
    import importlib

    for (_port, _backend), target in STORES.items():
        module, _, name = target.partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except MissingDependencyError:  # pragma: no cover - a backend's extra is missing
            continue
        assert callable(getattr(cls, "from_url", None)), target


SECRET = "s3cr3t-pw"


def _entry_points() -> dict[str, object]:
    from msdata.adapters.memory import MemoryInboxStore, MemoryOutboxStore
    from msdata.adapters.nats import NatsTransport
    from msdata.adapters.postgres import PostgresOutboxStore
    from msdata.adapters.postgres._db import normalize_url
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
        "store_from_url": lambda url: store_from_url("outbox", url),
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
        "store_from_url",
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
    text = f"{info.value} {info.value!r}"
    assert SECRET not in text
    if "internal" in text or "n1" in text:  # the URL is shown: redacted, the rest kept
        assert "***" in text


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


_MEMORY_PORTS = sorted(port for port, backend in STORES if backend == "memory")


@pytest.mark.parametrize("port", _MEMORY_PORTS)
async def test_memory_stores_accept_and_ignore_the_sql_options(port: str) -> None:
    # switching a service's store URL to memory:// (in tests) keeps its options working
    store = store_from_url(port, "memory://", table_prefix="svc_", schema="orders")
    await store.close()


@pytest.mark.parametrize("port", _MEMORY_PORTS)
def test_memory_stores_refuse_an_unknown_option_by_name(port: str) -> None:
    with pytest.raises(ConfigurationError, match="pool_size"):
        store_from_url(port, "memory://", pool_size=5)
    with pytest.raises(ConfigurationError, match="prefix"):
        store_from_url(port, "memory://", table_prefix="bad; drop")


@pytest.mark.parametrize("port", _MEMORY_PORTS)
def test_memory_stores_refuse_a_url_option(port: str) -> None:
    """``memory://?foo=1`` was accepted: a memory store takes no URL options."""
    with pytest.raises(ConfigurationError, match="'foo'"):
        store_from_url(port, "memory://?foo=1")


@pytest.mark.parametrize("port", sorted({p for p, b in STORES if b == "sqlite"}))
def test_sqlite_stores_refuse_the_postgresql_schema_option_by_name(
    port: str, tmp_path: Path
) -> None:
    """``schema=`` (a PostgreSQL option) on a SQLite store raised a raw TypeError."""
    with pytest.raises(ConfigurationError, match="does not take schema"):
        store_from_url(port, f"sqlite:///{tmp_path}/s.db", schema="x")
