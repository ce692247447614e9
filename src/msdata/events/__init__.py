"""The event bus: typed events over any transport, consumed by groups of handlers."""

from msdata.events.bus import EventBus

__all__ = ["EventBus"]
