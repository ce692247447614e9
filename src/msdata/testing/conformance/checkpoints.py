"""Conformance suite for the checkpoint store port, run on every backend.

Hooks (as for :mod:`msdata.testing.conformance.eventstore`): ``make_checkpoint_store()``
(async context manager, a fresh store with its schema), ``begin(store)``, ``commit(tx)``,
``rollback(tx)``, and ``save(store, tx, name, position, expected)`` /
``activate(store, tx, projection, generation)`` calling the store's sync or async write on
``tx``'s connection (they may block until a concurrent transaction ends)."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from msdata.errors import ConcurrencyError, ConfigurationError
from msdata.projections.store import CheckpointStore

__all__ = ["CheckpointStoreConformance"]


def _name() -> str:
    return f"p-{uuid.uuid4().hex[:8]}"


class CheckpointStoreConformance:
    """Every test here must pass on every checkpoint store."""

    # -- hooks -----------------------------------------------------------------------------

    def make_checkpoint_store(self) -> AbstractAsyncContextManager[CheckpointStore]:
        raise NotImplementedError

    async def begin(self, store: Any) -> Any:
        raise NotImplementedError

    async def commit(self, tx: Any) -> None:
        raise NotImplementedError

    async def rollback(self, tx: Any) -> None:
        raise NotImplementedError

    async def save(self, store: Any, tx: Any, name: str, position: int, expected: int) -> None:
        raise NotImplementedError

    async def activate(self, store: Any, tx: Any, projection: str, generation: int) -> None:
        raise NotImplementedError

    async def saved(self, store: Any, name: str, position: int, expected: int) -> None:
        tx = await self.begin(store)
        try:
            await self.save(store, tx, name, position, expected)
        except BaseException:
            await self.rollback(tx)
            raise
        await self.commit(tx)

    # -- tests -----------------------------------------------------------------------------

    async def test_unknown_name_is_at_zero(self) -> None:
        async with self.make_checkpoint_store() as store:
            await store.create_schema()  # idempotent
            assert await store.load(_name()) == 0
            assert await store.active(_name()) == 0

    async def test_a_saved_checkpoint_is_loaded_after_commit_only(self) -> None:
        async with self.make_checkpoint_store() as store:
            name = _name()
            tx = await self.begin(store)
            await self.save(store, tx, name, 7, 0)
            assert await store.load(name) == 0
            await self.commit(tx)
            assert await store.load(name) == 7
            await self.saved(store, name, 12, 7)
            assert await store.load(name) == 12

    async def test_a_rolled_back_save_leaves_the_old_position(self) -> None:
        async with self.make_checkpoint_store() as store:
            name = _name()
            await self.saved(store, name, 5, 0)
            tx = await self.begin(store)
            await self.save(store, tx, name, 9, 5)
            await self.rollback(tx)
            assert await store.load(name) == 5

    async def test_save_is_a_compare_and_set(self) -> None:
        async with self.make_checkpoint_store() as store:
            name = _name()
            await self.saved(store, name, 5, 0)
            for stale in (0, 4, 6):
                with pytest.raises(ConcurrencyError) as info:
                    await self.saved(store, name, 9, stale)
                assert name in info.value.name
                assert info.value.expected == stale and info.value.actual == 5
            assert await store.load(name) == 5
            other = _name()
            with pytest.raises(ConcurrencyError):
                await self.saved(store, other, 3, 2)
            assert await store.load(other) == 0

    async def test_concurrent_saves_with_one_expected_position_one_wins(self) -> None:
        async with self.make_checkpoint_store() as store:
            name = _name()
            await self.saved(store, name, 1, 0)
            t1 = await self.begin(store)
            t2 = await self.begin(store)
            try:
                await self.save(store, t1, name, 10, 1)
                second = asyncio.ensure_future(self.save(store, t2, name, 20, 1))
                await asyncio.sleep(0.05)
                await self.commit(t1)
                with pytest.raises(ConcurrencyError):
                    await second
            finally:
                await self.rollback(t2)
            assert await store.load(name) == 10

    async def test_names_are_independent(self) -> None:
        async with self.make_checkpoint_store() as store:
            a, b = _name(), _name()
            await self.saved(store, a, 3, 0)
            await self.saved(store, b, 8, 0)
            assert (await store.load(a), await store.load(b)) == (3, 8)

    async def test_activate_commits_with_the_transaction(self) -> None:
        async with self.make_checkpoint_store() as store:
            p = _name()
            tx = await self.begin(store)
            await self.activate(store, tx, p, 1)
            assert await store.active(p) == 0
            await self.commit(tx)
            assert await store.active(p) == 1
            tx = await self.begin(store)
            await self.activate(store, tx, p, 2)
            await self.rollback(tx)
            assert await store.active(p) == 1
            tx = await self.begin(store)
            await self.activate(store, tx, p, 2)
            await self.commit(tx)
            assert await store.active(p) == 2

    async def test_bad_arguments_are_refused(self) -> None:
        async with self.make_checkpoint_store() as store:
            tx = await self.begin(store)
            try:
                with pytest.raises(ConfigurationError):
                    await self.save(store, tx, "", 1, 0)
                with pytest.raises(ConfigurationError):
                    await self.save(store, tx, _name(), -1, 0)
            finally:
                await self.rollback(tx)
