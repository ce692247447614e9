"""RabbitMQ: raw aio-pika against msdata's RabbitMQTransport on the same work, in one run.

    .venv/bin/python bench/bench_rabbitmq.py [--messages 4000] [--rounds 3] [--url amqp://...]

(a) confirmed publish of persistent messages, 100 in flight (msdata: publish() of batches of
    100; raw: 100 ``exchange.publish`` calls gathered), into a fanout exchange bound to a
    durable classic queue (the topology msdata declares; ``--queue-type quorum`` for quorum
    queues), 250-byte JSON bodies with a message id, a key and one header;
(b) consume + ack with prefetch 100 from such a queue (raw: ``queue.iterator()`` and
    ``message.ack()``; msdata: ``receive(100)`` and ``ack()``, the transport built with
    ``max_message_bytes=64 KiB`` so that its byte budget allows the prefetch of 100).

Durability: persistent messages on durable queues; the broker confirms a persistent message
once it is on disk (classic queues fsync in batches and confirm after the fsync; quorum queues
fsync their log). Names are unique per run and deleted at the end. Rounds interleave raw and
msdata in rotating order (bench/_fair.py); the table shows the medians and the per-round
ratios min-median-max. The raw consumer is aio-pika's ``queue.iterator()`` and acks as msdata
does: ``basic_ack(tag, wait=False)`` on the channel (the frame written, its drain not
awaited); msdata reads aiormq deliveries directly.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import aio_pika
from _fair import loadavg, ratios, run_rounds, spread

from msdata.adapters.rabbitmq import RabbitMQTransport
from msdata.adapters.rabbitmq.transport import group_queue_name
from msdata.transport import TransportMessage

BODY = b'{"specversion":"1.0","type":"OrderPlaced","data":{"order":"' + b"x" * 190 + b'"}}'
BATCH = 100


def make(n: int) -> list[TransportMessage]:
    return [
        TransportMessage(str(uuid.uuid4()), BODY, key=f"k{i % 50}", headers={"x-trace": "t"})
        for i in range(n)
    ]


async def raw_publish(channel: aio_pika.abc.AbstractChannel, exchange_name: str, n: int) -> float:
    exchange = await channel.get_exchange(exchange_name)
    msgs = make(n)
    start = time.perf_counter()
    for i in range(0, n, BATCH):
        await asyncio.gather(
            *[
                exchange.publish(
                    aio_pika.Message(
                        m.body,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        message_id=m.id,
                        headers={"x-trace": "t", "x-msdata-key": m.key},
                    ),
                    routing_key="",
                )
                for m in msgs[i : i + BATCH]
            ]
        )
    return n / (time.perf_counter() - start)


async def msdata_publish(transport: RabbitMQTransport, topic: str, n: int) -> float:
    msgs = make(n)
    start = time.perf_counter()
    for i in range(0, n, BATCH):
        await transport.publish(topic, msgs[i : i + BATCH])
    return n / (time.perf_counter() - start)


async def raw_consume(conn: aio_pika.abc.AbstractConnection, queue_name: str, n: int) -> float:
    channel = await conn.channel()
    await channel.set_qos(prefetch_count=BATCH)
    queue = await channel.get_queue(queue_name, ensure=False)
    got = 0
    async with queue.iterator() as it:
        start = time.perf_counter()
        async for message in it:
            # as msdata acks: the ack frame written, not waited for
            await message.channel.basic_ack(message.delivery_tag, wait=False)
            got += 1
            if got == n:
                break
    rate = n / (time.perf_counter() - start)
    await channel.close()
    return rate


async def msdata_consume(transport: RabbitMQTransport, topic: str, group: str, n: int) -> float:
    got = 0
    async with transport.subscribe(topic, group, prefetch=BATCH) as sub:
        start = time.perf_counter()
        while got < n:
            batch = await sub.receive(BATCH, timeout=5.0)
            if not batch:
                raise RuntimeError(f"msdata consumer stalled at {got}/{n}")
            for d in batch:
                await d.ack()
            got += len(batch)
        return n / (time.perf_counter() - start)


async def main(url: str, n: int, rounds: int, queue_type: str) -> None:
    print(f"loadavg at start: {loadavg()}")
    conn = await aio_pika.connect_robust(url)
    # 250-byte messages: a max_message_bytes to match, so max_held_bytes (64 MiB) leaves the
    # group queue's consumer the same prefetch of 100 as the raw one (with the default 1 MiB
    # + 64 KiB it would get 45: see RabbitMQSubscription.prefetches)
    transport = RabbitMQTransport(conn, queue_type=queue_type, max_message_bytes=64 * 1024)
    run = uuid.uuid4().hex[:8]
    topic, group = f"bench-{run}", "workers"
    raw_topic = f"bench-raw-{run}"
    raw_queue = group_queue_name(raw_topic, group)
    admin = await conn.channel()
    results: dict[str, list[float]] = {k: [] for k in ("raw_pub", "ms_pub", "raw_con", "ms_con")}
    try:
        # the same topology for both: msdata declares its own; the raw one is built alike
        async with transport.subscribe(topic, group):
            pass
        exchange = await admin.declare_exchange(
            raw_topic, aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await admin.declare_queue(
            raw_queue, durable=True, arguments={"x-queue-type": queue_type}
        )
        await queue.bind(exchange)
        pub_channel = await conn.channel(publisher_confirms=True)
        # warm up both paths (connections, declarations, JIT-free but caches)
        await raw_publish(pub_channel, raw_topic, 200)
        await msdata_publish(transport, topic, 200)
        await raw_consume(conn, raw_queue, 200)
        await msdata_consume(transport, topic, group, 200)
        ms_queue = group_queue_name(topic, group)

        async def purged(rate: float, queue_name: str) -> float:
            await (await admin.get_queue(queue_name, ensure=False)).purge()
            return rate

        async def raw_pub() -> float:
            return await purged(await raw_publish(pub_channel, raw_topic, n), raw_queue)

        async def ms_pub() -> float:
            return await purged(await msdata_publish(transport, topic, n), ms_queue)

        async def raw_con() -> float:
            await raw_publish(pub_channel, raw_topic, n)  # untimed: the queue to drain
            return await raw_consume(conn, raw_queue, n)

        async def ms_con() -> float:
            await msdata_publish(transport, topic, n)  # untimed: the queue to drain
            return await msdata_consume(transport, topic, group, n)

        # each path starts from an empty queue and leaves it empty
        results.update(
            await run_rounds(
                {"raw_pub": raw_pub, "ms_pub": ms_pub, "raw_con": raw_con, "ms_con": ms_con},
                rounds,
            )
        )
    finally:
        await transport.close()
        exchanges, queues = transport.declared
        for name in sorted(queues | {raw_queue}):
            await admin.queue_delete(name)
        for name in sorted(exchanges | {raw_topic}):
            await admin.exchange_delete(name)
        await conn.close()

    def row(label: str, raw: list[float], ms: list[float]) -> str:
        r, m = statistics.median(raw), statistics.median(ms)
        return f"| {label} | {r:,.0f} | {m:,.0f} | {spread(ratios(ms, raw))} |"

    print(
        f"RabbitMQ, {n} messages x {rounds} interleaved rounds (medians; msdata/raw per round "
        f"min-median-max), persistent, {queue_type} queue"
    )
    print("| work | raw aio-pika msgs/s | msdata msgs/s | msdata/raw |")
    print("|---|---|---|---|")
    print(row("publish, confirms, 100 in flight", results["raw_pub"], results["ms_pub"]))
    print(row("consume + ack, prefetch 100", results["raw_con"], results["ms_con"]))
    print(f"loadavg at end: {loadavg()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--queue-type", choices=["classic", "quorum"], default="classic")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.messages, args.rounds, args.queue_type))
