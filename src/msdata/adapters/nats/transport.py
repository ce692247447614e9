"""The NATS JetStream transport: a stream per topic, a durable pull consumer per group.

Mapping
    - A topic is one stream with file storage and limits retention, named
      ``stream_prefix + escaped(topic)`` (see :func:`stream_name`; stream names cannot hold
      ``.``, so ``.`` becomes ``-``, ``-`` becomes ``_-`` and ``_`` becomes ``__``, which
      :func:`topic_of_stream` reverses; names too long for the server end in ``_h`` and a
      hash, and the stream's description holds the topic). The stream captures the
      subject ``subject_prefix + topic`` and its key partitions ``<subject>._k.0`` to
      ``._k.<key_partitions - 1>`` (see below): anything published there, by msdata or not,
      is delivered; a JetStream publish to any other ``<subject>._k.*`` is refused (no
      stream captures it), so the stream holds nothing that no group reads. (Streams
      declared by an earlier msdata with ``<subject>._k.*`` are narrowed to that list.)
    - A group is a durable pull consumer on that stream (explicit ack), named
      :func:`consumer_name` of the group. A subscription keeps a pull request open on it
      (see :class:`NatsSubscription`); consumers of one group compete, each group gets each
      message published after it was declared. The stream keeps what it holds until its
      limits (``max_age``, ``max_bytes``) drop it; where a new group starts in it:

      - the topic's first group (no consumer of msdata's on the stream yet), any group of a
        dead-letter topic, and every group of a transport built with
        ``replays_history=True``: at the beginning (``deliver_policy=all``), so what was
        published while the topic had no group reaches the first group, and every reader
        of a dead-letter topic reads all of it;
      - any other group: after the stream's last message when it is declared
        (``deliver_policy=by_start_sequence``, its ``last_seq + 1``, read before the
        consumer is created), as on the other transports. The consumers of an ordered
        group start at one sequence; a consumer of a group that has others (declared in
        part) starts where they do; one the server lost is declared again from the
        beginning (at least once).

Publishing
    Each message goes out with ``Nats-Msg-Id`` set to its id, so JetStream drops a second
    publish of the same id inside ``duplicate_window`` (a relay that publishes a batch again
    after a crash does not duplicate it). A replay (``x-msdata-replay`` set, by
    :func:`msdata.service.read_dead_letters`) goes out with a ``Nats-Msg-Id`` of its own
    (:func:`nats_msg_id`: the id and the replay's token) and the id in ``x-msdata-id``,
    which a consumer reads as the message id: a message replayed inside the window is not
    dropped as a copy of its first publish (nor its dead-letter copy, which keeps the
    header, as a copy of its first dead-lettering). The whole batch is sent at once, every
    message asking JetStream to acknowledge it on a reply subject of its own under the
    batch's, and
    ``publish`` counts the acknowledgements: it returns when every message is confirmed by
    the stream; if the stream refused some (its ``max_msg_size``...), it raises
    :class:`PublishError` whose ``refused`` names exactly those, the others confirmed; after
    ``publish_timeout`` it raises one for the whole batch. A message that fails
    :func:`msdata.transport.check_message`, or whose :func:`wire_size` is over the server's
    ``max_payload`` (or ``max_message_bytes``) less
    :data:`msdata.deadletter.DEAD_LETTER_RESERVE` (2 KiB, kept so that its dead-letter copy
    with the ``x-msdata-*`` headers still fits), is refused before sending, alone (sent
    over ``max_payload``, it would make the server close the connection). (nats-py's
    ``publish_async`` does the same with a future, a semaphore and a parsed ``PubAck`` per
    message, at twice the CPU time per message.) The key travels
    in the ``x-msdata-key`` header, the transport headers as NATS headers (nats-py strips
    their values' outer whitespace; a dead-letter reason is folded onto one line).

Settling
    ``ack`` is an (unconfirmed) ``+ACK``; one lost on the way (a connection that dropped or
    went silent) makes JetStream deliver the message again, and a subscription that acked it
    (its latest 10,000 acks) acks that redelivery again instead of handing it out.
    ``nack(delay)`` is ``-NAK`` with the delay (JetStream redelivers it no sooner, so
    ``native_delay=True``; on an ordered group's key partition the subscription holds the
    delivery for the delay and then sends the 1 ms ``-NAK``, since nats-server 2.9
    sometimes loses the redelivery of a delayed one there, and its close nacks at once what
    still waits), and ``attempt`` is JetStream's ``num_delivered`` less the deliveries
    given back and, on a key partition, those the server counted and never sent (see
    "Release records").
    ``max_attempts`` is enforced here, not by the consumer's ``max_deliver`` (which is left
    unlimited): at ``max_deliver`` JetStream only stops delivering and leaves the message
    parked, where no one sees it. Instead, the ``max_attempts``-th ``nack`` publishes the
    message to :func:`msdata.transport.dead_letter_topic` with the reason headers (confirmed,
    ``Nats-Msg-Id`` de-duplicated) and then terminates it (``+TERM``). A foreign message whose
    copy would not fit ``max_payload`` goes with its reason cut (then without its own
    headers) to fit (:func:`msdata.deadletter.fit`); one that cannot fit even so, or whose
    dead-letter publish the server refuses, is terminated with an ERROR line and counted in
    :attr:`NatsTransport.undeliverable`, never offered again in a loop; a delivery that comes
    back beyond ``max_attempts`` because its consumers kept dying is dead-lettered by
    ``receive`` without being handed out (if its copy is not confirmed within that
    receive's time, it stays in the subscription's buffer, uncounted, for the next).
    Deliveries handed out and still unsettled when a
    subscription closes are nacked at once (counted; settling one afterwards raises
    :class:`TransportClosed`), those it received and never handed out are given back
    uncounted. A ``receive()`` in progress as the close begins returns an empty list: what
    it took (even while it read release records) is given back uncounted with the rest;
    a ``receive()`` cancelled at any moment hands out nothing and puts what it took back
    in the subscription, in order, for the next ``receive()`` or the close. Deliveries of a
    consumer that died come back after ``ack_wait`` (declared as
    ``redelivery_timeout``). A live subscription sends JetStream's in-progress
    acknowledgement (``+WPI``) every ``ack_wait / 3`` seconds for what it holds, so slow
    work is not redelivered under a consumer that is still alive.

Release records: a delivery given back is not an attempt
    ``release()``, and a closing subscription for what it received and never handed out,
    give deliveries back uncounted, as :class:`msdata.transport.Delivery` requires. JetStream
    counts every delivery and ``num_delivered`` cannot be lowered, so msdata keeps a record
    of its own: before the ``-NAK``, a release record (``b"<attempt> <num_delivered>
    <consumer sequence>"``, the attempt given back, JetStream's count then and the consumer
    sequence of that delivery; a record of an earlier msdata has no third number) is
    published on
    ``$MSDATA.R.<records>.<consumer>.<stream sequence>`` of the stream ``<records>`` =
    the topic's stream name + ``_r`` (created on the first release; one record per subject;
    the topic's ``max_age``) and confirmed. A redelivery (``num_delivered`` > 1; a first
    delivery costs nothing more) reads its record (``STREAM.MSG.GET`` by subject, the
    redeliveries of a batch at once) and counts ``attempt = recorded attempt +
    num_delivered - recorded num_delivered - 1``: the deliveries since the release count (a
    consumer that died on it), the release itself does not. No read is needed when it comes
    straight back to the subscription that nacked or released it (``num_delivered`` one
    higher than then: no delivery, so no release, in between): that subscription knows
    its attempt, so a retry loop on one consumer reads nothing. A record whose
    ``num_delivered`` is not below the delivery's is older than the consumer and ignored; one
    that is not well-formed or out of range is ignored.
    Key partitions (ordered mode): nats-server 2.9 sometimes counts the redelivery after a
    ``-NAK`` and never sends it (a pull request ending as the redelivery is made); the
    message comes back only after ``ack_wait``, its ``num_delivered`` one higher than the
    deliveries anyone had. Such a consumer (``max_ack_pending=1``) sends nothing else
    while the message is unsettled, so its consumer sequence (in the ack subject) goes up
    by one per delivery really sent: there the deliveries since the record are counted by
    the consumer sequence, and the subscription that gave it back knows its attempt when
    the consumer sequence is one higher than then. A counted ``nack`` on a key partition
    (and a close's nack of what it handed out there) leaves a record too (the attempt
    given back being one more than its own), so that another subscription counts it the
    same way. Settled for good (``+ACK``,
    ``+TERM``), a delivery deletes its record (a subject purge, not waited for: a leftover
    is never read again).
    Crash safety: killed before the record is confirmed, the delivery comes back after
    ``ack_wait`` counted (as from any consumer that died); after it and before the
    ``-NAK``, with the recorded attempt. A record that cannot be written (logged) leaves the
    release counted; a redelivery whose record cannot be read stays in the subscription's
    buffer (kept alive by ``+WPI``) until a later ``receive`` reads it. Nothing is acked or
    dropped on the way, so no message is lost; in ordered mode a released message is the
    one its partition redelivers first, so order per key holds.

Order per key: opt-in, ``NatsTransport(ordered=True)`` (then ``ordered_per_key=True``)
    JetStream orders a stream, not a key: two consumers of one group pull interleaved
    batches, and a nacked message is redelivered after later messages of its key were handed
    out. So by default (``ordered=False``) order per key is not kept. A keyed message is always
    published to ``<subject>._k.<crc32(key) % key_partitions>`` (a message without a key, and
    anything a foreign producer sends, to ``<subject>``), and the stream captures both. An
    ordered group is one durable consumer per key partition with ``max_ack_pending=1`` (at
    most one message of a partition in flight in the whole group; a nacked one is offered
    again before the later ones, since JetStream redelivers first) plus one ordinary consumer
    for keyless messages; an ordered subscription keeps a pull request open on each. The
    price: per group, at most ``key_partitions`` keyed messages in flight, a message waiting
    out a nack delay holds back its whole partition, and the keys sharing a partition are
    serialised together. A subscription whose ``prefetch`` leaves fewer credits than its
    consumers without a pull request gives them turns: the key partitions one after the
    other, from the one after the last pulled, and the keyless consumer every other turn
    when one credit is left, each request then living 0.1 s, so that a partition with
    nothing waiting passes its turn on soon (with ``prefetch=1`` and 16 partitions a message
    waits at most about 3 s for its turn). ``key_partitions`` (default 16) is fixed when the
    topic's stream is created (it is recorded in the stream's description and checked),
    and a group is either ordered or not, for good: its consumers are different ones. The
    dead-letter reader (group :data:`msdata.transport.DEAD_LETTER_READER` of a dead-letter
    topic) is one unordered consumer in either mode, so every reader of the dead letters
    opens the same one; any other group of a dead-letter topic follows the transport's mode
    (ordered, it holds at most one unsettled letter per key partition).

Foreign messages
    A message without msdata's headers gets the id ``<stream>:<sequence>`` (stable across
    redeliveries) and no key; its body is handed out untouched, to be decoded, or
    dead-lettered with the reason, above the transport.

Messages nats-py cannot read
    See :class:`_ReaderGuard`: a message whose subject or header status line is not UTF-8
    would end nats-py's reader task; it is handed on with those bytes escaped instead,
    counted in :attr:`NatsTransport.unreadable_messages` and logged.

Connection
    nats-py reconnects by itself (:meth:`NatsTransport.from_url` sets unlimited reconnect
    attempts; pass your own client configured likewise). A server that is down or silent
    (it accepts the connection and never answers), whether from the start or later, makes
    ``publish`` raise :class:`PublishError` after ``publish_timeout``, and entering a
    subscription, ``declare_group``, ``lag`` and ``delete_topic`` raise
    :class:`TransportError` after ``connect_timeout`` (JetStream API requests wait that long
    at most), each naming the address without credentials. A :meth:`from_url`
    transport logs the client's connection errors, disconnects and reconnects as one
    WARNING line each on ``msdata.adapters.nats`` (at most one per kind every 10 s), instead
    of nats-py's traceback per attempt; with your own client, pass your own ``error_cb``.
    Durable consumers live on the server, so a subscription's next ``receive`` after a
    reconnect or a server restart pulls again; ``receive`` returns an empty list while the
    connection is down, and, when idle, checks every ``consumer_check_interval`` seconds
    that the consumer still exists and declares the stream and consumer again if the server
    lost them. ``receive`` returns within its timeout plus :data:`RECEIVE_MARGIN` (0.2 s)
    whatever the server does: the check runs in a task of its own that no ``receive``
    waits for, the declaration in one that each ``receive`` waits for only within its own
    time (within ``connect_timeout`` in all), and release-record reads and an overdue
    delivery's dead-letter publish end with the receive's time, leaving what they did not
    finish in the buffer, uncounted, for the next ``receive``. Closing a subscription
    against a silent server takes a few seconds: its pull requests' end (about 1 s), its
    release-record reads and writes (``publish_timeout``, at most 5 s, each) and a final
    flush (2 s).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import MappingProxyType
from typing import Any, Self
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from msdata import deadletter
from msdata.errors import (
    ConfigurationError,
    MsdataError,
    PublishError,
    TransportClosed,
    TransportError,
)
from msdata.messages import safe_text
from msdata.transport import (
    DEAD_LETTER_READER,
    DEFAULT_MAX_HELD_BYTES,
    REPLAY_HEADER,
    ClosesOnExit,
    DeliveryState,
    DriverErrors,
    ThrottledLog,
    TransportFeatures,
    TransportMessage,
    check_name,
    is_dead_letter_topic,
    pop_url_options,
    refused_error,
    screen,
)
from msdata.urls import redact_url

__all__ = [
    "ID_HEADER",
    "KEY_HEADER",
    "MSG_ID_HEADER",
    "RECEIVE_MARGIN",
    "NatsDelivery",
    "NatsSubscription",
    "NatsTransport",
    "consumer_name",
    "nats_msg_id",
    "stream_name",
    "topic_of_stream",
]

#: JetStream de-duplicates publishes by this header, inside the stream's duplicate window
MSG_ID_HEADER = "Nats-Msg-Id"
#: the partition key travels in this header
KEY_HEADER = "x-msdata-key"
#: the message id travels in this header when ``Nats-Msg-Id`` is not the message id (a
#: replay, and its dead-letter copy: see :func:`nats_msg_id`)
ID_HEADER = "x-msdata-id"
_RESERVED = frozenset({MSG_ID_HEADER, KEY_HEADER, ID_HEADER})

# Always the delayed form, 1 ms: nats-server 2.9 sometimes never redelivers a plain -NAK on
# a consumer with max_ack_pending=1 (an ordered key partition) until ack_wait; measured here:
# 7 of 80 runs stuck with a plain -NAK, 0 of 80 with a 1 ms delay.
_NAK = b'-NAK {"delay": 1000000}'
_TERM = b"+TERM"
_WPI = b"+WPI"
_ACK_PREFIX = "$JS.ACK."
_NO_HEADERS: MappingProxyType[str, str] = MappingProxyType({})

# Stream and consumer names become file names on the server: keep them well under 255.
_NAME_MAX = 150
_HASH_LEN = 20
_PREFIX = re.compile(r"^[A-Za-z0-9_\-]{0,40}\Z")
_SUBJECT_PREFIX = re.compile(r"^([A-Za-z0-9_\-]+\.)*\Z")
# JetStream API error codes: stream / consumer name already in use
_STREAM_EXISTS = 10058
_CONSUMER_EXISTS = {10013, 10148}
# keyed messages go to ``<subject>._k.<crc32(key) % key_partitions>``
_PARTITION_TOKEN = "_k"
_PARTITIONS = re.compile(r"key partitions (\d+)$")
# longest a pull request lives on the server, in seconds: a subscription waiting longer
# opens another (the server ends it on time, with a 408 status)
_PULL_EXPIRES = 0.5
# how long past its expiry a request still counts as open here: its 408 may come late, or
# never (lost with a connection, or a server gone silent). So close() waits up to
# _PULL_EXPIRES + _PULL_GRACE (1 s) for its open requests to end when no 408 comes, and a
# request lost with a connection is replaced that long after it was made
_PULL_GRACE = 0.5
# how long a pull request lives while requests take turns (fewer credits than consumers)
_TURN_EXPIRES = 0.1
# after a request was refused (a 409 status), wait this long before asking that consumer again
_PULL_BACKOFF = 0.5
# the description of the 409 status ending a pull request whose next message is larger than
# the request's max_bytes (nats-server 2.9)
_TOO_BIG = "Message Size Exceeds MaxBytes"
# a connection event of one kind is logged at most once per this many seconds
_LOG_EVERY = 10.0

log = logging.getLogger("msdata.adapters.nats")

# how many nacked stream sequences a subscription remembers the attempt of
_NACKS_REMEMBERED = 10_000

# Release records (see NatsSubscription): a topic's are kept in the stream named like the
# topic's with this suffix ("_r" never ends an escaped name), on subjects
# ``$MSDATA.R.<that stream>.<consumer>.<stream sequence>``, one record per subject
_RECORDS_SUFFIX = "_r"
_RECORD_SUBJECT = "$MSDATA.R."
# longest a record is written or read for, in seconds (at most publish_timeout)
_RECORD_TIMEOUT = 5.0
# JetStream API error codes: no message found, stream not found
_NO_MESSAGE = 10037
_NO_STREAM = 10059
# after no redelivery's record could be read, wait this long before receive() returns
_UNREAD_PAUSE = 0.1
#: seconds a ``receive(timeout=...)`` may take beyond its timeout, whatever the server does:
#: the wait for messages ends at the timeout, and what follows it (reading release records,
#: dead-lettering an overdue delivery) ends within this margin; what does not is left for
#: the next ``receive`` (see :meth:`NatsSubscription.receive`)
RECEIVE_MARGIN = 0.2
# the largest attempt a record may hold (only msdata's own bookkeeping counts, range-checked)
_MAX_RECORDED = 1_000_000


def _nats_errors(what: str, error: type[TransportError] = TransportError) -> DriverErrors:
    """Where nats-py's errors (and the socket's) become msdata's: ``with _nats_errors("what"):``."""
    return DriverErrors((nats.errors.Error, OSError), what, error)


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


