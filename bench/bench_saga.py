"""Sagas: msdata's orchestrator against the raw work it cannot avoid, in the same run.

(a) memory: a 2-step in-memory saga (a compensatable step that changes the data with
    ``model_copy``, then an async pivot), ``orchestrator.start`` to COMPLETED, per saga, in
    CPU time. Raw floor: the two step functions called directly. python-cqrs runs the same
    2-step saga in 85 us on this machine (PERF-FACTS.md); target <= 20 us.
(b) sqlite / postgres: the same saga persisted (3 committed state writes per saga: before
    each step's effect, and COMPLETED). Raw: the same number of committed single-row
    transactions on the same database (sqlite3 ``UPDATE`` of one row in autocommit; asyncpg
    one-statement ``UPDATE``), with a state document of the same size. Steps/s and the ratio
    msdata / raw; target >= 0.7.
(c) rabbitmq: a saga with one remote step (command through the orchestrator's SQLite outbox
    to a participant process over RabbitMQ, reply back) and one local step; sagas/s with 1
    and 4 orchestrator processes (each its own SQLite file, 50 sagas in flight each), one
    participant process.

Rounds are interleaved (the order rotates each round); per-round ratios are printed as
min-median-max, with /proc/loadavg at the start and the end.

    .venv/bin/python bench/bench_saga.py [--rounds 5] [--only memory,sqlite,postgres,rabbitmq]
        [--against GITREF]   # (a): msdata as of GITREF too, same process, interleaved
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import os
import re
import signal
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

from pydantic import BaseModel

from msdata.adapters.memory import MemorySagaStore
from msdata.ids import new_id
from msdata.saga import Saga, SagaOrchestrator, SagaRecord

PG_URL = os.environ.get("MSDATA_PG_URL", "postgresql://root@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("MSDATA_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


class Order(BaseModel):
    order_id: str = "o-1"
    amount_cents: int = 1234
    reserved: bool = False


def reserve(o: Order) -> Order:
    return o.model_copy(update={"reserved": True})


def release(o: Order) -> None:
    return None


async def charge(o: Order) -> None:
    return None


saga = Saga("bench", Order).step("reserve", reserve, compensate=release).pivot("charge", charge)


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{statistics.median(values):.2f}-{max(values):.2f}"


# -- (a) memory --------------------------------------------------------------------------------


async def _timed(fn: Callable[[], Awaitable[Any]], n: int) -> float:
    """CPU us per call of ``fn``, after 200 warm-up calls."""
    for _ in range(200):
        await fn()
    t = time.process_time()
    for _ in range(n):
        await fn()
    return (time.process_time() - t) / n * 1e6


async def _saga_us(orchestrator: Any, store: Any, saga_: Any, n: int) -> tuple[float, float]:
    """CPU us per saga with the cyclic GC on, then off; a fresh store for each."""
    data = Order()
    orch = orchestrator(store(), [saga_])
    ms_us = await _timed(lambda: orch.start(saga_, data), n)
    orch = orchestrator(store(), [saga_])
    gc.disable()  # the memory store keeps every instance: the cyclic GC's share grows with them
    try:
        no_gc = await _timed(lambda: orch.start(saga_, data), n)
    finally:
        gc.enable()
    return ms_us, no_gc


async def memory_round(n: int) -> tuple[float, float, float]:
    async def raw() -> None:
        d = reserve(data)
        await charge(d)

    data = Order()
    raw_us = await _timed(raw, n)
    ms_us, no_gc = await _saga_us(SagaOrchestrator, MemorySagaStore, saga, n)
    return raw_us, ms_us, no_gc


def load_base(ref: str) -> tuple[Any, Any, Any]:
    """msdata's ``src/msdata`` at git ``ref``, imported as the package ``msdata_base`` (its
    own imports renamed), for an A/B in this one process: (SagaOrchestrator,
    MemorySagaStore, the bench saga built with its Saga). Both copies are imported, so the
    heap the cyclic GC walks is larger than in a run of one."""
    tmp = Path(tempfile.mkdtemp(prefix="msdata-bench-base-"))
    repo = Path(__file__).resolve().parent.parent
    tar = subprocess.run(
        ["git", "-C", str(repo), "archive", ref, "src/msdata"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=tar, check=True)
    pkg = tmp / "src" / "msdata_base"
    (tmp / "src" / "msdata").rename(pkg)
    for f in pkg.rglob("*.py"):
        f.write_text(re.sub(r"\bmsdata\b(?=\.| import)", "msdata_base", f.read_text()))
    sys.path.insert(0, str(tmp / "src"))
    memory = importlib.import_module("msdata_base.adapters.memory")
    sagas = importlib.import_module("msdata_base.saga")
    base_saga = (
        sagas.Saga("bench", Order)
        .step("reserve", reserve, compensate=release)
        .pivot("charge", charge)
    )
    return sagas.SagaOrchestrator, memory.MemorySagaStore, base_saga


def _peer_round(peer: subprocess.Popen[str]) -> float:
    assert peer.stdin is not None and peer.stdout is not None
    peer.stdin.write("round\n")
    peer.stdin.flush()
    return float(peer.stdout.readline())


def calibration() -> float:
    """CPU us of one UUIDv7 ``new_id()`` now; PERF-FACTS.md has 1.25 us on a quiet machine."""
    n = 50_000
    t = time.process_time()
    for _ in range(n):
        new_id()
    return (time.process_time() - t) / n * 1e6


# -- (b) sqlite / postgres ----------------------------------------------------------------------


async def _docs() -> list[bytes]:
    """The three state documents msdata writes for one saga (captured from a real run), so
    the raw rows have the same size."""
    from msdata.saga.store import record_to_json

    docs: list[bytes] = []

    class Capture(MemorySagaStore):
        async def save(self, record: SagaRecord, *, also: Any = None) -> None:
            docs.append(record_to_json(record))
            await super().save(record, also=also)

    await SagaOrchestrator(Capture(), [saga]).start(saga, Order())
    assert len(docs) == 3
    return docs


async def sqlite_round(n: int, first: str) -> tuple[float, float]:
    from msdata.adapters.sqlite import SqliteSagaStore

    tmp = Path(tempfile.mkdtemp(prefix="msdata-bench-saga-"))
    db = tmp / "sagas.db"
    store = SqliteSagaStore(db)
    await store.create_schema()
    orch = SagaOrchestrator(store, [saga])
    raw_conn = sqlite3.connect(tmp / "raw.db", isolation_level=None)
    raw_conn.execute("PRAGMA journal_mode=WAL")
    raw_conn.execute("PRAGMA synchronous=NORMAL")
    # the same table shape and index as SqliteSagaStore's, rows of the same size
    raw_conn.executescript(store.schema_sql().replace("msdata_", "raw_"))
    d1, d2, d3 = await _docs()
    t = "raw_sagas"

    async def raw() -> float:
        now = time.time_ns() // 1000
        start = time.perf_counter()
        for _ in range(n):  # 3 committed single-row transactions per saga
            sid = new_id()  # time-ordered, as the saga ids
            raw_conn.execute(
                f"INSERT INTO {t} VALUES (?, 'bench', 'RUNNING', 1, 'w', ?, NULL, ?, ?, ?)",
                (sid, now, now, now, d1),
            )
            raw_conn.execute(
                f"UPDATE {t} SET status='RUNNING', version=2, lease_owner='w', lease_until=?,"
                " wake_at=NULL, updated_at=?, state=? WHERE saga_id=? AND version=1",
                (now, now, d2, sid),
            )
            raw_conn.execute(
                f"UPDATE {t} SET status='COMPLETED', version=3, lease_owner=NULL,"
                " lease_until=NULL, wake_at=NULL, updated_at=?, state=?"
                " WHERE saga_id=? AND version=2",
                (now, d3, sid),
            )
        return time.perf_counter() - start

    async def msdata() -> float:
        t = time.perf_counter()
        for _ in range(n):
            await orch.start(saga, Order())
        return time.perf_counter() - t

    order = [raw, msdata] if first == "raw" else [msdata, raw]
    times = {fn.__name__: await fn() for fn in order}
    raw_conn.close()
    await store.close()
    return 2 * n / times["raw"], 2 * n / times["msdata"]


async def postgres_round(n: int, first: str) -> tuple[float, float]:
    import asyncpg

    from msdata.adapters.postgres import PostgresSagaStore

    prefix = f"b{uuid.uuid4().hex[:8]}_"
    store = PostgresSagaStore(PG_URL, table_prefix=prefix, max_size=1)
    await store.create_schema()
    orch = SagaOrchestrator(store, [saga])
    conn = await asyncpg.connect(PG_URL)
    # the same table shape and index as PostgresSagaStore's, rows of the same size
    raw_store = PostgresSagaStore(PG_URL, table_prefix=prefix + "raw_", max_size=1)
    await raw_store.create_schema()
    table = raw_store.table
    d1, d2, d3 = (d.decode() for d in await _docs())

    async def raw() -> float:
        now = datetime.now(UTC)
        t = time.perf_counter()
        for _ in range(n):
            sid = new_id()
            await conn.execute(
                f"INSERT INTO {table} VALUES ($1, 'bench', 'RUNNING', 1, 'w', $2, NULL, $2, $2,"
                " $3::jsonb) ON CONFLICT (saga_id) DO NOTHING",
                sid,
                now,
                d1,
            )
            await conn.execute(
                f"UPDATE {table} SET status='RUNNING', version=2, lease_owner='w', lease_until=$1,"
                " wake_at=NULL, updated_at=$1, state=$2::jsonb WHERE saga_id=$3 AND version=1",
                now,
                d2,
                sid,
            )
            await conn.execute(
                f"UPDATE {table} SET status='COMPLETED', version=3, lease_owner=NULL,"
                " lease_until=NULL, wake_at=NULL, updated_at=$1, state=$2::jsonb"
                " WHERE saga_id=$3 AND version=2",
                now,
                d3,
                sid,
            )
        return time.perf_counter() - t

    async def msdata() -> float:
        t = time.perf_counter()
        for _ in range(n):
            await orch.start(saga, Order())
        return time.perf_counter() - t

    try:
        order = [raw, msdata] if first == "raw" else [msdata, raw]
        times = {fn.__name__: await fn() for fn in order}
    finally:
        await raw_store.drop_schema()
        await raw_store.close()
        await conn.close()
        await store.drop_schema()
        await store.close()
    return 2 * n / times["raw"], 2 * n / times["msdata"]


# -- (c) rabbitmq -------------------------------------------------------------------------------

PARTICIPANT = """
import asyncio, signal, sqlite3, sys
import aio_pika
from msdata import Command, message_type
from msdata.adapters.rabbitmq import RabbitMQTransport
from msdata.adapters.sqlite import SqliteIdempotencyStore, SqliteOutboxStore, connect
from msdata.events import EventBus
from msdata.outbox import Outbox, OutboxRelay
from msdata.saga import SagaParticipant

