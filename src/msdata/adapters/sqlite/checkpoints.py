"""The SQLite checkpoint store: a row per checkpoint, saved by compare-and-set in the
caller's transaction (SQLite's one writer at a time makes the check and the write atomic),
and a row per projection naming its active generation."""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from msdata.adapters.sqlite._db import SqliteDatabase, caller_connection, map_errors
from msdata.errors import ConcurrencyError
from msdata.projections.store import check_checkpoint_name, check_position
from msdata.storage import DEFAULT_TABLE_PREFIX

__all__ = ["SqliteCheckpointStore"]

_DDL = """\
CREATE TABLE IF NOT EXISTS {p}checkpoints (
    name     TEXT PRIMARY KEY,
    position INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {p}projections (
    projection TEXT PRIMARY KEY,
    generation INTEGER NOT NULL
) WITHOUT ROWID;
"""


class SqliteCheckpointStore(SqliteDatabase):
    """The :class:`msdata.projections.store.CheckpointStore` on a SQLite file (the read
    model's). ``save``/``activate`` take the caller's ``sqlite3.Connection`` or SQLAlchemy
    ``Session``/``Connection`` in its open transaction (the ``_async`` forms the same sync
    connections); ``load``/``active`` read on the store's own connection."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        synchronous: str = "NORMAL",
        busy_timeout: float = 30.0,
    ) -> None:
        super().__init__(
            path,
            table_prefix=table_prefix,
            synchronous=synchronous,
            busy_timeout=busy_timeout,
            inline=True,
        )
        p = self.table_prefix
        self._update = f"UPDATE {p}checkpoints SET position = ? WHERE name = ? AND position = ?"
        self._insert = f"INSERT OR IGNORE INTO {p}checkpoints (name, position) VALUES (?, ?)"
        self._select = f"SELECT position FROM {p}checkpoints WHERE name = ?"
        self._activate = (
            f"INSERT INTO {p}projections (projection, generation) VALUES (?, ?) "
            "ON CONFLICT (projection) DO UPDATE SET generation = excluded.generation"
        )
        self._active = f"SELECT generation FROM {p}projections WHERE projection = ?"

    def schema_sql(self) -> str:
        return _DDL.format(p=self.table_prefix)

    async def create_schema(self) -> None:
        await self.run_script(self.schema_sql())

    def save(self, conn: Any, name: str, position: int, expected: int) -> None:
        check_checkpoint_name(name)
        check_position("position", position)
        check_position("expected", expected)
        raw = caller_connection(conn)
        with map_errors("checkpoint save"):
            done = raw.execute(self._update, (position, name, expected)).rowcount
            if not done and expected == 0:
                done = raw.execute(self._insert, (name, position)).rowcount
            if not done:
                row = raw.execute(self._select, (name,)).fetchone()
                raise ConcurrencyError(f"checkpoint {name}", expected, row[0] if row else 0)

    async def save_async(self, conn: Any, name: str, position: int, expected: int) -> None:
        self.save(conn, name, position, expected)

    def activate(self, conn: Any, projection: str, generation: int) -> None:
        check_checkpoint_name(projection)
        check_position("generation", generation)
        raw = caller_connection(conn)
        with map_errors("checkpoint activate"):
            raw.execute(self._activate, (projection, generation))

    async def activate_async(self, conn: Any, projection: str, generation: int) -> None:
        self.activate(conn, projection, generation)

    async def _value(self, sql: str, key: str) -> int:
        def read(conn: sqlite3.Connection) -> int:
            row = conn.execute(sql, (key,)).fetchone()
            return int(row[0]) if row else 0

        return await self.run(read, inline=True)

    async def load(self, name: str) -> int:
        return await self._value(self._select, name)

    async def active(self, projection: str) -> int:
        return await self._value(self._active, projection)
