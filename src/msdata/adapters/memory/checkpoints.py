"""The in-memory checkpoint store, on :class:`MemoryTransaction`: writes become visible when
the transaction commits, with the read-model writes a test registers on the same one."""

from __future__ import annotations

from typing import Any

from msdata.adapters.memory._db import MemoryDatabase, MemoryTransaction, transaction_of
from msdata.clock import SYSTEM_CLOCK, Clock
from msdata.errors import ConcurrencyError, StoreError
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
        self._holders: dict[str, tuple[MemoryTransaction, int]] = {}

    def save(self, conn: Any, name: str, position: int, expected: int) -> None:
        self._check()
        tx = transaction_of(conn)
        check_checkpoint_name(name)
        check_position("position", position)
        check_position("expected", expected)
        holder = self._holders.get(name)
        if holder is not None and holder[0] is not tx:
            raise ConcurrencyError(
                f"checkpoint {name} (another open transaction is saving it)", expected, None
            )
        current = holder[1] if holder is not None else self._positions.get(name, 0)
        if current != expected:
            raise ConcurrencyError(f"checkpoint {name}", expected, current)
        self._holders[name] = (tx, position)

        def commit() -> None:
            self._positions[name] = position

        tx.on_commit(commit)
        if holder is None:
            tx.on_end(lambda: self._release(name))

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

    def _release(self, name: str) -> None:
        self._holders.pop(name, None)

    def _check(self) -> None:
        if self.closed:
            raise StoreError("the checkpoint store is closed")
