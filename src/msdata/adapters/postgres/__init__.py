"""PostgreSQL adapters: the outbox and inbox stores (asyncpg for the store's own work; the
caller's psycopg, asyncpg or SQLAlchemy connection for writes inside the caller's
transaction). Needs ``pip install "msdata[postgres]"``."""

from msdata.errors import MissingDependencyError

try:
    import asyncpg  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError("asyncpg", "postgres") from e

from msdata.adapters.postgres.checkpoints import PostgresCheckpointStore
from msdata.adapters.postgres.eventstore import PostgresEventStore
from msdata.adapters.postgres.idempotency import PostgresIdempotencyStore
from msdata.adapters.postgres.inbox import PostgresInboxStore
from msdata.adapters.postgres.outbox import PostgresOutboxStore
from msdata.adapters.postgres.saga import PostgresSagaStore

__all__ = [
    "PostgresCheckpointStore",
    "PostgresEventStore",
    "PostgresIdempotencyStore",
    "PostgresInboxStore",
    "PostgresOutboxStore",
    "PostgresSagaStore",
]
