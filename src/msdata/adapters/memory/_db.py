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

from collections.abc import Callable
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

from msdata.clock import SYSTEM_CLOCK, Clock
from msdata.errors import ConcurrencyError, ConfigurationError, StoreError
from msdata.storage import Connection, check_store_options, check_table_prefix
from msdata.urls import redact_url

__all__ = ["HeldValues", "MemoryDatabase", "MemoryTransaction", "transaction_of"]

#: options only the SQL stores use; a memory store accepts and ignores them
_SQL_ONLY = ("table_prefix", "schema")


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


class HeldValues:
    """Compare-and-set of a number per key (a stream's version, a checkpoint's position)
    under a row lock: the open transaction that set a key holds it, with the value it set,
    until it ends; another transaction's write of that key meanwhile gets
    :class:`msdata.errors.ConcurrencyError` at once, as a database would once the first
    transaction commits."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: dict[str, tuple[MemoryTransaction, int]] = {}

    def check(
        self, tx: MemoryTransaction, key: str, committed: int, expected: int, name: str, doing: str
    ) -> int:
        """The key's value as ``tx`` sees it (``committed`` unless ``tx`` set it), which must
        be ``expected``; ConcurrencyError naming ``name`` otherwise, or when another open
        transaction holds the key (``doing``: what it does, for the message)."""
        held = self._held.get(key)
        if held is not None and held[0] is not tx:
            raise ConcurrencyError(f"{name} (another open transaction is {doing})", expected, None)
        current = held[1] if held is not None else committed
        if current != expected:
            raise ConcurrencyError(name, expected, current)
        return current

    def hold(self, tx: MemoryTransaction, key: str, value: int) -> None:
        """``tx`` set ``key`` to ``value`` (after :meth:`check`): it holds the key until it
        ends."""
        if key not in self._held:
            tx.on_end(lambda: self._release(key))
        self._held[key] = (tx, value)

    def _release(self, key: str) -> None:
        self._held.pop(key, None)


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
        take, and any URL query parameter, raises :class:`ConfigurationError` naming it."""
        if not url.startswith("memory:"):
            raise ConfigurationError(f"not a memory:// URL: {redact_url(url)!r}")
        if options.get("table_prefix") is not None:
            check_table_prefix(options["table_prefix"])
        query = parse_qsl(urlsplit(url).query, keep_blank_values=True)
        if query:
            raise ConfigurationError(
                f"unknown URL option {query[0][0]!r}: a memory:// store takes none "
                "(its options are keywords of store_from_url)"
            )
        check_store_options(cls, options, f"{cls.__name__} (memory://)", also=_SQL_ONLY)
        return cls(**{k: v for k, v in options.items() if k not in _SQL_ONLY})

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
