"""Projections: read models kept up to date from the event store, with the checkpoint in the
same transaction as the read-model writes, lag reporting and rebuild with switch-over. See
docs/projections.md."""

from msdata.projections.projection import Projection, ProjectionContext, handles
from msdata.projections.runner import Lag, ProjectionRunner
from msdata.projections.store import CheckpointStore

__all__ = [
    "CheckpointStore",
    "Lag",
    "Projection",
    "ProjectionContext",
    "ProjectionRunner",
    "handles",
]
