"""Redis Streams: raw redis-py against msdata's RedisTransport, same work, same run.

(a) confirmed publish of N messages, 100 per pipeline (XADD; returns when Redis replied);
(b) consume + ack of N messages, XREADGROUP COUNT 100, each batch's XACK pipelined with
    the next XREADGROUP (as msdata's subscription sends its acks).

The four paths run interleaved, the order rotating each round (bench/_fair.py).

Durability: as the shared Redis is configured (no AOF, no fsync): "confirmed" means in
Redis' memory. Run: ``.venv/bin/python bench/bench_redis.py [N] [rounds]``.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid

import redis.asyncio as aioredis
from _fair import loadavg, ratios, run_rounds, spread

from msdata.adapters.redis import RedisTransport
from msdata.transport import TransportMessage

URL = "redis://127.0.0.1:6379/0"
BATCH = 100


def make_messages(n: int) -> list[TransportMessage]:
    body = (
        b'{"specversion":"1.0","type":"OrderPlaced","source":"bench","id":"%d",'
        b'"data":{"order_id":"o-%d","amount":1234}}'
    )
    return [TransportMessage(id=str(uuid.uuid4()), body=body % (i, i)) for i in range(n)]


async def raw_publish(r: aioredis.Redis, key: str, msgs: list[TransportMessage]) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(msgs), BATCH):
        pipe = r.pipeline(transaction=False)
        for m in msgs[i : i + BATCH]:
            pipe.xadd(key, {"id": m.id, "body": m.body})
        await pipe.execute()
    return len(msgs) / (time.perf_counter() - t0)


async def msdata_publish(t: RedisTransport, topic: str, msgs: list[TransportMessage]) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(msgs), BATCH):
        await t.publish(topic, msgs[i : i + BATCH])
    return len(msgs) / (time.perf_counter() - t0)


async def raw_consume(r: aioredis.Redis, key: str, msgs: list[TransportMessage]) -> float:
    """Acks the way msdata acks: the XACK of one batch goes out in the same pipeline (one
    round trip) as the next XREADGROUP."""
    await raw_publish(r, key, msgs)  # untimed: the stream to drain
    await r.xgroup_create(key, "g", id="0", mkstream=True)
    n, got = len(msgs), 0
    acks: list[bytes] = []
    t0 = time.perf_counter()
    while got < n:
        pipe = r.pipeline(transaction=False)
        if acks:
            pipe.xack(key, "g", *acks)
        pipe.xreadgroup("g", "c", {key: ">"}, count=BATCH, block=1000)
        res = (await pipe.execute())[-1]
        acks = []
        for _stream, entries in res:
            for eid, _fields in entries:
                acks.append(eid)
            got += len(entries)
    if acks:
        await r.xack(key, "g", *acks)
    rate = n / (time.perf_counter() - t0)
    await r.delete(key)
    return rate


async def msdata_consume(t: RedisTransport, topic: str, msgs: list[TransportMessage]) -> float:
    await msdata_publish(t, topic, msgs)  # untimed: the stream to drain
    n, got = len(msgs), 0
    t0 = time.perf_counter()
    async with t.subscribe(topic, "g", prefetch=BATCH) as sub:
        while got < n:
            for d in await sub.receive(BATCH, timeout=1.0):
                await d.ack()
                got += 1
    return n / (time.perf_counter() - t0)


async def main(n: int, rounds: int) -> None:
    print(f"loadavg at start: {loadavg()}")
    prefix = f"msdata-bench-{uuid.uuid4().hex[:8]}"
    r = aioredis.Redis.from_url(URL)
    t = RedisTransport(r, key_prefix=prefix, trim_interval=None)
    msgs = make_messages(n)
    counter = iter(range(1_000_000))

    async def rp() -> float:
        key = f"{prefix}:raw{next(counter)}"
        rate = await raw_publish(r, key, msgs)
        await r.delete(key)
        return rate

    async def mp() -> float:
        topic = f"md{next(counter)}"
        rate = await msdata_publish(t, topic, msgs)
        await r.delete(f"{prefix}:{topic}")
        return rate

    async def rc() -> float:
        return await raw_consume(r, f"{prefix}:raw{next(counter)}", msgs)

    async def mc() -> float:
        return await msdata_consume(t, f"md{next(counter)}", msgs)

    try:
        got = await run_rounds({"raw_p": rp, "md_p": mp, "raw_c": rc, "md_c": mc}, rounds)
    finally:
        keys = [k async for k in r.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await r.delete(*keys)
        await t.close()
        await r.aclose()
    print(
        f"Redis Streams, N={n}, {rounds} interleaved rounds (medians; ratio msdata / raw per "
        f"round min-median-max), batch {BATCH}, no fsync (shared server)"
    )
    print(f"{'work':<44} {'raw msgs/s':>12} {'msdata msgs/s':>14} {'ratio':>16}")
    labels = {
        "_p": "confirmed publish, 100 per pipeline",
        "_c": "XREADGROUP COUNT 100, XACK in the next trip",
    }
    med = statistics.median
    for sfx, label in labels.items():
        raw, md = got["raw" + sfx], got["md" + sfx]
        print(f"{label:<44} {med(raw):>12,.0f} {med(md):>14,.0f} {spread(ratios(md, raw)):>16}")
    print(f"loadavg at end: {loadavg()}")


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(main(int(args[0]) if args else 20_000, int(args[1]) if len(args) > 1 else 5))
