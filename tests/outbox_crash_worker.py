"""A process for tests/test_outbox_crash.py to SIGKILL at a chosen point.

    python tests/outbox_crash_worker.py MODE BACKEND DSN PREFIX BROKER_FILE

MODE:
  write-and-hang     add a message in a business transaction, say ``ADDED <id>``, hang
                     (killed before commit)
  write-and-commit   the same, committed; say ``COMMITTED <id>`` and exit
  relay-hang         run one relay step whose publish succeeds (into BROKER_FILE), say
                     ``PUBLISHED <n>``, and hang before marking the rows sent
  relay-hang-long    the same with a lease of an hour (LONG_LEASE_SECONDS)
BACKEND: sqlite (DSN is the file path) or postgres (DSN is the URL).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any

from msdata.messages import Event, MessageRegistry, message_type
from msdata.outbox import Outbox, OutboxRelay
from msdata.transport import TransportMessage

registry = MessageRegistry()
LEASE_SECONDS = 1.0
LONG_LEASE_SECONDS = 3600.0


@message_type("crash.OrderPlaced", registry=registry)
class OrderPlaced(Event):
    order_id: str


class FileBroker:
    """A 'broker' that two processes share: one line per accepted message, fsynced
    before publish returns (the confirm)."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def publish(self, topic: str, messages: Sequence[TransportMessage]) -> None:
        self._append(topic, messages)

    def _append(self, topic: str, messages: Sequence[TransportMessage]) -> None:
        with open(self.path, "a") as f:
            for m in messages:
                f.write(f"{topic}\t{m.id}\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[str]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [line.split("\t")[1].strip() for line in f if line.strip()]


def make_store(backend: str, dsn: str, prefix: str) -> Any:
    if backend == "sqlite":
        from msdata.adapters.sqlite import SqliteOutboxStore

        return SqliteOutboxStore(dsn, table_prefix=prefix)
    from msdata.adapters.postgres import PostgresOutboxStore

    return PostgresOutboxStore.from_url(dsn, table_prefix=prefix)


def connect(backend: str, dsn: str) -> Any:
    if backend == "sqlite":
        import sqlite3

        return sqlite3.connect(dsn, timeout=30.0)
    import psycopg

    return psycopg.connect(dsn)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(mode: str, backend: str, dsn: str, prefix: str, broker: str) -> None:
    store = make_store(backend, dsn, prefix)
    if mode in ("write-and-hang", "write-and-commit"):
        outbox = Outbox(store, registry=registry, source="crash-test")
        conn = connect(backend, dsn)
        order = f"order-{os.getpid()}"
        mark = "?" if backend == "sqlite" else "%s"
        conn.execute(f"INSERT INTO {prefix}orders (id) VALUES ({mark})", (order,))
        (env,) = outbox.add(conn, OrderPlaced(order_id=order), key=order)
        if mode == "write-and-commit":
            conn.commit()
            say(f"COMMITTED {env.id}")
            return
        say(f"ADDED {env.id}")
        await asyncio.sleep(3600)  # killed here, before commit
    elif mode in ("relay-hang", "relay-hang-long"):

        async def hang_before_mark(relay_id: str, seqs: Sequence[int], **kw: Any) -> None:
            say(f"PUBLISHED {len(seqs)}")
            await asyncio.sleep(3600)  # killed here, after publishing, before marking

        store.mark_sent = hang_before_mark
        lease = LONG_LEASE_SECONDS if mode == "relay-hang-long" else LEASE_SECONDS
        relay = OutboxRelay(store, FileBroker(broker), lease_seconds=lease)
        await relay.run_once()
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
