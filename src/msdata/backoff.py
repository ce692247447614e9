"""The one backoff rule msdata uses wherever it waits before trying again: the relay's
publish retries, the event bus's redelivery delays, the retry middleware, saga steps and
compensations.

A :data:`Backoff` maps how many tries have failed so far (``failures >= 1``) to the seconds
to wait before the next one. :func:`exponential_backoff` builds the standard one:
``base * factor**(failures - 1)``, capped at ``maximum``, minus a random share of at most
``jitter`` of it. ``jitter=1`` is "full jitter" and ``jitter=0.5`` "equal jitter" in the
terms of the AWS Architecture Blog's "Exponential Backoff And Jitter" (2015).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from msdata.errors import ConfigurationError

__all__ = ["Backoff", "constant_backoff", "exponential_backoff"]

#: seconds to wait before the next try, given how many tries have failed so far (>= 1)
Backoff = Callable[[int], float]


def exponential_backoff(
    base: float = 1.0, factor: float = 2.0, maximum: float = 300.0, jitter: float = 0.5
) -> Backoff:
    """``base * factor**(failures-1)`` seconds, capped at ``maximum``, with a random share of
    at most ``jitter`` (0..1) taken off, so that callers retrying together spread out.

    Raises :class:`ConfigurationError` unless ``base >= 0``, ``factor >= 1``,
    ``maximum >= 0`` and ``0 <= jitter <= 1``."""
    if base < 0 or factor < 1 or maximum < 0 or not 0 <= jitter <= 1:
        raise ConfigurationError("backoff needs base >= 0, factor >= 1, maximum >= 0, 0<=jitter<=1")
    rand = random.random

    def backoff(failures: int) -> float:
        # cap the exponent first: factor**n overflows a float for large n
        exp = min(max(0, failures - 1), 1024)
        try:
            delay = min(maximum, base * factor**exp)
        except OverflowError:
            delay = maximum
        return delay * (1.0 - jitter * rand())

    return backoff


def constant_backoff(seconds: float) -> Backoff:
    """The same ``seconds`` after every failure (tests, fixed-rate polling)."""
    if seconds < 0:
        raise ConfigurationError("backoff seconds must be >= 0")
    return lambda failures: seconds
