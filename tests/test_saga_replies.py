"""A repeated saga command gets the original reply (participant, on memory, SQLite and
PostgreSQL), and the orchestrator's handling of duplicate and malformed replies."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
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
from msdata.errors import ConfigurationError, SagaStepFailed
from msdata.events import EventBus
from msdata.messages import Envelope, current_envelope
from msdata.outbox import Outbox, OutboxRelay
from msdata.saga import Retry, Saga, SagaOrchestrator, SagaParticipant, SagaStatus, remote
from msdata.saga.messages import (
    HEADER_ATTEMPT,
    HEADER_PURPOSE,
    HEADER_REPLY_TO,
    HEADER_SAGA_ID,
    HEADER_SAGA_TYPE,
    HEADER_STEP,
    IDEMPOTENCY_KEY_HEADER,
    SagaReply,
    idempotency_key,
)
from msdata.saga.store import SagaRecord, StepRun
from msdata.storage import current_connection
from msdata.testing import FakeClock, eventually
from msdata.transport import DEAD_LETTER_ATTEMPTS, DEAD_LETTER_REASON, dead_letter_topic
from store_helpers import opened, table_prefix


@message_type("test.replies.Charge")
class Charge(Command):
    order_id: str


@message_type("test.replies.Refund")
class Refund(Command):
    order_id: str


class Charged(BaseModel):
    payment_id: str


class Order(BaseModel):
    order_id: str = "o-1"
    payment_id: str | None = None


REPLIES = "test.replies.replies"

# -- the participant: a repeated command gets the original reply, on every backend ----------


@dataclass
class Backend:
    outbox: Any
    replies: Any
    transaction: Any


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async with AsyncExitStack() as stack:
        if request.param == "memory":
            yield Backend(MemoryOutboxStore(), MemoryIdempotencyStore(), MemoryTransaction)
        elif request.param == "sqlite":
            from msdata.adapters.sqlite import (
                SqliteIdempotencyStore,
                SqliteOutboxStore,
                connect,
            )

            path = tmp_path / "payments.db"
            outbox = await stack.enter_async_context(opened(SqliteOutboxStore(path)))
            replies = await stack.enter_async_context(opened(SqliteIdempotencyStore(path)))

            def transaction() -> sqlite3.Connection:
                return connect(path)

            yield Backend(outbox, replies, transaction)
        else:
            from msdata.adapters.postgres import PostgresIdempotencyStore, PostgresOutboxStore
            from msdata.adapters.postgres.transactions import PostgresTransactions

            url = request.getfixturevalue("postgres_url")
            prefix = table_prefix()
            outbox = await stack.enter_async_context(
                opened(PostgresOutboxStore(url, table_prefix=prefix), drop=True)
            )
            replies = await stack.enter_async_context(
                opened(PostgresIdempotencyStore(url, table_prefix=prefix), drop=True)
            )
            transactions = PostgresTransactions(url, size=2)
            stack.push_async_callback(transactions.close)
            yield Backend(outbox, replies, transactions)


def command_headers(order_id: str, step: str, attempt: int) -> dict[str, str]:
    return {
        HEADER_SAGA_ID: f"saga-{order_id}",
        HEADER_SAGA_TYPE: "checkout",
        HEADER_STEP: step,
        HEADER_PURPOSE: "action",
        HEADER_ATTEMPT: str(attempt),
        HEADER_REPLY_TO: REPLIES,
        IDEMPOTENCY_KEY_HEADER: idempotency_key(f"saga-{order_id}", step, "action"),
    }


async def test_a_repeated_command_gets_the_original_reply(backend: Backend) -> None:
    transport = MemoryTransport()
    part_bus = EventBus(transport, source="payments", backoff=lambda n: 0.01)
    orch_bus = EventBus(transport, source="orders", backoff=lambda n: 0.01)
    participant = SagaParticipant(
        part_bus,
        Outbox(backend.outbox, source="payments"),
        backend.transaction,
        idempotency=backend.replies,
    )
    calls: list[str] = []

    @participant.handler(Charge, group="payments")
    def charge(cmd: Charge) -> Charged:
        assert current_connection() is not None
        calls.append(cmd.order_id)
        return Charged(payment_id=f"pay-{len(calls)}")  # a rerun would answer differently

    @participant.handler(Refund, group="payments")
    def refund(cmd: Refund) -> None:
        calls.append(f"refund {cmd.order_id}")
        raise SagaStepFailed(f"refused {len(calls)}")

    replies: list[SagaReply] = []

    async def on_reply(reply: SagaReply) -> None:
        replies.append(reply)

    orch_bus.subscribe(SagaReply, on_reply, group="orders", topic=REPLIES)

    async def got(n: int) -> None:
        await eventually(lambda: len(replies) >= n, what=f"{n} replies ({replies})")

    relay = OutboxRelay(backend.outbox, transport, poll_interval=0.01)
    async with part_bus, orch_bus, relay:
        for _ in range(2):  # the command, then the same command again (a redelivery)
            await orch_bus.publish(Charge(order_id="o-1"), headers=command_headers("o-1", "c", 1))
            await got(len(replies) + 1)
        # a resend by the orchestrator (attempt 2) gets the same answer as well
        await orch_bus.publish(Charge(order_id="o-1"), headers=command_headers("o-1", "c", 2))
        await got(3)
        assert calls == ["o-1"]  # handled once
        assert [(r.ok, r.data, r.duplicate, r.attempt) for r in replies] == [
            (True, {"payment_id": "pay-1"}, False, 1),
            (True, {"payment_id": "pay-1"}, True, 1),
            (True, {"payment_id": "pay-1"}, True, 2),
        ]

        # a failure: the same attempt again gets the same failure; a later attempt reruns
        replies.clear()
        calls.clear()
        for attempt in (1, 1, 2):
            await orch_bus.publish(
                Refund(order_id="o-2"), headers=command_headers("o-2", "r", attempt)
            )
            await got(len(replies) + 1)
        assert calls == ["refund o-2", "refund o-2"]
        assert [(r.ok, r.reason, r.duplicate, r.attempt) for r in replies] == [
            (False, "refused 1", False, 1),
            (False, "refused 1", True, 1),
            (False, "refused 2", False, 2),
        ]


def step_headers(saga_id: str, purpose: str, attempt: int = 1) -> dict[str, str]:
    return {
        HEADER_SAGA_ID: saga_id,
        HEADER_SAGA_TYPE: "checkout",
        HEADER_STEP: "reserve",
        HEADER_PURPOSE: purpose,
        HEADER_ATTEMPT: str(attempt),
        HEADER_REPLY_TO: REPLIES,
        IDEMPOTENCY_KEY_HEADER: idempotency_key(saga_id, "reserve", purpose),
    }


async def test_an_action_overtaken_by_its_compensation_is_refused(backend: Backend) -> None:
    """A slow participant: the orchestrator timed the action out and sent its compensation,
    which is handled first; the queued action must not take effect after it (leaked
    stock). It gets the failure "already compensated" and its handler does not run. An
    action that came first is undone by the compensation as usual, and one that a handler
    refused is refused for every later attempt too."""
    transport = MemoryTransport()
    part_bus = EventBus(transport, source="stock", backoff=lambda n: 0.01)
    orch_bus = EventBus(transport, source="orders", backoff=lambda n: 0.01)
    participant = SagaParticipant(
        part_bus,
        Outbox(backend.outbox, source="stock"),
        backend.transaction,
        idempotency=backend.replies,
    )
    calls: list[str] = []

    @participant.handler(Charge, group="stock")
    def reserve(cmd: Charge) -> None:
        calls.append(f"reserve {cmd.order_id}")
        if cmd.order_id.startswith("refuse"):
            raise SagaStepFailed("out of stock")

    @participant.handler(Refund, group="stock")
    def release(cmd: Refund) -> None:
        calls.append(f"release {cmd.order_id}")

    replies: list[SagaReply] = []

    async def on_reply(reply: SagaReply) -> None:
        replies.append(reply)

    orch_bus.subscribe(SagaReply, on_reply, group="orders", topic=REPLIES)

    async def send(command: Command, saga_id: str, purpose: str, attempt: int = 1) -> SagaReply:
        n = len(replies)
        await orch_bus.publish(command, headers=step_headers(saga_id, purpose, attempt))
        await eventually(lambda: len(replies) > n, what=f"a reply to {saga_id} {purpose}")
        return replies[-1]

    relay = OutboxRelay(backend.outbox, transport, poll_interval=0.01)
    async with part_bus, orch_bus, relay:
        # overtaken: the compensation is handled first, then the action arrives
        r = await send(Refund(order_id="late"), "s-late", "compensation")
        assert r.ok
        r = await send(Charge(order_id="late"), "s-late", "action")
        assert (r.ok, r.reason) == (False, "already compensated")
        r = await send(Charge(order_id="late"), "s-late", "action", attempt=2)  # a retry
        assert (r.ok, r.reason) == (False, "already compensated")
        assert calls == ["release late"]  # the action's handler never ran
        # the usual order: the action took effect, the compensation undoes it
        calls.clear()
        assert (await send(Charge(order_id="ok"), "s-ok", "action")).ok
        assert (await send(Refund(order_id="ok"), "s-ok", "compensation")).ok
        r = await send(Charge(order_id="ok"), "s-ok", "action")  # a redelivery
        assert (r.ok, r.duplicate) == (True, True)  # the stored success, replayed
        assert calls == ["reserve ok", "release ok"]
        # refused by the handler at attempt 1; compensated; attempt 2 must not run it
        calls.clear()
        r = await send(Charge(order_id="refuse"), "s-no", "action")
        assert (r.ok, r.reason) == (False, "out of stock")
        assert (await send(Refund(order_id="refuse"), "s-no", "compensation")).ok
        r = await send(Charge(order_id="refuse"), "s-no", "action", attempt=2)
        assert (r.ok, r.reason) == (False, "already compensated")
        assert calls == ["reserve refuse", "release refuse"]


async def test_a_store_that_cannot_join_the_transaction_is_refused() -> None:
    class Detached(MemoryIdempotencyStore):
        features = MemoryIdempotencyStore.features.__class__(
            joins_transaction=False, sync=False, sync_own_transaction=False
        )

    bus = EventBus(MemoryTransport(), source="payments")
    with pytest.raises(ConfigurationError, match="cannot join"):
        SagaParticipant(
            bus, Outbox(MemoryOutboxStore(), source="p"), MemoryTransaction, idempotency=Detached()
        )


# -- the orchestrator: duplicate replies first, malformed replies to the pivot --------------


@dataclass
class World:
    orch: SagaOrchestrator
    clock: FakeClock
    store: MemorySagaStore
    bus: EventBus
    commands: list[Envelope[Any]] = field(default_factory=list)
    released: list[str] = field(default_factory=list)

    async def reply(self, step: str, attempt: int, data: Any, *, duplicate: bool = False) -> None:
        cmd = next(
            e
            for e in reversed(self.commands)
            if e.headers[HEADER_STEP] == step and e.headers[HEADER_ATTEMPT] == str(attempt)
        )
        h = cmd.headers
        await self.bus.publish(
            SagaReply(
                saga_id=h[HEADER_SAGA_ID],
                saga_type=h[HEADER_SAGA_TYPE],
                step=step,
                purpose="action",
                attempt=attempt,
                ok=True,
                data=data,
                duplicate=duplicate,
            ),
            topic=h[HEADER_REPLY_TO],
        )

    async def command(self, step: str, attempt: int) -> None:
        await eventually(
            lambda: any(
                e.headers[HEADER_STEP] == step and e.headers[HEADER_ATTEMPT] == str(attempt)
                for e in self.commands
            ),
            what=f"command {step} attempt {attempt}",
        )


def checkout(reserve_remote: bool = False) -> Saga[Order]:
    charge = remote(
        lambda d: Charge(order_id=d.order_id),
        reply=Charged,
        on_reply=lambda d, r: d.model_copy(update={"payment_id": r.payment_id}),
    )
    saga = Saga("replies-checkout", Order)
    if reserve_remote:
        saga = saga.step(
            "reserve",
            charge,
            compensate=lambda d: None,
            timeout=30,
            retry=Retry(1),
        )
    else:
        saga = saga.step("reserve", lambda d: None, compensate=lambda d: None)
    return saga.pivot("charge", charge, timeout=30, retry=Retry(2, constant_backoff(1.0)))


@pytest.fixture
async def world() -> AsyncIterator[World]:
    clock = FakeClock()
    transport = MemoryTransport()
    store, outbox_store = MemorySagaStore(), MemoryOutboxStore()
    orch_bus = EventBus(transport, source="orders", backoff=lambda n: 0.01)
    part_bus = EventBus(transport, source="payments", backoff=lambda n: 0.01)
    orch = SagaOrchestrator(
        store, bus=orch_bus, outbox=Outbox(outbox_store, source="orders"), clock=clock
    )
    world = World(orch, clock, store, part_bus)

    async def record(cmd: Charge) -> None:  # the participant, played by the test
        env = current_envelope()
        assert env is not None
        world.commands.append(env)

    part_bus.subscribe(Charge, record, group="payments")
    async with orch_bus, part_bus, OutboxRelay(outbox_store, transport, poll_interval=0.01):
        yield world
        await orch.close()


def history(rec: SagaRecord, event: str, step: str) -> list[Any]:
    return [h for h in rec.history if h.event == event and h.step == step]


async def waiting(world: World, saga_id: str, step: str) -> SagaRecord:
    async def parked() -> bool:
        rec = await world.store.get(saga_id)
        run = rec.active.get(step)
        return rec.lease_owner is None and run is not None and run.state == "waiting"

    await eventually(parked, what=f"saga waits for {step}")
    return world.store.snapshot(saga_id)


async def test_a_duplicate_reply_first_completes_the_step_with_the_original_data(
    world: World,
) -> None:
    saga = checkout()
    world.orch.register(saga)
    await world.orch.start(saga, Order(), saga_id="dup-1")
    await world.command("charge", 1)
    # the participant's answer to a redelivered command overtakes its first answer
    await world.reply("charge", 1, {"payment_id": "pay-1"}, duplicate=True)
    done = await world.orch.wait("dup-1", timeout=10, poll=0.02)
    assert done.status is SagaStatus.COMPLETED
    assert done.data.payment_id == "pay-1"
    assert [h.detail for h in history(done, "reply", "charge")] == ["ok (duplicate)"]
    await world.reply("charge", 1, {"payment_id": "pay-1"})  # the original, late: ignored
    await eventually(lambda: history(world.store.snapshot("dup-1"), "reply ignored", "charge"))
    assert world.store.snapshot("dup-1").status is SagaStatus.COMPLETED


async def test_a_malformed_reply_to_the_pivot_never_compensates(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    saga = checkout()
    world.orch.register(saga)
    caplog.set_level(logging.WARNING, logger="msdata.saga")
    await world.orch.start(saga, Order(), saga_id="bad-1")
    for attempt in (1, 2, 3, 4):  # more than the pivot's Retry(2)
        await world.command("charge", attempt)
        await waiting(world, "bad-1", "charge")
        await world.reply("charge", attempt, {"wrong": "shape"})
        await eventually(
            lambda n=attempt: (
                len(history(world.store.snapshot("bad-1"), "reply ignored", "charge")) == n
            ),
            what=f"bad reply {attempt} ignored",
        )
        rec = await waiting(world, "bad-1", "charge")
        assert rec.status is SagaStatus.RUNNING
        assert not history(rec, "compensation started", "reserve")
        world.clock.advance(30)  # no (valid) answer within the timeout: asked again
        await eventually(
            lambda n=attempt: len(history(world.store.snapshot("bad-1"), "retry", "charge")) == n,
            what=f"retry after attempt {attempt}",
        )
        world.clock.advance(1)  # the backoff
    await world.command("charge", 5)
    rec = world.store.snapshot("bad-1")
    assert rec.status is SagaStatus.RUNNING
    assert "does not validate as Charged" in history(rec, "reply ignored", "charge")[0].detail
    assert any(
        r.levelno == logging.WARNING and "treated as no answer" in r.getMessage()
        for r in caplog.records
    )
    await world.reply("charge", 5, {"payment_id": "pay-5"})  # finally a valid answer
    done = await world.orch.wait("bad-1", timeout=10, poll=0.02)
    assert done.status is SagaStatus.COMPLETED and done.data.payment_id == "pay-5"
    assert not history(done, "compensation started", "reserve")


async def test_a_malformed_reply_before_the_pivot_is_a_failed_attempt(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    saga = checkout(reserve_remote=True)
    world.orch.register(saga)
    caplog.set_level(logging.WARNING, logger="msdata.saga")
    await world.orch.start(saga, Order(), saga_id="bad-2")
    await world.command("reserve", 1)
    await waiting(world, "bad-2", "reserve")
    await world.reply("reserve", 1, {"wrong": "shape"})
    done = await world.orch.wait("bad-2", timeout=10, poll=0.02)
    assert done.status is SagaStatus.COMPENSATED
    assert done.error is not None and "does not validate as Charged" in done.error
    assert any(
        "counted as a failed action attempt" in r.getMessage()
        and "before the pivot" in r.getMessage()
        for r in caplog.records
    )


# -- refused at once: bad saga headers, a forged key, a handler's wrong return --------------


def _headers(**changes: str | None) -> dict[str, str]:
    h = command_headers("o-9", "c", 1)
    for name, value in changes.items():
        if value is None:
            h.pop(name)
        else:
            h[name] = value
    return h


@pytest.mark.parametrize(
    ("headers", "mode", "reason"),
    [
        (_headers(sagapurpose="weird"), "ok", "sagapurpose is 'weird'"),
        (_headers(sagareplyto="a b/c\u00e9"), "ok", "header sagareplyto: topic name"),
        (_headers(sagareplyto=""), "ok", "header sagareplyto: topic name ''"),
        (_headers(sagastep=""), "ok", "header sagastep is empty"),
        (_headers(sagaattempt="0"), "ok", "sagaattempt is 0"),
        # int() reads each of these; the header is ASCII digits only, bounded
        (_headers(sagaattempt=" 2"), "ok", "sagaattempt is ' 2', not an integer >= 1"),
        (_headers(sagaattempt="1_0"), "ok", "sagaattempt is '1_0', not an integer >= 1"),
        (_headers(sagaattempt="\u0663"), "ok", "not an integer >= 1 in ASCII digits"),
        (_headers(sagaattempt="9" * 5000), "ok", "not an integer >= 1 in ASCII digits"),
        (_headers(sagaattempt="-1"), "ok", "not an integer >= 1 in ASCII digits"),
        # the orchestrator's saga-id rules (check_saga_id)
        (
            _headers(sagaid="a\x1b[31mb"),
            "ok",
            "header sagaid: saga id 'a\\x1b[31mb' holds a control",
        ),
        (_headers(sagaid="a\u2028b"), "ok", "holds a control character"),
        (_headers(sagaid="x" * 300), "ok", "header sagaid: a saga id has at most 160 characters"),
        (_headers(sagastep="c\x01"), "ok", "header sagastep"),
        (_headers(sagastep="a:b"), "ok", "no ':'"),
        (_headers(sagastep="s" * 65), "ok", "at most 64 characters"),  # the orchestrator's limit
        (_headers(sagatype="t\x1b"), "ok", "header sagatype"),
        # saga o-9's command carrying saga A's key: would replay A's stored reply
        (
            _headers(idempotencykey=idempotency_key("saga-A", "c", "action")),
            "ok",
            "is not the key of saga 'saga-o-9'",
        ),
        (_headers(), "list", "returned list; it must return a pydantic model, a dict or None"),
        (_headers(), "str", "returned str"),
        (_headers(), "object", "returned object"),
        # deterministic like a bad type: refused once, not retried then dead-lettered
        (_headers(), "nan", "returned data a reply cannot carry (reply data.x: nan"),
    ],
)
async def test_a_bad_saga_command_is_refused_at_once(
    headers: dict[str, str], mode: str, reason: str
) -> None:
    transport = MemoryTransport()
    part_bus = EventBus(transport, source="payments", backoff=lambda n: 0.01, max_attempts=3)
    sender = EventBus(transport, source="orders")
    outbox = MemoryOutboxStore()
    participant = SagaParticipant(
        part_bus,
        Outbox(outbox, source="payments"),
        MemoryTransaction,
        idempotency=MemoryIdempotencyStore(),
    )
    runs: list[str] = []
    results: dict[str, Any] = {
        "ok": None,
        "list": [1, 2],
        "str": "hello",
        "object": object(),
        "nan": {"x": float("nan")},
    }

    @participant.handler(Charge, group="payments", topic="test.replies.bad")
    def charge(cmd: Charge) -> Any:
        runs.append(cmd.order_id)
        return results[mode]

    dlq = dead_letter_topic("test.replies.bad", "payments")
    await transport.declare_group(dlq, "audit")
    async with part_bus, sender, transport.subscribe(dlq, "audit") as audit:
        await sender.publish(Charge(order_id="o-9"), headers=headers, topic="test.replies.bad")
        (dead,) = await audit.receive(timeout=5)
        await dead.ack()
    why = dead.message.headers[DEAD_LETTER_REASON]
    assert reason in why and "RejectMessage" in why, why
    assert dead.message.headers[DEAD_LETTER_ATTEMPTS] == "1"  # not retried
    assert runs == ([] if mode == "ok" else ["o-9"])  # bad headers: the handler never ran
    assert await outbox.claim("w", 10, 30.0) == []  # no reply, to anywhere


async def test_an_on_reply_that_raises_at_the_pivot_stops_the_saga_failed(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(d: Order, r: Charged) -> Order:
        if r.payment_id == "explode":
            raise ValueError("on_reply blew up")
        return d.model_copy(update={"payment_id": r.payment_id})

    charge = remote(lambda d: Charge(order_id=d.order_id), reply=Charged, on_reply=explode)
    saga = (
        Saga("replies-explode", Order)
        .step("reserve", lambda d: None, compensate=lambda d: world.released.append(d.order_id))
        .pivot("charge", charge, timeout=30)
    )
    world.orch.register(saga)
    caplog.set_level(logging.ERROR, logger="msdata.saga")
    await world.orch.start(saga, Order(), saga_id="boom-1")
    await world.command("charge", 1)
    await waiting(world, "boom-1", "charge")
    await world.reply("charge", 1, {"payment_id": "explode"})
    done = await world.orch.wait("boom-1", timeout=10, poll=0.02)
    assert done.status is SagaStatus.FAILED  # the pivot took effect: never compensated
    assert done.error == "step 'charge': bad reply: ValueError: on_reply blew up"
    assert not history(done, "compensation started", "reserve") and world.released == []
    assert any("FAILED, not compensated" in r.getMessage() for r in caplog.records)
    # fixed (here: the participant's stored reply is a good one), an operator retries
    retried = await world.orch.retry("boom-1")
    await world.command("charge", 2)
    await world.reply("charge", 2, {"payment_id": "pay-2"}, duplicate=True)
    done = await world.orch.wait(retried.saga_id, timeout=10, poll=0.02)
    assert done.status is SagaStatus.COMPLETED and done.data.payment_id == "pay-2"


async def test_a_reply_naming_another_saga_type_is_refused(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    saga = checkout()
    world.orch.register(saga)
    caplog.set_level(logging.WARNING, logger="msdata.saga")
    await world.orch.start(saga, Order(), saga_id="type-1")
    await world.command("charge", 1)
    await waiting(world, "type-1", "charge")
    await world.bus.publish(
        SagaReply(
            saga_id="type-1",
            saga_type="other-type",
            step="charge",
            purpose="action",
            attempt=1,
            ok=True,
            data={"payment_id": "forged"},
        ),
        topic=world.orch.reply_topic,
    )
    await eventually(
        lambda: history(world.store.snapshot("type-1"), "reply ignored", "charge"),
        what="the forged reply noted",
    )
    rec = world.store.snapshot("type-1")
    assert rec.status is SagaStatus.RUNNING and rec.data.payment_id is None
    assert "other-type" in history(rec, "reply ignored", "charge")[0].detail
    assert any("names saga type 'other-type'" in r.getMessage() for r in caplog.records)
    await world.reply("charge", 1, {"payment_id": "pay-1"})
    done = await world.orch.wait("type-1", timeout=10, poll=0.02)
    assert done.status is SagaStatus.COMPLETED and done.data.payment_id == "pay-1"


class OrderV2(BaseModel):
    """``Order`` as a later release has it: a required field added."""

    order_id: str = "o-1"
    payment_id: str | None = None
    currency: str


async def test_a_reply_for_an_unreadable_instance_is_kept_for_when_it_can_be_read(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    charge = remote(lambda d: Charge(order_id=d.order_id), reply=Charged)
    saga = Saga("replies-v2", OrderV2).pivot("charge", charge, timeout=30)
    world.orch.register(saga)
    now = world.clock.now()
    # saved by the release before: its data has no "currency", the pivot's command is out
    await world.store.save(
        SagaRecord(
            "old-1",
            "replies-v2",
            SagaStatus.RUNNING,
            Order(),
            now,
            now,
            version=1,
            active={
                "charge": StepRun("action", 1, "waiting", now + timedelta(seconds=30), sent=True)
            },
        )
    )
    caplog.set_level(logging.ERROR, logger="msdata.saga")
    reply = SagaReply(
        saga_id="old-1",
        saga_type="replies-v2",
        step="charge",
        purpose="action",
        attempt=1,
        ok=True,
        data={"payment_id": "pay-1"},
    )
    await world.bus.publish(reply, topic=world.orch.reply_topic)
    await eventually(lambda: world.store.snapshot("old-1").replies, what="the reply recorded")
    rec = world.store.snapshot("old-1")
    assert rec.status is SagaStatus.RUNNING and rec.active["charge"].state == "waiting"
    assert any(
        "does not validate as OrderV2" in r.getMessage() and "kept recorded" in r.getMessage()
        for r in caplog.records
    )
