"""The event bus: typed events published to a transport and handled by consumer groups.

::

    bus = EventBus(MemoryTransport(), source="orders")

    @bus.handler(OrderPlaced, group="billing")
    async def bill(event: OrderPlaced) -> None:
        ...

    async with bus:                       # starts one consumer per (topic, group)
        await bus.publish(OrderPlaced(order_id="o-1"), key="o-1")

An event's topic is its registered type name unless given. Each group receives each event;
consumers of one group compete. Inside a consumer, a delivery is:

- acked after its handler returned;
- nacked (redelivered after a backoff, then dead-lettered after ``max_attempts``) when the
  handler raised;
- dead-lettered at once, with the reason, when it cannot be decoded (not JSON, not a
  CloudEvent, unknown type, failed validation, too large) or the handler raised
  :class:`msdata.errors.RejectMessage`;
- acked and skipped when it decodes to a registered type that the group has no handler for.

A failing handler affects only its own group: an ``Exception`` it raises does not stop the
consumer loop. A handler raising a ``BaseException`` that is not an ``Exception``
(``SystemExit``, ``KeyboardInterrupt``, ``GeneratorExit``, one's own) asks to leave, as
PEP 352 means them, so the bus neither swallows it as a failure nor dies silently: it is
logged at ERROR with its traceback, handler, group, topic and message id; the delivery is
nacked, its attempt counted (redelivered after the backoff, dead-lettered on its last
attempt: a message that makes the process exit each time does not crash-loop it for
ever), the rest of the consumer's batch given back uncounted; the consumer stops; the task
that started the bus is cancelled and :meth:`EventBus.stop` (so ``async with bus``) raises
that very exception, as ``asyncio.TaskGroup`` does with ``SystemExit`` and
``KeyboardInterrupt``. Stopping
lets each consumer finish the delivery it is handling (up to ``stop_timeout``, then it is
cancelled: see :meth:`EventBus.stop`); what it received but did not start on, and the
delivery of a handler cancelled at the timeout, is given back uncounted
(``Delivery.release``), so stopping, however many consumers stop and however often, does
not push a message towards ``max_attempts``. Only a handler that ignores its cancellation
is left behind, its delivery unacked and redelivered as its next attempt (logged at ERROR).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, NamedTuple, NoReturn, Self, TypeVar

from msdata import deadletter, telemetry
from msdata.backoff import Backoff, exponential_backoff
from msdata.errors import (
    ConfigurationError,
    HandlerAlreadyRegistered,
    InvalidHeader,
    RejectMessage,
    TransportClosed,
)
from msdata.ids import new_id_time, new_ids
from msdata.messages import (
    NO_HEADERS,
    Envelope,
    Event,
    LocalParent,
    MessageRegistry,
    build_envelope,
    check_message,
    current_envelope,
    current_parent,
    default_registry,
)
from msdata.middleware import Middleware, Next, compose
from msdata.serialization import CloudEventsCodec
from msdata.telemetry import ConsumeScope, Telemetry
from msdata.transport import (
    CheckedMessage,
    Delivery,
    Subscription,
    Transport,
    TransportMessage,
    check_name,
)

__all__ = ["EventBus"]

log = logging.getLogger("msdata.events")

E = TypeVar("E", bound=Event)
_tuple_new: Any = tuple.__new__
_now = datetime.now
H = TypeVar("H", bound=Callable[..., Any])


def _name_of(handler: Callable[..., Any]) -> str:
    module = getattr(handler, "__module__", None)
    name = getattr(handler, "__qualname__", None) or type(handler).__qualname__
    return f"{module}.{name}" if module else name


class _Sent(TransportMessage):
    """A message this process's bus encoded, carrying what decoding it needs beyond its
    bytes (``sent``: the envelope's attributes but the message, and where the data starts
    in the body): a transport that hands the same object back (the in-memory one) lets the
    consumer validate only the data (:meth:`CloudEventsCodec.decode_sent`). Any other
    transport sees a TransportMessage."""

    sent: tuple[tuple[Any, ...], int]


class _CheckedSent(CheckedMessage):
    """A :class:`_Sent` of an envelope as the bus built it (no headers, its own new id, a
    key checked when the envelope was made): the transport need not check it again."""

    sent: tuple[tuple[Any, ...], int]


class _Route(NamedTuple):
    handler: Callable[[Any], Any]
    is_async: bool
    chain: Next | None  # None when there is no middleware: call the handler directly


class _ConsumerStops(Exception):
    """Ends a consumer whose handler raised a BaseException that is not an Exception
    (``error``), its delivery settled; ``reraise``: no task runs the bus for
    :meth:`EventBus.stop` to raise it in, so the consumer task raises it itself."""

    def __init__(self, error: BaseException, reraise: bool) -> None:
        super().__init__(repr(error))
        self.error = error
        self.reraise = reraise


class _Halt:
    """Set once when the bus stops (one per run of the bus, so a consumer left behind by an
    earlier run never sees a later run's flag): read before each delivery, so a plain
    attribute rather than an asyncio.Event, whose ``is_set()`` is a Python call."""

    __slots__ = ("stopped",)

    def __init__(self) -> None:
        self.stopped = False


@dataclass
class _Consumer:
    topic: str
    group: str
    routes: dict[str, _Route] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


#: seconds :meth:`EventBus.stop` gives, after its timeout, to the handlers it cancelled to
#: unwind, give their deliveries back and close their subscriptions (three quarters), and to
#: closing the subscriptions of any that would not stop (the last quarter)
STOP_GRACE = 1.0

#: the bus's default redelivery delay: 0.1 s doubling per failure up to 30 s, equal jitter
#: (a random half of it taken off), so consumers failing together spread out
DEFAULT_BACKOFF: Backoff = exponential_backoff(base=0.1, factor=2.0, maximum=30.0, jitter=0.5)


class EventBus:
    """Publishes events through a :class:`msdata.transport.Transport` and runs the
    consumers of the handlers subscribed to them.

    ``backoff`` (a :data:`msdata.backoff.Backoff`) gives the seconds before a failed delivery
    is redelivered, from its attempt number (default :data:`DEFAULT_BACKOFF`); after
    ``max_attempts`` failures it goes to the dead-letter topic instead."""

    def __init__(
        self,
        transport: Transport,
        *,
        codec: CloudEventsCodec | None = None,
        registry: MessageRegistry | None = None,
        source: str = "msdata",
        middleware: Sequence[Middleware] = (),
        max_attempts: int = 5,
        backoff: Backoff = DEFAULT_BACKOFF,
        prefetch: int = 100,
        concurrency: int = 1,
        stop_timeout: float = 10.0,
    ) -> None:
        if not source:
            raise ConfigurationError("source must be a non-empty string")
        if max_attempts < 1 or prefetch < 1 or concurrency < 1:
            raise ConfigurationError("max_attempts, prefetch and concurrency must be >= 1")
        self.transport = transport
        self.registry = registry if registry is not None else default_registry
        self.codec = codec if codec is not None else CloudEventsCodec(self.registry)
        # msdata's own codec: what it encodes in this process, it decodes from the data alone
        self._own_codec = type(self.codec) is CloudEventsCodec
        self.source = source
        self._middleware = tuple(middleware)
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.prefetch = prefetch
        self.concurrency = concurrency
        self.stop_timeout = stop_timeout
        self._consumers: dict[tuple[str, str], _Consumer] = {}
        self._running = False
        self._halt: _Halt | None = None
        # per consumer task: its open subscription, and the delivery and handler in hand and
        # the batch it came in (a cell [delivery, handler, batch, at] made once per task,
        # delivery and handler None between deliveries; ``at`` None, or while the consumer
        # gives its batch back, [k]: batch[k:] is not given back yet)
        self._subscriptions: dict[asyncio.Task[Any], Subscription] = {}
        self._handling: dict[asyncio.Task[Any], list[Any]] = {}
        # the memory transport's synchronous publish of one of msdata's own messages
        # (False: not taken, publish it), None on any other transport
        put = getattr(type(transport), "_put_checked", None)
        self._put_checked: Callable[[str, TransportMessage], bool] | None = (
            put.__get__(transport) if put is not None else None
        )
        # consumer tasks that would not stop: they settle nothing any more
        self._abandoned: set[asyncio.Task[Any]] = set()
        # the task that started the bus, the SystemExit (or other BaseException not an
        # Exception) a handler raised for stop() to raise, and whether the owner was
        # cancelled for it
        self._owner: asyncio.Task[Any] | None = None
        self._fatal_error: BaseException | None = None
        self._owner_cancelled = False

    # -- wiring ------------------------------------------------------------------------------

    def topic_of(self, event_type: type[Event]) -> str:
        """The default topic of an event type: its registered type name."""
        return self.registry.name_of(event_type)[0]

    def subscribe(
        self,
        event_type: type[E],
        handler: Callable[[E], Any],
        *,
        group: str,
        topic: str | None = None,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        """Run ``handler`` (sync or async, taking the event) for every ``event_type`` event
        that reaches consumer group ``group``: the bus's middleware, then these."""
        if self._running:
            raise ConfigurationError("subscribe before the bus starts")
        type_name = self.registry.name_of(event_type)[0]
        topic = check_name("topic", topic or type_name)
        check_name("group", group)
        consumer = self._consumers.setdefault((topic, group), _Consumer(topic, group))
        if type_name in consumer.routes:
            raise HandlerAlreadyRegistered(
                f"group {group!r} already handles {type_name!r} on topic {topic!r}"
            )
        chain = (*self._middleware, *middleware)
        consumer.routes[type_name] = _Route(
            handler,
            inspect.iscoroutinefunction(handler),
            compose(handler, chain) if chain else None,
        )

    def handler(
        self,
        event_type: type[E],
        *,
        group: str,
        topic: str | None = None,
        middleware: Sequence[Middleware] = (),
    ) -> Callable[[H], H]:
        """Decorator form of :meth:`subscribe`."""

        def decorate(fn: H) -> H:
            self.subscribe(event_type, fn, group=group, topic=topic, middleware=middleware)
            return fn

        return decorate

    # -- publishing --------------------------------------------------------------------------

    def envelope(
        self,
        event: Event,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Envelope[Event]:
        """The envelope :meth:`publish` would send (correlation from the handled message).
        Raises :class:`~msdata.errors.NotAMessage` or
        :class:`~msdata.errors.RegistrationError` as :func:`msdata.messages.check_message`."""
        return self._envelope(event, key, headers, current_envelope())

    def _envelope(
        self,
        event: Event,
        key: str | None,
        headers: Mapping[str, str] | None,
        parent: Envelope[Any] | None,
    ) -> Envelope[Event]:
        # make_envelope without its keyword call and the checks the bus made once (source):
        # a registered class is a Message class, so finding it is the whole check
        named = self.registry._by_class.get(type(event))
        if named is None:
            named = check_message(event, self.registry)  # raises: the exact reason
        return build_envelope(event, named[0], named[1], key, headers, self.source, None, parent)

    async def publish(
        self,
        event: Event,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        topic: str | None = None,
    ) -> Envelope[Event]:
        """Publish one event; returns once the transport accepted it (brokers: confirmed)."""
        # _envelope inline, with the id and the time of one clock reading (and the time's
        # text, which the codec then writes as it is)
        named = self.registry._by_class.get(type(event))
        if named is None:
            named = check_message(event, self.registry)  # raises: the exact reason
        msg_id, now, when = new_id_time()
        parent = current_parent.get()  # current_envelope() inline
        if isinstance(parent, LocalParent):
            parent = parent.resolve()
        if key is None and not headers:
            # build_envelope inline for an event without key or headers
            built = _tuple_new(
                Envelope,
                (
                    event,
                    named[0],
                    named[1],
                    msg_id,
                    now,
                    self.source,
                    msg_id if parent is None else parent.correlation_id or parent.id,
                    None if parent is None else parent.id,
                    None,
                    NO_HEADERS,
                ),
            )
        else:
            built = build_envelope(
                event, named[0], named[1], key, headers, self.source, None, parent, msg_id, now
            )
        envelope: Envelope[Event] = built
        topic = topic or envelope.type
        hooks = telemetry.hooks
        if type(hooks) is not Telemetry:  # the no-op hooks are not called on this hot path
            envelope = hooks.message_created(topic, envelope, outbox=False)  # telemetry
        if envelope is built and not headers and self._own_codec:
            # _to_wire inline for what it would make of this envelope (no headers, a UTC
            # datetime): a _CheckedSent
            raw, at = self.codec.encode_at(envelope, when)
            message: _CheckedSent = _tuple_new(_CheckedSent, (msg_id, raw, key, NO_HEADERS))
            message.sent = (envelope[1:], at)
            put = self._put_checked
            if put is None or not put(topic, message):
                await self.transport.publish(topic, (message,))
        else:
            await self.transport.publish(
                topic,
                [
                    self._to_wire(envelope, when, True)
                    if envelope is built
                    else self._to_wire(envelope)
                ],
            )
        return envelope

    async def publish_many(
        self,
        events: Iterable[E],
        *,
        key: Callable[[E], str | None] | str | None = None,
        headers: Mapping[str, str] | None = None,
        topic: str | None = None,
    ) -> list[Envelope[Event]]:
        """Publish events as one batch per topic, all confirms in flight at once; ``key``:
        each event's partition key, as a function of the event, or one str for every event;
        ``headers`` go on every one. The events of one call share one ``time`` (the
        CloudEvents occurrence time: the time of the call); their ids, made together, still
        order them."""
        if isinstance(key, str):
            one_key = key
            key = lambda _event: one_key  # noqa: E731
        elif key is not None and not callable(key):
            raise InvalidHeader(
                f"key is a partition key (str) or a function of the event, got {type(key).__name__}"
            )
        batch_events = list(events)
        by_topic: dict[str, list[TransportMessage]] = {}
        out = []
        hooks = telemetry.hooks
        observe = type(hooks) is not Telemetry  # the no-op hooks are not called here
        parent = current_envelope()  # the handled message: the same for the whole batch
        wire = self._to_wire
        by_class = self.registry._by_class
        source = self.source
        now = _now(UTC)
        for event, msg_id in zip(batch_events, new_ids(len(batch_events)), strict=True):
            # as _envelope: a registered class is a Message class, so finding it is the check
            named = by_class.get(type(event))
            if named is None:
                named = check_message(event, self.registry)  # raises: the exact reason
            envelope: Envelope[Event] = build_envelope(
                event,
                named[0],
                named[1],
                key(event) if key else None,
                headers,
                source,
                None,
                parent,
                msg_id,
                now,
            )
            to = topic or envelope.type
            if observe:
                created = hooks.message_created(to, envelope, outbox=False)  # telemetry
                message = wire(created, None, created is envelope)
                envelope = created
            else:
                message = wire(envelope, None, True)
            out.append(envelope)
            batch = by_topic.get(to)
            if batch is None:
                batch = by_topic[to] = []
            batch.append(message)
        for t, batch in by_topic.items():
            await self.transport.publish(t, batch)
        return out

    def _to_wire(
        self, envelope: Envelope[Any], when: str | None = None, built: bool = False
    ) -> TransportMessage:
        """The message of ``envelope``; ``when``: its time's JSON text if known (see
        :meth:`CloudEventsCodec.encode_at`); ``built``: the envelope is as this bus built
        it (a new id, a key checked: the message passes ``check_message`` as it is)."""
        # tuple.__new__: the NamedTuple without its Python __new__ frame (once per message)
        if not self._own_codec:
            return _tuple_new(  # type: ignore[no-any-return]
                TransportMessage,
                (
                    envelope.id,
                    self.codec.encode(envelope),
                    envelope.partition_key,
                    envelope.headers,
                ),
            )
        raw, at = self.codec.encode_at(envelope, when)
        time = envelope.time
        if envelope.headers or time.tzinfo is not UTC or type(time) is not datetime:
            # decode_sent takes none of these: a plain message
            return _tuple_new(  # type: ignore[no-any-return]
                TransportMessage, (envelope.id, raw, envelope.partition_key, envelope.headers)
            )
        message: _Sent | _CheckedSent = _tuple_new(
            _CheckedSent if built else _Sent,
            (envelope.id, raw, envelope.partition_key, envelope.headers),
        )
        message.sent = (envelope[1:], at)
        return message

    def _decode(self, message: TransportMessage) -> Envelope[Any]:
        """The envelope of a delivered message (the data alone validated, when this
        process's bus encoded it and the transport handed back the same object)."""
        if (type(message) is _CheckedSent or type(message) is _Sent) and self._own_codec:
            sent, at = message.sent
            return self.codec.decode_sent(message.body, sent, at)
        return self.codec.decode(message.body)

    # -- consuming ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Declare every group and start its consumers. Returns once all are subscribed."""
        if self._running:
            return
        self._running = True
        self._halt = _Halt()
        self._owner = asyncio.current_task()
        self._fatal_error = None
        self._owner_cancelled = False
        ready: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()
        for consumer in self._consumers.values():
            for n in range(self.concurrency):
                fut: asyncio.Future[None] = loop.create_future()
                ready.append(fut)
                consumer.tasks.append(
                    asyncio.create_task(
                        self._consume(consumer, fut),
                        name=f"msdata-consumer:{consumer.topic}:{consumer.group}:{n}",
                    )
                )
        try:
            await asyncio.gather(*ready)
        except BaseException:
            await self.stop()
            raise

    async def stop(self, timeout: float | None = None) -> None:
        """Stop consuming. Returns within ``timeout`` (default ``stop_timeout``) plus
        :data:`STOP_GRACE` seconds, whatever the handlers do.

        Each consumer finishes the delivery in hand while it can, for ``timeout`` seconds;
        then the consumers still busy are cancelled. A handler cancelled that way has its
        delivery given back uncounted (``Delivery.release``), as the deliveries not started
        on, so stopping never counts an attempt nor dead-letters. The cancelled consumers
        get three quarters of :data:`STOP_GRACE` to unwind, give back what they hold and
        close their subscriptions. A handler that does not stop even then (it caught
        :class:`asyncio.CancelledError` and went on) is logged at ERROR with its name and
        message id, and left behind: in the last quarter the rest of its batch is given
        back uncounted and its subscription closed, so its delivery alone stays unacked and
        is redelivered as its next attempt, and whatever the handler returns later settles
        nothing.

        Raises, once stopped, the ``SystemExit``, ``KeyboardInterrupt`` or other
        BaseException that is not an Exception a handler raised (the first one), which
        stopped its consumer and cancelled the task that started the bus (that cancel is
        undone here: see the module docstring)."""
        if not self._running:
            return
        assert self._halt is not None
        self._halt.stopped = True
        limit = max(self.stop_timeout if timeout is None else timeout, 0.0)
        tasks = [t for c in self._consumers.values() for t in c.tasks]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=limit)
            for t in pending:
                t.cancel()
            if pending:
                _, pending = await asyncio.wait(pending, timeout=STOP_GRACE * 3 / 4)
            for t in pending:
                self._abandon(t)
            if pending:
                # release what the stuck consumers hold: the deliveries of their batches
                # behind the one in hand are given back (uncounted, while their subscriptions
                # are open), then their subscriptions close
                closing = [
                    asyncio.ensure_future(self._give_back_and_close(t, self._subscriptions.pop(t)))
                    for t in pending
                    if t in self._subscriptions
                ]
                if closing:
                    _, still = await asyncio.wait(closing, timeout=STOP_GRACE / 4)
                    for closer in still:
                        closer.cancel()
        for c in self._consumers.values():
            c.tasks.clear()
        self._running = False
        fatal, self._fatal_error = self._fatal_error, None
        owner, self._owner = self._owner, None
        if fatal is not None:
            if self._owner_cancelled and owner is not None and not owner.done():
                owner.uncancel()  # the cancel was ours: what it meant is raised here
            self._owner_cancelled = False
            raise fatal

    async def _give_back_and_close(self, task: asyncio.Task[Any], sub: Subscription) -> None:
        """For a consumer ``task`` left behind: give back the deliveries of its batch it has
        not started on (behind the one in hand), then close its subscription ``sub``."""
        hand = self._handling.get(task)
        if hand is not None and hand[3] is not None:
            # it was giving its batch back: what it had not given back yet, in case its
            # release is what hangs (giving one back twice does nothing)
            await self._release(hand[2][hand[3][0] :])
        elif hand is not None and hand[0] is not None:
            batch, in_hand = hand[2], hand[0]
            for j, d in enumerate(batch):
                if d is in_hand:
                    await self._release(batch[j + 1 :])
                    break
        await sub.__aexit__(None, None, None)

    def consumers(self) -> list[tuple[str, str, bool]]:
        """Each (topic, group) this bus consumes, and whether all its consumer tasks are
        alive (False before ``start``, after ``stop``, or when one ended on its own)."""
        return [
            (c.topic, c.group, bool(c.tasks) and not any(t.done() for t in c.tasks))
            for c in self._consumers.values()
        ]

    def _abandon(self, task: asyncio.Task[None]) -> None:
        """A consumer task that would not stop: log it and make sure it settles nothing."""
        self._abandoned.add(task)
        task.add_done_callback(self._abandoned.discard)
        handling = self._handling.get(task)
        if handling is None or handling[0] is None:
            log.error(
                "consumer task %s would not stop (no handler running: giving back or closing "
                "its subscription took over %.2f s); left behind",
                task.get_name(),
                STOP_GRACE * 3 / 4,
            )
            return
        delivery, handler = handling[0], _name_of(handling[1])
        log.error(
            "handler %s would not stop (group %s, topic %s, message %s, attempt %d): left "
            "behind; its delivery stays unacked and will be redelivered",
            handler,
            delivery.group,
            delivery.topic,
            delivery.message.id,
            delivery.attempt,
        )

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

    async def _consume(self, consumer: _Consumer, ready: asyncio.Future[None]) -> None:
        halt = self._halt
        assert halt is not None
        task = asyncio.current_task()
        # the delivery and handler in hand, and its batch, for _abandon and stop
        hand: list[Any] = [None, None, (), None]
        if task is not None:
            self._handling[task] = hand
        try:
            await self._consume_until_stopped(consumer, ready, halt, task, hand)
        finally:
            if task is not None:
                self._handling.pop(task, None)

    async def _consume_until_stopped(
        self,
        consumer: _Consumer,
        ready: asyncio.Future[None],
        halt: _Halt,
        task: asyncio.Task[Any] | None,
        hand: list[Any],
    ) -> None:
        handle = self._handle
        decode = self.codec.decode
        decode_sent = self.codec.decode_sent if self._own_codec else None
        routes = consumer.routes
        max_attempts = self.max_attempts
        abandoned = self._abandoned
        while not halt.stopped:
            try:
                sub: Subscription = self.transport.subscribe(
                    consumer.topic,
                    consumer.group,
                    max_attempts=self.max_attempts,
                    prefetch=self.prefetch,
                )
                # the memory transport's synchronous ack (one coroutine less per message)
                ack_now: Callable[[Delivery], None] | None = getattr(type(sub), "_ack_now", None)
                async with sub:
                    if task is not None:
                        self._subscriptions[task] = sub
                    try:
                        if not ready.done():
                            ready.set_result(None)
                        while not halt.stopped:
                            batch = await sub.receive(self.prefetch, timeout=0.25)
                            hand[2], hand[3] = batch, None
                            hooks = telemetry.hooks
                            received = (
                                None  # the no-op hooks are not called
                                if type(hooks) is Telemetry or not batch
                                else hooks.receiving(consumer.topic, consumer.group, batch)
                            )
                            i = 0
                            try:
                                for i, delivery in enumerate(batch):
                                    if halt.stopped:
                                        # not started on: given back uncounted, so stopping
                                        # consumers never push a message towards max_attempts
                                        # (by stop() already if it left this consumer behind).
                                        # One after the other, ``left`` moved past each: if
                                        # stop() cancels this meanwhile (its timeout ran out
                                        # while giving back), the rest, from the one whose
                                        # release was cut short, is given back below.
                                        if task not in abandoned:
                                            left = hand[3] = [i]
                                            try:
                                                await self._release(batch, left)
                                            finally:
                                                i = left[0]
                                        i = len(batch)
                                        break
                                    # The common case inline, as _handle would do it (this runs
                                    # once per message): a delivery within its attempts that
                                    # decodes, to an async handler without middleware. Anything
                                    # else goes to _handle.
                                    if delivery.attempt > max_attempts:
                                        await handle(consumer, delivery, task, hand)
                                        continue
                                    message = delivery.message
                                    try:
                                        if (
                                            type(message) is _CheckedSent or type(message) is _Sent
                                        ) and decode_sent is not None:
                                            sent, at = message.sent
                                            envelope = decode_sent(message.body, sent, at)
                                        else:
                                            envelope = decode(message.body)
                                    except Exception:
                                        await handle(consumer, delivery, task, hand)  # dead letter
                                        continue
                                    route = routes.get(envelope.type)
                                    if (
                                        route is None
                                        or route.chain is not None
                                        or not route.is_async
                                    ):
                                        await handle(consumer, delivery, task, hand, envelope)
                                        continue
                                    token = current_parent.set(envelope)
                                    hand[0] = delivery  # named only if it will not stop
                                    hand[1] = route.handler
                                    hooks = telemetry.hooks
                                    seen = (
                                        None  # the no-op hooks are not called
                                        if type(hooks) is Telemetry
                                        else hooks.consume(
                                            consumer.topic,
                                            consumer.group,
                                            delivery,
                                            envelope,
                                            route.handler,
                                        )
                                    )
                                    try:
                                        await route.handler(envelope.message)
                                    except (Exception, asyncio.CancelledError) as e:
                                        await self._failed(
                                            consumer, delivery, envelope, e, task, seen
                                        )
                                        continue
                                    except BaseException as e:  # SystemExit, ...: raises
                                        await self._fatal(
                                            consumer, delivery, envelope, e, task, seen
                                        )
                                    finally:
                                        current_parent.reset(token)
                                        if seen is not None:
                                            seen.close()  # telemetry
                                        hand[0] = hand[1] = None
                                    if task in abandoned:
                                        continue  # stop() gave up on this handler: released
                                    try:
                                        if ack_now is not None:
                                            ack_now(delivery)
                                        else:
                                            await delivery.ack()
                                    except asyncio.CancelledError:
                                        raise
                                    except Exception:
                                        log.exception(
                                            "acking a delivery failed; it will be redelivered"
                                        )
                            except _ConsumerStops:
                                # a handler raised SystemExit or the like: its delivery is
                                # settled, the rest of the batch goes back uncounted
                                if task not in abandoned:
                                    left = hand[3] = [i + 1]
                                    await self._release(batch, left)
                                raise
                            except asyncio.CancelledError:
                                # stopped mid-batch: what it holds unsettled, from the
                                # delivery in hand or the first not yet given back, goes
                                # back uncounted (one given back already: that does nothing)
                                if task not in abandoned:
                                    left = hand[3] = [i]
                                    await self._release(batch, left)
                                raise
                            finally:
                                if received is not None:
                                    received.close()  # telemetry
                    finally:
                        if task is not None:
                            self._subscriptions.pop(task, None)
            except asyncio.CancelledError:
                if not ready.done():
                    ready.cancel()
                raise
            except _ConsumerStops as stops:
                if stops.reraise:  # no task runs the bus to raise it in: raise it here
                    raise stops.error from None
                return
            except Exception as e:
                if self._is_abandoned():
                    return
                if not ready.done():  # could not even subscribe: start() reports it
                    ready.set_exception(e)
                    return
                if isinstance(e, TransportClosed):
                    log.error(
                        "consumer %s/%s stops: the transport was closed",
                        consumer.topic,
                        consumer.group,
                    )
                    return
                # a broker hiccup: the unsettled deliveries are redelivered; subscribe again
                log.exception("consumer %s/%s failed; restarting", consumer.topic, consumer.group)
                await asyncio.sleep(0.5)

    async def _handle(
        self,
        consumer: _Consumer,
        delivery: Delivery,
        task: asyncio.Task[Any] | None,
        hand: list[Any],
        envelope: Envelope[Any] | None = None,
    ) -> None:
        """One delivery, in the consumer's own ``task`` (looked up once per consumer, not
        per delivery: ``asyncio.current_task()`` is a measurable part of the hot path);
        ``hand`` is the task's cell for the delivery and handler in hand; ``envelope`` the
        delivery decoded, if the caller did that already. The consumer loop does the common
        case itself, as this does it."""
        if delivery.attempt > self.max_attempts:
            # handed out again and again without being settled (its consumers died)
            reason = deadletter.overdue_reason(delivery.attempt, self.max_attempts)
            await self._settle(delivery.dead_letter(reason or "overdue"))
            return
        if envelope is None:
            try:
                envelope = self._decode(delivery.message)
            except Exception as e:  # DecodeError, or anything a user validator raised
                await self._settle(delivery.dead_letter(f"{type(e).__name__}: {e}"))
                return
        route = consumer.routes.get(envelope.type)
        if route is None:
            # a registered type this group does not handle: not its business
            await self._settle(delivery.ack())
            return
        token = current_parent.set(envelope)
        hand[0] = delivery  # named only if it will not stop
        hand[1] = route.handler
        hooks = telemetry.hooks
        seen = (
            None  # the no-op hooks are not called
            if type(hooks) is Telemetry
            else hooks.consume(consumer.topic, consumer.group, delivery, envelope, route.handler)
        )
        try:
            if route.chain is not None:
                await route.chain(envelope)
            elif route.is_async:
                await route.handler(envelope.message)
            else:
                result = route.handler(envelope.message)
                if inspect.isawaitable(result):  # e.g. an object with async __call__
                    await result
        except (Exception, asyncio.CancelledError) as e:
            await self._failed(consumer, delivery, envelope, e, task, seen)
            return
        except BaseException as e:  # SystemExit, KeyboardInterrupt, ...: raises
            await self._fatal(consumer, delivery, envelope, e, task, seen)
        finally:
            current_parent.reset(token)
            if seen is not None:
                seen.close()  # telemetry
            hand[0] = hand[1] = None
        if task in self._abandoned:
            return  # stop() gave up on this handler: its delivery was released
        try:
            await delivery.ack()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("acking a delivery failed; it will be redelivered")

    async def _failed(
        self,
        consumer: _Consumer,
        delivery: Delivery,
        envelope: Envelope[Any],
        e: BaseException,
        task: asyncio.Task[Any] | None,
        seen: ConsumeScope | None,
    ) -> None:
        """The handler raised ``e`` (an Exception or CancelledError): dead-letter the
        delivery for a :class:`RejectMessage`; when the consumer itself is being cancelled
        (the bus stops), give it back uncounted (``Delivery.release``) and raise
        CancelledError; else nack it (the transport dead-letters it after
        ``max_attempts``). ``seen`` is the telemetry scope, if any."""
        if isinstance(e, RejectMessage):
            if seen is not None:
                seen.failed(e, "dead_letter")  # telemetry
            with deadletter.handler_failure(envelope.type, e):
                await self._settle(delivery.dead_letter(f"RejectMessage: {e}"))
            return
        if task is not None and task.cancelling():
            # the consumer itself is being stopped (stop() cancelled it): not the message's
            # doing, so the delivery is given back uncounted, as what it did not start on
            if seen is not None:
                seen.failed(e, "cancelled")  # telemetry
            if task in self._abandoned:
                return  # stop() gave up on this handler: its subscription was closed
            if not isinstance(e, asyncio.CancelledError):
                log.warning(
                    "handler for %s %s in group %s failed as it was cancelled by the bus "
                    "stopping (attempt %d of %d; given back, not counted): %r",
                    envelope.type,
                    envelope.id,
                    consumer.group,
                    delivery.attempt,
                    self.max_attempts,
                    e,
                )
            hand = self._handling.get(task)
            if hand is not None:
                hand[0] = hand[1] = None  # the handler stopped: if giving back lags, say so
                # giving back from here on: if that hangs, stop() gives back the rest
                for k, d in enumerate(hand[2]):
                    if d is delivery:
                        hand[3] = [k]
                        break
            await self._release((delivery,))
            if isinstance(e, asyncio.CancelledError):
                raise e
            raise asyncio.CancelledError from e  # honour the cancellation it turned into e
        exhausted = deadletter.exhausted(delivery.attempt, self.max_attempts)
        if seen is not None:
            seen.failed(e, "dead_letter" if exhausted else "nack")  # telemetry
        if task in self._abandoned:
            return  # stop() gave up on this handler: its delivery was released
        reason = f"{type(e).__name__}: {e}"
        if exhausted:
            # the transport dead-letters it and logs that once, with this traceback
            with deadletter.handler_failure(envelope.type, e):
                await self._settle(delivery.nack(reason=reason))
            return
        log.warning(
            "handler for %s %s in group %s failed (attempt %d of %d): %r",
            envelope.type,
            envelope.id,
            consumer.group,
            delivery.attempt,
            self.max_attempts,
            e,
        )
        await self._settle(delivery.nack(delay=self.backoff(delivery.attempt), reason=reason))

    async def _fatal(
        self,
        consumer: _Consumer,
        delivery: Delivery,
        envelope: Envelope[Any],
        e: BaseException,
        task: asyncio.Task[Any] | None,
        seen: ConsumeScope | None,
    ) -> NoReturn:
        """The handler raised ``e``, a BaseException that is not an Exception nor
        CancelledError (SystemExit, KeyboardInterrupt, GeneratorExit, a class of one's own):
        not a failure of the message to retry and go on, but a request to leave. Log it at
        ERROR with its traceback; settle the delivery as a failure (nacked, this attempt
        counted: redelivered after the backoff, dead-lettered on its last attempt), or, when
        the bus is stopping and cancelled this consumer, give it back uncounted; keep ``e``
        for :meth:`stop` to raise and cancel the task that started the bus, so that its
        ``async with`` ends with ``e``; end this consumer (raises :class:`_ConsumerStops`, or
        CancelledError when the consumer is being cancelled)."""
        hand = self._handling.get(task) if task is not None else None
        handler = hand[1] if hand is not None and hand[1] is not None else None
        cancelled = task is not None and task.cancelling() > 0
        exhausted = deadletter.exhausted(delivery.attempt, self.max_attempts)
        if cancelled:
            fate = "given back uncounted (the bus is stopping)"
        elif exhausted:
            fate = "dead-lettered (its last attempt)"
        else:
            fate = "nacked: redelivered after the backoff, this attempt counted"
        log.error(
            "handler %s raised %s, not an Exception (group %s, topic %s, message %s, type %s, "
            "attempt %d of %d): the consumer stops and the bus raises it where it runs; "
            "the delivery is %s",
            _name_of(handler) if handler is not None else "?",
            type(e).__name__,
            consumer.group,
            consumer.topic,
            envelope.id,
            envelope.type,
            delivery.attempt,
            self.max_attempts,
            fate,
            exc_info=e,
        )
        reraise = self._raise_in_owner(e)
        if seen is not None:
            seen.failed(
                e, "cancelled" if cancelled else ("dead_letter" if exhausted else "nack")
            )  # telemetry
        if task not in self._abandoned:
            if cancelled:
                if hand is not None:
                    hand[0] = hand[1] = None
                await self._release((delivery,))
            else:
                reason = f"{type(e).__name__}: {e}"
                with deadletter.handler_failure(envelope.type, e):
                    await self._settle(
                        delivery.nack(reason=reason)
                        if exhausted
                        else delivery.nack(delay=self.backoff(delivery.attempt), reason=reason)
                    )
        if cancelled:
            raise asyncio.CancelledError from e
        raise _ConsumerStops(e, reraise) from e

    def _raise_in_owner(self, e: BaseException) -> bool:
        """Keep ``e`` for :meth:`stop` to raise (the first one wins) and cancel the task
        that started the bus, unless it is stopping the bus already. False once ``e`` will
        be raised that way; True when no task runs the bus any more (the caller raises
        it)."""
        if self._fatal_error is None:
            self._fatal_error = e
        owner = self._owner
        if owner is None or owner.done():
            self._fatal_error = None if self._fatal_error is e else self._fatal_error
            return True
        halt = self._halt
        if halt is not None and not halt.stopped and not self._owner_cancelled:
            self._owner_cancelled = True
            owner.cancel(f"a handler raised {type(e).__name__}")
        return False

    @staticmethod
    async def _release(deliveries: Sequence[Delivery], at: list[int] | None = None) -> None:
        """Give back ``deliveries`` uncounted, or with ``at`` ([k]) ``deliveries[k:]``,
        moving ``at[0]`` past each once its release returned (or failed): when this is
        cancelled, ``deliveries[at[0]:]`` were not all given back, the one whose release
        was cut short first."""
        # one after the other (at once, they would take a connection each from a pool); one
        # that fails (connection lost) is redelivered, counted. One whose subscription
        # closed first is not a failure: stop() gave it back before closing it (a consumer
        # left behind), or the close did
        failed: list[Exception] = []
        todo = deliveries if at is None else deliveries[at[0] :]
        for d in todo:
            try:
                await d.release()
            except asyncio.CancelledError:
                raise
            except TransportClosed:
                log.debug("not giving back %s: its subscription closed already", d.message.id)
            except Exception as e:
                failed.append(e)
            if at is not None:
                at[0] += 1
        if failed:
            log.warning(
                "giving back %d of %d deliveries failed (they are redelivered): %r",
                len(failed),
                len(todo),
                failed[0],
            )

    def _is_abandoned(self) -> bool:
        return asyncio.current_task() in self._abandoned

    @staticmethod
    async def _settle(op: Any) -> None:
        # a settle that fails (connection lost) leaves the delivery to be redelivered
        try:
            await op
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("settling a delivery failed; it will be redelivered")
