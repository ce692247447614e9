from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from msdata.adapters.memory import MemoryCheckpointStore, MemoryEventStore, MemoryTransaction
from msdata.eventstore import EventStore, NewEvent
from msdata.projections import CheckpointStore
from msdata.testing.conformance.checkpoints import CheckpointStoreConformance
from msdata.testing.conformance.eventstore import EventStoreConformance
from msdata.urls import store_from_url


class MemoryHooks:
    async def begin(self, store: Any) -> MemoryTransaction:
        return MemoryTransaction()

    async def commit(self, tx: MemoryTransaction) -> None:
        tx.commit()

    async def rollback(self, tx: MemoryTransaction) -> None:
        tx.rollback()


class TestMemoryEventStore(MemoryHooks, EventStoreConformance):
    @asynccontextmanager
    async def make_store(self) -> AsyncIterator[EventStore]:
        store = MemoryEventStore()
        yield store
        await store.close()

    async def append(
        self, store: Any, tx: Any, stream_id: str, expected: int, events: Sequence[NewEvent]
    ) -> int:
        result: int = await store.append_async(tx, stream_id, expected, events)
        return result


class TestMemoryCheckpointStore(MemoryHooks, CheckpointStoreConformance):
    @asynccontextmanager
    async def make_checkpoint_store(self) -> AsyncIterator[CheckpointStore]:
        store = MemoryCheckpointStore()
        yield store
        await store.close()

    async def save(self, store: Any, tx: Any, name: str, position: int, expected: int) -> None:
        store.save(tx, name, position, expected)

    async def activate(self, store: Any, tx: Any, projection: str, generation: int) -> None:
        store.activate(tx, projection, generation)


@pytest.mark.parametrize(
    ("url", "port", "cls"),
    [
        ("memory://", "eventstore", "MemoryEventStore"),
        ("memory://", "checkpoints", "MemoryCheckpointStore"),
        ("sqlite:///{tmp}/a.db", "eventstore", "SqliteEventStore"),
        ("sqlite:///{tmp}/a.db", "checkpoints", "SqliteCheckpointStore"),
        ("postgresql://u@127.0.0.1:1/db", "eventstore", "PostgresEventStore"),
        ("postgresql://u@127.0.0.1:1/db", "checkpoints", "PostgresCheckpointStore"),
    ],
)
async def test_store_from_url_knows_both_ports(
    url: str, port: str, cls: str, tmp_path: Path
) -> None:
    options = {} if url.startswith("memory") else {"table_prefix": "x_"}
    store = store_from_url(port, url.format(tmp=tmp_path), **options)
    assert type(store).__name__ == cls
    await store.close()
