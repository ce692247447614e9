"""Time-ordered identifiers (UUIDv7, RFC 9562) and the UTC clock."""

from __future__ import annotations

import os
import random
import threading
import time
from datetime import UTC, datetime, timedelta
from uuid import UUID

from pydantic_core import to_json

__all__ = ["new_id", "new_ids", "utc_now", "uuid7"]

_time_ns = time.time_ns
_lock = threading.Lock()
_last_ms = 0
_tail = 0  # the 74 bits after the timestamp, less the version and variant bits
# Not a secret: ids must be unique and ordered, not unguessable. random reseeds after fork.
_rand = random.getrandbits
_TAIL_MAX = (1 << 74) - 1
# new_id's cache: (milliseconds, tail >> 8, the id's first 34 characters for them), one
# tuple so that a thread reads the three together
_head: tuple[int, int, str] = (-1, -1, "")


def _after_fork() -> None:
    # a child must not continue its parent's counter inside the same millisecond
    global _last_ms
    _last_ms = 0


os.register_at_fork(after_in_child=_after_fork)


def _next_int() -> int:
    """RFC 9562 UUIDv7, "monotonic random" method: 48-bit Unix milliseconds, then 74 bits
    that start at a random point each millisecond and count up within it, so ids made by one
    process are strictly increasing and ids of different processes do not collide."""
    ms, tail = _next()
    # ms(48) | ver 7 (4) | tail high 12 | variant 10 (2) | tail low 62
    return ms << 80 | 0x7 << 76 | (tail >> 62) << 64 | 0b10 << 62 | (tail & 0x3FFF_FFFF_FFFF_FFFF)


def _next() -> tuple[int, int]:
    """The next (milliseconds, tail) pair of this process (see :func:`_next_int`)."""
    global _last_ms, _tail
    ms = time.time_ns() // 1_000_000
    # acquire/release, not ``with``: half the cost on this hot path, and nothing in the
    # block can raise
    _lock.acquire()
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
    _lock.release()
    return ms, tail


def uuid7() -> UUID:
    """A new UUIDv7 (time-ordered)."""
    return UUID(int=_next_int())


def new_id() -> str:
    """A new message id: a UUIDv7 in its canonical text form (as ``str(uuid7())``)."""
    global _last_ms, _tail
    # _next() inlined, and the text built from a cached head: the first 34 of the 36
    # characters change only once in 256 consecutive tails (or with the millisecond), so
    # most ids are a cached head and a table's last two hex digits
    ms = _time_ns() // 1_000_000
    _lock.acquire()
    if ms > _last_ms:
        _last_ms = ms
        _tail = _rand(73)
    else:
        _tail += 1
        if _tail > _TAIL_MAX:
            _last_ms += 1
            _tail = _rand(73)
        ms = _last_ms
    tail = _tail
    _lock.release()
    cached = _head
    if tail >> 8 != cached[1] or ms != cached[0]:
        return _new_head(ms, tail) + _HEX2[tail & 0xFF]
    return cached[2] + _HEX2[tail & 0xFF]


def _new_head(ms: int, tail: int) -> str:
    """The first 34 characters of the id of (``ms``, ``tail``), cached for the 256 tails
    that share them."""
    global _head
    high = tail >> 48
    # ms(48) as 8-4 | ver 7, tail bits 73..62 | variant 10, tail bits 61..48 | bits 47..8
    head = "%08x-%04x-7%03x-%04x-%010x" % (  # noqa: UP031
        ms >> 16,
        ms & 0xFFFF,
        high >> 14,
        0x8000 | high & 0x3FFF,
        tail >> 8 & 0xFF_FFFF_FFFF,
    )
    _head = (ms, tail >> 8, head)
    return head


# "00".."ff": the last two hex digits of consecutive ids, so that a batch formats one
# number per 256 ids (new_ids)
_HEX2 = tuple(f"{i:02x}" for i in range(256))


