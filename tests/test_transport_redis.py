from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from msdata.adapters.redis import (
    DEFAULT_MAX_MESSAGE_BYTES,
    FOREIGN_ENTRY_HEADER,
    RedisDelivery,
    RedisSubscription,
    RedisTransport,
)
from msdata.errors import (
    ConfigurationError,
    MessageTooLarge,
    PublishError,
    TransportClosed,
    TransportError,
)
from msdata.testing.conformance.transport import (
    TransportConformance,
    _SilentServer,
    collect,
    make_messages,
    publish_eventually,
)
from msdata.testing.waiting import eventually
from msdata.transport import (
    DEAD_LETTER_ATTEMPTS,
    DEAD_LETTER_REASON,
    DEAD_LETTER_TOPIC,
    Transport,
    TransportMessage,
    dead_letter_topic,
)
from services import require
from transport_factories import with_test_hooks

pytestmark = pytest.mark.redis


async def _delete_prefix(client: aioredis.Redis, prefix: str) -> None:
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)


@asynccontextmanager
async def redis_transport(**options: object) -> AsyncIterator[RedisTransport]:
    """A transport on the shared Redis under a fresh key prefix (or the ``namespace`` given),
    deleted afterwards."""
    url = require("redis")
    prefix = str(options.get("namespace") or f"msdata-test-{uuid.uuid4().hex[:12]}")
    client = aioredis.Redis.from_url(url, client_name=prefix)
    options.setdefault("claim_idle", 0.4)
    if "namespace" not in options:
        options["key_prefix"] = prefix
    transport = RedisTransport(client, **options)  # type: ignore[arg-type]
    with_test_hooks("redis", transport)
    try:
        yield transport
    finally:
        await transport.close()
        await _delete_prefix(client, prefix)
        await client.aclose()


class TestRedisTransport(TransportConformance):
    arrival_timeout = 5.0
    quiet_period = 0.3

    @asynccontextmanager
    async def make_unreachable_transport(
        self, host: str, port: int, timeout: float
    ) -> AsyncIterator[Transport]:
        url = f"redis://msdata:{self.unreachable_password}@{host}:{port}/0"
        t = RedisTransport.from_url(
            f"{url}?socket_connect_timeout={timeout}&socket_timeout={timeout}"
        )
        try:
            yield t
        finally:
            await t.close()

    def transport_url(self) -> str:
        return require("redis")

    def broker_address(self) -> tuple[str, int]:
        url = urlsplit(require("redis"))
        return url.hostname or "127.0.0.1", url.port or 6379

    @asynccontextmanager
    async def make_transport_at(  # type: ignore[override]
        self, host: str, port: int, timeout: float
    ) -> AsyncIterator[Transport]:
        prefix = f"msdata-test-{uuid.uuid4().hex[:12]}"
        db = urlsplit(require("redis")).path or "/0"
        t = RedisTransport.from_url(
            f"redis://{host}:{port}{db}?socket_connect_timeout={timeout}&socket_timeout={timeout}",
            key_prefix=prefix,
            claim_idle=0.4,
        )
        try:
            yield t
        finally:
            await t.close()
            client = aioredis.Redis.from_url(require("redis"))
            try:
                await _delete_prefix(client, prefix)
            finally:
                await client.aclose()

    def make_transport(self) -> AsyncIterator[Transport]:  # type: ignore[override]
        return redis_transport()  # type: ignore[return-value]

    def make_transport_in(self, namespace: str) -> AsyncIterator[Transport]:  # type: ignore[override]
        return redis_transport(namespace=namespace)  # type: ignore[return-value]

    def make_transport_with(self, **options: object) -> AsyncIterator[Transport]:  # type: ignore[override]
        return redis_transport(**options)  # type: ignore[return-value]


# -- adapter-specific ---------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def abandon(sub: RedisSubscription) -> None:
    """What a crashed process leaves behind: nothing more reaches Redis from this consumer."""
    assert sub._heart is not None
    sub._heart.cancel()
    sub._closed = True
    sub._t._subs.discard(sub)


async def test_foreign_entries_arrive_and_can_be_dead_lettered() -> None:
    topic, group = unique("topic"), unique("group")
    async with redis_transport() as t:
        r = t._client
        key = f"{t.key_prefix}:{topic}"
        await r.xadd(key, {"order": "o-1", "amount": "12"})  # several fields
        await r.xadd(key, {"payload": b"\xff\xfe raw"})  # one field, not UTF-8
        await r.xadd(key, {"id": b"\xff", "body": b"has a body"})  # msdata-like, bad id
        await r.xadd(key, {"id": "x", "body": "y", "headers": "not json"})
        (good,) = make_messages(1)
        await t.publish(topic, [good])
        async with t.subscribe(topic, group) as sub:
            got = await collect(sub, 5, timeout=5.0, ack=False)
            assert len(got) == 5
            foreign = [d for d in got if FOREIGN_ENTRY_HEADER in d.message.headers]
            assert [d.message.id for d in got if d not in foreign] == [good.id]
            bodies = [d.message.body for d in foreign]
            assert json.loads(bodies[0]) == {"order": "o-1", "amount": "12"}
            assert bodies[1] == b"\xff\xfe raw"
            assert bodies[2] == b"has a body"
            assert bodies[3] == b"y"
            for d in foreign:
                assert d.attempt == 1
                assert d.message.id == d.message.headers[FOREIGN_ENTRY_HEADER]
                await d.dead_letter("InvalidEnvelope: not a CloudEvent")
            for d in got:
                await d.ack()  # a no-op on the dead-lettered ones
            # the consumer carries on
            (later,) = make_messages(1)
            await t.publish(topic, [later])
            (d,) = await collect(sub, 1, timeout=5.0)
            assert d.message.id == later.id
        async with t.subscribe(dead_letter_topic(topic, group), unique("ops")) as dlq:
            dead = await collect(dlq, 4, timeout=5.0)
            assert [d.message.body for d in dead] == bodies
            for d in dead:
                assert d.message.headers[DEAD_LETTER_REASON] == "InvalidEnvelope: not a CloudEvent"
                assert d.message.headers[DEAD_LETTER_TOPIC] == topic
                assert FOREIGN_ENTRY_HEADER in d.message.headers


