"""The checkpoint store port: how far each projection has applied the event store's global
order, and which generation of its read model readers should see.

Implemented by ``msdata.adapters.memory``, ``msdata.adapters.sqlite`` and
``msdata.adapters.postgres``; checked by :mod:`msdata.testing.conformance.checkpoints`.

The checkpoint lives in the read model's own database and is written **in the same
transaction** as the read-model writes it covers (``save`` / ``save_async`` on the caller's
connection, never committing; a connection with no open transaction is refused with
:class:`msdata.errors.ConfigurationError`). So after a crash either both the writes and the
checkpoint are there, or neither: each event's effect lands exactly once.

``save`` is a compare-and-set: it stores ``position`` only if the stored position is
``expected`` (0 when there is none yet) and otherwise raises
:class:`msdata.errors.ConcurrencyError` (another runner of the same projection got there
first; the caller rolls back). Concurrent ``save``\\ s of one name with the same
``expected``: at most one commits.

``activate`` sets, in the caller's transaction, the generation of a projection's read model
that readers should use; ``active`` reads it (0: none yet). A rebuild builds generation
``n + 1`` beside ``n`` and activates it in one transaction, so readers switch from the whole
old model to the whole new one.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from msdata.errors import ConfigurationError

__all__ = ["CheckpointStore", "check_checkpoint_name"]

#: the longest checkpoint or projection name (characters)
MAX_NAME = 200


def check_checkpoint_name(name: str) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise ConfigurationError(
            f"a checkpoint name must be a non-empty str of at most {MAX_NAME} characters, "
            f"got {name!r}"
        )
    return name


def check_position(what: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"{what} must be an int >= 0, got {value!r}")
    return value


@runtime_checkable
class CheckpointStore(Protocol):
    """Positions and active generations of projections; see the module docstring."""

    def save(self, conn: Any, name: str, position: int, expected: int) -> None:
        """Store ``position`` for ``name`` in the caller's sync transaction if the stored
        one is ``expected``; ConcurrencyError otherwise. Never commits."""
        ...

    async def save_async(self, conn: Any, name: str, position: int, expected: int) -> None:
        """``save`` on the caller's async connection."""
        ...

    async def load(self, name: str) -> int:
        """The committed position of ``name`` (0 when none was saved)."""
        ...

    def activate(self, conn: Any, projection: str, generation: int) -> None:
        """Make ``generation`` the one readers use, in the caller's sync transaction."""
        ...

    async def activate_async(self, conn: Any, projection: str, generation: int) -> None:
        """``activate`` on the caller's async connection."""
        ...

    async def active(self, projection: str) -> int:
        """The committed active generation of ``projection`` (0 when none)."""
        ...

    def schema_sql(self) -> str: ...

    async def create_schema(self) -> None: ...

    async def close(self) -> None: ...
