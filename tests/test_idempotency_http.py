"""The ASGI middleware: in process (httpx's ASGI transport) for each rule, and end to end
over real HTTP: a FastAPI app served by uvicorn in a subprocess, 50 concurrent clients, and
a server SIGKILLed mid-request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from msdata.adapters.memory.idempotency import MemoryIdempotencyStore
from msdata.idempotency import IdempotencyKeys
from msdata.idempotency.asgi import IdempotencyMiddleware, owner_from_header
from msdata.testing import FakeClock, eventually

APP = str(Path(__file__).parent / "idempotency_app.py")
SRC = str(Path(__file__).resolve().parent.parent / "src")
PROBLEM = "application/problem+json"


# -- in process ---------------------------------------------------------------------------------


class Harness:
    def __init__(self) -> None:
        self.runs = 0
        self.gate: asyncio.Event | None = None
        self.clock = FakeClock()
        self.store = MemoryIdempotencyStore()
        self.keys = IdempotencyKeys(self.store, lease_seconds=30, clock=self.clock)
        app = FastAPI()

        @app.post("/pay")
        async def pay(request: Request) -> JSONResponse:
            self.runs += 1
            if self.gate is not None:
                await self.gate.wait()
            body = await request.json()
            return JSONResponse(
                {"run": self.runs, "amount": body["amount"]},
                status_code=201,
                headers={"x-run": str(self.runs)},
            )

        @app.post("/flaky")
        async def flaky() -> PlainTextResponse:
            self.runs += 1
            return PlainTextResponse("down", status_code=503)

        @app.post("/boom")
        async def boom() -> PlainTextResponse:
            self.runs += 1
            raise RuntimeError("handler failed")

        @app.post("/stream")
        async def stream(request: Request) -> StreamingResponse:
            self.runs += 1
            body = await request.body()

            async def chunks() -> AsyncIterator[bytes]:
                for part in (b"a", b"b", body):
                    yield part

            return StreamingResponse(chunks(), status_code=202, media_type="text/plain")

        @app.post("/free/pay")
        async def free() -> PlainTextResponse:
            self.runs += 1
            return PlainTextResponse(str(self.runs))

        app.add_middleware(
            IdempotencyMiddleware,
            keys=self.keys,
            owner=owner_from_header("x-api-key"),
            paths=("/pay", "/flaky", "/boom", "/stream"),
            max_body_bytes=1000,
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
            base_url="http://test",
        )

    async def post(self, path: str, key: str | None, amount: int = 10, who: str = "alice") -> Any:
        headers = {"x-api-key": who}
        if key is not None:
            headers["Idempotency-Key"] = key
        return await self.client.post(path, json={"amount": amount}, headers=headers)


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    harness = Harness()
    async with harness.client:
        yield harness


def _problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    doc: dict[str, Any] = r.json()
    assert doc["status"] == status and doc["type"] and doc["title"] and doc["detail"]
    return doc


async def test_a_retry_replays_status_body_and_headers(h: Harness) -> None:
    first = await h.post("/pay", '"k-1"')
    again = await h.post("/pay", '"k-1"')
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json() == {"run": 1, "amount": 10}
    assert again.headers["x-run"] == "1" and again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert h.runs == 1
    # the sf-string and the bare token are the same key
    assert (await h.post("/pay", "k-1")).headers["idempotent-replayed"] == "true"


async def test_missing_key_400_reused_key_422(h: Harness) -> None:
    assert "Idempotency-Key" in _problem(await h.post("/pay", None), 400)["detail"]
    await h.post("/pay", "k-2", amount=10)
    _problem(await h.post("/pay", "k-2", amount=11), 422)
    assert h.runs == 1


async def test_malformed_or_repeated_key_headers_get_400(h: Harness) -> None:
    bad = [
        [("Idempotency-Key", '"a"'), ("Idempotency-Key", '"b"')],  # two header lines
        [("Idempotency-Key", '"a", "b"')],  # a list
        [("Idempotency-Key", "a, b")],
        [("Idempotency-Key", '"unterminated')],
        [("Idempotency-Key", '"a";param=1')],
        [("Idempotency-Key", "two words")],
    ]
    for headers in bad:
        r = await h.client.post("/pay", json={"amount": 1}, headers=[("x-api-key", "a"), *headers])
        assert _problem(r, 400)["type"].endswith("/key-invalid"), headers
    assert h.runs == 0
    # an escaped quote inside the sf-string is part of the key
    r = await h.post("/pay", '"k\\"q"')
    assert r.status_code == 201 and h.runs == 1
    assert await h.store.get(owner("alice"), 'k"q') is not None


async def test_a_retry_while_the_first_runs_gets_409(h: Harness) -> None:
    h.gate = asyncio.Event()
    first = asyncio.ensure_future(h.post("/pay", "k-3"))
    await eventually(lambda: h.runs == 1, what="the first request runs")
    r = await h.post("/pay", "k-3")
    _problem(r, 409)
    assert r.headers["retry-after"]
    h.gate.set()
    assert (await first).status_code == 201
    assert (await h.post("/pay", "k-3")).headers["idempotent-replayed"] == "true"
    assert h.runs == 1


async def test_owners_never_see_each_others_responses(h: Harness) -> None:
    a = await h.post("/pay", "same", who="alice")
    b = await h.post("/pay", "same", who="bob")
    assert a.json()["run"] == 1 and b.json()["run"] == 2
    assert "idempotent-replayed" not in b.headers
    r = await h.client.post("/pay", json={"amount": 10}, headers={"Idempotency-Key": "x"})
    _problem(r, 400)  # no owner: refused
    for blank in ("", "   "):  # an owner function returning a blank string: no owner either
        mw = IdempotencyMiddleware(lambda *_: None, keys=h.keys, owner=lambda scope, b=blank: b)
        c = httpx.AsyncClient(transport=httpx.ASGITransport(app=mw), base_url="http://t")
        async with c:
            r = await c.post("/pay", headers={"Idempotency-Key": "x"})
        assert _problem(r, 400)["type"].endswith("/owner-unknown")
    header_owner = owner_from_header("x-api-key")  # a header of blanks is no owner
    for value in (b"", b"  ", b" \t "):
        assert header_owner({"headers": [(b"x-api-key", value)]}) is None
    assert header_owner({"headers": [(b"x-api-key", b" k ")]}) == owner("k")


async def test_server_errors_and_exceptions_release_the_key(h: Harness) -> None:
    assert (await h.post("/flaky", "k-4")).status_code == 503
    assert (await h.post("/flaky", "k-4")).status_code == 503
    assert (await h.post("/boom", "k-5")).status_code == 500
    assert (await h.post("/boom", "k-5")).status_code == 500
    assert h.runs == 4
    assert await h.store.get(owner("alice"), "k-4") is None


async def test_a_crashed_request_frees_the_key_after_its_lease(h: Harness) -> None:
    claim = await h.keys.claim("k-6", scope=owner("alice"), fingerprint="whatever")
    assert not claim.replayed
    _problem(await h.post("/pay", "k-6"), 422)  # another request holds it
    h.clock.advance(30)
    assert (await h.post("/pay", "k-6")).status_code == 201


async def test_streamed_bodies_both_ways_and_the_body_limit(h: Harness) -> None:
    async def body() -> AsyncIterator[bytes]:
        for part in (b"x" * 300, b"y" * 300):
            yield part

    headers = {"x-api-key": "alice", "Idempotency-Key": "s-1"}
    first = await h.client.post("/stream", content=body(), headers=headers)
    again = await h.client.post("/stream", content=b"x" * 300 + b"y" * 300, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.content == again.content == b"ab" + b"x" * 300 + b"y" * 300
    assert again.headers["idempotent-replayed"] == "true" and h.runs == 1
    big = await h.client.post(
        "/stream", content=b"z" * 1001, headers={**headers, "Idempotency-Key": "s-2"}
    )
    _problem(big, 413)
    assert h.runs == 1


async def test_uncovered_paths_and_methods_pass_through(h: Harness) -> None:
    assert (await h.client.post("/free/pay")).status_code == 200
    assert (await h.client.post("/free/pay")).text == "2"
    assert (await h.client.get("/pay")).status_code == 405


def owner(name: str) -> str:
    import hashlib

    return hashlib.sha256(name.encode()).hexdigest()


# -- over real HTTP: uvicorn in a subprocess ----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, tmp: Path, lease: float, delay: float) -> None:
        self.db, self.count = tmp / "idem.db", tmp / "runs.txt"
        self.lease, self.delay = lease, delay
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, delay: float | None = None) -> None:
        env = dict(
            os.environ,
            PYTHONPATH=SRC,
            IDEM_DB=str(self.db),
            IDEM_COUNT=str(self.count),
            IDEM_LEASE=str(self.lease),
            IDEM_DELAY=str(self.delay if delay is None else delay),
        )
        # starting the server does not wait for it
        self.proc = subprocess.Popen([sys.executable, APP, str(self.port)], env=env)  # noqa: ASYNC220

        async def up() -> bool:
            try:
                async with httpx.AsyncClient() as c:
                    await c.get(self.url + "/docs")
                return True
            except httpx.HTTPError:
                return False

        await eventually(up, timeout=30, interval=0.1, what="the server answers")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def runs(self) -> int:
        return len(self.count.read_text().splitlines()) if self.count.exists() else 0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path, lease=2.0, delay=0.5)
    yield s
    if s.proc is not None and s.proc.poll() is None:
        s.kill()


def _post(c: httpx.AsyncClient, url: str, key: str, amount: int) -> Any:
    return c.post(
        url + "/payments",
        json={"amount": amount},
        headers={"Idempotency-Key": f'"{key}"', "x-api-key": "client-1"},
    )


@pytest.mark.slow
async def test_fifty_concurrent_posts_run_the_handler_once(server: Server) -> None:
    await server.start()
    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(timeout=30, limits=limits) as c:
        rs = await asyncio.gather(*(_post(c, server.url, "pay-1", 100) for _ in range(50)))
        ok = [r for r in rs if r.status_code == 201]
        busy = [r for r in rs if r.status_code == 409]
        assert len(ok) + len(busy) == 50, [r.status_code for r in rs]
        assert ok and len({r.content for r in ok}) == 1
        assert len({r.headers["x-payment-id"] for r in ok}) == 1
        assert all(r.headers["content-type"] == PROBLEM for r in busy)
        assert server.runs() == 1
        # after it finished, every retry is a replay of the same response
        again = await _post(c, server.url, "pay-1", 100)
        assert again.status_code == 201 and again.content == ok[0].content
        assert again.headers["idempotent-replayed"] == "true"
        different = await _post(c, server.url, "pay-1", 999)
        assert different.status_code == 422
        assert json.loads(different.content)["status"] == 422
    assert server.runs() == 1


@pytest.mark.slow
async def test_a_killed_handler_leaves_the_key_claimable_after_its_lease(server: Server) -> None:
    await server.start(delay=60)  # the handler would take a minute
    async with httpx.AsyncClient(timeout=30) as c:
        hanging = asyncio.ensure_future(_post(c, server.url, "pay-2", 5))
        await eventually(lambda: server.runs() == 1, what="the handler started")
        server.kill()
        with pytest.raises(httpx.HTTPError):
            await hanging
        await server.start(delay=0)

        async def claimable() -> bool:
            r = await _post(c, server.url, "pay-2", 5)
            assert r.status_code in (201, 409), r.text
            return r.status_code == 201

        await eventually(claimable, timeout=20, interval=0.2, what="the key is claimable again")
        assert server.runs() == 2
        r = await _post(c, server.url, "pay-2", 5)
        assert r.headers["idempotent-replayed"] == "true"


# -- raw ASGI: responses that do not reach their last chunk -------------------------------------


class Raw:
    """A raw ASGI app under the middleware, called directly (no HTTP client in between)."""

    def __init__(self, app: Any, **kw: Any) -> None:
        self.keys = IdempotencyKeys(MemoryIdempotencyStore(), clock=FakeClock(), **kw)
        self.mw = IdempotencyMiddleware(app, keys=self.keys, owner=owner_from_header("x"))

    async def call(self, key: bytes = b"k", disconnect: bool = False) -> list[Any]:
        scope = {
            "type": "http", "method": "POST", "path": "/p", "query_string": b"",
            "headers": [(b"x", b"a"), (b"idempotency-key", key)],
        }  # fmt: skip
        messages: list[Any] = [{"type": "http.request", "body": b"", "more_body": False}]
        if disconnect:
            messages.append({"type": "http.disconnect"})
        sent: list[Any] = []

        async def receive() -> Any:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(m: Any) -> None:
            sent.append(m)

        with contextlib.suppress(RuntimeError):  # the handler's own error, re-raised
            await self.mw(scope, receive, send)
        return sent


def _status(sent: list[Any]) -> tuple[int, Any]:
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body) if sent[0]["status"] >= 400 else body


async def test_a_handler_that_raises_mid_stream_is_not_run_again() -> None:
    runs: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        runs.append(1)
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part1", "more_body": True})
        raise RuntimeError("died mid-stream")

    raw = Raw(app)
    assert _status(await raw.call()) == (200, b"part1")
    for _ in range(2):
        status, doc = _status(await raw.call())
        assert status == 500 and doc["type"].endswith("/response-not-stored")
    assert runs == [1]


async def test_a_client_that_disconnects_mid_stream_does_not_rerun_the_handler() -> None:
    runs: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        runs.append(1)
        await receive()  # the body
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"chunk0", "more_body": True})
        if (await receive())["type"] == "http.disconnect":
            return  # what Starlette's StreamingResponse does when the client goes away

    raw = Raw(app)
    await raw.call(disconnect=True)
    status, doc = _status(await raw.call())
    assert status == 500 and doc["type"].endswith("/response-not-stored")
    assert runs == [1]


async def test_a_handler_that_fails_before_responding_releases_the_key() -> None:
    runs: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        runs.append(1)
        raise RuntimeError("no response")

    raw = Raw(app)
    await raw.call()
    await raw.call()
    assert runs == [1, 1]


async def test_the_size_limit_counts_the_response_body_bytes() -> None:
    runs: list[int] = []
    size = {"n": 10}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        runs.append(1)
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"a", b"b")]})
        await send({"type": "http.response.body", "body": b"x" * size["n"]})

    raw = Raw(app, max_result_bytes=10)
    await raw.call(b"fits")
    replay = await raw.call(b"fits")
    assert _status(replay) == (200, b"x" * 10) and runs == [1]
    size["n"] = 11
    assert _status(await raw.call(b"over")) == (200, b"x" * 11)
    status, doc = _status(await raw.call(b"over"))
    assert status == 500 and doc["type"].endswith("/response-not-stored") and runs == [1, 1]
