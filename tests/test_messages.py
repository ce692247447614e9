from __future__ import annotations

import contextlib
import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError, field_validator

from msdata import CloudEventsCodec, Event, MessageRegistry, make_envelope
from msdata.errors import (
    DecodeError,
    InvalidEnvelope,
    InvalidHeader,
    MalformedMessage,
    MessageError,
    MessageTooLarge,
    MessageValidationError,
    RegistrationError,
    UnknownMessageType,
    UnknownSchemaVersion,
)
from msdata.ids import new_id, uuid7
from msdata.messages import current_envelope, handling, message_type, upcaster

registry = MessageRegistry()


@message_type("shop.OrderPlaced", version=2, registry=registry)
class OrderPlaced(Event):
    order_id: str
    customer: uuid.UUID
    total_cents: int
    placed_at: datetime
    lines: list[str] = []
    note: str | None = None


@message_type("shop.OrderPlaced", version=1, registry=registry)
class OrderPlacedV1(Event):
    order_id: str
    customer: uuid.UUID
    total: Decimal
    placed_at: datetime


@upcaster("shop.OrderPlaced", from_version=1, registry=registry)
def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    total = Decimal(str(data.pop("total")))
    return {**data, "total_cents": int(total * 100)}


@message_type("shop.Pinged", registry=registry)
class Pinged(Event):
    n: int


codec = CloudEventsCodec(registry)


def order(**kw: Any) -> OrderPlaced:
    base: dict[str, Any] = {
        "order_id": "o-1",
        "customer": uuid.uuid4(),
        "total_cents": 1250,
        "placed_at": datetime(2026, 11, 25, 12, 0, tzinfo=UTC),
    }
    return OrderPlaced(**{**base, **kw})


def test_messages_are_frozen() -> None:
    with pytest.raises(ValidationError):
        order().order_id = "other"  # type: ignore[misc]


