"""The outbox store on SQLite (:class:`SqliteOutboxStore`), on the kernel in ``_db.py``.

Write side (``append``): the caller's own ``sqlite3.Connection`` (or a SQLAlchemy
``Session``/``Connection`` on a SQLite engine), inside its open transaction. With the
default ``isolation_level`` sqlite3 opens that transaction itself before the INSERT; on a
connection in autocommit mode (``isolation_level=None``) the caller must have run ``BEGIN``
first, or ConfigurationError is raised rather than committing the message alone.

Relay side: each call is one transaction on the store's own connection. Under synchronous
OFF or NORMAL the relay's claims and marks run right on the event loop's thread (some
hundred microseconds, no fsync) and never wait there: when another connection holds the
write lock they go to the store's own thread, which waits for it. Every other call, and
every call under FULL, runs whole in one hop to that thread (no per-statement hops as with
aiosqlite). SQLite has one writer at a time, so one relay at a time claims: it
holds the store's relay lease (one row in ``{prefix}outbox_relay``) and the others get
nothing until it releases everything or its lease lapses; a second relay is a stand-by.

``wait_for_rows`` polls ``PRAGMA data_version`` (a read, no lock) every ``poll_interval``
seconds, and wakes at once when an ``append`` through a store on the same file in this
process signals it (then it polls every 2 ms until that transaction commits).

Tables are ``{prefix}outbox`` and ``{prefix}outbox_sent`` (rows kept after publishing, when
the relay has a retention); see :meth:`SqliteOutboxStore.schema_sql`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import operator
import os
import sqlite3
import threading
import weakref
from collections.abc import Sequence
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from msdata.adapters.sqlite._db import SqliteDatabase, caller_connection, map_errors
from msdata.clock import SYSTEM_CLOCK, Clock
from msdata.errors import ConfigurationError
from msdata.outbox.store import OutboxRecord, OutboxRow, OutboxStatus, OutboxStoreFeatures
from msdata.storage import DEFAULT_TABLE_PREFIX, Connection

__all__ = ["OUTBOX_DDL", "SqliteOutboxStore"]

_NO_HEADERS: MappingProxyType[str, str] = MappingProxyType({})
_APPEND_ERRORS = map_errors("outbox append")  # stateless: one for every append

#: the outbox tables; ``{p}`` is the table prefix
OUTBOX_DDL = """\
-- Outbox rows waiting to be published: state 0 = pending, 1 = parked, 2 = sent (only the
-- newest row is kept so, as a tombstone, until a newer row exists: SQLite gives a new row
-- the largest seq + 1, and keeping the largest means a seq is never reused).
CREATE TABLE IF NOT EXISTS {p}outbox (
    seq            INTEGER PRIMARY KEY,                -- insertion order
    message_id     TEXT    NOT NULL,
    topic          TEXT    NOT NULL,
    type           TEXT    NOT NULL,
    payload        BLOB    NOT NULL,                   -- CloudEvents 1.0 JSON
    partition_key  TEXT,                               -- the aggregate id; order is per key
    aggregate_type TEXT,
    headers        TEXT,                               -- JSON object of string headers
    created_at     REAL    NOT NULL,                   -- Unix seconds
    state          INTEGER NOT NULL DEFAULT 0,
    retry_at       REAL,                               -- Unix seconds; blocks its key till then
    attempts       INTEGER NOT NULL DEFAULT 0,
    last_error     TEXT
);
-- parked rows and rows waiting out a retry: they block the later rows of their key
CREATE INDEX IF NOT EXISTS {p}outbox_blocking
    ON {p}outbox (partition_key, seq) WHERE state = 1 OR retry_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS {p}outbox_tombstone ON {p}outbox (seq) WHERE state = 2;
