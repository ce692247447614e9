"""The saga orchestrator on the memory store: definitions, local steps, compensation,
retries, timeouts, parallel groups, cancellation, the operator API, remote steps over the
memory transport."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import BaseModel

from msdata import Command, message_type
from msdata.adapters.memory import (
    MemoryIdempotencyStore,
    MemoryOutboxStore,
    MemoryTransaction,
    MemoryTransport,
)
from msdata.adapters.memory.saga import MemorySagaStore
from msdata.backoff import constant_backoff
from msdata.errors import (
    ConfigurationError,
    SagaDefinitionError,
    SagaStateError,
    SagaStepFailed,
)
from msdata.events import EventBus
from msdata.idempotency.keys import _check as check_idempotency_key
from msdata.outbox import Outbox, OutboxRelay
from msdata.saga import (
    MAX_SAGA_ID,
    MAX_STEP_NAME,
    Remote,
    Retry,
    Saga,
    SagaOrchestrator,
    SagaParticipant,
    SagaStatus,
    Step,
    StepKind,
    current_step,
    remote,
)
from msdata.saga.messages import idempotency_key
from msdata.storage import current_connection
from msdata.testing import FakeClock, eventually


class Order(BaseModel):
    order_id: str = "o-1"
    reserved: bool = False
    charged: bool = False
    payment_id: str | None = None
    notes: list[str] = []


@dataclass
class Log:
    calls: list[str] = field(default_factory=list)

    def step(self, name: str, fail: int = 0, field_: str | None = None) -> Any:
        """A step that records its call and fails its first ``fail`` calls."""
        left = [fail]

        def action(d: Order) -> Order | None:
            self.calls.append(name)
            if left[0] > 0:
                left[0] -= 1
                raise SagaStepFailed(f"{name} failed")
            return d.model_copy(update={field_: True}) if field_ else None

        return action


# -- definitions ---------------------------------------------------------------------------


def test_definition_errors_say_why() -> None:
    noop = lambda d: d  # noqa: E731
    with pytest.raises(SagaDefinitionError, match="no compensation"):
        Saga("s", Order).step("a", noop, compensate=None)
    with pytest.raises(SagaDefinitionError, match="after the pivot"):
        Saga("s", Order).pivot("p", noop).step("a", noop, compensate=noop)
    with pytest.raises(SagaDefinitionError, match="after the retriable"):
        Saga("s", Order).retriable("r", noop).step("a", noop, compensate=noop)
    with pytest.raises(SagaDefinitionError, match="two steps are named 'a'"):
        Saga("s", Order).step("a", noop, compensate=noop).pivot("a", noop)
    with pytest.raises(SagaDefinitionError, match="second pivot"):
        Saga("s", Order).pivot("p", noop).pivot("q", noop)
    with pytest.raises(SagaDefinitionError, match="pivot cannot be in a parallel"):
        Saga("s", Order).parallel(
            Step.compensatable("a", noop, compensate=noop),
            Step("p", StepKind.PIVOT, noop),
        )
    with pytest.raises(SagaDefinitionError, match="one kind of step"):
        Saga("s", Order).parallel(
            Step.compensatable("a", noop, compensate=noop), Step.retriable("b", noop)
        )
    with pytest.raises(SagaDefinitionError, match="needs a timeout"):
        Saga("s", Order).pivot("p", remote(lambda d: Reserve(order_id=d.order_id)))
    with pytest.raises(SagaDefinitionError, match="pydantic model"):
        Saga("s", dict)  # type: ignore[type-var]
    with pytest.raises(SagaDefinitionError, match="attempts"):
        Retry(0)
    with pytest.raises(SagaDefinitionError, match="has no steps"):
        SagaOrchestrator(MemorySagaStore(), [Saga("empty", Order)])
    with pytest.raises(SagaDefinitionError, match="no compensation"):
        Saga("s", Order).parallel(
            Step("a", StepKind.COMPENSATABLE, noop), Step("b", StepKind.COMPENSATABLE, noop)
        )
    used = Saga("used", Order).pivot("p", noop)
    SagaOrchestrator(MemorySagaStore(), [used])
    with pytest.raises(SagaDefinitionError, match="in use by an orchestrator"):
        used.retriable("r", noop)


def test_remote_steps_need_a_bus_and_an_outbox() -> None:
    saga = Saga("s", Order).pivot("p", remote(lambda d: Reserve(order_id=d.order_id)), timeout=5)
    with pytest.raises(ConfigurationError, match="bus= and outbox="):
        SagaOrchestrator(MemorySagaStore(), [saga])


# -- local steps ---------------------------------------------------------------------------


async def test_local_saga_completes_with_updated_data_and_history() -> None:
    log = Log()
    saga = (
        Saga("checkout", Order)
        .step("reserve", log.step("reserve", field_="reserved"), compensate=log.step("release"))
        .pivot("charge", log.step("charge", field_="charged"))
        .retriable("confirm", log.step("confirm"))
    )
    orch = SagaOrchestrator(MemorySagaStore(), [saga], clock=FakeClock())
    rec = await orch.run(saga, Order())
    assert rec.status is SagaStatus.COMPLETED
    assert rec.data.reserved and rec.data.charged
    assert log.calls == ["reserve", "charge", "confirm"]
    events = [(h.event, h.step) for h in await orch.history(rec.saga_id)]
    assert events == [
        ("started", None),
        *[
            (e, s)
            for s in ("reserve", "charge", "confirm")
            for e in ("step started", "step completed")
        ],
        ("completed", None),
    ]
    assert (await orch.get(rec.saga_id)).data == rec.data


async def test_state_is_saved_before_each_effect() -> None:
    store = MemorySagaStore()
    seen: list[tuple[str, str]] = []

    async def look(d: Order) -> None:
        ctx = current_step()
        rec = await store.get(ctx.saga_id)
        seen.append((ctx.step, rec.active[ctx.step].state))

    saga = Saga("s", Order).step("a", look, compensate=look).pivot("b", look)
    rec = await SagaOrchestrator(store, [saga]).run(saga, Order())
    assert rec.status is SagaStatus.COMPLETED
    assert seen == [("a", "running"), ("b", "running")]


async def test_failure_compensates_completed_steps_in_reverse_and_not_the_failed_one() -> None:
    log = Log()
    saga = (
        Saga("s", Order)
        .step("a", log.step("a"), compensate=log.step("undo-a"))
        .step("b", log.step("b"), compensate=log.step("undo-b"))
        .pivot("c", log.step("c", fail=1))
        .retriable("d", log.step("d"))
    )
    rec = await SagaOrchestrator(MemorySagaStore(), [saga]).run(saga, Order())
    assert rec.status is SagaStatus.COMPENSATED
    assert rec.error == "step 'c' failed: SagaStepFailed: c failed"
    assert log.calls == ["a", "b", "c", "undo-b", "undo-a"]


async def test_step_retry_policy_with_backoff_on_the_clock() -> None:
    log = Log()
    clock = FakeClock()
    saga = Saga("s", Order).pivot(
        "flaky", log.step("flaky", fail=2), retry=Retry(3, constant_backoff(5.0))
    )
    orch = SagaOrchestrator(MemorySagaStore(), [saga], clock=clock)
    task = asyncio.create_task(orch.run(saga, Order()))
    for expected in (1, 2, 3):
        await eventually(
            lambda n=expected: (len(log.calls) == n and clock.sleepers > 0) or task.done()
        )  # type: ignore[misc]
        clock.advance(5)
    rec = await task
    assert rec.status is SagaStatus.COMPLETED
    assert log.calls == ["flaky"] * 3
    retries = [h for h in rec.history if h.event == "retry"]
    assert [h.attempt for h in retries] == [1, 2]


async def test_failed_compensation_is_failed_and_visible_then_operator_retry() -> None:
    log = Log()
    undo = log.step("undo-a", fail=2)
    saga = (
        Saga("s", Order, compensation_retry=Retry(2, constant_backoff(0)))
        .step("a", log.step("a"), compensate=undo)
        .pivot("b", log.step("b", fail=1))
    )
    store = MemorySagaStore()
    orch = SagaOrchestrator(store, [saga])
    rec = await orch.run(saga, Order())
    assert rec.status is SagaStatus.FAILED
    assert "compensation of 'a' failed" in (rec.error or "")
    assert [r.saga_id for r in await orch.stuck()] == [rec.saga_id]
    assert [r.saga_id for r in await orch.find(status=SagaStatus.FAILED)] == [rec.saga_id]
    with pytest.raises(SagaStateError):
        await orch.abort(rec.saga_id)
    again = await orch.retry(rec.saga_id)
    assert again.status is SagaStatus.COMPENSATED
    assert log.calls == ["a", "b", "undo-a", "undo-a", "undo-a"]
    with pytest.raises(SagaStateError, match="only a FAILED"):
        await orch.retry(rec.saga_id)


async def test_retriable_step_with_a_limit_fails_then_resumes_forward() -> None:
    log = Log()
    saga = (
        Saga("s", Order)
        .step("a", log.step("a"), compensate=log.step("undo-a"))
        .pivot("p", log.step("p"))
        .retriable("r", log.step("r", fail=2), retry=Retry(2, constant_backoff(0)))
    )
    orch = SagaOrchestrator(MemorySagaStore(), [saga])
    rec = await orch.run(saga, Order())
    assert rec.status is SagaStatus.FAILED
    again = await orch.retry(rec.saga_id)
    assert again.status is SagaStatus.COMPLETED
    assert "undo-a" not in log.calls  # nothing after the pivot is ever compensated


async def test_parallel_group_compensates_its_completed_members_then_earlier_steps() -> None:
    log = Log()
    saga = (
        Saga("s", Order)
        .step("first", log.step("first"), compensate=log.step("undo-first"))
        .parallel(
            Step.compensatable(
                "x", log.step("x", field_="reserved"), compensate=log.step("undo-x")
            ),
            Step.compensatable("y", log.step("y", fail=1), compensate=log.step("undo-y")),
            Step.compensatable("z", log.step("z", field_="charged"), compensate=log.step("undo-z")),
        )
        .pivot("p", log.step("p"))
    )
    rec = await SagaOrchestrator(MemorySagaStore(), [saga]).run(saga, Order())
    assert rec.status is SagaStatus.COMPENSATED
    assert log.calls[:4] == ["first", "x", "y", "z"]
    assert sorted(log.calls[4:6]) == ["undo-x", "undo-z"]
    assert log.calls[6:] == ["undo-first"]


async def test_parallel_group_merges_the_fields_each_step_changed() -> None:
    log = Log()
    saga = (
        Saga("s", Order)
        .parallel(
            Step.compensatable("x", log.step("x", field_="reserved"), compensate=log.step("u")),
            Step.compensatable("y", log.step("y", field_="charged"), compensate=log.step("u")),
        )
        .pivot("p", log.step("p"))
    )
    rec = await SagaOrchestrator(MemorySagaStore(), [saga]).run(saga, Order())
    assert rec.status is SagaStatus.COMPLETED
    assert rec.data.reserved and rec.data.charged


async def test_local_step_timeout_on_the_clock() -> None:
    clock = FakeClock()
    calls: list[str] = []

    async def hangs(d: Order) -> None:
        calls.append("hangs")
        await asyncio.Event().wait()

    saga = (
        Saga("s", Order)
        .step("a", lambda d: None, compensate=lambda d: calls.append("undo-a"))
        .pivot("slow", hangs, timeout=10)
    )
    orch = SagaOrchestrator(MemorySagaStore(), [saga], clock=clock)
    task = asyncio.create_task(orch.run(saga, Order()))
    await eventually(lambda: calls == ["hangs"] and clock.sleepers > 0)
    clock.advance(10)
    rec = await task
    assert rec.status is SagaStatus.COMPENSATED
    assert "did not finish within 10" in (rec.error or "")
    assert calls == ["hangs", "undo-a"]


async def test_deadline_before_the_pivot_compensates() -> None:
    clock = FakeClock()
    log = Log()

    async def slow(d: Order) -> None:
        clock.advance(61)

    saga = (
        Saga("s", Order, deadline=60)
        .step("a", log.step("a"), compensate=log.step("undo-a"))
        .step("b", slow, compensate=log.step("undo-b"))
        .pivot("p", log.step("p"))
    )
    rec = await SagaOrchestrator(MemorySagaStore(), [saga], clock=clock).run(saga, Order())
    assert rec.status is SagaStatus.COMPENSATED
    assert "deadline" in (rec.error or "")
    assert log.calls == ["a", "undo-b", "undo-a"]


async def test_a_saga_id_is_used_once() -> None:
    saga = Saga("s", Order).pivot("p", lambda d: None)
    orch = SagaOrchestrator(MemorySagaStore(), [saga])
    await orch.run(saga, Order(), saga_id="same")
    with pytest.raises(SagaStateError, match="exists"):
        await orch.run(saga, Order(), saga_id="same")


# -- cancellation and recovery -------------------------------------------------------------


async def test_cancelled_saga_stays_running_and_recovery_finishes_it_without_compensating() -> None:
    clock = FakeClock()
    store = MemorySagaStore()
    log = Log()
    entered = asyncio.Event()

    async def charge(d: Order) -> Order:
        log.calls.append("charge")
        if not entered.is_set():
            entered.set()
            await asyncio.Event().wait()  # the process is told to stop while in here
        return d.model_copy(update={"charged": True})

    saga = (
        Saga("s", Order)
        .step("reserve", log.step("reserve", field_="reserved"), compensate=log.step("release"))
        .pivot("charge", charge)
    )
    orch = SagaOrchestrator(store, [saga], clock=clock, lease_seconds=30)
    task = asyncio.create_task(orch.start(saga, Order(), saga_id="s-1"))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    rec = await store.get("s-1")
    assert rec.status is SagaStatus.RUNNING and rec.active["charge"].state == "running"
    assert "compensating" not in [h.event for h in rec.history]
    worker = SagaOrchestrator(store, [saga], clock=clock, lease_seconds=30)
    assert await worker.recover() == 0  # its lease is still live
    clock.advance(31)
    assert await worker.recover() == 1
    rec = await worker.get("s-1")
    assert rec.status is SagaStatus.COMPLETED and rec.data.charged and rec.data.reserved
    assert log.calls == ["reserve", "charge", "charge"]
    assert "release" not in log.calls
    assert [h.event for h in rec.history].count("interrupted") == 1


async def test_a_worker_whose_lease_was_taken_stops_at_its_next_save() -> None:
    clock = FakeClock()
    store = MemorySagaStore()
    gate = asyncio.Event()
    calls: list[str] = []

    async def slow(d: Order) -> None:
        calls.append("slow")
        await gate.wait()

    saga = (
        Saga("s", Order)
        .step("slow", slow, compensate=lambda d: None)
        .pivot("p", lambda d: calls.append("p"))
    )
    a = SagaOrchestrator(store, [saga], clock=clock, lease_seconds=10)
    b = SagaOrchestrator(store, [saga], clock=clock, lease_seconds=10)
    task = asyncio.create_task(a.start(saga, Order(), saga_id="x"))
    await eventually(lambda: calls == ["slow"])
    clock.advance(11)
    recovered = asyncio.create_task(b.recover())
    await eventually(lambda: calls == ["slow", "slow"])
    gate.set()
    await recovered
    await task  # a's save conflicts: it stops without doing "p" again
    assert calls == ["slow", "slow", "p"]
    assert (await store.get("x")).status is SagaStatus.COMPLETED


# -- remote steps over the memory transport -------------------------------------------------


@message_type("test.saga.Reserve")
class Reserve(Command):
    order_id: str


@message_type("test.saga.Release")
class Release(Command):
    order_id: str


@message_type("test.saga.Charge")
class Charge(Command):
    order_id: str


class Charged(BaseModel):
    payment_id: str


@dataclass
class World:
    """The orchestrator's service and one participant service, on the memory transport."""

    orch: SagaOrchestrator
    clock: FakeClock
    effects: list[str]
    transport: MemoryTransport
    saga: Saga[Order]
    fail: set[str]
    silent: set[str]
    saga_store: MemorySagaStore


