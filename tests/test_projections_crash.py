"""Crash tests: a projection runner SIGKILLed between a read-model write and its
checkpoint (and between the checkpoint and the commit) never applies an event twice, and
a restarted runner applies every event once. On SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from msdata.eventstore import EventLog
from msdata.testing import eventually

sys.path.insert(0, str(Path(__file__).parent))
from projection_crash_worker import Counted, registry

pytestmark = [pytest.mark.slow]

WORKER = str(Path(__file__).parent / "projection_crash_worker.py")
EVENTS = 20


@dataclass
class Backend:
    name: str
    events_dsn: str
    model_dsn: str
    prefix: str
    store: Any
    checkpoints: Any

    def connect(self) -> Any:
        if self.name == "sqlite":
            import sqlite3

            return sqlite3.connect(self.model_dsn, timeout=30.0)
        import psycopg

        return psycopg.connect(self.model_dsn)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    prefix = f"c{uuid.uuid4().hex[:8]}_"
    if request.param == "sqlite":
        import sqlite3

        from msdata.adapters.sqlite import SqliteCheckpointStore, SqliteEventStore

        events_dsn, model_dsn = str(tmp_path / "events.db"), str(tmp_path / "model.db")
        store: Any = SqliteEventStore(events_dsn, table_prefix=prefix)
        checkpoints: Any = SqliteCheckpointStore(model_dsn, table_prefix=prefix)
        connect: Any = lambda: sqlite3.connect(events_dsn)  # noqa: E731
    else:
        import psycopg

        from msdata.adapters.postgres import PostgresCheckpointStore, PostgresEventStore
        from services import require

        events_dsn = model_dsn = require("postgres")
        store = PostgresEventStore(events_dsn, table_prefix=prefix)
        checkpoints = PostgresCheckpointStore(model_dsn, table_prefix=prefix)
        connect = lambda: psycopg.connect(events_dsn)  # noqa: E731
    await store.create_schema()
    await checkpoints.create_schema()
    log = EventLog(store, registry=registry)
    with connect() as conn:
        for i in range(EVENTS):
            log.append(conn, f"s{i % 4}", i // 4, [Counted(n=i)])
    b = Backend(request.param, events_dsn, model_dsn, prefix, store, checkpoints)
    try:
        yield b
    finally:
        if request.param == "postgres":
            with b.connect() as conn:
                conn.execute(f"DROP TABLE IF EXISTS {prefix}applied_1")
            await store.drop_schema()
            await checkpoints.drop_schema()
        await store.close()
        await checkpoints.close()


async def _readable(store: Any) -> bool:
    return len(await store.read_all(0, 1000)) == EVENTS


def run_worker(b: Backend, mode: str, n: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, WORKER, b.name, b.events_dsn, b.model_dsn, b.prefix, mode, str(n)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.parametrize(
    ("mode", "n"), [("handler", 1), ("handler", 5), ("handler", 6), ("checkpoint", 2)]
)
async def test_a_killed_runner_never_applies_an_event_twice(
    backend: Backend, mode: str, n: int
) -> None:
    # on a shared PostgreSQL server the events may be held back for a moment behind another
    # session's open transaction (delayed, never lost): start once the worker can read them
    await eventually(lambda: _readable(backend.store), what="every event readable")
    proc = run_worker(backend, mode, n)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    # what the killed batch wrote was never committed: the checkpoint is before it
    batches_done = (n - 1) // 3 if mode == "handler" else n - 1
    await eventually(lambda: _readable(backend.store), what="every event readable")
    records = await backend.store.read_all(0, 1000)
    expected_checkpoint = records[batches_done * 3 - 1].position if batches_done else 0
    assert await backend.checkpoints.load("applied@1") == expected_checkpoint

    again = run_worker(backend, "none", EVENTS - batches_done * 3)
    out, err = again.communicate(timeout=60)
    assert again.returncode == 0, err
    assert out.strip() == f"done {EVENTS - batches_done * 3}"
    with backend.connect() as conn:
        rows = conn.execute(f"SELECT event_id, position FROM {backend.prefix}applied_1").fetchall()
    counts = Counter(event_id for event_id, _ in rows)
    assert len(counts) == EVENTS and set(counts.values()) == {1}
    assert sorted(p for _, p in rows) == [r.position for r in records]
    assert await backend.checkpoints.load("applied@1") == records[-1].position
