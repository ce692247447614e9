"""In-process adapters: no server, nothing survives the process. For tests, and for the
embedded default's transport.

Stores, one module per port on ``_db.py`` (:class:`MemoryTransaction`, the ``conn`` every
memory store takes): :class:`MemoryOutboxStore` (``outbox.py``), :class:`MemoryInboxStore`
(``inbox.py``), :class:`MemoryEventStore` (``eventstore.py``), :class:`MemoryCheckpointStore`
(``checkpoints.py``), :class:`MemoryIdempotencyStore` (``idempotency.py``),
:class:`MemorySagaStore` (``saga.py``). Transport: :class:`MemoryTransport`.
"""

from msdata.adapters.memory._db import MemoryTransaction
from msdata.adapters.memory.checkpoints import MemoryCheckpointStore
from msdata.adapters.memory.eventstore import MemoryEventStore
from msdata.adapters.memory.idempotency import MemoryIdempotencyStore
from msdata.adapters.memory.inbox import MemoryInboxStore
from msdata.adapters.memory.outbox import MemoryOutboxStore
from msdata.adapters.memory.saga import MemorySagaStore
from msdata.adapters.memory.transport import MemoryDelivery, MemorySubscription, MemoryTransport

__all__ = [
    "MemoryCheckpointStore",
    "MemoryDelivery",
    "MemoryEventStore",
    "MemoryIdempotencyStore",
    "MemoryInboxStore",
    "MemoryOutboxStore",
    "MemorySagaStore",
    "MemorySubscription",
    "MemoryTransaction",
    "MemoryTransport",
]