# "NATS/1.0\r\n" before the header lines, "\r\n" after them
_HEADER_BLOCK = 12
_MSG_ID_LINE = len(MSG_ID_HEADER) + 4  # "Nats-Msg-Id: " and "\r\n", without the value
_KEY_LINE = len(KEY_HEADER) + 4
_ID_LINE = len(ID_HEADER) + 4


def nats_msg_id(message: TransportMessage) -> str:
    """The ``Nats-Msg-Id`` that ``message`` is published with, which JetStream
    de-duplicates by inside the stream's duplicate window: the message id, or for a replay
    (:data:`msdata.transport.REPLAY_HEADER` set) ``<id>~replay~<token>``. So a replay is
    not dropped as a duplicate of the message's first publish, nor the dead-letter copy of
    a replayed message (it keeps the header) as one of its first dead-lettering, while the
    same publish sent twice (a relay's batch again after a crash, a delivery dead-lettered
    again after its ``+TERM`` was lost) still is. When it is not the message id, the id
    travels in the ``x-msdata-id`` header (:data:`ID_HEADER`) and consumers read it from
    there."""
    headers = message.headers
    if headers:
        token = headers.get(REPLAY_HEADER)
        if token:
            return f"{message.id}~replay~{token}"
    return message.id


def wire_size(message: TransportMessage) -> int:
    """The bytes ``message`` takes on the NATS wire as this transport sends it: the body
    and the header block (``NATS/1.0``, its headers, ``Nats-Msg-Id``, ``x-msdata-key`` and
    ``x-msdata-id``, see :func:`nats_msg_id`): what the server holds against its
    ``max_payload`` (an upper bound: nats-py trims the values' outer whitespace)."""
    mid = message.id
    dedup = nats_msg_id(message)
    n = len(message.body) + _HEADER_BLOCK + _MSG_ID_LINE + _utf8_len(dedup)
    if dedup != mid:
        n += _ID_LINE + _utf8_len(mid)
    if message.key is not None:
        n += _KEY_LINE + _utf8_len(message.key)
    headers = message.headers
    if headers:
        for name, value in headers.items():
            n += len(name) + _utf8_len(value) + 4
    return n


def _held_size(msg: Msg) -> int:
    """What a received message takes, about as the server counts it against a pull
    request's ``max_bytes``: subject, reply subject, headers and data."""
    n = len(msg.data) + len(msg.subject) + len(msg.reply)
    headers = msg.headers
    if headers:
        n += _HEADER_BLOCK
        for name, value in headers.items():
            n += len(name) + len(value) + 4
    return n


def _readable(raw: bytes) -> bytes:
    """``raw`` if it is UTF-8, else with each byte that is not as a ``\\xNN`` escape."""
    try:
        raw.decode()
        return raw
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace").encode()


class _ReaderGuard:
    """Keeps nats-py's reader alive through a message it cannot parse.

    nats-py decodes a message's subject and its header status line as UTF-8 in its reader
    task (``Client._process_msg``); bytes that are not UTF-8 there (a foreign producer's)
    raise, and the reader task ends: the connection stays open but reads nothing more, so
    no later delivery, pull status or publish acknowledgement arrives. The guard wraps
    ``_process_msg`` of the client: a message it fails on is processed again with its
    subject, reply subject and header block made readable (each byte that is not UTF-8 as a
    ``\\xNN`` escape), so it reaches its subscription like any foreign message (a
    consumer dead-letters it with its reason); one that still fails is skipped. Each is
    counted (:attr:`repaired`, :attr:`skipped`) and logged at WARNING on
    ``msdata.adapters.nats`` (at most one line per kind every 10 s)."""

    def __init__(self, nc: Client) -> None:
        self._process: Callable[..., Awaitable[None]] = nc._process_msg
        #: messages handed on with their bad bytes escaped
        self.repaired = 0
        #: messages dropped because even that failed (a JetStream delivery among them comes
        #: back after ``ack_wait``)
        self.skipped = 0
        self._log = _ConnectionLog("reader")

    async def process(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        try:
            await self._process(sid, subject, reply, data, headers)
            return
        except Exception as e:  # anything raised here would end the client's reader
            error: Exception = e
        readable = (_readable(subject), _readable(reply), headers and _readable(headers))
        if readable != (subject, reply, headers):
            try:
                await self._process(sid, readable[0], readable[1], data, readable[2])
            except Exception as e:
                error = e
            else:
                self.repaired += 1
                self._log._log(
                    "repaired",
                    f"a message on {readable[0].decode()!r} that nats-py could not read "
                    f"({type(error).__name__}) was handed on with its bad bytes escaped "
                    f"({self.repaired} so far)",
                )
                return
        self.skipped += 1
        shown = _readable(subject).decode()
        self._log._log(
            "skipped",
            f"skipped a message on {shown!r} that nats-py could not read: "
            f"{type(error).__name__}: {error} ({self.skipped} so far)",
        )


def _guard(nc: Client) -> _ReaderGuard | None:
    """The client's :class:`_ReaderGuard`, installed on first use (None if this nats-py
    has no ``_process_msg`` to wrap)."""
    guard: _ReaderGuard | None = getattr(nc, "_msdata_reader_guard", None)
    if guard is None and callable(getattr(nc, "_process_msg", None)):
        guard = _ReaderGuard(nc)
        nc._process_msg = guard.process  # type: ignore[method-assign]
        nc._msdata_reader_guard = guard  # type: ignore[attr-defined]
    return guard


def _redacted(server: str) -> str:
    """``scheme://host:port`` of a server URL, without user, password or token."""
    try:
        parts = urlsplit(server if "://" in server else f"nats://{server}")
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname or ''}{port}"
    except ValueError:
        return "nats://<unparsable address>"


class _ConnectionLog:
    """nats-py's connection callbacks, logged as one WARNING line each instead of its
    default traceback per failed attempt (twice a second while a server is down), at most
    once per ``_LOG_EVERY`` seconds per kind, with how many were left out in between."""

    def __init__(self, address: str, closing: Callable[[], bool] = lambda: False) -> None:
        self.address = address
        #: true once the transport is being closed: the disconnect is ours, not news
        self.closing = closing
        self._throttled = ThrottledLog(log, _LOG_EVERY)
        #: the last connection error, as text (what a failed first connect names)
        self.last_error: str | None = None

    def _log(self, kind: str, text: str) -> None:
        self._throttled.warning(kind, "NATS %s: %s", self.address, text)

    async def error(self, e: Exception) -> None:
        self.last_error = f"{type(e).__name__}: {e}".rstrip(": ")
        self._log("error", self.last_error)

    async def disconnected(self) -> None:
        if not self.closing():
            self._log("disconnected", "disconnected; reconnecting")

    async def reconnected(self) -> None:
        self._log("reconnected", "reconnected")


def _escape(name: str) -> str:
    return name.replace("_", "__").replace("-", "_-").replace(".", "-")


def _fit(prefix: str, name: str) -> str:
    escaped = _escape(name)
    if len(prefix) + len(escaped) <= _NAME_MAX:
        return prefix + escaped
    room = _NAME_MAX - len(prefix) - 2 - _HASH_LEN
    # cut between escape pairs, so the ``_h`` marker cannot be read as part of one
    i = 0
    while i < room:
        step = 2 if escaped[i] == "_" else 1
        if i + step > room:
            break
        i += step
    digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_LEN]
    return f"{prefix}{escaped[:i]}_h{digest}"


def stream_name(topic: str, prefix: str = "MSDATA_") -> str:
    """The JetStream stream that holds ``topic``."""
    return _fit(prefix, topic)


def consumer_name(group: str) -> str:
    """The durable consumer name of consumer group ``group``."""
    return _fit("", group)


def topic_of_stream(stream: str, prefix: str = "MSDATA_") -> str | None:
    """The topic a stream of :func:`stream_name` holds; None if it is not one, or if its name
    was shortened with a hash (then the stream's description holds the topic)."""
    if not stream.startswith(prefix):
        return None
    out: list[str] = []
    chars = iter(stream[len(prefix) :])
    for c in chars:
        if c == "_":
            nxt = next(chars, "")
            if nxt == "_":
                out.append("_")
            elif nxt == "-":
                out.append("-")
            else:
                return None
        elif c == "-":
            out.append(".")
        else:
            out.append(c)
    return "".join(out) or None


