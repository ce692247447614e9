"""Command and query buses: one handler per message type, its result or error to the caller.

::

    commands = CommandBus()

    @commands.handler(PlaceOrder)
    async def place_order(cmd: PlaceOrder) -> str:
        ...
        return order_id

    order_id = await commands.send(PlaceOrder(...))

Handlers may be sync or async. While a handler runs, the command (or query) is the message
being handled, so whatever it publishes or sends carries causation id = its id and its
correlation id (see :func:`msdata.messages.handling`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar, cast

from msdata import telemetry
from msdata.errors import ConfigurationError, HandlerAlreadyRegistered, NoHandlerRegistered
from msdata.messages import (
    Command,
    Envelope,
    LocalParent,
    Message,
    MessageRegistry,
    Query,
    build_envelope,
    check_message,
    current_envelope,
    current_parent,
    default_registry,
    handling,
)
from msdata.middleware import Middleware, Next, as_async, compose

__all__ = ["CommandBus", "QueryBus"]

M = TypeVar("M", bound=Message)
R = TypeVar("R")
H = TypeVar("H", bound=Callable[..., Any])


class _Bus(Generic[M]):
    _kind = "message"

    def __init__(
        self,
        *,
        middleware: Sequence[Middleware] = (),
        registry: MessageRegistry | None = None,
        source: str = "msdata",
    ) -> None:
        if not source:
            raise ConfigurationError("source must be a non-empty string")
        self._middleware = tuple(middleware)
        self._registry = registry if registry is not None else default_registry
        self._source = source
        self._routes: dict[type[Message], _Route] = {}

    def register(
        self,
        message_type: type[M],
        handler: Callable[[Any], Any],
        *,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        """Route ``message_type`` to ``handler``: the bus's middleware, then this handler's."""
        if message_type in self._routes:
            raise HandlerAlreadyRegistered(
                f"{message_type.__qualname__} already has a handler; a {self._kind} has one"
            )
        if not isinstance(message_type, type) or not issubclass(message_type, Message):
            raise TypeError(f"expected a msdata {self._kind} class, got {message_type!r}")
        if self._registry.is_registered(message_type):
            type_name, version = self._registry.name_of(message_type)
        else:  # in-process only: a name for its envelope, never registered for the wire
            type_name, version = _local_name(message_type), 1
        chain = (*self._middleware, *middleware)
        self._routes[message_type] = _Route(
            as_async(handler), compose(handler, chain) if chain else None, type_name, version
        )

    def handler(
        self, message_type: type[M], *, middleware: Sequence[Middleware] = ()
    ) -> Callable[[H], H]:
        """Decorator form of :meth:`register`."""

        def decorate(fn: H) -> H:
            self.register(message_type, fn, middleware=middleware)
            return fn

        return decorate

    def has_handler(self, message_type: type[Message]) -> bool:
        return message_type in self._routes

    async def _traced(self, message: M) -> Any:
        """:meth:`_dispatch` inside the installed telemetry's ``handle`` span."""
        route = self._routes.get(type(message))
        if route is None:
            return await self._dispatch(message)  # raises
        with telemetry.hooks.handle(self._kind, route.type_name, route.handler):
            return await self._dispatch(message)

    async def _dispatch(self, message: M) -> Any:
        route = self._routes.get(type(message))
        if route is None:
            check_message(message, registered=False)
            raise NoHandlerRegistered(f"no handler for {type(message).__qualname__}")
        if route.chain is not None:
            envelope: Envelope[Any] = build_envelope(
                message,
                route.type_name,
                route.version,
                None,
                None,
                self._source,
                None,
                current_envelope(),
            )
            with handling(envelope):
                return await route.chain(envelope)
        # no middleware: no envelope either, unless the handler publishes something
        token = current_parent.set(
            LocalParent(message, route.type_name, route.version, self._source)
        )
        try:
            return await route.handler(message)
        finally:
            current_parent.reset(token)


class _Route:
    __slots__ = ("chain", "handler", "type_name", "version")

    def __init__(
        self,
        handler: Callable[[Any], Awaitable[Any]],
        chain: Next | None,
        type_name: str,
        version: int,
    ) -> None:
        self.handler = handler
        self.chain = chain
        self.type_name = type_name
        self.version = version


def _local_name(cls: type[Message]) -> str:
    return f"local.{cls.__module__}.{cls.__qualname__}".replace("<", "_").replace(">", "_")


class CommandBus(_Bus[Command]):
    """Routes each command type to exactly one handler and returns its result.

    Registering a second handler raises :class:`HandlerAlreadyRegistered`; sending a
    command with none raises :class:`NoHandlerRegistered`; a handler's exception reaches
    the caller unchanged.
    """

    _kind = "command"

    def send(self, command: Command) -> Awaitable[Any]:
        """Run the command's handler; await the result. (A plain method returning the
        coroutine saves a frame per send.)"""
        if telemetry.hooks.enabled:  # telemetry: a span around the handler
            return self._traced(command)
        return self._dispatch(command)


class QueryBus(_Bus[Query[Any]]):
    """Routes each query type to exactly one handler and returns its typed result."""

    _kind = "query"

    def ask(self, query: Query[R]) -> Awaitable[R]:
        """Run the query's handler; await its result."""
        if telemetry.hooks.enabled:  # telemetry: a span around the handler
            return cast(Awaitable[R], self._traced(query))
        return cast(Awaitable[R], self._dispatch(query))
