"""The PostgreSQL inbox store: (consumer, message id) recorded in the caller's transaction."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Self

import asyncpg

from msdata.adapters.postgres._db import CallerSQL, PostgresDatabase, command_count
from msdata.inbox.store import InboxStoreFeatures
from msdata.storage import DEFAULT_TABLE_PREFIX, Connection, check_store_options, check_table_prefix

__all__ = ["PostgresInboxStore"]

_TABLE = """\
CREATE TABLE IF NOT EXISTS {table} (
    consumer    text NOT NULL,
    message_id  text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX IF NOT EXISTS "{name}_recorded_at" ON {table} (recorded_at);
"""


class PostgresInboxStore:
    """The PostgreSQL :class:`msdata.inbox.InboxStore`.

    ``record``/``record_async`` run ``INSERT … ON CONFLICT DO NOTHING RETURNING`` on the
    caller's connection (psycopg, asyncpg, SQLAlchemy; sync or async) in the caller's open
    transaction: True if this transaction inserted the pair. A concurrent duplicate blocks
    on the primary key until the first transaction ends, then returns False (it committed)
    or True (it rolled back). ``create_schema`` and ``purge`` use the store's own asyncpg
    pool, given or made lazily from a DSN. Table: ``{schema}.{table_prefix}inbox``.
    """

    #: records are stamped by the database server's clock
    features = InboxStoreFeatures(reads_clock=False)

    def __init__(
        self,
        pool_or_dsn: asyncpg.Pool | str,
        *,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        schema: str | None = None,
        max_size: int = 2,
    ) -> None:
        self.table_prefix = check_table_prefix(table_prefix)
        self._db = PostgresDatabase(
            pool_or_dsn, schema=schema, max_size=max_size, kind="inbox store"
        )
        self._schema = self._db.schema
        self._name = f"{self.table_prefix}inbox"
        self.table = self._db.qualified(self._name)
        self._lock_class = self._db.lock_class(self._name)
        self._record = CallerSQL(
            f"INSERT INTO {self.table} (consumer, message_id) VALUES ({{0}}, {{1}}) "
            "ON CONFLICT DO NOTHING RETURNING true",
            "inbox record",
            in_transaction=True,
        )

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresInboxStore:
        """A store over ``postgresql://…`` that connects on first use; ``options`` go to
        the constructor (``table_prefix``, ``schema``, ``max_size``…)."""
        check_store_options(cls, options, f"{cls.__name__} (postgresql://)")
        return cls(url, **options)

    def schema_sql(self) -> str:
        """The DDL ``create_schema`` runs (idempotent), e.g. for a migration tool."""
        return self._db.schema_head() + _TABLE.format(table=self.table, name=self._name)

    async def create_schema(self) -> None:
        await self._db.run_ddl("inbox create_schema", self.schema_sql(), self._lock_class)

    async def drop_schema(self) -> None:
        """Drop the table (for tests and teardown)."""
        sql = f"DROP TABLE IF EXISTS {self.table}"
        await self._db.call("inbox drop_schema", lambda pool: pool.execute(sql))

    def record(self, conn: Connection, consumer: str, message_id: str) -> bool:
        return self._record.run(conn, (consumer, message_id), fetch=True) is not None

    async def record_async(self, conn: Connection, consumer: str, message_id: str) -> bool:
        row = await self._record.run_async(conn, (consumer, message_id), fetch=True)
        return row is not None

    async def purge(self, older_than: datetime) -> int:
        sql = f"DELETE FROM {self.table} WHERE recorded_at < $1"
        status = await self._db.call("inbox purge", lambda pool: pool.execute(sql, older_than))
        return command_count(status)

    async def close(self) -> None:
        await self._db.close("inbox close")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
