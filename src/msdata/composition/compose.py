"""Run the parts of a composition concurrently and gather what they answer.

One coroutine drives every part: each call is a task of its own (no wrapper around it), the
composer wakes when a task finishes or when the earliest timeout is due (one timer, re-armed
only when that instant changes), and cancels what has overrun. On return or raise, every
task it started has finished: a cancelled part is awaited until it has stopped.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Awaitable, Mapping
from types import CoroutineType
from typing import Any, TypeVar, cast, final, overload

from msdata import telemetry
from msdata.clock import SYSTEM_CLOCK, Clock, SystemClock
from msdata.composition.parts import (
    UNSET,
    Cancelled,
    Failed,
    OptionalPart,
    Part,
    PartFailure,
    RequiredPart,
    TimedOut,
    check_seconds,
    failure_cause,
)
from msdata.errors import CompositionTimeout, ConfigurationError, RequiredPartFailed

__all__ = ["Composed", "compose"]

log = logging.getLogger("msdata.composition")

T = TypeVar("T")
D = TypeVar("D")

_INF = math.inf


@final
class Composed:
    """What a composition answered: each part's value, and why some have none of their own.

    - ``composed[part]``: the value of a :class:`RequiredPart` (a ``T``), or of an
      :class:`OptionalPart` (a ``T | None``: ``None`` when it is missing; a part typed only
      as ``Part[T]`` also gives ``T | None``).
    - ``composed.get(part, default)``: the value, or ``default`` when the part is missing.
    - ``part in composed``: the part has a value (its own or its fallback's).
    - ``composed.missing``: part name -> :data:`~msdata.composition.PartFailure`, for each
      optional part with no value.
    - ``composed.from_fallback``: part name -> why its call failed, for each part answered by
      its ``default`` or ``fallback``.
    - ``composed.complete``: every part answered with its own call.
    - ``composed.as_dict()``: the values by part name (missing parts left out), to serialise.

    Looking up a part that is not in this composition raises
    :class:`~msdata.errors.ConfigurationError`.
    """

    __slots__ = ("_parts", "_values", "from_fallback", "missing")

    missing: Mapping[str, PartFailure]
    from_fallback: Mapping[str, PartFailure]

    def __init__(
        self,
        parts: dict[str, Part[Any]],
        values: dict[str, Any],
        missing: dict[str, PartFailure],
        from_fallback: dict[str, PartFailure],
    ) -> None:
        self._parts = parts
        self._values = values
        self.missing = missing
        self.from_fallback = from_fallback

    @overload
    def __getitem__(self, part: RequiredPart[T]) -> T: ...
    @overload
    def __getitem__(self, part: OptionalPart[T]) -> T | None: ...
    @overload
    def __getitem__(self, part: Part[T]) -> T | None: ...
    def __getitem__(self, part: Part[Any]) -> Any:
        self._check(part)
        return self._values.get(part.name)

    def get(self, part: Part[T], default: D) -> T | D:
        """The part's value, or ``default`` if it has none."""
        self._check(part)
        return cast("T | D", self._values.get(part.name, default))

    def __contains__(self, part: object) -> bool:
        if not isinstance(part, Part):
            return False
        self._check(part)
        return part.name in self._values

    @property
    def complete(self) -> bool:
        """True when every part answered with its own call (no fallback, none missing)."""
        return not self.missing and not self.from_fallback

    def as_dict(self) -> dict[str, Any]:
        """Part name -> value for every part that has one (its own or its fallback's)."""
        return dict(self._values)

    def _check(self, part: Part[Any]) -> None:
        if self._parts.get(part.name) is not part:
            raise ConfigurationError(f"{part!r} is not a part of this composition")

    def __repr__(self) -> str:
        missing = ", ".join(f"{name}: {why}" for name, why in self.missing.items())
        return f"Composed(answered={list(self._values)}, missing={{{missing}}})"


async def compose(
    *parts: Part[Any], deadline: float | None, clock: Clock = SYSTEM_CLOCK
) -> Composed:
    """Call every part concurrently and return what they answered.

    - Each part's call gets its own ``timeout``; ``deadline`` (seconds from now, or ``None``
      for none: then the parts' timeouts must bound the wait) bounds the whole composition.
    - A part whose call raises, times out or is cancelled on its own answers with its
      ``default``, or its ``fallback(failure)``; without either (or when the fallback fails
      too), an optional part is left out (``composed.missing`` says why) and a required part
      makes ``compose`` cancel every other call at once and raise
      :class:`~msdata.errors.RequiredPartFailed` (``part``: its name, ``reason``: the
      failure's text, ``__cause__``: its exception, a ``TimeoutError`` for a timeout).
    - At the deadline every call still running is cancelled and counts as timed out: it
      answers with its ``default`` if it has one (a fallback function has no time left), an
      optional part is missing, and if a required part has no value
      :class:`~msdata.errors.CompositionTimeout` is raised.
    - Cancelling the task that awaits ``compose`` cancels every call and propagates.
    - Whatever happens, every task ``compose`` started has finished when it returns or
      raises.

    Time is read from ``clock`` (``monotonic()``, and ``sleep()`` for a clock other than the
    system's). Raises :class:`~msdata.errors.ConfigurationError`, before any part starts, for
    no parts, two parts with one name, a bad deadline, or a ``fn`` that returns something that
    is not awaitable (a sync function passed by mistake; it has run by then); and, when it is
    called, for a ``fallback`` that returns something that is not awaitable.
    """
    if deadline is not None and not (type(deadline) is float and 0.0 < deadline < _INF):
        check_seconds("deadline", deadline)
    if not parts:
        raise ConfigurationError("compose() needs at least one part")
    by_name: dict[str, Part[Any]] = {}
    for part in parts:
        if not isinstance(part, Part):
            raise ConfigurationError(
                f"compose() takes parts made by required() or optional(), got {part!r}"
            )
        if part.name in by_name:
            raise ConfigurationError(f"two parts are named {part.name!r}; names must be unique")
        by_name[part.name] = part
    with telemetry.hooks.compose(list(by_name)):  # telemetry
        return await _Run(by_name, deadline, clock).run()


class _Slot:
    """One part's state in one run."""

    __slots__ = ("due", "failure", "part")

    def __init__(self, part: Part[Any]) -> None:
        self.part = part
        self.due = _INF  # monotonic instant its call (or fallback) times out
        self.failure: PartFailure | None = None  # set once its call failed: a fallback runs


def _awaitable_of(part: Part[Any], result: object, fallback: bool = False) -> Awaitable[Any]:
    if isinstance(result, Awaitable):
        return result
    fn = part.fallback if fallback else part.fn
    raise ConfigurationError(
        f"part {part.name!r}: {'fallback ' if fallback else ''}"
        f"{getattr(fn, '__qualname__', fn)!r} returned {type(result).__name__}, not an "
        "awaitable; give an async function (run blocking code with asyncio.to_thread)"
    )


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


class _Run:
    __slots__ = (
        "abandoned",
        "active",
        "clock",
        "deadline",
        "deadline_at",
        "from_fallback",
        "loop",
        "missing",
        "parts",
        "ready",
        "tasks",
        "timer",
        "timer_due",
        "values",
        "waiter",
    )

    def __init__(self, parts: dict[str, Part[Any]], deadline: float | None, clock: Clock) -> None:
        self.parts = parts
        self.deadline = deadline
        self.clock = clock
        self.loop = asyncio.get_running_loop()
        self.active: dict[asyncio.Future[Any], _Slot] = {}  # running call or fallback -> slot
        self.tasks: list[asyncio.Future[Any]] = []  # every task started, to leave none behind
        self.abandoned = False  # a task was cancelled and not yet seen to finish
        self.ready: deque[asyncio.Future[Any]] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | asyncio.Task[None] | None = None
        self.timer_due = _INF
        self.values: dict[str, Any] = {}
        self.missing: dict[str, PartFailure] = {}
        self.from_fallback: dict[str, PartFailure] = {}

    # -- wake-ups ---------------------------------------------------------------------------

    def _on_done(self, task: asyncio.Future[Any]) -> None:
        self.ready.append(task)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_timer(self, _: object = None) -> None:
        self.timer = None
        self.timer_due = _INF
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _arm(self, due: float, now: float) -> None:
        if due == self.timer_due:
            return
        self._disarm()
        self.timer_due = due
        if isinstance(self.clock, SystemClock):
            self.timer = self.loop.call_later(due - now, self._on_timer)
        else:  # a clock the test drives: its sleep() decides when the time has come
            timer = self.loop.create_task(self.clock.sleep(due - now))
            timer.add_done_callback(self._on_timer)
            self.tasks.append(timer)
            self.timer = timer

    def _disarm(self) -> None:
        timer = self.timer
        if timer is not None:
            self.timer = None
            self.timer_due = _INF
            if isinstance(timer, asyncio.Task):
                timer.remove_done_callback(self._on_timer)
                if timer.cancel():
                    self.abandoned = True
            else:
                timer.cancel()

    # -- starting calls ---------------------------------------------------------------------

    def _start(self, slot: _Slot, awaitable: Awaitable[Any], due: float) -> None:
        if type(awaitable) is CoroutineType:
            task = self.loop.create_task(awaitable)
        else:  # a future, or an object with __await__: a task of our own, cancellable
            task = self.loop.create_task(_await(awaitable))
        task.add_done_callback(self._on_done)
        self.tasks.append(task)
        self.active[task] = slot
        slot.due = due

    def _due(self, timeout: float | None, now: float) -> float:
        return _INF if timeout is None else now + timeout

    # -- outcomes ---------------------------------------------------------------------------

    def _settle(self, task: asyncio.Future[Any]) -> None:
        slot = self.active.pop(task, None)
        if slot is None:  # a call we gave up on (timed out): its outcome no longer counts
            if not task.cancelled():
                task.exception()  # retrieved, so asyncio does not log it as never retrieved
            return
        if task.cancelled():
            error: BaseException = asyncio.CancelledError()
        else:
            outcome = task.exception()
            if outcome is None:
                part = slot.part
                self.values[part.name] = task.result()
                if slot.failure is not None:
                    self.from_fallback[part.name] = slot.failure
                return
            if not isinstance(outcome, Exception):
                raise outcome  # KeyboardInterrupt and the like: not a part's failure
            error = outcome
        if slot.failure is not None:
            self._fallback_failed(slot, error)
        elif isinstance(error, Exception):
            self._failed(slot, Failed(error))
        else:
            self._failed(slot, Cancelled())

    def _failed(self, slot: _Slot, failure: PartFailure) -> None:
        """The part's own call failed: answer with its default, start its fallback, or give
        up on it."""
        part = slot.part
        if log.isEnabledFor(logging.DEBUG):
            log.debug("part %r %s", part.name, failure)
        if part.default is not UNSET:
            self.values[part.name] = part.default
            self.from_fallback[part.name] = failure
        elif part.fallback is not None:
            slot.failure = failure
            try:
                result = part.fallback(failure)
            except Exception as error:  # a sync callable raising: the fallback failed
                self._fallback_failed(slot, error)
                return
            awaitable = _awaitable_of(part, result, fallback=True)
            self._start(slot, awaitable, self._due(part.timeout, self.clock.monotonic()))
        else:
            self._give_up(slot, failure)

    def _fallback_failed(self, slot: _Slot, error: BaseException) -> None:
        failure = slot.failure
        assert failure is not None
        if log.isEnabledFor(logging.DEBUG):
            log.debug("part %r: fallback failed: %r", slot.part.name, error)
        self._give_up(slot, _with_fallback_error(failure, error))

    def _give_up(self, slot: _Slot, failure: PartFailure) -> None:
        part = slot.part
        if part.required:
            raise RequiredPartFailed(part.name, str(failure)) from failure_cause(failure)
        self.missing[part.name] = failure

    def _expire(self, task: asyncio.Future[Any], slot: _Slot) -> None:
        del self.active[task]
        if task.cancel():
            self.abandoned = True
        if slot.failure is None:
            self._failed(slot, TimedOut(slot.part.timeout or 0.0))
        else:
            seconds = slot.part.timeout
            self._fallback_failed(slot, TimeoutError(f"fallback timed out after {seconds:g} s"))

    def _at_deadline(self) -> None:
        late: list[str] = []
        for task, slot in list(self.active.items()):
            del self.active[task]
            if task.cancel():
                self.abandoned = True
            part = slot.part
            if slot.failure is None:
                failure: PartFailure = TimedOut(self.deadline or 0.0)
            else:
                error = TimeoutError("the overall deadline passed while the fallback ran")
                failure = _with_fallback_error(slot.failure, error)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("part %r: overall deadline passed", part.name)
            if slot.failure is None and part.default is not UNSET:
                self.values[part.name] = part.default
                self.from_fallback[part.name] = failure
            elif part.required:
                late.append(part.name)
            else:
                self.missing[part.name] = failure
        if late:
            raise CompositionTimeout(
                f"the deadline of {self.deadline:g} s passed before required "
                f"part{'s' if len(late) > 1 else ''} {', '.join(map(repr, late))} answered"
            )

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> Composed:
        clock = self.clock
        loop = self.loop
        parts = self.parts
        # Make every call first: nothing is scheduled until all are known to be awaitable.
        calls: list[tuple[_Slot, Awaitable[Any]]] = []
        try:
            for part in parts.values():
                try:
                    result = part.fn(*part.args)
                except Exception as error:  # raised before returning an awaitable: its failure
                    failed: asyncio.Future[Any] = loop.create_future()
                    failed.set_exception(error)
                    result = failed
                if type(result) is not CoroutineType:
                    result = _awaitable_of(part, result)
                calls.append((_Slot(part), result))
        except BaseException:
            for _, awaitable in calls:
                if type(awaitable) is CoroutineType:
                    awaitable.close()
                elif isinstance(awaitable, asyncio.Future):
                    awaitable.cancel()
            raise
        now = clock.monotonic()
        self.deadline_at = _INF if self.deadline is None else now + self.deadline
        for slot, awaitable in calls:
            timeout = slot.part.timeout
            self._start(slot, awaitable, _INF if timeout is None else now + timeout)
        # First look right after the calls' first steps: parts that answer at once are
        # settled then, and no timer is ever armed for them.
        loop.call_soon(self._wake)
        first_look = True
        active = self.active
        ready = self.ready
        try:
            while True:
                while ready:
                    self._settle(ready.popleft())
                if not active:
                    break
                now = clock.monotonic()
                if now >= self.deadline_at:
                    self._at_deadline()
                    break
                next_due = self.deadline_at
                expired = False
                for task, slot in list(active.items()):
                    if slot.due <= now:
                        self._expire(task, slot)
                        expired = True  # it may have started a fallback with a due of its own
                    elif slot.due < next_due:
                        next_due = slot.due
                if expired or ready:
                    continue
                if first_look:
                    first_look = False
                elif next_due < _INF:
                    self._arm(next_due, now)
                waiter = self.waiter = loop.create_future()
                try:
                    await waiter
                finally:
                    self.waiter = None
        except BaseException:
            self._disarm()
            for task in self.tasks:
                task.cancel()
            await self._drain()
            raise
        self._disarm()
        if self.abandoned:
            await self._drain()
        return Composed(parts, self.values, self.missing, self.from_fallback)

    async def _drain(self) -> None:
        """Wait until every task started has finished; if the composer is cancelled
        meanwhile, keep waiting (a part must not outlive it), then raise CancelledError."""
        cancelled = False
        while True:
            pending = [task for task in self.tasks if not task.done()]
            if not pending:
                break
            try:
                await asyncio.wait(pending)
            except asyncio.CancelledError:
                cancelled = True
                for task in pending:
                    task.cancel()
        for task in self.tasks:
            if not task.cancelled():
                task.exception()  # retrieved: a part cancelled late may still have raised
        if cancelled:
            raise asyncio.CancelledError


def _with_fallback_error(failure: PartFailure, error: BaseException) -> PartFailure:
    if isinstance(failure, TimedOut):
        return TimedOut(failure.seconds, error)
    if isinstance(failure, Failed):
        return Failed(failure.error, error)
    return Cancelled(error)
