"""The partitioned PostgreSQL step, two setups side by side, step by step: server CPU per row.

Two partitioned stores of ``--rows`` pending rows each (1000 keys, appended at once). A
is drained by ``--relays-a`` relays, B by ``--relays-b``; A's schema (its claim function)
is made by the msdata at ``--a-src`` (a subprocess with that ``PYTHONPATH``: e.g. the
lead's checkout of ``main``), B's by this tree; this process drives both the same way
(``claim``, then ``mark_sent_and_claim`` of the batch each relay holds), one connection per
store, relay by relay, an A step and a B step in turn (which goes first swapped at each
relay), so both see the same load on this shared machine. A relay whose claim comes back
empty steps no more. The server CPU of each store's backend is read around each of its
steps (``/proc/PID/schedstat``, nanoseconds; Linux, the server on this host) and summed
per row drained. Per round (fresh tables) the ratio B / A; min-median-max over the rounds.

Same code, 4 relays against 2: ``--a-src src --relays-a 2 --relays-b 4``. A change against
``main``: ``--a-src /work/main/src --relays-a 4 --relays-b 4``.

Run: PYTHONPATH=src .venv/bin/python bench/bench_pg_steps_ab.py [--rows N] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import uuid

import asyncpg
from _fair import loadavg, spread

from msdata.adapters.postgres.outbox import PostgresOutboxStore
from msdata.testing.conformance.outbox import make_rows

URL = "postgresql://postgres@127.0.0.1:5432/test"
_KEYS = [f"k{i}" for i in range(1000)]


def _ns(pid: int) -> int:
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


async def one_round(url: str, a_src: str, ka: int, kb: int, n: int) -> tuple[float, float]:
    """Server CPU per row (us) of A and of B, drained side by side."""
    pa, pb = f"a{uuid.uuid4().hex[:10]}_", f"b{uuid.uuid4().hex[:10]}_"
    code = (
        "import asyncio; from msdata.adapters.postgres.outbox import PostgresOutboxStore as S; "
        f"asyncio.run(S({url!r}, table_prefix={pa!r}, partitioned=True).create_schema())"
    )
    env = {**os.environ, "PYTHONPATH": a_src}
    await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code], env=env, check=True)
    stores = (
        PostgresOutboxStore(url, table_prefix=pa, partitioned=True, max_size=1),
        PostgresOutboxStore(url, table_prefix=pb, partitioned=True, max_size=1),
    )
    await stores[1].create_schema()
    conn = await asyncpg.connect(url)
    try:
        for s in stores:
            async with conn.transaction():
                await s.append_async(conn, make_rows(n, keys=_KEYS))
        pids = [
            await s._db.call("pid", lambda p: p.fetchval("SELECT pg_backend_pid()")) for s in stores
        ]
        relays = [[f"r{i}" for i in range(k)] for k in (ka, kb)]
        held: list[dict[str, list[int]]] = [{r: [] for r in rs} for rs in relays]

        async def step(j: int, r: str) -> None:
            s, h = stores[j], held[j][r]
            got = await (s.mark_sent_and_claim(r, h, 100, 30.0) if h else s.claim(r, 100, 30.0))
            held[j][r] = [x.seq for x in got]

        for _ in range(3):  # registration and rebalancing
            for j in (0, 1):
                for r in relays[j]:
                    await step(j, r)
        cpu, rows = [0, 0], [0, 0]
        stepping = [[r for r in relays[j] if held[j][r]] for j in (0, 1)]
        turn = 0
        while stepping[0] or stepping[1]:
            for i in range(max(len(stepping[0]), len(stepping[1]))):
                turn += 1
                for j in (0, 1) if turn % 2 else (1, 0):
                    if i >= len(stepping[j]):
                        continue
                    r = stepping[j][i]
                    rows[j] += len(held[j][r])
                    t = _ns(pids[j])
                    await step(j, r)
                    cpu[j] += _ns(pids[j]) - t
            stepping = [[r for r in stepping[j] if held[j][r]] for j in (0, 1)]
        return cpu[0] / rows[0] / 1e3, cpu[1] / rows[1] / 1e3
    finally:
        await conn.close()
        for s in stores:
            await s.drop_schema()
            await s.close()


def cli() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default=URL)
    parser.add_argument("--a-src", default="src", help="the msdata source tree that makes A")
    parser.add_argument("--relays-a", type=int, default=2)
    parser.add_argument("--relays-b", type=int, default=4)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.rounds < 5:
        raise SystemExit("at least 5 rounds")
    args.a_src = os.path.abspath(args.a_src)
    return args


async def main(args: argparse.Namespace) -> None:
    a_src = args.a_src
    print(f"loadavg at start: {loadavg()}")
    print(
        f"A: {args.relays_a} relays, schema from {a_src}; B: {args.relays_b} relays, this "
        f"tree; {args.rows:,} rows each; server CPU per row, us"
    )
    ratios = []
    for rnd in range(args.rounds):
        a, b = await one_round(args.url, a_src, args.relays_a, args.relays_b, args.rows)
        ratios.append(b / a)
        print(f"    round {rnd + 1}: A {a:6.2f}  B {b:6.2f}  B / A {b / a:.3f}", flush=True)
    print(f"    B / A per round (min-median-max): {spread(ratios)}")
    print(f"loadavg at end: {loadavg()}")


if __name__ == "__main__":
    asyncio.run(main(cli()))
