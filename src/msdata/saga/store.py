"""The saga store port: where saga instances are kept between steps.

Implemented by ``msdata.adapters.memory.MemorySagaStore``, ``msdata.adapters.sqlite``'s and
``msdata.adapters.postgres``'s ``SagaStore`` classes; checked by
:class:`msdata.testing.conformance.saga.SagaStoreConformance`.

Contract:

- Every call is one short transaction of the store's own (saga state is msdata's, not the
  caller's business data), committed before the call returns.
- ``save(record, also=...)`` is an optimistic write: it succeeds only if the stored version is
  ``record.version - 1`` (``0``: the instance must not exist yet) and raises
  :class:`msdata.errors.ConcurrencyError` naming the saga and both versions otherwise, having
  changed nothing; it raises :class:`msdata.errors.EncodeError` (having changed nothing)
  for data JSON cannot hold so that it reads back the same (:func:`data_json`: NaN,
  Infinity, a lone surrogate...), on every store alike, also one that keeps the object.
  ``also(conn)``, when given, is called inside the same transaction after
  the write, with the store's connection (``features.async_connection`` says whether it is
  an async one); its writes (the outbox rows of the command a remote step sends) commit with
  the state or not at all. ``also`` may return an awaitable, which the store awaits.
- ``claim`` hands each instance to one caller at a time: it leases to ``owner`` the RUNNING
  and COMPENSATING instances whose lease has expired (or was released) and whose ``wake_at``
  has come, raising each one's version by one. Two concurrent claims never return the same
  instance. Safe to call concurrently from several processes.
- ``add_reply(saga_id, key, reply)`` records a reply for an instance in its own short
  transaction, without touching the instance's version or lease (another process may hold
  it): the reply of a remote step that arrived while the instance was held. A second call
  with the same ``key`` changes nothing. Records handed out by ``get`` and ``claim`` carry
  the instance's recorded replies in ``replies`` (oldest first); ``save(record)`` deletes
  the ones in ``record.replies`` in the same transaction as the write (the writer applied
  them, or found them late), and leaves any recorded since. ``claim`` also takes an
  instance with recorded replies whose ``wake_at`` has not come (its lease must still be
  free): a reply is never left waiting for a timeout.
- Records handed out are copies: changing one never changes what the store holds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple, Protocol, runtime_checkable

import pydantic_core
from pydantic import BaseModel

from msdata.errors import EncodeError
from msdata.serialization import _INT_LIMIT_BITS, _check_plan, _suspect, _unencodable
from msdata.storage import from_unix_us, unix_us

__all__ = [
    "ACTIVE_STATUSES",
    "HistoryEntry",
    "SagaRecord",
    "SagaStatus",
    "SagaStore",
    "SagaStoreFeatures",
    "StepRun",
    "check_data",
    "check_data_value",
    "data_json",
    "encode_data",
    "record_from_json",
    "record_to_json",
]


class SagaStatus(StrEnum):
    """RUNNING: going forward. COMPENSATING: undoing completed steps. COMPLETED and
    COMPENSATED: done. FAILED: a compensation (or a retriable step with a limit) gave up;
    waits for an operator to retry it."""

    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"
    FAILED = "FAILED"


ACTIVE_STATUSES = (SagaStatus.RUNNING, SagaStatus.COMPENSATING)


class HistoryEntry(NamedTuple):
    """One line of an instance's history: when (UTC), what (``started``,
    ``step started``, ``step completed``, ``step failed``, ``retry``, ``timed out``,
    ``compensation started``, ``compensated``, ``reply ignored``, ``completed``, ...), which
    step and attempt, and the error or detail."""

    at: datetime
    event: str
    step: str | None = None
    attempt: int | None = None
    detail: str | None = None


@dataclass(slots=True)
class StepRun:
    """A step invocation in progress. ``purpose``: ``action`` or ``compensation``.
    ``state``: ``running`` (a local effect under way), ``waiting`` (a remote command sent,
    no reply yet), ``retry`` (failed, tried again at ``wake_at``), ``replied`` (a reply was
    recorded: ``ok`` with ``reply`` data, or not ``ok`` with ``error``). ``wake_at``: the
    remote step's reply deadline, or when to retry. ``first``: the attempt number this
    invocation started at: 1, or after an operator's retry of a FAILED instance the number
    after every attempt the step had (attempt numbers of a step never repeat within a saga,
    so a participant tells a retried call from a redelivered one); the retry policy counts
    ``attempt - first + 1`` attempts."""

    purpose: str
    attempt: int
    state: str
    wake_at: datetime | None = None
    error: str | None = None
    ok: bool | None = None
    reply: dict[str, Any] | None = None
    sent: bool = False  # a command for this step was sent at some attempt
    first: int = 1

    def copy(self) -> StepRun:
        return StepRun(
            self.purpose,
            self.attempt,
            self.state,
            self.wake_at,
            self.error,
            self.ok,
            self.reply,
            self.sent,
            self.first,
        )


@dataclass(slots=True)
class SagaRecord:
    """One saga instance as stored.

    ``data`` is the saga data: the orchestrator hands the store its pydantic model; a store
    may give it back as the model or as its JSON form (a dict), which the orchestrator
    validates. ``position``: the index of the step group being run. ``done``: the completed
    steps in order. ``active``: the invocations in progress. ``compensation``: the groups of
    steps still to compensate, next first. ``lease_owner``/``lease_until``: who runs it, and
    until when. ``wake_at``: when an instance nobody holds should be looked at again (a
    reply deadline, a retry time). ``replies``: the replies recorded for the instance while
    another process held it (``SagaStore.add_reply``), by key, oldest first, as the store
    had them when it handed the record out; a save deletes them from the store."""

    saga_id: str
    saga_type: str
    status: SagaStatus
    data: Any
    created_at: datetime
    updated_at: datetime
    version: int = 0
    position: int = 0
    done: list[str] = field(default_factory=list)
    active: dict[str, StepRun] = field(default_factory=dict)
    compensation: list[list[str]] = field(default_factory=list)
    past_pivot: bool = False
    error: str | None = None
    deadline: datetime | None = None
    lease_owner: str | None = None
    lease_until: datetime | None = None
    wake_at: datetime | None = None
    history: list[HistoryEntry] = field(default_factory=list)
    replies: dict[str, bytes] = field(default_factory=dict)
    #: the JSON of ``history[:n]`` as (n, history[n - 1], bytes), kept by record_to_json so
    #: a save encodes only the entries added since (history only grows at its end)
    history_json: tuple[int, Any, bytes] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    #: the ``data`` object :func:`check_data` last found storable (checked again only when
    #: ``data`` is another object: steps return new data)
    data_checked: Any = field(default=None, init=False, repr=False, compare=False)

    def copy(self) -> SagaRecord:
        """A copy that shares nothing mutable with this one (``data`` is immutable by
        convention: steps return new data)."""
        active = self.active
        return SagaRecord(
            self.saga_id,
            self.saga_type,
            self.status,
            self.data,
            self.created_at,
            self.updated_at,
            self.version,
            self.position,
            self.done.copy(),
            {k: v.copy() for k, v in active.items()} if active else {},
            [g.copy() for g in self.compensation] if self.compensation else [],
            self.past_pivot,
            self.error,
            self.deadline,
            self.lease_owner,
            self.lease_until,
            self.wake_at,
            self.history.copy(),
            self.replies.copy() if self.replies else {},
        )


# -- saga data as JSON: what every store refuses ---------------------------------------------


def data_json(record: SagaRecord) -> bytes:
    """``record.data`` as JSON (the model's own). Raises :class:`msdata.errors.EncodeError`,
    naming the saga and the field, for data JSON cannot hold so that it reads back the same
    (the rules of messages, ``EncodeError``'s docstring): a float that is NaN or infinite
    (RFC 8259 §6; pydantic would write ``null``, and the instance could not be read again),
    a string with a lone surrogate (not UTF-8), an int of more than 4300 digits, nesting
    deeper than the codec's limit, a NUL character (``\\x00``) in a string or a dict key
    (PostgreSQL's jsonb cannot hold ``\\u0000``: refused by every store, so that they all
    agree). Every saga store refuses the same data with it, before writing anything."""
    data = record.data
    raw = encode_data(record.saga_id, data)
    record.data_checked = data
    return raw


def encode_data(saga_id: str, data: Any) -> bytes:
    """Saga ``data`` as JSON, refused as :func:`data_json` says (``saga_id`` names the
    instance in the error). Raises :class:`msdata.errors.EncodeError`."""
    try:
        raw: bytes = pydantic_core.to_json(data)
    except Exception as e:  # a lone surrogate, a value pydantic cannot write
        why = _unencodable(data, 1) or f": {type(e).__name__}: {e}"
        raise EncodeError(f"saga {saga_id!r}: data{why}") from None
    if _suspect(data, 1, True):  # NaN, Infinity, a long int, a non-ASCII dict key...
        problem = _unencodable(data, 1)
        if problem is not None:
            raise EncodeError(f"saga {saga_id!r}: data{problem}")
    if b"\\u0000" in raw:  # maybe a NUL (or a string holding a backslash and "u0000")
        where = _nul_path(pydantic_core.from_json(raw))
        if where is not None:
            where = where if len(where) <= 80 else where[:80] + "..."
            raise EncodeError(
                f"saga {saga_id!r}: data{where}: holds a NUL character (\\x00), which a "
                "saga store cannot hold (PostgreSQL's jsonb has no \\u0000): refused by "
                "every store alike"
            )
    return raw


def _nul_path(value: Any) -> str | None:
    """Where a NUL character is in decoded JSON (``".field[2]"``, ``""`` for the value
    itself, a dict key's path with ``(key)``), or None."""
    if isinstance(value, str):
        return "" if "\x00" in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            if "\x00" in k:
                return f".{k!r}(key)"
            inner = _nul_path(v)
            if inner is not None:
                return f".{k}{inner}"
        return None
    if isinstance(value, list):
        for i, v in enumerate(value):
            inner = _nul_path(v)
            if inner is not None:
                return f"[{i}]{inner}"
    return None


def check_data(record: SagaRecord) -> None:
    """:func:`data_json`'s check, done once per ``data`` object (a store that keeps the
    object, like the in-memory one, calls it on every save). Raises
    :class:`msdata.errors.EncodeError`."""
    data = record.data
    if record.data_checked is not data:
        check_data_value(record.saga_id, data)
        record.data_checked = data


def check_data_value(saga_id: str, data: Any) -> None:
    """:func:`encode_data`'s refusal without the JSON when it is plain to see: a model of
    ASCII strings, ints, bools, None and finite floats needs no more look (the common case,
    on the hot path of every step that returns new data); anything else is encoded.
    Raises :class:`msdata.errors.EncodeError`."""
    if not _plain(data):
        encode_data(saga_id, data)


_INFINITIES = (math.inf, -math.inf)


#: per class: whether its instances may be looked at field by field (:func:`_plain`): a
#: model without a custom serializer or extra fields (classes are few and long-lived)
_PLAIN_CLASSES: dict[type, bool] = {}


def _plain(data: Any) -> bool:
    cls = type(data)
    ok = _PLAIN_CLASSES.get(cls)
    if ok is None:
        ok = _PLAIN_CLASSES[cls] = isinstance(data, BaseModel) and _check_plan(cls).walk is not None
    if not ok or data.__pydantic_extra__:
        return False
    for value in data.__dict__.values():
        t = type(value)
        if t is str:
            if not value.isascii() or "\x00" in value:
                return False
        elif t is int:
            if value.bit_length() >= _INT_LIMIT_BITS:
                return False
        elif t is float:
            if value != value or value in _INFINITIES:
                return False
        elif not (t is bool or value is None):
            return False
    return True


# -- JSON form for SQL stores: the indexed fields get columns, the rest one JSON document -----

_to_json = pydantic_core.to_json  # several times faster than json.dumps on these lists


def to_us(dt: datetime | None) -> int | None:
    """A time as integer microseconds since the epoch (exact, :func:`msdata.storage.unix_us`)."""
    return None if dt is None else unix_us(dt)


def from_us(us: int | None) -> datetime | None:
    """The inverse of :func:`to_us`."""
    return None if us is None else from_unix_us(us)


def record_to_json(record: SagaRecord) -> bytes:
    """The fields a SQL store keeps in one JSON column (everything but saga_id, saga_type,
    status, version, lease, wake_at and the times, which get their own columns). Times in
    it are integer microseconds since the epoch; ``data`` is the model's own JSON. The
    history's JSON is kept on the record (``history_json``), so each save encodes only the
    entries added since the last one. Raises :class:`msdata.errors.EncodeError` for data
    :func:`data_json` refuses."""
    head = data_json(record)  # checked on every save: data may have been changed in place
    rest = _to_json(
        [
            record.position,
            record.done,
            {
                k: [r.purpose, r.attempt, r.state, to_us(r.wake_at), r.error, r.ok, r.reply, r.sent]
                + ([r.first] if r.first != 1 else [])
                for k, r in record.active.items()
            },
            record.compensation,
            record.past_pivot,
            record.error,
            to_us(record.deadline),
        ]
    )
    if b"\\u0000" in rest:  # a NUL in an error text: kept readable, as the text \\x00
        rest = _no_nul(rest)
    history = record.history
    n = len(history)
    cached = record.history_json
    if cached is not None and cached[0] <= n and cached[0] and history[cached[0] - 1] is cached[1]:
        start, body = cached[0], cached[2]
    else:
        start, body = 0, b""
    if start < n:
        new = _to_json([[unix_us(h[0]), h[1], h[2], h[3], h[4]] for h in history[start:]])
        if b"\\u0000" in new:
            new = _no_nul(new)
        body = body + b"," + new[1:-1] if body else new[1:-1]
        record.history_json = (n, history[-1], body)
    return b'{"data":' + head + b',"state":' + rest[:-1] + b",[" + body + b"]]}"


_NUL_ESCAPE = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")


def _no_nul(raw: bytes) -> bytes:
    """JSON ``raw`` with each NUL character in its strings written as the four characters
    ``\\x00``: an error text or history detail (a step's exception, a participant's
    failure) may hold one, and PostgreSQL's jsonb cannot (saga data holding one is refused
    instead: :func:`data_json`)."""
    return _NUL_ESCAPE.sub(rb"\1\\\\x00", raw)


def record_from_json(
    doc: bytes | str,
    *,
    saga_id: str,
    saga_type: str,
    status: str,
    version: int,
    created_at: datetime,
    updated_at: datetime,
    lease_owner: str | None,
    lease_until: datetime | None,
    wake_at: datetime | None,
    replies: dict[str, bytes] | None = None,
) -> SagaRecord:
    """Rebuild a record from its columns and the JSON of :func:`record_to_json` (and the
    instance's recorded replies, if any)."""
    d = pydantic_core.from_json(doc)
    position, done, active, compensation, past_pivot, error, deadline, history = d["state"]
    return SagaRecord(
        saga_id=saga_id,
        saga_type=saga_type,
        status=SagaStatus(status),
        data=d["data"],
        created_at=created_at,
        updated_at=updated_at,
        version=version,
        position=position,
        done=done,
        active={
            k: StepRun(
                v[0], v[1], v[2], from_us(v[3]), v[4], v[5], v[6], v[7], v[8] if len(v) > 8 else 1
            )
            for k, v in active.items()
        },
        compensation=compensation,
        past_pivot=past_pivot,
        error=error,
        deadline=from_us(deadline),
        lease_owner=lease_owner,
        lease_until=lease_until,
        wake_at=wake_at,
        history=[
            tuple.__new__(HistoryEntry, (from_us(h[0]), h[1], h[2], h[3], h[4])) for h in history
        ],
        replies=replies or {},
    )


@dataclass(frozen=True, slots=True)
class SagaStoreFeatures:
    """``async_connection``: ``also(conn)`` gets an async connection (use
    ``outbox.add_async``), else a sync one (``outbox.add``). ``durable``: instances survive
    the process."""

    async_connection: bool
    durable: bool


#: called with the store's connection inside a save's transaction; may return an awaitable
AlsoInTransaction = Callable[[Any], Awaitable[Any] | Any]


@runtime_checkable
class SagaStore(Protocol):
    """Keeps saga instances; see the module docstring for the contract."""

    features: SagaStoreFeatures

    async def save(self, record: SagaRecord, *, also: AlsoInTransaction | None = None) -> None:
        """Write ``record`` if the stored version is ``record.version - 1`` (0: new), else
        raise :class:`msdata.errors.ConcurrencyError` (``name`` = ``"saga <id>"``); run
        ``also(conn)`` in the same transaction. :class:`msdata.errors.EncodeError` for data
        :func:`data_json` refuses (nothing written)."""
        ...

    async def get(self, saga_id: str) -> SagaRecord:
        """The instance, with its recorded replies; :class:`msdata.errors.SagaNotFound` if
        there is none."""
        ...

    async def add_reply(self, saga_id: str, key: str, reply: bytes) -> bool:
        """Record ``reply`` (opaque bytes: the orchestrator's JSON of a saga reply) for the
        instance under ``key``, in a transaction of its own, leaving the instance's row,
        version and lease as they are. False (and nothing changed) if ``key`` is already
        recorded for it. The instance is not checked to exist."""
        ...

    async def claim(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[SagaRecord]:
        """Lease to ``owner`` until ``lease_until`` up to ``limit`` RUNNING/COMPENSATING
        instances whose lease is free or ended at or before ``now`` and whose ``wake_at`` is
        unset or at or before ``now`` or that have recorded replies; each one's version goes
        up by one. Oldest ``updated_at`` first; each with its recorded replies."""
        ...

    async def find(
        self,
        *,
        saga_type: str | None = None,
        statuses: Sequence[SagaStatus] | None = None,
        stuck_at: datetime | None = None,
        limit: int = 100,
    ) -> list[SagaRecord]:
        """Instances by type and status, oldest ``updated_at`` first. With ``stuck_at``:
        only RUNNING/COMPENSATING ones nobody holds a live lease on at that time and whose
        ``wake_at`` (if any) has passed."""
        ...

    def schema_sql(self) -> str: ...

    async def create_schema(self) -> None: ...

    async def close(self) -> None: ...
