"""One path of bench_bus.py for N messages, for counting instructions with callgrind
(load-independent): the events (always 2,100 of them) are made before, so the difference
of two runs is the path alone.

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python bench/bus_instructions.py one 2100   # then 100; difference / 2000

Paths: ``wire`` (the wire floor), ``one`` (``publish()`` one at a time), ``many``
(``publish_many``, 100 per batch).

Under callgrind the process runs ~50x slower, so the real clock would start a new
millisecond (a new random tail and id head) and a new second for far fewer messages than at
full speed: ``time.time_ns`` is replaced by a counter that moves 10 us a call (about the
bus's pace), on both paths.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import sys
import time

time.time_ns = functools.partial(next, itertools.count(time.time_ns(), 10_000))

from bench_bus import OrderPlaced, payload, registry  # noqa: E402
from pydantic_core import from_json, to_json  # noqa: E402

from msdata.adapters.memory import MemoryTransport  # noqa: E402
from msdata.events import EventBus  # noqa: E402


async def main(path: str, n: int) -> None:
    events = [OrderPlaced.model_validate(payload(i)) for i in range(2100)][:n]
    count = 0
    if path == "wire":
        routes = {"bench.OrderPlaced": OrderPlaced}

        async def floor_handler(msg: OrderPlaced) -> None:
            nonlocal count
            count += 1

        for e in events:
            d = from_json(to_json({"type": "bench.OrderPlaced", "data": e}))
            await floor_handler(routes[d["type"]].model_validate(d["data"]))
        assert count == n
        return
    transport = MemoryTransport()
    bus = EventBus(transport, registry=registry, prefetch=500)
    done = asyncio.Event()

    @bus.handler(OrderPlaced, group="bench")
    async def handler(msg: OrderPlaced) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    async with bus:
        if path == "one":
            for i, e in enumerate(events):
                await bus.publish(e)
                if i % 100 == 99:
                    await asyncio.sleep(0)
        else:
            for i in range(0, n, 100):
                await bus.publish_many(events[i : i + 100])
                await asyncio.sleep(0)
        await done.wait()
    await transport.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
