"""Idempotency keys: what msdata adds on PostgreSQL, SQLite and Redis, and in front of an app.

(a) replay: ``keys.run`` on a COMPLETED key (claim + decode of the stored result) against
    one raw GET of the same bytes by primary key from the same store (asyncpg
    ``fetchrow``; sqlite3 ``SELECT`` on the loop's thread; redis-py ``GET``). Target <= 1.3x.
(b) first execution: ``keys.run`` on a new key with a handler that returns at once, against
    calling the handler bare; the store calls it makes are counted (target <= 2).
(c) ASGI middleware: the same FastAPI app served by uvicorn with and without
    IdempotencyMiddleware (SQLite store), one client, sequential POSTs: a new key each
    time, and a replayed key, against the plain app.

Rounds interleave the paths in rotating order; each prints per-round ratios
min-median-max. Run: ``.venv/bin/python bench/bench_idempotency.py [N] [rounds]``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis

from msdata.adapters.postgres.idempotency import PostgresIdempotencyStore
from msdata.adapters.redis.idempotency import RedisIdempotencyStore
from msdata.adapters.sqlite.idempotency import SqliteIdempotencyStore
from msdata.idempotency import IdempotencyKeys

PG = "postgresql://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parent.parent
RESULT = {"payment_id": "pay_0123456789", "amount": 1234, "currency": "EUR", "status": "ok"}


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


def ratios(pairs: list[tuple[float, float]]) -> str:
    rs = sorted(md / raw for raw, md in pairs)
    return f"{rs[0]:.2f}-{statistics.median(rs):.2f}-{rs[-1]:.2f}"


Op = Callable[[int], Awaitable[Any]]


async def paired(n: int, a: Op, b: Op) -> tuple[float, float]:
    """Microseconds per call of ``a`` and of ``b`` over n calls each, alternating call by
    call (a b b a a b ...), so both see the same load on a shared machine."""
    pc = time.perf_counter
    ta = tb = 0.0
    for i in range(n):
        if i % 2:
            t0 = pc()
            await a(i)
            t1 = pc()
            await b(i)
            t2 = pc()
            ta += t1 - t0
            tb += t2 - t1
        else:
            t0 = pc()
            await b(i)
            t1 = pc()
            await a(i)
            t2 = pc()
            tb += t1 - t0
            ta += t2 - t1
    return ta / n * 1e6, tb / n * 1e6


class Counting:
    """Wraps a store and counts the calls the state machine makes."""

    def __init__(self, store: Any) -> None:
        self.store, self.calls = store, 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        if not name.endswith("_async"):
            return attr

        async def counted(*args: Any) -> Any:
            self.calls += 1
            return await attr(*args)

        return counted


async def handler() -> dict[str, Any]:
    return RESULT


async def bench_store(
    name: str,
    store: Any,
    raw_get: Op,
    n: int,
    rounds: int,
    pool_get: Op | None = None,
) -> None:
    keys = IdempotencyKeys(store)
    await keys.run("replayed", handler, scope="bench")  # the COMPLETED key
    counting = Counting(store)
    ckeys = IdempotencyKeys(counting)  # type: ignore[arg-type]
    run_id = uuid.uuid4().hex[:8]
    fresh = itertools.count()

    async def replay(i: int) -> Any:
        return await keys.run("replayed", handler, scope="bench")

    async def first(i: int) -> Any:
        return await ckeys.run(f"{run_id}-{next(fresh)}", handler, scope="bench")

    async def bare(i: int) -> Any:
        return await handler()

    rep: list[tuple[float, float]] = []
    fst: list[tuple[float, float]] = []
    bar: list[float] = []
    rep_pool: list[tuple[float, float]] = []
    for _ in range(rounds):
        rep.append(await paired(n, raw_get, replay))
        if pool_get is not None:
            rep_pool.append(await paired(n, pool_get, replay))
        fst.append(await paired(n, raw_get, first))
        bar.append((await paired(n, bare, bare))[0])
    calls = counting.calls / (rounds * n)
    raw_us = statistics.median(r for r, _ in rep)
    rep_us = statistics.median(m for _, m in rep)
    first_us = statistics.median(m for _, m in fst)
    print(
        f"{name:<11} raw GET {raw_us:7.1f} us | replay {rep_us:7.1f} us, ratio {ratios(rep)} "
        f"| first run {first_us:7.1f} us ({calls:.0f} store calls), {ratios(fst)} raw GETs; "
        f"bare handler {statistics.median(bar):.2f} us"
    )
    if rep_pool:
        print(f"{'':<11} replay vs a raw GET through an asyncpg pool: ratio {ratios(rep_pool)}")


async def _no_reset(conn: Any) -> None:
    return None


async def stores(n: int, rounds: int) -> None:
    prefix = f"b{uuid.uuid4().hex[:8]}_"
    # PostgreSQL
    pg = PostgresIdempotencyStore(PG, table_prefix=prefix)
    await pg.create_schema()
    conn = await asyncpg.connect(PG)  # one connection: the raw GET is one round trip
    # and a pool like the store's (no reset round trip on release)
    pool = await asyncpg.create_pool(PG, min_size=1, max_size=4, reset=_no_reset)
    sql = f"SELECT response FROM {pg.table} WHERE scope = $1 AND key = $2"
    try:
        await bench_store(
            "PostgreSQL",
            pg,
            lambda i: conn.fetchrow(sql, "bench", "replayed"),
            n,
            rounds,
            pool_get=lambda i: pool.fetchrow(sql, "bench", "replayed"),
        )
    finally:
        await pg.drop_schema()
        await pg.close()
        await conn.close()
        await pool.close()
    # SQLite (synchronous NORMAL: the store's calls run on the loop's thread)
    with tempfile.TemporaryDirectory() as d:
        lite = SqliteIdempotencyStore(Path(d) / "b.db")
        await lite.create_schema()
        raw = sqlite3.connect(Path(d) / "b.db", isolation_level=None)
        q = "SELECT response FROM msdata_idempotency WHERE scope = ? AND key = ?"

        async def lite_get(i: int) -> Any:
            return raw.execute(q, ("bench", "replayed")).fetchone()

        try:
            await bench_store("SQLite", lite, lite_get, n, rounds)
        finally:
            raw.close()
            await lite.close()
    # Redis
    client = aioredis.Redis.from_url(REDIS)
    rprefix = f"bench:idem:{uuid.uuid4().hex[:8]}:"
    rs = RedisIdempotencyStore(client, key_prefix=rprefix)
    await client.set(rprefix + "raw", b"R" + b'{"payment_id":"pay_0123456789"}')
    try:
        await bench_store("Redis", rs, lambda i: client.get(rprefix + "raw"), n, rounds)
    finally:
        found = [k async for k in client.scan_iter(match=f"{rprefix}*")]
        if found:
            await client.delete(*found)
        await client.aclose()


# -- (c) the middleware over real HTTP ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def middleware(n: int, rounds: int) -> None:
    app = str(ROOT / "tests" / "idempotency_app.py")
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as d:
        urls = {}
        for label, plain in (("plain", "1"), ("idem", "0")):
            port = _free_port()
            env = dict(
                os.environ, PYTHONPATH=str(ROOT / "src"), IDEM_PLAIN=plain,
                IDEM_DB=str(Path(d) / "app.db"),
            )  # fmt: skip
            server = [sys.executable, app, str(port)]
            procs.append(subprocess.Popen(server, env=env))  # noqa: ASYNC220 (not waited for)
            urls[label] = f"http://127.0.0.1:{port}/payments"
        try:
            async with httpx.AsyncClient() as c:
                for url in urls.values():
                    for _ in range(300):
                        try:
                            await c.post(
                                url,
                                json={"amount": 1},
                                headers={"x-api-key": "b", "Idempotency-Key": "warm"},
                            )
                            break
                        except httpx.HTTPError:
                            await asyncio.sleep(0.1)
                run_id = uuid.uuid4().hex[:8]

                def post(url: str, key: Callable[[int], str]) -> Callable[[int], Awaitable[Any]]:
                    async def op(i: int) -> Any:
                        h = {"x-api-key": "b", "Idempotency-Key": key(i)}
                        r = await c.post(url, json={"amount": 1}, headers=h)
                        assert r.status_code == 201, r.text

                    return op

                plain = post(urls["plain"], lambda i: "unused")
                fresh = itertools.count()
                new_key = post(urls["idem"], lambda i: f"{run_id}-{next(fresh)}")
                replay = post(urls["idem"], lambda i: "warm")
                got: dict[str, list[tuple[float, float]]] = {"new key": [], "replay": []}
                for _ in range(rounds):
                    got["new key"].append(await paired(n, plain, new_key))
                    got["replay"].append(await paired(n, plain, replay))
        finally:
            for p in procs:
                p.kill()
                p.wait()
    for label, pairs in got.items():
        base = statistics.median(r for r, _ in pairs)
        added = statistics.median(m - r for r, m in pairs)
        print(
            f"ASGI {label:<8} plain app {base:6.0f} us/request | with the middleware "
            f"+{added:.0f} us, ratio {ratios(pairs)}"
        )


async def main(n: int, rounds: int) -> None:
    print(f"loadavg at start {loadavg()}; N={n} per path per round, {rounds} rounds")
    await stores(n, rounds)
    await middleware(max(100, n // 5), rounds)
    print(f"loadavg at end {loadavg()}")


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(main(int(args[0]) if args else 2000, int(args[1]) if len(args) > 1 else 5))
