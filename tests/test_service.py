"""The service runtime: two services talking through the outbox, the bus and the inbox, on
the embedded default (SQLite + memory) and on PostgreSQL + Redis; lifecycle and health."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from msdata import Command, Event, MessageRegistry
from msdata.errors import (
    ConfigurationError,
    HandlerAlreadyRegistered,
    RejectMessage,
    TransportError,
)
from msdata.messages import message_type
from msdata.service import Service
from msdata.storage import current_connection
from msdata.testing import eventually

registry = MessageRegistry()


@message_type("svc.OrderPlaced", registry=registry)
class OrderPlaced(Event):
    order_id: str
    amount: int


@message_type("svc.PaymentCharged", registry=registry)
class PaymentCharged(Event):
    order_id: str


@message_type("svc.PlaceOrder", registry=registry)
class PlaceOrder(Command):
    order_id: str
    amount: int


async def execute(conn: Any, sql: str, *args: Any) -> Any:
    """One statement on a service connection: sqlite3 (``?``) or asyncpg (``$n``)."""
    if hasattr(conn, "fetch"):  # asyncpg
        n = 0

        def number(_: Any) -> str:
            nonlocal n
            n += 1
            return f"${n}"

        import re

        return await conn.fetch(re.sub(r"\?", number, sql), *args)
    return conn.execute(sql, args).fetchall()


def build(
    db: Callable[[str], str],
    broker: str,
    topics: str,
    schema: Callable[[str], str | None] = lambda n: None,
) -> tuple[Service, Service, list[str]]:
    """Orders places an order and publishes OrderPlaced; billing charges it once and
    publishes PaymentCharged; orders marks the order paid. ``calls`` counts billing's
    handler runs that committed (a duplicate delivery must not add one)."""
    orders, billing = (
        Service(n, db=db(n), broker=broker, registry=registry, schema=schema(n))
        for n in ("orders", "billing")
    )
    placed, charged = f"{topics}.placed", f"{topics}.charged"

    @orders.command(PlaceOrder)
    async def place(cmd: PlaceOrder) -> str:
        await execute(
            current_connection(),
            "INSERT INTO orders (id, amount, status) VALUES (?, ?, 'placed')",
            cmd.order_id,
            cmd.amount,
        )
        await orders.publish(
            OrderPlaced(order_id=cmd.order_id, amount=cmd.amount), key=cmd.order_id, topic=placed
        )
        return cmd.order_id

    @billing.on(OrderPlaced, topic=placed)
    async def charge(event: OrderPlaced) -> None:
        await execute(
            current_connection(),
            "INSERT INTO charges (order_id, amount) VALUES (?, ?)",
            event.order_id,
            event.amount,
        )
        await billing.publish(
            PaymentCharged(order_id=event.order_id), key=event.order_id, topic=charged
        )

    @orders.on(PaymentCharged, topic=charged)
    async def paid(event: PaymentCharged) -> None:
        await execute(
            current_connection(), "UPDATE orders SET status = 'paid' WHERE id = ?", event.order_id
        )

    return orders, billing, [placed, charged]


async def create_tables(orders: Service, billing: Service) -> None:
    async with orders.transaction() as conn:
        await execute(
            conn, "CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, amount INT, status TEXT)"
        )
    async with billing.transaction() as conn:
        await execute(
            conn, "CREATE TABLE IF NOT EXISTS charges (order_id TEXT PRIMARY KEY, amount INT)"
        )


async def count(service: Service, sql: str) -> int:
    async with service.transaction() as conn:
        rows = await execute(conn, sql)
        return int(rows[0][0])


async def two_service_flow(orders: Service, billing: Service) -> None:
    async with orders, billing:
        await create_tables(orders, billing)  # after start: the PG schemas exist by then
        for i in range(20):
            assert await orders.send(PlaceOrder(order_id=f"o-{i}", amount=i)) == f"o-{i}"

        async def all_paid() -> bool:
            return await count(orders, "SELECT COUNT(*) FROM orders WHERE status = 'paid'") == 20

        await eventually(all_paid, timeout=20, what="every order paid")
        assert await count(billing, "SELECT COUNT(*) FROM charges") == 20
        health = await orders.health()
        assert health["status"] == "ok", health
        assert health["relay"]["running"] and health["consumers"]["running"]
        await eventually(lambda: _drained(orders), timeout=10, what="orders' outbox drained")
    assert (await orders.health())["status"] == "stopped"


async def _drained(service: Service) -> bool:
    return (await service.store("outbox").status()).pending == 0


async def test_two_services_on_sqlite_and_memory(tmp_path: Path) -> None:
    orders, billing, _ = build(lambda n: f"sqlite:///{tmp_path}/{n}.db", "memory://", "t1")
    await two_service_flow(orders, billing)


@pytest.mark.postgres
@pytest.mark.redis
async def test_two_services_on_postgres_and_redis(postgres_url: str, redis_url: str) -> None:
    import asyncpg

    run = uuid.uuid4().hex[:8]
    # each service in its own schema of the shared test database; topics of this run only
    orders, billing, _ = build(
        lambda n: postgres_url, redis_url, f"svc-{run}", schema=lambda n: f"svc_{n}_{run}"
    )
    try:
        await two_service_flow(orders, billing)
    finally:
        conn = await asyncpg.connect(postgres_url)
        try:
            for n in ("orders", "billing"):
                await conn.execute(f'DROP SCHEMA IF EXISTS "svc_{n}_{run}" CASCADE')
        finally:
            await conn.close()


# -- lifecycle and wiring --------------------------------------------------------------------


async def test_nested_transaction_is_refused(tmp_path: Path) -> None:
    service = Service("solo", db=f"sqlite:///{tmp_path}/solo.db", registry=registry)
    async with service, service.transaction():
        with pytest.raises(ConfigurationError, match="already open"):
            async with service.transaction():
                pass


async def test_publish_outside_a_transaction_is_refused(tmp_path: Path) -> None:
    service = Service("solo", db="memory://", registry=registry)
    async with service:
        with pytest.raises(ConfigurationError, match=r"service\.transaction\(\)"):
            await service.publish(PaymentCharged(order_id="x"))


async def test_rolled_back_transaction_publishes_nothing(tmp_path: Path) -> None:
    service = Service("solo", db=f"sqlite:///{tmp_path}/solo.db", registry=registry)
    async with service:
        with pytest.raises(RuntimeError):
            async with service.transaction():
                await service.publish(PaymentCharged(order_id="x"))
                raise RuntimeError("business rule")
        assert (await service.store("outbox").status()).pending == 0


async def test_second_handler_in_one_group_needs_its_own_group() -> None:
    service = Service("solo", db="memory://", registry=registry)
    service.subscribe(OrderPlaced, lambda e: None)
    with pytest.raises(HandlerAlreadyRegistered, match="its own group"):
        service.subscribe(OrderPlaced, lambda e: None)
    service.subscribe(OrderPlaced, lambda e: None, group="solo-audit")
    await service.stop()


async def test_bad_urls_name_the_problem_without_credentials() -> None:
    with pytest.raises(ConfigurationError, match="no database") as e:
        Service("solo", db="mysql://user:secret@host/db")
    assert "secret" not in str(e.value)
    with pytest.raises(ConfigurationError, match=r"^service name 'bad name'"):
        Service("bad name", db="memory://")


async def test_a_failed_worker_shows_in_health(tmp_path: Path) -> None:
    service = Service("solo", db="memory://", registry=registry)
    service.subscribe(OrderPlaced, lambda e: None)

    async def fail() -> None:
        raise RuntimeError("worker broke")

    service.worker("broken", fail, lambda: None)
    async with service:
        await eventually(lambda: _status(service, "degraded"), timeout=5, what="health degraded")
        health = await service.health()
        assert health["workers"]["broken"]["error"] == "RuntimeError: worker broke"
    assert service.relay is not None and not service.relay.running


async def _status(service: Service, status: str) -> bool:
    return (await service.health())["status"] == status


async def test_handler_error_shows_in_health_and_is_redelivered() -> None:
    service = Service(
        "solo", db="memory://", registry=registry, bus_options={"backoff": lambda n: 0.0}
    )
    calls: list[str] = []

    @service.on(PaymentCharged)
    async def flaky(event: PaymentCharged) -> None:
        calls.append(event.order_id)
        if len(calls) == 1:
            raise ValueError("first time fails")

    async with service:
        async with service.transaction():
            await service.publish(PaymentCharged(order_id="p-1"))
        await eventually(lambda: len(calls) == 2, timeout=5, what="redelivered once")
        group = (await service.health())["consumers"]["groups"]["solo"]
        assert group == {"handled": 1, "failed": 1, "last_error": "ValueError: first time fails"}


async def test_memory_broker_is_shared_by_url_and_closed_by_the_last_user() -> None:
    a = Service("a", db="memory://", broker="memory://shared-test", registry=registry)
    b = Service("b", db="memory://", broker="memory://shared-test", registry=registry)
    assert a.transport is b.transport
    c = Service("c", db="memory://", broker="memory://other-test", registry=registry)
    assert c.transport is not a.transport
    got: list[str] = []
    b.subscribe(PaymentCharged, lambda e: got.append(e.order_id))
    async with a, b:
        async with a.transaction():
            await a.publish(PaymentCharged(order_id="x"))
        await eventually(lambda: got == ["x"], timeout=5, what="b got a's event")
    await c.stop()
    d = Service("d", db="memory://", broker="memory://shared-test", registry=registry)
    assert d.transport is not a.transport  # the old one was closed with its last user
    await d.stop()


async def test_sqlite_transaction_in_a_lock_lets_concurrent_handlers_through(
    tmp_path: Path,
) -> None:
    service = Service("solo", db=f"sqlite:///{tmp_path}/c.db", registry=registry)
    async with service.transaction() as conn:
        conn.execute("CREATE TABLE n (i INT)")

    async def one(i: int) -> None:
        async with service.transaction() as conn:
            conn.execute("INSERT INTO n VALUES (?)", (i,))
            await asyncio.sleep(0)  # another task's BEGIN must not block the loop
            conn.execute("INSERT INTO n VALUES (?)", (i,))

    await asyncio.gather(*(one(i) for i in range(50)))
    async with service.transaction() as conn:
        assert conn.execute("SELECT COUNT(*) FROM n").fetchone()[0] == 100
    await service.stop()


# -- a service process stopped by SIGTERM -----------------------------------------------------


def _stop_worker(args: list[str], sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "service_worker.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "PUBLISHING"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out.strip() == "STOPPED"
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_process_cleanly_and_releases_the_relay(
    tmp_path: Path, sig: signal.Signals
) -> None:
    db = tmp_path / "w.db"
    _stop_worker([f"sqlite:///{db}", "2000"], sig)
    with sqlite3.connect(db) as conn:
        # the relay gave its lease up: another relay may claim at once
        assert conn.execute("SELECT COUNT(*) FROM msdata_outbox_relay").fetchone()[0] == 0
        left = conn.execute("SELECT COUNT(*) FROM msdata_outbox WHERE state = 0").fetchone()[0]
    assert 0 < left < 2000  # stopped mid-backlog, after publishing some


@pytest.mark.slow
@pytest.mark.postgres
def test_sigterm_on_postgres_releases_the_relay_leases(postgres_url: str) -> None:
    import asyncpg

    from msdata.urls import store_from_url

    schema = f"svc_sig_{uuid.uuid4().hex[:8]}"
    _stop_worker([postgres_url, "2000", schema], signal.SIGTERM)
    lease_table = store_from_url("outbox", postgres_url, schema=schema).lease_table
    table = store_from_url("outbox", postgres_url, schema=schema).table

    async def check() -> tuple[int, int]:
        conn = await asyncpg.connect(postgres_url)
        try:
            leases = await conn.fetchval(f"SELECT count(*) FROM {lease_table} WHERE until > now()")
            left = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE sent_at IS NULL")
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
            return leases, left
        finally:
            await conn.close()

    leases, left = asyncio.run(check())
    assert leases == 0  # released: another relay may claim at once
    assert 0 < left < 2000


async def test_dead_letters_listed_and_replayed_in_process() -> None:
    service = Service("solo", db="memory://", broker="memory://dlq-test", registry=registry)
    seen: list[str] = []
    reject = True

    @service.on(PaymentCharged)
    async def handle(event: PaymentCharged) -> None:
        seen.append(event.order_id)
        if reject:
            raise RejectMessage("not now")

    async with service:
        assert await service.dead_letters() == []
        async with service.transaction():
            await service.publish(PaymentCharged(order_id="d-1"), key="d-1")
        await eventually(lambda: seen == ["d-1"], timeout=5, what="handled once")

        async def one_dead_letter() -> bool:
            return len(await service.dead_letters()) == 1

        await eventually(one_dead_letter, timeout=5, what="the dead letter listed")
        (dead,) = await service.dead_letters()
        assert (dead.topic, dead.group, dead.key) == ("svc.PaymentCharged", "solo", "d-1")
        assert dead.reason == "RejectMessage: not now" and '"d-1"' in dead.body
        reject = False
        assert [d.id for d in await service.replay_dead_letters()] == [dead.id]
        await eventually(lambda: seen == ["d-1", "d-1"], timeout=5, what="replayed")
        assert await service.dead_letters() == []


async def test_idempotency_keys_on_the_service_database(tmp_path: Path) -> None:
    service = Service("solo", db=f"sqlite:///{tmp_path}/i.db", registry=registry)
    keys = service.idempotency  # before start: its table is created at start
    runs: list[int] = []

    async def charge() -> int:
        runs.append(1)
        return 42

    async with service:
        assert await keys.run("k-1", charge, request={"amount": 42}) == 42
        assert await keys.run("k-1", charge, request={"amount": 42}) == 42
    assert runs == [1]


async def test_a_part_that_fails_to_start_stops_the_started_ones(tmp_path: Path) -> None:
    service = Service(
        "solo", db=f"sqlite:///{tmp_path}/s.db", broker="redis://127.0.0.1:1/0", registry=registry
    )
    service.subscribe(OrderPlaced, lambda e: None)
    with pytest.raises(TransportError):
        await service.start()
    assert service.relay is not None and not service.relay.running
    assert (await service.health())["status"] == "stopped"


async def test_projection_fed_by_the_bus(tmp_path: Path) -> None:
    from msdata.projections import Projection, handles

    class PaidOrders(Projection):
        name = "paid-orders"

        def setup(self, conn: Any, generation: int) -> None:
            conn.execute(f"CREATE TABLE IF NOT EXISTS paid_{generation} (order_id TEXT)")

        @handles(PaymentCharged)
        def paid(self, ctx: Any, event: PaymentCharged) -> None:
            ctx.conn.execute(f"INSERT INTO paid_{ctx.generation} VALUES (?)", (event.order_id,))

    billing = Service("billing", db="memory://", broker="memory://proj-test", registry=registry)
    reports = Service(
        "reports", db=f"sqlite:///{tmp_path}/r.db", broker="memory://proj-test", registry=registry
    )
    runner = reports.projection(PaidOrders(), from_bus=True)
    assert ("svc.PaymentCharged", "reports-paid-orders") in reports.subscriptions
    # it keeps no events of its own: the CLI refuses to rebuild it from position 0
    assert reports.fed_by_bus("paid-orders") and not billing.fed_by_bus("paid-orders")
    async with billing, reports:
        async with billing.transaction():
            for i in range(3):
                await billing.publish(PaymentCharged(order_id=f"p-{i}"))

        async def three() -> bool:
            async with reports.transaction() as conn:
                table = f"paid_{runner.generation}"
                return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 3

        await eventually(three, timeout=10, what="the bus-fed read model has 3 rows")
        assert (await reports.health())["status"] == "ok"


class _Leave(BaseException):
    """A handler's own BaseException that is not an Exception."""


