"""Finding the real servers the tests talk to (this repository's CI plumbing, not the library).

A test that needs a server uses the fixtures in ``tests/conftest.py`` (``postgres_url``,
``redis_url``, ``amqp_url``, ``nats_url``) or calls :func:`require`. Without the server the
test is skipped with a reason that names it; with ``MSDATA_REQUIRE_SERVICES=1`` in the
environment (as ``.ci/run`` sets it) it fails instead.

Each server is found at its standard loopback address unless an environment variable points
elsewhere (see tests/README.md):

=================  ==========================  ===========================================
server             variable                    default
=================  ==========================  ===========================================
PostgreSQL         ``MSDATA_TEST_POSTGRES_DSN``  ``postgresql://postgres@127.0.0.1:5432/test``
Redis              ``MSDATA_TEST_REDIS_URL``     ``redis://127.0.0.1:6379/0``
RabbitMQ           ``MSDATA_TEST_AMQP_URL``      ``amqp://guest:guest@127.0.0.1:5672/``
NATS JetStream     ``MSDATA_TEST_NATS_URL``      ``nats://127.0.0.1:4222``
=================  ==========================  ===========================================
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

__all__ = ["SERVICES", "Service", "require"]


@dataclass(frozen=True)
class Service:
    name: str
    variable: str
    default_url: str
    default_port: int

    @property
    def url(self) -> str:
        return os.environ.get(self.variable) or self.default_url

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url.split(",")[0])
        return parts.hostname or "127.0.0.1", parts.port or self.default_port


SERVICES = {
    "postgres": Service(
        "PostgreSQL",
        "MSDATA_TEST_POSTGRES_DSN",
        "postgresql://postgres@127.0.0.1:5432/test",
        5432,
    ),
    "redis": Service("Redis", "MSDATA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0", 6379),
    "rabbitmq": Service(
        "RabbitMQ", "MSDATA_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/", 5672
    ),
    "nats": Service("NATS JetStream", "MSDATA_TEST_NATS_URL", "nats://127.0.0.1:4222", 4222),
}

_reachable: dict[str, bool] = {}


def _is_up(service: Service) -> bool:
    try:
        with socket.create_connection(service.address, timeout=1.0):
            return True
    except OSError:
        return False


def missing(reason: str) -> None:
    """Skip the test for ``reason`` (something it needs is not there), or fail it under
    ``MSDATA_REQUIRE_SERVICES=1``."""
    if os.environ.get("MSDATA_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} and MSDATA_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(reason)


def require(key: str) -> str:
    """The URL of server ``key`` (postgres, redis, rabbitmq, nats), or skip/fail the test."""
    service = SERVICES[key]
    if key not in _reachable:
        _reachable[key] = _is_up(service)
    if not _reachable[key]:
        host, port = service.address
        missing(f"{service.name} is not reachable at {host}:{port} (${service.variable})")
    return service.url