-- The relay lease: one relay at a time claims; the others wait until it lapses.
CREATE TABLE IF NOT EXISTS {p}outbox_relay (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    owner       TEXT NOT NULL,
    lease_until REAL NOT NULL                          -- Unix seconds
);
-- Published rows, kept while the relay's retention lasts.
CREATE TABLE IF NOT EXISTS {p}outbox_sent (
    seq            INTEGER PRIMARY KEY,
    message_id     TEXT    NOT NULL,
    topic          TEXT    NOT NULL,
    type           TEXT    NOT NULL,
    payload        BLOB    NOT NULL,
    partition_key  TEXT,
    aggregate_type TEXT,
    headers        TEXT,
    created_at     REAL    NOT NULL,
    sent_at        REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS {p}outbox_sent_at ON {p}outbox_sent (sent_at);
"""


_tuple_new = tuple.__new__
_fromtimestamp = datetime.fromtimestamp
_first = operator.itemgetter(0)


def _records(rows: list[tuple[Any, ...]]) -> list[OutboxRecord]:
    """Rows of ``_columns`` (OutboxRecord's field order, with ``type`` NULL where it is the
    topic) as records: one tuple each, the time and (rarely present) headers converted;
    no per-field attribute setting."""
    return [
        _tuple_new(
            OutboxRecord,
            (
                seq,
                mid,
                topic,
                topic if type_ is None else type_,
                payload if type(payload) is bytes else bytes(payload),
                key,
                _NO_HEADERS if headers is None else MappingProxyType(json.loads(headers)),
                _fromtimestamp(created, UTC),
                attempts,
                error,
            ),
        )
        for seq, mid, topic, type_, payload, key, headers, created, attempts, error in rows
    ]


# Relays waiting on a database file in this process, woken by appends to it.
_waiting: dict[str, weakref.WeakSet[SqliteOutboxStore]] = {}
_waiting_lock = threading.Lock()


def _placeholders(n: int) -> str:
    return ",".join("?" * n)


class _Held:
    """The rows a relay holds (claimed, not yet marked, released, retried or parked).

    ``after``: when not None, every pending row with a seq up to it is held by this relay,
    so its next claim is a range scan from there instead of skipping a list of held rows.
    It holds because SQLite gives rows their seq in commit order (one writer at a time,
    and the newest row is never deleted, so a seq is never given out again): new rows come
    after it. It is dropped (None) whenever rows may be pending below it: rows handed
    back, retried or parked; a keyed look (rows of blocked keys were skipped); a lease
    that was not this relay's.
    """

    __slots__ = ("after", "seqs")

    def __init__(self) -> None:
        self.seqs: set[int] = set()
        self.after: int | None = None

    def hold(self, rows: list[tuple[Any, ...]], keyed: bool) -> None:
        """Add claimed ``rows`` (seq first, in seq order), from a keyed look or not."""
        seqs = self.seqs
        if keyed:
            self.after = None
        elif rows:
            last = rows[-1][0]
            # the claim returned every pending row not held up to ``last`` (in seq order,
            # nothing skipped): with no held row past it, all up to it are now held
            if self.after is not None or not seqs or max(seqs) < last:
                self.after = last
        elif self.after is None and seqs:
            self.after = max(seqs)  # no pending row that is not held
        seqs.update(map(_first, rows))


class SqliteOutboxStore(SqliteDatabase):
    """The :class:`msdata.outbox.store.OutboxStore` on SQLite (see the module docstring).

    One relay at a time: a claim takes (or renews) the store's relay lease, a single row,
    and the rows it returns are remembered by this store object as leased to that relay
    until it marks, releases, retries or parks them. Other relays' claims return nothing
    while the lease is live; a relay that releases everything gives the lease up, and a
    relay that dies lets it lapse after ``lease_seconds``, after which the next relay
    claims every unsent row again (at least once). One lease write per batch, instead of
    one per row, keeps the drain close to a raw DELETE loop.

    ``poll_interval``: how often ``wait_for_rows`` checks for commits by other processes.

    ``inline`` (default: True under ``synchronous`` OFF or NORMAL, where a commit does not
    wait for the disk): the relay's claims and marks run on the event loop's thread, a
    few hundred microseconds each, and go to the store's thread only when another
    connection holds the write lock (they never wait on the loop). False: every call
    goes to the store's thread.
    """

    #: one relay at a time (the store's relay lease); a claim by the relay that holds rows
    #: returns later rows of the keys it holds, so it claims ahead while publishing; SQLite
    #: serialises writers
    features = OutboxStoreFeatures(
        prefetch_claims=True, one_relay_at_a_time=True, concurrent_writers=False
    )

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        synchronous: str = "NORMAL",
        busy_timeout: float = 30.0,
        poll_interval: float = 0.05,
        inline: bool | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(
            path,
            table_prefix=table_prefix,
            synchronous=synchronous,
            busy_timeout=busy_timeout,
            inline=inline,
            clock=clock,
        )
        if poll_interval <= 0:
            raise ConfigurationError("poll_interval must be > 0")
        self.poll_interval = poll_interval
        self._key = os.path.realpath(self.path)
        self._data_version: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._hot_until = 0.0
        # relay id -> the rows it holds (touched by one store call at a time)
        self._held: dict[str, _Held] = {}
        t = f"{self.table_prefix}outbox"
        self._t = t
        self._lease = f"{t}_relay"
        self._insert = (
            f"INSERT INTO {t} (message_id, topic, type, payload, partition_key, "
            "aggregate_type, headers, created_at) VALUES (?,?,?,?,?,?,?,?)"
        )
        # a keyed row waits while an earlier row of its key is parked or waiting out a retry
        self._claimable = (
            f"FROM {t} o WHERE o.state = 0 AND (o.retry_at IS NULL OR o.retry_at <= ?)"
            " AND (o.partition_key IS NULL OR NOT EXISTS ("
            f"SELECT 1 FROM {t} b WHERE (b.state = 1 OR b.retry_at IS NOT NULL)"
            " AND b.partition_key = o.partition_key AND b.seq < o.seq AND b.state < 2"
            " AND (b.state = 1 OR b.retry_at > ?)))"
        )
        self._pending = f"FROM {t} o WHERE o.state = 0"
        self._pending_after = f"FROM {t} o WHERE o.state = 0 AND o.seq > ?"
        self._look = (
            f"SELECT (SELECT MAX(seq) FROM {t}), (SELECT MIN(seq) FROM {t} WHERE state = 2), "
            f"(SELECT owner FROM {self._lease}), (SELECT lease_until FROM {self._lease}), "
            f"EXISTS (SELECT 1 FROM {t} WHERE state = 1 OR retry_at IS NOT NULL)"
        )
        self._any_blocking = f"SELECT 1 FROM {t} WHERE state = 1 OR retry_at IS NOT NULL LIMIT 1"
        # the type is most often the topic: NULL then, one string fewer to make per row
        self._columns = (
            "seq, message_id, topic, NULLIF(type, topic), payload, partition_key, headers, "
            "created_at, attempts, last_error"
        )

    def schema_sql(self) -> str:
        """The DDL of this store's tables (idempotent)."""
        return OUTBOX_DDL.format(p=self.table_prefix)

    async def create_schema(self) -> None:
        await self.run_script(self.schema_sql())

    # -- write side ----------------------------------------------------------------------

    def append(self, conn: Connection, rows: Sequence[OutboxRow]) -> None:
        if not rows:
            return
        raw = caller_connection(conn)
        now = self.wall()
        dumps = json.dumps
        args = [
            (
                r.message_id,
                r.topic,
                r.type,
                r.payload,
                r.partition_key,
                r.aggregate_type,
                dumps(dict(r.headers)) if r.headers else None,
                now,
            )
            for r in rows
        ]
        with _APPEND_ERRORS:
            if len(args) == 1:
                raw.execute(self._insert, args[0])
            else:
                raw.executemany(self._insert, args)
        if _waiting:
            self._signal()

    async def append_async(self, conn: Connection, rows: Sequence[OutboxRow]) -> None:
        """SQLite has no async driver msdata serves (aiosqlite is 17x slower): this takes
        the same sync connections as :meth:`append`; an INSERT costs microseconds."""
        self.append(conn, rows)

    def _signal(self) -> None:
        with _waiting_lock:
            stores = list(_waiting.get(self._key, ()))
        for store in stores:
            store._notify()

    def _notify(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(wake.set)

    # -- relay side ----------------------------------------------------------------------

    def _select(
        self,
        conn: sqlite3.Connection,
        held: _Held,
        limit: int | None,
        blocking: bool | None = None,
    ) -> tuple[str, list[Any], bool]:
        """The claimable rows, leaving out those the relay ``held`` already, and whether
        the look was the keyed one (some row is parked or backing off). Later rows of the
        keys it holds may come back: only this relay publishes them, after the rows it
        holds (a relay publishes one batch after the other). ``blocking``: whether any row
        is parked or backing off, when the caller already looked."""
        if blocking is None:
            blocking = conn.execute(self._any_blocking).fetchone() is not None
        args: list[Any]
        if not blocking:
            # nothing parked or backing off (the usual case): no row waits for an earlier
            # one, so skip the per-row look for one (a probe of the small partial index)
            if held.after is not None:
                # every pending row up to ``after`` is held: a range, not a list to skip
                sql, args = self._pending_after, [held.after]
            else:
                sql, args = self._pending, []
        else:
            now = self.wall()
            sql, args = self._claimable, [now, now]
        if held.seqs and (blocking or held.after is None):
            sql += f" AND o.seq NOT IN ({_placeholders(len(held.seqs))})"
            args.extend(held.seqs)
        if limit is None:
            return f"SELECT 1 {sql} LIMIT 1", args, blocking
        return f"SELECT {self._columns} {sql} ORDER BY o.seq LIMIT ?", [*args, limit], blocking

    def _holder(self, conn: sqlite3.Connection) -> tuple[str, float] | None:
        row = conn.execute(f"SELECT owner, lease_until FROM {self._lease}").fetchone()
        return None if row is None else (row[0], row[1])

    def _held_by(self, relay_id: str) -> _Held:
        held = self._held.get(relay_id)
        if held is None:
            held = self._held[relay_id] = _Held()
        return held

    def _claim_tx(
        self,
        conn: sqlite3.Connection,
        relay_id: str,
        limit: int,
        lease_seconds: float,
        looked: tuple[tuple[str, float] | None, bool] | None = None,
    ) -> tuple[list[tuple[Any, ...]], bool, bool]:
        """The claim, inside an open write transaction: the rows, whether the relay's
        held rows are stale (another relay held the lease since), and whether the look was
        the keyed one. The caller updates ``_held`` once the transaction committed.
        ``looked``: the lease holder and whether a row blocks its key, when the caller
        already read them in this transaction."""
        if looked is None:
            holder, blocking = self._holder(conn), None
        else:
            holder, blocking = looked
        now = self.wall()
        held = self._held_by(relay_id)
        if holder is None or holder[0] != relay_id:
            if holder is not None and holder[1] > now:
                return [], False, True  # nothing looked at: "keyed" keeps ``after`` unset
            # the lease was not ours: what happened meanwhile is unknown, look at every row
            held.after = None
        # another relay held the lease since: what this one held is stale
        fresh = holder is not None and holder[0] != relay_id
        select, args, keyed = self._select(conn, _Held() if fresh else held, limit, blocking)
        rows = conn.execute(select, args).fetchall()
        if rows and (
            holder is None or holder[0] != relay_id or holder[1] - now <= lease_seconds / 2
        ):
            conn.execute(
                f"INSERT INTO {self._lease} (id, owner, lease_until) VALUES (1, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, "
                "lease_until = excluded.lease_until",
                (relay_id, now + lease_seconds),
            )
        return rows, fresh, keyed

    def _hold(self, relay_id: str, rows: list[tuple[Any, ...]], fresh: bool, keyed: bool) -> None:
        held = self._held_by(relay_id)
        if fresh:
            held.seqs.clear()
            held.after = None
        held.hold(rows, keyed)

    async def claim(self, relay_id: str, limit: int, lease_seconds: float) -> list[OutboxRecord]:
        if limit <= 0:
            return []

        def run(conn: sqlite3.Connection) -> list[OutboxRecord]:
            held = self._held_by(relay_id)
            # a lock-free look first, so an idle or waiting relay never takes the write lock
            holder = self._holder(conn)
            now = self.wall()
            if holder is not None and holder[0] != relay_id and holder[1] > now:
                return []
            if holder is not None and holder[0] == relay_id and holder[1] - now > lease_seconds / 2:
                # the lease is ours for a while yet: no other relay claims, so read and go
                select, args, keyed = self._select(conn, held, limit)
                rows = conn.execute(select, args).fetchall()
                self._hold(relay_id, rows, False, keyed)
                return _records(rows)
            if holder is None or holder[0] != relay_id:
                held.after = None
            probe, args, _ = self._select(conn, held, None)
            if conn.execute(probe, args).fetchone() is None:
                return []
            rows, fresh, keyed = self.write(
                conn, lambda c: self._claim_tx(c, relay_id, limit, lease_seconds)
            )
            self._hold(relay_id, rows, fresh, keyed)
            return _records(rows)

        return await self.run(run, inline=True)

    async def mark_sent_and_claim(
        self,
        relay_id: str,
        sent_seqs: Sequence[int],
        limit: int,
        lease_seconds: float,
        *,
        keep: bool = False,
    ) -> list[OutboxRecord]:
        """``mark_sent`` then ``claim``, in one transaction and one hop to the store's
        thread (see :class:`msdata.outbox.store.OutboxStore`)."""
        if not sent_seqs:
            return await self.claim(relay_id, limit, lease_seconds)
        if limit <= 0:
            await self.mark_sent(relay_id, sent_seqs, keep=keep)
            return []
        seqs = list(sent_seqs)

        def both(conn: sqlite3.Connection) -> tuple[list[tuple[Any, ...]], bool, bool]:
            # one look for the mark and the claim (each statement is a GIL round trip)
            newest, tomb, owner, until, blocking = conn.execute(self._look).fetchone()
            self._mark_tx(conn, seqs, keep, newest, tomb)
            holder = None if owner is None else (owner, until)
            return self._claim_tx(conn, relay_id, limit, lease_seconds, (holder, bool(blocking)))

        def run(conn: sqlite3.Connection) -> list[OutboxRecord]:
            rows, fresh, keyed = self.write(conn, both)
            self._drop(relay_id, seqs)
            self._hold(relay_id, rows, fresh, keyed)
            return _records(rows)

        return await self.run(run, inline=True)

    def _drop(self, relay_id: str, seqs: Sequence[int], *, pending: bool = False) -> bool:
        """The relay no longer holds ``seqs``; ``pending``: they are pending again (handed
        back, not sent). Whether it still holds any row."""
        held = self._held.get(relay_id)
        if held is None:
            return False
        held.seqs.difference_update(seqs)
        if pending:
            held.after = None
        return bool(held.seqs)

    def _mark_tx(
        self,
        conn: sqlite3.Connection,
        seqs: Sequence[int],
        keep: bool,
        newest: int | None = None,
        tomb: int | None = -1,
    ) -> None:
        """Mark ``seqs`` sent; ``newest`` (the largest seq) and ``tomb`` (the smallest
        tombstone's seq) when the caller already read them in this transaction."""
        t = self._t
        if newest is None:
            newest = conn.execute(f"SELECT MAX(seq) FROM {t}").fetchone()[0]
        args = [s for s in seqs if s != newest]
        if keep:
            conn.execute(
                f"INSERT OR IGNORE INTO {t}_sent (seq, message_id, topic, type, payload, "
                "partition_key, aggregate_type, headers, created_at, sent_at) "
                "SELECT seq, message_id, topic, type, payload, partition_key, "
                f"aggregate_type, headers, created_at, ? FROM {t} "
                f"WHERE state < 2 AND seq IN ({_placeholders(len(seqs))})",
                (self.wall(), *seqs),
            )
        if args:
            conn.execute(f"DELETE FROM {t} WHERE seq IN ({_placeholders(len(args))})", args)
        if len(args) < len(seqs):
            # the newest row stays as a tombstone, so its seq is never given out again
            conn.execute(f"UPDATE {t} SET state = 2, retry_at = NULL WHERE seq = ?", (newest,))
        if tomb is None or newest is None or tomb >= newest:
            return  # no tombstone below the newest row (tomb=-1: not looked: delete anyway)
        conn.execute(f"DELETE FROM {t} WHERE state = 2 AND seq < ?", (newest,))

    async def mark_sent(self, relay_id: str, seqs: Sequence[int], *, keep: bool = False) -> None:
        if not seqs:
            return

        def run(conn: sqlite3.Connection) -> None:
            self.write(conn, lambda c: self._mark_tx(c, seqs, keep))
            self._drop(relay_id, seqs)

        await self.run(run, inline=True)

    async def release(self, relay_id: str, seqs: Sequence[int]) -> None:
        lease = self._lease

        def run(conn: sqlite3.Connection) -> None:
            if not self._drop(relay_id, seqs, pending=True):
                # it holds nothing more: give the lease up, so another relay may claim now
                holder = self._holder(conn)
                if holder is not None and holder[0] == relay_id:
                    self.write(
                        conn,
                        lambda c: c.execute(f"DELETE FROM {lease} WHERE owner = ?", (relay_id,)),
                    )

        await self.run(run, inline=True)
        if self._wake is not None:
            self._wake.set()

    async def _owned_update(
        self, relay_id: str, seqs: Sequence[int], assign: str, args: tuple[Any, ...]
    ) -> None:
        if not seqs:
            return
        sql = (
            f"UPDATE {self._t} SET {assign} WHERE state = 0 "
            f"AND seq IN ({_placeholders(len(seqs))}) "
            f"AND EXISTS (SELECT 1 FROM {self._lease} WHERE owner = ?)"
        )
        params = (*args, *seqs, relay_id)

        def run(conn: sqlite3.Connection) -> None:
            self.write(conn, lambda c: c.execute(sql, params))
            self._drop(relay_id, seqs, pending=True)

        await self.run(run, inline=True)

    async def retry_later(
        self, relay_id: str, seqs: Sequence[int], reason: str, retry_at: datetime
    ) -> None:
        await self._owned_update(
            relay_id,
            seqs,
            "attempts = attempts + 1, last_error = ?, retry_at = ?",
            (reason, retry_at.timestamp()),
        )

    async def park(self, relay_id: str, seqs: Sequence[int], reason: str) -> None:
        await self._owned_update(relay_id, seqs, "state = 1, last_error = ?", (reason,))

    async def parked(self, limit: int = 100) -> list[OutboxRecord]:
        sql = f"SELECT {self._columns} FROM {self._t} WHERE state = 1 ORDER BY seq LIMIT ?"
        rows = await self.run(lambda conn: conn.execute(sql, (limit,)).fetchall())
        return _records(rows)

    async def requeue(self, seqs: Sequence[int]) -> int:
        if not seqs:
            return 0
        sql = (
            f"UPDATE {self._t} SET state = 0, attempts = 0, retry_at = NULL "
            f"WHERE state = 1 AND seq IN ({_placeholders(len(seqs))})"
        )
        args = tuple(seqs)
        n = await self.run(lambda conn: self.write(conn, lambda c: c.execute(sql, args).rowcount))
        if n and self._wake is not None:
            self._wake.set()
        return n

    async def status(self) -> OutboxStatus:
        sql = (
            "SELECT COALESCE(SUM(state = 0), 0), MIN(CASE WHEN state = 0 THEN created_at END), "
            f"COALESCE(SUM(state = 1), 0) FROM {self._t}"
        )
        pending, oldest, parked = await self.run(lambda conn: conn.execute(sql).fetchone())
        age = None if oldest is None else max(0.0, self.wall() - oldest)
        return OutboxStatus(pending=pending, oldest_pending_age=age, parked=parked)

    async def purge_sent(self, older_than: datetime) -> int:
        sql = f"DELETE FROM {self._t}_sent WHERE sent_at < ?"
        cut = older_than.timestamp()
        return await self.run(
            lambda conn: self.write(conn, lambda c: c.execute(sql, (cut,)).rowcount)
        )

    async def wait_for_rows(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._wake is None:
            self._loop, self._wake = loop, asyncio.Event()
            with _waiting_lock:
                _waiting.setdefault(self._key, weakref.WeakSet()).add(self)
        wake = self._wake
        deadline = loop.time() + timeout
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
            waiting = _waiting.get(self._key)
            if waiting is not None:
                waiting.discard(self)
                if not waiting:
                    del _waiting[self._key]
        await super().close()
