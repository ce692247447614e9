"""The outbox relay end to end, PostgreSQL -> broker, against a hand-written raw loop.

    .venv/bin/python bench/bench_relay_brokers.py [--rows 20000] [--rounds 5]
        [--brokers redis,rabbitmq,nats]

For each broker, on the same outbox table (``PostgresOutboxStore``'s, filled with the same
``--rows`` CloudEvents rows over 1000 partition keys before each drain):

- raw: one asyncpg connection; in one transaction, ``SELECT … ORDER BY seq LIMIT 100 FOR
  UPDATE SKIP LOCKED``, publish the 100 rows with the raw client and wait for every confirm
  (redis-py: one pipeline of XADD; aio-pika: 100 ``exchange.publish`` with confirms in
  flight; nats-py: 100 ``js.publish_async`` then their acks), ``DELETE`` them, ``COMMIT``;
- msdata: ``OutboxRelay(PostgresOutboxStore, <broker>Transport, batch_size=100)`` run as an
  application runs it (``start()``: its own loop, claim with a lease, publish the batch with
  every confirm in flight, delete, pipelined as the relay chooses), timed from ``start()``
  until it has marked every row sent; once with ``relay_synchronous_commit=True`` (the same
  durability as the raw loop: the column compared) and once with the store's default
  (``False``: the relay's own claim/mark commits do not wait for the WAL flush; a database
  crash can only make it publish a message again).

Durability: PostgreSQL commits are fsynced (raw loop, business writes, and the relay with
``relay_synchronous_commit=True``). RabbitMQ: durable fanout exchange and classic durable
queue, persistent messages, publisher confirms (the broker fsyncs before confirming).
NATS JetStream: file-storage stream, confirmed when written to the stream file, not fsynced
(as the server is configured here). Redis: no persistence (``--save "" --appendonly no``): an
XADD is confirmed when it is in memory. Both sides publish to a topic with one bound consumer
group (queue) so that RabbitMQ routes and stores every message.

Each phase is also timed (µs per row: claim/select, publish, mark/delete+commit, and the
relay's combined mark-and-claim call when its store has one), so a
ratio below target shows where the time goes (a pipelined relay overlaps its phases, so
they may add up to more than its wall time). Per broker, each of ``--rounds`` rounds drains
``--rows`` rows with each of the 3 variants, rotating which goes first (the machine is
shared); the table shows the medians. Names are unique and everything is deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import aio_pika
import asyncpg
import nats
import redis.asyncio as aioredis
from _fair import MIN_ROUNDS, loadavg, ratios, spread
from nats.js.api import StorageType, StreamConfig

from msdata.adapters.nats import NatsTransport
from msdata.adapters.postgres import PostgresOutboxStore
from msdata.adapters.rabbitmq import RabbitMQTransport
from msdata.adapters.redis import RedisTransport
from msdata.messages import Event, MessageRegistry, make_envelope, message_type
from msdata.outbox import OutboxRelay, OutboxRow
from msdata.serialization import CloudEventsCodec
from msdata.transport import Transport, TransportMessage

PG = "postgresql://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/0"
AMQP = "amqp://guest:guest@127.0.0.1:5672/"
NATS = "nats://127.0.0.1:4222"
BATCH = 100
KEYS = 1000

registry = MessageRegistry()


@message_type("bench.OrderPlaced", registry=registry)
class OrderPlaced(Event):
    order_id: str
    customer: str
    total_cents: int


DURABILITY = {
    "redis": "PG fsync; Redis in memory, no persistence",
    "rabbitmq": "PG fsync; RabbitMQ persistent + confirms (fsync)",
    "nats": "PG fsync; NATS file store, no fsync",
}

RawPublish = Callable[[Sequence[Any]], Awaitable[None]]


@dataclass
class Phases:
    """Seconds spent in each phase of a drain."""

    claim: float = 0.0
    publish: float = 0.0
    mark: float = 0.0
    #: in ``mark_sent_and_claim`` (this batch's mark and the next claim in one call)
    both: float = 0.0


@dataclass
class Result:
    raw: list[float] = field(default_factory=list)
    ours: list[float] = field(default_factory=list)
    ours_async: list[float] = field(default_factory=list)
    raw_phases: list[Phases] = field(default_factory=list)
    our_phases: list[Phases] = field(default_factory=list)
    async_phases: list[Phases] = field(default_factory=list)


# -- the table ----------------------------------------------------------------------------


def make_rows(n: int, topic: str) -> list[OutboxRow]:
    codec = CloudEventsCodec(registry)
    rows = []
    for i in range(n):
        key = f"order-{i % KEYS}"
        env = make_envelope(
            OrderPlaced(order_id=f"order-{i}", customer="c-77", total_cents=1250),
            registry=registry,
            partition_key=key,
            source="bench",
        )
        rows.append(
            OutboxRow(env.id, topic, env.type, codec.encode(env), key, aggregate_type=topic)
        )
    return rows


async def fill(conn: Any, store: PostgresOutboxStore, rows: list[OutboxRow]) -> None:
    for start in range(0, len(rows), 5000):
        async with conn.transaction():
            await store.append_async(conn, rows[start : start + 5000])
    await conn.execute(f"VACUUM ANALYZE {store.table}")


# -- the two loops ------------------------------------------------------------------------


async def raw_drain(conn: Any, table: str, publish: RawPublish) -> tuple[int, Phases]:
    select = (
        f"SELECT seq, id, aggregateid, payload FROM {table} WHERE sent_at IS NULL "
        f"ORDER BY seq LIMIT {BATCH} FOR UPDATE SKIP LOCKED"
    )
    delete = f"DELETE FROM {table} WHERE seq = ANY($1::bigint[])"
    phases, done, clock = Phases(), 0, time.perf_counter
    while True:
        t0 = clock()
        tx = conn.transaction()
        await tx.start()
        rows = await conn.fetch(select)
        t1 = clock()
        if not rows:
            await tx.commit()
            return done, phases
        await publish(rows)
        t2 = clock()
        await conn.execute(delete, [r["seq"] for r in rows])
        await tx.commit()
        t3 = clock()
        phases.claim += t1 - t0
        phases.publish += t2 - t1
        phases.mark += t3 - t2
        done += len(rows)


class TimedStore:
    """The store with its claim and mark timed; ``all_marked`` is set once ``n`` rows were
    marked sent (the end of a drain)."""

    def __init__(self, store: PostgresOutboxStore, phases: Phases, n: int) -> None:
        self._store, self._phases, self._n = store, phases, n
        self.marked = 0
        self.all_marked = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name == "mark_sent_and_claim":  # optional in the store port: time it if there
            return self._timed_both(attr)
        return attr

    def _count(self, seqs: Sequence[int]) -> None:
        self.marked += len(seqs)
        if self.marked >= self._n:
            self.all_marked.set()

    def _timed_both(self, fn: Any) -> Any:
        async def mark_sent_and_claim(
            relay_id: str,
            sent_seqs: Sequence[int],
            limit: int,
            lease_seconds: float,
            *,
            keep: bool = False,
        ) -> Any:
            t = time.perf_counter()
            try:
                records = await fn(relay_id, sent_seqs, limit, lease_seconds, keep=keep)
            finally:
                self._phases.both += time.perf_counter() - t
            self._count(sent_seqs)
            return records

        return mark_sent_and_claim

    async def claim(self, relay_id: str, limit: int, lease_seconds: float) -> Any:
        t = time.perf_counter()
        try:
            return await self._store.claim(relay_id, limit, lease_seconds)
        finally:
            self._phases.claim += time.perf_counter() - t

    async def mark_sent(self, relay_id: str, seqs: Sequence[int], *, keep: bool = False) -> None:
        t = time.perf_counter()
        try:
            await self._store.mark_sent(relay_id, seqs, keep=keep)
        finally:
            self._phases.mark += time.perf_counter() - t
        self._count(seqs)


class TimedPublisher:
    def __init__(self, transport: Transport, phases: Phases) -> None:
        self._transport, self._phases = transport, phases

    async def publish(self, topic: str, messages: Sequence[TransportMessage]) -> None:
        t = time.perf_counter()
        try:
            await self._transport.publish(topic, messages)
        finally:
            self._phases.publish += time.perf_counter() - t


async def relay_drain(
    store: PostgresOutboxStore, transport: Transport, n: int
) -> tuple[int, float, Phases]:
    """The relay as an application runs it (``start()``, its own loop) until it has marked
    ``n`` rows sent: (rows, seconds, phases)."""
    phases = Phases()
    timed = TimedStore(store, phases, n)
    relay = OutboxRelay(
        timed,
        TimedPublisher(transport, phases),
        batch_size=BATCH,
        relay_id=f"bench-{uuid.uuid4().hex[:6]}",
    )
    t = time.perf_counter()
    await relay.start()
    try:
        try:
            await asyncio.wait_for(timed.all_marked.wait(), 300)
        except TimeoutError:
            raise SystemExit(f"the relay marked {timed.marked} of {n} rows in 300 s") from None
        elapsed = time.perf_counter() - t
    finally:
        await relay.stop()
    return timed.marked, elapsed, phases


# -- the brokers --------------------------------------------------------------------------


@dataclass
class Broker:
    name: str
    transport: Transport
    raw_publish: RawPublish
    cleanup: Callable[[], Awaitable[None]]


async def redis_broker(token: str, topic: str) -> Broker:
    raw_client = aioredis.Redis.from_url(REDIS)
    our_client = aioredis.Redis.from_url(REDIS)
    prefix = f"bench-relay-{token}"
    stream = f"{prefix}-raw"
    transport = RedisTransport(our_client, key_prefix=prefix)

    async def publish(rows: Sequence[Any]) -> None:
        pipe = raw_client.pipeline(transaction=False)
        for r in rows:
            pipe.xadd(stream, {"id": r["id"], "body": r["payload"], "key": r["aggregateid"]})
        await pipe.execute()

    async def cleanup() -> None:
        await transport.close()
        keys = [k async for k in raw_client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await raw_client.delete(*keys)
        await raw_client.aclose()
        await our_client.aclose()

    return Broker("redis", transport, publish, cleanup)


async def rabbitmq_broker(token: str, topic: str) -> Broker:
    raw_conn = await aio_pika.connect_robust(AMQP)
    our_conn = await aio_pika.connect_robust(AMQP)
    channel = await raw_conn.channel(publisher_confirms=True)
    exchange = await channel.declare_exchange(
        f"bench-raw-{token}", aio_pika.ExchangeType.FANOUT, durable=True
    )
    queue = await channel.declare_queue(f"bench-raw-{token}:g", durable=True)
    await queue.bind(exchange)
    transport = RabbitMQTransport(our_conn)
    async with transport.subscribe(topic, "g"):  # declares the group's durable queue
        pass
    persistent = aio_pika.DeliveryMode.PERSISTENT

    async def publish(rows: Sequence[Any]) -> None:
        await asyncio.gather(
            *[
                exchange.publish(
                    aio_pika.Message(
                        r["payload"],
                        message_id=r["id"],
                        headers={"x-msdata-key": r["aggregateid"]},
                        delivery_mode=persistent,
                    ),
                    routing_key="",
                )
                for r in rows
            ]
        )

    async def cleanup() -> None:
        await transport.close()
        exchanges, queues = transport.declared
        admin = await raw_conn.channel()
        for q in sorted(queues):
            await admin.queue_delete(q)
        for x in sorted(exchanges):
            await admin.exchange_delete(x)
        await admin.queue_delete(queue.name)
        await admin.exchange_delete(exchange.name)
        await raw_conn.close()
        await our_conn.close()

    return Broker("rabbitmq", transport, publish, cleanup)


async def nats_broker(token: str, topic: str) -> Broker:
    raw_nc = await nats.connect(NATS)
    our_nc = await nats.connect(NATS)
    js = raw_nc.jetstream()
    raw_stream, subject = f"BENCHRAW{token}", f"benchraw{token}.orders"
    await js.add_stream(
        StreamConfig(
            name=raw_stream, subjects=[subject], storage=StorageType.FILE, duplicate_window=120
        )
    )
    prefix = f"BENCH{token}_"
    transport = NatsTransport(our_nc, stream_prefix=prefix, subject_prefix=f"bench{token}.")

    async def publish(rows: Sequence[Any]) -> None:
        acks = [
            await js.publish_async(
                subject,
                r["payload"],
                headers={"Nats-Msg-Id": r["id"], "x-msdata-key": r["aggregateid"]},
            )
            for r in rows
        ]
        await asyncio.gather(*acks)

    async def cleanup() -> None:
        await transport.close()
        for info in await js.streams_info():
            name = info.config.name
            if name is not None and name.startswith((prefix, raw_stream)):
                await js.delete_stream(name)
        await raw_nc.close()
        await our_nc.close()

    return Broker("nats", transport, publish, cleanup)


MAKERS = {"redis": redis_broker, "rabbitmq": rabbitmq_broker, "nats": nats_broker}


# -- the run ------------------------------------------------------------------------------


async def bench_broker(name: str, n: int, rounds: int) -> Result:
    token = uuid.uuid4().hex[:8]
    topic = f"bench.relay.{token}"
    broker = await MAKERS[name](token, topic)
    prefix = f"benchrelay{token}_"
    store = PostgresOutboxStore(PG, table_prefix=prefix, relay_synchronous_commit=True)
    quick = PostgresOutboxStore(PG, table_prefix=prefix)  # the default: async relay commits
    conn = await asyncpg.connect(PG)
    result = Result()
    try:
        await store.create_schema()
        # warm up: topology, connections, prepared statements
        await fill(conn, store, make_rows(300, topic))
        await raw_drain(conn, store.table, broker.raw_publish)
        await fill(conn, store, make_rows(300, topic))
        await relay_drain(store, broker.transport, 300)
        await fill(conn, store, make_rows(300, topic))
        await relay_drain(quick, broker.transport, 300)
        for round_ in range(rounds):
            # the machine is shared: rotate which variant goes first
            variants = ["raw", "ours", "ours_async"]
            shift = round_ % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                await fill(conn, store, make_rows(n, topic))
                if variant == "raw":
                    t = time.perf_counter()
                    done, phases = await raw_drain(conn, store.table, broker.raw_publish)
                    result.raw.append(done / (time.perf_counter() - t))
                    result.raw_phases.append(phases)
                elif variant == "ours":
                    done, elapsed, phases = await relay_drain(store, broker.transport, n)
                    result.ours.append(done / elapsed)
                    result.our_phases.append(phases)
                else:
                    done, elapsed, phases = await relay_drain(quick, broker.transport, n)
                    result.ours_async.append(done / elapsed)
                    result.async_phases.append(phases)
                assert done == n, (variant, done, n)
    finally:
        try:
            await store.drop_schema()
        finally:
            await conn.close()
            await store.close()
            await quick.close()
            await broker.cleanup()
    return result


def table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def us_per_row(phases: list[Phases], n: int) -> str:
    claim = statistics.median(p.claim for p in phases) / n * 1e6
    publish = statistics.median(p.publish for p in phases) / n * 1e6
    mark = statistics.median(p.mark for p in phases) / n * 1e6
    both = statistics.median(p.both for p in phases) / n * 1e6
    return f"{claim:.1f} / {publish:.1f} / {mark:.1f}" + (f" / {both:.1f}" if both else "")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--brokers", default="redis,rabbitmq,nats")
    args = parser.parse_args()
    names = [b for b in args.brokers.split(",") if b]
    if args.rounds < MIN_ROUNDS:
        raise SystemExit(f"at least {MIN_ROUNDS} rounds")
    print(f"loadavg at start: {loadavg()}")
    started = time.perf_counter()
    results = {name: await bench_broker(name, args.rows, args.rounds) for name in names}
    print(
        f"\nOutbox relay end to end, PostgreSQL -> broker: {args.rows} rows per drain, "
        f"batch {BATCH}, 1 worker, medians of {args.rounds} interleaved rounds (rows/s); "
        "ratios msdata / raw per round, min-median-max\n"
    )
    rows = []
    for name, r in results.items():
        raw, ours, quick = (statistics.median(x) for x in (r.raw, r.ours, r.ours_async))
        rows.append(
            [
                name,
                f"{raw:,.0f}",
                f"{ours:,.0f}",
                spread(ratios(r.ours, r.raw)),
                f"{quick:,.0f} ({spread(ratios(r.ours_async, r.raw))})",
                DURABILITY[name],
            ]
        )
    table(
        [
            "broker",
            "raw rows/s",
            "msdata rows/s",
            "ratio",
            "msdata, async relay commits (ratio)",
            "durability of raw and msdata",
        ],
        rows,
    )
    print(
        "\nWhere the time goes, µs per row: claim|select / publish / mark|delete+commit"
        " [/ mark+next claim in one call]\n"
    )
    table(
        ["broker", "raw", "msdata (same durability)", "msdata, async relay commits"],
        [
            [
                name,
                us_per_row(r.raw_phases, args.rows),
                us_per_row(r.our_phases, args.rows),
                us_per_row(r.async_phases, args.rows),
            ]
            for name, r in results.items()
        ],
    )
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    print(f"loadavg at end: {loadavg()}")


if __name__ == "__main__":
    asyncio.run(main())
