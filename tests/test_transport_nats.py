from __future__ import annotations

import asyncio
import logging
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats
import pytest
from nats.aio.client import Client

from msdata.adapters.nats import (
    NatsSubscription,
    NatsTransport,
    consumer_name,
    stream_name,
    topic_of_stream,
)
from msdata.adapters.nats.transport import wire_size
from msdata.deadletter import DEAD_LETTER_RESERVE
from msdata.errors import ConfigurationError, PublishError, TransportClosed, TransportError
from msdata.testing import eventually
from msdata.testing.conformance.transport import TransportConformance, collect, make_messages
from msdata.transport import (
    DEAD_LETTER_ATTEMPTS,
    DEAD_LETTER_REASON,
    REPLAY_HEADER,
    Delivery,
    Transport,
    TransportMessage,
    dead_letter_topic,
)
from services import require
from transport_factories import with_test_hooks

pytestmark = pytest.mark.nats


async def delete_streams(nc: Client, prefix: str) -> None:
    """Remove every stream a test created (they all start with its own prefix)."""
    js = nc.jetstream()
    for info in await js.streams_info():
        if info.config.name.startswith(prefix):
            await js.delete_stream(info.config.name)


@asynccontextmanager
async def nats_transport(**options: object) -> AsyncIterator[NatsTransport]:
    nc = await nats.connect(require("nats"))
    if "namespace" not in options:
        options["stream_prefix"] = f"T{uuid.uuid4().hex[:12]}_"
    try:
        transport = NatsTransport(nc, **options)  # type: ignore[arg-type]
    except BaseException:
        await nc.close()
        raise
    prefix = transport.stream_prefix
    with_test_hooks("nats", transport)
    try:
        yield transport
    finally:
        await transport.close()
        await delete_streams(nc, prefix)
        await nc.close()


@asynccontextmanager
async def unreachable_nats(
    host: str, port: int, timeout: float, password: str
) -> AsyncIterator[Transport]:
    t = NatsTransport.from_url(
        f"nats://msdata:{password}@{host}:{port}",
        publish_timeout=timeout,
        connect_timeout=timeout,
    )
    try:
        yield t
    finally:
        await t.close()


@asynccontextmanager
async def nats_transport_at(
    host: str, port: int, timeout: float, **options: object
) -> AsyncIterator[Transport]:
    """A transport connecting to ``host:port`` (a proxy in front of the test server) under
    a fresh stream prefix, its streams deleted afterwards through a connection of its own."""
    prefix = f"T{uuid.uuid4().hex[:12]}_"
    t = NatsTransport.from_url(
        f"nats://{host}:{port}",
        stream_prefix=prefix,
        publish_timeout=timeout,
        connect_timeout=timeout,
        **options,  # type: ignore[arg-type]
    )
    try:
        yield t
    finally:
        await t.close()
        nc = await nats.connect(require("nats"))
        try:
            await delete_streams(nc, prefix)
        finally:
            await nc.close()


class _Unreachable(TransportConformance):
    #: the constructor options of the class's transports
    options: dict[str, object] = {}

    def make_unreachable_transport(  # type: ignore[override]
        self, host: str, port: int, timeout: float
    ) -> AsyncIterator[Transport]:
        return unreachable_nats(host, port, timeout, self.unreachable_password)  # type: ignore[return-value]

    def transport_url(self) -> str:
        return require("nats")

    def broker_address(self) -> tuple[str, int]:
        url = urlsplit(require("nats").split(",")[0])
        return url.hostname or "127.0.0.1", url.port or 4222

    def make_transport_at(  # type: ignore[override]
        self, host: str, port: int, timeout: float
    ) -> AsyncIterator[Transport]:
        return nats_transport_at(host, port, timeout, ack_wait=3.0, **self.options)  # type: ignore[return-value]


class TestNatsTransport(_Unreachable):
    arrival_timeout = 10.0
    quiet_period = 0.5

    def make_transport(self) -> AsyncIterator[Transport]:  # type: ignore[override]
        return nats_transport(ack_wait=3.0)  # type: ignore[return-value]

    def make_transport_with(self, **options: object) -> AsyncIterator[Transport]:  # type: ignore[override]
        return nats_transport(ack_wait=3.0, **options)  # type: ignore[return-value]

    def make_transport_in(self, namespace: str) -> AsyncIterator[Transport]:  # type: ignore[override]
        return nats_transport(ack_wait=3.0, namespace=namespace)  # type: ignore[return-value]


class TestNatsTransportOrdered(_Unreachable):
    """``ordered=True``: a consumer per key partition, so the order test runs too."""

    options = {"ordered": True, "key_partitions": 8}
    arrival_timeout = 10.0
    quiet_period = 0.5

    def make_transport(self) -> AsyncIterator[Transport]:  # type: ignore[override]
        return nats_transport(ack_wait=3.0, ordered=True, key_partitions=8)  # type: ignore[return-value]

    def make_transport_with(self, **options: object) -> AsyncIterator[Transport]:  # type: ignore[override]
        return nats_transport(ack_wait=3.0, ordered=True, key_partitions=8, **options)  # type: ignore[return-value]

    def make_transport_in(self, namespace: str) -> AsyncIterator[Transport]:  # type: ignore[override]
        return nats_transport(  # type: ignore[return-value]
            ack_wait=3.0, ordered=True, key_partitions=8, namespace=namespace
        )


# -- adapter-specific ---------------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_stream_names_are_valid_distinct_and_reversible() -> None:
    topics = ["orders", "orders.placed", "orders-placed", "orders_placed", "a._-b", "x" * 200]
    names = [stream_name(t) for t in topics]
    assert len(set(names)) == len(names)
    for topic, name in zip(topics, names, strict=True):
        assert "." not in name and len(name) <= 150
        assert name.startswith("MSDATA_")
        if len(topic) < 100:
            assert topic_of_stream(name) == topic
    assert topic_of_stream(names[-1]) is None  # shortened with a hash
    long_groups = ["g" * 199 + "a", "g" * 199 + "b", "_" * 200]
    assert len({consumer_name(g) for g in long_groups}) == 3
    assert topic_of_stream("OTHER_orders") is None


async def test_a_message_id_published_twice_is_delivered_once() -> None:
    topic, group = unique("topic"), unique("group")
    async with nats_transport() as t, t.subscribe(topic, group) as sub:
        (m,) = make_messages(1)
        await t.publish(topic, [m])
        await t.publish(topic, [m])  # the relay's retry of a batch it already published
        (ours,) = make_messages(1)
        await t.publish(topic, [m, m, ours])
        got = await collect(sub, 2, timeout=10.0)
        assert sorted(d.message.id for d in got) == sorted([m.id, ours.id])
        assert await sub.receive(10, timeout=0.5) == []


