"""A participant service in its own process, for tests/test_saga_rabbitmq.py: it serves
the saga's Reserve/Release/Charge commands over RabbitMQ, on its own SQLite database
(effects, stored reply and outbox in one transaction), until SIGTERM.

    python saga_rabbitmq_participant.py DB AMQP_URL PREFIX
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
from typing import Any

import aio_pika

from msdata import Command, message_type
from msdata.adapters.rabbitmq import RabbitMQTransport
from msdata.adapters.sqlite import SqliteIdempotencyStore, SqliteOutboxStore, connect
from msdata.errors import SagaStepFailed
from msdata.events import EventBus
from msdata.outbox import Outbox, OutboxRelay
from msdata.saga import SagaParticipant
from msdata.storage import current_connection


@message_type("rmqsaga.Reserve")
class Reserve(Command):
    order_id: str


@message_type("rmqsaga.Release")
class Release(Command):
    order_id: str


@message_type("rmqsaga.Charge")
class Charge(Command):
    order_id: str


async def close_and_delete_queues(transport: RabbitMQTransport, conn: Any) -> None:
    """Close ``transport`` and its connection ``conn``, deleting the queues it declared
    (the broker is shared: nothing of a test stays behind)."""
    _, queues = transport.declared
    await transport.close()
    channel = await conn.channel()
    for queue in sorted(queues):
        await channel.queue_delete(queue)
    await channel.close()
    await conn.close()


async def main(DB: str, URL: str, PREFIX: str) -> None:
    with connect(DB) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS effects (order_id TEXT, what TEXT)")
    outbox_store, replies_store = SqliteOutboxStore(DB), SqliteIdempotencyStore(DB)
    await outbox_store.create_schema()
    await replies_store.create_schema()
    conn = await aio_pika.connect_robust(URL)
    transport = RabbitMQTransport(conn)
    bus = EventBus(transport, source="stock", backoff=lambda n: 0.05)
    outbox = Outbox(outbox_store, source="stock")

    def transaction() -> sqlite3.Connection:
        return connect(DB)

    participant = SagaParticipant(bus, outbox, transaction, idempotency=replies_store)

    def effect(order_id: str, what: str) -> None:
        current_connection().execute("INSERT INTO effects VALUES (?, ?)", (order_id, what))

    @participant.handler(Reserve, group="stock", topic=f"{PREFIX}.reserve")
    def reserve(cmd: Reserve) -> None:
        if cmd.order_id.startswith("slow"):
            raise RuntimeError("stock service stuck")  # never replies: the step times out
        effect(cmd.order_id, "reserve")

    @participant.handler(Release, group="stock", topic=f"{PREFIX}.release")
    def release(cmd: Release) -> None:
        effect(cmd.order_id, "release")

    @participant.handler(Charge, group="payments", topic=f"{PREFIX}.charge")
    def charge(cmd: Charge) -> dict[str, str]:
        if cmd.order_id.startswith("bad"):
            raise SagaStepFailed("card declined")
        effect(cmd.order_id, "charge")
        return {"payment_id": f"pay-{cmd.order_id}"}

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with bus, OutboxRelay(outbox_store, transport, poll_interval=0.01):
        print("ready", flush=True)
        await stop.wait()
    await close_and_delete_queues(transport, conn)
    await outbox_store.close()
    await replies_store.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
