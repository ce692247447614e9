"""The outbox relay conformance suite: :class:`msdata.outbox.OutboxRelay` over every
outbox store, publishing to a :class:`RecordingPublisher` (the in-memory transport,
recording what was published).

Subclass :class:`OutboxRelayConformance` with the same hooks as
:class:`msdata.testing.conformance.outbox.OutboxStoreConformance` (see that module: one
hooks class per backend serves both suites). Needs pytest and pytest-asyncio.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from typing import Any, ClassVar

import pytest

from msdata.adapters.memory.transport import MemoryTransport
from msdata.errors import ConfigurationError, PublishError, SchemaError
from msdata.outbox.relay import OutboxRelay
from msdata.outbox.store import OutboxRow
from msdata.testing.conformance.outbox import (
    OutboxStoreHooks,
    RawText,
    SqlLiteral,
    _hook,
    leave,
    make_row,
    make_rows,
    raw_columns,
)
from msdata.testing.waiting import eventually
from msdata.transport import TransportMessage

__all__ = ["OutboxRelayConformance", "RecordingPublisher"]


class RecordingPublisher(MemoryTransport):
    """The in-memory transport, recording every accepted message in publish order.

    ``fail_next``: how many coming ``publish`` calls raise :class:`PublishError` refusing
    every message of the batch (their own fault: counted against their rows).
    ``refuse``: message ids refused on their own, every time, before sending, as
    :func:`msdata.transport.screen` refuses: the later messages of a refused message's key
    in the batch are held back (refused too, unsent), every other message is published.
    ``refuse_after_sending``: refuse them as a broker does after the batch went out (the
    later messages of their keys are published; nothing is held back).
    ``down``: while True, every call fails as a whole (the broker unreachable).
    ``error``: when set, every call raises it (a misconfigured transport, a bug).
    ``gate``: when set to an unset :class:`asyncio.Event`, ``publish`` waits for it
    (``entered`` is set when a publish is waiting), to hold a relay mid-batch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.published: list[tuple[str, TransportMessage]] = []
        self.calls = 0
        self.fail_next = 0
        self.refuse: set[str] = set()
        self.refuse_after_sending = False
        self.down = False
        self.error: BaseException | None = None
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def publish(self, topic: str, messages: Sequence[TransportMessage]) -> None:
        self.calls += 1
        await asyncio.sleep(0.001)  # a broker round trip: other tasks run meanwhile
        if self.gate is not None:
            self.entered.set()
            await self.gate.wait()
        if self.down:
            raise PublishError(f"publish to {topic!r} failed: ConnectionRefusedError (injected)")
        if self.error is not None:
            raise self.error
        if self.fail_next > 0:
            self.fail_next -= 1
            raise PublishError(
                f"injected failure publishing {len(messages)} to {topic}",
                refused={m.id: "injected refusal" for m in messages},
            )
        if self.refuse:
            refused: dict[str, str] = {}
            held: dict[str, str] = {}
            ok: list[TransportMessage] = []
            for m in messages:
                if m.key is not None and m.key in held and not self.refuse_after_sending:
                    refused[m.id] = f"HeldBack: the earlier message {held[m.key]} was refused"
                elif m.id in self.refuse:
                    refused[m.id] = "message too large (injected)"
                    if m.key is not None:
                        held.setdefault(m.key, m.id)
                else:
                    ok.append(m)
            if refused:
                if ok:
                    await super().publish(topic, ok)
                    self.published.extend((topic, m) for m in ok)
                raise PublishError(f"{len(refused)} messages refused", refused=refused)
        try:
            await super().publish(topic, messages)
        except PublishError as e:
            if e.refused:  # the in-memory transport confirmed the others
                self.published.extend((topic, m) for m in messages if m.id not in e.refused)
            raise
        self.published.extend((topic, m) for m in messages)

    @property
    def ids(self) -> list[str]:
        return [m.id for _, m in self.published]


def _first_order(published: Sequence[tuple[str, TransportMessage]]) -> dict[str | None, list[str]]:
    """Per key, message ids in order of first publication."""
    seen: set[str] = set()
    out: dict[str | None, list[str]] = {}
    for _, m in published:
        if m.id not in seen:
            seen.add(m.id)
            out.setdefault(m.key, []).append(m.id)
    return out


class _Logging(RecordingPublisher):
    """A recording publisher that also appends what it published to a log shared with
    other publishers (the order across relays), after an optional ``delay`` per batch."""

    def __init__(self, log: list[tuple[str, TransportMessage]], delay: float = 0.0) -> None:
        super().__init__()
        self.log, self.delay = log, delay

    async def publish(self, topic: str, messages: Sequence[TransportMessage]) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        await super().publish(topic, messages)
        self.log.extend((topic, m) for m in messages)


