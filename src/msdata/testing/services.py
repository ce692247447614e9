"""Finding the real servers the adapter tests talk to.

A test that needs a server calls :func:`require` (or uses the fixtures in the project's
``tests/conftest.py``). Without the server the test is skipped with a reason that names it;
with ``MSDATA_REQUIRE_SERVICES=1`` in the environment (as CI sets it) it fails instead.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import pytest

__all__ = ["SERVICES", "Service", "require"]


@dataclass(frozen=True)
class Service:
    name: str
    host: str
    port: int
    url: str


SERVICES = {
    "postgres": Service(
        "PostgreSQL", "127.0.0.1", 5432, "postgresql://postgres@127.0.0.1:5432/test"
    ),
    "redis": Service("Redis", "127.0.0.1", 6379, "redis://127.0.0.1:6379/0"),
    "rabbitmq": Service("RabbitMQ", "127.0.0.1", 5672, "amqp://guest:guest@127.0.0.1:5672/"),
    "nats": Service("NATS JetStream", "127.0.0.1", 4222, "nats://127.0.0.1:4222"),
}

_reachable: dict[str, bool] = {}


def _is_up(service: Service) -> bool:
    try:
        with socket.create_connection((service.host, service.port), timeout=1.0):
            return True
    except OSError:
        return False


def require(key: str) -> str:
    """The URL of server ``key`` (postgres, redis, rabbitmq, nats), or skip/fail the test."""
    service = SERVICES[key]
    if key not in _reachable:
        _reachable[key] = _is_up(service)
    if not _reachable[key]:
        reason = f"{service.name} is not reachable at {service.host}:{service.port}"
        if os.environ.get("MSDATA_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{reason} and MSDATA_REQUIRE_SERVICES=1", pytrace=False)
        pytest.skip(reason)
    return service.url
