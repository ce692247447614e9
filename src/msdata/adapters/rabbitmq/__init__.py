"""RabbitMQ adapters (``pip install "msdata[rabbitmq]"``): :class:`RabbitMQTransport`."""

try:
    import aio_pika  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the installed extras
    from msdata.errors import MissingDependencyError

    raise MissingDependencyError("aio-pika", "rabbitmq") from e

from msdata.adapters.rabbitmq.transport import (
    FEATURES,
    ORDERED_FEATURES,
    RabbitMQDelivery,
    RabbitMQSubscription,
    RabbitMQTransport,
)

__all__ = [
    "FEATURES",
    "ORDERED_FEATURES",
    "RabbitMQDelivery",
    "RabbitMQSubscription",
    "RabbitMQTransport",
]
