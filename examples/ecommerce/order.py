"""Order: places orders, runs the checkout saga, keeps the order-summary read model, and
answers an order's details by composing the three services' answers."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import httpx
from examples.ecommerce import sql
from examples.ecommerce.common import IDENTITY
from examples.ecommerce.inventory import service_state
from examples.ecommerce.messages import (
    Charged,
    ChargePayment,
    OrderCancelled,
    OrderCompleted,
    OrderPlaced,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
)
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

from msdata.backoff import exponential_backoff
from msdata.composition import compose, optional, required
from msdata.errors import (
    CompositionTimeout,
    ConcurrencyError,
    RequiredPartFailed,
    SagaNotFound,
    SagaStateError,
)
from msdata.idempotency import IdempotencyKeys
from msdata.idempotency.asgi import IdempotencyMiddleware
from msdata.ids import new_id
from msdata.projections import Projection, ProjectionContext, handles
from msdata.saga import Retry, Saga, SagaStatus, remote
from msdata.service import Service

PRICES = {"book": 1_250, "lamp": 4_900, "mug": 800, "rare-print": 25_000}

TABLES = [
    "CREATE TABLE IF NOT EXISTS orders (order_id TEXT PRIMARY KEY, sku TEXT NOT NULL, "
    "quantity INT NOT NULL, amount_cents INT NOT NULL, card TEXT NOT NULL, "
    "status TEXT NOT NULL, placed_at DOUBLE PRECISION NOT NULL, "
    # the request's key, also here: a process killed after this commit but before the
    # idempotency middleware stored the answer must not make a second order on the retry
    "idempotency_key TEXT UNIQUE)",
]


class PlaceOrder(BaseModel):
    sku: str
    quantity: int = Field(gt=0, le=100)
    card: str


class Checkout(BaseModel):
    """The checkout saga's data."""

    order_id: str
    sku: str
    quantity: int
    amount_cents: int
    card: str
    payment_id: str | None = None


class OrderSummary(Projection):
    """The order-summary read model: one row per order with its status, kept from the
    order's events (generation n in ``order_summary_n``, readers use view
    ``order_summary``)."""

    name = "order_summary"

    async def setup(self, conn: Any, generation: int) -> None:
        await sql.execute(conn, f"DROP TABLE IF EXISTS order_summary_{generation}")
        await sql.execute(
            conn,
            f"CREATE TABLE order_summary_{generation} (order_id TEXT PRIMARY KEY, "
            "status TEXT NOT NULL, amount_cents INT NOT NULL)",
        )

    async def activate(self, conn: Any, generation: int) -> None:
        await sql.execute(conn, "DROP VIEW IF EXISTS order_summary")
        await sql.execute(
            conn, f"CREATE VIEW order_summary AS SELECT * FROM order_summary_{generation}"
        )

    async def drop(self, conn: Any, generation: int) -> None:
        await sql.execute(conn, f"DROP TABLE IF EXISTS order_summary_{generation}")

    @handles(OrderPlaced)
    async def placed(self, ctx: ProjectionContext, e: OrderPlaced) -> None:
        await sql.execute(
            ctx.conn,
            f"INSERT INTO order_summary_{ctx.generation} VALUES (?, 'PLACED', ?)",
            e.order_id,
            e.amount_cents,
        )

    async def _status(self, ctx: ProjectionContext, order_id: str, status: str) -> None:
        await sql.execute(
            ctx.conn,
            f"UPDATE order_summary_{ctx.generation} SET status = ? WHERE order_id = ?",
            status,
            order_id,
        )

    @handles(OrderCompleted)
    async def completed(self, ctx: ProjectionContext, e: OrderCompleted) -> None:
        await self._status(ctx, e.order_id, "COMPLETED")

    @handles(OrderCancelled)
    async def cancelled(self, ctx: ProjectionContext, e: OrderCancelled) -> None:
        await self._status(ctx, e.order_id, "CANCELLED")


