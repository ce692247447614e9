"""The load driver: places orders with injected failures, waits until the system is quiet,
prints what happened and checks the invariants (each PASS or FAIL)."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from examples.ecommerce.order import PRICES
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

#: initial stock: plenty of everything but the rare print, which runs out
STOCK = {"book": 100_000, "lamp": 100_000, "mug": 100_000, "rare-print": 12}


@dataclass
class Clients:
    order: httpx.AsyncClient
    payment: httpx.AsyncClient
    inventory: httpx.AsyncClient


@dataclass
class Report:
    placed: int = 0
    completed: int = 0
    compensated: int = 0
    failed: int = 0
    replayed: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the counts, seconds, and each check as {name, ok, detail}."""
        return {
            "placed": self.placed,
            "completed": self.completed,
            "compensated": self.compensated,
            "failed": self.failed,
            "replayed": self.replayed,
            "seconds": self.seconds,
            "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in self.checks],
        }


def plan(n: int, seed: int, slow: bool) -> list[dict[str, Any]]:
    """The orders to place: ~8% declined cards, ~4% slow payments, ~10% of the rare print
    (most run out of stock), ~10% retried with the same key, ~5% sent twice at once.

    With ``slow``, the first order always pays with the slow card (and an item in stock),
    whatever ``n`` and ``seed``: every run has at least one payment that is charged, times
    out and is refunded, so a broken refund always shows in the money check (placed first,
    its long checkout overlaps the others)."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        r = rnd.random()
        card = "tok_declined" if r < 0.08 else ("tok_slow" if slow and r < 0.12 else "tok_visa")
        sku = "rare-print" if rnd.random() < 0.10 else rnd.choice(["book", "lamp", "mug"])
        retry = rnd.random()
        out.append(
            {
                "key": f"order-{seed}-{i}",
                "body": {"sku": sku, "quantity": rnd.randint(1, 3), "card": card},
                "retry": "again" if retry < 0.10 else ("twice" if retry < 0.15 else None),
            }
        )
    if slow and out:
        body = out[0]["body"]
        body["card"] = "tok_slow"
        if body["sku"] not in ("book", "lamp", "mug"):
            body["sku"] = "book"
    return out


async def _post(client: httpx.AsyncClient, item: dict[str, Any]) -> httpx.Response:
    headers = {"Idempotency-Key": item["key"]}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            r = await client.post("/orders", json=item["body"], headers=headers)
        except httpx.TransportError:  # the service is restarting: a client retries
            await asyncio.sleep(0.2)
            continue
        if r.status_code in (409, 500, 502, 503):  # in progress, or down: retry later
            await asyncio.sleep(0.05)
            continue
        return r
    raise RuntimeError(f"order {item['key']}: no answer")


SLOT_SECONDS = 30.0


async def _until_ended(client: httpx.AsyncClient, order_id: str | None) -> None:
    deadline = time.monotonic() + SLOT_SECONDS
    while order_id and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        try:
            r = await client.get(f"/orders/{order_id}")
        except httpx.TransportError:  # restarting
            continue
        if r.status_code == 200 and r.json()["status"] != "PLACED":
            return


async def place_all(
    clients: Clients,
    items: list[dict[str, Any]],
    concurrency: int,
    console: Console,
    on_answered: Callable[[], Any] | None = None,
) -> tuple[dict[str, str], int]:
    """Place every order, ``concurrency`` at a time, each one's slot held until its order
    is no longer PLACED (its checkout ended, or ``SLOT_SECONDS`` passed), so the sagas in
    flight are bounded as the clients are; returns key -> order id, and how many answers
    were replays. ``on_answered`` is called as each order's first POST is answered (its
    checkout then runs)."""
    ids: dict[str, str] = {}
    replayed = 0
    sem = asyncio.Semaphore(concurrency)

    async def one(item: dict[str, Any]) -> None:
        nonlocal replayed
        async with sem:
            if item["retry"] == "twice":
                rs = await asyncio.gather(_post(clients.order, item), _post(clients.order, item))
            else:
                rs = [await _post(clients.order, item)]
            if on_answered is not None:
                on_answered()
            if item["retry"] == "again":
                rs.append(await _post(clients.order, item))
            await _until_ended(clients.order, rs[0].json().get("order_id"))
        answers = set()
        for r in rs:
            if r.status_code != 201:
                raise RuntimeError(f"POST /orders answered {r.status_code}: {r.text}")
            answers.add(r.json()["order_id"])
            replayed += r.headers.get("idempotent-replayed") == "true"
        if len(answers) != 1:
            raise RuntimeError(f"key {item['key']} made orders {sorted(answers)}")
        ids[item["key"]] = answers.pop()
        progress.advance(task)

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("placing orders", total=len(items))
        await asyncio.gather(*(one(it) for it in items))
    return ids, replayed


async def _ask_all(clients: Clients, path: str) -> dict[str, Any]:
    """``GET path`` of the three services at once: service name -> its JSON answer."""
    names = ("order", "payment", "inventory")
    rs = await asyncio.gather(*(getattr(clients, n).get(path) for n in names))
    for r in rs:
        r.raise_for_status()
    return {n: r.json() for n, r in zip(names, rs, strict=True)}


async def audit(clients: Clients) -> dict[str, Any]:
    """Each service's ``/admin/audit``: its data, for the checks."""
    return await _ask_all(clients, "/admin/audit")