def test_ids_are_uuid7_strictly_increasing_and_unique() -> None:
    ids = [new_id() for _ in range(20_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    parsed = uuid.UUID(ids[-1])
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert uuid7().version == 7
    # the first 48 bits are the Unix time in milliseconds
    ms = int(ids[-1].replace("-", "")[:12], 16)
    assert abs(ms / 1000 - datetime.now(UTC).timestamp()) < 60


def test_registry_rejects_a_second_class_under_one_name_and_version() -> None:
    reg = MessageRegistry()

    @message_type("a.B", registry=reg)
    class B(Event):
        pass

    class C(Event):
        pass

    with pytest.raises(RegistrationError):
        reg.register(C, "a.B", 1)
    with pytest.raises(RegistrationError):
        reg.register(C, "not a name!", 1)
    with pytest.raises(RegistrationError):
        reg.register(C, "a.C", 0)
    with pytest.raises(RegistrationError):
        reg.name_of(C)
    reg.register(B, "a.B", 1)  # the same registration again is harmless


def test_encoded_message_is_a_cloudevent_that_another_language_can_read() -> None:
    env = make_envelope(order(), registry=registry, partition_key="o-1", headers={"tenant": "t1"})
    doc = json.loads(codec.encode(env))
    assert doc["specversion"] == "1.0"
    assert doc["id"] == env.id and doc["type"] == "shop.OrderPlaced"
    assert doc["datacontenttype"] == "application/json"
    assert doc["schemaversion"] == 2
    assert doc["partitionkey"] == "o-1" and doc["tenant"] == "t1"
    assert doc["correlationid"] == env.id and "causationid" not in doc
    assert datetime.fromisoformat(doc["time"]).tzinfo is not None
    assert doc["data"]["total_cents"] == 1250


def test_decode_of_encode_gives_back_the_same_envelope() -> None:
    env = make_envelope(order(lines=["a", "b"]), registry=registry, partition_key="k")
    assert codec.decode(codec.encode(env)) == env


def test_older_version_is_upcast_to_the_current_class() -> None:
    old = OrderPlacedV1(
        order_id="o-9",
        customer=uuid.uuid4(),
        total=Decimal("12.34"),
        placed_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    env = codec.decode(codec.encode(make_envelope(old, registry=registry)))
    assert isinstance(env.message, OrderPlaced)
    assert env.message.total_cents == 1234
    assert env.version == 2


def test_causation_and_correlation_follow_the_handled_message() -> None:
    parent = make_envelope(Pinged(n=1), registry=registry)
    assert current_envelope() is None
    with handling(parent):
        assert current_envelope() is parent
        child = make_envelope(Pinged(n=2), registry=registry)
    assert child.causation_id == parent.id
    assert child.correlation_id == parent.correlation_id == parent.id
    with handling(child):
        grandchild = make_envelope(Pinged(n=3), registry=registry)
    assert grandchild.causation_id == child.id
    assert grandchild.correlation_id == parent.id


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"\xff\xfe", MalformedMessage),
        (b"not json", MalformedMessage),
        (b"[1, 2]", MalformedMessage),
        (b'{"hello": "world"}', InvalidEnvelope),
        (
            b'{"specversion": "0.3", "id": "1", "source": "s", "type": "shop.Pinged"}',
            InvalidEnvelope,
        ),
        (
            b'{"specversion":"1.0","id":"1","source":"s","type":"shop.Pinged","time":"now",'
            b'"data":{"n":1}}',
            InvalidEnvelope,
        ),
        (
            b'{"specversion":"1.0","id":"1","source":"s","type":"shop.Pinged",'
            b'"time":"2026-01-01T00:00:00","data":{"n":1}}',
            InvalidEnvelope,
        ),
        (
            b'{"specversion":"1.0","id":"1","source":"s","type":"shop.Pinged",'
            b'"time":"2026-01-01T00:00:00Z","data_base64":"AA=="}',
            InvalidEnvelope,
        ),
        (
            b'{"specversion":"1.0","id":"1","source":"s","type":"shop.Nope",'
            b'"time":"2026-01-01T00:00:00Z","data":{}}',
            UnknownMessageType,
        ),
        (
            b'{"specversion":"1.0","id":"1","source":"s","type":"shop.Pinged","schemaversion":7,'
            b'"time":"2026-01-01T00:00:00Z","data":{"n":1}}',
            UnknownSchemaVersion,
        ),
        (
            b'{"specversion":"1.0","id":"1","source":"s","type":"shop.Pinged",'
            b'"time":"2026-01-01T00:00:00Z","data":{"n":"many"}}',
            MessageValidationError,
        ),
    ],
)
def test_bad_input_raises_its_specific_error(raw: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        codec.decode(raw)


def test_too_large_is_refused_on_both_sides() -> None:
    small = CloudEventsCodec(registry, max_size=300)
    big = make_envelope(order(note="x" * 400), registry=registry)
    with pytest.raises(MessageTooLarge):
        small.encode(big)
    with pytest.raises(MessageTooLarge):
        small.decode(codec.encode(big))


def test_bad_headers_and_keys_from_a_caller_are_refused() -> None:
    with pytest.raises(InvalidHeader):
        make_envelope(Pinged(n=1), registry=registry, headers={"Trace-Id": "x"})
    with pytest.raises(InvalidHeader):
        make_envelope(Pinged(n=1), registry=registry, headers={"id": "x"})
    with pytest.raises(InvalidHeader):
        make_envelope(Pinged(n=1), registry=registry, headers={"n": 1})  # type: ignore[dict-item]
    with pytest.raises(InvalidHeader):
        make_envelope(Pinged(n=1), registry=registry, partition_key=42)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["x\r\ny", "x\ny", "x\x00", "a\ud800"])
