"""Every name check matches the whole string: ``name\\n`` is refused everywhere (a ``$``
anchor matches before a final newline), and names a broker reserves are refused."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from msdata import Event, MessageRegistry, make_envelope
from msdata.adapters.postgres._db import check_schema
from msdata.errors import ConfigurationError, InvalidHeader, MsdataError, RegistrationError
from msdata.messages import check_headers
from msdata.serialization import CloudEventsCodec
from msdata.storage import check_table_prefix
from msdata.transport import check_name


def _register(name: str) -> None:
    class E(Event):
        pass

    MessageRegistry().register(E, name)


def _nats(**options: Any) -> None:
    pytest.importorskip("nats")
    from msdata.adapters.nats import NatsTransport

    NatsTransport(None, **options)


CHECKS: dict[str, tuple[Callable[[str], object], str, type[MsdataError]]] = {
    "topic": (lambda n: check_name("topic", n), "orders", ConfigurationError),
    "dlq topic": (lambda n: check_name("topic", n), "orders.g.dlq", ConfigurationError),
    "group": (lambda n: check_name("group", n), "billing", ConfigurationError),
    "header name": (lambda n: check_headers({n: "v"}), "tenant", InvalidHeader),
    "message type name": (_register, "shop.Thing", RegistrationError),
    "table prefix": (check_table_prefix, "msdata_", ConfigurationError),
    "postgres schema": (check_schema, "app", ConfigurationError),
    "nats stream prefix": (lambda n: _nats(stream_prefix=n), "APP_", ConfigurationError),
    "nats subject prefix": (lambda n: _nats(subject_prefix=n), "app.", ConfigurationError),
}


@pytest.mark.parametrize("kind", sorted(CHECKS))
def test_a_trailing_newline_is_refused(kind: str) -> None:
    check, good, error = CHECKS[kind]
    check(good)  # the same name without the newline passes
    with pytest.raises(error):
        check(good + "\n")


_NON_ASCII = {
    "topic": "Café",
    "dlq topic": "Café.g.dlq",
    "group": "gé",
    "header name": "tenanté",
    "message type name": "rv2.Café",
    "table prefix": "msdata_é",
    "postgres schema": "appé",
    "nats stream prefix": "APPÉ_",
}


@pytest.mark.parametrize("kind", sorted(_NON_ASCII))
def test_a_letter_that_is_not_ascii_is_refused_saying_ascii(kind: str) -> None:
    """The checks take ASCII letters only, and their messages say so (they said "letters",
    so 'rv2.Café' seemed to qualify)."""
    check, _, error = CHECKS[kind]
    with pytest.raises(error, match="ASCII letters"):
        check(_NON_ASCII[kind])


def test_a_namespace_and_a_saga_name_that_are_not_ascii_are_refused_saying_ascii() -> None:
    from pydantic import BaseModel

    from msdata.errors import SagaDefinitionError
    from msdata.saga import Saga

    with pytest.raises(ConfigurationError, match="ASCII letters"):
        check_name("namespace", "shopé")

    class Data(BaseModel):
        n: int = 0

    with pytest.raises(SagaDefinitionError, match="ASCII letters"):
        Saga("checkouté", Data)


def test_a_header_name_with_a_newline_from_the_wire_is_not_a_header() -> None:
    registry = MessageRegistry()

    class E(Event):
        pass

    registry.register(E, "t.E")
    codec = CloudEventsCodec(registry)
    raw = codec.encode(make_envelope(E(), registry=registry, headers={"tenant": "a"}))
    raw = raw.replace(b'"tenant"', b'"tenant\\n"')
    assert dict(codec.decode(raw).headers) == {}
    assert dict(codec.decode_plain(raw).headers) == {}


@pytest.mark.parametrize("name", ["amq.orders", "amq.direct", "amq.x.g.dlq"])
def test_names_rabbitmq_reserves_are_refused(name: str) -> None:
    with pytest.raises(ConfigurationError, match="reserved"):
        check_name("topic", name)
    check_name("topic", "amqp.orders")  # only the exact amq. prefix is reserved


def test_a_long_refused_name_is_cut_in_the_error() -> None:
    name = "x" * 300 + "!"
    with pytest.raises(ConfigurationError) as caught:
        check_name("topic", name)
    text = str(caught.value)
    assert "301 characters" in text and len(text) < 250 and name not in text
