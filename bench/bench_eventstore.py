"""Event store and projections: msdata against the raw driver loop and against
``eventsourcing`` (pip install "eventsourcing[postgres]"), the same work in the same run.

(a) Append, one event per transaction: a new stream with one event (eventsourcing: create
    an aggregate and save it). raw: BEGIN; INSERT one row (the pre-encoded payload); COMMIT.
    msdata: BEGIN; EventLog.append (envelope, CloudEvents encoding, version check); COMMIT.
    Also msdata's store alone (``store.append`` of pre-encoded events).
(b) Append, batches of ten events per transaction: a new stream of ten events
    (eventsourcing: create and nine more events, one save). raw: executemany of ten rows.
(c) PostgreSQL only, four writers at once (threads, a connection each), one event per
    transaction to streams of their own: what each global-order approach lets through
    (msdata: transaction-id positions, appends run concurrently; eventsourcing: LOCK TABLE
    per insert, appends serialised; raw: a bigserial, which readers could skip past).
(d) Projection catch-up: N events already in the store applied to a read model (one
    upsert per event, checkpoint once per batch of 500, one transaction per batch).
    raw: SELECT 500 rows after the checkpoint; json.loads each payload; upsert; UPDATE the
    checkpoint; COMMIT. "raw, typed" (SQLite): the same, the data validated into the event
    class as msdata's handler gets it. msdata: ProjectionRunner.catch_up (decode + validate
    each CloudEvent, handler dispatch, compare-and-set checkpoint). SQLite also prints CPU
    time (the loop is in-process but for the commits' fsync).

Rounds interleave the variants in a rotating order; each table prints per-round ratios
(msdata / other, for throughput: above 1.0 is faster) as min-median-max, and /proc/loadavg
at the start and end. SQLite runs at synchronous=FULL (WAL), eventsourcing's own setting,
so all three fsync each commit; PostgreSQL commits are durable (synchronous_commit on).

    .venv/bin/python bench/bench_eventstore.py [--backend sqlite|postgres|both]
        [--rounds 5] [--n 2000] [--catchup 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from msdata.eventstore import EventLog, NewEvent
from msdata.messages import Event, MessageRegistry, make_envelope
from msdata.projections import Projection, ProjectionContext, ProjectionRunner, handles
from msdata.serialization import CloudEventsCodec

PG_URL = os.environ.get("MSDATA_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")

registry = MessageRegistry()


class ItemAdded(Event):
    cart_id: str
    sku: str
    quantity: int


registry.register(ItemAdded, "bench.ItemAdded")
codec = CloudEventsCodec(registry)
EVENT = ItemAdded(cart_id="c-1", sku="sku-123", quantity=2)
PAYLOAD = codec.encode(make_envelope(EVENT, registry=registry, partition_key="c-1"))


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{statistics.median(values):.2f}-{max(values):.2f}"


def rotate(names: list[str], r: int) -> list[str]:
    k = r % len(names)
    return names[k:] + names[:k]


# -- eventsourcing ---------------------------------------------------------------------------


def eventsourcing_app(env: dict[str, str]) -> Any:
    from eventsourcing.application import Application

    class Carts(Application):  # type: ignore[type-arg]
        def create(self, extra: int) -> None:
            cart = _cart_class()(cart_id="c-1")
            for _ in range(extra):
                cart.add_item("sku-123", 2)
            self.save(cart)

    return Carts(env=env)


_CART: Any = None


def _cart_class() -> Any:
    global _CART
    if _CART is None:
        from eventsourcing.domain import Aggregate, event

        class Cart(Aggregate):
            @event("Created")
            def __init__(self, cart_id: str) -> None:
                self.cart_id = cart_id
                self.items: list[str] = []

            @event("ItemAdded")
            def add_item(self, sku: str, quantity: int) -> None:
                self.items.append(sku)

        _CART = Cart
    return _CART


# -- (a) (b) appends -------------------------------------------------------------------------


class SqliteAppend:
    def __init__(self, directory: str) -> None:
        from msdata.adapters.sqlite import SqliteEventStore, connect

        self.path = os.path.join(directory, "events.db")
        self.store = SqliteEventStore(self.path, synchronous="FULL")
        asyncio.run(self.store.create_schema())
        self.conn = connect(self.path, synchronous="FULL")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS raw_events (position INTEGER PRIMARY KEY, "
            "stream_id TEXT NOT NULL, stream_version INTEGER NOT NULL, event_id TEXT NOT NULL, "
            "type TEXT NOT NULL, schema_version INTEGER NOT NULL, payload BLOB NOT NULL, "
            "recorded_at REAL NOT NULL, UNIQUE (stream_id, stream_version))"
        )
        self.conn.commit()
        self.log = EventLog(self.store, registry=registry)
        self.es = eventsourcing_app(
            {
                "PERSISTENCE_MODULE": "eventsourcing.sqlite",
                "SQLITE_DBNAME": os.path.join(directory, "es.db"),
            }
        )
        self.insert = (
            "INSERT INTO raw_events (stream_id, stream_version, event_id, type, "
            "schema_version, payload, recorded_at) VALUES (?,?,?,?,?,?,?)"
        )

    def raw(self, n: int, per_tx: int) -> None:
        conn = self.conn
        for _ in range(n):
            s = uuid.uuid4().hex
            now = time.time()
            rows = [
                (s, v, uuid.uuid4().hex, "bench.ItemAdded", 1, PAYLOAD, now)
                for v in range(1, per_tx + 1)
            ]
            if per_tx == 1:
                conn.execute(self.insert, rows[0])
            else:
                conn.executemany(self.insert, rows)
            conn.commit()

    def msdata(self, n: int, per_tx: int) -> None:
        conn, append = self.conn, self.log.append
        events = [EVENT] * per_tx
        for _ in range(n):
            append(conn, uuid.uuid4().hex, 0, events)
            conn.commit()

    def store_only(self, n: int, per_tx: int) -> None:
        conn, append = self.conn, self.store.append
        for _ in range(n):
            new = [NewEvent(uuid.uuid4().hex, "bench.ItemAdded", 1, PAYLOAD)] * per_tx
            append(conn, uuid.uuid4().hex, 0, new)
            conn.commit()

    def eventsourcing(self, n: int, per_tx: int) -> None:
        create = self.es.create
        for _ in range(n):
            create(per_tx - 1)

    def close(self) -> None:
        self.conn.close()
        asyncio.run(self.store.close())


class PostgresAppend:
    def __init__(self, schema: str) -> None:
        import psycopg

        from msdata.adapters.postgres import PostgresEventStore

        self.schema = schema
        self.conn = psycopg.connect(PG_URL, autocommit=True)
        self.conn.execute(f"CREATE SCHEMA {schema}")
        self.store = PostgresEventStore(PG_URL, schema=schema)
        self.quiet = PostgresEventStore(PG_URL, schema=schema, table_prefix="quiet_", notify=False)

        async def create() -> None:  # the stores' pools live in this loop only
            for store in (self.store, self.quiet):
                await store.create_schema()
                await store.close()

        asyncio.run(create())
        self.conn.execute(
            f"CREATE TABLE {schema}.raw_events (position bigserial PRIMARY KEY, "
            "stream_id text NOT NULL, stream_version bigint NOT NULL, event_id text NOT NULL, "
            "type text NOT NULL, schema_version integer NOT NULL, payload bytea NOT NULL, "
            "recorded_at timestamptz NOT NULL DEFAULT now(), UNIQUE (stream_id, stream_version))"
        )
        self.log = EventLog(self.store, registry=registry)
        self.log_quiet = EventLog(self.quiet, registry=registry)
        self.es = eventsourcing_app(
            {
                "PERSISTENCE_MODULE": "eventsourcing.postgres",
                "POSTGRES_DBNAME": "test",
                "POSTGRES_HOST": "127.0.0.1",
                "POSTGRES_PORT": "5432",
                "POSTGRES_USER": "postgres",
                "POSTGRES_PASSWORD": "",
                "POSTGRES_SCHEMA": schema,
            }
        )
        self.insert = (
            f"INSERT INTO {schema}.raw_events (stream_id, stream_version, event_id, type, "
            "schema_version, payload) VALUES (%s,%s,%s,%s,%s,%s)"
        )

    def connect(self) -> Any:
        import psycopg

        return psycopg.connect(PG_URL, autocommit=True)

    def raw(self, n: int, per_tx: int, conn: Any = None, lock: bool = False) -> None:
        conn = conn or self.conn
        lock_sql = f"LOCK TABLE {self.schema}.raw_events IN EXCLUSIVE MODE"
        for _ in range(n):
            s = uuid.uuid4().hex
            rows = [
                (s, v, uuid.uuid4().hex, "bench.ItemAdded", 1, PAYLOAD)
                for v in range(1, per_tx + 1)
            ]
            with conn.transaction():
                if lock:  # eventsourcing's way to keep the commit order
                    conn.execute(lock_sql)
                if per_tx == 1:
                    conn.execute(self.insert, rows[0], prepare=True)
                else:
                    conn.cursor().executemany(self.insert, rows)

    def msdata(self, n: int, per_tx: int, conn: Any = None, notify: bool = True) -> None:
        conn = conn or self.conn
        append = (self.log if notify else self.log_quiet).append
        events = [EVENT] * per_tx
        for _ in range(n):
            with conn.transaction():
                append(conn, uuid.uuid4().hex, 0, events)

    def store_only(self, n: int, per_tx: int) -> None:
        conn, append = self.conn, self.store.append
        for _ in range(n):
            new = [NewEvent(uuid.uuid4().hex, "bench.ItemAdded", 1, PAYLOAD)] * per_tx
            with conn.transaction():
                append(conn, uuid.uuid4().hex, 0, new)

    def eventsourcing(self, n: int, per_tx: int, conn: Any = None) -> None:
        create = self.es.create
        for _ in range(n):
            create(per_tx - 1)

    def close(self) -> None:
        self.es.close()
        self.conn.execute(f"DROP SCHEMA {self.schema} CASCADE")
        self.conn.close()


def bench_appends(name: str, target: Any, n: int, rounds: int) -> None:
    variants: dict[str, Callable[[int, int], None]] = {
        "raw": target.raw,
        "msdata": target.msdata,
        "store": target.store_only,
        "eventsourcing": target.eventsourcing,
    }
    if isinstance(target, PostgresAppend):  # what the subscribers' NOTIFY costs
        variants["msdata, no NOTIFY"] = lambda n, per_tx: target.msdata(n, per_tx, notify=False)
    for per_tx in (1, 10):
        count = n if per_tx == 1 else max(1, n // 4)
        for fn in variants.values():
            fn(20, per_tx)  # warm up: prepared statements, caches
        rates: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(rounds):
            for k in rotate(list(variants), r):
                t0 = time.perf_counter()
                variants[k](count, per_tx)
                rates[k].append(count * per_tx / (time.perf_counter() - t0))
        print(
            f"\n{name}: append, {per_tx} event(s) per transaction, "
            f"{count} transactions x {rounds} rounds"
        )
        print(
            f"  {'path':<18}{'events/s (median)':>18}{'tx/s':>10}   "
            "vs raw (min-med-max)   msdata vs it"
        )
        for k in variants:
            med = statistics.median(rates[k])
            vs_raw = [a / b for a, b in zip(rates[k], rates["raw"], strict=True)]
            vs_it = [a / b for a, b in zip(rates["msdata"], rates[k], strict=True)]
            print(
                f"  {k:<18}{med:>18,.0f}{med / per_tx:>10,.0f}   "
                f"{spread(vs_raw):<22} {spread(vs_it)}"
            )


def bench_concurrent(target: PostgresAppend, n: int, rounds: int, writers: int = 4) -> None:
    conns = [target.connect() for _ in range(writers)]
    variants = {
        "raw (bigserial)": lambda c, k: target.raw(k, 1, c),
        "raw + LOCK TABLE": lambda c, k: target.raw(k, 1, c, lock=True),
        "msdata (xid)": lambda c, k: target.msdata(k, 1, c),
        "msdata, no NOTIFY": lambda c, k: target.msdata(k, 1, c, notify=False),
        "eventsourcing (LOCK)": lambda c, k: target.eventsourcing(k, 1, c),
    }
    rates: dict[str, list[float]] = {k: [] for k in variants}
    per = max(1, n // writers)
    for r in range(rounds):
        for k in rotate(list(variants), r):
            threads = [threading.Thread(target=variants[k], args=(c, per)) for c in conns]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rates[k].append(writers * per / (time.perf_counter() - t0))
    print(
        f"\npostgres: {writers} writers at once, 1 event per transaction, "
        f"{per} each x {rounds} rounds"
    )
    print(f"  {'path':<22}{'tx/s (median)':>14}   msdata vs it (min-med-max)")
    for k in variants:
        vs = [a / b for a, b in zip(rates["msdata (xid)"], rates[k], strict=True)]
        print(f"  {k:<22}{statistics.median(rates[k]):>14,.0f}   {spread(vs)}")
    for c in conns:
        c.close()


# -- (d) projection catch-up -----------------------------------------------------------------


class Totals(Projection):
    name = "totals"
    mark = "?"

    def __init__(self, name: str, sql_upsert: str) -> None:
        self.name = name  # type: ignore[misc]
        super().__init__()
        self.upsert = sql_upsert

    def setup(self, conn: Any, generation: int) -> Any:
        return None

    @handles(ItemAdded)
    def added(self, ctx: ProjectionContext, event: ItemAdded) -> Any:
        return ctx.conn.execute(self.upsert, (event.sku, event.quantity))


class AsyncTotals(Totals):
    @handles(ItemAdded)
    async def added(self, ctx: ProjectionContext, event: ItemAdded) -> Any:
        return await ctx.conn.execute(self.upsert, event.sku, event.quantity)


def bench_catchup_sqlite(directory: str, total: int, rounds: int) -> None:
    import json

    from msdata.adapters.sqlite import SqliteCheckpointStore, SqliteEventStore, connect

    events_path = os.path.join(directory, "catchup.db")
    model_path = os.path.join(directory, "model.db")
    store = SqliteEventStore(events_path)
    checkpoints = SqliteCheckpointStore(model_path)
    log = EventLog(store, registry=registry)

    async def prepare() -> None:
        await store.create_schema()
        await checkpoints.create_schema()

    asyncio.run(prepare())
    conn = connect(events_path)
    for i in range(total // 10):
        log.append(conn, f"s{i}", 0, [EVENT] * 10)
    conn.commit()
    conn.close()
    model = connect(model_path, synchronous="FULL")

    def raw(tag: str, validate: bool = False) -> None:
        model.execute(f"CREATE TABLE t_{tag} (sku TEXT PRIMARY KEY, n INTEGER)")
        model.execute("CREATE TABLE IF NOT EXISTS raw_cp (name TEXT PRIMARY KEY, position INTEGER)")
        model.execute("INSERT INTO raw_cp VALUES (?, 0)", (tag,))
        model.commit()
        reader = sqlite3.connect(events_path)
        upsert = (
            f"INSERT INTO t_{tag} VALUES (?, ?) ON CONFLICT (sku) DO UPDATE SET n = n + excluded.n"
        )
        position = 0
        while True:
            rows = reader.execute(
                "SELECT position, payload FROM msdata_events WHERE position > ? "
                "ORDER BY position LIMIT 500",
                (position,),
            ).fetchall()
            if not rows:
                break
            for pos, payload in rows:
                data = json.loads(payload)["data"]
                if validate:  # the typed event msdata's handler gets
                    data = ItemAdded.model_validate(data)
                    model.execute(upsert, (data.sku, data.quantity))
                else:
                    model.execute(upsert, (data["sku"], data["quantity"]))
                position = pos
            model.execute("UPDATE raw_cp SET position = ? WHERE name = ?", (position, tag))
            model.commit()
        reader.close()

    def ours(tag: str) -> None:
        model.execute(f"CREATE TABLE t_{tag} (sku TEXT PRIMARY KEY, n INTEGER)")
        model.commit()
        upsert = (
            f"INSERT INTO t_{tag} VALUES (?, ?) ON CONFLICT (sku) DO UPDATE SET n = n + excluded.n"
        )

        def transaction() -> Any:
            return model  # sqlite3's context manager: commit on exit

        runner = ProjectionRunner(
            Totals(tag, upsert), log, checkpoints, transaction, batch_size=500
        )
        assert asyncio.run(runner.catch_up()) == total

    def raw_typed(tag: str) -> None:
        raw(tag, validate=True)

    report_catchup("sqlite", {"raw": raw, "raw, typed": raw_typed, "msdata": ours}, total, rounds)
    model.close()
    asyncio.run(store.close())
    asyncio.run(checkpoints.close())


def bench_catchup_postgres(schema: str, total: int, rounds: int) -> None:
    import json

    import asyncpg
    import psycopg

    from msdata.adapters.postgres import PostgresCheckpointStore, PostgresEventStore

    admin = psycopg.connect(PG_URL, autocommit=True)
    admin.execute(f"CREATE SCHEMA {schema}")
    store = PostgresEventStore(PG_URL, schema=schema)
    checkpoints = PostgresCheckpointStore(PG_URL, schema=schema)
    log = EventLog(store, registry=registry)

    async def prepare() -> None:
        await store.create_schema()
        await checkpoints.create_schema()

    async def raw_async(tag: str) -> None:
        conn = await asyncpg.connect(PG_URL)
        await conn.execute(f"CREATE TABLE {schema}.t_{tag} (sku text PRIMARY KEY, n bigint)")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {schema}.raw_cp (name text PRIMARY KEY, position bigint)"
        )
        await conn.execute(f"INSERT INTO {schema}.raw_cp VALUES ($1, 0)", tag)
        upsert = (
            f"INSERT INTO {schema}.t_{tag} VALUES ($1, $2) "
            f"ON CONFLICT (sku) DO UPDATE SET n = {schema}.t_{tag}.n + excluded.n"
        )
        position = 0
        while True:
            rows = await conn.fetch(
                f"SELECT position, payload FROM {schema}.msdata_events WHERE position > $1 "
                "ORDER BY position LIMIT 500",
                position,
            )
            if not rows:
                break
            async with conn.transaction():
                for pos, payload in rows:
                    data = json.loads(payload)["data"]
                    await conn.execute(upsert, data["sku"], data["quantity"])
                    position = pos
                await conn.execute(
                    f"UPDATE {schema}.raw_cp SET position = $1 WHERE name = $2", position, tag
                )
        await conn.close()

    async def ours_async(tag: str) -> None:
        pool = await asyncpg.create_pool(PG_URL, min_size=1, max_size=1)
        await pool.execute(f"CREATE TABLE {schema}.t_{tag} (sku text PRIMARY KEY, n bigint)")
        upsert = (
            f"INSERT INTO {schema}.t_{tag} VALUES ($1, $2) "
            f"ON CONFLICT (sku) DO UPDATE SET n = {schema}.t_{tag}.n + excluded.n"
        )

        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def transaction() -> Any:
            async with pool.acquire() as conn, conn.transaction():
                yield conn

        runner = ProjectionRunner(
            AsyncTotals(tag, upsert), log, checkpoints, transaction, batch_size=500
        )
        assert await runner.catch_up() == total
        await pool.close()

    async def run_all() -> None:
        await prepare()
        with psycopg.connect(PG_URL) as conn:
            for i in range(total // 10):
                log.append(conn, f"s{i}", 0, [EVENT] * 10)
        rates: dict[str, list[float]] = {"raw": [], "msdata": []}
        variants = {"raw": raw_async, "msdata": ours_async}
        for r in range(rounds):
            for k in rotate(list(variants), r):
                t0 = time.perf_counter()
                await variants[k](f"{k[:3]}{r}")
                rates[k].append(total / (time.perf_counter() - t0))
        await store.close()
        await checkpoints.close()
        print_catchup("postgres (asyncpg)", rates, total, rounds)

    try:
        asyncio.run(run_all())
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


def report_catchup(
    name: str, variants: dict[str, Callable[[str], None]], total: int, rounds: int
) -> None:
    rates: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        for k in rotate(list(variants), r):
            tag = f"{k[:3]}{len(k)}{r}"
            c0, t0 = time.process_time(), time.perf_counter()
            variants[k](tag)
            rates[k].append(total / (time.perf_counter() - t0))
            cpu[k].append(total / (time.process_time() - c0))
    print_catchup(name, rates, total, rounds, cpu)


def print_catchup(
    name: str,
    rates: dict[str, list[float]],
    total: int,
    rounds: int,
    cpu: dict[str, list[float]] | None = None,
) -> None:
    print(f"\n{name}: projection catch-up of {total} events, batches of 500, x {rounds} rounds")
    for k in rates:
        line = f"  {k:<12}{statistics.median(rates[k]):>12,.0f} events/s"
        if cpu is not None:
            line += f"  ({1e6 / statistics.median(cpu[k]):.2f} us of CPU per event)"
        print(line)
    for k in rates:
        if k == "msdata":
            continue
        vs = [a / b for a, b in zip(rates["msdata"], rates[k], strict=True)]
        line = f"  msdata / {k}: {spread(vs)}"
        if cpu is not None:
            by_cpu = [a / b for a, b in zip(cpu["msdata"], cpu[k], strict=True)]
            line += f" (by CPU time: {spread(by_cpu)})"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--catchup", type=int, default=10000)
    args = parser.parse_args()
    print(f"loadavg at start: {loadavg()}")
    if args.backend in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as d:
            target = SqliteAppend(d)
            bench_appends("sqlite (synchronous=FULL, WAL)", target, args.n, args.rounds)
            target.close()
            bench_catchup_sqlite(d, args.catchup, args.rounds)
    if args.backend in ("postgres", "both"):
        schema = f"bench_es_{uuid.uuid4().hex[:8]}"
        target_pg = PostgresAppend(schema)
        try:
            bench_appends("postgres (psycopg, durable commits)", target_pg, args.n, args.rounds)
            bench_concurrent(target_pg, args.n, args.rounds)
        finally:
            target_pg.close()
        bench_catchup_postgres(f"{schema}_p", args.catchup // 2, args.rounds)
    print(f"\nloadavg at end: {loadavg()}")


if __name__ == "__main__":
    main()