async def test_a_header_value_no_transport_carries_is_refused_where_it_is_given(
    value: str,
) -> None:
    """One value rule (msdata.transport.check_header_value, what check_message applies
    before sending) at make_envelope, Outbox.add and EventBus.publish: an event accepted
    there is never refused by a transport for its headers."""
    from msdata.adapters.memory import MemoryOutboxStore, MemoryTransport
    from msdata.events import EventBus
    from msdata.outbox import Outbox
    from msdata.transport import TransportMessage, check_message

    with pytest.raises(InvalidHeader):
        check_message(TransportMessage("m", b"{}", None, {"tenant": value}))
    with pytest.raises(InvalidHeader):
        make_envelope(Pinged(n=1), registry=registry, headers={"tenant": value})
    store = MemoryOutboxStore()
    with pytest.raises(InvalidHeader), store.begin() as tx:
        Outbox(store, registry=registry).add(tx, Pinged(n=1), topic="t", headers={"tenant": value})
    assert (await store.status()).pending == 0
    transport = MemoryTransport()
    bus = EventBus(transport, registry=registry)
    with pytest.raises(InvalidHeader):
        await bus.publish(Pinged(n=1), topic="t", headers={"tenant": value})


texts = st.text(max_size=40)
# no control characters, no lone surrogates (make_envelope refuses both: InvalidHeader)
keys = st.text(st.characters(exclude_categories=["Cc", "Cs"]), max_size=40)
# what a header value may hold (msdata.transport.check_header_value): no CR, LF or NUL,
# no lone surrogate
header_values = st.text(
    st.characters(exclude_characters="\r\n\x00", exclude_categories=["Cs"]), max_size=40
)


