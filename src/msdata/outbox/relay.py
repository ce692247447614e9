"""The outbox relay: moves committed outbox rows to the transport, at least once, in order
per partition key."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import operator
import os
import socket
import types
import uuid
from collections.abc import Coroutine, Generator, Mapping, Sequence
from datetime import timedelta
from types import MappingProxyType, TracebackType
from typing import Any, Literal, Self, TypeVar

from msdata import telemetry
from msdata.backoff import Backoff, exponential_backoff
from msdata.clock import SYSTEM_CLOCK, Clock
from msdata.errors import (
    ConfigurationError,
    DecodeError,
    MsdataError,
    PublishError,
    SchemaError,
    TransportError,
)
from msdata.messages import safe_text
from msdata.outbox.store import OutboxBatch, OutboxRecord, OutboxStatus, OutboxStore
from msdata.serialization import CloudEventsCodec
from msdata.transport import Publisher, TransportMessage, check_name

__all__ = ["Backoff", "OutboxRelay", "PayloadCheck", "exponential_backoff"]

T = TypeVar("T")
_NOTHING_STUCK: Mapping[str, int] = MappingProxyType({})
_tuple_new = tuple.__new__
_as_message = operator.itemgetter(1, 4, 5, 6)
_seq_of = operator.itemgetter(0)

log = logging.getLogger("msdata.outbox")

#: what a claim returns: records, or (a store's ``claim_messages``) a batch of messages
Claimed = list[OutboxRecord] | OutboxBatch


def _claimed_seqs(claimed: Claimed) -> list[int]:
    return claimed.seqs if isinstance(claimed, OutboxBatch) else list(map(_seq_of, claimed))


#: how much of each row's payload the relay checks before publishing it:
#: ``"structure"`` (default, ~0.1 µs/row): bytes that look like one JSON object holding a
#: ``"specversion"`` member; ``"json"`` (~2-4 µs/row): parses it and checks the CloudEvents
#: attributes ``specversion``, ``id``, ``type``; ``"decode"`` (~5-10 µs/row): a full
#: :class:`CloudEventsCodec` decode, so an unknown type or a payload that fails validation
#: is parked too; ``"none"``: publish as is.
PayloadCheck = Literal["none", "structure", "json", "decode"]


def _whole_transport(error: BaseException) -> bool:
    """A failure of the transport as a whole (no row's fault), not of some messages: a
    transport error naming no message. Not a :class:`ConfigurationError`: a transport
    refuses options it does not take when it is built, so one raised by a publish is about
    that publish's topic (a NATS topic whose stream has other key partitions, say), and
    taken as the transport's it would hold up every other topic's rows for ever, and
    publish them again each round; its rows are counted and parked, visible in
    ``msdata outbox parked``."""
    if isinstance(error, PublishError) and error.refused:
        return False
    return isinstance(error, TransportError | OSError)


def _default_relay_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class OutboxRelay:
    """Claims committed outbox rows, publishes them, marks them sent. At least once.

    ``run_once()`` does one step: claim up to ``batch_size`` rows with a lease of
    ``lease_seconds``, publish them through ``publisher`` as one batch per topic with all
    the batches in flight at once, then mark the published rows sent (deleted, or kept for
    ``retention`` and purged after it). Order per partition key holds within a topic, across
    batches and across relays, because the store never hands out a key while another lease
    on it is live. The lease must outlast a publish: a relay that is still publishing when
    its lease expires may see its rows published again by another relay.

    ``async with relay:`` (or ``start()``/``stop()``) runs steps in a background task,
    waking on ``store.wait_for_rows`` and polling every ``poll_interval`` seconds at most.

    A failed publish is one of two kinds. A failure of the *transport* (a
    :class:`~msdata.errors.TransportError` that names no message, such as a
    :class:`~msdata.errors.PublishError` for a broker that is unreachable or did not
    confirm in time, or an ``OSError``) is no row's fault: the batch is released
    uncounted and the relay backs off as a whole (``backoff(failures in a row)``), logging
    one WARNING per outage and one INFO line when publishing works again. A failure of
    *messages* (a :class:`~msdata.errors.PublishError` whose ``refused`` names them, a
    :class:`~msdata.errors.ConfigurationError` about their topic, or an exception that is
    not msdata's, logged with its traceback) counts one attempt on those rows, which wait
    out ``backoff(attempts)`` before they (and the later rows of their keys) are tried
    again; the other rows of the batch were confirmed by the transport and are marked sent
    (once). A refused row holds back the later rows of its key in the batch (the transport
    refuses them too, unsent: see :meth:`~msdata.transport.Publisher.publish`); they are
    released uncounted and follow it. A row that has failed
    ``max_attempts`` times is *parked* with its last error: it then blocks only the later
    rows of its own key, until someone ``requeue``s it.
    A row whose payload fails the ``check`` (see :data:`PayloadCheck`), or whose topic is
    not a valid name, is parked at once with the reason, and the relay goes on.

    Cancelling the relay's task (or ``stop()`` after its timeout) is not a failure: the
    claimed but unmarked rows are released for the next relay and the cancellation goes on.
    """

    def __init__(
        self,
        store: OutboxStore,
        publisher: Publisher,
        *,
        batch_size: int = 100,
        lease_seconds: float = 30.0,
        max_attempts: int = 10,
        backoff: Backoff | None = None,
        relay_id: str | None = None,
        retention: timedelta | None = None,
        purge_interval: float = 60.0,
        poll_interval: float = 1.0,
        check: PayloadCheck = "structure",
        codec: CloudEventsCodec | None = None,
        stop_timeout: float = 10.0,
        prefetch: bool | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if batch_size < 1 or max_attempts < 1 or lease_seconds <= 0 or poll_interval <= 0:
            raise ConfigurationError(
                "batch_size and max_attempts must be >= 1, lease_seconds and poll_interval > 0"
            )
        if check not in ("none", "structure", "json", "decode"):
            raise ConfigurationError(f"check must be none, structure, json or decode: {check!r}")
        if retention is not None and retention < timedelta(0):
            raise ConfigurationError("retention must not be negative")
        self.store = store
        self.publisher = publisher
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.backoff = backoff or exponential_backoff()
        self.relay_id = relay_id or _default_relay_id()
        self.retention = retention
        self.purge_interval = purge_interval
        self.poll_interval = poll_interval
        self.check = check
        self.codec = codec or CloudEventsCodec()
        self.stop_timeout = stop_timeout
        #: where the relay reads time: ``retry_at``, the retention cut-off, the purge
        #: interval and its back-off sleeps
        self.clock = clock
        #: claim the next batch while publishing this one (default: the store's
        #: ``features.prefetch_claims``, True for stores that hand a relay its keys' later
        #: rows)
        self.prefetch = bool(store.features.prefetch_claims if prefetch is None else prefetch)
        self._topics_ok: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._idle = False
        self._next_purge = 0.0
        self._outage: BaseException | None = None  # the last step's transport failure
        self._in_outage = False

    # -- one step ------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Claim, publish and mark one batch; returns how many rows were published."""
        records = await self._claim()
        if not records:
            return 0
        sent, _failed, _stuck = await self._handle(records)
        self._note_outage(bool(sent))
        if sent:
            await self._shielded(self._mark(sent))
        return len(sent)

    async def _mark(self, seqs: list[int]) -> None:
        await self.store.mark_sent(self.relay_id, seqs, keep=self.retention is not None)

    async def _handle(
        self, claimed: Claimed, after: Mapping[str, int] = _NOTHING_STUCK
    ) -> tuple[list[int], bool, dict[str, int]]:
        """Park bad rows, publish the rest, back off failed ones. A row whose key is in
        ``after`` with a smaller seq is handed back unpublished: the batch before did not
        publish that earlier row of its key (this batch was claimed meanwhile). Returns the
        published rows (for the caller to mark sent), whether a publish failed, and for
        each key the smallest seq of its rows not published. Rows not settled when an
        exception or cancellation comes through are released."""
        store, relay_id = self.store, self.relay_id
        settled: set[int] = set()  # parked, handed back or backed off here
        try:
            messages = None
            results: list[BaseException | None] | None = None
            if not after and self.check == "structure":
                # the usual batch: its messages as the store made them, checked, or made in
                # the same pass as the check
                if isinstance(claimed, OutboxBatch):
                    messages = self._checked(claimed)
                    topic = claimed.topic
                else:
                    messages = self._fast_batch(claimed)
                    topic = claimed[0].topic
            if messages is not None:  # the common case: no tasks to make
                try:
                    await self._publish(topic, (), messages)
                except Exception as e:
                    results = [e]
                else:  # all published: what the loop below would return
                    return _claimed_seqs(claimed), False, {}
            records = claimed.records() if isinstance(claimed, OutboxBatch) else claimed
            by_topic: dict[str, list[OutboxRecord]]
            if results is not None:  # the one-topic batch above failed
                by_topic = {records[0].topic: list(records)}
                bad: dict[str, list[int]] = {}
                blocked: list[int] = []
                stuck: dict[str, int] = {}
            else:
                by_topic, bad, blocked, stuck = self._sort(records, after)
            for reason, seqs in bad.items():
                await store.park(relay_id, seqs, safe_text(reason, 2000))
                settled.update(seqs)
                log.error("outbox rows %s parked: %s", seqs, reason)
            if blocked:
                await store.release(relay_id, blocked)
                settled.update(blocked)
            if results is None:
                if not by_topic:
                    results = []
                elif len(by_topic) == 1:  # no tasks to make
                    ((topic, recs),) = by_topic.items()
                    try:
                        await self._publish(topic, recs)
                    except Exception as e:
                        results = [e]
                    else:  # all published: what the loop below would return
                        return list(map(_seq_of, recs)), False, stuck
                else:
                    results = await asyncio.gather(
                        *(self._publish(t, recs) for t, recs in by_topic.items()),
                        return_exceptions=True,
                    )
            sent: list[int] = []
            failures: list[tuple[list[OutboxRecord], BaseException]] = []
            for recs, result in zip(by_topic.values(), results, strict=True):
                if result is None:
                    sent += map(_seq_of, recs)
                elif isinstance(result, Exception):
                    failures.append((recs, result))
                else:  # a BaseException from a publisher (not cancellation of us): re-raise
                    raise result
            for recs, error in failures:
                confirmed = await self._failed(recs, error)
                settled.update(map(_seq_of, recs))
                if confirmed:
                    sent += confirmed
                    settled.difference_update(confirmed)  # the caller marks them
                if self._outage is None and _whole_transport(error):
                    self._outage = error
                done = set(confirmed)
                for r in recs:
                    if r.partition_key is not None and r.seq not in done:
                        stuck[r.partition_key] = min(r.seq, stuck.get(r.partition_key, r.seq))
            return sent, bool(failures), stuck  # the caller marks ``sent``
        except BaseException:
            # rows neither settled here nor handed to the caller go back to the store
            held = sorted(s for s in _claimed_seqs(claimed) if s not in settled)
            if held:
                try:
                    await store.release(relay_id, held)
                except Exception:
                    log.exception("could not release outbox rows %s", held)
            raise

    async def _claim(self, marks: list[int] | None = None) -> Claimed:
        """Claim a batch (marking ``marks`` sent first, in the same store call when the
        store can). The call may finish in a database thread after we are cancelled: its
        mark stands, and its rows are released."""
        fut = _eager(self._claim_call(marks or []))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            try:
                records = await fut
            except BaseException:
                raise asyncio.CancelledError() from None
            if records:
                try:
                    await self.store.release(self.relay_id, _claimed_seqs(records))
                except Exception:
                    log.exception("could not release outbox rows after cancellation")
            raise

    @staticmethod
    async def _shielded(aw: Coroutine[Any, Any, None] | asyncio.Future[None]) -> None:
        # a mark interrupted by cancellation is finished first: the rows were published
        fut = asyncio.ensure_future(aw)
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            await fut
            raise

    def _checked(self, batch: OutboxBatch) -> list[TransportMessage] | None:
        """The messages of a batch a store made (one topic), when the topic is known and
        every payload passes the ``structure`` check as msdata's codec writes it, or None:
        then the batch takes ``_sort``."""
        if batch.topic not in self._topics_ok:
            return None
        own = self.codec.looks_like_own_event  # headers (a traceparent) come first
        messages = batch.messages
        for m in messages:
            if not own(m[1]):
                return None
        return messages

    def _fast_batch(self, records: Sequence[OutboxRecord]) -> list[TransportMessage] | None:
        """The messages of a batch whose rows all have the same known topic and a payload
        as msdata's codec writes it (passing the ``structure`` check), or None: then the
        batch takes ``_sort``."""
        topic = records[0].topic
        if topic not in self._topics_ok:
            return None
        messages: list[TransportMessage] = []
        add = messages.append
        own = self.codec.looks_like_own_event  # headers (a traceparent) come first
        for r in records:
            p = r[4]
            if r[2] != topic or type(p) is not bytes or not own(p):
                return None
            add(_tuple_new(TransportMessage, (r[1], p, r[5], r[6])))
        return messages

    def _sort(
        self, records: Sequence[OutboxRecord], after: Mapping[str, int]
    ) -> tuple[dict[str, list[OutboxRecord]], dict[str, list[int]], list[int], dict[str, int]]:
        """Split a claimed batch: rows to publish (by topic), bad rows to park (by reason),
        rows to hand back because an earlier row of their key is parked here or was not
        published by the batch before (``after``), and per key the first seq not published."""
        by_topic: dict[str, list[OutboxRecord]] = {}
        bad: dict[str, list[int]] = {}
        blocked: list[int] = []
        stuck: dict[str, int] = {}
        topics_ok = self._topics_ok
        quick = self.check == "structure"
        own = self.codec.looks_like_own_event
        last_topic: str | None = None
        last: list[OutboxRecord] = []
        for r in records:
            key = r.partition_key
            if (
                key is not None
                and (stuck or after)
                and (key in stuck or (key in after and r.seq > after[key]))
            ):
                blocked.append(r.seq)
                stuck.setdefault(key, r.seq)
                continue
            topic = r.topic
            if quick:  # the default check: the usual row costs one cheap look
                p = r.payload
                if type(p) is bytes and topic in topics_ok and own(p):
                    if topic != last_topic:
                        last_topic, last = topic, by_topic.setdefault(topic, [])
                    last.append(r)
                    continue
            reason = self._bad(r)
            if reason is None:
                if topic != last_topic:
                    last_topic, last = topic, by_topic.setdefault(topic, [])
                last.append(r)
                continue
            bad.setdefault(reason, []).append(r.seq)
            if key is not None:
                stuck[key] = r.seq
        return by_topic, bad, blocked, stuck

    def _bad(self, r: OutboxRecord) -> str | None:
        """Why this row can never be published, or None."""
        if r.topic not in self._topics_ok:
            try:
                self._topics_ok.add(check_name("topic", r.topic))
            except ConfigurationError as e:
                return f"bad topic: {e}"
        p = r.payload
        check = self.check
        if check == "none":
            return None
        if type(p) is not bytes:
            return f"payload is {type(p).__name__}, not bytes"
        if check == "structure":
            if p[:1] != b"{" or (p[-1:] != b"}" and p.rstrip()[-1:] != b"}"):
                return "payload is not a JSON object (bad payload)"
            if b'"specversion"' not in p:
                return "payload is not a CloudEvents event: no specversion (bad payload)"
            return None
        if check == "json":
            import json

            try:
                obj = json.loads(p)
            except ValueError as e:
                return f"payload is not JSON (bad payload): {e}"
            if not isinstance(obj, dict) or obj.get("specversion") != "1.0":
                return "payload is not a CloudEvents 1.0 event (bad payload)"
            if not isinstance(obj.get("id"), str) or not isinstance(obj.get("type"), str):
                return "payload has no CloudEvents id or type (bad payload)"
            return None
        try:
            self.codec.decode(p)
        except DecodeError as e:
            return f"payload does not decode (bad payload): {type(e).__name__}: {e}"
        return None

    async def _publish(
        self,
        topic: str,
        records: Sequence[OutboxRecord],
        messages: list[TransportMessage] | None = None,
    ) -> None:
        """Publish ``records`` as one batch (``messages``: theirs, when already made)."""
        if messages is None:
            # (message_id, payload, partition_key, headers) of the record tuple
            messages = [_tuple_new(TransportMessage, _as_message(r)) for r in records]
        hooks = telemetry.hooks
        if type(hooks) is telemetry.Telemetry:  # none installed: no hook to enter and leave
            await self.publisher.publish(topic, messages)
            return
        with hooks.publishing(topic, messages, self.publisher) as messages:  # telemetry
            await self.publisher.publish(topic, messages)

    async def _failed(self, records: list[OutboxRecord], error: BaseException) -> list[int]:
        """Settle the rows of a failed publish; returns the rows the transport confirmed
        (for the caller to mark sent, like any published row).

        A transport failure: every row is released uncounted. A ``PublishError`` whose
        ``refused`` names some messages: the others were confirmed (returned); per key, the
        first refused row counts an attempt (parked when out of attempts), and a later
        refused row of the same key was held back by the transport (see
        :meth:`~msdata.transport.Publisher.publish`) and is released uncounted, to follow
        its key's refused row. A confirmed row after its key's refused row went out ahead of
        it (a broker that refused a message after the batch was sent): it is marked sent
        (publishing it again would not restore the order) and logged. Any other error counts
        an attempt on every row."""
        if _whole_transport(error):
            await self.store.release(self.relay_id, [r.seq for r in records])
            return []
        refused = error.refused if isinstance(error, PublishError) else None
        confirmed: list[int] = []
        if refused:
            failed: list[OutboxRecord] = []
            held: list[int] = []
            failed_keys: set[str] = set()
            ahead: list[int] = []
            for r in records:
                key = r.partition_key
                if r.message_id not in refused:
                    confirmed.append(r.seq)
                    if key is not None and key in failed_keys:
                        ahead.append(r.seq)
                elif key is not None and key in failed_keys:
                    held.append(r.seq)
                else:
                    failed.append(r)
                    if key is not None:
                        failed_keys.add(key)
            if ahead:
                log.warning(
                    "outbox rows %s were confirmed by the transport after an earlier row of "
                    "their key was refused: they went out ahead of it (marked sent)",
                    ahead,
                )
            if held:
                await self.store.release(self.relay_id, held)
            records = failed
            if not records:
                return confirmed
            reason = safe_text(f"{type(error).__name__}: {refused[records[0].message_id]}", 2000)
        else:
            reason = safe_text(f"{type(error).__name__}: {error}", 2000)
        attempts = max(r.attempts for r in records) + 1
        park = [r.seq for r in records if r.attempts + 1 >= self.max_attempts]
        retry = [r.seq for r in records if r.attempts + 1 < self.max_attempts]
        # an error that is not msdata's (a TypeError, say) is a bug somewhere: its traceback
        trace = None if isinstance(error, MsdataError) else error
        if park:
            why = f"publish failed {self.max_attempts} times; last error: {reason}"
            await self.store.park(self.relay_id, park, why)
            log.error("outbox rows %s parked: %s", park, why, exc_info=trace)
        if retry:
            retry_at = self.clock.now() + timedelta(seconds=self.backoff(attempts))
            await self.store.retry_later(self.relay_id, retry, reason, retry_at)
            log.warning(
                "publishing %d outbox rows failed (attempt %d), retrying at %s: %s",
                len(retry),
                attempts,
                retry_at.isoformat(),
                reason,
                exc_info=trace,
            )
        return confirmed

    # -- running in the background -------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Run the relay in a background task until :meth:`stop`.

        Checks the store's schema first: raises :class:`~msdata.errors.SchemaError` (naming
        the missing table; run ``create_schema()``) if it is missing. Any other store error
        here is left to the loop, which retries it with back-off. The check is the store's
        ``check_schema()`` where it has one (a look at the tables, whatever the backlog),
        else ``status()`` (which counts the pending rows)."""
        if self.running:
            return
        check = getattr(self.store, "check_schema", None)
        try:
            await (check() if check is not None else self.store.status())
        except SchemaError:
            raise
        except Exception:
            log.warning("outbox relay %s: store not reachable at start", self.relay_id)
        self._stopping = False
        self._task = asyncio.create_task(self._loop(), name=f"outbox-relay-{self.relay_id}")

    async def stop(self, timeout: float | None = None) -> None:
        """Stop after the batch in hand is published and marked; after ``timeout`` seconds
        (default ``stop_timeout``) cancel it instead, which releases its rows."""
        task = self._task
        if task is None:
            return
        self._stopping = True
        if self._idle:
            task.cancel()
        await asyncio.wait({task}, timeout=self.stop_timeout if timeout is None else timeout)
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
        self._task = None
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]

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

    async def _loop(self) -> None:
        streak = 0
        # Pipelined. With a store that hands a relay the later rows of the keys it holds
        # (``prefetch_claims``), the next batch is claimed while this one is published,
        # and its rows of keys that fail here are handed back. The rows published by the
        # batch before are marked sent in the same store call as that claim
        # (``mark_sent_and_claim``: one transaction, one hop or round trip per batch).
        prefetch = self.prefetch
        claiming: asyncio.Future[Claimed] | None = None
        claiming_marks: list[int] = []  # what ``claiming`` marks sent along with its claim
        to_mark: list[int] = []  # published, not yet (being) marked
        stuck: dict[str, int] = {}
        try:
            while not self._stopping:
                failed = False
                try:
                    if claiming is not None:
                        try:
                            records = await asyncio.shield(claiming)
                        except BaseException:
                            to_mark = claiming_marks + to_mark  # marking again is harmless
                            raise
                        finally:
                            if claiming.done():
                                claiming, claiming_marks = None, []
                    else:
                        marks, to_mark = to_mark, []
                        try:
                            records = await self._claim(marks)
                        except BaseException:
                            to_mark = marks + to_mark  # marking again is harmless
                            raise
                    if not records:
                        stuck = {}
                        if to_mark:
                            continue  # mark them (and look again) at once
                        if self.retention is not None:
                            await self._maybe_purge()
                        await self._idle_for(self.store.wait_for_rows(self.poll_interval))
                        continue
                    if prefetch:
                        claiming_marks, to_mark = to_mark, []
                        # (started at once: it reaches the store before this batch publishes)
                        claiming = self._claim_ahead(claiming_marks)
                    sent, failed, stuck = await self._handle(records, stuck)
                    self._note_outage(bool(sent))
                    if not prefetch:
                        stuck = {}
                    to_mark.extend(sent)
                    if failed and to_mark:
                        # about to back off: do not sit on published rows past their lease
                        marks, to_mark = to_mark, []
                        await self._shielded(self._mark(marks))
                    if self.retention is not None:  # (no coroutine per batch without one)
                        await self._maybe_purge()
                except SchemaError as e:  # one line: the traceback says nothing more
                    log.error("outbox relay %s: %s", self.relay_id, e)
                    failed = True
                except Exception as e:
                    if _database_busy(e):
                        # SQLite's single writer: the service's own transactions (a burst of
                        # handlers, say) hold the write lock past the busy timeout. Not a
                        # fault: back off and try again, one line, no traceback
                        log.warning(
                            "outbox relay %s: the database is busy (another transaction "
                            "holds its write lock); trying again in a moment: %s",
                            self.relay_id,
                            safe_text(str(e), 300),
                        )
                    else:
                        log.exception("outbox relay %s: step failed", self.relay_id)
                    failed = True
                if failed:
                    streak += 1
                    await self._idle_for(self._sleep(self.backoff(streak)))
                else:
                    streak = 0
        finally:
            await self._wind_down(claiming, claiming_marks, to_mark)

    def _note_outage(self, published: bool) -> None:
        """One WARNING when the transport fails as a whole, one INFO when it works again."""
        error, self._outage = self._outage, None
        if error is not None:
            if not self._in_outage:
                self._in_outage = True
                log.warning(
                    "outbox relay %s: the transport is failing; backing off, rows not counted "
                    "as attempts until it recovers: %s",
                    self.relay_id,
                    safe_text(f"{type(error).__name__}: {error}", 500),
                )
        elif published and self._in_outage:
            self._in_outage = False
            log.info("outbox relay %s: the transport recovered; publishing again", self.relay_id)

    def _claim_call(self, marks: list[int]) -> Coroutine[Any, Any, Claimed]:
        store = self.store
        # optional (see ``OutboxRelayStore``), looked up on the class: a wrapper that
        # overrides ``claim`` and forwards the rest through ``__getattr__`` keeps its claim
        fast = getattr(type(store), "claim_messages", None)
        if fast is not None:  # the store's fast path (messages, no records)
            return fast(  # type: ignore[no-any-return]
                store,
                self.relay_id,
                marks,
                self.batch_size,
                self.lease_seconds,
                keep=self.retention is not None,
            )
        if marks:
            return store.mark_sent_and_claim(
                self.relay_id,
                marks,
                self.batch_size,
                self.lease_seconds,
                keep=self.retention is not None,
            )
        return store.claim(self.relay_id, self.batch_size, self.lease_seconds)

    def _claim_ahead(self, marks: list[int]) -> asyncio.Future[Claimed]:
        """Start a claim now (marking ``marks`` sent first); awaited later through a
        shield, so a cancellation of the relay never loses its rows (``_wind_down``
        finishes the mark and releases them)."""
        return _eager(self._claim_call(marks))

    async def _wind_down(
        self,
        claiming: asyncio.Future[Claimed] | None,
        claiming_marks: list[int],
        to_mark: list[int],
    ) -> None:
        """Leaving the loop: finish the mark in flight and mark what was published (those
        rows went out), and release a batch claimed ahead."""
        records: Claimed = []
        if claiming is not None:
            try:
                records = await claiming
            except BaseException:
                to_mark = claiming_marks + to_mark
        if to_mark:
            try:
                await self._shielded(self._mark(to_mark))
            except Exception:
                log.exception("outbox relay %s: marking sent rows failed", self.relay_id)
        if records:
            try:
                await self.store.release(self.relay_id, _claimed_seqs(records))
            except Exception:
                log.exception("could not release outbox rows on stop")
        leave = getattr(self.store, "leave", None)
        if leave is not None:
            # a store whose relays own partitions hands them to the others at once
            try:
                await self._shielded(leave(self.relay_id))
            except Exception:
                log.exception("outbox relay %s: leaving failed", self.relay_id)

    async def _sleep(self, seconds: float) -> None:
        await self.clock.sleep(seconds)

    async def _idle_for(self, aw: Coroutine[Any, Any, None]) -> None:
        if self._stopping:
            aw.close()
            return
        self._idle = True
        try:
            await aw
        finally:
            self._idle = False

    async def _maybe_purge(self) -> None:
        if self.retention is None:
            return
        now = self.clock.monotonic()
        if now >= self._next_purge:
            self._next_purge = now + self.purge_interval
            await self.purge()

    # -- operating it --------------------------------------------------------------------

    async def status(self) -> OutboxStatus:
        """Pending rows, the age of the oldest in seconds (the lag), parked rows."""
        return await self.store.status()

    async def parked(self, limit: int = 100) -> list[OutboxRecord]:
        """Parked rows, oldest first, each with ``last_error``."""
        return await self.store.parked(limit)

    async def requeue(self, seqs: Sequence[int] | None = None) -> int:
        """Make parked rows pending again (all of them when ``seqs`` is None)."""
        if seqs is not None:
            return await self.store.requeue(seqs)
        total = 0
        while batch := await self.store.parked(1000):
            n = await self.store.requeue([r.seq for r in batch])
            total += n
            if n == 0:
                break
        return total

    async def purge(self) -> int:
        """Delete sent rows older than ``retention`` (nothing when there is no retention)."""
        if self.retention is None:
            return 0
        try:
            return await self.store.purge_sent(self.clock.now() - self.retention)
        except MsdataError:
            log.exception("outbox relay %s: purge failed", self.relay_id)
            return 0


def _database_busy(e: BaseException) -> bool:
    """Whether ``e`` (or an error it was raised from) says the database's write lock is
    held by another connection: SQLite's ``SQLITE_BUSY`` ("database is locked"), raw or
    as the SQLite adapter's ``DatabaseBusy``, which is raised from it."""
    import sqlite3

    seen = 0
    err: BaseException | None = e
    while err is not None and seen < 5:
        if isinstance(err, sqlite3.OperationalError) and (
            getattr(err, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY
            or "database is locked" in str(err)
        ):
            return True
        err = err.__cause__
        seen += 1
    return False


def _eager(coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """``coro`` run at once, in a copy of the current context as a task would run it,
    until it first waits: a future already done when it finished without waiting (a
    SQLite store call run inline: no task made, no turn of the event loop, ~30 µs less
    per batch), else a task that carries it on from there."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    try:
        waiting = context.run(coro.send, None)
    except StopIteration as stop:
        done: asyncio.Future[T] = loop.create_future()
        done.set_result(stop.value)
        return done
    except (KeyboardInterrupt, SystemExit):
        raise
    except asyncio.CancelledError:
        cancelled: asyncio.Future[T] = loop.create_future()
        cancelled.cancel()
        return cancelled
    except BaseException as e:
        failed: asyncio.Future[T] = loop.create_future()
        failed.set_exception(e)
        return failed
    return loop.create_task(_carry_on(coro, waiting), context=context)


@types.coroutine
def _carry_on(coro: Coroutine[Any, Any, T], waiting: Any) -> Generator[Any, Any, T]:
    """The rest of ``coro``, which waits on ``waiting`` (what it yielded): every value or
    exception the task sends in goes on to ``coro``, as ``await`` would pass it."""
    while True:
        try:
            value = yield waiting
        except BaseException as e:
            try:
                waiting = coro.throw(e)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
        else:
            try:
                waiting = coro.send(value)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
