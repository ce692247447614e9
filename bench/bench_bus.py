"""In-process cost of msdata's buses against the raw floor, in the same run.

- Event bus, memory transport: publish -> encode CloudEvent -> transport -> decode ->
  validate -> handler -> ack, per message, against the wire floor (``to_json`` of the event
  in a dict with its type, decode, ``model_validate`` of the payload, await the handler):
  target at most 2x. The dict floor (no serialisation) is shown too.
- CommandBus.send against a direct ``await handler(cmd)``. Target: at most 3 us overhead.

Times are CPU time of this process (time.process_time), so other load on the machine does
not count against either side; all paths are single-threaded and run interleaved, the
order rotating each round (bench/_fair.py); ratios are per round, min-median-max.

Run: .venv/bin/python bench/bench_bus.py [N] [ROUNDS]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from _fair import loadavg, ratios, run_rounds, spread
from pydantic_core import from_json, to_json

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
    """The dict floor: no serialisation at all (dict lookup + model_validate + await)."""
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


async def wire_floor(n: int) -> float:
    """The wire floor, what any bus that carries bytes must do: ``to_json`` of the event in
    a dict with its type, decode, ``model_validate`` of the payload, await the handler."""
    routes = {"bench.OrderPlaced": OrderPlaced}
    events = [OrderPlaced.model_validate(payload(i)) for i in range(n)]
    count = 0

    async def handler(msg: OrderPlaced) -> None:
        nonlocal count
        count += 1

    started = time.process_time()
    for e in events:
        body = to_json({"type": "bench.OrderPlaced", "data": e})
        d = from_json(body)
        msg = routes[d["type"]].model_validate(d["data"])
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


async def split(n: int, *, produce: bool) -> float:
    """The two halves of the bus path, without the transport: producing (envelope + CloudEvent
    encoding, the transport message) and consuming (decode + validate + dispatch) one
    message, as the bus does on the in-memory transport (it hands back the bus's own
    message object, so the consumer validates only the data)."""
    bus = EventBus(MemoryTransport(), registry=registry)
    events = [OrderPlaced.model_validate(payload(i)) for i in range(n)]
    count = 0

    async def handler(msg: OrderPlaced) -> None:
        nonlocal count
        count += 1

    envelope, wire = bus.envelope, bus._to_wire  # the bus's own steps (private)
    routes = {"bench.OrderPlaced": handler}
    decode = bus._decode
    producing = consuming = 0.0
    # 100 at a time, as the bus path holds them (all N at once would measure the garbage
    # collector walking N held messages more than the bus)
    for i in range(0, n, 100):
        started = time.process_time()
        messages = [wire(envelope(e)) for e in events[i : i + 100]]
        producing += time.process_time() - started
        started = time.process_time()
        for m in messages:
            env = decode(m)
            await routes[env.type](env.message)
        consuming += time.process_time() - started
    assert count == n
    return (producing if produce else consuming) / n


async def command_bus(n: int, via: bool) -> float:
    bus = CommandBus(registry=registry)

    async def handler(cmd: PlaceOrder) -> int:
        return cmd.qty

    bus.register(PlaceOrder, handler)
    cmds = [PlaceOrder(sku="s", qty=i) for i in range(n)]
    started = time.process_time()
    if via:
        for c in cmds:
            await bus.send(c)
    else:
        for c in cmds:
            await handler(c)
    return (time.process_time() - started) / n


async def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    print(f"loadavg at start: {loadavg()}")
    paths: dict[str, Callable[[], Awaitable[float]]] = {
        "wire": lambda: wire_floor(n),
        "dict": lambda: raw_floor(n),
        "one": lambda: bus_path(n, 1),
        "many": lambda: bus_path(n, 100),
        "produce": lambda: split(n, produce=True),
        "consume": lambda: split(n, produce=False),
        "direct": lambda: command_bus(n, via=False),
        "send": lambda: command_bus(n, via=True),
    }
    got = await run_rounds(paths, rounds)
    med = statistics.median
    labels = {
        "wire": "wire floor: to_json + decode + model_validate + await",
        "dict": "dict floor: lookup + model_validate + await",
        "one": "event bus, publish() one at a time",
        "many": "event bus, publish_many() 100 per batch",
        "produce": "  of which producing: envelope + encode",
        "consume": "  of which consuming: decode + dispatch",
        "direct": "direct await handler(cmd)",
        "send": "CommandBus.send(cmd)",
    }
    print(
        f"in-process buses, N={n} per path per round, {rounds} interleaved rounds, "
        "CPU time of this process"
    )
    print(f"{'path':<56}{'us/msg':>8}  {'per round / wire floor':>24}")
    for k, label in labels.items():
        rel = "" if k in ("direct", "send") else spread(ratios(got[k], got["wire"]))
        print(f"{label:<56}{med(got[k]) * 1e6:>8.2f}  {rel:>24}")
    over = [(s - d) * 1e6 for s, d in zip(got["send"], got["direct"], strict=True)]
    print(f"command bus overhead per send, us per round: {spread(over)} (target <= 3 us)")
    print(
        f"event bus / wire floor per round: batched {spread(ratios(got['many'], got['wire']))}, "
        f"single {spread(ratios(got['one'], got['wire']))} (target <= 2x, the median)"
    )
    print(f"loadavg at end: {loadavg()}")


if __name__ == "__main__":
    asyncio.run(main())
