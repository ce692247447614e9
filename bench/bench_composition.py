"""Cost of msdata.composition for three parts that answer at once, against a bare
``asyncio.gather`` of the same three coroutines, in the same run.

Paths, each doing N compositions per round:

- raw: ``await asyncio.gather(a(), b(), c())``, no timeouts (the floor);
- by hand: what one writes for the same guarantees without msdata: ``asyncio.timeout``
  around ``gather`` of ``asyncio.wait_for`` per part, ``return_exceptions=True`` for the
  optional one;
- compose: ``compose(required(a, timeout), required(b, timeout), optional(c, timeout),
  deadline=...)``, the parts made per request (as a request handler does);
- compose, parts made once: the same with the three parts built before the loop.

Rounds are interleaved, the order rotating each round; per round the time per
composition of each path is divided by raw's (so 1.0 = as fast as gather, 2.0 = twice
its time). Times are CPU time of this process (``time.process_time``), the steadier
figure on a shared machine; wall-clock ratios are printed too. /proc/loadavg is printed
at the start and the end.

Run: .venv/bin/python bench/bench_composition.py [N] [ROUNDS]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

from msdata.composition import compose, optional, required


async def user(user_id: int) -> dict[str, int]:
    return {"id": user_id}


async def orders(user_id: int) -> list[int]:
    return [user_id, user_id + 1]


async def recommendations(user_id: int) -> list[str]:
    return ["book"]


async def raw(n: int) -> None:
    for i in range(n):
        a, b, c = await asyncio.gather(user(i), orders(i), recommendations(i))
        assert a["id"] == i and b and c


async def by_hand(n: int) -> None:
    wait_for = asyncio.wait_for
    for i in range(n):
        async with asyncio.timeout(2.0):
            a, b, c = await asyncio.gather(
                wait_for(user(i), 0.5),
                wait_for(orders(i), 0.5),
                wait_for(recommendations(i), 0.3),
                return_exceptions=True,
            )
        if isinstance(a, BaseException) or isinstance(b, BaseException):
            raise RuntimeError("a required part failed")
        assert a["id"] == i and b and c


async def composed(n: int) -> None:
    for i in range(n):
        u = required("user", user, i, timeout=0.5)
        o = required("orders", orders, i, timeout=0.5)
        r = optional("recommendations", recommendations, i, timeout=0.3)
        answer = await compose(u, o, r, deadline=2.0)
        assert answer[u]["id"] == i


async def composed_prebuilt(n: int) -> None:
    u = required("user", user, 7, timeout=0.5)
    o = required("orders", orders, 7, timeout=0.5)
    r = optional("recommendations", recommendations, 7, timeout=0.3)
    for _ in range(n):
        answer = await compose(u, o, r, deadline=2.0)
        assert answer[u]["id"] == 7


PATHS: dict[str, Callable[[int], Awaitable[None]]] = {
    "raw gather": raw,
    "by hand (wait_for + timeout)": by_hand,
    "compose, parts per request": composed,
    "compose, parts made once": composed_prebuilt,
}


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


async def measure(fn: Callable[[int], Awaitable[None]], n: int) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    await fn(n)
    return (time.process_time() - cpu) / n, (time.perf_counter() - wall) / n


async def main(n: int, rounds: int) -> None:
    print(f"loadavg at start: {loadavg()}")
    print(f"N={n} compositions of 3 immediate parts per path per round, {rounds} rounds")
    names = list(PATHS)
    for name in names:  # warm up
        await PATHS[name](n // 10)
    cpu: dict[str, list[float]] = {name: [] for name in names}
    wall: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            c, w = await measure(PATHS[name], n)
            cpu[name].append(c)
            wall[name].append(w)

    def spread(values: list[float]) -> str:
        return f"{min(values):.2f}-{statistics.median(values):.2f}-{max(values):.2f}"

    print()
    print(
        "| path | CPU us/composition (median) | CPU ratio to raw min-median-max "
        "| wall ratio min-median-max |"
    )
    print("|---|---|---|---|")
    for name in names:
        cpu_ratios = [x / y for x, y in zip(cpu[name], cpu["raw gather"], strict=True)]
        wall_ratios = [x / y for x, y in zip(wall[name], wall["raw gather"], strict=True)]
        print(
            f"| {name} | {statistics.median(cpu[name]) * 1e6:.1f} | {spread(cpu_ratios)} "
            f"| {spread(wall_ratios)} |"
        )
    print()
    print(f"loadavg at end: {loadavg()}")


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    asyncio.run(main(n, max(5, rounds)))
