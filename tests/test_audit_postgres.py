"""The audit trail read from a PostgreSQL outbox (pending, parked and kept sent rows)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import asyncpg
import pytest

from msdata.adapters.memory import MemoryTransport
from msdata.adapters.postgres import PostgresOutboxStore
from msdata.adapters.postgres.audit import PostgresOutboxAudit
from msdata.audit import audit_trail
from msdata.messages import Event, MessageRegistry, handling, make_envelope
from msdata.outbox import Outbox, OutboxRelay

pytestmark = pytest.mark.postgres

registry = MessageRegistry()


class OrderPlaced(Event):
    order_id: str


class PaymentRequested(Event):
    order_id: str


registry.register(OrderPlaced, "orders.OrderPlaced", 1)
registry.register(PaymentRequested, "billing.PaymentRequested", 1)


async def test_the_rows_of_one_correlation_id_sent_and_pending(postgres_url: str) -> None:
    store = PostgresOutboxStore(postgres_url, table_prefix=f"t{uuid.uuid4().hex[:10]}_")
    await store.create_schema()
    try:
        outbox = Outbox(store, registry=registry, source="orders")
        placed = make_envelope(OrderPlaced(order_id="42"), registry=registry)
        conn = await asyncpg.connect(postgres_url)
        try:
            async with conn.transaction():
                await outbox.add_async(conn, placed, key="42")
                await outbox.add_async(conn, OrderPlaced(order_id="43"), key="43")  # another
            relay = OutboxRelay(store, MemoryTransport(), retention=timedelta(hours=1))
            assert await relay.run_once() == 2
            with handling(placed):
                async with conn.transaction():
                    await outbox.add_async(conn, PaymentRequested(order_id="42"), key="42")
        finally:
            await conn.close()
        assert placed.correlation_id is not None
        trail = await audit_trail(placed.correlation_id, [PostgresOutboxAudit(store, name="o")])
        assert [(e.type, e.where) for e in trail] == [
            ("orders.OrderPlaced", "outbox o: sent"),
            ("billing.PaymentRequested", "outbox o: pending"),
        ]
        assert trail[0].message_id == placed.id and trail[1].causation_id == placed.id
        assert "sent_at" in trail[0].detail
    finally:
        await store.drop_schema()
        await store.close()
