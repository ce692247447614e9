"""The e-commerce launcher and a service process as a new user meets them: a second run on
taken ports fails fast instead of driving the first run's services, a signal stops a run
like its normal end (services stopped, --clean done, one line), an earlier run's broker
names are dropped at start, and a service started by hand keeps running."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from msdata.testing import eventually
from msdata.transport import dead_letter_topic
from services import require

pytest.importorskip("fastapi")

from examples.ecommerce import launch
from examples.ecommerce.apps import topology
from examples.ecommerce.launch import drop_broker_names, drop_schemas

from test_ecommerce_services import free_base_port

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "COLUMNS": "100"}


def launcher(
    postgres_url: str, broker_url: str, namespace: str, port: int, *extra: str
) -> list[str]:
    return [
        sys.executable, "-m", "examples.ecommerce.launch",
        "--db", postgres_url, "--broker", broker_url, "--schema-prefix", namespace,
        "--base-port", str(port), "--charge-timeout", "2", "--slow-seconds", "3",
        "--quiet-timeout", "40", *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def listening(port: int) -> Iterator[socket.socket]:
    """Something else listening on ``port`` (127.0.0.1), as another run's service would."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield sock


@contextlib.contextmanager
def cleaned(postgres_url: str, broker_url: str, namespace: str) -> Iterator[None]:
    try:
        yield
    finally:

        async def clean() -> None:
            await drop_schemas(postgres_url, namespace)
            await drop_broker_names(broker_url, namespace)

        asyncio.run(clean())


def test_prefix_is_checked_with_the_services_rule_and_flags_reach_the_services() -> None:
    p = launch.parser()
    for bad in ("Shop", "shop-1", "1shop", "", "x" * 31):
        with pytest.raises(SystemExit):
            p.parse_args(["--schema-prefix", bad])
    args = p.parse_args(["--schema-prefix", "shop_2", "--duplicate-every", "0", "--no-refunds"])
    extra = launch.service_args(args)
    assert extra[extra.index("--duplicate-every") + 1] == "0"
    assert "--no-refunds" in extra and extra[extra.index("--namespace") + 1] == "shop_2"
    assert "--no-refunds" not in launch.service_args(p.parse_args([]))


