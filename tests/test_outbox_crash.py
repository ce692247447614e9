"""Crash tests: a real process running msdata is SIGKILLed at a chosen point.

- The writer killed before its commit: nothing of it is ever published.
- The relay killed after publishing and before marking the rows sent: another relay
  publishes them again once the lease runs out, and the inbox applies each once.

Parametrised over SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
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

from msdata.outbox import Inbox, Outbox, OutboxRelay
from msdata.testing import eventually

sys.path.insert(0, str(Path(__file__).parent))
from outbox_crash_worker import LEASE_SECONDS, FileBroker, OrderPlaced, registry

pytestmark = [pytest.mark.slow]

WORKER = str(Path(__file__).parent / "outbox_crash_worker.py")


@dataclass
class Backend:
    name: str
    dsn: str
    prefix: str
    outbox: Any
    inbox: Any

    def connect(self) -> Any:
        if self.name == "sqlite":
            import sqlite3

            return sqlite3.connect(self.dsn, timeout=30.0)
        import psycopg

        return psycopg.connect(self.dsn)

    @property
    def mark(self) -> str:
        return "?" if self.name == "sqlite" else "%s"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    prefix = f"c{uuid.uuid4().hex[:8]}_"
    if request.param == "sqlite":
        from msdata.adapters.sqlite import SqliteInboxStore, SqliteOutboxStore

        dsn = str(tmp_path / "crash.db")
        outbox: Any = SqliteOutboxStore(dsn, table_prefix=prefix)
        inbox: Any = SqliteInboxStore(dsn, table_prefix=prefix)
    else:
        dsn = request.getfixturevalue("postgres_url")
        try:
            from msdata.adapters.postgres import PostgresInboxStore, PostgresOutboxStore
        except ImportError as e:
            pytest.skip(f"postgres adapter not built yet ({e})")
        outbox = PostgresOutboxStore.from_url(dsn, table_prefix=prefix)
        inbox = PostgresInboxStore.from_url(dsn, table_prefix=prefix)
    await outbox.create_schema()
    await inbox.create_schema()
    b = Backend(request.param, dsn, prefix, outbox, inbox)
    conn = b.connect()
    conn.execute(f"CREATE TABLE {prefix}orders (id TEXT PRIMARY KEY)")
    conn.execute(f"CREATE TABLE {prefix}effects (message_id TEXT NOT NULL)")
    conn.commit()
    try:
        yield b
    finally:
        for t in ("orders", "effects"):
            conn.execute(f"DROP TABLE IF EXISTS {prefix}{t}")
        conn.commit()
        conn.close()
        if request.param == "postgres":
            await outbox.drop_schema()
            await inbox.drop_schema()
        await outbox.close()
        close = getattr(inbox, "close", None)
        if close is not None:
            await close()


def spawn(mode: str, b: Backend, broker: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, WORKER, mode, b.name, b.dsn, b.prefix, broker],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


async def wait_for_line(proc: subprocess.Popen[str], prefix: str, timeout: float = 60.0) -> str:
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)
    if not line.startswith(prefix):
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"worker said {line!r}, expected {prefix}...; stderr:\n{err}")
    return line.split(" ", 1)[1].strip()


def kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


async def drain(relay: OutboxRelay, store: Any, timeout: float = 30.0) -> None:
    async def drained() -> bool:
        await relay.run_once()
        return not (await store.status()).pending

    await eventually(drained, timeout, interval=0.1, what="the relay drained the outbox")


async def test_writer_killed_before_commit_publishes_nothing(
    backend: Backend, tmp_path: Path
) -> None:
    broker = FileBroker(str(tmp_path / "broker.log"))
    proc = spawn("write-and-hang", backend, broker.path)
    lost = await wait_for_line(proc, "ADDED")
    kill(proc)
    # the database is usable after the crash, and a committed message goes through
    proc = spawn("write-and-commit", backend, broker.path)
    kept = await wait_for_line(proc, "COMMITTED")
    assert proc.wait(60) == 0
    proc.stdout.close()  # type: ignore[union-attr]
    proc.stderr.close()  # type: ignore[union-attr]

    relay = OutboxRelay(backend.outbox, broker)
    await drain(relay, backend.outbox)
    assert broker.read() == [kept]
    assert lost != kept
    conn = backend.connect()
    orders = conn.execute(f"SELECT count(*) FROM {backend.prefix}orders").fetchone()[0]
    conn.close()
    assert orders == 1  # the killed transaction's business row is gone with its message


async def test_relay_killed_before_marking_publishes_again_and_inbox_applies_once(
    backend: Backend, tmp_path: Path
) -> None:
    broker = FileBroker(str(tmp_path / "broker.log"))
    outbox = Outbox(backend.outbox, registry=registry)
    conn = backend.connect()
    added = []
    for i in range(3):
        conn.execute(f"INSERT INTO {backend.prefix}orders (id) VALUES ({backend.mark})", (f"o{i}",))
        added += outbox.add(conn, OrderPlaced(order_id=f"o{i}"), key="same-key")
    conn.commit()
    ids = [e.id for e in added]

    proc = spawn("relay-hang", backend, broker.path)
    assert await wait_for_line(proc, "PUBLISHED") == "3"
    kill(proc)
    assert broker.read() == ids  # published (confirmed), never marked

    relay = OutboxRelay(backend.outbox, broker, poll_interval=0.1)
    assert await relay.run_once() == 0  # the dead relay's lease still holds the key
    await asyncio.sleep(LEASE_SECONDS)
    await drain(relay, backend.outbox)
    assert broker.read() == ids + ids  # at least once: the same messages, in order, again

    inbox = Inbox(backend.inbox)
    for message_id in broker.read():
        if backend.name == "sqlite":
            with conn:
                if inbox.first_time(conn, "billing", message_id):
                    conn.execute(f"INSERT INTO {backend.prefix}effects VALUES (?)", (message_id,))
        else:
            with conn.transaction():
                if inbox.first_time(conn, "billing", message_id):
                    conn.execute(f"INSERT INTO {backend.prefix}effects VALUES (%s)", (message_id,))
    rows = conn.execute(f"SELECT message_id FROM {backend.prefix}effects").fetchall()
    conn.commit()
    conn.close()
    assert Counter(r[0] for r in rows) == Counter(ids)
