from __future__ import annotations

import pytest

from services import require


@pytest.fixture
def postgres_url() -> str:
    return require("postgres")


@pytest.fixture
def redis_url() -> str:
    return require("redis")


@pytest.fixture
def amqp_url() -> str:
    return require("rabbitmq")


@pytest.fixture
def nats_url() -> str:
    return require("nats")
