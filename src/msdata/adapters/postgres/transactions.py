"""A service's transactions on its PostgreSQL database (see :class:`msdata.service.Service`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from msdata.adapters.postgres._db import check_schema, map_errors, normalize_url

__all__ = ["PostgresTransactions"]


class PostgresTransactions:
    """An asyncpg pool of at most ``size`` connections, made on first use (with
    ``search_path`` set to ``schema`` when given); each transaction is one pooled connection
    with ``conn.transaction()``."""

    def __init__(self, dsn: str, size: int = 10, schema: str | None = None) -> None:
        self.dsn = dsn
        self.size = size
        self.schema = check_schema(schema)
        self._pool: Any = None
        self._pool_lock = asyncio.Lock()

    async def pool(self) -> Any:
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    with map_errors("cannot connect to PostgreSQL"):
                        self._pool = await asyncpg.create_pool(
                            normalize_url(self.dsn),
                            min_size=1,
                            max_size=self.size,
                            server_settings=(
                                {"search_path": f'"{self.schema}"'} if self.schema else None
                            ),
                        )
        return self._pool

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[Any]:
        pool = await self.pool()
        async with pool.acquire() as conn, conn.transaction():
            yield conn

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
