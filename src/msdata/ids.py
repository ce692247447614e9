"""Time-ordered identifiers (UUIDv7, RFC 9562) and the UTC clock."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime
from uuid import UUID

__all__ = ["new_id", "utc_now", "uuid7"]

_lock = threading.Lock()
_last_ms = 0
_seq = 0
# Not a secret: ids must be unique and ordered, not unguessable. random reseeds after fork.
_rand = random.getrandbits


def uuid7() -> UUID:
    """A UUIDv7: 48-bit Unix milliseconds, then a 12-bit counter that keeps ids made in the
    same millisecond in creation order within this process, then 62 random bits."""
    global _last_ms, _seq
    ms = time.time_ns() // 1_000_000
    with _lock:
        if ms > _last_ms:
            _last_ms = ms
            _seq = _rand(8)  # leave room for 3,800+ ids in the same millisecond
        else:
            _seq += 1
            if _seq > 0xFFF:  # counter overflow: borrow the next millisecond
                _last_ms += 1
                _seq = 0
            ms = _last_ms
        seq = _seq
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | seq << 64 | 0b10 << 62 | _rand(62)
    return UUID(int=value)


def new_id() -> str:
    """A new message id: a UUIDv7 in its canonical text form."""
    return str(uuid7())


def utc_now() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)
