"""The idempotency store on SQLite (stdlib ``sqlite3``, WAL).

The claim is one conditional write::

    INSERT … ON CONFLICT (scope, key) DO UPDATE SET … WHERE expires_us <= :now RETURNING token

In the store's own mode (``conn=None``) a plain read comes first, so a replay (the key
COMPLETED) is one read and never takes SQLite's write lock; only a missing or expired key
goes on to the write (``BEGIN IMMEDIATE``). On the caller's connection the write comes
first, inside the caller's transaction (so it holds the write lock until that commits: a
concurrent claim from another connection waits for it, up to its busy timeout).
Times are stored as integer microseconds since the Unix epoch (exact).

Table ``{prefix}idempotency``; see :meth:`SqliteIdempotencyStore.schema_sql`.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import datetime
from typing import Any

from msdata.adapters.sqlite._db import (
    DatabaseBusy,
    SqliteDatabase,
    _translate,
    caller_connection,
    map_errors,
)
from msdata.errors import StoreError
from msdata.idempotency.store import (
    IdempotencyRecord,
    IdempotencyStoreFeatures,
    LiveRecord,
    TokenFactory,
    check_purge_time,
)
from msdata.storage import from_unix_us as _dt
from msdata.storage import unix_us as _us

__all__ = ["SqliteIdempotencyStore"]

# scope, key, fingerprint, now (us), lease end (us), the token factory
_ClaimArgs = tuple[str, str, str, int, int, TokenFactory]

_DDL = """\
-- Idempotency keys: IN_PROGRESS (completed = 0) until expires_us (the lease), COMPLETED
-- (completed = 1) until expires_us (the retention); expired rows count as absent.
CREATE TABLE IF NOT EXISTS {p}idempotency (
    scope       TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    fingerprint TEXT    NOT NULL,
    completed   INTEGER NOT NULL,
    expires_us  INTEGER NOT NULL,                      -- Unix microseconds
    token       TEXT    NOT NULL,
    response    BLOB,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS {p}idempotency_expires ON {p}idempotency (expires_us);
"""


class SqliteIdempotencyStore(SqliteDatabase):
    """The :class:`msdata.idempotency.IdempotencyStore` on a SQLite file.

    ``conn``: a ``sqlite3.Connection`` (or SQLAlchemy Session/Connection on a SQLite engine)
    inside its open transaction, or None for the store's own connection. Sync calls with
    ``conn=None`` use a connection of the calling thread's own.
    """

    features = IdempotencyStoreFeatures(
        joins_transaction=True, sync=True, sync_own_transaction=True
    )

    def __init__(self, path: Any, **options: Any) -> None:
        super().__init__(path, **options)
        t = f"{self.table_prefix}idempotency"
        self.table = t
        cols = "scope, key, fingerprint, completed, expires_us, token, response"
        self._select = (
            f"SELECT fingerprint, completed, expires_us, token, response FROM {t} "
            "WHERE scope = ? AND key = ?"
        )
        # a live record as the port's LiveRecord tuple, straight from the row
        self._live = (
            f"SELECT fingerprint, completed, response, token FROM {t} "
            "WHERE scope = ? AND key = ? AND expires_us > ?"
        )
        self._claim = (
            f"INSERT INTO {t} ({cols}) VALUES (?, ?, ?, 0, ?, ?, NULL) "
            "ON CONFLICT (scope, key) DO UPDATE SET fingerprint = excluded.fingerprint, "
            "completed = 0, expires_us = excluded.expires_us, token = excluded.token, "
            f"response = NULL WHERE {t}.expires_us <= ? RETURNING token"
        )
        self._complete = (
            f"UPDATE {t} SET completed = 1, response = ?, expires_us = ? "
            "WHERE scope = ? AND key = ? AND token = ?"
        )
        self._release = f"DELETE FROM {t} WHERE scope = ? AND key = ? AND token = ?"
        self._local = threading.local()
        self._sync_closed = False

    def schema_sql(self) -> str:
        """The DDL of this store's table (idempotent)."""
        return _DDL.format(p=self.table_prefix)

    async def create_schema(self) -> None:
        await self.run_script(self.schema_sql())

    # -- the steps, on a sqlite3 connection -----------------------------------------------------

    @staticmethod
    def _record(scope: str, key: str, row: Any) -> IdempotencyRecord:
        fp, completed, expires_us, token, response = row
        return IdempotencyRecord(scope, key, fp, bool(completed), _dt(expires_us), token, response)

    def _claim_on(self, conn: sqlite3.Connection, args: _ClaimArgs) -> str | LiveRecord:
        scope, key, fp, now_us, until_us, new_token = args
        token = new_token()
        for _ in range(3):
            won = conn.execute(self._claim, (scope, key, fp, until_us, token, now_us)).fetchone()
            if won is not None:
                return token
            row: LiveRecord | None = conn.execute(self._live, (scope, key, now_us)).fetchone()
            if row is not None:
                return row
        raise sqlite3.OperationalError("idempotency claim: the row kept changing")

    def _claim_own(self, conn: sqlite3.Connection, args: _ClaimArgs) -> str | LiveRecord:
        scope, key, _, now_us, _, _ = args
        # an autocommit read first: a replay takes no write lock
        row: LiveRecord | None = conn.execute(self._live, (scope, key, now_us)).fetchone()
        if row is not None:
            return row
        return self.write(conn, lambda c: self._claim_on(c, args))

    def _thread_conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
            conn.execute(f"PRAGMA synchronous={self.synchronous}")  # checked in __init__
            self._local.conn = conn
        return conn

    def _sync(self, conn: Any, fn: Any, *, write: bool = True) -> Any:
        if conn is None:
            if self._sync_closed:
                raise StoreError("the SQLite store is closed")
            with map_errors("idempotency"):
                own = self._thread_conn()
                return fn(own, True) if not write else self.write(own, lambda c: fn(c, False))
        raw = caller_connection(conn)
        with map_errors("idempotency"):
            return fn(raw, False)

    # -- sync calls ---------------------------------------------------------------------------

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
        args = (scope, key, fingerprint, now_us, until_us, new_token)
        found: str | LiveRecord = self._sync(
            conn,
            lambda c, own: self._claim_own(c, args) if own else self._claim_on(c, args),
            write=False,
        )
        return found

    def complete(
        self, conn: Any, scope: str, key: str, token: str, response: bytes, until_us: int
    ) -> bool:
        args = (response, until_us, scope, key, token)
        return bool(self._sync(conn, lambda c, _: c.execute(self._complete, args).rowcount == 1))

    def release(self, conn: Any, scope: str, key: str, token: str) -> bool:
        args = (scope, key, token)
        return bool(self._sync(conn, lambda c, _: c.execute(self._release, args).rowcount == 1))

    # -- async calls: the caller's connection is sync, used right here ----------------------------

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
        if conn is not None:
            return self.claim(conn, scope, key, fingerprint, now_us, until_us, new_token)
        if self.inline and not self._in_thread and not self._closed:
            # the read first, right here (what ``run(inline=True)`` would do, minus its
            # layers): a replay is this one read, its row returned as it is; a busy
            # database goes the long way below
            try:
                row: LiveRecord | None = (
                    (self._conn or self._connection())
                    .execute(self._live, (scope, key, now_us))
                    .fetchone()
                )
            except sqlite3.Error as e:
                error = _translate(e, "idempotency claim")
                if not isinstance(error, DatabaseBusy):
                    raise error from e
            else:
                if row is not None:
                    return row
                args = (scope, key, fingerprint, now_us, until_us, new_token)
                return await self.run(
                    lambda c: self.write(c, lambda w: self._claim_on(w, args)), inline=True
                )
        args = (scope, key, fingerprint, now_us, until_us, new_token)
        return await self.run(lambda c: self._claim_own(c, args), inline=True)

    async def complete_async(
        self, conn: Any, scope: str, key: str, token: str, response: bytes, until_us: int
    ) -> bool:
        if conn is not None:
            return self.complete(conn, scope, key, token, response, until_us)
        args = (response, until_us, scope, key, token)
        return await self.run(
            lambda c: self.write(c, lambda w: w.execute(self._complete, args).rowcount == 1),
            inline=True,
        )

    async def release_async(self, conn: Any, scope: str, key: str, token: str) -> bool:
        if conn is not None:
            return self.release(conn, scope, key, token)
        args = (scope, key, token)
        return await self.run(
            lambda c: self.write(c, lambda w: w.execute(self._release, args).rowcount == 1),
            inline=True,
        )

    async def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        row = await self.run(lambda c: c.execute(self._select, (scope, key)).fetchone())
        return None if row is None else self._record(scope, key, row)

    async def purge(self, now: datetime) -> int:
        check_purge_time(now)
        sql = f"DELETE FROM {self.table} WHERE expires_us <= ?"
        cut = _us(now)
        return await self.run(lambda c: self.write(c, lambda w: w.execute(sql, (cut,)).rowcount))

    async def close(self) -> None:
        self._sync_closed = True
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        await super().close()
