"""The idempotency-key state machine, written once over :class:`IdempotencyStore`.

A key (scoped to its owner) is claimed by one atomic conditional write; the operation runs
only for the claim that won; its result is stored (COMPLETED) and replayed to every retry
until its retention ends; a failure releases the key unless it is one of the configured
final errors, which are stored and replayed like results. Model: Powertools for AWS
Lambda, ``idempotency/persistence/base.py``; Stripe's idempotency keys.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar, cast

from pydantic import TypeAdapter
from pydantic_core import PydanticSerializationError, SchemaValidator, from_json

from msdata import telemetry
from msdata.clock import SYSTEM_CLOCK, Clock, SystemClock
from msdata.errors import (
    ConfigurationError,
    IdempotencyError,
    IdempotencyInProgress,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    MsdataError,
    ResultNotStored,
    StoredResultInvalid,
    StoredResultTooLarge,
)
from msdata.idempotency.fingerprint import fingerprint as _fingerprint
from msdata.idempotency.store import IdempotencyStore, LiveRecord
from msdata.serialization import _FFFD_LEAD, _LONG_DIGITS, MAX_INT_DIGITS, json_problem
from msdata.storage import unix_us
from msdata.transport import is_utf8

__all__ = ["IdempotencyClaim", "IdempotencyKeys", "IdempotentCall"]

log = logging.getLogger("msdata.idempotency")

T = TypeVar("T")

# the first byte of a stored response says what follows
_RESULT, _ERROR, _TOO_LARGE, _NOT_STORED = b"R", b"E", b"T", b"N"
_MAX_KEY = 255
_NOTHING: Any = object()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class _Tokens:
    """Claim tokens: unique across processes (a random prefix per process, new after a
    fork) and cheap (a counter). Passed to the store as its token factory: a store that
    reads first (SQLite, memory) makes none on a replay."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):x}"


_token = _Tokens()


@functools.lru_cache(maxsize=256)
def _adapter(tp: Any) -> TypeAdapter[Any]:
    return TypeAdapter(tp)


def _type_adapter(tp: Any) -> TypeAdapter[Any]:
    try:
        return _adapter(tp)
    except TypeError:  # unhashable annotation
        return TypeAdapter(tp)


_validators: dict[Any, Any] = {}


def _validator(tp: Any) -> Any:
    """The core validator of ``tp`` (one dict look-up on a replay; TypeAdapter's Python
    wrapper costs a microsecond)."""
    try:
        return _validators[tp]
    except (KeyError, TypeError):  # new, or an unhashable annotation
        validator = _type_adapter(tp).validator
        try:
            # a deferred adapter's stand-in (a forward reference) is looked up again
            if isinstance(validator, SchemaValidator) and len(_validators) < 256:
                _validators[tp] = validator
        except TypeError:
            pass
        return validator


_CONTROL = re.compile("[\x00-\x1f\x7f]")
_RESULT_BYTE = _RESULT[0]

#: scopes that passed _check (a set look-up on the next call of each owner; bounded)
_scopes: set[str] = set()


def _remember(scope: str) -> None:
    if len(_scopes) >= 4096:
        _scopes.clear()
    _scopes.add(scope)