@pytest.mark.parametrize("ordered", [False, True], ids=["unordered", "ordered"])
async def test_foreign_messages_arrive_and_can_be_dead_lettered(ordered: bool) -> None:
    topic, group = unique("topic"), unique("group")
    async with nats_transport(ordered=ordered) as t, t.subscribe(topic, group) as sub:
        nc = t.client
        assert nc is not None
        js = nc.jetstream()
        await js.publish(topic, b"\x00\xff garbage")
        await js.publish(topic, b"not json either", headers={"Content-Type": "text/plain"})
        (ours,) = make_messages(1)
        await t.publish(topic, [ours])
        got = await collect(sub, 3, timeout=10.0, ack=False)
        assert len(got) == 3
        foreign = [d for d in got if d.message.id != ours.id]
        assert [d.message.body for d in foreign] == [b"\x00\xff garbage", b"not json either"]
        for d in foreign:
            assert d.message.id.startswith(stream_name(topic, t.stream_prefix) + ":")
            assert d.message.key is None and d.attempt == 1
            await d.dead_letter("MalformedMessage: not UTF-8 JSON\nline two")
        assert foreign[1].message.headers == {"Content-Type": "text/plain"}
        await next(d for d in got if d.message.id == ours.id).ack()
        async with t.subscribe(dead_letter_topic(topic, group), unique("ops")) as dlq:
            dead = await collect(dlq, 2, timeout=10.0)
        assert [d.message.body for d in dead] == [b"\x00\xff garbage", b"not json either"]
        assert [d.message.id for d in dead] == [d.message.id for d in foreign]
        for d in dead:
            assert d.message.headers[DEAD_LETTER_REASON] == (
                "MalformedMessage: not UTF-8 JSON line two"
            )
        assert await sub.receive(10, timeout=0.3) == []


async def test_a_delivery_whose_consumers_keep_dying_is_dead_lettered() -> None:
    topic, group = unique("topic"), unique("group")
    async with nats_transport(ack_wait=1.0) as t:
        (m,) = make_messages(1)
        await t.publish(topic, [m])
        # a consumer on its own connection takes the message and dies without settling it
        dying = NatsTransport(await nats.connect(require("nats")), stream_prefix=t.stream_prefix)
        sub = await dying.subscribe(topic, group, max_attempts=1).__aenter__()
        (d,) = await collect(sub, 1, timeout=10.0, ack=False)
        assert d.attempt == 1
        assert dying.client is not None
        await dying.client.close()
        async with (
            t.subscribe(topic, group, max_attempts=1) as survivor,
            t.subscribe(dead_letter_topic(topic, group), unique("ops")) as dlq,
        ):
            # redelivered after ack_wait with attempt 2 > max_attempts: never handed out
            dead_letters: list[Delivery] = []

            async def dead_lettered() -> bool:
                assert await survivor.receive(10, timeout=0.5) == []
                dead_letters.extend(await dlq.receive(10, timeout=0.1))
                return bool(dead_letters)

            await eventually(dead_lettered, 10.0, what="the dead letter")
            (dead,) = dead_letters
        assert dead.message.id == m.id
        assert "handed out 1 time and never settled" in dead.message.headers[DEAD_LETTER_REASON]
        assert dead.message.headers[DEAD_LETTER_ATTEMPTS] == "1"  # handed to a consumer once


async def test_publish_fails_with_publish_error_and_recovers() -> None:
    topic = unique("topic")
    async with nats_transport(publish_timeout=2.0) as t:
        await t.publish(topic, make_messages(1))
        assert await t.delete_topic(topic)
        # the transport believes the stream exists: nothing stores the message
        t._streams[topic] = (t.subject_prefix + topic, [t.subject_prefix + topic])
        with pytest.raises(PublishError):
            await t.publish(topic, make_messages(3))
        # the next publish declares the stream again
        await t.publish(topic, make_messages(2))
        async with t.subscribe(topic, unique("group")) as sub:
            assert len(await collect(sub, 2, timeout=10.0)) == 2


async def test_subject_prefix_and_keys_travel() -> None:
    topic, group = unique("topic"), unique("group")
    prefix = f"app{uuid.uuid4().hex[:6]}."
    async with nats_transport(subject_prefix=prefix) as t, t.subscribe(topic, group) as sub:
        assert t.client is not None
        await t.client.jetstream().publish(prefix + topic, b"from another service")
        await t.publish(topic, [TransportMessage(id="id-1", body=b"{}", key="")])
        await t.publish(topic, [TransportMessage(id="id-2", body=b"{}", key="order-7")])
        got = await collect(sub, 3, timeout=10.0)
        assert got[0].message.body == b"from another service"
        assert [(d.message.id, d.message.key) for d in got[1:]] == [
            ("id-1", ""),
            ("id-2", "order-7"),
        ]


async def test_settling_after_close_raises_and_close_gives_deliveries_back() -> None:
    topic, group = unique("topic"), unique("group")
    async with nats_transport() as t:
        await t.publish(topic, make_messages(3))
        async with t.subscribe(topic, group) as sub:
            got = await collect(sub, 3, timeout=10.0, ack=False)
        with pytest.raises(TransportClosed):
            await got[0].ack()
        with pytest.raises(TransportClosed):
            await sub.receive()
        async with t.subscribe(topic, group) as again:
            back = await collect(again, 3, timeout=2.0)  # long before ack_wait (30 s)
        assert sorted(d.message.id for d in back) == sorted(d.message.id for d in got)
        assert all(d.attempt == 2 for d in back)


async def test_from_url_connects_on_first_use_and_closes_its_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="msdata.adapters.nats")
    url = require("nats")
    with pytest.raises(ConfigurationError):
        NatsTransport.from_url("redis://127.0.0.1")
    prefix = f"T{uuid.uuid4().hex[:12]}_"
    t = NatsTransport.from_url(url, stream_prefix=prefix)
    assert t.client is None
    topic = unique("topic")
    try:
        async with t:
            async with t.subscribe(topic, unique("group")) as sub:
                await t.publish(topic, make_messages(5))
                assert len(await collect(sub, 5, timeout=10.0)) == 5
            nc = t.client
            assert nc is not None and nc.is_connected
        assert nc.is_closed
        # our own close is no disconnect to warn about
        assert not [r for r in caplog.records if "disconnected" in r.getMessage()]
        with pytest.raises(TransportClosed):
            await t.publish(topic, make_messages(1))
    finally:
        other = await nats.connect(url)
        await delete_streams(other, prefix)
        await other.close()


