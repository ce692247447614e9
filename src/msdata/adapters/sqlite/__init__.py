"""SQLite adapters (stdlib ``sqlite3``, WAL): the embedded default's stores.

One module per port on one kernel (``_db.py``): :class:`SqliteOutboxStore`
(``outbox.py``), :class:`SqliteInboxStore` (``inbox.py``), :class:`SqliteEventStore`
(``eventstore.py``), :class:`SqliteCheckpointStore` (``checkpoints.py``),
:class:`SqliteIdempotencyStore` (``idempotency.py``), :class:`SqliteSagaStore` (``saga.py``).
"""

from msdata.errors import MissingDependencyError

try:
    import sqlite3 as _sqlite3  # noqa: F401  (some Python builds ship without it)
except ImportError as e:  # pragma: no cover
    raise MissingDependencyError("sqlite3", None) from e

from msdata.adapters.sqlite._db import connect
from msdata.adapters.sqlite.checkpoints import SqliteCheckpointStore
from msdata.adapters.sqlite.eventstore import SqliteEventStore
from msdata.adapters.sqlite.idempotency import SqliteIdempotencyStore
from msdata.adapters.sqlite.inbox import INBOX_DDL, SqliteInboxStore
from msdata.adapters.sqlite.outbox import OUTBOX_DDL, SqliteOutboxStore
from msdata.adapters.sqlite.saga import SqliteSagaStore
from msdata.storage import DEFAULT_TABLE_PREFIX, check_table_prefix

__all__ = [
    "SqliteCheckpointStore",
    "SqliteEventStore",
    "SqliteIdempotencyStore",
    "SqliteInboxStore",
    "SqliteOutboxStore",
    "SqliteSagaStore",
    "connect",
    "from_url",
    "schema_sql",
]


def schema_sql(table_prefix: str = DEFAULT_TABLE_PREFIX) -> str:
    """The DDL of the outbox and inbox tables, for a migration tool (idempotent)."""
    p = check_table_prefix(table_prefix)
    return OUTBOX_DDL.format(p=p) + INBOX_DDL.format(p=p)


def from_url(url: str, **options: object) -> SqliteOutboxStore:
    """``SqliteOutboxStore.from_url``: ``sqlite:///orders.db``."""
    return SqliteOutboxStore.from_url(url, **options)
