"""Late replies and compensation timeouts (DESIGN.md guarantee 4: never stuck): a participant
that is always slower than the step's timeout, on a FakeClock, over the memory transport."""

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
from msdata.errors import SagaDefinitionError, SagaStepFailed
from msdata.events import EventBus
from msdata.messages import current_envelope
from msdata.outbox import Outbox, OutboxRelay
from msdata.saga import Retry, Saga, SagaOrchestrator, SagaParticipant, SagaStatus, remote
from msdata.saga.messages import HEADER_ATTEMPT, SagaReply
from msdata.saga.store import SagaRecord
from msdata.storage import current_connection
from msdata.testing import FakeClock, eventually

TIMEOUT = 5.0  # every attempt's timeout (seconds, on the fake clock)
SLOW = 8.0  # the participant answers this long after a command arrives: always too late


class Order(BaseModel):
    order_id: str = "o-1"
    notes: list[str] = []


@message_type("test.saga_late.Reserve")
class Reserve(Command):
    order_id: str


@message_type("test.saga_late.Release")
class Release(Command):
    order_id: str


class Reserved(BaseModel):
    reservation: str


@dataclass
class Slow:
    """A participant service whose every answer takes SLOW seconds of the fake clock."""

    clock: FakeClock
    received: list[str] = field(default_factory=list)  # "<command> <attempt>"
    effects: list[str] = field(default_factory=list)  # applied once per idempotency key
    silent: bool = False  # never answers a Release


@dataclass
class World:
    orch: SagaOrchestrator
    clock: FakeClock
    store: MemorySagaStore
    slow: Slow


def refuse(d: Order) -> None:
    raise SagaStepFailed("card declined")


@pytest.fixture
async def world() -> AsyncIterator[World]:
    clock = FakeClock()
    transport = MemoryTransport()
    store, orch_outbox = MemorySagaStore(), MemoryOutboxStore()
    part_outbox, part_replies = MemoryOutboxStore(), MemoryIdempotencyStore()
    orch_bus = EventBus(transport, source="orders", backoff=lambda n: 0.01)
    part_bus = EventBus(transport, source="stock", backoff=lambda n: 0.01)
    orch = SagaOrchestrator(
        store, bus=orch_bus, outbox=Outbox(orch_outbox, source="orders"), clock=clock
    )
    participant = SagaParticipant(
        part_bus,
        Outbox(part_outbox, source="stock"),
        MemoryTransaction,
        idempotency=part_replies,
        clock=clock,
    )
    slow = Slow(clock)

    async def answer_late(name: str, cmd: Command, attempt: str) -> None:
        slow.received.append(f"{name} {attempt}")
        if name == "release" and slow.silent:
            raise RuntimeError("not answering")  # nacked: no reply ever
        await clock.sleep(SLOW)
        key = f"{name} {cmd.order_id}"  # type: ignore[attr-defined]
        current_connection().on_commit(
            lambda: None if key in slow.effects else slow.effects.append(key)
        )

    @participant.handler(Reserve, group="stock")
    async def reserve(cmd: Reserve) -> Reserved:
        env = current_envelope()
        assert env is not None
        await answer_late("reserve", cmd, env.headers[HEADER_ATTEMPT])
        return Reserved(reservation=f"r-{cmd.order_id}")

    @participant.handler(Release, group="stock")
    async def release(cmd: Release) -> None:
        env = current_envelope()
        assert env is not None
        await answer_late("release", cmd, env.headers[HEADER_ATTEMPT])

    relays = [
        OutboxRelay(orch_outbox, transport, poll_interval=0.01),
        OutboxRelay(part_outbox, transport, poll_interval=0.01),
    ]
    async with orch_bus, part_bus, relays[0], relays[1]:
        yield World(orch, clock, store, slow)
        await orch.close()


def events(rec: SagaRecord, event: str, step: str) -> list[Any]:
    return [h for h in rec.history if h.event == event and h.step == step]


async def received(world: World, what: str) -> None:
    await eventually(lambda: what in world.slow.received, what=f"participant got {what}")


