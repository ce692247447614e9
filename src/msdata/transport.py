"""The transport port: how msdata hands encoded messages to a broker and takes them back.

Two small protocols, :class:`Publisher` and :class:`Subscriber`, implemented by every adapter
(``msdata.adapters.memory``, ``.redis``, ``.rabbitmq``, ``.nats``) and checked by one
conformance suite, :class:`msdata.testing.conformance.transport.TransportConformance`.

The transport moves bytes (a CloudEvents JSON body, see :mod:`msdata.serialization`) plus the
little it needs to route them: the message id (for broker-side de-duplication) and the
partition key (for ordering). Decoding happens above it, so a foreign producer's garbage
still arrives as a delivery that a consumer can dead-letter with its reason.
"""

from __future__ import annotations

import difflib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, Generic, NamedTuple, Protocol, Self, TypeVar, runtime_checkable
from urllib.parse import unquote

from msdata.errors import (
    ConfigurationError,
    EncodeError,
    HeldBack,
    InvalidHeader,
    MessageTooLarge,
    MsdataError,
    PublishError,
    TransportClosed,
    TransportError,
)

__all__ = [
    "DEAD_LETTER_ATTEMPTS",
    "DEAD_LETTER_GROUP",
    "DEAD_LETTER_READER",
    "DEAD_LETTER_REASON",
    "DEAD_LETTER_SUFFIX",
    "DEAD_LETTER_TOPIC",
    "DEFAULT_MAX_HELD_BYTES",
    "REPLAY_HEADER",
    "ClosesOnExit",
    "Delivery",
    "DeliveryState",
    "DriverErrors",
    "Publisher",
    "Subscriber",
    "Subscription",
    "ThrottledLog",
    "Transport",
    "TransportFeatures",
    "TransportMessage",
    "carryable_headers",
    "carryable_text",
    "check_header_value",
    "check_message",
    "check_name",
    "dead_letter_topic",
    "is_dead_letter_topic",
    "is_utf8",
    "iterate",
    "message_size",
    "pop_url_options",
    "refused_error",
    "refused_id",
    "screen",
]

# Headers a dead-lettered message carries, whatever the backend.
DEAD_LETTER_REASON = "x-msdata-dead-letter-reason"
DEAD_LETTER_TOPIC = "x-msdata-original-topic"
DEAD_LETTER_GROUP = "x-msdata-group"
DEAD_LETTER_ATTEMPTS = "x-msdata-attempts"
#: Set by a dead-letter replay (:func:`msdata.service.read_dead_letters`) to a token of
#: its own (a new UUIDv7 per replayed message): a broker that de-duplicates publishes by
#: message id (NATS, ``Nats-Msg-Id``, inside its duplicate window) de-duplicates this
#: message by its id and the token instead, so a replay is never dropped as a copy of the
#: message's first publish. The message id consumers read stays the message's own; the
#: header travels with the message like any other.
REPLAY_HEADER = "x-msdata-replay"

_TOPIC = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-.]{0,149}")
_DLQ_TOPIC = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-.]{0,199}")
_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,39}")
# exchanges and queues named amq.* are the broker's own (AMQP 0-9-1 spec, RabbitMQ docs)
_RESERVED_PREFIXES = ("amq.",)
_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,29}")


def check_name(kind: str, name: str) -> str:
    """Topic and group names that every broker can hold, and whose dead-letter topic
    (``topic.group.dlq``) is unambiguous and valid too; and a transport's ``namespace``
    (``kind="namespace"``: 1-30 ASCII letters, digits, ``_`` or ``-``).

    A topic is 1-150 ASCII letters, digits and ``_ - .`` (a dead-letter topic up to 200),
    starting with an ASCII letter or digit, with no ``..``, not starting with ``amq.``
    (RabbitMQ's own); a group is 1-40 ASCII letters, digits, ``_`` or ``-`` (no other letter:
    é, ß or Ж are refused). Each pattern matches the whole name (a trailing newline is
    refused). Raises :class:`msdata.errors.ConfigurationError`.
    """
    if kind == "group":
        ok = isinstance(name, str) and bool(_GROUP.fullmatch(name))
        rule = "1-40 ASCII letters, digits, '_' or '-', starting with an ASCII letter or digit"
    elif kind == "namespace":
        ok = isinstance(name, str) and bool(_NAMESPACE.fullmatch(name))
        rule = "1-30 ASCII letters, digits, '_' or '-', starting with an ASCII letter or digit"
    else:
        pattern = _DLQ_TOPIC if isinstance(name, str) and name.endswith(".dlq") else _TOPIC
        ok = isinstance(name, str) and bool(pattern.fullmatch(name)) and ".." not in name
        rule = (
            "1-150 ASCII letters, digits, '_', '-' or '.', starting with an ASCII letter or digit"
        )
        if ok and name.startswith(_RESERVED_PREFIXES):
            raise ConfigurationError(
                f"{kind} name {_shown(name)}: names starting with 'amq.' are reserved by RabbitMQ"
            )
    if not ok:
        raise ConfigurationError(f"{kind} name {_shown(name)} must be {rule}")
    return name


