"""The SQLite saga store: one row per instance in ``{prefix}sagas``, and the replies recorded
for an instance another process held in ``{prefix}saga_replies``.

Each call is one short transaction on the store's own connection (``BEGIN IMMEDIATE``, so
a version check and its write are one step even with other processes on the file). A
``save(also=...)`` calls ``also(conn)`` with that ``sqlite3`` connection inside the
transaction: pass it to ``outbox.add`` of a :class:`SqliteOutboxStore` on the same file and
the command commits with the state. Times are stored as integer microseconds since the
epoch (UTC); the fields that are not queried are one JSON document
(:func:`msdata.saga.store.record_to_json`).
"""

from __future__ import annotations

import inspect
import os
import sqlite3
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from msdata.adapters.sqlite._db import SqliteDatabase
from msdata.errors import ConcurrencyError, ConfigurationError, SagaNotFound
from msdata.saga.store import (
    ACTIVE_STATUSES,
    AlsoInTransaction,
    SagaRecord,
    SagaStatus,
    SagaStoreFeatures,
    from_us,
    record_from_json,
    record_to_json,
    to_us,
)
from msdata.storage import DEFAULT_TABLE_PREFIX

__all__ = ["SqliteSagaStore"]

_SCHEMA = """\
CREATE TABLE IF NOT EXISTS {p}sagas (
    saga_id     TEXT PRIMARY KEY,
    saga_type   TEXT NOT NULL,
    status      TEXT NOT NULL,
    version     INTEGER NOT NULL,
    lease_owner TEXT,
    lease_until INTEGER,
    wake_at     INTEGER,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    state       BLOB NOT NULL
);
-- status and type only change at the start and the end of an instance: the writes in
-- between touch no index (updated_at is sorted at query time, over the rows found)
CREATE INDEX IF NOT EXISTS {p}sagas_status ON {p}sagas (status, saga_type);
-- replies that came while another process held the instance (SagaStore.add_reply); the
-- next holder applies them and its save deletes them; rowid keeps their order
CREATE TABLE IF NOT EXISTS {p}saga_replies (
    saga_id TEXT NOT NULL,
    key     TEXT NOT NULL,
    reply   BLOB NOT NULL,
    UNIQUE (saga_id, key)
);
"""

_COLUMNS = (
    "saga_id, saga_type, status, version, lease_owner, lease_until, wake_at, created_at, "
    "updated_at, state"
)
_ACTIVE = "('RUNNING', 'COMPENSATING')"


def _record(row: tuple[Any, ...], replies: dict[str, bytes] | None = None) -> SagaRecord:
    saga_id, saga_type, status, version, owner, until, wake, created, updated, state = row
    return record_from_json(
        state,
        saga_id=saga_id,
        saga_type=saga_type,
        status=status,
        version=version,
        created_at=from_us(created),  # type: ignore[arg-type]
        updated_at=from_us(updated),  # type: ignore[arg-type]
        lease_owner=owner,
        lease_until=from_us(until),
        wake_at=from_us(wake),
        replies=replies,
    )