def _check(key: str | None, scope: str) -> str:
    """A key is a str of 1-255 characters with no control character (U+0000-U+001F,
    U+007F) nor lone surrogate: IdempotencyKeyMissing / IdempotencyError (HTTP 400). A scope
    is a str with no control character nor lone surrogate: ConfigurationError. Checked
    before any store sees them (PostgreSQL cannot store NUL)."""
    # the common case in a few C calls (a replay's whole check): printable ASCII has no
    # control character; a scope checked once is remembered (owners recur, keys do not)
    if (
        type(key) is str
        and type(scope) is str
        and 0 < len(key) <= _MAX_KEY
        and key.isascii()
        and key.isprintable()
    ):
        if scope in _scopes:
            return key
        if not scope or (scope.isascii() and scope.isprintable() and not scope.isspace()):
            _remember(scope)
            return key
    if key is None or key == "":
        raise IdempotencyKeyMissing("an idempotency key is required and none was given")
    if not isinstance(key, str) or len(key) > _MAX_KEY:
        raise IdempotencyError(f"an idempotency key is a string of 1-{_MAX_KEY} characters")
    if _CONTROL.search(key):
        raise IdempotencyError(f"an idempotency key holds no control character, got {key!r}")
    if not is_utf8(key):
        raise IdempotencyError(f"an idempotency key is UTF-8 text, got a lone surrogate: {key!r}")
    if not isinstance(scope, str):
        raise ConfigurationError(f"scope must be a string, not {type(scope).__qualname__}")
    if _CONTROL.search(scope):
        raise ConfigurationError(f"a scope holds no control character, got {scope!r}")
    if not is_utf8(scope):
        raise ConfigurationError(f"a scope is UTF-8 text, got a lone surrogate: {scope!r}")
    if scope and not scope.strip():
        raise ConfigurationError(
            'a scope is "" (one scope for every caller) or an owner with a visible '
            f"character, got {scope!r}"
        )
    _remember(scope)
    return key


