"""Sagas on the service runtime: an orchestrating service and a participant service."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from pydantic import BaseModel

from msdata import Command, MessageRegistry
from msdata.errors import SagaStepFailed
from msdata.messages import message_type
from msdata.saga import Saga, SagaStatus, remote
from msdata.service import Service
from msdata.storage import current_connection

registry = MessageRegistry()


@message_type("svcsaga.Charge", registry=registry)
class Charge(Command):
    order_id: str
    amount: int


class Charged(BaseModel):
    payment_id: str


class Order(BaseModel):
    order_id: str
    amount: int
    payment_id: str | None = None


released: list[str] = []

checkout = (
    Saga("svc-checkout", Order)
    .step("reserve", lambda o: None, compensate=lambda o: released.append(o.order_id))
    .pivot(
        "charge",
        remote(
            lambda o: Charge(order_id=o.order_id, amount=o.amount),
            reply=Charged,
            on_reply=lambda o, r: o.model_copy(update={"payment_id": r.payment_id}),
        ),
        timeout=10,
    )
)


@pytest.mark.parametrize(
    "db", ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_checkout_saga_across_two_services(
    db: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    run = uuid.uuid4().hex[:8]
    pg = request.getfixturevalue("postgres_url") if db == "postgres" else ""

    def url(name: str) -> str:
        return {"memory": "memory://", "sqlite": f"sqlite:///{tmp_path}/{name}.db"}.get(db, pg)

    def schema(name: str) -> str | None:
        return f"saga_{name}_{run}" if db == "postgres" else None

    broker = f"memory://sagas-{db}"
    orders, payments = (
        Service(n, db=url(n), broker=broker, registry=registry, schema=schema(n))
        for n in ("orders", "payments")
    )
    orders.saga(checkout)
    charged: list[str] = []

    @payments.step(Charge)
    def charge(cmd: Charge) -> Charged:
        if cmd.amount > 100:
            raise SagaStepFailed("card declined")
        conn = current_connection()
        if db == "sqlite":
            conn.execute("CREATE TABLE IF NOT EXISTS charges (order_id TEXT PRIMARY KEY)")
            conn.execute("INSERT INTO charges VALUES (?)", (cmd.order_id,))
        charged.append(cmd.order_id)
        return Charged(payment_id=f"pay-{cmd.order_id}")

    try:
        async with orders, payments:
            ok = await orders.sagas.run(checkout, Order(order_id="o-1", amount=50), timeout=10)
            no = await orders.sagas.run(checkout, Order(order_id="o-2", amount=500), timeout=10)
            health = await orders.health()
    finally:
        if db == "postgres":
            import asyncpg

            conn = await asyncpg.connect(pg)
            try:
                for n in ("orders", "payments"):
                    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema(n)}" CASCADE')
            finally:
                await conn.close()
    assert ok.status is SagaStatus.COMPLETED and ok.data.payment_id == "pay-o-1"
    assert no.status is SagaStatus.COMPENSATED and "card declined" in (no.error or "")
    assert charged == ["o-1"] and "o-2" in released
    assert health["status"] == "ok", health
    assert health["workers"]["saga recovery"]["running"]
    assert "orders.saga-replies/saga-orchestrator" in health["consumers"]["subscriptions"]
