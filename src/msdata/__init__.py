"""msdata: data-management patterns for microservices that each own their database.

Importing msdata installs no logging handler, reads no environment or file, and imports no
database or broker driver.
"""

from msdata.errors import (
    ConfigurationError,
    DecodeError,
    HandlerAlreadyRegistered,
    MessageValidationError,
    MsdataError,
    NoHandlerRegistered,
    PublishError,
    TransportError,
    UnknownMessageType,
)
from msdata.ids import new_id, uuid7
from msdata.messages import (
    Command,
    Envelope,
    Event,
    Message,
    MessageRegistry,
    Query,
    current_envelope,
    default_registry,
    make_envelope,
    message_type,
    upcaster,
)
from msdata.serialization import CloudEventsCodec
from msdata.transport import Publisher, Subscriber, Transport, TransportMessage

__version__ = "0.1.0"

__all__ = [
    "CloudEventsCodec",
    "Command",
    "ConfigurationError",
    "DecodeError",
    "Envelope",
    "Event",
    "HandlerAlreadyRegistered",
    "Message",
    "MessageRegistry",
    "MessageValidationError",
    "MsdataError",
    "NoHandlerRegistered",
    "PublishError",
    "Publisher",
    "Query",
    "Subscriber",
    "Transport",
    "TransportError",
    "TransportMessage",
    "UnknownMessageType",
    "__version__",
    "current_envelope",
    "default_registry",
    "make_envelope",
    "message_type",
    "new_id",
    "upcaster",
    "uuid7",
]
