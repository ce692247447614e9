"""In-process cost of msdata's buses against the raw floor, in the same run.

- Event bus, memory transport: publish -> encode CloudEvent -> transport -> decode ->
  validate -> handler -> ack, per message, against the raw floor (dict lookup + pydantic
  model_validate of the payload dict + await handler(msg)). Target: at most 2x the floor.
- CommandBus.send against a direct ``await handler(cmd)``. Target: at most 3 us overhead.

Times are CPU time of this process (time.process_time), so other load on the machine does
not count against either side; both paths are single-threaded.

Run: .venv/bin/python bench/bench_bus.py [N]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from msdata import Command, Event, MessageRegistry, message_type
from msdata.adapters.memory import MemoryTransport
from msdata.cqrs import CommandBus
from msdata.events import EventBus

registry = MessageRegistry()


@message_type("bench.OrderPlaced", registry=registry)
class OrderPlaced(Event):
    order_id: uuid.UUID
    customer: str
    total_cents: int
    placed_at: datetime
    note: str


@message_type("bench.PlaceOrder", registry=registry)
class PlaceOrder(Command):
    sku: str
    qty: int


def payload(i: int) -> dict[str, Any]:
    return {
        "order_id": str(uuid.uuid4()),
        "customer": f"c{i}",
        "total_cents": i,
        "placed_at": datetime.now(UTC).isoformat(),
        "note": "bench",
    }


async def raw_floor(n: int) -> float:
    routes = {"bench.OrderPlaced": OrderPlaced}
    payloads = [("bench.OrderPlaced", payload(i)) for i in range(n)]
    count = 0

    async def handler(msg: OrderPlaced) -> None:
        nonlocal count
        count += 1

    started = time.process_time()
    for type_name, data in payloads:
        msg = routes[type_name].model_validate(data)
        await handler(msg)
    elapsed = time.process_time() - started
    assert count == n
    return elapsed / n


async def bus_path(n: int, batch: int) -> float:
    transport = MemoryTransport()
    bus = EventBus(transport, registry=registry, prefetch=500)
    done = asyncio.Event()
    count = 0

    @bus.handler(OrderPlaced, group="bench")
    async def handler(msg: OrderPlaced) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    events = [OrderPlaced.model_validate(payload(i)) for i in range(n)]
    async with bus:
        started = time.process_time()
        # yield to the consumer every 100 messages, as a steady stream would, instead of
        # piling up all N first (which measures the garbage collector more than the bus)
        if batch == 1:
            for i, e in enumerate(events):
                await bus.publish(e)
                if i % 100 == 99:
                    await asyncio.sleep(0)
        else:
            for i in range(0, n, batch):
                await bus.publish_many(events[i : i + batch])
                await asyncio.sleep(0)
        await done.wait()
        elapsed = time.process_time() - started
    await transport.close()
    return elapsed / n


async def split(n: int) -> tuple[float, float]:
    """The two halves of the bus path, without the transport: producing (envelope + CloudEvent
    encoding) and consuming (decode + validate + dispatch) one message."""
    bus = EventBus(MemoryTransport(), registry=registry)
    events = [OrderPlaced.model_validate(payload(i)) for i in range(n)]
    count = 0

    async def handler(msg: OrderPlaced) -> None:
        nonlocal count
        count += 1

    started = time.process_time()
    bodies = [bus.codec.encode(bus.envelope(e)) for e in events]
    produce = (time.process_time() - started) / n
    routes = {"bench.OrderPlaced": handler}
    decode = bus.codec.decode
    started = time.process_time()
    for body in bodies:
        env = decode(body)
        await routes[env.type](env.message)
    consume = (time.process_time() - started) / n
    assert count == n
    return produce, consume


async def command_bus(n: int) -> tuple[float, float]:
    bus = CommandBus(registry=registry)

    async def handler(cmd: PlaceOrder) -> int:
        return cmd.qty

    bus.register(PlaceOrder, handler)
    cmds = [PlaceOrder(sku="s", qty=i) for i in range(n)]
    started = time.process_time()
    for c in cmds:
        await handler(c)
    direct = (time.process_time() - started) / n
    started = time.process_time()
    for c in cmds:
        await bus.send(c)
    via_bus = (time.process_time() - started) / n
    return direct, via_bus


async def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    rounds = 3
    floor = statistics.median([await raw_floor(n) for _ in range(rounds)])
    one = statistics.median([await bus_path(n, 1) for _ in range(rounds)])
    many = statistics.median([await bus_path(n, 100) for _ in range(rounds)])
    halves = [await split(n) for _ in range(rounds)]
    produce = statistics.median(h[0] for h in halves)
    consume = statistics.median(h[1] for h in halves)
    cmd = [await command_bus(n) for _ in range(rounds)]
    direct = statistics.median(c[0] for c in cmd)
    via = statistics.median(c[1] for c in cmd)
    us = 1e6
    print(f"in-process buses, N={n}, median of {rounds} runs, same process")
    print(f"{'path':<52}{'us/msg':>9}{'msgs/s':>11}{'ratio':>8}")
    print(
        f"{'raw floor: lookup + model_validate + await handler':<52}"
        f"{floor * us:>9.2f}{1 / floor:>11,.0f}{1.0:>8.2f}"
    )
    print(
        f"{'event bus, publish() one at a time':<52}"
        f"{one * us:>9.2f}{1 / one:>11,.0f}{one / floor:>8.2f}"
    )
    print(
        f"{'event bus, publish_many() 100 per batch':<52}"
        f"{many * us:>9.2f}{1 / many:>11,.0f}{many / floor:>8.2f}"
    )
    print(
        f"{'  of which producing: envelope + encode':<52}"
        f"{produce * us:>9.2f}{1 / produce:>11,.0f}{produce / floor:>8.2f}"
    )
    print(
        f"{'  of which consuming: decode + dispatch':<52}"
        f"{consume * us:>9.2f}{1 / consume:>11,.0f}{consume / floor:>8.2f}"
    )
    print(f"{'direct await handler(cmd)':<52}{direct * us:>9.2f}{1 / direct:>11,.0f}{1.0:>8.2f}")
    print(f"{'CommandBus.send(cmd)':<52}{via * us:>9.2f}{1 / via:>11,.0f}{via / direct:>8.2f}")
    print(f"command bus overhead per send: {(via - direct) * us:.2f} us (target <= 3 us)")
    print(
        f"event bus cost vs floor: {many / floor:.2f}x batched, {one / floor:.2f}x single "
        "(target <= 2x)"
    )


if __name__ == "__main__":
    asyncio.run(main())
