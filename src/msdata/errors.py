"""Every error msdata raises, under one root.

Users catch these, never a driver's own exception: adapters translate driver errors at
their edge with ``raise ... from e`` so the original stays on ``__cause__``.

::

    MsdataError
    ├── ConfigurationError            a bad name, option or wiring, found before any I/O
    │   └── MissingDependencyError    an adapter's driver is not installed (also ImportError)
    ├── MessageError
    │   ├── RegistrationError         a type name/version registered twice, or a class not registered
    │   │   └── NotAMessage           not a msdata Message instance where one is expected (also TypeError)
    │   ├── InvalidHeader             a header name or value that cannot travel as a CloudEvents attribute
    │   ├── EncodeError               a message or envelope that cannot be written as CloudEvents JSON
    │   └── DecodeError               bad input from the wire; a consumer dead-letters it with the reason
    │       ├── MalformedMessage      not UTF-8 JSON, or not a JSON object
    │       ├── InvalidEnvelope       JSON, but not a CloudEvents 1.0 structured event msdata can read
    │       ├── UnknownMessageType    a type name nothing is registered for
    │       ├── UnknownSchemaVersion  a known type at a version with no class and no upcaster path
    │       ├── MessageValidationError  the payload fails the message class's validation
    │       └── MessageTooLarge       larger than the codec's maximum (also on encode), or than a
    │                                 transport's max_message_bytes / the broker's limit (before sending)
    ├── HandlerError
    │   ├── NoHandlerRegistered       a command or query with no handler
    │   ├── HandlerAlreadyRegistered  a second handler for a command or query type
    │   └── RejectMessage             raised by a handler: dead-letter this message now, no retry
    ├── TransportError                a broker or the in-memory transport failed
    │   ├── PublishError              the transport did not accept (confirm) every message of a batch
    │   │   └── HeldBack              not sent: an earlier message of its key in the batch was refused
    │   └── TransportClosed           used after close()
    ├── StoreError                    a database-backed store failed
    │   ├── SchemaError               the store's tables are missing or not what msdata expects
    │   └── ConcurrencyError          a write with a stale expected version (saga instance, event stream)
    ├── IdempotencyError              an idempotency key cannot be used for this call
    │   ├── IdempotencyKeyMissing     a key is required and none was given
    │   ├── IdempotencyKeyReused      the key was used before with a different request (fingerprint)
    │   ├── IdempotencyInProgress     the first call with this key has not finished yet
    │   ├── ResultNotStored           the first call ran but its result was not stored: no replay
    │   │   └── StoredResultTooLarge  the result to store exceeds the store's size limit
    │   └── StoredResultInvalid       a stored result no longer validates as the result type
    ├── SagaError                     a saga could not be defined, found or run as asked
    │   ├── SagaDefinitionError       an invalid saga definition (also a ConfigurationError)
    │   ├── SagaNotFound              no saga instance with that id
    │   ├── SagaStateError            an operation the instance's status does not allow
    │   ├── SagaDataError             stored saga data no longer validates as the saga's model
    │   └── SagaStepFailed            raised by a step or participant: a business failure, with its reason
    └── CompositionError              a composed query could not be answered
        ├── RequiredPartFailed        a required part raised, timed out or was cancelled
        └── CompositionTimeout        the overall deadline passed before the required parts
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "CompositionError",
    "CompositionTimeout",
    "ConcurrencyError",
    "ConfigurationError",
    "DecodeError",
    "EncodeError",
    "HandlerAlreadyRegistered",
    "HandlerError",
    "HeldBack",
    "IdempotencyError",
    "IdempotencyInProgress",
    "IdempotencyKeyMissing",
    "IdempotencyKeyReused",
    "InvalidEnvelope",
    "InvalidHeader",
    "MalformedMessage",
    "MessageError",
    "MessageTooLarge",
    "MessageValidationError",
    "MissingDependencyError",
    "MsdataError",
    "NoHandlerRegistered",
    "NotAMessage",
    "PublishError",
    "RegistrationError",
    "RejectMessage",
    "RequiredPartFailed",
    "ResultNotStored",
    "SagaDataError",
    "SagaDefinitionError",
    "SagaError",
    "SagaNotFound",
    "SagaStateError",
    "SagaStepFailed",
    "SchemaError",
    "StoreError",
    "StoredResultInvalid",
    "StoredResultTooLarge",
    "TransportClosed",
    "TransportError",
    "UnknownMessageType",
    "UnknownSchemaVersion",
]


class MsdataError(Exception):
    """Root of every error msdata raises."""


class ConfigurationError(MsdataError):
    """A bad name, option or wiring, detected before any I/O."""


class MissingDependencyError(ConfigurationError, ImportError):
    """An adapter's driver is not installed; the message names the extra to install."""

    def __init__(self, package: str, extra: str | None) -> None:
        self.package = package
        self.extra = extra
        if extra is None:  # a standard-library module this Python was built without
            text = f"{package!r} is missing from this Python build; msdata needs it here"
        else:
            # msdata is installed from a checkout or a git URL, not an index (README, Install)
            text = (
                f"{package!r} is not installed; install msdata with the {extra!r} extra: "
                f'pip install "<msdata checkout or git URL>[{extra}]"'
            )
        super().__init__(text)


