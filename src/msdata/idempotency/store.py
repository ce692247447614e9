"""The idempotency store port: one record per (scope, key), changed by single atomic steps.

Implemented by ``msdata.adapters.{memory,sqlite,postgres,redis}``; checked by the
conformance suite in :mod:`msdata.testing.conformance.idempotency`.

The state machine lives once, in :class:`msdata.idempotency.IdempotencyKeys` (after the
Powertools for AWS Lambda persistence layer, ``idempotency/persistence/base.py``): a store
only reads, conditionally inserts, updates and deletes records. It stores two states,
IN_PROGRESS and COMPLETED; EXPIRED is never stored: a record whose ``expires_at`` is not
after the ``now_us`` the caller passes counts as absent. The caller reads ``now`` from its
injected clock, so expiry is tested exactly with a fake clock.

Where each call runs (``conn``):

- ``conn=None``: one short transaction of the store's own, on a connection it owns,
  committed before the call returns (the store's own mode: effects outside the database).
- ``conn`` given (SQL and memory stores): the caller's own connection, inside its open
  transaction (:mod:`msdata.storage`); the store never commits or rolls back, so the claim
  and the completion commit with the caller's effects. A connection with no open
  transaction is refused with :class:`msdata.errors.ConfigurationError`. A concurrent claim
  of the same key from another transaction then waits for the row lock (PostgreSQL,
  SQLite's write lock) until the first transaction ends, and sees what it committed.

Every call is safe to make concurrently from many tasks and processes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, Protocol, runtime_checkable

from msdata.errors import ConfigurationError

__all__ = [
    "IdempotencyRecord",
    "IdempotencyStatus",
    "IdempotencyStore",
    "IdempotencyStoreFeatures",
    "LiveRecord",
    "TokenFactory",
    "check_purge_time",
]


class IdempotencyStatus(enum.StrEnum):
    """A key's state. Stores keep IN_PROGRESS and COMPLETED; EXPIRED is derived."""

    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    EXPIRED = "EXPIRED"


class IdempotencyRecord(NamedTuple):
    """One stored key, as :meth:`IdempotencyStore.get` returns it (immutable).

    - ``scope``: the owner (tenant, user, API client); part of the key.
    - ``fingerprint``: hash of the request that claimed the key (hex sha256, or "").
    - ``completed``: False while IN_PROGRESS.
    - ``expires_at``: the lease's end while IN_PROGRESS, the end of retention once
      COMPLETED (aware UTC datetime); from then on the key is free again.
    - ``token``: the claim's own id; ``complete`` and ``release`` only act on the claim
      that holds the record (fencing off a holder whose lease expired and was taken over).
    - ``response``: the stored result (bytes, opaque to the store) once COMPLETED.
    """

    scope: str
    key: str
    fingerprint: str
    completed: bool
    expires_at: datetime
    token: str
    response: bytes | None = None

    def status(self, now: datetime) -> IdempotencyStatus:
        """IN_PROGRESS, COMPLETED, or EXPIRED when ``expires_at <= now``."""
        if self.expires_at <= now:
            return IdempotencyStatus.EXPIRED
        return IdempotencyStatus.COMPLETED if self.completed else IdempotencyStatus.IN_PROGRESS


@dataclass(frozen=True, slots=True)
class IdempotencyStoreFeatures:
    """What a store can do, so callers and the conformance suite need no type checks.

    - ``joins_transaction``: calls take the caller's connection (``conn``) and run in its
      transaction (SQL and memory stores; not Redis).
    - ``sync``: the sync methods work (``claim``/``complete``/``release``); with
      ``sync_own_transaction`` also with ``conn=None``.
    """

    joins_transaction: bool
    sync: bool
    sync_own_transaction: bool


#: What a claim returns for a key that is live (not expired): ``(fingerprint, completed,
#: response, token)`` of its record, a plain tuple (SQLite's row itself: no object is built
#: on a replay). ``completed``: truthy once COMPLETED (a bool, or SQLite's 0/1);
#: ``response``: the stored bytes once COMPLETED, else None; ``token``: the holder's.
LiveRecord = tuple[str, int, bytes | None, str]

