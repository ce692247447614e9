"""NATS JetStream: raw nats-py against msdata's NatsTransport, on the same work, in one run.

    .venv/bin/python bench/bench_nats.py [--n 10000] [--rounds 5] [--url nats://127.0.0.1:4222]

(a) confirmed publish, 100 messages in flight, every message with its ``Nats-Msg-Id`` header:
    raw ``js.publish`` x100 under ``asyncio.gather``, raw ``js.publish_async`` x100 then
    awaiting the acks, and ``NatsTransport.publish`` of a 100-message batch.
(b) pull consume: raw ``fetch(100)`` + ``msg.ack()`` each, and ``Subscription.receive(100)``
    + ``Delivery.ack()`` each, from the same stream (each with its own new durable consumer).

Durability: file-backed streams; nats-server 2.9 confirms a publish once it is written to the
stream file, without fsync (as configured here), so a confirmed message survives a server
crash but not a power loss. Streams are uniquely named and deleted at the end.
Figures are the medians of ``--rounds`` (>= 5) rounds, raw and msdata interleaved, the
order alternating each round; ratios per round, min-median-max. Both consumers ack alike:
nats-py's ``msg.ack()`` and msdata's ``ack()`` each publish ``+ACK`` to the reply subject
without waiting for the server.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import nats
from _fair import MIN_ROUNDS, loadavg, ratios, spread
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from msdata.adapters.nats import NatsSubscription, NatsTransport, stream_name
from msdata.transport import TransportMessage

BATCH = 100
BODY = (
    b'{"specversion":"1.0","id":"0190b2c4-0000-7000-8000-000000000000","source":"bench",'
    b'"type":"orders.OrderPlaced","time":"2026-11-25T10:00:00Z","datacontenttype":'
    b'"application/json","data":{"order_id":"o-12345","amount":"42.50","currency":"EUR"}}'
)


def batches(n: int) -> list[list[TransportMessage]]:
    msgs = [TransportMessage(id=str(uuid.uuid4()), body=BODY) for _ in range(n)]
    return [msgs[i : i + BATCH] for i in range(0, n, BATCH)]


Measure = tuple[float, float]  # (msgs/s wall clock, client CPU µs per message)


async def timed(n: int, work: Callable[[], Awaitable[None]]) -> Measure:
    cpu, wall = time.process_time(), time.perf_counter()
    await work()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return n / wall, cpu / n * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="nats://127.0.0.1:4222")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    n: int = args.n
    if args.rounds < MIN_ROUNDS:
        raise SystemExit(f"at least {MIN_ROUNDS} rounds")
    print(f"loadavg at start: {loadavg()}")

    nc = await nats.connect(args.url)
    js = nc.jetstream()
    prefix = f"BENCH{uuid.uuid4().hex[:8]}_"
    transport = NatsTransport(nc, stream_prefix=prefix)
    # its keyless consumer, pulled by msdata's own request loop rather than nats-py's fetch
    ordered = NatsTransport(nc, stream_prefix=prefix, ordered=True)
    topic = f"bench.{uuid.uuid4().hex[:8]}"
    subject = transport.subject_prefix + topic
    stream = stream_name(topic, prefix)
    results: dict[str, tuple[list[Measure], list[Measure]]] = {}

    async def compare(
        name: str,
        raw: Callable[[], Awaitable[None]],
        ours: Callable[[], Awaitable[None]] | None,
        swap: bool,
        count: int = n,
    ) -> None:
        r = results.setdefault(name, ([], []))
        if ours is not None and swap:  # alternate who goes first: load drifts
            r[1].append(await timed(count, ours))
        r[0].append(await timed(count, raw))
        if ours is not None and not swap:
            r[1].append(await timed(count, ours))

    try:
        await transport.publish(topic, batches(1)[0])  # declares the stream
        for round_ in range(args.rounds):
            swap = round_ % 2 == 1
            # (a) confirmed publish; raw js.publish under gather is slow: a quarter of n
            gather_work, raw_work, our_work = batches(n // 4), batches(n), batches(n)

            async def raw_gather(work: list[list[TransportMessage]] = gather_work) -> None:
                for b in work:
                    await asyncio.gather(
                        *(js.publish(subject, m.body, headers={"Nats-Msg-Id": m.id}) for m in b)
                    )

            async def raw_async(work: list[list[TransportMessage]] = raw_work) -> None:
                for b in work:
                    futures = [
                        await js.publish_async(subject, m.body, headers={"Nats-Msg-Id": m.id})
                        for m in b
                    ]
                    await asyncio.gather(*futures)

            async def ours_publish(work: list[list[TransportMessage]] = our_work) -> None:
                for b in work:
                    await transport.publish(topic, b)

            await compare("publish, gather 100 (raw js.publish)", raw_gather, None, swap, n // 4)
            await compare(
                "publish, 100 in flight (raw publish_async)", raw_async, ours_publish, swap
            )

            # (b) consume: a fresh durable consumer each, over the first n messages
            tag = uuid.uuid4().hex[:6]

            async def raw_consumer(name: str) -> JetStreamContext.PullSubscription:
                await js.add_consumer(
                    stream,
                    ConsumerConfig(
                        durable_name=name,
                        name=name,
                        deliver_policy=DeliverPolicy.ALL,
                        ack_policy=AckPolicy.EXPLICIT,
                        max_ack_pending=1000,
                        max_deliver=-1,
                    ),
                )
                return await js.pull_subscribe_bind(durable=name, stream=stream)

            async def raw_consume(psub: JetStreamContext.PullSubscription) -> None:
                got = 0
                while got < n:
                    for msg in await psub.fetch(min(BATCH, n - got), timeout=2):
                        await msg.ack()
                        got += 1

            async def ours_consume(sub: NatsSubscription) -> None:
                got = 0
                while got < n:
                    for d in await sub.receive(min(BATCH, n - got), timeout=2):
                        await d.ack()
                        got += 1

            for name, t in [
                ("pull fetch(100) + ack", transport),
                ("  the same, ordered=True subscription", ordered),
            ]:
                # both declared before timing
                psub = await raw_consumer(f"raw{tag}{t.ordered:d}")
                sub = await t.subscribe(topic, f"ours{tag}").__aenter__()
                await compare(
                    name,
                    lambda psub=psub: raw_consume(psub),  # type: ignore[misc]
                    lambda sub=sub: ours_consume(sub),  # type: ignore[misc]
                    swap,
                )
                await sub.close()
                await psub.unsubscribe()
    finally:
        await transport.close()
        await ordered.close()
        for info in await js.streams_info():
            if info.config.name.startswith(prefix):
                await js.delete_stream(info.config.name)
        await nc.close()

    print(
        f"\nNATS JetStream, file storage (no fsync per message), {len(BODY)}-byte messages, "
        f"{n} per case, medians of {args.rounds} interleaved rounds; ratio msdata / raw per round"
        " min-median-max"
    )
    print(
        f"{'work':40} {'raw msgs/s':>11} {'msdata msgs/s':>14} {'ratio':>16}"
        f" {'raw CPU µs/msg':>15} {'msdata CPU µs/msg':>18}"
    )
    for name, (raw, ours) in results.items():
        r, rc = (statistics.median(x) for x in zip(*raw, strict=True))
        line = f"{name:40} {r:11,.0f} "
        if ours:
            o, oc = (statistics.median(x) for x in zip(*ours, strict=True))
            per_round = spread(ratios([x[0] for x in ours], [x[0] for x in raw]))
            line += f"{o:14,.0f} {per_round:>16} {rc:15.1f} {oc:18.1f}"
        else:
            line += f"{'-':>14} {'-':>16} {rc:15.1f} {'-':>18}"
        print(line)
    print(f"loadavg at end: {loadavg()}")


if __name__ == "__main__":
    asyncio.run(main())
