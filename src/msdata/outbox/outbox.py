"""Adding messages to the outbox inside the caller's own transaction."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from msdata import telemetry
from msdata.messages import (
    Envelope,
    Message,
    MessageRegistry,
    build_envelope,
    current_envelope,
    default_registry,
    make_envelope,
    message_list,
)
from msdata.outbox.store import OutboxRow, OutboxWriteStore
from msdata.serialization import CloudEventsCodec
from msdata.transport import check_name

__all__ = ["Outbox"]

MessageOrEnvelope = Message | Envelope[Any]

_tuple_new = tuple.__new__


class Outbox:
    """Writes messages into the outbox table in the caller's open transaction, so they
    commit or roll back with the business data; an :class:`msdata.outbox.OutboxRelay`
    publishes them after the commit::

        outbox = Outbox(store, source="orders")
        with sqlite3.connect("orders.db") as conn:            # commits on exit
            conn.execute("INSERT INTO orders ...")
            outbox.add(conn, OrderPlaced(order_id="42"), key="42")

    ``add`` takes a sync connection (sqlite3, psycopg, SQLAlchemy ``Session``/
    ``Connection``), ``add_async`` an async one (psycopg ``AsyncConnection``, asyncpg,
    SQLAlchemy ``AsyncSession``); which drivers a store serves is the store's business.

    Each message is wrapped with :func:`msdata.messages.make_envelope` (so correlation and
    causation come from the message being handled in this task) and encoded as CloudEvents
    JSON. Its topic defaults to its registered type name, where the event bus subscribes;
    ``key`` is the partition key the relay keeps order by (e.g. the aggregate id);
    ``aggregate_type`` (a column for Debezium's outbox router) defaults to the topic.
    Returns the envelopes written, in order.
    """

    def __init__(
        self,
        store: OutboxWriteStore,
        *,
        codec: CloudEventsCodec | None = None,
        registry: MessageRegistry | None = None,
        source: str = "msdata",
    ) -> None:
        self.store = store
        self.registry = registry or (codec.registry if codec is not None else default_registry)
        self.codec = codec or CloudEventsCodec(self.registry)
        self.source = source
        self._topics: set[str] = set()
        # classes seen to be Message subclasses: one set lookup says "one message" (the
        # usual call) where ``message_list``'s isinstance tests cost ~0.4 us
        self._message_classes: set[type[Any]] = set()
        # ``envelope`` as defined here (a subclass may override it: then it is called)
        self._own_envelope = type(self).envelope is Outbox.envelope

    def add(
        self,
        conn: Any,
        messages: MessageOrEnvelope | Iterable[MessageOrEnvelope],
        *,
        topic: str | None = None,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        aggregate_type: str | None = None,
    ) -> list[Envelope[Any]]:
        """Add one or more messages on the sync connection ``conn``, inside its open
        transaction. Never commits."""
        if type(messages) in self._message_classes and self._own_envelope and self.source:
            # the usual call: one message of a class seen before (see ``_one``)
            env, row = self._one(messages, topic, key, headers, aggregate_type)
            self.store.append(conn, [row])
            return [env]
        envelopes, rows = self._rows(messages, topic, key, headers, aggregate_type)
        self.store.append(conn, rows)
        return envelopes

    async def add_async(
        self,
        conn: Any,
        messages: MessageOrEnvelope | Iterable[MessageOrEnvelope],
        *,
        topic: str | None = None,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        aggregate_type: str | None = None,
    ) -> list[Envelope[Any]]:
        """Add one or more messages on the async connection ``conn``, inside its open
        transaction. Never commits."""
        if type(messages) in self._message_classes and self._own_envelope and self.source:
            # the usual call: one message of a class seen before (see ``_one``)
            env, row = self._one(messages, topic, key, headers, aggregate_type)
            await self.store.append_async(conn, [row])
            return [env]
        envelopes, rows = self._rows(messages, topic, key, headers, aggregate_type)
        await self.store.append_async(conn, rows)
        return envelopes

    def envelope(
        self,
        message: MessageOrEnvelope,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Envelope[Any]:
        """The envelope ``add`` would write for ``message``."""
        if isinstance(message, Envelope):
            if key is not None and message.partition_key != key:
                return message._replace(partition_key=key)
            return message
        return make_envelope(
            message,
            registry=self.registry,
            partition_key=key,
            headers=headers,
            source=self.source,
        )

    def _one(
        self,
        message: Any,
        topic: str | None,
        key: str | None,
        headers: Mapping[str, str] | None,
        aggregate_type: str | None,
    ) -> tuple[Envelope[Any], OutboxRow]:
        """The envelope and row of one message of a class known to be a Message, when
        ``envelope`` is not overridden and the source is set: ``make_envelope``'s own steps
        (registry name, :func:`build_envelope` with the handled message as parent) and the
        loop body of ``_rows``, without the loop."""
        type_name, version = self.registry.name_of(type(message))
        env = build_envelope(
            message, type_name, version, key, headers, self.source, None, current_envelope()
        )
        to = topic or type_name
        if to not in self._topics:
            # a bad topic fails here, in the caller's code, not later in the relay
            self._topics.add(check_name("topic", to))
        env = telemetry.hooks.message_created(to, env, outbox=True)  # telemetry: trace context
        # (id, type, partition_key, headers of the envelope the hook returned)
        row = (env[3], to, env[1], self.codec.encode(env), env[8], aggregate_type or to, env[9])
        return env, _tuple_new(OutboxRow, row)

    def _rows(
        self,
        messages: MessageOrEnvelope | Iterable[MessageOrEnvelope],
        topic: str | None,
        key: str | None,
        headers: Mapping[str, str] | None,
        aggregate_type: str | None,
    ) -> tuple[list[Envelope[Any]], list[OutboxRow]]:
        envelopes: list[Envelope[Any]] = []
        rows: list[OutboxRow] = []
        encode = self.codec.encode
        topics = self._topics
        # classes seen to be messages get their envelope built as ``_one`` does (an
        # overridden ``envelope`` is called; make_envelope raises for an empty source)
        direct = self._own_envelope and bool(self.source)
        classes = self._message_classes
        for item in message_list(messages):
            if direct and type(item) in classes:
                type_name, version = self.registry.name_of(type(item))
                env = build_envelope(
                    item, type_name, version, key, headers, self.source, None, current_envelope()
                )
            else:
                env = self.envelope(item, key=key, headers=headers)
                if isinstance(item, Message):
                    classes.add(type(item))
            to = topic or env.type
            if to not in topics:
                # a bad topic fails here, in the caller's code, not later in the relay
                topics.add(check_name("topic", to))
            env = telemetry.hooks.message_created(to, env, outbox=True)  # telemetry: trace context
            envelopes.append(env)
            rows.append(
                _tuple_new(
                    OutboxRow,
                    (
                        env.id,
                        to,
                        env.type,
                        encode(env),
                        env.partition_key,
                        aggregate_type or to,
                        env.headers,
                    ),
                )
            )
        return envelopes, rows
