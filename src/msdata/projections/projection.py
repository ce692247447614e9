"""A projection: handlers for event types that update one read model, by generation."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, NamedTuple, TypeVar

from msdata.errors import ConfigurationError
from msdata.eventstore.log import StoredEvent
from msdata.messages import Event, Message, MessageRegistry

__all__ = ["Projection", "ProjectionContext", "handles"]

F = TypeVar("F", bound=Callable[..., Any])
_MARK = "__msdata_handles__"


def handles(*event_types: type[Event]) -> Callable[[F], F]:
    """Mark a :class:`Projection` method as the handler of ``event_types``. It is called
    as ``method(ctx, event)`` and may be sync or async."""
    if not event_types:
        raise ConfigurationError("@handles needs at least one event class")

    def mark(fn: F) -> F:
        setattr(fn, _MARK, (*getattr(fn, _MARK, ()), *event_types))
        return fn

    return mark


class ProjectionContext(NamedTuple):
    """What a handler gets besides the event: the connection of the transaction the
    runner opened (write the read model on it: the checkpoint commits with it), the
    read model's ``generation`` to write into, and the stored event (position, stream)."""

    conn: Any
    generation: int
    stored: StoredEvent[Any]


class Projection:
    """Base of a projection::

        class OrderTotals(Projection):
            name = "order_totals"

            def setup(self, conn, generation):            # a fresh, empty read model
                conn.execute(f"DROP TABLE IF EXISTS totals_{generation}")
                conn.execute(f"CREATE TABLE totals_{generation} (id TEXT PRIMARY KEY, n INT)")

            def activate(self, conn, generation):         # point readers at it
                conn.execute("DROP VIEW IF EXISTS totals")
                conn.execute(f"CREATE VIEW totals AS SELECT * FROM totals_{generation}")

            @handles(OrderPlaced)
            def placed(self, ctx, event: OrderPlaced):
                ctx.conn.execute(f"INSERT INTO totals_{ctx.generation} VALUES (?, ?)", ...)

    ``name`` identifies the projection's checkpoints. ``setup`` must leave an empty read
    model for ``generation`` (dropping what a failed earlier rebuild left); ``activate``
    runs in the transaction that makes ``generation`` the active one; ``drop`` removes an
    old generation. All three run in a transaction of the runner's and may be async. A
    handler must write only through ``ctx.conn`` and be deterministic, so a rebuild from
    position 0 gives the model the live runner keeps.
    """

    name: ClassVar[str] = ""
    _handlers: ClassVar[dict[type[Message], str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        handlers: dict[type[Message], str] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                for event_type in getattr(value, _MARK, ()):
                    handlers[event_type] = attr
        cls._handlers = handlers

    def __init__(self) -> None:
        if not self.name:
            raise ConfigurationError(f"{type(self).__qualname__} needs a class attribute name")

    def event_types(self, registry: MessageRegistry) -> frozenset[str]:
        """The type names this projection handles (raises RegistrationError for a class
        that is not registered)."""
        return frozenset(registry.name_of(cls)[0] for cls in self._handlers)

    def event_classes(self) -> list[type[Event]]:
        """The event classes this projection has handlers for."""
        return [cls for cls in self._handlers if issubclass(cls, Event)]

    def handler_for(self, message: Message) -> Callable[[ProjectionContext, Any], Any] | None:
        for cls in type(message).__mro__:
            attr = self._handlers.get(cls)
            if attr is not None:
                fn: Callable[[ProjectionContext, Any], Any] = getattr(self, attr)
                return fn
        return None

    def _resolve(self, message: Message) -> tuple[Any, bool]:
        """(handler or None, whether it is a coroutine function) for ``message``'s class,
        looked up once per class."""
        try:
            return self._dispatch[type(message)]
        except (AttributeError, KeyError):
            found = self.handler_for(message)
            entry = (found, found is not None and inspect.iscoroutinefunction(found))
            if "_dispatch" not in vars(self):
                self._dispatch: dict[type[Message], tuple[Any, bool]] = {}
            self._dispatch[type(message)] = entry
            return entry

    async def apply(self, ctx: ProjectionContext) -> None:
        """Run the handler of ``ctx.stored``'s message, if there is one."""
        message = ctx.stored.envelope.message
        fn, is_async = self._resolve(message)
        if fn is None:
            return
        if is_async:
            await fn(ctx, message)
            return
        result = fn(ctx, message)
        if result is not None and hasattr(result, "__await__"):  # returned an awaitable
            await result

    def setup(self, conn: Any, generation: int) -> Awaitable[None] | None:
        """Create an empty read model for ``generation`` (default: nothing to do)."""
        return None

    def activate(self, conn: Any, generation: int) -> Awaitable[None] | None:
        """Point readers at ``generation`` (default: nothing; readers may ask the runner
        or the checkpoint store which generation is active)."""
        return None

    def drop(self, conn: Any, generation: int) -> Awaitable[None] | None:
        """Remove the read model of an old ``generation`` (default: nothing)."""
        return None