@pytest.mark.postgres
@pytest.mark.redis
def test_a_taken_port_fails_the_run_fast_with_one_line(postgres_url: str, redis_url: str) -> None:
    namespace = f"eco_{uuid.uuid4().hex[:12]}"
    port = free_base_port()
    with cleaned(postgres_url, redis_url, namespace), listening(port + 1):
        out = subprocess.run(
            launcher(postgres_url, redis_url, namespace, port, "--orders", "4"),
            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.strip() == (
        f"launch failed: port {port + 1} on 127.0.0.1 is in use (another run? choose --base-port)"
    ), out.stderr
    assert "PASS" not in out.stdout


@pytest.mark.postgres
@pytest.mark.redis
def test_a_service_that_cannot_bind_ends_the_run(
    postgres_url: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The port is taken only after the launcher looked (a race with another run): the
    service that cannot bind exits and the run ends with one line, exit 1 - it does not
    place its orders against whatever answers on that port."""
    monkeypatch.setattr(launch, "check_ports_free", lambda ports: None)
    namespace = f"eco_{uuid.uuid4().hex[:12]}"
    port = free_base_port()
    with cleaned(postgres_url, redis_url, namespace), listening(port):
        argv = launcher(postgres_url, redis_url, namespace, port, "--orders", "4")[3:]
        assert launch.main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(
        rf"^launch failed: the order service exited \(code \d+\) on port {port}", err, re.M
    ), err
    assert "Traceback" not in err


def test_only_this_runs_processes_pass_the_health_check() -> None:
    fleet = launch.Fleet.__new__(launch.Fleet)
    fleet.run_id, fleet.pairs = "shop-1", set()

    class Proc:
        pid = 4242

    fleet.procs = {"order": Proc()}  # type: ignore[dict-item]
    ours = {"run": "shop-1", "pid": 4242, "consumers": {"subscriptions": ["a.b/g"]}}
    assert fleet.answers("order", ours) and fleet.pairs == {("a.b", "g")}
    assert not fleet.answers("order", {**ours, "run": "shop-0"})  # an earlier run's
    assert not fleet.answers("order", {**ours, "pid": 4243})
    assert not fleet.answers("order", {"status": "ok"})  # a service without identity
    assert not fleet.answers("order", None)


class Names:
    """Names under the run's prefix on the broker: one left by an earlier run, and the
    names a run makes (RabbitMQ: the queues of the services' subscriptions; Redis: keys
    starting with these, every key of the namespace)."""

    def __init__(self, broker_url: str, namespace: str) -> None:
        self.url, self.namespace = broker_url, namespace
        if broker_url.startswith("redis"):
            self.stale = [f"{namespace}:stale"]
        else:  # the launcher's dead-letter audit queue: no service declares it
            x = f"{namespace}:{dead_letter_topic('payment.ChargePayment', 'payment')}"
            self.stale = [f"{x}:{launch.DLQ_AUDIT}"]
        self.made = [f"{namespace}:{t}:{g}" for t, g in sorted(topology(broker_url))]
        if broker_url.startswith("redis"):  # every key under the namespace
            self.made = [f"{namespace}:"]

    def leave_stale(self) -> None:
        asyncio.run(self._each(self.stale, create=True))

    def existing(self, names: list[str]) -> list[str]:
        return asyncio.run(self._each(names, create=False))

    async def _each(self, names: list[str], *, create: bool) -> list[str]:
        if self.url.startswith("redis"):
            import redis.asyncio as redis

            client = redis.Redis.from_url(self.url)
            try:
                if create:
                    await client.set(names[0], "left by an interrupted run")
                    return names
                found = [k.decode() async for k in client.scan_iter(match=f"{self.namespace}:*")]
                return [k for k in found if k.startswith(tuple(names))]
            finally:
                await client.aclose()
        import aio_pika

        conn = await aio_pika.connect(self.url)
        found = []
        try:
            for name in names:
                channel = await conn.channel()
                try:
                    await channel.declare_queue(name, durable=True, passive=not create)
                    found.append(name)
                except aio_pika.exceptions.ChannelClosed:
                    pass
        finally:
            await conn.close()
        return found


@pytest.mark.postgres
@pytest.mark.parametrize(
    "sig,broker",
    [
        pytest.param(signal.SIGTERM, "redis", id="SIGTERM-redis", marks=pytest.mark.redis),
        pytest.param(signal.SIGINT, "redis", id="SIGINT-redis", marks=pytest.mark.redis),
        pytest.param(signal.SIGINT, "rabbitmq", id="SIGINT-rabbitmq", marks=pytest.mark.rabbitmq),
    ],
)
def test_a_signal_stops_the_run_like_its_end(
    postgres_url: str, sig: signal.Signals, broker: str
) -> None:
    """Services stopped, --clean done (no broker name left, RabbitMQ's too though the
    services are down by then; no schema), one line on stderr, no traceback, exit 128 +
    the signal; and an earlier run's stale name under the prefix was dropped at start."""
    broker_url = require(broker)
    namespace = f"eco_{uuid.uuid4().hex[:12]}"
    port = free_base_port()
    names = Names(broker_url, namespace)
    names.leave_stale()
    with cleaned(postgres_url, broker_url, namespace):
        proc = subprocess.Popen(
            launcher(postgres_url, broker_url, namespace, port, "--orders", "2000", "--clean"),
            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            line = ""
            deadline = time.monotonic() + 90
            while "as processes" not in line and time.monotonic() < deadline:
                line += proc.stdout.readline()
            assert "as processes" in line, line
            pids = json.loads(line[line.index("[") : line.index("]") + 1])
            assert names.existing(names.stale) == []  # dropped at start
            assert names.existing(names.made) != []  # the run's own
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 128 + sig, out + err
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1] == (
            f"stopped by {sig.name}: services stopped, run's names dropped"
        ), err
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert names.existing(names.made) == []

        async def schemas() -> list[str]:
            import asyncpg

            conn = await asyncpg.connect(postgres_url)
            try:
                rows = await conn.fetch(
                    "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", f"{namespace}%"
                )
                return [r[0] for r in rows]
            finally:
                await conn.close()

        assert asyncio.run(schemas()) == []


def test_a_service_started_by_hand_outlives_its_shell(tmp_path: Path) -> None:
    """setsid nohup from a shell that exits: the service is re-parented and keeps running
    (it watches its parent only with --watch-parent, which the launcher passes)."""
    import httpx

    port = free_base_port()
    serve = (
        f"{sys.executable} -m examples.ecommerce.serve inventory"
        f" --db sqlite:///{tmp_path}/inventory.db --broker memory:// --port {port}"
    )
    subprocess.run(
        ["sh", "-c", f"setsid nohup {serve} >{tmp_path}/log 2>&1 &"],
        cwd=ROOT, env=ENV, check=True, timeout=30,
    )  # fmt: skip
    pid = None

    def up() -> bool:
        nonlocal pid
        try:
            got = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
        except httpx.HTTPError:
            return False
        pid = got["pid"]
        return got["status"] == "ok"

    try:
        asyncio.run(eventually(up, timeout=60, interval=0.2))
        time.sleep(2.5)  # the old watcher stopped it about a second after its shell left
        assert up(), (tmp_path / "log").read_text()
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
