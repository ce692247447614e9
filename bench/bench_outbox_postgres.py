"""The PostgreSQL outbox against the raw driver loop, in the same run.

(a) Drain: 100k pending rows (1000 partition keys) moved to the in-memory transport by
    ``OutboxRelay`` over ``PostgresOutboxStore`` (keyed claim with lease, publish, delete),
    against a raw asyncpg loop on the same table: in one transaction, claim 100 rows with
    ``SELECT … FOR UPDATE SKIP LOCKED``, publish them to the same transport, delete them,
    commit. Each at both durabilities of the relay's own commits (the raw loop at the same
    ``synchronous_commit``); the writes that matter (the business transactions) are always
    durable. Target: relay >= 80% of raw.
(b) Write cost: a business transaction (BEGIN, one INSERT of business data, COMMIT, durable)
    alone, with a hand-written INSERT into the outbox table, with the store's ``append`` of
    an already encoded row, and with ``Outbox.add`` / ``add_async`` (envelope + CloudEvents
    encode + INSERT, with and without the NOTIFY),
    on asyncpg and psycopg, one connection; and asyncpg on 4 connections. Target: <= 1.2x.

Rounds of the variants are interleaved and the median taken, because the machine is shared.
Tables have unique names and are dropped at the end.

Run: .venv/bin/python bench/bench_outbox_postgres.py [--rows N] [--url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import psycopg

from msdata.adapters.memory import MemoryTransport
from msdata.adapters.postgres import PostgresOutboxStore
from msdata.messages import Event, MessageRegistry, message_type
from msdata.outbox import Outbox, OutboxRelay, OutboxRow
from msdata.transport import TransportMessage

URL = "postgresql://postgres@127.0.0.1:5432/test"
registry = MessageRegistry()


@message_type("bench.OrderPlaced", registry=registry)
class OrderPlaced(Event):
    order_id: str
    customer: str
    total_cents: int
    note: str


def _event(i: int) -> OrderPlaced:
    return OrderPlaced(order_id=f"order-{i}", customer="c-77", total_cents=1250, note="x" * 40)


def _payload(i: int) -> bytes:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": str(uuid.uuid4()),
            "source": "bench",
            "type": "bench.OrderPlaced",
            "time": "2026-11-25T10:00:00+00:00",
            "datacontenttype": "application/json",
            "partitionkey": f"order-{i % 1000}",
            "data": {"order_id": f"order-{i}", "customer": "c-77", "total_cents": 1250},
        },
        separators=(",", ":"),
    ).encode()


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


# -- (a) drain ------------------------------------------------------------------------------


async def fill(store: PostgresOutboxStore, url: str, n: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        chunk = 5000
        for start in range(0, n, chunk):
            rows = [
                OutboxRow(
                    message_id=str(uuid.uuid4()),
                    topic="orders",
                    type="bench.OrderPlaced",
                    payload=_payload(i),
                    partition_key=f"order-{i % 1000}",
                    aggregate_type="orders",
                )
                for i in range(start, min(n, start + chunk))
            ]
            async with conn.transaction():
                await store.append_async(conn, rows)
        await conn.execute(f"VACUUM ANALYZE {store.table}")
    finally:
        await conn.close()


async def raw_drain(url: str, tbl: str, sync: bool) -> int:
    transport = MemoryTransport()
    conn = await asyncpg.connect(url)
    await conn.execute(f"SET synchronous_commit = {'on' if sync else 'off'}")
    select = (
        f"SELECT seq, id, topic, payload, aggregateid FROM {tbl} "
        "WHERE sent_at IS NULL ORDER BY seq LIMIT 100 FOR UPDATE SKIP LOCKED"
    )
    delete = f"DELETE FROM {tbl} WHERE seq = ANY($1::bigint[])"
    done = 0
    try:
        while True:
            async with conn.transaction():
                rows = await conn.fetch(select)
                if not rows:
                    return done
                await transport.publish(
                    "orders",
                    [
                        TransportMessage(r["id"], bytes(r["payload"]), r["aggregateid"])
                        for r in rows
                    ],
                )
                await conn.execute(delete, [r["seq"] for r in rows])
            done += len(rows)
    finally:
        await conn.close()


class CountingTransport(MemoryTransport):
    """The in-memory transport, counting what it accepted and waking a waiter at ``target``."""

    def __init__(self, target: int) -> None:
        super().__init__()
        self.count, self.target, self.done = 0, target, asyncio.Event()

    async def publish(self, topic: str, messages: Any) -> None:
        await super().publish(topic, messages)
        self.count += len(messages)
        if self.count >= self.target:
            self.done.set()


async def relay_drain(store: PostgresOutboxStore, n: int) -> int:
    """The relay as it runs in a service (its background loop), until ``n`` are published."""
    transport = CountingTransport(n)
    relay = OutboxRelay(store, transport, batch_size=100, relay_id="bench", poll_interval=0.05)
    async with relay:
        await asyncio.wait_for(transport.done.wait(), 300)
    return transport.count


async def busy_writer(url: str, stop: asyncio.Event) -> int:
    """Another application transaction committing every ~2 ms meanwhile (each ends a
    transaction, which the claim notices: see docs/postgres.md). Returns the commits."""
    conn = await asyncpg.connect(url)
    done = 0
    try:
        while not stop.is_set():
            await conn.execute("SELECT pg_current_xact_id()")
            done += 1
            await asyncio.sleep(0.002)
    finally:
        await conn.close()
    return done


async def with_writer(url: str, writer: bool, work: Awaitable[int]) -> tuple[int, float]:
    """``work``'s result and its rows/s, with ``busy_writer`` running meanwhile if asked."""
    stop = asyncio.Event()
    task = asyncio.create_task(busy_writer(url, stop)) if writer else None
    t = time.perf_counter()
    try:
        done = await work
        return done, done / (time.perf_counter() - t)
    finally:
        stop.set()
        if task is not None:
            await task