@pytest.fixture
async def world() -> AsyncIterator[World]:
    clock = FakeClock()
    transport = MemoryTransport()
    saga_store, orch_outbox_store = MemorySagaStore(), MemoryOutboxStore()
    part_outbox_store, part_replies = MemoryOutboxStore(), MemoryIdempotencyStore()
    orch_bus = EventBus(transport, source="orders", backoff=lambda n: 0.01)
    part_bus = EventBus(transport, source="payments", backoff=lambda n: 0.01)
    effects: list[str] = []
    fail: set[str] = set()
    silent: set[str] = set()

    saga = (
        Saga("remote-checkout", Order)
        .step(
            "reserve",
            remote(lambda d: Reserve(order_id=d.order_id)),
            compensate=remote(lambda d: Release(order_id=d.order_id)),
            timeout=30,
        )
        .pivot(
            "charge",
            remote(
                lambda d: Charge(order_id=d.order_id),
                reply=Charged,
                on_reply=lambda d, r: d.model_copy(update={"payment_id": r.payment_id}),
            ),
            timeout=30,
        )
    )
    orch = SagaOrchestrator(
        saga_store,
        [saga],
        bus=orch_bus,
        outbox=Outbox(orch_outbox_store, source="orders"),
        clock=clock,
    )
    participant = SagaParticipant(
        part_bus,
        Outbox(part_outbox_store, source="payments"),
        MemoryTransaction,
        idempotency=part_replies,
        clock=clock,
    )

    def effect(name: str) -> None:
        if name in silent:
            raise RuntimeError("not answering")  # nacked: no reply ever
        if name in fail:
            raise SagaStepFailed(f"{name} refused")
        tx = current_connection()
        tx.on_commit(lambda: effects.append(name))

    @participant.handler(Reserve, group="stock")
    def reserve(cmd: Reserve) -> None:
        effect("reserve")

    @participant.handler(Release, group="stock")
    def release(cmd: Release) -> None:
        effect("release")

    @participant.handler(Charge, group="payments")
    def charge(cmd: Charge) -> Charged:
        effect("charge")
        return Charged(payment_id=f"pay-{cmd.order_id}")

    relays = [
        OutboxRelay(orch_outbox_store, transport, poll_interval=0.01),
        OutboxRelay(part_outbox_store, transport, poll_interval=0.01),
    ]
    async with orch_bus, part_bus, relays[0], relays[1]:
        yield World(orch, clock, effects, transport, saga, fail, silent, saga_store)
        await orch.close()