async def _stream_ids(t: RedisTransport, topic: str) -> set[bytes]:
    return {eid for eid, _ in await t._client.xrange(f"{t.key_prefix}:{topic}")}


async def test_trimming_never_drops_unacked_entries() -> None:
    topic = unique("topic")
    async with redis_transport(trim_interval=None) as t:
        msgs = make_messages(30)
        async with t.subscribe(topic, "a") as a, t.subscribe(topic, "b") as b:
            await t.publish(topic, msgs)
            got_a = await collect(a, 30, timeout=5.0, ack=False)
            for d in got_a[:20]:
                await d.ack()
            held = got_a[20:]  # received by a, never acked
            got_b = await collect(b, 10, timeout=5.0)  # b has 20 more to read
            await asyncio.sleep(0.05)  # let the batched acks go out
            await t.trim(topic, exact=True)
            left = await _stream_ids(t, topic)
            assert {d._eid for d in held} <= left, "trimmed what a has not acked"
            assert len(left) >= 21, "trimmed what b has not read yet"
            rest = await collect(b, 20, timeout=5.0)
            assert [d.message.id for d in got_b + rest] == [m.id for m in msgs]
            await asyncio.sleep(0.05)
            removed = await t.trim(topic, exact=True)
            left = await _stream_ids(t, topic)
            assert removed > 0
            assert left == {d._eid for d in held}, "kept exactly what a still holds"
            for d in held:
                await d.ack()
            await asyncio.sleep(0.05)
            await t.trim(topic, exact=True)
            assert len(await _stream_ids(t, topic)) <= 1  # the last delivered id may stay
        # a stream no group reads yet is kept whole: its first group receives it
        lonely = unique("topic")
        await t.publish(lonely, make_messages(5))
        assert await t.trim(lonely, exact=True) == 0
        assert len(await _stream_ids(t, lonely)) == 5


async def test_periodic_trimming_keeps_every_unacked_delivery() -> None:
    topic, group = unique("topic"), unique("group")
    rng = random.Random(3)
    async with redis_transport(trim_interval=0.05, claim_interval=0.05) as t:
        msgs = make_messages(300)
        async with t.subscribe(topic, group, prefetch=50) as sub:
            await t.publish(topic, msgs)
            held: list[RedisDelivery] = []
            seen = 0
            while seen < 300:
                for d in await sub.receive(50, timeout=1.0):
                    seen += 1
                    if rng.random() < 0.1 and len(held) < 40:
                        held.append(d)
                    else:
                        await d.ack()
                await asyncio.sleep(0.03)
                left = await _stream_ids(t, topic)
                assert {d._eid for d in held} <= left, "an unacked entry was trimmed"
            assert held
            assert len(await _stream_ids(t, topic)) < 500, "nothing was trimmed at all"
            for d in held:
                await d.nack()
            again = await collect(sub, len(held), timeout=5.0)
            assert sorted(d.message.id for d in again) == sorted(d.message.id for d in held)


async def test_deliveries_of_a_dead_consumer_are_reclaimed() -> None:
    topic, group = unique("topic"), unique("group")
    async with redis_transport(claim_idle=0.3, trim_interval=0.1) as t:
        t.forget_after = 0.5
        msgs = make_messages(5)
        dead = t.subscribe(topic, group)
        await dead.__aenter__()
        await t.publish(topic, msgs)
        got = await collect(dead, 5, timeout=5.0, ack=False)
        assert len(got) == 5
        abandon(dead)
        async with t.subscribe(topic, group) as alive:
            again = await collect(alive, 5, timeout=t.features.redelivery_timeout + 5.0)
            assert sorted(d.message.id for d in again) == sorted(m.id for m in msgs)
            assert all(d.attempt == 2 for d in again)
            await asyncio.sleep(t.features.redelivery_timeout)
            assert await alive.receive(10, timeout=0.3) == []
            # the dead consumer holds nothing now: it is removed from the group
            await alive.receive(10, timeout=0.6)
            key = f"{t.key_prefix}:{topic}"
            names = {c["name"] for c in await t._client.xinfo_consumers(key, group)}
            assert dead.consumer.encode() not in names