def _shown(name: object, limit: int = 60) -> str:
    """A refused name as an error shows it: its repr, cut to ``limit`` characters."""
    if isinstance(name, str) and len(name) > limit:
        return f"{name[:limit]!r}... ({len(name)} characters)"
    return repr(name)


#: the last part of every dead-letter topic's name
DEAD_LETTER_SUFFIX = ".dlq"


def dead_letter_topic(topic: str, group: str) -> str:
    """Where a group's failed deliveries of ``topic`` go. Subscribe to it like any topic.

    Unlike other topics, a dead-letter topic is read from its beginning by every group, also
    one declared after dead letters arrived (see :func:`is_dead_letter_topic`)."""
    return f"{topic}.{group}{DEAD_LETTER_SUFFIX}"


def is_dead_letter_topic(topic: str) -> bool:
    """Whether ``topic`` is a dead-letter topic (its name ends with :data:`DEAD_LETTER_SUFFIX`).

    On every transport, a group declared on such a topic receives what the topic received
    before it was declared, not only what comes after (an operator's reader or an audit that
    starts late must not miss dead letters); so transports keep a dead-letter topic's
    messages after every group read them, until deleted."""
    return topic.endswith(DEAD_LETTER_SUFFIX)


#: The consumer group that reads dead letters for an operator (``msdata dlq``,
#: :func:`msdata.service.read_dead_letters`, :meth:`msdata.service.Service.dead_letters`).
#: A transport may give this group's queues a fixed mode (RabbitMQ: classic and unordered,
#: whatever the transport's ``queue_type`` and ``ordered_per_key``, which a ``--broker`` URL
#: cannot say), so that every reader opens the same queue.
DEAD_LETTER_READER = "msdata-dlq"


_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


class TransportMessage(NamedTuple):
    """One message as the transport carries it.

    ``id`` is the message id (brokers that de-duplicate use it: a second publish of an id,
    as by a relay after a crash, may be dropped; a replay carries :data:`REPLAY_HEADER` so
    that it is not); ``key`` is the partition
    key that ordering is kept by; ``headers`` are transport-level string headers (the
    dead-letter reason travels there), separate from the CloudEvents body.
    """

    id: str
    body: bytes
    key: str | None = None
    headers: Mapping[str, str] = _NO_HEADERS


class CheckedMessage(TransportMessage):
    """A message that msdata built from parts it had checked, so that it passes
    :func:`check_message` as built (the event bus's own, without headers: a new id, bytes,
    a key checked when the envelope was made): :func:`screen` does not check it again.
    Internal to the package; nothing else makes one."""


