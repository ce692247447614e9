"""The RabbitMQ transport (aio-pika on aiormq), for RabbitMQ 3.10 and later, no plugins.

Topology, all durable and declared by the adapter:

- a ``fanout`` exchange per topic, named as the topic, declared with an *alternate
  exchange* ``<topic>:unrouted`` and a holding queue of the same name: a message published
  while the topic has no group at all lands there instead of being dropped, and the first
  group declared on the topic moves it into its own queue (so a dead-letter topic, too, keeps
  what it receives until read, as the port requires). A topic exchange declared by an older
  version without the alternate exchange must be deleted (or its messages drained) first:
  RabbitMQ refuses to redeclare an exchange with other arguments;
- a durable queue per consumer group, ``<topic>:<group>``, bound to it, declared by
  :meth:`RabbitMQTransport.declare_group` or by the first subscription of the group; messages
  are persistent. Classic queues by default; ``queue_type="quorum"`` for quorum queues, which
  count deliveries themselves (``x-delivery-count``). Classic is the default because on
  RabbitMQ 3.10 a quorum queue created moments before the node is SIGKILLed came back empty
  and leaderless in our restart test, while classic queues kept every confirmed message;
- for each group, its dead-letter topic :func:`~msdata.transport.dead_letter_topic` (an
  exchange like any topic);
- ``nack(delay > 0)`` goes through a per-delay retry queue ``<topic>:<group>:retry-<ms>ms``
  (``x-message-ttl`` = the delay, dead-lettering back to the group's queue through the
  default exchange, ``x-expires`` a minute after the delay so unused ones go away). One queue
  per delay rather than per-message TTL: RabbitMQ only expires messages at the head of a
  queue, so a long delay would hold back a short one behind it.

Publishing: one channel in confirm mode; a batch is written at once with every confirm in
flight, and ``publish`` returns when the broker confirmed them all. The message id travels in
the AMQP ``message_id`` property, the partition key in the ``x-msdata-key`` header, the
message's headers as AMQP headers.

Attempts: ``attempt = x-msdata-prior-attempts + deliveries + 1``. A nack republishes a copy
(to the back of the group's queue, or through a retry queue) that carries the attempts made
so far in ``x-msdata-prior-attempts``, confirmed before the original is acked. ``deliveries``
is ``x-delivery-count`` on quorum queues (which requeue on nack instead of republishing); on
classic queues the broker only flags a redelivery (a consumer that closed or died with the
message unsettled), which counts as one, however many times it happened.

Order per key (``RabbitMQTransport(..., ordered_per_key=True)``): the group's queue is declared
with ``x-single-active-consumer``, so one consumer of the group receives at a time and the
others stand by (taking over when it goes away; a classic queue puts what it hands back at its
original place); the adapter hands out at most one delivery per key at a time and retries a
nacked delivery itself (holding it, unacked, through the delay), ahead of the later messages
of its key. Within a group, order per key then holds, including redeliveries, but the group's
throughput is one consumer's. Without it (the default), the consumers of a group compete and
share the work, and nothing is promised about order. The consistent-hash exchange, which
could keep order while sharing the work, is a plugin, so it is not used.

Anything a foreign producer puts on the exchange is delivered: a missing message id becomes
``sha256:<hex of the body>``, header values of any AMQP type become strings, and the body is
passed as it is, so a consumer can dead-letter it with its reason.

Reconnects: the connection is an aio-pika *robust* connection; after it comes back, each
subscription re-declares its topology and consumes again by itself. Deliveries received before
the drop are void (the broker requeued them): acking one is a no-op, and it is delivered again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import deque
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Self

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from msdata import deadletter
from msdata.errors import (
    ConfigurationError,
    MsdataError,
    PublishError,
    TransportClosed,
    TransportError,
)
from msdata.transport import (
    ClosesOnExit,
    DeliveryState,
    DriverErrors,
    TransportFeatures,
    TransportMessage,
    check_name,
    dead_letter_topic,
)

__all__ = [
    "FEATURES",
    "KEY_HEADER",
    "ORDERED_FEATURES",
    "PRIOR_ATTEMPTS_HEADER",
    "RabbitMQDelivery",
    "RabbitMQSubscription",
    "RabbitMQTransport",
    "group_queue_name",
]

log = logging.getLogger(__name__)

FEATURES = TransportFeatures(
    durable=True, ordered_per_key=False, native_delay=True, replays_history=False
)
ORDERED_FEATURES = TransportFeatures(
    durable=True, ordered_per_key=True, native_delay=False, replays_history=False
)

#: the partition key travels in this AMQP header
KEY_HEADER = "x-msdata-key"
#: on a delayed retry's copy: how many attempts were made before it
PRIOR_ATTEMPTS_HEADER = "x-msdata-prior-attempts"
_DELIVERY_COUNT = "x-delivery-count"
# bookkeeping the broker adds; not the message's own headers
_BROKER_HEADERS = frozenset(
    {
        _DELIVERY_COUNT,
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)
_INTERNAL_HEADERS = _BROKER_HEADERS | {KEY_HEADER, PRIOR_ATTEMPTS_HEADER}
_PERSISTENT = 2
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
# an unused retry queue is deleted this long after its delay has run out
_RETRY_QUEUE_GRACE_MS = 60_000


def group_queue_name(topic: str, group: str) -> str:
    """The quorum queue of ``group`` on ``topic`` (':' cannot occur in topic or group names)."""
    return f"{topic}:{group}"


def _amqp_errors(what: str, error: type[TransportError] = TransportError) -> DriverErrors:
    """Where aio-pika's and aiormq's errors become msdata's: ``with _amqp_errors("what"):``.
    Any exception counts (aio-pika raises a wide variety: AMQP errors, connection and
    channel state errors, OS errors)."""
    return DriverErrors(Exception, what, error)


def _retry_queue_name(topic: str, group: str, delay_ms: int) -> str:
    return f"{topic}:{group}:retry-{delay_ms}ms"


def _unrouted_name(topic: str) -> str:
    return f"{topic}:unrouted"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


#: the largest attempt count a header of msdata's own is believed to hold
MAX_ATTEMPT = 1_000_000


def _count(value: Any) -> int:
    """A count from a header, kept within 0..MAX_ATTEMPT (0 if it is not a number)."""
    try:
        return min(max(0, int(value)), MAX_ATTEMPT)
    except (TypeError, ValueError, OverflowError):
        return 0


def _properties(m: TransportMessage) -> Basic.Properties:
    headers: dict[str, Any] = dict(m.headers) if m.headers else {}
    if m.key is not None:
        headers[KEY_HEADER] = m.key
    return Basic.Properties(message_id=m.id, delivery_mode=_PERSISTENT, headers=headers or None)


def _as_published(raw: DeliveredMessage) -> Basic.Properties:
    """The properties of a message moved by msdata into a queue, without bookkeeping headers
    its producer may have put there (through the default exchange they would count)."""
    props = raw.header.properties
    if props.headers and (PRIOR_ATTEMPTS_HEADER in props.headers):
        props.headers = {k: v for k, v in props.headers.items() if k != PRIOR_ATTEMPTS_HEADER}
    return props


def _confirmed(results: Sequence[object], what: str) -> None:
    """Raise PublishError unless every result is a broker ack."""
    for r in results:
        if isinstance(r, Basic.Ack):
            continue
        if isinstance(r, BaseException):
            if isinstance(r, asyncio.CancelledError):
                raise r
            raise PublishError(f"{what}: {type(r).__name__}: {r}") from r
        raise PublishError(f"{what}: the broker did not confirm ({r!r})")


async def _ack(raw: DeliveredMessage) -> None:
    tag = raw.delivery_tag
    if tag is not None:
        # a dropped channel: the broker already took the message back and delivers it again
        with contextlib.suppress(aiormq.exceptions.ChannelInvalidStateError):
            await raw.channel.basic_ack(tag, wait=False)


async def _requeue(raw: DeliveredMessage) -> None:
    tag = raw.delivery_tag
    if tag is not None:
        with contextlib.suppress(aiormq.exceptions.ChannelInvalidStateError):
            await raw.channel.basic_nack(tag, requeue=True, wait=False)


class _Entry:
    """A message the broker delivered to a subscription, parsed when first handed out."""

    __slots__ = ("attempt", "message", "raw")

    def __init__(self, raw: DeliveredMessage) -> None:
        self.raw = raw
        self.message: TransportMessage | None = None
        self.attempt = 0

    def parse(self, counts_deliveries: bool) -> TransportMessage:
        """The message, and ``attempt`` from msdata's own bookkeeping only: the
        ``x-msdata-prior-attempts`` header counts on a copy msdata put into the queue itself
        (through the default exchange; a producer publishes to the topic's exchange), and the
        broker's ``x-delivery-count`` on a quorum queue (which sets it itself); elsewhere
        they are another producer's headers and are ignored."""
        raw = self.raw
        own = raw.exchange == ""
        props = raw.header.properties
        headers = props.headers
        key: str | None = None
        prior = count = 0
        user: Mapping[str, str] = _NO_HEADERS
        if headers:
            out: dict[str, str] = {}
            for name, value in headers.items():
                if name in _INTERNAL_HEADERS:
                    if name == KEY_HEADER:
                        key = _text(value)
                    elif name == PRIOR_ATTEMPTS_HEADER and own:
                        prior = _count(value)
                    elif name == _DELIVERY_COUNT and counts_deliveries and raw.redelivered:
                        # the broker sets it on a redelivery only; a first delivery's is foreign
                        count = _count(value)
                    continue
                out[name] = value if type(value) is str else _text(value)
            if out:
                user = out
        body = raw.body
        mid = props.message_id or f"sha256:{hashlib.sha256(body).hexdigest()}"
        # a queue that does not count deliveries still flags a redelivery
        if count == 0 and raw.redelivered:
            count = 1
        self.attempt = prior + count + 1
        self.message = m = TransportMessage(mid, body, key, user)
        return m

    @property
    def stale(self) -> bool:
        """Its channel is gone: the broker took the message back and will deliver it again."""
        return bool(self.raw.channel.is_closed)


class RabbitMQDelivery(DeliveryState["RabbitMQSubscription"]):
    """A delivery from :class:`RabbitMQTransport`; see :class:`msdata.transport.Delivery`."""

    __slots__ = ("_entry",)

    def __init__(self, sub: RabbitMQSubscription, entry: _Entry, message: TransportMessage) -> None:
        super().__init__(sub, message, entry.attempt)
        self._entry = entry

    async def ack(self) -> None:
        if not self._begin_settle():
            return
        await _ack(self._entry.raw)
        self._sub._release_key(self._entry)

    async def nack(self, delay: float = 0.0, reason: str | None = None) -> None:
        if not self._begin_settle():
            return
        sub = self._sub
        try:
            if deadletter.exhausted(self.attempt, sub.max_attempts):
                await sub._dead_letter(self, deadletter.failed_reason(self.attempt, reason))
            elif sub._ordered:
                sub._retry_here(self._entry, delay)
                return  # the key stays busy until the retry is handed out
            elif delay <= 0 and sub._counts_deliveries:
                await _requeue(self._entry.raw)  # the quorum queue counts it
            else:
                await sub._retry_later(self, delay)
        except BaseException:
            self._settled = False  # not settled: the caller may try again, or it is redelivered
            raise
        sub._release_key(self._entry)

    async def dead_letter(self, reason: str) -> None:
        if not self._begin_settle():
            return
        try:
            await self._sub._dead_letter(self, reason)
        except BaseException:
            self._settled = False
            raise
        self._sub._release_key(self._entry)


class RabbitMQSubscription(ClosesOnExit):
    """A consumer in a group; see :class:`msdata.transport.Subscription`.

    ``async with`` declares the topology and starts consuming on a channel of its own with
    ``basic.qos(prefetch)``; leaving closes that channel, and the broker requeues whatever was
    not settled.
    """

    def __init__(
        self,
        transport: RabbitMQTransport,
        topic: str,
        group: str,
        max_attempts: int,
        prefetch: int,
    ) -> None:
        self._transport = transport
        self.topic = topic
        self.group = group
        self.max_attempts = max_attempts
        self.prefetch = prefetch
        self.queue = group_queue_name(topic, group)
        self._dlq_topic = dead_letter_topic(topic, group)
        self._ordered = transport.features.ordered_per_key
        self._counts_deliveries = transport.queue_type == "quorum"
        self._channel: AbstractRobustChannel | None = None
        self._pending: deque[_Entry] = deque()
        # order per key (ordered mode only): the entry of a key handed out or being retried,
        # and the later entries of that key waiting for it
        self._busy: dict[str, _Entry] = {}
        self._blocked: dict[str, deque[_Entry]] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._signal = asyncio.Event()
        self._closed = False
        self._entered = False
        self._resuming: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            raise ConfigurationError("a subscription can be entered once")
        self._entered = True
        transport = self._transport
        conn = await transport._connect()
        try:
            with _amqp_errors(f"cannot subscribe to {self.topic!r}"):
                try:
                    channel = await conn.channel(publisher_confirms=True)
                    self._channel = channel
                    await channel.set_qos(prefetch_count=self.prefetch)
                    await self._start(await channel.get_underlay_channel(), adopt=True)
                except aiormq.exceptions.ChannelPreconditionFailed as e:
                    raise ConfigurationError(
                        f"queue {self.queue!r} exists with other arguments (was it declared"
                        f" with ordered_per_key={not self._ordered}?): {e}"
                    ) from e
        except BaseException:
            await self.close()
            raise
        # after a reconnect the robust channel reopens; consume again on the new channel
        channel.reopen_callbacks.add(self._on_reopen)
        return self

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._signal.set()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if self._resuming is not None:
            self._resuming.cancel()
        self._pending.clear()
        self._busy.clear()
        self._blocked.clear()
        self._transport._subscriptions.discard(self)
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            try:
                # closing the channel hands every unsettled delivery back to the queue
                await channel.close()
            except Exception:  # the connection is already gone: so is the channel
                log.debug("closing the channel of %s failed", self.queue, exc_info=True)

    async def _start(self, raw: Any, *, adopt: bool) -> None:
        await self._transport._declare_group(raw, self.topic, self.group, adopt=adopt)
        await raw.basic_consume(self.queue, self._on_message)

    def _on_reopen(self, _channel: Any) -> None:
        # called inside the connection's recovery, which must finish before the channel is
        # usable: consume again from a task of our own
        if self._closed or self._channel is None:
            return
        if self._resuming is not None:
            self._resuming.cancel()
        self._resuming = asyncio.get_running_loop().create_task(self._resume())

    async def _resume(self) -> None:
        channel = self._channel
        while not self._closed and channel is not None:
            try:
                await self._start(await channel.get_underlay_channel(), adopt=False)
                return
            except Exception:
                log.warning("resuming the consumer of %s failed", self.queue, exc_info=True)
            if channel.is_closed:
                return  # it reopens, and calls _on_reopen again
            await asyncio.sleep(1.0)

    def _on_message(self, raw: DeliveredMessage) -> None:
        if self._closed:
            return  # the closing channel hands it back
        self._pending.append(_Entry(raw))
        self._signal.set()

    # -- receiving -----------------------------------------------------------------------------

    async def receive(
        self, max_messages: int = 100, timeout: float = 1.0
    ) -> list[RabbitMQDelivery]:
        if self._closed or self._transport._closed:
            raise TransportClosed("receive() on a closed subscription")
        if not self._entered:
            raise ConfigurationError("use the subscription as `async with` before receive()")
        out = self._take(max_messages)
        if out or timeout <= 0:
            return out
        try:
            async with asyncio.timeout(timeout):
                while not out:
                    await self._signal.wait()
                    if self._closed:
                        return []
                    out = self._take(max_messages)
        except TimeoutError:
            return []
        return out

    def _take(self, limit: int) -> list[RabbitMQDelivery]:
        pending = self._pending
        out: list[RabbitMQDelivery] = []
        ordered = self._ordered
        busy = self._busy
        while pending and len(out) < limit:
            entry = pending.popleft()
            if entry.stale:
                if ordered:
                    self._skip_stale(entry)
                continue
            message = entry.message or entry.parse(self._counts_deliveries)
            key = message.key
            if ordered and key is not None:
                if key in busy:
                    self._blocked.setdefault(key, deque()).append(entry)
                    continue
                busy[key] = entry
            out.append(RabbitMQDelivery(self, entry, message))
        if not pending:
            self._signal.clear()
        return out

    # -- order per key (ordered mode) ----------------------------------------------------------

    def _release_key(self, entry: _Entry) -> None:
        """``entry`` is settled: let the next entry of its key be handed out."""
        if not self._ordered or entry.message is None:
            return
        key = entry.message.key
        if key is None or self._busy.get(key) is not entry:
            return
        del self._busy[key]
        self._unblock(key)

    def _unblock(self, key: str) -> None:
        waiting = self._blocked.get(key)
        if waiting is None:
            return
        while waiting and waiting[0].stale:
            waiting.popleft()
        if waiting:
            self._pending.appendleft(waiting.popleft())
            self._signal.set()
        if not waiting:
            del self._blocked[key]

    def _skip_stale(self, entry: _Entry) -> None:
        if entry.message is not None and entry.message.key is not None:
            key = entry.message.key
            if self._busy.get(key) is entry:
                del self._busy[key]
            if key not in self._busy:
                self._unblock(key)

    def _retry_here(self, entry: _Entry, delay: float) -> None:
        """Ordered mode: hold the nacked delivery (unacked) and offer it again after ``delay``,
        ahead of the later messages of its key. The broker never sees this nack."""
        entry.attempt += 1
        if delay <= 0:
            self._requeue_here(entry)
            return
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            if handle is not None:
                self._timers.discard(handle)
            self._requeue_here(entry)

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)

    def _requeue_here(self, entry: _Entry) -> None:
        if self._closed:
            return
        key = entry.message.key if entry.message is not None else None
        if key is not None and self._busy.get(key) is entry:
            del self._busy[key]
        self._pending.appendleft(entry)
        self._signal.set()

    # -- retry and dead letters ----------------------------------------------------------------

    async def _raw_channel(self) -> Any:
        if self._channel is None:
            raise TransportClosed("the subscription is closed")
        return await self._channel.get_underlay_channel()

    async def _retry_later(self, delivery: RabbitMQDelivery, delay: float) -> None:
        """A copy carrying the attempts made so far, confirmed, then the original acked: to the
        back of the group's queue, or into the retry queue of this delay (it comes back when
        its TTL runs out)."""
        raw = await self._raw_channel()
        if delay <= 0:
            name = self.queue
        else:
            delay_ms = max(1, round(delay * 1000))
            name = _retry_queue_name(self.topic, self.group, delay_ms)
            # declared each time: that also restarts the queue's idle expiry
            await raw.queue_declare(
                name,
                durable=True,
                arguments={
                    "x-message-ttl": delay_ms,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": self.queue,
                    "x-expires": delay_ms + _RETRY_QUEUE_GRACE_MS,
                },
            )
            self._transport._queues.add(name)
        m = delivery.message
        props = _properties(m)
        props.headers = dict(props.headers or {})
        props.headers[PRIOR_ATTEMPTS_HEADER] = delivery.attempt
        await self._publish_then_ack(raw, delivery, "", name, props, "retry")

    async def _dead_letter(self, delivery: RabbitMQDelivery, reason: str) -> None:
        letter = deadletter.dead_letter(
            delivery.message, self.topic, self.group, delivery.attempt, reason
        )
        m = letter.message
        headers: dict[str, Any] = dict(m.headers)
        if m.key is not None:
            headers[KEY_HEADER] = m.key
        original = delivery._entry.raw.header.properties
        props = Basic.Properties(
            message_id=m.id,
            delivery_mode=_PERSISTENT,
            headers=headers,
            content_type=original.content_type,
            content_encoding=original.content_encoding,
            correlation_id=original.correlation_id,
            timestamp=original.timestamp,
            message_type=original.message_type,
            app_id=original.app_id,
        )
        raw = await self._raw_channel()
        await self._publish_then_ack(raw, delivery, letter.topic, "", props, "dead-letter")
        letter.log()

    async def _publish_then_ack(
        self,
        raw: Any,
        delivery: RabbitMQDelivery,
        exchange: str,
        routing_key: str,
        props: Basic.Properties,
        what: str,
    ) -> None:
        with _amqp_errors(f"{what} of {delivery.message.id} failed", PublishError):
            result = await raw.basic_publish(
                delivery.message.body, exchange=exchange, routing_key=routing_key, properties=props
            )
        _confirmed([result], f"{what} of {delivery.message.id}")
        # if the channel dropped meanwhile, the original comes again: a duplicate, allowed
        await _ack(delivery._entry.raw)