@dataclass(slots=True)
class IdempotencyClaim:
    """What :meth:`IdempotencyKeys.claim` returns.

    ``replayed``: the key was COMPLETED; ``stored`` is the stored response (with its
    one-byte kind) and nothing must run. Otherwise this claim holds the key (IN_PROGRESS
    for ``keys.lease`` from the claim) and must end with exactly one of ``complete``,
    ``fail`` or ``release`` (or their sync forms), on the same ``conn``.
    """

    keys: IdempotencyKeys
    scope: str
    key: str
    token: str
    conn: Any
    stored: bytes | None = None
    done: bool = field(default=False, init=False)

    @property
    def replayed(self) -> bool:
        return self.stored is not None

    def response(self) -> bytes:
        """A replay's stored payload (as given to ``complete``). Raises
        ResultNotStored if the first call's result could not be stored
        (StoredResultTooLarge: it was over ``max_result_bytes``), and
        IdempotencyError if the first call ended with a stored error (use
        :meth:`IdempotencyKeys.run` to have it raised again as itself)."""
        if self.stored is None:
            raise IdempotencyError("this claim holds the key: there is no stored response")
        return _payload(self.stored, self.key)

    # -- ending a claim ------------------------------------------------------------------

    def _end(self) -> None:
        if self.stored is not None:
            raise IdempotencyError("a replayed claim holds nothing to complete or release")
        if self.done:
            raise IdempotencyError(f"the claim of key {self.key!r} has already ended")
        self.done = True

    def _body(self, kind: bytes, payload: bytes, size: int | None = None) -> bytes:
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError(
                f"the result to store is bytes (e.g. JSON), not {type(payload).__qualname__}"
            )
        limit = self.keys.max_result_bytes
        n = len(payload) if size is None else size
        if n > limit:
            return _TOO_LARGE + f"{n} bytes, limit {limit} bytes".encode()
        return kind + payload

    def _completed(self, ok: bool, body: bytes) -> None:
        if not ok:
            log.warning(
                "idempotency key %r (scope %r): the lease ran out before the operation "
                "completed and another claim took the key; the result was not stored "
                "(lease_seconds must exceed the longest run)",
                self.key,
                self.scope,
            )
        if body[:1] == _TOO_LARGE:
            raise StoredResultTooLarge(f"key {self.key!r}: result of {body[1:].decode()}")

    async def complete(self, payload: bytes, *, size: int | None = None) -> None:
        """Store ``payload`` (bytes) as the key's result, COMPLETED for the retention.
        A payload over ``max_result_bytes`` is not stored: the key is marked COMPLETED
        with a note instead (retries get StoredResultTooLarge, the operation does not run
        again) and StoredResultTooLarge is raised here too. ``size``: the bytes to count
        against the limit, when ``payload`` wraps the result (default ``len(payload)``)."""
        body = self._body(_RESULT, payload, size)  # a payload that is not bytes: TypeError
        self._end()
        ok = await self.keys.store.complete_async(
            self.conn, self.scope, self.key, self.token, body, self.keys._retain_until()
        )
        self._completed(ok, body)

    def complete_sync(self, payload: bytes, *, size: int | None = None) -> None:
        """:meth:`complete` for sync callers."""
        body = self._body(_RESULT, payload, size)  # a payload that is not bytes: TypeError
        self._end()
        ok = self.keys.store.complete(
            self.conn, self.scope, self.key, self.token, body, self.keys._retain_until()
        )
        self._completed(ok, body)

    async def complete_unstored(self, reason: str) -> None:
        """The operation ran but its result cannot be stored (``reason`` says why): mark
        the key COMPLETED without a result, so retries get ResultNotStored and the
        operation does not run again."""
        self._end()
        body = _NOT_STORED + reason.encode()
        ok = await self.keys.store.complete_async(
            self.conn, self.scope, self.key, self.token, body, self.keys._retain_until()
        )
        self._completed(ok, body)

    def complete_unstored_sync(self, reason: str) -> None:
        """:meth:`complete_unstored` for sync callers."""
        self._end()
        body = _NOT_STORED + reason.encode()
        ok = self.keys.store.complete(
            self.conn, self.scope, self.key, self.token, body, self.keys._retain_until()
        )
        self._completed(ok, body)

    async def fail(self, error: BaseException) -> None:
        """Store ``error`` as the key's final result (replayed by raising it again)."""
        self._end()
        body = self._body(_ERROR, _dump_error(error))
        ok = await self.keys.store.complete_async(
            self.conn, self.scope, self.key, self.token, body, self.keys._retain_until()
        )
        self._completed(ok, body)

    def fail_sync(self, error: BaseException) -> None:
        self._end()
        body = self._body(_ERROR, _dump_error(error))
        ok = self.keys.store.complete(
            self.conn, self.scope, self.key, self.token, body, self.keys._retain_until()
        )
        self._completed(ok, body)

    async def failed(self, error: BaseException, final: tuple[type[BaseException], ...]) -> None:
        """The operation raised ``error``: store it if it is one of ``final``, else
        release the key. A store error here is logged, never raised: ``error`` is what
        the caller must see (in the caller's transaction the store's statement fails when
        ``error`` has already aborted it; the rollback then removes the claim)."""
        if final and isinstance(error, final):
            try:
                await self.fail(error)
            except MsdataError as e:
                self._release_failed(e)
        else:
            await self.release()

    def failed_sync(self, error: BaseException, final: tuple[type[BaseException], ...]) -> None:
        """:meth:`failed` for sync callers."""
        if final and isinstance(error, final):
            try:
                self.fail_sync(error)
            except MsdataError as e:
                self._release_failed(e)
        else:
            self.release_sync()

    async def release(self) -> None:
        """Give the key up: the operation failed, a retry may run it again at once."""
        self._end()
        try:
            await self.keys.store.release_async(self.conn, self.scope, self.key, self.token)
        except MsdataError as e:
            self._release_failed(e)

    def release_sync(self) -> None:
        self._end()
        try:
            self.keys.store.release(self.conn, self.scope, self.key, self.token)
        except MsdataError as e:
            self._release_failed(e)

    def _release_failed(self, e: MsdataError) -> None:
        # in the caller's transaction the release fails when that transaction is already
        # aborted: it rolls back, claim included; in the store's own mode the lease expires
        level = logging.DEBUG if self.conn is not None else logging.WARNING
        log.log(
            level,
            "idempotency key %r: storing the failure failed (%s); the key is free again when "
            "its lease ends (or at once, if its transaction rolls back)",
            self.key,
            e,
        )


def _payload(stored: bytes, key: str) -> bytes:
    """A stored response's result payload; the error its kind stands for otherwise
    (see :meth:`IdempotencyClaim.response`)."""
    kind, payload = stored[:1], stored[1:]
    if kind == _RESULT:
        return payload
    if kind == _TOO_LARGE:
        raise StoredResultTooLarge(
            f"key {key!r}: the first call ran, but its result ({payload.decode()}) "
            "was over the size limit and was not stored, so it cannot be replayed"
        )
    if kind == _NOT_STORED:
        raise ResultNotStored(
            f"key {key!r}: the first call ran, but its result could not be stored "
            f"({payload.decode()}), so it cannot be replayed"
        )
    if kind == _ERROR:
        raise IdempotencyError(f"key {key!r}: the first call failed: {payload.decode()}")
    raise IdempotencyError(f"key {key!r}: unreadable stored response")


