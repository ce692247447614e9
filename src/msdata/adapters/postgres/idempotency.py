"""The idempotency store on PostgreSQL.

The claim is ONE statement: a read of the key that calls the writing function only when
there is no live row::

    SELECT r.fingerprint, r.completed, r.response, r.token
    FROM (SELECT) AS one LEFT JOIN {table} AS r
        ON r.scope = $1 AND r.key = $2 AND r.expires_at > $now
    WHERE CASE WHEN r.key IS NOT NULL THEN true ELSE {table}_claim(...) END

A live key (a replay, or IN_PROGRESS) is answered by that read alone: the statement has no
write node, so nothing is written, locked or even prepared for writing (it runs in a READ
ONLY transaction, e.g. on a standby). A replay costs the server 72k instructions against
48k for one primary-key SELECT (callgrind; 134k with the data-modifying CTEs this replaced,
whose INSERT … ON CONFLICT node was set up on every call: bench/README.md). ``CASE`` only
evaluates the branch it takes (PostgreSQL documents it, "4.2.14. Expression Evaluation
Rules"), so the function runs only for a new or expired key: a PL/pgSQL function (its plan
is cached per session) that inserts the key, or takes an expired one over through ``ON
CONFLICT DO UPDATE … WHERE expires_at <= now``, which re-checks the expiry on the row's
newest version under its lock. When a concurrent claim commits between the statement's
snapshot and the function's write, the function writes nothing and the statement returns
no row; it runs again (at most a few times) and sees that claim. First execution: this
statement and the completing UPDATE, two round trips.

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

from msdata.adapters.postgres._db import (
    RELAY_ERRORS,
    CallerSQL,
    PostgresDatabase,
    command_count,
    map_errors,
    store_error,
)
from msdata.errors import ConfigurationError, StoreError
from msdata.idempotency.store import (
    IdempotencyRecord,
    IdempotencyStoreFeatures,
    LiveRecord,
    TokenFactory,
    check_purge_time,
)
from msdata.storage import DEFAULT_TABLE_PREFIX, check_store_options, check_table_prefix

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

# Unix microseconds (the port's times, exact) as a timestamptz: ``epoch`` plus that many
# microseconds (an interval product, exact below 2^53 us, the year 2255)
_TS = "(CAST('epoch' AS timestamptz) + CAST({} AS bigint) * CAST('1 microsecond' AS interval))"

# The claim's write, run only for a key with no live row: insert it, or take an expired
# one over (the conflict arm re-checks the expiry on the row's newest version, under its
# lock). True when it wrote; false when a live claim committed meanwhile (nothing written).
_FUNCTION = """\
CREATE OR REPLACE FUNCTION {fn}(
    p_scope text, p_key text, p_fingerprint text, p_token text, p_now bigint, p_until bigint)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $msdata$
BEGIN
    INSERT INTO {table} AS t (scope, key, fingerprint, completed, expires_at, token)
    VALUES (p_scope, p_key, p_fingerprint, false, UNTIL, p_token)
    ON CONFLICT (scope, key) DO UPDATE SET fingerprint = excluded.fingerprint,
        completed = false, expires_at = excluded.expires_at, token = excluded.token,
        response = NULL
    WHERE t.expires_at <= NOW;
    RETURN FOUND;
END
$msdata$;
""".replace("NOW", _TS.format("p_now")).replace("UNTIL", _TS.format("p_until"))
_FUNCTION_ARGS = "(text, text, text, text, bigint, bigint)"

# {0} scope, {1} key, {2} fingerprint, {3} token, {4} now (us), {5} lease end (us).
# CAST(… AS …) rather than ::, which SQLAlchemy's text() would read as a parameter name.
# One row: the live record, or NULLs when the function wrote the claim (a fingerprint is
# never NULL); no row when the function found a live claim that committed after this
# statement's snapshot.
_CLAIM_SQL = """\
SELECT r.fingerprint, r.completed, r.response, r.token
FROM (SELECT) AS one LEFT JOIN TABLE AS r
    ON r.scope = CAST({0} AS text) AND r.key = CAST({1} AS text) AND r.expires_at > NOW
WHERE CASE WHEN r.key IS NOT NULL THEN true
    ELSE FUNCTION(CAST({0} AS text), CAST({1} AS text), CAST({2} AS text),
                  CAST({3} AS text), CAST({4} AS bigint), CAST({5} AS bigint)) END
