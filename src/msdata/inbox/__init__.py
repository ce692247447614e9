"""The inbox (idempotent consumer): apply each delivered message once.

- :class:`Inbox` records handled message ids in the handler's own transaction (by hand with
  ``first_time``, or for the event bus with ``middleware``), so a redelivered message has
  its effect once.
- :class:`InboxStore` is the port (``store.py``); stores: ``msdata.adapters.memory``
  (MemoryInboxStore), ``msdata.adapters.sqlite`` (SqliteInboxStore) and
  ``msdata.adapters.postgres`` (PostgresInboxStore). See ``docs/outbox.md``.
"""

from msdata.inbox.inbox import Inbox, InboxMiddleware
from msdata.inbox.store import InboxStore, InboxStoreFeatures
from msdata.storage import TransactionFactory, current_connection

__all__ = [
    "Inbox",
    "InboxMiddleware",
    "InboxStore",
    "InboxStoreFeatures",
    "TransactionFactory",
    "current_connection",
]
