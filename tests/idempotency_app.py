"""A FastAPI app behind IdempotencyMiddleware, for the end-to-end tests over real HTTP.

Run: ``python tests/idempotency_app.py PORT`` with IDEM_DB (SQLite file), IDEM_COUNT (a file
that gets one line per handler run), IDEM_LEASE (seconds) and IDEM_DELAY (seconds the
handler takes) in the environment. IDEM_PLAIN=1 serves the same app without the
middleware (for the bench).
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from msdata.adapters.sqlite.idempotency import SqliteIdempotencyStore
from msdata.idempotency import IdempotencyKeys
from msdata.idempotency.asgi import IdempotencyMiddleware, owner_from_header


class Payment(BaseModel):
    amount: int


def make_app() -> FastAPI:
    count_file = os.environ.get("IDEM_COUNT")
    delay = float(os.environ.get("IDEM_DELAY", "0"))
    store = SqliteIdempotencyStore(os.environ["IDEM_DB"]) if "IDEM_DB" in os.environ else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if store is not None:
            await store.create_schema()
        yield
        if store is not None:
            await store.close()

    app = FastAPI(lifespan=lifespan)

    @app.post("/payments", status_code=201)
    async def pay(payment: Payment) -> JSONResponse:
        if count_file:
            # one line per run, written through before the handler goes on (a test counts)
            with open(count_file, "a") as f:  # noqa: ASYNC230
                f.write("run\n")
        if delay:
            await asyncio.sleep(delay)
        body = {"payment_id": uuid.uuid4().hex, "amount": payment.amount}
        return JSONResponse(body, status_code=201, headers={"x-payment-id": body["payment_id"]})

    if os.environ.get("IDEM_PLAIN") != "1":
        assert store is not None, "IDEM_DB is needed"
        keys = IdempotencyKeys(store, lease_seconds=float(os.environ.get("IDEM_LEASE", "60")))
        app.add_middleware(IdempotencyMiddleware, keys=keys, owner=owner_from_header("x-api-key"))
    return app


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(make_app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
