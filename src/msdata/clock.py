"""The clock every time-dependent part of msdata reads: leases, retention, retry delays,
saga deadlines and idempotency expiry.

Code that needs the time takes a ``clock: Clock`` (default :data:`SYSTEM_CLOCK`) instead of
calling ``datetime.now`` or ``time.monotonic`` itself, so tests drive it with
:class:`msdata.testing.FakeClock` and check expiry exactly instead of sleeping.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """A source of time.

    - ``now()``: the wall-clock time, timezone-aware, in UTC. Stored times (lease ends,
      expiry, ``created_at``) are computed from it.
    - ``monotonic()``: seconds from an arbitrary origin that never go backwards; for
      measuring durations and local deadlines.
    - ``sleep(seconds)``: wait that long on this clock (a fake clock returns when the test
      advances it past the deadline).
    """

    def now(self) -> datetime: ...

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock: ``datetime.now(UTC)``, ``time.monotonic()`` and ``asyncio.sleep``."""

    __slots__ = ()

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def __repr__(self) -> str:
        return "SystemClock()"


#: The clock used when none is given.
SYSTEM_CLOCK: Clock = SystemClock()
