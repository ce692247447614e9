"""Moved to :mod:`msdata.testing.conformance.transport`; this name keeps working."""

from msdata.testing.conformance.transport import (
    TransportConformance,
    TransportRestartConformance,
    collect,
    make_messages,
)

__all__ = ["TransportConformance", "TransportRestartConformance", "collect", "make_messages"]
