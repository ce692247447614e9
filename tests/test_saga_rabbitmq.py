"""Remote saga steps over RabbitMQ, the orchestrator here and the participant in another
process (tests/saga_rabbitmq_participant.py), each on its own SQLite database: replies with
data, a refusal compensated, and a step with no reply timed out (on a fake clock) and
compensated."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from pydantic import BaseModel

from msdata.adapters.sqlite import SqliteOutboxStore
from msdata.adapters.sqlite.saga import SqliteSagaStore
from msdata.events import EventBus
from msdata.outbox import Outbox, OutboxRelay
from msdata.saga import Saga, SagaOrchestrator, SagaStatus, remote
from msdata.testing import FakeClock

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class Order(BaseModel):
    order_id: str
    payment_id: str | None = None


class Paid(BaseModel):
    payment_id: str


async def test_orchestrator_and_participant_in_separate_processes(
    amqp_url: str, tmp_path: Path
) -> None:
    import aio_pika

    from msdata.adapters.rabbitmq import RabbitMQTransport
    from saga_rabbitmq_participant import Charge, Release, Reserve  # type: ignore[import-not-found]

    prefix = f"t{uuid.uuid4().hex[:8]}"
    part_db = tmp_path / "stock.db"
    proc = subprocess.Popen(  # noqa: ASYNC220 (started once, read in a thread)
        [
            sys.executable,
            str(HERE / "saga_rabbitmq_participant.py"),
            str(part_db),
            amqp_url,
            prefix,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(HERE.parent / "src")},
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert line.strip() == "ready"
        db = tmp_path / "orders.db"
        saga_store, outbox_store = SqliteSagaStore(db), SqliteOutboxStore(db)
        await saga_store.create_schema()
        await outbox_store.create_schema()
        conn = await aio_pika.connect_robust(amqp_url)
        transport = RabbitMQTransport(conn)
        bus = EventBus(transport, source="orders", backoff=lambda n: 0.05)
        checkout = (
            Saga("rmq-checkout", Order)
            .step(
                "reserve",
                remote(lambda d: Reserve(order_id=d.order_id), topic=f"{prefix}.reserve"),
                compensate=remote(
                    lambda d: Release(order_id=d.order_id), topic=f"{prefix}.release"
                ),
                timeout=30,
            )
            .pivot(
                "charge",
                remote(
                    lambda d: Charge(order_id=d.order_id),
                    topic=f"{prefix}.charge",
                    reply=Paid,
                    on_reply=lambda d, r: d.model_copy(update={"payment_id": r.payment_id}),
                ),
                timeout=30,
            )
        )
        clock = FakeClock()
        orch = SagaOrchestrator(
            saga_store,
            [checkout],
            clock=clock,
            bus=bus,
            outbox=Outbox(outbox_store, source="orders"),
            reply_topic=f"{prefix}.replies",
        )
        try:
            async with bus, OutboxRelay(outbox_store, transport, poll_interval=0.01):
                ids = ["o-1", "o-2", "bad-3"]
                done = await asyncio.gather(
                    *(orch.run(checkout, Order(order_id=i), saga_id=i, timeout=30) for i in ids)
                )
                # no reply for reserve: after its timeout (on the fake clock) it is undone
                slow = await orch.start(checkout, Order(order_id="slow-4"), saga_id="slow-4")
                assert slow.active["reserve"].state == "waiting"
                clock.advance(31)
                done.append(await orch.wait("slow-4", timeout=30, poll=0.05))
        finally:
            await orch.close()
            _, queues = transport.declared
            await transport.close()
            channel = await conn.channel()
            for queue in sorted(queues):
                await channel.queue_delete(queue)
            await channel.close()
            await conn.close()
            await saga_store.close()
            await outbox_store.close()
        status = {r.saga_id: r.status for r in done}
        assert status == {
            "o-1": SagaStatus.COMPLETED,
            "o-2": SagaStatus.COMPLETED,
            "bad-3": SagaStatus.COMPENSATED,
            "slow-4": SagaStatus.COMPENSATED,
        }
        assert "no reply within 30" in (done[-1].error or "")
        assert {r.saga_id: r.data.payment_id for r in done}["o-1"] == "pay-o-1"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    with sqlite3.connect(part_db) as c:
        effects = sorted(c.execute("SELECT order_id, what FROM effects").fetchall())
    assert effects == [
        ("bad-3", "release"),
        ("bad-3", "reserve"),
        ("o-1", "charge"),
        ("o-1", "reserve"),
        ("o-2", "charge"),
        ("o-2", "reserve"),
        ("slow-4", "release"),  # its reserve may have happened unanswered: undone anyway
    ]
