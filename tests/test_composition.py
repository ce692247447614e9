"""msdata.composition: concurrent parts, timeouts, fallbacks, partial answers, the deadline,
cancellation both ways, and a model check over random part outcomes.

Timeouts on the system clock use real small timeouts with parts that answer at once or
never, so an outcome never depends on how fast the machine is; exact instants are checked
with FakeClock.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msdata.composition import (
    Cancelled,
    Composed,
    Failed,
    Part,
    PartFailure,
    TimedOut,
    compose,
    optional,
    required,
)
from msdata.cqrs import QueryBus
from msdata.errors import (
    CompositionError,
    CompositionTimeout,
    ConfigurationError,
    RequiredPartFailed,
)
from msdata.messages import Query
from msdata.testing import FakeClock, eventually

SHORT = 0.02  # seconds: a timeout that a part which never answers always reaches


class Calls:
    """Source functions that record what happened to each call."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.finished: list[str] = []

    async def value(self, name: str, value: Any = None) -> Any:
        self.started.append(name)
        self.finished.append(name)
        return f"{name}-value" if value is None else value

    async def error(self, name: str, error: Exception | None = None) -> Any:
        self.started.append(name)
        self.finished.append(name)
        raise error or ValueError(f"{name} is down")

    async def never(self, name: str, cleanup_steps: int = 0) -> Any:
        """Never answers; on cancellation, takes ``cleanup_steps`` loop turns to stop."""
        self.started.append(name)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.append(name)
            for _ in range(cleanup_steps):
                await asyncio.sleep(0)
            raise
        finally:
            self.finished.append(name)


def only_this_task_left() -> bool:
    return asyncio.all_tasks() == {asyncio.current_task()}


@pytest.fixture
def calls() -> Calls:
    return Calls()


# -- answers ---------------------------------------------------------------------------------


async def test_every_part_answers(calls: Calls) -> None:
    user = required("user", calls.value, "user", {"id": 7})
    orders = required("orders", calls.value, "orders", [1, 2])
    recs = optional("recs", calls.value, "recs", ["book"], timeout=1.0)

    answer = await compose(user, orders, recs, deadline=5.0)

    assert answer[user] == {"id": 7}
    assert answer[orders] == [1, 2]
    assert answer[recs] == ["book"]
    assert answer.complete and not answer.missing and not answer.from_fallback
    assert answer.as_dict() == {"user": {"id": 7}, "orders": [1, 2], "recs": ["book"]}
    assert user in answer and recs in answer
    assert only_this_task_left()


async def test_parts_run_concurrently(calls: Calls) -> None:
    """Each part waits until the other has started: only concurrent calls can both answer."""
    a_started, b_started = asyncio.Event(), asyncio.Event()

    async def meet(mine: asyncio.Event, other: asyncio.Event) -> str:
        mine.set()
        await other.wait()
        return "met"

    a = required("a", meet, a_started, b_started)
    b = required("b", meet, b_started, a_started)
    answer = await compose(a, b, deadline=5.0)
    assert (answer[a], answer[b]) == ("met", "met")


async def test_one_part_may_be_composed_again(calls: Calls) -> None:
    """A part is a description: each composition makes its own call."""
    part = required("x", calls.value, "x")
    await compose(part, deadline=1.0)
    await compose(part, deadline=1.0)
    assert calls.started == ["x", "x"]


async def test_any_awaitable_returned_by_a_callable_works() -> None:
    loop = asyncio.get_running_loop()

    def future_of(value: int) -> asyncio.Future[int]:
        fut: asyncio.Future[int] = loop.create_future()
        loop.call_soon(fut.set_result, value)
        return fut

    async def add(a: int, b: int) -> int:
        return a + b

    from_future = required("future", future_of, 3)
    from_partial = required("partial", functools.partial(add, b=1), 1)
    from_thread = required("thread", functools.partial(asyncio.to_thread, sum, [1, 2]))
    answer = await compose(from_future, from_partial, from_thread, deadline=5.0)
    assert (answer[from_future], answer[from_partial], answer[from_thread]) == (3, 2, 3)


class StockLevel(Query[int]):
    sku: str


async def test_a_query_bus_query_is_a_part(calls: Calls) -> None:
    bus = QueryBus()

    @bus.handler(StockLevel)
    async def stock(query: StockLevel) -> int:
        return len(query.sku)

    level = required("stock", bus.ask, StockLevel(sku="abc"), timeout=1.0)
    user = required("user", calls.value, "user")
    answer = await compose(level, user, deadline=5.0)
    assert answer[level] == 3


