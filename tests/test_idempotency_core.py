"""The front ends over the one state machine: decorator (sync and async), context manager,
fingerprints, result types, and the caller's transaction (effect and record together)."""

from __future__ import annotations

import math
import sqlite3
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from msdata.adapters.memory.idempotency import MemoryIdempotencyStore
from msdata.adapters.sqlite.idempotency import SqliteIdempotencyStore
from msdata.errors import (
    ConfigurationError,
    IdempotencyError,
    IdempotencyInProgress,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    ResultNotStored,
    StoredResultInvalid,
)
from msdata.idempotency import IdempotencyKeys, canonical_json, fingerprint, http_fingerprint
from msdata.testing import FakeClock


class Receipt(BaseModel):
    payment_id: uuid.UUID
    amount: int
    at: datetime


class Declined(Exception):
    pass


def _keys(**kw: Any) -> IdempotencyKeys:
    return IdempotencyKeys(MemoryIdempotencyStore(), clock=FakeClock(), **kw)


def test_fingerprints_are_canonical() -> None:
    assert canonical_json({"b": 1, "a": [1.5, "é"]}) == '{"a":[1.5,"é"],"b":1}'.encode()
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert len(fingerprint(Receipt(payment_id=uuid.uuid4(), amount=1, at=datetime.now(UTC)))) == 64
    with pytest.raises(ConfigurationError):
        fingerprint({"x": object()})
    with pytest.raises(ConfigurationError):
        fingerprint(float("nan"))
    assert http_fingerprint("post", "/a", b"", b"x") == http_fingerprint("POST", "/a", "", b"x")
    # the parts cannot run into each other
    assert http_fingerprint("POST", "/ab", b"", b"") != http_fingerprint("POST", "/a", b"b", b"")


async def test_async_decorator_replays_a_typed_result() -> None:
    keys = _keys()
    runs: list[int] = []

    @keys.idempotent(key="idempotency_key", scope="customer")
    async def pay(customer: str, amount: int, idempotency_key: str) -> Receipt:
        runs.append(amount)
        return Receipt(payment_id=uuid.uuid4(), amount=amount, at=datetime.now(UTC))

    first = await pay("c1", 10, idempotency_key="k")
    again = await pay("c1", 10, idempotency_key="k")
    assert isinstance(again, Receipt) and again == first and runs == [10]
    with pytest.raises(IdempotencyKeyReused):
        await pay("c1", 11, idempotency_key="k")
    with pytest.raises(IdempotencyKeyMissing):
        await pay("c1", 10, idempotency_key="")
    assert (await pay("c2", 10, idempotency_key="k")) != first  # another owner


def test_sync_decorator_with_key_function_and_final_errors() -> None:
    keys = _keys(final_errors=(Declined,))
    runs: list[str] = []

    @keys.idempotent(key=lambda order, **_: f"charge-{order['id']}", exclude=("note",))
    def charge(order: dict[str, Any], note: str = "") -> int:
        runs.append(order["id"])
        if order["id"] == "bad":
            raise Declined("card declined")
        if order["id"] == "flaky":
            raise TimeoutError("provider")
        return 42

    assert charge({"id": "o1"}) == 42
    assert charge({"id": "o1"}, note="a retry, not part of the request") == 42
    for _ in range(2):
        with pytest.raises(Declined, match="card declined"):
            charge({"id": "bad"})
    for _ in range(2):
        with pytest.raises(TimeoutError):
            charge({"id": "flaky"})
    assert runs == ["o1", "bad", "flaky", "flaky"]  # declined stored; a timeout released


def test_decorator_checks_its_parameters() -> None:
    keys = _keys()
    with pytest.raises(ConfigurationError):

        @keys.idempotent(key="nope")
        def f(idempotency_key: str) -> None: ...


