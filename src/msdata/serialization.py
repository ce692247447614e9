"""The wire format: CloudEvents 1.0, JSON structured mode.

One message is one JSON object, readable by a service in any language::

    {"specversion": "1.0", "id": "0193...", "source": "orders", "type": "orders.OrderPlaced",
     "time": "2026-11-25T17:49:07.123456+00:00", "datacontenttype": "application/json",
     "schemaversion": 1, "correlationid": "0193...", "causationid": "0193...",
     "partitionkey": "order-42", "traceparent": "00-...", "data": {...}}

``correlationid``, ``causationid``, ``partitionkey`` and ``schemaversion`` are msdata's
extension attributes; user headers travel as further extension attributes. Nothing is ever
unpickled: the registry names the class and pydantic validates the payload.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any, Literal, NotRequired, Union

from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError, with_config
from pydantic_core import to_json as _to_json
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from msdata.errors import (
    InvalidEnvelope,
    MalformedMessage,
    MessageError,
    MessageTooLarge,
    MessageValidationError,
    UnknownMessageType,
    UnknownSchemaVersion,
)
from msdata.ids import utc_now
from msdata.messages import (
    HEADER_NAME,
    NO_HEADERS,
    RESERVED_ATTRIBUTES,
    Envelope,
    Message,
    MessageRegistry,
    default_registry,
)

__all__ = ["CONTENT_TYPE", "DEFAULT_MAX_SIZE", "CloudEventsCodec"]

CONTENT_TYPE = "application/cloudevents+json"
DEFAULT_MAX_SIZE = 1024 * 1024

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_loads = json.loads
_JSON_TYPES = frozenset({"application/json", "text/json"})
_StrictStr = Annotated[str, Strict()]
_StrictInt = Annotated[int, Strict()]
# the attributes the fast path reads itself; every other one is a header
_KNOWN = frozenset(
    {
        "specversion",
        "id",
        "source",
        "type",
        "time",
        "datacontenttype",
        "schemaversion",
        "correlationid",
        "causationid",
        "partitionkey",
        "data",
    }
)


def _wire_type(type_name: str, cls: type[Message]) -> Any:
    """A TypedDict describing one message type's whole CloudEvent, so pydantic's core can
    encode it, or validate it from JSON, in one pass. User headers are its extra keys."""
    fields: dict[str, Any] = {
        "specversion": Literal["1.0"],
        "id": _StrictStr,
        "source": _StrictStr,
        "type": Literal[type_name],
        "time": NotRequired[_StrictStr],  # parsed by _parse_time, as on the plain path
        "datacontenttype": NotRequired[_StrictStr],
        "schemaversion": NotRequired[_StrictInt],
        "correlationid": NotRequired[_StrictStr],
        "causationid": NotRequired[_StrictStr],
        "partitionkey": NotRequired[_StrictStr],
        "data": cls,
    }
    make_typed_dict: Any = TypedDict
    wire = make_typed_dict(f"CloudEvent_{cls.__name__}", fields)
    return with_config(ConfigDict(extra="allow"))(wire)


class CloudEventsCodec:
    """Encodes envelopes to CloudEvents JSON bytes and decodes them back, symmetrically.

    ``decode`` raises only :class:`msdata.errors.DecodeError` subclasses for bad input, so a
    consumer can dead-letter it with ``str(error)`` as the reason. A well-formed event of a
    registered type at its newest version is decoded in one pass through pydantic-core; any
    other input takes the plain path, which upcasts older versions and names the exact
    error. Both paths accept and reject the same inputs (a property test checks it).

    Decoding is lenient where CloudEvents is: ``time`` is optional (the time of decoding is
    used), and ``datacontenttype`` may carry parameters (``application/json; charset=utf-8``).
    """

    content_type = CONTENT_TYPE

    def __init__(
        self, registry: MessageRegistry | None = None, *, max_size: int = DEFAULT_MAX_SIZE
    ) -> None:
        self.registry = registry if registry is not None else default_registry
        self.max_size = max_size
        self._generation = -1
        self._encoders: dict[type[Message], Any] = {}  # class -> pydantic-core serializer
        self._decoder: Any = None  # pydantic-core validator of every registered type
        self._newest: dict[str, tuple[type[Message], int]] = {}

    def _refresh(self) -> None:
        """(Re)build the pydantic adapters after the registry changed."""
        registry = self.registry
        self._generation = registry.generation
        self._encoders = {}
        self._newest = registry.newest()
        wires = [_wire_type(name, cls) for name, (cls, _) in self._newest.items()]
        if not wires:
            self._decoder = None
        elif len(wires) == 1:
            self._decoder = TypeAdapter(wires[0]).validator
        else:
            union: Any = Annotated[Union[tuple(wires)], Field(discriminator="type")]  # noqa: UP007
            self._decoder = TypeAdapter(union).validator

    def encode(self, envelope: Envelope[Any]) -> bytes:
        if self._generation != self.registry.generation:
            self._refresh()
        message = envelope.message
        cls = type(message)
        encoder = self._encoders.get(cls)
        if encoder is None:
            name, _ = self.registry.name_of(cls)
            encoder = self._encoders[cls] = TypeAdapter(_wire_type(name, cls)).serializer
        time = envelope.time
        if time.tzinfo is None:
            raise MessageError(f"{envelope.type} {envelope.id}: time must be timezone-aware")
        # headers first, so that none can stand in for a CloudEvents attribute
        doc: dict[str, Any] = dict(envelope.headers) if envelope.headers else {}
        doc["specversion"] = "1.0"
        doc["id"] = envelope.id
        doc["source"] = envelope.source
        doc["type"] = envelope.type
        doc["time"] = time.isoformat()
        doc["datacontenttype"] = "application/json"
        doc["schemaversion"] = envelope.version
        if envelope.correlation_id is not None:
            doc["correlationid"] = envelope.correlation_id
        if envelope.causation_id is not None:
            doc["causationid"] = envelope.causation_id
        if envelope.partition_key is not None:
            doc["partitionkey"] = envelope.partition_key
        doc["data"] = message
        raw: bytes = encoder.to_json(doc)
        if len(raw) > self.max_size:
            raise MessageTooLarge(
                f"{envelope.type} {envelope.id} encodes to {len(raw)} bytes; "
                f"the maximum is {self.max_size}"
            )
        return raw

    def decode(self, raw: bytes | bytearray | str) -> Envelope[Message]:
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogatepass")
        if len(raw) > self.max_size:
            raise MessageTooLarge(f"{len(raw)} bytes; the maximum is {self.max_size}")
        if self._generation != self.registry.generation:
            self._refresh()
        if self._decoder is not None:
            # fast path; anything unusual goes to the plain path, which names the exact error
            try:
                envelope = self._from_validated(self._decoder.validate_json(raw))
            except Exception:
                envelope = None
            if envelope is not None:
                return envelope
        return self.decode_plain(raw)

    def _from_validated(self, doc: dict[str, Any]) -> Envelope[Message] | None:
        type_name = doc["type"]
        newest = self._newest[type_name][1]
        if doc.get("schemaversion", 1) != newest or not doc["id"] or not doc["source"]:
            return None
        content_type = doc.get("datacontenttype")
        if content_type is not None and not _is_json(content_type):
            return None
        raw_time = doc.get("time")
        time = utc_now() if raw_time is None else _parse_time(raw_time)
        headers: dict[str, str] | None = None
        extra = doc.keys() - _KNOWN
        if extra:
            headers = _headers(doc, extra)
        get = doc.get
        return Envelope(
            doc["data"],
            type_name,
            newest,
            doc["id"],
            time,
            doc["source"],
            get("correlationid"),
            get("causationid"),
            get("partitionkey"),
            headers or NO_HEADERS,
        )

    def decode_plain(self, raw: bytes | bytearray | str) -> Envelope[Message]:
        """Decode without the fast path: the reference, and the path for every bad input."""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogatepass")
        if len(raw) > self.max_size:
            raise MessageTooLarge(f"{len(raw)} bytes; the maximum is {self.max_size}")
        try:
            obj = _loads(raw)
        except (ValueError, UnicodeDecodeError, TypeError, RecursionError) as e:
            raise MalformedMessage(f"not UTF-8 JSON: {e}") from e
        if not isinstance(obj, dict):
            raise MalformedMessage(f"a CloudEvent is a JSON object, got {type(obj).__name__}")
        return self.from_dict(obj)

    def from_dict(self, obj: dict[str, Any]) -> Envelope[Message]:
        """Decode an already-parsed CloudEvent object (for brokers that hand over JSON)."""
        if obj.get("specversion") != "1.0":
            raise InvalidEnvelope(f"specversion must be '1.0', got {obj.get('specversion')!r}")
        msg_id = _required_str(obj, "id")
        source = _required_str(obj, "source")
        type_name = _required_str(obj, "type")
        version = obj.get("schemaversion", 1)
        if isinstance(version, str) and version.isascii() and version.isdigit():
            version = int(version)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InvalidEnvelope(f"schemaversion must be a positive integer, got {version!r}")
        content_type = obj.get("datacontenttype", "application/json")
        if not isinstance(content_type, str) or not _is_json(content_type):
            raise InvalidEnvelope(f"datacontenttype {content_type!r} is not JSON")
        if "data" not in obj:
            raise InvalidEnvelope("no 'data' attribute (data_base64 is not supported)")
        data = obj["data"]
        if not isinstance(data, dict):
            raise InvalidEnvelope(f"'data' must be a JSON object, got {type(data).__name__}")
        raw_time = obj.get("time")
        if raw_time is None:
            time = utc_now()
        elif not isinstance(raw_time, str):
            raise InvalidEnvelope(f"'time' must be an RFC 3339 string, got {raw_time!r}")
        else:
            time = _parse_time(raw_time)

        try:
            cls, chain = self.registry.resolve(type_name, version)
        except KeyError:
            raise UnknownMessageType(f"no message class is registered as {type_name!r}") from None
        except LookupError:
            raise UnknownSchemaVersion(
                f"{type_name!r} has no class or upcaster path for schema version {version}"
            ) from None
        try:
            for step in chain:
                data = step(dict(data))
            # validate as JSON, as the fast path does: the payload came from the wire
            message = cls.model_validate_json(_to_json(data))
        except ValidationError as e:
            raise MessageValidationError(
                f"{type_name} v{version} {msg_id}: {e.error_count()} validation error(s): "
                + "; ".join(
                    f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}"
                    for err in e.errors()[:5]
                )
            ) from e
        except Exception as e:  # an upcaster or validator that raises something else
            raise MessageValidationError(f"{type_name} v{version} {msg_id}: {e!r}") from e

        extra = obj.keys() - _KNOWN
        return Envelope(
            message=message,
            type=type_name,
            version=self.registry.name_of(cls)[1],
            id=msg_id,
            time=time,
            source=source,
            correlation_id=_optional_str(obj, "correlationid"),
            causation_id=_optional_str(obj, "causationid"),
            partition_key=_optional_str(obj, "partitionkey"),
            headers=(_headers(obj, extra) if extra else None) or NO_HEADERS,
        )


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media in _JSON_TYPES or media.endswith("+json")


def _parse_time(raw: str) -> datetime:
    try:
        time = datetime.fromisoformat(raw)
    except ValueError as e:
        raise InvalidEnvelope(f"'time' is not RFC 3339: {raw!r}") from e
    if time.tzinfo is None:
        raise InvalidEnvelope(f"'time' has no UTC offset: {raw!r}")
    return time


def _headers(obj: dict[str, Any], names: Iterable[str]) -> dict[str, str]:
    """Extension attributes as headers: valid names only, strings (numbers as JSON text)."""
    headers: dict[str, str] = {}
    for name in names:
        value = obj[name]
        if name in RESERVED_ATTRIBUTES or not HEADER_NAME.match(name):
            continue
        if isinstance(value, str):
            headers[name] = value
        elif isinstance(value, int | bool):
            headers[name] = json.dumps(value)
    return headers


def _required_str(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidEnvelope(f"{name!r} must be a non-empty string, got {value!r}")
    return value


def _optional_str(obj: dict[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidEnvelope(f"{name!r} must be a string, got {value!r}")
    return value
