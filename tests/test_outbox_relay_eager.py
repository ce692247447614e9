"""The relay's eager store calls (``msdata.outbox.relay._eager``): a call that finishes
without waiting costs no task and no turn of the loop; one that waits goes on in a task
exactly as ``await`` would carry it (values, exceptions, cancellation, its context)."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from msdata.outbox.relay import _eager

var: contextvars.ContextVar[str] = contextvars.ContextVar("eager_test", default="outside")


async def test_a_call_that_never_waits_is_done_at_once_in_its_own_context() -> None:
    async def call() -> str:
        var.set("inside")
        return var.get()

    fut = _eager(call())
    assert fut.done() and fut.result() == "inside"
    assert var.get() == "outside"  # as in a task: the call's context is a copy


async def test_a_call_that_fails_at_once_gives_a_failed_future() -> None:
    async def call() -> None:
        raise ValueError("no")

    fut = _eager(call())
    assert fut.done()
    with pytest.raises(ValueError, match="no"):
        await fut


async def test_a_call_that_waits_goes_on_in_a_task_with_what_it_awaited() -> None:
    gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    steps: list[str] = []

    async def call() -> int:
        var.set("inside")
        steps.append("before")
        got = await gate
        await asyncio.sleep(0)  # a bare yield passes through too
        steps.append(var.get())
        return got + 1

    fut = _eager(call())
    assert steps == ["before"] and not fut.done()  # it ran up to its first wait at once
    gate.set_result(41)
    assert await fut == 42
    assert steps == ["before", "inside"] and var.get() == "outside"


async def test_an_exception_after_a_wait_reaches_the_caller() -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def call() -> None:
        await gate

    fut = _eager(call())
    gate.set_exception(OSError("down"))
    with pytest.raises(OSError, match="down"):
        await fut


async def test_cancelling_a_waiting_call_cancels_it_where_it_waits() -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    seen: list[str] = []

    async def call() -> None:
        try:
            await gate
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    fut = _eager(call())
    await asyncio.sleep(0)
    fut.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fut
    assert seen == ["cancelled"] and gate.cancelled()