async def status(world: World, saga_id: str, wanted: SagaStatus) -> SagaRecord:
    await eventually(
        lambda: world.store.snapshot(saga_id).status is wanted,
        what=lambda: f"saga {saga_id} is {world.store.snapshot(saga_id).status}, not {wanted}",
    )
    return world.store.snapshot(saga_id)


def compensated_by_a_slow_release(retry: Retry) -> Saga[Order]:
    return (
        Saga("late-release", Order, compensation_retry=retry)
        .step(
            "reserve",
            lambda d: None,
            compensate=remote(lambda d: Release(order_id=d.order_id)),
            compensation_timeout=TIMEOUT,
        )
        .pivot("charge", refuse)
    )


def test_compensation_policies_are_bounded_and_timed() -> None:
    with pytest.raises(SagaDefinitionError, match="number of attempts"):
        Saga("s", Order, compensation_retry=Retry(None))
    noop = lambda d: None  # noqa: E731
    with pytest.raises(SagaDefinitionError, match="number of attempts"):
        Saga("s", Order).step("a", noop, compensate=noop, compensation_retry=Retry(None))
    with pytest.raises(SagaDefinitionError, match="compensation_timeout must be > 0"):
        Saga("s", Order).step("a", noop, compensate=noop, compensation_timeout=0)
    release = remote(lambda d: Release(order_id=d.order_id))
    with pytest.raises(SagaDefinitionError, match="needs a timeout"):
        Saga("s", Order).step("a", noop, compensate=release)
    step = compensated_by_a_slow_release(Retry(2)).steps["reserve"]
    assert step.timeout is None and step.timeout_for("compensation") == TIMEOUT
    timed = Saga("t", Order).step("a", lambda d: None, compensate=lambda d: None, timeout=3)
    assert timed.steps["a"].timeout_for("compensation") == 3  # defaults to the step's


async def test_late_success_of_an_earlier_compensation_attempt_ends_the_saga(world: World) -> None:
    # backoff 4 s: attempt 1's answer (at 8 s) comes while the instance waits for attempt 2
    # (due at 9 s); before the fix it was ignored there, and every later attempt likewise
    saga = compensated_by_a_slow_release(Retry(3, constant_backoff(4.0)))
    world.orch.register(saga)
    rec = await world.orch.start(saga, Order(), saga_id="late-1")
    assert rec.status is SagaStatus.COMPENSATING
    await received(world, "release 1")
    world.clock.advance(TIMEOUT)  # attempt 1 times out
    await eventually(lambda: events(world.store.snapshot("late-1"), "retry", "reserve"))
    world.clock.advance(SLOW - TIMEOUT)  # attempt 1's success comes in, late
    # the orchestrator runs the instance (it sleeps out the backoff): the reply waits for it
    await eventually(lambda: "late-1" in world.orch._mailbox, what="the late reply is in")
    world.clock.advance(2)  # the time of attempt 2 comes: the late success is the answer
    done = await status(world, "late-1", SagaStatus.COMPENSATED)
    assert done.error == "step 'charge' failed: SagaStepFailed: card declined"
    assert len(events(done, "compensation started", "reserve")) == 1  # no attempt 2 sent
    assert len(events(done, "compensated", "reserve")) == 1
    assert world.slow.effects == ["release o-1"]
    assert not await world.orch.stuck()


