"""Typed messages, the registry that names them on the wire, and the envelope around them.

A message class is a frozen pydantic model registered under a stable type name and a schema
version that the user chooses (never derived from the module path, so moving a class does not
break the wire)::

    @message_type("orders.OrderPlaced", version=2)
    class OrderPlaced(Event):
        order_id: str
        total_cents: int

    @upcaster("orders.OrderPlaced", from_version=1)
    def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "total_cents": round(data.pop("total") * 100)}
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Generic, NamedTuple, TypeVar

from pydantic import BaseModel, ConfigDict

from msdata.errors import (
    ConfigurationError,
    EncodeError,
    InvalidHeader,
    NotAMessage,
    RegistrationError,
)
from msdata.ids import new_id

__all__ = [
    "Command",
    "Envelope",
    "Event",
    "Message",
    "MessageRegistry",
    "Query",
    "Upcaster",
    "check_message",
    "current_envelope",
    "default_registry",
    "handling",
    "make_envelope",
    "message_list",
    "message_type",
    "safe_text",
    "upcaster",
]

ResultT = TypeVar("ResultT")
M = TypeVar("M", bound="Message")
MT = TypeVar("MT", bound=type["Message"])

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

# a type name is also the default topic, so it follows the transport's topic rules
_TYPE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,149}")
# C0 and C1 control characters and DEL: refused in partition keys
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class Message(BaseModel):
    """Base of every message: an immutable pydantic model. Unknown fields from a newer
    producer are ignored (tolerant reader); missing or wrongly typed ones fail validation."""

    model_config = ConfigDict(frozen=True)


class Event(Message):
    """Something that happened. Published to any number of handlers; each fails alone."""


class Command(Message):
    """A request to do something. Exactly one handler; its result or error reaches the sender."""


class Query(Message, Generic[ResultT]):
    """A request for data, answered by exactly one handler with a ``ResultT``."""


class MessageRegistry:
    """Maps stable type names and schema versions to message classes, and back.

    Decoding a version older than the newest registered one applies the upcasters registered
    for each step (v1 -> v2 -> ... -> newest); a version with its own class and no upcaster path
    decodes to that class.
    """

    def __init__(self) -> None:
        self._by_class: dict[type[Message], tuple[str, int]] = {}
        self._by_name: dict[str, dict[int, type[Message]]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        #: bumped on every change, so codecs know to rebuild what they cached
        self.generation = 0

    def register(self, cls: type[Message], type_name: str, version: int = 1) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Message)):
            raise RegistrationError(f"{cls!r} is not a msdata Message class")
        name_ok = isinstance(type_name, str) and _TYPE_NAME.fullmatch(type_name)
        if not name_ok or ".." in type_name:
            raise RegistrationError(
                f"type name {type_name!r} must start with an ASCII letter and hold only ASCII "
                "letters, digits and . _ - (at most 150 characters, no '..')"
            )
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise RegistrationError(f"schema version must be an int >= 1, got {version!r}")
        versions = self._by_name.setdefault(type_name, {})
        existing = versions.get(version)
        if existing is not None and existing is not cls:
            raise RegistrationError(
                f"{type_name!r} version {version} is already registered to "
                f"{existing.__module__}.{existing.__qualname__}"
            )
        previous = self._by_class.get(cls)
        if previous is not None and previous != (type_name, version):
            raise RegistrationError(f"{cls.__qualname__} is already registered as {previous}")
        versions[version] = cls
        self._by_class[cls] = (type_name, version)
        self.generation += 1

    def add_upcaster(self, type_name: str, from_version: int, fn: Upcaster) -> None:
        """Register ``fn`` to turn a ``from_version`` payload into ``from_version + 1``'s.
        Raises :class:`RegistrationError` unless ``type_name`` is registered at a newer
        version than ``from_version`` (register the message classes first)."""
        versions = self._by_name.get(type_name)
        if not versions:
            raise RegistrationError(
                f"upcaster for {type_name!r}: no class is registered under that name; "
                "register the message class (@message_type) before its upcasters"
            )
        newest = max(versions)
        if isinstance(from_version, bool) or not isinstance(from_version, int):
            raise RegistrationError(f"upcaster from_version must be an int, got {from_version!r}")
        if not 1 <= from_version < newest:
            raise RegistrationError(
                f"upcaster for {type_name!r} from version {from_version}: the newest version "
                f"registered is {newest}, so from_version must be 1..{newest - 1}"
            )
        key = (type_name, from_version)
        if key in self._upcasters:
            raise RegistrationError(f"an upcaster from {type_name!r} v{from_version} exists")
        self._upcasters[key] = fn
        self.generation += 1

    def name_of(self, cls: type[Message]) -> tuple[str, int]:
        """The (type name, version) a class is registered under."""
        try:
            return self._by_class[cls]
        except KeyError:
            raise RegistrationError(
                f"{cls.__module__}.{cls.__qualname__} is not registered; decorate it with "
                "@message_type('your.TypeName')"
            ) from None

    def is_registered(self, cls: type[Message]) -> bool:
        return cls in self._by_class

    def knows(self, type_name: str) -> bool:
        return type_name in self._by_name

    def resolve(self, type_name: str, version: int) -> tuple[type[Message], list[Upcaster]]:
        """The class to validate with and the upcasters to apply first, in order.

        Raises ``KeyError`` for an unknown name and ``LookupError`` for an unreachable version;
        the codec turns both into the specific decode errors.
        """
        versions = self._by_name[type_name]
        newest = max(versions)
        chain: list[Upcaster] = []
        v = version
        while v < newest:
            step = self._upcasters.get((type_name, v))
            if step is None:
                break
            chain.append(step)
            v += 1
        if v == newest:
            return versions[newest], chain
        if version in versions:
            return versions[version], []
        raise LookupError(version)

    def newest(self) -> dict[str, tuple[type[Message], int]]:
        """For each type name, its newest class and version."""
        out = {}
        for name, versions in self._by_name.items():
            v = max(versions)
            out[name] = (versions[v], v)
        return out

    def types(self) -> dict[str, dict[int, type[Message]]]:
        return {name: dict(v) for name, v in self._by_name.items()}


default_registry = MessageRegistry()


def message_type(
    type_name: str, *, version: int = 1, registry: MessageRegistry | None = None
) -> Callable[[MT], MT]:
    """Class decorator: register a message class under a stable type name and version."""

    def decorate(cls: MT) -> MT:
        (registry or default_registry).register(cls, type_name, version)
        return cls

    return decorate


def upcaster(
    type_name: str, *, from_version: int, registry: MessageRegistry | None = None
) -> Callable[[Upcaster], Upcaster]:
    """Decorator: turn a ``from_version`` payload (a dict) into the next version's payload.

    Deploy the consumers that know the new version (and this upcaster) before the producers
    that publish it: a consumer that does not know a version dead-letters it as
    :class:`msdata.errors.UnknownSchemaVersion` (README, "Changing a message")."""

    def decorate(fn: Upcaster) -> Upcaster:
        (registry or default_registry).add_upcaster(type_name, from_version, fn)
        return fn

    return decorate


# Internal to the package (used by msdata.serialization), not in __all__: a header name is a
# CloudEvents extension attribute name, 1-64 lowercase letters or digits (use fullmatch)
HEADER_NAME = re.compile(r"[a-z0-9]{1,64}")
# CloudEvents context attributes and msdata's own extensions; headers cannot shadow them.
RESERVED_ATTRIBUTES = frozenset(
    {
        "specversion",
        "id",
        "source",
        "type",
        "time",
        "subject",
        "datacontenttype",
        "dataschema",
        "data",
        "data_base64",
        "correlationid",
        "causationid",
        "partitionkey",
        "schemaversion",
    }
)
#: the empty headers every envelope without headers shares (internal to the package)
NO_HEADERS: Mapping[str, str] = MappingProxyType({})


def check_headers(headers: Mapping[str, str]) -> Mapping[str, str]:
    """Headers travel as CloudEvents extension attributes in the body and as transport
    headers beside it, so each meets two rules. Its name: a CloudEvents extension attribute
    name (1-64 lowercase letters or digits; CloudEvents 1.0, "Attribute Naming
    Convention"), not a reserved attribute; this also keeps out every name a broker or msdata
    reserves (``x-msdata-*``, ``Nats-*``). Its value: the transport rule,
    :func:`msdata.transport.check_header_value` (a str, valid UTF-8, no CR, LF or NUL), so a
    value accepted here is never refused when it is sent. Raises
    :class:`~msdata.errors.InvalidHeader`."""
    from msdata.transport import check_header_value

    for name, value in headers.items():
        if not isinstance(name, str) or not HEADER_NAME.fullmatch(name):
            raise InvalidHeader(
                f"header name {name!r} must be 1-64 lowercase ASCII letters or digits "
                "(a CloudEvents extension attribute name)"
            )
        if name in RESERVED_ATTRIBUTES:
            raise InvalidHeader(f"header name {name!r} is a reserved CloudEvents attribute")
        check_header_value(f"header {name!r}", value)
    return MappingProxyType(dict(headers))


class Envelope(NamedTuple, Generic[M]):
    """A message with what travels around it: immutable. ``id`` is a UUIDv7 string, ``time``
    is UTC. Build one with :func:`make_envelope`; the codec builds them when decoding."""

    message: M
    type: str
    version: int
    id: str
    time: datetime
    source: str = "msdata"
    correlation_id: str | None = None
    causation_id: str | None = None
    partition_key: str | None = None
    headers: Mapping[str, str] = NO_HEADERS


class LocalParent:
    """A message being handled in-process (a command or query) whose envelope is only built
    if something inside asks for it: most handlers never publish, and ids are not free.
    (Internal to the package: the CQRS buses set it as :data:`current_parent`.)"""

    __slots__ = ("_envelope", "message", "parent", "source", "type_name", "version")

    def __init__(self, message: Message, type_name: str, version: int, source: str) -> None:
        self.message = message
        self.type_name = type_name
        self.version = version
        self.source = source
        self.parent = current_parent.get()  # what was being handled when this one was sent
        self._envelope: Envelope[Any] | None = None

    def resolve(self) -> Envelope[Any]:
        if self._envelope is None:
            parent = self.parent
            if isinstance(parent, LocalParent):
                parent = parent.resolve()
            self._envelope = build_envelope(
                self.message, self.type_name, self.version, None, None, self.source, None, parent
            )
        return self._envelope


# Internal to the package (the buses set it around a handler; users call handling() and
# current_envelope()): the message being handled in this task, the parent of what it sends.
current_parent: ContextVar[Envelope[Any] | LocalParent | None] = ContextVar(
    "msdata_current_envelope", default=None
)


def current_envelope() -> Envelope[Any] | None:
    """The envelope of the message whose handler is running in this task, if any."""
    parent = current_parent.get()
    if parent is None or isinstance(parent, Envelope):
        return parent
    return parent.resolve()


class handling:
    """Mark ``envelope`` as the message being handled, so anything published or sent inside
    gets causation id = its id and its correlation id."""

    __slots__ = ("_envelope", "_token")

    def __init__(self, envelope: Envelope[Any] | LocalParent) -> None:
        self._envelope = envelope

    def __enter__(self) -> None:
        self._token = current_parent.set(self._envelope)

    def __exit__(self, *exc: object) -> None:
        current_parent.reset(self._token)


#: the most bytes (UTF-8) of a reason or header value msdata writes
SAFE_TEXT_LIMIT = 1024
# C0 and C1 controls, DEL, surrogates (in a str, every surrogate is a lone one), the line
# and paragraph separators, and the bidirectional formatting characters that reorder how
# text is shown (U+061C, U+200E-F, U+202A-E, U+2066-9: "Trojan Source", CVE-2021-42574)
_UNSAFE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\ud800-\udfff\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]"
)
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    return _SHORT_ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def safe_text(text: str, limit: int = SAFE_TEXT_LIMIT) -> str:
    """``text`` made safe for a reason or header value that msdata writes (a dead-letter
    reason, a relay's last error): control characters, lone surrogates, line separators
    and bidirectional formatting characters escaped as ``\\n``, ``\\x00``, ``\\ud800``,
    ``\\u202e`` (so the result is one line, valid UTF-8, shown in its own order),
    then cut to at most ``limit`` bytes of UTF-8 (``...`` marks a cut). ``limit`` >= 3.
    """
    if not (text.isascii() and text.isprintable()):
        text = _UNSAFE.sub(_escape, text)
    if len(text) * 4 <= limit:  # cannot be over the limit: skip the encoding
        return text
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode("utf-8", "ignore") + "..."


def check_text(what: str, text: object) -> str:
    """``text`` if it is a non-empty str that can be written as UTF-8 (no lone surrogate):
    message ids, consumer names and the like, before any store or broker sees them.
    Raises :class:`~msdata.errors.EncodeError`, whose text shows ``text`` escaped."""
    if isinstance(text, str) and text:
        if text.isascii():
            return text
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:
            raise EncodeError(
                f"{what} '{safe_text(text, 200)}' holds a lone surrogate (not UTF-8)"
            ) from None
    raise EncodeError(f"{what} must be a non-empty string, got {safe_text(repr(text), 200)}")


def check_message(
    message: object, registry: MessageRegistry | None = None, *, registered: bool = True
) -> tuple[str, int]:
    """The one check of every entry point that takes a message (``EventBus.publish``,
    ``Outbox.add``, the command and query buses, :func:`make_envelope`): ``message`` must be
    an instance of a :class:`Message` class, registered in ``registry`` (the default one if
    None) unless ``registered`` is False (in-process commands and queries).

    Returns the (type name, version) it is registered under (``("", 0)`` when
    ``registered`` is False). Raises :class:`~msdata.errors.NotAMessage` (also a
    ``TypeError``) for anything that is not a message instance, and
    :class:`~msdata.errors.RegistrationError` for a message class that is not registered.
    """
    if not isinstance(message, Message):
        raise NotAMessage(_not_a_message(message))
    if not registered:
        return "", 0
    return (registry or default_registry).name_of(type(message))


def _not_a_message(obj: object) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(obj, type) and issubclass(obj, Message):
        got = f"the class {name} itself; pass an instance"
    elif isinstance(obj, BaseModel):
        got = f"a {name}, a pydantic model but not a msdata Message (subclass Event instead)"
    else:
        got = "None" if obj is None else f"a {name}"
    return (
        "expected a message: an instance of an Event, Command or Query subclass registered "
        f"with @message_type('your.TypeName'); got {got}"
    )


def message_list(messages: object) -> list[Any]:
    """One message or envelope, or an iterable of them, as a list. Anything else is returned
    as a one-item list, so the per-message check (:func:`check_message`) names it: a dict,
    a str, a pydantic model or a dataclass is one (wrong) message, never its items."""
    if isinstance(messages, Message | Envelope | str | bytes | bytearray | Mapping | BaseModel):
        return [messages]
    if isinstance(messages, Iterable):
        return list(messages)
    return [messages]


def make_envelope(
    message: M,
    *,
    registry: MessageRegistry | None = None,
    partition_key: str | None = None,
    headers: Mapping[str, str] | None = None,
    source: str = "msdata",
    correlation_id: str | None = None,
) -> Envelope[M]:
    """Wrap ``message`` for sending. Correlation and causation come from the message being
    handled in this task (see :func:`handling`), unless given. Raises
    :class:`~msdata.errors.InvalidHeader` for a partition key that is not a str or holds a
    control character or a lone surrogate, and for a header :func:`check_headers` refuses."""
    if not source:
        raise ConfigurationError("an envelope's source must be a non-empty string")
    type_name, version = check_message(message, registry)
    return build_envelope(
        message,
        type_name,
        version,
        partition_key,
        headers,
        source,
        correlation_id,
        current_envelope(),
    )


def build_envelope(
    message: M,
    type_name: str,
    version: int,
    partition_key: str | None,
    headers: Mapping[str, str] | None,
    source: str,
    correlation_id: str | None,
    parent: Envelope[Any] | None,
    msg_id: str | None = None,
    time: datetime | None = None,
) -> Envelope[M]:
    """The envelope of ``message`` under a known type name and version, caused by ``parent``
    (internal to the package: :func:`make_envelope` without the registry lookup, for the
    buses), with id ``msg_id`` and ``time`` when given (a new id, the current UTC time if
    None). Raises :class:`~msdata.errors.InvalidHeader` for a bad key or header."""
    if partition_key is not None:
        if not isinstance(partition_key, str):
            raise InvalidHeader(f"partition key must be a str, got {type(partition_key).__name__}")
        if _CONTROL.search(partition_key):
            raise InvalidHeader(
                f"partition key {safe_text(partition_key, 200)!r} holds a control character "
                "(brokers carry keys in headers and subjects: use printable text)"
            )
        if not partition_key.isascii():
            from msdata.transport import check_header_value

            check_header_value("partition key", partition_key)  # a lone surrogate
    if msg_id is None:
        msg_id = new_id()
    if parent is not None:
        causation: str | None = parent.id
        correlation = correlation_id or parent.correlation_id or parent.id
    else:
        causation = None
        correlation = correlation_id or msg_id
    # tuple.__new__ and datetime.now: the NamedTuple's __new__ and utc_now() without the
    # Python frame each adds (this runs once per message published)
    return _tuple_new(  # type: ignore[no-any-return]
        Envelope,
        (
            message,
            type_name,
            version,
            msg_id,
            _now(UTC) if time is None else time,
            source,
            correlation,
            causation,
            partition_key,
            check_headers(headers) if headers else NO_HEADERS,
        ),
    )


_tuple_new: Any = tuple.__new__
_now = datetime.now