@pytest.mark.parametrize(
    ("error", "text"),
    [(_Leave("leave now"), "_Leave: leave now"), (SystemExit(3), "SystemExit: 3")],
    ids=["own-BaseException", "SystemExit"],
)
async def test_a_handler_raising_a_base_exception_shows_in_health_and_stops_the_service(
    error: BaseException, text: str
) -> None:
    """The service's stop raises it once every part stopped and closed (SystemExit too,
    which asyncio would raise out of the event loop from the task ``wait_for`` runs a stop
    step in)."""
    service = Service(
        "leaver", db="memory://", registry=registry, bus_options={"backoff": lambda n: 0.0}
    )
    calls: list[str] = []

    @service.on(PaymentCharged)
    async def leaves(event: PaymentCharged) -> None:
        await go.wait()  # raises once the test waits for it
        calls.append(event.order_id)
        raise error

    health: dict[str, Any] = {}
    go = asyncio.Event()
    with pytest.raises(type(error)) as raised:
        async with service:
            async with service.transaction():
                await service.publish(PaymentCharged(order_id="p-1"))
            go.set()
            try:
                await asyncio.sleep(30)  # the bus cancels this task: a handler raised
            except asyncio.CancelledError:
                health = await service.health()
                raise
    assert raised.value is error and calls == ["p-1"]
    assert health["status"] == "degraded", health
    assert health["consumers"]["running"] is False
    group = health["consumers"]["groups"]["leaver"]
    assert group == {"handled": 0, "failed": 1, "last_error": text}
    assert (await service.health())["status"] == "stopped"


async def test_health_says_stopping_while_the_service_stops() -> None:
    """While ``stop()`` waits for a handler to finish, every part still runs: health said
    "ok" then (a stop begun by a handler's BaseException too), so a probe kept routing to a
    service on its way out."""
    service = Service(
        "stopper", db="memory://", registry=registry, bus_options={"stop_timeout": 5.0}
    )
    began, finish = asyncio.Event(), asyncio.Event()

    @service.on(PaymentCharged)
    async def slow(event: PaymentCharged) -> None:
        began.set()
        await finish.wait()

    await service.start()
    assert (await service.health())["status"] == "ok"
    async with service.transaction():
        await service.publish(PaymentCharged(order_id="p-1"))
    await eventually(began.is_set, what="the handler to begin")
    stopping = asyncio.create_task(service.stop())
    await eventually(lambda: service._state == "stopping", what="the stop to begin")
    assert (await service.health())["status"] == "stopping"
    finish.set()
    await stopping
    assert (await service.health())["status"] == "stopped"
