"""Telemetry: the no-op hooks, the OpenTelemetry spans across outbox and broker (checked
as a span tree with the SDK's in-memory exporter), metric values, the logging filter."""

from __future__ import annotations

import itertools
import logging
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler
from opentelemetry.trace import SpanKind
from pydantic import BaseModel

from msdata import telemetry
from msdata.adapters.memory import (
    MemoryEventStore,
    MemoryOutboxStore,
    MemorySagaStore,
    MemoryTransaction,
    MemoryTransport,
)
from msdata.adapters.memory.audit import MemoryOutboxAudit
from msdata.adapters.memory.idempotency import MemoryIdempotencyStore
from msdata.adapters.opentelemetry import OpenTelemetry
from msdata.adapters.sqlite import SqliteOutboxStore, connect
from msdata.audit import EventStoreAudit, SagaAudit, audit_trail
from msdata.composition import compose, required
from msdata.cqrs import CommandBus
from msdata.errors import ConfigurationError, IdempotencyKeyReused, SagaStepFailed
from msdata.events import EventBus
from msdata.eventstore import EventLog
from msdata.idempotency import IdempotencyKeys
from msdata.messages import Command, Event, MessageRegistry, handling, make_envelope
from msdata.outbox import Outbox, OutboxRelay
from msdata.projections.runner import Lag
from msdata.saga import Saga, SagaOrchestrator, SagaStatus
from msdata.telemetry import MessageContextFilter
from msdata.testing import eventually
from msdata.transport import TransportMessage

registry = MessageRegistry()


class OrderPlaced(Event):
    order_id: str


class PaymentRequested(Event):
    order_id: str


class PlaceOrder(Command):
    order_id: str


class Boom(Event):
    n: int


registry.register(OrderPlaced, "orders.OrderPlaced", 1)
registry.register(PaymentRequested, "billing.PaymentRequested", 1)
registry.register(Boom, "test.Boom", 1)


