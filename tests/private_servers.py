"""Private Redis, NATS and RabbitMQ servers that a test owns (see /work/shared/SERVICES.md).

Each one runs as a subprocess on free loopback ports with its own data directory, is stopped
by its process id (never by name), and keeps its data across :meth:`PrivateServer.restart`,
so a test can kill a broker under a running transport and start it again. The shared servers
are never touched.

``open_private(kind, directory)`` starts one and returns it; ``close()`` stops it for good.
A server binary that is not installed skips the test (fails it under
``MSDATA_REQUIRE_SERVICES=1``), as a missing shared server does.
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
from pathlib import Path

from services import missing

__all__ = ["PrivateNats", "PrivateRabbitMQ", "PrivateRedis", "PrivateServer", "open_private"]

# how long a stopped server may stay down before it must be listening again
_START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone as far as we are concerned
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _binary(name: str, *fallbacks: str) -> str:
    found = shutil.which(name) or next((f for f in fallbacks if os.path.exists(f)), None)
    if found is None:
        missing(f"{name} is not installed")
        raise AssertionError("unreachable")  # missing() skips or fails
    return found


class PrivateServer:
    """A broker process of our own: :meth:`start`, :meth:`stop` (SIGKILL or clean), start
    again on the same port and data, :meth:`close` for good."""

    #: the URL clients connect to
    url: str

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.pid: int | None = None

    def start(self) -> None:
        raise NotImplementedError

    def _ready(self) -> bool:
        """Accepts clients now."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def _wait_ready(self, proc: subprocess.Popen[bytes] | None = None) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._ready():
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{type(self).__name__} exited ({proc.returncode}): {self.dir}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{type(self).__name__} did not start: {self.dir}")
            time.sleep(0.05)

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self, kill: bool) -> None:
        """SIGKILL (``kill``) or SIGTERM (a clean stop: each of these brokers shuts down
        gracefully on it), and wait until the process is gone and its port closed (a
        multi-threaded process's main thread shows as a zombie while the others still exit)."""
        pid = self.pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
        deadline = time.monotonic() + 60
        while _alive(pid) or self._listening():
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if time.monotonic() > deadline + 10:
                    raise RuntimeError(f"{type(self).__name__} {pid} did not go away")
            self._reap()
            time.sleep(0.05)
        self._reap()
        self.pid = None

    def _reap(self) -> None:
        """Collect our child's exit status (a server we started as a child process)."""

    async def restart(self, kill: bool) -> None:
        """The :attr:`msdata.transport.TransportFeatures.restart` hook: stop, stay down a
        moment (so clients see the outage), start again; without blocking the event loop."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.stop, kill)
        await asyncio.sleep(0.5)
        await loop.run_in_executor(None, self.start)

    def close(self) -> None:
        self.stop(kill=True)


class _ChildProcess(PrivateServer):
    """A server that runs in the foreground as our child process."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        with open(self.dir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log)
        self.pid = self.proc.pid
        self._wait_ready(self.proc)

    def _reap(self) -> None:
        if self.proc is not None:
            self.proc.poll()


class PrivateRedis(_ChildProcess):
    """redis-server, append-only with ``appendfsync always``: a reply to a write means the
    write is on disk, so a confirmed message survives a SIGKILL."""

    def __init__(self, directory: Path) -> None:
        self.binary = _binary("redis-server")
        super().__init__(directory)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--dir", str(self.dir),
        ]  # fmt: skip

    def _ready(self) -> bool:
        # the port opens before the append-only file is loaded (replies are LOADING then)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False


class PrivateNats(_ChildProcess):
    """nats-server with JetStream, its store in the server's directory."""

    def __init__(self, directory: Path) -> None:
        self.binary = _binary("nats-server", "/usr/sbin/nats-server")
        super().__init__(directory)
        self.url = f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        data = str(self.dir / "jetstream")
        return [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", data]


class PrivateRabbitMQ(PrivateServer):
    """One RabbitMQ node of our own (ready in about 6 s). The Debian start script runs the
    node as the ``rabbitmq`` user, so this needs root, and a directory that user owns."""

    def __init__(self, directory: Path) -> None:
        # ``directory`` is not used: pytest's are private to root, the node's user must
        # reach its own
        binary = _binary("rabbitmq-server")
        if os.geteuid() != 0:
            missing("a private RabbitMQ node needs root (it runs as the rabbitmq user)")
        self.binary = binary
        super().__init__(Path(tempfile.mkdtemp(prefix="msdata-rabbit-", dir="/tmp")))
        self.dist_port = free_port()
        self.node = f"msdata{uuid.uuid4().hex[:8]}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        d = self.dir
        (d / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users.guest = true\n"
        )
        # our own env file, so a machine-wide one cannot move the node back to 5672
        (d / "env.conf").write_text("")
        (d / "plugins").write_text("[].\n")
        for sub in ("mnesia", "log"):
            (d / sub).mkdir()
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(d)], check=True)

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

    def start(self) -> None:
        pid_file = self.dir / "pid"
        pid_file.unlink(missing_ok=True)
        subprocess.run([self.binary, "-detached"], env=self._env(), check=True, capture_output=True)
        deadline = time.monotonic() + _START_TIMEOUT
        # the pid file is written once the node runs; the port opens when it is ready
        while self.pid is None:
            with contextlib.suppress(OSError, ValueError):
                self.pid = int(pid_file.read_text().strip())
            if time.monotonic() > deadline:
                raise RuntimeError(f"private RabbitMQ did not start; see {self.dir / 'log'}")
            time.sleep(0.1)
        self._wait_ready()

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                # ready when it answers the AMQP 0-9-1 header with connection.start
                s.sendall(b"AMQP\x00\x00\x09\x01")
                return s.recv(8)[:1] == b"\x01"
        except OSError:
            return False

    def stop(self, kill: bool) -> None:
        super().stop(kill)
        self._kill_strays()

    def _kill_strays(self) -> None:
        """Helpers the node started (erl_child_setup, inet_gethost, epmd's children) that
        outlive it: found by this node's name or directory in their command line."""
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
        try:
            super().close()
        finally:
            self._kill_strays()
            shutil.rmtree(self.dir, ignore_errors=True)


_KINDS: dict[str, type[PrivateServer]] = {
    "redis": PrivateRedis,
    "nats": PrivateNats,
    "rabbitmq": PrivateRabbitMQ,
}


def open_private(kind: str, directory: Path) -> PrivateServer:
    """A started private server of ``kind`` (``redis``, ``nats``, ``rabbitmq``) keeping its
    data under ``directory``; ``close()`` it when done."""
    server = _KINDS[kind](directory)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server