DB, URL, PREFIX = sys.argv[1:4]

@message_type("benchsaga.Charge")
class Charge(Command):
    order_id: str

async def main():
    outbox_store, replies = SqliteOutboxStore(DB), SqliteIdempotencyStore(DB)
    await outbox_store.create_schema(); await replies.create_schema()
    conn = await aio_pika.connect_robust(URL)
    transport = RabbitMQTransport(conn)
    bus = EventBus(transport, source="payments", prefetch=200)
    db = connect(DB)  # one connection; "with db:" is one transaction (commit or rollback)
    participant = SagaParticipant(bus, Outbox(outbox_store, source="payments"),
                                  lambda: db, idempotency=replies)

    @participant.handler(Charge, group="payments", topic=PREFIX + ".charge")
    def charge(cmd):
        return {"payment_id": "p-" + cmd.order_id}

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with bus, OutboxRelay(outbox_store, transport, poll_interval=0.005):
        print("ready", flush=True)
        await stop.wait()
    _, queues = transport.declared
    await transport.close()
    ch = await conn.channel()
    for q in sorted(queues):
        await ch.queue_delete(q)
    await conn.close()

asyncio.run(main())
"""

ORCHESTRATOR = """
import asyncio, sys, time
import aio_pika
from pydantic import BaseModel
from msdata import Command, message_type
from msdata.adapters.rabbitmq import RabbitMQTransport
from msdata.adapters.sqlite import SqliteOutboxStore, SqliteSagaStore
from msdata.events import EventBus
from msdata.outbox import Outbox, OutboxRelay
from msdata.saga import Saga, SagaOrchestrator, SagaStatus, remote

