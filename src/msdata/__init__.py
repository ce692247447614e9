"""msdata: data-management patterns for microservices that each own their database.

Importing msdata installs no logging handler, reads no environment or file, and imports no
database or broker driver.
"""

from msdata.cqrs import CommandBus, QueryBus
from msdata.errors import (
    ConfigurationError,
    DecodeError,
    HandlerAlreadyRegistered,
    MessageValidationError,
    MsdataError,
    NoHandlerRegistered,
    PublishError,
    RejectMessage,
    StoreError,
    TransportError,
    UnknownMessageType,
)
from msdata.events import EventBus
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
from msdata.middleware import Middleware, logging_middleware, retry, timing
from msdata.outbox import Inbox, Outbox, OutboxRelay
from msdata.serialization import CloudEventsCodec
from msdata.service import Service
from msdata.transport import Publisher, Subscriber, Transport, TransportMessage
from msdata.urls import transport_from_url

__version__ = "0.1.0"

__all__ = [
    "CloudEventsCodec",
    "Command",
    "CommandBus",
    "ConfigurationError",
    "DecodeError",
    "Envelope",
    "Event",
    "EventBus",
    "HandlerAlreadyRegistered",
    "Inbox",
    "Message",
    "MessageRegistry",
    "MessageValidationError",
    "Middleware",
    "MsdataError",
    "NoHandlerRegistered",
    "Outbox",
    "OutboxRelay",
    "PublishError",
    "Publisher",
    "Query",
    "QueryBus",
    "RejectMessage",
    "Service",
    "StoreError",
    "Subscriber",
    "Transport",
    "TransportError",
    "TransportMessage",
    "UnknownMessageType",
    "__version__",
    "current_envelope",
    "default_registry",
    "logging_middleware",
    "make_envelope",
    "message_type",
    "new_id",
    "retry",
    "timing",
    "transport_from_url",
    "upcaster",
    "uuid7",
]
