"""The inbox store port: which messages a consumer has already applied.

Implemented by ``msdata.adapters.memory``, ``msdata.adapters.sqlite`` and
``msdata.adapters.postgres``; checked by the conformance suite in
:mod:`msdata.testing.conformance.inbox`. The write side follows the caller's-transaction
contract of :mod:`msdata.storage`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from msdata.storage import Connection

__all__ = ["InboxStore", "InboxStoreFeatures"]


@dataclass(frozen=True, slots=True)
class InboxStoreFeatures:
    """What an inbox store can do (``store.features``); the conformance suite reads it."""

    #: the store stamps records with the time of the ``clock`` it was given, so a
    #: :class:`msdata.testing.FakeClock` drives ``purge``. False: another clock (the
    #: PostgreSQL server's)
    reads_clock: bool = True


@runtime_checkable
class InboxStore(Protocol):
    """Which messages a consumer has already applied.

    ``record``/``record_async`` run inside the caller's open transaction, on the caller's
    connection, together with the handler's effects: they insert (consumer, message_id) and
    return True, or return False if that pair is already there (then the caller skips the
    handler and acks). A concurrent duplicate either blocks until the first transaction ends
    and then returns False, or raises; it never returns True twice for one committed pair.
    """

    @property
    def features(self) -> InboxStoreFeatures: ...

    def record(self, conn: Connection, consumer: str, message_id: str) -> bool: ...

    async def record_async(self, conn: Connection, consumer: str, message_id: str) -> bool: ...

    def schema_sql(self) -> str:
        """The DDL ``create_schema`` runs (empty for stores without SQL)."""
        ...

    async def create_schema(self) -> None: ...

    async def purge(self, older_than: datetime) -> int:
        """Forget records made before ``older_than``. The window kept must exceed the
        longest time in which the broker may redeliver a message."""
        ...

    async def close(self) -> None: ...
