"""Transactional outbox, its relay, and the inbox (idempotent consumer).

- :class:`Outbox` adds messages in the caller's own transaction.
- :class:`OutboxRelay` publishes committed rows through a transport, at least once, in
  order per partition key.
- :class:`Inbox` (from :mod:`msdata.inbox`, re-exported here) records handled message ids
  in the handler's transaction, so a redelivered message is applied once.

Stores: ``msdata.adapters.memory`` (MemoryOutboxStore, MemoryInboxStore),
``msdata.adapters.sqlite`` and ``msdata.adapters.postgres``. See ``docs/outbox.md``.
"""

from msdata.inbox import Inbox, InboxMiddleware, InboxStore
from msdata.outbox.outbox import Outbox
from msdata.outbox.relay import Backoff, OutboxRelay, PayloadCheck, exponential_backoff
from msdata.outbox.store import (
    OutboxAdminStore,
    OutboxBatch,
    OutboxRecord,
    OutboxRelayStore,
    OutboxRow,
    OutboxStatus,
    OutboxStore,
    OutboxStoreFeatures,
    OutboxWriteStore,
)
from msdata.storage import (
    DEFAULT_TABLE_PREFIX,
    TransactionFactory,
    check_table_prefix,
    current_connection,
)

__all__ = [
    "DEFAULT_TABLE_PREFIX",
    "Backoff",
    "Inbox",
    "InboxMiddleware",
    "InboxStore",
    "Outbox",
    "OutboxAdminStore",
    "OutboxBatch",
    "OutboxRecord",
    "OutboxRelay",
    "OutboxRelayStore",
    "OutboxRow",
    "OutboxStatus",
    "OutboxStore",
    "OutboxStoreFeatures",
    "OutboxWriteStore",
    "PayloadCheck",
    "TransactionFactory",
    "check_table_prefix",
    "current_connection",
    "exponential_backoff",
]
