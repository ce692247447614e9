"""Kept so that ``msdata.testing.outbox`` imports keep working: the suites live in
:mod:`msdata.testing.conformance` (``outbox``, ``relay``, ``inbox``: one module per port).

:class:`OutboxStoreConformance` here is the store suite and the relay suite together, as it
was before they were split.
"""

from msdata.testing.conformance.inbox import InboxStoreConformance
from msdata.testing.conformance.outbox import (
    OutboxStoreConformance as _StoreSuite,
)
from msdata.testing.conformance.outbox import (
    OutboxStoreFeatures,
    OutboxStoreHooks,
    make_row,
    make_rows,
)
from msdata.testing.conformance.relay import OutboxRelayConformance, RecordingPublisher

__all__ = [
    "InboxStoreConformance",
    "OutboxRelayConformance",
    "OutboxStoreConformance",
    "OutboxStoreFeatures",
    "OutboxStoreHooks",
    "RecordingPublisher",
    "make_row",
    "make_rows",
]


class OutboxStoreConformance(_StoreSuite, OutboxRelayConformance):
    """The outbox store suite and the relay suite (the shape of this class before the
    split)."""
