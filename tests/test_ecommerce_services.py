"""The e-commerce example as separate processes on PostgreSQL and a broker, driven by the
launcher: every check passes on Redis, RabbitMQ and NATS, and with services SIGKILLed and
restarted mid-run too.

Each run has its own namespace (PostgreSQL schemas ``<ns>_order`` ... and the broker's
``namespace``), so runs never share a name; the launcher's ``--clean`` drops them at the
end, and the test drops what it can again if the launcher did not get that far."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from services import require

pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parent.parent

#: the brokers, each with its pytest marker
BROKERS = [
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("rabbitmq", id="rabbitmq", marks=pytest.mark.rabbitmq),
    pytest.param("nats", id="nats", marks=pytest.mark.nats),
]

CHECKS = {
    "stock + reserved = initial stock, per item",
    "money charged - refunded = sum of completed orders",
    "no order charged twice",
    "every saga ended COMPLETED or COMPENSATED",
    "read model = source of truth",
    "one order per idempotency key",
    "outboxes drained, dead-letter topics empty",
}


def free_base_port() -> int:
    """A port p with p, p + 1 and p + 2 free on 127.0.0.1 just now (the three services').

    Below the kernel's ephemeral range (``ip_local_port_range``, 32768 up by default): a
    killed service is restarted on its port, and in the meantime any outgoing connection
    (to PostgreSQL, the broker, another service) could be given a port in that range."""
    low = 32_768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        base = random.randrange(10_000, max(low, 10_100) - 3)
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + 3):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise RuntimeError("no three free ports in a row")


def launch(
    postgres_url: str, broker_url: str, tmp_path: Path, *extra: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run the launcher (three services and the load driver); returns its output and its
    JSON report."""
    namespace = f"eco_{uuid.uuid4().hex[:12]}"
    port = free_base_port()
    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "COLUMNS": "100"}
    cmd = [
        sys.executable, "-m", "examples.ecommerce.launch",
        "--db", postgres_url, "--broker", broker_url, "--schema-prefix", namespace,
        "--base-port", str(port), "--charge-timeout", "2", "--slow-seconds", "3",
        "--quiet-timeout", "40", "--clean", "--json-report", str(report), *extra,
    ]  # fmt: skip
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=110)
    finally:
        from examples.ecommerce.launch import drop_broker_names, drop_schemas

        async def clean() -> None:  # again: cheap, and the launcher may have died early
            await drop_schemas(postgres_url, namespace)
            await drop_broker_names(broker_url, namespace)

        asyncio.run(clean())
    assert report.exists(), out.stdout + out.stderr
    got = json.loads(report.read_text())
    print("seconds per phase:", got["phases"], "kills:", got["kills"])  # shown with -s / -rA
    return out, got


def assert_trustworthy(
    out: subprocess.CompletedProcess[str], report: dict[str, Any], orders: int
) -> None:
    """The load driver's invariants: every order placed once and ended, every check PASS."""
    why = out.stdout + out.stderr
    assert {c["name"] for c in report["checks"]} == CHECKS, why
    assert [c for c in report["checks"] if not c["ok"]] == [], why
    assert report["placed"] == orders, why
    assert report["completed"] + report["compensated"] == orders and report["failed"] == 0, why
    assert report["completed"] > 0 and report["compensated"] > 0, why  # both paths ran
    assert out.returncode == 0, why


@pytest.mark.postgres
@pytest.mark.parametrize("broker", BROKERS)
def test_separate_processes_on_postgres_and_each_broker(
    postgres_url: str, broker: str, tmp_path: Path
) -> None:
    out, report = launch(
        postgres_url, require(broker), tmp_path, "--orders", "24", "--concurrency", "8"
    )
    assert_trustworthy(out, report, 24)
    assert report["kills"] == []


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_services_killed_and_restarted_mid_run(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    out, report = launch(
        postgres_url,
        redis_url,
        tmp_path,
        *("--orders", "24", "--concurrency", "8", "--chaos", "--kills", "3"),
    )
    assert_trustworthy(out, report, 24)
    # real kills, each while orders were still being placed
    assert sorted(k["service"] for k in report["kills"]) == ["inventory", "order", "payment"]
    assert all(k["answered"] < 24 for k in report["kills"]), report["kills"]
    assert "chaos: SIGKILLed" in out.stdout, out.stdout


@pytest.mark.postgres
@pytest.mark.redis
def test_broken_refunds_fail_the_money_check_on_a_real_broker(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    """--no-refunds reaches the Payment process: the first order's stalled charge is
    refunded without moving money, and only the money check fails (exit 1)."""
    out, report = launch(postgres_url, redis_url, tmp_path, "--orders", "3", "--no-refunds")
    failed = {c["name"] for c in report["checks"] if not c["ok"]}
    assert failed == {"money charged - refunded = sum of completed orders"}, out.stdout
    assert out.returncode == 1
