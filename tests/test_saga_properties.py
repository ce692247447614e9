"""A hypothesis state machine over the saga orchestrator: every rule is one process
lifetime (a fresh orchestrator on the same store, killed at the rule's end), and the rules
inject failures, hangs, lost commands and replies, duplicate and late replies (a slow
participant whose answer comes after its attempt timed out, delivered once a later attempt
is under way), timeouts and recoveries. At the end the instance is settled and the
invariants checked:

- it ends COMPLETED, COMPENSATED, or FAILED with its error (never silently half done), and
  is not stuck RUNNING or COMPENSATING: within a bounded number of rounds of "every message
  delivered, the clock past every timeout, deadline and lease, recovery run" (the attempts
  of every step and compensation are bounded);
- each effect (a step's action, its compensation) was applied at most once, and each reply
  applied at most once;
- compensations ran in reverse step order, only for steps whose action was applied, and
  never once the pivot's action was applied;
- COMPLETED: every action applied and no compensation; COMPENSATED: every applied
  compensatable action was compensated and the pivot was not applied.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule
from pydantic import BaseModel

from msdata import Command, message_type
from msdata.adapters.memory import MemoryTransport
from msdata.adapters.memory.outbox import MemoryOutboxStore
from msdata.adapters.memory.saga import MemorySagaStore
from msdata.backoff import constant_backoff
from msdata.errors import SagaStateError, SagaStepFailed
from msdata.events import EventBus
from msdata.outbox import Outbox
from msdata.saga import (
    Retry,
    Saga,
    SagaOrchestrator,
    SagaReply,
    SagaStatus,
    current_step,
    remote,
)
from msdata.serialization import CloudEventsCodec
from msdata.testing import FakeClock

LEASE = 10.0
TIMEOUT = 5.0
SAGA_ID = "prop"


@message_type("prop.Do")
class Do(Command):
    step: str


class Data(BaseModel):
    replies: list[str] = []


class SagaMachine(RuleBasedStateMachine):
    @initialize(
        n_comp=st.integers(1, 3),
        retriable=st.integers(0, 2),
        remote_mask=st.lists(st.booleans(), min_size=6, max_size=6),
        local_faults=st.lists(
            st.sampled_from(["ok", "fail", "fail2", "hang"]), min_size=6, max_size=6
        ),
    )
    def build(
        self, n_comp: int, retriable: int, remote_mask: list[bool], local_faults: list[str]
    ) -> None:
        self.clock = FakeClock()
        self.store = MemorySagaStore()
        self.outbox_store = MemoryOutboxStore()
        self.codec = CloudEventsCodec()
        self.applied: dict[str, int] = {}  # idempotency key -> times applied
        self.log: list[tuple[str, str]] = []  # (step, purpose) in the order applied
        self.commands: list[Any] = []  # envelopes "on the network"
        self.replies: list[SagaReply] = []
        self.late: list[SagaReply] = []  # a slow participant's answers, held back
        self.faults = {}
        saga: Saga[Data] = Saga("prop", Data, compensation_retry=Retry(3, constant_backoff(1.0)))
        names = [f"c{i}" for i in range(n_comp)] + ["pivot"] + [f"r{i}" for i in range(retriable)]
        self.order = names
        self.kinds = {
            n: ("comp" if n.startswith("c") else n if n == "pivot" else "retr") for n in names
        }
        for i, name in enumerate(names):
            self.faults[name] = local_faults[i]
            action: Any = (
                remote(
                    lambda d, n=name: Do(step=n),
                    on_reply=lambda d, r, n=name: d.model_copy(update={"replies": [*d.replies, n]}),
                )
                if remote_mask[i]
                else self._local(name, "action")
            )
            comp: Any = (
                remote(lambda d, n=name: Do(step=n))
                if remote_mask[i]
                else self._local(name, "compensation")
            )
            if self.kinds[name] == "comp":
                saga.step(
                    name,
                    action,
                    compensate=comp,
                    retry=Retry(2, constant_backoff(1.0)),
                    timeout=TIMEOUT,
                )
            elif name == "pivot":
                saga.pivot(name, action, retry=Retry(2, constant_backoff(1.0)), timeout=TIMEOUT)
            else:
                saga.retriable(
                    name, action, retry=Retry(None, constant_backoff(1.0)), timeout=TIMEOUT
                )
        self.saga = saga
        self.lifetime(lambda o: o.start(saga, Data(), saga_id=SAGA_ID))

    # -- the participants ----------------------------------------------------------------------

    def _apply(self, step: str, purpose: str, key: str) -> bool:
        """Apply an effect once per idempotency key; an action whose compensation already ran
        is refused (the compensation overtook it)."""
        if purpose == "action" and key.replace(":action", ":compensation") in self.applied:
            raise SagaStepFailed("already compensated")
        if (
            purpose == "compensation"
            and key.replace(":compensation", ":action") not in self.applied
        ):
            self.applied[key] = 0  # nothing to undo; remembered so a late action is refused
            return False
        if key in self.applied:
            return False
        self.applied[key] = 1
        self.log.append((step, purpose))
        return True

    def _local(self, name: str, purpose: str) -> Callable[[Data], Awaitable[None]]:
        calls = [0]

        async def local(d: Data) -> None:
            calls[0] += 1
            fault = self.faults[name] if purpose == "action" else "ok"
            if fault in ("fail", "fail2") and calls[0] <= (1 if fault == "fail" else 2):
                raise SagaStepFailed("local failure")
            self._apply(name, purpose, current_step().idempotency_key)
            if fault == "hang" and calls[0] == 1:
                await asyncio.Event().wait()  # the process dies in here, after the effect

        return local

    # -- process lifetimes ---------------------------------------------------------------------

    def lifetime(self, work: Callable[[SagaOrchestrator], Awaitable[Any]]) -> None:
        async def main() -> None:
            orch = SagaOrchestrator(
                self.store,
                [self.saga],
                bus=EventBus(MemoryTransport()),
                outbox=Outbox(self.outbox_store, codec=self.codec),
                clock=self.clock,
                lease_seconds=LEASE,
            )
            task = asyncio.ensure_future(work(orch))
            for _ in range(50):
                await asyncio.sleep(0)
            if task.done() and not task.cancelled():
                exc = task.exception()
                if exc is not None and not isinstance(exc, SagaStateError):
                    raise exc
            # the process ends: whatever still runs is killed
            task.cancel()
            for t in list(orch._tasks):
                t.cancel()
            await asyncio.gather(task, *orch._tasks, return_exceptions=True)
            await self._collect()

        asyncio.run(main())

    async def _collect(self) -> None:
        rows = await self.outbox_store.claim("net", 1000, 3600)
        await self.outbox_store.mark_sent("net", [r.seq for r in rows])
        self.commands += [self.codec.decode(r.payload) for r in rows]

    # -- rules ---------------------------------------------------------------------------------

    @rule(
        data=st.data(),
        outcome=st.sampled_from(["ok", "ok", "fail", "lost_command", "lost_reply", "slow"]),
    )
    def deliver_command(self, data: st.DataObject, outcome: str) -> None:
        if not self.commands:
            return
        env = self.commands.pop(data.draw(st.integers(0, len(self.commands) - 1)))
        self._participant(env, outcome)

    def _participant(self, env: Any, outcome: str) -> None:
        h = env.headers
        step, purpose, key = h["sagastep"], h["sagapurpose"], h["idempotencykey"]
        base = dict(
            saga_id=h["sagaid"],
            saga_type=h["sagatype"],
            step=step,
            purpose=purpose,
            attempt=int(h["sagaattempt"]),
        )
        if outcome == "lost_command":
            return
        if outcome == "fail" and purpose == "action" and key not in self.applied:
            self.replies.append(SagaReply(ok=False, reason="refused", **base))
            return
        try:
            fresh = self._apply(step, purpose, key)
        except SagaStepFailed:
            self.replies.append(SagaReply(ok=False, reason="already compensated", **base))
            return
        if outcome == "slow":  # applied, answered after the attempt's timeout
            self.late.append(SagaReply(ok=True, duplicate=not fresh, **base))
        elif outcome != "lost_reply":
            self.replies.append(SagaReply(ok=True, duplicate=not fresh, **base))

    @rule(data=st.data(), duplicate=st.booleans())
    def deliver_reply(self, data: st.DataObject, duplicate: bool) -> None:
        if not self.replies:
            return
        i = data.draw(st.integers(0, len(self.replies) - 1))
        reply = self.replies[i] if duplicate else self.replies.pop(i)

        async def on_reply(orch: SagaOrchestrator) -> None:
            try:
                await orch._on_reply(reply)
            except SagaStateError:
                self.replies.append(reply)  # nacked: the broker redelivers it

        self.lifetime(on_reply)

    @rule(data=st.data())
    def late_reply_from_an_earlier_attempt(self, data: st.DataObject) -> None:
        """A slow participant's answer comes in once the clock passed its attempt's timeout,
        preferably while a later attempt of the same step invocation is under way."""
        if not self.late:
            return
        rec = self.store.snapshot(SAGA_ID)

        def earlier(r: SagaReply) -> bool:
            run = rec.active.get(r.step)
            return run is not None and run.purpose == r.purpose and run.attempt > r.attempt

        candidates = [i for i, r in enumerate(self.late) if earlier(r)] or list(
            range(len(self.late))
        )
        reply = self.late.pop(candidates[data.draw(st.integers(0, len(candidates) - 1))])
        self.clock.advance(TIMEOUT)  # it is late: its attempt has timed out by now

        async def on_reply(orch: SagaOrchestrator) -> None:
            try:
                await orch._on_reply(reply)
            except SagaStateError:
                self.replies.append(reply)  # nacked: the broker redelivers it

        self.lifetime(on_reply)

    @rule(seconds=st.sampled_from([1.0, 5.0, 11.0]))
    def time_passes_and_recovery_runs(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.lifetime(lambda o: o.recover())

    @rule()
    def operator_retries_a_failed_saga(self) -> None:
        async def retry(orch: SagaOrchestrator) -> None:
            if (await orch.get(SAGA_ID)).status is SagaStatus.FAILED:
                await orch.retry(SAGA_ID)

        self.lifetime(retry)

    # -- the end -------------------------------------------------------------------------------

    def teardown(self) -> None:
        if not hasattr(self, "store"):
            return
        # each round delivers every message, passes every timeout, backoff, deadline and
        # lease, and runs recovery: each round settles at least one attempt of one step or
        # compensation, and those are bounded (2 forward attempts a step; a retriable step
        # succeeds once answered; 3 compensation attempts; a pivot asked again answers)
        bound = 6 * len(self.order) + 4
        for _ in range(bound):
            rec = self.store.snapshot(SAGA_ID)
            if rec.status in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED):
                break
            self.replies += self.late
            self.late.clear()
            while self.commands:
                self._participant(self.commands.pop(0), "ok")
            while self.replies:
                reply = self.replies.pop(0)

                async def on_reply(orch: SagaOrchestrator, reply: SagaReply = reply) -> None:
                    # held by a dead process: its lease expires below
                    with contextlib.suppress(SagaStateError):
                        await orch._on_reply(reply)

                self.lifetime(on_reply)
            self.clock.advance(11)
            self.lifetime(lambda o: o.recover())
        rec = self.store.snapshot(SAGA_ID)
        status = rec.status
        # never stuck RUNNING/COMPENSATING once everything was delivered and timed out
        assert status in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED), rec
        stuck: list[Any] = []

        async def find_stuck(orch: SagaOrchestrator) -> None:
            stuck.extend(await orch.stuck())

        self.lifetime(find_stuck)
        # only a FAILED instance waits for an operator, and it is visible
        assert [r.saga_id for r in stuck] == ([SAGA_ID] if status is SagaStatus.FAILED else [])
        if status is SagaStatus.FAILED:
            assert rec.error
        assert all(n <= 1 for n in self.applied.values())
        assert len(self.log) == len(set(self.log))
        data = rec.data if isinstance(rec.data, Data) else Data.model_validate(rec.data)
        assert len(data.replies) == len(set(data.replies)), data.replies
        actions = [s for s, p in self.log if p == "action"]
        comps = [s for s, p in self.log if p == "compensation"]
        index = {n: i for i, n in enumerate(self.order)}
        assert comps == sorted(comps, key=lambda s: -index[s]), self.log
        assert set(comps) <= set(actions)
        assert all(self.kinds[s] == "comp" for s in comps)
        if "pivot" in actions:
            assert not comps, self.log
        if status is SagaStatus.COMPLETED:
            assert actions == self.order and not comps
        if status is SagaStatus.COMPENSATED:
            assert "pivot" not in actions
            assert set(comps) == {s for s in actions if self.kinds[s] == "comp"}


TestSagaMachine = SagaMachine.TestCase
TestSagaMachine.settings = settings(
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
