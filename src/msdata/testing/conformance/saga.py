"""Conformance suite for the saga store port (:class:`msdata.saga.SagaStore`), run on every
backend::

    class TestMySagaStore(SagaStoreConformance):
        @asynccontextmanager
        async def make_store(self) -> AsyncIterator[SagaStore]:
            store = MySagaStore(..., table_prefix=f"t{uuid.uuid4().hex[:8]}_")
            await store.create_schema()
            try:
                yield store
            finally:
                await store.close()          # and drop the tables

Hooks:

``make_store()``
    async context manager yielding a fresh, empty store with its schema created.
``open_again(store)``
    async context manager yielding another store over the same tables, as a second process
    would open it (default: ``store`` itself).
``outbox_for(store)``
    an :class:`msdata.outbox.OutboxStore` in the same database, whose ``append`` (or
    ``append_async``, per ``store.features.async_connection``) works on the connection that
    ``save(also=...)`` passes; used to check that state and outbox rows commit together.

Needs pytest and pytest-asyncio (``asyncio_mode = "auto"``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from msdata.adapters.memory.transport import MemoryTransport
from msdata.errors import ConcurrencyError, EncodeError, SagaDataError, SagaNotFound
from msdata.events import EventBus
from msdata.ids import new_id
from msdata.messages import Command, message_type
from msdata.outbox import Outbox
from msdata.outbox.store import OutboxRow, OutboxStore
from msdata.saga import (
    HistoryEntry,
    Saga,
    SagaOrchestrator,
    SagaRecord,
    SagaReply,
    SagaStatus,
    Step,
    StepRun,
    remote,
)
from msdata.saga.orchestrator import MAX_SAGA_ID
from msdata.saga.store import SagaStore
from msdata.testing.fakes import FakeClock
from msdata.testing.waiting import eventually
from msdata.transport import dead_letter_topic

__all__ = ["SagaStoreConformance"]

T0 = datetime(2030, 1, 1, tzinfo=UTC)


class _Data(BaseModel):
    n: int = 0
    tags: list[str] = []


class _DataV2(BaseModel):
    """``_Data`` as a later release has it: a required field added."""

    n: int = 0
    tags: list[str] = []
    currency: str


class _Loose(BaseModel):
    v: Any = None


@message_type("msdata.conformance.saga.Charge")
class _Charge(Command):
    n: int


class _Charged(BaseModel):
    payment: str


def _record(saga_id: str | None = None, **kw: Any) -> SagaRecord:
    rec = SagaRecord(
        saga_id or new_id(),
        kw.pop("saga_type", "conf"),
        kw.pop("status", SagaStatus.RUNNING),
        kw.pop("data", None) or _Data(n=1, tags=["a"]),
        kw.pop("created_at", T0),
        kw.pop("updated_at", T0),
        version=1,
        **kw,
    )
    return rec


def _row() -> OutboxRow:
    mid = new_id()
    return OutboxRow(mid, "conf.topic", "conf.Cmd", b'{"x":1}', "k")


def _charge_and_pack(
    name: str, pack: Callable[[_Data], Awaitable[_Data]], charge_topic: str
) -> Saga[_Data]:
    """A remote ``charge`` in parallel with a local ``pack``, then a pivot: the saga of the
    cases where a reply arrives while its instance is busy or its process died."""
    return (
        Saga(name, _Data)
        .parallel(
            Step.compensatable(
                "charge",
                remote(
                    lambda d: _Charge(n=d.n),
                    reply=_Charged,
                    on_reply=lambda d, r: d.model_copy(update={"tags": [*d.tags, r.payment]}),
                    topic=charge_topic,
                ),
                compensate=lambda d: None,
                timeout=60,
            ),
            Step.compensatable("pack", pack, compensate=lambda d: None),
        )
        .pivot("end", lambda d: d.model_copy(update={"n": d.n + 1}))
    )


class SagaStoreConformance:
    """The saga store contract. Subclass and give :meth:`make_store`."""

    def make_store(self) -> AbstractAsyncContextManager[SagaStore]:
        raise NotImplementedError

    @asynccontextmanager
    async def open_again(self, store: SagaStore) -> AsyncIterator[SagaStore]:
        yield store

    def outbox_for(self, store: SagaStore) -> OutboxStore | None:
        return None

    @pytest.fixture
    async def store(self) -> AsyncIterator[SagaStore]:
        async with self.make_store() as s:
            yield s

    # -- save and get ------------------------------------------------------------------------

    async def test_save_then_get_round_trips_every_field(self, store: SagaStore) -> None:
        rec = _record(
            position=2,
            done=["a", "b"],
            active={
                "c": StepRun(
                    "action", 2, "waiting", T0 + timedelta(seconds=5), "boom", None, None, True
                ),
                "d": StepRun("compensation", 7, "retry", T0, "no", False, None, True, 5),
            },
            compensation=[["b", "x"], ["a"]],
            past_pivot=True,
            error="why",
            deadline=T0 + timedelta(seconds=60),
            lease_owner="w1",
            lease_until=T0 + timedelta(seconds=30),
            wake_at=T0 + timedelta(seconds=5),
            history=[HistoryEntry(T0, "started"), HistoryEntry(T0, "step failed", "c", 2, "boom")],
        )
        await store.save(rec)
        got = await store.get(rec.saga_id)
        data = got.data if isinstance(got.data, dict) else got.data.model_dump()
        assert data == {"n": 1, "tags": ["a"]}
        got.data = rec.data
        assert got == rec

    async def test_a_finished_instance_round_trips_every_field(self, store: SagaStore) -> None:
        """A store may keep a finished instance in another form than a running one (the
        memory store flattens its history): read back, it is the same record, its history
        entries readable by name."""
        for status in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED):
            rec = _record(
                position=2,
                done=["a", "b"],
                history=[
                    HistoryEntry(T0, "started"),
                    HistoryEntry(T0 + timedelta(seconds=1), "step failed", "c", 2, "boom"),
                ],
            )
            await store.save(rec)
            # a long history too (a store may keep a short one otherwise)
            retries = 40 if status is SagaStatus.FAILED else 0
            for i in range(retries):
                rec.history.append(HistoryEntry(T0, "retry", "c", i, f"r{i}"))
            rec.status = status
            rec.error = None if status is SagaStatus.COMPLETED else "why"
            rec.history.append(HistoryEntry(T0 + timedelta(seconds=2), status.value.lower()))
            rec.version += 1
            await store.save(rec)
            got = await store.get(rec.saga_id)
            assert isinstance(got.history[1], HistoryEntry)
            assert [(h.event, h.step, h.attempt, h.detail) for h in got.history] == [
                ("started", None, None, None),
                ("step failed", "c", 2, "boom"),
                *(("retry", "c", i, f"r{i}") for i in range(retries)),
                (status.value.lower(), None, None, None),
            ]
            assert got.history[-1].at == T0 + timedelta(seconds=2)
            data = got.data if isinstance(got.data, dict) else got.data.model_dump()
            assert data == {"n": 1, "tags": ["a"]}
            got.data = rec.data
            assert got == rec
            got.history.append(HistoryEntry(T0, "x"))  # a copy: the store's is unchanged
            got.done.append("c")
            again = await store.get(rec.saga_id)
            assert len(again.history) == 3 + retries and again.done == ["a", "b"]

    async def test_history_added_between_saves_round_trips(self, store: SagaStore) -> None:
        """A save after more history was appended (and after a read, and to a record whose
        history was replaced) stores the whole history, in order."""
        rec = _record(history=[HistoryEntry(T0, "started")])
        await store.save(rec)
        for i in range(3):
            rec.history.append(HistoryEntry(T0 + timedelta(seconds=i), "step", f"s{i}", i, None))
            rec.version += 1
            await store.save(rec)
        got = await store.get(rec.saga_id)
        assert got.history == rec.history and len(got.history) == 4
        got.history.append(HistoryEntry(T0, "after a read", detail="d"))
        got.version += 1
        await store.save(got)
        again = await store.get(rec.saga_id)
        assert again.history == got.history
        again.history = [HistoryEntry(T0, "replaced")]
        again.version += 1
        await store.save(again)
        assert (await store.get(rec.saga_id)).history == [HistoryEntry(T0, "replaced")]

    async def test_get_unknown_raises_saga_not_found(self, store: SagaStore) -> None:
        with pytest.raises(SagaNotFound):
            await store.get("no-such-saga")

    async def test_records_handed_out_are_copies(self, store: SagaStore) -> None:
        rec = _record(done=["a"])
        await store.save(rec)
        rec.done.append("b")
        got = await store.get(rec.saga_id)
        got.history.append(HistoryEntry(T0, "x"))
        again = await store.get(rec.saga_id)
        assert again.done == ["a"] and again.history == []

    # -- optimistic concurrency --------------------------------------------------------------

    async def test_new_instance_must_not_exist(self, store: SagaStore) -> None:
        rec = _record()
        await store.save(rec)
        twin = _record(rec.saga_id)
        with pytest.raises(ConcurrencyError) as e:
            await store.save(twin)
        assert (e.value.expected, e.value.actual) == (0, 1)
        assert rec.saga_id in e.value.name

    async def test_stale_version_is_rejected_naming_both_versions(self, store: SagaStore) -> None:
        rec = _record()
        await store.save(rec)
        a, b = await store.get(rec.saga_id), await store.get(rec.saga_id)
        a.version += 1
        a.error = "first"
        await store.save(a)
        b.version += 1
        b.error = "second"
        with pytest.raises(ConcurrencyError) as e:
            await store.save(b)
        assert (e.value.expected, e.value.actual) == (1, 2)
        assert e.value.name == f"saga {rec.saga_id}"
        assert (await store.get(rec.saga_id)).error == "first"

    async def test_concurrent_writers_one_wins(self, store: SagaStore) -> None:
        rec = _record()
        await store.save(rec)
        async with self.open_again(store) as other:
            copies = [await store.get(rec.saga_id), await other.get(rec.saga_id)]
            for i, c in enumerate(copies):
                c.version += 1
                c.error = f"w{i}"
            results = await asyncio.gather(
                store.save(copies[0]), other.save(copies[1]), return_exceptions=True
            )
        assert sorted(type(r).__name__ for r in results) == ["ConcurrencyError", "NoneType"]
        assert (await store.get(rec.saga_id)).version == 2

    # -- the outbox rows of a save -----------------------------------------------------------

    def _also(self, store: SagaStore, outbox: OutboxStore, fail: bool = False) -> Any:
        if store.features.async_connection:

            async def add_async(conn: Any) -> None:
                await outbox.append_async(conn, [_row()])
                if fail:
                    raise RuntimeError("failing after the append")

            return add_async

        def add(conn: Any) -> None:
            outbox.append(conn, [_row()])
            if fail:
                raise RuntimeError("failing after the append")

        return add

    async def test_state_and_outbox_rows_commit_together(self, store: SagaStore) -> None:
        outbox = self.outbox_for(store)
        if outbox is None:
            pytest.skip("no outbox hook for this backend")
        before = (await outbox.status()).pending
        rec = _record()
        await store.save(rec, also=self._also(store, outbox))
        assert (await outbox.status()).pending == before + 1
        # a stale save: neither the state nor the row
        stale = _record(rec.saga_id)
        with pytest.raises(ConcurrencyError):
            await store.save(stale, also=self._also(store, outbox))
        assert (await outbox.status()).pending == before + 1
        # ``also`` fails: the state is not written either
        nxt = await store.get(rec.saga_id)
        nxt.version += 1
        nxt.error = "not written"
        with pytest.raises(RuntimeError):
            await store.save(nxt, also=self._also(store, outbox, fail=True))
        assert (await outbox.status()).pending == before + 1
        got = await store.get(rec.saga_id)
        assert got.version == 1 and got.error is None

    # -- leases and claims -------------------------------------------------------------------

    async def test_claim_takes_active_free_instances_and_bumps_the_version(
        self, store: SagaStore
    ) -> None:
        now = T0 + timedelta(seconds=100)
        free = _record()
        expired = _record(lease_owner="dead", lease_until=now - timedelta(seconds=1))
        live = _record(lease_owner="alive", lease_until=now + timedelta(seconds=10))
        sleeping = _record(wake_at=now + timedelta(seconds=10))
        due = _record(wake_at=now)
        compensating = _record(status=SagaStatus.COMPENSATING)
        done = [
            _record(status=s)
            for s in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED)
        ]
        for r in (free, expired, live, sleeping, due, compensating, *done):
            await store.save(r)
        claimed = await store.claim("me", now, now + timedelta(seconds=30), 100)
        ids = {r.saga_id for r in claimed}
        assert ids == {free.saga_id, expired.saga_id, due.saga_id, compensating.saga_id}
        for r in claimed:
            assert (r.version, r.lease_owner) == (2, "me")
            assert r.lease_until == now + timedelta(seconds=30)
            assert (await store.get(r.saga_id)).lease_owner == "me"
        assert await store.claim("other", now, now + timedelta(seconds=30), 100) == []

    async def test_claim_respects_the_limit(self, store: SagaStore) -> None:
        for _ in range(5):
            await store.save(_record())
        assert len(await store.claim("me", T0, T0 + timedelta(seconds=30), 3)) == 3
        assert len(await store.claim("me", T0, T0 + timedelta(seconds=30), 3)) == 2

    async def test_two_claimers_never_get_the_same_instance(self, store: SagaStore) -> None:
        recs = [_record() for _ in range(20)]
        for r in recs:
            await store.save(r)
        until = T0 + timedelta(seconds=30)
        async with self.open_again(store) as other:
            a, b = await asyncio.gather(
                store.claim("a", T0, until, 100), other.claim("b", T0, until, 100)
            )
        ids_a, ids_b = {r.saga_id for r in a}, {r.saga_id for r in b}
        assert not ids_a & ids_b
        assert ids_a | ids_b == {r.saga_id for r in recs}

    async def test_a_claimed_copy_cannot_overwrite_a_newer_save(self, store: SagaStore) -> None:
        rec = _record()
        await store.save(rec)
        old = await store.get(rec.saga_id)
        [claimed] = await store.claim("me", T0, T0 + timedelta(seconds=30), 10)
        old.version += 1
        with pytest.raises(ConcurrencyError):
            await store.save(old)
        claimed.version += 1
        await store.save(claimed)

    # -- data JSON cannot hold; data the model can no longer read ----------------------------

    @pytest.mark.parametrize(
        ("value", "why"),
        [
            (math.nan, "nan: not a finite number"),
            (-math.inf, "-inf: not a finite number"),
            ([1.0, math.inf], "inf: not a finite number"),
            ("\udc80", "holds a lone surrogate"),
            ({"\udc80": 1}, "holds a lone surrogate"),
            ("a\x00b", "holds a NUL character"),
            (["ok", {"k": "\x00"}], "[1].k: holds a NUL character"),
            ({"k\x00": 1}, "(key): holds a NUL character"),
        ],
        ids=[
            "nan",
            "-inf",
            "inf-in-list",
            "surrogate",
            "surrogate-key",
            "nul",
            "nul-deep",
            "nul-key",
        ],
    )
    async def test_save_refuses_data_json_cannot_hold(
        self, store: SagaStore, value: Any, why: str
    ) -> None:
        """NaN, Infinity and lone surrogates would be written as ``null`` (or refused by the
        database), and the instance could not be read back: every store refuses them with
        EncodeError, writing nothing."""
        bad = _record(data=_Loose(v=value))
        with pytest.raises(EncodeError, match=re.escape(why)):
            await store.save(bad)
        with pytest.raises(SagaNotFound):
            await store.get(bad.saga_id)
        rec = _record(data=_Loose(v=1.5))
        await store.save(rec)
        rec.version += 1
        rec.data = _Loose(v=value)
        with pytest.raises(EncodeError, match=r"data\.v"):
            await store.save(rec)
        got = await store.get(rec.saga_id)
        assert got.version == 1
        assert (got.data if isinstance(got.data, dict) else got.data.model_dump()) == {"v": 1.5}

    async def test_the_orchestrator_refuses_unstorable_data_and_saga_ids(
        self, store: SagaStore
    ) -> None:
        """The same refusal, whatever the store: data JSON cannot hold with EncodeError
        before anything is stored, a step that returns such data has failed its attempt,
        and a saga id that is not a non-empty str of valid UTF-8 without control characters
        (at most MAX_SAGA_ID characters) is EncodeError (SagaNotFound when looked up)."""
        saga = (
            Saga("conf-nan", _Loose)
            .step("a", lambda d: _Loose(v=math.nan), compensate=lambda d: None)
            .pivot("p", lambda d: None)
        )
        orch = SagaOrchestrator(store, [saga], clock=FakeClock())
        with pytest.raises(EncodeError, match="not a finite number"):
            await orch.run(saga, _Loose(v=math.nan))
        with pytest.raises(EncodeError, match="lone surrogate"):
            await orch.run(saga, _Loose(v="\udc80"))
        for bad_id in ["", 123, "\udc80", "a\x00b", "a\nb", "x" * (MAX_SAGA_ID + 1)]:
            with pytest.raises(EncodeError, match="saga id"):
                await orch.run(saga, _Loose(v=1), saga_id=bad_id)  # type: ignore[arg-type]
            for op in (orch.get, orch.history, orch.retry, orch.abort):
                with pytest.raises(SagaNotFound):  # not a driver's error
                    await op(bad_id)  # type: ignore[arg-type]
        assert await store.find(saga_type="conf-nan") == []
        done = await orch.run(saga, _Loose(v=1), saga_id="x" * MAX_SAGA_ID)
        assert done.status is SagaStatus.COMPENSATED
        assert done.error is not None and "returned data that cannot be stored" in done.error
        assert (await orch.get(done.saga_id)).data == _Loose(v=1)

    async def test_nul_in_data_is_refused_and_in_an_error_text_is_kept_readable(
        self, store: SagaStore
    ) -> None:
        """A NUL character (``\\x00``) is refused in saga data by every store alike
        (PostgreSQL's jsonb cannot hold it): before anything is stored at ``run``, and as a
        failed attempt for a step returning it (then compensation), never an instance left
        RUNNING by a store error. The text ``\\u0000`` (a backslash) is data like any other.
        An error text holding a NUL (a step's exception) is stored, readable."""

        def boom(d: _Loose) -> None:
            raise ValueError("bad\x00byte")

        saga = (
            Saga("conf-nul", _Loose)
            .step("a", lambda d: _Loose(v="a\x00b"), compensate=lambda d: None)
            .pivot("p", lambda d: None)
        )
        failing = Saga("conf-nul-error", _Loose).step("a", boom, compensate=lambda d: None)
        orch = SagaOrchestrator(store, [saga, failing], clock=FakeClock())
        with pytest.raises(EncodeError, match="holds a NUL character"):
            await orch.run(saga, _Loose(v={"x": ["\x00"]}))
        assert await store.find(saga_type="conf-nul") == []
        done = await orch.run(saga, _Loose(v=1))
        assert done.status is SagaStatus.COMPENSATED
        assert done.error is not None
        assert "returned data that cannot be stored" in done.error and "NUL" in done.error
        assert (await orch.get(done.saga_id)).data == _Loose(v=1)
        text = await orch.run(failing, _Loose(v="\\u0000 \\x00"))
        assert text.status is SagaStatus.COMPENSATED
        got = await orch.get(text.saga_id)
        assert got.data == _Loose(v="\\u0000 \\x00")
        assert got.error is not None and got.error.startswith("step 'a' failed: ValueError: bad")
        assert "byte" in got.error

    async def test_an_unreadable_instance_never_blocks_recovery_or_listing(
        self, store: SagaStore, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An instance whose stored data the saga's model no longer reads (a release added a
        required field): ``get`` raises SagaDataError, ``find``/``stuck`` list it with the
        reason, and recovery logs it, sets it aside (history ``unreadable``, once) and goes
        on with the others."""
        clock = FakeClock()
        now = clock.now()
        old = _record(saga_type="conf-v2", data=_Data(n=7), created_at=now, updated_at=now)
        await store.save(old)  # stored by the old release: no "currency"
        ok = _record(saga_type="conf-ok", data=_Data(n=1), created_at=now, updated_at=now)
        await store.save(ok)
        v2 = Saga("conf-v2", _DataV2).pivot("p", lambda d: None)
        fine = Saga("conf-ok", _Data).pivot("p", lambda d: d.model_copy(update={"n": 2}))
        orch = SagaOrchestrator(store, [v2, fine], clock=clock, lease_seconds=10)
        caplog.set_level(logging.ERROR, logger="msdata.saga")
        assert await orch.recover() == 2  # raised a ValidationError for both before
        assert (await orch.get(ok.saga_id)).status is SagaStatus.COMPLETED
        with pytest.raises(SagaDataError, match="does not validate as _DataV2"):
            await orch.get(old.saga_id)
        assert any("conf-v2" in r.getMessage() for r in caplog.records)
        listed = {r.saga_id: r for r in await orch.find()}
        assert listed[ok.saga_id].data == _Data(n=2)
        assert "unreadable data" in (listed[old.saga_id].error or "")
        raw = await store.get(old.saga_id)
        assert raw.status is SagaStatus.RUNNING and raw.lease_owner is None
        assert [h.event for h in raw.history].count("unreadable") == 1
        clock.advance(11)  # looked at again after the lease: still unreadable, noted once
        assert [r.saga_id for r in await orch.stuck()] == [old.saga_id]
        assert await orch.recover() == 1
        raw = await store.get(old.saga_id)
        assert [h.event for h in raw.history].count("unreadable") == 1

    # -- listing -----------------------------------------------------------------------------

    async def test_find_by_type_status_and_stuck(self, store: SagaStore) -> None:
        now = T0 + timedelta(seconds=100)
        a = _record(saga_type="alpha", lease_owner="w", lease_until=now + timedelta(seconds=5))
        b = _record(saga_type="alpha", status=SagaStatus.FAILED)
        c = _record(saga_type="beta", lease_owner="w", lease_until=now - timedelta(seconds=5))
        d = _record(saga_type="beta", status=SagaStatus.COMPLETED)
        for r in (a, b, c, d):
            await store.save(r)

        def ids(rs: list[SagaRecord]) -> set[str]:
            return {r.saga_id for r in rs}

        assert ids(await store.find(saga_type="alpha")) == {a.saga_id, b.saga_id}
        assert ids(await store.find(statuses=[SagaStatus.FAILED, SagaStatus.COMPLETED])) == {
            b.saga_id,
            d.saga_id,
        }
        assert ids(await store.find(stuck_at=now)) == {c.saga_id}
        assert ids(await store.find(saga_type="alpha", stuck_at=now)) == set()
        assert len(await store.find(limit=2)) == 2

    # -- the orchestrator on this store: two recovery workers, one instance -------------------

    async def test_two_recovery_workers_race_for_one_instance(self, store: SagaStore) -> None:
        effects: list[str] = []
        gate, started = asyncio.Event(), asyncio.Event()

        async def slow(d: _Data) -> _Data:
            effects.append("slow")
            started.set()
            await gate.wait()
            return d.model_copy(update={"n": d.n + 1})

        saga = (
            Saga("race", _Data)
            .step("slow", slow, compensate=lambda d: None)
            .pivot("end", lambda d: d)
        )
        clock = FakeClock()
        first = SagaOrchestrator(store, [saga], clock=clock, lease_seconds=10)
        task = asyncio.create_task(first.start(saga, _Data()))
        await started.wait()
        task.cancel()  # the first process dies in the middle of the step
        with pytest.raises(asyncio.CancelledError):
            await task
        effects.clear()
        clock.advance(11)  # its lease expires
        async with self.open_again(store) as other:
            w1 = SagaOrchestrator(store, [saga], clock=clock, lease_seconds=10)
            w2 = SagaOrchestrator(other, [saga], clock=clock, lease_seconds=10)
            gate.set()
            counts = await asyncio.gather(w1.recover(), w2.recover())
        assert sorted(counts) == [0, 1]
        assert effects == ["slow"]
        [rec] = await store.find(saga_type="race")
        assert rec.status is SagaStatus.COMPLETED

    # -- replies recorded while another process holds the instance ---------------------------

    async def test_recorded_replies_ride_on_the_instance_until_a_save_applies_them(
        self, store: SagaStore
    ) -> None:
        now = T0 + timedelta(seconds=100)
        rec = _record(
            lease_owner="holder",
            lease_until=now + timedelta(seconds=10),
            wake_at=now + timedelta(seconds=60),
        )
        await store.save(rec)
        assert await store.add_reply(rec.saga_id, "action 1 charge", b'{"r":1}') is True
        assert await store.add_reply(rec.saga_id, "action 1 charge", b'{"r":"again"}') is False
        assert await store.add_reply(rec.saga_id, "action 1 ship", b'{"r":2}') is True
        got = await store.get(rec.saga_id)
        # the instance itself is as the holder left it: version, lease, wake time
        assert (got.version, got.lease_owner, got.lease_until, got.wake_at) == (
            1,
            "holder",
            rec.lease_until,
            rec.wake_at,
        )
        assert list(got.replies.items()) == [
            ("action 1 charge", b'{"r":1}'),
            ("action 1 ship", b'{"r":2}'),
        ]
        # held: nobody claims it; once the lease passes, the replies make it claimable
        # although its wake time is still far
        assert await store.claim("me", now, now + timedelta(seconds=30), 10) == []
        later = now + timedelta(seconds=11)
        [claimed] = await store.claim("me", later, later + timedelta(seconds=30), 10)
        assert claimed.version == 2 and claimed.replies == got.replies
        # a reply recorded after the read survives the save that applies the others
        assert await store.add_reply(rec.saga_id, "action 2 charge", b'{"r":3}') is True
        stale = got.copy()
        stale.version += 1
        with pytest.raises(ConcurrencyError):
            await store.save(stale)  # a stale write deletes nothing either
        assert len((await store.get(rec.saga_id)).replies) == 3
        claimed.version += 1
        claimed.lease_owner = claimed.lease_until = None
        await store.save(claimed)
        after = await store.get(rec.saga_id)
        assert after.replies == {"action 2 charge": b'{"r":3}'}
        assert (await store.claim("x", later, later, 10))[0].saga_id == rec.saga_id
        other = _record()
        await store.save(other)
        assert (await store.get(other.saga_id)).replies == {}

    async def test_a_reply_while_another_process_holds_the_instance_is_applied_after_its_lease(
        self, store: SagaStore
    ) -> None:
        """The orchestrator that ran the step died holding the instance's lease (a SIGKILL,
        here a cancelled task); the participant's reply reaches another process while that
        lease is live. With the bus's default redeliveries (5 attempts, ~1.5 s) the reply
        must not be dead-lettered: it is recorded on the instance and applied once the lease
        has passed, without asking the participant again."""
        outbox_store = self.outbox_for(store)
        if outbox_store is None:
            pytest.skip("no outbox hook for this backend")
        gate, started = asyncio.Event(), asyncio.Event()

        async def pack(d: _Data) -> _Data:
            started.set()
            await gate.wait()
            return d.model_copy(update={"tags": [*d.tags, "packed"]})

        saga = _charge_and_pack("held-reply", pack, "conf.saga.charge")
        clock = FakeClock()
        transport = MemoryTransport()
        topic, group = "conf.saga.replies", "conf-orch"
        audit = dead_letter_topic(topic, group)
        await transport.declare_group(audit, "audit")

        def orchestrator(s: SagaStore, bus: EventBus) -> SagaOrchestrator:
            return SagaOrchestrator(
                s,
                [saga],
                bus=bus,
                outbox=Outbox(outbox_store),
                clock=clock,
                lease_seconds=10,
                reply_topic=topic,
                reply_group=group,
            )

        dead = orchestrator(store, EventBus(transport))  # its bus never consumes
        task = asyncio.create_task(dead.start(saga, _Data()))
        await started.wait()  # the command is in the outbox; "pack" runs under the lease
        task.cancel()  # the process dies holding the lease
        with pytest.raises(asyncio.CancelledError):
            await task
        [rec] = await store.find(saga_type="held-reply")
        assert rec.lease_owner == dead.owner and rec.lease_until is not None
        pending = (await outbox_store.status()).pending
        async with self.open_again(store) as other:
            bus = EventBus(transport)  # the bus's defaults: 5 attempts, ~1.5 s in all
            live = orchestrator(other, bus)
            async with bus:
                await bus.publish(
                    SagaReply(
                        saga_id=rec.saga_id,
                        saga_type="held-reply",
                        step="charge",
                        purpose="action",
                        attempt=1,
                        ok=True,
                        data={"payment": "p-1"},
                    ),
                    topic=topic,
                )

                async def settled() -> bool:
                    got = await store.get(rec.saga_id)
                    return (
                        bool(getattr(got, "replies", None)) or transport.pending(audit, "audit") > 0
                    )

                await eventually(settled, what="the reply recorded on the instance")
                assert transport.pending(audit, "audit") == 0, "the reply was dead-lettered"
                held = await store.get(rec.saga_id)
                assert held.status is SagaStatus.RUNNING and held.version == rec.version
                gate.set()
                clock.advance(11)  # the dead process's lease runs out

                async def done() -> bool:
                    return (await store.get(rec.saga_id)).status is SagaStatus.COMPLETED

                await eventually(done, what="the saga completed by the live process")
                await live.close()
        end = await store.get(rec.saga_id)
        data = end.data if isinstance(end.data, dict) else end.data.model_dump()
        assert data == {"n": 1, "tags": ["p-1", "packed"]} or data == {
            "n": 1,
            "tags": ["packed", "p-1"],
        }
        assert end.replies == {}
        assert [h.step for h in end.history if h.event == "reply"] == ["charge"]
        # applied from the record: the participant was not asked again
        assert (await outbox_store.status()).pending == pending
        assert transport.pending(audit, "audit") == 0

    async def test_a_reply_to_the_driving_process_is_durable_before_it_is_acked(
        self, store: SagaStore
    ) -> None:
        """The participant answers a remote step while the process that sent it still runs
        a local step beside it (a parallel group). That process acks the reply's delivery;
        it then dies before its next save (a SIGKILL: here its task is left blocked and its
        bus stopped). The reply must be in the store: the recovery worker that takes over
        applies it, without waiting out the step's timeout and without asking again."""
        outbox_store = self.outbox_for(store)
        if outbox_store is None:
            pytest.skip("no outbox hook for this backend")
        started, never = asyncio.Event(), asyncio.Event()
        calls: list[int] = []

        async def pack(d: _Data) -> _Data:
            calls.append(1)
            if len(calls) == 1:  # the first process dies in here
                started.set()
                await never.wait()
            return d.model_copy(update={"tags": [*d.tags, "packed"]})

        saga = _charge_and_pack("driver-reply", pack, "conf.saga.charge2")
        clock = FakeClock()
        transport = MemoryTransport()
        topic, group = "conf.saga.replies2", "conf-orch2"

        def orchestrator(s: SagaStore, bus: EventBus) -> SagaOrchestrator:
            return SagaOrchestrator(
                s,
                [saga],
                bus=bus,
                outbox=Outbox(outbox_store),
                clock=clock,
                lease_seconds=10,
                reply_topic=topic,
                reply_group=group,
            )

        dead_bus = EventBus(transport)
        dead = orchestrator(store, dead_bus)
        task = asyncio.create_task(dead.start(saga, _Data(), saga_id=new_id()))
        try:
            async with dead_bus:
                await started.wait()  # the command is in the outbox; "pack" runs
                [rec] = await store.find(saga_type="driver-reply")
                await dead_bus.publish(
                    SagaReply(
                        saga_id=rec.saga_id,
                        saga_type="driver-reply",
                        step="charge",
                        purpose="action",
                        attempt=1,
                        ok=True,
                        data={"payment": "p-1"},
                    ),
                    topic=topic,
                )

                async def handed_over() -> bool:
                    return bool(dead._mailbox.get(rec.saga_id))

                await eventually(handed_over, what="the reply handed to the driving task")
            # the bus is stopped and the driving task never saves again: the process is gone
            pending = (await outbox_store.status()).pending
            clock.advance(11)  # its lease runs out
            async with self.open_again(store) as other:
                live = orchestrator(other, EventBus(transport))
                assert await live.recover() == 1
                end = await store.get(rec.saga_id)
                assert end.status is SagaStatus.COMPLETED, (end.status, end.history)
                await live.close()
            data = end.data if isinstance(end.data, dict) else end.data.model_dump()
            assert sorted(data["tags"]) == ["p-1", "packed"]
            assert not [h for h in end.history if h.event == "timed out"]
            assert end.replies == {}
            # applied from the record: the participant was not asked again
            assert (await outbox_store.status()).pending == pending
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await dead.close()
