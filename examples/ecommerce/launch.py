"""The three services as separate processes on PostgreSQL and a broker, plus the load
driver, in one command::

    python -m examples.ecommerce.launch --db postgresql://root@127.0.0.1/test \\
        --broker redis://127.0.0.1:6379 --orders 300 [--chaos]

Each service gets its own schema (<prefix>_order, _payment, _inventory); the prefix
is also the transport's namespace on every broker (Redis keys, NATS streams and
subjects, RabbitMQ exchanges and queues), so runs with different prefixes share no names.
A run starts fresh: the schemas AND the broker names an earlier run with that prefix left
(an interrupted run's in-flight commands included) are dropped first, unless --keep.

With --chaos services are SIGKILLed and restarted while orders are placed (--kills
times, spread over the run). --clean drops the run's schemas and broker names at the
end, also when the run is stopped by SIGINT (Ctrl-C) or SIGTERM (exit 130 or 143).
--json-report FILE writes the counts, checks, kills and seconds per phase.

The launcher checks it drives its own services: the ports must be free, each service's
/health must answer this run's id and the pid the launcher started, and a service that
exits (a port taken, a bad URL) ends the run at once with one line and exit 1.

Exits 1 if a check fails. PostgreSQL: a run holds about 35 connections (Order about 19:
its transaction pool, --pool-size, default 5, and each store's own small pool), so two
runs at once fit in the default max_connections = 100, three do not."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import re
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
from examples.ecommerce.apps import POOL_SIZE
from examples.ecommerce.common import open_broker
from examples.ecommerce.driver import Clients, Report, drive
from rich.console import Console

from msdata.transport import dead_letter_topic, is_dead_letter_topic

NAMES = ("order", "payment", "inventory")

#: --schema-prefix: a PostgreSQL schema name (unquoted, lower case) once "_inventory" is
#: added, and a namespace every broker takes
PREFIX = re.compile(r"[a-z_][a-z0-9_]{0,29}")


class LaunchError(Exception):
    """The run cannot go on (a service exited, a port is taken): one line for the user."""


def prefix_type(value: str) -> str:
    """argparse type of --schema-prefix (see :data:`PREFIX`)."""
    if not PREFIX.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r}: 1-30 of [a-z0-9_], not starting with a digit")
    return value


def check_ports_free(ports: Iterable[int]) -> None:
    """LaunchError naming the first of ``ports`` something listens on (127.0.0.1)."""
    for port in ports:
        with socket.socket() as sock:
            # as uvicorn binds: a port whose last connections are in TIME_WAIT is free
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                raise LaunchError(
                    f"port {port} on 127.0.0.1 is in use (another run? choose --base-port)"
                ) from None


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
        #: this run's id, which each service's /health answers (with its pid)
        self.run_id = f"{prefix}-{uuid.uuid4().hex[:12]}"
        #: services killed on purpose (chaos), not yet started again
        self.down: set[str] = set()
        #: (topic, group) pairs the services said they consume (on /health)
        self.pairs: set[tuple[str, str]] = set()
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
            "--watch-parent", "--run-id", self.run_id,
            *self.extra,
        ]  # fmt: skip
        p = _FORK.Process(target=serve.main, args=(argv,), name=f"shop-{name}")
        p.start()
        self.procs[name] = p
        self.down.discard(name)

    def kill(self, name: str) -> None:
        p = self.procs[name]
        self.down.add(name)
        p.kill()  # SIGKILL
        p.join()

    def check(self, *names: str) -> None:
        """LaunchError if one of the services (default: all) exited when not killed."""
        for name in names or tuple(self.procs):
            p = self.procs.get(name)
            if p is not None and name not in self.down and not p.is_alive():
                raise LaunchError(
                    f"the {name} service exited (code {p.exitcode}) on port"
                    f" {self.ports[name]}: see its error above"
                )

    async def watch(self) -> None:
        """Until a service exits that was not killed on purpose: LaunchError."""
        while True:
            self.check()
            await asyncio.sleep(0.3)

    async def wait_up(self, *names: str, timeout: float = 60) -> None:
        """Until each service answers its health check as the process this launcher
        started (its pid and this run's id): LaunchError if it exits or does not answer so
        within ``timeout`` s (another process on its port)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        for name in names:
            async with httpx.AsyncClient(base_url=self.url(name), timeout=5) as client:
                while True:
                    self.check(name)
                    if self.answers(name, await health(client)):
                        break
                    if loop.time() > end:
                        raise LaunchError(
                            f"{client.base_url} did not answer as this run's {name} service"
                            f" within {timeout:.0f} s"
                        )
                    await asyncio.sleep(0.2)

    def answers(self, name: str, got: dict[str, Any] | None) -> bool:
        """Whether ``got`` (a /health answer) is from this run's ``name`` process; notes
        the pairs it consumes."""
        if got is None or got.get("run") != self.run_id:
            return False
        if got.get("pid") != self.procs[name].pid:
            return False
        for entry in got.get("consumers", {}).get("subscriptions", []):
            topic, _, group = entry.rpartition("/")
            self.pairs.add((topic, group))
        return True

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


async def health(client: httpx.AsyncClient) -> dict[str, Any] | None:
    """The service's /health answer, or None (not answering, or not 200)."""
    try:
        r = await client.get("/health")
        if r.status_code == 200:
            got = r.json()
            return got if isinstance(got, dict) else None
    except (httpx.HTTPError, ValueError):
        pass
    return None


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
    msdata.adapters.rabbitmq) of the message types of ``examples.ecommerce.messages``, of
    the (topic, group) pairs the services subscribe as built
    (:func:`examples.ecommerce.apps.topology`: known without them running) and of
    ``pairs`` (those they said they consume), with their dead-letter topics and the
    launcher's ``dlq-audit`` group on those. ``memory://``: nothing to do."""
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
            from examples.ecommerce.apps import topology

            await _drop_rabbitmq(broker, transport, {*pairs, *topology(broker)})
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
        if is_dead_letter_topic(t):
            queues.add(f"{x}:history")  # what every later reader group of a dead-letter topic gets
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


