"""The audit-source conformance suite: every outbox's :class:`msdata.audit.AuditSource` must
pass it (memory, SQLite, PostgreSQL, or your own).

The suite reuses the outbox suite's hooks (:class:`~msdata.testing.conformance.outbox.
OutboxStoreHooks`: ``make_store``, ``begin``/``commit``/``rollback``, ``add``) and adds one::

    class TestMyOutboxAudit(MyOutboxHooks, OutboxAuditConformance):
        def make_audit(self, store: Any, name: str) -> AuditSource:
            return MyOutboxAudit(store, name=name)

``make_audit(store, name)``
    the audit source that reads ``store``, naming it ``name`` in each entry's ``where``.

What it checks: a row is found by its CloudEvents ``correlationid`` and nothing else (not by
the id appearing elsewhere in the payload, not a payload that is not JSON, not a row whose
transaction rolled back); each entry carries the payload's id, type, causation id and time,
``where`` = ``outbox <name>: <state>`` and ``detail`` with ``topic`` and ``state``; a parked
row says ``parked`` with its ``last_error``; a sent row is found while it is kept (the relay's
``retention``, ``mark_sent(keep=True)``), with ``sent_at``, and not once it is deleted or
purged. Needs pytest and pytest-asyncio (``asyncio_mode = "auto"``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from msdata.audit import AuditEntry, AuditSource, audit_trail
from msdata.outbox.store import OutboxRow
from msdata.testing.conformance.outbox import OutboxStoreHooks

__all__ = ["OutboxAuditConformance", "audit_row"]


def audit_row(
    correlation_id: str,
    *,
    causation_id: str | None = None,
    type: str = "audit.Happened",
    topic: str = "orders",
    at: datetime | None = None,
    data: Mapping[str, Any] | None = None,
) -> OutboxRow:
    """An outbox row whose payload is a CloudEvents JSON message of ``correlation_id`` (as
    msdata's codec writes one), made at ``at`` (default now)."""
    mid = str(uuid.uuid4())
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": mid,
        "source": "conformance",
        "type": type,
        "time": (at or datetime.now(UTC)).isoformat(),
        "datacontenttype": "application/json",
        "correlationid": correlation_id,
        "data": dict(data or {}),
    }
    if causation_id is not None:
        event["causationid"] = causation_id
    payload = json.dumps(event, separators=(",", ":")).encode()
    return OutboxRow(mid, topic, type, payload, None, topic)


class OutboxAuditConformance(OutboxStoreHooks):
    """Every test here must pass on every outbox's audit source."""

    def make_audit(self, store: Any, name: str) -> AuditSource:
        raise NotImplementedError

    @staticmethod
    def correlation() -> str:
        return f"corr-{uuid.uuid4().hex}"

    async def trail(self, store: Any, correlation_id: str, name: str = "o") -> list[AuditEntry]:
        return await audit_trail(correlation_id, [self.make_audit(store, name)])

    # -- finding -----------------------------------------------------------------------------

    async def test_the_rows_of_one_correlation_id_with_their_ids_type_and_time(self) -> None:
        corr, other = self.correlation(), self.correlation()
        t0 = datetime(2030, 1, 2, 3, 4, 5, 123000, tzinfo=UTC)
        first = audit_row(corr, type="orders.OrderPlaced", at=t0)
        second = audit_row(
            corr,
            causation_id=first.message_id,
            type="billing.PaymentRequested",
            topic="billing",
            at=t0 + timedelta(seconds=1),
        )
        # the id in the data, as a nested "correlationid" too: not a message of corr
        lookalike = audit_row(other, data={"correlationid": corr, "note": corr})
        async with self.make_store() as store:
            await self.add_committed(store, [second, lookalike, first])
            trail = await self.trail(store, corr, name="orders-db")
            assert [(e.message_id, e.type) for e in trail] == [
                (first.message_id, "orders.OrderPlaced"),
                (second.message_id, "billing.PaymentRequested"),
            ]
            one, two = trail
            assert (one.time, two.time) == (t0, t0 + timedelta(seconds=1))
            assert one.kind == two.kind == "message"
            assert one.correlation_id == corr
            assert (one.causation_id, two.causation_id) == (None, first.message_id)
            assert one.where == "outbox orders-db: pending"
            assert one.detail["state"] == "pending"
            assert (one.detail["topic"], two.detail["topic"]) == ("orders", "billing")
            assert one.detail["source"] == "conformance"
            assert [e.message_id for e in await self.trail(store, other)] == [lookalike.message_id]
            assert await self.trail(store, self.correlation()) == []

    async def test_a_rolled_back_row_and_a_payload_that_is_not_json_are_not_found(self) -> None:
        corr = self.correlation()
        kept = audit_row(corr)
        broken = OutboxRow(
            str(uuid.uuid4()), "orders", "audit.Broken", b'{"correlationid":"' + corr.encode()
        )
        async with self.make_store() as store:
            tx = await self.begin(store)
            await self.add(store, tx, [audit_row(corr)])
            await self.rollback(tx)
            await self.add_committed(store, [kept, broken])
            trail = await self.trail(store, corr)
            assert [e.message_id for e in trail] == [kept.message_id]

    # -- states ------------------------------------------------------------------------------

    async def test_a_parked_row_says_so_with_its_last_error(self) -> None:
        corr = self.correlation()
        row = audit_row(corr)
        async with self.make_store() as store:
            await self.add_committed(store, [row])
            relay = self.relay_id()
            seqs = [r.seq for r in await store.claim(relay, 100, 30.0)]
            await store.park(relay, seqs, "broker refused it: too large")
            (entry,) = await self.trail(store, corr, name="o")
            assert entry.message_id == row.message_id
            assert entry.where == "outbox o: parked"
            assert entry.detail["state"] == "parked"
            assert entry.detail["last_error"] == "broker refused it: too large"

    async def test_a_sent_row_is_found_while_it_is_kept_and_not_after(self) -> None:
        corr = self.correlation()
        kept, dropped = audit_row(corr), audit_row(corr)
        async with self.make_store() as store:
            await self.add_committed(store, [kept])
            await self.add_committed(store, [dropped])
            relay = self.relay_id()
            claimed = {r.message_id: r.seq for r in await store.claim(relay, 100, 30.0)}
            await store.mark_sent(relay, [claimed[kept.message_id]], keep=True)
            await store.mark_sent(relay, [claimed[dropped.message_id]], keep=False)
            (entry,) = await self.trail(store, corr, name="o")
            assert entry.message_id == kept.message_id
            assert entry.where == "outbox o: sent"
            assert entry.detail["state"] == "sent"
            sent_at = datetime.fromisoformat(entry.detail["sent_at"])
            assert abs(sent_at - datetime.now(UTC)) < timedelta(minutes=5)
            await store.purge_sent(datetime.now(UTC) + timedelta(days=1))
            assert await self.trail(store, corr) == []
