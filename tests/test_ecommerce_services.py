"""The e-commerce example as separate processes on PostgreSQL + Redis, driven by the
launcher: every check passes, with services SIGKILLed and restarted mid-run too."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parent.parent


def launch(postgres_url: str, redis_url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    prefix = f"eco_{os.getpid()}_{random.randrange(10**6)}"
    port = random.randrange(20_000, 40_000)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "COLUMNS": "100"}
    cmd = [
        sys.executable, "-m", "examples.ecommerce.launch",
        "--db", postgres_url, "--broker", redis_url, "--schema-prefix", prefix,
        "--base-port", str(port), "--charge-timeout", "3", "--slow-seconds", "4",
        "--quiet-timeout", "40", *extra,
    ]  # fmt: skip
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=115)
    finally:
        import asyncio

        from examples.ecommerce.launch import drop_schemas

        asyncio.run(drop_schemas(postgres_url, prefix))
        import redis

        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):  # the run's streams
            client.delete(key)
        client.close()


def passed(out: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in out.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]


@pytest.mark.postgres
@pytest.mark.redis
def test_separate_processes_on_postgres_and_redis(postgres_url: str, redis_url: str) -> None:
    out = launch(postgres_url, redis_url, "--orders", "30", "--concurrency", "8")
    lines = passed(out)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(lines) == 7 and all(line.startswith("PASS") for line in lines), out.stdout


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_services_killed_and_restarted_mid_run(postgres_url: str, redis_url: str) -> None:
    out = launch(
        postgres_url, redis_url, "--orders", "30", "--concurrency", "8", "--chaos", "--kills", "3"
    )
    assert "chaos: SIGKILLed" in out.stdout, out.stdout
    lines = passed(out)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(lines) == 7 and all(line.startswith("PASS") for line in lines), out.stdout