@dataclass(frozen=True, slots=True)
class TransportFeatures:
    """What a backend guarantees, so the conformance suite asserts only what it promises."""

    #: a confirmed message survives a restart of the broker
    durable: bool
    #: within a group, deliveries with the same key arrive in publish order, including
    #: redeliveries, and one key is never in flight at two consumers of the group at once
    ordered_per_key: bool
    #: ``nack(delay=...)`` is carried out by the broker (else by a timer in the adapter)
    native_delay: bool
    #: a new group also receives what was published before it was created, beyond the
    #: contract of :class:`Subscriber` (only NATS, built with ``replays_history=True``; the
    #: conformance suite checks the contract, so it runs on transports built without it)
    replays_history: bool
    #: seconds after which a delivery left unacked by a consumer that died is offered again
    #: (0: as soon as the subscription closes)
    redelivery_timeout: float = 0.0
    #: it talks to a server over the network, so the server can be unreachable (the suite's
    #: unreachable-server case applies); False for an in-process transport
    networked: bool = True
    #: test plumbing, set by a harness that owns the broker (watermill's
    #: ``RestartServiceCommand``): ``await restart(kill)`` stops the broker under the running
    #: transport (SIGKILL if ``kill``, else a clean stop), keeping its data, and starts it
    #: again. None (adapters' default): the conformance suite's restart case is skipped.
    restart: Callable[[bool], Awaitable[None]] | None = field(
        default=None, compare=False, repr=False
    )
    #: test plumbing, set by a harness: ``await publish_foreign(topic, message)`` publishes
    #: as a producer that is not msdata would, each of ``message.headers`` put where the
    #: broker keeps a message's own metadata (Redis: an entry field after ``id`` and
    #: ``body``; RabbitMQ: an AMQP header; NATS: a NATS header), so the suite can check that
    #: forged bookkeeping (``attempt=999``) is ignored. None: that case is skipped.
    publish_foreign: Callable[[str, TransportMessage], Awaitable[None]] | None = field(
        default=None, compare=False, repr=False
    )
    #: test plumbing, set by a harness: ``await abandon(subscription)`` makes the
    #: subscription's consumer vanish as a killed process's would (its connection or consumer
    #: goes away; nothing it holds is settled or released by msdata); leaving its
    #: ``async with`` afterwards does nothing more. None: the crash-loop case is skipped.
    abandon: Callable[[Subscription], Awaitable[None]] | None = field(
        default=None, compare=False, repr=False
    )
    #: test plumbing, set by a harness: ``await interrupt()`` drops the transport's
    #: connection to the broker as a network failure would (the client then reconnects by
    #: itself). None: the case that publishes while it reconnects is skipped.
    interrupt: Callable[[], Awaitable[None]] | None = field(default=None, compare=False, repr=False)
    #: test plumbing, set by a harness: ``await publish_unreadable(topic)`` publishes to the
    #: topic, as a foreign producer, messages that the backend's driver cannot parse (NATS: a
    #: header status line of bytes that are not UTF-8) and returns how many. None: the case
    #: that checks such messages do not stop the others is skipped.
    publish_unreadable: Callable[[str], Awaitable[int]] | None = field(
        default=None, compare=False, repr=False
    )
    #: test plumbing, set by a harness: ``await publish_raw(topic, body, fields)`` writes to
    #: the topic, as a producer that is not msdata would, straight to the broker with its
    #: ordinary client, ``body`` and the metadata ``fields`` (name, value) as bytes wherever
    #: the broker keeps bytes (Redis: the entry's fields, the first one, then ``body``, then
    #: the others, so ``id`` first makes an entry that looks like msdata's;
    #: RabbitMQ: AMQP headers, ``message_id``/``content_type`` for fields of those names;
    #: NATS: headers; memory: the message's headers). Returns False when that producer's
    #: client cannot even send it (nothing was published). None: the raw-byte feed is skipped.
    publish_raw: Callable[[str, bytes, Sequence[tuple[bytes, bytes]]], Awaitable[bool]] | None = (
        field(default=None, compare=False, repr=False)
    )


@runtime_checkable
class Delivery(Protocol):
    """A received message that must be settled exactly once: ack, nack or dead_letter.

    - ``ack()``: done; it is not delivered to this group again.
    - ``nack(delay)``: failed; it is delivered again (to any consumer of the group) no sooner
      than ``delay`` seconds from now, with ``attempt`` one higher. When this was the
      subscription's ``max_attempts``-th attempt, it goes to the dead-letter topic instead,
      with ``reason``.
    - ``dead_letter(reason)``: it can never succeed (bad input); it goes straight to
      :func:`dead_letter_topic` with the reason in the ``x-msdata-dead-letter-reason`` header.
      A dead-letter topic keeps what it receives until read: the first group to subscribe to
      it receives everything dead-lettered before.
    - ``release()``: not started on (its consumer stops): it is delivered again, to any
      consumer of the group, with the same ``attempt``; giving it back is not an attempt.
      What a subscription received from the broker but never handed out is given back the
      same way when it closes. (NATS, whose JetStream counts every delivery, keeps a
      record of msdata's own for this: see :mod:`msdata.adapters.nats.transport`.)
    - Not settled when its subscription closes, or its consumer dies: redelivered, with
      ``attempt`` one higher (it was handed out, so it counts).
      Settling it after its subscription closed raises :class:`msdata.errors.TransportClosed`
      (it does not count). Settling it a second time while open does nothing.
    """

    @property
    def topic(self) -> str: ...
    @property
    def group(self) -> str: ...
    @property
    def message(self) -> TransportMessage: ...
    @property
    def attempt(self) -> int:
        """1 on the first delivery to this group, 2 on the first redelivery, ..."""
        ...

    async def ack(self) -> None: ...
    async def nack(self, delay: float = 0.0, reason: str | None = None) -> None: ...
    async def dead_letter(self, reason: str) -> None: ...
    async def release(self) -> None: ...