class RabbitMQTransport:
    """The RabbitMQ :class:`msdata.transport.Transport` (see the module docstring).

    Built from an aio-pika robust connection (``aio_pika.connect_robust``), which the caller
    keeps owning (``close()`` leaves it open), or with :meth:`from_url`, which connects on
    first use and closes its connection in ``close()``. Use it from the event loop the
    connection belongs to.

    - ``ordered_per_key``: single-active-consumer group queues and one delivery per key in
      flight (``features.ordered_per_key``); else competing consumers, no order.
    - ``queue_type``: ``"classic"`` (default) or ``"quorum"`` group queues. A group's queue
      keeps the arguments it was first declared with: opening it with other ones raises
      :class:`~msdata.errors.ConfigurationError`.
    - ``publish_timeout``: seconds ``publish`` waits (for a reconnect, then for the confirms)
      before it raises :class:`~msdata.errors.PublishError`.
    """

    def __init__(
        self,
        connection: AbstractRobustConnection | None,
        *,
        ordered_per_key: bool = False,
        queue_type: str = "classic",
        publish_timeout: float = 30.0,
    ) -> None:
        if queue_type not in ("classic", "quorum"):
            raise ConfigurationError(f"queue_type must be 'classic' or 'quorum': {queue_type!r}")
        self.queue_type = queue_type
        self._connection = connection
        self._url: str | None = None
        self._owns_connection = False
        self.features = ORDERED_FEATURES if ordered_per_key else FEATURES
        self.publish_timeout = publish_timeout
        self._publish_channel: AbstractRobustChannel | None = None
        self._lock = asyncio.Lock()
        # exchanges known to exist (re-declared after a failed publish), and every exchange and
        # queue ever declared (for `declared`)
        self._topics: set[str] = set()
        self._exchanges: set[str] = set()
        self._queues: set[str] = set()
        self._subscriptions: set[RabbitMQSubscription] = set()
        self._closed = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        ordered_per_key: bool = False,
        queue_type: str = "classic",
        publish_timeout: float = 30.0,
    ) -> RabbitMQTransport:
        """``amqp://user:password@host:port/vhost`` (or ``amqps://``); connects on first use."""
        if not url.startswith(("amqp://", "amqps://")):
            raise ConfigurationError(f"not an amqp:// URL: {url!r}")
        transport = cls(
            None,
            ordered_per_key=ordered_per_key,
            queue_type=queue_type,
            publish_timeout=publish_timeout,
        )
        transport._url = url
        transport._owns_connection = True
        return transport

    @property
    def declared(self) -> tuple[frozenset[str], frozenset[str]]:
        """(exchanges, queues) this transport declared so far; handy to clean up after tests."""
        exchanges = set(self._exchanges)
        queues = set(self._queues)
        for topic in self._exchanges:
            exchanges.add(_unrouted_name(topic))
            queues.add(_unrouted_name(topic))
        return frozenset(exchanges), frozenset(queues)

    async def _connect(self) -> AbstractRobustConnection:
        if self._closed:
            raise TransportClosed("the transport is closed")
        if self._connection is not None:
            return self._connection
        async with self._lock:
            if self._connection is None:
                assert self._url is not None
                with _amqp_errors("cannot connect to RabbitMQ"):
                    self._connection = await aio_pika.connect_robust(self._url)
            return self._connection

    async def _publisher(self) -> Any:
        channel = self._publish_channel
        if channel is None:
            conn = await self._connect()
            async with self._lock:
                if self._publish_channel is None:
                    self._publish_channel = await conn.channel(publisher_confirms=True)
                channel = self._publish_channel
        return await channel.get_underlay_channel()

    async def _declare_topic(self, raw: Any, topic: str) -> None:
        # unrouted messages (no group bound yet) wait in a holding queue, through the
        # topic exchange's alternate exchange
        hold = _unrouted_name(topic)
        await raw.exchange_declare(hold, exchange_type="fanout", durable=True)
        await raw.queue_declare(hold, durable=True)
        await raw.queue_bind(hold, hold, routing_key="")
        await raw.exchange_declare(
            topic,
            exchange_type="fanout",
            durable=True,
            arguments={"alternate-exchange": hold},
        )
        self._exchanges.add(topic)
        self._topics.add(topic)

    async def _declare_group(self, raw: Any, topic: str, group: str, *, adopt: bool) -> None:
        """The topic's exchange, the group's dead-letter topic, the group's queue bound to
        the exchange, and (``adopt``) what the topic held while it had no group moved in."""
        queue = group_queue_name(topic, group)
        await self._declare_topic(raw, topic)
        await self._declare_topic(raw, dead_letter_topic(topic, group))
        arguments: dict[str, Any] = {"x-queue-type": self.queue_type}
        if self.features.ordered_per_key:
            arguments["x-single-active-consumer"] = True
        await raw.queue_declare(queue, durable=True, arguments=arguments)
        self._queues.add(queue)
        await raw.queue_bind(queue, topic, routing_key="")
        if adopt:
            await self._adopt_unrouted(raw, topic, queue)

    async def _adopt_unrouted(self, raw: Any, topic: str, queue: str) -> None:
        """Move what was published to ``topic`` before any group existed into ``queue``.

        Nothing new arrives in the holding queue once a group's queue is bound; if two first
        groups are declared at the same instant they share what was held.
        """
        hold = _unrouted_name(topic)
        ok = await raw.queue_declare(hold, durable=True)
        if not ok.message_count:
            return
        while True:
            batch: list[DeliveredMessage] = []
            while len(batch) < 100:
                got = await raw.basic_get(hold)
                if not isinstance(got.delivery, Basic.GetOk):
                    break
                batch.append(got)
            if not batch:
                return
            results = await asyncio.gather(
                *[
                    raw.basic_publish(
                        m.body, exchange="", routing_key=queue, properties=_as_published(m)
                    )
                    for m in batch
                ],
                return_exceptions=True,
            )
            _confirmed(results, f"moving unrouted messages into {queue!r}")
            await raw.basic_ack(batch[-1].delivery_tag, multiple=True)
            if len(batch) < 100:
                return

    async def declare_group(self, topic: str, group: str) -> None:
        """Declare the group's durable queue (with the transport's ``queue_type`` and mode)
        bound to the topic's exchange, and the group's dead-letter topic, on a channel of its
        own; what the topic held while it had no group moves into the queue."""
        check_name("topic", topic)
        check_name("group", group)
        conn = await self._connect()
        with _amqp_errors(f"cannot declare group {group!r} of {topic!r}"):
            channel = await conn.channel()
            try:
                try:
                    await self._declare_group(
                        await channel.get_underlay_channel(), topic, group, adopt=True
                    )
                except aiormq.exceptions.ChannelPreconditionFailed as e:
                    raise ConfigurationError(
                        f"group {group!r} of {topic!r} exists with other arguments: {e}"
                    ) from e
            finally:
                if not channel.is_closed:
                    await channel.close()

    async def publish(self, topic: str, messages: Sequence[TransportMessage]) -> None:
        if self._closed:
            raise TransportClosed("publish() on a closed transport")
        if topic not in self._topics:
            check_name("topic", topic)
        if not messages:
            return
        try:
            with _amqp_errors(f"publishing to {topic!r} failed", PublishError):
                try:
                    async with asyncio.timeout(self.publish_timeout):
                        raw = await self._publisher()
                        if topic not in self._topics:
                            await self._declare_topic(raw, topic)
                        publish = raw.basic_publish
                        results = await asyncio.gather(
                            *[
                                publish(m.body, exchange=topic, properties=_properties(m))
                                for m in messages
                            ],
                            return_exceptions=True,
                        )
                except TimeoutError as e:
                    raise PublishError(
                        f"publishing {len(messages)} to {topic!r} not confirmed within "
                        f"{self.publish_timeout}s"
                    ) from e
                _confirmed(results, f"publishing to {topic!r}")
        except MsdataError:
            # declare the exchange again next time, in case it is what went missing
            self._topics.discard(topic)
            raise

    def subscribe(
        self, topic: str, group: str, *, max_attempts: int = 5, prefetch: int = 100
    ) -> RabbitMQSubscription:
        check_name("topic", topic)
        check_name("group", group)
        if max_attempts < 1 or prefetch < 1:
            raise ConfigurationError("max_attempts and prefetch must be >= 1")
        if prefetch > 65535:
            raise ConfigurationError("prefetch must be <= 65535 (an AMQP short)")
        if len(_retry_queue_name(topic, group, 10**9).encode()) > 255:
            raise ConfigurationError(f"topic {topic!r} and group {group!r} are too long together")
        sub = RabbitMQSubscription(self, topic, group, max_attempts, prefetch)
        self._subscriptions.add(sub)
        return sub

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subscriptions):
            await sub.close()
        channel, self._publish_channel = self._publish_channel, None
        try:
            if channel is not None and not channel.is_closed:
                await channel.close()
            if self._owns_connection and self._connection is not None:
                await self._connection.close()
        except Exception:  # already broken: nothing left to release
            log.debug("closing the RabbitMQ transport failed", exc_info=True)

    async def __aenter__(self) -> Self:
        await self._connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
