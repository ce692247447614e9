"""The PostgreSQL outbox against the raw driver loop, in the same run.

(a) Drain: 40k pending rows (1000 partition keys) moved to the in-memory transport (or
    Redis, ``--broker redis``) by 1, 2 and 4 ``OutboxRelay``s, each over its own
    ``PostgresOutboxStore``, against a raw asyncpg loop on the same table: in one
    transaction, claim 100 rows with ``SELECT … FOR UPDATE SKIP LOCKED``, publish them to
    the same transport, delete them, commit, at the relay's durability (``--durable``: the
    relay's own commits fsync, and the raw loop's; default off on both). Every publish is
    checked: duplicates and order violations per key are counted. Targets: 1 relay >= 0.8 of
    raw, 2 relays >= 1.6x one, 4 no slower than 2.
(b) Write cost: a business transaction (BEGIN, one INSERT of business data, COMMIT, durable)
    alone, with a hand-written INSERT into the outbox table, with the store's ``append`` of
    an already encoded row, and with ``Outbox.add`` / ``add_async`` (envelope + CloudEvents
    encode + INSERT, with and without the NOTIFY),
    on asyncpg and psycopg, one connection; and asyncpg on 4 connections. Target: <= 1.2x.

All paths run interleaved in one process, the order rotating each round, >= 5 rounds
(bench/_fair.py); ratios are per round, min-median-max; /proc/loadavg at start and end.
Tables have unique names and are dropped at the end.

Run: .venv/bin/python bench/bench_outbox_postgres.py [--rows N] [--url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import asyncpg
import psycopg
from _fair import loadavg, ratios, run_rounds, spread

from msdata.adapters.memory import MemoryTransport
from msdata.adapters.postgres import PostgresOutboxStore
from msdata.messages import Event, MessageRegistry, message_type
from msdata.outbox import Outbox, OutboxRelay, OutboxRow
from msdata.transport import TransportMessage

URL = "postgresql://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/0"
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


async def fill(store: PostgresOutboxStore, url: str, n: int, keys: int) -> dict[str, int]:
    """``n`` pending rows over ``keys`` partition keys; returns message id -> position."""
    conn = await asyncpg.connect(url)
    ids: dict[str, int] = {}
    try:
        await conn.execute(f"DELETE FROM {store.table}")
        await conn.execute(f"DELETE FROM {store.lease_table}")
        chunk = 5000
        for start in range(0, n, chunk):
            rows = []
            for i in range(start, min(n, start + chunk)):
                mid = str(uuid.uuid4())
                ids[mid] = i
                rows.append(
                    OutboxRow(
                        message_id=mid,
                        topic="orders",
                        type="bench.OrderPlaced",
                        payload=_payload(i),
                        partition_key=f"order-{i % keys}",
                        aggregate_type="orders",
                    )
                )
            async with conn.transaction():
                await store.append_async(conn, rows)
        await conn.execute(f"VACUUM ANALYZE {store.table}")
    finally:
        await conn.close()
    return ids


async def fill_at_once(
    store: PostgresOutboxStore, conn: Any, n: int, keys: int, ids: dict[str, int]
) -> float:
    """``n`` pending rows over ``keys`` partition keys in ONE transaction (the relays see
    all or none); fills ``ids`` (message id -> position) and returns the commit's
    ``time.monotonic()``."""
    ids.clear()
    rows = []
    for i in range(n):
        mid = str(uuid.uuid4())
        ids[mid] = i
        rows.append(
            OutboxRow(
                message_id=mid,
                topic="orders",
                type="bench.OrderPlaced",
                payload=_payload(i),
                partition_key=f"order-{i % keys}",
                aggregate_type="orders",
            )
        )
    async with conn.transaction():
        for start in range(0, n, 5000):
            await store.append_async(conn, rows[start : start + 5000])
    return time.monotonic()


class Checker:
    """Counts what was published, duplicates, and order violations per key (a message
    published after a later message of its own key)."""

    def __init__(self, ids: dict[str, int], target: int) -> None:
        self.ids, self.target = ids, target
        self.seen: set[str] = set()
        self.last: dict[str | None, int] = {}
        self.count = self.duplicates = self.violations = 0
        self.done = asyncio.Event()
        self.started = self.ended = 0.0  # set by work that times itself
        #: CPU seconds from the start to the end (--processes): workers, their backends
        self.client_cpu = self.server_cpu = 0.0
        #: (--processes) context switches of the workers and their backends in that time:
        #: voluntary, involuntary
        self.switches = (0, 0)
        #: (--processes, relays) claims, empty claims, short claims, idle waits in that time
        self.steps: tuple[int, int, int, int] = (0, 0, 0, 0)

    def saw(self, messages: Sequence[TransportMessage]) -> None:
        for m in messages:
            if m.id in self.seen:
                self.duplicates += 1
                continue
            self.seen.add(m.id)
            pos = self.ids[m.id]
            if m.key is not None:
                if self.last.get(m.key, -1) > pos:
                    self.violations += 1
                self.last[m.key] = pos
        self.count += len(messages)
        if len(self.seen) >= self.target:
            self.done.set()


class CheckedTransport:
    """A transport that tells ``checker`` what it is asked to publish, then publishes."""

    def __init__(self, inner: Any, checker: Checker) -> None:
        self.inner, self.checker = inner, checker

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def publish(self, topic: str, messages: Sequence[TransportMessage]) -> None:
        self.checker.saw(messages)
        await self.inner.publish(topic, messages)


async def raw_drain(url: str, tbl: str, sync: bool, checker: Checker) -> int:
    """The raw claim + publish + delete loop: in one transaction ``SELECT … ORDER BY seq
    LIMIT 100 FOR UPDATE SKIP LOCKED``, publish to the same kind of transport, DELETE,
    COMMIT, at the relay's durability."""
    transport = CheckedTransport(MemoryTransport(), checker)
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


