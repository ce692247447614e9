"""Imported once by the launcher's fork server (see launch.py): the service module and what
a service imports only as it starts (the adapters its URLs pick, uvicorn's protocol
modules, the drivers' lazy imports), so a service forked from it, a restarted one too,
starts without importing anything. A module that is not installed is skipped."""

from __future__ import annotations

import contextlib
import importlib
import pkgutil

import examples.ecommerce.serve  # noqa: F401

#: packages imported with every submodule (the stores and transports of each URL scheme)
PACKAGES = (
    "msdata.adapters.postgres",
    "msdata.adapters.sqlite",
    "msdata.adapters.redis",
    "msdata.adapters.rabbitmq",
    "msdata.adapters.nats",
)

#: modules imported lazily by the drivers and the server as a service starts
MODULES = (
    "asyncpg",
    "redis.asyncio",
    "hiredis",
    "aio_pika",
    "nats.js",
    "uvicorn.loops.auto",
    "uvicorn.loops.asyncio",
    "uvicorn.lifespan.on",
    "uvicorn.protocols.http.auto",
    "uvicorn.protocols.websockets.auto",
    "opentelemetry.sdk.metrics",
    "pydantic.v1",
)


def _import_all() -> None:
    for name in PACKAGES:
        with contextlib.suppress(ImportError):
            package = importlib.import_module(name)
            for info in pkgutil.walk_packages(package.__path__, f"{name}."):
                with contextlib.suppress(ImportError):
                    importlib.import_module(info.name)
    for name in MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


_import_all()
