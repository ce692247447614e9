"""The SQLite kernel every SQLite store is built on (stdlib ``sqlite3``, WAL).

A port module (outbox, inbox, saga state, idempotency records, event store, checkpoints)
is a subclass of :class:`SqliteDatabase` with its DDL and its SQL, and nothing else::

    class SqliteThingStore(SqliteDatabase):
        def schema_sql(self) -> str:
            return _DDL.format(p=self.table_prefix)

        async def create_schema(self) -> None:
            await self.run_script(self.schema_sql())

        # write side: in the caller's open transaction, never committing
        def put(self, conn: Connection, key: str) -> None:
            raw = caller_connection(conn)          # sqlite3 / SQLAlchemy, transaction checked
            with map_errors("thing put"):
                raw.execute(f"INSERT INTO {self.table_prefix}thing ...", (key, ...))

        # the store's own work: one short transaction on the store's own connection
        async def expire(self, before: float) -> int:
            sql = f"DELETE FROM {self.table_prefix}thing WHERE at < ?"
            return await self.run(lambda c: self.write(c, lambda c: c.execute(sql, ...).rowcount))

What the kernel gives:

- :func:`connect` and :func:`path_from_url`: a sqlite3 connection set up as the stores
  expect (WAL, a ``synchronous`` level, a busy timeout); ``sqlite:///relative.db`` and
  ``sqlite:////absolute.db`` to a path.
- :class:`SqliteDatabase`: a database file, a validated table prefix and the store's own
  connection. :meth:`~SqliteDatabase.run` runs ``fn(connection)`` one call at a time, in
  call order: in the store's own thread (one executor hop for a whole transaction, never
  one hop per statement as aiosqlite does), or, for the short calls a relay makes, right on
  the event loop's thread when that cannot wait (see ``inline``).
  :meth:`~SqliteDatabase.write` wraps ``fn`` in ``BEGIN IMMEDIATE`` … ``COMMIT``;
  :meth:`~SqliteDatabase.run_script` runs idempotent DDL; :meth:`~SqliteDatabase.close`
  closes the connection and the thread. An inline store checkpoints the WAL in its thread
  every :data:`CHECKPOINT_EVERY` write transactions (a store whose writes are a page or two
  sets ``checkpoint_every`` higher), never on the loop.
- :func:`caller_connection`: the write side's connection: a ``sqlite3.Connection`` or a
  SQLAlchemy ``Session``/``Connection`` on a SQLite engine, unwrapped to sqlite3; a
  connection in autocommit mode with no open transaction is refused with
  :class:`ConfigurationError` (the write would commit on its own).
- :class:`map_errors`: the one place sqlite3 errors become msdata errors (``raise … from
  e``): a missing table or column is :class:`SchemaError`, a busy database
  :class:`DatabaseBusy` (a :class:`StoreError`), anything else :class:`StoreError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar

from msdata.clock import SYSTEM_CLOCK, Clock
from msdata.errors import ConfigurationError, SchemaError, StoreError
from msdata.storage import DEFAULT_TABLE_PREFIX, Connection, check_store_options, check_table_prefix
from msdata.urls import redact_url

__all__ = [
    "CHECKPOINT_EVERY",
    "SYNCHRONOUS_LEVELS",
    "DatabaseBusy",
    "SqliteDatabase",
    "Waiting",
    "WatchedDatabase",
    "caller_connection",
    "connect",
    "map_errors",
    "path_from_url",
]

T = TypeVar("T")

#: the ``PRAGMA synchronous`` levels a store accepts
SYNCHRONOUS_LEVELS = ("OFF", "NORMAL", "FULL", "EXTRA")
#: write transactions between two checkpoints of an inline store's connection (a relay's
#: batch of 100 writes ~10 pages: about SQLite's default of 1000 pages)
CHECKPOINT_EVERY = 64
log = logging.getLogger("msdata.storage")


def _check_synchronous(synchronous: str) -> str:
    sync = synchronous.upper() if isinstance(synchronous, str) else ""
    if sync not in SYNCHRONOUS_LEVELS:
        raise ConfigurationError(
            f"synchronous must be one of {SYNCHRONOUS_LEVELS}: {synchronous!r}"
        )
    return sync


def path_from_url(url: str) -> str:
    """The file path of ``sqlite:///relative.db`` or ``sqlite:////absolute.db`` (a query
    string is ignored). ConfigurationError for another URL or an in-memory database (a
    store opens its own connection, which would see another, empty database)."""
    if not url.startswith("sqlite:///"):
        raise ConfigurationError(
            f"not a SQLite file URL: {redact_url(url)!r} "
            "(use sqlite:///relative.db or sqlite:////abs.db)"
        )
    path = url[len("sqlite:///") :].split("?", 1)[0]
    if not path or path == ":memory:":
        raise ConfigurationError(
            "the SQLite stores need a database file (the store opens its own connection)"
        )
    return path


def connect(
    path: str | os.PathLike[str], *, synchronous: str = "NORMAL", timeout: float = 30.0
) -> sqlite3.Connection:
    """A ``sqlite3`` connection set up the way the stores expect: WAL, the given
    ``synchronous`` level (NORMAL: durable on application crash, may lose the last commits
    on power loss; FULL: also on power loss) and a busy timeout in seconds."""
    sync = _check_synchronous(synchronous)
    conn = sqlite3.connect(os.fspath(path), timeout=timeout)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={sync}")  # one of four fixed words, checked above
    return conn


class DatabaseBusy(StoreError):
    """Another connection holds the SQLite write lock (past the busy timeout, or at once
    for an inline call, which never waits)."""


def _translate(e: sqlite3.Error, what: str) -> StoreError:
    text = f"SQLite {what}: {e}" if what else f"SQLite: {e}"
    if "no such table" in text or "no such column" in text:
        return SchemaError(f"{text}: run create_schema() or apply schema_sql()")
    if (
        isinstance(e, sqlite3.OperationalError)
        and getattr(e, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY
    ):
        return DatabaseBusy(text)
    return StoreError(text)


class map_errors:
    """Context manager: a ``sqlite3.Error`` raised inside becomes the msdata error for it
    (:class:`SchemaError`, :class:`DatabaseBusy` or :class:`StoreError`), raised ``from``
    the driver's error; msdata errors and anything else pass through unchanged.

    ``what`` names the operation in the message (``SQLite outbox append: database is
    locked``). A class, not a generator, so entering costs next to nothing on the write
    path."""

    __slots__ = ("what",)

    def __init__(self, what: str = "") -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and isinstance(exc, sqlite3.Error):
            raise _translate(exc, self.what) from exc


_ANY_ERRORS = map_errors()  # stateless: one for every call the store runs

_sa_types: tuple[type[Any], type[Any]] | bool | None = False


def _sqlalchemy_types() -> tuple[type[Any], type[Any]] | None:
    global _sa_types
    if _sa_types is False:
        try:
            from sqlalchemy.engine import Connection as SAConnection
            from sqlalchemy.orm import Session
        except ImportError:
            _sa_types = None
        else:
            _sa_types = (Session, SAConnection)
    return _sa_types  # type: ignore[return-value]


def caller_connection(conn: Connection) -> sqlite3.Connection:
    """The caller's sqlite3 connection, from a sqlite3 connection or a SQLAlchemy
    ``Session``/``Connection`` on a SQLite engine (a Session joins, or begins, its
    transaction). ConfigurationError for any other object, and for a connection in
    autocommit mode with no open transaction: run BEGIN first, or the write would commit
    on its own. (With the default ``isolation_level`` sqlite3 itself opens the transaction
    before the first INSERT.)"""
    if isinstance(conn, sqlite3.Connection):
        raw = conn
    else:
        sa = _sqlalchemy_types()
        if sa is None or not isinstance(conn, sa):
            raise ConfigurationError(
                "the SQLite stores take a sqlite3.Connection or a SQLAlchemy Session/"
                f"Connection on a SQLite engine, got {type(conn).__module__}."
                f"{type(conn).__qualname__}"
            )
        if isinstance(conn, sa[0]):
            conn = conn.connection()  # joins (or begins) the session's transaction
        raw = conn.connection.driver_connection
        if not isinstance(raw, sqlite3.Connection):
            raise ConfigurationError(
                f"the SQLAlchemy engine is not a sqlite3 one (driver connection {type(raw)!r})"
            )
    try:
        in_transaction = raw.in_transaction
    except sqlite3.ProgrammingError as e:  # "Cannot operate on a closed database."
        raise StoreError(f"SQLite: the caller's connection cannot be used: {e}") from e
    if not in_transaction and (
        raw.isolation_level is None or getattr(raw, "autocommit", None) is True
    ):
        raise ConfigurationError(
            "the connection is in autocommit mode with no open transaction: run BEGIN "
            "first, or the write would commit on its own"
        )
    return raw


class SqliteDatabase:
    """A database file, a table prefix, and the store's own connection in its own thread.

    ``synchronous``: the store connection's ``PRAGMA synchronous`` (see :func:`connect`).
    ``busy_timeout``: seconds a call in the store's thread waits for the write lock.
    ``inline`` (default: True under OFF or NORMAL, where a commit does not wait for the
    disk): calls made with ``run(fn, inline=True)`` may run on the event loop's thread.
    ``clock``: where the store reads time; :meth:`wall` gives it as Unix seconds, the form
    the tables store.
    """

    #: write transactions between two checkpoints of an inline store: about 1000 pages, as
    #: SQLite's own default (a store whose writes are one or two pages sets it higher)
    checkpoint_every: int = CHECKPOINT_EVERY

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        synchronous: str = "NORMAL",
        busy_timeout: float = 30.0,
        inline: bool | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.path = os.fspath(path)
        if not self.path or self.path == ":memory:" or self.path.startswith("file:"):
            raise ConfigurationError("the SQLite stores need a database file path")
        self.table_prefix = check_table_prefix(table_prefix)
        sync = _check_synchronous(synchronous)
        self.synchronous = sync
        self.busy_timeout = busy_timeout
        #: run the relay's short calls on the event loop's thread (see ``run``)
        self.inline = sync in ("OFF", "NORMAL") if inline is None else inline
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._in_thread = 0  # calls handed to the store's thread and not finished yet
        self._commits = 0  # write transactions since the last checkpoint
        self._checkpointing: asyncio.Task[None] | None = None
        self._closed = False
        self.clock = clock
        #: the clock's time in Unix seconds (``time.time`` itself for the system clock:
        #: read on every append and claim)
        self.wall: Callable[[], float] = (
            time.time if clock is SYSTEM_CLOCK else lambda: clock.now().timestamp()
        )

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``; ``options``
        go to the constructor (ConfigurationError naming one it does not take)."""
        path = path_from_url(url)
        check_store_options(cls, options, f"{cls.__name__} (sqlite://)")
        return cls(path, **options)

    def _connection(self, *, wait: bool = False) -> sqlite3.Connection:
        # used by one call at a time: inline on the loop's thread or in the store's thread.
        # ``wait``: called in the store's thread, where opening may wait for another
        # connection's lock (setting WAL needs one) instead of failing at once
        if self._conn is None:
            conn = sqlite3.connect(
                self.path,
                # inline calls must never wait for the lock: they give up at once instead
                timeout=self.busy_timeout if wait or not self.inline else 0,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")  # checked in __init__
            if self.inline:
                # a checkpoint at commit would flush pages on the loop's thread (7-8 ms once
                # in ~100 batches): the store's thread checkpoints instead (``run``)
                conn.execute("PRAGMA wal_autocheckpoint = 0")
                conn.execute("PRAGMA busy_timeout = 0")
            self._conn = conn
        return self._conn

    async def run(self, fn: Callable[[sqlite3.Connection], T], *, inline: bool = False) -> T:
        """``fn(connection)``, one call at a time, in call order; sqlite3 errors mapped by
        :class:`map_errors`. StoreError once the store is closed.

        ``inline``: a short call (the relay's claim and mark: some hundred microseconds
        of SQLite work with no fsync under synchronous NORMAL) may run right here on the
        event loop's thread, when the store is ``inline`` and no earlier call is still in
        the store's thread. It never waits there: if another connection holds the write
        lock, SQLite refuses at once (busy timeout 0), ``fn``'s transaction rolls back and
        the call goes to the store's thread, which waits up to ``busy_timeout``. ``fn``
        must change nothing outside the database before its transaction has committed,
        unless doing it twice is harmless (it runs again in the thread).

        Why: the store's thread and the event loop share one GIL, and sqlite3 lets it go
        at every row it steps, so a claim in the thread while the loop publishes moves at
        the pace of GIL hand-overs; the hop itself costs tens of microseconds too.
        """
        if self._closed:
            raise StoreError("the SQLite store is closed")
        if inline and self.inline and not self._in_thread:
            try:
                with _ANY_ERRORS:
                    return fn(self._connection())
            except DatabaseBusy:
                pass  # another connection writes: wait for it in the store's thread
            finally:
                if self._commits >= self.checkpoint_every:
                    self._checkpoint_soon()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="msdata-sqlite")
        loop = asyncio.get_running_loop()
        self._in_thread += 1
        work = self._executor.submit(self._call, fn)
        # counted down when the thread is done with it, not when the caller stops waiting:
        # a cancelled caller leaves the call running there, on the same connection
        work.add_done_callback(lambda _: self._thread_done(loop))
        return await asyncio.wrap_future(work)

    def _thread_done(self, loop: asyncio.AbstractEventLoop) -> None:
        def done() -> None:
            self._in_thread -= 1

        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing runs inline
            loop.call_soon_threadsafe(done)

    def _checkpoint_soon(self) -> None:
        """A PASSIVE checkpoint (it waits for nobody) in the store's thread; the calls made
        meanwhile queue behind it there."""
        self._commits = 0

        def checkpoint(conn: sqlite3.Connection) -> None:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

        task = asyncio.get_running_loop().create_task(self.run(checkpoint))
        task.add_done_callback(self._checkpoint_done)
        self._checkpointing = task

    def _checkpoint_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None and not self._closed:
            log.warning("SQLite checkpoint of %s failed: %s", self.path, error)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with _ANY_ERRORS:
            conn = self._connection(wait=True)
            if not self.inline:
                return fn(conn)
            # here it may wait for the write lock
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            try:
                return fn(conn)
            finally:
                conn.execute("PRAGMA busy_timeout = 0")

    def write(self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(conn)`` in one write transaction on the store's own connection (BEGIN
        IMMEDIATE: it takes the write lock first), committed before it returns and rolled
        back if ``fn`` raises. Call it inside :meth:`run`."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
            self._commits += 1
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    async def run_script(self, ddl: str) -> None:
        """Run idempotent DDL (``CREATE … IF NOT EXISTS``) whole, in one transaction."""

        def run(conn: sqlite3.Connection) -> None:
            # executescript commits first; the DDL is idempotent, run it whole
            conn.executescript(f"BEGIN IMMEDIATE;\n{ddl}\nCOMMIT;")

        await self.run(run)

    async def close(self) -> None:
        """Close the store's connection and thread (never a caller's); idempotent."""
        if self._closed:
            return
        if self._checkpointing is not None and not self._checkpointing.done():
            await asyncio.wait({self._checkpointing})
        self._closed = True
        ex, self._executor = self._executor, None
        if ex is None:
            if self._conn is not None:  # only inline calls ran
                self._conn.close()
                self._conn = None
            return

        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(ex, shut)
        ex.shutdown(wait=False)


