"""The audit trail of one correlation id: the messages and saga steps that carried it, in
time order, read from the stores that already hold them.

::

    from msdata.audit import EventStoreAudit, audit_trail
    from msdata.adapters.sqlite.audit import SqliteOutboxAudit

    trail = await audit_trail(
        "0192f0c4-…",                                  # a correlation id
        [SqliteOutboxAudit(orders_outbox_store), EventStoreAudit(event_store)],
    )
    for entry in trail:
        print(entry.time.isoformat(), entry.kind, entry.type, entry.where, entry.message_id)

Each store is read by an :class:`AuditSource`: :class:`EventStoreAudit` for any
:class:`msdata.eventstore.EventStore`, :class:`msdata.adapters.sqlite.audit.SqliteOutboxAudit`
for a SQLite outbox (rows kept after sending only when the relay has a ``retention``),
:class:`msdata.adapters.postgres.audit.PostgresOutboxAudit` for a PostgreSQL outbox,
:class:`msdata.adapters.memory.audit.MemoryOutboxAudit` for the memory outbox,
:class:`SagaAudit` for a saga store's instance history. A source for
another store is a class with one async method, ``entries(correlation_id)``;
:func:`outbox_audit` picks the source of an msdata outbox store. The command line prints a
trail as a timeline: ``msdata trace CORRELATION_ID --app module:service`` (docs/cli.md).
"""

from __future__ import annotations

import asyncio
import importlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from msdata.errors import ConfigurationError, SagaNotFound
from msdata.eventstore.store import EventStore
from msdata.saga.store import SagaStore

__all__ = [
    "AuditEntry",
    "AuditSource",
    "EventStoreAudit",
    "SagaAudit",
    "audit_trail",
    "entry_of_payload",
    "outbox_audit",
]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One step of a correlation id's trail.

    ``time``: UTC, when the message was created (its CloudEvents ``time``) or the step ran;
    ``kind``: ``"message"`` (an outbox row), ``"event"`` (an event-store event),
    ``"saga_step"``; ``where``: the store and place it was found (e.g. ``"outbox orders:
    sent"``, ``"event store order-42#3"``); ``detail``: store-specific strings (state,
    attempts, last error, source service)."""

    time: datetime
    kind: str
    where: str
    correlation_id: str
    message_id: str | None = None
    type: str | None = None
    causation_id: str | None = None
    detail: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class AuditSource(Protocol):
    """Reads one store for the entries that carry a correlation id. Read-only; safe to call
    concurrently with the store's writers (it sees what has committed)."""

    async def entries(self, correlation_id: str) -> list[AuditEntry]:
        """The entries of ``correlation_id`` in this store, in any order."""
        ...


def needle(correlation_id: str) -> bytes:
    """The bytes msdata's CloudEvents codec writes for a correlation id (a cheap first filter
    over stored payloads, before parsing them)."""
    return b'"correlationid":' + json.dumps(correlation_id).encode()


def entry_of_payload(
    payload: bytes,
    correlation_id: str,
    *,
    kind: str,
    where: str,
    recorded_at: datetime | None = None,
    detail: Mapping[str, str] | None = None,
) -> AuditEntry | None:
    """The entry of a stored CloudEvents JSON payload, or None if it does not carry
    ``correlation_id`` (or is not a JSON object). ``recorded_at`` is used when the payload
    has no valid ``time``."""
    try:
        obj = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("correlationid") != correlation_id:
        return None
    when: datetime | None = None
    raw = obj.get("time")
    if isinstance(raw, str):
        try:
            when = datetime.fromisoformat(raw)
        except ValueError:
            when = None
    if when is None:
        when = recorded_at or datetime.fromtimestamp(0, UTC)
    info = dict(detail or {})
    if isinstance(obj.get("source"), str):
        info.setdefault("source", obj["source"])
    return AuditEntry(
        time=when,
        kind=kind,
        where=where,
        correlation_id=correlation_id,
        message_id=obj.get("id") if isinstance(obj.get("id"), str) else None,
        type=obj.get("type") if isinstance(obj.get("type"), str) else None,
        causation_id=obj.get("causationid") if isinstance(obj.get("causationid"), str) else None,
        detail=info,
    )


