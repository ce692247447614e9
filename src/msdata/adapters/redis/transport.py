"""The transport port on Redis Streams (redis-py asyncio; hiredis recommended).

Keys (``P`` is the ``key_prefix``; topic and group names cannot hold ``:``, so no two collide):

- ``P:<topic>``: the topic's stream. ``publish`` XADDs a whole batch in one pipeline and
  returns when Redis has replied to every XADD.
- ``P:<topic>:<group>:retry``: the group's retry stream. A nacked (or released) delivery is
  acked on the topic stream and copied here, with its next attempt number, in one Lua script;
  a consumer reads both streams (the retry stream first) in one round trip, the READ script.
- ``P:<topic>:<group>:delayed``: a sorted set holding the copies of deliveries nacked with a
  delay, scored by the server's clock. Any consumer of the group moves the due ones to the
  retry stream, so a delay survives the consumer that asked for it.
- The dead-letter topic :func:`~msdata.transport.dead_letter_topic` is a topic stream like any
  other: dead-lettering acks the entry and XADDs a copy with the ``x-msdata-*`` reason headers,
  atomically.

Consumer groups: a subscription declares its group with ``XGROUP CREATE``. The first group of
a stream starts at ``0`` and so receives what was published before any group existed (this is
how a dead-letter topic keeps what it receives until read); any later group starts at ``$``
(``replays_history=False``), except on a dead-letter topic
(:func:`~msdata.transport.is_dead_letter_topic`), where every group starts at ``0`` and the
stream is not trimmed by its subscriptions, so a reader that comes late misses no dead letter.

Redelivery: each subscription is one consumer (a unique name). Deliveries it has not settled
when it closes are released at once to the retry stream: those it handed out with their next
attempt number, those it read but never handed out with their own (closing is not an
attempt, however often consumers of the group stop). A ``receive`` in flight then returns
``[]``: its read is cut short and what it took is given back the same way, as is what the
read of a cancelled ``receive`` took (that read goes on in its own task). A ``release()``
whose caller is cancelled goes on in a task of its own, which the close waits for. A settle
that copies (release, nack, dead_letter, a close's give-back) acts only on an entry still
pending at its own consumer (the SETTLE script), so one that reaches Redis late (after
another consumer took the entry over) does nothing and makes no second copy. A
close that cannot reach Redis (a server gone silent) leaves its give-back (and its acks) to
the transport, which sends it again until Redis answers or the transport closes; a
subscription of the same group on that transport sends it before its own scan claims
anything. Another consumer that claims the entries first (a process of its own, once they
were idle for ``claim_idle``) counts one more attempt, as for a consumer that died. Those
of a consumer that died are taken over with ``XAUTOCLAIM`` once idle for ``claim_idle``
seconds, by a consumer that scans every ``claim_interval`` seconds; so
``features.redelivery_timeout == claim_idle + claim_interval``. A live consumer resets the
idle time of what it holds every ``claim_idle / 3`` seconds (``XCLAIM ... JUSTID`` on its
own entries), so a slow handler is not mistaken for a dead one. The attempt number is the
entry's own attempt field (only on the retry stream, which only msdata writes; an
``attempt`` field a foreign producer put on a topic stream is ignored) plus its XPENDING
delivery count minus one; a reclaimed entry whose
attempt exceeds ``max_attempts`` (its consumers kept dying on it) is dead-lettered instead of
being delivered again.

Acks are batched: ``ack()`` returns at once and the XACKs go out with the subscription's next
round trip (its next ``receive``, or a flush on the next turn of the event loop, or
``close``). An ack whose round trip failed (a lost connection, a server gone silent) is kept
and sent again with the next one until Redis confirms it (an XACK of an entry already acked
does nothing); meanwhile the heartbeat keeps its entry alive, the reclaim scan sends pending
acks before it claims anything, and the consumer never takes up again an entry it holds or
has acked, so a message handled while the server was silent does not come back counted.
The same scan takes up, uncounted, an entry of its own it does not hold (a read that reached
Redis after its reply was given up). An ack lost to a crash in between means one
redelivery, as at-least-once allows.
``nack`` and ``dead_letter`` are awaited.

Trimming: never by length (``XADD MAXLEN`` could drop what a group has not acked). Every
``trim_interval`` seconds a subscription runs a Lua script that computes the stream's floor,
the minimum over all its groups of the oldest pending id (or of the last delivered id when
nothing is pending), and runs ``XTRIM MINID ~ floor``: only entries every group has received
and acked are removed. A stream with no group is never trimmed. A group that is no longer
used holds the floor back: delete it (``XGROUP DESTROY``) to let its stream shrink.
:meth:`RedisTransport.trim` does the same on demand.

Foreign entries (XADDed by someone else): the body is the ``body`` field if there is one,
else the value of the only field, else a JSON object of all fields (bytes decoded as UTF-8
with replacement); the message id is the stream entry id and the header
:data:`FOREIGN_ENTRY_HEADER` says so. They can be acked, nacked and dead-lettered like any
delivery, and never stop the receive loop.

Sizes: ``max_message_bytes`` bounds an entry (its fields' bytes): ``publish`` refuses a larger
message before sending it, alone in its batch, and a consumer's read scripts dead-letter a
larger entry on the server, so it never reaches the process; ``max_held_bytes`` bounds what
a subscription holds, in bytes (see :class:`RedisSubscription` and docs/transports.md).

Connection loss: ``receive`` retries with back-off until its timeout and returns what it has
(possibly nothing), within its timeout plus :data:`RECEIVE_MARGIN` however long redis-py's
``socket_timeout`` is (a server that went silent: the read goes on in its own task and
finishes into the subscription's buffer, as a cancelled receive's does). A read whose reply
was lost (a timeout, a dropped connection) may have taken entries at Redis: the next round
trip that gets through first takes them into the buffer, uncounted (what the read took at
Redis, XPENDING of this consumer after the last entry it saw), instead of leaving them to be
reclaimed with one more delivery counted. A lost group (a server restarted without
persistence) is declared again.
Consumers resume by themselves once Redis is back; ``publish`` raises
:class:`~msdata.errors.PublishError` while it is down.

Features: ``durable=True`` in the sense of the port: everything (streams, groups, pending
lists, retry and delay sets) lives in Redis keys, so a confirmed message survives a restart
of a Redis that persists (AOF; ``appendfsync always`` if "confirmed" must mean "on disk"). A
Redis run without persistence keeps nothing across a restart, whatever the adapter does.
``ordered_per_key=False``: consumers of a group compete over one stream and a retry goes to
the retry stream behind later messages. ``native_delay=True``: the delay is held by Redis, not
by a timer in the consumer process. Redis Cluster is not supported (the scripts touch keys of
several slots).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any, Self

import redis.asyncio as aioredis
import redis.exceptions as rex

from msdata import deadletter
from msdata.adapters.redis import _lua
from msdata.adapters.redis._url import redis_client
from msdata.errors import (
    ConfigurationError,
    MessageTooLarge,
    MsdataError,
    PublishError,
    TransportClosed,
    TransportError,
)
from msdata.serialization import DEFAULT_MAX_SIZE
from msdata.transport import (
    ClosesOnExit,
    DeliveryState,
    DriverErrors,
    ThrottledLog,
    TransportFeatures,
    TransportMessage,
    check_message,
    check_name,
    is_dead_letter_topic,
    pop_url_options,
    refused_id,
)
from msdata.transport import dead_letter_topic as deadletter_topic
from msdata.urls import redact_url

__all__ = [
    "DEFAULT_MAX_HELD_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "FOREIGN_ENTRY_HEADER",
    "RECEIVE_MARGIN",
    "RedisDelivery",
    "RedisSubscription",
    "RedisTransport",
]

log = logging.getLogger("msdata.adapters.redis")

#: set (to the stream entry id) on deliveries of entries msdata did not write
FOREIGN_ENTRY_HEADER = "x-msdata-foreign-entry"
#: the largest attempt number a retry copy's ``attempt`` field is believed to hold
MAX_ATTEMPT = 1_000_000
#: ``max_message_bytes`` by default: the codec's 1 MiB body limit
#: (:data:`msdata.serialization.DEFAULT_MAX_SIZE`) plus 64 KiB for the id, key and headers,
#: far below Redis's own limit on one argument (``proto-max-bulk-len``, 512 MiB), over which
#: Redis closes the connection
DEFAULT_MAX_MESSAGE_BYTES = DEFAULT_MAX_SIZE + 64 * 1024
#: ``max_held_bytes`` by default: what one subscription holds (read, not yet settled) at most
DEFAULT_MAX_HELD_BYTES = 64 * 1024 * 1024
#: seconds a ``receive`` may take beyond its ``timeout``: the round trip under way when the
#: timeout is reached (its blocking read ends by then at Redis); past that the receive returns
#: ``[]`` and the read finishes into the subscription's buffer
RECEIVE_MARGIN = 0.2
# a dead-letter topic's consumer's size limit: none (above any entry Redis can hold)
_ANY_SIZE = 1 << 50
# the dead-letter reason of an entry over max_message_bytes (a Lua format: size, limit)
_TOO_LARGE = "MessageTooLarge: the stream entry is %d bytes; max_message_bytes is %d"
# error replies that are the server's state, not one message's fault: the whole batch failed
_SERVER_STATE = (
    "OOM",
    "READONLY",
    "MISCONF",
    "NOAUTH",
    "NOPERM",
    "LOADING",
    "BUSY",
    "MASTERDOWN",
    "WRONGTYPE",
    "NOSCRIPT",
    "CLUSTERDOWN",
    "TRYAGAIN",
)

_EMPTY: Any = MappingProxyType({})
# a consumer's pause after a failed round trip: doubled while they fail, up to the last
# (seconds; short enough that consumers are back within about a second of Redis)
_FIRST_PAUSE, _LAST_PAUSE = 0.05, 1.0
_TOPIC, _RETRY = 0, 1
# errors after which the next command reconnects by itself
_TRANSIENT = (rex.ConnectionError, rex.TimeoutError, OSError)


# a connection to the server failed (redis-py's AuthenticationError is a ConnectionError:
# the server answered, so it gets a form of its own: see _refused_setup)
_UNREACHABLE = (rex.ConnectionError, rex.TimeoutError)


class _RedisErrors(DriverErrors):
    """:class:`DriverErrors` for redis-py naming the server: a failed connection becomes
    ``error("could not connect to Redis at <address> (<what>): <Type>: <message>")``,
    ``address`` without credentials (see :func:`_address_of`)."""

    __slots__ = ("address",)

    def __init__(self, what: str, error: type[TransportError], address: str) -> None:
        super().__init__(rex.RedisError, what, error)
        self.address = address

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        if self.address and isinstance(exc, rex.RedisError):
            if _refused_setup(exc):
                # the server answered, but not to these credentials or this database: say
                # which server (never the password: the address has none)
                raise self.error(
                    f"{self.what} at {self.address}: {type(exc).__name__}: {exc}"
                ) from exc
            if isinstance(exc, _UNREACHABLE):
                raise self.error(
                    f"could not connect to Redis at {self.address} ({self.what}): "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        super().__exit__(exc_type, exc, tb)


def _refused_setup(exc: BaseException) -> bool:
    """Whether the server refused the connection's setup: its credentials (a wrong
    password, a user without the rights) or its database (``DB index is out of range``)."""
    if isinstance(
        exc,
        rex.AuthenticationError
        | rex.AuthorizationError
        | rex.NoPermissionError
        | rex.AuthenticationWrongNumberOfArgsError,
    ):
        return True
    return isinstance(exc, rex.ResponseError) and str(exc).startswith(("DB index", "invalid DB"))


def _redis_errors(
    what: str, error: type[TransportError] = TransportError, address: str = ""
) -> DriverErrors:
    """Where redis-py's errors become msdata's: ``with _redis_errors("what was done"):``;
    with ``address``, a failed connection names the server."""
    if address:
        return _RedisErrors(what, error, address)
    return DriverErrors(rex.RedisError, what, error)


def _address_of(client: Any) -> str:
    """The server of a redis-py client as ``redis://host:port/db`` (``rediss://`` over TLS,
    ``unix://path?db=n`` on a socket), without credentials; ``""`` when its pool does not
    tell (a cluster client)."""
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if not isinstance(kwargs, dict):
        return ""
    db = kwargs.get("db", 0)
    path = kwargs.get("path")
    if path:
        return f"unix://{path}?db={db}"
    host = str(kwargs.get("host", "localhost"))
    if ":" in host:
        host = f"[{host}]"
    tls = "SSL" in getattr(getattr(pool, "connection_class", None), "__name__", "")
    return f"{'rediss' if tls else 'redis'}://{host}:{kwargs.get('port', 6379)}/{db}"


async def _execute(pipe: Any, raise_on_error: bool = True) -> Any:
    """``pipe.execute()``, giving the pipeline's connection back to the pool when it fails.
    redis-py loads the pipeline's scripts (on a connection it then holds) before the part
    of ``execute`` that resets the pipeline on failure; a connection lost there stayed with
    the pipeline, which Python later reported as "Unclosed Pipeline client".
    ``raise_on_error=False``: a command's error reply is its result (an exception instance)
    instead of raising; a lost connection still raises."""
    try:
        return await pipe.execute(raise_on_error=raise_on_error)
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.shield(pipe.reset())
        raise


def _entry_fields(m: TransportMessage, headers: Any, attempt: int | None) -> list[Any]:
    fields: list[Any] = [b"id", m.id, b"body", m.body]
    if m.key is not None:
        fields += (b"key", m.key)
    if headers:
        fields += (b"headers", json.dumps(dict(headers), separators=(",", ":")))
    if attempt is not None:
        fields += (b"attempt", attempt)
    return fields


def _fields_size(fields: list[Any]) -> int:
    """The bytes of an entry's fields as XADD sends them (names and values), which is how
    the consumer's read script measures an entry too."""
    n = 0
    for f in fields:
        n += len(f.encode()) if isinstance(f, str) else len(f) if isinstance(f, bytes) else 8
    return n


