"""Event store: append events to streams with an expected version, read a stream or the
global order, follow it live; aggregates with snapshots. See docs/eventstore.md."""

from msdata.eventstore.aggregate import Aggregate, AggregateRepository, Snapshot
from msdata.eventstore.log import AppendResult, EventLog, StoredEvent
from msdata.eventstore.store import Backlog, EventStore, NewEvent, RecordedEvent

__all__ = [
    "Aggregate",
    "AggregateRepository",
    "AppendResult",
    "Backlog",
    "EventLog",
    "EventStore",
    "NewEvent",
    "RecordedEvent",
    "Snapshot",
    "StoredEvent",
]
