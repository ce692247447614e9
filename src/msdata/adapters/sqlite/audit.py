"""The audit source of a SQLite outbox: its rows (pending, parked, and sent rows kept for
the relay's ``retention``) that carry a correlation id. See :mod:`msdata.audit`."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from typing import Any

from msdata.adapters.sqlite.outbox import SqliteOutboxStore
from msdata.audit import AuditEntry, entry_of_payload, needle

__all__ = ["SqliteOutboxAudit"]

_STATES = {0: "pending", 1: "parked", 2: "sent"}


class SqliteOutboxAudit:
    """Reads ``store``'s outbox tables on the store's own connection (read-only). A row is
    found by a scan of the payloads for the correlation id (no index: an operator's look,
    not a hot path). ``name`` goes into each entry's ``where`` (default the store's
    path)."""

    def __init__(self, store: SqliteOutboxStore, *, name: str | None = None) -> None:
        self.store = store
        self.name = name or str(store.path)

    async def entries(self, correlation_id: str) -> list[AuditEntry]:
        t = f"{self.store.table_prefix}outbox"
        look = needle(correlation_id)

        def read(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            sent = conn.execute(
                f"SELECT message_id, topic, payload, created_at, 2, 0, NULL, sent_at "
                f"FROM {t}_sent WHERE instr(payload, ?) > 0",
                (look,),
            ).fetchall()
            # state 2 there is a tombstone (the newest row, kept so that its seq is never
            # given out again): sent, and in the sent table only while the relay keeps it
            live = conn.execute(
                f"SELECT message_id, topic, payload, created_at, state, attempts, last_error, "
                f"NULL FROM {t} WHERE state <> 2 AND instr(payload, ?) > 0",
                (look,),
            ).fetchall()
            return sent + live

        out: list[AuditEntry] = []
        for (
            _message_id,
            topic,
            payload,
            created_at,
            state,
            attempts,
            error,
            sent_at,
        ) in await self.store.run(read):
            detail = {"topic": str(topic), "state": _STATES.get(int(state), str(state))}
            if attempts:
                detail["attempts"] = str(attempts)
            if error:
                detail["last_error"] = str(error)
            if sent_at is not None:
                detail["sent_at"] = datetime.fromtimestamp(float(sent_at), UTC).isoformat()
            entry = entry_of_payload(
                bytes(payload),
                correlation_id,
                kind="message",
                where=f"outbox {self.name}: {detail['state']}",
                recorded_at=datetime.fromtimestamp(float(created_at), UTC),
                detail=detail,
            )
            if entry is not None:
                out.append(entry)
        return out
