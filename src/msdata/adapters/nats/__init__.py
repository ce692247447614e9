"""NATS JetStream adapter: :class:`NatsTransport` (a stream per topic, a durable pull consumer
per group). Needs ``nats-py``: ``pip install "msdata[nats]"``."""

try:
    import nats  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the driver
    from msdata.errors import MissingDependencyError

    raise MissingDependencyError("nats-py", "nats") from e

from msdata.adapters.nats.transport import (
    KEY_HEADER,
    MSG_ID_HEADER,
    NatsDelivery,
    NatsSubscription,
    NatsTransport,
    consumer_name,
    stream_name,
    topic_of_stream,
)

__all__ = [
    "KEY_HEADER",
    "MSG_ID_HEADER",
    "NatsDelivery",
    "NatsSubscription",
    "NatsTransport",
    "consumer_name",
    "stream_name",
    "topic_of_stream",
]