class MessageError(MsdataError):
    """A problem with a message, its registration or its wire form."""


class RegistrationError(MessageError):
    """A type name and version registered twice, or a class used that is not registered."""


class NotAMessage(RegistrationError, TypeError):
    """Something that is not an instance of a msdata :class:`~msdata.Message` class (a dict,
    a plain pydantic model, a dataclass, None...) was given where a message is expected."""


class InvalidHeader(MessageError):
    """A header that cannot travel as a CloudEvents extension attribute."""


class EncodeError(MessageError):
    """A message or envelope that cannot be written as CloudEvents JSON: a string with a lone
    surrogate (not UTF-8), a float that is NaN or infinite (RFC 8259 §6 has no such numbers),
    an int of more than 4300 digits, nesting deeper than the codec's limit, or a value in an
    ``Any`` field that is not JSON. Raised by ``encode``, before anything is sent or stored."""


class DecodeError(MessageError):
    """Bad input from the wire. Consumers move such messages to the dead-letter destination."""


class MalformedMessage(DecodeError):
    """Not UTF-8 JSON, or JSON that is not an object."""


class InvalidEnvelope(DecodeError):
    """JSON, but not a CloudEvents 1.0 structured event that msdata can read."""


class UnknownMessageType(DecodeError):
    """No class is registered under the message's type name."""


class UnknownSchemaVersion(DecodeError):
    """The type is known, but not at this schema version and no upcaster leads from it."""


class MessageValidationError(DecodeError):
    """The payload does not validate against the message class."""


class MessageTooLarge(DecodeError):
    """Larger than the configured maximum: the codec's ``max_size`` (raised on decode, where
    a consumer dead-letters it, and on encode), or a transport's limit, found before
    sending: its ``max_message_bytes`` or the broker's own limit (NATS: the server's
    ``max_payload``), counted with the headers the transport adds. A transport refuses such
    a message alone: ``publish`` sends the rest of the batch and raises
    :class:`PublishError` whose ``refused`` names it (``"MessageTooLarge: ..."``), with this
    error as ``__cause__``; the connection stays usable."""


class HandlerError(MsdataError):
    """A problem routing a message to its handler."""


class NoHandlerRegistered(HandlerError):
    """A command or query was sent that has no handler."""


class HandlerAlreadyRegistered(HandlerError):
    """A command or query type already has its one handler."""


class RejectMessage(HandlerError):
    """Raise from an event handler to send the message to the dead-letter topic at once,
    with this error's text as the reason, instead of retrying it."""


class TransportError(MsdataError):
    """The transport (a broker or the in-memory one) failed."""


