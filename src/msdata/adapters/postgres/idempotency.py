"""The idempotency store on PostgreSQL.

The claim is ONE statement: a read of the key and the conditional write, in data-modifying
CTEs::

    WITH cur AS (SELECT … WHERE scope = $1 AND key = $2),
         ins AS (INSERT … SELECT … WHERE NOT EXISTS (SELECT 1 FROM cur)
                 ON CONFLICT (scope, key) DO NOTHING RETURNING 1),
         upd AS (UPDATE … WHERE scope = $1 AND key = $2 AND expires_at <= $now
                 AND EXISTS (SELECT 1 FROM cur WHERE expires_at <= $now) RETURNING 1)
    SELECT true … FROM ins UNION ALL SELECT true … FROM upd
    UNION ALL SELECT false, cur.* FROM cur WHERE expires_at > $now

A live key (a replay, or IN_PROGRESS) is read and nothing is written or locked, so a replay
costs what one primary-key SELECT costs; a new key is inserted, an expired one taken over
by an UPDATE that re-checks ``expires_at`` under the row lock. When a concurrent claim
commits between the statement's snapshot and its write, the statement returns nothing and
runs again (at most a few times), seeing that claim. First execution: this statement and
the completing UPDATE, two round trips.

On the caller's connection (psycopg sync/async, asyncpg, SQLAlchemy) both run inside the
caller's transaction: the claim's row stays invisible (and locked) until it commits, so a
concurrent claim of the same key waits on the row lock and then replays what committed,
or claims the key if that transaction rolled back.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Self

import asyncpg

from msdata.adapters.postgres._common import (
    RELAY_ERRORS,
    Driver,
    PoolOwner,
    _driver_errors,
    _pipelined,
    check_schema,
    driver_of,
    lock_class,
    qualified,
    store_error,
)
from msdata.errors import ConfigurationError, StoreError
from msdata.idempotency.store import IdempotencyRecord, IdempotencyStoreFeatures
from msdata.storage import DEFAULT_TABLE_PREFIX, check_table_prefix

__all__ = ["PostgresIdempotencyStore"]

_TABLE = """\
CREATE TABLE IF NOT EXISTS {table} (
    scope       text        NOT NULL,
    key         text        NOT NULL,
    fingerprint text        NOT NULL,
    completed   boolean     NOT NULL,
    expires_at  timestamptz NOT NULL,
    token       text        NOT NULL,
    response    bytea,
    PRIMARY KEY (scope, key)
);
"""

_PARAM = re.compile(r"\{(\d+)\}")
_RETRIES = 5


class _Sql:
    """A statement with placeholders ``{0}``, ``{1}`` (each may appear more than once),
    rendered for asyncpg (``$1``), psycopg (``%(p0)s``) and SQLAlchemy (``:p0``)."""

    __slots__ = ("_psycopg", "_sa", "_sa_text", "asyncpg", "what")

    def __init__(self, template: str, what: str) -> None:
        self.what = what
        self.asyncpg = _PARAM.sub(lambda m: f"${int(m[1]) + 1}", template)
        self._psycopg = _PARAM.sub(lambda m: f"%(p{m[1]})s", template)
        self._sa = _PARAM.sub(lambda m: f":p{m[1]}", template)
        self._sa_text: Any = None

    def _text(self) -> Any:
        if self._sa_text is None:
            from sqlalchemy import text

            self._sa_text = text(self._sa)
        return self._sa_text

    @staticmethod
    def _named(args: tuple[Any, ...]) -> dict[str, Any]:
        return {f"p{i}": a for i, a in enumerate(args)}

    def run(self, conn: Any, args: tuple[Any, ...]) -> Any:
        """The first row (or None) on a caller's sync connection in its transaction."""
        driver = driver_of(conn, want_async=False)
        _require_transaction(conn, driver)
        try:
            if driver is Driver.PSYCOPG:
                return conn.execute(self._psycopg, self._named(args)).fetchone()
            return conn.execute(self._text(), self._named(args)).first()
        except _driver_errors(driver) as e:
            if _pipelined(driver, conn):
                raise
            store_error(self.what, e)

    async def run_async(self, conn: Any, args: tuple[Any, ...]) -> Any:
        """The first row (or None) on a caller's async connection in its transaction."""
        driver = driver_of(conn, want_async=True)
        _require_transaction(conn, driver)
        try:
            if driver is Driver.ASYNCPG:
                return await conn.fetchrow(self.asyncpg, *args)
            if driver is Driver.PSYCOPG_ASYNC:
                cur = await conn.execute(self._psycopg, self._named(args))
                return await cur.fetchone()
            return (await conn.execute(self._text(), self._named(args))).first()
        except _driver_errors(driver) as e:
            if _pipelined(driver, conn):
                raise
            store_error(self.what, e)