class Otel:
    def __init__(self, sampler: Sampler | None = None) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider(sampler=sampler)
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.hooks = OpenTelemetry(
            tracer_provider=self.tracer_provider, meter_provider=self.meter_provider
        )
        self.tracer = self.tracer_provider.get_tracer("test")

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def metric(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """(attributes, value) of each data point of metric ``name``."""
        data = self.reader.get_metrics_data()
        out = []
        assert data is not None
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == name:
                        for p in m.data.data_points:
                            value = getattr(p, "value", None)
                            if value is None:
                                value = p.count  # a histogram: how many were recorded
                            out.append((dict(p.attributes), value))
        return out


@pytest.fixture
def otel() -> Iterator[Otel]:
    o = Otel()
    previous = telemetry.install(o.hooks)
    try:
        yield o
    finally:
        telemetry.install(previous)


def one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def child_of(span: ReadableSpan, parent: ReadableSpan) -> bool:
    assert span.parent is not None, f"{span.name} has no parent"
    assert span.context is not None and parent.context is not None
    return (
        span.parent.span_id == parent.context.span_id
        and span.context.trace_id == parent.context.trace_id
    )


async def test_the_noop_hooks_change_nothing() -> None:
    assert type(telemetry.hooks) is telemetry.Telemetry
    env = make_envelope(OrderPlaced(order_id="1"), registry=registry)
    assert telemetry.hooks.message_created("t", env, outbox=True) is env
    with telemetry.hooks.publishing("t", [], object()) as messages:
        assert messages == []


async def test_with_only_the_api_the_hooks_pass_messages_through() -> None:
    hooks = OpenTelemetry(
        tracer_provider=trace.NoOpTracerProvider(), meter_provider=metrics.NoOpMeterProvider()
    )
    env = make_envelope(OrderPlaced(order_id="1"), registry=registry)
    assert hooks.message_created("t", env, outbox=True) is env
    messages = [TransportMessage("id", b"{}")]
    with hooks.publishing("t", messages, object()) as sent:
        assert sent is messages


async def test_the_relay_makes_one_publish_span_per_batch_linked_to_each_row(
    otel: Otel,
) -> None:
    store = MemoryOutboxStore()
    with MemoryTransaction() as tx:
        added = Outbox(store, registry=registry).add(tx, [Boom(n=1), Boom(n=2)])
    transport = MemoryTransport()
    await transport.declare_group("test.Boom", "g")
    assert await OutboxRelay(store, transport).run_once() == 2
    spans = otel.finished()
    publish = one(spans, "publish test.Boom")
    assert publish.kind is SpanKind.CLIENT  # its context is no message's creation context
    creates = [s.context.span_id for s in spans if s.name == "create test.Boom" and s.context]
    assert len(creates) == 2
    assert sorted(link.context.span_id for link in publish.links) == sorted(creates)
    assert publish.attributes is not None
    assert publish.attributes["messaging.batch.message_count"] == 2
    # the rows' creation contexts reach the consumers unchanged
    async with transport.subscribe("test.Boom", "g") as sub:
        got = await sub.receive(10, timeout=1.0)
    assert sorted(d.message.headers["traceparent"] for d in got) == sorted(
        e.headers["traceparent"] for e in added
    )


async def test_the_batch_span_links_only_the_rows_whose_creation_was_sampled(
    otel: Otel,
) -> None:
    sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    dropped = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b8-00"
    messages = [
        TransportMessage("a", b"{}", None, {"traceparent": sampled}),
        TransportMessage("b", b"{}", None, {"traceparent": dropped}),
        TransportMessage("c", b"{}", None, {"traceparent": "garbage-01"}),
        TransportMessage("d", b"{}"),
    ]
    with otel.hooks.publishing("t", messages, MemoryTransport()) as sent:
        assert sent is messages  # sent as they are
    publish = one(otel.finished(), "publish t")
    assert [format(link.context.span_id, "016x") for link in publish.links] == ["00f067aa0ba902b7"]


@pytest.mark.parametrize(("relay_spans", "handler_spans"), [("batch", False), ("message", True)])
async def test_one_trace_from_the_request_through_two_services(
    otel: Otel, relay_spans: str, handler_spans: bool
) -> None:
    """HTTP-like root -> create (outbox add) -> process (the handler), then from inside that
    handler on through a second service's outbox, relay and consumer; the relay's
    ``publish`` span (one per batch) links to the ``create`` spans (the defaults). With
    ``relay_spans="message"`` a ``publish`` span per row between ``create`` and
    ``process``; with ``handler_spans=True`` a ``handle`` span under ``process``."""
    otel.hooks.relay_spans = relay_spans  # type: ignore[assignment]
    otel.hooks.handler_spans = handler_spans
    last = "handle" if handler_spans else "process"
    tmp = Path(tempfile.mkdtemp())
    orders_db, billing_db = str(tmp / "orders.db"), str(tmp / "billing.db")
    orders_store, billing_store = SqliteOutboxStore(orders_db), SqliteOutboxStore(billing_db)
    await orders_store.create_schema()
    await billing_store.create_schema()
    orders_outbox = Outbox(orders_store, registry=registry, source="orders")
    billing_outbox = Outbox(billing_store, registry=registry, source="billing")
    transport = MemoryTransport()
    billing_bus = EventBus(transport, registry=registry, source="billing")
    shipping_bus = EventBus(transport, registry=registry, source="shipping")
    shipped: list[str] = []

    @billing_bus.handler(OrderPlaced, group="billing")
    async def request_payment(event: OrderPlaced) -> None:
        with connect(billing_db) as conn:
            billing_outbox.add(conn, PaymentRequested(order_id=event.order_id), key="42")

    @shipping_bus.handler(PaymentRequested, group="shipping")
    async def ship(event: PaymentRequested) -> None:
        shipped.append(event.order_id)

    with (
        otel.tracer.start_as_current_span("POST /orders", kind=SpanKind.SERVER),
        connect(orders_db) as conn,
    ):
        (env,) = orders_outbox.add(conn, OrderPlaced(order_id="42"), key="42")
    assert "traceparent" in env.headers
    with connect(orders_db) as conn:  # the trace context is stored in the outbox row
        (stored,) = conn.execute("SELECT headers FROM msdata_outbox").fetchone()
    assert env.headers["traceparent"] in stored

    keep = timedelta(hours=1)  # sent rows kept: the audit trail reads them
    relays = [
        OutboxRelay(orders_store, transport, retention=keep),
        OutboxRelay(billing_store, transport, retention=keep),
    ]
    async with billing_bus, shipping_bus, relays[0], relays[1]:
        await eventually(lambda: shipped == ["42"], timeout=10, what="the payment to ship")
        await eventually(
            lambda: any(s.name == f"{last} billing.PaymentRequested" for s in otel.finished()),
            timeout=10,
            what="the last span",
        )
    spans = otel.finished()
    root = one(spans, "POST /orders")
    create = one(spans, "create orders.OrderPlaced")
    publish = one(spans, "publish orders.OrderPlaced")
    process = one(spans, "process orders.OrderPlaced")
    create2 = one(spans, "create billing.PaymentRequested")
    publish2 = one(spans, "publish billing.PaymentRequested")
    process2 = one(spans, "process billing.PaymentRequested")
    chain = [root, create, publish, process, create2, publish2, process2]
    if relay_spans == "message":
        assert publish.kind is SpanKind.PRODUCER
    else:
        chain = [s for s in chain if s not in (publish, publish2)]
        for p, c in ((publish, create), (publish2, create2)):
            assert p.kind is SpanKind.CLIENT
            assert [link.context.span_id for link in p.links] == [c.context.span_id]  # type: ignore[union-attr]
    if handler_spans:
        handle = one(spans, "handle orders.OrderPlaced")
        handle2 = one(spans, "handle billing.PaymentRequested")
        chain.insert(chain.index(process) + 1, handle)
        chain.append(handle2)
        assert handle.kind is SpanKind.INTERNAL
    else:
        assert not [s.name for s in spans if s.name.startswith("handle ")]
        assert process.attributes is not None
        assert process.attributes["code.function.name"].endswith("request_payment")
    for parent, child in itertools.pairwise(chain):
        assert child_of(child, parent), f"{child.name} is not a child of {parent.name}"
    assert [s.kind for s in (create, process)] == [SpanKind.PRODUCER, SpanKind.CONSUMER]
    assert create.attributes is not None and process.attributes is not None
    assert create.attributes["messaging.destination.name"] == "orders.OrderPlaced"
    assert create.attributes["messaging.operation.type"] == "create"
    assert create.attributes["messaging.message.id"] == env.id
    assert publish.attributes is not None
    assert publish.attributes["messaging.system"] == "memory"
    assert publish.attributes["messaging.operation.type"] == "send"
    assert process.attributes["messaging.consumer.group.name"] == "billing"
    assert process.attributes["messaging.message.id"] == env.id
    assert process.attributes["messaging.message.conversation_id"] == env.correlation_id
    assert process.attributes["msdata.outcome"] == "ack"

    sent = otel.metric("messaging.client.sent.messages")
    assert sorted(a["messaging.destination.name"] for a, v in sent if v == 1) == [
        "billing.PaymentRequested",
        "orders.OrderPlaced",
    ]
    assert all(a["messaging.operation.name"] == "publish" for a, _ in sent)
    settled = otel.metric("messaging.client.consumed.messages")
    assert all(a["messaging.operation.name"] == "process" for a, _ in settled)
    assert {(a["messaging.consumer.group.name"], a["msdata.outcome"]): v for a, v in settled} == {
        ("billing", "ack"): 1,
        ("shipping", "ack"): 1,
    }
    await orders_store.close()
    await billing_store.close()


async def test_failures_nacks_dead_letters_and_a_failed_publish_are_counted(otel: Otel) -> None:
    transport = MemoryTransport()
    bus = EventBus(transport, registry=registry, max_attempts=2, backoff=lambda n: 0.0)

    @bus.handler(Boom, group="g")
    async def fail(event: Boom) -> None:
        raise ValueError("no")

    async with bus:
        await bus.publish(Boom(n=1))
        await eventually(
            lambda: any(
                a.get("msdata.outcome") == "dead_letter"
                for a, _ in otel.metric("messaging.client.consumed.messages")
            ),
            timeout=10,
            what="the dead letter",
        )
        await eventually(
            lambda: bool(otel.metric("msdata.consumer.dead_letters")),
            timeout=10,
            what="the dead-letter count",
        )
    settled = {a["msdata.outcome"]: v for a, v in otel.metric("messaging.client.consumed.messages")}
    assert settled == {"nack": 1, "dead_letter": 1}
    ((failed_attrs, runs),) = otel.metric("messaging.process.duration")
    assert runs == 2 and failed_attrs["error.type"] == "ValueError"
    ((attrs, value),) = otel.metric("msdata.consumer.dead_letters")
    assert value == 1 and attrs["messaging.consumer.group.name"] == "g"
    failed = [s for s in otel.finished() if s.name == "process test.Boom"]
    assert len(failed) == 2 and all(not s.status.is_ok for s in failed)

    class Down:
        async def publish(self, topic: str, messages: Any) -> None:
            raise ConnectionError("broker down")

    store_path = str(Path(tempfile.mkdtemp()) / "o.db")
    store = SqliteOutboxStore(store_path)
    await store.create_schema()
    with connect(store_path) as conn:
        Outbox(store, registry=registry).add(conn, Boom(n=2))
    relay = OutboxRelay(store, Down(), max_attempts=5)  # type: ignore[arg-type]
    assert await relay.run_once() == 0
    errors = [a for a, _ in otel.metric("messaging.client.sent.messages") if "error.type" in a]
    assert errors == [
        {
            "messaging.operation.name": "publish",  # required by the conventions
            "messaging.system": "msdata",
            "messaging.destination.name": "test.Boom",
            "error.type": "ConnectionError",
        }
    ]
    otel.hooks.watch_outbox(store, "orders")
    await otel.hooks.refresh()
    (pending,) = otel.metric("msdata.outbox.pending")
    assert pending == ({"msdata.outbox.name": "orders"}, 1)
    ((_, age),) = otel.metric("msdata.outbox.oldest_age")
    assert age >= 0
    await store.close()


async def test_projection_lag_is_a_gauge_read_by_refresh(otel: Otel) -> None:
    class Runner:
        def __init__(self) -> None:
            self.calls = 0

        async def lag(self) -> Lag:
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("store down")  # keeps its last figures
            return Lag(3, 1.5)

    otel.hooks.watch_projection(Runner(), "order-totals")
    await otel.hooks.refresh()
    await otel.hooks.refresh()
    assert otel.metric("msdata.projection.lag") == [({"msdata.projection.name": "order-totals"}, 3)]
    assert otel.metric("msdata.projection.lag_age") == [
        ({"msdata.projection.name": "order-totals"}, 1.5)
    ]


async def test_consumer_lag_is_a_gauge_of_what_the_broker_reports(otel: Otel) -> None:
    transport = MemoryTransport()
    await transport.declare_group("orders", "billing")
    await transport.publish("orders", [TransportMessage(str(i), b"{}") for i in range(3)])
    otel.hooks.watch_consumer(transport, "orders", "billing")
    otel.hooks.watch_consumer(transport, "orders", "never-declared")  # None: not reported
    await otel.hooks.refresh()
    attrs = {
        "messaging.system": "memory",
        "messaging.destination.name": "orders",
        "messaging.consumer.group.name": "billing",
    }
    assert otel.metric("msdata.consumer.lag") == [(attrs, 3)]
    async with transport.subscribe("orders", "billing") as sub:
        for d in await sub.receive(10, timeout=1.0):
            await d.ack()
    await otel.hooks.refresh()
    assert otel.metric("msdata.consumer.lag") == [(attrs, 0)]


async def test_a_composition_is_a_span_and_its_parts_calls_nest_under_it(otel: Otel) -> None:
    async def customer(customer_id: str) -> str:
        with otel.tracer.start_as_current_span("GET /customers"):
            return customer_id

    result = await compose(required("customer", customer, "c-1", timeout=5.0), deadline=5.0)
    assert result.complete
    spans = otel.finished()
    span = one(spans, "compose")
    assert span.attributes is not None
    assert list(span.attributes["msdata.composition.parts"]) == ["customer"]
    assert child_of(one(spans, "GET /customers"), span)


async def test_idempotency_claims_replays_and_conflicts_are_counted(otel: Otel) -> None:
    keys = IdempotencyKeys(MemoryIdempotencyStore())

    async def charge() -> int:
        return 7

    assert await keys.run("k1", charge, request={"a": 1}, result_type=int) == 7
    assert await keys.run("k1", charge, request={"a": 1}, result_type=int) == 7
    with pytest.raises(IdempotencyKeyReused):
        await keys.run("k1", charge, request={"a": 2}, result_type=int)
    counts = {
        a["msdata.idempotency.outcome"]: v for a, v in otel.metric("msdata.idempotency.claims")
    }
    assert counts == {"claimed": 1, "replayed": 1, "conflict": 1}
    assert sum(s.name == "idempotency claim" for s in otel.finished()) == 3


async def test_the_audit_trail_reads_the_event_store_and_the_memory_outbox() -> None:
    placed = make_envelope(OrderPlaced(order_id="7"), registry=registry)
    other = make_envelope(OrderPlaced(order_id="8"), registry=registry)
    store = MemoryEventStore()
    log = EventLog(store, registry=registry, source="orders")
    outbox_store = MemoryOutboxStore()
    outbox = Outbox(outbox_store, registry=registry)
    with handling(placed), MemoryTransaction() as tx:
        log.append(tx, "order-7", 0, PaymentRequested(order_id="7"))
        outbox.add(tx, Boom(n=7))
    with handling(other), MemoryTransaction() as tx:
        log.append(tx, "order-8", 0, PaymentRequested(order_id="8"))
    assert placed.correlation_id is not None
    trail = await audit_trail(
        placed.correlation_id, [EventStoreAudit(store), MemoryOutboxAudit(outbox_store)]
    )
    assert [(e.kind, e.type, e.where) for e in trail] == [
        ("event", "billing.PaymentRequested", "event store order-7#1"),
        ("message", "test.Boom", "outbox memory: pending"),
    ]
    assert all(e.causation_id == placed.id for e in trail)


async def test_command_and_query_handlers_get_a_span(otel: Otel) -> None:
    commands = CommandBus()

    @commands.handler(PlaceOrder)
    async def place(cmd: PlaceOrder) -> str:
        return cmd.order_id

    with otel.tracer.start_as_current_span("POST /orders"):
        assert await commands.send(PlaceOrder(order_id="9")) == "9"
    spans = otel.finished()
    handle = [s for s in spans if s.name.startswith("handle ")]
    assert len(handle) == 1 and child_of(handle[0], one(spans, "POST /orders"))
    assert handle[0].attributes is not None
    assert handle[0].attributes["msdata.message.kind"] == "command"


class Order(BaseModel):
    order_id: str
    amount_cents: int


async def test_saga_steps_and_compensations_get_spans_metrics_and_a_trail(
    otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    seen_saga_ids: list[object] = []
    caplog.handler.addFilter(MessageContextFilter())

    def reserve(order: Order) -> None:
        logging.getLogger("msdata.test_telemetry").warning("reserving")
        seen_saga_ids.append(caplog.records[-1].__dict__["saga_id"])

    def release(order: Order) -> None:
        pass

    def charge(order: Order) -> None:
        raise SagaStepFailed("card declined")

    checkout = Saga("checkout", Order).step("reserve", reserve, compensate=release)
    checkout = checkout.pivot("charge", charge)
    store = MemorySagaStore()
    orchestrator = SagaOrchestrator(store, [checkout])
    rec = await orchestrator.run(checkout, Order(order_id="o-1", amount_cents=1))
    assert rec.status is SagaStatus.COMPENSATED
    assert seen_saga_ids == [rec.saga_id]
    spans = otel.finished()
    reserve_span = one(spans, "saga checkout step reserve")
    charge_span = one(spans, "saga checkout step charge")
    release_span = one(spans, "saga checkout compensate reserve")
    assert reserve_span.status.is_ok and not charge_span.status.is_ok
    assert release_span.attributes is not None
    assert release_span.attributes["msdata.saga.id"] == rec.saga_id
    instances = {a["msdata.saga.status"]: v for a, v in otel.metric("msdata.saga.instances")}
    assert instances == {"started": 1, "compensated": 1}
    durations = {
        (a["msdata.saga.step"], a["msdata.saga.compensation"]): n
        for a, n in otel.metric("msdata.saga.step.duration")
    }
    assert durations == {("reserve", False): 1, ("charge", False): 1, ("reserve", True): 1}

    trail = await audit_trail(rec.saga_id, [SagaAudit(store)])
    events = [(e.type, e.detail["event"]) for e in trail]
    assert events[0] == (None, "started") and events[-1] == (None, "compensated")
    assert ("reserve", "compensated") in events and ("charge", "step failed") in events


def test_the_logging_filter_adds_the_ids_of_the_message_being_handled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = make_envelope(OrderPlaced(order_id="1"), registry=registry)
    log = logging.getLogger("msdata.test_telemetry")
    caplog.handler.addFilter(MessageContextFilter())
    with caplog.at_level(logging.INFO, logger="msdata.test_telemetry"):
        log.info("outside")
        with handling(env):
            log.info("inside")
            child = make_envelope(PaymentRequested(order_id="1"), registry=registry)
            with handling(child):
                log.info("nested", extra={"saga_id": "s-1"})
    outside, inside, nested = caplog.records
    assert outside.__dict__["message_id"] is None and outside.__dict__["saga_id"] is None
    assert inside.__dict__["message_id"] == env.id
    assert inside.__dict__["correlation_id"] == env.correlation_id
    assert nested.__dict__["causation_id"] == env.id
    assert nested.__dict__["correlation_id"] == env.correlation_id
    assert nested.__dict__["saga_id"] == "s-1"


TRACE_HEADERS = [
    {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
    {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"},
    {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03"},
    {"traceparent": "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"},
    {"traceparent": " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
    {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 "},
    {"traceparent": "00-00000000000000000000000000000000-00f067aa0ba902b7-01"},
    {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"},
    {"traceparent": "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
    {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e473_-00f067aa0ba902b7-01"},
    {"traceparent": "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz"},
    {"traceparent": "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
    {"traceparent": "garbage"},
    {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "tracestate": "a=1"},
    {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "baggage": "k=v"},
    {"tracestate": "a=1"},
]


@pytest.mark.parametrize("headers", TRACE_HEADERS)
def test_msdata_reads_a_traceparent_as_the_w3c_propagator_does(headers: dict[str, str]) -> None:
    """msdata parses a strict ``traceparent`` itself (the propagator costs ~3 us a message):
    the parent it gives a ``process`` span, and the baggage, are the propagator's."""
    from opentelemetry import baggage
    from opentelemetry.context import Context
    from opentelemetry.propagate import get_global_textmap

    hooks = OpenTelemetry(tracer_provider=TracerProvider(), meter_provider=MeterProvider())
    assert hooks._w3c  # the API's default propagator: the fast path is taken where it can be
    ours = hooks._extract(headers)
    theirs = get_global_textmap().extract(headers) if "traceparent" in headers else None
    if ours is None or theirs is None:
        assert ours is theirs
        return
    ctx = trace.get_current_span(ours).get_span_context()
    assert ctx == trace.get_current_span(theirs).get_span_context()
    assert ctx.trace_state == trace.get_current_span(theirs).get_span_context().trace_state
    assert dict(baggage.get_all(ours)) == dict(baggage.get_all(theirs))
    assert isinstance(ours, Context) and len(ours) == len(theirs)


def test_the_strict_traceparents_take_the_fast_path() -> None:
    """The cases above compare something: the first three are parsed by msdata."""
    from msdata.adapters.opentelemetry.tracing import _remote_parent

    taken = [_remote_parent(h.get("traceparent", "")) is not None for h in TRACE_HEADERS]
    assert taken == [True, True, True] + [False] * 10 + [True, True, False]


def test_msdata_writes_a_traceparent_as_the_w3c_propagator_does() -> None:
    from opentelemetry import baggage
    from opentelemetry import context as otel_context
    from opentelemetry.propagate import get_global_textmap
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

    hooks = OpenTelemetry(tracer_provider=TracerProvider(), meter_provider=MeterProvider())
    spans = [
        NonRecordingSpan(SpanContext(0x4BF9, 0xF067, False, TraceFlags(1))),
        NonRecordingSpan(SpanContext(0x4BF9, 0xF067, False, TraceFlags(0))),
        NonRecordingSpan(SpanContext(2**128 - 1, 2**64 - 1, False, TraceFlags(1))),
        NonRecordingSpan(
            SpanContext(0x4BF9, 0xF067, False, TraceFlags(1), TraceState([("a", "1")]))
        ),
        trace.INVALID_SPAN,
    ]
    for with_baggage in (False, True):
        token = otel_context.attach(baggage.set_baggage("k", "v")) if with_baggage else None
        try:
            for span in spans:
                ours: dict[str, str] = {"x": "1"}
                hooks._inject(ours, span)  # type: ignore[arg-type]
                theirs = {"x": "1"}
                get_global_textmap().inject(theirs, trace.set_span_in_context(span))
                assert ours == theirs
        finally:
            if token is not None:
                otel_context.detach(token)


def test_another_propagator_writes_and_reads_the_headers() -> None:
    """msdata reads and writes ``traceparent`` itself only for the W3C propagator."""
    from opentelemetry.propagate import get_global_textmap, set_global_textmap
    from opentelemetry.propagators.textmap import TextMapPropagator, default_getter, default_setter

    class Mine(TextMapPropagator):
        def inject(self, carrier: Any, context: Any = None, setter: Any = default_setter) -> None:
            ctx = trace.get_current_span(context).get_span_context()
            setter.set(carrier, "mine", f"{ctx.trace_id:x}:{ctx.span_id:x}")

        def extract(self, carrier: Any, context: Any = None, getter: Any = default_getter) -> Any:
            trace_id, span_id = getter.get(carrier, "mine")[0].split(":")
            parent = trace.SpanContext(int(trace_id, 16), int(span_id, 16), True)
            return trace.set_span_in_context(trace.NonRecordingSpan(parent))

        @property
        def fields(self) -> set[str]:
            return {"mine"}

    previous = get_global_textmap()
    set_global_textmap(Mine())
    try:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        hooks = OpenTelemetry(tracer_provider=provider, meter_provider=MeterProvider())
    finally:
        set_global_textmap(previous)
    assert not hooks._w3c
    env = hooks.message_created("t", make_envelope(Boom(n=1), registry=registry), outbox=True)
    assert "mine" in env.headers and "traceparent" not in env.headers
    (create,) = exporter.get_finished_spans()
    assert create.context is not None
    assert env.headers["mine"] == f"{create.context.trace_id:x}:{create.context.span_id:x}"
    parent = hooks._extract(env.headers)  # no traceparent: read by the propagator
    assert parent is not None
    assert trace.get_current_span(parent).get_span_context().span_id == create.context.span_id


def test_the_relay_makes_its_links_span_contexts_as_the_constructor_does() -> None:
    """The relay makes the span context of a link as the tuple ``SpanContext.__new__``
    builds (one frame less per row), checked against the API installed."""
    from msdata.adapters.opentelemetry.tracing import _DIRECT, _span_context

    assert _DIRECT  # the installed API's layout: the direct path is the one tested
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    made = _span_context(tp)
    ref = trace.SpanContext(
        0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, True, trace.TraceFlags(1)
    )
    assert made == ref and made is not None and made.is_valid
    assert made.trace_state == ref.trace_state and made.trace_flags == ref.trace_flags
    for bad in (
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00--0000000000000000000000000000001-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
    ):
        assert _span_context(bad) is None, bad


async def test_batch_process_spans_link_each_message_and_keep_the_orders_trace(
    otel: Otel,
) -> None:
    """``process_spans="batch"``: one ``process`` span per batch the consumer received,
    linked to each message's creation context (its ``publish`` span); each handler runs in
    its message's creation context, so the message it creates (an outbox ``create`` span)
    is in the order's trace; outcomes are counted per message, a failure marks its batch,
    and the duration is recorded once per batch."""
    from msdata.errors import RejectMessage

    otel.hooks.process_spans = "batch"
    transport = MemoryTransport()
    bus = EventBus(transport, registry=registry, prefetch=100)
    store = MemoryOutboxStore()
    outbox = Outbox(store, registry=registry)
    done: list[str] = []

    @bus.handler(OrderPlaced, group="billing")
    async def bill(event: OrderPlaced) -> None:
        done.append(event.order_id)
        if event.order_id == "bad":
            raise RejectMessage("no such order")
        with MemoryTransaction() as tx:
            outbox.add(tx, PaymentRequested(order_id=event.order_id))

    ids = [str(i) for i in range(20)] + ["bad"]
    async with bus:
        sent = await bus.publish_many(OrderPlaced(order_id=i) for i in ids)
        await eventually(lambda: len(done) == len(ids), timeout=10, what="every order")
    spans = otel.finished()
    publishes = {s.context.span_id: s for s in spans if s.name == "publish orders.OrderPlaced"}
    assert len(publishes) == len(ids)
    batches = [s for s in spans if s.name == "process orders.OrderPlaced"]
    assert batches and all(s.kind is SpanKind.CONSUMER for s in batches)
    linked = [link.context.span_id for s in batches for link in s.links]
    assert sorted(linked) == sorted(publishes)  # each message linked once
    counts = [s.attributes["messaging.batch.message_count"] for s in batches]  # type: ignore[index]
    assert sum(counts) == len(ids)
    failed = [s for s in batches if not s.status.is_ok]
    assert len(failed) == 1 and failed[0].events[0].name == "exception"
    creates = [s for s in spans if s.name == "create billing.PaymentRequested"]
    assert len(creates) == len(ids) - 1
    for create in creates:  # in the order's trace: a child of its message's creation context
        assert create.parent is not None and create.parent.span_id in publishes
        assert create.context.trace_id == publishes[create.parent.span_id].context.trace_id  # type: ignore[union-attr]
    by_id = {e.id: e for e in sent}
    assert {p.attributes["messaging.message.id"] for p in publishes.values()} == set(by_id)  # type: ignore[index]
    settled = {a["msdata.outcome"]: v for a, v in otel.metric("messaging.client.consumed.messages")}
    assert settled == {"ack": len(ids) - 1, "dead_letter": 1}
    recorded = otel.metric("messaging.process.duration")
    assert sum(n for _, n in recorded) == len(batches)
    assert [a["error.type"] for a, _ in recorded if "error.type" in a] == ["RejectMessage"]


async def test_a_batch_process_span_follows_its_sampled_orders() -> None:
    """``process_spans="batch"`` under ``ParentBased`` sampling (docs/observability.md,
    "Sampling": an order's trace is recorded whole or not at all): the batch's span is a
    child of its first sampled message's creation context, so it is recorded, in that
    order's trace, whenever it holds a sampled order, and every sampled order is linked
    from a recorded batch span; a root ``process`` span would be sampled on its own (here
    never: the root sampler is ALWAYS_OFF)."""
    o = Otel(ParentBased(ALWAYS_OFF))
    o.hooks.process_spans = "batch"
    previous = telemetry.install(o.hooks)
    try:
        bus = EventBus(MemoryTransport(), registry=registry, prefetch=100)
        done: list[str] = []

        @bus.handler(OrderPlaced, group="billing")
        async def bill(event: OrderPlaced) -> None:
            done.append(event.order_id)

        async with bus:
            for i in range(12):  # orders sampled upstream (even) or not (odd)
                flags = trace.TraceFlags(trace.TraceFlags.SAMPLED if i % 2 == 0 else 0)
                ctx = trace.SpanContext(0xABC0 + i, 0xDEF0 + i, True, flags)
                with trace.use_span(trace.NonRecordingSpan(ctx)):
                    await bus.publish(OrderPlaced(order_id=str(i)))
            await eventually(lambda: len(done) == 12, timeout=10, what="every order")
    finally:
        telemetry.install(previous)
    spans = o.finished()
    publishes = {s.context.span_id: s for s in spans if s.name == "publish orders.OrderPlaced"}
    assert {s.context.trace_id for s in publishes.values()} == {0xABC0 + i for i in range(0, 12, 2)}
    batches = [s for s in spans if s.name == "process orders.OrderPlaced"]
    assert batches
    for batch in batches:  # in a sampled order's trace, under its creation context
        assert batch.parent is not None and batch.parent.span_id in publishes
        assert batch.context.trace_id == publishes[batch.parent.span_id].context.trace_id
    linked = sorted(link.context.span_id for s in batches for link in s.links)
    assert linked == sorted(publishes)


@pytest.mark.parametrize("option", ["relay_spans", "process_spans"])
@pytest.mark.parametrize("value", ["Batch", "batches", None, True])
def test_an_unknown_span_mode_is_refused(option: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=f"{option}=.*'message' or 'batch'"):
        OpenTelemetry(**{option: value})  # type: ignore[arg-type]
