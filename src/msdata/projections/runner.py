"""The projection runner: follows the event store's global order and applies each event to
a projection's read model, with the checkpoint in the same transaction; reports lag;
rebuilds into a fresh generation and switches readers over in one transaction."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from msdata.backoff import Backoff, exponential_backoff
from msdata.clock import SYSTEM_CLOCK, Clock
from msdata.errors import ConcurrencyError, ConfigurationError, DecodeError
from msdata.eventstore.log import EventLog, StoredEvent
from msdata.eventstore.store import RecordedEvent
from msdata.messages import Message, current_envelope
from msdata.projections.projection import Projection, ProjectionContext
from msdata.projections.store import CheckpointStore
from msdata.storage import TransactionFactory, bind_connection, current_connection

if TYPE_CHECKING:
    from msdata.events import EventBus
    from msdata.inbox import Inbox

__all__ = ["Lag", "ProjectionRunner"]

log = logging.getLogger("msdata.projections")

T = TypeVar("T")


class Lag(NamedTuple):
    """How far a projection is behind: readable events it has not applied, and the age in
    seconds of the oldest of them (0.0 when caught up)."""

    events: int
    seconds: float


class ProjectionRunner:
    """Keeps one projection's read model up to date from an :class:`EventLog`::

        runner = ProjectionRunner(OrderTotals(), events, checkpoints, transaction)
        task = asyncio.create_task(runner.run())      # follow forever
        ...
        await runner.rebuild()                          # new generation from position 0
        await runner.stop()

    ``transaction()`` opens a transaction on the read model's database (the same one the
    checkpoint store writes to) and yields its connection: a sync context manager (sqlite3,
    a ``MemoryTransaction``) or an async one. asyncpg's ``conn.transaction()`` yields None,
    not the connection: wrap it (see docs/projections.md); a context manager that yields
    None raises ConfigurationError. Each batch of up to
    ``batch_size`` events is applied in one such transaction, which also saves the
    checkpoint (compare-and-set on the previous one), so a crash anywhere leaves either
    the whole batch applied with its checkpoint, or neither.

    Only the projection's event types are read (``read_all(types=…)``); an event that no
    longer decodes stops the runner at that position (logged, retried with ``backoff``,
    visible in ``last_error``): skipping it would make the model wrong. A
    ``ConcurrencyError`` on the checkpoint (another runner of the same projection moved it)
    rolls the batch back, and the runner goes on from the stored checkpoint.
    """

    def __init__(
        self,
        projection: Projection,
        log: EventLog,
        checkpoints: CheckpointStore,
        transaction: TransactionFactory,
        *,
        batch_size: int = 100,
        max_wait: float = 5.0,
        clock: Clock = SYSTEM_CLOCK,
        backoff: Backoff | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigurationError("batch_size must be >= 1")
        self.projection = projection
        self.log = log
        self.checkpoints = checkpoints
        self.transaction = transaction
        self.batch_size = batch_size
        self.max_wait = max_wait
        self.clock = clock
        self.backoff = backoff or exponential_backoff(base=0.1, maximum=30.0)
        self.types = projection.event_types(log.registry)
        self.name = projection.name
        #: the generation of the read model this runner writes (0 before ``start``)
        self.generation = 0
        #: the committed checkpoint of that generation
        self.position = 0
        #: the error of the last failed batch (None after a batch succeeds)
        self.last_error: BaseException | None = None
        self._read_from = 0  # >= position: events of other types up to here were passed
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._started = False

    def checkpoint_name(self, generation: int) -> str:
        return f"{self.name}@{generation}"

    # -- transactions --------------------------------------------------------------------

    async def _in_transaction(self, body: Callable[[Any, bool], Awaitable[T]]) -> T:
        cm = self.transaction()
        if hasattr(cm, "__aenter__"):
            async with cm as conn:  # type: ignore[union-attr]
                _check_connection(conn, cm)
                with bind_connection(conn):
                    return await body(conn, True)
        if not hasattr(cm, "__enter__"):
            raise ConfigurationError(
                f"transaction() must return a context manager, got {type(cm).__qualname__}"
            )
        with cm as conn:
            _check_connection(conn, cm)
            with bind_connection(conn):
                return await body(conn, False)

    async def _save(
        self, conn: Any, is_async: bool, name: str, position: int, expected: int
    ) -> None:
        if is_async:
            await self.checkpoints.save_async(conn, name, position, expected)
        else:
            self.checkpoints.save(conn, name, position, expected)

    async def _activate(self, conn: Any, is_async: bool, generation: int) -> None:
        await _maybe(self.projection.activate(conn, generation))
        if is_async:
            await self.checkpoints.activate_async(conn, self.name, generation)
        else:
            self.checkpoints.activate(conn, self.name, generation)

    # -- following -----------------------------------------------------------------------

    async def start(self) -> None:
        """Find the active generation and its checkpoint; set up and activate generation 1
        the first time the projection runs."""
        active = await self.checkpoints.active(self.name)
        if active == 0:

            async def first(conn: Any, is_async: bool) -> None:
                await _maybe(self.projection.setup(conn, 1))
                await self._activate(conn, is_async, 1)

            await self._in_transaction(first)
            active = 1
        await self._switch(active)
        self._started = True

    async def _switch(self, generation: int) -> None:
        self.generation = generation
        self.position = self._read_from = await self.checkpoints.load(
            self.checkpoint_name(generation)
        )

    async def step(self) -> int:
        """Apply the next batch (one transaction); returns how many events were read (0:
        caught up)."""
        if not self._started:
            await self.start()
        async with self._lock:
            active = await self.checkpoints.active(self.name)
            if active != self.generation:  # another process rebuilt: follow the new model
                log.info("projection %s: generation %d is now active", self.name, active)
                await self._switch(active)
            head = await self.log.store.head()
            records = await self.log.store.read_all(self._read_from, self.batch_size, self.types)
            if not records:
                self._read_from = max(self._read_from, head)
                return 0
            try:
                applied = await self._apply(self.generation, records, self.position)
            except ConcurrencyError as e:
                log.warning("projection %s: %s; going on from its checkpoint", self.name, e)
                await self._switch(self.generation)
                return len(records)
            self.position = self._read_from = records[applied - 1].position
            if applied == len(records) < self.batch_size:
                self._read_from = max(self._read_from, head)
            return applied

    async def _apply(
        self,
        generation: int,
        records: Sequence[RecordedEvent],
        expected: int,
        then: Callable[[Any, bool], Awaitable[None]] | None = None,
    ) -> int:
        """Apply ``records`` (and ``then``) in one transaction with the checkpoint; returns
        how many were applied. Decoding comes first: an event that does not decode ends the
        batch before it (``then`` is not run), and fails the next batch at once."""
        decoded: list[StoredEvent[Any]] = []
        for r in records:
            try:
                decoded.append(self.log.decode(r))
            except DecodeError:
                if not decoded:
                    raise
                then = None  # the swap of a rebuild waits for the whole of its last batch
                break

        async def body(conn: Any, is_async: bool) -> None:
            projection = self.projection
            if type(projection).apply is not Projection.apply:  # apply of its own: call it
                for stored in decoded:
                    await projection.apply(ProjectionContext(conn, generation, stored))
            else:
                # Projection.apply inline: a sync handler is called with no coroutine
                # made per event (a few microseconds of the catch-up's ~12 per event)
                resolve, new, context = projection._resolve, tuple.__new__, ProjectionContext
                seen: Any = None
                fn: Any = None
                fn_async = False
                for stored in decoded:
                    message = stored[0][0]  # stored.envelope.message
                    if type(message) is not seen:  # (a run of one type: one look-up)
                        seen = type(message)
                        fn, fn_async = resolve(message)
                    if fn is None:
                        continue
                    result = fn(new(context, (conn, generation, stored)), message)
                    if fn_async or (result is not None and hasattr(result, "__await__")):
                        await result
            if decoded:
                await self._save(
                    conn, is_async, self.checkpoint_name(generation), decoded[-1].position, expected
                )
            if then is not None:
                await then(conn, is_async)

        await self._in_transaction(body)
        return len(decoded)

    async def catch_up(self) -> int:
        """Apply every event readable now; returns how many were applied."""
        total = 0
        while True:
            n = await self.step()
            total += n
            if n < self.batch_size:
                return total

    async def run(self) -> None:
        """Follow the event store until :meth:`stop`: apply batches, wait for new events
        (woken by the store), retry a failed batch after ``backoff``. A ConfigurationError
        (e.g. a ``transaction()`` that yields no connection) is raised, not retried."""
        self._stopping.clear()
        failures = 0
        while not self._stopping.is_set():
            try:
                n = await self.step()
            except (asyncio.CancelledError, ConfigurationError):
                raise  # wiring that no retry can fix: stop here, loudly
            except Exception as e:
                failures += 1
                self.last_error = e
                delay = self.backoff(failures)
                log.error(
                    "projection %s: batch after position %d failed (%d in a row), retrying "
                    "in %.2f s: %s",
                    self.name,
                    self.position,
                    failures,
                    delay,
                    e,
                )
                await self._wait(self.clock.sleep(delay))
                continue
            failures = 0
            self.last_error = None
            if n < self.batch_size:
                await self._wait(self.log.store.wait_for_events(self._read_from, self.max_wait))

    async def _wait(self, aw: Awaitable[None]) -> None:
        waiting = asyncio.ensure_future(aw)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in (waiting, stopping):
                f.cancel()

    async def stop(self) -> None:
        """Make :meth:`run` return after its current batch."""
        self._stopping.set()

    # -- lag -----------------------------------------------------------------------------

    async def lag(self) -> Lag:
        """Readable events after this runner's position, and the oldest one's age."""
        backlog = await self.log.store.backlog(self._read_from)
        if backlog.oldest_recorded_at is None:
            return Lag(backlog.events, 0.0)
        age = (self.clock.now() - backlog.oldest_recorded_at).total_seconds()
        return Lag(backlog.events, max(0.0, age))

    # -- rebuild -------------------------------------------------------------------------

    async def rebuild(self, *, drop_old: bool = False) -> int:
        """Build a new generation of the read model from position 0 beside the active one,
        then, in one transaction that also applies the last events, make it the active one
        (readers see the whole old model, then the whole new one). The live runner in
        this process pauses only for that last transaction; runners in other processes
        switch at their next batch. Returns the new generation; with ``drop_old`` the old
        one is dropped afterwards."""
        if not self._started:
            await self.start()
        old = self.generation
        new = max(old, await self.checkpoints.active(self.name)) + 1
        name = self.checkpoint_name(new)
        stale = await self.checkpoints.load(name)  # left by an earlier failed rebuild

        async def fresh(conn: Any, is_async: bool) -> None:
            await _maybe(self.projection.setup(conn, new))
            if stale:
                await self._save(conn, is_async, name, 0, stale)

        await self._in_transaction(fresh)
        position = 0
        store = self.log.store
        while True:
            records = await store.read_all(position, self.batch_size, self.types)
            if len(records) < self.batch_size:
                break  # near the head: finish under the lock
            position = records[await self._apply(new, records, position) - 1].position

        async def swap(conn: Any, is_async: bool) -> None:
            await self._activate(conn, is_async, new)

        async with self._lock:
            while True:
                head = await store.head()
                records = await store.read_all(position, self.batch_size, self.types)
                if not records:
                    await self._in_transaction(swap)
                    break
                last = len(records) < self.batch_size
                applied = await self._apply(new, records, position, then=swap if last else None)
                position = records[applied - 1].position
                if last and applied == len(records):
                    break
            self.generation, self.position = new, position
            self._read_from = max(position, head)
        log.info("projection %s: generation %d rebuilt and active", self.name, new)
        if drop_old and old:

            async def drop(conn: Any, is_async: bool) -> None:
                await _maybe(self.projection.drop(conn, old))

            await self._in_transaction(drop)
        return new

    # -- following a bus topic -----------------------------------------------------------

    def bus_handler(self) -> Callable[[Message], Awaitable[None]]:
        """An event-bus handler that applies each delivered event to the active
        generation, for a projection fed by a topic instead of the event store. Subscribe it
        behind :meth:`msdata.outbox.Inbox.middleware` (it opens the transaction and records
        the message id in it, so a redelivery is applied once): see :meth:`follow_bus`. No
        checkpoint is kept (the inbox is the record); ``ctx.stored.position`` is 0."""

        async def handle(event: Message) -> None:
            envelope = current_envelope()
            if envelope is None:
                raise ConfigurationError("bus_handler() runs inside an event bus delivery")
            if not self._started:
                await self.start()
            stored: StoredEvent[Any] = StoredEvent(
                envelope, 0, envelope.partition_key or "", 0, envelope.time
            )
            await self.projection.apply(
                ProjectionContext(current_connection(), self.generation, stored)
            )

        return handle

    def follow_bus(
        self, bus: EventBus, *, group: str, inbox: Inbox, transaction: TransactionFactory
    ) -> None:
        """Subscribe the projection to its event types on ``bus`` as consumer ``group``,
        each delivery applied in ``transaction()`` with the inbox record (exactly once)."""
        handler = self.bus_handler()
        middleware = [inbox.middleware(group, transaction)]
        for event_type in self.projection.event_classes():
            bus.subscribe(event_type, handler, group=group, middleware=middleware)


async def _maybe(result: Awaitable[None] | None) -> None:
    if result is not None:
        await result


def _check_connection(conn: Any, cm: Any) -> None:
    if conn is None:
        raise ConfigurationError(
            f"transaction() gave a context manager ({type(cm).__qualname__}) that yields "
            "None: it must yield the connection of the open transaction (asyncpg's "
            "conn.transaction() yields None; wrap it: see docs/projections.md)"
        )
