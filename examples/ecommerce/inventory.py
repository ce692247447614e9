"""Inventory: reserves and releases stock, an idempotent saga participant."""

from __future__ import annotations

from typing import Any

from examples.ecommerce import sql
from examples.ecommerce.common import IDENTITY
from examples.ecommerce.messages import ReleaseStock, ReserveStock
from fastapi import FastAPI, HTTPException

from msdata.errors import SagaStepFailed
from msdata.service import Service
from msdata.storage import current_connection

TABLES = [
    "CREATE TABLE IF NOT EXISTS items (sku TEXT PRIMARY KEY, available INT NOT NULL, "
    "initial INT NOT NULL)",
    # one row per order: RESERVED, or RELEASED (also when the release came first: a later
    # reserve of that order is refused, as a participant must once it ran the compensation)
    "CREATE TABLE IF NOT EXISTS reservations (order_id TEXT PRIMARY KEY, sku TEXT NOT NULL, "
    "quantity INT NOT NULL, status TEXT NOT NULL)",
]


def build(service: Service, stock: dict[str, int]) -> FastAPI:
    @service.step(ReserveStock)
    async def reserve(cmd: ReserveStock) -> None:
        conn = current_connection()
        row = await sql.fetchrow(
            conn, "SELECT status FROM reservations WHERE order_id = ?", cmd.order_id
        )
        if row is not None:
            if row["status"] == "RELEASED":
                raise SagaStepFailed("released before it was reserved")
            return  # reserved already
        taken = await sql.execute(
            conn,
            "UPDATE items SET available = available - ? WHERE sku = ? AND available >= ?",
            cmd.quantity,
            cmd.sku,
            cmd.quantity,
        )
        if not taken:
            raise SagaStepFailed(f"out of stock: {cmd.sku}")
        new = await sql.execute(
            conn,
            "INSERT INTO reservations VALUES (?, ?, ?, 'RESERVED') "
            "ON CONFLICT (order_id) DO NOTHING",
            cmd.order_id,
            cmd.sku,
            cmd.quantity,
        )
        if not new:  # a release of this order got here first
            raise SagaStepFailed("released before it was reserved")  # rolls the stock back

    @service.step(ReleaseStock)
    async def release(cmd: ReleaseStock) -> None:
        conn = current_connection()
        row = await sql.fetchrow(
            conn, "SELECT sku, quantity, status FROM reservations WHERE order_id = ?", cmd.order_id
        )
        if row is None:
            new = await sql.execute(
                conn,
                "INSERT INTO reservations VALUES (?, '', 0, 'RELEASED') "
                "ON CONFLICT (order_id) DO NOTHING",
                cmd.order_id,
            )
            if new:
                return  # nothing was reserved; a later reserve of this order is refused
            row = await sql.fetchrow(
                conn,
                "SELECT sku, quantity, status FROM reservations WHERE order_id = ?",
                cmd.order_id,
            )
        if row is not None and row["status"] == "RESERVED":
            await sql.execute(
                conn, "UPDATE reservations SET status = 'RELEASED' WHERE order_id = ?", cmd.order_id
            )
            await sql.execute(
                conn,
                "UPDATE items SET available = available + ? WHERE sku = ?",
                row["quantity"],
                row["sku"],
            )

    async def setup() -> None:
        await sql.create_tables(service, TABLES)
        async with service.transaction() as conn:
            for sku, units in stock.items():
                await sql.execute(
                    conn,
                    "INSERT INTO items VALUES (?, ?, ?) ON CONFLICT (sku) DO NOTHING",
                    sku,
                    units,
                    units,
                )

    app = FastAPI(title="inventory")
    app.state.setup = setup

    @app.get("/reservations/{order_id}")
    async def reservation(order_id: str) -> dict[str, Any]:
        async with service.transaction() as conn:
            row = await sql.fetchrow(
                conn, "SELECT * FROM reservations WHERE order_id = ?", order_id
            )
        if row is None:
            raise HTTPException(404, "no reservation")
        return row

    @app.get("/admin/audit")
    async def audit() -> dict[str, Any]:
        async with service.transaction() as conn:
            items = await sql.fetch(conn, "SELECT * FROM items ORDER BY sku")
            held = await sql.fetch(
                conn,
                "SELECT order_id, sku, quantity FROM reservations WHERE status = 'RESERVED'",
            )
        return {"items": items, "reserved": held, **await service_state(service)}

    @app.get("/admin/busy")
    async def busy() -> dict[str, Any]:
        return await service_state(service)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {**await service.health(), **IDENTITY}

    return app


async def service_state(service: Service) -> dict[str, Any]:
    """What the driver's checks need from any service: its unpublished and parked outbox
    rows."""
    if service.relay is None:
        return {"outbox_pending": 0, "outbox_parked": 0, "subscriptions": []}
    st = await service.relay.status()
    return {
        "outbox_pending": st.pending,
        "outbox_parked": st.parked,
        "subscriptions": [[t, g] for t, g, _ in service.bus.consumers()],
    }
