"""What the PostgreSQL stores share: validated names, the store's own asyncpg pool, running
one statement on a caller's connection of any supported driver, and error translation."""

from __future__ import annotations

import asyncio
import enum
import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from msdata.errors import ConfigurationError, SchemaError, StoreError
from msdata.urls import redact_url

__all__ = [
    "CallerSQL",
    "Driver",
    "PoolOwner",
    "check_schema",
    "driver_of",
    "normalize_url",
    "qualified",
    "store_error",
]

_SCHEMA = re.compile(r"^[a-z_][a-z0-9_]{0,62}\Z")
_UNDEFINED = {"42P01", "42883", "3F000"}  # undefined table, function, schema


def check_schema(schema: str | None) -> str | None:
    """A schema name goes into SQL too: lowercase letters, digits and ``_`` only."""
    if schema is None:
        return None
    if not isinstance(schema, str) or not _SCHEMA.match(schema):
        raise ConfigurationError(
            f"schema {schema!r} must be 1-63 lowercase letters, digits or '_', "
            "not starting with a digit"
        )
    return schema


def qualified(schema: str | None, name: str) -> str:
    """``"schema"."name"`` from validated parts (quoted so reserved words work too)."""
    return f'"{schema}"."{name}"' if schema else f'"{name}"'


def lock_class(name: str) -> int:
    """A stable signed 32-bit id for advisory locks that belong to one table."""
    v = zlib.crc32(name.encode())
    return v - (1 << 32) if v >= 1 << 31 else v


def normalize_url(url: str) -> str:
    """``postgresql://``, ``postgres://`` or ``postgresql+<driver>://`` to what asyncpg reads."""
    parts = urlsplit(url)
    scheme = parts.scheme.partition("+")[0]
    if scheme not in ("postgresql", "postgres"):
        raise ConfigurationError(f"not a postgresql:// URL: {redact_url(url)!r}")
    return urlunsplit(("postgresql", *parts[1:]))


def _sqlstate(e: BaseException) -> str | None:
    for err in (e, getattr(e, "orig", None), e.__cause__):
        state = getattr(err, "sqlstate", None) or getattr(err, "pgcode", None)
        if isinstance(state, str):
            return state
    return None


def store_error(what: str, e: BaseException) -> NoReturn:
    """Raise the msdata error for driver error ``e`` (``from e``)."""
    if _sqlstate(e) in _UNDEFINED:
        raise SchemaError(f"{what}: {e} (has create_schema() been run?)") from e
    raise StoreError(f"{what}: {type(e).__name__}: {e}") from e


#: what the store's own calls translate into StoreError
RELAY_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)


# -- the caller's connection ---------------------------------------------------------------


class Driver(enum.Enum):
    ASYNCPG = "asyncpg"
    PSYCOPG = "psycopg"
    PSYCOPG_ASYNC = "psycopg async"
    SQLALCHEMY = "SQLAlchemy"
    SQLALCHEMY_ASYNC = "SQLAlchemy async"

    @property
    def is_async(self) -> bool:
        return self in (Driver.ASYNCPG, Driver.PSYCOPG_ASYNC, Driver.SQLALCHEMY_ASYNC)


_DRIVERS: dict[type, Driver | None] = {}


def _driver_of_type(tp: type) -> Driver | None:
    if tp in _DRIVERS:
        return _DRIVERS[tp]
    driver = _DRIVERS[tp] = _find_driver(tp)
    return driver


def _find_driver(tp: type) -> Driver | None:
    # only look at a driver's classes when the connection comes from it: the import is
    # then free (already loaded), and drivers the user does not have are never imported
    roots = {c.__module__.partition(".")[0] for c in tp.__mro__}
    if "asyncpg" in roots:
        from asyncpg.pool import PoolConnectionProxy

        if issubclass(tp, (asyncpg.Connection, PoolConnectionProxy)):
            return Driver.ASYNCPG
    if "psycopg" in roots:
        import psycopg

        if issubclass(tp, psycopg.AsyncConnection):
            return Driver.PSYCOPG_ASYNC
        if issubclass(tp, psycopg.Connection):
            return Driver.PSYCOPG
    if "sqlalchemy" in roots:
        from sqlalchemy.engine import Connection
        from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_scoped_session
        from sqlalchemy.orm import Session, scoped_session

        if issubclass(tp, (AsyncSession, AsyncConnection, async_scoped_session)):
            return Driver.SQLALCHEMY_ASYNC
        if issubclass(tp, (Session, Connection, scoped_session)):
            return Driver.SQLALCHEMY
    return None


def driver_of(conn: Any, *, want_async: bool) -> Driver:
    """The driver of a caller's connection, checked against the sync/async call used."""
    driver = _driver_of_type(type(conn))
    if driver is None:
        raise ConfigurationError(
            f"the PostgreSQL stores take a psycopg or asyncpg connection or a SQLAlchemy "
            f"Session/Connection (sync or async), not {type(conn).__module__}."
            f"{type(conn).__qualname__}"
        )
    if driver.is_async != want_async:
        call = "the *_async call (await it)" if driver.is_async else "the sync call"
        raise ConfigurationError(f"a {driver.value} connection needs {call}")
    return driver


