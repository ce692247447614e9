"""The PostgreSQL checkpoint store: a row per checkpoint, saved by compare-and-set in the
caller's transaction, and a row per projection naming its active generation."""

from __future__ import annotations

from typing import Any, Self

import asyncpg

from msdata.adapters.postgres._db import (
    CallerSQL,
    PostgresDatabase,
    check_in_transaction,
    driver_of,
)
from msdata.errors import ConcurrencyError
from msdata.projections.store import check_checkpoint_name, check_position
from msdata.storage import DEFAULT_TABLE_PREFIX, check_store_options, check_table_prefix

__all__ = ["PostgresCheckpointStore"]

_DDL = """\
CREATE TABLE IF NOT EXISTS {checkpoints} (
    name       text PRIMARY KEY,
    position   bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {active} (
    projection text PRIMARY KEY,
    generation integer NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""


class PostgresCheckpointStore:
    """The PostgreSQL :class:`msdata.projections.store.CheckpointStore`.

    ``save``/``activate`` (and their ``_async`` forms) run one statement on the caller's
    psycopg, asyncpg or SQLAlchemy connection, in its open transaction; a concurrent save
    of the same name waits for the other transaction and then fails the compare-and-set.
    ``load``/``active`` use the store's own asyncpg pool (``pool_or_dsn``). Tables
    ``{schema}.{table_prefix}checkpoints`` and ``…projections``."""

    def __init__(
        self,
        pool_or_dsn: asyncpg.Pool | str,
        *,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        schema: str | None = None,
        max_size: int = 2,
    ) -> None:
        self._prefix = check_table_prefix(table_prefix)
        self._db = PostgresDatabase(
            pool_or_dsn, schema=schema, max_size=max_size, kind="checkpoint store"
        )
        self.table = self._db.qualified(f"{self._prefix}checkpoints")
        self.active_table = self._db.qualified(f"{self._prefix}projections")
        self._lock_class = self._db.lock_class(f"{self._prefix}checkpoints")
        t = self.table
        # the UPDATE waits for a concurrent save of the name and then re-checks position;
        # a first save inserts, and a concurrent first save makes the other's insert a no-op
        # (each placeholder once: psycopg's %s are positional)
        self._save = CallerSQL(
            "WITH a AS (SELECT CAST({0} AS text) AS name, CAST({1} AS bigint) AS pos, "
            "CAST({2} AS bigint) AS expected), "
            f"u AS (UPDATE {t} c SET position = a.pos, updated_at = now() FROM a "
            "WHERE c.name = a.name AND c.position = a.expected RETURNING 1), "
            f"i AS (INSERT INTO {t} (name, position) SELECT a.name, a.pos FROM a "
            "WHERE a.expected = 0 AND NOT EXISTS (SELECT 1 FROM u) "
            "ON CONFLICT (name) DO NOTHING RETURNING 1) "
            "SELECT (SELECT count(*) FROM u) + (SELECT count(*) FROM i)",
            "checkpoint save",
        )
        self._activate = CallerSQL(
            f"INSERT INTO {self.active_table} (projection, generation) VALUES ({{0}}, {{1}}) "
            "ON CONFLICT (projection) DO UPDATE SET generation = EXCLUDED.generation, "
            "updated_at = now()",
            "checkpoint activate",
        )
        self._actual = CallerSQL(f"SELECT position FROM {t} WHERE name = {{0}}", "checkpoint")

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresCheckpointStore:
        """A store over ``postgresql://…`` that connects on first use; ``options`` go to
        the constructor."""
        check_store_options(cls, options, f"{cls.__name__} (postgresql://)")
        return cls(url, **options)

    def schema_sql(self) -> str:
        return self._db.schema_head() + _DDL.format(
            checkpoints=self.table, active=self.active_table
        )

    async def create_schema(self) -> None:
        await self._db.run_ddl("checkpoint create_schema", self.schema_sql(), self._lock_class)

    async def drop_schema(self) -> None:
        ddl = f"DROP TABLE IF EXISTS {self.table}; DROP TABLE IF EXISTS {self.active_table};"
        await self._db.run_ddl("checkpoint drop_schema", ddl, self._lock_class)

    @staticmethod
    def _check(name: str, position: int, expected: int) -> list[Any]:
        check_checkpoint_name(name)
        check_position("position", position)
        check_position("expected", expected)
        return [name, position, expected]

    def save(self, conn: Any, name: str, position: int, expected: int) -> None:
        args = self._check(name, position, expected)
        check_in_transaction(conn, driver_of(conn, want_async=False))
        row = self._save.run(conn, args, fetch=True)
        if not row[0]:
            # the statement's snapshot predates the transaction it waited for: look again
            actual = self._actual.run(conn, [name], fetch=True)
            raise ConcurrencyError(f"checkpoint {name}", expected, actual[0] if actual else 0)

    async def save_async(self, conn: Any, name: str, position: int, expected: int) -> None:
        args = self._check(name, position, expected)
        check_in_transaction(conn, driver_of(conn, want_async=True))
        row = await self._save.run_async(conn, args, fetch=True)
        if not row[0]:
            actual = await self._actual.run_async(conn, [name], fetch=True)
            raise ConcurrencyError(f"checkpoint {name}", expected, actual[0] if actual else 0)

    def activate(self, conn: Any, projection: str, generation: int) -> None:
        check_checkpoint_name(projection)
        check_position("generation", generation)
        check_in_transaction(conn, driver_of(conn, want_async=False))
        self._activate.run(conn, [projection, generation])

    async def activate_async(self, conn: Any, projection: str, generation: int) -> None:
        check_checkpoint_name(projection)
        check_position("generation", generation)
        check_in_transaction(conn, driver_of(conn, want_async=True))
        await self._activate.run_async(conn, [projection, generation])

    async def _value(self, what: str, sql: str, key: str) -> int:
        value = await self._db.call(what, lambda pool: pool.fetchval(sql, key))
        return int(value) if value is not None else 0

    async def load(self, name: str) -> int:
        return await self._value(
            "checkpoint load", f"SELECT position FROM {self.table} WHERE name = $1", name
        )

    async def active(self, projection: str) -> int:
        return await self._value(
            "checkpoint active",
            f"SELECT generation FROM {self.active_table} WHERE projection = $1",
            projection,
        )

    async def close(self) -> None:
        await self._db.close("checkpoint store close")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
