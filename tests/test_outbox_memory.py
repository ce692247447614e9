from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from msdata.adapters.memory import (
    MemoryInboxStore,
    MemoryOutboxStore,
    MemoryTransaction,
    MemoryTransport,
)
from msdata.clock import SYSTEM_CLOCK, Clock
from msdata.outbox import InboxStore, OutboxRow, OutboxStore
from msdata.testing.conformance.inbox import InboxStoreConformance
from msdata.testing.conformance.outbox import OutboxStoreConformance, OutboxStoreHooks
from msdata.testing.conformance.relay import OutboxRelayConformance


class MemoryHooks:
    async def begin(self, store: Any) -> MemoryTransaction:
        return store.begin()  # type: ignore[no-any-return]

    async def commit(self, tx: MemoryTransaction) -> None:
        tx.commit()

    async def rollback(self, tx: MemoryTransaction) -> None:
        tx.rollback()


class MemoryOutboxHooks(MemoryHooks, OutboxStoreHooks):
    lease_seconds = 0.2

    @asynccontextmanager
    async def make_store(self, *, clock: Clock = SYSTEM_CLOCK) -> AsyncIterator[OutboxStore]:
        store = MemoryOutboxStore(clock=clock)
        try:
            yield store
        finally:
            await store.close()

    async def add(self, store: Any, tx: Any, rows: Sequence[OutboxRow]) -> None:
        store.append(tx, rows)


class TestMemoryOutboxStore(MemoryOutboxHooks, OutboxStoreConformance):
    def store_url(self) -> str:
        return "memory://"

    pass


class TestMemoryOutboxRelay(MemoryOutboxHooks, OutboxRelayConformance):
    pass


class TestMemoryInboxStore(MemoryHooks, InboxStoreConformance):
    @asynccontextmanager
    async def make_inbox_store(self, *, clock: Clock = SYSTEM_CLOCK) -> AsyncIterator[InboxStore]:
        yield MemoryInboxStore(clock=clock)

    async def record(self, store: Any, tx: Any, consumer: str, message_id: str) -> bool:
        return store.record(tx, consumer, message_id)  # type: ignore[no-any-return]


# -- the Outbox writer, the Inbox API and middleware, end to end with the event bus -------------

import asyncio  # noqa: E402
from contextlib import asynccontextmanager as _acm  # noqa: E402
from datetime import timedelta  # noqa: E402

import pytest  # noqa: E402

from msdata import telemetry  # noqa: E402
from msdata.errors import ConfigurationError, RegistrationError  # noqa: E402
from msdata.messages import Event, MessageRegistry, handling, message_type  # noqa: E402
from msdata.outbox import Inbox, Outbox, OutboxRelay, current_connection  # noqa: E402
from msdata.serialization import CloudEventsCodec  # noqa: E402
from msdata.telemetry import Telemetry  # noqa: E402
from msdata.testing import FakeClock, eventually  # noqa: E402
from msdata.testing.conformance.outbox import make_row  # noqa: E402
from msdata.testing.conformance.relay import RecordingPublisher  # noqa: E402
from msdata.transport import TransportMessage  # noqa: E402

registry = MessageRegistry()


@message_type("test.outbox.OrderPlaced", registry=registry)
class OrderPlaced(Event):
    order_id: str


@message_type("test.outbox.OrderShipped", registry=registry)
class OrderShipped(Event):
    order_id: str


class Unregistered(Event):
    x: int


async def test_outbox_add_writes_envelopes_in_the_transaction() -> None:
    store = MemoryOutboxStore()
    outbox = Outbox(store, registry=registry, source="orders")
    codec = CloudEventsCodec(registry)
    tx = store.begin()
    envs = outbox.add(tx, [OrderPlaced(order_id="1"), OrderShipped(order_id="1")], key="1")
    assert (await store.status()).pending == 0
    tx.commit()
    got = await store.claim("r", 10, 30.0)
    assert [r.message_id for r in got] == [e.id for e in envs]
    assert [r.topic for r in got] == ["test.outbox.OrderPlaced", "test.outbox.OrderShipped"]
    assert all(r.partition_key == "1" for r in got)
    decoded = codec.decode(got[0].payload)
    assert decoded.message == OrderPlaced(order_id="1")
    assert decoded.source == "orders" and decoded.partition_key == "1"


