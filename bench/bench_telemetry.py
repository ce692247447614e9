"""What tracing costs on the outbox relay and on the in-memory event bus, in the same run.

Telemetry set-ups, interleaved round by round (the order rotates each round):

- ``none``: nothing installed (msdata's no-op hooks: what every user without telemetry runs);
- ``api``: :class:`msdata.adapters.opentelemetry.OpenTelemetry` on the API's no-op tracer and
  meter providers (only ``opentelemetry-api`` installed, no SDK configured; the hook calls'
  cost is also timed on the API's global proxy providers, which an SDK could still replace);
- ``sdk``: the same on the SDK: a ``TracerProvider`` with a ``SimpleSpanProcessor`` into an
  ``InMemorySpanExporter`` (cleared between rounds) and a ``MeterProvider`` with an
  ``InMemoryMetricReader``; the default spans: one ``publish`` span per relay batch, linked
  to each row's ``create`` context (the messaging conventions' batch form); on the bus a
  ``publish`` span and a ``process`` span per message;
- ``drop``: ``sdk`` with an exporter that counts the spans and keeps none (what a real
  exporter's memory looks like once a batch is sent; the in-memory exporter keeps every
  span of the round, and the collector walking that growing heap is the exporter's cost,
  not msdata's);
- ``batch``: ``sdk`` with ``process_spans="batch"``: on the bus one ``process`` span per
  batch the consumer received, linked to each message (the relay is as in ``sdk``);
- ``s10``: ``sdk`` with the sampler ``ParentBased(TraceIdRatioBased(0.1))`` (10% of new
  traces recorded, children follow their parent), and 10% of the relay's rows created
  sampled (the rest carry flags ``00``, as their ``create`` span was not recorded);
- ``b10``: ``s10`` with ``process_spans="batch"`` (the cheapest set-up the conventions
  allow on the bus);
- ``full``: the SDK with a span wherever one can be had: ``relay_spans="message"`` (a
  ``publish`` span per relayed row) and ``handler_spans=True`` (a ``handle`` span under
  each ``process``; the defaults before this was measured).

Also timed directly on an SDK provider like the set-ups' (the exporter emptied after each
span, as a real exporter keeps nothing): one span started and ended, and one span link; the
floor a span per message puts under the bus and a link per row under the relay.

Paths: (a) the relay draining N rows from a SQLite outbox to the memory transport, each row
with a ``traceparent`` header (as every row has when tracing is on), counting the batches
that took the relay's fast path; (b) the event bus, ``publish()`` one at a time through the
memory transport to one handler. Targets: ``sdk``/``none`` < 1.15, ``api``/``none`` < 1.02.
The no-op hooks themselves (``none`` against a build without them) are measured directly:
the hook calls a message makes, timed in a loop, as a share of the bus's time per message.

Times are CPU time of this process (``time.process_time``). Prints the per-round ratios
(min - median - max) and /proc/loadavg at the start and the end.

Run: .venv/bin/python bench/bench_telemetry.py [--rows N] [--events N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from msdata import telemetry
from msdata.adapters.memory import MemoryTransport
from msdata.adapters.opentelemetry import OpenTelemetry
from msdata.adapters.opentelemetry.tracing import _span_context
from msdata.adapters.sqlite import SqliteOutboxStore, connect
from msdata.events import EventBus
from msdata.messages import Event, MessageRegistry, make_envelope, message_type
from msdata.outbox import Outbox, OutboxRelay
from msdata.transport import TransportMessage

registry = MessageRegistry()
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
NAMES = ["none", "api", "sdk", "drop", "batch", "s10", "b10", "full"]


class Dropping(SpanExporter):
    """Counts the spans it is given and keeps none."""

    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.count += len(spans)
        return SpanExportResult.SUCCESS


@message_type("bench.OrderPlaced", registry=registry)
class OrderPlaced(Event):
    order_id: str
    customer: str
    total_cents: int


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


class Setups:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.sdk = OpenTelemetry(
            tracer_provider=provider,
            meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]),
        )
        self.full = OpenTelemetry(
            tracer_provider=provider,
            meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]),
            relay_spans="message",
            handler_spans=True,
        )
        self.api = OpenTelemetry(
            tracer_provider=trace.NoOpTracerProvider(),
            meter_provider=metrics.NoOpMeterProvider(),
        )
        dropping = TracerProvider()
        dropping.add_span_processor(SimpleSpanProcessor(Dropping()))
        self.drop = OpenTelemetry(
            tracer_provider=dropping,
            meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]),
        )
        self.batch = OpenTelemetry(
            tracer_provider=provider,
            meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]),
            process_spans="batch",
        )
        sampled = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.1)))
        sampled.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.s10 = OpenTelemetry(
            tracer_provider=sampled,
            meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]),
        )
        self.b10 = OpenTelemetry(
            tracer_provider=sampled,
            meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]),
            process_spans="batch",
        )

    def install(self, name: str) -> None:
        self.exporter.clear()
        chosen = {
            "api": self.api,
            "sdk": self.sdk,
            "drop": self.drop,
            "batch": self.batch,
            "s10": self.s10,
            "b10": self.b10,
            "full": self.full,
        }
        telemetry.install(chosen.get(name))


async def relay_round(
    db: str, store: SqliteOutboxStore, rows: int, sampled: int = 1
) -> tuple[float, int, int]:
    """Fill the outbox (not timed), drain it (timed). Every row has a ``traceparent`` of
    its own; one row in ``sampled`` has the sampled flag. Returns (seconds per row,
    batches, batches that missed the fast path)."""
    outbox = Outbox(store, registry=registry, source="bench")
    previous = telemetry.install(None)  # the rows are made alike in every set-up
    try:
        with connect(db) as conn:
            for i in range(rows):
                flags = "01" if i % sampled == 0 else "00"
                outbox.add(
                    conn,
                    OrderPlaced(order_id=f"o-{i}", customer="c", total_cents=100),
                    key=None,
                    headers={"traceparent": f"{TRACEPARENT[:36]}{i + 1:016x}-{flags}"},
                )
    finally:
        telemetry.install(previous)
    relay = OutboxRelay(store, MemoryTransport(), batch_size=100, relay_id="bench")
    batches = missed = 0

    def counting(fast: Any) -> Any:
        # the relay's fast path: ``_checked`` for a batch the store made (SQLite's
        # claim_messages), ``_fast_batch`` for records
        def count(claimed: Any) -> list[TransportMessage] | None:
            nonlocal batches, missed
            batches += 1
            out = fast(claimed)
            missed += out is None
            return out  # type: ignore[no-any-return]

        return count

    relay._fast_batch = counting(relay._fast_batch)  # type: ignore[method-assign]
    relay._checked = counting(relay._checked)  # type: ignore[method-assign]
    started = time.process_time()
    done = 0
    while n := await relay.run_once():
        done += n
    elapsed = time.process_time() - started
    assert done == rows, (done, rows)
    return elapsed / rows, batches, missed


async def bus_round(n: int) -> float:
    transport = MemoryTransport()
    bus = EventBus(transport, registry=registry, prefetch=500)
    done = asyncio.Event()
    count = 0

    @bus.handler(OrderPlaced, group="bench")
    async def handler(msg: OrderPlaced) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    events = [OrderPlaced(order_id=f"o-{i}", customer="c", total_cents=100) for i in range(n)]
    async with bus:
        started = time.process_time()
        for i, e in enumerate(events):
            await bus.publish(e)
            if i % 100 == 99:
                await asyncio.sleep(0)
        await done.wait()
        elapsed = time.process_time() - started
    await transport.close()
    return elapsed / n


def hook_cost(hooks: telemetry.Telemetry | None, n: int = 200_000) -> float:
    """Seconds per message of the hook calls one bus message makes (created, consume,
    close) with ``hooks`` installed, minus the same loop without them."""
    telemetry.install(hooks)
    env = make_envelope(OrderPlaced(order_id="1", customer="c", total_cents=1), registry=registry)
    delivery: Any = None

    def handler() -> None:
        return None

    def with_hooks() -> None:
        for _ in range(n):
            e = telemetry.hooks.message_created("t", env, outbox=False)
            seen = telemetry.hooks.consume("t", "g", delivery, e, handler)
            seen.close()

    def without() -> None:
        for _ in range(n):
            e = env
            seen = e
            _ = seen

    def timed(fn: Callable[[], None]) -> float:
        t = time.process_time()
        fn()
        return time.process_time() - t

    costs = [timed(with_hooks) - timed(without) for _ in range(5)]
    telemetry.install(None)
    return max(0.0, statistics.median(costs)) / n


def span_costs(n: int = 20_000) -> tuple[float, float, float]:
    """CPU seconds of one SDK span (started and ended, five attributes, into an in-memory
    exporter, as the set-ups' provider) and of one more link on a span (a span with 100
    links, minus a span), and of msdata making one link from a row's ``traceparent``."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("bench")
    attrs = {
        "messaging.system": "memory",
        "messaging.destination.name": "t",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.message.id": "0192f0c4-0000-7000-8000-000000000000",
    }
    contexts = [
        trace.SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0xF067AA0BA90200 + i, True)
        for i in range(100)
    ]

    def per_span(count: int, links: int) -> float:
        started = time.process_time()
        for _ in range(count):
            span = tracer.start_span(
                "publish t",
                None,
                trace.SpanKind.PRODUCER,
                attrs,
                [trace.Link(c) for c in contexts[:links]] if links else None,
            )
            span.end()
            exporter.clear()
        elapsed = time.process_time() - started
        return elapsed / count

    spans = [per_span(n, 0) for _ in range(5)]
    linked = [per_span(n // 20, 100) for _ in range(5)]
    span = statistics.median(spans)
    parents = [f"00-{c.trace_id:032x}-{c.span_id:016x}-01" for c in contexts]

    def per_row() -> float:
        started = time.process_time()
        for _ in range(n // 100):
            [trace.Link(c) for c in map(_span_context, parents) if c is not None]
        return (time.process_time() - started) / (n // 100 * 100)

    making = statistics.median(per_row() for _ in range(5))
    return span, max(0.0, statistics.median(linked) - span) / 100, making


def record_cost(n: int = 20_000) -> float:
    """CPU seconds of one ``Histogram.record`` on the SDK with the three attributes of
    ``messaging.process.duration`` (the conventions: MUST be reported per process
    operation)."""
    meter = MeterProvider(metric_readers=[InMemoryMetricReader()]).get_meter("bench")
    histogram = meter.create_histogram("messaging.process.duration", unit="s")
    attrs = {
        "messaging.system": "memory",
        "messaging.destination.name": "t",
        "messaging.consumer.group.name": "g",
    }

    def once() -> float:
        started = time.process_time()
        for _ in range(n):
            histogram.record(0.001, attrs)
        return (time.process_time() - started) / n

    return statistics.median(once() for _ in range(5))


def relay_hook_cost(hooks: telemetry.Telemetry | None, n: int = 300) -> float:
    """CPU seconds per row of the relay's telemetry hook (``publishing``, entered and
    left) on batches of 100 rows, each with a sampled ``traceparent`` of its own, minus the
    no-op hook's: what tracing adds to each relayed row, without the drain's noise."""
    messages = [
        TransportMessage(str(i), b"{}", None, {"traceparent": f"{TRACEPARENT[:36]}{i + 1:016x}-01"})
        for i in range(100)
    ]
    publisher = MemoryTransport()

    def timed(h: telemetry.Telemetry) -> float:
        started = time.process_time()
        for _ in range(n):
            with h.publishing("t", messages, publisher):
                pass
        return (time.process_time() - started) / (n * 100)

    noop = telemetry.Telemetry()
    costs = [timed(hooks or noop) - timed(noop) for _ in range(5)]
    return max(0.0, statistics.median(costs))


def unsampled_cost(n: int = 20_000) -> float:
    """CPU seconds of one span the sampler drops (``ParentBased`` under a parent that was
    not sampled): what each message still costs under sampling."""
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.1)))
    tracer = provider.get_tracer("bench")
    parent = trace.set_span_in_context(
        trace.NonRecordingSpan(trace.SpanContext(0x4BF9, 0xF067, True, trace.TraceFlags(0)))
    )
    attrs = {"messaging.system": "memory", "messaging.destination.name": "t"}

    def once() -> float:
        started = time.process_time()
        for _ in range(n):
            tracer.start_span("process t", parent, trace.SpanKind.CONSUMER, attrs).end()
        return (time.process_time() - started) / n

    return statistics.median(once() for _ in range(5))


def spread(xs: list[float]) -> str:
    return f"{min(xs):.3f} - {statistics.median(xs):.3f} - {max(xs):.3f}"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", choices=["relay", "bus"], help="one path (default both)")
    parser.add_argument(
        "--setups", default=",".join(NAMES), help=f"comma-separated, of {','.join(NAMES)}"
    )
    args = parser.parse_args()
    print(f"loadavg at start: {loadavg()}")
    setups = Setups()
    names = ["none", *(n for n in args.setups.split(",") if n != "none")]
    unknown = set(names) - set(NAMES)
    if unknown:
        raise SystemExit(f"unknown set-ups: {sorted(unknown)}")
    paths = [args.only] if args.only else ["relay", "bus"]
    relay_t: dict[str, list[float]] = {k: [] for k in names}
    bus_t: dict[str, list[float]] = {k: [] for k in names}
    missed_total = batches_total = 0
    db = str(Path(tempfile.mkdtemp()) / "bench.db")
    store = SqliteOutboxStore(db)
    await store.create_schema()
    try:
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                setups.install(name)
                if "relay" in paths:
                    sampled = 10 if name in ("s10", "b10") else 1
                    per_row, batches, missed = await relay_round(db, store, args.rows, sampled)
                    relay_t[name].append(per_row)
                    batches_total += batches
                    missed_total += missed
                if "bus" in paths:
                    setups.install(name)
                    bus_t[name].append(await bus_round(args.events))
                telemetry.install(None)
    finally:
        telemetry.install(None)
        await store.close()
    span, link, making = span_costs()
    record = record_cost()
    unsampled = unsampled_cost()
    hook = hook_cost(None)
    api_hook = hook_cost(setups.api)
    proxy_hook = hook_cost(OpenTelemetry())  # the global providers, no SDK ever set
    us = 1e6
    print(
        f"relay: {args.rows} rows per round on SQLite -> memory transport, batch 100, "
        f"every row with a traceparent; bus: {args.events} events, publish() one at a time; "
        f"{args.rounds} rounds"
    )
    print(
        f"{'path':<7}{'setup':<7}{'us/msg (median)':>16}   "
        "ratio to none per round: min - median - max"
    )
    for label, table in (("relay", relay_t), ("bus", bus_t)):
        if label not in paths:
            continue
        base = table["none"]
        for name in names:
            ratios = [a / b for a, b in zip(table[name], base, strict=True)]
            print(
                f"{label:<7}{name:<7}{statistics.median(table[name]) * us:>16.2f}   "
                f"{spread(ratios)}"
            )
    print(f"relay batches on the fast path: {batches_total - missed_total} of {batches_total}")
    print(
        f"SDK, timed directly: a span {span * us:.2f} us, an unsampled span "
        f"{unsampled * us:.2f} us, a link {link * us:.3f} us, a histogram record "
        f"{record * us:.2f} us"
    )
    if "relay" in paths:
        relay_none = statistics.median(relay_t["none"])
        print(
            f"relay: {relay_none * us:.2f} us/row x 15% = {relay_none * 0.15 * us:.2f} us; "
            f"batch form per row: 1/100 span + 1 link + making the link from the row's "
            f"traceparent ({making * us:.2f} us) = {(span / 100 + link + making) * us:.2f} us"
        )
        drop_row = relay_hook_cost(setups.drop)
        print(
            f"relay hook per row, timed directly (drop: SDK, exporter keeps nothing): "
            f"{drop_row * us:.2f} us = {drop_row / relay_none:.1%} of the relay's "
            f"{relay_none * us:.2f} us/row"
        )
    if "bus" in paths:
        bus_summary(
            statistics.median(bus_t["none"]),
            bus_t,
            span,
            unsampled,
            record,
            hook,
            api_hook,
            proxy_hook,
        )
    print(f"loadavg at end: {loadavg()}")


def bus_summary(
    bus_none: float,
    bus_t: dict[str, list[float]],
    span: float,
    unsampled: float,
    record: float,
    hook: float,
    api_hook: float,
    proxy_hook: float,
) -> None:
    us = 1e6
    print(
        f"no-op hook calls per bus message: {hook * 1e9:.0f} ns = "
        f"{hook / bus_none * 100:.2f}% of the bus's {bus_none * us:.2f} us/msg"
    )
    print(
        f"API-only hook calls per bus message: {api_hook * 1e9:.0f} ns = "
        f"{api_hook / bus_none * 100:.2f}% of the bus's {bus_none * us:.2f} us/msg"
    )
    print(
        f"API-only hook calls, global (proxy) providers: {proxy_hook * 1e9:.0f} ns = "
        f"{proxy_hook / bus_none * 100:.2f}% of the bus's time per message"
    )
    print(
        f"bus: {bus_none * us:.2f} us/msg x 15% = {bus_none * 0.15 * us:.2f} us "
        f"= {bus_none * 0.15 / span:.2f} spans' worth, {bus_none * 0.15 / unsampled:.2f} "
        f"unsampled spans' worth (a publish span per publish() call and a process span "
        f"per message: 2 per message, 3 in full)"
    )
    floor = 2 * span + record
    print(
        f"bus floor of a span per message (publish + process spans + the duration record): "
        f"{floor * us:.2f} us = {floor / bus_none:.2f}x the bus's time per message"
        + (
            f"; measured excess (drop) {(statistics.median(bus_t['drop']) - bus_none) * us:.2f} us"
            if bus_t.get("drop")
            else ""
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
