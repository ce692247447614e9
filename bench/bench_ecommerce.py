"""End-to-end speed of the e-commerce example: orders per second from the first POST /orders
to the last saga's end (COMPLETED or COMPENSATED), and the median and 99th-percentile time
from one order's POST to its saga's end.

Two set-ups, alternating round by round:
- embedded: the three services in this process, SQLite files, in-memory broker;
- processes: each service its own process on PostgreSQL (a schema each) + RabbitMQ.

No faults are injected here but the plan's declined cards and out-of-stock items (about a
fifth of the orders end COMPENSATED). Every round's checks must PASS (else the figure is not
printed). Prints /proc/loadavg at start and end: the figures depend on the machine's load.

    .venv/bin/python bench/bench_ecommerce.py [--rounds 3] [--orders 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.ecommerce import launch  # noqa: E402
from examples.ecommerce.common import Faults  # noqa: E402
from examples.ecommerce.driver import Report, drive  # noqa: E402
from examples.ecommerce.embedded import embedded  # noqa: E402


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


async def embedded_round(orders: int, concurrency: int, console: Console) -> Report:
    async with embedded(Path(tempfile.mkdtemp()), Faults(), charge_timeout=30) as system:

        async def dead_letters(_: object) -> int:
            return system.dead_letters.count

        return await drive(
            system.clients,
            orders=orders,
            concurrency=concurrency,
            slow=False,
            dead_letters=dead_letters,
            console=console,
        )


def processes_round(orders: int, concurrency: int, db: str, broker: str) -> Report:
    args = launch.parser().parse_args(
        [
            "--db", db, "--broker", broker, "--orders", str(orders),
            "--concurrency", str(concurrency), "--schema-prefix", f"bench_eco_{os.getpid()}",
            "--base-port", "8401", "--slow-seconds", "0", "--charge-timeout", "30",
            "--duplicate-every", "0", "--clean",
        ]
    )  # fmt: skip
    asyncio.run(launch.run(args))  # --clean: drops its schemas and broker names at the end
    report: Report = args.report
    return report


def summary(name: str, reports: list[Report]) -> str:
    rates = [r.placed / r.seconds for r in reports]
    med = [statistics.median(r.latencies) for r in reports]
    p99 = [sorted(r.latencies)[int(0.99 * (len(r.latencies) - 1))] for r in reports]

    def mmm(xs: list[float], fmt: str) -> str:
        return "-".join(format(x, fmt) for x in (min(xs), statistics.median(xs), max(xs)))

    return (
        f"{name}: orders/s {mmm(rates, '.0f')}, median s {mmm(med, '.2f')}, "
        f"p99 s {mmm(p99, '.2f')} (min-median-max of {len(reports)} rounds)"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--orders", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--db", default="postgresql://root@127.0.0.1/test")
    p.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672/")
    p.add_argument("--only", choices=["embedded", "processes"], default=None)
    args = p.parse_args()
    console = Console(quiet=True)
    print("loadavg at start:", loadavg())
    results: dict[str, list[Report]] = {"embedded": [], "processes": []}
    for i in range(args.rounds):
        order = ["embedded", "processes"] if i % 2 == 0 else ["processes", "embedded"]
        for name in order:
            if args.only and name != args.only:
                continue
            if name == "embedded":
                r = asyncio.run(embedded_round(args.orders, args.concurrency, console))
            else:
                r = processes_round(args.orders, args.concurrency, args.db, args.broker)
            failed = [n for n, ok, _ in r.checks if not ok]
            print(
                f"round {i + 1} {name}: {r.placed / r.seconds:.0f} orders/s, "
                f"median {statistics.median(r.latencies):.2f} s, completed {r.completed}, "
                f"compensated {r.compensated}, failed {r.failed}"
                + (f", FAILED CHECKS {failed}" if failed else "")
            )
            if not failed:
                results[name].append(r)
    for name, reports in results.items():
        if reports:
            print(summary(name, reports))
    print("loadavg at end:", loadavg())


if __name__ == "__main__":
    main()
