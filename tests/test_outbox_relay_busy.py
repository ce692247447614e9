"""A relay whose SQLite database is busy (another transaction of the service holds the
single write lock, e.g. a burst of saga participant handlers) retries with one WARNING
line, not an ERROR with a traceback, and publishes once the lock is free."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from msdata.adapters.memory import MemoryOutboxStore
from msdata.adapters.memory.transport import MemoryTransport
from msdata.adapters.sqlite._db import map_errors
from msdata.outbox import OutboxRelay
from msdata.testing.conformance.outbox import make_rows
from msdata.testing.waiting import eventually


def _busy_error(tmp_path: Path) -> BaseException:
    """The error the SQLite adapter raises when the write lock stays taken: a real
    SQLITE_BUSY from the driver, translated by the adapter."""
    path = str(tmp_path / "busy.db")
    holder = sqlite3.connect(path, isolation_level=None)
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN IMMEDIATE")
        try:
            with map_errors("outbox claim"):
                other.execute("INSERT INTO t VALUES (1)")
        except Exception as e:
            return e
        raise AssertionError("the write did not meet the lock")
    finally:
        holder.close()
        other.close()


class _BusyAtFirst:
    """A store whose first ``busy`` claims fail as a locked SQLite database does."""

    def __init__(self, inner: MemoryOutboxStore, error: BaseException, busy: int) -> None:
        self._inner, self._error, self.busy = inner, error, busy

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def claim(self, *args: Any, **kw: Any) -> Any:
        if self.busy:
            self.busy -= 1
            raise self._error
        return await self._inner.claim(*args, **kw)


async def test_a_busy_database_is_a_retry_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    error = _busy_error(tmp_path)
    assert "database is locked" in str(error)
    inner = MemoryOutboxStore()
    tx = inner.begin()
    inner.append(tx, make_rows(3, topic="busy.topic"))
    tx.commit()
    store = _BusyAtFirst(inner, error, busy=2)
    transport = MemoryTransport()
    await transport.declare_group("busy.topic", "g")
    relay = OutboxRelay(store, transport, poll_interval=0.01, backoff=lambda n: 0.01)  # type: ignore[arg-type]
    caplog.set_level(logging.WARNING, logger="msdata.outbox")
    async with relay:
        await eventually(
            lambda: transport.pending("busy.topic", "g") == 3, what="the rows published"
        )
    assert store.busy == 0
    mine = [r for r in caplog.records if r.name == "msdata.outbox"]
    assert not [r for r in mine if r.levelno >= logging.ERROR], [r.getMessage() for r in mine]
    busy = [r for r in mine if "database is busy" in r.getMessage()]
    assert len(busy) == 2 and all(r.levelno == logging.WARNING for r in busy)
    assert all(r.exc_info is None for r in busy)  # one line, no traceback