@settings(max_examples=200, deadline=None)
@given(
    order_id=texts,
    customer=st.uuids(),
    total=st.integers(min_value=-(2**63), max_value=2**63),
    placed_at=st.datetimes(timezones=st.just(UTC)),
    lines=st.lists(texts, max_size=5),
    note=st.none() | texts,
    key=st.none() | keys,
    headers=st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True), header_values, max_size=3
    ),
)
def test_every_message_survives_encode_and_decode(
    order_id: str,
    customer: uuid.UUID,
    total: int,
    placed_at: datetime,
    lines: list[str],
    note: str | None,
    key: str | None,
    headers: dict[str, str],
) -> None:
    from msdata.messages import RESERVED_ATTRIBUTES

    headers = {k: v for k, v in headers.items() if k not in RESERVED_ATTRIBUTES}
    msg = OrderPlaced(
        order_id=order_id,
        customer=customer,
        total_cents=total,
        placed_at=placed_at,
        lines=lines,
        note=note,
    )
    env = make_envelope(msg, registry=registry, partition_key=key, headers=headers)
    assert codec.decode(codec.encode(env)) == env


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_msdata_errors(raw: bytes) -> None:
    with contextlib.suppress(DecodeError):  # anything else fails the test
        codec.decode(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
cloud_eventish = st.fixed_dictionaries(
    {},
    optional={
        "specversion": st.sampled_from(["1.0", "0.3", 1]) | json_values,
        "id": st.text(max_size=5) | json_values,
        "source": st.text(max_size=5) | json_values,
        "type": st.sampled_from(["shop.Pinged", "shop.OrderPlaced", "x"]) | json_values,
        "time": st.sampled_from(
            ["2026-01-01T00:00:00Z", "2026-01-01T00:00:00z", "2026-01-01", "1700000000", "x"]
        )
        | json_values,
        "schemaversion": st.integers(-1, 3) | json_values,
        "datacontenttype": st.sampled_from(
            ["application/json", "text/plain", "application/json; charset=utf-8"]
        )
        | json_values,
        "data": st.fixed_dictionaries({}, optional={"n": json_values}) | json_values,
        "partitionkey": json_values,
        "correlationid": json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(json_values | cloud_eventish)
def test_arbitrary_json_raises_only_msdata_errors(doc: Any) -> None:
    try:
        env = codec.decode(json.dumps(doc).encode())
    except DecodeError:
        return
    assert isinstance(env.message, Pinged | OrderPlaced)


@settings(max_examples=400, deadline=None)
@given(json_values | cloud_eventish)
def test_fast_decode_agrees_with_the_plain_decoder(doc: Any) -> None:
    raw = json.dumps(doc).encode()
    try:
        plain = codec.decode_plain(raw)
    except DecodeError as e:
        with pytest.raises(type(e)):
            codec.decode(raw)
        return
    assert codec.decode(raw) == plain


def test_headers_cannot_stand_in_for_cloudevents_attributes() -> None:
    env = make_envelope(Pinged(n=1), registry=registry)
    forged = env._replace(headers={"id": "", "specversion": "0.3", "tenant": "t"})
    doc = json.loads(codec.encode(forged))
    assert doc["id"] == env.id and doc["specversion"] == "1.0" and doc["tenant"] == "t"


def test_naive_time_is_refused_on_encode() -> None:
    env = make_envelope(Pinged(n=1), registry=registry)
    with pytest.raises(MessageError):
        codec.encode(env._replace(time=datetime(2026, 1, 1)))


def test_foreign_cloudevents_without_time_or_with_charset_are_read() -> None:
    raw = json.dumps(
        {
            "specversion": "1.0",
            "id": "ext-1",
            "source": "elsewhere",
            "type": "shop.Pinged",
            "datacontenttype": "application/json; charset=utf-8",
            "X-Not-A-Header": "dropped",
            "tenant": "kept",
            "data": {"n": 5},
        }
    ).encode()
    for decode in (codec.decode, codec.decode_plain):
        env = decode(raw)
        assert env.message == Pinged(n=5) and env.time.tzinfo is not None
        assert dict(env.headers) == {"tenant": "kept"}


@message_type("shop.Strict", registry=registry)
class StrictEvent(Event):
    model_config = {"frozen": True, "strict": True}
    at: datetime
    ref: uuid.UUID


def test_strict_models_decode_the_same_on_both_paths() -> None:
    env = make_envelope(
        StrictEvent(at=datetime(2026, 1, 1, tzinfo=UTC), ref=uuid.uuid4()), registry=registry
    )
    raw = codec.encode(env)
    assert codec.decode(raw) == codec.decode_plain(raw) == env


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 200_000,
        rb'{"specversion":"1.0","id":"1","source":"s","type":"shop.Pinged","schemaversion":"\u00b2",'
        b'"time":"2026-01-01T00:00:00Z","data":{"n":1}}',
        b'{"specversion":"1.0","id":"1","source":"s","type":"shop.Pinged","time":0,"data":{"n":1}}',
        b'{"specversion":"1.0","id":"1","source":"s","type":"shop.Pinged","time":"1700000000",'
        b'"data":{"n":1}}',
    ],
)
def test_odd_input_raises_a_decode_error_on_both_paths(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        codec.decode(raw)
    with pytest.raises(DecodeError):
        codec.decode_plain(raw)


def test_codec_sees_types_registered_after_it_was_made() -> None:
    reg = MessageRegistry()
    c = CloudEventsCodec(reg)

    @message_type("late.One", registry=reg)
    class One(Event):
        a: int

    first = make_envelope(One(a=1), registry=reg)
    assert c.decode(c.encode(first)) == first

    @message_type("late.Two", registry=reg)
    class Two(Event):
        b: str

    second = make_envelope(Two(b="x"), registry=reg)
    assert c.decode(c.encode(second)) == second
    assert c.decode(c.encode(first)) == first


@pytest.mark.parametrize("key", ["k\nz", "k\x00", "tab\there", "del\x7f", "c1\x85"])
def test_a_partition_key_with_a_control_character_is_refused(key: str) -> None:
    registry = MessageRegistry()

    @message_type("keys.Ev", registry=registry)
    class Ev(Event):
        x: int

    with pytest.raises(InvalidHeader, match="control character"):
        make_envelope(Ev(x=1), partition_key=key, registry=registry)
    assert make_envelope(Ev(x=1), partition_key="k-ü 1", registry=registry).partition_key


def test_an_upcaster_needs_a_newer_registered_version() -> None:
    registry = MessageRegistry()
    with pytest.raises(RegistrationError, match="no class is registered"):
        upcaster("up.Ev", from_version=1, registry=registry)(lambda d: d)

    @message_type("up.Ev", version=2, registry=registry)
    class Ev(Event):
        x: int

    for bad in (2, 3, 0):
        with pytest.raises(RegistrationError, match=r"from_version must be 1\.\.1"):
            upcaster("up.Ev", from_version=bad, registry=registry)(lambda d: d)
    upcaster("up.Ev", from_version=1, registry=registry)(lambda d: d)


@settings(max_examples=200, deadline=None)
@given(
    order_id=texts,
    lines=st.lists(texts, max_size=3),
    key=st.none() | keys,
    headers=st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True), header_values, max_size=2
    ),
    correlation=st.none() | keys.filter(bool),
    parent=st.booleans(),
    no_correlation=st.booleans(),
    offset=st.none() | st.integers(min_value=-86399, max_value=86399),
)
def test_encode_writes_the_bytes_pydantic_core_writes_for_the_whole_cloudevent(
    order_id: str,
    lines: list[str],
    key: str | None,
    headers: dict[str, str],
    correlation: str | None,
    parent: bool,
    no_correlation: bool,
    offset: int | None,
) -> None:
    """encode writes the attributes as text around the data's own serializer: byte for
    byte what pydantic-core writes for the whole CloudEvent (the reference path), and the
    data at the offset it gives; what decode_sent makes of it is what decode makes."""
    from datetime import timedelta, timezone

    from msdata.messages import RESERVED_ATTRIBUTES

    headers = {k: v for k, v in headers.items() if k not in RESERVED_ATTRIBUTES}
    msg = order(order_id=order_id, lines=lines)
    cause = make_envelope(Pinged(n=1), registry=registry) if parent else None
    with handling(cause) if cause is not None else contextlib.nullcontext():
        env = make_envelope(
            msg, registry=registry, partition_key=key, headers=headers, correlation_id=correlation
        )
    if offset is not None:
        env = env._replace(time=env.time.astimezone(timezone(timedelta(seconds=offset))))
    if no_correlation:  # built by hand: decode reads it back as None
        env = env._replace(correlation_id=None)
    raw, at = codec.encode_at(env)
    assert raw == codec._encode_whole(codec._encoders[OrderPlaced][0], env)
    assert raw[at:-1] == OrderPlaced.__pydantic_serializer__.to_json(msg)
    if not headers and offset is None:
        assert codec.decode_sent(raw, env[1:], at) == codec.decode(raw) == env