async def test_entry_whose_consumers_keep_dying_goes_to_dead_letter() -> None:
    topic, group = unique("topic"), unique("group")
    async with redis_transport(claim_idle=0.2) as t:
        r, key = t._client, f"{t.key_prefix}:{topic}"
        async with t.subscribe(topic, group, max_attempts=2) as sub:
            (poison,) = make_messages(1)
            await t.publish(topic, [poison])
            # two consumers took it and died: delivery count 2
            ((_, entries),) = await r.xreadgroup(group, "ghost-1", {key: ">"}, count=1)
            eid = entries[0][0]
            await r.xclaim(key, group, "ghost-2", 0, [eid])
            # the third attempt would exceed max_attempts=2: dead-lettered, not delivered
            assert await sub.receive(10, timeout=t.features.redelivery_timeout + 1.0) == []
        async with t.subscribe(dead_letter_topic(topic, group), unique("ops")) as dlq:
            (dead,) = await collect(dlq, 1, timeout=5.0)
            assert dead.message.id == poison.id
            # handed to a consumer twice (x-msdata-attempts means that everywhere)
            assert dead.message.headers[DEAD_LETTER_ATTEMPTS] == "2"
            assert "never settled" in dead.message.headers[DEAD_LETTER_REASON]


async def test_a_slow_live_consumer_keeps_its_deliveries() -> None:
    topic, group = unique("topic"), unique("group")
    async with (
        redis_transport(claim_idle=0.2) as t,
        t.subscribe(topic, group) as slow,
        t.subscribe(topic, group) as other,
    ):
        await t.publish(topic, make_messages(1))
        (d,) = await collect(slow, 1, timeout=5.0, ack=False)
        # the handler runs five times longer than claim_idle; its consumer is alive
        assert await other.receive(10, timeout=1.0) == []
        await d.ack()
        assert await other.receive(10, timeout=0.3) == []


async def test_a_heartbeat_whose_cancel_the_driver_turns_into_an_error_lets_close_return() -> None:
    """redis-py may turn a cancel in the middle of a command into a RedisError: the
    heartbeat of a closing subscription, cancelled in its round trip, ends there instead of
    sleeping on, so close() returns (``msdata dlq replay`` hung for ever in 2 of 7 runs)."""
    topic, group = unique("topic"), unique("group")
    async with redis_transport(claim_idle=0.15) as t:
        in_call = asyncio.Event()
        real = t._heartbeat_script

        async def heartbeat(*a: Any, **k: Any) -> Any:
            in_call.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                raise rex.ConnectionError("Connection closed by the cancel") from None
            return await real(*a, **k)

        t._heartbeat_script = heartbeat  # type: ignore[method-assign]
        sub = t.subscribe(topic, group)
        await sub.__aenter__()
        await t.publish(topic, make_messages(1))
        (d,) = await collect(sub, 1, timeout=5.0, ack=False)
        await asyncio.wait_for(in_call.wait(), 5.0)  # the heartbeat is in its round trip
        await asyncio.wait_for(sub.__aexit__(None, None, None), 5.0)
        t._heartbeat_script = real  # type: ignore[method-assign]
        async with t.subscribe(topic, group) as again:
            (back,) = await collect(again, 1, timeout=5.0)
            assert back.message.id == d.message.id


async def test_what_a_read_cut_short_by_the_close_took_goes_back_uncounted() -> None:
    """A receive whose read took its entries at Redis, its reply not in yet, when the
    subscription closes: the close stops the read, the receive returns [], the entries go
    back uncounted and the consumer leaves the group. More such closes than max_attempts
    count nothing and dead-letter nothing. (The entries stayed pending, to be reclaimed
    after claim_idle counted, and dead-lettered after max_attempts closes.)"""
    topic, group = unique("topic"), unique("group")
    async with redis_transport() as t:
        await t.declare_group(topic, group)
        msgs = make_messages(4)
        await t.publish(topic, msgs)
        real, taken = t._read_script, asyncio.Event()

        async def reply_never_comes(*args: object, **kwargs: object) -> object:
            result = await real(*args, **kwargs)
            taken.set()
            await asyncio.Event().wait()
            return result

        t._read_script = reply_never_comes  # type: ignore[assignment]
        key = f"{t.key_prefix}:{topic}"
        for _ in range(3):
            taken.clear()
            async with t.subscribe(topic, group, max_attempts=2) as s:
                receiving = asyncio.ensure_future(s.receive(10, timeout=5.0))
                await taken.wait()
            async with asyncio.timeout(10):  # the old code waited here for ever
                assert await receiving == []
            names = {c["name"] for c in await t._client.xinfo_consumers(key, group)}
            assert s.consumer.encode() not in names
        t._read_script = real  # type: ignore[method-assign]
        async with t.subscribe(topic, group, max_attempts=2) as last:
            got = await collect(last, 4, timeout=5.0)
            assert await last.receive(10, timeout=0.3) == []
        assert sorted((d.message.id, d.attempt) for d in got) == sorted((m.id, 1) for m in msgs)
        async with t.subscribe(dead_letter_topic(topic, group), unique("ops")) as dlq:
            assert await dlq.receive(10, timeout=0.3) == []


async def test_a_read_whose_reply_was_lost_is_taken_up_uncounted() -> None:
    """The READ script ran at Redis (it took the entries) and its reply was lost (a socket
    timeout, a dropped connection): the next round trip takes the entries up as first
    attempts, and nothing comes again. (They stayed pending, to be reclaimed after
    claim_idle as second attempts.)"""
    topic, group = unique("topic"), unique("group")
    async with redis_transport() as t:
        await t.declare_group(topic, group)
        msgs = make_messages(3)
        real, lost = t._read_script, []

        async def reply_lost(*args: object, **kwargs: object) -> Any:
            result = await real(*args, **kwargs)
            if not lost and (result[0] or result[1]):
                lost.append(result)
                raise rex.TimeoutError("Timeout reading from the server (simulated)")
            return result

        t._read_script = reply_lost  # type: ignore[assignment]
        async with t.subscribe(topic, group) as sub:
            await t.publish(topic, msgs)
            got = await collect(sub, 3, timeout=5.0)
            assert lost, "the read did not take the entries"
            # what was left pending would have been reclaimed (claim_idle is 0.4 s) by now
            assert await sub.receive(10, timeout=1.0) == []
        assert sorted((d.message.id, d.attempt) for d in got) == sorted((m.id, 1) for m in msgs)
        assert await t.lag(topic, group) == 0


