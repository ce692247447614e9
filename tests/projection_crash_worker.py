"""Runs a projection over the event store until it is SIGKILLed at a chosen point (or, with
mode "none", until it has caught up). Used by tests/test_projections_crash.py.

argv: backend (sqlite|postgres) events_dsn model_dsn prefix mode n
mode: "handler"    stop after the n-th read-model write, before its batch's checkpoint
      "checkpoint" stop after the n-th checkpoint save, before its transaction commits
      "none"       catch up (n events) and exit
Prints "ready" when it has stopped at the point, "done N" when it caught up."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from msdata.eventstore import EventLog
from msdata.messages import Event, MessageRegistry
from msdata.projections import Projection, ProjectionContext, ProjectionRunner, handles

registry = MessageRegistry()


class Counted(Event):
    n: int


registry.register(Counted, "crash.Counted")


def stop_here() -> None:
    print("ready", flush=True)
    time.sleep(3600)  # SIGKILLed here


class Applied(Projection):
    name = "applied"

    def __init__(self, prefix: str, mode: str, n: int) -> None:
        super().__init__()
        self.prefix, self.mode, self.n, self.calls = prefix, mode, n, 0

    def setup(self, conn: Any, generation: int) -> None:
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {self.prefix}applied_{generation} "
            "(event_id TEXT NOT NULL, position BIGINT NOT NULL)"
        )

    @handles(Counted)
    def counted(self, ctx: ProjectionContext, event: Counted) -> None:
        mark = "?" if sys.argv[1] == "sqlite" else "%s"
        ctx.conn.execute(
            f"INSERT INTO {self.prefix}applied_{ctx.generation} VALUES ({mark}, {mark})",
            (ctx.stored.envelope.id, ctx.stored.position),
        )
        self.calls += 1
        if self.mode == "handler" and self.calls == self.n:
            stop_here()


async def main() -> None:
    backend, events_dsn, model_dsn, prefix, mode, n = sys.argv[1:7]
    store: Any
    checkpoints: Any
    if backend == "sqlite":
        import sqlite3

        from msdata.adapters.sqlite import SqliteCheckpointStore, SqliteEventStore

        store = SqliteEventStore(events_dsn, table_prefix=prefix)
        checkpoints = SqliteCheckpointStore(model_dsn, table_prefix=prefix)

        def transaction() -> Any:
            return sqlite3.connect(model_dsn, timeout=30.0)

    else:
        import psycopg

        from msdata.adapters.postgres import PostgresCheckpointStore, PostgresEventStore

        store = PostgresEventStore(events_dsn, table_prefix=prefix)
        checkpoints = PostgresCheckpointStore(model_dsn, table_prefix=prefix)

        def transaction() -> Any:
            return psycopg.connect(model_dsn)

    saves = 0
    real_save = checkpoints.save

    def save(conn: Any, name: str, position: int, expected: int) -> None:
        nonlocal saves
        real_save(conn, name, position, expected)
        saves += 1
        if mode == "checkpoint" and saves == int(n):
            stop_here()

    checkpoints.save = save
    runner = ProjectionRunner(
        Applied(prefix, mode, int(n)),
        EventLog(store, registry=registry),
        checkpoints,
        transaction,
        batch_size=3,
    )
    applied = await runner.catch_up()
    # "none": n events are due; on a shared server they may be held back for a moment
    # behind another session's open transaction (delayed, never lost)
    while mode == "none" and applied < int(n):
        await store.wait_for_events(runner.position, 1.0)
        applied += await runner.catch_up()
    print(f"done {applied}", flush=True)
    await store.close()
    await checkpoints.close()


if __name__ == "__main__":
    asyncio.run(main())
