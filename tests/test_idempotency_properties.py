"""Hypothesis: arbitrary sequences of claims, completions, failures, crashed holders and
clock moves never run an operation twice while its stored result is live, and never give
one owner's response to another. Checked on the memory store and on SQLite."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from msdata.adapters.memory.idempotency import MemoryIdempotencyStore
from msdata.adapters.sqlite.idempotency import SqliteIdempotencyStore
from msdata.errors import IdempotencyInProgress, IdempotencyKeyReused
from msdata.idempotency import IdempotencyClaim, IdempotencyKeys, fingerprint
from msdata.testing import FakeClock

LEASE, RETENTION = 10.0, 25.0
OWNERS = st.sampled_from(["alice", "bob"])
KEYS = st.sampled_from(["k1", "k2"])
REQUESTS = st.sampled_from([1, 2])


@dataclass
class Expected:
    """What the store must hold for one (owner, key), by the spec."""

    completed: bool
    fp: str
    until: float  # clock seconds
    token: str
    response: bytes | None = None


class IdempotencyMachine(RuleBasedStateMachine):
    def make_store(self) -> Any:
        return MemoryIdempotencyStore()

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.t = 0.0
        self.keys = IdempotencyKeys(
            self.make_store(), lease_seconds=LEASE, retention_seconds=RETENTION, clock=self.clock
        )
        self.model: dict[tuple[str, str], Expected] = {}
        self.holding: list[tuple[str, str, IdempotencyClaim]] = []
        self.runs: dict[tuple[str, str], int] = {}
        self.serial = 0

    def live(self, owner: str, key: str) -> Expected | None:
        e = self.model.get((owner, key))
        return e if e is not None and e.until > self.t else None

    @rule(owner=OWNERS, key=KEYS, request=REQUESTS)
    def claim(self, owner: str, key: str, request: int) -> None:
        fp = fingerprint({"request": request})
        expected = self.live(owner, key)
        try:
            claim = self.keys.claim_sync(key, scope=owner, fingerprint=fp)
        except IdempotencyKeyReused:
            assert expected is not None and expected.fp != fp
            return
        except IdempotencyInProgress:
            assert expected is not None and not expected.completed and expected.fp == fp
            return
        if claim.replayed:
            assert expected is not None and expected.completed and expected.fp == fp
            stored = json.loads(claim.response())
            assert (stored["owner"], stored["key"]) == (owner, key)  # never another's
            assert claim.response() == expected.response
            return
        # it runs: nothing live may be stored for this key
        assert expected is None, f"ran {owner}/{key} again while {expected} is live"
        self.runs[(owner, key)] = self.runs.get((owner, key), 0) + 1
        self.model[(owner, key)] = Expected(False, fp, self.t + LEASE, claim.token)
        self.holding.append((owner, key, claim))

    def _take(self, i: int) -> tuple[str, str, IdempotencyClaim]:
        return self.holding.pop(i % len(self.holding))

    @precondition(lambda self: self.holding)
    @rule(i=st.integers(0, 10))
    def complete(self, i: int) -> None:
        owner, key, claim = self._take(i)
        self.serial += 1
        body = json.dumps({"owner": owner, "key": key, "n": self.serial}).encode()
        claim.complete_sync(body)
        e = self.model.get((owner, key))
        if e is not None and e.token == claim.token:  # fenced off otherwise
            e.completed, e.until, e.response = True, self.t + RETENTION, body

    @precondition(lambda self: self.holding)
    @rule(i=st.integers(0, 10))
    def fail(self, i: int) -> None:
        owner, key, claim = self._take(i)
        claim.release_sync()
        e = self.model.get((owner, key))
        if e is not None and e.token == claim.token:
            del self.model[(owner, key)]

    @precondition(lambda self: self.holding)
    @rule(i=st.integers(0, 10))
    def crash(self, i: int) -> None:
        self._take(i)  # the holder dies: its claim never ends

    @rule(seconds=st.sampled_from([0.5, 5.0, 10.0, 30.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.t += seconds

    def stored(self, owner: str, key: str) -> tuple[str, bool] | None:
        rec = self.keys.store._records.get((owner, key))
        return None if rec is None else (rec.token, rec.completed)

    @invariant()
    def the_store_agrees(self) -> None:
        for (owner, key), e in self.model.items():
            assert self.stored(owner, key) == (e.token, e.completed)


class SqliteIdempotencyMachine(IdempotencyMachine):
    def make_store(self) -> Any:
        self._dir = tempfile.TemporaryDirectory()
        store = SqliteIdempotencyStore(Path(self._dir.name) / "idem.db")
        conn = store._thread_conn()
        conn.executescript(store.schema_sql())
        return store

    def stored(self, owner: str, key: str) -> tuple[str, bool] | None:
        row = (
            self.keys.store._thread_conn()
            .execute(
                "SELECT token, completed FROM msdata_idempotency WHERE scope = ? AND key = ?",
                (owner, key),
            )
            .fetchone()
        )
        return None if row is None else (row[0], bool(row[1]))

    def teardown(self) -> None:
        conn = getattr(self.keys.store._local, "conn", None)
        if conn is not None:
            conn.close()
        self._dir.cleanup()


TestIdempotencyMemory = IdempotencyMachine.TestCase
TestIdempotencyMemory.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestIdempotencySqlite = SqliteIdempotencyMachine.TestCase
TestIdempotencySqlite.settings = settings(max_examples=25, stateful_step_count=30, deadline=None)
