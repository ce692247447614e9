"""Projections, the event log and aggregates on the memory stores (the SQL backends run the
same logic; their stores are checked by the conformance suites)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from msdata.adapters.memory import (
    MemoryCheckpointStore,
    MemoryEventStore,
    MemoryOutboxStore,
    MemoryTransaction,
)
from msdata.errors import ConcurrencyError, ConfigurationError, DecodeError, RegistrationError
from msdata.eventstore import Aggregate, AggregateRepository, EventLog, NewEvent
from msdata.eventstore.aggregate import Snapshot
from msdata.messages import Event, MessageRegistry
from msdata.outbox import Outbox
from msdata.projections import Projection, ProjectionContext, ProjectionRunner, handles
from msdata.testing import FakeClock, eventually

registry = MessageRegistry()


class Deposited(Event):
    account: str
    amount: int


class Withdrawn(Event):
    account: str
    amount: int


class Renamed(Event):
    account: str
    name: str


registry.register(Deposited, "bank.Deposited")
registry.register(Withdrawn, "bank.Withdrawn")
registry.register(Renamed, "bank.Renamed")


class MemoryReadModel:
    """Per generation: account -> [balance, number of events, last position]; writes land
    when the transaction commits."""

    def __init__(self) -> None:
        self.generations: dict[int, dict[str, list[int]]] = {}

    def write(
        self, tx: MemoryTransaction, generation: int, account: str, delta: int, pos: int
    ) -> None:
        def commit() -> None:
            row = self.generations[generation].setdefault(account, [0, 0, 0])
            row[0] += delta
            row[1] += 1
            if pos:  # 0: fed by a bus, no position
                assert pos > row[2], "an event applied twice or out of order"
                row[2] = pos

        tx.on_commit(commit)


class Balances(Projection):
    name = "balances"

    def __init__(self, model: MemoryReadModel) -> None:
        super().__init__()
        self.model = model
        self.active = 0

    def setup(self, conn: Any, generation: int) -> None:
        conn.on_commit(lambda: self.model.generations.__setitem__(generation, {}))

    def activate(self, conn: Any, generation: int) -> None:
        conn.on_commit(lambda: setattr(self, "active", generation))

    def drop(self, conn: Any, generation: int) -> None:
        conn.on_commit(lambda: self.model.generations.pop(generation, None))

    @handles(Deposited)
    def deposited(self, ctx: ProjectionContext, event: Deposited) -> None:
        self.model.write(ctx.conn, ctx.generation, event.account, event.amount, ctx.stored.position)

    @handles(Withdrawn)
    async def withdrawn(self, ctx: ProjectionContext, event: Withdrawn) -> None:
        self.model.write(
            ctx.conn, ctx.generation, event.account, -event.amount, ctx.stored.position
        )


def expected_model(events: list[tuple[str, int, int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for account, amount, pos in events:
        row = out.setdefault(account, [0, 0, 0])
        row[0] += amount
        row[1] += 1
        row[2] = pos
    return out


def setup_world(
    batch_size: int = 3,
) -> tuple[MemoryEventStore, EventLog, MemoryCheckpointStore, MemoryReadModel, ProjectionRunner]:
    store = MemoryEventStore()
    log_ = EventLog(store, registry=registry, source="bank")
    checkpoints = MemoryCheckpointStore()
    model = MemoryReadModel()
    runner = ProjectionRunner(
        Balances(model), log_, checkpoints, MemoryTransaction, batch_size=batch_size
    )
    return store, log_, checkpoints, model, runner


def append(log_: EventLog, stream: str, expected: int, events: list[Event]) -> int:
    with MemoryTransaction() as tx:
        return log_.append(tx, stream, expected, events).version


# -- event log -------------------------------------------------------------------------------


async def test_event_log_round_trips_typed_events_with_their_envelopes() -> None:
    store, events, *_ = setup_world()
    result = append(
        events, "acc-1", 0, [Deposited(account="1", amount=5), Renamed(account="1", name="x")]
    )
    assert result == 2
    got = await events.read_stream("acc-1")
    assert [s.message for s in got] == [
        Deposited(account="1", amount=5),
        Renamed(account="1", name="x"),
    ]
    assert [s.stream_version for s in got] == [1, 2]
    assert all(s.envelope.partition_key == "acc-1" and s.envelope.source == "bank" for s in got)
    assert got[1].envelope.id == (await store.read_all())[1].event_id
    assert [s.position for s in await events.read_all(got[0].position)] == [got[1].position]


async def test_event_log_adds_the_same_events_to_the_outbox_in_the_same_transaction() -> None:
    store = MemoryEventStore()
    outbox_store = MemoryOutboxStore()
    events = EventLog(store, registry=registry, outbox=Outbox(outbox_store, registry=registry))
    tx = MemoryTransaction()
    events.append(tx, "acc-1", 0, [Deposited(account="1", amount=5)])
    tx.rollback()
    assert await store.read_all() == [] and await outbox_store.claim("r", 10, 30) == []
    with MemoryTransaction() as tx:
        result = events.append(tx, "acc-1", 0, [Deposited(account="1", amount=5)])
        events.append(tx, "acc-2", 0, [Withdrawn(account="2", amount=1)], publish=False)
    rows = await outbox_store.claim("r", 10, 30)
    assert [r.message_id for r in rows] == [result.envelopes[0].id]
    assert rows[0].topic == "bank.Deposited" and rows[0].partition_key == "acc-1"
    assert bytes(rows[0].payload) == bytes((await store.read_all())[0].payload)


async def test_old_schema_versions_are_upcast_when_read() -> None:
    old, new = MessageRegistry(), MessageRegistry()

    class RenamedV1(Event):
        account: str
        title: str

    class RenamedV2(Event):
        account: str
        name: str

    old.register(RenamedV1, "bank.Renamed", 1)
    new.register(RenamedV2, "bank.Renamed", 2)
    new.add_upcaster("bank.Renamed", 1, lambda d: {"account": d["account"], "name": d["title"]})
    store = MemoryEventStore()
    append(EventLog(store, registry=old), "acc", 0, [RenamedV1(account="a", title="t")])
    (got,) = await EventLog(store, registry=new).read_stream("acc")
    assert got.message == RenamedV2(account="a", name="t") and got.envelope.version == 2
    assert (await store.read_all())[0].schema_version == 1  # the stored bytes stay as written


async def test_an_event_that_no_longer_decodes_names_its_position() -> None:
    store = MemoryEventStore()
    with MemoryTransaction() as tx:
        store.append(tx, "s", 0, [NewEvent("x", "bank.Deposited", 1, b'{"not": "a cloudevent"}')])
    with pytest.raises(DecodeError, match="position 1"):
        await EventLog(store, registry=registry).read_all()


async def test_subscribe_catches_up_then_follows_live_with_a_type_filter() -> None:
    _store, events, *_ = setup_world()
    append(events, "a", 0, [Deposited(account="a", amount=1), Renamed(account="a", name="n")])
    got: list[Any] = []

    async def follow() -> None:
        async for stored in events.subscribe(types={"bank.Deposited"}, max_wait=30):
            got.append(stored.message)

    task = asyncio.create_task(follow())
    try:
        await eventually(lambda: len(got) == 1)
        append(events, "a", 2, [Renamed(account="a", name="m"), Deposited(account="a", amount=2)])
        await eventually(lambda: len(got) == 2)
    finally:
        task.cancel()
    assert got == [Deposited(account="a", amount=1), Deposited(account="a", amount=2)]


async def test_read_all_and_subscribe_take_event_classes_as_types() -> None:
    _store, events, *_ = setup_world()
    append(events, "a", 0, [Deposited(account="a", amount=1), Renamed(account="a", name="n")])
    got = await events.read_all(types=[Deposited])
    assert [s.message for s in got] == [Deposited(account="a", amount=1)]
    assert [s.message for s in await events.read_all(types=[Renamed, "bank.Deposited"])] == [
        Deposited(account="a", amount=1),
        Renamed(account="a", name="n"),
    ]
    async for stored in events.subscribe(types=[Renamed], max_wait=30):
        assert stored.message == Renamed(account="a", name="n")
        break
    with pytest.raises(ConfigurationError):
        await events.read_all(types=Deposited)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        await events.read_all(types=[42])  # type: ignore[list-item]

    class Unregistered(Event):
        x: int

    with pytest.raises(RegistrationError):
        await events.read_all(types=[Unregistered])


# -- aggregates ------------------------------------------------------------------------------


class AccountState(BaseModel):
    balance: int = 0
    events: int = 0


class Account(Aggregate[AccountState]):
    def initial_state(self) -> AccountState:
        return AccountState()

    def evolve(self, state: AccountState, event: Event) -> AccountState:
        if isinstance(event, Deposited):
            return AccountState(balance=state.balance + event.amount, events=state.events + 1)
        if isinstance(event, Withdrawn):
            return AccountState(balance=state.balance - event.amount, events=state.events + 1)
        return state

    def deposit(self, amount: int) -> None:
        self.record(Deposited(account=self.id, amount=amount))


async def test_aggregate_rebuilds_records_and_saves_with_the_expected_version() -> None:
    store = MemoryEventStore()
    accounts = AggregateRepository(EventLog(store, registry=registry), Account)
    acc = await accounts.load("acc-1")
    assert acc.version == 0 and acc.state == AccountState()
    acc.deposit(5)
    acc.deposit(7)
    assert acc.pending and acc.saved_version == 0
    with MemoryTransaction() as tx:
        assert accounts.save(tx, acc).version == 2
    assert acc.pending == () and acc.saved_version == 2
    again = await accounts.load("acc-1")
    assert again.state == AccountState(balance=12, events=2) and again.version == 2
    stale = await accounts.load("acc-1")
    again.deposit(1)
    with MemoryTransaction() as tx:
        accounts.save(tx, again)
    stale.deposit(100)
    with pytest.raises(ConcurrencyError) as info, MemoryTransaction() as tx:
        accounts.save(tx, stale)
    assert "acc-1" in info.value.name and (info.value.expected, info.value.actual) == (2, 3)
    assert (await accounts.load("acc-1")).state.balance == 13


async def test_saving_again_after_a_rolled_back_save_says_to_reload() -> None:
    store = MemoryEventStore()
    accounts = AggregateRepository(EventLog(store, registry=registry), Account)
    acc = await accounts.load("acc-rb")
    acc.deposit(1)
    with MemoryTransaction() as tx:
        accounts.save(tx, acc)
    acc.deposit(4)
    with pytest.raises(RuntimeError), MemoryTransaction() as tx:
        accounts.save(tx, acc)
        raise RuntimeError("the caller's transaction rolls back")
    acc.deposit(2)
    with (
        pytest.raises(ConcurrencyError, match=r"never committed.*load the aggregate again"),
        MemoryTransaction() as tx,
    ):
        accounts.save(tx, acc)
    fresh = await accounts.load("acc-rb")
    assert fresh.state.balance == 1 and fresh.version == 1
    fresh.deposit(2)
    with MemoryTransaction() as tx:
        assert accounts.save(tx, fresh).version == 2


async def test_snapshots_stay_out_of_the_global_order_readers() -> None:
    store = MemoryEventStore()
    events = EventLog(store, registry=MessageRegistry())
    events.registry.register(Deposited, "bank.Deposited")
    accounts = AggregateRepository(events, Account, snapshot_every=1)
    acc = await accounts.load("acc")
    for i in (1, 2, 3):
        acc.deposit(i)
        with MemoryTransaction() as tx:
            accounts.save(tx, acc)
    assert len(await store.read_all()) == 6  # three events, three snapshots
    assert [s.message.amount for s in await events.read_all()] == [1, 2, 3]
    assert [s.message.amount for s in await events.read_all(limit=2)] == [1, 2]
    got: list[int] = []
    async for stored in events.subscribe(batch_size=1, max_wait=30):
        got.append(stored.message.amount)
        if len(got) == 3:
            break
    assert got == [1, 2, 3]
    # asked for by name, they are there
    assert len(await events.read_all(types=["msdata.Snapshot"])) == 3
    # a reader whose registry does not know snapshots reads the events
    other = EventLog(store, registry=MessageRegistry())
    other.registry.register(Deposited, "bank.Deposited")
    assert len(await other.read_all()) == 3


async def test_the_snapshot_stream_suffix_is_reserved() -> None:
    _store, events, *_ = setup_world()
    with pytest.raises(ConfigurationError, match="reserved"):
        append(events, "acc.snapshots", 0, [Deposited(account="a", amount=1)])
    accounts = AggregateRepository(events, Account, snapshot_every=1)
    acc = await accounts.load("acc.snapshots")
    acc.deposit(1)
    with pytest.raises(ConfigurationError, match="reserved"), MemoryTransaction() as tx:
        accounts.save(tx, acc)
    with pytest.raises(ConfigurationError, match="reserved"):
        append(events, "acc", 0, [Snapshot(of_version=1, state={})])


async def test_snapshots_are_taken_every_n_events_and_used_to_load() -> None:
    store = MemoryEventStore()
    events = EventLog(store, registry=registry)
    accounts = AggregateRepository(events, Account, snapshot_every=3)
    acc = await accounts.load("acc")
    for i in range(1, 8):
        acc.deposit(i)
        with MemoryTransaction() as tx:
            accounts.save(tx, acc)
    snaps = await store.read_stream("acc.snapshots")
    assert len(snaps) == 2  # after versions 3 and 6
    loaded = await accounts.load("acc")
    assert loaded.state == AccountState(balance=28, events=7) and loaded.version == 7
    # loading reads only what follows the newest snapshot: prove it by dropping the rest
    store._streams["acc"] = store._streams["acc"][6:]
    store._streams["acc"] = [None] * 6 + store._streams["acc"]  # type: ignore[list-item]
    assert (await AggregateRepository(events, Account, snapshot_every=3).load("acc")).version == 7


async def test_a_snapshot_that_no_longer_validates_is_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Strict(BaseModel):
        balance: str  # a changed shape: the old snapshot has an int

    class StrictAccount(Account):
        def initial_state(self) -> Any:
            return Strict(balance="0")

        def evolve(self, state: Any, event: Event) -> Any:
            assert isinstance(event, Deposited)
            return Strict(balance=str(int(state.balance) + event.amount))

    store = MemoryEventStore()
    events = EventLog(store, registry=registry)
    accounts = AggregateRepository(events, Account, snapshot_every=2)
    acc = await accounts.load("acc")
    acc.deposit(1)
    acc.deposit(2)
    with MemoryTransaction() as tx:
        accounts.save(tx, acc)
    store._streams["acc.snapshots"][0] = store._streams["acc.snapshots"][0]._replace(
        payload=store._streams["acc.snapshots"][0].payload.replace(b'"balance":3', b'"balance":[]')
    )
    with caplog.at_level(logging.WARNING, "msdata.eventstore"):
        loaded = await AggregateRepository(events, StrictAccount, snapshot_every=2).load("acc")
    assert loaded.state == Strict(balance="3") and "ignored" in caplog.text


# -- projections -----------------------------------------------------------------------------


async def test_runner_applies_events_with_the_checkpoint_and_reports_lag() -> None:
    _store, events, checkpoints, model, runner = setup_world(batch_size=2)
    clock = FakeClock()
    runner.clock = clock
    append(events, "a", 0, [Deposited(account="a", amount=5), Renamed(account="a", name="x")])
    append(events, "b", 0, [Withdrawn(account="b", amount=2), Deposited(account="b", amount=1)])
    lag = await runner.lag()
    assert lag.events == 4
    assert await runner.catch_up() == 3  # Renamed is not read: the projection does not handle it
    assert model.generations[1] == expected_model([("a", 5, 1), ("b", -2, 3), ("b", 1, 4)])
    assert await checkpoints.load("balances@1") == 4 == runner.position
    assert await runner.lag() == (0, 0.0)
    append(events, "a", 2, [Renamed(account="a", name="y")])
    assert (await runner.lag()).events == 1
    assert await runner.catch_up() == 0
    assert await runner.lag() == (0, 0.0)


async def test_runner_follows_live_until_stopped() -> None:
    _store, events, _checkpoints, model, runner = setup_world()
    task = asyncio.create_task(runner.run())
    try:
        for i in range(1, 6):
            append(events, "a", i - 1, [Deposited(account="a", amount=i)])
        await eventually(lambda: model.generations.get(1, {}).get("a", [0])[0] == 15)
    finally:
        await runner.stop()
        await asyncio.wait_for(task, 5)


async def test_a_transaction_factory_that_yields_none_stops_the_runner_clearly() -> None:
    _store, events, checkpoints, model, _ = setup_world()
    append(events, "a", 0, [Deposited(account="a", amount=1)])

    class YieldsNone:  # what asyncpg's conn.transaction() does
        async def __aenter__(self) -> None:
            return None

        async def __aexit__(self, *exc: object) -> None:
            return None

    runner = ProjectionRunner(Balances(model), events, checkpoints, YieldsNone)
    with pytest.raises(ConfigurationError, match="yields None"):
        await asyncio.wait_for(runner.run(), 5)  # raised, not retried forever
    with pytest.raises(ConfigurationError, match="context manager"):
        await ProjectionRunner(Balances(model), events, checkpoints, lambda: 42).step()


async def test_two_runners_of_one_projection_never_apply_an_event_twice() -> None:
    _store, events, checkpoints, model, first = setup_world(batch_size=2)
    second = ProjectionRunner(
        first.projection, events, checkpoints, MemoryTransaction, batch_size=2
    )
    for i in range(10):
        append(events, f"s{i % 3}", i // 3, [Deposited(account=f"s{i % 3}", amount=i)])
    await first.start()
    await second.start()
    for _ in range(10):
        await first.step()
        await second.step()  # a stale checkpoint: ConcurrencyError, rolled back, goes on
    want = expected_model([(f"s{i % 3}", i, i + 1) for i in range(10)])
    assert model.generations[1] == want  # the model asserts no event lands twice


async def test_an_event_that_does_not_decode_stops_the_runner_just_before_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, events, _checkpoints, model, runner = setup_world()
    clock = FakeClock()
    runner.clock = clock
    append(events, "good", 0, [Deposited(account="good", amount=5)])
    with MemoryTransaction() as tx:
        store.append(tx, "bad", 0, [NewEvent("x", "bank.Deposited", 1, b"{}")])
    append(events, "good", 1, [Deposited(account="good", amount=7)])
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: runner.last_error is not None)
        assert isinstance(runner.last_error, DecodeError)
        assert runner.position == 1 and model.generations[1] == {"good": [5, 1, 1]}
        assert "position 2" in caplog.text
        await eventually(lambda: clock.sleepers == 1)  # retrying after the backoff
    finally:
        await runner.stop()
        await asyncio.wait_for(task, 5)
    with pytest.raises(DecodeError):
        await runner.rebuild()  # a rebuild stops at the same event, and switches nothing
    assert await runner.checkpoints.active("balances") == 1


async def test_rebuild_switches_readers_from_the_whole_old_model_to_the_whole_new() -> None:
    _store, events, checkpoints, model, runner = setup_world(batch_size=2)
    for i in range(9):
        append(events, f"s{i % 3}", i // 3, [Deposited(account=f"s{i % 3}", amount=i)])
    await runner.catch_up()
    projection = runner.projection
    assert isinstance(projection, Balances) and projection.active == 1
    live = {k: list(v) for k, v in model.generations[1].items()}
    seen: list[tuple[int, dict[str, list[int]]]] = []
    original = runner._apply

    async def observe(*args: Any, **kwargs: Any) -> int:
        # a reader between two rebuild transactions sees the active generation, complete
        active = await checkpoints.active("balances")
        seen.append((active, {k: list(v) for k, v in model.generations[active].items()}))
        return await original(*args, **kwargs)

    runner._apply = observe  # type: ignore[method-assign]
    assert await runner.rebuild(drop_old=True) == 2
    assert all(active == 1 and snapshot == live for active, snapshot in seen)
    assert projection.active == 2 and await checkpoints.active("balances") == 2
    assert model.generations == {2: live}
    append(events, "s0", 3, [Deposited(account="s0", amount=100)])
    await runner.catch_up()
    assert model.generations[2]["s0"][0] == live["s0"][0] + 100


async def test_a_runner_in_another_process_follows_the_rebuilt_generation() -> None:
    _store, events, checkpoints, model, runner = setup_world()
    other = ProjectionRunner(runner.projection, events, checkpoints, MemoryTransaction)
    append(events, "a", 0, [Deposited(account="a", amount=1)])
    await runner.catch_up()
    await other.catch_up()
    await runner.rebuild()
    append(events, "a", 1, [Deposited(account="a", amount=2)])
    await other.catch_up()
    assert other.generation == 2 and model.generations[2]["a"][:2] == [3, 2]
    await runner.catch_up()  # nothing left: the other runner applied it
    assert model.generations[2]["a"][:2] == [3, 2]


async def test_projection_needs_a_name_and_registered_types() -> None:
    class Nameless(Projection):
        pass

    with pytest.raises(ConfigurationError):
        Nameless()


events_strategy = st.lists(
    st.tuples(st.integers(0, 3), st.sampled_from(["d", "w", "r"]), st.integers(1, 50)),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=events_strategy, batch=st.integers(1, 5), steps=st.lists(st.integers(0, 3), min_size=1))
def test_a_rebuilt_projection_equals_the_live_one(
    ops: list[tuple[int, str, int]], batch: int, steps: list[int]
) -> None:
    async def scenario() -> None:
        _store, events, _checkpoints, model, runner = setup_world(batch_size=batch)
        versions = [0, 0, 0, 0]
        expected: list[tuple[str, int, int]] = []
        for i, (account, kind, amount) in enumerate(ops):
            name = f"acc{account}"
            event: Event
            if kind == "d":
                event = Deposited(account=name, amount=amount)
            elif kind == "w":
                event = Withdrawn(account=name, amount=amount)
            else:
                event = Renamed(account=name, name=str(amount))
            versions[account] = append(events, name, versions[account], [event])
            if kind != "r":
                expected.append((name, amount if kind == "d" else -amount, i + 1))
            for _ in range(steps[i % len(steps)]):  # the live runner lags by arbitrary amounts
                await runner.step()
        await runner.catch_up()
        live = model.generations[1]
        assert live == expected_model(expected)
        assert await runner.rebuild() == 2
        assert model.generations[2] == live

    asyncio.run(scenario())


async def test_a_projection_fed_by_a_bus_topic_applies_a_redelivery_once() -> None:
    from msdata.adapters.memory import MemoryInboxStore, MemoryTransport
    from msdata.events import EventBus
    from msdata.outbox import Inbox

    _store, _events, _checkpoints, model, runner = setup_world()
    bus = EventBus(MemoryTransport(), registry=registry)
    runner.follow_bus(
        bus, group="balances", inbox=Inbox(MemoryInboxStore()), transaction=MemoryTransaction
    )
    async with bus:
        envelope = await bus.publish(Deposited(account="a", amount=5), key="a")
        await bus.transport.publish("bank.Deposited", [bus._to_wire(envelope)])  # redelivered
        await bus.publish(Withdrawn(account="a", amount=2), key="a")
        await eventually(lambda: model.generations.get(1, {}).get("a", [0, 0])[1] == 2)
        await asyncio.sleep(0.05)
    assert model.generations[1]["a"][:2] == [3, 2]


async def test_bus_handler_outside_a_delivery_is_refused() -> None:
    *_, runner = setup_world()
    with pytest.raises(ConfigurationError):
        await runner.bus_handler()(Deposited(account="a", amount=1))


# -- how the runner calls a projection ---------------------------------------------------------


async def test_the_runner_calls_a_projection_s_own_apply_for_every_event() -> None:
    """The runner calls handlers itself (no coroutine per event) only for Projection.apply:
    a projection that overrides apply gets every event through it."""

    class Counting(Balances):
        def __init__(self, model: MemoryReadModel) -> None:
            super().__init__(model)
            self.seen: list[int] = []

        async def apply(self, ctx: ProjectionContext) -> None:
            self.seen.append(ctx.stored.position)
            await super().apply(ctx)

    store, log_, checkpoints, model, _ = setup_world()
    projection = Counting(model)
    runner = ProjectionRunner(projection, log_, checkpoints, MemoryTransaction, batch_size=3)
    append(log_, "a", 0, [Deposited(account="a", amount=5), Withdrawn(account="a", amount=2)])
    append(log_, "b", 0, [Deposited(account="b", amount=1)] * 3)
    assert await runner.catch_up() == 5
    positions = [r.position for r in await store.read_all()]
    assert projection.seen == positions
    assert model.generations[1] == {"a": [3, 2, positions[1]], "b": [3, 3, positions[4]]}


async def test_a_sync_handler_s_awaitable_is_awaited_in_order() -> None:
    done: list[tuple[str, int]] = []

    class Later(Projection):
        name = "later"

        @handles(Deposited)
        def deposited(self, ctx: ProjectionContext, event: Deposited) -> Any:
            async def write() -> None:
                await asyncio.sleep(0)
                done.append((event.account, ctx.stored.position))

            return write()  # a plain function returning a coroutine

        @handles(Withdrawn)
        def withdrawn(self, ctx: ProjectionContext, event: Withdrawn) -> None:
            done.append((event.account, ctx.stored.position))

    store, log_, checkpoints, *_ = setup_world()
    runner = ProjectionRunner(Later(), log_, checkpoints, MemoryTransaction, batch_size=10)
    append(log_, "a", 0, [Deposited(account="a", amount=1), Withdrawn(account="w", amount=1)])
    append(log_, "b", 0, [Deposited(account="b", amount=1), Renamed(account="b", name="x")])
    assert await runner.catch_up() == 3  # Renamed has no handler: not read
    positions = [r.position for r in await store.read_all()]
    assert done == [("a", positions[0]), ("w", positions[1]), ("b", positions[2])]
