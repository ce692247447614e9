"""The participant side of a remote saga step: handle the command once, in the service's
own transaction, reply through the service's own outbox, and answer a repeated command with
the same reply.

::

    participant = SagaParticipant(bus, outbox, transaction, idempotency=idempotency_store)

    @participant.handler(ReserveStock, group="stock")
    def reserve(cmd: ReserveStock) -> Reserved:
        conn = current_connection()                  # the open transaction
        if not in_stock(conn, cmd.sku, cmd.qty):
            raise SagaStepFailed("out of stock")     # replied as a failure, effects rolled back
        conn.execute("UPDATE stock ...")
        return Reserved(reservation_id=...)          # replied as success, with this data

For each command: ``transaction()`` is opened; with an ``idempotency`` store (the
:class:`msdata.idempotency.IdempotencyStore` port, in the caller's transaction), the step
invocation's idempotency key is claimed in it (scope: the consumer group); the handler runs
with the connection at :func:`msdata.storage.current_connection`; its success reply is added
to the outbox and stored under the key (``ok``, ``data``, ``reason``, ``attempt`` as JSON) in
the same transaction, so the effect, the reply and the stored reply commit together. A key
seen before: the handler is skipped and the stored reply is sent again, marked ``duplicate``
(success with the original data, or the failure with its reason). A
:class:`msdata.errors.SagaStepFailed` rolls the effects back and replies with the failure in
a transaction of its own, storing that failure for its attempt: a redelivery of the same
attempt gets the same failure, a later attempt (the orchestrator's retry) runs the handler
again. Any other exception is a technical failure: the delivery is nacked and redelivered by
the event bus's policy, and the orchestrator's step timeout decides when to stop waiting; so
is a command whose key another transaction holds uncommitted (memory store only; SQL stores
wait for that transaction's row lock).

A command that is not a well-formed saga command is refused at once with
:class:`msdata.errors.RejectMessage` (a dead letter with the reason, the handler not run, no
transaction opened): a saga header missing or empty, ``sagapurpose`` other than ``action``
or ``compensation``, ``sagaattempt`` not an integer >= 1 in at most 18 ASCII digits,
``sagaid`` not a saga id (:func:`msdata.saga.check_saga_id`), ``sagastep`` or ``sagatype``
over 100 characters (a step over ``MAX_STEP_NAME``, 64) or holding a control character
(or ``:`` in a step), ``sagareplyto``
not a valid topic name (:func:`msdata.transport.check_name`), or an ``idempotencykey``
header other than the key of its saga id, step and purpose (the key is always derived from
those: a command cannot claim, or replay the stored reply of, another saga's step). A
handler that returns something other than a pydantic model, a dict or None is refused the
same way, its transaction rolled back: a programming error, the same on every delivery; so
is one returning data a reply cannot carry (a NaN or infinite float, a lone surrogate: the
rules of messages).

An action never takes effect after its compensation: when a compensation command for
(saga id, step) is handled, the action's key is recorded in the same transaction as refused
("already compensated"), unless the action already took effect (its success is stored: the
compensation undoes it). An action for that step that arrives later (overtaken by its
compensation after the orchestrator's timeout: a slow participant, a redelivery, a retry)
gets a failure reply with that reason and its handler does not run. The record is in the
compensation's consumer group: handle a step's action and compensation in one group
(``Service.step`` does). Needs ``idempotency``.
"""

from __future__ import annotations

import inspect
import json
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, TypeVar, cast

from pydantic import BaseModel

from msdata.clock import SYSTEM_CLOCK, Clock
from msdata.errors import (
    ConfigurationError,
    EncodeError,
    RejectMessage,
    SagaError,
    SagaStepFailed,
)
from msdata.events import EventBus
from msdata.idempotency import IdempotencyStore
from msdata.messages import Command, Envelope, current_envelope, safe_text
from msdata.outbox import Outbox
from msdata.saga.definition import MAX_STEP_NAME
from msdata.saga.messages import (
    ACTION,
    COMPENSATION,
    HEADER_ATTEMPT,
    HEADER_PURPOSE,
    HEADER_REPLY_TO,
    HEADER_SAGA_ID,
    HEADER_SAGA_TYPE,
    HEADER_STEP,
    IDEMPOTENCY_KEY_HEADER,
    SagaReply,
    idempotency_key,
)
from msdata.saga.orchestrator import check_saga_id
from msdata.serialization import _unencodable
from msdata.storage import TransactionFactory, bind_connection, unix_us
from msdata.transport import check_name