async def test_nats_unsafe_names_are_rejected() -> None:
    async with nats_transport() as t:
        with pytest.raises(ConfigurationError):
            t.subscribe("ends.with.dot.", "g")
    with pytest.raises(ConfigurationError):
        NatsTransport(None, stream_prefix="has.dot")
    with pytest.raises(ConfigurationError):
        NatsTransport(None, subject_prefix="no-trailing-dot")


async def test_a_subscription_declares_its_group_again_if_the_server_lost_it() -> None:
    topic, group = unique("topic"), unique("group")
    async with nats_transport(consumer_check_interval=0.2) as t, t.subscribe(topic, group) as sub:
        assert t.client is not None
        js = t.client.jetstream()
        await t.publish(topic, make_messages(1))
        assert len(await collect(sub, 1, timeout=10.0)) == 1
        await js.delete_consumer(sub.stream, sub.consumer)
        (m,) = make_messages(1)
        await t.publish(topic, [m])
        # the consumer is declared again, from the start of the stream: at least once
        got = await collect(sub, 2, timeout=10.0)
        assert m.id in {d.message.id for d in got}
        await js.delete_stream(sub.stream)
        t._streams.clear()  # a restarted server without its data: the stream is gone too
        (again,) = make_messages(1)
        await t.publish(topic, [again])
        got = await collect(sub, 1, timeout=10.0)
        assert [d.message.id for d in got] == [again.id]


async def test_key_partitions_are_fixed_per_topic() -> None:
    topic = unique("topic")
    async with nats_transport(key_partitions=4) as t:
        await t.publish(topic, make_messages(1, key="k"))
        assert t.client is not None
        other = NatsTransport(t.client, stream_prefix=t.stream_prefix, key_partitions=8)
        with pytest.raises(ConfigurationError, match="key_partitions"):
            await other.publish(topic, make_messages(1, key="k"))
    with pytest.raises(ConfigurationError):
        NatsTransport(None, key_partitions=0)
    async with nats_transport() as t:
        with pytest.raises(ConfigurationError):
            t.subscribe("orders._k.3", "g")


async def test_an_ordered_group_holds_a_key_back_while_its_message_is_in_flight() -> None:
    topic, group = unique("topic"), unique("group")
    async with (
        nats_transport(ordered=True, key_partitions=4) as t,
        t.subscribe(topic, group) as a,
        t.subscribe(topic, group) as b,
    ):
        first, second = make_messages(2, key="order-1")
        await t.publish(topic, [first, second])
        (d,) = await collect(a, 1, timeout=10.0, ack=False)
        assert d.message.id == first.id
        # the next message of the key waits, at every consumer of the group
        assert await b.receive(10, timeout=0.5) == []
        assert await a.receive(10, timeout=0.2) == []
        await d.nack()

        async def next_from_either() -> list[Delivery]:
            # either consumer may get it: a pull request of a's can outlive its receive()
            got: list[Delivery] = []

            async def arrived() -> bool:
                for sub in (a, b):
                    got.extend(await sub.receive(10, timeout=0.1))
                return bool(got)

            await eventually(arrived, 10.0, what="the next delivery of the key")
            return got

        (again,) = await next_from_either()
        assert (again.message.id, again.attempt) == (first.id, 2)
        await again.ack()
        (nxt,) = await next_from_either()
        assert nxt.message.id == second.id
        await nxt.ack()


@pytest.mark.parametrize("ordered", [False, True], ids=["unordered", "ordered"])
async def test_every_message_the_stream_holds_reaches_the_group(ordered: bool) -> None:
    """A foreign publish to a partition subject no consumer reads (beyond key_partitions,
    or not a number) is refused, never stored where no group would receive it."""
    topic, group = unique("topic"), unique("group")
    async with (
        nats_transport(ordered=ordered, key_partitions=4) as t,
        t.subscribe(topic, group) as sub,
    ):
        assert t.client is not None
        js = t.client.jetstream()
        await t.publish(topic, make_messages(3, key="order-1") + make_messages(2))
        refused = 0
        for suffix in ("_k.0", "_k.3", "_k.4", "_k.99", "_k.abc"):
            try:
                await js.publish(f"{topic}.{suffix}", suffix.encode(), timeout=2)
            except nats.errors.Error:
                refused += 1
        assert refused == 3  # _k.4, _k.99 and _k.abc: not this topic's partitions
        info = await js.stream_info(stream_name(topic, t.stream_prefix))
        held = info.state.messages
        assert held == 7
        got = await collect(sub, held, timeout=10.0)
        assert len(got) == held
        assert {d.message.body for d in got} >= {b"_k.0", b"_k.3"}
        assert await sub.receive(10, timeout=0.5) == []


async def test_a_stream_declared_with_the_old_partition_wildcard_is_narrowed() -> None:
    from nats.js.api import StreamConfig

    topic = unique("topic")
    async with nats_transport(key_partitions=2) as t:
        assert t.client is not None
        js = t.client.jetstream()
        name = stream_name(topic, t.stream_prefix)
        await js.add_stream(
            StreamConfig(
                name=name,
                description=f"msdata topic {topic}; key partitions 2",
                subjects=[topic, f"{topic}._k.*"],
            )
        )
        await t.publish(topic, make_messages(1, key="k"))
        info = await js.stream_info(name)
        assert info.config.subjects == [topic, f"{topic}._k.0", f"{topic}._k.1"]


async def test_an_attempt_is_never_lower_than_after_the_nack_that_preceded_it() -> None:
    """nats-server 2.9 now and then redelivers a message nacked with a delay with its
    delivered count back at 1 (ack subject ``...<consumer>.1.<seq>.2...``); the
    subscription remembers the attempt it nacked at."""
    from nats.aio.msg import Msg

    topic, group = unique("topic"), unique("group")
    async with nats_transport() as t, t.subscribe(topic, group) as sub:
        await t.publish(topic, make_messages(1))
        (first,) = await collect(sub, 1, timeout=10.0, ack=False)
        assert first.attempt == 1
        reply = first._msg.reply  # type: ignore[attr-defined]
        await first.nack(delay=30)
        tokens = reply.split(".")
        tokens[6] = str(int(tokens[6]) + 1)  # the consumer sequence moves on; delivered stays 1
        assert tokens[4] == "1"
        lost_count = Msg(t.client, subject=first._msg.subject, reply=".".join(tokens), data=b"{}")  # type: ignore[arg-type, attr-defined]
        (again,) = await sub._deliveries([(lost_count, 0)])
        assert again.attempt == 2
        await again.ack()
        assert sub._floor == {}  # settled: forgotten