async def test_a_receive_whose_round_trip_hangs_returns_and_its_read_lands_later() -> None:
    """A round trip that does not come back in time (a server gone silent: redis-py waits for
    its socket_timeout): the receive returns [] (within its timeout and RECEIVE_MARGIN),
    leaving the read running; what that read takes is handed out by the next receive, first
    attempt."""
    topic, group = unique("topic"), unique("group")
    async with redis_transport() as t:
        await t.declare_group(topic, group)
        (msg,) = make_messages(1)
        await t.publish(topic, [msg])
        real, gate = t._read_script, asyncio.Event()

        async def slow(*args: object, **kwargs: object) -> Any:
            await gate.wait()
            return await real(*args, **kwargs)

        t._read_script = slow  # type: ignore[assignment]
        async with t.subscribe(topic, group) as sub:
            async with asyncio.timeout(10):  # the old code waited here for the read
                assert await sub.receive(10, timeout=0.1) == []
            assert sub._fetch is not None and not sub._fetch.done(), "the read was stopped"
            gate.set()
            (d,) = await collect(sub, 1, timeout=5.0)
            assert (d.message.id, d.attempt) == (msg.id, 1)
            assert await sub.receive(10, timeout=0.3) == []


async def test_delayed_nack_survives_its_consumer() -> None:
    topic, group = unique("topic"), unique("group")
    async with redis_transport() as t:
        (msg,) = make_messages(1)
        async with t.subscribe(topic, group) as first:
            await t.publish(topic, [msg])
            (d,) = await collect(first, 1, timeout=5.0, ack=False)
            started = time.monotonic()
            await d.nack(delay=0.8)
        async with t.subscribe(topic, group) as second:
            (again,) = await collect(second, 1, timeout=5.0)
            assert time.monotonic() - started >= 0.7
            assert again.message.id == msg.id and again.attempt == 2


async def test_consumer_resumes_after_its_connections_are_killed() -> None:
    topic, group = unique("topic"), unique("group")
    async with redis_transport() as t, t.subscribe(topic, group) as sub:
        first, second = make_messages(2)
        await t.publish(topic, [first])
        assert [d.message.id for d in await collect(sub, 1, timeout=5.0)] == [first.id]
        waiting = asyncio.create_task(collect(sub, 1, timeout=10.0))
        await asyncio.sleep(0.2)  # the consumer is blocked in XREADGROUP
        admin = aioredis.Redis.from_url(require("redis"))
        try:
            mine = [c["id"] for c in await admin.client_list() if c.get("name") == t.key_prefix]
            assert mine, "the test client did not name its connections"
            for cid in mine:
                await admin.client_kill_filter(_id=cid)
        finally:
            await admin.aclose()
        await t.publish(topic, [second])
        got = await waiting
        assert [d.message.id for d in got] == [second.id]


async def test_publish_to_an_unreachable_redis_raises_publish_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    client = aioredis.Redis(port=port, retry=Retry(NoBackoff(), 0), socket_connect_timeout=1)
    t = RedisTransport(client, key_prefix=unique("none"))
    try:
        with pytest.raises(PublishError):
            await t.publish("topic", make_messages(3))
    finally:
        await t.close()
        await client.aclose()


async def test_configuration_errors() -> None:
    with pytest.raises(ConfigurationError):
        RedisTransport.from_url("http://127.0.0.1:6379")
    client = aioredis.Redis.from_url(require("redis"), decode_responses=True)
    try:
        with pytest.raises(ConfigurationError):
            RedisTransport(client)
    finally:
        await client.aclose()
    t = RedisTransport.from_url(require("redis"), key_prefix=unique("url"))
    async with t:
        await t.publish("topic", [])
    with pytest.raises(TransportClosed):
        await t.publish("topic", make_messages(1))


async def test_another_producers_attempt_field_is_not_trusted() -> None:
    topic, group = unique("topic"), unique("group")
    async with redis_transport() as t:
        key = f"{t.key_prefix}:{topic}"
        async with t.subscribe(topic, group, max_attempts=3) as sub:
            for n in ("999", "-1000000", "3", "abc"):
                await t._client.xadd(key, {"id": f"foreign-{n}", "body": b"{}", "attempt": n})
            got = await collect(sub, 4, timeout=5.0, ack=False)
            # handed out to be handled, each as its first attempt
            assert sorted((d.message.id, d.attempt) for d in got) == [
                ("foreign--1000000", 1),
                ("foreign-3", 1),
                ("foreign-999", 1),
                ("foreign-abc", 1),
            ]
            # msdata's own count goes on: 1, 2, 3, then the dead-letter topic
            low = next(d for d in got if d.message.id == "foreign--1000000")
            seen = [low.attempt]
            await low.nack()
            for d in got:
                if d is not low:
                    await d.ack()
            while len(seen) < 3:
                (again,) = await collect(sub, 1, timeout=5.0, ack=False)
                seen.append(again.attempt)
                await again.nack()
            assert seen == [1, 2, 3]
            assert await sub.receive(10, timeout=0.3) == []
        # and a retry entry's own field is range-checked too
        retry = f"{t.key_prefix}:{topic}:{group}:retry"
        for n in ("-5", "0"):
            await t._client.xadd(retry, {"id": f"forged{n}", "body": b"{}", "attempt": n})
        async with t.subscribe(topic, group, max_attempts=3) as sub:
            forged = await collect(sub, 2, timeout=5.0)
            assert [d.attempt for d in forged] == [1, 1]