async def waiting_on(world: World, saga_id: str, step: str) -> None:
    async def parked() -> bool:
        rec = await world.saga_store.get(saga_id)
        run = rec.active.get(step)
        return rec.lease_owner is None and run is not None and run.state == "waiting"

    await eventually(parked, what=f"saga waits for {step}")


async def test_remote_saga_completes_with_reply_data(world: World) -> None:
    rec = await world.orch.start(world.saga, Order(order_id="o-7"))
    assert rec.status is SagaStatus.RUNNING and rec.active["reserve"].state == "waiting"
    done = await world.orch.wait(rec.saga_id, timeout=10, poll=0.02)
    assert done.status is SagaStatus.COMPLETED
    assert done.data.payment_id == "pay-o-7"
    assert world.effects == ["reserve", "charge"]


async def test_remote_failure_reply_compensates(world: World) -> None:
    world.fail.add("charge")
    rec = await world.orch.start(world.saga, Order())
    done = await world.orch.wait(rec.saga_id, timeout=10, poll=0.02)
    assert done.status is SagaStatus.COMPENSATED
    assert done.error == "step 'charge' failed: charge refused"
    assert world.effects == ["reserve", "release"]


async def test_no_reply_before_the_timeout_is_a_failure(world: World) -> None:
    world.silent.add("reserve")
    rec = await world.orch.start(world.saga, Order())
    await waiting_on(world, rec.saga_id, "reserve")
    world.clock.advance(31)
    done = await world.orch.wait(rec.saga_id, timeout=10, poll=0.02)
    assert done.status is SagaStatus.COMPENSATED
    assert "no reply within 30" in (done.error or "")
    # it may have happened without answering: its compensation is sent all the same
    assert world.effects == ["release"]


