"""ASGI middleware for idempotency keys (Starlette, FastAPI or any ASGI 3 app), after the
IETF draft "The Idempotency-Key HTTP Header Field" (draft-ietf-httpapi-idempotency-key-header).

A plain ASGI middleware: it imports no framework, so it works without Starlette
installed; ``pip install "msdata[asgi]"`` brings Starlette for the apps themselves::

    app = FastAPI()
    app.add_middleware(
        IdempotencyMiddleware, keys=keys, owner=owner_from_header("x-api-key")
    )

On the configured methods and paths, a request with an ``Idempotency-Key`` header (an
sf-string, ``"…"``; a bare token is accepted too):

- is run once per (owner, key); the response (status, headers, body) is stored before its
  last body chunk is sent, so a client that has the whole response finds it stored;
- a retry gets the stored response with ``Idempotent-Replayed: true``;
- a retry while the first still runs: 409 Conflict (with ``Retry-After``);
- the key with a different request (method, path, query or body): 422 Unprocessable Content;
- no key where one is required: 400 Bad Request.

Errors are RFC 9457 problem details (``application/problem+json``). Responses whose status
``store_status`` rejects (default: 5xx) and handlers that raise before starting their
response release the key, so the client may retry. Once a response has started the key is
never released: a response that does not reach its last chunk (client gone, stream
raised) or whose body is over ``max_result_bytes`` is marked COMPLETED without being
stored, and retries get 500 ``…/response-not-stored``. A handler killed with its process
leaves the key IN_PROGRESS until its lease (``IdempotencyKeys(lease_seconds=…)``) ends;
then a retry runs it again.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from msdata.errors import (
    ConfigurationError,
    IdempotencyError,
    IdempotencyInProgress,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    MsdataError,
    ResultNotStored,
)
from msdata.idempotency.fingerprint import http_fingerprint
from msdata.idempotency.keys import IdempotencyClaim, IdempotencyKeys

__all__ = ["IdempotencyMiddleware", "owner_from_header"]

log = logging.getLogger("msdata.idempotency")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: a function of the ASGI scope giving the request's owner (None: unknown, refused)
OwnerOf = Callable[[Scope], "str | Awaitable[str | None] | None"]

_PROBLEM_TYPE = "tag:msdata,2026:idempotency/"


def owner_from_header(name: str, *, hashed: bool = True) -> OwnerOf:
    """The owner is the value of request header ``name`` (e.g. ``authorization``,
    ``x-api-key``, a tenant header set by the gateway); with ``hashed`` (the default) its
    sha256, so a credential is never stored. A request without it, or with only blanks in
    it (RFC 9110 section 5.5: leading and trailing whitespace is not part of a field value),
    has no owner (400)."""
    wanted = name.lower().encode("latin-1")

    def owner(scope: Scope) -> str | None:
        for k, v in scope.get("headers", ()):
            if k.lower() == wanted:
                v = v.strip(b" \t")
                if v:
                    return hashlib.sha256(v).hexdigest() if hashed else v.decode("latin-1")
        return None

    return owner


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z:/]+")
_SF_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')


def _parse_key(raw: bytes) -> str | None:
    """The key from one header value: an sf-string (RFC 8941 section 3.3.3: ``"…"`` of
    printable ASCII with ``\\"`` and ``\\\\`` escapes), or, for clients that send it
    unquoted, a bare token (RFC 9110 tchar, plus ``:`` and ``/``). None when it is neither
    (a list, parameters, an unterminated string, other bytes): the caller answers 400."""
    try:
        text = raw.decode("ascii").strip(" \t")
    except UnicodeDecodeError:
        return None
    if not text:
        return ""  # an empty header: no key
    m = _SF_STRING.fullmatch(text)
    if m is not None:
        return re.sub(r"\\([\"\\])", r"\1", m.group(1))
    if _TOKEN.fullmatch(text):
        return text
    return None


class IdempotencyMiddleware:
    """See the module docstring.

    - ``keys``: the :class:`IdempotencyKeys` (store, lease, retention, size limit).
    - ``owner``: function of the ASGI scope (sync or async) giving the request's owner
      (tenant, user, API client); part of the key, so one owner never sees another's
      response. :func:`owner_from_header` covers the common cases.
    - ``methods``: the methods covered (default POST and PATCH); ``paths``: None for every
      path, or path prefixes (``str``) and patterns (``re.Pattern``, full match).
    - ``required``: a covered request without a key gets 400 (else it just runs).
    - ``store_status(status) -> bool``: which responses are stored (default: below 500).
    - ``max_body_bytes``: the largest request body read (bytes; larger: 413).
    - ``header`` / ``replay_header``: the request header carrying the key, and the
      response header marking a replay.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: IdempotencyKeys,
        owner: OwnerOf,
        methods: Sequence[str] = ("POST", "PATCH"),
        paths: Sequence[str | re.Pattern[str]] | None = None,
        required: bool = True,
        store_status: Callable[[int], bool] = lambda status: status < 500,
        max_body_bytes: int = 1 << 20,
        header: str = "Idempotency-Key",
        replay_header: str = "Idempotent-Replayed",
    ) -> None:
        if not callable(owner):
            raise ConfigurationError("owner must be a function of the ASGI scope")
        self.app = app
        self.keys = keys
        self.owner = owner
        self.methods = frozenset(m.upper() for m in methods)
        self.paths = None if paths is None else tuple(paths)
        self.required = required
        self.store_status = store_status
        self.max_body_bytes = max_body_bytes
        self._header = header.lower().encode("latin-1")
        self._replay_header = (replay_header.lower().encode("latin-1"), b"true")

    def _covers(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope["method"] not in self.methods:
            return False
        if self.paths is None:
            return True
        path: str = scope["path"]
        for p in self.paths:
            if isinstance(p, str):
                if path.startswith(p):
                    return True
            elif p.fullmatch(path):
                return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._covers(scope):
            await self.app(scope, receive, send)
            return
        raws = [v for k, v in scope["headers"] if k.lower() == self._header]
        key: str | None = ""
        if len(raws) > 1:
            key = None
        elif raws:
            key = _parse_key(raws[0])
        if key is None:
            await _problem(
                send, 400, "key-invalid", "Idempotency-Key invalid",
                "The Idempotency-Key header must appear once, as one quoted string "
                '(e.g. Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324").',
            )  # fmt: skip
            return
        if not key:
            if self.required:
                await _problem(
                    send, 400, "key-missing", "Idempotency-Key missing",
                    "This operation requires an Idempotency-Key header.",
                )  # fmt: skip
                return
            await self.app(scope, receive, send)
            return
        owner = self.owner(scope)
        if inspect.isawaitable(owner):
            owner = await owner
        if not isinstance(owner, str) or not owner.strip():  # None, "" or blank: unknown
            await _problem(
                send, 400, "owner-unknown", "Request owner unknown",
                "An idempotency key needs the request's owner (credentials or tenant).",
            )  # fmt: skip
            return
        body = await self._read_body(receive)
        if body is True:
            return
        if body is False:
            await _problem(
                send, 413, "body-too-large", "Request body too large",
                f"Requests with an idempotency key are limited to {self.max_body_bytes} bytes.",
            )  # fmt: skip
            return
        fp = http_fingerprint(scope["method"], scope["path"], scope.get("query_string", b""), body)
        try:
            claim = await self.keys.claim(key, scope=owner, fingerprint=fp)
        except IdempotencyInProgress:
            await _problem(
                send, 409, "in-progress", "Request in progress",
                "A request with this Idempotency-Key is still being processed; retry later.",
                extra=[(b"retry-after", b"1")],
            )  # fmt: skip
            return
        except IdempotencyKeyReused:
            await _problem(
                send, 422, "key-reused", "Idempotency-Key reused",
                "This Idempotency-Key was used with a different request.",
            )  # fmt: skip
            return
        except IdempotencyKeyMissing:  # pragma: no cover - checked above
            raise
        except IdempotencyError as e:
            await _problem(send, 400, "key-invalid", "Idempotency-Key invalid", str(e))
            return
        if claim.replayed:
            try:
                stored = claim.response()
            except ResultNotStored as e:
                await _problem(send, 500, "response-not-stored", "Response not stored", str(e))
                return
            await self._replay(stored, send)
            return
        await self._run(scope, receive, send, body, claim)

    async def _read_body(self, receive: Receive) -> bytes | bool:
        """The whole request body; False if it is over ``max_body_bytes``, True if the
        client disconnected before sending all of it (nothing to answer)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return True
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return False
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _replay(self, stored: bytes, send: Send) -> None:
        doc = json.loads(stored)
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in doc["h"]]
        headers.append(self._replay_header)
        await send({"type": "http.response.start", "status": doc["s"], "headers": headers})
        await send({"type": "http.response.body", "body": base64.b64decode(doc["b"])})

    async def _run(
        self, scope: Scope, receive: Receive, send: Send, body: bytes, claim: IdempotencyClaim
    ) -> None:
        sent_body = False

        async def replay_body() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        status = 500
        started = False
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        size = 0

        async def capture(message: Message) -> None:
            nonlocal status, headers, started, size
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                started = True
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                size += len(chunk)
                if size <= self.keys.max_result_bytes:  # else: counted, not kept
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    await self._end(claim, status, headers, chunks, size)
            await send(message)

        try:
            await self.app(scope, replay_body, capture)
        except BaseException as e:
            if not claim.done:
                await self._unfinished(claim, started, status, f"the handler raised {e!r}")
            raise
        if not claim.done:  # the app returned without finishing its response
            await self._unfinished(
                claim, started, status, "the response ended early (the client disconnected?)"
            )

    async def _unfinished(
        self, claim: IdempotencyClaim, started: bool, status: int, why: str
    ) -> None:
        """The response did not reach its last chunk. Before it started, the handler
        failed: release the key. Once it started, the handler returned and its effects
        are committed: never run it again; the key is COMPLETED without a response."""
        if not started or not self.store_status(status):
            await claim.release()
            return
        reason = f"the {status} response was not fully sent ({why}) and was not stored"
        log.warning("idempotency key %r: %s; retries get 500", claim.key, reason)
        try:
            await claim.complete_unstored(reason)
        except MsdataError as e:
            log.warning("idempotency key %r: marking it done failed: %s", claim.key, e)

    async def _end(
        self,
        claim: IdempotencyClaim,
        status: int,
        headers: list[tuple[bytes, bytes]],
        chunks: list[bytes],
        size: int,
    ) -> None:
        if not self.store_status(status):
            await claim.release()
            return
        limit = self.keys.max_result_bytes
        if size > limit:  # the body's own bytes are what the limit counts
            log.warning(
                "idempotency key %r: the response body of %d bytes is over the limit of %d "
                "bytes; the response is sent, retries get 500",
                claim.key,
                size,
                limit,
            )
            await claim.complete_unstored(f"response body of {size} bytes, limit {limit} bytes")
            return
        doc = {
            "s": status,
            "h": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in headers],
            "b": base64.b64encode(b"".join(chunks)).decode("ascii"),
        }
        await claim.complete(json.dumps(doc, separators=(",", ":")).encode(), size=size)


async def _problem(
    send: Send,
    status: int,
    kind: str,
    title: str,
    detail: str,
    *,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """An RFC 9457 problem details response."""
    body = json.dumps(
        {"type": _PROBLEM_TYPE + kind, "title": title, "status": status, "detail": detail}
    ).encode()
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