""".replace("NOW", _TS.format("{4}"))
# {0} scope, {1} key, {2} token, {3} response, {4} retention end (us)
_COMPLETE_SQL = """\
UPDATE TABLE SET completed = true, response = CAST({3} AS bytea), expires_at = UNTIL
WHERE scope = CAST({0} AS text) AND key = CAST({1} AS text) AND token = CAST({2} AS text)
RETURNING true
""".replace("UNTIL", _TS.format("{4}"))
_RELEASE_SQL = """\
DELETE FROM TABLE
WHERE scope = CAST({0} AS text) AND key = CAST({1} AS text) AND token = CAST({2} AS text)
RETURNING true
"""

_PARAM = re.compile(r"\{(\d+)\}")
_RETRIES = 5


class _Sql:
    """One statement for both places it runs: the caller's connection (any driver, in its
    open transaction) and the store's own asyncpg pool."""

    __slots__ = ("asyncpg", "caller", "errors", "what")

    def __init__(self, template: str, what: str) -> None:
        self.what = what
        self.errors = map_errors(what)  # stateless: one for every call
        self.caller = CallerSQL(template, what, in_transaction=True)
        self.asyncpg = _PARAM.sub(lambda m: f"${int(m[1]) + 1}", template)


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo is UTC else t.astimezone(UTC)