async def test_an_unanswered_pivot_is_asked_again_never_compensated(world: World) -> None:
    world.silent.add("charge")
    rec = await world.orch.start(world.saga, Order())
    await waiting_on(world, rec.saga_id, "charge")
    world.clock.advance(31)
    await eventually(
        lambda: any(h.event == "retry" for h in world.saga_store.snapshot(rec.saga_id).history)
    )
    world.silent.clear()
    await waiting_on(world, rec.saga_id, "charge")
    done = await world.orch.wait(rec.saga_id, timeout=10, poll=0.02)
    assert done.status is SagaStatus.COMPLETED
    assert world.effects == ["reserve", "charge"]


async def test_late_and_duplicate_replies_are_recorded_and_ignored(world: World) -> None:
    rec = await world.orch.start(world.saga, Order())
    done = await world.orch.wait(rec.saga_id, timeout=10, poll=0.02)
    assert done.status is SagaStatus.COMPLETED
    # the participant's reply is delivered again, as a broker may do
    from msdata.saga import SagaReply

    again = SagaReply(
        saga_id=rec.saga_id,
        saga_type="remote-checkout",
        step="charge",
        purpose="action",
        attempt=1,
        ok=True,
        data={"payment_id": "other"},
    )
    await world.orch._on_reply(again)
    after = await world.orch.get(rec.saga_id)
    assert after.data.payment_id == done.data.payment_id
    assert after.history[-1].event == "reply ignored"
    assert world.effects == ["reserve", "charge"]


