"""The codec in both directions: encode raises only msdata errors, and whatever decode
accepts, encode writes back (and decode reads it back as the same envelope)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msdata import CloudEventsCodec, Event, MessageRegistry, make_envelope
from msdata.errors import DecodeError, EncodeError, InvalidHeader, MalformedMessage
from msdata.messages import message_type
from msdata.serialization import MAX_DEPTH, MAX_INT_DIGITS

registry = MessageRegistry()


@message_type("edge.Loose", registry=registry)
class Loose(Event):
    """Every field that can hold what JSON cannot carry faithfully."""

    x: float = 0.0
    a: Any = None
    d: dict[str, Any] = {}
    s: str = ""
    n: int = 0


@message_type("edge.Plain", registry=registry)
class Plain(Event):
    """Only fields pydantic writes faithfully or refuses: no check after encoding."""

    s: str = ""
    n: int = 0
    tags: list[str] = []


@message_type("edge.Labels", registry=registry)
class Labels(Event):
    """A dict of strings: checked by one search of the encoded bytes, not a walk."""

    labels: dict[str, str] = {}


codec = CloudEventsCodec(registry)


def _nest(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


BAD_ENVELOPES: dict[str, dict[str, Any]] = {
    "lone surrogate in a field": {"message": Plain(s="a\ud800")},
    "lone surrogate in an Any field": {"message": Loose(a=["\udc00"])},
    "lone surrogate in a dict key": {"message": Loose(d={"\ud800": 1})},
    "lone surrogate in a dict[str, str] key": {"message": Labels(labels={"a\udc00": "v"})},
    "lone surrogate in the partition key": {"raw_key": "k\ud800"},
    # (make_envelope refuses it: an envelope built another way still meets encode's check)
    "lone surrogate in a header": {"raw_headers": {"tenant": "\udfff"}},
    "lone surrogate in the source": {"source": "svc\ud800"},
    "NaN in a float field": {"message": Loose(x=math.nan)},
    "Infinity in a float field": {"message": Loose(x=math.inf)},
    "-Infinity in an Any field": {"message": Loose(a=-math.inf)},
    "NaN inside a dict[str, Any]": {"message": Loose(d={"k": [math.nan]})},
    "an int of 4301 digits": {"message": Plain(n=10**MAX_INT_DIGITS)},
    "an int of 4301 digits in Any": {"message": Loose(a={"v": -(10**MAX_INT_DIGITS)})},
    "nesting deeper than the limit": {"message": Loose(a=_nest(MAX_DEPTH - 1))},
    "a non-JSON value in an Any field": {"message": Loose(a=object())},
    "bytes that are not UTF-8 in an Any field": {"message": Loose(a=b"\xff")},
}


@pytest.mark.parametrize("case", sorted(BAD_ENVELOPES))
def test_encode_raises_only_encode_error(case: str) -> None:
    kw = dict(BAD_ENVELOPES[case])
    message = kw.pop("message", Plain())
    raw_headers = kw.pop("raw_headers", None)
    raw_key = kw.pop("raw_key", None)
    env = make_envelope(message, registry=registry, **kw)
    if raw_headers is not None:
        env = env._replace(headers=raw_headers)
    if raw_key is not None:
        env = env._replace(partition_key=raw_key)
    with pytest.raises(EncodeError) as info:
        codec.encode(env)
    text = str(info.value)
    text.encode("utf-8")  # the reason itself is always encodable
    assert env.id in text


def test_the_largest_int_and_the_deepest_nesting_decode_can_read_are_written() -> None:
    for message in (
        Plain(n=10**MAX_INT_DIGITS - 1),
        Loose(a=-(10**MAX_INT_DIGITS - 1)),
        Loose(a=_nest(MAX_DEPTH - 2)),  # the envelope and the data object are two levels
        Loose(d={"k": _nest(MAX_DEPTH - 3)}),
        Labels(labels={"\ufffd": "\ufffd", "é": "ü"}),  # a real U+FFFD is fine
    ):
        env = make_envelope(message, registry=registry)
        assert codec.decode(codec.encode(env)) == env
        assert codec.decode_plain(codec.encode(env)) == env


def _event(data: str, extra: str = "", ident: str = '"e-1"') -> bytes:
    head = '{"specversion":"1.0","id":' + ident + ',"source":"s","type":"edge.Loose",'
    return (head + '"time":"2026-01-01T00:00:00+00:00"' + extra + ',"data":' + data + "}").encode()


@pytest.mark.parametrize(
    "raw",
    [
        _event('{"x":NaN}'),
        _event('{"x":Infinity}'),
        _event('{"x":-Infinity}'),
        _event('{"x":1e400}'),
        _event('{"a":NaN}'),
        _event('{"a":[1e999]}'),
        _event('{"d":{"k":-Infinity}}'),
        _event('{"a":' + "1" * (MAX_INT_DIGITS + 1) + "}"),
        _event('{"s":"\\ud800"}'),
        _event('{"d":{"\\udc00":1}}'),
        _event("{}", ident='"\\ud800"'),
        _event("{}", extra=',"partitionkey":"\\ud800x"'),
        _event("{}", extra=',"correlationid":"\\udfff"'),
        _event("{}", extra=',"tenant":"\\ud83d"'),
        # the envelope, data and MAX_DEPTH - 1 arrays: one level too deep
        _event('{"a":' + "[" * (MAX_DEPTH - 1) + "1" + "]" * (MAX_DEPTH - 1) + "}"),
    ],
)
def test_decode_refuses_what_encode_could_not_write(raw: bytes) -> None:
    for decode in (codec.decode, codec.decode_plain):
        with pytest.raises(MalformedMessage):
            decode(raw)


def test_a_valid_surrogate_pair_is_read_and_written_back() -> None:
    env = codec.decode(_event('{"s":"\\ud83d\\ude00"}', extra=',"tenant":"\\ud83d\\ude00"'))
    assert env.message.s == "\U0001f600" and env.headers["tenant"] == "\U0001f600"
    assert codec.decode(codec.encode(env)) == env


# -- whatever decode accepts, encode writes back -----------------------------------------------

# lone surrogates, valid pairs, controls, quotes: json.dumps escapes the surrogates as \udXXX
texts = st.text(
    st.characters(codec="utf-8") | st.sampled_from(["\ud800", "\udc00", "\U0001f600", "\x00"]),
    max_size=8,
)
# partition keys refuse control characters
keys = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cc"])
    | st.sampled_from(["\ud800", "\udc00", "\U0001f600"]),
    max_size=8,
)
numbers = (
    st.integers()
    | st.sampled_from([10**MAX_INT_DIGITS - 1, -(10**MAX_INT_DIGITS - 1), 2**64])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([1e308, -0.0, 5e-324])
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | texts,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=12,
)


def _deep(depth: int) -> Any:
    return _nest(depth)


data_objects = st.fixed_dictionaries(
    {},
    optional={
        "x": numbers | texts,
        "a": json_values | st.integers(MAX_DEPTH - 5, MAX_DEPTH).map(_deep),
        "d": st.dictionaries(texts, json_values, max_size=3),
        "s": texts,
        "n": numbers,
        "tags": st.lists(texts, max_size=3),
        "labels": st.dictionaries(texts, texts, max_size=3),
    },
)
events = st.fixed_dictionaries(
    {
        "specversion": st.just("1.0"),
        "id": texts,
        "source": texts,
        "type": st.sampled_from(["edge.Loose", "edge.Plain", "edge.Labels"]),
        "data": data_objects,
        # always given: without it decode stamps the time of decoding
        "time": st.sampled_from(["2026-01-01T00:00:00+00:00", "2026-06-01T12:30:00.5-07:00"]),
    },
    optional={
        "datacontenttype": st.just("application/json"),
        "partitionkey": texts,
        "correlationid": texts,
        "causationid": texts,
        "tenant": texts | numbers | st.booleans(),
        "traceparent": texts,
    },
)


@settings(max_examples=500, deadline=None)
@given(events)
def test_whatever_decode_accepts_encode_writes_back(doc: dict[str, Any]) -> None:
    raw = json.dumps(doc).encode()  # NaN / Infinity / surrogate escapes, as a foreign writer
    try:
        env = codec.decode(raw)
    except DecodeError:
        with pytest.raises(DecodeError):
            codec.decode_plain(raw)
        return
    assert codec.decode_plain(raw) == env
    again = codec.encode(env)  # raises nothing: decode accepted it
    assert codec.decode(again) == env
    assert codec.decode_plain(again) == env


@settings(max_examples=300, deadline=None)
@given(
    x=numbers,
    a=json_values,
    d=st.dictionaries(texts, json_values, max_size=3),
    s=texts,
    key=st.none() | keys,
    tenant=texts,
)
def test_whatever_encode_writes_decode_reads(
    x: Any, a: Any, d: dict[str, Any], s: str, key: str | None, tenant: str
) -> None:
    try:
        message = Loose(x=x if isinstance(x, float) else 0.0, a=a, d=d, s=s)
        env = make_envelope(message, registry=registry, partition_key=key, headers={"t": tenant})
        raw = codec.encode(env)
    except (EncodeError, InvalidHeader):  # a header value no transport carries: refused
        return
    assert codec.decode(raw) == env


@pytest.mark.parametrize(
    "change",
    [
        {"id": ""},
        {"source": ""},
        {"id": 5},
        {"partition_key": 5},
        {"correlation_id": 3},
        {"time": "2026-01-01T00:00:00+00:00"},
        {"time": datetime(2026, 1, 1)},  # naive
        {"version": "1"},
    ],
    ids=str,
)
def test_a_hand_built_envelope_decode_could_not_read_is_refused(change: dict[str, Any]) -> None:
    env = make_envelope(Plain(), registry=registry)._replace(**change)
    with pytest.raises(EncodeError):
        codec.encode(env)


# offsets the way Python allows them: whole hours, minutes, and seconds (RFC 3339 has no
# seconds; isoformat() writes them and fromisoformat() reads them back)
offsets = st.integers(min_value=-86_399, max_value=86_399).map(
    lambda s: timezone(timedelta(seconds=s))
)


@settings(max_examples=300, deadline=None)
@given(
    when=st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=offsets | st.just(UTC),
    )
)
def test_any_aware_time_is_written_and_read_back_with_its_offset(when: datetime) -> None:
    """encode writes a UTC time through pydantic-core (``...Z``) and any other offset by
    isoformat(): both paths read back the same instant and the same offset."""
    env = make_envelope(Plain(), registry=registry)._replace(time=when)
    raw = codec.encode(env)
    written = json.loads(raw)["time"]
    if when.tzinfo is UTC:
        assert written.endswith("Z")
    for decode in (codec.decode, codec.decode_plain):
        got = decode(raw)
        assert got == env and got.time.utcoffset() == when.utcoffset()