async def test_parts_see_the_callers_context() -> None:
    """Each call runs in a copy of the caller's context (so a query asked while handling a
    message keeps its causation and correlation ids)."""
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")

    async def read_request_id() -> str:
        return request_id.get()

    request_id.set("req-1")
    part = required("id", read_request_id)
    answer = await compose(part, deadline=1.0)
    assert answer[part] == "req-1"


# -- optional parts and partial answers ------------------------------------------------------


async def test_an_optional_part_that_fails_is_missing_with_its_error(calls: Calls) -> None:
    boom = ConnectionError("recommender refused")
    user = required("user", calls.value, "user")
    recs = optional("recs", calls.error, "recs", boom)

    answer = await compose(user, recs, deadline=5.0)

    assert answer[user] == "user-value"
    assert answer[recs] is None
    assert answer.get(recs, ["fallback"]) == ["fallback"]
    assert recs not in answer
    assert answer.missing == {"recs": Failed(boom)}
    assert answer.missing["recs"].kind == "error"
    assert not answer.complete
    assert answer.as_dict() == {"user": "user-value"}


async def test_an_optional_part_that_times_out_is_cancelled_and_missing(calls: Calls) -> None:
    user = required("user", calls.value, "user")
    slow = optional("slow", calls.never, "slow", 3, timeout=SHORT)

    answer = await compose(user, slow, deadline=5.0)

    assert answer.missing == {"slow": TimedOut(SHORT)}
    assert str(answer.missing["slow"]) == f"timed out after {SHORT:g} s"
    # cancelled, and finished its cleanup before compose returned
    assert calls.cancelled == ["slow"] and "slow" in calls.finished
    assert only_this_task_left()


async def test_a_part_cancelled_by_its_source_is_missing_as_cancelled() -> None:
    async def cancelled_by_source() -> int:
        raise asyncio.CancelledError

    part = optional("flaky", cancelled_by_source)
    answer = await compose(part, deadline=5.0)
    assert answer.missing == {"flaky": Cancelled()}
    assert answer.missing["flaky"].kind == "cancelled"


async def test_failure_reasons_can_be_matched() -> None:
    def describe(failure: PartFailure) -> str:
        match failure:
            case TimedOut(seconds=seconds):
                return f"slow {seconds}"
            case Failed(error=ValueError() as error):
                return f"bad {error}"
            case Failed():
                return "other"
            case Cancelled():
                return "cancelled"
        raise AssertionError(failure)

    assert describe(TimedOut(0.5)) == "slow 0.5"
    assert describe(Failed(ValueError("x"))) == "bad x"
    assert describe(Cancelled()) == "cancelled"


# -- required parts --------------------------------------------------------------------------


async def test_a_required_part_that_fails_cancels_the_others_at_once(calls: Calls) -> None:
    boom = LookupError("no such user")
    user = required("user", calls.error, "user", boom)
    orders = required("orders", calls.never, "orders", 3)
    recs = optional("recs", calls.never, "recs")

    with pytest.raises(RequiredPartFailed) as caught:
        await compose(user, orders, recs, deadline=5.0)

    assert caught.value.part == "user"
    assert caught.value.reason == "raised LookupError: no such user"
    assert caught.value.__cause__ is boom
    assert isinstance(caught.value, CompositionError)
    assert sorted(calls.cancelled) == ["orders", "recs"]
    assert {"orders", "recs"} <= set(calls.finished)  # their cleanup ran before the raise
    assert only_this_task_left()


async def test_a_required_part_that_times_out(calls: Calls) -> None:
    user = required("user", calls.never, "user", timeout=SHORT)
    recs = optional("recs", calls.never, "recs")

    with pytest.raises(RequiredPartFailed) as caught:
        await compose(user, recs, deadline=5.0)

    assert caught.value.part == "user"
    assert caught.value.reason == f"timed out after {SHORT:g} s"
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert sorted(calls.cancelled) == ["recs", "user"]
    assert only_this_task_left()


async def test_a_required_part_cancelled_by_its_source() -> None:
    async def cancelled_by_source() -> int:
        raise asyncio.CancelledError

    with pytest.raises(RequiredPartFailed) as caught:
        await compose(required("flaky", cancelled_by_source), deadline=5.0)
    assert caught.value.reason == "was cancelled"
    assert isinstance(caught.value.__cause__, asyncio.CancelledError)


