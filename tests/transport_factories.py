"""One way to get a fresh transport on each backend, for tests that run the same code on all.

``open_transport(name)`` (``"memory"``, ``"redis"``, ``"rabbitmq"``, ``"nats"``) yields a new
transport whose names cannot meet another test's (a Redis key prefix; a NATS stream and
subject prefix; RabbitMQ exchanges and queues are named by topic, so use unique topics), and
removes what it created afterwards. A broker that is not reachable skips the test (fails it
under ``MSDATA_REQUIRE_SERVICES=1``), through :func:`services.require` (tests/services.py).

Parametrise with :data:`TRANSPORTS`, which carries each broker's pytest marker::

    @pytest.mark.parametrize("backend", TRANSPORTS)
    async def test_x(backend: str) -> None:
        async with open_transport(backend) as transport:
            ...

Redelivery after a consumer dies is short here (Redis ``claim_idle`` 0.4 s, NATS ``ack_wait``
2 s; RabbitMQ and memory redeliver at once), so tests that need it stay fast.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest

from msdata.transport import Subscription, Transport, TransportMessage
from services import require

__all__ = ["BACKENDS", "TRANSPORTS", "open_transport", "with_test_hooks"]

BACKENDS = ("memory", "redis", "rabbitmq", "nats")

#: the backends as pytest params, each broker with its marker (memory needs none)
TRANSPORTS = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("rabbitmq", id="rabbitmq", marks=pytest.mark.rabbitmq),
    pytest.param("nats", id="nats", marks=pytest.mark.nats),
]


@asynccontextmanager
async def open_transport(name: str, *, ordered: bool = False) -> AsyncIterator[Transport]:
    """A fresh transport on backend ``name``, cleaned up on exit.

    ``ordered=True`` picks the backend's order-per-key mode where it has one to choose
    (RabbitMQ single active consumer, NATS key partitions); memory is always ordered and
    Redis never promises it. What you got is in ``transport.features.ordered_per_key``.
    """
    if name == "memory":
        async with _memory() as t:
            yield t
    elif name == "redis":
        async with _redis() as t:
            yield t
    elif name == "rabbitmq":
        async with _rabbitmq(ordered) as t:
            yield t
    elif name == "nats":
        async with _nats(ordered) as t:
            yield t
    else:
        raise ValueError(f"unknown transport backend {name!r}; one of {BACKENDS}")


def with_test_hooks(backend: str, transport: Any) -> Any:
    """Set the suite's ``publish_foreign`` and ``abandon`` hooks (see
    :class:`msdata.transport.TransportFeatures`) on ``transport``; returns it."""

    async def publish_foreign(topic: str, message: TransportMessage) -> None:
        headers = dict(message.headers)
        if backend == "memory":
            await transport.publish(topic, [message])
        elif backend == "redis":
            fields: dict[str, Any] = {"id": message.id, "body": message.body, **headers}
            await transport._client.xadd(transport._stream_key(topic), fields)
        elif backend == "rabbitmq":
            import aio_pika

            channel = await transport._connection.channel()
            try:
                exchange = await channel.get_exchange(topic)
                amqp_headers: dict[str, Any] = {}
                for name, value in headers.items():  # numbers as numbers, as a producer would
                    try:
                        amqp_headers[name] = int(value)
                    except ValueError:
                        amqp_headers[name] = value
                await exchange.publish(
                    aio_pika.Message(message.body, message_id=message.id, headers=amqp_headers),
                    routing_key="",
                )
            finally:
                await channel.close()
        elif backend == "nats":
            await transport._ensure_stream(topic)
            nc = transport.client
            await nc.jetstream().publish(
                transport._subject(topic), message.body, headers={**headers} or None
            )
        else:
            raise ValueError(backend)

    async def abandon(sub: Subscription) -> None:
        s: Any = sub
        if backend == "memory":
            await sub.__aexit__(None, None, None)  # in one process, a dead consumer's release
        elif backend == "redis":
            # the process is gone: no heartbeat, no release, nothing more reaches Redis
            s._heart.cancel()
            s._closed = True
            s._t._subs.discard(s)
        elif backend == "rabbitmq":
            # the broker sees the consumer's channel go, as when its connection dies
            s._closed = True
            s._transport._subscriptions.discard(s)
            channel, s._channel = s._channel, None
            await (await channel.get_underlay_channel()).close()
        elif backend == "nats":
            # the inbox goes; what it held comes back after ack_wait, unsettled
            s._closed = True
            s._transport._subscriptions.discard(s)
            if s._inbox_sub is not None:
                await s._inbox_sub.unsubscribe()
                s._inbox_sub = None
            s._inflight.clear()
            s._buffer.clear()
        else:
            raise ValueError(backend)

    async def interrupt() -> None:
        if backend == "redis":
            await transport._client.connection_pool.disconnect()
        elif backend == "rabbitmq":
            # the socket goes, as in a network failure: the robust connection reconnects
            underlay = transport._connection.transport.connection
            await underlay.close(ConnectionResetError("interrupted by the test"))
        elif backend == "nats":
            transport.client._transport.close()  # the client notices and reconnects

    async def publish_unreadable_nats(topic: str) -> int:
        """Write, as a raw NATS client would, messages nats-py cannot parse: a header status
        line of bytes that are not UTF-8 (stored), a header line of them (nats-py skips
        it), and a subject token of them under ``._k.`` (no stream captures it)."""
        import asyncio

        await transport._ensure_stream(topic)
        subject = transport._subject(topic).encode()
        url = transport.client.connected_url
        reader, writer = await asyncio.open_connection(url.hostname, url.port or 4222)
        try:
            await reader.readline()  # INFO
            frames = [b'CONNECT {"verbose":false,"headers":true}\r\n']
            for target, header in [
                (subject, b"NATS/1.0 \xff\xfe\r\n\r\n"),
                (subject, b"NATS/1.0\r\nX-\xff: \xfe\r\n\r\n"),
                (subject + b"._k.\xff\xfe", b"NATS/1.0\r\n\r\n"),
            ]:
                body = b"unreadable"
                frames.append(
                    b"HPUB %s %d %d\r\n%s%s\r\n"
                    % (target, len(header), len(header) + len(body), header, body)
                )
            writer.write(b"".join(frames) + b"PING\r\n")
            await writer.drain()
            while not (await reader.readline()).startswith(b"PONG"):
                pass
        finally:
            writer.close()
        return 2

    async def publish_unreadable_rabbitmq(topic: str) -> int:
        """Publish, as a producer in another language could, messages whose ``message_id``
        or ``content_type`` bytes are not UTF-8 (pamqp reads them strictly: "Could not
        unmarshal ContentHeader frame" closed the consumer's connection, again and again).
        pamqp will not write them, so its short-string encoder writes lone surrogates as
        the bytes they stand for while these are sent."""
        import aio_pika
        from pamqp import common, encode

        def raw_short_string(value: str) -> bytes:
            data = value.encode("utf-8", "surrogateescape")
            return common.Struct.byte.pack(len(data)) + data

        bad = "\udcff\udcfe"
        channel = await transport._connection.channel()
        try:
            exchange = await channel.get_exchange(transport.exchange_name(topic))
            encode.METHODS["shortstr"] = raw_short_string
            try:
                for message in (
                    aio_pika.Message(b"unreadable id", message_id=f"id-{bad}"),
                    aio_pika.Message(b"unreadable type", content_type=f"text/{bad}"),
                ):
                    await exchange.publish(message, routing_key="")
            finally:
                encode.METHODS["shortstr"] = encode.short_string
        finally:
            await channel.close()
        return 2

    async def publish_raw(topic: str, body: bytes, fields: Sequence[tuple[bytes, bytes]]) -> bool:
        return await _publish_raw(backend, transport, topic, body, fields)

    transport.features = dataclasses.replace(
        transport.features,
        publish_foreign=publish_foreign,
        abandon=abandon,
        interrupt=None if backend == "memory" else interrupt,
        publish_unreadable={
            "nats": publish_unreadable_nats,
            "rabbitmq": publish_unreadable_rabbitmq,
        }.get(backend),
        publish_raw=publish_raw,
    )
    return transport


def _text(raw: bytes) -> str:
    """Bytes as a client that takes str gets them from a careless producer: not UTF-8 bytes
    as lone surrogates (which the client may then refuse to send)."""
    return raw.decode("utf-8", "surrogateescape")


async def _publish_raw(
    backend: str, transport: Any, topic: str, body: bytes, fields: Sequence[tuple[bytes, bytes]]
) -> bool:
    """The ``publish_raw`` hook (see :class:`msdata.transport.TransportFeatures`): ``body``
    and ``fields`` written to the broker with its ordinary client, as another producer would;
    False if that client refuses to send them."""
    named = dict(fields)
    if backend == "memory":
        from msdata.errors import MsdataError

        message = TransportMessage(
            id=_text(named.get(b"id", uuid.uuid4().hex.encode())),
            body=body,
            headers={_text(k): _text(v) for k, v in fields},
        )
        try:
            await transport.publish(topic, [message])
        except MsdataError:  # the "client" (msdata itself, in process) refused it
            return False
        return True
    if backend == "redis":
        # the first field, then body, then the rest: ``id`` first looks like msdata's entry;
        # the one ``body`` field is the body given
        rest = [(name, value) for name, value in fields if name != b"body"]
        flat: list[bytes] = [*rest[0]] if rest else []
        flat += [b"body", body]
        for name, value in rest[1:]:
            flat += [name, value]
        await transport._client.execute_command("XADD", transport._stream_key(topic), "*", *flat)
        return True
    if backend == "rabbitmq":
        import aio_pika

        try:
            amqp = aio_pika.Message(
                body,
                headers={_text(k): v for k, v in fields},
                message_id=_text(named[b"id"]) if b"id" in named else None,
                content_type=_text(named[b"content-type"]) if b"content-type" in named else None,
            )
        except (ValueError, TypeError):
            return False
        channel = await transport._connection.channel()
        try:
            exchange = await channel.get_exchange(topic)
            try:
                await exchange.publish(amqp, routing_key="")
            except (UnicodeError, ValueError, TypeError, OverflowError):
                return False  # pamqp could not encode it: nothing was sent
        finally:
            await channel.close()
        return True
    if backend == "nats":
        import nats.errors
        import nats.js.errors

        await transport._ensure_stream(topic)
        headers = {_text(k): _text(v) for k, v in fields}
        try:
            await transport.client.jetstream().publish(
                transport._subject(topic), body, headers=headers or None
            )
        except UnicodeEncodeError:
            return False  # nats-py cannot write a lone surrogate: nothing was sent
        except (nats.errors.Error, nats.js.errors.Error):
            return False  # the server refused it
        return True
    raise ValueError(backend)


def _unique() -> str:
    return uuid.uuid4().hex[:12]


@asynccontextmanager
async def _memory() -> AsyncIterator[Transport]:
    from msdata.adapters.memory import MemoryTransport

    transport = with_test_hooks("memory", MemoryTransport())
    try:
        yield transport
    finally:
        await transport.close()


@asynccontextmanager
async def _redis() -> AsyncIterator[Transport]:
    url = require("redis")
    import redis.asyncio as aioredis

    from msdata.adapters.redis import RedisTransport

    prefix = f"msdata-test-{_unique()}"
    client = aioredis.Redis.from_url(url, client_name=prefix)
    transport = with_test_hooks("redis", RedisTransport(client, key_prefix=prefix, claim_idle=0.4))
    try:
        yield transport
    finally:
        try:
            await transport.close()
            keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


@asynccontextmanager
async def _rabbitmq(ordered: bool) -> AsyncIterator[Transport]:
    url = require("rabbitmq")
    import aio_pika

    from msdata.adapters.rabbitmq import RabbitMQTransport

    conn = await aio_pika.connect_robust(url)
    transport = with_test_hooks("rabbitmq", RabbitMQTransport(conn, ordered_per_key=ordered))
    try:
        yield transport
    finally:
        try:
            await transport.close()
            exchanges, queues = transport.declared
            channel = await conn.channel()
            try:
                for queue in sorted(queues):
                    await channel.queue_delete(queue)
                for exchange in sorted(exchanges):
                    await channel.exchange_delete(exchange)
            finally:
                await channel.close()
        finally:
            await conn.close()


@asynccontextmanager
async def _nats(ordered: bool) -> AsyncIterator[Transport]:
    url = require("nats")
    import nats

    from msdata.adapters.nats import NatsTransport

    nc = await nats.connect(url)
    token = _unique()
    # a subject prefix of its own too: two streams may not capture the same subject
    prefix = f"T{token}_"
    transport = NatsTransport(
        nc,
        stream_prefix=prefix,
        subject_prefix=f"t{token}.",
        ack_wait=2.0,
        ordered=ordered,
        key_partitions=8,
    )
    with_test_hooks("nats", transport)
    try:
        yield transport
    finally:
        try:
            await transport.close()
            js = nc.jetstream()
            for info in await js.streams_info():
                name = info.config.name
                if name is not None and name.startswith(prefix):
                    await js.delete_stream(name)
        finally:
            await nc.close()
