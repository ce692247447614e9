"""The audit source of a PostgreSQL outbox: its rows (pending, parked, and sent rows kept
for the relay's ``retention``) that carry a correlation id. See :mod:`msdata.audit`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from msdata.adapters.postgres.outbox import PostgresOutboxStore
from msdata.audit import AuditEntry, entry_of_payload, needle

__all__ = ["PostgresOutboxAudit"]


class PostgresOutboxAudit:
    """Reads ``store``'s outbox table on the store's own pool (read-only). Rows are found by
    a scan of the payloads for the correlation id (no index: an operator's look, not a hot
    path). ``name`` goes into each entry's ``where`` (default the table's name)."""

    def __init__(self, store: PostgresOutboxStore, *, name: str | None = None) -> None:
        self.store = store
        self.name = name or store.table
        self._sql = (
            "SELECT id, topic, payload, created_at, parked, attempts, last_error, sent_at "
            f"FROM {store.table} WHERE position($1::bytea in payload) > 0 ORDER BY seq"
        )

    async def entries(self, correlation_id: str) -> list[AuditEntry]:
        look = needle(correlation_id)
        sql = self._sql
        rows: list[Any] = await self.store._db.call(
            "outbox audit", lambda pool: pool.fetch(sql, look)
        )
        out: list[AuditEntry] = []
        for r in rows:
            state = "sent" if r["sent_at"] is not None else "parked" if r["parked"] else "pending"
            detail = {"topic": r["topic"], "state": state}
            if r["attempts"]:
                detail["attempts"] = str(r["attempts"])
            if r["last_error"]:
                detail["last_error"] = r["last_error"]
            if r["sent_at"] is not None:
                detail["sent_at"] = r["sent_at"].astimezone(UTC).isoformat()
            created: datetime = r["created_at"]
            entry = entry_of_payload(
                bytes(r["payload"]),
                correlation_id,
                kind="message",
                where=f"outbox {self.name}: {state}",
                recorded_at=created.astimezone(UTC),
                detail=detail,
            )
            if entry is not None:
                out.append(entry)
        return out
