"""Sagas: a business transaction across services as a sequence of local steps and remote
steps (commands over the bus), persisted before each step's effect, compensated in reverse
on failure, resumed after a crash. See docs/sagas.md."""

from msdata.saga.definition import MAX_STEP_NAME, Remote, Retry, Saga, Step, StepKind, remote
from msdata.saga.messages import (
    IDEMPOTENCY_KEY_HEADER,
    SagaReply,
    StepContext,
    current_step,
    idempotency_key,
)
from msdata.saga.orchestrator import MAX_SAGA_ID, SagaOrchestrator, check_saga_id
from msdata.saga.participant import SagaParticipant
from msdata.saga.store import (
    HistoryEntry,
    SagaRecord,
    SagaStatus,
    SagaStore,
    SagaStoreFeatures,
    StepRun,
)

__all__ = [
    "IDEMPOTENCY_KEY_HEADER",
    "MAX_SAGA_ID",
    "MAX_STEP_NAME",
    "HistoryEntry",
    "Remote",
    "Retry",
    "Saga",
    "SagaOrchestrator",
    "SagaParticipant",
    "SagaRecord",
    "SagaReply",
    "SagaStatus",
    "SagaStore",
    "SagaStoreFeatures",
    "Step",
    "StepContext",
    "StepKind",
    "StepRun",
    "check_saga_id",
    "current_step",
    "idempotency_key",
    "remote",
]
