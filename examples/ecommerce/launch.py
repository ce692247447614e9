"""The three services as separate processes on PostgreSQL and a broker, plus the load
driver, in one command::

    python -m examples.ecommerce.launch --db postgresql://root@127.0.0.1/test \\
        --broker redis://127.0.0.1:6379 --orders 300 [--chaos]

Each service gets its own schema (``<prefix>_order``, ``_payment``, ``_inventory``; the
schemas of an earlier run with that prefix are dropped first); the prefix is also the
transport's ``namespace`` on every broker (Redis keys, NATS streams and subjects, RabbitMQ
exchanges and queues), so runs with different prefixes share no names. With
``--chaos`` a service is SIGKILLed and restarted every few seconds while orders are placed.
Exits 1 if a check fails."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
from typing import Any

import httpx
from examples.ecommerce.common import open_broker
from examples.ecommerce.driver import Clients, drive
from rich.console import Console

from msdata.transport import dead_letter_topic

NAMES = ("order", "payment", "inventory")


class Fleet:
    def __init__(self, db: str, broker: str, prefix: str, base_port: int, extra: list[str]):
        self.ports = {n: base_port + i for i, n in enumerate(NAMES)}
        self.db, self.broker, self.prefix, self.extra = db, broker, prefix, extra
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def start(self, name: str) -> None:
        sep = "&" if "?" in self.db else "?"
        cmd = [
            sys.executable, "-m", "examples.ecommerce.serve", name,
            "--db", f"{self.db}{sep}schema={self.prefix}_{name}",
            "--broker", self.broker,
            "--port", str(self.ports[name]),
            "--payment-url", self.url("payment"),
            "--inventory-url", self.url("inventory"),
            *self.extra,
        ]  # fmt: skip
        self.procs[name] = subprocess.Popen(cmd)

    def kill(self, name: str) -> None:
        p = self.procs[name]
        p.send_signal(signal.SIGKILL)
        p.wait()

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


async def wait_up(clients: Clients, timeout: float = 60) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    for c in (clients.inventory, clients.payment, clients.order):
        while True:
            try:
                if (await c.get("/health")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if loop.time() > end:
                raise RuntimeError(f"{c.base_url} did not come up")
            await asyncio.sleep(0.2)


async def read_dead_letters(broker: str, namespace: str, audit: dict[str, Any]) -> int:
    """Dead letters on every subscription's dead-letter topic (read and left there)."""
    pairs = {(t, g) for s in audit.values() for t, g in s["subscriptions"]}
    transport = open_broker(broker, namespace)
    n = 0
    try:
        for topic, group in sorted(pairs):
            sub = transport.subscribe(
                dead_letter_topic(topic, group), "dlq-audit", max_attempts=1000
            )
            async with sub:
                batch = await sub.receive(100, timeout=0.3)
                n += len(batch)
                for d in batch:
                    await d.nack()
    finally:
        await transport.close()
    return n


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
    try:
        await wait_up(clients)
        console.print(
            f"Order, Payment and Inventory as processes {[p.pid for p in fleet.procs.values()]}"
            f" on {args.db.split('@')[-1]} + {args.broker.split('@')[-1]}"
        )
        placed = asyncio.Event()
        if args.chaos:
            chaos_task = asyncio.create_task(chaos(fleet, console, args.seed, args.kills, placed))
        report = await drive(
            clients,
            orders=args.orders,
            concurrency=args.concurrency,
            seed=args.seed,
            quiet_timeout=args.quiet_timeout,
            dead_letters=lambda a: read_dead_letters(args.broker, args.schema_prefix, a),
            console=console,
            slow=args.slow_seconds > 0,
            on_placed=placed.set,
        )
        args.report = report
        return report.ok
    finally:
        if chaos_task:
            chaos_task.cancel()
        for c in (clients.order, clients.payment, clients.inventory):
            await c.aclose()
        fleet.stop()


async def chaos(
    fleet: Fleet, console: Console, seed: int, kills: int, placed: asyncio.Event
) -> None:
    """SIGKILL a service (the first within a second of the start, then every 1.5-3 s while
    orders are still being placed, ``kills`` times at most) and start it again half a
    second later. The first kill always happens, however fast the orders are placed: a
    quick run must not pass as a chaos run without any."""
    rnd = random.Random(seed)
    for i in range(kills):
        if i and placed.is_set():
            return
        await asyncio.sleep(rnd.uniform(0.2, 0.8) if i == 0 else rnd.uniform(1.5, 3.0))
        name = rnd.choice(NAMES)
        fleet.kill(name)
        console.log(f"chaos: SIGKILLed {name}")
        await asyncio.sleep(0.5)
        fleet.start(name)


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
        "--schema-prefix",
        default="shop",
        help="the run's PostgreSQL schema prefix and broker namespace (1-30 of [A-Za-z0-9_-])",
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
