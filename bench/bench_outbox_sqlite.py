"""Outbox on SQLite: msdata against the raw sqlite3 loop on the same work, in the same run.

(a) Drain: N pending rows (CloudEvents payloads, 100 keys) leave the table.
    raw:    one thread, one connection: BEGIN IMMEDIATE; SELECT 100 oldest; publish them
            (with their headers, parsed from the headers column when there are some) to
            the in-memory transport; DELETE them; COMMIT.
    msdata: OutboxRelay running in the background (``async with relay``) until all rows
            are published and marked: SqliteOutboxStore.claim (relay lease, per-key
            order), publish into the in-memory transport, mark_sent (DELETE); each store
            call is one hop to the store's thread, and the mark of one batch runs while
            the next is published.
(b) Write: a business transaction (one INSERT of an order + COMMIT) with and without
    ``outbox.add(conn, OrderPlaced(...), key=...)`` in it, on a sqlite3 connection; the
    hand-written outbox writes the same row (the same CloudEvents JSON document: id, time,
    source, type, correlation id, partition key, the event) with one ``to_json`` and one
    INSERT, and is checked at start to decode to the same envelope as msdata's row.

Durability is printed with each table: the relay's own connection and the business
connection both use the ``synchronous`` level given (WAL mode).

With ``--headers`` every event carries a ``traceparent`` header (as with OpenTelemetry on),
in the payload and in the row's headers column.

The paths run interleaved in one process, the order rotating each round (bench/_fair.py),
at least 5 rounds; each table gives the medians and the per-round ratios min-median-max,
by wall clock and by CPU time; /proc/loadavg is printed at the start and the end.

    .venv/bin/python bench/bench_outbox_sqlite.py [--rows 100000] [--sync NORMAL|FULL]
        [--headers] [--rounds 5] [--drain-only|--add-only]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence

from _fair import loadavg, ratios, run_rounds, spread
from pydantic_core import to_json

from msdata.adapters.memory import MemoryTransport
from msdata.adapters.sqlite import SqliteOutboxStore, connect
from msdata.ids import new_id, utc_now
from msdata.messages import Event, MessageRegistry, make_envelope, message_type
from msdata.outbox import Outbox, OutboxRelay, OutboxRow
from msdata.serialization import CloudEventsCodec
from msdata.transport import TransportMessage

registry = MessageRegistry()


@message_type("bench.OrderPlaced", registry=registry)
class OrderPlaced(Event):
    order_id: str
    customer: str
    total_cents: int


TRACEPARENT = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}


def rows_for(n: int, headers: bool = False) -> list[OutboxRow]:
    codec = CloudEventsCodec(registry)
    payload = codec.encode(
        make_envelope(
            OrderPlaced(order_id="o-1", customer="c-1", total_cents=1234),
            registry=registry,
            headers=TRACEPARENT if headers else None,
        )
    )
    return [
        OutboxRow(
            message_id=new_id(),
            topic="bench.OrderPlaced",
            type="bench.OrderPlaced",
            payload=payload,
            partition_key=f"order-{i % 100}",
            aggregate_type="bench.OrderPlaced",
            headers=TRACEPARENT if headers else {},
        )
        for i in range(n)
    ]


def fill(path: str, store: SqliteOutboxStore, rows: list[OutboxRow], sync: str) -> None:
    conn = connect(path, synchronous=sync)
    conn.execute(f"DELETE FROM {store.table_prefix}outbox")  # the last run's tombstone row
    conn.commit()
    for i in range(0, len(rows), 10_000):
        store.append(conn, rows[i : i + 10_000])
        conn.commit()
    # one timestamp per row, as when each row came from its own business transaction
    conn.execute(f"UPDATE {store.table_prefix}outbox SET created_at = created_at + seq * 1e-6")
    conn.commit()
    conn.close()


async def raw_drain(path: str, table: str, sync: str, transport: MemoryTransport) -> int:
    """The same work as the relay, by hand: one connection, one thread; per batch BEGIN
    IMMEDIATE, SELECT the 100 oldest, publish them to the in-memory transport, DELETE them,
    COMMIT (the relay publishes outside the transaction; either way one publish per batch)."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute(f"PRAGMA synchronous={sync}")
    total = 0
    select = (
        f"SELECT seq, message_id, topic, payload, partition_key, headers FROM {table} "
        "ORDER BY seq LIMIT 100"
    )
    loads = json.loads
    while True:
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute(select).fetchall()
        if not rows:
            conn.execute("COMMIT")
            break
        await transport.publish(
            rows[0][2],
            [
                TransportMessage(r[1], r[3], r[4], loads(r[5]))
                if r[5]
                else TransportMessage(r[1], r[3], r[4])
                for r in rows
            ],
        )
        conn.execute(
            f"DELETE FROM {table} WHERE seq IN ({','.join('?' * len(rows))})",
            [r[0] for r in rows],
        )
        conn.execute("COMMIT")
        total += len(rows)
    conn.close()
    return total