class SqliteSagaStore(SqliteDatabase):
    """The SQLite :class:`msdata.saga.SagaStore` (see the module docstring).

    ``path``: the database file (the one your outbox uses, for remote steps);
    ``table_prefix``: tables are ``{prefix}sagas``; ``synchronous``: NORMAL (the default:
    durable on an application crash) or FULL (also on power loss)."""

    features = SagaStoreFeatures(async_connection=False, durable=True)
    #: a saga write is a page or two (a relay's commit ~10): checkpoint after ~1000 pages,
    #: as SQLite's own default, not every 64 writes (each checkpoint syncs the database file)
    checkpoint_every = 1024

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        synchronous: str = "NORMAL",
        busy_timeout: float = 30.0,
    ) -> None:
        super().__init__(
            path, table_prefix=table_prefix, synchronous=synchronous, busy_timeout=busy_timeout
        )
        p = self.table_prefix
        self._t = f"{p}sagas"
        t = self._t
        self._insert = f"INSERT INTO {t} ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)"
        self._update = (
            f"UPDATE {t} SET status=?, version=?, lease_owner=?, lease_until=?, wake_at=?, "
            "updated_at=?, state=? WHERE saga_id=? AND version=?"
        )
        self._version = f"SELECT version FROM {t} WHERE saga_id=?"
        self._get = f"SELECT {_COLUMNS} FROM {t} WHERE saga_id=?"
        self._r = r = f"{p}saga_replies"
        self._replies = f"SELECT key, reply FROM {r} WHERE saga_id=? ORDER BY rowid"
        self._add_reply = f"INSERT OR IGNORE INTO {r} (saga_id, key, reply) VALUES (?,?,?)"
        self._has_replies = f"SELECT 1 FROM {r} WHERE {r}.saga_id = {t}.saga_id"

    def schema_sql(self) -> str:
        return _SCHEMA.format(p=self.table_prefix)

    async def create_schema(self) -> None:
        await self.run_script(self.schema_sql())

    async def save(self, record: SagaRecord, *, also: AlsoInTransaction | None = None) -> None:
        r = record
        state = record_to_json(r)
        expected = r.version - 1

        def write(conn: sqlite3.Connection) -> None:
            if expected == 0:
                try:
                    conn.execute(
                        self._insert,
                        (
                            r.saga_id,
                            r.saga_type,
                            r.status.value,
                            r.version,
                            r.lease_owner,
                            to_us(r.lease_until),
                            to_us(r.wake_at),
                            to_us(r.created_at),
                            to_us(r.updated_at),
                            state,
                        ),
                    )
                except sqlite3.IntegrityError:
                    self._conflict(conn, r.saga_id, expected)
            else:
                cur = conn.execute(
                    self._update,
                    (
                        r.status.value,
                        r.version,
                        r.lease_owner,
                        to_us(r.lease_until),
                        to_us(r.wake_at),
                        to_us(r.updated_at),
                        state,
                        r.saga_id,
                        expected,
                    ),
                )
                if cur.rowcount != 1:
                    self._conflict(conn, r.saga_id, expected)
            if r.replies:
                keys = list(r.replies)
                conn.execute(
                    f"DELETE FROM {self._r} WHERE saga_id=? AND key IN"
                    f" ({','.join('?' * len(keys))})",
                    (r.saga_id, *keys),
                )
            if also is not None and inspect.isawaitable(also(conn)):
                raise ConfigurationError(
                    "the SQLite saga store's connection is a sync sqlite3 one: use "
                    "outbox.add, not add_async"
                )

        if also is None and not r.replies:
            # one statement in autocommit mode is its own transaction

            def alone(conn: sqlite3.Connection) -> None:
                write(conn)
                self._commits += 1

            await self.run(alone, inline=True)
        else:
            await self.run(lambda conn: self.write(conn, write), inline=True)

    def _conflict(self, conn: sqlite3.Connection, saga_id: str, expected: int) -> None:
        row = conn.execute(self._version, (saga_id,)).fetchone()
        raise ConcurrencyError(f"saga {saga_id}", expected, 0 if row is None else row[0])

    def _read(self, conn: sqlite3.Connection, saga_id: str) -> SagaRecord | None:
        row = conn.execute(self._get, (saga_id,)).fetchone()
        if row is None:
            return None
        replies = conn.execute(self._replies, (saga_id,)).fetchall()
        return _record(row, dict(replies) if replies else None)

    async def get(self, saga_id: str) -> SagaRecord:
        # two reads without a snapshot: a reply read without its row's newest version, or
        # missed because it was just applied, is harmless (replies are applied once, by key)
        rec = await self.run(lambda conn: self._read(conn, saga_id), inline=True)
        if rec is None:
            raise SagaNotFound(f"no saga instance {saga_id!r}")
        return rec

    async def add_reply(self, saga_id: str, key: str, reply: bytes) -> bool:
        def add(conn: sqlite3.Connection) -> bool:
            added = conn.execute(self._add_reply, (saga_id, key, reply)).rowcount == 1
            self._commits += 1
            return added

        return await self.run(add, inline=True)

    async def claim(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[SagaRecord]:
        t = self._t
        now_us, until_us = to_us(now), to_us(lease_until)

        def claim(conn: sqlite3.Connection) -> list[SagaRecord]:
            ids = [
                row[0]
                for row in conn.execute(
                    f"SELECT saga_id FROM {t} WHERE status IN {_ACTIVE}"
                    " AND (lease_until IS NULL OR lease_until <= ?)"
                    " AND (wake_at IS NULL OR wake_at <= ?"
                    f" OR EXISTS ({self._has_replies})) ORDER BY updated_at LIMIT ?",
                    (now_us, now_us, limit),
                )
            ]
            out = []
            for saga_id in ids:
                conn.execute(
                    f"UPDATE {t} SET lease_owner=?, lease_until=?, version=version+1"
                    " WHERE saga_id=?",
                    (owner, until_us, saga_id),
                )
                rec = self._read(conn, saga_id)
                assert rec is not None
                out.append(rec)
            return out

        return await self.run(lambda conn: self.write(conn, claim), inline=True)

    async def find(
        self,
        *,
        saga_type: str | None = None,
        statuses: Sequence[SagaStatus] | None = None,
        stuck_at: datetime | None = None,
        limit: int = 100,
    ) -> list[SagaRecord]:
        where: list[str] = []
        args: list[Any] = []
        if saga_type is not None:
            where.append("saga_type = ?")
            args.append(saga_type)
        if statuses is not None:
            where.append(f"status IN ({','.join('?' * len(statuses))})" if statuses else "0")
            args.extend(s.value for s in statuses)
        if stuck_at is not None:
            us = to_us(stuck_at)
            where.append(
                f"status IN {_ACTIVE} AND (lease_until IS NULL OR lease_until <= ?)"
                " AND (wake_at IS NULL OR wake_at <= ?)"
            )
            args += [us, us]
        sql = f"SELECT {_COLUMNS} FROM {self._t}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY updated_at LIMIT ?"
        args.append(limit)
        rows = await self.run(lambda conn: conn.execute(sql, args).fetchall(), inline=True)
        return [_record(row) for row in rows]


assert ACTIVE_STATUSES == (SagaStatus.RUNNING, SagaStatus.COMPENSATING)