class EventStoreAudit:
    """The events of an :class:`~msdata.eventstore.EventStore` that carry the correlation id.
    It reads the whole global order (``read_all``, ``batch`` events a call) and parses only
    the payloads that contain the id: an operator's look, not a hot path."""

    def __init__(self, store: EventStore, *, batch: int = 1000, name: str = "event store") -> None:
        self.store = store
        self.batch = batch
        self.name = name

    async def entries(self, correlation_id: str) -> list[AuditEntry]:
        look = needle(correlation_id)
        out: list[AuditEntry] = []
        after = 0
        while events := await self.store.read_all(after, self.batch):
            for e in events:
                if look in e.payload:
                    entry = entry_of_payload(
                        e.payload,
                        correlation_id,
                        kind="event",
                        where=f"{self.name} {e.stream_id}#{e.stream_version}",
                        recorded_at=e.recorded_at,
                        detail={"position": str(e.position)},
                    )
                    if entry is not None:
                        out.append(entry)
            after = events[-1].position
        return out


class SagaAudit:
    """The history of the saga instance whose id is the correlation id (the orchestrator
    sends every command of an instance with correlation id = saga id, so the trail of a
    saga id holds its steps and the commands they sent). One ``saga_step`` entry per
    history line: ``type`` is the step (or ``None`` for the instance's own lines),
    ``detail`` has ``event`` (``step started``, ``compensated``, ``completed``, ...),
    ``attempt`` and ``detail``."""

    def __init__(self, store: SagaStore) -> None:
        self.store = store

    async def entries(self, correlation_id: str) -> list[AuditEntry]:
        try:
            rec = await self.store.get(correlation_id)
        except SagaNotFound:
            return []
        out = []
        for h in rec.history:
            detail = {"event": h.event, "status": str(rec.status)}
            if h.attempt is not None:
                detail["attempt"] = str(h.attempt)
            if h.detail:
                detail["detail"] = h.detail
            out.append(
                AuditEntry(
                    time=h.at,
                    kind="saga_step",
                    where=f"saga {rec.saga_type} {rec.saga_id}",
                    correlation_id=correlation_id,
                    type=h.step,
                    detail=detail,
                )
            )
        return out


def _order(entry: AuditEntry) -> tuple[datetime, str, str]:
    return (entry.time, entry.message_id or "", entry.where)


async def audit_trail(correlation_id: str, sources: Iterable[AuditSource]) -> list[AuditEntry]:
    """Every entry of ``correlation_id`` in ``sources`` (read concurrently), oldest first
    (ties by message id, which is time-ordered: UUIDv7; a source's own order otherwise). A
    message found twice in the same place is listed once. A source that raises makes this
    raise (a partial trail would mislead an operator)."""
    found = await asyncio.gather(*(s.entries(correlation_id) for s in sources))
    seen: set[tuple[Any, ...]] = set()
    out: list[AuditEntry] = []
    for entry in sorted((e for batch in found for e in batch), key=_order):
        if entry.message_id is not None:  # a message read twice from one place: once
            key = (entry.kind, entry.where, entry.message_id)
            if key in seen:
                continue
            seen.add(key)
        out.append(entry)
    return out


#: outbox store class ("module.Class") -> its audit source ("module:Class"), imported when used
_OUTBOX_AUDITS = {
    "msdata.adapters.memory.outbox.MemoryOutboxStore": (
        "msdata.adapters.memory.audit:MemoryOutboxAudit"
    ),
    "msdata.adapters.sqlite.outbox.SqliteOutboxStore": (
        "msdata.adapters.sqlite.audit:SqliteOutboxAudit"
    ),
    "msdata.adapters.postgres.outbox.PostgresOutboxStore": (
        "msdata.adapters.postgres.audit:PostgresOutboxAudit"
    ),
}


def outbox_audit(store: object, *, name: str | None = None) -> AuditSource:
    """The audit source of an msdata outbox store (memory, SQLite or PostgreSQL), naming it
    ``name`` in each entry's ``where`` (default: the source's own default). Raises
    :class:`~msdata.errors.ConfigurationError` for a store of another kind (give its own
    :class:`AuditSource` instead)."""
    for cls in type(store).__mro__:
        target = _OUTBOX_AUDITS.get(f"{cls.__module__}.{cls.__qualname__}")
        if target is not None:
            module, _, attr = target.partition(":")
            source_class = getattr(importlib.import_module(module), attr)
            source: AuditSource = (
                source_class(store) if name is None else source_class(store, name=name)
            )
            return source
    raise ConfigurationError(
        f"no audit source for a {type(store).__name__}: pass an AuditSource of your own"
    )