@runtime_checkable
class Subscription(Protocol):
    """A consumer in a group. ``async with`` declares the group (durably, on brokers) and
    starts consuming; leaving it stops consuming and releases unsettled deliveries.

    A group receives every message published to the topic after the group was declared (see
    :class:`Subscriber`); consumers of one group compete; each group gets each message.
    ``receive`` is safe to call from one task at a time per subscription.
    """

    async def __aenter__(self) -> Self: ...
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def receive(self, max_messages: int = 100, timeout: float = 1.0) -> Sequence[Delivery]:
        """Up to ``max_messages`` deliveries; waits up to ``timeout`` seconds for the first,
        then returns what is ready. An empty list means nothing arrived in time, or the
        subscription closed while it waited: it then hands out nothing, and what it had
        fetched goes back uncounted. A cancelled ``receive`` hands out and counts nothing."""
        ...


@runtime_checkable
class Publisher(Protocol):
    """Sends batches of messages to a topic."""

    async def publish(self, topic: str, messages: Sequence[TransportMessage]) -> None:
        """Return only when the transport has accepted every message of the batch durably
        (for a broker: confirmed). Adapters keep the whole batch's confirms in flight at
        once. Raises :class:`msdata.errors.PublishError` if any was not accepted; the caller
        then publishes the batch again (consumers de-duplicate by message id). Messages of
        one key in one batch keep their order.

        Outcomes are per message: a message refused on its own, before sending (by
        :func:`check_message`, or over the transport's ``max_message_bytes`` or the
        broker's limit: :class:`~msdata.errors.MessageTooLarge`) or by the broker, does not
        take the others with it. ``PublishError.refused`` then names exactly those messages
        (id -> reason), and every other message of the batch was confirmed. An empty
        ``refused`` means the batch failed as a whole.

        A message refused before sending holds back the later messages of its key in the
        batch: they are not sent, and ``refused`` names them too (reason
        ``"HeldBack: ..."``), so a key's order holds. A broker that refuses a message after
        the batch was sent (NATS, Redis: per message) cannot hold anything back: the later
        messages of that key may then have been confirmed ahead of it."""
        ...


@runtime_checkable
class Subscriber(Protocol):
    """Declares consumer groups and opens subscriptions.

    The contract of a group, on every transport:

    - A group receives every message published to its topic after the group was *declared*,
      by :meth:`declare_group` or by entering a subscription of it (which declares it too),
      whether or not a consumer of the group is running at the time: a service's groups can
      be declared at deploy time, before its consumers start.
    - A message published to a topic that has no group at all is kept, never dropped: the
      first group declared on that topic receives it. (A NATS transport built with
      ``replays_history=True`` gives every new group what its stream holds; see
      ``features.replays_history``.)
    """

    async def declare_group(self, topic: str, group: str) -> None:
        """Declare consumer group ``group`` of ``topic`` (and the topic, and the group's
        dead-letter topic), durably on brokers, without consuming. Idempotent: declaring an
        existing group changes nothing. Raises :class:`~msdata.errors.ConfigurationError` for
        a bad name, :class:`~msdata.errors.TransportError` if the broker cannot be reached."""
        ...

    def subscribe(
        self, topic: str, group: str, *, max_attempts: int = 5, prefetch: int = 100
    ) -> Subscription:
        """A consumer of ``topic`` in consumer group ``group``. After ``max_attempts``
        failed attempts a delivery goes to the group's dead-letter topic. ``prefetch`` bounds
        how many unsettled deliveries this consumer holds."""
        ...


@runtime_checkable
class Transport(Publisher, Subscriber, Protocol):
    """A publisher and subscriber over one backend, with its :class:`TransportFeatures`."""

    features: TransportFeatures

    async def close(self) -> None: ...

    async def lag(self, topic: str, group: str) -> int | None:
        """How many messages of ``topic`` consumer group ``group`` has still to settle, as
        the broker reports it: those not delivered yet, plus those delivered and not yet
        settled where the broker counts them (Redis: the group's ``lag`` and pending
        entries, on the topic's and the group's retry stream, plus delayed retries; NATS:
        the consumers' ``num_pending`` + ``num_ack_pending``; RabbitMQ: the ready messages
        of the group's queues, as a passive declare reports them (AMQP does not count the
        unacked ones there); memory: the group's queue). ``None`` when the broker cannot
        tell (no such group, or Redis could not compute its ``lag``). A reading, not a
        promise: it can be stale by the time it returns. Raises
        :class:`~msdata.errors.TransportError` if the broker cannot be reached."""
        ...