def test_decode_sent_reads_what_this_codec_would_read() -> None:
    """decode_sent trusts the attributes it is given, never the class: a version older than
    the newest is upcast, and a consumer whose class refuses the data names why."""
    old = OrderPlacedV1(
        order_id="o-1", customer=uuid.uuid4(), total=Decimal("12.5"), placed_at=datetime.now(UTC)
    )
    env = make_envelope(old, registry=registry)
    raw, at = codec.encode_at(env)
    upcast = codec.decode_sent(raw, env[1:], at)
    assert type(upcast.message) is OrderPlaced and upcast.message.total_cents == 1250
    assert upcast.version == 2

    strict = MessageRegistry()

    @message_type("shop.Pinged", registry=strict)
    class NegativePing(Event):
        n: int

        @field_validator("n")
        @classmethod
        def negative(cls, n: int) -> int:
            if n >= 0:
                raise ValueError("n must be negative")
            return n

    env = make_envelope(Pinged(n=1), registry=registry)
    raw, at = codec.encode_at(env)
    with pytest.raises(MessageValidationError, match="n must be negative"):
        CloudEventsCodec(strict).decode_sent(raw, env[1:], at)
    with pytest.raises(MessageTooLarge):
        CloudEventsCodec(registry, max_size=len(raw) - 1).decode_sent(raw, env[1:], at)