async def relays_drain(
    url: str,
    prefix: str,
    sync: bool,
    relays: int,
    checker: Checker,
    broker: str,
    partitioned: bool,
) -> None:
    """``relays`` relays, each with its own store (pool) and transport, as separate
    services would run them, until every row is published once."""
    stores = [
        PostgresOutboxStore(
            url,
            table_prefix=prefix,
            relay_synchronous_commit=sync,
            max_size=2,
            partitioned=partitioned,
        )
        for _ in range(relays)
    ]
    transports: list[Any] = []
    clients: list[Any] = []
    for _ in range(relays):
        if broker == "memory":
            transports.append(MemoryTransport())
        else:
            import redis.asyncio as aioredis

            from msdata.adapters.redis import RedisTransport

            client = aioredis.Redis.from_url(REDIS)
            clients.append(client)
            transports.append(RedisTransport(client, key_prefix=f"{prefix}redis"))
    runners = [
        OutboxRelay(
            st,
            CheckedTransport(tr, checker),  # type: ignore[arg-type]
            batch_size=100,
            relay_id=f"bench-{i}",
            poll_interval=0.05,
        )
        for i, (st, tr) in enumerate(zip(stores, transports, strict=True))
    ]
    try:
        for r in runners:
            await r.start()
        await asyncio.wait_for(checker.done.wait(), 300)
    finally:
        for r in runners:
            await r.stop()
        for st in stores:
            await st.close()
        for tr in transports:
            await tr.close()
        for c in clients:
            keys = [k async for k in c.scan_iter(match=f"{prefix}redis*", count=1000)]
            if keys:
                await c.delete(*keys)
            await c.aclose()


# -- relays (and raw workers) in processes of their own, as services run them ----------


def _worker(
    kind: str,
    url: str,
    prefix: str,
    sync: bool,
    partitioned: bool,
    idx: int,
    ready: Any,
    go: Any,
    stop: Any,
    out: Any,
    published: Any,
) -> None:
    # named connections: the parent finds this worker's backends to read their CPU time
    url += ("&" if "?" in url else "?") + f"application_name={prefix}w{idx}"
    asyncio.run(_work(kind, url, prefix, sync, partitioned, idx, ready, go, stop, out, published))


#: how often an idle relay polls (the raw worker sleeps as long when it finds no rows), s
IDLE_POLL = 0.01

#: rows per claim of the relays and raw workers in processes of their own (``--batch``;
#: through the environment, which the spawned processes inherit)
BATCH = int(os.environ.get("BENCH_OUTBOX_BATCH", "100"))