class PostgresIdempotencyStore:
    """The :class:`msdata.idempotency.IdempotencyStore` on PostgreSQL.

    ``conn=None`` calls run on the store's own asyncpg pool (``pool_or_dsn``: a pool, or a
    DSN to make one lazily), each one statement in its own implicit transaction. With a
    caller's connection they run in its open transaction (sync calls: psycopg or SQLAlchemy
    sync; async: asyncpg, psycopg async, SQLAlchemy async). Table:
    ``{schema}.{table_prefix}idempotency``, and the claim's PL/pgSQL function
    ``{schema}.{table_prefix}idempotency_claim`` (both made by ``create_schema``, in
    ``schema_sql()``; a replay needs SELECT on the table and EXECUTE on the function, a
    claim INSERT and UPDATE too). ``purge`` scans the table (run it now and then;
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
        self._db = PostgresDatabase(
            pool_or_dsn, schema=schema, max_size=max_size, kind="idempotency store"
        )
        self._hot: Any = None  # see _own: the pool's proxy, kept to give it back
        self._hot_con: Any = None  # the connection itself (see _unwrap)
        self._hot_busy = False
        self._name = f"{self._prefix}idempotency"
        t = self.table = self._db.qualified(self._name)
        self._lock_class = self._db.lock_class(self._name)
        self._fn = self._db.qualified(f"{self._name}_claim")
        claim = _CLAIM_SQL.replace("TABLE", t).replace("FUNCTION", self._fn)
        self._claim = _Sql(claim, "idempotency claim")
        self._complete = _Sql(_COMPLETE_SQL.replace("TABLE", t), "idempotency complete")
        self._release = _Sql(_RELEASE_SQL.replace("TABLE", t), "idempotency release")
        self._get = (
            "SELECT fingerprint, completed, expires_at, token, response FROM "
            f"{t} WHERE scope = $1 AND key = $2"
        )

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresIdempotencyStore:
        """A store over ``postgresql://…`` that connects on first use; ``options`` go to
        the constructor."""
        check_store_options(cls, options, f"{cls.__name__} (postgresql://)")
        return cls(url, **options)

    def schema_sql(self) -> str:
        """The DDL ``create_schema`` runs (idempotent), e.g. for a migration tool."""
        return (
            self._db.schema_head()
            + _TABLE.format(table=self.table)
            + _FUNCTION.format(fn=self._fn, table=self.table)
        )

    async def create_schema(self) -> None:
        await self._db.run_ddl("idempotency create_schema", self.schema_sql(), self._lock_class)

    async def drop_schema(self) -> None:
        """Drop the table and the claim function (for tests and teardown)."""
        sql = (
            f"DROP FUNCTION IF EXISTS {self._fn}{_FUNCTION_ARGS}; DROP TABLE IF EXISTS {self.table}"
        )
        await self._db.call("idempotency drop_schema", lambda pool: pool.execute(sql))

    # -- async ------------------------------------------------------------------------------

    async def claim_async(
        self,
        conn: Any,
        scope: str,
        key: str,
        fingerprint: str,
        now_us: int,
        until_us: int,
        new_token: TokenFactory,
    ) -> str | LiveRecord:
        # one statement reads and may write, so it needs the token beforehand
        token = new_token()
        args = (scope, key, fingerprint, token, now_us, until_us)
        for _ in range(_RETRIES):
            if conn is not None:
                row = await self._claim.caller.run_async(conn, args, fetch=True)
            elif (hot := self._hot_con) is None or self._hot_busy:
                row = await self._own(self._claim, args)
            else:
                # _own's common case in line (a replay's path: no coroutine, no context
                # manager of its own)
                self._hot_busy = True
                try:
                    row = await hot.fetchrow(self._claim.asyncpg, *args)
                except BaseException as e:
                    await self._drop_hot()  # failed or cancelled: the pool cleans it up
                    if isinstance(e, RELAY_ERRORS):
                        store_error(self._claim.what, e)
                    raise
                finally:
                    self._hot_busy = False
            if row is not None:
                if row[0] is None:  # no live row was read: the function wrote the claim
                    return token
                response = row[2]  # bytes from asyncpg; other drivers may differ
                if response is not None and type(response) is not bytes:
                    response = bytes(response)
                return (row[0], row[1], response, row[3])
        raise StoreError(f"idempotency claim of {key!r}: the row kept changing")

    async def _own(self, sql: _Sql, args: tuple[Any, ...]) -> Any:
        """One statement on the store's own connections. While no other call is running,
        it runs on one connection the store keeps out of the pool: a call then skips the
        pool's acquire and release (tens of microseconds, a fifth of a loopback round
        trip: a replay would otherwise cost 1.4x a raw GET). Overlapping calls use the pool."""
        if self._hot_busy:
            pool = await self._db.pool()
            with sql.errors:
                return await pool.fetchrow(sql.asyncpg, *args)
        self._hot_busy = True
        try:
            conn = self._hot_con
            if conn is None:
                pool = await self._db.pool()
                with sql.errors:
                    self._hot = await pool.acquire()
                conn = self._hot_con = _unwrap(self._hot)
            ok = False
            try:
                with sql.errors:
                    row = await conn.fetchrow(sql.asyncpg, *args)
                ok = True
                return row
            finally:
                if not ok:  # failed or cancelled mid-statement: the pool cleans it up
                    await self._drop_hot()
        finally:
            self._hot_busy = False

    async def _drop_hot(self) -> None:
        conn, self._hot, self._hot_con = self._hot, None, None
        if conn is None:
            return
        try:
            pool = await self._db.pool()
            await pool.release(conn)
        except BaseException:
            conn.terminate()
            raise

    async def complete_async(
        self, conn: Any, scope: str, key: str, token: str, response: bytes, until_us: int
    ) -> bool:
        args = (scope, key, token, response, until_us)
        if conn is None:
            return await self._own(self._complete, args) is not None
        return await self._complete.caller.run_async(conn, args, fetch=True) is not None

    async def release_async(self, conn: Any, scope: str, key: str, token: str) -> bool:
        args = (scope, key, token)
        if conn is None:
            return await self._own(self._release, args) is not None
        return await self._release.caller.run_async(conn, args, fetch=True) is not None

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
        now_us: int,
        until_us: int,
        new_token: TokenFactory,
    ) -> str | LiveRecord:
        self._need(conn)
        token = new_token()
        args = (scope, key, fingerprint, token, now_us, until_us)
        for _ in range(_RETRIES):
            row = self._claim.caller.run(conn, args, fetch=True)
            if row is not None:
                return token if row[0] is None else (row[0], row[1], _bytes(row[2]), row[3])
        raise StoreError(f"idempotency claim of {key!r}: the row kept changing")

    def complete(
        self, conn: Any, scope: str, key: str, token: str, response: bytes, until_us: int
    ) -> bool:
        self._need(conn)
        args = (scope, key, token, response, until_us)
        return self._complete.caller.run(conn, args, fetch=True) is not None

    def release(self, conn: Any, scope: str, key: str, token: str) -> bool:
        self._need(conn)
        return self._release.caller.run(conn, (scope, key, token), fetch=True) is not None

    # -- tools --------------------------------------------------------------------------------

    async def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        row = await self._db.call(
            "idempotency get", lambda pool: pool.fetchrow(self._get, scope, key)
        )
        if row is None:
            return None
        return IdempotencyRecord(scope, key, row[0], row[1], _utc(row[2]), row[3], _bytes(row[4]))

    async def purge(self, now: datetime) -> int:
        check_purge_time(now)
        sql = f"DELETE FROM {self.table} WHERE expires_at <= $1"
        status = await self._db.call("idempotency purge", lambda pool: pool.execute(sql, now))
        return command_count(status)

    async def close(self) -> None:
        if self._hot is not None and not self._hot_busy:
            with map_errors("idempotency close"):
                await self._drop_hot()
        await self._db.close("idempotency close")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _unwrap(proxy: Any) -> Any:
    """The connection inside a pool's connection proxy, for the store's own connection
    (which it holds from acquire to release): asyncpg's proxy runs every method through a
    Python wrapper (about 3k instructions of the client's 132k per replay, callgrind). The
    proxy itself if an asyncpg release keeps the connection under another name."""
    con = getattr(proxy, "_con", None)
    return con if isinstance(con, asyncpg.Connection) else proxy


def _bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)