DB, URL, PREFIX, N, IDX = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]

@message_type("benchsaga.Charge")
class Charge(Command):
    order_id: str

class Order(BaseModel):
    order_id: str
    payment_id: str | None = None
    reserved: bool = False

saga = (Saga("rmq-bench", Order)
        .step("reserve", lambda o: o.model_copy(update={"reserved": True}),
              compensate=lambda o: None)
        .pivot("charge", remote(lambda o: Charge(order_id=o.order_id), topic=PREFIX + ".charge"),
               timeout=60))

async def main():
    store, outbox_store = SqliteSagaStore(DB), SqliteOutboxStore(DB)
    await store.create_schema(); await outbox_store.create_schema()
    conn = await aio_pika.connect_robust(URL)
    transport = RabbitMQTransport(conn)
    bus = EventBus(transport, source="orders" + IDX, prefetch=200)
    outbox = Outbox(outbox_store, source="orders" + IDX)
    orch = SagaOrchestrator(store, [saga], bus=bus, outbox=outbox,
                            reply_topic=PREFIX + ".replies" + IDX, reply_group="orch" + IDX)
    async with bus, OutboxRelay(outbox_store, transport, poll_interval=0.005):
        print("ready", flush=True)
        sys.stdin.readline()
        sem = asyncio.Semaphore(50)
        async def one(i):
            async with sem:
                r = await orch.start(saga, Order(order_id=IDX + "-" + str(i)))
                r = await orch.wait(r.saga_id, timeout=120)
                assert r.status is SagaStatus.COMPLETED, r
        t = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(N)))
        print(time.perf_counter() - t, flush=True)
    await orch.close()
    _, queues = transport.declared
    await transport.close()
    ch = await conn.channel()
    for q in sorted(queues):
        await ch.queue_delete(q)
    await conn.close()