class OrderService:
    """The Order service on a :class:`msdata.service.Service`: ``app`` is its HTTP API."""

    def __init__(
        self,
        service: Service,
        *,
        payment: httpx.AsyncClient,
        inventory: httpx.AsyncClient,
        step_timeout: float = 10.0,
        charge_timeout: float = 2.0,
        part_timeout: float = 0.5,
    ) -> None:
        self.service = service
        self.payment = payment
        self.inventory = inventory
        self.part_timeout = part_timeout
        # bounded (the library requires it): used up, the instance is FAILED for an operator
        compensations = Retry(30, exponential_backoff(0.1, 2.0, 2.0))
        self.checkout = (
            Saga("checkout", Checkout, compensation_retry=compensations)
            # the order itself: cancelled when the checkout is compensated
            .step("open", lambda d: None, compensate=self._cancel)
            .step(
                "reserve",
                remote(lambda d: ReserveStock(order_id=d.order_id, sku=d.sku, quantity=d.quantity)),
                compensate=remote(lambda d: ReleaseStock(order_id=d.order_id)),
                timeout=step_timeout,
            )
            .step(
                "charge",
                remote(
                    lambda d: ChargePayment(
                        order_id=d.order_id, amount_cents=d.amount_cents, card=d.card
                    ),
                    reply=Charged,
                    on_reply=lambda d, r: d.model_copy(update={"payment_id": r.payment_id}),
                ),
                compensate=remote(lambda d: RefundPayment(order_id=d.order_id)),
                timeout=charge_timeout,
            )
            .pivot("confirm", self._confirm)
        )
        self.orchestrator = service.sagas  # lease and recovery interval: make_service
        service.saga(self.checkout)
        # the saga starts from the order's own event (so an order committed just before a
        # crash still gets its checkout); the saga id is the order id, so a duplicate
        # delivery finds the instance and does nothing
        service.bus.subscribe(OrderPlaced, self._start_checkout, group="order-checkout")
        self.summary = service.projection(OrderSummary())
        self.app = self._app()

    # -- the saga's local steps ---------------------------------------------------------------

    async def _finish(self, order_id: str, status: str, event: Any) -> None:
        async with self.service.transaction() as conn:
            changed = await sql.execute(
                conn,
                "UPDATE orders SET status = ? WHERE order_id = ? AND status = 'PLACED'",
                status,
                order_id,
            )
            if changed:
                await sql.append(self.service.events, conn, f"order-{order_id}", 1, event)

    async def _confirm(self, d: Checkout) -> None:
        await self._finish(d.order_id, "COMPLETED", OrderCompleted(order_id=d.order_id))

    async def _cancel(self, d: Checkout) -> None:
        await self._finish(d.order_id, "CANCELLED", OrderCancelled(order_id=d.order_id))

    async def _start_checkout(self, e: OrderPlaced) -> None:
        with contextlib.suppress(SagaNotFound):
            await self.orchestrator.get(e.order_id)
            return
        data = Checkout(
            order_id=e.order_id,
            sku=e.sku,
            quantity=e.quantity,
            amount_cents=e.amount_cents,
            card=e.card,
        )
        # a duplicate delivery started it meanwhile
        with contextlib.suppress(ConcurrencyError, SagaStateError):
            await self.orchestrator.start(self.checkout, data, saga_id=e.order_id)

    async def setup(self) -> None:
        """Before the service starts: its tables, and the checkout's consumer group (a
        plain bus subscription, which the service does not declare: on RabbitMQ an
        OrderPlaced the relay publishes at start-up would find no queue)."""
        await sql.create_tables(self.service, TABLES)
        await self.service.transport.declare_group(
            self.service.bus.topic_of(OrderPlaced), "order-checkout"
        )

    # -- HTTP ------------------------------------------------------------------------------

    def _app(self) -> FastAPI:
        app = FastAPI(title="order")
        service = self.service

        @app.post("/orders", status_code=201)
        async def place(body: PlaceOrder, request: Request) -> dict[str, Any]:
            if body.sku not in PRICES:
                raise HTTPException(422, f"unknown sku {body.sku!r}")
            order_id = new_id()
            amount = PRICES[body.sku] * body.quantity
            key = request.headers.get("idempotency-key")
            async with service.transaction() as conn:
                known = await sql.fetchrow(
                    conn,
                    "SELECT order_id, amount_cents FROM orders WHERE idempotency_key = ?",
                    key,
                )
                if known is not None:
                    return {**known, "status": "PLACED"}
                await sql.execute(
                    conn,
                    "INSERT INTO orders VALUES (?, ?, ?, ?, ?, 'PLACED', ?, ?)",
                    order_id,
                    body.sku,
                    body.quantity,
                    amount,
                    body.card,
                    time.time(),
                    key,
                )
                placed = OrderPlaced(
                    order_id=order_id,
                    sku=body.sku,
                    quantity=body.quantity,
                    amount_cents=amount,
                    card=body.card,
                )
                # the order's event stream; the event log adds it to the outbox too
                await sql.append(service.events, conn, f"order-{order_id}", 0, placed)
            return {"order_id": order_id, "status": "PLACED", "amount_cents": amount}

        @app.get("/orders/{order_id}")
        async def get_order(order_id: str) -> dict[str, Any]:
            async with service.transaction() as conn:
                row = await sql.fetchrow(conn, "SELECT * FROM orders WHERE order_id = ?", order_id)
            if row is None:
                raise HTTPException(404, "no such order")
            return row

        async def remote_part(client: httpx.AsyncClient, path: str) -> Any:
            r = await client.get(path)
            if r.status_code == 404:
                return None
            r.raise_for_status()
            return r.json()

        @app.get("/orders/{order_id}/details")
        async def details(order_id: str) -> dict[str, Any]:
            order = required("order", get_order, order_id, timeout=self.part_timeout)
            pay = optional(
                "payment",
                remote_part,
                self.payment,
                f"/payments/{order_id}",
                timeout=self.part_timeout,
            )
            stock = optional(
                "inventory",
                remote_part,
                self.inventory,
                f"/reservations/{order_id}",
                timeout=self.part_timeout,
            )
            # docs/composition.md: a required part that fails is the server's failure
            # (502), except an unknown order, which is the client's (404, as GET
            # /orders/{id}); the overall deadline passed: 504
            try:
                answer = await compose(order, pay, stock, deadline=2 * self.part_timeout)
            except RequiredPartFailed as error:
                cause = error.__cause__
                if isinstance(cause, HTTPException) and cause.status_code == 404:
                    raise HTTPException(404, "no such order") from None
                raise HTTPException(502, f"{error.part}: {error.reason}") from None
            except CompositionTimeout as error:
                raise HTTPException(504, str(error)) from None
            return {
                "order": answer[order],
                "payment": answer[pay],
                "reservation": answer[stock],
                "unavailable": sorted(answer.missing),
            }

        @app.get("/admin/busy")
        async def busy() -> dict[str, Any]:
            """What is still going on (cheap: the driver asks it until all is quiet)."""
            async with service.transaction() as conn:
                row = await sql.fetchrow(
                    conn, "SELECT count(*) AS n FROM orders WHERE status = 'PLACED'"
                )
            running = await self.orchestrator.find(
                saga_type="checkout",
                status=[SagaStatus.RUNNING, SagaStatus.COMPENSATING],
                limit=1,
            )
            failed = await self.orchestrator.find(
                saga_type="checkout", status=SagaStatus.FAILED, limit=1_000_000
            )
            lag = await self.summary.lag()
            return {
                "open_orders": (row or {"n": 0})["n"] - len(failed),
                "running_sagas": len(running),
                "projection_lag": lag.events,
                **await service_state(service),
            }

        @app.get("/admin/audit")
        async def audit() -> dict[str, Any]:
            async with service.transaction() as conn:
                orders = await sql.fetch(conn, "SELECT * FROM orders")
                summary = await sql.fetch(conn, "SELECT * FROM order_summary")
            sagas: dict[str, Any] = {}
            for status in SagaStatus:
                found = await self.orchestrator.find(
                    saga_type="checkout", status=status, limit=1_000_000
                )
                for r in found:
                    sagas[r.saga_id] = {"status": r.status.value, "ended": r.updated_at.timestamp()}
            lag = await self.summary.lag()
            return {
                "orders": orders,
                "summary": summary,
                "sagas": sagas,
                "projection_lag": lag.events,
                **await service_state(service),
            }

        @app.get("/health")
        async def health() -> dict[str, Any]:
            return {**await service.health(), **IDENTITY}

        return app


def idempotent(app: FastAPI, keys: IdempotencyKeys) -> Any:
    """``app`` behind the idempotency middleware: ``POST /orders`` needs an
    ``Idempotency-Key``; a retry gets the first answer."""
    app.add_middleware(
        IdempotencyMiddleware,
        keys=keys,
        owner=lambda scope: "shop",  # one client here; a real shop: the API client's id
        paths=("/orders",),
    )
    return app