async def test_the_context_manager() -> None:
    keys = _keys()
    runs = 0

    async def transfer(key: str) -> Any:
        nonlocal runs
        async with keys.call(key, scope="acct-1", request={"to": "acct-2", "cents": 500}) as call:
            if not call.replayed:
                runs += 1
                call.result = {"transfer": runs}
        return call.result

    assert await transfer("t-1") == {"transfer": 1}
    assert await transfer("t-1") == {"transfer": 1}
    assert runs == 1

    with pytest.raises(RuntimeError):
        async with keys.call("t-2", scope="acct-1") as call:
            raise RuntimeError("failed")
    async with keys.call("t-2", scope="acct-1") as call:  # released: runs again
        assert not call.replayed


async def test_in_progress_and_replayed_claims_cannot_be_ended() -> None:
    keys = _keys()
    claim = await keys.claim("k", scope="s")
    with pytest.raises(IdempotencyInProgress):
        await keys.claim("k", scope="s")
    with pytest.raises(IdempotencyError):
        claim.response()
    await claim.complete(b"1")
    with pytest.raises(IdempotencyError):
        await claim.complete(b"2")
    replay = await keys.claim("k", scope="s")
    assert replay.replayed and replay.response() == b"1"
    with pytest.raises(IdempotencyError):
        await replay.release()


async def test_joined_transaction_effect_and_record_commit_together(tmp_path: Path) -> None:
    """The claim, the effect and the COMPLETED record in the caller's one SQLite
    transaction: a rollback undoes all three, so the retry runs the effect once."""
    path = tmp_path / "shop.db"
    store = SqliteIdempotencyStore(path)
    await store.create_schema()
    setup = sqlite3.connect(path)
    setup.execute("CREATE TABLE payments (id TEXT, amount INT)")
    setup.commit()
    setup.close()
    keys = IdempotencyKeys(store, clock=FakeClock())

    @keys.idempotent(key="key", conn="conn")
    def pay(conn: sqlite3.Connection, key: str, amount: int, crash: bool = False) -> int:
        conn.execute("INSERT INTO payments VALUES (?, ?)", (key, amount))
        if crash:
            raise RuntimeError("crash after the effect")
        return amount

    conn = sqlite3.connect(path)
    try:
        with pytest.raises(RuntimeError):
            pay(conn, "p-1", 10, crash=True)
        conn.rollback()
        assert pay(conn, "p-1", 10) == 10
        conn.commit()
        assert pay(conn, "p-1", 10) == 10  # replayed: no second row
        conn.commit()
        assert conn.execute("SELECT count(*) FROM payments").fetchone() == (1,)
        idle = sqlite3.connect(path, isolation_level=None)
        with pytest.raises(ConfigurationError):
            pay(idle, "p-2", 10)
        idle.close()
    finally:
        conn.close()
        await store.close()


def test_keys_options_are_checked() -> None:
    store = MemoryIdempotencyStore()
    with pytest.raises(ConfigurationError):
        IdempotencyKeys(store, lease_seconds=0)
    with pytest.raises(ConfigurationError):
        IdempotencyKeys(store, final_errors=("ValueError",))  # type: ignore[arg-type]


