"""A poison message that crashes its consumer's process: on every broker, each SIGKILLed
consumer counts as an attempt (1, 2, 3), and then the message is dead-lettered with
``x-msdata-attempts`` 3 instead of being handed to a consumer again. (The conformance suite
has the same case with a consumer abandoned in-process; this one kills real processes.)"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from msdata.testing.conformance.transport import collect, make_messages
from msdata.testing.waiting import eventually
from msdata.transport import DEAD_LETTER_ATTEMPTS, Delivery, dead_letter_topic
from msdata.urls import transport_from_url
from services import require

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

WORKER = str(Path(__file__).with_name("crash_loop_worker.py"))
sys.path.insert(0, str(Path(__file__).parent))
from crash_loop_worker import OPTIONS  # noqa: E402

BROKERS = [
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("rabbitmq", id="rabbitmq", marks=pytest.mark.rabbitmq),
    pytest.param("nats", id="nats", marks=pytest.mark.nats),
]


async def run_worker(backend: str, url: str, namespace: str, topic: str, group: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        WORKER,
        backend,
        url,
        namespace,
        topic,
        group,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == -9, err.decode()[-2000:]  # it died by SIGKILL
    word, attempt = out.decode().split()
    assert word == "ATTEMPT"
    return int(attempt)


@pytest.mark.parametrize("backend", BROKERS)
async def test_each_killed_consumer_counts_and_then_the_message_is_dead_lettered(
    backend: str,
) -> None:
    url = require(backend)
    namespace = f"crash-{uuid.uuid4().hex[:10]}"
    topic, group = "orders", "billing"
    transport = transport_from_url(url, namespace=namespace, **OPTIONS[backend])
    try:
        await transport.declare_group(topic, group)
        poison, good = make_messages(2)
        await transport.publish(topic, [poison])
        attempts = [await run_worker(backend, url, namespace, topic, group) for _ in range(3)]
        assert attempts == [1, 2, 3]
        await transport.publish(topic, [good])
        async with (
            transport.subscribe(topic, group, max_attempts=3) as sub,
            transport.subscribe(dead_letter_topic(topic, group), "ops") as dlq,
        ):
            handed: list[Delivery] = []
            dead: list[Delivery] = []

            async def settled() -> bool:
                handed.extend(await collect(sub, 1, timeout=0.3))
                dead.extend(await collect(dlq, 1, timeout=0.1))
                return bool(handed and dead)

            await eventually(settled, 20, what=lambda: f"{len(handed)} handed, {len(dead)} dead")
            assert [d.message.id for d in handed] == [good.id]
            assert [d.message.id for d in dead] == [poison.id]
            assert dead[0].message.headers[DEAD_LETTER_ATTEMPTS] == "3"
    finally:
        await _clean(backend, transport, namespace)


async def _clean(backend: str, transport: object, namespace: str) -> None:
    t: object = transport
    try:
        if backend == "redis":
            client = t._client  # type: ignore[attr-defined]
            keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
            if keys:
                await client.delete(*keys)
        elif backend == "rabbitmq":
            conn = await t._connect()  # type: ignore[attr-defined]
            exchanges, queues = t.declared  # type: ignore[attr-defined]
            channel = await conn.channel()
            for name in sorted(queues):
                await channel.queue_delete(name)
            for name in sorted(exchanges):
                await channel.exchange_delete(name)
            await channel.close()
        elif backend == "nats":
            js = t.client.jetstream()  # type: ignore[attr-defined]
            for info in await js.streams_info():
                if info.config.name.startswith(t.stream_prefix):  # type: ignore[attr-defined]
                    await js.delete_stream(info.config.name)
    finally:
        await t.close()  # type: ignore[attr-defined]
