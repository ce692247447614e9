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

import contextlib
import json
import logging
import operator
import os
import socket
import sqlite3
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from types import MappingProxyType
from typing import Any

from msdata.adapters.sqlite._db import (
    Waiting,
    WatchedDatabase,
    _translate,
    caller_connection,
    path_from_url,
)
from msdata.clock import SYSTEM_CLOCK, Clock
from msdata.errors import ConfigurationError
from msdata.messages import safe_text
from msdata.outbox.store import (
    POSTGRES_ONLY_OPTIONS,
    UNREADABLE_TIME,
    OutboxBatch,
    OutboxRecord,
    OutboxRow,
    OutboxStatus,
    OutboxStoreFeatures,
    UnreadableRow,
    read_header_dict,
    read_headers,
)
from msdata.storage import DEFAULT_TABLE_PREFIX, Connection, check_store_options
from msdata.transport import TransportMessage

__all__ = ["OUTBOX_DDL", "SqliteOutboxStore"]

log = logging.getLogger("msdata.outbox")

_NO_HEADERS: MappingProxyType[str, str] = MappingProxyType({})
_dumps = json.dumps

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
-- Who holds the lease: its process (host, pid, start token), so a relay on the same host
-- can tell that the holder died (a SIGKILL, a crash) and take over without waiting.
CREATE TABLE IF NOT EXISTS {p}outbox_relay_process (
    owner   TEXT PRIMARY KEY,
    host    TEXT NOT NULL,
    pid     INTEGER NOT NULL,
    started TEXT NOT NULL
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


def _host() -> str:
    """This machine: hostname and boot id (a reboot ends every process)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _started(pid: int) -> str | None:
    """A start token of process ``pid`` (its start time since boot, from /proc); "" where
    /proc cannot tell; None when no such process runs."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None  # /proc is there, the process is not
    except (OSError, IndexError):
        return ""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:
        pass  # it runs, as another user
    return ""


def _process_gone(host: str, pid: int, started: str) -> bool:
    """Whether the process that recorded (host, pid, started) is known to be gone: only
    a process on this host can be looked at; a pid that runs again under another start
    token is another process."""
    if host != _HOST:
        return False
    now = _started(pid)
    return now is None or (bool(started) and bool(now) and now != started)


_HOST = _host()
_ME = (os.getpid(), _started(os.getpid()) or "")
_first = operator.itemgetter(0)


def _not_read(column: str, value: object) -> Any:
    """Raised from the fast row reader: a column holds a value of another type."""
    raise UnreadableRow(column, f"is {type(value).__name__}, not {_WANT[column]}", value)


_WANT = {"message_id": "text", "topic": "text", "type": "text", "partition_key": "text",
         "payload": "bytes (a BLOB)"}  # fmt: skip


def _records(rows: list[tuple[Any, ...]]) -> list[OutboxRecord]:
    """Rows of ``_columns`` (OutboxRecord's field order, with ``type`` NULL where it is the
    topic) or of ``_fresh_columns`` (the same without ``attempts`` and ``last_error``: 0
    and None) as records: one tuple each, the time and (rarely present) headers converted;
    no per-field attribute setting. Raises (UnreadableRow, TypeError, ValueError,
    OverflowError, OSError: ``_UNREAD``) when a row is not what the store writes; the
    caller then reads the rows one by one (``_read_row``)."""
    if rows and len(rows[0]) == 8:  # (the checks are those of the full form below)
        return [
            _tuple_new(
                OutboxRecord,
                (
                    seq,
                    mid if type(mid) is str else _not_read("message_id", mid),
                    topic if type(topic) is str else _not_read("topic", topic),
                    topic
                    if type_ is None
                    else type_
                    if type(type_) is str
                    else _not_read("type", type_),
                    payload if type(payload) is bytes else _not_read("payload", payload),
                    key if key is None or type(key) is str else _not_read("partition_key", key),
                    _NO_HEADERS if headers is None else read_headers(headers),
                    _fromtimestamp(created, UTC),
                    0,
                    None,
                ),
            )
            for seq, mid, topic, type_, payload, key, headers, created in rows
        ]
    return [
        _tuple_new(
            OutboxRecord,
            (
                seq,
                mid if type(mid) is str else _not_read("message_id", mid),
                topic if type(topic) is str else _not_read("topic", topic),
                topic
                if type_ is None
                else type_
                if type(type_) is str
                else _not_read("type", type_),
                payload if type(payload) is bytes else _not_read("payload", payload),
                key if key is None or type(key) is str else _not_read("partition_key", key),
                _NO_HEADERS if headers is None else read_headers(headers),
                _fromtimestamp(created, UTC),
                attempts,
                error,
            ),
        )
        for seq, mid, topic, type_, payload, key, headers, created, attempts, error in rows
    ]


#: the ``created_at`` values (Unix seconds) ``_batch`` takes as they are: years 1 to 9999,
#: which ``datetime.fromtimestamp`` converts (anything else goes through ``_records``)
_MIN_TIME, _END_TIME = -62135596800.0, 253402300800.0


def _batch(rows: list[tuple[Any, ...]]) -> OutboxBatch | list[OutboxRecord]:
    """Claimed rows (not empty; of ``_fresh_columns`` or ``_columns``) as an
    :class:`OutboxBatch`: one pass building the transport messages and checking what
    ``_records`` checks (the types of the columns, one topic, a ``created_at`` that
    converts); the records are built only if the relay asks (``_records`` on the same
    rows). Rows of several topics, or one that fails a check, go through ``_records``
    (which raises ``_UNREAD`` for a row it cannot read, as for ``claim``). A message's
    headers are a plain dict of its own (a transport checks one faster than the records'
    read-only view: ~1 us a row)."""
    topic = rows[0][2]
    message, no_headers, headers_of = TransportMessage, _NO_HEADERS, read_header_dict
    if len(rows[0]) == 8:
        messages = [
            _tuple_new(message, (mid, p, key, no_headers if h is None else headers_of(h)))
            for _, mid, t, type_, p, key, h, at in rows
            if type(mid) is str
            and t == topic
            and type(p) is bytes
            and (key is None or type(key) is str)
            and (type_ is None or type(type_) is str)
            and type(at) is float
            and _MIN_TIME <= at < _END_TIME
        ]
    else:
        messages = [
            _tuple_new(message, (mid, p, key, no_headers if h is None else headers_of(h)))
            for _, mid, t, type_, p, key, h, at, _a, _e in rows
            if type(mid) is str
            and t == topic
            and type(p) is bytes
            and (key is None or type(key) is str)
            and (type_ is None or type(type_) is str)
            and type(at) is float
            and _MIN_TIME <= at < _END_TIME
        ]
    if len(messages) != len(rows) or type(topic) is not str:
        return _records(rows)
    return OutboxBatch(list(map(_first, rows)), topic, messages, partial(_records, rows))


def _seqs(records: list[OutboxRecord] | OutboxBatch) -> list[int]:
    return records.seqs if isinstance(records, OutboxBatch) else list(map(_first, records))


#: what ``_records`` raises for a row it cannot read
_UNREAD = (UnreadableRow, TypeError, ValueError, OverflowError, OSError, RecursionError)

#: the columns of ``_columns`` again, each as SQLite's type name and the value's bytes (or
#: the number), so no value can fail to convert: ``_read_row`` reads them one by one
_RAW_COLUMNS = (
    "seq, typeof(message_id), CAST(message_id AS BLOB), typeof(topic), CAST(topic AS BLOB), "
    "typeof(type), CAST(type AS BLOB), typeof(payload), CAST(payload AS BLOB), "
    "typeof(partition_key), CAST(partition_key AS BLOB), typeof(headers), "
    "CAST(headers AS BLOB), typeof(created_at), CAST(created_at AS BLOB), "
    "CASE WHEN typeof(created_at) IN ('integer', 'real') THEN created_at END, "
    "CASE WHEN typeof(attempts) = 'integer' THEN attempts ELSE 0 END, "
    "CAST(last_error AS BLOB)"
)

_KIND = {"integer": "an integer", "real": "a real number", "text": "text", "blob": "a BLOB",
         "null": "NULL"}  # fmt: skip


def _text(column: str, kind: str, raw: bytes | None, nullable: bool = False) -> str | None:
    if kind == "null" and nullable:
        return None
    if kind != "text" or raw is None:
        raise UnreadableRow(column, f"is {_KIND.get(kind, kind)}, not text", raw)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise UnreadableRow(column, "is not valid UTF-8 text", raw) from None


def _read_row(raw: tuple[Any, ...]) -> tuple[OutboxRecord, str | None]:
    """One row of ``_RAW_COLUMNS`` as a record, and why it cannot be published (None
    when it can). The rules are ``_records``'s; a column that cannot be read shows as
    empty (headers none, payload ``b""``, time ``UNREADABLE_TIME``)."""
    (seq, k_mid, mid, k_topic, topic, k_type, type_, k_payload, payload, k_key, key,
     k_headers, headers, k_created, created_raw, created, attempts, error) = raw  # fmt: skip
    reasons: list[str] = []

    def text(column: str, kind: str, value: bytes | None, nullable: bool = False) -> str | None:
        try:
            return _text(column, kind, value, nullable)
        except UnreadableRow as e:
            reasons.append(e.reason)
            return None if nullable else ""

    r_mid = text("message_id", k_mid, mid) or ""
    r_topic = text("topic", k_topic, topic) or ""
    r_type = text("type", k_type, type_) or r_topic
    r_key = text("partition_key", k_key, key, nullable=True)
    if k_payload != "blob":
        reasons.append(UnreadableRow("payload", f"is {_KIND.get(k_payload, k_payload)}, "
                                     "not bytes (a BLOB)", payload).reason)  # fmt: skip
    r_headers: Mapping[str, str] = _NO_HEADERS
    if k_headers != "null":
        try:
            r_headers = read_headers(
                headers if k_headers == "blob" else _text("headers", k_headers, headers) or ""
            )
        except UnreadableRow as e:
            reasons.append(e.reason)
    at = UNREADABLE_TIME
    if created is None:
        reasons.append(UnreadableRow(
            "created_at", f"is {_KIND.get(k_created, k_created)}, not a number (Unix seconds)",
            created_raw).reason)  # fmt: skip
    else:
        try:
            at = _fromtimestamp(created, UTC)
        except (OverflowError, OSError, ValueError):
            reasons.append(UnreadableRow("created_at", "is out of range", created).reason)
    record = _tuple_new(
        OutboxRecord,
        (
            seq,
            r_mid,
            r_topic,
            r_type,
            payload if k_payload == "blob" else b"",
            r_key,
            r_headers,
            at,
            attempts,
            None if error is None else error.decode("utf-8", "replace"),
        ),
    )
    return record, ("; ".join(reasons) if reasons else None)


# Relays waiting on a database file in this process, woken by appends to it.
_waiting: Waiting = {}


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

    def hold(self, claimed: Sequence[int], keyed: bool) -> None:
        """Add the ``claimed`` seqs (in seq order), from a keyed look or not."""
        seqs = self.seqs
        if keyed:
            self.after = None
        elif claimed:
            last = claimed[-1]
            # the claim returned every pending row not held up to ``last`` (in seq order,
            # nothing skipped): with no held row past it, all up to it are now held
            if self.after is not None or not seqs or max(seqs) < last:
                self.after = last
        elif self.after is None and seqs:
            self.after = max(seqs)  # no pending row that is not held
        seqs.update(claimed)


class SqliteOutboxStore(WatchedDatabase):
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

    _waiting = _waiting

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
        self._watch_commits(poll_interval)
        # relay id -> the rows it holds (touched by one store call at a time)
        self._held: dict[str, _Held] = {}
        t = f"{self.table_prefix}outbox"
        self._t = t
        self._lease = f"{t}_relay"
        self._insert = (
            f"INSERT INTO {t} (message_id, topic, type, payload, partition_key, "
            "aggregate_type, headers, created_at) VALUES (?,?,?,?,?,?,?,?)"
        )
        self._insert_no_headers = (
            f"INSERT INTO {t} (message_id, topic, type, payload, partition_key, "
            "aggregate_type, headers, created_at) VALUES (?,?,?,?,?,?,NULL,?)"
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
        self._deletes: dict[int, str] = {}  # the mark's DELETE by number of rows
        self._delete_run = f"DELETE FROM {t} WHERE seq BETWEEN ? AND ?"
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
        # when no row is parked or has a retry_at, no pending row has attempts or a last
        # error (only retry_later sets them, with a retry_at; requeue sets retry_at too):
        # two columns fewer to read per row (~0.15 µs)
        self._fresh_columns = self._columns.removesuffix(", attempts, last_error")

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SqliteOutboxStore:
        """``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``; ``options``
        go to the constructor. ConfigurationError names an option of the PostgreSQL store
        (``notify``, ``relay_synchronous_commit``, ``partitioned``, ``max_size``), which
        means nothing here."""
        foreign = sorted(POSTGRES_ONLY_OPTIONS & set(options))
        if foreign:
            raise ConfigurationError(
                f"{', '.join(foreign)}: an option of the PostgreSQL outbox store; "
                "SqliteOutboxStore takes table_prefix, synchronous, busy_timeout, "
                "poll_interval, inline, clock"
            )
        path = path_from_url(url)
        check_store_options(cls, options, f"{cls.__name__} (sqlite://)")
        return cls(path, **options)

    def schema_sql(self) -> str:
        """The DDL of this store's tables (idempotent)."""
        return OUTBOX_DDL.format(p=self.table_prefix)

    async def create_schema(self) -> None:
        await self.run_script(self.schema_sql())

    async def check_schema(self) -> None:
        """Raise SchemaError when the outbox table or the relay's lease table is missing
        (what a relay checks at start): two statements prepared, no row read, whatever the
        backlog (``status()`` counts every pending row)."""
        sql = f"SELECT (SELECT 1 FROM {self._t} LIMIT 0), (SELECT 1 FROM {self._lease} LIMIT 0)"
        await self.run(lambda conn: conn.execute(sql).fetchone(), inline=True)

    # -- write side ----------------------------------------------------------------------

    def append(self, conn: Connection, rows: Sequence[OutboxRow]) -> None:
        if not rows:
            return
        raw = caller_connection(conn)
        now = self.wall()
        try:
            if len(rows) == 1:  # one message (the usual add): one statement, no lists
                r = rows[0]
                h = r[6]
                if h:
                    raw.execute(
                        self._insert, (r[0], r[1], r[2], r[3], r[4], r[5], _dumps(dict(h)), now)
                    )
                else:  # no headers: the column is NULL in the statement, one bind fewer
                    raw.execute(self._insert_no_headers, (r[0], r[1], r[2], r[3], r[4], r[5], now))
            else:
                args = [
                    (r[0], r[1], r[2], r[3], r[4], r[5], _dumps(dict(r[6])) if r[6] else None, now)
                    for r in rows
                ]
                raw.executemany(self._insert, args)
        except sqlite3.Error as e:  # as map_errors does, without a context manager per call
            raise _translate(e, "outbox append") from e
        if _waiting:
            self._signal()

    async def append_async(self, conn: Connection, rows: Sequence[OutboxRow]) -> None:
        """SQLite has no async driver msdata serves (aiosqlite is 17x slower): this takes
        the same sync connections as :meth:`append`; an INSERT costs microseconds."""
        self.append(conn, rows)

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
        columns = self._columns if blocking else self._fresh_columns
        return f"SELECT {columns} {sql} ORDER BY o.seq LIMIT ?", [*args, limit], blocking

    def _holder(self, conn: sqlite3.Connection) -> tuple[str, float] | None:
        row = conn.execute(f"SELECT owner, lease_until FROM {self._lease}").fetchone()
        return None if row is None else (row[0], row[1])

    def _record_process(self, conn: sqlite3.Connection, relay_id: str) -> None:
        """Taking the lease over: record which process holds it now."""
        with contextlib.suppress(sqlite3.OperationalError):  # a schema without the table
            conn.execute(f"DELETE FROM {self._lease}_process")
            conn.execute(
                f"INSERT INTO {self._lease}_process (owner, host, pid, started) "
                "VALUES (?, ?, ?, ?)",
                (relay_id, _HOST, *_ME),
            )

    def _live(self, conn: sqlite3.Connection, holder: tuple[str, float], now: float) -> bool:
        """Whether another relay's lease still holds: not lapsed, and its process not known
        to be gone (same host, and its pid no longer runs as the process that took it)."""
        if holder[1] <= now:
            return False
        try:
            row = conn.execute(
                f"SELECT host, pid, started FROM {self._lease}_process WHERE owner = ?",
                (holder[0],),
            ).fetchone()
        except sqlite3.OperationalError:
            return True  # a schema from before the process table: wait out the lease
        if row is None or (row[1] == _ME[0] and row[0] == _HOST):
            return True
        return not _process_gone(row[0], row[1], row[2])

    def _held_by(self, relay_id: str) -> _Held:
        held = self._held.get(relay_id)
        if held is None:
            held = self._held[relay_id] = _Held()
        return held

    def _read(
        self, conn: sqlite3.Connection, select: str, args: list[Any], batch: bool = False
    ) -> tuple[list[OutboxRecord] | OutboxBatch, list[tuple[int, str]]]:
        """Run a claim's ``select``: its rows as records (``batch``: as an
        :class:`OutboxBatch` where ``_batch`` can), and the rows that cannot be read
        (seq, reason), left out with the later rows of their keys. One fetch and one
        conversion for the usual batch; only a batch holding a row that is not what the
        store writes is read again, row by row (``_read_slowly``)."""
        try:
            rows = conn.execute(select, args).fetchall()
            return (_batch(rows) if batch and rows else _records(rows)), []
        except _UNREAD:
            pass
        except sqlite3.OperationalError as e:  # a TEXT value that is not UTF-8
            if "decode" not in str(e):
                raise
        return self._read_slowly(conn, select, args)

    def _read_slowly(
        self, conn: sqlite3.Connection, select: str, args: list[Any]
    ) -> tuple[list[OutboxRecord], list[tuple[int, str]]]:
        """``_read`` one row at a time, each column fetched as bytes (nothing can fail to
        convert): the readable rows, and (seq, reason) of the others. A row after an
        unreadable row of its key is left out of both: it waits behind it."""
        rest = select.removeprefix(f"SELECT {self._columns} ")
        rest = rest.removeprefix(f"SELECT {self._fresh_columns} ")
        raw_select = f"SELECT {_RAW_COLUMNS} {rest}"
        good: list[OutboxRecord] = []
        bad: list[tuple[int, str]] = []
        stuck: set[tuple[str, bytes]] = set()
        for raw in conn.execute(raw_select, args).fetchall():
            key = None if raw[9] == "null" else (raw[9], raw[10])  # the key as stored
            if key is not None and key in stuck:
                continue
            record, reason = _read_row(raw)
            if reason is None:
                good.append(record)
                continue
            bad.append((record.seq, safe_text(reason, 2000)))
            if key is not None:
                stuck.add(key)
        return good, bad

    def _park_unreadable(self, conn: sqlite3.Connection, bad: list[tuple[int, str]]) -> None:
        """Park the rows ``_read`` could not read (in the claim's write transaction)."""
        conn.executemany(
            f"UPDATE {self._t} SET state = 1, last_error = ? WHERE seq = ? AND state = 0",
            [(reason, seq) for seq, reason in bad],
        )

    @staticmethod
    def _log_parked(bad: list[tuple[int, str]]) -> None:
        for seq, reason in bad:
            log.error("outbox row %s parked: %s", seq, reason)

    def _claim_tx(
        self,
        conn: sqlite3.Connection,
        relay_id: str,
        limit: int,
        lease_seconds: float,
        looked: tuple[tuple[str, float] | None, bool] | None = None,
        batch: bool = False,
    ) -> tuple[list[OutboxRecord] | OutboxBatch, bool, bool, list[tuple[int, str]]]:
        """The claim, inside an open write transaction: the records, whether the relay's
        held rows are stale (another relay held the lease since), whether the look was
        the keyed one (or rows were left out), and the unreadable rows it parked. The
        caller updates ``_held`` once the transaction committed. ``looked``: the lease
        holder and whether a row blocks its key, when the caller already read them in this
        transaction. ``batch``: the records as an :class:`OutboxBatch` where they can be."""
        if looked is None:
            holder, blocking = self._holder(conn), None
        else:
            holder, blocking = looked
        now = self.wall()
        held = self._held_by(relay_id)
        if holder is None or holder[0] != relay_id:
            if holder is not None and self._live(conn, holder, now):
                return [], False, True, []  # nothing looked at: "keyed" keeps ``after`` unset
            # the lease was not ours: what happened meanwhile is unknown, look at every row
            held.after = None
        # another relay held the lease since: what this one held is stale
        fresh = holder is not None and holder[0] != relay_id
        select, args, keyed = self._select(conn, _Held() if fresh else held, limit, blocking)
        records, bad = self._read(conn, select, args, batch)
        if bad:
            held_now = _Held() if fresh else held
            records, bad = self._park_and_read_on(conn, held_now, limit, records, bad, batch)
            keyed = True  # rows were left out: pending rows lie below the last one claimed
        if records and (
            holder is None or holder[0] != relay_id or holder[1] - now <= lease_seconds / 2
        ):
            conn.execute(
                f"INSERT INTO {self._lease} (id, owner, lease_until) VALUES (1, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, "
                "lease_until = excluded.lease_until",
                (relay_id, now + lease_seconds),
            )
            if holder is None or holder[0] != relay_id:
                self._record_process(conn, relay_id)
        return records, fresh, keyed, bad

    def _hold(
        self, relay_id: str, records: list[OutboxRecord] | OutboxBatch, fresh: bool, keyed: bool
    ) -> None:
        held = self._held_by(relay_id)
        if fresh:
            held.seqs.clear()
            held.after = None
        held.hold(_seqs(records), keyed)

    async def claim(self, relay_id: str, limit: int, lease_seconds: float) -> list[OutboxRecord]:
        claimed = await self._claim(relay_id, limit, lease_seconds, False)
        assert type(claimed) is list  # (records, as asked)
        return claimed

    async def claim_messages(
        self,
        relay_id: str,
        sent_seqs: Sequence[int],
        limit: int,
        lease_seconds: float,
        *,
        keep: bool = False,
    ) -> list[OutboxRecord] | OutboxBatch:
        """``mark_sent_and_claim`` (``claim`` when ``sent_seqs`` is empty) returning the
        claimed rows as an :class:`msdata.outbox.store.OutboxBatch` where they all have one
        topic and read as the store writes them, else as records (see
        :class:`msdata.outbox.store.OutboxRelayStore`); the relay's fast path."""
        if not sent_seqs:
            return await self._claim(relay_id, limit, lease_seconds, True)
        return await self._mark_and_claim(relay_id, sent_seqs, limit, lease_seconds, keep, True)

    async def _claim(
        self, relay_id: str, limit: int, lease_seconds: float, batch: bool
    ) -> list[OutboxRecord] | OutboxBatch:
        if limit <= 0:
            return []

        def run(conn: sqlite3.Connection) -> list[OutboxRecord] | OutboxBatch:
            held = self._held_by(relay_id)
            # a lock-free look first, so an idle or waiting relay never takes the write lock
            holder = self._holder(conn)
            now = self.wall()
            if holder is not None and holder[0] != relay_id and self._live(conn, holder, now):
                return []
            if holder is not None and holder[0] == relay_id and holder[1] - now > lease_seconds / 2:
                # the lease is ours for a while yet: no other relay claims, so read and go
                select, args, keyed = self._select(conn, held, limit)
                records, bad = self._read(conn, select, args, batch)
                if bad:  # park them: read again under the write lock

                    def park(
                        c: sqlite3.Connection,
                    ) -> tuple[list[OutboxRecord] | OutboxBatch, list[Any]]:
                        got, unread = self._read(c, select, args, batch)
                        return self._park_and_read_on(c, held, limit, got, unread, batch)

                    records, bad = self.write(conn, park)
                    keyed = True
                self._hold(relay_id, records, False, keyed)
                self._log_parked(bad)
                return records
            if holder is None or holder[0] != relay_id:
                held.after = None
            probe, args, _ = self._select(conn, held, None)
            if conn.execute(probe, args).fetchone() is None:
                return []
            records, fresh, keyed, bad = self.write(
                conn, lambda c: self._claim_tx(c, relay_id, limit, lease_seconds, None, batch)
            )
            self._hold(relay_id, records, fresh, keyed)
            self._log_parked(bad)
            return records

        return await self.run(run, inline=True)

    def _park_and_read_on(
        self,
        conn: sqlite3.Connection,
        held: _Held,
        limit: int,
        records: list[OutboxRecord] | OutboxBatch,
        bad: list[tuple[int, str]],
        batch: bool = False,
    ) -> tuple[list[OutboxRecord] | OutboxBatch, list[tuple[int, str]]]:
        """In the claim's write transaction: park the unreadable rows ``bad``; when the
        claim found nothing else (``records`` empty), look again past them, until it finds
        readable rows or none: a claim returns nothing only when nothing is claimable (the
        relay then waits for new rows). Each round parks at least one row, so it ends.
        Returns the records and every row parked."""
        parked: list[tuple[int, str]] = []
        while bad:
            self._park_unreadable(conn, bad)
            parked += bad
            if records:
                break
            select, args, _ = self._select(conn, held, limit, True)
            records, bad = self._read(conn, select, args, batch)
        return records, parked

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
        claimed = await self._mark_and_claim(relay_id, sent_seqs, limit, lease_seconds, keep, False)
        assert type(claimed) is list  # (records, as asked)
        return claimed

    async def _mark_and_claim(
        self,
        relay_id: str,
        sent_seqs: Sequence[int],
        limit: int,
        lease_seconds: float,
        keep: bool,
        batch: bool,
    ) -> list[OutboxRecord] | OutboxBatch:
        if limit <= 0:
            await self.mark_sent(relay_id, sent_seqs, keep=keep)
            return []
        seqs = list(sent_seqs)

        def both(
            conn: sqlite3.Connection,
        ) -> tuple[list[OutboxRecord] | OutboxBatch, bool, bool, list[tuple[int, str]]]:
            # one look for the mark and the claim (each statement is a GIL round trip)
            newest, tomb, owner, until, blocking = conn.execute(self._look).fetchone()
            self._mark_tx(conn, seqs, keep, newest, tomb)
            holder = None if owner is None else (owner, until)
            looked = (holder, bool(blocking))
            return self._claim_tx(conn, relay_id, limit, lease_seconds, looked, batch)

        def run(conn: sqlite3.Connection) -> list[OutboxRecord] | OutboxBatch:
            records, fresh, keyed, bad = self.write(conn, both)
            self._drop(relay_id, seqs)
            self._hold(relay_id, records, fresh, keyed)
            self._log_parked(bad)
            return records

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
        if keep:
            conn.execute(
                f"INSERT OR IGNORE INTO {t}_sent (seq, message_id, topic, type, payload, "
                "partition_key, aggregate_type, headers, created_at, sent_at) "
                "SELECT seq, message_id, topic, type, payload, partition_key, "
                f"aggregate_type, headers, created_at, ? FROM {t} "
                f"WHERE state < 2 AND seq IN ({_placeholders(len(seqs))})",
                (self.wall(), *seqs),
            )
        n = len(seqs)
        first = seqs[0]
        if (
            type(first) is int
            and seqs[-1] == first + n - 1
            and list(seqs) == [*range(first, first + n)]
        ):
            # a run of seqs (a relay's usual batch): one range, not n values to look up
            # (~20 µs less per 100 rows); the newest row is the run's last, if in it
            with_newest = newest is not None and first <= newest < first + n
            last = newest - 1 if with_newest else first + n - 1
            if newest is not None and last >= first:
                conn.execute(self._delete_run, (first, last))
        else:
            args = [s for s in seqs if s != newest]
            with_newest = len(args) < n
            if args:
                delete = self._deletes.get(len(args))
                if delete is None:  # one statement text per batch size, made once
                    delete = self._deletes[len(args)] = (
                        f"DELETE FROM {t} WHERE seq IN ({_placeholders(len(args))})"
                    )
                conn.execute(delete, args)
        if with_newest:
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

    async def leave(self, relay_id: str) -> None:
        """A relay stops cleanly: it gives the lease up (when it holds it), so a stand-by
        relay claims at once instead of after the lease. The relay calls this last when it
        stops; rows it still held are claimable again."""
        lease = self._lease

        def give_up(c: sqlite3.Connection) -> None:
            c.execute(f"DELETE FROM {lease} WHERE owner = ?", (relay_id,))
            with contextlib.suppress(sqlite3.OperationalError):
                c.execute(f"DELETE FROM {lease}_process WHERE owner = ?", (relay_id,))

        def run(conn: sqlite3.Connection) -> None:
            self._held.pop(relay_id, None)
            holder = self._holder(conn)
            if holder is not None and holder[0] == relay_id:
                self.write(conn, give_up)

        await self.run(run, inline=True)
        if self._wake is not None:
            self._wake.set()

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
        # row by row: a parked row may be one that cannot be read (shown as far as it can)
        sql = f"SELECT {_RAW_COLUMNS} FROM {self._t} WHERE state = 1 ORDER BY seq LIMIT ?"
        rows = await self.run(lambda conn: conn.execute(sql, (limit,)).fetchall())
        return [_read_row(raw)[0] for raw in rows]

    async def requeue(self, seqs: Sequence[int]) -> int:
        if not seqs:
            return 0
        sql = (
            # retry_at: now, not NULL: the row keeps its last_error, and the claim reads
            # attempts and last_error only while some row has a retry_at (``_fresh_columns``)
            f"UPDATE {self._t} SET state = 0, attempts = 0, retry_at = ? "
            f"WHERE state = 1 AND seq IN ({_placeholders(len(seqs))})"
        )
        args = (self.wall(), *seqs)
        n = await self.run(lambda conn: self.write(conn, lambda c: c.execute(sql, args).rowcount))
        if n and self._wake is not None:
            self._wake.set()
        return n

    async def status(self) -> OutboxStatus:
        sql = (
            # (a created_at another writer left as text is not counted in the age)
            "SELECT COALESCE(SUM(state = 0), 0), MIN(CASE WHEN state = 0 AND typeof(created_at) "
            "IN ('integer', 'real') THEN created_at END), "
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
        loop, wake = self._waiter()
        deadline = loop.time() + timeout
        await self._wait_for_commit(loop, wake, deadline)
