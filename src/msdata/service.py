"""The service runtime: one object that owns a service's database transactions, its stores,
its bus, its outbox relay, its consumers and its background workers, and runs them.

::

    service = Service("billing", db="sqlite:///billing.db", broker="memory://")

    @service.on(OrderPlaced)                       # consumer group "billing", via the inbox
    async def charge(event: OrderPlaced) -> None:
        current_connection().execute("INSERT INTO charges ...")   # the handler's transaction
        await service.publish(PaymentCharged(order_id=event.order_id), key=event.order_id)

    service.run()                                  # until SIGTERM / SIGINT

See docs/service.md for the whole API and the choices behind it.

Start order: schemas -> transport (groups declared) -> outbox relay -> consumers ->
workers (projection runners, saga recovery, yours). Stop: the reverse, each part given at most
``stop_timeout`` seconds; a part that fails to stop is logged and the others still stop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple, Self, TypeVar

from msdata.clock import SYSTEM_CLOCK, Clock
from msdata.cqrs import CommandBus, QueryBus
from msdata.errors import ConfigurationError, HandlerAlreadyRegistered, PublishError
from msdata.events import EventBus
from msdata.events.bus import STOP_GRACE
from msdata.eventstore import EventLog
from msdata.idempotency import IdempotencyKeys
from msdata.ids import new_id
from msdata.inbox import Inbox
from msdata.messages import Command, Envelope, Event, Message, MessageRegistry, Query
from msdata.middleware import Middleware
from msdata.outbox import Outbox, OutboxRelay
from msdata.projections import Projection, ProjectionRunner
from msdata.saga import Saga, SagaOrchestrator, SagaParticipant, SagaReply
from msdata.storage import DEFAULT_TABLE_PREFIX, bind_connection, current_connection
from msdata.transport import (
    DEAD_LETTER_ATTEMPTS,
    DEAD_LETTER_GROUP,
    DEAD_LETTER_READER,
    DEAD_LETTER_REASON,
    DEAD_LETTER_TOPIC,
    REPLAY_HEADER,
    Delivery,
    Transport,
    TransportMessage,
    check_name,
    dead_letter_topic,
)
from msdata.urls import DATABASES, redact_url, store_backend, store_from_url, transport_from_url

__all__ = ["DeadLetterInfo", "Service", "read_dead_letters"]

log = logging.getLogger("msdata.service")

E = TypeVar("E", bound=Event)
H = TypeVar("H", bound=Callable[..., Any])

# the service whose transaction this task is in (a nested transaction() would deadlock)
_in_transaction: ContextVar[Service | None] = ContextVar("msdata_service_tx", default=None)


def _backend(url: str) -> str:
    backend = store_backend(url)
    if backend not in DATABASES:
        raise ConfigurationError(
            f"no database for {redact_url(url)!r}: use sqlite:///path.db, postgresql://… "
            "or memory://"
        )
    assert backend is not None
    return backend


# -- the in-process broker: memory:// URLs name one MemoryTransport per process ------------

_memory_brokers: dict[str, tuple[Transport, int]] = {}


def _open_memory_broker(url: str) -> Transport:
    transport, users = _memory_brokers.get(url, (None, 0))
    if transport is None:
        transport = transport_from_url("memory://")
    _memory_brokers[url] = (transport, users + 1)
    return transport


async def _close_memory_broker(url: str) -> None:
    transport, users = _memory_brokers[url]
    if users > 1:
        _memory_brokers[url] = (transport, users - 1)
        return
    del _memory_brokers[url]
    await transport.close()


# -- dead letters --------------------------------------------------------------------------


class DeadLetterInfo(NamedTuple):
    """One message on a dead-letter topic ``dlq`` (``topic.group.dlq``): its id and key,
    where it came from, how many attempts it had (``None`` if the header is missing or not
    a number), why it is there, and its body (the CloudEvents JSON, as text; a body that is
    not UTF-8 shows U+FFFD in ``body`` and comes whole, base64, in ``body_base64``)."""

    dlq: str
    id: str
    key: str | None
    topic: str
    group: str
    attempts: int | None
    reason: str | None
    body: str
    body_base64: str | None = None


def _attempts(header: str | None) -> int | None:
    try:
        return int(header) if header is not None else None
    except ValueError:
        return None


def _text_and_base64(body: bytes) -> tuple[str, str | None]:
    try:
        return body.decode("utf-8"), None
    except UnicodeDecodeError:
        return body.decode("utf-8", "replace"), base64.b64encode(body).decode("ascii")


async def read_dead_letters(
    transport: Transport,
    pairs: Iterable[tuple[str, str]],
    *,
    limit: int = 100,
    replay: bool = False,
    reader: str = DEAD_LETTER_READER,
) -> list[DeadLetterInfo]:
    """The dead letters of each (topic, group) in ``pairs``, up to ``limit`` per pair, read
    as consumer group ``reader`` of ``topic.group.dlq``. Without ``replay`` they stay there
    (nacked); with it each is published back to its original topic (same id and key, the
    ``x-msdata-*`` dead-letter headers dropped, :data:`msdata.transport.REPLAY_HEADER` set
    to a new token so that no broker drops it as a duplicate of its first publish) and,
    once the publish is confirmed, acked by ``reader``, so the next read does not list it
    (other groups of the dead-letter topic keep it). A publish that fails raises
    :class:`~msdata.errors.PublishError` and leaves the letter there. Every
    group of the topic receives a replayed message again: an inbox skips it where it was
    applied already.

    Reading moves nothing: every dead letter the reader is handed is held unsettled until
    the pair is read (so the next receive hands out the next one, not the same one again)
    and then given back (nacked), whatever it is: a transport hands a consumer of a
    dead-letter topic every entry, whatever its size, and one that cannot be published back
    (over the transport's ``max_message_bytes``) fails the replay with
    :class:`~msdata.errors.PublishError` naming it, and stays (the others are replayed
    first: the error is raised at the end, ``refused`` naming each letter that stayed; a
    publish that failed as a whole, the broker unreachable, raises at once). Where the
    transport holds no more unsettled for one consumer (its ``max_held_bytes``), what is
    held is given back and the read goes on. At most ``limit`` per pair.

    One read at a time per ``reader``: since a read holds what it read until it ends, two
    reads of one dead-letter topic at the same moment (two processes, or this and
    ``msdata dlq``) split its letters between them; each lists or replays only the ones it
    got (nothing is lost or replayed twice).

    The default ``reader`` (:data:`msdata.transport.DEAD_LETTER_READER`) is the same
    unordered group whatever the transport's mode. Another ``reader`` is a group like any
    other: on a transport that keeps order per key with a bound on what a key partition has
    in flight (NATS ``ordered=True``), it lists at most one letter per key partition when
    not replaying (the others stay, none is lost; a replay moves them all)."""
    out: list[DeadLetterInfo] = []
    failed: dict[str, str] = {}  # id -> why the broker refused its replay
    for topic, group in pairs:
        dlq_topic = dead_letter_topic(topic, group)
        # a high max_attempts: reading must never dead-letter a dead letter; a prefetch of
        # the limit: the reader holds what it read until the end
        async with transport.subscribe(
            dlq_topic, reader, max_attempts=1_000_000, prefetch=max(1, limit)
        ) as sub:
            seen: set[str] = set()
            held: dict[Delivery, None] = {}
            try:
                while len(seen) < limit:
                    batch = await sub.receive(min(100, limit - len(seen)), timeout=0.5)
                    fresh: list[Delivery] = []
                    for d in batch:
                        if d.message.id in seen:
                            await d.nack()  # seen already: it came round again
                        else:
                            seen.add(d.message.id)
                            fresh.append(d)
                            held[d] = None
                    if not fresh:
                        if not held:
                            break
                        # stalled holding what it read (a transport that holds only so
                        # much unsettled for one consumer: RabbitMQ's prefetch from
                        # max_held_bytes): give those back and read on
                        for d in held:
                            with contextlib.suppress(Exception):
                                await d.nack()
                        held.clear()
                        continue
                    for d in fresh:
                        m = d.message
                        h = dict(m.headers)
                        original = h.get(DEAD_LETTER_TOPIC, topic)
                        out.append(
                            DeadLetterInfo(
                                dlq_topic,
                                m.id,
                                m.key,
                                original,
                                h.get(DEAD_LETTER_GROUP, group),
                                _attempts(h.get(DEAD_LETTER_ATTEMPTS)),
                                h.get(DEAD_LETTER_REASON),
                                *_text_and_base64(m.body),
                            )
                        )
                        if replay:
                            clean = {k: v for k, v in h.items() if not k.startswith("x-msdata-")}
                            # a token of this replay's own: a broker that drops a second
                            # publish of an id (NATS, inside its duplicate window) must not
                            # drop this one
                            clean[REPLAY_HEADER] = new_id()
                            try:
                                await transport.publish(
                                    original,
                                    [
                                        TransportMessage(
                                            id=m.id, body=m.body, key=m.key, headers=clean
                                        )
                                    ],
                                )
                            except PublishError as e:
                                if m.id not in e.refused:
                                    raise  # the broker, not this letter: stop here
                                # refused on its own (too large): it stays, the rest go on
                                failed[m.id] = e.refused[m.id]
                                continue
                            # only once the publish was confirmed (it raises otherwise): removed
                            await d.ack()
                            del held[d]
            finally:
                # what was read and not replayed goes back where it was, as it was
                for d in held:
                    with contextlib.suppress(Exception):
                        await d.nack()
    if failed:
        raise PublishError(
            f"{len(failed)} dead letter(s) could not be replayed and stay where they are: "
            + "; ".join(f"{i}: {why}" for i, why in failed.items()),
            refused=failed,
        )
    return out


# -- health --------------------------------------------------------------------------------


@dataclass
class _ConsumerStats:
    handled: int = 0
    failed: int = 0
    last_error: str | None = None


async def _leaving(step: Callable[[], Awaitable[Any]]) -> BaseException | None:
    """Run a stop step; return the SystemExit, KeyboardInterrupt or other BaseException
    but CancelledError it raised (the bus raises what a handler raised), so that it is not
    raised in the task ``wait_for`` runs it in (asyncio would raise it out of the loop)."""
    try:
        await step()
    except (Exception, asyncio.CancelledError):
        raise
    except BaseException as e:
        return e
    return None


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class Service:
    """A service's runtime. Build it from URLs (or objects), register handlers, run it.

    ``name``: the service's name: the ``source`` of the events it publishes, and the
    consumer group of its event handlers (so 1-40 of ``[A-Za-z0-9_-]``).

    ``db``: the service's own database, ``sqlite:///path.db`` (default
    ``sqlite:///<name>.db``), ``postgresql://user@host/db`` or ``memory://``. The service
    opens its transactions there (:meth:`transaction`) and keeps its stores there (outbox,
    inbox, event store, checkpoints, sagas), each made from the URL on first use by
    :func:`msdata.urls.store_from_url` with ``table_prefix`` (and ``schema`` for
    PostgreSQL). ``stores`` replaces any of them by port name (``{"outbox": store}``): a
    given store is the caller's and is not closed here.

    ``broker``: a transport URL (``memory://``, ``redis://…``, ``amqp://…``, ``nats://…``)
    or a :class:`msdata.transport.Transport` object (the caller's: not closed here).
    ``memory://`` (or ``memory://<name>``) is one in-process broker per URL, shared by the
    services of this process and closed when the last of them stops.

    ``transaction``: replaces the service's transaction factory (an async context manager
    factory yielding a connection with an open transaction); ``pool_size``: the PostgreSQL
    pool's maximum size; ``relay``: run an outbox relay in this process (default True);
    ``stop_timeout``: seconds each part gets to stop; ``bus_options`` / ``relay_options`` /
    ``saga_options``: keyword arguments for :class:`EventBus` / :class:`OutboxRelay` /
    :class:`msdata.saga.SagaOrchestrator`; ``clock``: given to the relay, the projection
    runners, the saga orchestrator and the idempotency keys (a ``FakeClock`` in tests).

    Raises :class:`ConfigurationError` for a bad name or URL (never showing credentials).
    """

    def __init__(
        self,
        name: str,
        *,
        db: str | None = None,
        broker: str | Transport = "memory://",
        stores: Mapping[str, Any] | None = None,
        transaction: Callable[[], contextlib.AbstractAsyncContextManager[Any]] | None = None,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        schema: str | None = None,
        pool_size: int = 10,
        relay: bool = True,
        create_schema: bool = True,
        stop_timeout: float = 10.0,
        registry: MessageRegistry | None = None,
        middleware: tuple[Middleware, ...] = (),
        bus_options: Mapping[str, Any] | None = None,
        relay_options: Mapping[str, Any] | None = None,
        saga_options: Mapping[str, Any] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        try:
            self.name = check_name("group", name)
        except ConfigurationError as e:
            # the name is the consumer group of its handlers, hence the group's rule
            raise ConfigurationError(str(e).replace("group name", "service name", 1)) from None
        self.db = db if db is not None else f"sqlite:///{name}.db"
        self.backend = _backend(self.db)
        self.table_prefix = table_prefix
        self.schema = schema
        self.stop_timeout = stop_timeout
        self.clock = clock
        self.create_schema = create_schema
        self._given_stores = dict(stores or {})
        self._stores: dict[str, Any] = dict(self._given_stores)
        self._needed: set[str] = {"outbox"}
        self._state = "new"
        # transactions
        self._transactions: Any = None
        if transaction is not None:
            self._factory: Callable[[], contextlib.AbstractAsyncContextManager[Any]] = transaction
        else:
            if self.backend == "sqlite":
                from msdata.adapters.sqlite.transactions import SqliteTransactions

                self._transactions = SqliteTransactions.from_url(self.db)
            elif self.backend == "postgresql":
                from msdata.adapters.postgres.transactions import PostgresTransactions

                self._transactions = PostgresTransactions(self.db, pool_size, schema)
            else:
                from msdata.adapters.memory.transactions import MemoryTransactions

                self._transactions = MemoryTransactions()
            self._factory = self._transactions
        # broker
        self.broker_url: str | None = None
        if isinstance(broker, str):
            self.broker_url = broker
            if broker.split("://", 1)[0].lower() == "memory":
                self.transport = _open_memory_broker(broker)
            else:
                self.transport = transport_from_url(broker)
        else:
            self.transport = broker
        self.bus = EventBus(
            self.transport,
            source=name,
            registry=registry,
            middleware=middleware,
            **{"stop_timeout": stop_timeout, **dict(bus_options or {})},
        )
        self.registry = self.bus.registry
        self.outbox = Outbox(self.store("outbox"), registry=self.registry, source=name)
        self.relay: OutboxRelay | None = (
            OutboxRelay(
                self.store("outbox"),
                self.transport,
                codec=self.bus.codec,
                **{"stop_timeout": stop_timeout, "clock": clock, **dict(relay_options or {})},
            )
            if relay
            else None
        )
        self.commands = CommandBus(registry=registry, source=name)
        self.queries = QueryBus(registry=registry, source=name)
        self._inbox: Inbox | None = None
        self._idempotency: IdempotencyKeys | None = None
        self._orchestrator: SagaOrchestrator | None = None
        self._participant: SagaParticipant | None = None
        self._saga_options = dict(saga_options or {})
        self._event_log: EventLog | None = None
        #: projections by name, with their runners
        self.projections: dict[str, ProjectionRunner] = {}
        self._followers: dict[str, asyncio.Task[None]] = {}
        self._bus_fed: set[str] = set()
        self._stats: dict[str, _ConsumerStats] = {}
        self._subscriptions: list[tuple[str, str]] = []
        self._workers: list[tuple[str, Callable[[], Awaitable[None]], Callable[[], Any]]] = []
        self._stop_steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = []
        self._closed = False
        self._stop_requested: asyncio.Event | None = None

    # -- stores and transactions ---------------------------------------------------------

    def store(self, port: str) -> Any:
        """The service's store for ``port`` (``outbox``, ``inbox``, ``eventstore``,
        ``checkpoints``, ``saga``, ``idempotency``), made from ``db`` on first use; its
        schema is created at start, so a store first asked for after start raises
        ConfigurationError (unless ``create_schema=False``)."""
        if port not in self._stores:
            if self._state != "new" and self.create_schema:
                raise ConfigurationError(
                    f"service {self.name!r}: use the {port} store (or what needs it: "
                    "events, inbox, projections) before the service starts, so that start() "
                    "creates its tables"
                )
            options: dict[str, Any] = {}
            if self.backend != "memory":
                options["table_prefix"] = self.table_prefix
            if self.backend == "postgresql" and self.schema is not None:
                options["schema"] = self.schema
            self._stores[port] = store_from_url(port, self.db, **options)
        self._needed.add(port)
        return self._stores[port]

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """``async with service.transaction() as conn:`` one transaction on the service's
        database: commits on normal exit, rolls back on an exception; inside it,
        :func:`msdata.storage.current_connection` is ``conn`` and :meth:`publish` adds to the
        outbox in it. ``conn`` is a ``sqlite3.Connection`` (SQLite), an asyncpg connection
        (PostgreSQL) or a ``MemoryTransaction``. A transaction opened inside another of the
        same service in the same task raises ConfigurationError (it would wait for itself).
        """
        return self._transaction()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Any]:
        if _in_transaction.get() is self:
            raise ConfigurationError(
                f"service {self.name!r}: a transaction is already open in this task; use "
                "current_connection() instead of opening another"
            )
        token = _in_transaction.set(self)
        try:
            async with self._factory() as conn:
                with bind_connection(conn):
                    yield conn
        finally:
            _in_transaction.reset(token)

    async def publish(
        self,
        messages: Message | Envelope[Any] | list[Message],
        *,
        key: str | None = None,
        topic: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> list[Envelope[Any]]:
        """Add ``messages`` to the outbox in the open transaction (a handler's, or
        :meth:`transaction`'s); the relay publishes them after the commit. ``key``: the
        partition key (order is kept per key). ConfigurationError outside a transaction."""
        try:
            conn = current_connection()
        except ConfigurationError:
            raise ConfigurationError(
                f"service {self.name}: publish() needs an open transaction: call it inside "
                "`async with service.transaction():` or in one of the service's handlers"
            ) from None
        return await self.outbox.add_async(conn, messages, key=key, topic=topic, headers=headers)

    @property
    def inbox(self) -> Inbox:
        """The service's inbox (its store made on first use)."""
        if self._inbox is None:
            self._inbox = Inbox(self.store("inbox"))
        return self._inbox

    @property
    def idempotency(self) -> IdempotencyKeys:
        """Idempotency keys on the service's database (store made on first use; its table
        created at start): ``await service.idempotency.run(key, operation, request=…)``,
        or the ASGI middleware ``IdempotencyMiddleware(app, keys=service.idempotency,
        owner=…)``."""
        if self._idempotency is None:
            self._idempotency = IdempotencyKeys(self.store("idempotency"), clock=self.clock)
        return self._idempotency

    @property
    def events(self) -> EventLog:
        """The service's event store, as an :class:`msdata.eventstore.EventLog` whose
        appends also go to the outbox (so an appended event is published)."""
        if self._event_log is None:
            self._event_log = EventLog(
                self.store("eventstore"),
                registry=self.registry,
                source=self.name,
                outbox=self.outbox,
            )
        return self._event_log

    # -- registering -----------------------------------------------------------------------

    def _check_not_started(self, what: str) -> None:
        if self._state != "new":
            raise ConfigurationError(f"register {what} before the service starts")

    def subscribe(
        self,
        event_type: type[E],
        handler: Callable[[E], Any],
        *,
        group: str | None = None,
        topic: str | None = None,
    ) -> None:
        """Run ``handler`` (sync or async, taking the event) once per ``event_type`` event,
        in a transaction of the service's database with the inbox record (exactly-once
        effects; :func:`current_connection` and :meth:`publish` work inside it). Consumer
        group: the service's name, unless ``group`` is given; a second handler for the same
        event type in one group raises HandlerAlreadyRegistered (give it its own
        ``group``)."""
        self._check_not_started("handlers")
        group = check_name("group", group or self.name)
        stats = self._stats.setdefault(group, _ConsumerStats())

        async def track(envelope: Envelope[Any], call_next: Any) -> Any:
            try:
                result = await call_next(envelope)
            except asyncio.CancelledError:
                raise  # the bus stopping: not a failure (a handler's own one is counted below)
            except BaseException as e:  # SystemExit & co. too: the bus stops on them
                stats.failed += 1
                stats.last_error = _describe(e)
                raise
            stats.handled += 1
            return result

        try:
            self.bus.subscribe(
                event_type,
                handler,
                group=group,
                topic=topic,
                middleware=[track, self.inbox.middleware(group, self._transaction)],
            )
        except HandlerAlreadyRegistered as e:
            raise HandlerAlreadyRegistered(
                f"{e}: give the second handler its own group=… (each group gets every event)"
            ) from None
        entry = (topic or self.bus.topic_of(event_type), group)
        if entry not in self._subscriptions:
            self._subscriptions.append(entry)

    def on(
        self, event_type: type[E], *, group: str | None = None, topic: str | None = None
    ) -> Callable[[H], H]:
        """Decorator form of :meth:`subscribe`."""

        def decorate(fn: H) -> H:
            self.subscribe(event_type, fn, group=group, topic=topic)
            return fn

        return decorate

    def command(self, command_type: type[Command]) -> Callable[[H], H]:
        """Register the one handler of an in-process command; :meth:`send` runs it in a
        transaction of the service's database (its writes and :meth:`publish` commit
        together) and returns its result; its error reaches the caller, rolled back."""

        def decorate(fn: H) -> H:
            async def in_transaction(cmd: Any) -> Any:
                async with self._transaction():
                    result = fn(cmd)
                    if inspect.isawaitable(result):
                        result = await result
                    return result

            self.commands.register(command_type, in_transaction)
            return fn

        return decorate

    async def send(self, command: Command) -> Any:
        """Run ``command``'s handler (see :meth:`command`); returns its result."""
        return await self.commands.send(command)

    def query(self, query_type: type[Query[Any]]) -> Callable[[H], H]:
        """Register the one handler of a query (no transaction is opened); see :meth:`ask`."""

        def decorate(fn: H) -> H:
            self.queries.register(query_type, fn)
            return fn

        return decorate

    async def ask(self, query: Query[Any]) -> Any:
        """Run ``query``'s handler; returns its result."""
        return await self.queries.ask(query)

    @property
    def sagas(self) -> SagaOrchestrator:
        """The service's saga orchestrator on its database (made on first use, before the
        service starts): its state, the commands of remote steps (through the outbox) and
        its recovery worker (run while the service runs). Replies come back on
        ``<service>.saga-replies``. Operator calls: ``find``, ``get``, ``history``,
        ``stuck``, ``retry``, ``abort`` (or ``msdata sagas``)."""
        if self._orchestrator is None:
            self._check_not_started("sagas")
            self._know_saga_replies()
            self._orchestrator = SagaOrchestrator(
                self.store("saga"),
                bus=self.bus,
                outbox=self.outbox,
                **{"clock": self.clock, **self._saga_options},
            )
            group = self._saga_options.get("reply_group", "saga-orchestrator")
            self._subscriptions.append((self._orchestrator.reply_topic, group))
        return self._orchestrator

    def _know_saga_replies(self) -> None:
        # a service with a registry of its own still reads and writes saga replies
        if not self.registry.is_registered(SagaReply):
            from msdata.messages import default_registry

            self.registry.register(SagaReply, *default_registry.name_of(SagaReply))

    def saga(self, saga: Saga[Any]) -> Saga[Any]:
        """Register ``saga`` with :attr:`sagas`; returns it. Start instances with
        ``await service.sagas.start(saga, data)`` (or ``run`` to wait for the end)."""
        self.sagas.register(saga)
        return saga

    def step(
        self, command_type: type[Command], *, group: str | None = None, topic: str | None = None
    ) -> Callable[[H], H]:
        """Serve a saga command (the participant side of a remote step): the handler runs
        once per step invocation in a transaction of the service's database (the step's
        idempotency key and its reply stored in the service's idempotency store, so a
        repeated command gets the same reply), and its return value (a pydantic model, a
        dict or None) is replied through the outbox in the same transaction; raising
        :class:`msdata.errors.SagaStepFailed` replies a failure. Consumer group: the
        service's name unless ``group`` is given."""
        self._check_not_started("saga steps")
        if self._participant is None:
            self._know_saga_replies()
            self._participant = SagaParticipant(
                self.bus,
                self.outbox,
                self._transaction,
                idempotency=self.store("idempotency"),
                clock=self.clock,
            )
        participant = self._participant
        g = check_name("group", group or self.name)

        def decorate(fn: H) -> H:
            participant.subscribe(command_type, fn, group=g, topic=topic)
            entry = (topic or self.registry.name_of(command_type)[0], g)
            if entry not in self._subscriptions:
                self._subscriptions.append(entry)
            return fn

        return decorate

    def projection(
        self, projection: Projection, *, from_bus: bool = False, group: str | None = None
    ) -> ProjectionRunner:
        """Keep ``projection``'s read model in the service's database. By default it
        follows the service's own event store (:attr:`events`) with a checkpoint; with
        ``from_bus=True`` it is fed by its event types on the bus, as consumer ``group``
        (default ``<service>-<projection name>``), through the inbox. Returns its runner
        (also in :attr:`projections`, by name; ``msdata projections`` finds it there)."""
        self._check_not_started("projections")
        if projection.name in self.projections:
            raise HandlerAlreadyRegistered(f"projection {projection.name!r} is registered")
        runner = ProjectionRunner(
            projection,
            self.events
            if not from_bus
            else EventLog(self.store("eventstore"), registry=self.registry, source=self.name),
            self.store("checkpoints"),
            self._transaction,
            clock=self.clock,
        )
        if from_bus:
            g = check_name("group", group or f"{self.name}-{projection.name}")
            runner.follow_bus(self.bus, group=g, inbox=self.inbox, transaction=self._transaction)
            for event_type in projection.event_classes():
                entry = (self.bus.topic_of(event_type), g)
                if entry not in self._subscriptions:
                    self._subscriptions.append(entry)
            self._bus_fed.add(projection.name)
        self.projections[projection.name] = runner
        return runner

    def worker(
        self, name: str, run: Callable[[], Awaitable[None]], stop: Callable[[], Any]
    ) -> None:
        """Run ``run()`` as a background task once the consumers are up; at stop, call
        ``stop()`` (sync or async) and wait for ``run()`` to return (cancelled after
        ``stop_timeout``). Health reports it running or its error."""
        self._check_not_started("workers")
        self._workers.append((name, run, stop))

    # -- running ----------------------------------------------------------------------------

    @property
    def subscriptions(self) -> list[tuple[str, str]]:
        """Each (topic, consumer group) the service consumes: its handlers', its
        projections' and its sagas'. Dead letters of one are on ``topic.group.dlq``."""
        return list(self._subscriptions)

    async def dead_letters(self, *, limit: int = 100) -> list[DeadLetterInfo]:
        """The dead letters of every group the service consumes (see
        :attr:`subscriptions`), at most ``limit`` (default 100) per group, left where they
        are; ``[]`` when there are none. Read as :data:`msdata.transport.DEAD_LETTER_READER`
        (see :func:`read_dead_letters`)."""
        return await read_dead_letters(self.transport, self._subscriptions, limit=limit)

    async def replay_dead_letters(self, *, limit: int = 1000) -> list[DeadLetterInfo]:
        """Publish the dead letters of every group the service consumes back to their
        topics, at most ``limit`` (default 1000) per group, and settle them for the
        dead-letter reader, so the next read does not list them (other groups of a
        dead-letter topic keep them; see :func:`read_dead_letters`, which gives the errors
        raised)."""
        return await read_dead_letters(
            self.transport, self._subscriptions, limit=limit, replay=True
        )

    @property
    def running(self) -> bool:
        return self._state == "running"

    async def start(self) -> None:
        """Start every part in order: schemas, transport groups, relay, consumers,
        workers. If a part fails to start, the parts already started are stopped and the
        error is raised."""
        if self._state == "running":
            return
        if self._state != "new":
            raise ConfigurationError(f"service {self.name!r} was stopped; make a new one")
        self._state = "starting"
        self._stop_steps = []
        try:
            if self.create_schema:
                for port in sorted(self._needed):
                    await self._stores[port].create_schema()
            for topic, group in self._subscriptions:
                await self.transport.declare_group(topic, group)
            if self.relay is not None:
                await self.relay.start()
                self._stop_steps.append(("outbox relay", self.relay.stop))
            await self.bus.start()
            self._stop_steps.append(("consumers", self.bus.stop))
            for name, runner in self.projections.items():
                await runner.start()  # its generation is known (and set up) once start returns
                if name not in self._bus_fed:
                    self._start_worker(f"projection {name}", runner.run, runner.stop)
            if self._orchestrator is not None:
                self._start_worker("saga recovery", self._orchestrator.run_recovery, None)
                self._stop_steps.append(("sagas", self._orchestrator.close))
            for name, run, stop in self._workers:
                self._start_worker(name, run, stop)
        except BaseException:
            await self.stop()
            raise
        self._state = "running"
        log.info("service %s started", self.name)

    def _start_worker(
        self, name: str, run: Callable[[], Awaitable[None]], stop: Callable[[], Any] | None
    ) -> None:
        async def body() -> None:
            await run()

        task = asyncio.create_task(body(), name=f"msdata-{self.name}-{name}")
        self._followers[name] = task

        async def halt() -> None:
            if stop is None:  # runs until cancelled
                task.cancel()
                await asyncio.wait({task})
                return
            result = stop()
            if inspect.isawaitable(result):
                await result
            done, _ = await asyncio.wait({task}, timeout=self.stop_timeout)
            if not done:
                task.cancel()
                await asyncio.wait({task})

        self._stop_steps.append((name, halt))

    async def stop(self) -> None:
        """Stop every started part in reverse order (each bounded by ``stop_timeout``),
        then close what the service opened: its stores, pool and transport. Idempotent.
        A part that fails to stop is logged; the others still stop."""
        if self._closed:
            return
        self._state = "stopping"
        # what a handler raised that is not an Exception (SystemExit, KeyboardInterrupt):
        # the bus's stop raises it; the rest still stops and closes, then it is raised
        fatal: BaseException | None = None
        while self._stop_steps:
            what, step = self._stop_steps.pop()
            try:
                # the bus's own bound is stop_timeout + STOP_GRACE (its cancelled handlers
                # unwinding): a second more before this gives up on a part
                raised = await asyncio.wait_for(
                    _leaving(step), self.stop_timeout + STOP_GRACE + 1.0
                )
            except Exception:
                log.exception("service %s: stopping the %s failed", self.name, what)
            else:
                fatal = fatal or raised
        for port, store in self._stores.items():
            if port in self._given_stores:
                continue
            try:
                await store.close()
            except Exception:
                log.exception("service %s: closing the %s store failed", self.name, port)
        if self._transactions is not None:
            await self._transactions.close()
        if self.broker_url is not None:
            try:
                if self.broker_url.split("://", 1)[0].lower() == "memory":
                    await _close_memory_broker(self.broker_url)
                else:
                    await self.transport.close()
            except Exception:
                log.exception("service %s: closing the transport failed", self.name)
        self._closed = True
        self._state = "stopped"
        log.info("service %s stopped", self.name)
        if fatal is not None:
            raise fatal

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def request_stop(self) -> None:
        """Make :meth:`serve` return (what SIGTERM and SIGINT do)."""
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def serve(self) -> None:
        """Start, run until SIGTERM or SIGINT (or :meth:`request_stop`), stop. Signal
        handlers are installed when this runs in the main thread."""
        loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop)
                installed.append(sig)
            except (RuntimeError, ValueError, NotImplementedError):
                pass  # not the main thread, or no signals here
        try:
            async with self:
                log.info("service %s serving (pid %d)", self.name, os.getpid())
                await self._stop_requested.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    def run(self) -> None:
        """Run the service in a new event loop until SIGTERM or SIGINT; returns after a
        clean stop (so the process exits 0)."""
        asyncio.run(self.serve())

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """An ASGI lifespan (``FastAPI(lifespan=service.lifespan)``): the service runs
        while the app does."""
        async with self:
            yield

    # -- health --------------------------------------------------------------------------

    def fed_by_bus(self, name: str) -> bool:
        """Whether projection ``name`` follows the bus (``projection(..., from_bus=True)``):
        it keeps no events of its own, so it cannot be rebuilt from position 0."""
        return name in self._bus_fed

    async def health(self) -> dict[str, Any]:
        """The state of each part, for a health endpoint (JSON-ready)::

            {"service": "orders",
             "status": "ok" | "degraded" | "starting" | "stopping" | "stopped",
             "relay": {"running": true, "pending": 0, "lag_seconds": null, "parked": 0,
                       "error": null},
             "consumers": {"running": true, "subscriptions": ["OrderPlaced/billing"],
                           "groups": {"billing": {"handled": 3, "failed": 0,
                                                  "last_error": null}}},
             "workers": {"projection order-summary": {"running": true, "error": null,
                         "lag_events": 0, "lag_seconds": 0.0}}}

        ``status`` is ``degraded`` when a part that should run does not (the relay or a
        consumer or worker stopped, the outbox store cannot be read) or a worker's last
        batch failed; ``starting`` and ``stopping`` while :meth:`start` or :meth:`stop` runs
        (also a stop that a handler's :class:`SystemExit` or other ``BaseException``
        began: the group's ``last_error`` says so); ``stopped`` before start and after
        stop. Only ``ok`` means serving. ``relay.lag_seconds``: age
        of the oldest unpublished outbox row (null when none). ``parked``: rows the relay
        gave up on (see ``msdata outbox parked``)."""
        degraded = False
        running = self._state == "running"
        relay: dict[str, Any] = {"running": False}
        if self.relay is not None:
            relay["running"] = self.relay.running
            degraded |= running and not self.relay.running
            try:
                st = await self.relay.status()
                relay.update(
                    pending=st.pending,
                    lag_seconds=st.oldest_pending_age,
                    parked=st.parked,
                    error=None,
                )
            except Exception as e:
                relay["error"] = _describe(e)
                degraded = True
        consumers_running = running and all(alive for _, _, alive in self.bus.consumers())
        degraded |= running and not consumers_running
        consumers = {
            "running": consumers_running,
            "subscriptions": [f"{t}/{g}" for t, g in self._subscriptions],
            "groups": {
                g: {"handled": s.handled, "failed": s.failed, "last_error": s.last_error}
                for g, s in self._stats.items()
            },
        }
        workers: dict[str, Any] = {}
        for name, task in self._followers.items():
            w: dict[str, Any] = {"running": not task.done(), "error": None}
            if task.done() and not task.cancelled() and task.exception() is not None:
                w["error"] = _describe(task.exception())  # type: ignore[arg-type]
            degraded |= running and task.done()
            workers[name] = w
        for name, runner in self.projections.items():
            key = f"projection {name}"
            w = workers.setdefault(key, {"running": running, "error": None})
            if runner.last_error is not None:
                w["error"] = _describe(runner.last_error)
                degraded = True
            if name not in self._bus_fed:
                try:
                    lag = await runner.lag()
                    w.update(lag_events=lag.events, lag_seconds=lag.seconds)
                except Exception as e:
                    w["error"] = _describe(e)
                    degraded = True
        if self._state in ("new", "stopped"):
            status = "stopped"
        elif self._state != "running":
            status = self._state  # starting, stopping: not ok, whatever the parts say yet
        else:
            status = "degraded" if degraded else "ok"
        return {
            "service": self.name,
            "status": status,
            "relay": relay,
            "consumers": consumers,
            "workers": workers,
        }
