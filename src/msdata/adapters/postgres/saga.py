"""The PostgreSQL saga store: one row per instance in ``{schema}.{prefix}sagas``, and the
replies recorded for an instance another process held in ``{prefix}saga_replies``.

Each call is one short transaction on the store's own asyncpg pool. ``save`` is a
conditional ``UPDATE … WHERE version = $expected`` (an ``INSERT`` for a new instance), and
``save(also=...)`` calls ``also(conn)`` with the asyncpg connection inside the same
transaction: pass it to ``outbox.add_async`` of a :class:`PostgresOutboxStore` on the same
database and the command commits with the state. ``claim`` takes rows with
``FOR UPDATE SKIP LOCKED``, so concurrent recovery workers never get the same instance.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Self

import asyncpg

from msdata.adapters.postgres._db import PostgresDatabase
from msdata.errors import ConcurrencyError, SagaNotFound
from msdata.saga.store import (
    AlsoInTransaction,
    SagaRecord,
    SagaStatus,
    SagaStoreFeatures,
    record_from_json,
    record_to_json,
)
from msdata.storage import DEFAULT_TABLE_PREFIX, check_store_options, check_table_prefix

__all__ = ["PostgresSagaStore"]

_TABLE = """\
CREATE TABLE IF NOT EXISTS {table} (
    saga_id     text PRIMARY KEY,
    saga_type   text NOT NULL,
    status      text NOT NULL,
    version     bigint NOT NULL,
    lease_owner text,
    lease_until timestamptz,
    wake_at     timestamptz,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    state       jsonb NOT NULL
);
-- status and type only change at the start and the end of an instance: the writes in
-- between touch no indexed column (and can be HOT updates)
CREATE INDEX IF NOT EXISTS "{name}_status" ON {table} (status, saga_type);
-- replies that came while another process held the instance (SagaStore.add_reply); the
-- next holder applies them and its save deletes them
CREATE TABLE IF NOT EXISTS {replies} (
    saga_id text NOT NULL,
    key     text NOT NULL,
    seq     bigserial,
    reply   bytea NOT NULL,
    PRIMARY KEY (saga_id, key)
);
"""

_COLUMNS = (
    "saga_id, saga_type, status, version, lease_owner, lease_until, wake_at, created_at, "
    "updated_at, state::text"
)
#: the instance's recorded replies, oldest first, as two arrays after the columns
_REPLIES = (
    "array(SELECT r.key FROM {replies} r WHERE r.saga_id = {alias}.saga_id ORDER BY r.seq),"
    " array(SELECT r.reply FROM {replies} r WHERE r.saga_id = {alias}.saga_id ORDER BY r.seq)"
)
_ACTIVE = "('RUNNING', 'COMPENSATING')"


def _record(row: Any) -> SagaRecord:
    saga_id, saga_type, status, version, owner, until, wake, created, updated, state = row[:10]
    replies = dict(zip(row[10], row[11], strict=True)) if len(row) > 10 and row[10] else None
    return record_from_json(
        state,
        saga_id=saga_id,
        saga_type=saga_type,
        status=status,
        version=version,
        created_at=created,
        updated_at=updated,
        lease_owner=owner,
        lease_until=until,
        wake_at=wake,
        replies=replies,
    )


class PostgresSagaStore:
    """The PostgreSQL :class:`msdata.saga.SagaStore` (see the module docstring).

    ``pool_or_dsn``: an asyncpg pool, or a ``postgresql://`` DSN to make one from on first
    use. Table: ``{schema}.{table_prefix}sagas``."""

    features = SagaStoreFeatures(async_connection=True, durable=True)

    def __init__(
        self,
        pool_or_dsn: asyncpg.Pool | str,
        *,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        schema: str | None = None,
        max_size: int = 4,
    ) -> None:
        self._prefix = check_table_prefix(table_prefix)
        self._db = PostgresDatabase(
            pool_or_dsn, schema=schema, max_size=max_size, kind="saga store"
        )
        self._name = f"{self._prefix}sagas"
        self.table = t = self._db.qualified(self._name)
        self._lock_class = self._db.lock_class(self._name)
        self._insert = (
            f"INSERT INTO {t} (saga_id, saga_type, status, version, lease_owner, lease_until,"
            " wake_at, created_at, updated_at, state)"
            " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10::jsonb)"
            " ON CONFLICT (saga_id) DO NOTHING"
        )
        self._update = (
            f"UPDATE {t} SET status=$1, version=$2, lease_owner=$3, lease_until=$4, wake_at=$5,"
            " updated_at=$6, state=$7::jsonb WHERE saga_id=$8 AND version=$9"
        )
        self._version = f"SELECT version FROM {t} WHERE saga_id=$1"
        self.replies_table = r = self._db.qualified(f"{self._prefix}saga_replies")
        self._with_replies = _REPLIES.format(replies=r, alias="s")
        self._get = f"SELECT {_COLUMNS}, {self._with_replies} FROM {t} s WHERE saga_id=$1"
        self._add_reply = (
            f"INSERT INTO {r} (saga_id, key, reply) VALUES ($1, $2, $3)"
            " ON CONFLICT (saga_id, key) DO NOTHING"
        )
        self._delete_replies = f"DELETE FROM {r} WHERE saga_id = $1 AND key = ANY($2::text[])"

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresSagaStore:
        """A store over ``postgresql://…`` that connects on first use; ``options`` go to
        the constructor (``table_prefix``, ``schema``, ``max_size``)."""
        check_store_options(cls, options, f"{cls.__name__} (postgresql://)")
        return cls(url, **options)

    def schema_sql(self) -> str:
        """The DDL ``create_schema`` runs (idempotent), e.g. for a migration tool."""
        return self._db.schema_head() + _TABLE.format(
            table=self.table, name=self._name, replies=self.replies_table
        )

    async def create_schema(self) -> None:
        await self._db.run_ddl("saga create_schema", self.schema_sql(), self._lock_class)

    async def drop_schema(self) -> None:
        """Drop the table (for tests and teardown)."""
        sql = f"DROP TABLE IF EXISTS {self.table}, {self.replies_table}"
        await self._db.call("saga drop_schema", lambda pool: pool.execute(sql))

    async def save(self, record: SagaRecord, *, also: AlsoInTransaction | None = None) -> None:
        r = record
        state = record_to_json(r).decode()
        expected = r.version - 1

        if expected == 0:
            args: tuple[Any, ...] = (
                r.saga_id,
                r.saga_type,
                r.status.value,
                r.version,
                r.lease_owner,
                r.lease_until,
                r.wake_at,
                r.created_at,
                r.updated_at,
                state,
            )
            sql = self._insert
        else:
            args = (
                r.status.value,
                r.version,
                r.lease_owner,
                r.lease_until,
                r.wake_at,
                r.updated_at,
                state,
                r.saga_id,
                expected,
            )
            sql = self._update

        if also is None and not r.replies:
            # one statement is its own transaction: one round trip

            async def write_alone(pool: Any) -> None:
                async with pool.acquire() as conn:
                    if not (await conn.execute(sql, *args)).endswith(" 1"):
                        actual = await conn.fetchval(self._version, r.saga_id)
                        raise ConcurrencyError(f"saga {r.saga_id}", expected, actual or 0)

            await self._db.call("saga save", write_alone)
            return

        async def write(pool: Any) -> None:
            async with pool.acquire() as conn, conn.transaction():
                status = await conn.execute(sql, *args)
                if not status.endswith(" 1"):
                    actual = await conn.fetchval(self._version, r.saga_id)
                    raise ConcurrencyError(f"saga {r.saga_id}", expected, actual or 0)
                if r.replies:
                    await conn.execute(self._delete_replies, r.saga_id, list(r.replies))
                if also is not None:
                    result = also(conn)
                    if inspect.isawaitable(result):
                        await result

        await self._db.call("saga save", write)

    async def get(self, saga_id: str) -> SagaRecord:
        row = await self._db.call("saga get", lambda pool: pool.fetchrow(self._get, saga_id))
        if row is None:
            raise SagaNotFound(f"no saga instance {saga_id!r}")
        return _record(row)

    async def add_reply(self, saga_id: str, key: str, reply: bytes) -> bool:
        status = await self._db.call(
            "saga add_reply", lambda pool: pool.execute(self._add_reply, saga_id, key, reply)
        )
        return bool(status.endswith(" 1"))

    async def claim(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[SagaRecord]:
        t = self.table
        sql = (
            f"WITH c AS (SELECT saga_id FROM {t} WHERE status IN {_ACTIVE}"
            " AND (lease_until IS NULL OR lease_until <= $1)"
            " AND (wake_at IS NULL OR wake_at <= $1"
            f" OR EXISTS (SELECT 1 FROM {self.replies_table} r WHERE r.saga_id = {t}.saga_id))"
            " ORDER BY updated_at LIMIT $3 FOR UPDATE SKIP LOCKED)"
            f" UPDATE {t} s SET lease_owner = $2, lease_until = $4, version = s.version + 1"
            f" FROM c WHERE s.saga_id = c.saga_id RETURNING {_prefixed('s')},"
            f" {self._with_replies}"
        )
        rows = await self._db.call(
            "saga claim", lambda pool: pool.fetch(sql, now, owner, limit, lease_until)
        )
        out = [_record(row) for row in rows]
        out.sort(key=lambda r: r.updated_at)
        return out

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
            args.append(saga_type)
            where.append(f"saga_type = ${len(args)}")
        if statuses is not None:
            args.append([s.value for s in statuses])
            where.append(f"status = ANY(${len(args)}::text[])")
        if stuck_at is not None:
            args.append(stuck_at)
            n = len(args)
            where.append(
                f"status IN {_ACTIVE} AND (lease_until IS NULL OR lease_until <= ${n})"
                f" AND (wake_at IS NULL OR wake_at <= ${n})"
            )
        sql = f"SELECT {_COLUMNS} FROM {self.table}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        args.append(limit)
        sql += f" ORDER BY updated_at LIMIT ${len(args)}"
        rows = await self._db.call("saga find", lambda pool: pool.fetch(sql, *args))
        return [_record(row) for row in rows]

    async def close(self) -> None:
        await self._db.close("saga store close")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _prefixed(alias: str) -> str:
    return ", ".join(
        f"{alias}.{c.strip()}" if not c.strip().startswith("state") else f"{alias}.state::text"
        for c in _COLUMNS.split(",")
    )
