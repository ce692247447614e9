"""CQRS: command and query buses (event store and projections come later)."""

from msdata.cqrs.bus import CommandBus, QueryBus

__all__ = ["CommandBus", "QueryBus"]
