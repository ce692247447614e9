"""Time-ordered identifiers (UUIDv7, RFC 9562) and the UTC clock."""

from __future__ import annotations

import os
import random
import threading
import time
from datetime import UTC, datetime
from uuid import UUID

__all__ = ["new_id", "utc_now", "uuid7"]

_lock = threading.Lock()
_last_ms = 0
_tail = 0  # the 74 bits after the timestamp, less the version and variant bits
# Not a secret: ids must be unique and ordered, not unguessable. random reseeds after fork.
_rand = random.getrandbits
_TAIL_MAX = (1 << 74) - 1


def _after_fork() -> None:
    # a child must not continue its parent's counter inside the same millisecond
    global _last_ms
    _last_ms = 0


os.register_at_fork(after_in_child=_after_fork)


def _next_int() -> int:
    """RFC 9562 UUIDv7, "monotonic random" method: 48-bit Unix milliseconds, then 74 bits
    that start at a random point each millisecond and count up within it, so ids made by one
    process are strictly increasing and ids of different processes do not collide."""
    global _last_ms, _tail
    ms = time.time_ns() // 1_000_000
    with _lock:
        if ms > _last_ms:
            _last_ms = ms
            _tail = _rand(73)  # the top bit stays clear: room to count up in this ms
        else:
            _tail += 1
            if _tail > _TAIL_MAX:  # counted through a whole millisecond: borrow the next
                _last_ms += 1
                _tail = _rand(73)
            ms = _last_ms
        tail = _tail
    # ms(48) | ver 7 (4) | tail high 12 | variant 10 (2) | tail low 62
    return ms << 80 | 0x7 << 76 | (tail >> 62) << 64 | 0b10 << 62 | (tail & 0x3FFF_FFFF_FFFF_FFFF)


def uuid7() -> UUID:
    """A new UUIDv7 (time-ordered)."""
    return UUID(int=_next_int())


def new_id() -> str:
    """A new message id: a UUIDv7 in its canonical text form."""
    h = "%032x" % _next_int()  # noqa: UP031 - the fastest way to format it here
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def utc_now() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)
