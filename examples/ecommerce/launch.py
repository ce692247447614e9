"""The three services as separate processes on PostgreSQL and a broker, plus the load
driver, in one command::

    python -m examples.ecommerce.launch --db postgresql://root@127.0.0.1/test \\
        --broker redis://127.0.0.1:6379 --orders 300 [--chaos]

Each service gets its own schema (``<prefix>_order``, ``_payment``, ``_inventory``; the
schemas of an earlier run with that prefix are dropped first); the prefix is also the
transport's ``namespace`` on every broker (Redis keys, NATS streams and subjects, RabbitMQ
exchanges and queues), so runs with different prefixes share no names. With
``--chaos`` services are SIGKILLed and restarted while orders are placed (``--kills``
times, spread over the run). ``--clean`` drops the run's schemas and broker names at the
end; ``--json-report FILE`` writes the counts, checks, kills and seconds per phase. The
services are forked from a fork server that imported them once, so a restart is quick.
Exits 1 if a check fails."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
from examples.ecommerce.common import open_broker
from examples.ecommerce.driver import Clients, Report, audit, drive
from rich.console import Console

from msdata.transport import dead_letter_topic

NAMES = ("order", "payment", "inventory")


#: services are forked from a server process that imported them once (multiprocessing's
#: "forkserver"): a service started again after a SIGKILL is up in a fraction of a fresh
#: interpreter's time, which on a loaded machine is most of a chaos run's length
_FORK = multiprocessing.get_context("forkserver")


def start_forkserver() -> None:
    """Start the fork server (if it is not running), preloading examples.ecommerce.warm:
    early, it imports the services while the launcher does other work."""
    from multiprocessing import forkserver

    _FORK.set_forkserver_preload(["examples.ecommerce.warm"])
    forkserver.ensure_running()


class Fleet:
    """The three services, each its own process, forked from the fork server (which has
    only imported modules: no event loop, connection or thread is shared between them)."""

    def __init__(self, db: str, broker: str, prefix: str, base_port: int, extra: list[str]):
        self.ports = {n: base_port + i for i, n in enumerate(NAMES)}
        self.db, self.broker, self.prefix, self.extra = db, broker, prefix, extra
        self.procs: dict[str, multiprocessing.process.BaseProcess] = {}
        start_forkserver()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def start(self, name: str) -> None:
        from examples.ecommerce import serve

        sep = "&" if "?" in self.db else "?"
        argv = [
            name,
            "--db", f"{self.db}{sep}schema={self.prefix}_{name}",
            "--broker", self.broker,
            "--port", str(self.ports[name]),
            "--payment-url", self.url("payment"),
            "--inventory-url", self.url("inventory"),
            *self.extra,
        ]  # fmt: skip
        p = _FORK.Process(target=serve.main, args=(argv,), name=f"shop-{name}")
        p.start()
        self.procs[name] = p

    def kill(self, name: str) -> None:
        p = self.procs[name]
        p.kill()  # SIGKILL
        p.join()

    def stop(self) -> None:
        for p in self.procs.values():
            if p.is_alive():
                p.terminate()
        for p in self.procs.values():
            p.join(15)
            if p.is_alive():
                p.kill()
                p.join()


class Phases:
    """Where a run's time went: seconds per phase, in order (printed at the end)."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.took: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.took.append((name, now - self.last))
        self.last = now

    def __str__(self) -> str:
        return ", ".join(f"{name} {s:.1f} s" for name, s in self.took)


