"""Idempotency keys: run an operation at most once per key (scoped to its owner), replay
its stored result to every retry, tell a concurrent retry the first call is still in
progress, and refuse a key reused for a different request.

Front ends: :meth:`IdempotencyKeys.run` / :meth:`~IdempotencyKeys.run_sync`, the
:meth:`~IdempotencyKeys.idempotent` decorator, the :meth:`~IdempotencyKeys.call` context
manager, and :class:`msdata.idempotency.asgi.IdempotencyMiddleware` for Starlette/FastAPI
(``pip install "msdata[asgi]"``). Stores: ``msdata.adapters.{memory,sqlite,postgres,redis}``.
"""

from msdata.idempotency.fingerprint import canonical_json, fingerprint, http_fingerprint
from msdata.idempotency.keys import IdempotencyClaim, IdempotencyKeys, IdempotentCall
from msdata.idempotency.store import (
    IdempotencyRecord,
    IdempotencyStatus,
    IdempotencyStore,
    IdempotencyStoreFeatures,
)

__all__ = [
    "IdempotencyClaim",
    "IdempotencyKeys",
    "IdempotencyRecord",
    "IdempotencyStatus",
    "IdempotencyStore",
    "IdempotencyStoreFeatures",
    "IdempotentCall",
    "canonical_json",
    "fingerprint",
    "http_fingerprint",
]