async def test_outbox_options_topic_headers_envelope_and_causation() -> None:
    store = MemoryOutboxStore()
    outbox = Outbox(store, registry=registry)
    parent = outbox.envelope(OrderPlaced(order_id="p"))
    tx = store.begin()
    with handling(parent):
        (child,) = outbox.add(
            tx, OrderShipped(order_id="c"), topic="shipping", headers={"tenant": "acme"}
        )
    (same,) = outbox.add(tx, parent, key="k")
    await outbox.add_async(tx, OrderPlaced(order_id="a"))
    tx.commit()
    assert child.causation_id == parent.id and child.correlation_id == parent.correlation_id
    assert same.id == parent.id and same.partition_key == "k"
    rows = await store.claim("r", 10, 30.0)
    assert [r.topic for r in rows] == [
        "shipping",
        "test.outbox.OrderPlaced",
        "test.outbox.OrderPlaced",
    ]
    assert dict(rows[0].headers) == {"tenant": "acme"}


async def test_outbox_refuses_bad_input_before_writing() -> None:
    store = MemoryOutboxStore()
    outbox = Outbox(store, registry=registry)
    tx = store.begin()
    with pytest.raises(ConfigurationError):
        outbox.add(tx, OrderPlaced(order_id="1"), topic="bad topic!")
    with pytest.raises(RegistrationError):
        outbox.add(tx, Unregistered(x=1))
    with pytest.raises(ConfigurationError):
        outbox.add(object(), OrderPlaced(order_id="1"))
    tx.commit()
    assert (await store.status()).pending == 0


async def test_outbox_later_adds_of_a_known_class_keep_every_rule() -> None:
    # the first add of a class goes through make_envelope; later ones build the envelope
    # directly: key, headers, topic, causation, the source check, an overridden
    # ``envelope`` and the telemetry hook must hold on those too
    store = MemoryOutboxStore()
    outbox = Outbox(store, registry=registry, source="orders")
    parent = outbox.envelope(OrderShipped(order_id="p"))
    tx = store.begin()
    outbox.add(tx, OrderPlaced(order_id="1"))
    with handling(parent):
        (second,) = outbox.add(
            tx, OrderPlaced(order_id="2"), key="k2", headers={"tenant": "acme"}, topic="orders2"
        )
        (third,) = await outbox.add_async(tx, OrderPlaced(order_id="3"), aggregate_type="Order")
    both = outbox.add(tx, [OrderPlaced(order_id="4"), OrderShipped(order_id="4")], key="k4")
    tx.commit()
    assert second.causation_id == parent.id and second.correlation_id == parent.correlation_id
    assert second.partition_key == "k2" and dict(second.headers) == {"tenant": "acme"}
    assert second.source == "orders" and third.causation_id == parent.id
    rows = await store.claim("r", 10, 30.0)
    assert [r.topic for r in rows] == [
        "test.outbox.OrderPlaced",
        "orders2",
        "test.outbox.OrderPlaced",
        "test.outbox.OrderPlaced",
        "test.outbox.OrderShipped",
    ]
    assert [r.message_id for r in rows[1:]] == [second.id, third.id, *(e.id for e in both)]
    assert dict(rows[1].headers) == {"tenant": "acme"} and rows[1].partition_key == "k2"
    codec = CloudEventsCodec(registry)
    decoded = codec.decode(rows[1].payload)
    assert decoded.message == OrderPlaced(order_id="2") and decoded.causation_id == parent.id
    assert decoded.headers == {"tenant": "acme"}

    outbox.source = ""  # make_envelope refuses an empty source, on every add
    with pytest.raises(ConfigurationError):
        outbox.add(store.begin(), OrderPlaced(order_id="5"))

    class Stamped(Outbox):
        def envelope(self, message: Any, *, key: Any = None, headers: Any = None) -> Any:
            return super().envelope(message, key="stamped", headers=headers)

    stamped = Stamped(store, registry=registry)
    tx = store.begin()
    got = [stamped.add(tx, OrderPlaced(order_id=str(i)))[0] for i in range(2)]
    tx.rollback()
    assert [e.partition_key for e in got] == ["stamped", "stamped"]

    class Tracing(Telemetry):
        def message_created(self, topic: str, envelope: Any, *, outbox: bool) -> Any:
            return envelope._replace(headers={"traceparent": f"t-{topic}"})

    previous = telemetry.install(Tracing())
    try:
        tx = store.begin()
        fresh = Outbox(store, registry=registry)
        traced = [fresh.add(tx, OrderPlaced(order_id=str(i)), topic="t")[0] for i in range(2)]
        tx.commit()
    finally:
        telemetry.install(previous)
    rows = await store.claim("r2", 10, 30.0)
    assert [r.message_id for r in rows] == [e.id for e in traced]
    assert [dict(r.headers) for r in rows] == [{"traceparent": "t-t"}] * 2
    assert [dict(e.headers) for e in traced] == [{"traceparent": "t-t"}] * 2