def new_ids(n: int) -> list[str]:
    """``n`` new message ids, as ``n`` calls of :func:`new_id` would make them (strictly
    increasing after every id made before, UUIDv7 text), from one clock read: consecutive
    values of the counter, so the text is formatted once per 256 ids and the rest is a
    table lookup. ``n`` >= 0."""
    global _last_ms, _tail
    if n <= 0:
        return []
    ms = _time_ns() // 1_000_000
    _lock.acquire()
    if ms > _last_ms:
        first = _rand(73)
    else:
        first = _tail + 1
        ms = _last_ms
    last = first + n - 1
    if last > _TAIL_MAX:  # not in this millisecond's room (never in practice): one by one
        _lock.release()
        return [new_id() for _ in range(n)]
    _last_ms = ms
    _tail = last
    _lock.release()
    out: list[str] = []
    at = first
    end = last + 1
    while at < end:
        # one block of up to 256 ids that share all but their last two hex digits (a block
        # never crosses a carry out of the low 48 bits: 2**48 is a multiple of 256)
        high = at >> 48
        low = at & 0xFFFF_FFFF_FFFF
        stop = min((at | 0xFF) + 1, end)
        prefix = "%08x-%04x-7%03x-%04x-%010x" % (  # noqa: UP031
            ms >> 16,
            ms & 0xFFFF,
            high >> 14,
            0x8000 | high & 0x3FFF,
            low >> 8,
        )
        out += [prefix + h for h in _HEX2[low & 0xFF : (low & 0xFF) + stop - at]]
        at = stop
    return out


# new_id_time's cache of the current second: (its start in microseconds since the epoch,
# its datetime, its RFC 3339 text as pydantic-core writes it, up to the seconds:
# '"2026-11-30T23:45:07'), one tuple read at once
_second: tuple[int, datetime, str] = (-(1 << 62), datetime.min, "")
# the text of the microseconds ".123456Z\"", in two halves
_MS_TEXT = tuple(f".{i:03d}" for i in range(1000))
_US_TEXT = tuple(f'{i:03d}Z"' for i in range(1000))


def _new_second(us: int) -> tuple[int, datetime, str]:
    """The cache entry of the second holding ``us`` (microseconds since the epoch)."""
    global _second
    start = us - us % 1_000_000
    at = datetime.fromtimestamp(start // 1_000_000, UTC)
    text = to_json(at).decode()  # '"2026-11-30T23:45:07Z"': the microsecond is 0
    _second = (start, at, text[:-2])
    return _second


# new_id_time's cache of the current millisecond: (the millisecond, its first microsecond
# counted from the start of its second, the datetime of that microsecond, the text of its
# second as in _second, and the text up to the millisecond: '"2026-11-30T23:45:07.123')
_milli: tuple[int, int, datetime, str, str] = (-1, 0, datetime.min, "", "")
# timedelta(microseconds=i) for i < 1000: a datetime within a millisecond is one addition
_US_DELTA = tuple(timedelta(microseconds=i) for i in range(1000))


def _new_milli(ms: int) -> tuple[int, int, datetime, str, str]:
    """The cache entry of millisecond ``ms`` (since the epoch)."""
    global _milli
    second = _second
    offset = ms * 1000 - second[0]
    if offset >= 1_000_000 or offset < 0:
        second = _new_second(ms * 1000)
        offset = ms * 1000 - second[0]
    at = second[1] + timedelta(microseconds=offset)
    _milli = (ms, offset, at, second[2], second[2] + _MS_TEXT[offset // 1000])
    return _milli


def new_id_time() -> tuple[str, datetime, str]:
    """A new message id as :func:`new_id` makes it, the current UTC time from the same clock
    reading (microseconds) and that time as the JSON string pydantic-core writes for it
    (``'"2026-11-30T23:45:07.123456Z"'``, no fraction at microsecond 0). Internal to the
    package: the event bus's ``publish``. (The id's millisecond is that of the reading,
    unless the clock went back or the millisecond's counter ran out: then, as new_id, the
    one after the last id's.)"""
    global _last_ms, _tail
    us = _time_ns() // 1000
    ms = us // 1000
    _lock.acquire()
    if ms > _last_ms:
        _last_ms = ms
        _tail = _rand(73)
        id_ms = ms
    else:
        _tail += 1
        if _tail > _TAIL_MAX:
            _last_ms += 1
            _tail = _rand(73)
        id_ms = _last_ms
    tail = _tail
    _lock.release()
    cached = _head
    head = cached[2] if tail >> 8 == cached[1] and id_ms == cached[0] else _new_head(id_ms, tail)
    milli = _milli
    if ms != milli[0]:
        milli = _new_milli(ms)
    within = us % 1000  # the microseconds within the millisecond
    when = milli[2] + _US_DELTA[within]
    if within or milli[1]:  # a fraction of a second: pydantic-core writes all 6 digits
        return head + _HEX2[tail & 0xFF], when, milli[4] + _US_TEXT[within]
    return head + _HEX2[tail & 0xFF], when, milli[3] + 'Z"'


def utc_now() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)
