"""The transport conformance suite on RabbitMQ, in both modes, plus RabbitMQ-specific tests."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest

from msdata.adapters.rabbitmq import RabbitMQTransport
from msdata.adapters.rabbitmq import transport as rabbitmq_transport_module
from msdata.adapters.rabbitmq.transport import (
    KEY_HEADER,
    RETRY_TIERS,
    _differing_argument,
    _Entry,
    group_queue_name,
)
from msdata.errors import ConfigurationError, PublishError, TransportClosed
from msdata.service import read_dead_letters
from msdata.testing.conformance.transport import (
    TransportConformance,
    _SilentServer,
    collect,
    make_messages,
    publish_eventually,
)
from msdata.testing.waiting import eventually
from msdata.transport import DEAD_LETTER_REASON, Transport, TransportMessage, dead_letter_topic
from services import require
from transport_factories import with_test_hooks

pytestmark = pytest.mark.rabbitmq


async def _delete(conn: aio_pika.abc.AbstractConnection, transport: RabbitMQTransport) -> None:
    """Delete every exchange and queue the transport declared (each test's names are unique)."""
    exchanges, queues = transport.declared
    channel = await conn.channel()
    try:
        for name in sorted(queues):
            await channel.queue_delete(name)
        for name in sorted(exchanges):
            await channel.exchange_delete(name)
    finally:
        await channel.close()


@asynccontextmanager
async def rabbitmq_transport(
    *,
    ordered_per_key: bool = False,
    queue_type: str = "classic",
    namespace: str | None = None,
    **options: Any,
) -> AsyncIterator[RabbitMQTransport]:
    conn = await aio_pika.connect_robust(require("rabbitmq"))
    try:
        transport = RabbitMQTransport(
            conn,
            ordered_per_key=ordered_per_key,
            queue_type=queue_type,
            namespace=namespace,
            **options,
        )
    except BaseException:
        await conn.close()
        raise
    with_test_hooks("rabbitmq", transport)
    try:
        yield transport
    finally:
        await transport.close()
        try:
            await _delete(conn, transport)
        finally:
            await conn.close()


class _Unreachable(TransportConformance):
    #: the constructor options of the class's transports
    options: dict[str, Any] = {}

    @asynccontextmanager
    async def make_unreachable_transport(
        self, host: str, port: int, timeout: float
    ) -> AsyncIterator[Transport]:
        url = f"amqp://msdata:{self.unreachable_password}@{host}:{port}/"
        t = RabbitMQTransport.from_url(url, publish_timeout=timeout, connect_timeout=timeout)
        try:
            yield t
        finally:
            await t.close()

    def transport_url(self) -> str:
        return require("rabbitmq")

    def broker_address(self) -> tuple[str, int]:
        url = urlsplit(require("rabbitmq"))
        return url.hostname or "127.0.0.1", url.port or 5672

    @asynccontextmanager
    async def make_transport_at(  # type: ignore[override]
        self, host: str, port: int, timeout: float
    ) -> AsyncIterator[Transport]:
        broker = urlsplit(require("rabbitmq"))
        auth = broker.netloc.rpartition("@")[0]
        url = urlunsplit(
            broker._replace(netloc=f"{auth}@{host}:{port}" if auth else f"{host}:{port}")
        )
        t = RabbitMQTransport.from_url(
            url,
            namespace=f"t{uuid.uuid4().hex[:10]}",
            publish_timeout=timeout,
            connect_timeout=timeout,
            **self.options,
        )
        try:
            yield t
        finally:
            await t.close()
            conn = await aio_pika.connect(require("rabbitmq"))
            try:
                await _delete(conn, t)
            finally:
                await conn.close()


class TestRabbitMQTransport(_Unreachable):
    arrival_timeout = 10.0
    quiet_period = 0.3

    @asynccontextmanager
    async def make_transport(self) -> AsyncIterator[Transport]:
        async with rabbitmq_transport() as t:
            yield t

    @asynccontextmanager
    async def make_transport_with(self, **options: Any) -> AsyncIterator[Transport]:
        async with rabbitmq_transport(**options) as t:
            yield t

    @asynccontextmanager
    async def make_transport_in(self, namespace: str) -> AsyncIterator[Transport]:
        async with rabbitmq_transport(namespace=namespace) as t:
            yield t


class TestRabbitMQTransportOrdered(_Unreachable):
    options = {"ordered_per_key": True}
    arrival_timeout = 10.0
    quiet_period = 0.3

    @asynccontextmanager
    async def make_transport(self) -> AsyncIterator[Transport]:
        async with rabbitmq_transport(ordered_per_key=True) as t:
            yield t

    @asynccontextmanager
    async def make_transport_with(self, **options: Any) -> AsyncIterator[Transport]:
        async with rabbitmq_transport(ordered_per_key=True, **options) as t:
            yield t

    @asynccontextmanager
    async def make_transport_in(self, namespace: str) -> AsyncIterator[Transport]:
        async with rabbitmq_transport(ordered_per_key=True, namespace=namespace) as t:
            yield t


class TestRabbitMQTransportQuorum(_Unreachable):
    options = {"queue_type": "quorum"}
    arrival_timeout = 10.0
    quiet_period = 0.3

    @asynccontextmanager
    async def make_transport(self) -> AsyncIterator[Transport]:
        async with rabbitmq_transport(queue_type="quorum") as t:
            yield t

    @asynccontextmanager
    async def make_transport_with(self, **options: Any) -> AsyncIterator[Transport]:
        async with rabbitmq_transport(queue_type="quorum", **options) as t:
            yield t

    @asynccontextmanager
    async def make_transport_in(self, namespace: str) -> AsyncIterator[Transport]:
        async with rabbitmq_transport(queue_type="quorum", namespace=namespace) as t:
            yield t


class TestRabbitMQTransportQuorumOrdered(_Unreachable):
    options = {"queue_type": "quorum", "ordered_per_key": True}
    """Quorum queues in ordered mode: single active consumer on a quorum queue, which gives
    back and counts deliveries its own way (``x-delivery-count``, no channel-wide qos)."""

    arrival_timeout = 10.0
    quiet_period = 0.3

    @asynccontextmanager
    async def make_transport(self) -> AsyncIterator[Transport]:
        async with rabbitmq_transport(queue_type="quorum", ordered_per_key=True) as t:
            yield t

    @asynccontextmanager
    async def make_transport_with(self, **options: Any) -> AsyncIterator[Transport]:
        async with rabbitmq_transport(queue_type="quorum", ordered_per_key=True, **options) as t:
            yield t

    @asynccontextmanager
    async def make_transport_in(self, namespace: str) -> AsyncIterator[Transport]:
        async with rabbitmq_transport(
            queue_type="quorum", ordered_per_key=True, namespace=namespace
        ) as t:
            yield t


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def test_features_follow_the_mode() -> None:
    async with rabbitmq_transport() as t, rabbitmq_transport(ordered_per_key=True) as o:
        assert t.features.ordered_per_key is False and t.features.durable
        assert o.features.ordered_per_key is True and o.features.durable


async def test_topology_is_durable_and_messages_persistent() -> None:
    topic, group = unique("topic"), unique("group")
    async with rabbitmq_transport() as t:
        async with t.subscribe(topic, group) as sub:
            await t.publish(topic, make_messages(1))
            (d,) = await collect(sub, 1, ack=False)
            # the broker's view of what was delivered: persistent, id in message_id
            props = d._entry.raw.header.properties  # type: ignore[attr-defined]
            assert props.delivery_mode == 2
            assert props.message_id == d.message.id
            await d.ack()
        channel = await t._connection.channel()  # type: ignore[union-attr]
        try:
            # passive declares fail if absent; redeclaring with durable=False would fail too
            queue = await channel.declare_queue(group_queue_name(topic, group), passive=True)
            assert queue.declaration_result.message_count == 0
            await channel.get_exchange(topic, ensure=True)
            await channel.get_exchange(dead_letter_topic(topic, group), ensure=True)
            with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
                await channel.declare_queue(group_queue_name(topic, group), durable=False)
        finally:
            if not channel.is_closed:
                await channel.close()


async def test_foreign_messages_are_delivered_and_can_be_dead_lettered() -> None:
    topic, group = unique("topic"), unique("group")
    async with (
        rabbitmq_transport() as t,
        t.subscribe(topic, group) as sub,
        t.subscribe(dead_letter_topic(topic, group), unique("ops")) as dlq,
    ):
        conn = t._connection
        assert conn is not None
        channel = await conn.channel()
        exchange = await channel.get_exchange(topic)
        # no message id, no msdata headers, headers of every AMQP type, not JSON
        await exchange.publish(aio_pika.Message(b"\x00\xffgarbage"), routing_key="x")
        await exchange.publish(
            aio_pika.Message(
                b"{not json",
                headers={
                    "n": 7,
                    "raw": bytearray("été".encode()),
                    "nested": {"a": [1, 2]},
                    "flag": True,
                    KEY_HEADER: 42,
                },
                message_id="foreign-1",
            ),
            routing_key="",
        )
        await channel.close()
        got = await collect(sub, 2, ack=False)
        assert len(got) == 2
        by_body = {d.message.body: d for d in got}
        plain = by_body[b"\x00\xffgarbage"]
        assert plain.message.id  # aiormq always sets one; without it, see the test below
        assert plain.message.key is None and plain.attempt == 1
        odd = by_body[b"{not json"]
        assert odd.message.id == "foreign-1"
        assert odd.message.key == "42"
        assert odd.message.headers["n"] == "7"
        assert odd.message.headers["raw"] == "été"
        assert all(isinstance(v, str) for v in odd.message.headers.values())
        for d in got:
            await d.dead_letter("MalformedMessage: not a CloudEvent")
        dead = await collect(dlq, 2)
        assert sorted(d.message.body for d in dead) == [b"\x00\xffgarbage", b"{not json"]
        assert all(d.message.headers[DEAD_LETTER_REASON].startswith("Malformed") for d in dead)
        # the consumer goes on
        await t.publish(topic, make_messages(1))
        assert len(await collect(sub, 1)) == 1


def test_a_message_without_id_gets_one_from_its_body() -> None:
    props = SimpleNamespace(message_id=None, headers={"x-delivery-count": 2, "h": 1})
    raw = SimpleNamespace(
        header=SimpleNamespace(properties=props),
        body=b"x",
        redelivered=True,
        exchange="topic",
    )
    entry = _Entry(raw)  # type: ignore[arg-type]
    m = entry.parse(counts_deliveries=True)
    assert m.id == "sha256:" + hashlib.sha256(b"x").hexdigest()
    assert dict(m.headers) == {"h": "1"}
    assert entry.attempt == 3


async def test_nack_with_delay_uses_a_retry_queue_and_counts_attempts() -> None:
    topic, group = unique("topic"), unique("group")
    async with rabbitmq_transport() as t, t.subscribe(topic, group, max_attempts=3) as sub:
        (msg,) = make_messages(1)
        await t.publish(topic, [msg])
        (first,) = await collect(sub, 1, ack=False)
        await first.nack(delay=0.2)
        (second,) = await collect(sub, 1, ack=False)
        assert (second.message.id, second.attempt) == (msg.id, 2)
        await second.nack()
        (third,) = await collect(sub, 1, ack=False)
        assert third.attempt == 3
        await third.ack()
        _, queues = t.declared
        # 0.2 s goes through the 0.1 s tier (twice): no queue of its own
        assert any(q.endswith(":retry-100ms") for q in queues)
        assert not any(":retry-200ms" in q for q in queues)


async def test_jittered_delays_share_a_few_retry_tier_queues() -> None:
    topic, group = unique("topic"), unique("group")
    rng = random.Random(5)
    # small messages: 100 held at once fit in max_held_bytes (see prefetches())
    small = rabbitmq_transport(max_message_bytes=64 * 1024)
    async with small as t, t.subscribe(topic, group, prefetch=200) as sub:
        await t.publish(topic, make_messages(100))
        got = await collect(sub, 100, ack=False)
        delays = [rng.uniform(0.05, 4000.0) for _ in got]
        assert len({round(d * 1000) for d in delays}) == 100  # 100 distinct delays
        for d, delay in zip(got, delays, strict=True):
            await d.nack(delay=delay)
        _, queues = t.declared
        tiers = {q for q in queues if ":retry-" in q}
        assert 1 < len(tiers) <= len(RETRY_TIERS)
        assert all(
            q.rsplit("-", 1)[1] in {f"{round(x * 1000)}ms" for x in RETRY_TIERS} for q in tiers
        )


async def test_dead_letters_are_kept_in_a_history_queue_for_every_later_group() -> None:
    topic, group = unique("topic"), unique("group")
    async with rabbitmq_transport() as t:
        async with t.subscribe(topic, group) as sub:
            await t.publish(topic, make_messages(3))
            for d in await collect(sub, 3, ack=False):
                await d.dead_letter("bad")
        target = dead_letter_topic(topic, group)
        async with t.subscribe(target, unique("ops")) as first:
            assert len(await collect(first, 3)) == 3
        # a later group gets them too (a dead-letter topic is read from its beginning),
        # and the history keeps them, once each
        async with t.subscribe(target, unique("late")) as late:
            assert len(await collect(late, 3)) == 3
            assert await late.receive(10, timeout=0.3) == []
        async with t.subscribe(target, unique("later")) as later:
            assert len(await collect(later, 3)) == 3
            assert await later.receive(10, timeout=0.3) == []


async def test_settling_after_the_subscription_closed_raises() -> None:
    topic, group = unique("topic"), unique("group")
    async with rabbitmq_transport() as t:
        async with t.subscribe(topic, group) as sub:
            await t.publish(topic, make_messages(1))
            (d,) = await collect(sub, 1, ack=False)
        with pytest.raises(TransportClosed):
            await d.ack()
        with pytest.raises(TransportClosed):
            await sub.receive(1, timeout=0)


async def test_a_group_declared_ordered_cannot_be_reopened_unordered() -> None:
    topic, group = unique("topic"), unique("group")
    async with rabbitmq_transport(ordered_per_key=True) as o, rabbitmq_transport() as t:
        async with o.subscribe(topic, group):
            pass
        with pytest.raises(ConfigurationError, match="x-single-active-consumer differs"):
            async with t.subscribe(topic, group):
                pass
        t._queues.discard(group_queue_name(topic, group))  # o deletes it


@pytest.mark.parametrize("first", ["bare-url", "service"])
@pytest.mark.parametrize("mode", ["quorum", "ordered"])
async def test_dead_letters_read_alike_in_every_mode(mode: str, first: str) -> None:
    """``msdata dlq --broker amqp://...`` cannot say quorum or ordered: its transport is a
    classic, unordered one. It and the service's own transport (quorum, or ordered) read
    the same dead letters in either order: the reader's queue does not depend on the mode
    (it used to be declared with the first reader's mode, and the other failed with
    "exists with other arguments")."""
    options: dict[str, Any] = (
        {"queue_type": "quorum"} if mode == "quorum" else {"ordered_per_key": True}
    )
    namespace = f"t{uuid.uuid4().hex[:10]}"
    topic, group = unique("topic"), unique("group")
    async with (
        rabbitmq_transport(namespace=namespace, **options) as service,
        rabbitmq_transport(namespace=namespace) as bare,
    ):
        await service.declare_group(topic, group)
        (sent,) = make_messages(1)
        await service.publish(topic, [sent])
        async with service.subscribe(topic, group) as sub:
            (d,) = await sub.receive(timeout=5)
            await d.dead_letter("bad")
        readers = [bare, service] if first == "bare-url" else [service, bare]
        for reader in readers:
            got = await read_dead_letters(reader, [(topic, group)])
            assert [(i.id, i.reason) for i in got] == [(sent.id, "bad")]
        # both declared the reader's queues: the one that leaves last deletes them
        service._queues -= bare._queues
        service._exchanges -= bare._exchanges


@pytest.mark.parametrize("mode", ["quorum", "ordered"])
async def test_a_reader_queue_an_older_version_declared_in_another_mode_is_deleted_once(
    mode: str,
) -> None:
    """The upgrade step of docs/transports.md: a dead-letter reader queue that an older
    version declared through a quorum transport (with a quorum retry queue beside it) or an
    ordered one (single active consumer) makes every reader fail with ConfigurationError
    naming the argument; once the old queues are deleted, in either order, the next reader
    recreates its queue from the history and lists the dead letter. A reader that failed
    in between (only the queue deleted, not yet its quorum retry queue) must not have
    created the queue empty: the history would then never be copied into it (it was
    declared before its retry queue, and the next reader listed nothing)."""
    options: dict[str, Any] = (
        {"queue_type": "quorum"} if mode == "quorum" else {"ordered_per_key": True}
    )
    namespace = f"t{uuid.uuid4().hex[:10]}"
    topic, group = unique("topic"), unique("group")
    queue = group_queue_name(f"{namespace}:{dead_letter_topic(topic, group)}", "msdata-dlq")
    if mode == "quorum":
        old = {queue: {"x-queue-type": "quorum"}, f"{queue}:retry": {"x-queue-type": "quorum"}}
    else:
        old = {
            queue: {"x-queue-type": "classic", "x-single-active-consumer": True},
            f"{queue}:given-back": {"x-queue-type": "classic"},
        }
    differs = "x-queue-type differs" if mode == "quorum" else "x-single-active-consumer differs"
    conn = await aio_pika.connect(require("rabbitmq"))
    try:
        async with (
            rabbitmq_transport(namespace=namespace, **options) as service,
            rabbitmq_transport(namespace=namespace) as bare,
        ):
            (sent,) = make_messages(1)
            await service.declare_group(topic, group)
            await service.publish(topic, [sent])
            async with service.subscribe(topic, group) as sub:
                (d,) = await sub.receive(timeout=5)
                await d.dead_letter("bad")
            channel = await conn.channel()
            for name, arguments in old.items():
                await channel.declare_queue(name, durable=True, arguments=arguments)
            for reader in (bare, service):
                with pytest.raises(ConfigurationError, match=differs):
                    await read_dead_letters(reader, [(topic, group)])
            await channel.queue_delete(queue)
            if mode == "quorum":
                # its quorum retry queue is still there: the reader fails again, and leaves
                # no queue behind
                with pytest.raises(ConfigurationError, match=differs):
                    await read_dead_letters(bare, [(topic, group)])
                await channel.queue_delete(f"{queue}:retry")
            for reader in (bare, service):
                got = await read_dead_letters(reader, [(topic, group)])
                assert [(i.id, i.reason) for i in got] == [(sent.id, "bad")]
            for name in set(old) - bare.declared[1]:  # the given-back queue no one uses
                await channel.queue_delete(name)
            # both declared the reader's queues: the one that leaves last deletes them
            service._queues -= bare._queues
            service._exchanges -= bare._exchanges
    finally:
        await conn.close()


def test_a_mismatch_names_the_queue_argument_that_differs() -> None:
    error = Exception(
        "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'a:b' in vhost '/':"
        " received the value 'classic' of type 'longstr' but current is none"
    )
    assert _differing_argument(error) == (
        " (x-queue-type differs: declared with another queue_type)"
    )
    assert _differing_argument(Exception("PRECONDITION_FAILED")) == ""


async def test_from_url_connects_lazily_and_closes_its_connection() -> None:
    topic = unique("topic")
    t = RabbitMQTransport.from_url(require("rabbitmq"))
    async with t, t.subscribe(topic, unique("g")) as sub:
        await t.publish(topic, [TransportMessage(id="1", body=b"{}", key="k")])
        (d,) = await collect(sub, 1)
        assert d.message.key == "k"
    conn = t._connection
    assert conn is not None and conn.is_closed
    async with rabbitmq_transport() as cleaner:
        cleaner._exchanges |= t.declared[0]
        cleaner._queues |= t.declared[1]
    with pytest.raises(ConfigurationError):
        RabbitMQTransport.from_url("redis://localhost")


async def test_publish_keeps_order_of_a_batch_within_a_key() -> None:
    topic, group = unique("topic"), unique("group")
    async with rabbitmq_transport() as t, t.subscribe(topic, group) as sub:
        msgs = make_messages(300, key="same")
        await t.publish(topic, msgs)
        got = await collect(sub, 300)
        assert [d.message.id for d in got] == [m.id for m in msgs]


async def test_ordered_mode_keeps_one_key_in_flight() -> None:
    topic, group = unique("topic"), unique("group")
    async with rabbitmq_transport(ordered_per_key=True) as t, t.subscribe(topic, group) as sub:
        await t.publish(topic, make_messages(5, key="a") + make_messages(5, key="b"))
        await asyncio.sleep(0.2)
        batch = await sub.receive(10, timeout=2)
        assert sorted(d.message.key or "" for d in batch) == ["a", "b"]
        for d in batch:
            await d.ack()
        assert len(await collect(sub, 8)) == 8


async def test_publish_declares_the_exchange_again_after_it_went_missing() -> None:
    topic = unique("topic")
    async with rabbitmq_transport() as t:
        await t.publish(topic, make_messages(1))
        assert t._connection is not None
        admin = await t._connection.channel()
        await admin.exchange_delete(topic)
        published = False
        for _ in range(50):
            try:
                await t.publish(topic, make_messages(1))
                published = True
                break
            except PublishError:
                await asyncio.sleep(0.1)
        assert published, "publish never recovered from the missing exchange"
        await admin.get_exchange(topic, ensure=True)  # it exists again
        await admin.close()


async def test_messages_amqp_cannot_carry_are_refused_alone_and_the_connection_stays() -> None:
    """Each refused before sending, alone, with the msdata error as the reason: an id that
    is not a str or over AMQP's 255-byte shortstr, a body that is not bytes, a key that is
    not a str (once sent as "7"), a header value None (once sent as "None"), and headers
    that do not fit in one content-header frame (once: FRAME_ERROR, the broker closed the
    connection and the batch failed after publish_timeout). The others are confirmed."""
    topic, group = unique("topic"), unique("group")
    good = make_messages(3, prefix="good")
    bad = {
        "int id": TransportMessage(7, b"{}"),  # type: ignore[arg-type]
        "long id": TransportMessage("i" * 256, b"{}"),
        "str body": TransportMessage(str(uuid.uuid4()), "{}"),  # type: ignore[arg-type]
        "int key": TransportMessage(str(uuid.uuid4()), b"{}", key=7),  # type: ignore[arg-type]
        "None value": TransportMessage(str(uuid.uuid4()), b"{}", headers={"x-v": None}),  # type: ignore[dict-item]
        "huge header": TransportMessage(str(uuid.uuid4()), b"{}", headers={"x-v": "v" * 200_000}),
    }
    expected = {
        "int id": "EncodeError: ",
        "long id": "EncodeError: ",
        "str body": "EncodeError: ",
        "int key": "InvalidHeader: ",
        "None value": "InvalidHeader: ",
        "huge header": "MessageTooLarge: ",
    }
    async with rabbitmq_transport(publish_timeout=5.0) as t, t.subscribe(topic, group) as sub:
        with pytest.raises(PublishError) as refused:
            await t.publish(topic, [good[0], *bad.values(), good[1]])
        reasons = refused.value.refused
        assert len(reasons) == len(bad)
        for what, m in bad.items():
            mid = m.id if isinstance(m.id, str) else repr(m.id)
            assert reasons[mid].startswith(expected[what]), (what, reasons[mid])
        assert "frame_max" in reasons[bad["huge header"].id]
        got = await collect(sub, 2)
        assert sorted(d.message.id for d in got) == sorted(m.id for m in good[:2])
        # a header just under the frame (with msdata's room) still goes
        fits = TransportMessage(str(uuid.uuid4()), b"{}", headers={"x-v": "v" * 100_000})
        await t.publish(topic, [fits, good[2]])
        assert sorted(d.message.id for d in await collect(sub, 2)) == sorted([fits.id, good[2].id])
        assert await sub.receive(10, timeout=0.3) == []


def test_size_options_come_from_the_url_and_bound_the_prefetch() -> None:
    t = RabbitMQTransport.from_url(
        "amqp://guest:guest@localhost/?max_message_bytes=1000&heartbeat=30&max_held_bytes=20000"
    )
    assert (t.max_message_bytes, t.max_held_bytes) == (1000, 20000)
    assert t._url == "amqp://guest:guest@localhost/?heartbeat=30"  # the rest goes to aio-pika
    # 20 messages of max_message_bytes fit in max_held_bytes: 15 + 5 for the ready queue
    assert t.subscribe("t", "g", prefetch=100).prefetches() == (15, 5)
    # a prefetch that fits is the group queue's; the ready queue has a quarter of it besides
    assert t.subscribe("t", "g", prefetch=8).prefetches() == (8, 2)
    assert t.subscribe("t", "g", prefetch=17).prefetches() == (16, 4)
    kw = RabbitMQTransport.from_url("amqp://localhost/?max_held_bytes=5", max_held_bytes=99)
    assert kw.max_held_bytes == 99  # the keyword wins
    # below one message: one each
    assert kw.subscribe("t", "g").prefetches() == (1, 1)
    ordered = RabbitMQTransport.from_url("amqp://localhost/", ordered_per_key=True)
    assert ordered.subscribe("t", "g").prefetches() == (60, 0)  # 64 MiB // (1 MiB + 64 KiB)
    for bad in ("max_message_bytes=0", "max_held_bytes=x"):
        with pytest.raises(ConfigurationError):
            RabbitMQTransport.from_url(f"amqp://localhost/?{bad}")
    with pytest.raises(ConfigurationError):
        RabbitMQTransport(None, max_message_bytes=600 * 1024 * 1024)


def test_properties_that_are_not_utf8_are_read_and_escaped() -> None:
    """pamqp (as the transport installs it) reads short strings and header names that are
    not UTF-8 instead of failing the frame; the subscription hands them out escaped."""
    from pamqp import decode

    assert decode.short_str(b"\x06" + "héllo".encode()) == (7, "héllo")  # as before
    assert decode.by_type(b"\x03a\xffb", "shortstr") == (4, "a\udcffb")
    _, table = decode.by_type(b"\x00\x00\x00\x08\x02\xff\xfeS\x00\x00\x00\x00", "table")
    assert table == {"\udcff\udcfe": ""}
    props = SimpleNamespace(
        message_id="id-\udcff",
        content_type="text/\udcfe",
        headers={"x-\udcff": b"v", "ok": "v"},
    )
    raw = SimpleNamespace(
        header=SimpleNamespace(properties=props), body=b"x", redelivered=False, exchange="t"
    )
    m = _Entry(raw).parse(counts_deliveries=False)  # type: ignore[arg-type]
    assert m.id == "id-\\xff"
    assert props.content_type == "text/\\xfe"  # what a retry or dead letter copies
    assert dict(m.headers) == {"x-\\xff": "v", "ok": "v"}


@pytest.mark.parametrize("ordered", [False, True])
async def test_a_receive_loop_ends_when_another_task_closes_the_subscription(
    ordered: bool,
) -> None:
    """A consumer task that calls ``receive()`` in a loop while another task closes its
    subscription gets ``[]`` while the close runs, then ``TransportClosed``: a ``receive()``
    that returned ``[]`` at once, without yielding, during the close made that loop spin,
    and the close (and the whole event loop) never went on."""
    async with rabbitmq_transport(ordered_per_key=ordered) as t:
        topic, group = unique("topic"), unique("group")
        await t.declare_group(topic, group)
        await t.publish(topic, make_messages(6))
        sub = t.subscribe(topic, group, prefetch=6)
        await sub.__aenter__()
        got: list[str] = []

        async def consume() -> None:
            with pytest.raises(TransportClosed):
                while True:
                    batch = await sub.receive(6, timeout=0.5)
                    for d in batch:
                        got.append(d.message.id)
                        await d.ack()

        consuming = asyncio.ensure_future(consume())
        await eventually(lambda: len(got) == 6, 10.0)
        await sub.close()  # while consume() waits in receive(), and calls it again
        await consuming
        assert len(got) == 6


_MODES = {
    "classic": {},
    "ordered": {"ordered_per_key": True},
    "quorum": {"queue_type": "quorum"},
    "quorum-ordered": {"queue_type": "quorum", "ordered_per_key": True},
}


@pytest.mark.parametrize("settle", ["ack", "nack", "nack-delay", "dead_letter", "release"])
@pytest.mark.parametrize("mode", list(_MODES))
async def test_a_settlement_whose_ack_is_lost_with_the_connection_does_not_come_back(
    mode: str, settle: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery settled (acked; or nacked, dead-lettered or released, each a copy
    confirmed and then the original acked) whose ``basic.ack`` never reached the broker (as
    when it is written into a silent connection that then drops) comes back flagged as a
    redelivery once the connection is back. The subscription acks it again and does not
    hand it out: the settlement's outcome (a retry's copy, the dead letter, the released
    copy) is all that arrives, and a message published after arrives once, first attempt.
    The ack is lost here by not sending it; then the connection is reset. (Ordered mode
    retries and releases in place, holding the delivery: the broker sees no settlement.)"""
    options = _MODES[mode]
    if options.get("ordered_per_key") and settle in ("nack", "nack-delay", "release"):
        pytest.skip("ordered mode retries and releases in place: nothing settled at the broker")
    conf = TestRabbitMQTransport()
    conf.options = options
    topic, group = unique("topic"), unique("group")
    async with (
        _SilentServer(conf.broker_address()) as server,
        conf.make_transport_at(server.host, server.port, 5.0) as t,
    ):
        await t.declare_group(topic, group)
        first, after = make_messages(2, key="k")
        await t.publish(topic, [first])
        async with t.subscribe(topic, group, max_attempts=5) as sub:
            (d,) = await collect(sub, 1, timeout=10.0, ack=False)
            lost: list[object] = []

            async def lose(raw: Any) -> None:  # the ack never reaches the broker
                lost.append(raw.delivery_tag)

            monkeypatch.setattr(rabbitmq_transport_module, "_ack", lose)
            if settle == "ack":
                await d.ack()
            elif settle == "nack":
                await d.nack()
            elif settle == "nack-delay":
                await d.nack(delay=0.3)
            elif settle == "dead_letter":
                await d.dead_letter("bad")
            else:
                await d.release()
            monkeypatch.undo()
            assert lost, "the settlement sent no ack"
            server.speak_again(reset=True)  # the connection goes, the ack with it
            await publish_eventually(t, topic, [after], timeout=10.0)
            came: list[tuple[str, int]] = []
            deadline = time.monotonic() + 15.0
            quiet: float | None = None
            while time.monotonic() < (deadline if quiet is None else quiet):
                for x in await sub.receive(10, timeout=0.3):
                    came.append((x.message.id, x.attempt))
                    await x.ack()
                    if x.message.id == after.id and quiet is None:
                        quiet = time.monotonic() + 1.5  # for the original to come back
            # the copy a nack or release makes comes once, and the original not at all; the
            # copy may have reached the consumer before the drop: then it counts one more
            expected = {"nack": 2, "nack-delay": 2, "release": 1}.get(settle)
            copies = [attempt for mid, attempt in came if mid == first.id]
            if expected is None:
                assert copies == [], f"settled, it came back as attempts {copies}"
            else:
                assert len(copies) == 1, f"came as attempts {copies}"
                assert copies[0] in (expected, expected + 1), f"came as attempt {copies[0]}"
            assert [a for mid, a in came if mid == after.id] == [1], f"after: {came}"
        if settle == "dead_letter":
            async with t.subscribe(dead_letter_topic(topic, group), unique("reader")) as reader:
                letters = await collect(reader, 2, timeout=2.0)
                assert [x.message.id for x in letters] == [first.id]


@pytest.mark.parametrize("mode", list(_MODES))
async def test_a_lost_ack_is_acked_again_by_another_subscription_of_the_transport(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memory of settlements is the transport's, per group: a delivery acked by one
    subscription whose ack never reached the broker, handed back when its channel closes,
    is acked again by the next subscription of the group in the same transport, not handed
    out; a subscription of another group still gets the message."""
    topic, group, other = unique("topic"), unique("group"), unique("other")
    async with rabbitmq_transport(**_MODES[mode]) as t:
        await t.declare_group(topic, group)
        await t.declare_group(topic, other)
        first, after = make_messages(2, key="k")
        await t.publish(topic, [first])
        async with t.subscribe(topic, group) as sub:
            (d,) = await collect(sub, 1, timeout=10.0, ack=False)

            async def lose(raw: Any) -> None:  # the ack never reaches the broker
                pass

            monkeypatch.setattr(rabbitmq_transport_module, "_ack", lose)
            await d.ack()
            monkeypatch.undo()
        await t.publish(topic, [after])
        async with t.subscribe(topic, group) as again:
            came = await collect(again, 2, timeout=3.0)
            assert [(x.message.id, x.attempt) for x in came] == [(after.id, 1)], first.id
        async with t.subscribe(topic, other) as elsewhere:
            came = await collect(elsewhere, 2, timeout=10.0)
            assert sorted(x.message.id for x in came) == sorted([first.id, after.id])
