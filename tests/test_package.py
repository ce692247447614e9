"""Importing msdata must not import drivers, touch logging, or read the environment."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import msdata


def test_import_loads_no_driver_and_configures_no_logging() -> None:
    code = (
        "import logging, sys, json\n"
        "before = (logging.getLogger().level, list(logging.getLogger().handlers))\n"
        "import msdata, msdata.events, msdata.cqrs, msdata.outbox, msdata.adapters.memory\n"
        "import msdata.telemetry, msdata.audit\n"
        "after = (logging.getLogger().level, list(logging.getLogger().handlers))\n"
        "drivers = ['psycopg', 'asyncpg', 'redis', 'aio_pika', 'aiormq', 'nats',"
        " 'sqlalchemy', 'pytest', 'opentelemetry']\n"
        "print(json.dumps({'loaded': [d for d in drivers if d in sys.modules],"
        " 'same': before == after,"
        " 'handlers': [type(h).__name__ for h in logging.getLogger('msdata').handlers]}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    result = json.loads(out)
    assert result == {"loaded": [], "same": True, "handlers": []}


def test_public_names_are_exported() -> None:
    assert msdata.__version__
    for name in msdata.__all__:
        assert hasattr(msdata, name), name


@pytest.mark.parametrize(
    ("driver", "adapter", "extra"),
    [
        ("redis", "msdata.adapters.redis", "redis"),
        ("aio_pika", "msdata.adapters.rabbitmq", "rabbitmq"),
        ("nats", "msdata.adapters.nats", "nats"),
        ("asyncpg", "msdata.adapters.postgres", "postgres"),
        ("opentelemetry", "msdata.adapters.opentelemetry", "otel"),
    ],
)
def test_an_adapter_without_its_driver_names_the_extra(
    driver: str, adapter: str, extra: str
) -> None:
    code = (
        "import sys, json\n"
        f"sys.modules[{driver!r}] = None  # as if not installed\n"
        "from msdata.errors import MissingDependencyError\n"
        "try:\n"
        f"    import {adapter}\n"
        "except MissingDependencyError as e:\n"
        "    print(json.dumps({'extra': e.extra, 'text': str(e),"
        " 'importerror': isinstance(e, ImportError)}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    result = json.loads(out)
    assert result["extra"] == extra and result["importerror"] is True
    assert f"the {extra!r} extra" in result["text"]
    assert f'pip install "<msdata checkout or git URL>[{extra}]"' in result["text"]
