"""The in-memory checkpoint store, on :class:`MemoryTransaction`: writes become visible when
the transaction commits, with the read-model writes a test registers on the same one."""

from __future__ import annotations

from typing import Any

from msdata.adapters.memory._db import HeldValues, MemoryDatabase, transaction_of
from msdata.clock import SYSTEM_CLOCK, Clock
from msdata.errors import StoreError
from msdata.projections.store import check_checkpoint_name, check_position

__all__ = ["MemoryCheckpointStore"]


class MemoryCheckpointStore(MemoryDatabase):
    """The in-memory :class:`msdata.projections.store.CheckpointStore` (one event loop).

    A name that another open transaction has saved cannot be waited for: ``save`` raises
    :class:`msdata.errors.ConcurrencyError` at once, as a database would once the first
    transaction commits."""

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(clock=clock)
        self._positions: dict[str, int] = {}
        self._active: dict[str, int] = {}
        self._held = HeldValues()

    def save(self, conn: Any, name: str, position: int, expected: int) -> None:
        self._check()
        tx = transaction_of(conn)
        check_checkpoint_name(name)
        check_position("position", position)
        check_position("expected", expected)
        committed = self._positions.get(name, 0)
        self._held.check(tx, name, committed, expected, f"checkpoint {name}", "saving it")
        self._held.hold(tx, name, position)

        def commit() -> None:
            self._positions[name] = position

        tx.on_commit(commit)

    async def save_async(self, conn: Any, name: str, position: int, expected: int) -> None:
        self.save(conn, name, position, expected)

    async def load(self, name: str) -> int:
        self._check()
        return self._positions.get(name, 0)

    def activate(self, conn: Any, projection: str, generation: int) -> None:
        self._check()
        tx = transaction_of(conn)
        check_checkpoint_name(projection)
        check_position("generation", generation)

        def commit() -> None:
            self._active[projection] = generation

        tx.on_commit(commit)

    async def activate_async(self, conn: Any, projection: str, generation: int) -> None:
        self.activate(conn, projection, generation)

    async def active(self, projection: str) -> int:
        self._check()
        return self._active.get(projection, 0)

    def _check(self) -> None:
        if self.closed:
            raise StoreError("the checkpoint store is closed")