# -- implementation aids for adapters (not part of the port) -----------------------------------


class _SubscriptionLike(Protocol):
    topic: str
    group: str
    _closed: bool


_S = TypeVar("_S", bound=_SubscriptionLike)


class DeliveryState(Generic[_S]):
    """Bookkeeping an adapter's delivery shares with every other adapter's (an implementation
    aid, not part of the port): the subscription it came from, ``message``, ``attempt``, the
    ``topic``/``group`` properties, and the settle-once guard :meth:`_begin_settle`."""

    __slots__ = ("_settled", "_sub", "attempt", "message")

    def __init__(self, sub: _S, message: TransportMessage, attempt: int) -> None:
        self._sub = sub
        self._settled = False
        self.message = message
        self.attempt = attempt

    @property
    def topic(self) -> str:
        return self._sub.topic

    @property
    def group(self) -> str:
        return self._sub.group

    def _begin_settle(self) -> bool:
        """True if the caller settles it now; False if it was settled already. Raises
        :class:`TransportClosed` once the subscription closed, settled or not, as
        :class:`Delivery` requires (checked first: a closed subscription released it)."""
        if self._sub._closed:
            raise TransportClosed("the subscription was closed; the delivery was released")
        if self._settled:
            return False
        self._settled = True
        return True


class ClosesOnExit:
    """Leaving ``async with`` closes the subscription (an implementation aid for adapters)."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class DriverErrors:
    """Turns a driver's errors into msdata's at the adapter edge (an implementation aid for
    adapters, in the manner of httpx's ``map_httpcore_exceptions``)::

        with DriverErrors(redis.exceptions.RedisError, f"publish to {topic!r}", PublishError):
            await pipe.execute()

    An exception of ``driver`` raised inside becomes ``error("<what>: <Type>: <message>")``,
    raised from it; any other exception, and any :class:`~msdata.errors.MsdataError`, passes
    unchanged. Each adapter wraps it once, with its
    driver's exception classes, and uses that around its driver calls."""

    __slots__ = ("driver", "error", "what")

    def __init__(
        self,
        driver: type[BaseException] | tuple[type[BaseException], ...],
        what: str,
        error: type[TransportError] = TransportError,
    ) -> None:
        self.driver = driver
        self.what = what
        self.error = error

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, self.driver) and not isinstance(exc, MsdataError):
            raise self.error(f"{self.what}: {type(exc).__name__}: {exc}") from exc


