"""The hooks every suite of a port that writes in the caller's transaction declares (outbox,
inbox, event store, checkpoints, idempotency keys): a test subclass implements them for its
backend."""

from __future__ import annotations

from typing import Any

__all__ = ["TransactionHooks"]


class TransactionHooks:
    """``begin(store)``: a transaction on the store's backend, open (a connection,
    session or handle that the store's write side takes as its caller's connection);
    ``commit(tx)`` / ``rollback(tx)``: end it, closing what ``begin`` opened."""

    async def begin(self, store: Any) -> Any:
        raise NotImplementedError

    async def commit(self, tx: Any) -> None:
        raise NotImplementedError

    async def rollback(self, tx: Any) -> None:
        raise NotImplementedError
