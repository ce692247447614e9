"""A consumer process for tests/test_transport_crash_loop.py: it takes the poison message and
dies by SIGKILL, as a handler that crashes its process would.

    python tests/crash_loop_worker.py BACKEND URL NAMESPACE TOPIC GROUP

It subscribes to TOPIC in GROUP (``max_attempts=3``) on a transport in NAMESPACE, prints
``ATTEMPT <n>`` for the first delivery it receives, and kills itself without settling it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from msdata.urls import transport_from_url

# the redelivery settings the parent's transport uses too (NATS fixes ack_wait per group)
OPTIONS = {
    "redis": {"claim_idle": 0.4},
    "nats": {"ack_wait": 1.0},
    "rabbitmq": {},
}


async def main(backend: str, url: str, namespace: str, topic: str, group: str) -> None:
    transport = transport_from_url(url, namespace=namespace, **OPTIONS[backend])
    async with transport.subscribe(topic, group, max_attempts=3) as sub:
        while True:
            for delivery in await sub.receive(1, timeout=1.0):
                print(f"ATTEMPT {delivery.attempt}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