def _foreign(eid: bytes, flat: list[bytes]) -> tuple[TransportMessage, int]:
    fields = dict(zip(flat[::2], flat[1::2], strict=False))
    body = fields.get(b"body")
    if body is None:
        if len(fields) == 1:
            (body,) = fields.values()
        else:
            body = json.dumps(
                {k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()}
            ).encode()
    sid = eid.decode()
    return TransportMessage(sid, body, None, MappingProxyType({FOREIGN_ENTRY_HEADER: sid})), 1


def _parse(eid: bytes, flat: list[bytes], own: bool = False) -> tuple[TransportMessage, int]:
    """The message of an entry (its fields as a flat list, as Redis sends them) and the
    entry's own attempt number: 1, unless it is a retry copy msdata wrote (``own``: it comes
    from a group's retry stream, which only msdata writes). An ``attempt`` field on a topic
    stream is another producer's and is ignored; on a retry stream it is kept within
    1..:data:`MAX_ATTEMPT`."""
    try:
        # msdata writes id and body first; anything else is a foreign entry
        if flat[0] != b"id" or flat[2] != b"body":
            return _foreign(eid, flat)
        key = None
        headers = _EMPTY
        attempt = 1
        n = len(flat)
        i = 4
        while i < n:
            name = flat[i]
            if name == b"key":
                key = flat[i + 1].decode()
            elif name == b"headers":
                headers = json.loads(flat[i + 1])
                if not isinstance(headers, dict) or not all(
                    isinstance(v, str) for v in headers.values()
                ):
                    return _foreign(eid, flat)
            elif name == b"attempt" and own:
                attempt = min(max(int(flat[i + 1]), 1), MAX_ATTEMPT)
            i += 2
        return TransportMessage(flat[1].decode(), flat[3], key, headers), attempt
    except (IndexError, ValueError, TypeError, AttributeError):  # UnicodeDecodeError: ValueError
        return _foreign(eid, flat)


def _stream_id(eid: bytes) -> tuple[int, int]:
    """A stream entry id (``b"<ms>-<seq>"``) as a pair that orders as Redis orders ids."""
    ms, _, seq = eid.partition(b"-")
    return int(ms), int(seq or 0)


def _retrieved(task: asyncio.Task[None]) -> None:
    """Mark the outcome of a read as seen: one left behind by a cancelled receive may end
    with an error no one awaits (the next receive raises it if it does)."""
    if not task.cancelled():
        task.exception()


def _raw_reply(response: Any, **options: Any) -> Any:
    return response


