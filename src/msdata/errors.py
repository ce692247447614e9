"""Every error msdata raises, under one root.

Users catch these, never a driver's own exception: adapters translate driver errors at
their edge with ``raise ... from e`` so the original stays on ``__cause__``.

::

    MsdataError
    ├── ConfigurationError            a bad name, option or wiring, found before any I/O
    │   └── MissingDependencyError    an adapter's driver is not installed (also ImportError)
    ├── MessageError
    │   ├── RegistrationError         a type name/version registered twice, or a class not registered
    │   ├── InvalidHeader             a header name or value that cannot travel as a CloudEvents attribute
    │   └── DecodeError               bad input from the wire; a consumer dead-letters it with the reason
    │       ├── MalformedMessage      not UTF-8 JSON, or not a JSON object
    │       ├── InvalidEnvelope       JSON, but not a CloudEvents 1.0 structured event msdata can read
    │       ├── UnknownMessageType    a type name nothing is registered for
    │       ├── UnknownSchemaVersion  a known type at a version with no class and no upcaster path
    │       ├── MessageValidationError  the payload fails the message class's validation
    │       └── MessageTooLarge       larger than the codec's configured maximum (also raised on encode)
    ├── HandlerError
    │   ├── NoHandlerRegistered       a command or query with no handler
    │   ├── HandlerAlreadyRegistered  a second handler for a command or query type
    │   └── RejectMessage             raised by a handler: dead-letter this message now, no retry
    ├── TransportError                a broker or the in-memory transport failed
    │   ├── PublishError              the transport did not accept (confirm) every message of a batch
    │   └── TransportClosed           used after close()
    └── StoreError                    a database-backed store failed
        └── SchemaError               the store's tables are missing or not what msdata expects
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "DecodeError",
    "HandlerAlreadyRegistered",
    "HandlerError",
    "InvalidEnvelope",
    "InvalidHeader",
    "MalformedMessage",
    "MessageError",
    "MessageTooLarge",
    "MessageValidationError",
    "MissingDependencyError",
    "MsdataError",
    "NoHandlerRegistered",
    "PublishError",
    "RegistrationError",
    "RejectMessage",
    "SchemaError",
    "StoreError",
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
            text = f'{package!r} is not installed; install it with: pip install "msdata[{extra}]"'
        super().__init__(text)


class MessageError(MsdataError):
    """A problem with a message, its registration or its wire form."""


class RegistrationError(MessageError):
    """A type name and version registered twice, or a class used that is not registered."""


class InvalidHeader(MessageError):
    """A header that cannot travel as a CloudEvents extension attribute."""


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
    """Larger than the configured maximum; raised on decode and on encode."""


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
    """The transport did not accept every message of a batch; none of it counts as published."""


class TransportClosed(TransportError):
    """The transport or subscription was used after it was closed."""


class StoreError(MsdataError):
    """A database-backed store failed."""


class SchemaError(StoreError):
    """The store's tables are missing or are not what msdata expects."""