def _dump_error(error: BaseException) -> bytes:
    name = f"{type(error).__module__}.{type(error).__qualname__}"
    try:
        return json.dumps({"type": name, "args": list(error.args)}).encode()
    except (TypeError, ValueError):
        return json.dumps({"type": name, "message": str(error)}).encode()


def _replayed(
    stored: bytes, key: str, result_type: Any, final: tuple[type[BaseException], ...]
) -> Any:
    """A replay's answer: the stored result validated as ``result_type``, or the stored
    error raised again (see :meth:`IdempotencyKeys.run`)."""
    if stored[:1] == _RESULT:
        payload = stored[1:]
    elif stored[:1] == _ERROR:
        raise _load_error(stored[1:], final, key)
    else:
        payload = _payload(stored, key)  # raises
    try:
        if result_type is Any:  # what validating as Any does, minus the validator's layers
            return from_json(payload)
        return _validator(result_type).validate_json(payload)
    except ValueError as e:  # pydantic's ValidationError, or JSON that does not parse
        raise StoredResultInvalid(
            f"key {key!r}: the stored result does not validate as {result_type!r} "
            f"(did the result type change since it was stored?): {e}"
        ) from e


def _load_error(
    payload: bytes, final_errors: tuple[type[BaseException], ...], key: str
) -> BaseException:
    doc = json.loads(payload)
    name = doc.get("type", "")
    seen: set[type[BaseException]] = set()
    todo = list(final_errors)
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        if f"{cls.__module__}.{cls.__qualname__}" == name:
            try:
                return cls(*doc["args"]) if "args" in doc else cls(doc.get("message", ""))
            except Exception:  # a constructor that takes other arguments
                break
        todo.extend(cls.__subclasses__())
    text = doc.get("message") or ", ".join(map(str, doc.get("args", [])))
    return IdempotencyError(f"key {key!r}: the first call failed with {name}: {text}")