# -- fallbacks -------------------------------------------------------------------------------


async def test_a_default_answers_for_a_failed_part(calls: Calls) -> None:
    recs: Part[list[str]] = optional("recs", calls.error, "recs", default=[])
    user = required("user", calls.never, "user", timeout=SHORT, default={"id": 0})

    answer = await compose(recs, user, deadline=5.0)

    assert answer[recs] == [] and answer[user] == {"id": 0}
    assert recs in answer
    assert not answer.missing
    assert answer.from_fallback["user"] == TimedOut(SHORT)
    assert isinstance(answer.from_fallback["recs"], Failed)
    assert not answer.complete


async def test_a_fallback_function_gets_the_failure_and_answers(calls: Calls) -> None:
    seen: list[PartFailure] = []

    async def cached_user(failure: PartFailure) -> dict[str, int]:
        seen.append(failure)
        await asyncio.sleep(0)
        return {"id": 7, "stale": 1}

    user = required("user", calls.never, "user", timeout=SHORT, fallback=cached_user)
    answer = await compose(user, deadline=5.0)

    assert answer[user] == {"id": 7, "stale": 1}
    assert seen == [TimedOut(SHORT)]
    assert answer.from_fallback == {"user": TimedOut(SHORT)}
    assert calls.cancelled == ["user"]
    assert only_this_task_left()


async def test_an_optional_part_whose_fallback_fails_is_missing_with_both_errors(
    calls: Calls,
) -> None:
    first, second = ValueError("service down"), KeyError("not cached")

    async def from_cache(failure: PartFailure) -> str:
        raise second

    recs = optional("recs", calls.error, "recs", first, fallback=from_cache)
    answer = await compose(recs, deadline=5.0)

    assert answer.missing == {"recs": Failed(first, fallback_error=second)}
    assert "its fallback raised KeyError" in str(answer.missing["recs"])


async def test_a_required_part_whose_fallback_fails_raises_with_the_fallbacks_error(
    calls: Calls,
) -> None:
    second = KeyError("not cached")

    async def from_cache(failure: PartFailure) -> str:
        raise second

    user = required("user", calls.error, "user", fallback=from_cache)
    other = optional("other", calls.never, "other")
    with pytest.raises(RequiredPartFailed) as caught:
        await compose(user, other, deadline=5.0)

    assert caught.value.part == "user"
    assert caught.value.reason == (
        "raised ValueError: user is down; its fallback raised KeyError: 'not cached'"
    )
    assert caught.value.__cause__ is second
    assert calls.cancelled == ["other"]
    assert only_this_task_left()


async def test_a_fallback_gets_the_parts_timeout_again(calls: Calls) -> None:
    async def slow_cache(failure: PartFailure) -> str:
        await asyncio.Event().wait()
        return "never"

    recs = optional("recs", calls.error, "recs", timeout=SHORT, fallback=slow_cache)
    answer = await compose(recs, deadline=5.0)
    failure = answer.missing["recs"]
    assert isinstance(failure, Failed)
    assert isinstance(failure.fallback_error, TimeoutError)
    assert only_this_task_left()


async def test_a_sync_fallback_that_raises_counts_as_a_failed_fallback(calls: Calls) -> None:
    def broken(failure: PartFailure) -> Any:
        raise RuntimeError("fallback broke")

    recs = optional("recs", calls.error, "recs", fallback=broken)
    answer = await compose(recs, deadline=5.0)
    assert isinstance(answer.missing["recs"].fallback_error, RuntimeError)


# -- the overall deadline --------------------------------------------------------------------


async def test_optional_parts_running_at_the_deadline_time_out(calls: Calls) -> None:
    user = required("user", calls.value, "user")
    recs = optional("recs", calls.never, "recs", 2)  # no timeout of its own
    ads = optional("ads", calls.never, "ads", timeout=10.0, default=["house ad"])

    answer = await compose(user, recs, ads, deadline=SHORT)

    assert answer[user] == "user-value"
    assert answer.missing == {"recs": TimedOut(SHORT)}
    assert answer[ads] == ["house ad"]
    assert answer.from_fallback == {"ads": TimedOut(SHORT)}
    assert sorted(calls.cancelled) == ["ads", "recs"]
    assert {"ads", "recs"} <= set(calls.finished)
    assert only_this_task_left()