@pytest.mark.parametrize("check", ["structure", "json", "decode"])
async def test_payload_checks_park_what_they_catch(check: str) -> None:
    store = MemoryOutboxStore()
    pub = RecordingPublisher()
    outbox = Outbox(store, registry=registry)
    relay = OutboxRelay(store, pub, check=check, codec=CloudEventsCodec(registry))  # type: ignore[arg-type]
    tx = store.begin()
    outbox.add(tx, OrderPlaced(order_id="ok"))
    store.append(tx, [make_row(payload=b"[1, 2]")])  # JSON, but no CloudEvent
    store.append(tx, [make_row(payload=b'{"specversion":"1.0","id":"x","type":"t"')])  # cut short
    unknown = make_row()  # a valid CloudEvent of a type this registry does not know
    store.append(tx, [unknown])
    tx.commit()
    await relay.run_once()
    parked = await relay.parked()
    published = {m.id for _, m in pub.published}
    assert len(published) == (1 if check == "decode" else 2)
    assert len(parked) == (3 if check == "decode" else 2)
    assert all("bad payload" in (p.last_error or "") for p in parked)


def test_relay_options_are_checked() -> None:
    store, pub = MemoryOutboxStore(), RecordingPublisher()
    for bad in ({"batch_size": 0}, {"max_attempts": 0}, {"lease_seconds": 0}, {"check": "full"}):
        with pytest.raises(ConfigurationError):
            OutboxRelay(store, pub, **bad)  # type: ignore[arg-type]


async def test_inbox_plain_api_applies_once() -> None:
    inbox_store = MemoryInboxStore()
    inbox = Inbox(inbox_store)
    applied: list[str] = []
    for _ in range(3):
        with inbox_store.begin() as tx:
            if inbox.first_time(tx, "billing", "m-1"):
                tx.on_commit(lambda: applied.append("m-1"))
    assert applied == ["m-1"]
    tx = inbox_store.begin()
    assert await inbox.first_time_async(tx, "billing", "m-2")
    tx.rollback()
    with inbox_store.begin() as tx:
        assert await inbox.first_time_async(tx, "billing", "m-2")
    assert await inbox.purge(timedelta(seconds=-5)) == 2


async def test_inbox_middleware_sync_and_async_transactions() -> None:
    inbox_store = MemoryInboxStore()
    inbox = Inbox(inbox_store)
    applied: list[str] = []

    @_acm
    async def async_tx() -> Any:
        with inbox_store.begin() as tx:
            yield tx

    for factory in (inbox_store.begin, async_tx):
        mw = inbox.middleware("billing", factory)
        env = Outbox(MemoryOutboxStore(), registry=registry).envelope(OrderPlaced(order_id="1"))

        async def handler(e: Any) -> str:
            conn = inbox.connection()
            assert current_connection() is conn
            conn.on_commit(lambda: applied.append(e.id))
            return "done"

        assert await mw(env, handler) == "done"
        assert await mw(env, handler) is None

        async def failing(e: Any) -> None:
            inbox.connection().on_commit(lambda: applied.append("never"))
            raise RuntimeError("boom")

        other = Outbox(MemoryOutboxStore(), registry=registry).envelope(OrderPlaced(order_id="2"))
        with pytest.raises(RuntimeError):
            await mw(other, failing)
        assert await mw(other, handler) == "done"  # the failed attempt left no record
    assert len(applied) == 4 and "never" not in applied
    with pytest.raises(ConfigurationError):
        current_connection()
    with pytest.raises(ConfigurationError):
        inbox.middleware("", inbox_store.begin)


