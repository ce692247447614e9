"""Middleware: one shape for the event bus, the command bus and the query bus.

A middleware is ``async def mw(envelope, call_next) -> result``: it may act before and
after ``await call_next(envelope)``, or not call it at all. Chains are composed once, when
a handler is registered, so dispatch pays only for the middleware actually used.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from msdata.backoff import Backoff, exponential_backoff
from msdata.errors import ConfigurationError, RejectMessage
from msdata.messages import Envelope

__all__ = [
    "Middleware",
    "Next",
    "as_async",
    "compose",
    "logging_middleware",
    "retry",
    "timing",
]

Next = Callable[[Envelope[Any]], Awaitable[Any]]
Middleware = Callable[[Envelope[Any], Next], Awaitable[Any]]


def as_async(fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """``fn`` itself if it is a coroutine function, else a coroutine function calling it and
    awaiting what it returns when that is awaitable (an object with ``async def __call__``,
    a sync wrapper around a coroutine function)."""
    if inspect.iscoroutinefunction(fn):
        return fn

    async def call(*args: Any) -> Any:
        result = fn(*args)
        if inspect.isawaitable(result):
            result = await result
        return result

    call.__name__ = getattr(fn, "__name__", "handler")
    return call


def compose(handler: Callable[[Any], Any], middleware: Sequence[Middleware]) -> Next:
    """The handler (sync or async, taking the message) wrapped in ``middleware``, the first
    one outermost, as one callable taking the envelope."""
    fn = as_async(handler)

    async def terminal(envelope: Envelope[Any]) -> Any:
        return await fn(envelope.message)

    chain: Next = terminal
    for mw in reversed(middleware):
        chain = _bind(mw, chain)
    return chain


def _bind(mw: Middleware, call_next: Next) -> Next:
    async def step(envelope: Envelope[Any]) -> Any:
        return await mw(envelope, call_next)

    return step


def retry(
    attempts: int = 3,
    *,
    base_delay: float = 0.05,
    max_delay: float = 2.0,
    backoff: Backoff | None = None,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
) -> Middleware:
    """Retry the rest of the chain in-process up to ``attempts`` times in all, waiting
    ``backoff(failures)`` seconds between tries (default: :func:`msdata.backoff.exponential_backoff`
    from ``base_delay`` doubling up to ``max_delay`` seconds, full jitter). A
    :class:`~msdata.errors.RejectMessage` and cancellation are never retried. When the
    attempts are used up the last error propagates (to the transport's redelivery, or the
    caller). Raises :class:`~msdata.errors.ConfigurationError` if ``attempts < 1``."""
    if attempts < 1:
        raise ConfigurationError("attempts must be >= 1")
    wait = backoff or exponential_backoff(base_delay, 2.0, max_delay, jitter=1.0)

    async def mw(envelope: Envelope[Any], call_next: Next) -> Any:
        for attempt in range(1, attempts + 1):
            try:
                return await call_next(envelope)
            except (RejectMessage, asyncio.CancelledError):
                raise  # a rejection is final, and cancellation is not a failure
            except retry_on:
                if attempt == attempts:
                    raise
                await asyncio.sleep(wait(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    return mw


def logging_middleware(
    logger: logging.Logger | None = None, *, level: int = logging.DEBUG
) -> Middleware:
    """Log each message handled, and each failure, with its id, type and correlation id."""
    log = logger or logging.getLogger("msdata")

    async def mw(envelope: Envelope[Any], call_next: Next) -> Any:
        extra = {
            "msdata_message_id": envelope.id,
            "msdata_type": envelope.type,
            "msdata_correlation_id": envelope.correlation_id,
        }
        try:
            result = await call_next(envelope)
        except Exception:
            log.exception(
                "handling %s %s failed (correlation %s)",
                envelope.type,
                envelope.id,
                envelope.correlation_id,
                extra=extra,
            )
            raise
        if log.isEnabledFor(level):
            log.log(
                level,
                "handled %s %s (correlation %s)",
                envelope.type,
                envelope.id,
                envelope.correlation_id,
                extra=extra,
            )
        return result

    return mw


def timing(record: Callable[[Envelope[Any], float, Exception | None], None]) -> Middleware:
    """Call ``record(envelope, seconds, error_or_None)`` after each handling (not after a
    cancellation, which is no outcome of the handler)."""

    async def mw(envelope: Envelope[Any], call_next: Next) -> Any:
        started = time.perf_counter()
        try:
            result = await call_next(envelope)
        except Exception as e:
            record(envelope, time.perf_counter() - started, e)
            raise
        record(envelope, time.perf_counter() - started, None)
        return result

    return mw
