"""The inbox store on SQLite (:class:`SqliteInboxStore`), on the kernel in ``_db.py``.

``record`` runs on the caller's own ``sqlite3.Connection`` (or a SQLAlchemy
``Session``/``Connection`` on a SQLite engine) inside its open transaction; ``purge`` is one
transaction on the store's own connection. Table: ``{prefix}inbox``.
"""

from __future__ import annotations

from datetime import datetime

from msdata.adapters.sqlite._db import SqliteDatabase, caller_connection, map_errors
from msdata.inbox.store import InboxStoreFeatures
from msdata.storage import Connection

__all__ = ["INBOX_DDL", "SqliteInboxStore"]

_RECORD_ERRORS = map_errors("inbox record")  # stateless: one for every record

#: the inbox table; ``{p}`` is the table prefix
INBOX_DDL = """\
-- Messages each consumer has applied; written in the consumer's own transaction.
CREATE TABLE IF NOT EXISTS {p}inbox (
    consumer    TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    recorded_at REAL NOT NULL,                         -- Unix seconds
    PRIMARY KEY (consumer, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS {p}inbox_recorded_at ON {p}inbox (recorded_at);
"""


class SqliteInboxStore(SqliteDatabase):
    """The :class:`msdata.inbox.InboxStore` on SQLite.

    A concurrent duplicate waits for the SQLite write lock (the caller's busy timeout) and
    then finds the first transaction's record; if the caller's transaction had already read
    an older snapshot, SQLite refuses the write at once and StoreError is raised: roll back
    and let the message be redelivered.
    """

    features = InboxStoreFeatures(reads_clock=True)

    def schema_sql(self) -> str:
        """The DDL of this store's table (idempotent)."""
        return INBOX_DDL.format(p=self.table_prefix)

    async def create_schema(self) -> None:
        await self.run_script(self.schema_sql())

    def record(self, conn: Connection, consumer: str, message_id: str) -> bool:
        raw = caller_connection(conn)
        with _RECORD_ERRORS:
            cur = raw.execute(
                f"INSERT OR IGNORE INTO {self.table_prefix}inbox "
                "(consumer, message_id, recorded_at) VALUES (?, ?, ?)",
                (consumer, message_id, self.wall()),
            )
        return cur.rowcount == 1

    async def record_async(self, conn: Connection, consumer: str, message_id: str) -> bool:
        """The same sync connections as :meth:`record` (SQLite has no async driver msdata
        serves; an INSERT costs microseconds)."""
        return self.record(conn, consumer, message_id)

    async def purge(self, older_than: datetime) -> int:
        sql = f"DELETE FROM {self.table_prefix}inbox WHERE recorded_at < ?"
        cut = older_than.timestamp()
        return await self.run(
            lambda conn: self.write(conn, lambda c: c.execute(sql, (cut,)).rowcount)
        )