async def test_outbox_relay_bus_and_inbox_end_to_end_apply_each_event_once() -> None:
    bus_mod = pytest.importorskip("msdata.events")
    clock = FakeClock()
    store, inbox_store = MemoryOutboxStore(clock=clock), MemoryInboxStore()
    outbox, inbox = Outbox(store, registry=registry), Inbox(inbox_store)
    transport = MemoryTransport()
    bus = bus_mod.EventBus(transport, registry=registry)
    applied: list[str] = []

    @bus.handler(
        OrderPlaced, group="billing", middleware=[inbox.middleware("billing", inbox_store.begin)]
    )
    async def bill(event: OrderPlaced) -> None:
        inbox.connection().on_commit(lambda: applied.append(event.order_id))

    async with bus:
        with store.begin() as tx:
            outbox.add(tx, [OrderPlaced(order_id=str(i)) for i in range(5)], key="k")
        # a relay that published and died before marking: published again after its lease
        claimed = await store.claim("dead", 100, 0.1)
        await transport.publish(
            "test.outbox.OrderPlaced",
            [TransportMessage(r.message_id, r.payload, r.partition_key) for r in claimed],
        )
        clock.advance(0.2)  # the dead relay's lease runs out
        async with OutboxRelay(store, transport, poll_interval=0.02):

            async def all_applied_and_sent() -> bool:
                return len(applied) >= 5 and (await store.status()).pending == 0

            await eventually(all_applied_and_sent, 10.0)
        await asyncio.sleep(0.05)  # time for a wrongly applied duplicate to show
    assert sorted(applied) == [str(i) for i in range(5)]


# -- the relay's fast path asks the codec ------------------------------------------------------

TRACEPARENT = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}


def test_the_codec_recognises_its_own_events_with_and_without_headers() -> None:
    from msdata.messages import make_envelope

    codec = CloudEventsCodec(registry)
    for headers in (None, TRACEPARENT, {"tenant": '"specversion":"1.0"'}):
        body = codec.encode(
            make_envelope(OrderPlaced(order_id="1"), registry=registry, headers=headers)
        )
        assert codec.looks_like_own_event(body), body
    for body in (
        b"",
        b"garbage",
        b'{"id":"1","type":"x"}',  # no specversion
        b'{"specversion":"1.0","id":"1"',  # cut short
        b'{"tenant":"\\"specversion\\":\\"1.0\\""}',  # only inside a header's value
        b'["specversion":"1.0"]',
    ):
        assert not codec.looks_like_own_event(body), body


async def test_a_batch_of_events_with_headers_takes_the_fast_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = MemoryOutboxStore()
    outbox = Outbox(store, registry=registry)
    pub = RecordingPublisher()
    relay = OutboxRelay(store, pub)
    with store.begin() as tx:
        outbox.add(tx, OrderPlaced(order_id="first"))
    assert await relay.run_once() == 1  # the topic's name is checked once, the slow way
    pub.published.clear()
    with store.begin() as tx:
        envs = outbox.add(
            tx, [OrderPlaced(order_id=str(i)) for i in range(20)], key="k", headers=TRACEPARENT
        )

    def slow_path(*args: object) -> None:
        raise AssertionError("a batch of the codec's own events went down the slow path")

    monkeypatch.setattr(relay, "_sort", slow_path)
    assert await relay.run_once() == 20
    assert pub.ids == [e.id for e in envs]
    assert all(m.headers.get("traceparent") == TRACEPARENT["traceparent"] for _, m in pub.published)


from msdata.adapters.memory.audit import MemoryOutboxAudit  # noqa: E402
from msdata.testing.conformance.audit import OutboxAuditConformance  # noqa: E402


class TestMemoryOutboxAudit(MemoryOutboxHooks, OutboxAuditConformance):
    def make_audit(self, store: Any, name: str) -> MemoryOutboxAudit:
        return MemoryOutboxAudit(store, name=name)


def test_memory_url_takes_and_ignores_the_postgres_outbox_options() -> None:
    """A service's outbox URL switched to memory:// keeps its PostgreSQL options."""
    from msdata.urls import store_from_url

    store = store_from_url(
        "outbox", "memory://", notify=False, partitioned=True, relay_synchronous_commit=True
    )
    assert isinstance(store, MemoryOutboxStore)
    with pytest.raises(ConfigurationError, match="nonsense"):
        store_from_url("outbox", "memory://", nonsense=1)