async def test_a_redelivery_the_server_counted_and_never_sent_is_not_an_attempt() -> None:
    """nats-server 2.9 sometimes counts the redelivery after a ``-NAK`` on a key partition
    and never sends it: the message comes back after ``ack_wait`` with ``num_delivered``
    two higher (ack subject ``...<consumer>.3.<seq>.<cseq + 1>...``). Only the consumer
    sequence says how many deliveries were really sent, both to the subscription that
    nacked it and, through the release record of the nack, to another one; a delivery
    really sent in between (a consumer that died on it) still counts."""
    from nats.aio.msg import Msg

    topic, group = unique("topic"), unique("group")
    async with nats_transport(ordered=True) as t, t.subscribe(topic, group) as sub:
        await t.publish(topic, make_messages(1, key="k"))
        (first,) = await collect(sub, 1, timeout=10.0, ack=False)
        assert first.attempt == 1
        reply = first._msg.reply  # type: ignore[attr-defined]
        await first.nack(delay=30)  # recorded now, the -NAK after the delay (or the close)

        def redelivery(delivered: int, sent: int) -> Msg:
            tokens = reply.split(".")
            assert tokens[4] == "1"
            tokens[4] = str(delivered)
            tokens[6] = str(int(tokens[6]) + sent)
            return Msg(t.client, subject=first._msg.subject, reply=".".join(tokens), data=b"{}")  # type: ignore[arg-type, attr-defined]

        # back to the subscription that nacked it, which remembers the nack
        (again,) = await sub._deliveries([(redelivery(3, 1), 0)])
        assert again.attempt == 2
        sub._inflight.discard(again)
        async with t.subscribe(topic, group) as other:
            # to another subscription, which reads the record of the nack
            (elsewhere,) = await other._deliveries([(redelivery(3, 1), 0)])
            assert elsewhere.attempt == 2
            # one delivery really sent in between (its consumer died): it counts
            (after_a_death,) = await other._deliveries([(redelivery(3, 2), 0)])
            assert after_a_death.attempt == 3
            other._inflight.clear()  # forged: not given back