class RedisDelivery(DeliveryState["RedisSubscription"]):
    """A delivery from :class:`RedisTransport`; see :class:`msdata.transport.Delivery`.

    ``ack()`` is batched (sent with the subscription's next round trip); ``nack``,
    ``release`` and ``dead_letter`` return once Redis has done them, or found that another
    consumer took the entry over (this one's heartbeat stopped past ``claim_idle``): then
    they do nothing, the other consumer holds it."""

    __slots__ = ("_eid", "_released", "_size", "_stream")

    def __init__(
        self,
        sub: RedisSubscription,
        stream: int,
        eid: bytes,
        message: TransportMessage,
        attempt: int,
        size: int,
    ) -> None:
        super().__init__(sub, message, attempt)
        self._stream = stream
        self._eid = eid
        self._size = size
        # release() was called: the close gives it back uncounted if it is still held
        self._released = False

    def _begin(self) -> bool:
        if not self._begin_settle():
            return False
        sub = self._sub
        if sub._inflight.pop(self, False) is None:
            sub._held -= self._size
        return True

    def _undo(self) -> None:
        self._settled = False
        self._sub._inflight[self] = None
        self._sub._held += self._size

    async def ack(self) -> None:
        if not self._begin_settle():
            return
        sub = self._sub
        del sub._inflight[self]
        sub._held -= self._size
        sub._acks[self._stream].append(self._eid)
        sub._unacked[self._stream].add(self._eid)
        if not sub._kick_pending:
            sub._kick_pending = True
            asyncio.get_running_loop().call_soon(sub._kick)

    async def nack(self, delay: float = 0.0, reason: str | None = None) -> None:
        if not self._begin():
            return
        sub = self._sub
        try:
            if deadletter.exhausted(self.attempt, sub.max_attempts):
                await sub._settle_to_dead_letter(
                    self, deadletter.failed_reason(self.attempt, reason)
                )
            else:
                await sub._settle_to_retry(self, delay)
        except BaseException:
            self._undo()
            raise

    async def release(self) -> None:
        """Give the delivery back, uncounted (to the retry stream with its own attempt
        number). Cancelling the caller cancels only its wait: the give-back goes on in a task
        of its own, which the subscription's close waits for. If it fails (Redis did not
        answer), the delivery is unsettled again and raises here; the close then gives it
        back uncounted too."""
        if not self._begin():
            return
        self._released = True
        sub = self._sub
        task = asyncio.get_running_loop().create_task(self._give_back())
        sub._releasing.add(task)
        task.add_done_callback(sub._release_done)
        await asyncio.shield(task)

    async def _give_back(self) -> None:
        sub = self._sub
        try:
            with _redis_errors(f"release on {sub.topic!r}", address=sub._t.address):
                await sub._queue_give_back(sub._t._client, self, self.attempt)
        except BaseException:
            self._undo()
            raise

    async def dead_letter(self, reason: str) -> None:
        if not self._begin():
            return
        try:
            await self._sub._settle_to_dead_letter(self, reason)
        except BaseException:
            self._undo()
            raise


class _GiveBack:
    """What a closed consumer still has to send to Redis: its acks and the give-backs of
    what it held (``items``, each delivery with the attempt number of its copy), and, if
    ``cut``, a read cut short by the close whose entries are given back too. ``sent``: the
    acks and items went through (what is left is forgetting the consumer)."""

    __slots__ = ("acks", "cut", "items", "sent", "sub")

    def __init__(
        self,
        sub: RedisSubscription,
        acks: tuple[list[bytes], list[bytes]],
        items: list[tuple[RedisDelivery, int]],
        cut: bool,
    ) -> None:
        self.sub = sub
        self.acks = acks
        self.items = items
        self.cut = cut
        self.sent = False


