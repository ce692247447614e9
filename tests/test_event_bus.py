from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pydantic import field_validator

from msdata import Event, MessageRegistry, telemetry
from msdata.adapters.memory import MemoryTransport
from msdata.errors import (
    ConfigurationError,
    HandlerAlreadyRegistered,
    InvalidHeader,
    RejectMessage,
    TransportClosed,
    TransportError,
)
from msdata.events import EventBus
from msdata.messages import Envelope, current_envelope, handling, make_envelope, message_type
from msdata.middleware import Next, logging_middleware, retry, timing
from msdata.telemetry import ConsumeScope, Telemetry
from msdata.testing import eventually
from msdata.testing.conformance.transport import collect
from msdata.transport import DEAD_LETTER_REASON, Delivery, TransportMessage, dead_letter_topic
from transport_factories import TRANSPORTS, open_transport

registry = MessageRegistry()


@message_type("test.OrderPlaced", registry=registry)
class OrderPlaced(Event):
    order_id: str
    amount: int


@message_type("test.OrderShipped", registry=registry)
class OrderShipped(Event):
    order_id: str


@message_type("test.Unhandled", registry=registry)
class Unhandled(Event):
    x: int


@pytest.fixture
async def transport() -> AsyncIterator[MemoryTransport]:
    t = MemoryTransport()
    yield t
    await t.close()


def make_bus(transport: MemoryTransport, **kw: Any) -> EventBus:
    kw.setdefault("backoff", lambda attempt: 0.0)
    return EventBus(transport, registry=registry, source="test", **kw)


async def test_each_group_handles_each_event_and_sync_handlers_work(
    transport: MemoryTransport,
) -> None:
    bus = make_bus(transport)
    billing: list[str] = []
    shipping: list[str] = []

    @bus.handler(OrderPlaced, group="billing")
    async def bill(e: OrderPlaced) -> None:
        billing.append(e.order_id)

    @bus.handler(OrderPlaced, group="shipping")
    def ship(e: OrderPlaced) -> None:
        shipping.append(e.order_id)

    async with bus:
        for i in range(20):
            await bus.publish(OrderPlaced(order_id=f"o{i}", amount=i), key=f"o{i}")
        await eventually(lambda: len(billing) == 20 and len(shipping) == 20)
    assert sorted(billing) == sorted(shipping) == sorted(f"o{i}" for i in range(20))


async def test_a_failing_handler_is_retried_and_does_not_stop_the_others(
    transport: MemoryTransport,
) -> None:
    bus = make_bus(transport)
    calls: dict[str, int] = {}
    other: list[str] = []

    @bus.handler(OrderPlaced, group="flaky")
    async def flaky(e: OrderPlaced) -> None:
        calls[e.order_id] = calls.get(e.order_id, 0) + 1
        if calls[e.order_id] < 3:
            raise RuntimeError("temporary")

    @bus.handler(OrderPlaced, group="steady")
    async def steady(e: OrderPlaced) -> None:
        other.append(e.order_id)

    async with bus:
        await bus.publish(OrderPlaced(order_id="a", amount=1))
        await eventually(lambda: calls.get("a") == 3 and other == ["a"])
        await asyncio.sleep(0.05)
    assert calls == {"a": 3}


async def test_handler_failing_every_time_ends_in_dead_letter_with_reason(
    transport: MemoryTransport,
) -> None:
    bus = make_bus(transport, max_attempts=3)
    calls = 0

    @bus.handler(OrderPlaced, group="billing")
    async def always_fails(e: OrderPlaced) -> None:
        nonlocal calls
        calls += 1
        raise ValueError("card declined")

    async with bus:
        await bus.publish(OrderPlaced(order_id="x", amount=5))
        topic = dead_letter_topic(bus.topic_of(OrderPlaced), "billing")
        async with transport.subscribe(topic, "ops") as dlq:
            (dead,) = await collect(dlq, 1, timeout=5)
    assert calls == 3
    assert dead.message.headers[DEAD_LETTER_REASON] == "ValueError: card declined"


async def test_bad_input_goes_to_dead_letter_and_the_consumer_goes_on(
    transport: MemoryTransport,
) -> None:
    bus = make_bus(transport)
    seen: list[str] = []

    @bus.handler(OrderPlaced, group="billing")
    async def bill(e: OrderPlaced) -> None:
        seen.append(e.order_id)

    topic = bus.topic_of(OrderPlaced)
    valid = bus.envelope(OrderPlaced(order_id="ok", amount=1))
    bad_type = bus.codec.encode(valid).replace(b"test.OrderPlaced", b"test.Nope")
    bad_data = bus.codec.encode(valid).replace(b'"amount":1', b'"amount":"lots"')
    foreign = [b"\x00\x01 binary", b"{}", bad_type, bad_data]
    async with bus:
        await transport.publish(
            topic, [TransportMessage(id=str(uuid.uuid4()), body=b) for b in foreign]
        )
        await bus.publish(OrderPlaced(order_id="ok", amount=1))
        await eventually(lambda: seen == ["ok"])
        async with transport.subscribe(dead_letter_topic(topic, "billing"), "ops") as dlq:
            dead = await collect(dlq, 4, timeout=5)
    reasons = sorted(d.message.headers[DEAD_LETTER_REASON].split(":")[0] for d in dead)
    assert reasons == [
        "InvalidEnvelope",
        "MalformedMessage",
        "MessageValidationError",
        "UnknownMessageType",
    ]


async def test_reject_message_dead_letters_at_once(transport: MemoryTransport) -> None:
    bus = make_bus(transport, max_attempts=10)
    calls = 0

    @bus.handler(OrderPlaced, group="g")
    async def reject(e: OrderPlaced) -> None:
        nonlocal calls
        calls += 1
        raise RejectMessage("amount must be positive")

    async with bus:
        await bus.publish(OrderPlaced(order_id="neg", amount=-1))
        async with transport.subscribe(dead_letter_topic(bus.topic_of(OrderPlaced), "g"), "o") as d:
            (dead,) = await collect(d, 1, timeout=5)
    assert calls == 1
    assert "amount must be positive" in dead.message.headers[DEAD_LETTER_REASON]


