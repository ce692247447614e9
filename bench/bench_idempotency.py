"""Idempotency keys: what msdata adds on PostgreSQL, SQLite and Redis, and in front of an app.

(a) replay: ``keys.run`` on a COMPLETED key (claim + decode of the stored result) against a
    hand-written replay from the same store, doing the same work (bench/README.md,
    "Baselines do the same work"): one read of the record by (owner, key) — fingerprint,
    state, expiry, response — on the same kind of connection; the expiry checked against
    the current time, the fingerprint compared, the stored response JSON decoded
    (``pydantic_core.from_json``). asyncpg ``fetchrow`` on the store's own connection (a
    lone call of the store's runs on one connection it keeps out of its pool; the same one,
    so that both sides talk to the same server backend: bench/README.md); sqlite3
    ``SELECT`` on the loop's thread; redis-py ``HMGET`` of the record's hash. Target
    <= 1.3x. Printed too, for reference: the same against a bare GET of the response
    column alone (no checks, no decode), and on PostgreSQL against the hand-written replay
    through an asyncpg pool.
(b) first execution: ``keys.run`` on a new key with a handler that returns at once, against
    calling the handler bare; the store calls it makes are counted (target <= 2).
(c) ASGI middleware: the same FastAPI app served by uvicorn with and without
    IdempotencyMiddleware (SQLite store), one client, sequential POSTs: a new key each
    time, and a replayed key, against the plain app.

Calls alternate path by path within a round; rounds repeat; each figure prints per-round
ratios min-median-max, and /proc/loadavg at the start and end.
Run: ``.venv/bin/python bench/bench_idempotency.py [N] [rounds]``; ``--sqlite-loop`` and
``--pg-loop`` (``hand|msdata N [dsn]``) run one replay path alone, to count instructions.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis
from pydantic_core import from_json

from msdata.adapters.postgres.idempotency import PostgresIdempotencyStore
from msdata.adapters.redis.idempotency import RedisIdempotencyStore
from msdata.adapters.sqlite.idempotency import SqliteIdempotencyStore
from msdata.idempotency import IdempotencyKeys

PG = "postgresql://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parent.parent
RESULT = {"payment_id": "pay_0123456789", "amount": 1234, "currency": "EUR", "status": "ok"}
#: the request's fingerprint, stored with the key and compared on every replay (both sides)
FP = "9f2c4e1b7a05d3c8e6f1a2b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8"


def replayed(fingerprint: str, completed: Any, expired: bool, response: bytes) -> Any:
    """What a hand-written replay does with the record it read: the checks msdata makes
    (live, same request, completed) and the decode of the stored JSON (after msdata's
    one-byte kind, as stored) with the fastest decoder at hand, pydantic-core's
    ``from_json`` (0.55 us here; the stdlib's ``json.loads`` takes 2.3 us, which would
    flatter msdata)."""
    if expired:
        raise AssertionError("the bench's key expired")
    if fingerprint and fingerprint != FP:
        raise AssertionError("reused with another request")
    if not completed:
        raise AssertionError("in progress")
    return from_json(response[1:])


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


Pair = tuple[float, float, float, float]


def ratios(pairs: list[Pair], cpu: bool = False) -> str:
    """Per-round ratios (msdata / baseline) min-median-max, by the wall clock or (``cpu``)
    by this process's CPU time (steadier on a loaded machine; the servers' time is not in
    it)."""
    i = 2 if cpu else 0
    rs = sorted(p[i + 1] / p[i] for p in pairs)
    return f"{rs[0]:.2f}-{statistics.median(rs):.2f}-{rs[-1]:.2f}"


Op = Callable[[int], Awaitable[Any]]


async def paired(n: int, a: Op, b: Op) -> Pair:
    """Microseconds per call of ``a`` and of ``b`` over n calls each, alternating call by
    call (a b b a a b ...), so both see the same load on a shared machine: wall clock of
    a, of b, then CPU time of this process for a, for b."""
    pc, cpu = time.perf_counter, time.process_time
    ta = tb = ca = cb = 0.0
    for i in range(n):
        first, second = (a, b) if i % 2 else (b, a)
        c0, t0 = cpu(), pc()
        await first(i)
        t1, c1 = pc(), cpu()
        await second(i)
        t2, c2 = pc(), cpu()
        if i % 2:
            ta, tb, ca, cb = ta + t1 - t0, tb + t2 - t1, ca + c1 - c0, cb + c2 - c1
        else:
            tb, ta, cb, ca = tb + t1 - t0, ta + t2 - t1, cb + c1 - c0, ca + c2 - c1
    k = 1e6 / n
    return ta * k, tb * k, ca * k, cb * k


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
    bare_get: Op,
    n: int,
    rounds: int,
    pool_get: Op | None = None,
) -> None:
    keys = IdempotencyKeys(store)
    await keys.run("replayed", handler, scope="bench", fingerprint=FP)  # the COMPLETED key
    assert await raw_get(0) == RESULT
    counting = Counting(store)
    ckeys = IdempotencyKeys(counting)  # type: ignore[arg-type]
    run_id = uuid.uuid4().hex[:8]
    fresh = itertools.count()

    async def replay(i: int) -> Any:
        return await keys.run("replayed", handler, scope="bench", fingerprint=FP)

    async def first(i: int) -> Any:
        return await ckeys.run(f"{run_id}-{next(fresh)}", handler, scope="bench", fingerprint=FP)

    async def bare(i: int) -> Any:
        return await handler()

    rep: list[Pair] = []
    fst: list[Pair] = []
    bar: list[float] = []
    rep_pool: list[Pair] = []
    rep_bare: list[Pair] = []
    for _ in range(rounds):
        rep.append(await paired(n, raw_get, replay))
        rep_bare.append(await paired(n, bare_get, replay))
        if pool_get is not None:
            rep_pool.append(await paired(n, pool_get, replay))
        fst.append(await paired(n, raw_get, first))
        bar.append((await paired(n, bare, bare))[0])
    calls = counting.calls / (rounds * n)

    def med(pairs: list[Pair], i: int) -> float:
        return statistics.median(p[i] for p in pairs)

    print(
        f"{name:<11} hand-written replay {med(rep, 0):7.1f} us | replay {med(rep, 1):7.1f} us, "
        f"ratio {ratios(rep)} (CPU {med(rep, 2):.1f} / {med(rep, 3):.1f} us: "
        f"{ratios(rep, cpu=True)})"
    )
    print(
        f"{'':<11} first run {med(fst, 1):7.1f} us ({calls:.0f} store calls), "
        f"{ratios(fst)} hand-written replays; bare handler {statistics.median(bar):.2f} us"
    )
    print(
        f"{'':<11} vs a bare GET of the response alone ({med(rep_bare, 0):.1f} us): "
        f"ratio {ratios(rep_bare)}"
    )
    if rep_pool:
        print(
            f"{'':<11} vs the hand-written replay through an asyncpg pool: ratio {ratios(rep_pool)}"
        )


async def _no_reset(conn: Any) -> None:
    return None


async def stores(n: int, rounds: int) -> None:
    prefix = f"b{uuid.uuid4().hex[:8]}_"
    # PostgreSQL
    pg = PostgresIdempotencyStore(PG, table_prefix=prefix)
    await pg.create_schema()
    # The hand-written side runs on the store's own connection (the one a lone call of the
    # store's runs on, kept out of its pool: no acquire/release), so both sides do the same
    # wire work on the same server backend. On two connections, their two backends may sit
    # on different vCPUs: a call to a backend on the other (idle) vCPU costs this process
    # ~15-20 us more CPU (cross-vCPU wake-ups) than one to a backend sharing its vCPU, and
    # which backend lands where is the scheduler's choice, not the path's (bench/README.md,
    # "one backend for both sides"). A pool's acquire/release would be work the store skips
    # here; the pool figure is printed for reference (no reset round trip on release).
    await IdempotencyKeys(pg).run("replayed", handler, scope="bench", fingerprint=FP)
    conn = pg._hot_con  # the store's connection, made by that first call
    assert isinstance(conn, asyncpg.Connection), conn
    pool = await asyncpg.create_pool(PG, min_size=1, max_size=4, reset=_no_reset)
    sql = (
        f"SELECT fingerprint, completed, expires_at, response FROM {pg.table} "
        "WHERE scope = $1 AND key = $2"
    )
    bare = f"SELECT response FROM {pg.table} WHERE scope = $1 AND key = $2"

    async def pg_replay(i: int) -> Any:
        row = await conn.fetchrow(sql, "bench", "replayed")
        now = datetime.now(UTC)
        return replayed(row[0], row[1], row[2] <= now, row[3])

    async def pg_pool_replay(i: int) -> Any:
        row = await pool.fetchrow(sql, "bench", "replayed")
        now = datetime.now(UTC)
        return replayed(row[0], row[1], row[2] <= now, row[3])

    try:
        await bench_store(
            "PostgreSQL",
            pg,
            pg_replay,
            lambda i: conn.fetchrow(bare, "bench", "replayed"),
            n,
            rounds,
            pool_get=pg_pool_replay,
        )
        assert pg._hot_con is conn, "the store's calls left its connection"
    finally:
        await pg.drop_schema()
        await pg.close()  # gives its connection back
        await pool.close()
    # SQLite (synchronous NORMAL: the store's calls run on the loop's thread)
    with tempfile.TemporaryDirectory() as d:
        lite = SqliteIdempotencyStore(Path(d) / "b.db")
        await lite.create_schema()
        raw = sqlite3.connect(Path(d) / "b.db", isolation_level=None)
        q = (
            "SELECT fingerprint, completed, expires_us, response FROM msdata_idempotency "
            "WHERE scope = ? AND key = ?"
        )
        q_bare = "SELECT response FROM msdata_idempotency WHERE scope = ? AND key = ?"

        async def lite_replay(i: int) -> Any:
            row = raw.execute(q, ("bench", "replayed")).fetchone()
            now_us = time.time_ns() // 1000
            return replayed(row[0], row[1], row[2] <= now_us, row[3])

        async def lite_get(i: int) -> Any:
            return raw.execute(q_bare, ("bench", "replayed")).fetchone()

        try:
            await bench_store("SQLite", lite, lite_replay, lite_get, n, rounds)
        finally:
            raw.close()
            await lite.close()
    # Redis
    client = aioredis.Redis.from_url(REDIS)
    rprefix = f"bench:idem:{uuid.uuid4().hex[:8]}:"
    rs = RedisIdempotencyStore(client, key_prefix=rprefix)
    hkey = rs._key("bench", "replayed")
    fields = ("exp", "fp", "c", "resp")

    async def redis_replay(i: int) -> Any:
        exp, fp, c, resp = await client.hmget(hkey, fields)
        now_us = time.time_ns() // 1000
        return replayed(fp.decode(), c == b"1", int(exp) <= now_us, resp)

    try:
        await bench_store("Redis", rs, redis_replay, lambda i: client.hget(hkey, "resp"), n, rounds)
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
                got: dict[str, list[Pair]] = {"new key": [], "replay": []}
                for _ in range(rounds):
                    got["new key"].append(await paired(n, plain, new_key))
                    got["replay"].append(await paired(n, plain, replay))
        finally:
            for p in procs:
                p.kill()
                p.wait()
    for label, pairs in got.items():
        base = statistics.median(p[0] for p in pairs)
        added = statistics.median(p[1] - p[0] for p in pairs)
        print(
            f"ASGI {label:<8} plain app {base:6.0f} us/request | with the middleware "
            f"+{added:.0f} us, ratio {ratios(pairs)}"
        )


async def main(n: int, rounds: int) -> None:
    print(f"loadavg at start {loadavg()}; N={n} per path per round, {rounds} rounds")
    await stores(n, rounds)
    await middleware(max(100, n // 5), rounds)
    print(f"loadavg at end {loadavg()}")


async def sqlite_loop(path: str, n: int) -> None:
    """``n`` SQLite replays of one path (``hand`` or ``msdata``) and nothing else, to count
    instructions with callgrind (load-independent): run it for two values of ``n`` and
    divide the difference of the totals by the difference of the ``n``::

        valgrind --tool=callgrind --callgrind-out-file=/dev/null \
            .venv/bin/python bench/bench_idempotency.py --sqlite-loop msdata 5000
    """
    with tempfile.TemporaryDirectory() as d:
        lite = SqliteIdempotencyStore(Path(d) / "b.db")
        await lite.create_schema()
        keys = IdempotencyKeys(lite)
        await keys.run("replayed", handler, scope="bench", fingerprint=FP)
        raw = sqlite3.connect(Path(d) / "b.db", isolation_level=None)
        q = (
            "SELECT fingerprint, completed, expires_us, response FROM msdata_idempotency "
            "WHERE scope = ? AND key = ?"
        )

        async def hand() -> Any:
            row = raw.execute(q, ("bench", "replayed")).fetchone()
            now_us = time.time_ns() // 1000
            return replayed(row[0], row[1], row[2] <= now_us, row[3])

        async def ours() -> Any:
            return await keys.run("replayed", handler, scope="bench", fingerprint=FP)

        op = hand if path == "hand" else ours
        assert await hand() == await ours() == RESULT
        for _ in range(n):
            await op()
        raw.close()
        await lite.close()


async def pg_loop(path: str, n: int, dsn: str = PG) -> None:
    """``n`` PostgreSQL replays of one path (``hand`` or ``msdata``), as :func:`sqlite_loop`:
    the client's instructions with callgrind around this process; the server's with a
    private PostgreSQL run under callgrind (``valgrind --tool=callgrind
    --callgrind-out-file=DIR/cg.%p postgres -D DIR -p PORT``, ``dsn`` pointing at it):
    the backend that served the loop writes its own file when the loop disconnects."""
    store = PostgresIdempotencyStore(dsn, table_prefix=f"b{uuid.uuid4().hex[:8]}_")
    await store.create_schema()
    keys = IdempotencyKeys(store)
    await keys.run("replayed", handler, scope="bench", fingerprint=FP)
    conn = await asyncpg.connect(dsn)
    sql = (
        f"SELECT fingerprint, completed, expires_at, response FROM {store.table} "
        "WHERE scope = $1 AND key = $2"
    )

    async def hand() -> Any:
        row = await conn.fetchrow(sql, "bench", "replayed")
        now = datetime.now(UTC)
        return replayed(row[0], row[1], row[2] <= now, row[3])

    async def ours() -> Any:
        return await keys.run("replayed", handler, scope="bench", fingerprint=FP)

    op = hand if path == "hand" else ours
    try:
        assert await hand() == await ours() == RESULT
        for _ in range(n):
            await op()
    finally:
        await conn.close()
        await store.drop_schema()
        await store.close()


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--sqlite-loop"]:
        asyncio.run(sqlite_loop(args[1], int(args[2])))
    elif args[:1] == ["--pg-loop"]:
        asyncio.run(pg_loop(args[1], int(args[2]), *args[3:4]))
    else:
        asyncio.run(main(int(args[0]) if args else 2000, int(args[1]) if len(args) > 1 else 5))