async def test_a_compensation_that_never_answers_ends_failed_then_an_operator_retries(
    world: World,
) -> None:
    world.slow.silent = True
    saga = compensated_by_a_slow_release(Retry(2, constant_backoff(1.0)))
    world.orch.register(saga)
    await world.orch.start(saga, Order(), saga_id="late-2")
    for attempt in (1, 2):
        await received(world, f"release {attempt}")
        world.clock.advance(TIMEOUT)  # this attempt times out
        if attempt == 1:
            await eventually(lambda: events(world.store.snapshot("late-2"), "retry", "reserve"))
            world.clock.advance(1)  # the backoff
    failed = await status(world, "late-2", SagaStatus.FAILED)
    assert failed.error == "compensation of 'reserve' failed: no reply within 5.0 s"
    assert [r.saga_id for r in await world.orch.stuck()] == ["late-2"]  # for an operator
    assert [r.saga_id for r in await world.orch.find(status=SagaStatus.FAILED)] == ["late-2"]
    world.slow.silent = False
    world.slow.received.clear()  # (the bus redelivered the nacked commands meanwhile)
    await world.orch.retry("late-2")
    # fresh attempts, numbered after the two the compensation had (never a number reused)
    assert (
        events(world.store.snapshot("late-2"), "compensation started", "reserve")[-1].attempt == 3
    )
    await eventually(lambda: world.slow.received, what="a command after the retry")
    world.clock.advance(SLOW)  # slower than the timeout, and no retry is due yet at 5 s
    await eventually(lambda: len(world.slow.effects) == 1, what="the release committed")
    world.clock.advance(1)
    await status(world, "late-2", SagaStatus.COMPENSATED)


async def test_a_late_action_reply_from_attempt_1_completes_the_step_once(world: World) -> None:
    saga = (
        Saga("late-reserve", Order)
        .step(
            "reserve",
            remote(
                lambda d: Reserve(order_id=d.order_id),
                reply=Reserved,
                on_reply=lambda d, r: d.model_copy(update={"notes": [*d.notes, r.reservation]}),
            ),
            compensate=lambda d: None,
            retry=Retry(3, constant_backoff(0.0)),
            timeout=TIMEOUT,
        )
        .pivot("confirm", lambda d: None)
    )
    world.orch.register(saga)
    await world.orch.start(saga, Order(), saga_id="late-3")
    await received(world, "reserve 1")
    world.clock.advance(TIMEOUT)  # attempt 1 times out; attempt 2 is sent at once
    await eventually(
        lambda: events(world.store.snapshot("late-3"), "step started", "reserve")[1:],
        what="attempt 2 sent",
    )
    pending = world.store.snapshot("late-3").active["reserve"]
    assert (pending.attempt, pending.state) == (2, "waiting")
    world.clock.advance(SLOW - TIMEOUT)  # attempt 1's answer, while attempt 2 is pending
    done = await status(world, "late-3", SagaStatus.COMPLETED)
    assert done.data.notes == ["r-o-1"]  # applied once
    assert len(events(done, "step completed", "reserve")) == 1
    assert [h.attempt for h in events(done, "reply", "reserve")] == [1]
    # attempt 2's answer (the participant's duplicate) for a step no longer waited on
    await world.orch._on_reply(
        SagaReply(
            saga_id="late-3",
            saga_type="late-reserve",
            step="reserve",
            purpose="action",
            attempt=2,
            ok=True,
            duplicate=True,
        )
    )
    after = world.store.snapshot("late-3")
    assert after.history[-1].event == "reply ignored"
    assert after.status is SagaStatus.COMPLETED and after.data.notes == ["r-o-1"]
    assert world.slow.effects == ["reserve o-1"]


async def test_a_hanging_local_compensation_times_out_and_ends_failed() -> None:
    clock = FakeClock()
    store = MemorySagaStore()
    calls: list[int] = []

    async def hang(d: Order) -> None:
        calls.append(1)
        await asyncio.Event().wait()  # never finishes

    saga = (
        Saga("hanging-undo", Order, compensation_retry=Retry(2, constant_backoff(0.0)))
        .step("reserve", lambda d: None, compensate=hang, compensation_timeout=2)
        .pivot("charge", refuse)
    )
    orch = SagaOrchestrator(store, [saga], clock=clock)
    task = asyncio.ensure_future(orch.start(saga, Order(), saga_id="hang-1"))
    for attempt in (1, 2):
        await eventually(lambda a=attempt: len(calls) == a, what=f"compensation attempt {attempt}")
        clock.advance(2)  # its timeout
    rec = await task
    assert rec.status is SagaStatus.FAILED
    assert rec.error == "compensation of 'reserve' failed: TimeoutError: did not finish within 2 s"
    assert [r.saga_id for r in await orch.stuck()] == ["hang-1"]