async def _work(
    kind: str,
    url: str,
    prefix: str,
    sync: bool,
    partitioned: bool,
    idx: int,
    ready: Any,
    go: Any,
    stop: Any,
    out: Any,
    published: Any,
) -> None:
    log: list[tuple[float, str, str | None]] = []

    class Recording(MemoryTransport):
        async def publish(self, topic: str, messages: Sequence[TransportMessage]) -> None:
            t = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process
            log.extend((t, m.id, m.key) for m in messages)
            await super().publish(topic, messages)
            with published.get_lock():
                published.value += len(messages)

    transport = Recording()
    steps: list[tuple[float, int, float]] = []  # per claim: its end, rows, CPU time

    class Counting(PostgresOutboxStore):
        """Records each claim (the relay's step) and each idle wait, for the step counts."""

        async def claim_messages(self, *args: Any, **kwargs: Any) -> Any:
            got = await super().claim_messages(*args, **kwargs)
            steps.append((time.monotonic(), len(got), time.process_time()))
            return got

        async def wait_for_rows(self, timeout: float) -> None:
            await super().wait_for_rows(timeout)
            steps.append((time.monotonic(), -1, time.process_time()))  # -1: an idle wait

    if kind == "relay":
        store = Counting(
            url,
            table_prefix=prefix,
            relay_synchronous_commit=sync,
            max_size=2,
            partitioned=partitioned,
        )
        await store.status()  # connected before the start
        relay = OutboxRelay(
            store, transport, batch_size=BATCH, relay_id=f"bench-{idx}", poll_interval=IDLE_POLL
        )
        ready.put(idx)
        await asyncio.to_thread(go.wait)
        await relay.start()
        await asyncio.to_thread(stop.wait)
        await relay.stop()
        await store.close()
    else:
        conn = await asyncpg.connect(url)
        await conn.execute(f"SET synchronous_commit = {'on' if sync else 'off'}")
        tbl = f'"{prefix}outbox"'
        select = (
            f"SELECT seq, id, topic, payload, aggregateid FROM {tbl} "
            f"WHERE sent_at IS NULL ORDER BY seq LIMIT {BATCH} FOR UPDATE SKIP LOCKED"
        )
        delete = f"DELETE FROM {tbl} WHERE seq = ANY($1::bigint[])"
        ready.put(idx)
        await asyncio.to_thread(go.wait)
        while not stop.is_set():
            async with conn.transaction():
                rows = await conn.fetch(select)
                if rows:
                    await transport.publish(
                        "orders",
                        [
                            TransportMessage(r["id"], bytes(r["payload"]), r["aggregateid"])
                            for r in rows
                        ],
                    )
                    await conn.execute(delete, [r["seq"] for r in rows])
            if not rows:
                await asyncio.sleep(IDLE_POLL)
        await conn.close()
    out.put((log, steps))


def _switches(pids: Sequence[int]) -> tuple[int, int]:
    """Context switches of processes ``pids`` so far (voluntary: it waited; involuntary:
    preempted, the cores were busy), from /proc (Linux)."""
    vol = inv = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        inv += int(line.split()[1])
        except OSError:
            continue  # gone
    return vol, inv


def _cpu(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) of processes ``pids`` so far, from /proc (Linux)."""

    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def _settled(conn: Any, parts: str, k: int, timeout: float = 30.0) -> None:
    """Until ``k`` partitioned relays each own their fair share of the partitions."""
    from msdata.adapters.postgres.outbox import PARTITIONS

    fair = -(-PARTITIONS // k)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        owned = await conn.fetch(
            f"SELECT owner, count(*) AS n FROM {parts} WHERE owner IS NOT NULL GROUP BY owner"
        )
        settled = len(owned) == k and all(r["n"] <= fair for r in owned)
        if settled and sum(r["n"] for r in owned) == PARTITIONS:
            return
        await asyncio.sleep(0.01)
    raise SystemExit(f"{k} relays did not share the partitions within {timeout} s")


class _Workers(NamedTuple):
    """``k`` worker processes started and ready (each has connected and waits for ``go``)."""

    procs: list[Any]
    go: Any
    stop: Any
    out: Any
    published: Any
    #: each worker's claims (filled by ``finish``): (monotonic end, rows or -1 for an idle
    #: wait, its process's CPU time then)
    steps: list[list[tuple[float, int, float]]]

    async def finish(self, checker: Checker) -> list[Any]:
        """Stop them, collect each one's publish log and give the checker every publish in
        time order (then by process and place in its log: a batch shares one time stamp)."""
        self.stop.set()
        got = [await asyncio.to_thread(self.out.get, True, 60) for _ in self.procs]
        logs = [log for log, _ in got]
        self.steps[:] = [steps for _, steps in got]
        for pr in self.procs:
            pr.join(30)
        merged = sorted(
            (t, n, j, i, key) for n, log in enumerate(logs) for j, (t, i, key) in enumerate(log)
        )
        checker.saw([TransportMessage(i, b"", key) for _, _, _, i, key in merged])
        return logs


async def _spawn(
    kind: str, k: int, url: str, prefix: str, sync: bool, partitioned: bool
) -> _Workers:
    """Start ``k`` relays (or raw workers), a spawned process each, and wait until each is
    ready."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    ready, out = ctx.Queue(), ctx.Queue()
    go, stop = ctx.Event(), ctx.Event()
    published = ctx.Value("q", 0)
    procs = [
        ctx.Process(
            target=_worker,
            args=(kind, url, prefix, sync, partitioned, i, ready, go, stop, out, published),
        )
        for i in range(k)
    ]
    for pr in procs:
        pr.start()
    for _ in procs:
        await asyncio.to_thread(ready.get, True, 60)
    return _Workers(procs, go, stop, out, published, [])