async def test_a_required_part_running_at_the_deadline_raises_composition_timeout(
    calls: Calls,
) -> None:
    user = required("user", calls.never, "user", timeout=10.0)
    orders = required("orders", calls.never, "orders")
    recs = optional("recs", calls.value, "recs")

    with pytest.raises(CompositionTimeout) as caught:
        await compose(user, orders, recs, deadline=SHORT)

    assert "'user', 'orders'" in str(caught.value)
    assert sorted(calls.cancelled) == ["orders", "user"]
    assert only_this_task_left()


async def test_a_fallback_running_at_the_deadline_counts_as_timed_out(calls: Calls) -> None:
    async def slow_cache(failure: PartFailure) -> str:
        await asyncio.Event().wait()
        return "never"

    user = required("user", calls.error, "user", fallback=slow_cache)
    with pytest.raises(CompositionTimeout):
        await compose(user, deadline=SHORT)
    assert only_this_task_left()


async def test_no_deadline_means_the_parts_timeouts_bound_the_wait(calls: Calls) -> None:
    recs = optional("recs", calls.never, "recs", timeout=SHORT)
    answer = await compose(recs, deadline=None)
    assert answer.missing == {"recs": TimedOut(SHORT)}


# -- cancellation of the composing task ------------------------------------------------------


async def test_cancelling_the_caller_cancels_every_part_and_propagates(calls: Calls) -> None:
    parts = [required("a", calls.never, "a", 2), optional("b", calls.never, "b", 2)]
    composing = asyncio.create_task(compose(*parts, deadline=60.0))
    await eventually(lambda: len(calls.started) == 2, what="both parts started")

    composing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await composing

    assert composing.cancelled()
    assert sorted(calls.cancelled) == ["a", "b"]
    assert sorted(calls.finished) == ["a", "b"]
    assert only_this_task_left()


async def test_a_caller_timeout_around_compose_propagates(calls: Calls) -> None:
    part = required("a", calls.never, "a")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(SHORT):
            await compose(part, deadline=60.0)
    assert calls.cancelled == ["a"]
    assert only_this_task_left()


async def test_cancelled_again_while_parts_clean_up_still_waits_for_them(calls: Calls) -> None:
    parts = [required("a", calls.never, "a", 5)]
    composing = asyncio.create_task(compose(*parts, deadline=60.0))
    await eventually(lambda: calls.started == ["a"], what="the part started")

    composing.cancel()
    await eventually(lambda: calls.cancelled == ["a"], what="the part saw the cancellation")
    composing.cancel()  # a second cancel while the part is cleaning up
    with pytest.raises(asyncio.CancelledError):
        await composing
    assert calls.finished == ["a"]
    assert only_this_task_left()


# -- bad wiring ------------------------------------------------------------------------------


async def test_a_sync_function_is_refused_before_any_part_starts(calls: Calls) -> None:
    def blocking_lookup(user_id: int) -> dict[str, int]:
        return {"id": user_id}

    first = required("first", calls.value, "first")
    wrong: Part[Any] = required("user", blocking_lookup, 7)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"'user'.*returned dict, not an awaitable"):
        await compose(first, wrong, deadline=1.0)
    assert calls.started == []  # the first part's coroutine was closed, never run
    assert only_this_task_left()


async def test_a_sync_fallback_is_refused_and_the_others_are_cancelled(calls: Calls) -> None:
    recs = optional("recs", calls.error, "recs", fallback=lambda failure: [])  # type: ignore[arg-type,return-value]
    other = optional("other", calls.never, "other")
    with pytest.raises(ConfigurationError, match=r"'recs': fallback .* returned list"):
        await compose(recs, other, deadline=1.0)
    assert calls.cancelled == ["other"]
    assert only_this_task_left()


async def test_a_sync_function_that_raises_is_that_parts_failure() -> None:
    def raises() -> Any:
        raise OSError("no route")

    answer = await compose(optional("x", raises), deadline=1.0)
    assert isinstance(answer.missing["x"], Failed)


async def test_a_coroutine_object_instead_of_a_function_is_refused(calls: Calls) -> None:
    with pytest.raises(ConfigurationError, match="coroutine object"):
        required("user", calls.value("user"))  # type: ignore[arg-type]
    assert calls.started == []


