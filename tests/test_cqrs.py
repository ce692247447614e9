from __future__ import annotations

from typing import Any

import pytest

from msdata import Command, Event, MessageRegistry, Query
from msdata.cqrs import CommandBus, QueryBus
from msdata.errors import HandlerAlreadyRegistered, NoHandlerRegistered
from msdata.messages import Envelope, current_envelope, make_envelope, message_type
from msdata.middleware import Next

registry = MessageRegistry()


@message_type("test.PlaceOrder", registry=registry)
class PlaceOrder(Command):
    sku: str
    qty: int


class CancelOrder(Command):  # not registered for the wire: in-process use still works
    order_id: str


class OrderView(Query[dict[str, Any]]):
    order_id: str


@message_type("test.OrderPlaced", registry=registry)
class OrderPlaced(Event):
    order_id: str


async def test_command_reaches_its_one_handler_and_returns_its_result() -> None:
    bus = CommandBus(registry=registry)

    @bus.handler(PlaceOrder)
    async def place(cmd: PlaceOrder) -> str:
        return f"{cmd.sku}x{cmd.qty}"

    bus.register(CancelOrder, lambda cmd: f"cancelled {cmd.order_id}")  # sync handler
    assert await bus.send(PlaceOrder(sku="apple", qty=3)) == "applex3"
    assert await bus.send(CancelOrder(order_id="o1")) == "cancelled o1"


async def test_a_second_handler_and_a_missing_handler_are_errors() -> None:
    bus = CommandBus(registry=registry)
    bus.register(PlaceOrder, lambda c: None)
    with pytest.raises(HandlerAlreadyRegistered):
        bus.register(PlaceOrder, lambda c: None)
    with pytest.raises(NoHandlerRegistered):
        await bus.send(CancelOrder(order_id="x"))
    with pytest.raises(TypeError):
        await bus.send("not a command")  # type: ignore[arg-type]


async def test_the_handlers_exception_reaches_the_caller_unchanged() -> None:
    bus = CommandBus(registry=registry)

    class OutOfStock(Exception):
        pass

    @bus.handler(PlaceOrder)
    async def place(cmd: PlaceOrder) -> None:
        raise OutOfStock(cmd.sku)

    with pytest.raises(OutOfStock, match="pear"):
        await bus.send(PlaceOrder(sku="pear", qty=1))


async def test_query_returns_the_typed_result() -> None:
    queries = QueryBus(registry=registry)

    @queries.handler(OrderView)
    def view(q: OrderView) -> dict[str, Any]:
        return {"id": q.order_id, "status": "placed"}

    result: dict[str, Any] = await queries.ask(OrderView(order_id="o7"))
    assert result == {"id": "o7", "status": "placed"}
    with pytest.raises(HandlerAlreadyRegistered):
        queries.register(OrderView, view)


@pytest.mark.parametrize("with_middleware", [False, True])
async def test_events_made_in_a_command_handler_are_caused_by_the_command(
    with_middleware: bool,
) -> None:
    seen: list[Envelope[Any]] = []

    async def spy(env: Envelope[Any], call_next: Next) -> Any:
        seen.append(env)
        return await call_next(env)

    bus = CommandBus(registry=registry, middleware=[spy] if with_middleware else [])

    @bus.handler(PlaceOrder)
    async def place(cmd: PlaceOrder) -> Envelope[Any]:
        parent = current_envelope()
        assert parent is not None and parent.message is cmd
        return make_envelope(OrderPlaced(order_id="o1"), registry=registry)

    cmd = PlaceOrder(sku="a", qty=1)
    event_env = await bus.send(cmd)
    parent_id = event_env.causation_id
    assert parent_id is not None and event_env.correlation_id == parent_id
    if with_middleware:
        assert seen[0].id == parent_id and seen[0].message is cmd
    assert current_envelope() is None


async def test_middleware_order_bus_then_handler() -> None:
    trail: list[str] = []

    def tag(name: str) -> Any:
        async def mw(env: Envelope[Any], call_next: Next) -> Any:
            trail.append(name)
            return await call_next(env)

        return mw

    bus = CommandBus(registry=registry, middleware=[tag("outer")])
    bus.register(PlaceOrder, lambda c: trail.append("handler"), middleware=[tag("inner")])
    await bus.send(PlaceOrder(sku="a", qty=1))
    assert trail == ["outer", "inner", "handler"]


async def test_in_process_commands_stay_out_of_the_wire_registry() -> None:
    from msdata import default_registry

    async def build_and_send() -> int:
        class Local(Command):  # defined anew on every call, like in a factory or fixture
            n: int

        bus = CommandBus()
        bus.register(Local, lambda c: c.n * 2)
        assert not default_registry.is_registered(Local)
        result: int = await bus.send(Local(n=21))
        return result

    assert await build_and_send() == 42
    assert await build_and_send() == 42


async def test_async_callable_objects_are_awaited() -> None:
    class Handler:
        async def __call__(self, cmd: PlaceOrder) -> str:
            return cmd.sku

    bus = CommandBus(registry=registry)
    bus.register(PlaceOrder, Handler())
    assert await bus.send(PlaceOrder(sku="pen", qty=1)) == "pen"
