"""What the memory stores share: :class:`MemoryTransaction`, the unit of work every memory
store takes as its ``conn``, and :class:`MemoryDatabase`, the lifecycle of a memory store.

A new memory store (saga state, idempotency records, event store, checkpoints) subclasses
:class:`MemoryDatabase`; its write side takes ``conn`` through :func:`transaction_of` and
stages its changes with ``tx.on_commit(...)`` (visible at commit, gone at rollback)::

    class MemoryThingStore(MemoryDatabase):
        def __init__(self, *, clock: Clock = SYSTEM_CLOCK) -> None:
            super().__init__(clock=clock)
            self._things: dict[str, Thing] = {}

        def put(self, conn: Connection, key: str, thing: Thing) -> None:
            tx = transaction_of(conn)
            tx.on_commit(lambda: self._things.__setitem__(key, thing))

        async def put_async(self, conn: Connection, key: str, thing: Thing) -> None:
            self.put(conn, key, thing)

The stores serve one event loop in one thread: a store call that never suspends is one
transaction.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from msdata.clock import SYSTEM_CLOCK, Clock
from msdata.errors import ConfigurationError, StoreError
from msdata.storage import Connection, check_table_prefix
from msdata.urls import redact_url

__all__ = ["MemoryDatabase", "MemoryTransaction", "transaction_of"]

#: options only the SQL stores use; a memory store accepts and ignores them
_SQL_ONLY = ("table_prefix", "schema")


def _keywords(cls: type) -> set[str] | None:
    """The keyword arguments ``cls(...)`` takes, following ``**options`` passed up to the
    base classes; None if it takes any."""
    takes: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        takes |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            takes.discard("self")
            return takes
    return None


class MemoryTransaction:
    """A unit of work for the memory stores: its changes become visible at :meth:`commit`
    and vanish at :meth:`rollback`. As a context manager it commits on normal exit and rolls
    back on an exception (like a database transaction factory does)."""

    __slots__ = ("_on_commit", "_on_end", "_state")

    def __init__(self) -> None:
        self._on_commit: list[Callable[[], None]] = []
        self._on_end: list[Callable[[], None]] = []
        self._state = "open"

    @property
    def is_open(self) -> bool:
        return self._state == "open"

    def on_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when (and only if) this transaction commits."""
        self.check_open()
        self._on_commit.append(fn)

    def on_end(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` after commit or rollback (after the commit callbacks)."""
        self.check_open()
        self._on_end.append(fn)

    def commit(self) -> None:
        self.check_open()
        self._state = "committed"
        for fn in self._on_commit:
            fn()
        self._finish()

    def rollback(self) -> None:
        if self._state != "open":
            return
        self._state = "rolled back"
        self._finish()

    def _finish(self) -> None:
        ends, self._on_end, self._on_commit = self._on_end, [], []
        for fn in ends:
            fn()

    def check_open(self) -> None:
        """StoreError unless the transaction is still open."""
        if self._state != "open":
            raise StoreError(f"the transaction is already {self._state}")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()


def transaction_of(conn: Connection) -> MemoryTransaction:
    """``conn`` as the open :class:`MemoryTransaction` it must be: ConfigurationError for
    anything else, StoreError if it has already committed or rolled back."""
    if not isinstance(conn, MemoryTransaction):
        raise ConfigurationError(
            f"the memory stores take a MemoryTransaction (store.begin()), got {type(conn)!r}"
        )
    conn.check_open()
    return conn


class MemoryDatabase:
    """The lifecycle of a memory store: ``from_url("memory://")``, ``begin()`` (a new
    :class:`MemoryTransaction`), an empty ``schema_sql()``, a no-op ``create_schema()``,
    ``close()``; ``clock`` is where the store reads time."""

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.clock = clock
        self.closed = False

    @classmethod
    def from_url(cls, url: str = "memory://", **options: Any) -> Self:
        """A new, empty store for ``memory://``; ``options`` go to the constructor.

        The SQL stores' ``table_prefix`` (checked as they check it) and ``schema`` are
        accepted and ignored, so a service's store URL can be switched to ``memory://``
        (in tests) without changing its options. Any other option the constructor does not
        take raises :class:`ConfigurationError` naming it."""
        if not url.startswith("memory:"):
            raise ConfigurationError(f"not a memory:// URL: {redact_url(url)!r}")
        if options.get("table_prefix") is not None:
            check_table_prefix(options["table_prefix"])
        options = {k: v for k, v in options.items() if k not in _SQL_ONLY}
        takes = _keywords(cls)
        unknown = sorted(set(options) - takes) if takes is not None else []
        if takes is not None and unknown:
            raise ConfigurationError(
                f"{cls.__name__} (memory://) does not take {', '.join(unknown)}; "
                f"it takes {', '.join(sorted(takes | set(_SQL_ONLY)))}"
            )
        return cls(**options)

    def begin(self) -> MemoryTransaction:
        """A new transaction (stands in for a database connection)."""
        return MemoryTransaction()

    def schema_sql(self) -> str:
        """Nothing: a memory store has no schema."""
        return ""

    async def create_schema(self) -> None:
        return None

    async def close(self) -> None:
        self.closed = True