async def test_operator_aborts_a_waiting_saga_into_compensation(world: World) -> None:
    world.silent.add("reserve")
    rec = await world.orch.start(world.saga, Order())
    await waiting_on(world, rec.saga_id, "reserve")
    world.silent.discard("reserve")  # the release must be answered
    await world.orch.abort(rec.saga_id, "customer cancelled")
    done = await world.orch.wait(rec.saga_id, timeout=10, poll=0.02)
    assert done.status is SagaStatus.COMPENSATED
    assert done.error == "aborted: customer cancelled"
    assert "charge" not in world.effects
    assert world.effects[-1:] == ["release"]


async def test_a_saga_whose_pivot_command_is_out_cannot_be_aborted(world: World) -> None:
    # the charge may still happen whatever the orchestrator does now; a pivot is never
    # compensated, so an abort would leave a charge behind a COMPENSATED saga
    world.silent.add("charge")
    rec = await world.orch.start(world.saga, Order())
    await waiting_on(world, rec.saga_id, "charge")
    with pytest.raises(SagaStateError, match="pivot"):
        await world.orch.abort(rec.saga_id, "customer cancelled")
    world.silent.discard("charge")
    world.clock.advance(60)  # the pivot's timeout: it is asked again, and now answers
    done = await world.orch.wait(rec.saga_id, timeout=10, poll=0.02)
    assert done.status is SagaStatus.COMPLETED
    assert world.effects == ["reserve", "charge"]


