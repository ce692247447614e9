"""Fakes for tests: a clock that moves only when the test moves it."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from datetime import UTC, datetime, timedelta

__all__ = ["FakeClock"]

_EPOCH = datetime(2030, 1, 1, tzinfo=UTC)


class FakeClock:
    """A :class:`msdata.clock.Clock` that stands still until :meth:`advance` moves it.

    ``now()`` starts at ``start`` (default 2030-01-01T00:00Z), ``monotonic()`` at 0; both move
    together by exactly what ``advance`` (or ``set``) says. ``await sleep(s)`` returns once the
    clock has been advanced ``s`` seconds past the call (``sleep(0)`` yields once and returns),
    so a test of a lease, a deadline or an expiry moves time and checks the exact outcome,
    never sleeps for real."""

    def __init__(self, start: datetime = _EPOCH) -> None:
        if start.tzinfo is None:
            raise ValueError("FakeClock needs a timezone-aware start time")
        self._now = start.astimezone(UTC)
        self._mono = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._mono + seconds, next(self._order), fut))
        await fut

    @property
    def sleepers(self) -> int:
        """How many ``sleep`` calls are waiting (cancelled ones excluded)."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (>= 0) and wake the sleepers whose time has
        come, earliest first. They run when the test next yields to the event loop."""
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        self._mono += seconds
        self._now += timedelta(seconds=seconds)
        while self._sleepers and self._sleepers[0][0] <= self._mono:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)

    def set(self, when: datetime) -> None:
        """Move the wall clock to ``when`` (not earlier than now); monotonic moves with it."""
        self.advance((when - self._now).total_seconds())

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now.isoformat()}, monotonic={self._mono})"