async def test_a_server_that_went_away_fails_calls_within_their_timeouts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The unreachable-server suite case covers a server never reached; here it went away
    under a connected transport (nats-py then buffers and reconnects forever)."""
    from private_servers import open_private

    server = open_private("nats", tmp_path)
    try:
        t = NatsTransport.from_url(server.url, publish_timeout=1.5, connect_timeout=1.5)
        topic = unique("topic")
        async with t:
            await t.publish(topic, make_messages(1))
            await asyncio.get_running_loop().run_in_executor(None, server.stop, True)
            caplog.set_level(logging.DEBUG)
            started = time.monotonic()
            with pytest.raises(PublishError, match=f"127.0.0.1:{server.port}"):
                await asyncio.wait_for(t.publish(topic, make_messages(1)), 30)
            with pytest.raises(TransportError, match=f"127.0.0.1:{server.port}"):
                async with t.subscribe(topic, unique("group")):
                    pass
            assert time.monotonic() - started < 2 * 1.5 + 3.0
        tracebacks = [r for r in caplog.records if r.exc_info and r.levelno >= logging.WARNING]
        assert not tracebacks, [f"{r.name}: {r.getMessage()}" for r in tracebacks]
    finally:
        server.close()


async def test_an_event_bus_on_an_unreachable_server_fails_to_start_within_the_timeout() -> None:
    from msdata import Event, MessageRegistry, message_type
    from msdata.events import EventBus
    from private_servers import free_port

    registry = MessageRegistry()

    @message_type("test.Pinged", registry=registry)
    class Pinged(Event):
        n: int

    port = free_port()
    t = NatsTransport.from_url(f"nats://127.0.0.1:{port}", connect_timeout=1.0)
    bus = EventBus(t, registry=registry, source="test")

    @bus.handler(Pinged, group="g")
    async def handle(e: Pinged) -> None:
        pass

    started = time.monotonic()
    with pytest.raises(TransportError, match=f"127.0.0.1:{port}"):
        await asyncio.wait_for(bus.start(), 30)
    assert time.monotonic() - started < 1.0 + 3.0
    await t.close()


# -- issue 9: per-message outcomes, the server's size limit, unreadable messages --------------


async def test_a_message_the_stream_refuses_is_named_alone_and_the_others_are_confirmed() -> None:
    """JetStream refuses one message of a batch (the stream's max_msg_size): PublishError
    names it alone, with the server's reason; the others were confirmed (stored once)."""
    topic, group = unique("topic"), unique("group")
    async with nats_transport() as t:
        await t.declare_group(topic, group)
        assert t.client is not None
        js = t.client.jetstream()
        info = await js.stream_info(stream_name(topic, t.stream_prefix))
        info.config.max_msg_size = 2000
        await js.update_stream(info.config)
        small = make_messages(4)
        big = TransportMessage(str(uuid.uuid4()), b"x" * 5000)
        with pytest.raises(PublishError) as refused:
            await t.publish(topic, [small[0], big, small[1], small[2]])
        assert list(refused.value.refused) == [big.id]
        assert "message size exceeds maximum" in refused.value.refused[big.id]
        async with t.subscribe(topic, group) as sub:
            got = await collect(sub, 3, timeout=10.0)
            assert sorted(d.message.id for d in got) == sorted(m.id for m in small[:3])
            await t.publish(topic, [small[3]])  # the same batch subject: still confirmed
            assert [d.message.id for d in await collect(sub, 1, timeout=10.0)] == [small[3].id]
            assert await sub.receive(10, timeout=0.5) == []


async def test_a_message_over_the_servers_max_payload_is_refused_and_the_connection_lives() -> None:
    """An event of 1,048,568 bytes passes a 1 MiB codec limit but, with msdata's headers, is
    over the server's max_payload: refused before sending (the server would close the
    connection), on a from_url transport with unlimited reconnects too; an event bus
    sharing the transport publishes on."""
    url = require("nats")
    prefix = f"T{uuid.uuid4().hex[:12]}_"
    t = NatsTransport.from_url(url, stream_prefix=prefix, publish_timeout=5.0)
    topic, group = unique("topic"), unique("group")
    try:
        async with t, t.subscribe(topic, group) as sub:
            assert t.client is not None
            max_payload = t.client.max_payload
            big = TransportMessage(str(uuid.uuid4()), b"x" * (max_payload - 8))
            ok = make_messages(2)
            with pytest.raises(PublishError) as refused:
                await t.publish(topic, [ok[0], big, ok[1]])
            assert list(refused.value.refused) == [big.id]
            assert f"max_payload of {t.address}" in refused.value.refused[big.id]
            assert t.client.is_connected
            got = await collect(sub, 2, timeout=10.0)
            assert sorted(d.message.id for d in got) == sorted(m.id for m in ok)
            (after,) = make_messages(1)
            await t.publish(topic, [after])
            assert [d.message.id for d in await collect(sub, 1, timeout=10.0)] == [after.id]
            assert t.client.stats["reconnects"] == 0
    finally:
        other = await nats.connect(url)
        await delete_streams(other, prefix)
        await other.close()


async def test_a_message_at_the_publish_limit_can_be_dead_lettered_whole() -> None:
    """The transport publishes nothing larger than max_payload less DEAD_LETTER_RESERVE, so
    the dead-letter copy of its largest message, with the x-msdata-* headers and a 1 KiB
    reason, still fits: it is dead-lettered whole, not redelivered forever."""
    async with nats_transport(ordered=True) as t:
        topic, group = unique("topic"), unique("group")
        assert t.client is not None
        limit = t.client.max_payload - DEAD_LETTER_RESERVE
        probe = TransportMessage(str(uuid.uuid4()), b"", "k")
        big = probe._replace(body=b"x" * (limit - wire_size(probe)))
        assert wire_size(big) == limit
        with pytest.raises(PublishError) as refused:
            await t.publish(topic, [big._replace(id=str(uuid.uuid4()), body=big.body + b"x")])
        assert "dead-letter" in next(iter(refused.value.refused.values()))
        async with t.subscribe(topic, group, max_attempts=1) as sub:
            await t.publish(topic, [big])
            (d,) = await collect(sub, 1, timeout=10.0, ack=False)
            await d.nack(reason="x" * 5000)
            async with t.subscribe(dead_letter_topic(topic, group), unique("ops")) as dlq:
                (dead,) = await collect(dlq, 1, timeout=10.0)
            assert dead.message.id == big.id and dead.message.body == big.body
            assert len(dead.message.headers[DEAD_LETTER_REASON].encode()) >= 1000
            assert t.undeliverable == 0


async def test_a_message_at_the_publish_limit_can_be_replayed_whole() -> None:
    """A replay adds bytes (``x-msdata-replay``, a longer ``Nats-Msg-Id``, ``x-msdata-id``):
    it is measured as the message it replays, so the largest message the transport publishes
    can be dead-lettered and replayed, and arrives whole with its id (the 2 KiB reserve
    keeps the server's max_payload out of reach)."""
    from msdata.service import read_dead_letters

    async with nats_transport() as t:
        topic, group = unique("topic"), unique("group")
        assert t.client is not None
        limit = t.client.max_payload - DEAD_LETTER_RESERVE
        probe = TransportMessage(str(uuid.uuid4()), b"", "k")
        big = probe._replace(body=b"x" * (limit - wire_size(probe)))
        async with t.subscribe(topic, group) as sub:
            await t.publish(topic, [big])
            (d,) = await collect(sub, 1, timeout=10.0, ack=False)
            await d.dead_letter("RejectMessage: at the limit")
            (info,) = await read_dead_letters(t, [(topic, group)], replay=True)
            assert info.id == big.id
            (again,) = await collect(sub, 1, timeout=10.0)
            assert again.message.id == big.id and again.message.body == big.body
            assert wire_size(again.message._replace(headers={})) == limit
        assert await read_dead_letters(t, [(topic, group)]) == []


async def test_a_replay_is_not_deduplicated_but_a_forged_id_header_is_ignored() -> None:
    """A relay's second publish of an id is dropped (Nats-Msg-Id); a replay, carrying
    x-msdata-replay, is not, and is delivered with the same id; its second publish (the
    same token) is dropped again. An x-msdata-id header a producer sets does not change the
    id consumers read."""
    topic, group = unique("topic"), unique("group")
    async with nats_transport() as t, t.subscribe(topic, group) as sub:
        (m,) = make_messages(1)
        replay = m._replace(headers={REPLAY_HEADER: "token-1"})
        forged = TransportMessage(str(uuid.uuid4()), b"{}", None, {"x-msdata-id": "forged"})
        await t.publish(topic, [m, m, replay, replay, forged])
        got = await collect(sub, 3, timeout=10.0)
        assert [d.message.id for d in got] == [m.id, m.id, forged.id]
        assert got[1].message.headers == {REPLAY_HEADER: "token-1"}
        assert got[2].message.headers == {}
        assert await sub.receive(10, timeout=0.5) == []


async def test_a_foreign_message_whose_dead_letter_cannot_fit_is_set_aside_not_looped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A foreign message that fits max_payload but whose dead-letter copy does not: with a
    little room, it is dead-lettered with its reason cut; with none, it is terminated with
    an ERROR line and counted. Either way it is not offered again."""
    async with nats_transport() as t:
        topic, group = unique("topic"), unique("group")
        nc = t.client
        assert nc is not None
        js = nc.jetstream()
        await t.declare_group(topic, group)
        room = nc.max_payload - 12  # the header block of a message without headers
        await js.publish(topic, b"a" * (room - 300), headers={"x-h": "v"})  # reason cut
        await js.publish(topic, b"b" * (room - 20), headers={"x-h": "v"})  # cannot fit
        async with t.subscribe(topic, group, max_attempts=5) as sub:
            got = await collect(sub, 2, timeout=10.0, ack=False)
            assert len(got) == 2
            with caplog.at_level(logging.ERROR, logger="msdata.adapters.nats"):
                for d in got:
                    await d.dead_letter("MalformedMessage: " + "why " * 200)
            assert t.undeliverable == 1
            assert any("dropped" in r.getMessage() for r in caplog.records)
            assert await sub.receive(10, timeout=1.0) == []  # not redelivered
        async with t.subscribe(dead_letter_topic(topic, group), unique("ops")) as dlq:
            (dead,) = await collect(dlq, 1, timeout=10.0)
        assert dead.message.body == b"a" * (room - 300)
        assert dead.message.headers[DEAD_LETTER_REASON].startswith("MalformedMessage: why")
        assert dead.message.headers[DEAD_LETTER_REASON].endswith("...")
        info = await js.consumer_info(stream_name(topic, t.stream_prefix), consumer_name(group))
        assert info.num_ack_pending == 0 and info.num_redelivered == 0


async def test_size_options_are_read_from_the_url_and_checked() -> None:
    t = NatsTransport.from_url(
        "nats://127.0.0.1:4222?max_message_bytes=65536&max_held_bytes=1000000,"
        "nats://127.0.0.2:4222?max_held_bytes=1000000"
    )
    assert (t.max_message_bytes, t.max_held_bytes) == (65536, 1_000_000)
    assert t._connect["servers"] == ["nats://127.0.0.1:4222", "nats://127.0.0.2:4222"]
    t = NatsTransport.from_url("nats://127.0.0.1:4222?max_held_bytes=5", max_held_bytes=7)
    assert t.max_held_bytes == 7  # the keyword wins
    with pytest.raises(ConfigurationError):
        NatsTransport.from_url("nats://127.0.0.1:4222?max_message_bytes=-1")
    with pytest.raises(ConfigurationError):
        NatsTransport(None, max_held_bytes=0)


async def test_an_unreadable_message_is_handed_on_escaped_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The reader guard: a status line that is not UTF-8 no longer ends nats-py's reader;
    the message arrives (as a foreign one, its bad bytes escaped), is counted and logged
    once, and can be dead-lettered with its reason."""
    topic, group = unique("topic"), unique("group")
    caplog.set_level(logging.WARNING, logger="msdata.adapters.nats")
    async with nats_transport() as t:
        assert t.features.publish_unreadable is not None
        await t.declare_group(topic, group)
        assert await t.features.publish_unreadable(topic) == 2
        async with t.subscribe(topic, group) as sub:
            got = await collect(sub, 2, timeout=10.0, ack=False)
            assert [d.message.body for d in got] == [b"unreadable", b"unreadable"]
            for d in got:
                await d.dead_letter("MalformedMessage: not JSON")
            assert t.unreadable_messages == (1, 0)
            (ours,) = make_messages(1)
            await t.publish(topic, [ours])
            assert [d.message.id for d in await collect(sub, 1, timeout=10.0)] == [ours.id]
        async with t.subscribe(dead_letter_topic(topic, group), unique("ops")) as dlq:
            dead = await collect(dlq, 2, timeout=10.0)
            assert [d.message.headers[DEAD_LETTER_REASON] for d in dead] == [
                "MalformedMessage: not JSON"
            ] * 2
    lines = [r.getMessage() for r in caplog.records if "nats-py could not read" in r.getMessage()]
    assert len(lines) == 1 and "escaped" in lines[0], lines


async def test_a_pull_asks_for_no_more_than_the_byte_budget() -> None:
    """max_held_bytes below the server's max_payload: requests carry max_bytes; a message
    larger than the room left ends the request (409) and comes alone next; what the
    subscription holds (buffered and handed out) never exceeds the budget plus one."""
    topic, group = unique("topic"), unique("group")
    budget = 250_000
    async with nats_transport(max_held_bytes=budget) as t:
        sizes = [60_000, 60_000, 60_000, 400_000, 60_000, 60_000]
        msgs = [TransportMessage(str(uuid.uuid4()), b"z" * n) for n in sizes]
        await t.publish(topic, msgs)
        async with t.subscribe(topic, group) as sub:
            handled: list[bytes] = []
            peak = 0
            while len(handled) < len(msgs):
                batch = await sub.receive(100, timeout=2.0)
                assert batch, f"stuck after {len(handled)}"
                peak = max(peak, sub._held_bytes)
                assert sub._held_bytes <= budget + 400_000 + 1000
                for d in batch:
                    handled.append(d.message.body)
                    await d.ack()
                assert sub._held_bytes == sum(size for _, size in sub._buffer)
            assert sorted(map(len, handled)) == sorted(sizes)
            assert peak > 0


# -- issue 8: release records (a delivery given back is not an attempt) -----------------------


async def test_a_release_is_honoured_by_a_consumer_on_another_connection() -> None:
    """The release record lives on the server: a consumer of the group on another connection
    (another process) gets the released message with the same attempt, counts its own nack
    and, once it acks, the record is deleted."""
    topic, group = unique("topic"), unique("group")
    async with nats_transport() as t:
        (m,) = make_messages(1)
        await t.declare_group(topic, group)
        await t.publish(topic, [m])
        other = NatsTransport(await nats.connect(require("nats")), stream_prefix=t.stream_prefix)
        try:
            for _ in range(3):
                async with t.subscribe(topic, group, max_attempts=2) as sub:
                    (d,) = await collect(sub, 1, timeout=10.0, ack=False)
                    assert d.attempt == 1
                    await d.release()
            async with other.subscribe(topic, group, max_attempts=2) as sub:
                (d,) = await collect(sub, 1, timeout=10.0, ack=False)
                assert (d.message.id, d.attempt) == (m.id, 1)
                await d.nack()
                (d,) = await collect(sub, 1, timeout=10.0, ack=False)
                assert (d.message.id, d.attempt) == (m.id, 2)
                await d.ack()
            assert other.client is not None
            js = other.client.jetstream()
            records = stream_name(topic, t.stream_prefix) + "_r"

            async def forgotten() -> bool:
                return (await js.stream_info(records)).state.messages == 0

            await eventually(forgotten, 10.0, what="the release record to be deleted")
            assert await t.delete_topic(topic)
            with pytest.raises(nats.js.errors.NotFoundError):
                await js.stream_info(records)
        finally:
            await other.close()
            assert other.client is not None
            await other.client.close()


@pytest.mark.parametrize("dies", ["before the record", "after the record"])
async def test_a_consumer_killed_while_releasing_loses_nothing(dies: str) -> None:
    """A process killed in the middle of a release: before its record is confirmed the
    message comes back counted (as from any consumer that died); after it, and before the
    -NAK, it comes back with the attempt it was released with. Either way it comes back."""
    topic, group = unique("topic"), unique("group")
    async with nats_transport(ack_wait=1.0) as t:
        (m,) = make_messages(1)
        await t.declare_group(topic, group)
        await t.publish(topic, [m])
        put_records = t._put_records
        sub = await t.subscribe(topic, group, max_attempts=5).__aenter__()

        async def killed(topic: str, records: list[tuple[str, bytes]]) -> bool:
            if dies == "after the record":
                assert await put_records(topic, records)
            # the process is gone: its inbox with it, nothing more is sent
            sub._closed = True
            t._subscriptions.discard(sub)
            assert sub._inbox_sub is not None
            await sub._inbox_sub.unsubscribe()
            sub._inbox_sub = None
            raise asyncio.CancelledError

        (d,) = await collect(sub, 1, timeout=10.0, ack=False)
        assert d.attempt == 1
        t._put_records = killed  # type: ignore[method-assign]
        with pytest.raises(asyncio.CancelledError):
            await d.release()
        t._put_records = put_records  # type: ignore[method-assign]
        async with t.subscribe(topic, group, max_attempts=5) as again:
            (back,) = await collect(again, 1, timeout=10.0)
        assert back.message.id == m.id
        assert back.attempt == (2 if dies == "before the record" else 1)


async def test_a_forged_or_stale_release_record_is_not_trusted() -> None:
    """Only a well-formed record within range, and younger than the consumer's count,
    lowers an attempt: a record saying attempt 0, or one written at a later num_delivered
    than the delivery's (left by an earlier consumer of that name), counts for nothing."""
    topic, group = unique("topic"), unique("group")
    async with nats_transport() as t:
        msgs = make_messages(3)
        await t.declare_group(topic, group)
        await t.publish(topic, msgs)
        async with t.subscribe(topic, group, max_attempts=5) as sub:
            first = await collect(sub, 3, timeout=10.0, ack=False)
            assert [d.attempt for d in first] == [1, 1, 1]
            prefix = sub._record_prefix + sub.consumer
            forged = [b"0 1", b"1 7", b"garbage"]
            assert await t._put_records(
                topic, [(f"{prefix}.{d._seq}", r) for d, r in zip(first, forged, strict=True)]
            )
        # handed out and not settled when it closed: counted (a new subscription, which
        # remembers no nack of its own, reads the records)
        async with t.subscribe(topic, group, max_attempts=5) as sub:
            again = await collect(sub, 3, timeout=10.0)
        assert sorted(d.message.id for d in again) == sorted(m.id for m in msgs)
        assert [d.attempt for d in again] == [2, 2, 2]


async def test_a_redelivery_whose_release_record_cannot_be_read_waits_for_it() -> None:
    """A redelivery is never handed out with a count it could not check: while its release
    record cannot be read (the server does not answer), it stays in the subscription, and
    a later receive hands it out with the attempt it was released with."""
    topic, group = unique("topic"), unique("group")
    async with nats_transport() as t:
        (m,) = make_messages(1)
        await t.declare_group(topic, group)
        await t.publish(topic, [m])
        read_record = t._read_record
        failures = 0

        async def unanswered(records: str, subject: str) -> tuple[int, int, int] | None:
            nonlocal failures
            failures += 1
            raise TransportError("no answer")

        async with t.subscribe(topic, group, max_attempts=1) as sub:
            (d,) = await collect(sub, 1, timeout=10.0, ack=False)
            await d.release()
        t._read_record = unanswered  # type: ignore[method-assign]
        # another subscription (another process) reads the record the first one wrote
        async with t.subscribe(topic, group, max_attempts=1) as sub:

            async def tried() -> bool:
                assert await sub.receive(10, timeout=0.2) == []  # not handed out
                return failures >= 1

            await eventually(tried, 10.0, what="a read of the release record")
            assert len(sub._buffer) == 1
            t._read_record = read_record  # type: ignore[method-assign]
            (back,) = await collect(sub, 1, timeout=10.0)
        assert (back.message.id, back.attempt) == (m.id, 1)


async def test_replays_history_gives_every_new_group_what_the_stream_holds() -> None:
    """``replays_history=True``, an opt-in beyond the transport contract: a group declared
    after messages went to another group starts at the stream's beginning (features say
    so); without it, such a group gets only what is published after its declaration."""
    topic = unique("topic")
    async with nats_transport(replays_history=True) as t:
        assert t.features.replays_history
        await t.declare_group(topic, "first")
        before = make_messages(4)
        await t.publish(topic, before)
        await t.declare_group(topic, "late")
        after = make_messages(2, prefix="after")
        await t.publish(topic, after)
        async with t.subscribe(topic, "late") as sub:
            got = await collect(sub, 6, timeout=10.0)
            assert sorted(d.message.id for d in got) == sorted(m.id for m in [*before, *after])
    async with nats_transport() as t:
        assert not t.features.replays_history


# -- issue 8: a receive cancelled, or in flight when its subscription closes ------------------


def spread_messages(n: int, partitions: int) -> list[TransportMessage]:
    """``n`` messages whose keys fall in ``n`` different key partitions (of ``partitions``):
    an ordered group can have them all in flight at once."""
    keys: dict[int, str] = {}
    i = 0
    while len(keys) < n:
        key = f"k{i}"
        keys.setdefault(zlib.crc32(key.encode()) % partitions, key)
        i += 1
    return [TransportMessage(str(uuid.uuid4()), b"{}", key=k) for k in keys.values()]


async def released_and_fresh(
    t: NatsTransport, topic: str, group: str, prefetch: int
) -> tuple[list[TransportMessage], NatsSubscription]:
    """Four messages, two of them released once (their redelivery reads a release record),
    two never delivered, all four received by a new subscription and not handed out."""
    msgs = spread_messages(4, t.key_partitions)
    await t.declare_group(topic, group)
    await t.publish(topic, msgs[:2])
    async with t.subscribe(topic, group, max_attempts=2, prefetch=prefetch) as first:
        for d in await collect(first, 2, timeout=10.0, ack=False):
            await d.release()
    await t.publish(topic, msgs[2:])
    sub = await t.subscribe(topic, group, max_attempts=2, prefetch=prefetch).__aenter__()

    async def all_arrived() -> bool:
        await sub._pull_safely(0.5)
        return len(sub._buffer) == len(msgs)

    await eventually(all_arrived, 10.0, what="the four messages to arrive")
    return msgs, sub


async def assert_back_uncounted(
    t: NatsTransport, topic: str, group: str, msgs: list[TransportMessage]
) -> None:
    async with t.subscribe(topic, group, max_attempts=2, prefetch=8) as again:
        got = await collect(again, len(msgs), timeout=10.0)
    back = sorted((d.message.id, d.attempt) for d in got)
    assert back == sorted((m.id, 1) for m in msgs)


@pytest.mark.parametrize("ordered", [False, True])
async def test_a_receive_cancelled_while_it_reads_release_records_gives_back_uncounted(
    ordered: bool,
) -> None:
    """A receive cancelled while it reads the release records of the redeliveries it took
    hands out nothing, holds none of them as handed out, and they all (the fresh ones of
    its batch too) come back as attempt 1 once the subscription closes. (It dropped them:
    they came back after ack_wait counted, the fresh ones nacked as handed out.)"""
    topic, group = unique("topic"), unique("group")
    async with nats_transport(ack_wait=3.0, ordered=ordered, key_partitions=4) as t:
        msgs, sub = await released_and_fresh(t, topic, group, prefetch=8)
        read_record = t._read_record
        reading = asyncio.Event()

        async def unanswered(records: str, subject: str) -> tuple[int, int] | None:
            reading.set()
            await asyncio.Event().wait()  # never answered: the receive is cancelled first
            return None

        t._read_record = unanswered  # type: ignore[method-assign]
        try:
            receiving = asyncio.ensure_future(sub.receive(8, timeout=5.0))
            await asyncio.wait_for(reading.wait(), 10.0)
            receiving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await receiving
            assert sub._inflight == set()
            assert len(sub._buffer) == len(msgs)
        finally:
            t._read_record = read_record  # type: ignore[method-assign]
            await sub.close()
        await assert_back_uncounted(t, topic, group, msgs)


@pytest.mark.parametrize("ordered", [False, True])
async def test_a_receive_reading_release_records_as_its_subscription_closes_hands_out_nothing(
    ordered: bool,
) -> None:
    """A receive still reading release records when its subscription begins to close
    returns [] once the read ends, and everything it took comes back as attempt 1. (It
    handed them out, or the close nacked the fresh ones of its batch as handed out.)"""
    topic, group = unique("topic"), unique("group")
    async with nats_transport(ack_wait=3.0, ordered=ordered, key_partitions=4) as t:
        msgs, sub = await released_and_fresh(t, topic, group, prefetch=8)
        read_record = t._read_record
        reading, answer = asyncio.Event(), asyncio.Event()

        async def slow(records: str, subject: str) -> tuple[int, int] | None:
            reading.set()
            await answer.wait()
            return await read_record(records, subject)

        t._read_record = slow  # type: ignore[method-assign]
        try:
            receiving = asyncio.ensure_future(sub.receive(8, timeout=5.0))
            await asyncio.wait_for(reading.wait(), 10.0)
            closing = asyncio.ensure_future(sub.close())
            await asyncio.sleep(0.05)
            answer.set()
            handed = await receiving
            await closing
        finally:
            t._read_record = read_record  # type: ignore[method-assign]
            await sub.close()
        assert handed == []
        await assert_back_uncounted(t, topic, group, msgs)


@pytest.mark.parametrize("ordered", [False, True])
async def test_what_arrives_while_a_subscription_closes_is_not_handed_out(
    ordered: bool,
) -> None:
    """Messages that arrive while a subscription waits for its pull requests to end, as it
    closes, are not handed out by a receive that was waiting: it returns [] and they come
    back as attempt 1. (The receive handed them out and the close nacked them counted.)"""
    topic, group = unique("topic"), unique("group")
    async with nats_transport(ack_wait=3.0, ordered=ordered, key_partitions=4) as t:
        msgs = spread_messages(4, t.key_partitions)
        await t.declare_group(topic, group)
        sub = await t.subscribe(topic, group, max_attempts=2, prefetch=8).__aenter__()
        try:
            receiving = asyncio.ensure_future(sub.receive(8, timeout=5.0))
            await asyncio.sleep(0.05)  # its pull requests are open (for 0.5 s)
            closing = asyncio.ensure_future(sub.close())
            await asyncio.sleep(0)
            await t.publish(topic, msgs)
            handed = await receiving
            await closing
        finally:
            await sub.close()
        assert handed == []
        await assert_back_uncounted(t, topic, group, msgs)


# -- a receive's waits end with its own time -----------------------------------------------------


@pytest.mark.parametrize("ordered", [False, True])
async def test_a_receive_whose_release_record_reads_go_unanswered_returns_in_its_time(
    ordered: bool,
) -> None:
    """Release-record reads that get no answer (a server gone silent) end with the receive's
    own time: it hands out the first deliveries it took, the redeliveries stay in its buffer
    uncounted, and a later receive hands them out as attempt 1. (The receive waited for the
    reads, up to 5 s against a silent server; here, for ever.)"""
    topic, group = unique("topic"), unique("group")
    async with nats_transport(ack_wait=3.0, ordered=ordered, key_partitions=4) as t:
        msgs, sub = await released_and_fresh(t, topic, group, prefetch=8)
        read_record = t._read_record

        async def unanswered(records: str, subject: str) -> tuple[int, int] | None:
            await asyncio.Event().wait()
            return None

        t._read_record = unanswered  # type: ignore[method-assign]
        try:
            try:
                handed = await asyncio.wait_for(sub.receive(8, timeout=0.2), 10.0)
            except TimeoutError:
                pytest.fail("receive waited for release records that never came")
            assert sorted((d.message.id, d.attempt) for d in handed) == sorted(
                (m.id, 1) for m in msgs[2:]
            )
            assert len(sub._buffer) == 2
            for d in handed:
                await d.ack()
            t._read_record = read_record  # type: ignore[method-assign]
            back = await collect(sub, 2, timeout=10.0)
        finally:
            t._read_record = read_record  # type: ignore[method-assign]
            await sub.close()
        assert sorted((d.message.id, d.attempt) for d in back) == sorted(
            (m.id, 1) for m in msgs[:2]
        )


async def test_an_overdue_delivery_whose_dead_letter_copy_goes_unconfirmed_stays_uncounted() -> (
    None
):
    """A receive that finds an overdue delivery (its consumer died holding it) and gets no
    confirmation of its dead-letter copy returns [] within its own time, keeping the
    delivery in its buffer, unsettled and uncounted; once the server answers, a later
    receive dead-letters it with the attempts it had. (The receive waited publish_timeout
    and nacked it, counting one more attempt; here it waited for ever.)"""
    topic, group = unique("topic"), unique("group")
    async with nats_transport(ack_wait=3.0) as t:
        (m,) = make_messages(1)
        await t.declare_group(topic, group)
        await t.publish(topic, [m])
        async with t.subscribe(topic, group, max_attempts=1) as first:
            await collect(first, 1, timeout=10.0, ack=False)
        # closed holding it: it comes back counted, overdue for max_attempts=1
        publish = t._publish

        async def unconfirmed(*args: Any, **kwargs: Any) -> None:
            if kwargs.get("dead_letters"):
                await asyncio.Event().wait()
            await publish(*args, **kwargs)

        t._publish = unconfirmed  # type: ignore[method-assign]
        try:
            async with t.subscribe(topic, group, max_attempts=1) as sub:

                async def arrived() -> bool:
                    await sub._pull_safely(0.5)
                    return len(sub._buffer) == 1

                await eventually(arrived, 10.0, what="the redelivery")
                try:
                    handed = await asyncio.wait_for(sub.receive(1, timeout=0.2), 10.0)
                except TimeoutError:
                    pytest.fail("receive waited for a dead-letter copy never confirmed")
                assert handed == []
                assert len(sub._buffer) == 1 and not sub._inflight
                t._publish = publish  # type: ignore[method-assign]
                async with t.subscribe(dead_letter_topic(topic, group), unique("ops")) as dlq:
                    dead: list[Delivery] = []

                    async def dead_lettered() -> bool:
                        assert await sub.receive(1, timeout=0.2) == []
                        dead.extend(await collect(dlq, 1, timeout=0.2))
                        return bool(dead)

                    await eventually(dead_lettered, 20.0, what="the dead letter")
                assert [d.message.id for d in dead] == [m.id]
                assert dead[0].message.headers[DEAD_LETTER_ATTEMPTS] == "1"
                assert not sub._buffer
        finally:
            t._publish = publish  # type: ignore[method-assign]