class ThrottledLog:
    """Log lines that may repeat quickly (a connection failing while a server is down, per
    consumer and per round trip) at most once per ``every`` seconds per kind, the next one
    saying how many were left out in between (an implementation aid for adapters)::

        self._log = ThrottledLog(log)
        self._log.warning("unreachable", "Redis at %s unreachable (%s); retrying", address, e)

    ``clock``: monotonic seconds (a test passes its own)."""

    __slots__ = ("_clock", "_last", "_skipped", "every", "logger")

    def __init__(
        self,
        logger: logging.Logger,
        every: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.every = every
        self._clock = clock
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def log(self, level: int, kind: str, msg: str, *args: object) -> bool:
        """``logger.log(level, msg, *args)`` unless a line of ``kind`` was logged less than
        ``every`` seconds ago (then counted); whether it was logged."""
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.every:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return False
        self._last[kind] = now
        skipped = self._skipped.pop(kind, 0)
        if skipped:
            msg += " (%d more like it in the last %.0fs)"
            args = (*args, skipped, self.every)
        self.logger.log(level, msg, *args)
        return True

    def warning(self, kind: str, msg: str, *args: object) -> bool:
        """:meth:`log` at WARNING."""
        return self.log(logging.WARNING, kind, msg, *args)


async def iterate(
    subscription: Subscription, *, batch: int = 100, timeout: float = 1.0
) -> AsyncIterator[Delivery]:
    """Yield deliveries one by one, forever (until the task is cancelled)."""
    while True:
        for delivery in await subscription.receive(batch, timeout):
            yield delivery


# -- what every transport refuses before sending (implementation aids for adapters) --------

#: a consumer holds at most this many bytes of messages it received and has not settled (plus
#: one message), unless its transport is built with another ``max_held_bytes``
DEFAULT_MAX_HELD_BYTES = 64 * 1024 * 1024

# A transport header name is an RFC 9110 token (section 5.6.2), up to 255 characters: what
# NATS headers allow (nats-py refuses anything else), and what AMQP (a shortstr) and Redis
# carry as they are. No space, no ':', no control character.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,255}")
# a header value cannot hold a line break or NUL: NATS's header block is line-based
_VALUE_BREAK = re.compile(r"[\r\n\x00]")
_valid_names: set[str] = set()  # names already checked (a service uses a handful)


def check_header_value(what: str, value: object) -> None:
    """The rule every header value (and partition key) meets, wherever msdata takes one
    (:func:`check_message` before sending, :func:`msdata.messages.check_headers` when an
    envelope is made): a str, valid UTF-8 (no lone surrogate), without CR, LF or NUL (NATS's
    header block is line-based). ``what`` names it in the error. Raises
    :class:`~msdata.errors.InvalidHeader` (the value is not shown: it may be a credential)."""
    _check_value(what, value)


def _check_value(what: str, value: object) -> None:
    if not isinstance(value, str):
        raise InvalidHeader(f"{what} must be a str, got {type(value).__name__}")
    # the value is not shown: a header may carry a credential
    if not value.isascii() and not is_utf8(value):
        raise InvalidHeader(f"{what} holds a lone surrogate (not UTF-8)")
    if _VALUE_BREAK.search(value):
        raise InvalidHeader(f"{what} holds a line break or NUL")


def check_message(message: TransportMessage) -> None:
    """Refuse, before anything is sent, a message that no broker can carry as it is:

    - ``id``: a non-empty str, valid UTF-8 (no lone surrogate), without line break or NUL;
    - ``body``: bytes;
    - ``key``: None or a str without line break or NUL, valid UTF-8 (it travels in a header);
    - ``headers``: a mapping; names are RFC 9110 tokens of 1-255 characters (letters, digits and
      ``!#$%&'*+-.^_`|~``: no space, no ``:``), not starting with ``Nats-`` (any case:
      JetStream acts on those), values str without line break or NUL, valid UTF-8.
      (``x-msdata-*`` names are msdata's own too: it sets them on dead letters, and a
      consumer ignores one a producer forged.)

    Raises :class:`~msdata.errors.InvalidHeader` for a header or key,
    :class:`~msdata.errors.EncodeError` for an id or body. Every transport calls it on
    every message of a batch (through :func:`screen`)."""
    mid = message.id
    if not (isinstance(mid, str) and mid and is_utf8(mid)):
        raise EncodeError(f"message id {_shown(mid)} must be a non-empty UTF-8 str")
    if _VALUE_BREAK.search(mid):  # it travels in a header too (NATS would rewrite it)
        raise EncodeError(f"message id {_shown(mid)} holds a line break or NUL")
    if not isinstance(message.body, bytes):
        raise EncodeError(f"message body must be bytes, got {type(message.body).__name__}")
    key = message.key
    if key is not None:
        _check_value("partition key", key)
    headers = message.headers
    if headers:
        if type(headers) is not dict and not isinstance(headers, Mapping):
            raise InvalidHeader(f"headers must be a mapping, got {type(headers).__name__}")
        for name, value in headers.items():
            if name not in _valid_names:
                if not (isinstance(name, str) and _HEADER_NAME.fullmatch(name)):
                    raise InvalidHeader(
                        f"header name {_shown(name)} must be 1-255 letters, digits or "
                        "!#$%&'*+-.^_`|~ (an RFC 9110 token: no space, no ':')"
                    )
                if name[:5].lower() == "nats-":
                    raise InvalidHeader(
                        f"header name {_shown(name)}: names starting with 'Nats-' are NATS "
                        "JetStream's own (they change how the server stores a message)"
                    )
                if len(_valid_names) < 1024:
                    _valid_names.add(name)
            _check_value(f"header {name!r}", value)


def is_utf8(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8: a str holds no lone surrogate (what
    ``surrogateescape`` decoding or a JSON ``\\udc80`` escape leaves). The one check of it
    for names, ids, keys and header values."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def message_size(message: TransportMessage) -> int:
    """The bytes a message takes as msdata counts them against ``max_message_bytes`` and
    ``max_held_bytes`` on a transport without a wire format of its own (memory; a transport
    may count its own wire form instead): body, id, key, and each header's name and value,
    in UTF-8."""
    n = len(message.body) + _utf8_len(message.id)
    if message.key is not None:
        n += _utf8_len(message.key)
    headers = message.headers
    if headers:
        for name, value in headers.items():
            n += _utf8_len(name) + _utf8_len(value)
    return n


def screen(
    messages: Sequence[TransportMessage],
    max_bytes: int | None = None,
    size: Callable[[TransportMessage], int] = message_size,
    where: str = "this transport",
) -> tuple[Sequence[TransportMessage], dict[str, MsdataError]]:
    """Split a batch, before sending, into the messages to send and those refused: each refused
    message's id -> the error that refuses it (:func:`check_message`'s, or
    :class:`~msdata.errors.MessageTooLarge` when ``size(message)`` is over ``max_bytes``;
    ``where`` names the limit's source in its text; a replay, :data:`REPLAY_HEADER` set, is
    measured as the message it replays, without what the replay adds, so a message once
    accepted can be replayed). When nothing is refused, the batch itself is returned. A
    refused message holds back the later messages of its key in the batch (each refused with
    a :class:`HeldBack` error), so a key's order holds. Send the rest, then raise
    :func:`refused_error` if anything was refused, so one bad message never takes the others
    with it."""
    refused: dict[str, MsdataError] | None = None
    held: dict[str, str] | None = None  # key -> id of its refused message
    for m in messages:
        try:
            if held is not None:
                first = held.get(m.key) if isinstance(m.key, str) else None
                if first is not None:
                    raise HeldBack(
                        f"held back, not sent: the earlier message {first} of its key was refused"
                    )
            if not isinstance(m, CheckedMessage):
                check_message(m)
            if max_bytes is not None:
                n = size(m)
                if n > max_bytes and m.headers and REPLAY_HEADER in m.headers:
                    replayed = {k: v for k, v in m.headers.items() if k != REPLAY_HEADER}
                    n = size(m._replace(headers=replayed))
                if n > max_bytes:
                    raise MessageTooLarge(
                        f"message {m.id} is {n:,} bytes with its headers, over the limit of "
                        f"{max_bytes:,} bytes ({where})"
                    )
        except MsdataError as e:
            if refused is None:
                refused = {}
            refused[_id_of(m)] = e
            if isinstance(m.key, str):
                if held is None:
                    held = {}
                held.setdefault(m.key, _id_of(m))
    if refused is None:
        return messages, {}
    return [m for m in messages if _id_of(m) not in refused], refused


def refused_id(message: TransportMessage) -> str:
    """How ``PublishError.refused`` names ``message``, on every transport: its id, or the
    ``repr`` of an id that is not a str (``7`` -> ``'7'``), which is refused."""
    mid = message.id
    return mid if isinstance(mid, str) else repr(mid)


_id_of = refused_id


def refused_error(what: str, total: int, refused: Mapping[str, str | MsdataError]) -> PublishError:
    """The :class:`~msdata.errors.PublishError` of a batch of ``total`` messages of which
    ``refused`` (id -> error or the broker's reason) were refused and every other one was
    confirmed. ``PublishError.refused`` maps each id to ``"<ErrorType>: <text>"`` (or the
    broker's reason); its ``__cause__`` is the first msdata error among them, if any."""
    reasons = {
        mid: f"{type(e).__name__}: {e}" if isinstance(e, BaseException) else e
        for mid, e in refused.items()
    }
    first = next(iter(reasons.values()))
    error = PublishError(
        f"{what}: {len(reasons)} of {total} messages refused (the others were confirmed); "
        f"first: {first}",
        refused=reasons,
    )
    error.__cause__ = next((e for e in refused.values() if isinstance(e, BaseException)), None)
    return error


def carryable_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` made to pass :func:`check_message`, for a copy msdata sends on of a
    message it received (a dead letter of a foreign message): a name that is not a token,
    or that starts with ``Nats-``, is dropped, a value that is not a str becomes its
    ``str()``, line breaks and NUL in a value become spaces and lone surrogates ``\\udcxx``
    escapes."""
    return {
        name: carryable_text(value)
        for name, value in headers.items()
        if isinstance(name, str) and _HEADER_NAME.fullmatch(name) and name[:5].lower() != "nats-"
    }


def carryable_text(value: object) -> str:
    """``value`` as a header value, id or key that passes :func:`check_message`: its
    ``str()`` if it is not a str, line breaks and NUL as spaces, lone surrogates as
    ``\\udcxx`` escapes (for a copy msdata sends on of a message it received)."""
    text = value if isinstance(value, str) else str(value)
    if not is_utf8(text):
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _VALUE_BREAK.sub(" ", text)


_ASCII_DIGITS = re.compile(r"[0-9]+")


def _near(name: str, options: Sequence[str]) -> bool:
    """Whether ``name`` looks like a misspelling of one of ``options``."""
    plain = name.lower().replace("-", "_")
    return any(
        plain == o or difflib.SequenceMatcher(None, plain, o).ratio() >= 0.8 for o in options
    )


def _unknown_option(name: str, own: Sequence[str], driver: Sequence[str]) -> str:
    """The message refusing URL option ``name``: what is taken instead, and the nearest."""
    near = difflib.get_close_matches(name.lower().replace("-", "_"), (*own, *driver), 1, 0.7)
    hint = f" (did you mean {near[0]}?)" if near else ""
    takes = ", ".join(own)
    if driver:
        takes += f"; and the driver's {', '.join(driver)}"
    return f"unknown URL option {_shown(name)}{hint}: this transport takes {takes}"


def pop_url_options(
    url: str,
    names: Sequence[str],
    driver: Sequence[str] = (),
    text: Sequence[str] = (),
    *,
    passes_on: bool = True,
) -> tuple[str, dict[str, Any]]:
    """Take the query parameters ``names`` (``max_message_bytes``, ``max_held_bytes``...,
    whole numbers >= 1) and ``text`` (``namespace``: a non-empty str, percent-decoded) out
    of a transport URL: returns the URL without them (other query parameters are kept for
    the driver) and their values. Several comma-separated URLs (NATS) each lose them. The
    one parser of every transport's URL options.

    Raises :class:`~msdata.errors.ConfigurationError` for a value that is not ASCII digits
    making a whole number >= 1 (no sign, space, ``_``, exponent or other script's digits),
    for an option given twice in one URL (or with two values in several), and for a
    ``max_*`` parameter (any case) that is neither one
    of ``names`` nor one of ``driver`` (the driver's own, e.g. redis-py's
    ``max_connections``): a misspelt limit is refused, not silently ignored. So is a
    parameter that differs from one of ``names`` or ``text`` only by case, ``-`` for ``_``
    or a letter or two (``Namespace``, ``namespce``), and, with ``passes_on=False`` (a
    transport whose driver takes no URL options: memory, NATS, or whose ``driver`` lists
    every option its driver takes: Redis, RabbitMQ), any other parameter: the message names
    it, what is taken, and the nearest of those."""
    found: dict[str, Any] = {}
    parts = []
    for one in url.split(","):
        base, sep, rest = one.partition("?")
        if not sep:
            parts.append(one)
            continue
        query, hash_, fragment = rest.partition("#")
        kept = []
        here: set[str] = set()  # the options of this URL (several URLs may each have them)
        for pair in query.split("&"):
            name, _, value = pair.partition("=")
            if name in text:
                if name in here:
                    raise ConfigurationError(f"URL option {name} is given twice")
                here.add(name)
                decoded = unquote(value)
                if not decoded:
                    raise ConfigurationError(f"URL option {name} is empty")
                if found.setdefault(name, decoded) != decoded:
                    raise ConfigurationError(f"URL option {name} differs between the URLs")
                continue
            if name not in names:
                if name not in driver and (
                    not passes_on or name.lower().startswith("max_") or _near(name, (*names, *text))
                ):
                    raise ConfigurationError(_unknown_option(name, (*names, *text), driver))
                if pair:
                    kept.append(pair)  # as written: the driver decodes it
                continue
            if name in here:
                raise ConfigurationError(f"URL option {name} is given twice")
            here.add(name)
            if not (_ASCII_DIGITS.fullmatch(value) and int(value) >= 1):
                raise ConfigurationError(
                    f"URL option {name}={_shown(value)} must be a whole number >= 1 "
                    "(ASCII digits only)"
                )
            if found.setdefault(name, int(value)) != int(value):
                raise ConfigurationError(f"URL option {name} differs between the URLs")
        parts.append(base + ("?" + "&".join(kept) if kept else "") + hash_ + fragment)
    return ",".join(parts), found