def _driver_errors(driver: Driver) -> tuple[type[BaseException], ...]:
    if driver is Driver.ASYNCPG:
        return (asyncpg.PostgresError, asyncpg.InterfaceError)
    if driver in (Driver.PSYCOPG, Driver.PSYCOPG_ASYNC):
        import psycopg

        return (psycopg.Error,)
    import sqlalchemy.exc

    return (sqlalchemy.exc.SQLAlchemyError,)


_PLACEHOLDER = re.compile(r"\{(\d+)\}")


class CallerSQL:
    """One statement with positional placeholders ``{0}``, ``{1}``..., rendered once for
    each driver's parameter style and run on a caller's connection, in its transaction
    (never committing or rolling it back)."""

    __slots__ = ("_asyncpg", "_psycopg", "_sa_sql", "_text", "what")

    def __init__(self, template: str, what: str) -> None:
        self.what = what
        self._asyncpg = _PLACEHOLDER.sub(lambda m: f"${int(m[1]) + 1}", template)
        self._psycopg = _PLACEHOLDER.sub("%s", template)
        self._text: Any = None
        self._sa_sql = _PLACEHOLDER.sub(lambda m: f":p{m[1]}", template)

    def _sa(self) -> Any:
        if self._text is None:
            from sqlalchemy import text

            self._text = text(self._sa_sql)
        return self._text

    @staticmethod
    def _sa_params(args: Sequence[Any]) -> dict[str, Any]:
        return {f"p{i}": a for i, a in enumerate(args)}

    def run(self, conn: Any, args: Sequence[Any], *, fetch: bool = False) -> Any:
        """Run on a sync connection; with ``fetch``, return the first row or None."""
        driver = driver_of(conn, want_async=False)
        try:
            if driver is Driver.PSYCOPG:
                cur = conn.execute(self._psycopg, args)
                return cur.fetchone() if fetch else None
            result = conn.execute(self._sa(), self._sa_params(args))
            return result.first() if fetch else None
        except _driver_errors(driver) as e:
            if _pipelined(driver, conn):
                raise
            store_error(self.what, e)

    async def run_async(self, conn: Any, args: Sequence[Any], *, fetch: bool = False) -> Any:
        """Run on an async connection; with ``fetch``, return the first row or None."""
        driver = driver_of(conn, want_async=True)
        try:
            if driver is Driver.ASYNCPG:
                if fetch:
                    return await conn.fetchrow(self._asyncpg, *args)
                await conn.execute(self._asyncpg, *args)
                return None
            if driver is Driver.PSYCOPG_ASYNC:
                cur = await conn.execute(self._psycopg, args)
                return await cur.fetchone() if fetch else None
            result = await conn.execute(self._sa(), self._sa_params(args))
            return result.first() if fetch else None
        except _driver_errors(driver) as e:
            if _pipelined(driver, conn):
                raise
            store_error(self.what, e)


def _pipelined(driver: Driver, conn: Any) -> bool:
    """Is ``conn`` a psycopg connection in pipeline mode? There our statement is only
    queued: an error raised while queuing it belongs to an earlier statement of the
    caller's (psycopg reports the results that have arrived), and an error of ours comes
    up at the caller's next sync or commit. Such an error is re-raised as it is rather
    than blamed on the outbox."""
    return driver in (Driver.PSYCOPG, Driver.PSYCOPG_ASYNC) and bool(conn.pgconn.pipeline_status)


# -- the store's own connections -----------------------------------------------------------


async def _keep_session(conn: Any) -> None:
    """The store's statements leave no session state behind (settings are transaction-
    local, locks transaction-scoped), so a released connection needs no RESET round trip."""


class PoolOwner:
    """The store's own asyncpg pool: given, or made lazily from a DSN on first use."""

    def __init__(self, pool_or_dsn: Any, *, max_size: int = 4, kind: str = "store") -> None:
        if isinstance(pool_or_dsn, str):
            self._dsn: str | None = normalize_url(pool_or_dsn)
            self._pool: Any = None
            self._owns_pool = True
        elif isinstance(pool_or_dsn, asyncpg.Pool):
            self._dsn = None
            self._pool = pool_or_dsn
            self._owns_pool = False
        else:
            raise ConfigurationError(
                f"the PostgreSQL {kind} takes an asyncpg pool or a postgresql:// DSN, "
                f"not {type(pool_or_dsn)!r}"
            )
        if max_size < 1:
            raise ConfigurationError("max_size must be >= 1")
        self._max_size = max_size
        self._pool_lock = asyncio.Lock()
        self._closed = False

    async def pool(self) -> Any:
        if self._closed:
            raise StoreError("the store is closed")
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    try:
                        self._pool = await asyncpg.create_pool(
                            self._dsn, min_size=1, max_size=self._max_size, reset=_keep_session
                        )
                    except RELAY_ERRORS as e:
                        store_error("cannot connect to PostgreSQL", e)
        return self._pool

    async def _call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """``await fn(pool)`` with driver errors translated."""
        pool = await self.pool()
        try:
            return await fn(pool)
        except RELAY_ERRORS as e:
            store_error(what, e)

    async def run_ddl(self, what: str, ddl: str, lock_class: int) -> None:
        """Run ``ddl`` in one transaction under an advisory lock, so two processes creating
        the same tables at once do not collide."""

        async def run(pool: Any) -> None:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1, 0)", lock_class)
                await conn.execute(ddl)

        await self._call(what, run)

    async def _close_pool(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None and self._owns_pool:
            await pool.close()
