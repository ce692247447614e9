"""The RabbitMQ transport (aio-pika on aiormq), for RabbitMQ 3.10 and later, no plugins.

Topology, all durable and declared by the adapter:

- a ``fanout`` exchange per topic, named as the topic, declared with an *alternate
  exchange* ``<topic>:unrouted`` and a holding queue of the same name: a message published
  while the topic has no group at all lands there instead of being dropped, and the first
  group declared on the topic gets it (so a dead-letter topic, too, keeps what it receives
  until read, as the port requires): declaring a group, and every (re)start of a
  subscription, routes what the holding queue has again through the topic's exchange (after
  a SIGKILL restart the broker was seen routing a confirmed batch there though a group was
  bound). A topic exchange declared by an older
  version without the alternate exchange must be deleted (or its messages drained) first:
  RabbitMQ refuses to redeclare an exchange with other arguments;
- a durable queue per consumer group, ``<topic>:<group>``, bound to it, declared by
  :meth:`RabbitMQTransport.declare_group` or by the first subscription of the group; messages
  are persistent. Classic queues by default; ``queue_type="quorum"`` for quorum queues, which
  count deliveries themselves (``x-delivery-count``). Classic is the default because on
  RabbitMQ 3.10 a quorum queue created moments before the node is SIGKILLed came back empty
  and leaderless in our restart test, while classic queues kept every confirmed message;
- for each group, its dead-letter topic :func:`~msdata.transport.dead_letter_topic` (an
  exchange like any topic), with a *history queue* ``<dead-letter topic>:history`` bound to
  it that keeps every dead letter: a group declared on a dead-letter topic gets a copy of
  that history first, so it reads the topic from its beginning however late it comes, each
  letter once, also one dead-lettered while the group is declared (see
  :meth:`RabbitMQTransport._replay_history`; the history is never consumed; purge or delete
  it to forget old dead letters);
- for each group in ordered mode, a *given-back queue* ``<topic>:<group>:given-back``: a
  closing subscription records there the attempt of each delivery it hands back to the
  broker (see "Attempts");
- for each group (not in ordered mode, which retries by itself), a *ready queue*
  ``<topic>:<group>:retry`` that its subscriptions consume beside the group's queue, with a
  prefetch of their own: a nacked delivery's copy goes there, so a retry does not wait
  behind the backlog of first attempts;
- ``nack(delay > 0)`` goes through the group's retry tier queues
  ``<topic>:<group>:retry-<ms>ms``, one per tier of :data:`RETRY_TIERS` (``x-message-ttl`` =
  the tier, dead-lettering into the ready queue through the default exchange, ``x-expires``
  a minute after the tier so unused ones go away): the longest tier not above the delay, and
  when the copy comes back before it is due (``x-msdata-not-before``) the tier for what is
  left, so it comes back no sooner than asked and at most about 0.1 s later. A fixed set of
  tiers, not one queue per delay (jittered delays would declare one each) nor per-message
  TTLs (RabbitMQ only expires messages at the head of a queue).
- with a ``namespace``, every exchange and queue name above starts with ``<namespace>:``.

Publishing: one channel in confirm mode; a batch is written at once with every confirm in
flight, and ``publish`` returns when the broker confirmed them all. While the connection or
the channel is being reopened, ``publish`` waits and sends again what was not confirmed, up to
``publish_timeout`` in all. The message id travels in
the AMQP ``message_id`` property, the partition key in the ``x-msdata-key`` header, the
message's headers as AMQP headers.

Sizes: ``publish`` refuses alone, before sending, a message that fails
:func:`~msdata.transport.check_message`, whose id is over 255 bytes (AMQP's shortstr), that
is over ``max_message_bytes`` (body plus content-header frame), or whose content-header frame
does not fit in the negotiated ``frame_max`` with room for msdata's own headers (sent, it
would make the broker close the connection). What a subscription holds is bounded by its
consumers' prefetch, derived from ``max_held_bytes // max_message_bytes`` (see
:meth:`RabbitMQSubscription.prefetches`): RabbitMQ pushes up to the prefetch before any size
is known. A foreign message whose short strings (``message_id``, ``content_type``, header
names) are not UTF-8 is read (see :mod:`._pamqp`) and handed out with those bytes escaped.

Attempts: ``attempt = x-msdata-prior-attempts + deliveries + 1``, and true on classic queues
too, also when consumers die. A nack republishes a copy (to the back of the group's queue, or
through a retry queue) that carries the attempts made so far in ``x-msdata-prior-attempts``,
confirmed before the original is acked. ``deliveries`` is ``x-delivery-count`` on quorum
queues (which count the deliveries to consumers that died). A classic queue does not count: it
only flags a redelivery (a consumer closed or died holding the message), however many times it
happened. So a subscription never hands out a classic queue's redelivery: it moves it, with
the deliveries counted so far (``x-msdata-prior-attempts`` + 1), to the back of the queue
(confirmed, then the original acked) and hands out the copy when it comes round. A message
whose consumers kept dying is dead-lettered, when it comes back beyond ``max_attempts``,
instead of being handed out again. In ordered mode the later messages of its key follow it to
the back (copies marked ``x-msdata-moved``, the subscription counting them back), so order per
key holds. True at all times, also right after a reconnect: every driver call of the delivery
path is abandoned when its channel closes (see :func:`_on_channel`), and a copy goes out on its
original's own channel. This is msdata's own attempt record, carried by the message, rather
than quorum queues with a broker-side ``x-delivery-limit``: quorum queues failed our restart test on
RabbitMQ 3.10 (see above), and a broker-side limit drops or dead-letters without msdata's
reason headers and log line.

Stopping counts nothing for what was not handed out (the port's ``release``). A closing
channel hands back what it holds flagged as redelivered (a quorum queue raises
``x-delivery-count``), which would count. So an unordered subscription cancels its
consumers and moves what it holds as copies carrying their attempts (see
:meth:`RabbitMQSubscription._give_back`). An ordered one cannot (a copy at the back would
pass the later messages of its key): it records each delivery's attempt in the group's
given-back queue, then closes its channel, and the broker puts them back in place. The next
consumer to receive one uses its record once (see
:meth:`RabbitMQSubscription._record_given_back`). A consumer that dies records nothing, so
what it held counts. Nothing may be on its way to a consumer as it stops (a quorum queue's
client returns it, counted; a classic queue's closing channel, in ordered mode, hands it back
flagged): each is first made to hold its prefetch, with *fillers* (empty messages with
:data:`FILLER_HEADER`, acked by whoever receives them, never handed out, expiring after
0.2 s unless held) put into its queue if the queue has too few messages (see
:meth:`RabbitMQSubscription._exhaust_credit`).

Only msdata's own bookkeeping counts: ``x-msdata-prior-attempts``
(and ``x-msdata-moved``) only on a copy that came through the default exchange (producers
publish to the topic's exchange), ``x-delivery-count`` only on a quorum queue's redelivery,
each kept within 0..:data:`MAX_ATTEMPT`.

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
the drop are void (the broker requeued them): nacking or dead-lettering one is a no-op, and it
is delivered again, flagged as a redelivery, so counted. Acking one, or a settlement whose ack
was lost with the connection (``basic.ack`` has no reply: one written while the connection
was silent, or as it dropped, may never be processed, and a delivery tag cannot be acked on
another channel), is remembered: the transport keeps the latest settlements of each group
(message id, the copy's own name, :data:`COPY_HEADER`, and body length), and when the broker
delivers one of them again, flagged, a subscription of the group in this transport acks it
again without handing it out or counting it (logged at INFO; see
:meth:`RabbitMQSubscription._settled_before`). Another process, or this one restarted, cannot
know: there the message is handed out again, counted, at least once as the port says.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, Self, TypeVar

import aio_pika
import aiormq
import yarl
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from msdata import deadletter
from msdata.adapters.rabbitmq import _pamqp
from msdata.errors import (
    ConfigurationError,
    EncodeError,
    MessageTooLarge,
    MsdataError,
    PublishError,
    TransportClosed,
    TransportError,
)
from msdata.serialization import DEFAULT_MAX_SIZE
from msdata.transport import (
    DEAD_LETTER_READER,
    DEFAULT_MAX_HELD_BYTES,
    ClosesOnExit,
    DeliveryState,
    DriverErrors,
    TransportFeatures,
    TransportMessage,
    carryable_text,
    check_name,
    dead_letter_topic,
    is_dead_letter_topic,
    pop_url_options,
    refused_error,
    screen,
)
from msdata.urls import redact_url

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
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

# a foreign message whose message_id, content_type (or header name) is not UTF-8 is read,
# not a frame error that closes the connection for good (see _pamqp)
_pamqp.install()

_T = TypeVar("_T")

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
#: on a copy an ordered subscription moved to the back of its queue: which subscription
MOVED_HEADER = "x-msdata-moved"
#: on a delayed retry's copy that has more delay tiers to go: when it is due (Unix ms)
NOT_BEFORE_HEADER = "x-msdata-not-before"
#: on a filler a stopping subscription put into its queue (see
#: :meth:`RabbitMQSubscription._exhaust_credit`): never handed out, acked by whoever gets it
FILLER_HEADER = "x-msdata-filler"
#: on every copy a subscription puts into its group's queues (a retry, a moved or given-back
#: delivery): a name of that copy alone, so a redelivery of what was settled before is told
#: apart from another copy of the same message (see :meth:`RabbitMQSubscription._settled_before`)
COPY_HEADER = "x-msdata-copy"
#: the delays (seconds) of a group's retry queues: a nack's delay passes through the longest
#: tier not above what is left of it, again and again until it is due, so any delay needs at
#: most these queues per group, however the delays are jittered
RETRY_TIERS = (0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0)
_INTERNAL_HEADERS = _BROKER_HEADERS | {
    KEY_HEADER,
    PRIOR_ATTEMPTS_HEADER,
    MOVED_HEADER,
    NOT_BEFORE_HEADER,
    FILLER_HEADER,
    COPY_HEADER,
}
_PERSISTENT = 2
#: ``max_message_bytes`` by default: the codec's 1 MiB body limit plus 64 KiB for the id and
#: headers, far below RabbitMQ's own ``max_message_size`` (128 MiB on 3.10)
DEFAULT_MAX_MESSAGE_BYTES = DEFAULT_MAX_SIZE + 64 * 1024
# RabbitMQ's hard ceiling of max_message_size (rabbit.app: 512 MiB)
_BROKER_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
# AMQP 0-9-1 carries a message's properties (id, headers) in ONE content-header frame, which
# must fit in the connection's negotiated frame_max (RabbitMQ's default 131072, used until the
# connection says); a larger one makes the broker close the connection (FRAME_ERROR)
_DEFAULT_FRAME_MAX = 131_072
# room kept in that frame for what msdata adds to a copy it sends on (a dead letter's reason,
# cut to 1 KiB of text, its topic, group and attempts; a retry's counts; the AMQP properties
# a copy keeps): a message that fits without it could not be retried or dead-lettered
_OWN_HEADERS_ROOM = 8 * 1024
# a content-header frame: frame header (7) and end (1), class, weight, body size, flags (14)
_HEADER_FRAME_FIXED = 8 + 14
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
# seconds a closing subscription spends giving back what it never handed out (then it closes
# its channel, and the broker hands those back as redeliveries)
_GIVE_BACK_TIMEOUT = 5.0
# seconds a given-back record no consumer matched is kept (a redelivery is matched by the
# first consumer to receive it, within moments of its stop: one this old is stale)
_GIVEN_BACK_KEPT = 24 * 3600.0
# an unused retry queue is deleted this long after its delay has run out
_RETRY_QUEUE_GRACE_MS = 60_000
# a stopping subscription spends up to this long (seconds) making each of its consumers hold
# its prefetch, checking again after a wait that starts at _EXHAUST_WAIT and doubles up to
# 0.1 s (see _exhaust_credit); within _GIVE_BACK_TIMEOUT
_EXHAUST_TIMEOUT = 1.5
_EXHAUST_WAIT = 0.005
# a filler's per-message TTL (ms): it is delivered as it enters the queue (the queue had too
# few messages for the consumer's prefetch), so it only has to outlive that; one a closing
# channel hands back, or that no consumer took, then expires instead of staying in the queue
# (counted by lag(), read by no one once the group's consumers are gone)
_FILLER_TTL_MS = 200
# how many of its latest settlements a transport remembers per group, at least (at most
# twice as many; see RabbitMQSubscription._settled_before): those whose ack may have been lost
# are at most what its consumers held as the connection went (their prefetch), far fewer
_SETTLED_KEPT = 4096


_INEQUIVALENT_ARG = re.compile(r"inequivalent arg '([^']+)'")


def _differing_argument(error: BaseException) -> str:
    """`` (x-queue-type differs)``: the queue argument a PRECONDITION_FAILED names
    (``x-queue-type`` for classic vs quorum, ``x-single-active-consumer`` for
    ``ordered_per_key``), or ``""`` if it names none."""
    found = _INEQUIVALENT_ARG.search(str(error))
    if found is None:
        return ""
    arg = found.group(1)
    hint = {
        "x-queue-type": ": declared with another queue_type",
        "x-single-active-consumer": ": declared with another ordered_per_key",
    }.get(arg, "")
    return f" ({arg} differs{hint})"


def group_queue_name(exchange: str, group: str) -> str:
    """The queue of ``group`` on the topic whose exchange is ``exchange`` (see
    :meth:`RabbitMQTransport.exchange_name`; ':' cannot occur in topic or group names)."""
    return f"{exchange}:{group}"


_AMQP_ERRORS = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    OSError,
    TimeoutError,
)


def _amqp_errors(what: str, error: type[TransportError] = TransportError) -> DriverErrors:
    """Where aio-pika's and aiormq's errors become msdata's: ``with _amqp_errors("what"):``.
    The driver's errors only (AMQP errors, channel state errors, OS errors and timeouts):
    a bug of our own (a TypeError, a KeyError) must surface as itself, not as a broker
    failure that is retried."""
    return DriverErrors(_AMQP_ERRORS, what, error)


# the deadline of the broker calls in progress in this task (see RabbitMQTransport._calling),
# and the seconds it is pushed back by when a long call makes progress (see _progressed)
_DEADLINE: ContextVar[tuple[asyncio.Timeout, float] | None] = ContextVar(
    "msdata_rabbitmq_deadline", default=None
)


def _progressed() -> None:
    """The broker answered a step of a long call (a batch of copies confirmed): the call's
    deadline starts again, so a long but moving call (a large holding queue or dead-letter
    history to copy) is not cut off, while a broker that stops answering still is."""
    current = _DEADLINE.get()
    if current is not None:
        deadline, seconds = current
        if not deadline.expired():
            deadline.reschedule(asyncio.get_running_loop().time() + seconds)


def _abort_socket(connection: Any) -> bool:
    """Abort the socket of an aiormq ``connection`` (its writer task holds the stream
    writer: aiormq keeps no other reference), so that a close waiting to write out its
    buffer ends. Whether a socket was found (aiormq's internals may change: then False)."""
    task = getattr(connection, "_writer_task", None)
    coro = task.get_coro() if isinstance(task, asyncio.Task) else None
    frame = getattr(coro, "cr_frame", None)
    writer = frame.f_locals.get("writer") if frame is not None else None
    transport = getattr(writer, "transport", None)
    if transport is None or not hasattr(transport, "abort"):
        return False
    transport.abort()
    return True


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Mark the outcome of a close left to the driver as seen."""
    if not task.cancelled():
        task.exception()


async def _close_within(channel: Any, seconds: float, what: str) -> None:
    """Close ``channel`` (an aio-pika channel) unless it is closed, waiting at most
    ``seconds``: a broker that stopped answering never confirms the close (the connection's
    heartbeat ends it later). Failures are logged at DEBUG: the channel is gone either way."""
    if channel.is_closed:
        return
    try:
        async with asyncio.timeout(seconds):
            await channel.close()
    except Exception:
        log.debug("closing the channel of %s failed", what, exc_info=True)


#: the query parameters aio-pika and aiormq read from an ``amqp://`` URL (aio-pika's
#: connection parameters, then aiormq's own); any other would be ignored without a word
_DRIVER_URL_OPTIONS: tuple[str, ...] = (
    *(p.name for p in aio_pika.RobustConnection.PARAMETERS),
    *("heartbeat", "timeout", "name", "auth"),
    *("cafile", "capath", "cadata", "keyfile", "certfile", "no_verify_ssl"),
)


def _address_of(url: object) -> str:
    """``url`` as ``amqp://host:port/vhost``: no credentials, no query (what errors name)."""
    try:
        u = yarl.URL(str(url))
        scheme = u.scheme or "amqp"
        port = u.port or (5671 if scheme == "amqps" else 5672)
        return str(u.with_user(None).with_query(None).with_fragment(None).with_port(port))
    except (TypeError, ValueError):
        return redact_url(str(url))


def _retry_queue_name(topic: str, group: str, delay_ms: int) -> str:
    return f"{topic}:{group}:retry-{delay_ms}ms"


def _unrouted_name(topic: str) -> str:
    return f"{topic}:unrouted"


def _history_name(exchange: str) -> str:
    # a dead-letter topic's copy of everything it received, for groups declared later
    return f"{exchange}:history"


def _given_back_name(queue: str) -> str:
    """Where an ordered group's closing subscriptions record what they gave back (see
    :meth:`RabbitMQSubscription._record_given_back`)."""
    return f"{queue}:given-back"


def _ready_queue_name(queue: str) -> str:
    """Where a group's retries wait, due, beside its queue (not behind its backlog)."""
    return f"{queue}:retry"


def _tier(delay: float) -> float:
    """The longest retry tier not above ``delay`` (the shortest, if ``delay`` is below it)."""
    best = RETRY_TIERS[0]
    for tier in RETRY_TIERS:
        if tier <= delay:
            best = tier
    return best


def _wire_text(text: str) -> str:
    """A short string as read (bytes that are not UTF-8 as lone surrogates, see
    :mod:`._pamqp`) made writable again: those bytes as ``\\xff`` escapes."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return carryable_text(text)


_STR_PROPERTIES = (
    "content_type",
    "content_encoding",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "message_type",
    "user_id",
    "app_id",
)


def _writable(props: Basic.Properties) -> Basic.Properties:
    """``props`` (as read) with every string property and header name writable again (see
    :func:`_wire_text`), so msdata can send a copy of a foreign message whose bytes were
    not UTF-8. The same object, changed in place."""
    for name in _STR_PROPERTIES:
        value = getattr(props, name, None)
        if isinstance(value, str) and not value.isascii():
            setattr(props, name, _wire_text(value))
    headers = props.headers
    if headers and not all(name.isascii() for name in headers):
        props.headers = {_wire_text(k): v for k, v in headers.items()}
    return props


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


#: the largest attempt count a header of msdata's own is believed to hold
MAX_ATTEMPT = 1_000_000


def _count_ms(value: Any) -> int:
    """A Unix time in ms from a header (0 if it is not one)."""
    try:
        return max(0, int(value))
    except (TypeError, ValueError, OverflowError):
        return 0


def _count(value: Any) -> int:
    """A count from a header, kept within 0..MAX_ATTEMPT (0 if it is not a number)."""
    try:
        return min(max(0, int(value)), MAX_ATTEMPT)
    except (TypeError, ValueError, OverflowError):
        return 0


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _header_frame_size(m: TransportMessage) -> int:
    """The bytes of the AMQP content-header frame that carries ``m``'s properties as
    :func:`_properties` writes them (``message_id``, ``delivery_mode``, the headers table
    with the key header), for a message that passed :func:`check_message`."""
    n = _HEADER_FRAME_FIXED + (1 + _utf8_len(m.id)) + 1 + 4
    headers = m.headers
    if headers:
        for name, value in headers.items():
            # name (shortstr), type octet, longstr length and bytes
            n += 1 + len(name) + 1 + 4 + _utf8_len(value)
    if m.key is not None:
        n += 1 + len(KEY_HEADER) + 1 + 4 + _utf8_len(m.key)
    return n


def _properties(m: TransportMessage) -> Basic.Properties:
    headers: dict[str, Any] = dict(m.headers) if m.headers else {}
    if m.key is not None:
        headers[KEY_HEADER] = m.key
    return Basic.Properties(message_id=m.id, delivery_mode=_PERSISTENT, headers=headers or None)


def _as_published(raw: DeliveredMessage) -> Basic.Properties:
    """The properties of a message moved by msdata into a queue, without bookkeeping headers
    its producer may have put there (through the default exchange they would count)."""
    props = _writable(raw.header.properties)
    if props.headers and (PRIOR_ATTEMPTS_HEADER in props.headers):
        props.headers = {k: v for k, v in props.headers.items() if k != PRIOR_ATTEMPTS_HEADER}
    return props


def _letter_key(raw: DeliveredMessage) -> tuple[object, ...]:
    """What tells two copies of one dead letter from two letters: its message id, body and
    headers (without the broker's bookkeeping)."""
    props = raw.header.properties
    headers = props.headers or {}
    return (
        props.message_id,
        raw.body,
        tuple(sorted((k, repr(v)) for k, v in headers.items() if k not in _BROKER_HEADERS)),
    )


def _copy_properties(props: Basic.Properties, original: Basic.Properties) -> None:
    """The AMQP properties of the original that a copy keeps (made writable)."""
    _writable(original)
    props.content_type = original.content_type
    props.content_encoding = original.content_encoding
    props.correlation_id = original.correlation_id
    props.timestamp = original.timestamp
    props.message_type = original.message_type
    props.app_id = original.app_id


def _recovering(error: BaseException) -> bool:
    """True for an error that means the connection or channel is gone and being reopened
    (aio-pika's robust connection does that), not that the broker refused something."""
    if isinstance(
        error,
        aiormq.exceptions.ChannelAccessRefused | aiormq.exceptions.ChannelPreconditionFailed,
    ):
        return False
    return isinstance(
        error,
        aiormq.exceptions.ChannelInvalidStateError
        | aiormq.exceptions.AMQPConnectionError
        | aiormq.exceptions.ChannelClosed
        | ConnectionError
        | OSError,
    )


def _confirmed(
    results: Sequence[object], what: str, messages: Sequence[TransportMessage] = ()
) -> None:
    """Raise PublishError unless every result is a broker ack. A basic.nack of one of
    ``messages`` is that message refused (``PublishError.refused``)."""
    if messages:
        refused = {
            m.id: "the broker refused it (basic.nack)"
            for m, r in zip(messages, results, strict=True)
            if isinstance(r, Basic.Nack)
        }
        if refused and all(isinstance(r, Basic.Ack | Basic.Nack) for r in results):
            raise PublishError(f"{what}: {len(refused)} messages refused", refused=refused)
    for r in results:
        if isinstance(r, Basic.Ack):
            continue
        if isinstance(r, BaseException):
            if isinstance(r, asyncio.CancelledError):
                raise r
            raise PublishError(f"{what}: {type(r).__name__}: {r}") from r
        raise PublishError(f"{what}: the broker did not confirm ({r!r})")


async def _on_channel(channel: Any, call: Awaitable[_T]) -> _T:
    """Await ``call``, a driver call made on ``channel`` (an aiormq channel), unless the
    channel closes first: then it is abandoned and ``ChannelInvalidStateError`` raised.

    Why: aiormq sends every frame through ``await write_queue.put(...)``, the connection's
    queue of 10 frames. When the connection drops (a broker restart), its writer stops before
    its channels are marked closed; a call that finds the queue full then waits on ``put``
    for ever: nothing reads that queue again, and closing the channel does not wake it. The
    subscription's loop (an ack, a moved copy) hung there after a broker restart, and the
    confirmed messages it held back were never delivered. A cancellation that aiormq sends
    into the call when it closes the channel comes out as ``ChannelInvalidStateError`` too,
    not as a ``CancelledError`` that would end the caller's loop."""
    closing = channel.closing
    task = asyncio.ensure_future(call)
    try:
        await asyncio.wait((task, closing), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # we are cancelled: so is the call
        task.cancel()
        closing.cancel()
        raise
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise aiormq.exceptions.ChannelInvalidStateError(f"channel {channel} closed")
    closing.cancel()
    if task.cancelled():
        raise aiormq.exceptions.ChannelInvalidStateError(f"channel {channel} closed")
    return task.result()


async def _ack(raw: DeliveredMessage) -> None:
    tag = raw.delivery_tag
    if tag is None:
        return
    channel = raw.channel
    # a dropped channel: the broker already took the message back and delivers it again
    with contextlib.suppress(aiormq.exceptions.ChannelInvalidStateError):
        queue = getattr(channel, "write_queue", None)
        if queue is not None and not queue.full():
            # the frame is queued without waiting (the hot path: no task)
            await channel.basic_ack(tag, wait=False)
        else:
            await _on_channel(channel, channel.basic_ack(tag, wait=False))


def _given_back_record(body: bytes) -> tuple[str, int, str, int, float] | None:
    """A given-back record (JSON ``[message id, prior attempts, body digest, attempt,
    recorded at]``, see :meth:`RabbitMQSubscription._record_given_back`), counts
    range-checked; None if it is not one."""
    try:
        item = json.loads(body)
    except ValueError:
        return None
    if not (isinstance(item, list) and len(item) == 5):
        return None
    message_id, prior, digest, attempt, at = item
    if not (isinstance(message_id, str) and isinstance(digest, str)):
        return None
    if type(prior) is not int or type(attempt) is not int or not isinstance(at, int | float):
        return None
    if not (0 <= prior <= MAX_ATTEMPT and 1 <= attempt <= MAX_ATTEMPT):
        return None
    return message_id, prior, digest, attempt, float(at)


class _Settlements:
    """The latest settlements of a group in a transport, by :meth:`_Entry.settled_key`:
    the last ``_SETTLED_KEPT`` at least, twice as many at most (two generations: adding
    costs a set insertion, with no per-key eviction)."""

    __slots__ = ("new", "old")

    def __init__(self) -> None:
        self.new: set[tuple[str, str, int]] = set()
        self.old: set[tuple[str, str, int]] = set()

    def add(self, key: tuple[str, str, int]) -> None:
        new = self.new
        new.add(key)
        if len(new) >= _SETTLED_KEPT:
            self.old, self.new = new, set()

    def __contains__(self, key: object) -> bool:
        return key in self.new or key in self.old

    def __bool__(self) -> bool:
        return bool(self.new or self.old)


class _Entry:
    """A message the broker delivered to a subscription, parsed when first handed out."""

    __slots__ = (
        "attempt",
        "copy",
        "filler",
        "known",
        "looked",
        "message",
        "moved",
        "not_before",
        "out",
        "prior",
        "raw",
        "tag",
    )

    def __init__(self, raw: DeliveredMessage) -> None:
        self.raw = raw
        self.message: TransportMessage | None = None
        self.attempt = 0
        #: ``x-msdata-prior-attempts`` of a copy msdata put into the queue (else 0)
        self.prior = 0
        #: ordered mode: handed out and not settled, released or held for a retry
        self.out = False
        #: ordered mode: a redelivery whose given-back record was looked for
        self.looked = False
        #: ordered mode: ``attempt`` comes from a given-back record, not from the broker
        self.known = False
        #: the MOVED_HEADER of a copy msdata moved (else None)
        self.moved: str | None = None
        #: a delayed retry not due before this Unix time (else 0)
        self.not_before = 0.0
        #: a filler a closing subscription put into the queue (never handed out)
        self.filler = False
        #: the COPY_HEADER of a copy msdata put into the queue (else "")
        self.copy = ""
        #: the consumer it was delivered to (None if it was not: a basic.get)
        self.tag: str | None = None

    def parse(self, counts_deliveries: bool) -> TransportMessage:
        """The message, and ``attempt`` from msdata's own bookkeeping only: the
        ``x-msdata-prior-attempts`` header counts on a copy msdata put into the queue itself
        (through the default exchange; a producer publishes to the topic's exchange), and the
        broker's ``x-delivery-count`` on a quorum queue (which sets it itself); elsewhere
        they are another producer's headers and are ignored."""
        raw = self.raw
        own = raw.exchange == ""
        props = _writable(raw.header.properties)
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
                    elif name == MOVED_HEADER and own:
                        self.moved = _text(value)
                    elif name == NOT_BEFORE_HEADER and own:
                        self.not_before = _count_ms(value) / 1000
                    elif name == FILLER_HEADER and own:
                        self.filler = True
                    elif name == COPY_HEADER and own:
                        self.copy = _text(value)
                    elif name == _DELIVERY_COUNT and counts_deliveries and raw.redelivered:
                        # the broker sets it on a redelivery only; a first delivery's is foreign
                        count = _count(value)
                    continue
                out[name] = value if type(value) is str else _text(value)
            if out:
                user = out
        body = raw.body
        mid = props.message_id or f"sha256:{hashlib.sha256(body).hexdigest()}"
        # a classic queue does not count deliveries, but flags a redelivery (the subscription
        # then moves it, counted, to the back of the queue before it is handed out)
        if count == 0 and raw.redelivered:
            count = 1
        self.prior = prior
        self.attempt = prior + count + 1
        self.message = m = TransportMessage(mid, body, key, user)
        return m

    def given_back_key(self) -> tuple[str, int, str]:
        """What a given-back record names this delivery by: its message id, its
        ``x-msdata-prior-attempts`` and a digest of its body (parsed first)."""
        assert self.message is not None
        return (self.message.id, self.prior, hashlib.sha256(self.raw.body).hexdigest()[:32])

    def settled_key(self) -> tuple[str, str, int]:
        """What the memory of settlements names this delivery by (parsed first): its message
        id, the name of the copy it is (``""`` for what a producer published) and its body's
        length. Two deliveries with the same key are the same message in the queue (or a
        producer's duplicate of it)."""
        assert self.message is not None
        return (self.message.id, self.copy, len(self.raw.body))

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
        sub = self._sub
        if sub._ordered:
            sub._live.discard(self._entry)  # before the ack: a closing one records no more
        if sub._tracks:
            await sub._ack_entry(self._entry)
        else:
            # the default (classic, unordered): no bookkeeping but the memory of settlements
            sub._remember(self._entry)
            await _ack(self._entry.raw)
        sub._release_key(self._entry)

    async def nack(self, delay: float = 0.0, reason: str | None = None) -> None:
        if not self._begin_settle():
            return
        sub = self._sub
        if self._entry.stale:
            # its channel is gone: the broker took it back and delivers it again, flagged as
            # a redelivery, so this attempt is counted then (a copy made now would be a
            # second one)
            sub._release_key(self._entry)
            return
        try:
            if deadletter.exhausted(self.attempt, sub.max_attempts):
                reason = deadletter.failed_reason(self.attempt, reason)
                await sub._unbroken(sub._dead_letter(self, reason))
            elif sub._ordered:
                sub._retry_here(self._entry, delay)
                return  # the key stays busy until the retry is handed out
            else:
                await sub._unbroken(sub._retry_later(self, delay))
        except asyncio.CancelledError:
            raise  # only the wait: the nack goes on (see _unbroken)
        except BaseException:
            self._settled = False  # not settled: the caller may try again, or it is redelivered
            raise
        sub._release_key(self._entry)

    async def dead_letter(self, reason: str) -> None:
        if not self._begin_settle():
            return
        if self._entry.stale:  # the broker delivers it again (see nack)
            self._sub._release_key(self._entry)
            return
        try:
            await self._sub._unbroken(self._sub._dead_letter(self, reason))
        except asyncio.CancelledError:
            raise  # only the wait: it goes on (see _unbroken)
        except BaseException:
            self._settled = False
            raise
        self._sub._release_key(self._entry)

    async def release(self) -> None:
        if not self._begin_settle():
            return
        sub = self._sub
        entry = self._entry
        if entry.stale:  # the broker delivers it again, flagged, so counted (see nack)
            sub._release_key(entry)
            return
        if sub._ordered:
            sub._requeue_here(entry)  # held, and offered again with the same attempt
            return
        sub._recount.append(entry)
        try:
            # a copy with the attempts before this one, confirmed, then the original acked
            await sub._unbroken(sub._settle_recount())
        except asyncio.CancelledError:
            raise  # only the wait: it goes on (see _unbroken)
        except BaseException:
            self._settled = False
            raise


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
        self.queue = group_queue_name(transport.exchange_name(topic), group)
        #: where its retries come back, due (not in ordered mode: it retries by itself)
        self.ready_queue = _ready_queue_name(self.queue)
        self._dlq_topic = dead_letter_topic(topic, group)
        queue_type, self._ordered = transport._group_mode(topic, group)
        self._counts_deliveries = queue_type == "quorum"
        # whether it keeps count of what each consumer holds (see _exhaust_credit)
        self._tracks = self._counts_deliveries or self._ordered
        self._channel: AbstractRobustChannel | None = None
        self._pending: deque[_Entry] = deque()
        # order per key (ordered mode only): the entry of a key handed out or being retried,
        # and the later entries of that key waiting for it
        self._busy: dict[str, _Entry] = {}
        self._blocked: dict[str, deque[_Entry]] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        # taken from the queue but not handed out: redelivered ones to count (moved, with
        # their count, to the back of the queue) and overdue ones to dead-letter
        self._recount: list[_Entry] = []
        self._recounting = asyncio.Lock()
        # ordered mode: key -> copies of it this subscription moved and has not received back
        self._moving: dict[str, int] = {}
        # ordered mode: what it received on its channel and did not settle (recorded as given
        # back when it closes), and the given-back records it read and did not use yet, held
        # unacked: (message id, prior attempts, body digest) -> [(attempt, recorded at (Unix
        # s), channel, delivery tag)]
        self._live: set[_Entry] = set()
        self._records: dict[tuple[str, int, str], list[tuple[int, float, Any, int]]] = {}
        # quorum queues and ordered mode: what it received on its consumers and did not ack
        # (see _exhaust_credit); while it stops consuming (quorum, not ordered), the acks it
        # holds back until its consumers are cancelled; and fillers received, to ack
        self._unacked: set[_Entry] = set()
        self._quiescing = False
        self._deferred: list[_Entry] = []
        self._fillers: list[_Entry] = []
        # quorum queues and ordered mode: the consumer tags that were sent a delivery
        self._sent_to: set[str] = set()
        self._marker = uuid.uuid4().hex
        self._copies = 0  # copies it made (each named by COPY_HEADER)
        # the latest settlements of the group in this transport (see _settled_before)
        self._settlements = transport._settlements_of(self.queue)
        self._signal = asyncio.Event()
        self._closed = False
        # close() was called: receive() hands out nothing more (what it holds goes back)
        self._stopping = False
        # what a receive() took to hand out while it still settles what it took beside
        # (fillers, recounts): given back to _pending if it is cancelled or the subscription
        # starts closing meanwhile (see _untake)
        self._taken: list[RabbitMQDelivery] | None = None
        # broker work on its channel that a cancelled caller left going on (see _unbroken)
        self._working: set[asyncio.Future[Any]] = set()
        self._entered = False
        self._closing: asyncio.Task[None] | None = None
        self._resuming: asyncio.Task[None] | None = None
        # the channel its consumers were started on, and their consumer tags
        self._tags: tuple[Any, list[str]] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            raise ConfigurationError("a subscription can be entered once")
        self._entered = True
        transport = self._transport
        conn = await transport._connect()
        try:
            async with transport._calling(f"cannot subscribe to {self.topic!r}"):
                try:
                    channel = await conn.channel(publisher_confirms=True)
                    self._channel = channel
                    await channel.set_qos(prefetch_count=self.prefetches()[0])
                    await self._start(await channel.get_underlay_channel())
                except aiormq.exceptions.ChannelPreconditionFailed as e:
                    raise ConfigurationError(
                        f"queue {self.queue!r} exists with other arguments"
                        f"{_differing_argument(e)}: {e}"
                    ) from e
        except BaseException:
            await self.close()
            raise
        # after a reconnect the robust channel reopens; consume again on the new channel
        channel.reopen_callbacks.add(self._on_reopen)
        return self

    async def close(self) -> None:
        """Stop consuming. What it received but never handed out goes back without counting
        an attempt (moved: :meth:`_give_back`; in ordered mode, in place, with a record:
        :meth:`_record_given_back`); what it handed out and was not settled goes back by
        closing the channel, so the broker redelivers it, counted once. A ``receive()`` in
        flight returns ``[]`` and hands out nothing more: what it took goes back with the
        rest. Cancelling it (a consumer task cancelled as it closes) cancels only the wait:
        the closing goes on in the background, so what it holds still goes back uncounted."""
        closing = self._closing
        if closing is None:
            if self._closed:
                return
            # from now on nothing is handed out: a receive() in flight returns []
            self._stopping = True
            self._untake()
            self._signal.set()
            closing = self._closing = asyncio.get_running_loop().create_task(
                self._close(), name=f"msdata-rabbitmq-close:{self.queue}"
            )
        await asyncio.shield(closing)

    async def _close(self) -> None:
        if self._entered:
            try:
                async with asyncio.timeout(_GIVE_BACK_TIMEOUT):
                    # what a cancelled receive() or settle left going on ends first (a
                    # given-back record it read, a copy it moved)
                    while self._working:
                        await asyncio.wait(set(self._working))
                    if self._ordered:
                        await self._record_given_back()
                    else:
                        await self._give_back()
            except Exception as e:  # not given back: the closing channel hands them back
                log.warning("giving back what %s holds failed: %s", self.queue, e)
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
        if channel is not None:
            # closing the channel hands every unsettled delivery back to the queue
            await _close_within(channel, self._transport.connect_timeout, self.queue)

    async def _start(self, raw: Any) -> None:
        # on every (re)start, what the topic's holding queue has is routed again: right after
        # a broker restart a confirmed message can land there though the group exists
        # (see _adopt_unrouted)
        await self._transport._declare_group(raw, self.topic, self.group, adopt=True)
        # basic.qos (not global) applies to the consumers started after it on the channel
        main, ready = self.prefetches()
        await raw.basic_qos(prefetch_count=main)
        tags = [(await raw.basic_consume(self.queue, self._on_message)).consumer_tag]
        if not self._ordered:
            # its own consumer, with its own prefetch: retries are not held up by the queue's
            await raw.basic_qos(prefetch_count=ready)
            tags.append((await raw.basic_consume(self.ready_queue, self._on_message)).consumer_tag)
        self._tags = (raw, tags)

    def prefetches(self) -> tuple[int, int]:
        """The prefetch of the consumer of the group's queue and of its ready queue (0 in
        ordered mode, which has none), at least one each. With ``fits =
        max_held_bytes // max_message_bytes`` (60 by default): the ready queue gets a
        quarter of ``min(prefetch, fits)``, the group's queue ``prefetch``, or what is left
        of ``fits`` if that is less. RabbitMQ pushes a consumer up to its prefetch of
        unsettled deliveries whatever their size, so this is what bounds what the
        subscription holds: messages within ``max_message_bytes`` take at most
        ``max_held_bytes`` (one message per consumer if ``max_held_bytes`` is below
        ``max_message_bytes``)."""
        t = self._transport
        fits = t.max_held_bytes // t.max_message_bytes
        if self._ordered:
            return max(1, min(self.prefetch, fits)), 0
        ready = max(1, min(self.prefetch, fits) // 4)
        return max(1, min(self.prefetch, fits - ready)), ready

    def _on_reopen(self, _channel: Any) -> None:
        # called inside the connection's recovery, which must finish before the channel is
        # usable: consume again from a task of our own
        if self._closed or self._channel is None:
            return
        # what was taken on the old channel is void; our moved copies are in the queue in order
        self._recount.clear()
        self._moving.clear()
        self._live.clear()
        self._unacked.clear()
        self._fillers.clear()
        self._records.clear()  # held on the old channel: the broker took them back
        if self._resuming is not None:
            self._resuming.cancel()
        self._resuming = asyncio.get_running_loop().create_task(self._resume())

    async def _resume(self) -> None:
        channel = self._channel
        while not self._closed and channel is not None:
            try:
                async with self._transport._calling(f"resuming the consumer of {self.queue!r}"):
                    await self._start(await channel.get_underlay_channel())
                return
            except Exception:
                log.warning("resuming the consumer of %s failed", self.queue, exc_info=True)
            if channel.is_closed:
                return  # it reopens, and calls _on_reopen again
            await asyncio.sleep(1.0)

    async def _give_back(self) -> None:
        """Cancel the consumers, then move every delivery received but never handed out to
        the group's ready queue with the attempt it would have been handed out with (a copy
        with ``x-msdata-prior-attempts`` = that attempt - 1, confirmed, then the original
        acked). Closing the channel with them unacked would make the broker flag them as
        redelivered, which counts an attempt (see the module docstring): so consumers that
        stop, however many times and however many there are, would push a message that was
        never handled to ``max_attempts`` and the dead-letter topic. Not in ordered mode: a
        copy at the back of a queue would pass the later messages of its key. On a quorum
        queue each consumer is first made to hold its whole prefetch
        (:meth:`_exhaust_credit`), so nothing is on its way to it when it is cancelled."""
        tags, self._tags = self._tags, None
        if tags is None or tags[0].is_closed:
            return
        raw, consumer_tags = tags
        if self._counts_deliveries:
            self._quiescing = True  # acks wait for the cancel: an ack would let more in
            try:
                queues = (self.queue, self.ready_queue)
                for queue, tag, prefetch in zip(
                    queues, consumer_tags, self.prefetches(), strict=False
                ):
                    await self._exhaust_credit(raw, queue, tag, prefetch)
                await self._cancel(raw, consumer_tags)
            finally:
                self._quiescing = False
                deferred, self._deferred = self._deferred, []
                for entry in deferred:
                    await self._ack_entry(entry)
        else:
            await self._cancel(raw, consumer_tags)
        # a round trip: what the broker sent before cancel-ok has reached us before its reply
        await _on_channel(raw, raw.queue_declare(self.queue, passive=True))
        # the driver hands each delivery to _on_message in a task of its own: let those
        # run, then move what is pending (again, while more comes)
        for _ in range(3):
            await asyncio.sleep(0.01)
            for entry in self._pending:
                if entry.stale:
                    continue
                if entry.message is None:
                    entry.parse(self._counts_deliveries)
                if entry.filler:
                    self._fillers.append(entry)
                elif self._settled_before(entry):
                    self._ack_again(entry)
                else:
                    self._recount.append(entry)
            self._pending.clear()
            await self._drop_fillers()
            if not self._recount:
                break
            await self._settle_recount()

    async def _cancel(self, raw: Any, consumer_tags: Sequence[str]) -> None:
        for tag in consumer_tags:
            await _on_channel(raw, raw.basic_cancel(tag))
            # a delivery that was on its way before cancel-ok comes after it, and the driver
            # drops a delivery whose consumer it forgot (left unacked, the closing channel
            # would hand it back, counted): keep taking them
            raw.consumers.setdefault(tag, self._on_message)

    async def _exhaust_credit(self, raw: Any, queue: str, tag: str, prefetch: int) -> bool:
        """Before consumer ``tag`` of ``queue`` stops (cancelled, or its channel closed),
        make it hold ``prefetch`` unacked deliveries, so nothing is on its way to it then:
        its prefetch on a quorum queue, 1 on a classic queue in ordered mode (under the
        channel-wide ``basic.qos`` of 1 set first, see :meth:`_record_given_back`). True if
        it does (False: it gave up, and a delivery may still be on its way; with single
        active consumer, a consumer that was never sent anything gives up at once: another
        one is active).

        Why: RabbitMQ's quorum queue client (``rabbit_fifo_client``, 3.10 to 3.13) forgets a
        consumer as soon as it handles ``basic.cancel`` and *returns* a delivery that reaches
        the channel after that, and a closing channel returns every delivery it holds or is
        sent: both raise ``x-delivery-count``, so a message never handed to us would come back
        counted. The queue sends a consumer a delivery only while it has credit (its
        prefetch minus what it holds; an ack gives one back), so a consumer that holds its
        prefetch, counting only acks we sent, is sent nothing, whatever acks the broker has
        yet to apply, as long as we ack nothing more. If the queue has too few messages to
        fill it, this puts *fillers* into the queue (empty messages with
        :data:`FILLER_HEADER`, through the default exchange, confirmed on this channel: the
        deliveries they cause reach us before their confirms); whoever receives a filler
        acks it, never hands it out. A filler expires 0.2 s after it entered the queue
        (per-message TTL) unless a consumer holds it then: one that a closing channel hands
        back, or that went to no consumer, does not stay in the queue."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _EXHAUST_TIMEOUT
        wait = _EXHAUST_WAIT
        budget = 2 * prefetch
        while True:
            # a round trip: what the broker sent before its reply has reached us
            ok = await _on_channel(raw, raw.queue_declare(queue, passive=True))
            await asyncio.sleep(0)  # the driver's tasks hand us what arrived
            held = sum(1 for e in self._unacked if e.tag == tag and not e.stale)
            if held >= prefetch:
                return True
            if not ok.message_count:
                # the queue has too few messages to fill it: fillers (while competing
                # consumers do not take them all)
                if budget <= 0:
                    break
                n = min(prefetch - held, budget)
                budget -= n
                await self._publish_fillers(raw, queue, n)
                await asyncio.sleep(0)
                if self._ordered and tag not in self._sent_to:
                    # a single active consumer is sent them at once: another one is active
                    # (if this one becomes active now, what it is sent may come back counted)
                    return False
                continue
            # messages are ready, so the queue sees it hold its prefetch: acks it sent are
            # still to be applied (then it is sent more)
            if loop.time() + wait > deadline:
                break
            await asyncio.sleep(wait)
            wait = min(2 * wait, 0.1)
        log.debug("a consumer of %s stops not holding its prefetch", queue)
        return False

    async def _publish_fillers(self, raw: Any, queue: str, n: int) -> None:
        props = Basic.Properties(
            message_id=f"msdata-filler:{self._marker}",
            delivery_mode=_PERSISTENT,
            expiration=str(_FILLER_TTL_MS),
            headers={FILLER_HEADER: self._marker},
        )
        results = await asyncio.gather(
            *[
                _on_channel(
                    raw, raw.basic_publish(b"", exchange="", routing_key=queue, properties=props)
                )
                for _ in range(n)
            ],
            return_exceptions=True,
        )
        _confirmed(results, f"filling the consumer of {queue!r}")

    async def _ack_entry(self, entry: _Entry) -> None:
        """Ack ``entry`` (held back while a closing subscription waits for its consumers to
        be cancelled: see :meth:`_give_back`)."""
        if not entry.filler:
            # also on a dropped channel (the ack is void): its redelivery is acked again
            self._remember(entry)
        if self._tracks:
            if self._quiescing:
                self._deferred.append(entry)
                return
            self._unacked.discard(entry)
        await _ack(entry.raw)

    # -- settled before: a redelivery whose ack was lost ------------------------------------

    def _remember(self, entry: _Entry) -> None:
        """Remember that ``entry`` is settled (acked, or acked after its copy, retry or dead
        letter was confirmed), in the transport's memory of the group's latest settlements
        (see :meth:`_settled_before`)."""
        if entry.message is None:
            return
        self._settlements.add(entry.settled_key())

    def _settled_before(self, entry: _Entry) -> bool:
        """Whether ``entry`` (parsed) is a redelivery of a delivery of this group that a
        subscription of this transport settled: its ack was lost with the connection.

        Why: ``basic.ack`` has no reply, and a delivery tag names a delivery on its channel
        only. An ack written while the connection is silent, or as it drops, may never be
        processed (only a reply to a later synchronous call on the same channel would prove
        it was); the connection then goes, the broker puts the message back, flagged as
        redelivered, and the ack cannot be sent again on a new channel. Handed out, the
        message would come again, counted (a classic queue moves it, a quorum queue raises
        ``x-delivery-count``), after the application acked it (or after its retry or dead
        letter went out). So every subscription remembers its settlements, the latest
        ``_SETTLED_KEPT`` (at least) of the group in this transport, by
        :meth:`_Entry.settled_key`
        (copies msdata makes carry names of their own, :data:`COPY_HEADER`, so another copy
        of the same message is not taken for it), and a flagged redelivery of one of them is
        acked again and never handed out, counting nothing. A first delivery never matches
        (a message is delivered flagged once its channel has gone). The memory is the
        transport's: another subscription of the group in this transport (that took over
        the redelivery) acks it too; another process, or this one restarted, cannot know,
        and hands the message out again counted: at least once, which the inbox covers."""
        if not entry.raw.redelivered or not self._settlements:
            return False
        return entry.settled_key() in self._settlements

    def _ack_again(self, entry: _Entry) -> None:
        """``entry`` was settled before (see :meth:`_settled_before`): ack it with the
        fillers, never hand it out."""
        message = entry.message
        assert message is not None
        log.info(
            "%s in %s came back after it was settled (its ack was lost with the connection): "
            "acked again, not handed out",
            message.id,
            self.queue,
        )
        self._fillers.append(entry)

    async def _drop_fillers(self) -> None:
        """Ack the fillers received (never handed out; see :meth:`_exhaust_credit`)."""
        fillers, self._fillers = self._fillers, []
        for entry in fillers:
            self._live.discard(entry)
            await self._ack_entry(entry)

    def _on_message(self, raw: DeliveredMessage) -> None:
        if self._closed:
            return  # the closing channel hands it back
        entry = _Entry(raw)
        if self._tracks:
            tag = entry.tag = getattr(raw.delivery, "consumer_tag", None)
            if tag is not None:
                self._unacked.add(entry)
                self._sent_to.add(tag)
        if self._ordered:
            self._live.add(entry)
        self._pending.append(entry)
        self._signal.set()

    # -- given back uncounted, in place (ordered mode) -----------------------------------------

    async def _record_given_back(self) -> None:
        """Ordered mode: record, in the group's given-back queue, what this subscription
        holds with the attempt each must come back with; then :meth:`close` closes the
        channel, and the broker puts them back at their places in the queue, so order per
        key holds.

        Why a record: the broker flags what a closing channel gives back as redelivered
        (a quorum queue also raises ``x-delivery-count``), which counts an attempt, as for a
        consumer that died holding it; a copy at the back of the queue (what an unordered
        subscription gives back) would pass the later messages of its key. The record says
        what the flag cannot: a delivery never handed out (or released) comes back with its
        attempt; one held for a retry with the retry's; one handed out and not settled one
        higher. The next consumer to receive one of them uses its record, once
        (:meth:`_look_up_given_back`). A consumer that dies writes no record: all it held
        counts, as the port says. Records read but not matched yet are written back too.

        Nothing may arrive unrecorded between the record and the close (it would come back
        counted): a channel-wide ``basic.qos`` of 1 stops a classic queue from sending to a
        channel that holds a delivery, two round trips bring in what it sent before, and
        what came meanwhile is recorded in another round. A quorum queue ignores a
        channel-wide ``basic.qos``: there the consumer is made to hold its whole prefetch
        first (:meth:`_exhaust_credit`), so it is sent nothing more (fillers are not
        recorded: whoever receives one acks it)."""
        tags = self._tags
        if tags is None or tags[0].is_closed:
            return
        raw, consumer_tags = tags
        with _amqp_errors(f"recording what {self.queue!r} gives back"):
            if not self._counts_deliveries:
                await _on_channel(raw, raw.basic_qos(prefetch_count=1, global_=True))
            now = time.time()
            recorded: set[_Entry] = set()
            # until a round finds nothing new (holding one delivery or more, the channel is
            # sent nothing more; a few rounds at most, for a queue that does not stop)
            for _ in range(5):
                # the channel-wide basic.qos of 1 of a classic queue, the consumer's
                # prefetch on a quorum queue
                limit = self.prefetches()[0] if self._counts_deliveries else 1
                await self._exhaust_credit(raw, self.queue, consumer_tags[0], limit)
                for _ in range(2):
                    await _on_channel(raw, raw.queue_declare(self.queue, passive=True))
                await asyncio.sleep(0)  # the driver's tasks hand us what arrived
                fresh = [e for e in self._live if e not in recorded and not e.stale]
                if not fresh:
                    break
                recorded.update(fresh)
                for entry in fresh:
                    if entry.message is None:
                        entry.parse(self._counts_deliveries)
                # nor is a redelivery of what was settled before (an ack now could let
                # an unrecorded delivery in): the close hands it back, and a subscription
                # of this transport acks it again (see _settled_before)
                fresh = [e for e in fresh if not e.filler and not self._settled_before(e)]
                if not fresh:
                    continue
                # a redelivery not looked up yet carries on its own record, not a count
                await self._look_up_given_back(fresh)
                bodies: list[bytes] = []
                for entry in fresh:
                    attempt = entry.attempt + 1 if entry.out else entry.attempt
                    bodies.append(json.dumps([*entry.given_back_key(), attempt, now]).encode())
                await self._publish_given_back(raw, bodies)
                recorded.update(fresh)
            # the records it read and did not use go back written anew, before the close:
            # handed back by the close, they could reach the queue after their redelivery
            # reached the next consumer
            bodies = []
            used: list[tuple[Any, int]] = []
            for key, kept in self._records.items():
                for attempt, at, channel, tag in kept:
                    used.append((channel, tag))
                    if now - at < _GIVEN_BACK_KEPT:
                        bodies.append(json.dumps([*key, attempt, at]).encode())
            self._records.clear()
            if bodies:
                await self._publish_given_back(raw, bodies)
            for channel, tag in used:
                await _on_channel(channel, channel.basic_ack(tag))

    async def _publish_given_back(self, raw: Any, bodies: Sequence[bytes]) -> None:
        name = _given_back_name(self.queue)
        props = Basic.Properties(delivery_mode=_PERSISTENT, content_type="application/json")
        results = await asyncio.gather(
            *[
                _on_channel(
                    raw, raw.basic_publish(body, exchange="", routing_key=name, properties=props)
                )
                for body in bodies
            ],
            return_exceptions=True,
        )
        _confirmed(results, f"recording what {self.queue!r} gives back")

    async def _look_up_given_back(self, entries: Iterable[_Entry]) -> None:
        """Ordered mode: give each redelivery waiting to be handed out the attempt its
        given-back record says (see :meth:`_record_given_back`), reading the group's
        given-back queue if a record is not known yet. A record is used once; without one,
        the redelivery counts as the broker says (its consumer died, or it was handed out)."""
        waiting = [e for e in entries if not e.looked and e.raw.redelivered and not e.stale]
        if not waiting:
            return
        for entry in waiting:
            if entry.message is None:
                entry.parse(self._counts_deliveries)
        # a redelivery of what was settled before is acked again, never handed out
        waiting = [e for e in waiting if not e.filler and not self._settled_before(e)]
        if not waiting:
            return
        keys = [e.given_back_key() for e in waiting]
        if any(k not in self._records for k in keys):
            try:
                await self._read_given_back(waiting[0].raw.channel)
            except MsdataError as e:  # counted as the broker says, then
                log.warning("%s", e)
        records = self._records
        used: list[tuple[Any, int]] = []
        for entry, key in zip(waiting, keys, strict=True):
            entry.looked = True
            kept = records.get(key)
            if kept:
                attempt, _, channel, tag = kept.pop()
                entry.attempt = attempt
                entry.known = True
                used.append((channel, tag))
                if not kept:
                    del records[key]
        for channel, tag in used:  # each record is used once
            # a channel that closed meanwhile handed its deliveries back, counted: the record
            # goes back too (a later redelivery of the message may use it)
            with contextlib.suppress(*_AMQP_ERRORS):
                await _on_channel(channel, channel.basic_ack(tag))
        if used:
            # a round trip: the broker has the acks before the redeliveries are handed out,
            # so a process killed after handing one out leaves no record behind to uncount it
            channel = used[-1][0]
            with contextlib.suppress(*_AMQP_ERRORS):
                await _on_channel(channel, channel.queue_declare(self.queue, passive=True))

    async def _read_given_back(self, raw: Any) -> None:
        """Take every record in the group's given-back queue into :attr:`_records`, unacked
        (acked when used; if this consumer dies, the broker hands them back to the queue)."""
        name = _given_back_name(self.queue)
        with _amqp_errors(f"reading the given-back records of {self.queue!r}"):
            while True:
                got = await _on_channel(raw, raw.basic_get(name))
                if not isinstance(got.delivery, Basic.GetOk):
                    break
                # only msdata's own, through the default exchange, and not stale
                record = _given_back_record(got.body) if got.exchange == "" else None
                if record is None or time.time() - record[4] >= _GIVEN_BACK_KEPT:
                    # each alone: ``multiple`` would ack the deliveries it holds too
                    await _on_channel(raw, raw.basic_ack(got.delivery_tag))
                    continue
                message_id, prior, digest, attempt, at = record
                self._records.setdefault((message_id, prior, digest), []).append(
                    (attempt, at, raw, got.delivery_tag)
                )

    # -- receiving -----------------------------------------------------------------------------

    async def receive(
        self, max_messages: int = 100, timeout: float = 1.0
    ) -> list[RabbitMQDelivery]:
        """See :meth:`msdata.transport.Subscription.receive`. Cancelled at any moment, it
        hands out nothing, and what it took goes back to be handed out (uncounted); the
        broker calls it was making go on (see :meth:`_unbroken`). In flight when the
        subscription starts closing, it returns ``[]`` (see :meth:`close`)."""
        if self._closed or self._transport._closed:
            raise TransportClosed("receive() on a closed subscription")
        if not self._entered:
            raise ConfigurationError("use the subscription as `async with` before receive()")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._stopping:  # what it holds goes back with the close, uncounted
                return await self._stopped(deadline)
            if self._ordered and self._pending:
                head = self._pending[0]
                if not head.looked and head.raw.redelivered and not head.stale:
                    await self._unbroken(self._look_up_given_back(self._pending))
                    if self._stopping:
                        return await self._stopped(deadline)
            out = self._take(max_messages)
            if self._fillers or self._recount:
                # not under the timeout: what was taken is handed out or moved, never dropped
                self._taken = out
                try:
                    await self._unbroken(self._settle_taken())
                except BaseException:
                    self._untake()
                    raise
                if self._taken is not out:  # it started closing: given back (see close)
                    return await self._stopped(deadline)
                self._taken = None
            if out:
                return out
            left = deadline - loop.time()
            if left <= 0 or self._closed:
                return []
            try:
                async with asyncio.timeout(left):
                    await self._signal.wait()
            except TimeoutError:
                return []

    async def _stopped(self, deadline: float) -> list[RabbitMQDelivery]:
        """What ``receive()`` returns once the subscription started closing: nothing. It
        waits for the close to end (until its own ``deadline``, loop time) rather than
        return at once without yielding: a loop of ``receive()`` calls would spin and the
        close would never run."""
        closing = self._closing
        left = deadline - asyncio.get_running_loop().time()
        if closing is not None and not closing.done() and left > 0:
            await asyncio.wait({closing}, timeout=left)
        else:
            await asyncio.sleep(0)
        return []

    async def _settle_taken(self) -> None:
        """Ack the fillers and move (or dead-letter) the recounts :meth:`_take` set aside."""
        if self._fillers:
            await self._drop_fillers()
        if self._recount:
            await self._settle_recount()

    def _untake(self) -> None:
        """Put back what a ``receive()`` took and did not hand out (:attr:`_taken`), at the
        head of :attr:`_pending`, as if never taken: handed out later, or given back
        uncounted by the close."""
        taken, self._taken = self._taken, None
        if not taken:
            return
        for delivery in reversed(taken):
            delivery._settled = True  # never handed out: it settles nothing
            entry = delivery._entry
            if self._ordered:
                self._requeue_here(entry)  # its key free again, entry.out reset
            else:
                self._pending.appendleft(entry)
        self._signal.set()

    async def _unbroken(self, work: Awaitable[_T]) -> _T:
        """Await ``work`` (broker calls on the subscription's channel) in a task of its own:
        cancelling the caller cancels only the wait, and :meth:`close` waits for the task
        before it gives back what the subscription holds.

        Why: aiormq closes a channel whose synchronous call (``basic.get``,
        ``queue.declare``, ...) is cancelled ("Closing channel ... because RPC call ...
        cancelled"), and a closed channel hands back every delivery it holds flagged as
        redelivered, so counted, and records nothing more (the close then fails with
        "Channel closed by RPC timeout"). A consumer task cancelled while its ``receive()``
        read the given-back records of its group (as a stopping bus cancels a consumer
        when its ``stop_timeout`` runs out) so counted what several closing consumers of a
        group gave back."""
        task = asyncio.ensure_future(work)
        self._working.add(task)
        task.add_done_callback(self._work_done)
        return await asyncio.shield(task)

    def _work_done(self, task: asyncio.Future[Any]) -> None:
        self._working.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the caller that awaited it may be gone

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
            if entry.filler:
                self._fillers.append(entry)  # acked, never handed out
                continue
            if self._settled_before(entry):
                self._ack_again(entry)
                continue
            if ordered and not entry.looked and entry.raw.redelivered:
                # its given-back record is looked for first (see receive)
                pending.appendleft(entry)
                break
            key = message.key
            if self._needs_recount(entry, key):
                self._recount.append(entry)
                continue
            if ordered:
                if key is not None:
                    if key in busy:
                        self._blocked.setdefault(key, deque()).append(entry)
                        continue
                    busy[key] = entry
                entry.out = True
            out.append(RabbitMQDelivery(self, entry, message))
        if not pending:
            self._signal.clear()
        return out

    # -- true attempt counts -----------------------------------------------------------------

    def _needs_recount(self, entry: _Entry, key: str | None) -> bool:
        """Whether ``entry`` must not be handed out as it is: it is overdue, or its count is
        unknown (a classic queue's redelivery), or (ordered mode) earlier messages of its key
        are being moved to the back of the queue, so it must follow them there."""
        moving = self._moving
        follows = False
        if key is not None and key in moving:
            if entry.moved == self._marker:
                self._moved_back(key)  # one of our moved copies is back
            else:
                follows = True
        if entry.attempt > self.max_attempts:
            return True  # dead-lettered, not moved
        if entry.not_before and entry.not_before > time.time():
            return True  # a delayed retry with more delay to go
        if follows or (entry.raw.redelivered and not self._counts_deliveries and not entry.known):
            if self._ordered and key is not None:
                moving[key] = moving.get(key, 0) + 1
            return True
        return False

    def _moved_back(self, key: str) -> None:
        left = self._moving[key] - 1
        if left:
            self._moving[key] = left
        else:
            del self._moving[key]

    async def _settle_recount(self) -> None:
        """Dead-letter the overdue entries; move the others, each with the count of its
        deliveries so far, to the back of the group's queue (confirmed, then the original
        acked). So a classic queue's redelivery (its consumer died, or closed, holding it) is
        counted, however many times it happens: attempt counts are msdata's own record,
        carried by the message. One call at a time (a release, a receive, a close):
        two at once would both move, and ack, the same entries, and a delivery acked twice
        makes the broker close the channel (``PRECONDITION_FAILED - unknown delivery tag``),
        which hands back all it holds, counted."""
        async with self._recounting:
            await self._move_recount()

    async def _move_recount(self) -> None:
        recount = self._recount
        # taken off the list only once done with: if this task is cancelled meanwhile, the
        # next receive() carries on with them (a copy sent twice is a duplicate, allowed).
        # Each copy goes out on the channel its original came on, so it is only confirmed
        # while the original can still be acked: on a channel that closed meanwhile the
        # copy fails, and the broker delivers the original again (flagged, so counted).
        batch = list(recount)
        copies: list[tuple[_Entry, str, Basic.Properties]] = []
        for entry in batch:
            try:
                planned = await self._plan_move(entry.raw.channel, entry)
            except MsdataError as e:
                self._not_moved(entry, e)
                continue
            if planned is not None:
                copies.append((entry, *planned))
        if copies:
            # every copy in flight at once (in order), then each original acked once its
            # copy is confirmed
            results = await asyncio.gather(
                *[
                    _on_channel(
                        e.raw.channel,
                        e.raw.channel.basic_publish(
                            e.raw.body, exchange="", routing_key=q, properties=p
                        ),
                    )
                    for e, q, p in copies
                ],
                return_exceptions=True,
            )
            channels: dict[int, Any] = {}
            for (entry, _, _), result in zip(copies, results, strict=True):
                if isinstance(result, Basic.Ack):
                    self._live.discard(entry)
                    await self._ack_entry(entry)
                    channels[id(entry.raw.channel)] = entry.raw.channel
                else:
                    self._not_moved(entry, result)
            for channel in channels.values():
                try:
                    # a round trip on the channel: the broker has processed the acks sent
                    # before it, so a process killed after handing out a copy does not leave
                    # its original behind (which would come back counted one lower)
                    with _amqp_errors(f"syncing the channel of {self.queue!r}"):
                        await _on_channel(channel, channel.queue_declare(self.queue, passive=True))
                except MsdataError as e:
                    log.warning("%s", e)
        done = {id(e) for e in batch}
        recount[:] = [e for e in recount if id(e) not in done]

    def _not_moved(self, entry: _Entry, error: object) -> None:
        # not moved: the broker hands it out again when the channel goes
        message = entry.message
        assert message is not None
        key = message.key
        if self._ordered and key is not None and key in self._moving:
            self._moved_back(key)
        log.warning("could not move %s in %s: %s", message.id, self.queue, error)

    async def _plan_move(self, raw: Any, entry: _Entry) -> tuple[str, Basic.Properties] | None:
        """Dead-letter ``entry`` if overdue (None), drop it if stale (None: the broker took it
        back), else the queue its copy goes to and the copy's properties."""
        message = entry.message
        assert message is not None
        moves = entry.attempt <= self.max_attempts
        key = message.key if self._ordered and moves else None
        if entry.stale:
            if key is not None and key in self._moving:
                self._moved_back(key)
            return None
        with _amqp_errors(f"moving {message.id} in {self.queue!r}"):
            reason = deadletter.overdue_reason(entry.attempt, self.max_attempts)
            if reason is not None:
                attempts = deadletter.overdue_attempts(entry.attempt)
                await self._dead_letter_entry(raw, entry, reason, attempts)
                return None
            props = _properties(message)
            headers = dict(props.headers or {})
            headers[PRIOR_ATTEMPTS_HEADER] = entry.attempt - 1
            headers[COPY_HEADER] = self._copy_name()
            if key is not None:
                headers[MOVED_HEADER] = self._marker
            left = entry.not_before - time.time()
            if self._ordered:
                target = self.queue  # behind the later messages of its key
            elif left > 0:
                target = await self._tier_queue(raw, left, headers, entry.not_before)
            else:
                target = self.ready_queue
            props.headers = headers
            _copy_properties(props, entry.raw.header.properties)
            return target, props

    # -- order per key (ordered mode) ----------------------------------------------------------

    def _release_key(self, entry: _Entry) -> None:
        """``entry`` is settled: let the next entry of its key be handed out."""
        if not self._ordered:
            return
        self._live.discard(entry)
        entry.out = False
        if entry.message is None:
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
        entry.out = False
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
        entry.out = False
        if self._closed:
            return
        key = entry.message.key if entry.message is not None else None
        if key is not None and self._busy.get(key) is entry:
            del self._busy[key]
        self._pending.appendleft(entry)
        self._signal.set()

    # -- retry and dead letters ----------------------------------------------------------------

    async def _retry_later(self, delivery: RabbitMQDelivery, delay: float) -> None:
        """A copy carrying the attempts made so far, confirmed, then the original acked: into
        the group's ready queue (consumed beside its queue, so a retry does not wait behind
        the backlog of first attempts), or, with a delay, into the retry tier queue of the
        longest tier not above it (it comes to the ready queue when its TTL runs out, and
        through further tiers until it is due)."""
        raw = delivery._entry.raw.channel
        m = delivery.message
        props = _properties(m)
        headers = dict(props.headers or {})
        headers[PRIOR_ATTEMPTS_HEADER] = delivery.attempt
        headers[COPY_HEADER] = self._copy_name()
        if delay <= 0:
            name = self.ready_queue
        else:
            with _amqp_errors(f"retry of {m.id} failed", PublishError):
                name = await self._tier_queue(raw, delay, headers, time.time() + delay)
        props.headers = headers
        await self._publish_then_ack(raw, delivery._entry, "", name, props, "retry")

    def _copy_name(self) -> str:
        """A name for a copy this subscription puts into its group's queues, its own."""
        self._copies += 1
        return f"{self._marker}.{self._copies}"

    async def _tier_queue(self, raw: Any, delay: float, headers: dict[str, Any], due: float) -> str:
        """Declare the retry tier queue for ``delay`` seconds and return its name; when the
        tier is shorter than the delay, ``headers`` get the time it is due (Unix ms)."""
        tier = _tier(delay)
        if tier < delay:
            headers[NOT_BEFORE_HEADER] = int(due * 1000)
        else:
            headers.pop(NOT_BEFORE_HEADER, None)
        tier_ms = round(tier * 1000)
        name = _retry_queue_name(self._transport.exchange_name(self.topic), self.group, tier_ms)
        # declared each time: that also restarts the queue's idle expiry
        await raw.queue_declare(
            name,
            durable=True,
            arguments={
                "x-message-ttl": tier_ms,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": self.ready_queue,
                "x-expires": tier_ms + _RETRY_QUEUE_GRACE_MS,
            },
        )
        self._transport._queues.add(name)
        return name

    async def _dead_letter(self, delivery: RabbitMQDelivery, reason: str) -> None:
        entry = delivery._entry
        await self._dead_letter_entry(entry.raw.channel, entry, reason, delivery.attempt)

    async def _dead_letter_entry(self, raw: Any, entry: _Entry, reason: str, attempts: int) -> None:
        message = entry.message
        assert message is not None
        letter = deadletter.dead_letter(message, self.topic, self.group, attempts, reason)
        m = letter.message
        headers: dict[str, Any] = dict(m.headers)
        if m.key is not None:
            headers[KEY_HEADER] = m.key
        props = Basic.Properties(message_id=m.id, delivery_mode=_PERSISTENT, headers=headers)
        _copy_properties(props, entry.raw.header.properties)
        exchange = self._transport.exchange_name(letter.topic)
        await self._publish_then_ack(raw, entry, exchange, "", props, "dead-letter")
        letter.log()

    async def _publish_then_ack(
        self,
        raw: Any,
        entry: _Entry,
        exchange: str,
        routing_key: str,
        props: Basic.Properties,
        what: str,
    ) -> None:
        mid = props.message_id
        with _amqp_errors(f"{what} of {mid} failed", PublishError):
            result = await _on_channel(
                raw,
                raw.basic_publish(
                    entry.raw.body, exchange=exchange, routing_key=routing_key, properties=props
                ),
            )
        _confirmed([result], f"{what} of {mid}")
        self._live.discard(entry)
        # if the channel dropped meanwhile, the original comes again: a duplicate, allowed
        await self._ack_entry(entry)


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
      before it raises :class:`~msdata.errors.PublishError` naming the broker.
    - ``connect_timeout`` (seconds, 10 by default): how long connecting waits for the broker,
      and how long :meth:`declare_group`, :meth:`lag`, entering a subscription and each step
      of closing wait for its answers (a long copy is given as long again after each batch
      the broker confirms). A broker that accepts the connection and never answers, or that
      stops answering later, makes them raise :class:`~msdata.errors.TransportError` naming
      it (``amqp://host:port/vhost``, without credentials) instead of waiting for ever.
      Calls made while a connect is in flight share it: they fail together, within that
      one ``connect_timeout`` (a bus starting N groups does not take N of them).
    - ``namespace``: on a broker shared with others, every exchange and queue name starts
      with ``<namespace>:`` (topic ``orders`` is exchange ``shop:orders``, its group queue
      ``shop:orders:billing``); the same option as on the other transports.
    - ``max_message_bytes``: the largest message ``publish`` sends, in bytes of its body plus
      the AMQP content-header frame that carries its id, key and headers
      (:data:`DEFAULT_MAX_MESSAGE_BYTES`: the codec's 1 MiB plus 64 KiB; at most 512 MiB,
      RabbitMQ's ceiling; keep it at or below the broker's ``max_message_size``, 128 MiB by
      default). A larger message is refused before sending, alone
      (:class:`~msdata.errors.MessageTooLarge` in ``PublishError.refused``). So is one whose
      content-header frame, with 8 KiB kept for the headers msdata adds to a retry or a dead
      letter, does not fit in the connection's negotiated ``frame_max`` (128 KiB by
      default): sent, it would make the broker close the connection.
    - ``max_held_bytes``: what one subscription holds (delivered by the broker, not yet
      settled) at most, in bytes (:data:`~msdata.transport.DEFAULT_MAX_HELD_BYTES`, 64 MiB).
      RabbitMQ pushes up to the consumer's prefetch, so the prefetch is what bounds it: a
      subscription's consumers together take at most ``max_held_bytes // max_message_bytes``
      unsettled deliveries (at least one each; never more than ``prefetch``), so messages
      within ``max_message_bytes`` take at most ``max_held_bytes`` (see
      :meth:`RabbitMQSubscription.prefetches`).
    """

    def __init__(
        self,
        connection: AbstractRobustConnection | None,
        *,
        ordered_per_key: bool = False,
        queue_type: str = "classic",
        publish_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        namespace: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
    ) -> None:
        if namespace is not None:
            check_name("namespace", namespace)
        for name, seconds in (
            ("publish_timeout", publish_timeout),
            ("connect_timeout", connect_timeout),
        ):
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
                raise ConfigurationError(f"{name} must be a number of seconds > 0: {seconds!r}")
        for name, value in (
            ("max_message_bytes", max_message_bytes),
            ("max_held_bytes", max_held_bytes),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(f"{name} must be a whole number >= 1: {value!r}")
        if max_message_bytes > _BROKER_MAX_MESSAGE_BYTES:
            raise ConfigurationError("max_message_bytes must be at most 512 MiB (RabbitMQ's)")
        self.max_message_bytes = max_message_bytes
        self.max_held_bytes = max_held_bytes
        self.namespace = namespace
        self._ns = f"{namespace}:" if namespace else ""
        if queue_type not in ("classic", "quorum"):
            raise ConfigurationError(f"queue_type must be 'classic' or 'quorum': {queue_type!r}")
        self.queue_type = queue_type
        self._connection = connection
        self._url: str | None = None
        #: the broker, as ``amqp://host:port/vhost`` without credentials (what errors name)
        self.address = _address_of(getattr(connection, "url", "amqp://?"))
        self._owns_connection = False
        self.features = ORDERED_FEATURES if ordered_per_key else FEATURES
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        self._publish_channel: AbstractRobustChannel | None = None
        self._lock = asyncio.Lock()
        # the connecting in flight, whose outcome every caller arriving meanwhile shares
        self._opening: asyncio.Future[AbstractRobustConnection] | None = None
        self._closing_late: set[asyncio.Future[None]] = set()
        # exchanges known to exist (re-declared after a failed publish), and every exchange and
        # queue ever declared (for `declared`)
        self._topics: set[str] = set()
        self._exchanges: set[str] = set()
        self._queues: set[str] = set()
        self._subscriptions: set[RabbitMQSubscription] = set()
        # group queue -> its latest settlements (see RabbitMQSubscription._settled_before)
        self._settlements: dict[str, _Settlements] = {}
        # per dead-letter exchange: one group's copy of its history at a time (one that holds
        # the history while copying it would hide it from another)
        self._history_locks: dict[str, asyncio.Lock] = {}
        self._closed = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        ordered_per_key: bool = False,
        queue_type: str = "classic",
        publish_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        namespace: str | None = None,
        max_message_bytes: int | None = None,
        max_held_bytes: int | None = None,
    ) -> RabbitMQTransport:
        """``amqp://user:password@host:port/vhost`` (or ``amqps://``); connects on first use.
        ``max_message_bytes``, ``max_held_bytes`` and ``namespace`` may also be given as query
        parameters (``amqp://host/?max_message_bytes=65536&namespace=shop``), the keywords
        winning; the other query parameters go to aio-pika (those it reads: see
        ``_DRIVER_URL_OPTIONS``; any other, such as a misspelt ``hearbeat``, is a
        :class:`ConfigurationError` naming it)."""
        if not url.startswith(("amqp://", "amqps://")):
            raise ConfigurationError(f"not an amqp:// URL: {redact_url(url)!r}")
        url, found = pop_url_options(
            url,
            ("max_message_bytes", "max_held_bytes"),
            driver=_DRIVER_URL_OPTIONS,
            text=("namespace",),
            passes_on=False,
        )
        if namespace is not None:
            found["namespace"] = namespace
        if max_message_bytes is not None:
            found["max_message_bytes"] = max_message_bytes
        if max_held_bytes is not None:
            found["max_held_bytes"] = max_held_bytes
        transport = cls(
            None,
            ordered_per_key=ordered_per_key,
            queue_type=queue_type,
            publish_timeout=publish_timeout,
            connect_timeout=connect_timeout,
            **found,
        )
        transport._url = url
        transport.address = _address_of(url)
        transport._owns_connection = True
        return transport

    def _settlements_of(self, queue: str) -> _Settlements:
        """The memory of the latest settlements of the group whose queue is ``queue``, shared
        by the group's subscriptions in this transport (see
        :meth:`RabbitMQSubscription._settled_before`)."""
        settlements = self._settlements.get(queue)
        if settlements is None:
            settlements = self._settlements[queue] = _Settlements()
        return settlements

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
        # one attempt at a time, and the callers that arrive while it is in flight share its
        # outcome: against a broker that never answers, N calls made together (a bus
        # starting N groups) fail together within one connect_timeout, not one after the
        # other in N of them. A call made after a failed attempt makes an attempt of its own.
        opening = self._opening
        if opening is None:
            opening = self._opening = asyncio.ensure_future(self._open())
            opening.add_done_callback(self._opened)
        # a caller cancelled does not cancel the attempt the others wait for
        return await asyncio.shield(opening)

    def _opened(self, opening: asyncio.Future[AbstractRobustConnection]) -> None:
        self._opening = None
        if opening.cancelled() or opening.exception() is not None:
            return  # (retrieved: raised to every caller that waits, logged by none)
        conn = opening.result()
        if self._closed:  # closed as it connected: nobody will use or close it
            closing = asyncio.ensure_future(self._close_late(conn))
            self._closing_late.add(closing)
            closing.add_done_callback(self._closing_late.discard)
            return
        self._connection = conn

    async def _close_late(self, conn: AbstractRobustConnection) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.connect_timeout):
                await conn.close()

    async def _open(self) -> AbstractRobustConnection:
        """A robust connection to the broker, within ``connect_timeout`` (a broker that
        accepts the connection and never answers would be waited for for ever); raises
        :class:`TransportError` naming the broker."""
        assert self._url is not None
        seconds = self.connect_timeout
        conn = aio_pika.RobustConnection(aio_pika.connection.make_url(self._url))
        try:
            async with asyncio.timeout(seconds):
                await conn.connect(timeout=seconds)
        except BaseException as e:
            # its reconnection task must not outlive the attempt
            with contextlib.suppress(Exception):
                async with asyncio.timeout(seconds):
                    await conn.close()
            if isinstance(e, TimeoutError):
                raise TransportError(
                    f"could not connect to RabbitMQ at {self.address}: no answer within "
                    f"{seconds}s (connect_timeout)"
                ) from e
            if isinstance(e, _AMQP_ERRORS):
                raise TransportError(
                    f"could not connect to RabbitMQ at {self.address}: {type(e).__name__}: {e}"
                ) from e
            raise
        return conn

    @contextlib.asynccontextmanager
    async def _calling(
        self, what: str, error: type[TransportError] = TransportError
    ) -> AsyncIterator[None]:
        """Where broker calls are made (``async with self._calling("what"):``): the driver's
        errors become ``error`` (see :func:`_amqp_errors`), and a broker that does not answer
        within ``connect_timeout`` (pushed back by :func:`_progressed`) makes it raise
        ``error`` naming the broker, instead of waiting for ever."""
        seconds = self.connect_timeout
        try:
            async with asyncio.timeout(seconds) as deadline:
                token = _DEADLINE.set((deadline, seconds))
                try:
                    with _amqp_errors(f"{what} (RabbitMQ at {self.address})", error):
                        yield
                finally:
                    _DEADLINE.reset(token)
        except TimeoutError as e:  # the deadline's (the driver's own became ``error`` above)
            raise error(
                f"{what}: RabbitMQ at {self.address} did not answer within {seconds}s "
                f"(connect_timeout)"
            ) from e

    async def _publisher(self) -> Any:
        channel = self._publish_channel
        if channel is None:
            conn = await self._connect()
            # a robust connection that is reconnecting (the broker restarts) has no transport
            # to open a channel on (aio-pika raises RuntimeError): wait for it (publish bounds
            # the wait by its timeout)
            await conn.ready()
            async with self._lock:
                if self._publish_channel is None:
                    self._publish_channel = await conn.channel(publisher_confirms=True)
                channel = self._publish_channel
        return await channel.get_underlay_channel()

    def exchange_name(self, topic: str) -> str:
        """The exchange of ``topic``: ``<namespace>:<topic>``, or the topic's own name
        without a namespace. Every queue of the topic is named after it."""
        return self._ns + topic

    async def _declare_topic(self, raw: Any, topic: str) -> None:
        # unrouted messages (no group bound yet) wait in a holding queue, through the
        # topic exchange's alternate exchange
        name = self._ns + topic
        hold = _unrouted_name(name)
        await raw.exchange_declare(hold, exchange_type="fanout", durable=True)
        await raw.queue_declare(hold, durable=True)
        await raw.queue_bind(hold, hold, routing_key="")
        await raw.exchange_declare(
            name,
            exchange_type="fanout",
            durable=True,
            arguments={"alternate-exchange": hold},
        )
        if is_dead_letter_topic(topic):
            # every dead letter is kept here too, for the groups declared later
            history = _history_name(name)
            await raw.queue_declare(history, durable=True)
            await raw.queue_bind(history, name, routing_key="")
        self._exchanges.add(name)
        self._topics.add(topic)

    async def _declare_group(self, raw: Any, topic: str, group: str, *, adopt: bool) -> None:
        """The topic's exchange, the group's dead-letter topic, the group's queue bound to
        the exchange, and (``adopt``) what the topic held while it had no group moved in."""
        exchange = self._ns + topic
        queue = group_queue_name(exchange, group)
        await self._declare_topic(raw, topic)
        await self._declare_topic(raw, dead_letter_topic(topic, group))
        queue_type, ordered = self._group_mode(topic, group)
        arguments: dict[str, Any] = {"x-queue-type": queue_type}
        if ordered:
            arguments["x-single-active-consumer"] = True
        replay = is_dead_letter_topic(topic) and not await self._queue_exists(queue)
        # the group's side queue first: if it exists with other arguments (a dead-letter
        # reader an older version declared quorum), the group's queue is not created yet, so
        # the declaration after the side queue was deleted still copies the history into it
        if ordered:
            given_back = _given_back_name(queue)
            await raw.queue_declare(
                given_back, durable=True, arguments={"x-queue-type": queue_type}
            )
            self._queues.add(given_back)
        else:
            ready = _ready_queue_name(queue)
            await raw.queue_declare(ready, durable=True, arguments={"x-queue-type": queue_type})
            self._queues.add(ready)
        await raw.queue_declare(queue, durable=True, arguments=arguments)
        self._queues.add(queue)
        await raw.queue_bind(queue, exchange, routing_key="")
        if replay:
            async with self._history_locks.setdefault(exchange, asyncio.Lock()):
                await self._replay_history(raw, exchange, queue)
        if adopt:
            await self._adopt_unrouted(raw, topic)

    def _group_mode(self, topic: str, group: str) -> tuple[str, bool]:
        """The queue type and whether ordered, of the group's queues: the transport's
        ``queue_type`` and ``ordered_per_key``, except for the dead-letter reader
        (:data:`DEAD_LETTER_READER` on a dead-letter topic), always classic and unordered, so
        that ``msdata dlq`` with a bare ``--broker`` URL and the service's own
        :func:`msdata.service.read_dead_letters` open the same queue whatever the mode."""
        if group == DEAD_LETTER_READER and is_dead_letter_topic(topic):
            return "classic", False
        return self.queue_type, self.features.ordered_per_key

    async def _queue_exists(self, queue: str) -> bool:
        """Whether ``queue`` exists: a passive declare, on a channel of its own (a failed
        one closes its channel)."""
        if queue in self._queues:
            return True
        conn = await self._connect()
        channel = await conn.channel(publisher_confirms=False)
        try:
            await channel.declare_queue(queue, passive=True)
            return True
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            await _close_within(channel, self.connect_timeout, queue)

    async def _replay_history(self, raw: Any, exchange: str, queue: str) -> None:
        """Fill ``queue``, a group's queue on a dead-letter topic declared and bound to the
        topic's exchange just now, with every dead letter the topic received before, each
        once: a dead-letter topic is read from its beginning by every group.

        The topic's history queue has every dead letter; it keeps them: taken until it is
        empty (not as many as it counts: the broker answers a count ahead of requeues it has
        yet to apply), copied, confirmed, then handed back in place, and waited for until
        the broker put them back (see :meth:`_hand_back_history`). A letter dead-lettered
        after the bind and
        before the history was taken is in both, the history's copy and the one routed to
        ``queue``. So, once the history is taken, a *marker* (an empty message with
        :data:`FILLER_HEADER`, through the default exchange: in ``queue`` alone, and a
        filler to any consumer, acked and never handed out) is put at the back of
        ``queue``, and what ``queue`` holds ahead of it is taken too: every letter routed
        there up to then, including each taken from the history that came live (the broker
        routed it to ``queue`` as it did to the history, before the marker was even
        published). ``queue`` then gets copies of the history's letters and of those taken
        from ``queue`` that the history did not have (matched by message id, body and
        headers, counted: a letter dead-lettered twice is there twice), and what was taken
        from ``queue`` is acked with the marker: copied rather than handed back, since a
        message handed back is flagged as redelivered, which counts as an attempt. A letter
        behind the marker came after the history was taken: it stays as it came (or, if the
        marker's consumer received it before its cancel took effect, it is copied like those
        ahead of the marker, unless the history had it).

        The driver's errors pass through (the caller makes them TransportError); on one,
        whatever was taken goes back, and ``queue`` may then hold some letters twice. A
        consumer of ``queue`` started elsewhere meanwhile (the same group declared by two
        processes at once) may take letters ahead of the marker, which it then receives
        twice. The caller holds the exchange's lock: two groups copying the history at once
        would each miss what the other holds (still so across processes)."""
        history = _history_name(exchange)
        ok = await raw.queue_declare(history, durable=True)
        left = ok.message_count
        taken: list[DeliveredMessage] = []
        # what queue held, taken through the marker, and what came after it until the
        # consumer was cancelled (all later delivery tags than the history's)
        received: list[DeliveredMessage] = []
        settled = False
        try:
            # until it is empty, not only as many as it counted: the broker answers a count
            # ahead of the requeues it has yet to apply, and a group declared just before
            # handed the history back so (the fourth of four groups declared in a row while
            # letters arrived got 515 of 1500); but not for ever, if letters keep coming
            # faster than they are taken
            while len(taken) < 2 * left + 1000:
                got = await raw.basic_get(history)
                if not isinstance(got.delivery, Basic.GetOk):
                    break
                taken.append(got)
            _progressed()
            marker = await self._take_up_to_marker(raw, queue, received)
            known = Counter(_letter_key(m) for m in taken)
            copies = list(taken)
            for m in received:
                if m is marker:
                    continue
                key = _letter_key(m)
                if known[key] > 0:
                    known[key] -= 1
                else:
                    copies.append(m)
            for start in range(0, len(copies), 100):
                batch = copies[start : start + 100]
                results = await asyncio.gather(
                    *[
                        _on_channel(
                            raw,
                            raw.basic_publish(
                                m.body, exchange="", routing_key=queue, properties=_as_published(m)
                            ),
                        )
                        for m in batch
                    ],
                    return_exceptions=True,
                )
                _confirmed(results, f"copying the dead letters of {exchange!r} to {queue!r}")
                _progressed()
            settled = True  # (if settling fails, the channel closes: all goes back anyway)
            # the history's first (lower delivery tags), so that the ack takes the rest
            if taken:
                await self._hand_back_history(raw, history, taken)
            if received:
                last = max(m.delivery_tag or 0 for m in received)
                await _on_channel(raw, raw.basic_ack(last, multiple=True))
        finally:
            if not settled and (taken or received):
                last = max(m.delivery_tag or 0 for m in taken + received)
                await _on_channel(raw, raw.basic_nack(last, multiple=True, requeue=True))

    async def _hand_back_history(
        self, raw: Any, history: str, taken: Sequence[DeliveredMessage]
    ) -> None:
        """Hand ``taken`` back to the history queue (a nack) and wait until the broker has
        put them back there (given up after half of ``connect_timeout``): it answers the
        nack at once and applies it later, and another channel's basic.get may be served
        first, so the next group declared (on a channel of its own) found the history
        empty and got none of it (1 run in 6 on a loaded machine). The broker puts all of
        one nack back at once, and only arrivals add to the count otherwise: it is back
        when the queue counts ``len(taken)`` more than before the nack."""
        before = (await raw.queue_declare(history, passive=True)).message_count or 0
        await _on_channel(raw, raw.basic_nack(taken[-1].delivery_tag, multiple=True, requeue=True))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout / 2
        wait = 0.002
        while True:
            ok = await raw.queue_declare(history, passive=True)
            if (ok.message_count or 0) >= before + len(taken) or loop.time() > deadline:
                return
            await asyncio.sleep(wait)
            wait = min(2 * wait, 0.05)

    async def _take_up_to_marker(
        self, raw: Any, queue: str, received: list[DeliveredMessage]
    ) -> DeliveredMessage | None:
        """Put a marker at the back of ``queue`` (see :meth:`_replay_history`) and take,
        unacked, what ``queue`` holds up to it, appended to ``received`` as it comes, the
        marker too (returned). Through a consumer of its own, since a quorum queue with a
        single active consumer refuses basic.get; what that consumer received after the
        marker, before its cancel took effect, is in ``received`` too. None if the marker
        did not come (another consumer of ``queue`` took it) within half of
        ``connect_timeout``."""
        token = uuid.uuid4().hex
        marker: DeliveredMessage | None = None
        seen = asyncio.Event()

        async def on_message(m: DeliveredMessage) -> None:
            nonlocal marker
            received.append(m)
            headers = m.header.properties.headers or {}
            if m.exchange == "" and _text(headers.get(FILLER_HEADER, "")) == token:
                marker = m
                seen.set()

        await raw.basic_qos(prefetch_count=0)  # for this consumer: no limit
        consumer = await raw.basic_consume(queue, on_message)
        try:
            props = Basic.Properties(
                message_id=f"msdata-filler:{token}", headers={FILLER_HEADER: token}
            )
            result = await _on_channel(
                raw, raw.basic_publish(b"", exchange="", routing_key=queue, properties=props)
            )
            _confirmed([result], f"marking the dead letters that reached {queue!r}")
            _progressed()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(seen.wait(), self.connect_timeout / 2)
        finally:
            await _on_channel(raw, raw.basic_cancel(consumer.consumer_tag))
            # the deliveries that came before the cancel's answer were handed to on_message
            # (a task each, started before this resumes); let them run
            await asyncio.sleep(0)
        _progressed()
        return marker

    async def _adopt_unrouted(self, raw: Any, topic: str) -> None:
        """Route again, through the topic's exchange, what its holding queue has: what was
        published before any group existed goes to the groups bound now (the first group
        declared, or several declared at the same instant).

        Called on every (re)start of a subscription too, not only by the first: right after
        a broker restart (SIGKILL), the broker has been seen to route a confirmed message to
        the alternate exchange though the group's queue and binding existed (the first batch
        published after the restart, 1 run in ~30 of the restart test); our re-binding
        moments later made routing right again, but that batch stayed in the holding queue,
        read by no one. Only as many messages as the queue held at the start are taken, so a
        message that still finds no group goes back there and the loop ends.
        """
        exchange = self._ns + topic
        hold = _unrouted_name(exchange)
        ok = await raw.queue_declare(hold, durable=True)
        left = ok.message_count
        while left > 0:
            batch: list[DeliveredMessage] = []
            while len(batch) < min(100, left):
                got = await raw.basic_get(hold)
                if not isinstance(got.delivery, Basic.GetOk):
                    break
                batch.append(got)
            if not batch:
                return
            left -= len(batch)
            results = await asyncio.gather(
                *[
                    _on_channel(
                        raw,
                        raw.basic_publish(
                            m.body, exchange=exchange, routing_key="", properties=_as_published(m)
                        ),
                    )
                    for m in batch
                ],
                return_exceptions=True,
            )
            _confirmed(results, f"routing again what {hold!r} held")
            await _on_channel(raw, raw.basic_ack(batch[-1].delivery_tag, multiple=True))
            _progressed()
            if len(batch) < 100:
                return

    async def declare_group(self, topic: str, group: str) -> None:
        """Declare the group's durable queue (with the transport's ``queue_type`` and mode)
        bound to the topic's exchange, and the group's dead-letter topic, on a channel of its
        own; what the topic held while it had no group moves into the queue."""
        check_name("topic", topic)
        check_name("group", group)
        conn = await self._connect()
        channel: Any = None
        try:
            async with self._calling(f"cannot declare group {group!r} of {topic!r}"):
                channel = await conn.channel()
                try:
                    await self._declare_group(
                        await channel.get_underlay_channel(), topic, group, adopt=True
                    )
                except aiormq.exceptions.ChannelPreconditionFailed as e:
                    raise ConfigurationError(
                        f"group {group!r} of {topic!r} exists with other arguments"
                        f"{_differing_argument(e)}: {e}"
                    ) from e
        finally:
            if channel is not None:
                await _close_within(channel, self.connect_timeout, f"{topic}:{group}")

    def _frame_max(self) -> int:
        """The connection's negotiated ``frame_max`` (RabbitMQ's default until connected)."""
        try:
            tune = self._connection.transport.connection.connection_tune  # type: ignore[union-attr]
            frame_max = int(tune.frame_max)
        except (AttributeError, TypeError, ValueError):
            return _DEFAULT_FRAME_MAX
        return frame_max if frame_max > 0 else _DEFAULT_FRAME_MAX

    def _wire_size(self, m: TransportMessage) -> int:
        """``m``'s size against ``max_message_bytes`` (its body and content-header frame);
        raises :class:`EncodeError` for an id AMQP cannot carry (``message_id`` is a
        shortstr: at most 255 bytes), :class:`MessageTooLarge` for properties that do not
        fit in one frame with room for msdata's own headers."""
        if len(m.id) > 63 and _utf8_len(m.id) > 255:
            raise EncodeError(
                f"message id of {_utf8_len(m.id)} bytes: AMQP carries at most 255 (a shortstr)"
            )
        header = _header_frame_size(m)
        frame_max = self._frame_max()
        if header + _OWN_HEADERS_ROOM > frame_max:
            raise MessageTooLarge(
                f"message {m.id}: its id, key and headers take {header:,} bytes; with "
                f"{_OWN_HEADERS_ROOM:,} kept for msdata's own they do not fit in one AMQP "
                f"frame (frame_max {frame_max:,} bytes, negotiated with the broker)"
            )
        return len(m.body) + header

    async def publish(self, topic: str, messages: Sequence[TransportMessage]) -> None:
        """Publish and wait for every confirm. While the connection or the channel is being
        reopened (a dropped connection, a broker restart), it waits and sends again what was
        not confirmed yet, until ``publish_timeout`` seconds have passed in all; then it
        raises :class:`~msdata.errors.PublishError` for the batch.

        Outcomes are per message: a message that fails
        :func:`~msdata.transport.check_message`, whose id is over 255 bytes, that is over
        ``max_message_bytes`` or whose headers do not fit in a frame (see the class) is not
        sent; one the broker refuses (``basic.nack``) is not confirmed. Every other one is
        confirmed, then :class:`~msdata.errors.PublishError` names those in ``refused`` (id
        -> reason), its ``__cause__`` the first msdata error among them."""
        if self._closed:
            raise TransportClosed("publish() on a closed transport")
        if topic not in self._topics:
            check_name("topic", topic)
        if not messages:
            return
        total = len(messages)
        messages, screened = screen(
            messages, self.max_message_bytes, self._wire_size, "max_message_bytes"
        )
        refused: dict[str, str | MsdataError] = dict(screened)
        if messages:
            try:
                await self._publish_all(topic, messages)
            except PublishError as e:
                if not e.refused:
                    raise  # the batch failed as a whole
                refused.update(e.refused)
        if refused:
            raise refused_error(f"publishing to {topic!r}", total, refused)

    async def _publish_all(self, topic: str, messages: Sequence[TransportMessage]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_timeout
        pause = 0.05
        left: Sequence[TransportMessage] = messages
        last: BaseException | None = None
        while True:
            try:
                with _amqp_errors(
                    f"publishing to {topic!r} failed (RabbitMQ at {self.address})", PublishError
                ):
                    try:
                        async with asyncio.timeout_at(deadline):
                            results = await self._send(topic, left)
                    except TimeoutError as e:
                        if last is not None:
                            why = f" (last error: {type(last).__name__}: {last})"
                        elif self._connection is None:
                            why = " (not connected yet: no answer to the connection)"
                        else:
                            why = ""
                        raise PublishError(
                            f"publishing {len(messages)} to {topic!r} not confirmed by RabbitMQ "
                            f"at {self.address} within {self.publish_timeout}s{why}"
                        ) from e
                    except Exception as e:
                        if not _recovering(e) or self._closed:
                            raise
                        results = [e] * len(left)
            except MsdataError:
                self._topics.discard(topic)  # declare it again next time
                raise
            failed = [m for m, r in zip(left, results, strict=True) if not isinstance(r, Basic.Ack)]
            if not failed:
                return
            errors = [r for r in results if isinstance(r, BaseException)]
            if len(errors) < len(failed) or not all(_recovering(r) for r in errors):
                self._topics.discard(topic)
                _confirmed(results, f"publishing to {topic!r}", left)  # raises: refused
            # the connection or channel is reopening: wait for it, send the rest again
            last = errors[0]
            self._topics.discard(topic)
            left = failed
            wait = deadline - loop.time()
            if wait <= 0:
                raise PublishError(
                    f"publishing {len(messages)} to {topic!r} not confirmed by RabbitMQ at "
                    f"{self.address} within {self.publish_timeout}s (last error: "
                    f"{type(last).__name__}: {last})"
                ) from last
            await asyncio.sleep(min(pause, wait))
            pause = min(pause * 2, 1.0)

    async def _send(self, topic: str, messages: Sequence[TransportMessage]) -> list[object]:
        raw = await self._publisher()
        if topic not in self._topics:
            await self._declare_topic(raw, topic)
        publish = raw.basic_publish
        exchange = self._ns + topic
        results: list[object] = await asyncio.gather(
            *[publish(m.body, exchange=exchange, properties=_properties(m)) for m in messages],
            return_exceptions=True,
        )
        return results

    def subscribe(
        self, topic: str, group: str, *, max_attempts: int = 5, prefetch: int = 100
    ) -> RabbitMQSubscription:
        check_name("topic", topic)
        check_name("group", group)
        if max_attempts < 1 or prefetch < 1:
            raise ConfigurationError("max_attempts and prefetch must be >= 1")
        if prefetch > 65535:
            raise ConfigurationError("prefetch must be <= 65535 (an AMQP short)")
        if len(_retry_queue_name(self._ns + topic, group, 10**9).encode()) > 255:
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
        if channel is not None:
            await _close_within(channel, self.connect_timeout, "the publisher")
        if self._owns_connection and self._connection is not None:
            await self._close_connection(self._connection)

    async def _close_connection(self, connection: Any) -> None:
        """Close ``connection`` within ``connect_timeout``. A broker that stopped answering
        never confirms the close, and aiormq's close then waits, with no timeout and deaf to
        a cancel, for its writer to write out a buffer the broker no longer reads: past the
        timeout its socket is aborted, and if even that does not end it, the close is left
        to the driver (logged)."""
        underlay = getattr(getattr(connection, "transport", None), "connection", None)
        closing = asyncio.ensure_future(connection.close())
        done, _ = await asyncio.wait((closing,), timeout=self.connect_timeout)
        if not done:
            aborted = _abort_socket(underlay)
            done, _ = await asyncio.wait((closing,), timeout=1.0)
            if not done:
                closing.add_done_callback(_retrieved)
                log.warning(
                    "closing the connection to %s did not finish within %.1f s (the broker "
                    "does not answer%s); left to the driver",
                    self.address,
                    self.connect_timeout,
                    "; its socket aborted" if aborted else "; its socket not found",
                )
                return
        try:
            closing.result()
        except Exception:  # already broken: nothing left to release
            log.debug("closing the RabbitMQ transport failed", exc_info=True)

    async def __aenter__(self) -> Self:
        await self._connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def lag(self, topic: str, group: str) -> int | None:
        """The ``message_count`` of a passive declare of the group's queue and of its ready
        queue (retries that are due): the messages ready for the group. AMQP does not report
        the delivered-but-unacked ones, nor the retries still waiting out a delay in a tier
        queue; it counts the fillers a stopping subscription left there until a consumer
        receives them or they expire, 0.2 s after they were put there (see
        :meth:`RabbitMQSubscription._exhaust_credit`). None if the
        group's queue does not exist. See :meth:`msdata.transport.Transport.lag`."""
        check_name("topic", topic)
        check_name("group", group)
        queue = group_queue_name(self.exchange_name(topic), group)
        conn = await self._connect()
        total = 0
        for name in (queue, _ready_queue_name(queue)):
            channel: Any = None
            try:
                async with self._calling(f"could not read the lag of group {group!r} of {topic!r}"):
                    # a passive declare of a missing queue closes its channel: one each
                    channel = await conn.channel()
                    try:
                        ok = await (await channel.get_underlay_channel()).queue_declare(
                            name, passive=True
                        )
                    except aiormq.exceptions.ChannelNotFoundEntity:
                        if name == queue:
                            return None
                        continue  # an ordered group has no ready queue
            finally:
                if channel is not None:
                    await _close_within(channel, self.connect_timeout, name)
            total += ok.message_count or 0
        return total
