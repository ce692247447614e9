"""What every msdata store shares: the caller's-transaction contract, store lifecycle and
the table-prefix rule.

The write side of a store (adding to the outbox, recording in the inbox, claiming an
idempotency key, saving a saga's state with the command it sends, appending events) runs
**inside the caller's own open transaction, on the caller's own connection**:

- ``conn`` is a :data:`Connection`: one of ``sqlite3.Connection``; psycopg
  ``Connection`` / ``AsyncConnection``; asyncpg ``Connection`` (or a pool's proxy); a
  SQLAlchemy ``Session`` / ``Connection`` / ``AsyncSession`` / ``AsyncConnection``; or, on the
  memory stores, a :class:`msdata.adapters.memory.MemoryTransaction`. Sync calls take the
  sync forms, ``*_async`` calls the async ones; a store raises
  :class:`msdata.errors.ConfigurationError` for a form it does not serve.
- The store never commits, never rolls back and never opens a transaction of its own on
  ``conn``: the write commits or rolls back with the caller's business data.
- A connection with no open transaction is refused with
  :class:`msdata.errors.ConfigurationError`: the write would commit on its own and break
  the guarantee.

Everything else a store does (a relay's claims, a saga recovery worker's leases,
administration) runs in short transactions of the store's own, on connections it owns, and
is committed before the call returns.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager, contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeAlias, runtime_checkable

from msdata.errors import ConfigurationError

__all__ = [
    "DEFAULT_TABLE_PREFIX",
    "Connection",
    "Store",
    "TransactionFactory",
    "bind_connection",
    "check_store_options",
    "check_table_prefix",
    "current_connection",
    "from_unix_us",
    "unix_us",
]

#: The caller's connection, with an open transaction, that a write-side call joins: see the
#: module docstring for the forms each backend takes. Typed loosely on purpose: the driver
#: types live in optional extras that the core does not import.
Connection: TypeAlias = Any

#: A callable that opens a transaction on the user's database and returns a context manager
#: (sync or async) yielding the :data:`Connection` to use, committing on normal exit and
#: rolling back on an exception. Examples: ``sqlite3.connect(...)`` wrapped so it yields the
#: connection, SQLAlchemy ``sessionmaker.begin`` / ``async_sessionmaker.begin``, or an
#: ``@asynccontextmanager`` around ``pool.connection()`` + ``conn.transaction()``.
TransactionFactory: TypeAlias = Callable[
    [], AbstractContextManager[Any] | AbstractAsyncContextManager[Any]
]

#: SQL stores name their tables ``{prefix}outbox``, ``{prefix}inbox``, ``{prefix}sagas``…
DEFAULT_TABLE_PREFIX = "msdata_"
_PREFIX = re.compile(r"(?:[a-z_][a-z0-9_]{0,39})?")


def init_keywords(cls: type, *, positional: bool = False) -> tuple[set[str], bool]:
    """The keywords ``cls(...)`` takes, following ``**kwargs`` passed up to the base
    classes: keyword-only ones, and with ``positional`` those that may also come by
    position (``self`` left out); and whether it takes any (``**kwargs`` all the way up)."""
    kinds: set[inspect._ParameterKind] = {inspect.Parameter.KEYWORD_ONLY}
    if positional:
        kinds.add(inspect.Parameter.POSITIONAL_OR_KEYWORD)
    takes: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        takes |= {p.name for p in params if p.kind in kinds and p.name != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return takes, False
    return takes, True


def keyword_options(cls: type) -> set[str] | None:
    """The keyword-only arguments ``cls(...)`` takes (a store's options: its path or DSN
    comes first, by position), following ``**options`` passed up to the base classes; None
    if it takes any."""
    takes, any_ = init_keywords(cls)
    return None if any_ else takes


def check_store_options(
    cls: type,
    options: Collection[str],
    where: str,
    *,
    also: Iterable[str] = (),
) -> None:
    """Refuse the options (keyword names) a store's ``from_url`` would pass to ``cls(...)``
    that it does not take: :class:`ConfigurationError` naming them, the nearest accepted
    name (``tabel_prefix``: did you mean table_prefix?) and every accepted one, instead of
    the constructor's ``TypeError``. ``also``: options ``from_url`` takes itself.
    ``where`` names the store in the message."""
    takes = keyword_options(cls)
    if takes is None:
        return
    accepted = takes | set(also)
    unknown = sorted(set(options) - accepted)
    if not unknown:
        return
    near = difflib.get_close_matches(unknown[0], sorted(accepted), 1, 0.7)
    hint = f" (did you mean {near[0]}?)" if near else ""
    raise ConfigurationError(
        f"{where} does not take {', '.join(unknown)}{hint}; it takes {', '.join(sorted(accepted))}"
    )


def check_table_prefix(prefix: str) -> str:
    """A table-name prefix is the only text a SQL store puts into its SQL: allow only
    lowercase letters, digits and ``_`` (not starting with a digit, at most 40), so it
    never needs quoting and can never carry SQL. Anything else: ConfigurationError."""
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise ConfigurationError(
            f"table prefix {prefix!r} must be at most 40 lowercase ASCII letters, digits or '_', "
            "not starting with a digit"
        )
    return prefix


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def unix_us(t: datetime) -> int:
    """An aware datetime as whole microseconds since the Unix epoch, exactly (unlike
    ``timestamp() * 1e6``, which rounds through a float): how stores without a timestamp
    type (SQLite, Redis) keep a time."""
    d = t - _EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


def from_unix_us(us: int) -> datetime:
    """The aware UTC datetime of :func:`unix_us` ``us`` microseconds."""
    return _EPOCH + timedelta(0, 0, us)  # positional: a third faster than microseconds=us


_connection: ContextVar[Any] = ContextVar("msdata_connection")


def current_connection() -> Connection:
    """The connection of the transaction msdata opened for the running handler (the inbox
    middleware, a saga participant, a projection): do the handler's writes (and
    ``outbox.add``) on it, so they commit together.

    Raises :class:`ConfigurationError` outside such a handler."""
    try:
        return _connection.get()
    except LookupError:
        raise ConfigurationError(
            "no msdata transaction is open in this task: current_connection() works only "
            "inside a handler wrapped by Inbox.middleware() (or a saga participant or "
            "projection handler)"
        ) from None


@contextmanager
def bind_connection(conn: Connection) -> Iterator[Connection]:
    """Make ``conn`` what :func:`current_connection` returns inside the ``with`` block (in
    this task and the tasks it starts)."""
    token = _connection.set(conn)
    try:
        yield conn
    finally:
        _connection.reset(token)


@runtime_checkable
class Store(Protocol):
    """The lifecycle every store shares.

    - ``schema_sql()``: the DDL ``create_schema`` runs (empty for stores without SQL), for
      users who manage migrations themselves.
    - ``create_schema()``: create the tables and indexes if they do not exist; idempotent
      and safe to call from several processes at once.
    - ``close()``: release the connections the store owns (never the caller's); idempotent.
    """

    def schema_sql(self) -> str: ...

    async def create_schema(self) -> None: ...

    async def close(self) -> None: ...
