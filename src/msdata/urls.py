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
import re
from typing import Any

from msdata.errors import ConfigurationError
from msdata.transport import Transport

__all__ = [
    "DATABASES",
    "STORES",
    "redact_url",
    "store_backend",
    "store_from_url",
    "transport_from_url",
]

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
    ("saga", "memory"): "msdata.adapters.memory.saga:MemorySagaStore",
    ("saga", "sqlite"): "msdata.adapters.sqlite.saga:SqliteSagaStore",
    ("saga", "postgresql"): "msdata.adapters.postgres.saga:PostgresSagaStore",
    ("eventstore", "memory"): "msdata.adapters.memory.eventstore:MemoryEventStore",
    ("eventstore", "sqlite"): "msdata.adapters.sqlite.eventstore:SqliteEventStore",
    ("eventstore", "postgresql"): "msdata.adapters.postgres.eventstore:PostgresEventStore",
    ("checkpoints", "memory"): "msdata.adapters.memory.checkpoints:MemoryCheckpointStore",
    ("checkpoints", "sqlite"): "msdata.adapters.sqlite.checkpoints:SqliteCheckpointStore",
    ("checkpoints", "postgresql"): "msdata.adapters.postgres.checkpoints:PostgresCheckpointStore",
    ("idempotency", "memory"): "msdata.adapters.memory.idempotency:MemoryIdempotencyStore",
    ("idempotency", "sqlite"): "msdata.adapters.sqlite.idempotency:SqliteIdempotencyStore",
    ("idempotency", "postgresql"): "msdata.adapters.postgres.idempotency:PostgresIdempotencyStore",
    ("idempotency", "redis"): "msdata.adapters.redis.idempotency:RedisIdempotencyStore",
}

#: URL scheme (before any ``+driver``) -> backend name in :data:`STORES`
_STORE_SCHEMES = {
    "memory": "memory",
    "sqlite": "sqlite",
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "redis": "redis",
    "rediss": "redis",
}

#: the backends that are databases (a service's own, the command line's)
DATABASES = frozenset({"memory", "sqlite", "postgresql"})


def store_backend(url: str) -> str | None:
    """The backend a store URL names, by its scheme before any ``+driver``: ``"memory"``,
    ``"sqlite"``, ``"postgresql"`` (also ``postgres://``) or ``"redis"`` (also
    ``rediss://``); None for any other scheme or a string that is not a URL. The one
    reading of a database URL's scheme (stores, :class:`~msdata.Service`, the command
    line)."""
    scheme = url.split("://", 1)[0].partition("+")[0].lower() if "://" in url else ""
    return _STORE_SCHEMES.get(scheme)


# userinfo: after "//" (or at the start, for a URL whose "//" was mistyped) up to the last "@"
# before the host ends; secrets in a query string or a libpq key=value DSN
_USERINFO = re.compile(r"(^|//)([^/?#\s]*)@")
_SECRET_PARAM = re.compile(
    r"(?i)((?:^|[?&;\s])[\w.-]*(?:pass|pwd|secret|token|key|auth|credential)[\w.-]*\s*=\s*)"
    r"('[^']*'|[^&;#\s]*)"
)
_REDACTED = "***"


def redact_url(url: str) -> str:
    """``url`` with its secrets replaced by ``***``, for errors, log lines and reprs.

    A password (``user:***@host``), a userinfo without a password (``***@host``: NATS and
    others read it as a token), and the values of query or key=value parameters whose name
    says secret (``password=``, ``sslpassword=``, ``token=``, ``auth_key=``...) are replaced.
    Works on malformed URLs too (a mistyped scheme is when an error shows the URL), and on
    several comma-separated URLs. Anything else is kept, so the error stays useful.
    """

    def userinfo(m: re.Match[str]) -> str:
        user, colon, _ = m.group(2).partition(":")
        return f"{m.group(1)}{user}:{_REDACTED}@" if colon else f"{m.group(1)}{_REDACTED}@"

    return _SECRET_PARAM.sub(rf"\1{_REDACTED}", _USERINFO.sub(userinfo, url))


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
    backend = store_backend(url)
    if backend is None:
        raise ConfigurationError(
            f"no store for {redact_url(url)!r}: use memory://, sqlite:///path.db or postgresql://…"
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
        redacted = redact_url(url)
        if redacted != url and url in str(e):
            raise ConfigurationError(str(e).replace(url, redacted)) from None
        raise


def transport_from_url(url: str, **options: Any) -> Transport:
    """A transport for ``url``; ``options`` go to the adapter's ``from_url``."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "memory":
        from msdata.adapters.memory import MemoryTransport

        return MemoryTransport.from_url(url, **options)
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
        f"no transport for {redact_url(url)!r}: use memory://, redis://, amqp:// or nats://"
    )
