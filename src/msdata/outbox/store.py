"""The outbox store port, split by who calls it.

Implemented by ``msdata.adapters.memory``, ``msdata.adapters.sqlite`` and
``msdata.adapters.postgres``; checked by the conformance suites in
:mod:`msdata.testing.conformance.outbox` (the store) and
:mod:`msdata.testing.conformance.relay` (a relay over it).

- :class:`OutboxWriteStore` (the application, through :class:`msdata.outbox.Outbox`):
  ``append``/``append_async`` run inside the caller's own open transaction, on the caller's
  own connection (see :mod:`msdata.storage` for the forms a connection takes). They never
  commit, never roll back and never open a transaction of their own: the message commits or
  rolls back with the business data. A connection of a form the store does not serve, or
  one with no open transaction, is refused with :class:`msdata.errors.ConfigurationError`.
- :class:`OutboxRelayStore` (the relay): claim, mark_sent, mark_sent_and_claim, release,
  retry_later, park, wait_for_rows. Each call is one short transaction of the store's own,
  committed before it returns; safe to call concurrently from several relays, in several
  processes.
- :class:`OutboxAdminStore` (operators, and the relay's retention): parked, requeue,
  status, purge_sent; each its own short transaction.
- :class:`OutboxStore` is all three plus the :class:`msdata.storage.Store` lifecycle and a
  :class:`OutboxStoreFeatures` record saying what the backend can do.

Time: a store reads it from its ``clock`` (:mod:`msdata.clock`) where its features say so
(``reads_clock``); the PostgreSQL store uses the database server's clock, the one clock
every relay process sharing the database agrees on.

The inbox port lives in :mod:`msdata.inbox.store` (re-exported here).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import NamedTuple, Protocol, runtime_checkable

from msdata.inbox.store import InboxStore
from msdata.messages import safe_text
from msdata.storage import DEFAULT_TABLE_PREFIX, Connection, check_table_prefix
from msdata.transport import TransportMessage

__all__ = [
    "DEFAULT_TABLE_PREFIX",
    "POSTGRES_ONLY_OPTIONS",
    "UNREADABLE_TIME",
    "InboxStore",
    "OutboxAdminStore",
    "OutboxBatch",
    "OutboxRecord",
    "OutboxRelayStore",
    "OutboxRow",
    "OutboxStatus",
    "OutboxStore",
    "OutboxStoreFeatures",
    "OutboxWriteStore",
    "UnreadableRow",
    "check_table_prefix",
    "read_header_dict",
    "read_headers",
]

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
_loads = json.loads


class UnreadableRow(ValueError):
    """A stored outbox row that cannot be read as an :class:`OutboxRecord` (a column
    holding a value of another type, size or encoding, as another writer may leave one:
    a hand-written INSERT, a migration, another language). Raised by the stores' row
    readers and caught by the stores themselves: a claim parks such a row with
    :attr:`reason` as its ``last_error``, never raising it to the relay. ``reason`` names
    the column and what is wrong, with the value escaped and cut short."""

    def __init__(self, column: str, what: str, value: object = None) -> None:
        shown = "" if value is None else f": {safe_text(repr(value), 120)}"
        self.reason = f"unreadable row: {column} {what}{shown}"
        super().__init__(self.reason)


#: options of the PostgreSQL outbox store (``from_url``/``store_from_url``) that mean
#: nothing elsewhere: ``memory://`` accepts and ignores them, SQLite refuses them by name
POSTGRES_ONLY_OPTIONS = frozenset(
    {"notify", "relay_synchronous_commit", "partitioned", "floor_rescan_seconds", "max_size"}
)

#: the ``created_at`` a store shows for a row whose stored time cannot be read (in
#: ``parked()``; such a row is parked, never published)
UNREADABLE_TIME = datetime(1970, 1, 1, tzinfo=UTC)


def read_headers(raw: str | bytes) -> Mapping[str, str]:
    """A stored headers column (JSON text) as the record's headers: a JSON object whose
    values are all strings, read-only. Raises :class:`UnreadableRow` for anything else
    (invalid JSON, a list, ``null``, a number, a non-string value)."""
    value = read_header_dict(raw)
    return MappingProxyType(value) if value else _NO_HEADERS


def read_header_dict(raw: str | bytes) -> dict[str, str]:
    """:func:`read_headers` as a new plain dict (the caller's own: a transport message's
    headers, checked by the transports faster than a read-only view)."""
    try:
        value = _loads(raw)
    except (ValueError, TypeError, RecursionError):
        raise UnreadableRow("headers", "are not JSON", raw) from None
    if type(value) is dict:
        for v in value.values():
            if type(v) is not str:
                break
        else:
            return value
    raise UnreadableRow("headers", "are not a JSON object of string values", raw)


class OutboxRow(NamedTuple):
    """One message to add to the outbox, already encoded (CloudEvents JSON ``payload``).

    ``aggregate_type``/``aggregate_id`` (``aggregate_id`` is the partition key) and ``type``
    are stored in their own columns, so Debezium's outbox event router can read the table.
    A named tuple (immutable, fields by name or position): one is built per added message,
    and a tuple costs a fraction of a frozen dataclass to build.
    """

    message_id: str
    topic: str
    type: str
    payload: bytes
    partition_key: str | None = None
    aggregate_type: str | None = None
    headers: Mapping[str, str] = _NO_HEADERS


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


class OutboxBatch:
    """A claimed batch in the form the transport takes, as a store's optional
    ``claim_messages`` returns it (see :class:`OutboxRelayStore`): no
    :class:`OutboxRecord` is built unless the relay asks for them.

    ``seqs``: the rows' ``seq`` values, in ``seq`` order; ``topic``: the one topic of
    every row; ``messages``: one :class:`msdata.transport.TransportMessage` per row, in the
    same order (the row's ``message_id``, ``payload`` as bytes, ``partition_key``,
    ``headers``). ``records()``: the same rows as the records ``claim`` would have
    returned (built on the first call, then kept), for a relay that needs them (a publish
    that failed, a batch it sorts row by row). ``len()`` is the number of rows."""

    __slots__ = ("_make", "_records", "messages", "seqs", "topic")

    def __init__(
        self,
        seqs: list[int],
        topic: str,
        messages: list[TransportMessage],
        records: Callable[[], list[OutboxRecord]],
    ) -> None:
        self.seqs = seqs
        self.topic = topic
        self.messages = messages
        self._make: Callable[[], list[OutboxRecord]] | None = records
        self._records: list[OutboxRecord] = []

    def __len__(self) -> int:
        return len(self.seqs)

    def records(self) -> list[OutboxRecord]:
        """The batch's rows as :class:`OutboxRecord` values, in ``seq`` order."""
        if self._make is not None:
            self._records, self._make = self._make(), None
        return self._records

    def __repr__(self) -> str:
        return f"OutboxBatch(topic={self.topic!r}, seqs={self.seqs!r})"


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    """What ``status()`` reports: pending rows, the age of the oldest (the lag), parked rows."""

    pending: int
    oldest_pending_age: float | None
    parked: int


