"""The conformance suite of the idempotency store port, run on every backend.

Subclass once per backend::

    class TestMyIdempotencyStore(IdempotencyStoreConformance):
        @asynccontextmanager
        async def make_store(self) -> AsyncIterator[IdempotencyStore]:
            store = MyIdempotencyStore(..., table_prefix=f"t{uuid.uuid4().hex[:8]}_")
            await store.create_schema()
            try:
                yield store
            finally:
                await store.close()          # and drop its tables

        # only where store.features.joins_transaction:
        async def begin(self, store): ...    # a connection with an open transaction
        async def commit(self, conn): ...
        async def rollback(self, conn): ...
        async def idle_connection(self, store): ...  # a connection with NO open transaction
        async def close_connection(self, conn): ...

The store calls are made with explicit times (the store compares the ``now`` it is given),
and the tests of :class:`msdata.idempotency.IdempotencyKeys` over the store use a
:class:`msdata.testing.FakeClock`: expiry is checked exactly, nothing sleeps.
Needs pytest and pytest-asyncio (``asyncio_mode = "auto"``).
"""

from __future__ import annotations

import asyncio
import uuid
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, cast

import pytest

from msdata.errors import (
    ConfigurationError,
    IdempotencyError,
    IdempotencyInProgress,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    ResultNotStored,
    StoredResultTooLarge,
)
from msdata.idempotency import IdempotencyKeys, IdempotencyStatus, IdempotencyStore
from msdata.idempotency.store import LiveRecord
from msdata.storage import unix_us
from msdata.testing.conformance.hooks import StoreUrlCases, TransactionHooks
from msdata.testing.fakes import FakeClock

__all__ = ["IdempotencyStoreConformance"]

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def _s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def _tok() -> str:
    return uuid.uuid4().hex


class _Live(NamedTuple):
    """A claim's live record (the port's LiveRecord tuple), with names for the tests."""

    fingerprint: str
    completed: int
    response: bytes | None
    token: str


def _seen(got: str | LiveRecord, token: str) -> _Live | None:
    """None when the claim took the key (it must return the token it wrote), else the
    live record it returned (a plain 4-tuple, as the port says)."""
    if isinstance(got, str):
        assert got == token, f"a winning claim returns the token it wrote, got {got!r}"
        return None
    assert type(got) is tuple and len(got) == 4, got
    return _Live(*got)


async def claim_at(
    store: IdempotencyStore,
    conn: Any,
    scope: str,
    key: str,
    fp: str,
    token: str,
    now: datetime,
    until: datetime,
) -> _Live | None:
    """``claim_async`` at ``now`` with lease end ``until`` (datetimes, in microseconds for
    the store), ``token`` the one the store may write."""
    tokens: list[str] = []

    def new_token() -> str:
        tokens.append(token)
        return token

    got = await store.claim_async(conn, scope, key, fp, unix_us(now), unix_us(until), new_token)
    if isinstance(got, str):
        assert tokens, "a claim that took the key made its token with new_token()"
    return _seen(got, token)


def claim_sync_at(
    store: IdempotencyStore,
    conn: Any,
    scope: str,
    key: str,
    fp: str,
    token: str,
    now: datetime,
    until: datetime,
) -> _Live | None:
    """:func:`claim_at` with the sync ``claim``."""
    got = store.claim(conn, scope, key, fp, unix_us(now), unix_us(until), lambda: token)
    return _seen(got, token)


async def complete_at(
    store: IdempotencyStore,
    conn: Any,
    scope: str,
    key: str,
    token: str,
    body: bytes,
    until: datetime,
) -> bool:
    return await store.complete_async(conn, scope, key, token, body, unix_us(until))


class PaymentDeclined(Exception):
    """A final error for the tests: stored and raised again on every retry."""