class IdempotencyKeys:
    """Idempotency keys over a store: claim, run once, store, replay.

    - ``lease_seconds``: how long a claim holds a key IN_PROGRESS; a holder that crashed
      frees it when this runs out. Must exceed the longest run of the operation.
    - ``retention_seconds``: how long a COMPLETED result is replayed; afterwards the key is
      free again (Stripe keeps keys 24 hours, the default).
    - ``max_result_bytes``: the largest stored result (bytes of its JSON).
    - ``final_errors``: exception classes that are results (stored and raised again on
      every retry); any other exception, and cancellation, releases the key.
    - ``clock``: where ``now`` comes from (:class:`msdata.testing.FakeClock` in tests).

    Raises, from :meth:`claim`, :meth:`run` and the front ends: IdempotencyKeyMissing (no
    key), IdempotencyKeyReused (the key's stored fingerprint differs),
    IdempotencyInProgress (another claim holds a live lease), ResultNotStored (the first
    call ran but its result was over ``max_result_bytes`` — StoredResultTooLarge — or had
    no JSON form; the first caller got its result, a warning was logged),
    StoredResultInvalid (the stored result does not validate as ``result_type`` any more).
    """

    def __init__(
        self,
        store: IdempotencyStore,
        *,
        lease_seconds: float = 60.0,
        retention_seconds: float = 24 * 3600.0,
        max_result_bytes: int = 1 << 20,
        final_errors: tuple[type[BaseException], ...] = (),
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if lease_seconds <= 0 or retention_seconds <= 0:
            raise ConfigurationError("lease_seconds and retention_seconds must be > 0")
        if max_result_bytes < 1:
            raise ConfigurationError("max_result_bytes must be >= 1")
        if not all(isinstance(c, type) and issubclass(c, BaseException) for c in final_errors):
            raise ConfigurationError("final_errors must be a tuple of exception classes")
        self.store = store
        self.lease = timedelta(seconds=lease_seconds)
        self.retention = timedelta(seconds=retention_seconds)
        # the store's times: integer microseconds (exact; no datetime on a replay)
        self._lease_us = unix_us(_EPOCH + self.lease)
        self._retention_us = unix_us(_EPOCH + self.retention)
        self.max_result_bytes = max_result_bytes
        self.final_errors = tuple(final_errors)
        self.clock = clock

    @property
    def clock(self) -> Clock:
        """Where ``now`` comes from."""
        return self._clock

    @clock.setter
    def clock(self, clock: Clock) -> None:
        self._clock = clock
        # the clock in Unix nanoseconds: the system clock's own source (datetime.now reads
        # the same realtime clock) is one C call; any other clock goes through now()
        if type(clock) is SystemClock:
            self._time_ns: Callable[[], int] = time.time_ns
        else:
            self._time_ns = lambda: unix_us(clock.now()) * 1000

    def _retain_until(self) -> int:
        return self._time_ns() // 1000 + self._retention_us

    # -- the claim: one conditional write ----------------------------------------------------

    def _decide(
        self, found: str | LiveRecord, scope: str, key: str, fp: str, conn: Any
    ) -> IdempotencyClaim:
        """The claim for what the store's claim returned: this claim's token (it holds the
        key) or the live record."""
        if isinstance(found, str):
            telemetry.hooks.idempotency_claim(scope, "claimed")  # telemetry
            return IdempotencyClaim(self, scope, key, found, conn)
        stored = self._live(found, scope, key, fp)
        return IdempotencyClaim(self, scope, key, found[3], conn, stored)

    @staticmethod
    def _live(existing: LiveRecord, scope: str, key: str, fp: str) -> bytes:
        """The stored response of the live record a claim found; IdempotencyKeyReused
        or IdempotencyInProgress when there is none to replay."""
        stored_fp, completed, response, _ = existing
        if fp and stored_fp and stored_fp != fp:
            telemetry.hooks.idempotency_claim(scope, "conflict")  # telemetry
            raise IdempotencyKeyReused(
                f"idempotency key {key!r} was used before with a different request"
            )
        if not completed:
            telemetry.hooks.idempotency_claim(scope, "in_progress")  # telemetry
            raise IdempotencyInProgress(
                f"a request with idempotency key {key!r} is still in progress; retry later"
            )
        telemetry.hooks.idempotency_claim(scope, "replayed")  # telemetry
        return response or b""

    async def claim(
        self,
        key: str | None,
        *,
        scope: str = "",
        fingerprint: str = "",
        request: Any = _NOTHING,
        conn: Any = None,
    ) -> IdempotencyClaim:
        """Claim ``key`` for ``scope`` (one store call). Returns a claim that holds the key,
        or a replayed one carrying the stored response. ``fingerprint``: the request's
        hash (:func:`msdata.idempotency.fingerprint`), or ``request`` to hash it as
        :meth:`run` does; "" (here or stored) skips the comparison. ``conn``: run in
        the caller's open transaction (SQL/memory stores) instead of the store's own."""
        key = _check(key, scope)  # before the fingerprint: a bad key is the caller's 400
        if request is not _NOTHING and not fingerprint:
            fingerprint = _fingerprint(request)
        now = self._time_ns() // 1000
        found = await self.store.claim_async(
            conn, scope, key, fingerprint, now, now + self._lease_us, _token
        )
        return self._decide(found, scope, key, fingerprint, conn)

    def claim_sync(
        self,
        key: str | None,
        *,
        scope: str = "",
        fingerprint: str = "",
        request: Any = _NOTHING,
        conn: Any = None,
    ) -> IdempotencyClaim:
        """:meth:`claim` for sync callers (stores whose ``features.sync`` is True)."""
        key = _check(key, scope)  # before the fingerprint: a bad key is the caller's 400
        if request is not _NOTHING and not fingerprint:
            fingerprint = _fingerprint(request)
        now = self._time_ns() // 1000
        found = self.store.claim(conn, scope, key, fingerprint, now, now + self._lease_us, _token)
        return self._decide(found, scope, key, fingerprint, conn)

    # -- running an operation once ---------------------------------------------------------

    def _fingerprint(self, request: Any, fingerprint: str | None) -> str:
        if fingerprint is not None:
            return fingerprint
        return "" if request is _NOTHING else _fingerprint(request)

    def _replay(
        self, claim: IdempotencyClaim, result_type: Any, final: tuple[type[BaseException], ...]
    ) -> Any:
        return _replayed(claim.stored or b"", claim.key, result_type, final)

    @staticmethod
    def _dump(result: Any, result_type: Any) -> bytes | str:
        """The result's JSON (bytes), or why it has none (str)."""
        try:
            raw = _type_adapter(result_type).dump_json(result)
        except (PydanticSerializationError, ValueError, TypeError) as e:
            return f"the result ({type(result).__qualname__}) has no JSON form: {e}"
        # pydantic writes a float NaN and Infinity as null, a Decimal's as "NaN" and
        # "Infinity" (read back as a str, or refused as a Decimal), a dict key's lone
        # surrogate as U+FFFD, and an int beyond Python's int/str limit that no reader takes
        # back: a result that may hold one is looked at (RFC 8259 §6 has no NaN)
        if (
            b"null" in raw
            or _FFFD_LEAD in raw
            or b"NaN" in raw
            or b"Infinity" in raw
            or (len(raw) > MAX_INT_DIGITS and _LONG_DIGITS.search(raw))
        ):
            problem = json_problem(result)
            if problem is not None:
                return f"the result ({type(result).__qualname__}) has no JSON form: {problem}"
        return raw

    @staticmethod
    def _unstored(claim: IdempotencyClaim, e: ResultNotStored) -> None:
        log.warning("%s; the first caller gets its result, retries get this error", e)

    async def run(
        self,
        key: str | None,
        operation: Callable[[], Awaitable[T]],
        *,
        scope: str = "",
        request: Any = _NOTHING,
        fingerprint: str | None = None,
        result_type: Any = Any,
        conn: Any = None,
        final_errors: tuple[type[BaseException], ...] | None = None,
    ) -> T:
        """``await operation()`` at most once for (``scope``, ``key``) while it succeeds;
        every retry gets its stored result (validated as ``result_type``; pydantic/JSON).
        With the default ``Any`` a replay returns the stored JSON value as it is: a pydantic
        model the first call returned comes back as a dict, so pass its class.

        ``request``: what the fingerprint is made of (any JSON-able value); or pass the
        ``fingerprint`` itself. Errors: see the class docstring. A saga participant calls
        this with the step's own key and scope."""
        # claim() inline: a replay makes no IdempotencyClaim (nor, on a store that reads
        # first, a token); _check's common case inline. The key first: a bad key is the
        # caller's 400 even when the request cannot be fingerprinted either
        if not (
            type(key) is str
            and 0 < len(key) <= _MAX_KEY
            and key.isascii()
            and key.isprintable()
            and type(scope) is str
            and scope in _scopes
        ):
            key = _check(key, scope)
        if fingerprint is not None:
            fp = fingerprint
        else:
            fp = "" if request is _NOTHING else _fingerprint(request)
        now = self._time_ns() // 1000
        found = await self.store.claim_async(
            conn, scope, key, fp, now, now + self._lease_us, _token
        )
        if not isinstance(found, str):
            stored_fp, completed, response, _ = found
            # a stored result for this request (_live and _replayed's common case)
            if (
                completed
                and response
                and response[0] == _RESULT_BYTE
                and (not fp or not stored_fp or stored_fp == fp)
            ):
                telemetry.hooks.idempotency_claim(scope, "replayed")  # telemetry
                try:  # (annotated, not typing.cast: a call less on the replay path)
                    result: T = (
                        from_json(response[1:])
                        if result_type is Any
                        else _validator(result_type).validate_json(response[1:])
                    )
                    return result
                except ValueError:  # raised again as StoredResultInvalid
                    return cast(T, _replayed(response, key, result_type, ()))
            live = self._live(found, scope, key, fp)
            final = self.final_errors if final_errors is None else final_errors
            return cast(T, _replayed(live, key, result_type, final))
        final = self.final_errors if final_errors is None else final_errors
        claim = self._decide(found, scope, key, fp, conn)
        try:
            result = await operation()
        except BaseException as e:
            await claim.failed(e, final)
            raise
        await self._store_result(claim, result, result_type)
        return result

    async def _store_result(self, claim: IdempotencyClaim, result: Any, result_type: Any) -> None:
        # the operation ran: from here on the key is never released (a retry must not run
        # it again); a result that cannot be stored is noted instead (ResultNotStored)
        payload = self._dump(result, result_type)
        try:
            if isinstance(payload, str):
                await claim.complete_unstored(payload)
                raise ResultNotStored(f"key {claim.key!r}: {payload}; it was not stored")
            await claim.complete(payload)
        except ResultNotStored as e:
            self._unstored(claim, e)

    def _store_result_sync(self, claim: IdempotencyClaim, result: Any, result_type: Any) -> None:
        payload = self._dump(result, result_type)
        try:
            if isinstance(payload, str):
                claim.complete_unstored_sync(payload)
                raise ResultNotStored(f"key {claim.key!r}: {payload}; it was not stored")
            claim.complete_sync(payload)
        except ResultNotStored as e:
            self._unstored(claim, e)

    def run_sync(
        self,
        key: str | None,
        operation: Callable[[], T],
        *,
        scope: str = "",
        request: Any = _NOTHING,
        fingerprint: str | None = None,
        result_type: Any = Any,
        conn: Any = None,
        final_errors: tuple[type[BaseException], ...] | None = None,
    ) -> T:
        """:meth:`run` for a sync operation and a sync caller (``features.sync`` stores)."""
        final = self.final_errors if final_errors is None else final_errors
        key = _check(key, scope)
        fp = self._fingerprint(request, fingerprint)
        now = self._time_ns() // 1000
        found = self.store.claim(conn, scope, key, fp, now, now + self._lease_us, _token)
        if not isinstance(found, str):
            live = self._live(found, scope, key, fp)
            return cast(T, _replayed(live, key, result_type, final))
        claim = self._decide(found, scope, key, fp, conn)
        try:
            result = operation()
        except BaseException as e:
            claim.failed_sync(e, final)
            raise
        self._store_result_sync(claim, result, result_type)
        return result

    # -- context managers ------------------------------------------------------------------

    @asynccontextmanager
    async def call(
        self,
        key: str | None,
        *,
        scope: str = "",
        request: Any = _NOTHING,
        fingerprint: str | None = None,
        result_type: Any = Any,
        conn: Any = None,
        final_errors: tuple[type[BaseException], ...] | None = None,
    ) -> AsyncIterator[IdempotentCall[Any]]:
        """An idempotent block::

            async with keys.call(key, scope=user, request=body) as call:
                if not call.replayed:
                    call.result = await charge(body)
            return call.result

        On a replay ``call.result`` holds the stored result and the block must do nothing.
        On normal exit the block's ``call.result`` is stored; an exception releases the key
        (or is stored, if final). Errors as :meth:`run`.
        """
        final = self.final_errors if final_errors is None else final_errors
        claim = await self.claim(
            key,
            scope=scope,
            fingerprint=fingerprint or "",
            request=request if fingerprint is None else _NOTHING,
            conn=conn,
        )
        call: IdempotentCall[Any] = IdempotentCall(claim.replayed)
        if claim.replayed:
            call.result = self._replay(claim, result_type, final)
            yield call
            return
        try:
            yield call
        except BaseException as e:
            await claim.failed(e, final)
            raise
        await self._store_result(claim, call.result, result_type)

    @contextmanager
    def call_sync(
        self,
        key: str | None,
        *,
        scope: str = "",
        request: Any = _NOTHING,
        fingerprint: str | None = None,
        result_type: Any = Any,
        conn: Any = None,
        final_errors: tuple[type[BaseException], ...] | None = None,
    ) -> Iterator[IdempotentCall[Any]]:
        """:meth:`call` for sync callers."""
        final = self.final_errors if final_errors is None else final_errors
        claim = self.claim_sync(
            key,
            scope=scope,
            fingerprint=fingerprint or "",
            request=request if fingerprint is None else _NOTHING,
            conn=conn,
        )
        call: IdempotentCall[Any] = IdempotentCall(claim.replayed)
        if claim.replayed:
            call.result = self._replay(claim, result_type, final)
            yield call
            return
        try:
            yield call
        except BaseException as e:
            claim.failed_sync(e, final)
            raise
        self._store_result_sync(claim, call.result, result_type)

    # -- the decorator ---------------------------------------------------------------------

    def idempotent(
        self,
        *,
        key: str | Callable[..., str | None] = "idempotency_key",
        scope: str | Callable[..., str] | None = None,
        conn: str | None = None,
        exclude: tuple[str, ...] = (),
        fingerprint: Callable[..., str] | None = None,
        result_type: Any = _NOTHING,
        final_errors: tuple[type[BaseException], ...] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorate a sync or async function so it runs at most once per key.

        - ``key``: the name of the parameter holding the key, or a function of the
          decorated function's arguments returning it. A missing key raises
          IdempotencyKeyMissing.
        - ``scope``: the parameter holding the owner, or a function of the arguments;
          None: one scope for every caller. An owner that is None, "" or blank raises
          IdempotencyError (callers with no known owner are never merged).
        - ``conn``: the parameter holding the caller's connection (its transaction is
          joined); None: the store's own short transactions.
        - the fingerprint is the hash of every argument except ``conn``, ``exclude`` and
          a first parameter named ``self`` or ``cls`` (so methods work; every instance
          shares the keys: put what tells instances apart in ``scope``) (canonical JSON),
          or ``fingerprint(*args, **kwargs)``.
        - ``result_type``: how the stored result is validated on replay; by default the
          function's return annotation.
        """

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            sig = inspect.signature(fn)
            names = list(sig.parameters)
            for name in (key, scope, conn):
                if isinstance(name, str) and name not in names:
                    raise ConfigurationError(f"{fn.__qualname__} has no parameter {name!r}")
            rtype = result_type
            if rtype is _NOTHING:
                hints = inspect.get_annotations(fn, eval_str=True)
                rtype = hints.get("return", Any)
                if rtype is None:
                    rtype = type(None)
            skip = {conn, *exclude}
            if names and names[0] in ("self", "cls"):  # a method: the instance is no input
                skip.add(names[0])

            def prepare(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
                bound = sig.bind(*args, **kwargs)
                bound.apply_defaults()
                given = bound.arguments
                k = given[key] if isinstance(key, str) else key(*args, **kwargs)
                if scope is None:
                    s = ""
                else:
                    s = given[scope] if isinstance(scope, str) else scope(*args, **kwargs)
                    if s is None or (isinstance(s, str) and not s.strip()):
                        # an owner that is unknown must never merge callers into one scope
                        raise IdempotencyError(
                            f"{fn.__qualname__}: the scope (owner) is {s!r}: an idempotency "
                            "key needs a known owner"
                        )
                _check(k, s)  # before the fingerprint: a bad key is the caller's 400
                if fingerprint is not None:
                    fp = fingerprint(*args, **kwargs)
                else:
                    fp = _fingerprint({n: v for n, v in given.items() if n not in skip})
                return {
                    "key": k,
                    "scope": s,
                    "fingerprint": fp,
                    "result_type": rtype,
                    "conn": given[conn] if conn else None,
                    "final_errors": final_errors,
                }

            if inspect.iscoroutinefunction(fn):

                @functools.wraps(fn)
                async def run_async(*args: Any, **kwargs: Any) -> Any:
                    opts = prepare(args, kwargs)
                    k = opts.pop("key")
                    return await self.run(k, lambda: fn(*args, **kwargs), **opts)

                return run_async

            @functools.wraps(fn)
            def run_sync(*args: Any, **kwargs: Any) -> Any:
                opts = prepare(args, kwargs)
                k = opts.pop("key")
                return self.run_sync(k, lambda: fn(*args, **kwargs), **opts)

            return run_sync

        return decorate


class IdempotentCall(Generic[T]):
    """The handle a :meth:`IdempotencyKeys.call` block gets: ``replayed`` and ``result``."""

    __slots__ = ("replayed", "result")

    def __init__(self, replayed: bool) -> None:
        self.replayed = replayed
        self.result: Any = None