class OutboxRelayConformance(OutboxStoreHooks):
    """Every test here must pass for a relay over every outbox store."""

    #: examples of :meth:`test_arbitrary_rows_never_stop_the_relay` (each a few rows)
    arbitrary_row_examples: ClassVar[int] = 40

    def relay(self, store: Any, publisher: Any, **options: Any) -> OutboxRelay:
        options.setdefault("relay_id", self.relay_id())
        options.setdefault("poll_interval", 0.05)
        options.setdefault("lease_seconds", 30.0)
        return OutboxRelay(store, publisher, **options)

    async def drain(self, relay: OutboxRelay, rounds: int = 100) -> int:
        total = 0
        for _ in range(rounds):
            n = await relay.run_once()
            if n == 0:
                break
            total += n
        return total

    async def test_relay_publishes_committed_messages_only(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            kept = make_rows(5, keys=["a", "b"])
            gone = make_rows(5, keys=["a", "b"])
            tx = await self.begin(store)
            await self.add(store, tx, gone)
            await self.rollback(tx)
            await self.add_committed(store, kept)
            relay = self.relay(store, pub)
            assert await self.drain(relay) == 5
            assert sorted(pub.ids) == sorted(r.message_id for r in kept)
            for topic, m in pub.published:
                want = next(r for r in kept if r.message_id == m.id)
                assert (
                    topic == want.topic and m.body == want.payload and m.key == want.partition_key
                )
            assert (await relay.status()).pending == 0

    async def test_relay_publishes_out_of_order_commits(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            relay = self.relay(store, pub)
            first, second, t1 = await self.commit_out_of_order(store)
            assert await relay.run_once() == 1
            await self.commit(t1)
            assert await relay.run_once() == 1
            assert pub.ids == [second.message_id, first.message_id]

    async def test_relay_publishes_one_batch_per_topic(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            rows = make_rows(6, keys=["a", "b"], topic="t1") + make_rows(4, topic="t2")
            await self.add_committed(store, rows)
            relay = self.relay(store, pub)
            assert await relay.run_once() == 10
            assert pub.calls == 2

    @pytest.mark.parametrize("relays", [2, 4])
    async def test_several_relays_publish_everything_once_in_key_order(self, relays: int) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            keys = [f"key-{i}" for i in range(7)] + [None]
            committed: list[OutboxRow] = []

            async def writer() -> None:
                for i in range(12):
                    rows = make_rows(20, keys=keys[i % 3 :])
                    tx = await self.begin(store)
                    await self.add(store, tx, rows)
                    if i % 4 == 3:
                        await self.rollback(tx)
                    else:
                        await self.commit(tx)
                        committed.extend(rows)
                    await asyncio.sleep(0.005)

            async with _open_many(self, store, relays) as stores:
                workers = [self.relay(s, pub, batch_size=15, poll_interval=0.02) for s in stores]
                for w in workers:
                    await w.start()
                try:
                    await writer()
                    await eventually(
                        lambda: len(pub.published) >= len(committed),
                        30.0,
                        what="every committed message published",
                    )
                    await asyncio.sleep(0.1)  # time for a duplicate to show, if any
                finally:
                    for w in workers:
                        await w.stop()
            ids = pub.ids
            assert len(ids) == len(set(ids)), "a message was published twice"
            assert sorted(ids) == sorted(r.message_id for r in committed)
            order = _first_order(pub.published)
            for key in keys:
                if key is not None:
                    want = [r.message_id for r in committed if r.partition_key == key]
                    assert order.get(key, []) == want, f"order of {key} broken"

    async def test_relays_coming_and_going_publish_everything_once_in_key_order(self) -> None:
        """A rebalance while publishing: relay B joins a running relay A, then A stops
        cleanly while rows keep coming; nothing is published twice, nothing is skipped,
        and every key keeps its order."""
        async with self.make_store() as store:
            log: list[tuple[str, TransportMessage]] = []
            pub_a, pub_b = _Logging(log), _Logging(log)
            keys = [f"key-{i}" for i in range(7)] + [None]
            committed: list[OutboxRow] = []
            async with _open_many(self, store, 2) as (store_a, store_b):
                a = self.relay(store_a, pub_a, batch_size=7, poll_interval=0.02)
                b = self.relay(store_b, pub_b, batch_size=7, poll_interval=0.02)
                await a.start()
                try:
                    for i in range(12):
                        if i == 4:
                            await b.start()
                        if i == 8:
                            await a.stop()
                        rows = make_rows(15, keys=keys[i % 3 :])
                        await self.add_committed(store, rows)
                        committed.extend(rows)
                        await asyncio.sleep(0.02)
                    await eventually(
                        lambda: len(log) >= len(committed),
                        30.0,
                        what="every committed message published",
                    )
                    await asyncio.sleep(0.1)  # time for a duplicate to show, if any
                finally:
                    await a.stop()
                    await b.stop()
            ids = [m.id for _, m in log]
            assert len(ids) == len(set(ids)), "a message was published twice"
            assert sorted(ids) == sorted(r.message_id for r in committed)
            assert pub_b.published, "the relay that stayed published nothing"
            order = _first_order(log)
            for key in keys:
                want = [r.message_id for r in committed if r.partition_key == key]
                if key is not None:
                    assert order.get(key, []) == want, f"order of {key} broken"

    async def test_a_relay_joining_a_busy_one_gets_work_while_it_runs(self) -> None:
        """Scale-out: a second relay started beside a busy one publishes some of the
        backlog within a bounded time, without either stopping (stores that let one
        relay at a time claim are exempt)."""
        async with self.make_store() as store:
            if store.features.one_relay_at_a_time:
                pytest.skip("one relay at a time by design")
            log: list[tuple[str, TransportMessage]] = []
            pub_a, pub_b = _Logging(log, delay=0.01), _Logging(log, delay=0.01)
            rows = make_rows(400, keys=[f"key-{i}" for i in range(40)])
            await self.add_committed(store, rows)
            async with _open_many(self, store, 2) as (store_a, store_b):
                a = self.relay(store_a, pub_a, batch_size=5, poll_interval=0.02)
                b = self.relay(store_b, pub_b, batch_size=5, poll_interval=0.02)
                await a.start()
                try:
                    await eventually(lambda: bool(pub_a.published), 10.0, what="relay A busy")
                    await b.start()
                    await eventually(lambda: bool(pub_b.published), 10.0, what="relay B publishing")
                    assert a.running and len(log) < len(rows), "A finished alone first"
                    await eventually(lambda: len(log) >= len(rows), 30.0, what="all published")
                finally:
                    await a.stop()
                    await b.stop()
            ids = [m.id for _, m in log]
            assert len(ids) == len(set(ids)) == len(rows)
            order = _first_order(log)
            for key, got in order.items():
                assert got == [r.message_id for r in rows if r.partition_key == key]

    async def test_relay_parks_a_bad_payload_and_goes_on(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            good1 = make_row(key="k1", n=1)
            bad = make_row(key="k1", n=2, payload=b"\x00garbage, not a CloudEvent")
            after_bad = make_row(key="k1", n=3)
            other = make_row(key="k2", n=4)
            await self.add_committed(store, [good1, bad, after_bad, other])
            relay = self.relay(store, pub)
            await self.drain(relay)
            assert pub.ids == [good1.message_id, other.message_id]
            parked = await relay.parked()
            assert [p.message_id for p in parked] == [bad.message_id]
            assert parked[0].last_error and "payload" in parked[0].last_error
            st = await relay.status()
            assert st.parked == 1 and st.pending == 1

    async def test_an_unreadable_row_is_parked_alone_and_the_rest_published(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Rows another writer left that the store cannot read (:data:`MALFORMED_ROWS`)
        ahead of good ones: a running relay parks each alone with a reason naming the
        column, publishes every other key's rows in order, and never fails a step."""
        async with self.make_store() as store:
            pub = RecordingPublisher()
            bad = await self.write_malformed_rows(store, lambda i: f"bad-{i}")
            # behind some bad rows, a good row of their key that must wait; other keys not
            behind = [make_row(key=key, n=100 + i) for i, (_, _, key) in enumerate(bad[:3])]
            others = make_rows(9, keys=["good-a", "good-b", None])
            await self.add_committed(store, behind + others)
            relay = self.relay(store, pub, batch_size=4)
            with caplog.at_level(logging.ERROR, logger="msdata"):
                async with relay:
                    await eventually(
                        lambda: len(pub.published) >= len(others), 20.0, what="others published"
                    )
                    await asyncio.sleep(0.1)  # time for a wrong one to show, if any
            assert sorted(pub.ids) == sorted(r.message_id for r in others)
            order = _first_order(pub.published)
            for key in ("good-a", "good-b"):
                assert order[key] == [r.message_id for r in others if r.partition_key == key]
            parked = await relay.parked(1000)
            assert [p.seq for p in parked] == [seq for seq, _, _ in bad]
            for p, (_, column, _) in zip(parked, bad, strict=True):
                assert p.last_error and "unreadable" in p.last_error and column in p.last_error
            st = await relay.status()
            assert (st.parked, st.pending) == (len(bad), len(behind))
            failed = [r for r in caplog.records if r.exc_info is not None]
            assert not failed, f"a relay step failed: {failed[0].getMessage()}"

    async def test_arbitrary_rows_never_stop_the_relay(self) -> None:
        """Hypothesis writes rows with arbitrary column values (wrong types, sizes,
        encodings, times) as another writer would, each with a good row of its key behind
        it and good rows of other keys after them; after the relay settles, every row is
        published, parked with a reason, or waits behind a parked row of its own key; no
        good row is parked, and every good row not behind a parked one is published.
        Needs hypothesis (skipped without it); ``arbitrary_row_examples`` examples."""
        pytest.importorskip("hypothesis")
        if type(self).write_raw_row is OutboxStoreHooks.write_raw_row:
            pytest.skip("this store holds no row its write side did not make")
        async with self.make_store() as store:
            pub = RecordingPublisher()
            relay = self.relay(store, pub, max_attempts=2, backoff=lambda n: 0.0)
            feed = _ArbitraryRows(self, store, relay, pub)
            await feed.run(self.arbitrary_row_examples)

    async def test_relay_retries_a_failed_publish_then_parks_it(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            row = make_row(key="k", n=1)
            await self.add_committed(store, [row])
            relay = self.relay(store, pub, max_attempts=3, backoff=lambda n: 0.0)
            pub.fail_next = 1
            assert await relay.run_once() == 0
            assert await relay.run_once() == 1
            assert pub.ids == [row.message_id]

            row2 = make_row(key="k", n=2)
            later = make_row(key="k", n=3)
            other = make_row(key="k-other", n=4)
            await self.add_committed(store, [row2])
            pub.fail_next = 100
            for _ in range(3):
                assert await relay.run_once() == 0
            await self.add_committed(store, [later, other])
            parked = await relay.parked()
            assert [p.message_id for p in parked] == [row2.message_id]
            assert parked[0].last_error and "PublishError" in parked[0].last_error
            pub.fail_next = 0
            # `later` waits behind its parked key; `other` goes
            assert await self.drain(relay) == 1
            assert pub.ids[-1] == other.message_id
            assert await relay.requeue() == 1
            assert await self.drain(relay) == 2
            pub.published = [p for p in pub.published if p[1].id != other.message_id]
            assert pub.ids == [row.message_id, row2.message_id, later.message_id]

    async def test_failed_publish_waits_out_its_backoff(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            await self.add_committed(store, [make_row(key="k")])
            relay = self.relay(store, pub, backoff=lambda n: 60.0)
            pub.fail_next = 1
            assert await relay.run_once() == 0
            assert await relay.run_once() == 0
            assert pub.calls == 1

    async def test_running_relay_keeps_key_order_through_a_failed_publish(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            rows = make_rows(8, keys=["k"])
            await self.add_committed(store, rows)
            pub.fail_next = 1  # the first batch fails after the next may have been claimed
            relay = self.relay(store, pub, batch_size=2, backoff=lambda n: 0.05)
            async with relay:
                await eventually(lambda: len(set(pub.ids)) == 8, 20.0, what="all 8 published")
            assert _first_order(pub.published)["k"] == [r.message_id for r in rows]
            assert (await store.status()).pending == 0

    async def test_graceful_stop_releases_the_claimed_batch(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            pub.gate = asyncio.Event()
            rows = make_rows(3, keys=["k"])
            await self.add_committed(store, rows)
            relay = self.relay(store, pub, lease_seconds=300.0)
            await relay.start()
            await asyncio.wait_for(pub.entered.wait(), 10.0)
            await relay.stop(timeout=0.1)
            assert not relay.running
            # released, not left leased for 300 s
            got = await store.claim("relay-next", 100, 30.0)
            assert [r.message_id for r in got] == [r.message_id for r in rows]

    async def test_cancelling_the_relay_releases_its_rows_and_reraises(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            pub.gate = asyncio.Event()
            await self.add_committed(store, make_rows(2, keys=["k"]))
            relay = self.relay(store, pub, lease_seconds=300.0)
            task = asyncio.create_task(relay.run_once())
            await asyncio.wait_for(pub.entered.wait(), 10.0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await leave(store, relay.relay_id)
            assert len(await store.claim("relay-next", 100, 30.0)) == 2

    async def test_stop_finishes_the_batch_in_hand(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            pub.gate = asyncio.Event()
            rows = make_rows(3, keys=["k"])
            await self.add_committed(store, rows)
            relay = self.relay(store, pub)
            await relay.start()
            await asyncio.wait_for(pub.entered.wait(), 10.0)
            stopping = asyncio.create_task(relay.stop(timeout=10.0))
            await asyncio.sleep(0.05)
            pub.gate.set()
            await stopping
            assert pub.ids == [r.message_id for r in rows]
            assert (await store.status()).pending == 0

    async def test_running_relay_publishes_what_is_committed_later(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            async with self.relay(store, pub, poll_interval=0.05):
                await asyncio.sleep(0.1)  # the relay is idle, waiting for rows
                rows = make_rows(5, keys=["a"])
                await self.add_committed(store, rows)
                await eventually(lambda: len(pub.published) == 5, 10.0, what="5 published")
            assert pub.ids == [r.message_id for r in rows]

    async def test_relay_keeps_sent_rows_for_retention_then_purges(self) -> None:
        async with self.timed_store() as (store, time):
            pub = RecordingPublisher()
            await self.add_committed(store, make_rows(3))
            relay = self.relay(store, pub, retention=timedelta(seconds=0.3), **time.relay_clock())
            assert await relay.run_once() == 3
            assert (await relay.status()).pending == 0
            assert await relay.purge() == 0
            if time.fake:  # kept until the retention has passed, exactly
                await time.pass_(0.29)
                assert await relay.purge() == 0
            await time.pass_(0.5)
            assert await relay.purge() == 3
            assert await store.claim("relay-x", 100, 30.0) == []

    async def test_relay_after_a_crash_publishes_again(self) -> None:
        async with self.timed_store() as (store, time):
            pub = RecordingPublisher()
            rows = make_rows(3, keys=["k"])
            await self.add_committed(store, rows)
            # a relay that published and died before marking: its lease runs out
            dead = await store.claim("relay-dead", 100, self.lease_seconds)
            await pub.publish(
                "orders", [TransportMessage(r.message_id, r.payload, r.partition_key) for r in dead]
            )
            relay = self.relay(store, pub, **time.relay_clock())
            assert await relay.run_once() == 0
            await time.pass_(self.lease_seconds + 0.2)
            assert await relay.run_once() == 3
            assert pub.ids == [r.message_id for r in rows] * 2

    async def test_a_transport_outage_parks_nothing_and_counts_no_attempts(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            rows = make_rows(6, keys=["a", "b", None])
            await self.add_committed(store, rows)
            relay = self.relay(store, pub, max_attempts=2, backoff=lambda n: 0.0)
            pub.down = True
            for _ in range(3 * relay.max_attempts):  # far past max_attempts
                assert await relay.run_once() == 0
            st = await relay.status()
            assert st.parked == 0 and st.pending == 6
            pub.down = False
            assert await self.drain(relay) == 6
            assert sorted(pub.ids) == sorted(r.message_id for r in rows)
            assert _first_order(pub.published)["a"] == [
                r.message_id for r in rows if r.partition_key == "a"
            ]

    async def test_running_relay_rides_out_an_outage_with_one_warning(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            rows = make_rows(4, keys=["k"])
            await self.add_committed(store, rows)
            pub.down = True
            calls = pub.calls
            relay = self.relay(store, pub, max_attempts=2, backoff=lambda n: 0.001)
            with caplog.at_level(logging.INFO, logger="msdata.outbox"):
                async with relay:
                    await eventually(lambda: pub.calls >= calls + 10, 20.0, what="10 failures")
                    assert (await relay.status()).parked == 0
                    pub.down = False
                    await eventually(lambda: len(set(pub.ids)) == 4, 20.0, what="all published")
            assert pub.ids == [r.message_id for r in rows]
            mine = [r for r in caplog.records if r.name == "msdata.outbox"]
            warnings = [r for r in mine if r.levelno == logging.WARNING]
            assert len(warnings) == 1 and "transport" in warnings[0].getMessage()
            assert not [r for r in mine if r.levelno >= logging.ERROR]
            assert any("recovered" in r.getMessage() for r in mine if r.levelno == logging.INFO)

    async def test_a_configuration_error_at_publish_parks_its_rows_with_the_reason(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A publish failing with ConfigurationError (about its topic: options a transport
        does not take are refused when it is built) counts against the rows, which are
        parked after ``max_attempts`` with the error as their reason, and logged at ERROR;
        taken as the whole transport's failure it would hold every row back for ever."""
        async with self.make_store() as store:
            pub = RecordingPublisher()
            rows = make_rows(2)
            await self.add_committed(store, rows)
            relay = self.relay(store, pub, max_attempts=2, backoff=lambda n: 0.0)
            pub.error = ConfigurationError("stream has 4 key partitions, not 8 (injected)")
            with caplog.at_level(logging.INFO, logger="msdata.outbox"):
                for _ in range(3 * relay.max_attempts):
                    assert await relay.run_once() == 0
            parked = await relay.parked()
            assert sorted(p.message_id for p in parked) == sorted(r.message_id for r in rows)
            assert all(p.last_error and "key partitions" in p.last_error for p in parked)
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert errors and "parked" in errors[-1].getMessage()

    async def test_a_publish_failing_with_a_bug_is_logged_with_its_traceback(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An exception that is not msdata's (a TypeError from a driver) counts an attempt
        like a refused message, and its log line carries the traceback (the reason alone
        did not say where it came from)."""
        async with self.make_store() as store:
            pub = RecordingPublisher()
            await self.add_committed(store, make_rows(1))
            relay = self.relay(store, pub, max_attempts=2, backoff=lambda n: 0.0)
            pub.error = TypeError("__init__() got an unexpected keyword argument (injected)")
            with caplog.at_level(logging.INFO, logger="msdata.outbox"):
                for _ in range(2):
                    assert await relay.run_once() == 0
            failed = [r for r in caplog.records if "TypeError" in r.getMessage()]
            assert failed and all(r.exc_info for r in failed), [r.getMessage() for r in failed]
            assert (await relay.status()).parked == 1

    async def test_a_refused_message_alone_is_counted_and_parked(self) -> None:
        async with self.make_store() as store:
            pub = RecordingPublisher()
            bad = make_row(key="k", n=1)
            after_bad = make_row(key="k", n=2)
            others = [make_row(key="j", n=3), make_row(n=4)]
            await self.add_committed(store, [bad, after_bad, *others])
            pub.refuse = {bad.message_id}
            relay = self.relay(store, pub, max_attempts=2, backoff=lambda n: 0.0)
            for _ in range(6):
                await relay.run_once()
            parked = await relay.parked()
            assert [p.message_id for p in parked] == [bad.message_id]
            assert parked[0].last_error and "too large" in parked[0].last_error
            assert sorted(pub.ids) == sorted(r.message_id for r in others)
            assert (await relay.status()).pending == 1  # after_bad waits behind its key

    async def test_the_rest_of_a_batch_with_a_refused_message_is_published_once(self) -> None:
        """A publish that refuses one message of a batch confirmed the others: they are
        marked sent and published exactly once, however often the refused one is retried;
        the refused row is parked after its attempts; the later rows of its key (held back
        by the transport) are not published ahead of it; other keys go on."""
        async with self.make_store() as store:
            pub = RecordingPublisher()
            first = make_row(key="k", n=0)
            bad = make_row(key="k", n=1)
            after_bad = [make_row(key="k", n=2), make_row(key="k", n=3)]
            others = [make_row(key="j", n=4), make_row(n=5), make_row(key="j", n=6)]
            await self.add_committed(store, [first, bad, *after_bad, *others])
            pub.refuse = {bad.message_id}
            relay = self.relay(store, pub, max_attempts=3, backoff=lambda n: 0.0)
            for _ in range(8):
                await relay.run_once()
            assert [p.message_id for p in await relay.parked()] == [bad.message_id]
            confirmed = [first, *others]
            assert sorted(pub.ids) == sorted(r.message_id for r in confirmed)  # once each
            assert (await relay.status()).pending == 2  # after_bad wait behind their key
            pub.refuse = set()
            assert await relay.requeue() == 1
            await self.drain(relay)
            assert _first_order(pub.published)["k"] == [
                r.message_id for r in [first, bad, *after_bad]
            ]
            assert len(pub.ids) == len(set(pub.ids)) == 7
            assert (await relay.status()).pending == 0

    async def test_rows_confirmed_after_a_refusal_after_sending_are_published_once(
        self,
    ) -> None:
        """A broker that refuses a message after the batch went out may have confirmed the
        later messages of its key: those rows are marked sent (once), not published again
        on each retry of the refused one."""
        async with self.make_store() as store:
            pub = RecordingPublisher()
            bad = make_row(key="k", n=1)
            rest = [make_row(key="k", n=2), make_row(key="j", n=3), make_row(n=4)]
            await self.add_committed(store, [bad, *rest])
            pub.refuse, pub.refuse_after_sending = {bad.message_id}, True
            relay = self.relay(store, pub, max_attempts=3, backoff=lambda n: 0.0)
            for _ in range(6):
                await relay.run_once()
            assert [p.message_id for p in await relay.parked()] == [bad.message_id]
            assert sorted(pub.ids) == sorted(r.message_id for r in rest)
            assert (await relay.status()).pending == 0

    async def test_start_refuses_a_store_without_its_schema(self) -> None:
        async with _hook(self.make_store_without_schema) as store:
            relay = self.relay(store, RecordingPublisher())
            with pytest.raises(SchemaError, match="create_schema"):
                await relay.start()
            assert not relay.running

    async def test_start_checks_the_schema_without_counting_the_backlog(self) -> None:
        """``start()`` looks at the tables, never at the rows: ``status()``, which counts
        every pending row (seconds for millions), is not what it asks."""
        async with self.make_store() as store:
            await self.add_committed(store, make_rows(3, keys=["a"]))

            async def no_count() -> Any:
                raise AssertionError("start() counted the pending rows")

            store.status = no_count
            relay = self.relay(store, RecordingPublisher())
            await relay.start()
            assert relay.running
            await relay.stop()

    async def test_a_missing_schema_in_the_loop_logs_one_line_per_try(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        async with self.make_store() as store:
            relay = self.relay(store, RecordingPublisher(), backoff=lambda n: 0.001)
            lost = _SchemaGone(store)
            relay.store = lost  # the tables dropped under a running relay
            with caplog.at_level(logging.ERROR, logger="msdata.outbox"):
                await relay.start()
                try:
                    await eventually(lambda: lost.claims >= 3, 20.0, what="3 claims")
                finally:
                    await relay.stop()
            errors = [r for r in caplog.records if r.name == "msdata.outbox"]
            assert errors and all(r.exc_info is None for r in errors)
            assert "create_schema" in errors[0].getMessage()


class _SchemaGone:
    """A store whose tables are gone: every claim raises SchemaError."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.claims = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        self.claims += 1
        raise SchemaError("no such table: x_outbox: run create_schema()")

    async def mark_sent_and_claim(self, *args: Any, **kwargs: Any) -> Any:
        return await self.claim()


@asynccontextmanager
async def _open_many(suite: OutboxStoreHooks, store: Any, n: int) -> Any:
    """``store`` plus n-1 more instances over the same tables."""
    stores = [store]
    managers: list[AbstractAsyncContextManager[Any]] = []
    try:
        for _ in range(n - 1):
            cm = suite.open_again(store)
            stores.append(await cm.__aenter__())
            managers.append(cm)
        yield stores
    finally:
        for cm in reversed(managers):
            await cm.__aexit__(None, None, None)


class _ArbitraryRows:
    """The arbitrary-rows feed of :meth:`OutboxRelayConformance.test_arbitrary_rows_never_
    stop_the_relay`: hypothesis runs in a worker thread (its engine is synchronous) and
    hands each example to the test's event loop, where the store and the relay live."""

    COLUMNS = ("message_id", "topic", "type", "payload", "headers", "created_at")

    def __init__(self, suite: OutboxStoreHooks, store: Any, relay: OutboxRelay, pub: Any) -> None:
        self.suite, self.store, self.relay, self.pub = suite, store, relay, pub

    @staticmethod
    def strategies() -> Any:
        from hypothesis import strategies as st

        scalars = (
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=8)
        )
        json_values = st.recursive(
            scalars,
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=4), inner, max_size=3)
            ),
            max_leaves=6,
        )
        times = st.sampled_from(
            [
                SqlLiteral("'infinity'"),
                SqlLiteral("'-infinity'"),
                SqlLiteral("'200000-01-01 00:00:00+00'"),
                SqlLiteral("'4000-01-01 00:00:00+00 BC'"),
                SqlLiteral("'0001-01-01 00:00:00+00'"),
                SqlLiteral("'9999-12-31 23:59:59.999999+00'"),
            ]
        )
        json_texts = json_values.map(json.dumps) | st.dictionaries(
            st.text(max_size=6), st.text(max_size=6), max_size=3
        ).map(json.dumps)
        value = st.one_of(
            st.text(max_size=24),  # may hold NUL or a lone surrogate: a database may refuse
            st.binary(max_size=24),  # a BLOB / bytea
            st.binary(max_size=24).map(RawText),  # text of any bytes, any encoding
            st.integers(min_value=-(2**63), max_value=2**63 - 1),
            st.floats(),  # NaN, infinities, 1e300
            st.none(),
            json_texts,
            times,
            st.sampled_from([b"{" + b" " * 65_536 + b"}", b"\x00" * 65_536, "x" * 65_536]),
        )
        # each column drawn from anything, or from odd values of its own kind (so that a
        # database that checks types still gets rows it holds but the relay cannot read)
        own_kind: dict[str, Any] = {
            "message_id": st.text(max_size=12) | st.binary(max_size=12).map(RawText),
            "topic": st.text(max_size=12) | st.binary(max_size=12).map(RawText),
            "type": st.text(max_size=12) | st.binary(max_size=12).map(RawText),
            "payload": st.binary(max_size=48),
            "headers": json_texts | st.binary(max_size=12).map(RawText),
            "created_at": times | st.floats() | st.integers(),
        }
        overrides = st.lists(
            st.sampled_from(_ArbitraryRows.COLUMNS), unique=True, max_size=3
        ).flatmap(
            lambda names: st.fixed_dictionaries(
                {n: st.one_of(own_kind[n], own_kind[n], value) for n in names}
            )
        )
        key = st.one_of(
            st.none(),
            st.just("shared"),  # a good row of the same key is written behind it
            st.text(max_size=6).map(lambda t: ("text", t)),
            st.binary(max_size=6).map(lambda b: ("blob", b)),
            st.binary(max_size=6).map(lambda b: ("raw", b)),
        )
        return st.lists(st.tuples(overrides, key), min_size=1, max_size=4)

    async def run(self, examples: int) -> None:
        from hypothesis import HealthCheck, example, given, settings

        loop = asyncio.get_running_loop()

        @settings(
            max_examples=examples,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(self.strategies())
        # the kinds the issue met first, every run (then hypothesis's own)
        @example([({"headers": "[1,2]"}, "shared"), ({"payload": 1.5}, None)])
        @example([({"created_at": SqlLiteral("'200000-01-01 00:00:00+00'")}, "shared")])
        def feed(rows: list[tuple[dict[str, object], Any]]) -> None:
            asyncio.run_coroutine_threadsafe(self.example(rows), loop).result(timeout=120)

        await asyncio.to_thread(feed)

    async def settle(self) -> None:
        """Run the relay until two steps in a row publish nothing."""
        idle = 0
        for _ in range(30):
            idle = idle + 1 if await self.relay.run_once() == 0 else 0
            if idle == 2:
                return
        raise AssertionError("the relay did not settle in 30 steps")

    async def example(self, rows: list[tuple[dict[str, object], Any]]) -> None:
        store, suite, pub = self.store, self.suite, self.pub
        uid = uuid.uuid4().hex[:8]
        before = await store.status()
        parked_before = {p.seq for p in await store.parked(100_000)}
        published_before = len(pub.published)
        raw: list[int] = []
        followers: list[tuple[int, OutboxRow]] = []
        for i, (overrides, key) in enumerate(rows):
            columns = {**raw_columns(make_row(n=i)), **overrides}
            follower = None
            if key == "shared":
                columns["partition_key"] = f"{uid}-shared-{i}"
                follower = make_row(key=f"{uid}-shared-{i}", n=i)
            elif key is not None:  # a key of its own, of any type: nothing waits behind it
                kind, value = key
                mine = f"{uid}-{i}-".encode()
                columns["partition_key"] = (
                    f"{uid}-{i}-{value}"
                    if kind == "text"
                    else (mine + value if kind == "blob" else RawText(mine + value))
                )
            else:
                columns["partition_key"] = None
            seq = await suite.write_raw_row(store, columns)
            if seq is None:
                continue  # the database refused a value: no writer can leave it
            raw.append(seq)
            if follower is not None:
                followers.append((seq, follower))
        goods = make_rows(3, keys=[f"{uid}-good", None])
        await suite.add_committed(store, [f for _, f in followers] + goods)

        await self.settle()

        after = await store.status()
        parked = {p.seq: p for p in await store.parked(100_000) if p.seq not in parked_before}
        published = pub.ids[published_before:]
        assert set(parked) <= set(raw), "a good row was parked"
        for p in parked.values():
            assert isinstance(p.last_error, str) and p.last_error.strip(), p
        for g in goods:
            assert g.message_id in published, "a good row behind arbitrary rows never arrived"
        keyed = [m for m in published if m in {g.message_id for g in goods[::2]}]
        assert keyed == [g.message_id for g in goods[::2]], "order of the good key broken"
        waiting = 0
        for seq, f in followers:
            if seq in parked:
                waiting += 1
                assert f.message_id not in published, "published past a parked row of its key"
            else:
                assert f.message_id in published, "a row behind a published one never arrived"
        assert after.pending - before.pending == waiting, "a row neither published nor parked"
        assert len(published) + len(parked) + waiting == len(raw) + len(followers) + len(goods)
