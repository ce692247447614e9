"""RabbitMQ restarts under a running publisher and consumer: nothing confirmed is lost.

The broker here is a private node this test starts on free ports with its own data directory
(see /work/shared/SERVICES.md) and stops by its process id; the shared server is not touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import pytest

from msdata.adapters.rabbitmq import RabbitMQTransport
from msdata.errors import PublishError
from msdata.transport import Subscription, TransportMessage

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow, pytest.mark.timeout(150)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone as far as we are concerned
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class PrivateRabbit:
    """One RabbitMQ node of our own: start, SIGKILL, clean stop, start again (same data)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="msdata-rabbit-"))
        self.port = _free_port()
        self.dist_port = _free_port()
        self.node = f"msdata{uuid.uuid4().hex[:8]}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users.guest = true\n"
        )
        # our own env file, so the machine-wide one cannot move the node back to 5672
        (self.dir / "env.conf").write_text("")
        (self.dir / "plugins").write_text("[].\n")
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir()
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(self.dir)], check=True)
        self.pid: int | None = None

    def _env(self) -> dict[str, str]:
        d = self.dir
        return {
            **os.environ,
            "RABBITMQ_CONF_ENV_FILE": str(d / "env.conf"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(d / "pid"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(d / "ff"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "plugins"),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        }

    def start(self, timeout: float = 60.0) -> None:
        pid_file = self.dir / "pid"
        pid_file.unlink(missing_ok=True)
        subprocess.run(
            ["rabbitmq-server", "-detached"], env=self._env(), check=True, capture_output=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # the pid file is written once the node runs; the port opens when it is ready
            if self.pid is None and pid_file.exists():
                with contextlib.suppress(ValueError):
                    self.pid = int(pid_file.read_text().strip())
            if self.pid is not None and self._accepts():
                return
            time.sleep(0.2)
        raise RuntimeError(f"private RabbitMQ did not start; see {self.dir / 'log'}")

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                # ready when it answers the AMQP 0-9-1 header with connection.start
                s.sendall(b"AMQP\x00\x00\x09\x01")
                return s.recv(8)[:1] == b"\x01"
        except OSError:
            return False

    def kill(self) -> None:
        assert self.pid is not None
        os.kill(self.pid, signal.SIGKILL)
        self._wait_gone()

    def stop(self) -> None:
        """A clean stop: the node shuts down on SIGTERM."""
        assert self.pid is not None
        os.kill(self.pid, signal.SIGTERM)
        self._wait_gone(timeout=60)

    def _wait_gone(self, timeout: float = 20.0) -> None:
        assert self.pid is not None
        deadline = time.monotonic() + timeout
        while _alive(self.pid):
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
            time.sleep(0.1)
        self.pid = None
        self._kill_strays()

    def _kill_strays(self) -> None:
        """Helpers the node started (erl_child_setup, inet_gethost) that outlive it."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if self.node.encode() in cmdline or str(self.dir).encode() in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)

    def close(self) -> None:
        if self.pid is not None and _alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
            self._wait_gone()
        self._kill_strays()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_rabbit() -> Iterator[PrivateRabbit]:
    if shutil.which("rabbitmq-server") is None or os.geteuid() != 0:
        pytest.skip("needs rabbitmq-server and root (the node runs as the rabbitmq user)")
    node = PrivateRabbit()
    try:
        node.start()
        yield node
    finally:
        node.close()


class Traffic:
    """A publisher that retries unconfirmed batches and a consumer that acks everything."""

    def __init__(self, transport: RabbitMQTransport, topic: str) -> None:
        self.transport = transport
        self.topic = topic
        self.confirmed: set[str] = set()
        self.received: set[str] = set()
        self.failures = 0
        self.seq = 0

    async def publish_batches(self, batches: int, size: int = 50) -> None:
        for _ in range(batches):
            batch = [
                TransportMessage(id=f"m{self.seq + i}", body=b'{"n":1}', key=f"k{i % 5}")
                for i in range(size)
            ]
            self.seq += size
            while True:
                try:
                    await self.transport.publish(self.topic, batch)
                    break
                except PublishError:
                    self.failures += 1  # not confirmed: publish the batch again
                    await asyncio.sleep(0.2)
            self.confirmed.update(m.id for m in batch)
            await asyncio.sleep(0.01)

    async def consume(self, sub: Subscription) -> None:
        while True:
            for d in await sub.receive(100, timeout=0.5):
                self.received.add(d.message.id)
                await d.ack()

    async def wait_all_received(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.confirmed <= self.received and time.monotonic() < deadline:
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def running(node: PrivateRabbit) -> AsyncIterator[Traffic]:
    conn = await aio_pika.connect_robust(node.url, reconnect_interval=0.5)
    transport = RabbitMQTransport(conn, publish_timeout=5.0)
    traffic = Traffic(transport, f"restart-{uuid.uuid4().hex[:8]}")
    try:
        async with transport.subscribe(traffic.topic, "workers") as sub:
            consumer = asyncio.create_task(traffic.consume(sub))
            try:
                yield traffic
            finally:
                consumer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await consumer
    finally:
        await transport.close()
        await conn.close()


async def _restart(node: PrivateRabbit, traffic: Traffic, how: str) -> None:
    """Publish while the broker goes down (``how``) and comes back up."""
    publisher = asyncio.create_task(traffic.publish_batches(40))
    await asyncio.sleep(0.3)  # mid-stream
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, node.kill if how == "kill" else node.stop)
    await loop.run_in_executor(None, node.start)
    await asyncio.wait_for(publisher, timeout=60)


async def test_confirmed_messages_survive_a_sigkill_and_a_clean_stop(
    private_rabbit: PrivateRabbit,
) -> None:
    async with running(private_rabbit) as traffic:
        await traffic.publish_batches(5)
        await _restart(private_rabbit, traffic, "kill")
        await _restart(private_rabbit, traffic, "stop")
        # after both restarts, the same subscription still receives new messages
        before = len(traffic.confirmed)
        await traffic.publish_batches(5)
        await traffic.wait_all_received(timeout=30)
        missing = traffic.confirmed - traffic.received
        assert not missing, f"{len(missing)} confirmed messages never delivered"
        assert len(traffic.confirmed) == before + 250
        assert traffic.failures > 0, "the broker went down while nothing was being published"
