"""The embedded default: the three services in one process, three SQLite files in a temp
directory, the in-memory transport, and the HTTP calls made in-process (httpx's ASGI
transport). No server needed."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from examples.ecommerce import inventory, payment
from examples.ecommerce.common import Faults, broker_transport, make_service
from examples.ecommerce.driver import STOCK, Clients
from examples.ecommerce.order import OrderService, idempotent

from msdata.idempotency import IdempotencyKeys
from msdata.service import Service
from msdata.urls import transport_from_url


class DeadLetterCount(logging.Handler):
    """Counts the dead letters of this process (each is logged once on msdata.deadletter)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


@dataclass
class System:
    clients: Clients
    services: list[Service]
    directory: Path
    dead_letters: DeadLetterCount


def _client(app: Any, name: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{name}")


@contextlib.asynccontextmanager
async def embedded(
    directory: Path | None = None, faults: Faults | None = None, charge_timeout: float = 1.0
) -> AsyncIterator[System]:
    """The three services running in this process; yields clients of their HTTP APIs."""
    faults = faults or Faults()
    directory = directory or Path(tempfile.mkdtemp(prefix="msdata-shop-"))
    memory = transport_from_url("memory://")
    broker = broker_transport(memory, faults)
    inv = make_service("inventory", f"sqlite:///{directory}/inventory.db", broker, lease=30)
    pay = make_service(
        "payment",
        f"sqlite:///{directory}/payment.db",
        broker,
        lease=30,
        middleware=(payment.stall(faults),),
    )
    ords = make_service("order", f"sqlite:///{directory}/order.db", broker, lease=30)
    inventory_app = inventory.build(inv, STOCK)
    payment_app = payment.build(pay, faults)
    pay_client, inv_client = _client(payment_app, "payment"), _client(inventory_app, "inventory")
    order = OrderService(
        ords, payment=pay_client, inventory=inv_client, charge_timeout=charge_timeout
    )
    keys = IdempotencyKeys(ords.store("idempotency"), lease_seconds=30)
    order_client = _client(idempotent(order.app, keys), "order")
    counter = DeadLetterCount()
    logging.getLogger("msdata.deadletter").addHandler(counter)
    try:
        await inventory_app.state.setup()
        await payment_app.state.setup()
        await order.setup()
        async with inv, pay, ords:
            yield System(
                Clients(order_client, pay_client, inv_client), [inv, pay, ords], directory, counter
            )
    finally:
        logging.getLogger("msdata.deadletter").removeHandler(counter)
        for c in (order_client, pay_client, inv_client):
            await c.aclose()
        await broker.close() if not isinstance(broker, str) else None
