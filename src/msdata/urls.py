"""``from_url`` conveniences: pick the adapter by the URL's scheme.

Each adapter is also built from explicit objects (a client, a pool); these only save the
wiring. The adapter's driver is imported when its scheme is used, never before, and a
missing one raises :class:`msdata.errors.MissingDependencyError` naming the extra.

- transports: ``memory://``, ``redis://`` / ``rediss://`` / ``unix://``, ``amqp://`` /
  ``amqps://``, ``nats://`` / ``tls://``
- stores (:func:`store_from_url`): ``memory://``, ``sqlite:///relative.db`` /
  ``sqlite:////absolute.db``, ``postgresql://…`` / ``postgres://…`` (also
  ``postgresql+<driver>://…``), for every port in :data:`STORES`.
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlsplit

from msdata.errors import ConfigurationError
from msdata.transport import Transport

__all__ = ["STORES", "store_from_url", "transport_from_url"]

#: (port, backend) -> "module:Class" of the store; the class's ``from_url(url, **options)``
#: builds it. A new port adds one line per backend here; the module is imported only when
#: its URL is used.
STORES: dict[tuple[str, str], str] = {
    ("outbox", "memory"): "msdata.adapters.memory.outbox:MemoryOutboxStore",
    ("outbox", "sqlite"): "msdata.adapters.sqlite.outbox:SqliteOutboxStore",
    ("outbox", "postgresql"): "msdata.adapters.postgres.outbox:PostgresOutboxStore",
    ("inbox", "memory"): "msdata.adapters.memory.inbox:MemoryInboxStore",
    ("inbox", "sqlite"): "msdata.adapters.sqlite.inbox:SqliteInboxStore",
    ("inbox", "postgresql"): "msdata.adapters.postgres.inbox:PostgresInboxStore",
    ("eventstore", "memory"): "msdata.adapters.memory.eventstore:MemoryEventStore",
    ("eventstore", "sqlite"): "msdata.adapters.sqlite.eventstore:SqliteEventStore",
    ("eventstore", "postgresql"): "msdata.adapters.postgres.eventstore:PostgresEventStore",
    ("checkpoints", "memory"): "msdata.adapters.memory.checkpoints:MemoryCheckpointStore",
    ("checkpoints", "sqlite"): "msdata.adapters.sqlite.checkpoints:SqliteCheckpointStore",
    ("checkpoints", "postgresql"): "msdata.adapters.postgres.checkpoints:PostgresCheckpointStore",
}

#: URL scheme (before any ``+driver``) -> backend name in :data:`STORES`
_STORE_SCHEMES = {
    "memory": "memory",
    "sqlite": "sqlite",
    "postgresql": "postgresql",
    "postgres": "postgresql",
}


def _redacted(url: str) -> str:
    """``url`` without its user name and password, for error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return parts._replace(netloc=f"***@{host}").geturl()


def store_from_url(port: str, url: str, **options: Any) -> Any:
    """The store for ``port`` (``"outbox"``, ``"inbox"``, … see :data:`STORES`) on the
    database at ``url``; ``options`` go to the store class's ``from_url`` (e.g.
    ``table_prefix``, ``schema``). The store connects on first use.

    ``memory://`` (a new, empty store), ``sqlite:///relative.db`` or
    ``sqlite:////absolute.db`` (an in-memory SQLite database is refused: the store opens its
    own connection), ``postgresql://user@host/db`` (or ``postgres://``,
    ``postgresql+psycopg://``). ConfigurationError for an unknown port or scheme (the
    message never shows the URL's credentials); MissingDependencyError, naming the extra,
    when the backend's driver is not installed."""
    scheme = url.split("://", 1)[0].partition("+")[0].lower() if "://" in url else ""
    backend = _STORE_SCHEMES.get(scheme)
    if backend is None:
        raise ConfigurationError(
            f"no store for {_redacted(url)!r}: use memory://, sqlite:///path.db or postgresql://…"
        )
    target = STORES.get((port, backend))
    if target is None:
        ports = sorted({p for p, b in STORES if b == backend})
        raise ConfigurationError(
            f"no {port!r} store on {backend}: the ports with a store there are {ports}"
        )
    module, _, name = target.partition(":")
    cls = getattr(importlib.import_module(module), name)
    try:
        return cls.from_url(url, **options)
    except ConfigurationError as e:
        # an adapter's message may quote the URL: never with its credentials
        redacted = _redacted(url)
        if redacted != url and url in str(e):
            raise ConfigurationError(str(e).replace(url, redacted)) from None
        raise


def transport_from_url(url: str, **options: Any) -> Transport:
    """A transport for ``url``; ``options`` go to the adapter's ``from_url``."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "memory":
        from msdata.adapters.memory import MemoryTransport

        if options:
            raise ConfigurationError(f"memory:// takes no options, got {sorted(options)}")
        return MemoryTransport.from_url(url)
    if scheme in ("redis", "rediss", "unix"):
        from msdata.adapters.redis import RedisTransport

        return RedisTransport.from_url(url, **options)
    if scheme in ("amqp", "amqps"):
        from msdata.adapters.rabbitmq import RabbitMQTransport

        return RabbitMQTransport.from_url(url, **options)
    if scheme in ("nats", "tls"):
        from msdata.adapters.nats import NatsTransport

        return NatsTransport.from_url(url, **options)
    raise ConfigurationError(
        f"no transport for {url!r}: use memory://, redis://, amqp:// or nats://"
    )