__all__ = ["SagaParticipant"]

C = TypeVar("C", bound=Command)
H = TypeVar("H", bound=Callable[..., Any])


class SagaParticipant:
    """Serves saga commands on ``bus`` (see the module docstring). ``transaction``: opens a
    transaction on the service's database (sync or async context manager yielding the
    connection), where ``outbox`` and ``idempotency`` write. ``idempotency``: an
    :class:`msdata.idempotency.IdempotencyStore` that joins the caller's transaction
    (``features.joins_transaction``; ConfigurationError otherwise); without it every
    delivery runs the handler. ``reply_retention``: how long (seconds) a stored reply is
    kept for replays (default 7 days; the store's ``purge(now)`` deletes older ones)."""

    def __init__(
        self,
        bus: EventBus,
        outbox: Outbox,
        transaction: TransactionFactory,
        *,
        idempotency: IdempotencyStore | None = None,
        reply_retention: float = 7 * 24 * 3600.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if idempotency is not None and not idempotency.features.joins_transaction:
            raise ConfigurationError(
                f"{type(idempotency).__name__} cannot join the participant's transaction: "
                "the stored reply must commit with the handler's effects (use an SQL or "
                "memory idempotency store)"
            )
        if not reply_retention > 0:
            raise ConfigurationError(f"reply_retention must be > 0 seconds, got {reply_retention}")
        self.bus = bus
        self.outbox = outbox
        self.transaction = transaction
        self.idempotency = idempotency
        self.reply_retention = reply_retention
        self.clock = clock

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
        base, key, reply_to = _command_headers(h)  # RejectMessage: not a saga command
        saga_id, attempt = base["saga_id"], base["attempt"]
        outbox, store = self.outbox, self.idempotency

        async def call(method: str, conn: Any, is_async: bool, *args: Any) -> Any:
            assert store is not None
            if is_async:
                return await getattr(store, method + "_async")(conn, *args)
            return getattr(store, method)(conn, *args)

        async def claim(conn: Any, is_async: bool) -> tuple[str | None, SagaReply | None]:
            """Claim the key: (token, None) to run the handler, (None, reply) to replay."""
            if store is None:
                return None, None
            clock_now = self.clock.now()
            now = unix_us(clock_now)
            until = unix_us(clock_now + timedelta(seconds=self.reply_retention))
            new_token = _new_token
            got = await call("claim", conn, is_async, group, key, "", now, until, new_token)
            if isinstance(got, str):
                return got, None
            _, completed, response, holder = got
            stored = _decode(response) if completed else None
            if stored is None:
                raise SagaError(
                    f"saga command {key} is being handled by another transaction; "
                    "redelivery will get its reply"
                )
            if not stored["ok"] and not stored["compensated"] and attempt > stored["attempt"]:
                # a retry after a business failure: run the handler again
                await call("release", conn, is_async, group, key, holder)
                got = await call("claim", conn, is_async, group, key, "", now, until, new_token)
                if isinstance(got, str):
                    return got, None
                raise SagaError(f"saga command {key} was claimed concurrently")
            return None, SagaReply(
                ok=stored["ok"],
                data=stored["data"],
                reason=stored["reason"],
                duplicate=not stored["compensated"],  # a refusal: compensated before it came
                **base,
            )

        async def mark_compensated(conn: Any, is_async: bool) -> None:
            """A compensation is being handled: record under the action's key, in this
            transaction, that the action is refused from now on, unless the action took
            effect (then the compensation undoes it). An action that arrives later (it was
            overtaken: slow, redelivered, retried) then gets a failure reply, "already
            compensated", without running its handler."""
            if store is None or h[HEADER_PURPOSE] != COMPENSATION:
                return
            action_key = idempotency_key(saga_id, h[HEADER_STEP], ACTION)
            clock_now = self.clock.now()
            now = unix_us(clock_now)
            until = unix_us(clock_now + timedelta(seconds=self.reply_retention))
            got = await call("claim", conn, is_async, group, action_key, "", now, until, _new_token)
            if not isinstance(got, str):
                _, completed, response, holder = got
                stored = _decode(response) if completed else None
                if stored is None:
                    raise SagaError(
                        f"saga command {action_key} is being handled by another transaction; "
                        "its compensation waits for it (redelivery)"
                    )
                if stored["ok"] or stored["compensated"]:
                    return  # it took effect (this compensation undoes it), or is refused
                # refused by the handler: a later attempt would run it again; refuse it too
                await call("release", conn, is_async, group, action_key, holder)
                got = await call(
                    "claim", conn, is_async, group, action_key, "", now, until, _new_token
                )
                if not isinstance(got, str):
                    raise SagaError(f"saga command {action_key} was claimed concurrently")
            if not await call(
                "complete", conn, is_async, group, action_key, got, _COMPENSATED, until
            ):
                raise SagaError(f"saga command {action_key}: its claim was lost")

        async def store_reply(conn: Any, is_async: bool, token: str, reply: SagaReply) -> None:
            until = unix_us(self.clock.now() + timedelta(seconds=self.reply_retention))
            response = _encode(reply, attempt)
            if not await call("complete", conn, is_async, group, key, token, response, until):
                raise SagaError(f"saga command {key}: its claim was lost before the reply")

        async def run(conn: Any, is_async: bool) -> SagaReply:
            await mark_compensated(conn, is_async)
            token, replay = await claim(conn, is_async)
            if replay is not None:
                return replay
            with bind_connection(conn):
                result = fn(command)
                if inspect.isawaitable(result):
                    result = await result
            if isinstance(result, BaseModel):
                data = result.model_dump(mode="json")
            elif isinstance(result, Mapping):
                data = dict(result)
            elif result is None:
                data = None
            else:  # a programming error: the same on every delivery, so not retried
                raise RejectMessage(
                    f"saga handler {getattr(fn, '__qualname__', fn)!r} returned "
                    f"{type(result).__name__}; it must return a pydantic model, a dict or None"
                )
            problem = None if data is None else _unencodable(data, 2)
            if problem is not None:  # NaN, a lone surrogate...: as deterministic, not retried
                raise RejectMessage(
                    f"saga handler {getattr(fn, '__qualname__', fn)!r} returned data a reply "
                    f"cannot carry (reply data{safe_text(problem, 300)})"
                )
            reply = SagaReply(ok=True, data=data, **base)
            if token is not None:
                await store_reply(conn, is_async, token, reply)
            return reply

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
                await mark_compensated(conn, is_async)
                token, replay = await claim(conn, is_async)
                if replay is not None:  # a concurrent delivery answered meanwhile
                    return replay
                reply = SagaReply(ok=False, reason=reason, **base)
                if token is not None:
                    await store_reply(conn, is_async, token, reply)
                return reply

            await in_transaction(failed)


def _command_headers(h: Mapping[str, str]) -> tuple[dict[str, Any], str, str]:
    """The correlation of a saga command from its headers: (the reply's fields, the
    idempotency key, the reply topic). The key is derived from saga id, step and purpose
    (:func:`idempotency_key`): an ``idempotencykey`` header that names another invocation
    is refused, so a command cannot claim (or replay the reply of) another saga's step.
    Raises :class:`msdata.errors.RejectMessage` (dead letter at once, the handler not run)
    for a missing or bad header: a redelivery would be as bad."""
    try:
        saga_id = h[HEADER_SAGA_ID]
        saga_type = h[HEADER_SAGA_TYPE]
        step = h[HEADER_STEP]
        purpose = h[HEADER_PURPOSE]
        reply_to = h[HEADER_REPLY_TO]
        raw_attempt = h[HEADER_ATTEMPT]
    except KeyError as e:
        raise RejectMessage(f"not a saga command (header {e} missing)") from None
    # ASCII digits only, bounded: int() would also read " 2", "1_0" and other scripts' digits
    if not (
        isinstance(raw_attempt, str)
        and 0 < len(raw_attempt) <= _MAX_ATTEMPT_DIGITS
        and raw_attempt.isascii()
        and raw_attempt.isdigit()
    ):
        raise RejectMessage(
            f"not a saga command (header {HEADER_ATTEMPT} is "
            f"{safe_text(repr(raw_attempt), 80)}, not an integer >= 1 in ASCII digits)"
        )
    attempt = int(raw_attempt)
    if purpose not in (ACTION, COMPENSATION):
        raise RejectMessage(
            f"not a saga command (header {HEADER_PURPOSE} is {safe_text(repr(purpose), 80)}, "
            f"not {ACTION!r} or {COMPENSATION!r})"
        )
    for name, value in (
        (HEADER_SAGA_ID, saga_id),
        (HEADER_SAGA_TYPE, saga_type),
        (HEADER_STEP, step),
    ):
        if not value:
            raise RejectMessage(f"not a saga command (header {name} is empty)")
    try:
        check_saga_id(saga_id)  # the orchestrator's rules: the id is a key and a header
    except EncodeError as e:
        raise RejectMessage(f"not a saga command (header {HEADER_SAGA_ID}: {e})") from None
    for name, value, most in (
        (HEADER_SAGA_TYPE, saga_type, 100),
        (HEADER_STEP, step, MAX_STEP_NAME),  # the orchestrator's limits, so the key fits
    ):
        if len(value) > most or _CONTROL.search(value) or (name == HEADER_STEP and ":" in value):
            raise RejectMessage(
                f"not a saga command (header {name} {safe_text(repr(value), 80)}: at most "
                f"{most} characters, no control character"
                + (", no ':')" if name == HEADER_STEP else ")")
            )
    if attempt < 1:
        raise RejectMessage(f"not a saga command (header {HEADER_ATTEMPT} is {attempt}, not >= 1)")
    try:
        check_name("topic", reply_to)
    except ConfigurationError as e:
        raise RejectMessage(f"not a saga command (header {HEADER_REPLY_TO}: {e})") from None
    key = idempotency_key(saga_id, step, purpose)
    sent = h.get(IDEMPOTENCY_KEY_HEADER)
    if sent is not None and sent != key:
        raise RejectMessage(
            f"saga command: header {IDEMPOTENCY_KEY_HEADER} {safe_text(repr(sent), 120)} is "
            f"not the key of saga {safe_text(repr(saga_id), 80)} step "
            f"{safe_text(repr(step), 80)} ({purpose}): {safe_text(repr(key), 200)}"
        )
    base = {
        "saga_id": saga_id,
        "saga_type": saga_type,
        "step": step,
        "purpose": purpose,
        "attempt": attempt,
    }
    return base, key, reply_to


#: the most digits of a ``sagaattempt`` header (attempts are counted by a retry policy)
_MAX_ATTEMPT_DIGITS = 18
_CONTROL = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")


def _new_token() -> str:
    return uuid.uuid4().hex


def _encode(reply: SagaReply, attempt: int) -> bytes:
    return json.dumps(
        {"ok": reply.ok, "data": reply.data, "reason": reply.reason, "attempt": attempt},
        separators=(",", ":"),
    ).encode()


#: stored under an action's key when its compensation is handled first (see mark_compensated)
_COMPENSATED = json.dumps(
    {
        "ok": False,
        "data": None,
        "reason": "already compensated",
        "attempt": 0,
        "compensated": True,
    },
    separators=(",", ":"),
).encode()


def _decode(response: bytes | None) -> dict[str, Any] | None:
    if response is None:
        return None
    try:
        value = json.loads(response)
        return {
            "ok": bool(value["ok"]),
            "data": value["data"],
            "reason": value["reason"],
            "attempt": int(value["attempt"]),
            "compensated": bool(value.get("compensated", False)),
        }
    except (ValueError, KeyError, TypeError):
        raise SagaError("stored saga reply is not readable") from None
