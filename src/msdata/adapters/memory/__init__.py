"""In-process adapters: no server, nothing survives the process. For tests, and for the
embedded default's transport."""

from msdata.adapters.memory.outbox import MemoryInboxStore, MemoryOutboxStore, MemoryTransaction
from msdata.adapters.memory.saga import MemorySagaStore
from msdata.adapters.memory.transport import MemoryDelivery, MemorySubscription, MemoryTransport

__all__ = [
    "MemoryDelivery",
    "MemoryInboxStore",
    "MemoryOutboxStore",
    "MemorySagaStore",
    "MemorySubscription",
    "MemoryTransaction",
    "MemoryTransport",
]
