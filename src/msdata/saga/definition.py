"""Defining a saga: typed data, ordered steps, their kinds, retry policies and timeouts.

::

    checkout = (
        Saga("checkout", Order)
        .step("reserve", reserve_stock, compensate=release_stock)   # compensatable
        .pivot("charge", remote(ChargeCard.for_order, on_reply=set_payment_id))
        .retriable("confirm", confirm_order)
    )

A step is **compensatable** (undone by its compensation when a later step fails), the
**pivot** (the point of no return: once it succeeded the saga goes forward only) or
**retriable** (after the pivot: retried until it succeeds, never compensated). These are the
step kinds of Chris Richardson's *Microservices Patterns* (2018), ch. 4, after Garcia-Molina
and Salem, "Sagas" (1987). The definition is checked as it is built; each mistake raises
:class:`msdata.errors.SagaDefinitionError` saying which step and why.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from msdata.backoff import Backoff, constant_backoff, exponential_backoff
from msdata.errors import ConfigurationError, SagaDefinitionError
from msdata.messages import Command
from msdata.transport import check_name, is_utf8

__all__ = [
    "MAX_STEP_NAME",
    "LocalAction",
    "Remote",
    "Retry",
    "Saga",
    "Step",
    "StepKind",
    "remote",
]

#: the longest step name: with a saga id of at most ``MAX_SAGA_ID`` (160) characters, the
#: idempotency keys ``saga:<id>:<step>:<purpose>`` stay within the 255 characters of an
#: idempotency key (5 + 160 + 1 + 64 + 1 + 12 = 243; ``compensation`` is the longest purpose)
MAX_STEP_NAME = 64
_CONTROL = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")

D = TypeVar("D", bound=BaseModel)
R = TypeVar("R", bound=BaseModel)

#: A local step's action or compensation: a sync or async function of the saga data that
#: returns the updated data (``None``: the data is unchanged).
LocalAction = Callable[[D], "D | Awaitable[D | None] | None"]


class StepKind(StrEnum):
    COMPENSATABLE = "compensatable"
    PIVOT = "pivot"
    RETRIABLE = "retriable"


@dataclass(frozen=True, slots=True)
class Retry:
    """How often a step (or compensation) is tried and how long to wait between tries.

    ``attempts``: tries in all (>= 1), or ``None`` for "until it succeeds" (the default of a
    retriable step). ``backoff``: seconds to wait after the n-th failure (the library's one
    :data:`msdata.backoff.Backoff`)."""

    attempts: int | None = 1
    backoff: Backoff = field(default_factory=lambda: constant_backoff(0.0))

    def __post_init__(self) -> None:
        if self.attempts is not None and (
            isinstance(self.attempts, bool)
            or not isinstance(self.attempts, int)
            or self.attempts < 1
        ):
            raise SagaDefinitionError(
                f"retry attempts must be an int >= 1 or None, got {self.attempts!r}"
            )


#: Default policies: a forward step is tried once; a retriable step until it succeeds; a
#: compensation five times (0.1 s doubling, at most 10 s apart) before the saga is FAILED.
ONCE = Retry(1)
FOREVER = Retry(None, exponential_backoff(0.1, 2.0, 30.0))
COMPENSATION = Retry(5, exponential_backoff(0.1, 2.0, 10.0))


@dataclass(frozen=True, slots=True)
class Remote(Generic[D, R]):
    """A remote step: ``command(data)`` builds the command sent to the participant (through
    the outbox, in the transaction that saves the saga's state); the participant's success
    reply carries data validated as ``reply`` (a pydantic model, or ``None`` for no data) and
    ``on_reply(data, reply)`` returns the updated saga data (default: unchanged). ``topic``:
    where the command goes (default: its registered type name, where participants listen)."""

    command: Callable[[D], Command]
    reply: type[R] | None = None
    on_reply: Callable[[D, R], D] | None = None
    topic: str | None = None


def remote(
    command: Callable[[D], Command],
    *,
    reply: type[R] | None = None,
    on_reply: Callable[[D, R], D] | None = None,
    topic: str | None = None,
) -> Remote[D, R]:
    """A :class:`Remote` step action (or compensation)."""
    if topic is not None:
        check_name("topic", topic)
    return Remote(command, reply, on_reply, topic)


Action = Callable[[Any], Any] | Remote[Any, Any]


@dataclass(frozen=True, slots=True)
class Step:
    """One step. ``timeout`` (seconds, or None): an attempt that has not finished (a local
    action) or has had no reply (a remote one) within it has failed. ``retry``: the forward
    policy; ``compensation_retry``: the policy of its compensation (default: the saga's).
    ``compensation_timeout`` (seconds, or None): the same for each attempt of the
    compensation (default: ``timeout``); a compensation whose attempts are used up leaves the
    instance FAILED."""

    name: str
    kind: StepKind
    action: Action
    compensation: Action | None = None
    retry: Retry = ONCE
    timeout: float | None = None
    compensation_retry: Retry | None = None
    compensation_timeout: float | None = None

    @property
    def is_remote(self) -> bool:
        return isinstance(self.action, Remote)

    def timeout_for(self, purpose: str) -> float | None:
        """The timeout (seconds) of one attempt of the action (``"action"``) or of the
        compensation (``"compensation"``: ``compensation_timeout``, else ``timeout``)."""
        if purpose == "action" or self.compensation_timeout is None:
            return self.timeout
        return self.compensation_timeout

    @staticmethod
    def compensatable(
        name: str,
        action: Action,
        *,
        compensate: Action | None,
        retry: Retry = ONCE,
        timeout: float | None = None,
        compensation_retry: Retry | None = None,
        compensation_timeout: float | None = None,
    ) -> Step:
        return _make(
            name,
            StepKind.COMPENSATABLE,
            action,
            compensate,
            retry,
            timeout,
            compensation_retry,
            compensation_timeout,
        )

    @staticmethod
    def retriable(
        name: str, action: Action, *, retry: Retry = FOREVER, timeout: float | None = None
    ) -> Step:
        return _make(name, StepKind.RETRIABLE, action, None, retry, timeout, None)


def _check_action(step: str, what: str, action: object) -> None:
    if isinstance(action, Remote):
        return
    if not callable(action):
        raise SagaDefinitionError(f"step {step!r}: the {what} must be a function or remote(...)")


def _check_bounded(what: str, policy: Retry) -> None:
    """A compensation's attempts are bounded (DESIGN.md guarantee 4: an instance whose
    compensation keeps failing ends FAILED, for an operator, never COMPENSATING for ever)."""
    if policy.attempts is None:
        raise SagaDefinitionError(
            f"{what}: a compensation retry policy needs a number of attempts (not None): once "
            "they are used up the instance is FAILED for an operator, not compensating for ever"
        )


def _make(
    name: str,
    kind: StepKind,
    action: Action,
    compensation: Action | None,
    retry: Retry,
    timeout: float | None,
    compensation_retry: Retry | None,
    compensation_timeout: float | None = None,
) -> Step:
    if not isinstance(name, str) or not name or len(name) > MAX_STEP_NAME or ":" in name:
        raise SagaDefinitionError(
            f"step name {name!r} must be a non-empty str of at most {MAX_STEP_NAME} characters "
            "without ':'"
        )
    if _CONTROL.search(name):
        raise SagaDefinitionError(
            f"step name {name!r} holds a control character (NUL, a line break...): it goes "
            "in command headers, idempotency keys and the history"
        )
    if not is_utf8(name):
        raise SagaDefinitionError(f"step name {name!r} holds a lone surrogate (not UTF-8)")
    _check_action(name, "action", action)
    if kind is StepKind.COMPENSATABLE and compensation is None:
        raise SagaDefinitionError(
            f"step {name!r} is compensatable but has no compensation: give compensate=..., "
            "or make it the pivot or a retriable step"
        )
    if compensation is not None:
        _check_action(name, "compensation", compensation)
    if timeout is not None and not timeout > 0:
        raise SagaDefinitionError(f"step {name!r}: timeout must be > 0 seconds, got {timeout!r}")
    if isinstance(action, Remote) and timeout is None:
        raise SagaDefinitionError(
            f"step {name!r} is remote and needs a timeout (seconds): without one a lost reply "
            "would leave the saga waiting for ever"
        )
    if compensation_retry is not None:
        _check_bounded(f"step {name!r}", compensation_retry)
    if compensation_timeout is not None and not compensation_timeout > 0:
        raise SagaDefinitionError(
            f"step {name!r}: compensation_timeout must be > 0 seconds, got {compensation_timeout!r}"
        )
    if isinstance(compensation, Remote) and timeout is None and compensation_timeout is None:
        raise SagaDefinitionError(
            f"step {name!r} has a remote compensation and needs a timeout "
            "(or a compensation_timeout)"
        )
    return Step(
        name, kind, action, compensation, retry, timeout, compensation_retry, compensation_timeout
    )


class Saga(Generic[D]):
    """A saga definition, built step by step; each call checks what it adds.

    ``name``: the saga type (stored with each instance; 1-100 of ASCII letters, digits and
    ``_ - .``). ``data``: the pydantic model of the saga's data. ``deadline``: seconds from
    the start within which the saga must pass its pivot; an instance still before its pivot
    at the deadline is compensated. ``compensation_retry``: the default policy for
    compensations (a compensation that exhausts it leaves the instance FAILED; its
    ``attempts`` must be a number, not None). Raises :class:`SagaDefinitionError`."""

    def __init__(
        self,
        name: str,
        data: type[D],
        *,
        deadline: float | None = None,
        compensation_retry: Retry = COMPENSATION,
    ) -> None:
        try:
            ok = isinstance(name, str) and 0 < len(name) <= 100 and bool(check_name("topic", name))
        except ConfigurationError:
            ok = False
        if not ok:
            raise SagaDefinitionError(
                f"saga name {name!r} must be 1-100 ASCII letters, digits, '_', '-' or '.', "
                "starting with an ASCII letter or digit (no control character, no ':')"
            )
        if not (isinstance(data, type) and issubclass(data, BaseModel)):
            raise SagaDefinitionError(f"saga {name!r}: data must be a pydantic model class")
        if deadline is not None and not deadline > 0:
            raise SagaDefinitionError(f"saga {name!r}: deadline must be > 0 seconds")
        _check_bounded(f"saga {name!r}", compensation_retry)
        self.name = name
        self.data_type = data
        self.deadline = deadline
        self.compensation_retry = compensation_retry
        #: the steps in order; a tuple of several is a parallel group
        self.groups: list[tuple[Step, ...]] = []
        self.steps: dict[str, Step] = {}
        self.pivot_index: int | None = None
        #: steps run by the orchestrator's lean path: local, no timeout, alone in their group
        self.plain_local: set[str] = set()
        #: ``past_pivot_at(i)`` for every position ``i`` from 0 to ``len(groups)``
        self.past_pivot_by_position: tuple[bool, ...] = (False,)
        #: set when an orchestrator registers the saga: its steps can no longer change
        self.frozen = False

    # -- building ----------------------------------------------------------------------------

    def step(
        self,
        name: str,
        action: Callable[[D], Any] | Remote[D, Any],
        *,
        compensate: Callable[[D], Any] | Remote[D, Any] | None,
        retry: Retry = ONCE,
        timeout: float | None = None,
        compensation_retry: Retry | None = None,
        compensation_timeout: float | None = None,
    ) -> Saga[D]:
        """Add a compensatable step (``compensate`` is required). ``compensation_timeout``:
        seconds per compensation attempt (default: ``timeout``)."""
        return self._add(
            (
                Step.compensatable(
                    name,
                    action,
                    compensate=compensate,
                    retry=retry,
                    timeout=timeout,
                    compensation_retry=compensation_retry,
                    compensation_timeout=compensation_timeout,
                ),
            )
        )

    def pivot(
        self,
        name: str,
        action: Callable[[D], Any] | Remote[D, Any],
        *,
        retry: Retry = ONCE,
        timeout: float | None = None,
    ) -> Saga[D]:
        """Add the pivot: the step after which the saga cannot be compensated."""
        return self._add((_make(name, StepKind.PIVOT, action, None, retry, timeout, None),))

    def retriable(
        self,
        name: str,
        action: Callable[[D], Any] | Remote[D, Any],
        *,
        retry: Retry = FOREVER,
        timeout: float | None = None,
    ) -> Saga[D]:
        """Add a retriable step: after the pivot (or in a saga without compensatable
        steps), retried with ``retry`` until it succeeds, never compensated."""
        return self._add((Step.retriable(name, action, retry=retry, timeout=timeout),))

    def parallel(self, *steps: Step) -> Saga[D]:
        """Add steps that run at once and join: build them with :meth:`Step.compensatable`
        or :meth:`Step.retriable`. If one fails, the ones that completed are compensated
        (the group as a whole, in reverse order with the groups before it)."""
        if len(steps) < 2:
            raise SagaDefinitionError(f"saga {self.name!r}: a parallel group needs >= 2 steps")
        kinds = {s.kind for s in steps}
        if StepKind.PIVOT in kinds:
            raise SagaDefinitionError(
                f"saga {self.name!r}: the pivot cannot be in a parallel group "
                "(the point of no return must be one step)"
            )
        if len(kinds) > 1:
            raise SagaDefinitionError(
                f"saga {self.name!r}: a parallel group holds one kind of step, got "
                + ", ".join(sorted(k.value for k in kinds))
            )
        return self._add(tuple(steps))

    def _add(self, group: tuple[Step, ...]) -> Saga[D]:
        if self.frozen:
            raise SagaDefinitionError(
                f"saga {self.name!r} is in use by an orchestrator: define a new saga (a new "
                "name) instead of changing the steps under running instances"
            )
        for step in group:
            if not isinstance(step, Step):
                raise SagaDefinitionError(f"saga {self.name!r}: {step!r} is not a Step")
            # a Step built directly gets the same checks as one built by the helpers
            _make(
                step.name,
                step.kind,
                step.action,
                step.compensation,
                step.retry,
                step.timeout,
                step.compensation_retry,
                step.compensation_timeout,
            )
            if step.name in self.steps or [s.name for s in group].count(step.name) > 1:
                raise SagaDefinitionError(f"saga {self.name!r}: two steps are named {step.name!r}")
            kind = step.kind
            past_pivot = self.pivot_index is not None
            has_retriable = any(s.kind is StepKind.RETRIABLE for g in self.groups for s in g)
            if kind is StepKind.COMPENSATABLE and (past_pivot or has_retriable):
                raise SagaDefinitionError(
                    f"saga {self.name!r}: compensatable step {step.name!r} comes after the "
                    + ("pivot" if past_pivot else "retriable steps")
                    + ": nothing after the point of no return can be undone"
                )
            if kind is StepKind.PIVOT and past_pivot:
                raise SagaDefinitionError(
                    f"saga {self.name!r}: {step.name!r} would be a second pivot "
                    f"(the pivot is {self.groups[self.pivot_index or 0][0].name!r})"
                )
            if kind is StepKind.PIVOT and has_retriable:
                raise SagaDefinitionError(
                    f"saga {self.name!r}: pivot {step.name!r} comes after retriable steps"
                )
        for step in group:
            self.steps[step.name] = step
        if len(group) == 1 and not isinstance(group[0].action, Remote) and group[0].timeout is None:
            self.plain_local.add(group[0].name)
        if group[0].kind is StepKind.PIVOT:
            self.pivot_index = len(self.groups)
        self.groups.append(group)
        self.past_pivot_by_position = tuple(
            self.past_pivot_at(i) for i in range(len(self.groups) + 1)
        )
        return self

    # -- reading -----------------------------------------------------------------------------

    def past_pivot_at(self, position: int) -> bool:
        """Whether an instance about to run group ``position`` can no longer be compensated:
        its pivot has succeeded, or (in a saga without a pivot) it has reached a retriable
        step."""
        if self.pivot_index is not None:
            return position > self.pivot_index
        return any(g[0].kind is StepKind.RETRIABLE for g in self.groups[: position + 1])

    def check(self) -> None:
        """Raise :class:`SagaDefinitionError` if the saga has no step."""
        if not self.groups:
            raise SagaDefinitionError(f"saga {self.name!r} has no steps")

    def freeze(self) -> None:
        """No more steps (an orchestrator calls this when it registers the saga)."""
        self.check()
        self.frozen = True

    def __repr__(self) -> str:
        plan = " -> ".join("+".join(f"{s.name}({s.kind.value})" for s in g) for g in self.groups)
        return f"Saga({self.name!r}, {self.data_type.__name__}: {plan})"


def is_async(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn)


def steps_of(groups: Sequence[tuple[Step, ...]]) -> list[str]:
    return [s.name for g in groups for s in g]
