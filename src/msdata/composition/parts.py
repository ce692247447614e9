"""The parts of a composed answer, and why a part has no answer of its own.

A part is one call to one source: a name, an async callable and its positional arguments,
its own timeout, whether the answer needs it, and what to use instead when it fails.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import (
    Any,
    ClassVar,
    Final,
    Generic,
    Literal,
    TypeAlias,
    TypeVar,
    TypeVarTuple,
    Unpack,
    final,
)

from msdata.errors import ConfigurationError

__all__ = [
    "Cancelled",
    "Failed",
    "OptionalPart",
    "Part",
    "PartFailure",
    "RequiredPart",
    "TimedOut",
    "optional",
    "required",
]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


def _fallback_text(error: BaseException | None) -> str:
    if error is None:
        return ""
    return f"; its fallback raised {type(error).__name__}: {error}"


@dataclass(frozen=True, slots=True)
class TimedOut:
    """The part did not answer within ``seconds``: its own timeout, or the time the overall
    deadline gave it. ``fallback_error`` is what its fallback raised, if one ran and failed
    (a fallback that overran is a :class:`TimeoutError` here)."""

    seconds: float
    fallback_error: BaseException | None = None
    kind: ClassVar[Literal["timeout"]] = "timeout"

    def __str__(self) -> str:
        return f"timed out after {self.seconds:g} s{_fallback_text(self.fallback_error)}"


@dataclass(frozen=True, slots=True)
class Failed:
    """The part's call raised ``error``. ``fallback_error`` as for :class:`TimedOut`."""

    error: Exception
    fallback_error: BaseException | None = None
    kind: ClassVar[Literal["error"]] = "error"

    def __str__(self) -> str:
        error = self.error
        return f"raised {type(error).__name__}: {error}{_fallback_text(self.fallback_error)}"


@dataclass(frozen=True, slots=True)
class Cancelled:
    """The part's call ended in ``CancelledError`` that the composition did not ask for (the
    source cancelled its own work). ``fallback_error`` as for :class:`TimedOut`."""

    fallback_error: BaseException | None = None
    kind: ClassVar[Literal["cancelled"]] = "cancelled"

    def __str__(self) -> str:
        return f"was cancelled{_fallback_text(self.fallback_error)}"


#: Why a part has no answer of its own; ``match`` on it, or read ``.kind``
#: (``"timeout"``, ``"error"``, ``"cancelled"``).
PartFailure: TypeAlias = TimedOut | Failed | Cancelled


class _Unset(enum.Enum):
    UNSET = enum.auto()


UNSET: Literal[_Unset.UNSET] = _Unset.UNSET


class Part(Generic[T]):
    """One call of a composition, answering ``T``. Made by :func:`required` or
    :func:`optional`; its attributes are read-only (``Final``), so one part may be composed
    any number of times (each :func:`~msdata.composition.compose` calls ``fn(*args)``
    afresh). Compared by identity."""

    __slots__ = ("args", "default", "fallback", "fn", "name", "timeout")

    #: True for a :class:`RequiredPart`: the answer cannot be given without it.
    required: ClassVar[bool]

    def __init__(
        self,
        name: str,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        timeout: float | None,
        default: T | _Unset,
        fallback: Callable[[PartFailure], Awaitable[T]] | None,
    ) -> None:
        if type(name) is not str or not name:
            raise ConfigurationError(f"a part's name must be a non-empty string, got {name!r}")
        if not callable(fn):
            if inspect.iscoroutine(fn):
                fn.close()  # never awaited by anyone: close it so Python does not warn
                raise ConfigurationError(
                    f"part {name!r}: got a coroutine object; pass the async function and its "
                    f"arguments instead, e.g. required({name!r}, fetch, 42), so that each "
                    "composition makes its own call"
                )
            raise ConfigurationError(f"part {name!r}: {fn!r} is not callable")
        if timeout is not None and not (type(timeout) is float and 0.0 < timeout < math.inf):
            check_seconds(f"part {name!r}: timeout", timeout)
        if fallback is not None:
            if default is not UNSET:
                raise ConfigurationError(
                    f"part {name!r}: give a default value or a fallback function, not both"
                )
            if not callable(fallback):
                raise ConfigurationError(
                    f"part {name!r}: fallback must be an async function taking the failure; "
                    f"for a plain value use default=, got {fallback!r}"
                )
        # read-only (Final) for type checkers; not guarded at run time, which would cost
        # more than the rest of building a part
        self.name: Final[str] = name
        self.fn: Final[Callable[..., Awaitable[T]]] = fn
        self.args: Final[tuple[Any, ...]] = args
        self.timeout: Final[float | None] = timeout
        self.default: Final[T | _Unset] = default
        self.fallback: Final[Callable[[PartFailure], Awaitable[T]] | None] = fallback

    def __repr__(self) -> str:
        fn = getattr(self.fn, "__qualname__", repr(self.fn))
        extra = "" if self.timeout is None else f", timeout={self.timeout:g}"
        if self.default is not UNSET:
            extra += f", default={self.default!r}"
        if self.fallback is not None:
            extra += ", fallback=..."
        return f"{type(self).__name__}({self.name!r}, {fn}{extra})"


