"""One service as its own process: ``python -m examples.ecommerce.serve order --db URL
--broker URL --port 8001 --payment-url http://127.0.0.1:8002 --inventory-url ...``.
Its API, relay, consumers and saga recovery worker run until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal

import httpx
import uvicorn
from examples.ecommerce import inventory, payment
from examples.ecommerce.common import Faults, broker_transport, make_service
from examples.ecommerce.driver import STOCK
from examples.ecommerce.order import OrderService, idempotent

from msdata.idempotency import IdempotencyKeys


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m examples.ecommerce.serve")
    p.add_argument("name", choices=["order", "payment", "inventory"])
    p.add_argument("--db", required=True)
    p.add_argument("--broker", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--payment-url", default="http://127.0.0.1:8102")
    p.add_argument("--inventory-url", default="http://127.0.0.1:8103")
    p.add_argument("--duplicate-every", type=int, default=20)
    p.add_argument("--slow-seconds", type=float, default=6.0)
    p.add_argument("--charge-timeout", type=float, default=5.0)
    p.add_argument(
        "--namespace",
        default=None,
        help="broker namespace of this run (names on Redis, NATS, RabbitMQ)",
    )
    p.add_argument("--lease", type=float, default=3.0, help="saga and relay lease, seconds")
    args = p.parse_args(argv)
    faults = Faults(duplicate_every=args.duplicate_every, slow_seconds=args.slow_seconds)
    broker = broker_transport(args.broker, faults, args.namespace)
    middleware = (payment.stall(faults),) if args.name == "payment" else ()
    service = make_service(args.name, args.db, broker, lease=args.lease, middleware=middleware)
    if args.name == "inventory":
        app = inventory.build(service, STOCK)
        setup = app.state.setup
    elif args.name == "payment":
        app = payment.build(service, faults)
        setup = app.state.setup
    else:
        order = OrderService(
            service,
            payment=httpx.AsyncClient(base_url=args.payment_url),
            inventory=httpx.AsyncClient(base_url=args.inventory_url),
            charge_timeout=args.charge_timeout,
        )
        keys = IdempotencyKeys(service.store("idempotency"), lease_seconds=args.lease)
        app = idempotent(order.app, keys)
        setup = order.setup

    parent = os.getppid()
    launcher = multiprocessing.parent_process()  # set when the launcher forked us

    async def orphaned() -> None:
        # the launcher was killed: stop (SIGTERM to ourselves), do not run on unseen. Forked
        # by the launcher's fork server: the launcher's end of our pipe closes (the fork
        # server itself lives on while we do); started otherwise: we are re-parented.
        if launcher is not None and launcher.sentinel is not None:
            loop, gone = asyncio.get_running_loop(), asyncio.Event()
            loop.add_reader(launcher.sentinel, gone.set)
            try:
                await gone.wait()
            finally:
                loop.remove_reader(launcher.sentinel)
        else:
            while True:
                await asyncio.sleep(1.0)
                if os.getppid() != parent:
                    break
        os.kill(os.getpid(), signal.SIGTERM)

    async def lifespan(_: object):  # type: ignore[no-untyped-def]
        await setup()
        watch = asyncio.create_task(orphaned())
        async with service:
            yield
        watch.cancel()

    import contextlib

    app.router.lifespan_context = contextlib.asynccontextmanager(lifespan)  # type: ignore[union-attr]
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
