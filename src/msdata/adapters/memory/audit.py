"""The audit source of a memory outbox (tests, the embedded demo). See :mod:`msdata.audit`."""

from __future__ import annotations

from msdata.adapters.memory.outbox import MemoryOutboxStore
from msdata.audit import AuditEntry, entry_of_payload, needle

__all__ = ["MemoryOutboxAudit"]

_STATES = {0: "pending", 1: "parked", 2: "sent"}


class MemoryOutboxAudit:
    """The rows of a :class:`MemoryOutboxStore` (pending, parked, and sent rows kept for the
    relay's ``retention``) that carry the correlation id."""

    def __init__(self, store: MemoryOutboxStore, *, name: str = "memory") -> None:
        self.store = store
        self.name = name

    async def entries(self, correlation_id: str) -> list[AuditEntry]:
        look = needle(correlation_id)
        out: list[AuditEntry] = []
        for r in list(self.store._rows.values()):
            payload = r.row.payload
            if look not in payload:
                continue
            state = _STATES.get(r.state, str(r.state))
            detail = {"topic": r.row.topic, "state": state}
            if r.attempts:
                detail["attempts"] = str(r.attempts)
            if r.last_error:
                detail["last_error"] = r.last_error
            if r.sent_at is not None:
                detail["sent_at"] = r.sent_at.isoformat()
            entry = entry_of_payload(
                payload,
                correlation_id,
                kind="message",
                where=f"outbox {self.name}: {state}",
                recorded_at=r.created_at,
                detail=detail,
            )
            if entry is not None:
                out.append(entry)
        return out