async def drain_bench(url: str, n: int, writer: bool) -> None:
    results: list[list[str]] = []
    for sync in (True, False):
        prefix = f"bench{uuid.uuid4().hex[:8]}_"
        store = PostgresOutboxStore(url, table_prefix=prefix, relay_synchronous_commit=sync)
        await store.create_schema()
        try:
            await fill(store, url, n)
            raw, raw_rate = await with_writer(url, writer, raw_drain(url, store.table, sync))
            await fill(store, url, n)
            ours, our_rate = await with_writer(url, writer, relay_drain(store, n))
            assert raw == ours == n, (raw, ours, n)
        finally:
            await store.drop_schema()
            await store.close()
        label = "on (fsync per commit)" if sync else "off (relay's own commits)"
        results.append(
            [label, f"{raw_rate:,.0f}", f"{our_rate:,.0f}", f"{our_rate / raw_rate:.2f}"]
        )
    table(
        f"(a) drain {n:,} rows, 1000 keys, batches of 100, into MemoryTransport (rows/s)"
        + (", another connection committing every ~2 ms meanwhile" if writer else ""),
        ["synchronous_commit", "raw asyncpg loop", "OutboxRelay", "relay / raw"],
        results,
    )


# -- (b) write cost -------------------------------------------------------------------------


