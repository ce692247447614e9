"""Transactional outbox, its relay, and the inbox (idempotent consumer)."""

from msdata.outbox.store import InboxStore, OutboxRecord, OutboxRow, OutboxStatus, OutboxStore

__all__ = ["InboxStore", "OutboxRecord", "OutboxRow", "OutboxStatus", "OutboxStore"]