async def busy(clients: Clients) -> dict[str, Any]:
    """Each service's ``/admin/busy``: what is still going on (cheap)."""
    return await _ask_all(clients, "/admin/busy")


def _quiet(b: dict[str, Any]) -> bool:
    o = b["order"]
    return (
        o["open_orders"] <= 0
        and o["running_sagas"] == 0
        and o["projection_lag"] == 0
        and all(b[s]["outbox_pending"] == 0 for s in b)
    )


async def wait_quiet(clients: Clients, timeout: float, console: Console) -> dict[str, Any]:
    """Audit until two audits in a row find every saga ended, every outbox drained and
    the read model caught up (or ``timeout`` seconds pass: the checks then say what is
    not done)."""
    deadline = time.monotonic() + timeout
    quiet_once = False
    with console.status("waiting until the system is quiet"):
        while True:
            try:
                b = await busy(clients)
            except httpx.HTTPError:
                await asyncio.sleep(0.3)
                continue
            if _quiet(b):
                if quiet_once:
                    break
                quiet_once = True
            else:
                quiet_once = False
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
    while True:
        try:
            return await audit(clients)
        except httpx.HTTPError:  # a service restarting after chaos
            if time.monotonic() > deadline + 30:
                raise
            await asyncio.sleep(0.3)


def check(a: dict[str, Any], ids: dict[str, str], dead_letters: int) -> list[tuple[str, bool, str]]:
    orders = {o["order_id"]: o for o in a["order"]["orders"]}
    completed = {i for i, o in orders.items() if o["status"] == "COMPLETED"}
    sagas = a["order"]["sagas"]
    checks = []

    reserved: Counter[str] = Counter()
    for r in a["inventory"]["reserved"]:
        reserved[r["sku"]] += r["quantity"]
    bad = [
        f"{i['sku']}: {i['available']} + {reserved[i['sku']]} != {i['initial']}"
        for i in a["inventory"]["items"]
        if i["available"] + reserved[i["sku"]] != i["initial"]
    ]
    held = {r["order_id"] for r in a["inventory"]["reserved"]}
    if held != completed:
        bad.append(f"{len(held ^ completed)} orders reserved but not completed or the reverse")
    checks.append(("stock + reserved = initial stock, per item", not bad, "; ".join(bad)))

    charged = sum(e["amount_cents"] for e in a["payment"]["ledger"] if e["kind"] == "charge")
    refunded = sum(e["amount_cents"] for e in a["payment"]["ledger"] if e["kind"] == "refund")
    due = sum(orders[i]["amount_cents"] for i in completed)
    checks.append(
        (
            "money charged - refunded = sum of completed orders",
            charged - refunded == due,
            f"{charged} - {refunded} = {charged - refunded}, completed orders {due} (cents)",
        )
    )

    charges = Counter(e["order_id"] for e in a["payment"]["ledger"] if e["kind"] == "charge")
    twice = [o for o, n in charges.items() if n > 1]
    checks.append(("no order charged twice", not twice, f"{len(twice)} charged twice"))

    statuses = Counter(sagas.get(i, {"status": "MISSING"})["status"] for i in orders)
    not_ended = {s: n for s, n in statuses.items() if s not in ("COMPLETED", "COMPENSATED")}
    checks.append(
        ("every saga ended COMPLETED or COMPENSATED", not not_ended, f"others: {not_ended}")
    )

    summary = {s["order_id"]: (s["status"], s["amount_cents"]) for s in a["order"]["summary"]}
    truth = {i: (o["status"], o["amount_cents"]) for i, o in orders.items()}
    diff = {k for k in summary.keys() | truth.keys() if summary.get(k) != truth.get(k)}
    checks.append(("read model = source of truth", not diff, f"{len(diff)} orders differ"))

    made = set(ids.values())
    checks.append(
        (
            "one order per idempotency key",
            made == set(orders) and len(made) == len(ids),
            f"{len(ids)} keys, {len(made)} orders answered, {len(orders)} stored",
        )
    )

    pending = {s: (a[s]["outbox_pending"], a[s]["outbox_parked"]) for s in a}
    drained = all(p == (0, 0) for p in pending.values()) and dead_letters == 0
    checks.append(
        (
            "outboxes drained, dead-letter topics empty",
            drained,
            f"pending/parked {pending}, {dead_letters} dead letters",
        )
    )
    return checks