def test_the_pattern_and_its_middleware_import_no_framework_or_driver() -> None:
    import json
    import subprocess
    import sys

    code = (
        "import sys, json\n"
        "import msdata.idempotency, msdata.idempotency.asgi, msdata.adapters.memory\n"
        "mods = ['starlette', 'fastapi', 'httpx', 'psycopg', 'asyncpg', 'redis', 'sqlite3']\n"
        "print(json.dumps([m for m in mods if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


async def test_stores_from_url(tmp_path: Path) -> None:
    from msdata.urls import store_from_url

    assert isinstance(store_from_url("idempotency", "memory://"), MemoryIdempotencyStore)
    lite = store_from_url("idempotency", f"sqlite:///{tmp_path}/i.db", table_prefix="x_")
    assert isinstance(lite, SqliteIdempotencyStore) and lite.table == "x_idempotency"
    await lite.close()


async def test_an_empty_fingerprint_is_not_compared() -> None:
    keys = _keys()
    claim = await keys.claim("k", scope="s")  # no fingerprint
    await claim.complete(b"1")
    assert (await keys.claim("k", scope="s", fingerprint="abc")).replayed
    claim = await keys.claim("k2", scope="s", fingerprint="abc")
    await claim.complete(b"2")
    assert (await keys.claim("k2", scope="s")).replayed
    with pytest.raises(IdempotencyKeyReused):
        await keys.claim("k2", scope="s", fingerprint="def")


def test_a_result_with_no_json_form_is_not_run_again_sync() -> None:
    keys = _keys()
    runs: list[int] = []

    @keys.idempotent(key="k")
    def charge(k: str) -> object:
        runs.append(1)
        return object()

    assert charge(k="w") is not None  # the first caller gets its result
    with pytest.raises(ResultNotStored):
        charge(k="w")
    with keys.call_sync("w2") as call:
        call.result = object()
    with pytest.raises(ResultNotStored), keys.call_sync("w2") as call:
        runs.append(2)  # pragma: no cover - a replay never enters the block
    assert runs == [1]


async def test_a_stored_result_that_no_longer_validates_raises_stored_result_invalid() -> None:
    keys = _keys()

    class Old(BaseModel):
        a: int

    class New(BaseModel):
        a: int
        b: int

    assert await keys.run("k", _ret(Old(a=1)), result_type=Old) == Old(a=1)
    with pytest.raises(StoredResultInvalid) as info:
        await keys.run("k", _ret(New(a=1, b=2)), result_type=New)
    assert info.value.__cause__ is not None


def _ret(value: Any) -> Any:
    async def op() -> Any:
        return value

    return op


async def test_a_blank_owner_never_merges_callers() -> None:
    keys = _keys()
    runs: list[str] = []

    @keys.idempotent(key="k", scope=lambda k, owner: owner)
    async def pay(k: str, owner: str | None) -> int:
        runs.append(k)
        return 1

    for blank in ("", "  ", None):
        with pytest.raises(IdempotencyError, match="owner"):
            await pay("k", blank)
    with pytest.raises(ConfigurationError):
        await keys.run("k", _ret(1), scope=" \u3000")
    assert runs == []
    assert await keys.run("k", _ret(1)) == 1  # "" is the one shared scope, as documented


async def test_the_decorator_works_on_methods() -> None:
    keys = _keys()

    class Payments:
        def __init__(self) -> None:
            self.n = 0

        @keys.idempotent(key="idempotency_key", scope="customer")
        async def charge(self, customer: str, cents: int, idempotency_key: str) -> int:
            self.n += 1
            return self.n

        @keys.idempotent(key="k")
        def refund(self, k: str) -> int:
            self.n += 10
            return self.n

    p = Payments()
    assert await p.charge("c", 5, idempotency_key="k") == 1
    assert await p.charge("c", 5, idempotency_key="k") == 1 and p.n == 1
    with pytest.raises(IdempotencyKeyReused):
        await p.charge("c", 6, idempotency_key="k")
    assert p.refund("r") == p.refund("r") == 11 and p.n == 11


async def test_nan_infinity_or_a_lone_surrogate_key_in_a_result_is_never_replayed_changed() -> None:
    """pydantic writes NaN and Infinity as null, and a dict key's lone surrogate as U+FFFD:
    such a result has no JSON form, so retries get ResultNotStored instead of other data."""
    keys = _keys()
    runs: list[int] = []

    @keys.idempotent(key="k")
    async def quote(k: str) -> Any:
        runs.append(1)
        return {"q1": {"price": math.inf}, "q2": [math.nan], "q3": {"\udc80": 1}}[k]

    for k in ("q1", "q2", "q3"):
        assert await quote(k) is not None  # the first caller gets its result
        with pytest.raises(ResultNotStored, match="no JSON form"):
            await quote(k)
    assert runs == [1, 1, 1]
    assert await keys.run("ok", _ret({"a": None})) == {"a": None}  # a real null is kept
    assert await keys.run("ok", _ret({"a": 2})) == {"a": None}


async def test_a_decimal_nan_or_an_int_beyond_the_digit_limit_is_never_replayed_changed() -> None:
    """pydantic writes a Decimal NaN or Infinity as the str "NaN"/"Infinity" (replayed as a
    str untyped, refused typed), and an int of more than 4300 digits that no reader takes
    back (docs/idempotency.md: a result with no JSON form gives ResultNotStored on retries,
    not StoredResultInvalid nor other data)."""
    keys = _keys()
    runs: list[int] = []
    results: dict[str, Any] = {
        "d1": Decimal("NaN"),
        "d2": {"total": Decimal("-Infinity")},
        "d3": [Decimal("sNaN")],
        "i1": 10**5000,
        "i2": {"n": -(10**4300)},
    }

    @keys.idempotent(key="k")
    async def quote(k: str) -> Any:
        runs.append(1)
        return results[k]

    for k in results:
        assert await quote(k) is not None  # the first caller gets its result
        with pytest.raises(ResultNotStored, match="no JSON form"):
            await quote(k)
    assert runs == [1] * len(results)
    typed = await keys.run("t", _ret(Decimal("Infinity")), result_type=Decimal)
    assert typed == Decimal("Infinity")
    with pytest.raises(ResultNotStored):
        await keys.run("t", _ret(Decimal(1)), result_type=Decimal)
    big = 10**4299  # 4300 digits: within the limit, stored and replayed
    await keys.run("ok", _ret({"n": big, "d": Decimal("1.5")}))
    assert await keys.run("ok", _ret(None)) == {"n": big, "d": "1.5"}


async def test_a_key_or_scope_with_a_lone_surrogate_is_refused_before_any_store() -> None:
    keys = _keys()
    with pytest.raises(IdempotencyError, match="surrogate"):
        await keys.run("a\udc80", _ret(1))
    with pytest.raises(ConfigurationError, match="surrogate"):
        await keys.run("k", _ret(1), scope="o\udc80")


async def test_a_bad_key_is_named_before_the_request_is_hashed_on_every_front_end() -> None:
    """The key is in the request too (the decorator hashes its arguments): a lone surrogate
    in it is the key's error, not a UnicodeEncodeError from hashing; a surrogate elsewhere
    in the request is a ConfigurationError naming the fingerprint."""
    keys = _keys()
    ran = []

    @keys.idempotent(key="k")
    async def op(k: str, note: str = "") -> int:
        ran.append(k)
        return 1

    bad = "a\udc80"
    with pytest.raises(IdempotencyError, match="surrogate"):
        await op(k=bad)
    with pytest.raises(IdempotencyError, match="surrogate"):
        await keys.run(bad, _ret(1), request={"k": bad})
    with pytest.raises(IdempotencyError, match="surrogate"):
        await keys.claim(bad, request={"k": bad})
    with pytest.raises(IdempotencyError, match="surrogate"):
        async with keys.call(bad, request={"k": bad}):
            pass
    with pytest.raises(ConfigurationError, match="fingerprint"):
        await op(k="fine", note=bad)
    assert ran == []


async def test_completing_with_a_payload_that_is_not_bytes_raises_and_keeps_the_claim() -> None:
    keys = _keys()
    claim = await keys.claim("k")
    with pytest.raises(TypeError, match="bytes"):
        await claim.complete("a str")  # type: ignore[arg-type]
    await claim.complete(b"1")  # still the holder: it can complete
    assert (await keys.claim("k")).replayed


async def test_claim_takes_the_request_as_run_does() -> None:
    keys = _keys()
    claim = await keys.claim("k", request={"amount": 10})
    await claim.complete(b"1")
    assert (await keys.claim("k", request={"amount": 10})).replayed
    with pytest.raises(IdempotencyKeyReused):
        await keys.claim("k", request={"amount": 11})
