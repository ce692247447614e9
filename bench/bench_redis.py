"""Redis Streams: raw redis-py against msdata's RedisTransport, same work, same run.

(a) confirmed publish of N messages, 100 per pipeline (XADD; returns when Redis replied);
(b) consume + ack of N messages, XREADGROUP COUNT 100 + XACK.

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


async def raw_consume(r: aioredis.Redis, key: str, n: int) -> float:
    await r.xgroup_create(key, "g", id="0", mkstream=True)
    got = 0
    t0 = time.perf_counter()
    while got < n:
        res = await r.xreadgroup("g", "c", {key: ">"}, count=BATCH, block=1000)
        for _stream, entries in res:
            ids = [eid for eid, _fields in entries]
            got += len(ids)
            await r.xack(key, "g", *ids)
    return n / (time.perf_counter() - t0)


async def msdata_consume(t: RedisTransport, topic: str, n: int) -> float:
    got = 0
    t0 = time.perf_counter()
    async with t.subscribe(topic, "g", prefetch=BATCH) as sub:
        while got < n:
            for d in await sub.receive(BATCH, timeout=1.0):
                await d.ack()
                got += 1
    return n / (time.perf_counter() - t0)


async def main(n: int, rounds: int) -> None:
    prefix = f"msdata-bench-{uuid.uuid4().hex[:8]}"
    r = aioredis.Redis.from_url(URL)
    t = RedisTransport(r, key_prefix=prefix, trim_interval=None)
    msgs = make_messages(n)
    results: dict[str, list[tuple[float, float]]] = {"publish": [], "consume": []}
    try:
        for rnd in range(rounds):
            raw_key, topic = f"{prefix}:raw{rnd}", f"md{rnd}"
            # alternate who goes first, so neither always gets the warmer server
            if rnd % 2 == 0:
                raw_p = await raw_publish(r, raw_key, msgs)
                md_p = await msdata_publish(t, topic, msgs)
                raw_c = await raw_consume(r, raw_key, n)
                md_c = await msdata_consume(t, topic, n)
            else:
                md_p = await msdata_publish(t, topic, msgs)
                raw_p = await raw_publish(r, raw_key, msgs)
                md_c = await msdata_consume(t, topic, n)
                raw_c = await raw_consume(r, raw_key, n)
            results["publish"].append((raw_p, md_p))
            results["consume"].append((raw_c, md_c))
            await r.delete(raw_key, f"{prefix}:{topic}")
    finally:
        keys = [k async for k in r.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await r.delete(*keys)
        await t.close()
        await r.aclose()
    print(
        f"Redis Streams, N={n}, {rounds} rounds (median), batch {BATCH}, no fsync (shared server)"
    )
    print(f"{'work':<40} {'raw msgs/s':>12} {'msdata msgs/s':>14} {'ratio':>7}")
    labels = {
        "publish": "confirmed publish, 100 per pipeline",
        "consume": "XREADGROUP COUNT 100 + XACK",
    }
    for name, pairs in results.items():
        raw = statistics.median(p[0] for p in pairs)
        md = statistics.median(p[1] for p in pairs)
        print(f"{labels[name]:<40} {raw:>12,.0f} {md:>14,.0f} {md / raw:>7.2f}")


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(main(int(args[0]) if args else 50_000, int(args[1]) if len(args) > 1 else 3))
