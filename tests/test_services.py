"""The test suite's server lookup (tests/services.py): environment variables point it at other
servers, the defaults are the standard loopback addresses."""

from __future__ import annotations

import pytest

from services import SERVICES


def test_servers_default_to_loopback_and_follow_their_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for variable in ("MSDATA_TEST_REDIS_URL", "MSDATA_TEST_POSTGRES_DSN"):
        monkeypatch.delenv(variable, raising=False)
    assert SERVICES["redis"].url == "redis://127.0.0.1:6379/0"
    assert SERVICES["postgres"].address == ("127.0.0.1", 5432)
    monkeypatch.setenv("MSDATA_TEST_REDIS_URL", "redis://cache.internal:6390/2")
    monkeypatch.setenv("MSDATA_TEST_POSTGRES_DSN", "postgresql://u@db.internal/test")
    assert SERVICES["redis"].url == "redis://cache.internal:6390/2"
    assert SERVICES["redis"].address == ("cache.internal", 6390)
    assert SERVICES["postgres"].address == ("db.internal", 5432)
    monkeypatch.setenv("MSDATA_TEST_NATS_URL", "nats://a:4223,nats://b:4224")
    assert SERVICES["nats"].address == ("a", 4223)
