"""An in-process transport with the same delivery semantics as the brokers.

Topics, consumer groups (each group gets each message, consumers in a group compete),
at-least-once delivery with redelivery on nack and on a subscription that closes unsettled,
attempt counts, a dead-letter topic after ``max_attempts``, and order per partition key within
a group: a key is never in flight twice in one group, and a nacked message goes back in front
of the later messages of its key. A topic without any group keeps what is published to it for
its first group (up to ``max_unclaimed`` messages per topic; beyond, the oldest are dropped,
each logged at WARNING and counted). A dead-letter topic keeps the last ``max_unclaimed``
messages it received for every group declared later (see
:func:`msdata.transport.is_dead_letter_topic`). Nothing survives the process
(``durable=False``).

Limits, as on the brokers: ``max_message_bytes`` (default None: none) refuses a larger message
before it is queued, with :class:`msdata.errors.MessageTooLarge` (its size is
:func:`msdata.transport.message_size`: body, id, key and headers); ``max_held_bytes`` (default
64 MiB) bounds what a subscription holds unsettled, in those bytes, beside ``prefetch`` in
messages: ``receive`` hands out no more once it is reached (it may go over by one message).

It serves one event loop: create it, and use it, from inside that loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any, Self

from msdata import deadletter
from msdata.errors import ConfigurationError, TransportClosed
from msdata.transport import (
    DEAD_LETTER_SUFFIX,
    DEFAULT_MAX_HELD_BYTES,
    CheckedMessage,
    ClosesOnExit,
    DeliveryState,
    TransportFeatures,
    TransportMessage,
    check_name,
    is_dead_letter_topic,
    message_size,
    pop_url_options,
    refused_error,
    screen,
)
from msdata.urls import redact_url

__all__ = ["MemoryDelivery", "MemorySubscription", "MemoryTransport"]

log = logging.getLogger("msdata.adapters.memory")

FEATURES = TransportFeatures(
    durable=False, ordered_per_key=True, native_delay=True, replays_history=False, networked=False
)


class _Entry:
    __slots__ = ("attempt", "message", "size")

    def __init__(self, message: TransportMessage) -> None:
        self.message = message
        self.attempt = 0
        self.size = -1  # message_size(message), worked out when first handed out


class _Group:
    __slots__ = ("blocked", "busy", "name", "ready", "signal", "topic", "transport")

    def __init__(self, transport: MemoryTransport, topic: str, name: str) -> None:
        self.transport = transport
        self.topic = topic
        self.name = name
        self.ready: deque[_Entry] = deque()
        # key -> the entry of that key in flight or waiting out a nack delay
        self.busy: dict[str, _Entry] = {}
        # key -> later entries of that key, in publish order, waiting for it to be settled
        self.blocked: dict[str, deque[_Entry]] = {}
        self.signal = asyncio.Event()

    def push(self, entry: _Entry) -> None:
        self.ready.append(entry)
        self.signal.set()

    def take(self, limit: int, room_bytes: int) -> list[_Entry]:
        """Up to ``limit`` entries, stopping once they take ``room_bytes`` (the last one may
        go over)."""
        out: list[_Entry] = []
        ready, busy = self.ready, self.busy
        while ready and len(out) < limit and room_bytes > 0:
            entry = ready.popleft()
            key = entry.message.key
            if key is not None:
                if key in busy:
                    self.blocked.setdefault(key, deque()).append(entry)
                    continue
                busy[key] = entry
            entry.attempt += 1
            if entry.size < 0:
                m = entry.message
                entry.size = (
                    # message_size of one msdata built (its id ASCII, no headers)
                    len(m.body) + len(m.id)
                    if m.key is None and isinstance(m, CheckedMessage)
                    else message_size(m)
                )
            room_bytes -= entry.size
            out.append(entry)
        if not ready:
            self.signal.clear()
        return out

    def settle(self, entry: _Entry) -> None:
        """The entry is done here: free its key for the next entry of that key."""
        key = entry.message.key
        if key is None or self.busy.get(key) is not entry:
            return
        del self.busy[key]
        waiting = self.blocked.get(key)
        if waiting:
            self.ready.appendleft(waiting.popleft())
            if not waiting:
                del self.blocked[key]
            self.signal.set()

    def retry(self, entry: _Entry, delay: float) -> None:
        """Offer ``entry`` again ahead of the later entries of its key."""
        if delay <= 0:
            self._requeue(entry)
        else:
            asyncio.get_running_loop().call_later(delay, self._requeue, entry)

    def _requeue(self, entry: _Entry) -> None:
        key = entry.message.key
        if key is not None and self.busy.get(key) is entry:
            del self.busy[key]
        self.ready.appendleft(entry)
        self.signal.set()


class MemoryDelivery(DeliveryState["MemorySubscription"]):
    """A delivery from :class:`MemoryTransport`; see :class:`msdata.transport.Delivery`."""

    __slots__ = ("_entry",)

    def __init__(self, sub: MemorySubscription, entry: _Entry) -> None:
        # DeliveryState.__init__ inlined: one is made per message received
        self._sub = sub
        self._settled = False
        self.message = entry.message
        self.attempt = entry.attempt
        self._entry = entry

    def _settle(self) -> bool:
        if not self._begin_settle():
            return False
        sub = self._sub
        sub._inflight.pop(id(self), None)
        sub._held_bytes -= self._entry.size
        sub._room.set()
        return True

    async def ack(self) -> None:
        self._ack_now()

    def _ack_now(self) -> None:
        """:meth:`ack`, synchronously (the event bus's consumer calls it through
        ``MemorySubscription._ack_now``: one coroutine less per message)."""
        # _begin_settle() and _settle() inlined: ack is the hot path
        sub = self._sub
        if sub._closed:
            raise TransportClosed("the subscription was closed; the delivery was released")
        if self._settled:
            return
        self._settled = True
        sub._inflight.pop(id(self), None)
        sub._held_bytes -= self._entry.size
        if sub._room_cleared:
            sub._room_cleared = False
            sub._room.set()
        if self.message.key is not None:  # only a key holds later entries back
            sub._group.settle(self._entry)

    async def nack(self, delay: float = 0.0, reason: str | None = None) -> None:
        if not self._settle():
            return
        group = self._sub._group
        if deadletter.exhausted(self.attempt, self._sub.max_attempts):
            self._sub._transport._dead_letter(
                group, self._entry, deadletter.failed_reason(self.attempt, reason)
            )
        else:
            group.retry(self._entry, delay)

    async def dead_letter(self, reason: str) -> None:
        if self._settle():
            self._sub._transport._dead_letter(self._sub._group, self._entry, reason)

    async def release(self) -> None:
        if self._settle():
            # taken again, it is counted again: this hand-out was not an attempt
            self._entry.attempt -= 1
            self._sub._group.retry(self._entry, 0.0)

    def _release(self) -> None:
        self._settled = True
        self._sub._group.retry(self._entry, 0.0)


class MemorySubscription(ClosesOnExit):
    """A consumer in a group; see :class:`msdata.transport.Subscription`."""

    #: acks a delivery of this subscription synchronously (internal to the package)
    _ack_now = staticmethod(MemoryDelivery._ack_now)

    def __init__(
        self, transport: MemoryTransport, topic: str, group: str, max_attempts: int, prefetch: int
    ) -> None:
        self._transport = transport
        self.topic = topic
        self.group = group
        self.max_attempts = max_attempts
        self.prefetch = prefetch
        self._inflight: dict[int, MemoryDelivery] = {}
        # bytes (message_size) of what it holds unsettled, against max_held_bytes
        self._held_bytes = 0
        self._room = asyncio.Event()  # set when a settlement frees prefetch room
        # whether receive() cleared _room since it was last set by an ack (an ack sets it
        # only then: a Python call less per message)
        self._room_cleared = False
        self._closed = False
        self._group: _Group

    async def __aenter__(self) -> Self:
        if self._transport._closed:
            raise TransportClosed("subscribe() on a closed transport")
        self._group = self._transport._declare(self.topic, self.group)
        self._transport._subscriptions.add(self)
        return self

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._transport._subscriptions.discard(self)
        # oldest first, so each key's entries go back in order (appendleft reverses)
        for delivery in reversed(list(self._inflight.values())):
            delivery._release()
        self._inflight.clear()
        self._held_bytes = 0
        self._room.set()  # wake a receive() waiting in this subscription
        if hasattr(self, "_group"):
            self._group.signal.set()

    async def receive(self, max_messages: int = 100, timeout: float = 1.0) -> list[MemoryDelivery]:
        if self._closed or self._transport._closed:
            raise TransportClosed("receive() on a closed subscription")
        group = self._group
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        max_held = self._transport.max_held_bytes
        while True:
            room = min(max_messages, self.prefetch - len(self._inflight))
            room_bytes = max_held - self._held_bytes
            if room > 0 and room_bytes > 0:
                entries = group.take(room, room_bytes)
                if entries and any(e.attempt > self.max_attempts for e in entries):
                    entries = self._without_overdue(entries)
                if entries:
                    break
                waiter = group.signal
            else:  # prefetch or max_held_bytes is full: wait for a settlement
                self._room.clear()
                self._room_cleared = True
                waiter = self._room
            left = deadline - loop.time()
            if left <= 0:
                return []
            try:
                async with asyncio.timeout(left):
                    await waiter.wait()
            except TimeoutError:
                return []
            if self._closed or self._transport._closed:
                return []  # closed while it waited (its transport too): hand out nothing
        out = [MemoryDelivery(self, e) for e in entries]
        inflight = self._inflight
        for d in out:
            inflight[id(d)] = d
        self._held_bytes += sum(e.size for e in entries)
        return out

    def _without_overdue(self, entries: list[_Entry]) -> list[_Entry]:
        """Dead-letter the entries released again and again by consumers that went away
        unsettled (beyond ``max_attempts``); the others are handed out."""
        kept: list[_Entry] = []
        for e in entries:
            reason = deadletter.overdue_reason(e.attempt, self.max_attempts)
            if reason is None:
                kept.append(e)
            else:
                attempts = deadletter.overdue_attempts(e.attempt)
                self._transport._dead_letter(self._group, e, reason, attempts)
        return kept


class MemoryTransport:
    """The in-memory :class:`msdata.transport.Transport`.

    Options: ``max_unclaimed`` (messages a topic without any group keeps), ``namespace``
    (accepted, changes nothing), ``max_message_bytes`` (None: no limit; else a larger
    message is refused with :class:`~msdata.errors.MessageTooLarge`, alone),
    ``max_held_bytes`` (what a subscription holds unsettled, in bytes, plus one message;
    default 64 MiB). Sizes are :func:`msdata.transport.message_size`."""

    features = FEATURES

    def __init__(
        self,
        *,
        max_unclaimed: int = 100_000,
        namespace: str | None = None,
        max_message_bytes: int | None = None,
        max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
    ) -> None:
        if namespace is not None:
            check_name("namespace", namespace)
        if max_message_bytes is not None and max_message_bytes < 1:
            raise ConfigurationError("max_message_bytes must be >= 1 (or None: no limit)")
        if max_held_bytes < 1:
            raise ConfigurationError("max_held_bytes must be >= 1")
        #: a larger message (:func:`~msdata.transport.message_size`) is refused; None: no limit
        self.max_message_bytes = max_message_bytes
        #: bytes a subscription holds unsettled at most (plus one message)
        self.max_held_bytes = max_held_bytes
        #: accepted for one set of options on every transport; a process's own transport
        #: shares nothing with others, so it changes no name
        self.namespace = namespace
        if max_unclaimed < 0:
            raise ConfigurationError("max_unclaimed must be >= 0")
        #: messages a topic without any group keeps for its first group (then the oldest go)
        self.max_unclaimed = max_unclaimed
        #: how many messages went that way (each logged at WARNING)
        self.unclaimed_dropped = 0
        self._topics: dict[str, dict[str, _Group]] = {}
        self._unclaimed: dict[str, deque[TransportMessage]] = {}
        # dead-letter topic -> everything it received, for groups declared later (up to
        # max_unclaimed each, the oldest dropped first)
        self._history: dict[str, deque[TransportMessage]] = {}
        self._closed = False
        # the subscriptions entered and not closed: closing the transport closes them
        self._subscriptions: set[MemorySubscription] = set()

    @classmethod
    def from_url(cls, url: str = "memory://", **options: Any) -> MemoryTransport:
        """``memory://``, optionally with ``?max_message_bytes=N&max_held_bytes=N`` and
        ``namespace=name``; ``options`` are the constructor's (they win over the URL's)."""
        if not url.startswith("memory:"):
            raise ConfigurationError(f"not a memory:// URL: {redact_url(url)!r}")
        _, found = pop_url_options(
            url, ("max_message_bytes", "max_held_bytes"), text=("namespace",), passes_on=False
        )
        return cls(**{**found, **options})

    async def publish(self, topic: str, messages: Sequence[TransportMessage]) -> None:
        if self._closed:
            raise TransportClosed("publish() on a closed transport")
        groups = self._topics.get(topic)
        if groups is None:
            check_name("topic", topic)
            groups = self._topics[topic] = {}
        if len(messages) == 1 and self._put_checked(topic, messages[0]):
            return
        total = len(messages)
        messages, refused = screen(messages, self.max_message_bytes, where="max_message_bytes")
        self._enqueue(topic, groups, messages)
        if refused:
            raise refused_error(f"publish to {topic!r}", total, refused)

    def _put_checked(self, topic: str, message: TransportMessage) -> bool:
        """Queue ``message`` as :meth:`publish` would, if it is one of msdata's own
        (:class:`~msdata.transport.CheckedMessage`: nothing to check) and nothing else is to
        be done (no size limit, a topic with groups, not a dead-letter topic); False (and
        nothing done) otherwise. Synchronous: the event bus's ``publish()`` calls it before
        awaiting :meth:`publish`, one coroutine less per message. Internal to the package."""
        if self._closed or self.max_message_bytes is not None:
            return False
        groups = self._topics.get(topic)
        if (
            not groups
            or not isinstance(message, CheckedMessage)
            or topic.endswith(DEAD_LETTER_SUFFIX)
        ):
            return False
        for group in groups.values():  # _enqueue inline
            ready = group.ready
            if ready:  # the signal is set while anything is ready (take clears it on empty)
                ready.append(_Entry(message))
            else:
                ready.append(_Entry(message))
                group.signal.set()
        return True

    def _enqueue(
        self, topic: str, groups: dict[str, _Group], messages: Sequence[TransportMessage]
    ) -> None:
        if is_dead_letter_topic(topic):
            self._remember(topic, messages)
        if not groups:
            self._keep_unclaimed(topic, messages)
            return
        for group in groups.values():
            ready = group.ready
            for m in messages:
                ready.append(_Entry(m))
            if messages:
                group.signal.set()

    async def declare_group(self, topic: str, group: str) -> None:
        if self._closed:
            raise TransportClosed("declare_group() on a closed transport")
        check_name("topic", topic)
        check_name("group", group)
        self._declare(topic, group)

    def subscribe(
        self, topic: str, group: str, *, max_attempts: int = 5, prefetch: int = 100
    ) -> MemorySubscription:
        check_name("topic", topic)
        check_name("group", group)
        if max_attempts < 1 or prefetch < 1:
            raise ConfigurationError("max_attempts and prefetch must be >= 1")
        return MemorySubscription(self, topic, group, max_attempts, prefetch)

    async def close(self) -> None:
        """Close every open subscription (a ``receive()`` waiting in one returns ``[]``,
        what they hold goes back), then the transport; nothing survives it."""
        self._closed = True
        for sub in list(self._subscriptions):
            await sub.close()
        for groups in self._topics.values():
            for g in groups.values():
                g.signal.set()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def pending(self, topic: str, group: str) -> int:
        """Messages of ``topic`` waiting in ``group`` (ready or blocked behind their key)."""
        g = self._topics.get(topic, {}).get(group)
        if g is None:
            return 0
        return len(g.ready) + sum(len(q) for q in g.blocked.values())

    def _declare(self, topic: str, group: str) -> _Group:
        groups = self._topics.setdefault(topic, {})
        g = groups.get(group)
        if g is None:
            g = groups[group] = _Group(self, topic, group)
            history = self._history.get(topic)
            if history is not None:  # a dead-letter topic: read from its beginning
                self._unclaimed.pop(topic, None)
                for m in history:
                    g.push(_Entry(m))
            for m in self._unclaimed.pop(topic, ()):
                g.push(_Entry(m))
        return g

    def _remember(self, topic: str, messages: Sequence[TransportMessage]) -> None:
        history = self._history.setdefault(topic, deque(maxlen=self.max_unclaimed or None))
        history.extend(messages)

    def _dead_letter(
        self, group: _Group, entry: _Entry, reason: str, attempts: int | None = None
    ) -> None:
        group.settle(entry)
        letter = deadletter.dead_letter(
            entry.message, group.topic, group.name, attempts or entry.attempt, reason
        )
        self._remember(letter.topic, (letter.message,))
        groups = self._topics.get(letter.topic)
        if groups:
            for g in groups.values():
                g.push(_Entry(letter.message))
        letter.log()

    def _keep_unclaimed(self, topic: str, messages: Sequence[TransportMessage]) -> None:
        """A topic with no group keeps what it receives for its first group, up to
        ``max_unclaimed`` messages; beyond that the oldest go, each logged and counted in
        :attr:`unclaimed_dropped`."""
        if not messages:
            return
        held = self._unclaimed.setdefault(topic, deque())
        held.extend(messages)
        over = len(held) - self.max_unclaimed
        if over > 0:
            for _ in range(over):
                dropped = held.popleft()
                log.warning(
                    "topic %s has no consumer group and holds %d messages: dropped the oldest, %s",
                    topic,
                    self.max_unclaimed,
                    dropped.id,
                )
            self.unclaimed_dropped += over

    async def lag(self, topic: str, group: str) -> int | None:
        """Messages of ``topic`` waiting in ``group``: ready, or held back behind their key
        (delivered-but-unsettled ones and nacks waiting out a delay are not counted); None
        if the group was never declared. See :meth:`msdata.transport.Transport.lag`."""
        if self._topics.get(topic, {}).get(group) is None:
            return None
        return self.pending(topic, group)