async def processes_drain(
    kind: str,
    k: int,
    url: str,
    store: PostgresOutboxStore,
    sync: bool,
    partitioned: bool,
    checker: Checker,
    n: int,
    keys: int,
) -> None:
    """Steady state: ``k`` relays (or raw workers), a process each, are started and
    (partitioned) share the partitions out first; then ``n`` rows commit in one
    transaction, and the time runs from that commit to the last publish (every
    process's clock is CLOCK_MONOTONIC). A relay that runs all day is measured, not its
    start-up and first rebalance (``--cold`` measures those)."""
    prefix = store.table_prefix
    w = await _spawn(kind, k, url, prefix, sync, partitioned)
    conn = await asyncpg.connect(url)
    try:
        w.go.set()
        if kind == "relay" and partitioned:
            await _settled(conn, store.parts_table, k)
        await asyncio.sleep(0.2)  # every process polling
        backends = [
            r["pid"]
            for r in await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE application_name LIKE $1",
                prefix.replace("_", "\\_") + "w%",
            )
        ]
        workers = [pr.pid for pr in w.procs if pr.pid is not None]
        t0 = await fill_at_once(store, conn, n, keys, checker.ids)
        # from the commit (the polls while the rows were written are not counted)
        c0, s0, w0 = _cpu(workers), _cpu(backends), _switches(workers + backends)
        while w.published.value < n:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        checker.client_cpu, checker.server_cpu = _cpu(workers) - c0, _cpu(backends) - s0
        w1 = _switches(workers + backends)
        checker.switches = (w1[0] - w0[0], w1[1] - w0[1])
    finally:
        w.stop.set()
        await conn.close()
    logs = await w.finish(checker)
    checker.started = t0
    checker.ended = max(t for log in logs for t, _, _ in log)
    # the relays' claims from the commit to the last publish: all, empty, short, idle waits
    within = [(n_, cpu) for steps in w.steps for t, n_, cpu in steps if t0 <= t <= checker.ended]
    checker.steps = (
        sum(n_ >= 0 for n_, _ in within),
        sum(n_ == 0 for n_, _ in within),
        sum(0 < n_ < BATCH for n_, _ in within),
        sum(n_ < 0 for n_, _ in within),
    )


async def cold_processes_drain(
    kind: str, k: int, url: str, prefix: str, sync: bool, partitioned: bool, checker: Checker
) -> None:
    """``--cold``: ``k`` relays (or raw workers) in ``k`` processes, started before the
    timing and told to go together on a full table; done when the table is empty
    (polled every 5 ms). Includes the relays' start and first rebalance."""
    w = await _spawn(kind, k, url, prefix, sync, partitioned)
    conn = await asyncpg.connect(url)
    tbl = f'"{prefix}outbox"'
    try:
        checker.started = time.perf_counter()
        w.go.set()
        while await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {tbl})"):  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        checker.ended = time.perf_counter()
    finally:
        w.stop.set()
        await conn.close()
    await w.finish(checker)


