"""The in-memory checkpoint store, on :class:`MemoryTransaction`: writes become visible when
the transaction commits, with the read-model writes a test registers on the same one."""

from __future__ import annotations

from typing import Any

from msdata.adapters.memory.outbox import MemoryTransaction, _tx
from msdata.errors import ConcurrencyError, ConfigurationError, StoreError
from msdata.projections.store import check_checkpoint_name, check_position

__all__ = ["MemoryCheckpointStore"]


class MemoryCheckpointStore:
    """The in-memory :class:`msdata.projections.store.CheckpointStore` (one event loop).

    A name that another open transaction has saved cannot be waited for: ``save`` raises
    :class:`msdata.errors.ConcurrencyError` at once, as a database would once the first
    transaction commits."""

    def __init__(self) -> None:
        self._positions: dict[str, int] = {}
        self._active: dict[str, int] = {}
        self._holders: dict[str, tuple[MemoryTransaction, int]] = {}
        self._closed = False

    @classmethod
    def from_url(cls, url: str = "memory://") -> MemoryCheckpointStore:
        if not url.startswith("memory:"):
            raise ConfigurationError(f"not a memory:// URL: {url!r}")
        return cls()

    def begin(self) -> MemoryTransaction:
        return MemoryTransaction()

    def save(self, conn: Any, name: str, position: int, expected: int) -> None:
        self._check()
        tx = _tx(conn)
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
        tx = _tx(conn)
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

    def schema_sql(self) -> str:
        return ""

    async def create_schema(self) -> None:
        return None

    async def close(self) -> None:
        self._closed = True

    def _check(self) -> None:
        if self._closed:
            raise StoreError("the checkpoint store is closed")