@dataclass(frozen=True, slots=True)
class OutboxStoreFeatures:
    """What an outbox store can do: the relay and the conformance suites read it from
    ``store.features`` (as :class:`msdata.transport.TransportFeatures` for transports)."""

    #: a claim by a relay that still holds rows returns the later pending rows of the keys
    #: it holds (in ``seq`` order, never the held rows themselves), so the relay claims its
    #: next batch while publishing this one and publishes the batches in order
    prefetch_claims: bool = False
    #: one relay at a time holds the store's lease and claims; the others get nothing until
    #: it releases everything or its lease runs out (SQLite). False: relays share the work,
    #: each claiming rows of keys no other relay holds (PostgreSQL, memory)
    one_relay_at_a_time: bool = False
    #: two write transactions can be open at once and the later can commit first, so the
    #: out-of-order commit hazard can arise (PostgreSQL, memory; SQLite serialises writers)
    concurrent_writers: bool = True
    #: relays own partitions of the keys (a hash of the key, fixed at append) and share
    #: them out among the relays that are running: a relay claims rows of the partitions
    #: it owns only, so a new relay gets work after the others rebalance (at their next
    #: claims), not at its first claim (PostgreSQL with ``partitioned=True``)
    partitioned: bool = False
    #: the store reads time (leases, ``retry_at``, ``created_at``, ``sent_at``) from the
    #: ``clock`` it was given, so a :class:`msdata.testing.FakeClock` drives its expiry.
    #: False: another clock (the PostgreSQL server's)
    reads_clock: bool = True


@runtime_checkable
class OutboxWriteStore(Protocol):
    """The write side: adding messages in the caller's open transaction (see the module
    docstring for the contract)."""

    def append(self, conn: Connection, rows: Sequence[OutboxRow]) -> None:
        """Insert ``rows`` on the caller's sync connection, inside its open transaction."""
        ...

    async def append_async(self, conn: Connection, rows: Sequence[OutboxRow]) -> None:
        """Insert ``rows`` on the caller's async connection, inside its open transaction."""
        ...