async def test_abort_compensates_a_step_left_running_by_a_dead_process() -> None:
    clock = FakeClock()
    store = MemorySagaStore()
    log = Log()

    async def hangs(d: Order) -> None:
        log.calls.append("b")
        await asyncio.Event().wait()

    saga = (
        Saga("s", Order)
        .step("a", log.step("a"), compensate=log.step("undo-a"))
        .step("b", hangs, compensate=log.step("undo-b"))
        .pivot("p", log.step("p"))
    )
    orch = SagaOrchestrator(store, [saga], clock=clock, lease_seconds=10)
    task = asyncio.create_task(orch.start(saga, Order(), saga_id="dead"))
    await eventually(lambda: log.calls == ["a", "b"])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(SagaStateError, match="try again"):
        await orch.abort("dead")  # its lease is still live
    clock.advance(11)
    rec = await orch.abort("dead", "stuck order")
    assert rec.status is SagaStatus.COMPENSATED
    assert log.calls == ["a", "b", "undo-b", "undo-a"]  # b may have taken effect: undone too


def test_saga_stores_from_a_url(tmp_path: Any) -> None:
    from msdata.adapters.postgres import PostgresSagaStore
    from msdata.adapters.sqlite import SqliteSagaStore
    from msdata.urls import store_from_url

    assert isinstance(store_from_url("saga", "memory://"), MemorySagaStore)
    sqlite = store_from_url("saga", f"sqlite:///{tmp_path}/s.db", table_prefix="app_")
    assert isinstance(sqlite, SqliteSagaStore) and "app_sagas" in sqlite.schema_sql()
    pg = store_from_url("saga", "postgresql://u@localhost/db", schema="orders")
    assert isinstance(pg, PostgresSagaStore) and '"orders"."msdata_sagas"' in pg.schema_sql()


async def test_a_step_returning_the_wrong_type_or_raising_cancelled_error_fails() -> None:
    log = Log()

    def wrong(d: Order) -> Any:
        return {"not": "an order"}

    async def inner_cancel(d: Order) -> None:
        raise asyncio.CancelledError("a timeout inside the step")

    for bad, error in ((wrong, "returned dict, not Order"), (inner_cancel, "CancelledError")):
        saga = (
            Saga(f"s-{bad.__name__}", Order)
            .step("a", log.step("a"), compensate=log.step("undo-a"))
            .pivot("p", bad)
        )
        rec = await SagaOrchestrator(MemorySagaStore(), [saga]).run(saga, Order())
        assert rec.status is SagaStatus.COMPENSATED
        assert error in (rec.error or "")
    assert log.calls == ["a", "undo-a", "a", "undo-a"]