class IdempotencyStoreConformance(TransactionHooks, StoreUrlCases):
    """The tests every :class:`IdempotencyStore` must pass."""

    port = "idempotency"

    def make_store(self) -> AbstractAsyncContextManager[IdempotencyStore]:
        raise NotImplementedError

    async def idle_connection(self, store: Any) -> Any:
        """A connection of the backend with no open transaction (None: skip that test)."""
        return None

    async def close_connection(self, conn: Any) -> None:
        return None

    # -- the record state machine ------------------------------------------------------------

    async def test_a_new_key_is_claimed_in_progress(self) -> None:
        async with self.make_store() as store:
            assert isinstance(store, IdempotencyStore)  # every method of the port is there
            t = _tok()
            assert await claim_at(store, None, "u1", "k", "fp", t, T0, T0 + _s(10)) is None
            rec = await store.get("u1", "k")
            assert rec is not None
            assert (rec.scope, rec.key, rec.fingerprint, rec.token) == ("u1", "k", "fp", t)
            assert rec.status(T0) is IdempotencyStatus.IN_PROGRESS
            assert rec.expires_at == T0 + _s(10)
            assert rec.response is None

    async def test_a_live_claim_is_returned_and_left_alone(self) -> None:
        async with self.make_store() as store:
            t = _tok()
            await claim_at(store, None, "u1", "k", "fp", t, T0, T0 + _s(10))
            other = await claim_at(store, None, "u1", "k", "fp2", _tok(), T0 + _s(5), T0 + _s(15))
            assert other is not None
            assert (other.token, other.fingerprint, other.completed) == (t, "fp", False)
            rec = await store.get("u1", "k")
            assert rec is not None and rec.token == t and rec.expires_at == T0 + _s(10)

    async def test_complete_stores_the_response_until_retention_ends(self) -> None:
        async with self.make_store() as store:
            t = _tok()
            body = bytes(range(256)) * 3
            await claim_at(store, None, "u1", "k", "fp", t, T0, T0 + _s(10))
            assert await complete_at(store, None, "u1", "k", t, body, T0 + _s(100))
            live = await claim_at(store, None, "u1", "k", "fp", _tok(), T0 + _s(50), T0 + _s(60))
            assert live is not None and live.completed and live.response == body
            rec = await store.get("u1", "k")
            assert rec is not None and rec.status(T0 + _s(50)) is IdempotencyStatus.COMPLETED
            assert rec.status(T0 + _s(100)) is IdempotencyStatus.EXPIRED
            # retention over: the key is free again
            t2 = _tok()
            assert (
                await claim_at(store, None, "u1", "k", "x", t2, T0 + _s(100), T0 + _s(110)) is None
            )
            rec = await store.get("u1", "k")
            assert (
                rec is not None and rec.token == t2 and not rec.completed and rec.response is None
            )

    async def test_an_empty_response_is_stored(self) -> None:
        async with self.make_store() as store:
            t = _tok()
            await claim_at(store, None, "", "k", "", t, T0, T0 + _s(10))
            assert await complete_at(store, None, "", "k", t, b"", T0 + _s(100))
            rec = await claim_at(store, None, "", "k", "", _tok(), T0, T0 + _s(10))
            assert rec is not None and rec.completed and rec.response == b""

    async def test_complete_and_release_need_the_claims_token(self) -> None:
        async with self.make_store() as store:
            t = _tok()
            await claim_at(store, None, "u1", "k", "fp", t, T0, T0 + _s(10))
            assert not await complete_at(store, None, "u1", "k", _tok(), b"x", T0 + _s(99))
            assert not await store.release_async(None, "u1", "k", _tok())
            rec = await store.get("u1", "k")
            assert rec is not None and not rec.completed and rec.token == t
            assert await store.release_async(None, "u1", "k", t)
            assert await store.get("u1", "k") is None
            assert not await store.release_async(None, "u1", "k", t)
            assert not await complete_at(store, None, "u1", "k", t, b"x", T0 + _s(99))

    async def test_an_expired_lease_is_claimed_again_and_fences_the_old_holder(self) -> None:
        async with self.make_store() as store:
            old = _tok()
            await claim_at(store, None, "u1", "k", "fp", old, T0, T0 + _s(10))
            # not yet: one microsecond before the lease ends
            live = await claim_at(
                store,
                None,
                "u1",
                "k",
                "fp",
                _tok(),
                T0 + _s(10) - timedelta(microseconds=1),
                T0 + _s(20),
            )
            assert live is not None and live.token == old
            new = _tok()
            assert (
                await claim_at(store, None, "u1", "k", "fp", new, T0 + _s(10), T0 + _s(20)) is None
            )
            assert not await complete_at(store, None, "u1", "k", old, b"late", T0 + _s(99))
            assert not await store.release_async(None, "u1", "k", old)
            assert await complete_at(store, None, "u1", "k", new, b"ok", T0 + _s(99))
            rec = await store.get("u1", "k")
            assert rec is not None and rec.response == b"ok"

    async def test_the_scope_is_part_of_the_key(self) -> None:
        async with self.make_store() as store:
            ta, tb = _tok(), _tok()
            assert await claim_at(store, None, "alice", "k", "fp", ta, T0, T0 + _s(10)) is None
            assert await claim_at(store, None, "bob", "k", "fp", tb, T0, T0 + _s(10)) is None
            assert await complete_at(store, None, "alice", "k", ta, b"alice's", T0 + _s(99))
            assert not await complete_at(store, None, "bob", "k", ta, b"x", T0 + _s(99))
            rec = await claim_at(store, None, "bob", "k", "fp", _tok(), T0, T0 + _s(10))
            assert rec is not None and rec.token == tb and rec.response is None
            # keys and scopes that could run together stay apart
            assert await claim_at(store, None, "a:b", "c", "", _tok(), T0, T0 + _s(1)) is None
            assert await claim_at(store, None, "a", "b:c", "", _tok(), T0, T0 + _s(1)) is None

    async def test_fifty_concurrent_claims_of_one_key_have_one_winner(self) -> None:
        async with self.make_store() as store:
            for round_, now in enumerate((T0, T0 + _s(100))):  # a new key, then an expired one
                results = await asyncio.gather(
                    *(
                        claim_at(
                            store, None, "u", "race", "fp", f"t{round_}-{i}", now, now + _s(50)
                        )
                        for i in range(50)
                    )
                )
                winners = [i for i, r in enumerate(results) if r is None]
                assert len(winners) == 1, results
                rec = await store.get("u", "race")
                assert rec is not None and rec.token == f"t{round_}-{winners[0]}"
                assert all(r.token == rec.token for r in results if r is not None)

    async def test_purge_deletes_what_has_expired(self) -> None:
        async with self.make_store() as store:
            for i in range(3):
                await claim_at(store, None, "u", f"k{i}", "", f"t{i}", T0, T0 + _s(10 * (i + 1)))
            n = await store.purge(T0 + _s(20))
            if n:  # stores that expire keys themselves return 0
                assert n == 2
                assert await store.get("u", "k0") is None and await store.get("u", "k1") is None
            assert await store.get("u", "k2") is not None

    async def test_purge_takes_an_aware_datetime(self) -> None:
        async with self.make_store() as store:
            for bad in (datetime(2030, 1, 1), 1893456000, "2030-01-01", None):
                with pytest.raises(ConfigurationError, match="aware datetime"):
                    await store.purge(bad)  # type: ignore[arg-type]

    # -- the caller's transaction --------------------------------------------------------------

    async def test_a_claim_in_the_callers_transaction_commits_or_rolls_back_with_it(self) -> None:
        async with self.make_store() as store:
            if not store.features.joins_transaction:
                pytest.skip("this store does not join the caller's transaction")
            conn = await self.begin(store)
            t = _tok()
            try:
                assert await self._claim(store, conn, "u", "k", t) is None
                assert await self._complete(store, conn, "u", "k", t, b"done")
            finally:
                await self.rollback(conn)
            assert await claim_at(store, None, "u", "k", "", _tok(), T0, T0 + _s(1)) is None
            conn = await self.begin(store)
            t = _tok()
            try:
                assert await self._claim(store, conn, "u", "k2", t) is None
                assert await self._complete(store, conn, "u", "k2", t, b"done")
            finally:
                await self.commit(conn)
            rec = await store.get("u", "k2")
            assert rec is not None and rec.completed and rec.response == b"done"

    async def _claim(self, store: Any, conn: Any, scope: str, key: str, token: str) -> Any:
        if self.sync_connections:
            return await asyncio.to_thread(
                claim_sync_at, store, conn, scope, key, "", token, T0, T0 + _s(10)
            )
        return await claim_at(store, conn, scope, key, "", token, T0, T0 + _s(10))

    async def _complete(
        self, store: Any, conn: Any, scope: str, key: str, token: str, body: bytes
    ) -> bool:
        if self.sync_connections:
            until = unix_us(T0 + _s(99))
            ok = await asyncio.to_thread(store.complete, conn, scope, key, token, body, until)
        else:
            ok = await complete_at(store, conn, scope, key, token, body, T0 + _s(99))
        return bool(ok)

    #: True when ``begin`` returns a sync connection (the sync store methods are used)
    sync_connections = False

    async def test_a_connection_without_an_open_transaction_is_refused(self) -> None:
        async with self.make_store() as store:
            if not store.features.joins_transaction:
                pytest.skip("this store does not join the caller's transaction")
            conn = await self.idle_connection(store)
            if conn is None:
                pytest.skip("no idle connection for this backend")
            try:
                with pytest.raises(ConfigurationError):
                    await self._claim(store, conn, "u", "k", _tok())
            finally:
                await self.close_connection(conn)
            assert await store.get("u", "k") is None

    async def test_sync_calls_in_the_stores_own_transactions(self) -> None:
        async with self.make_store() as store:
            f = store.features
            if not (f.sync and f.sync_own_transaction):
                pytest.skip("no sync calls in the store's own transactions")
            t = _tok()

            def flow() -> None:
                assert claim_sync_at(store, None, "u", "s", "fp", t, T0, T0 + _s(10)) is None
                live = claim_sync_at(store, None, "u", "s", "fp", _tok(), T0, T0 + _s(10))
                assert live is not None and live.token == t
                assert store.complete(None, "u", "s", t, b"r", unix_us(T0 + _s(50)))
                assert not store.release(None, "u", "s", _tok())

            await asyncio.to_thread(flow)
            rec = await store.get("u", "s")
            assert rec is not None and rec.response == b"r"

    # -- the state machine over this store -------------------------------------------------------

    async def test_keys_run_once_and_replay_the_result(self) -> None:
        async with self.make_store() as store:
            clock = FakeClock()
            keys = IdempotencyKeys(store, lease_seconds=30, retention_seconds=600, clock=clock)
            runs: list[int] = []

            async def charge() -> dict[str, Any]:
                runs.append(1)
                return {"charge": "ch_1", "amount": 100}

            first = await keys.run("pay-1", charge, scope="alice", request={"amount": 100})
            again = await keys.run("pay-1", charge, scope="alice", request={"amount": 100})
            assert first == again == {"charge": "ch_1", "amount": 100} and len(runs) == 1
            with pytest.raises(IdempotencyKeyReused):
                await keys.run("pay-1", charge, scope="alice", request={"amount": 999})
            # another owner with the same key runs its own operation
            await keys.run("pay-1", charge, scope="bob", request={"amount": 100})
            assert len(runs) == 2
            clock.advance(600)  # retention over: the key is free again
            await keys.run("pay-1", charge, scope="alice", request={"amount": 999})
            assert len(runs) == 3
            with pytest.raises(IdempotencyKeyMissing):
                await keys.run(None, charge, scope="alice")

    async def test_a_first_run_is_two_store_calls_and_a_replay_one(self) -> None:
        async with self.make_store() as store:
            counted = _Counted(store)
            keys = IdempotencyKeys(cast(IdempotencyStore, counted), clock=FakeClock())
            assert await keys.run("k", _async({"id": 1}), scope="s", request=1) == {"id": 1}
            assert counted.calls == ["claim_async", "complete_async"]
            counted.calls.clear()
            assert await keys.run("k", _async({"id": 2}), scope="s", request=1) == {"id": 1}
            assert counted.calls == ["claim_async"]
            counted.calls.clear()
            async with keys.call("k", scope="s", request=1) as call:
                assert call.replayed and call.result == {"id": 1}
            assert counted.calls == ["claim_async"]

    async def test_keys_in_progress_failure_and_a_crashed_holder(self) -> None:
        async with self.make_store() as store:
            clock = FakeClock()
            keys = IdempotencyKeys(
                store, lease_seconds=30, final_errors=(PaymentDeclined,), clock=clock
            )
            held = await keys.claim("k", scope="s", fingerprint="f")  # a holder that dies
            with pytest.raises(IdempotencyInProgress):
                await keys.run("k", _async(1), scope="s", fingerprint="f")
            clock.advance(30)
            assert await keys.run("k", _async(2), scope="s", fingerprint="f") == 2
            await held.complete(b"3")  # fenced: another claim holds the key now
            assert await keys.run("k", _async(4), scope="s", fingerprint="f") == 2

            async def boom() -> int:
                raise RuntimeError("network")

            with pytest.raises(RuntimeError):
                await keys.run("b", boom, scope="s")
            assert await keys.run("b", _async(5), scope="s") == 5  # released, ran again

            async def declined() -> int:
                raise PaymentDeclined("card declined", 402)

            for _ in range(2):
                with pytest.raises(PaymentDeclined) as info:
                    await keys.run("d", declined, scope="s")
                assert info.value.args == ("card declined", 402)
            rec = await store.get("s", "d")
            assert rec is not None and rec.completed

    async def test_keys_refuse_to_store_a_result_over_the_limit(self) -> None:
        async with self.make_store() as store:
            keys = IdempotencyKeys(store, max_result_bytes=100, clock=FakeClock())
            big = "x" * 200
            assert await keys.run("big", _async(big), scope="s") == big  # the first caller
            with pytest.raises(StoredResultTooLarge):
                await keys.run("big", _async("other"), scope="s")

    async def test_a_result_with_no_json_form_is_marked_done_not_run_again(self) -> None:
        async with self.make_store() as store:
            keys = IdempotencyKeys(store, clock=FakeClock())
            runs: list[object] = []

            async def charge() -> object:
                runs.append(object())  # the effect happens here
                return runs[-1]

            assert await keys.run("w", charge, scope="s") is runs[0]  # the first caller
            for _ in range(2):
                with pytest.raises(ResultNotStored, match="no JSON form"):
                    await keys.run("w", charge, scope="s")
            assert len(runs) == 1
            rec = await store.get("s", "w")
            assert rec is not None and rec.completed

    async def test_control_characters_in_keys_and_scopes_are_refused_up_front(self) -> None:
        async with self.make_store() as store:
            keys = IdempotencyKeys(store, clock=FakeClock())
            for bad in ("a\x00b", "tab\there", "\x7f"):
                with pytest.raises(IdempotencyError, match="control character"):
                    await keys.run(bad, _async(1), scope="s")
                with pytest.raises(ConfigurationError, match="control character"):
                    await keys.run("k", _async(1), scope=bad)
            assert await store.get("s", "k") is None


class _Counted:
    """A store whose async calls are recorded by name."""

    def __init__(self, store: IdempotencyStore) -> None:
        self.store = store
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        if not name.endswith("_async"):
            return attr

        async def counted(*args: Any) -> Any:
            self.calls.append(name)
            return await attr(*args)

        return counted


def _async(value: Any) -> Any:
    async def op() -> Any:
        return value

    return op