@runtime_checkable
class OutboxRelayStore(Protocol):
    """The relay side: each call one committed transaction of the store's own.

    Ordering contract: a row is *pending* from its commit until ``mark_sent`` (or ``park``).
    ``claim`` gives a relay, for each partition key it returns, the earliest pending rows of
    that key in ``seq`` order, and only when no other relay holds a live lease on any pending
    row of that key and the key's earliest pending row is not parked or waiting out a
    ``retry_at``. Rows without a key carry no order and are claimed freely. A lease that
    expires (its relay died) makes the rows claimable again: that is the at-least-once
    redelivery. Rows committed out of ``seq`` order (the long-transaction hazard) are still
    claimed once they commit: a store never uses a high-water mark. A claim never returns a
    row the caller still holds. With ``features.prefetch_claims`` it does return the later
    pending rows of the keys the caller holds.

    Unreadable rows: a claim never fails because of one row. A row it cannot read as an
    :class:`OutboxRecord` whose fields have their declared types (a column another writer
    filled with a value of another type, size or encoding; see :class:`UnreadableRow`) is
    parked by the claim itself with the reason as ``last_error`` (logged at ERROR on
    ``msdata.outbox``), and is not returned; the later rows of its key in the same claim
    are not returned either (they wait behind it, as behind any parked row); every other
    row is returned as usual. ``parked()`` lists such a row with what could be read
    (unreadable headers as none, an unreadable ``created_at`` as
    :data:`UNREADABLE_TIME`, an unreadable payload as ``b""``).

    Optional fast path (the relay uses it where the store's class defines it, else
    ``mark_sent_and_claim``/``claim``)::

        async def claim_messages(
            relay_id: str, sent_seqs: Sequence[int], limit: int, lease_seconds: float,
            *, keep: bool = False,
        ) -> list[OutboxRecord] | OutboxBatch

    is ``mark_sent_and_claim`` (or ``claim`` when ``sent_seqs`` is empty): the same
    transaction under the same contracts, the same rows, returned either as an
    :class:`OutboxBatch` (their transport messages, no records built; only when they all
    have one topic) or as the list of records ``claim`` would return (always when nothing
    was claimed: ``[]``). A row the claim parks as unreadable is in neither.
    """

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

    async def mark_sent_and_claim(
        self,
        relay_id: str,
        sent_seqs: Sequence[int],
        limit: int,
        lease_seconds: float,
        *,
        keep: bool = False,
    ) -> list[OutboxRecord]:
        """``mark_sent(relay_id, sent_seqs, keep=keep)`` then ``claim(relay_id, limit,
        lease_seconds)`` as ONE transaction of the store's own (one executor hop, one round
        trip): the claim sees the mark, both follow the contracts above, and when it raises
        neither took effect. A relay that has just published a batch marks it and claims the
        next one for the price of one call."""
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

    async def wait_for_rows(self, timeout: float) -> None:
        """Return when new rows may have been committed, or after ``timeout`` seconds
        (PostgreSQL: LISTEN/NOTIFY; SQLite: a short poll, and at once for an in-process
        writer). A spurious return is fine; the relay claims again."""
        ...


@runtime_checkable
class OutboxAdminStore(Protocol):
    """Administration: what is stuck, putting it back, the lag, retention."""

    async def parked(self, limit: int = 100) -> list[OutboxRecord]:
        """Parked rows, oldest first, with ``last_error``."""
        ...

    async def requeue(self, seqs: Sequence[int]) -> int:
        """Make parked rows pending again (attempts reset); returns how many."""
        ...

    async def status(self) -> OutboxStatus:
        """Pending rows, the age of the oldest in seconds (the lag), parked rows."""
        ...

    async def purge_sent(self, older_than: datetime) -> int:
        """Delete rows kept as sent before ``older_than``; returns how many."""
        ...


@runtime_checkable
class OutboxStore(OutboxWriteStore, OutboxRelayStore, OutboxAdminStore, Protocol):
    """Where outbox messages wait until a relay has published them: the write, relay and
    administration sides, the store lifecycle (``schema_sql``, ``create_schema``,
    ``close``; see :class:`msdata.storage.Store`) and the backend's ``features``.

    Optional: ``async def check_schema() -> None``, raising
    :class:`msdata.errors.SchemaError` when the tables a relay uses are missing, at a cost
    that does not grow with the table (SQLite: a statement prepared against each table).
    :meth:`msdata.outbox.OutboxRelay.start` calls it where a store has it, else
    ``status()``, whose counts scan the pending rows."""

    @property
    def features(self) -> OutboxStoreFeatures: ...

    def schema_sql(self) -> str:
        """The DDL ``create_schema`` runs (empty for stores without SQL)."""
        ...

    async def create_schema(self) -> None:
        """Create the tables and indexes if they do not exist (idempotent)."""
        ...

    async def close(self) -> None: ...