def _require_transaction(conn: Any, driver: Driver) -> None:
    """Refuse a connection that would commit our write on its own."""
    if driver is Driver.ASYNCPG:
        idle = not conn.is_in_transaction()
    elif driver in (Driver.PSYCOPG, Driver.PSYCOPG_ASYNC):
        import psycopg

        idle = conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    else:  # SQLAlchemy sessions and connections begin a transaction themselves
        idle = False
    if idle:
        raise ConfigurationError(
            f"the {driver.value} connection has no open transaction: open one first, or the "
            "idempotency record would commit on its own"
        )


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo is UTC else t.astimezone(UTC)


class PostgresIdempotencyStore:
    """The :class:`msdata.idempotency.IdempotencyStore` on PostgreSQL.

    ``conn=None`` calls run on the store's own asyncpg pool (``pool_or_dsn``: a pool, or a
    DSN to make one lazily), each one statement in its own implicit transaction. With a
    caller's connection they run in its open transaction (sync calls: psycopg or SQLAlchemy
    sync; async: asyncpg, psycopg async, SQLAlchemy async). Table:
    ``{schema}.{table_prefix}idempotency``. ``purge`` scans the table (run it now and then;
    there is no index on ``expires_at``, so completing a key is a HOT update).
    """

    features = IdempotencyStoreFeatures(
        joins_transaction=True, sync=True, sync_own_transaction=False
    )

    def __init__(
        self,
        pool_or_dsn: asyncpg.Pool | str,
        *,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        schema: str | None = None,
        max_size: int = 4,
    ) -> None:
        self._prefix = check_table_prefix(table_prefix)
        self._schema = check_schema(schema)
        self._db = PoolOwner(pool_or_dsn, max_size=max_size, kind="idempotency store")
        self._name = f"{self._prefix}idempotency"
        t = self.table = qualified(self._schema, self._name)
        self._lock_class = lock_class(f"{self._schema or ''}.{self._name}")
        self._claim = _Sql(
            f"WITH cur AS (SELECT fingerprint, completed, expires_at, token, response FROM {t} "
            "WHERE scope = {0}::text AND key = {1}::text), "
            f"ins AS (INSERT INTO {t} (scope, key, fingerprint, completed, expires_at, token) "
            "SELECT {0}::text, {1}::text, {2}::text, false, {5}::timestamptz, {3}::text "
            "WHERE NOT EXISTS (SELECT 1 FROM cur) ON CONFLICT (scope, key) DO NOTHING "
            "RETURNING 1), "
            f"upd AS (UPDATE {t} SET fingerprint = {{2}}::text, completed = false, "
            "expires_at = {5}::timestamptz, token = {3}::text, response = NULL "
            "WHERE scope = {0}::text AND key = {1}::text AND expires_at <= {4}::timestamptz "
            "AND EXISTS (SELECT 1 FROM cur WHERE expires_at <= {4}::timestamptz) RETURNING 1) "
            "SELECT true, NULL::text, NULL::boolean, NULL::timestamptz, NULL::text, "
            "NULL::bytea FROM ins "
            "UNION ALL SELECT true, NULL, NULL, NULL, NULL, NULL FROM upd "
            "UNION ALL SELECT false, fingerprint, completed, expires_at, token, response "
            "FROM cur WHERE expires_at > {4}::timestamptz",
            "idempotency claim",
        )
        self._complete = _Sql(
            f"UPDATE {t} SET completed = true, response = {{3}}::bytea, "
            "expires_at = {4}::timestamptz "
            "WHERE scope = {0}::text AND key = {1}::text AND token = {2}::text RETURNING true",
            "idempotency complete",
        )
        self._release = _Sql(
            f"DELETE FROM {t} WHERE scope = {{0}}::text AND key = {{1}}::text "
            "AND token = {2}::text RETURNING true",
            "idempotency release",
        )
        self._get = (
            "SELECT fingerprint, completed, expires_at, token, response FROM "
            f"{t} WHERE scope = $1 AND key = $2"
        )

    @classmethod
    def from_url(
        cls, url: str, *, table_prefix: str = DEFAULT_TABLE_PREFIX, schema: str | None = None
    ) -> PostgresIdempotencyStore:
        """A store over ``postgresql://…`` that connects on first use."""
        return cls(url, table_prefix=table_prefix, schema=schema)

    def schema_sql(self) -> str:
        """The DDL ``create_schema`` runs (idempotent), e.g. for a migration tool."""
        head = f'CREATE SCHEMA IF NOT EXISTS "{self._schema}";\n' if self._schema else ""
        return head + _TABLE.format(table=self.table)

    async def create_schema(self) -> None:
        await self._db.run_ddl("idempotency create_schema", self.schema_sql(), self._lock_class)

    async def drop_schema(self) -> None:
        """Drop the table (for tests and teardown)."""
        sql = f"DROP TABLE IF EXISTS {self.table}"
        await self._db._call("idempotency drop_schema", lambda pool: pool.execute(sql))

    # -- rows to records --------------------------------------------------------------------

    @staticmethod
    def _claimed(row: Any, scope: str, key: str) -> tuple[bool, IdempotencyRecord | None]:
        """(decided, record): not decided when the statement returned no row."""
        if row is None:
            return False, None
        if row[0]:
            return True, None
        return True, IdempotencyRecord(
            scope, key, row[1], row[2], _utc(row[3]), row[4], _bytes(row[5])
        )

    # -- async ------------------------------------------------------------------------------

    async def claim_async(
        self,
        conn: Any,
        scope: str,
        key: str,
        fingerprint: str,
        token: str,
        now: datetime,
        expires_at: datetime,
    ) -> IdempotencyRecord | None:
        args = (scope, key, fingerprint, token, now, expires_at)
        for _ in range(_RETRIES):
            if conn is None:
                pool = await self._db.pool()
                try:
                    row = await pool.fetchrow(self._claim.asyncpg, *args)
                except RELAY_ERRORS as e:
                    store_error("idempotency claim", e)
            else:
                row = await self._claim.run_async(conn, args)
            decided, record = self._claimed(row, scope, key)
            if decided:
                return record
        raise StoreError(f"idempotency claim of {key!r}: the row kept changing")

    async def _own(self, sql: _Sql, args: tuple[Any, ...]) -> Any:
        pool = await self._db.pool()
        try:
            return await pool.fetchrow(sql.asyncpg, *args)
        except RELAY_ERRORS as e:
            store_error(sql.what, e)

    async def complete_async(
        self, conn: Any, scope: str, key: str, token: str, response: bytes, expires_at: datetime
    ) -> bool:
        args = (scope, key, token, response, expires_at)
        if conn is None:
            return await self._own(self._complete, args) is not None
        return await self._complete.run_async(conn, args) is not None

    async def release_async(self, conn: Any, scope: str, key: str, token: str) -> bool:
        args = (scope, key, token)
        if conn is None:
            return await self._own(self._release, args) is not None
        return await self._release.run_async(conn, args) is not None

    # -- sync: the caller's connection only ----------------------------------------------------

    @staticmethod
    def _need(conn: Any) -> None:
        if conn is None:
            raise ConfigurationError(
                "the PostgreSQL store's sync calls run on the caller's connection: pass "
                "conn= (a psycopg or SQLAlchemy connection in its open transaction), or "
                "use the async calls"
            )

    def claim(
        self,
        conn: Any,
        scope: str,
        key: str,
        fingerprint: str,
        token: str,
        now: datetime,
        expires_at: datetime,
    ) -> IdempotencyRecord | None:
        self._need(conn)
        args = (scope, key, fingerprint, token, now, expires_at)
        for _ in range(_RETRIES):
            decided, record = self._claimed(self._claim.run(conn, args), scope, key)
            if decided:
                return record
        raise StoreError(f"idempotency claim of {key!r}: the row kept changing")

    def complete(
        self, conn: Any, scope: str, key: str, token: str, response: bytes, expires_at: datetime
    ) -> bool:
        self._need(conn)
        return self._complete.run(conn, (scope, key, token, response, expires_at)) is not None

    def release(self, conn: Any, scope: str, key: str, token: str) -> bool:
        self._need(conn)
        return self._release.run(conn, (scope, key, token)) is not None

    # -- tools --------------------------------------------------------------------------------

    async def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        row = await self._db._call(
            "idempotency get", lambda pool: pool.fetchrow(self._get, scope, key)
        )
        if row is None:
            return None
        return IdempotencyRecord(scope, key, row[0], row[1], _utc(row[2]), row[3], _bytes(row[4]))

    async def purge(self, now: datetime) -> int:
        sql = f"DELETE FROM {self.table} WHERE expires_at <= $1"
        status = await self._db._call("idempotency purge", lambda pool: pool.execute(sql, now))
        return int(status.rsplit(" ", 1)[-1])

    async def close(self) -> None:
        try:
            await self._db._close_pool()
        except RELAY_ERRORS as e:
            store_error("idempotency close", e)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)
