"""Checkout on the embedded default: SQLite for the service's data, the in-memory transport
for its events. No server needed.

A PlaceOrder command is handled by the command bus: the order is saved in SQLite and an
OrderPlaced event is published on the event bus. Two consumer groups react: billing charges
the order (and fails once on purpose, to show redelivery) and shipping reserves stock. A
GetOrder query reads the result back through the query bus.

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

from msdata import Command, Event, Query, current_envelope, message_type
from msdata.adapters.memory import MemoryTransport
from msdata.cqrs import CommandBus, QueryBus
from msdata.events import EventBus


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


def open_db(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)  # explicit BEGIN/COMMIT below
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(
        """
        CREATE TABLE IF NOT EXISTS orders (
            id TEXT PRIMARY KEY, sku TEXT, qty INT, total_cents INT, status TEXT);
        CREATE TABLE IF NOT EXISTS charges (order_id TEXT PRIMARY KEY, amount_cents INT);
        CREATE TABLE IF NOT EXISTS reservations (order_id TEXT PRIMARY KEY, sku TEXT, qty INT);
        """
    )
    return db


async def main(n_orders: int = 5) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="msdata-checkout-"))
    db = open_db(workdir / "shop.db")
    transport = MemoryTransport()
    events = EventBus(transport, source="shop", backoff=lambda attempt: 0.01)
    commands = CommandBus(source="shop")
    queries = QueryBus(source="shop")
    billing_failures = {"o-2"}  # the payment provider times out once for this order
    handled = asyncio.Event()
    correlations: dict[str, str | None] = {}

    @commands.handler(PlaceOrder)
    async def place_order(cmd: PlaceOrder) -> str:
        total = cmd.qty * cmd.price_cents
        db.execute("BEGIN")
        db.execute(
            "INSERT INTO orders VALUES (?, ?, ?, ?, 'placed')",
            (cmd.order_id, cmd.sku, cmd.qty, total),
        )
        db.execute("COMMIT")
        await events.publish(
            OrderPlaced(order_id=cmd.order_id, sku=cmd.sku, qty=cmd.qty, total_cents=total),
            key=cmd.order_id,
        )
        return cmd.order_id

    @events.handler(OrderPlaced, group="billing")
    async def charge(event: OrderPlaced) -> None:
        if event.order_id in billing_failures:
            billing_failures.discard(event.order_id)
            raise TimeoutError("payment provider timed out")
        db.execute(
            "INSERT OR IGNORE INTO charges VALUES (?, ?)", (event.order_id, event.total_cents)
        )
        envelope = current_envelope()
        correlations[event.order_id] = envelope.causation_id if envelope else None
        maybe_done()

    @events.handler(OrderPlaced, group="shipping")
    def reserve(event: OrderPlaced) -> None:
        db.execute(
            "INSERT OR IGNORE INTO reservations VALUES (?, ?, ?)",
            (event.order_id, event.sku, event.qty),
        )
        maybe_done()

    def maybe_done() -> None:
        charged = db.execute("SELECT count(*) FROM charges").fetchone()[0]
        reserved = db.execute("SELECT count(*) FROM reservations").fetchone()[0]
        if charged == reserved == n_orders:
            handled.set()

    @queries.handler(GetOrder)
    def get_order(q: GetOrder) -> dict[str, Any]:
        row = db.execute(
            "SELECT o.id, o.total_cents, c.amount_cents, r.qty FROM orders o "
            "LEFT JOIN charges c ON c.order_id = o.id "
            "LEFT JOIN reservations r ON r.order_id = o.id WHERE o.id = ?",
            (q.order_id,),
        ).fetchone()
        return {"order_id": row[0], "total": row[1], "charged": row[2], "reserved": row[3]}

    async with events:
        for i in range(1, n_orders + 1):
            await commands.send(PlaceOrder(order_id=f"o-{i}", sku="book", qty=i, price_cents=1500))
        await asyncio.wait_for(handled.wait(), timeout=10)

    orders = [await queries.ask(GetOrder(order_id=f"o-{i}")) for i in range(1, n_orders + 1)]
    db.close()
    return {"orders": orders, "causation": correlations}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = asyncio.run(main())
    for order in result["orders"]:
        print(
            f"{order['order_id']}: total {order['total'] / 100:.2f}, "
            f"charged {order['charged'] / 100:.2f}, reserved {order['reserved']}"
        )
    ok = all(o["charged"] == o["total"] and o["reserved"] for o in result["orders"])
    print("all orders charged and reserved exactly once" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)