async def test_a_pipeline_that_fails_before_execute_gives_its_connection_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """redis-py loads a pipeline's scripts on a connection before the part of execute()
    that resets the pipeline on failure: a connection lost there stayed with the pipeline
    ("Unclosed Pipeline client" after an outage)."""
    from redis.asyncio.client import Pipeline

    async def load_scripts_then_lose_the_connection(self: Pipeline) -> None:
        await self.immediate_execute_command("PING")  # the pipeline now holds a connection
        raise rex.ConnectionError("connection lost while loading scripts")

    async with redis_transport() as t:
        pool = t._client.connection_pool
        monkeypatch.setattr(Pipeline, "load_scripts", load_scripts_then_lose_the_connection)
        with pytest.raises(TransportError):
            async with t.subscribe(unique("topic"), unique("group")):
                pass
        monkeypatch.undo()
        assert not pool._in_use_connections, "a failed pipeline kept its connection"


# -- issue 9: sizes, per-message outcomes, a consumer bounded in bytes --------------------


async def test_foreign_entries_over_the_limit_never_reach_the_consumer() -> None:
    """30 foreign entries of 2 MB (over the default max_message_bytes, ~1.06 MB) are
    dead-lettered on the server with their reason: the consumer's Python heap never holds
    one (tracemalloc), the good messages around them arrive, and the dead letters keep the
    whole body."""
    topic, group = unique("topic"), unique("group")
    big = b"x" * 2_000_000
    async with redis_transport() as t:
        await t.declare_group(topic, group)
        key = t._stream_key(topic)
        good = make_messages(3)
        await t.publish(topic, good[:1])
        for i in range(30):
            await t._client.xadd(key, {"payload": big, "n": str(i)} if i % 2 else {"body": big})
        await t.publish(topic, good[1:])
        tracemalloc.start()
        try:
            async with t.subscribe(topic, group) as sub:
                got = await collect(sub, 3, timeout=10.0)
                assert sorted(d.message.id for d in got) == sorted(m.id for m in good)
                await asyncio.sleep(0.05)
                assert await sub.receive(10, timeout=0.3) == []
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1_000_000, f"the consumer held {peak:,} bytes at its peak"
        # (a dead letter is read with a limit that lets it through)
        async with (
            redis_transport(namespace=t.key_prefix, max_message_bytes=3_000_000) as ops,
            ops.subscribe(dead_letter_topic(topic, group), unique("ops")) as dlq,
        ):
            dead = await collect(dlq, 30, timeout=10.0)
        assert len(dead) == 30
        for d in dead:
            reason = d.message.headers[DEAD_LETTER_REASON]
            assert reason.startswith("MessageTooLarge: the stream entry is 20000"), reason
            assert reason.endswith(f"bytes; max_message_bytes is {DEFAULT_MAX_MESSAGE_BYTES}")
            assert d.message.headers[DEAD_LETTER_TOPIC] == topic
            assert FOREIGN_ENTRY_HEADER in d.message.headers
        bodies = [d.message.body for d in dead]
        assert bodies.count(big) == 15  # the body field, as the consumer would read it
        assert all(json.loads(b)["payload"] == big.decode() for b in bodies if b != big)


