"""A real process running a 3-step checkout saga on SQLite, killed (SIGKILL) at a chosen
point by tests/test_saga_crash.py, then run again to recover.

    python saga_crash_worker.py DB start|recover KILL_AT REFUSE

- ``reserve``: local, compensatable (``release``): its effect is keyed by the step's
  idempotency key, as a local step's effect should be.
- ``charge``: remote pivot: a command through the SQLite outbox to a participant in this
  process (the memory transport), deduplicated by the participant's idempotency store by the step's
  idempotency key. ``REFUSE=1``: the participant refuses, so ``reserve`` is compensated.
- ``confirm``: local, retriable.

``KILL_AT`` names where this process kills itself the first time it gets there
(``-``: nowhere); ``sigterm:confirm`` sends it SIGTERM in the middle of ``confirm`` instead,
which cancels the work as a service's shutdown does. Every effect is also written to
``calls`` (not deduplicated), so the test sees that a step really ran again after the kill.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from typing import Any

from pydantic import BaseModel

from msdata import Command, message_type
from msdata.adapters.memory import MemoryTransport
from msdata.adapters.sqlite import SqliteIdempotencyStore, SqliteOutboxStore, connect
from msdata.adapters.sqlite.saga import SqliteSagaStore
from msdata.backoff import constant_backoff
from msdata.errors import SagaStepFailed
from msdata.events import EventBus
from msdata.outbox import Outbox, OutboxRelay
from msdata.saga import Retry, Saga, SagaOrchestrator, SagaParticipant, current_step, remote
from msdata.storage import current_connection

DB, MODE, KILL_AT, REFUSE = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
SAGA_ID = "crash-saga"


def kill_at(point: str) -> None:
    if point == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)


@message_type("crash.Charge")
class Charge(Command):
    order_id: str


class Order(BaseModel):
    order_id: str
    charged: bool = False


def effect(name: str, key: str) -> None:
    with connect(DB) as conn:
        conn.execute("INSERT INTO calls (name) VALUES (?)", (name,))
        conn.execute("INSERT OR IGNORE INTO effects (key, name) VALUES (?, ?)", (key, name))


def reserve(d: Order) -> None:
    kill_at("before-effect:reserve")
    effect("reserve", current_step().idempotency_key)
    kill_at("after-effect:reserve")


def release(d: Order) -> None:
    kill_at("before-effect:release")
    effect("release", current_step().idempotency_key)
    kill_at("after-effect:release")


async def confirm(d: Order) -> Order:
    kill_at("before-effect:confirm")
    effect("confirm", current_step().idempotency_key)
    kill_at("after-effect:confirm")
    if KILL_AT == "sigterm:confirm" and MODE == "start":
        os.kill(os.getpid(), signal.SIGTERM)  # the service is told to stop mid-step
        await asyncio.sleep(30)
    return d


checkout = (
    Saga("crash-checkout", Order)
    .step("reserve", reserve, compensate=release)
    .pivot(
        "charge",
        remote(
            lambda d: Charge(order_id=d.order_id),
            on_reply=lambda d, r: d.model_copy(update={"charged": True}),
        ),
        timeout=1.5,
        retry=Retry(20, constant_backoff(0.1)),
    )
    .retriable("confirm", confirm, retry=Retry(None, constant_backoff(0.1)))
)


def setup() -> None:
    conn = connect(DB)
    with conn:
        conn.executescript(
            "CREATE TABLE IF NOT EXISTS calls (name TEXT);"
            "CREATE TABLE IF NOT EXISTS effects (key TEXT PRIMARY KEY, name TEXT);"
            "CREATE TABLE IF NOT EXISTS charges (order_id TEXT);"
        )
    conn.close()


async def main() -> None:
    # a service's usual SIGTERM handling: cancel the work and exit
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    setup()
    saga_store = SqliteSagaStore(DB)
    outbox_store, replies_store = SqliteOutboxStore(DB), SqliteIdempotencyStore(DB)
    for s in (saga_store, outbox_store, replies_store):
        await s.create_schema()
    transport = MemoryTransport()
    bus = EventBus(transport, source="shop", backoff=lambda n: 0.05)
    outbox = Outbox(outbox_store, source="shop")
    orchestrator = SagaOrchestrator(
        saga_store, [checkout], bus=bus, outbox=outbox, lease_seconds=1.0, recovery_interval=0.2
    )

    def transaction() -> sqlite3.Connection:
        return connect(DB)

    participant = SagaParticipant(bus, outbox, transaction, idempotency=replies_store)

    @participant.handler(Charge, group="payments")
    def charge(cmd: Charge) -> dict[str, Any]:
        kill_at("participant:charge")
        if REFUSE:
            raise SagaStepFailed("card declined")
        conn = current_connection()
        conn.execute("INSERT INTO calls (name) VALUES ('charge')")
        conn.execute("INSERT INTO charges (order_id) VALUES (?)", (cmd.order_id,))
        return {}

    async with bus, OutboxRelay(outbox_store, transport, poll_interval=0.02, lease_seconds=1.0):
        if MODE == "start":
            await orchestrator.start(checkout, Order(order_id="o-1"), saga_id=SAGA_ID)
        async with orchestrator:  # the recovery worker
            done = await orchestrator.wait(SAGA_ID, timeout=30, poll=0.05)
        print(done.status.value, flush=True)
    for s in (saga_store, outbox_store, replies_store):
        await s.close()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        with connect(DB) as conn:
            (status,) = conn.execute("SELECT status FROM msdata_sagas").fetchone()
        print("cancelled", status, flush=True)
        sys.exit(3)
