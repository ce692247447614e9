"""The inbox: apply each delivered message once, by recording its id in the same
transaction as the handler's effects. See :class:`Inbox`; the port is
:class:`msdata.inbox.store.InboxStore`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from msdata.errors import ConfigurationError
from msdata.ids import utc_now
from msdata.inbox.store import InboxStore
from msdata.messages import Envelope, check_text
from msdata.storage import Connection, TransactionFactory, bind_connection, current_connection

__all__ = ["Inbox", "InboxMiddleware", "TransactionFactory", "current_connection"]

log = logging.getLogger("msdata.inbox")

#: The event bus's middleware type: ``async def mw(envelope, call_next) -> Any``.
InboxMiddleware = Callable[
    [Envelope[Any], Callable[[Envelope[Any]], Awaitable[Any]]], Awaitable[Any]
]


class Inbox:
    """Records which messages a consumer has applied, in the consumer's own transaction.

    Without a bus::

        with conn:                                      # one transaction
            if inbox.first_time(conn, "billing", envelope.id):
                conn.execute("UPDATE accounts ...")     # the effect, applied once
        # ack the delivery either way

    With the event bus, ``inbox.middleware("billing", transaction)`` opens the
    transaction, records the id, skips the handler for a duplicate (the bus then acks it),
    and otherwise runs the handler with the connection at :meth:`connection`.

    Records are kept for ``retention`` (``purge()`` deletes older ones): it must exceed the
    longest time in which the broker may redeliver a message, or a late redelivery is
    applied again.
    """

    def __init__(self, store: InboxStore, *, retention: timedelta = timedelta(days=7)) -> None:
        if retention <= timedelta(0):
            raise ConfigurationError("inbox retention must be positive")
        self.store = store
        self.retention = retention

    def first_time(self, conn: Connection, consumer: str, message_id: str) -> bool:
        """Record ``message_id`` for ``consumer`` on the sync connection ``conn``, in its
        open transaction. True: apply the effects in this transaction. False: a duplicate,
        skip it."""
        return self.store.record(conn, consumer, check_text("message id", message_id))

    async def first_time_async(self, conn: Connection, consumer: str, message_id: str) -> bool:
        """:meth:`first_time` on an async connection."""
        return await self.store.record_async(conn, consumer, check_text("message id", message_id))

    @staticmethod
    def connection() -> Connection:
        """The handler's connection inside :meth:`middleware` (see :func:`current_connection`)."""
        return current_connection()

    def middleware(self, consumer: str, transaction: TransactionFactory) -> InboxMiddleware:
        """Event-bus middleware that applies each message once for ``consumer``.

        For each delivery it opens ``transaction()``; with an async context manager it
        records through ``record_async``, with a sync one through ``record`` (a sync
        driver then runs on the event loop's thread: fine for SQLite, use an async driver
        for a networked database). A duplicate returns None without calling the handler.
        An exception from the handler rolls the record back with the effects, so the
        redelivery is applied.
        """
        if not consumer or not isinstance(consumer, str):
            raise ConfigurationError("the inbox needs a non-empty consumer name")
        store = self.store

        async def inbox_middleware(
            envelope: Envelope[Any], call_next: Callable[[Envelope[Any]], Awaitable[Any]]
        ) -> Any:
            cm = transaction()
            if hasattr(cm, "__aenter__"):
                async with cm as conn:  # type: ignore[union-attr]
                    if not await store.record_async(conn, consumer, envelope.id):
                        log.debug("inbox %s: skipping duplicate %s", consumer, envelope.id)
                        return None
                    with bind_connection(conn):
                        return await call_next(envelope)
            with cm as conn:
                if not store.record(conn, consumer, envelope.id):
                    log.debug("inbox %s: skipping duplicate %s", consumer, envelope.id)
                    return None
                with bind_connection(conn):
                    return await call_next(envelope)

        return inbox_middleware

    async def purge(self, older_than: timedelta | None = None) -> int:
        """Forget records older than ``older_than`` (default: the retention)."""
        return await self.store.purge(utc_now() - (older_than or self.retention))
