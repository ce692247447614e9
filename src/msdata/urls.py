"""``from_url`` conveniences: pick the adapter by the URL's scheme.

Each adapter is also built from explicit objects (a client, a pool); these only save the
wiring. The adapter's driver is imported when its scheme is used, never before, and a
missing one raises :class:`msdata.errors.MissingDependencyError` naming the extra.

- transports: ``memory://``, ``redis://`` / ``rediss://`` / ``unix://``, ``amqp://`` /
  ``amqps://``, ``nats://`` / ``tls://``
"""

from __future__ import annotations

from typing import Any

from msdata.errors import ConfigurationError
from msdata.transport import Transport

__all__ = ["transport_from_url"]


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
