"""The e-commerce example on the embedded default (SQLite files, in-memory transport): the
load driver's checks pass, and fail when the system is broken."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("fastapi")

from examples.ecommerce.common import Faults
from examples.ecommerce.driver import STOCK, Report, drive, plan
from examples.ecommerce.embedded import embedded


def run(
    tmp_path: Path, faults: Faults, orders: int, seed: int = 1, charge_timeout: float = 0.5
) -> Report:
    async def main() -> Report:
        async with embedded(tmp_path, faults, charge_timeout=charge_timeout) as system:

            async def dead_letters(_: object) -> int:
                return system.dead_letters.count

            return await drive(
                system.clients,
                orders=orders,
                concurrency=8,
                seed=seed,
                quiet_timeout=40,
                dead_letters=dead_letters,
            )

    return asyncio.run(main())


def test_every_check_passes_with_failures_injected(tmp_path: Path) -> None:
    report = run(tmp_path, Faults(duplicate_every=10, slow_seconds=0.8), orders=40)
    assert report.placed == 40
    assert report.completed > 0 and report.compensated > 0  # both paths ran
    assert report.replayed > 0  # retried requests got the first answer
    assert [(name, detail) for name, ok, detail in report.checks if not ok] == []


@given(st.integers(1, 400), st.integers(0, 10**6))
def test_every_plan_times_a_payment_out(n: int, seed: int) -> None:
    """Whatever the size and seed, the first order pays with the slow card for an item in
    stock: every run has a payment charged, timed out and refunded."""
    first = plan(n, seed, True)[0]["body"]
    assert first["card"] == "tok_slow" and STOCK[first["sku"]] >= 100 * first["quantity"]
    assert all(i["body"]["card"] != "tok_slow" for i in plan(n, seed, False))


@pytest.mark.parametrize("orders,seed", [(1, 1), (4, 2)])
def test_broken_refunds_fail_the_money_check(tmp_path: Path, orders: int, seed: int) -> None:
    """However small the run: its first order's payment stalls (1.5 s) past the charge
    timeout (0.5 s), is refunded, and the refund that moves no money shows."""
    faults = Faults(slow_seconds=1.5, refunds=False)
    report = run(tmp_path, faults, orders=orders, seed=seed, charge_timeout=0.5)
    failed = {name for name, ok, _ in report.checks if not ok}
    why = "; ".join(f"{name}: {detail}" for name, ok, detail in report.checks if not ok)
    assert failed == {"money charged - refunded = sum of completed orders"}, why
    assert report.compensated >= 1 and not report.ok


def test_details_compose_three_services_and_answer_partially(tmp_path: Path) -> None:
    async def main() -> None:
        async with embedded(tmp_path, Faults()) as system:
            c = system.clients
            r = await c.order.post(
                "/orders",
                json={"sku": "book", "quantity": 1, "card": "tok_visa"},
                headers={"Idempotency-Key": "k-1"},
            )
            order_id = r.json()["order_id"]
            assert (await c.order.post("/orders", json={})).status_code == 400  # no key
            # an unknown order: 404 as GET /orders/{id}, not a 500 from the composition
            assert (await c.order.get("/orders/nope")).status_code == 404
            unknown = await c.order.get("/orders/nope/details")
            assert unknown.status_code == 404, unknown.text

            async def ended() -> bool:
                got = (await c.order.get(f"/orders/{order_id}")).json()
                return bool(got["status"] == "COMPLETED")

            for _ in range(200):
                if await ended():
                    break
                await asyncio.sleep(0.05)
            full = (await c.order.get(f"/orders/{order_id}/details")).json()
            assert full["payment"]["status"] == "CHARGED"
            assert full["reservation"]["status"] == "RESERVED"
            assert full["unavailable"] == []
            await c.payment.aclose()  # Payment is down
            partial = (await c.order.get(f"/orders/{order_id}/details")).json()
            assert partial["order"]["status"] == "COMPLETED"
            assert partial["payment"] is None and partial["unavailable"] == ["payment"]
            # the order's own part fails (its table is gone): 502, as docs/composition.md
            import sqlite3

            with contextlib.closing(sqlite3.connect(tmp_path / "order.db")) as db:
                db.execute("ALTER TABLE orders RENAME TO orders_gone")
                db.commit()
            broken = await c.order.get(f"/orders/{order_id}/details")
            assert broken.status_code == 502 and "order" in broken.text, broken.text

    asyncio.run(main())


@pytest.mark.parametrize(
    "url",
    ["redis://localhost:6379/0", "nats://localhost:4222", "amqp://guest:guest@localhost:5672/"],
)
def test_run_namespace_reaches_every_broker(url: str) -> None:
    """--schema-prefix isolates the run's names on every broker, not only Redis."""
    from examples.ecommerce.common import open_broker

    transport = open_broker(url, "shop_t1")
    assert transport.namespace == "shop_t1"  # type: ignore[attr-defined]


def test_msdata_trace_reads_the_example_services_by_module_attr(tmp_path: Path) -> None:
    """``msdata trace ID --app examples.ecommerce.apps:order`` (and payment, inventory) on
    an embedded run's SQLite files (SHOP_DIR): each service's stores are read, and the
    saga's steps come from the order service's."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    report = run(tmp_path, Faults(), orders=1)
    assert report.completed + report.compensated == 1
    import sqlite3

    with contextlib.closing(sqlite3.connect(tmp_path / "order.db")) as db:
        (saga_id,) = db.execute("SELECT saga_id FROM msdata_sagas").fetchone()
    apps = [f"--app=examples.ecommerce.apps:{n}" for n in ("order", "payment", "inventory")]
    env = {
        **os.environ,
        "SHOP_DIR": str(tmp_path),
        "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}",
    }
    out = subprocess.run(
        [sys.executable, "-m", "msdata.cli", "trace", saga_id, *apps, "--json"],
        cwd=root, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    got = json.loads(out.stdout)
    assert {"order sagas", "payment outbox", "inventory outbox"} <= set(got["read"]), got
    steps = {e["detail"].get("event") for e in got["entries"] if e["service"] == "order"}
    assert {"started", "step started", "step completed"} <= steps, got


def test_the_first_command_removes_its_files_unless_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m examples.ecommerce``: its /tmp/msdata-shop-* directory is gone at exit
    unless --keep; with no order, the latencies print '-', not nan."""
    import tempfile

    from examples.ecommerce.__main__ import main

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["--orders", "0"]) == 0
    assert list(tmp_path.glob("msdata-shop-*")) == []
    assert "nan" not in capsys.readouterr().out
    assert main(["--orders", "0", "--keep"]) == 0
    (kept,) = tmp_path.glob("msdata-shop-*")
    assert (kept / "order.db").exists() and str(kept) in capsys.readouterr().out.replace("\n", "")
