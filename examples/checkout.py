"""Checkout on the embedded default: SQLite for the service's data, the in-memory transport
for its events. No server needed.

1. A PlaceOrder command goes through the command bus. Its handler saves the order and adds
   OrderPlaced to the transactional outbox in the same SQLite transaction.
2. The outbox relay publishes what committed to the transport.
3. Two consumer groups apply each event once through the inbox: billing charges the order
   (its payment provider times out once, to show a redelivery) and shipping reserves stock.
   The broker then delivers one event a second time, as brokers do; the inbox skips it.
4. A GetOrder query reads the result back through the query bus.

Run: ./scripts/example.sh   (or: python examples/checkout.py)
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

from msdata import CloudEventsCodec, Command, Event, Query, message_type
from msdata.adapters.memory import MemoryTransport
from msdata.adapters.sqlite import SqliteInboxStore, SqliteOutboxStore, connect
from msdata.cqrs import CommandBus, QueryBus
from msdata.events import EventBus
from msdata.outbox import Inbox, Outbox, OutboxRelay
from msdata.transport import TransportMessage


@message_type("shop.PlaceOrder")
class PlaceOrder(Command):
    order_id: str
    sku: str
    qty: int
    price_cents: int


@message_type("shop.OrderPlaced")
class OrderPlaced(Event):
    order_id: str
    sku: str
    qty: int
    total_cents: int


@message_type("shop.GetOrder")
class GetOrder(Query[dict[str, Any]]):
    order_id: str


SCHEMA = """
CREATE TABLE orders (id TEXT PRIMARY KEY, sku TEXT, qty INT, total_cents INT);
CREATE TABLE charges (order_id TEXT, amount_cents INT);
CREATE TABLE reservations (order_id TEXT, sku TEXT, qty INT);
"""


async def main(n_orders: int = 5) -> list[dict[str, Any]]:
    db = str(Path(tempfile.mkdtemp(prefix="msdata-checkout-")) / "shop.db")
    outbox_store, inbox_store = SqliteOutboxStore(db), SqliteInboxStore(db)
    await outbox_store.create_schema()
    await inbox_store.create_schema()
    with connect(db) as conn:
        conn.executescript(SCHEMA)

    transport = MemoryTransport()
    outbox = Outbox(outbox_store, source="shop")
    inbox = Inbox(inbox_store)
    events = EventBus(transport, source="shop", backoff=lambda attempt: 0.01)
    commands, queries = CommandBus(source="shop"), QueryBus(source="shop")
    placed: dict[str, Any] = {}

    def transaction() -> sqlite3.Connection:
        return connect(db)  # commits on leaving the block, rolls back on an exception

    @commands.handler(PlaceOrder)
    def place_order(cmd: PlaceOrder) -> str:
        total = cmd.qty * cmd.price_cents
        with connect(db) as conn:  # the order and its event commit together, or neither
            conn.execute(
                "INSERT INTO orders VALUES (?, ?, ?, ?)", (cmd.order_id, cmd.sku, cmd.qty, total)
            )
            (placed[cmd.order_id],) = outbox.add(
                conn,
                OrderPlaced(order_id=cmd.order_id, sku=cmd.sku, qty=cmd.qty, total_cents=total),
                key=cmd.order_id,
            )
        return cmd.order_id

    flaky = {"o-2"}  # the payment provider times out once for this order

    @events.handler(
        OrderPlaced, group="billing", middleware=[inbox.middleware("billing", transaction)]
    )
    async def charge(event: OrderPlaced) -> None:
        if event.order_id in flaky:
            flaky.discard(event.order_id)
            raise TimeoutError("payment provider timed out")
        inbox.connection().execute(
            "INSERT INTO charges VALUES (?, ?)", (event.order_id, event.total_cents)
        )

    @events.handler(
        OrderPlaced, group="shipping", middleware=[inbox.middleware("shipping", transaction)]
    )
    async def reserve(event: OrderPlaced) -> None:
        inbox.connection().execute(
            "INSERT INTO reservations VALUES (?, ?, ?)", (event.order_id, event.sku, event.qty)
        )

    @queries.handler(GetOrder)
    def get_order(q: GetOrder) -> dict[str, Any]:
        with connect(db) as conn:
            total, charged, reserved = conn.execute(
                "SELECT total_cents,"
                " (SELECT count(*) FROM charges WHERE order_id = o.id),"
                " (SELECT count(*) FROM reservations WHERE order_id = o.id)"
                " FROM orders o WHERE o.id = ?",
                (q.order_id,),
            ).fetchone()
        return {"order_id": q.order_id, "total": total, "charged": charged, "reserved": reserved}

    async def settled() -> None:
        """Until nothing waits in the outbox or the groups, and every effect is there."""
        topic = events.topic_of(OrderPlaced)
        while True:
            waiting = (await outbox_store.status()).pending + sum(
                transport.pending(topic, g) for g in ("billing", "shipping")
            )
            with connect(db) as conn:
                done = conn.execute(
                    "SELECT (SELECT count(*) FROM charges) + (SELECT count(*) FROM reservations)"
                ).fetchone()[0]
            if not waiting and done >= 2 * n_orders:
                return
            await asyncio.sleep(0.02)

    async with events, OutboxRelay(outbox_store, transport):
        for i in range(1, n_orders + 1):
            await commands.send(PlaceOrder(order_id=f"o-{i}", sku="book", qty=i, price_cents=1500))
        await asyncio.wait_for(settled(), timeout=20)
        # the broker delivers o-1's event once more; both groups must skip it
        again = placed["o-1"]
        await transport.publish(
            again.type,
            [TransportMessage(again.id, CloudEventsCodec().encode(again), again.partition_key)],
        )
        await asyncio.wait_for(settled(), timeout=20)
        await asyncio.sleep(0.1)

    orders = [await queries.ask(GetOrder(order_id=f"o-{i}")) for i in range(1, n_orders + 1)]
    await outbox_store.close()
    await inbox_store.close()
    return orders


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    orders = asyncio.run(main())
    for order in orders:
        print(
            f"{order['order_id']}: total {order['total'] / 100:.2f}, "
            f"charged {order['charged']}x, reserved {order['reserved']}x"
        )
    ok = all(o["charged"] == 1 and o["reserved"] == 1 for o in orders)
    print("all orders charged and reserved exactly once" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)