class CountingTransport(MemoryTransport):
    """The in-memory transport, telling when ``target`` messages were accepted."""

    def __init__(self, target: int) -> None:
        super().__init__()
        self.count = 0
        self.target = target
        self.done = asyncio.Event()

    async def publish(self, topic: str, messages: Sequence[TransportMessage]) -> None:
        await super().publish(topic, messages)
        self.count += len(messages)
        if self.count >= self.target:
            self.done.set()


async def msdata_drain(store: SqliteOutboxStore, n: int) -> int:
    """The relay as a service runs it: started in the background, until all is published
    (the last batch's mark finishes in ``stop``, inside the timing)."""
    transport = CountingTransport(n)
    relay = OutboxRelay(store, transport, batch_size=100, relay_id="bench")
    async with relay:
        await transport.done.wait()
    return transport.count


async def bench_drain(n: int, sync: str, rounds: int, headers: bool = False) -> None:
    rows = rows_for(n, headers)
    # rows/s by the wall clock and by the process's CPU time (both loops run in this
    # process, on the event loop's thread; the CPU figure is the steadier one)
    cpu: dict[str, list[float]] = {"raw": [], "msdata": []}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "drain.db")
        store = SqliteOutboxStore(path, synchronous=sync, table_prefix="b_")
        await store.create_schema()

        async def raw_run() -> float:
            t, c = time.perf_counter(), time.process_time()
            assert await raw_drain(path, "b_outbox", sync, CountingTransport(n)) == n
            cpu["raw"].append(n / (time.process_time() - c))
            return n / (time.perf_counter() - t)

        async def msdata_run() -> float:
            s = SqliteOutboxStore(path, synchronous=sync, table_prefix="b_")
            t, c = time.perf_counter(), time.process_time()
            assert await msdata_drain(s, n) == n
            rate = n / (time.perf_counter() - t)
            cpu["msdata"].append(n / (time.process_time() - c))
            await s.close()
            return rate

        wall = await run_rounds(
            {"raw": raw_run, "msdata": msdata_run},
            rounds,
            between=lambda: fill(path, store, rows, sync),
        )
        await store.close()
    med = statistics.median
    with_headers = ", a traceparent header on every row" if headers else ""
    print(
        f"\n(a) drain {n:,} rows, 100 keys, batches of 100, synchronous={sync}, WAL{with_headers};"
        f" {rounds} interleaved rounds"
    )
    print(f"    {'':<58}{'rows/s':>10}{'per CPU s':>12}")
    raw_label = "raw sqlite3: SELECT 100, publish, DELETE, COMMIT"
    print(f"    {raw_label:<58}{med(wall['raw']):>10,.0f}{med(cpu['raw']):>12,.0f}")
    ms_label = "msdata OutboxRelay -> MemoryTransport"
    print(f"    {ms_label:<58}{med(wall['msdata']):>10,.0f}{med(cpu['msdata']):>12,.0f}")
    print(
        f"    {'msdata / raw per round, min-median-max (target >= 0.80)':<58}"
        f"{spread(ratios(wall['msdata'], wall['raw'])):>16}"
        f"{spread(ratios(cpu['msdata'], cpu['raw'])):>16}"
    )