@pytest.mark.parametrize("timeout", [0, -1, math.inf, math.nan, "1", True])
async def test_bad_timeouts_are_refused(calls: Calls, timeout: Any) -> None:
    with pytest.raises(ConfigurationError, match="timeout"):
        required("a", calls.value, "a", timeout=timeout)
    with pytest.raises(ConfigurationError, match="deadline"):
        await compose(required("a", calls.value, "a"), deadline=timeout)


async def test_bad_parts_are_refused(calls: Calls) -> None:
    async def fb(failure: PartFailure) -> str:
        return ""

    with pytest.raises(ConfigurationError, match="non-empty"):
        required("", calls.value, "a")
    with pytest.raises(ConfigurationError, match="not both"):
        required("a", calls.value, "a", default="x", fallback=fb)
    with pytest.raises(ConfigurationError, match="default="):
        required("a", calls.value, "a", fallback="x")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="not callable"):
        required("a", 42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="unique"):
        await compose(required("a", calls.value, "a"), optional("a", calls.value, "b"), deadline=1)
    with pytest.raises(ConfigurationError, match="at least one"):
        await compose(deadline=1.0)
    with pytest.raises(ConfigurationError, match=r"required\(\) or optional\(\)"):
        await compose(calls.value, deadline=1.0)  # type: ignore[arg-type]
    assert calls.started == []


async def test_a_part_from_another_composition_is_refused(calls: Calls) -> None:
    a = required("a", calls.value, "a")
    lookalike = required("a", calls.value, "other")
    answer = await compose(a, deadline=1.0)
    with pytest.raises(ConfigurationError, match="not a part of this composition"):
        answer[lookalike]
    with pytest.raises(ConfigurationError):
        answer.get(lookalike, None)


# -- exact instants on a fake clock ----------------------------------------------------------


async def drive(clock: FakeClock, composing: asyncio.Task[Composed], step: float) -> None:
    """Advance ``clock`` by ``step`` each time the composer waits for time, until done."""
    for _ in range(100):
        await eventually(
            lambda: composing.done() or clock.sleepers == 1,
            interval=0.001,
            what="the composer waits for time or is done",
        )
        if composing.done():
            return
        clock.advance(step)
    raise AssertionError("the composition did not end")


async def test_timeouts_and_deadline_at_their_exact_instants(calls: Calls) -> None:
    clock = FakeClock()
    order: list[tuple[str, float]] = []

    async def fb(failure: PartFailure) -> str:
        order.append(("fallback", clock.monotonic()))
        return "from fallback"

    fast = optional("fast", calls.never, "fast", timeout=1.0, fallback=fb)
    slow = optional("slow", calls.never, "slow", timeout=3.0)
    composing = asyncio.create_task(compose(fast, slow, deadline=2.0, clock=clock))

    await eventually(lambda: clock.sleepers == 1, interval=0.001)
    clock.advance(0.999)
    await eventually(lambda: clock.sleepers == 1, interval=0.001)
    assert calls.cancelled == []
    clock.advance(0.001)  # t = 1.0: fast's timeout
    await eventually(lambda: order == [("fallback", 1.0)], interval=0.001)
    assert calls.cancelled == ["fast"]
    await eventually(lambda: clock.sleepers == 1, interval=0.001)
    clock.advance(0.999)
    await eventually(lambda: clock.sleepers == 1, interval=0.001)
    assert not composing.done()
    clock.advance(0.001)  # t = 2.0: the deadline, before slow's own timeout
    answer = await composing

    assert answer[fast] == "from fallback"
    assert answer.missing == {"slow": TimedOut(2.0)}
    assert calls.cancelled == ["fast", "slow"]
    assert only_this_task_left()


# -- the model check -------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    outcome: str  # "ok" | "error" | "hang"
    required: bool
    fallback: str  # "none" | "default" | "fn_ok" | "fn_error" | "fn_hang"
    timeout: float | None  # None or 1.0


specs = st.builds(
    Spec,
    outcome=st.sampled_from(["ok", "error", "hang"]),
    required=st.booleans(),
    fallback=st.sampled_from(["none", "default", "fn_ok", "fn_error", "fn_hang"]),
    timeout=st.sampled_from([None, 1.0]),
)