async def test_one_topic_can_carry_several_types_and_unhandled_ones_are_skipped(
    transport: MemoryTransport,
) -> None:
    bus = make_bus(transport)
    got: list[Any] = []
    bus.subscribe(OrderPlaced, got.append, group="g", topic="orders")
    bus.subscribe(OrderShipped, got.append, group="g", topic="orders")
    async with bus:
        await bus.publish(OrderPlaced(order_id="1", amount=1), topic="orders")
        await bus.publish(Unhandled(x=1), topic="orders")
        await bus.publish(OrderShipped(order_id="1"), topic="orders")
        await eventually(lambda: len(got) == 2)
        await asyncio.sleep(0.05)
        assert transport.pending("orders", "g") == 0
    assert [type(e) for e in got] == [OrderPlaced, OrderShipped]


async def test_events_published_inside_a_handler_carry_causation(
    transport: MemoryTransport,
) -> None:
    bus = make_bus(transport)
    shipped: list[Envelope[Any]] = []
    placed: list[Envelope[Any]] = []

    @bus.handler(OrderPlaced, group="shipping")
    async def ship(e: OrderPlaced) -> None:
        env = current_envelope()
        assert env is not None
        placed.append(env)
        await bus.publish(OrderShipped(order_id=e.order_id))

    @bus.handler(OrderShipped, group="notify")
    async def notify(e: OrderShipped) -> None:
        env = current_envelope()
        assert env is not None
        shipped.append(env)

    async with bus:
        first = await bus.publish(OrderPlaced(order_id="c1", amount=3))
        await eventually(lambda: len(shipped) == 1)
    assert placed[0].id == first.id
    assert shipped[0].causation_id == first.id
    assert shipped[0].correlation_id == first.correlation_id == first.id


async def test_order_per_key_is_kept_with_concurrent_consumers(transport: MemoryTransport) -> None:
    bus = make_bus(transport, concurrency=3, prefetch=5)
    seen: dict[str, list[int]] = {}
    fail_once = {("k1", 3), ("k2", 7)}

    @bus.handler(OrderPlaced, group="g")
    async def handle(e: OrderPlaced) -> None:
        await asyncio.sleep(0)
        if (e.order_id, e.amount) in fail_once:
            fail_once.discard((e.order_id, e.amount))
            raise RuntimeError("once")
        seen.setdefault(e.order_id, []).append(e.amount)

    async with bus:
        await bus.publish_many(
            [OrderPlaced(order_id=f"k{k}", amount=i) for i in range(15) for k in range(4)],
            key=lambda e: e.order_id,  # type: ignore[attr-defined]
        )
        await eventually(lambda: sum(map(len, seen.values())) == 60)
    assert seen == {f"k{k}": list(range(15)) for k in range(4)}


async def test_stop_leaves_unfinished_work_unacked_for_redelivery(
    transport: MemoryTransport,
) -> None:
    bus = make_bus(transport, stop_timeout=0.1)
    started = asyncio.Event()
    finished: list[str] = []

    @bus.handler(OrderPlaced, group="slow")
    async def slow(e: OrderPlaced) -> None:
        started.set()
        await asyncio.sleep(60)
        finished.append(e.order_id)

    await bus.start()
    long = await bus.publish(OrderPlaced(order_id="long", amount=1))
    nxt = await bus.publish(OrderPlaced(order_id="next", amount=2))
    await started.wait()
    await bus.stop()
    assert finished == []
    # both come back uncounted: the one cancelled mid-handler and the one never started
    async with transport.subscribe(bus.topic_of(OrderPlaced), "slow") as sub:
        again = await collect(sub, 2, timeout=2)
    assert sorted((d.message.id, d.attempt) for d in again) == sorted([(long.id, 1), (nxt.id, 1)])


