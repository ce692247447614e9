"""Redis adapters: :class:`RedisTransport` (Streams) and :class:`RedisIdempotencyStore`
(``pip install "msdata[redis]"``)."""

try:
    import redis.asyncio  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    from msdata.errors import MissingDependencyError

    raise MissingDependencyError("redis", "redis") from e

from msdata.adapters.redis.idempotency import RedisIdempotencyStore
from msdata.adapters.redis.transport import (
    DEFAULT_MAX_HELD_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    FOREIGN_ENTRY_HEADER,
    RedisDelivery,
    RedisSubscription,
    RedisTransport,
)

__all__ = [
    "DEFAULT_MAX_HELD_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "FOREIGN_ENTRY_HEADER",
    "RedisDelivery",
    "RedisIdempotencyStore",
    "RedisSubscription",
    "RedisTransport",
]
