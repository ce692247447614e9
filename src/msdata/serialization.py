"""The wire format: CloudEvents 1.0, JSON structured mode.

One message is one JSON object, readable by a service in any language::

    {"specversion": "1.0", "id": "0193...", "source": "orders", "type": "orders.OrderPlaced",
     "time": "2026-11-25T17:49:07.123456Z", "datacontenttype": "application/json",
     "schemaversion": 1, "correlationid": "0193...", "causationid": "0193...",
     "partitionkey": "order-42", "traceparent": "00-...", "data": {...}}

``correlationid``, ``causationid``, ``partitionkey`` and ``schemaversion`` are msdata's
extension attributes; user headers travel as further extension attributes. Nothing is ever
unpickled: the registry names the class and pydantic validates the payload.

What decode accepts, encode writes back, and what encode writes, decode reads (the rules are
in docs/messages.md): strings are UTF-8 (no lone surrogates, in values or keys); numbers are
finite (RFC 8259 §6 has no NaN or Infinity; ``1e400`` is refused too); ints have at most 4300
digits (Python's int/str limit); one CloudEvent nests at most :data:`MAX_DEPTH` objects and
arrays (the envelope and the data object included). Encode raises
:class:`msdata.errors.EncodeError`, decode :class:`msdata.errors.MalformedMessage`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import json.encoder
import math
import re
import weakref
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, NamedTuple, NotRequired, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    with_config,
)
from pydantic_core import to_json as _to_json
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from msdata.errors import (
    EncodeError,
    InvalidEnvelope,
    MalformedMessage,
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

__all__ = ["CONTENT_TYPE", "DEFAULT_MAX_SIZE", "MAX_DEPTH", "MAX_INT_DIGITS", "CloudEventsCodec"]

CONTENT_TYPE = "application/cloudevents+json"
DEFAULT_MAX_SIZE = 1024 * 1024

#: most nested JSON objects and arrays in one CloudEvent (the envelope object is 1, ``data`` 2):
#: what pydantic-core's JSON parser reads, so what msdata writes every consumer can read
MAX_DEPTH = 200
#: most digits in an int: Python's int/str conversion limit (``sys.get_int_max_str_digits``
#: default), which json and pydantic-core's parser both apply when reading
MAX_INT_DIGITS = 4300
_INT_LIMIT = 10**MAX_INT_DIGITS
_INT_LIMIT_BITS = _INT_LIMIT.bit_length() - 1
# U+FFFD in an encoded event of a class with a dict field: maybe a key's lone surrogate
_FFFD = "\ufffd".encode()
_FFFD_LEAD = _FFFD[0]  # one byte: memchr, much faster than the three-byte search
# a run of more digits than an int may have, somewhere in an encoded event: look closer
_LONG_DIGITS = re.compile(rb"[0-9]{%d}" % (MAX_INT_DIGITS + 1))
# core-schema types whose values pydantic writes as JSON that reads back the same, or raises
# for (a lone surrogate in a str): a class made only of these needs no check after encoding
_SAFE_SCHEMA_TYPES = frozenset(
    {
        "str",
        "int",
        "bool",
        "bytes",
        "none",
        "uuid",
        "datetime",
        "date",
        "time",
        "timedelta",
        "decimal",
        "enum",
        "literal",
        "url",
        "multi-host-url",
        "model",
        "model-fields",
        "model-field",
        "default",
        "nullable",
        "list",
        "tuple",
        "set",
        "frozenset",
        "union",
        "tagged-union",
        "function-after",
        "function-before",
        "lax-or-strict",
        "json-or-python",
        "chain",
        "is-instance",
    }
)

_tuple_new: Any = tuple.__new__  # a NamedTuple without its Python __new__ frame


class _ToPlainPath(Exception):
    """Raised inside the decode fast path: this input is for the plain path to decide."""


_fromisoformat = datetime.fromisoformat
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_loads = json.loads
_JSON_TYPES = frozenset({"application/json", "text/json"})
_StrictStr = Annotated[str, Strict()]
_StrictInt = Annotated[int, Strict()]
# the attributes the fast path reads itself (every one is in what the wire type decodes);
# every other one is a header
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
_KNOWN_COUNT = len(_KNOWN)


def _wire_type(type_name: str, cls: type[Message], *, encoding: bool = False) -> Any:
    """A TypedDict describing one message type's whole CloudEvent, so pydantic's core can
    encode it, or validate it from JSON, in one pass. User headers are its extra keys.

    Decoding reads ``time`` as a string (parsed as on the plain path), and gives every
    optional attribute that is absent its default (None; ``schemaversion`` 1, as the plain
    path reads an absent one), so a decoded dict always holds all :data:`_KNOWN` members,
    and more only when the event has extension attributes. A member that is present but
    null is still refused (the plain path decides it). Encoding writes a UTC datetime
    itself (``...Z``) and any other as the text ``encode`` made of it."""

    def optional(schema: Any, default: Any = None) -> Any:
        return schema if encoding else Annotated[schema, Field(default=default)]

    fields: dict[str, Any] = {
        "specversion": Literal["1.0"],
        "id": _StrictStr,
        "source": _StrictStr,
        "type": Literal[type_name],
        "time": NotRequired[Any if encoding else optional(_StrictStr)],
        "datacontenttype": NotRequired[optional(_StrictStr)],
        "schemaversion": NotRequired[optional(_StrictInt, 1)],
        "correlationid": NotRequired[optional(_StrictStr)],
        "causationid": NotRequired[optional(_StrictStr)],
        "partitionkey": NotRequired[optional(_StrictStr)],
        "data": cls,
    }
    make_typed_dict: Any = TypedDict
    wire = make_typed_dict(f"CloudEvent_{cls.__name__}", fields)
    return with_config(ConfigDict(extra="allow"))(wire)


_quote = json.encoder.encode_basestring  # a str as JSON, escaped as pydantic-core does


def _head_parts(type_name: str, source: str, version: int) -> tuple[str, str]:
    """The text encode writes between the id and the time, and after the time, for one
    type, source and version (cached per codec)."""
    before = f',"source":{_quote(source)},"type":{_quote(type_name)},"time":'
    after = f',"datacontenttype":"application/json","schemaversion":{version}'
    return before, after


#: how ``CloudEventsCodec.encode`` writes the CloudEvents version (compact JSON)
_SPECVERSION_MEMBER = b'"specversion":"1.0"'


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
        # class -> pydantic-core serializers
        # (the whole CloudEvent's, what to look at after encoding, anything?, the class's)
        self._encoders: dict[type[Message], tuple[Any, _Plan, bool, Any]] = {}
        # classes whose decoded values need a look -> the fields to look at
        self._checked: dict[type[Message], _Plan] = {}
        self._decoder: Any = None  # pydantic-core validator of every registered type
        self._newest: dict[str, tuple[type[Message], int]] = {}
        # type name -> its newest class's validator, version, and what to look at after
        self._newest_validators: dict[str, tuple[Any, int, _Plan | None]] = {}
        # (type name, source, version) -> the text around the time in what encode writes
        self._heads: dict[tuple[str, str, int], tuple[str, str]] = {}
        self._last_head: tuple[Any, Any, int, tuple[str, str]] = (None, None, 0, ("", ""))
        # the last time written and its JSON: one publish_many shares one time
        self._last_time: tuple[datetime | None, str] = (None, "")
        self._last_correlation: tuple[str | None, str] = (None, "")

    def _refresh(self) -> None:
        """(Re)build the pydantic adapters after the registry changed."""
        registry = self.registry
        self._generation = registry.generation
        self._encoders = {}
        self._newest = registry.newest()
        plans = {cls: _check_plan(cls) for cls, _ in self._newest.values()}
        self._checked = {c: p for c, p in plans.items() if p.walk != () or p.floats}
        self._newest_validators = {
            name: (cls.__pydantic_validator__, version, self._checked.get(cls))
            for name, (cls, version) in self._newest.items()
        }
        wires = [_wire_type(name, cls) for name, (cls, _) in self._newest.items()]
        if not wires:
            self._decoder = None
        elif len(wires) == 1:
            self._decoder = TypeAdapter(wires[0]).validator
        else:
            union: Any = Annotated[Union[tuple(wires)], Field(discriminator="type")]  # noqa: UP007
            self._decoder = TypeAdapter(union).validator

    def encode(self, envelope: Envelope[Any]) -> bytes:
        """The CloudEvent of ``envelope``, as compact JSON bytes. Raises
        :class:`~msdata.errors.EncodeError` (:class:`~msdata.errors.MessageTooLarge` over
        ``max_size``)."""
        return self.encode_at(envelope)[0]

    def encode_at(self, envelope: Envelope[Any], when: str | None = None) -> tuple[bytes, int]:
        """:meth:`encode`, and the offset in the bytes where the JSON of ``data`` starts
        (it ends one byte before the end). Internal to the package: the event bus hands
        both to :meth:`decode_sent`. ``when``: the JSON text of ``envelope.time`` (a UTC
        datetime) as pydantic-core writes it, if the caller has it
        (:func:`msdata.ids.new_id_time`'s): given only for an envelope that
        :func:`msdata.messages.build_envelope` made, whose attributes are not checked again."""
        if self._generation != self.registry.generation:
            self._refresh()
        message = envelope.message
        cls = type(message)
        cached = self._encoders.get(cls)
        if cached is None:
            name, _ = self.registry.name_of(cls)
            plan = _check_plan(cls)
            cached = self._encoders[cls] = (
                TypeAdapter(_wire_type(name, cls, encoding=True)).serializer,
                plan,
                not plan.empty,
                cls.__pydantic_serializer__,
            )
        encoder, plan, check, serializer = cached
        # the envelope's own attributes: what make_envelope builds passes; a hand-built one
        # that decode could not read back is refused here (pydantic would write it, warning)
        (_, type_name, version, msg_id, time, source, correlation, causation, key, headers) = (
            envelope
        )
        if when is None and not (
            type(msg_id) is str
            and msg_id
            and type(source) is str
            and source
            and type(version) is int
            and isinstance(time, datetime)
            and time.tzinfo is not None
            and (correlation is None or type(correlation) is str)
            and (causation is None or type(causation) is str)
            and (key is None or type(key) is str)
        ):
            raise EncodeError(_bad_attributes(envelope))
        try:
            # The attributes written as text and the data by the class's own serializer,
            # joined: the same bytes as pydantic-core writing the whole CloudEvent (a test
            # compares them), for half its cost. json's encode_basestring escapes a string
            # as pydantic-core does (backslash, quote, \n \r \t \b \f, other controls as
            # \u00xx); a lone surrogate fails .encode(), and anything unusual (a header that
            # would shadow an attribute, a non-str header) takes the general path below.
            last_head = self._last_head  # most messages are of the type before them
            if last_head[0] is type_name and last_head[1] is source and last_head[2] == version:
                parts = last_head[3]
            else:
                found = self._heads.get((type_name, source, version))
                if found is None:
                    if len(self._heads) > 1000:  # sources are few; a bound all the same
                        self._heads.clear()
                    found = self._heads[(type_name, source, version)] = _head_parts(
                        type_name, source, version
                    )
                parts = found
                self._last_head = (type_name, source, version, parts)
            if when is None:
                last = self._last_time
                if last[0] is time:  # a batch shares one time: written once
                    when = last[1]
                else:
                    # pydantic-core writes a UTC datetime as RFC 3339 (``...07.123456Z``)
                    # for a fraction of what isoformat() costs; any other offset as
                    # isoformat() has it (an offset in seconds included), as decode reads
                    # it back
                    when = (
                        _to_json(time).decode()
                        if time.tzinfo is UTC and type(time) is datetime
                        else _quote(time.isoformat())
                    )
                    self._last_time = (time, when)
            quoted_id = _quote(msg_id)
            if causation is None and key is None and not headers and correlation is not None:
                # the common case in one piece: correlation is the id itself, or the
                # parent's (then quoted once for a batch)
                if correlation is msg_id:
                    quoted = quoted_id
                else:
                    last_c = self._last_correlation
                    if last_c[0] is correlation:
                        quoted = last_c[1]
                    else:
                        quoted = _quote(correlation)
                        self._last_correlation = (correlation, quoted)
                start = (
                    f'{{"specversion":"1.0","id":{quoted_id}{parts[0]}{when}{parts[1]}'
                    f',"correlationid":{quoted},"data":'
                ).encode()
            else:
                head = f'"specversion":"1.0","id":{quoted_id}{parts[0]}{when}{parts[1]}'
                if correlation is not None:
                    head = f'{head},"correlationid":{_quote(correlation)}'
                if causation is not None:
                    head = f'{head},"causationid":{_quote(causation)}'
                if key is not None:
                    head = f'{head},"partitionkey":{_quote(key)}'
                extension = ""
                if headers:
                    for name, value in headers.items():
                        if name in RESERVED_ATTRIBUTES:
                            raise _ToPlainPath
                        extension += f"{_quote(name)}:{_quote(value)},"
                start = f'{{{extension}{head},"data":'.encode()
            raw = None
        except (_ToPlainPath, TypeError, UnicodeEncodeError):
            raw = self._encode_whole(encoder, envelope)
            start = b""
        if raw is None:
            try:
                data: bytes = serializer.to_json(message)
            except Exception as e:  # pydantic's serialization error, or a custom serializer's
                raise EncodeError(_why_unencodable(envelope, e)) from e
            at = len(start)
            raw = start + data + b"}"
        else:
            at = raw.find(b'"data":') + 7  # the first: every member before it is a string
        # pydantic writes NaN as null and a lone surrogate in a dict key as U+FFFD: a class
        # that can hold those is checked (the others cost nothing here)
        if (
            check
            and (
                (plan.fffd and _FFFD_LEAD in raw and _FFFD in raw)
                or _suspect_message(message, plan, True)
            )
        ) or (len(raw) > MAX_INT_DIGITS and _LONG_DIGITS.search(raw)):
            problem = _unencodable(message, 2)
            if problem is not None:
                raise EncodeError(f"{envelope.type} {envelope.id!r}: data{problem}")
        if len(raw) > self.max_size:
            raise MessageTooLarge(
                f"{envelope.type} {envelope.id!r} encodes to {len(raw)} bytes; "
                f"the maximum is {self.max_size}"
            )
        return raw, at

    def _encode_whole(self, encoder: Any, envelope: Envelope[Any]) -> bytes:
        """The CloudEvent written by pydantic-core in one pass (``encoder``: the serializer
        of the class's wire type): the reference that :meth:`encode_at` writes faster, and
        its path for envelopes built by hand that it does not take (and for the errors)."""
        (
            message,
            type_name,
            version,
            msg_id,
            time,
            source,
            correlation,
            causation,
            key,
            headers,
        ) = envelope
        when: Any = time if time.tzinfo is UTC and type(time) is datetime else time.isoformat()
        # headers first, so that none can stand in for a CloudEvents attribute
        doc: dict[str, Any] = {
            **(headers or {}),
            "specversion": "1.0",
            "id": msg_id,
            "source": source,
            "type": type_name,
            "time": when,
            "datacontenttype": "application/json",
            "schemaversion": version,
        }
        if correlation is not None:
            doc["correlationid"] = correlation
        if causation is not None:
            doc["causationid"] = causation
        if key is not None:
            doc["partitionkey"] = key
        doc["data"] = message
        try:
            return encoder.to_json(doc)  # type: ignore[no-any-return]
        except Exception as e:  # pydantic's serialization error, or a custom serializer's
            raise EncodeError(_why_unencodable(envelope, e)) from e

    def looks_like_own_event(self, body: bytes) -> bool:
        """Whether ``body`` has the shape :meth:`encode` writes: one compact JSON object
        (``{`` … ``}``) with the member ``"specversion":"1.0"``, right after the ``{`` or
        after the headers that ``encode`` puts first. A cheap look (some 0.1 µs; a
        substring search only when there are headers), not a check: :meth:`decode` still
        checks everything. The outbox relay asks it before publishing a row as it is.

        A header value cannot fake the member: inside a JSON string its quotes are
        escaped."""
        # the member right after "{" (no headers) costs a slice; a search only with headers
        return (
            body[-1:] == b"}"
            and (
                body[1:20] == _SPECVERSION_MEMBER
                # (find: a method call, but 2-3x cheaper than ``in`` on bytes)
                or (body[:2] == b'{"' and body.find(_SPECVERSION_MEMBER) > 0)
            )
        )

    def decode(self, raw: bytes | bytearray | str) -> Envelope[Message]:
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogatepass")
        if len(raw) > self.max_size:
            raise MessageTooLarge(f"{len(raw)} bytes; the maximum is {self.max_size}")
        if self._generation != self.registry.generation:
            self._refresh()
        if self._decoder is not None:
            # the fast path, inline (it runs once per message consumed): one pass through
            # pydantic-core, then each attribute read once, in the cheapest form of the plain
            # path's rule. Anything unusual (_ToPlainPath, a validation error, whatever a user
            # validator raised) goes to the plain path, which names the exact error.
            try:
                doc = self._decoder.validate_json(raw)
                # every _KNOWN member is in doc (absent ones with their defaults): read by
                # subscript, much cheaper than get()
                type_name = doc["type"]
                newest = self._newest[type_name][1]
                msg_id = doc["id"]
                source = doc["source"]
                if doc["schemaversion"] != newest or not msg_id or not source:
                    raise _ToPlainPath
                content_type = doc["datacontenttype"]
                if (
                    content_type is not None
                    and content_type != "application/json"  # what encode writes
                    and not _is_json(content_type)
                ):
                    raise _ToPlainPath
                raw_time = doc["time"]
                if raw_time is None:
                    time = utc_now()
                else:
                    time = _fromisoformat(raw_time)  # ValueError: to the plain path
                    if time.tzinfo is None:
                        raise _ToPlainPath
                headers: Mapping[str, str] = NO_HEADERS
                if len(doc) != _KNOWN_COUNT:  # more members: extension attributes
                    extra = doc.keys() - _KNOWN
                    if "data_base64" in extra:
                        raise _ToPlainPath  # with "data" too: the plain path names the error
                    headers = _headers(doc, extra) or NO_HEADERS
                data = doc["data"]
                checked = self._checked
                if (
                    checked
                    and type(data) in checked
                    and _suspect_message(data, checked[type(data)], False)
                ):
                    raise _ToPlainPath  # NaN, Infinity or 1e400 in a float or Any field
                return _tuple_new(  # type: ignore[no-any-return]
                    Envelope,
                    (
                        data,
                        type_name,
                        newest,
                        msg_id,
                        time,
                        source,
                        doc["correlationid"],
                        doc["causationid"],
                        doc["partitionkey"],
                        headers,
                    ),
                )
            except Exception:
                pass
        return self.decode_plain(raw)

    def decode_sent(self, raw: bytes, sent: tuple[Any, ...], at: int) -> Envelope[Message]:
        """What :meth:`decode` returns for ``raw``, when ``raw`` and ``at`` are what
        :meth:`encode_at` wrote in this process for an envelope whose every attribute but
        the message is ``sent`` (``envelope[1:]``), with no headers and a UTC time: only the
        data is validated from the bytes (the handler gets its own message, validated as on
        any transport); the attributes are ``sent``, which is what decoding them would give.
        Internal to the package: the event bus uses it when its transport hands back the
        message object it published (the in-memory transport).

        A type whose newest class or version in this codec's registry is not the one
        written, data that does not validate or needs a look, go through :meth:`decode`."""
        if self._generation != self.registry.generation:
            self._refresh()
        newest = self._newest_validators.get(sent[0])
        if newest is None or newest[1] != sent[1] or len(raw) > self.max_size:
            return self.decode(raw)
        try:
            data = newest[0].validate_json(raw[at:-1])
        except Exception:
            return self.decode(raw)  # it names the error
        plan = newest[2]
        if plan is not None and _suspect_message(data, plan, False):
            return self.decode(raw)
        # (data,) + sent: one tuple made, where (data, *sent) makes a list first
        return _tuple_new(Envelope, (data,) + sent)  # type: ignore[no-any-return]  # noqa: RUF005

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
        problem = _unencodable(obj, 1, finite=False)
        if problem is not None:
            raise MalformedMessage(f"not JSON that msdata can write back: <root>{problem}")
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
        data = _data(obj)
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
            if chain and (problem := _unencodable(data, 2, finite=False)) is not None:
                raise MessageValidationError(
                    f"{type_name} v{version} {msg_id}: upcast data{problem}"
                )
            # validate as JSON, as the fast path does: the payload came from the wire (NaN and
            # Infinity go through as such, and are looked for below)
            message = cls.model_validate_json(_to_json(data))
        except MessageValidationError:
            raise
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

        # NaN, Infinity, 1e400 in a float or Any field (or an int beyond float range in a
        # float field): as on the fast path, only in what the class kept
        problem = _unencodable(message, 2) if _needs_check(cls) else None
        if problem is not None:
            raise MalformedMessage(f"{type_name} v{version} {msg_id}: data{problem}")
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


def _data(obj: dict[str, Any]) -> Any:
    """The event's data as a JSON value, from ``data`` or ``data_base64``, by the CloudEvents
    JSON format (section 3.1): ``data`` is JSON when ``datacontenttype`` is absent or a JSON
    type; ``data_base64`` is binary, read as UTF-8 JSON only when ``datacontenttype`` says
    JSON (absent, it "MUST NOT" be assumed JSON). msdata payloads are JSON objects."""
    content_type = obj.get("datacontenttype")
    if content_type is not None and not isinstance(content_type, str):
        raise InvalidEnvelope(f"datacontenttype must be a string, got {content_type!r}")
    if "data" in obj:
        if "data_base64" in obj:
            raise InvalidEnvelope("both 'data' and 'data_base64': an event has one or neither")
        if content_type is not None and not _is_json(content_type):
            raise InvalidEnvelope(f"datacontenttype {content_type!r} is not JSON")
        return obj["data"]
    if "data_base64" not in obj:
        raise InvalidEnvelope("no 'data' or 'data_base64' attribute: msdata reads a JSON payload")
    if content_type is None or not _is_json(content_type):
        raise InvalidEnvelope(
            f"data_base64 with datacontenttype {content_type!r}: msdata reads it only when "
            "datacontenttype is a JSON type (CloudEvents JSON format 3.1)"
        )
    charset = _charset(content_type)
    if charset not in (None, "utf-8", "utf8"):
        raise InvalidEnvelope(f"datacontenttype {content_type!r}: JSON is UTF-8 (RFC 8259 §8.1)")
    encoded = obj["data_base64"]
    if not isinstance(encoded, str):
        raise InvalidEnvelope(f"'data_base64' must be a string, got {type(encoded).__name__}")
    try:
        payload = _loads(base64.b64decode(encoded, validate=True).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, TypeError, RecursionError) as e:
        raise InvalidEnvelope(f"'data_base64' is not base64 of UTF-8 JSON: {e}") from e
    problem = _unencodable(payload, 2, finite=False)
    if problem is not None:
        raise MalformedMessage(f"not JSON that msdata can write back: data_base64{problem}")
    return payload


def _charset(content_type: str) -> str | None:
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower()
    return None


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
        if name in RESERVED_ATTRIBUTES or not HEADER_NAME.fullmatch(name):
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


class _Plan(NamedTuple):
    """What to look at in a message of one class after encoding or decoding it."""

    #: fields to walk for non-finite floats, long ints, deep nesting, non-ASCII keys (``()``
    #: none; ``None`` the whole message, when its schema is not the plain model-fields kind)
    walk: tuple[str, ...] | None
    #: fields that hold one float (or None, an int...): compared, not walked
    floats: tuple[str, ...]
    #: a dict field of safe values: pydantic writes a key's lone surrogate as U+FFFD, so an
    #: encoded event holding U+FFFD gets the whole look (on decode the parser refuses them)
    fffd: bool

    @property
    def empty(self) -> bool:
        return self.walk == () and not self.floats and not self.fffd


_NO_PLAN = _Plan((), (), False)
_WHOLE = _Plan(None, (), False)
_INFINITIES = (math.inf, -math.inf)


def _needs_check(cls: type[BaseModel]) -> bool:
    """Whether ``cls`` has a field whose values pydantic may write wrongly without raising:
    a float (NaN as null), a dict (a key's lone surrogate as U+FFFD), ``Any``, a recursive
    type (any depth), a custom serializer (anything). Read from its core schema, once."""
    return not _check_plan(cls).empty


def _check_plan(cls: type[BaseModel]) -> _Plan:
    plan = _PLANS.get(cls)
    if plan is None:
        plan = _PLANS[cls] = _plan(cls)
    return plan


_PLANS: weakref.WeakKeyDictionary[type[BaseModel], _Plan] = weakref.WeakKeyDictionary()
_SAFE_WITH_DICT = _SAFE_SCHEMA_TYPES | {"dict"}
# a field of one float, perhaps None or an int or str instead: no container in it
_SCALAR_FLOAT = (_SAFE_SCHEMA_TYPES | {"float"}) - {
    "model",
    "model-fields",
    "list",
    "tuple",
    "set",
    "frozenset",
}


def _plan(cls: type[BaseModel]) -> _Plan:
    schema: Any = cls.__pydantic_core_schema__
    if _schema_types(schema) <= _SAFE_SCHEMA_TYPES:
        return _NO_PLAN
    if schema.get("type") == "definitions":
        refs = {d.get("ref"): d for d in schema.get("definitions", ())}
        schema = schema.get("schema", {})
        if schema.get("type") == "definition-ref":
            schema = refs.get(schema.get("schema_ref"), {})
    fields = schema.get("schema", {})
    if (
        schema.get("type") != "model"
        or schema.get("cls") is not cls
        or "serialization" in schema
        or schema.get("config", {}).get("extra_fields_behavior") == "allow"
        or fields.get("type") != "model-fields"
    ):
        return _WHOLE
    walk: list[str] = []
    floats: list[str] = []
    fffd = False
    for name, field in fields.get("fields", {}).items():
        types = _schema_types(field)
        if types <= _SAFE_SCHEMA_TYPES:
            continue
        if types <= _SAFE_WITH_DICT:
            fffd = True
        elif types <= _SCALAR_FLOAT:
            floats.append(name)
        else:
            walk.append(name)
    return _Plan(tuple(walk), tuple(floats), fffd)


def _schema_types(schema: Any) -> set[str]:
    """Every core-schema ``type`` named in ``schema`` (serialization schemas included)."""
    types: set[str] = set()
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            kind = node.get("type")
            if isinstance(kind, str):
                types.add(kind)
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return types


def _suspect_message(message: BaseModel, plan: _Plan, keys: bool) -> bool:
    """:func:`_suspect` over the fields ``plan`` names (the whole message for None)."""
    if plan.walk is None:
        return _suspect(message, 2, keys)
    fields = message.__dict__
    for name in plan.floats:
        value = fields[name]
        if value != value or value in _INFINITIES:  # NaN, or an infinity; None passes
            return True
    for name in plan.walk:  # noqa: SIM110 (a loop: any() over a generator costs more here)
        if _suspect(fields[name], 3, keys):
            return True
    return False


def _suspect(value: Any, depth: int, keys: bool) -> bool:
    """A quick look for what pydantic writes wrongly without raising: a non-finite float, a
    long int, nesting deeper than MAX_DEPTH, a non-ASCII dict key (when ``keys``). True sends
    the value to :func:`_unencodable`, which says exactly what is wrong, if anything."""
    t = type(value)
    if t is float:
        return not math.isfinite(value)
    if t is str or t is bool or value is None:
        return False
    if t is int:
        return bool(value.bit_length() >= _INT_LIMIT_BITS)
    if t is list or t is tuple:
        if depth > MAX_DEPTH:
            return True
        for item in value:  # noqa: SIM110
            if _suspect(item, depth + 1, keys):
                return True
        return False
    if t is dict:
        if depth > MAX_DEPTH:
            return True
        for key, item in value.items():
            if keys and not (type(key) is str and key.isascii()):
                return True
            if _suspect(item, depth + 1, keys):
                return True
        return False
    if isinstance(value, BaseModel):
        if depth > MAX_DEPTH:
            return True
        for item in value.__dict__.values():
            if _suspect(item, depth + 1, keys):
                return True
        return bool(value.__pydantic_extra__) and _suspect(value.__pydantic_extra__, depth, keys)
    return _find_unencodable(value, depth, True) is not None  # anything else: the full look


def _show(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


def json_problem(value: Any) -> str | None:
    """Why ``value`` (a model, dict, list, scalar...) has no JSON form that reads back as
    the same value — a NaN or infinity (RFC 8259 §6; a float or a Decimal), a lone
    surrogate, an int beyond Python's int/str limit, nesting deeper than ``MAX_DEPTH`` — as
    ``"path: reason"``; or None. pydantic writes the first two silently as null and U+FFFD."""
    return _unencodable(value, 1)


def _unencodable(value: Any, depth: int, finite: bool = True) -> str | None:
    """Why ``value``, at nesting ``depth`` of a CloudEvent (the envelope object is 1), cannot
    be written as JSON that reads back as the same value (``"path: reason"``), or None.
    ``finite=False`` lets NaN and infinities pass (decode looks for them after validation,
    so that a field the class ignores may hold one, on both decode paths)."""
    found = _find_unencodable(value, depth, finite)
    if found is None:
        return None
    path, reason = found
    path = path if len(path) <= 80 else path[:80] + "..."
    return f"{path}: {reason}"


def _find_unencodable(value: Any, depth: int, finite: bool) -> tuple[str, str] | None:
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "", f"{_show(value)} holds a lone surrogate (not UTF-8)"
        return None
    if isinstance(value, float):
        if not finite or math.isfinite(value):
            return None
        return "", f"{value!r}: not a finite number (JSON has no NaN or Infinity, RFC 8259 §6)"
    if isinstance(value, int):
        if value.bit_length() >= _INT_LIMIT_BITS and abs(value) >= _INT_LIMIT:
            return "", f"an int of more than {MAX_INT_DIGITS} digits (Python's int/str limit)"
        return None
    if isinstance(value, Decimal):  # pydantic writes "NaN", "Infinity"; reads only finite
        if not finite or value.is_finite():
            return None
        return "", f"Decimal({str(value)!r}): not a finite number (JSON has none)"
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple | set | frozenset):
        items = enumerate(value)
    elif isinstance(value, BaseModel):
        items = [*value.__dict__.items(), *(value.__pydantic_extra__ or {}).items()]
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = vars(value).items()
    else:
        return None  # None, bool, datetime, UUID...: pydantic writes them or raises
    if depth > MAX_DEPTH:
        return "", f"nested deeper than {MAX_DEPTH} JSON objects and arrays"
    for key, item in items:
        if isinstance(key, str) and not key.isascii():
            found = _find_unencodable(key, depth, finite)
            if found is not None:
                return f"[{_show(key)}]", f"the key {found[1]}"
        found = _find_unencodable(item, depth + 1, finite)
        if found is not None:
            step = f".{key}" if isinstance(key, str) else f"[{key!r}]"
            return step + found[0], found[1]
    return None


def _bad_attributes(envelope: Envelope[Any]) -> str:
    """The text of the EncodeError for an envelope whose own attributes decode would refuse."""
    where = f"{envelope.type} {envelope.id!r}"
    time = envelope.time
    if not isinstance(time, datetime) or time.tzinfo is None:
        return f"{where}: time must be a timezone-aware datetime, got {time!r}"
    if type(envelope.version) is not int:
        return f"{where}: version must be an int, got {envelope.version!r}"
    for name in ("id", "source"):
        value = getattr(envelope, name)
        if type(value) is not str or not value:
            return f"{where}: {name} must be a non-empty str, got {value!r}"
    return f"{where}: correlation_id, causation_id and partition_key must be str or None"


def _why_unencodable(envelope: Envelope[Any], error: Exception) -> str:
    """The text of the EncodeError for an envelope pydantic could not write."""
    fields: dict[str, Any] = {
        "id": envelope.id,
        "source": envelope.source,
        "correlationid": envelope.correlation_id,
        "causationid": envelope.causation_id,
        "partitionkey": envelope.partition_key,
        "headers": dict(envelope.headers),
    }
    for name, value in fields.items():
        problem = _unencodable(value, 1)
        if problem is not None:
            return f"{envelope.type} {envelope.id!r}: {name}{problem}"
    problem = _unencodable(envelope.message, 2)
    if problem is not None:
        return f"{envelope.type} {envelope.id!r}: data{problem}"
    return f"{envelope.type} {envelope.id!r} cannot be written as JSON: {error}"