class NatsDelivery(DeliveryState["NatsSubscription"]):
    """A delivery from :class:`NatsTransport`; see :class:`msdata.transport.Delivery`."""

    __slots__ = ("_msg", "_recorded", "_seq", "_size")

    def __init__(
        self,
        sub: NatsSubscription,
        msg: Msg,
        message: TransportMessage,
        attempt: int,
        seq: int,
        size: int = 0,
    ) -> None:
        super().__init__(sub, message, attempt)
        self._msg = msg
        self._seq = seq
        self._size = size
        # a release record of this message exists: it is deleted once settled for good
        self._recorded = False

    def _settle(self) -> bool:
        if not self._begin_settle():
            return False
        sub = self._sub
        sub._inflight.discard(self)
        sub._held_bytes -= self._size
        sub._floor.pop(self._seq, None)
        return True

    async def _reply(self, payload: bytes) -> None:
        with _nats_errors("could not settle the delivery"):
            await self._sub._nc.publish(self._msg.reply, payload)  # type: ignore[union-attr]

    async def _done(self, payload: bytes) -> None:
        """Settle for good (``+ACK``, ``+TERM``), then forget its release record, if any."""
        await self._reply(payload)
        if self._recorded:
            await self._forget()

    async def _forget(self) -> None:
        self._recorded = False
        sub = self._sub
        fields = _ack_fields(self._msg.reply)
        if fields is not None:
            consumer, _, seq = fields
            await sub._transport._delete_record(
                sub._records, f"{sub._record_prefix}{consumer}.{seq}"
            )

    async def ack(self) -> None:
        if self._settle():
            acked = self._sub._acked
            fields = _ack_fields(self._msg.reply)
            acked[self._seq] = (_dedup_id(self._msg), fields[1] if fields is not None else 0)
            if len(acked) > _NACKS_REMEMBERED:
                acked.popitem(last=False)
            await self._reply(b"")
            if self._recorded:
                await self._forget()

    async def nack(self, delay: float = 0.0, reason: str | None = None) -> None:
        if not self._settle():
            return
        if deadletter.exhausted(self.attempt, self._sub.max_attempts):
            await self._dead_letter(deadletter.failed_reason(self.attempt, reason))
        else:
            fields = _ack_fields(self._msg.reply)
            sub = self._sub
            if fields is not None and sub._one_at_a_time(fields[0]):
                # a key partition: recorded as a release counted once (see
                # NatsSubscription._nack_recorded), then nacked
                task = asyncio.get_running_loop().create_task(
                    sub._nack_recorded(self, self.attempt + 1, delay)
                )
                sub._releasing.add(task)
                task.add_done_callback(sub._release_done)
                await asyncio.shield(task)
                return
            delivered = fields[1] if fields is not None else 0
            sub._remember(self._seq, self.attempt + 1, delivered, self._recorded)
            if delay > 0:
                await self._reply(b'-NAK {"delay": %d}' % int(delay * 1e9))
            else:
                await self._reply(_NAK)

    async def dead_letter(self, reason: str) -> None:
        if self._settle():
            await self._dead_letter(reason)

    async def release(self) -> None:
        """Give the delivery back uncounted. JetStream counts every delivery: a release
        record (see :class:`NatsSubscription`) makes the next one count as this attempt
        again. Cancelling the caller cancels only its wait: the record and the ``-NAK`` go
        on in a task of their own, which the subscription's close waits for (a record cut
        short would leave the delivery neither recorded nor nacked, to come back counted
        after ``ack_wait``)."""
        if not self._settle():
            return
        sub = self._sub
        task = asyncio.get_running_loop().create_task(
            sub._give_back([(self._msg.reply, self.attempt)])
        )
        sub._releasing.add(task)
        task.add_done_callback(sub._release_done)
        await asyncio.shield(task)

    async def _dead_letter(
        self,
        reason: str,
        attempts: int | None = None,
        *,
        timeout: float | None = None,
        keep: bool = False,
    ) -> None:
        """Publish the dead-letter copy (within ``timeout`` seconds, if given, and
        ``publish_timeout``), then ``+TERM``. If the publish fails as a whole, the delivery
        is nacked (it comes back) and the error raised; with ``keep``, it is left as it is,
        for the caller to keep."""
        sub = self._sub
        transport = sub._transport
        whole = deadletter.dead_letter(
            self.message, sub.topic, sub.group, attempts or self.attempt, reason
        )
        nc = transport._nc
        # a foreign message that fitted max_payload may not with the x-msdata-* headers
        letter = whole if nc is None else deadletter.fit(whole, nc.max_payload, wire_size)
        if letter is None:
            await self._drop(reason, "its dead-letter copy cannot fit the server's max_payload")
            return
        try:
            await transport._publish(
                letter.topic, [letter.message], dead_letters=True, timeout=timeout
            )
        except PublishError as e:
            if not e.refused:
                if not keep:
                    await self._reply(_NAK)  # not moved: let JetStream offer it again
                raise
            # refused for itself (the dead-letter stream's limits): offering it again would
            # only loop; it is dropped, loudly
            await self._drop(reason, f"the dead-letter publish was refused: {e}")
            return
        except BaseException:
            # not moved: let JetStream offer it again rather than lose it
            if not keep:
                await self._reply(_NAK)
            raise
        await self._done(_TERM)
        letter.log()

    async def _drop(self, reason: str, why: str) -> None:
        """Terminate a delivery that cannot be dead-lettered, with an ERROR line and a
        count (:attr:`NatsTransport.undeliverable`): never redelivered forever."""
        sub = self._sub
        await self._done(_TERM)
        sub._transport.undeliverable += 1
        log.error(
            "message %s of %s/%s (%d bytes) was to be dead-lettered (%s) but %s: terminated "
            "and dropped (%d so far)",
            safe_text(self.message.id, 200),
            sub.topic,
            sub.group,
            len(self.message.body),
            safe_text(reason, 300),
            safe_text(why, 500),
            sub._transport.undeliverable,
        )


