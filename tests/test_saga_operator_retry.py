"""An operator's retry of a FAILED saga reaches the fixed participant: the retried step or
compensation gets attempt numbers the step never used, so a participant that stored a
business failure (SagaStepFailed) for the earlier attempts runs its handler again (a
redelivery of an attempt it answered still gets the stored answer: test_saga_replies.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

from pydantic import BaseModel

from msdata import Command, MessageRegistry
from msdata.backoff import constant_backoff
from msdata.errors import SagaStepFailed
from msdata.messages import message_type
from msdata.saga import Retry, Saga, SagaStatus, remote
from msdata.service import Service

registry = MessageRegistry()


@message_type("opretry.Reserve", registry=registry)
class Reserve(Command):
    order_id: str


@message_type("opretry.Release", registry=registry)
class Release(Command):
    order_id: str


@message_type("opretry.Ship", registry=registry)
class Ship(Command):
    order_id: str


class Order(BaseModel):
    order_id: str


def decline(o: Order) -> None:
    raise SagaStepFailed("card declined")


compensate_saga = (
    Saga("opretry-comp", Order, compensation_retry=Retry(3, constant_backoff(0.01)))
    .step(
        "reserve",
        remote(lambda o: Reserve(order_id=o.order_id)),
        compensate=remote(lambda o: Release(order_id=o.order_id)),
        timeout=10,
    )
    .pivot("charge", decline)
)

ship_saga = (
    Saga("opretry-ship", Order)
    .pivot("charge", lambda o: None)
    .retriable(
        "ship",
        remote(lambda o: Ship(order_id=o.order_id)),
        retry=Retry(2, constant_backoff(0.01)),
        timeout=10,
    )
)


def _services(tmp_path: Path) -> tuple[Service, Service]:
    broker = f"memory://opretry-{uuid.uuid4().hex[:8]}"
    orders, stock = (
        Service(n, db=f"sqlite:///{tmp_path}/{n}.db", broker=broker, registry=registry)
        for n in ("orders", "stock")
    )
    orders.saga(compensate_saga)
    orders.saga(ship_saga)
    return orders, stock


def _attempts(history: list, step: str, event: str) -> list[int]:  # type: ignore[type-arg]
    return [h.attempt for h in history if h.step == step and h.event == event]


async def test_retry_of_a_failed_remote_compensation_runs_the_fixed_handler(
    tmp_path: Path,
) -> None:
    orders, stock = _services(tmp_path)
    fixed = False
    calls: list[bool] = []

    @stock.step(Reserve)
    def reserve(cmd: Reserve) -> None:
        pass

    @stock.step(Release)
    def release(cmd: Release) -> None:
        calls.append(fixed)
        if not fixed:
            raise SagaStepFailed("stock service broken")

    async with orders, stock:
        r = await orders.sagas.run(compensate_saga, Order(order_id="o-1"), saga_id="c-1")
        assert r.status is SagaStatus.FAILED, r.history
        assert calls == [False, False, False]
        # what the operator looks at: find() and stuck() give the saga's model, as get() does
        # (the SQLite store hands out the JSON dict)
        [found] = await orders.sagas.find(status=SagaStatus.FAILED)
        [stuck] = await orders.sagas.stuck()
        assert found.data == stuck.data == Order(order_id="o-1")
        assert isinstance((await orders.sagas.get("c-1")).data, Order)
        fixed = True  # the operator fixes the cause, then retries
        await orders.sagas.retry("c-1")
        r = await orders.sagas.wait("c-1", timeout=30)
    assert r.status is SagaStatus.COMPENSATED, r.history
    assert calls == [False, False, False, True]
    started = _attempts(r.history, "reserve", "compensation started")
    assert started == [1, 2, 3, 4], started  # never a number used before
    assert "stock service broken" not in (r.error or "")


async def test_retry_of_a_failed_limited_retriable_remote_step_runs_the_fixed_handler(
    tmp_path: Path,
) -> None:
    orders, stock = _services(tmp_path)
    fixed = False
    calls: list[bool] = []

    @stock.step(Ship)
    def ship(cmd: Ship) -> None:
        calls.append(fixed)
        if not fixed:
            raise SagaStepFailed("no courier")

    async with orders, stock:
        r = await orders.sagas.run(ship_saga, Order(order_id="o-2"), saga_id="s-1")
        assert r.status is SagaStatus.FAILED, r.history
        assert calls == [False, False]
        await orders.sagas.retry("s-1")  # not fixed yet: the policy's 2 attempts again
        r = await orders.sagas.wait("s-1", timeout=30)
        assert r.status is SagaStatus.FAILED, r.history
        assert calls == [False] * 4
        fixed = True
        await orders.sagas.retry("s-1")
        r = await orders.sagas.wait("s-1", timeout=30)
    assert r.status is SagaStatus.COMPLETED, r.history
    assert calls == [False] * 4 + [True]
    assert _attempts(r.history, "ship", "step started") == [1, 2, 3, 4, 5]
