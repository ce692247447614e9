"""What every bench script shares: interleaved rounds in a rotating order, per-round
ratios as min-median-max, and /proc/loadavg.

A bench measures msdata's path and its baseline in the same process, A B A B …, the order
rotated each round (so neither path always runs on a warmer or a quieter machine), for at
least 5 rounds; each round gives one ratio per pair, and a target is met when the median
ratio meets it. Pure-Python paths are timed in CPU time (``time.process_time``), paths
that wait on a server by the wall clock.
"""

from __future__ import annotations

import inspect
import statistics
from collections.abc import Awaitable, Callable, Sequence

__all__ = ["MIN_ROUNDS", "loadavg", "order", "ratios", "run_rounds", "spread"]

MIN_ROUNDS = 5


def loadavg() -> str:
    """The first three fields of /proc/loadavg (1, 5, 15 minutes), or "n/a"."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def order(names: Sequence[str], round_no: int) -> list[str]:
    """``names`` rotated by ``round_no``: round 0 A B C, round 1 B C A, round 2 C A B…"""
    k = round_no % len(names)
    return [*names[k:], *names[:k]]


def spread(values: Sequence[float], fmt: str = ".2f") -> str:
    """min-median-max of ``values``."""
    return f"{min(values):{fmt}}-{statistics.median(values):{fmt}}-{max(values):{fmt}}"


def ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-round ``a[i] / b[i]``."""
    return [x / y for x, y in zip(a, b, strict=True)]


async def run_rounds(
    paths: dict[str, Callable[[], float | Awaitable[float]]],
    rounds: int,
    *,
    between: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Run every path once per round, in a rotating order; each call returns its figure
    for the round (rows/s, us per operation…). ``between`` runs before every call (a
    refill), outside whatever the path times. Returns the figures per path, by round."""
    if rounds < MIN_ROUNDS:
        raise SystemExit(f"at least {MIN_ROUNDS} rounds, not {rounds}")
    names = list(paths)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in order(names, r):
            if between is not None:
                b = between()
                if inspect.isawaitable(b):
                    await b
            v = paths[name]()
            if inspect.isawaitable(v):
                v = await v
            out[name].append(float(v))  # type: ignore[arg-type]
    return out
