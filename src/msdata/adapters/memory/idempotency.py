"""The in-memory idempotency store: a dict, for tests and single-process demos.

``conn`` is None (each call takes effect at once) or a
:class:`msdata.adapters.memory.MemoryTransaction`: the change takes effect at once (so a
concurrent claim of the same key sees IN_PROGRESS, as it would see a row lock) and is
undone if that transaction rolls back.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from msdata.adapters.memory._db import MemoryDatabase, MemoryTransaction, transaction_of
from msdata.idempotency.store import (
    IdempotencyRecord,
    IdempotencyStoreFeatures,
    LiveRecord,
    TokenFactory,
    check_purge_time,
)
from msdata.storage import from_unix_us as _dt

__all__ = ["MemoryIdempotencyStore"]

_Key = tuple[str, str]


class MemoryIdempotencyStore(MemoryDatabase):
    """The :class:`msdata.idempotency.IdempotencyStore` in a dict (one process, one loop).

    Unlike the other memory stores, a change made in a transaction is visible at once (and
    undone at rollback) rather than staged until commit: two transactions claiming one key
    must not both see it free, as a database's row lock ensures."""

    features = IdempotencyStoreFeatures(
        joins_transaction=True, sync=True, sync_own_transaction=True
    )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._records: dict[_Key, IdempotencyRecord] = {}
        self._before: dict[int, dict[_Key, IdempotencyRecord | None]] = {}

    def _write(self, conn: Any, k: _Key, new: IdempotencyRecord | None) -> None:
        if conn is not None:
            self._remember(transaction_of(conn), k)
        if new is None:
            self._records.pop(k, None)
        else:
            self._records[k] = new

    def _remember(self, conn: MemoryTransaction, k: _Key) -> None:
        """Keep the value ``k`` had before ``conn`` first changed it, to put back if
        ``conn`` rolls back."""
        before = self._before.get(id(conn))
        if before is None:
            before = self._before[id(conn)] = {}
            committed = False

            def commit() -> None:
                nonlocal committed
                committed = True

            def end() -> None:
                saved = self._before.pop(id(conn), {})
                if committed:
                    return
                for key, value in saved.items():
                    if value is None:
                        self._records.pop(key, None)
                    else:
                        self._records[key] = value

            conn.on_commit(commit)
            conn.on_end(end)
        if k not in before:
            before[k] = self._records.get(k)

    def claim(
        self,
        conn: Any,
        scope: str,
        key: str,
        fingerprint: str,
        now_us: int,
        until_us: int,
        new_token: TokenFactory,
    ) -> str | LiveRecord:
        k = (scope, key)
        cur = self._records.get(k)
        if cur is not None and cur.expires_at > _dt(now_us):
            return (cur.fingerprint, cur.completed, cur.response, cur.token)
        token = new_token()
        self._write(
            conn, k, IdempotencyRecord(scope, key, fingerprint, False, _dt(until_us), token)
        )
        return token

    def complete(
        self, conn: Any, scope: str, key: str, token: str, response: bytes, until_us: int
    ) -> bool:
        k = (scope, key)
        cur = self._records.get(k)
        if cur is None or cur.token != token:
            return False
        done = cur._replace(completed=True, expires_at=_dt(until_us), response=response)
        self._write(conn, k, done)
        return True

    def release(self, conn: Any, scope: str, key: str, token: str) -> bool:
        k = (scope, key)
        cur = self._records.get(k)
        if cur is None or cur.token != token:
            return False
        self._write(conn, k, None)
        return True

    async def claim_async(
        self,
        conn: Any,
        scope: str,
        key: str,
        fingerprint: str,
        now_us: int,
        until_us: int,
        new_token: TokenFactory,
    ) -> str | LiveRecord:
        return self.claim(conn, scope, key, fingerprint, now_us, until_us, new_token)

    async def complete_async(
        self, conn: Any, scope: str, key: str, token: str, response: bytes, until_us: int
    ) -> bool:
        return self.complete(conn, scope, key, token, response, until_us)

    async def release_async(self, conn: Any, scope: str, key: str, token: str) -> bool:
        return self.release(conn, scope, key, token)

    async def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        return self._records.get((scope, key))

    async def purge(self, now: datetime) -> int:
        check_purge_time(now)
        gone = [k for k, r in self._records.items() if r.expires_at <= now]
        for k in gone:
            del self._records[k]
        return len(gone)
