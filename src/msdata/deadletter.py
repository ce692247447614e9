"""When a delivery goes to the dead-letter topic, what it carries there, and the log line.

The one policy every transport adapter and the event bus apply (watermill's ``poison``
middleware plays this part there):

- a delivery whose ``max_attempts``-th attempt failed (``nack``) goes to the dead-letter
  topic instead of being redelivered (:func:`exhausted`);
- a delivery handed out more than ``max_attempts`` times without being settled (each time
  its consumer died holding it, or, on Redis and NATS, did not keep it alive past
  ``claim_idle`` / ``ack_wait``) goes there instead of being handed out again
  (:func:`overdue_reason`); a consumer that stops never counts (it gives back what it did
  not settle, uncounted);
- ``dead_letter(reason)`` (bad input: a :class:`~msdata.errors.DecodeError`, a
  :class:`~msdata.errors.RejectMessage`) goes there at once.

``x-msdata-attempts`` means one thing on every transport: how many times the message was
handed to a consumer of the group, a delivery in the prefetch of a consumer that died
counting as handed to it, started on or not (for a failed or dead-lettered delivery, its
``attempt``; for an overdue one, :func:`overdue_attempts`, since it was not handed out
again). A crash loop with ``max_attempts=3`` records 3 everywhere.

What goes there is a copy of the message, same id, body and key, with its headers plus the
four ``x-msdata-*`` headers (:data:`~msdata.transport.DEAD_LETTER_REASON`,
``..._TOPIC``, ``..._GROUP``, ``..._ATTEMPTS``), to
:func:`~msdata.transport.dead_letter_topic` (``topic.group.dlq``); :func:`dead_letter` builds
it. An adapter may do the move atomically its own way (Redis runs it in a Lua script) but
takes the topic and the message from here. Once the move is done, the adapter calls
:meth:`DeadLetter.log`: each dead letter is logged once, at WARNING, on the
``msdata.deadletter`` logger, with topic, group, message id, type, attempts and reason, and
the handler's traceback when a handler failure sent it there (see :func:`handler_failure`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import NamedTuple

from msdata import telemetry
from msdata.messages import safe_text
from msdata.transport import (
    DEAD_LETTER_ATTEMPTS,
    DEAD_LETTER_GROUP,
    DEAD_LETTER_REASON,
    DEAD_LETTER_TOPIC,
    TransportMessage,
    carryable_headers,
    carryable_text,
    dead_letter_topic,
)

__all__ = [
    "DEAD_LETTER_RESERVE",
    "DeadLetter",
    "dead_letter",
    "exhausted",
    "failed_reason",
    "fit",
    "handler_failure",
    "overdue_attempts",
    "overdue_reason",
]

log = logging.getLogger("msdata.deadletter")

# the largest body whose CloudEvents ``type`` the log line looks up (dead letters are rare)
_TYPE_LOOKUP_MAX = 1024 * 1024


#: bytes a transport's own publishes leave free under its size limit (NATS's
#: ``max_payload``, ``max_message_bytes``) for what a dead-letter copy adds: the four
#: ``x-msdata-*`` headers with a reason of up to 1 KiB (:func:`msdata.messages.safe_text`),
#: a topic of up to 150 characters and a group of up to 40 (names and separators included,
#: about 1,350 bytes at most), rounded up. A message msdata published can therefore always
#: be dead-lettered whole; a foreign one too large for that is :func:`fit` to the limit.
DEAD_LETTER_RESERVE = 2048


class _Cause(NamedTuple):
    type: str | None
    error: BaseException


_cause: ContextVar[_Cause | None] = ContextVar("msdata_dead_letter_cause", default=None)


def exhausted(attempt: int, max_attempts: int) -> bool:
    """True when a failed (nacked) ``attempt`` was the last one allowed: dead-letter it
    rather than deliver it again."""
    return attempt >= max_attempts


def failed_reason(attempt: int, reason: str | None) -> str:
    """The reason recorded for a delivery whose last attempt failed: the caller's, or a
    default naming the attempts."""
    return reason or f"failed {attempt} attempt{'' if attempt == 1 else 's'}"


def overdue_reason(attempt: int, max_attempts: int) -> str | None:
    """None if a delivery may be handed out as attempt number ``attempt``; else the
    dead-letter reason of one that was already handed out ``attempt - 1`` >= ``max_attempts``
    times without being settled. Record :func:`overdue_attempts` of it as its attempts.

    Only a consumer that died holding the delivery (or, on Redis and NATS, one that did not
    keep it alive past ``claim_idle`` / ``ack_wait``: its event loop blocked) leaves it
    counted: a stopping consumer gives it back uncounted. The reason says so."""
    if attempt <= max_attempts:
        return None
    times = overdue_attempts(attempt)
    return (
        f"handed out {times} time{'' if times == 1 else 's'} and never settled "
        f"(each time its consumer died or lost it before settling; max_attempts={max_attempts})"
    )


def overdue_attempts(attempt: int) -> int:
    """The ``attempts`` of an overdue delivery (one :func:`overdue_reason` refused to hand
    out as ``attempt``): the times it was handed to a consumer, ``attempt - 1``."""
    return attempt - 1


class DeadLetter(NamedTuple):
    """A message on its way to a dead-letter topic: publish ``message`` to ``topic``."""

    #: the dead-letter topic, ``<original topic>.<group>.dlq``
    topic: str
    #: the original message, with the four ``x-msdata-*`` headers added
    message: TransportMessage
    #: where it came from
    original_topic: str
    group: str
    attempts: int
    reason: str

    def log(self) -> None:
        """Log this dead letter, once, at WARNING (call it when the move succeeded)."""
        cause = _cause.get()
        type_name = cause.type if cause is not None else _type_of(self.message.body)
        if type_name is not None:
            type_name = safe_text(type_name, 200)
        message_id = safe_text(self.message.id, 200)  # a foreign id may hold escapes
        log.warning(
            "dead-lettered message %s (type %s) of %s/%s after %d attempt%s: %s",
            message_id,
            type_name or "unknown",
            self.original_topic,
            self.group,
            self.attempts,
            "" if self.attempts == 1 else "s",
            self.reason,
            exc_info=cause.error if cause is not None else None,
            extra={
                "msdata_topic": self.original_topic,
                "msdata_group": self.group,
                "msdata_message_id": message_id,
                "msdata_type": type_name,
                "msdata_attempts": self.attempts,
                "msdata_reason": self.reason,
            },
        )
        telemetry.hooks.dead_lettered(self)  # telemetry: dead-letter metric


def dead_letter(
    message: TransportMessage, topic: str, group: str, attempts: int, reason: str
) -> DeadLetter:
    """The dead letter of ``message``, delivered ``attempts`` times to ``group`` of
    ``topic``. The reason is folded onto one line (header values cannot hold line breaks on
    every broker), escaped and cut to 1 KiB (:func:`msdata.messages.safe_text`), so every
    broker can carry it. A foreign message's headers, id and key that some broker could
    not carry are made carryable (:func:`msdata.transport.carryable_headers`: a header name
    that is not a token is dropped, line breaks become spaces)."""
    reason = safe_text(" ".join(reason.split())) or "dead-lettered"
    # a foreign message's headers, id and key, made to pass every transport's check
    headers = carryable_headers(message.headers) if message.headers else {}
    headers[DEAD_LETTER_REASON] = reason
    headers[DEAD_LETTER_TOPIC] = topic
    headers[DEAD_LETTER_GROUP] = group
    headers[DEAD_LETTER_ATTEMPTS] = str(attempts)
    key = message.key
    copy = TransportMessage(
        carryable_text(message.id) or "-",
        message.body,
        None if key is None else carryable_text(key),
        MappingProxyType(headers),
    )
    return DeadLetter(dead_letter_topic(topic, group), copy, topic, group, attempts, reason)


def fit(
    letter: DeadLetter, limit: int, size: Callable[[TransportMessage], int]
) -> DeadLetter | None:
    """``letter`` made to fit a transport's ``limit`` on ``size(message)`` (a foreign
    message that fitted the broker's limit but whose copy, with the ``x-msdata-*``
    headers, does not): as it is when it fits; else with its reason cut; else also without
    the original message's own headers (the reason says so); the body, id and key are always
    kept whole. None when even that does not fit: the caller then drops the message with
    an ERROR log line, never redelivers it forever."""
    message = letter.message
    over = size(message) - limit
    if over <= 0:
        return letter
    headers = dict(message.headers)
    reason = letter.reason
    room = len(reason.encode("utf-8")) - over
    if room < 40:  # the reason alone cannot make room: the message's own headers go too
        headers = {n: v for n, v in headers.items() if n.startswith("x-msdata-")}
        reason = f"(its headers dropped to fit the size limit) {reason}"
        headers[DEAD_LETTER_REASON] = reason
        over = size(message._replace(headers=headers)) - limit
        room = len(reason.encode("utf-8")) - over
        if room < 3:
            return None
    reason = safe_text(reason, room)
    headers[DEAD_LETTER_REASON] = reason
    return letter._replace(
        message=message._replace(headers=MappingProxyType(headers)), reason=reason
    )


@contextmanager
def handler_failure(type_name: str | None, error: BaseException) -> Iterator[None]:
    """Settle a delivery whose handler raised ``error`` inside this block: if the settling
    dead-letters it, the log line carries ``type_name`` and the traceback of ``error``.
    (The event bus uses it; the adapter that moves the message logs it.)"""
    token = _cause.set(_Cause(type_name, error))
    try:
        yield
    finally:
        _cause.reset(token)


def _type_of(body: bytes) -> str | None:
    """The CloudEvents ``type`` of a body, if it is a JSON object that has one."""
    if not body.startswith(b"{") or len(body) > _TYPE_LOOKUP_MAX:
        return None
    try:
        value = json.loads(body).get("type")
    except Exception:  # not JSON, not an object, nested too deep (RecursionError): no type
        return None
    return value if isinstance(value, str) else None
