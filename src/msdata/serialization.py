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
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from msdata.errors import (
    InvalidEnvelope,
    MalformedMessage,
    MessageTooLarge,
    MessageValidationError,
    UnknownMessageType,
    UnknownSchemaVersion,
)
from msdata.messages import (
    _EMPTY,
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


class CloudEventsCodec:
    """Encodes envelopes to CloudEvents JSON bytes and decodes them back, symmetrically.

    ``decode`` raises only :class:`msdata.errors.DecodeError` subclasses for bad input, so a
    consumer can dead-letter it with ``str(error)`` as the reason.
    """

    content_type = CONTENT_TYPE

    def __init__(
        self, registry: MessageRegistry | None = None, *, max_size: int = DEFAULT_MAX_SIZE
    ) -> None:
        self.registry = registry if registry is not None else default_registry
        self.max_size = max_size

    def encode(self, envelope: Envelope[Any]) -> bytes:
        head: dict[str, Any] = {
            "specversion": "1.0",
            "id": envelope.id,
            "source": envelope.source,
            "type": envelope.type,
            "time": envelope.time.isoformat(),
            "datacontenttype": "application/json",
            "schemaversion": envelope.version,
        }
        if envelope.correlation_id is not None:
            head["correlationid"] = envelope.correlation_id
        if envelope.causation_id is not None:
            head["causationid"] = envelope.causation_id
        if envelope.partition_key is not None:
            head["partitionkey"] = envelope.partition_key
        if envelope.headers:
            head.update(envelope.headers)
        message = envelope.message
        data = message.__pydantic_serializer__.to_json(message)
        raw = b"".join((_dumps(head)[:-1].encode(), b',"data":', data, b"}"))
        if len(raw) > self.max_size:
            raise MessageTooLarge(
                f"{envelope.type} {envelope.id} encodes to {len(raw)} bytes; "
                f"the maximum is {self.max_size}"
            )
        return raw

    def decode(self, raw: bytes | bytearray | str) -> Envelope[Message]:
        if len(raw) > self.max_size:
            raise MessageTooLarge(f"{len(raw)} bytes; the maximum is {self.max_size}")
        try:
            obj = _loads(raw)
        except (ValueError, UnicodeDecodeError, TypeError) as e:
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
        if isinstance(version, str) and version.isdigit():
            version = int(version)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InvalidEnvelope(f"schemaversion must be a positive integer, got {version!r}")
        content_type = obj.get("datacontenttype", "application/json")
        if not isinstance(content_type, str) or not (
            content_type in _JSON_TYPES or content_type.endswith("+json")
        ):
            raise InvalidEnvelope(f"datacontenttype {content_type!r} is not JSON")
        if "data" not in obj:
            raise InvalidEnvelope("no 'data' attribute (data_base64 is not supported)")
        data = obj["data"]
        if not isinstance(data, dict):
            raise InvalidEnvelope(f"'data' must be a JSON object, got {type(data).__name__}")
        raw_time = obj.get("time")
        if raw_time is None:
            raise InvalidEnvelope("no 'time' attribute")
        if not isinstance(raw_time, str):
            raise InvalidEnvelope(f"'time' must be an RFC 3339 string, got {raw_time!r}")
        try:
            time = datetime.fromisoformat(raw_time)
        except ValueError as e:
            raise InvalidEnvelope(f"'time' is not RFC 3339: {raw_time!r}") from e
        if time.tzinfo is None:
            raise InvalidEnvelope(f"'time' has no UTC offset: {raw_time!r}")

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
            message = cls.model_validate(data)
        except ValidationError as e:
            raise MessageValidationError(
                f"{type_name} v{version} {msg_id}: {e.error_count()} validation error(s): "
                + "; ".join(
                    f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}"
                    for err in e.errors()[:5]
                )
            ) from e
        except Exception as e:  # an upcaster that raises on data it did not expect
            raise MessageValidationError(
                f"{type_name} v{version} {msg_id}: upcaster failed: {e!r}"
            ) from e

        headers: dict[str, str] | None = None
        for name, value in obj.items():
            if name not in RESERVED_ATTRIBUTES and isinstance(value, str | int | bool):
                if headers is None:
                    headers = {}
                headers[name] = value if isinstance(value, str) else json.dumps(value)
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
            headers=headers if headers is not None else _EMPTY,
        )


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
