"""One check, one message, for every entry point that takes a message."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from pydantic import BaseModel

from msdata import Command, CommandBus, Event, EventBus, MessageRegistry, Query, QueryBus
from msdata.adapters.memory import MemoryEventStore, MemoryOutboxStore, MemoryTransport
from msdata.errors import NotAMessage, RegistrationError
from msdata.eventstore import EventLog
from msdata.messages import make_envelope, message_type
from msdata.outbox import Outbox

registry = MessageRegistry()


@message_type("checks.Registered", registry=registry)
class Registered(Event):
    n: int = 1


class Unregistered(Event):
    n: int = 1


class Plain(BaseModel):
    n: int = 1


@dataclasses.dataclass
class DC:
    n: int = 1


class Cmd(Command):
    pass


class Qry(Query[int]):
    pass


async def _outbox_add(message: Any) -> None:
    store = MemoryOutboxStore()
    tx = store.begin()
    try:
        Outbox(store, registry=registry).add(tx, message)
    finally:
        tx.rollback()


async def _outbox_add_list(message: Any) -> None:
    store = MemoryOutboxStore()
    tx = store.begin()
    try:
        Outbox(store, registry=registry).add(tx, [Registered(), message])
    finally:
        tx.rollback()
    assert (await store.status()).pending == 0


async def _event_log_append(message: Any) -> None:
    store = MemoryEventStore()
    tx = store.begin()
    try:
        EventLog(store, registry=registry).append(tx, "order-1", 0, message)
    finally:
        tx.rollback()


async def _publish(message: Any) -> None:
    await EventBus(MemoryTransport(), registry=registry).publish(message)


async def _publish_many(message: Any) -> None:
    await EventBus(MemoryTransport(), registry=registry).publish_many([message])


async def _make_envelope(message: Any) -> None:
    make_envelope(message, registry=registry)


async def _send(message: Any) -> None:
    bus = CommandBus(registry=registry)
    bus.register(Cmd, lambda c: None)
    await bus.send(message)


async def _ask(message: Any) -> None:
    bus = QueryBus(registry=registry)
    bus.register(Qry, lambda q: 1)
    await bus.ask(message)


ENTRY_POINTS: dict[str, Callable[[Any], Awaitable[None]]] = {
    "Outbox.add": _outbox_add,
    "Outbox.add([...])": _outbox_add_list,
    "EventLog.append": _event_log_append,
    "EventBus.publish": _publish,
    "EventBus.publish_many": _publish_many,
    "make_envelope": _make_envelope,
    "CommandBus.send": _send,
    "QueryBus.ask": _ask,
}

NOT_MESSAGES: dict[str, Any] = {
    "dict": {"n": 1},
    "pydantic model": Plain(),
    "dataclass": DC(),
    "None": None,
    "str": "checks.Registered",
    "the class": Registered,
    "int": 42,
}


async def _error(entry: str, message: Any) -> RegistrationError:
    with pytest.raises(RegistrationError) as info:
        await ENTRY_POINTS[entry](message)
    return info.value


@pytest.mark.parametrize("what", sorted(NOT_MESSAGES))
async def test_every_entry_point_says_the_same_clear_thing(what: str) -> None:
    texts = set()
    for entry in ENTRY_POINTS:
        error = await _error(entry, NOT_MESSAGES[what])
        assert isinstance(error, NotAMessage) and isinstance(error, TypeError), entry
        texts.add(str(error))
    assert len(texts) == 1, texts
    (text,) = texts
    assert text.startswith("expected a message: an instance of an Event, Command or Query")
    assert {
        "dict": "builtins.dict",
        "pydantic model": "Plain",
        "dataclass": "DC",
        "None": "got None",
        "str": "builtins.str",
        "the class": "pass an instance",
        "int": "builtins.int",
    }[what] in text


async def test_an_unregistered_message_is_named_with_the_fix() -> None:
    for entry in (
        "EventLog.append",
        "Outbox.add",
        "Outbox.add([...])",
        "EventBus.publish",
        "EventBus.publish_many",
        "make_envelope",
    ):
        error = await _error(entry, Unregistered())
        assert not isinstance(error, NotAMessage)
        assert "Unregistered is not registered; decorate it with @message_type" in str(error)