#: Makes a new claim token (a str unique across processes); a store calls it only when it
#: may write a claim, so a replay on a store that reads first makes none.
TokenFactory = Callable[[], str]


@runtime_checkable
class IdempotencyStore(Protocol):
    """Where idempotency records live. See the module docstring for ``conn`` and expiry.

    Times are integer microseconds since the Unix epoch (``now_us``, ``until_us``: exact,
    and no datetime is built or taken apart on a replay); :meth:`get` and :meth:`purge`,
    which are for tools, use aware datetimes.

    ``claim_async(conn, scope, key, fingerprint, now_us, until_us, new_token)`` is ONE
    atomic conditional write: if (scope, key) has no record, or its expiry is not after
    ``now_us``, it writes an IN_PROGRESS record (``fingerprint``, a token from
    ``new_token()``, lease end ``until_us``, no response) and returns that token (a
    ``str``): the caller holds the key. Otherwise it changes nothing and returns the live
    record as a :data:`LiveRecord` tuple, so a replay costs one call. Of any number of
    concurrent claims of one free key exactly one returns a str.

    ``complete_async(conn, scope, key, token, response, until_us)``: if the record still
    carries ``token``, make it COMPLETED with ``response`` until ``until_us`` and return
    True; otherwise (the lease lapsed and another claim took the key, or it was deleted)
    change nothing and return False.

    ``release_async(conn, scope, key, token)``: delete the record if it still carries
    ``token`` (the operation failed: the key is free at once); True if deleted.

    ``get(scope, key)``: the stored record, expired or not (own connection; for tools and
    tests). ``purge(now)``: delete records with ``expires_at <= now``; returns how many
    (Redis lets its own TTL do this and returns 0).

    The sync ``claim``/``complete``/``release`` do the same for sync callers where
    ``features.sync`` says so; a store raises ConfigurationError where it does not.
    """

    features: IdempotencyStoreFeatures

    async def claim_async(
        self,
        conn: Any,
        scope: str,
        key: str,
        fingerprint: str,
        now_us: int,
        until_us: int,
        new_token: TokenFactory,
    ) -> str | LiveRecord: ...

    async def complete_async(
        self,
        conn: Any,
        scope: str,
        key: str,
        token: str,
        response: bytes,
        until_us: int,
    ) -> bool: ...

    async def release_async(self, conn: Any, scope: str, key: str, token: str) -> bool: ...

    def claim(
        self,
        conn: Any,
        scope: str,
        key: str,
        fingerprint: str,
        now_us: int,
        until_us: int,
        new_token: TokenFactory,
    ) -> str | LiveRecord: ...

    def complete(
        self,
        conn: Any,
        scope: str,
        key: str,
        token: str,
        response: bytes,
        until_us: int,
    ) -> bool: ...

    def release(self, conn: Any, scope: str, key: str, token: str) -> bool: ...

    async def get(self, scope: str, key: str) -> IdempotencyRecord | None: ...

    async def purge(self, now: datetime) -> int:
        """Delete the records that expired at or before ``now`` (an aware datetime:
        :func:`check_purge_time`); returns how many (0 for stores that expire keys
        themselves)."""
        ...

    def schema_sql(self) -> str: ...

    async def create_schema(self) -> None: ...

    async def close(self) -> None: ...


def check_purge_time(now: object) -> datetime:
    """``purge``'s argument: an aware datetime (``clock.now()``,
    ``datetime.now(UTC) - timedelta(days=1)``); a naive one, a number or anything else
    raises ConfigurationError (a naive time would be read in an unknown zone)."""
    if not isinstance(now, datetime) or now.utcoffset() is None:
        raise ConfigurationError(
            "purge(now) takes an aware datetime (e.g. datetime.now(UTC)), got "
            f"{now!r}: records that expired at or before it are deleted"
        )
    return now
