"""The event store port: streams of events with an expected version, one global order.

Implemented by ``msdata.adapters.memory``, ``msdata.adapters.sqlite`` and
``msdata.adapters.postgres``; checked by :mod:`msdata.testing.conformance.eventstore`.

What a store keeps: each event is the CloudEvents JSON of its envelope (``payload``, exactly
the bytes :class:`msdata.serialization.CloudEventsCodec` encodes and an outbox row carries),
with its ``event_id``, ``type`` and ``schema_version`` copied into columns so a reader can
filter by type without decoding. Decoding (and so upcasting old schema versions) happens when
reading, through the registry: the stored bytes are never rewritten.

Two sides, two kinds of call:

- ``append`` / ``append_async`` run inside the caller's own open transaction, on the
  caller's connection (see :mod:`msdata.storage`): they never commit, roll back or open a
  transaction, so the events commit with the caller's other writes (an outbox row, a
  business table) or not at all. A connection with no open transaction is refused with
  :class:`msdata.errors.ConfigurationError` (a sqlite3 connection in its default mode
  counts as open: sqlite3 begins the transaction at the first INSERT, the caller commits).
- Reads (``read_stream``, ``read_all``, ``stream_version``, ``backlog``) and
  ``wait_for_events`` run on connections the store owns; each is one short read.

Contract:

- Streams: ``append(conn, stream_id, expected_version, events)`` adds the events as versions
  ``expected_version + 1 …`` of the stream (``expected_version`` = how many events the
  writer saw in the stream; 0 for a new stream). If the stream holds a different number of
  events, it raises :class:`msdata.errors.ConcurrencyError` naming the stream, the expected
  and (when known) the actual version, and writes nothing. Two transactions appending to
  one stream at the same expected version: at most one commits its events; the other gets
  ``ConcurrencyError`` (from ``append``, possibly after waiting for the first to end; the
  memory store, which cannot wait, raises at once while the first is open). Appends to
  different streams do not conflict.
- The global order: every committed event has a ``position`` (an int > 0, unique, not
  dense). ``read_all(after=p)`` returns committed events with positions > ``p`` in
  increasing order, and **never skips an event that commits late**: once ``read_all`` has
  returned an event at position ``p``, every event it returns later has a position > ``p``,
  including events of transactions that were still open when the first call ran. A store
  delays an event rather than letting a reader pass it (PostgreSQL: see docs/eventstore.md).
- ``wait_for_events(after, timeout)`` returns when events after ``after`` may have become
  readable, or after ``timeout`` seconds; a spurious return is allowed (the reader reads
  again), a missed wake-up is not (it is bounded by the store's own poll interval).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, Protocol, runtime_checkable

from msdata.errors import ConfigurationError
from msdata.messages import check_text

__all__ = [
    "MAX_STREAM_ID",
    "Backlog",
    "EventStore",
    "NewEvent",
    "RecordedEvent",
    "check_stream_id",
]

#: the longest stream id a store accepts (characters)
MAX_STREAM_ID = 200


def check_stream_id(stream_id: str) -> str:
    """A stream id is a non-empty string of at most 200 characters with no control
    character (U+0000-U+001F, U+007F: PostgreSQL cannot store NUL, and none belongs in an
    id) (ConfigurationError), valid UTF-8 (EncodeError)."""
    if not isinstance(stream_id, str) or not 0 < len(stream_id) <= MAX_STREAM_ID:
        raise ConfigurationError(
            f"a stream id must be a non-empty str of at most {MAX_STREAM_ID} characters, "
            f"got {stream_id!r}"
        )
    if has_control_character(stream_id):
        raise ConfigurationError(f"a stream id holds no control character, got {stream_id!r}")
    return check_text("stream id", stream_id)  # no lone surrogate: every store can write it


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def has_control_character(text: str) -> bool:
    """Whether ``text`` holds a C0 control character or DEL (U+0000-U+001F, U+007F)."""
    return _CONTROL.search(text) is not None


def check_expected_version(expected_version: int) -> int:
    if (
        isinstance(expected_version, bool)
        or not isinstance(expected_version, int)
        or expected_version < 0
    ):
        raise ConfigurationError(
            f"expected_version must be an int >= 0 (0: a new stream), got {expected_version!r}"
        )
    return expected_version


@dataclass(frozen=True, slots=True)
class NewEvent:
    """One event to append, already encoded: ``payload`` is the CloudEvents JSON of its
    envelope; ``event_id`` (the envelope's id), ``type`` and ``schema_version`` are copied
    into their own columns."""

    event_id: str
    type: str
    schema_version: int
    payload: bytes


class RecordedEvent(NamedTuple):
    """A committed event as the store returns it.

    ``position`` orders all events of the store (see the port's contract);
    ``stream_version`` is the event's 1-based number in its stream; ``recorded_at`` is the
    UTC time the store wrote it (for lag in seconds)."""

    position: int
    stream_id: str
    stream_version: int
    event_id: str
    type: str
    schema_version: int
    payload: bytes
    recorded_at: datetime


class Backlog(NamedTuple):
    """Committed, readable events after a position: how many, and when the first of them
    was recorded (None when there are none)."""

    events: int
    oldest_recorded_at: datetime | None


@runtime_checkable
class EventStore(Protocol):
    """Append-only streams of encoded events with one global order; see the module
    docstring for the contract. Safe to call concurrently from several tasks and processes
    (the memory store: one event loop)."""

    def append(
        self, conn: Any, stream_id: str, expected_version: int, events: Sequence[NewEvent]
    ) -> int:
        """Append ``events`` to ``stream_id`` on the caller's sync connection, in its open
        transaction; returns the stream's new version (``expected_version + len(events)``).
        Raises ConcurrencyError for a stale ``expected_version``. Never commits."""
        ...

    async def append_async(
        self, conn: Any, stream_id: str, expected_version: int, events: Sequence[NewEvent]
    ) -> int:
        """``append`` on the caller's async connection."""
        ...

    async def read_stream(
        self, stream_id: str, from_version: int = 1, limit: int | None = None
    ) -> list[RecordedEvent]:
        """The stream's committed events with ``stream_version >= from_version``, in
        version order, at most ``limit`` (all when None). An unknown stream: ``[]``."""
        ...

    async def stream_version(self, stream_id: str) -> int:
        """How many committed events the stream holds (0 for an unknown stream)."""
        ...

    async def read_all(
        self, after: int = 0, limit: int = 1000, types: Collection[str] | None = None
    ) -> list[RecordedEvent]:
        """Committed events with ``position > after`` in position order, at most ``limit``
        of them; with ``types``, only events of those type names (the others are passed
        over, never returned later)."""
        ...

    async def head(self) -> int:
        """The position of the last readable event (0 when there is none): every event at
        or before it is readable now, and ``read_all`` will never return one at or before
        it that it has not returned already."""
        ...

    async def backlog(self, after: int) -> Backlog:
        """How many readable events lie after ``after``, and the oldest one's time."""
        ...

    async def wait_for_events(self, after: int, timeout: float) -> None:
        """Return when events after ``after`` may be readable, or after ``timeout``
        seconds (PostgreSQL: LISTEN/NOTIFY; SQLite and memory: an in-process wake-up)."""
        ...

    def schema_sql(self) -> str: ...

    async def create_schema(self) -> None: ...

    async def close(self) -> None: ...


def as_types(types: Collection[str] | None) -> frozenset[str] | None:
    """``types`` as a frozenset (None: every type); a bare str is refused."""
    if types is None:
        return None
    if isinstance(types, str):
        raise ConfigurationError("types must be a collection of type names, not one str")
    wanted = frozenset(types)
    for t in wanted:
        if not isinstance(t, str):
            raise ConfigurationError(
                f"types holds type names (str), not {t!r}: the EventLog maps event classes "
                "to their registered names, a store takes the names"
            )
    return wanted


def check_read(after: int, limit: int) -> None:
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise ConfigurationError(f"after must be a position >= 0, got {after!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigurationError(f"limit must be an int >= 1, got {limit!r}")