class PublishError(TransportError):
    """The transport did not accept every message of a batch; none of it counts as published.

    ``refused`` maps the id of each message the broker refused *itself* (too large, invalid,
    nacked) to the broker's reason: that message's own fault, which the outbox relay counts
    against its row (and parks it after ``max_attempts``). Empty (the default): the batch
    failed as a whole (the broker unreachable, no confirm in time, the connection lost),
    which is no row's fault: the relay backs off and tries again without counting it.
    """

    def __init__(self, message: str, *, refused: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        #: message id -> the broker's reason, for each message refused on its own
        self.refused: Mapping[str, str] = dict(refused or {})


class HeldBack(PublishError):
    """A message a transport did not send because an earlier message of its partition key in
    the same batch was refused before sending (:func:`msdata.transport.screen`): sent, it
    would have gone out ahead of that one. It is no fault of its own: the outbox relay
    releases its row uncounted, to follow the refused one."""


class TransportClosed(TransportError):
    """The transport or subscription was used after it was closed."""


class StoreError(MsdataError):
    """A database-backed store failed."""


class SchemaError(StoreError):
    """The store's tables are missing or are not what msdata expects."""


class ConcurrencyError(StoreError):
    """A write expected a version that is no longer current: another writer got there first.

    ``name`` says what was written (``"saga 0193…"``, ``"stream order-42"``), ``expected`` the
    version the writer read, ``actual`` the version found (``None`` when unknown)."""

    def __init__(self, name: str, expected: int | None, actual: int | None) -> None:
        self.name = name
        self.expected = expected
        self.actual = actual
        found = "unknown" if actual is None else str(actual)
        super().__init__(f"{name}: expected version {expected}, found {found}")


class IdempotencyError(MsdataError):
    """An idempotency key cannot be used for this call."""


class IdempotencyKeyMissing(IdempotencyError):
    """The call requires an idempotency key and none was given (HTTP: 400)."""


class IdempotencyKeyReused(IdempotencyError):
    """The key was used before with a different request: its fingerprint differs (HTTP: 422,
    IETF draft-ietf-httpapi-idempotency-key-header)."""


class IdempotencyInProgress(IdempotencyError):
    """The first call with this key is still running (HTTP: 409); retry later."""


class ResultNotStored(IdempotencyError):
    """The first call with a key ran (its effect happened) but its result could not be
    stored (too large, or no JSON form): the key is COMPLETED without a result, so a retry
    gets this error instead of running the operation again."""


class StoredResultTooLarge(ResultNotStored):
    """The result to store for a key is larger than the store's limit (bytes)."""


class StoredResultInvalid(IdempotencyError):
    """A stored result does not validate as the result type the replay asks for (the
    result model changed since it was stored); ``__cause__`` holds the validation error."""


class SagaError(MsdataError):
    """A saga could not be defined, found or run as asked."""


class SagaDefinitionError(SagaError, ConfigurationError):
    """A saga definition is invalid; the message says which step and why."""


class SagaNotFound(SagaError):
    """No saga instance has the given id."""


class SagaStateError(SagaError):
    """The operation is not allowed in the instance's current status (retrying a COMPLETED
    saga, aborting a FAILED one)."""


class SagaDataError(SagaError):
    """A saga instance's stored data does not validate as its saga's data model (saved by
    a release whose model differed: a required field added since, a type changed). The
    message names the instance and the first error; ``__cause__`` holds the pydantic
    ``ValidationError``. The orchestrator's recovery logs such an instance and skips it (the
    others go on); deploy a model that reads it (a default for the new field) and it is
    continued."""


class SagaStepFailed(SagaError):
    """Raised by a local step or a saga participant's handler: the step failed for a business
    reason (out of stock, card declined) given as the message. A participant replies with the
    failure instead of retrying; the orchestrator retries the step by its policy, then
    compensates."""


class CompositionError(MsdataError):
    """A composed query could not be answered."""


class RequiredPartFailed(CompositionError):
    """A required part raised, timed out or was cancelled; ``part`` names it and
    ``__cause__`` holds its error."""

    def __init__(self, part: str, reason: str) -> None:
        self.part = part
        self.reason = reason
        super().__init__(f"required part {part!r} failed: {reason}")


class CompositionTimeout(CompositionError):
    """The overall deadline passed before every required part had answered."""