async def bench_add(n: int, sync: str, rounds: int) -> None:
    """A one-row business transaction (INSERT an order, COMMIT) alone, with a hand-written
    outbox INSERT of the same row, and with ``outbox.add``: the paths interleaved."""
    cpu: dict[str, list[float]] = {"plain": [], "floor": [], "hand": [], "msdata": []}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "add.db")
        store = SqliteOutboxStore(path, synchronous=sync)
        await store.create_schema()
        outbox = Outbox(store, registry=registry, source="orders")
        conn = connect(path, synchronous=sync)
        conn.execute(
            "CREATE TABLE orders (id TEXT PRIMARY KEY, customer TEXT NOT NULL, "
            "total_cents INTEGER NOT NULL, created_at TEXT NOT NULL)"
        )
        conn.commit()
        insert = "INSERT INTO orders VALUES (?, ?, ?, ?)"
        handwritten_sql = (
            "INSERT INTO msdata_outbox (message_id, topic, type, payload, partition_key, "
            "aggregate_type, headers, created_at) VALUES (?,?,?,?,?,?,?,?)"
        )
        key = uuid.uuid4().hex
        # the floor writes a row of msdata's size: an envelope as outbox.add encodes it
        encoded = outbox.codec.encode(
            outbox.envelope(OrderPlaced(order_id=key, customer="c-1", total_cents=1234), key=key)
        )

        def timed(body: Callable[[str], None], key: str) -> Callable[[], float]:
            def run() -> float:
                t, c = time.perf_counter(), time.process_time()
                for _ in range(n):
                    oid = uuid.uuid4().hex
                    conn.execute(insert, (oid, "c-1", 1234, utc_now().isoformat()))
                    body(oid)
                    conn.commit()
                cpu[key].append((time.process_time() - c) / n * 1e6)
                return (time.perf_counter() - t) / n * 1e6

            return run

        def nothing(oid: str) -> None:
            pass

        def floor(oid: str) -> None:
            # the database's share alone: a pre-encoded row, one INSERT, no Python work
            conn.execute(
                handwritten_sql,
                (
                    new_id(),
                    "bench.OrderPlaced",
                    "bench.OrderPlaced",
                    encoded,
                    oid,
                    "bench.OrderPlaced",
                    None,
                    time.time(),
                ),
            )

        def hand_payload(oid: str, mid: str) -> bytes:
            # the same CloudEvents document as msdata's row, by hand: one to_json of a dict
            # holding the event (pydantic_core formats the time, "Z" for UTC)
            return to_json(
                {
                    "specversion": "1.0",
                    "id": mid,
                    "source": "orders",
                    "type": "bench.OrderPlaced",
                    "time": utc_now(),
                    "datacontenttype": "application/json",
                    "schemaversion": 1,
                    "correlationid": mid,
                    "partitionkey": oid,
                    "data": OrderPlaced(order_id=oid, customer="c-1", total_cents=1234),
                }
            )

        def hand(oid: str) -> None:
            # what a hand-written outbox does: id, time, the event in its envelope as JSON,
            # one INSERT of the same row
            mid = new_id()
            conn.execute(
                handwritten_sql,
                (
                    mid,
                    "bench.OrderPlaced",
                    "bench.OrderPlaced",
                    hand_payload(oid, mid),
                    oid,
                    "bench.OrderPlaced",
                    None,
                    time.time(),
                ),
            )

        # like for like: the hand-written row reads back as msdata's row does
        mine = outbox.codec.decode(hand_payload(key, "m-1"))
        (theirs,) = outbox.add(
            conn, OrderPlaced(order_id=key, customer="c-1", total_cents=1234), key=key
        )
        conn.rollback()
        assert mine._replace(id=theirs.id, time=theirs.time, correlation_id=theirs.id) == theirs

        def add(oid: str) -> None:
            outbox.add(conn, OrderPlaced(order_id=oid, customer="c-1", total_cents=1234), key=oid)

        def reset() -> None:
            conn.execute("DELETE FROM orders")
            conn.execute("DELETE FROM msdata_outbox")
            conn.commit()

        wall = await run_rounds(
            {
                "plain": timed(nothing, "plain"),
                "floor": timed(floor, "floor"),
                "hand": timed(hand, "hand"),
                "msdata": timed(add, "msdata"),
            },
            rounds,
            between=reset,
        )
        conn.close()
        await store.close()
    med = statistics.median
    print(
        f"\n(b) business transaction, {n:,} per round, synchronous={sync}, WAL,"
        f" {rounds} interleaved rounds (us/tx median; ratios per round min-median-max)"
    )
    labels = {
        "plain": "INSERT order + COMMIT",
        "floor": "+ INSERT of a pre-encoded outbox row (the floor)",
        "hand": "+ hand-written outbox: id, envelope to_json, INSERT",
        "msdata": "+ outbox.add",
    }
    print(f"    {'':<56}{'us/tx':>8}{'CPU us':>8}")
    for k, label in labels.items():
        print(f"    {label:<56}{med(wall[k]):>8.1f}{med(cpu[k]):>8.1f}")
    clock = "wall" if sync == "FULL" else "CPU"
    src = wall if sync == "FULL" else cpu
    print(f"    ratios by {clock} time:")
    for label, a, b in (
        ("floor / alone (the database alone)", "floor", "plain"),
        ("msdata / hand-written (target <= 1.10)", "msdata", "hand"),
        ("msdata / floor", "msdata", "floor"),
    ):
        print(f"    {label:<56}{spread(ratios(src[a], src[b]))}")


async def amain() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sync", choices=["NORMAL", "FULL"], default=None)
    ap.add_argument("--drain-only", action="store_true", help="skip (b), the write cost")
    ap.add_argument("--add-only", action="store_true", help="skip (a), the drain")
    ap.add_argument(
        "--headers", action="store_true", help="a traceparent header on every row (drain)"
    )
    args = ap.parse_args()
    print(f"loadavg at start: {loadavg()}")
    syncs = [args.sync] if args.sync else ["NORMAL", "FULL"]
    print(
        f"msdata outbox on SQLite {sqlite3.sqlite_version} (stdlib sqlite3), {os.cpu_count()} cpus"
    )
    if not args.add_only:
        await bench_drain(args.rows, "NORMAL", args.rounds, args.headers)
    for sync in [] if args.drain_only else syncs:
        await bench_add(5_000 if sync == "NORMAL" else 1_000, sync, args.rounds)
    print(f"\nloadavg at end: {loadavg()}")


def main() -> None:
    asyncio.run(amain())


if __name__ == "__main__":
    main()
