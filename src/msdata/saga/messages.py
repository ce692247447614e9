"""What travels between an orchestrator and its participants: the command headers that
correlate a step invocation, and the reply event."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Literal, NamedTuple

from msdata.errors import SagaError
from msdata.messages import Event, message_type

__all__ = [
    "ACTION",
    "COMPENSATION",
    "HEADER_ATTEMPT",
    "HEADER_PURPOSE",
    "HEADER_REPLY_TO",
    "HEADER_SAGA_ID",
    "HEADER_SAGA_TYPE",
    "HEADER_STEP",
    "IDEMPOTENCY_KEY_HEADER",
    "SagaReply",
    "StepContext",
    "current_step",
    "idempotency_key",
]

ACTION = "action"
COMPENSATION = "compensation"

# Command headers travel as CloudEvents extension attributes: lowercase letters and digits.
HEADER_SAGA_ID = "sagaid"
HEADER_SAGA_TYPE = "sagatype"
HEADER_STEP = "sagastep"
HEADER_PURPOSE = "sagapurpose"
HEADER_ATTEMPT = "sagaattempt"
HEADER_REPLY_TO = "sagareplyto"
#: the step invocation's idempotency key (see :func:`idempotency_key`)
IDEMPOTENCY_KEY_HEADER = "idempotencykey"


def idempotency_key(saga_id: str, step: str, purpose: str) -> str:
    """The idempotency key of one step invocation: the same for every attempt and every
    resend of that step's action (or of its compensation), so a participant that dedupes by
    it applies the effect once however often it is asked. ``saga:<id>:<step>:<purpose>``."""
    return f"saga:{saga_id}:{step}:{purpose}"


@message_type("msdata.SagaReply")
class SagaReply(Event):
    """A participant's answer to a saga command: ``ok`` with ``data`` (the JSON of the
    participant's result), or not ``ok`` with ``reason``. ``duplicate``: the participant had
    already handled this invocation (by its idempotency key), did not apply it again, and
    sends its original reply again (same ``ok``, ``data`` and ``reason``)."""

    saga_id: str
    saga_type: str
    step: str
    purpose: Literal["action", "compensation"]
    attempt: int
    ok: bool
    data: dict[str, Any] | None = None
    reason: str | None = None
    duplicate: bool = False


class StepContext(NamedTuple):
    """The step invocation a local action runs in (see :func:`current_step`)."""

    saga_id: str
    saga_type: str
    step: str
    purpose: str
    attempt: int

    @property
    def idempotency_key(self) -> str:
        return idempotency_key(self.saga_id, self.step, self.purpose)


_step: ContextVar[StepContext] = ContextVar("msdata_saga_step")


def current_step() -> StepContext:
    """Inside a local step's action or compensation: which saga, step, purpose and attempt
    is running, and its idempotency key. Raises :class:`msdata.errors.SagaError` elsewhere."""
    try:
        return _step.get()
    except LookupError:
        raise SagaError("current_step() works only inside a saga step") from None
