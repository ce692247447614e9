"""The hooks msdata calls where observability needs to see something; no-op by default.

The library's patterns call ``telemetry.hooks.<hook>(...)`` at a few points (a message
created in the outbox or on the bus, a relay batch published, a delivery consumed, a command
or query handled, an idempotency claim decided, a composition run, a dead letter moved). The
installed :class:`Telemetry` decides what that means; the default one does nothing and
costs one attribute lookup and a call. The core imports no telemetry package:
:class:`msdata.adapters.opentelemetry.OpenTelemetry` (extra ``otel``) is the implementation
that makes spans and metrics, following the OpenTelemetry semantic conventions for
messaging::

    from msdata import telemetry
    from msdata.adapters.opentelemetry import OpenTelemetry

    telemetry.install(OpenTelemetry())        # once, at start-up; returns the previous one

For logs, :class:`MessageContextFilter` puts the message id, correlation id, causation id
and saga id of the message being handled into every log record (as ``extra`` attributes a
JSON formatter prints); add it to your handlers. The library never configures logging.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Literal

from msdata.messages import Envelope, current_envelope

if TYPE_CHECKING:
    from msdata.deadletter import DeadLetter
    from msdata.transport import Delivery, TransportMessage

__all__ = [
    "ConsumeScope",
    "MessageContextFilter",
    "Outcome",
    "ReceiveScope",
    "StepScope",
    "Telemetry",
    "current_saga_id",
    "hooks",
    "install",
]

#: how a consumed delivery was settled: ``ack`` (handled), ``nack`` (to be redelivered),
#: ``dead_letter`` (moved to the dead-letter topic), ``cancelled`` (the consumer stopped)
Outcome = Literal["ack", "nack", "dead_letter", "cancelled"]

#: the id of a saga instance to report in this task's log records (an override: the filter
#: finds the saga step that runs in this task by itself)
current_saga_id: ContextVar[str | None] = ContextVar("msdata_saga_id", default=None)


class ConsumeScope:
    """What :meth:`Telemetry.consume` returns: the consumer calls :meth:`failed` when the
    handler raised (with how the delivery is settled) and :meth:`close` once, when the
    handler is over. The no-op scope is one shared object."""

    __slots__ = ()

    def failed(self, error: BaseException, outcome: Outcome) -> None:
        """The handler raised ``error``; the delivery is settled as ``outcome``."""

    def close(self) -> None:
        """The handler is over (its outcome is ``ack`` unless :meth:`failed` said else)."""


class ReceiveScope:
    """What :meth:`Telemetry.receiving` returns: the consumer calls :meth:`close` once, when
    it is done with the batch (every delivery handled, or the rest given back). The no-op
    scope is one shared object."""

    __slots__ = ()

    def close(self) -> None:
        """The consumer is done with the batch."""


class _Publishing:
    """The no-op context of :meth:`Telemetry.publishing`: hands the messages back as they are."""

    __slots__ = ("messages",)

    def __init__(self, messages: list[TransportMessage]) -> None:
        self.messages = messages

    def __enter__(self) -> list[TransportMessage]:
        return self.messages

    def __exit__(self, *exc: object) -> None:
        return None


class _Scope:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class StepScope:
    """What :meth:`Telemetry.saga_step` returns (the no-op one is shared)."""

    __slots__ = ()

    def failed(self, error: str) -> None:
        """The step failed with ``error`` (its text)."""

    def close(self) -> None:
        """The step is over."""


_NO_CONSUME = ConsumeScope()
_NO_RECEIVE = ReceiveScope()
_NO_STEP = StepScope()
_NO_SCOPE = _Scope()


class Telemetry:
    """The hook layer. Every method is a no-op here; an implementation overrides what it
    observes. Hooks must not raise (an implementation catches its own errors) and must be
    cheap: they run on the hot paths (per message on the bus, per batch in the relay)."""

    #: False for the no-op: a caller may skip work that only telemetry needs
    enabled: bool = False

    def message_created(
        self, topic: str, envelope: Envelope[Any], *, outbox: bool
    ) -> Envelope[Any]:
        """A message is about to be written to the outbox (``outbox=True``) or published by
        the event bus: return the envelope to send, e.g. with trace context headers
        (``traceparent``, ``tracestate``) added."""
        return envelope

    def publishing(
        self, topic: str, messages: list[TransportMessage], publisher: object
    ) -> _Publishing:
        """The outbox relay publishes ``messages`` (one batch, one topic) through
        ``publisher`` inside this ``with`` block; ``__enter__`` returns the messages to
        publish (e.g. with the relay's own trace context in their headers). An exception
        leaving the block is the publish's failure."""
        return _Publishing(messages)

    def consume(
        self,
        topic: str,
        group: str,
        delivery: Delivery,
        envelope: Envelope[Any],
        handler: Callable[..., Any],
    ) -> ConsumeScope:
        """The event bus's consumer of ``group`` hands ``envelope`` (decoded from
        ``delivery``) to ``handler``."""
        return _NO_CONSUME

    def receiving(self, topic: str, group: str, deliveries: Sequence[Delivery]) -> ReceiveScope:
        """The event bus's consumer of ``group`` received ``deliveries`` (one batch from the
        transport, handled in order): :meth:`consume` is then called for each one it hands
        to a handler, and :meth:`ReceiveScope.close` once it is done with the batch."""
        return _NO_RECEIVE

    def dead_lettered(self, dead_letter: DeadLetter) -> None:
        """A message was moved to its dead-letter topic (called once per dead letter, by
        :meth:`msdata.deadletter.DeadLetter.log`)."""

    def handle(self, kind: str, type_name: str, handler: Callable[..., Any]) -> _Scope:
        """A CQRS bus runs ``handler`` for a ``kind`` (``command``/``query``) of type
        ``type_name`` inside this ``with`` block."""
        return _NO_SCOPE

    def idempotency_claim(self, scope: str, outcome: str) -> None:
        """An idempotency key was claimed: ``outcome`` is ``claimed`` (the operation runs),
        ``replayed`` (the stored result is returned), ``conflict`` (reused with a different
        request) or ``in_progress``."""

    def compose(self, parts: Sequence[str]) -> _Scope:
        """API composition calls the parts named ``parts`` inside this ``with`` block."""
        return _NO_SCOPE

    def saga_step(self, saga: str, saga_id: str, step: str, *, compensation: bool) -> StepScope:
        """A saga instance runs one local step (or its compensation) in this task; the
        orchestrator calls :meth:`StepScope.failed` if it failed and :meth:`StepScope.close`
        when it is over."""
        return _NO_STEP

    def saga_status(self, saga: str, status: str) -> None:
        """A saga instance of type ``saga`` started (``status`` ``"started"``) or ended
        (``"completed"``, ``"compensated"``, ``"failed"``)."""


#: the installed hooks; the library reads ``telemetry.hooks`` at each call, so
#: :func:`install` takes effect at once everywhere
hooks: Telemetry = Telemetry()


def install(telemetry: Telemetry | None) -> Telemetry:
    """Install ``telemetry`` (``None``: the no-op) for the whole process; returns the one
    installed before, so a test can put it back."""
    global hooks
    previous = hooks
    hooks = telemetry if telemetry is not None else Telemetry()
    return previous


class MessageContextFilter(logging.Filter):
    """A logging filter that adds to every record the ids of the message being handled in
    this task (from :func:`msdata.messages.current_envelope`) and of the saga instance
    (:data:`current_saga_id`): ``message_id``, ``correlation_id``, ``causation_id``,
    ``saga_id`` (``None`` when there is none). A record that already has one (passed as
    ``extra``) keeps it. It never drops a record. Add it to a handler, so records of every
    logger (msdata's and yours) carry them::

        handler.addFilter(MessageContextFilter())
    """

    def filter(self, record: logging.LogRecord) -> bool:
        env = current_envelope()
        d = record.__dict__
        if env is not None:
            d.setdefault("message_id", env.id)
            d.setdefault("correlation_id", env.correlation_id)
            d.setdefault("causation_id", env.causation_id)
        else:
            d.setdefault("message_id", None)
            d.setdefault("correlation_id", None)
            d.setdefault("causation_id", None)
        saga_id = current_saga_id.get()
        if saga_id is None:
            saga = sys.modules.get("msdata.saga.messages")  # loaded only where sagas are used
            if saga is not None:
                step = saga._step.get(None)
                saga_id = step.saga_id if step is not None else None
        d.setdefault("saga_id", saga_id)
        return True