class NatsSubscription(ClosesOnExit):
    """A consumer in a group; see :class:`msdata.transport.Subscription`.

    It keeps a pull request open on each of its group's consumers (one, or with
    ``ordered=True`` one per key partition and one for keyless messages), all answering into
    one inbox, within ``prefetch``; ``receive`` takes what arrived. A request lives at most
    0.5 s on the server (a longer wait opens new ones), and ``close`` lets the open ones end
    before it gives back what it holds (waiting up to 1 s when the server's word that one
    ended does not come): a request left open on a dead inbox would make the server
    deliver into it. What it gives back uncounted (``release()``, and on close what it
    received and never handed out) leaves a release record first (see the module docstring, "Release
    records"); a redelivery's attempt is counted from its record.

    Memory is bounded in bytes too: what it holds (received and not settled) plus what its
    open requests may still bring stays within the transport's ``max_held_bytes``, plus one
    message. A request asks for as many messages as fit in the room left at the server's
    ``max_payload`` each; when less than ``max_payload`` is left, it asks for the room left
    in bytes (JetStream's ``max_bytes``). When the next message is larger than that, the
    server ends the request (409 "Message Size Exceeds MaxBytes") and the next request
    asks for that one message alone, whatever its size (the "plus one message"), and
    nothing else meanwhile.
    """

    def __init__(
        self,
        transport: NatsTransport,
        topic: str,
        group: str,
        max_attempts: int,
        prefetch: int,
        ordered: bool = False,
    ) -> None:
        self._transport = transport
        self.topic = topic
        self.group = group
        self.max_attempts = max_attempts
        self.prefetch = prefetch
        self.ordered = ordered
        self.stream = ""
        #: the consumer of keyless messages (of every message, when not ordered)
        self.consumer = consumer_name(group) + ("_n" if ordered else "")
        #: every consumer this subscription pulls from; the last is ``consumer``
        self.consumers: list[str] = []
        self._nc: Client | None = None
        self._inflight: set[NatsDelivery] = set()
        #: bytes (about as the server counts them) of what it holds: received, not settled
        self._held_bytes = 0
        self.max_held_bytes = transport.max_held_bytes
        # stream sequence -> what this subscription gave back (nacked or released), oldest
        # first: (the attempt of its next delivery, num_delivered then, a release record of
        # it exists). The attempt is exact for the next delivery (num_delivered one higher:
        # no other delivery, so no other release, in between), needing no record read, and
        # a floor otherwise: JetStream (2.9) sometimes redelivers a delayed nack with its
        # delivered count reset to 1
        # (and, last, the consumer sequence of the delivery given back: see _known)
        self._floor: OrderedDict[int, tuple[int, int, bool, int]] = OrderedDict()
        # stream sequences this subscription acked, the latest _NACKS_REMEMBERED: an ack is
        # not confirmed, and one lost with a connection (a server gone silent) makes
        # JetStream deliver the message again; such a redelivery is acked again, not handed
        # out (JetStream never redelivers a message whose ack it has). Each with the
        # message's Nats-Msg-Id and num_delivered when acked: only a later delivery of that
        # same publish is one (a stream deleted and made again numbers from 1 anew)
        self._acked: OrderedDict[int, tuple[str | None, int]] = OrderedDict()
        # the release records of this topic: their stream, and the subject prefix of a record
        self._records = ""
        self._record_prefix = ""
        self._closed = False
        self._lost = False
        self._next_check = time.monotonic() + transport.consumer_check_interval
        # the check that the consumer exists, and the declaration of a lost one, in progress:
        # each in a task of its own, which no receive() waits for beyond its own time
        self._checking: asyncio.Task[None] | None = None
        self._redeclaring: asyncio.Task[None] | None = None
        # per consumer: messages still due on its open request, and when that request ends
        self._outstanding: list[int] = []
        # per consumer: bytes its open request may still bring (its max_bytes, less what came)
        self._outstanding_bytes: list[int] = []
        # per consumer: its next message did not fit a request's max_bytes
        self._oversize: list[bool] = []
        # per consumer: the bytes its open request counts per message (0: it has max_bytes)
        self._per_message: list[int] = []
        self._request_ends: list[float] = []
        self._not_before: list[float] = []
        self._next_subjects: list[str] = []
        # consumer name, and request inbox suffix, -> position in the lists above
        self._index: dict[str, int] = {}
        # received, not yet handed out: each message with its _held_size
        self._buffer: deque[tuple[Msg, int]] = deque()
        self._arrived = asyncio.Event()
        # set when every open pull request has ended, while closing
        self._ended: asyncio.Event | None = None
        self._inbox = ""
        self._inbox_sub: Any = None
        # ordered: the key partition whose turn is next; whether the keyless consumer has
        # the next single credit; whether it goes first when the byte budget is short
        self._turn = 0
        self._flip = False
        self._room_flip = False
        self._keepalive: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        # set as the close begins: no receive() hands out anything more
        self._stopping = False
        # what each receive() in progress took from the buffer and is making deliveries of
        self._taking: dict[int, list[NatsDelivery]] = {}
        # the release() calls in progress (each in a task of its own)
        self._releasing: set[asyncio.Task[None]] = set()
        # ack subject -> the task that nacks it when its delay is over (key partitions)
        self._delayed: dict[str, asyncio.Task[None]] = {}
        self._takes = 0
        # how many messages the receive() calls in progress took from the buffer
        self._in_hand = 0
        # set when the last receive() in progress is done, while closing
        self._taken: asyncio.Event | None = None

    async def __aenter__(self) -> Self:
        t = self._transport
        async with t._answered(f"could not declare group {self.group!r} on topic {self.topic!r}"):
            await self._declare()
        t._subscriptions.add(self)
        self._keepalive = asyncio.get_running_loop().create_task(
            self._keep_alive(), name=f"msdata-nats-keepalive:{self.topic}:{self.group}"
        )
        return self

    async def _keep_alive(self) -> None:
        """Every ``ack_wait / 3`` seconds, tell JetStream that what this consumer holds
        (handed out and not settled, or received and not yet handed out) is in progress
        (``+WPI``), so a live consumer's slow work is not redelivered under it; only a dead
        consumer's work comes back after ``ack_wait``."""
        interval = self._transport.ack_wait / 3
        while not self._closed:
            await asyncio.sleep(interval)
            nc = self._nc
            if nc is None or not nc.is_connected:
                continue
            replies = [d._msg.reply for d in list(self._inflight)]
            replies.extend(m.reply for m, _ in list(self._buffer))
            replies.extend(d._msg.reply for ds in list(self._taking.values()) for d in ds)
            replies.extend(list(self._delayed))
            try:
                for reply in replies:
                    if reply:
                        await nc.publish(reply, _WPI)
            except (nats.errors.Error, OSError):
                pass  # reconnecting: the next round tells it again

    async def _declare(self) -> None:
        t = self._transport
        js = await t._ready()
        nc = self._nc = js._nc
        self.stream, specs = await t._declare_consumers(
            self.topic, self.group, self.ordered, force=self._lost
        )
        what = f"could not declare group {self.group!r} on topic {self.topic!r} at {t.address}"
        with _nats_errors(what):
            if self._inbox_sub is None:
                self._inbox = nc.new_inbox()
                # no pending limit of nats-py's own (it would drop deliveries): what the
                # server sends is bounded by prefetch and max_held_bytes
                self._inbox_sub = await nc.subscribe(
                    f"{self._inbox}.*", cb=self._arrive, pending_bytes_limit=0
                )
        self.consumers = [name for name, _, _ in specs]
        self._records = self.stream + _RECORDS_SUFFIX
        self._record_prefix = f"{_RECORD_SUBJECT}{self._records}."
        self._index = {name: i for i, name in enumerate(self.consumers)}
        self._index.update((str(i), i) for i in range(len(specs)))
        api = js._prefix
        self._next_subjects = [f"{api}.CONSUMER.MSG.NEXT.{self.stream}.{n}" for n in self.consumers]
        self._outstanding = [0] * len(specs)
        self._outstanding_bytes = [0] * len(specs)
        self._oversize = [False] * len(specs)
        self._per_message = [0] * len(specs)
        self._request_ends = [0.0] * len(specs)
        self._not_before = [0.0] * len(specs)
        self._lost = False

    def _remember(
        self, seq: int, attempt: int, delivered: int, recorded: bool, cseq: int = 0
    ) -> None:
        floor = self._floor
        floor[seq] = (attempt, delivered, recorded, cseq)
        floor.move_to_end(seq)
        if len(floor) > _NACKS_REMEMBERED:
            floor.popitem(last=False)

    def _one_at_a_time(self, consumer: str) -> bool:
        """Whether ``consumer`` is a key partition's (``max_ack_pending=1``): while one of
        its messages is unsettled it sends no other, so its consumer sequence goes up by
        one for each real delivery of that message, and not for a redelivery the server
        counted and lost (see :meth:`_known`)."""
        return self.ordered and consumer != self.consumer

    def _known(self, reply: str, fields: tuple[str, int, int]) -> tuple[int, bool] | None:
        """The attempt of a redelivery (and whether a release record of it exists) if this
        subscription knows it exactly: it gave the message back and no one received it in
        between. That is so when ``num_delivered`` is one higher than then, or, on a key
        partition, when the consumer sequence is: nats-server 2.9 sometimes counts the
        redelivery after a ``-NAK`` and never sends it (a pull request ending as it is
        sent), so the message comes back after ``ack_wait`` with ``num_delivered`` two
        higher, one delivery of which no consumer had."""
        consumer, delivered, seq = fields
        given = self._floor.get(seq)
        if given is None:
            return None
        if given[1] == delivered - 1:
            return given[0], given[2]
        if (
            given[3]
            and delivered > given[1]
            and self._one_at_a_time(consumer)
            and _ack_cseq(reply) == given[3] + 1
        ):
            return given[0], given[2]
        return None

    async def _arrive(self, msg: Msg) -> None:
        reply = msg.reply
        if not (reply and reply.startswith(_ACK_PREFIX)):
            # a status, sent to the request's own inbox: 100 is a heartbeat; 404, 408 and
            # 409 end the request
            headers = msg.headers
            status = headers.get("Status") if headers else None
            i = self._index.get(msg.subject.rpartition(".")[2], -1)
            if status != "100" and i >= 0:
                self._outstanding[i] = 0
                self._outstanding_bytes[i] = 0
                if status == "409" and str(headers.get("Description", "")).startswith(  # type: ignore[union-attr]
                    _TOO_BIG
                ):
                    self._oversize[i] = True  # ask for that one message alone next
                elif status != "408":  # refused, not expired: do not ask again at once
                    self._not_before[i] = time.monotonic() + _PULL_BACKOFF
                if self._ended is not None and not any(self._outstanding):
                    self._ended.set()
                self._arrived.set()  # a waiting receive() opens another request
            return
        # a delivery keeps its own subject; the ack subject names the consumer
        tokens = reply.split(".")
        i = self._index.get(tokens[3] if len(tokens) == 9 else tokens[5], -1)
        size = _held_size(msg)
        if i >= 0 and self._outstanding[i] > 0:
            left = self._outstanding[i] = self._outstanding[i] - 1
            per = self._per_message[i]
            self._outstanding_bytes[i] = (
                left * per if per else max(0, self._outstanding_bytes[i] - size)
            )
            if self._ended is not None and not any(self._outstanding):
                self._ended.set()
        if self._acked:
            fields = _ack_fields(reply)
            was = self._acked.get(fields[2]) if fields is not None else None
            if (
                fields is not None
                and was is not None
                and was[0] is not None
                and was[0] == _dedup_id(msg)
                and fields[1] > was[1]
            ):
                # acked before, the ack lost on the way (a connection that went silent or
                # dropped): ack it again; it was handed out and settled, not a new attempt
                with contextlib.suppress(nats.errors.Error):
                    await self._nc.publish(reply, b"")  # type: ignore[union-attr]
                return
        if self._closed:
            with contextlib.suppress(nats.errors.Error):
                await self._nc.publish(reply, _NAK)  # type: ignore[union-attr]
            return
        self._buffer.append((msg, size))
        self._held_bytes += size
        self._arrived.set()

    async def _pull(self, expires: float) -> None:
        """Open a pull request on each consumer that has none, within ``prefetch``."""
        nc = self._nc
        assert nc is not None
        if self._stopping:
            return  # closing: no new request
        now = time.monotonic()
        outstanding, ends, not_before = self._outstanding, self._request_ends, self._not_before
        outstanding_bytes = self._outstanding_bytes
        for i, end in enumerate(ends):
            if end < now:
                # expired, or lost with a connection or a server restart
                outstanding[i] = outstanding_bytes[i] = 0
        room = self.max_held_bytes - self._held_bytes - sum(outstanding_bytes)
        if room <= 0:
            return  # held (and asked for) max_held_bytes: wait for settlements
        credit = self.prefetch - len(self._inflight) - len(self._buffer) - sum(outstanding)
        credit -= self._in_hand
        last = len(outstanding) - 1
        wanted: list[tuple[int, int]] = []
        # with fewer credits than idle consumers, their requests take turns: each then lives
        # only _TURN_EXPIRES, so that the turn soon passes on from an empty key partition
        turns = False
        if last:
            # Key partitions take turns first, from the one after the last that was pulled
            # (self._turn), so a small prefetch still reaches each of them. One credit stays
            # for the keyless consumer; with a single credit, the keyless consumer and the
            # partitions have it in turn (self._flip, changed only when that choice is made),
            # else a prefetch below key_partitions + 1 would never pull keyless ones. (Both
            # changing on every call, as they once did, made a prefetch of 1 pull only the
            # partitions of one parity: the others were never delivered.)
            start = self._turn
            free = [
                i
                for i in ((start + j) % last for j in range(last))
                if outstanding[i] == 0 and not_before[i] <= now
            ]
            keyless_idle = outstanding[last] == 0 and not_before[last] <= now
            turns = credit < len(free) + keyless_idle
            reserve = 0
            if keyless_idle and free and credit > 0:
                if credit > 1:
                    reserve = 1
                else:
                    reserve = 1 if self._flip else 0
                    self._flip = not self._flip
            for i in free:
                if credit - reserve <= 0:
                    break
                wanted.append((i, 1))
                credit -= 1
        if credit > 0 and outstanding[last] == 0 and not_before[last] <= now:
            wanted.append((last, min(credit, self._transport.max_ack_pending)))
        if not wanted:
            return
        if turns:
            expires = min(expires, _TURN_EXPIRES)
        expires_ns = int(expires * 1e9)
        oversize = self._oversize
        # (consumer, batch, request, bytes it may bring as counted against the budget)
        requests: list[tuple[int, int, bytes, int]] = []
        big = next((i for i, _ in wanted if oversize[i]), -1)
        if big >= 0:
            # its next message is larger than a request's max_bytes: ask for it alone,
            # whatever its size (the "plus one message" of the bound), and for nothing else
            oversize[big] = False
            requests.append((big, 1, b'{"batch":1,"expires":%d}' % expires_ns, room))
        else:
            # A request asks for as many messages as fit in the room left at the server's
            # max_payload each (no message is larger), without max_bytes: with max_bytes on
            # every request, nats-server 2.9 now and then handed one message to two
            # requests as a first delivery (3 runs in 10 of 120 messages with nacks, 0 in
            # 22 without; in ordered mode an order violation). Only when the room left is
            # below max_payload does a request carry max_bytes (the room).
            idle = self._held_bytes == 0 and not any(outstanding_bytes)
            max_payload = nc.max_payload
            if last and room < max_payload and len(wanted) > 1 and wanted[-1][0] == last:
                # too little room for them all: the keyless consumer first, every other time
                self._room_flip = not self._room_flip
                if self._room_flip:
                    wanted.reverse()
            for i, batch in wanted:
                fits = min(batch, room // max_payload)
                if fits >= 1:
                    request = b'{"batch":%d,"expires":%d}' % (fits, expires_ns)
                    requests.append((i, fits, request, fits * max_payload))
                    room -= fits * max_payload
                elif i == last and room > 0:
                    request = b'{"batch":%d,"expires":%d,"max_bytes":%d}' % (
                        batch,
                        expires_ns,
                        room,
                    )
                    requests.append((i, batch, request, room))
                    room = 0
                elif idle and not requests:
                    # a key partition (one message at a time; a max_bytes request there
                    # broke order, see above) with less room than max_payload, and nothing
                    # held: its one message is the "plus one"
                    requests.append((i, 1, b'{"batch":1,"expires":%d}' % expires_ns, room))
                    room = 0
        per_message = self._per_message
        for i, batch, request, nbytes in requests:
            if i != last:
                self._turn = (i + 1) % last  # the next partition's turn comes next
            outstanding[i] = batch
            outstanding_bytes[i] = nbytes
            per_message[i] = nbytes // batch if b"max_bytes" not in request else 0
            ends[i] = now + expires + _PULL_GRACE
            await nc.publish(self._next_subjects[i], request, reply=f"{self._inbox}.{i}")

    async def receive(self, max_messages: int = 100, timeout: float = 1.0) -> list[NatsDelivery]:
        """Up to ``max_messages`` deliveries (at most ``prefetch`` held); waits up to
        ``timeout`` seconds for the first, then returns what is ready, within ``timeout``
        plus :data:`RECEIVE_MARGIN` whatever the server does (down, or silent with the
        connection open): ``[]`` when nothing arrived in time. No wait inside it outlives
        that, and what it cuts short is left for a later ``receive``, lost and counted
        nowhere: the check that the consumer exists goes on in a task of its own (no
        ``receive`` waits for it), as does the declaration of a consumer the server lost
        (each ``receive`` waits for it within its own time); a redelivery whose release
        record was not read in time, and an overdue delivery whose dead-letter copy was not
        confirmed in time, stay in the subscription's buffer. Raises
        :class:`TransportClosed` once closed."""
        if self._closed or self._transport._closed:
            raise TransportClosed("receive() on a closed subscription")
        if self._stopping:
            return []  # closing: what it holds is given back, nothing more is handed out
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        if (self._lost or self._redeclaring is not None) and not await self._declared_again(
            deadline
        ):
            return []
        assert self._inbox_sub is not None, "receive() outside 'async with'"
        expires = min(max(timeout, 0.05), _PULL_EXPIRES)
        await self._pull_safely(expires)
        buffer = self._buffer
        if not buffer and loop.time() < deadline:
            self._arrived.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    while not buffer and not self._stopping:
                        await self._arrived.wait()
                        self._arrived.clear()
                        if not buffer and not self._stopping:
                            await self._pull_safely(expires)  # a request ended empty
            except TimeoutError:
                if not self._stopping:
                    self._check_consumer()
                return []
        if self._stopping:
            return []  # its subscription began to close while it waited: hand out nothing
        take = min(max_messages, self.prefetch - len(self._inflight), len(buffer))
        if take <= 0:
            return []
        return await self._deliveries(
            [buffer.popleft() for _ in range(take)], deadline + RECEIVE_MARGIN
        )

    async def _declared_again(self, deadline: float) -> bool:
        """Declare the lost consumer(s) again, in a task of their own, and wait for it until
        ``deadline`` (loop time): True once declared. False if it is still going on (the
        next ``receive`` waits for it further), was stopped by the close, or failed with a
        :class:`TransportError` (then after a pause of up to 1 s within the deadline, so
        that a consumer loop does not spin; the next ``receive`` tries again). Raises any
        other error of the declaration (a :class:`ConfigurationError`)."""
        loop = asyncio.get_running_loop()
        task = self._redeclaring
        if task is None:
            task = self._redeclaring = loop.create_task(
                self._declare_again(), name=f"msdata-nats-declare:{self.topic}:{self.group}"
            )
            task.add_done_callback(_retrieved)
        # a receive cancelled here leaves the declaration to go on
        done, _ = await asyncio.wait((task,), timeout=max(deadline - loop.time(), 0.0))
        if not done:
            return False
        self._redeclaring = None
        if task.cancelled():
            return False
        error = task.exception()
        if error is None:
            return True
        if not isinstance(error, TransportError):
            raise error
        left = deadline - loop.time()
        if left > 0:
            await asyncio.sleep(min(left, 1.0))
        return False

    async def _declare_again(self) -> None:
        """:meth:`_declare`, as entering the subscription does: within ``connect_timeout``,
        else :class:`TransportError` naming the address."""
        what = f"could not declare group {self.group!r} on topic {self.topic!r} again"
        async with self._transport._answered(what):
            await self._declare()

    async def _pull_safely(self, expires: float) -> None:
        try:
            await self._pull(expires)
        except nats.errors.ConnectionClosedError as e:
            raise TransportClosed("the NATS connection is closed") from e
        except (nats.errors.Error, OSError):
            pass  # reconnecting: what is buffered can still be handed out

    def _check_consumer(self) -> None:
        """After an empty wait, now and then (every ``consumer_check_interval`` seconds):
        start a check that the consumer still exists (a pull from a consumer the server
        lost, deleted or by a restart without its data, just times out). It runs in a task
        of its own, for up to the JetStream API's timeout (``connect_timeout``), and no
        ``receive`` waits for it: finding the consumer gone, it marks it lost, and the next
        ``receive`` declares it again. One check at a time."""
        now = time.monotonic()
        if now < self._next_check or not self.consumers or self._lost or self._checking is not None:
            return
        self._next_check = now + self._transport.consumer_check_interval
        task = self._checking = asyncio.get_running_loop().create_task(
            self._check(), name=f"msdata-nats-check:{self.topic}:{self.group}"
        )
        task.add_done_callback(_retrieved)

    async def _check(self) -> None:
        try:
            js = self._transport._js
            if js is not None:
                await js.consumer_info(self.stream, self.consumer)
        except nats.js.errors.NotFoundError:
            if not self._stopping:
                self._lost = True
        except (nats.errors.Error, OSError, TimeoutError):
            pass  # disconnected, or no answer: the next check will tell
        finally:
            self._checking = None

    async def close(self) -> None:
        """Close: let the open pull requests end, nack what was handed out and not settled,
        give back uncounted what was received and never handed out. A ``receive()`` still
        in progress then returns an empty list and hands out nothing: what it took is given
        back uncounted with the rest. Cancelling the close (a consumer task cancelled as it
        closes) cancels only the wait: the closing goes on in the background, so nothing it
        holds, or its requests still bring, is left to come back counted after
        ``ack_wait``; the transport's ``close`` waits for it."""
        closing = self._closing
        if closing is None:
            if self._closed:
                return
            self._stopping = True
            self._arrived.set()  # a receive() waiting returns []
            closing = self._closing = asyncio.get_running_loop().create_task(
                self._close(), name=f"msdata-nats-close:{self.topic}:{self.group}"
            )
        await asyncio.shield(closing)

    async def _close(self) -> None:
        try:
            await self._closing_steps()
        finally:
            self._transport._subscriptions.discard(self)

    async def _closing_steps(self) -> None:
        # a consumer check or a declaration in progress is of no use any more (and must not
        # outlive the close)
        background = [t for t in (self._checking, self._redeclaring) if t is not None]
        self._checking = self._redeclaring = None
        for task in background:
            task.cancel()
        if background:
            await asyncio.gather(*background, return_exceptions=True)
        # let the open pull requests end (each lives as long as one receive() waits); what
        # they still deliver is buffered and given back below
        left = max(self._request_ends, default=0.0) - time.monotonic()
        if any(self._outstanding) and left > 0:
            self._ended = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._ended.wait()
        # let a receive() that is making deliveries (reading release records) put back what
        # it took: it hands out nothing now (each of its steps is bounded in time)
        if self._taking:
            self._taken = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_RECORD_TIMEOUT + self._transport.publish_timeout):
                    await self._taken.wait()
        # let the release() calls in progress write their records and nack (each is bounded
        # by its record's and its publish's timeouts)
        if self._releasing:
            await asyncio.wait(
                set(self._releasing), timeout=_RECORD_TIMEOUT + self._transport.publish_timeout
            )
        keepalive, self._keepalive = self._keepalive, None
        if keepalive is not None:
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive
        self._closed = True
        inbox_sub, self._inbox_sub = self._inbox_sub, None
        if inbox_sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await inbox_sub.unsubscribe()
        # still unsettled: settling them now raises TransportClosed. What was handed out
        # comes back counted; what was received and never handed out is given back uncounted
        replies: list[str] = []
        # on a key partition, recorded as counted once (see _nack_recorded)
        counted: list[tuple[str, int]] = []
        for d in self._inflight:
            fields = _ack_fields(d._msg.reply)
            if fields is not None and self._one_at_a_time(fields[0]):
                counted.append((d._msg.reply, d.attempt + 1))
            else:
                replies.append(d._msg.reply)
        self._inflight.clear()
        # nacked with a delay not over yet: nacked now (they come back sooner)
        for task in self._delayed.values():
            task.cancel()
        replies.extend(self._delayed)
        self._delayed.clear()
        buffered = [m for m, _ in self._buffer]
        self._buffer.clear()
        self._held_bytes = 0
        nc = self._nc
        if (replies or counted or buffered) and nc is not None and not nc.is_closed:
            try:
                for reply in replies:
                    await nc.publish(reply, _NAK)
                if buffered or counted:
                    await self._give_back_unread(buffered, counted)
                await nc.flush(timeout=2)
            except (TimeoutError, nats.errors.Error, OSError, MsdataError):
                pass  # not nacked: JetStream offers them again after ack_wait

    async def _nack_recorded(self, d: NatsDelivery, attempt: int, delay: float) -> None:
        """Nack ``d``, a key partition's delivery, as the release of attempt ``attempt``
        (one more than its own): a release record first (confirmed; if it cannot be
        written, the nack goes on without one), with the delivery's consumer sequence, so
        that whichever subscription has the message next counts only the deliveries really
        sent since (see :meth:`_known`); then the ``-NAK``, after ``delay`` seconds (see
        :meth:`_nack_later`)."""
        reply = d._msg.reply
        fields = _ack_fields(reply)
        assert fields is not None
        consumer, delivered, seq = fields
        cseq = _ack_cseq(reply)
        subject = f"{self._record_prefix}{consumer}.{seq}"
        recorded = await self._transport._put_records(
            self.topic, [(subject, b"%d %d %d" % (attempt, delivered, cseq))]
        )
        d._recorded = recorded = recorded or d._recorded
        self._remember(seq, attempt, delivered, recorded, cseq)
        if delay > 0 and not self._closed:
            self._nack_later(reply, delay)  # a close nacks it at once
        elif self._closed:
            with contextlib.suppress(nats.errors.Error, OSError, MsdataError):
                await d._reply(_NAK)
        else:
            await d._reply(_NAK)

    def _nack_later(self, reply: str, delay: float) -> None:
        """Nack the delivery of ``reply`` (a key partition's) in ``delay`` seconds, with
        the 1 ms ``-NAK``; meanwhile it stays in flight (kept alive by ``+WPI``), holding
        its partition back as JetStream's own delay would. nats-server 2.9 sometimes loses
        the redelivery of a delayed ``-NAK`` on a consumer with ``max_ack_pending=1`` (its
        count goes up, nothing is sent, and the partition waits ``ack_wait`` before it
        comes back counted once more: measured with consumers restarting, 1 to 8 messages
        in 400 dead-lettered as never settled, and the partition stalled 30 s each). The
        1 ms ``-NAK`` is lost so too, more rarely (a pull request ending as it is
        redelivered): the partition then still waits ``ack_wait``, but the lost delivery is
        not counted (see :meth:`_known`). A close before the delay is over nacks it at
        once: it comes back sooner."""

        async def nack() -> None:
            await asyncio.sleep(delay)
            self._delayed.pop(reply, None)
            nc = self._nc
            if nc is not None and not self._closed:
                with contextlib.suppress(nats.errors.Error, OSError):
                    await nc.publish(reply, _NAK)

        task = asyncio.get_running_loop().create_task(nack())
        task.add_done_callback(_retrieved)
        self._delayed[reply] = task

    def _release_done(self, task: asyncio.Task[None]) -> None:
        self._releasing.discard(task)
        _retrieved(task)

    async def _give_back_unread(
        self, msgs: list[Msg], counted: Sequence[tuple[str, int]] = ()
    ) -> None:
        """Give back messages received and never handed out, each with the attempt it would
        have been handed out with (one whose release record cannot be read is nacked
        plainly: it comes back counted), and with them, recorded in the same write, the
        ``counted`` (ack subject, attempt of the next delivery)."""
        known: list[tuple[str, int]] = list(counted)
        unknown: list[str] = []
        redelivered: list[str] = []
        floor = self._floor
        nc = self._nc
        assert nc is not None
        # reconnecting: no record could be read or written now; do not wait for one
        connected = nc.is_connected
        for msg in msgs:
            fields = _ack_fields(msg.reply)
            if fields is None:
                continue
            _, delivered, seq = fields
            given = floor.get(seq)
            exact = self._known(msg.reply, fields) if delivered > 1 else None
            if not connected:
                unknown.append(msg.reply)
            elif exact is not None:
                known.append((msg.reply, exact[0]))  # straight back after this gave it back
            elif delivered > 1:
                redelivered.append(msg.reply)
            else:
                known.append((msg.reply, given[0] if given is not None else 1))
        if redelivered:
            found = await self._count(redelivered)
            for reply, count in zip(redelivered, found, strict=True):
                if count is None:
                    unknown.append(reply)
                else:
                    known.append((reply, count[0]))
        if known:
            await self._give_back(known)
        for reply in unknown:
            await nc.publish(reply, _NAK)

    async def _give_back(self, deliveries: list[tuple[str, int]]) -> None:
        """Give back deliveries (their ack subject, their attempt) uncounted: a release record
        of each (see the module docstring), confirmed, then ``-NAK``. If the records cannot
        be written, they are nacked all the same (and come back counted, logged)."""
        records: list[tuple[str, bytes]] = []
        given: list[tuple[int, int, int, int]] = []
        prefix = self._record_prefix
        for reply, attempt in deliveries:
            fields = _ack_fields(reply)
            if fields is None:
                continue
            consumer, delivered, seq = fields
            cseq = _ack_cseq(reply)
            given.append((seq, attempt, delivered, cseq))
            records.append((f"{prefix}{consumer}.{seq}", b"%d %d %d" % (attempt, delivered, cseq)))
        recorded = bool(records) and await self._transport._put_records(self.topic, records)
        if records and not recorded:
            log.warning(
                "could not record the release of %d deliveries of %s/%s: they come back "
                "counted as an attempt",
                len(records),
                self.topic,
                self.group,
            )
        for seq, attempt, delivered, cseq in given:
            self._remember(seq, attempt if recorded else attempt + 1, delivered, recorded, cseq)
        nc = self._nc
        assert nc is not None
        with _nats_errors("could not release the deliveries"):
            for reply, _ in deliveries:
                await nc.publish(reply, _NAK)

    async def _count(
        self, redelivered: list[str], until: float | None = None
    ) -> list[tuple[int, bool] | None]:
        """For each redelivery (its ack subject): its attempt, ``num_delivered`` less the
        deliveries its release record says were given back (on a key partition, the
        deliveries its consumer sequence says were sent since the record), and whether it
        has a record; None where the record could not be read (by ``until``, loop time, if
        given)."""
        t = self._transport
        records, prefix = self._records, self._record_prefix
        fields = [_ack_fields(reply) or ("", 0, 0) for reply in redelivered]

        async def read(subject: str) -> tuple[int, int, int] | None:
            async with asyncio.timeout_at(until):
                return await t._read_record(records, subject)

        found = await asyncio.gather(
            *(read(f"{prefix}{c}.{seq}") for c, _, seq in fields),
            return_exceptions=True,
        )
        floor = self._floor
        out: list[tuple[int, bool] | None] = []
        for reply, (consumer, delivered, seq), record in zip(
            redelivered, fields, found, strict=True
        ):
            if isinstance(record, BaseException):
                if not isinstance(record, Exception):
                    raise record  # cancelled
                out.append(None)
                continue
            attempt = delivered
            if record is not None:
                at, released_at, sent_at = record
                cseq = _ack_cseq(reply)
                if delivered <= released_at:
                    pass  # a record older than this consumer
                elif sent_at and cseq > sent_at and self._one_at_a_time(consumer):
                    # a key partition: the attempt it was released with, plus the
                    # deliveries really sent since then (a redelivery the server counted
                    # and never sent is not an attempt)
                    attempt = min(at + cseq - sent_at - 1, delivered)
                else:
                    # as the attempt it was released with, plus the deliveries since then
                    attempt = min(at + delivered - released_at - 1, delivered)
            given = floor.get(seq)
            if given is not None and attempt < given[0]:
                attempt = given[0]
            out.append((attempt, record is not None))
        return out

    async def _deliveries(
        self, msgs: list[tuple[Msg, int]], until: float | None = None
    ) -> list[NatsDelivery]:
        """Deliveries of ``msgs`` (just taken from the front of the buffer), held as handed
        out; overdue ones are dead-lettered instead. If the ``receive()`` is cancelled
        meanwhile (while it reads release records, say), or the subscription begins to
        close, it hands out nothing: what it took and did not settle goes back to the front
        of the buffer, in order, for a later ``receive()``, or for the close to give back
        uncounted. Redeliveries whose release record cannot be read, and overdue deliveries
        whose dead-letter copy is not confirmed, go back there too: each wait ends by
        ``until`` (loop time, the receive's end) if given."""
        taking: list[NatsDelivery] = []
        self._takes += 1
        take = self._takes
        self._taking[take] = taking
        self._in_hand += len(msgs)
        out: list[NatsDelivery] = []
        unread: list[NatsDelivery] = []
        handed = False
        try:
            out, unread = await self._make_deliveries(msgs, taking, until)
            handed = not self._stopping
        finally:
            del self._taking[take]
            self._in_hand -= len(msgs)
            if handed:
                kept = set(unread)
                back = [d for d in taking if d in kept]  # in the order they came
            else:
                back = [d for d in taking if not d._settled]
            if back and self._closed:
                # the close stopped waiting for this receive (see _closing_steps)
                log.warning(
                    "%d deliveries of %s/%s were still being read as their subscription "
                    "closed: they come back after ack_wait, counted",
                    len(back),
                    self.topic,
                    self.group,
                )
            elif back:
                self._buffer.extendleft((d._msg, d._size) for d in reversed(back))
            if not self._taking and self._taken is not None:
                self._taken.set()
        if not handed:
            return []
        self._inflight.update(out)
        if unread and not out:
            # the caller asks again at once: not in a loop (within the receive's time)
            pause = _UNREAD_PAUSE
            if until is not None:
                pause = min(pause, until - asyncio.get_running_loop().time())
            if pause > 0:
                await asyncio.sleep(pause)
        return out

    async def _make_deliveries(
        self, msgs: list[tuple[Msg, int]], taking: list[NatsDelivery], until: float | None
    ) -> tuple[list[NatsDelivery], list[NatsDelivery]]:
        """The deliveries of ``msgs`` to hand out, each also added to ``taking`` as soon as it
        is made, and those to keep in the buffer: the redeliveries whose release record
        could not be read, the overdue ones whose dead-letter copy was not confirmed (by
        ``until``, loop time, if given)."""
        out: list[NatsDelivery] = []
        kept: list[NatsDelivery] = []
        stream = self.stream
        floor = self._floor
        redelivered: list[NatsDelivery] | None = None
        for msg, size in msgs:
            reply = msg.reply
            tokens = reply.split(".") if reply else []
            n = len(tokens)
            if n == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
                consumer, attempt, seq = tokens[3], int(tokens[4]), int(tokens[5])
            elif n >= 11:  # with domain and account hash in front
                consumer, attempt, seq = tokens[5], int(tokens[6]), int(tokens[7])
            else:
                self._held_bytes -= size
                continue  # not a JetStream delivery: nothing to settle
            hdrs = msg.headers
            if hdrs:
                mid = hdrs.get(ID_HEADER) or hdrs.get(MSG_ID_HEADER) or f"{stream}:{seq}"
                key = hdrs.get(KEY_HEADER)
                headers: Any = {k: v for k, v in hdrs.items() if k not in _RESERVED}
            else:
                mid, key, headers = f"{stream}:{seq}", None, _NO_HEADERS
            d = NatsDelivery(
                self, msg, TransportMessage(mid, msg.data, key, headers), attempt, seq, size
            )
            taking.append(d)
            given = floor.get(seq)
            if attempt > 1:
                exact = self._known(reply, (consumer, attempt, seq))
                if exact is not None:
                    # straight back after this subscription gave it back: known exactly
                    d.attempt, d._recorded = exact
                    if not await self._not_overdue(d, until, kept):
                        continue
                else:
                    # counted below, less the times its release record says it was given back
                    if redelivered is None:
                        redelivered = []
                    redelivered.append(d)
            elif given is not None and attempt < given[0]:
                d.attempt = given[0]
                if not await self._not_overdue(d, until, kept):
                    continue
            out.append(d)
        if redelivered is None:
            return out, kept
        return await self._recount(out, redelivered, until, kept)

    async def _not_overdue(
        self, d: NatsDelivery, until: float | None, kept: list[NatsDelivery]
    ) -> bool:
        """True if ``d`` may be handed out; False if it was overdue and is dead-lettered
        (not while the subscription closes: then it is given back with its attempt, and
        dead-lettered by whichever receive() has it next). With ``until`` (loop time), an
        overdue delivery whose dead-letter copy is not confirmed by then (or that fails
        otherwise) is added to ``kept`` instead, unsettled and uncounted, to stay in the
        buffer for a later receive (JetStream drops a copy published again inside its
        duplicate window); without, it is nacked and comes back."""
        overdue = deadletter.overdue_reason(d.attempt, self.max_attempts)
        if overdue is None or self._stopping:
            return True
        # its consumers died on it max_attempts times: settle it here
        d._settled = True
        self._held_bytes -= d._size
        attempts = deadletter.overdue_attempts(d.attempt)
        if until is None:
            # if that fails, _dead_letter nacked it: it comes back and is tried again
            with contextlib.suppress(MsdataError):
                await d._dead_letter(overdue, attempts)
            return False
        left = until - asyncio.get_running_loop().time()
        try:
            if left <= 0:
                raise TransportError("no time left in this receive to dead-letter it")
            async with asyncio.timeout_at(until):
                await d._dead_letter(overdue, attempts, timeout=left, keep=True)
        except BaseException as e:
            # not moved: it stays with the subscription (or, cancelled, goes back to the
            # buffer with what the receive took), not settled
            d._settled = False
            self._held_bytes += d._size
            if not isinstance(e, (MsdataError, TimeoutError)):
                raise
            kept.append(d)
        return False

    async def _recount(
        self,
        out: list[NatsDelivery],
        redelivered: list[NatsDelivery],
        until: float | None,
        kept: list[NatsDelivery],
    ) -> tuple[list[NatsDelivery], list[NatsDelivery]]:
        """Count the ``redelivered`` of ``out`` from their release records (read by
        ``until``, loop time, if given). Returns ``out`` less the overdue ones and those
        whose record cannot be read, and ``kept`` with those (to be counted on a later
        ``receive``) and the overdue ones not dead-lettered in time."""
        nc = self._nc
        assert nc is not None
        if nc.is_connected:
            counted = await self._count([d._msg.reply for d in redelivered], until)
        else:  # reconnecting: a read would only wait
            counted = [None] * len(redelivered)
        unread: list[NatsDelivery] = []
        left: set[NatsDelivery] = set()
        for d, count in zip(redelivered, counted, strict=True):
            if count is None:
                unread.append(d)
                continue
            d.attempt, d._recorded = count
            if not await self._not_overdue(d, until, kept):
                left.add(d)
        if unread:
            left.update(unread)
            log.debug("could not read the release records of %d redeliveries", len(unread))
        if left:
            out = [d for d in out if d not in left]
        return out, kept + unread


