"""The saga orchestrator: runs instances step by step, persisting each one before every
step's effect, compensating in reverse on failure, and recovering what a dead process left.

::

    orchestrator = SagaOrchestrator(store, [checkout], bus=bus, outbox=outbox)
    async with bus, relay, orchestrator:             # replies, the outbox, recovery
        done = await orchestrator.run(checkout, Order(order_id="o-1", ...))
        assert done.status is SagaStatus.COMPLETED

How an instance moves (DESIGN.md, guarantee 4):

- Before a step's effect, the instance is saved with that step marked ``running`` (local) or
  ``waiting`` (remote, with the command added to the outbox in the same transaction); each
  save is version-checked and renews the orchestrator's lease on the instance.
- A step that raises (or whose participant replies with a failure, or does not reply within
  the step's timeout) is retried by its policy; then the completed compensatable steps are
  compensated in reverse order (a parallel group as a group). A compensation is retried by
  its policy; one that still fails leaves the instance FAILED, with the error, for an
  operator (:meth:`SagaOrchestrator.retry`).
- A cancelled task (shutdown, SIGTERM) is not a failure: the instance stays as it was saved,
  RUNNING or COMPENSATING, and a recovery worker continues it once its lease has expired.
- Replies are correlated by saga id, step and purpose. A success from any attempt of the
  step invocation the instance waits on (for a reply, or for its next attempt) is the
  step's success: all attempts share one idempotency key. A failure counts only for the
  attempt it answers. Any other reply (a step or purpose the instance no longer waits on, a
  duplicate) is recorded in the history and otherwise ignored; what is applied is applied
  once, by a version-checked save.
- Each attempt of a compensation has a timeout (``compensation_timeout``, default the
  step's ``timeout``) and the attempts are bounded by the compensation's retry policy:
  then the instance is FAILED, for an operator, never COMPENSATING for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from types import CoroutineType, TracebackType
from typing import Any, Self, TypeVar, cast

from pydantic import BaseModel, ValidationError

from msdata import telemetry
from msdata.backoff import exponential_backoff
from msdata.clock import SYSTEM_CLOCK, Clock, SystemClock
from msdata.errors import (
    ConcurrencyError,
    ConfigurationError,
    EncodeError,
    SagaDataError,
    SagaNotFound,
    SagaStateError,
)
from msdata.events import EventBus
from msdata.ids import new_id
from msdata.messages import Envelope, make_envelope, safe_text
from msdata.outbox import Outbox
from msdata.saga.definition import Remote, Retry, Saga, Step, StepKind
from msdata.saga.messages import (
    ACTION,
    COMPENSATION,
    HEADER_ATTEMPT,
    HEADER_PURPOSE,
    HEADER_REPLY_TO,
    HEADER_SAGA_ID,
    HEADER_SAGA_TYPE,
    HEADER_STEP,
    IDEMPOTENCY_KEY_HEADER,
    SagaReply,
    StepContext,
    _step,
    idempotency_key,
)
from msdata.saga.store import (
    ACTIVE_STATUSES,
    HistoryEntry,
    SagaRecord,
    SagaStatus,
    SagaStore,
    StepRun,
    check_data,
    check_data_value,
)
from msdata.telemetry import Telemetry
from msdata.transport import is_utf8

__all__ = ["MAX_SAGA_ID", "SagaOrchestrator", "check_saga_id"]

log = logging.getLogger("msdata.saga")

D = TypeVar("D", bound=BaseModel)

RUNNING = SagaStatus.RUNNING
COMPENSATING = SagaStatus.COMPENSATING
TERMINAL = (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED)

_DONE, _FAILED, _PARKED, _HALTED = 0, 1, 2, 3
_FINAL = {s: s.value.lower() for s in SagaStatus}
_entry = tuple.__new__  # a named tuple built from a full tuple: no Python-level __new__
_Coroutine = CoroutineType
_utc_now = partial(datetime.now, UTC)  # SystemClock.now without its Python frame


class SagaOrchestrator:
    """Runs the sagas registered with it on ``store``.

    ``bus`` and ``outbox`` are needed for remote steps: commands go to ``outbox`` (whose
    store must live in the same database as ``store``, so the command and the state commit
    together; an :class:`msdata.outbox.OutboxRelay` publishes them) and replies come back on
    ``reply_topic`` to consumer group ``reply_group`` of ``bus`` (subscribed here: build the
    orchestrator before starting the bus). ``lease_seconds``: how long an instance stays
    with this orchestrator after each save; it must exceed the longest local step (a step
    running longer may be run again by a recovery worker). ``owner``: this orchestrator's
    name in leases (default: a fresh id).
    """

    def __init__(
        self,
        store: SagaStore,
        sagas: Iterable[Saga[Any]] = (),
        *,
        bus: EventBus | None = None,
        outbox: Outbox | None = None,
        clock: Clock = SYSTEM_CLOCK,
        lease_seconds: float = 30.0,
        owner: str | None = None,
        reply_topic: str | None = None,
        reply_group: str = "saga-orchestrator",
        recovery_interval: float = 5.0,
    ) -> None:
        if not lease_seconds > 0:
            raise ConfigurationError("lease_seconds must be > 0")
        self.store = store
        self.bus = bus
        self.outbox = outbox
        self.clock = clock
        self.lease = timedelta(seconds=lease_seconds)
        self.owner = owner or f"saga-{new_id()}"
        self.reply_topic = reply_topic or (
            f"{outbox.source}.saga-replies" if outbox is not None else "msdata.saga-replies"
        )
        self.recovery_interval = recovery_interval
        self._async_conn = store.features.async_connection
        self._sagas: dict[str, Saga[Any]] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._mailbox: dict[str, list[SagaReply]] = {}
        self._driving: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._recovery: asyncio.Task[None] | None = None
        if bus is not None:
            bus.subscribe(SagaReply, self._on_reply, group=reply_group, topic=self.reply_topic)
        for saga in sagas:
            self.register(saga)

    def register(self, saga: Saga[Any]) -> None:
        """Run instances of ``saga`` (by its name). Checks it has steps, and that remote
        steps have a bus and an outbox to use."""
        saga.check()
        if any(
            isinstance(s.action, Remote) or isinstance(s.compensation, Remote)
            for s in saga.steps.values()
        ) and (self.bus is None or self.outbox is None):
            raise ConfigurationError(
                f"saga {saga.name!r} has remote steps: give the orchestrator bus= and outbox="
            )
        other = self._sagas.get(saga.name)
        if other is not None and other is not saga:
            raise ConfigurationError(f"another saga named {saga.name!r} is registered")
        saga.freeze()
        self._sagas[saga.name] = saga

    # -- running -----------------------------------------------------------------------------

    async def start(self, saga: Saga[D], data: D, *, saga_id: str | None = None) -> SagaRecord:
        """Start an instance and run it here until it ends or waits for a remote reply.
        Returns the instance as it stands then. Cancelling the caller leaves it RUNNING
        (resumable by a recovery worker), never compensating.

        ``saga_id``: a fresh id when None, else checked by :func:`check_saga_id`
        (:class:`msdata.errors.EncodeError`). Raises :class:`msdata.errors.EncodeError`,
        before anything is stored, for ``data`` JSON cannot hold (a NaN or infinite float,
        a lone surrogate: :func:`msdata.saga.store.data_json`), ConfigurationError for data
        of another type, SagaStateError if an instance with that id exists."""
        if self._sagas.get(saga.name) is not saga:
            self.register(saga)
        if not isinstance(data, saga.data_type):
            raise ConfigurationError(
                f"saga {saga.name!r} takes {saga.data_type.__name__}, got {type(data).__name__}"
            )
        if saga_id is None:
            saga_id = new_id()
        else:
            check_saga_id(saga_id)
        clock = self.clock
        now = _utc_now() if type(clock) is SystemClock else clock.now()
        rec = SagaRecord(
            saga_id,
            saga.name,
            RUNNING,
            data,
            now,
            now,
            0,
            0,
            [],
            {},
            [],
            saga.past_pivot_by_position[0],
            None,
            None if saga.deadline is None else now + timedelta(seconds=saga.deadline),
            None,
            None,
            None,
            [_entry(HistoryEntry, (now, "started", None, None, None))],
        )
        check_data(rec)  # EncodeError before anything is stored: NaN, a lone surrogate...
        hooks = telemetry.hooks
        if type(hooks) is not Telemetry:  # the no-op's hook does nothing: not called
            hooks.saga_status(saga.name, "started")  # telemetry
        await self._drive(rec, saga, now)
        return rec

    async def run(
        self, saga: Saga[D], data: D, *, saga_id: str | None = None, timeout: float | None = None
    ) -> SagaRecord:
        """:meth:`start`, then :meth:`wait` until the instance is COMPLETED, COMPENSATED or
        FAILED.

        ``timeout`` (seconds of real time) bounds only the :meth:`wait`, not :meth:`start`:
        the steps that run in this call before the instance first waits (local steps, the
        saving of remote commands) are bounded by each step's own ``timeout=``, not by this
        one. On ``TimeoutError`` the instance goes on (here or in a recovery worker); it is
        neither cancelled nor compensated."""
        rec = await self.start(saga, data, saga_id=saga_id)
        if rec.status in TERMINAL:
            return rec
        return await self.wait(rec.saga_id, timeout=timeout)

    async def wait(
        self, saga_id: str, *, timeout: float | None = None, poll: float = 0.5
    ) -> SagaRecord:
        """Wait until the instance is COMPLETED, COMPENSATED or FAILED (whichever process
        runs it; checked every ``poll`` seconds of real time); returns it. Raises
        ``TimeoutError`` after ``timeout`` seconds of real time, SagaNotFound if unknown."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(saga_id, []).append(fut)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                rec = await self.get(saga_id)
                if rec.status in TERMINAL:
                    return rec
                left = poll if deadline is None else min(poll, deadline - time.monotonic())
                if left <= 0:
                    raise TimeoutError(f"saga {saga_id} is still {rec.status} after {timeout} s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(fut), left)
        finally:
            waiters = self._waiters.get(saga_id)
            if waiters is not None:
                if fut in waiters:
                    waiters.remove(fut)
                if not waiters:
                    del self._waiters[saga_id]

    # -- operations --------------------------------------------------------------------------

    async def get(self, saga_id: str) -> SagaRecord:
        """One instance, its data validated as its saga's model when the saga is registered
        here (else as the store gave it: a model or its JSON dict; :meth:`find` and
        :meth:`stuck` do the same). Raises :class:`SagaNotFound` (also for an id no
        instance can have: :func:`check_saga_id`), and
        :class:`msdata.errors.SagaDataError` when the stored data no longer validates as
        the model (saved by a release whose model differed)."""
        rec = await self._stored(saga_id)
        saga = self._sagas.get(rec.saga_type)
        if saga is not None:
            self._load(rec, saga)
        return rec

    async def _stored(self, saga_id: str) -> SagaRecord:
        """``store.get``, with an id no instance can have (:func:`check_saga_id` refuses
        it) answered SagaNotFound by every store alike (one would raise a driver error)."""
        if type(saga_id) is not str or not saga_id.isascii() or not saga_id.isprintable():
            try:
                check_saga_id(saga_id)
            except EncodeError as e:
                raise SagaNotFound(
                    f"no saga instance {safe_text(repr(saga_id), 80)}: {e}"
                ) from None
        return await self.store.get(saga_id)

    async def history(self, saga_id: str) -> list[HistoryEntry]:
        """What happened to one instance, oldest first, with times and errors."""
        return (await self._stored(saga_id)).history

    async def find(
        self,
        *,
        saga_type: str | None = None,
        status: SagaStatus | Sequence[SagaStatus] | None = None,
        limit: int = 100,
    ) -> list[SagaRecord]:
        """Instances by saga type and status, least recently updated first. As with
        :meth:`get`, each one's ``data`` is validated as its saga's model when the saga is
        registered here (else it is left as the store gave it: a model or its JSON dict).
        An instance whose stored data no longer validates (see :meth:`get`) is listed with
        ``data`` as stored (its JSON dict) and the reason in ``error`` (``unreadable data:
        ...``), and logged; it never hides the others."""
        statuses = [status] if isinstance(status, SagaStatus) else status
        return self._typed(
            await self.store.find(saga_type=saga_type, statuses=statuses, limit=limit)
        )

    def _typed(self, records: list[SagaRecord]) -> list[SagaRecord]:
        sagas = self._sagas
        for rec in records:
            saga = sagas.get(rec.saga_type)
            if saga is not None:
                try:
                    self._load(rec, saga)
                except SagaDataError as e:
                    log.warning("%s; listed with its data as stored", e)
                    why = f"unreadable data: {e}"
                    rec.error = why if rec.error is None else f"{rec.error}; {why}"
        return records

    async def stuck(self, *, saga_type: str | None = None, limit: int = 100) -> list[SagaRecord]:
        """Instances that need attention: RUNNING/COMPENSATING ones nobody holds a live
        lease on and whose wake time has passed (a recovery worker would take them), then
        FAILED ones. ``data`` typed as in :meth:`find`. ``msdata sagas list --stuck`` lists
        the same."""
        active = await self.store.find(saga_type=saga_type, stuck_at=self.clock.now(), limit=limit)
        failed = await self.store.find(
            saga_type=saga_type, statuses=[SagaStatus.FAILED], limit=limit
        )
        return self._typed((active + failed)[:limit])

    async def retry(self, saga_id: str) -> SagaRecord:
        """Resume a FAILED instance: its failed compensations (or its failed retriable
        step) start again with fresh attempts, numbered after every attempt the step had
        (its history), so a participant that stored a refusal for an earlier attempt runs
        its handler again; the retry policy counts from there. Runs it here until it ends
        or waits.
        Raises :class:`SagaStateError` unless it is FAILED."""
        rec = await self._stored(saga_id)
        saga = self._saga_of(rec)
        if rec.status is not SagaStatus.FAILED:
            raise SagaStateError(f"saga {saga_id} is {rec.status}; only a FAILED one is retried")
        self._apply_recorded(rec)  # late: noted as ignored (the save deletes them)
        rec.status = COMPENSATING if rec.compensation else RUNNING
        # fresh attempts, numbered after every attempt the step had: a participant that
        # stored a failure for an earlier number runs its handler again (a redelivery of
        # an attempt it answered gets the stored answer)
        if rec.compensation:
            purpose, names = COMPENSATION, rec.compensation[0]
        else:
            group = saga.groups[rec.position] if rec.position < len(saga.groups) else []
            purpose, names = ACTION, [s.name for s in group if s.name not in rec.done]
        used: dict[str, int] = {}
        for h in rec.history:
            if h.step is not None and h.attempt is not None and h.attempt > used.get(h.step, 0):
                used[h.step] = h.attempt
        nxt = {name: used.get(name, 0) + 1 for name in names}
        rec.active = {name: StepRun(purpose, n, "new", first=n) for name, n in nxt.items()}
        rec.error = None
        self._log(rec, "retried by operator")
        self._load(rec, saga)
        await self._drive(rec, saga)
        return rec

    async def abort(self, saga_id: str, reason: str = "aborted by operator") -> SagaRecord:
        """Turn a RUNNING instance before its pivot into compensation. Raises
        :class:`SagaStateError` if it is not RUNNING, is past its pivot, or is in the middle
        of a local step in another process (try again)."""
        rec = await self._stored(saga_id)
        saga = self._saga_of(rec)
        if rec.status is not RUNNING:
            raise SagaStateError(f"saga {saga_id} is {rec.status}; only a RUNNING one is aborted")
        if rec.past_pivot:
            raise SagaStateError(f"saga {saga_id} is past its pivot and can no longer be undone")
        if _pivot_sent(rec, saga):
            # the pivot's command is out: it may take effect whatever we do now, and a pivot
            # is never compensated, so aborting would leave its effect behind a COMPENSATED saga
            raise SagaStateError(
                f"saga {saga_id} has sent its pivot's command; it may still take effect, so "
                "it can no longer be aborted (it completes, or waits for the pivot's answer)"
            )
        now = self.clock.now()
        if rec.lease_owner is not None and rec.lease_until is not None and rec.lease_until > now:
            raise SagaStateError(
                f"saga {saga_id} is running a step in {rec.lease_owner} (lease until "
                f"{rec.lease_until.isoformat()}); try again"
            )
        self._apply_recorded(rec)  # what they answered counts (a refusal: nothing to undo)
        self._load(rec, saga)
        self._begin_compensation(rec, saga, f"aborted: {reason}")
        await self._drive(rec, saga)
        return rec

    # -- recovery ----------------------------------------------------------------------------

    async def recover(self, limit: int = 100) -> int:
        """Claim up to ``limit`` RUNNING/COMPENSATING instances whose lease expired (and
        whose reply deadline or retry time has come) and continue each one; returns how
        many were claimed. Safe to run in several processes at once."""
        now = self.clock.now()
        claimed = await self.store.claim(self.owner, now, now + self.lease, limit)
        runs: list[tuple[SagaRecord, Saga[Any]]] = []
        for rec in claimed:
            saga = self._sagas.get(rec.saga_type)
            if saga is None:
                log.error("saga %s: type %r is not registered here", rec.saga_id, rec.saga_type)
                continue
            try:
                self._load(rec, saga)
            except SagaDataError as e:  # one unreadable instance never blocks the others
                await self._set_aside(rec, e, now)
                continue
            self._log(rec, "resumed", detail=f"by {self.owner}")
            self._apply_recorded(rec)
            runs.append((rec, saga))
        if runs:  # coroutines made only here: none is left unawaited if the loop raised
            await asyncio.gather(*(self._drive_logged(rec, saga) for rec, saga in runs))
        return len(claimed)

    async def _set_aside(self, rec: SagaRecord, error: SagaDataError, now: datetime) -> None:
        """A claimed instance whose data does not validate: logged, its lease released and
        looked at again after ``lease_seconds`` (a release whose model reads it continues
        it); its history says why (once, not on every look). Its recorded replies stay."""
        why = str(error)
        last = rec.history[-1] if rec.history else None
        first = last is None or last.event != "unreadable" or last.detail != why
        log.log(
            logging.ERROR if first else logging.INFO,
            "%s; set aside, looked at again in %s s",
            error,
            self.lease.total_seconds(),
        )
        if first:
            self._log(rec, "unreadable", detail=why)
        rec.replies = {}  # not applied: they stay recorded for when it can be read
        rec.lease_owner = rec.lease_until = None
        rec.wake_at = now + self.lease
        try:
            await self._save(rec)
        except ConcurrencyError:
            pass
        except Exception:
            log.exception("saga %s: could not set it aside", rec.saga_id)

    async def run_recovery(self) -> None:
        """:meth:`recover` every ``recovery_interval`` seconds (on the clock) until
        cancelled; an error is logged and the loop goes on."""
        while True:
            try:
                await self.recover()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("saga recovery failed; trying again")
            await self.clock.sleep(self.recovery_interval)

    async def __aenter__(self) -> Self:
        self._recovery = asyncio.create_task(self.run_recovery(), name="msdata-saga-recovery")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the recovery worker and the tasks continuing instances here; they stay
        RUNNING/COMPENSATING in the store, for a recovery worker to continue."""
        tasks = [*self._tasks, *([self._recovery] if self._recovery else [])]
        self._recovery = None
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- replies -----------------------------------------------------------------------------

    async def _on_reply(self, reply: SagaReply) -> None:
        for _ in range(20):
            try:
                rec = await self._stored(reply.saga_id)
            except SagaNotFound:
                log.warning(
                    "reply for unknown saga %s (step %s) ignored", reply.saga_id, reply.step
                )
                return
            saga = self._sagas.get(rec.saga_type)
            if saga is None:
                log.warning("reply for saga %s of unregistered type %r", rec.saga_id, rec.saga_type)
                return
            if rec.saga_id in self._driving:  # this process runs it now: hand the reply over
                await self._hand_over(rec, reply)
                return
            now = self.clock.now()
            until = rec.lease_until
            if rec.lease_owner is not None and until is not None and until > now:
                # another process holds it (it runs a step, or died holding it): record the
                # reply on the instance for the next holder, and ack; no redelivery, no
                # dead letter however long the lease
                if not self._accept(rec, reply):  # on a copy: nothing is saved here
                    log.info(
                        "late or duplicate reply for saga %s step %s ignored",
                        rec.saga_id,
                        reply.step,
                    )
                    return
                await self.store.add_reply(
                    rec.saga_id, _reply_key(reply), reply.model_dump_json().encode()
                )
                log.info(
                    "saga %s is held by %s until %s: its reply for step %s (%s, attempt %d) "
                    "is recorded for the next holder",
                    rec.saga_id,
                    rec.lease_owner,
                    until.isoformat(),
                    reply.step,
                    reply.purpose,
                    reply.attempt,
                )
                self._spawn(self._after_lease(rec.saga_id))
                return
            try:
                await self._apply_and_drive(rec, saga, now, reply)
            except ConcurrencyError:
                continue
            return
        log.warning(
            "reply for saga %s step %s: gave up after repeated conflicts", reply.saga_id, reply.step
        )

    async def _hand_over(self, rec: SagaRecord, reply: SagaReply) -> None:
        """Give ``reply`` to the task of this process that drives the instance. A reply
        the instance waits for is first recorded in the store (``add_reply``), so it is
        durable before its delivery is acked: if this process dies before the driver's next
        save, the next holder applies it from the record (that save deletes it, by its key,
        once applied). ``rec``: the instance as stored (a copy, only looked at)."""
        key = _reply_key(reply)
        body = reply.model_dump_json().encode()
        if self._accept(rec, reply):  # on the stored copy: a late one needs no record
            await self.store.add_reply(rec.saga_id, key, body)
        if rec.saga_id in self._driving:
            self._mailbox.setdefault(rec.saga_id, []).append(reply)
        else:  # the driver ended while the reply was being recorded: apply it from there
            self._spawn(self._after_lease(rec.saga_id))

    async def _apply_and_drive(
        self, rec: SagaRecord, saga: Saga[Any], now: datetime, reply: SagaReply | None = None
    ) -> None:
        """Apply the instance's recorded replies (and ``reply``) to ``rec``, which nobody
        holds. If one is taken, take the instance and continue it in a task here; else save
        the history of the ignored ones (the save deletes the recorded ones). Raises
        ConcurrencyError if another process wrote it meanwhile. An instance whose data does
        not validate (SagaDataError) is left as it is, ``reply`` recorded on it for when
        it can be read (a recovery worker sets it aside meanwhile)."""
        try:
            self._load(rec, saga)
        except SagaDataError as e:
            if reply is not None and self._accept(rec.copy(), reply):
                await self.store.add_reply(
                    rec.saga_id, _reply_key(reply), reply.model_dump_json().encode()
                )
            log.error("%s; a reply for it is kept recorded until it can be read", e)
            return
        taken = self._apply_recorded(rec)
        if (
            reply is not None
            and _reply_key(reply) not in rec.replies  # recorded: applied just above
            and self._accept(rec, reply)
        ):
            taken = True
        if not taken or rec.status not in ACTIVE_STATUSES:
            if reply is not None or rec.replies:
                await self._save(rec)
            return
        self._take(rec, now)
        await self._save(rec)
        self._load(rec, saga)
        self._spawn(self._drive_logged(rec, saga))

    def _apply_recorded(self, rec: SagaRecord) -> bool:
        """Apply the replies recorded on ``rec`` while another process held it (the save
        that follows deletes them from the store). True if one of them was taken."""
        taken = False
        for body in rec.replies.values():
            try:
                reply = SagaReply.model_validate_json(body)
            except ValidationError as e:  # written by another version: cannot be applied
                log.warning("saga %s: a recorded reply does not validate: %s", rec.saga_id, e)
                continue
            if self._accept(rec, reply):
                taken = True
        return taken

    async def _after_lease(self, saga_id: str) -> None:
        """After recording a reply for an instance another process held: look again, more
        and more slowly, until nobody holds it, then apply what was recorded and continue
        it here. Gives up after twice the lease (a holder that keeps renewing it): the
        recorded replies then make the instance claimable by any recovery worker as soon as
        its lease is free."""
        delay = 0.01
        give_up = self.clock.now() + 2 * self.lease
        while True:
            try:
                rec: SagaRecord | None = await self.store.get(saga_id)
            except SagaNotFound:
                return
            except Exception:
                log.exception("saga %s: could not look at its recorded replies", saga_id)
                rec = None
            now = self.clock.now()
            if rec is not None:
                if not rec.replies:
                    return  # another holder applied them
                saga = self._sagas.get(rec.saga_type)
                if saga is None:
                    return
                until = rec.lease_until
                if until is not None and until > now and rec.lease_owner is not None:
                    delay = min(delay, max((until - now).total_seconds(), 0.001))
                elif saga_id not in self._driving:
                    try:
                        await self._apply_and_drive(rec, saga, now)
                        return
                    except ConcurrencyError:
                        continue  # another process took it meanwhile: look again
                    except Exception:
                        log.exception("saga %s: applying its recorded replies failed", saga_id)
            if now >= give_up:
                log.info(
                    "saga %s: still held after %s s; its recorded replies wait for the next "
                    "holder or a recovery worker",
                    saga_id,
                    2 * self.lease.total_seconds(),
                )
                return
            await self.clock.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _accept(self, rec: SagaRecord, reply: SagaReply) -> bool:
        """Record ``reply`` on ``rec`` if the instance waits for it (a success from any
        attempt of the invocation it waits on, a failure from the pending attempt); else note
        it ignored. True when recorded. A reply naming another saga type is refused
        (logged, noted in the history): forged or misrouted."""
        if reply.saga_type != rec.saga_type:
            log.warning(
                "saga %s: a reply for step %s names saga type %s, not %s; refused",
                rec.saga_id,
                safe_text(reply.step, 80),
                safe_text(repr(reply.saga_type), 80),
                rec.saga_type,
            )
            self._log(
                rec,
                "reply ignored",
                reply.step,
                reply.attempt,
                f"for saga type {safe_text(repr(reply.saga_type), 80)}, not {rec.saga_type!r}",
            )
            return False
        run = rec.active.get(reply.step)
        wanted = RUNNING if reply.purpose == ACTION else COMPENSATING
        if (
            run is not None
            and rec.status is wanted
            and run.purpose == reply.purpose
            and run.sent
            and (
                # every attempt carries the invocation's one idempotency key, so a success
                # from any attempt is the step's success: accepted while the instance waits
                # for a reply or for its next attempt
                (reply.ok and run.state in ("waiting", "retry"))
                # a refusal counts only for the attempt it answers (a later attempt may
                # still take effect; a timed-out attempt was already counted as failed)
                or (run.state == "waiting" and reply.attempt == run.attempt)
            )
        ):
            run.state = "replied"
            run.ok = reply.ok
            run.reply = reply.data
            run.error = None if reply.ok else (reply.reason or "failed")
            self._log(
                rec,
                "reply",
                reply.step,
                reply.attempt,
                ("ok" + (" (duplicate)" if reply.duplicate else "")) if reply.ok else run.error,
            )
            return True
        self._log(
            rec,
            "reply ignored",
            reply.step,
            reply.attempt,
            f"{reply.purpose} {'ok' if reply.ok else 'failed'}: late or duplicate",
        )
        return False

    # -- the engine --------------------------------------------------------------------------

    def _saga_of(self, rec: SagaRecord) -> Saga[Any]:
        saga = self._sagas.get(rec.saga_type)
        if saga is None:
            raise SagaStateError(f"saga type {rec.saga_type!r} is not registered here")
        return saga

    @staticmethod
    def _load(rec: SagaRecord, saga: Saga[Any]) -> None:
        """Type ``rec.data`` as the saga's model. Raises SagaDataError if it does not
        validate (stored by a release whose model differed)."""
        if not isinstance(rec.data, saga.data_type):
            try:
                rec.data = saga.data_type.model_validate(rec.data)
            except ValidationError as e:
                raise SagaDataError(
                    f"saga {rec.saga_id} ({rec.saga_type}): its stored data does not validate "
                    f"as {saga.data_type.__name__}: {e.error_count()} error(s): "
                    f"{_first_error(e)}"
                ) from e

    def _log(
        self,
        rec: SagaRecord,
        event: str,
        step: str | None = None,
        attempt: int | None = None,
        detail: str | None = None,
    ) -> None:
        rec.history.append(_entry(HistoryEntry, (self.clock.now(), event, step, attempt, detail)))

    def _take(self, rec: SagaRecord, now: datetime) -> None:
        rec.lease_owner = self.owner
        rec.lease_until = now + self.lease
        rec.wake_at = None

    async def _save(
        self,
        rec: SagaRecord,
        also: Callable[[Any], Any] | None = None,
    ) -> None:
        rec.version += 1
        rec.updated_at = self.clock.now()
        try:
            await self.store.save(rec, also=also)
        except BaseException:
            rec.version -= 1
            raise
        if rec.replies:  # deleted from the store by that save
            rec.replies = {}

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drive_logged(self, rec: SagaRecord, saga: Saga[Any]) -> None:
        try:
            await self._drive(rec, saga)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("saga %s stopped; a recovery worker will continue it", rec.saga_id)

    async def _resume_at(self, saga_id: str, at: datetime) -> None:
        await self.clock.sleep((at - self.clock.now()).total_seconds())
        try:
            rec = await self.store.get(saga_id)
        except SagaNotFound:
            return
        except Exception:  # the recovery worker will find it
            log.exception("saga %s: could not look at it at its wake time", saga_id)
            return
        now = self.clock.now()
        if (
            rec.status not in ACTIVE_STATUSES
            or saga_id in self._driving
            or (rec.lease_until is not None and rec.lease_until > now)
            or (rec.wake_at is not None and rec.wake_at > now)
        ):
            return
        saga = self._sagas.get(rec.saga_type)
        if saga is None:
            return
        try:
            self._load(rec, saga)
        except SagaDataError as e:  # a recovery worker sets it aside
            log.error("%s; not resumed at its wake time", e)
            return
        self._apply_recorded(rec)  # before its timeouts are looked at
        self._take(rec, now)
        try:
            await self._save(rec)
        except ConcurrencyError:
            return  # another worker took it
        except Exception:
            log.exception("saga %s: could not take it at its wake time", saga_id)
            return
        self._load(rec, saga)
        await self._drive_logged(rec, saga)

    async def _drive(self, rec: SagaRecord, saga: Saga[Any], now: datetime | None = None) -> None:
        """Run ``rec`` until it ends, waits, or is taken over. ``now``: the time just read
        by the caller (nothing happened since), used for the first step's start."""
        saga_id = rec.saga_id
        self._driving.add(saga_id)
        try:
            while True:
                status = rec.status
                if status is RUNNING:
                    go_on = await self._forward(rec, saga, now)
                    now = None
                elif status is COMPENSATING:
                    go_on = await self._backward(rec, saga)
                else:
                    go_on = False
                if not go_on:
                    return
        except ConcurrencyError as e:
            if rec.version == 0:
                raise SagaStateError(f"a saga instance with id {saga_id!r} exists") from e
            log.warning("saga %s: another worker took it over (%s); stopping here", saga_id, e)
        finally:
            self._driving.discard(saga_id)
            # replies that came in while this task was saving its last state: their
            # deliveries were acked, so they are handled here, not dropped
            if self._mailbox:
                for reply in self._mailbox.pop(saga_id, ()):
                    self._spawn(self._redeliver(reply))

    async def _redeliver(self, reply: SagaReply) -> None:
        try:
            await self._on_reply(reply)
        except Exception:
            log.exception(
                "saga %s: a reply for step %s could not be applied; the step's timeout will "
                "ask again",
                reply.saga_id,
                reply.step,
            )

    async def _finish(
        self,
        rec: SagaRecord,
        status: SagaStatus,
        error: str | None = None,
        *,
        now: datetime | None = None,
    ) -> None:
        """End the instance as ``status`` and save it. ``now``: the time just read by the
        caller (nothing happened since), else the clock is read."""
        rec.status = status
        if rec.active:
            rec.active = {}
        rec.error = error
        rec.lease_owner = rec.lease_until = rec.wake_at = None
        if now is None:
            now = self.clock.now()
        final = _FINAL[status]
        rec.history.append(_entry(HistoryEntry, (now, final, None, None, error)))
        rec.version += 1
        rec.updated_at = now
        try:
            await self.store.save(rec)
        except BaseException:
            rec.version -= 1
            raise
        if rec.replies:  # deleted from the store by that save
            rec.replies = {}
        hooks = telemetry.hooks
        if type(hooks) is not Telemetry:
            hooks.saga_status(rec.saga_type, final)  # telemetry
        if self._waiters:
            for fut in self._waiters.get(rec.saga_id, ()):
                if not fut.done():
                    fut.set_result(None)

    async def _forward(self, rec: SagaRecord, saga: Saga[Any], now: datetime | None = None) -> bool:
        if rec.deadline is not None and not rec.past_pivot:
            now = self.clock.now()
            if now >= rec.deadline and not _pivot_sent(rec, saga):
                self._begin_compensation(rec, saga, "the saga's deadline passed before its pivot")
                return True
        groups = saga.groups
        if rec.position >= len(groups):
            await self._finish(rec, SagaStatus.COMPLETED, now=now)
            return False
        group = groups[rec.position]
        first = group[0]
        if len(group) == 1 and first.name in saga.plain_local and first.name not in rec.active:
            return await self._plain_steps(rec, saga, now)
        done = rec.done
        names = [s.name for s in group if s.name not in done]
        outcome, step, error = await self._run_group(rec, saga, names, ACTION)
        if outcome == _DONE:
            rec.position += 1
            rec.past_pivot = saga.past_pivot_at(rec.position)
            return True
        if outcome == _FAILED:
            assert step is not None and error is not None
            return await self._step_failed(rec, saga, step, error)
        if outcome == _HALTED:
            log.error(
                "saga %s step %s: the success reply could not be applied (%s); the step "
                "took effect, so the saga is FAILED, not compensated: fix on_reply, then "
                "retry it (the participant answers the same reply again)",
                rec.saga_id,
                step,
                error,
            )
            await self._finish(rec, SagaStatus.FAILED, f"step {step!r}: {error}")
        return False

    async def _step_failed(self, rec: SagaRecord, saga: Saga[Any], step: str, error: str) -> bool:
        if saga.steps[step].kind is StepKind.RETRIABLE:
            await self._finish(rec, SagaStatus.FAILED, f"step {step!r} failed: {error}")
            return False
        self._begin_compensation(rec, saga, f"step {step!r} failed: {error}")
        return True

    async def _plain_steps(
        self, rec: SagaRecord, saga: Saga[Any], now: datetime | None = None
    ) -> bool:
        """The common case, kept lean (the general path is :meth:`_run_group`): local steps
        without a timeout, first attempt, one after the other in this one call, the save and
        the call written out, and the instance finished here when the last one is done.
        Each step is saved as ``running`` before its effect, as on the general path. The
        clock is read once per step, after its effect: that time ends the step and starts
        the next one (nothing happens between). ``now``: the time just read by the caller,
        for the first step's start. Returns whether :meth:`_drive` should go on."""
        groups = saga.groups
        plain = saga.plain_local
        past = saga.past_pivot_by_position
        clock = self.clock
        read = _utc_now if type(clock) is SystemClock else clock.now  # same time, no frame
        store = self.store
        history = rec.history
        active = rec.active
        data_type = saga.data_type
        saga_id, saga_type = rec.saga_id, rec.saga_type
        owner, lease = self.owner, self.lease
        if now is None:
            now = read()
        step = groups[rec.position][0]
        while True:
            name = step.name
            run = active[name] = StepRun(ACTION, 1, "running")
            history.append(_entry(HistoryEntry, (now, "step started", name, 1, None)))
            rec.lease_owner = owner
            rec.lease_until = now + lease
            rec.wake_at = None
            rec.version += 1
            rec.updated_at = now
            try:
                await store.save(rec)  # before the effect
            except BaseException:
                rec.version -= 1
                raise
            if rec.replies:
                rec.replies = {}
            data = rec.data
            fn: Callable[[Any], Any] = step.action  # type: ignore[assignment]
            token = _step.set(_entry(StepContext, (saga_id, saga_type, name, ACTION, 1)))
            hooks = telemetry.hooks
            seen = (
                None
                if type(hooks) is Telemetry  # the no-op's scope does nothing: not made
                else hooks.saga_step(saga_type, saga_id, name, compensation=False)
            )
            try:
                result = fn(data)
                if (
                    result is not None
                    and type(result) is not data_type
                    and (type(result) is _Coroutine or inspect.isawaitable(result))
                ):
                    result = await result
            except asyncio.CancelledError as e:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # shutdown, not a business failure: the instance stays resumable
                if seen is not None:
                    seen.failed(f"CancelledError: {e}")  # telemetry
                return await self._plain_failed(rec, saga, step, run, f"CancelledError: {e}")
            except Exception as e:
                if seen is not None:
                    seen.failed(f"{type(e).__name__}: {e}")  # telemetry
                return await self._plain_failed(rec, saga, step, run, f"{type(e).__name__}: {e}")
            finally:
                _step.reset(token)
                if seen is not None:
                    seen.close()  # telemetry
            if result is not None:
                if not isinstance(result, type(data)):
                    error = f"returned {type(result).__name__}, not {type(data).__name__}"
                    return await self._plain_failed(rec, saga, step, run, error)
                if result is not data:
                    problem = _unstorable(rec, result)
                    if problem is not None:
                        return await self._plain_failed(rec, saga, step, run, problem)
                    rec.data_checked = result
                rec.data = result
            now = read()
            del active[name]
            rec.done.append(name)
            history.append(_entry(HistoryEntry, (now, "step completed", name, 1, None)))
            position = rec.position = rec.position + 1
            rec.past_pivot = past[position]
            if rec.deadline is not None and not rec.past_pivot:
                return True  # the deadline is looked at before the next step
            if position >= len(groups):
                await self._finish(rec, SagaStatus.COMPLETED, now=now)
                return False
            group = groups[position]
            step = group[0]
            if len(group) != 1 or step.name not in plain or step.name in active:
                return True

    async def _plain_failed(
        self, rec: SagaRecord, saga: Saga[Any], step: Step, run: StepRun, error: str
    ) -> bool:
        if self._failed_attempt(rec, step, run, ACTION, error, self.clock.now()):
            return await self._step_failed(rec, saga, step.name, error)
        return True  # to be retried: the general path takes it from here

    def _begin_compensation(self, rec: SagaRecord, saga: Saga[Any], error: str) -> None:
        done = set(rec.done)
        plan: list[list[str]] = []
        if rec.position < len(saga.groups):
            current = []
            for s in saga.groups[rec.position]:
                if s.kind is not StepKind.COMPENSATABLE:
                    continue
                run = rec.active.get(s.name)
                # it may have taken effect: a command sent and not refused, or a local
                # effect under way in a process that died (abort, deadline)
                maybe_applied = (
                    run is not None
                    and run.purpose == ACTION
                    and ((run.sent and run.ok is not False) or run.state == "running")
                )
                if s.name in done or maybe_applied:
                    current.append(s.name)
            if current:
                plan.append(current)
        for group in reversed(saga.groups[: rec.position]):
            names = [s.name for s in group if s.kind is StepKind.COMPENSATABLE and s.name in done]
            if names:
                plan.append(names)
        rec.status = COMPENSATING
        rec.compensation = plan
        rec.active = {}
        rec.error = error
        self._log(rec, "compensating", detail=error)

    async def _backward(self, rec: SagaRecord, saga: Saga[Any]) -> bool:
        if not rec.compensation:
            await self._finish(rec, SagaStatus.COMPENSATED, rec.error)
            return False
        names = rec.compensation[0]
        outcome, step, error = await self._run_group(rec, saga, names, COMPENSATION)
        if outcome == _DONE:
            rec.compensation.pop(0)
            return True
        if outcome == _FAILED:
            await self._finish(rec, SagaStatus.FAILED, f"compensation of {step!r} failed: {error}")
            return False
        return False

    async def _run_group(
        self, rec: SagaRecord, saga: Saga[Any], names: list[str], purpose: str
    ) -> tuple[int, str | None, str | None]:
        """Run the steps ``names`` (for ``purpose``) until all succeeded, one failed for
        good, or the rest wait for replies (then the instance is saved unleased)."""
        steps = saga.steps
        while True:
            retried = False
            if self._mailbox:
                replies = rec.replies
                for reply in self._mailbox.pop(rec.saga_id, ()):
                    self._accept(rec, reply)
                    # recorded in the store on arrival: the next save deletes the record
                    replies[_reply_key(reply)] = b""
            now = self.clock.now()
            start: list[tuple[Step, StepRun]] = []
            waiting: list[datetime] = []
            for name in list(names):
                step = steps[name]
                run = rec.active.get(name)
                if run is None or run.purpose != purpose:
                    run = rec.active[name] = StepRun(purpose, 1, "new")
                state = run.state
                if state == "replied":
                    if run.ok:
                        try:
                            self._complete(rec, step, run, purpose, names)
                            continue
                        except _BadReply as e:
                            error = f"bad reply: {e}"
                            self._bad_reply(rec, step, run, purpose, e, now)
                        except Exception as e:
                            error = f"bad reply: {type(e).__name__}: {e}"
                            if purpose == ACTION and step.kind is not StepKind.COMPENSATABLE:
                                # the pivot (or a step after it) took effect: never
                                # compensated; FAILED, for an operator to retry once fixed
                                self._log(rec, "step failed", name, run.attempt, error)
                                return _HALTED, name, error
                    else:
                        error = run.error or "failed"
                    if run.state == "replied" and self._failed_attempt(
                        rec, step, run, purpose, error, now
                    ):
                        return _FAILED, name, error
                    state = run.state
                if state == "waiting":
                    assert run.wake_at is not None
                    if run.wake_at > now:
                        if (
                            rec.deadline is not None
                            and not rec.past_pivot
                            and now >= rec.deadline
                            and step.kind is not StepKind.PIVOT
                            and purpose == ACTION
                        ):
                            return _FAILED, name, "the saga's deadline passed"
                        waiting.append(run.wake_at)
                        continue
                    error = f"no reply within {step.timeout_for(purpose)} s"
                    self._log(rec, "timed out", name, run.attempt, purpose)
                    if self._failed_attempt(rec, step, run, purpose, error, now):
                        return _FAILED, name, error
                    state = run.state
                if state == "retry":
                    assert run.wake_at is not None
                    if run.wake_at > now:
                        waiting.append(run.wake_at)
                        continue
                    run.attempt += 1
                    retried = True
                elif state == "running":
                    self._log(rec, "interrupted", name, run.attempt, "running it again")
                start.append((step, run))
            if not names:
                return _DONE, None, None
            if start:
                if retried:  # a retry due now (a 0 s backoff): let the loop run first
                    await asyncio.sleep(0)
                outcome = await self._start(rec, saga, start, purpose, names, now)
                if outcome is not None:
                    return outcome
                continue
            wake = min(waiting)
            if rec.deadline is not None and not rec.past_pivot and purpose == ACTION:
                wake = min(wake, rec.deadline)
            if any(r.state == "waiting" for r in rec.active.values()):
                # park: unleased until the earliest reply deadline or retry time
                rec.lease_owner = rec.lease_until = None
                rec.wake_at = wake
                await self._save(rec)
                self._spawn(self._resume_at(rec.saga_id, wake))
                return _PARKED, None, None
            # only retries to wait for: keep the lease across the wait
            rec.lease_owner = self.owner
            rec.lease_until = wake + self.lease
            await self._save(rec)
            await self.clock.sleep((wake - now).total_seconds())

    async def _start(
        self,
        rec: SagaRecord,
        saga: Saga[Any],
        start: list[tuple[Step, StepRun]],
        purpose: str,
        names: list[str],
        now: datetime,
    ) -> tuple[int, str | None, str | None] | None:
        sends: list[tuple[str | None, Envelope[Any]]] = []
        local: list[tuple[Step, StepRun, Callable[[Any], Any]]] = []
        for step, run in start:
            action = step.action if purpose == ACTION else step.compensation
            run.state = "running"
            run.error = None
            run.ok = run.reply = None
            if isinstance(action, Remote):
                try:
                    sends.append(self._command(rec, step, action, purpose, run.attempt))
                except Exception as e:
                    # building the command failed: a failed attempt that sent nothing,
                    # counted by the step's policy with its backoff. Only a pivot whose
                    # command went out at an earlier attempt (it may have taken effect)
                    # stays "unanswered": asked again, never compensated
                    error = f"the command could not be built: {type(e).__name__}: {e}"
                    run.state = "waiting" if run.sent else "failed"
                    if self._failed_attempt(rec, step, run, purpose, error, now, at_once=True):
                        return _FAILED, step.name, error
                    continue
                run.state = "waiting"
                run.sent = True
                timeout = step.timeout_for(purpose)
                assert timeout is not None
                run.wake_at = now + timedelta(seconds=timeout)
            else:
                assert action is not None
                local.append((step, run, action))
            self._log(
                rec,
                "step started" if purpose == ACTION else "compensation started",
                step.name,
                run.attempt,
            )
        rec.lease_owner = self.owner
        rec.lease_until = now + self.lease
        rec.wake_at = None
        await self._save(rec, self._also(sends) if sends else None)  # before any effect
        if not local:
            return None
        data = rec.data
        if len(local) == 1:
            step, run, fn = local[0]
            results = [await self._attempt(rec, step, run, fn, data, purpose)]
        else:
            results = list(
                await asyncio.gather(
                    *(self._attempt(rec, s, r, fn, data, purpose) for s, r, fn in local)
                )
            )
        merged = data
        now = self.clock.now()
        failed: tuple[int, str | None, str | None] | None = None
        for (step, run, _), (ok, value) in zip(local, results, strict=True):
            if ok:
                if value is not None and value is not data:
                    if len(local) == 1:
                        merged = value
                    else:  # parallel: take the fields this step changed
                        changed = {
                            f: getattr(value, f)
                            for f in type(value).model_fields
                            if getattr(value, f) != getattr(data, f)
                        }
                        if changed:
                            merged = merged.model_copy(update=changed)
                self._complete_run(rec, step, purpose, names)
            elif (
                self._failed_attempt(rec, step, run, purpose, cast(str, value), now)
                and failed is None
            ):
                failed = (_FAILED, step.name, cast(str, value))
        if merged is not data and len(local) == 1:
            rec.data_checked = merged  # _attempt checked it: the store need not look again
        rec.data = merged  # the members that succeeded count, also when another failed
        return failed

    async def _attempt(
        self,
        rec: SagaRecord,
        step: Step,
        run: StepRun,
        fn: Callable[[Any], Any],
        data: Any,
        purpose: str,
    ) -> tuple[bool, Any]:
        token = _step.set(
            _entry(StepContext, (rec.saga_id, rec.saga_type, step.name, purpose, run.attempt))
        )
        seen = telemetry.hooks.saga_step(
            rec.saga_type, rec.saga_id, step.name, compensation=purpose != ACTION
        )
        timeout = step.timeout_for(purpose)
        try:
            if timeout is None:
                result = fn(data)
                if (
                    result is not None
                    and type(result) is not type(data)
                    and inspect.isawaitable(result)
                ):
                    result = await result
            else:
                result = await self._with_timeout(fn, data, timeout)
        except asyncio.CancelledError as e:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # shutdown, not a business failure: the instance stays resumable
            seen.failed(f"CancelledError: {e}")  # telemetry
            return False, f"CancelledError: {e}"
        except Exception as e:
            seen.failed(f"{type(e).__name__}: {e}")  # telemetry
            return False, f"{type(e).__name__}: {e}"
        finally:
            _step.reset(token)
            seen.close()  # telemetry
        if result is not None and not isinstance(result, type(data)):
            return False, f"returned {type(result).__name__}, not {type(data).__name__}"
        if result is not None and result is not data:
            problem = _unstorable(rec, result)
            if problem is not None:
                return False, problem
        return True, result

    async def _with_timeout(self, fn: Callable[[Any], Any], data: Any, timeout: float) -> Any:
        async def call() -> Any:
            result = fn(data)
            if inspect.isawaitable(result):
                result = await result
            return result

        work = asyncio.ensure_future(call())
        timer = asyncio.ensure_future(self.clock.sleep(timeout))
        try:
            await asyncio.wait((work, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            if not work.done():
                work.cancel()
        if not work.done() or work.cancelled():
            raise TimeoutError(f"did not finish within {timeout} s")
        return work.result()

    def _complete(
        self, rec: SagaRecord, step: Step, run: StepRun, purpose: str, names: list[str]
    ) -> None:
        """A remote step's success reply: apply its data, mark it done."""
        action = step.action if purpose == ACTION else step.compensation
        assert isinstance(action, Remote)
        if action.on_reply is not None:
            reply: Any = run.reply
            if action.reply is not None:
                try:
                    reply = action.reply.model_validate(run.reply or {})
                except ValidationError as e:
                    raise _BadReply(
                        f"does not validate as {action.reply.__name__}: "
                        f"{e.error_count()} error(s): {_first_error(e)}"
                    ) from None
            data = action.on_reply(rec.data, reply)
            if not isinstance(data, type(rec.data)):
                raise TypeError(f"on_reply returned {type(data).__name__}")
            if data is not rec.data:
                problem = _unstorable(rec, data)
                if problem is not None:
                    raise EncodeError(f"on_reply {problem}")
                rec.data_checked = data
            rec.data = data
        self._complete_run(rec, step, purpose, names)

    def _bad_reply(
        self,
        rec: SagaRecord,
        step: Step,
        run: StepRun,
        purpose: str,
        error: _BadReply,
        now: datetime,
    ) -> None:
        """A success reply whose data does not validate as the step's ``reply=`` model.
        For a pivot or a step after it (a retriable step) it is treated as no answer: the
        step stays waiting until its timeout, then is asked again (the pivot until it
        answers), so a malformed reply never starts compensation after a pivot that may
        have taken effect. For a step before the pivot (and for compensations) it stays a
        failed attempt (the caller counts it)."""
        if purpose == ACTION and step.kind is not StepKind.COMPENSATABLE:
            log.warning(
                "saga %s step %s (%s) attempt %d: reply %s; treated as no answer (the step "
                "is %s, so it is waited on and asked again, never compensated)",
                rec.saga_id,
                step.name,
                step.kind.value,
                run.attempt,
                error,
                "the pivot" if step.kind is StepKind.PIVOT else "after the pivot",
            )
            self._log(rec, "reply ignored", step.name, run.attempt, f"bad reply: {error}")
            run.state = "waiting"
            run.ok = None
            run.reply = None
            if run.wake_at is None:
                run.wake_at = now
            return
        why = (
            "a compensation: retried by the compensation policy"
            if purpose != ACTION
            else "before the pivot: retried by its policy, then compensated"
        )
        log.warning(
            "saga %s step %s attempt %d: reply %s; counted as a failed %s attempt (%s)",
            rec.saga_id,
            step.name,
            run.attempt,
            error,
            purpose,
            why,
        )

    def _complete_run(self, rec: SagaRecord, step: Step, purpose: str, names: list[str]) -> None:
        run = rec.active.pop(step.name)
        names.remove(step.name)
        if purpose == ACTION:
            rec.done.append(step.name)
            self._log(rec, "step completed", step.name, run.attempt)
        else:
            self._log(rec, "compensated", step.name, run.attempt)

    def _failed_attempt(
        self,
        rec: SagaRecord,
        step: Step,
        run: StepRun,
        purpose: str,
        error: str,
        now: datetime,
        at_once: bool = False,
    ) -> bool:
        """Count a failed attempt; True when the step has failed for good. ``at_once``: it
        failed without waiting for anything (its command could not be built)."""
        policy: Retry = (
            step.retry
            if purpose == ACTION
            else (step.compensation_retry or self._sagas[rec.saga_type].compensation_retry)
        )
        run.error = error
        # a remote pivot that did not answer may have happened: compensating it would undo
        # the steps before a point of no return that was passed, so it is asked again (with
        # the same idempotency key) until it answers
        unanswered_pivot = (
            purpose == ACTION and step.kind is StepKind.PIVOT and run.state == "waiting"
        )
        tries = run.attempt - run.first + 1  # attempts of this invocation (retry: renumbered)
        if policy.attempts is not None and tries >= policy.attempts and not unanswered_pivot:
            self._log(
                rec,
                "step failed" if purpose == ACTION else "compensation failed",
                step.name,
                run.attempt,
                error,
            )
            if run.state == "running":
                run.state = "failed"  # a local action that raised took no effect
            return True
        delay = max(0.0, policy.backoff(tries))
        if at_once and policy.attempts is not None and tries >= policy.attempts:
            # an unanswered pivot asked again past its policy after a failure that waited
            # for nothing (its command could not be built): never at once, however its
            # policy backs off (0 s by default), else a failure that recurs at once is a
            # loop that holds the event loop and grows the history without end (a timed-out
            # attempt has waited its timeout already)
            delay = max(delay, _PIVOT_AGAIN(tries - policy.attempts + 1))
        run.state = "retry"
        run.wake_at = now + timedelta(seconds=delay)
        self._log(
            rec, "retry", step.name, run.attempt, f"{purpose}: {error}; next in {delay:.3g} s"
        )
        return False

    def _command(
        self, rec: SagaRecord, step: Step, action: Remote[Any, Any], purpose: str, attempt: int
    ) -> tuple[str | None, Envelope[Any]]:
        assert self.outbox is not None
        command = action.command(rec.data)
        headers = {
            HEADER_SAGA_ID: rec.saga_id,
            HEADER_SAGA_TYPE: rec.saga_type,
            HEADER_STEP: step.name,
            HEADER_PURPOSE: purpose,
            HEADER_ATTEMPT: str(attempt),
            HEADER_REPLY_TO: self.reply_topic,
            IDEMPOTENCY_KEY_HEADER: idempotency_key(rec.saga_id, step.name, purpose),
        }
        env = make_envelope(
            command,
            registry=self.outbox.registry,
            partition_key=rec.saga_id,
            headers=headers,
            source=self.outbox.source,
            correlation_id=rec.saga_id,
        )
        return action.topic, env

    def _also(self, sends: list[tuple[str | None, Envelope[Any]]]) -> Callable[[Any], Any]:
        outbox = self.outbox
        assert outbox is not None
        if self._async_conn:

            async def add_async(conn: Any) -> None:
                for topic, env in sends:
                    await outbox.add_async(conn, env, topic=topic)

            return add_async

        def add(conn: Any) -> None:
            for topic, env in sends:
                outbox.add(conn, env, topic=topic)

        return add


class _BadReply(Exception):
    """A success reply's data does not validate as the step's ``reply=`` model."""


def _reply_key(reply: SagaReply) -> str:
    """A recorded reply's key: one per saga, purpose, attempt and step."""
    return f"{reply.purpose} {reply.attempt} {reply.step}"


def _unstorable(rec: SagaRecord, data: Any) -> str | None:
    """Why a step's new ``data`` cannot be stored (:func:`msdata.saga.store.data_json`):
    ``returned data that cannot be stored: ...``, or None (the caller that makes it the
    instance's data marks it checked: ``rec.data_checked``, so the store does not look
    again)."""
    try:
        check_data_value(rec.saga_id, data)
    except EncodeError as e:
        return f"returned data that cannot be stored: {e}"
    return None


def check_saga_id(saga_id: object) -> str:
    """``saga_id`` if it can be an instance's id everywhere it goes (every saga store, the
    ``sagaid`` header and partition key of its commands, the idempotency keys
    ``saga:<id>:<step>:<purpose>``): a non-empty str of at most :data:`MAX_SAGA_ID`
    characters, valid UTF-8 (no lone surrogate), with no control character (NUL, a line
    break). Raises :class:`msdata.errors.EncodeError` naming what is wrong."""
    if not isinstance(saga_id, str) or not saga_id:
        raise EncodeError(f"a saga id must be a non-empty str, got {safe_text(repr(saga_id), 80)}")
    if len(saga_id) > MAX_SAGA_ID:
        raise EncodeError(
            f"a saga id has at most {MAX_SAGA_ID} characters, got {len(saga_id)} "
            f"({safe_text(repr(saga_id), 80)})"
        )
    if not is_utf8(saga_id):
        raise EncodeError(
            f"saga id {safe_text(repr(saga_id), 80)} holds a lone surrogate (not UTF-8)"
        )
    if _CONTROL.search(saga_id):
        raise EncodeError(
            f"saga id {safe_text(repr(saga_id), 80)} holds a control character (NUL, a line "
            "break...)"
        )
    return saga_id


#: the wait before an unanswered pivot is asked again past its policy's attempts (seconds
#: after the n-th such failure): 0.1 s doubling, at most 30 s apart
_PIVOT_AGAIN = exponential_backoff(0.1, 2.0, 30.0)

#: the longest saga id: its idempotency keys (``saga:<id>:<step>:<purpose>``) stay within
#: the 255 characters of an idempotency key with a step name of at most
#: :data:`msdata.saga.definition.MAX_STEP_NAME` (64): 5 + 160 + 1 + 64 + 1 + 12 = 243
MAX_SAGA_ID = 160
_CONTROL = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")


def _first_error(e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "(root)"
    return f"{where}: {first.get('msg', '')}"


def _pivot_sent(rec: SagaRecord, saga: Saga[Any]) -> bool:
    """Whether the pivot's command is out: then the deadline no longer compensates."""
    return any(
        run.sent and saga.steps[name].kind is StepKind.PIVOT for name, run in rec.active.items()
    )
