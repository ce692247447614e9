"""The OpenTelemetry implementation of msdata's telemetry hooks.

Spans follow the OpenTelemetry semantic conventions for messaging (span name
``{operation} {destination}``; attributes ``messaging.system``,
``messaging.destination.name``, ``messaging.operation.type``, ``messaging.operation.name``,
``messaging.message.id``, ``messaging.message.conversation_id`` (msdata's correlation id),
``messaging.consumer.group.name``):

=====================  ========  ==========================================================
span                   kind      where
=====================  ========  ==========================================================
``create <topic>``     PRODUCER  ``Outbox.add``: one per message; its context goes into the
                                 message's ``traceparent``/``tracestate`` headers (stored
                                 in the outbox row and in the CloudEvents body)
``publish <topic>``    CLIENT    the relay publishing a batch (one topic): one span per batch,
                                 linked to each row's creation context (its ``create``
                                 span), which goes out unchanged (``relay_spans="message"``:
                                 a PRODUCER span per row, child of its ``create``, whose
                                 context replaces ``traceparent``)
``publish <topic>``    PRODUCER  ``EventBus.publish`` (child of the current span; its
                                 context goes into the headers)
``process <topic>``    CONSUMER  the event bus's consumer handling one delivery with its one
                                 handler (``code.function.name``), child of the context in
                                 the delivery's headers (``process_spans="batch"``: one per
                                 batch received, linked to each delivery's context, child
                                 of the first sampled one)
``handle <type>``      INTERNAL  with ``handler_spans=True``: the handler, child of
                                 ``process``
``idempotency claim``  INTERNAL  an idempotency key claimed (``msdata.idempotency.outcome``)
``compose``            INTERNAL  an API composition
``saga …``             INTERNAL  ``saga <name> step <s>``: a saga's local step (``saga
                                 <name> compensate <s>``: its compensation); a remote
                                 step is the ``create`` span of the command it sends
=====================  ========  ==========================================================

Metrics (meter ``msdata``): ``msdata.outbox.created``, ``messaging.client.sent.messages``
(with ``error.type`` on a failed publish), ``messaging.client.consumed.messages``
(``msdata.outcome``: ack, nack, dead_letter, cancelled), ``msdata.consumer.dead_letters``,
``messaging.process.duration`` (seconds), ``msdata.idempotency.claims``
(``msdata.idempotency.outcome``), ``msdata.saga.step.duration`` (seconds),
``msdata.saga.instances`` (``msdata.saga.status``: started, completed, compensated,
failed), and the
observable gauges of :meth:`OpenTelemetry.watch_outbox`,
:meth:`OpenTelemetry.watch_projection` and :meth:`OpenTelemetry.watch_consumer`
(``msdata.consumer.lag``). See docs/observability.md.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from opentelemetry import baggage, metrics, trace
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.propagate import get_global_textmap
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from msdata import __version__
from msdata.errors import ConfigurationError
from msdata.messages import Envelope
from msdata.telemetry import (
    ConsumeScope,
    Outcome,
    ReceiveScope,
    StepScope,
    Telemetry,
    _Publishing,
)
from msdata.transport import TransportMessage

if TYPE_CHECKING:
    from msdata.deadletter import DeadLetter
    from msdata.outbox.store import OutboxStatus
    from msdata.transport import Delivery

__all__ = ["OpenTelemetry"]

log = logging.getLogger("msdata.telemetry")

_TRACEPARENT = "traceparent"
_TRACESTATE = "tracestate"
_BAGGAGE = "baggage"
_NO_CONSUME = ConsumeScope()
_NO_STEP = StepScope()
_PRODUCER = SpanKind.PRODUCER
_CONSUMER = SpanKind.CONSUMER
_INTERNAL = SpanKind.INTERNAL
_CLIENT = SpanKind.CLIENT
_ODD_HEX = frozenset("13579bdfBDF")
#: a W3C ``traceparent`` of version 00 exactly as the W3C propagator of the API reads it
#: (lowercase hex, no surrounding blanks); anything else is left to the propagator
_STRICT_TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_FLAGS = [TraceFlags(i) for i in range(256)]
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_SPAN_MODES = ("message", "batch")


def _w3c_only(propagator: TextMapPropagator) -> bool:
    """Whether ``propagator`` is the API's default (W3C trace context, optionally with W3C
    baggage, as ``OTEL_PROPAGATORS=tracecontext,baggage`` makes it): then msdata reads and
    writes ``traceparent`` itself, with the same result, where no ``tracestate`` and no
    baggage is involved (the propagator is called for those)."""
    if type(propagator) is TraceContextTextMapPropagator:
        return True
    if type(propagator) is not CompositePropagator:
        return False
    kinds = [type(p) for p in getattr(propagator, "_propagators", ())]
    return kinds in (
        [TraceContextTextMapPropagator],
        [TraceContextTextMapPropagator, W3CBaggagePropagator],
    )


#: the context key of the API's baggage (``baggage.get_all()`` is the public way, ~0.5 us)
_BAGGAGE_KEY: str | None = getattr(baggage, "_BAGGAGE_KEY", None)


def _has_baggage() -> bool:
    """Whether the current context holds baggage (the W3C baggage propagator writes a
    ``baggage`` header only then)."""
    if _BAGGAGE_KEY is None:  # pragma: no cover - another API's layout
        return bool(baggage.get_all())
    return bool(otel_context.get_current().get(_BAGGAGE_KEY))


def _remote_parent(traceparent: str) -> otel_context.Context | None:
    """The context the W3C propagator extracts from a carrier whose only trace header is
    ``traceparent`` (no ``tracestate``, no ``baggage``), when that header is a strict
    version-00 one with non-zero ids; None for anything else (the caller then asks the
    propagator, which decides)."""
    tp = traceparent
    if len(tp) != 55 or _STRICT_TRACEPARENT.fullmatch(tp) is None:
        return None
    trace_hex, span_hex = tp[3:35], tp[36:52]
    if trace_hex == _ZERO_TRACE or span_hex == _ZERO_SPAN:
        return None
    ctx = SpanContext(int(trace_hex, 16), int(span_hex, 16), True, _FLAGS[int(tp[53:], 16)])
    return trace.set_span_in_context(NonRecordingSpan(ctx), otel_context.Context())


class _Tally:
    """A monotonic count per attribute set, kept in a dict and reported by an observable
    counter at each collection: a count per message costs a dict update instead of the
    SDK's synchronous ``Counter.add`` (about 4-5 us each on the SDK). Thread-safe (an
    outbox may be written from worker threads; the callback runs in the metric reader's
    thread)."""

    __slots__ = ("_counts", "_lock")

    def __init__(self) -> None:
        self._counts: dict[tuple[tuple[str, str], ...], int] = {}
        self._lock = threading.Lock()

    def add(self, n: int, key: tuple[tuple[str, str], ...]) -> None:
        """Count ``n`` more for the attributes ``key`` (pairs of name and value)."""
        with self._lock:
            counts = self._counts
            counts[key] = counts.get(key, 0) + n

    def observe(self, _: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            items = list(self._counts.items())
        return [Observation(n, dict(key)) for key, n in items]


def _system_of(obj: object, default: str) -> str:
    """``messaging.system`` of a transport: its adapter package (``rabbitmq``, ``redis``,
    ``nats``, ``memory``), else ``default``."""
    module = type(obj).__module__
    if module.startswith("msdata.adapters."):
        return module.split(".")[2]
    return default


def _sent_key(system: str, topic: str, exc: BaseException | None) -> tuple[tuple[str, str], ...]:
    """The attributes of ``messaging.client.sent.messages`` for a relay batch
    (``messaging.operation.name`` and ``messaging.system`` are required by the conventions)."""
    if exc is None:
        return (
            ("messaging.operation.name", "publish"),
            ("messaging.system", system),
            ("messaging.destination.name", topic),
        )
    return (
        ("messaging.operation.name", "publish"),
        ("messaging.system", system),
        ("messaging.destination.name", topic),
        ("error.type", type(exc).__qualname__),
    )


class _RelayBatch:
    """The ``with`` block around one relay publish: one ``publish`` span per row."""

    __slots__ = ("_otel", "_spans", "_system", "_topic", "messages")

    def __init__(
        self, otel: OpenTelemetry, topic: str, messages: list[TransportMessage], system: str
    ) -> None:
        self._otel = otel
        self._topic = topic
        self._system = system
        self.messages = messages
        self._spans: list[Span] = []

    def __enter__(self) -> list[TransportMessage]:
        otel = self._otel
        start = otel._tracer.start_span
        extract, inject = otel._extract, otel._inject
        name = f"publish {self._topic}"
        base: dict[str, Any] = {
            "messaging.system": self._system,
            "messaging.destination.name": self._topic,
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
            "messaging.batch.message_count": len(self.messages),
        }
        out: list[TransportMessage] = []
        spans = self._spans
        for m in self.messages:
            headers = m.headers
            parent = extract(headers)
            attrs = dict(base)
            attrs["messaging.message.id"] = m.id
            span = start(name, parent, _PRODUCER, attrs)
            spans.append(span)
            carrier = dict(headers)
            inject(carrier, span)
            out.append(TransportMessage(m.id, m.body, m.key, MappingProxyType(carrier)))
        return out

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            for span in self._spans:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        for span in self._spans:
            span.end()
        self._otel._sent.add(len(self._spans), _sent_key(self._system, self._topic, exc))


class _Consume(ConsumeScope):
    __slots__ = (
        "_attrs",
        "_error",
        "_handler_span",
        "_key",
        "_otel",
        "_outcome",
        "_span",
        "_start",
        "_token",
    )

    def __init__(
        self,
        otel: OpenTelemetry,
        span: Span,
        handler_span: Span | None,
        token: object,
        counted: tuple[dict[str, str], tuple[tuple[str, str], ...]],
    ) -> None:
        self._otel = otel
        self._span = span
        self._handler_span = handler_span
        self._token = token
        self._attrs, self._key = counted
        self._outcome: Outcome = "ack"
        self._error: BaseException | None = None
        self._start = time.perf_counter()

    def failed(self, error: BaseException, outcome: Outcome) -> None:
        if isinstance(error, asyncio.CancelledError):
            outcome = "cancelled"
        self._outcome = outcome
        self._error = error

    def close(self) -> None:
        otel = self._otel
        error = self._error
        try:
            otel_context.detach(self._token)  # type: ignore[arg-type]
        except Exception:  # pragma: no cover - a context mix-up must not break the consumer
            log.debug("could not detach the consume context", exc_info=True)
        spans = (self._span,) if self._handler_span is None else (self._handler_span, self._span)
        for span in spans:
            if error is not None and self._outcome != "cancelled":
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            span.set_attribute("msdata.outcome", self._outcome)
            span.end()
        attrs = self._attrs
        if error is not None and self._outcome != "cancelled":  # required when it failed
            attrs = {**attrs, "error.type": type(error).__qualname__}
        otel._process_duration.record(time.perf_counter() - self._start, attrs)
        otel._consumed.add(1, (*self._key, ("msdata.outcome", self._outcome)))


class _Counted:
    """No spans recorded (the API's no-op tracer): only the metrics."""

    __slots__ = ("_attrs", "_otel", "_outcome", "messages")

    def __init__(
        self, otel: OpenTelemetry, topic: str, messages: list[TransportMessage], system: str
    ) -> None:
        self._otel = otel
        self.messages = messages
        self._attrs = (system, topic)

    def __enter__(self) -> list[TransportMessage]:
        return self.messages

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self._otel._sent.add(len(self.messages), _sent_key(*self._attrs, exc))

    @staticmethod
    def consume(otel: OpenTelemetry, topic: str, group: str, delivery: Delivery) -> ConsumeScope:
        return _CountedConsume(otel, topic, group)


class _CountedConsume(ConsumeScope):
    __slots__ = ("_group", "_otel", "_outcome", "_topic")

    def __init__(self, otel: OpenTelemetry, topic: str, group: str) -> None:
        self._otel = otel
        self._topic = topic
        self._group = group
        self._outcome: Outcome = "ack"

    def failed(self, error: BaseException, outcome: Outcome) -> None:
        self._outcome = "cancelled" if isinstance(error, asyncio.CancelledError) else outcome

    def close(self) -> None:
        self._otel._consumed.add(
            1,
            (
                ("messaging.destination.name", self._topic),
                ("messaging.consumer.group.name", self._group),
                ("msdata.outcome", self._outcome),
            ),
        )


_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_tuple_new = tuple.__new__


def _direct_ok() -> bool:
    """Whether a :class:`SpanContext` can be made as the tuple its ``__new__`` builds
    (trace id, span id, remote, flags, state, valid) without that frame: checked once
    against the API installed, else :func:`_span_context` calls the constructor."""
    try:
        ref = SpanContext(0x4BF9, 0xF067, True, _SAMPLED)
        made = _tuple_new(SpanContext, (0x4BF9, 0xF067, True, _SAMPLED, ref.trace_state, True))
    except Exception:  # pragma: no cover - another API's layout
        return False
    same = (made.trace_id, made.span_id, made.is_remote, made.trace_flags, made.is_valid)
    return made == ref and same == (0x4BF9, 0xF067, True, _SAMPLED, True)


_DIRECT = _direct_ok()
_NO_STATE = SpanContext(1, 1, True).trace_state


def _span_context(traceparent: str) -> SpanContext | None:
    """The remote span context of a W3C ``traceparent`` (version 00: 55 characters) whose
    flags the caller found sampled, or None. Sliced rather than split, with the flags made
    once, and the tuple made directly (:func:`_direct_ok`): it runs per relayed row (the
    budget of the relay's tracing is ~1.3 us a row, of which the SDK's link takes ~0.65)."""
    tp = traceparent
    if len(tp) != 55 or tp[2] != "-" or tp[35] != "-" or tp[52] != "-":
        return None
    try:
        trace_id, span_id = int(tp[3:35], 16), int(tp[36:52], 16)
    except ValueError:
        return None
    if trace_id <= 0 or span_id <= 0 or trace_id >= 1 << 128 or span_id >= 1 << 64:
        return None  # what SpanContext calls not valid
    if _DIRECT:
        return _tuple_new(SpanContext, (trace_id, span_id, True, _SAMPLED, _NO_STATE, True))
    return SpanContext(trace_id, span_id, True, _SAMPLED)  # pragma: no cover


class _LinkedBatch(_RelayBatch):
    """``relay_spans="batch"`` (the default): one ``publish`` span per batch, linked to each
    row's creation context, the semantic conventions' form for a batch (messaging spans,
    "Producer spans": a creation context in a message SHOULD NOT be modified, and the
    publish span SHOULD link to it). The rows' headers are sent as stored, so consumers are
    children of the rows' ``create`` spans. Its context is no message's creation context,
    so its kind is CLIENT (a synchronous call to the broker), not PRODUCER (conventions,
    "Span kind"). The SDK keeps at most ``SpanLimits.max_links`` links (128 by default): a
    relay ``batch_size`` above that loses the links beyond it."""

    __slots__ = ()

    def __enter__(self) -> list[TransportMessage]:
        links: list[Link] = []
        add = links.append
        for m in self.messages:
            tp = m.headers.get(_TRACEPARENT)
            # a creation context that was not sampled was never recorded: a link to it leads
            # nowhere, so it is skipped before parsing (the flags' last hex digit is odd
            # when the sampled bit is set)
            if tp is None or tp[-1:] not in _ODD_HEX:
                continue
            ctx = _span_context(tp)
            if ctx is not None:
                add(Link(ctx))
        attrs: dict[str, Any] = {
            "messaging.system": self._system,
            "messaging.destination.name": self._topic,
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
            "messaging.batch.message_count": len(self.messages),
        }
        span = self._otel._tracer.start_span(f"publish {self._topic}", None, _CLIENT, attrs, links)
        self._spans.append(span)
        return self.messages

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        span = self._spans[0]
        if exc is not None:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.end()
        self._otel._sent.add(len(self.messages), _sent_key(self._system, self._topic, exc))


_NO_RECEIVE = ReceiveScope()


class _BatchProcess(ReceiveScope):
    """``process_spans="batch"``: one ``process`` span (CONSUMER) for a batch the bus's
    consumer received, linked to each delivery's creation context, the conventions' form
    for a batch ("Consumer spans": a single process span can account for a batch, and
    SHOULD link to each message's creation context). Its parent is the first sampled
    delivery's creation context (else the first delivery's), so a ``ParentBased`` sampler
    records it whenever one of its orders is sampled, in that order's trace. Each handler
    runs in its own message's creation context (see :class:`_InBatch`), so what it creates
    stays in the order's trace; ``messaging.process.duration`` is recorded once, for the
    batch."""

    __slots__ = ("_attrs", "_error", "_otel", "_span", "_start", "_token")

    def __init__(
        self,
        otel: OpenTelemetry,
        topic: str,
        group: str,
        deliveries: Sequence[Delivery],
        system: str,
    ) -> None:
        self._otel = otel
        links: list[Link] = []
        add = links.append
        first: Mapping[str, str] | None = None  # the headers of the span's parent
        sampled: Mapping[str, str] | None = None
        for d in deliveries:
            headers = d.message.headers
            tp = headers.get(_TRACEPARENT)
            if tp is None:
                continue
            if first is None:
                first = headers
            if tp[-1:] not in _ODD_HEX:  # not sampled: nothing to link to
                continue
            ctx = _span_context(tp)
            if ctx is not None:
                add(Link(ctx))
                if sampled is None:
                    sampled = headers
        # the parent: the first sampled delivery's creation context, else the first
        # delivery's (not sampled), else none. A sampler follows a parent's decision, never
        # a link's (the SDK's ParentBased and TraceIdRatioBased ignore links): as a root
        # the span would be sampled on its own, and a sampled order would usually lose its
        # consumer's span while a batch of unsampled orders could be recorded
        # (docs/observability.md, "Sampling")
        parent_headers = sampled if sampled is not None else first
        parent = None if parent_headers is None else otel._extract(parent_headers)
        attrs = {
            "messaging.system": system,
            "messaging.destination.name": topic,
            "messaging.consumer.group.name": group,
        }
        self._attrs = attrs
        self._span = otel._tracer.start_span(
            f"process {topic}",
            parent,
            _CONSUMER,
            {
                **attrs,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.batch.message_count": len(deliveries),
            },
            links,
        )
        self._error: BaseException | None = None
        self._start = time.perf_counter()
        self._token = _in_batch.set(self)

    def failed(self, error: BaseException) -> None:
        """A handler of the batch raised ``error`` (not a cancellation)."""
        if self._error is None:
            self._error = error
        self._span.record_exception(error)

    def close(self) -> None:
        _in_batch.reset(self._token)
        span, error, attrs = self._span, self._error, self._attrs
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            attrs = {**attrs, "error.type": type(error).__qualname__}
        span.end()
        self._otel._process_duration.record(time.perf_counter() - self._start, attrs)


#: the batch the consumer in this task is handling (``process_spans="batch"``)
_in_batch: ContextVar[_BatchProcess | None] = ContextVar("msdata_otel_batch", default=None)


class _InBatch(ConsumeScope):
    """One delivery of a :class:`_BatchProcess`: no span of its own; the handler runs with
    the message's creation context current (so a message it creates is a child of that, in
    the order's trace), and its outcome is counted."""

    __slots__ = ("_batch", "_key", "_otel", "_outcome", "_token")

    def __init__(
        self,
        otel: OpenTelemetry,
        batch: _BatchProcess,
        token: object,
        key: tuple[tuple[str, str], ...],
    ) -> None:
        self._otel = otel
        self._batch = batch
        self._token = token
        self._key = key
        self._outcome: Outcome = "ack"

    def failed(self, error: BaseException, outcome: Outcome) -> None:
        if isinstance(error, asyncio.CancelledError):
            self._outcome = "cancelled"
            return
        self._outcome = outcome
        self._batch.failed(error)

    def close(self) -> None:
        if self._token is not None:
            try:
                otel_context.detach(self._token)  # type: ignore[arg-type]
            except Exception:  # pragma: no cover - a context mix-up must not break the consumer
                log.debug("could not detach the consume context", exc_info=True)
        self._otel._consumed.add(1, (*self._key, ("msdata.outcome", self._outcome)))


class _SagaStep(StepScope):
    __slots__ = ("_attrs", "_error", "_otel", "_span", "_start", "_token")

    def __init__(
        self,
        otel: OpenTelemetry,
        saga: str,
        saga_id: str,
        step: str,
        compensation: bool,
        mode: int,
    ) -> None:
        self._otel = otel
        self._attrs: dict[str, Any] = {
            "msdata.saga.name": saga,
            "msdata.saga.step": step,
            "msdata.saga.compensation": compensation,
        }
        self._error: str | None = None
        self._span: Span | None = None
        self._token: object = None
        if mode & 2:
            name = f"saga {saga} {'compensate' if compensation else 'step'} {step}"
            span = otel._tracer.start_span(
                name, None, _INTERNAL, {**self._attrs, "msdata.saga.id": saga_id}
            )
            self._span = span
            self._token = otel_context.attach(trace.set_span_in_context(span))
        self._start = time.perf_counter()

    def failed(self, error: str) -> None:
        self._error = error

    def close(self) -> None:
        otel = self._otel
        span = self._span
        if span is not None:
            try:
                otel_context.detach(self._token)  # type: ignore[arg-type]
            except Exception:  # pragma: no cover - a context mix-up must not break the saga
                log.debug("could not detach the saga step context", exc_info=True)
            if self._error is not None:
                span.set_status(Status(StatusCode.ERROR, self._error))
            span.end()
        attrs = self._attrs
        if self._error is not None:
            attrs = {**attrs, "error.type": self._error.split(":", 1)[0]}
        otel._step_duration.record(time.perf_counter() - self._start, attrs)


class OpenTelemetry(Telemetry):
    """Spans and metrics through OpenTelemetry; install it with
    :func:`msdata.telemetry.install`.

    ``tracer_provider`` / ``meter_provider``: default the global ones (set by the SDK or by
    ``opentelemetry-instrument``); with only ``opentelemetry-api`` installed they are
    no-ops. ``messaging_system`` is ``messaging.system`` where msdata cannot tell it from
    the transport's adapter (the outbox's ``create`` span, a user's own transport): default
    ``"msdata"``. Trace context is written and read by the global text-map propagator
    (W3C ``traceparent``/``tracestate`` and ``baggage`` by default).

    ``relay_spans``: ``"batch"`` (default) makes one ``publish`` span per relay batch,
    linked to its rows' creation contexts, which reach the consumers unchanged (the
    messaging conventions' form); ``"message"`` one per row, whose context replaces the
    row's ``traceparent`` (so ``process`` is its child), at the SDK's cost of a span per
    row. ``handler_spans``: False (default), the handler runs in the consumer's ``process``
    span, which names it (``code.function.name``): the bus calls one handler per delivery,
    so that span is the handler's; True adds a ``handle`` span under ``process`` (the
    handler apart from the bus's middleware), at the SDK's cost of one more span per
    delivery. ``process_spans``: ``"message"`` (default) a ``process`` span per delivery,
    child of the message's creation context, so one order's trace shows each consumer that
    handled it, how long and with what outcome; ``"batch"`` one ``process`` span per batch
    the bus's consumer received, linked to each message's creation context (the
    conventions' batch form) and child of the first sampled one's (so a ``ParentBased``
    sampler records it when one of its orders is sampled), the handlers running in their
    messages' creation contexts (what they create stays in the order's trace, without a
    ``process`` span of its own), ``messaging.process.duration`` recorded per batch: cheaper
    per message, at the cost of the consumer's node in the order's trace; ``handler_spans``
    applies to ``"message"``.
    Raises :class:`~msdata.errors.ConfigurationError` when ``relay_spans`` or
    ``process_spans`` is not ``"message"`` or ``"batch"``.

    The per-message counters (``msdata.outbox.created``,
    ``messaging.client.sent.messages``, ``messaging.client.consumed.messages``) are
    counted here and reported by observable counters at each collection: the same
    monotonic sums, without the SDK's ``Counter.add`` per message.
    """

    enabled = True

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        messaging_system: str = "msdata",
        handler_spans: bool = False,
        relay_spans: Literal["message", "batch"] = "batch",
        process_spans: Literal["message", "batch"] = "message",
    ) -> None:
        self._tracer = trace.get_tracer("msdata", __version__, tracer_provider)
        meter = metrics.get_meter("msdata", __version__, meter_provider)
        self._meter = meter
        self._propagator = get_global_textmap()
        self._w3c = _w3c_only(self._propagator)
        self._baggage = type(self._propagator) is CompositePropagator
        self._counted: dict[
            tuple[str, str, str], tuple[dict[str, str], tuple[tuple[str, str], ...]]
        ] = {}
        self.messaging_system = messaging_system
        self._systems: dict[type, str] = {}
        # the counts made per message are tallied here and reported by observable counters
        # (the same monotonic sums, read at each collection): see _Tally
        self._created = _Tally()
        meter.create_observable_counter(
            "msdata.outbox.created",
            [self._created.observe],
            unit="{message}",
            description="Messages added to an outbox",
        )
        self._sent = _Tally()
        meter.create_observable_counter(
            "messaging.client.sent.messages",
            [self._sent.observe],
            unit="{message}",
            description="Messages published (relay and event bus); error.type when failed",
        )
        self._consumed = _Tally()
        meter.create_observable_counter(
            "messaging.client.consumed.messages",
            [self._consumed.observe],
            unit="{message}",
            description="Deliveries handled by the event bus, by msdata.outcome",
        )
        self._dead_letters = meter.create_counter(
            "msdata.consumer.dead_letters",
            unit="{message}",
            description="Messages moved to a dead-letter topic",
        )
        self._process_duration = meter.create_histogram(
            "messaging.process.duration", unit="s", description="Handling one delivery"
        )
        self._claims = meter.create_counter(
            "msdata.idempotency.claims",
            unit="{claim}",
            description="Idempotency key claims, by msdata.idempotency.outcome",
        )
        self._step_duration = meter.create_histogram(
            "msdata.saga.step.duration", unit="s", description="One saga step or compensation"
        )
        self._saga_instances = meter.create_counter(
            "msdata.saga.instances",
            unit="{instance}",
            description="Saga instances started and ended, by msdata.saga.status",
        )
        self._outboxes: dict[str, Callable[[], Awaitable[OutboxStatus]]] = {}
        self._outbox_status: dict[str, OutboxStatus] = {}
        self._projections: dict[str, Callable[[], Awaitable[Any]]] = {}
        self._projection_lag: dict[str, Any] = {}
        self._consumers: dict[
            tuple[str, str, str],
            tuple[Callable[[str, str], Awaitable[int | None]], dict[str, str]],
        ] = {}
        self._consumer_lag: dict[tuple[str, str, str], tuple[int | None, dict[str, str]]] = {}
        self._gauges_made = False
        self._live = False
        self._metrics_live = False
        self._settled: int | None = None
        self._mode_seen = 0
        self._recheck_at = 0.0
        self._fixed = not isinstance(self._tracer, trace.ProxyTracer) and not hasattr(
            meter, "_real_meter"
        )
        for option, value in (("relay_spans", relay_spans), ("process_spans", process_spans)):
            if value not in _SPAN_MODES:
                raise ConfigurationError(
                    f"OpenTelemetry({option}={value!r}): expected 'message' or 'batch'"
                )
        self.handler_spans = handler_spans
        self.relay_spans = relay_spans
        self.process_spans = process_spans

    # -- the hooks ----------------------------------------------------------------------

    def _tracing(self) -> bool:
        """Whether spans are recorded: False on the API's no-op tracer (no SDK set up), so
        the hooks then cost next to nothing (no context is injected or extracted)."""
        if self._live:
            return True
        tracer: Any = self._tracer
        if isinstance(tracer, trace.ProxyTracer):
            tracer = tracer._tracer  # the SDK's once a provider is set, else the no-op
        self._live = not isinstance(tracer, trace.NoOpTracer)
        return self._live

    def _mode(self) -> int:
        """2 when spans are recorded, | 1 when metrics are. Settled once both are live, or at
        once when neither provider is the global proxy; on the proxy (which an SDK set up
        later replaces) looked at again once a second at most."""
        mode = self._settled
        if mode is not None:
            return mode
        now = time.monotonic()
        if now < self._recheck_at:
            return self._mode_seen
        mode = (2 if self._tracing() else 0) | (1 if self._metering() else 0)
        if mode == 3 or self._fixed:
            self._settled = mode
        self._mode_seen, self._recheck_at = mode, now + 1.0
        return mode

    def _metering(self) -> bool:
        """Whether metrics are recorded: False on the API's no-op meter, or on the global
        proxy before an SDK meter provider is set."""
        if self._metrics_live:
            return True
        meter: Any = self._meter
        if isinstance(meter, metrics.NoOpMeter):
            return False
        self._metrics_live = getattr(meter, "_real_meter", True) is not None
        return self._metrics_live

    def _system(self, obj: object) -> str:
        t = type(obj)
        system = self._systems.get(t)
        if system is None:
            system = self._systems[t] = _system_of(obj, self.messaging_system)
        return system

    def message_created(
        self, topic: str, envelope: Envelope[Any], *, outbox: bool
    ) -> Envelope[Any]:
        mode = self._settled  # _mode() inline where it answers at once: a call less
        if mode is None:
            mode = self._mode_seen if time.monotonic() < self._recheck_at else self._mode()
        if mode & 1:
            (self._created if outbox else self._sent).add(
                1, (("messaging.destination.name", topic),)
            )
        if not mode & 2:
            return envelope
        attrs: dict[str, str] = {
            "messaging.system": self.messaging_system,
            "messaging.destination.name": topic,
            "messaging.operation.type": "create" if outbox else "send",
            "messaging.operation.name": "create" if outbox else "publish",
            "messaging.message.id": envelope.id,
        }
        if envelope.correlation_id is not None:
            attrs["messaging.message.conversation_id"] = envelope.correlation_id
        name = f"create {topic}" if outbox else f"publish {topic}"
        span = self._tracer.start_span(name, None, _PRODUCER, attrs)
        carrier = dict(envelope.headers)
        self._inject(carrier, span)
        span.end()
        return envelope._replace(headers=MappingProxyType(carrier))

    def _inject(self, carrier: dict[str, str], span: Span) -> None:
        """Write ``span``'s context into ``carrier`` as the propagator would: ``traceparent``
        formatted here when the propagator is the W3C default and there is no
        ``tracestate`` and no baggage to write (1.7 -> 0.6 us), else by the propagator."""
        if self._w3c:
            ctx = span.get_span_context()
            if not ctx.trace_state and not (self._baggage and _has_baggage()):
                if ctx != trace.INVALID_SPAN_CONTEXT:
                    carrier[_TRACEPARENT] = "00-%032x-%016x-%02x" % (  # noqa: UP031 - faster
                        ctx.trace_id,
                        ctx.span_id,
                        ctx.trace_flags,
                    )
                return
        self._propagator.inject(carrier, trace.set_span_in_context(span))

    def _extract(self, headers: Mapping[str, str]) -> otel_context.Context | None:
        """The parent context in a message's ``headers``: with the W3C default propagator,
        None without ``traceparent``, read here when that is strict and there is no
        ``tracestate`` or ``baggage`` (3 -> 0.8 us); else read by the propagator (another
        propagator is always asked: it has headers of its own)."""
        if not self._w3c:  # another propagator: its own headers
            return self._propagator.extract(headers)
        tp = headers.get(_TRACEPARENT)
        if tp is None:
            return None
        if _TRACESTATE not in headers and _BAGGAGE not in headers:
            parent = _remote_parent(tp)
            if parent is not None:
                return parent
        return self._propagator.extract(headers)

    def publishing(  # type: ignore[override]
        self, topic: str, messages: list[TransportMessage], publisher: object
    ) -> _RelayBatch | _Counted | _Publishing:
        mode = self._mode()
        if not mode & 2:
            if not mode:
                return _Publishing(messages)
            return _Counted(self, topic, messages, self._system(publisher))
        if self.relay_spans == "batch":
            return _LinkedBatch(self, topic, messages, self._system(publisher))
        return _RelayBatch(self, topic, messages, self._system(publisher))

    def consume(
        self,
        topic: str,
        group: str,
        delivery: Delivery,
        envelope: Envelope[Any],
        handler: Callable[..., Any],
    ) -> ConsumeScope:
        mode = self._settled  # _mode() inline where it answers at once: a call less
        if mode is None:
            mode = self._mode_seen if time.monotonic() < self._recheck_at else self._mode()
        if not mode & 2:
            if not mode:
                return _NO_CONSUME
            return _Counted.consume(self, topic, group, delivery)
        headers = delivery.message.headers
        if _TRACEPARENT not in headers:
            headers = envelope.headers
        parent = self._extract(headers)
        system = self._system(delivery)
        if self.process_spans == "batch":
            batch = _in_batch.get()
            if batch is not None:  # the batch's span, linked: the handler in the message's
                token = None  # creation context, so what it creates stays in that trace
                if parent is not None:
                    remote = trace.get_current_span(parent)
                    token = otel_context.attach(trace.set_span_in_context(remote))
                key = self._counted_of(system, topic, group)[1]
                return _InBatch(self, batch, token, key)
        attrs: dict[str, Any] = {
            "messaging.system": system,
            "messaging.destination.name": topic,
            "messaging.consumer.group.name": group,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.message.id": envelope.id,
            "msdata.delivery.attempt": delivery.attempt,
        }
        if envelope.correlation_id is not None:
            attrs["messaging.message.conversation_id"] = envelope.correlation_id
        if not self.handler_spans:  # the handler runs in this span: name it here
            attrs["code.function.name"] = getattr(handler, "__qualname__", repr(handler))
        tracer = self._tracer
        span = tracer.start_span(f"process {topic}", parent, _CONSUMER, attrs)
        handler_span: Span | None = None
        current = span
        if self.handler_spans:
            current = handler_span = tracer.start_span(
                f"handle {envelope.type}",
                trace.set_span_in_context(span),
                _INTERNAL,
                {
                    "code.function.name": getattr(handler, "__qualname__", repr(handler)),
                    "messaging.consumer.group.name": group,
                },
            )
        token = otel_context.attach(trace.set_span_in_context(current))
        return _Consume(self, span, handler_span, token, self._counted_of(system, topic, group))

    def _counted_of(
        self, system: str, topic: str, group: str
    ) -> tuple[dict[str, str], tuple[tuple[str, str], ...]]:
        """The attributes of a consumer's duration histogram and of its count (made once)."""
        counted = self._counted.get((system, topic, group))
        if counted is None:
            attrs = {
                "messaging.operation.name": "process",  # required by the conventions
                "messaging.system": system,
                "messaging.destination.name": topic,
                "messaging.consumer.group.name": group,
            }
            counted = self._counted[(system, topic, group)] = (attrs, tuple(attrs.items()))
        return counted

    def receiving(self, topic: str, group: str, deliveries: Sequence[Delivery]) -> ReceiveScope:
        if self.process_spans != "batch" or not self._mode() & 2:
            return _NO_RECEIVE
        return _BatchProcess(self, topic, group, deliveries, self._system(deliveries[0]))

    def dead_lettered(self, dead_letter: DeadLetter) -> None:
        self._dead_letters.add(
            1,
            {
                "messaging.destination.name": dead_letter.original_topic,
                "messaging.consumer.group.name": dead_letter.group,
            },
        )

    def idempotency_claim(self, scope: str, outcome: str) -> None:
        attrs = {"msdata.idempotency.scope": scope, "msdata.idempotency.outcome": outcome}
        span = self._tracer.start_span("idempotency claim", None, _INTERNAL, attrs)
        span.end()
        self._claims.add(1, attrs)

    @contextmanager
    def _internal(self, name: str, attrs: dict[str, Any]) -> Iterator[Span]:
        with self._tracer.start_as_current_span(name, kind=_INTERNAL, attributes=attrs) as span:
            yield span

    def compose(self, parts: Sequence[str]) -> Any:
        return self._internal("compose", {"msdata.composition.parts": list(parts)})

    def handle(self, kind: str, type_name: str, handler: Callable[..., Any]) -> Any:
        return self._internal(
            f"handle {type_name}",
            {"msdata.message.kind": kind, "code.function.name": handler.__qualname__},
        )

    def saga_step(self, saga: str, saga_id: str, step: str, *, compensation: bool) -> StepScope:
        mode = self._mode()
        if not mode:
            return _NO_STEP
        return _SagaStep(self, saga, saga_id, step, compensation, mode)

    def saga_status(self, saga: str, status: str) -> None:
        if self._mode() & 1:
            self._saga_instances.add(1, {"msdata.saga.name": saga, "msdata.saga.status": status})

    # -- gauges that read stores --------------------------------------------------------

    def watch_outbox(self, store: Any, name: str = "outbox") -> None:
        """Report ``store.status()`` (an :class:`msdata.outbox.OutboxStore`, or a relay) as
        the observable gauges ``msdata.outbox.pending`` (rows), ``msdata.outbox.oldest_age``
        (seconds; 0 when none is pending) and ``msdata.outbox.parked`` (rows), attribute
        ``msdata.outbox.name``. The status is read by :meth:`refresh` (async, so the gauges'
        callbacks never block a metric export on a store): call it, or run
        :meth:`run_watch`."""
        self._make_gauges()
        self._outboxes[name] = store.status

    def watch_projection(self, runner: Any, name: str) -> None:
        """Report ``runner.lag()`` (a :class:`msdata.projections.ProjectionRunner`) as
        ``msdata.projection.lag`` (events behind) and ``msdata.projection.lag_age``
        (seconds), attribute ``msdata.projection.name``; read by :meth:`refresh`."""
        self._make_gauges()
        self._projections[name] = runner.lag

    def watch_consumer(self, transport: Any, topic: str, group: str) -> None:
        """Report the broker's count of what consumer group ``group`` of ``topic`` has still
        to settle (:meth:`msdata.transport.Transport.lag`) as the observable gauge
        ``msdata.consumer.lag`` ({message}), attributes ``messaging.system``,
        ``messaging.destination.name``, ``messaging.consumer.group.name``; read by
        :meth:`refresh`. Nothing is reported while the broker cannot tell (``None``). The
        messaging conventions define no consumer-lag metric, hence msdata's own name. A
        service's groups: ``for topic, group in service.subscriptions:
        otel.watch_consumer(service.transport, topic, group)``."""
        self._make_gauges()
        system = self._system(transport)
        attrs = {
            "messaging.system": system,
            "messaging.destination.name": topic,
            "messaging.consumer.group.name": group,
        }
        self._consumers[(system, topic, group)] = (transport.lag, attrs)

    async def refresh(self) -> None:
        """Read the status of every watched outbox, projection and consumer group now. One
        that fails keeps its last figures (and the failure is logged)."""
        for name, status in list(self._outboxes.items()):
            try:
                self._outbox_status[name] = await status()
            except Exception:
                log.exception("reading the status of outbox %s failed", name)
        for name, lag in list(self._projections.items()):
            try:
                self._projection_lag[name] = await lag()
            except Exception:
                log.exception("reading the lag of projection %s failed", name)
        for key, (read, attrs) in list(self._consumers.items()):
            try:
                self._consumer_lag[key] = (await read(key[1], key[2]), attrs)
            except Exception:
                log.exception("reading the lag of group %s of %s failed", key[2], key[1])

    async def run_watch(self, interval: float = 15.0) -> None:
        """:meth:`refresh` every ``interval`` seconds until cancelled (run it as a task)."""
        while True:
            await self.refresh()
            await asyncio.sleep(interval)

    def _make_gauges(self) -> None:
        if self._gauges_made:
            return
        self._gauges_made = True
        meter = self._meter

        def outbox(field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
            def observe(_: CallbackOptions) -> Iterable[Observation]:
                for name, status in list(self._outbox_status.items()):
                    value = getattr(status, field)
                    yield Observation(value or 0, {"msdata.outbox.name": name})

            return observe

        def projection(field: int) -> Callable[[CallbackOptions], Iterable[Observation]]:
            def observe(_: CallbackOptions) -> Iterable[Observation]:
                for name, lag in list(self._projection_lag.items()):
                    yield Observation(lag[field], {"msdata.projection.name": name})

            return observe

        meter.create_observable_gauge(
            "msdata.outbox.pending", [outbox("pending")], unit="{row}", description="Rows pending"
        )
        meter.create_observable_gauge(
            "msdata.outbox.oldest_age",
            [outbox("oldest_pending_age")],
            unit="s",
            description="Age of the oldest pending row (the relay's lag)",
        )
        meter.create_observable_gauge(
            "msdata.outbox.parked", [outbox("parked")], unit="{row}", description="Parked rows"
        )

        def consumer_lag(_: CallbackOptions) -> Iterable[Observation]:
            for value, attrs in list(self._consumer_lag.values()):
                if value is not None:
                    yield Observation(value, attrs)

        meter.create_observable_gauge(
            "msdata.consumer.lag",
            [consumer_lag],
            unit="{message}",
            description="Messages a consumer group has still to settle, as its broker reports",
        )
        meter.create_observable_gauge(
            "msdata.projection.lag",
            [projection(0)],
            unit="{event}",
            description="Events a projection has not applied yet",
        )
        meter.create_observable_gauge(
            "msdata.projection.lag_age",
            [projection(1)],
            unit="s",
            description="Age of the oldest event a projection has not applied",
        )