async def test_a_handler_failing_as_stop_cancels_it_gives_its_delivery_back_uncounted(
    transport: MemoryTransport, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler whose clean-up raises something else when the bus cancels it (a rollback
    that fails) failed because of the stop, not the message: its delivery is given back
    uncounted, logged at WARNING, and the consumer still ends."""
    bus = make_bus(transport, stop_timeout=0.05, max_attempts=1)
    started = asyncio.Event()

    @bus.handler(OrderPlaced, group="g")
    async def rolls_back(e: OrderPlaced) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            raise RuntimeError("rollback failed") from None

    await bus.start()
    sent = await bus.publish(OrderPlaced(order_id="r", amount=1))
    await started.wait()
    consumers = [task for c in bus._consumers.values() for task in c.tasks]
    with caplog.at_level(logging.WARNING, logger="msdata"):
        await bus.stop()
    assert all(task.done() for task in consumers)
    (record,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "rollback failed" in record.getMessage() and "not counted" in record.getMessage()
    async with transport.subscribe(bus.topic_of(OrderPlaced), "g", max_attempts=1) as sub:
        (again,) = await collect(sub, 1, timeout=2)
    assert (again.message.id, again.attempt) == (sent.id, 1)


async def test_middleware_wraps_handlers_in_order(
    transport: MemoryTransport, caplog: pytest.LogCaptureFixture
) -> None:
    trail: list[str] = []
    timings: list[tuple[str, BaseException | None]] = []

    def tag(name: str) -> Any:
        async def mw(env: Envelope[Any], call_next: Next) -> Any:
            trail.append(f"{name}>")
            result = await call_next(env)
            trail.append(f"<{name}")
            return result

        return mw

    bus = make_bus(
        transport,
        middleware=[tag("bus"), timing(lambda env, s, err: timings.append((env.type, err)))],
    )
    attempts = 0

    @bus.handler(
        OrderPlaced,
        group="g",
        middleware=[logging_middleware(level=logging.INFO), retry(3, base_delay=0), tag("h")],
    )
    async def handle(e: OrderPlaced) -> None:
        nonlocal attempts
        attempts += 1
        trail.append("handler")
        if attempts < 2:
            raise RuntimeError("first try fails")

    with caplog.at_level(logging.INFO, logger="msdata"):
        async with bus:
            await bus.publish(OrderPlaced(order_id="m", amount=1))
            await eventually(lambda: timings)
    assert trail == ["bus>", "h>", "handler", "h>", "handler", "<h", "<bus"]
    assert timings == [("test.OrderPlaced", None)]
    assert any("handled test.OrderPlaced" in r.getMessage() for r in caplog.records)


def test_wiring_errors(transport: MemoryTransport) -> None:
    bus = make_bus(transport)
    bus.subscribe(OrderPlaced, print, group="g")
    with pytest.raises(HandlerAlreadyRegistered):
        bus.subscribe(OrderPlaced, print, group="g")
    with pytest.raises(ConfigurationError):
        bus.subscribe(OrderPlaced, print, group="bad group")


@message_type("test.Picky", registry=registry)
class Picky(Event):
    n: int

    @field_validator("n")
    @classmethod
    def _no_thirteen(cls, v: int) -> int:
        if v == 13:
            raise TypeError("a validator that raises something odd")
        return v


async def test_handler_objects_with_async_call_are_awaited(transport: MemoryTransport) -> None:
    bus = make_bus(transport)
    seen: list[str] = []

    class Handler:
        async def __call__(self, e: OrderPlaced) -> None:
            await asyncio.sleep(0)
            seen.append(e.order_id)

    bus.subscribe(OrderPlaced, Handler(), group="g")
    async with bus:
        await bus.publish(OrderPlaced(order_id="obj", amount=1))
        await eventually(lambda: seen == ["obj"])


async def test_a_handler_raising_cancelled_error_is_a_failure_not_a_stop(
    transport: MemoryTransport,
) -> None:
    bus = make_bus(transport)
    calls = 0

    @bus.handler(OrderPlaced, group="g")
    async def awaits_a_cancelled_task(e: OrderPlaced) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            task = asyncio.create_task(asyncio.sleep(10))
            task.cancel()
            await task  # raises CancelledError into the handler

    async with bus:
        await bus.publish(OrderPlaced(order_id="c", amount=1))
        await eventually(lambda: calls == 2)  # redelivered: the consumer is still alive
        await bus.publish(OrderPlaced(order_id="d", amount=1))
        await eventually(lambda: calls == 3)


async def test_input_a_validator_chokes_on_is_dead_lettered(transport: MemoryTransport) -> None:
    bus = make_bus(transport)
    seen: list[int] = []
    bus.subscribe(Picky, lambda e: seen.append(e.n), group="g")
    topic = bus.topic_of(Picky)
    ok = bus.codec.encode(bus.envelope(Picky(n=1)))
    odd = ok.replace(b'"n":1', b'"n":13')
    async with bus:
        await transport.publish(
            topic, [TransportMessage(id="odd", body=odd), TransportMessage(id="ok", body=ok)]
        )
        await eventually(lambda: seen == [1])
        async with transport.subscribe(dead_letter_topic(topic, "g"), "ops") as dlq:
            (dead,) = await collect(dlq, 1, timeout=5)
    assert dead.message.id == "odd"
    assert "TypeError" in dead.message.headers[DEAD_LETTER_REASON]


async def test_retry_middleware_does_not_retry_a_rejection(transport: MemoryTransport) -> None:
    bus = make_bus(transport)
    calls = 0

    @bus.handler(OrderPlaced, group="g", middleware=[retry(5, base_delay=0)])
    async def reject(e: OrderPlaced) -> None:
        nonlocal calls
        calls += 1
        raise RejectMessage("no")

    async with bus:
        await bus.publish(OrderPlaced(order_id="r", amount=1))
        async with transport.subscribe(dead_letter_topic(bus.topic_of(OrderPlaced), "g"), "o") as d:
            await collect(d, 1, timeout=5)
    assert calls == 1


async def test_a_bus_on_a_closed_transport_fails_to_start(transport: MemoryTransport) -> None:
    bus = make_bus(transport)
    bus.subscribe(OrderPlaced, print, group="g")
    await transport.close()
    with pytest.raises(TransportClosed):
        await bus.start()
    with pytest.raises(ConfigurationError):
        EventBus(transport, source="")


async def test_stop_lets_the_handler_in_hand_finish_and_acks_it(
    transport: MemoryTransport,
) -> None:
    bus = make_bus(transport, stop_timeout=5)
    started = asyncio.Event()
    finished: list[str] = []

    @bus.handler(OrderPlaced, group="g")
    async def slowish(e: OrderPlaced) -> None:
        started.set()
        await asyncio.sleep(0.2)
        finished.append(e.order_id)

    await bus.start()
    sent = await bus.publish(OrderPlaced(order_id="in-hand", amount=1))
    await started.wait()
    await bus.stop()
    assert finished == ["in-hand"]
    async with transport.subscribe(bus.topic_of(OrderPlaced), "g") as sub:
        assert await sub.receive(10, timeout=0.2) == [], "a finished delivery came back"
    assert transport.pending(bus.topic_of(OrderPlaced), "g") == 0
    assert sent.type == "test.OrderPlaced"


async def test_the_bus_waits_by_its_backoff_between_redeliveries(
    transport: MemoryTransport,
) -> None:
    asked: list[int] = []

    def backoff(failures: int) -> float:
        asked.append(failures)
        return 0.0

    bus = make_bus(transport, max_attempts=3, backoff=backoff)
    bus.subscribe(OrderPlaced, lambda e: 1 / 0, group="g")
    async with bus:
        await bus.publish(OrderPlaced(order_id="b", amount=1))
        async with transport.subscribe(dead_letter_topic(bus.topic_of(OrderPlaced), "g"), "o") as d:
            await collect(d, 1, timeout=5)
    # the third failure dead-letters: no delay is asked for it
    assert asked == [1, 2]


def test_default_backoffs_keep_their_ranges() -> None:
    from msdata.events.bus import DEFAULT_BACKOFF

    for _ in range(200):
        assert 0.05 <= DEFAULT_BACKOFF(1) <= 0.1
        assert 0.1 <= DEFAULT_BACKOFF(2) <= 0.2
        assert 15.0 <= DEFAULT_BACKOFF(50) <= 30.0


async def test_retry_middleware_waits_by_its_backoff() -> None:
    asked: list[int] = []

    def backoff(failures: int) -> float:
        asked.append(failures)
        return 0.0

    calls = 0

    async def flaky(env: Any) -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise RuntimeError("again")
        return "done"

    mw = retry(4, backoff=backoff)
    assert await mw(None, flaky) == "done"  # type: ignore[arg-type]
    assert asked == [1, 2]
    with pytest.raises(ConfigurationError):
        retry(0)


async def test_a_dead_letter_is_logged_once_with_the_handlers_traceback(
    transport: MemoryTransport, caplog: pytest.LogCaptureFixture
) -> None:
    bus = make_bus(transport, max_attempts=2)

    @bus.handler(OrderPlaced, group="g")
    async def declines(e: OrderPlaced) -> None:
        raise ValueError("card declined")

    with caplog.at_level(logging.WARNING, logger="msdata"):
        async with bus:
            sent = await bus.publish(OrderPlaced(order_id="t", amount=1))
            topic = bus.topic_of(OrderPlaced)
            async with transport.subscribe(dead_letter_topic(topic, "g"), "o") as d:
                await collect(d, 1, timeout=5)
    dead = [r for r in caplog.records if r.name == "msdata.deadletter"]
    assert len(dead) == 1
    (record,) = dead
    assert record.levelno == logging.WARNING
    assert record.msdata_message_id == sent.id  # type: ignore[attr-defined]
    assert record.msdata_type == "test.OrderPlaced"  # type: ignore[attr-defined]
    assert record.msdata_attempts == 2  # type: ignore[attr-defined]
    assert record.msdata_reason == "ValueError: card declined"  # type: ignore[attr-defined]
    assert record.exc_info is not None and record.exc_info[0] is ValueError
    # the first failure is a warning of its own; the last one is the dead letter's line
    failures = [r for r in caplog.records if r.name == "msdata.events"]
    assert len(failures) == 1 and "attempt 1 of 2" in failures[0].getMessage()


async def test_stop_returns_at_its_timeout_when_a_handler_will_not_stop(
    transport: MemoryTransport, caplog: pytest.LogCaptureFixture
) -> None:
    bus = make_bus(transport, stop_timeout=30)
    started = asyncio.Event()
    release = asyncio.Event()
    returned: list[str] = []

    @bus.handler(OrderPlaced, group="stubborn")
    async def stubborn(e: OrderPlaced) -> None:
        started.set()
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):  # swallowed: it keeps waiting
                await release.wait()
        returned.append(e.order_id)

    await bus.start()
    sent = await bus.publish(OrderPlaced(order_id="stuck", amount=1))
    await started.wait()
    with caplog.at_level(logging.ERROR, logger="msdata.events"):
        # stop_timeout is 30 s: the call's own bound wins, and stop() comes back
        await asyncio.wait_for(bus.stop(timeout=0.5), timeout=5)
    (record,) = [r for r in caplog.records if "would not stop" in r.getMessage()]
    assert "stubborn" in record.getMessage() and sent.id in record.getMessage()
    # the delivery was released, not acked: another consumer of the group gets it again
    async with transport.subscribe(bus.topic_of(OrderPlaced), "stubborn") as sub:
        (again,) = await collect(sub, 1, timeout=2, ack=False)
        assert again.message.id == sent.id and again.attempt == 2
        release.set()  # the abandoned handler finally returns: it must settle nothing
        await eventually(lambda: returned == ["stuck"], 5.0, what="the handler to return")
        await eventually(
            lambda: (
                not any(t.get_name().startswith("msdata-consumer") for t in asyncio.all_tasks())
            ),
            5.0,
            what="the abandoned consumer task to end",
        )
        await again.ack()
    assert transport.pending(bus.topic_of(OrderPlaced), "stubborn") == 0


# -- stopping under load, on every transport -------------------------------------------------


@pytest.mark.parametrize(
    "backend",
    [
        *TRANSPORTS,
        # the ordered modes (RabbitMQ: single active consumer, a stopping consumer's
        # deliveries go back in their places; NATS: a consumer per key partition)
        pytest.param("rabbitmq-ordered", id="rabbitmq-ordered", marks=pytest.mark.rabbitmq),
        pytest.param("nats-ordered", id="nats-ordered", marks=pytest.mark.nats),
    ],
)
async def test_stopping_under_load_again_and_again_dead_letters_nothing(backend: str) -> None:
    """A service stopped gracefully during a burst, more times than ``max_attempts``, with
    competing consumers (``concurrency``) each holding a prefetch: every event is handled in
    the end and none is dead-lettered (stopping counts no attempt for what a consumer did not
    start on, so messages do not cycle through the stopping consumers to ``max_attempts``)."""
    backend, ordered = backend.removesuffix("-ordered"), backend.endswith("-ordered")
    topic, group = f"stop-{uuid.uuid4().hex[:8]}", "inventory"
    n, max_attempts = 300, 3
    handled: set[str] = set()

    async def handle(event: OrderPlaced) -> None:
        await asyncio.sleep(0.005)
        handled.add(event.order_id)

    def bus_on(t: Any) -> EventBus:
        bus = make_bus(t, concurrency=8, prefetch=50, max_attempts=max_attempts)
        bus.subscribe(OrderPlaced, handle, group=group, topic=topic)
        return bus

    async with open_transport(backend, ordered=ordered) as t:
        await t.declare_group(topic, group)
        await t.declare_group(dead_letter_topic(topic, group), "audit")
        publisher = make_bus(t)
        await publisher.publish_many(
            [OrderPlaced(order_id=f"o-{i}", amount=i) for i in range(n)], topic=topic
        )
        for _ in range(max_attempts + 2):
            bus = bus_on(t)
            before = len(handled)
            async with bus:
                # stop in the middle of the burst, with every consumer holding deliveries
                await eventually(
                    lambda b=before: len(handled) > b or len(handled) == n,  # type: ignore[misc]
                    timeout=20,
                    what="some handled",
                )
        async with bus_on(t):
            await eventually(lambda: len(handled) == n, timeout=60, what="all handled")
        async with t.subscribe(dead_letter_topic(topic, group), "audit") as dlq:
            dead = await dlq.receive(100, timeout=1.0)
            assert [d.message.headers.get(DEAD_LETTER_REASON) for d in dead] == []


_STOP_BACKENDS = [
    *TRANSPORTS,
    pytest.param("rabbitmq-ordered", id="rabbitmq-ordered", marks=pytest.mark.rabbitmq),
    pytest.param("nats-ordered", id="nats-ordered", marks=pytest.mark.nats),
]


class _Attempts(Telemetry):
    """Records each delivery the bus hands to a handler: (order id, attempt)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def consume(
        self,
        topic: str,
        group: str,
        delivery: Delivery,
        envelope: Envelope[Any],
        handler: Callable[..., Any],
    ) -> ConsumeScope:
        self.seen.append((envelope.message.order_id, delivery.attempt))
        return super().consume(topic, group, delivery, envelope, handler)


@pytest.mark.parametrize("backend", _STOP_BACKENDS)
async def test_a_handler_cancelled_by_stop_again_and_again_is_handled_later_uncounted(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A rolling deploy with a handler longer than ``stop_timeout``: each stop cancels it,
    and its delivery goes back uncounted (the bus cancelled it; the message did nothing
    wrong), as do the deliveries its consumer held behind it. Stopped more times than
    ``max_attempts``, none is dead-lettered: each comes back with its first attempt, and
    all are handled once a bus lets the long one finish."""
    backend, ordered = backend.removesuffix("-ordered"), backend.endswith("-ordered")
    topic, group, max_attempts = f"long-{uuid.uuid4().hex[:8]}", "reports", 2
    finished: list[str] = []
    let_finish = asyncio.Event()
    attempts = _Attempts()

    async def report(event: OrderPlaced) -> None:
        if event.order_id == "long":
            await let_finish.wait()  # longer than stop_timeout, until the last run
        finished.append(event.order_id)

    def long_started() -> int:
        return sum(1 for order, _ in attempts.seen if order == "long")

    previous = telemetry.install(attempts)
    try:
        async with open_transport(backend, ordered=ordered) as t:
            await t.declare_group(topic, group)
            await t.declare_group(dead_letter_topic(topic, group), "audit")
            bus = make_bus(t, max_attempts=max_attempts, stop_timeout=0.2)
            bus.subscribe(OrderPlaced, report, group=group, topic=topic)
            await make_bus(t).publish_many(
                [OrderPlaced(order_id=i, amount=1) for i in ("long", "b1", "b2", "b3")],
                topic=topic,
                key=lambda e: "k",  # one key: on the ordered modes the others wait behind it
            )
            with caplog.at_level(logging.WARNING, logger="msdata"):
                for stops in range(max_attempts + 1):
                    async with bus:
                        await eventually(
                            lambda n=stops: long_started() > n,  # type: ignore[misc]
                            timeout=20,
                            what="the long handler to start again",
                        )
                assert "long" not in finished
                let_finish.set()
                async with bus:
                    await eventually(
                        lambda: sorted(finished) == ["b1", "b2", "b3", "long"],
                        timeout=20,
                        what="all handled",
                    )
            async with t.subscribe(dead_letter_topic(topic, group), "audit") as dlq:
                assert await dlq.receive(10, timeout=0.5) == []
    finally:
        telemetry.install(previous)
    # handed out again after each stop, never counted
    assert long_started() == max_attempts + 2
    assert {attempt for _, attempt in attempts.seen} == {1}
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("backend", _STOP_BACKENDS)
async def test_the_batch_behind_a_handler_that_ignores_stop_is_given_back_uncounted(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that ignores its cancellation is left behind at each stop, its own delivery
    redelivered counted (at last dead-lettered); the deliveries its consumer held behind it,
    never handed to a handler, are given back uncounted before its subscription closes:
    however often the bus stops, each is handled at its first attempt."""
    backend, ordered = backend.removesuffix("-ordered"), backend.endswith("-ordered")
    topic, group, max_attempts = f"deaf-{uuid.uuid4().hex[:8]}", "reports", 2
    finished: list[str] = []
    returned: list[str] = []
    attempts = _Attempts()
    release = asyncio.Event()

    async def report(event: OrderPlaced) -> None:
        if event.order_id == "deaf":
            while not release.is_set():
                with contextlib.suppress(asyncio.CancelledError):  # the bus leaves it behind
                    await release.wait()
            returned.append(event.order_id)
            return
        finished.append(event.order_id)

    def deaf_started() -> int:
        return sum(1 for order, _ in attempts.seen if order == "deaf")

    previous = telemetry.install(attempts)
    try:
        async with open_transport(backend, ordered=ordered) as t:
            await t.declare_group(topic, group)
            await t.declare_group(dead_letter_topic(topic, group), "audit")
            bus = make_bus(t, max_attempts=max_attempts, stop_timeout=0.2)
            bus.subscribe(OrderPlaced, report, group=group, topic=topic)
            sent = await make_bus(t).publish_many(
                [OrderPlaced(order_id=i, amount=1) for i in ("deaf", "b1", "b2", "b3")],
                topic=topic,
            )
            with caplog.at_level(logging.WARNING, logger="msdata"):
                for stops in range(max_attempts):
                    release.clear()
                    async with bus:
                        await eventually(
                            lambda n=stops: deaf_started() > n,  # type: ignore[misc]
                            timeout=20,
                            what="the deaf handler to start again",
                        )
                    release.set()  # the handler left behind returns, settling nothing
                    await eventually(
                        lambda n=stops: len(returned) > n,  # type: ignore[misc]
                        what="the deaf handler to return",
                    )
                async with bus:  # the deaf one's third attempt is over max_attempts
                    await eventually(
                        lambda: sorted(finished) == ["b1", "b2", "b3"],
                        timeout=20,
                        what="the others handled",
                    )
            async with t.subscribe(dead_letter_topic(topic, group), "audit") as dlq:
                dead = await collect(dlq, 1, timeout=20)
                dead += await dlq.receive(10, timeout=0.5)
                assert [d.message.id for d in dead] == [sent[0].id]
    finally:
        telemetry.install(previous)
    assert sorted(finished) == ["b1", "b2", "b3"]
    assert {attempt for order, attempt in attempts.seen if order != "deaf"} == {1}
    # nothing failed to be given back (the deaf one's dead-lettering is logged apart)
    events_log = [r for r in caplog.records if r.name == "msdata.events"]
    assert [r.getMessage() for r in events_log if r.levelno == logging.WARNING] == []


@pytest.mark.parametrize("backend", _STOP_BACKENDS)
async def test_a_handler_cancelled_under_a_short_stop_timeout_is_not_left_behind(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that stops when cancelled is not reported as one that would not stop,
    however short ``stop_timeout``: after cancelling it, the bus waits for the cancellation
    and the transport's clean-up (giving the delivery back, closing the subscription), and
    the consumer task has ended when ``stop`` returns."""
    backend, ordered = backend.removesuffix("-ordered"), backend.endswith("-ordered")
    topic, group = f"short-{uuid.uuid4().hex[:8]}", "g"
    started = asyncio.Event()

    async def sleeps(event: OrderPlaced) -> None:
        started.set()
        await asyncio.sleep(60)

    async with open_transport(backend, ordered=ordered) as t:
        bus = make_bus(t, stop_timeout=0.05)
        bus.subscribe(OrderPlaced, sleeps, group=group, topic=topic)
        await bus.start()
        await bus.publish(OrderPlaced(order_id="s", amount=1), topic=topic)
        await started.wait()
        consumers = [task for c in bus._consumers.values() for task in c.tasks]
        with caplog.at_level(logging.WARNING, logger="msdata"):
            await bus.stop()
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
        assert all(task.done() for task in consumers)


async def test_in_process_delivery_validates_its_own_copy_of_each_event(
    transport: MemoryTransport,
) -> None:
    """On the in-memory transport the consumer validates only the data (the envelope's
    attributes are the ones published): each handler still gets its own message, validated
    from the bytes, and the envelope decode would read. A publish_many shares one time."""
    bus = make_bus(transport)
    got: list[tuple[OrderPlaced, Envelope[Any] | None]] = []

    @bus.handler(OrderPlaced, group="g")
    async def handle(e: OrderPlaced) -> None:
        got.append((e, current_envelope()))

    events = [OrderPlaced(order_id=f"o-{i}", amount=i) for i in range(3)]
    async with bus:
        sent = await bus.publish_many(events, key=lambda e: e.order_id)  # type: ignore[attr-defined]
        sent.append(await bus.publish(events[0], headers={"tenant": "t"}))
        await eventually(lambda: len(got) == 4)
    assert [envelope for _, envelope in got] == sent
    assert [e for e, _ in got] == [*events, events[0]]
    assert not any(e is p for (e, _), p in zip(got, [*events, events[0]], strict=True))
    assert len({s.time for s in sent[:3]}) == 1
    assert [s.id for s in sent] == sorted(s.id for s in sent)


async def test_publish_many_takes_one_key_for_every_event_or_a_function_of_each(
    transport: MemoryTransport,
) -> None:
    """``key=`` of publish_many: a str is every event's partition key (as publish's), a
    function gives each event its own."""
    bus = make_bus(transport)
    events = [OrderPlaced(order_id=f"o-{i}", amount=i) for i in range(3)]
    async with bus:
        one = await bus.publish_many(events, key="customer-7")
        each = await bus.publish_many(events, key=lambda e: e.order_id)  # type: ignore[attr-defined]
        none = await bus.publish_many(events)
    assert [s.partition_key for s in one] == ["customer-7"] * 3
    assert [s.partition_key for s in each] == ["o-0", "o-1", "o-2"]
    assert [s.partition_key for s in none] == [None] * 3
    with pytest.raises(InvalidHeader, match="partition key"):
        await bus.publish_many(events, key=5)  # type: ignore[arg-type]


async def test_publish_writes_what_the_codec_writes_and_counts_sizes_as_message_size(
    transport: MemoryTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """publish() takes the id and the time from one clock reading and hands the codec the
    time's text (a cache per second): the bytes are those the codec's reference path writes
    for the envelope it returns, across second boundaries and at microsecond 0, with and
    without a key, a parent or headers. The transport takes the bus's own messages without
    checking them again and counts their size as message_size does."""
    from msdata import ids
    from msdata.transport import message_size

    bus = make_bus(transport)
    parent = make_envelope(OrderShipped(order_id="p"), registry=registry)
    second = 1_900_000_000 * 10**9
    readings = iter([second - 1000, second, second + 1000, second + 999_999_000, second + 10**9])
    monkeypatch.setattr(ids, "_time_ns", lambda: next(readings))
    for name in ("_last_ms", "_tail"):  # put back afterwards: the readings are in 2030
        monkeypatch.setattr(ids, name, getattr(ids, name))
    await transport.declare_group("test.OrderPlaced", "raw")
    sent = [
        await bus.publish(OrderPlaced(order_id="o-1", amount=1)),
        await bus.publish(OrderPlaced(order_id="o-2", amount=2), key="k-\u00e9"),
    ]
    with handling(parent):
        sent.append(await bus.publish(OrderPlaced(order_id="o-3", amount=3)))
    sent.append(await bus.publish(OrderPlaced(order_id="o-4", amount=4), headers={"h": "v"}))
    sent.append(await bus.publish(OrderPlaced(order_id="o-5", amount=5), key="k"))
    assert [s.time.microsecond for s in sent] == [999_999, 0, 1, 999_999, 0]
    assert sent[2].causation_id == parent.id and sent[2].correlation_id == parent.id
    async with transport.subscribe("test.OrderPlaced", "raw") as sub:
        batch = await sub.receive(10, timeout=0)
        assert [d.message.id for d in batch] == [s.id for s in sent]
        for delivery, envelope in zip(batch, sent, strict=True):
            encoder = bus.codec._encoders[OrderPlaced][0]
            assert delivery.message.body == bus.codec._encode_whole(encoder, envelope)
            assert bus.codec.decode(delivery.message.body) == envelope
        assert sub._held_bytes == sum(message_size(d.message) for d in batch)


class _HeldRelease:
    """Wraps a transport: its subscriptions' first ``receive`` returns once it has ``batch``
    deliveries, and the first ``release`` of any of them signals ``holding`` and waits
    until cancelled (it gives nothing back): a release still running when ``stop``'s
    timeout runs out. ``stubborn``: it ignores its cancellation too, until ``let_go``
    (then gives back): a release still running when ``stop``'s grace runs out."""

    def __init__(self, inner: Any, batch: int, stubborn: bool) -> None:
        self.inner, self.batch, self.stubborn = inner, batch, stubborn
        self.holding = asyncio.Event()
        self.let_go = asyncio.Event()
        self.released = 0  # releases that reached the transport's own release

    def subscribe(self, topic: str, group: str, **kw: Any) -> Any:
        return _HeldReleaseSub(self, self.inner.subscribe(topic, group, **kw))


class _HeldReleaseSub:
    def __init__(self, owner: _HeldRelease, inner: Any) -> None:
        self.owner, self.inner, self.first = owner, inner, True

    async def __aenter__(self) -> _HeldReleaseSub:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.inner.__aexit__(*exc)

    async def receive(self, max_messages: int = 100, timeout: float = 1.0) -> list[Any]:
        if not self.first:
            return [
                _HeldReleaseDelivery(self.owner, d)
                for d in await self.inner.receive(max_messages, timeout)
            ]
        self.first = False
        got = await collect(self.inner, self.owner.batch, timeout=20, ack=False)
        return [_HeldReleaseDelivery(self.owner, d) for d in got]


class _HeldReleaseDelivery:
    def __init__(self, owner: _HeldRelease, inner: Delivery) -> None:
        self.owner, self.inner = owner, inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def release(self) -> None:
        if not self.owner.holding.is_set():
            self.owner.holding.set()
            if not self.owner.stubborn:
                await asyncio.Event().wait()  # until stop() cancels the consumer
            while not self.owner.let_go.is_set():
                with contextlib.suppress(asyncio.CancelledError):
                    await self.owner.let_go.wait()
        try:
            await self.inner.release()
        finally:
            self.owner.released += 1


@pytest.mark.parametrize("stubborn", [False, True], ids=["cancelled", "left-behind"])
@pytest.mark.parametrize("backend", _STOP_BACKENDS)
async def test_a_consumer_cancelled_while_giving_back_its_batch_gives_back_the_rest(
    backend: str, stubborn: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """``stop``'s timeout runs out while a consumer gives back the deliveries of its batch
    it did not start on (a release held here; under load, releases that take their time):
    cancelled, it still gives back every one it had not given back; left behind (the
    release does not stop even when cancelled), ``stop`` gives them back before it closes
    the subscription. Either way none is redelivered counted (with ``max_attempts=1``:
    dead-lettered), and the releases left behind, which find their subscription closed, are
    not reported as failed ("they are redelivered" would be false: ``stop`` gave them back)."""
    backend, ordered = backend.removesuffix("-ordered"), backend.endswith("-ordered")
    topic, group = f"held-{uuid.uuid4().hex[:8]}", "g"
    caplog.set_level(logging.WARNING, logger="msdata.events")
    names = ["first", "b1", "b2", "b3"]
    finished: list[str] = []
    go = asyncio.Event()
    attempts = _Attempts()

    async def handle(event: OrderPlaced) -> None:
        if event.order_id == "first":
            await go.wait()
        finished.append(event.order_id)

    previous = telemetry.install(attempts)
    try:
        async with open_transport(backend, ordered=ordered) as t:
            await t.declare_group(topic, group)
            await t.declare_group(dead_letter_topic(topic, group), "audit")
            await make_bus(t).publish_many(
                [OrderPlaced(order_id=n, amount=1) for n in names], topic=topic
            )
            held = _HeldRelease(t, len(names), stubborn)
            bus = make_bus(held, max_attempts=1, stop_timeout=0.2, prefetch=10)  # type: ignore[arg-type]
            bus.subscribe(OrderPlaced, handle, group=group, topic=topic)
            await bus.start()
            await eventually(lambda: [o for o, _ in attempts.seen] == ["first"], 20, what="first")
            stopping = asyncio.create_task(bus.stop())
            await asyncio.sleep(0)  # stop() has begun: the consumer stops after "first"
            go.set()
            await held.holding.wait()  # giving back b1..b3: b1's release holds
            with caplog.at_level(logging.ERROR, logger="msdata.events"):
                await stopping
            left_behind = [r for r in caplog.records if "would not stop" in r.getMessage()]
            assert len(left_behind) == stubborn
            held.let_go.set()  # a release left behind returns: its subscription is closed
            assert finished == ["first"]
            again = make_bus(t, max_attempts=1)
            again.subscribe(OrderPlaced, handle, group=group, topic=topic)
            async with again:
                await eventually(lambda: sorted(finished) == sorted(names), 20, what="all")
            async with t.subscribe(dead_letter_topic(topic, group), "audit") as dlq:
                assert await dlq.receive(10, timeout=0.5) == []
            await eventually(lambda: held.released >= len(names) - 1, 20, what="releases")
    finally:
        telemetry.install(previous)
    assert sorted(attempts.seen) == sorted((n, 1) for n in names)
    assert [r.getMessage() for r in caplog.records if "deliveries failed" in r.getMessage()] == []


def _unreachable(backend: str, host: str, port: int, timeout: float) -> Any:
    """A transport of a networked ``backend`` at ``host:port``, every connect timeout
    ``timeout`` seconds (as a user builds it from a URL)."""
    if backend == "redis":
        from msdata.adapters.redis import RedisTransport

        return RedisTransport.from_url(
            f"redis://{host}:{port}/0?socket_connect_timeout={timeout}&socket_timeout={timeout}"
        )
    if backend == "rabbitmq":
        from msdata.adapters.rabbitmq import RabbitMQTransport

        return RabbitMQTransport.from_url(
            f"amqp://msdata:pw@{host}:{port}/", publish_timeout=timeout, connect_timeout=timeout
        )
    from msdata.adapters.nats import NatsTransport

    return NatsTransport.from_url(
        f"nats://{host}:{port}", publish_timeout=timeout, connect_timeout=timeout
    )


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
        pytest.param("nats", marks=pytest.mark.nats),
    ],
)
async def test_start_against_a_server_that_never_answers_fails_within_one_connect_timeout(
    backend: str,
) -> None:
    """docs: start() raises TransportError within the transport's connect timeout. With
    three groups it must not take three of them: on RabbitMQ the consumers' connects
    queued one after the other (3 groups, connect_timeout 2 s: 6 s)."""
    silent: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)  # kept open, never answered

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    timeout, margin = 2.0, 3.0  # the three connects one after the other take 6 s
    try:
        t = _unreachable(backend, host, port, timeout)
        try:
            bus = make_bus(t)

            async def ignore(event: OrderPlaced) -> None:
                pass

            for n in range(3):
                bus.subscribe(OrderPlaced, ignore, group=f"g{n}", topic="orders")
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(TransportError):
                await asyncio.wait_for(bus.start(), 60)
            took = loop.time() - started
            assert took < timeout + margin, f"start took {took:.1f}s for 3 groups"
        finally:
            await asyncio.wait_for(t.close(), 30)
    finally:
        server.close()
        for writer in silent:
            writer.close()
        await server.wait_closed()
    assert silent, "the transport never connected to the server"