async def wait_up(*clients: httpx.AsyncClient, timeout: float = 60) -> None:
    """Until each service answers its health check (RuntimeError after ``timeout`` s)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    for c in clients:
        while True:
            try:
                if (await c.get("/health")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if loop.time() > end:
                raise RuntimeError(f"{c.base_url} did not come up")
            await asyncio.sleep(0.2)


def subscriptions(audit: dict[str, Any]) -> set[tuple[str, str]]:
    """Every (topic, group) the services consume, from their audits."""
    return {(t, g) for s in audit.values() for t, g in s["subscriptions"]}


async def read_dead_letters(broker: str, namespace: str, audit: dict[str, Any]) -> int:
    """Dead letters on every subscription's dead-letter topic (read and left there). The
    topics are read at once, each for up to a second (a broker slow to hand out what a
    new group finds must not pass for an empty topic)."""
    transport = open_broker(broker, namespace)

    async def count(topic: str, group: str) -> int:
        sub = transport.subscribe(dead_letter_topic(topic, group), DLQ_AUDIT, max_attempts=1000)
        async with sub:
            batch = await sub.receive(100, timeout=1.0)
            for d in batch:
                await d.nack()
            return len(batch)

    try:
        return sum(await asyncio.gather(*(count(t, g) for t, g in sorted(subscriptions(audit)))))
    finally:
        await transport.close()


#: the group the launcher reads dead-letter topics with
DLQ_AUDIT = "dlq-audit"


async def drop_broker_names(
    broker: str, namespace: str, pairs: Iterable[tuple[str, str]] = ()
) -> None:
    """Delete what a run left on the broker under ``namespace``: Redis keys
    ``<namespace>:*``; NATS streams of the namespace's stream prefix; on RabbitMQ (which
    cannot list names over AMQP) the exchanges and queues of the topology (see
    msdata.adapters.rabbitmq) of the message types of ``examples.ecommerce.messages`` and
    of the (topic, group) ``pairs`` the services consumed, with their dead-letter topics
    and the launcher's ``dlq-audit`` group on those. ``memory://``: nothing to do."""
    transport = open_broker(broker, namespace)
    try:
        if broker.startswith("redis"):
            client: Any = transport._client  # type: ignore[attr-defined]
            keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
            for i in range(0, len(keys), 500):
                await client.delete(*keys[i : i + 500])
        elif broker.startswith("nats"):
            import nats

            nc = await nats.connect(broker)
            try:
                js = nc.jetstream()
                prefix = transport.stream_prefix  # type: ignore[attr-defined]
                for info in await js.streams_info():
                    if info.config.name and info.config.name.startswith(prefix):
                        await js.delete_stream(info.config.name)
            finally:
                await nc.close()
        elif broker.startswith("amqp"):
            await _drop_rabbitmq(broker, transport, pairs)
    finally:
        await transport.close()


async def _drop_rabbitmq(broker: str, transport: Any, pairs: Iterable[tuple[str, str]]) -> None:
    import aio_pika
    from examples.ecommerce import messages

    from msdata.adapters.rabbitmq.transport import RETRY_TIERS
    from msdata.messages import default_registry

    pairs = set(pairs)
    topics = {t for t, _ in pairs}
    for value in vars(messages).values():
        if isinstance(value, type) and default_registry.is_registered(value):
            topics.add(default_registry.name_of(value)[0])
    groups = set(pairs)
    for t, g in pairs:  # the dead-letter topics, read by the launcher's group
        dlq = dead_letter_topic(t, g)
        groups.add((dlq, DLQ_AUDIT))
        topics |= {dlq, dead_letter_topic(dlq, DLQ_AUDIT)}
    queues, exchanges = set(), set()
    for t in topics:
        x = transport.exchange_name(t)
        exchanges |= {x, f"{x}:unrouted"}
        queues.add(f"{x}:unrouted")
    for t, g in groups:
        q = f"{transport.exchange_name(t)}:{g}"
        queues |= {q, f"{q}:retry", *(f"{q}:retry-{round(s * 1000)}ms" for s in RETRY_TIERS)}
    conn = await aio_pika.connect(broker)
    try:
        channel = await conn.channel()
        for q in sorted(queues):
            await channel.queue_delete(q)
        for x in sorted(exchanges):
            await channel.exchange_delete(x)
    finally:
        await conn.close()


async def drop_schemas(db: str, prefix: str) -> None:
    """A fresh start: drop the services' schemas left by an earlier run."""
    import asyncpg

    conn = await asyncpg.connect(db.partition("?")[0])
    try:
        for n in NAMES:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{prefix}_{n}" CASCADE')
    finally:
        await conn.close()


async def run(args: argparse.Namespace) -> bool:
    console = Console()
    phases = Phases()
    start_forkserver()
    if not args.keep:
        await drop_schemas(args.db, args.schema_prefix)
    extra = [
        "--namespace",
        args.schema_prefix,
        "--charge-timeout",
        str(args.charge_timeout),
        "--slow-seconds",
        str(args.slow_seconds),
    ]
    fleet = Fleet(args.db, args.broker, args.schema_prefix, args.base_port, extra)
    for n in NAMES:
        fleet.start(n)
    clients = Clients(*(httpx.AsyncClient(base_url=fleet.url(n), timeout=30) for n in NAMES))
    chaos_task = None
    report: Report | None = None
    pairs: set[tuple[str, str]] = set()
    killed: list[dict[str, Any]] = []
    answered = Answered()

    async def dead_letters(audit: dict[str, Any]) -> int:
        pairs.update(subscriptions(audit))
        return await read_dead_letters(args.broker, args.schema_prefix, audit)

    try:
        await wait_up(clients.inventory, clients.payment, clients.order)
        phases.mark("start")
        console.print(
            f"Order, Payment and Inventory as processes {[p.pid for p in fleet.procs.values()]}"
            f" on {args.db.split('@')[-1]} + {args.broker.split('@')[-1]}"
        )
        if args.chaos:
            chaos_task = asyncio.create_task(
                chaos(fleet, console, args.seed, args.kills, args.orders, answered, killed)
            )
        report = await drive(
            clients,
            orders=args.orders,
            concurrency=args.concurrency,
            seed=args.seed,
            quiet_timeout=args.quiet_timeout,
            dead_letters=dead_letters,
            console=console,
            slow=args.slow_seconds > 0,
            on_answered=answered,
            on_placed=lambda: phases.mark("orders"),
            on_quiet=lambda: phases.mark("quiet"),
        )
        phases.mark("checks")
        args.report = report
        return report.ok
    finally:
        if chaos_task:
            chaos_task.cancel()
        if args.clean and not pairs:  # the run ended early: what do the services consume?
            with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                pairs.update(subscriptions(await audit(clients)))
        for c in (clients.order, clients.payment, clients.inventory):
            await c.aclose()
        fleet.stop()
        phases.mark("stop")
        if args.clean:
            await drop_schemas(args.db, args.schema_prefix)
            await drop_broker_names(args.broker, args.schema_prefix, pairs)
            phases.mark("clean")
        console.print(f"time: {phases}")
        if args.json_report and report is not None:
            out = {**report.as_dict(), "kills": killed, "phases": dict(phases.took)}
            args.json_report.write_text(json.dumps(out))


