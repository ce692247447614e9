"""One service as its own process::

    python -m examples.ecommerce.serve order --db URL --broker URL --port 8101 \\
        --payment-url http://127.0.0.1:8102 --inventory-url http://127.0.0.1:8103

Its API, relay, consumers and saga recovery worker run until SIGTERM or SIGINT. Started by
hand it runs on its own (the shell that started it may exit); the launcher passes
``--watch-parent`` so that its services stop when it dies, and ``--run-id`` which
``/health`` answers with the pid (the launcher checks both)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from examples.ecommerce.apps import NAMES, POOL_SIZE, build
from examples.ecommerce.common import IDENTITY, Faults


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m examples.ecommerce.serve", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("name", choices=NAMES)
    p.add_argument("--db", required=True, help="database URL (PostgreSQL: ?schema=NAME)")
    p.add_argument("--broker", required=True, help="broker URL")
    p.add_argument("--port", type=int, required=True, help="HTTP port on 127.0.0.1")
    p.add_argument("--payment-url", default="http://127.0.0.1:8102")
    p.add_argument("--inventory-url", default="http://127.0.0.1:8103")
    p.add_argument("--duplicate-every", type=int, default=20, help="0: no duplicates")
    p.add_argument("--slow-seconds", type=float, default=6.0)
    p.add_argument("--charge-timeout", type=float, default=5.0)
    p.add_argument("--no-refunds", action="store_true", help="break refunds (a check fails)")
    p.add_argument(
        "--namespace",
        default=None,
        help="broker namespace of this run (names on Redis, NATS, RabbitMQ)",
    )
    p.add_argument("--pool-size", type=int, default=POOL_SIZE, help="PostgreSQL pool (%(default)s)")
    p.add_argument("--lease", type=float, default=3.0, help="saga and relay lease, seconds")
    p.add_argument(
        "--watch-parent",
        action="store_true",
        help="stop when the process that started this one dies (the launcher passes it)",
    )
    p.add_argument("--run-id", default=None, help="answered by /health (the launcher's check)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    faults = Faults(
        duplicate_every=args.duplicate_every,
        slow_seconds=args.slow_seconds,
        refunds=not args.no_refunds,
    )
    service, app, setup = build(
        args.name,
        args.db,
        args.broker,
        namespace=args.namespace,
        faults=faults,
        lease=args.lease,
        payment_url=args.payment_url,
        inventory_url=args.inventory_url,
        charge_timeout=args.charge_timeout,
        pool_size=args.pool_size,
    )
    IDENTITY.update(pid=os.getpid(), run=args.run_id)
    parent = os.getppid()
    launcher = multiprocessing.parent_process()  # set when the launcher forked us

    async def orphaned() -> None:
        # only with --watch-parent: the launcher was killed: stop (SIGTERM to ourselves),
        # do not run on unseen. Forked by the launcher's fork server: the launcher's end of
        # our pipe closes (the fork server itself lives on while we do); started
        # otherwise: we are re-parented.
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

    @contextlib.asynccontextmanager
    async def lifespan(_: object) -> AsyncIterator[None]:
        await setup()
        watch = asyncio.create_task(orphaned()) if args.watch_parent else None
        async with service:
            yield
        if watch is not None:
            watch.cancel()

    inner: Any = app
    while not hasattr(inner, "router"):  # the FastAPI app under the middleware
        inner = inner.app
    inner.router.lifespan_context = lifespan
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