# -- a handler raising a BaseException that is not an Exception ------------------------------


class _Leave(BaseException):
    """A handler's own BaseException that is not an Exception."""


@pytest.mark.parametrize(
    "error",
    [SystemExit(3), KeyboardInterrupt(), GeneratorExit(), _Leave("leave")],
    ids=["SystemExit", "KeyboardInterrupt", "GeneratorExit", "own-BaseException"],
)
@pytest.mark.parametrize("backend", TRANSPORTS)
async def test_a_handler_raising_a_base_exception_stops_the_bus_with_it_and_loses_nothing(
    backend: str, error: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    """SystemExit, KeyboardInterrupt or any BaseException that is not an Exception, raised
    by a handler, is not swallowed: it is logged at ERROR with its traceback, handler,
    group, topic and message id; ``async with bus`` ends with that very exception (the task
    running the bus is cancelled for it, and uncancelled); the delivery is nacked, its
    attempt counted, and redelivered; the rest of the consumer's batch is given back and
    handled later."""
    topic, group = f"leave-{uuid.uuid4().hex[:8]}", "g"
    handled: list[str] = []
    attempts = _Attempts()

    async def leave_on_first(event: OrderPlaced) -> None:
        if event.order_id == "leave" and not any(o == "leave" for o, _ in handled_attempts()):
            raise error
        handled.append(event.order_id)

    def handled_attempts() -> list[tuple[str, int]]:
        return attempts.seen[:-1]  # those before the delivery in hand

    previous = telemetry.install(attempts)
    try:
        async with open_transport(backend) as t:
            await t.declare_group(topic, group)
            sent, _ = await make_bus(t).publish_many(
                [OrderPlaced(order_id="leave", amount=1), OrderPlaced(order_id="after", amount=2)],
                topic=topic,
            )
            bus = make_bus(t, max_attempts=3)
            bus.subscribe(OrderPlaced, leave_on_first, group=group, topic=topic)
            with (
                caplog.at_level(logging.ERROR, logger="msdata.events"),
                pytest.raises(type(error)) as raised,
            ):
                async with bus:
                    await asyncio.sleep(30)  # the bus cancels this: the handler raised
            assert raised.value is error
            task = asyncio.current_task()
            assert task is not None and task.cancelling() == 0  # the bus's cancel is undone
            (record,) = [r for r in caplog.records if r.name == "msdata.events"]
            text = record.getMessage()
            assert record.levelno == logging.ERROR and record.exc_info is not None
            assert record.exc_info[1] is error
            for part in ("leave_on_first", f"group {group}", f"topic {topic}", sent.id):
                assert part in text, text
            assert handled == []  # the rest of the batch was given back, not handled

            again = make_bus(t, max_attempts=3)
            again.subscribe(OrderPlaced, leave_on_first, group=group, topic=topic)
            async with again:
                await eventually(
                    lambda: sorted(handled) == ["after", "leave"], timeout=20, what="both"
                )
    finally:
        telemetry.install(previous)
    assert ("leave", 1) in attempts.seen and ("leave", 2) in attempts.seen  # counted
    assert ("leave", 3) not in attempts.seen