@final
class RequiredPart(Part[T]):
    """A part the answer needs: if it fails and its fallback (if any) fails too,
    ``compose`` cancels the other calls and raises :class:`~msdata.errors.RequiredPartFailed`.
    ``composed[part]`` is a ``T``."""

    __slots__ = ()
    required = True


@final
class OptionalPart(Part[T]):
    """A part the answer can do without: if it fails (and its fallback, if any, fails too),
    the answer is given without it and ``composed.missing`` says why. ``composed[part]`` is
    a ``T | None``."""

    __slots__ = ()
    required = False


def required(
    name: str,
    fn: Callable[[Unpack[Ts]], Awaitable[T]],
    /,
    *args: *Ts,
    timeout: float | None = None,
    default: T | _Unset = UNSET,
    fallback: Callable[[PartFailure], Awaitable[T]] | None = None,
) -> RequiredPart[T]:
    """A part the answer cannot do without: ``await fn(*args)`` within ``timeout``.

    - ``name``: the part's name in ``composed.missing``, ``from_fallback`` and errors; unique
      within one composition.
    - ``fn``: an async callable (``async def``, a bound ``QueryBus.ask``, an httpx client's
      ``get``...) or any callable returning an awaitable; keyword arguments go through
      ``functools.partial``. A sync function is refused by ``compose`` with
      :class:`~msdata.errors.ConfigurationError`.
    - ``timeout``: seconds the call may take (``None``: only the overall deadline bounds it).
    - ``default``: the value to answer with when the call fails, times out or is cancelled.
    - ``fallback``: instead of ``default``, an async function called with the
      :data:`PartFailure`; it gets the same ``timeout`` again, counted from its start, within
      the overall deadline.

    Raises :class:`~msdata.errors.ConfigurationError` for an empty name, a timeout that is
    not a positive finite number, a ``fn`` or ``fallback`` that is not callable, or both a
    default and a fallback.
    """
    return RequiredPart(name, fn, args, timeout, default, fallback)


def optional(
    name: str,
    fn: Callable[[Unpack[Ts]], Awaitable[T]],
    /,
    *args: *Ts,
    timeout: float | None = None,
    default: T | _Unset = UNSET,
    fallback: Callable[[PartFailure], Awaitable[T]] | None = None,
) -> OptionalPart[T]:
    """A part the answer can do without; arguments as for :func:`required`. When the call
    and its fallback (if any) fail, ``composed[part]`` is ``None`` and
    ``composed.missing[name]`` is the :data:`PartFailure`."""
    return OptionalPart(name, fn, args, timeout, default, fallback)


def check_seconds(what: str, seconds: float) -> None:
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or seconds <= 0
    ):
        raise ConfigurationError(
            f"{what} must be a positive finite number of seconds, got {seconds!r}"
        )


def failure_cause(failure: PartFailure) -> BaseException:
    """The exception to chain as ``__cause__`` of an error about ``failure``."""
    if failure.fallback_error is not None:
        return failure.fallback_error
    if isinstance(failure, Failed):
        return failure.error
    if isinstance(failure, TimedOut):
        return TimeoutError(str(failure))
    return asyncio.CancelledError()
