"""Typed events over an :class:`~msdata.eventstore.store.EventStore`: encode on append
(optionally adding the same events to an outbox in the same transaction), decode and upcast
on read, follow the global order live."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Collection, Iterable, Mapping
from datetime import datetime
from typing import Any, Generic, NamedTuple, TypeVar

from msdata.errors import ConfigurationError, DecodeError
from msdata.eventstore.store import EventStore, NewEvent, RecordedEvent, check_stream_id
from msdata.messages import (
    Envelope,
    Message,
    MessageRegistry,
    default_registry,
    make_envelope,
    message_list,
)
from msdata.outbox.outbox import Outbox
from msdata.outbox.store import OutboxRow
from msdata.serialization import CloudEventsCodec
from msdata.transport import check_name

__all__ = ["AppendResult", "EventLog", "StoredEvent"]

#: the type name of aggregate snapshots (msdata.eventstore.aggregate.Snapshot)
SNAPSHOT_TYPE = "msdata.Snapshot"
#: stream ids ending so are reserved for aggregate snapshots
SNAPSHOT_SUFFIX = ".snapshots"

log = logging.getLogger("msdata.eventstore")

M = TypeVar("M", bound=Message)
_new = tuple.__new__
MessageOrEnvelope = Message | Envelope[Any]


class StoredEvent(NamedTuple, Generic[M]):
    """A decoded event with its place in the store: its envelope (``message`` at the
    newest schema version, upcast if it was stored older), global ``position``, stream and
    ``stream_version`` (1-based), and when the store recorded it (UTC)."""

    envelope: Envelope[M]
    position: int
    stream_id: str
    stream_version: int
    recorded_at: datetime

    @property
    def message(self) -> M:
        return self.envelope.message


class AppendResult(NamedTuple):
    """What ``append`` wrote: the stream's new version and the envelopes, in order."""

    version: int
    envelopes: list[Envelope[Any]]