class Answered:
    """Counts the orders answered so far (the driver calls it on each)."""

    def __init__(self) -> None:
        self.n = 0
        self.changed = asyncio.Event()

    def __call__(self) -> None:
        self.n += 1
        self.changed.set()


async def chaos(
    fleet: Fleet,
    console: Console,
    seed: int,
    kills: int,
    orders: int,
    answered: Answered,
    killed: list[dict[str, Any]],
) -> None:
    """SIGKILL a service ``kills`` times, the three in turn (in an order drawn from
    ``seed``: three kills hit each once), spread over the run by progress: kill ``i`` (1 to
    ``kills``) once ``orders * i / (kills + 1)`` orders have been answered (never all of
    them), so each kill falls while checkouts are in flight, however fast or slow the
    machine is. The service is started again half a second later, and the next kill waits
    until it answers its health check (one service down at a time: a run is not spent
    restarting a service that is still starting). Each kill is appended to ``killed``:
    the service, how many orders had been answered, and (once it is back) how long it was
    down."""
    victims = list(NAMES)
    random.Random(seed).shuffle(victims)
    for i in range(1, kills + 1):
        due = min(orders - 1, round(orders * i / (kills + 1)))
        while answered.n < due:
            answered.changed.clear()
            await answered.changed.wait()
        name = victims[(i - 1) % len(victims)]
        fleet.kill(name)
        kill = {"service": name, "answered": answered.n, "orders": orders}
        killed.append(kill)
        console.log(f"chaos: SIGKILLed {name} after {answered.n} of {orders} orders")
        down = time.monotonic()
        await asyncio.sleep(0.5)
        fleet.start(name)
        async with httpx.AsyncClient(base_url=fleet.url(name), timeout=5) as client:
            await wait_up(client)
        kill["down_seconds"] = round(time.monotonic() - down, 2)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m examples.ecommerce.launch", description=__doc__)
    p.add_argument("--db", default=os.environ.get("SHOP_DB", "postgresql://root@127.0.0.1/test"))
    p.add_argument("--broker", default=os.environ.get("SHOP_BROKER", "redis://127.0.0.1:6379"))
    p.add_argument("--orders", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--chaos", action="store_true", help="SIGKILL and restart services")
    p.add_argument("--kills", type=int, default=5, help="with --chaos: how many SIGKILLs")
    p.add_argument("--keep", action="store_true", help="keep the schemas of an earlier run")
    p.add_argument(
        "--clean",
        action="store_true",
        help="at the end, drop the run's schemas and its names on the broker",
    )
    p.add_argument(
        "--schema-prefix",
        default="shop",
        help="the run's PostgreSQL schema prefix and broker namespace (1-30 of [A-Za-z0-9_-])",
    )
    p.add_argument(
        "--json-report",
        type=Path,
        default=None,
        help="also write the counts, the checks and the kills to this file (JSON)",
    )
    p.add_argument("--base-port", type=int, default=8101)
    p.add_argument("--charge-timeout", type=float, default=5.0)
    p.add_argument("--slow-seconds", type=float, default=6.0)
    p.add_argument("--quiet-timeout", type=float, default=90.0)
    p.add_argument("--duplicate-every", type=int, default=20, help="0: no duplicates")
    return p


def main(argv: list[str] | None = None) -> int:
    return 0 if asyncio.run(run(parser().parse_args(argv))) else 1


if __name__ == "__main__":
    sys.exit(main())
