"""Payment: charges and refunds, an idempotent saga participant."""

from __future__ import annotations

import asyncio
from typing import Any

from examples.ecommerce import sql
from examples.ecommerce.common import IDENTITY, Faults
from examples.ecommerce.inventory import service_state
from examples.ecommerce.messages import Charged, ChargePayment, RefundPayment
from fastapi import FastAPI, HTTPException

from msdata.errors import SagaStepFailed
from msdata.messages import Envelope
from msdata.middleware import Middleware
from msdata.service import Service
from msdata.storage import current_connection

TABLES = [
    # one row per order: CHARGED, or REFUNDED (also when the refund came first: a later
    # charge of that order is refused)
    "CREATE TABLE IF NOT EXISTS payments (order_id TEXT PRIMARY KEY, amount_cents INT NOT NULL, "
    "status TEXT NOT NULL)",
    # every movement of money, for the audit: what was charged and refunded, per order
    "CREATE TABLE IF NOT EXISTS ledger (order_id TEXT NOT NULL, kind TEXT NOT NULL, "
    "amount_cents INT NOT NULL)",
]

DECLINED = "tok_declined"
SLOW = "tok_slow"


def stall(faults: Faults) -> Middleware:
    """Bus middleware: the card gateway stalls on card tok_slow, so the charge answers after
    the saga's step timeout and the saga refunds it; the gateway is as slow for every refund
    of that order, so each refund attempt answers after its timeout too (the orchestrator
    takes an earlier attempt's late success as the refund's). Outside any transaction, so it
    holds no database lock; it does hold its consumer, so the charges that consumer received
    in the same batch (up to the bus's ``prefetch``) wait behind it and mostly time out
    too, while the other consumers go on."""
    slow: set[str] = set()

    async def middleware(envelope: Envelope[Any], call_next: Any) -> Any:
        msg = envelope.message
        if faults.slow_seconds:
            if isinstance(msg, ChargePayment) and msg.card == SLOW:
                slow.add(msg.order_id)
                await asyncio.sleep(faults.slow_seconds)
            elif isinstance(msg, RefundPayment) and msg.order_id in slow:
                await asyncio.sleep(faults.slow_seconds)
        return await call_next(envelope)

    return middleware


def build(service: Service, faults: Faults) -> FastAPI:
    @service.step(ChargePayment)
    async def charge(cmd: ChargePayment) -> Charged:
        conn = current_connection()
        payment_id = f"pay-{cmd.order_id}"
        if cmd.card == DECLINED:
            raise SagaStepFailed("card declined")
        # ON CONFLICT: a refund of this order racing this charge waits for it, or wins
        new = await sql.execute(
            conn,
            "INSERT INTO payments VALUES (?, ?, 'CHARGED') ON CONFLICT (order_id) DO NOTHING",
            cmd.order_id,
            cmd.amount_cents,
        )
        if not new:
            row = await sql.fetchrow(
                conn, "SELECT status FROM payments WHERE order_id = ?", cmd.order_id
            )
            if row is not None and row["status"] == "REFUNDED":
                raise SagaStepFailed("refunded before it was charged")
            return Charged(payment_id=payment_id)  # charged already
        await sql.execute(
            conn, "INSERT INTO ledger VALUES (?, 'charge', ?)", cmd.order_id, cmd.amount_cents
        )
        return Charged(payment_id=payment_id)

    @service.step(RefundPayment)
    async def refund(cmd: RefundPayment) -> None:
        conn = current_connection()
        new = await sql.execute(
            conn,
            "INSERT INTO payments VALUES (?, 0, 'REFUNDED') ON CONFLICT (order_id) DO NOTHING",
            cmd.order_id,
        )
        if new:
            return  # nothing was charged; a later charge of this order is refused
        row = await sql.fetchrow(
            conn, "SELECT amount_cents, status FROM payments WHERE order_id = ?", cmd.order_id
        )
        if row is not None and row["status"] == "CHARGED":
            await sql.execute(
                conn, "UPDATE payments SET status = 'REFUNDED' WHERE order_id = ?", cmd.order_id
            )
            if faults.refunds:
                await sql.execute(
                    conn,
                    "INSERT INTO ledger VALUES (?, 'refund', ?)",
                    cmd.order_id,
                    row["amount_cents"],
                )

    async def setup() -> None:
        await sql.create_tables(service, TABLES)

    app = FastAPI(title="payment")
    app.state.setup = setup

    @app.get("/payments/{order_id}")
    async def payment(order_id: str) -> dict[str, Any]:
        async with service.transaction() as conn:
            row = await sql.fetchrow(conn, "SELECT * FROM payments WHERE order_id = ?", order_id)
        if row is None:
            raise HTTPException(404, "no payment")
        return row

    @app.get("/admin/audit")
    async def audit() -> dict[str, Any]:
        async with service.transaction() as conn:
            ledger = await sql.fetch(conn, "SELECT * FROM ledger")
        return {"ledger": ledger, **await service_state(service)}

    @app.get("/admin/busy")
    async def busy() -> dict[str, Any]:
        return await service_state(service)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {**await service.health(), **IDENTITY}

    return app