def _dedup_id(msg: Msg) -> str | None:
    """The ``Nats-Msg-Id`` a message was published with (msdata sets one on every publish;
    None for a foreign message without one)."""
    headers = msg.headers
    return headers.get(MSG_ID_HEADER) if headers else None


def _retrieved(task: asyncio.Task[None]) -> None:
    """Mark the outcome of a background task (a consumer check, a declaration) as seen: one
    that no ``receive`` waited for to the end may fail with no one awaiting it."""
    if not task.cancelled():
        task.exception()


def _abort_socket(nc: Client) -> int | None:
    """Abort the socket of a nats-py client (no public way: its transport's stream writer),
    dropping what it had not written; whatever waits on it ends. Returns the bytes dropped
    from the socket's buffer, None if no socket was found."""
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    transport = getattr(writer, "transport", None)
    if not isinstance(transport, asyncio.WriteTransport):
        return None
    dropped = transport.get_write_buffer_size()
    transport.abort()
    return dropped


def _ack_fields(reply: str) -> tuple[str, int, int] | None:
    """The consumer, ``num_delivered`` and stream sequence of a JetStream delivery, from its
    ack subject (None if it is not one)."""
    tokens = reply.split(".") if reply else []
    n = len(tokens)
    if n == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return tokens[3], int(tokens[4]), int(tokens[5])
    if n >= 11:  # with domain and account hash in front
        return tokens[5], int(tokens[6]), int(tokens[7])
    return None


