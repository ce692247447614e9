"""The outbox and inbox store ports.

Implemented by ``msdata.adapters.memory``, ``msdata.adapters.sqlite`` and
``msdata.adapters.postgres``; checked by the conformance suites in
:mod:`msdata.testing.outbox`.

Two sides, two kinds of call:

- The *write* side runs inside the caller's own open transaction, on the caller's own
  connection (sqlite3, psycopg sync/async, asyncpg, SQLAlchemy Session/Connection and their
  async forms). It never commits, never rolls back and never opens a transaction of its own:
  the message commits or rolls back with the business data. ``append`` is for sync
  connections, ``append_async`` for async ones; the adapter tells the driver by the
  connection's type and raises :class:`msdata.errors.ConfigurationError` for one it does not
  serve.
- The *relay* side (claim, mark, release, fail, park, status) belongs to msdata: each call is
  one short transaction of the store's own, committed before it returns. These are safe to
  call concurrently from several relays, in several processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol, runtime_checkable

from msdata.inbox.store import InboxStore
from msdata.storage import DEFAULT_TABLE_PREFIX, check_table_prefix

__all__ = [
    "DEFAULT_TABLE_PREFIX",
    "InboxStore",
    "OutboxRecord",
    "OutboxRow",
    "OutboxStatus",
    "OutboxStore",
    "check_table_prefix",
]

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One message to add to the outbox, already encoded (CloudEvents JSON ``payload``).

    ``aggregate_type``/``aggregate_id`` (``aggregate_id`` is the partition key) and ``type``
    are stored in their own columns, so Debezium's outbox event router can read the table.
    """

    message_id: str
    topic: str
    type: str
    payload: bytes
    partition_key: str | None = None
    aggregate_type: str | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: _NO_HEADERS)


class OutboxRecord(NamedTuple):
    """A stored outbox row, as the relay sees it. ``seq`` is the store's insertion order;
    a store never gives the same ``seq`` to two rows, even after deletes (a relay whose lease
    expired may still mark its old ``seq`` values sent).

    A named tuple (immutable, fields by name or position): a relay builds one per published
    row, and a tuple costs a fraction of a frozen dataclass to build. Stores may build it
    with ``tuple.__new__(OutboxRecord, values)`` from a row in field order."""

    seq: int
    message_id: str
    topic: str
    type: str
    payload: bytes
    partition_key: str | None
    headers: Mapping[str, str]
    created_at: datetime
    attempts: int = 0
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    """What ``status()`` reports: pending rows, the age of the oldest (the lag), parked rows."""

    pending: int
    oldest_pending_age: float | None
    parked: int


@runtime_checkable
class OutboxStore(Protocol):
    """Where outbox messages wait until a relay has published them.

    Ordering contract: a row is *pending* from its commit until ``mark_sent`` (or ``park``).
    ``claim`` gives a relay, for each partition key it returns, the earliest pending rows of
    that key in ``seq`` order, and only when no other relay holds a live lease on any pending
    row of that key and the key's earliest pending row is not parked or waiting out a
    ``retry_at``. Rows without a key carry no order and are claimed freely. A lease that
    expires (its relay died) makes the rows claimable again: that is the at-least-once
    redelivery. Rows committed out of ``seq`` order (the long-transaction hazard) are still
    claimed once they commit: a store never uses a high-water mark. A claim never returns a
    row the caller still holds.

    Optional attribute ``prefetch_claims: bool`` (False when absent): True promises that a
    claim by a relay that still holds rows returns the later pending rows of the keys it
    holds (in ``seq`` order, never the held rows themselves), so the relay claims its next
    batch while publishing this one and publishes the batches in order.

    Optional method (the relay checks with ``callable(getattr(store,
    "mark_sent_and_claim", None))`` and falls back to ``mark_sent`` then ``claim``)::

        async def mark_sent_and_claim(
            self, relay_id: str, sent_seqs: Sequence[int], limit: int, lease_seconds: float,
            *, keep: bool = False,
        ) -> list[OutboxRecord]

    It does ``mark_sent(relay_id, sent_seqs, keep=keep)`` and then ``claim(relay_id, limit,
    lease_seconds)`` as ONE transaction of the store's own (one executor hop, one round
    trip): the claim sees the mark, both follow the contracts above (the claim never returns
    a row of a key another relay holds, nor a row the caller holds), and when it raises
    neither took effect. A relay that has just published a batch marks it and claims the
    next one for the price of one call.
    """

    # -- write side: in the caller's transaction ---------------------------------------------

    def append(self, conn: Any, rows: Sequence[OutboxRow]) -> None:
        """Insert ``rows`` on the caller's sync connection, inside its open transaction."""
        ...

    async def append_async(self, conn: Any, rows: Sequence[OutboxRow]) -> None:
        """Insert ``rows`` on the caller's async connection, inside its open transaction."""
        ...

    # -- relay side: each call one committed transaction of the store's own -------------------

    async def create_schema(self) -> None:
        """Create the tables and indexes if they do not exist (idempotent)."""
        ...

    async def claim(self, relay_id: str, limit: int, lease_seconds: float) -> list[OutboxRecord]:
        """Lease up to ``limit`` pending rows to ``relay_id`` for ``lease_seconds``, following
        the ordering contract above. Returned in ``seq`` order."""
        ...

    async def mark_sent(self, relay_id: str, seqs: Sequence[int], *, keep: bool = False) -> None:
        """The rows were published: delete them, or with ``keep=True`` keep them as sent
        (no longer pending, not counted by ``status``) until ``purge_sent`` removes them; the
        relay passes ``keep=True`` when it has a retention period. Rows whose lease
        ``relay_id`` no longer holds are marked too (the message was published either way)."""
        ...

    async def release(self, relay_id: str, seqs: Sequence[int]) -> None:
        """Give leased rows back unpublished (graceful stop): claimable again at once."""
        ...

    async def retry_later(
        self, relay_id: str, seqs: Sequence[int], reason: str, retry_at: datetime
    ) -> None:
        """Publishing failed: count an attempt, store ``reason``, release the lease, and keep
        the rows (and so their keys) from being claimed before ``retry_at``."""
        ...

    async def park(self, relay_id: str, seqs: Sequence[int], reason: str) -> None:
        """Take rows out of the relay's way for good (too many failures, or a payload that
        no longer decodes), with ``reason``. A parked row still blocks later rows of its own
        key, and nothing else."""
        ...

    async def parked(self, limit: int = 100) -> list[OutboxRecord]:
        """Parked rows, oldest first, with ``last_error``."""
        ...

    async def requeue(self, seqs: Sequence[int]) -> int:
        """Make parked rows pending again (attempts reset); returns how many."""
        ...

    async def status(self) -> OutboxStatus: ...

    async def purge_sent(self, older_than: datetime) -> int:
        """Delete rows kept as sent before ``older_than``; returns how many."""
        ...

    async def wait_for_rows(self, timeout: float) -> None:
        """Return when new rows may have been committed, or after ``timeout`` seconds
        (PostgreSQL: LISTEN/NOTIFY; SQLite: a short poll, and at once for an in-process
        writer). A spurious return is fine; the relay claims again."""
        ...

    async def close(self) -> None: ...
