"""A service's transactions on the memory stores (see :class:`msdata.service.Service`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from msdata.adapters.memory._db import MemoryTransaction

__all__ = ["MemoryTransactions"]


class MemoryTransactions:
    """Each transaction a new :class:`MemoryTransaction` (committed on normal exit)."""

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[Any]:
        with MemoryTransaction() as tx:
            yield tx

    async def close(self) -> None:
        return None