async def drive(
    clients: Clients,
    *,
    orders: int = 300,
    concurrency: int = 16,
    seed: int = 1,
    slow: bool = True,
    quiet_timeout: float = 60.0,
    dead_letters: Callable[[dict[str, Any]], Awaitable[int]],
    console: Console | None = None,
    on_placed: Callable[[], Any] | None = None,
    on_answered: Callable[[], Any] | None = None,
    on_quiet: Callable[[], Any] | None = None,
) -> Report:
    """Place ``orders`` orders (:func:`plan`), wait until the system is quiet (at most
    ``quiet_timeout`` seconds), check the invariants and print the table and the checks.
    ``dead_letters`` counts the dead letters, given the services' audits. Hooks:
    ``on_answered`` as each order's first POST is answered, ``on_placed`` when every order
    has been placed and its checkout ended, ``on_quiet`` when the wait for quiet is over."""
    console = console or Console()
    items = plan(orders, seed, slow)
    start = time.monotonic()
    ids, replayed = await place_all(clients, items, concurrency, console, on_answered)
    if on_placed is not None:
        on_placed()
    a = await wait_quiet(clients, quiet_timeout, console)
    if on_quiet is not None:
        on_quiet()
    report = Report(placed=len(ids), replayed=replayed)
    sagas = a["order"]["sagas"]
    placed_at = {o["order_id"]: o["placed_at"] for o in a["order"]["orders"]}
    last_end = 0.0
    for i in ids.values():
        s = sagas.get(i, {"status": "MISSING"})
        if s["status"] == "COMPLETED":
            report.completed += 1
        elif s["status"] == "COMPENSATED":
            report.compensated += 1
        else:
            report.failed += 1
        if "ended" in s:
            report.latencies.append(s["ended"] - placed_at[i])
            last_end = max(last_end, s["ended"])
    first = min(placed_at.values(), default=0.0)
    report.seconds = (last_end - first) if last_end else time.monotonic() - start
    report.checks = check(a, ids, await dead_letters(a))
    show(report, console)
    return report


def show(report: Report, console: Console) -> None:
    t = Table(title=f"{report.placed} orders", show_header=True)
    for col in ("completed", "compensated", "failed", "orders/s", "median s", "p99 s"):
        t.add_column(col, justify="right")
    lat = sorted(report.latencies)
    p99 = f"{lat[min(len(lat) - 1, int(0.99 * len(lat)))]:.3f}" if lat else "-"
    t.add_row(
        str(report.completed),
        str(report.compensated),
        str(report.failed),
        f"{report.placed / report.seconds:.0f}" if report.seconds else "-",
        f"{statistics.median(lat):.3f}" if lat else "-",
        p99,
    )
    console.print(t)
    for name, ok, detail in report.checks:
        mark = "[green]PASS[/]" if ok else "[red]FAIL[/]"
        console.print(f"{mark} {name}" + ("" if ok else f"  ({detail})"))


__all__ = ["PRICES", "STOCK", "Clients", "Report", "drive"]