#: a store class's stores in this process waiting for commits, by database file (realpath)
Waiting = dict[str, "weakref.WeakSet[WatchedDatabase]"]
_waiting_lock = threading.Lock()


class WatchedDatabase(SqliteDatabase):
    """A :class:`SqliteDatabase` whose readers wait for commits to its file (the outbox's
    ``wait_for_rows``, the event store's ``wait_for_events``).

    Another process's commit is seen by polling ``PRAGMA data_version`` (a read, no lock)
    every ``poll_interval`` seconds; an append through a store of the same class in this
    process wakes the waiters at once (``_signal``) and they look every 2 ms for a second,
    until its transaction commits. A subclass sets ``_waiting`` to a module-level
    :data:`Waiting` of its own (its write path checks that dict before calling
    ``_signal``: while nobody waits, an append pays one dict test) and calls
    :meth:`_watch_commits` from ``__init__``."""

    _waiting: ClassVar[Waiting]

    def _watch_commits(self, poll_interval: float) -> None:
        """ConfigurationError unless ``poll_interval`` (seconds) > 0."""
        if poll_interval <= 0:
            raise ConfigurationError("poll_interval must be > 0")
        self.poll_interval = poll_interval
        self._key = os.path.realpath(self.path)
        self._data_version: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._hot_until = 0.0

    def _signal(self) -> None:
        """Wake this process's waiters on the file (from any thread)."""
        with _waiting_lock:
            stores = list(self._waiting.get(self._key, ()))
        for store in stores:
            loop, wake = store._loop, store._wake
            if loop is None or wake is None or loop.is_closed():
                continue
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(wake.set)

    def _waiter(self) -> tuple[asyncio.AbstractEventLoop, asyncio.Event]:
        """The running loop and this store's wake event on it, registered for ``_signal``."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._wake is None:
            self._loop, self._wake = loop, asyncio.Event()
            with _waiting_lock:
                self._waiting.setdefault(self._key, weakref.WeakSet()).add(self)
        return loop, self._wake

    async def _wait_for_commit(
        self, loop: asyncio.AbstractEventLoop, wake: asyncio.Event, deadline: float
    ) -> None:
        """Return once another connection committed to the file since the last look, or
        at ``deadline`` (the loop's time)."""
        while True:
            if await self.run(self._changed, inline=True):
                return
            now = loop.time()
            if now >= deadline:
                return
            step = 0.002 if now < self._hot_until else self.poll_interval
            try:
                async with asyncio.timeout(min(step, deadline - now)):
                    await wake.wait()
            except TimeoutError:
                continue
            wake.clear()
            # an append in this process: its transaction commits soon, look often till then
            self._hot_until = loop.time() + 1.0

    def _changed(self, conn: sqlite3.Connection) -> bool:
        """Did another connection commit since the last look?"""
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        changed = self._data_version is not None and version != self._data_version
        self._data_version = version
        return changed

    async def close(self) -> None:
        with _waiting_lock:
            waiting = self._waiting.get(self._key)
            if waiting is not None:
                waiting.discard(self)
                if not waiting:
                    del self._waiting[self._key]
        await super().close()
