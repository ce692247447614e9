"""Outbox on SQLite: msdata against the raw sqlite3 loop on the same work, in the same run.

(a) Drain: N pending rows (CloudEvents payloads, 100 keys) leave the table.
    raw:    one thread, one connection: BEGIN IMMEDIATE; SELECT 100 oldest; DELETE them;
            COMMIT (nothing published: the database side alone).
    msdata: OutboxRelay running in the background (``async with relay``) until all rows
            are published and marked: SqliteOutboxStore.claim (relay lease, per-key
            order), publish into the in-memory transport, mark_sent (DELETE); each store
            call is one hop to the store's thread, and the mark of one batch runs while
            the next is published.
(b) Write: a business transaction (one INSERT of an order + COMMIT) with and without
    ``outbox.add(conn, OrderPlaced(...), key=...)`` in it, on a sqlite3 connection.

Durability is printed with each table: the relay's own connection and the business
connection both use the ``synchronous`` level given (WAL mode).

With ``--headers`` every event carries a ``traceparent`` header (as with OpenTelemetry on),
in the payload and in the row's headers column.

Each table gives the median of the runs, and the per-run ratio msdata / raw as
min-median-max (the two loops run back to back in each run, their order alternating);
/proc/loadavg is printed at the start and the end.

    .venv/bin/python bench/bench_outbox_sqlite.py [--rows 100000] [--sync NORMAL|FULL]
        [--headers] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence

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


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return "n/a"


def spread(ratios: list[float]) -> str:
    """Per-run ratios as min-median-max."""
    return f"{min(ratios):.2f}-{statistics.median(ratios):.2f}-{max(ratios):.2f}"


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


def raw_drain(path: str, table: str, sync: str) -> int:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute(f"PRAGMA synchronous={sync}")
    total = 0
    select = (
        f"SELECT seq, message_id, topic, payload, partition_key FROM {table} ORDER BY seq LIMIT 100"
    )
    while True:
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute(select).fetchall()
        if not rows:
            conn.execute("COMMIT")
            break
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


def bench_drain(n: int, sync: str, runs: int, headers: bool = False) -> None:
    rows = rows_for(n, headers)
    # rows/s by the wall clock and by the process's CPU time: on a shared machine the CPU
    # figure is the steadier one (both loops run in one thread of this process)
    raw_rates, ms_rates, raw_cpu, ms_cpu = [], [], [], []
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "drain.db")
        store = SqliteOutboxStore(path, synchronous=sync, table_prefix="b_")
        asyncio.run(store.create_schema())

        def raw_run() -> None:
            fill(path, store, rows, sync)
            t, c = time.perf_counter(), time.process_time()
            assert raw_drain(path, "b_outbox", sync) == n
            raw_rates.append(n / (time.perf_counter() - t))
            raw_cpu.append(n / (time.process_time() - c))

        def msdata_run() -> None:
            fill(path, store, rows, sync)

            async def run() -> tuple[float, float]:
                s = SqliteOutboxStore(path, synchronous=sync, table_prefix="b_")
                t, c = time.perf_counter(), time.process_time()
                assert await msdata_drain(s, n) == n
                rates = n / (time.perf_counter() - t), n / (time.process_time() - c)
                await s.close()
                return rates

            wall, cpu = asyncio.run(run())
            ms_rates.append(wall)
            ms_cpu.append(cpu)

        for i in range(runs):
            # rotate the order, so neither loop always runs on a warmer machine
            for step in (raw_run, msdata_run) if i % 2 == 0 else (msdata_run, raw_run):
                step()
    med = statistics.median
    raw, ms = med(raw_rates), med(ms_rates)
    rc, mc = med(raw_cpu), med(ms_cpu)
    with_headers = ", a traceparent header on every row" if headers else ""
    print(
        f"\n(a) drain {n:,} rows, 100 keys, batches of 100, synchronous={sync}, WAL{with_headers}"
    )
    print(f"    median of {runs} runs each")
    print(f"    {'':<52}{'rows/s':>12}{'per CPU s':>12}")
    print(
        f"    {'raw sqlite3: SELECT 100 + DELETE, one tx, one thread':<52}{raw:>12,.0f}{rc:>12,.0f}"
    )
    print(f"    {'msdata OutboxRelay -> MemoryTransport':<52}{ms:>12,.0f}{mc:>12,.0f}")
    print(f"    {'ratio msdata / raw (target >= 0.80)':<52}{ms / raw:>12.2f}{mc / rc:>12.2f}")
    wall_ratios = [m / r for m, r in zip(ms_rates, raw_rates, strict=True)]
    cpu_ratios = [m / r for m, r in zip(ms_cpu, raw_cpu, strict=True)]
    print(
        f"    {'per-run ratio min-median-max':<40}{spread(wall_ratios):>24}{spread(cpu_ratios):>18}"
    )


def bench_add(n: int, sync: str, runs: int) -> None:
    plain_us: list[float] = []
    hand_us: list[float] = []
    outbox_us: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "add.db")
        store = SqliteOutboxStore(path, synchronous=sync)
        asyncio.run(store.create_schema())
        outbox = Outbox(store, registry=registry, source="orders")
        conn = connect(path, synchronous=sync)
        conn.execute(
            "CREATE TABLE orders (id TEXT PRIMARY KEY, customer TEXT NOT NULL, "
            "total_cents INTEGER NOT NULL, created_at TEXT NOT NULL)"
        )
        conn.commit()
        insert = "INSERT INTO orders VALUES (?, ?, ?, ?)"

        def plain() -> float:
            t = time.perf_counter()
            for _ in range(n):
                oid = uuid.uuid4().hex
                conn.execute(insert, (oid, "c-1", 1234, utc_now().isoformat()))
                conn.commit()
            return (time.perf_counter() - t) / n * 1e6

        handwritten_sql = (
            "INSERT INTO msdata_outbox (message_id, topic, type, payload, partition_key, "
            "aggregate_type, headers, created_at) VALUES (?,?,?,?,?,?,?,?)"
        )
        encoded = rows_for(1)[0].payload

        def handwritten() -> float:
            # the database's share alone: a pre-encoded row, one INSERT, no msdata code
            t = time.perf_counter()
            for _ in range(n):
                oid = uuid.uuid4().hex
                conn.execute(insert, (oid, "c-1", 1234, utc_now().isoformat()))
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
                conn.commit()
            return (time.perf_counter() - t) / n * 1e6

        def with_outbox() -> float:
            t = time.perf_counter()
            for _ in range(n):
                oid = uuid.uuid4().hex
                conn.execute(insert, (oid, "c-1", 1234, utc_now().isoformat()))
                outbox.add(
                    conn, OrderPlaced(order_id=oid, customer="c-1", total_cents=1234), key=oid
                )
                conn.commit()
            return (time.perf_counter() - t) / n * 1e6

        for _ in range(runs):
            plain_us.append(plain())
            hand_us.append(handwritten())
            outbox_us.append(with_outbox())
            conn.execute("DELETE FROM orders")
            conn.execute("DELETE FROM msdata_outbox")
            conn.commit()
        conn.close()
        asyncio.run(store.close())
    p, o = statistics.median(plain_us), statistics.median(outbox_us)
    h = statistics.median(hand_us)
    print(f"\n(b) business transaction, {n:,} per run, synchronous={sync}, WAL, median of {runs}")
    print(f"    {'':<52}{'us/tx':>9}{'tx/s':>10}")
    print(f"    {'raw: INSERT order + COMMIT':<52}{p:>9.1f}{1e6 / p:>10,.0f}")
    print(f"    {'hand-written: + INSERT of an encoded outbox row':<52}{h:>9.1f}{1e6 / h:>10,.0f}")
    print(f"    {'msdata: INSERT order + outbox.add + COMMIT':<52}{o:>9.1f}{1e6 / o:>10,.0f}")
    print(f"    {'ratio hand-written / raw (the database alone)':<52}{h / p:>9.2f}")
    print(f"    {'ratio msdata / raw (target <= 1.20)':<52}{o / p:>9.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sync", choices=["NORMAL", "FULL"], default=None)
    ap.add_argument("--drain-only", action="store_true", help="skip (b), the write cost")
    ap.add_argument(
        "--headers", action="store_true", help="a traceparent header on every row (drain)"
    )
    args = ap.parse_args()
    print(f"loadavg at start: {loadavg()}")
    syncs = [args.sync] if args.sync else ["NORMAL", "FULL"]
    print(
        f"msdata outbox on SQLite {sqlite3.sqlite_version} (stdlib sqlite3), {os.cpu_count()} cpus"
    )
    bench_drain(args.rows, "NORMAL", args.runs, args.headers)
    for sync in [] if args.drain_only else syncs:
        bench_add(20_000 if sync == "NORMAL" else 2_000, sync, args.runs)
    print(f"\nloadavg at end: {loadavg()}")


if __name__ == "__main__":
    main()
