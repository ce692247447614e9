"""The one way tests wait for something to become true."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

__all__ = ["eventually"]


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10.0,
    *,
    interval: float = 0.01,
    what: str | Callable[[], str] | None = None,
) -> None:
    """Return as soon as ``predicate()`` is true; fail the test (``AssertionError``) if it is
    still false after ``timeout`` seconds of real time. ``predicate`` may be sync or async;
    it is checked every ``interval`` seconds and once more at the deadline. ``what`` names
    the condition in the failure message (default: the predicate's name); a callable ``what``
    is called at the deadline, so the message can say how far things got."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            name = what() if callable(what) else what
            name = name or getattr(predicate, "__qualname__", repr(predicate))
            raise AssertionError(f"not true after {timeout} s: {name}")
        await asyncio.sleep(interval)
