"""The SQLite event store (stdlib ``sqlite3``, WAL).

SQLite has one writer at a time and gives each new row the largest ``position`` + 1, so a
transaction's events get positions above every committed one and commit before any later
writer can take a position: the commit order is the position order, and a reader never
passes an event that commits later. Appends check the stream's version (the largest
``stream_version`` of the stream, an index lookup) and insert; the ``UNIQUE (stream_id,
stream_version)`` constraint catches a writer that read the version before another
transaction appended.

Subscribers: ``wait_for_events`` is woken at once by an append through any store on the
same file in this process (then it looks every 2 ms until that transaction has committed),
and otherwise notices other processes' commits through ``PRAGMA data_version`` every
``poll_interval`` seconds. Reads run on the store's own connection, on the event loop's
thread (a WAL reader never waits for a writer).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from typing import Any

from msdata.adapters.sqlite._db import (
    Waiting,
    WatchedDatabase,
    caller_connection,
    map_errors,
)
from msdata.errors import ConcurrencyError
from msdata.eventstore.store import (
    Backlog,
    NewEvent,
    RecordedEvent,
    as_types,
    check_expected_version,
    check_read,
    check_stream_id,
)
from msdata.storage import DEFAULT_TABLE_PREFIX

__all__ = ["SqliteEventStore"]

_DDL = """\
-- Events in commit order; payload is the CloudEvents 1.0 JSON of the envelope.
CREATE TABLE IF NOT EXISTS {p}events (
    position       INTEGER PRIMARY KEY,   -- the global order (rowid: largest + 1)
    stream_id      TEXT    NOT NULL,
    stream_version INTEGER NOT NULL,      -- 1, 2, ... within the stream
    event_id       TEXT    NOT NULL,
    type           TEXT    NOT NULL,
    schema_version INTEGER NOT NULL,
    payload        BLOB    NOT NULL,
    recorded_at    REAL    NOT NULL,      -- Unix seconds
    UNIQUE (stream_id, stream_version)
);
"""

_COLUMNS = (
    "position, stream_id, stream_version, event_id, type, schema_version, payload, recorded_at"
)

# Stores waiting on a database file in this process, woken by appends to it.
_waiting: Waiting = {}


_new = tuple.__new__


def _records(rows: list[tuple[Any, ...]]) -> list[RecordedEvent]:
    # tuple.__new__ straight: the named tuple's own __new__ is one Python call more per
    # row (a catch-up reads every event through here: 0.60 -> 0.38 us a row)
    fromts, recorded = datetime.fromtimestamp, RecordedEvent
    return [
        _new(
            recorded,
            (p, s, v, i, t, sv, pl if type(pl) is bytes else bytes(pl), fromts(at, UTC)),
        )
        for p, s, v, i, t, sv, pl, at in rows
    ]


class SqliteEventStore(WatchedDatabase):
    """The :class:`msdata.eventstore.store.EventStore` on a SQLite file.

    ``append`` takes the caller's ``sqlite3.Connection`` (or a SQLAlchemy ``Session``/
    ``Connection`` on a SQLite engine) inside its open transaction; ``append_async`` takes
    the same sync connections (SQLite has no async driver msdata serves). Table
    ``{table_prefix}events``; see :meth:`schema_sql`.
    """

    _waiting = _waiting

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        synchronous: str = "NORMAL",
        busy_timeout: float = 30.0,
        poll_interval: float = 0.05,
    ) -> None:
        super().__init__(
            path,
            table_prefix=table_prefix,
            synchronous=synchronous,
            busy_timeout=busy_timeout,
            inline=True,
        )
        self._watch_commits(poll_interval)
        t = f"{self.table_prefix}events"
        self._t = t
        self._version_sql = f"SELECT max(stream_version) FROM {t} WHERE stream_id = ?"
        self._insert = (
            f"INSERT INTO {t} (stream_id, stream_version, event_id, type, schema_version, "
            "payload, recorded_at) VALUES (?,?,?,?,?,?,?)"
        )

    def schema_sql(self) -> str:
        return _DDL.format(p=self.table_prefix)

    async def create_schema(self) -> None:
        await self.run_script(self.schema_sql())

    # -- write side ----------------------------------------------------------------------

    def append(
        self, conn: Any, stream_id: str, expected_version: int, events: Sequence[NewEvent]
    ) -> int:
        check_stream_id(stream_id)
        check_expected_version(expected_version)
        raw = caller_connection(conn)
        with map_errors("event store append"):
            self._insert_events(raw, stream_id, expected_version, events)
        if _waiting:
            self._signal()
        return expected_version + len(events)

    def _insert_events(
        self,
        raw: sqlite3.Connection,
        stream_id: str,
        expected_version: int,
        events: Sequence[NewEvent],
    ) -> None:
        try:
            # a new stream needs no look: if it exists, version 1 is taken (UNIQUE)
            if expected_version or not events:
                current = raw.execute(self._version_sql, (stream_id,)).fetchone()[0] or 0
                if current != expected_version:
                    raise ConcurrencyError(f"stream {stream_id}", expected_version, current)
            if not events:
                return
            now = time.time()
            args = [
                (stream_id, v, e.event_id, e.type, e.schema_version, e.payload, now)
                for v, e in enumerate(events, expected_version + 1)
            ]
            if len(args) == 1:
                raw.execute(self._insert, args[0])
            else:
                raw.executemany(self._insert, args)
        except sqlite3.IntegrityError as e:
            # another transaction appended between our look and our insert
            actual = raw.execute(self._version_sql, (stream_id,)).fetchone()[0] or 0
            raise ConcurrencyError(f"stream {stream_id}", expected_version, actual) from e

    async def append_async(
        self, conn: Any, stream_id: str, expected_version: int, events: Sequence[NewEvent]
    ) -> int:
        """The same sync connections as :meth:`append` (an INSERT costs microseconds)."""
        return self.append(conn, stream_id, expected_version, events)

    # -- reads ---------------------------------------------------------------------------

    async def _read(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        def read(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return conn.execute(sql, args).fetchall()

        return await self.run(read, inline=True)

    async def read_stream(
        self, stream_id: str, from_version: int = 1, limit: int | None = None
    ) -> list[RecordedEvent]:
        check_stream_id(stream_id)
        rows = await self._read(
            f"SELECT {_COLUMNS} FROM {self._t} WHERE stream_id = ? AND stream_version >= ? "
            "ORDER BY stream_version LIMIT ?",
            (stream_id, from_version, -1 if limit is None else limit),
        )
        return _records(rows)

    async def stream_version(self, stream_id: str) -> int:
        check_stream_id(stream_id)
        rows = await self._read(self._version_sql, (stream_id,))
        return int(rows[0][0] or 0)

    async def read_all(
        self, after: int = 0, limit: int = 1000, types: Collection[str] | None = None
    ) -> list[RecordedEvent]:
        check_read(after, limit)
        wanted = as_types(types)
        if wanted is None:
            sql = f"SELECT {_COLUMNS} FROM {self._t} WHERE position > ? ORDER BY position LIMIT ?"
            return _records(await self._read(sql, (after, limit)))
        marks = ",".join("?" * len(wanted))
        sql = (
            f"SELECT {_COLUMNS} FROM {self._t} WHERE position > ? AND type IN ({marks}) "
            "ORDER BY position LIMIT ?"
        )
        return _records(await self._read(sql, (after, *sorted(wanted), limit)))

    async def head(self) -> int:
        rows = await self._read(f"SELECT coalesce(max(position), 0) FROM {self._t}", ())
        return int(rows[0][0])

    async def backlog(self, after: int) -> Backlog:
        rows = await self._read(
            f"SELECT count(*), min(recorded_at) FROM {self._t} WHERE position > ?", (after,)
        )
        n, oldest = rows[0]
        return Backlog(int(n), None if oldest is None else datetime.fromtimestamp(oldest, UTC))

    # -- waiting -------------------------------------------------------------------------

    async def wait_for_events(self, after: int, timeout: float) -> None:
        loop, wake = self._waiter()
        wake.clear()
        deadline = loop.time() + timeout
        if await self.head() > after:
            return
        self._data_version = None
        await self._wait_for_commit(loop, wake, deadline)
