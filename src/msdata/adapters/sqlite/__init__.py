"""SQLite adapters (stdlib ``sqlite3``, WAL): the embedded default's outbox and inbox stores."""

from msdata.errors import MissingDependencyError

try:
    import sqlite3 as _sqlite3  # noqa: F401  (some Python builds ship without it)
except ImportError as e:  # pragma: no cover
    raise MissingDependencyError("sqlite3", None) from e

from msdata.adapters.sqlite.outbox import (
    SqliteInboxStore,
    SqliteOutboxStore,
    connect,
    from_url,
    schema_sql,
)
from msdata.adapters.sqlite.saga import SqliteSagaStore

__all__ = [
    "SqliteInboxStore",
    "SqliteOutboxStore",
    "SqliteSagaStore",
    "connect",
    "from_url",
    "schema_sql",
]