async def test_a_reply_that_arrives_while_the_instance_is_being_parked_is_applied() -> None:
    from msdata.saga import SagaReply

    class ParkingStore(MemorySagaStore):
        hook: Any = None

        async def save(self, record: Any, *, also: Any = None) -> None:
            await super().save(record, also=also)
            if self.hook is not None and record.lease_owner is None:
                hook, self.hook = self.hook, None
                await hook()  # the reply comes in while the orchestrator parks the instance

    store = ParkingStore()
    saga = Saga("parked", Order).pivot(
        "charge", remote(lambda d: Charge(order_id=d.order_id)), timeout=30
    )
    orch = SagaOrchestrator(
        store,
        [saga],
        bus=EventBus(MemoryTransport()),
        outbox=Outbox(MemoryOutboxStore()),
        clock=FakeClock(),
    )

    async def reply() -> None:
        await orch._on_reply(
            SagaReply(
                saga_id="p-1",
                saga_type="parked",
                step="charge",
                purpose="action",
                attempt=1,
                ok=True,
            )
        )

    store.hook = reply
    rec = await orch.start(saga, Order(), saga_id="p-1")
    assert rec.status is SagaStatus.RUNNING  # parked; the reply waited in the mailbox
    done = await orch.wait("p-1", timeout=5, poll=0.01)
    assert done.status is SagaStatus.COMPLETED


async def test_parallel_group_of_a_remote_and_a_local_step(world: World) -> None:
    calls: list[str] = []

    async def hold(d: Order) -> Order:
        await asyncio.sleep(0.05)  # the remote sibling's reply comes in meanwhile
        calls.append("hold")
        return d.model_copy(update={"notes": [*d.notes, "held"]})

    def unhold(d: Order) -> None:
        calls.append("unhold")

    saga = (
        Saga("parallel-remote", Order)
        .parallel(
            Step.compensatable(
                "reserve",
                remote(lambda d: Reserve(order_id=d.order_id)),
                compensate=remote(lambda d: Release(order_id=d.order_id)),
                timeout=30,
            ),
            Step.compensatable("hold", hold, compensate=unhold),
        )
        .pivot("charge", remote(lambda d: Charge(order_id=d.order_id)), timeout=30)
    )
    world.orch.register(saga)
    ok = await world.orch.run(saga, Order(order_id="o-1"), timeout=10)
    assert ok.status is SagaStatus.COMPLETED and ok.data.notes == ["held"]
    assert world.effects == ["reserve", "charge"]

    world.effects.clear()
    world.fail.add("reserve")
    no = await world.orch.run(saga, Order(order_id="o-2"), timeout=10)
    assert no.status is SagaStatus.COMPENSATED
    assert calls == ["hold", "hold", "unhold"]  # the local member undone; the refused one not
    assert world.effects == []


class _Runaway(BaseException):
    """Raised by a command builder called more often than a test allows: it stops a loop
    that would otherwise never give the event loop back."""


async def test_a_pivot_whose_command_cannot_be_built_fails_by_its_policy(world: World) -> None:
    """A command builder that raises is a failed attempt that sent nothing: counted by the
    step's policy (the pivot's default: once), then compensated; never asked again at once
    for ever (that loop held the event loop and grew the history without end)."""
    calls: list[str] = []

    def build(d: Order) -> Charge:
        calls.append(d.order_id)
        if len(calls) > 10:
            raise _Runaway("the builder is called again and again")
        raise ZeroDivisionError("division by zero")

    saga = (
        Saga("unbuildable-pivot", Order)
        .step(
            "reserve",
            remote(lambda d: Reserve(order_id=d.order_id)),
            compensate=remote(lambda d: Release(order_id=d.order_id)),
            timeout=30,
        )
        .pivot("charge", remote(build, reply=Charged), timeout=30)
    )
    rec = await world.orch.start(saga, Order())
    done = await world.orch.wait(rec.saga_id, timeout=10, poll=0.02)
    assert done.status is SagaStatus.COMPENSATED
    assert done.error == (
        "step 'charge' failed: the command could not be built: ZeroDivisionError: division by zero"
    )
    assert calls == ["o-1"]
    assert world.effects == ["reserve", "release"]


