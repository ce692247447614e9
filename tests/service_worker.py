"""A process for tests/test_service.py to SIGTERM: a Service whose relay is publishing a
backlog through a slow broker.

    python tests/service_worker.py DB_URL ROWS [SCHEMA]

Adds ROWS outbox messages, runs ``service.serve()`` (what ``run()`` runs), prints
``PUBLISHING`` at the first publish, and exits when SIGTERM or SIGINT stops the service.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from msdata.adapters.memory import MemoryTransport
from msdata.messages import Event, MessageRegistry, message_type
from msdata.service import Service
from msdata.transport import TransportMessage

registry = MessageRegistry()


@message_type("worker.Tick", registry=registry)
class Tick(Event):
    n: int


class SlowBroker(MemoryTransport):
    """Each publish takes 20 ms, so a SIGTERM finds the relay with a batch in hand."""

    said = False

    async def publish(self, topic: str, messages: Sequence[TransportMessage]) -> None:
        if not self.said:
            print("PUBLISHING", flush=True)
            self.said = True
        await asyncio.sleep(0.02)
        await super().publish(topic, messages)


async def prepare_and_serve(service: Service, rows: int) -> None:
    """The outbox table and a backlog, then what ``service.run()`` does, in one loop (an
    asyncpg pool belongs to the loop that made it)."""
    await service.store("outbox").create_schema()
    async with service.transaction():
        for n in range(rows):
            await service.publish(Tick(n=n), key=f"k{n % 7}")
    await service.serve()


def main() -> None:
    db, rows = sys.argv[1], int(sys.argv[2])
    schema = sys.argv[3] if len(sys.argv) > 3 else None
    service = Service(
        "worker",
        db=db,
        schema=schema,
        broker=SlowBroker(),
        registry=registry,
        relay_options={"batch_size": 10},
    )
    asyncio.run(prepare_and_serve(service, rows))
    print("STOPPED", flush=True)


if __name__ == "__main__":
    main()
