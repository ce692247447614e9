"""The NATS transport across a broker restart, on a private nats-server this test owns.

The server is killed mid-stream (SIGKILL) or stopped cleanly (SIGTERM), then started again on
the same port and data directory. Every message whose publish was confirmed must be
delivered, and the one subscription opened before the restart must go on receiving by itself.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from msdata.adapters.nats import NatsTransport
from msdata.errors import PublishError
from msdata.testing.conformance.transport import make_messages

pytestmark = [pytest.mark.nats, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateNats:
    """A nats-server with JetStream on its own port and data directory."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.data = str(directory / "data")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.directory / "server.log", "ab")  # noqa: SIM115 - the server owns it
        self.process = subprocess.Popen(
            [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", self.data],
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nats-server did not start listening")

    def stop(self, sig: signal.Signals) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, sig)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PrivateNats]:
    binary = shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None
    )
    if binary is None:
        if os.environ.get("MSDATA_REQUIRE_SERVICES") == "1":
            pytest.fail("nats-server is not installed and MSDATA_REQUIRE_SERVICES=1")
        pytest.skip("nats-server is not installed")
    server = PrivateNats(binary, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop(signal.SIGKILL)


async def eventually(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture(params=[False, True], ids=["unordered", "ordered"])
async def transport(
    private_nats: PrivateNats, request: pytest.FixtureRequest
) -> AsyncIterator[NatsTransport]:
    t = NatsTransport.from_url(
        private_nats.url, ack_wait=2.0, publish_timeout=2.0, ordered=request.param
    )
    try:
        yield t
    finally:
        await t.close()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
async def test_confirmed_messages_survive_a_broker_restart(
    private_nats: PrivateNats, transport: NatsTransport, sig: signal.Signals
) -> None:
    topic, group = "orders.placed", "billing"
    confirmed: set[str] = set()
    received: set[str] = set()
    failed_batches = 0
    stop = asyncio.Event()

    async def produce() -> None:
        nonlocal failed_batches
        while not stop.is_set():
            # keyed and keyless: an ordered group pulls from every partition and the rest
            batch = [*make_messages(10), *make_messages(10, key=f"order-{len(confirmed) % 7}")]
            while True:  # a batch that was not confirmed is published again, same ids
                try:
                    await transport.publish(topic, batch)
                    break
                except PublishError:
                    failed_batches += 1
                    await asyncio.sleep(0.1)
            confirmed.update(m.id for m in batch)
            await asyncio.sleep(0.005)

    async with transport, transport.subscribe(topic, group) as sub:

        async def consume() -> None:
            while True:
                for d in await sub.receive(50, timeout=0.5):
                    received.add(d.message.id)
                    await d.ack()

        producer = asyncio.create_task(produce())
        consumer = asyncio.create_task(consume())
        try:
            await eventually(lambda: len(received) >= 200, 20, "traffic before the restart")
            private_nats.stop(sig)  # mid-stream: publishes and pulls are in flight
            before = len(confirmed)
            await asyncio.sleep(0.5)
            private_nats.start()
            # the same producer and subscription carry on by themselves
            await eventually(lambda: len(confirmed) >= before + 200, 30, "publishing to resume")
            stop.set()
            await producer
            await eventually(lambda: confirmed <= received, 30, "every confirmed message")
        finally:
            stop.set()
            consumer.cancel()
            producer.cancel()
            await asyncio.gather(producer, consumer, return_exceptions=True)
    assert confirmed <= received, f"lost {len(confirmed - received)} confirmed messages"
    assert len(confirmed) >= 400
    assert transport.client is not None and transport.client.stats["reconnects"] >= 1