async def test_a_command_that_cannot_be_built_is_retried_with_the_policy_backoff(
    world: World,
) -> None:
    calls: list[str] = []

    def build(d: Order) -> Reserve:
        calls.append(d.order_id)
        if len(calls) > 10:
            raise _Runaway("the builder is called again and again")
        raise ValueError("no stock id")

    saga = Saga("unbuildable-step", Order).step(
        "reserve",
        remote(build),
        compensate=remote(lambda d: Release(order_id=d.order_id)),
        retry=Retry(3, constant_backoff(5)),
        timeout=30,
    )
    task = asyncio.create_task(world.orch.start(saga, Order()))
    for n in (1, 2):
        await eventually(lambda n=n: len(calls) == n, what=f"attempt {n}")  # type: ignore[misc]
        assert not task.done()
        world.clock.advance(5)
    rec = await task
    assert rec.status is SagaStatus.COMPENSATED and len(calls) == 3
    retries = [h.detail for h in rec.history if h.event == "retry"]
    assert (
        retries
        == ["action: the command could not be built: ValueError: no stock id; next in 5 s"] * 2
    )
    assert world.effects == []  # nothing was sent: nothing to compensate


async def test_an_unanswered_pivot_whose_command_then_fails_to_build_is_asked_again(
    world: World,
) -> None:
    """A pivot whose command went out may have taken effect: when a later attempt's command
    cannot be built it is still asked again (never compensated), with a growing wait, not
    at once."""
    world.silent.add("charge")
    rec = await world.orch.start(world.saga, Order())
    await waiting_on(world, rec.saga_id, "charge")
    broken = [True]
    original = world.saga.steps["charge"].action
    assert isinstance(original, Remote)

    def build(d: Order) -> Charge:
        if broken[0]:
            raise ZeroDivisionError("division by zero")
        return original.command(d)

    object.__setattr__(original, "command", build)
    world.clock.advance(31)  # the pivot times out: asked again, its command fails to build
    await eventually(
        lambda: any(
            h.event == "retry" and "could not be built" in (h.detail or "")
            for h in world.saga_store.snapshot(rec.saga_id).history
        )
    )
    retry = [h for h in world.saga_store.snapshot(rec.saga_id).history if h.event == "retry"][-1]
    assert retry.detail is not None and not retry.detail.endswith("next in 0 s")
    assert world.saga_store.snapshot(rec.saga_id).status is SagaStatus.RUNNING
    broken[0] = False
    world.silent.clear()

    def asked_again() -> bool:
        world.clock.advance(1)  # the wait before asking again is on the clock
        return "charge" in world.effects

    await eventually(asked_again, what="the pivot is asked again")
    done = await world.orch.wait(rec.saga_id, timeout=10, poll=0.02)
    assert done.status is SagaStatus.COMPLETED
    assert world.effects == ["reserve", "charge"]


def test_step_and_saga_names_with_control_characters_are_refused() -> None:
    noop = lambda d: d  # noqa: E731
    for bad in ("a\n", "a\x00b", "\x1b[31m", "a\u2028"):
        with pytest.raises(SagaDefinitionError, match="control character"):
            Saga("s", Order).step(bad, noop, compensate=noop)
        with pytest.raises(SagaDefinitionError, match="saga name"):
            Saga(bad, Order)
    with pytest.raises(SagaDefinitionError, match="saga name"):
        Saga("a b", Order)
    with pytest.raises(SagaDefinitionError, match="at most 64"):
        Saga("s", Order).pivot("x" * 65, noop)
    Saga("s", Order).pivot("x" * 64, noop)


def test_the_longest_saga_id_and_step_name_make_a_valid_idempotency_key() -> None:
    """docs/sagas.md: a saga id of MAX_SAGA_ID characters and a step name of MAX_STEP_NAME
    keep ``saga:<id>:<step>:<purpose>`` within the 255 characters of an idempotency key
    (the longest purpose is ``compensation``)."""
    key = idempotency_key("x" * MAX_SAGA_ID, "s" * MAX_STEP_NAME, "compensation")
    assert len(key) <= 255
    assert check_idempotency_key(key, "payments") == key
    Saga("s", Order).pivot("s" * MAX_STEP_NAME, lambda d: d)
    with pytest.raises(SagaDefinitionError, match=f"at most {MAX_STEP_NAME}"):
        Saga("s", Order).pivot("s" * (MAX_STEP_NAME + 1), lambda d: d)
