"""The PostgreSQL kernel every PostgreSQL store is built on.

A port module (outbox, inbox, saga state, idempotency records, event store, checkpoints)
is a class that owns a :class:`PostgresDatabase` and holds its SQL::

    class PostgresThingStore:
        def __init__(self, pool_or_dsn, *, table_prefix=DEFAULT_TABLE_PREFIX, schema=None):
            self._db = PostgresDatabase(pool_or_dsn, schema=schema, kind="thing store")
            self.table_prefix = check_table_prefix(table_prefix)
            self.table = self._db.qualified(f"{self.table_prefix}thing")
            self._put = CallerSQL(f"INSERT INTO {self.table} (k) VALUES ({{0}})", "thing put")

        def schema_sql(self) -> str:
            return self._db.schema_head() + _DDL.format(table=self.table)

        async def create_schema(self) -> None:
            lock = self._db.lock_class(self.table)
            await self._db.run_ddl("thing create_schema", self.schema_sql(), lock)

        def put(self, conn, key):                  # the caller's transaction, any driver
            self._put.run(conn, (key,))

        async def put_async(self, conn, key):
            await self._put.run_async(conn, (key,))

        async def expire(self, before) -> int:     # the store's own pool, one transaction
            sql = f"DELETE FROM {self.table} WHERE at < $1"
            tag = await self._db.call("thing expire", lambda pool: pool.execute(sql, before))
            return command_count(tag)

        async def close(self) -> None:
            await self._db.close()

What the kernel gives:

- Names: :func:`check_schema` (a schema name goes into SQL: lowercase letters, digits and
  ``_`` only), :func:`qualified` / :meth:`PostgresDatabase.qualified` (``"schema"."name"``),
  :func:`lock_class` (a stable advisory-lock class per table), :func:`normalize_url`.
- :class:`PostgresDatabase`: the store's own asyncpg pool (given, and then never closed
  here, or made lazily from a DSN on first use); :meth:`~PostgresDatabase.call` runs one
  coroutine on it with errors mapped; :meth:`~PostgresDatabase.run_ddl` runs DDL in one
  transaction under an advisory lock (two processes creating the same tables at once do
  not collide); :meth:`~PostgresDatabase.dedicated` / :meth:`~PostgresDatabase.give_back`
  hold one connection apart (LISTEN); :meth:`~PostgresDatabase.close`.
- :class:`CallerSQL`: one statement rendered once per driver's parameter style and run on
  the caller's connection, in its open transaction, for every driver form: psycopg sync and
  async, asyncpg (a connection or a pool's proxy), SQLAlchemy ``Session``/``Connection`` and
  their async forms. :func:`driver_of` tells them apart and refuses a sync connection in an
  async call and the other way round; an asyncpg connection outside a transaction, or a
  psycopg one in autocommit mode outside ``conn.transaction()``, is refused
  (ConfigurationError): the write would commit on its own. (SQLAlchemy sessions and
  connections begin their transaction themselves.)
- :class:`map_errors`: the one place driver errors become msdata errors (``raise … from
  e``): an undefined table, function or schema is :class:`SchemaError`, anything else
  :class:`StoreError`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import zlib
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from msdata.errors import ConfigurationError, SchemaError, StoreError

__all__ = [
    "RELAY_ERRORS",
    "CallerSQL",
    "Driver",
    "Listener",
    "PostgresDatabase",
    "check_in_transaction",
    "check_schema",
    "command_count",
    "driver_of",
    "lock_class",
    "map_errors",
    "normalize_url",
    "qualified",
    "require_transaction_async",
    "store_error",
]

_SCHEMA = re.compile(r"^[a-z_][a-z0-9_]{0,62}\Z")
_UNDEFINED = {"42P01", "42883", "3F000"}  # undefined table, function, schema
_UNKNOWN_ARGS = re.compile(r"\((?:unknown(?:, )?)*\)")  # "f(unknown, unknown)": untyped params


def check_schema(schema: str | None) -> str | None:
    """A schema name goes into SQL too: lowercase ASCII letters, digits and ``_`` only."""
    if schema is None:
        return None
    if not isinstance(schema, str) or not _SCHEMA.match(schema):
        raise ConfigurationError(
            f"schema {schema!r} must be 1-63 lowercase ASCII letters, digits or '_', "
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
        # the URL may carry a password: name the scheme only
        raise ConfigurationError(f"not a postgresql:// URL (scheme {parts.scheme!r})")
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
        # the server's first line names the table, function or schema; its HINT (about
        # explicit type casts, for a function) would mislead here
        first = _UNKNOWN_ARGS.sub("", str(e).partition("\n")[0])
        raise SchemaError(
            f"{what}: {first}: the store's schema is missing; run create_schema() "
            "(or apply schema_sql()) first"
        ) from e
    raise StoreError(f"{what}: {type(e).__name__}: {e}") from e


def command_count(status: str) -> int:
    """The row count from a command tag such as ``UPDATE 3``."""
    return int(status.rsplit(" ", 1)[-1])


#: what the store's own calls translate into StoreError
RELAY_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)


class map_errors:
    """Context manager: a driver error (one of ``errors``; by default those of the store's
    own asyncpg calls) raised inside becomes :class:`SchemaError` or :class:`StoreError`
    (see :func:`store_error`), raised ``from`` it; anything else passes through.

    ``pipelined``: the caller's psycopg connection, when the statement ran on one. In
    pipeline mode our statement is only queued: an error raised while queuing it belongs
    to an earlier statement of the caller's (psycopg reports the results that have
    arrived), and an error of ours comes up at the caller's next sync or commit. Such an
    error is re-raised as it is rather than blamed on the store."""

    __slots__ = ("errors", "pipelined", "what")

    def __init__(
        self,
        what: str,
        errors: tuple[type[BaseException], ...] = RELAY_ERRORS,
        *,
        pipelined: Any = None,
    ) -> None:
        self.what = what
        self.errors = errors
        self.pipelined = pipelined

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or not isinstance(exc, self.errors):
            return
        if self.pipelined is not None and self.pipelined.pgconn.pipeline_status:
            return
        store_error(self.what, exc)


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
        article = "an" if driver.value[:1] in "aeiou" else "a"
        raise ConfigurationError(f"{article} {driver.value} connection needs {call}")
    return driver


def check_in_transaction(conn: Any, driver: Driver, what: str = "write") -> None:
    """Refuse (ConfigurationError) a caller's connection on which a write would commit on
    its own (the storage contract, :mod:`msdata.storage`): asyncpg with no open
    transaction, psycopg in autocommit mode with none, SQLAlchemy ``Session`` /
    ``Connection`` / ``AsyncConnection`` on an ``AUTOCOMMIT`` engine with none open at the
    driver. A psycopg connection outside autocommit (and SQLAlchemy on one) opens its
    transaction at the first statement, so it passes. An ``AsyncSession`` is checked by
    :func:`require_transaction_async` (finding its connection needs an await)."""
    if driver is Driver.ASYNCPG:
        # asyncpg autocommits every statement outside ``conn.transaction()``
        if not conn.is_in_transaction():
            raise ConfigurationError(_NO_TRANSACTION.format(what=what, driver=driver.value))
        return
    if driver in (Driver.PSYCOPG, Driver.PSYCOPG_ASYNC):
        if not _open_transaction(conn, conn):
            raise ConfigurationError(_NO_TRANSACTION.format(what=what, driver=driver.value))
        return
    from sqlalchemy.ext.asyncio import AsyncConnection
    from sqlalchemy.orm import Session, scoped_session

    if isinstance(conn, (Session, scoped_session)):
        conn = conn.connection()  # joins (or begins) the session's transaction
    elif isinstance(conn, AsyncConnection):
        conn = conn.sync_connection
    elif driver is Driver.SQLALCHEMY_ASYNC:
        return  # an AsyncSession: see require_transaction_async
    _sa_refuses(what, driver, conn)


def _driver_errors(driver: Driver) -> tuple[type[BaseException], ...]:
    if driver is Driver.ASYNCPG:
        return (asyncpg.PostgresError, asyncpg.InterfaceError)
    if driver in (Driver.PSYCOPG, Driver.PSYCOPG_ASYNC):
        import psycopg

        return (psycopg.Error,)
    import sqlalchemy.exc

    return (sqlalchemy.exc.SQLAlchemyError,)


def _open_transaction(dbapi: Any, driver_conn: Any) -> bool:
    """Whether a write on this driver connection would run in a transaction the caller
    ends: one is open, or the connection is not in autocommit mode (psycopg, and SQLAlchemy
    over asyncpg, then open one before the first statement)."""
    if not getattr(dbapi, "autocommit", False):
        return True
    in_transaction = getattr(driver_conn, "is_in_transaction", None)
    if in_transaction is not None:  # asyncpg under SQLAlchemy
        return bool(in_transaction())
    info = getattr(driver_conn, "info", None)
    pgconn = getattr(driver_conn, "pgconn", None)
    if info is None:
        return True  # a driver we cannot ask: let it be
    if pgconn is not None and pgconn.pipeline_status:
        return True  # a queued BEGIN is not visible yet in pipeline mode
    import psycopg.pq

    return bool(info.transaction_status != psycopg.pq.TransactionStatus.IDLE)


_NO_TRANSACTION = (
    "{what}: the {driver} connection has no open transaction, so the write would commit on "
    "its own and break the caller's-transaction guarantee. Open one first: asyncpg "
    "'async with conn.transaction():', psycopg 'with conn.transaction():' (or autocommit "
    "off), SQLAlchemy a session or connection not in AUTOCOMMIT isolation"
)


def _sa_refuses(what: str, driver: Driver, sync_conn: Any) -> None:
    raw = sync_conn.connection  # the pool's proxied DBAPI connection
    if not _open_transaction(raw.dbapi_connection, raw.driver_connection):
        raise ConfigurationError(_NO_TRANSACTION.format(what=what, driver=driver.value))


async def require_transaction_async(what: str, driver: Driver, conn: Any) -> None:
    """:func:`check_in_transaction` for the caller's async ``conn``, an ``AsyncSession``
    included."""
    if driver is Driver.SQLALCHEMY_ASYNC:
        from sqlalchemy.ext.asyncio import AsyncConnection

        if not isinstance(conn, AsyncConnection):
            conn = await conn.connection()  # an AsyncSession joins (or begins) its transaction
    check_in_transaction(conn, driver, what)


_PLACEHOLDER = re.compile(r"\{(\d+)\}")


class CallerSQL:
    """One statement with placeholders ``{0}``, ``{1}``... (each may appear more than
    once), rendered once for each driver's parameter style and run on a caller's
    connection, in its transaction (never committing or rolling it back)."""

    __slots__ = (
        "_asyncpg",
        "_named",
        "_psycopg",
        "_sa_sql",
        "_text",
        "in_transaction",
        "what",
    )

    def __init__(self, template: str, what: str, *, in_transaction: bool = False) -> None:
        self.what = what
        #: refuse a connection with no open transaction (see :func:`check_in_transaction`)
        self.in_transaction = in_transaction
        self._asyncpg = _PLACEHOLDER.sub(lambda m: f"${int(m[1]) + 1}", template)
        # positional when each placeholder appears once, in order; named otherwise
        order = [int(i) for i in _PLACEHOLDER.findall(template)]
        self._named = order != list(range(len(order)))
        if self._named:
            self._psycopg = _PLACEHOLDER.sub(lambda m: f"%(p{m[1]})s", template)
        else:
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

    def _psycopg_args(self, args: Sequence[Any]) -> Any:
        return self._sa_params(args) if self._named else args

    def run(self, conn: Any, args: Sequence[Any], *, fetch: bool = False) -> Any:
        """Run on a sync connection; with ``fetch``, return the first row or None."""
        driver = driver_of(conn, want_async=False)
        if self.in_transaction:
            check_in_transaction(conn, driver, self.what)
        if driver is Driver.PSYCOPG:
            check_in_transaction(conn, driver)
            with map_errors(self.what, _driver_errors(driver), pipelined=conn):
                cur = conn.execute(self._psycopg, self._psycopg_args(args))
                return cur.fetchone() if fetch else None
        with map_errors(self.what, _driver_errors(driver)):
            result = conn.execute(self._sa(), self._sa_params(args))
            return result.first() if fetch else None

    async def run_async(self, conn: Any, args: Sequence[Any], *, fetch: bool = False) -> Any:
        """Run on an async connection; with ``fetch``, return the first row or None."""
        driver = driver_of(conn, want_async=True)
        if self.in_transaction:
            await require_transaction_async(self.what, driver, conn)
        if driver is Driver.ASYNCPG:
            check_in_transaction(conn, driver)
            with map_errors(self.what, _driver_errors(driver)):
                if fetch:
                    return await conn.fetchrow(self._asyncpg, *args)
                await conn.execute(self._asyncpg, *args)
                return None
        if driver is Driver.PSYCOPG_ASYNC:
            check_in_transaction(conn, driver)
            with map_errors(self.what, _driver_errors(driver), pipelined=conn):
                cur = await conn.execute(self._psycopg, self._psycopg_args(args))
                return await cur.fetchone() if fetch else None
        with map_errors(self.what, _driver_errors(driver)):
            result = await conn.execute(self._sa(), self._sa_params(args))
            return result.first() if fetch else None


# -- the store's own connections -----------------------------------------------------------


async def _keep_session(conn: Any) -> None:
    """The store's statements leave no session state behind (settings are transaction-
    local, locks transaction-scoped), so a released connection needs no RESET round trip."""


class PostgresDatabase:
    """The store's own asyncpg pool (``pool_or_dsn``: an ``asyncpg.Pool``, the caller's,
    never closed here; or a DSN, from which a pool of at most ``max_size`` connections is
    made on first use and closed by :meth:`close`) and its validated ``schema``."""

    def __init__(
        self,
        pool_or_dsn: Any,
        *,
        schema: str | None = None,
        max_size: int = 4,
        kind: str = "store",
    ) -> None:
        self.schema = check_schema(schema)
        if isinstance(pool_or_dsn, str):
            self.dsn: str | None = normalize_url(pool_or_dsn)
            self._pool: Any = None
            self._owns_pool = True
        elif isinstance(pool_or_dsn, asyncpg.Pool):
            self.dsn = None
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

    def qualified(self, name: str) -> str:
        """``"schema"."name"`` (or ``"name"``) for a table or function of this store."""
        return qualified(self.schema, name)

    def lock_class(self, name: str) -> int:
        """The advisory-lock class of one table of this store (see :func:`lock_class`)."""
        return lock_class(f"{self.schema or ''}.{name}")

    def schema_head(self) -> str:
        """``CREATE SCHEMA IF NOT EXISTS`` for the store's schema, or nothing."""
        return f'CREATE SCHEMA IF NOT EXISTS "{self.schema}";\n' if self.schema else ""

    async def pool(self) -> Any:
        """The pool (made on first use from a DSN). StoreError once closed."""
        if self._closed:
            raise StoreError("the store is closed")
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    with map_errors("cannot connect to PostgreSQL"):
                        self._pool = await asyncpg.create_pool(
                            self.dsn, min_size=1, max_size=self._max_size, reset=_keep_session
                        )
        return self._pool

    async def call(self, what: str, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        """``await fn(pool)`` with driver errors mapped (see :class:`map_errors`)."""
        pool = await self.pool()
        with map_errors(what):
            return await fn(pool)

    async def run_ddl(self, what: str, ddl: str, lock_class: int) -> None:
        """Run ``ddl`` in one transaction under an advisory lock, so two processes creating
        the same tables at once do not collide."""

        async def run(pool: Any) -> None:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1, 0)", lock_class)
                await conn.execute(ddl)

        await self.call(what, run)

    async def dedicated(self) -> Any:
        """A connection held apart from the pool's work (e.g. to LISTEN): a new one from
        the DSN, or one taken from the given pool. Give it back with :meth:`give_back`.
        Raises the driver's error (the caller decides what a failure means)."""
        if self.dsn is not None:
            return await asyncpg.connect(self.dsn)
        return await (await self.pool()).acquire()

    async def give_back(self, conn: Any) -> None:
        """Close (or return to the given pool) a connection from :meth:`dedicated`."""
        if self.dsn is not None:
            await conn.close()
        elif self._pool is not None:
            await self._pool.release(conn)

    async def close(self, what: str = "close") -> None:
        """Close the pool this object made (a given pool stays open); idempotent."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None and self._owns_pool:
            with map_errors(what):
                await pool.close()


class Listener:
    """``LISTEN`` on the channel of a store's table ``name`` (``"{schema}.{name}"``, cut to
    the 63 bytes PostgreSQL keeps of an identifier) over a connection of ``db`` held apart
    from its pool, opened on the first :meth:`listening` and again after it is lost.

    :attr:`wake` is set by every NOTIFY and when the connection is lost (a NOTIFY may have
    gone unheard meanwhile); with ``wake_on_listen`` also when LISTEN takes effect (what
    committed before it was not heard). ``what`` and ``log`` name the store in the log
    lines of a LISTEN that fails (the store then polls) and of an error on :meth:`stop`."""

    def __init__(
        self,
        db: PostgresDatabase,
        name: str,
        *,
        what: str,
        log: logging.Logger,
        wake_on_listen: bool = False,
    ) -> None:
        self._db = db
        self.channel = (f"{db.schema}.{name}" if db.schema else name)[:63]
        self._what = what
        self._log = log
        self._wake_on_listen = wake_on_listen
        self.wake = asyncio.Event()
        self._conn: Any = None
        self._lock = asyncio.Lock()

    def _on_notify(self, *_: Any) -> None:
        self.wake.set()

    def _on_lost(self, *_: Any) -> None:
        self._conn = None
        self.wake.set()

    async def listening(self) -> bool:
        """True once LISTEN is in effect; False (logged) where it cannot be, when the
        caller polls instead."""
        conn = self._conn
        if conn is not None and not conn.is_closed():
            return True
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                return True
            try:
                conn = await self._db.dedicated()
                await conn.add_listener(self.channel, self._on_notify)
                conn.add_termination_listener(self._on_lost)
            except RELAY_ERRORS as e:
                self._log.warning(
                    "%s: cannot LISTEN on %s, polling instead: %s", self._what, self.channel, e
                )
                return False
            self._conn = conn
            if self._wake_on_listen:
                self.wake.set()
            return True

    async def stop(self) -> None:
        """UNLISTEN and give the connection back; errors are logged at debug level."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.remove_termination_listener(self._on_lost)
            if not conn.is_closed():
                await conn.remove_listener(self.channel, self._on_notify)
            await self._db.give_back(conn)
        except RELAY_ERRORS as e:
            self._log.debug("%s: error while closing the listening connection: %s", self._what, e)