async def drain_bench(
    url: str,
    n: int,
    keys: int,
    rounds: int,
    sync: bool,
    broker: str,
    counts: list[int],
    partitioned: bool,
    raw_workers_too: bool = False,
    processes: bool = False,
    cold: bool = False,
) -> None:
    prefix = f"bench{uuid.uuid4().hex[:8]}_"
    store = PostgresOutboxStore(
        url, table_prefix=prefix, relay_synchronous_commit=sync, partitioned=partitioned
    )
    await store.create_schema()
    ids: dict[str, int] = {}

    steady = processes and not cold
    if steady:  # the table has seen traffic: statistics of a full table, then empty
        await fill(store, url, n, keys)

    async def refill() -> None:
        if steady:  # the rows come inside the timed path, in one transaction
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(f"DELETE FROM {store.table}")
                await conn.execute(f"DELETE FROM {store.lease_table}")
            finally:
                await conn.close()
            return
        ids.clear()
        ids.update(await fill(store, url, n, keys))

    problems: dict[str, list[int]] = {}
    cpu: dict[str, list[tuple[float, float]]] = {}  # per round: client, server us/row
    counted: dict[str, list[tuple[int, int, int, int]]] = {}  # per round: Checker.steps
    switched: dict[str, list[tuple[int, int]]] = {}  # per round: Checker.switches

    def timed(
        name: str, work: Callable[[Checker], Awaitable[Any]]
    ) -> Callable[[], Awaitable[float]]:
        async def run() -> float:
            checker = Checker(ids, n)
            t = time.perf_counter()
            await work(checker)
            if checker.ended:
                t = checker.started
                rate = n / (checker.ended - t)
            else:
                rate = n / (time.perf_counter() - t)
            assert len(checker.seen) == n, (len(checker.seen), n)
            if checker.server_cpu:
                cpu.setdefault(name, []).append(
                    (checker.client_cpu / n * 1e6, checker.server_cpu / n * 1e6)
                )
            if checker.server_cpu:
                switched.setdefault(name, []).append(checker.switches)
            if checker.steps[0]:
                counted.setdefault(name, []).append(checker.steps)
            seen = problems.setdefault(name, [0, 0])
            seen[0] += checker.duplicates
            seen[1] += checker.violations
            return rate

        return run

    async def raw_workers(c: Checker, k: int) -> None:
        await asyncio.gather(*(raw_drain(url, store.table, sync, c) for _ in range(k)))

    paths: dict[str, Callable[[], Awaitable[float]]] = {}
    if processes:

        def drain(kind: str, k: int) -> Callable[[Checker], Awaitable[None]]:
            if cold:
                return lambda c: cold_processes_drain(kind, k, url, prefix, sync, partitioned, c)
            return lambda c: processes_drain(kind, k, url, store, sync, partitioned, c, n, keys)

        paths["raw"] = timed("raw", drain("raw", 1))
        if raw_workers_too:
            paths["raw2"] = timed("raw2", drain("raw", 2))
            # what four processes and their backends cost the machine per row, with no
            # msdata in them (their client work per row is the same at any count)
            paths["raw4"] = timed("raw4", drain("raw", 4))
        for k in counts:
            paths[f"{k}"] = timed(f"{k}", drain("relay", k))
    else:
        if broker == "memory":
            paths["raw"] = timed("raw", lambda c: raw_drain(url, store.table, sync, c))
            if raw_workers_too:
                # what the machine gives two workers at all (SKIP LOCKED: no order per key)
                paths["raw2"] = timed("raw2", lambda c: raw_workers(c, 2))
        for k in counts:
            paths[f"{k}"] = timed(
                f"{k}",
                lambda c, k=k: relays_drain(  # type: ignore[misc]
                    url, prefix, sync, k, c, broker, partitioned
                ),
            )
    try:
        got = await run_rounds(paths, rounds, between=refill)
    finally:
        await store.drop_schema()
        await store.close()
    durability = "on (fsync per commit)" if sync else "off (the relay's own commits)"
    mode = "partitioned claim" if partitioned else "per-key claim"
    if processes:
        mode += ", a process per relay/worker"
        mode += ", cold start" if cold else ", steady state (rows commit at once)"
    batch = BATCH if processes else 100
    print(
        f"\n(a) drain {n:,} rows, {keys} keys, batches of {batch}, into {broker}, {mode}, relay "
        f"synchronous_commit={durability}; {rounds} interleaved rounds (rows/s median)"
    )
    for name, rates in got.items():
        label = {
            "raw": "raw asyncpg claim + publish + delete",
            "raw2": "the same, 2 workers (no order per key)",
            "raw4": "the same, 4 workers (no order per key)",
        }.get(name, f"{name} relay(s)")
        print(f"    {label:<44}{statistics.median(rates):>10,.0f}")
    if "raw" in got and "1" in got:
        print(
            f"    {'1 relay / raw (target >= 0.80)':<44}{spread(ratios(got['1'], got['raw'])):>16}"
        )
    if "1" in got and "2" in got:
        print(f"    {'2 relays / 1 (target >= 1.60)':<44}{spread(ratios(got['2'], got['1'])):>16}")
    if "2" in got and "4" in got:
        print(f"    {'4 relays / 2 (target >= 1.00)':<44}{spread(ratios(got['4'], got['2'])):>16}")
    if "raw" in got and "raw2" in got:
        print(f"    {'raw 2 workers / 1':<44}{spread(ratios(got['raw2'], got['raw'])):>16}")
    if "raw2" in got and "raw4" in got:
        print(f"    {'raw 4 workers / 2':<44}{spread(ratios(got['raw4'], got['raw2'])):>16}")
    if cpu:
        print("    CPU per row, us (median; workers' processes + their PostgreSQL backends)")
        for name, per in cpu.items():
            client = statistics.median(c for c, _ in per)
            server = statistics.median(sv for _, sv in per)
            total = client + server
            print(f"    {name:<8} client {client:6.1f}  server {server:6.1f}  total {total:6.1f}")
    if switched:
        print("    context switches per 1k rows (median; workers + backends): waits, preemptions")
        for name, per in switched.items():
            v, i = (statistics.median(x[j] * 1000 / n for x in per) for j in range(2))
            print(f"    {name:<8} waits {v:7.1f}  preempted {i:7.1f}")
    if counted:
        print("    relays' claims per 1k rows (median): all, empty, short (< batch); idle waits")
        for name, per in counted.items():
            a, e, sh, w = (statistics.median(x[i] * 1000 / n for x in per) for i in range(4))
            print(f"    {name:<8} claims {a:6.1f}  empty {e:6.1f}  short {sh:6.1f}  waits {w:6.1f}")
    for name, (dups, violations) in problems.items():
        print(f"    {name}: duplicates {dups}, order violations per key {violations}")


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

            def timed(run: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[float]]:
                async def go() -> float:
                    t = time.perf_counter()
                    await run()
                    return per_round / (time.perf_counter() - t)

                return go

            rates = await run_rounds({k: timed(v) for k, v in variants.items()}, rounds)
            base = statistics.median(rates["none"])
            rows = []
            for k in kinds:
                m = statistics.median(rates[k])
                vs_hand = "" if k in ("none", "raw") else spread(ratios(rates["raw"], rates[k]))
                rows.append([names[k], f"{m:,.0f}", f"{1e6 / m:,.0f}", f"{base / m:.2f}", vs_hand])
            table(
                f"(b) business transaction cost, {setup}, durable commits "
                f"({rounds} interleaved rounds of {per_round}; medians, and time per tx over "
                "the hand-written INSERT's per round min-median-max, target <= 1.10)",
                ["variant", "tx/s", "us/tx", "cost vs alone", "vs hand-written"],
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
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=200)
    parser.add_argument("--url", default=URL)
    parser.add_argument("--only", choices=["drain", "write"])
    parser.add_argument("--relays", default="1,2,4", help="relay counts to drain with")
    parser.add_argument("--broker", choices=["memory", "redis"], default="memory")
    parser.add_argument(
        "--processes",
        action="store_true",
        help="each relay (and raw worker) in a process of its own, into its own memory "
        "transport; timed from a common start until the table is empty",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="with --processes: time from the relays' start on a full table (start-up and "
        "first rebalance included) instead of the steady state",
    )
    parser.add_argument(
        "--raw-workers",
        action="store_true",
        help="also the raw loop with 2 workers (and 4, with --processes)",
    )
    parser.add_argument(
        "--partitioned", action="store_true", help="relays own partitions (partitioned=True)"
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=100,
        help="with --processes: rows per claim of the relays and the raw workers (default 100)",
    )
    parser.add_argument(
        "--durable", action="store_true", help="the relay's own commits fsync too (both sides)"
    )
    args = parser.parse_args()
    global BATCH
    BATCH = args.batch
    os.environ["BENCH_OUTBOX_BATCH"] = str(args.batch)  # for the processes it spawns
    print(f"loadavg at start: {loadavg()}")
    started = time.perf_counter()
    if args.only != "write":
        counts = [int(x) for x in args.relays.split(",") if x]
        await drain_bench(
            args.url,
            args.rows,
            args.keys,
            args.rounds,
            args.durable,
            args.broker,
            counts,
            args.partitioned,
            args.raw_workers,
            args.processes,
            args.cold,
        )
    if args.only != "drain":
        await write_bench(args.url, args.rounds, args.per_round)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    print(f"loadavg at end: {loadavg()}")


if __name__ == "__main__":
    asyncio.run(main())