def _ack_cseq(reply: str) -> int:
    """The consumer sequence of a JetStream delivery (0 if its ack subject has none)."""
    tokens = reply.split(".") if reply else []
    n = len(tokens)
    if n == 9:
        return int(tokens[6])
    if n >= 11:
        return int(tokens[8])
    return 0


_CONFIRMED = 1
_REFUSED = 2


class _Batch:
    """The answers a published batch still waits for, per message."""

    __slots__ = ("done", "left", "no_stream", "refused", "state")

    def __init__(self, size: int) -> None:
        self.left = size
        #: per message: 0 no answer yet, _CONFIRMED or _REFUSED
        self.state = bytearray(size)
        #: index -> the server's reason, for each message it refused
        self.refused: dict[int, str] = {}
        self.no_stream = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class NatsTransport:
    """The NATS JetStream :class:`msdata.transport.Transport`.

    Built on a connected nats-py client (``await nats.connect(...)``) that the caller owns
    and closes; :meth:`from_url` builds one that the transport connects on first use and
    closes in :meth:`close`. Serves one event loop, like the client.

    Options: ``namespace`` (on a server shared with others: stream names start with the
    escaped namespace and ``_S``, subjects with ``namespace + "."``; the same option as on
    the other transports), or, separately, ``stream_prefix`` (stream names, default
    ``MSDATA_``) and ``subject_prefix`` (``""`` or ending in ``.``: a topic's subject is
    ``subject_prefix + topic``), ``ack_wait`` (seconds before
    JetStream offers again a delivery whose consumer died), ``duplicate_window`` (seconds
    ``Nats-Msg-Id`` de-duplication lasts), ``max_age`` / ``max_bytes`` (stream retention
    limits; None keeps everything), ``max_ack_pending`` (unsettled deliveries per group),
    ``publish_timeout`` (seconds a ``publish`` takes at most, connecting and declaring the
    stream included), ``connect_timeout`` (seconds to connect, and for a subscription to
    declare its group, before :class:`TransportError` naming the address), ``ordered`` (groups
    keep order per key, see the module docstring) and ``key_partitions``, ``memory_storage``
    (memory instead of file streams: not durable), ``consumer_check_interval`` (seconds
    between checks, while a subscription finds nothing, that its consumer still exists on
    the server; it is declared again if not), ``max_message_bytes`` (None: the server's
    ``max_payload``, read from its INFO on connect; a smaller number lowers it, and must be
    over :data:`msdata.deadletter.DEAD_LETTER_RESERVE`, which is kept of it: a message
    whose :func:`wire_size`, headers included, is over it is refused before sending, alone,
    with :class:`~msdata.errors.MessageTooLarge`), ``max_held_bytes`` (bytes a subscription
    holds at most, received and not settled, plus one message; default 64 MiB; see
    :class:`NatsSubscription`), ``replays_history`` (default False: a group declared on a
    topic that has a group already starts after what the stream holds then, as the
    transport contract says; True: every new group starts at the stream's beginning and
    receives what it still holds, as msdata's NATS transport did before; see the module
    docstring).
    """

    def __init__(
        self,
        client: Client | None,
        *,
        stream_prefix: str | None = None,
        subject_prefix: str | None = None,
        namespace: str | None = None,
        ack_wait: float = 30.0,
        duplicate_window: float = 120.0,
        max_age: float | None = None,
        max_bytes: int | None = None,
        max_ack_pending: int = 1000,
        publish_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        memory_storage: bool = False,
        replicas: int = 1,
        consumer_check_interval: float = 5.0,
        key_partitions: int = 16,
        ordered: bool = False,
        max_message_bytes: int | None = None,
        max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
        replays_history: bool = False,
    ) -> None:
        if namespace is not None:
            check_name("namespace", namespace)
            if stream_prefix is not None or subject_prefix is not None:
                raise ConfigurationError(
                    "give namespace, or stream_prefix and subject_prefix, not both"
                )
            # "_S" never occurs in an escaped name: the prefix ends unambiguously
            stream_prefix = f"{_escape(namespace)}_S"
            subject_prefix = f"{namespace}."
        self.namespace = namespace
        stream_prefix = "MSDATA_" if stream_prefix is None else stream_prefix
        subject_prefix = "" if subject_prefix is None else subject_prefix
        if not _PREFIX.match(stream_prefix):
            raise ConfigurationError(
                f"stream_prefix {stream_prefix!r}: up to 40 ASCII letters, digits, '_' or '-'"
            )
        if not _SUBJECT_PREFIX.match(subject_prefix):
            raise ConfigurationError(
                f"subject_prefix {subject_prefix!r}: empty, or subject tokens each ending in '.'"
            )
        if (
            ack_wait <= 0
            or duplicate_window < 0
            or publish_timeout <= 0
            or connect_timeout <= 0
            or max_ack_pending < 1
            or max_held_bytes < 1
            or (max_message_bytes is not None and max_message_bytes < 1)
        ):
            raise ConfigurationError(
                "ack_wait, publish_timeout, connect_timeout, max_ack_pending, max_held_bytes "
                "and max_message_bytes must be positive"
            )
        if max_message_bytes is not None and max_message_bytes <= deadletter.DEAD_LETTER_RESERVE:
            # every message would be refused "over the limit of 1 bytes"
            raise ConfigurationError(
                f"max_message_bytes={max_message_bytes} leaves no room for a message: "
                f"{deadletter.DEAD_LETTER_RESERVE} bytes of it are kept for dead-letter "
                f"headers; give at least {deadletter.DEAD_LETTER_RESERVE + 1}"
            )
        self._nc: Client | None = client
        self._js: JetStreamContext | None = (
            client.jetstream(timeout=connect_timeout) if client is not None else None
        )
        self._owns_client = client is None
        self._guard = _guard(client) if client is not None else None
        #: a larger message (its :func:`wire_size`) is refused; None: the server's max_payload
        self.max_message_bytes = max_message_bytes
        #: deliveries terminated because they could not be dead-lettered (their copy cannot
        #: fit ``max_payload``, or the dead-letter stream refused it), each logged at ERROR
        self.undeliverable = 0
        #: bytes a subscription holds at most (received, not settled), plus one message
        self.max_held_bytes = max_held_bytes
        self._connect: dict[str, Any] = {}
        self._connect_lock = asyncio.Lock()
        self.stream_prefix = stream_prefix
        self.subject_prefix = subject_prefix
        self.ack_wait = ack_wait
        self.duplicate_window = duplicate_window
        self.max_age = max_age
        self.max_bytes = max_bytes
        self.max_ack_pending = max_ack_pending
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        self._address = ""
        self._events: _ConnectionLog | None = None
        self.memory_storage = memory_storage
        self.replicas = replicas
        self.consumer_check_interval = consumer_check_interval
        if not 1 <= key_partitions <= 1024:
            raise ConfigurationError("key_partitions must be between 1 and 1024")
        self.key_partitions = key_partitions
        self.ordered = ordered
        #: every new group starts from the stream's beginning (see the module docstring)
        self.replays_history = replays_history
        self.features = TransportFeatures(
            durable=not memory_storage,
            ordered_per_key=ordered,
            native_delay=True,
            replays_history=replays_history,
            redelivery_timeout=ack_wait,
        )
        # published batches waiting for their confirmations, by reply subject token
        self._batches: dict[str, _Batch] = {}
        self._batch_seq = 0
        self._acks_sub: Any = None
        self._acks_prefix = ""
        # topic -> its subject and key partition subjects, once its stream is known to exist
        self._streams: dict[str, tuple[str, list[str]]] = {}
        self._subscriptions: set[NatsSubscription] = set()
        # the streams of release records known to exist, and where deletes are answered
        self._record_streams: set[str] = set()
        self._forget_inbox = ""
        self._closed = False

    @classmethod
    def from_url(cls, url: str = "nats://127.0.0.1:4222", **options: Any) -> NatsTransport:
        """A transport that connects to ``url`` (``nats://host:port``, several separated by
        commas) on first use, reconnects without limit, and closes the connection on
        :meth:`close`. ``options`` are those of the constructor; ``max_message_bytes``,
        ``max_held_bytes`` and ``namespace`` may also be given as query parameters
        (``nats://host:4222?max_message_bytes=65536&namespace=shop``), the keywords
        winning. ConfigurationError for any other query parameter, a path
        (``nats://host:4222/abc``), and a ``max_message_bytes`` not over
        :data:`msdata.deadletter.DEAD_LETTER_RESERVE`."""
        if not url.startswith(("nats://", "tls://")):
            raise ConfigurationError(f"not a nats:// URL: {redact_url(url)!r}")
        url, found = pop_url_options(
            url, ("max_message_bytes", "max_held_bytes"), text=("namespace",), passes_on=False
        )
        servers = [u.strip() for u in url.split(",")]
        for server in servers:
            path = urlsplit(server).path
            if path not in ("", "/"):
                raise ConfigurationError(
                    f"a NATS URL has no path: {path!r} in {redact_url(server)!r} would be "
                    "ignored (the stream names come from the topics and the namespace)"
                )
        transport = cls(None, **{**found, **options})
        transport._address = ",".join(_redacted(u) for u in servers)
        events = _ConnectionLog(transport._address, lambda: transport._closed)
        transport._events = events
        transport._connect = {
            "servers": servers,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "name": "msdata",
            "error_cb": events.error,
            "disconnected_cb": events.disconnected,
            "reconnected_cb": events.reconnected,
        }
        return transport

    @property
    def address(self) -> str:
        """The server(s) this transport talks to, as ``nats://host:port`` without
        credentials (what its errors name)."""
        if self._address:
            return self._address
        nc = self._nc
        url = getattr(nc, "connected_url", None) if nc is not None else None
        if url is not None and url.hostname:
            return _redacted(f"{url.scheme}://{url.hostname}:{url.port or 4222}")
        return "the NATS server"

    @property
    def unreadable_messages(self) -> tuple[int, int]:
        """Messages on this transport's connection that nats-py could not parse (bytes that
        are not UTF-8 in a subject or a header status line): how many were handed on with
        those bytes escaped, and how many were skipped (see the module docstring)."""
        guard = self._guard
        return (guard.repaired, guard.skipped) if guard is not None else (0, 0)

    @property
    def client(self) -> Client | None:
        """The nats-py client (None until a :meth:`from_url` transport connects)."""
        return self._nc

    async def _ready(self) -> JetStreamContext:
        if self._closed:
            raise TransportClosed("the transport is closed")
        if self._js is not None:
            return self._js
        async with self._connect_lock:
            if self._js is None:
                # nats-py retries a first connection forever when reconnects are unlimited:
                # bound it, and give up on the client if it is not connected in time
                nc = Client()
                try:
                    async with asyncio.timeout(self.connect_timeout):
                        with _nats_errors(f"could not connect to NATS at {self.address}"):
                            await nc.connect(**self._connect)
                except BaseException as e:
                    with contextlib.suppress(Exception):
                        await nc.close()
                    if isinstance(e, TimeoutError):
                        raise TransportError(
                            f"could not connect to NATS at {self.address} within "
                            f"{self.connect_timeout}s{self._why_not_connected()}"
                        ) from e
                    raise
                self._guard = _guard(nc)
                self._nc, self._js = nc, nc.jetstream(timeout=self.connect_timeout)
            return self._js

    def _why_not_connected(self) -> str:
        """`` (last connection error: ...)`` while not connected and the client reported
        one, else ``""``: what a timeout's message adds."""
        last = self._events.last_error if self._events is not None else None
        if last is None or (self._nc is not None and self._nc.is_connected):
            return ""
        return f" (last connection error: {last})"

    def _subject(self, topic: str) -> str:
        check_name("topic", topic)
        if topic.endswith(".") or f".{_PARTITION_TOKEN}." in f".{topic}.":
            raise ConfigurationError(
                f"topic name {topic!r} must not end with '.' nor hold a {_PARTITION_TOKEN!r} "
                "part on NATS"
            )
        return self.subject_prefix + topic

    async def _ensure_stream(self, topic: str, *, force: bool = False) -> str:
        """Create the topic's stream if it does not exist; return the stream name."""
        name = stream_name(topic, self.stream_prefix)
        if not force and topic in self._streams:
            return name
        subject = self._subject(topic)
        partitions = [f"{subject}.{_PARTITION_TOKEN}.{n}" for n in range(self.key_partitions)]
        # the partitions are listed one by one, not as ``<subject>._k.*``: a message on a
        # partition no consumer reads (``._k.99``, ``._k.abc``) is refused at publish
        # instead of being stored where no group would ever receive it
        config = StreamConfig(
            name=name,
            description=f"msdata topic {topic}; key partitions {self.key_partitions}",
            subjects=[subject, *partitions],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.MEMORY if self.memory_storage else StorageType.FILE,
            num_replicas=self.replicas,
            duplicate_window=self.duplicate_window,
            max_age=self.max_age,
            max_bytes=self.max_bytes,
        )
        js = await self._ready()
        with _nats_errors(f"could not declare the stream of topic {topic!r} at {self.address}"):
            try:
                await js.add_stream(config)
            except nats.js.errors.APIError as e:
                if e.err_code != _STREAM_EXISTS:
                    raise
                info = await js.stream_info(name)
                found = _PARTITIONS.search(info.config.description or "")
                if found and int(found.group(1)) != self.key_partitions:
                    raise ConfigurationError(
                        f"topic {topic!r} was created with key_partitions={found.group(1)}, "
                        f"this transport has {self.key_partitions}: they must agree"
                    ) from e
                if info.config.subjects == [subject, f"{subject}.{_PARTITION_TOKEN}.*"]:
                    # declared by an earlier msdata with a wildcard: narrow it
                    info.config.subjects = config.subjects
                    await js.update_stream(info.config)
                elif info.config.subjects != config.subjects:
                    raise ConfigurationError(
                        f"stream {name!r} exists with subjects {info.config.subjects}, "
                        f"not {config.subjects}"
                    ) from e
        self._streams[topic] = (subject, partitions)
        return name

    def _limit(self, nc: Client, dead_letters: bool = False) -> tuple[int, str]:
        """The largest message (:func:`wire_size`) this transport publishes, and whence:
        the server's ``max_payload`` (or ``max_message_bytes``) less
        :data:`msdata.deadletter.DEAD_LETTER_RESERVE`, so that whatever it published can
        be dead-lettered whole; the whole ``max_payload`` for dead letters."""
        server = nc.max_payload
        if dead_letters:
            return server, f"max_payload of {self.address}"
        mine = self.max_message_bytes
        if mine is not None and mine < server:
            server, where = mine, "max_message_bytes"
        else:
            where = f"max_payload of {self.address}"
        return max(1, server - deadletter.DEAD_LETTER_RESERVE), (
            f"{where} less {deadletter.DEAD_LETTER_RESERVE} bytes kept for dead-letter headers"
        )

    async def publish(self, topic: str, messages: Sequence[TransportMessage]) -> None:
        await self._publish(topic, messages)

    async def _publish(
        self,
        topic: str,
        messages: Sequence[TransportMessage],
        dead_letters: bool = False,
        timeout: float | None = None,
    ) -> None:
        if self._closed:
            raise TransportClosed("publish() on a closed transport")
        subjects = self._streams.get(topic)
        # the whole call, connecting and declaring the stream included, takes at most
        # publish_timeout, or ``timeout`` if shorter (a receive dead-lettering an overdue
        # delivery within its own time); nats-py would otherwise wait for a server that is down
        seconds = self.publish_timeout if timeout is None else min(timeout, self.publish_timeout)
        deadline = asyncio.get_running_loop().time() + seconds
        if subjects is None:
            self._subject(topic)
            if not messages:
                return
            try:
                async with asyncio.timeout_at(deadline):
                    await self._ensure_stream(topic)
            except TimeoutError as e:
                raise PublishError(
                    f"publish to {topic!r} at {self.address}: no answer from the server "
                    f"within {seconds}s{self._why_not_connected()}"
                ) from e
            subjects = self._streams[topic]
        elif not messages:
            return
        nc = self._nc
        assert nc is not None
        total = len(messages)
        # refused before sending, alone: a message no broker carries as it is, or one over
        # the server's max_payload (which would make the server close the connection)
        limit, where = self._limit(nc, dead_letters)
        messages, screened = screen(messages, limit, wire_size, where)
        refused: dict[str, str | MsdataError] = dict(screened)
        what = f"publish to {topic!r} at {self.address}"
        if messages:
            batch = await self._send(nc, topic, subjects, messages, deadline, seconds)
            for i, reason in batch.refused.items():
                refused[messages[i].id] = f"the server refused it: {reason}"
        if refused:
            raise refused_error(what, total, refused)

    async def _send(
        self,
        nc: Client,
        topic: str,
        subjects: tuple[str, list[str]],
        messages: Sequence[TransportMessage],
        deadline: float,
        seconds: float,
    ) -> _Batch:
        """Send ``messages`` and wait for JetStream's answer to each; returns the batch
        with the ones it refused. Raises PublishError for a batch that failed as a whole."""
        subject, partitions = subjects
        n_partitions = len(partitions)
        if self._acks_sub is None:
            await self._listen_for_acks(nc)
        # every message asks JetStream to answer on a subject of its own under the batch's
        # (``<inbox>.<batch>.<index>``), one subscription for all, and the answers are
        # counted: one future per batch instead of one per message, and a refusal names its
        # message. If the client reconnects meanwhile, what it wrote to the lost socket is
        # gone: the messages not answered yet are sent again under a new batch token
        # (JetStream drops copies by Nats-Msg-Id and answers them as duplicates), within the
        # one publish_timeout.
        batch = _Batch(len(messages))
        tokens: list[str] = []
        try:
            # the sending too: nats-py's publish waits, with no timeout, for its buffer to be
            # written once it holds more than pending_size, which a silent server never reads
            # (and swallows the cancel of that wait: the deadline is checked after each)
            loop = asyncio.get_running_loop()
            async with asyncio.timeout_at(deadline):
                while True:
                    reconnects = nc.stats["reconnects"]
                    self._batch_seq += 1
                    token = str(self._batch_seq)
                    tokens.append(token)
                    self._batches[token] = batch
                    reply = f"{self._acks_prefix}{token}."
                    state = batch.state
                    with _nats_errors(
                        f"publish to {topic!r} at {self.address} failed", PublishError
                    ):
                        for i, m in enumerate(messages):
                            if state[i]:
                                continue  # answered before the reconnect
                            own = m.headers
                            if own:
                                headers = {**own, MSG_ID_HEADER: m.id}
                                if REPLAY_HEADER in own or ID_HEADER in own:
                                    headers.pop(ID_HEADER, None)  # msdata's own: never forged
                                    dedup = nats_msg_id(m)
                                    if dedup != m.id:
                                        # a replay: a dedup id of its own, the id beside it
                                        headers[MSG_ID_HEADER] = dedup
                                        headers[ID_HEADER] = m.id
                            else:
                                headers = {MSG_ID_HEADER: m.id}
                            key = m.key
                            if key is None:
                                target = subject
                            else:
                                headers[KEY_HEADER] = key
                                target = partitions[zlib.crc32(key.encode()) % n_partitions]
                            await nc.publish(target, m.body, reply=reply + str(i), headers=headers)
                            if loop.time() >= deadline:
                                raise TimeoutError
                        while not batch.done.done():
                            await asyncio.wait((batch.done,), timeout=0.25)
                            if nc.stats["reconnects"] != reconnects and nc.is_connected:
                                break  # reconnected: send the rest again
                    if batch.done.done():
                        break
        except TimeoutError as e:
            raise PublishError(
                f"{batch.left} of {len(messages)} messages to {topic!r} were not "
                f"confirmed by {self.address} within {seconds}s"
                f"{self._why_not_connected()}"
            ) from e
        finally:
            for token in tokens:
                del self._batches[token]
        if batch.no_stream:
            self._streams.pop(topic, None)  # declare it again on the next publish
            raise PublishError(
                f"publish to {topic!r} was refused by {self.address}: "
                "no stream captures the subject"
            )
        return batch

    async def _listen_for_acks(self, nc: Client) -> None:
        async with self._connect_lock:
            if self._acks_sub is None:
                inbox = nc.new_inbox()
                self._acks_sub = await nc.subscribe(f"{inbox}.*.*", cb=self._on_ack)
                self._acks_prefix = f"{inbox}."

    async def _on_ack(self, msg: Msg) -> None:
        token, _, index = msg.subject[len(self._acks_prefix) :].partition(".")
        batch = self._batches.get(token)
        if batch is None or batch.done.done():
            return
        try:
            i = int(index)
        except ValueError:
            return
        state = batch.state
        if not 0 <= i < len(state) or state[i]:
            return  # answered already (a copy sent again after a reconnect)
        data = msg.data
        if msg.headers and msg.headers.get("Status") == "503":
            batch.no_stream = True  # no stream captures the subject: the batch fails
            batch.done.set_result(None)
            return
        if b'"error":' in data:  # compact JSON from the server; a stream name has no quote
            state[i] = _REFUSED
            try:
                error = json.loads(data)["error"]
                reason = str(error.get("description", error) if isinstance(error, dict) else error)
            except (ValueError, KeyError, TypeError):
                reason = data.decode(errors="replace")
            batch.refused[i] = reason
        else:
            state[i] = _CONFIRMED
        batch.left -= 1
        if not batch.left:
            batch.done.set_result(None)

    # -- release records (see NatsSubscription) --------------------------------------------

    async def _ensure_records(self, topic: str) -> str:
        """Create the stream of the topic's release records if it does not exist; its name."""
        name = stream_name(topic, self.stream_prefix) + _RECORDS_SUFFIX
        if name in self._record_streams:
            return name
        config = StreamConfig(
            name=name,
            description=f"msdata release records of topic {topic}",
            subjects=[f"{_RECORD_SUBJECT}{name}.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.MEMORY if self.memory_storage else StorageType.FILE,
            num_replicas=self.replicas,
            max_age=self.max_age,
            max_msgs_per_subject=1,
        )
        js = await self._ready()
        with _nats_errors(f"could not declare the release records of topic {topic!r}"):
            try:
                await js.add_stream(config)
            except nats.js.errors.APIError as e:
                if e.err_code != _STREAM_EXISTS:
                    raise
        self._record_streams.add(name)
        return name

    async def _put_records(self, topic: str, records: list[tuple[str, bytes]]) -> bool:
        """Write release records (subject, ``b"<attempt> <num_delivered>"``); True once
        JetStream confirmed them all, False if it did not (within a few seconds)."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            return False  # reconnecting: do not wait for it
        timeout = min(self.publish_timeout, _RECORD_TIMEOUT)
        deadline = asyncio.get_running_loop().time() + timeout
        for _ in range(2):
            try:
                async with asyncio.timeout_at(deadline):
                    await self._ensure_records(topic)
                    if self._acks_sub is None:
                        await self._listen_for_acks(nc)
                    self._batch_seq += 1
                    token = str(self._batch_seq)
                    batch = self._batches[token] = _Batch(len(records))
                    try:
                        reply = f"{self._acks_prefix}{token}."
                        for i, (subject, data) in enumerate(records):
                            await nc.publish(subject, data, reply=reply + str(i))
                        await asyncio.shield(batch.done)
                    finally:
                        del self._batches[token]
            except (TimeoutError, MsdataError, nats.errors.Error, OSError):
                return False
            if not batch.no_stream:
                return not batch.refused
            # the server lost the stream (deleted, or a restart without its data): again
            self._record_streams.discard(stream_name(topic, self.stream_prefix) + _RECORDS_SUFFIX)
        return False

    async def _read_record(self, records: str, subject: str) -> tuple[int, int, int] | None:
        """The release record on ``subject`` of stream ``records``: (the attempt its
        delivery was released with, its ``num_delivered`` then, the consumer sequence of
        that delivery, 0 in a record of an earlier msdata that had none); None if there is
        none (or it is not a well-formed record). Raises :class:`TransportError` if it
        cannot be read."""
        js = self._js
        nc = self._nc
        assert js is not None and nc is not None
        with _nats_errors(f"could not read the release record {subject}"):
            answer = await nc.request(
                f"{js._prefix}.STREAM.MSG.GET.{records}",
                b'{"last_by_subj":"%s"}' % subject.encode(),
                timeout=min(self.publish_timeout, _RECORD_TIMEOUT),
            )
        try:
            reply = json.loads(answer.data)
            found = reply.get("message")
            if found is None:
                code = reply.get("error", {}).get("err_code")
                if code in (_NO_MESSAGE, _NO_STREAM):
                    return None
                raise TransportError(f"could not read the release record {subject}: {reply}")
            values = [int(v) for v in base64.b64decode(found["data"]).split()]
            if len(values) == 2:
                values.append(0)
            attempt, delivered, cseq = values
            record = attempt, delivered, cseq
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # not one of ours
        if not (1 <= record[0] <= _MAX_RECORDED and record[1] >= 1 and record[2] >= 0):
            return None
        return record

    async def _delete_record(self, records: str, subject: str) -> None:
        """Delete the release record on ``subject``, without waiting for the answer (best
        effort: one left behind is never read again, its delivery being settled for good)."""
        js = self._js
        nc = self._nc
        if js is None or nc is None:
            return
        if not self._forget_inbox:
            self._forget_inbox = nc.new_inbox()
        with contextlib.suppress(nats.errors.Error, OSError):
            await nc.publish(
                f"{js._prefix}.STREAM.PURGE.{records}",
                b'{"filter":"%s"}' % subject.encode(),
                reply=self._forget_inbox,
            )

    async def declare_group(self, topic: str, group: str) -> None:
        """The topic's stream and the group's durable consumer(s): one, or with
        ``ordered=True`` one per key partition plus one for keyless messages, as a
        subscription of this transport declares them. A new group starts after what the
        stream holds, unless it is the topic's first group, the topic is a dead-letter
        topic, or the transport was built with ``replays_history=True`` (then it starts from
        the beginning). Raises :class:`TransportError` naming the address if the server
        does not answer within ``connect_timeout``."""
        self._subject(topic)
        check_name("group", group)
        async with self._answered(f"could not declare group {group!r} on topic {topic!r}"):
            await self._declare_consumers(topic, group, self._group_ordered(topic, group))

    def _group_ordered(self, topic: str, group: str) -> bool:
        """Whether the group's consumers are an ordered group's (one per key partition): the
        transport's ``ordered``, except for the dead-letter reader (:data:`DEAD_LETTER_READER`
        on a dead-letter topic), always one unordered consumer, so that ``msdata dlq`` with
        a bare ``--broker`` URL and the service's own
        :func:`msdata.service.read_dead_letters` open the same consumer whatever the mode
        (and the reader, holding what it read, is not held to one letter per partition)."""
        if group == DEAD_LETTER_READER and is_dead_letter_topic(topic):
            return False
        return self.ordered

    @contextlib.asynccontextmanager
    async def _answered(self, what: str) -> AsyncIterator[None]:
        """Bound a call to ``connect_timeout``: past it, :class:`TransportError` saying
        ``what`` and naming the address."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                yield
        except TimeoutError as e:
            raise TransportError(
                f"{what} at {self.address}: no answer within {self.connect_timeout}s"
                f"{self._why_not_connected()}"
            ) from e

    async def _declare_consumers(
        self, topic: str, group: str, ordered: bool, *, force: bool = False
    ) -> tuple[str, list[tuple[str, str | None, int]]]:
        """Declare the stream of ``topic`` and the consumers of ``group``; returns the
        stream name and each consumer's (name, filter subject, max_ack_pending), the
        keyless (or only) one last. ``force``: the group's consumers were lost (the
        server's data, or deleted): declare the stream again, and them from the beginning."""
        js = await self._ready()
        stream = await self._ensure_stream(topic, force=force)
        subject, partitions = self._streams[topic]
        base = consumer_name(group)
        specs: list[tuple[str, str | None, int]] = []
        if ordered:
            specs = [(f"{base}_k{n}", p, 1) for n, p in enumerate(partitions)]
            specs.append((f"{base}_n", subject, self.max_ack_pending))
        else:
            specs.append((base, None, self.max_ack_pending))
        kind = "ordered group" if ordered else "group"
        what = f"could not declare group {group!r} on topic {topic!r} at {self.address}"
        with _nats_errors(what):
            start = await self._start_of(
                stream, topic, [name for name, _, _ in specs], replay=force
            )

        async def declare(name: str, filter_subject: str | None, max_ack_pending: int) -> None:
            config = ConsumerConfig(
                name=name,
                durable_name=name,
                description=f"msdata {kind} {group} of topic {topic}",
                deliver_policy=DeliverPolicy.ALL
                if start is None
                else DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self.ack_wait,
                max_deliver=-1,
                max_ack_pending=max_ack_pending,
                filter_subject=filter_subject,
            )
            try:
                await js.add_consumer(stream, config=config)
            except nats.js.errors.APIError as e:
                if e.err_code not in _CONSUMER_EXISTS:
                    raise
                # it exists with other settings (another version of this code): use it as is
                await js.consumer_info(stream, name)

        with _nats_errors(what):
            # existing ones too, with the start they have: the server takes the settings
            # it can update (ack_wait, max_ack_pending) from the latest declaration
            await asyncio.gather(*(declare(*spec) for spec in specs))
        return stream, specs

    async def _start_of(
        self, stream: str, topic: str, names: list[str], *, replay: bool = False
    ) -> int | None:
        """The stream sequence at which the consumers ``names`` of a group start on
        ``stream`` (None: the first message it holds).

        A group receives what is published after it was declared: a new group starts after
        the stream's last message, unless no group of msdata's exists on the stream yet (the
        first group receives what was published before any group), the topic is a
        dead-letter topic (every reader reads it from its beginning), ``replay`` is true, or
        the transport was built with ``replays_history=True``. Missing consumers of a group
        that exists (in full, or in part) start where its consumers do."""
        js = self._js
        assert js is not None
        infos: list[Any] = []
        while True:
            try:
                page = await js.consumers_info(stream, len(infos) or None)
            except nats.js.errors.NotFoundError:
                break
            infos.extend(page)
            if len(page) < 256:
                break
        wanted = set(names)
        existing = {i.name for i in infos if i.name in wanted}
        if existing:
            sibling: ConsumerConfig = next(i for i in infos if i.name in existing).config
            if sibling.deliver_policy == DeliverPolicy.BY_START_SEQUENCE:
                return sibling.opt_start_seq
            return None
        if replay or self.replays_history or is_dead_letter_topic(topic):
            return None
        groups = [i for i in infos if (i.config.description or "").startswith("msdata ")]
        if not groups:
            return None  # the topic's first group
        info = await js.stream_info(stream)
        return info.state.last_seq + 1

    def subscribe(
        self, topic: str, group: str, *, max_attempts: int = 5, prefetch: int = 100
    ) -> NatsSubscription:
        self._subject(topic)
        check_name("group", group)
        if max_attempts < 1 or prefetch < 1:
            raise ConfigurationError("max_attempts and prefetch must be >= 1")
        if self._closed:
            raise TransportClosed("subscribe() on a closed transport")
        return NatsSubscription(
            self, topic, group, max_attempts, prefetch, self._group_ordered(topic, group)
        )

    async def delete_topic(self, topic: str) -> bool:
        """Delete the topic's stream, with every message and group in it. True if it existed.
        Raises :class:`TransportError` naming the address if the server does not answer
        within ``connect_timeout``."""
        async with self._answered(f"could not delete the stream of {topic!r}"):
            return await self._delete_topic(topic)

    async def _delete_topic(self, topic: str) -> bool:
        js = await self._ready()
        self._streams.pop(topic, None)
        name = stream_name(topic, self.stream_prefix)
        self._record_streams.discard(name + _RECORDS_SUFFIX)
        with _nats_errors(f"could not delete the stream of {topic!r} at {self.address}"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(name + _RECORDS_SUFFIX)
            try:
                return bool(await js.delete_stream(name))
            except nats.js.errors.NotFoundError:
                return False

    async def close(self) -> None:
        """Close every open subscription (nacking what they hold) and, for a :meth:`from_url`
        transport, the connection. The caller's own client stays open."""
        if self._closed:
            return
        subs = list(self._subscriptions)
        if subs:
            # each is bounded in time, but nats-py may wait for ever to write to a server
            # that went silent (and ignore a cancel): the client is abandoned below then
            closing = [asyncio.ensure_future(sub.close()) for sub in subs]
            _, stuck = await asyncio.wait(closing, timeout=self._close_limit())
            for task in closing:
                task.add_done_callback(_retrieved)
            if stuck:
                log.warning(
                    "%d subscriptions of the transport at %s did not close within %.1fs: "
                    "what they hold comes back after ack_wait, counted",
                    len(stuck),
                    self.address,
                    self._close_limit(),
                )
        self._closed = True
        nc = self._nc
        if nc is None or nc.is_closed:
            return
        if self._owns_client:
            await self._close_client(nc)
            return
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self._acks_sub is not None:
                    await self._acks_sub.unsubscribe()
                await nc.flush(timeout=2)
        except (TimeoutError, nats.errors.Error, OSError):
            pass  # the connection is lost (a broker restarting): nothing left to release

    def _close_limit(self) -> float:
        """Seconds the subscriptions' closes may take together: their own waits (the open
        pull requests, a receive reading records, the flush of their nacks) and a margin."""
        return _PULL_EXPIRES + _PULL_GRACE + _RECORD_TIMEOUT + self.publish_timeout + 3.0

    async def _close_client(self, nc: Client) -> None:
        """Close the connection of a :meth:`from_url` transport within ``connect_timeout``.
        nats-py's ``close()`` has no timeout of its own: it writes out what it still holds
        and waits for the socket to close, for ever on a server that went silent (and it
        swallows a cancel in places). Past the timeout the client is abandoned: its socket
        is aborted (what it held unsent is lost: logged, with how much) and its close left
        to end on its own."""
        closing = asyncio.ensure_future(nc.close())
        closing.add_done_callback(_retrieved)
        _, stuck = await asyncio.wait((closing,), timeout=self.connect_timeout)
        if not stuck:
            return
        unsent = getattr(nc, "_pending_data_size", 0)
        subscriptions = len(getattr(nc, "_subs", ()))
        dropped = _abort_socket(nc)
        closing.cancel()
        log.warning(
            "the NATS connection to %s did not close within %.1fs (the server does not "
            "answer): abandoned it, %s, with %d subscriptions open; acks and nacks in "
            "what was not sent are lost (JetStream redelivers those deliveries after "
            "ack_wait)",
            self.address,
            self.connect_timeout,
            "its socket not found"
            if dropped is None
            else f"its socket aborted with {unsent + dropped} bytes not sent",
            subscriptions,
        )

    async def __aenter__(self) -> Self:
        await self._ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def lag(self, topic: str, group: str) -> int | None:
        """The sum of ``num_pending`` (not delivered yet) and ``num_ack_pending`` (delivered,
        not acked) over the group's durable consumers on the topic's stream: its one
        consumer, or an ordered group's consumers per key partition and for keyless
        messages, whichever exist. None if the stream or the group does not exist. Raises
        :class:`TransportError` naming the address if the server does not answer within
        ``connect_timeout``. See :meth:`msdata.transport.Transport.lag`."""
        self._subject(topic)
        check_name("group", group)
        async with self._answered(f"could not read the lag of group {group!r} of {topic!r}"):
            return await self._lag(topic, group)

    async def _lag(self, topic: str, group: str) -> int | None:
        js = await self._ready()
        stream = stream_name(topic, self.stream_prefix)
        base = consumer_name(group)
        total: int | None = None
        what = f"could not read the lag of group {group!r} of {topic!r} at {self.address}"
        with _nats_errors(what):
            offset = 0
            while True:
                try:
                    page = await js.consumers_info(stream, offset or None)
                except nats.js.errors.NotFoundError:
                    return None
                for info in page:
                    name = info.name or ""
                    rest = name[len(base) :] if name.startswith(base) else None
                    # an ordered group's consumers are base_k<n> and base_n; "_k"/"_n" cannot
                    # follow a single "_" in an escaped group name, so no other group matches
                    if rest is not None and (
                        rest in ("", "_n") or (rest[:2] == "_k" and rest[2:].isdigit())
                    ):
                        total = (total or 0) + (info.num_pending or 0)
                        total += info.num_ack_pending or 0
                if len(page) < 256:
                    return total
                offset += len(page)
