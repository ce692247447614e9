"""What the three services share: how a service is built from its URLs, and the faults the
load driver injects (duplicate deliveries)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from msdata.service import Service
from msdata.transport import Transport, TransportMessage
from msdata.urls import transport_from_url


@dataclass
class Faults:
    """Injected faults. ``duplicate_every``: every n-th published message (by its id) is
    published twice; ``slow_seconds``: how long Payment stalls a charge of card
    ``tok_slow`` before handling it; ``refunds``: False makes refunds do nothing (a
    deliberately broken system, for the checks to catch)."""

    duplicate_every: int = 0
    slow_seconds: float = 0.0
    refunds: bool = True


class DuplicatingTransport:
    """A transport that publishes some messages twice, as a broker with at-least-once
    delivery does after a lost acknowledgement. Everything else goes to ``inner``."""

    def __init__(self, inner: Transport, every: int) -> None:
        self.inner = inner
        self.every = every
        self.features = inner.features
        self.duplicated = 0

    async def publish(self, topic: str, messages: Sequence[TransportMessage]) -> None:
        await self.inner.publish(topic, messages)
        again = [m for m in messages if zlib.crc32(m.id.encode()) % self.every == 0]
        if again:
            self.duplicated += len(again)
            await self.inner.publish(topic, again)

    def subscribe(self, topic: str, group: str, **options: Any) -> Any:
        return self.inner.subscribe(topic, group, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def close(self) -> None:
        await self.inner.close()


#: who this process is, added to each service's ``/health`` answer: ``serve.py`` sets the
#: pid and the launcher's run token, and the launcher checks them (a service of another run
#: on the same port must not pass for its own); empty in the embedded default
IDENTITY: dict[str, Any] = {}


def open_broker(url: str, namespace: str | None = None) -> Transport:
    """The transport of ``url`` with ``namespace`` as its ``namespace`` option on every
    broker (Redis keys, NATS streams and subjects, RabbitMQ exchanges and queues), so one
    run's names stay apart from another's on a shared broker (``memory://`` shares
    nothing and takes no options)."""
    if namespace and not url.startswith("memory://"):
        return transport_from_url(url, namespace=namespace)
    return transport_from_url(url)


def broker_transport(
    broker: str | Transport, faults: Faults, namespace: str | None = None
) -> str | Transport:
    """The broker URL as is, or a transport that duplicates, when faults ask for it."""
    if isinstance(broker, str) and namespace:
        broker = open_broker(broker, namespace)
    if not faults.duplicate_every:
        return broker
    inner = transport_from_url(broker) if isinstance(broker, str) else broker
    return DuplicatingTransport(inner, faults.duplicate_every)


def make_service(
    name: str,
    db: str,
    broker: str | Transport,
    *,
    lease: float,
    middleware: tuple[Any, ...] = (),
    pool_size: int = 10,
) -> Service:
    """A service on its own database. PostgreSQL: its tables in schema ``<db schema>``
    given as ``?schema=`` in the URL (default: the service's name)."""
    schema = None
    if db.startswith(("postgresql", "postgres")):
        db, _, query = db.partition("?")
        schema = dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("schema", name)
    return Service(
        name,
        db=db,
        broker=broker,
        schema=schema,
        middleware=middleware,
        pool_size=pool_size,
        # the bus's default redeliveries: a saga reply that meets a killed orchestrator's
        # live lease is recorded on the instance and acked (docs/sagas.md, Recovery)
        bus_options={"concurrency": 16},
        relay_options={"lease_seconds": lease},
        # a saga whose orchestrator was killed is taken up within half a second of its
        # lease running out (a cheap query of expired leases)
        saga_options={"lease_seconds": lease, "recovery_interval": 0.5},
        stop_timeout=3.0,
    )
