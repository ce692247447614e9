"""Client CPU of turning one claimed PostgreSQL batch into transport messages.

The rows of a batch of 100 (``_RECORD_COLUMNS``, fetched once with asyncpg) converted,
in CPU time (``time.process_time``), by the two paths the relay takes:

- records: ``_records`` (the ``OutboxRecord`` of each row, what ``claim`` and
  ``mark_sent_and_claim`` return), then the relay's one-topic pass building a
  ``TransportMessage`` per record (``OutboxRelay._fast_batch`` without the payload check,
  which both paths run);
- batch: ``_batch`` (what ``claim_messages`` returns: the messages, no records).

With and without headers (``--no-headers``); 7 rounds, the order alternating; µs per row
min-median-max; /proc/loadavg at start and end.

Run: .venv/bin/python bench/bench_pg_batch.py [--url URL] [--no-headers]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg

from msdata.adapters.postgres import outbox as pg
from msdata.testing.conformance.outbox import make_rows
from msdata.transport import TransportMessage

URL = "postgresql://postgres@127.0.0.1:5432/test"


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default=URL)
    parser.add_argument("--no-headers", action="store_true")
    parser.add_argument("--calls", type=int, default=2000, help="batches per round")
    args = parser.parse_args()
    print("loadavg at start:", _load())
    store = pg.PostgresOutboxStore(args.url, table_prefix=f"b{uuid.uuid4().hex[:10]}_")
    await store.create_schema()
    try:
        conn = await asyncpg.connect(args.url)
        try:
            async with conn.transaction():
                await store.append_async(conn, make_rows(100, keys=[f"k{i}" for i in range(50)]))
            if args.no_headers:
                await conn.execute(f"UPDATE {store.table} SET headers = '{{}}'")
            rows = await conn.fetch(f"SELECT {pg._RECORD_COLUMNS} FROM {store.table} ORDER BY seq")
        finally:
            await conn.close()
    finally:
        await store.drop_schema()
        await store.close()

    new = tuple.__new__

    def records() -> Any:
        recs = pg._records(rows)
        topic = recs[0].topic
        out: list[TransportMessage] = []
        add = out.append
        for r in recs:
            p = r[4]
            if r[2] != topic or type(p) is not bytes:
                return None
            add(new(TransportMessage, (r[1], p, r[5], r[6])))
        return out

    def batch() -> Any:
        got = pg._batch(rows)
        assert isinstance(got, pg.OutboxBatch)
        return got.messages

    assert records() == batch()
    paths: list[tuple[str, Callable[[], Any]]] = [("records", records), ("batch", batch)]
    per: dict[str, list[float]] = {name: [] for name, _ in paths}
    for rnd in range(7):
        for name, f in paths if rnd % 2 else paths[::-1]:
            t = time.process_time()
            for _ in range(args.calls):
                f()
            per[name].append((time.process_time() - t) / (args.calls * len(rows)) * 1e6)
    headers = "no headers" if args.no_headers else "one header"
    for name, v in per.items():
        print(f"{name:8} ({headers}) us/row {min(v):.3f}-{statistics.median(v):.3f}-{max(v):.3f}")
    print("loadavg at end:", _load())


if __name__ == "__main__":
    asyncio.run(main())
