"""The inbox store conformance suite: every inbox store must pass it.

Subclass :class:`InboxStoreConformance` once per backend::

    class TestMyInboxStore(InboxStoreConformance):
        @asynccontextmanager
        async def make_inbox_store(self, *, clock: Clock = SYSTEM_CLOCK) -> AsyncIterator[Any]:
            store = MyInboxStore(..., table_prefix=f"t{uuid.uuid4().hex[:8]}_", clock=clock)
            await store.create_schema()
            try:
                yield store
            finally:
                await store.close()

        async def begin(self, store: Any) -> Any: ...      # a business transaction
        async def commit(self, tx: Any) -> None: ...
        async def rollback(self, tx: Any) -> None: ...
        async def record(self, store: Any, tx: Any, consumer: str, message_id: str) -> bool:
            return await store.record_async(tx, consumer, message_id)

Hooks: ``make_inbox_store_without_schema()`` (optional: a store whose table was never
created); ``make_inbox_store(clock=SYSTEM_CLOCK)`` (a fresh, empty store with its schema
created, reading time from ``clock`` unless its ``features.reads_clock`` is False);
``begin(store)``, ``commit(tx)``, ``rollback(tx)`` (as for the outbox suite, so one
backend class can serve both); ``record(store, tx, consumer, message_id)``
(``store.record``/``record_async`` on ``tx``'s connection; it may block until a concurrent
transaction ends, so run a sync driver in a thread, or raise). Needs pytest and
pytest-asyncio.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from msdata.clock import SYSTEM_CLOCK, Clock
from msdata.errors import ConfigurationError, MsdataError, SchemaError
from msdata.inbox.store import InboxStore, InboxStoreFeatures
from msdata.testing.conformance.outbox import NoTransactionHook, StoreTime, each_refused
from msdata.testing.fakes import FakeClock

__all__ = ["InboxStoreConformance"]


class InboxStoreConformance(NoTransactionHook):
    """Every test here must pass on every inbox store."""

    # -- hooks -----------------------------------------------------------------------------

    def make_inbox_store(
        self, *, clock: Clock = SYSTEM_CLOCK
    ) -> AbstractAsyncContextManager[InboxStore]:
        raise NotImplementedError

    async def begin(self, store: Any) -> Any:
        raise NotImplementedError

    async def commit(self, tx: Any) -> None:
        raise NotImplementedError

    async def rollback(self, tx: Any) -> None:
        raise NotImplementedError

    async def record(self, store: Any, tx: Any, consumer: str, message_id: str) -> bool:
        raise NotImplementedError

    def make_inbox_store_without_schema(self) -> AbstractAsyncContextManager[Any]:
        """Optional: a store whose table was never created (else that test is skipped)."""
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------

    @asynccontextmanager
    async def timed_inbox_store(self) -> AsyncIterator[tuple[Any, StoreTime]]:
        """An inbox store on a fake clock (starting now) and the time it reads."""
        clock = FakeClock(datetime.now(UTC))
        async with self.make_inbox_store(clock=clock) as store:
            yield store, StoreTime(clock if store.features.reads_clock else None)

    async def apply_once(
        self,
        store: Any,
        consumer: str,
        message_id: str,
        applied: list[str],
        effect: Callable[[], Awaitable[None]] | None = None,
    ) -> bool:
        """One delivery: record and, the first time, 'apply' (appended at commit)."""
        tx = await self.begin(store)
        try:
            first = await self.record(store, tx, consumer, message_id)
            if first and effect is not None:
                await effect()
        except BaseException:
            await self.rollback(tx)
            raise
        await self.commit(tx)
        if first:
            applied.append(message_id)
        return first

    # -- tests -----------------------------------------------------------------------------

    async def test_the_store_satisfies_the_port(self) -> None:
        async with self.make_inbox_store() as store:
            assert isinstance(store, InboxStore)
            assert isinstance(store.features, InboxStoreFeatures)

    async def test_a_connection_with_no_open_transaction_is_refused(self) -> None:
        async with self.make_inbox_store() as store:
            mid = str(uuid.uuid4())

            async def write(conn: Any, is_async: bool) -> None:
                if is_async:
                    await store.record_async(conn, "billing", mid)
                else:
                    store.record(conn, "billing", mid)

            await each_refused(self, store, write)
            # nothing was recorded: the first real delivery is applied
            assert await self.apply_once(store, "billing", mid, []) is True

    async def test_inbox_create_schema_is_idempotent(self) -> None:
        async with self.make_inbox_store() as store:
            mid = str(uuid.uuid4())
            assert await self.apply_once(store, "billing", mid, []) is True
            await store.create_schema()
            await store.create_schema()
            # the records survive it
            assert await self.apply_once(store, "billing", mid, []) is False

    async def test_a_missing_table_raises_schema_error(self) -> None:
        try:
            cm = self.make_inbox_store_without_schema()
        except NotImplementedError:
            pytest.skip("no fault injection for this store")
        async with cm as store:
            with pytest.raises(SchemaError):
                await store.purge(datetime.now(UTC))
            tx = await self.begin(store)
            try:
                with pytest.raises(SchemaError):
                    await self.record(store, tx, "billing", "m-1")
            finally:
                await self.rollback(tx)

    async def test_a_connection_of_another_kind_is_refused(self) -> None:
        async with self.make_inbox_store() as store:
            with pytest.raises(ConfigurationError):
                store.record(object(), "billing", "m-1")
            with pytest.raises(ConfigurationError):
                await store.record_async(object(), "billing", "m-1")

    async def test_duplicate_is_applied_once(self) -> None:
        async with self.make_inbox_store() as store:
            applied: list[str] = []
            mid = str(uuid.uuid4())
            assert await self.apply_once(store, "billing", mid, applied) is True
            assert await self.apply_once(store, "billing", mid, applied) is False
            assert await self.apply_once(store, "billing", mid, applied) is False
            assert applied == [mid]

    async def test_consumers_are_independent(self) -> None:
        async with self.make_inbox_store() as store:
            applied: list[str] = []
            mid = str(uuid.uuid4())
            assert await self.apply_once(store, "billing", mid, applied)
            assert await self.apply_once(store, "shipping", mid, applied)
            assert await self.apply_once(store, "billing", str(uuid.uuid4()), applied)

    async def test_rolled_back_record_is_forgotten(self) -> None:
        async with self.make_inbox_store() as store:
            mid = str(uuid.uuid4())
            tx = await self.begin(store)
            assert await self.record(store, tx, "billing", mid) is True
            await self.rollback(tx)
            applied: list[str] = []
            assert await self.apply_once(store, "billing", mid, applied) is True

    @pytest.mark.parametrize("first_ends", ["commit", "rollback"])
    async def test_concurrent_duplicate_is_never_applied_twice(self, first_ends: str) -> None:
        async with self.make_inbox_store() as store:
            mid = str(uuid.uuid4())
            committed_true = 0
            t1 = await self.begin(store)
            assert await self.record(store, t1, "billing", mid) is True
            t2 = await self.begin(store)
            second = asyncio.create_task(self.record(store, t2, "billing", mid))
            await asyncio.sleep(0.2)  # the second record is under way (or refused)
            if first_ends == "commit":
                await self.commit(t1)
                committed_true += 1
            else:
                await self.rollback(t1)
            try:
                r2: bool | None = await asyncio.wait_for(second, 30.0)
            except MsdataError:
                r2 = None  # the store refused the concurrent duplicate: the bus nacks it
            if r2:
                await self.commit(t2)
                committed_true += 1
            else:
                await self.rollback(t2)
            # after a refusal (r2 is None), the redelivery
            if r2 is None and await self.apply_once(store, "billing", mid, []):
                committed_true += 1
            if first_ends == "commit":
                assert committed_true == 1 and r2 is not True
            else:
                assert committed_true == 1

    async def test_purge_forgets_old_records_only(self) -> None:
        async with self.timed_inbox_store() as (store, time):
            old, new = str(uuid.uuid4()), str(uuid.uuid4())
            await self.apply_once(store, "billing", old, [])
            await time.pass_(0.3)
            cut = time.now()
            await time.pass_(0.05)
            await self.apply_once(store, "billing", new, [])
            assert await store.purge(cut - timedelta(hours=1)) == 0
            assert await store.purge(cut) == 1
            assert await self.apply_once(store, "billing", old, []) is True
            assert await self.apply_once(store, "billing", new, []) is False
