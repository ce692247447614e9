"""The three services as ``module:attr`` Services, for the msdata command line::

    msdata trace ID --app examples.ecommerce.apps:order \\
        --app examples.ecommerce.apps:payment --app examples.ecommerce.apps:inventory
    msdata projections status --app examples.ecommerce.apps:order
    msdata dlq list --app examples.ecommerce.apps:payment

Each attribute is a function making the service (built, not started) on the databases and
broker a run used, named by environment variables: ``SHOP_DIR``, the directory of an
embedded run's SQLite files (``python -m examples.ecommerce --keep`` prints it; the
broker is then ``memory://``); otherwise a launcher run's ``SHOP_DB`` (default
``postgresql://root@127.0.0.1/test``), ``SHOP_BROKER`` (default
``redis://127.0.0.1:6379``) and ``SHOP_PREFIX`` (its ``--schema-prefix``, default
``shop``: schema ``<prefix>_order``, broker namespace ``<prefix>``). Run from the
repository's root (``--app`` imports from the current directory). :func:`build` is what
``serve.py`` runs."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from examples.ecommerce import inventory as inventory_module
from examples.ecommerce import payment as payment_module
from examples.ecommerce.common import Faults, broker_transport, make_service
from examples.ecommerce.driver import STOCK
from examples.ecommerce.order import OrderService, idempotent

from msdata.idempotency import IdempotencyKeys
from msdata.service import Service

NAMES = ("order", "payment", "inventory")

#: each service's PostgreSQL pool (the library's default is 10): three services, the
#: launcher's own connections and a restarted service's overlap stay well under
#: PostgreSQL's default max_connections = 100
POOL_SIZE = 5


def build(
    name: str,
    db: str,
    broker: str,
    *,
    namespace: str | None = None,
    faults: Faults | None = None,
    lease: float = 3.0,
    payment_url: str = "http://127.0.0.1:8102",
    inventory_url: str = "http://127.0.0.1:8103",
    charge_timeout: float = 5.0,
    pool_size: int = POOL_SIZE,
) -> tuple[Service, Any, Callable[[], Awaitable[None]]]:
    """Service ``name`` (one of :data:`NAMES`) on ``db`` (PostgreSQL: ``?schema=``) and
    ``broker``: the Service, its ASGI app and the setup to await before it starts.
    ``pool_size``: its PostgreSQL transaction pool (each store keeps a small pool of its
    own besides)."""
    faults = faults or Faults()
    transport = broker_transport(broker, faults, namespace)
    middleware = (payment_module.stall(faults),) if name == "payment" else ()
    service = make_service(
        name, db, transport, lease=lease, middleware=middleware, pool_size=pool_size
    )
    if name == "inventory":
        app = inventory_module.build(service, STOCK)
        return service, app, app.state.setup
    if name == "payment":
        app = payment_module.build(service, faults)
        return service, app, app.state.setup
    if name != "order":
        raise ValueError(f"no service {name!r}: one of {', '.join(NAMES)}")
    order_service = OrderService(
        service,
        payment=httpx.AsyncClient(base_url=payment_url),
        inventory=httpx.AsyncClient(base_url=inventory_url),
        charge_timeout=charge_timeout,
    )
    keys = IdempotencyKeys(service.store("idempotency"), lease_seconds=lease)
    return service, idempotent(order_service.app, keys), order_service.setup


def topology(broker: str, namespace: str | None = None) -> set[tuple[str, str]]:
    """Every (topic, group) the three services subscribe, from the services as built (no
    connection is opened): the names a run leaves on the broker, known without the
    services running."""
    pairs: set[tuple[str, str]] = set()
    for name in NAMES:
        db = f"postgresql://127.0.0.1/unused?schema=t_{name}"
        service, _, _ = build(name, db, broker, namespace=namespace)
        pairs.update(service.subscriptions)
    return pairs


def _from_env(name: str) -> Service:
    directory = os.environ.get("SHOP_DIR")
    if directory:
        return build(name, f"sqlite:///{directory}/{name}.db", "memory://")[0]
    db = os.environ.get("SHOP_DB", "postgresql://root@127.0.0.1/test")
    broker = os.environ.get("SHOP_BROKER", "redis://127.0.0.1:6379")
    prefix = os.environ.get("SHOP_PREFIX", "shop")
    sep = "&" if "?" in db else "?"
    service, _, _ = build(name, f"{db}{sep}schema={prefix}_{name}", broker, namespace=prefix)
    return service


def order() -> Service:
    """The Order service of the run named by the environment (see the module's doc)."""
    return _from_env("order")


def payment() -> Service:
    """The Payment service of the run named by the environment."""
    return _from_env("payment")


def inventory() -> Service:
    """The Inventory service of the run named by the environment."""
    return _from_env("inventory")