asyncio.run(main())
"""


def rabbitmq_round(procs: int, n: int) -> float:
    """Sagas/s with ``procs`` orchestrator processes running ``n`` sagas each."""
    tmp = Path(tempfile.mkdtemp(prefix="msdata-bench-rmq-"))
    prefix = f"b{uuid.uuid4().hex[:8]}"
    (tmp / "p.py").write_text(PARTICIPANT)
    (tmp / "o.py").write_text(ORCHESTRATOR)
    env = {**os.environ}
    part = subprocess.Popen(
        [sys.executable, str(tmp / "p.py"), str(tmp / "p.db"), AMQP_URL, prefix],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    orchs = []
    try:
        assert part.stdout is not None and part.stdout.readline().strip() == "ready"
        for i in range(procs):
            p = subprocess.Popen(
                [
                    sys.executable,
                    str(tmp / "o.py"),
                    str(tmp / f"o{i}.db"),
                    AMQP_URL,
                    prefix,
                    str(n),
                    str(i),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            orchs.append(p)
        for p in orchs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        t = time.perf_counter()
        for p in orchs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in orchs:
            assert p.stdout is not None
            float(p.stdout.readline())
        wall = time.perf_counter() - t
        for p in orchs:
            p.wait(timeout=60)
    finally:
        for p in orchs:
            if p.poll() is None:
                p.kill()
        part.send_signal(signal.SIGTERM)
        part.wait(timeout=60)
    return procs * n / wall


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default="memory,sqlite,postgres,rabbitmq")
    ap.add_argument("--memory-n", type=int, default=20_000)
    ap.add_argument("--sql-n", type=int, default=1_000)
    ap.add_argument("--rmq-n", type=int, default=300)
    ap.add_argument(
        "--against",
        metavar="GITREF",
        help="(a) only: also run msdata as of this git ref (e.g. HEAD~3), interleaved",
    )
    ap.add_argument(
        "--cqrs-python",
        help="a python with python-cqrs 5.3 installed: run bench/peer_cqrs_saga.py interleaved",
    )
    args = ap.parse_args()
    only = set(args.only.split(","))
    print(f"loadavg at start: {loadavg()}")

    if "memory" in only:
        peer = None
        if args.cqrs_python:
            peer = subprocess.Popen(  # noqa: ASYNC220 (a peer fed round by round, outside timing)
                [args.cqrs_python, str(Path(__file__).with_name("peer_cqrs_saga.py")), "5000"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        peers: list[float] = []
        raws, mss, ratios, quiet, no_gcs = [], [], [], [], []
        base = load_base(args.against) if args.against else None
        bases: list[float] = []
        base_no_gcs: list[float] = []
        for r in range(args.rounds):
            if peer is not None and r % 2 == 0:
                peers.append(_peer_round(peer))
            if base is not None and r % 2 == 0:
                b, b_no_gc = await _saga_us(*base, args.memory_n)
                bases.append(b)
                base_no_gcs.append(b_no_gc)
            cal = calibration()
            raw, ms, no_gc = await memory_round(args.memory_n)
            if base is not None and r % 2 == 1:
                b, b_no_gc = await _saga_us(*base, args.memory_n)
                bases.append(b)
                base_no_gcs.append(b_no_gc)
            if peer is not None and r % 2 == 1:
                peers.append(_peer_round(peer))
            no_gcs.append(no_gc)
            cal = (cal + calibration()) / 2
            raws.append(raw)
            mss.append(ms)
            ratios.append(ms / raw)
            quiet.append(ms * 1.25 / cal)
        print("\n(a) 2-step in-memory saga, start -> COMPLETED, CPU us per saga")
        print(f"  raw floor (the two steps called directly): {spread(raws)} us")
        print(f"  msdata SagaOrchestrator + MemorySagaStore:  {spread(mss)} us (target <= 20)")
        print(f"  msdata / floor per round:                   {spread(ratios)}")
        print(f"  msdata with the cyclic GC off:               {spread(no_gcs)} us")
        if base is not None:
            label = f"msdata at {args.against}, same rounds:"
            print(f"  {label:<44} {spread(bases)} us")
            print(f"  ... with the cyclic GC off:                  {spread(base_no_gcs)} us")
            print(
                "  this / that per round, GC on:                "
                f"{spread([m / b for m, b in zip(mss, bases, strict=True)])}"
            )
            print(
                "  this / that per round, GC off:               "
                f"{spread([m / b for m, b in zip(no_gcs, base_no_gcs, strict=True)])}"
            )
        if peer is not None:
            assert peer.stdin is not None
            peer.stdin.close()
            peer.wait(timeout=60)
            print(f"  python-cqrs 5.3, same saga, same run:        {spread(peers)} us")
            print(
                "  msdata / python-cqrs per round:              "
                f"{spread([m / p for m, p in zip(mss, peers, strict=True)])}"
            )
        else:
            print("  python-cqrs, same saga, this machine (PERF-FACTS.md): 85 us")
        print(
            "  msdata scaled to a quiet machine's pace (new_id() timed around each round, "
            f"1.25 us quiet per PERF-FACTS.md): {spread(quiet)} us"
        )

    for name, fn in (("sqlite", sqlite_round), ("postgres", postgres_round)):
        if name not in only:
            continue
        raws, mss, ratios = [], [], []
        for r in range(args.rounds):
            raw, ms = await fn(args.sql_n, "raw" if r % 2 == 0 else "msdata")
            raws.append(raw)
            mss.append(ms)
            ratios.append(ms / raw)
        durability = "WAL, synchronous=NORMAL" if name == "sqlite" else "fsync at commit"
        print(f"\n(b) {name} ({durability}): steps/s, 3 committed state writes per 2-step saga")
        print(f"  raw single-row transactions (same count): {spread(raws)} steps/s")
        print(f"  msdata saga:                              {spread(mss)} steps/s")
        print(f"  msdata / raw per round:                   {spread(ratios)} (target >= 0.70)")

    if "rabbitmq" in only:
        rates: dict[int, list[float]] = {1: [], 4: []}
        for r in range(max(2, args.rounds // 2)):
            for procs in (1, 4) if r % 2 == 0 else (4, 1):
                rates[procs].append(rabbitmq_round(procs, args.rmq_n))
        print("\n(c) remote-step saga over RabbitMQ (SQLite outbox each side, persistent messages)")
        for procs, values in rates.items():
            print(f"  {procs} orchestrator process(es): {spread(values)} sagas/s")
        print(
            f"  4 / 1 per round: {spread([b / a for a, b in zip(rates[1], rates[4], strict=True)])}"
        )
    print(f"\nloadavg at end: {loadavg()}")


if __name__ == "__main__":
    asyncio.run(main())