class RedisSubscription(ClosesOnExit):
    """A consumer in a group; see :class:`msdata.transport.Subscription`.

    It holds (has read and not yet settled) at most ``prefetch`` deliveries and, in bytes,
    at most the transport's ``max_held_bytes`` plus one message: each read asks for no more
    entries than fit in what is left of that budget at ``max_message_bytes`` each (at least
    one while anything is left), and while the budget is used up it reads nothing
    (``receive`` returns ``[]`` at once, as it does with ``prefetch`` deliveries held).
    Reads run in a Lua script that dead-letters an entry over ``max_message_bytes`` on the
    server, so such an entry's bytes never reach the consumer; only the blocking wait for
    new entries (when none were there) is a plain ``XREADGROUP COUNT 1``, whose entry, if too
    large, is dead-lettered right after it was read. A consumer of a dead-letter topic
    (``<topic>.<group>.dlq``, what :func:`msdata.service.read_dead_letters` reads) has no
    size limit: it reads one entry at a time, of any size, so a dead letter larger than
    ``max_message_bytes`` is handed out (and stays where it is) rather than moved into the
    dead-letter topic's own dead-letter topic."""

    def __init__(
        self, transport: RedisTransport, topic: str, group: str, max_attempts: int, prefetch: int
    ) -> None:
        self._t = transport
        self.topic = topic
        self.group = group
        self.max_attempts = max_attempts
        self.prefetch = prefetch
        self.consumer = f"{transport._consumer_prefix}-{uuid.uuid4().hex[:10]}"
        prefix = transport.key_prefix
        self._keys = (f"{prefix}:{topic}", f"{prefix}:{topic}:{group}:retry")
        self._bkeys = tuple(k.encode() for k in self._keys)
        self._delayed = f"{prefix}:{topic}:{group}:delayed"
        self._dlq = transport._stream_key(deadletter_topic(topic, group))
        self._keeps_history = is_dead_letter_topic(topic)
        self._streams: dict[Any, Any] = {self._keys[0]: ">", self._keys[1]: ">"}
        self._inflight: dict[RedisDelivery, None] = {}
        # bytes of the entries in _inflight and _buffer (their fields, as Redis counts them)
        self._held = 0
        self._buffer: deque[RedisDelivery] = deque()
        # read or reclaimed beyond max_attempts: dead-lettered, not handed out
        self._overdue: list[tuple[RedisDelivery, str]] = []
        self._acks: tuple[list[bytes], list[bytes]] = ([], [])
        # per stream, the entries acked whose XACK Redis has not confirmed yet (in _acks, or
        # in a round trip under way): kept alive by the heartbeat, never taken up again by
        # this consumer's own reclaim or recovery, until an XACK gets through
        self._unacked: tuple[set[bytes], set[bytes]] = (set(), set())
        self._cursors: list[bytes] = [b"0-0", b"0-0"]
        # per stream, the largest entry id this consumer was given (read or reclaimed): what
        # a later read takes with ">" comes after it, so a read whose reply was lost took
        # exactly this consumer's pending entries after it
        self._seen: list[tuple[int, int]] = [(0, 0), (0, 0)]
        # a round trip that may have taken entries failed: its reply may be lost
        self._unsure = False
        # after a failed round trip, no other before _retry_at (monotonic seconds); the
        # pause doubles from _FIRST_PAUSE up to _LAST_PAUSE while they go on failing, across
        # receive calls (each of which used to try at once)
        self._pause = _FIRST_PAUSE
        self._retry_at = 0.0
        self._next_maintenance = 0.0
        self._next_trim = 0.0
        self._flusher: asyncio.Task[None] | None = None
        # the read of a receive (its own task: a receive cancelled meanwhile leaves it to
        # finish into _buffer, and close cancels it)
        self._fetch: asyncio.Task[None] | None = None
        self._kick_pending = False
        # release() give-backs under way (a cancelled caller leaves them to finish)
        self._releasing: set[asyncio.Task[None]] = set()
        self._heart: asyncio.Task[None] | None = None
        self._entered = False
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._closed or self._t._closed:
            raise TransportClosed("subscribe() on a closed transport")
        with _redis_errors(f"could not declare group {self.group!r}", address=self._t.address):
            await self._declare()
        self._entered = True
        self._t._subs.add(self)
        now = time.monotonic()
        self._next_trim = now + self._t.trim_interval if self._t.trim_interval else float("inf")
        self._heart = asyncio.get_running_loop().create_task(self._heartbeat())
        return self

    async def _declare(self) -> None:
        await self._t._declare(self.topic, self.group)

    async def close(self) -> None:
        """Stop consuming: send pending acks and give back unsettled deliveries (at once, to
        the retry stream): those handed out counted, those read and never handed out or
        released uncounted. A ``release()`` still under way is waited for. A ``receive`` in
        flight returns ``[]``; what its read took is given back uncounted, as what was read
        and never handed out. If Redis does not answer (or the close is cancelled), the
        transport goes on giving them back, the same way, until Redis answers or the
        transport closes; a subscription of the same group on this transport gives them
        back before its next scan for idle entries. Another consumer that takes them over
        first (once idle for ``claim_idle``) counts one more attempt, as for a consumer that
        died."""
        if self._closed:
            return
        self._closed = True
        self._t._subs.discard(self)
        if self._heart is not None:
            self._heart.cancel()
        # a read in flight (a receive waiting, or one cancelled meanwhile) is stopped: what
        # it took at Redis, never handed out, is given back below uncounted
        fetch = self._fetch if self._fetch is not None and not self._fetch.done() else None
        cut = fetch is not None
        if fetch is not None:
            fetch.cancel()
        if self._heart is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._heart
        if fetch is not None:
            await asyncio.wait((fetch,))
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher
        if self._releasing:
            # a release that fails puts its delivery back: given back below, uncounted
            await asyncio.wait(set(self._releasing))
        if not self._entered:
            return
        # handed out and not settled: that delivery was an attempt, so the copy carries the
        # next one; read but never handed out, or released: no attempt was made, the copy
        # keeps its number
        unsettled = [(d, d.attempt if d._released else d.attempt + 1) for d in self._inflight]
        unsettled += [(d, d.attempt) for d in self._buffer]
        self._inflight.clear()
        self._buffer.clear()
        self._held = 0
        for d, _ in unsettled:
            d._settled = True
        job = _GiveBack(self, self._take_acks(), unsettled, cut)
        t = self._t
        try:
            await self._run_give_back(job)
        except (rex.RedisError, asyncio.CancelledError) as e:
            later = t._give_back_later(job)
            if isinstance(e, asyncio.CancelledError):
                raise
            log.warning(
                "closing consumer %s of %s/%s: %s; its %d unsettled deliveries are %s",
                self.consumer,
                self.topic,
                self.group,
                e,
                len(unsettled),
                "given back once Redis answers"
                if later
                else f"reclaimed, counted, after {t.claim_idle:.1f}s",
            )

    async def _run_give_back(self, job: _GiveBack) -> None:
        """Send what the closed consumer ``job`` describes still has to: its acks and the
        give-backs of what it held (unless a scan sent them already), then forget the
        consumer; after a read cut short by the close, also give back what that read took
        at Redis (:meth:`_give_back_held`). Raises redis-py's errors."""
        pipe = self._t._client.pipeline(transaction=False)
        if not job.sent:
            await self._queue_job(pipe, job)
        if not job.cut:
            await self._queue_forget(pipe)
        if pipe.command_stack:
            await _execute(pipe)
        job.sent = True
        if job.cut:
            await self._give_back_held()

    async def _queue_job(self, pipe: Any, job: _GiveBack) -> None:
        for i in (_TOPIC, _RETRY):
            if job.acks[i]:
                pipe.xack(self._keys[i], self.group, *job.acks[i])
        for d, attempt in job.items:
            await self._queue_give_back(pipe, d, attempt)

    def _queue_give_back(self, client: Any, d: RedisDelivery, attempt: int) -> Any:
        """The SETTLE script giving ``d`` back: acked and copied to the retry stream with
        ``attempt``, only if this consumer still holds it at Redis."""
        return self._queue_settle(
            client, d, self._keys[_RETRY], 0.0, d.message.headers, True, attempt
        )

    def _release_done(self, task: asyncio.Task[None]) -> None:
        self._releasing.discard(task)
        _retrieved(task)

    async def _queue_forget(self, pipe: Any) -> None:
        for key in self._keys:
            await self._t._forget_consumer(
                keys=[key], args=[self.group, self.consumer], client=pipe
            )

    async def _give_back_held(self) -> list[tuple[RedisDelivery, int]]:
        """Give back, uncounted, what this (closed) consumer still holds at Redis: what a
        read cut short by the close took there (its reply never came). Then forget the
        consumer. Returns what it gave back, with the attempt numbers of the copies."""
        t = self._t
        pipe = t._client.pipeline(transaction=False)
        for key in self._keys:
            await t._own_pending(
                keys=[key], args=[self.group, self.consumer, 2 * self.prefetch + 100], client=pipe
            )
        results = await _execute(pipe)
        held: list[tuple[RedisDelivery, int]] = []
        for i in (_TOPIC, _RETRY):
            entries, counts = results[i]
            for (eid, flat), count in zip(entries, counts, strict=True):
                message, base = _parse(eid, flat, i == _RETRY)
                # read, never handed out: the copy keeps the number it would have been
                # handed out with
                attempt = base + int(count) - 1
                held.append((RedisDelivery(self, i, eid, message, attempt, 0), attempt))
        pipe = t._client.pipeline(transaction=False)
        for d, attempt in held:
            d._settled = True
            await self._queue_give_back(pipe, d, attempt)
        await self._queue_forget(pipe)
        await _execute(pipe)
        return held

    # -- receiving --------------------------------------------------------------------------

    async def receive(self, max_messages: int = 100, timeout: float = 1.0) -> list[RedisDelivery]:
        """Up to ``max_messages`` deliveries (at most ``prefetch`` held); waits up to
        ``timeout`` seconds for the first, and returns within ``timeout`` plus
        :data:`RECEIVE_MARGIN` whatever the server does: ``[]`` when nothing arrived in
        time, the server could not be reached, or it did not answer (its read then goes on
        in its own task, into the buffer, for the next receive; nothing it took is lost or
        counted twice). Raises :class:`~msdata.errors.TransportClosed` once closed and
        :class:`~msdata.errors.TransportError` on an error reply of the server (not on
        connection loss)."""
        if self._closed or self._t._closed:
            raise TransportClosed("receive() on a closed subscription")
        if not self._entered:
            raise TransportError("use the subscription with 'async with' before receive()")
        room = min(max_messages, self.prefetch - len(self._inflight))
        if room <= 0:
            return []
        buf = self._buffer
        deadline = time.monotonic() + max(timeout, 0.0)
        end = deadline + RECEIVE_MARGIN
        # a read left running (by a receive cancelled, or timed out, before): wait for it
        # within this receive's time
        if self._fetch is not None and not await self._join_fetch(end - time.monotonic()):
            return []
        if not buf:
            room = self._affordable(room)
            if room <= 0:
                return []
            left = max(deadline - time.monotonic(), 0.0)
            self._fetch = asyncio.get_running_loop().create_task(self._fill(room, left))
            self._fetch.add_done_callback(_retrieved)
            # a round trip that outlives the margin (a silent server: redis-py waits for its
            # socket_timeout) is left running; it finishes into the buffer
            if not await self._join_fetch(end - time.monotonic()):
                return []
        if self._closed:
            # closed while it waited: it hands out nothing (the close gave back what it read)
            return []
        out: list[RedisDelivery] = []
        inflight = self._inflight
        while buf and len(out) < room:
            d = buf.popleft()
            inflight[d] = None
            out.append(d)
        return out

    async def _join_fetch(self, timeout: float | None = None) -> bool:
        """Wait for the read in flight, up to ``timeout`` seconds (False if it is still
        running then). Cancelled, the receive leaves it to finish into the buffer: an entry
        it took at Redis is handed out by the next receive, or given back by the close,
        uncounted either way. Raises what the read raised (not when the close stopped it)."""
        fetch = self._fetch
        assert fetch is not None
        if timeout is not None:
            timeout = max(timeout, 0.0)
        done, _ = await asyncio.wait((fetch,), timeout=timeout)
        if not done:
            return False
        self._fetch = None
        if not fetch.cancelled():
            fetch.result()
        return True

    @property
    def _size_limit(self) -> int:
        """The largest entry (bytes of its fields) this consumer takes: the transport's
        ``max_message_bytes``; a larger one is dead-lettered on the server. A consumer of a
        dead-letter topic (the dead-letter reader, ``msdata dlq``) takes every entry, one a
        read: dead-lettering a dead letter would move it out of every reader's sight."""
        return _ANY_SIZE if self._keeps_history else self._t.max_message_bytes

    def _affordable(self, room: int) -> int:
        """How many entries to read at most: ``room``, cut to what fits in the byte budget
        if each were as large as allowed; at least one while any budget is left."""
        left = self._t.max_held_bytes - self._held
        if left <= 0:
            return 0
        return min(room, max(1, left // self._size_limit))

    async def _fill(self, room: int, timeout: float) -> None:
        t = self._t
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            pause = self._retry_at - now
            if pause > 0:  # backing off after a failed round trip
                left = deadline - now
                await asyncio.sleep(max(0.0, min(pause, left)))
                if pause >= left:
                    return
                now = time.monotonic()
            with _redis_errors(f"receive from {self.topic!r}", address=self._t.address):
                try:
                    if self._unsure:
                        # before anything is read: what was read since is after self._seen
                        await self._recover()
                        self._unsure = False
                        if self._buffer:
                            return
                        now = time.monotonic()
                    if now >= self._next_maintenance:
                        await self._maintain(room, now)
                        if self._buffer:
                            return
                        now = time.monotonic()
                    wait = min(deadline, self._next_maintenance) - now
                    await self._read(room, int(min(wait, t._max_block) * 1000))
                    if self._overdue:
                        await self._settle_overdue()
                    self._pause = _FIRST_PAUSE
                except _TRANSIENT as e:
                    # the reply of a read (or reclaim) may be lost after it took entries
                    self._unsure = True
                    t._outage_log.warning(
                        "unreachable",
                        "Redis at %s unreachable (%s: %s); consumers retrying",
                        t.address,
                        type(e).__name__,
                        e,
                    )
                    self._retry_at = time.monotonic() + self._pause
                    self._pause = min(self._pause * 2, _LAST_PAUSE)
                except rex.ResponseError as e:
                    if "NOGROUP" not in str(e):
                        raise
                    log.warning(
                        "group %s of %s is gone; declaring it again", self.group, self.topic
                    )
                    with contextlib.suppress(*_TRANSIENT):
                        await self._declare()
            if self._buffer or time.monotonic() >= deadline:
                return

    async def _recover(self) -> None:
        """After a round trip that failed on the connection: take into the buffer what it
        took at Redis before its reply was lost, with the attempt number it would have been
        handed out with (that read was its delivery; nothing more is counted): this
        consumer's pending entries after the last one it saw on each stream."""
        t = self._t
        pipe = t._client.pipeline(transaction=False)
        # first the heartbeat that could not get through meanwhile: what this consumer holds,
        # or acked without the XACK confirmed, idle since, is not taken over by another
        # consumer's scan before this consumer's own heartbeat comes round
        beats = 0
        for i, key in enumerate(self._keys):
            held = self._held_here(i)
            if held:
                await t._heartbeat_script(
                    keys=[key], args=[self.group, self.consumer, *held], client=pipe
                )
                beats += 1
        for i, key in enumerate(self._keys):
            ms, seq = self._seen[i]
            await t._own_pending(
                keys=[key],
                args=[self.group, self.consumer, 2 * self.prefetch + 100, f"({ms}-{seq}"],
                client=pipe,
            )
        results = (await _execute(pipe))[beats:]
        for i in (_TOPIC, _RETRY):
            entries, counts = results[i]
            if not entries:
                continue
            log.info(
                "consumer %s of %s/%s: %d entries read by a round trip whose reply was lost "
                "are taken up",
                self.consumer,
                self.topic,
                self.group,
                len(entries),
            )
            self._saw(i, entries[-1][0])
            mine = self._held_here(i)
            for (eid, flat), count in zip(entries, counts, strict=True):
                if eid in mine:
                    continue
                size = _fields_size(flat)
                message, base = _parse(eid, flat, i == _RETRY)
                attempt = base + int(count) - 1
                if size > self._size_limit:
                    moved = await t._move_too_large(
                        keys=[self._keys[i], self._dlq],
                        args=[
                            self.group,
                            eid,
                            attempt,
                            self._size_limit,
                            self.topic,
                            _TOO_LARGE,
                        ],
                    )
                    if moved:
                        self._log_too_large([moved])
                    continue
                d = RedisDelivery(self, i, eid, message, attempt, size)
                reason = deadletter.overdue_reason(attempt, self.max_attempts)
                if reason is None:
                    self._buffer.append(d)
                    self._held += size
                else:
                    self._overdue.append((d, reason))
        if self._overdue:
            await self._settle_overdue()

    def _saw(self, stream: int, eid: bytes) -> None:
        seen = _stream_id(eid)
        if seen > self._seen[stream]:
            self._seen[stream] = seen

    def _take_acks(self) -> tuple[list[bytes], list[bytes]]:
        acks = self._acks
        if acks[0] or acks[1]:
            self._acks = ([], [])
        return acks

    def _restore_acks(self, acks: tuple[list[bytes], list[bytes]]) -> None:
        """Put back acks whose round trip failed: they go out again with the next one (an
        XACK of an entry already acked does nothing)."""
        self._acks[0].extend(acks[0])
        self._acks[1].extend(acks[1])

    def _acked(self, acks: tuple[list[bytes], list[bytes]]) -> None:
        """Redis confirmed these XACKs."""
        for i in (_TOPIC, _RETRY):
            if acks[i]:
                self._unacked[i].difference_update(acks[i])

    def _held_here(self, stream: int) -> set[bytes]:
        """The entries of ``stream`` this consumer still holds (buffered, handed out, or
        acked without an XACK confirmed): a reclaim or recovery that returns one of them
        must not hand it out again."""
        held = set(self._unacked[stream])
        for d in (*self._inflight, *self._buffer):
            if d._stream == stream:
                held.add(d._eid)
        return held

    def _queue_acks(self, pipe: Any) -> tuple[list[bytes], list[bytes]]:
        acks = self._take_acks()
        for i in (_TOPIC, _RETRY):
            if acks[i]:
                pipe.xack(self._keys[i], self.group, *acks[i])
        return acks

    async def _read(self, room: int, block_ms: int) -> None:
        """Send the pending acks and read up to ``room`` new entries (the READ script);
        if there were none, wait up to ``block_ms`` for one (``XREADGROUP COUNT 1 BLOCK``)."""
        t = self._t
        acks = self._take_acks()
        try:
            result = await t._read_script(
                keys=[self._keys[_TOPIC], self._keys[_RETRY], self._dlq],
                args=[
                    self.group,
                    self.consumer,
                    room,
                    self._size_limit,
                    self.topic,
                    _TOO_LARGE,
                    len(acks[_TOPIC]),
                    *acks[_TOPIC],
                    *acks[_RETRY],
                ],
                client=t._reader,
            )
        except BaseException:
            self._restore_acks(acks)
            raise
        if acks[0] or acks[1]:
            self._acked(acks)
        retry, fresh, large = result
        if large:
            self._log_too_large(large)
        if retry:
            self._accept(_RETRY, retry)
        if fresh:
            self._accept(_TOPIC, fresh)
        if retry or fresh or large or block_ms <= 0:
            return
        # nothing new: wait for it; a script cannot block, so this read is a plain one
        result = await t._reader.xreadgroup(
            self.group, self.consumer, self._streams, count=1, block=block_ms
        )
        if result:
            if isinstance(result, dict):  # RESP3 replies with a map
                result = result.items()
            for skey, entries in result:
                stream = _TOPIC if skey == self._bkeys[0] else _RETRY
                await self._accept_checked(stream, entries)

    def _accept(self, stream: int, entries: Any) -> None:
        if not entries:
            return
        self._saw(stream, entries[-1][0])  # a read's entries come in id order
        buf = self._buffer
        own = stream == _RETRY
        held = 0
        for eid, flat in entries:
            # the common case inline: an msdata entry with only an id and a body
            if len(flat) == 4 and flat[0] == b"id" and flat[2] == b"body":
                size = 6 + len(flat[1]) + len(flat[3])
                try:
                    message = TransportMessage(flat[1].decode(), flat[3], None, _EMPTY)
                    attempt = 1
                except UnicodeDecodeError:
                    message, attempt = _foreign(eid, flat)
            else:
                size = _fields_size(flat)
                message, attempt = _parse(eid, flat, own)
            d = RedisDelivery(self, stream, eid, message, attempt, size)
            if attempt > self.max_attempts:
                # released again and again by consumers that closed unsettled
                reason = deadletter.overdue_reason(attempt, self.max_attempts)
                assert reason is not None
                self._overdue.append((d, reason))
            else:
                buf.append(d)
                held += size
        self._held += held

    async def _accept_checked(self, stream: int, entries: Any) -> None:
        """:meth:`_accept` for entries of a plain read, which no script has measured: one
        over ``max_message_bytes`` is dead-lettered at once (copied on the server)."""
        t = self._t
        small = []
        if entries:
            self._saw(stream, entries[-1][0])
        for eid, flat in entries:
            size = _fields_size(flat)
            if size <= self._size_limit:
                small.append((eid, flat))
                continue
            attempt = _parse(eid, flat, stream == _RETRY)[1] if stream == _RETRY else 1
            moved = await t._move_too_large(
                keys=[self._keys[stream], self._dlq],
                args=[self.group, eid, attempt, self._size_limit, self.topic, _TOO_LARGE],
            )
            if moved:
                self._log_too_large([moved])
        self._accept(stream, small)

    def _log_too_large(self, records: Any) -> None:
        """Log the dead letters the scripts made of entries over ``max_message_bytes``:
        ``[entry id, message id, size, attempts, reason]`` each."""
        for _eid, mid, _size, attempts, reason in records:
            shown = mid.decode(errors="replace") if isinstance(mid, bytes) else str(mid)
            text = reason.decode() if isinstance(reason, bytes) else str(reason)
            deadletter.dead_letter(
                TransportMessage(shown, b""), self.topic, self.group, int(attempts), text
            ).log()

    # -- maintenance: delayed retries, reclaiming, trimming --------------------------------

    async def _maintain(self, room: int, now: float) -> None:
        t = self._t
        pipe = t._client.pipeline(transaction=False)
        # acks not sent yet go first: what they ack is not reclaimed below (an ack whose
        # XACK failed, the server silent, would otherwise come back as its next attempt)
        acks = self._queue_acks(pipe)
        # and so do the give-backs of consumers of this group closed while Redis did not
        # answer: what they held goes back uncounted, not reclaimed below counted
        jobs = [
            job
            for job in t._give_backs
            if not job.sent and job.sub.topic == self.topic and job.sub.group == self.group
        ]
        for job in jobs:
            await job.sub._queue_job(pipe, job)
        sent = len(pipe.command_stack)
        await t._move_due(keys=[self._delayed, self._keys[_RETRY]], args=[room], client=pipe)
        idle = int(t.claim_idle * 1000)
        for i in (_TOPIC, _RETRY):
            await t._reclaim(
                keys=[self._keys[i], self._dlq],
                args=[
                    self.group,
                    self.consumer,
                    idle,
                    self._cursors[i],
                    room,
                    self._size_limit,
                    self.topic,
                    _TOO_LARGE,
                    "1" if i == _RETRY else "0",
                ],
                client=pipe,
            )
        trim = now >= self._next_trim
        if trim:
            for i, key in enumerate(self._keys):
                if i == _TOPIC and self._keeps_history:
                    continue  # a dead-letter topic: kept for groups declared later
                await t._trim(keys=[key], args=["~"], client=pipe)
                await t._forget_idle(
                    keys=[key], args=[self.group, int(t.forget_after * 1000)], client=pipe
                )
        try:
            results = await _execute(pipe)
        except BaseException:
            self._restore_acks(acks)
            raise
        if sent:
            self._acked(acks)
            results = results[sent:]
        for job in jobs:
            job.sent = True
        self._next_maintenance = now + t.claim_interval
        if trim and t.trim_interval:
            self._next_trim = now + t.trim_interval
        _moved, next_due = results[0]
        if next_due >= 0:
            self._next_maintenance = min(self._next_maintenance, now + next_due / 1000)
        overdue: list[tuple[RedisDelivery, str]] = []
        for i in (_TOPIC, _RETRY):
            cursor, entries, counts, large, own = results[1 + i]
            self._cursors[i] = cursor
            if entries:
                self._saw(i, entries[-1][0])  # XAUTOCLAIM scans in id order
            if large:
                self._log_too_large(large)
            # its own entries, idle while the server did not answer (nor the heartbeat get
            # through): still held, or acked with the XACK still to be confirmed, they are
            # left as they are (taken up again they would be handed out twice, counted);
            # else a read whose reply was lost took them (perhaps a read that reached Redis
            # after the consumer gave up on it): that read was their delivery, so the claim
            # is not counted
            mine = self._held_here(i) if entries else set()
            lost = 0
            for (eid, flat), count, was_own in zip(entries, counts, own, strict=True):
                if not flat:  # deleted from the stream meanwhile (Redis < 7 reports them so)
                    continue
                if eid in mine:
                    continue
                message, base = _parse(eid, flat, i == _RETRY)
                size = _fields_size(flat)
                attempt = base + int(count) - 1
                if was_own:
                    attempt = max(attempt - 1, base)
                    lost += 1
                d = RedisDelivery(self, i, eid, message, attempt, size)
                reason = deadletter.overdue_reason(d.attempt, self.max_attempts)
                if reason is None:
                    self._buffer.append(d)
                    self._held += size
                else:
                    overdue.append((d, reason))
            if lost:
                log.info(
                    "consumer %s of %s/%s: %d entries read by a round trip whose reply was "
                    "lost are taken up",
                    self.consumer,
                    self.topic,
                    self.group,
                    lost,
                )
        self._overdue.extend(overdue)
        await self._settle_overdue()

    async def _settle_overdue(self) -> None:
        """Dead-letter the deliveries read or reclaimed beyond ``max_attempts``."""
        overdue, self._overdue = self._overdue, []
        for d, reason in overdue:
            d._settled = True
            try:
                await self._settle_to_dead_letter(d, reason, deadletter.overdue_attempts(d.attempt))
            except TransportError as e:  # still pending: the next scan tries again
                log.warning("dead-lettering %s of %s failed: %s", d._eid, self.topic, e)

    async def _heartbeat(self) -> None:
        t = self._t
        interval = t.claim_idle / 3
        while not self._closed:
            await asyncio.sleep(interval)
            self._kick()
            held: tuple[list[bytes], list[bytes]] = ([], [])
            for d in (*self._inflight, *self._buffer):
                held[d._stream].append(d._eid)
            # acked, XACK not confirmed yet: kept alive until it is
            for i in (_TOPIC, _RETRY):
                held[i].extend(self._unacked[i])
            try:
                for i in (_TOPIC, _RETRY):
                    if held[i]:
                        await t._heartbeat_script(
                            keys=[self._keys[i]], args=[self.group, self.consumer, *held[i]]
                        )
            except rex.RedisError as e:
                # redis-py may turn a cancel mid-command into a RedisError: a closing
                # subscription's heartbeat ends here, it does not sleep on (close awaits it)
                task = asyncio.current_task()
                if self._closed or (task is not None and task.cancelling()):
                    raise asyncio.CancelledError from e
                # (every consumer's, each interval, while Redis is down: throttled)
                t._outage_log.warning(
                    "heartbeat", "heartbeat of consumer %s failed: %s", self.consumer, e
                )

    def _kick(self) -> None:
        """Runs on the loop turn after an ack: sends the acks unless a ``receive`` took them
        along with its read meanwhile."""
        self._kick_pending = False
        if (self._acks[0] or self._acks[1]) and self._flusher is None and not self._closed:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_acks())

    async def _flush_acks(self) -> None:
        # loops: acks made while a flush is in flight go out with the next one
        try:
            while True:
                acks = self._take_acks()
                if not (acks[0] or acks[1]):
                    return
                pipe = self._t._client.pipeline(transaction=False)
                for i in (_TOPIC, _RETRY):
                    if acks[i]:
                        pipe.xack(self._keys[i], self.group, *acks[i])
                try:
                    await _execute(pipe)
                except BaseException as e:
                    self._restore_acks(acks)
                    if isinstance(e, rex.RedisError):
                        self._t._outage_log.warning(
                            "acks", "acks of consumer %s not sent yet: %s", self.consumer, e
                        )
                        return
                    raise
                self._acked(acks)
        finally:
            self._flusher = None

    # -- settling ---------------------------------------------------------------------------

    def _queue_settle(
        self,
        client: Any,
        d: RedisDelivery,
        target: str,
        delay: float,
        headers: Any,
        retry: bool,
        attempt: int | None = None,
    ) -> Any:
        """``retry``: the copy carries an attempt number, ``attempt`` (default the next one)."""
        if retry and attempt is None:
            attempt = d.attempt + 1
        fields = _entry_fields(d.message, headers, attempt if retry else None)
        return self._t._settle(
            keys=[self._keys[d._stream], target, self._delayed],
            args=[self.group, self.consumer, d._eid, int(delay * 1000), *fields],
            client=client,
        )

    async def _settle_to_retry(self, d: RedisDelivery, delay: float) -> None:
        with _redis_errors(f"nack on {self.topic!r}", address=self._t.address):
            await self._queue_settle(
                self._t._client, d, self._keys[_RETRY], delay, d.message.headers, True
            )
        if delay > 0:
            self._next_maintenance = min(self._next_maintenance, time.monotonic() + delay)

    async def _settle_to_dead_letter(
        self, d: RedisDelivery, reason: str, attempts: int | None = None
    ) -> None:
        # the policy's message, moved atomically by the SETTLE script (ack + XADD)
        letter = deadletter.dead_letter(
            d.message, self.topic, self.group, attempts or d.attempt, reason
        )
        target = self._t._stream_key(letter.topic)
        with _redis_errors(f"dead_letter on {self.topic!r}", address=self._t.address):
            moved = await self._queue_settle(
                self._t._client, d, target, 0.0, letter.message.headers, False
            )
        if moved:  # 0: another consumer settled the entry first
            letter.log()


class RedisTransport:
    """:class:`msdata.transport.Transport` on Redis Streams; see the module docstring.

    ``client`` must be a ``redis.asyncio.Redis`` made with ``decode_responses=False`` (bodies
    are bytes). The transport does not close a client it was given; one made by
    :meth:`from_url` it does.

    - ``namespace``: on a server shared with others, every key this transport touches starts
      with ``namespace + ":"`` (the same option as on the other transports).
    - ``key_prefix``: the same, under its older name (default ``"msdata"``).
    - ``claim_idle``: seconds a delivery must sit unsettled at a consumer that stopped
      heart-beating before another consumer takes it over (XAUTOCLAIM).
    - ``claim_interval``: how often each subscription scans for such deliveries and for due
      delayed retries (default ``claim_idle / 4``).
    - ``trim_interval``: how often each subscription trims its streams below what every group
      has acked (``None``: never; call :meth:`trim` yourself). At the same time it removes
      from its group the consumers (of crashed processes) that hold nothing and were idle
      for ``forget_after`` seconds (60, or ``10 * claim_idle`` if more).
    - ``max_message_bytes``: the largest entry, in bytes of its fields (the body plus the id,
      key, headers and field names; :data:`DEFAULT_MAX_MESSAGE_BYTES`, the codec's 1 MiB plus
      64 KiB). ``publish`` refuses a larger message before sending it
      (:class:`~msdata.errors.PublishError` naming it in ``refused``, with a
      :class:`~msdata.errors.MessageTooLarge` as its cause); a subscription dead-letters a
      larger entry that another producer wrote, with the reason, on the server (see
      :class:`RedisSubscription`). Keep it at or above the codec's ``max_size`` and the same
      on the producers and consumers of a topic.
    - ``max_held_bytes``: what one subscription may hold, read and not yet settled, in bytes
      (:data:`DEFAULT_MAX_HELD_BYTES`, 64 MiB), besides ``prefetch`` in messages; a consumer
      holds at most this plus one message.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key_prefix: str | None = None,
        namespace: str | None = None,
        claim_idle: float = 2.0,
        claim_interval: float | None = None,
        trim_interval: float | None = 5.0,
        max_block: float = 1.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
    ) -> None:
        kwargs = client.connection_pool.connection_kwargs
        #: the server, as its connection errors name it, without credentials
        self.address = _address_of(client)
        if kwargs.get("decode_responses"):
            raise ConfigurationError("RedisTransport needs a client with decode_responses=False")
        if namespace is not None:
            check_name("namespace", namespace)
            if key_prefix is not None and key_prefix != namespace:
                raise ConfigurationError("give namespace or key_prefix, not both")
            key_prefix = namespace
        elif key_prefix is None:
            key_prefix = "msdata"
        self.namespace = namespace
        if not key_prefix or claim_idle <= 0:
            raise ConfigurationError("key_prefix must be non-empty and claim_idle > 0")
        for name, value in (
            ("max_message_bytes", max_message_bytes),
            ("max_held_bytes", max_held_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be an int >= 1, not {value!r}")
        # Redis refuses an argument over proto-max-bulk-len (512 MiB) by closing the connection
        if max_message_bytes > 512 * 1024 * 1024:
            raise ConfigurationError("max_message_bytes must be at most 512 MiB (Redis's limit)")
        self.max_message_bytes = max_message_bytes
        self.max_held_bytes = max_held_bytes
        self._client = client
        self._owns_client = False
        # our own client on the caller's pool, without redis-py's reply parsing for
        # XREADGROUP: we read the flat field lists directly (a third of the consume cost)
        self._reader = aioredis.Redis(connection_pool=client.connection_pool)
        self._reader.set_response_callback("XREADGROUP", _raw_reply)
        self.key_prefix = key_prefix
        self.claim_idle = claim_idle
        self.claim_interval = claim_interval if claim_interval is not None else claim_idle / 4
        self.trim_interval = trim_interval
        # consumers of crashed processes, once they hold nothing, are removed after this
        self.forget_after = max(60.0, 10 * claim_idle)
        # a blocking read must end before the client's socket timeout fires
        socket_timeout = kwargs.get("socket_timeout") or 5.0
        self._max_block = min(max_block, socket_timeout / 2)
        self.features = TransportFeatures(
            durable=True,
            ordered_per_key=False,
            native_delay=True,
            replays_history=False,
            redelivery_timeout=self.claim_idle + self.claim_interval,
        )
        self._consumer_prefix = f"{socket.gethostname()}-{os.getpid()}"
        #: the consumers' "unreachable" lines, one per 10 s for them all while Redis is down
        self._outage_log = ThrottledLog(log)
        self._topics: set[str] = set()
        self._subs: set[RedisSubscription] = set()
        # give-backs of subscriptions closed while Redis did not answer, retried until it does
        self._give_backs: dict[_GiveBack, asyncio.Task[None]] = {}
        self._closed = False
        register = client.register_script
        self._declare_group = register(_lua.DECLARE_GROUP)
        self._settle = register(_lua.SETTLE)
        self._move_due = register(_lua.MOVE_DUE)
        self._reclaim = register(_lua.RECLAIM)
        self._read_script = register(_lua.READ)
        self._move_too_large = register(_lua.MOVE_TOO_LARGE)
        self._heartbeat_script = register(_lua.HEARTBEAT)
        self._forget_consumer = register(_lua.FORGET_CONSUMER)
        self._own_pending = register(_lua.OWN_PENDING)
        self._forget_idle = register(_lua.FORGET_IDLE_CONSUMERS)
        self._trim = register(_lua.TRIM)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisTransport:
        """``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` or ``unix://``;
        ``options`` go to the constructor. The query parameters ``max_message_bytes`` and
        ``max_held_bytes`` (ints) and ``namespace`` are the constructor's options of those
        names (a :class:`ConfigurationError` if also given as an option); the others go to
        redis-py (``socket_timeout``...). ConfigurationError, naming it, for a parameter
        redis-py does not take (``socket_timout``) and for a database path that is not a
        number (``/abc``)."""
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigurationError(f"not a redis:// URL: {redact_url(url)!r}")
        own_names = ("max_message_bytes", "max_held_bytes")
        url, own = pop_url_options(
            url,
            own_names,
            driver=("max_connections",),
            text=("namespace",),
        )
        for name, value in own.items():
            if options.get(name) is not None:
                raise ConfigurationError(f"{name} given both in the URL and as an option")
            options[name] = value
        client = redis_client(url, "the Redis transport", (*own_names, "namespace"))
        transport = cls(client, **options)
        transport._owns_client = True
        return transport

    def _stream_key(self, topic: str) -> str:
        return f"{self.key_prefix}:{topic}"

    async def publish(self, topic: str, messages: Sequence[TransportMessage]) -> None:
        """XADD each message to the topic's stream, all in one pipeline; returns once Redis
        has replied to every XADD.

        Outcomes are per message. A message :func:`~msdata.transport.check_message` refuses
        (a header, key or id no broker can carry) or over ``max_message_bytes`` is not sent; an XADD
        that Redis answers with an error of its own (not one of the server's state, such as
        ``OOM`` or ``READONLY``, which fails the whole batch) failed alone. Either way the
        others were written, and :class:`~msdata.errors.PublishError` names the failed ones
        in ``refused`` with the reason (``"MessageTooLarge: ..."``; the error's ``__cause__``
        is then a :class:`~msdata.errors.MessageTooLarge`). A lost connection or a
        server-state error raises ``PublishError`` naming none of them (but those refused for
        their size): the batch may be partly written."""
        if self._closed:
            raise TransportClosed("publish() on a closed transport")
        if topic not in self._topics:
            check_name("topic", topic)
            self._topics.add(topic)
        if not messages:
            return
        key = self._stream_key(topic)
        limit = self.max_message_bytes
        refused: dict[str, str] = {}
        too_large: MsdataError | None = None
        sent: list[TransportMessage] = []
        pipe = self._client.pipeline(transaction=False)
        command = pipe.execute_command
        held: dict[str, str] = {}  # key -> id of its refused message (the key's order)
        for m in messages:
            if held and isinstance(m.key, str) and m.key in held:
                refused[refused_id(m)] = (
                    f"HeldBack: held back, not sent: the earlier message {held[m.key]} of its "
                    "key was refused"
                )
                continue
            try:
                check_message(m)  # headers, key and id no broker can carry: refused alone
            except MsdataError as e:
                refused[refused_id(m)] = f"{type(e).__name__}: {e}"  # the id may be no str
                too_large = too_large or e
                if isinstance(m.key, str):
                    held.setdefault(m.key, refused_id(m))
                continue
            if m.key is None and not m.headers:
                # the common case: "id" and "body" (6 bytes) and their values
                size = 6 + len(m.id) + len(m.body)
                if size + 3 * len(m.id) > limit:  # an id that is not ASCII takes more bytes
                    size = 6 + len(m.id.encode()) + len(m.body)
                if size <= limit:
                    command("XADD", key, "*", "id", m.id, "body", m.body)
                    sent.append(m)
                    continue
            else:
                fields = _entry_fields(m, m.headers, None)
                size = _fields_size(fields)
                if size <= limit:
                    command("XADD", key, "*", *fields)
                    sent.append(m)
                    continue
            too_large = MessageTooLarge(
                f"message {m.id} is {size:,} bytes with its key and headers, over "
                f"max_message_bytes ({limit:,})"
            )
            refused[m.id] = f"MessageTooLarge: {too_large}"
            if m.key is not None:
                held.setdefault(m.key, m.id)
        if sent:
            with _redis_errors(
                f"publish of {len(messages)} to {topic!r} failed", PublishError, self.address
            ):
                results = await _execute(pipe, raise_on_error=False)
            for m, result in zip(sent, results, strict=True):
                if not isinstance(result, Exception):
                    continue
                text = str(result)
                if not isinstance(result, rex.ResponseError) or text.startswith(_SERVER_STATE):
                    raise PublishError(
                        f"publish of {len(messages)} to {topic!r} failed: "
                        f"{type(result).__name__}: {text}",
                        refused=refused,
                    ) from result
                refused[m.id] = f"{type(result).__name__}: {text}"
        if refused:
            first = next(iter(refused.values()))
            raise PublishError(
                f"publish to {topic!r}: {len(refused)} of {len(messages)} messages refused "
                f"(the others were confirmed); first: {first}",
                refused=refused,
            ) from too_large

    async def declare_group(self, topic: str, group: str) -> None:
        """``XGROUP CREATE ... MKSTREAM`` on the topic's stream (at ``0`` for its first
        group, so that group receives what was published before any group existed; at ``$``
        for later ones; at ``0`` for every group of a dead-letter topic) and on the group's
        retry stream; an existing group is left as it is."""
        check_name("topic", topic)
        check_name("group", group)
        if self._closed:
            raise TransportClosed("declare_group() on a closed transport")
        with _redis_errors(f"could not declare group {group!r} of {topic!r}", address=self.address):
            await self._declare(topic, group)

    async def _declare(self, topic: str, group: str) -> None:
        stream = self._stream_key(topic)
        pipe = self._client.pipeline(transaction=False)
        # a dead-letter topic is read from its beginning by every group
        start = "all" if is_dead_letter_topic(topic) else "first"
        await self._declare_group(keys=[stream], args=[group, start], client=pipe)
        await self._declare_group(
            keys=[f"{stream}:{group}:retry"], args=[group, "all"], client=pipe
        )
        await _execute(pipe)

    def subscribe(
        self, topic: str, group: str, *, max_attempts: int = 5, prefetch: int = 100
    ) -> RedisSubscription:
        check_name("topic", topic)
        check_name("group", group)
        if max_attempts < 1 or prefetch < 1:
            raise ConfigurationError("max_attempts and prefetch must be >= 1")
        if self._closed:
            raise TransportClosed("subscribe() on a closed transport")
        return RedisSubscription(self, topic, group, max_attempts, prefetch)

    async def trim(self, topic: str, *, exact: bool = False) -> int:
        """Remove the entries of ``topic`` every group has received and acked; returns how
        many. Approximate (whole stream nodes) unless ``exact``."""
        check_name("topic", topic)
        with _redis_errors(f"trim of {topic!r}", address=self.address):
            return int(
                await self._trim(keys=[self._stream_key(topic)], args=["=" if exact else "~"])
            )

    async def close(self) -> None:
        """Close open subscriptions (releasing what they hold) and a client made by
        :meth:`from_url`."""
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            await sub.close()
        retries = list(self._give_backs.values())
        for task in retries:
            task.cancel()
        await asyncio.gather(*retries, return_exceptions=True)
        if self._owns_client:
            await self._client.aclose()

    def _give_back_later(self, job: _GiveBack) -> bool:
        """Go on with the give-back of a subscription whose close could not reach Redis, in
        a task of the transport's, until Redis answers or the transport closes. False (and
        nothing done) once the transport is closing."""
        if self._closed:
            return False
        self._give_backs[job] = asyncio.get_running_loop().create_task(self._retry(job))
        return True

    async def _retry(self, job: _GiveBack) -> None:
        sub = job.sub
        delay, cap = 0.05, min(1.0, self.claim_interval)
        try:
            while True:
                await asyncio.sleep(delay)
                try:
                    await sub._run_give_back(job)
                except _TRANSIENT:
                    delay = min(2 * delay, cap)
                    continue
                except rex.RedisError as e:
                    log.warning(
                        "giving back what consumer %s of %s/%s held failed: %s; it is "
                        "reclaimed, counted, after %.1fs",
                        sub.consumer,
                        sub.topic,
                        sub.group,
                        e,
                        self.claim_idle,
                    )
                    return
                log.info(
                    "consumer %s of %s/%s closed while Redis did not answer: what it held is "
                    "given back",
                    sub.consumer,
                    sub.topic,
                    sub.group,
                )
                return
        except asyncio.CancelledError:
            if not job.sent:
                log.warning(
                    "transport closed before Redis answered: the %d deliveries consumer %s "
                    "of %s/%s held are reclaimed, counted, after %.1fs",
                    len(job.items),
                    sub.consumer,
                    sub.topic,
                    sub.group,
                    self.claim_idle,
                )
            raise
        finally:
            self._give_backs.pop(job, None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def lag(self, topic: str, group: str) -> int | None:
        """``XINFO GROUPS`` on the topic's stream and the group's retry stream: the group's
        ``lag`` (entries not delivered yet) plus ``pending`` (delivered, not acked) on each,
        plus the retries waiting out a delay (``ZCARD`` of the delayed set). None if the
        group does not exist on the topic's stream, or if Redis cannot compute its ``lag``
        (after entries were deleted from the middle of the stream). See
        :meth:`msdata.transport.Transport.lag`."""
        check_name("topic", topic)
        check_name("group", group)
        stream = self._stream_key(topic)
        pipe = self._client.pipeline(transaction=False)
        pipe.xinfo_groups(stream)
        pipe.xinfo_groups(f"{stream}:{group}:retry")
        pipe.zcard(f"{stream}:{group}:delayed")
        with _redis_errors(
            f"could not read the lag of group {group!r} of {topic!r}", address=self.address
        ):
            main, retry, delayed = await pipe.execute(raise_on_error=False)
        wanted = group.encode()
        total = 0
        for i, groups in enumerate((main, retry)):
            if isinstance(groups, rex.ResponseError):  # no such stream
                if i == 0:
                    return None
                continue
            if isinstance(groups, BaseException):
                raise TransportError(f"could not read the lag of group {group!r}: {groups}")
            info = next((g for g in groups if g["name"] == wanted), None)
            if info is None:
                if i == 0:
                    return None
                continue
            if info["lag"] is None:
                return None
            total += int(info["lag"]) + int(info["pending"])
        if isinstance(delayed, BaseException):
            raise TransportError(f"could not read the lag of group {group!r}: {delayed}")
        return total + int(delayed)
