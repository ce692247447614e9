"""The partitioned PostgreSQL step's server CPU per row over a backlog, by relay count.

A partitioned store, ``--rows`` pending rows (1000 keys) appended at once, then k relays'
steps (``claim``, then ``mark_sent_and_claim`` of the batch each holds) driven round-robin
by one process over one connection (no concurrency) until every relay gets nothing; the
CPU time of that connection's backend (``/proc/PID/stat``, Linux, the server on this host)
per row drained. Then 2000 more rows and one step under ``auto_explain`` (analyze,
buffers, nested statements), written to ``/tmp/bench_pg_steps_k{k}.txt``. ``--analyze``:
``ANALYZE`` the table after the fill (the shared server runs without autovacuum).

Run: .venv/bin/python bench/bench_pg_steps.py [--relays 1,2,4] [--rows N] [--analyze]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from typing import Any

import asyncpg

from msdata.adapters.postgres.outbox import PostgresOutboxStore
from msdata.testing.conformance.outbox import make_rows

URL = "postgresql://postgres@127.0.0.1:5432/test"
_KEYS = [f"k{i}" for i in range(1000)]


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


async def _step(
    store: PostgresOutboxStore, relay: str, held: list[int], batch: int = 100
) -> list[int]:
    if held:
        got = await store.mark_sent_and_claim(relay, held, batch, 30.0)
    else:
        got = await store.claim(relay, batch, 30.0)
    return [r.seq for r in got]


async def run(url: str, k: int, n: int, analyze: bool, batch: int = 100) -> None:
    store = PostgresOutboxStore(
        url, table_prefix=f"b{uuid.uuid4().hex[:10]}_", partitioned=True, max_size=1
    )
    await store.create_schema()
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await store.append_async(conn, make_rows(n, keys=_KEYS))
        if analyze:
            await conn.execute(f"ANALYZE {store.table}")
        pid = await store._db.call("pid", lambda p: p.fetchval("SELECT pg_backend_pid()"))
        relays = [f"r{i}" for i in range(k)]
        held: dict[str, list[int]] = {r: [] for r in relays}
        for _ in range(3):  # registration and rebalancing
            for r in relays:
                held[r] = await _step(store, r, held[r])
        # a relay whose claim comes back empty has drained its partitions (nothing is
        # appended meanwhile, the owners are settled): it steps no more, so that the
        # relays with a larger share (keys hash unevenly: 265 of 1000 keys at most for one
        # of 4 relays) do not count the others' empty steps as the drain's cost
        c0, done, steps, p0 = _cpu(pid), 0, 0, time.process_time()
        stepping = [r for r in relays if held[r]]
        while stepping:
            for r in stepping:
                done += len(held[r])
                held[r] = await _step(store, r, held[r], batch)
                steps += 1
            stepping = [r for r in stepping if held[r]]
        server = _cpu(pid) - c0
        client = time.process_time() - p0
        pages = await conn.fetchval(f"SELECT pg_relation_size('{store.inflight_table}') / 8192")
        print(
            f"relays {k}, batch {batch}: {done} rows, {steps} steps, server CPU per row "
            f"{server / done * 1e6:.1f} us, per step {server / steps * 1e6:.0f} us; this "
            f"process {client / done * 1e6:.1f} us per row "
            f"(in-flight table {pages} pages)",
            flush=True,
        )
        async with conn.transaction():
            await store.append_async(conn, make_rows(2000, keys=_KEYS))
        for _ in range(2):
            for r in relays:
                held[r] = await _step(store, r, held[r])
        notes: list[str] = []
        conn.add_log_listener(lambda c, m: notes.append(m.message))
        await conn.execute(
            "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0; "
            "SET auto_explain.log_analyze = on; SET auto_explain.log_buffers = on; "
            "SET auto_explain.log_nested_statements = on; SET auto_explain.log_timing = off; "
            "SET auto_explain.log_level = notice"
        )
        args: list[Any] = [relays[0], held[relays[0]]]
        await conn.fetch(
            f"SELECT seq FROM {store._psent_fn}($1, $2::bigint[], false, 100, 30.0, false, true)",
            *args,
        )
        await asyncio.sleep(0.2)
        _write(f"/tmp/bench_pg_steps_k{k}.txt", "\n\n".join(notes))
    finally:
        await conn.close()
        await store.drop_schema()
        await store.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default=URL)
    parser.add_argument("--relays", default="1,2,4")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--analyze", action="store_true")
    parser.add_argument("--batch", default="100", help="batch sizes (comma-separated)")
    args = parser.parse_args()
    print("loadavg at start:", _load())
    for batch in map(int, args.batch.split(",")):
        for k in map(int, args.relays.split(",")):
            await run(args.url, k, args.rows, args.analyze, batch)
    print("loadavg at end:", _load())


if __name__ == "__main__":
    asyncio.run(main())
