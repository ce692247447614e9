"""Event-sourced aggregates: state folded from a stream, new events recorded, saved with the
expected version, and optional snapshots so a long stream is not read from its start."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from msdata.errors import ConcurrencyError, ConfigurationError, DecodeError
from msdata.eventstore.log import SNAPSHOT_TYPE, AppendResult, EventLog
from msdata.messages import Event

__all__ = ["Aggregate", "AggregateRepository", "Snapshot"]

log = logging.getLogger("msdata.eventstore")

S = TypeVar("S")
A = TypeVar("A", bound="Aggregate[Any]")


class Snapshot(Event):
    """An aggregate's state after ``of_version`` events of its stream, kept in the stream
    ``{stream_id}.snapshots`` (type name ``msdata.Snapshot``; never published). Stream ids
    ending in ``.snapshots`` are reserved for them (ConfigurationError otherwise)."""

    of_version: int
    state: dict[str, Any]


class Aggregate(ABC, Generic[S]):
    """Base of an event-sourced aggregate with state ``S``::

        class Order(Aggregate[OrderState]):
            def initial_state(self) -> OrderState:
                return OrderState()

            def evolve(self, state: OrderState, event: Event) -> OrderState:
                if isinstance(event, ItemAdded):
                    return state.model_copy(update={"items": state.items + 1})
                return state

            def add_item(self) -> None:                     # a command method
                self.record(ItemAdded(order_id=self.id))

    ``version`` counts every event applied (saved and pending); ``saved_version`` those
    already in the store. ``evolve`` must be a pure function of state and event: rebuilding
    from the stream (or from a snapshot and the rest of the stream) gives the same state.
    For snapshots, ``S`` must be a pydantic model.
    """

    def __init__(self, id: str) -> None:
        self.id = id
        self.version = 0
        self.state: S = self.initial_state()
        self._pending: list[Event] = []
        # the saved_version before the last save: a save is only known to have committed
        # when the caller's transaction does, which the repository cannot see
        self._last_save_from: int | None = None

    @abstractmethod
    def initial_state(self) -> S:
        """The state of an aggregate with no events."""

    @abstractmethod
    def evolve(self, state: S, event: Event) -> S:
        """The state after ``event``."""

    def record(self, event: Event) -> None:
        """Apply a new event and keep it for the next save."""
        self.state = self.evolve(self.state, event)
        self.version += 1
        self._pending.append(event)

    def replay(self, event: Event) -> None:
        """Apply a stored event (used when loading)."""
        self.state = self.evolve(self.state, event)
        self.version += 1

    @property
    def pending(self) -> tuple[Event, ...]:
        """The events recorded since the last save."""
        return tuple(self._pending)

    @property
    def saved_version(self) -> int:
        return self.version - len(self._pending)


class AggregateRepository(Generic[A]):
    """Loads and saves aggregates of one kind through an :class:`EventLog`::

        orders = AggregateRepository(events, Order, snapshot_every=100)
        order = await orders.load("order-42")
        order.add_item()
        with conn:
            orders.save(conn, order)      # ConcurrencyError if someone saved first

    ``factory(stream_id)`` builds an empty aggregate. ``snapshot_every=n``: ``save`` also
    writes a snapshot (in the same transaction) each time the version passes a multiple of
    ``n``, and ``load`` starts from the newest snapshot it can read; a snapshot that no longer
    validates (the state's shape changed) is ignored and the stream is read from its start.
    """

    def __init__(
        self,
        log: EventLog,
        factory: Callable[[str], A],
        *,
        snapshot_every: int | None = None,
    ) -> None:
        if snapshot_every is not None and snapshot_every < 1:
            raise ConfigurationError("snapshot_every must be >= 1 (or None for no snapshots)")
        self.log = log
        self.factory = factory
        self.snapshot_every = snapshot_every
        if snapshot_every is not None and not log.registry.is_registered(Snapshot):
            log.registry.register(Snapshot, SNAPSHOT_TYPE)
        self._snapshot_versions: dict[str, int] = {}

    @staticmethod
    def snapshot_stream(stream_id: str) -> str:
        return f"{stream_id}.snapshots"

    async def load(self, stream_id: str) -> A:
        """The aggregate rebuilt from its snapshot (if any) and its stream; an unknown
        stream gives a new aggregate at version 0."""
        aggregate = self.factory(stream_id)
        if self.snapshot_every is not None:
            await self._restore(aggregate)
        for stored in await self.log.read_stream(stream_id, aggregate.version + 1):
            aggregate.replay(stored.message)
        return aggregate

    async def _restore(self, aggregate: A) -> None:
        name = self.snapshot_stream(aggregate.id)
        version = await self.log.store.stream_version(name)
        self._snapshot_versions[aggregate.id] = version
        if version == 0:
            return
        try:
            (stored,) = await self.log.read_stream(name, version, 1)
            snap = stored.message
            if not isinstance(snap, Snapshot):
                return
            state_type = type(aggregate.state)
            if not issubclass(state_type, BaseModel):
                return
            aggregate.state = state_type.model_validate(snap.state)
            aggregate.version = snap.of_version
        except (DecodeError, ValidationError, ValueError) as e:
            log.warning("snapshot of %s ignored (%s): reading the whole stream", aggregate.id, e)

    def save(self, conn: Any, aggregate: A) -> AppendResult:
        """Append the aggregate's pending events on the sync connection ``conn`` (in its
        open transaction) with ``expected_version = saved_version``; then they count as
        saved (``pending`` is empty, ``saved_version == version``).

        The repository cannot see whether the caller's transaction commits. If it rolls
        back, this object is ahead of its stream: load the aggregate again and repeat the
        command. Saving it anyway raises ConcurrencyError saying that the previous save
        never committed (``actual`` is the version it started from)."""
        try:
            result = self.log.append(conn, aggregate.id, aggregate.saved_version, aggregate.pending)
        except ConcurrencyError as e:
            raise self._explain(aggregate, e) from e
        snapshot = self._snapshot(aggregate)
        if snapshot is not None:
            name, expected, event = snapshot
            try:
                self.log.append(conn, name, expected, event, publish=False)
                self._snapshot_versions[aggregate.id] = expected + 1
            except ConcurrencyError:
                log.debug("snapshot of %s skipped: another writer took one", aggregate.id)
        self._saved(aggregate)
        return result

    async def save_async(self, conn: Any, aggregate: A) -> AppendResult:
        """:meth:`save` on an async connection."""
        try:
            result = await self.log.append_async(
                conn, aggregate.id, aggregate.saved_version, aggregate.pending
            )
        except ConcurrencyError as e:
            raise self._explain(aggregate, e) from e
        snapshot = self._snapshot(aggregate)
        if snapshot is not None:
            name, expected, event = snapshot
            try:
                await self.log.append_async(conn, name, expected, event, publish=False)
                self._snapshot_versions[aggregate.id] = expected + 1
            except ConcurrencyError:
                log.debug("snapshot of %s skipped: another writer took one", aggregate.id)
        self._saved(aggregate)
        return result

    @staticmethod
    def _saved(aggregate: A) -> None:
        if aggregate._pending:
            aggregate._last_save_from = aggregate.saved_version
        aggregate._pending.clear()

    @staticmethod
    def _explain(aggregate: A, e: ConcurrencyError) -> ConcurrencyError:
        start = aggregate._last_save_from
        if start is None or e.actual is None or e.actual != start:
            return e
        better = ConcurrencyError(e.name, e.expected, e.actual)
        better.args = (
            f"{e}: this aggregate's previous save (up to version {e.expected}) never "
            "committed (did its transaction roll back?), so the object is ahead of its "
            "stream: load the aggregate again and repeat the command",
        )
        return better

    def _snapshot(self, aggregate: A) -> tuple[str, int, Snapshot] | None:
        every = self.snapshot_every
        if every is None or aggregate.version // every == aggregate.saved_version // every:
            return None
        state = aggregate.state
        if not isinstance(state, BaseModel):
            raise ConfigurationError(
                f"snapshots need the aggregate's state to be a pydantic model, not "
                f"{type(state).__qualname__}"
            )
        return (
            self.snapshot_stream(aggregate.id),
            self._snapshot_versions.get(aggregate.id, 0),
            Snapshot(of_version=aggregate.version, state=state.model_dump(mode="json")),
        )
