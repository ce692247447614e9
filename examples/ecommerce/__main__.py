"""``python -m examples.ecommerce``: the e-commerce system on the embedded default (one
process, SQLite files, in-memory transport), driven by the load driver. The SQLite files
go to a new /tmp/msdata-shop-* directory, removed at exit unless --keep (or --dir, which
is never removed). Exits 1 if a check fails."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

from examples.ecommerce.common import Faults
from examples.ecommerce.driver import drive
from examples.ecommerce.embedded import embedded
from rich.console import Console


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.ecommerce", description=__doc__)
    p.add_argument("--orders", type=int, default=300, help="orders to place (default 300)")
    p.add_argument("--concurrency", type=int, default=16, help="orders in flight at once")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dir", type=Path, default=None, help="where the SQLite files go (kept)")
    p.add_argument("--keep", action="store_true", help="keep the temporary SQLite files")
    p.add_argument("--no-refunds", action="store_true", help="break refunds (a check fails)")
    args = p.parse_args(argv)
    console = Console()
    faults = Faults(duplicate_every=20, slow_seconds=3.5, refunds=not args.no_refunds)

    directory = args.dir or Path(tempfile.mkdtemp(prefix="msdata-shop-"))

    async def run() -> bool:
        async with embedded(directory, faults, charge_timeout=3.0) as system:
            console.print(
                f"Order, Payment and Inventory in one process: SQLite files in "
                f"{system.directory}, in-memory broker"
            )

            async def dead_letters(_: object) -> int:
                return system.dead_letters.count

            report = await drive(
                system.clients,
                orders=args.orders,
                concurrency=args.concurrency,
                seed=args.seed,
                dead_letters=dead_letters,
                console=console,
            )
            return report.ok

    try:
        return 0 if asyncio.run(run()) else 1
    finally:
        if args.dir is None:
            if args.keep:
                console.print(f"SQLite files kept in {directory}")
            else:
                shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