def service_args(args: argparse.Namespace) -> list[str]:
    """The options the launcher passes on to each service (``serve.py``)."""
    return [
        "--namespace", args.schema_prefix,
        "--charge-timeout", str(args.charge_timeout),
        "--slow-seconds", str(args.slow_seconds),
        "--duplicate-every", str(args.duplicate_every),
        "--pool-size", str(args.pool_size),
        *(["--no-refunds"] if args.no_refunds else []),
    ]  # fmt: skip


async def run(args: argparse.Namespace) -> bool:
    console = Console()
    phases = Phases()
    start_forkserver()
    check_ports_free(range(args.base_port, args.base_port + len(NAMES)))
    if not args.keep:  # a fresh start: no schema, no queued message of an earlier run
        try:
            await drop_schemas(args.db, args.schema_prefix)
        except Exception as error:  # unreachable, no such database, refused: one line
            raise LaunchError(f"PostgreSQL at {args.db.split('@')[-1]}: {error}") from None
        try:
            await drop_broker_names(args.broker, args.schema_prefix)
        except Exception as error:
            raise LaunchError(f"broker at {args.broker.split('@')[-1]}: {error}") from None
    extra = service_args(args)
    fleet = Fleet(args.db, args.broker, args.schema_prefix, args.base_port, extra)
    for n in NAMES:
        fleet.start(n)
    clients = Clients(*(httpx.AsyncClient(base_url=fleet.url(n), timeout=30) for n in NAMES))
    chaos_task = None
    watch = asyncio.create_task(fleet.watch())
    report: Report | None = None
    killed: list[dict[str, Any]] = []
    answered = Answered()

    async def dead_letters(audit: dict[str, Any]) -> int:
        fleet.pairs.update(subscriptions(audit))
        return await read_dead_letters(args.broker, args.schema_prefix, audit)

    async def drive_orders() -> Report:
        await fleet.wait_up("inventory", "payment", "order")
        phases.mark("start")
        console.print(
            f"Order, Payment and Inventory as processes {[p.pid for p in fleet.procs.values()]}"
            f" on {args.db.split('@')[-1]} + {args.broker.split('@')[-1]}"
        )
        nonlocal chaos_task
        if args.chaos:
            chaos_task = asyncio.create_task(
                chaos(fleet, console, args.seed, args.kills, args.orders, answered, killed)
            )
        return await drive(
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

    driving = asyncio.create_task(drive_orders())
    try:
        # whichever ends first: the run, or a service that exits (its port taken, ...)
        await asyncio.wait({driving, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not driving.done():
            watch.result()  # raises the LaunchError
        if chaos_task is not None and chaos_task.done() and not chaos_task.cancelled():
            chaos_task.result()  # a restarted service that did not come back
        report = driving.result()
        phases.mark("checks")
        args.report = report
        return report.ok
    finally:
        for task in (driving, watch, chaos_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        for c in (clients.order, clients.payment, clients.inventory):
            await c.aclose()
        fleet.stop()
        phases.mark("stop")
        if args.clean:
            await drop_schemas(args.db, args.schema_prefix)
            await drop_broker_names(args.broker, args.schema_prefix, fleet.pairs)
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
        await fleet.wait_up(name)
        kill["down_seconds"] = round(time.monotonic() - down, 2)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m examples.ecommerce.launch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--db",
        default=os.environ.get("SHOP_DB", "postgresql://root@127.0.0.1/test"),
        help="PostgreSQL URL (default $SHOP_DB or %(default)s)",
    )
    p.add_argument(
        "--broker",
        default=os.environ.get("SHOP_BROKER", "redis://127.0.0.1:6379"),
        help="redis://, amqp:// or nats:// URL (default $SHOP_BROKER or %(default)s)",
    )
    p.add_argument("--orders", type=int, default=300, help="orders to place (%(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="orders in flight at once")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--chaos", action="store_true", help="SIGKILL and restart services")
    p.add_argument("--kills", type=int, default=5, help="with --chaos: how many SIGKILLs")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the schemas and broker names of an earlier run (default: drop them)",
    )
    p.add_argument(
        "--clean",
        action="store_true",
        help="at the end (also on SIGINT/SIGTERM), drop the run's schemas and broker names",
    )
    p.add_argument(
        "--schema-prefix",
        type=prefix_type,
        default="shop",
        help="the run's PostgreSQL schema prefix and broker namespace: 1-30 of [a-z0-9_],"
        " not starting with a digit (default %(default)s)",
    )
    p.add_argument(
        "--json-report",
        type=Path,
        default=None,
        help="also write the counts, the checks and the kills to this file (JSON)",
    )
    p.add_argument(
        "--base-port", type=int, default=8101, help="Order's port; Payment +1, Inventory +2"
    )
    p.add_argument("--charge-timeout", type=float, default=5.0, help="seconds")
    p.add_argument(
        "--slow-seconds", type=float, default=6.0, help="how long a tok_slow charge stalls"
    )
    p.add_argument("--quiet-timeout", type=float, default=90.0, help="seconds")
    p.add_argument("--duplicate-every", type=int, default=20, help="0: no duplicates")
    p.add_argument("--no-refunds", action="store_true", help="break refunds (a check fails)")
    p.add_argument(
        "--pool-size",
        type=int,
        default=POOL_SIZE,
        help="each service's PostgreSQL transaction pool (%(default)s; see above)",
    )
    return p


#: exit status on a signal: 128 + its number (the shell's convention)
SIGNALS = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


async def guarded(args: argparse.Namespace) -> int:
    """:func:`run`, stopped like a normal end on SIGINT or SIGTERM (services stopped,
    --clean done): 0 (every check passed), 1 (a check failed, or LaunchError), or 128 +
    the signal's number."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    got: list[signal.Signals] = []

    def stop(sig: signal.Signals) -> None:
        if not got:  # the first: stop; a second one does not cut the cleanup short
            got.append(sig)
            task.cancel()

    for sig in SIGNALS:
        loop.add_signal_handler(sig, stop, sig)
    cleaned = ", run's names dropped" if args.clean else ""
    try:
        return 0 if await run(args) else 1
    except asyncio.CancelledError:
        if not got:
            raise
        print(f"stopped by {SIGNALS[got[0]]}: services stopped{cleaned}", file=sys.stderr)
        return 128 + int(got[0])
    except LaunchError as error:
        if got:  # a service stopped by the same Ctrl-C (its process group) was seen first
            print(f"stopped by {SIGNALS[got[0]]}: services stopped{cleaned}", file=sys.stderr)
            return 128 + int(got[0])
        print(f"launch failed: {error}", file=sys.stderr)
        return 1
    finally:
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(guarded(parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
