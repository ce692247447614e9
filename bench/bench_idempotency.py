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


async def timed(n: int, op: Callable[[int], Awaitable[Any]]) -> float:
    """Microseconds per call over n sequential calls."""
    t0 = time.perf_counter()
    for i in range(n):
        await op(i)
    return (time.perf_counter() - t0) / n * 1e6


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
    name: str, store: Any, raw_get: Callable[[int], Awaitable[Any]], n: int, rounds: int
) -> None:
    keys = IdempotencyKeys(store)
    await keys.run("replayed", handler, scope="bench")  # the COMPLETED key
    counting = Counting(store)
    ckeys = IdempotencyKeys(counting)  # type: ignore[arg-type]
    run_id = uuid.uuid4().hex[:8]

    async def replay(i: int) -> Any:
        return await keys.run("replayed", handler, scope="bench")

    async def first(i: int) -> Any:
        return await ckeys.run(f"{run_id}-{rnd}-{i}", handler, scope="bench")

    async def bare(i: int) -> Any:
        return await handler()

    rep: list[tuple[float, float]] = []
    fst: list[tuple[float, float]] = []
    us: dict[str, list[float]] = {"raw": [], "replay": [], "first": [], "bare": []}
    for rnd in range(rounds):
        order = [("raw", raw_get), ("replay", replay), ("first", first), ("bare", bare)]
        k = rnd % len(order)
        got = {}
        for label, op in order[k:] + order[:k]:
            got[label] = await timed(n, op)
            us[label].append(got[label])
        rep.append((got["raw"], got["replay"]))
        fst.append((got["raw"], got["first"]))
    calls = counting.calls / (rounds * n)
    med = {k: statistics.median(v) for k, v in us.items()}
    print(
        f"{name:<11} raw GET {med['raw']:7.1f} us | replay {med['replay']:7.1f} us "
        f"ratio {ratios(rep)} | first run {med['first']:7.1f} us ({calls:.0f} store calls) "
        f"= {ratios(fst)}x raw GET, bare handler {med['bare']:.2f} us"
    )


async def stores(n: int, rounds: int) -> None:
    prefix = f"b{uuid.uuid4().hex[:8]}_"
    # PostgreSQL
    pg = PostgresIdempotencyStore(PG, table_prefix=prefix)
    await pg.create_schema()
    pool = await asyncpg.create_pool(PG, min_size=1, max_size=1)
    sql = f"SELECT response FROM {pg.table} WHERE scope = $1 AND key = $2"
    try:
        await bench_store(
            "PostgreSQL", pg, lambda i: pool.fetchrow(sql, "bench", "replayed"), n, rounds
        )
    finally:
        await pg.drop_schema()
        await pg.close()
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

                paths = [
                    ("plain", post(urls["plain"], lambda i: "unused")),
                    ("new key", post(urls["idem"], lambda i: f"{run_id}-{rnd}-{i}")),
                    ("replay", post(urls["idem"], lambda i: "warm")),
                ]
                got: dict[str, list[float]] = {p[0]: [] for p in paths}
                for rnd in range(rounds):
                    k = rnd % len(paths)
                    for label, op in paths[k:] + paths[:k]:
                        got[label].append(await timed(n, op))
        finally:
            for p in procs:
                p.kill()
                p.wait()
    plain = got["plain"]
    for label in ("new key", "replay"):
        pairs = list(zip(plain, got[label], strict=True))
        added = statistics.median(m - r for r, m in pairs)
        print(
            f"ASGI {label:<8} plain {statistics.median(plain):7.0f} us | with middleware "
            f"{statistics.median(got[label]):7.0f} us, +{added:.0f} us, ratio {ratios(pairs)}"
        )


async def main(n: int, rounds: int) -> None:
    print(f"loadavg at start {loadavg()}; N={n} per path per round, {rounds} rounds")
    await stores(n, rounds)
    await middleware(max(100, n // 5), rounds)
    print(f"loadavg at end {loadavg()}")


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(main(int(args[0]) if args else 2000, int(args[1]) if len(args) > 1 else 5))
