"""The participant side of a remote saga step: handle the command once, in the service's
own transaction, and reply through the service's own outbox.

::

    participant = SagaParticipant(bus, outbox, transaction, inbox=inbox)

    @participant.handler(ReserveStock, group="stock")
    def reserve(cmd: ReserveStock) -> Reserved:
        conn = current_connection()                  # the open transaction
        if not in_stock(conn, cmd.sku, cmd.qty):
            raise SagaStepFailed("out of stock")     # replied as a failure, effects rolled back
        conn.execute("UPDATE stock ...")
        return Reserved(reservation_id=...)          # replied as success, with this data

For each command: ``transaction()`` is opened; with an ``inbox``, the step invocation's
idempotency key is recorded in it (a key seen before: the effect was applied already, so the
handler is skipped and a success marked ``duplicate`` is replied); the handler runs with the
connection at :func:`msdata.storage.current_connection`; its success reply is added to the
outbox in the same transaction, so the effect and the reply commit together. A
:class:`msdata.errors.SagaStepFailed` rolls the effects back and replies with the failure in
a transaction of its own (the key is not recorded: a retry runs the handler again). Any other
exception is a technical failure: the delivery is nacked and redelivered by the event bus's
policy, and the orchestrator's step timeout decides when to stop waiting.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar, cast

from pydantic import BaseModel

from msdata.errors import RejectMessage, SagaStepFailed
from msdata.events import EventBus
from msdata.messages import Command, Envelope, current_envelope
from msdata.outbox import Inbox, Outbox
from msdata.saga.messages import (
    HEADER_ATTEMPT,
    HEADER_PURPOSE,
    HEADER_REPLY_TO,
    HEADER_SAGA_ID,
    HEADER_SAGA_TYPE,
    HEADER_STEP,
    IDEMPOTENCY_KEY_HEADER,
    SagaReply,
)
from msdata.storage import TransactionFactory, bind_connection

__all__ = ["SagaParticipant"]

C = TypeVar("C", bound=Command)
H = TypeVar("H", bound=Callable[..., Any])


class SagaParticipant:
    """Serves saga commands on ``bus`` (see the module docstring). ``transaction``: opens a
    transaction on the service's database (sync or async context manager yielding the
    connection), where ``outbox`` (and ``inbox``, if given) write."""

    def __init__(
        self,
        bus: EventBus,
        outbox: Outbox,
        transaction: TransactionFactory,
        *,
        inbox: Inbox | None = None,
    ) -> None:
        self.bus = bus
        self.outbox = outbox
        self.transaction = transaction
        self.inbox = inbox

    def handler(
        self, command_type: type[C], *, group: str, topic: str | None = None
    ) -> Callable[[H], H]:
        """Decorator: ``fn(command)`` (sync or async) handles ``command_type`` for consumer
        group ``group`` and returns the reply data (a pydantic model, a dict or None)."""

        def decorate(fn: H) -> H:
            self.subscribe(command_type, fn, group=group, topic=topic)
            return fn

        return decorate

    def subscribe(
        self,
        command_type: type[C],
        fn: Callable[[C], Any],
        *,
        group: str,
        topic: str | None = None,
    ) -> None:
        async def handle(command: C) -> None:
            env = current_envelope()
            assert env is not None
            await self._handle(env, command, fn, group)

        # the bus consumes any registered message type; its signature names events
        self.bus.subscribe(cast(type[Any], command_type), handle, group=group, topic=topic)

    async def _handle(
        self, env: Envelope[Any], command: C, fn: Callable[[C], Any], group: str
    ) -> None:
        h = env.headers
        try:
            saga_id = h[HEADER_SAGA_ID]
            key = h[IDEMPOTENCY_KEY_HEADER]
            reply_to = h[HEADER_REPLY_TO]
            base = {
                "saga_id": saga_id,
                "saga_type": h[HEADER_SAGA_TYPE],
                "step": h[HEADER_STEP],
                "purpose": h[HEADER_PURPOSE],
                "attempt": int(h[HEADER_ATTEMPT]),
            }
        except (KeyError, ValueError) as e:
            raise RejectMessage(f"not a saga command (header {e} missing or bad)") from None
        outbox, inbox = self.outbox, self.inbox

        async def run(conn: Any, is_async: bool) -> SagaReply:
            if inbox is not None:
                first = (
                    await inbox.first_time_async(conn, group, key)
                    if is_async
                    else inbox.first_time(conn, group, key)
                )
                if not first:
                    return SagaReply(ok=True, duplicate=True, **base)
            with bind_connection(conn):
                result = fn(command)
                if inspect.isawaitable(result):
                    result = await result
            data = (
                result.model_dump(mode="json")
                if isinstance(result, BaseModel)
                else (dict(result) if result is not None else None)
            )
            return SagaReply(ok=True, data=data, **base)

        async def in_transaction(work: Callable[[Any, bool], Any]) -> None:
            cm = self.transaction()
            if hasattr(cm, "__aenter__"):
                async with cm as conn:  # type: ignore[union-attr]
                    reply = await work(conn, True)
                    await outbox.add_async(conn, reply, topic=reply_to, key=saga_id)
            else:
                with cm as conn:
                    reply = await work(conn, False)
                    outbox.add(conn, reply, topic=reply_to, key=saga_id)

        try:
            await in_transaction(run)
        except SagaStepFailed as e:
            reason = str(e) or type(e).__name__

            async def failed(conn: Any, is_async: bool) -> SagaReply:
                return SagaReply(ok=False, reason=reason, **base)

            await in_transaction(failed)