async def write_bench(url: str, rounds: int, per_round: int) -> None:
    prefix = f"bench{uuid.uuid4().hex[:8]}_"
    quiet = PostgresOutboxStore(url, table_prefix=prefix, notify=False)
    loud = PostgresOutboxStore(url, table_prefix=prefix, notify=True)
    await loud.create_schema()
    orders = f'"{prefix}orders"'
    tbl = loud.table
    admin = await asyncpg.connect(url)
    await admin.execute(f"CREATE TABLE {orders} (id bigserial PRIMARY KEY, ref text, cents int)")
    out_quiet = Outbox(quiet, registry=registry, source="bench")
    out_loud = Outbox(loud, registry=registry, source="bench")
    raw_ins_a = (
        f"INSERT INTO {tbl} (id, topic, aggregatetype, aggregateid, type, payload, headers) "
        "VALUES ($1, $2, $3, $4, $5, $6, '{}')"
    )
    raw_ins_p = raw_ins_a.replace("$1", "%s").replace("$2", "%s").replace("$3", "%s")
    raw_ins_p = raw_ins_p.replace("$4", "%s").replace("$5", "%s").replace("$6", "%s")
    payload = _payload(1)

    def _row(i: int) -> OutboxRow:
        return OutboxRow(
            message_id=str(uuid.uuid4()),
            topic="orders",
            type="bench.OrderPlaced",
            payload=payload,
            partition_key=f"order-{i}",
            aggregate_type="orders",
        )

    async def a_variant(kind: str, conns: list[Any]) -> Callable[[], Awaitable[None]]:
        async def one(conn: Any, i: int) -> None:
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {orders} (ref, cents) VALUES ($1, $2)", "r", i)
                if kind == "raw":
                    await conn.execute(
                        raw_ins_a, str(uuid.uuid4()), "orders", "orders", "k", "t", payload
                    )
                elif kind == "append":
                    await quiet.append_async(conn, [_row(i)])
                elif kind == "quiet":
                    await out_quiet.add_async(conn, _event(i), key=f"order-{i}")
                elif kind == "loud":
                    await out_loud.add_async(conn, _event(i), key=f"order-{i}")

        async def run() -> None:
            each = per_round // len(conns)

            async def worker(conn: Any) -> None:
                for i in range(each):
                    await one(conn, i)

            await asyncio.gather(*(worker(c) for c in conns))

        return run

    def p_variant(kind: str, conn: Any) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            for i in range(per_round):
                with conn.transaction():
                    conn.execute(f"INSERT INTO {orders} (ref, cents) VALUES (%s, %s)", ("r", i))
                    if kind == "raw":
                        conn.execute(
                            raw_ins_p, (str(uuid.uuid4()), "orders", "orders", "k", "t", payload)
                        )
                    elif kind == "append":
                        quiet.append(conn, [_row(i)])
                    elif kind == "quiet":
                        out_quiet.add(conn, _event(i), key=f"order-{i}")
                    elif kind == "loud":
                        out_loud.add(conn, _event(i), key=f"order-{i}")

        return run

    kinds = ["none", "raw", "append", "quiet", "loud"]
    names = {
        "none": "business tx alone",
        "raw": "+ hand-written outbox INSERT",
        "append": "+ store.append (encoded row, no NOTIFY)",
        "quiet": "+ Outbox.add (notify=False)",
        "loud": "+ Outbox.add (default, NOTIFY)",
    }
    a1 = [await asyncpg.connect(url)]
    a4 = [await asyncpg.connect(url) for _ in range(4)]
    p1 = psycopg.connect(url, autocommit=True)
    setups: dict[str, dict[str, Callable[[], Awaitable[None]]]] = {
        "asyncpg, 1 connection": {k: await a_variant(k, a1) for k in kinds},
        "psycopg (sync), 1 connection": {k: p_variant(k, p1) for k in kinds},
        "asyncpg, 4 connections": {k: await a_variant(k, a4) for k in kinds},
    }
    try:
        for setup, variants in setups.items():
            for run in variants.values():  # warm up: prepared statements, codecs
                await run()
            rates: dict[str, list[float]] = {k: [] for k in kinds}
            for _ in range(rounds):
                for k, run in variants.items():
                    t = time.perf_counter()
                    await run()
                    rates[k].append(per_round / (time.perf_counter() - t))
            base = statistics.median(rates["none"])
            rows = []
            for k in kinds:
                m = statistics.median(rates[k])
                rows.append([names[k], f"{m:,.0f}", f"{1e6 / m:,.0f}", f"{base / m:.2f}"])
            table(
                f"(b) business transaction cost, {setup}, durable commits "
                f"(median of {rounds} rounds of {per_round})",
                ["variant", "tx/s", "us/tx", "cost vs alone"],
                rows,
            )
    finally:
        for c in a1 + a4:
            await c.close()
        p1.close()
        await admin.execute(f"DROP TABLE IF EXISTS {orders}")
        await admin.close()
        await loud.drop_schema()
        await quiet.close()
        await loud.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=200)
    parser.add_argument("--url", default=URL)
    parser.add_argument("--only", choices=["drain", "write"])
    parser.add_argument(
        "--writer", action="store_true", help="drain while another connection keeps committing"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    if args.only != "write":
        await drain_bench(args.url, args.rows, args.writer)
    if args.only != "drain":
        await write_bench(args.url, args.rounds, args.per_round)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    asyncio.run(main())
