"""Interoperability with the official CloudEvents Python SDK (``cloudevents`` on PyPI), both
ways: the SDK reads msdata's events, and msdata reads the SDK's, with JSON ``data`` and with
``data_base64``, including an extension attribute of each CloudEvents type."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime

import pytest
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from msdata import CloudEventsCodec, Event, MessageRegistry, make_envelope
from msdata.errors import InvalidEnvelope
from msdata.messages import message_type

registry = MessageRegistry()


@message_type("interop.OrderPlaced", version=2, registry=registry)
class OrderPlaced(Event):
    order_id: str
    customer: uuid.UUID
    total_cents: int
    lines: list[str] = []


codec = CloudEventsCodec(registry)
fmt = JSONFormat()
CUSTOMER = uuid.UUID("0193a3b2-2c4e-7d11-9a2b-5f0e8c1d2e3f")
PAYLOAD = {"order_id": "o-42", "customer": str(CUSTOMER), "total_cents": 1250, "lines": ["a"]}
SEEN = datetime(2026, 11, 25, 17, 49, 7, 123456, tzinfo=UTC)
# one extension attribute of each CloudEvents type, as the SDK carries them
EXTENSIONS = {
    "tenant": "acme",  # String
    "priority": 5,  # Integer
    "urgent": True,  # Boolean
    "signature": base64.b64encode(b"\x00\xffsig").decode(),  # Binary (base64 in JSON)
    "origin": "https://shop.example.com/orders",  # URI
    "ref": "../orders/o-42#line-1",  # URI-reference
    "seen": SEEN,  # Timestamp
}
# what msdata's headers hold: strings; integers and booleans as JSON text
HEADERS = {
    "tenant": "acme",
    "priority": "5",
    "urgent": "true",
    "signature": EXTENSIONS["signature"],
    "origin": "https://shop.example.com/orders",
    "ref": "../orders/o-42#line-1",
    "seen": "2026-11-25T17:49:07.123456Z",
}


def sdk_event(data: dict[str, object] | bytes, **attributes: object) -> bytes:
    attrs: dict[str, object] = {
        "id": "sdk-1",
        "source": "https://other-service.example.com",
        "type": "interop.OrderPlaced",
        "time": datetime(2026, 11, 25, 12, 0, tzinfo=UTC),
        "schemaversion": 2,
        **EXTENSIONS,
        **attributes,
    }
    return fmt.write(CloudEvent(attrs, data))


def check_read(raw: bytes) -> None:
    for decode in (codec.decode, codec.decode_plain):
        env = decode(raw)
        assert env.message == OrderPlaced(
            order_id="o-42", customer=CUSTOMER, total_cents=1250, lines=["a"]
        )
        assert env.id == "sdk-1" and env.source == "https://other-service.example.com"
        assert env.time == datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
        assert dict(env.headers) == HEADERS
        assert codec.decode(codec.encode(env)) == env  # and msdata writes it back


def test_msdata_reads_the_sdks_event_with_json_data() -> None:
    raw = sdk_event(PAYLOAD, datacontenttype="application/json")
    assert b'"data":' in raw
    check_read(raw)
    check_read(sdk_event(PAYLOAD))  # no datacontenttype: data is JSON


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "application/vnd.shop+json"],
)
def test_msdata_reads_the_sdks_event_with_data_base64(content_type: str) -> None:
    raw = sdk_event(json.dumps(PAYLOAD).encode(), datacontenttype=content_type)
    assert b'"data_base64":' in raw and b'"data":' not in raw
    check_read(raw)


@pytest.mark.parametrize(
    ("attributes", "why"),
    [
        ({}, "data_base64 with datacontenttype None"),  # the spec: do not assume JSON
        ({"datacontenttype": "application/octet-stream"}, "is a JSON type"),
        ({"datacontenttype": "application/json; charset=utf-16"}, "JSON is UTF-8"),
    ],
)
def test_data_base64_that_is_not_json_is_refused_with_the_reason(
    attributes: dict[str, str], why: str
) -> None:
    raw = sdk_event(json.dumps(PAYLOAD).encode(), **attributes)
    for decode in (codec.decode, codec.decode_plain):
        with pytest.raises(InvalidEnvelope, match=why):
            decode(raw)


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        ({"data_base64": "not base64!"}, "not base64"),
        ({"data_base64": base64.b64encode(b"\xff\xfe").decode()}, "not base64 of UTF-8 JSON"),
        ({"data_base64": base64.b64encode(b"[1]").decode()}, "must be a JSON object"),
        ({"data_base64": 12}, "must be a string"),
        ({"data_base64": "e30=", "data": PAYLOAD}, "both"),
    ],
)
def test_bad_data_base64_is_refused_with_the_reason(doc: dict[str, object], why: str) -> None:
    event = {
        "specversion": "1.0",
        "id": "x",
        "source": "s",
        "type": "interop.OrderPlaced",
        "schemaversion": 2,
        "datacontenttype": "application/json",
        **doc,
    }
    with pytest.raises(InvalidEnvelope, match=why):
        codec.decode(json.dumps(event).encode())


def test_the_sdk_reads_msdatas_events() -> None:
    message = OrderPlaced(order_id="o-42", customer=CUSTOMER, total_cents=1250, lines=["a"])
    env = make_envelope(
        message, registry=registry, partition_key="o-42", headers=HEADERS, source="orders"
    )
    event = fmt.read(None, codec.encode(env))
    assert event.get_specversion() == "1.0"
    assert event.get_id() == env.id and event.get_source() == "orders"
    assert event.get_type() == "interop.OrderPlaced"
    assert event.get_time() == env.time
    assert event.get_datacontenttype() == "application/json"
    assert event.get_data() == PAYLOAD
    assert event.get_extension("schemaversion") == 2
    assert event.get_extension("partitionkey") == "o-42"
    assert event.get_extension("correlationid") == env.correlation_id
    for name, value in HEADERS.items():
        assert event.get_extension(name) == value
    # what the SDK writes back from it, msdata reads as the same envelope
    assert codec.decode(fmt.write(event)) == env