class EventLog:
    """Appends, reads and follows typed events::

        events = EventLog(store, source="orders", outbox=outbox)   # outbox: optional
        with conn:                                                 # the caller's transaction
            events.append(conn, "order-42", 0, [OrderPlaced(order_id="42")])
        async for stored in events.subscribe(after=0):
            print(stored.position, stored.message)

    Each message is wrapped in an envelope (partition key = the stream id, so a relay keeps
    a stream's events in order) and stored as its CloudEvents JSON. With ``outbox``, every
    append also adds the same bytes to the outbox, on the same connection, in the same
    transaction (topic: ``topic`` or the event's type name), unless ``publish=False``.
    """

    def __init__(
        self,
        store: EventStore,
        *,
        codec: CloudEventsCodec | None = None,
        registry: MessageRegistry | None = None,
        source: str = "msdata",
        outbox: Outbox | None = None,
        topic: str | None = None,
    ) -> None:
        self.store = store
        self.registry = registry or (codec.registry if codec is not None else default_registry)
        self.codec = codec or CloudEventsCodec(self.registry)
        if not source:
            raise ConfigurationError("an event log's source must be a non-empty string")
        self.source = source
        self.outbox = outbox
        self.topic = check_name("topic", topic) if topic is not None else None
        self._topics: set[str] = set()

    # -- append --------------------------------------------------------------------------

    def append(
        self,
        conn: Any,
        stream_id: str,
        expected_version: int,
        events: MessageOrEnvelope | Iterable[MessageOrEnvelope],
        *,
        headers: Mapping[str, str] | None = None,
        publish: bool = True,
    ) -> AppendResult:
        """Append ``events`` to ``stream_id`` on the sync connection ``conn`` in its open
        transaction (and to the outbox, see the class docstring). Raises
        :class:`msdata.errors.ConcurrencyError` when the stream does not hold exactly
        ``expected_version`` events. Never commits."""
        envelopes, new = self._encode(stream_id, events, headers)
        version = self.store.append(conn, stream_id, expected_version, new)
        if publish and self.outbox is not None and new:
            self.outbox.store.append(conn, self._outbox_rows(envelopes, new))
        return AppendResult(version, envelopes)

    async def append_async(
        self,
        conn: Any,
        stream_id: str,
        expected_version: int,
        events: MessageOrEnvelope | Iterable[MessageOrEnvelope],
        *,
        headers: Mapping[str, str] | None = None,
        publish: bool = True,
    ) -> AppendResult:
        """:meth:`append` on an async connection."""
        envelopes, new = self._encode(stream_id, events, headers)
        version = await self.store.append_async(conn, stream_id, expected_version, new)
        if publish and self.outbox is not None and new:
            await self.outbox.store.append_async(conn, self._outbox_rows(envelopes, new))
        return AppendResult(version, envelopes)

    def _encode(
        self,
        stream_id: str,
        events: MessageOrEnvelope | Iterable[MessageOrEnvelope],
        headers: Mapping[str, str] | None,
    ) -> tuple[list[Envelope[Any]], list[NewEvent]]:
        check_stream_id(stream_id)
        items = message_list(events)
        envelopes: list[Envelope[Any]] = []
        new: list[NewEvent] = []
        encode = self.codec.encode
        for item in items:
            if isinstance(item, Envelope):
                env = (
                    item
                    if item.partition_key == stream_id
                    else item._replace(partition_key=stream_id)
                )
            else:
                env = make_envelope(
                    item,
                    registry=self.registry,
                    partition_key=stream_id,
                    headers=headers,
                    source=self.source,
                )
            if (env.type == SNAPSHOT_TYPE) != stream_id.endswith(SNAPSHOT_SUFFIX):
                raise ConfigurationError(
                    f"stream ids ending in {SNAPSHOT_SUFFIX!r} are reserved for aggregate "
                    f"snapshots ({SNAPSHOT_TYPE}), and snapshots go only there: cannot "
                    f"append a {env.type} to {stream_id!r}"
                )
            envelopes.append(env)
            new.append(NewEvent(env.id, env.type, env.version, encode(env)))
        return envelopes, new

    def _outbox_rows(self, envelopes: list[Envelope[Any]], new: list[NewEvent]) -> list[OutboxRow]:
        rows = []
        for env, e in zip(envelopes, new, strict=True):
            to = self.topic or env.type
            if to not in self._topics:
                self._topics.add(check_name("topic", to))
            rows.append(
                OutboxRow(
                    message_id=env.id,
                    topic=to,
                    type=env.type,
                    payload=e.payload,
                    partition_key=env.partition_key,
                    aggregate_type=to,
                    headers=env.headers,
                )
            )
        return rows

    # -- read ----------------------------------------------------------------------------

    def decode(self, record: RecordedEvent) -> StoredEvent[Any]:
        """Decode a stored event (upcasting an old schema version). Raises a
        :class:`msdata.errors.DecodeError` naming the position when it cannot."""
        try:
            envelope = self.codec.decode(record.payload)
        except DecodeError as e:
            raise type(e)(
                f"event at position {record.position} ({record.stream_id} "
                f"v{record.stream_version}): {e}"
            ) from e
        # tuple.__new__ straight (the named tuple's __new__ is a Python call more)
        return _new(StoredEvent, (envelope, record[0], record[1], record[2], record[7]))

    async def read_stream(
        self, stream_id: str, from_version: int = 1, limit: int | None = None
    ) -> list[StoredEvent[Any]]:
        """The stream's events from ``from_version`` on, decoded."""
        records = await self.store.read_stream(stream_id, from_version, limit)
        return [self.decode(r) for r in records]

    def type_names(self, types: Collection[str | type[Message]] | None) -> frozenset[str] | None:
        """``types`` as registered type names: each a name (str) or a message class
        (its registered name; RegistrationError if it is not registered). None: every type.
        One bare str or anything else is refused with ConfigurationError."""
        if types is None:
            return None
        if isinstance(types, str | type):
            raise ConfigurationError(
                "types must be a collection of type names or event classes, not one "
                f"{type(types).__qualname__}: write types=[{types!r}]"
            )
        names: set[str] = set()
        for t in types:
            if isinstance(t, str):
                names.add(t)
            elif isinstance(t, type) and issubclass(t, Message):
                names.add(self.registry.name_of(t)[0])
            else:
                raise ConfigurationError(f"types holds type names or event classes, not {t!r}")
        return frozenset(names)

    async def read_all(
        self,
        after: int = 0,
        limit: int = 1000,
        types: Collection[str | type[Message]] | None = None,
    ) -> list[StoredEvent[Any]]:
        """Events after position ``after`` in the global order, decoded; ``types``: only
        these (type names or event classes). Without ``types``, aggregate snapshots
        (``msdata.Snapshot``, kept in ``{id}.snapshots`` streams) are left out."""
        names = self.type_names(types)
        out: list[StoredEvent[Any]] = []
        position = after
        while True:
            want = limit - len(out)
            records = await self.store.read_all(position, want, names)
            out.extend(self.decode(r) for r in records if _wanted(r, names))
            if len(records) < want or len(out) >= limit:
                return out
            position = records[-1].position  # snapshots were left out: read on

    async def subscribe(
        self,
        after: int = 0,
        *,
        types: Collection[str | type[Message]] | None = None,
        batch_size: int = 500,
        max_wait: float = 5.0,
    ) -> AsyncIterator[StoredEvent[Any]]:
        """Every event after ``after`` in the global order, then each new one as it
        commits, forever (break out of the loop to stop). Between batches it waits in
        ``wait_for_events`` (LISTEN/NOTIFY or an in-process wake-up), reading again at
        least every ``max_wait`` seconds. ``types`` and snapshots as :meth:`read_all`."""
        types = self.type_names(types)
        position = after
        store = self.store
        while True:
            # filtered: everything up to the head read first was scanned when the batch
            # comes back short, so the next read starts there, not at the last match
            head = await store.head() if types is not None else 0
            records = await store.read_all(position, batch_size, types)
            for r in records:
                if _wanted(r, types):
                    yield self.decode(r)
                position = r.position
            if len(records) < batch_size:
                position = max(position, head)
                await store.wait_for_events(position, max_wait)


def _wanted(record: RecordedEvent, names: frozenset[str] | None) -> bool:
    """Snapshots are left out of the global order unless asked for by name."""
    return names is not None or record.type != SNAPSHOT_TYPE