async def test_a_consumer_holds_at_most_its_byte_budget_plus_one_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With max_held_bytes 100 kB and max_message_bytes 20 kB, a consumer that does not ack
    holds at most 120 kB of 10 kB messages however often it receives; once it acks, it reads
    the rest; an entry over 20 kB is dead-lettered (logged once, with its size)."""
    topic, group = unique("topic"), unique("group")
    async with redis_transport(max_held_bytes=100_000, max_message_bytes=20_000) as t:
        await t.declare_group(topic, group)
        msgs = [
            TransportMessage(id=str(uuid.uuid4()), body=b"%05d" % i + b"y" * 10_000)
            for i in range(40)
        ]
        await t.publish(topic, msgs[:20])
        await t._client.xadd(t._stream_key(topic), {"id": "big", "body": b"z" * 30_000})
        await t.publish(topic, msgs[20:])
        async with t.subscribe(topic, group, prefetch=1000) as sub:
            held: list[RedisDelivery] = []
            for _ in range(30):
                held += await sub.receive(100, timeout=0.05)
                assert sub._held == sum(d._size for d in held)
                assert sub._held <= 120_000, f"held {sub._held:,} bytes"
            assert 9 <= len(held) <= 12, len(held)
            for d in held:
                await d.ack()
            rest = await collect(sub, 40 - len(held), timeout=10.0)
        assert sorted(d.message.id for d in held + rest) == sorted(m.id for m in msgs)
    lines = [r.getMessage() for r in caplog.records if r.name == "msdata.deadletter"]
    assert len(lines) == 1 and "big" in lines[0]
    assert "MessageTooLarge: the stream entry is 30009 bytes" in lines[0], lines


async def test_a_too_large_entry_read_by_the_blocking_wait_is_dead_lettered() -> None:
    """An entry that arrives while the consumer waits (a plain XREADGROUP, not the script)
    is measured right after the read and dead-lettered; the consumer goes on."""
    topic, group = unique("topic"), unique("group")
    async with redis_transport(max_message_bytes=5_000) as t, t.subscribe(topic, group) as sub:

        async def later() -> None:
            await asyncio.sleep(0.3)
            await t._client.xadd(t._stream_key(topic), {"body": b"q" * 6_000})
            await t.publish(topic, make_messages(1, prefix="after"))

        writer = asyncio.create_task(later())
        got = await collect(sub, 1, timeout=10.0)
        await writer
        assert [json.loads(d.message.body) for d in got] == [{"after": 0}]
        async with (
            redis_transport(namespace=t.key_prefix) as ops,
            ops.subscribe(dead_letter_topic(topic, group), unique("ops")) as dlq,
        ):
            (dead,) = await collect(dlq, 1, timeout=5.0)
        assert dead.message.body == b"q" * 6_000
        assert dead.message.headers[DEAD_LETTER_REASON].startswith("MessageTooLarge")
        assert dead.message.headers[DEAD_LETTER_ATTEMPTS] == "1"


async def test_a_reclaimed_entry_over_the_limit_is_dead_lettered() -> None:
    """A consumer that allowed large entries read one and died; one that does not reclaims
    it and dead-letters it on the server, its attempts counted."""
    topic, group = unique("topic"), unique("group")
    big = TransportMessage(id=str(uuid.uuid4()), body=b"w" * 8_000, key="k", headers={"h": "v"})
    async with redis_transport(claim_interval=0.1) as wide:
        await wide.publish(topic, [big])
        async with wide.subscribe(topic, group) as first:
            assert len(await collect(first, 1, timeout=5.0, ack=False)) == 1
            abandon(first)
        async with (
            redis_transport(
                namespace=wide.key_prefix, max_message_bytes=4_000, claim_interval=0.1
            ) as narrow,
            narrow.subscribe(topic, group) as second,
        ):
            assert await collect(second, 1, timeout=2.0) == []
            # (read before narrow's exit, which deletes the keys of the namespace)
            async with wide.subscribe(dead_letter_topic(topic, group), unique("ops")) as dlq:
                (dead,) = await collect(dlq, 1, timeout=5.0)
    assert dead.message.id == big.id and dead.message.body == big.body
    assert dead.message.key == "k" and dead.message.headers["h"] == "v"
    assert dead.message.headers[DEAD_LETTER_REASON] == (
        f"MessageTooLarge: the stream entry is {6 + len(big.id) + 8_000 + 4 + 16} bytes; "
        "max_message_bytes is 4000"
    )
    assert dead.message.headers[DEAD_LETTER_ATTEMPTS] == "2"


async def test_publish_reports_an_error_reply_for_one_entry_alone() -> None:
    """An XADD that Redis answers with an error of its own fails alone: PublishError names
    that message only and the others are written; an error of the server's state (OOM,
    READONLY...) fails the batch as a whole (``refused`` empty)."""
    topic, group = unique("topic"), unique("group")

    async with redis_transport() as t:
        await t.declare_group(topic, group)
        msgs = make_messages(3)
        real = t._client.pipeline

        def pipeline(*args: object, **kwargs: object) -> object:
            pipe = real(*args, **kwargs)  # type: ignore[arg-type]
            command = pipe.execute_command

            def execute_command(*parts: object) -> object:
                if parts[0] == "XADD" and msgs[1].id in parts:
                    # an id Redis refuses for this one entry
                    parts = (parts[0], parts[1], "0-0", *parts[3:])
                return command(*parts)

            pipe.execute_command = execute_command  # type: ignore[method-assign]
            return pipe

        t._client.pipeline = pipeline  # type: ignore[method-assign]
        with pytest.raises(PublishError) as refused:
            await t.publish(topic, msgs)
        assert list(refused.value.refused) == [msgs[1].id]
        assert "ResponseError" in refused.value.refused[msgs[1].id]
        t._client.pipeline = real  # type: ignore[method-assign]
        async with t.subscribe(topic, group) as sub:
            got = await collect(sub, 2, timeout=5.0)
            assert [d.message.id for d in got] == [msgs[0].id, msgs[2].id]
            await t.publish(topic, msgs[1:2])
            (again,) = await collect(sub, 1, timeout=5.0)
            assert again.message.id == msgs[1].id


async def test_max_message_bytes_and_max_held_bytes_from_the_url() -> None:
    url = require("redis")
    sep = "&" if "?" in url else "?"
    t = RedisTransport.from_url(
        f"{url}{sep}max_message_bytes=5000&socket_timeout=3&max_held_bytes=70000"
    )
    try:
        assert (t.max_message_bytes, t.max_held_bytes) == (5000, 70000)
        assert t._client.connection_pool.connection_kwargs["socket_timeout"] == 3.0
        topic = unique("topic")
        t.key_prefix = f"msdata-test-{uuid.uuid4().hex[:12]}"
        with pytest.raises(PublishError) as refused:
            await t.publish(topic, [TransportMessage(id="m1", body=b"b" * 5000)])
        assert isinstance(refused.value.__cause__, MessageTooLarge)
        assert "5,008 bytes" in refused.value.refused["m1"]
        await t.publish(topic, [TransportMessage(id="m2", body=b"b" * 4000)])  # still usable
        await _delete_prefix(t._client, t.key_prefix)
    finally:
        await t.close()
    t = RedisTransport.from_url(url)
    assert t.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES
    assert t.max_held_bytes == 64 * 1024 * 1024
    await t.close()
    for bad in ("max_message_bytes=0", "max_held_bytes=x", "max_message_bytes=600000000"):
        with pytest.raises(ConfigurationError):
            RedisTransport.from_url(f"{url}{sep}{bad}")
    with pytest.raises(ConfigurationError):
        RedisTransport.from_url(f"{url}{sep}max_held_bytes=5", max_held_bytes=6)


async def test_an_ack_made_as_the_server_goes_silent_is_not_lost() -> None:
    """An ack made just as the server goes silent (the connection stays open, nothing
    answers) cannot get through: it is kept and sent once the server speaks again, however
    long past ``claim_idle`` the silence lasted. The message does not come back, neither
    to this consumer's own reclaim scan (as its next attempt) nor to the dead letters; a
    message published then arrives as attempt 1."""
    conf = TestRedisTransport()
    topic, group = unique("topic"), unique("group")
    async with (
        _SilentServer(conf.broker_address()) as server,
        conf.make_transport_at(server.host, server.port, 0.5) as t,
    ):
        assert isinstance(t, RedisTransport)
        await t.declare_group(topic, group)
        (first,) = make_messages(1, prefix="first")
        await t.publish(topic, [first])
        async with t.subscribe(topic, group, max_attempts=5) as sub:
            (d,) = await collect(sub, 1, timeout=5.0, ack=False)
            assert d.message.id == first.id
            server.go_silent()
            await d.ack()  # its flush, the heartbeats and the reads go unanswered
            assert await sub.receive(1, timeout=0.25) == []
            await asyncio.sleep(4 * t.claim_idle)  # the entry's idle time passes claim_idle
            assert await sub.receive(1, timeout=0.25) == []
            # the silence ends with its connections reset: what was sent into them is lost
            for writer in server._writers:
                writer.transport.abort()
            server.speak_again()
            early = [(x.message.id, x.attempt) for x in await sub.receive(10, timeout=0.3)]
            assert early == [], f"first is {first.id}: {early}"
            (after,) = make_messages(1, prefix="after")
            deadline = time.monotonic() + 10.0
            await publish_eventually(t, topic, [after], timeout=10.0)
            got: list[tuple[str, int]] = []
            # long enough for the first message to be reclaimed if its ack were lost
            quiet = time.monotonic() + 3 * t.features.redelivery_timeout
            while time.monotonic() < deadline and (
                time.monotonic() < quiet or after.id not in {m for m, _ in got}
            ):
                for x in await sub.receive(10, timeout=0.3):
                    got.append((x.message.id, x.attempt))
                    await x.ack()
            assert got == [(after.id, 1)], f"first is {first.id}: {got}"
            assert await t.lag(topic, group) == 0
            dlq = f"{t.key_prefix}:{dead_letter_topic(topic, group)}"
            assert await t._client.xlen(dlq) == 0, "the acked message was dead-lettered"


@pytest.mark.parametrize("taken_up_by", ["retry", "scan"])
async def test_what_a_subscription_closed_in_a_silence_holds_goes_back_uncounted(
    taken_up_by: str,
) -> None:
    """A subscription closed while the server is silent (the connection open, nothing
    answers) cannot give back what it holds. The transport goes on trying; once the server
    answers, what it held comes back as it would have: a delivery it released (the release
    failed in the silence) as attempt 1, one handed out and left unsettled as attempt 2,
    one it acked not at all; and a receive in flight when it closed takes nothing. Whether
    the transport's retry gets there first or the scan of a new subscription of the group
    on the same transport does (it gives them back before it claims anything). (They
    stayed pending at the closed consumer, to be claimed after claim_idle, each counted
    once more: the released one as attempt 2, the acked one again.)"""
    conf = TestRedisTransport()
    topic, group = unique("topic"), unique("group")
    async with (
        _SilentServer(conf.broker_address()) as server,
        conf.make_transport_at(server.host, server.port, 0.5) as t,
    ):
        assert isinstance(t, RedisTransport)
        await t.declare_group(topic, group)
        msgs = make_messages(3)
        await t.publish(topic, msgs)
        sub = t.subscribe(topic, group, max_attempts=5, prefetch=10)
        await sub.__aenter__()
        got = await collect(sub, 3, timeout=5.0, ack=False)
        assert sorted(d.message.id for d in got) == sorted(m.id for m in msgs)
        released, kept, acked = got
        server.go_silent()
        with pytest.raises(TransportError):
            await released.release()
        await acked.ack()
        receiving = asyncio.ensure_future(sub.receive(10, timeout=5.0))
        await asyncio.sleep(0.1)
        await sub.__aexit__(None, None, None)
        assert await receiving == []
        assert len(t._give_backs) == 1, "nothing is left to give back"
        job = next(iter(t._give_backs))
        if taken_up_by == "scan":
            # the transport's retry keeps failing: the new subscription's scan does it

            async def fails(job: object) -> None:
                raise rex.ConnectionError("still unreachable (simulated)")

            sub._run_give_back = fails  # type: ignore[method-assign]
        await asyncio.sleep(4 * t.claim_idle)  # the entries' idle time passes claim_idle
        # the silence ends with its connections reset: what was sent into them is lost
        for writer in server._writers:
            writer.transport.abort()
        server.speak_again()
        if taken_up_by == "retry":
            await eventually(lambda: not t._give_backs, 10.0, what="the give-back")
        (after,) = make_messages(1, prefix="after")
        await publish_eventually(t, topic, [after], timeout=10.0)
        back: list[tuple[str, int]] = []
        async with t.subscribe(topic, group, max_attempts=5, prefetch=10) as again:
            # long enough for what the closed consumer held to be reclaimed
            deadline = time.monotonic() + 3 * t.features.redelivery_timeout + 1.0
            while time.monotonic() < deadline:
                for d in await again.receive(10, timeout=0.3):
                    back.append((d.message.id, d.attempt))
                    await d.ack()
        if taken_up_by == "scan":
            assert job.sent, "the scan did not give them back"
            del sub._run_give_back
        want = [(released.message.id, 1), (kept.message.id, 2), (after.id, 1)]
        assert sorted(back) == sorted(want), f"acked {acked.message.id}: {back}"
        assert await t.lag(topic, group) == 0


async def test_settling_after_another_consumer_took_the_entries_over_makes_no_copy() -> None:
    """A consumer whose heartbeat stopped (its loop blocked past claim_idle) has its entries
    taken over by another consumer, counted; its release(), nack(), dead_letter() and its
    close then come too late and do nothing: the other consumer holds the entries, and no
    second copy of a message is made, neither a retry nor a dead letter. (The settle acked
    the other consumer's entries and copied them: each message was handed out once more,
    or dead-lettered while the other consumer handled it.)"""
    topic, group = unique("topic"), unique("group")
    async with redis_transport(claim_idle=0.3) as t:
        await t.declare_group(topic, group)
        msgs = make_messages(4)
        await t.publish(topic, msgs)
        slow = t.subscribe(topic, group)
        await slow.__aenter__()
        held = await collect(slow, 4, timeout=5.0, ack=False)
        assert len(held) == 4
        assert slow._heart is not None
        slow._heart.cancel()  # its loop is blocked: nothing resets the entries' idle time
        async with t.subscribe(topic, group) as other:
            taken = await collect(other, 4, timeout=5.0, ack=False)
            assert sorted((d.message.id, d.attempt) for d in taken) == sorted(
                (m.id, 2) for m in msgs
            )
            # too late, as is the close for held[3]
            await held[0].release()
            await held[1].nack()
            await held[2].dead_letter("InvalidEnvelope: too late")
            await slow.__aexit__(None, None, None)
            for d in taken:
                await d.ack()
            again = [(d.message.id, d.attempt) for d in await other.receive(10, timeout=1.0)]
            assert again == [], f"a second copy: {again}"
        assert await t.lag(topic, group) == 0
        assert await t._client.xlen(t._stream_key(dead_letter_topic(topic, group))) == 0


async def test_a_database_path_that_is_no_number_is_refused_and_one_out_of_range_named() -> None:
    """``redis://host:6379/abc`` was read as database 0 without a word: refused when built.
    A database the server does not have (``/99`` of 16) fails each call naming the server
    (``DB index is out of range`` alone did not say which)."""
    url = urlsplit(require("redis"))
    with pytest.raises(ConfigurationError, match="must be a number"):
        RedisTransport.from_url(f"redis://{url.netloc}/abc")
    t = RedisTransport.from_url(f"redis://{url.netloc}/99")
    try:
        with pytest.raises(TransportError, match="DB index") as lagged:
            await t.lag(unique("topic"), unique("group"))
        assert f"{url.hostname}:{url.port or 6379}/99" in str(lagged.value)
    finally:
        await t.close()


async def test_consumers_back_off_and_log_once_while_redis_is_down(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """While Redis is down, a consumer's failed round trips are logged once (per transport,
    every 10 s at most; each consumer logged each one, 72 lines in 6 s) and spaced by a
    pause that doubles up to about 1 s across receive calls (each call used to try at once,
    and again every 0.05-0.1 s); once Redis is back, the consumer receives again."""
    from private_servers import open_private

    server = open_private("redis", tmp_path)
    try:
        t = RedisTransport.from_url(f"{server.url}?socket_connect_timeout=0.5&socket_timeout=2")
        topic, group = unique("topic"), unique("group")
        try:
            async with t.subscribe(topic, group) as sub, t.subscribe(topic, group) as sub2:
                tries = 0
                recover = sub._recover

                async def counted() -> None:
                    nonlocal tries
                    tries += 1
                    await recover()

                sub._recover = counted  # type: ignore[method-assign]
                await asyncio.get_running_loop().run_in_executor(None, server.stop, True)
                caplog.clear()
                calls = 25
                with caplog.at_level(logging.WARNING, logger="msdata.adapters.redis"):
                    for _ in range(calls):
                        assert await sub.receive(10, timeout=0.1) == []
                        assert await sub2.receive(10, timeout=0.1) == []
                down = [r for r in caplog.records if "unreachable" in r.getMessage()]
                assert len(down) == 1, [r.getMessage() for r in down]
                assert server.url.split("//")[1].split("/")[0] in down[0].getMessage()
                # a retry of each receive call at once would be one per call at least
                assert tries < calls, f"{tries} round trips tried in {calls} receive calls"
                await asyncio.get_running_loop().run_in_executor(None, server.start)
                await publish_eventually(t, topic, make_messages(1), timeout=20.0)
                got: list[Any] = []
                for _ in range(100):
                    got += await sub.receive(10, timeout=0.2) + await sub2.receive(10, timeout=0.2)
                    if got:
                        break
                assert len(got) == 1
                await got[0].ack()
        finally:
            await t.close()
    finally:
        server.close()