def expected(spec: Spec, deadline: float) -> tuple[str, float, PartFailure | None]:
    """(state, instant, failure): state is "value", "fallback" (a default or fallback's
    value), "failed" (no value, before the deadline) or "late" (no value at the deadline);
    the instant it got there; why its own call failed."""
    inf = math.inf
    if spec.outcome == "ok":
        return "value", 0.0, None
    failure: PartFailure
    if spec.outcome == "error":
        at, failure = 0.0, Failed(ValueError("down"))
    elif spec.timeout is not None and spec.timeout < deadline:
        at, failure = spec.timeout, TimedOut(spec.timeout)
    else:
        at, failure = deadline, TimedOut(deadline)
    if at == deadline:  # only a default has no time to run
        return ("fallback", at, failure) if spec.fallback == "default" else ("late", at, failure)
    if spec.fallback in ("default", "fn_ok"):
        return "fallback", at, failure
    if spec.fallback == "fn_hang":
        ends = at + spec.timeout if spec.timeout is not None else inf
        return ("failed", ends, failure) if ends < deadline else ("late", deadline, failure)
    return "failed", at, failure


async def run_model(parts_spec: list[Spec], deadline: float | None) -> None:
    clock = FakeClock()
    calls = Calls()
    fallback_ran: list[str] = []

    def fallback_for(name: str, kind: str) -> Any:
        async def fallback(failure: PartFailure) -> str:
            fallback_ran.append(name)
            if kind == "fn_error":
                raise KeyError(f"{name} not cached")
            if kind == "fn_hang":
                await asyncio.Event().wait()
            return f"{name}-fallback"

        return fallback

    parts: list[Part[Any]] = []
    for i, spec in enumerate(parts_spec):
        name = f"p{i}"
        fn: Any = {"ok": calls.value, "error": calls.error, "hang": calls.never}[spec.outcome]
        make: Any = required if spec.required else optional
        options: dict[str, Any] = {"timeout": spec.timeout}
        if spec.fallback == "default":
            options["default"] = f"{name}-default"
        elif spec.fallback != "none":
            options["fallback"] = fallback_for(name, spec.fallback)
        parts.append(make(name, fn, name, **options))

    composing = asyncio.create_task(compose(*parts, deadline=deadline, clock=clock))
    await drive(clock, composing, 0.5)
    exc = composing.exception()

    model = {f"p{i}": expected(s, deadline or math.inf) for i, s in enumerate(parts_spec)}
    failed_required = {
        name: at
        for (name, (state, at, _)), spec in zip(model.items(), parts_spec, strict=True)
        if spec.required and state == "failed"
    }
    late_required = [
        name
        for (name, (state, _, _)), spec in zip(model.items(), parts_spec, strict=True)
        if spec.required and state == "late"
    ]
    if failed_required:
        assert isinstance(exc, RequiredPartFailed), exc
        assert failed_required.get(exc.part) == min(failed_required.values())
    elif late_required:
        assert isinstance(exc, CompositionTimeout), exc
        assert all(repr(name) in str(exc) for name in late_required)
    else:
        assert exc is None, exc
        answer = composing.result()
        for part, spec, (name, (state, _, failure)) in zip(
            parts, parts_spec, model.items(), strict=True
        ):
            if state == "value":
                assert answer[part] == f"{name}-value"
            elif state == "fallback":
                kind = "default" if spec.fallback == "default" else "fallback"
                assert answer[part] == f"{name}-{kind}"
                assert type(answer.from_fallback[name]) is type(failure)
            else:
                assert part not in answer and answer[part] is None
                assert type(answer.missing[name]) is type(failure)
            if isinstance(failure, TimedOut):
                why = answer.from_fallback.get(name) or answer.missing[name]
                assert why == TimedOut(failure.seconds, why.fallback_error)
        assert set(answer.missing) == {n for n, (s, _, _) in model.items() if s != "value"} - set(
            answer.from_fallback
        )
    # every call that never answers was cancelled, and nothing is left running
    hung = sorted(n for n, s in zip(model, parts_spec, strict=True) if s.outcome == "hang")
    assert sorted(calls.cancelled) == hung
    assert sorted(calls.finished) == sorted(calls.started)
    assert only_this_task_left()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts_spec=st.lists(specs, min_size=1, max_size=5),
    deadline=st.sampled_from([None, 1.5, 2.5]),
)
def test_outcomes_match_the_model(parts_spec: list[Spec], deadline: float | None) -> None:
    unbounded = any(
        s.timeout is None and (s.outcome == "hang" or s.fallback == "fn_hang") for s in parts_spec
    )
    if deadline is None and unbounded:
        deadline = 2.5  # a part that never answers needs a timeout or a deadline
    asyncio.run(run_model(parts_spec, deadline))
