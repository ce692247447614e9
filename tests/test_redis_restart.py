"""Redis restarts under a running publisher and consumer: every confirmed message arrives.

Each test starts a PRIVATE redis-server (own port, own directory, append-only file) and stops
it by its process id; the shared server is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry as SyncRetry

from msdata.adapters.redis import RedisTransport
from msdata.errors import PublishError
from msdata.testing.conformance.transport import make_messages

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PrivateRedis:
    """A redis-server this test owns: append-only, ``appendfsync always`` so that a reply
    to a write means the write is on disk."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("MSDATA_REQUIRE_SERVICES") == "1":
                pytest.fail("redis-server is not installed", pytrace=False)
            pytest.skip("redis-server is not installed")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--dir", str(self.dir),
                "--logfile", str(self.dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis(port=self.port, socket_connect_timeout=0.2) as r:
                    r.ping()  # fails with LOADING until the append-only file is read
                return
            except redis.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"private redis-server did not start: {self.dir}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def shutdown(self) -> None:
        assert self.proc is not None
        no_retry = SyncRetry(NoBackoff(), 0)  # the server hangs up on SHUTDOWN; do not retry it
        with (
            redis.Redis(port=self.port, retry=no_retry) as r,
            contextlib.suppress(redis.ConnectionError),
        ):
            r.execute_command("SHUTDOWN")
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("stop", ["sigkill", "shutdown"])
async def test_confirmed_messages_survive_a_restart_and_the_consumer_resumes(
    private_redis: PrivateRedis, stop: str
) -> None:
    client = aioredis.Redis.from_url(
        private_redis.url,
        socket_timeout=2,
        socket_connect_timeout=0.5,
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 2),
    )
    t = RedisTransport(client, key_prefix="restart", claim_idle=0.5)
    topic, group = "orders", "billing"
    confirmed: list[str] = []
    received: set[str] = set()
    failures = 0
    publishing = True
    consuming = True

    async def produce() -> None:
        nonlocal failures
        while publishing:
            batch = make_messages(20)
            try:
                await t.publish(topic, batch)
            except PublishError:
                failures += 1
                await asyncio.sleep(0.05)
                continue
            confirmed.extend(m.id for m in batch)
            await asyncio.sleep(0.002)

    async def produce_later() -> None:
        await asyncio.sleep(0.2)  # the group exists before the first publish
        await produce()

    async def consume() -> None:
        async with t.subscribe(topic, group) as sub:
            while consuming:
                await gate.wait()
                for d in await sub.receive(100, timeout=0.3):
                    received.add(d.message.id)
                    await d.ack()

    gate = asyncio.Event()
    gate.set()
    consumer = asyncio.create_task(consume())
    producer = asyncio.create_task(produce_later())
    try:
        await _wait_for(lambda: len(received) >= 200, 10, "200 are received")
        # hold the consumer back so that confirmed messages wait in the stream at the stop
        gate.clear()
        await _wait_for(lambda: len(set(confirmed) - received) >= 300, 10, "a backlog of 300")

        if stop == "sigkill":
            private_redis.kill()
        else:
            private_redis.shutdown()
        down_at = len(confirmed)
        assert len(set(confirmed) - received) >= 300, "no backlog at the stop"
        gate.set()  # the consumer now receives through the outage
        await asyncio.sleep(0.5)
        private_redis.start()

        await _wait_for(lambda: len(confirmed) >= down_at + 300, 15, "300 more are confirmed")
        publishing = False
        await producer
        assert failures > 0, "no publish failed: the outage was not observed"
        await _wait_for(
            lambda: received >= set(confirmed), 15, "every confirmed message is received"
        )
        consuming = False
        await consumer  # re-raises anything the consumer's loop raised
    finally:
        publishing = consuming = False
        for task in (producer, consumer):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await t.close()
        await client.aclose()
    lost = set(confirmed) - received
    assert not lost, f"{len(lost)} confirmed messages were never delivered"
